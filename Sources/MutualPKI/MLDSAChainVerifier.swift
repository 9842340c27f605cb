import Foundation
import SwiftASN1
import X509

/// Chain verification for chains that hold ML-DSA certificates, which swift-certificates' verifier cannot parse
/// (closed key and signature enums; see ``MLDSACertificate``). Hand-written, and kept to what RFC 5280 requires of
/// Mutual's own hierarchies: signatures, validity, name chaining, CA bits, path length, key usage (with RFC 9881's
/// rules for ML-DSA keys), EKU, unknown critical extensions, DNS/URI name constraints and the peer name.
///
/// A link may be classical (a P-256 root cross-signing an ML-DSA intermediate is how a migration starts): its
/// signature is checked with swift-crypto through swift-certificates' public-key type.
/// Refusals carry the same ``ChainVerifier/RejectionCode``s as the classical verifier.
public struct MLDSAChainVerifier: Sendable {
    public struct Options: Sendable {
        public var roots: [MLDSACertificate]
        public var intermediates: [MLDSACertificate]
        public var validationTime: Date
        public var requiredEKU: ExtendedKeyUsage.Usage?
        public var peerName: ChainVerifier.PeerName?
        /// Largest number of intermediates.
        public var maxDepth: Int
        /// CRLs, ML-DSA-signed or classical: checked for every non-root certificate whose issuer published one here.
        public var crls: [RevocationList]

        public init(
            roots: [MLDSACertificate], intermediates: [MLDSACertificate] = [], validationTime: Date,
            requiredEKU: ExtendedKeyUsage.Usage? = nil, peerName: ChainVerifier.PeerName? = nil, maxDepth: Int = 8,
            crls: [RevocationList] = []
        ) {
            self.crls = crls
            self.roots = roots
            self.intermediates = intermediates
            self.validationTime = validationTime
            self.requiredEKU = requiredEKU
            self.peerName = peerName
            self.maxDepth = maxDepth
        }
    }

    public enum Outcome: Sendable {
        /// Leaf first, the trust anchor last.
        case accepted(chain: [MLDSACertificate])
        case rejected(reason: String, code: ChainVerifier.RejectionCode)
    }

    public var options: Options
    public init(options: Options) { self.options = options }

    struct Refusal: Error {
        var code: ChainVerifier.RejectionCode
        var reason: String
        init(_ code: ChainVerifier.RejectionCode, _ reason: String) {
            self.code = code
            self.reason = reason
        }
    }

    /// Extensions this verifier understands; any other critical one refuses the chain (RFC 5280 4.2).
    static let understood: Set<ASN1ObjectIdentifier> = [
        .X509ExtensionID.basicConstraints, .X509ExtensionID.keyUsage, .X509ExtensionID.extendedKeyUsage,
        .X509ExtensionID.subjectAlternativeName, .X509ExtensionID.nameConstraints, .X509ExtensionID.subjectKeyIdentifier,
        .X509ExtensionID.authorityKeyIdentifier, CRLDistributionPoints.oid,
        .X509ExtensionID.authorityInformationAccess,
    ]

    public func verify(_ leaf: MLDSACertificate) -> Outcome {
        if let problem = ChainVerifier.preflightCRLs(options.crls).first {
            return .rejected(reason: problem, code: .unusableCRL)
        }
        do {
            let chain = try path(from: leaf)
            try checkRevocation(chain)
            return .accepted(chain: chain)
        } catch let refusal as Refusal {
            return .rejected(reason: refusal.reason, code: refusal.code)
        } catch {
            return .rejected(reason: "\(error)", code: .invalid)
        }
    }

