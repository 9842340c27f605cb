import SQLKit

/// Versioned schema migrations, shared by every SQL database Mutual runs on. Each migration runs once, in order, inside
/// a transaction, and is recorded in `schema_migrations`.
enum Schema {
    /// Column type names that differ between databases; everything else is portable SQL.
    struct Types {
        var blob: String
        var bigint: String

        static let sqlite = Types(blob: "BLOB", bigint: "INTEGER")
        static let postgres = Types(blob: "BYTEA", bigint: "BIGINT")
    }

    /// The migrations, in order. Never edit a published one: append a new one.
    static func migrations(_ t: Types) -> [(version: Int, statements: [String])] {
        [
            (
                1,
                [
                    """
                    CREATE TABLE certificates (
                        serial TEXT PRIMARY KEY,
                        issuer TEXT NOT NULL,
                        subject TEXT NOT NULL,
                        sans TEXT NOT NULL,
                        identity TEXT NOT NULL,
                        profile TEXT NOT NULL,
                        owner TEXT,
                        requester TEXT NOT NULL,
                        not_before \(t.bigint) NOT NULL,
                        not_after \(t.bigint) NOT NULL,
                        fingerprint TEXT NOT NULL,
                        der \(t.blob) NOT NULL,
                        status TEXT NOT NULL,
                        revoked_at \(t.bigint),
                        revocation_reason TEXT,
                        created_at \(t.bigint) NOT NULL
                    )
                    """,
                    "CREATE INDEX certificates_not_after ON certificates (not_after)",
                    "CREATE INDEX certificates_identity ON certificates (identity, not_after)",
                    "CREATE INDEX certificates_status ON certificates (status, not_after)",
                    """
                    CREATE TABLE audit_events (
                        sequence \(t.bigint) PRIMARY KEY,
                        time TEXT NOT NULL,
                        actor TEXT NOT NULL,
                        action TEXT NOT NULL,
                        subject TEXT NOT NULL,
                        details TEXT NOT NULL,
                        previous_hash TEXT NOT NULL,
                        hash TEXT NOT NULL
                    )
                    """,
                    "CREATE TABLE metadata (key TEXT PRIMARY KEY, value TEXT NOT NULL)",
                ]
            ),
            (
                2,
                [
                    """
                    CREATE TABLE tokens (
                        id TEXT PRIMARY KEY,
                        secret_hash TEXT NOT NULL,
                        scopes TEXT NOT NULL,
                        profile TEXT NOT NULL,
                        max_validity \(t.bigint) NOT NULL,
                        expires_at \(t.bigint) NOT NULL,
                        uses_allowed \(t.bigint) NOT NULL,
                        uses_consumed \(t.bigint) NOT NULL,
                        owner TEXT,
                        created_at \(t.bigint) NOT NULL,
                        revoked_at \(t.bigint)
                    )
                    """
                ]
            ),
            (
                3,
                [
                    """
                    CREATE TABLE revocation_log (
                        sequence \(t.bigint) PRIMARY KEY,
                        serial TEXT NOT NULL,
                        reason TEXT NOT NULL,
                        revoked_at \(t.bigint) NOT NULL
                    )
                    """,
                    """
                    CREATE TABLE crls (
                        number \(t.bigint) PRIMARY KEY,
                        this_update \(t.bigint) NOT NULL,
                        next_update \(t.bigint) NOT NULL,
                        last_revocation \(t.bigint) NOT NULL,
                        der \(t.blob) NOT NULL
                    )
                    """,
                ]
            ),
            (
                4,
                [
                    // Renewal lineage: a certificate's successors are the rows whose requester is `cert:<its serial>`.
                    "CREATE INDEX certificates_requester ON certificates (requester)"
                ]
            ),
            (
                5,
                [
                    // ACME (RFC 8555): each object's JSON in `body`; the columns queried or updated conditionally
                    // beside it.
                    """
                    CREATE TABLE acme_accounts (
                        id TEXT PRIMARY KEY,
                        provisioner TEXT NOT NULL,
                        thumbprint TEXT NOT NULL,
                        status TEXT NOT NULL,
                        body TEXT NOT NULL,
                        created_at \(t.bigint) NOT NULL
                    )
                    """,
                    "CREATE UNIQUE INDEX acme_accounts_key ON acme_accounts (provisioner, thumbprint)",
                    """
                    CREATE TABLE acme_orders (
                        id TEXT PRIMARY KEY,
                        account_id TEXT NOT NULL,
                        status TEXT NOT NULL,
                        expires \(t.bigint) NOT NULL,
                        body TEXT NOT NULL,
                        created_at \(t.bigint) NOT NULL
                    )
                    """,
                    "CREATE INDEX acme_orders_account ON acme_orders (account_id, created_at)",
                    """
                    CREATE TABLE acme_authorizations (
                        id TEXT PRIMARY KEY,
                        order_id TEXT NOT NULL,
                        account_id TEXT NOT NULL,
                        status TEXT NOT NULL,
                        body TEXT NOT NULL
                    )
                    """,
                    "CREATE INDEX acme_authorizations_order ON acme_authorizations (order_id)",
                    "CREATE TABLE acme_used_nonces (nonce TEXT PRIMARY KEY, expires_at \(t.bigint) NOT NULL)",
                    "CREATE INDEX acme_used_nonces_expiry ON acme_used_nonces (expires_at)",
                    // External Account Binding keys (RFC 8555 7.3.4): the HMAC key is needed to check bindings, so it
                    // is stored; each binds one account.
                    """
                    CREATE TABLE acme_eab_keys (
                        kid TEXT PRIMARY KEY,
                        provisioner TEXT NOT NULL,
                        owner TEXT NOT NULL,
                        hmac_key TEXT NOT NULL,
                        created_at \(t.bigint) NOT NULL,
                        account_id TEXT
                    )
                    """,
                ]
            ),
            (
                6,
                [
                    // The dashboard's filters, aggregates and lineage each served by an index, so its pages stay fast
                    // with a large inventory.
                    // Whether a certificate has been renewed (some row's requester is `cert:<its serial>`), kept with
                    // each insert: lapses and missed renewals are then index ranges, not a lookup per row.
                    "ALTER TABLE certificates ADD COLUMN renewed \(t.bigint) NOT NULL DEFAULT 0",
                    "UPDATE certificates SET renewed = 1 WHERE serial IN (SELECT substr(requester, 6) FROM certificates WHERE requester LIKE 'cert:%')",
                    // Replaces certificates_status (same leading columns) and covers every count of the overview:
                    // by status and expiry, lapses and missed renewals (renewed, not_before), by owner and profile.
                    "CREATE INDEX certificates_lifecycle ON certificates (status, not_after, renewed, not_before, owner, profile)",
                    "DROP INDEX certificates_status",
                    // Replaces certificates_not_after: lists in expiry order filtered by owner or profile read the
                    // filter from the index, not from each row.
                    "CREATE INDEX certificates_expiry ON certificates (not_after, owner, profile)",
                    "DROP INDEX certificates_not_after",
                    // A certificate's audit events: the one that recorded it (issue or renewal) by its number, kept on
                    // the row; the rest (revoke, …: few) through a partial index. Indexing every issuance event by its
                    // random serial cost ~8 % of durable issuance throughput.
                    "ALTER TABLE certificates ADD COLUMN issued_event \(t.bigint)",
                    "CREATE INDEX audit_events_subject_all ON audit_events (subject)",
                    "UPDATE certificates SET issued_event = (SELECT MAX(a.sequence) FROM audit_events a WHERE a.subject = certificates.serial AND a.action IN ('issue', 'renew', 'renew-expired'))",
                    "DROP INDEX audit_events_subject_all",
                    "CREATE INDEX audit_events_subject ON audit_events (subject, sequence) WHERE \(Store.unrecordedActions)",
                    // Every index is paid for by every issuance, so there is no index of its own for owner, profile,
                    // issuer, notBefore (issuance per day scans certificates_lifecycle, which holds it) or revoked_at (revoked rows
                    // come from the status index, and are few).
                    // One-time dashboard login codes (`mutual dashboard login`): only the SHA-256 of the code is kept.
                    """
                    CREATE TABLE dashboard_logins (
                        code_hash TEXT PRIMARY KEY,
                        role TEXT NOT NULL,
                        actor TEXT NOT NULL,
                        session_seconds \(t.bigint) NOT NULL,
                        expires_at \(t.bigint) NOT NULL,
                        created_at \(t.bigint) NOT NULL,
                        used_at \(t.bigint)
                    )
                    """,
                ]
            ),
            (
                7,
                [
                    // The key types a token allows (JSON array, e.g. ["ml-dsa-65"]); NULL: any key Mutual accepts.
                    "ALTER TABLE tokens ADD COLUMN key_types TEXT",
                ]
            ),
        ]
    }

