import ArgumentParser
import Hummingbird
import Logging
import MutualServer
import Foundation
import MutualAuthority
import MutualPKI
import X509

struct BenchCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "bench", abstract: "Benchmarks of this machine's Mutual.", subcommands: [BenchIssue.self, BenchCAServer.self]
    )
}

/// Issuance from CSRs with durable inventory writes, in-process: CSR parse + signature check, profile checks, signing,
/// group-committed SQLite transaction (WAL, synchronous=FULL). Reports certificates/s and CPU per certificate.
struct BenchIssue: AsyncParsableCommand {
    static let configuration = CommandConfiguration(commandName: "issue", abstract: "Durable issuance throughput (P-256).")

    @Option(help: "Number of certificates to issue.") var count = 20_000
    @Option(help: "Concurrent issuers.") var concurrency = 64
    @Option(help: "State directory to use (default: a fresh temporary one, deleted afterwards).") var stateDir: String?
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
                try await Authority.initialize(state: state, name: "Bench CA", keyType: .p256, constraints: .init(), passphrase: nil, actor: "bench")
            }
        }
        let authority = try await failing { try await Authority.open(state: state) }
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
        let shared = csrs
        let cpuBefore = Self.cpuSeconds()
        let started = ContinuousClock.now
        let failures = try await withThrowingTaskGroup(of: Int.self) { group in
            let perWorker = (count + concurrency - 1) / concurrency
            for worker in 0..<concurrency {
                let range = (worker * perWorker)..<min(count, (worker + 1) * perWorker)
                guard !range.isEmpty else { continue }
                group.addTask {
                    var failed = 0
                    for index in range {
                        do {
                            _ = try await authority.sign(csr: shared[index], profile: .workload, validity: nil, owner: "bench", requester: "bench")
                        } catch {
                            failed += 1
                        }
                    }
                    return failed
                }
            }
            return try await group.reduce(0, +)
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
            print(String(format: "issued %d certificates (%d failed) in %.2f s: %.0f certificates/s, %.0f µs CPU per certificate, %d rows in the inventory",
                         count - failures, failures, seconds, rate, cpuPer, stored))
        }
        if failures > 0 { throw ExitCode(1) }
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

    @Option(help: "HOST:PORT to listen on.") var listen = "127.0.0.1:9888"

    func run() async throws {
        let (host, port) = try await failing { try AuthorityServer.Configuration.parseListen(listen) }
        let dir = FileManager.default.temporaryDirectory.appendingPathComponent("mutual-bench-ca-\(UUID().uuidString.prefix(8))").path
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let state = StateDirectory(path: dir)
        _ = try await failing {
            try await Authority.initialize(state: state, name: "Bench CA", keyType: .p256, constraints: .init(), passphrase: nil, actor: "bench")
        }
        let authority = try await failing { try await Authority.open(state: state) }
        let router = Router()
        router.post("/sign") { request, context -> Response in
            let body = try await request.body.collect(upTo: PEMBundle.maximumInputSize)
            do {
                let issued = try await authority.sign(csr: Array(body.readableBytesView), profile: .client, validity: .hours(24), owner: "bench", requester: "bench")
                return Response(status: .ok, headers: [.contentType: "application/x-pem-file"],
                                body: .init(byteBuffer: ByteBuffer(string: PEMCodec.encode(issued.record.der, label: "CERTIFICATE"))))
            } catch {
                return Response(status: .badRequest, body: .init(byteBuffer: ByteBuffer(string: "\(error)\n")))
            }
        }
        var logger = Logger(label: "mutual.bench")
        logger.logLevel = .warning
        let app = Application(router: router, configuration: .init(address: .hostname(host, port: port)), logger: logger)
        print("mutual bench ca-server: http://\(host):\(port)/sign (throwaway CA in \(dir))")
        try await app.runService()
        try await authority.close()
    }
}
