import Foundation
import Logging
import MutualPKI
import NIOCore
import NIOHTTP1
import NIOHTTP2
import NIOSSL
import NIOTLS
import X509

/// Shared by every connection: metrics, the access log, revocation and the open-connection registry.
public final class ProxyRuntime: Sendable {
    public let metrics: ProxyMetrics
    public let accessLog: AccessLog
    public let revocation: RevocationState
    public let registry: ConnectionRegistry
    public let logger: Logger
    /// Wall-clock time for certificate validity decisions; tests inject a fixed or moving clock.
    public let now: @Sendable () -> Date
    /// The issuer's keys, when routes require access tokens.
    public let accessTokens: AccessTokenKeys?

    /// `logger`'s handler is wrapped so that control characters in any message or metadata value (client-supplied
    /// paths, header values inside error descriptions) are escaped and cannot forge log lines.
    public init(
        metrics: ProxyMetrics, accessLog: AccessLog, revocation: RevocationState, registry: ConnectionRegistry = ConnectionRegistry(),
        logger: Logger, now: @escaping @Sendable () -> Date = { Date() }, accessTokens: AccessTokenKeys? = nil
    ) {
        self.accessTokens = accessTokens
        self.metrics = metrics
        self.accessLog = accessLog
        self.revocation = revocation
        self.registry = registry
        var logger = logger
        if !(logger.handler is EscapingLogHandler) { logger.handler = EscapingLogHandler(wrapping: logger.handler) }
        self.logger = logger
        self.now = now
    }
}

