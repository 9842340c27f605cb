import Crypto
import Foundation
import MutualPKI
import SwiftASN1
import X509

/// CA hierarchies and certificates built in memory for tests: no checked-in certificates that expire.
public enum TestPKI {
    /// A fixed instant tests use as "now", so validity arithmetic is exact.
    public static let now = Date(timeIntervalSince1970: 1_800_000_000)

    /// A root + issuing intermediate made by the production factory, wrapped as an `IssuingCA`.
    public static func issuingCA(
        keyType: KeyType = .p256, constraints: CAFactory.Constraints = .init(), policy: IssuancePolicy = .init(),
        now: Date = now
    ) throws -> IssuingCA {
        let h = try CAFactory.makeHierarchy(name: "Test CA", keyType: keyType, constraints: constraints, now: now)
        var policy = policy
        policy.permittedURIPrefixes = constraints.permittedURIPrefixes
        return try IssuingCA(certificate: h.intermediate, privateKey: h.intermediateKey, root: h.root, policy: policy)
    }

    /// A CSR signed by `key`, asking for whatever SANs and extra extensions the test wants (hostile ones included).
    public static func csr(
        key: Certificate.PrivateKey, commonName: String? = nil, sans: [GeneralName] = [],
        extraExtensions: [Certificate.Extension] = []
    ) throws -> CertificateSigningRequest {
        var extensions = Certificate.Extensions()
        if !sans.isEmpty { try extensions.append(Certificate.Extension(SubjectAlternativeNames(sans), critical: false)) }
        for ext in extraExtensions { try extensions.append(ext) }
        let subject = try commonName.map { cn in try DistinguishedName { CommonName(cn) } } ?? DistinguishedName()
        let attributes: CertificateSigningRequest.Attributes =
            extensions.isEmpty ? .init() : try .init([.init(ExtensionRequest(extensions: extensions))])
        return try CertificateSigningRequest(
            version: .v1, subject: subject, privateKey: key, attributes: attributes,
            signatureAlgorithm: key.preferredSignatureAlgorithm
        )
    }

    public static func pem(_ csr: CertificateSigningRequest) throws -> [UInt8] {
        Array(try csr.serializeAsPEM().pemString.utf8)
    }

    public static func der(_ csr: CertificateSigningRequest) throws -> [UInt8] {
        var serializer = DER.Serializer()
        try serializer.serialize(csr)
        return serializer.serializedBytes
    }

    /// A certificate with exactly the given contents, signed by `issuerKey` (for verifier tests that need shapes the
    /// issuer would refuse to make).
    public static func certificate(
        subject: String, issuer: Certificate?, issuerKey: Certificate.PrivateKey, publicKey: Certificate.PublicKey,
        notBefore: Date = now.addingTimeInterval(-3600), notAfter: Date = now.addingTimeInterval(86_400),
        extensions: Certificate.Extensions
    ) throws -> Certificate {
        let subjectName = try DistinguishedName { CommonName(subject) }
        return try Certificate(
            version: .v3, serialNumber: IssuingCA.randomSerialNumber(), publicKey: publicKey,
            notValidBefore: notBefore, notValidAfter: notAfter, issuer: issuer?.subject ?? subjectName,
            subject: subjectName, signatureAlgorithm: issuerKey.preferredSignatureAlgorithm, extensions: extensions,
            issuerPrivateKey: issuerKey
        )
    }

    /// A hostile "lattice" of CA certificates, as an attacker would send it in a handshake: `subjects` CA names, each
    /// with `perSubject` certificates, every one signed by the same key and issued by another name of the lattice, so
    /// every (certificate, issuer) pair has a valid signature and the paths are all permutations of the names. No root
    /// anyone trusts is involved. The leaf (clientAuth, issued by the first name) carries `leafKey`.
    public static func lattice(
        subjects: Int, perSubject: Int, leafKey: Certificate.PrivateKey, now: Date = now
    ) throws -> (leaf: Certificate, intermediates: [Certificate]) {
        let key = try KeyType.p256.generate()
        let names = try (0..<subjects).map { index in try DistinguishedName { CommonName("Lattice CA \(index)") } }
        var ca = Certificate.Extensions()
        try ca.append(Certificate.Extension(BasicConstraints.isCertificateAuthority(maxPathLength: nil), critical: true))
        try ca.append(Certificate.Extension(KeyUsage(keyCertSign: true, cRLSign: true), critical: true))
        var intermediates: [Certificate] = []
        for copy in 0..<perSubject {
            for (index, subject) in names.enumerated() {
                let issuer = names[(index + 1 + copy) % subjects == index ? (index + 1) % subjects : (index + 1 + copy) % subjects]
                intermediates.append(try Certificate(
                    version: .v3, serialNumber: IssuingCA.randomSerialNumber(), publicKey: key.publicKey,
                    notValidBefore: now.addingTimeInterval(-3600), notValidAfter: now.addingTimeInterval(86_400),
                    issuer: issuer, subject: subject, signatureAlgorithm: key.preferredSignatureAlgorithm,
                    extensions: ca, issuerPrivateKey: key
                ))
            }
        }
        var leafExtensions = Certificate.Extensions()
        try leafExtensions.append(Certificate.Extension(ExtendedKeyUsage([.clientAuth]), critical: false))
        try leafExtensions.append(Certificate.Extension(SubjectAlternativeNames([.uniformResourceIdentifier("spiffe://lattice.test/x")]), critical: false))
        let leaf = try Certificate(
            version: .v3, serialNumber: IssuingCA.randomSerialNumber(), publicKey: leafKey.publicKey,
            notValidBefore: now.addingTimeInterval(-3600), notValidAfter: now.addingTimeInterval(86_400),
            issuer: names[0], subject: try DistinguishedName { CommonName("lattice leaf") },
            signatureAlgorithm: key.preferredSignatureAlgorithm, extensions: leafExtensions, issuerPrivateKey: key
        )
        return (leaf, intermediates)
    }

    /// A temporary directory removed by the caller (tests use `defer`).
    public static func temporaryDirectory(_ label: String = "test") -> String {
        let path = FileManager.default.temporaryDirectory.appendingPathComponent("mutual-\(label)-\(UUID().uuidString.prefix(8))").path
        try? FileManager.default.createDirectory(atPath: path, withIntermediateDirectories: true)
        return path
    }
}
