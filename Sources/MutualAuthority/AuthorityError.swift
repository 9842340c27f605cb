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
        /// No credential was presented (no token, no client certificate).
        public static let unauthenticated = Code("unauthenticated")
        /// The token is malformed or unknown.
        public static let tokenInvalid = Code("token-invalid")
        public static let tokenExpired = Code("token-expired")
        public static let tokenUsedUp = Code("token-used-up")
        public static let tokenRevoked = Code("token-revoked")
        /// A requested name is outside the token's scope patterns.
        public static let tokenOutOfScope = Code("token-out-of-scope")
        /// The request asks for another profile or a longer validity than the token allows.
        public static let tokenNotAllowed = Code("token-not-allowed")
        /// The client certificate may not do this (wrong profile, another certificate's record).
        public static let certificateRefused = Code("certificate-refused")
        /// The request is understood but refused by policy (renewal of an expired certificate outside the grace window).
        public static let forbidden = Code("forbidden")
        /// A proof of possession that is malformed or does not verify against the certificate's key.
        public static let proofInvalid = Code("proof-invalid")
        /// A proof of possession whose timestamp is more than five minutes from the authority's clock: the client's
        /// clock is off (the answer's `Date` header is the authority's time).
        public static let clockSkew = Code("clock-skew")
        /// The presented certificate was revoked.
        public static let certificateRevoked = Code("certificate-revoked")
        /// The presented certificate is past its notAfter by the authority's clock.
        public static let certificateExpired = Code("certificate-expired")
        /// The presented certificate is before its notBefore by the authority's clock.
        public static let certificateNotYetValid = Code("certificate-not-yet-valid")
        /// The presented certificate is not one this authority issued (or not exactly as issued).
        public static let certificateUnknown = Code("certificate-unknown")
        /// A proof of possession that was already used.
        public static let proofReplayed = Code("proof-replayed")
        /// `/v1/renew-expired` is off on this authority (`--renew-expired-grace` not set).
        public static let renewExpiredDisabled = Code("renew-expired-disabled")
        /// The certificate expired longer ago than the renewal grace window.
        public static let beyondGrace = Code("beyond-grace")
        /// The identity is being moved to ML-DSA (`mutual pq migrate`): its next certificate must be for an ML-DSA key
        /// (the parameter set is in ``AuthorityError/details`` under `key_type`).
        public static let keyTypeRequired = Code("key-type-required")
        /// Another CA rotation is under way: finish it (activate, retire) before starting one.
        public static let rotationInProgress = Code("rotation-in-progress")
        /// `activate` or `retire` with nothing at the stage before it.
        public static let rotationNotPrepared = Code("rotation-not-prepared")
        /// `retire` while certificates of the old CA are still valid (the details name how many, and whose).
        public static let caStillInUse = Code("ca-still-in-use")
        /// Making or cross-signing a CA needs the root key, which is not where it should be (taken offline).
        public static let rootKeyUnavailable = Code("root-key-unavailable")
        public var description: String { name }
    }

    public var code: Code
    public var reason: String
    /// Machine-readable members beside the code (an RFC 9457 problem's extension members), e.g. `key_type`.
    public var details: [String: String] = [:]

    public init(_ code: Code, _ reason: String, details: [String: String] = [:]) {
        self.code = code
        self.reason = reason
        self.details = details
    }

    public var description: String { reason }
}
