import Foundation
import Logging
import SQLKit
import SQLiteKit
import PostgresNIO

/// Group commit: every write waits in a queue; one flush at a time takes everything queued, applies it in a single
/// transaction, and resumes each waiter once the COMMIT has returned.
///
/// If a batched transaction fails (say one revocation names an unknown serial), each operation of the batch is retried
/// in a transaction of its own, so one bad request never fails or loses the others.
actor WriteQueue {
    enum Operation: Sendable {
        case issue(CertificateRecord, AuditEntry)
        case revoke(serial: String, reason: String, time: Date, AuditEntry)
        case audit(AuditEntry)
        case metadata([String: String], AuditEntry?)
        case issueWithToken(CertificateRecord, AuditEntry, tokenID: String, now: Date)
        case createToken(TokenRecord, AuditEntry)
        case revokeToken(id: String, time: Date, AuditEntry)
        case storeCRL(StoredCRL)
        /// ACME changes, with a certificate to record and audit events, all in one transaction.
        case acme([ACMEStep], CertificateRecord?, [AuditEntry])
        case metadataIfAbsent(key: String, value: String)
        case dashboardLogin(DashboardLogin, AuditEntry)
        /// Redeems a login code; the closure makes the audit entry from the outcome.
        case redeemDashboardLogin(codeHash: String, now: Date, @Sendable (DashboardLoginOutcome) -> AuditEntry?)
    }

    enum Outcome: Sendable {
        case done
        case record(CertificateRecord)
        case login(DashboardLoginOutcome)
    }

    static let headKey = "audit_head"

    let db: any SQLDatabase
    private let begin: String
    private let lock: String?
    private let logger: Logger
    private var pending: [(Operation, CheckedContinuation<Outcome, any Error>)] = []
    private var flushing = false
    private var idleWaiters: [CheckedContinuation<Void, Never>] = []

    init(db: any SQLDatabase, begin: String, lock: String?, logger: Logger) {
        self.db = db
        self.begin = begin
        self.lock = lock
        self.logger = logger
    }

    func submit(_ operation: Operation) async throws -> Outcome {
        try await withCheckedThrowingContinuation { continuation in
            pending.append((operation, continuation))
            if !flushing {
                flushing = true
                Task { await self.flushLoop() }
            }
        }
    }

    /// Waits until nothing is queued or being written.
    func drain() async {
        guard flushing || !pending.isEmpty else { return }
        await withCheckedContinuation { idleWaiters.append($0) }
    }

    private func flushLoop() async {
        while !pending.isEmpty {
            let batch = pending
            pending = []
            do {
                let outcomes = try await apply(batch.map(\.0))
                for (index, item) in batch.enumerated() { item.1.resume(returning: outcomes[index]) }
            } catch {
                if batch.count == 1 {
                    batch[0].1.resume(throwing: Self.mapped(error))
                } else {
                    for item in batch {
                        do {
                            item.1.resume(returning: try await apply([item.0])[0])
                        } catch {
                            item.1.resume(throwing: Self.mapped(error))
                        }
                    }
                }
            }
        }
        flushing = false
        let waiters = idleWaiters
        idleWaiters = []
        for waiter in waiters { waiter.resume() }
    }

    static func mapped(_ error: any Error) -> any Error {
        if error is StoreError { return error }
        return StoreError(.queryFailed, "database write failed: \(error)")
    }

    /// A duplicate key, by the database's own code (SQLite's constraint result code, PostgreSQL's SQLSTATE 23505),
    /// never by the words of its message.
    static func isUniqueViolation(_ error: any Error) -> Bool {
        if let sqlite = error as? SQLiteError {
            return [.constraint, .constraintUniqueFailed, .constraintPrimaryKeyFailed].contains(sqlite.reason)
        }
        if let postgres = error as? PSQLError {
            return postgres.serverInfo?[.sqlState] == "23505"
        }
        return false
    }

    static func parseHead(_ text: String) -> (sequence: Int64, hash: String)? {
        let parts = text.split(separator: ":")
        guard parts.count == 2, let sequence = Int64(parts[0]) else { return nil }
        return (sequence, String(parts[1]))
    }

    private func logRevocation(serial: String, reason: String, seconds: Int64) async throws {
        let last = try await db.raw("SELECT MAX(sequence) AS n FROM revocation_log").first()
        let sequence = (try last.flatMap { try $0.decodeNil(column: "n") ? nil : try $0.decode(column: "n", as: Int64.self) } ?? 0) + 1
        try await db.raw(
            "INSERT INTO revocation_log (sequence, serial, reason, revoked_at) VALUES (\(bind: sequence), \(bind: serial), \(bind: reason), \(bind: seconds))"
        ).run()
    }

    /// Applies operations in one transaction. Nothing is visible to readers until COMMIT; on any error the
    /// transaction is rolled back.
    private func apply(_ operations: [Operation]) async throws -> [Outcome] {
        try await db.raw(SQLQueryString(begin)).run()
        var committing = false
        do {
            if let lock { _ = try await db.raw(SQLQueryString(lock)).all() }
            let outcomes = try await applyInTransaction(operations)
            committing = true
            try await db.raw("COMMIT").run()
            return outcomes
        } catch {
            do {
                try await db.raw("ROLLBACK").run()
            } catch where committing {
                // A COMMIT that fails for want of space or I/O ends the transaction itself (SQLite rolls it back;
                // PostgreSQL aborts it): there is nothing left to roll back, and saying "rollback failed" would only
                // mislead. The write's own error is what is reported.
                logger.debug("no transaction left to roll back after the failed commit", metadata: ["error": "\(error)"])
            } catch {
                logger.error("rollback failed", metadata: ["error": "\(error)"])
            }
            throw error
        }
    }

    private func applyInTransaction(_ operations: [Operation]) async throws -> [Outcome] {
        let last = try await db.raw("SELECT sequence, hash FROM audit_events ORDER BY sequence DESC LIMIT 1").first()
        var head: (sequence: Int64, hash: String) =
            try last.map { (try $0.decode(column: "sequence", as: Int64.self), try $0.decode(column: "hash", as: String.self)) }
            ?? (0, AuditChain.genesis)
        var events: [AuditEvent] = []
        var certificates: [CertificateRecord] = []
        var outcomes: [Outcome] = []
        var metadata: [String: String] = [:]

        func chain(_ entry: AuditEntry) {
            let event = AuditChain.chain(entry, after: head)
            head = (event.sequence, event.hash)
            events.append(event)
        }

        for operation in operations {
            switch operation {
            case .issue(let record, let entry):
                certificates.append(record)
                chain(entry)
                outcomes.append(.done)
            case .audit(let entry):
                chain(entry)
                outcomes.append(.done)
            case .metadata(let values, let entry):
                metadata.merge(values) { $1 }
                if let entry { chain(entry) }
                outcomes.append(.done)
            case .issueWithToken(let record, let entry, let tokenID, let now):
                // Consume one use only if the token is still usable; RETURNING tells whether a row matched.
                let consumed = try await db.raw(
                    "UPDATE tokens SET uses_consumed = uses_consumed + 1 WHERE id = \(bind: tokenID) AND uses_consumed < uses_allowed AND revoked_at IS NULL AND expires_at > \(bind: Int64(now.timeIntervalSince1970)) RETURNING id"
                ).all()
                guard !consumed.isEmpty else {
                    throw StoreError(.conflict, "token \(tokenID) is no longer usable (used up, revoked or expired)")
                }
                certificates.append(record)
                chain(entry)
                outcomes.append(.done)
            case .createToken(let token, let entry):
                let scopes = String(decoding: try JSONEncoder().encode(token.scopes), as: UTF8.self)
                let keyTypes = try token.keyTypes.map { String(decoding: try JSONEncoder().encode($0), as: UTF8.self) }
                try await db.raw(
                    "INSERT INTO tokens (id, secret_hash, scopes, profile, max_validity, expires_at, uses_allowed, uses_consumed, owner, created_at, key_types) VALUES (\(bind: token.id), \(bind: token.secretHash), \(bind: scopes), \(bind: token.profile), \(bind: token.maxValiditySeconds), \(bind: Int64(token.expiresAt.timeIntervalSince1970)), \(bind: token.usesAllowed), 0, \(bind: token.owner), \(bind: Int64(token.createdAt.timeIntervalSince1970)), \(bind: keyTypes))"
                ).run()
                chain(entry)
                outcomes.append(.done)
            case .revokeToken(let id, let time, let entry):
                guard let row = try await db.raw("SELECT revoked_at FROM tokens WHERE id = \(bind: id)").first() else {
                    throw StoreError(.notFound, "no token with id \(id)")
                }
                guard try row.decodeNil(column: "revoked_at") else {
                    throw StoreError(.conflict, "token \(id) is already revoked")
                }
                try await db.raw("UPDATE tokens SET revoked_at = \(bind: Int64(time.timeIntervalSince1970)) WHERE id = \(bind: id)").run()
                chain(entry)
                outcomes.append(.done)
            case .acme(let steps, let record, let entries):
                for step in steps { try await apply(step) }
                if let record { certificates.append(record) }
                for entry in entries { chain(entry) }
                outcomes.append(.done)
            case .dashboardLogin(let login, let entry):
                try await insertDashboardLogin(login)
                chain(entry)
                outcomes.append(.done)
            case .redeemDashboardLogin(let codeHash, let now, let audit):
                let outcome = try await redeem(codeHash: codeHash, now: now)
                if let entry = audit(outcome) { chain(entry) }
                outcomes.append(.login(outcome))
            case .metadataIfAbsent(let key, let value):
                try await db.raw("INSERT INTO metadata (key, value) VALUES (\(bind: key), \(bind: value)) ON CONFLICT (key) DO NOTHING").run()
                outcomes.append(.done)
            case .storeCRL(let crl):
                // The primary key on the number makes "one CRL per number" hold across writers.
                let latest = try await db.raw("SELECT MAX(number) AS n FROM crls").first()
                let current = try latest.flatMap { try $0.decodeNil(column: "n") ? nil : try $0.decode(column: "n", as: Int64.self) } ?? 0
                guard crl.number == current + 1 else {
                    throw StoreError(.conflict, "CRL number \(crl.number) is not next (latest is \(current))")
                }
                try await db.raw(
                    "INSERT INTO crls (number, this_update, next_update, last_revocation, der) VALUES (\(bind: crl.number), \(bind: Int64(crl.thisUpdate.timeIntervalSince1970)), \(bind: Int64(crl.nextUpdate.timeIntervalSince1970)), \(bind: crl.lastRevocation), \(bind: Data(crl.der)))"
                ).run()
                outcomes.append(.done)
            case .revoke(let serial, let reason, let time, let entry):
                // Certificates issued earlier in this same batch are not inserted yet; look there first.
                if let index = certificates.firstIndex(where: { $0.serial == serial }) {
                    guard certificates[index].status == .valid else {
                        throw StoreError(.conflict, "certificate \(serial) is already revoked")
                    }
                    certificates[index].status = .revoked
                    certificates[index].revokedAt = time
                    certificates[index].revocationReason = reason
                    try await logRevocation(serial: serial, reason: reason, seconds: Int64(time.timeIntervalSince1970))
                    chain(entry)
                    outcomes.append(.record(certificates[index]))
                    continue
                }
                guard let row = try await db.raw("SELECT * FROM certificates WHERE serial = \(bind: serial)").first() else {
                    throw StoreError(.notFound, "no certificate with serial \(serial) in the inventory")
                }
                var record = try Store.decodeCertificate(row)
                guard record.status == .valid else {
                    throw StoreError(.conflict, "certificate \(serial) is already revoked (\(record.revocationReason ?? "unspecified"))")
                }
                let seconds = Int64(time.timeIntervalSince1970)
                try await db.raw(
                    "UPDATE certificates SET status = 'revoked', revoked_at = \(bind: seconds), revocation_reason = \(bind: reason) WHERE serial = \(bind: serial) AND status = 'valid'"
                ).run()
                record.status = .revoked
                record.revokedAt = Date(timeIntervalSince1970: Double(seconds))
                record.revocationReason = reason
                try await logRevocation(serial: serial, reason: reason, seconds: seconds)
                chain(entry)
                outcomes.append(.record(record))
            }
        }

        // The event that recorded each certificate, by number (see Store.unrecordedActions).
        var recordedBy: [String: Int64] = [:]
        for event in events where Store.recordingActions.contains(event.action) { recordedBy[event.subject] = event.sequence }
        for chunk in stride(from: 0, to: certificates.count, by: 50) {
            let rows = certificates[chunk..<min(chunk + 50, certificates.count)]
            var insert = db.insert(into: "certificates").columns(
                "serial", "issuer", "subject", "sans", "identity", "profile", "owner", "requester", "not_before",
                "not_after", "fingerprint", "der", "status", "revoked_at", "revocation_reason", "created_at", "issued_event"
            )
            let created = Int64(Date().timeIntervalSince1970)
            for r in rows {
                let sans = JSONText.array(r.subjectAlternativeNames)
                insert = insert.values([
                    SQLBind(r.serial), SQLBind(r.issuer), SQLBind(r.subject), SQLBind(sans), SQLBind(r.identity),
                    SQLBind(r.profile), SQLBind(r.owner), SQLBind(r.requester),
                    SQLBind(Int64(r.notBefore.timeIntervalSince1970)), SQLBind(Int64(r.notAfter.timeIntervalSince1970)),
                    SQLBind(r.fingerprint), SQLBind(Data(r.der)), SQLBind(r.status.rawValue),
                    SQLBind(r.revokedAt.map { Int64($0.timeIntervalSince1970) }), SQLBind(r.revocationReason),
                    SQLBind(created), SQLBind(recordedBy[r.serial]),
                ] as [any SQLExpression])
            }
            do {
                try await insert.run()
            } catch {
                if Self.isUniqueViolation(error) {
                    throw StoreError(.conflict, "a certificate with the same serial or fingerprint is already recorded")
                }
                throw error
            }
        }

        // Renewal lineage: the predecessors of what was just recorded are renewed now (same transaction).
        // One statement per 100 (a statement per renewal cost a quarter of the renewal throughput).
        let predecessors = Array(Set(certificates.compactMap(\.predecessor))).sorted()
        for chunk in stride(from: 0, to: predecessors.count, by: 100) {
            var update = SQLQueryString("UPDATE certificates SET renewed = 1 WHERE renewed = 0 AND serial IN (")
            for (index, serial) in predecessors[chunk..<min(chunk + 100, predecessors.count)].enumerated() {
                if index > 0 { update.appendLiteral(", ") }
                update.appendInterpolation(bind: serial)
            }
            update.appendLiteral(")")
            try await db.raw(update).run()
        }

        for chunk in stride(from: 0, to: events.count, by: 100) {
            var insert = db.insert(into: "audit_events").columns(
                "sequence", "time", "actor", "action", "subject", "details", "previous_hash", "hash"
            )
            for e in events[chunk..<min(chunk + 100, events.count)] {
                insert = insert.values([
                    SQLBind(e.sequence), SQLBind(e.time), SQLBind(e.actor), SQLBind(e.action), SQLBind(e.subject),
                    SQLBind(e.details), SQLBind(e.previousHash), SQLBind(e.hash),
                ] as [any SQLExpression])
            }
            try await insert.run()
        }
        if !events.isEmpty {
            metadata[Self.headKey] = "\(head.sequence):\(head.hash)"
        }
        for (key, value) in metadata.sorted(by: { $0.key < $1.key }) {
            try await db.raw(
                "INSERT INTO metadata (key, value) VALUES (\(bind: key), \(bind: value)) ON CONFLICT (key) DO UPDATE SET value = excluded.value"
            ).run()
        }
        return outcomes
    }
}
