import Foundation
import SwiftASN1
import MutualAuthority
import MutualPKI
import MutualStore
import X509

extension DashboardService {
    // MARK: Overview

    func overview(_ viewer: DashboardViewer) async throws -> DashboardResponse {
        let time = now()
        let o = try await authority.store.overview(now: time)
        func card(_ label: String, _ value: Int, _ link: String) -> String {
            "<div class=\"card\"><a href=\"\(HTML.escape(link))\"><span class=\"n\" data-count=\"\(HTML.escape(label))\">\(value)</span>\(HTML.escape(label))</a></div>"
        }
        let within = { (d: Int) in "/dashboard/certificates?expiring=\(d)d" }
        var body = "<h1>Overview</h1><section aria-label=\"Certificates by status\" class=\"cards\">"
        body += card("valid", o.valid, "/dashboard/certificates?status=valid")
        body += card("expiring within 7 d", o.expiringIn7Days, within(7))
        body += card("expiring within 30 d", o.expiringIn30Days, within(30))
        body += card("expired (no successor)", o.expired, "/dashboard/certificates?status=expired")
        body += card("superseded", o.superseded, "/dashboard/certificates?status=superseded")
        body += card("revoked", o.revoked, "/dashboard/revocations")
        body += "</section>"

        let timeline = BarChart(
            values: o.expiriesPerDay, label: { "expiring in \($0)–\($0 + 1) d" },
            barClass: { $0 < 7 ? "bar soon" : ($0 < 30 ? "bar month" : "bar") },
            summary: "Expiries per day over the next \(o.expiriesPerDay.count) days: \(o.expiriesPerDay.reduce(0, +)) certificates, \(o.expiringIn7Days) within 7 days",
            ticks: [0: "today", 7: "7 d", 30: "30 d", 60: "60 d", 89: "90 d"]
        )
        body += "<h2>Expiry timeline (next 90 days)</h2>" + timeline.svg()

        let issued = BarChart(
            values: o.issuedPerDay, label: { "\(o.issuedPerDay.count - $0 - 1) days ago" },
            summary: "Certificates issued per day over the last \(o.issuedPerDay.count) days: \(o.issuedPerDay.reduce(0, +)) in all",
            ticks: [0: "\(o.issuedPerDay.count) d ago", o.issuedPerDay.count - 1: "today"]
        )
        body += "<h2>Issuance per day (last 30 days)</h2>" + issued.svg(height: 140)

        body += "<div class=\"grid2\"><section>"
        body += HTML.table(caption: "Valid certificates by owner", headers: ["Owner", "Certificates"], rows: o.byOwner.map { owner, count in
            [owner.map { "<a href=\"\(HTML.link("/dashboard/certificates", [("owner", $0), ("status", "valid")]))\">\(HTML.escape($0))</a>" } ?? "<span class=\"muted\">(no owner)</span>", "\(count)"]
        }, empty: "No valid certificates.")
        body += "</section><section>"
        body += HTML.table(caption: "Valid certificates by profile", headers: ["Profile", "Certificates"], rows: o.byProfile.map { profile, count in
            ["<a href=\"\(HTML.link("/dashboard/certificates", [("profile", profile), ("status", "valid")]))\">\(HTML.escape(profile))</a>", "\(count)"]
        }, empty: "No valid certificates.")
        body += "</section></div>"

        body += "<h2>Missed renewals</h2><p>\(o.missedRenewals) valid certificate\(o.missedRenewals == 1 ? " is" : "s are") past two thirds of \(o.missedRenewals == 1 ? "its" : "their") lifetime with no successor: the agent holding \(o.missedRenewals == 1 ? "it" : "them") has not renewed on schedule.</p>"
        body += HTML.table(caption: "Oldest missed renewals", headers: ["Serial", "Identity", "Owner", "Expires"], rows: o.missedRenewalSample.map { r in
            [Self.serialLink(r.serial), HTML.escape(r.identity), HTML.escape(r.owner ?? "-"), HTML.escape(HTML.relative(r.notAfter, now: time))]
        }, empty: "Every certificate past two thirds of its lifetime has been renewed.")

        // Every CA with its rotation stage (`mutual ca status`): during a rotation the prepared or replaced one too,
        // with the valid certificates each issuing CA still has out.
        let cas = try await authority.caStatus(now: time)
        body += HTML.table(
            caption: "The CA's own certificates and their rotation stages", headers: ["CA", "Stage", "Subject", "Expires", "Valid certificates issued"],
            rows: cas.map { ca in
                [HTML.escape((ca.kind == "root" ? "Root r" : "Issuing g") + String(ca.generation)), HTML.escape(ca.stage), HTML.escape(ca.subject),
                 "\(HTML.escape(HTML.date(ca.notAfter))) (\(HTML.escape(HTML.relative(ca.notAfter, now: time))))",
                 ca.validCertificates.map { count in
                     let owners = (ca.owners ?? [:]).sorted { $0.value > $1.value }.prefix(5).map { "\($0.key) \($0.value)" }.joined(separator: ", ")
                     return HTML.escape("\(count)" + (owners.isEmpty ? "" : " (\(owners))"))
                 } ?? "<span class=\"muted\">-</span>"]
            }
        )
        return page(title: "Overview", active: "Overview", body: body, viewer: viewer)
    }

