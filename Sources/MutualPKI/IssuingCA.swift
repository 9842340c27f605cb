import Crypto
import Foundation
import SwiftASN1
import X509

/// An issuing CA: its certificate, its private key, the root above it and the policy it enforces.
///
/// Signing is CPU work (~20 µs for P-256, ~1 ms for RSA-2048) and touches no disk: safe to call from many tasks at
/// once, since the key types are immutable values.
public struct IssuingCA: Sendable {
    public let certificate: Certificate
    public let privateKey: Certificate.PrivateKey
    public let root: Certificate
    public var policy: IssuancePolicy

    private let subjectKeyIdentifier: ArraySlice<UInt8>
    /// Parsed once: checked on every issuance.
    private let nameConstraints: NameConstraints?

    public init(certificate: Certificate, privateKey: Certificate.PrivateKey, root: Certificate, policy: IssuancePolicy)
        throws
    {
        guard certificate.publicKey == privateKey.publicKey else {
            throw PKIError(.inconsistentCA, "the issuing CA key does not match the issuing CA certificate")
        }
        self.certificate = certificate
        self.privateKey = privateKey
        self.root = root
        self.policy = policy
        self.subjectKeyIdentifier =
            (try? certificate.extensions.subjectKeyIdentifier)??.keyIdentifier
            ?? SubjectKeyIdentifier(hash: certificate.publicKey).keyIdentifier
        self.nameConstraints = try? certificate.extensions.nameConstraints
    }

    /// Certificates sent after the intermediate in every chain: during a root rotation, the new root certified by the
    /// old one, so relying parties that trust only the old root still reach chains under the new one.
    public var crossCertificates: [Certificate] = []

    /// The chain a leaf should present after itself: the issuing intermediate (the root is the trust anchor), then any
    /// cross-certificate of a root rotation.
    public var chain: [Certificate] { [certificate] + crossCertificates }

    /// Validates `request` against its profile and this CA's constraints, then signs it.
    ///
    /// - Parameters:
    ///   - now: the issuance time (injected so tests control it).
    ///   - serialNumber: injected for tests; by default 16 random bytes, positive.
    /// - Throws: ``PKIError`` naming the first rule the request breaks. Nothing is signed in that case.
    public func issue(_ request: IssuanceRequest, now: Date, serialNumber: Certificate.SerialNumber? = nil) throws
        -> Certificate
    {
        let approved = try approve(request, now: now)
        return try sign(approved, serialNumber: serialNumber ?? Self.randomSerialNumber())
    }

    /// 16 bytes from the CSPRNG with the top bit clear and a non-zero first byte: positive, exactly 16 bytes long.
    public static func randomSerialNumber() -> Certificate.SerialNumber {
        var rng = SystemRandomNumberGenerator()
        // Two 64-bit draws rather than sixteen one-byte ones: one getrandom call each.
        var words = (rng.next() as UInt64, rng.next() as UInt64)
        var bytes = withUnsafeBytes(of: &words) { Array($0) }
        bytes[0] = (bytes[0] & 0x7F) | 0x01
        return Certificate.SerialNumber(bytes: bytes)
    }

    /// A request that passed every check and carries the exact contents of the certificate to sign.
    public struct ApprovedRequest: Sendable {
        public let profile: CertificateProfile
        public let publicKey: Certificate.PublicKey
        public let subject: DistinguishedName
        public let subjectAlternativeNames: [GeneralName]
        public let notBefore: Date
        public let notAfter: Date
    }

