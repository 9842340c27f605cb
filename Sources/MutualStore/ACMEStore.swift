import Foundation
import SQLKit

/// An ACME object as stored: its JSON body and the columns that are queried or updated conditionally.
public struct ACMERow: Sendable, Equatable {
    public var id: String
    public var status: String
    public var body: String

    public init(id: String, status: String, body: String) {
        self.id = id
        self.status = status
        self.body = body
    }
}

/// One change of ACME state. Updates name the statuses they move from: if the row is no longer in one of them
/// (another request or replica moved it first), the whole transaction fails with `.conflict` and nothing is written.
public enum ACMEStep: Sendable {
    /// Records a nonce as used; `.conflict` if it already was (a replay).
    case useNonce(String, expires: Date, now: Date)
    case insertAccount(ACMERow, provisioner: String, thumbprint: String, created: Date)
    case updateAccount(ACMERow, from: [String], thumbprint: String)
    case insertOrder(ACMERow, accountID: String, expires: Date, created: Date)
    case updateOrder(ACMERow, from: [String])
    case insertAuthorization(ACMERow, orderID: String, accountID: String)
    case updateAuthorization(ACMERow, from: [String])
    case insertEAB(ACMEEABKey)
    /// Binds an unused EAB key to an account; `.conflict` if it is bound already.
    case bindEAB(kid: String, accountID: String)
}

/// An External Account Binding key: made by an operator for a team, bound to the first account that uses it.
public struct ACMEEABKey: Sendable, Equatable {
    public var kid: String
    public var provisioner: String
    public var owner: String
    /// The HMAC key, base64url.
    public var hmacKey: String
    public var createdAt: Date
    public var accountID: String?

    public init(kid: String, provisioner: String, owner: String, hmacKey: String, createdAt: Date, accountID: String? = nil) {
        self.kid = kid
        self.provisioner = provisioner
        self.owner = owner
        self.hmacKey = hmacKey
        self.createdAt = createdAt
        self.accountID = accountID
    }
}

extension WriteQueue {
    func apply(_ step: ACMEStep) async throws {
        switch step {
        case .useNonce(let nonce, let expires, let now):
            // Forget nonces that can no longer be accepted anyway, then claim this one.
            try await db.raw("DELETE FROM acme_used_nonces WHERE expires_at < \(bind: Int64(now.timeIntervalSince1970))").run()
            do {
                try await db.raw("INSERT INTO acme_used_nonces (nonce, expires_at) VALUES (\(bind: nonce), \(bind: Int64(expires.timeIntervalSince1970)))").run()
            } catch where Self.isUniqueViolation(error) {
                throw StoreError(.conflict, "nonce already used")
            }
        case .insertAccount(let row, let provisioner, let thumbprint, let created):
            do {
                try await db.raw("""
                    INSERT INTO acme_accounts (id, provisioner, thumbprint, status, body, created_at)
                    VALUES (\(bind: row.id), \(bind: provisioner), \(bind: thumbprint), \(bind: row.status), \(bind: row.body), \(bind: Int64(created.timeIntervalSince1970)))
                    """).run()
            } catch where Self.isUniqueViolation(error) {
                throw StoreError(.conflict, "an account with this key already exists")
            }
        case .updateAccount(let row, let from, let thumbprint):
            do {
                try await conditionalUpdate(
                    "UPDATE acme_accounts SET status = \(bind: row.status), body = \(bind: row.body), thumbprint = \(bind: thumbprint) WHERE id = \(bind: row.id)",
                    from: from, what: "account \(row.id)"
                )
            } catch where Self.isUniqueViolation(error) {
                throw StoreError(.conflict, "another account already uses this key")
            }
        case .insertOrder(let row, let accountID, let expires, let created):
            try await db.raw("""
                INSERT INTO acme_orders (id, account_id, status, expires, body, created_at)
                VALUES (\(bind: row.id), \(bind: accountID), \(bind: row.status), \(bind: Int64(expires.timeIntervalSince1970)), \(bind: row.body), \(bind: Int64(created.timeIntervalSince1970)))
                """).run()
        case .updateOrder(let row, let from):
            try await conditionalUpdate(
                "UPDATE acme_orders SET status = \(bind: row.status), body = \(bind: row.body) WHERE id = \(bind: row.id)", from: from, what: "order \(row.id)"
            )
        case .insertAuthorization(let row, let orderID, let accountID):
            try await db.raw("""
                INSERT INTO acme_authorizations (id, order_id, account_id, status, body)
                VALUES (\(bind: row.id), \(bind: orderID), \(bind: accountID), \(bind: row.status), \(bind: row.body))
                """).run()
        case .insertEAB(let key):
            try await db.raw("""
                INSERT INTO acme_eab_keys (kid, provisioner, owner, hmac_key, created_at)
                VALUES (\(bind: key.kid), \(bind: key.provisioner), \(bind: key.owner), \(bind: key.hmacKey), \(bind: Int64(key.createdAt.timeIntervalSince1970)))
                """).run()
        case .bindEAB(let kid, let accountID):
            let bound = try await db.raw("UPDATE acme_eab_keys SET account_id = \(bind: accountID) WHERE kid = \(bind: kid) AND account_id IS NULL RETURNING kid").all()
            guard !bound.isEmpty else { throw StoreError(.conflict, "EAB key \(kid) is already bound to an account") }
        case .updateAuthorization(let row, let from):
            try await conditionalUpdate(
                "UPDATE acme_authorizations SET status = \(bind: row.status), body = \(bind: row.body) WHERE id = \(bind: row.id)",
                from: from, what: "authorization \(row.id)"
            )
        }
    }

