import Foundation
import SwiftASN1
import X509

/// Chain verification as `mutual verify`, the proxy and the authority use it: swift-certificates' path builder with
/// the RFC 5280 policy, plus the checks it leaves to callers (EKU, peer names without CN fallback, CRLs, max depth).
public struct ChainVerifier: Sendable {
    /// The name a relying party expects the leaf to carry.
    public enum PeerName: Sendable, Hashable {
        case dns(String)
        case ip(String)
        case email(String)
        /// A URI SAN, compared exactly (a SPIFFE ID: `spiffe://trust.domain/path`).
        case uri(String)
    }

    public struct Options: Sendable {
        public var roots: [Certificate]
        public var intermediates: [Certificate]
        public var validationTime: Date
        public var requiredEKU: ExtendedKeyUsage.Usage?
        public var peerName: PeerName?
        public var crls: [RevocationList]
        /// Largest number of intermediates (self-issued ones not counted), as in x509-limbo's max_chain_depth.
        public var maxDepth: Int?

        public init(
            roots: [Certificate], intermediates: [Certificate] = [], validationTime: Date,
            requiredEKU: ExtendedKeyUsage.Usage? = nil, peerName: PeerName? = nil, crls: [RevocationList] = [],
            maxDepth: Int? = nil
        ) {
            self.roots = roots
            self.intermediates = intermediates
            self.validationTime = validationTime
            self.requiredEKU = requiredEKU
            self.peerName = peerName
            self.crls = crls
            self.maxDepth = maxDepth
        }
    }

    /// Why a chain was refused, as a code a program can branch on (the reason text is for people).
    public enum RejectionCode: String, Sendable, Equatable {
        /// No path leads from the leaf to a trusted root.
        case unknownIssuer = "unknown_issuer"
        /// A certificate on the best path is past its notAfter.
        case expired
        /// A certificate on the best path is before its notBefore.
        case notYetValid = "not_yet_valid"
        /// A certificate on the path is listed in a CRL.
        case revoked
        /// The intermediates sent would take more work than the search budget allows (a lattice, or too many).
        case chainTooComplex = "chain_too_complex"
        /// Verification was cancelled (the peer went away).
        case cancelled
        /// A CRL given to the verifier is unusable.
        case unusableCRL = "unusable_crl"
        /// Any other RFC 5280, EKU, name or depth rule.
        case invalid
    }

    /// The verdict: a chain leaf-first up to the root, or the reasons every candidate chain failed.
    public enum Outcome: Sendable {
        case accepted(chain: [Certificate])
        case rejected(reason: String, code: RejectionCode)
    }

    /// Intermediates searched when no `maxDepth` is given.
    public static let defaultSearchDepth = 8

    public var options: Options
    var budget = PathSearch.Budget()

    public init(options: Options) { self.options = options }

