import Crypto
import Foundation
import MutualPKI
import MutualAuthority
import MutualStore
import Synchronization

/// Who is looking at the dashboard, and what they may do.
struct DashboardViewer: Sendable, Hashable {
    enum Role: String, Sendable {
        case admin
        case readOnly = "read-only"
    }

    var role: Role
    /// The audit trail's actor for this viewer's actions: `dashboard:<name>` or `dashboard:cert:<serial>`.
    var actor: String
    /// The anti-forgery token every form of this viewer carries.
    var csrf: String
    /// The session (cookie) id; nil when the viewer is the admin client certificate of this connection.
    var sessionID: String?
}

/// Dashboard sessions, in memory: a restart ends them all, as does logging out. A session is made only by redeeming a
/// one-time login code (which lives in the database, so any replica can redeem it once); its id is the cookie.
final class DashboardSessions: Sendable {
    private struct Session {
        var viewer: DashboardViewer
        var expiresAt: Date
    }

    /// Keyed by SHA-256 of the cookie value, so the table holds no usable secret.
    private let sessions = Mutex<[String: Session]>([:])
    /// Key for the anti-forgery tokens of client-certificate viewers (who have no session to hold one).
    private let csrfKey = SymmetricKey(size: .bits256)
    static let maximumSessions = 10_000

    static func random() -> String { DashboardLoginCode.randomToken() }

    static func digest(_ text: String) -> String { DashboardLoginCode.digest(text) }

    /// Starts a session for a redeemed login; returns the cookie value and the viewer.
    func start(_ login: DashboardLogin, now: Date) -> (cookie: String, viewer: DashboardViewer) {
        let id = Self.random()
        let expires = now.addingTimeInterval(Double(login.sessionSeconds))
        let viewer = DashboardViewer(
            role: login.role == DashboardViewer.Role.admin.rawValue ? .admin : .readOnly, actor: login.actor, csrf: Self.random(),
            sessionID: id
        )
        sessions.withLock { table in
            if table.count >= Self.maximumSessions { table = table.filter { $0.value.expiresAt > now } }
            if table.count >= Self.maximumSessions, let oldest = table.min(by: { $0.value.expiresAt < $1.value.expiresAt }) {
                table[oldest.key] = nil
            }
            table[Self.digest(id)] = Session(viewer: viewer, expiresAt: expires)
        }
        return (id, viewer)
    }

    /// The viewer of a live session; nil for an unknown or expired cookie.
    func viewer(cookie: String, now: Date) -> DashboardViewer? {
        let key = Self.digest(cookie)
        return sessions.withLock { table in
            guard let session = table[key] else { return nil }
            guard session.expiresAt > now else {
                table[key] = nil
                return nil
            }
            return session.viewer
        }
    }

    func end(cookie: String) {
        let key = Self.digest(cookie)
        _ = sessions.withLock { $0.removeValue(forKey: key) }
    }

    /// The viewer for an admin client certificate: its anti-forgery token is bound to the certificate.
    func certificateViewer(serial: String) -> DashboardViewer {
        let mac = HMAC<SHA256>.authenticationCode(for: Data("cert:\(serial)".utf8), using: csrfKey)
        return DashboardViewer(role: .admin, actor: "dashboard:cert:\(serial)", csrf: Base64URL.encode(Data(mac)))
    }
}
