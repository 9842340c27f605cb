import Crypto
import Foundation
import MutualPKI
import MutualStore

/// Scoped access tokens: `mtk_<id>_<secret>`. Only SHA-256(secret) is stored; the secret is shown once.
public struct IssuedToken: Sendable {
    public var record: TokenRecord
    /// The full bearer token. Shown once, never stored.
    public var token: String
}

/// A scope pattern: `spiffe://example.org/ns/prod/*` (anything below a path), `*.svc.example.org` (any subdomain),
/// or an exact name.
public struct ScopePattern: Sendable, Hashable, CustomStringConvertible {
    public let text: String

    public init(_ text: String) throws {
        let trimmed = text.trimmingCharacters(in: .whitespaces)
        guard !trimmed.isEmpty, trimmed.count <= 512, !trimmed.contains(where: \.isWhitespace) else {
            throw AuthorityError(.tokenNotAllowed, "invalid scope pattern '\(text.prefix(60))'")
        }
        if trimmed.contains("*") {
            let starCount = trimmed.filter { $0 == "*" }.count
            let valid = starCount == 1 && ((trimmed.hasPrefix("*.") && !trimmed.contains("://")) || (trimmed.hasSuffix("/*") && trimmed.contains("://")))
            guard valid else {
                throw AuthorityError(.tokenNotAllowed, "invalid scope pattern '\(trimmed)': use 'spiffe://domain/path/*', '*.domain' or an exact name")
            }
        }
        self.text = trimmed
    }

    public var description: String { text }

    /// Whether a requested name (DNS name, IP, URI or CN) is inside this pattern.
    public func matches(_ name: String) -> Bool {
        if text.hasPrefix("*.") {
            let base = text.dropFirst(1).lowercased()  // ".svc.example.org"
            return name.lowercased().hasSuffix(base) && name.count > base.count
        }
        if text.hasSuffix("/*") {
            let prefix = text.dropLast(1)  // "spiffe://example.org/ns/prod/"
            return name.hasPrefix(prefix) && name.count > prefix.count
        }
        return name == text || name.lowercased() == text.lowercased() && !text.contains("://")
    }
}

/// Creates, checks and revokes tokens. The rules live here; the store only records.
public struct TokenService: Sendable {
    let store: Store

    public init(store: Store) { self.store = store }

    public static let prefix = "mtk_"

    /// Mints a token. `ttl` is how long it can be used; `maxValidity` caps certificates issued with it.
    public func create(
        scopes: [String], profile: CertificateProfile, maxValidity: ValidityDuration, ttl: ValidityDuration, uses: Int,
        owner: String?, actor: String, caMaximum: ValidityDuration, keyTypes: [KeyChoice]? = nil, now: Date = .now
    ) async throws -> IssuedToken {
        guard !scopes.isEmpty else { throw AuthorityError(.tokenNotAllowed, "a token needs at least one --scope") }
        let patterns = try scopes.map(ScopePattern.init)
        guard CertificateProfile.leafProfiles.contains(profile) else {
            throw AuthorityError(.tokenNotAllowed, "tokens can only be for \(CertificateProfile.leafChoices)")
        }
        guard (1...1_000_000).contains(uses) else { throw AuthorityError(.tokenNotAllowed, "--uses must be between 1 and 1000000") }
        guard maxValidity <= caMaximum else {
            throw AuthorityError(.tokenNotAllowed, "--max-validity \(maxValidity) exceeds the CA maximum of \(caMaximum)")
        }
        var idBytes = [UInt8](repeating: 0, count: 8)
        var secretBytes = [UInt8](repeating: 0, count: 32)
        var rng = SystemRandomNumberGenerator()
        for i in idBytes.indices { idBytes[i] = rng.next() }
        for i in secretBytes.indices { secretBytes[i] = rng.next() }
        let id = idBytes.hexString
        let secret = Data(secretBytes).base64EncodedString().replacingOccurrences(of: "+", with: "-")
            .replacingOccurrences(of: "/", with: "_").replacingOccurrences(of: "=", with: "")
        let record = TokenRecord(
            id: id, secretHash: Self.hash(secret), scopes: patterns.map(\.text), profile: profile.rawValue,
            maxValiditySeconds: maxValidity.seconds, expiresAt: now.addingTimeInterval(ttl.timeInterval),
            usesAllowed: Int64(uses), owner: owner, createdAt: now,
            keyTypes: keyTypes.flatMap { $0.isEmpty ? nil : $0.map(\.rawValue) }
        )
        try await store.createToken(
            record,
            audit: AuditEntry(
                time: now, actor: actor, action: "token-create", subject: "token:\(id)",
                details: ["scopes": record.scopes.joined(separator: " "), "profile": record.profile, "uses": String(uses),
                          "key_types": record.keyTypes?.joined(separator: " ") ?? "any",
                          "expires_at": AuditChain.format(record.expiresAt), "max_validity": maxValidity.description]
            )
        )
        return IssuedToken(record: record, token: "\(Self.prefix)\(id)_\(secret)")
    }

