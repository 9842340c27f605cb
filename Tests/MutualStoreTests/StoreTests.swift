import Foundation
import MutualStore
import SQLKit
import SQLiteKit
import Testing

@Suite("Inventory and audit chain on a real SQLite file")
struct StoreTests {
    static func record(_ n: Int, notAfter: Date = Date(timeIntervalSince1970: 1_900_000_000), identity: String? = nil) -> CertificateRecord {
        let serial = String(format: "%032x", n + 1)
        return CertificateRecord(
            serial: serial, issuer: "CN=Test Issuing CA", subject: "", subjectAlternativeNames: ["uri:spiffe://a.test/w/\(n)"],
            identity: identity ?? "spiffe://a.test/w/\(n)", profile: "workload", owner: "team-\(n % 3)", requester: "test",
            notBefore: Date(timeIntervalSince1970: 1_800_000_000), notAfter: notAfter, fingerprint: String(format: "%064x", n + 1),
            der: [0x30, 0x03, 0x02, 0x01, UInt8(n % 200)]
        )
    }

    static func entry(_ action: String, _ subject: String) -> AuditEntry {
        AuditEntry(time: Date(timeIntervalSince1970: 1_800_000_000), actor: "test", action: action, subject: subject, details: ["k": "v\n\"quoted\""])
    }

    func withStore(_ body: (Store, String) async throws -> Void) async throws {
        let dir = FileManager.default.temporaryDirectory.appendingPathComponent("mutual-store-\(UUID().uuidString.prefix(8))").path
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let path = dir + "/mutual.db"
        let store = try await Store.openSQLite(path: path)
        do {
            try await body(store, path)
            try await store.close()
        } catch {
            try? await store.close()
            throw error
        }
    }

    /// Runs raw SQL on the database file from a second connection, as an attacker with file access would.
    func tamper(_ path: String, _ sql: String) async throws {
        let connection = try await SQLiteConnection.open(storage: .file(path: path))
        try await connection.sql().raw(SQLQueryString(sql)).run()
        try await connection.close()
    }

    @Test("concurrent issuances are batched, all durable, each with its audit event, chain intact")
    func groupCommit() async throws {
        try await withStore { store, path in
            try await withThrowingTaskGroup(of: Void.self) { group in
                for n in 0..<300 {
                    group.addTask { try await store.recordIssuance(Self.record(n), audit: Self.entry("issue", "\(n)")) }
                }
                try await group.waitForAll()
            }
            #expect(try await store.countCertificates() == 300)
            let events = try await store.auditEvents()
            #expect(events.count == 300)
            #expect(events.map(\.sequence) == Array(1...300))
            guard case .intact(let count, _) = try await store.verifyAudit() else {
                Issue.record("chain should be intact")
                return
            }
            #expect(count == 300)
            // A second, fresh connection sees everything: it was committed, not cached.
            let reopened = try await Store.openSQLite(path: path)
            #expect(try await reopened.countCertificates() == 300)
            try await reopened.close()
        }
    }

    @Test("one bad write in a batch fails alone; the others commit")
    func batchIsolation() async throws {
        try await withStore { store, _ in
            try await store.recordIssuance(Self.record(1), audit: Self.entry("issue", "1"))
            let results = await withTaskGroup(of: Bool.self) { group in
                for n in 2..<40 {
                    group.addTask { (try? await store.recordIssuance(Self.record(n), audit: Self.entry("issue", "\(n)"))) != nil }
                }
                group.addTask { (try? await store.recordIssuance(Self.record(1), audit: Self.entry("issue", "dup"))) != nil }
                return await group.reduce(into: [Bool]()) { $0.append($1) }
            }
            #expect(results.filter { !$0 }.count == 1, "only the duplicate fails")
            #expect(try await store.countCertificates() == 39)
            #expect(try await store.auditEvents().count == 39)
            guard case .intact = try await store.verifyAudit() else { Issue.record("chain broken"); return }
        }
    }

