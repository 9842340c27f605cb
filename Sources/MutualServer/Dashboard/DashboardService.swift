import Crypto
import Foundation
import Logging
import MutualAuthority
import MutualPKI
import MutualStore
import X509

/// One dashboard request, as the HTTP layer hands it over (header names lowercased).
struct DashboardRequest: Sendable {
    var method: String
    var path: String
    var query: [String: String]
    var headers: [String: String]
    var body: [UInt8]
    /// The client certificate verified during the TLS handshake, if the browser sent one.
    var peerCertificate: AnyCertificate?

    init(method: String, path: String, query: [String: String] = [:], headers: [String: String] = [:], body: [UInt8] = [],
         peerCertificate: AnyCertificate? = nil) {
        self.method = method
        self.path = path
        self.query = query
        self.headers = headers
        self.body = body
        self.peerCertificate = peerCertificate
    }
}

struct DashboardResponse: Sendable {
    var status: Int
    var headers: [(String, String)]
    var body: [UInt8]

    func header(_ name: String) -> String? { headers.first { $0.0.lowercased() == name.lowercased() }?.1 }
    var text: String { String(decoding: body, as: UTF8.self) }
    /// The refusal's stable code (`Mutual-Problem: urn:mutual:problem:<code>`), nil for a success.
    var problemCode: String? { header("Mutual-Problem").map { String($0.split(separator: ":").last ?? "") } }
}

/// A refusal on a dashboard page: a stable code (in the `Mutual-Problem` header, the page's `data-problem`, the log
/// and the metric label) and words for people.
struct DashboardRefusal: Error, Sendable {
    var status: Int
    var code: String
    var message: String
    /// A finer stable reason where one code covers several (`login-required` because the client certificate was not
    /// the admin's: `certificate-not-admin`), in the page's `data-reason`.
    var reason: String? = nil
}

/// The dashboard: server-rendered pages over the inventory, revocations, tokens and audit trail, and the two actions
/// (revoke a certificate, disable a token) through the same authority calls as the CLI. No socket here: the HTTP layer
/// (``DashboardRoutes``) adapts Hummingbird requests, and tests call ``handle(_:)`` directly.
final class DashboardService: Sendable {
    let authority: Authority
    let publisher: RevocationPublisher
    let sessions = DashboardSessions()
    let metrics: ServerMetrics?
    let logger: Logger
    let now: @Sendable () -> Date
    /// Called after a revocation so subscribers hear of it at once.
    let afterRevocation: @Sendable () async -> Void

    static let cookieName = "__Host-mutual-dashboard"
    static let unknownLogin = DashboardRefusal(status: 401, code: "login-unknown", message: "this login link is not one the authority made: ask for a new one (`mutual dashboard login`)")
    static let pageSize = 50
    static let maximumFormBytes = 16 * 1024

    init(authority: Authority, publisher: RevocationPublisher, metrics: ServerMetrics?, logger: Logger,
         now: @escaping @Sendable () -> Date = { .now }, afterRevocation: @escaping @Sendable () async -> Void = {}) {
        self.authority = authority
        self.publisher = publisher
        self.metrics = metrics
        self.logger = logger
        self.now = now
        self.afterRevocation = afterRevocation
    }

    // MARK: Dispatch

    func handle(_ request: DashboardRequest) async -> DashboardResponse {
        let start = ContinuousClock.now
        let parts = request.path.split(separator: "/", omittingEmptySubsequences: true).map(String.init)
        let page = Self.pageName(parts)
        var response: DashboardResponse
        do {
            response = try await route(request, parts: parts)
            metrics?.countDashboard(page: page, outcome: "ok", code: "none")
        } catch let refusal as DashboardRefusal {
            response = errorPage(refusal, viewer: nil)
            metrics?.countDashboard(page: page, outcome: "refused", code: refusal.code)
            logger.info("dashboard request refused", metadata: ["path": "\(request.path.prefix(200))", "code": "\(refusal.code)", "reason": "\(refusal.message)"])
        } catch {
            let problem = Problem.from(error)
            let code = String(problem.type.split(separator: ":").last ?? "internal")
            response = errorPage(DashboardRefusal(status: Int(problem.status.code), code: code, message: problem.detail), viewer: nil)
            metrics?.countDashboard(page: page, outcome: problem.status.code >= 500 ? "error" : "refused", code: code)
            logger.notice("dashboard request failed", metadata: ["path": "\(request.path.prefix(200))", "code": "\(code)", "error": "\(error)"])
        }
        let elapsed = ContinuousClock.now - start
        let ms = Double(elapsed.components.seconds) * 1000 + Double(elapsed.components.attoseconds) / 1e15
        response.headers.append(("Server-Timing", String(format: "app;dur=%.1f", ms)))
        return response
    }

