import Foundation
import MutualPKI
import Yams

/// Everything `mutual proxy` runs: inbound listeners (HTTP or TCP, each with its TLS credentials, client-CA bundle
/// and route policy), outbound listeners (plaintext in, mTLS out), revocation sources and the admin listener.
/// The YAML file and the command-line flags both produce one of these; keys are the flag names (`client-ca`, …).
public struct ProxyConfiguration: Sendable, Codable, Equatable {
    public var listeners: [Listener]
    public var outbound: [Outbound]
    public var revocation: Revocation?
    /// Sidecar: the proxy's own identity, managed in-process.
    public var identity: Identity?
    /// `host:port` of the admin listener (`/metrics`, `/healthz`); nil: none.
    public var adminListen: String?
    /// `stdout` (default), `off`, or a file path to append JSON lines to.
    public var accessLog: String?
    /// How often watched files (cert, key, bundles, CRL files, this config) are checked for changes; SIGHUP reloads at once.
    public var watchInterval: Double?
    /// How long a graceful shutdown waits for open requests and connections before closing them.
    public var drainTimeout: Double?
    /// Event-loop threads (default: one per CPU core). Each connection lives on one thread, with its upstream.
    public var threads: Int?
    /// Where routes that require access tokens get the issuer's keys (default: the revocation authority).
    public var tokens: Tokens?

    public struct Listener: Sendable, Codable, Equatable {
        public var name: String?
        public var listen: String
        /// `http` (default) or `tcp`.
        public var mode: Mode?
        /// `http://host:port` for http mode; `host:port` (or `tcp://host:port`) for tcp mode.
        public var upstream: String
        public var cert: String
        public var key: String
        public var clientCA: String
        /// `require` (default): the handshake fails without a valid client certificate. `optional`: the handshake
        /// succeeds without one and routes answer 401 unless they are open.
        public var clientCertificate: ClientCertificateMode?
        /// Largest number of intermediates between the client's leaf and a root in the bundle (default 3).
        public var maxDepth: Int?
        /// Shortcut for one route `/` with this allow list.
        public var allow: [String]?
        public var routes: [Route]?
        /// tcp mode: send a PROXY protocol v2 header with the verified client certificate to the upstream.
        public var proxyProtocol: Bool?
        /// Identity headers for the upstream: any of `xfcc`, `rfc9440` (default both), `identity` (`x-client-identity`,
        /// the verified principal); `[]` forwards none.
        public var forward: [String]?
        /// http mode: offer HTTP/2 to clients through ALPN (default true); upstream stays HTTP/1.1.
        public var http2: Bool?
        /// Limits and timeouts (``ProxyLimits`` has the defaults); nil keeps the default.
        public var handshakeTimeout: Double?
        public var requestHeadTimeout: Double?
        public var idleTimeout: Double?
        public var maxConnections: Int?
        public var maxHeaderCount: Int?
        public var maxHeaderBytes: Int?
        /// Client headers removed before forwarding, besides the ones the proxy owns (always removed): names, or
        /// prefixes ending in `*`, compared after lower-casing and `_` → `-`. nil: ``ForwardedIdentity/defaultStrippedHeaders``.
        public var stripHeaders: [String]?
        /// Every route of this listener that needs a certificate also needs a bound access token for this audience
        /// (a route's own `token:` wins).
        public var token: TokenRequirement?

        public init(
            name: String? = nil, listen: String, mode: Mode? = nil, upstream: String, cert: String, key: String,
            clientCA: String, clientCertificate: ClientCertificateMode? = nil, maxDepth: Int? = nil,
            allow: [String]? = nil, routes: [Route]? = nil, proxyProtocol: Bool? = nil, forward: [String]? = nil
        ) {
            self.name = name
            self.listen = listen
            self.mode = mode
            self.upstream = upstream
            self.cert = cert
            self.key = key
            self.clientCA = clientCA
            self.clientCertificate = clientCertificate
            self.maxDepth = maxDepth
            self.allow = allow
            self.routes = routes
            self.proxyProtocol = proxyProtocol
            self.forward = forward
        }

