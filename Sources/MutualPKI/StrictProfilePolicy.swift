import Crypto
import Foundation
import _CryptoExtras
import SwiftASN1
import X509

/// Structural RFC 5280 (and, where it makes mTLS safer, CA/B Forum) rules that swift-certificates' RFC5280Policy leaves
/// to the caller. A relying party in a private PKI has no reason to accept malformed certificates, so these fail
/// closed, each with its own reason.
struct StrictProfilePolicy: VerifierPolicy {
    let requiredEKU: ExtendedKeyUsage.Usage?
    let validationTime: Date
    let verifyingCriticalExtensions: [ASN1ObjectIdentifier] = []

    static let policyConstraintsOID: ASN1ObjectIdentifier = [2, 5, 29, 36]

    func chainMeetsPolicyRequirements(chain: UnverifiedCertificateChain) -> PolicyEvaluationResult {
        let certificates = Array(chain)
        for (index, certificate) in certificates.enumerated() {
            let isLeaf = index == 0
            let isAnchor = index == certificates.count - 1
            // Exact comparison (sub-second): a certificate is not valid one millisecond before its notBefore.
            if validationTime < certificate.notValidBefore {
                return .failsToMeetPolicy(reason: "\(certificate.subject) is not valid before \(certificate.notValidBefore)")
            }
            // notAfter has one-second precision and is inclusive: valid through the whole of that second.
            if validationTime >= certificate.notValidAfter.addingTimeInterval(1) {
                return .failsToMeetPolicy(reason: "\(certificate.subject) expired at \(certificate.notValidAfter)")
            }
            if let reason = Self.problem(certificate, isLeaf: isLeaf, isAnchor: isAnchor && certificates.count > 1) {
                let who = isLeaf ? "the certificate" : isAnchor ? "root \(certificate.subject)" : "intermediate \(certificate.subject)"
                return .failsToMeetPolicy(reason: "\(who): \(reason)")
            }
        }
        if let reason = Self.nameConstraintWorkProblem(certificates) {
            return .failsToMeetPolicy(reason: reason)
        }
        if let reason = Self.wildcardVersusExclusion(certificates) {
            return .failsToMeetPolicy(reason: reason)
        }
        return .meetsPolicy
    }

    static func problem(_ certificate: Certificate, isLeaf: Bool, isAnchor: Bool) -> String? {
        let serial = certificate.serialNumber.bytes
        // Trust anchors are configured, not validated: old public roots carry serial 0.
        if !isAnchor, serial.count > 20 { return "serial number is longer than 20 octets (RFC 5280 4.1.2.2)" }
        if !isAnchor, serial.allSatisfy({ $0 == 0 }) { return "serial number is zero (RFC 5280 4.1.2.2)" }
        if let reason = validityEncodingProblem(certificate) { return reason }

        let extensions = certificate.extensions
        let basicConstraints: BasicConstraints?
        let keyUsage: KeyUsage?
        do {
            basicConstraints = try extensions.basicConstraints
            keyUsage = try extensions.keyUsage
            _ = try extensions.authorityInformationAccess
            _ = try extensions.subjectAlternativeNames
        } catch {
            return "has a malformed extension (\(error))"
        }
        let isCA: Bool
        if case .isCertificateAuthority = basicConstraints { isCA = true } else { isCA = false }
        if let ku = keyUsage, ku.keyCertSign, !isCA {
            return "keyUsage keyCertSign without basicConstraints cA=true"
        }
        if let pc = extensions[oid: policyConstraintsOID], !pc.critical {
            return "policyConstraints must be critical (RFC 5280 4.2.1.11)"
        }
        if let rsa = _RSA.Signing.PublicKey(certificate.publicKey), rsa.keySizeInBits % 8 != 0 {
            return "RSA modulus of \(rsa.keySizeInBits) bits is not a multiple of 8"
        }
        let selfIssued = certificate.issuer == certificate.subject
        if let akiExtension = extensions[oid: .X509ExtensionID.authorityKeyIdentifier] {
            guard let aki = try? AuthorityKeyIdentifier(akiExtension) else { return "malformed authorityKeyIdentifier" }
            if selfIssued && isAnchor || selfIssued && isLeaf {
                if aki.keyIdentifier == nil || aki.authorityCertIssuer != nil || aki.authorityCertSerialNumber != nil {
                    return "a self-signed certificate's authorityKeyIdentifier must hold only a keyIdentifier"
                }
                if let ski = try? extensions.subjectKeyIdentifier, ski.keyIdentifier != aki.keyIdentifier {
                    return "a self-signed certificate's authorityKeyIdentifier does not match its subjectKeyIdentifier"
                }
            }
        } else if !isAnchor && !(isLeaf && selfIssued) {
            return "authorityKeyIdentifier is missing (RFC 5280 4.2.1.1)"
        }

        if isLeaf {
            if isCA && !isAnchor { return "is a CA certificate (basicConstraints cA=true) used as an end-entity certificate" }
            if extensions[oid: .X509ExtensionID.nameConstraints] != nil {
                if !isCA { return "nameConstraints in an end-entity certificate (RFC 5280 4.2.1.10)" }
            }
            if let san = extensions[oid: .X509ExtensionID.subjectAlternativeName] {
                if certificate.subject.isEmpty && !san.critical {
                    return "empty subject with a non-critical subjectAltName (RFC 5280 4.2.1.6)"
                }
                if !certificate.subject.isEmpty && san.critical {
                    return "subjectAltName is critical although the subject is not empty"
                }
            }
        } else {
            guard isCA else { return "issues certificates but is not a CA (basicConstraints cA=true missing)" }
            if let bc = extensions[oid: .X509ExtensionID.basicConstraints], !bc.critical {
                return "basicConstraints of a CA must be critical (RFC 5280 4.2.1.9)"
            }
            if certificate.subject.isEmpty { return "a CA certificate must have a non-empty subject" }
            if let ku = keyUsage, !ku.keyCertSign {
                return "keyUsage lacks keyCertSign, so it may not issue certificates (RFC 5280 4.2.1.3)"
            }
            if extensions[oid: .X509ExtensionID.subjectKeyIdentifier] == nil {
                return "subjectKeyIdentifier is missing from a CA certificate (RFC 5280 4.2.1.2)"
            }
            if let nc = try? extensions.nameConstraints {
                if nc.permittedSubtrees.isEmpty && nc.excludedSubtrees.isEmpty {
                    return "nameConstraints with neither permitted nor excluded subtrees"
                }
                for case .dnsName(let name) in nc.permittedSubtrees + nc.excludedSubtrees where name.hasPrefix(".") {
                    return "invalid dNSName constraint '\(name)' (leading period)"
                }
            }
        }
        return nil
    }