enum InboundPipeline {
    /// Puts TLS (with our verification), the handshake observer and the mode's handler on a new inbound channel.
    static func configure(_ channel: any Channel, slot: InboundSlot, runtime: ProxyRuntime, pools: UpstreamPools) throws {
        let state = slot.current
        let connection = ConnectionIdentity()
        let revocation = runtime.revocation
        let verify: NIOSSLCustomVerificationCallbackWithMetadata = { presented, promise in
            let certificates: [AnyCertificate]
            let key: [UInt8]
            do {
                let der = try presented.map { try $0.toDERBytes() }
                key = InboundState.chainKey(der)
                // A chain this context verified before: decided now, on the event loop, without a task.
                if let cached = state.cachedVerification(chainKey: key, revocation: revocation) {
                    connection.set(cached)
                    switch cached {
                    case .success: promise.succeed(.certificateVerified(VerificationMetadata(nil)))
                    case .failure: promise.succeed(.failed)
                    }
                    return
                }
                certificates = try state.parse(presentedDER: der)
            } catch {
                connection.set(.failure(VerificationFailure(.malformed, "client certificate could not be parsed: \(error)")))
                promise.succeed(.failed)
                return
            }
            connection.track(Task {
                let result = await state.verify(presented: certificates, revocation: revocation)
                connection.set(result)
                switch result {
                case .success(let peer):
                    state.rememberVerified(chainKey: key, peer: peer)
                    promise.succeed(.certificateVerified(VerificationMetadata(nil)))
                case .failure: promise.succeed(.failed)
                }
            })
        }
        let sync = channel.pipeline.syncOperations
        // The TLS handler goes in once the ClientHello says which context enforces our group preference.
        let groups = GroupPreferenceHandler(hybridOnly: state.hybridOnlyContext, full: state.sslContext) { sslContext, context in
            connection.hybrid = sslContext === state.hybridOnlyContext
            let ssl = NIOSSLServerHandler(context: sslContext, configuration: .init(), customVerificationCallbackWithMetadata: verify)
            try context.pipeline.syncOperations.addHandler(ssl, position: .after(context.handler))
        }
        try sync.addHandler(groups)
        try sync.addHandler(HandshakeObserver(state: state, connection: connection, runtime: runtime, limiter: slot.limiter))
        switch state.configuration.mode ?? .http {
        case .http:
            guard state.configuration.http2 != false else {
                // Built before the handshake: the verified client arrives as a PeerVerifiedEvent.
                try configureHTTP1(channel.pipeline.syncOperations, state: state, connection: connection, peer: nil, runtime: runtime, pools: pools)
                return
            }
            // ALPN decides after the handshake: h2 gets one proxy handler per stream (each stream is an HTTP/1-style
            // exchange over the same verified identity), http/1.1 (or no ALPN) the HTTP/1.1 pipeline.
            _ = channel.configureHTTP2SecureUpgrade(
                h2ChannelConfigurator: { channel in
                    channel.eventLoop.makeCompletedFuture {
                        let sync = channel.pipeline.syncOperations
                        try sync.addHandler(FlushConsolidator())
                        _ = try sync.configureHTTP2Pipeline(
                            mode: .server, connectionConfiguration: http2Connection, streamConfiguration: .init()
                        ) { stream in
                            stream.eventLoop.makeCompletedFuture {
                                let sync = stream.pipeline.syncOperations
                                try sync.addHandler(HTTP2RequestGuard { code, status in
                                    runtime.metrics.requestRefused(listener: state.name, code: code)
                                    runtime.accessLog.record(.init(
                                        listener: state.name, client: connection.identity?.displayName, serial: connection.identity?.serial,
                                        method: nil, path: nil, route: nil, decision: "bad_request", reason: "refused before forwarding",
                                        status: status, bytesIn: 0, bytesOut: 0, latency: .zero, peer: nil, code: code
                                    ))
                                })
                                try sync.addHandler(EndStreamCoalescer())
                                try sync.addHandler(HTTP2FramePayloadToHTTP1ServerCodec())
                                try sync.addHandler(HTTPProxyHandler(state: state, peer: connection.identity, runtime: runtime, pools: pools, isHTTP2Stream: true))
                            }
                        }
                        try sync.addHandler(HTTP2ConnectionErrorLogger(listener: state.name, logger: runtime.logger))
                        try sync.addHandler(HTTP2IdleGuard(idleTimeout: state.limits.idleTimeout) { _ in
                            runtime.metrics.connectionClosed(listener: state.name, reason: "idle_timeout")
                        })
                    }
                },
                http1ChannelConfigurator: { channel in
                    channel.eventLoop.makeCompletedFuture {
                        // Built after the handshake (ALPN chose http/1.1): the verified client is known already.
                        try configureHTTP1(channel.pipeline.syncOperations, state: state, connection: connection, peer: connection.identity, runtime: runtime, pools: pools)
                    }
                }
            )
        case .tcp:
            try sync.addHandler(TCPInboundHandler(state: state, runtime: runtime))
        }
    }

    /// HTTP/2 connection settings: NIO's defaults, with a header list size well above `max-header-bytes` and enough
    /// CONTINUATION frames to carry it, so that an oversized request reaches the proxy and gets 431 on its stream
    /// instead of a connection error (1 MiB bounds the memory one header block may take). NIOHTTP2 applies the larger
    /// size once the client acknowledges our SETTINGS; a first request sent before that is held to NIOHTTP2's 16 KiB
    /// and a larger block ends the connection with GOAWAY.
    static let http2Connection: NIOHTTP2Handler.ConnectionConfiguration = {
        var configuration = NIOHTTP2Handler.ConnectionConfiguration()
        configuration.initialSettings = [
            HTTP2Setting(parameter: .maxConcurrentStreams, value: 100),
            HTTP2Setting(parameter: .maxHeaderListSize, value: 1 << 20),
        ]
        configuration.maximumSequentialContinuationFrames = 80
        return configuration
    }()