    func path(from leaf: MLDSACertificate) throws -> [MLDSACertificate] {
        try checkLeaf(leaf)
        var chain = [leaf]
        var current = leaf
        while true {
            try checkTime(current, position: chain.count == 1 ? "the certificate \(Self.name(current))" : "intermediate \(current.subject)")
            if let root = options.roots.first(where: { Self.signed(current, by: $0) }) {
                try checkTime(root, position: "root \(root.subject)")
                try checkIssuer(root, below: chain.count - 1)
                chain.append(root)
                try checkNameConstraints(leaf, issuers: chain.dropFirst())
                return chain
            }
            guard chain.count <= options.maxDepth else {
                throw Refusal(.invalid, "the chain is longer than \(options.maxDepth) intermediates")
            }
            guard let next = options.intermediates.first(where: { candidate in
                !chain.contains(candidate) && Self.signed(current, by: candidate)
            }) else {
                if options.roots.contains(where: { $0.subject == current.issuer }) || options.intermediates.contains(where: { $0.subject == current.issuer }) {
                    // As in the classical verifier: an issuer whose key did not sign this is not its issuer.
                    throw Refusal(.unknownIssuer, "the signature of \(Self.name(current)) does not verify under any trusted \(current.issuer)")
                }
                throw Refusal(.unknownIssuer, "no trusted root or intermediate issued \(Self.name(current)) (issuer \(current.issuer))")
            }
            try checkIssuer(next, below: chain.count - 1)
            chain.append(next)
            current = next
        }
    }

    /// Whether `issuer` signed `certificate`: names chain and the signature verifies under the issuer's key, ML-DSA
    /// or classical.
    static func signed(_ certificate: MLDSACertificate, by issuer: MLDSACertificate) -> Bool {
        guard certificate.issuer == issuer.subject else { return false }
        if let variant = issuer.subjectKeyVariant {
            return certificate.isSigned(by: variant, publicKey: issuer.subjectPublicKey)
        }
        guard let key = try? Certificate.PublicKey(derEncoded: issuer.subjectPublicKeyInfo),
            let algorithm = SignatureAlgorithmDER.table.first(where: { $0.1 == certificate.signatureAlgorithm })?.0
        else { return false }
        return key.isValidSignature(certificate.signature, for: certificate.tbsBytes, signatureAlgorithm: algorithm)
    }

    func checkTime(_ certificate: MLDSACertificate, position: String) throws {
        if options.validationTime > certificate.notAfter {
            throw Refusal(.expired, "\(position) expired at \(certificate.notAfter)")
        }
        if options.validationTime < certificate.notBefore {
            throw Refusal(.notYetValid, "\(position) is not valid before \(certificate.notBefore)")
        }
    }

    static func extensions(_ certificate: MLDSACertificate) throws -> Certificate.Extensions {
        for e in certificate.extensions where e.critical && !understood.contains(e.oid) {
            throw Refusal(.invalid, "\(certificate.subject) has an unknown critical extension \(e.oid)")
        }
        do {
            return try Certificate.Extensions(certificate.extensions)
        } catch {
            throw Refusal(.invalid, "\(certificate.subject) has malformed or repeated extensions")
        }
    }

    /// RFC 9881 5: an ML-DSA key may only sign (digitalSignature, nonRepudiation, keyCertSign, cRLSign).
    static func checkMLDSAKeyUsage(_ certificate: MLDSACertificate, _ usage: KeyUsage?) throws {
        guard certificate.subjectKeyVariant != nil, let usage else { return }
        if usage.keyEncipherment || usage.dataEncipherment || usage.keyAgreement || usage.encipherOnly || usage.decipherOnly {
            throw Refusal(.invalid, "\(certificate.subject): an ML-DSA key's key usage must not allow encipherment or key agreement (RFC 9881)")
        }
        guard usage.digitalSignature || usage.nonRepudiation || usage.keyCertSign || usage.cRLSign else {
            throw Refusal(.invalid, "\(certificate.subject): an ML-DSA key's key usage allows no signature")
        }
    }

    /// How a message names a certificate: its identity, else its subject, else its serial.
    static func name(_ c: MLDSACertificate) -> String {
        CertificateIdentity.of(c) ?? (c.subject.isEmpty ? "serial \(c.serialHex)" : c.subject.description)
    }

