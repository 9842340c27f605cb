import CPKCS11
import Foundation
import Synchronization

/// One token (a slot holding it), logged in as the user, with a pool of sessions so that concurrent signers do not
/// queue behind one another (a PKCS#11 session runs one operation at a time).
///
/// Login state belongs to the application, not the session: one login covers every session opened afterwards, as long
/// as one session stays open. When the token goes away (removed, its daemon restarted) every session is dropped and
/// the next use finds the token again by its URI and logs in again.
public final class PKCS11Token: Sendable {
    let module: PKCS11Module
    public let uri: PKCS11URI
    private let pin: String?
    private struct State {
        var slot: CK_SLOT_ID?
        var free: [CK_SESSION_HANDLE] = []
        var open = 0
        /// Bumped whenever sessions are dropped: cached object handles from an older generation are looked up again.
        var generation = 0
        /// The token was found once: not finding it now means it was removed.
        var wasPresent = false
    }
    private let state = Mutex(State())
    /// Sessions kept open for reuse; beyond this, sessions are closed after use.
    let poolSize: Int

    private static let tokens = Mutex<[String: PKCS11Token]>([:])

    /// The token a URI names, opened and logged in (one shared instance per module, token and PIN source).
    ///
    /// PKCS#11 login state is per process and token: once this process is logged in to a token, another URI for the
    /// same token is not asked for its PIN again (C_Login answers CKR_USER_ALREADY_LOGGED_IN without checking it).
    public static func open(_ uri: PKCS11URI, poolSize: Int = 8) throws -> PKCS11Token {
        var selector = uri
        selector.object = nil
        selector.id = nil
        selector.type = nil
        let key = selector.description + "|" + (uri.pinValue ?? "")
        if let token = tokens.withLock({ $0[key] }) { return token }
        let module = try PKCS11Module.load(try uri.resolvedModulePath())
        let token = PKCS11Token(module: module, uri: selector, pin: try uri.pin(), poolSize: poolSize)
        try token.withSession { _ in }  // finds the token and logs in now, so errors show at startup
        return tokens.withLock { table in
            if let existing = table[key] { return existing }
            table[key] = token
            return token
        }
    }

    private init(module: PKCS11Module, uri: PKCS11URI, pin: String?, poolSize: Int) {
        self.module = module
        self.uri = uri
        self.pin = pin
        self.poolSize = poolSize
    }

    var generation: Int { state.withLock { $0.generation } }

    /// The slot whose token matches the URI's token attributes.
    func findSlot() throws -> CK_SLOT_ID {
        let f = module.f
        var count: CK_ULONG = 0
        try PKCS11.check(f.C_GetSlotList!(CK_BBOOL(CK_TRUE), nil, &count), "listing the slots of \(module.path)")
        var slots = [CK_SLOT_ID](repeating: 0, count: Int(count))
        if count > 0 {
            try PKCS11.check(f.C_GetSlotList!(CK_BBOOL(CK_TRUE), &slots, &count), "listing the slots of \(module.path)")
        }
        var matches: [CK_SLOT_ID] = []
        for slot in slots.prefix(Int(count)) {
            if let wanted = uri.slotID, wanted != slot { continue }
            var info = CK_TOKEN_INFO()
            guard f.C_GetTokenInfo!(slot, &info) == CKR_OK else { continue }
            if let token = uri.token, PKCS11.text(info.label) != token { continue }
            if let manufacturer = uri.manufacturer, PKCS11.text(info.manufacturerID) != manufacturer { continue }
            if let serial = uri.serial, PKCS11.text(info.serialNumber) != serial { continue }
            if let model = uri.model, PKCS11.text(info.model) != model { continue }
            matches.append(slot)
        }
        guard let slot = matches.first else {
            throw PKCS11Error(.tokenNotFound, "no token matching \(uri) in \(module.path) (\(count) token(s) present)")
        }
        guard matches.count == 1 else {
            throw PKCS11Error(.tokenNotFound, "\(matches.count) tokens match \(uri): name one with token= or serial=")
        }
        return slot
    }

