import Foundation
import MutualPKI

/// The files of an authority under its state directory.
///
/// ```
/// DIR/config.json           CA settings (written last by init: its presence means "initialized")
/// DIR/mutual.db             SQLite inventory + audit chain
/// DIR/ca/root.pem           trust anchor
/// DIR/ca/root.key           root key (0600; take it offline, see docs/operations.md)
/// DIR/ca/intermediate.pem   issuing CA
/// DIR/ca/intermediate.key   issuing key (0600)
/// DIR/ca/pq-{root,intermediate}.{pem,key}   the ML-DSA hierarchy, when `mutual pq init` made one
/// DIR/admin/{cert,key,chain}.pem   operator client certificate for the admin API
/// ```
public struct StateDirectory: Sendable {
    public let path: String

    public init(path: String) {
        self.path = Self.expandingTilde(path)
    }

    /// `--state-dir`, else `MUTUAL_STATE_DIR`, else `~/.mutual`.
    /// `~` and `~/…` mean $HOME, as in the shell (Foundation's expandingTildeInPath reads the password database on
    /// Linux and ignores $HOME: a `HOME=/tmp/x mutual init` would have written to the real home directory).
    static func expandingTilde(_ path: String) -> String {
        guard path == "~" || path.hasPrefix("~/") else { return (path as NSString).expandingTildeInPath }
        let home = ProcessInfo.processInfo.environment["HOME"].flatMap { $0.isEmpty ? nil : $0 } ?? NSHomeDirectory()
        return home + path.dropFirst()
    }

    public static func resolve(_ flag: String?) -> StateDirectory {
        if let flag, !flag.isEmpty { return StateDirectory(path: flag) }
        if let env = ProcessInfo.processInfo.environment["MUTUAL_STATE_DIR"], !env.isEmpty {
            return StateDirectory(path: env)
        }
        return StateDirectory(path: "~/.mutual")
    }

    public var configPath: String { path + "/config.json" }
    public var databasePath: String { path + "/mutual.db" }
    public var caDirectory: String { path + "/ca" }
    public var rootCertificatePath: String { caDirectory + "/root.pem" }
    public var rootKeyPath: String { caDirectory + "/root.key" }
    public var intermediateCertificatePath: String { caDirectory + "/intermediate.pem" }
    public var intermediateKeyPath: String { caDirectory + "/intermediate.key" }
    public var adminDirectory: String { path + "/admin" }
    /// The root's CRL (revoking intermediates), signed at init and by `mutual root-crl`; relying parties such as nginx
    /// that check every level of the chain need it.
    public var rootCRLPath: String { caDirectory + "/root-crl.pem" }

    /// The post-quantum (ML-DSA) hierarchy beside the classical one (`mutual pq init`).
    public var pqRootCertificatePath: String { caDirectory + "/pq-root.pem" }
    public var pqRootKeyPath: String { caDirectory + "/pq-root.key" }
    public var pqIntermediateCertificatePath: String { caDirectory + "/pq-intermediate.pem" }
    public var pqIntermediateKeyPath: String { caDirectory + "/pq-intermediate.key" }

    public var isInitialized: Bool { FileManager.default.fileExists(atPath: configPath) }
}

/// CA settings persisted in `config.json`.
public struct AuthorityConfiguration: Codable, Sendable, Hashable {
    public var version: Int
    public var name: String
    public var keyType: KeyType
    public var policy: IssuancePolicy
    public var permittedDNS: [String]
    public var createdAt: Date
    public var keysEncrypted: Bool
    /// `postgres://…` when the inventory lives in PostgreSQL (shared by replicas); nil: SQLite in the state directory.
    public var databaseURL: String?
    /// The ML-DSA variant of the post-quantum hierarchy, when there is one.
    public var pqKeyType: MLDSAVariant?
    /// PKCS#11 URI (RFC 7512, never with pin-value) of the issuing key when it lives in a token; nil: ca/intermediate.key.
    public var keyStore: String?
    /// PKCS#11 URI of the root key when it lives in a token; nil: ca/root.key.
    public var rootKeyStore: String?

    public init(name: String, keyType: KeyType, policy: IssuancePolicy, permittedDNS: [String], createdAt: Date, keysEncrypted: Bool) {
        self.version = 1
        self.name = name
        self.keyType = keyType
        self.policy = policy
        self.permittedDNS = permittedDNS
        self.createdAt = createdAt
        self.keysEncrypted = keysEncrypted
    }
}