        enum CodingKeys: String, CodingKey {
            case name, listen, mode, upstream, cert, key, allow, routes, forward, http2
            case clientCA = "client-ca", clientCertificate = "client-certificate", maxDepth = "max-depth"
            case proxyProtocol = "proxy-protocol"
            case handshakeTimeout = "handshake-timeout", requestHeadTimeout = "request-head-timeout"
            case idleTimeout = "idle-timeout", maxConnections = "max-connections", maxHeaderCount = "max-header-count"
            case maxHeaderBytes = "max-header-bytes", stripHeaders = "strip-headers", token
        }

        public init(from decoder: Decoder) throws {
            let c = try decoder.container(keyedBy: CodingKeys.self)
            name = try c.decodeIfPresent(String.self, forKey: .name)
            listen = try c.decode(String.self, forKey: .listen)
            mode = try c.decodeIfPresent(Mode.self, forKey: .mode)
            upstream = try c.decode(String.self, forKey: .upstream)
            // Empty when an identity: block provides them (checked in validate()).
            cert = try c.decodeIfPresent(String.self, forKey: .cert) ?? ""
            key = try c.decodeIfPresent(String.self, forKey: .key) ?? ""
            clientCA = try c.decodeIfPresent(String.self, forKey: .clientCA) ?? ""
            clientCertificate = try c.decodeIfPresent(ClientCertificateMode.self, forKey: .clientCertificate)
            maxDepth = try c.decodeIfPresent(Int.self, forKey: .maxDepth)
            allow = try c.decodeIfPresent([String].self, forKey: .allow)
            routes = try c.decodeIfPresent([Route].self, forKey: .routes)
            proxyProtocol = try c.decodeIfPresent(Bool.self, forKey: .proxyProtocol)
            forward = try c.decodeIfPresent([String].self, forKey: .forward)
            http2 = try c.decodeIfPresent(Bool.self, forKey: .http2)
            handshakeTimeout = try c.decodeIfPresent(Double.self, forKey: .handshakeTimeout)
            requestHeadTimeout = try c.decodeIfPresent(Double.self, forKey: .requestHeadTimeout)
            idleTimeout = try c.decodeIfPresent(Double.self, forKey: .idleTimeout)
            maxConnections = try c.decodeIfPresent(Int.self, forKey: .maxConnections)
            maxHeaderCount = try c.decodeIfPresent(Int.self, forKey: .maxHeaderCount)
            maxHeaderBytes = try c.decodeIfPresent(Int.self, forKey: .maxHeaderBytes)
            stripHeaders = try c.decodeIfPresent([String].self, forKey: .stripHeaders)
            token = try c.decodeIfPresent(TokenRequirement.self, forKey: .token)
        }
    }

    /// Sidecar mode: instead of cert/key files, the proxy enrolls and renews its own certificate in-process (the
    /// agent's loop) and reloads it with no dropped connections. Listeners without cert/key/client-ca use the
    /// delivered `chain.pem`, `key.pem` and `bundle.pem`.
    public struct Identity: Sendable, Codable, Equatable {
        public var authority: String
        public var rootFingerprint: String
        public var token: String?
        public var identity: String
        public var dns: [String]?
        /// Where the delivered files live (default: `./mutual-identity` next to the configuration file).
        public var outDir: String?
        public var validity: String?
        public var renewAt: Double?

        enum CodingKeys: String, CodingKey {
            case authority, token, identity, dns, validity
            case rootFingerprint = "root-fingerprint", outDir = "out-dir", renewAt = "renew-at"
        }

        public init(authority: String, rootFingerprint: String, token: String?, identity: String, dns: [String]? = nil, outDir: String? = nil, validity: String? = nil, renewAt: Double? = nil) {
            self.authority = authority
            self.rootFingerprint = rootFingerprint
            self.token = token
            self.identity = identity
            self.dns = dns
            self.outDir = outDir
            self.validity = validity
            self.renewAt = renewAt
        }
    }