    // MARK: Inventory

    func inventory(_ request: DashboardRequest, _ viewer: DashboardViewer) async throws -> DashboardResponse {
        let time = now()
        let q = request.query
        for (key, value) in q where value.utf8.count > 512 {
            throw DashboardRefusal(status: 400, code: "bad-filter", message: "the filter '\(key.prefix(20))' is too long (512 bytes at most)")
        }
        func field(_ name: String) -> String? {
            q[name].map { $0.trimmingCharacters(in: .whitespaces) }.flatMap { $0.isEmpty ? nil : $0 }
        }
        var filter = CertificateFilter(now: time, limit: Self.pageSize + 1)
        filter.identity = field("identity")
        filter.owner = field("owner")
        filter.profile = field("profile")
        filter.issuer = field("issuer")
        if let serial = field("serial") {
            let normalized = Authority.normalizeSerial(serial)
            guard normalized.allSatisfy(\.isHexDigit), normalized.count <= 42 else {
                throw DashboardRefusal(status: 400, code: "bad-filter", message: "serial must be hexadecimal (a prefix is enough)")
            }
            filter.serialPrefix = normalized
        }
        if let status = field("status") {
            guard let parsed = CertificateFilter.StatusFilter(rawValue: status) else {
                throw DashboardRefusal(status: 400, code: "bad-filter", message: "status must be one of \(CertificateFilter.StatusFilter.choices)")
            }
            filter.status = parsed
        }
        if let expiring = field("expiring") {
            guard let duration = try? ValidityDuration(parsing: expiring) else {
                throw DashboardRefusal(status: 400, code: "bad-filter", message: "expiring takes a duration such as 7d or 12h")
            }
            filter.expiringBefore = time.addingTimeInterval(duration.timeInterval)
        }
        let order = field("order") ?? "expiry"
        guard order == "expiry" || order == "-expiry" else {
            throw DashboardRefusal(status: 400, code: "bad-filter", message: "order is 'expiry' (soonest first) or '-expiry' (latest first)")
        }
        filter.newestFirst = order == "-expiry"
        let pageNumber = field("page").map { Int($0) ?? -1 } ?? 1
        guard (1...100_000).contains(pageNumber) else {
            throw DashboardRefusal(status: 400, code: "bad-filter", message: "page must be a number from 1")
        }
        filter.offset = (pageNumber - 1) * Self.pageSize
        let found = try await authority.store.certificates(filter)
        let rows = Array(found.prefix(Self.pageSize))

        func input(_ name: String, _ label: String, _ placeholder: String) -> String {
            "<label for=\"f-\(name)\">\(label)<input id=\"f-\(name)\" name=\"\(name)\" value=\"\(HTML.escape(q[name] ?? ""))\" placeholder=\"\(HTML.escape(placeholder))\"></label>"
        }
        var body = "<h1>Inventory</h1><form class=\"filters\" method=\"get\" action=\"/dashboard/certificates\" role=\"search\">"
        body += input("identity", "Identity", "spiffe://example.org/ns/web/* or *.svc.example.org")
        body += input("owner", "Owner", "team")
        body += input("serial", "Serial (prefix)", "3df2da4e")
        body += "<label for=\"f-status\">Status<select id=\"f-status\" name=\"status\"><option value=\"\">any</option>"
        for status in CertificateFilter.StatusFilter.allCases {
            body += "<option\(q["status"] == status.rawValue ? " selected" : "")>\(status.rawValue)</option>"
        }
        body += "</select></label>"
        body += input("profile", "Profile", "workload")
        body += input("issuer", "Issuer", "CN=…")
        body += input("expiring", "Expiring within", "7d")
        body += "<label for=\"f-order\">Sort<select id=\"f-order\" name=\"order\"><option value=\"expiry\">soonest expiry first</option><option value=\"-expiry\"\(order == "-expiry" ? " selected" : "")>latest expiry first</option></select></label>"
        body += "<button type=\"submit\">Search</button></form>"
        body += HTML.table(
            caption: "Certificates (page \(pageNumber))", headers: ["Serial", "Identity", "Owner", "Profile", "Status", "Expires"],
            rows: rows.map { r in
                [Self.serialLink(r.serial), HTML.escape(r.identity), HTML.escape(r.owner ?? "-"), HTML.escape(r.profile),
                 HTML.status(r.effectiveStatus(at: time)), "<time datetime=\"\(HTML.escape(AuditChain.format(r.notAfter)))\">\(HTML.escape(HTML.date(r.notAfter)))</time> <span class=\"muted\">\(HTML.escape(HTML.relative(r.notAfter, now: time)))</span>"]
            }, empty: "No certificate matches."
        )
        let keep = ["identity", "owner", "serial", "status", "profile", "issuer", "expiring", "order"].map { ($0, q[$0]) }
        body += "<nav class=\"pager\" aria-label=\"Pages\">"
        if pageNumber > 1 { body += "<a rel=\"prev\" href=\"\(HTML.link("/dashboard/certificates", keep + [("page", String(pageNumber - 1))]))\">← previous</a>" }
        if found.count > Self.pageSize { body += "<a rel=\"next\" href=\"\(HTML.link("/dashboard/certificates", keep + [("page", String(pageNumber + 1))]))\">next →</a>" }
        body += "</nav>"
        return page(title: "Inventory", active: "Inventory", body: body, viewer: viewer)
    }

