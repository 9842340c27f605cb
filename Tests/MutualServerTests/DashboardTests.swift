import Crypto
import Foundation
import Logging
import MutualAuthority
import MutualPKI
@testable import MutualServer
import MutualStore
import Synchronization
import Testing
import TestSupport
import X509

/// A dashboard over a real authority (SQLite in a temporary directory), driven without sockets, with a clock the test
/// moves. The browser-level proof (Chromium, real TLS) is scripts/interop-dashboard.sh.
final class DashboardFixture: Sendable {
    let dir: String
    let authority: Authority
    let service: DashboardService
    let clock = ClockBox()

    static let t0 = Date(timeIntervalSince1970: 1_800_000_000)

    init() async throws {
        dir = TestPKI.temporaryDirectory("dashboard")
        let state = StateDirectory(path: dir + "/state")
        _ = try await Authority.initialize(state: state, name: "Dashboard Test", keyType: .p256, constraints: .init(), passphrase: nil, actor: "test")
        authority = try await Authority.open(state: state)
        var logger = Logger(label: "test.dashboard")
        logger.logLevel = .critical
        let box = clock
        service = DashboardService(authority: authority, publisher: RevocationPublisher(authority: authority), metrics: nil, logger: logger,
                                   now: { box.now })
    }

    final class ClockBox: Sendable {
        let clock = Mutex(DashboardFixture.t0)
        var now: Date { clock.withLock { $0 } }
    }

    var now: Date { clock.now }
    func advance(_ seconds: TimeInterval) { clock.clock.withLock { $0 = $0.addingTimeInterval(seconds) } }

    func close() async {
        try? await authority.close()
        try? FileManager.default.removeItem(atPath: dir)
    }

    func get(_ target: String, cookie: String? = nil, peer: Certificate? = nil) async -> DashboardResponse {
        let (path, query) = Self.split(target)
        var headers = ["host": "ca.test:9443"]
        if let cookie { headers["cookie"] = "\(DashboardService.cookieName)=\(cookie)" }
        return await service.handle(DashboardRequest(method: "GET", path: path, query: query, headers: headers, peerCertificate: peer.map { .classical($0) }))
    }

    func post(_ target: String, form: String, cookie: String?, headers extra: [String: String] = [:], peer: Certificate? = nil) async -> DashboardResponse {
        var headers = ["host": "ca.test:9443", "content-type": "application/x-www-form-urlencoded", "origin": "https://ca.test:9443",
                       "sec-fetch-site": "same-origin"]
        if let cookie { headers["cookie"] = "\(DashboardService.cookieName)=\(cookie)" }
        headers.merge(extra) { $1 }
        return await service.handle(DashboardRequest(method: "POST", path: target, headers: headers, body: Array(form.utf8), peerCertificate: peer.map { .classical($0) }))
    }

    static func split(_ target: String) -> (String, [String: String]) {
        guard let mark = target.firstIndex(of: "?") else { return (target, [:]) }
        return (String(target[..<mark]), DashboardService.urlEncoded(String(target[target.index(after: mark)...])) ?? [:])
    }

