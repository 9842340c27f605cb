import Foundation
import Logging
import SQLKit
import SQLiteKit

/// The inventory, revocations, audit chain and CA metadata, on SQLite (embedded default) through SQLKit, so the same
/// code can drive PostgreSQL.
///
/// Writes go through a group-commit queue: concurrent writers are batched into one transaction, and each caller
/// resumes only after that transaction has committed (WAL, `synchronous=FULL`: fsynced). An issued certificate is
/// therefore durable, with its audit event, before anyone can see it. Reads use a separate connection.
public final class Store: Sendable {
    let writer: any SQLDatabase
    let reader: any SQLDatabase
    let queue: WriteQueue
    private let closeAction: @Sendable () async throws -> Void
    let logger: Logger
    /// Text compares byte by byte (SQLite), so prefix ranges can use an index.
    let byteOrderedText: Bool

    init(writer: any SQLDatabase, reader: any SQLDatabase, begin: String, lock: String? = nil, logger: Logger, byteOrderedText: Bool = false,
         close: @escaping @Sendable () async throws -> Void) {
        self.byteOrderedText = byteOrderedText
        self.writer = writer
        self.reader = reader
        self.queue = WriteQueue(db: writer, begin: begin, lock: lock, logger: logger)
        self.closeAction = close
        self.logger = logger
    }

    /// Opens (creating if needed) the SQLite database at `path` and brings its schema up to date.
    ///
    /// Blocking file I/O happens on NIO's thread pool, not on the caller's thread.
    public static func openSQLite(path: String, logger: Logger = Logger(label: "mutual.store")) async throws -> Store {
        let writer: SQLiteConnection
        let reader: SQLiteConnection
        do {
            writer = try await SQLiteConnection.open(storage: .file(path: path), logger: logger)
        } catch {
            throw StoreError(.unavailable, "cannot open the database \(path): \(error)")
        }
        do {
            let db = writer.sql()
            // Fail fast on a file that is not a database, before changing anything.
            _ = try await db.raw("PRAGMA schema_version").all()
            try await db.raw("PRAGMA journal_mode=WAL").run()
            try await db.raw("PRAGMA synchronous=FULL").run()
            try await db.raw("PRAGMA busy_timeout=10000").run()
            try await db.raw("PRAGMA foreign_keys=ON").run()
            // Checkpoint the WAL every ~16 MiB instead of every 4 MiB: hot index pages are copied back less often.
            try await db.raw("PRAGMA wal_autocheckpoint=4000").run()
            try await Schema.migrate(db, types: .sqlite, begin: "BEGIN IMMEDIATE")
            reader = try await SQLiteConnection.open(storage: .file(path: path), logger: logger)
            try await reader.sql().raw("PRAGMA busy_timeout=10000").run()
        } catch let error as StoreError {
            try? await writer.close()
            throw error
        } catch {
            try? await writer.close()
            throw StoreError(.unavailable, "\(path) is not a usable Mutual database: \(error)")
        }
        return Store(
            writer: writer.sql(), reader: reader.sql(), begin: "BEGIN IMMEDIATE", logger: logger, byteOrderedText: true,
            close: {
                try await reader.close()
                try await writer.close()
            }
        )
    }

    /// Closes the connections. Pending writes finish first.
    public func close() async throws {
        await queue.drain()
        try await closeAction()
    }

    // MARK: Writes

    /// Records an issued certificate and its audit event in one transaction. Returns once durable.
    public func recordIssuance(_ record: CertificateRecord, audit: AuditEntry) async throws {
        _ = try await queue.submit(.issue(record, audit))
    }

    /// Marks a certificate revoked and appends the audit event in one transaction; returns the updated record.
    /// Fails with `.notFound` or `.conflict` (already revoked) without writing anything.
    public func revoke(serial: String, reason: String, at time: Date, audit: AuditEntry) async throws -> CertificateRecord {
        guard case .record(let record) = try await queue.submit(.revoke(serial: serial, reason: reason, time: time, audit)) else {
            throw StoreError(.queryFailed, "revocation returned no record")
        }
        return record
    }