    public enum Mode: String, Sendable, Codable, Equatable { case http, tcp }
    public enum ClientCertificateMode: String, Sendable, Codable, Equatable { case require, optional }

    public struct Route: Sendable, Codable, Equatable {
        public var path: String
        public var methods: [String]?
        public var allow: [String]?
        /// Anyone may call this route, with or without a certificate (e.g. `/healthz`).
        public var open: Bool?
        /// Requests also need an access token bound to the connection's certificate (RFC 8705).
        public var token: TokenRequirement?

        public init(path: String, methods: [String]? = nil, allow: [String]? = nil, open: Bool? = nil, token: TokenRequirement? = nil) {
            self.path = path
            self.methods = methods
            self.allow = allow
            self.open = open
            self.token = token
        }
    }

    /// `token:` on a route or listener: a certificate-bound access token for `audience` with every one of `scopes`.
    public struct TokenRequirement: Sendable, Codable, Equatable {
        public var audience: String
        public var scopes: [String]?
        /// Pass the client's `Authorization` header on to the upstream (default false: the proxy removes the token
        /// and forwards the verified claims in `x-token-claims`, `x-token-subject` and `x-token-scope`).
        public var forwardToken: Bool?

        public init(audience: String, scopes: [String]? = nil, forwardToken: Bool? = nil) {
            self.audience = audience
            self.scopes = scopes
            self.forwardToken = forwardToken
        }

        enum CodingKeys: String, CodingKey {
            case audience, scopes
            case forwardToken = "forward-token"
        }
    }

    /// `tokens:`: the authorization server whose access tokens routes accept.
    public struct Tokens: Sendable, Codable, Equatable {
        /// The authority's HTTPS URL: its RFC 8414 metadata gives the issuer and the JWKS (default revocation.authority).
        public var authority: String?
        /// Root certificate(s) to verify the authority's TLS certificate (default revocation.authority-ca).
        public var authorityCA: String?
        /// Seconds between key-set refreshes (default 60); an unknown `kid` refreshes at once.
        public var refresh: Double?
        /// Clock skew allowed on `exp` and `nbf`, seconds (default 30).
        public var leeway: Double?

        public init(authority: String? = nil, authorityCA: String? = nil, refresh: Double? = nil, leeway: Double? = nil) {
            self.authority = authority
            self.authorityCA = authorityCA
            self.refresh = refresh
            self.leeway = leeway
        }

        enum CodingKeys: String, CodingKey {
            case authority, refresh, leeway
            case authorityCA = "authority-ca"
        }
    }

    /// Where token keys come from, after defaults; nil when no route needs tokens.
    public var tokenSource: Tokens? {
        guard listeners.contains(where: { $0.token != nil || ($0.routes ?? []).contains { $0.token != nil } }) else { return nil }
        var source = tokens ?? Tokens()
        source.authority = source.authority ?? revocation?.authority
        source.authorityCA = source.authorityCA ?? revocation?.authorityCA
        return source
    }

    public struct Outbound: Sendable, Codable, Equatable {
        public var name: String?
        public var listen: String
        /// `https://host:port` or `host:port` of the mTLS upstream.
        public var upstream: String
        public var cert: String
        public var key: String
        public var serverCA: String
        /// Identities the upstream must present: SPIFFE IDs (`spiffe://…`, `/*` allowed) or `dns:name`.
        public var expect: [String]
        /// SNI to send; defaults to the upstream host when it is a DNS name.
        public var serverName: String?
        /// `tcp` (default): each local connection is carried over its own mTLS connection. `http`: HTTP/1.1 from the
        /// local app, forwarded over a pool of keep-alive mTLS connections.
        public var mode: Mode?

