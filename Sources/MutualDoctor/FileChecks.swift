import Foundation
import MutualPKI
import X509

/// `mutual doctor files`: what is wrong with a certificate, its chain and its key on disk, before a peer finds out.
/// Pure: the caller reads the files; every check here runs in memory.
public struct FileChecks: Sendable {
    public enum Purpose: String, Sendable { case server, client }

    /// The certificates of `--cert` in file order (leaf first, as TLS sends them).
    public var presented: [Certificate]
    /// Extra intermediates (`--chain`), as a peer might already hold them.
    public var extraIntermediates: [Certificate] = []
    /// Trusted roots (`--ca`); nil: chain checks against roots are skipped.
    public var roots: [Certificate]?
    public var key: Certificate.PrivateKey?
    /// The key file's permission bits, when it was read from a file.
    public var keyMode: mode_t?
    public var keyPath = "key"
    public var certPath = "cert"
    public var purpose: Purpose?
    /// A DNS name the certificate must carry (SAN only; the CN is never used).
    public var dnsName: String?
    /// An identity the certificate must carry: `spiffe://…` or `uri:…` (URI SAN), `dns:…`.
    public var expectedIdentity: String?
    /// How soon an expiry is worth a warning.
    public var expiringWithin: TimeInterval = 7 * 86_400
    /// CRLs a server enforces (`--crl`, or fetched from the certificate's distribution points), and where from.
    public var crls: [RevocationList] = []
    public var crlPath = "crl"
    /// Whether every CA on the path needs a CRL among `crls`: true for a server's CRL file (nginx and OpenSSL check
    /// every level), false for the CRL one certificate's distribution point names (it covers that certificate only).
    public var crlsCoverEveryLevel = true

    public init(presented: [Certificate]) { self.presented = presented }

    public func run(now: Date) async -> Diagnosis {
        var findings: [Finding] = []
        guard let leaf = presented.first else {
            return Diagnosis([Finding("no-certificate", .error, subject: certPath, "the file holds no certificate", fix: "give the PEM file with the certificate (and its chain)")])
        }
        findings += keyFindings(leaf)
        findings += validityFindings(now: now)
        findings += chainShapeFindings()
        findings += await trustFindings(leaf, now: now)
        findings += nameFindings(leaf)
        findings += crlFindings(leaf, now: now)
        return Diagnosis(findings)
    }

    static func describe(_ certificate: Certificate) -> String {
        CertificateIdentity.describe(certificate)
    }

    func keyFindings(_ leaf: Certificate) -> [Finding] {
        var findings: [Finding] = []
        if let key, key.publicKey != leaf.publicKey {
            findings.append(Finding(
                "key-mismatch", .error, subject: keyPath,
                "the private key does not belong to the certificate (\(Self.describe(leaf))): a TLS handshake with this pair fails for every peer",
                fix: "use the key generated with this certificate (the agent writes key.pem and cert.pem together), or issue a new certificate for this key"
            ))
        }
        if let keyMode, let finding = Self.keyModeFinding(keyMode, keyPath: keyPath) { findings.append(finding) }
        if key == nil && keyMode == nil {
            // nothing to say: no key given
        }
        let description = leaf.publicKey.algorithmDescription
        if description.hasPrefix("RSA-"), let bits = Int(description.dropFirst(4)), bits < 2048 {
            findings.append(Finding("weak-key", .error, subject: certPath, "the key is \(description); peers refuse RSA keys under 2048 bits", fix: "issue a new certificate with --key-type p256 (or rsa2048 and up)"))
        }
        return findings
    }

    static func keyModeFinding(_ keyMode: mode_t, keyPath: String) -> Finding? {
        guard keyMode & 0o077 != 0 else { return nil }
        return Finding(
            "key-file-permissions", .warning, subject: keyPath,
            "the private key is readable by \(keyMode & 0o007 != 0 ? "every user" : "the file's group") (mode \(String(keyMode & 0o777, radix: 8)))",
            fix: "chmod 600 \(keyPath)"
        )
    }

    func validityFindings(now: Date) -> [Finding] {
        presented.enumerated().compactMap { index, certificate in
            Self.validityFinding(
                index: index, subjectDN: certificate.subject.description, notBefore: certificate.notValidBefore,
                notAfter: certificate.notValidAfter, certPath: certPath, expiringWithin: expiringWithin, now: now
            )
        }
    }