    /// Checks a request and decides the certificate's contents, without signing.
    public func approve(_ request: IssuanceRequest, now: Date) throws -> ApprovedRequest {
        guard CertificateProfile.leafProfiles.contains(request.profile) || request.profile == .admin || request.profile == .ocspSigner else {
            throw PKIError(.profileViolation, "profile '\(request.profile.rawValue)' cannot be requested from an issuing CA")
        }
        guard request.publicKey.isAcceptableSubjectKey else {
            throw PKIError(.unsupportedKey, "key \(request.publicKey.algorithmDescription) is not accepted (use \(KeyType.choices))")
        }
        let contents = try Self.approveContents(
            profile: request.profile, commonName: request.commonName, dnsNames: request.dnsNames,
            ipAddresses: request.ipAddresses, uris: request.uris, validity: request.validity, backdate: request.backdate,
            policy: policy, nameConstraints: nameConstraints,
            issuerNotBefore: certificate.notValidBefore, issuerNotAfter: certificate.notValidAfter, now: now
        )
        return ApprovedRequest(
            profile: request.profile,
            publicKey: request.publicKey,
            subject: contents.subject,
            subjectAlternativeNames: contents.names,
            notBefore: contents.notBefore,
            notAfter: contents.notAfter
        )
    }

    /// What the issuer decided a leaf holds, whatever its key algorithm (the classical and the ML-DSA CA share it).
    struct ApprovedContents {
        var subject: DistinguishedName
        var names: [GeneralName]
        var notBefore: Date
        var notAfter: Date
    }

    /// The profile, name, name-constraint and validity rules every leaf passes before any CA signs it.
    static func approveContents(
        profile: CertificateProfile, commonName: String?, dnsNames: [String], ipAddresses: [String], uris: [String],
        validity requested: ValidityDuration?, backdate: ValidityDuration?, policy: IssuancePolicy,
        nameConstraints: NameConstraints?, issuerNotBefore: Date, issuerNotAfter: Date, now: Date
    ) throws -> ApprovedContents {
        let names = try validatedNames(profile: profile, dnsNames: dnsNames, ipAddresses: ipAddresses, uris: uris)
        let subject = try subjectName(commonName: commonName)
        try checkProfileNames(profile, names: names, hasCommonName: commonName != nil)
        if profile == .server, let cn = commonName,
            !names.dns.contains(cn) && !names.ips.contains(where: { Names.ipAddressString($0) == cn })
        {
            // Verifiers that still read the CN must not see a name the SANs do not carry (CA/B BR 7.1.4.3).
            throw PKIError(.profileViolation, "profile server: the common name '\(cn)' must also be one of the DNS or IP SANs")
        }
        try checkNameConstraints(names, policy: policy, constraints: nameConstraints)

        let validity = requested ?? min(profile.defaultValidity, policy.maximumValidity)
        guard validity <= policy.maximumValidity else {
            throw PKIError(.validityTooLong, "requested validity \(validity) exceeds the CA maximum of \(policy.maximumValidity)")
        }
        guard now < issuerNotAfter else {
            throw PKIError(.inconsistentCA, "the issuing CA certificate expired at \(issuerNotAfter)")
        }
        let notBefore = max(now.addingTimeInterval(-(backdate ?? policy.backdate).timeInterval), issuerNotBefore)
        let notAfter = min(now.addingTimeInterval(validity.timeInterval), issuerNotAfter)
        return ApprovedContents(subject: subject, names: names.generalNames, notBefore: notBefore, notAfter: notAfter)
    }

    /// Signs an approved request.
    public func sign(_ approved: ApprovedRequest, serialNumber: Certificate.SerialNumber) throws -> Certificate {
        let extensions = try leafExtensions(approved)
        return try Certificate(
            version: .v3,
            serialNumber: serialNumber,
            publicKey: approved.publicKey,
            notValidBefore: approved.notBefore,
            notValidAfter: approved.notAfter,
            issuer: certificate.subject,
            subject: approved.subject,
            signatureAlgorithm: privateKey.preferredSignatureAlgorithm,
            extensions: extensions,
            issuerPrivateKey: privateKey
        )
    }

