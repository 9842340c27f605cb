import Foundation
import SQLKit

/// A signed CRL as published.
public struct StoredCRL: Sendable, Hashable {
    public var number: Int64
    public var thisUpdate: Date
    public var nextUpdate: Date
    /// The revocation-log sequence of the last revocation this CRL includes.
    public var lastRevocation: Int64
    public var der: [UInt8]

    public init(number: Int64, thisUpdate: Date, nextUpdate: Date, lastRevocation: Int64, der: [UInt8]) {
        self.number = number
        self.thisUpdate = thisUpdate
        self.nextUpdate = nextUpdate
        self.lastRevocation = lastRevocation
        self.der = der
    }
}

/// One entry of the revocation log: what the event stream and `GET /v1/revocations` report.
public struct RevocationEvent: Sendable, Hashable, Codable {
    public var sequence: Int64
    public var serial: String
    public var reason: String
    public var revokedAt: Date
}

extension Store {
    /// Publishes a CRL; `.conflict` if its number is not the next one (another writer published first).
    public func storeCRL(_ crl: StoredCRL) async throws {
        _ = try await queue.submit(.storeCRL(crl))
    }

    public func latestCRL() async throws -> StoredCRL? {
        guard let row = try await reader.raw("SELECT * FROM crls ORDER BY number DESC LIMIT 1").first() else { return nil }
        return StoredCRL(
            number: try row.decode(column: "number", as: Int64.self),
            thisUpdate: Date(timeIntervalSince1970: Double(try row.decode(column: "this_update", as: Int64.self))),
            nextUpdate: Date(timeIntervalSince1970: Double(try row.decode(column: "next_update", as: Int64.self))),
            lastRevocation: try row.decode(column: "last_revocation", as: Int64.self),
            der: Array(try row.decode(column: "der", as: Data.self))
        )
    }

    /// The CRL with a given number, for `GET /v1/revocations?since=`.
    public func crl(number: Int64) async throws -> StoredCRL? {
        guard let row = try await reader.raw("SELECT number, this_update, next_update, last_revocation FROM crls WHERE number = \(bind: number)").first() else { return nil }
        return StoredCRL(
            number: number,
            thisUpdate: Date(timeIntervalSince1970: Double(try row.decode(column: "this_update", as: Int64.self))),
            nextUpdate: Date(timeIntervalSince1970: Double(try row.decode(column: "next_update", as: Int64.self))),
            lastRevocation: try row.decode(column: "last_revocation", as: Int64.self), der: []
        )
    }

    /// Revocations after a log sequence number, oldest first.
    public func revocations(after sequence: Int64, limit: Int = 10_000) async throws -> [RevocationEvent] {
        try await reader.raw(
            "SELECT * FROM revocation_log WHERE sequence > \(bind: sequence) ORDER BY sequence ASC LIMIT \(bind: limit)"
        ).all().map { row in
            RevocationEvent(
                sequence: try row.decode(column: "sequence", as: Int64.self),
                serial: try row.decode(column: "serial", as: String.self),
                reason: try row.decode(column: "reason", as: String.self),
                revokedAt: Date(timeIntervalSince1970: Double(try row.decode(column: "revoked_at", as: Int64.self)))
            )
        }
    }

    /// The newest revocation-log sequence (0 when none).
    public func lastRevocationSequence() async throws -> Int64 {
        let row = try await reader.raw("SELECT MAX(sequence) AS n FROM revocation_log").first()
        guard let row, try !row.decodeNil(column: "n") else { return 0 }
        return try row.decode(column: "n", as: Int64.self)
    }

    /// Revoked certificates that have not expired at `now` (what a CRL must list), by serial.
    /// Revoked certificates not yet expired; `issuer` keeps one issuer's, `excludingIssuer` drops one issuer's (the
    /// classical and the ML-DSA issuing CA each list only their own on their CRL).
    public func revokedUnexpired(now: Date, issuer: String? = nil, excludingIssuer: String? = nil) async throws -> [(serial: String, revokedAt: Date, reason: String)] {
        var query: SQLQueryString = "SELECT serial, revoked_at, revocation_reason FROM certificates WHERE status = 'revoked' AND not_after > \(bind: Int64(now.timeIntervalSince1970))"
        if let issuer { query = query + " AND issuer = \(bind: issuer)" }
        if let excludingIssuer { query = query + " AND issuer <> \(bind: excludingIssuer)" }
        return try await reader.raw(query + " ORDER BY serial").all().map { row in
            (try row.decode(column: "serial", as: String.self),
             Date(timeIntervalSince1970: Double(try row.decode(column: "revoked_at", as: Int64.self))),
             (try row.decode(column: "revocation_reason", as: String?.self)) ?? "unspecified")
        }
    }
}
