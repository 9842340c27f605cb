import Foundation
import Hummingbird
import HummingbirdTLS
import Logging
import MutualAuthority
import MutualPKI
import NIOCore
import NIOPosix
import NIOSSL
import Prometheus
import ServiceLifecycle
import Synchronization

/// Lets an embedding program (tests, the quickstart) stop a running server gracefully, as SIGTERM would.
public final class ShutdownHandle: Sendable {
    private let group = Mutex<ServiceGroup?>(nil)
    private let requested = Mutex(false)

    public init() {}

    func attach(_ serviceGroup: ServiceGroup) async {
        let stopNow: Bool = group.withLock {
            $0 = serviceGroup
            return requested.withLock { $0 }
        }
        if stopNow { await serviceGroup.triggerGracefulShutdown() }
    }

    /// Starts a graceful shutdown: open event streams end, in-flight requests finish, listeners close.
    public func shutdown() async {
        requested.withLock { $0 = true }
        if let serviceGroup = group.withLock({ $0 }) { await serviceGroup.triggerGracefulShutdown() }
    }
}

/// `mutual serve`: the authority over HTTPS.
public struct AuthorityServer: Sendable {
    public struct Configuration: Sendable {
        public var host: String
        public var port: Int
        /// The URL clients use (its host goes into the server certificate).
        public var publicURL: URL?
        /// Lifetime of the authority's own TLS certificate (renewed at two thirds).
        public var serverCertificateLifetime: ValidityDuration
        /// Grace window after expiry during which `/v1/renew-expired` is allowed; nil: disabled.
        public var renewExpiredGrace: ValidityDuration?
        /// Idle connections (including slow clients that stop sending) are closed after this long.
        public var idleTimeout: Duration
        /// The plain-HTTP listener for CRL, OCSP and roots (`--http-listen`); nil: off.
        public var httpListen: (host: String, port: Int)?
        /// The base URL placed in certificates for CRL and OCSP; default `http://<http listen address>`.
        public var httpPublicURL: String?
        /// Lifetime of published CRLs (a new one is made at half of it, and after every revocation).
        public var crlValidity: ValidityDuration = .hours(24)
        /// ACME provisioners served at `/acme/<name>/directory`.
        public var acmeProvisioners: [ACMEProvisioner] = []
        /// The dashboard at `/dashboard/` (on by default; it shows nothing without a login or the admin certificate).
        public var dashboard = true
        /// The OAuth 2.0 token endpoint for certificate-bound access tokens (off while it has no rules).
        public var oauth = OAuthSettings()

        public init(
            host: String = "127.0.0.1", port: Int = 9443, publicURL: URL? = nil,
            serverCertificateLifetime: ValidityDuration = .hours(24), renewExpiredGrace: ValidityDuration? = nil,
            idleTimeout: Duration = .seconds(30)
        ) {
            self.host = host
            self.port = port
            self.publicURL = publicURL
            self.serverCertificateLifetime = serverCertificateLifetime
            self.renewExpiredGrace = renewExpiredGrace
            self.idleTimeout = idleTimeout
        }

        /// Parses `HOST:PORT` (`127.0.0.1:9443`, `[::1]:9443`).
        public static func parseListen(_ text: String) throws -> (host: String, port: Int) {
            var host = text
            var portText = ""
            if text.hasPrefix("["), let close = text.firstIndex(of: "]") {
                host = String(text[text.index(after: text.startIndex)..<close])
                portText = String(text[text.index(after: close)...].dropFirst())
            } else if let colon = text.lastIndex(of: ":") {
                host = String(text[..<colon])
                portText = String(text[text.index(after: colon)...])
            }
            guard !host.isEmpty, let port = Int(portText), (0...65535).contains(port) else {
                throw PKIError(.malformedInput, "invalid listen address '\(text)': expected HOST:PORT, e.g. 127.0.0.1:9443")
            }
            return (host, port)
        }
    }

    public let authority: Authority
    public let configuration: Configuration
    public let registry: PrometheusCollectorRegistry
    public let logger: Logger

    public init(authority: Authority, configuration: Configuration, registry: PrometheusCollectorRegistry = .init(), logger: Logger) {
        self.authority = authority
        self.configuration = configuration
        self.registry = registry
        self.logger = logger
    }

