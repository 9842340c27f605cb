import ArgumentParser
import Foundation
import MutualAuthority
import MutualPKI
import MutualStore

struct IssueCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "issue",
        abstract: "Generate a key locally and issue a certificate for it.",
        discussion: "Writes OUT/key.pem (0600), OUT/cert.pem, OUT/chain.pem (leaf + intermediate) and OUT/root.pem."
    )

    @OptionGroup var stateOptions: StateOptions

    @Option(help: "Certificate profile: \(CertificateProfile.leafChoices).")
    var profile: String

    @Option(help: "Subject common name.")
    var cn: String?

    @Option(help: "DNS SAN (repeatable).")
    var dns: [String] = []

    @Option(help: "IP address SAN (repeatable).")
    var ip: [String] = []

    @Option(help: "URI SAN, e.g. a SPIFFE ID (repeatable).")
    var uri: [String] = []

    @Option(help: "Lifetime, e.g. 24h or 30d (default: the profile's).", transform: ValidityDuration.argument)
    var validity: ValidityDuration?

    @Option(help: "Key type: \(KeyChoice.choices). ML-DSA keys are certified by the ML-DSA hierarchy (`mutual pq init`).")
    var keyType: KeyChoice = .classical(.p256)

    @Option(help: "Who owns this certificate (free text, kept in the inventory).")
    var owner: String?

    @Option(help: "Directory to write key.pem, cert.pem, chain.pem and root.pem into.")
    var outDir: String

    @Flag(help: "Print the result as JSON.")
    var json = false

    func run() async throws {
        let profile = try await failing { try CertificateProfile(leafName: self.profile) }
        let authority = try await stateOptions.openAuthority()
        if case .mldsa(let variant) = keyType {
            do {
                try await issueMLDSA(variant, authority: authority, profile: profile)
                try await authority.close()
            } catch {
                try? await authority.close()
                throw error
            }
            return
        }
        do {
            guard case .classical(let keyType) = keyType else { return }
            let key = try keyType.generate()
            let issued = try await failing {
                try await authority.issue(
                    IssuanceRequest(
                        profile: profile, publicKey: key.publicKey, commonName: cn, dnsNames: dns, ipAddresses: ip,
                        uris: uri, validity: validity
                    ),
                    owner: owner, requester: cliActor
                )
            }
            try await failing {
                try FileManager.default.createDirectory(atPath: outDir, withIntermediateDirectories: true)
                try AtomicFile.write(KeyFile.pem(for: key, passphrase: nil), to: outDir + "/key.pem", mode: 0o600)
                try AtomicFile.write(PEMBundle.pem([issued.certificate]), to: outDir + "/cert.pem")
                try AtomicFile.write(PEMBundle.pem(issued.chain), to: outDir + "/chain.pem")
                try AtomicFile.write(PEMBundle.pem([authority.ca.root]), to: outDir + "/root.pem")
            }
            let carriesURLs = authority.ca.policy.crlURL != nil
            try await authority.close()
            try report(issued.record, outFiles: ["key.pem", "cert.pem", "chain.pem", "root.pem"].map { outDir + "/" + $0 }, json: json)
            if !carriesURLs { warnNoRevocationURL() }
        } catch {
            try? await authority.close()
            throw error
        }
    }
}

extension IssueCommand {
    /// An ML-DSA key, generated here, certified by the ML-DSA issuing CA; written in PKCS#8 seed form (RFC 9881).
    func issueMLDSA(_ variant: MLDSAVariant, authority: Authority, profile: CertificateProfile) async throws {
        let key = try MLDSASigningKey(generating: variant)
        let issued = try await failing {
            try await authority.issue(
                IssuanceRequest.Contents(profile: profile, commonName: cn, dnsNames: dns, ipAddresses: ip, uris: uri, validity: validity),
                mldsaKey: try MLDSAPublicKey(variant: variant, rawRepresentation: key.publicKey), owner: owner, requester: cliActor
            )
        }
        guard let root = authority.pqCA?.root else { return }
        try await failing {
            try FileManager.default.createDirectory(atPath: outDir, withIntermediateDirectories: true)
            try AtomicFile.write(try key.pem(passphrase: nil), to: outDir + "/key.pem", mode: 0o600)
            try AtomicFile.write(issued.certificate.pem, to: outDir + "/cert.pem")
            try AtomicFile.write(issued.chain.map(\.pem).joined(), to: outDir + "/chain.pem")
            try AtomicFile.write(root.pem, to: outDir + "/root.pem")
        }
        try report(issued.record, outFiles: ["key.pem", "cert.pem", "chain.pem", "root.pem"].map { outDir + "/" + $0 }, json: json)
    }
}

