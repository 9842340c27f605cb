/// Errors of the authority's rules (state directory, issuance, revocation). Growable code, human reason.
public struct AuthorityError: Error, Hashable, Sendable, CustomStringConvertible {
    public struct Code: Hashable, Sendable, CustomStringConvertible {
        public let name: String
        private init(_ name: String) { self.name = name }
        public static let notInitialized = Code("not-initialized")
        public static let alreadyInitialized = Code("already-initialized")
        public static let corruptState = Code("corrupt-state")
        public static let notFound = Code("not-found")
        public static let conflict = Code("conflict")
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