    static func text(_ name: ChainVerifier.PeerName) -> String {
        switch name {
        case .dns(let v): "DNS name \(v)"
        case .ip(let v): "IP address \(v)"
        case .email(let v): "email \(v)"
        case .uri(let v): "URI \(v)"
        }
    }

    func checkLeaf(_ leaf: MLDSACertificate) throws {
        let extensions = try Self.extensions(leaf)
        let constraints = try? extensions.basicConstraints
        if case .isCertificateAuthority = constraints {
            throw Refusal(.invalid, "\(Self.name(leaf)) is a CA certificate, not an end-entity one")
        }
        let usage = try? extensions.keyUsage
        try Self.checkMLDSAKeyUsage(leaf, usage)
        if let usage, !usage.digitalSignature {
            throw Refusal(.invalid, "\(Self.name(leaf)): key usage lacks digitalSignature, which a TLS identity needs")
        }
        if let required = options.requiredEKU {
            guard let eku = try? extensions.extendedKeyUsage, eku.contains(required) || eku.contains(.any) else {
                throw Refusal(.invalid, "\(Self.name(leaf)) lacks the extended key usage \(required)")
            }
        }
        if let peerName = options.peerName {
            let names = (try? extensions.subjectAlternativeNames) ?? nil ?? SubjectAlternativeNames()
            guard names.contains(where: { Self.matches($0, peerName) }) else {
                throw Refusal(.invalid, "\(Self.name(leaf)) does not carry the expected \(Self.text(peerName))")
            }
        }
    }

    static func matches(_ name: GeneralName, _ expected: ChainVerifier.PeerName) -> Bool {
        switch (name, expected) {
        case (.dnsName(let presented), .dns(let wanted)):
            let p = presented.lowercased(), w = wanted.lowercased()
            if p == w { return true }
            guard p.hasPrefix("*."), let dot = w.firstIndex(of: ".") else { return false }
            return w[w.index(after: dot)...] == p.dropFirst(2) && !w[..<dot].isEmpty
        case (.uniformResourceIdentifier(let presented), .uri(let wanted)): return presented == wanted
        case (.rfc822Name(let presented), .email(let wanted)): return presented.lowercased() == wanted.lowercased()
        case (.ipAddress(let presented), .ip(let wanted)):
            return (try? Names.ipAddressBytes(wanted)) == Array(presented.bytes)
        default: return false
        }
    }

    /// An issuer must be a CA allowed to sign certificates, with room in its path length for the CAs below it
    /// (`below`: how many intermediates sit under it).
    func checkIssuer(_ issuer: MLDSACertificate, below: Int) throws {
        let extensions = try Self.extensions(issuer)
        guard case .isCertificateAuthority(let maxPathLength) = try? extensions.basicConstraints else {
            throw Refusal(.invalid, "\(issuer.subject) is not a CA (basicConstraints cA is not set)")
        }
        if let maxPathLength, below > maxPathLength {
            throw Refusal(.invalid, "\(issuer.subject) allows \(maxPathLength) intermediate(s) below it, the chain has \(below)")
        }
        let usage = try? extensions.keyUsage
        try Self.checkMLDSAKeyUsage(issuer, usage)
        if let usage, !usage.keyCertSign {
            throw Refusal(.invalid, "\(issuer.subject): key usage lacks keyCertSign")
        }
    }

