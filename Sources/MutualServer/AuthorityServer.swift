import Foundation
import Hummingbird
import HummingbirdTLS
import Logging
import MutualAuthority
import MutualPKI
import NIOCore
import NIOSSL
import Prometheus
import ServiceLifecycle

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
    public func run(onListening: @escaping @Sendable (Int) async -> Void = { _ in }) async throws {
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
        let credentials = try await ServerCredentials(
            authority: authority, dnsNames: dns, ipAddresses: ips, lifetime: configuration.serverCertificateLifetime
        )
        let router = Router(context: APIContext.self)
        router.add(middleware: ProblemMiddleware())
        AuthorityRoutes(authority: authority, metrics: ServerMetrics(registry: registry), renewExpiredGrace: configuration.renewExpiredGrace)
            .register(on: router)
        let timeout = TimeAmount.nanoseconds(Int64(configuration.idleTimeout.components.seconds) * 1_000_000_000)
        let app = Application(
            router: router,
            server: try .tls(.http1(configuration: .init(idleTimeout: timeout)), tlsConfiguration: try credentials.tlsConfiguration()),
            configuration: .init(address: .hostname(configuration.host, port: configuration.port), serverName: nil),
            onServerRunning: { channel in
                let port = channel.localAddress?.port ?? 0
                await onListening(port)
            },
            logger: logger
        )
        let group = ServiceGroup(
            configuration: .init(
                services: [.init(service: app), .init(service: ServerCertificateRenewal(credentials: credentials, logger: logger))],
                gracefulShutdownSignals: [.sigterm, .sigint],
                logger: logger
            )
        )
        try await group.run()
    }
}
