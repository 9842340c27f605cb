import Crypto
import Foundation
import SwiftASN1
import X509

/// The ML-DSA hierarchy `mutual init --key-type ml-dsa-65|ml-dsa-87` creates beside the classical one: a root and an
/// issuing intermediate whose keys and signatures are ML-DSA (RFC 9881), issuing leaves whose keys are ML-DSA.
///
/// It lives beside the classical hierarchy rather than replacing it because the authority's own listener must stay
/// reachable by clients that cannot verify ML-DSA yet (curl and OpenSSL 3.0 as Debian 12 ships them); a leaf's key
/// type decides which hierarchy issues it, so a quantum-safe identity is never signed by a classical key.
public struct MLDSAHierarchy: Sendable {
    public var root: MLDSACertificate
    public var rootKey: MLDSASigningKey
    public var intermediate: MLDSACertificate
    public var intermediateKey: MLDSASigningKey

    /// Generates both keys and certificates. The names carry "PQ" so that operators and verifiers tell the two
    /// hierarchies of one CA apart (CN at most 64 characters: the CA name is at most 52).
    public static func make(
        name: String, variant: MLDSAVariant, constraints: CAFactory.Constraints = .init(), now: Date,
        rootValidity: ValidityDuration = CertificateProfile.root.defaultValidity,
        intermediateValidity: ValidityDuration = CertificateProfile.intermediate.defaultValidity
    ) throws -> MLDSAHierarchy {
        guard !name.isEmpty, name.count <= 52, name.unicodeScalars.allSatisfy({ !CharacterSet.controlCharacters.contains($0) }) else {
            throw PKIError(.invalidName, "invalid CA name: must be 1 to 52 printable characters")
        }
        let (dns, uriHosts) = try constraints.validated()
        let rootKey = try MLDSASigningKey(generating: variant)
        let intermediateKey = try MLDSASigningKey(generating: variant)
        let notBefore = now.addingTimeInterval(-CAFactory.backdate.timeInterval)
        let rootSubject = try DistinguishedName {
            OrganizationName(name)
            CommonName("\(name) PQ Root")
        }
        let rootSKI = MLDSAIssuingCA.keyIdentifier(rootKey.publicKey)
        let root = try MLDSACertificate.build(
            serialNumber: Array(IssuingCA.randomSerialNumber().bytes), issuer: rootSubject, subject: rootSubject,
            notBefore: notBefore, notAfter: now.addingTimeInterval(rootValidity.timeInterval),
            subjectPublicKeyInfo: try rootKey.subjectPublicKeyInfo,
            extensions: [
                try .init(BasicConstraints.isCertificateAuthority(maxPathLength: nil), critical: true),
                try .init(KeyUsage(keyCertSign: true, cRLSign: true), critical: true),
                try .init(SubjectKeyIdentifier(keyIdentifier: rootSKI[...]), critical: false),
            ],
            issuerKey: rootKey
        )
        let intermediateSubject = try DistinguishedName {
            OrganizationName(name)
            CommonName("\(name) PQ Issuing")
        }
        var extensions: [Certificate.Extension] = [
            try .init(BasicConstraints.isCertificateAuthority(maxPathLength: 0), critical: true),
            try .init(KeyUsage(digitalSignature: true, keyCertSign: true, cRLSign: true), critical: true),
            try .init(SubjectKeyIdentifier(keyIdentifier: MLDSAIssuingCA.keyIdentifier(intermediateKey.publicKey)[...]), critical: false),
            try .init(AuthorityKeyIdentifier(keyIdentifier: rootSKI[...]), critical: false),
        ]
        if !dns.isEmpty || !uriHosts.isEmpty {
            extensions.append(try .init(NameConstraints(permittedDNSDomains: dns, permittedURIDomains: uriHosts), critical: true))
        }
        let intermediate = try MLDSACertificate.build(
            serialNumber: Array(IssuingCA.randomSerialNumber().bytes), issuer: rootSubject, subject: intermediateSubject,
            notBefore: notBefore, notAfter: min(now.addingTimeInterval(intermediateValidity.timeInterval), root.notAfter),
            subjectPublicKeyInfo: try intermediateKey.subjectPublicKeyInfo, extensions: extensions, issuerKey: rootKey
        )
        return MLDSAHierarchy(root: root, rootKey: rootKey, intermediate: intermediate, intermediateKey: intermediateKey)
    }
}

/// The public half of an ML-DSA key a leaf is issued for.
public struct MLDSAPublicKey: Sendable, Hashable {
    public var variant: MLDSAVariant
    /// The raw FIPS 204 public key.
    public var rawRepresentation: [UInt8]

    public init(variant: MLDSAVariant, rawRepresentation: [UInt8]) throws {
        guard rawRepresentation.count == variant.publicKeySize else {
            throw PKIError(.unsupportedKey, "an \(variant.rawValue) public key is \(variant.publicKeySize) bytes, not \(rawRepresentation.count)")
        }
        self.variant = variant
        self.rawRepresentation = rawRepresentation
    }
}