    /// Makes a login code as the CLI does and redeems it; returns the session cookie and the page's anti-forgery token.
    func login(readOnly: Bool = false, name: String = "alice") async throws -> (cookie: String, csrf: String) {
        let code = try await authority.createDashboardLogin(name: name, readOnly: readOnly, ttl: .minutes(15), session: .hours(1), actor: "cli:test", now: now)
        let answer = await get("/dashboard/login?code=\(code.code)")
        #expect(answer.status == 303)
        let setCookie = try #require(answer.header("Set-Cookie"))
        let cookie = String(setCookie.split(separator: ";")[0].split(separator: "=", maxSplits: 1)[1])
        let page = await get("/dashboard/", cookie: cookie)
        #expect(page.status == 200)
        return (cookie, try #require(Self.csrf(in: page.text)))
    }

    static func csrf(in html: String) -> String? {
        guard let range = html.range(of: "name=\"csrf\" value=\"") else { return nil }
        return String(html[range.upperBound...].prefix { $0 != "\"" })
    }

    /// Issues a real certificate at the fixture's time.
    @discardableResult
    func issue(cn: String? = nil, dns: [String] = [], uris: [String] = [], profile: CertificateProfile = .workload, owner: String?,
               validity: ValidityDuration = .hours(24), requester: String = "cli:test") async throws -> CertificateRecord {
        let key = P256.Signing.PrivateKey()
        // A workload certificate needs its SPIFFE ID: a unique one unless the test names it.
        let uris = profile == .workload && uris.isEmpty ? ["spiffe://example.org/test/\(UUID().uuidString.lowercased())"] : uris
        return try await authority.issue(
            IssuanceRequest(profile: profile, publicKey: .init(key.publicKey), commonName: cn, dnsNames: dns, uris: uris, validity: validity),
            owner: owner, requester: requester, now: now
        ).record
    }
}

@Suite("dashboard: pages, sign-in, sessions and actions (in memory, injected clock)")
struct DashboardTests {
    @Test("a login link signs in once: then the code is refused as used; an unknown or expired code is refused by code; all audited")
    func loginCodes() async throws {
        let f = try await DashboardFixture()
        defer { Task { await f.close() } }
        let code = try await f.authority.createDashboardLogin(name: "alice", readOnly: false, ttl: .minutes(15), session: .hours(1), actor: "cli:test", now: f.now)
        let first = await f.get("/dashboard/login?code=\(code.code)")
        #expect(first.status == 303)
        #expect(first.header("Location") == "/dashboard/")
        let cookie = try #require(first.header("Set-Cookie"))
        for attribute in ["HttpOnly", "Secure", "SameSite=Strict", "Path=/", "Max-Age=3600"] {
            #expect(cookie.contains(attribute), "cookie attribute \(attribute)")
        }
        #expect(cookie.hasPrefix("__Host-mutual-dashboard="))
        #expect(!cookie.contains(code.code))

        let again = await f.get("/dashboard/login?code=\(code.code)")
        #expect(again.status == 401)
        #expect(again.problemCode == "login-used")
        #expect(again.header("Set-Cookie") == nil)

        let unknown = await f.get("/dashboard/login?code=mdl_notacode")
        #expect(unknown.problemCode == "login-unknown")
        let huge = await f.get("/dashboard/login?code=" + String(repeating: "A", count: 5000))
        #expect(huge.problemCode == "login-unknown")

        let late = try await f.authority.createDashboardLogin(name: "bob", readOnly: true, ttl: .minutes(15), session: .hours(1), actor: "cli:test", now: f.now)
        f.advance(15 * 60 + 1)
        let expired = await f.get("/dashboard/login?code=\(late.code)")
        #expect(expired.problemCode == "login-expired")
        #expect(expired.status == 401)
        #expect(expired.text.contains("data-problem=\"login-expired\""))

        let events = try await f.authority.store.auditEvents()
        #expect(events.filter { $0.action == "dashboard-login-create" }.count == 2)
        #expect(events.filter { $0.action == "dashboard-login" && $0.actor == "dashboard:alice" }.count == 1)
        let refused = events.filter { $0.action == "dashboard-login-refused" }
        // A real code used twice or late is audited; a guess is not (a stranger must not cost a durable write each).
        #expect(refused.map(\.details).sorted() == [#"{"code":"login-expired"}"#, #"{"code":"login-used"}"#])
        let wellFormedGuess = await f.get("/dashboard/login?code=mdl_" + String(repeating: "A", count: 43))
        #expect(wellFormedGuess.problemCode == "login-unknown")
        #expect(try await f.authority.store.auditEvents().filter { $0.action == "dashboard-login-refused" }.count == 2)
        // No event carries the code itself.
        #expect(!events.contains { $0.details.contains(code.code) || $0.subject.contains(code.code) })
        if case .broken = try await f.authority.store.verifyAudit() { Issue.record("audit chain broken") }
    }