        public init(name: String? = nil, listen: String, upstream: String, cert: String, key: String, serverCA: String, expect: [String], serverName: String? = nil, mode: Mode? = nil) {
            self.mode = mode
            self.name = name
            self.listen = listen
            self.upstream = upstream
            self.cert = cert
            self.key = key
            self.serverCA = serverCA
            self.expect = expect
            self.serverName = serverName
        }

        enum CodingKeys: String, CodingKey {
            case name, listen, upstream, cert, key, expect, mode
            case serverCA = "server-ca", serverName = "server-name"
        }
    }

    public struct Revocation: Sendable, Codable, Equatable {
        /// CRL files or `http(s)://` URLs (PEM or DER).
        public var crl: [String]?
        /// Seconds between CRL refreshes (default 60; also refreshed at half its validity when sooner).
        public var refresh: Double?
        /// The authority's HTTPS URL: subscribes to `/v1/revocations/events` for revocations within a second.
        public var authority: String?
        /// Root certificate(s) to verify the authority's TLS certificate.
        public var authorityCA: String?
        /// What to do when a CRL is past its nextUpdate and cannot be refreshed: `deny` (default) or `allow`.
        public var onStale: StalePolicy?

        public init(crl: [String]? = nil, refresh: Double? = nil, authority: String? = nil, authorityCA: String? = nil, onStale: StalePolicy? = nil) {
            self.crl = crl
            self.refresh = refresh
            self.authority = authority
            self.authorityCA = authorityCA
            self.onStale = onStale
        }

        enum CodingKeys: String, CodingKey {
            case crl, refresh, authority
            case authorityCA = "authority-ca", onStale = "on-stale"
        }
    }

    public enum StalePolicy: String, Sendable, Codable, Equatable { case deny, allow }

    public init(
        listeners: [Listener] = [], outbound: [Outbound] = [], revocation: Revocation? = nil, adminListen: String? = nil,
        accessLog: String? = nil, watchInterval: Double? = nil, drainTimeout: Double? = nil
    ) {
        self.listeners = listeners
        self.outbound = outbound
        self.revocation = revocation
        self.adminListen = adminListen
        self.accessLog = accessLog
        self.watchInterval = watchInterval
        self.drainTimeout = drainTimeout
    }

    enum CodingKeys: String, CodingKey {
        case listeners, outbound, revocation, identity
        case adminListen = "admin-listen", accessLog = "access-log", watchInterval = "watch-interval"
        case drainTimeout = "drain-timeout", threads, tokens
    }

    public init(from decoder: Decoder) throws {
        let c = try decoder.container(keyedBy: CodingKeys.self)
        listeners = try c.decodeIfPresent([Listener].self, forKey: .listeners) ?? []
        outbound = try c.decodeIfPresent([Outbound].self, forKey: .outbound) ?? []
        revocation = try c.decodeIfPresent(Revocation.self, forKey: .revocation)
        identity = try c.decodeIfPresent(Identity.self, forKey: .identity)
        adminListen = try c.decodeIfPresent(String.self, forKey: .adminListen)
        accessLog = try c.decodeIfPresent(String.self, forKey: .accessLog)
        watchInterval = try c.decodeIfPresent(Double.self, forKey: .watchInterval)
        drainTimeout = try c.decodeIfPresent(Double.self, forKey: .drainTimeout)
        threads = try c.decodeIfPresent(Int.self, forKey: .threads)
        tokens = try c.decodeIfPresent(Tokens.self, forKey: .tokens)
    }

    /// Largest configuration file accepted.
    public static let maximumFileSize = 1 << 20

