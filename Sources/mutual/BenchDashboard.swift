import ArgumentParser
import Foundation
import MutualAuthority
import MutualPKI
import MutualServer
import X509

/// `mutual bench dashboard`: fills an inventory with a realistic mix (owners, profiles, lifetimes from a day to 90
/// days, renewal chains, lapses, revocations) issued through the authority itself, then times the dashboard's pages
/// over it in process: the server's work per page, without a browser or a socket.
struct BenchDashboard: AsyncParsableCommand {
    static let configuration = CommandConfiguration(commandName: "dashboard", abstract: "Dashboard page times over a large inventory (fills it first).")

    @Option(help: "Certificates the inventory should hold (the missing ones are issued first).") var count = 100_000
    @Option(help: "State directory (kept, so a filled inventory can be reused; default: a temporary one, deleted).") var stateDir: String?
    @Option(help: "Timed renders per page.") var repetitions = 20
    @Flag(help: "Fill the inventory and stop.") var fillOnly = false
    @Flag(help: "Print JSON.") var json = false

    func validate() throws {
        guard (1...2_000_000).contains(count), (1...1000).contains(repetitions) else {
            throw ValidationError("--count must be 1...2000000 and --repetitions 1...1000")
        }
    }

    static let day = 86_400.0
    static let lifetimes: [ValidityDuration] = [.days(1), .days(7), .days(30), .days(90)]

    func run() async throws {
        let temporary = stateDir == nil
        let dir = stateDir ?? FileManager.default.temporaryDirectory.appendingPathComponent("mutual-bench-\(UUID().uuidString.prefix(8))").path
        defer { if temporary { try? FileManager.default.removeItem(atPath: dir) } }
        let state = StateDirectory(path: dir)
        let now = Date()
        if !state.isInitialized {
            // The CA is made 200 days ago so that the fill can issue certificates as they would have been, over time.
            _ = try await failing {
                try await Authority.initialize(state: state, name: "Dashboard Bench CA", keyType: .p256, constraints: .init(), passphrase: nil,
                                               actor: "bench", now: now.addingTimeInterval(-200 * Self.day))
            }
        }
        let authority = try await failing { try await Authority.open(state: state) }
        do {
            let existing = try await authority.store.countCertificates()
            let fill = try await Self.fill(authority: authority, count: max(0, count - existing), start: existing, now: now)
            let rows = try await authority.store.countCertificates()
            if fillOnly {
                try await authority.close()
                if json {
                    try printJSON(["issued": Double(fill.issued), "revoked": Double(fill.revoked), "seconds": fill.seconds, "inventory_rows": Double(rows)])
                } else {
                    print(String(format: "filled: %d issued, %d revoked in %.1f s; %d certificates in the inventory at %@", fill.issued, fill.revoked, fill.seconds, rows, dir))
                }
                return
            }
            let probe = try await DashboardProbe(authority: authority)
            let pages = [
                ("overview", "/dashboard/"),
                ("inventory, first page", "/dashboard/certificates"),
                ("inventory, owner + status", "/dashboard/certificates?owner=team-07&status=valid"),
                ("inventory, identity prefix", "/dashboard/certificates?identity=spiffe://bench.test/team-03/*"),
                ("inventory, expiring within 7 d", "/dashboard/certificates?expiring=7d"),
                ("inventory, serial prefix", "/dashboard/certificates?serial=7f"),
                ("inventory, page 100", "/dashboard/certificates?status=valid&page=100"),
                ("revocations", "/dashboard/revocations"),
                ("tokens", "/dashboard/tokens"),
                ("audit trail (verifies the whole chain)", "/dashboard/audit"),
            ]
            struct PageResult: Encodable {
                var page: String
                var target: String
                var median_ms, p95_ms, max_ms, cpu_ms: Double
                var bytes: Int
            }
            var results: [PageResult] = []
            for (name, target) in pages {
                var times: [Double] = []
                var bytes = 0
                for _ in 0..<2 { _ = await probe.render(target) }
                let cpuBefore = BenchIssue.cpuSeconds()
                for _ in 0..<repetitions {
                    let started = ContinuousClock.now
                    let answer = await probe.render(target)
                    let elapsed = ContinuousClock.now - started
                    guard answer.status == 200 else { throw CommandFailure("\(target) answered \(answer.status)", exitCode: 1) }
                    bytes = answer.bytes
                    times.append(Double(elapsed.components.seconds) * 1000 + Double(elapsed.components.attoseconds) / 1e15)
                }
                let cpu = (BenchIssue.cpuSeconds() - cpuBefore) / Double(repetitions) * 1000
                times.sort()
                results.append(PageResult(page: name, target: target, median_ms: times[times.count / 2],
                                          p95_ms: times[min(times.count - 1, Int(Double(times.count) * 0.95))], max_ms: times.last!, cpu_ms: cpu, bytes: bytes))
            }
            try await authority.close()
            if json {
                struct Report: Encodable { var inventory_rows: Int; var repetitions: Int; var pages: [PageResult] }
                try printJSON(Report(inventory_rows: rows, repetitions: repetitions, pages: results))
            } else {
                print("dashboard over \(rows) certificates (\(repetitions) renders per page, server time in process):")
                for r in results {
                    print(String(format: "  %@ median %7.1f ms  p95 %7.1f ms  max %7.1f ms  CPU %7.1f ms  %7d bytes", r.page.padding(toLength: 40, withPad: " ", startingAt: 0), r.median_ms, r.p95_ms, r.max_ms, r.cpu_ms, r.bytes))
                }
            }
        } catch {
            try? await authority.close()
            throw error
        }
    }