    static var latestVersion: Int { migrations(.sqlite).last!.version }

    static func migrate(_ db: any SQLDatabase, types: Types, begin: String, lock: String? = nil) async throws {
        if let lock {
            // Replicas starting together: one migrates, the others wait and then find nothing to do.
            try await db.raw(SQLQueryString(begin)).run()
            _ = try await db.raw(SQLQueryString(lock)).all()
            try await db.raw("CREATE TABLE IF NOT EXISTS schema_migrations (version INTEGER PRIMARY KEY, applied_at TEXT NOT NULL)").run()
            try await db.raw("COMMIT").run()
        }
        try await db.raw("CREATE TABLE IF NOT EXISTS schema_migrations (version INTEGER PRIMARY KEY, applied_at TEXT NOT NULL)").run()
        let rows = try await db.raw("SELECT version FROM schema_migrations").all()
        let applied = Set(try rows.map { Int(try $0.decode(column: "version", as: Int64.self)) })
        if let newest = applied.max(), newest > latestVersion {
            throw StoreError(.incompatibleSchema, "the database schema is version \(newest); this mutual understands up to \(latestVersion): upgrade mutual")
        }
        for migration in migrations(types) where !applied.contains(migration.version) {
            try await db.raw(SQLQueryString(begin)).run()
            do {
                if let lock {
                    _ = try await db.raw(SQLQueryString(lock)).all()
                    let again = try await db.raw("SELECT version FROM schema_migrations WHERE version = \(bind: migration.version)").all()
                    if !again.isEmpty {
                        try await db.raw("COMMIT").run()
                        continue
                    }
                }
                for statement in migration.statements {
                    try await db.raw(SQLQueryString(statement)).run()
                }
                try await db.raw("INSERT INTO schema_migrations (version, applied_at) VALUES (\(bind: migration.version), \(bind: AuditChain.format(.now)))").run()
                try await db.raw("COMMIT").run()
            } catch {
                try? await db.raw("ROLLBACK").run()
                throw error
            }
        }
    }
}

import Foundation