    /// The HTTP/1.1 pipeline: connection timers, NIO's request decoder with the listener's header limits, then the
    /// proxy handler (which writes its responses as bytes and answers parse errors with their code).
    static func configureHTTP1(
        _ sync: ChannelPipeline.SynchronousOperations, state: InboundState, connection: ConnectionIdentity, peer: VerifiedPeer?,
        runtime: ProxyRuntime, pools: UpstreamPools
    ) throws {
        let limits = state.limits
        try sync.addHandler(HTTP1ConnectionGuard(limits: limits) { reason, context in
            runtime.metrics.connectionClosed(listener: state.name, reason: reason)
            runtime.logger.debug("connection closed", metadata: [
                "listener": "\(state.name)", "reason": "\(reason)", "peer": "\(context.channel.remoteAddress?.display ?? "?")",
            ])
        })
        var decoderLimits = NIOHTTPDecoderLimitConfiguration()
        decoderLimits.maxHeaderFieldCount = limits.maxHeaderCount
        decoderLimits.maxHeaderListSize = limits.maxHeaderBytes
        decoderLimits.maxHeaderFieldSize = limits.maxHeaderBytes
        try HTTPProxyHandler.addRequestDecoder(sync, limits: decoderLimits)
        try sync.addHandler(HTTPProxyHandler(state: state, peer: peer, runtime: runtime, pools: pools))
    }
}

/// Puts END_STREAM on a response's last HEADERS or DATA frame instead of sending it in a separate empty DATA frame
/// (what NIO's HTTP/1-to-HTTP/2 codec does for `.end`). Clients such as curl consider a response done once its
/// content-length is in, and reset a stream whose END_STREAM arrives in a later TLS record; enough of those resets
/// trip NIOHTTP2's flood protection (GOAWAY ENHANCE_YOUR_CALM) and fail every stream of the connection. nginx and
/// HAProxy also end a response on its last DATA frame. The frame before the end is held until the next write or
/// flush, so streamed bodies still go out at each flush.
final class EndStreamCoalescer: ChannelOutboundHandler, RemovableChannelHandler {
    typealias OutboundIn = HTTP2Frame.FramePayload
    typealias OutboundOut = HTTP2Frame.FramePayload

    private var held: (HTTP2Frame.FramePayload, EventLoopPromise<Void>?)?

    func write(context: ChannelHandlerContext, data: NIOAny, promise: EventLoopPromise<Void>?) {
        let payload = unwrapOutboundIn(data)
        if case .data(let end) = payload, end.endStream, case .byteBuffer(let bytes) = end.data, bytes.readableBytes == 0,
           let (previous, previousPromise) = held {
            held = nil
            var merged = previous
            switch merged {
            case .headers(var headers):
                headers.endStream = true
                merged = .headers(headers)
            case .data(var body):
                body.endStream = true
                merged = .data(body)
            default:
                break
            }
            var combined: EventLoopPromise<Void>?
            if previousPromise != nil || promise != nil {
                let both = context.eventLoop.makePromise(of: Void.self)
                both.futureResult.cascade(to: previousPromise)
                both.futureResult.cascade(to: promise)
                combined = both
            }
            context.write(wrapOutboundOut(merged), promise: combined)
            return
        }
        releaseHeld(context: context)
        switch payload {
        case .headers(let headers) where !headers.endStream:
            held = (payload, promise)
        case .data(let body) where !body.endStream:
            held = (payload, promise)
        default:
            context.write(data, promise: promise)
        }
    }

    func flush(context: ChannelHandlerContext) {
        releaseHeld(context: context)
        context.flush()
    }

    func close(context: ChannelHandlerContext, mode: CloseMode, promise: EventLoopPromise<Void>?) {
        releaseHeld(context: context)
        context.close(mode: mode, promise: promise)
    }

    private func releaseHeld(context: ChannelHandlerContext) {
        guard let (payload, promise) = held else { return }
        held = nil
        context.write(wrapOutboundOut(payload), promise: promise)
    }
}

/// Logs why an HTTP/2 connection was torn down (protocol errors, NIOHTTP2's flood protections) with the peer address,
/// so a client seeing GOAWAY has a matching line on the proxy's side.
final class HTTP2ConnectionErrorLogger: ChannelInboundHandler {
    typealias InboundIn = NIOAny
    let listener: String
    let logger: Logger

    init(listener: String, logger: Logger) {
        self.listener = listener
        self.logger = logger
    }