    /// Runs `update` restricted to rows still in one of `from`; `.conflict` when none matched.
    private func conditionalUpdate(_ update: SQLQueryString, from: [String], what: String) async throws {
        var query = update
        query.appendLiteral(" AND status IN (")
        for (index, status) in from.enumerated() {
            if index > 0 { query.appendLiteral(", ") }
            query.appendInterpolation(bind: status)
        }
        query.appendLiteral(") RETURNING id")
        guard try await !db.raw(query).all().isEmpty else {
            throw StoreError(.conflict, "\(what) changed meanwhile (expected status \(from.joined(separator: " or ")))")
        }
    }
}

extension Store {
    /// Applies ACME steps, records `certificate` (if any) and appends `audit`, in one transaction; returns once durable.
    public func acme(_ steps: [ACMEStep], certificate: CertificateRecord? = nil, audit: [AuditEntry] = []) async throws {
        _ = try await queue.submit(.acme(steps, certificate, audit))
    }

    /// Stores `value` under `key` unless a value is there already; returns the value in force (so replicas starting
    /// together agree on one).
    public func metadataSettingIfAbsent(_ key: String, value: String) async throws -> String {
        _ = try await queue.submit(.metadataIfAbsent(key: key, value: value))
        guard let stored = try await writerMetadata(key) else { throw StoreError(.queryFailed, "metadata \(key) missing after insert") }
        return stored
    }

    private func writerMetadata(_ key: String) async throws -> String? {
        try await reader.raw("SELECT value FROM metadata WHERE key = \(bind: key)").first()?.decode(column: "value", as: String.self)
    }

    public func acmeAccount(id: String) async throws -> ACMERow? {
        try await reader.raw("SELECT id, status, body FROM acme_accounts WHERE id = \(bind: id)").first().map(Self.decodeACME)
    }

    public func acmeAccount(provisioner: String, thumbprint: String) async throws -> ACMERow? {
        try await reader.raw("SELECT id, status, body FROM acme_accounts WHERE provisioner = \(bind: provisioner) AND thumbprint = \(bind: thumbprint)")
            .first().map(Self.decodeACME)
    }

    public func acmeAccounts() async throws -> [ACMERow] {
        try await reader.raw("SELECT id, status, body FROM acme_accounts ORDER BY created_at, id").all().map(Self.decodeACME)
    }

    public func acmeOrder(id: String) async throws -> ACMERow? {
        try await reader.raw("SELECT id, status, body FROM acme_orders WHERE id = \(bind: id)").first().map(Self.decodeACME)
    }