    static func hash(_ secret: String) -> String {
        SHA256.hash(data: Array(secret.utf8)).hexString
    }

    /// Finds the token a bearer string names and checks its secret, expiry, revocation and remaining uses.
    /// Refusals name their reason; the caller audits them.
    public func authenticate(_ bearer: String, now: Date = .now) async throws -> TokenRecord {
        guard bearer.hasPrefix(Self.prefix), bearer.count < 200 else {
            throw AuthorityError(.tokenInvalid, "the bearer token is not a Mutual token (expected mtk_…)")
        }
        let parts = bearer.dropFirst(Self.prefix.count).split(separator: "_", maxSplits: 1)
        guard parts.count == 2, parts[0].count == 16, parts[0].allSatisfy(\.isHexDigit) else {
            throw AuthorityError(.tokenInvalid, "the bearer token is malformed")
        }
        let id = String(parts[0])
        guard let record = try await store.token(id: id) else {
            // Hash anyway so an unknown id costs the same as a wrong secret.
            _ = ConstantTime.equal(Self.hash(String(parts[1])), String(repeating: "0", count: 64))
            throw AuthorityError(.tokenInvalid, "unknown token")
        }
        guard ConstantTime.equal(Self.hash(String(parts[1])), record.secretHash) else {
            throw AuthorityError(.tokenInvalid, "token \(id): wrong secret")
        }
        if record.revokedAt != nil { throw AuthorityError(.tokenRevoked, "token \(id) was revoked") }
        if record.expiresAt <= now {
            throw AuthorityError(.tokenExpired, "token \(id) expired at \(AuditChain.format(record.expiresAt))")
        }
        if record.usesConsumed >= record.usesAllowed {
            throw AuthorityError(.tokenUsedUp, "token \(id) is used up (\(record.usesConsumed) of \(record.usesAllowed) uses)")
        }
        return record
    }

    /// Checks that a request is within a token's profile, validity and scopes.
    public static func authorize(_ request: IssuanceRequest, token: TokenRecord) throws {
        try authorize(
            profile: request.profile, validity: request.validity,
            names: request.dnsNames + request.ipAddresses + request.uris + (request.commonName.map { [$0] } ?? []),
            keyType: KeyType.allCases.first { $0.matches(request.publicKey) }.map { KeyChoice.classical($0) }, token: token
        )
    }

    /// The same rules for a request of either key family: profile, validity cap, every name within the scopes, and
    /// the key type among those the token allows (`mutual token create --key-type`).
    public static func authorize(
        profile: CertificateProfile, validity: ValidityDuration?, names: [String], keyType: KeyChoice?, token: TokenRecord
    ) throws {
        if let allowed = token.keyTypes, !allowed.isEmpty {
            guard let keyType, allowed.contains(keyType.rawValue) else {
                // The same refusal as a migration's: the request is right but for its key, and `key_type` says which
                // key the token wants (the agent answers it with a new key of that type).
                throw AuthorityError(
                    .keyTypeRequired, "token \(token.id) allows only \(allowed.joined(separator: ", ")) keys, not \(keyType?.rawValue ?? "this key")",
                    details: ["key_type": allowed[0]]
                )
            }
        }
        guard profile.rawValue == token.profile else {
            throw AuthorityError(.tokenNotAllowed, "token \(token.id) is for profile \(token.profile), not \(profile.rawValue)")
        }
        if let validity, validity.seconds > token.maxValiditySeconds {
            throw AuthorityError(.tokenNotAllowed, "token \(token.id) allows at most \(ValidityDuration(seconds: token.maxValiditySeconds)) of validity, \(validity) was requested")
        }
        let patterns = token.scopes.compactMap { try? ScopePattern($0) }
        guard !names.isEmpty else {
            throw AuthorityError(.tokenOutOfScope, "the request names no identity for token \(token.id) to allow")
        }
        for name in names where !patterns.contains(where: { $0.matches(name) }) {
            throw AuthorityError(.tokenOutOfScope, "'\(name)' is outside the scopes of token \(token.id) (\(token.scopes.joined(separator: ", ")))")
        }
    }

    public func list() async throws -> [TokenRecord] { try await store.tokens() }

    public func revoke(id: String, actor: String, now: Date = .now) async throws {
        do {
            try await store.revokeToken(id: id, at: now, audit: AuditEntry(time: now, actor: actor, action: "token-revoke", subject: "token:\(id)"))
        } catch let error as StoreError where error.code == .notFound {
            throw AuthorityError(.notFound, error.reason)
        } catch let error as StoreError where error.code == .conflict {
            throw AuthorityError(.conflict, error.reason)
        }
    }
}
