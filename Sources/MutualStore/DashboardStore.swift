import Foundation
import SQLKit

/// What the dashboard's overview shows, computed by aggregates in SQL (never by loading the inventory).
public struct InventoryOverview: Sendable {
    /// Valid (unexpired, unrevoked) certificates.
    public var valid = 0
    /// Valid certificates that expire within 7 days; within 30 days (the 30-day count includes the 7-day one).
    public var expiringIn7Days = 0
    public var expiringIn30Days = 0
    /// Expired with no successor: the lapses.
    public var expired = 0
    /// Expired after a renewal replaced them.
    public var superseded = 0
    public var revoked = 0
    /// Valid certificates expiring on each of the next `timelineDays` days (index 0: within 24 h of `now`).
    public var expiriesPerDay: [Int] = []
    /// Valid certificates per owner (nil: no owner) and per profile, largest first.
    public var byOwner: [(owner: String?, count: Int)] = []
    public var byProfile: [(profile: String, count: Int)] = []
    /// Certificates issued (by their notBefore) on each of the last `issuanceDays` days, oldest first (the last entry is
    /// the last 24 h).
    public var issuedPerDay: [Int] = []
    /// Valid certificates past two thirds of their lifetime with no successor: agents that missed a renewal.
    public var missedRenewals = 0
    public var missedRenewalSample: [CertificateRecord] = []

    public init() {}
}

/// A revoked certificate with who revoked it (the actor of its `revoke` audit event).
public struct RevocationEntry: Sendable, Hashable {
    public var record: CertificateRecord
    public var revokedBy: String?
}

/// A one-time dashboard login code as stored: only its SHA-256.
public struct DashboardLogin: Sendable, Hashable {
    public var codeHash: String
    /// `admin` or `read-only`.
    public var role: String
    /// Who the session acts as, in the audit trail (`cli:<user>`).
    public var actor: String
    public var sessionSeconds: Int64
    public var expiresAt: Date
    public var createdAt: Date

    public init(codeHash: String, role: String, actor: String, sessionSeconds: Int64, expiresAt: Date, createdAt: Date) {
        self.codeHash = codeHash
        self.role = role
        self.actor = actor
        self.sessionSeconds = sessionSeconds
        self.expiresAt = expiresAt
        self.createdAt = createdAt
    }
}

/// What redeeming a login code came to. A refused redemption writes nothing but its audit event.
public enum DashboardLoginOutcome: Sendable, Hashable {
    case redeemed(DashboardLogin)
    case unknown
    case alreadyUsed
    case expired

    /// Stable code of a refusal (`login-unknown`, `login-used`, `login-expired`); nil when redeemed.
    public var refusalCode: String? {
        switch self {
        case .redeemed: nil
        case .unknown: "login-unknown"
        case .alreadyUsed: "login-used"
        case .expired: "login-expired"
        }
    }
}

