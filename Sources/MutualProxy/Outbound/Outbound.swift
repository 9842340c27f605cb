import Foundation
import MutualPKI
import NIOCore
import NIOPosix
import NIOSSL
import Synchronization
import X509

/// One outbound listener's state: our client credentials, the server-CA bundle, the identities the upstream may
/// present, and the TLS client context. Rebuilt on reload like ``InboundState``.
public final class OutboundState: Sendable {
    public let name: String
    public let configuration: ProxyConfiguration.Outbound
    public let credentials: LoadedCredentials
    /// The server-CA bundle, classical and ML-DSA roots alike.
    public let serverRoots: [AnyCertificate]
    let classicalServerRoots: [Certificate]
    let genericServerRoots: [MLDSACertificate]
    public let expected: [ExpectedIdentity]
    public let upstream: UpstreamAddress
    public let sslContext: NIOSSLContext
    public let serverName: String?
    let stamps: [String: FileStamp?]
    /// Outbound http: the local application is trusted; every request goes upstream.
    let policy = RoutePolicy(routes: [.init(pathPrefix: "/", allow: [], allowWithoutCertificate: true)])

    public init(name: String, configuration: ProxyConfiguration.Outbound) throws {
        self.name = name
        self.configuration = configuration
        self.upstream = try UpstreamAddress(parsing: configuration.upstream, what: "\(name).upstream")
        self.credentials = try LoadedCredentials.load(cert: configuration.cert, key: configuration.key)
        self.serverRoots = try LoadedCredentials.readAnyCertificates(configuration.serverCA, what: "server-CA bundle")
        self.classicalServerRoots = serverRoots.compactMap(\.classical)
        self.genericServerRoots = try serverRoots.map { try $0.generic }
        self.expected = try configuration.expect.map(ExpectedIdentity.init(parsing:))
        self.stamps = FileStamp.stamps([configuration.cert, configuration.key, configuration.serverCA])
        if let name = configuration.serverName {
            self.serverName = name
        } else {
            self.serverName = (try? Names.ipAddressBytes(upstream.host)) == nil ? upstream.host : nil
        }
        var tls = TLSConfiguration.makeClientConfiguration()
        tls.certificateChain = credentials.nioChain.map { .certificate($0) }
        tls.privateKey = .privateKey(credentials.nioKey)
        tls.minimumTLSVersion = .tlsv12
        tls.curves = InboundState.groups
        tls.verifySignatureAlgorithms = InboundState.signatureAlgorithms
        tls.signingSignatureAlgorithms = InboundState.signatureAlgorithms
        tls.certificateVerification = .noHostnameVerification  // replaced by our callback (chain + expected identity)
        tls.trustRoots = .certificates(try serverRoots.map { try NIOSSLCertificate(bytes: try $0.der, format: .der) })
        do {
            self.sslContext = try NIOSSLContext(configuration: tls)
        } catch {
            throw ProxyError("\(name): cannot build the TLS client context: \(error)")
        }
    }

    /// A TLS client handler presenting our certificate and verifying the upstream; a refusal's reason lands in
    /// `failure`.
    func clientHandler(failure: FailureBox) throws -> NIOSSLClientHandler {
        try NIOSSLClientHandler(context: sslContext, serverHostname: serverName, customVerificationCallbackWithMetadata: { presented, promise in
            let certificates: [AnyCertificate]
            do {
                certificates = try presented.map { try AnyCertificate(derEncoded: try $0.toDERBytes()) }
            } catch {
                failure.withLock { $0 = VerificationFailure(.malformed, "upstream certificate unreadable: \(error)") }
                promise.succeed(.failed)
                return
            }
            Task {
                switch await self.verifyUpstream(presented: certificates) {
                case .success: promise.succeed(.certificateVerified(VerificationMetadata(nil)))
                case .failure(let reason):
                    failure.withLock { $0 = reason }
                    promise.succeed(.failed)
                }
            }
        })
    }

