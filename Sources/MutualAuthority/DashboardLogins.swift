import Crypto
import Foundation
import MutualPKI
import MutualStore

/// A one-time dashboard login code, made by `mutual dashboard login` for the person who runs it.
public struct DashboardLoginCode: Sendable {
    /// `mdl_<43 base64url characters>`: shown once; the database keeps only its SHA-256.
    public var code: String
    public var login: DashboardLogin

    /// 32 random bytes, base64url (43 characters): login codes, session ids, anti-forgery tokens.
    public static func randomToken() -> String {
        var generator = SystemRandomNumberGenerator()
        return Base64URL.encode((0..<32).map { _ in UInt8.random(in: 0...255, using: &generator) })
    }

    /// SHA-256 of a code or session id, lowercase hex: what is stored or used as a key instead of the secret.
    public static func digest(_ secret: String) -> String {
        SHA256.hash(data: Data(secret.utf8)).hexString
    }
}

extension Authority {
    /// Makes a login code: one sign-in before `ttl` runs out, into a session of `session` length, as `name`, with
    /// full (`readOnly == false`) or read-only rights. Audited (without the code).
    public func createDashboardLogin(name: String, readOnly: Bool, ttl: ValidityDuration, session: ValidityDuration, actor: String,
                                     now: Date = .now) async throws -> DashboardLoginCode {
        let trimmed = name.trimmingCharacters(in: .whitespaces)
        guard !trimmed.isEmpty, trimmed.count <= 64, trimmed.allSatisfy({ $0.isLetter || $0.isNumber || "-_.@:".contains($0) }) else {
            throw AuthorityError(.forbidden, "the name '\(name.prefix(64))' must be 1 to 64 letters, digits or - _ . @ :")
        }
        guard ttl.timeInterval >= 60, ttl.timeInterval <= 86_400 else {
            throw PKIError(.invalidDuration, "--ttl must be between 1m and 24h (a login link is for now, not for later)")
        }
        guard session.timeInterval >= 60, session.timeInterval <= 12 * 3600 else {
            throw PKIError(.invalidDuration, "--session must be between 1m and 12h")
        }
        let code = "mdl_" + DashboardLoginCode.randomToken()
        let digest = DashboardLoginCode.digest(code)
        let login = DashboardLogin(
            codeHash: digest, role: readOnly ? "read-only" : "admin", actor: "dashboard:\(trimmed)",
            sessionSeconds: Int64(session.timeInterval), expiresAt: now.addingTimeInterval(ttl.timeInterval), createdAt: now
        )
        try await store.createDashboardLogin(login, audit: AuditEntry(
            time: now, actor: actor, action: "dashboard-login-create", subject: "dashboard",
            details: ["for": login.actor, "role": login.role, "expires": AuditChain.format(login.expiresAt)]
        ))
        return DashboardLoginCode(code: code, login: login)
    }
}
