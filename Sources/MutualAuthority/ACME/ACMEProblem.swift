import Foundation

/// An ACME refusal (RFC 8555 6.7): one of the `urn:ietf:params:acme:error:` types, the HTTP status it is sent with,
/// and words for people. Code branches on `type`, never on `detail`.
public struct ACMEProblem: Error, Sendable, Equatable, CustomStringConvertible {
    public enum Kind: String, Sendable, CaseIterable {
        case accountDoesNotExist, alreadyRevoked, badCSR, badNonce, badPublicKey, badRevocationReason,
             badSignatureAlgorithm, caa, compound, connection, dns, externalAccountRequired, incorrectResponse,
             invalidContact, malformed, orderNotReady, rateLimited, rejectedIdentifier, serverInternal, tls,
             unauthorized, unsupportedContact, unsupportedIdentifier, userActionRequired, invalidProfile, alreadyReplaced

        /// The status RFC 8555 and common servers send it with.
        public var status: Int {
            switch self {
            case .unauthorized, .alreadyRevoked: return 403
            case .accountDoesNotExist: return 400
            case .orderNotReady, .alreadyReplaced: return 403
            case .rateLimited: return 429
            case .serverInternal: return 500
            case .externalAccountRequired, .userActionRequired: return 403
            default: return 400
            }
        }
    }

    public var kind: Kind
    public var detail: String
    /// Overrides the kind's usual status (404 for an unknown resource, 405 for a GET where a POST is needed, ...).
    public var status: Int
    /// Per-identifier problems of a `compound` or `rejectedIdentifier` problem.
    public var subproblems: [Subproblem]
    /// Seconds a `rateLimited` client should wait.
    public var retryAfter: Int?

    public struct Subproblem: Sendable, Equatable, Codable {
        public var type: String
        public var detail: String
        public var identifier: ACMEIdentifier?
    }

    public init(_ kind: Kind, _ detail: String, status: Int? = nil, subproblems: [Subproblem] = [], retryAfter: Int? = nil) {
        self.kind = kind
        self.detail = detail
        self.status = status ?? kind.status
        self.subproblems = subproblems
        self.retryAfter = retryAfter
    }

    public var type: String { "urn:ietf:params:acme:error:\(kind.rawValue)" }
    public var description: String { "\(kind.rawValue): \(detail)" }

    /// The problem document (`application/problem+json`).
    public var document: ACMEProblemDocument {
        ACMEProblemDocument(type: type, detail: detail, status: status, subproblems: subproblems.isEmpty ? nil : subproblems)
    }
}

/// A problem as stored on a challenge, an authorization's failure, or an order's `error`.
public struct ACMEProblemDocument: Sendable, Equatable, Codable {
    public var type: String
    public var detail: String
    public var status: Int?
    public var subproblems: [ACMEProblem.Subproblem]?
}
