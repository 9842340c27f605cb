import Foundation
import MutualPKI
import X509

/// `mutual doctor files` for a chain that holds ML-DSA certificates (RFC 9881), which ``FileChecks`` (built on
/// swift-certificates) cannot read: the key belongs to the certificate, the key file's mode, every certificate's
/// validity, and the chain to the trusted roots by Mutual's ML-DSA verifier, with the same codes as the classical
/// checks.
public struct MLDSAFileChecks: Sendable {
    public var presented: [AnyCertificate]
    public var roots: [AnyCertificate]?
    public var key: MLDSASigningKey?
    public var keyMode: mode_t?
    public var keyPath = "key"
    public var certPath = "cert"
    public var purpose: FileChecks.Purpose?
    public var expiringWithin: TimeInterval = 7 * 86_400

    public init(presented: [AnyCertificate]) { self.presented = presented }

    public func run(now: Date) -> Diagnosis {
        guard let leaf = presented.first else {
            return Diagnosis([Finding("no-certificate", .error, subject: certPath, "the file holds no certificate", fix: "give the PEM file with the certificate (and its chain)")])
        }
        var findings: [Finding] = []
        if let key, let mldsa = leaf.mldsa, mldsa.subjectKeyVariant != key.variant || mldsa.subjectPublicKey != key.publicKey {
            findings.append(Finding(
                "key-mismatch", .error, subject: keyPath,
                "the ML-DSA private key does not belong to the certificate (\(CertificateIdentity.display(leaf))): a TLS handshake with this pair fails for every peer",
                fix: "use the key generated with this certificate (`mutual issue` writes key.pem and cert.pem together), or issue a new certificate for this key"
            ))
        }
        if let keyMode, let finding = FileChecks.keyModeFinding(keyMode, keyPath: keyPath) { findings.append(finding) }
        for (index, certificate) in presented.enumerated() {
            if let finding = FileChecks.validityFinding(
                index: index, subjectDN: certificate.subject.description, notBefore: certificate.notValidBefore,
                notAfter: certificate.notValidAfter, certPath: certPath, expiringWithin: expiringWithin, now: now
            ) { findings.append(finding) }
        }
        if let roots, findings.allSatisfy({ $0.code != "expired" && $0.code != "not-yet-valid" }) {
            do {
                let generic = try presented.map { try $0.generic }
                let verdict = MLDSAChainVerifier(options: .init(
                    roots: try roots.map { try $0.generic }, intermediates: Array(generic.dropFirst()), validationTime: now,
                    requiredEKU: purpose.map { $0 == .server ? .serverAuth : .clientAuth }
                )).verify(generic[0])
                if case .rejected(let reason, let code) = verdict {
                    findings.append(code == .unknownIssuer
                        ? Finding("unknown-ca", .error, subject: certPath, "the ML-DSA chain does not lead to the trusted roots (\(reason))",
                                  fix: "trust the root that issued this chain (the authority's /pq/roots.pem), or get a certificate from the CA the peer trusts")
                        : Finding("invalid-chain", .error, subject: certPath, "peers refuse this ML-DSA chain: \(reason)",
                                  fix: "issue a new certificate from the ML-DSA hierarchy (`mutual issue --key-type ml-dsa-65`)"))
                }
            } catch {
                findings.append(Finding("file-unreadable", .error, subject: certPath, "\(error)", fix: "give PEM certificates"))
            }
        }
        return Diagnosis(findings)
    }
}