    /// Parses YAML (JSON is YAML too). Relative file paths are resolved against `baseDirectory`.
    public static func parse(yaml text: String, baseDirectory: URL? = nil) throws -> ProxyConfiguration {
        guard text.utf8.count <= maximumFileSize else {
            throw PKIError(.malformedInput, "proxy configuration is larger than \(maximumFileSize) bytes")
        }
        guard !text.allSatisfy({ $0.isWhitespace }) else {
            throw PKIError(.malformedInput, "proxy configuration is empty: no listeners")
        }
        var configuration: ProxyConfiguration
        do {
            configuration = try YAMLDecoder().decode(ProxyConfiguration.self, from: text)
        } catch let error as DecodingError {
            throw PKIError(.malformedInput, "proxy configuration: \(describe(error))")
        } catch {
            throw PKIError(.malformedInput, "proxy configuration is not valid YAML: \(error)")
        }
        if let base = baseDirectory { configuration.resolvePaths(against: base) }
        if let base = baseDirectory, let dir = configuration.identity?.outDir, !dir.hasPrefix("/") {
            configuration.identity?.outDir = base.appendingPathComponent(dir).standardizedFileURL.path
        }
        configuration.fillFromIdentity(baseDirectory: baseDirectory)
        try configuration.validate()
        return configuration
    }

    public static func load(path: String) throws -> ProxyConfiguration {
        let url = URL(fileURLWithPath: path)
        let attributes = try? FileManager.default.attributesOfItem(atPath: path)
        if let size = attributes?[.size] as? Int, size > maximumFileSize {
            throw PKIError(.malformedInput, "\(path): larger than \(maximumFileSize) bytes")
        }
        guard let data = FileManager.default.contents(atPath: path) else {
            throw PKIError(.malformedInput, "cannot read proxy configuration \(path)")
        }
        guard let text = String(data: data, encoding: .utf8) else {
            throw PKIError(.malformedInput, "proxy configuration \(path) is not UTF-8 text")
        }
        do {
            return try parse(yaml: text, baseDirectory: url.deletingLastPathComponent())
        } catch let error as PKIError {
            throw PKIError(error.code, "\(path): \(error.reason)")
        }
    }

    static func describe(_ error: DecodingError) -> String {
        func path(_ context: DecodingError.Context) -> String {
            let keys = context.codingPath.map { $0.intValue.map { "[\($0)]" } ?? $0.stringValue }
            return keys.isEmpty ? "top level" : keys.joined(separator: ".")
        }
        switch error {
        case .keyNotFound(let key, let context): return "missing '\(key.stringValue)' in \(path(context))"
        case .typeMismatch(_, let context), .valueNotFound(_, let context), .dataCorrupted(let context):
            return "\(path(context)): \(context.debugDescription)"
        @unknown default: return "\(error)"
        }
    }

    /// The directory the sidecar identity is delivered into.
    public var identityDirectory: String? {
        identity.map { $0.outDir ?? FileManager.default.currentDirectoryPath + "/mutual-identity" }
    }

    /// Listeners without their own files use the sidecar identity's delivered files.
    mutating func fillFromIdentity(baseDirectory: URL?) {
        guard var identity else { return }
        if identity.outDir == nil, let base = baseDirectory { identity.outDir = base.appendingPathComponent("mutual-identity").path }
        self.identity = identity
        guard let dir = identityDirectory else { return }
        for index in listeners.indices {
            if listeners[index].cert.isEmpty { listeners[index].cert = dir + "/chain.pem" }
            if listeners[index].key.isEmpty { listeners[index].key = dir + "/key.pem" }
            if listeners[index].clientCA.isEmpty { listeners[index].clientCA = dir + "/bundle.pem" }
        }
    }

    mutating func resolvePaths(against base: URL) {
        func resolve(_ path: String) -> String {
            if path.isEmpty { return path }  // filled from the identity: block later
            if path.hasPrefix("/") || path.hasPrefix("http://") || path.hasPrefix("https://") { return path }
            return base.appendingPathComponent(path).standardizedFileURL.path
        }
        for index in listeners.indices {
            listeners[index].cert = resolve(listeners[index].cert)
            listeners[index].key = resolve(listeners[index].key)
            listeners[index].clientCA = resolve(listeners[index].clientCA)
        }
        for index in outbound.indices {
            outbound[index].cert = resolve(outbound[index].cert)
            outbound[index].key = resolve(outbound[index].key)
            outbound[index].serverCA = resolve(outbound[index].serverCA)
        }
        if var revocation {
            revocation.crl = revocation.crl?.map(resolve)
            revocation.authorityCA = revocation.authorityCA.map(resolve)
            self.revocation = revocation
        }
        if var tokens {
            tokens.authorityCA = tokens.authorityCA.map(resolve)
            self.tokens = tokens
        }
    }

