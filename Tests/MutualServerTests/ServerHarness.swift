import Foundation
import Logging
import MutualAuthority
import MutualClient
import MutualPKCS11
import MutualPKI
import MutualServer
import MutualStore
import TestSupport
import X509

/// A real authority on 127.0.0.1 (port chosen at run time) over a real state directory, stopped by cancellation.
final class ServerHarness: @unchecked Sendable {
    // @unchecked: `task` is written once in `start` before any other access and read in `stop`, both from the
    // test's own task.
    let dir: String
    let state: StateDirectory
    let authority: Authority
    var port = 0
    var httpPort = 0
    var task: Task<Void, any Error>?
    let shutdownHandle = ShutdownHandle()

    var baseURL: String { "https://127.0.0.1:\(port)" }
    var httpURL: String { "http://127.0.0.1:\(httpPort)" }

    static func start(
        renewExpiredGrace: ValidityDuration? = nil, idleTimeout: Duration = .seconds(30), acme: [ACMEProvisioner] = [], pq: MLDSAVariant? = nil,
        keyStore: PKCS11URI? = nil, oauth: OAuthSettings = OAuthSettings()
    ) async throws -> ServerHarness {
        let dir = TestPKI.temporaryDirectory("server")
        let state = StateDirectory(path: dir + "/state")
        _ = try await Authority.initialize(
            state: state, name: "Server Test", keyType: .p256, constraints: .init(), passphrase: nil, actor: "test", keyStore: keyStore
        )
        let authority = try await Authority.open(state: state)
        if let pq { _ = try await authority.addPQHierarchy(variant: pq, passphrase: nil, actor: "test") }
        let harness = ServerHarness(dir: dir, state: state, authority: authority)
        var logger = Logger(label: "test.server")
        logger.logLevel = .critical
        var configuration = AuthorityServer.Configuration(host: "127.0.0.1", port: 0, renewExpiredGrace: renewExpiredGrace, idleTimeout: idleTimeout)
        configuration.httpListen = ("127.0.0.1", 0)
        configuration.acmeProvisioners = acme
        configuration.oauth = oauth
        let server = AuthorityServer(authority: authority, configuration: configuration, logger: logger)
        let (stream, continuation) = AsyncStream<(String, Int)>.makeStream()
        harness.task = Task {
            try await server.run(
                shutdown: harness.shutdownHandle,
                onListening: { port in continuation.yield(("https", port)) },
                onHTTPListening: { port in continuation.yield(("http", port)) }
            )
        }
        for await (kind, port) in stream {
            if kind == "https" { harness.port = port } else { harness.httpPort = port }
            if harness.port != 0 && harness.httpPort != 0 { break }
        }
        return harness
    }

    private init(dir: String, state: StateDirectory, authority: Authority) {
        self.dir = dir
        self.state = state
        self.authority = authority
    }

    func stop() async {
        await shutdownHandle.shutdown()
        _ = try? await task?.value
        try? await authority.close()
        try? FileManager.default.removeItem(atPath: dir)
    }

    var root: Certificate { authority.ca.root }

    func client(identity: (chain: [Certificate], key: Certificate.PrivateKey)? = nil) throws -> AuthorityClient {
        try AuthorityClient(baseURL: baseURL, trustRoots: [root], identity: identity)
    }

    func adminIdentity() throws -> (chain: [Certificate], key: Certificate.PrivateKey) {
        let chain = try PEMBundle.certificates(fromPEM: String(contentsOfFile: state.adminDirectory + "/chain.pem", encoding: .utf8))
        let key = try KeyFile.load(pem: String(contentsOfFile: state.adminDirectory + "/key.pem", encoding: .utf8), passphrase: { nil })
        return (chain, key)
    }

    func token(scopes: [String], profile: CertificateProfile = .workload, uses: Int = 1, ttl: ValidityDuration = .hours(1),
               maxValidity: ValidityDuration = .hours(24)) async throws -> IssuedToken {
        try await TokenService(store: authority.store).create(
            scopes: scopes, profile: profile, maxValidity: maxValidity, ttl: ttl, uses: uses, owner: "test", actor: "test",
            caMaximum: authority.ca.policy.maximumValidity
        )
    }

    static func csr(_ key: Certificate.PrivateKey, uri: String? = nil, dns: [String] = [], cn: String? = nil) throws -> String {
        var sans: [GeneralName] = dns.map { .dnsName($0) }
        if let uri { sans.append(.uniformResourceIdentifier(uri)) }
        return try TestPKI.csr(key: key, commonName: cn, sans: sans).serializeAsPEM().pemString
    }

    /// Runs curl against the server and returns (HTTP status, body).
    /// Runs curl on a dispatch thread: waiting for a child process must not block a Swift concurrency thread, which
    /// the in-process server needs to answer that very request.
    func curl(_ path: String, method: String = "GET", body: String? = nil, contentType: String? = "application/json",
              headers: [String] = [], clientCert: (cert: String, key: String)? = nil, maxTime: Int = 20) async throws -> (Int, String) {
        let clientCertificate = clientCert.map { [$0.cert, $0.key] }
        return try await withCheckedThrowingContinuation { continuation in
            DispatchQueue.global().async {
                do {
                    let pair = clientCertificate.map { (cert: $0[0], key: $0[1]) }
                    continuation.resume(returning: try self.curlBlocking(path, method: method, body: body, contentType: contentType,
                                                                         headers: headers, clientCert: pair, maxTime: maxTime))
                } catch {
                    continuation.resume(throwing: error)
                }
            }
        }
    }

    func curlBlocking(_ path: String, method: String, body: String?, contentType: String?,
                      headers: [String], clientCert: (cert: String, key: String)?, maxTime: Int) throws -> (Int, String) {
        let process = Process()
        process.executableURL = URL(fileURLWithPath: "/usr/bin/curl")
        var args = ["-s", "-S", "--max-time", String(maxTime), "--cacert", state.rootCertificatePath, "-X", method, "-w", "\n%{http_code}"]
        if let contentType { args += ["-H", "Content-Type: \(contentType)"] }
        for header in headers { args += ["-H", header] }
        if let clientCert { args += ["--cert", clientCert.cert, "--key", clientCert.key] }
        if let body {
            let file = dir + "/body-\(UUID().uuidString)"
            try body.write(toFile: file, atomically: true, encoding: .utf8)
            args += ["--data-binary", "@" + file]
        }
        args.append(baseURL + path)
        process.arguments = args
        // Output goes to a file, not a pipe: a pipe's write end can leak into a child another test spawns at the same
        // moment, and then EOF never comes.
        let outPath = dir + "/curl-\(UUID().uuidString)"
        FileManager.default.createFile(atPath: outPath, contents: nil)
        let outHandle = try FileHandle(forWritingTo: URL(fileURLWithPath: outPath))
        process.standardOutput = outHandle
        process.standardError = FileHandle.nullDevice
        try process.run()
        process.waitUntilExit()
        try outHandle.close()
        let text = (try? String(contentsOfFile: outPath, encoding: .utf8)) ?? ""
        let lines = text.split(separator: "\n", omittingEmptySubsequences: false)
        let status = Int(lines.last ?? "") ?? 0
        return (status, lines.dropLast().joined(separator: "\n"))
    }

    static func json(_ text: String) -> [String: Any] {
        (try? JSONSerialization.jsonObject(with: Data(text.utf8))) as? [String: Any] ?? [:]
    }

    static func encode(_ object: [String: String]) -> String {
        String(decoding: (try? JSONSerialization.data(withJSONObject: object)) ?? Data(), as: UTF8.self)
    }
}