    func reloaded(configuration: ProxyConfiguration.Outbound? = nil, force: Bool) throws -> OutboundState? {
        let config = configuration ?? self.configuration
        let changed = FileStamp.stamps([config.cert, config.key, config.serverCA]) != stamps
        guard force || changed || config != self.configuration else { return nil }
        return try OutboundState(name: name, configuration: config)
    }

    /// Verifies the upstream's chain (serverAuth, a path to the server-CA bundle) and that it is one we expect.
    func verifyUpstream(presented: [Certificate], now: Date = Date()) async -> Result<VerifiedPeer, VerificationFailure> {
        await verifyUpstream(presented: presented.map { AnyCertificate.classical($0) }, now: now)
    }

    /// Either family: classical chains through swift-certificates' verifier, chains with ML-DSA through Mutual's.
    func verifyUpstream(presented: [AnyCertificate], now: Date = Date()) async -> Result<VerifiedPeer, VerificationFailure> {
        guard let leaf = presented.first else { return .failure(.init(.noCertificate, "the upstream presented no certificate")) }
        if now > leaf.notValidAfter {
            return .failure(.init(.expired, "upstream certificate expired \(leaf.notValidAfter.relativeDescription(from: now)) (notAfter \(leaf.notValidAfter))"))
        }
        let outcome: Result<[AnyCertificate], VerificationFailure>
        if case .classical(let classicalLeaf) = leaf, let intermediates = InboundState.allClassical(presented.dropFirst()) {
            let verifier = ChainVerifier(options: .init(
                roots: classicalServerRoots, intermediates: intermediates, validationTime: now, requiredEKU: .serverAuth, maxDepth: 3
            ))
            switch await verifier.verify(classicalLeaf) {
            case .rejected(let reason, let code):
                outcome = .failure(.init(HandshakeFailure(code), "upstream certificate rejected: \(reason)"))
            case .accepted(let chain): outcome = .success(chain.map { .classical($0) })
            }
        } else {
            outcome = InboundState.verifyMLDSA(presented, roots: genericServerRoots, now: now, eku: .serverAuth, maxDepth: 3, who: "upstream")
        }
        switch outcome {
        case .failure(let failure):
            return .failure(failure)
        case .success(let chain):
            guard let identity = try? VerifiedPeer(validatedChain: chain) else {
                return .failure(.init(.malformed, "upstream certificate unreadable"))
            }
            for expectation in expected {
                switch expectation {
                case .spiffe(let principal) where principal.matches(identity): return .success(identity)
                case .dns(let name) where identity.dnsNames.contains(name): return .success(identity)
                default: continue
                }
            }
            return .failure(.init(.upstreamIdentity, "upstream presented \(identity.displayName), expected \(expected.map(\.description).joined(separator: " or "))"))
        }
    }
}

extension OutboundState: HTTPFront {
    var forwardXFCC: Bool { false }
    var forwardIdentity: Bool { false }
    var forwardRFC9440: Bool { false }
    var proxyIdentity: String? { credentials.identity }
    var addsForwardingHeaders: Bool { false }
    var upstreamTLS: OutboundState? { self }
    func identityHeaders(for peer: VerifiedPeer) -> Result<[(String, String)], ForwardedIdentity.Unrepresentable> { .success([]) }
    var limits: ProxyLimits { ProxyLimits() }
    /// The local application is trusted: only the owned headers are removed.
    var stripMatcher: HeaderNames.Matcher { HeaderNames.Matcher(patterns: []) }
}

public final class OutboundSlot: Sendable {
    private let state: Mutex<OutboundState>
    public init(_ state: OutboundState) { self.state = Mutex(state) }
    public var current: OutboundState { state.withLock { $0 } }
    func replace(_ new: OutboundState) { state.withLock { $0 = new } }
}

/// A plaintext client connection of an outbound listener: carried over a new mTLS connection to the upstream.
final class OutboundHandler: ChannelInboundHandler {
    typealias InboundIn = ByteBuffer