    func errorCaught(context: ChannelHandlerContext, error: any Error) {
        // A client closing TCP without close_notify is how most clients end; not worth a line.
        if let ssl = error as? NIOSSLError, case .uncleanShutdown = ssl {
            context.fireErrorCaught(error)
            return
        }
        logger.notice("HTTP/2 connection error", metadata: [
            "listener": "\(listener)", "peer": "\(context.channel.remoteAddress?.display ?? "?")", "error": "\(error)",
        ])
        context.fireErrorCaught(error)
        // NIOHTTP2 has sent GOAWAY for a connection error (a bad preface, a flood): the connection is over, so it is
        // closed here rather than left open for the client to end.
        context.close(promise: nil)
    }
}

/// Counts and logs handshake outcomes with their reason, accepts resumed sessions only with a known identity, and
/// registers verified connections so revocation can close them.
final class HandshakeObserver: ChannelInboundHandler, RemovableChannelHandler {
    typealias InboundIn = NIOAny

    let state: InboundState
    let connection: ConnectionIdentity
    let runtime: ProxyRuntime
    let limiter: ConnectionLimiter?
    private var completed = false
    private var counted = false
    private var timeout: Scheduled<Void>?

    init(state: InboundState, connection: ConnectionIdentity, runtime: ProxyRuntime, limiter: ConnectionLimiter? = nil) {
        self.state = state
        self.connection = connection
        self.runtime = runtime
        self.limiter = limiter
    }

    func channelActive(context: ChannelHandlerContext) {
        let gauge = runtime.metrics.openConnections(listener: state.name)
        gauge.increment()
        let id = ObjectIdentifier(context.channel)
        let limiter = self.limiter
        context.channel.closeFuture.whenComplete { _ in
            gauge.decrement()
            limiter?.closed(id)
        }
        if let limiter {
            let (admission, displaced) = limiter.admit(id, channel: context.channel, limit: state.limits.maxConnections)
            switch admission {
            case .admitted:
                break
            case .admittedDisplacing:
                runtime.metrics.connectionClosed(listener: state.name, reason: "displaced")
                if limiter.shouldWarn(now: Date()) {
                    runtime.logger.warning("connection limit reached; closing the oldest connection still in its handshake", metadata: [
                        "listener": "\(state.name)", "reason": "max_connections", "max_connections": "\(state.limits.maxConnections)",
                    ])
                }
                displaced?.close(promise: nil)
            case .refused:
                runtime.metrics.connectionClosed(listener: state.name, reason: "max_connections")
                if limiter.shouldWarn(now: Date()) {
                    runtime.logger.warning("connection limit reached; refusing new connections", metadata: [
                        "listener": "\(state.name)", "reason": "max_connections", "max_connections": "\(state.limits.maxConnections)",
                    ])
                }
                counted = true
                context.close(promise: nil)
                return
            }
        }
        // The handshake (with our verification) must finish in time; a silent socket is closed.
        let loopBound = NIOLoopBound((self, context), eventLoop: context.eventLoop)
        let seconds = state.limits.handshakeTimeout
        timeout = context.eventLoop.scheduleTask(in: HTTP1TimerState.amount(seconds)) {
            let (handler, context) = loopBound.value
            guard !handler.completed else { return }
            handler.connection.cancelVerification()
            handler.fail(context: context, VerificationFailure(.handshakeTimeout, "no completed TLS handshake within \(seconds) s"), close: true)
        }
        context.fireChannelActive()
    }

    func channelInactive(context: ChannelHandlerContext) {
        timeout?.cancel()
        connection.cancelVerification()
        if !completed && !counted {
            // The peer went away mid-handshake; count it once with what we know.
            if let failure = connection.failure { fail(context: context, failure, close: false) }
        }
        context.fireChannelInactive()
    }