    // MARK: One certificate

    func certificatePage(serial: String, request: DashboardRequest, _ viewer: DashboardViewer) async throws -> DashboardResponse {
        let time = now()
        let record = try await record(serial)
        let successors = try await authority.store.successors(of: record.serial)
        let events = try await authority.store.auditEvents(subject: record.serial)
        let status = record.effectiveStatus(at: time)
        var body = "<h1>Certificate <span class=\"code\">\(HTML.escape(record.serial))</span> \(HTML.status(status))</h1>"
        if request.query["done"] == "revoked" {
            body += "<div class=\"banner ok\" role=\"status\">Revoked. Relying parties that follow the event stream, the CRL or OCSP see it now.</div>"
        }
        var fields: [(String, String)] = [
            ("Identity", HTML.escape(record.identity)),
            ("Subject", HTML.escape(record.subject)),
            ("Subject alternative names", record.subjectAlternativeNames.isEmpty ? "-" : record.subjectAlternativeNames.map(HTML.escape).joined(separator: "<br>")),
            ("Issuer", HTML.escape(record.issuer)),
            ("Owner", HTML.escape(record.owner ?? "-")),
            ("Profile", HTML.escape(record.profile)),
            ("Requested by", HTML.escape(record.requester)),
            ("Not before", HTML.escape(HTML.date(record.notBefore))),
            ("Not after", "\(HTML.escape(HTML.date(record.notAfter))) (\(HTML.escape(HTML.relative(record.notAfter, now: time))))"),
            ("SHA-256 fingerprint", "<span class=\"code\">\(HTML.escape(record.fingerprint))</span>"),
        ]
        if record.status == .revoked {
            fields.append(("Revoked", "\(HTML.escape(record.revokedAt.map(HTML.date) ?? "-")): \(HTML.escape(record.revocationReason ?? "unspecified"))"))
        }
        if let certificate = try? AnyCertificate(derEncoded: record.der) {
            fields.append(("Signature algorithm", HTML.escape(certificate.signatureAlgorithmName)))
            fields.append(("Public key", HTML.escape(certificate.keyAlgorithm)))
            for ext in certificate.extensions {
                fields.append(("Extension \(Self.extensionName(ext.oid))\(ext.critical ? " (critical)" : "")", HTML.escape(Self.extensionValue(ext))))
            }
        } else {
            fields.append(("Decoding", "<span class=\"status status-broken\">the stored DER does not parse</span>"))
        }
        body += "<h2>Fields</h2><dl class=\"fields\">" + fields.map { "<dt>\(HTML.escape($0.0))</dt><dd>\($0.1)</dd>" }.joined() + "</dl>"
        body += "<h2>Renewal lineage</h2><ul>"
        body += "<li>Renewed from: \(record.predecessor.map(Self.serialLink) ?? "<span class=\"muted\">first issuance</span>")</li>"
        body += "<li>Renewed by: \(successors.isEmpty ? "<span class=\"muted\">no successor yet</span>" : successors.map { Self.serialLink($0.serial) }.joined(separator: ", "))</li></ul>"
        if viewer.role == .admin && record.status == .valid {
            body += "<h2>Actions</h2><p><a href=\"/dashboard/certificates/\(HTML.escape(record.serial))/revoke\">Revoke this certificate…</a></p>"
        }
        body += "<h2>PEM</h2><p><a href=\"/dashboard/certificates/\(HTML.escape(record.serial))/pem\" download>Download \(HTML.escape(record.serial)).pem</a></p>"
        body += "<pre>\(HTML.escape(PEMCodec.encode(record.der, label: "CERTIFICATE")))</pre>"
        body += "<h2>Audit events</h2>" + Self.auditTable(events, caption: "Events about this certificate")
        return page(title: "Certificate \(record.serial)", active: "Inventory", body: body, viewer: viewer)
    }

    func certificatePEM(serial: String) async throws -> DashboardResponse {
        let record = try await record(serial)
        return DashboardResponse(status: 200, headers: Self.securityHeaders + [
            ("Content-Type", "application/x-pem-file"),
            ("Content-Disposition", "attachment; filename=\"\(record.serial).pem\""),
        ], body: Array(PEMCodec.encode(record.der, label: "CERTIFICATE").utf8))
    }

    static func extensionName(_ oid: ASN1ObjectIdentifier) -> String {
        switch oid {
        case .X509ExtensionID.subjectAlternativeName: "subjectAltName"
        case .X509ExtensionID.keyUsage: "keyUsage"
        case .X509ExtensionID.extendedKeyUsage: "extKeyUsage"
        case .X509ExtensionID.basicConstraints: "basicConstraints"
        case .X509ExtensionID.subjectKeyIdentifier: "subjectKeyIdentifier"
        case .X509ExtensionID.authorityKeyIdentifier: "authorityKeyIdentifier"
        case .X509ExtensionID.authorityInformationAccess: "authorityInfoAccess"
        case .X509ExtensionID.nameConstraints: "nameConstraints"
        default: oid.description
        }
    }

    static func extensionValue(_ ext: Certificate.Extension) -> String {
        switch ext.oid {
        case .X509ExtensionID.subjectAlternativeName: (try? SubjectAlternativeNames(ext)).map { String(describing: $0) } ?? "(malformed)"
        case .X509ExtensionID.keyUsage: (try? KeyUsage(ext)).map { String(describing: $0) } ?? "(malformed)"
        case .X509ExtensionID.extendedKeyUsage: (try? ExtendedKeyUsage(ext)).map { String(describing: $0) } ?? "(malformed)"
        case .X509ExtensionID.basicConstraints: (try? BasicConstraints(ext)).map { String(describing: $0) } ?? "(malformed)"
        case .X509ExtensionID.subjectKeyIdentifier: (try? SubjectKeyIdentifier(ext)).map { String(describing: $0) } ?? "(malformed)"
        case .X509ExtensionID.authorityKeyIdentifier: (try? AuthorityKeyIdentifier(ext)).map { String(describing: $0) } ?? "(malformed)"
        case .X509ExtensionID.authorityInformationAccess: (try? AuthorityInformationAccess(ext)).map { String(describing: $0) } ?? "(malformed)"
        default: "\(ext.value.count) bytes"
        }
    }

    // MARK: Revoke

    func revokeConfirmation(serial: String, _ viewer: DashboardViewer) async throws -> DashboardResponse {
        try requireAdmin(viewer)
        let record = try await record(serial)
        guard record.status == .valid else {
            throw DashboardRefusal(status: 409, code: "conflict", message: "certificate \(record.serial) is already revoked")
        }
        var body = "<h1>Revoke certificate <span class=\"code\">\(HTML.escape(record.serial))</span>?</h1>"
        body += "<div class=\"banner warn\">Revoking <strong>\(HTML.escape(record.identity))</strong> (owner \(HTML.escape(record.owner ?? "-"))) cannot be undone. Relying parties stop accepting it as soon as they learn of it.</div>"
        body += "<form class=\"action\" method=\"post\" action=\"/dashboard/certificates/\(HTML.escape(record.serial))/revoke\">"
        body += "<input type=\"hidden\" name=\"csrf\" value=\"\(HTML.escape(viewer.csrf))\">"
        body += "<label for=\"reason\">Reason<select id=\"reason\" name=\"reason\">"
        for reason in RevocationReason.allCases {
            body += "<option value=\"\(reason.rawValue)\">\(reason.rawValue)</option>"
        }
        body += "</select></label><p><button class=\"danger\" type=\"submit\" id=\"confirm-revoke\">Revoke</button> <a href=\"/dashboard/certificates/\(HTML.escape(record.serial))\">Cancel</a></p></form>"
        return page(title: "Revoke \(record.serial)", active: "Inventory", body: body, viewer: viewer)
    }

    func revoke(serial: String, _ request: DashboardRequest, _ viewer: DashboardViewer) async throws -> DashboardResponse {
        let form = try checkedForm(request, viewer)
        try requireAdmin(viewer)
        let serial = try Self.serial(serial)
        let reasonText = form["reason"] ?? "unspecified"
        guard let reason = RevocationReason(rawValue: reasonText) else {
            throw DashboardRefusal(status: 400, code: "unknown-reason", message: "unknown reason '\(reasonText.prefix(40))': expected one of \(RevocationReason.choices)")
        }
        // The CLI's call (`mutual revoke`): inventory, audit trail, CRL and event log change together.
        _ = try await authority.revokeAndPublish(serial: serial, reason: reason, actor: viewer.actor, publisher: publisher, now: now())
        await afterRevocation()
        return redirect("/dashboard/certificates/\(serial)?done=revoked")
    }

    // MARK: Revocations

    func revocations(_ request: DashboardRequest, _ viewer: DashboardViewer) async throws -> DashboardResponse {
        let pageNumber = try Self.pageNumber(request)
        let entries = try await authority.store.revocationEntries(limit: Self.pageSize + 1, offset: (pageNumber - 1) * Self.pageSize)
        var body = "<h1>Revocations</h1>"
        body += HTML.table(caption: "Revoked certificates, latest first", headers: ["Revoked", "Serial", "Identity", "Owner", "Reason", "Revoked by"],
                           rows: entries.prefix(Self.pageSize).map { e in
            [HTML.escape(e.record.revokedAt.map(HTML.date) ?? "-"), Self.serialLink(e.record.serial), HTML.escape(e.record.identity),
             HTML.escape(e.record.owner ?? "-"), HTML.escape(e.record.revocationReason ?? "unspecified"), HTML.escape(e.revokedBy ?? "-")]
        }, empty: "Nothing has been revoked.")
        body += pager("/dashboard/revocations", page: pageNumber, more: entries.count > Self.pageSize)
        return page(title: "Revocations", active: "Revocations", body: body, viewer: viewer)
    }

    static func pageNumber(_ request: DashboardRequest) throws -> Int {
        guard let text = request.query["page"], !text.isEmpty else { return 1 }
        guard let value = Int(text), (1...100_000).contains(value) else {
            throw DashboardRefusal(status: 400, code: "bad-filter", message: "page must be a number from 1")
        }
        return value
    }

    func pager(_ path: String, page: Int, more: Bool) -> String {
        var html = "<nav class=\"pager\" aria-label=\"Pages\">"
        if page > 1 { html += "<a rel=\"prev\" href=\"\(HTML.link(path, [("page", String(page - 1))]))\">← previous</a>" }
        if more { html += "<a rel=\"next\" href=\"\(HTML.link(path, [("page", String(page + 1))]))\">next →</a>" }
        return html + "</nav>"
    }

    // MARK: Tokens

    func tokens(_ request: DashboardRequest, _ viewer: DashboardViewer) async throws -> DashboardResponse {
        let time = now()
        let tokens = try await TokenService(store: authority.store).list().reversed()
        var body = "<h1>Tokens</h1><p class=\"muted\">Enrollment tokens (<span class=\"code\">mutual token create</span>). Secrets are never stored, so never shown.</p>"
        body += HTML.table(caption: "Tokens, newest first", headers: ["Id", "Owner", "Scopes", "Profile", "Uses left", "Expires", "Status", ""],
                           rows: tokens.map { t in
            let status = t.revokedAt != nil ? "disabled" : (t.expiresAt <= time ? "expired" : (t.usesConsumed >= t.usesAllowed ? "used-up" : "active"))
            let action = viewer.role == .admin && status == "active"
                ? "<a href=\"/dashboard/tokens/\(HTML.escape(HTML.query(t.id)))/disable\">Disable…</a>" : ""
            return [HTML.escape(t.id), HTML.escape(t.owner ?? "-"), t.scopes.map(HTML.escape).joined(separator: "<br>"), HTML.escape(t.profile),
                    "\(max(0, t.usesAllowed - t.usesConsumed)) of \(t.usesAllowed)",
                    "\(HTML.escape(HTML.date(t.expiresAt))) <span class=\"muted\">\(HTML.escape(HTML.relative(t.expiresAt, now: time)))</span>",
                    HTML.status(status), action]
        }, empty: "No tokens.")
        if request.query["done"] == "disabled" {
            body = "<div class=\"banner ok\" role=\"status\">Token disabled.</div>" + body
        }
        return page(title: "Tokens", active: "Tokens", body: body, viewer: viewer)
    }

    func token(_ idText: String) async throws -> TokenRecord {
        let id = idText.removingPercentEncoding ?? idText
        guard id.utf8.count <= 128, let token = try await authority.store.token(id: id) else {
            throw DashboardRefusal(status: 404, code: "not-found", message: "no token with id \(id.prefix(60))")
        }
        return token
    }

    func disableConfirmation(id: String, _ viewer: DashboardViewer) async throws -> DashboardResponse {
        try requireAdmin(viewer)
        let token = try await token(id)
        var body = "<h1>Disable token <span class=\"code\">\(HTML.escape(token.id))</span>?</h1>"
        body += "<div class=\"banner warn\">It will issue no more certificates. Certificates it issued stay valid.</div>"
        body += "<form class=\"action\" method=\"post\" action=\"/dashboard/tokens/\(HTML.escape(HTML.query(token.id)))/disable\">"
        body += "<input type=\"hidden\" name=\"csrf\" value=\"\(HTML.escape(viewer.csrf))\">"
        body += "<p><button class=\"danger\" type=\"submit\" id=\"confirm-disable\">Disable</button> <a href=\"/dashboard/tokens\">Cancel</a></p></form>"
        return page(title: "Disable token", active: "Tokens", body: body, viewer: viewer)
    }

    func disableToken(id: String, _ request: DashboardRequest, _ viewer: DashboardViewer) async throws -> DashboardResponse {
        _ = try checkedForm(request, viewer)
        try requireAdmin(viewer)
        let token = try await token(id)
        // The CLI's call (`mutual token revoke`).
        try await TokenService(store: authority.store).revoke(id: token.id, actor: viewer.actor, now: now())
        return redirect("/dashboard/tokens?done=disabled")
    }

    // MARK: Audit

    func audit(_ request: DashboardRequest, _ viewer: DashboardViewer) async throws -> DashboardResponse {
        var before: Int64?
        if let text = request.query["before"], !text.isEmpty {
            guard let value = Int64(text), value > 0 else {
                throw DashboardRefusal(status: 400, code: "bad-filter", message: "before must be an event number")
            }
            before = value
        }
        let verification = try await authority.store.verifyAudit()
        var body = "<h1>Audit trail</h1>"
        switch verification {
        case .intact(let count, let head):
            body += "<div class=\"banner ok\" role=\"status\" data-audit=\"intact\">Chain verified: \(count) events, each hashed over the one before; head \(HTML.escape(String(head.prefix(16))))… matches the recorded head.</div>"
        case .broken(let sequence, let reason):
            body += "<div class=\"banner bad\" role=\"alert\" data-audit=\"broken\">The chain is broken at event \(sequence): \(HTML.escape(reason)). Records from there on cannot be trusted.</div>"
        }
        let events = try await authority.store.auditEvents(before: before, limit: 100)
        body += Self.auditTable(events, caption: "Events, newest first")
        if let last = events.last, last.sequence > 1 {
            body += "<nav class=\"pager\" aria-label=\"Pages\"><a rel=\"next\" href=\"/dashboard/audit?before=\(last.sequence)\">older →</a></nav>"
        }
        return page(title: "Audit trail", active: "Audit trail", body: body, viewer: viewer)
    }

    static func auditTable(_ events: [AuditEvent], caption: String) -> String {
        HTML.table(caption: caption, headers: ["#", "Time", "Actor", "Action", "Subject", "Details"], rows: events.map { e in
            let subject = e.subject.count >= 8 && e.subject.count <= 42 && e.subject.allSatisfy(\.isHexDigit) ? serialLink(e.subject) : HTML.escape(e.subject)
            return ["\(e.sequence)", HTML.escape(e.time), HTML.escape(e.actor), HTML.escape(e.action), subject,
                    "<span class=\"code\">\(HTML.escape(e.details == "{}" ? "" : e.details))</span>"]
        }, empty: "No events.")
    }
}
