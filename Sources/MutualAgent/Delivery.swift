import Foundation
import MutualPKCS11
import MutualPKI
import X509

/// The files the agent delivers, and how: each version is written whole into its own directory
/// (`.gen-<serial>/key.pem, cert.pem, chain.pem, bundle.pem`, every file fsynced, then the directory), and published
/// by renaming one symlink, `current`, onto it. The files users point at (`key.pem`, `cert.pem`, `chain.pem`,
/// `bundle.pem`) are symlinks through `current`. The rename is the only commit point: a crash before it leaves the
/// old pair, after it the new pair — never a half-written file or a key next to the wrong certificate.
public enum Delivery {
    public static let files = ["key.pem", "cert.pem", "chain.pem", "bundle.pem"]

    /// Test hook: `MUTUAL_AGENT_CRASH_POINT` = `after-key`, `after-files` or `before-publish` makes the agent kill
    /// itself with SIGKILL at that point of a delivery (the crash test uses it).
    public static var crashPoint: String? { ProcessInfo.processInfo.environment["MUTUAL_AGENT_CRASH_POINT"] }

    static func crash(at point: String) {
        if crashPoint == point { kill(getpid(), SIGKILL) }
    }

    /// The delivered key and certificates, classical or ML-DSA.
    public struct Current: Sendable {
        public var key: AnySigningKey
        public var chain: [AnyCertificate]
        public var roots: [AnyCertificate]
        public var leaf: AnyCertificate { chain[0] }
    }

    /// The delivered credentials, or nil when there are none yet. Throws when they are unreadable or do not match.
    public static func read(outDir: String, pinFrom: PKCS11URI? = nil) throws -> Current? {
        let keyPath = outDir + "/key.pem"
        let uriPath = outDir + "/key.uri"
        let key: AnySigningKey
        if FileManager.default.fileExists(atPath: keyPath) {
            let keyText = String(decoding: try AtomicFile.read(keyPath, limit: 1 << 20, what: "key"), as: UTF8.self)
            key = try AnySigningKey(pem: keyText, passphrase: { nil })
        } else if FileManager.default.fileExists(atPath: uriPath) {
            // The key lives in a PKCS#11 token: key.uri names it (no PIN in it; that comes from the agent's own URI).
            let text = String(decoding: try AtomicFile.read(uriPath, limit: 8192, what: "key URI"), as: UTF8.self)
            var uri = try PKCS11URI(text.trimmingCharacters(in: .whitespacesAndNewlines))
            if uri.pinSource == nil, let configured = pinFrom { uri.pinSource = configured.pinSource; uri.pinValue = configured.pinValue }
            key = .classical(try PKCS11Key.find(uri).certificatePrivateKey)
        } else {
            return nil
        }
        let chain = try PEMBundle.anyCertificates(fromBytes: try AtomicFile.read(outDir + "/chain.pem", limit: 1 << 20, what: "chain"), what: "chain.pem")
        let roots = try PEMBundle.anyCertificates(fromBytes: try AtomicFile.read(outDir + "/bundle.pem", limit: 1 << 20, what: "bundle"), what: "bundle.pem")
        guard key.matches(chain[0]) else {
            throw AgentError(.fatal, "\(outDir): key.pem does not match cert.pem")
        }
        return Current(key: key, chain: chain, roots: roots)
    }

    /// Writes a new version and publishes it; keeps the previous version's directory, removes older ones.
    public static func deliver(outDir: String, key: Certificate.PrivateKey, chain: [Certificate], roots: [Certificate]) throws {
        try deliver(outDir: outDir, key: .classical(key), chain: chain.map { .classical($0) }, roots: roots.map { .classical($0) })
    }

