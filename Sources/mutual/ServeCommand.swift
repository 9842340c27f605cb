import ArgumentParser
import Foundation
import Logging
import MutualAuthority
import MutualDoctor
import MutualPKI
import MutualServer
import MutualStore

struct ServeCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "serve",
        abstract: "Run the authority: HTTPS API for enrollment with tokens, renewal over mTLS, revocation, inventory.",
        discussion: """
            Listens on HTTPS with a server certificate issued from the CA's own intermediate (renewed at 2/3 of its
            lifetime). Admin endpoints require the admin client certificate written by `mutual init` (admin/).
            Stops gracefully on SIGTERM or SIGINT: in-flight requests finish. See docs/api.md.
            """
    )

    @OptionGroup var stateOptions: StateOptions

    @Option(help: "Settings and ACME provisioners in a YAML file (docs/acme.md); a flag given here wins over the file.")
    var config: String?

    @Option(help: "Address to listen on, HOST:PORT (port 0 picks a free port; the chosen one is printed). Default 127.0.0.1:9443.")
    var listen: String?

    @Option(help: "URL clients use to reach this authority; its host is put in the server certificate.")
    var publicURL: String?

    @Option(help: "Plain-HTTP listener for /crl, /crl.pem, /ocsp and /roots.pem only, HOST:PORT, or 'off'. Default 127.0.0.1:9080.")
    var httpListen: String?

    @Option(help: "Base URL placed in certificates for the CRL (URL/crl) and OCSP (URL/ocsp); default http://<http-listen>.")
    var httpPublicURL: String?

    @Option(help: "Allow /v1/renew-expired for certificates expired at most this long ago (off by default).", transform: ValidityDuration.argument)
    var renewExpiredGrace: ValidityDuration?

    @Option(help: "Lifetime of each published CRL of the issuing CA (a new one is signed at half of it and after every revocation). Default 24h.", transform: ValidityDuration.argument)
    var crlValidity: ValidityDuration?

    @Option(help: "Lifetime of the authority's own TLS certificate. Default 24h.", transform: ValidityDuration.argument)
    var serverCertValidity: ValidityDuration?

    @Option(help: "Serve an ACME provisioner (RFC 8555) with this name at /acme/NAME/directory: DNS names and IP addresses inside the CA's constraints, http-01 and tls-alpn-01, no account binding unless --acme-eab (repeatable).")
    var acme: [String] = []

    @Option(help: "Port the ACME validator connects to for http-01 challenges.")
    var acmeHttpPort: Int = 80

    @Option(help: "Port the ACME validator connects to for tls-alpn-01 challenges.")
    var acmeTlsPort: Int = 443

    @Option(help: "Resolver the ACME validator asks for dns-01 TXT records, HOST:PORT; offers dns-01 (and wildcard names) when set.")
    var acmeDnsResolver: String?

    @Flag(help: "ACME accounts need an External Account Binding key (made with `mutual acme eab create`).")
    var acmeEab = false

    @Option(help: "Lifetime of certificates issued over ACME.", transform: ValidityDuration.argument)
    var acmeValidity: ValidityDuration = .days(7)

    @Flag(help: "Do not serve the dashboard at /dashboard/ (served by default; sign in with `mutual dashboard login`).")
    var noDashboard = false

    @Option(help: "Log level: trace|debug|info|notice|warning|error|critical. Default info.")
    var logLevel: String?

    @Option(name: .customLong("oauth-allow"), help: "Serve the OAuth token endpoint (certificate-bound tokens, docs/oauth.md): clients whose certificate matches IDENTITY_PATTERN may get tokens for AUDIENCE with these scopes, as 'IDENTITY_PATTERN=AUDIENCE[:SCOPE,…]' (repeatable; no rule, no token).")
    var oauthAllow: [String] = []

    @Option(help: "Lifetime of access tokens (default 5m, at most 24h; never past the certificate's notAfter).", transform: ValidityDuration.argument)
    var oauthTokenLifetime: ValidityDuration?

    @Option(name: .customLong("oauth-introspector"), help: "Callers besides the admin certificate that may introspect tokens: identity pattern (repeatable).")
    var oauthIntrospectors: [String] = []

    @Option(help: "The tokens' issuer (iss) and metadata base URL; default --public-url, else https://<listen address>.")
    var oauthIssuer: String?

    func run() async throws {
        GlobalExecutor.adoptEventLoops()
        var file = AuthorityFile()
        if let config {
            do { file = try AuthorityFile.load(path: config) } catch let problem as AuthorityFile.Problem {
                throw CommandFailure("\(config): \(problem)", exitCode: 2)
            }
        }
        let listen = self.listen ?? file.listen ?? "127.0.0.1:9443"
        let httpListen = self.httpListen ?? file.httpListen ?? "127.0.0.1:9080"
        let publicURL = self.publicURL ?? file.publicURL
        let httpPublicURL = self.httpPublicURL ?? file.httpPublicURL
        let renewExpiredGrace = self.renewExpiredGrace ?? file.renewExpiredGrace
        let crlValidity = self.crlValidity ?? file.crlValidity ?? .hours(24)
        let serverCertValidity = self.serverCertValidity ?? file.serverCertValidity ?? .hours(24)
        let logLevel = self.logLevel ?? file.logLevel ?? "info"
        let (host, port) = try await failing { try AuthorityServer.Configuration.parseListen(listen) }
        let http = httpListen == "off" ? nil : try await failing { try AuthorityServer.Configuration.parseListen(httpListen) }
        if let httpPublicURL {
            _ = try await failing { try Authority.validatedHTTPPublicURL(httpPublicURL) }
        }
        var url: URL?
        if let publicURL {
            guard let parsed = URL(string: publicURL), parsed.scheme == "https", parsed.host != nil else {
                throw CommandFailure("invalid --public-url '\(publicURL)': expected https://HOST[:PORT]", exitCode: 2)
            }
            url = parsed
        }
        for (flag, port) in [("--acme-http-port", acmeHttpPort), ("--acme-tls-port", acmeTlsPort)] where !(1...65535).contains(port) {
            throw CommandFailure("\(flag) must be a port between 1 and 65535 (got \(port))", exitCode: 2)
        }
        let allNames = acme + file.acme.map { $0.name }
        if Set(allNames).count != allNames.count { throw CommandFailure("ACME provisioner names must be distinct (--acme and the file's acme list)", exitCode: 2) }
        if let acmeDnsResolver, (try? AuthorityServer.Configuration.parseListen(acmeDnsResolver)) == nil || acmeDnsResolver.hasSuffix(":0") {
            throw CommandFailure("--acme-dns-resolver '\(acmeDnsResolver.prefix(80))': expected HOST:PORT, e.g. 127.0.0.1:53", exitCode: 2)
        }
        let acmeProvisioners = try await failing {
            try acme.map { name in
                var provisioner = try ACMEProvisioner(name: name)
                provisioner.httpPort = acmeHttpPort
                provisioner.tlsPort = acmeTlsPort
                provisioner.validity = acmeValidity
                provisioner.requireEAB = acmeEab
                if let acmeDnsResolver {
                    provisioner.dnsResolver = acmeDnsResolver
                    provisioner.challenges.append("dns-01")
                }
                return provisioner
            }
        }
        // Every input is checked before the authority opens: a refusal must not leave a database half-opened.
        let oauth = try await failing { try oauthSettings(file: file) }
        var logger = Logger(label: "mutual.serve")
        logger.logLevel = Logger.Level(rawValue: logLevel) ?? .info
        let authority = try await stateOptions.openAuthority()
        var configuration = AuthorityServer.Configuration(
            host: host, port: port, publicURL: url, serverCertificateLifetime: serverCertValidity, renewExpiredGrace: renewExpiredGrace
        )
        configuration.httpListen = http
        configuration.httpPublicURL = httpPublicURL
        configuration.crlValidity = crlValidity
        configuration.acmeProvisioners = file.acme + acmeProvisioners
        configuration.dashboard = !noDashboard && file.dashboard != false
        configuration.oauth = oauth
        let server = AuthorityServer(authority: authority, configuration: configuration, logger: logger)
        let dashboardOn = configuration.dashboard
        await Self.warnAboutCA(stateOptions.state, logger: logger)
        do {
            try await server.run(onListening: { port in
                let line = "mutual serve: listening on https://\(host.contains(":") ? "[\(host)]" : host):\(port)\n  trust anchor: \(stateOptions.state.rootCertificatePath)\n"
                FileHandle.standardOutput.write(Data(line.utf8))
                if dashboardOn {
                    FileHandle.standardOutput.write(Data("  dashboard: https://\(host.contains(":") ? "[\(host)]" : host):\(port)/dashboard/ (sign in: mutual dashboard login)\n".utf8))
                }
                for name in allNames {
                    FileHandle.standardOutput.write(Data("  ACME directory: https://\(host.contains(":") ? "[\(host)]" : host):\(port)/acme/\(name)/directory\n".utf8))
                }
            }, onHTTPListening: { port in
                FileHandle.standardOutput.write(Data("mutual serve: CRL and OCSP on http://\(http?.host ?? ""):\(port) (/crl, /crl.pem, /ocsp, /roots.pem)\n".utf8))
            })
            // Pending writes get a few seconds to commit; a database that stopped answering must not hold the exit.
            // (Unstructured tasks: a task group would wait for a stuck close anyway.)
            let (finished, signal) = AsyncStream<Void>.makeStream()
            Task { try? await authority.close(); signal.yield() }
            Task { try? await Task.sleep(for: .seconds(5)); signal.yield() }
            for await _ in finished { break }
        } catch let error as ListenError {
            try? await authority.close()
            throw CommandFailure("\(error)", exitCode: 2)
        } catch let error as ServeRefusal {
            try? await authority.close()
            throw CommandFailure("\(error.message) [\(error.code)]", exitCode: 2)
        } catch {
            try? await authority.close()
            throw CommandFailure("serve stopped: \(error)")
        }
    }
}

