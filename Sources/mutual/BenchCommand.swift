import ArgumentParser
import Hummingbird
import Logging
import MutualServer
import MutualStore
import MutualClient
import AsyncHTTPClient
import NIOCore
import NIOSSL
import Foundation
import MutualAuthority
import MutualPKCS11
import MutualPKI
import X509

struct BenchCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "bench", abstract: "Benchmarks of this machine's Mutual.", subcommands: [BenchIssue.self, BenchCAServer.self, BenchCRL.self, BenchRevokeEvent.self, BenchTLSFloor.self, BenchDashboard.self, BenchPQ.self, BenchSign.self]
    )
}

/// Issuance from CSRs with durable inventory writes, in-process: CSR parse + signature check, profile checks, signing,
/// group-committed SQLite transaction (WAL, synchronous=FULL). Reports certificates/s and CPU per certificate.
struct BenchIssue: AsyncParsableCommand {
    static let configuration = CommandConfiguration(commandName: "issue", abstract: "Durable issuance throughput (P-256).")

    @Option(help: "Number of certificates to issue.") var count = 20_000
    @Option(help: "Concurrent issuers.") var concurrency = 64
    @Option(help: "State directory to use (default: a fresh temporary one, deleted afterwards).") var stateDir: String?
    @Option(help: "PostgreSQL URL for the inventory (default: SQLite in the state directory).") var database: String?
    @Flag(help: "Measure renewals instead: issue --count certificates first (untimed), then renew each with a new key.") var renew = false
    @Option(help: "Keep the bench CA's keys in this PKCS#11 token (an RFC 7512 URI, as `mutual init --key-store`).") var keyStore: String?
    @Flag(help: "Print JSON.") var json = false

    func validate() throws {
        guard (1...1_000_000).contains(count), (1...4096).contains(concurrency) else {
            throw ValidationError("--count must be 1...1000000 and --concurrency 1...4096")
        }
    }

    func run() async throws {
        let temporary = stateDir == nil
        let dir = stateDir ?? FileManager.default.temporaryDirectory.appendingPathComponent("mutual-bench-\(UUID().uuidString.prefix(8))").path
        defer { if temporary { try? FileManager.default.removeItem(atPath: dir) } }
        let state = StateDirectory(path: dir)
        if !state.isInitialized {
            _ = try await failing {
                try await Authority.initialize(
                    state: state, name: "Bench CA", keyType: .p256, constraints: .init(), passphrase: nil, actor: "bench", databaseURL: database,
                    keyStore: try keyStore.map { try PKCS11URI($0) }
                )
            }
        }
        let authority = try await failing { try await Authority.open(state: state, databaseURL: database) }
        // CSRs are made before the clock starts: clients make them, not the CA.
        var csrs: [[UInt8]] = []
        csrs.reserveCapacity(count)
        for i in 0..<count {
            let key = try KeyType.p256.generate()
            let extensions = try Certificate.Extensions { SubjectAlternativeNames([.uniformResourceIdentifier("spiffe://bench.test/w/\(i)")]) }
            let csr = try CertificateSigningRequest(
                version: .v1, subject: DistinguishedName(), privateKey: key,
                attributes: try CertificateSigningRequest.Attributes([.init(ExtensionRequest(extensions: extensions))]),
                signatureAlgorithm: .ecdsaWithSHA256
            )
            csrs.append(Array(try csr.serializeAsPEM().pemString.utf8))
        }
        var currents: [Certificate] = []
        if renew {
            // Untimed: the certificates to renew.
            for csr in csrs {
                currents.append(try await authority.sign(csr: csr, profile: .workload, validity: nil, owner: "bench", requester: "bench").certificate)
            }
            var fresh: [[UInt8]] = []
            for i in 0..<count {
                let key = try KeyType.p256.generate()
                let request = try CertificateSigningRequest(version: .v1, subject: DistinguishedName(), privateKey: key, attributes: .init(), signatureAlgorithm: .ecdsaWithSHA256)
                fresh.append(Array(try request.serializeAsPEM().pemString.utf8))
                _ = i
            }
            csrs = fresh
        }
        let shared = csrs
        let renewing = currents
        let cpuBefore = Self.cpuSeconds()
        let started = ContinuousClock.now
        let failures = try await Self.failures(count: count, concurrency: concurrency) { index in
            if renewing.isEmpty {
                _ = try await authority.sign(csr: shared[index], profile: .workload, validity: nil, owner: "bench", requester: "bench")
            } else {
                _ = try await authority.renew(current: renewing[index], csr: shared[index])
            }
        }
        let elapsed = ContinuousClock.now - started
        let cpu = Self.cpuSeconds() - cpuBefore
        let seconds = Double(elapsed.components.seconds) + Double(elapsed.components.attoseconds) / 1e18
        let stored = try await authority.store.countCertificates()
        try await authority.close()
        let rate = Double(count - failures) / seconds
        let cpuPer = cpu / Double(max(1, count - failures)) * 1e6
        if json {
            try printJSON([
                "count": Double(count), "failures": Double(failures), "seconds": seconds, "certificates_per_second": rate,
                "cpu_us_per_certificate": cpuPer, "inventory_rows": Double(stored),
            ])
        } else {
            print(String(format: "%@ %d certificates (%d failed) in %.2f s: %.0f certificates/s, %.0f µs CPU per certificate, %d rows in the inventory",
                         renew ? "renewed" : "issued", count - failures, failures, seconds, rate, cpuPer, stored))
        }
        if failures > 0 { throw ExitCode(1) }
    }