    public func verify(_ leaf: Certificate) async -> Outcome {
        let crlIssues = options.crls.isEmpty ? [] : Self.preflightCRLs(options.crls)
        if let problem = crlIssues.first {
            return .rejected(reason: problem, code: .unusableCRL)
        }
        // Candidate paths first, within a budget; then the RFC 5280 verifier on each one (a linear chain).
        var search = PathSearch(
            roots: options.roots, intermediates: Self.bounded(options.intermediates),
            maxDepth: options.maxDepth ?? Self.defaultSearchDepth, budget: budget
        )
        var candidates: [[Certificate]]
        switch search.run(leaf: leaf) {
        case .cancelled:
            return .rejected(reason: "verification cancelled", code: .cancelled)
        case .exhausted(let why):
            return .rejected(reason: why, code: .chainTooComplex)
        case .candidates(let found):
            candidates = found
        }
        // No candidate at all: one run with no intermediates gives the verifier's own diagnosis (unknown issuer,
        // leaf in the root store, unhandled critical extension).
        if candidates.isEmpty { candidates = [[]] }
        var reasons: [String] = []
        var code: RejectionCode = .unknownIssuer
        for intermediates in candidates {
            if Task.isCancelled { return .rejected(reason: "verification cancelled", code: .cancelled) }
            var verifier = Verifier(rootCertificates: CertificateStore(options.roots)) {
                // Cheap structural checks (and the name-constraint work budget) run before the RFC 5280 policy.
                StrictProfilePolicy(requiredEKU: options.requiredEKU, validationTime: options.validationTime)
                RFC5280Policy(validationTime: options.validationTime)
                ExtendedKeyUsagePolicy(required: options.requiredEKU)
                PeerNamePolicy(peerName: options.peerName)
                MaxDepthPolicy(maxDepth: options.maxDepth)
                RevocationPolicy(crls: options.crls, validationTime: options.validationTime)
            }
            let result = await verifier.validate(leaf: leaf, intermediates: CertificateStore(intermediates))
            switch result {
            case .validCertificate(let chain):
                return .accepted(chain: Array(chain))
            case .couldNotValidate(let failures):
                if failures.isEmpty {
                    if leaf.hasUnhandledCriticalExtension(for: verifier.policy.verifyingCriticalExtensions) {
                        return .rejected(reason: "the certificate has a critical extension this verifier does not understand", code: .invalid)
                    }
                    continue
                }
                for failure in failures {
                    let text = failure.policyFailureReason.description
                    if !reasons.contains(text) { reasons.append(text) }
                    if code == .unknownIssuer { code = Self.code(for: Array(failure.chain), at: options.validationTime, crls: options.crls) }
                }
            }
        }
        if reasons.isEmpty && search.prunedByDepth, let depth = options.maxDepth {
            return .rejected(reason: "no chain to a trusted root within the maximum depth of \(depth) intermediates", code: .invalid)
        }
        if reasons.isEmpty {
            return .rejected(reason: "no chain to a trusted root was found (unknown issuer \(leaf.issuer))", code: .unknownIssuer)
        }
        return .rejected(reason: reasons.joined(separator: "; "), code: code)
    }

    /// The code of a failed candidate chain, from its data (never from the verifier's message text).
    static func code(for chain: [Certificate], at time: Date, crls: [RevocationList]) -> RejectionCode {
        if chain.contains(where: { time > $0.notValidAfter }) { return .expired }
        if chain.contains(where: { time < $0.notValidBefore }) { return .notYetValid }
        for index in chain.indices.dropLast() {
            let issuer = chain[index + 1]
            for crl in crls where crl.issuer == issuer.subject && crl.entry(for: chain[index].serialNumber) != nil {
                return .revoked
            }
        }
        return .invalid
    }

    /// Path building is a depth-first search over candidate issuers; a peer that sends a hundred intermediates with
    /// one subject and different keys makes it verify thousands of signatures (x509-limbo's pathological chains take
    /// seconds). Real chains have a handful, so keep at most ``maximumIntermediatesPerSubject`` per subject name and
    /// ``maximumIntermediates`` in all, in the order given.
    public static let maximumIntermediatesPerSubject = 4
    public static let maximumIntermediates = 64

    static func bounded(_ intermediates: [Certificate]) -> [Certificate] {
        var perSubject: [DistinguishedName: Int] = [:]
        var kept: [Certificate] = []
        for certificate in intermediates where kept.count < maximumIntermediates {
            let count = perSubject[certificate.subject, default: 0]
            guard count < maximumIntermediatesPerSubject else { continue }
            perSubject[certificate.subject] = count + 1
            kept.append(certificate)
        }
        return kept
    }

    /// CRL-level problems that make a CRL unusable whoever issued it (RFC 5280 5.2): a CRL must carry a
    /// non-critical CRL number and no unknown critical extension.
    static func preflightCRLs(_ crls: [RevocationList]) -> [String] {
        var problems: [String] = []
        for crl in crls {
            if crl.crlNumberIsCritical {
                problems.append("CRL from \(crl.issuer) marks its CRL number critical (RFC 5280 5.2.3) and cannot be used")
            }
            if crl.crlNumber == nil {
                problems.append("CRL from \(crl.issuer) has no CRL number (RFC 5280 5.2.3) and cannot be used")
            }
            if !crl.unhandledCriticalExtensions.isEmpty {
                problems.append("CRL from \(crl.issuer) has unsupported critical extensions \(crl.unhandledCriticalExtensions)")
            }
        }
        return problems
    }
}