extension ServeCommand {
    /// The token endpoint's settings: flags replace the file's lists, as for every other setting.
    func oauthSettings(file: AuthorityFile) throws -> OAuthSettings {
        var settings = OAuthSettings()
        do {
            settings.rules = oauthAllow.isEmpty ? file.oauthAllow : try oauthAllow.map(OAuthRule.init(parsing:))
            settings.introspectors = oauthIntrospectors.isEmpty ? file.oauthIntrospectors : try oauthIntrospectors.map(ScopePattern.init)
        } catch let error as OAuthError {
            throw CommandFailure("--oauth-allow: \(error.reason)", exitCode: 2, code: error.code)
        } catch let error as AuthorityError {
            throw CommandFailure("--oauth-introspector: \(error.reason)", exitCode: 2, code: error.code.name)
        }
        if settings.rules.isEmpty, !settings.introspectors.isEmpty || oauthTokenLifetime != nil || oauthIssuer != nil {
            throw CommandFailure("the --oauth-… settings need at least one --oauth-allow rule (the token endpoint is off without one)", exitCode: 2)
        }
        if let lifetime = oauthTokenLifetime ?? file.oauthTokenLifetime {
            guard lifetime.seconds >= 10, lifetime.seconds <= 86_400 else {
                throw CommandFailure("--oauth-token-lifetime must be between 10s and 24h (got \(lifetime))", exitCode: 2)
            }
            settings.tokenLifetime = lifetime.timeInterval
        }
        if let issuer = oauthIssuer ?? file.oauthIssuer {
            guard let url = URL(string: issuer), url.scheme == "https", url.host != nil, url.query == nil, url.fragment == nil else {
                throw CommandFailure("invalid --oauth-issuer '\(issuer.prefix(100))': expected an https URL without query or fragment (RFC 8414 2)", exitCode: 2)
            }
            settings.issuer = issuer
        }
        return settings
    }
}

