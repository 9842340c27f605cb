import Foundation

/// One issued certificate as the inventory holds it.
public struct CertificateRecord: Sendable, Hashable, Codable {
    public enum Status: String, Sendable, Codable, CaseIterable {
        case valid
        case revoked
    }

    /// Serial number, lowercase hex.
    public var serial: String
    public var issuer: String
    public var subject: String
    /// SANs as text, each prefixed by its kind: `dns:`, `ip:`, `uri:`.
    public var subjectAlternativeNames: [String]
    /// The identity the certificate asserts: the SPIFFE ID, else the first SAN, else the subject CN.
    public var identity: String
    public var profile: String
    public var owner: String?
    /// Who asked for it: `cli:<user>`, `token:<id>`, `cert:<serial>`.
    public var requester: String
    public var notBefore: Date
    public var notAfter: Date
    /// SHA-256 of the DER, lowercase hex.
    public var fingerprint: String
    public var der: [UInt8]
    public var status: Status
    public var revokedAt: Date?
    public var revocationReason: String?
    /// The newest certificate renewed from this one (lineage; filled by queries, never stored in this row).
    public var successor: String?

    /// The certificate this one was renewed from, when it was issued by renewal (`requester` `cert:<serial>`).
    public var predecessor: String? {
        requester.hasPrefix("cert:") ? String(requester.dropFirst(5)) : nil
    }

    public init(
        serial: String, issuer: String, subject: String, subjectAlternativeNames: [String], identity: String,
        profile: String, owner: String?, requester: String, notBefore: Date, notAfter: Date, fingerprint: String,
        der: [UInt8], status: Status = .valid, revokedAt: Date? = nil, revocationReason: String? = nil, successor: String? = nil
    ) {
        self.successor = successor
        self.serial = serial
        self.issuer = issuer
        self.subject = subject
        self.subjectAlternativeNames = subjectAlternativeNames
        self.identity = identity
        self.profile = profile
        self.owner = owner
        self.requester = requester
        self.notBefore = notBefore
        self.notAfter = notAfter
        self.fingerprint = fingerprint
        self.der = der
        self.status = status
        self.revokedAt = revokedAt
        self.revocationReason = revocationReason
    }

    /// `valid`, `superseded` (expired after a renewal replaced it: routine), `expired` (expired with no successor: a
    /// lapse someone should look at) or `revoked`, at a given time (derived, never stored).
    public func effectiveStatus(at now: Date) -> String {
        if status == .revoked { return "revoked" }
        if notAfter > now { return "valid" }
        return successor == nil ? "expired" : "superseded"
    }
}

/// Filters for listing the inventory; every filter is served by an index.
public struct CertificateFilter: Sendable, Hashable {
    public enum StatusFilter: String, Sendable, CaseIterable {
        /// Not expired, not revoked.
        case valid
        /// Expired with no successor: the lapses.
        case expired
        /// Expired after a renewal replaced it.
        case superseded
        case revoked

        public static var choices: String { allCases.map(\.rawValue).joined(separator: ", ") }
    }

    public var expiringBefore: Date?
    public var identity: String?
    public var status: StatusFilter?
    /// Only certificates of this owner (team).
    public var owner: String?
    /// Only certificates whose serial starts with this (lowercase hex).
    public var serialPrefix: String?
    public var profile: String?
    /// Only certificates of this issuer (its subject, as recorded).
    public var issuer: String?
    /// Latest expiry first instead of soonest first.
    public var newestFirst = false
    /// Reference time for `valid`/`expired`.
    public var now: Date
    public var limit: Int
    public var offset: Int

    public init(
        expiringBefore: Date? = nil, identity: String? = nil, status: StatusFilter? = nil, now: Date,
        limit: Int = 1000, offset: Int = 0
    ) {
        self.expiringBefore = expiringBefore
        self.identity = identity
        self.status = status
        self.now = now
        self.limit = limit
        self.offset = offset
    }
}

/// An audit event before it is chained.
public struct AuditEntry: Sendable, Hashable {
    public var time: Date
    public var actor: String
    public var action: String
    public var subject: String
    public var details: [String: String]

    public init(time: Date, actor: String, action: String, subject: String, details: [String: String] = [:]) {
        self.time = time
        self.actor = actor
        self.action = action
        self.subject = subject
        self.details = details
    }
}

/// An audit event as stored: numbered and chained to the one before it.
public struct AuditEvent: Sendable, Hashable, Codable {
    public var sequence: Int64
    public var time: String
    public var actor: String
    public var action: String
    public var subject: String
    /// Canonical JSON of the details (sorted keys).
    public var details: String
    public var previousHash: String
    public var hash: String
}

/// The result of recomputing the audit chain.
public enum AuditVerification: Sendable, Hashable {
    case intact(events: Int, head: String)
    case broken(sequence: Int64, reason: String)
}

/// The JSON shape of an inventory record, shared by `mutual list/show --json` and the HTTP API (DER omitted; `pem`
/// only when asked for).
public struct CertificateRecordView: Encodable, Sendable {
    public var serial, issuer, subject, identity, profile, requester, fingerprint, status: String
    public var sans: [String]
    public var owner: String?
    public var not_before, not_after: String
    public var revoked_at: String?
    public var revocation_reason: String?
    /// Renewal lineage: the certificate this one renewed, and the newest one renewed from it.
    public var predecessor: String?
    public var successor: String?
    public var pem: String?

    public init(_ r: CertificateRecord, now: Date, pem: String? = nil) {
        serial = r.serial
        issuer = r.issuer
        subject = r.subject
        identity = r.identity
        profile = r.profile
        requester = r.requester
        fingerprint = r.fingerprint
        status = r.effectiveStatus(at: now)
        sans = r.subjectAlternativeNames
        owner = r.owner
        not_before = AuditChain.format(r.notBefore)
        not_after = AuditChain.format(r.notAfter)
        revoked_at = r.revokedAt.map(AuditChain.format)
        revocation_reason = r.revocationReason
        predecessor = r.predecessor
        successor = r.successor
        self.pem = pem
    }
}

/// An identity filter as operators write it: an exact identity, a prefix ending in `*`
/// (`spiffe://example.org/ns/web/*`), or a DNS suffix starting with `*.` (`*.svc.example.org`).
public enum IdentityPattern: Sendable, Hashable {
    case exact(String)
    case prefix(String)
    case suffix(String)

    public init(_ text: String) {
        if text.hasSuffix("*"), !text.dropLast().contains("*"), text.count > 1 {
            self = .prefix(String(text.dropLast()))
        } else if text.hasPrefix("*."), !text.dropFirst().contains("*"), text.count > 2 {
            self = .suffix(String(text.dropFirst()))
        } else {
            self = .exact(text)
        }
    }
}