    /// Appends an audit event that goes with no other write.
    public func appendAudit(_ entry: AuditEntry) async throws {
        _ = try await queue.submit(.audit(entry))
    }

    /// Sets metadata values and appends an audit event, in one transaction.
    public func setMetadata(_ values: [String: String], audit: AuditEntry?) async throws {
        _ = try await queue.submit(.metadata(values, audit))
    }

    // MARK: Reads

    public func metadata(_ key: String) async throws -> String? {
        let row = try await reader.raw("SELECT value FROM metadata WHERE key = \(bind: key)").first()
        return try row?.decode(column: "value", as: String.self)
    }

    public func certificate(serial: String) async throws -> CertificateRecord? {
        let row = try await reader.raw("SELECT c.*, \(unsafeRaw: Self.successorColumn) FROM certificates c WHERE c.serial = \(bind: serial.lowercased())").first()
        return try row.map(Self.decodeCertificate)
    }

    /// Certificates whose serial starts with `prefix` (lowercase hex), at most `limit`: `mutual show 3df2da4e`.
    public func certificates(serialPrefix prefix: String, limit: Int = 10) async throws -> [CertificateRecord] {
        let prefix = prefix.lowercased()
        return try await reader.raw("""
            SELECT c.*, \(unsafeRaw: Self.successorColumn) FROM certificates c
            WHERE substr(c.serial, 1, \(unsafeRaw: String(prefix.count))) = \(bind: prefix) ORDER BY c.serial LIMIT \(bind: limit)
            """).all().map(Self.decodeCertificate)
    }

    /// The certificates renewed from `serial` (its successors: issued with `requester` `cert:<serial>`), newest first.
    public func successors(of serial: String) async throws -> [CertificateRecord] {
        try await reader.raw("""
            SELECT c.*, \(unsafeRaw: Self.successorColumn) FROM certificates c
            WHERE c.requester = \(bind: "cert:" + serial.lowercased()) ORDER BY c.not_before DESC, c.serial
            """).all().map(Self.decodeCertificate)
    }

    /// The audit events indexed by subject (migration 6's partial index): all but those that record a certificate,
    /// whose number is kept on the certificate's row (`issued_event`). Queries repeat this text so that the database
    /// can use the index.
    static let unrecordedActions = "action NOT IN ('issue', 'renew', 'renew-expired')"
    static let recordingActions: Set<String> = ["issue", "renew", "renew-expired"]

    /// The newest successor of each row (renewal lineage), served by the index on `requester`.
    static let successorColumn = "(SELECT s.serial FROM certificates s WHERE s.requester = 'cert:' || c.serial ORDER BY s.not_before DESC, s.serial LIMIT 1) AS successor"
    /// Kept by every insert (``WriteQueue``): 1 once a certificate renewed from this one is recorded.
    static let hasSuccessor = "c.renewed = 1"

    /// The smallest string above every string that starts with `prefix` (its last scalar plus one); nil if none.
    static func prefixUpperBound(_ prefix: String) -> String? {
        var scalars = Array(prefix.unicodeScalars)
        guard let last = scalars.popLast(), let next = Unicode.Scalar(last.value + 1) else { return nil }
        scalars.append(next)
        var text = ""
        text.unicodeScalars.append(contentsOf: scalars)
        return text
    }