    /// Runs `body` for indices 0..<count, split over `concurrency` tasks in contiguous ranges; returns how many threw.
    static func failures(count: Int, concurrency: Int, _ body: @escaping @Sendable (Int) async throws -> Void) async throws -> Int {
        try await withThrowingTaskGroup(of: Int.self) { group in
            let perWorker = (count + concurrency - 1) / concurrency
            for worker in 0..<concurrency {
                let range = min(count, worker * perWorker)..<min(count, (worker + 1) * perWorker)
                guard !range.isEmpty else { continue }
                group.addTask {
                    var failed = 0
                    for index in range {
                        do { try await body(index) } catch { failed += 1 }
                    }
                    return failed
                }
            }
            return try await group.reduce(0, +)
        }
    }

    static func cpuSeconds() -> Double {
        var usage = rusage()
        getrusage(RUSAGE_SELF.rawValue, &usage)
        return Double(usage.ru_utime.tv_sec) + Double(usage.ru_utime.tv_usec) / 1e6 + Double(usage.ru_stime.tv_sec)
            + Double(usage.ru_stime.tv_usec) / 1e6
    }
}

/// A plain-HTTP signing endpoint for `../shared/bench/peers.sh` (`OUR_CA_MODE=raw`), so that the authority's
/// issuance path can be measured with the same load generator, methodology and pinning as `cfssl serve`, which also
/// speaks plain HTTP without authentication. Bench only: it runs a throwaway CA in a temporary directory, never
/// the operator's, and it is not part of `mutual serve`.
struct BenchCAServer: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "ca-server",
        abstract: "Bench only: a throwaway CA answering POST /sign (PEM CSR in, PEM certificate out) over plain HTTP."
    )

    /// What each request does; the partial modes take the full path apart, to see where its CPU goes.
    enum Stage: String, ExpressibleByArgument, CaseIterable {
        /// CSR check, profile, signing, inventory + audit commit (fsynced) before answering: what `serve` does.
        case full
        /// CSR check, profile and signing, answered without recording anything (cfssl's work, for comparison).
        case sign
        /// Reads the body and answers a fixed PEM block: the HTTP server alone.
        case http
    }

    @Option(help: "HOST:PORT to listen on.") var listen = "127.0.0.1:9888"
    @Option(help: "What each request does: full (default), sign (no inventory write: not durable), http (no signing).")
    var stage: Stage = .full

    func run() async throws {
        GlobalExecutor.adoptEventLoops()
        let (host, port) = try await failing { try AuthorityServer.Configuration.parseListen(listen) }
        let dir = FileManager.default.temporaryDirectory.appendingPathComponent("mutual-bench-ca-\(UUID().uuidString.prefix(8))").path
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let state = StateDirectory(path: dir)
        _ = try await failing {
            try await Authority.initialize(state: state, name: "Bench CA", keyType: .p256, constraints: .init(), passphrase: nil, actor: "bench")
        }
        let authority = try await failing { try await Authority.open(state: state) }
        let fixed = try authority.ca.certificate.issuedDER
        let stage = self.stage
        let router = Router()
        router.post("/sign") { request, context -> Response in
            let body = try await request.body.collect(upTo: PEMBundle.maximumInputSize)
            do {
                let der: [UInt8]
                switch stage {
                case .full:
                    der = try await authority.sign(csr: Array(body.readableBytesView), profile: .client, validity: .hours(24), owner: "bench", requester: "bench").record.der
                case .sign:
                    let csr = try CSRDecoder.decode(Array(body.readableBytesView))
                    der = try authority.ca.issue(try IssuanceRequest(verifiedCSR: csr, profile: .client, validity: .hours(24)), now: .now).issuedDER
                case .http:
                    der = fixed
                }
                return Response(status: .ok, headers: [.contentType: "application/x-pem-file"],
                                body: .init(byteBuffer: ByteBuffer(string: PEMCodec.encode(der, label: "CERTIFICATE"))))
            } catch {
                return Response(status: .badRequest, body: .init(byteBuffer: ByteBuffer(string: "\(error)\n")))
            }
        }
        var logger = Logger(label: "mutual.bench")
        logger.logLevel = .warning
        let app = Application(router: router, configuration: .init(address: .hostname(host, port: port)), logger: logger)
        print("mutual bench ca-server: http://\(host):\(port)/sign, stage \(stage.rawValue) (throwaway CA in \(dir))")
        try await app.runService()
        try await authority.close()
    }
}