extension Certificate {
    func hasUnhandledCriticalExtension(for handled: [ASN1ObjectIdentifier]) -> Bool {
        extensions.contains { $0.critical && !handled.contains($0.oid) }
    }
}

/// EKU: the leaf's extendedKeyUsage, when present, must contain the purpose (or anyExtendedKeyUsage); an
/// intermediate that carries an EKU extension constrains its subtree the same way, as OpenSSL and Go do.
struct ExtendedKeyUsagePolicy: VerifierPolicy {
    let required: ExtendedKeyUsage.Usage?
    let verifyingCriticalExtensions: [ASN1ObjectIdentifier] = [.X509ExtensionID.extendedKeyUsage]

    func chainMeetsPolicyRequirements(chain: UnverifiedCertificateChain) -> PolicyEvaluationResult {
        guard let required else { return .meetsPolicy }
        for (index, certificate) in chain.enumerated() where index < chain.count - 1 {
            let eku: ExtendedKeyUsage?
            do {
                eku = try certificate.extensions.extendedKeyUsage
            } catch {
                return .failsToMeetPolicy(reason: "malformed extendedKeyUsage in \(certificate.subject)")
            }
            guard let eku else { continue }
            if !eku.contains(required) && !eku.contains(.any) {
                let who = index == 0 ? "the certificate" : "intermediate \(certificate.subject)"
                return .failsToMeetPolicy(
                    reason: "\(who) does not allow \(required) (extendedKeyUsage: \(eku.map { "\($0)" }.joined(separator: ", ")))"
                )
            }
        }
        return .meetsPolicy
    }
}

/// Peer name matching on SANs only: DNS (with a whole-leftmost-label wildcard), IP, email and URI (exact). The subject common
/// name is never consulted.
struct PeerNamePolicy: VerifierPolicy {
    let peerName: ChainVerifier.PeerName?
    let verifyingCriticalExtensions: [ASN1ObjectIdentifier] = [.X509ExtensionID.subjectAlternativeName]

    func chainMeetsPolicyRequirements(chain: UnverifiedCertificateChain) -> PolicyEvaluationResult {
        guard let peerName else { return .meetsPolicy }
        let sans: SubjectAlternativeNames
        do {
            sans = try chain.leaf.extensions.subjectAlternativeNames ?? SubjectAlternativeNames()
        } catch {
            return .failsToMeetPolicy(reason: "the certificate's subjectAltName is malformed")
        }
        switch peerName {
        case .dns(let host):
            let wanted = host.lowercased().trimmingSuffix(".")
            for case .dnsName(let name) in sans where Self.dnsMatches(pattern: name, host: wanted) {
                return .meetsPolicy
            }
            return .failsToMeetPolicy(reason: "the certificate is not valid for DNS name \(host) (no matching DNS SAN; CN is not used)")
        case .ip(let text):
            guard let wanted = try? Names.ipAddressBytes(text) else {
                return .failsToMeetPolicy(reason: "\(text) is not an IP address")
            }
            for case .ipAddress(let octets) in sans where Array(octets.bytes) == wanted {
                return .meetsPolicy
            }
            return .failsToMeetPolicy(reason: "the certificate is not valid for IP address \(text)")
        case .email(let address):
            for case .rfc822Name(let name) in sans where Self.emailMatches(name, address) {
                return .meetsPolicy
            }
            return .failsToMeetPolicy(reason: "the certificate is not valid for email address \(address)")
        case .uri(let wanted):
            for case .uniformResourceIdentifier(let name) in sans where name == wanted {
                return .meetsPolicy
            }
            return .failsToMeetPolicy(reason: "the certificate does not carry the URI \(wanted) (no matching URI SAN)")
        }
    }