    /// An account's orders, oldest first, at most `limit`; all accounts' with `account` nil.
    public func acmeOrders(account: String?, limit: Int = 1000) async throws -> [ACMERow] {
        if let account {
            return try await reader.raw("SELECT id, status, body FROM acme_orders WHERE account_id = \(bind: account) ORDER BY created_at, id LIMIT \(bind: limit)")
                .all().map(Self.decodeACME)
        }
        return try await reader.raw("SELECT id, status, body FROM acme_orders ORDER BY created_at, id LIMIT \(bind: limit)").all().map(Self.decodeACME)
    }

    public func acmeAuthorization(id: String) async throws -> ACMERow? {
        try await reader.raw("SELECT id, status, body FROM acme_authorizations WHERE id = \(bind: id)").first().map(Self.decodeACME)
    }

    public func acmeAuthorizations(order: String) async throws -> [ACMERow] {
        try await reader.raw("SELECT id, status, body FROM acme_authorizations WHERE order_id = \(bind: order) ORDER BY id").all().map(Self.decodeACME)
    }

    /// Orders an account created since `since`, and the oldest of them (for Retry-After).
    public func acmeOrderCount(account: String, since: Date) async throws -> (count: Int, oldest: Date?) {
        let row = try await reader.raw("SELECT COUNT(*) AS n, MIN(created_at) AS oldest FROM acme_orders WHERE account_id = \(bind: account) AND created_at >= \(bind: Int64(since.timeIntervalSince1970))").first()
        let count = try row.map { Int(try $0.decode(column: "n", as: Int64.self)) } ?? 0
        let oldest = try row.flatMap { try $0.decodeNil(column: "oldest") ? nil : Date(timeIntervalSince1970: Double(try $0.decode(column: "oldest", as: Int64.self))) }
        return (count, oldest)
    }

    /// Certificates recorded since `since` that name `san` (`dns:name`, `ip:address`), and the oldest of them.
    public func certificateCount(san: String, since: Date) async throws -> (count: Int, oldest: Date?) {
        // `sans` is a JSON array of strings; a name in quotes matches one whole element. Names never hold quotes or
        // LIKE wildcards (they are validated DNS names or IP addresses), so no escaping is needed beyond refusing them.
        guard !san.contains(where: { $0 == "\"" || $0 == "%" || $0 == "_" || $0 == "\\" }) else { return (0, nil) }
        let row = try await reader.raw("SELECT COUNT(*) AS n, MIN(created_at) AS oldest FROM certificates WHERE created_at >= \(bind: Int64(since.timeIntervalSince1970)) AND sans LIKE \(bind: "%\"" + san + "\"%")").first()
        let count = try row.map { Int(try $0.decode(column: "n", as: Int64.self)) } ?? 0
        let oldest = try row.flatMap { try $0.decodeNil(column: "oldest") ? nil : Date(timeIntervalSince1970: Double(try $0.decode(column: "oldest", as: Int64.self))) }
        return (count, oldest)
    }

    public func acmeEABKey(kid: String) async throws -> ACMEEABKey? {
        try await reader.raw("SELECT * FROM acme_eab_keys WHERE kid = \(bind: kid)").first().map(Self.decodeEAB)
    }

    public func acmeEABKeys() async throws -> [ACMEEABKey] {
        try await reader.raw("SELECT * FROM acme_eab_keys ORDER BY created_at, kid").all().map(Self.decodeEAB)
    }

    static func decodeEAB(_ row: any SQLRow) throws -> ACMEEABKey {
        ACMEEABKey(
            kid: try row.decode(column: "kid", as: String.self), provisioner: try row.decode(column: "provisioner", as: String.self),
            owner: try row.decode(column: "owner", as: String.self), hmacKey: try row.decode(column: "hmac_key", as: String.self),
            createdAt: Date(timeIntervalSince1970: Double(try row.decode(column: "created_at", as: Int64.self))),
            accountID: try row.decode(column: "account_id", as: String?.self)
        )
    }

    static func decodeACME(_ row: any SQLRow) throws -> ACMERow {
        ACMERow(
            id: try row.decode(column: "id", as: String.self), status: try row.decode(column: "status", as: String.self),
            body: try row.decode(column: "body", as: String.self)
        )
    }
}