/// CRL generation time and size with many revoked certificates (issue #4): the inventory is filled with synthetic
/// revoked records (no signing), then one CRL is built, signed and stored, as after a revocation.
struct BenchCRL: AsyncParsableCommand {
    static let configuration = CommandConfiguration(commandName: "crl", abstract: "CRL generation time and size with N revoked certificates.")

    @Option(help: "Revoked certificates in the inventory.") var revoked = 100_000
    @Flag(help: "Print JSON.") var json = false

    func run() async throws {
        let dir = FileManager.default.temporaryDirectory.appendingPathComponent("mutual-bench-crl-\(UUID().uuidString.prefix(8))").path
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let state = StateDirectory(path: dir)
        _ = try await failing { try await Authority.initialize(state: state, name: "Bench CA", keyType: .p256, constraints: .init(), passphrase: nil, actor: "bench") }
        let authority = try await failing { try await Authority.open(state: state) }
        let now = Date.now
        let fillStart = ContinuousClock.now
        try await withThrowingTaskGroup(of: Void.self) { group in
            let workers = 256
            for worker in 0..<workers {
                group.addTask {
                    var n = worker
                    while n < revoked {
                        var serial = [UInt8](repeating: 0, count: 16)
                        withUnsafeBytes(of: UInt64(n + 1).bigEndian) { serial.replaceSubrange(8..<16, with: $0) }
                        serial[0] = 0x40
                        let hex = serial.hexString
                        let record = CertificateRecord(
                            serial: hex, issuer: "bench", subject: "", subjectAlternativeNames: [], identity: "bench-\(n)",
                            profile: "workload", owner: nil, requester: "bench", notBefore: now, notAfter: now.addingTimeInterval(86_400),
                            fingerprint: hex, der: [0x30, 0x00], status: .revoked, revokedAt: now, revocationReason: n % 2 == 0 ? "keyCompromise" : "superseded"
                        )
                        try await authority.store.recordIssuance(record, audit: AuditEntry(time: now, actor: "bench", action: "bench-fill", subject: hex))
                        n += workers
                    }
                }
            }
            try await group.waitForAll()
        }
        let fill = ContinuousClock.now - fillStart
        let publisher = RevocationPublisher(authority: authority)
        let cpuBefore = BenchIssue.cpuSeconds()
        let start = ContinuousClock.now
        let crl = try await publisher.publish(now: now)
        let elapsed = ContinuousClock.now - start
        let cpu = BenchIssue.cpuSeconds() - cpuBefore
        let parsed = try RevocationList(derEncoded: crl.der)
        try await authority.close()
        let seconds = Double(elapsed.components.seconds) + Double(elapsed.components.attoseconds) / 1e18
        if json {
            try printJSON(["revoked": Double(revoked), "entries": Double(parsed.entries.count), "seconds": seconds, "cpu_seconds": cpu, "bytes": Double(crl.der.count)])
        } else {
            print(String(format: "CRL with %d entries: generated, signed and stored in %.3f s (%.3f s CPU), %d bytes (%.1f MiB); inventory filled in %@",
                         parsed.entries.count, seconds, cpu, crl.der.count, Double(crl.der.count) / 1_048_576, "\(fill)"))
        }
    }
}

