import Foundation
import SQLKit

/// A scoped access token as stored: never the secret, only its SHA-256.
public struct TokenRecord: Sendable, Hashable, Codable {
    public var id: String
    /// SHA-256 of the secret part, lowercase hex.
    public var secretHash: String
    public var scopes: [String]
    public var profile: String
    /// Longest certificate lifetime this token may request, in seconds.
    public var maxValiditySeconds: Int64
    public var expiresAt: Date
    public var usesAllowed: Int64
    public var usesConsumed: Int64
    public var owner: String?
    public var createdAt: Date
    public var revokedAt: Date?
    /// The key types requests under this token may use (`p256`, `ml-dsa-65`, …); nil: any key Mutual accepts.
    public var keyTypes: [String]?

    public init(
        id: String, secretHash: String, scopes: [String], profile: String, maxValiditySeconds: Int64, expiresAt: Date,
        usesAllowed: Int64, usesConsumed: Int64 = 0, owner: String?, createdAt: Date, revokedAt: Date? = nil, keyTypes: [String]? = nil
    ) {
        self.keyTypes = keyTypes
        self.id = id
        self.secretHash = secretHash
        self.scopes = scopes
        self.profile = profile
        self.maxValiditySeconds = maxValiditySeconds
        self.expiresAt = expiresAt
        self.usesAllowed = usesAllowed
        self.usesConsumed = usesConsumed
        self.owner = owner
        self.createdAt = createdAt
        self.revokedAt = revokedAt
    }
}

extension Store {
    /// Stores a new token with its audit event.
    public func createToken(_ token: TokenRecord, audit: AuditEntry) async throws {
        _ = try await queue.submit(.createToken(token, audit))
    }

    /// Marks a token revoked; `.notFound` / `.conflict` when unknown or already revoked.
    public func revokeToken(id: String, at time: Date, audit: AuditEntry) async throws {
        _ = try await queue.submit(.revokeToken(id: id, time: time, audit))
    }

    /// Records a certificate issued under a token and consumes one use of that token, atomically: if the token has
    /// been used up, revoked or has expired in the meantime, nothing is written and `.conflict` is thrown.
    public func recordIssuance(_ record: CertificateRecord, audit: AuditEntry, consumingToken id: String, now: Date) async throws {
        _ = try await queue.submit(.issueWithToken(record, audit, tokenID: id, now: now))
    }

    public func token(id: String) async throws -> TokenRecord? {
        let row = try await reader.raw("SELECT * FROM tokens WHERE id = \(bind: id)").first()
        return try row.map(Self.decodeToken)
    }

    public func tokens() async throws -> [TokenRecord] {
        try await reader.raw("SELECT * FROM tokens ORDER BY created_at ASC, id ASC").all().map(Self.decodeToken)
    }

    static func decodeToken(_ row: any SQLRow) throws -> TokenRecord {
        let scopesJSON = try row.decode(column: "scopes", as: String.self)
        let revoked = try row.decodeNil(column: "revoked_at") ? nil : try row.decode(column: "revoked_at", as: Int64.self)
        return TokenRecord(
            id: try row.decode(column: "id", as: String.self),
            secretHash: try row.decode(column: "secret_hash", as: String.self),
            scopes: (try? JSONDecoder().decode([String].self, from: Data(scopesJSON.utf8))) ?? [],
            profile: try row.decode(column: "profile", as: String.self),
            maxValiditySeconds: try row.decode(column: "max_validity", as: Int64.self),
            expiresAt: Date(timeIntervalSince1970: Double(try row.decode(column: "expires_at", as: Int64.self))),
            usesAllowed: try row.decode(column: "uses_allowed", as: Int64.self),
            usesConsumed: try row.decode(column: "uses_consumed", as: Int64.self),
            owner: try row.decode(column: "owner", as: String?.self),
            createdAt: Date(timeIntervalSince1970: Double(try row.decode(column: "created_at", as: Int64.self))),
            revokedAt: revoked.map { Date(timeIntervalSince1970: Double($0)) },
            keyTypes: (try row.decode(column: "key_types", as: String?.self)).flatMap { try? JSONDecoder().decode([String].self, from: Data($0.utf8)) }
        )
    }
}