    /// Checks everything that can be checked without touching files: addresses, URLs, principals, routes.
    public func validate() throws {
        guard !listeners.isEmpty || !outbound.isEmpty else {
            throw PKIError(.malformedInput, "no listeners: give --listen/--upstream or a 'listeners:' or 'outbound:' list")
        }
        var addresses = Set<String>()
        func claim(_ address: String, _ what: String) throws {
            let parsed = try SocketAddressSpec(parsing: address, what: what)
            guard parsed.port == 0 || addresses.insert(address).inserted else { throw PKIError(.malformedInput, "\(address) is used by two listeners") }
        }
        for (index, listener) in listeners.enumerated() {
            let label = listener.name ?? "listeners[\(index)]"
            try claim(listener.listen, "\(label).listen")
            for (value, key) in [(listener.cert, "cert"), (listener.key, "key"), (listener.clientCA, "client-ca")] where value.isEmpty {
                throw PKIError(.malformedInput, "\(label): missing '\(key)' (give the file, or an 'identity:' block for a sidecar)")
            }
            let mode = listener.mode ?? .http
            switch mode {
            case .http:
                let upstream = try UpstreamAddress(parsing: listener.upstream, what: "\(label).upstream")
                guard upstream.scheme == "http" else {
                    throw PKIError(.malformedInput, "\(label).upstream: http mode forwards to an http:// upstream, got '\(listener.upstream)'")
                }
                guard listener.proxyProtocol != true else {
                    throw PKIError(.malformedInput, "\(label): proxy-protocol applies to tcp mode only")
                }
            case .tcp:
                let upstream = try UpstreamAddress(parsing: listener.upstream, what: "\(label).upstream")
                guard upstream.scheme == "tcp" else {
                    throw PKIError(.malformedInput, "\(label).upstream: tcp mode forwards to host:port, got '\(listener.upstream)'")
                }
                if let routes = listener.routes, routes.contains(where: { $0.path != "/" || $0.methods != nil }) {
                    throw PKIError(.malformedInput, "\(label): tcp mode has no paths or methods; use 'allow:'")
                }
                if listener.clientCertificate == .optional {
                    throw PKIError(.malformedInput, "\(label): tcp mode requires client certificates (there is no route to answer 401 on)")
                }
            }
            if let depth = listener.maxDepth, !(0...8).contains(depth) {
                throw PKIError(.malformedInput, "\(label).max-depth must be between 0 and 8")
            }
            if let problem = listener.limitProblems(label: label).first { throw PKIError(.malformedInput, problem) }
            for pattern in listener.stripHeaders ?? [] where !HeaderNames.isValidPattern(pattern) {
                throw PKIError(.malformedInput, "\(label).strip-headers: '\(pattern.prefix(80))' is not a header name or a prefix ending in '*'")
            }
            for header in listener.forward ?? [] where !["xfcc", "rfc9440", "identity"].contains(header) {
                throw PKIError(.malformedInput, "\(label).forward: unknown '\(header)' (expected xfcc, rfc9440, identity)")
            }
            if mode == .tcp, listener.token != nil || (listener.routes ?? []).contains(where: { $0.token != nil }) {
                throw PKIError(.malformedInput, "\(label): access tokens are HTTP; tcp mode cannot require them")
            }
            _ = try policy(for: listener, label: label)
        }
        if let source = tokenSource {
            guard let authority = source.authority, let url = URL(string: authority), url.scheme == "https", url.host != nil else {
                throw PKIError(.malformedInput, "routes require access tokens: give tokens.authority (or revocation.authority), the authority's https:// URL, whose keys sign them")
            }
            guard source.authorityCA != nil else {
                throw PKIError(.malformedInput, "tokens need authority-ca (the root that signs the authority's certificate)")
            }
            if let refresh = source.refresh, !(refresh >= 1 && refresh <= 86400) {
                throw PKIError(.malformedInput, "tokens.refresh must be between 1 and 86400 seconds")
            }
            if let leeway = source.leeway, !(leeway >= 0 && leeway <= 600) {
                throw PKIError(.malformedInput, "tokens.leeway must be between 0 and 600 seconds")
            }
        }
        for (index, out) in outbound.enumerated() {
            let label = out.name ?? "outbound[\(index)]"
            try claim(out.listen, "\(label).listen")
            let upstream = try UpstreamAddress(parsing: out.upstream, what: "\(label).upstream")
            guard upstream.scheme == "https" || upstream.scheme == "tcp" else {
                throw PKIError(.malformedInput, "\(label).upstream: expected https://host:port or host:port")
            }
            guard !out.expect.isEmpty else {
                throw PKIError(.malformedInput, "\(label): 'expect' must name the upstream's identity (spiffe://… or dns:…)")
            }
            _ = try out.expect.map(ExpectedIdentity.init(parsing:))
        }
        if let admin = adminListen { try claim(admin, "admin-listen") }
        if let interval = watchInterval, !(interval > 0 && interval <= 3600) {
            throw PKIError(.malformedInput, "watch-interval must be between 0 and 3600 seconds")
        }
        if let threads, !(1...256).contains(threads) {
            throw PKIError(.malformedInput, "threads must be between 1 and 256")
        }
        if let drain = drainTimeout, !(drain >= 0 && drain <= 3600) {
            throw PKIError(.malformedInput, "drain-timeout must be between 0 and 3600 seconds")
        }
        if let revocation {
            if let refresh = revocation.refresh, !(refresh >= 1 && refresh <= 86400) {
                throw PKIError(.malformedInput, "revocation.refresh must be between 1 and 86400 seconds")
            }
            if let authority = revocation.authority {
                guard let url = URL(string: authority), url.scheme == "https", url.host != nil else {
                    throw PKIError(.malformedInput, "revocation.authority must be an https:// URL, got '\(authority)'")
                }
                guard revocation.authorityCA != nil else {
                    throw PKIError(.malformedInput, "revocation.authority needs authority-ca (the root that signs the authority's certificate)")
                }
            }
            for source in revocation.crl ?? [] where source.hasPrefix("http") {
                guard let url = URL(string: source), url.host != nil else {
                    throw PKIError(.malformedInput, "revocation.crl: '\(source)' is not a valid URL")
                }
            }
        }
    }

