import ArgumentParser
import Foundation
import MutualDoctor
import Logging
import ServiceLifecycle
import MutualAgent
import MutualPKI
import MutualProxy

struct ProxyCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "proxy",
        abstract: "Run the mTLS proxy: inbound gateway/sidecar (http or tcp) or outbound sidecar (--outbound).",
        discussion: """
            Inbound: verifies client chains against --client-ca (clientAuth EKU, max depth, revocation), applies the
            allow list (default deny), forwards the verified identity (x-forwarded-client-cert, Client-Cert). Outbound:
            plaintext in, mTLS out with --cert/--key, verifying the upstream against --server-ca and --expect.
            Certificates, keys, bundles, CRL files and --config reload on change and on SIGHUP. SIGTERM drains.
            Everything here can be written in a YAML file: see docs/proxy.md.
            """
    )

    @Option(help: "YAML configuration (several listeners, routes, revocation, admin). Other flags then may not be given.")
    var config: String?

    @Flag(help: "Outbound mode: a plaintext listener carried over mTLS to --upstream.")
    var outbound = false

    @Option(help: "Address to listen on, HOST:PORT (port 0 picks a free port).")
    var listen: String?

    @Option(help: "Where to forward: http://HOST:PORT (http mode), HOST:PORT (tcp mode), https://HOST:PORT or HOST:PORT (outbound).")
    var upstream: String?

    @Option(help: "http (default inbound) or tcp (default outbound): outbound http pools keep-alive mTLS connections.")
    var mode: String?

    @Option(help: "Certificate chain file (leaf first) the proxy presents.")
    var cert: String?

    @Option(help: "Private key file (unencrypted PEM) for --cert.")
    var key: String?

    @Option(help: "Inbound: CA bundle client certificates must chain to.")
    var clientCA: String?

    @Option(help: "Inbound: require (default) or optional client certificates (optional: routes answer 401 unless open).")
    var clientCertificate: String?

    @Option(name: .customLong("allow"), help: "Inbound: allowed principal (repeatable): spiffe://… (exact or /*), uri:…, dns:…, cn:…, ou:….")
    var allow: [String] = []

    @Option(name: .customLong("open"), help: "Inbound http: a path prefix anyone may call without a certificate, e.g. /healthz (repeatable).")
    var openPaths: [String] = []

    @Option(help: "Inbound: largest number of intermediates below a client-CA root (default 3).")
    var maxDepth: Int?

    @Flag(help: "Inbound tcp: send a PROXY protocol v2 header with the verified client certificate upstream.")
    var proxyProtocol = false

    @Option(help: "Outbound: CA bundle the upstream's certificate must chain to.")
    var serverCA: String?

    @Option(help: "Outbound: identity the upstream must present (repeatable): spiffe://… or dns:NAME.")
    var expect: [String] = []

    @Option(help: "CRL file or URL (repeatable); refreshed on change or every --crl-refresh seconds.")
    var crl: [String] = []

    @Option(help: "Seconds between CRL URL refreshes.")
    var crlRefresh: Double?

    @Option(help: "Authority URL (https://…): CRL from /crls.pem when --crl is not given, and live revocation events.")
    var authority: String?

    @Option(help: "Root certificate that signs the authority's TLS certificate.")
    var authorityCA: String?

    @Option(help: "When a CRL is past nextUpdate and cannot be refreshed: deny (default) or allow.")
    var onStale: String?

    @Option(help: "Admin listener for /metrics and /healthz, HOST:PORT.")
    var adminListen: String?

    @Option(help: "Access log: stdout (default), off, or a file path (JSON lines).")
    var accessLog: String?

    @Option(help: "Event-loop threads (default: one per CPU core).")
    var threads: Int?

    @Option(help: "Inbound: seconds for a TLS handshake, verification included (default 10).")
    var handshakeTimeout: Double?

    @Option(help: "Inbound http: seconds from the first byte of an HTTP/1.1 request head to its end (default 10).")
    var requestHeadTimeout: Double?

    @Option(help: "Inbound http: seconds a connection may wait with no request in flight (default 60).")
    var idleTimeout: Double?

    @Option(help: "Inbound: open connections per listener (default 10000); at the limit pre-handshake sockets are displaced.")
    var maxConnections: Int?

    @Option(help: "Inbound http: header fields per request; more get 431 (default 100).")
    var maxHeaderCount: Int?

    @Option(help: "Inbound http: bytes of header names and values per request; more get 431 (default 32768).")
    var maxHeaderBytes: Int?

    @Option(name: .customLong("strip-header"), help: "Inbound http: client header to remove before forwarding (repeatable; NAME or PREFIX*); replaces the default list. The proxy's own headers are always removed.")
    var stripHeaders: [String] = []

    @Option(help: "Inbound http: every request also needs an access token for this audience, bound to the client's certificate (RFC 8705); keys from --authority (docs/oauth.md).")
    var tokenAudience: String?

    @Option(name: .customLong("token-scope"), help: "Inbound http: a scope the access token must carry (repeatable; needs --token-audience).")
    var tokenScopes: [String] = []

    @Option(help: "Log level: trace|debug|info|notice|warning|error|critical.")
    var logLevel: String = "info"

    func configurationFromFlags() throws -> ProxyConfiguration {
        func require(_ value: String?, _ flag: String) throws -> String {
            guard let value else { throw CommandFailure("missing \(flag) (or use --config FILE)", exitCode: 2) }
            return value
        }
        var configuration = ProxyConfiguration()
        let listen = try require(listen, "--listen")
        let upstream = try require(upstream, "--upstream")
        if outbound {
            if tokenAudience != nil || !tokenScopes.isEmpty {
                throw CommandFailure("--token-audience is for inbound http listeners, not --outbound", exitCode: 2)
            }
            var outboundMode: ProxyConfiguration.Mode?
            if let mode {
                guard let parsed = ProxyConfiguration.Mode(rawValue: mode) else {
                    throw CommandFailure("invalid --mode '\(mode)': expected http or tcp", exitCode: 2)
                }
                outboundMode = parsed
            }
            configuration.outbound = [.init(
                name: "outbound", listen: listen, upstream: upstream, cert: try require(cert, "--cert"), key: try require(key, "--key"),
                serverCA: try require(serverCA, "--server-ca"), expect: expect, mode: outboundMode
            )]
        } else {
            guard let parsedMode = ProxyConfiguration.Mode(rawValue: mode ?? "http") else {
                throw CommandFailure("invalid --mode '\(mode ?? "")': expected http or tcp", exitCode: 2)
            }
            // Open paths are only reachable without a certificate when the handshake does not demand one.
            var certMode: ProxyConfiguration.ClientCertificateMode? = openPaths.isEmpty ? nil : .optional
            if let clientCertificate {
                guard let parsed = ProxyConfiguration.ClientCertificateMode(rawValue: clientCertificate) else {
                    throw CommandFailure("invalid --client-certificate '\(clientCertificate)': expected require or optional", exitCode: 2)
                }
                certMode = parsed
            }
            let routes = openPaths.isEmpty ? nil : openPaths.map { ProxyConfiguration.Route(path: $0, open: true) }
            var listener = ProxyConfiguration.Listener(
                name: "inbound", listen: listen, mode: parsedMode, upstream: upstream, cert: try require(cert, "--cert"),
                key: try require(key, "--key"), clientCA: try require(clientCA, "--client-ca"), clientCertificate: certMode,
                maxDepth: maxDepth, allow: allow.isEmpty ? nil : allow, routes: routes, proxyProtocol: proxyProtocol ? true : nil
            )
            listener.handshakeTimeout = handshakeTimeout
            listener.requestHeadTimeout = requestHeadTimeout
            listener.idleTimeout = idleTimeout
            listener.maxConnections = maxConnections
            listener.maxHeaderCount = maxHeaderCount
            listener.maxHeaderBytes = maxHeaderBytes
            listener.stripHeaders = stripHeaders.isEmpty ? nil : stripHeaders
            if let tokenAudience {
                guard authority != nil else {
                    throw CommandFailure("--token-audience needs --authority (and --authority-ca): the authority whose keys sign the tokens", exitCode: 2)
                }
                listener.token = .init(audience: tokenAudience, scopes: tokenScopes.isEmpty ? nil : tokenScopes)
            } else if !tokenScopes.isEmpty {
                throw CommandFailure("--token-scope needs --token-audience", exitCode: 2)
            }
            configuration.listeners = [listener]
        }
        if !crl.isEmpty || authority != nil {
            var stale: ProxyConfiguration.StalePolicy?
            if let onStale {
                guard let parsed = ProxyConfiguration.StalePolicy(rawValue: onStale) else {
                    throw CommandFailure("invalid --on-stale '\(onStale)': expected deny or allow", exitCode: 2)
                }
                stale = parsed
            }
            configuration.revocation = .init(crl: crl.isEmpty ? nil : crl, refresh: crlRefresh, authority: authority, authorityCA: authorityCA, onStale: stale)
        }
        configuration.adminListen = adminListen
        configuration.accessLog = accessLog
        configuration.threads = threads
        return configuration
    }

    func run() async throws {
        // Before any listener computes its default max-connections from the descriptor limit.
        ProxyLimits.raiseDescriptorLimit()
        let configuration: ProxyConfiguration
        if let config {
            let flagsGiven = listen != nil || upstream != nil || cert != nil || key != nil || clientCA != nil || !allow.isEmpty || outbound
                || handshakeTimeout != nil || requestHeadTimeout != nil || idleTimeout != nil || maxConnections != nil
                || maxHeaderCount != nil || maxHeaderBytes != nil || !stripHeaders.isEmpty || tokenAudience != nil || !tokenScopes.isEmpty
            if flagsGiven {
                throw CommandFailure("--config cannot be combined with listener flags; put them in \(config)", exitCode: 2)
            }
            configuration = try inputFailure { try ProxyConfiguration.load(path: config) }
        } else {
            configuration = try inputFailure {
                let flags = try configurationFromFlags()
                try flags.validate()
                return flags
            }
        }
        var logger = Logger(label: "mutual.proxy")
        logger.logLevel = Logger.Level(rawValue: logLevel) ?? .info
        // Sidecar: enroll (or pick up the delivered files) before the listeners load them.
        var agentConfiguration: Agent.Configuration?
        if let identity = configuration.identity, let dir = configuration.identityDirectory {
            let built = try inputFailure {
                try Agent.Configuration(
                    authority: identity.authority, rootFingerprint: identity.rootFingerprint, token: identity.token,
                    identity: identity.identity, dnsNames: identity.dns ?? [], outDir: dir,
                    schedule: RenewalSchedule(fraction: identity.renewAt ?? 2.0 / 3.0),
                    validity: try identity.validity.map { try ValidityDuration(parsing: $0) }
                )
            }
            agentConfiguration = built
            let bootstrap = Agent(configuration: built, logger: Logger(label: "mutual.proxy.identity"))
            while true {
                switch await bootstrap.step() {
                case .enrolled, .renewed, .notDue: break
                case .stopped(let reason): throw CommandFailure("identity: \(reason)")
                case .failed(let reason, let retryAt):
                    logger.warning("identity not ready; retrying", metadata: ["error": "\(reason)"])
                    try await Task.sleep(for: .seconds(max(0.5, retryAt.timeIntervalSinceNow)))
                    continue
                }
                break
            }
        }
        let server: ProxyServer
        do {
            server = try ProxyServer(
                configuration: configuration, configurationPath: config.map { URL(fileURLWithPath: $0).path }, logger: logger,
                onReloaded: { [logger] configuration in await Self.warnAboutConfiguration(configuration, logger: logger, when: "reload") },
                onStarted: { [logger] server in
                    for (name, address) in server.boundAddresses.sorted(by: { $0.key < $1.key }) {
                        FileHandle.standardError.write(Data("mutual proxy: \(name) listening on \(address.display)\n".utf8))
                    }
                    await Self.warnAboutConfiguration(configuration, logger: logger, when: "start-up")
                }
            )
        } catch {
            throw CommandFailure("\(error)", exitCode: 2)
        }
        // One service group: the proxy, and the sidecar's own identity when it has one. SIGTERM and SIGINT drain
        // (the identity stops first, then the listeners); SIGHUP reloads (the proxy traps it while it runs).
        var services: [ServiceGroupConfiguration.ServiceConfiguration] = [.init(service: server)]
        if let agentConfiguration {
            // Renewals reload the listeners at once (not at the next file check): new handshakes get the new
            // certificate, established connections keep theirs.
            let agent = Agent(configuration: agentConfiguration, logger: Logger(label: "mutual.proxy.identity"), onDelivered: {
                await server.reload(force: false)
            })
            services.append(.init(service: IdentityRenewal(agent: agent, logger: logger), successTerminationBehavior: .ignore, failureTerminationBehavior: .ignore))
        }
        let group = ServiceGroup(configuration: .init(services: services, gracefulShutdownSignals: [.sigterm, .sigint], logger: logger))
        do {
            try await group.run()
        } catch {
            // Files, CRLs and addresses the operator gave that cannot be used are input errors (2).
            throw CommandFailure("\(error)", exitCode: error is ProxyError ? 2 : 1)
        }
    }

    /// The sidecar's identity as a service: the agent renews until the group shuts down; if renewal stops for good,
    /// that is logged and the proxy keeps serving its current certificate.
    struct IdentityRenewal: Service {
        let agent: Agent
        let logger: Logger

        func run() async throws {
            do {
                try await cancelWhenGracefulShutdown { try await agent.run() }
            } catch is CancellationError {
                return
            } catch {
                logger.error("identity renewal stopped: \(error)", metadata: ["code": "\((error as? AgentError)?.kind.rawValue ?? "error")"])
            }
        }
    }

    /// What `mutual doctor proxy` would find in this configuration, logged as warnings with their codes: said at
    /// start-up and after every reload, not discovered by a client.
    static func warnAboutConfiguration(_ configuration: ProxyConfiguration, logger: Logger, when: String) async {
        for finding in await DoctorCommand.Proxy.findings(for: configuration) where finding.severity != .info {
            logger.warning("\(finding.subject): \(finding.message)", metadata: ["code": "\(finding.code)", "fix": "\(finding.fix ?? "-")", "at": "\(when)"])
        }
    }
}