    @Test("revocation: once, with its event; unknown and repeated revocations change nothing")
    func revocation() async throws {
        try await withStore { store, _ in
            try await store.recordIssuance(Self.record(1), audit: Self.entry("issue", "1"))
            let serial = Self.record(1).serial
            let revoked = try await store.revoke(serial: serial, reason: "keyCompromise", at: Date(timeIntervalSince1970: 1_800_000_100), audit: Self.entry("revoke", serial))
            #expect(revoked.status == .revoked)
            #expect(revoked.revocationReason == "keyCompromise")
            let before = try await store.auditEvents().count
            let again = await #expect(throws: StoreError.self) {
                _ = try await store.revoke(serial: serial, reason: "superseded", at: .now, audit: Self.entry("revoke", serial))
            }
            #expect(again?.code == .conflict)
            let unknown = await #expect(throws: StoreError.self) {
                _ = try await store.revoke(serial: "ffff", reason: "superseded", at: .now, audit: Self.entry("revoke", "ffff"))
            }
            #expect(unknown?.code == .notFound)
            #expect(try await store.auditEvents().count == before)
            #expect(try await store.certificate(serial: serial)?.revocationReason == "keyCompromise")
        }
    }

    @Test("listing by expiry, identity and status")
    func listing() async throws {
        try await withStore { store, _ in
            let base = Date(timeIntervalSince1970: 1_800_000_000)
            for n in 0..<10 {
                try await store.recordIssuance(
                    Self.record(n, notAfter: base.addingTimeInterval(Double(n) * 3600), identity: n < 5 ? "spiffe://a.test/api" : nil),
                    audit: Self.entry("issue", "\(n)"))
            }
            _ = try await store.revoke(serial: Self.record(9).serial, reason: "superseded", at: base, audit: Self.entry("revoke", "9"))
            let now = base.addingTimeInterval(1800)  // record 0 has expired
            let expiring = try await store.certificates(.init(expiringBefore: now.addingTimeInterval(3 * 3600), now: now))
            #expect(expiring.map(\.serial) == [1, 2, 3].map { Self.record($0).serial })
            #expect(try await store.certificates(.init(identity: "spiffe://a.test/api", now: now)).count == 5)
            #expect(try await store.certificates(.init(status: .expired, now: now)).map(\.serial) == [Self.record(0).serial])
            #expect(try await store.certificates(.init(status: .revoked, now: now)).map(\.serial) == [Self.record(9).serial])
            #expect(try await store.certificates(.init(status: .valid, now: now)).count == 8)
            let page = try await store.certificates(.init(now: now, limit: 3, offset: 3))
            #expect(page.map(\.serial) == [3, 4, 5].map { Self.record($0).serial })
        }
    }

    @Test("listing uses the indexes (query plan), so it stays fast with a million rows")
    func indexedListing() async throws {
        try await withStore { _, path in
            let connection = try await SQLiteConnection.open(storage: .file(path: path))
            defer { Task { try? await connection.close() } }
            for (query, index) in [
                ("SELECT * FROM certificates WHERE identity = 'x' ORDER BY not_after LIMIT 10", "certificates_identity"),
                ("SELECT * FROM certificates WHERE not_after <= 5 AND not_after > 1 ORDER BY not_after LIMIT 10", "certificates_not_after"),
                ("SELECT * FROM certificates WHERE status = 'revoked' ORDER BY not_after LIMIT 10", "certificates_status"),
            ] {
                let rows = try await connection.sql().raw(SQLQueryString("EXPLAIN QUERY PLAN " + query)).all()
                let plan = try rows.map { try $0.decode(column: "detail", as: String.self) }.joined(separator: " | ")
                #expect(plan.contains(index), "\(query): \(plan)")
            }
        }
    }

    @Test("audit verify names the first altered, removed or reordered event", arguments: [
        ("UPDATE audit_events SET subject = 'forged' WHERE sequence = 3", "event #3", "altered"),
        ("DELETE FROM audit_events WHERE sequence = 2", "event #2", "missing"),
        ("UPDATE audit_events SET sequence = sequence + 100 WHERE sequence = 5", "#5", "missing"),
        ("DELETE FROM audit_events WHERE sequence = 6", "#6", "missing"),
        ("UPDATE audit_events SET details = '{}' WHERE sequence = 1", "event #1", "altered"),
    ])
    func tamperDetection(sql: String, where: String, what: String) async throws {
        try await withStore { store, path in
            for n in 0..<6 {
                try await store.recordIssuance(Self.record(n), audit: Self.entry("issue", "\(n)"))
            }
            guard case .intact = try await store.verifyAudit() else { Issue.record("should start intact"); return }
            try await tamper(path, sql)
            guard case .broken(_, let reason) = try await store.verifyAudit() else {
                Issue.record("tampering with '\(sql)' was not detected")
                return
            }
            #expect(reason.contains(`where`) && reason.contains(what), "\(reason)")
        }
    }

    @Test("a file that is not a database is refused without being changed")
    func notADatabase() async throws {
        let dir = FileManager.default.temporaryDirectory.appendingPathComponent("mutual-store-\(UUID().uuidString.prefix(8))").path
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let garbage = Data((0..<4096).map { UInt8($0 % 251) })
        try garbage.write(to: URL(fileURLWithPath: dir + "/mutual.db"))
        let error = await #expect(throws: StoreError.self) { _ = try await Store.openSQLite(path: dir + "/mutual.db") }
        #expect(error?.code == .unavailable)
        #expect(try Data(contentsOf: URL(fileURLWithPath: dir + "/mutual.db")) == garbage)
    }
}