    /// The metric label of a path: one of a fixed set, never text from the request (which would make a label per
    /// request).
    static func pageName(_ parts: [String]) -> String {
        guard parts.first == "dashboard" else { return "unknown" }
        guard parts.count >= 2 else { return "overview" }
        switch (parts[1], parts.count) {
        case ("certificates", 2): return "inventory"
        case ("certificates", 3): return "certificate"
        case ("certificates", 4) where ["pem", "revoke"].contains(parts[3]): return parts[3]
        case ("tokens", 2): return "tokens"
        case ("tokens", 4) where parts[3] == "disable": return "disable"
        case ("revocations", 2), ("audit", 2), ("login", 2), ("logout", 2), ("static", 3): return parts[1]
        default: return "unknown"
        }
    }

    private func route(_ request: DashboardRequest, parts: [String]) async throws -> DashboardResponse {
        guard parts.first == "dashboard" else { throw DashboardRefusal(status: 404, code: "not-found", message: "no such page") }
        let rest = Array(parts.dropFirst())
        switch (request.method, rest.first) {
        case ("GET", "static") where rest == ["static", "style.css"]:
            return DashboardResponse(status: 200, headers: [("Content-Type", "text/css; charset=utf-8"), ("Cache-Control", "max-age=3600"),
                                                            ("X-Content-Type-Options", "nosniff")], body: Array(DashboardStyle.css.utf8))
        case ("GET", "login") where rest.count == 1:
            return try await login(request)
        case ("POST", "logout") where rest.count == 1:
            return try await logout(request)
        default:
            break
        }
        let viewer = try await self.viewer(for: request)
        switch (request.method, rest.count, rest.first) {
        case ("GET", 0, _): return try await overview(viewer)
        case ("GET", 1, "certificates"): return try await inventory(request, viewer)
        case ("GET", 2, "certificates"): return try await certificatePage(serial: rest[1], request: request, viewer)
        case ("GET", 3, "certificates") where rest[2] == "pem": return try await certificatePEM(serial: rest[1])
        case ("GET", 3, "certificates") where rest[2] == "revoke": return try await revokeConfirmation(serial: rest[1], viewer)
        case ("POST", 3, "certificates") where rest[2] == "revoke": return try await revoke(serial: rest[1], request, viewer)
        case ("GET", 1, "revocations"): return try await revocations(request, viewer)
        case ("GET", 1, "tokens"): return try await tokens(request, viewer)
        case ("GET", 3, "tokens") where rest[2] == "disable": return try await disableConfirmation(id: rest[1], viewer)
        case ("POST", 3, "tokens") where rest[2] == "disable": return try await disableToken(id: rest[1], request, viewer)
        case ("GET", 1, "audit"): return try await audit(request, viewer)
        case ("GET", _, _), ("HEAD", _, _):
            throw DashboardRefusal(status: 404, code: "not-found", message: "no such page")
        default:
            throw DashboardRefusal(status: 405, code: "method-not-allowed", message: "\(request.method.prefix(16)) is not allowed here")
        }
    }

    // MARK: Access

    /// The admin client certificate of this connection when there is one; else the session of the cookie.
    func viewer(for request: DashboardRequest) async throws -> DashboardViewer {
        var certificateNote = ""
        var reason: String?
        if let certificate = request.peerCertificate {
            do {
                let record = try await authority.checkPresented(certificate, now: now())
                if record.profile == CertificateProfile.admin.rawValue {
                    return sessions.certificateViewer(serial: record.serial)
                }
                certificateNote = " The client certificate presented (\(record.profile) certificate \(record.serial)) is not the admin certificate."
                reason = "certificate-not-admin"
            } catch let error as AuthorityError {
                certificateNote = " The client certificate presented was refused: \(error.reason)."
                reason = "certificate-\(error.code.name)"
            }
        }
        if let cookie = Self.cookie(Self.cookieName, in: request.headers["cookie"]), let viewer = sessions.viewer(cookie: cookie, now: now()) {
            return viewer
        }
        throw DashboardRefusal(
            status: 401, code: "login-required",
            message: "Sign in with a link from `mutual dashboard login` (or present the admin client certificate).\(certificateNote)",
            reason: reason
        )
    }