extension Store {
    /// The overview's numbers at `now`. Each is one aggregate query served by an index.
    public func overview(now: Date, timelineDays: Int = 90, issuanceDays: Int = 30, sample: Int = 20) async throws -> InventoryOverview {
        let t = Int64(now.timeIntervalSince1970)
        let day: Int64 = 86_400
        var result = InventoryOverview()
        func int(_ row: (any SQLRow)?, _ column: String) throws -> Int {
            guard let row, try !row.decodeNil(column: column) else { return 0 }
            return Int(try row.decode(column: column, as: Int64.self))
        }
        let counts = try await reader.raw("""
            SELECT
              CAST(SUM(CASE WHEN status = 'valid' AND not_after > \(bind: t) THEN 1 ELSE 0 END) AS BIGINT) AS valid,
              CAST(SUM(CASE WHEN status = 'valid' AND not_after > \(bind: t) AND not_after <= \(bind: t + 7 * day) THEN 1 ELSE 0 END) AS BIGINT) AS d7,
              CAST(SUM(CASE WHEN status = 'valid' AND not_after > \(bind: t) AND not_after <= \(bind: t + 30 * day) THEN 1 ELSE 0 END) AS BIGINT) AS d30,
              CAST(SUM(CASE WHEN status = 'valid' AND not_after <= \(bind: t) THEN 1 ELSE 0 END) AS BIGINT) AS ended,
              CAST(SUM(CASE WHEN status = 'revoked' THEN 1 ELSE 0 END) AS BIGINT) AS revoked
            FROM certificates
            """).first()
        result.valid = try int(counts, "valid")
        result.expiringIn7Days = try int(counts, "d7")
        result.expiringIn30Days = try int(counts, "d30")
        result.revoked = try int(counts, "revoked")
        let ended = try int(counts, "ended")
        let lapsed = try await reader.raw("""
            SELECT COUNT(*) AS n FROM certificates c
            WHERE c.status = 'valid' AND c.not_after <= \(bind: t) AND c.renewed = 0
            """).first()
        result.expired = try int(lapsed, "n")
        result.superseded = ended - result.expired

        result.expiriesPerDay = Array(repeating: 0, count: timelineDays)
        for row in try await reader.raw("""
            SELECT (not_after - \(bind: t)) / \(bind: day) AS d, COUNT(*) AS n FROM certificates
            WHERE status = 'valid' AND not_after > \(bind: t) AND not_after <= \(bind: t + Int64(timelineDays) * day)
            GROUP BY d
            """).all() {
            let index = Int(try row.decode(column: "d", as: Int64.self))
            if result.expiriesPerDay.indices.contains(index) { result.expiriesPerDay[index] += try int(row, "n") }
        }

        result.byOwner = try await reader.raw("""
            SELECT owner, COUNT(*) AS n FROM certificates WHERE status = 'valid' AND not_after > \(bind: t)
            GROUP BY owner ORDER BY n DESC, owner ASC LIMIT 20
            """).all().map { (try $0.decode(column: "owner", as: String?.self), try int($0, "n")) }
        result.byProfile = try await reader.raw("""
            SELECT profile, COUNT(*) AS n FROM certificates WHERE status = 'valid' AND not_after > \(bind: t)
            GROUP BY profile ORDER BY n DESC, profile ASC LIMIT 20
            """).all().map { (try $0.decode(column: "profile", as: String.self), try int($0, "n")) }

        let start = t - Int64(issuanceDays) * day
        result.issuedPerDay = Array(repeating: 0, count: issuanceDays)
        for row in try await reader.raw("""
            SELECT (not_before - \(bind: start)) / \(bind: day) AS d, COUNT(*) AS n FROM certificates
            WHERE not_before > \(bind: start) AND not_before <= \(bind: t)
            GROUP BY d
            """).all() {
            let index = Int(try row.decode(column: "d", as: Int64.self))
            if result.issuedPerDay.indices.contains(index) { result.issuedPerDay[index] += try int(row, "n") }
        }

        // Past two thirds of the lifetime: 3 * (now - notBefore) > 2 * (notAfter - notBefore).
        let missedCount = try await reader.raw("""
            SELECT COUNT(*) AS n FROM certificates c
            WHERE c.status = 'valid' AND c.not_after > \(bind: t) AND 3 * (\(bind: t) - c.not_before) > 2 * (c.not_after - c.not_before)
              AND c.renewed = 0
            """).first()
        result.missedRenewals = try int(missedCount, "n")
        result.missedRenewalSample = try await reader.raw("""
            SELECT c.*, NULL AS successor FROM certificates c
            WHERE c.status = 'valid' AND c.not_after > \(bind: t) AND 3 * (\(bind: t) - c.not_before) > 2 * (c.not_after - c.not_before)
              AND c.renewed = 0
            ORDER BY c.not_after ASC, c.serial ASC LIMIT \(bind: sample)
            """).all().map(Self.decodeCertificate)
        return result
    }

    /// Revoked certificates, most recently revoked first, with who revoked each.
    public func revocationEntries(limit: Int, offset: Int) async throws -> [RevocationEntry] {
        try await reader.raw("""
            SELECT c.*, \(unsafeRaw: Self.successorColumn),
              (SELECT a.actor FROM audit_events a WHERE a.subject = c.serial AND a.action = 'revoke' AND a.\(unsafeRaw: Self.unrecordedActions)
               ORDER BY a.sequence DESC LIMIT 1) AS revoked_by
            FROM certificates c WHERE c.status = 'revoked'
            ORDER BY c.revoked_at DESC, c.serial ASC LIMIT \(bind: max(0, limit)) OFFSET \(bind: max(0, offset))
            """).all().map { RevocationEntry(record: try Self.decodeCertificate($0), revokedBy: try $0.decode(column: "revoked_by", as: String?.self)) }
    }