    /// Lists certificates by soonest expiry first, filtered through the indexes on expiry, identity and status.
    public func certificates(_ filter: CertificateFilter) async throws -> [CertificateRecord] {
        var query = SQLQueryString("SELECT c.*, \(unsafeRaw: Self.successorColumn) FROM certificates c WHERE 1 = 1")
        let now = Int64(filter.now.timeIntervalSince1970)
        if let identity = filter.identity {
            switch IdentityPattern(identity) {
            case .exact(let name):
                query.appendInterpolation(unsafeRaw: " AND c.identity = ")
                query.appendInterpolation(bind: name)
            case .prefix(let prefix):
                if byteOrderedText, let upper = Self.prefixUpperBound(prefix) {
                    // A range on the identity index; SQLite compares text byte by byte, so [prefix, upper) is
                    // exactly the identities that start with prefix. (PostgreSQL's collation may not be byte order.)
                    query.appendInterpolation(unsafeRaw: " AND c.identity >= ")
                    query.appendInterpolation(bind: prefix)
                    query.appendInterpolation(unsafeRaw: " AND c.identity < ")
                    query.appendInterpolation(bind: upper)
                }
                query.appendInterpolation(unsafeRaw: " AND substr(c.identity, 1, \(prefix.count)) = ")
                query.appendInterpolation(bind: prefix)
            case .suffix(let suffix):
                query.appendInterpolation(unsafeRaw: " AND length(c.identity) > \(suffix.count) AND substr(c.identity, length(c.identity) - \(suffix.count - 1)) = ")
                query.appendInterpolation(bind: suffix)
            }
        }
        switch filter.status {
        case .valid?:
            query.appendInterpolation(unsafeRaw: " AND c.status = 'valid' AND c.not_after > ")
            query.appendInterpolation(bind: now)
        case .expired?:
            query.appendInterpolation(unsafeRaw: " AND c.renewed = 0 AND c.status = 'valid' AND c.not_after <= ")
            query.appendInterpolation(bind: now)
        case .superseded?:
            query.appendInterpolation(unsafeRaw: " AND \(Self.hasSuccessor) AND c.status = 'valid' AND c.not_after <= ")
            query.appendInterpolation(bind: now)
        case .revoked?:
            query.appendInterpolation(unsafeRaw: " AND c.status = 'revoked'")
        case nil:
            break
        }
        if let owner = filter.owner {
            query.appendInterpolation(unsafeRaw: " AND c.owner = ")
            query.appendInterpolation(bind: owner)
        }
        if let profile = filter.profile {
            query.appendInterpolation(unsafeRaw: " AND c.profile = ")
            query.appendInterpolation(bind: profile)
        }
        if let issuer = filter.issuer {
            query.appendInterpolation(unsafeRaw: " AND c.issuer = ")
            query.appendInterpolation(bind: issuer)
        }
        if let prefix = filter.serialPrefix?.lowercased(), !prefix.isEmpty {
            // A range on the primary key: served by its index, unlike substr().
            query.appendInterpolation(unsafeRaw: " AND c.serial >= ")
            query.appendInterpolation(bind: prefix)
            query.appendInterpolation(unsafeRaw: " AND c.serial < ")
            query.appendInterpolation(bind: prefix + "g")
        }
        if let before = filter.expiringBefore {
            query.appendInterpolation(unsafeRaw: " AND c.not_after <= ")
            query.appendInterpolation(bind: Int64(before.timeIntervalSince1970))
            query.appendInterpolation(unsafeRaw: " AND c.not_after > ")
            query.appendInterpolation(bind: now)
        }
        query.appendInterpolation(unsafeRaw: filter.newestFirst ? " ORDER BY c.not_after DESC, c.serial DESC LIMIT " : " ORDER BY c.not_after ASC, c.serial ASC LIMIT ")
        query.appendInterpolation(bind: max(0, min(filter.limit, 100_000)))
        query.appendInterpolation(unsafeRaw: " OFFSET ")
        query.appendInterpolation(bind: max(0, filter.offset))
        return try await reader.raw(query).all().map(Self.decodeCertificate)
    }

    /// Number of certificates by stored status.
    public func countCertificates() async throws -> Int {
        let row = try await reader.raw("SELECT COUNT(*) AS n FROM certificates").first()
        return Int(try row?.decode(column: "n", as: Int64.self) ?? 0)
    }

    /// Every audit event in order. Cost: linear in the chain length.
    public func auditEvents(limit: Int? = nil) async throws -> [AuditEvent] {
        let rows: [any SQLRow]
        if let limit {
            rows = try await reader.raw("SELECT * FROM (SELECT * FROM audit_events ORDER BY sequence DESC LIMIT \(bind: limit)) AS t ORDER BY sequence ASC").all()
        } else {
            rows = try await reader.raw("SELECT * FROM audit_events ORDER BY sequence ASC").all()
        }
        return try rows.map(Self.decodeAudit)
    }

