import Foundation
import MutualPKCS11
import MutualPKI
import MutualStore
import Synchronization
import X509

/// The keys that sign access tokens, kept apart from the CA keys in `<state>/oauth/`: `keys.json` lists them, each
/// key is a file there (encrypted like the CA keys when they are) or a key in the CA's PKCS#11 token.
///
/// Rotation with overlap is a timeline, not a switch: a new key is published in the JWKS at once but signs only from
/// `activates_at` (so every resource server has fetched it before a token needs it), and the key it replaces stays
/// published until `retires_at` (so tokens it signed stay verifiable until they expire). Every `serve` on the state
/// directory, replicas with a copy of it included, follows the file within a second of a change.
public final class OAuthKeyRing: Sendable {
    public struct Entry: Codable, Sendable, Equatable {
        public var kid: String
        public var alg: String
        /// The key file, relative to the oauth directory; nil for a token-held key.
        public var file: String?
        /// The PKCS#11 URI of a token-held key.
        public var keyStore: String?
        public var createdAt: Date
        public var activatesAt: Date
        /// Set when a successor is made: the key leaves the JWKS then.
        public var retiresAt: Date?

        enum CodingKeys: String, CodingKey {
            case kid, alg, file
            case keyStore = "key_store", createdAt = "created_at", activatesAt = "activates_at", retiresAt = "retires_at"
        }

        /// `next` (published, not signing yet), `active`, `previous` (published, no longer signing) or `retired`.
        public func stage(at now: Date, successorActive: Bool) -> String {
            if let retiresAt, retiresAt <= now { return "retired" }
            if activatesAt > now { return "next" }
            return successorActive ? "previous" : "active"
        }
    }

    struct File: Codable {
        var keys: [Entry]
    }

    /// What signs now and what is published.
    public struct Snapshot: Sendable {
        public var signer: (kid: String, key: Certificate.PrivateKey)
        public var published: [JSONWebKey]
        public var entries: [Entry]
    }

    public let directory: String
    let passphrase: String?
    /// Where new keys are generated when the CA's keys live in a PKCS#11 token.
    let keyStore: PKCS11URI?
    private let cache = Mutex<(stamp: Date?, checked: ContinuousClock.Instant?, entries: [Entry], keys: [String: Certificate.PrivateKey])>((nil, nil, [], [:]))

    public init(directory: String, passphrase: String?, keyStore: PKCS11URI?) {
        self.directory = directory
        self.passphrase = passphrase
        self.keyStore = keyStore
    }

    var listPath: String { directory + "/keys.json" }

    static let encoder: JSONEncoder = {
        let encoder = JSONEncoder()
        encoder.outputFormatting = [.prettyPrinted, .sortedKeys, .withoutEscapingSlashes]
        encoder.dateEncodingStrategy = .iso8601
        return encoder
    }()

    static let decoder: JSONDecoder = {
        let decoder = JSONDecoder()
        decoder.dateDecodingStrategy = .iso8601
        return decoder
    }()

    /// The listed keys, oldest first; empty when there are none yet.
    public func entries() throws -> [Entry] {
        guard let data = FileManager.default.contents(atPath: listPath) else { return [] }
        do {
            return try Self.decoder.decode(File.self, from: data).keys.sorted { $0.activatesAt < $1.activatesAt }
        } catch {
            throw AuthorityError(.corruptState, "\(listPath) is not a valid key list: \(error)")
        }
    }

    /// Makes the first signing key when there is none (active at once). Safe to call on every start.
    @discardableResult
    public func ensureKey(now: Date = .now) throws -> Entry {
        if let current = try entries().last(where: { $0.activatesAt <= now }) { return current }
        return try add(activatesAt: now, retiringPrevious: nil, now: now)
    }

    /// Rotation: a new key, published now, signing from `now + publishAhead`; the keys it replaces leave the JWKS
    /// `keepPrevious` after that (at least the longest token lifetime, so their tokens stay verifiable). An emergency
    /// rotation (a key believed compromised) gives zero for both: the old key's tokens stop verifying at once.
    public func rotate(publishAhead: TimeInterval, keepPrevious: TimeInterval, now: Date = .now) throws -> Entry {
        try add(activatesAt: now.addingTimeInterval(publishAhead), retiringPrevious: keepPrevious, now: now)
    }