/// The ML-DSA issuing CA: the same profiles, name, name-constraint and validity rules as ``IssuingCA`` (one shared
/// implementation), signing with ML-DSA and issuing only for ML-DSA keys (RFC 9881 key usage: digitalSignature only).
public struct MLDSAIssuingCA: Sendable {
    public let certificate: MLDSACertificate
    public let key: MLDSASigningKey
    public let root: MLDSACertificate
    public var policy: IssuancePolicy
    private let subjectKeyIdentifier: [UInt8]
    private let nameConstraints: NameConstraints?

    public init(certificate: MLDSACertificate, key: MLDSASigningKey, root: MLDSACertificate, policy: IssuancePolicy) throws {
        guard certificate.subjectKeyVariant == key.variant, certificate.subjectPublicKey == key.publicKey else {
            throw PKIError(.inconsistentCA, "the ML-DSA issuing key does not match the ML-DSA issuing certificate")
        }
        guard certificate.isIssued(by: root) else {
            throw PKIError(.inconsistentCA, "the ML-DSA issuing certificate is not signed by the ML-DSA root")
        }
        let extensions = try Certificate.Extensions(certificate.extensions)
        self.certificate = certificate
        self.key = key
        self.root = root
        self.policy = policy
        self.subjectKeyIdentifier = (try? extensions.subjectKeyIdentifier).flatMap { $0.map { Array($0.keyIdentifier) } }
            ?? Self.keyIdentifier(key.publicKey)
        self.nameConstraints = try? extensions.nameConstraints
    }

    /// RFC 5280 4.2.1.2 method 1: SHA-1 of the subject public key bits (an identifier, not a security function).
    static func keyIdentifier(_ publicKey: [UInt8]) -> [UInt8] { Array(Insecure.SHA1.hash(data: publicKey)) }

    /// Checks a request for an ML-DSA key by the classical CA's rules and signs it. Only ML-DSA keys of this CA's
    /// strength or stronger are accepted: an ML-DSA-87 hierarchy does not certify ML-DSA-65 keys.
    public func issue(
        _ request: IssuanceRequest.Contents, publicKey: MLDSAPublicKey, now: Date, serialNumber: [UInt8]? = nil
    ) throws -> MLDSACertificate {
        guard CertificateProfile.leafProfiles.contains(request.profile) || request.profile == .admin else {
            throw PKIError(.profileViolation, "profile '\(request.profile.rawValue)' cannot be requested from the ML-DSA issuing CA")
        }
        guard publicKey.variant == key.variant || (publicKey.variant == .mlDSA87 && key.variant == .mlDSA65) else {
            throw PKIError(.unsupportedKey, "the \(key.variant.rawValue) issuing CA does not certify \(publicKey.variant.rawValue) keys")
        }
        let contents = try IssuingCA.approveContents(
            profile: request.profile, commonName: request.commonName, dnsNames: request.dnsNames,
            ipAddresses: request.ipAddresses, uris: request.uris, validity: request.validity, backdate: request.backdate,
            policy: policy, nameConstraints: nameConstraints, issuerNotBefore: certificate.notBefore,
            issuerNotAfter: certificate.notAfter, now: now
        )
        var extensions: [Certificate.Extension] = [
            try .init(BasicConstraints.notCertificateAuthority, critical: true),
            // RFC 9881 5: an ML-DSA key signs; it never encrypts or agrees keys.
            try .init(KeyUsage(digitalSignature: true), critical: true),
            try .init(ExtendedKeyUsage(request.profile.extendedKeyUsages), critical: false),
            try .init(SubjectKeyIdentifier(keyIdentifier: Self.keyIdentifier(publicKey.rawRepresentation)[...]), critical: false),
            try .init(AuthorityKeyIdentifier(keyIdentifier: subjectKeyIdentifier[...]), critical: false),
        ]
        if !contents.names.isEmpty {
            extensions.append(try .init(SubjectAlternativeNames(contents.names), critical: contents.subject.isEmpty))
        }
        if let ocsp = policy.ocspURL {
            extensions.append(try .init(AuthorityInformationAccess([.init(method: .ocspServer, location: .uniformResourceIdentifier(ocsp))]), critical: false))
        }
        if let crl = policy.crlURL {
            extensions.append(try CRLDistributionPoints(url: crl).makeExtension())
        }
        return try MLDSACertificate.build(
            serialNumber: serialNumber ?? Array(IssuingCA.randomSerialNumber().bytes), issuer: certificate.subject,
            subject: contents.subject, notBefore: contents.notBefore, notAfter: contents.notAfter,
            subjectPublicKeyInfo: try MLDSACertificate.subjectPublicKeyInfo(variant: publicKey.variant, publicKey: publicKey.rawRepresentation),
            extensions: extensions, issuerKey: key
        )
    }
}