    /// Runs until SIGTERM/SIGINT (graceful: in-flight requests finish) or until the task is cancelled.
    /// `onListening` receives the bound port (useful with port 0).
    public func run(
        shutdown: ShutdownHandle? = nil,
        onListening: @escaping @Sendable (Int) async -> Void = { _ in },
        onHTTPListening: @escaping @Sendable (Int) async -> Void = { _ in }
    ) async throws {
        // Every address is bound once before anything starts or is announced: a busy port is an input error that names
        // its flag, not a half-started server that says "listening" and then hangs.
        try await Self.checkAvailable(host: configuration.host, port: configuration.port, flag: "--listen")
        if let http = configuration.httpListen {
            try await Self.checkAvailable(host: http.host, port: http.port, flag: "--http-listen")
        }
        let revocationURL = try await planRevocationURL()
        var plainPort: Task<Int, Never>?
        var plainPorts: AsyncStream<Int>.Continuation?
        var dns: [String] = []
        var ips: [String] = []
        for host in [configuration.host, configuration.publicURL?.host].compactMap({ $0 }) {
            if (try? Names.ipAddressBytes(host)) != nil {
                if !ips.contains(host) { ips.append(host) }
            } else if host != "0.0.0.0" && host != "::" {
                if !dns.contains(host) { dns.append(host) }
            }
        }
        if dns.isEmpty && ips.isEmpty { dns = ["localhost"] }
        let credentials: ServerCredentials
        do {
            credentials = try await ServerCredentials(
                authority: authority, dnsNames: dns, ipAddresses: ips, lifetime: configuration.serverCertificateLifetime
            )
        } catch let error as PKIError where error.code == .nameNotPermitted {
            // A name-constrained CA may not certify the listen address (an IP, say). Keep the DNS names it allows; if
            // none is left, say how to give the server a name inside the constraints.
            guard !dns.isEmpty, !ips.isEmpty, let fallback = try? await ServerCredentials(
                authority: authority, dnsNames: dns, ipAddresses: [], lifetime: configuration.serverCertificateLifetime
            ) else {
                throw PKIError(.nameNotPermitted, "the CA's name constraints do not allow the server's own names (\((dns + ips).joined(separator: ", "))): \(error.reason); give --public-url https://NAME:PORT with a name the CA may certify")
            }
            logger.notice("server certificate without IP SANs: the CA's name constraints exclude them", metadata: ["names": "\(dns)"])
            credentials = fallback
        }
        let metrics = ServerMetrics(registry: registry)
        let publisher = RevocationPublisher(authority: authority, validity: configuration.crlValidity)
        let ocsp = OCSPResponder(authority: authority)
        let feed = RevocationFeed()
        let revocation = RevocationRoutes(authority: authority, publisher: publisher, ocsp: ocsp, feed: feed, metrics: metrics)
        _ = try await publisher.current()
        _ = try await ocsp.currentSigner()

        // The plain-HTTP listener is bound first so that its real port (with port 0) can go into certificates.
        var services: [ServiceGroupConfiguration.ServiceConfiguration] = []
        if let http = configuration.httpListen {
            let plainRouter = Router()
            plainRouter.add(middleware: ProblemMiddleware())
            revocation.registerSignedObjects(on: plainRouter)
            let (httpPorts, httpContinuation) = AsyncStream<Int>.makeStream()
            plainPorts = httpContinuation
            let plain = Application(
                router: plainRouter,
                server: .http1(configuration: .init(additionalChannelHandlers: [ParseErrorProblemResponder()], idleTimeout: .seconds(30))),
                configuration: .init(address: .hostname(http.host, port: http.port), serverName: nil),
                onServerRunning: { channel in httpContinuation.yield(channel.localAddress?.port ?? 0) },
                logger: logger
            )
            services.append(.init(service: plain))
            let bound = Task { () -> Int in
                for await port in httpPorts { return port }
                return 0
            }
            plainPort = bound
        }

        let router = Router(context: APIContext.self)
        router.add(middleware: ProblemMiddleware())
        AuthorityRoutes(authority: authority, metrics: metrics, renewExpiredGrace: configuration.renewExpiredGrace, publisher: publisher, feed: feed)
            .register(on: router)
        revocation.registerSignedObjects(on: router)
        revocation.registerEvents(on: router)
        revocation.registerChainCRLs(on: router)
        if configuration.dashboard {
            let dashboard = DashboardService(
                authority: authority, publisher: publisher, metrics: metrics, logger: logger,
                afterRevocation: { [authority, feed] in await Self.pushRecentRevocations(authority: authority, feed: feed) }
            )
            DashboardRoutes(service: dashboard).register(on: router)
        }
        var oauth: OAuthRoutes?
        if configuration.oauth.enabled {
            let routes = OAuthRoutes(authority: authority, settings: configuration.oauth, metrics: metrics, logger: logger)
            // The first signing key is made here, before anyone can ask for a token.
            let keys = OAuthService(authority: authority, settings: configuration.oauth, issuer: "").keys
            if try keys.entries().isEmpty {
                let first = try keys.ensureKey()
                logger.notice("made the first access-token signing key; replicas need a copy of this directory", metadata: ["kid": "\(first.kid)", "directory": "\(keys.directory)"])
            }
            routes.register(on: router)
            oauth = routes
        }
        var acme: ACMEService?
        if !configuration.acmeProvisioners.isEmpty {
            let service = try await ACMEService.make(
                authority: authority, provisioners: configuration.acmeProvisioners, validator: ACMENetworkValidator(), logger: logger
            )
            let host = configuration.publicURL?.host ?? configuration.host
            ACMERoutes(service: service, metrics: metrics, fallbackAuthority: host.contains(":") ? "[\(host)]:\(configuration.port)" : "\(host):\(configuration.port)")
                .register(on: router)
            acme = service
        }
        let timeout = TimeAmount.nanoseconds(Int64(configuration.idleTimeout.components.seconds) * 1_000_000_000)
        let app = Application(
            router: router,
            server: .loggedTLS(
                http1: .init(additionalChannelHandlers: [ParseErrorProblemResponder()], idleTimeout: timeout),
                tls: .init(
                    tlsConfiguration: try credentials.tlsConfiguration(),
                    customAsyncVerificationCallback: { [credentials] certificates in await credentials.verifyClient(certificates) }
                ),
                metrics: metrics
            ),
            configuration: .init(address: .hostname(configuration.host, port: configuration.port), serverName: nil),
            onServerRunning: { [configuration, authority, oauth] channel in
                let port = channel.localAddress?.port ?? 0
                let listenerURL = "https://\(configuration.host.contains(":") ? "[\(configuration.host)]" : configuration.host):\(port)"
                oauth?.start(base: configuration.publicURL.map { $0.absoluteString.hasSuffix("/") ? String($0.absoluteString.dropLast()) : $0.absoluteString } ?? listenerURL)
                if configuration.dashboard {
                    // `mutual dashboard login` prints links to this address.
                    let base = configuration.publicURL.map { $0.absoluteString.hasSuffix("/") ? String($0.absoluteString.dropLast()) : $0.absoluteString }
                        ?? "https://\(configuration.host.contains(":") ? "[\(configuration.host)]" : configuration.host):\(port)"
                    try? await authority.store.setMetadata([Authority.dashboardURLKey: base + "/dashboard/"], audit: nil)
                }
                await onListening(port)
            },
            logger: logger
        )
        services.append(.init(service: app))
        services.append(.init(service: ServerCertificateRenewal(credentials: credentials, logger: logger)))
        // Last in the list, so it is the first to stop on graceful shutdown: it ends open event streams, which lets
        // the HTTP server drain.
        services.append(.init(service: RevocationWatcher(authority: authority, feed: feed, ocsp: ocsp, publisher: publisher, logger: logger)))
        var groupConfiguration = ServiceGroupConfiguration(services: services, gracefulShutdownSignals: [.sigterm, .sigint], logger: logger)
        // In-flight requests get 30 s to finish; a request stuck on an unresponsive database must not keep the process
        // alive for ever, so after that the services are cancelled.
        groupConfiguration.maximumGracefulShutdownDuration = .seconds(30)
        groupConfiguration.maximumCancellationDuration = .seconds(5)
        let group = ServiceGroup(configuration: groupConfiguration)
        await shutdown?.attach(group)
        try await withThrowingTaskGroup(of: Void.self) { [plainPorts] tasks in
            tasks.addTask {
                // Whatever ends the group (a listener that failed to start included) also ends the wait for the
                // plain listener's port below.
                defer { plainPorts?.finish() }
                try await group.run()
            }
            if let bound = plainPort, let http = configuration.httpListen, case let port = await bound.value, port > 0 {
                if case .deriveFromListener = revocationURL {
                    let url = "http://\(http.host.contains(":") ? "[\(http.host)]" : http.host):\(port)"
                    try await authority.setHTTPPublicURL(url, explicit: false, actor: "mutual-serve")
                    warnIfLocalOnly(url)
                }
                await onHTTPListening(port)
            }
            try await tasks.next()
            tasks.cancelAll()
        }
        await acme?.waitForValidations()
    }