    private func openSession() throws -> CK_SESSION_HANDLE {
        let f = module.f
        let slot: CK_SLOT_ID
        if let known = state.withLock({ $0.slot }) {
            slot = known
        } else {
            do {
                slot = try findSlot()
            } catch let error as PKCS11Error where error.code == .tokenNotFound && state.withLock({ $0.wasPresent }) {
                throw PKCS11Error(.tokenRemoved, "token '\(uri.token ?? "?")' was removed while in use and is not present now")
            }
            state.withLock {
                $0.slot = slot
                $0.wasPresent = true
            }
        }
        var session: CK_SESSION_HANDLE = 0
        let flags = CK_FLAGS(CKF_SERIAL_SESSION | CKF_RW_SESSION)
        let rv = f.C_OpenSession!(slot, flags, nil, nil, &session)
        if PKCS11.meansGone(rv) { state.withLock { $0.slot = nil } }
        try PKCS11.check(rv, "opening a session on token '\(uri.token ?? "?")'")
        var info = CK_SESSION_INFO()
        if f.C_GetSessionInfo!(session, &info) == CKR_OK,
           info.state == CK_STATE(CKS_RW_USER_FUNCTIONS) || info.state == CK_STATE(CKS_RO_USER_FUNCTIONS) {
            return session
        }
        if let pin {
            var bytes = Array(pin.utf8)
            let login = f.C_Login!(session, CK_USER_TYPE(CKU_USER), &bytes, CK_ULONG(bytes.count))
            if login != CKR_OK && login != CKR_USER_ALREADY_LOGGED_IN {
                _ = f.C_CloseSession!(session)
                try PKCS11.check(login, "logging in to token '\(uri.token ?? "?")'")
            }
        } else {
            _ = f.C_CloseSession!(session)
            throw PKCS11Error(
                .pinIncorrect, "token '\(uri.token ?? "?")' needs a PIN: add pin-source=file:/path to the URI or set MUTUAL_PKCS11_PIN"
            )
        }
        return session
    }

    /// Runs `body` with a logged-in session. A "token gone" failure drops every session and is retried once with a
    /// fresh one (after a token is put back, or its sessions were closed under us).
    func withSession<T>(_ body: (CK_SESSION_HANDLE) throws -> T) throws -> T {
        var attempt = 0
        while true {
            attempt += 1
            let pooled = state.withLock { s -> CK_SESSION_HANDLE? in
                if let session = s.free.popLast() { return session }
                s.open += 1
                return nil
            }
            let session: CK_SESSION_HANDLE
            if let pooled {
                session = pooled
            } else {
                do {
                    session = try openSession()
                } catch {
                    state.withLock { $0.open -= 1 }
                    throw error
                }
            }
            do {
                let result = try body(session)
                let close = state.withLock { s -> Bool in
                    if s.free.count < poolSize {
                        s.free.append(session)
                        return false
                    }
                    s.open -= 1
                    return true
                }
                if close { _ = module.f.C_CloseSession!(session) }
                return result
            } catch let error as PKCS11Error where error.code == .tokenRemoved {
                dropSessions(also: session)
                if attempt >= 2 { throw error }
            } catch {
                state.withLock { s in
                    if s.free.count < poolSize { s.free.append(session) } else { s.open -= 1 }
                }
                throw error
            }
        }
    }

    /// Closes every session (the token went away); the next use starts over from finding the slot.
    func dropSessions(also session: CK_SESSION_HANDLE) {
        let (slot, free) = state.withLock { s -> (CK_SLOT_ID?, [CK_SESSION_HANDLE]) in
            let result = (s.slot, s.free)
            s.free = []
            s.open = 0
            s.slot = nil
            s.generation += 1
            return result
        }
        for handle in free + [session] { _ = module.f.C_CloseSession!(handle) }
        if let slot { _ = module.f.C_CloseAllSessions!(slot) }
    }
}
