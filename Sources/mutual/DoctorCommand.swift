import ArgumentParser
import Foundation
import MutualDoctor
import MutualPKI
import MutualProxy
import X509

struct DoctorCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "doctor",
        abstract: "Explain in plain words what is wrong with certificates, keys and configurations, with the fix.",
        discussion: """
            Exit 0 when healthy, 1 when something was found, 2 on bad usage. One line per finding: severity, a stable
            code, the subject, the cause and the fix; --json prints {"findings":[{"code","severity","subject","message","fix"}]}.
            """,
        subcommands: [Endpoint.self, Files.self, Proxy.self],
        defaultSubcommand: Endpoint.self
    )

    struct Endpoint: AsyncParsableCommand {
        static let configuration = CommandConfiguration(
            commandName: "endpoint",
            abstract: "Diagnose a live TLS endpoint as a client: `mutual doctor https://host:port`.",
            discussion: "Codes: unreachable, timeout, not-tls, no-common-protocol, handshake-failed, client-cert-required, client-ca-mismatch, client-cert-refused, clock-skew, revoked, revocation-unchecked, trust-unchecked, and every `doctor files` code for the server's chain and for our client certificate."
        )

        @Argument(help: "https://HOST:PORT (or HOST:PORT).") var url: String
        @Option(help: "Server name to send (SNI) and to check against the certificate's SANs.") var servername: String?
        @Option(help: "Our client certificate chain (PEM).") var cert: String?
        @Option(help: "Our client key (PEM).") var key: String?
        @Option(help: "Roots to trust (PEM), e.g. the authority's roots.pem.") var ca: String?
        @Option(help: "The identity the server must present: spiffe://… or dns:NAME.") var expectIdentity: String?
        @Option(help: "Give up after this long.", transform: ValidityDuration.argument) var timeout: ValidityDuration = .seconds(10)
        @Flag(help: "Do not ask the OCSP responder the server's certificate names.") var noRevocation = false
        @Flag(help: "Print JSON.") var json = false

        func run() async throws {
            var text = url
            if text.hasPrefix("https://") { text.removeFirst("https://".count) }
            if text.hasSuffix("/") { text.removeLast() }
            guard !text.contains("/"), !url.hasPrefix("http://") else {
                throw CommandFailure("invalid endpoint '\(url)': expected https://HOST:PORT", exitCode: 2)
            }
            let address = try inputFailure { try SocketAddressSpec(parsing: text.contains(":") ? text : text + ":443", what: "endpoint") }
            let (host, port) = (address.host, address.port)
            var options = EndpointProbe.Options(host: host, port: port)
            options.serverName = servername
            options.timeout = .seconds(timeout.seconds)
            options.checkRevocation = !noRevocation
            options.expectedIdentity = expectIdentity
            if let ca { options.roots = try readCertificates(ca, what: "--ca") }
            switch (cert, key) {
            case let (cert?, key?):
                options.clientChain = try readCertificates(cert, what: "--cert")
                let bytes = try inputFailure { try AtomicFile.read(key, limit: 1 << 20, what: "--key") }
                options.clientKey = try inputFailure { try KeyFile.load(pem: String(decoding: bytes, as: UTF8.self), passphrase: Passphrase.read) }
            case (nil, nil):
                break
            default:
                throw CommandFailure("give --cert and --key together", exitCode: 2)
            }
            let probe = EndpointProbe(options: options)
            let observation = await probe.observe()
            try report(await probe.diagnose(observation, now: .now), json: json)
        }
    }

    struct Files: AsyncParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Check a certificate, its chain and its key on disk (before a peer finds out).",
            discussion: "Codes: no-certificate, key-mismatch, key-file-permissions, weak-key, expired, not-yet-valid, expiring-soon, chain-order, root-in-chain, missing-intermediate, unknown-ca, wrong-eku, name-mismatch, identity-mismatch; with --crl: crl-stale, crl-not-yet-valid, crl-signature-invalid, crl-missing, crl-unrelated, revoked."
        )

        @Option(help: "The certificate file (PEM; leaf first, then its chain, as a server or client sends it).") var cert: String
        @Option(help: "The private key file (PEM).") var key: String?
        @Option(help: "Intermediates the peer may already hold (PEM).") var chain: String?
        @Option(help: "The roots the peer trusts (PEM), e.g. the authority's roots.pem.") var ca: String?
        @Option(help: "What the certificate is for: server|client.") var purpose: String?
        @Option(help: "A DNS name the certificate must be valid for (SAN; the CN is never used).") var dns: String?
        @Option(help: "The identity it must carry: spiffe://… or dns:NAME.") var expectIdentity: String?
        @Option(help: "CRLs a server enforces (PEM or DER; repeat for several files), e.g. nginx's ssl_crl file.") var crl: [String] = []
        @Flag(help: "Print JSON.") var json = false

        func run() async throws {
            if let diagnosis = try mldsaDiagnosis(cert: cert, key: key, ca: ca, purpose: purpose) {
                if dns != nil || expectIdentity != nil || !crl.isEmpty || chain != nil {
                    throw CommandFailure("--dns, --expect-identity, --crl and --chain are checked for classical chains only; for an ML-DSA chain use `mutual verify --dns/--uri/--crl`", exitCode: 2)
                }
                try report(diagnosis, json: json)
                return
            }
            var checks = FileChecks(presented: try readCertificates(cert, what: "--cert", allowEmpty: true))
            checks.certPath = cert
            if let chain { checks.extraIntermediates = try readCertificates(chain, what: "--chain") }
            if let ca { checks.roots = try readCertificates(ca, what: "--ca") }
            if let key {
                checks.keyPath = key
                let bytes = try inputFailure { try AtomicFile.read(key, limit: 1 << 20, what: "--key") }
                checks.key = try inputFailure { try KeyFile.load(pem: String(decoding: bytes, as: UTF8.self), passphrase: Passphrase.read) }
                var info = stat()
                if stat(key, &info) == 0 { checks.keyMode = info.st_mode & 0o777 }
            }
            if let purpose {
                guard let parsed = FileChecks.Purpose(rawValue: purpose) else {
                    throw CommandFailure("invalid --purpose '\(purpose)': expected server or client", exitCode: 2)
                }
                checks.purpose = parsed
            }
            checks.dnsName = dns
            checks.expectedIdentity = expectIdentity
            for path in crl {
                let bytes = try inputFailure { try AtomicFile.read(path, limit: 16 << 20, what: "--crl") }
                do {
                    checks.crls += try RevocationList.all(in: bytes)
                } catch {
                    throw CommandFailure("--crl \(path): not a CRL (PEM X509 CRL blocks or one DER CRL): \((error as? PKIError)?.reason ?? "\(error)")", exitCode: 2)
                }
            }
            checks.crlPath = crl.joined(separator: ", ")
            try report(await checks.run(now: .now), json: json)
        }
    }

    struct Proxy: AsyncParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Check a proxy's YAML configuration and the files it names, before starting it.",
            discussion: "Codes: config-invalid, file-unreadable, and every `doctor files` code for each listener's certificate (server) and each outbound certificate (client), checked against the listener's client-ca."
        )

        @Option(help: "The proxy's YAML file.") var config: String
        @Flag(help: "Print JSON.") var json = false

        func run() async throws {
            let configuration: ProxyConfiguration
            do {
                configuration = try ProxyConfiguration.load(path: config)
            } catch let error as PKIError {
                try report(Diagnosis([Finding("config-invalid", .error, subject: config, error.reason, fix: "correct the file (see docs/proxy.md, \"The YAML file\")")]), json: json)
                return
            }
            let findings = await Self.findings(for: configuration)
            try report(Diagnosis(findings), json: json)
        }
    }
}