    /// Tells event-stream subscribers of the latest revocations now rather than at the watcher's next poll
    /// (subscribers drop duplicates by sequence).
    static func pushRecentRevocations(authority: Authority, feed: RevocationFeed) async {
        if let latest = try? await authority.store.lastRevocationSequence(),
           let recent = try? await authority.store.revocations(after: max(0, latest - 16)) {
            await feed.publish(recent.map { .event($0) })
        }
    }

    enum RevocationURLPlan {
        case recorded
        case deriveFromListener
    }

    /// Decides the CRL/OCSP base URL placed in certificates before anything listens: `--http-public-url` when given
    /// (recorded), else the one a person recorded (`init`/`config`), else the plain listener's address — unless that
    /// is the unspecified address, which no client can reach: refused, naming the flag that fixes it.
    func planRevocationURL() async throws -> RevocationURLPlan {
        if let explicit = configuration.httpPublicURL {
            try await authority.setHTTPPublicURL(explicit, explicit: true, actor: "mutual-serve")
            warnIfLocalOnly(explicit)
            return .recorded
        }
        if let recorded = try await authority.httpPublicURL(), recorded.explicit {
            warnIfLocalOnly(recorded.url)
            return .recorded
        }
        guard let http = configuration.httpListen else {
            logger.warning("certificates will carry no CRL or OCSP URL: --http-listen is off and no --http-public-url is recorded", metadata: ["code": "revocation-url-missing"])
            return .recorded
        }
        if Authority.isUnspecifiedHost(http.host) {
            throw ServeRefusal(
                code: "revocation-url-unreachable",
                message: "--http-listen \(http.host.contains(":") ? "[\(http.host)]" : http.host):\(http.port) listens on every address, so certificates cannot point at it: give --http-public-url http://NAME:\(http.port == 0 ? "PORT" : String(http.port)) with the name other hosts use (or record it once with `mutual config --http-public-url`)"
            )
        }
        return .deriveFromListener
    }