    private func add(activatesAt: Date, retiringPrevious keepPrevious: TimeInterval?, now: Date) throws -> Entry {
        try FileManager.default.createDirectory(atPath: directory, withIntermediateDirectories: true, attributes: [.posixPermissions: 0o700])
        var entries = try entries()
        if let pending = entries.first(where: { $0.activatesAt > now }) {
            throw AuthorityError(.rotationInProgress, "signing key \(pending.kid) is published but does not sign until \(AuditChain.format(pending.activatesAt)); rotate again after that")
        }
        // With no key signing now there is nothing to overlap with: the new key signs at once (a first key made by
        // `mutual oauth keys rotate` before the first `serve`, or after every key was withdrawn).
        let signsFrom = entries.contains { $0.activatesAt <= now && ($0.retiresAt.map { $0 > now } ?? true) } ? activatesAt : now
        let entry: Entry
        if let keyStore {
            let key = try PKCS11Key.generate(keyStore.naming(object: "mutual-oauth-signer"), keyType: .p256, anotherGeneration: true)
            let jwk = try JSONWebKey(publicKey: key.publicKey)
            entry = Entry(kid: jwk.kid, alg: jwk.algorithm.rawValue, file: nil, keyStore: key.uri.description, createdAt: now, activatesAt: signsFrom)
        } else {
            let key = try KeyType.p256.generate()
            let jwk = try JSONWebKey(publicKey: key.publicKey)
            let file = "signer-\(jwk.kid).key"
            try AtomicFile.write(KeyFile.pem(for: key, passphrase: passphrase), to: directory + "/" + file, mode: 0o600)
            entry = Entry(kid: jwk.kid, alg: jwk.algorithm.rawValue, file: file, keyStore: nil, createdAt: now, activatesAt: signsFrom)
        }
        if let keepPrevious {
            let retiresAt = signsFrom.addingTimeInterval(keepPrevious)
            for index in entries.indices where entries[index].retiresAt == nil || entries[index].retiresAt! > retiresAt {
                entries[index].retiresAt = retiresAt
            }
        }
        entries.append(entry)
        try AtomicFile.write(String(decoding: try Self.encoder.encode(File(keys: entries)), as: UTF8.self), to: listPath, mode: 0o600)
        return entry
    }

    /// The signer and the published keys at `now`, re-reading `keys.json` when it changed (checked at most once a
    /// second).
    public func snapshot(now: Date = .now) throws -> Snapshot {
        let (entries, keys) = try loaded()
        guard let signerEntry = entries.last(where: { $0.activatesAt <= now && ($0.retiresAt.map { $0 > now } ?? true) }),
              let signer = keys[signerEntry.kid] else {
            throw AuthorityError(.notInitialized, "no access-token signing key is active (\(listPath)); `mutual oauth keys rotate` makes one")
        }
        var published: [JSONWebKey] = []
        for entry in entries where entry.retiresAt.map({ $0 > now }) ?? true {
            if let key = keys[entry.kid], let jwk = try? JSONWebKey(publicKey: key.publicKey, kid: entry.kid) { published.append(jwk) }
        }
        return Snapshot(signer: (signerEntry.kid, signer), published: published, entries: entries)
    }

    private func loaded() throws -> ([Entry], [String: Certificate.PrivateKey]) {
        let clock = ContinuousClock.now
        let cached = cache.withLock { $0 }
        if let checked = cached.checked, clock - checked < .seconds(1), !cached.entries.isEmpty { return (cached.entries, cached.keys) }
        let stamp = (try? FileManager.default.attributesOfItem(atPath: listPath))?[.modificationDate] as? Date
        if stamp == cached.stamp, !cached.entries.isEmpty {
            cache.withLock { $0.checked = clock }
            return (cached.entries, cached.keys)
        }
        let entries = try entries()
        var keys: [String: Certificate.PrivateKey] = [:]
        for entry in entries where entry.retiresAt.map({ $0 > .now }) ?? true {
            if let key = cached.keys[entry.kid] {
                keys[entry.kid] = key
            } else {
                keys[entry.kid] = try load(entry)
            }
        }
        cache.withLock { $0 = (stamp, clock, entries, keys) }
        return (entries, keys)
    }

    private func load(_ entry: Entry) throws -> Certificate.PrivateKey {
        let key: Certificate.PrivateKey
        if let uri = entry.keyStore {
            key = try PKCS11Key.find(try PKCS11URI(uri)).certificatePrivateKey
        } else if let file = entry.file, !file.contains("/") {
            let path = directory + "/" + file
            guard let pem = try? String(contentsOfFile: path, encoding: .utf8) else {
                throw AuthorityError(.corruptState, "signing key \(entry.kid): cannot read \(path)")
            }
            key = try KeyFile.load(pem: pem, passphrase: { self.passphrase })
        } else {
            throw AuthorityError(.corruptState, "signing key \(entry.kid) names neither a key file nor a key store")
        }
        guard (try? JSONWebKey(publicKey: key.publicKey))?.kid == entry.kid else {
            throw AuthorityError(.corruptState, "signing key \(entry.kid): the key does not have that thumbprint")
        }
        return key
    }
}