struct TokenCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "token", abstract: "Scoped access tokens for enrollment (POST /v1/sign).",
        subcommands: [Create.self, List.self, Revoke.self]
    )

    struct Create: AsyncParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Mint a token. It is shown once; only its hash is stored.",
            discussion: "Scope patterns: 'spiffe://example.org/ns/prod/*' (anything below), '*.svc.example.org' (any subdomain), or exact names."
        )
        @OptionGroup var stateOptions: StateOptions
        @Option(name: .customLong("scope"), help: "Names the token may request (repeatable).") var scopes: [String] = []
        @Option(help: "Profile the token issues: \(CertificateProfile.leafChoices).") var profile: String = "workload"
        @Option(help: "Longest certificate lifetime the token may request.", transform: ValidityDuration.argument) var maxValidity: ValidityDuration = .hours(24)
        @Option(help: "How long the token itself can be used.", transform: ValidityDuration.argument) var ttl: ValidityDuration = .hours(1)
        @Option(help: "How many certificates it may issue.") var uses: Int = 1
        @Option(help: "Owner recorded on the token and on certificates issued with it.") var owner: String?
        @Option(help: "Key type requests under this token must use (repeatable; default: any): \(KeyChoice.choices).") var keyType: [KeyChoice] = []
        @Flag(help: "Print JSON (with id and token).") var json = false

        func run() async throws {
            let profile = try await failing { try CertificateProfile(leafName: self.profile) }
            let authority = try await stateOptions.openAuthority()
            do {
                let issued = try await failing {
                    try await TokenService(store: authority.store).create(
                        scopes: scopes, profile: profile, maxValidity: maxValidity, ttl: ttl, uses: uses, owner: owner,
                        actor: cliActor, caMaximum: authority.ca.policy.maximumValidity, keyTypes: keyType
                    )
                }
                try await authority.close()
                if json {
                    try printJSON(TokenView(issued.record, token: issued.token))
                } else {
                    print(issued.token)
                    FileHandle.standardError.write(Data("token \(issued.record.id): \(profile.rawValue), scopes \(issued.record.scopes.joined(separator: " ")), \(uses) use(s)\(issued.record.keyTypes.map { ", keys " + $0.joined(separator: " ") } ?? ""), expires \(issued.record.expiresAt). Shown once.\n".utf8))
                }
            } catch {
                try? await authority.close()
                throw error
            }
        }
    }

    struct List: AsyncParsableCommand {
        static let configuration = CommandConfiguration(abstract: "List tokens (never their secrets).")
        @OptionGroup var stateOptions: StateOptions
        @Flag(help: "Print JSON.") var json = false

        func run() async throws {
            let authority = try await stateOptions.openAuthority()
            let tokens = try await failing { try await TokenService(store: authority.store).list() }
            try await authority.close()
            if json {
                try printJSON(tokens.map { TokenView($0, token: nil) })
                return
            }
            var rows = [["ID", "PROFILE", "USES", "EXPIRES", "STATUS", "SCOPES"]]
            let now = Date.now
            for t in tokens {
                let status = t.revokedAt != nil ? "revoked" : t.expiresAt <= now ? "expired" : t.usesConsumed >= t.usesAllowed ? "used up" : "active"
                rows.append([t.id, t.profile, "\(t.usesConsumed)/\(t.usesAllowed)", AuditTime.short(t.expiresAt), status, t.scopes.joined(separator: " ")])
            }
            printTable(rows)
        }
    }

    struct Revoke: AsyncParsableCommand {
        static let configuration = CommandConfiguration(abstract: "Revoke a token so it can no longer be used.")
        @OptionGroup var stateOptions: StateOptions
        @Argument(help: "Token id (the 16 hex digits after mtk_).") var tokenID: String
        @Flag(help: "Print the result as JSON.") var json = false

        func run() async throws {
            let id = tokenID.hasPrefix("mtk_") ? String(tokenID.dropFirst(4).prefix(16)) : tokenID
            let authority = try await stateOptions.openAuthority()
            do {
                try await failing { try await TokenService(store: authority.store).revoke(id: id, actor: cliActor) }
                try await authority.close()
                if json { try printJSON(["id": id, "status": "revoked"]) } else { print("Revoked token \(id)") }
            } catch {
                try? await authority.close()
                throw error
            }
        }
    }
}