    /// RFC 5280 4.1.2.5.2: GeneralizedTime in a certificate must not carry fractional seconds.
    static func validityEncodingProblem(_ certificate: Certificate) -> String? {
        guard let tbs = try? DER.parse(certificate.tbsCertificateBytes),
            case .constructed(let fields) = tbs.content
        else { return nil }
        // version [0] is optional; validity is the first SEQUENCE after the issuer Name (a SEQUENCE too).
        let nodes = Array(fields).filter { $0.identifier != ASN1Identifier(tagWithNumber: 0, tagClass: .contextSpecific) }
        guard nodes.count > 4, case .constructed(let times) = nodes[4].content else { return nil }
        for time in times where time.identifier == GeneralizedTime.defaultIdentifier {
            if let t = try? GeneralizedTime(derEncoded: time), t.fractionalSeconds != 0 {
                return "validity uses GeneralizedTime with fractional seconds (RFC 5280 4.1.2.5.2)"
            }
        }
        return nil
    }

    /// Bounds the work of name-constraint checking: names on the leaf times constraints on the path. Crafted
    /// certificates with thousands of each would otherwise cost seconds of CPU per handshake.
    static let nameConstraintBudget = 1 << 20

    static func nameConstraintWorkProblem(_ chain: [Certificate]) -> String? {
        let leaf = chain[0]
        let names = ((try? leaf.extensions.subjectAlternativeNames)??.count ?? 0) + leaf.subject.reduce(0) { $0 + $1.count }
        var constraints = 0
        for ca in chain.dropFirst() {
            if let nc = try? ca.extensions.nameConstraints {
                constraints += nc.permittedSubtrees.count + nc.excludedSubtrees.count
            }
        }
        if names * constraints > nameConstraintBudget {
            return "name constraint checking would take \(names) names × \(constraints) constraints: over the budget of \(nameConstraintBudget)"
        }
        return nil
    }

    /// A wildcard SAN that could stand for a name an issuer excludes is refused (CVE-2025-61727).
    static func wildcardVersusExclusion(_ chain: [Certificate]) -> String? {
        guard let sans = try? chain[0].extensions.subjectAlternativeNames else { return nil }
        let wildcards = sans.compactMap { name -> String? in
            if case .dnsName(let dns) = name, dns.hasPrefix("*.") { return String(dns.dropFirst(2)).lowercased() }
            return nil
        }
        guard !wildcards.isEmpty else { return nil }
        for ca in chain.dropFirst() {
            guard let nc = try? ca.extensions.nameConstraints else { continue }
            for case .dnsName(let excluded) in nc.excludedSubtrees {
                let e = excluded.lowercased()
                for base in wildcards where e == base || e.hasSuffix("." + base) {
                    return "wildcard SAN *.\(base) could match \(excluded), which \(ca.subject) excludes"
                }
            }
        }
        return nil
    }
}

extension DistinguishedName {
    /// The last (most specific) common name of the name, as text; nil when there is none.
    public var lastCommonNameString: String? {
        var result: String?
        for rdn in self {
            for attribute in rdn where attribute.type == .RDNAttributeType.commonName {
                result = String(describing: attribute.value)
            }
        }
        return result
    }
}