    /// Issues `count` certificates through the authority, in series of up to three renewals (each renewed at two thirds
    /// of its predecessor's lifetime, `requester` `cert:<serial>`), spread over the last 100 days; one series in 8 stops
    /// renewing (a lapse), one certificate in 50 is revoked.
    static func fill(authority: Authority, count: Int, start: Int, now: Date) async throws -> (issued: Int, revoked: Int, seconds: Double) {
        guard count > 0 else { return (0, 0, 0) }
        let started = ContinuousClock.now
        let workers = min(64, count)
        let totals = try await withThrowingTaskGroup(of: (Int, Int).self) { group in
            for worker in 0..<workers {
                // Each worker issues its quota from series of its own (numbered worker, worker + 64, ...).
                let quota = count / workers + (worker < count % workers ? 1 : 0)
                group.addTask {
                    var issued = 0, revoked = 0
                    var series = start / 3 + worker
                    var previous: (serial: String, at: Date, lifetime: Double)?
                    while issued < quota {
                        let team = String(format: "team-%02d", series % 12)
                        let lifetime = lifetimes[series % lifetimes.count]
                        // One series in 8 lapses: only its first certificate is issued, so it expires alone.
                        let length = series % 8 == 5 ? 1 : 3
                        for position in 0..<length where issued < quota {
                            var at: Date
                            var requester = "bench"
                            if position > 0, let previous {
                                at = previous.at.addingTimeInterval(previous.lifetime * 2 / 3)
                                requester = "cert:\(previous.serial)"
                            } else {
                                at = now.addingTimeInterval(-Double((series &* 7919) % 100) * day - Double(series % 86_400))
                            }
                            if at > now { at = now }
                            let key = try KeyType.p256.generate()
                            let request: IssuanceRequest
                            if series % 5 == 0 {
                                request = IssuanceRequest(profile: .server, publicKey: key.publicKey, dnsNames: ["svc-\(series).\(team).bench.test"], validity: lifetime)
                            } else {
                                request = IssuanceRequest(profile: .workload, publicKey: key.publicKey, uris: ["spiffe://bench.test/\(team)/svc-\(series)"], validity: lifetime)
                            }
                            let record = try await authority.issue(request, owner: series % 25 == 24 ? nil : team, requester: requester, now: at,
                                                                   maximumValidityOverride: .days(90)).record
                            issued += 1
                            previous = (record.serial, at, lifetime.timeInterval)
                            if issued % 50 == 7 {
                                _ = try await authority.revoke(serial: record.serial, reason: .keyCompromise, actor: "bench", now: at.addingTimeInterval(60))
                                revoked += 1
                            }
                        }
                        previous = nil
                        series += workers
                    }
                    return (issued, revoked)
                }
            }
            return try await group.reduce((0, 0)) { ($0.0 + $1.0, $0.1 + $1.1) }
        }
        let elapsed = ContinuousClock.now - started
        return (totals.0, totals.1, Double(elapsed.components.seconds) + Double(elapsed.components.attoseconds) / 1e18)
    }
}