    /// Expired, not yet valid or expiring soon: the same words for a certificate of either family.
    static func validityFinding(
        index: Int, subjectDN: String, notBefore: Date, notAfter: Date, certPath: String, expiringWithin: TimeInterval, now: Date
    ) -> Finding? {
        let what = index == 0 ? "the certificate" : "intermediate \(index) (\(subjectDN))"
        let subject = index == 0 ? certPath : "\(certPath)[\(index)]"
        if notAfter <= now {
            return Finding(
                "expired", .error, subject: subject,
                "\(what) expired \(humanDuration(now.timeIntervalSince(notAfter))) ago (notAfter \(notAfter)); every peer refuses it",
                fix: index == 0 ? "renew it (mutual agent renews at two thirds of the lifetime; `mutual issue` for a one-off)" : "replace the intermediate in the chain file with the current one (the authority's /bundle.pem)"
            )
        } else if notBefore > now {
            return Finding(
                "not-yet-valid", .error, subject: subject,
                "\(what) is valid only from \(notBefore), \(humanDuration(notBefore.timeIntervalSince(now))) from now by this host's clock",
                fix: "check this host's clock (NTP); a certificate issued seconds ago is back-dated, so hours mean a clock that is off"
            )
        } else if notAfter.timeIntervalSince(now) < expiringWithin {
            let left = notAfter.timeIntervalSince(now)
            let lifetime = notAfter.timeIntervalSince(notBefore)
            // A short-lived certificate always "expires soon": warn only when less than a third of its life is left.
            if lifetime > expiringWithin || left < lifetime / 3 {
                return Finding(
                    "expiring-soon", .warning, subject: subject, "\(what) expires in \(humanDuration(left)) (notAfter \(notAfter))",
                    fix: "renew it now; run `mutual agent` so renewals happen at two thirds of the lifetime"
                )
            }
        }
        return nil
    }

    /// The order TLS requires: each certificate issued by the next one; nothing that is not on the path.
    func chainShapeFindings() -> [Finding] {
        if presented.count == 1, let leaf = presented.first, leaf.issuer != leaf.subject, roots == nil,
           !extraIntermediates.contains(where: { $0.subject == leaf.issuer }) {
            // Without roots to try, the shape alone says it: a leaf sent without its issuer.
            return [missingIntermediate(leaf)]
        }
        guard presented.count > 1 else { return [] }
        var findings: [Finding] = []
        var inOrder = true
        for index in 0..<(presented.count - 1) where presented[index].issuer != presented[index + 1].subject {
            inOrder = false
        }
        if !inOrder {
            let order = presented.map { Self.describe($0) }.joined(separator: " → ")
            let issuers = Set(presented.map(\.issuer))
            let extras = presented.dropFirst().filter { !issuers.contains($0.subject) && $0.subject != presented[0].issuer }
            findings.append(Finding(
                "chain-order", .warning, subject: certPath,
                "the chain is not in the order TLS sends it (each certificate followed by its issuer): \(order)\(extras.isEmpty ? "" : "; \(extras.count) certificate(s) are not on the path")",
                fix: "write the leaf first, then its issuing intermediate (the agent's chain.pem); leave out unrelated certificates"
            ))
        }
        if let last = presented.last, last.issuer == last.subject, presented.count > 1 {
            findings.append(Finding(
                "root-in-chain", .info, subject: certPath, "the chain includes the self-signed root (\(last.subject)); peers ignore it, it only costs bytes",
                fix: "send leaf + intermediate only"
            ))
        }
        return findings
    }