    func userInboundEventTriggered(context: ChannelHandlerContext, event: Any) {
        if case TLSUserEvent.handshakeCompleted = event {
            completed = true
            if !connection.verified, let handler = try? context.pipeline.syncOperations.handler(type: NIOSSLServerHandler.self),
               let peer = handler.peerCertificate {
                // A resumed session: BoringSSL skipped verification, so the identity must come from our own record.
                switch (try? peer.toDERBytes()).map({ state.resumedIdentity(leafDER: $0, revocation: runtime.revocation) }) {
                case .success(let identity)?:
                    connection.setResumed(identity)
                case .failure(let failure)?:
                    fail(context: context, failure, close: true)
                    return
                case nil:
                    fail(context: context, VerificationFailure(.malformed, "resumed session certificate unreadable"), close: true)
                    return
                }
            }
            counted = true
            timeout?.cancel()
            limiter?.established(ObjectIdentifier(context.channel))
            runtime.metrics.handshake(listener: state.name, failure: nil)
            runtime.metrics.tlsAlgorithms(
                listener: state.name, group: connection.hybrid ? "X25519MLKEM768" : "classical",
                serverKey: state.credentials.leaf.keyAlgorithm, clientKey: connection.identity?.keyAlgorithm ?? "none"
            )
            if let identity = connection.identity {
                let (runtime, name) = (runtime, state.name)
                runtime.registry.register(context.channel, identity: identity, now: runtime.now()) {
                    runtime.metrics.connectionClosed(listener: name, reason: "certificate_expired")
                    runtime.logger.notice("connection closed: client certificate expired", metadata: [
                        "listener": "\(name)", "reason": "certificate_expired", "serial": "\(identity.serial)",
                    ])
                }
            }
            // The verified client goes down the pipeline as a value only the verifier creates; then the TLS event.
            context.fireUserInboundEventTriggered(PeerVerifiedEvent(peer: connection.identity, resumed: !connection.verified))
            // Done: later reads no longer pass through this handler.
            context.fireUserInboundEventTriggered(event)
            context.pipeline.syncOperations.removeHandler(context: context, promise: nil)
            return
        }
        context.fireUserInboundEventTriggered(event)
    }

    func errorCaught(context: ChannelHandlerContext, error: any Error) {
        if !completed {
            let failure = connection.failure ?? Self.classify(error)
            fail(context: context, failure, close: true)
            return
        }
        context.fireErrorCaught(error)
    }

    private func fail(context: ChannelHandlerContext, _ failure: VerificationFailure, close: Bool) {
        if !counted {
            counted = true
            runtime.metrics.handshake(listener: state.name, failure: failure.kind)
            runtime.logger.notice("handshake refused", metadata: [
                "listener": "\(state.name)", "reason": "\(failure.kind.rawValue)", "detail": "\(failure.reason)",
                "peer": "\(context.channel.remoteAddress?.display ?? "?")",
            ])
            runtime.accessLog.record(.init(
                listener: state.name, client: nil, serial: nil, method: nil, path: nil, route: nil, decision: "refused",
                reason: failure.reason, status: 0, bytesIn: 0, bytesOut: 0, latency: .zero,
                peer: context.channel.remoteAddress?.display
            ))
        }
        if close { context.close(promise: nil) }
    }

    /// Handshake errors that happen before (or instead of) our verification callback.
    /// Decided on NIOSSL's error cases and BoringSSL's reason codes (stable identifiers), not on prose.
    static func classify(_ error: any Error) -> VerificationFailure {
        let text = String(describing: error)
        switch error {
        case NIOSSLError.uncleanShutdown:
            return VerificationFailure(.tls, "the client closed the connection during the handshake")
        case let ssl as NIOSSLError:
            if case .handshakeFailed(.sslError(let errors)) = ssl, errors.contains(.eofDuringHandshake) {
                return VerificationFailure(.tls, "the client closed the connection during the handshake")
            }
            if case .handshakeFailed(let stack) = ssl {
                let reasons = Self.reasonCodes("\(stack)")
                if let aborted = Self.clientAlert(reasons) { return aborted }
                if reasons.contains("PEER_DID_NOT_RETURN_A_CERTIFICATE") || reasons.contains("TLSV1_ALERT_CERTIFICATE_REQUIRED") || reasons.contains("TLSV13_ALERT_CERTIFICATE_REQUIRED") || reasons.contains("CERTIFICATE_REQUIRED") {
                    return VerificationFailure(.noCertificate, "the client presented no certificate (required on this listener)")
                }
            }
        case let io as IOError where io.errnoCode == ECONNRESET || io.errnoCode == EPIPE:
            return VerificationFailure(.tls, "the client closed the connection during the handshake")
        case ChannelError.eof, ChannelError.ioOnClosedChannel:
            return VerificationFailure(.tls, "the client closed the connection during the handshake")
        default:
            break
        }
        return VerificationFailure(.tls, "TLS handshake failed: \(text)")
    }

