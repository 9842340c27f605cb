/// An error raised by the PKI core.
///
/// A struct with a growable ``Code`` rather than a public enum, so new failure kinds can be added without breaking
/// callers. ``reason`` is written for a person and never contains key material.
public struct PKIError: Error, Hashable, Sendable, CustomStringConvertible {
    /// What kind of failure this is. Stable: scripts and the HTTP layer map on it.
    public struct Code: Hashable, Sendable, CustomStringConvertible {
        public let name: String
        private init(_ name: String) { self.name = name }

        /// Input could not be decoded (PEM, DER, CSR, key).
        public static let malformedInput = Code("malformed-input")
        /// Input larger than the limit for its kind.
        public static let inputTooLarge = Code("input-too-large")
        /// A signature did not verify (CSR proof of possession, CRL, certificate).
        public static let badSignature = Code("bad-signature")
        /// A subject or SAN that is not syntactically valid for its type.
        public static let invalidName = Code("invalid-name")
        /// A name outside the issuing CA's name constraints.
        public static let nameNotPermitted = Code("name-not-permitted")
        /// A request that the profile does not allow (wrong SAN kind, CA bit, missing SAN, ...).
        public static let profileViolation = Code("profile-violation")
        /// A requested validity that is longer than the CA allows.
        public static let validityTooLong = Code("validity-too-long")
        /// A key type or algorithm that is not supported.
        public static let unsupportedKey = Code("unsupported-key")
        /// The passphrase for an encrypted key was wrong or missing.
        public static let wrongPassphrase = Code("wrong-passphrase")
        /// A duration string that could not be parsed.
        public static let invalidDuration = Code("invalid-duration")
        /// The CA's own material is inconsistent (key does not match certificate, ...).
        public static let inconsistentCA = Code("inconsistent-ca")

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