    func trustFindings(_ leaf: Certificate, now: Date) async -> [Finding] {
        guard let roots else { return [] }
        let presentedIntermediates = Array(presented.dropFirst())
        let verdict = await ChainVerifier(options: .init(
            roots: roots, intermediates: presentedIntermediates, validationTime: now,
            requiredEKU: purpose.map { $0 == .server ? .serverAuth : .clientAuth }
        )).verify(leaf)
        guard case .rejected(let reason, let code) = verdict, code == .unknownIssuer else { return [] }
        // With the extra intermediates a path exists: the file is only missing its intermediate.
        if !extraIntermediates.isEmpty || presentedIntermediates.isEmpty {
            let withExtras = await ChainVerifier(options: .init(roots: roots, intermediates: presentedIntermediates + extraIntermediates, validationTime: now)).verify(leaf)
            let issuerIsRoot = roots.contains { $0.subject == leaf.issuer }
            if case .accepted = withExtras, !issuerIsRoot {
                return [missingIntermediate(leaf)]
            }
            if presentedIntermediates.isEmpty, !issuerIsRoot, leaf.issuer != leaf.subject {
                // Whether the absent intermediate would lead to --ca cannot be known from here: name what is certain.
                return [missingIntermediate(leaf)]
            }
        }
        return [unknownCA(leaf, reason: reason, top: presented.last?.issuer ?? leaf.issuer)]
    }

    func missingIntermediate(_ leaf: Certificate) -> Finding {
        Finding(
            "missing-intermediate", .error, subject: certPath,
            "only the leaf is sent: peers that do not already hold its issuer (\(leaf.issuer)) cannot build a path to a root",
            fix: "use the chain file (leaf + intermediate: the agent's chain.pem), or add the intermediate to the peer's CA file"
        )
    }

    func unknownCA(_ leaf: Certificate, reason: String, top: DistinguishedName) -> Finding {
        Finding(
            "unknown-ca", .error, subject: certPath,
            "the chain does not lead to the trusted roots: it ends at \(top), and --ca holds \(roots?.map(\.subject.description).joined(separator: "; ") ?? "-") (\(reason))",
            fix: "trust the root that issued this chain (the authority's /roots.pem), or get a certificate from the CA the peer trusts"
        )
    }

    /// What a server that enforces these CRLs (nginx `ssl_crl`, OpenSSL's CRL checks on every level) makes of this
    /// chain: a CRL past nextUpdate or not signed by its CA makes it refuse every certificate of that CA; a CA on the
    /// path without a CRL, too; a listed serial is revoked.
    func crlFindings(_ leaf: Certificate, now: Date) -> [Finding] {
        guard !crls.isEmpty else { return [] }
        var findings: [Finding] = []
        let cas = Array(presented.dropFirst()) + extraIntermediates + (roots ?? [])
        // The CAs whose CRL a server checks: the issuer of every certificate on the path below the root.
        var levels: [DistinguishedName] = []
        var current = leaf
        while current.issuer != current.subject, !levels.contains(current.issuer) {
            levels.append(current.issuer)
            guard let next = cas.first(where: { $0.subject == current.issuer }) else { break }
            current = next
        }
        var covered = Set<DistinguishedName>()
        for crl in crls {
            let subject = "\(crlPath) (\(crl.issuer))"
            let signers = cas.filter { $0.subject == crl.issuer }
            let verified = signers.contains { crl.isSigned(by: $0) }
            if !signers.isEmpty && !verified {
                findings.append(Finding(
                    "crl-signature-invalid", .error, subject: subject,
                    "the CRL names \(crl.issuer) as its issuer, but that CA did not sign it: a server refuses it, and with it every certificate of that CA",
                    fix: "fetch the CRL again from the authority (its /crls.pem, or `mutual agent --crl-out FILE`)"
                ))
                continue
            }
            guard levels.contains(crl.issuer) else {
                findings.append(Finding("crl-unrelated", .info, subject: subject, "this CRL is from a CA that is not on the certificate's path; it does not apply here", fix: nil))
                continue
            }
            covered.insert(crl.issuer)
            if let next = crl.nextUpdate, next > now {
                if crl.thisUpdate > now.addingTimeInterval(300) {
                    findings.append(Finding(
                        "crl-not-yet-valid", .error, subject: subject,
                        "the CRL is dated \(crl.thisUpdate), \(humanDuration(crl.thisUpdate.timeIntervalSince(now))) ahead of this host's clock: a server with this clock refuses every certificate of \(crl.issuer)",
                        fix: "check this host's clock (NTP)"
                    ))
                }
            } else {
                let since = crl.nextUpdate.map { "its nextUpdate passed \(humanDuration(now.timeIntervalSince($0))) ago (\($0))" } ?? "it has no nextUpdate"
                findings.append(Finding(
                    "crl-stale", .error, subject: subject,
                    "the CRL of \(crl.issuer) is stale: \(since); a server that enforces it (nginx ssl_crl, OpenSSL) refuses every certificate of that CA, with alert certificate_expired",
                    fix: "refresh it before nextUpdate: `mutual agent --crl-out FILE --crl-refresh 5m` rewrites it, then reload the server"
                ))
            }
            if crl.issuer == leaf.issuer, let entry = crl.entry(for: leaf.serialNumber) {
                findings.append(Finding(
                    "revoked", .error, subject: certPath,
                    "the certificate is listed as revoked since \(entry.revocationDate)\(entry.reason.map { " (\($0.rawValue))" } ?? "") by the CRL \(crlPath)\(verified ? "" : " (its signature was not checked: give --ca and --chain)")",
                    fix: "issue a new certificate; a revoked one cannot be reinstated"
                ))
            }
        }
        for level in levels where crlsCoverEveryLevel && !covered.contains(level) {
            findings.append(Finding(
                "crl-missing", .warning, subject: crlPath,
                "no CRL from \(level), a CA on this certificate's path: a server that checks every level (nginx ssl_crl) refuses the certificate (unable to get certificate CRL)",
                fix: "put the CRLs of every CA in the file: the authority's /crls.pem has them all"
            ))
        }
        return findings
    }