    /// Either family: an ML-DSA key is written in its PKCS#8 seed form, certificates as PEM.
    public static func deliver(outDir: String, key: AnySigningKey, chain: [AnyCertificate], roots: [AnyCertificate]) throws {
        try FileManager.default.createDirectory(atPath: outDir, withIntermediateDirectories: true, attributes: [.posixPermissions: 0o700])
        let name = ".gen-\(chain[0].serialHex)"
        let directory = outDir + "/" + name
        try? FileManager.default.removeItem(atPath: directory)
        try FileManager.default.createDirectory(atPath: directory, withIntermediateDirectories: false, attributes: [.posixPermissions: 0o755])
        func pem(_ certificates: [AnyCertificate]) throws -> String {
            try certificates.map { PEMCodec.encode(try $0.der, label: "CERTIFICATE") }.joined()
        }
        // A key in a PKCS#11 token is not a file: key.uri names it instead (RFC 7512, without the PIN), for the
        // agent's next start and for programs that sign through the token themselves.
        var tokenKey: PKCS11Key?
        if case .classical(let k) = key { tokenKey = PKCS11Key.holding(k.publicKey) }
        let keyFile = tokenKey == nil ? "key.pem" : "key.uri"
        if let tokenKey {
            try AtomicFile.write(tokenKey.uri.description + "\n", to: directory + "/key.uri", mode: 0o644)
        } else {
            try AtomicFile.write(try key.pem(), to: directory + "/key.pem", mode: 0o600)
        }
        crash(at: "after-key")
        try AtomicFile.write(try pem([chain[0]]), to: directory + "/cert.pem")
        try AtomicFile.write(try pem(chain), to: directory + "/chain.pem")
        try AtomicFile.write(try pem(roots), to: directory + "/bundle.pem")
        AtomicFile.syncDirectory(directory)
        crash(at: "after-files")

        let previous = (try? FileManager.default.destinationOfSymbolicLink(atPath: outDir + "/current"))
        let temporary = outDir + "/.current.tmp"
        try? FileManager.default.removeItem(atPath: temporary)
        try FileManager.default.createSymbolicLink(atPath: temporary, withDestinationPath: name)
        crash(at: "before-publish")
        guard rename(temporary, outDir + "/current") == 0 else {
            throw AgentError(.fatal, "cannot publish \(directory): \(String(cString: strerror(errno)))")
        }
        for stale in ["key.pem", "key.uri"] where stale != keyFile {
            try? FileManager.default.removeItem(atPath: outDir + "/" + stale)
        }
        for file in [keyFile] + files.dropFirst() where (try? FileManager.default.destinationOfSymbolicLink(atPath: outDir + "/" + file)) != "current/" + file {
            let link = outDir + "/." + file + ".tmp"
            try? FileManager.default.removeItem(atPath: link)
            try FileManager.default.createSymbolicLink(atPath: link, withDestinationPath: "current/" + file)
            guard rename(link, outDir + "/" + file) == 0 else {
                throw AgentError(.fatal, "cannot link \(outDir)/\(file): \(String(cString: strerror(errno)))")
            }
        }
        AtomicFile.syncDirectory(outDir)
        // Old versions: keep the one just replaced (a reader may still be opening it), remove the rest.
        let entries = (try? FileManager.default.contentsOfDirectory(atPath: outDir)) ?? []
        for entry in entries where entry.hasPrefix(".gen-") && entry != name && entry != previous {
            try? FileManager.default.removeItem(atPath: outDir + "/" + entry)
        }
    }
}

/// What `mutual agent status` shows, written atomically after every attempt.
public struct AgentStatus: Codable, Sendable, Equatable {
    public var identity: String
    public var authority: String
    /// `ok`, `retrying` (failing, still serving the current certificate) or `stopped` (needs a person).
    public var state: String
    public var serial: String?
    public var notAfter: Date?
    public var renewAt: Date?
    public var lastSuccess: Date?
    public var lastAttempt: Date?
    public var lastError: String?
    /// The stable code of the last error (the authority's problem code, a TLS reason code, or `transport`).
    public var lastErrorCode: String?
    public var consecutiveFailures: Int
    /// The authority's Date header minus local time, seconds, at the last answer.
    public var clockSkewSeconds: Double?
    public var renewals: Int
    /// How the current certificate renews: `mtls` or `proof` (a certificate without clientAuth).
    public var renewalMethod: String?

    enum CodingKeys: String, CodingKey {
        case identity, authority, state, serial, renewals
        case renewalMethod = "renewal_method"
        case notAfter = "not_after", renewAt = "renew_at", lastSuccess = "last_success", lastAttempt = "last_attempt"
        case lastError = "last_error", lastErrorCode = "last_error_code", consecutiveFailures = "consecutive_failures", clockSkewSeconds = "clock_skew_seconds"
    }

    public static func path(outDir: String) -> String { outDir + "/status.json" }

    public static func read(outDir: String) -> AgentStatus? {
        guard let data = FileManager.default.contents(atPath: path(outDir: outDir)) else { return nil }
        let decoder = JSONDecoder()
        decoder.dateDecodingStrategy = .iso8601
        return try? decoder.decode(AgentStatus.self, from: data)
    }

    func write(outDir: String) {
        let encoder = JSONEncoder()
        encoder.dateEncodingStrategy = .iso8601
        encoder.outputFormatting = [.prettyPrinted, .sortedKeys, .withoutEscapingSlashes]
        guard let data = try? encoder.encode(self) else { return }
        try? AtomicFile.write(Array(data) + [0x0A], to: Self.path(outDir: outDir))
    }
}