    static func cookie(_ name: String, in header: String?) -> String? {
        guard let header, header.utf8.count <= 8192 else { return nil }
        for pair in header.split(separator: ";") {
            let trimmed = pair.trimmingCharacters(in: .whitespaces)
            guard let equals = trimmed.firstIndex(of: "=") else { continue }
            if trimmed[..<equals] == name {
                let value = String(trimmed[trimmed.index(after: equals)...])
                return value.isEmpty || value.utf8.count > 256 ? nil : value
            }
        }
        return nil
    }

    /// A state-changing request must come from a dashboard page: same origin (when the browser says where it comes
    /// from) and the viewer's anti-forgery token in the form. Returns the form's fields.
    func checkedForm(_ request: DashboardRequest, _ viewer: DashboardViewer) throws -> [String: String] {
        if let site = request.headers["sec-fetch-site"], site != "same-origin", site != "none" {
            throw DashboardRefusal(status: 403, code: "cross-site-request", message: "this form was sent from another site (\(site.prefix(30)))")
        }
        if let origin = request.headers["origin"], let host = request.headers["host"], origin != "https://\(host)" {
            throw DashboardRefusal(status: 403, code: "cross-site-request", message: "this form was sent from \(origin.prefix(100)), not from this dashboard")
        }
        let form = try Self.form(request)
        guard let token = form["csrf"], ConstantTime.equal(token, viewer.csrf) else {
            throw DashboardRefusal(status: 403, code: "csrf-token-invalid", message: "the form's anti-forgery token is missing or wrong: reload the page and try again")
        }
        return form
    }

    static func form(_ request: DashboardRequest) throws -> [String: String] {
        let contentType = request.headers["content-type"]?.lowercased() ?? ""
        guard contentType.hasPrefix("application/x-www-form-urlencoded") else {
            throw DashboardRefusal(status: 415, code: "unsupported-media-type", message: "forms are sent as application/x-www-form-urlencoded")
        }
        guard request.body.count <= maximumFormBytes else {
            throw DashboardRefusal(status: 413, code: "body-too-large", message: "forms are limited to 16 KiB")
        }
        guard let fields = urlEncoded(String(decoding: request.body, as: UTF8.self)) else {
            throw DashboardRefusal(status: 400, code: "malformed-form", message: "the form is not valid URL encoding")
        }
        return fields
    }

    /// `a=b&c=d` as browsers send forms and queries (`+` for space, percent escapes); nil when an escape is invalid.
    /// A name given twice keeps its last value.
    static func urlEncoded(_ text: String) -> [String: String]? {
        var fields: [String: String] = [:]
        for pair in text.split(separator: "&") {
            let items = pair.split(separator: "=", maxSplits: 1, omittingEmptySubsequences: false)
            func decode(_ part: Substring) -> String? { String(part).replacingOccurrences(of: "+", with: " ").removingPercentEncoding }
            guard let name = decode(items[0]), let value = items.count == 2 ? decode(items[1]) : "" else { return nil }
            fields[name] = value
        }
        return fields
    }

    func requireAdmin(_ viewer: DashboardViewer) throws {
        guard viewer.role == .admin else {
            throw DashboardRefusal(status: 403, code: "read-only-session", message: "this session is read-only: it can look, not act")
        }
    }

    // MARK: Login