    /// The same CRL rules as the classical verifier: a CRL counts when its issuer's key signed it; it must be current,
    /// its issuer must be allowed cRLSign, and it must not list the certificate.
    func checkRevocation(_ chain: [MLDSACertificate]) throws {
        guard !options.crls.isEmpty else { return }
        for index in 0..<(chain.count - 1) {
            let subject = chain[index], issuer = chain[index + 1]
            for crl in options.crls where crl.issuer == issuer.subject && crl.isSigned(by: issuer) {
                if let usage = try? Certificate.Extensions(issuer.extensions).keyUsage, !usage.cRLSign {
                    throw Refusal(.invalid, "CRL issuer \(issuer.subject) lacks the cRLSign key usage")
                }
                if crl.thisUpdate > options.validationTime {
                    throw Refusal(.invalid, "CRL from \(issuer.subject) is not yet valid (thisUpdate \(crl.thisUpdate))")
                }
                if let next = crl.nextUpdate, next < options.validationTime {
                    throw Refusal(.invalid, "CRL from \(issuer.subject) is stale (nextUpdate \(next))")
                }
                if let entry = crl.entry(for: Certificate.SerialNumber(bytes: subject.serialNumber[...])) {
                    throw Refusal(.revoked, "certificate \(subject.serialHex) was revoked at \(entry.revocationDate)\(entry.reason.map { " (\($0.rawValue))" } ?? "")")
                }
            }
        }
    }

    /// DNS and URI-host name constraints of every CA above the leaf (the kinds Mutual's hierarchies carry). A CA with
    /// other constraint kinds (IP, directory names) refuses the chain rather than half-checking it.
    func checkNameConstraints(_ leaf: MLDSACertificate, issuers: ArraySlice<MLDSACertificate>) throws {
        let names = Array(((try? Self.extensions(leaf).subjectAlternativeNames) ?? nil) ?? SubjectAlternativeNames())
        for issuer in issuers {
            guard let constraints = (try? Self.extensions(issuer).nameConstraints) ?? nil else { continue }
            for subtree in constraints.permittedSubtrees + constraints.excludedSubtrees {
                switch subtree {
                case .dnsName, .uniformResourceIdentifier: continue
                default: throw Refusal(.invalid, "\(issuer.subject) has a name constraint of a kind this verifier does not check")
                }
            }
            let permittedDNS = constraints.permittedSubtrees.compactMap { if case .dnsName(let d) = $0 { d } else { nil } }
            let excludedDNS = constraints.excludedSubtrees.compactMap { if case .dnsName(let d) = $0 { d } else { nil } }
            let permittedURI = constraints.permittedSubtrees.compactMap { if case .uniformResourceIdentifier(let u) = $0 { u } else { nil } }
            let excludedURI = constraints.excludedSubtrees.compactMap { if case .uniformResourceIdentifier(let u) = $0 { u } else { nil } }
            for name in names {
                switch name {
                case .dnsName(let dns):
                    let bare = dns.hasPrefix("*.") ? String(dns.dropFirst(2)) : dns
                    if !permittedDNS.isEmpty, !permittedDNS.contains(where: { Names.dnsName(bare, isWithin: $0) }) {
                        throw Refusal(.invalid, "DNS name \(dns) is outside the name constraints of \(issuer.subject)")
                    }
                    if excludedDNS.contains(where: { Names.dnsName(bare, isWithin: $0) }) {
                        throw Refusal(.invalid, "DNS name \(dns) is excluded by the name constraints of \(issuer.subject)")
                    }
                case .uniformResourceIdentifier(let uri):
                    guard let host = URLComponents(string: uri)?.host, !host.isEmpty else {
                        if permittedURI.isEmpty && excludedURI.isEmpty { continue }
                        throw Refusal(.invalid, "URI \(uri) has no host to check against the name constraints of \(issuer.subject)")
                    }
                    if !permittedURI.isEmpty, !permittedURI.contains(where: { Names.dnsName(host, isWithin: $0) }) {
                        throw Refusal(.invalid, "URI \(uri) is outside the name constraints of \(issuer.subject)")
                    }
                    if excludedURI.contains(where: { Names.dnsName(host, isWithin: $0) }) {
                        throw Refusal(.invalid, "URI \(uri) is excluded by the name constraints of \(issuer.subject)")
                    }
                default: continue
                }
            }
        }
    }
}
