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

    @Option(help: "CRL file(s), PEM (several blocks allowed) or DER (repeatable).")
    var crl: [String] = []

    @Option(help: "Also ask this OCSP responder (http URL) about the certificate; unknown or untrustworthy answers reject.")
    var ocsp: String?

    @Option(help: "Maximum number of intermediates (self-issued ones not counted).")
    var maxDepth: Int?

    @Argument(help: "The certificate to verify (PEM or DER).")
    var leaf: String

    func validate() throws {
        if [dns, ip, email].compactMap({ $0 }).count > 1 {
            throw ValidationError("give at most one of --dns, --ip, --email")
        }
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
            let rootCertificates = try PEMBundle.certificates(fromBytes: try AtomicFile.read(roots, what: "roots"), what: roots)
            let intermediateCertificates = try intermediates.map {
                try PEMBundle.certificates(fromBytes: try AtomicFile.read($0, what: "intermediates"), what: $0)
            } ?? []
            leafCertificate = try PEMBundle.certificates(fromBytes: try AtomicFile.read(leaf, what: "certificate"), what: leaf)[0]
            var validationTime = Date.now
            if let time {
                guard let parsed = try? Date(time, strategy: .iso8601) else {
                    throw CommandFailure("invalid --time '\(time)': expected RFC 3339, e.g. 2026-01-01T00:00:00Z", exitCode: 2)
                }
                validationTime = parsed
            }
            var required: ExtendedKeyUsage.Usage?
            if let eku {
                guard let usage = Self.ekus[eku] else {
                    throw CommandFailure("unknown --eku '\(eku)': expected one of \(Self.ekus.keys.sorted().joined(separator: ", "))", exitCode: 2)
                }
                required = usage
            }
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
            var peer: ChainVerifier.PeerName?
            if let dns { peer = .dns(dns) }
            if let ip { peer = .ip(ip) }
            if let email { peer = .email(email) }
            options = .init(
                roots: rootCertificates, intermediates: intermediateCertificates, validationTime: validationTime,
                requiredEKU: required, peerName: peer, crls: crls, maxDepth: maxDepth
            )
        } catch let error as PKIError {
            throw CommandFailure(error.reason, exitCode: 2)
        }
        switch await ChainVerifier(options: options).verify(leafCertificate) {
        case .accepted(let chain):
            if let ocsp, chain.count >= 2 {
                switch await OCSPClient.check(leaf: leafCertificate, issuer: chain[1], url: ocsp, now: options.validationTime) {
                case .good:
                    print("OCSP: good (\(ocsp))")
                case .revoked(let time, let reason):
                    print("REJECTED: OCSP says the certificate was revoked at \(time)\(reason.map { " (\($0.rawValue))" } ?? "")")
                    throw ExitCode(1)
                case .failed(let why):
                    print("REJECTED: \(why)")
                    throw ExitCode(1)
                }
            }
            print("OK: \(leafCertificate.subject.description.isEmpty ? leafCertificate.serialHex : leafCertificate.subject.description)")
            for (index, certificate) in chain.enumerated() {
                print("  \(index): \(certificate.subject)  (until \(certificate.notValidAfter))")
            }
        case .rejected(let reason, _):
            print("REJECTED: \(reason)")
            throw ExitCode(1)
        }
    }
}