    func hasEKU(_ certificate: Certificate, _ purpose: Purpose) -> Bool {
        guard let eku = try? certificate.extensions.extendedKeyUsage else { return true }
        return eku.contains(purpose == .server ? .serverAuth : .clientAuth) || eku.contains(.any)
    }

    func wrongEKU(_ leaf: Certificate, _ purpose: Purpose) -> Finding {
        Finding(
            "wrong-eku", .error, subject: certPath,
            "the certificate may not be a TLS \(purpose.rawValue): its extended key usage lacks \(purpose == .server ? "serverAuth" : "clientAuth")",
            fix: purpose == .server ? "issue it with --profile server (or workload, which has both)" : "issue it with --profile client (or workload, which has both)"
        )
    }

    func nameFindings(_ leaf: Certificate) -> [Finding] {
        var findings: [Finding] = []
        let sans = Array((try? leaf.extensions.subjectAlternativeNames) ?? SubjectAlternativeNames())
        if let purpose, !hasEKU(leaf, purpose) {
            findings.append(wrongEKU(leaf, purpose))
        }
        if let dnsName {
            let wanted = dnsName.lowercased()
            let dns = sans.compactMap { if case .dnsName(let d) = $0 { return d.lowercased() } else { return nil } }
            let matches = dns.contains { $0 == wanted || ($0.hasPrefix("*.") && wanted.hasSuffix($0.dropFirst(1)) && !wanted.dropLast($0.count - 1).contains(".")) }
            if !matches {
                let cnOnly = leaf.subject.lastCommonNameString.map { $0.lowercased() == wanted } ?? false
                findings.append(Finding(
                    "name-mismatch", .error, subject: certPath,
                    "the certificate is not valid for \(dnsName): its DNS names are \(dns.isEmpty ? "none" : dns.joined(separator: ", "))\(cnOnly ? " (the subject CN says \(dnsName), but TLS clients ignore the CN)" : "")",
                    fix: "issue it with --dns \(dnsName) (a SAN)"
                ))
            }
        }
        if let expectedIdentity {
            let uris = sans.compactMap { if case .uniformResourceIdentifier(let u) = $0 { return u } else { return nil } }
            let dns = sans.compactMap { if case .dnsName(let d) = $0 { return d } else { return nil } }
            let wanted = expectedIdentity.hasPrefix("uri:") ? String(expectedIdentity.dropFirst(4)) : expectedIdentity
            let found = wanted.hasPrefix("dns:") ? dns.contains(String(wanted.dropFirst(4)).lowercased()) : uris.contains(wanted)
            if !found {
                findings.append(Finding(
                    "identity-mismatch", .error, subject: certPath,
                    "expected \(expectedIdentity), but the certificate carries \((uris.map { $0 } + dns.map { "dns:" + $0 }).joined(separator: ", ").nonEmpty ?? "no SAN")",
                    fix: "check which certificate this host presents (mutual show SERIAL), or correct the expected identity"
                ))
            }
        }
        return findings
    }
}

extension String {
    var nonEmpty: String? { isEmpty ? nil : self }
}