extension DoctorCommand.Proxy {
    /// The file checks for every listener's certificate (server) and every outbound certificate (client). Also run
    /// by `mutual proxy` at start-up, which logs them as warnings.
    static func findings(for configuration: ProxyConfiguration) async -> [Finding] {
        var findings: [Finding] = []
        let listeners = configuration.listeners.enumerated().map { (index, l) in (l.name ?? "listeners[\(index)]", l.cert, l.key, l.clientCA, FileChecks.Purpose.server) }
        let outbound = configuration.outbound.enumerated().map { (index, o) in (o.name ?? "outbound[\(index)]", o.cert, o.key, o.serverCA, FileChecks.Purpose.client) }
        for (name, certPath, keyPath, caPath, purpose) in listeners + outbound {
            do {
                if let diagnosis = try mldsaDiagnosis(cert: certPath, key: keyPath, ca: caPath, purpose: purpose.rawValue, label: name) {
                    findings += diagnosis.findings
                    continue
                }
                var checks = FileChecks(presented: try readCertificates(certPath, what: "\(name).cert", allowEmpty: true))
                checks.certPath = "\(name).cert \(certPath)"
                checks.keyPath = "\(name).key \(keyPath)"
                checks.purpose = purpose
                let keyBytes = try AtomicFile.read(keyPath, limit: 1 << 20, what: "\(name).key")
                checks.key = try KeyFile.load(pem: String(decoding: keyBytes, as: UTF8.self), passphrase: { nil })
                var info = stat()
                if stat(keyPath, &info) == 0 { checks.keyMode = info.st_mode & 0o777 }
                // The listener's CA file usually holds the same CA's root: a chain that does not lead to it is worth
                // a look, but the peer may trust other roots, so only the leaf-only case is reported from it.
                if let roots = try? readCertificates(caPath, what: "\(name).ca"), roots.contains(where: { $0.subject == checks.presented.last?.issuer || $0.subject == checks.presented.first?.issuer }) {
                    checks.roots = roots
                }
                findings += await checks.run(now: .now).findings
            } catch let failure as CommandFailure {
                findings.append(Finding("file-unreadable", .error, subject: name, failure.message, fix: "check the path and the permissions of the files this listener names"))
            } catch let error as PKIError {
                findings.append(Finding("file-unreadable", .error, subject: name, error.reason, fix: "check the path and the permissions of the files this listener names"))
            } catch {
                findings.append(Finding("file-unreadable", .error, subject: name, "\(error)", fix: "check the path and the permissions of the files this listener names"))
            }
        }
        return findings
    }
}