/// Time from a revocation (API call by the admin) to the event reaching a Server-Sent-Events subscriber, on loopback.
struct BenchRevokeEvent: AsyncParsableCommand {
    static let configuration = CommandConfiguration(commandName: "revoke-event", abstract: "Revocation-to-event latency over the event stream.")

    @Option(help: "Revocations to time.") var count = 50

    func run() async throws {
        let dir = FileManager.default.temporaryDirectory.appendingPathComponent("mutual-bench-ev-\(UUID().uuidString.prefix(8))").path
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let state = StateDirectory(path: dir)
        _ = try await failing { try await Authority.initialize(state: state, name: "Bench CA", keyType: .p256, constraints: .init(), passphrase: nil, actor: "bench") }
        let authority = try await failing { try await Authority.open(state: state) }
        var logger = Logger(label: "bench")
        logger.logLevel = .critical
        let handle = ShutdownHandle()
        let server = AuthorityServer(authority: authority, configuration: .init(host: "127.0.0.1", port: 0), logger: logger)
        let (ports, continuation) = AsyncStream<Int>.makeStream()
        let serverTask = Task { try await server.run(shutdown: handle, onListening: { continuation.yield($0) }) }
        var port = 0
        for await p in ports { port = p; break }
        var issued: [String] = []
        for i in 0..<count {
            let key = try KeyType.p256.generate()
            issued.append(try await authority.issue(.init(profile: .client, publicKey: key.publicKey, commonName: "ev-\(i)"), owner: nil, requester: "bench").record.serial)
        }
        let adminChain = try PEMBundle.certificates(fromPEM: String(contentsOfFile: state.adminDirectory + "/chain.pem", encoding: .utf8))
        let adminKey = try KeyFile.load(pem: String(contentsOfFile: state.adminDirectory + "/key.pem", encoding: .utf8), passphrase: { nil })
        let admin = try AuthorityClient(baseURL: "https://127.0.0.1:\(port)", trustRoots: [authority.ca.root], identity: (adminChain, adminKey))

        // The subscriber: AsyncHTTPClient streaming the SSE body; records when each serial arrives.
        var tls = TLSConfiguration.makeClientConfiguration()
        tls.trustRoots = .certificates([try NIOSSLCertificate(bytes: try authority.ca.root.derBytes, format: .der)])
        let http = HTTPClient(eventLoopGroupProvider: .singleton, configuration: .init(tlsConfiguration: tls))
        let arrivals = AsyncStream<(String, ContinuousClock.Instant)>.makeStream()
        let subscriber = Task {
            let request = HTTPClientRequest(url: "https://127.0.0.1:\(port)/v1/revocations/events")
            let response = try await http.execute(request, timeout: .seconds(300))
            var pending = ""
            for try await chunk in response.body {
                pending += String(buffer: chunk)
                while let range = pending.range(of: "\n\n") {
                    let block = String(pending[..<range.lowerBound])
                    pending = String(pending[range.upperBound...])
                    if let dataLine = block.split(separator: "\n").first(where: { $0.hasPrefix("data: ") }),
                       let object = try? JSONSerialization.jsonObject(with: Data(dataLine.dropFirst(6).utf8)) as? [String: Any],
                       let serial = object["serial"] as? String {
                        arrivals.continuation.yield((serial, ContinuousClock.now))
                    }
                }
            }
        }
        try await Task.sleep(for: .milliseconds(300))
        var latencies: [Double] = []
        var iterator = arrivals.stream.makeAsyncIterator()
        for serial in issued {
            let start = ContinuousClock.now
            try await admin.revoke(serial: serial, reason: "superseded")
            while let (got, at) = await iterator.next() {
                if got == serial {
                    let d = at - start
                    latencies.append(Double(d.components.seconds) * 1000 + Double(d.components.attoseconds) / 1e15)
                    break
                }
            }
        }
        subscriber.cancel()
        try? await http.shutdown()
        try await admin.shutdown()
        await handle.shutdown()
        _ = try? await serverTask.value
        try await authority.close()
        latencies.sort()
        func q(_ p: Double) -> Double { latencies[min(latencies.count - 1, Int((Double(latencies.count - 1) * p).rounded()))] }
        print(String(format: "revoke -> event over SSE, %d revocations: p50 %.1f ms, p90 %.1f ms, p99 %.1f ms, max %.1f ms (includes the revoke API call itself)",
                     latencies.count, q(0.5), q(0.9), q(0.99), latencies.last ?? 0))
    }
}
