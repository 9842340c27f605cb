import Foundation
import MutualPKCS11
import MutualPKI
import X509

/// Replacing the issuing CA or the root without a flag day: `prepare` makes the new CA and publishes it in the trust
/// bundles while the old one keeps issuing; `activate` issues from the new one while the old one stays valid and
/// revocable; `retire` drops the old one once none of its certificates is valid any more.
///
/// Every CA generation has its own directory under `ca/` (`g1`, `g2`, … for issuing CAs, `r1`, `r2`, … for roots)
/// and `ca/rotation.json` says which is at which stage. A stage change is one atomic write of that file (the new
/// CA's files are written and fsynced before), so a crash leaves either the old or the new stage, never a mix.
/// `ca/intermediate.pem`, `ca/root.pem` and `ca/root-crl.pem` stay copies of the active CA's files for the tools that
/// read them; once a rotation has started, CA keys live only in the generation directories (or tokens).
public enum CARotation {
    public enum Kind: String, Codable, Sendable, CaseIterable {
        case intermediate, root
    }

    public enum Stage: String, Codable, Sendable {
        /// Made and trusted, not issuing yet.
        case prepared
        /// Issuing (for an intermediate) or the anchor of the issuing CA's chain (for a root).
        case active
        /// Replaced: its certificates are still valid and revocable (CRL, OCSP), it is still in the trust bundles.
        case previous
        /// Gone from the bundles; kept in the file for the record.
        case retired
    }

    public struct Entry: Codable, Sendable, Hashable {
        public var generation: Int
        public var stage: Stage
        /// PKCS#11 URI of its key when it lives in a token; nil: the key file in its directory.
        public var keyStore: String?
        /// The root generation that certified it (intermediates only).
        public var root: Int?
        public var changedAt: Date
    }

    public struct State: Codable, Sendable, Hashable {
        public var intermediates: [Entry]
        public var roots: [Entry]

        public func active(_ kind: Kind) -> Entry? { entries(kind).first { $0.stage == .active } }
        public func prepared(_ kind: Kind) -> Entry? { entries(kind).first { $0.stage == .prepared } }
        public func previous(_ kind: Kind) -> [Entry] { entries(kind).filter { $0.stage == .previous } }
        public func entries(_ kind: Kind) -> [Entry] { kind == .intermediate ? intermediates : roots }
        /// Whether any rotation is under way (a prepared or a previous CA of either kind).
        public var inProgress: Bool {
            Kind.allCases.contains { prepared($0) != nil || !previous($0).isEmpty }
        }
    }

    /// A CA generation with its certificate (and its key once loaded).
    public struct Generation: Sendable {
        public var kind: Kind
        public var entry: Entry
        public var certificate: Certificate
        public var key: Certificate.PrivateKey?
    }

    /// What an authority keeps besides its active issuing CA.
    public struct Loaded: Sendable {
        public var state: State = State(intermediates: [], roots: [])
        /// Issuing CAs replaced but not retired: they sign CRLs and OCSP answers for their certificates.
        public var previous: [IssuingCA] = []
        /// Generation numbers of ``previous``, in the same order.
        public var previousGenerations: [Int] = []
        /// The prepared issuing CA's certificate (published, not issuing).
        public var preparedIntermediate: Certificate?
        /// Every root relying parties should trust now: active, prepared and previous.
        public var trustedRoots: [Certificate] = []
        /// Sent after the intermediate in chains while the old root is still trusted by someone.
        public var crossCertificates: [Certificate] = []
        /// A prepared root's cross-certificate: published in `/bundle.pem` from `prepare` on (not yet in chains), so
        /// that a relying party holding only the current root can already verify the new root's CRL and CAs.
        public var preparedCross: [Certificate] = []
        /// Root CRL files (PEM) of every trusted root.
        public var rootCRLPaths: [String] = []
    }

    static let stateFile = "/rotation.json"

    static func directory(_ state: StateDirectory, _ kind: Kind, _ generation: Int) -> String {
        state.caDirectory + (kind == .intermediate ? "/g" : "/r") + String(generation)
    }

    static func certificatePath(_ state: StateDirectory, _ kind: Kind, _ generation: Int) -> String {
        directory(state, kind, generation) + (kind == .intermediate ? "/intermediate.pem" : "/root.pem")
    }

    static func keyPath(_ state: StateDirectory, _ kind: Kind, _ generation: Int) -> String {
        directory(state, kind, generation) + (kind == .intermediate ? "/intermediate.key" : "/root.key")
    }

