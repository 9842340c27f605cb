import Foundation
import Logging
@testable import MutualAgent
@testable import MutualClient
import MutualPKI
import Synchronization
import Testing
import TestSupport
import X509

/// A clock that only moves when told, recording every sleep instead of sleeping.
final class ManualClock: AgentClock {
    private let state: Mutex<(now: Date, sleeps: [Date])>
    init(_ start: Date) { state = Mutex((start, [])) }
    var now: Date { state.withLock { $0.now } }
    var sleeps: [Date] { state.withLock { $0.sleeps } }
    func advance(to date: Date) { state.withLock { $0.now = date } }
    func sleep(until deadline: Date) async throws {
        try Task.checkCancellation()
        state.withLock { state in
            state.sleeps.append(deadline)
            if deadline > state.now { state.now = deadline }
        }
    }
}

@Suite("Agent schedule and backoff")
struct ScheduleTests {
    let start = Date(timeIntervalSince1970: 1_800_000_000)

    @Test("renewal at 2/3 of the lifetime, jitter of ±1/20 of the lifetime, never after 95%")
    func renewalTime() {
        let schedule = RenewalSchedule()
        let end = start.addingTimeInterval(3000)
        #expect(schedule.renewalTime(notBefore: start, notAfter: end, unit: 0) == start.addingTimeInterval(2000))
        #expect(schedule.renewalTime(notBefore: start, notAfter: end, unit: 1) == start.addingTimeInterval(2150))
        #expect(schedule.renewalTime(notBefore: start, notAfter: end, unit: -1) == start.addingTimeInterval(1850))
        #expect(schedule.renewalTime(notBefore: start, notAfter: end, unit: 7) == start.addingTimeInterval(2150), "unit is clamped")
        let late = RenewalSchedule(fraction: 0.99)
        #expect(late.renewalTime(notBefore: start, notAfter: end, unit: 1) == start.addingTimeInterval(2850))
        // A fleet issued at the same moment spreads over a window of a tenth of the lifetime.
        let times = stride(from: -1.0, through: 1.0, by: 0.25).map { schedule.renewalTime(notBefore: start, notAfter: end, unit: $0) }
        #expect(Set(times).count == times.count)
    }

    @Test("backoff doubles from 1 s, capped at a tenth of the lifetime and 5 minutes, randomised to 50–100%")
    func backoff() {
        let schedule = RenewalSchedule()
        #expect(schedule.backoff(attempt: 1, lifetime: 86400, unit: 1) == 1)
        #expect(schedule.backoff(attempt: 2, lifetime: 86400, unit: 1) == 2)
        #expect(schedule.backoff(attempt: 5, lifetime: 86400, unit: 1) == 16)
        #expect(schedule.backoff(attempt: 30, lifetime: 86400, unit: 1) == 300)
        #expect(schedule.backoff(attempt: 30, lifetime: 30, unit: 1) == 3, "short lifetimes retry often")
        #expect(schedule.backoff(attempt: 4, lifetime: 86400, unit: 0) == 4, "at least half")
    }

    @Test("root fingerprints: as mutual init prints them, with colons as openssl shows them; anything else refused")
    func fingerprints() throws {
        let hex = String(repeating: "ab", count: 32)
        #expect(try normalizedFingerprint(hex) == hex)
        #expect(try normalizedFingerprint(stride(from: 0, to: 64, by: 2).map { _ in "AB" }.joined(separator: ":")) == hex)
        #expect(try normalizedFingerprint(hex.uppercased()) == hex)
        for bad in ["", "abc", String(repeating: "g", count: 64), hex + "00"] {
            #expect(throws: AgentError.self) { try normalizedFingerprint(bad) }
        }
    }
}

@Suite("Agent decisions with a test clock")
struct AgentDecisionTests {
    static let fingerprint = String(repeating: "00", count: 32)

    /// Delivers a certificate from a test CA into a fresh directory, as an earlier run would have.
    static func delivered(notBefore: Date, notAfter: Date) throws -> (dir: String, leaf: Certificate) {
        let ca = try TestPKI.issuingCA(now: notBefore)
        let key = try KeyType.p256.generate()
        var extensions = Certificate.Extensions()
        try extensions.append(Certificate.Extension(SubjectAlternativeNames([.uniformResourceIdentifier("spiffe://example.org/ns/web/sa/api")]), critical: false))
        try extensions.append(Certificate.Extension(try ExtendedKeyUsage([.clientAuth, .serverAuth]), critical: false))
        let leaf = try TestPKI.certificate(subject: "api", issuer: ca.certificate, issuerKey: ca.privateKey, publicKey: key.publicKey,
                                           notBefore: notBefore, notAfter: notAfter, extensions: extensions)
        let dir = TestPKI.temporaryDirectory("agent")
        try Delivery.deliver(outDir: dir + "/out", key: key, chain: [leaf, ca.certificate], roots: [ca.root])
        return (dir, leaf)
    }

