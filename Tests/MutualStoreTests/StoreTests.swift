import Foundation
import MutualStore
import SQLKit
import SQLiteKit
import Testing

/// The store backends the conformance suite runs against: SQLite always, PostgreSQL when the test command started a
/// throwaway cluster (`scripts/pg.sh`, which exports MUTUAL_TEST_POSTGRES_URL).
enum Backend: String, CaseIterable, Sendable, CustomTestStringConvertible {
    case sqlite, postgres

    var testDescription: String { rawValue }

    static var postgresURL: String? {
        ProcessInfo.processInfo.environment["MUTUAL_TEST_POSTGRES_URL"].flatMap { $0.isEmpty ? nil : $0 }
    }

    static var available: [Backend] {
        postgresURL == nil ? [.sqlite] : [.sqlite, .postgres]
    }
}

@Suite("Store conformance: the same tests on SQLite and PostgreSQL")
struct StoreTests {
    static func record(_ n: Int, notAfter: Date = Date(timeIntervalSince1970: 1_900_000_000), identity: String? = nil, renewing: Int? = nil) -> CertificateRecord {
        let serial = String(format: "%032x", n + 1)
        return CertificateRecord(
            serial: serial, issuer: "CN=Test Issuing CA", subject: "", subjectAlternativeNames: ["uri:spiffe://a.test/w/\(n)"],
            identity: identity ?? "spiffe://a.test/w/\(n)", profile: "workload", owner: "team-\(n % 3)",
            requester: renewing.map { "cert:" + String(format: "%032x", $0 + 1) } ?? "test",
            notBefore: Date(timeIntervalSince1970: 1_800_000_000), notAfter: notAfter, fingerprint: String(format: "%064x", n + 1),
            der: [0x30, 0x03, 0x02, 0x01, UInt8(n % 200)]
        )
    }

    static func entry(_ action: String, _ subject: String) -> AuditEntry {
        AuditEntry(time: Date(timeIntervalSince1970: 1_800_000_000), actor: "test", action: action, subject: subject, details: ["k": "v\n\"quoted\""])
    }

    /// Opens a fresh store on `backend`; `location` is the SQLite path or the PostgreSQL URL of a new database.
    func withStore(_ backend: Backend = .sqlite, _ body: (Store, String) async throws -> Void) async throws {
        let dir = FileManager.default.temporaryDirectory.appendingPathComponent("mutual-store-\(UUID().uuidString.prefix(8))").path
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let path: String
        if backend == .postgres {
            let base = try #require(Backend.postgresURL)
            let name = "t_" + UUID().uuidString.prefix(12).lowercased().replacingOccurrences(of: "-", with: "")
            try PSQL.run(base, "CREATE DATABASE \(name)")
            path = base.replacingOccurrences(of: "/mutual_test", with: "/\(name)")
        } else {
            path = dir + "/mutual.db"
        }
        defer {
            if backend == .postgres, let base = Backend.postgresURL, let name = path.split(separator: "/").last?.split(separator: "?").first {
                try? PSQL.run(base, "DROP DATABASE IF EXISTS \(name) WITH (FORCE)")
            }
        }
        let store = try await Store.open(databaseURL: backend == .postgres ? path : nil, sqlitePath: path)
        do {
            try await body(store, path)
            try await store.close()
        } catch {
            try? await store.close()
            throw error
        }
    }

    /// Runs raw SQL on the database from a second connection, as an attacker with database access would.
    func tamper(_ backend: Backend, _ location: String, _ sql: String) async throws {
        if backend == .postgres {
            try PSQL.run(location, sql)
            return
        }
        let connection = try await SQLiteConnection.open(storage: .file(path: location))
        try await connection.sql().raw(SQLQueryString(sql)).run()
        try await connection.close()
    }

    @Test("concurrent issuances are batched, all durable, each with its audit event, chain intact", arguments: Backend.available)
    func groupCommit(backend: Backend) async throws {
        try await withStore(backend) { store, path in
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
            let reopened = try await Store.open(databaseURL: backend == .postgres ? path : nil, sqlitePath: path)
            #expect(try await reopened.countCertificates() == 300)
            try await reopened.close()
        }
    }

