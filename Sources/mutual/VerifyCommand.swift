import ArgumentParser
import Foundation
import MutualClient
import MutualPKI
import X509

struct VerifyCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "verify",
        abstract: "Verify a certificate chain (RFC 5280, EKU, names without CN fallback, CRLs, depth).",
        discussion: "Exits 0 when the chain is accepted, 1 when it is rejected (the reason is printed), 2 on usage or input errors."
    )

    @Option(help: "Trusted roots (PEM, one or more).")
    var roots: String

    @Option(help: "Untrusted intermediates (PEM).")
    var intermediates: String?

    @Option(help: "Validation time, RFC 3339 (default: now).")
    var time: String?

    @Option(help: "Required extended key usage: clientAuth|serverAuth|codeSigning|emailProtection|timeStamping|ocspSigning.")
    var eku: String?

    @Option(help: "Expected DNS name (SAN only, never CN).")
    var dns: String?

    @Option(help: "Expected IP address.")
    var ip: String?

    @Option(help: "Expected email address.")
    var email: String?

    @Option(help: "Expected URI SAN, compared exactly: a SPIFFE ID such as spiffe://example.org/ns/prod/sa/api.")
    var uri: String?

    @Option(help: "CRL file(s), PEM (several blocks allowed) or DER (repeatable).")
    var crl: [String] = []

    @Option(help: "Also ask this OCSP responder (http URL) about the certificate; unknown or untrustworthy answers reject.")
    var ocsp: String?

    @Flag(help: "Ask the OCSP responder the certificate itself names (its AIA); without it, --ocsp or --crl, revocation is reported as not checked.")
    var checkRevocation = false

    @Flag(help: "Print the result as JSON: {result, code, reason, identity, chain, revocation}.")
    var json = false

    @Option(help: "Maximum number of intermediates (self-issued ones not counted).")
    var maxDepth: Int?

    @Argument(help: "The certificate to verify (PEM or DER).")
    var leaf: String

    func validate() throws {
        if [dns, ip, email, uri].compactMap({ $0 }).count > 1 {
            throw ValidationError("give at most one of --dns, --ip, --email, --uri")
        }
        if checkRevocation && ocsp != nil { throw ValidationError("give --ocsp URL or --check-revocation, not both") }
        if let maxDepth, maxDepth < 0 { throw ValidationError("--max-depth must be 0 or more") }
        if let ocsp, !(ocsp.hasPrefix("http://") || ocsp.hasPrefix("https://")) { throw ValidationError("--ocsp needs an http:// URL") }
    }

    static let ekus: [String: ExtendedKeyUsage.Usage] = [
        "clientAuth": .clientAuth, "serverAuth": .serverAuth, "codeSigning": .codeSigning,
        "emailProtection": .emailProtection, "timeStamping": .timeStamping, "ocspSigning": .ocspSigning,
        "OCSPSigning": .ocspSigning,
    ]

    func run() async throws {
        let options: ChainVerifier.Options
        let leafCertificate: Certificate
        do {
            // Bundles may mix classical and ML-DSA certificates (a migration's trust bundle carries both roots).
            let anyRoots = try PEMBundle.anyCertificates(fromBytes: try AtomicFile.read(roots, what: "roots"), what: roots)
            let anyIntermediates = try intermediates.map {
                try PEMBundle.anyCertificates(fromBytes: try AtomicFile.read($0, what: "intermediates"), what: $0)
            } ?? []
            let anyLeaf = try PEMBundle.anyCertificates(fromBytes: try AtomicFile.read(leaf, what: "certificate"), what: leaf)[0]
            guard case .classical(let classicalLeaf) = anyLeaf else {
                // An ML-DSA key or signature: swift-certificates cannot read it, the ML-DSA verifier does.
                try await runMLDSA(leaf: anyLeaf, roots: anyRoots, intermediates: anyIntermediates)
                return
            }
            leafCertificate = classicalLeaf
            let rootCertificates = anyRoots.compactMap(\.classical)
            let intermediateCertificates = anyIntermediates.compactMap(\.classical)
            guard !rootCertificates.isEmpty else {
                throw CommandFailure("--roots \(roots): no classical root for this classical certificate (the file holds only ML-DSA roots)", exitCode: 2)
            }
            let validationTime = try validationTime()
            let required = try requiredEKU()
            let crls = try readCRLs()
            let peer = peerName
            if let notCA = rootCertificates.first(where: { !Self.isCA($0) }) {
                throw CommandFailure("--roots \(roots): \(Self.identity(of: notCA)) is not a CA certificate (no basicConstraints CA:TRUE), so nothing can chain to it; pass the root (ca/root.pem or bundle.pem), not a leaf", exitCode: 2)
            }
            options = .init(
                roots: rootCertificates, intermediates: intermediateCertificates, validationTime: validationTime,
                requiredEKU: required, peerName: peer, crls: crls, maxDepth: maxDepth
            )
        } catch let error as PKIError {
            throw CommandFailure(error.reason, exitCode: 2)
        }
        var report = Report(result: "accepted", identity: Self.identity(of: leafCertificate), serial: leafCertificate.serialHex)
        switch await ChainVerifier(options: options).verify(leafCertificate) {
        case .accepted(let chain):
            report.chain = chain.map { .init(subject: $0.subject.description, serial: $0.serialHex, not_after: $0.notValidAfter.formatted(.iso8601)) }
            await revocation(into: &report, named: Self.ocspURL(in: leafCertificate.extensions), chainLength: chain.count) { url in
                await OCSPClient.check(leaf: leafCertificate, issuer: chain[1], url: url, now: options.validationTime)
            }
        case .rejected(let reason, let code):
            report.reject(code: code.rawValue, reason: reason)
        }
        try print(report)
    }

    func validationTime() throws -> Date {
        guard let time else { return .now }
        guard let parsed = try? Date(time, strategy: .iso8601) else {
            throw CommandFailure("invalid --time '\(time)': expected RFC 3339, e.g. 2026-01-01T00:00:00Z", exitCode: 2)
        }
        return parsed
    }

    func requiredEKU() throws -> ExtendedKeyUsage.Usage? {
        guard let eku else { return nil }
        guard let usage = Self.ekus[eku] else {
            throw CommandFailure("unknown --eku '\(eku)': expected one of \(Self.ekus.keys.sorted().joined(separator: ", "))", exitCode: 2)
        }
        return usage
    }

    func readCRLs() throws -> [RevocationList] {
        var crls: [RevocationList] = []
        for path in crl {
            let bytes = try AtomicFile.read(path, what: "CRL")
            if let text = String(validating: bytes, as: UTF8.self), text.contains("-----BEGIN") {
                let blocks = try RevocationList.pemDocuments(text)
                guard !blocks.isEmpty else { throw CommandFailure("\(path): no X509 CRL block", exitCode: 2) }
                crls += try blocks.map { try RevocationList(derEncoded: $0) }
            } else {
                crls.append(try RevocationList(derEncoded: bytes))
            }
        }
        return crls
    }

    var peerName: ChainVerifier.PeerName? {
        if let dns { return .dns(dns) }
        if let ip { return .ip(ip) }
        if let email { return .email(email) }
        if let uri { return .uri(uri) }
        return nil
    }

    /// A chain with ML-DSA certificates: the same options, report and exit codes as the classical path; revocation by
    /// CRL (the ML-DSA issuing CA's `/pq/crl`) or OCSP (answered by that CA with ML-DSA signatures).
    func runMLDSA(leaf: AnyCertificate, roots anyRoots: [AnyCertificate], intermediates: [AnyCertificate]) async throws {
        func generic(_ certificate: AnyCertificate) throws -> MLDSACertificate {
            switch certificate {
            case .mldsa(let c): return c
            case .classical(let c): return try MLDSACertificate(derEncoded: try c.derBytes)
            }
        }
        let leafCertificate = try generic(leaf)
        let rootCertificates = try anyRoots.map(generic)
        if let notCA = rootCertificates.first(where: { c in
            guard case .isCertificateAuthority = try? Certificate.Extensions(c.extensions).basicConstraints else { return true }
            return false
        }) {
            throw CommandFailure("--roots \(roots): \(CertificateIdentity.of(notCA) ?? notCA.subject.description) is not a CA certificate (no basicConstraints CA:TRUE), so nothing can chain to it; pass the root (ca/pq-root.pem or the /pq/roots.pem bundle), not a leaf", exitCode: 2)
        }
        let options = MLDSAChainVerifier.Options(
            roots: rootCertificates, intermediates: try intermediates.map(generic), validationTime: try validationTime(),
            requiredEKU: try requiredEKU(), peerName: peerName, maxDepth: maxDepth ?? ChainVerifier.defaultSearchDepth, crls: try readCRLs()
        )
        let identity = CertificateIdentity.of(leafCertificate) ?? (leafCertificate.subject.isEmpty ? "serial \(leafCertificate.serialHex)" : leafCertificate.subject.description)
        var report = Report(result: "accepted", identity: identity, serial: leafCertificate.serialHex)
        report.algorithm = leafCertificate.subjectKeyVariant?.rawValue
        switch MLDSAChainVerifier(options: options).verify(leafCertificate) {
        case .accepted(let chain):
            report.chain = chain.map { .init(subject: $0.subject.description, serial: $0.serialHex, not_after: $0.notAfter.formatted(.iso8601)) }
            let extensions = (try? Certificate.Extensions(leafCertificate.extensions)) ?? Certificate.Extensions()
            await revocation(into: &report, named: Self.ocspURL(in: extensions), chainLength: chain.count) { url in
                await OCSPClient.check(leaf: leafCertificate, issuer: chain[1], url: url, now: options.validationTime)
            }
        case .rejected(let reason, let code):
            report.reject(code: code.rawValue, reason: reason)
        }
        try print(report)
    }

    func print(_ report: Report) throws {
        if json {
            try printJSON(report)
        } else if report.result == "accepted" {
            Swift.print("OK: \(report.identity)\(report.algorithm.map { "  (\($0))" } ?? "")")
            for (index, certificate) in (report.chain ?? []).enumerated() {
                Swift.print("  \(index): \(certificate.subject.isEmpty ? "(no subject) serial " + certificate.serial : certificate.subject)  (until \(certificate.not_after))")
            }
            Swift.print("  revocation: \(report.revocation ?? "not checked")")
        } else {
            Swift.print("REJECTED (\(report.code ?? "invalid")): \(report.reason ?? "")")
        }
        if report.result != "accepted" { throw ExitCode(1) }
    }

    struct Report: Encodable {
        struct Link: Encodable {
            var subject: String
            var serial: String
            var not_after: String
        }
        var result: String
        var code: String?
        var reason: String?
        var identity: String
        var serial: String
        var chain: [Link]?
        var revocation: String?
        /// The leaf key's ML-DSA parameter set, for ML-DSA certificates.
        var algorithm: String?

        mutating func reject(code: String, reason: String) {
            result = "rejected"
            self.code = code
            self.reason = reason
        }
    }

    /// How people name a certificate: its SPIFFE ID or first SAN, else its subject, else its serial (SAN-only leaves
    /// have an empty subject).
    static func identity(of certificate: Certificate) -> String {
        CertificateIdentity.describe(certificate)
    }

    static func isCA(_ certificate: Certificate) -> Bool {
        guard let constraints = try? certificate.extensions.basicConstraints else {
            // A v1 self-signed root carries no extensions at all; let the verifier judge it.
            return certificate.extensions.isEmpty
        }
        if case .isCertificateAuthority = constraints { return true }
        return false
    }

    /// Revocation of an accepted chain, for either family: OCSP (`--ocsp`, or the certificate's own responder with
    /// `--check-revocation`) through `ask`, else what `--crl` said, else "not checked".
    func revocation(into report: inout Report, named: String?, chainLength: Int, ask: (String) async -> OCSPClient.Verdict) async {
        let ocspURL = ocsp ?? (checkRevocation ? named : nil)
        if checkRevocation && ocspURL == nil {
            report.reject(code: "revocation_unavailable", reason: "--check-revocation: the certificate names no OCSP responder (no AIA OCSP URL); give --crl FILE")
        } else if let ocspURL, chainLength >= 2 {
            switch await ask(ocspURL) {
            case .good:
                report.revocation = "good (OCSP \(ocspURL))"
            case .revoked(let time, let reason):
                report.reject(code: "revoked", reason: "OCSP says the certificate was revoked at \(time.formatted(.iso8601))\(reason.map { " (\($0.rawValue))" } ?? "")")
                report.revocation = "revoked (OCSP \(ocspURL))"
            case .failed(let why):
                report.reject(code: "revocation_unavailable", reason: why)
            }
        } else if !crl.isEmpty {
            report.revocation = "good (CRL)"
        } else {
            report.revocation = "not checked: no --crl, --ocsp or --check-revocation\(named.map { " (it names OCSP \($0): add --check-revocation)" } ?? "")"
        }
    }

    static func ocspURL(in extensions: Certificate.Extensions) -> String? {
        guard let access = try? extensions.authorityInformationAccess else { return nil }
        for description in access where description.method == .ocspServer {
            if case .uniformResourceIdentifier(let url) = description.location { return url }
        }
        return nil
    }
}