struct TokenView: Encodable {
    var id: String
    var token: String?
    var scopes: [String]
    var profile: String
    var max_validity: String
    var expires_at: Date
    var uses: Int64
    var used: Int64
    var owner: String?
    var revoked_at: Date?
    /// The key types the token allows; absent: any.
    var key_types: [String]?

    init(_ r: TokenRecord, token: String?) {
        key_types = r.keyTypes
        id = r.id
        self.token = token
        scopes = r.scopes
        profile = r.profile
        max_validity = ValidityDuration(seconds: r.maxValiditySeconds).description
        expires_at = r.expiresAt
        uses = r.usesAllowed
        used = r.usesConsumed
        owner = r.owner
        revoked_at = r.revokedAt
    }
}

extension ServeCommand {
    /// What `mutual doctor files` would find in the CA's own certificates (expired, not valid yet by this clock,
    /// expiring within 30 days), said at start-up with its code: every certificate issued under them depends on them.
    static func warnAboutCA(_ state: StateDirectory, logger: Logger) async {
        guard let intermediate = try? readCertificates(state.intermediateCertificatePath, what: "intermediate"),
              let root = try? readCertificates(state.rootCertificatePath, what: "root")
        else { return }
        var checks = FileChecks(presented: intermediate + root)
        checks.certPath = "issuing CA \(state.intermediateCertificatePath)"
        checks.roots = root
        checks.expiringWithin = 30 * 86_400
        for finding in await checks.run(now: .now).findings where finding.severity != .info {
            logger.warning("\(finding.subject): \(finding.message)", metadata: ["code": "\(finding.code)", "fix": "\(finding.fix ?? "-")", "at": "start-up"])
        }
    }
}