    /// Recomputes the whole audit chain and compares it with the recorded head.
    public func verifyAudit() async throws -> AuditVerification {
        let events = try await auditEvents()
        let head = try await metadata(WriteQueue.headKey).flatMap(WriteQueue.parseHead)
        return AuditChain.verify(events, head: head)
    }

    // MARK: Row decoding

    static func decodeCertificate(_ row: any SQLRow) throws -> CertificateRecord {
        let sansJSON = try row.decode(column: "sans", as: String.self)
        let sans = (try? JSONDecoder().decode([String].self, from: Data(sansJSON.utf8))) ?? []
        let revokedAt = try row.decodeNil(column: "revoked_at") ? nil : try row.decode(column: "revoked_at", as: Int64.self)
        return CertificateRecord(
            serial: try row.decode(column: "serial", as: String.self),
            issuer: try row.decode(column: "issuer", as: String.self),
            subject: try row.decode(column: "subject", as: String.self),
            subjectAlternativeNames: sans,
            identity: try row.decode(column: "identity", as: String.self),
            profile: try row.decode(column: "profile", as: String.self),
            owner: try row.decode(column: "owner", as: String?.self),
            requester: try row.decode(column: "requester", as: String.self),
            notBefore: Date(timeIntervalSince1970: Double(try row.decode(column: "not_before", as: Int64.self))),
            notAfter: Date(timeIntervalSince1970: Double(try row.decode(column: "not_after", as: Int64.self))),
            fingerprint: try row.decode(column: "fingerprint", as: String.self),
            der: Array(try row.decode(column: "der", as: Data.self)),
            status: CertificateRecord.Status(rawValue: try row.decode(column: "status", as: String.self)) ?? .valid,
            revokedAt: revokedAt.map { Date(timeIntervalSince1970: Double($0)) },
            revocationReason: try row.decode(column: "revocation_reason", as: String?.self),
            successor: (try? row.decode(column: "successor", as: String?.self)) ?? nil
        )
    }

    static func decodeAudit(_ row: any SQLRow) throws -> AuditEvent {
        AuditEvent(
            sequence: try row.decode(column: "sequence", as: Int64.self),
            time: try row.decode(column: "time", as: String.self),
            actor: try row.decode(column: "actor", as: String.self),
            action: try row.decode(column: "action", as: String.self),
            subject: try row.decode(column: "subject", as: String.self),
            details: try row.decode(column: "details", as: String.self),
            previousHash: try row.decode(column: "previous_hash", as: String.self),
            hash: try row.decode(column: "hash", as: String.self)
        )
    }
}

extension Store {
    /// Certificates by effective status (valid, expired, revoked) at `now`, for metrics.
    public func statusCounts(now: Date) async throws -> [String: Int] {
        let seconds = Int64(now.timeIntervalSince1970)
        let row = try await reader.raw("""
            SELECT
              CAST(SUM(CASE WHEN status = 'valid' AND not_after > \(bind: seconds) THEN 1 ELSE 0 END) AS BIGINT) AS valid,
              CAST(SUM(CASE WHEN status = 'valid' AND not_after <= \(bind: seconds) THEN 1 ELSE 0 END) AS BIGINT) AS expired,
              CAST(SUM(CASE WHEN status = 'revoked' THEN 1 ELSE 0 END) AS BIGINT) AS revoked
            FROM certificates
            """).first()
        func value(_ column: String) throws -> Int {
            guard let row, try !row.decodeNil(column: column) else { return 0 }
            return Int(try row.decode(column: column, as: Int64.self))
        }
        return ["valid": try value("valid"), "expired": try value("expired"), "revoked": try value("revoked")]
    }

    /// The soonest notAfter among valid, unexpired certificates (index on status, not_after).
    public func soonestExpiry(now: Date) async throws -> Date? {
        let row = try await reader.raw(
            "SELECT not_after FROM certificates WHERE status = 'valid' AND not_after > \(bind: Int64(now.timeIntervalSince1970)) ORDER BY not_after ASC LIMIT 1"
        ).first()
        return try row.map { Date(timeIntervalSince1970: Double(try $0.decode(column: "not_after", as: Int64.self))) }
    }
}
