import Foundation
import Logging
import NIOCore
import PostgresKit
import PostgresNIO
import SQLKit
import Synchronization

/// One PostgreSQL connection that reconnects by itself, but never in the middle of a transaction.
///
/// Hand-written because PostgresKit's pools hand out a possibly different connection per query, and the store's
/// write path needs one session for BEGIN … COMMIT. If the connection drops inside a transaction, every statement up to
/// the ROLLBACK fails (nothing half-written can be committed on a fresh connection); outside a transaction the next
/// statement reconnects. While the database is unreachable, statements fail at once with `.unavailable` (503).
final class ReconnectingPostgres: SQLDatabase, Sendable {
    struct State {
        var connection: PostgresConnection?
        var inTransaction = false
        var transactionBroken = false
    }

    let configuration: PostgresConnection.Configuration
    let logger: Logger
    let eventLoop: any EventLoop
    let dialect: any SQLDialect
    private let state = Mutex(State())
    private let connectLock = AsyncSerial()

    init(configuration: PostgresConnection.Configuration, logger: Logger, dialect: any SQLDialect) {
        self.configuration = configuration
        self.logger = logger
        self.eventLoop = PostgresConnection.defaultEventLoopGroup.any()
        self.dialect = dialect
    }

    var queryLogLevel: Logger.Level? { .trace }

    func connection() async throws -> PostgresConnection {
        if let existing = state.withLock({ $0.connection }), !existing.isClosed { return existing }
        return try await connectLock.run {
            if let existing = self.state.withLock({ $0.connection }), !existing.isClosed { return existing }
            do {
                let fresh = try await PostgresConnection.connect(on: self.eventLoop, configuration: self.configuration, id: 1, logger: self.logger)
                self.state.withLock { $0.connection = fresh }
                return fresh
            } catch {
                throw StoreError(.unavailable, "PostgreSQL is unreachable: \(Store.describe(error))")
            }
        }
    }

    func execute(sql query: any SQLExpression, _ onRow: @escaping @Sendable (any SQLRow) -> ()) -> EventLoopFuture<Void> {
        let promise = eventLoop.makePromise(of: Void.self)
        promise.completeWithTask { try await self.execute(sql: query, onRow) }
        return promise.futureResult
    }

    func execute(sql query: any SQLExpression, _ onRow: @escaping @Sendable (any SQLRow) -> ()) async throws {
        var serializer = SQLSerializer(database: self)
        query.serialize(to: &serializer)
        let text = serializer.sql.trimmingCharacters(in: .whitespaces).uppercased()
        let isBegin = text.hasPrefix("BEGIN")
        let isEnd = text.hasPrefix("COMMIT") || text.hasPrefix("ROLLBACK")

        let (inTransaction, broken) = state.withLock { ($0.inTransaction, $0.transactionBroken) }
        if inTransaction && broken {
            if isEnd {
                state.withLock { $0.inTransaction = false; $0.transactionBroken = false }
                if text.hasPrefix("ROLLBACK") { return }
            }
            throw StoreError(.unavailable, "the connection to PostgreSQL was lost inside a transaction; nothing was committed")
        }
        let connection: PostgresConnection
        if inTransaction {
            guard let current = state.withLock({ $0.connection }), !current.isClosed else {
                state.withLock { $0.transactionBroken = true }
                if text.hasPrefix("ROLLBACK") { state.withLock { $0.inTransaction = false; $0.transactionBroken = false }; return }
                throw StoreError(.unavailable, "the connection to PostgreSQL was lost inside a transaction; nothing was committed")
            }
            connection = current
        } else {
            connection = try await self.connection()
        }
        do {
            try await connection.sql(queryLogLevel: .trace).execute(sql: query, onRow)
            if isBegin { state.withLock { $0.inTransaction = true; $0.transactionBroken = false } }
            if isEnd { state.withLock { $0.inTransaction = false } }
        } catch {
            if connection.isClosed || Self.isConnectionFailure(error) {
                try? await connection.close()
                state.withLock {
                    $0.connection = nil
                    if $0.inTransaction { $0.transactionBroken = true }
                }
                if isEnd { state.withLock { $0.inTransaction = false; $0.transactionBroken = false } }
                throw StoreError(.unavailable, "lost the connection to PostgreSQL: \(Store.describe(error))")
            }
            if isEnd { state.withLock { $0.inTransaction = false } }
            throw error
        }
    }