    /// An alert the client sent to end the handshake, in words: what it says about our side and what to check.
    /// (BoringSSL names received alerts `SSLV3_ALERT_…`/`TLSV1_ALERT_…`; the raw name stays in the detail.)
    static func clientAlert(_ reasons: Set<String>) -> VerificationFailure? {
        let words: [(String, String)] = [
            ("TLSV1_ALERT_UNKNOWN_CA", "the client does not trust our certificate's CA (alert unknown_ca): give it our root, and make sure --cert holds the intermediate too (the agent's chain.pem)"),
            ("SSLV3_ALERT_BAD_CERTIFICATE", "the client refused our certificate (alert bad_certificate): check its name against the name the client asked for (mutual doctor https://this-host)"),
            ("SSLV3_ALERT_CERTIFICATE_EXPIRED", "the client says our certificate has expired (alert certificate_expired): check its renewal, and the client's clock"),
            ("SSLV3_ALERT_CERTIFICATE_UNKNOWN", "the client refused our certificate without saying why (alert certificate_unknown): often a name mismatch or a missing intermediate (mutual doctor https://this-host)"),
            ("SSLV3_ALERT_UNSUPPORTED_CERTIFICATE", "the client refused our certificate's purpose (alert unsupported_certificate): it needs serverAuth"),
            ("SSLV3_ALERT_CERTIFICATE_REVOKED", "the client says our certificate is revoked (alert certificate_revoked): get a new one"),
            ("TLSV1_ALERT_DECRYPT_ERROR", "the client could not verify our handshake signature (alert decrypt_error): our key may not match our certificate (mutual doctor files --cert --key)"),
            ("TLSV1_ALERT_PROTOCOL_VERSION", "the client and this listener share no TLS version (alert protocol_version): this listener speaks TLS 1.2 and 1.3"),
            ("SSLV3_ALERT_HANDSHAKE_FAILURE", "the client found nothing in common with this listener (alert handshake_failure): cipher suites, groups or signature algorithms"),
        ]
        for (code, sentence) in words where reasons.contains(code) {
            return VerificationFailure(.clientAborted, "client aborted: \(sentence)")
        }
        // Some clients (OpenSSL 3.0 in TLS 1.3) end the handshake after our certificate with an alert this side cannot
        // decrypt: BoringSSL reports the record error, which says nothing to a person. Say what it almost always means.
        if reasons.contains("BAD_PACKET_LENGTH") || reasons.contains("DECRYPTION_FAILED_OR_BAD_RECORD_MAC") {
            return VerificationFailure(.clientAborted, "client aborted: it ended the handshake after receiving our certificate, with an alert this listener could not read (\(reasons.sorted().joined(separator: ", "))); most often the client does not trust our certificate: its CA (give the client our root), a missing intermediate (--cert should be the chain: the agent's chain.pem) or the name it asked for")
        }
        return nil
    }

    /// BoringSSL's reason codes in an error stack (`…:OPENSSL_internal:PEER_DID_NOT_RETURN_A_CERTIFICATE …`).
    static func reasonCodes(_ text: String) -> Set<String> {
        Set(TLSReasonCodes.all(in: text))
    }
}