    @Test("one bad write in a batch fails alone; the others commit", arguments: Backend.available)
    func batchIsolation(backend: Backend) async throws {
        try await withStore(backend) { store, _ in
            try await store.recordIssuance(Self.record(1), audit: Self.entry("issue", "1"))
            let results = await withTaskGroup(of: Bool.self) { group in
                for n in 2..<40 {
                    group.addTask { (try? await store.recordIssuance(Self.record(n), audit: Self.entry("issue", "\(n)"))) != nil }
                }
                group.addTask { (try? await store.recordIssuance(Self.record(1), audit: Self.entry("issue", "dup"))) != nil }
                return await group.reduce(into: [Bool]()) { $0.append($1) }
            }
            #expect(results.filter { !$0 }.count == 1, "only the duplicate fails")
            // The duplicate is recognised by the database's code (constraint / SQLSTATE 23505), not its words.
            let duplicate = await #expect(throws: StoreError.self) {
                try await store.recordIssuance(Self.record(1), audit: Self.entry("issue", "dup again"))
            }
            #expect(duplicate?.code == .conflict)
            #expect(try await store.countCertificates() == 39)
            #expect(try await store.auditEvents().count == 39)
            guard case .intact = try await store.verifyAudit() else { Issue.record("chain broken"); return }
        }
    }

    @Test("revocation: once, with its event; unknown and repeated revocations change nothing", arguments: Backend.available)
    func revocation(backend: Backend) async throws {
        try await withStore(backend) { store, _ in
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

    @Test("listing by expiry, identity and status", arguments: Backend.available)
    func listing(backend: Backend) async throws {
        try await withStore(backend) { store, _ in
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

    @Test("dashboard queries: overview aggregates, owner/profile/serial filters, revocations with who, audit by subject", arguments: Backend.available)
    func dashboardQueries(backend: Backend) async throws {
        try await withStore(backend) { store, _ in
            let base = Date(timeIntervalSince1970: 1_800_000_000)  // every record's notBefore
            let day = 86_400.0
            // 0-5 expire 1..6 days after base; 6 renews 5 (so 5 is superseded once expired); 7 expires at 40 days.
            for n in 0..<6 {
                try await store.recordIssuance(Self.record(n, notAfter: base.addingTimeInterval(Double(n + 1) * day)), audit: Self.entry("issue", Self.record(n).serial))
            }
            try await store.recordIssuance(Self.record(6, notAfter: base.addingTimeInterval(30 * day), renewing: 5), audit: Self.entry("issue", Self.record(6).serial))
            try await store.recordIssuance(Self.record(7, notAfter: base.addingTimeInterval(40 * day)), audit: Self.entry("issue", Self.record(7).serial))
            _ = try await store.revoke(serial: Self.record(0).serial, reason: "keyCompromise", at: base, audit: AuditEntry(time: base, actor: "ops:alice", action: "revoke", subject: Self.record(0).serial))
            let now = base.addingTimeInterval(6.5 * day)
            let o = try await store.overview(now: now)
            // valid: 6 (30 d) and 7 (40 d); lapsed: 1-4; superseded: 5; revoked: 0.
            #expect(o.valid == 2)
            #expect(o.expired == 4)
            #expect(o.superseded == 1)
            #expect(o.revoked == 1)
            #expect(o.expiringIn7Days == 0)
            #expect(o.expiringIn30Days == 1)
            #expect(o.expiriesPerDay[23] == 1)  // 30 d - 6.5 d = 23.5 days from now
            #expect(o.expiriesPerDay[33] == 1)
            #expect(o.expiriesPerDay.reduce(0, +) == 2)
            // Every record's notBefore (base) is 6.5 days ago: the bucket of day 30 - 7 = 23.
            #expect(o.issuedPerDay[23] == 8)
            #expect(o.byProfile.map(\.profile) == ["workload"])
            // 7 is at 6.5 / 40 of its lifetime, 6 at 6.5 / 30: neither past two thirds.
            #expect(o.missedRenewals == 0)
            let late = try await store.overview(now: base.addingTimeInterval(29 * day))
            #expect(late.missedRenewals == 2)
            #expect(late.missedRenewalSample.map(\.serial) == [Self.record(6).serial, Self.record(7).serial])

            #expect(try await store.certificates(.init(now: now, limit: 100).with { $0.owner = "team-1" }).map(\.serial) == [1, 4, 7].map { Self.record($0).serial })
            #expect(try await store.certificates(.init(now: now).with { $0.serialPrefix = Self.record(7).serial.uppercased() }).map(\.serial) == [Self.record(7).serial])
            #expect(try await store.certificates(.init(now: now).with { $0.serialPrefix = String(Self.record(7).serial.prefix(31)) }).count == 8)
            #expect(try await store.certificates(.init(now: now).with { $0.profile = "server" }).isEmpty)
            #expect(try await store.certificates(.init(now: now).with { $0.issuer = "CN=Test Issuing CA"; $0.newestFirst = true }).first?.serial == Self.record(7).serial)
            let revocations = try await store.revocationEntries(limit: 10, offset: 0)
            #expect(revocations.map(\.record.serial) == [Self.record(0).serial])
            #expect(revocations.first?.revokedBy == "ops:alice")
            #expect(try await store.auditEvents(subject: Self.record(0).serial).map(\.action) == ["issue", "revoke"])
            let newest = try await store.auditEvents(before: nil, limit: 2)
            #expect(newest.count == 2 && newest[0].sequence > newest[1].sequence)
            #expect(try await store.auditEvents(before: newest[1].sequence, limit: 1000).count == Int(newest[1].sequence) - 1)
        }
    }

    @Test("dashboard login codes: redeemed once, by the first of concurrent redeemers; late and unknown codes refused", arguments: Backend.available)
    func dashboardLogins(backend: Backend) async throws {
        try await withStore(backend) { store, _ in
            let now = Date(timeIntervalSince1970: 1_800_000_000)
            let login = DashboardLogin(codeHash: String(repeating: "a", count: 64), role: "admin", actor: "dashboard:alice", sessionSeconds: 3600,
                                       expiresAt: now.addingTimeInterval(900), createdAt: now)
            try await store.createDashboardLogin(login, audit: Self.entry("dashboard-login-create", "dashboard"))
            let outcomes = try await withThrowingTaskGroup(of: DashboardLoginOutcome.self) { group in
                for _ in 0..<8 {
                    group.addTask { try await store.redeemDashboardLogin(codeHash: login.codeHash, now: now) { _ in Self.entry("dashboard-login", "dashboard") } }
                }
                return try await group.reduce(into: []) { $0.append($1) }
            }
            #expect(outcomes.filter { $0 == .redeemed(login) }.count == 1)
            #expect(outcomes.filter { $0 == .alreadyUsed }.count == 7)
            #expect(try await store.redeemDashboardLogin(codeHash: String(repeating: "b", count: 64), now: now) { _ in nil } == .unknown)
            var second = login
            second.codeHash = String(repeating: "c", count: 64)
            try await store.createDashboardLogin(second, audit: Self.entry("dashboard-login-create", "dashboard"))
            #expect(try await store.redeemDashboardLogin(codeHash: second.codeHash, now: now.addingTimeInterval(900)) { _ in nil } == .expired)
            // A day after expiry the code is forgotten altogether.
            #expect(try await store.redeemDashboardLogin(codeHash: second.codeHash, now: now.addingTimeInterval(2 * 86_400)) { _ in nil } == .unknown)
            if case .broken(let sequence, let reason) = try await store.verifyAudit() { Issue.record("audit broken at \(sequence): \(reason)") }
        }
    }

    @Test("renewal lineage: routine rotations are superseded, the one that lapsed is expired; identity patterns; serial prefixes", arguments: Backend.available)
    func lineage(backend: Backend) async throws {
        try await withStore(backend) { store, _ in
            let base = Date(timeIntervalSince1970: 1_800_000_000)
            // web: 0 → 1 → 2 (2 still valid). db: 10 → 11, and 11 lapsed (no successor). ops host: a DNS identity.
            let chain: [(Int, Int?, String, Double)] = [
                (0, nil, "spiffe://a.test/ns/web/sa/api", -300), (1, 0, "spiffe://a.test/ns/web/sa/api", -200),
                (2, 1, "spiffe://a.test/ns/web/sa/api", 3600), (10, nil, "spiffe://a.test/ns/db/sa/pg", -400),
                (11, 10, "spiffe://a.test/ns/db/sa/pg", -100), (20, nil, "ops.svc.a.test", 7200), (21, nil, "svc.a.test", 7200),
            ]
            for (n, from, identity, offset) in chain {
                try await store.recordIssuance(Self.record(n, notAfter: base.addingTimeInterval(offset), identity: identity, renewing: from), audit: Self.entry("issue", "\(n)"))
            }
            let now = base
            let serial = { (n: Int) in Self.record(n).serial }
            #expect(try await store.certificates(.init(status: .expired, now: now)).map(\.serial) == [serial(11)], "only the lapse")
            #expect(try await store.certificates(.init(status: .superseded, now: now)).map(\.serial) == [serial(10), serial(0), serial(1)])
            let all = try await store.certificates(.init(now: now))
            let statuses = Dictionary(uniqueKeysWithValues: all.map { ($0.serial, $0.effectiveStatus(at: now)) })
            #expect(statuses[serial(0)] == "superseded" && statuses[serial(11)] == "expired" && statuses[serial(2)] == "valid")
            let one = try #require(try await store.certificate(serial: serial(1)))
            #expect(one.predecessor == serial(0) && one.successor == serial(2))
            #expect(try await store.successors(of: serial(0)).map(\.serial) == [serial(1)])
            #expect(try await store.certificate(serial: serial(2))?.successor == nil)

            // Identity patterns: a prefix with a final '*', a DNS suffix with a leading '*.', exact otherwise.
            #expect(Set(try await store.certificates(.init(identity: "spiffe://a.test/ns/web/*", now: now)).map(\.serial)) == Set([0, 1, 2].map(serial)))
            #expect(try await store.certificates(.init(identity: "*.a.test", now: now)).map(\.serial).sorted() == [serial(20), serial(21)].sorted())
            #expect(try await store.certificates(.init(identity: "*.svc.a.test", now: now)).map(\.serial) == [serial(20)], "a subdomain, not the name itself")
            #expect(try await store.certificates(.init(identity: "spiffe://a.test/ns/web", now: now)).isEmpty, "exact without '*'")
            #expect(try await store.certificates(.init(identity: "spiffe://a.test/ns/%/*", now: now)).isEmpty, "no SQL wildcards")

            // Serial prefixes.
            #expect(try await store.certificates(serialPrefix: String(serial(11).prefix(31))).map(\.serial) == [0, 1, 2, 10, 11].map(serial).sorted(), "every serial starting with 31 zeros")
            #expect(try await store.certificates(serialPrefix: serial(11)).map(\.serial) == [serial(11)])
            #expect(try await store.certificates(serialPrefix: "ffff").isEmpty)
        }
    }

    @Test("listing uses the indexes (query plan), so it stays fast with a million rows")
    func indexedListing() async throws {
        try await withStore { _, path in
            let connection = try await SQLiteConnection.open(storage: .file(path: path))
            defer { Task { try? await connection.close() } }
            for (query, index) in [
                ("SELECT * FROM certificates WHERE identity = 'x' ORDER BY not_after LIMIT 10", "certificates_identity"),
                ("SELECT * FROM certificates WHERE not_after <= 5 AND not_after > 1 ORDER BY not_after LIMIT 10", "certificates_expiry"),
                ("SELECT * FROM certificates WHERE status = 'revoked' ORDER BY not_after LIMIT 10", "certificates_lifecycle"),
                ("SELECT serial FROM certificates WHERE requester = 'cert:x'", "certificates_requester"),
                // The dashboard's (migration 6).
                ("SELECT COUNT(*) FROM certificates c WHERE c.status = 'valid' AND c.not_after <= 5 AND c.renewed = 0", "COVERING INDEX certificates_lifecycle"),
                ("SELECT COUNT(*) FROM certificates c WHERE c.status = 'valid' AND c.not_after > 5 AND 3 * (5 - c.not_before) > 2 * (c.not_after - c.not_before) AND c.renewed = 0", "COVERING INDEX certificates_lifecycle"),
                ("SELECT owner, COUNT(*) FROM certificates WHERE status = 'valid' AND not_after > 5 GROUP BY owner", "COVERING INDEX certificates_lifecycle"),
                ("SELECT * FROM certificates WHERE owner = 'x' ORDER BY not_after LIMIT 51", "certificates_expiry"),
                ("SELECT * FROM certificates WHERE identity >= 'spiffe://a/' AND identity < 'spiffe://a0' ORDER BY not_after LIMIT 51", "certificates_identity"),
                ("SELECT COUNT(*) FROM certificates WHERE not_before > 1 AND not_before <= 5", "COVERING INDEX"),
                ("SELECT * FROM audit_events WHERE subject = 'x' AND action NOT IN ('issue', 'renew', 'renew-expired') ORDER BY sequence", "audit_events_subject"),
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
        for backend in Backend.available {
            try await tamperDetection(backend: backend, sql: sql, where: `where`, what: what)
        }
    }

    func tamperDetection(backend: Backend, sql: String, where: String, what: String) async throws {
        try await withStore(backend) { store, path in
            for n in 0..<6 {
                try await store.recordIssuance(Self.record(n), audit: Self.entry("issue", "\(n)"))
            }
            guard case .intact = try await store.verifyAudit() else { Issue.record("should start intact"); return }
            try await tamper(backend, path, sql)
            guard case .broken(_, let reason) = try await store.verifyAudit() else {
                Issue.record("\(backend): tampering with '\(sql)' was not detected")
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

@Suite("Store conformance: tokens, CRLs and revocation log on both backends")
struct StoreConformanceExtras {
    @Test("a 1-use token is consumed once across concurrent writers; CRL numbers are strictly increasing", arguments: Backend.available)
    func tokensAndCRLs(backend: Backend) async throws {
        try await StoreTests().withStore(backend) { store, _ in
            let now = Date(timeIntervalSince1970: 1_800_000_000)
            try await store.createToken(
                TokenRecord(id: "00000000000000aa", secretHash: String(repeating: "0", count: 64), scopes: ["*.test"], profile: "server",
                            maxValiditySeconds: 3600, expiresAt: now.addingTimeInterval(3600), usesAllowed: 1, owner: nil, createdAt: now),
                audit: StoreTests.entry("token-create", "t"))
            let results = await withTaskGroup(of: Bool.self) { group in
                for n in 0..<20 {
                    group.addTask {
                        (try? await store.recordIssuance(StoreTests.record(n), audit: StoreTests.entry("issue", "\(n)"), consumingToken: "00000000000000aa", now: now)) != nil
                    }
                }
                return await group.reduce(into: [Bool]()) { $0.append($1) }
            }
            #expect(results.filter { $0 }.count == 1)
            #expect(try await store.countCertificates() == 1)
            #expect(try await store.token(id: "00000000000000aa")?.usesConsumed == 1)

            try await store.storeCRL(StoredCRL(number: 1, thisUpdate: now, nextUpdate: now, lastRevocation: 0, der: [0x30, 0x00]))
            let duplicate = await #expect(throws: StoreError.self) {
                try await store.storeCRL(StoredCRL(number: 1, thisUpdate: now, nextUpdate: now, lastRevocation: 0, der: [0x30, 0x00]))
            }
            #expect(duplicate?.code == .conflict)
            let skipped = await #expect(throws: StoreError.self) {
                try await store.storeCRL(StoredCRL(number: 3, thisUpdate: now, nextUpdate: now, lastRevocation: 0, der: [0x30, 0x00]))
            }
            #expect(skipped?.code == .conflict)
            try await store.storeCRL(StoredCRL(number: 2, thisUpdate: now, nextUpdate: now, lastRevocation: 0, der: [0x30, 0x01]))
            #expect(try await store.latestCRL()?.number == 2)

            let serial = StoreTests.record(1).serial
            if try await store.certificate(serial: serial) == nil {
                try await store.recordIssuance(StoreTests.record(1), audit: StoreTests.entry("issue", "1"))
            }
            _ = try await store.revoke(serial: serial, reason: "superseded", at: now, audit: StoreTests.entry("revoke", serial))
            let events = try await store.revocations(after: 0)
            #expect(events.map(\.serial) == [serial])
            #expect(try await store.lastRevocationSequence() == 1)
            #expect(try await store.statusCounts(now: now)["revoked"] == 1)
            guard case .intact = try await store.verifyAudit() else { Issue.record("audit chain broken"); return }
        }
    }
}

/// psql, the PostgreSQL client, for the tests' own administrative statements (create/drop databases, tampering).
enum PSQL {
    static func run(_ url: String, _ sql: String) throws {
        let process = Process()
        process.executableURL = URL(fileURLWithPath: "/usr/bin/psql")
        let plain = url.replacingOccurrences(of: "?tlsmode=disable", with: "")
        process.arguments = [plain, "-v", "ON_ERROR_STOP=1", "-q", "-c", sql]
        process.standardOutput = FileHandle.nullDevice
        process.standardError = FileHandle.nullDevice
        try process.run()
        process.waitUntilExit()
        guard process.terminationStatus == 0 else {
            throw StoreError(.queryFailed, "psql failed (\(process.terminationStatus)) running: \(sql.prefix(80))")
        }
    }
}

extension CertificateFilter {
    func with(_ change: (inout CertificateFilter) -> Void) -> CertificateFilter {
        var copy = self
        change(&copy)
        return copy
    }
}