    /// Whether an error means the session is gone (connection dropped, server shutting down or restarting: SQLSTATE
    /// classes 08 and 57), as opposed to an error in the statement itself.
    static func isConnectionFailure(_ error: any Error) -> Bool {
        guard let error = error as? PSQLError else { return false }
        guard error.code == .server, let info = error.serverInfo else { return true }
        let state = info[.sqlState] ?? ""
        return state.hasPrefix("08") || state.hasPrefix("57")
    }

    func close() async {
        let connection = state.withLock { state -> PostgresConnection? in
            defer { state.connection = nil }
            return state.connection
        }
        try? await connection?.close()
    }
}

/// Runs async closures one at a time (connecting is not re-entrant).
actor AsyncSerial {
    private var busy = false
    private var waiters: [CheckedContinuation<Void, Never>] = []

    func run<T: Sendable>(_ body: @Sendable () async throws -> T) async throws -> T {
        while busy { await withCheckedContinuation { waiters.append($0) } }
        busy = true
        defer {
            busy = false
            if !waiters.isEmpty { waiters.removeFirst().resume() }
        }
        return try await body()
    }
}

extension Store {
    /// Opens a PostgreSQL database (`postgres://user[:password]@host:port/database`) and brings its schema up to
    /// date. Several authority replicas can share it: every write transaction takes the same transaction-level
    /// advisory lock, so the audit chain, CRL numbers and the revocation log never fork.
    public static func openPostgres(url: String, logger: Logger = Logger(label: "mutual.store")) async throws -> Store {
        let configuration: SQLPostgresConfiguration
        do {
            configuration = try SQLPostgresConfiguration(url: url)
        } catch {
            throw StoreError(.unavailable, "invalid PostgreSQL URL \(Self.redacted(url)) (expected postgres://user@host:port/database?tlsmode=disable): \(error)")
        }
        var core = configuration.coreConfiguration
        core.options.connectTimeout = .seconds(5)
        // A statement (or a lock wait) that takes longer than this fails, and the request answers 503, instead of
        // holding a client and a replica's writer indefinitely.
        core.options.additionalStartupParameters.append(("statement_timeout", "15s"))
        core.options.additionalStartupParameters.append(("idle_in_transaction_session_timeout", "30s"))
        let probe: PostgresConnection
        do {
            probe = try await PostgresConnection.connect(configuration: core, id: 0, logger: logger)
        } catch {
            throw StoreError(.unavailable, "cannot connect to PostgreSQL at \(Self.redacted(url)): \(Store.describe(error))")
        }
        let dialect = probe.sql().dialect
        try? await probe.close()
        let writer = ReconnectingPostgres(configuration: core, logger: logger, dialect: dialect)
        let reader = ReconnectingPostgres(configuration: core, logger: logger, dialect: dialect)
        do {
            try await Schema.migrate(writer, types: .postgres, begin: "BEGIN", lock: Self.postgresLock)
        } catch {
            await writer.close()
            throw error
        }
        return Store(
            writer: writer, reader: reader, begin: "BEGIN", lock: Self.postgresLock, logger: logger,
            close: {
                await reader.close()
                await writer.close()
            }
        )
    }

    /// Every write transaction on PostgreSQL starts with this: one writer at a time across all replicas.
    static let postgresLock = "SELECT pg_advisory_xact_lock(7275162584)"

    /// PSQLError's `description` is deliberately generic; its reflection names the actual cause (connection refused,
    /// authentication failed, database does not exist) without the password.
    static func describe(_ error: any Error) -> String {
        String(String(reflecting: error).prefix(300))
    }

    static func redacted(_ url: String) -> String {
        guard var components = URLComponents(string: url) else { return "(unparsable URL)" }
        if components.password != nil { components.password = "***" }
        return components.string ?? "(unparsable URL)"
    }

    /// Opens PostgreSQL for `postgres://` URLs, else SQLite at `sqlitePath`.
    public static func open(databaseURL: String?, sqlitePath: String, logger: Logger = Logger(label: "mutual.store")) async throws -> Store {
        if let databaseURL, databaseURL.hasPrefix("postgres://") || databaseURL.hasPrefix("postgresql://") {
            return try await openPostgres(url: databaseURL, logger: logger)
        }
        return try await openSQLite(path: sqlitePath, logger: logger)
    }
}