    /// Audit events newest first, starting below `before` (a sequence number) when given.
    public func auditEvents(before: Int64?, limit: Int) async throws -> [AuditEvent] {
        let limit = max(0, min(limit, 1000))
        if let before {
            return try await reader.raw("SELECT * FROM audit_events WHERE sequence < \(bind: before) ORDER BY sequence DESC LIMIT \(bind: limit)").all().map(Self.decodeAudit)
        }
        return try await reader.raw("SELECT * FROM audit_events ORDER BY sequence DESC LIMIT \(bind: limit)").all().map(Self.decodeAudit)
    }

    /// The audit events about one subject (a serial, `token:<id>`), oldest first: for a certificate, the event that
    /// recorded it (by the number on its row) and every later one about it.
    public func auditEvents(subject: String, limit: Int = 200) async throws -> [AuditEvent] {
        let recorded = try await reader.raw("""
            SELECT a.* FROM audit_events a JOIN certificates c ON a.sequence = c.issued_event WHERE c.serial = \(bind: subject)
            """).all().map(Self.decodeAudit)
        let others = try await reader.raw("""
            SELECT * FROM audit_events WHERE subject = \(bind: subject) AND \(unsafeRaw: Self.unrecordedActions) ORDER BY sequence ASC LIMIT \(bind: limit)
            """).all().map(Self.decodeAudit)
        return Array((recorded + others).sorted { $0.sequence < $1.sequence }.prefix(limit))
    }

    /// Whether a login code with this digest was ever made (and not yet forgotten): read before redeeming, so that a
    /// stranger's guesses never reach the write queue.
    public func dashboardLoginExists(codeHash: String) async throws -> Bool {
        try await reader.raw("SELECT 1 AS present FROM dashboard_logins WHERE code_hash = \(bind: codeHash)").first() != nil
    }

    /// Stores a login code with its audit event.
    public func createDashboardLogin(_ login: DashboardLogin, audit: AuditEntry) async throws {
        _ = try await queue.submit(.dashboardLogin(login, audit))
    }

    /// Redeems a login code once: the first redemption before expiry wins, on every replica sharing the database.
    /// The outcome is audited in the same transaction when `audit` makes an entry for it (it may decline: a code that
    /// never existed is a stranger's guess, and a stranger must not cost a durable write each).
    public func redeemDashboardLogin(codeHash: String, now: Date, audit: @escaping @Sendable (DashboardLoginOutcome) -> AuditEntry?) async throws -> DashboardLoginOutcome {
        guard case .login(let outcome) = try await queue.submit(.redeemDashboardLogin(codeHash: codeHash, now: now, audit)) else {
            throw StoreError(.queryFailed, "login redemption returned no outcome")
        }
        return outcome
    }
}

extension WriteQueue {
    func insertDashboardLogin(_ login: DashboardLogin) async throws {
        try await db.raw("""
            INSERT INTO dashboard_logins (code_hash, role, actor, session_seconds, expires_at, created_at)
            VALUES (\(bind: login.codeHash), \(bind: login.role), \(bind: login.actor), \(bind: login.sessionSeconds),
                    \(bind: Int64(login.expiresAt.timeIntervalSince1970)), \(bind: Int64(login.createdAt.timeIntervalSince1970)))
            """).run()
    }

    func redeem(codeHash: String, now: Date) async throws -> DashboardLoginOutcome {
        let seconds = Int64(now.timeIntervalSince1970)
        // Forget codes that expired a day ago: they can only ever be refused.
        try await db.raw("DELETE FROM dashboard_logins WHERE expires_at < \(bind: seconds - 86_400)").run()
        let claimed = try await db.raw("""
            UPDATE dashboard_logins SET used_at = \(bind: seconds)
            WHERE code_hash = \(bind: codeHash) AND used_at IS NULL AND expires_at > \(bind: seconds)
            RETURNING role, actor, session_seconds, expires_at, created_at
            """).first()
        if let row = claimed {
            return .redeemed(DashboardLogin(
                codeHash: codeHash, role: try row.decode(column: "role", as: String.self), actor: try row.decode(column: "actor", as: String.self),
                sessionSeconds: try row.decode(column: "session_seconds", as: Int64.self),
                expiresAt: Date(timeIntervalSince1970: Double(try row.decode(column: "expires_at", as: Int64.self))),
                createdAt: Date(timeIntervalSince1970: Double(try row.decode(column: "created_at", as: Int64.self)))
            ))
        }
        guard let row = try await db.raw("SELECT used_at FROM dashboard_logins WHERE code_hash = \(bind: codeHash)").first() else {
            return .unknown
        }
        return try row.decodeNil(column: "used_at") ? .expired : .alreadyUsed
    }
}