    /// The route policy of a listener: `routes:` in order, then `allow:` as a catch-all route `/`.
    public func policy(for listener: Listener, label: String? = nil) throws -> RoutePolicy {
        let label = label ?? listener.name ?? listener.listen
        var routes: [RoutePolicy.Route] = []
        for (index, route) in (listener.routes ?? []).enumerated() {
            guard route.path.hasPrefix("/") else {
                throw PKIError(.malformedInput, "\(label).routes[\(index)].path must start with '/'")
            }
            if case .failure(let refusal) = RequestTarget.parse(route.path), route.path != "/" {
                throw PKIError(.malformedInput, "\(label).routes[\(index)].path '\(route.path.prefix(100))' can never match a request: \(refusal.reason)")
            }
            let open = route.open ?? false
            let allow = try (route.allow ?? []).map(Principal.init(parsing:))
            if !open && allow.isEmpty {
                throw PKIError(.malformedInput, "\(label).routes[\(index)] (\(route.path)): give 'allow:' principals or 'open: true'")
            }
            if open && !allow.isEmpty {
                throw PKIError(.malformedInput, "\(label).routes[\(index)] (\(route.path)): an open route takes no 'allow:' list")
            }
            if open, route.token != nil {
                throw PKIError(.malformedInput, "\(label).routes[\(index)] (\(route.path)): an open route cannot require a token (a bound token needs the client's certificate)")
            }
            let token = try (route.token ?? (open ? nil : listener.token)).map { try TokenRule($0, label: "\(label).routes[\(index)].token") }
            routes.append(.init(pathPrefix: route.path, methods: Set(route.methods ?? []), allow: allow, allowWithoutCertificate: open, token: token))
        }
        if let allow = listener.allow {
            guard !allow.isEmpty else { throw PKIError(.malformedInput, "\(label).allow is empty") }
            let token = try listener.token.map { try TokenRule($0, label: "\(label).token") }
            routes.append(.init(pathPrefix: "/", allow: try allow.map(Principal.init(parsing:)), token: token))
        }
        guard !routes.isEmpty else {
            throw PKIError(.malformedInput, "\(label): no 'allow:' list and no 'routes:' — everything would be denied")
        }
        return RoutePolicy(routes: routes)
    }
}