struct SignCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "sign",
        abstract: "Issue a certificate from a CSR (PEM or DER).",
        discussion: """
            The CSR's signature is verified. Only its subject common name and subjectAltName are used; every other
            requested extension (CA:true, keyCertSign, EKUs) is ignored: the profile decides.
            """
    )

    @OptionGroup var stateOptions: StateOptions

    @Option(help: "Certificate profile: \(CertificateProfile.leafChoices).")
    var profile: String

    @Option(help: "Lifetime, e.g. 24h or 30d (default: the profile's).", transform: ValidityDuration.argument)
    var validity: ValidityDuration?

    @Option(help: "Who owns this certificate (free text, kept in the inventory).")
    var owner: String?

    @Option(help: "Where to write the certificate (PEM).")
    var out: String

    @Option(help: "Also write the chain (certificate, then the issuing intermediate) here, for servers that send it.")
    var chainOut: String?

    @Flag(help: "Print the result as JSON.")
    var json = false

    @Argument(help: "The CSR file, PEM or DER, at most 64 KiB.")
    var csr: String

    func run() async throws {
        let profile = try await failing { try CertificateProfile(leafName: self.profile) }
        let bytes = try await failing { try AtomicFile.read(csr, limit: PEMBundle.maximumInputSize, what: "CSR") }
        // Decode before opening the CA so bad input never touches the state directory. An ML-DSA CSR (which the
        // classical decoder cannot read) goes to the ML-DSA hierarchy.
        let isMLDSA = (try? MLDSACertificationRequest(pemOrDER: bytes)) != nil
        if !isMLDSA { _ = try await failing { try CSRDecoder.decode(bytes) } }
        let authority = try await stateOptions.openAuthority()
        if isMLDSA {
            do {
                let issued = try await failing {
                    try await authority.sign(mldsaCSR: bytes, profile: profile, validity: validity, owner: owner, requester: cliActor)
                }
                try await failing {
                    try AtomicFile.write(issued.certificate.pem, to: out)
                    if let chainOut { try AtomicFile.write(issued.chain.map(\.pem).joined(), to: chainOut) }
                }
                try await authority.close()
                try report(issued.record, outFiles: [out] + (chainOut.map { [$0] } ?? []), json: json)
            } catch {
                try? await authority.close()
                throw error
            }
            return
        }
        do {
            let issued = try await failing {
                try await authority.sign(csr: bytes, profile: profile, validity: validity, owner: owner, requester: cliActor)
            }
            try await failing {
                try AtomicFile.write(PEMBundle.pem([issued.certificate]), to: out)
                if let chainOut { try AtomicFile.write(PEMBundle.pem(issued.chain), to: chainOut) }
            }
            let carriesURLs = authority.ca.policy.crlURL != nil
            try await authority.close()
            try report(issued.record, outFiles: [out] + (chainOut.map { [$0] } ?? []), json: json)
            if !carriesURLs { warnNoRevocationURL() }
        } catch {
            try? await authority.close()
            throw error
        }
    }
}

/// Certificates issued before any CRL/OCSP URL is recorded carry none: say so on stderr, with the fix and a code.
func warnNoRevocationURL() {
    FileHandle.standardError.write(Data("mutual: note: this certificate carries no CRL or OCSP URL, because none is recorded for this CA yet; set one with `mutual config --http-public-url http://NAME:9080` (or run `mutual serve`) [revocation-url-missing]\n".utf8))
}

func report(_ record: CertificateRecord, outFiles: [String], json: Bool) throws {
    if json {
        try printJSON(CertificateRecordView(record, now: .now))
        return
    }
    print("Issued \(record.profile) certificate \(record.serial)")
    print("  identity:   \(record.identity)")
    if !record.subjectAlternativeNames.isEmpty { print("  SANs:       \(record.subjectAlternativeNames.joined(separator: ", "))") }
    print("  valid:      \(record.notBefore) → \(record.notAfter)")
    print("  SHA-256:    \(record.fingerprint)")
    for file in outFiles { print("  wrote       \(file)") }
}