    func login(_ request: DashboardRequest) async throws -> DashboardResponse {
        guard let code = request.query["code"] else {
            let body = """
                <h1>Sign in</h1>
                <p>Ask an operator of this authority for a login link:</p>
                <pre>mutual dashboard login            # admin, link valid 15 minutes
                mutual dashboard login --read-only # for auditors</pre>
                <p>Or open the dashboard with the admin client certificate (admin/cert.pem) installed in the browser.</p>
                """
            return page(title: "Sign in", active: "", body: body, viewer: nil)
        }
        // Codes are `mdl_` and 43 base64url characters: anything else was never made here, and is refused without
        // asking the database.
        guard code.hasPrefix("mdl_"), code.utf8.count == 47, code.utf8.dropFirst(4).allSatisfy({ $0 == 0x2D || $0 == 0x5F || (0x30...0x39).contains($0) || (0x41...0x5A).contains($0) || (0x61...0x7A).contains($0) }) else {
            throw Self.unknownLogin
        }
        let digest = DashboardSessions.digest(code)
        let time = now()
        // A guess is refused on a read: it never queues a write transaction beside issuance.
        guard try await authority.store.dashboardLoginExists(codeHash: digest) else {
            throw Self.unknownLogin
        }
        let outcome = try await authority.store.redeemDashboardLogin(codeHash: digest, now: time) { outcome in
            switch outcome {
            case .redeemed(let login):
                return AuditEntry(time: time, actor: login.actor, action: "dashboard-login", subject: "dashboard",
                                  details: ["role": login.role, "session_seconds": "\(login.sessionSeconds)"])
            case .unknown:
                // A guess: logged and counted, not audited (see redeemDashboardLogin).
                return nil
            case .alreadyUsed, .expired:
                // A real link used late or twice: worth a trace (a leaked link being replayed looks like this).
                return AuditEntry(time: time, actor: "dashboard", action: "dashboard-login-refused", subject: "dashboard",
                                  details: ["code": outcome.refusalCode ?? "unknown"])
            }
        }
        switch outcome {
        case .redeemed(let login):
            let (cookie, _) = sessions.start(login, now: time)
            return DashboardResponse(status: 303, headers: Self.securityHeaders + [
                ("Location", "/dashboard/"),
                ("Set-Cookie", "\(Self.cookieName)=\(cookie); Path=/; Secure; HttpOnly; SameSite=Strict; Max-Age=\(login.sessionSeconds)"),
            ], body: [])
        case .unknown:
            throw Self.unknownLogin
        case .alreadyUsed:
            throw DashboardRefusal(status: 401, code: "login-used", message: "this login link has been used already; each link signs in once: ask for a new one")
        case .expired:
            throw DashboardRefusal(status: 401, code: "login-expired", message: "this login link has expired: ask for a new one (`mutual dashboard login --ttl 15m`)")
        }
    }

    func logout(_ request: DashboardRequest) async throws -> DashboardResponse {
        let viewer = try await self.viewer(for: request)
        _ = try checkedForm(request, viewer)
        var headers = Self.securityHeaders + [("Location", "/dashboard/login")]
        if let cookie = Self.cookie(Self.cookieName, in: request.headers["cookie"]), viewer.sessionID != nil {
            sessions.end(cookie: cookie)
            headers.append(("Set-Cookie", "\(Self.cookieName)=; Path=/; Secure; HttpOnly; SameSite=Strict; Max-Age=0"))
        }
        try await authority.store.appendAudit(AuditEntry(time: now(), actor: viewer.actor, action: "dashboard-logout", subject: "dashboard"))
        return DashboardResponse(status: 303, headers: headers, body: [])
    }

    // MARK: Rendering

    static let securityHeaders: [(String, String)] = [
        ("Content-Security-Policy", "default-src 'none'; style-src 'self'; img-src 'self' data:; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"),
        ("X-Content-Type-Options", "nosniff"),
        ("X-Frame-Options", "DENY"),
        // Not `no-referrer`: under it browsers send `Origin: null` with the dashboard's own forms, which the origin
        // check must refuse. `same-origin` still sends nothing to other sites.
        ("Referrer-Policy", "same-origin"),
        ("Cache-Control", "no-store"),
        ("Cross-Origin-Opener-Policy", "same-origin"),
        ("Cross-Origin-Resource-Policy", "same-origin"),
    ]