    static func dnsMatches(pattern: String, host: String) -> Bool {
        let pattern = pattern.lowercased().trimmingSuffix(".")
        guard !pattern.isEmpty else { return false }
        // A SAN that is not a syntactically valid DNS name (underscores, spaces, non-ASCII) never matches.
        guard (try? Names.normalizedDNSName(pattern, allowWildcard: true)) != nil else { return false }
        if pattern.hasPrefix("*.") {
            let base = pattern.dropFirst(2)
            guard !base.contains("*"), base.contains("."), let dot = host.firstIndex(of: ".") else { return false }
            let firstLabel = host[..<dot]
            return !firstLabel.isEmpty && host[host.index(after: dot)...] == base
        }
        return !pattern.contains("*") && pattern == host
    }

    static func emailMatches(_ san: String, _ address: String) -> Bool {
        guard let sanAt = san.lastIndex(of: "@"), let addrAt = address.lastIndex(of: "@") else { return false }
        return san[..<sanAt] == address[..<addrAt]
            && san[san.index(after: sanAt)...].lowercased() == address[address.index(after: addrAt)...].lowercased()
    }
}

/// At most `maxDepth` intermediates, not counting self-issued ones (RFC 5280 6.1.4 (l) counts the same way).
struct MaxDepthPolicy: VerifierPolicy {
    let maxDepth: Int?
    let verifyingCriticalExtensions: [ASN1ObjectIdentifier] = []

    func chainMeetsPolicyRequirements(chain: UnverifiedCertificateChain) -> PolicyEvaluationResult {
        guard let maxDepth else { return .meetsPolicy }
        let intermediates = chain.dropFirst().dropLast()
        let counted = intermediates.filter { $0.issuer != $0.subject }.count
        if counted > maxDepth {
            return .failsToMeetPolicy(reason: "chain has \(counted) intermediates; the maximum depth is \(maxDepth)")
        }
        return .meetsPolicy
    }
}

/// CRL checking for every non-root certificate whose issuer published a CRL among those given: the CRL must be
/// signed by the issuer (whose keyUsage, if present, allows cRLSign), be current, and not list the serial.
struct RevocationPolicy: VerifierPolicy {
    let crls: [RevocationList]
    let validationTime: Date
    let verifyingCriticalExtensions: [ASN1ObjectIdentifier] = []

    func chainMeetsPolicyRequirements(chain: UnverifiedCertificateChain) -> PolicyEvaluationResult {
        guard !crls.isEmpty else { return .meetsPolicy }
        let certificates = Array(chain)
        for index in 0..<(certificates.count - 1) {
            let subject = certificates[index]
            let issuer = certificates[index + 1]
            for crl in crls where crl.issuer == issuer.subject {
                guard crl.isSigned(by: issuer) else { continue }
                if let ku = try? issuer.extensions.keyUsage, !ku.cRLSign {
                    return .failsToMeetPolicy(reason: "CRL issuer \(issuer.subject) lacks the cRLSign key usage")
                }
                if crl.thisUpdate > validationTime {
                    return .failsToMeetPolicy(reason: "CRL from \(issuer.subject) is not yet valid (thisUpdate \(crl.thisUpdate))")
                }
                if let next = crl.nextUpdate, next < validationTime {
                    return .failsToMeetPolicy(reason: "CRL from \(issuer.subject) is stale (nextUpdate \(next))")
                }
                if let entry = crl.entry(for: subject.serialNumber) {
                    let reason = entry.reason.map { " (\($0.rawValue))" } ?? ""
                    return .failsToMeetPolicy(
                        reason: "certificate \(subject.serialHex) was revoked at \(entry.revocationDate)\(reason)"
                    )
                }
            }
        }
        return .meetsPolicy
    }
}

extension String {
    func trimmingSuffix(_ suffix: String) -> String {
        hasSuffix(suffix) ? String(dropLast(suffix.count)) : self
    }
}