    /// Says loudly when certificates would point at a loopback URL while this authority serves other hosts.
    func warnIfLocalOnly(_ url: String) {
        guard let host = URL(string: url)?.host, Authority.isLoopbackHost(host) else { return }
        let listeners = [configuration.host] + (configuration.httpListen.map { [$0.host] } ?? [])
        guard listeners.contains(where: { !Authority.isLoopbackHost($0) }) || configuration.publicURL.map({ !Authority.isLoopbackHost($0.host ?? "") }) == true else { return }
        logger.warning(
            "certificates will carry CRL and OCSP URLs at \(url), which only this host can reach, while the authority listens for other hosts: set --http-public-url http://NAME:PORT",
            metadata: ["code": "revocation-url-loopback", "url": "\(url)"]
        )
    }

    /// Binds `host:port` once and releases it; throws ``ListenError`` naming `flag` when it cannot be bound (busy, not
    /// an address of this host, no permission). Port 0 always succeeds.
    static func checkAvailable(host: String, port: Int, flag: String) async throws {
        guard port != 0 else { return }
        do {
            let channel = try await ServerBootstrap(group: MultiThreadedEventLoopGroup.singleton)
                .serverChannelOption(.socketOption(.so_reuseaddr), value: 1)
                .bind(host: host, port: port).get()
            try await channel.close()
        } catch {
            throw ListenError(flag: flag, address: "\(host.contains(":") ? "[\(host)]" : host):\(port)", reason: ListenError.describe(error))
        }
    }
}

/// A configuration `serve` refuses before starting: a stable code and words for people.
public struct ServeRefusal: Error, CustomStringConvertible, Sendable {
    public var code: String
    public var message: String
    public var description: String { message }
}

/// A listener that cannot be bound: the flag, the address and why. The server has not started anything.
public struct ListenError: Error, CustomStringConvertible, Sendable {
    public var flag: String
    public var address: String
    public var reason: String

    public var description: String { "\(flag) \(address): cannot listen: \(reason)" }

    static func describe(_ error: any Error) -> String {
        if let io = error as? IOError { return String(cString: strerror(io.errnoCode)).lowercased() }
        return "\(error)"
    }
}