    static func agent(dir: String, clock: ManualClock, token: String? = nil) throws -> Agent {
        // Port 1 on 127.0.0.1: nothing listens, so every call is a real transport failure.
        var configuration = try Agent.Configuration(
            authority: "https://127.0.0.1:1", rootFingerprint: fingerprint, token: token,
            identity: "spiffe://example.org/ns/web/sa/api", outDir: dir + "/out"
        )
        configuration.requestTimeout = .seconds(1)
        return Agent(configuration: configuration, clock: clock, logger: Logger(label: "test"), random: { 0 })
    }

    @Test("not due before 2/3 of the lifetime: the agent sleeps until then, without sleeping for real")
    func notDue() async throws {
        let start = Date()
        let (dir, leaf) = try Self.delivered(notBefore: start, notAfter: start.addingTimeInterval(3000))
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let clock = ManualClock(start.addingTimeInterval(10))
        let agent = try Self.agent(dir: dir, clock: clock)
        // Certificates carry whole seconds: the schedule starts at the certificate's notBefore.
        #expect(await agent.step() == .notDue(until: leaf.notValidBefore.addingTimeInterval(2000)))
        #expect(agent.currentStatus.serial == leaf.serialHex && agent.currentStatus.state == "ok")
    }

    @Test("due with the authority down: retries with capped exponential backoff, keeps the files, status says why")
    func backoffWhenDown() async throws {
        let start = Date()
        let (dir, leaf) = try Self.delivered(notBefore: start, notAfter: start.addingTimeInterval(3000))
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let clock = ManualClock(start.addingTimeInterval(2100))
        let agent = try Self.agent(dir: dir, clock: clock)
        var delays: [TimeInterval] = []
        for _ in 0..<4 {
            let before = clock.now
            guard case .failed(let reason, let retryAt) = await agent.step() else {
                Issue.record("expected a failure")
                return
            }
            #expect(reason.contains("unreachable") || reason.contains("failed"))
            delays.append(retryAt.timeIntervalSince(before))
            clock.advance(to: retryAt)
        }
        // random() is 0 → unit 0 → half of 1, 2, 4, 8 s.
        #expect(delays.map { ($0 * 10).rounded() / 10 } == [0.5, 1, 2, 4])
        let status = AgentStatus.read(outDir: dir + "/out")
        #expect(status?.state == "retrying" && status?.consecutiveFailures == 4 && status?.lastError != nil)
        #expect(try Delivery.read(outDir: dir + "/out")?.leaf.serialHex == leaf.serialHex, "the current certificate is kept")
    }

    @Test("after expiry the agent goes to renew-expired; refusals there stop it and say a new token is needed")
    func afterExpiry() async throws {
        let start = Date().addingTimeInterval(-7200)
        let (dir, _) = try Self.delivered(notBefore: start, notAfter: start.addingTimeInterval(3600))
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let clock = ManualClock(Date())
        let agent = try Self.agent(dir: dir, clock: clock)
        guard case .failed = await agent.step() else {
            Issue.record("an unreachable authority is retried, even after expiry")
            return
        }
        let refusal = AuthorityClientError(status: 403, type: "urn:mutual:problem:renew-expired-disabled", detail: "words for people", serverDate: nil)
        let verdict = agent.classify(refusal, what: "renewal after expiry")
        #expect(verdict.kind == .fatal && verdict.code == "renew-expired-disabled" && !verdict.expiredMeanwhile)
    }

    @Test("a revoked certificate stops renewal; transport errors and 5xx are retried; other refusals stop")
    func classification() throws {
        let clock = ManualClock(Date())
        let agent = try Self.agent(dir: TestPKI.temporaryDirectory("agent"), clock: clock)
        func problem(_ status: Int, _ code: String, _ detail: String = "words for people") -> AuthorityClientError {
            AuthorityClientError(status: status, type: "urn:mutual:problem:\(code)", detail: detail, serverDate: nil)
        }
        let revoked = agent.classify(problem(403, "certificate-revoked"), what: "renewal")
        #expect(revoked.kind == .fatal && revoked.code == "certificate-revoked" && !revoked.expiredMeanwhile)
        #expect(agent.classify(AuthorityClientError(status: 0, type: "transport", detail: "refused", serverDate: nil), what: "renewal").kind == .transient)
        #expect(agent.classify(problem(503, "store-unavailable"), what: "renewal").kind == .transient)
        #expect(agent.classify(problem(401, "token-used-up"), what: "enrollment").kind == .fatal)
        // Expired between the agent's check and the authority's: not fatal, renew-expired comes next.
        let lapsed = agent.classify(problem(403, "certificate-expired"), what: "renewal")
        #expect(lapsed.kind == .transient && lapsed.expiredMeanwhile)
        #expect(agent.classify(problem(403, "certificate-expired"), what: "renewal after expiry").kind == .fatal, "refused after expiry too: a new token is needed")
        #expect(!agent.classify(problem(403, "certificate-expired"), what: "renewal after expiry").expiredMeanwhile)
        // Clocks are never a reason to stop.
        for code in ["clock-skew", "certificate-not-yet-valid"] {
            for what in ["enrollment", "renewal", "renewal after expiry"] {
                #expect(agent.classify(problem(403, code), what: what).kind == .transient, "\(code) during \(what)")
            }
        }
        // The authority's TLS layer said "certificate expired" while our clock has it valid: renew-expired at once.
        let alert = AuthorityClientError(status: 0, type: "transport", detail: "handshakeFailed(sslError([Error: 268436501 error:10000415:SSL routines:OPENSSL_internal:SSLV3_ALERT_CERTIFICATE_EXPIRED]))", serverDate: nil)
        #expect(alert.tlsReason == "sslv3_alert_certificate_expired")
        #expect(agent.classify(alert, what: "renewal").expiredMeanwhile && agent.classify(alert, what: "renewal").kind == .transient)
        #expect(!agent.classify(alert, what: "enrollment").expiredMeanwhile, "only a renewal presents the certificate")
    }