/// `host:port`, with IPv6 in brackets.
public struct SocketAddressSpec: Sendable, Hashable, CustomStringConvertible {
    public var host: String
    public var port: Int

    public init(parsing text: String, what: String) throws {
        func fail() -> PKIError { PKIError(.malformedInput, "\(what): expected host:port, got '\(text.prefix(100))'") }
        guard let colon = text.lastIndex(of: ":") else { throw fail() }
        var host = String(text[..<colon])
        if host.hasPrefix("[") && host.hasSuffix("]") { host = String(host.dropFirst().dropLast()) }
        guard !host.isEmpty, !host.contains(" "), let port = Int(text[text.index(after: colon)...]), (0...65535).contains(port) else {
            throw fail()
        }
        self.host = host
        self.port = port
    }

    public var description: String { host.contains(":") ? "[\(host)]:\(port)" : "\(host):\(port)" }
}

/// An upstream: `http://host:port`, `https://host:port` or `host:port` / `tcp://host:port`.
public struct UpstreamAddress: Sendable, Hashable {
    public var scheme: String
    public var host: String
    public var port: Int

    public init(parsing text: String, what: String) throws {
        if let range = text.range(of: "://") {
            let scheme = text[..<range.lowerBound].lowercased()
            guard ["http", "https", "tcp"].contains(scheme) else {
                throw PKIError(.malformedInput, "\(what): unsupported scheme '\(scheme)' in '\(text.prefix(100))'")
            }
            var rest = String(text[range.upperBound...])
            if rest.hasSuffix("/") { rest.removeLast() }
            guard !rest.contains("/") else {
                throw PKIError(.malformedInput, "\(what): an upstream is scheme://host:port without a path, got '\(text.prefix(100))'")
            }
            if !rest.contains(":") || rest.hasSuffix("]") { rest += scheme == "https" ? ":443" : scheme == "http" ? ":80" : "" }
            let address = try SocketAddressSpec(parsing: rest, what: what)
            self.scheme = scheme
            self.host = address.host
            self.port = address.port
        } else {
            let address = try SocketAddressSpec(parsing: text, what: what)
            self.scheme = "tcp"
            self.host = address.host
            self.port = address.port
        }
    }
}

/// The identity an outbound upstream must present.
public enum ExpectedIdentity: Sendable, Hashable, CustomStringConvertible {
    case spiffe(Principal)
    case dns(String)

    public init(parsing text: String) throws {
        if text.hasPrefix("spiffe://") {
            self = .spiffe(try Principal(parsing: text))
        } else if text.hasPrefix("dns:") {
            self = .dns(try Names.normalizedDNSName(String(text.dropFirst(4)), allowWildcard: false))
        } else {
            throw PKIError(.invalidName, "expected identity '\(text.prefix(80))': use spiffe://… or dns:name")
        }
    }

    public var description: String {
        switch self {
        case .spiffe(let principal): return principal.description
        case .dns(let name): return "dns:" + name
        }
    }
}
