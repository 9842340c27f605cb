/// A failure talking to a PKCS#11 token. ``code`` is stable (scripts, `/readyz`, logs branch on it); ``reason`` is
/// for people and names the token, object or module; ``returnValue`` is the module's CKR_* when there was one.
public struct PKCS11Error: Error, Hashable, Sendable, CustomStringConvertible {
    public struct Code: Hashable, Sendable, CustomStringConvertible {
        public let name: String
        private init(_ name: String) { self.name = name }
        /// The URI is not a valid RFC 7512 PKCS#11 URI or lacks what Mutual needs (the module).
        public static let badURI = Code("pkcs11-bad-uri")
        /// The module could not be loaded (missing file, not a PKCS#11 module, C_Initialize failed).
        public static let moduleUnloadable = Code("pkcs11-module-unloadable")
        /// No slot holds a token matching the URI.
        public static let tokenNotFound = Code("pkcs11-token-not-found")
        /// The token has no key matching the URI's object/id.
        public static let objectNotFound = Code("pkcs11-object-not-found")
        /// More than one key matches: the URI must name one (add `id=`).
        public static let objectAmbiguous = Code("pkcs11-object-ambiguous")
        /// The token refused the PIN.
        public static let pinIncorrect = Code("pkcs11-pin-incorrect")
        /// The PIN is locked after too many wrong attempts.
        public static let pinLocked = Code("pkcs11-pin-locked")
        /// The PIN file named by pin-source could not be read.
        public static let pinUnreadable = Code("pkcs11-pin-unreadable")
        /// The token went away while in use (removed, device error, sessions closed under us).
        public static let tokenRemoved = Code("pkcs11-token-removed")
        /// The key is of a type or curve Mutual does not sign with, or the token lacks the mechanism.
        public static let unsupportedKey = Code("pkcs11-unsupported-key")
        /// An object with this label already exists where a new key was to be generated.
        public static let objectExists = Code("pkcs11-object-exists")
        /// Any other CKR_* failure (the value is in ``returnValue``).
        public static let failed = Code("pkcs11-failed")
        public var description: String { name }
    }

    public var code: Code
    public var reason: String
    public var returnValue: UInt?

    public init(_ code: Code, _ reason: String, returnValue: UInt? = nil) {
        self.code = code
        self.reason = reason
        self.returnValue = returnValue
    }

    public var description: String { reason }
}