/// The file checks for a certificate file holding ML-DSA certificates (nil when it holds only classical ones): key,
/// key mode, validity and the chain to `ca`'s roots, by Mutual's ML-DSA verifier.
func mldsaDiagnosis(cert: String, key: String?, ca: String?, purpose: String?, label: String? = nil) throws -> Diagnosis? {
    let bytes = try inputFailure { try AtomicFile.read(cert, limit: PEMBundle.maximumInputSize, what: label.map { "\($0).cert" } ?? "--cert") }
    guard let presented = try? PEMBundle.anyCertificates(fromBytes: bytes), presented.contains(where: \.isPostQuantum) else { return nil }
    var checks = MLDSAFileChecks(presented: presented)
    checks.certPath = label.map { "\($0).cert \(cert)" } ?? cert
    if let ca {
        checks.roots = try inputFailure { try PEMBundle.anyCertificates(fromBytes: try AtomicFile.read(ca, limit: PEMBundle.maximumInputSize, what: "--ca"), what: ca) }
    }
    if let key {
        checks.keyPath = label.map { "\($0).key \(key)" } ?? key
        let text = String(decoding: try inputFailure { try AtomicFile.read(key, limit: 1 << 20, what: "--key") }, as: UTF8.self)
        checks.key = try inputFailure { try MLDSASigningKey(pem: text, passphrase: Passphrase.read) }
        var info = stat()
        if stat(key, &info) == 0 { checks.keyMode = info.st_mode & 0o777 }
    }
    if let purpose {
        guard let parsed = FileChecks.Purpose(rawValue: purpose) else {
            throw CommandFailure("invalid --purpose '\(purpose)': expected server or client", exitCode: 2)
        }
        checks.purpose = parsed
    }
    return checks.run(now: .now)
}

/// Prints a diagnosis and exits 1 when it found problems.
func report(_ diagnosis: Diagnosis, json: Bool) throws {
    if json {
        try printJSON(diagnosis)
    } else {
        print(diagnosis.text, terminator: "")
    }
    if !diagnosis.isHealthy { throw ExitCode(1) }
}

/// Reads PEM or DER certificates; unreadable or garbage input is a usage error (exit 2) naming the flag.
func readCertificates(_ path: String, what: String, allowEmpty: Bool = false) throws -> [Certificate] {
    let bytes = try inputFailure { try AtomicFile.read(path, limit: PEMBundle.maximumInputSize, what: what) }
    if allowEmpty, !bytes.contains(where: { !($0 == 0x20 || $0 == 0x0A || $0 == 0x0D || $0 == 0x09) }) { return [] }
    return try inputFailure { try PEMBundle.certificates(fromBytes: bytes, what: "\(what) \(path)") }
}