    func page(title: String, active: String, body: String, viewer: DashboardViewer?, status: Int = 200, problem: String? = nil,
              reason: String? = nil) -> DashboardResponse {
        var html = """
            <!doctype html><html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
            <title>\(HTML.escape(title)) · Mutual</title><link rel="stylesheet" href="/dashboard/static/style.css"></head><body>
            <header><span class="brand">Mutual</span>
            """
        if let viewer {
            html += "<nav aria-label=\"Main\">"
            for (path, name) in [("/dashboard/", "Overview"), ("/dashboard/certificates", "Inventory"), ("/dashboard/revocations", "Revocations"),
                                 ("/dashboard/tokens", "Tokens"), ("/dashboard/audit", "Audit trail")] {
                html += " <a href=\"\(path)\"\(name == active ? " aria-current=\"page\"" : "")>\(name)</a>"
            }
            html += "</nav><span class=\"who\">\(HTML.escape(viewer.actor)) (\(viewer.role.rawValue))</span>"
            if viewer.sessionID != nil {
                html += "<form method=\"post\" action=\"/dashboard/logout\"><input type=\"hidden\" name=\"csrf\" value=\"\(HTML.escape(viewer.csrf))\"><button type=\"submit\">Log out</button></form>"
            }
        }
        html += "</header><main id=\"main\" data-page=\"\(HTML.escape(active.lowercased()))\"\(problem.map { " data-problem=\"\(HTML.escape($0))\"" } ?? "")"
        html += "\(reason.map { " data-reason=\"\(HTML.escape($0))\"" } ?? "")>"
        html += body + "</main></body></html>"
        var headers = Self.securityHeaders + [("Content-Type", "text/html; charset=utf-8")]
        if let problem { headers.append(("Mutual-Problem", "urn:mutual:problem:\(problem)")) }
        return DashboardResponse(status: status, headers: headers, body: Array(html.utf8))
    }

    func errorPage(_ refusal: DashboardRefusal, viewer: DashboardViewer?) -> DashboardResponse {
        let body = """
            <h1>\(refusal.status == 401 ? "Sign in needed" : "Refused")</h1>
            <div class="banner bad" role="alert"><p>\(HTML.escape(refusal.message))</p><p class="code">code: \(HTML.escape(refusal.code))</p></div>
            <p><a href="/dashboard/">Back to the overview</a></p>
            """
        return page(title: "Refused", active: "", body: body, viewer: viewer, status: refusal.status, problem: refusal.code, reason: refusal.reason)
    }

    func redirect(_ location: String) -> DashboardResponse {
        DashboardResponse(status: 303, headers: Self.securityHeaders + [("Location", location)], body: [])
    }

    static func serialLink(_ serial: String) -> String {
        "<a class=\"code\" href=\"/dashboard/certificates/\(HTML.escape(HTML.query(serial)))\">\(HTML.escape(String(serial.prefix(16))))\(serial.count > 16 ? "…" : "")</a>"
    }

    /// A serial from a URL: lowercase hex only, else 404 (never echoed unescaped).
    static func serial(_ text: String) throws -> String {
        let serial = Authority.normalizeSerial(text.removingPercentEncoding ?? text)
        guard !serial.isEmpty, serial.count <= 42, serial.allSatisfy(\.isHexDigit) else {
            throw DashboardRefusal(status: 404, code: "not-found", message: "'\(text.prefix(60))' is not a serial number")
        }
        return serial
    }

    func record(_ serialText: String) async throws -> CertificateRecord {
        let serial = try Self.serial(serialText)
        guard let record = try await authority.store.certificate(serial: serial) else {
            throw DashboardRefusal(status: 404, code: "not-found", message: "no certificate with serial \(serial) in the inventory")
        }
        return record
    }
}

/// Renders dashboard pages in process, as a signed-in read-only viewer: for `mutual bench dashboard`, which times the
/// server's work per page without a browser or a socket in the way.
public struct DashboardProbe: Sendable {
    let service: DashboardService
    let cookie: String

    public init(authority: Authority) async throws {
        var logger = Logger(label: "mutual.bench.dashboard")
        logger.logLevel = .warning
        service = DashboardService(authority: authority, publisher: RevocationPublisher(authority: authority), metrics: nil, logger: logger)
        let code = try await authority.createDashboardLogin(name: "bench", readOnly: true, ttl: .minutes(15), session: .hours(12), actor: "bench")
        let answer = await service.handle(DashboardRequest(method: "GET", path: "/dashboard/login", query: ["code": code.code]))
        guard answer.status == 303, let setCookie = answer.header("Set-Cookie"),
              let value = setCookie.split(separator: ";").first?.split(separator: "=", maxSplits: 1).last else {
            throw DashboardRefusal(status: answer.status, code: answer.problemCode ?? "login-failed", message: "the probe could not sign in")
        }
        cookie = String(value)
    }

    /// Renders `target` (a path with an optional query); returns the status and the size of the page.
    public func render(_ target: String) async -> (status: Int, bytes: Int) {
        let path = target.split(separator: "?", maxSplits: 1).first.map(String.init) ?? target
        let query = target.contains("?") ? DashboardService.urlEncoded(String(target.split(separator: "?", maxSplits: 1)[1])) ?? [:] : [:]
        let answer = await service.handle(DashboardRequest(
            method: "GET", path: path, query: query, headers: ["cookie": "\(DashboardService.cookieName)=\(cookie)", "host": "bench"]
        ))
        return (answer.status, answer.body.count)
    }
}
