import ArgumentParser
import Crypto
import Foundation
import MutualAuthority
import MutualClient
import MutualPKI
import NIOCore
import NIOPosix
import NIOSSL
import NIOTLS
import X509

/// ML-DSA beside P-256, measured in one run for BENCHMARKS.md: raw signing and verification, certificate and chain
/// sizes, durable issuance through the authority (SQLite), and the CPU a `mutual proxy` process spends per mTLS
/// handshake (TLS 1.3, X25519MLKEM768, client certificate verified) with each kind of certificate on both sides.
struct BenchPQ: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "pq", abstract: "ML-DSA-65/87 beside P-256: signatures, sizes, durable issuance, proxy handshake CPU."
    )

    @Option(help: "Signatures (and verifications) per algorithm.") var signatures = 2000
    @Option(help: "Certificates issued per key type.") var count = 5000
    @Option(help: "Concurrent issuers.") var concurrency = 32
    @Option(help: "Handshakes through the proxy per key type.") var handshakes = 2000
    @Option(help: "Concurrent handshaking clients.") var clients = 8
    @Flag(help: "Print JSON.") var json = false

    func validate() throws {
        guard (10...1_000_000).contains(signatures), (10...1_000_000).contains(count), (1...4096).contains(concurrency),
              (10...1_000_000).contains(handshakes), (1...256).contains(clients)
        else {
            throw ValidationError("--signatures, --count and --handshakes must be 10...1000000, --concurrency 1...4096, --clients 1...256")
        }
    }

    struct Row: Encodable {
        var algorithm: String
        var sign_per_second: Double
        var verify_per_second: Double
        /// Verification with the public key parsed once beforehand (Mutual's verifier parses the raw key per
        /// signature; this column shows what that costs).
        var verify_parsed_key_per_second: Double
        var public_key_bytes: Int
        var signature_bytes: Int
        var leaf_bytes: Int
        var chain_bytes: Int
        var root_bytes: Int
        var issued_per_second: Double
        var issue_cpu_us: Double
        var handshakes_per_second: Double?
        var proxy_cpu_us_per_handshake: Double?
    }

    func run() async throws {
        let dir = FileManager.default.temporaryDirectory.appendingPathComponent("mutual-bench-pq-\(UUID().uuidString.prefix(8))").path
        defer { try? FileManager.default.removeItem(atPath: dir) }
        var rows: [Row] = []
        for choice in [KeyChoice.classical(.p256), .mldsa(.mlDSA65), .mldsa(.mlDSA87)] {
            let (sign, verify, verifyParsed, publicKeySize, signatureSize) = try Self.signatures(choice, count: signatures)
            let state = StateDirectory(path: dir + "/" + choice.rawValue)
            _ = try await failing { try await Authority.initialize(state: state, name: "Bench PQ", keyType: .p256, constraints: .init(), passphrase: nil, actor: "bench") }
            let authority = try await failing { try await Authority.open(state: state) }
            if case .mldsa(let variant) = choice { _ = try await authority.addPQHierarchy(variant: variant, passphrase: nil, actor: "bench") }
            // Files for the proxy: a server and a client identity of this kind, and the root.
            let server = try await Self.issue(authority, choice, contents: .init(profile: .server, dnsNames: ["localhost"]), into: dir + "/" + choice.rawValue + "-server")
            let client = try await Self.issue(authority, choice, contents: .init(profile: .workload, uris: ["spiffe://bench.test/client"]), into: dir + "/" + choice.rawValue + "-client")
            let (rate, cpu) = try await Self.issuance(authority, choice, count: count, concurrency: concurrency)
            try await authority.close()
            var row = Row(
                algorithm: choice.rawValue, sign_per_second: sign, verify_per_second: verify, verify_parsed_key_per_second: verifyParsed,
                public_key_bytes: publicKeySize,
                signature_bytes: signatureSize, leaf_bytes: client.leaf, chain_bytes: client.leaf + client.intermediate,
                root_bytes: client.root, issued_per_second: rate, issue_cpu_us: cpu
            )
            // The handshakes: ML-DSA-87 certificates go through the same code as ML-DSA-65; measured for both anyway.
            let (perSecond, cpuPerHandshake) = try await Self.proxyHandshakes(server: server.directory, client: client.directory, count: handshakes, clients: clients)
            row.handshakes_per_second = perSecond
            row.proxy_cpu_us_per_handshake = cpuPerHandshake
            rows.append(row)
        }
        if json {
            try printJSON(rows)
            return
        }
        print("algorithm  sign/s  verify/s  (key parsed once)  pubkey  sig   leaf  leaf+int  root  issued/s  µs CPU/cert  handshakes/s  proxy µs CPU/handshake")
        for r in rows {
            print(r.algorithm.padding(toLength: 10, withPad: " ", startingAt: 0)
                + String(format: " %6.0f %9.0f %18.0f %7d %5d %6d %9d %5d %9.0f %12.0f %13.0f %23.0f", r.sign_per_second, r.verify_per_second,
                         r.verify_parsed_key_per_second, r.public_key_bytes, r.signature_bytes, r.leaf_bytes, r.chain_bytes, r.root_bytes,
                         r.issued_per_second, r.issue_cpu_us, r.handshakes_per_second ?? 0, r.proxy_cpu_us_per_handshake ?? 0))
        }
    }

    /// Signs and verifies a 512-byte message (about a certificate's TBS) `count` times on one thread.
    static func signatures(_ choice: KeyChoice, count: Int) throws -> (Double, Double, Double, Int, Int) {
        let message = [UInt8](repeating: 0x5A, count: 512)
        func rate(_ body: () throws -> Void) rethrows -> Double {
            let start = ContinuousClock.now
            for _ in 0..<count { try body() }
            let elapsed = ContinuousClock.now - start
            return Double(count) / (Double(elapsed.components.seconds) + Double(elapsed.components.attoseconds) / 1e18)
        }
        switch choice {
        case .classical:
            let key = P256.Signing.PrivateKey()
            let signature = try key.signature(for: message)
            let sign = try rate { _ = try key.signature(for: message) }
            var ok = true
            let verify = rate { ok = ok && key.publicKey.isValidSignature(signature, for: message) }
            guard ok else { throw CommandFailure("P-256 verification failed", exitCode: 1) }
            return (sign, verify, verify, key.publicKey.x963Representation.count, signature.derRepresentation.count)
        case .mldsa(let variant):
            let key = try MLDSASigningKey(generating: variant)
            let raw = key.publicKey
            let signature = try key.sign(message)
            let sign = try rate { _ = try key.sign(message) }
            var ok = true
            let verify = rate { ok = ok && variant.isValidSignature(signature, for: message, publicKey: raw) }
            let parsed: Double
            switch variant {
            case .mlDSA65:
                let publicKey = try MLDSA65.PublicKey(rawRepresentation: raw)
                parsed = rate { ok = ok && publicKey.isValidSignature(signature, for: message) }
            case .mlDSA87:
                let publicKey = try MLDSA87.PublicKey(rawRepresentation: raw)
                parsed = rate { ok = ok && publicKey.isValidSignature(signature, for: message) }
            }
            guard ok else { throw CommandFailure("\(variant.rawValue) verification failed", exitCode: 1) }
            return (sign, verify, parsed, key.publicKey.count, signature.count)
        }
    }

    /// Issues one certificate of `choice` and writes key.pem and chain.pem (leaf + issuing CA) and root.pem.
    static func issue(_ authority: Authority, _ choice: KeyChoice, contents: IssuanceRequest.Contents, into directory: String) async throws
        -> (directory: String, leaf: Int, intermediate: Int, root: Int)
    {
        try FileManager.default.createDirectory(atPath: directory, withIntermediateDirectories: true)
        let key = try choice.generate()
        let chain: [AnyCertificate]
        let root: AnyCertificate
        switch key {
        case .classical(let k):
            let issued = try await authority.issue(
                IssuanceRequest(profile: contents.profile, publicKey: k.publicKey, dnsNames: contents.dnsNames, uris: contents.uris),
                owner: "bench", requester: "bench"
            )
            chain = issued.chain.map { .classical($0) }
            root = .classical(authority.ca.root)
        case .mldsa(let k):
            let issued = try await authority.issue(contents, mldsaKey: try MLDSAPublicKey(variant: k.variant, rawRepresentation: k.publicKey), owner: "bench", requester: "bench")
            chain = issued.chain.map { .mldsa($0) }
            root = .mldsa(authority.pqCA!.root)
        }
        try AtomicFile.write(try key.pem(), to: directory + "/key.pem", mode: 0o600)
        try AtomicFile.write(try chain.map { PEMCodec.encode(try $0.der, label: "CERTIFICATE") }.joined(), to: directory + "/chain.pem")
        try AtomicFile.write(PEMCodec.encode(try root.der, label: "CERTIFICATE"), to: directory + "/root.pem")
        return (directory, try chain[0].der.count, try chain[1].der.count, try root.der.count)
    }

    /// Durable issuance from CSRs made beforehand (clients make them, not the CA), `concurrency` at a time.
    static func issuance(_ authority: Authority, _ choice: KeyChoice, count: Int, concurrency: Int) async throws -> (Double, Double) {
        var csrs: [[UInt8]] = []
        csrs.reserveCapacity(count)
        for i in 0..<count {
            let key = try choice.generate()
            csrs.append(Array(try key.certificationRequest(subject: DistinguishedName(), names: [.uniformResourceIdentifier("spiffe://bench.test/w/\(i)")]).pem.utf8))
        }
        let shared = csrs
        let cpuBefore = BenchIssue.cpuSeconds()
        let started = ContinuousClock.now
        let failures = try await BenchIssue.failures(count: count, concurrency: concurrency) { index in
            switch choice {
            case .classical: _ = try await authority.sign(csr: shared[index], profile: .workload, validity: nil, owner: "bench", requester: "bench")
            case .mldsa: _ = try await authority.sign(mldsaCSR: shared[index], profile: .workload, validity: nil, owner: "bench", requester: "bench")
            }
        }
        let elapsed = ContinuousClock.now - started
        let seconds = Double(elapsed.components.seconds) + Double(elapsed.components.attoseconds) / 1e18
        guard failures == 0 else { throw CommandFailure("\(failures) of \(count) \(choice.rawValue) issuances failed", exitCode: 1) }
        return (Double(count) / seconds, (BenchIssue.cpuSeconds() - cpuBefore) / Double(count) * 1e6)
    }

    /// Starts `mutual proxy` (this executable) with the server identity, makes `count` full handshakes to it with the
    /// client identity (new connection each, no resumption, X25519MLKEM768 offered), and reads the proxy process's
    /// CPU time from /proc before and after: the proxy's cost per handshake, client certificate verified.
    static func proxyHandshakes(server: String, client: String, count: Int, clients: Int) async throws -> (Double, Double) {
        let process = Process()
        process.executableURL = URL(fileURLWithPath: "/proc/self/exe").resolvingSymlinksInPath()
        process.arguments = [
            "proxy", "--listen", "127.0.0.1:0", "--upstream", "http://127.0.0.1:9", "--cert", server + "/chain.pem", "--key", server + "/key.pem",
            "--client-ca", client + "/root.pem", "--allow", "spiffe://bench.test/*", "--access-log", "off", "--threads", "1",
        ]
        let errors = Pipe()
        process.standardError = errors
        process.standardOutput = FileHandle.nullDevice
        try process.run()
        defer { if process.isRunning { process.terminate(); process.waitUntilExit() } }
        var port: Int?
        var buffered = ""
        let deadline = Date().addingTimeInterval(15)
        while port == nil, Date() < deadline {
            let data = errors.fileHandleForReading.availableData
            if data.isEmpty { break }
            buffered += String(decoding: data, as: UTF8.self)
            if let range = buffered.range(of: #"inbound listening on 127\.0\.0\.1:([0-9]+)"#, options: .regularExpression) {
                port = Int(buffered[range].split(separator: ":").last ?? "")
            }
        }
        guard let port else { throw CommandFailure("the proxy did not start: \(buffered.suffix(300))", exitCode: 1) }
        var tls = TLSConfiguration.makeClientConfiguration()
        tls.minimumTLSVersion = .tlsv13
        tls.curves = [.x25519_MLKEM768]
        tls.verifySignatureAlgorithms = TLSSignatureAlgorithms.all
        tls.signingSignatureAlgorithms = TLSSignatureAlgorithms.all
        tls.trustRoots = .certificates(try NIOSSLCertificate.fromPEMFile(server + "/root.pem"))
        tls.certificateChain = try NIOSSLCertificate.fromPEMFile(client + "/chain.pem").map { .certificate($0) }
        tls.privateKey = .privateKey(try NIOSSLPrivateKey(file: client + "/key.pem", format: .pem))
        let context = try NIOSSLContext(configuration: tls)
        // Warm up (the proxy's first handshakes build its caches), then measure.
        _ = try await Self.handshakes(context: context, port: port, count: 20, clients: 1)
        let cpuBefore = try Self.processCPU(process.processIdentifier)
        let started = ContinuousClock.now
        try await Self.handshakes(context: context, port: port, count: count, clients: clients)
        let elapsed = ContinuousClock.now - started
        let cpu = try Self.processCPU(process.processIdentifier) - cpuBefore
        let seconds = Double(elapsed.components.seconds) + Double(elapsed.components.attoseconds) / 1e18
        return (Double(count) / seconds, cpu / Double(count) * 1e6)
    }

    static func handshakes(context: NIOSSLContext, port: Int, count: Int, clients: Int) async throws {
        try await withThrowingTaskGroup(of: Void.self) { group in
            for worker in 0..<clients {
                group.addTask {
                    for _ in stride(from: worker, to: count, by: clients) {
                        let done = MultiThreadedEventLoopGroup.singleton.any().makePromise(of: Void.self)
                        let channel = try await ClientBootstrap(group: MultiThreadedEventLoopGroup.singleton)
                            .channelInitializer { channel in
                                channel.eventLoop.makeCompletedFuture {
                                    try channel.pipeline.syncOperations.addHandler(try NIOSSLClientHandler(context: context, serverHostname: "localhost"))
                                    try channel.pipeline.syncOperations.addHandler(HandshakeWaiter(done: done))
                                }
                            }
                            .connect(host: "127.0.0.1", port: port).get()
                        try await done.futureResult.get()
                        try await channel.close()
                    }
                }
            }
            try await group.waitForAll()
        }
    }

    /// utime + stime of a process, seconds (/proc/PID/stat fields 14 and 15, in clock ticks).
    static func processCPU(_ pid: Int32) throws -> Double {
        let text = try String(contentsOfFile: "/proc/\(pid)/stat", encoding: .utf8)
        guard let close = text.lastIndex(of: ")") else { throw CommandFailure("unreadable /proc/\(pid)/stat", exitCode: 1) }
        let fields = text[text.index(after: close)...].split(separator: " ")
        guard fields.count > 13, let user = Double(fields[11]), let system = Double(fields[12]) else {
            throw CommandFailure("unreadable /proc/\(pid)/stat", exitCode: 1)
        }
        return (user + system) / Double(sysconf(Int32(_SC_CLK_TCK)))
    }
}

/// Completes `done` when the TLS handshake completes (or fails with its error).
private final class HandshakeWaiter: ChannelInboundHandler, Sendable {
    typealias InboundIn = ByteBuffer
    let done: EventLoopPromise<Void>
    init(done: EventLoopPromise<Void>) { self.done = done }

    func userInboundEventTriggered(context: ChannelHandlerContext, event: Any) {
        if case TLSUserEvent.handshakeCompleted = event { done.succeed(()) }
        context.fireUserInboundEventTriggered(event)
    }

    func errorCaught(context: ChannelHandlerContext, error: any Error) {
        done.fail(error)
        context.close(promise: nil)
    }

    func channelInactive(context: ChannelHandlerContext) {
        done.fail(ChannelError.eof)
    }
}
