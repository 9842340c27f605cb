/// An error raised by the store. Growable code, human reason, no secrets.
public struct StoreError: Error, Hashable, Sendable, CustomStringConvertible {
    public struct Code: Hashable, Sendable, CustomStringConvertible {
        public let name: String
        private init(_ name: String) { self.name = name }
        /// The database could not be opened or is not a Mutual database.
        public static let unavailable = Code("store-unavailable")
        /// The schema is newer than this binary understands, or corrupt.
        public static let incompatibleSchema = Code("incompatible-schema")
        /// The record asked for does not exist.
        public static let notFound = Code("not-found")
        /// A write conflicts with existing state (duplicate serial, already revoked, ...).
        public static let conflict = Code("conflict")
        /// A query failed.
        public static let queryFailed = Code("query-failed")
        public var description: String { name }
    }

    public var code: Code
    public var reason: String

    public init(_ code: Code, _ reason: String) {
        self.code = code
        self.reason = reason
    }

    public var description: String { reason }
}