    @Test("login codes: bad names and lifetimes are refused before anything is stored")
    func loginCodeInput() async throws {
        let f = try await DashboardFixture()
        defer { Task { await f.close() } }
        for name in ["", "a b", "<script>", String(repeating: "x", count: 65), "name\n"] {
            await #expect(throws: AuthorityError.self) {
                _ = try await f.authority.createDashboardLogin(name: name, readOnly: false, ttl: .minutes(15), session: .hours(1), actor: "t")
            }
        }
        for (ttl, session) in [(ValidityDuration.seconds(30), ValidityDuration.hours(1)), (.days(2), .hours(1)), (.minutes(5), .hours(13)), (.minutes(5), .seconds(1))] {
            await #expect(throws: PKIError.self) {
                _ = try await f.authority.createDashboardLogin(name: "a", readOnly: false, ttl: ttl, session: session, actor: "t")
            }
        }
        #expect(try await f.authority.store.auditEvents().filter { $0.action == "dashboard-login-create" }.isEmpty)
    }

    @Test("sessions: no cookie, a forged or expired cookie, and a logged-out cookie all need a login; a restart forgets every session")
    func sessions() async throws {
        let f = try await DashboardFixture()
        defer { Task { await f.close() } }
        for page in ["/dashboard/", "/dashboard/certificates", "/dashboard/audit", "/dashboard/tokens", "/dashboard/revocations", "/dashboard/certificates/01"] {
            let answer = await f.get(page)
            #expect(answer.status == 401, "\(page)")
            #expect(answer.problemCode == "login-required", "\(page)")
        }
        #expect(await f.get("/dashboard/", cookie: "forged").problemCode == "login-required")
        #expect(await f.service.handle(DashboardRequest(method: "GET", path: "/dashboard/", headers: ["cookie": String(repeating: ";=", count: 10_000)])).problemCode == "login-required")

        let (cookie, csrf) = try await f.login()
        #expect(await f.get("/dashboard/", cookie: cookie).status == 200)
        f.advance(3600 + 1)
        #expect(await f.get("/dashboard/", cookie: cookie).problemCode == "login-required")

        let (second, secondCSRF) = try await f.login()
        let wrongToken = await f.post("/dashboard/logout", form: "csrf=\(csrf)", cookie: second)
        #expect(wrongToken.problemCode == "csrf-token-invalid")
        let out = await f.post("/dashboard/logout", form: "csrf=\(secondCSRF)", cookie: second)
        #expect(out.status == 303)
        #expect(out.header("Set-Cookie")?.contains("Max-Age=0") == true)
        #expect(await f.get("/dashboard/", cookie: second).problemCode == "login-required")
        #expect(try await f.authority.store.auditEvents().contains { $0.action == "dashboard-logout" && $0.actor == "dashboard:alice" })

        // A new service on the same database (a restarted authority) knows no session.
        let (third, _) = try await f.login()
        let restarted = DashboardService(authority: f.authority, publisher: RevocationPublisher(authority: f.authority), metrics: nil, logger: Logger(label: "t"), now: { DashboardFixture.t0.addingTimeInterval(3602) })
        #expect(await restarted.handle(DashboardRequest(method: "GET", path: "/dashboard/", headers: ["cookie": "\(DashboardService.cookieName)=\(third)"])).problemCode == "login-required")
    }

    @Test("revoke: confirmation page, then POST with the token revokes through the authority, audited with the dashboard actor")
    func revoke() async throws {
        let f = try await DashboardFixture()
        defer { Task { await f.close() } }
        let record = try await f.issue(uris: ["spiffe://example.org/ns/web/api"], owner: "web")
        let (cookie, csrf) = try await f.login()
        let confirm = await f.get("/dashboard/certificates/\(record.serial)/revoke", cookie: cookie)
        #expect(confirm.status == 200)
        #expect(DashboardFixture.csrf(in: confirm.text) == csrf)
        #expect(confirm.text.contains("<label for=\"reason\">"))

        let done = await f.post("/dashboard/certificates/\(record.serial)/revoke", form: "csrf=\(csrf)&reason=keyCompromise", cookie: cookie)
        #expect(done.status == 303)
        #expect(done.header("Location") == "/dashboard/certificates/\(record.serial)?done=revoked")
        let stored = try #require(try await f.authority.store.certificate(serial: record.serial))
        #expect(stored.status == .revoked)
        #expect(stored.revocationReason == "keyCompromise")
        let event = try #require(try await f.authority.store.auditEvents(subject: record.serial).last)
        #expect(event.action == "revoke")
        #expect(event.actor == "dashboard:alice")
        // The CLI's path publishes a CRL too.
        #expect(try await f.authority.store.latestCRL() != nil)

        let page = await f.get("/dashboard/revocations", cookie: cookie)
        #expect(page.text.contains(record.serial.prefix(16)))
        #expect(page.text.contains("keyCompromise"))
        #expect(page.text.contains("dashboard:alice"))
        let audit = await f.get("/dashboard/audit", cookie: cookie)
        #expect(audit.text.contains("data-audit=\"intact\""))
        #expect(audit.text.contains("dashboard:alice"))

        let twice = await f.post("/dashboard/certificates/\(record.serial)/revoke", form: "csrf=\(csrf)&reason=keyCompromise", cookie: cookie)
        #expect(twice.status == 409)
        #expect(twice.problemCode == "conflict")
        let badReason = await f.post("/dashboard/certificates/\(try await f.issue(owner: nil).serial)/revoke", form: "csrf=\(csrf)&reason=%3Cscript%3E", cookie: cookie)
        #expect(badReason.problemCode == "unknown-reason")
        #expect(!badReason.text.contains("<script>"))
    }

    @Test("forgery: a POST without the token, with another session's token, from another origin or another site is refused and revokes nothing")
    func forgery() async throws {
        let f = try await DashboardFixture()
        defer { Task { await f.close() } }
        let record = try await f.issue(owner: "web")
        let (cookie, csrf) = try await f.login()
        let (_, otherCSRF) = try await f.login(name: "mallory")
        let path = "/dashboard/certificates/\(record.serial)/revoke"
        let cases: [(String, [String: String], String)] = [
            ("reason=keyCompromise", [:], "csrf-token-invalid"),
            ("csrf=\(otherCSRF)&reason=keyCompromise", [:], "csrf-token-invalid"),
            ("csrf=&reason=keyCompromise", [:], "csrf-token-invalid"),
            ("csrf=\(csrf)&reason=keyCompromise", ["origin": "https://evil.example"], "cross-site-request"),
            ("csrf=\(csrf)&reason=keyCompromise", ["origin": "null"], "cross-site-request"),
            ("csrf=\(csrf)&reason=keyCompromise", ["sec-fetch-site": "cross-site"], "cross-site-request"),
            ("csrf=\(csrf)&reason=keyCompromise", ["sec-fetch-site": "same-site"], "cross-site-request"),
            ("csrf=\(csrf)&reason=keyCompromise", ["content-type": "text/plain"], "unsupported-media-type"),
            ("csrf=%ZZ&reason=keyCompromise", [:], "malformed-form"),
            ("csrf=\(csrf)&pad=" + String(repeating: "a", count: 20_000), [:], "body-too-large"),
        ]
        for (form, headers, code) in cases {
            let answer = await f.post(path, form: form, cookie: cookie, headers: headers)
            #expect(answer.problemCode == code, "\(headers) \(form.prefix(40))")
            #expect(answer.status >= 400)
        }
        // Without the cookie (what SameSite=Strict leaves a cross-site form with), the login is what is missing.
        #expect(await f.post(path, form: "csrf=\(csrf)&reason=keyCompromise", cookie: nil).problemCode == "login-required")
        #expect(try await f.authority.store.certificate(serial: record.serial)?.status == .valid)
    }

    @Test("read-only sessions see everything and can do nothing: no action links, confirmation and POST refused")
    func readOnly() async throws {
        let f = try await DashboardFixture()
        defer { Task { await f.close() } }
        let record = try await f.issue(owner: "web")
        let token = try await TokenService(store: f.authority.store).create(scopes: ["*.example.org"], profile: .server, maxValidity: .hours(24), ttl: .hours(1), uses: 1, owner: "web", actor: "t", caMaximum: .days(30), now: f.now)
        let (cookie, csrf) = try await f.login(readOnly: true, name: "auditor")
        let page = await f.get("/dashboard/certificates/\(record.serial)", cookie: cookie)
        #expect(page.status == 200)
        #expect(!page.text.contains("/revoke\""))
        #expect(page.text.contains("(read-only)"))
        #expect(!(await f.get("/dashboard/tokens", cookie: cookie)).text.contains("/disable\""))
        #expect(await f.get("/dashboard/certificates/\(record.serial)/revoke", cookie: cookie).problemCode == "read-only-session")
        let post = await f.post("/dashboard/certificates/\(record.serial)/revoke", form: "csrf=\(csrf)&reason=keyCompromise", cookie: cookie)
        #expect(post.status == 403)
        #expect(post.problemCode == "read-only-session")
        #expect(await f.post("/dashboard/tokens/\(token.record.id)/disable", form: "csrf=\(csrf)", cookie: cookie).problemCode == "read-only-session")
        #expect(try await f.authority.store.certificate(serial: record.serial)?.status == .valid)
        #expect(try await f.authority.store.token(id: token.record.id)?.revokedAt == nil)
    }

    @Test("tokens: listed without secrets; disabling goes through the token service and the audit trail")
    func tokens() async throws {
        let f = try await DashboardFixture()
        defer { Task { await f.close() } }
        let token = try await TokenService(store: f.authority.store).create(scopes: ["*.example.org"], profile: .server, maxValidity: .hours(24), ttl: .hours(1), uses: 3, owner: "web", actor: "t", caMaximum: .days(30), now: f.now)
        let (cookie, csrf) = try await f.login()
        let list = await f.get("/dashboard/tokens", cookie: cookie)
        #expect(list.text.contains(token.record.id))
        #expect(list.text.contains("3 of 3"))
        #expect(!list.text.contains(token.token))
        #expect(!list.text.contains(token.record.secretHash))
        #expect(await f.get("/dashboard/tokens/\(token.record.id)/disable", cookie: cookie).status == 200)
        let done = await f.post("/dashboard/tokens/\(token.record.id)/disable", form: "csrf=\(csrf)", cookie: cookie)
        #expect(done.status == 303)
        #expect(try await f.authority.store.token(id: token.record.id)?.revokedAt != nil)
        #expect(try await f.authority.store.auditEvents(subject: "token:\(token.record.id)").last?.actor == "dashboard:alice")
        #expect(await f.get("/dashboard/tokens/nope/disable", cookie: cookie).problemCode == "not-found")
    }

    @Test("markup in a CN, SANs, owner or a filter renders as text, never as elements or attributes")
    func escaping() async throws {
        let f = try await DashboardFixture()
        defer { Task { await f.close() } }
        let hostile = #"<script>alert(1)</script>"# 
        let real = try await f.issue(cn: hostile + #"" onmouseover="x"#, profile: .client, owner: #"team"><img src=x onerror=alert(2)>"#)
        // A record as another tool might have stored it: markup in every text column.
        var stored = real
        stored.serial = "aa" + String(real.serial.dropFirst(2))
        stored.fingerprint = String(repeating: "b", count: 64)
        stored.identity = #"spiffe://example.org/"><script>alert(3)</script>"#
        stored.subjectAlternativeNames = [#"uri:spiffe://example.org/'><svg onload=alert(4)>"#, "dns:<b>x</b>"]
        stored.issuer = "<iframe src=//evil>"
        stored.profile = "<style>"
        try await f.authority.store.recordIssuance(stored, audit: AuditEntry(time: f.now, actor: "<script>actor</script>", action: "issue", subject: stored.serial, details: ["x": "<script>"]))
        let (cookie, _) = try await f.login()
        let pages = [
            "/dashboard/", "/dashboard/certificates", "/dashboard/certificates/\(real.serial)", "/dashboard/certificates/\(stored.serial)",
            "/dashboard/audit", "/dashboard/certificates?identity=%3Cscript%3Ealert(5)%3C/script%3E&owner=%22%3E%3Cb%3E",
        ]
        for page in pages {
            let html = await f.get(page, cookie: cookie).text
            for raw in ["<script", "<img", "<svg onload", "<iframe", "<b>", "onmouseover=\"", "<style>"] {
                #expect(!html.contains(raw), "\(page) contains \(raw)")
            }
        }
        let detail = await f.get("/dashboard/certificates/\(stored.serial)", cookie: cookie).text
        #expect(detail.contains("&lt;svg onload=alert(4)&gt;"))
        #expect(detail.contains("&#39;"))
    }

    @Test("every page carries the security headers: a CSP without inline script, no framing, no referrer to other sites, no caching")
    func securityHeaders() async throws {
        let f = try await DashboardFixture()
        defer { Task { await f.close() } }
        let record = try await f.issue(owner: "web")
        let (cookie, _) = try await f.login()
        for page in ["/dashboard/", "/dashboard/certificates", "/dashboard/certificates/\(record.serial)", "/dashboard/revocations",
                     "/dashboard/tokens", "/dashboard/audit", "/dashboard/nope", "/dashboard/login"] {
            let answer = await f.get(page, cookie: cookie)
            let csp = try #require(answer.header("Content-Security-Policy"), "\(page)")
            #expect(csp.contains("frame-ancestors 'none'"))
            #expect(csp.contains("default-src 'none'"))
            #expect(!csp.contains("unsafe-inline"))
            #expect(!csp.contains("script-src"))
            #expect(answer.header("X-Frame-Options") == "DENY")
            #expect(answer.header("Referrer-Policy") == "same-origin")
            #expect(answer.header("Cache-Control") == "no-store")
            #expect(answer.header("X-Content-Type-Options") == "nosniff")
            #expect(answer.header("Server-Timing")?.hasPrefix("app;dur=") == true)
            #expect(!answer.text.contains("<script"), "\(page) has a script element")
        }
        #expect(await f.get("/dashboard/nope", cookie: cookie).problemCode == "not-found")
        let css = await f.get("/dashboard/static/style.css")
        #expect(css.status == 200)
        #expect(css.header("Content-Type")?.hasPrefix("text/css") == true)
    }

    @Test("overview: the CAs with their rotation stages (prepared, active, previous) and the valid certificates each issuing CA has out")
    func overviewShowsRotation() async throws {
        let f = try await DashboardFixture()
        defer { Task { await f.close() } }
        _ = try await f.authority.prepareRotation(.intermediate, passphrase: { nil }, actor: "test")
        let (cookie, _) = try await f.login()
        var page = await f.get("/dashboard/", cookie: cookie)
        #expect(page.text.contains("<td>Issuing g2</td><td>prepared</td>"))
        #expect(page.text.contains("<td>Issuing g1</td><td>active</td>"))
        _ = try await f.authority.activateRotation(.intermediate, passphrase: { nil }, actor: "test")
        page = await f.get("/dashboard/", cookie: cookie)
        #expect(page.text.contains("<td>Issuing g2</td><td>active</td>"))
        #expect(page.text.contains("<td>Issuing g1</td><td>previous</td>"))
        #expect(page.text.contains("<td>Root r1</td><td>active</td>"))
    }

    @Test("overview: status counts, the 90-day timeline, owners and profiles, issuance per day and missed renewals, computed in SQL")
    func overview() async throws {
        let f = try await DashboardFixture()
        defer { Task { await f.close() } }
        let base = try await f.authority.store.overview(now: f.now)
        // Issued now: 2 days (web), 10 days (web), 60 days (db), 400 days (db, beyond the timeline).
        try await f.issue(dns: ["a.example.org"], profile: .server, owner: "web", validity: .days(2))
        try await f.issue(dns: ["b.example.org"], profile: .server, owner: "web", validity: .days(10))
        try await f.issue(uris: ["spiffe://example.org/db"], owner: "db", validity: .days(60))
        let renewedLater = try await f.issue(uris: ["spiffe://example.org/db2"], owner: "db", validity: .days(90))
        let revoked = try await f.issue(uris: ["spiffe://example.org/gone"], owner: "db", validity: .days(5))
        _ = try await f.authority.revoke(serial: revoked.serial, reason: .keyCompromise, actor: "t", now: f.now)
        f.advance(70 * 86_400)
        // 70 days later: the 2-, 10- and 60-day ones expired with no successor; the 90-day one is past 2/3 (60 d) with
        // none yet: a missed renewal. Renew-like successor for a fresh one:
        let fresh = try await f.issue(uris: ["spiffe://example.org/web"], owner: "web", validity: .days(30))
        try await f.issue(uris: ["spiffe://example.org/web"], owner: "web", validity: .days(30), requester: "cert:\(fresh.serial)")
        let o = try await f.authority.store.overview(now: f.now)
        #expect(o.revoked == base.revoked + 1)
        #expect(o.expired - base.expired >= 3)
        #expect(o.missedRenewals >= 1)
        #expect(o.missedRenewalSample.contains { $0.serial == renewedLater.serial })
        #expect(!o.missedRenewalSample.contains { $0.serial == fresh.serial })
        #expect(o.expiriesPerDay.count == 90)
        // The 90-day certificate expires 20 days from now; the two 30-day ones in 30 days (bucket 29 or 30).
        #expect(o.expiriesPerDay[19] + o.expiriesPerDay[20] >= 1)
        #expect(o.expiringIn30Days >= 3)
        #expect(o.expiringIn7Days == o.expiriesPerDay.prefix(7).reduce(0, +))
        #expect(o.byOwner.first { $0.owner == "web" }?.count == 2)
        #expect(o.byOwner.first { $0.owner == "db" }?.count == 1)
        #expect(o.issuedPerDay.count == 30)
        #expect(o.issuedPerDay.last! >= 2)

        let (cookie, _) = try await f.login()
        let page = await f.get("/dashboard/", cookie: cookie)
        #expect(page.status == 200)
        #expect(page.text.contains("<svg class=\"chart\""))
        #expect(page.text.contains("data-count=\"revoked\">\(o.revoked)<"))
        #expect(page.text.contains(renewedLater.serial.prefix(16)))
    }

    @Test("inventory: filters by identity, owner, serial prefix, status, profile and issuer; pages; bad filters refused by code")
    func inventory() async throws {
        let f = try await DashboardFixture()
        defer { Task { await f.close() } }
        var web: [CertificateRecord] = []
        for index in 0..<55 {
            web.append(try await f.issue(uris: ["spiffe://example.org/ns/web/\(index)"], owner: "web", validity: .hours(Int64(100 + index))))
        }
        let db = try await f.issue(dns: ["db.example.org"], profile: .server, owner: "db")
        let (cookie, _) = try await f.login()
        let first = await f.get("/dashboard/certificates?identity=spiffe://example.org/ns/web/*", cookie: cookie)
        #expect(first.status == 200)
        #expect(first.text.contains("rel=\"next\""))
        #expect(first.text.contains(web[0].serial.prefix(16)))
        #expect(!first.text.contains(web[54].serial.prefix(16)))
        let second = await f.get("/dashboard/certificates?identity=spiffe://example.org/ns/web/*&page=2", cookie: cookie)
        #expect(second.text.contains(web[54].serial.prefix(16)))
        #expect(!second.text.contains("rel=\"next\""))
        let latest = await f.get("/dashboard/certificates?owner=web&order=-expiry", cookie: cookie)
        #expect(latest.text.range(of: web[54].serial.prefix(16))!.lowerBound < latest.text.range(of: web[53].serial.prefix(16))!.lowerBound)
        let byOwner = await f.get("/dashboard/certificates?owner=db", cookie: cookie)
        #expect(byOwner.text.contains(db.serial.prefix(16)))
        #expect(!byOwner.text.contains(web[0].serial.prefix(16)))
        let bySerial = await f.get("/dashboard/certificates?serial=\(db.serial.prefix(10).uppercased())", cookie: cookie)
        #expect(bySerial.text.contains(db.serial.prefix(16)))
        #expect(!bySerial.text.contains(web[0].serial.prefix(16)))
        let byProfile = await f.get("/dashboard/certificates?profile=server&status=valid", cookie: cookie)
        #expect(byProfile.text.contains(db.serial.prefix(16)))
        let byIssuer = await f.get("/dashboard/certificates?issuer=\(HTML.query(db.issuer))&identity=db.example.org", cookie: cookie)
        #expect(byIssuer.text.contains(db.serial.prefix(16)))
        let none = await f.get("/dashboard/certificates?issuer=CN%3Dnobody", cookie: cookie)
        #expect(!none.text.contains("<tbody>"))
        for bad in ["status=bogus", "serial=xyz", "page=0", "page=abc", "order=sideways", "expiring=forever", "owner=" + String(repeating: "a", count: 600)] {
            let answer = await f.get("/dashboard/certificates?\(bad)", cookie: cookie)
            #expect(answer.status == 400, "\(bad.prefix(30))")
            #expect(answer.problemCode == "bad-filter", "\(bad.prefix(30))")
        }
        let pem = await f.get("/dashboard/certificates/\(db.serial)/pem", cookie: cookie)
        #expect(pem.header("Content-Type") == "application/x-pem-file")
        #expect(try PEMBundle.certificates(fromPEM: pem.text).first.map(Authority.fingerprint) == db.fingerprint)
        for garbage in ["/dashboard/certificates/zz", "/dashboard/certificates/%00", "/dashboard/certificates/" + String(repeating: "a", count: 100), "/dashboard/certificates/abcdef"] {
            #expect(await f.get(garbage, cookie: cookie).problemCode == "not-found", "\(garbage.prefix(40))")
        }
    }

    @Test("metric labels come from a fixed set, never from the request's path")
    func metricLabels() {
        let cases: [(String, String)] = [
            ("/dashboard/", "overview"), ("/dashboard/certificates", "inventory"), ("/dashboard/certificates/ab12", "certificate"),
            ("/dashboard/certificates/ab12/pem", "pem"), ("/dashboard/certificates/ab12/revoke", "revoke"),
            ("/dashboard/certificates/ab12/\(UUID().uuidString)", "unknown"), ("/dashboard/tokens/x/disable", "disable"),
            ("/dashboard/tokens/x/\(UUID().uuidString)", "unknown"), ("/dashboard/\(UUID().uuidString)", "unknown"),
            ("/dashboard/audit", "audit"), ("/dashboard/login", "login"), ("/elsewhere", "unknown"),
        ]
        for (path, label) in cases {
            #expect(DashboardService.pageName(path.split(separator: "/").map(String.init)) == label, "\(path)")
        }
    }

    @Test("a certificate page: decoded fields, lineage both ways and its audit events")
    func certificatePage() async throws {
        let f = try await DashboardFixture()
        defer { Task { await f.close() } }
        let first = try await f.issue(dns: ["api.example.org"], profile: .server, owner: "web")
        let second = try await f.issue(dns: ["api.example.org"], profile: .server, owner: "web", requester: "cert:\(first.serial)")
        let (cookie, _) = try await f.login()
        let page = await f.get("/dashboard/certificates/\(second.serial)", cookie: cookie).text
        for expected in ["api.example.org", "P-256", "subjectAltName", "keyUsage", "extKeyUsage", "BEGIN CERTIFICATE", "/dashboard/certificates/\(first.serial)\""] {
            #expect(page.contains(expected), "\(expected)")
        }
        #expect(page.contains("<td>issue</td>"))
        let older = await f.get("/dashboard/certificates/\(first.serial)", cookie: cookie).text
        #expect(older.contains("/dashboard/certificates/\(second.serial)\""))
        #expect(older.contains("first issuance"))

        // An ML-DSA certificate (which swift-certificates cannot parse) is decoded too, not "does not parse".
        _ = try await f.authority.addPQHierarchy(variant: .mlDSA65, passphrase: nil, actor: "test")
        let key = try MLDSAPublicKey(variant: .mlDSA65, rawRepresentation: try MLDSASigningKey(generating: .mlDSA65).publicKey)
        let pq = try await f.authority.issue(.init(profile: .server, dnsNames: ["pq.example.org"]), mldsaKey: key, owner: "web", requester: "t", now: f.now)
        let pqPage = await f.get("/dashboard/certificates/\(pq.record.serial)", cookie: cookie).text
        for expected in ["pq.example.org", "ML-DSA-65", "subjectAltName", "keyUsage", "BEGIN CERTIFICATE"] {
            #expect(pqPage.contains(expected), "\(expected)")
        }
        #expect(!pqPage.contains("does not parse"))
    }

    @Test("the admin client certificate is a session of its own; other certificates are not, and say why")
    func clientCertificates() async throws {
        let f = try await DashboardFixture()
        defer { Task { await f.close() } }
        let adminPEM = try String(contentsOfFile: f.dir + "/state/admin/cert.pem", encoding: .utf8)
        let admin = try PEMBundle.certificates(fromPEM: adminPEM)[0]
        let page = await f.get("/dashboard/", peer: admin)
        #expect(page.status == 200)
        #expect(page.text.contains("(admin)"))
        let csrf = try #require(DashboardFixture.csrf(in: await f.get("/dashboard/certificates/\(try await f.issue(owner: nil).serial)/revoke", peer: admin).text))
        let target = try await f.issue(owner: "web")
        #expect(await f.post("/dashboard/certificates/\(target.serial)/revoke", form: "reason=superseded", cookie: nil, peer: admin).problemCode == "csrf-token-invalid")
        #expect(await f.post("/dashboard/certificates/\(target.serial)/revoke", form: "csrf=\(csrf)&reason=superseded", cookie: nil, peer: admin).status == 303)
        #expect(try await f.authority.store.auditEvents(subject: target.serial).last?.actor.hasPrefix("dashboard:cert:") == true)

        let key = P256.Signing.PrivateKey()
        let workload = try await f.authority.issue(IssuanceRequest(profile: .client, publicKey: .init(key.publicKey), commonName: "someone"), owner: nil, requester: "t", now: f.now)
        let refused = await f.get("/dashboard/", peer: workload.certificate)
        #expect(refused.problemCode == "login-required")
        #expect(refused.text.contains("data-reason=\"certificate-not-admin\""))
    }
}