    private func leafExtensions(_ approved: ApprovedRequest) throws -> Certificate.Extensions {
        var extensions = Certificate.Extensions()
        try extensions.append(.init(BasicConstraints.notCertificateAuthority, critical: true))
        let isRSA = approved.publicKey.keyTypeHint == .rsa
        try extensions.append(
            .init(KeyUsage(digitalSignature: true, keyEncipherment: isRSA && approved.profile != .client), critical: true)
        )
        try extensions.append(.init(ExtendedKeyUsage(approved.profile.extendedKeyUsages), critical: false))
        try extensions.append(.init(SubjectKeyIdentifier(hash: approved.publicKey), critical: false))
        try extensions.append(
            .init(AuthorityKeyIdentifier(keyIdentifier: subjectKeyIdentifier), critical: false)
        )
        if !approved.subjectAlternativeNames.isEmpty {
            // RFC 5280 4.2.1.6: with an empty subject the SAN extension must be critical.
            try extensions.append(
                .init(
                    SubjectAlternativeNames(approved.subjectAlternativeNames),
                    critical: approved.subject.isEmpty
                )
            )
        }
        if approved.profile == .ocspSigner {
            // id-pkix-ocsp-nocheck (RFC 6960 4.2.2.2.1): relying parties need not check the responder's own status.
            try extensions.append(Certificate.Extension(oid: OCSP.noCheckOID, critical: false, value: [0x05, 0x00]))
        }
        if let ocsp = policy.ocspURL, approved.profile != .ocspSigner {
            try extensions.append(
                .init(
                    AuthorityInformationAccess([.init(method: .ocspServer, location: .uniformResourceIdentifier(ocsp))]),
                    critical: false
                )
            )
        }
        if let crl = policy.crlURL, approved.profile != .ocspSigner {
            try extensions.append(CRLDistributionPoints(url: crl).makeExtension())
        }
        return extensions
    }

    static func subjectName(commonName: String?) throws -> DistinguishedName {
        guard let commonName else { return DistinguishedName() }
        guard !commonName.isEmpty, commonName.count <= 64 else {
            throw PKIError(.invalidName, "invalid common name: must be 1 to 64 characters")
        }
        guard commonName.unicodeScalars.allSatisfy({ !CharacterSet.controlCharacters.contains($0) }) else {
            throw PKIError(.invalidName, "invalid common name: contains control characters")
        }
        return try DistinguishedName { CommonName(commonName) }
    }

    struct ValidatedNames {
        var dns: [String] = []
        var ips: [[UInt8]] = []
        var uris: [String] = []

        var generalNames: [GeneralName] {
            dns.map { .dnsName($0) } + ips.map { .ipAddress(ASN1OctetString(contentBytes: $0[...])) }
                + uris.map { .uniformResourceIdentifier($0) }
        }
    }

    static func validatedNames(profile: CertificateProfile, dnsNames: [String], ipAddresses: [String], uris: [String]) throws
        -> ValidatedNames
    {
        var names = ValidatedNames()
        let total = dnsNames.count + ipAddresses.count + uris.count
        guard total <= 100 else {
            throw PKIError(.profileViolation, "request has \(total) SANs; at most 100 are allowed")
        }
        for dns in dnsNames {
            let normalized = try Names.normalizedDNSName(dns, allowWildcard: profile == .server)
            if !names.dns.contains(normalized) { names.dns.append(normalized) }
        }
        for ip in ipAddresses {
            let bytes = try Names.ipAddressBytes(ip)
            if !names.ips.contains(bytes) { names.ips.append(bytes) }
        }
        for uri in uris {
            let valid = try Names.validatedURI(uri)
            if !names.uris.contains(valid) { names.uris.append(valid) }
        }
        return names
    }

    static func checkProfileNames(_ profile: CertificateProfile, names: ValidatedNames, hasCommonName: Bool) throws {
        switch profile {
        case .server:
            guard !names.dns.isEmpty || !names.ips.isEmpty else {
                throw PKIError(.profileViolation, "profile server needs at least one DNS or IP SAN (--dns or --ip)")
            }
        case .workload:
            let spiffe = names.uris.filter { $0.hasPrefix("spiffe://") }
            guard names.uris.count == 1, spiffe.count == 1 else {
                throw PKIError(
                    .profileViolation,
                    "profile workload needs exactly one URI SAN and it must be a spiffe:// ID (got \(names.uris.count) URI SAN(s)\(names.uris.isEmpty ? "" : ": " + names.uris.joined(separator: ", ")))"
                )
            }
            try Names.requireWorkloadPath(spiffe[0])
        case .ocspSigner:
            guard hasCommonName, names.dns.isEmpty, names.ips.isEmpty, names.uris.isEmpty else {
                throw PKIError(.profileViolation, "profile ocspSigner needs a common name and no SANs")
            }
        case .client, .admin:
            guard hasCommonName || !names.dns.isEmpty || !names.ips.isEmpty || !names.uris.isEmpty else {
                throw PKIError(.profileViolation, "profile \(profile.rawValue) needs a common name or at least one SAN")
            }
        case .intermediate, .root:
            throw PKIError(.profileViolation, "profile \(profile.rawValue) is not a leaf profile")
        }
    }