    @Test("the agent decides on codes only: the same code with any wording gives the same decision, and words from another refusal change nothing")
    func codesNotText() throws {
        let agent = try Self.agent(dir: TestPKI.temporaryDirectory("agent"), clock: ManualClock(Date()))
        // Details that mention other refusals' wording, or nothing at all.
        let details = ["", "zzz", "the client certificate ab is revoked (keyCompromise)", "the client certificate ab expired at 2026-11-23T09:32:37.000Z",
                       "within 5 minutes of the authority's clock", "a new token is needed; a new token is needed"]
        let codes = ["certificate-revoked", "certificate-expired", "certificate-not-yet-valid", "certificate-unknown", "clock-skew",
                     "token-used-up", "token-expired", "proof-invalid", "proof-replayed", "beyond-grace", "renew-expired-disabled", "forbidden"]
        for what in ["enrollment", "renewal", "renewal after expiry"] {
            for code in codes {
                let verdicts = details.map { detail in
                    agent.classify(AuthorityClientError(status: 403, type: "urn:mutual:problem:\(code)", detail: detail, serverDate: nil), what: what)
                }
                let first = verdicts[0]
                for verdict in verdicts {
                    #expect(verdict.kind == first.kind && verdict.expiredMeanwhile == first.expiredMeanwhile && verdict.code == code,
                            "\(code) during \(what): the decision changed with the wording")
                }
            }
        }
        // A refusal whose words say "revoked" but whose code does not is not taken as a revocation.
        let misleading = agent.classify(AuthorityClientError(status: 403, type: "urn:mutual:problem:clock-skew", detail: "is revoked", serverDate: nil), what: "renewal")
        #expect(misleading.kind == .transient && misleading.code == "clock-skew")
    }

    @Test("no files and no token: stopped with a clear message; unreadable files are not silently replaced")
    func noToken() async throws {
        let dir = TestPKI.temporaryDirectory("agent")
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let agent = try Self.agent(dir: dir, clock: ManualClock(Date()))
        guard case .stopped(let reason) = await agent.step() else {
            Issue.record("expected stop")
            return
        }
        #expect(reason.contains("no --token"))
        try FileManager.default.createDirectory(atPath: dir + "/out", withIntermediateDirectories: true)
        try "garbage".write(toFile: dir + "/out/key.pem", atomically: true, encoding: .utf8)
        guard case .stopped(let unreadable) = await agent.step() else {
            Issue.record("expected stop on garbage files")
            return
        }
        #expect(unreadable.contains("unreadable"))
    }

    @Test("delivery publishes by one rename: links point through current/, previous version kept, older removed")
    func delivery() throws {
        let (dir, first) = try Self.delivered(notBefore: Date(), notAfter: Date().addingTimeInterval(600))
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let out = dir + "/out"
        #expect(try FileManager.default.destinationOfSymbolicLink(atPath: out + "/cert.pem") == "current/cert.pem")
        let ca = try TestPKI.issuingCA()
        var last = first
        for _ in 0..<3 {
            let key = try KeyType.p256.generate()
            let leaf = try ca.issue(.init(profile: .workload, publicKey: key.publicKey, uris: ["spiffe://example.org/x"]), now: Date())
            try Delivery.deliver(outDir: out, key: key, chain: [leaf, ca.certificate], roots: [ca.root])
            last = leaf
        }
        #expect(try Delivery.read(outDir: out)?.leaf.serialHex == last.serialHex)
        let generations = try FileManager.default.contentsOfDirectory(atPath: out).filter { $0.hasPrefix(".gen-") }
        #expect(generations.count == 2)
        let attributes = try FileManager.default.attributesOfItem(atPath: out + "/current/key.pem")
        #expect((attributes[.posixPermissions] as? Int) == 0o600)
    }
}
