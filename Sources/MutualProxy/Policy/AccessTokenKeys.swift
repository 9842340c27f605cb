import AsyncHTTPClient
import Foundation
import Logging
import MutualPKI
import NIOCore
import NIOSSL
import Synchronization

/// The authorization server's issuer and signing keys, as the proxy checks access tokens against them: read from the
/// authority's RFC 8414 metadata and its JWKS, refreshed every `refresh` seconds, and at once (at most once a
/// second) when a token names a key the proxy does not know yet — so a rotated key is picked up without a refusal.
///
/// Until the first successful fetch there are no keys, and token routes refuse (fail closed, `token_unknown_key`).
public final class AccessTokenKeys: Sendable {
    public struct Keys: Sendable {
        public var issuer: String?
        public var keys: [String: JSONWebKey]
    }

    /// Fetches a URL's body (HTTPS with the authority's root in production; in memory in tests).
    public typealias Fetch = @Sendable (String) async throws -> Data

    let authority: String
    let refreshInterval: Double
    public let leeway: Double
    let fetch: Fetch
    let logger: Logger
    let http: HTTPClient?
    private let current = Mutex(Keys(issuer: nil, keys: [:]))
    /// Tokens whose signature verified, shared by every connection and HTTP/2 stream (a client that opens many
    /// connections, or sends each request on its own stream, pays for its token's signature once). Bounded: emptied
    /// when full. Only the signature is remembered; every other check runs on every request.
    private let verified = Mutex<[String: TokenGate.Verified]>([:])
    static let verifiedCapacity = 4096

    func verifiedToken(_ token: Substring) -> TokenGate.Verified? {
        verified.withLock { $0[String(token)] }
    }

    func remember(_ token: TokenGate.Verified) {
        verified.withLock { cache in
            if cache.count >= Self.verifiedCapacity { cache.removeAll(keepingCapacity: true) }
            cache[token.token] = token
        }
    }
    /// Monotonic seconds, for the unknown-kid rate limit (injected in tests).
    let uptime: @Sendable () -> Double
    private struct Refresh {
        var lastAttempt: Double?
        var inFlight: Task<Bool, Never>?
    }
    private let refresh = Mutex(Refresh())

    public init(
        authority: String, refreshInterval: Double = 60, leeway: Double = 30, logger: Logger,
        uptime: @escaping @Sendable () -> Double = AccessTokenKeys.monotonicSeconds, fetch: @escaping Fetch
    ) {
        self.uptime = uptime
        self.authority = authority.hasSuffix("/") ? String(authority.dropLast()) : authority
        self.refreshInterval = refreshInterval
        self.leeway = leeway
        self.fetch = fetch
        self.logger = logger
        self.http = nil
    }

    /// From `tokens:` (after defaults): HTTPS to the authority, verified with `authority-ca`.
    init(source: ProxyConfiguration.Tokens, logger: Logger) throws {
        guard let authority = source.authority, let caPath = source.authorityCA else {
            throw ProxyError("tokens need an authority URL and authority-ca")
        }
        var tls = TLSConfiguration.makeClientConfiguration()
        tls.minimumTLSVersion = .tlsv12
        let roots = try LoadedCredentials.readCertificates(caPath, what: "authority-ca")
        tls.trustRoots = .certificates(try roots.map { try NIOSSLCertificate(bytes: try $0.derBytes, format: .der) })
        var configuration = HTTPClient.Configuration(tlsConfiguration: tls)
        configuration.timeout = .init(connect: .seconds(5), read: .seconds(10))
        let http = HTTPClient(eventLoopGroupProvider: .singleton, configuration: configuration)
        self.http = http
        self.uptime = Self.monotonicSeconds
        self.authority = authority.hasSuffix("/") ? String(authority.dropLast()) : authority
        self.refreshInterval = source.refresh ?? 60
        self.leeway = source.leeway ?? 30
        self.logger = logger
        self.fetch = { url in
            var request = HTTPClientRequest(url: url)
            request.method = .GET
            let response = try await http.execute(request, timeout: .seconds(10))
            guard response.status == .ok else { throw ProxyError("GET \(url): HTTP \(response.status.code)") }
            return Data(try await response.body.collect(upTo: 256 * 1024).readableBytesView)
        }
    }

    public static let monotonicSeconds: @Sendable () -> Double = {
        let elapsed = ContinuousClock.now - start
        return Double(elapsed.components.seconds) + Double(elapsed.components.attoseconds) / 1e18
    }
    private static let start = ContinuousClock.now

    public func shutdown() async {
        refresh.withLock { $0.inFlight?.cancel() }
        try? await http?.shutdown()
    }

    /// What tokens are checked against now.
    public var keys: Keys { current.withLock { $0 } }

    /// Fetches the metadata (for the issuer and the JWKS URL) and the key set; keeps the last good set on failure.
    @discardableResult
    public func load() async -> Bool {
        do {
            let metadataURL = authority + "/.well-known/oauth-authorization-server"
            let metadata = try JSONSerialization.jsonObject(with: try await fetch(metadataURL)) as? [String: Any]
            guard let issuer = metadata?["issuer"] as? String, let jwksURI = metadata?["jwks_uri"] as? String,
                  jwksURI.hasPrefix("https://") else {
                throw ProxyError("\(metadataURL) has no issuer or https jwks_uri")
            }
            let keys = try JSONWebKey.keySet(json: try await fetch(jwksURI))
            let previous = current.withLock { state in
                defer { state = Keys(issuer: issuer, keys: keys) }
                return state
            }
            if Set(previous.keys.keys) != Set(keys.keys) {
                logger.info("access-token keys loaded", metadata: ["issuer": "\(issuer)", "kids": "\(keys.keys.sorted().joined(separator: ","))"])
            }
            return true
        } catch {
            logger.error("access-token keys could not be fetched; keeping the last good set", metadata: ["authority": "\(authority)", "error": "\(error)"])
            return false
        }
    }

    /// A token named a key not in the set: refresh now unless one ran within the last second; `completion` runs
    /// when the set is as fresh as it will get (joining a refresh already under way).
    public func refreshForUnknownKey(completion: @escaping @Sendable () -> Void) {
        let task: Task<Bool, Never>? = refresh.withLock { state in
            if let inFlight = state.inFlight { return inFlight }
            let now = uptime()
            if let last = state.lastAttempt, now - last < 1 { return nil }
            state.lastAttempt = now
            let task = Task { [self] in
                let loaded = await self.load()
                self.refresh.withLock { $0.inFlight = nil }
                return loaded
            }
            state.inFlight = task
            return task
        }
        guard let task else {
            completion()
            return
        }
        Task {
            _ = await task.value
            completion()
        }
    }

    /// Keeps the set fresh until cancelled: every `refresh` seconds, every 5 seconds while it cannot be fetched.
    func run() async {
        var loaded = await load()
        while !Task.isCancelled {
            try? await Task.sleep(for: .seconds(loaded ? refreshInterval : min(5, refreshInterval)))
            if Task.isCancelled { return }
            loaded = await load()
        }
    }
}