    let state: OutboundState
    let runtime: ProxyRuntime
    private var buffered: [ByteBuffer] = []
    private let started = ContinuousClock.now

    init(state: OutboundState, runtime: ProxyRuntime) {
        self.state = state
        self.runtime = runtime
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) { buffered.append(unwrapInboundIn(data)) }

    func channelActive(context: ChannelHandlerContext) {
        context.fireChannelActive()
        let state = self.state
        let runtime = self.runtime
        let failure = FailureBox()
        let bootstrap = ClientBootstrap(group: context.eventLoop)
            .channelOption(.socketOption(.tcp_nodelay), value: 1)
            .connectTimeout(.seconds(5))
            .channelInitializer { channel in
                channel.eventLoop.makeCompletedFuture {
                    let ssl = try state.clientHandler(failure: failure)
                    try channel.pipeline.syncOperations.addHandler(ssl)
                }
            }
        let loopBound = NIOLoopBound((self, context), eventLoop: context.eventLoop)
        bootstrap.connect(host: state.upstream.host, port: state.upstream.port).assumeIsolated().whenComplete { result in
            let (handler, context) = loopBound.value
            switch result {
            case .failure(let error):
                let reason = "upstream \(state.upstream.host):\(state.upstream.port) unreachable: \(HTTPProxyHandler.describe(error))"
                runtime.logger.warning("outbound upstream unreachable", metadata: ["listener": "\(state.name)", "error": "\(reason)"])
                handler.record(decision: "error", reason: reason, status: 502, bytesIn: 0, bytesOut: 0, context: context)
                context.close(promise: nil)
            case .success(let upstream):
                handler.glue(context: context, upstream: upstream, failure: failure)
            }
        }
    }

    private func glue(context: ChannelHandlerContext, upstream: any Channel, failure: FailureBox) {
        guard context.channel.isActive else {
            upstream.close(promise: nil)
            return
        }
        let name = state.name
        let runtime = self.runtime
        let started = self.started
        let remote = context.channel.remoteAddress?.display
        let target = "\(state.upstream.host):\(state.upstream.port)"
        let first = buffered
        buffered = []
        GlueHandler.join(context, replacing: self, upstream: upstream, first: first) { bytesIn, bytesOut in
            let refused = failure.withLock { $0 }
            if let refused {
                runtime.metrics.handshake(listener: name, failure: refused.kind)
                runtime.logger.notice("outbound upstream refused", metadata: ["listener": "\(name)", "reason": "\(refused.kind.rawValue)", "detail": "\(refused.reason)"])
            }
            runtime.accessLog.record(.init(
                listener: name, client: nil, serial: nil, method: nil, path: nil, route: target,
                decision: refused == nil ? "allow" : "refused", reason: refused?.reason ?? "connection closed",
                status: refused == nil ? 200 : 502, bytesIn: bytesIn, bytesOut: bytesOut, latency: ContinuousClock.now - started, peer: remote
            ))
        }
    }

    func record(decision: String, reason: String, status: Int, bytesIn: Int, bytesOut: Int, context: ChannelHandlerContext) {
        runtime.accessLog.record(.init(
            listener: state.name, client: nil, serial: nil, method: nil, path: nil, route: "\(state.upstream.host):\(state.upstream.port)",
            decision: decision, reason: reason, status: status, bytesIn: bytesIn, bytesOut: bytesOut,
            latency: ContinuousClock.now - started, peer: context.channel.remoteAddress?.display
        ))
    }
}

extension OutboundHandler: RemovableChannelHandler {}

/// The reason an upstream handshake was refused, set by the verification task and read when the connection ends.
final class FailureBox: Sendable {
    private let value = Mutex<VerificationFailure?>(nil)
    func withLock<T>(_ body: (inout VerificationFailure?) -> T) -> T { value.withLock { body(&$0) } }
}