    /// Checks names against the issuing certificate's X.509 name constraints and the policy's URI prefixes, so that a
    /// certificate relying parties would reject is never signed.
    static func checkNameConstraints(_ names: ValidatedNames, policy: IssuancePolicy, constraints nameConstraints: NameConstraints?) throws {
        if !policy.permittedURIPrefixes.isEmpty {
            for uri in names.uris where !policy.permittedURIPrefixes.contains(where: { Self.uri(uri, hasPrefix: $0) }) {
                throw PKIError(
                    .nameNotPermitted,
                    "URI \(uri) is outside the CA's permitted prefixes (\(policy.permittedURIPrefixes.joined(separator: ", ")))"
                )
            }
        }
        guard let constraints = nameConstraints else { return }
        let permittedDNS = constraints.permittedSubtrees.compactMap { if case .dnsName(let d) = $0 { d } else { nil } }
        let excludedDNS = constraints.excludedSubtrees.compactMap { if case .dnsName(let d) = $0 { d } else { nil } }
        let permittedURI = constraints.permittedSubtrees.compactMap {
            if case .uniformResourceIdentifier(let u) = $0 { u } else { nil }
        }
        let hasIPConstraint = constraints.permittedSubtrees.contains { if case .ipAddress = $0 { true } else { false } }
        for dns in names.dns {
            let bare = dns.hasPrefix("*.") ? String(dns.dropFirst(2)) : dns
            if !permittedDNS.isEmpty, !permittedDNS.contains(where: { Names.dnsName(bare, isWithin: $0) }) {
                throw PKIError(.nameNotPermitted, "DNS name \(dns) is outside the CA's permitted names (\(permittedDNS.joined(separator: ", ")))")
            }
            if let excluded = excludedDNS.first(where: { Names.dnsName(bare, isWithin: $0) }) {
                throw PKIError(.nameNotPermitted, "DNS name \(dns) is excluded by the CA's name constraint \(excluded)")
            }
        }
        if !names.ips.isEmpty, !permittedDNS.isEmpty || !permittedURI.isEmpty, !hasIPConstraint {
            // A CA constrained to names has no permitted IP subtree: an IP SAN would be accepted by most verifiers
            // only because IP constraints are absent, which is not what the operator asked for.
            throw PKIError(.nameNotPermitted, "IP SANs are not permitted by this CA's name constraints")
        }
        for uri in names.uris where !permittedURI.isEmpty {
            guard let host = URLComponents(string: uri)?.host,
                permittedURI.contains(where: { Names.dnsName(host, isWithin: $0) })
            else {
                throw PKIError(.nameNotPermitted, "URI \(uri) is outside the CA's permitted URI domains (\(permittedURI.joined(separator: ", ")))")
            }
        }
        if !names.uris.isEmpty, permittedURI.isEmpty, !permittedDNS.isEmpty, policy.permittedURIPrefixes.isEmpty {
            throw PKIError(.nameNotPermitted, "URI SANs are not permitted by this CA's name constraints")
        }
    }

    /// Prefix match on a path boundary: `spiffe://a/ns/prod` permits `spiffe://a/ns/prod` and `spiffe://a/ns/prod/x`,
    /// not `spiffe://a/ns/production`. A prefix ending in `/` or `/*` matches anything below it.
    static func uri(_ uri: String, hasPrefix prefix: String) -> Bool {
        var p = prefix
        if p.hasSuffix("/*") { p.removeLast() }
        if p.hasSuffix("/") { return uri.hasPrefix(p) }
        return uri == p || uri.hasPrefix(p + "/")
    }
}