    static func rootCRLPath(_ state: StateDirectory, _ generation: Int) -> String { directory(state, .root, generation) + "/root-crl.pem" }
    /// The root of `generation` certified by the root before it.
    static func crossPath(_ state: StateDirectory, _ generation: Int) -> String { directory(state, .root, generation) + "/root-cross.pem" }

    /// The rotation state, or nil before the first rotation (the CA files are the ones `init` wrote).
    public static func readState(_ state: StateDirectory) throws -> State? {
        let path = state.caDirectory + stateFile
        guard FileManager.default.fileExists(atPath: path) else { return nil }
        do {
            let decoder = JSONDecoder()
            decoder.dateDecodingStrategy = .iso8601
            return try decoder.decode(State.self, from: Data(try AtomicFile.read(path, limit: 1 << 20, what: "rotation state")))
        } catch {
            throw AuthorityError(.corruptState, "\(path) is unreadable or corrupt: \(error)")
        }
    }

    static func writeState(_ value: State, to state: StateDirectory) throws {
        let encoder = JSONEncoder()
        encoder.outputFormatting = [.prettyPrinted, .sortedKeys]
        encoder.dateEncodingStrategy = .iso8601
        try AtomicFile.write(Array(try encoder.encode(value)), to: state.caDirectory + stateFile, mode: 0o600)
    }

    static func readCertificate(_ path: String) throws -> Certificate {
        try PEMBundle.certificates(fromBytes: try AtomicFile.read(path, limit: 1 << 20, what: "CA certificate"), what: path)[0]
    }

    /// Reads a generation's key: from its token, or its file (asking for the passphrase when encrypted).
    static func loadKey(
        _ state: StateDirectory, _ kind: Kind, _ entry: Entry, passphrase: () throws -> String?, tokenKeys: inout [PKCS11Key]
    ) throws -> Certificate.PrivateKey {
        if let keyStore = entry.keyStore {
            let key = try PKCS11Key.find(try PKCS11URI(keyStore))
            tokenKeys.append(key)
            return key.certificatePrivateKey
        }
        let path = keyPath(state, kind, entry.generation)
        let text = String(decoding: try AtomicFile.read(path, limit: 1 << 20, what: "\(kind.rawValue) key (g\(entry.generation))"), as: UTF8.self)
        return try KeyFile.load(pem: text, passphrase: passphrase)
    }

    /// Loads the active issuing CA (with key) and everything a rotation keeps beside it.
    static func load(
        state: StateDirectory, rotation: State, policy: IssuancePolicy, passphrase: () throws -> String?, tokenKeys: inout [PKCS11Key]
    ) throws -> (active: IssuingCA, loaded: Loaded) {
        guard let activeEntry = rotation.active(.intermediate), let activeRoot = rotation.active(.root) else {
            throw AuthorityError(.corruptState, "\(state.caDirectory)\(stateFile) names no active issuing CA or root")
        }
        var roots: [Int: Certificate] = [:]
        var loaded = Loaded(state: rotation)
        for entry in rotation.roots where entry.stage != .retired {
            let root = try readCertificate(certificatePath(state, .root, entry.generation))
            roots[entry.generation] = root
            loaded.trustedRoots.append(root)
            loaded.rootCRLPaths.append(rootCRLPath(state, entry.generation))
        }
        // The cross-certificate of the active root, while the root before it is still trusted.
        if !rotation.previous(.root).isEmpty, FileManager.default.fileExists(atPath: crossPath(state, activeRoot.generation)) {
            loaded.crossCertificates = [try readCertificate(crossPath(state, activeRoot.generation))]
        }
        if let prepared = rotation.prepared(.root), FileManager.default.fileExists(atPath: crossPath(state, prepared.generation)) {
            loaded.preparedCross = [try readCertificate(crossPath(state, prepared.generation))]
        }
        func issuing(_ entry: Entry) throws -> IssuingCA {
            let certificate = try readCertificate(certificatePath(state, .intermediate, entry.generation))
            guard let root = roots[entry.root ?? activeRoot.generation] else {
                throw AuthorityError(.corruptState, "issuing CA g\(entry.generation) names root r\(entry.root ?? 0), which is not loaded")
            }
            let key = try loadKey(state, .intermediate, entry, passphrase: passphrase, tokenKeys: &tokenKeys)
            return try IssuingCA(certificate: certificate, privateKey: key, root: root, policy: policy)
        }
        let active = try issuing(activeEntry)
        for entry in rotation.previous(.intermediate) {
            loaded.previous.append(try issuing(entry))
            loaded.previousGenerations.append(entry.generation)
        }
        if let prepared = rotation.prepared(.intermediate) {
            loaded.preparedIntermediate = try readCertificate(certificatePath(state, .intermediate, prepared.generation))
        }
        return (active, loaded)
    }
}
