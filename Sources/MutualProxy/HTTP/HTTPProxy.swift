import Foundation
import MutualPKI
import NIOCore
import NIOHTTP1
import NIOPosix
import NIOTLS
import Prometheus
import Synchronization

/// Idle upstream HTTP/1.1 connections, one pool per (event loop, upstream): a request borrows a connection on its
/// own loop (no thread hop), returns it after a complete keep-alive response.
public final class UpstreamPools: Sendable {
    private let pools = Mutex<[Key: UpstreamPool]>([:])

    /// One pool per event loop, upstream address and (for mTLS upstreams) credential state: a reload starts fresh
    /// connections with the new certificate.
    struct Key: Hashable {
        let loop: ObjectIdentifier
        let host: String
        let port: Int
        let tls: ObjectIdentifier?
    }
    /// Idle connections kept per loop and upstream.
    let maximumIdle: Int

    public init(maximumIdle: Int = 1024) { self.maximumIdle = maximumIdle }

    func pool(for loop: any EventLoop, front: any HTTPFront) -> UpstreamPool {
        let upstream = front.upstream
        let key = Key(loop: ObjectIdentifier(loop), host: upstream.host, port: upstream.port, tls: front.upstreamTLS.map(ObjectIdentifier.init))
        return pools.withLock { pools in
            if let pool = pools[key] { return pool }
            let pool = UpstreamPool(loop: loop, host: upstream.host, port: upstream.port, maximumIdle: maximumIdle, tls: front.upstreamTLS)
            pools[key] = pool
            return pool
        }
    }

    /// Closes every idle connection (shutdown).
    public func closeAll() {
        for pool in pools.withLock({ Array($0.values) }) {
            pool.loop.execute { pool.closeIdle() }
        }
    }
}

/// Lives on one event loop; only touched from it.
final class UpstreamPool: @unchecked Sendable {
    let loop: any EventLoop
    let host: String
    let port: Int
    let maximumIdle: Int
    /// For outbound http listeners: connections are mTLS with these credentials and verified against them.
    let tls: OutboundState?
    private var idle: [UpstreamConnection] = []

    init(loop: any EventLoop, host: String, port: Int, maximumIdle: Int, tls: OutboundState? = nil) {
        self.loop = loop
        self.host = host
        self.port = port
        self.maximumIdle = maximumIdle
        self.tls = tls
    }

    func acquire(_ completion: @escaping (Result<UpstreamConnection, any Error>) -> Void) {
        loop.assertInEventLoop()
        while let connection = idle.popLast() {
            if connection.channel.isActive && !connection.closed { return completion(.success(connection)) }
        }
        let tls = self.tls
        let failure = FailureBox()
        let bootstrap = ClientBootstrap(group: loop)
            .channelOption(.socketOption(.tcp_nodelay), value: 1)
            .connectTimeout(.seconds(5))
            .channelInitializer { channel in
                channel.eventLoop.makeCompletedFuture {
                    if let tls {
                        try channel.pipeline.syncOperations.addHandler(try tls.clientHandler(failure: failure))
                        try channel.pipeline.syncOperations.addHandler(HandshakeWaiter(promise: channel.eventLoop.makePromise()))
                    }
                    // No HTTP codec: the request goes out as bytes the proxy wrote, the response is framed by
                    // ``ResponseFramer`` and relayed as the bytes that arrived.
                    try channel.pipeline.syncOperations.addHandler(UpstreamResponseHandler())
                }
            }
        bootstrap.connect(host: host, port: port).assumeIsolated().whenComplete { result in
            switch result {
            case .success(let channel):
                do {
                    let handler = try channel.pipeline.syncOperations.handler(type: UpstreamResponseHandler.self)
                    let connection = UpstreamConnection(channel: channel, handler: handler)
                    guard tls != nil else { return completion(.success(connection)) }
                    // mTLS: hand the connection out only once the upstream is verified (chain and expected identity).
                    let waiter = try channel.pipeline.syncOperations.handler(type: HandshakeWaiter.self)
                    waiter.promise.futureResult.assumeIsolated().whenComplete { outcome in
                        switch outcome {
                        case .success: completion(.success(connection))
                        case .failure(let error):
                            channel.close(promise: nil)
                            completion(.failure(failure.withLock { $0 }.map { ProxyError($0.reason) as any Error } ?? error))
                        }
                    }
                } catch {
                    channel.close(promise: nil)
                    completion(.failure(error))
                }
            case .failure(let error):
                completion(.failure(error))
            }
        }
    }

    func release(_ connection: UpstreamConnection) {
        loop.assertInEventLoop()
        connection.handler.sink = nil
        guard connection.channel.isActive, !connection.closed, connection.handler.reusable, idle.count < maximumIdle else {
            connection.channel.close(promise: nil)
            return
        }
        idle.append(connection)
    }

    func closeIdle() {
        for connection in idle { connection.channel.close(promise: nil) }
        idle.removeAll()
    }
}

final class UpstreamConnection {
    let channel: any Channel
    let handler: UpstreamResponseHandler
    var closed: Bool { handler.closed }

    init(channel: any Channel, handler: UpstreamResponseHandler) {
        self.channel = channel
        self.handler = handler
    }

    /// Stops or resumes reading the upstream (back-pressure from a client that reads slower than the upstream
    /// sends). The connection lives on the client's event loop, so the option is set synchronously.
    func setReading(_ reading: Bool) {
        try? channel.syncOptions?.setOption(ChannelOptions.autoRead, value: reading)
    }
}

/// Frames the upstream's responses (``ResponseFramer``) and hands their head, body bytes and end to whichever
/// downstream exchange currently owns the connection.
final class UpstreamResponseHandler: ChannelInboundHandler {
    typealias InboundIn = ByteBuffer

    enum Event {
        case head(ResponseFramer.Head)
        case body(ByteBuffer)
        case end(trailers: HTTPHeaders?, reusable: Bool)
        /// The upstream sent what cannot be framed; the connection is closing.
        case malformed(ResponseFramer.FramingError)
        /// The end of one read from the upstream socket: time to flush what was relayed.
        case readComplete
        /// The upstream connection can take more of a request body again.
        case writable
        case closed
    }

    var sink: ((Event) -> Void)?
    var closed = false
    /// False once the upstream sent bytes outside a response (after its end, or with no request): not pooled again.
    private(set) var reusable = true
    private var framer: ResponseFramer?
    /// The start of a response head that has not fully arrived.
    private var partial: ByteBuffer?

    /// Called as a request is sent: frame the next response.
    func expectResponse(toHEAD: Bool, relayRaw: Bool) {
        framer = ResponseFramer(requestWasHEAD: toHEAD, relayRaw: relayRaw)
        partial = nil
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        var buffer = unwrapInboundIn(data)
        if var partial {
            self.partial = nil
            partial.writeImmutableBuffer(buffer)
            buffer = partial
        }
        while framer != nil {
            let event: ResponseFramer.Event?
            do {
                event = try framer!.next(&buffer)
            } catch {
                framer = nil
                reusable = false
                let sink = self.sink
                self.sink = nil
                sink?(.malformed(error))
                context.close(promise: nil)
                return
            }
            guard let event else { break }
            switch event {
            case .head(let head): sink?(.head(head))
            case .body(let bytes): sink?(.body(bytes))
            case .end(let trailers, let keepAlive):
                framer = nil
                if buffer.readableBytes > 0 || !keepAlive { reusable = false }
                sink?(.end(trailers: trailers, reusable: reusable))
            }
        }
        guard buffer.readableBytes > 0 else { return }
        if framer != nil {
            partial = buffer  // a head still arriving
        } else {
            // Bytes that belong to no request: the upstream and the proxy disagree on framing; never reuse.
            reusable = false
            context.close(promise: nil)
        }
    }

    func channelReadComplete(context: ChannelHandlerContext) {
        sink?(.readComplete)
        context.fireChannelReadComplete()
    }

    func channelWritabilityChanged(context: ChannelHandlerContext) {
        if context.channel.isWritable { sink?(.writable) }
        context.fireChannelWritabilityChanged()
    }

    func channelInactive(context: ChannelHandlerContext) {
        closed = true
        // A body that runs until the upstream closes ends here.
        if let end = framer?.upstreamClosed(), case .end(let trailers, _) = end {
            framer = nil
            reusable = false
            sink?(.end(trailers: trailers, reusable: false))
        }
        let sink = self.sink
        self.sink = nil
        sink?(.closed)
        context.fireChannelInactive()
    }

    func errorCaught(context: ChannelHandlerContext, error: any Error) {
        closed = true
        context.close(promise: nil)
    }
}

/// The HTTP front end of a listener: per request, route policy on the verified identity, identity headers (clients'
/// copies removed), forwarding over a pooled upstream connection, access log and metrics.
///
/// On an HTTP/1.x connection it is a byte-level relay: NIO's decoder parses the request (strictly, with the
/// listener's limits), the head sent upstream and every response are written as bytes by the proxy itself
/// (``HTTP1Wire``), and a response's body is relayed as the bytes the upstream sent, framed by ``ResponseFramer``.
/// On an HTTP/2 stream the same exchange answers through NIO's HTTP/2-to-HTTP/1 codec.
final class HTTPProxyHandler: ChannelInboundHandler {
    typealias InboundIn = HTTPServerRequestPart
    /// What an HTTP/2 stream's codec takes; on HTTP/1.x connections the handler writes `ByteBuffer`s.
    typealias OutboundOut = HTTPServerResponsePart

    let state: any HTTPFront
    let runtime: ProxyRuntime
    let pools: UpstreamPools
    /// One HTTP/2 stream (one exchange, answered through the stream codec) rather than an HTTP/1.x connection.
    let isHTTP2Stream: Bool
    private var exchange: Exchange?
    /// What happens to the exchange's parts: decided by the pure state machine, carried out here.
    private var machine = ExchangeStateMachine()
    private var counters: [CounterKey: Counter] = [:]

    struct CounterKey: Hashable {
        let status: Int
        let route: String?
    }
    private var latency: DurationHistogram
    /// Identity headers, looked up once per connection or stream (the identity does not change within it).
    private var identityHeaders: [(String, String)]?
    /// The access token last verified on this connection (its signature is checked once).
    private var verifiedToken: TokenGate.Verified?
    /// The revocation state's generation when this connection's certificate was last found unrevoked.
    private var revocationCheckedAt: Int?
    /// The connection's verified client: given at construction when the handler is built after the handshake
    /// (HTTP/2 streams, HTTP/1.1 chosen by ALPN), else delivered by ``PeerVerifiedEvent``. Nil means unauthenticated.
    private var peer: VerifiedPeer?

    final class Exchange {
        let head: HTTPRequestHead
        let started = ContinuousClock.now
        let keepAlive: Bool
        var route: String?
        var reason: String
        /// The rule that allowed the request; the access log's reason is written from it only when a line is logged.
        var allowedBy: String?
        /// The refusal's stable code, when the proxy answers itself.
        var code: String?
        /// The challenge of a token refusal (RFC 6750 3).
        var wwwAuthenticate: String?
        var closeAfter = false
        var closeHTTP2Connection = false
        var upstream: UpstreamConnection?
        /// Request bytes held while the upstream connection is set up.
        var pending: [ByteBuffer] = []
        /// How the request body goes upstream.
        var upstreamBody: UpstreamBody = .asReceived
        /// The client connection ends after this response (set with the response head).
        var closeClientAfterResponse = false
        var status = 0
        var bytesIn = 0
        var bytesOut = 0

        enum UpstreamBody {
            /// Content-Length (or no body): the bytes as received.
            case asReceived
            /// Chunked upstream: each part becomes a chunk.
            case chunked
            /// No framing was announced (an HTTP/2 GET or HEAD without content-length): a body cannot be sent.
            case none
        }

        init(head: HTTPRequestHead, reason: String) {
            self.head = head
            // An HTTP/2 stream (version 2.0 from the stream codec) ends with its stream; the connection stays.
            self.keepAlive = head.version.major >= 2 || head.isKeepAlive
            self.reason = reason
        }

        var isHTTP2: Bool { head.version.major >= 2 }
        /// An HTTP/1.1 client takes the upstream's body bytes as they are; HTTP/2 and HTTP/1.0 clients get it de-chunked.
        var relayRaw: Bool { head.version == .http1_1 }
    }

    init(state: any HTTPFront, peer: VerifiedPeer?, runtime: ProxyRuntime, pools: UpstreamPools, isHTTP2Stream: Bool = false) {
        self.state = state
        self.peer = peer
        self.runtime = runtime
        self.pools = pools
        self.isHTTP2Stream = isHTTP2Stream
        self.latency = runtime.metrics.latency(listener: state.name)
    }

    private var loopPool: UpstreamPool?
    /// Why the client is not being read: the upstream is not taking the request body, or a pipelined request waits
    /// for the current exchange to end. Reading resumes when neither holds.
    private var pausedForBackPressure = false
    private var pausedForPipelining = false
    private var readingPaused = false
    /// HTTP/1.1 pipelining: what arrived after a request while its exchange is still open, handled in order once
    /// it ends (NIO's pipelining handler did this before the relay wrote its own responses).
    private var waiting: [Waiting] = []
    /// Request heads in `waiting`. At most `maxWaitingRequests` wait; the one after them is answered 429
    /// `pipeline_too_deep` (after the answers to those before it) and the connection closes, so what one read of
    /// tiny pipelined requests can make the proxy hold is bounded per connection.
    private var waitingHeads = 0
    /// The pipelining limit was reached: nothing more the decoder produces is kept.
    private var overflowed = false
    static let maxWaitingRequests = 32
    private var draining = false
    /// Shutting down: no new exchange; close once the current one is answered.
    private var quiescing = false
    /// An HTTP/1.1 parse error was answered; nothing more is read.
    private var failed = false

    enum Waiting {
        case part(HTTPServerRequestPart)
        case parseError(HTTPParserError)
        /// More requests were pipelined than may wait.
        case tooDeep
    }

    private func clearWaiting() {
        waiting = []
        waitingHeads = 0
    }

    private func updateReading(_ context: ChannelHandlerContext) {
        let pause = pausedForBackPressure || pausedForPipelining
        guard pause != readingPaused else { return }
        readingPaused = pause
        try? context.channel.syncOptions?.setOption(ChannelOptions.autoRead, value: !pause)
        // A socket channel reads again by itself when autoRead is turned back on; an HTTP/2 stream channel does
        // not (and its peer is waiting for the window update that reading brings), so ask for the read.
        if !pause { context.read() }
    }

    private func pauseClient(_ context: ChannelHandlerContext) {
        pausedForBackPressure = true
        updateReading(context)
    }

    private func resumeClient(_ context: ChannelHandlerContext) {
        pausedForBackPressure = false
        updateReading(context)
    }

    /// Streams a request body: what one read from the client brought goes to the upstream now, and the client is
    /// not read while the upstream cannot take more (or, before it is connected, once a megabyte is waiting).
    func channelReadComplete(context: ChannelHandlerContext) {
        if exchange != nil {
            switch machine.receive(.clientReadComplete) {
            case .pauseClient:
                pauseClient(context)
            case .flushUpstream:
                guard let upstream = exchange?.upstream else { break }
                upstream.channel.flush()
                if !upstream.channel.isWritable { pauseClient(context) }
            default:
                break
            }
        }
        context.fireChannelReadComplete()
    }

    /// The HTTP/1.1 connection's timers (absent on HTTP/2 streams and outbound listeners).
    private var timers: (HTTP1ConnectionGuard, ChannelHandlerContext)?

    func handlerAdded(context: ChannelHandlerContext) {
        loopPool = pools.pool(for: context.eventLoop, front: state)
        if let guardContext = try? context.pipeline.syncOperations.context(handlerType: HTTP1ConnectionGuard.self),
           let handler = guardContext.handler as? HTTP1ConnectionGuard {
            timers = (handler, guardContext)
        }
    }

    func userInboundEventTriggered(context: ChannelHandlerContext, event: Any) {
        if let verified = event as? PeerVerifiedEvent {
            peer = verified.peer
            identityHeaders = nil
            return
        }
        if event is ChannelShouldQuiesceEvent, !isHTTP2Stream {
            // Graceful shutdown: an idle connection closes now, a busy one after its answer.
            quiescing = true
            clearWaiting()
            if exchange == nil { context.close(promise: nil) }
            return
        }
        context.fireUserInboundEventTriggered(event)
    }

    func errorCaught(context: ChannelHandlerContext, error: any Error) {
        guard let parse = error as? HTTPParserError, !isHTTP2Stream else {
            context.fireErrorCaught(error)
            return
        }
        guard !failed, !overflowed else { return }  // answered once, or refused further on; the connection is closing
        if exchange != nil || !waiting.isEmpty {
            // Belongs after the requests already read.
            waiting.append(.parseError(parse))
            pausedForPipelining = true
            updateReading(context)
            return
        }
        parseFailed(context: context, error: parse)
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        guard !failed, !overflowed else { return }
        let part = unwrapInboundIn(data)
        if !isHTTP2Stream, !waiting.isEmpty || (exchange != nil && part.isHead) {
            // A pipelined request: held, and the client not read, until the current exchange ends.
            if part.isHead {
                if waitingHeads >= Self.maxWaitingRequests {
                    waiting.append(.tooDeep)
                    overflowed = true
                    pausedForPipelining = true
                    updateReading(context)
                    return
                }
                waitingHeads += 1
            }
            waiting.append(.part(part))
            pausedForPipelining = true
            updateReading(context)
            return
        }
        handle(part, context: context)
    }

    private func handle(_ part: HTTPServerRequestPart, context: ChannelHandlerContext) {
        let event: ExchangeStateMachine.Event
        switch part {
        case .head(let head):
            begin(context: context, head: head)
            return
        case .body(let buffer):
            exchange?.bytesIn += buffer.readableBytes
            event = .body(bytes: buffer.readableBytes)
        case .end:
            event = .end
        }
        guard let exchange else { return }
        switch machine.receive(event) {
        case .hold:
            appendUpstream(part, exchange: exchange, context: context) { exchange.pending.append($0) }
        case .forward(let flush):
            guard let upstream = exchange.upstream else { return }
            appendUpstream(part, exchange: exchange, context: context) { upstream.channel.write($0, promise: nil) }
            if flush { upstream.channel.flush() }
        case .answer(let status):
            respondDirectly(context: context, exchange: exchange, status: HTTPResponseStatus(statusCode: Int(status)))
        default:
            break  // discarded: the proxy answers this request itself
        }
    }

    /// A request body part in the upstream's framing.
    private func appendUpstream(_ part: HTTPServerRequestPart, exchange: Exchange, context: ChannelHandlerContext, _ emit: (ByteBuffer) -> Void) {
        switch (part, exchange.upstreamBody) {
        case (.body(let buffer), .asReceived):
            emit(buffer)
        case (.body(let buffer), .chunked):
            guard buffer.readableBytes > 0 else { return }
            emit(HTTP1Wire.chunkHeader(size: buffer.readableBytes, allocator: context.channel.allocator))
            emit(buffer)
            emit(HTTP1Wire.crlf)
        case (.end(let trailers), .chunked):
            emit(HTTP1Wire.lastChunk(trailers: trailers.map { Self.forwardTrailers($0, strip: state.stripMatcher) }))
        case (.body, .none), (.end, _), (.head, _):
            break
        }
    }

    func channelWritabilityChanged(context: ChannelHandlerContext) {
        // The client caught up: read the upstream again.
        if context.channel.isWritable, exchange != nil, case .resumeUpstreamReads = machine.receive(.clientWritable) {
            exchange?.upstream?.setReading(true)
        }
        context.fireChannelWritabilityChanged()
    }

    func channelInactive(context: ChannelHandlerContext) {
        if let exchange, case .abandon(let responseStarted) = machine.receive(.clientClosed) {
            // The client left mid-exchange: the upstream connection is in an unknown state, never reuse it.
            closeUpstream(exchange)
            finish(exchange: exchange, status: responseStarted ? exchange.status : 499, reason: "client closed the connection")
        }
        exchange = nil
        clearWaiting()
        context.fireChannelInactive()
    }

    private func closeUpstream(_ exchange: Exchange) {
        guard let upstream = exchange.upstream else { return }
        upstream.handler.sink = nil
        upstream.channel.close(promise: nil)
        exchange.upstream = nil
    }

    private func begin(context: ChannelHandlerContext, head: HTTPRequestHead) {
        guard machine.state == .idle else {
            // An HTTP/2 stream carries one request (and HTTP/1.1 pipelined heads wait in `waiting`); fail closed.
            if case .closeClient = machine.receive(.head(refusal: nil)) {
                if let exchange { closeUpstream(exchange) }
                exchange = nil
                context.close(promise: nil)
            }
            return
        }
        let exchange = Exchange(head: head, reason: "")
        self.exchange = exchange
        if let (timers, timerContext) = timers { timers.headComplete(context: timerContext) }
        let target: RequestTarget
        switch RequestChecks.check(head: head, peer: peer, limits: state.limits, now: runtime.now()) {
        case .failure(let refusal):
            refuse(exchange, refusal)
            return
        case .success(let normalized):
            target = normalized
        }
        let (decision, matched) = state.policy.decideRoute(method: head.method.rawValue, path: target.routingKey, peer: peer)
        switch decision {
        case .unauthenticated(let reason):
            refuse(exchange, Refusal(status: .unauthorized, code: "client_certificate_required", reason: reason))
            return
        case .deny(let reason):
            refuse(exchange, Refusal(status: .forbidden, code: "forbidden", reason: reason))
            return
        case .allow(let route, let by):
            exchange.route = route
            exchange.allowedBy = by
        }
        var forwarded: HTTPHeaders
        switch forwardedHeaders(head.headers, context: context) {
        case .success(let headers): forwarded = headers
        case .failure(let refusal):
            exchange.route = nil
            refuse(exchange, refusal)
            return
        }
        if state.forwardIdentity, let peer, let route = exchange.route, let name = state.policy.identity(of: peer, route: route) {
            // A name with a control character cannot be carried in a header: refused, as for XFCC.
            guard !name.unicodeScalars.contains(where: { $0.value < 0x20 || $0.value == 0x7F }) else {
                exchange.route = nil
                refuse(exchange, Refusal(
                    status: .forbidden, code: "identity_unrepresentable",
                    reason: "the client's identity contains characters that cannot be forwarded in a header"
                ))
                return
            }
            forwarded.add(name: ForwardedIdentity.identityHeader, value: name)
        }
        if let rule = matched?.token {
            switch checkToken(rule: rule, head: head) {
            case .passed(let added):
                if !rule.forwardToken { forwarded.remove(name: "authorization") }
                for (name, value) in added { forwarded.add(name: name, value: value) }
            case .refused(let refusal):
                exchange.route = nil
                refuse(exchange, refusal)
                return
            case .unknownKey(let tokens):
                // A key the proxy has not fetched yet (a rotation it has not seen): hold the request while the key
                // set is refreshed, then decide.
                guard case .acquireUpstream = machine.receive(.head(refusal: nil)) else { return }
                let loopBound = NIOLoopBound((self, context, exchange), eventLoop: context.eventLoop)
                let loop = context.eventLoop
                let forwarded = forwarded
                tokens.refreshForUnknownKey {
                    loop.execute {
                        let (handler, context, exchange) = loopBound.value
                        handler.resumeAfterKeyRefresh(context: context, exchange: exchange, rule: rule, target: target, forwarded: forwarded)
                    }
                }
                return
            }
        }
        guard case .acquireUpstream = machine.receive(.head(refusal: nil)) else { return }
        sendHead(context: context, exchange: exchange, target: target, forwarded: forwarded)
    }

    enum TokenOutcome {
        case passed([(String, String)])
        case refused(Refusal)
        /// The token names a key not in the set: refresh it, then check again.
        case unknownKey(AccessTokenKeys)
    }

    /// The route's token check for this request (``TokenGate``), plus the revocation of the connection's certificate
    /// as known now (a revocation that arrived after the handshake).
    private func checkToken(rule: TokenRule, head: HTTPRequestHead, afterRefresh: Bool = false) -> TokenOutcome {
        guard let tokens = runtime.accessTokens else {
            return .refused(Self.tokenRefusal(TokenRefusal(.unknownKey, "this proxy has no token issuer configured (tokens.authority)")))
        }
        let now = runtime.now()
        // Checked again only when the revocation state changed since this connection last looked.
        let generation = runtime.revocation.generation
        if let peer, revocationCheckedAt != generation {
            if let (failure, reason) = runtime.revocation.check(chain: peer.chain, now: now), failure == .revoked {
                return .refused(Self.tokenRefusal(TokenRefusal(.certificateRevoked, reason)))
            }
            revocationCheckedAt = generation
        }
        switch TokenGate.check(
            authorization: head.headers["authorization"], rule: rule, peer: peer, keys: tokens.keys, leeway: tokens.leeway, now: now,
            cache: &verifiedToken, shared: tokens
        ) {
        case .success(let verified):
            return .passed(TokenGate.headers(for: verified))
        case .failure(let refusal) where refusal.code == .unknownKey && !afterRefresh:
            return .unknownKey(tokens)
        case .failure(let refusal):
            return .refused(Self.tokenRefusal(refusal, scopes: rule.scopes))
        }
    }

    static func tokenRefusal(_ refusal: TokenRefusal, scopes: [String] = []) -> Refusal {
        Refusal(
            status: HTTPResponseStatus(statusCode: refusal.status), code: refusal.code.name, reason: refusal.reason,
            wwwAuthenticate: refusal.challenge(realm: "mutual", scope: scopes)
        )
    }

    private func resumeAfterKeyRefresh(context: ChannelHandlerContext, exchange: Exchange, rule: TokenRule, target: RequestTarget, forwarded: HTTPHeaders) {
        guard self.exchange === exchange, context.channel.isActive else { return }
        var forwarded = forwarded
        switch checkToken(rule: rule, head: exchange.head, afterRefresh: true) {
        case .passed(let added):
            if !rule.forwardToken { forwarded.remove(name: "authorization") }
            for (name, value) in added { forwarded.add(name: name, value: value) }
            sendHead(context: context, exchange: exchange, target: target, forwarded: forwarded)
        case .refused(let refusal):
            lateRefusal(context: context, exchange: exchange, refusal: refusal)
        case .unknownKey:
            // Not returned after a refresh; fail closed all the same.
            lateRefusal(context: context, exchange: exchange, refusal: Self.tokenRefusal(TokenRefusal(.unknownKey, "the token's key is not in the issuer's key set")))
        }
    }

    /// Refuses a request whose head was already accepted (held while keys were refreshed).
    private func lateRefusal(context: ChannelHandlerContext, exchange: Exchange, refusal: Refusal) {
        runtime.metrics.requestRefused(listener: state.name, code: refusal.code)
        exchange.route = nil
        exchange.reason = refusal.reason
        exchange.code = refusal.code
        exchange.wwwAuthenticate = refusal.wwwAuthenticate
        switch machine.receive(.lateRefusal(status: refusal.status.code)) {
        case .dropHeld(let answerNow):
            resumeClient(context)
            exchange.pending = []
            if answerNow { respondDirectly(context: context, exchange: exchange, status: refusal.status) }
        default:
            break
        }
    }

    /// Writes the request head for the upstream and borrows a connection for it.
    private func sendHead(context: ChannelHandlerContext, exchange: Exchange, target: RequestTarget, forwarded: HTTPHeaders) {
        guard let pool = loopPool else { return }
        var forwarded = forwarded
        let head = exchange.head
        exchange.upstreamBody = Self.upstreamBody(for: head, forwarded: &forwarded)
        var bytes = context.channel.allocator.buffer(capacity: 256 + forwarded.count * 48)
        HTTP1Wire.writeRequestHead(method: head.method.rawValue, target: target.forwarded, headers: forwarded, into: &bytes)
        // Body parts that arrived while a token's key was fetched are held already: the head goes before them.
        exchange.pending.insert(bytes, at: 0)
        let loopBound = NIOLoopBound((self, context), eventLoop: context.eventLoop)
        pool.acquire { result in
            let (handler, context) = loopBound.value
            handler.upstreamReady(context: context, exchange: exchange, result: result)
        }
    }

    /// How a request's body is framed upstream. HTTP/1.x requests keep theirs (NIO's decoder accepted their
    /// Content-Length or chunked coding). HTTP/2 requests carry no chunked coding: one without content-length is
    /// sent chunked (adding the field), except GET and HEAD, whose body is not sent (as NIO's encoder did, since an
    /// upstream that does not read a GET's body would leave a chunk terminator on a pooled connection).
    static func upstreamBody(for head: HTTPRequestHead, forwarded: inout HTTPHeaders) -> Exchange.UpstreamBody {
        if head.version.major >= 2 {
            if forwarded.contains(name: "content-length") { return .asReceived }
            if head.method == .GET || head.method == .HEAD { return .none }
            forwarded.add(name: "transfer-encoding", value: "chunked")
            return .chunked
        }
        return forwarded.contains(name: "transfer-encoding") ? .chunked : .asReceived
    }

    /// Marks the exchange as answered by the proxy; the answer goes out once the request has been read.
    private func refuse(_ exchange: Exchange, _ refusal: Refusal) {
        runtime.metrics.requestRefused(listener: state.name, code: refusal.code)
        if refusal.closesHTTP2Connection { runtime.metrics.connectionClosed(listener: state.name, reason: refusal.code) }
        exchange.reason = refusal.reason
        exchange.code = refusal.code
        exchange.closeAfter = refusal.closeConnection
        exchange.closeHTTP2Connection = refusal.closesHTTP2Connection
        exchange.wwwAuthenticate = refusal.wwwAuthenticate
        _ = machine.receive(.head(refusal: refusal.status.code))
    }

    private func forwardedHeaders(_ incoming: HTTPHeaders, context: ChannelHandlerContext) -> Result<HTTPHeaders, Refusal> {
        if identityHeaders == nil, let peer {
            switch state.identityHeaders(for: peer) {
            case .success(let computed): identityHeaders = computed
            case .failure(let problem):
                return .failure(Refusal(
                    status: .forbidden, code: "identity_unrepresentable",
                    reason: "the client certificate's \(problem.field) contains characters that cannot be forwarded in a header; refusing rather than altering it"
                ))
            }
        }
        return .success(Self.forwardHeaders(
            incoming, strip: state.stripMatcher, identity: identityHeaders ?? [], addsForwardingHeaders: state.addsForwardingHeaders,
            clientAddress: context.channel.remoteAddress?.ipAddress
        ))
    }

    /// The headers sent upstream: hop-by-hop headers and those `Connection` names removed; every client copy of a
    /// header the proxy owns removed, in any spelling a backend could read as it (case, `_` for `-`); the listener's
    /// strip list applied; then the verified identity and the forwarding headers added. Pure, for tests.
    static func forwardHeaders(
        _ incoming: HTTPHeaders, strip: HeaderNames.Matcher, identity: [(String, String)], addsForwardingHeaders: Bool, clientAddress: String?
    ) -> HTTPHeaders {
        var named = Set<String>()
        for value in incoming["connection"] {
            for token in value.split(separator: ",") { named.insert(HeaderNames.canonical(token.trimmingCharacters(in: .whitespaces))) }
        }
        var headers = HTTPHeaders()
        headers.reserveCapacity(incoming.count + 4)
        var forwardedFor: String?
        for (name, value) in incoming {
            let canonical = HeaderNames.canonical(name)
            if HTTP1Wire.hopByHop.contains(canonical) || named.contains(canonical) { continue }
            if ForwardedIdentity.ownedHeaders.contains(canonical) {
                // Only the exact spelling of x-forwarded-for is kept (extended below); look-alikes are forgeries.
                if canonical == "x-forwarded-for" && !name.utf8.contains(UInt8(ascii: "_")) {
                    forwardedFor = (forwardedFor.map { $0 + ", " } ?? "") + value
                }
                continue
            }
            if strip.matches(canonical: canonical) { continue }
            headers.add(name: name, value: value)
        }
        for (name, value) in identity { headers.add(name: name, value: value) }
        guard addsForwardingHeaders else {
            if let forwardedFor { headers.add(name: "x-forwarded-for", value: forwardedFor) }
            return headers
        }
        headers.add(name: "x-forwarded-proto", value: "https")
        if let clientAddress {
            headers.add(name: "x-forwarded-for", value: forwardedFor.map { "\($0), \(clientAddress)" } ?? clientAddress)
        }
        return headers
    }

    /// A request's trailer fields as sent upstream: the same removals as for its head (hop-by-hop fields, every
    /// spelling of a header the proxy owns, the strip list), and nothing added: a backend that merges trailers into
    /// the headers must not find a forged identity there.
    static func forwardTrailers(_ incoming: HTTPHeaders, strip: HeaderNames.Matcher) -> HTTPHeaders {
        var trailers = HTTPHeaders()
        for (name, value) in incoming {
            let canonical = HeaderNames.canonical(name)
            if HTTP1Wire.hopByHop.contains(canonical) || ForwardedIdentity.ownedHeaders.contains(canonical) || strip.matches(canonical: canonical) {
                continue
            }
            trailers.add(name: name, value: value)
        }
        return trailers
    }

    private func upstreamReady(context: ChannelHandlerContext, exchange: Exchange, result: Result<UpstreamConnection, any Error>) {
        guard self.exchange === exchange, context.channel.isActive else {
            if case .success(let upstream) = result { loopPool?.release(upstream) }
            return
        }
        switch result {
        case .failure(let error):
            exchange.reason = "upstream \(state.upstream.host):\(state.upstream.port) unreachable: \(Self.describe(error))"
            runtime.logger.warning("upstream unreachable", metadata: ["listener": "\(state.name)", "error": "\(exchange.reason)"])
            perform(machine.receive(.upstreamUnreachable), context: context, exchange: exchange)
        case .success(let upstream):
            guard case .sendHeld = machine.receive(.upstreamConnected) else {
                loopPool?.release(upstream)
                return
            }
            exchange.upstream = upstream
            upstream.handler.expectResponse(toHEAD: exchange.head.method == .HEAD, relayRaw: exchange.relayRaw)
            let loopBound = NIOLoopBound((self, context), eventLoop: context.eventLoop)
            upstream.handler.sink = { event in
                let (handler, context) = loopBound.value
                handler.upstreamEvent(context: context, exchange: exchange, event: event)
            }
            let held = exchange.pending
            exchange.pending = []
            for bytes in held { upstream.channel.write(bytes, promise: nil) }
            upstream.channel.flush()
            if upstream.channel.isWritable { resumeClient(context) }
        }
    }

    private func upstreamEvent(context: ChannelHandlerContext, exchange: Exchange, event: UpstreamResponseHandler.Event) {
        guard self.exchange === exchange else { return }
        switch event {
        case .head(let head):
            guard case .relayResponseHead = machine.receive(.responseHead(informational: false, keepAlive: head.keepAlive)) else { return }
            exchange.status = head.status
            if exchange.isHTTP2 {
                context.write(wrapOutboundOut(.head(HTTP1Wire.responseHead(head, version: exchange.head.version))), promise: nil)
                return
            }
            // The client learns where the body ends from the upstream's framing; when that is the upstream closing,
            // or a chunked body goes to an HTTP/1.0 client de-chunked, from this connection closing.
            let dechunked = !exchange.relayRaw && head.framing == .chunked
            let close = !exchange.keepAlive || quiescing || head.framing == .untilClose || dechunked
            exchange.closeClientAfterResponse = close
            var bytes = context.channel.allocator.buffer(capacity: head.bytes.readableBytes + 32)
            HTTP1Wire.writeResponseHead(
                head, clientMinorVersion: exchange.head.version.minor, dropTransferEncoding: dechunked, close: close,
                keepAlive: exchange.head.version.minor == 0 && !close, into: &bytes
            )
            context.write(NIOAny(bytes), promise: nil)
        case .body(let bytes):
            guard case .relayResponseBody = machine.receive(.responseBody) else { return }
            exchange.bytesOut += bytes.readableBytes
            if exchange.isHTTP2 {
                context.write(wrapOutboundOut(.body(.byteBuffer(bytes))), promise: nil)
            } else {
                context.write(NIOAny(bytes), promise: nil)
            }
        case .writable:
            perform(machine.receive(.upstreamWritable), context: context, exchange: exchange)
        case .readComplete:
            perform(machine.receive(.responseReadComplete), context: context, exchange: exchange)
        case .end(let trailers, let reusable):
            guard case .completeResponse(let reuse) = machine.receive(.responseEnd) else { return }
            resumeClient(context)  // an early answer (say 413) ends the exchange while the body is still coming
            if let upstream = exchange.upstream {
                exchange.upstream = nil
                if reuse && reusable { loopPool?.release(upstream) } else {
                    upstream.handler.sink = nil
                    upstream.channel.close(promise: nil)
                }
            }
            self.exchange = nil
            finish(exchange: exchange, status: exchange.status, reason: exchange.reason)
            if exchange.isHTTP2 {
                context.writeAndFlush(wrapOutboundOut(.end(trailers)), promise: nil)
                drainWaiting(context: context)
            } else if exchange.closeClientAfterResponse || quiescing {
                // The body's bytes are written already; close once they are out.
                clearWaiting()
                context.writeAndFlush(NIOAny(ByteBuffer())).assumeIsolated().whenComplete { _ in context.close(promise: nil) }
            } else {
                // The response's last bytes went out with the body; nothing to write, only to flush.
                context.flush()
                drainWaiting(context: context)
            }
        case .malformed(let error):
            exchange.code = error.code
            exchange.reason = "upstream \(state.upstream.host):\(state.upstream.port) sent a response the proxy cannot relay: \(error.reason)"
            runtime.logger.warning("upstream response refused", metadata: [
                "listener": "\(state.name)", "code": "\(error.code)", "error": "\(error.reason)",
            ])
            exchange.upstream = nil
            perform(machine.receive(.upstreamClosed), context: context, exchange: exchange)
        case .closed:
            perform(machine.receive(.upstreamClosed), context: context, exchange: exchange)
        }
    }

    /// Carries out the actions that several events share.
    private func perform(_ action: ExchangeStateMachine.Action, context: ChannelHandlerContext, exchange: Exchange) {
        switch action {
        case .upstreamFailed(let unreachable, let answerNow):
            resumeClient(context)
            exchange.pending = []
            exchange.upstream = nil
            if !unreachable && exchange.code == nil {
                exchange.reason = "upstream \(state.upstream.host):\(state.upstream.port) closed the connection before responding"
            }
            if answerNow { respondDirectly(context: context, exchange: exchange, status: .badGateway) }
        case .truncateResponse:
            // Truncated response: the client must not take it as complete.
            resumeClient(context)
            self.exchange = nil
            clearWaiting()
            finish(exchange: exchange, status: exchange.status, reason: exchange.code == nil ? "upstream closed mid-response" : exchange.reason)
            context.close(promise: nil)
        case .resumeClient:
            resumeClient(context)
        case .flushClient:
            // Relay a large response as it arrives instead of holding it until its end, and stop reading the
            // upstream while the client is not taking it (its channel, or its HTTP/2 stream window, is full).
            context.flush()
            if !context.channel.isWritable, let upstream = exchange.upstream { upstream.setReading(false) }
        default:
            break
        }
    }

    /// Answers a request the proxy decides itself (400/401/403/502) with a JSON problem body naming the reason.
    private func respondDirectly(context: ChannelHandlerContext, exchange: Exchange, status: HTTPResponseStatus) {
        guard self.exchange === exchange else { return }
        self.exchange = nil
        let code = exchange.code ?? "bad_gateway"
        exchange.code = code
        let body = "{\"error\":\"\(code)\",\"reason\":\(AccessLog.quote(exchange.reason))}\n"
        let isHTTP2 = exchange.isHTTP2
        let keepAlive = exchange.keepAlive && !(exchange.closeAfter && !isHTTP2) && !(quiescing && !isHTTP2)
        exchange.bytesOut = body.utf8.count
        finish(exchange: exchange, status: Int(status.code), reason: exchange.reason)
        let written: EventLoopFuture<Void>
        if isHTTP2 {
            var head = HTTPResponseHead(version: exchange.head.version, status: status)
            head.headers.add(name: "content-type", value: "application/json")
            head.headers.add(name: "content-length", value: String(body.utf8.count))
            if let challenge = exchange.wwwAuthenticate { head.headers.add(name: "www-authenticate", value: challenge) }
            context.write(wrapOutboundOut(.head(head)), promise: nil)
            if exchange.head.method != .HEAD { context.write(wrapOutboundOut(.body(.byteBuffer(ByteBuffer(string: body)))), promise: nil) }
            written = context.writeAndFlush(wrapOutboundOut(.end(nil)))
        } else {
            var headers = [("content-type", "application/json")]
            if let challenge = exchange.wwwAuthenticate { headers.append(("www-authenticate", challenge)) }
            if !keepAlive { headers.append(("connection", "close")) } else if exchange.head.version.minor == 0 { headers.append(("connection", "keep-alive")) }
            var bytes = context.channel.allocator.buffer(capacity: 256 + body.utf8.count)
            HTTP1Wire.writeResponse(
                version: exchange.head.version, status: status, headers: headers, body: body, omitBody: exchange.head.method == .HEAD, into: &bytes
            )
            written = context.writeAndFlush(NIOAny(bytes))
        }
        // On HTTP/2 a refusal ends its stream; only one about the connection itself (an expired certificate) ends
        // the connection.
        let closeParent = exchange.closeHTTP2Connection && isHTTP2
        written.assumeIsolated().whenComplete { _ in
            // An HTTP/2 stream's refusal that ends the connection (an expired certificate) closes its parent.
            if closeParent { context.channel.parent?.close(promise: nil) }
            guard !keepAlive else { return }
            if isHTTP2 { context.close(promise: nil) } else { HTTP1ConnectionGuard.closeAfterAnswer(context) }
        }
        if keepAlive { drainWaiting(context: context) } else { clearWaiting() }
    }

    /// After an exchange ends: the pipelined requests that waited, in order, until one opens an exchange that does
    /// not end at once; then the client is read again.
    private func drainWaiting(context: ChannelHandlerContext) {
        guard !draining else { return }
        draining = true
        defer { draining = false }
        while let first = waiting.first {
            if exchange != nil, case .part(let part) = first, part.isHead { break }
            if exchange != nil, case .parseError = first { break }
            if exchange != nil, case .tooDeep = first { break }
            waiting.removeFirst()
            switch first {
            case .part(let part):
                if part.isHead { waitingHeads -= 1 }
                handle(part, context: context)
            case .parseError(let error):
                parseFailed(context: context, error: error)
            case .tooDeep:
                failConnection(
                    context: context, status: .tooManyRequests, code: "pipeline_too_deep",
                    reason: "more than \(Self.maxWaitingRequests) requests were pipelined behind one still being answered"
                )
            }
        }
        if waiting.isEmpty {
            pausedForPipelining = false
            updateReading(context)
        }
    }

    /// NIO's decoder refused the client's bytes: header limits → 431 `headers_too_large`, anything else → 400
    /// `malformed_request`, then the connection closes (its framing can no longer be trusted). An exchange still
    /// open is abandoned (its upstream closed); a response already started cannot be replaced, so the connection
    /// just ends.
    private func parseFailed(context: ChannelHandlerContext, error: HTTPParserError) {
        let (status, code, reason): (HTTPResponseStatus, String, String) = error == .headerOverflow
            ? (.requestHeaderFieldsTooLarge, "headers_too_large", "the request's header fields exceed the listener's limits")
            : (.badRequest, "malformed_request", "the request is not valid HTTP/1.1 (\(error))")
        failConnection(context: context, status: status, code: code, reason: reason)
    }

    /// Answers the client once with `status` and `code`, then closes: the connection's input can no longer be
    /// handled (a parse error, or too many pipelined requests).
    private func failConnection(context: ChannelHandlerContext, status: HTTPResponseStatus, code: String, reason: String) {
        failed = true
        clearWaiting()
        runtime.metrics.requestRefused(listener: state.name, code: code)
        var responseStarted = false
        if let exchange {
            self.exchange = nil
            if case .relaying(_, .streaming) = machine.state { responseStarted = true }
            _ = machine.receive(.clientClosed)
            closeUpstream(exchange)
            exchange.code = code
            finish(exchange: exchange, status: responseStarted ? exchange.status : Int(status.code), reason: reason)
        } else if runtime.accessLog.enabled {
            runtime.accessLog.record(.init(
                listener: state.name, client: peer?.displayName, serial: peer?.serial, method: nil, path: nil, route: nil,
                decision: "bad_request", reason: reason, status: Int(status.code),
                bytesIn: 0, bytesOut: 0, latency: .zero, peer: nil, code: code
            ))
        }
        guard !responseStarted else {
            context.close(promise: nil)
            return
        }
        let body = "{\"error\":\"\(code)\",\"reason\":\(AccessLog.quote(reason))}\n"
        var bytes = context.channel.allocator.buffer(capacity: 256)
        HTTP1Wire.writeResponse(
            version: .http1_1, status: status, headers: [("content-type", "application/json"), ("connection", "close")], body: body,
            omitBody: false, into: &bytes
        )
        context.writeAndFlush(NIOAny(bytes)).assumeIsolated().whenComplete { _ in HTTP1ConnectionGuard.closeAfterAnswer(context) }
    }

    private func finish(exchange: Exchange, status: Int, reason: String) {
        if let (timers, timerContext) = timers { timers.exchangeFinished(context: timerContext) }
        let elapsed = ContinuousClock.now - exchange.started
        latency.record(elapsed)
        let key = CounterKey(status: status, route: exchange.route)
        if let counter = counters[key] {
            counter.increment()
        } else {
            let counter = runtime.metrics.requestCounter(listener: state.name, route: exchange.route ?? "none", status: status)
            counters[key] = counter
            counter.increment()
        }
        guard runtime.accessLog.enabled else { return }
        let reason = reason.isEmpty ? exchange.allowedBy.map { "allowed by \($0)" } ?? reason : reason
        let peer = self.peer
        let decision: String
        switch status {
        case 400, 405, 429, 431: decision = "bad_request"
        case 401: decision = "unauthenticated"
        case 403: decision = "deny"
        default: decision = exchange.route == nil ? "error" : "allow"
        }
        runtime.accessLog.record(.init(
            listener: state.name, client: peer?.displayName, serial: peer?.serial, method: exchange.head.method.rawValue,
            path: exchange.head.uri, route: exchange.route, decision: decision, reason: reason, status: status,
            bytesIn: exchange.bytesIn, bytesOut: exchange.bytesOut, latency: elapsed, peer: nil, code: exchange.code
        ))
    }

    static func describe(_ error: any Error) -> String {
        if let error = error as? NIOConnectionError {
            return error.connectionErrors.first.map { describe($0.error) } ?? "\(error)"
        }
        if let error = error as? IOError { return String(cString: strerror(error.errnoCode)).lowercased() }
        if error is ChannelError { return "\(error)" }
        return String(describing: error)
    }
}

extension HTTPProxyHandler {
    /// NIO's request decoder (llhttp, strict) before the handler; no response encoder: the handler writes bytes.
    static func addRequestDecoder(_ sync: ChannelPipeline.SynchronousOperations, limits: NIOHTTPDecoderLimitConfiguration = .init()) throws {
        try sync.addHandler(ByteToMessageHandler(HTTPRequestDecoder(leftOverBytesStrategy: .dropBytes, informationalResponseStrategy: .drop, limitConfiguration: limits)))
    }
}

extension HTTPServerRequestPart {
    var isHead: Bool { if case .head = self { true } else { false } }
}

/// What the HTTP front end needs from its listener: inbound listeners (TLS from clients, plain HTTP upstream) and
/// outbound http listeners (plain HTTP from the local app, pooled mTLS upstream) both provide it.
protocol HTTPFront: AnyObject, Sendable {
    var name: String { get }
    var policy: RoutePolicy { get }
    var upstream: UpstreamAddress { get }
    var forwardXFCC: Bool { get }
    var forwardRFC9440: Bool { get }
    var forwardIdentity: Bool { get }
    /// `By=` in XFCC.
    var proxyIdentity: String? { get }
    /// `x-forwarded-proto: https` and the client address in `x-forwarded-for`.
    var addsForwardingHeaders: Bool { get }
    var upstreamTLS: OutboundState? { get }
    /// The identity headers added for a verified client (none when the front forwards none), or why the identity
    /// cannot be forwarded.
    func identityHeaders(for peer: VerifiedPeer) -> Result<[(String, String)], ForwardedIdentity.Unrepresentable>
    var limits: ProxyLimits { get }
    /// Client headers removed besides the owned ones.
    var stripMatcher: HeaderNames.Matcher { get }
}

extension InboundState: HTTPFront {
    var proxyIdentity: String? { credentials.identity }
    var addsForwardingHeaders: Bool { true }
    var upstreamTLS: OutboundState? { nil }
}

/// Fulfils its promise when the TLS handshake completes, fails it when the connection errs or closes first.
final class HandshakeWaiter: ChannelInboundHandler, RemovableChannelHandler {
    typealias InboundIn = NIOAny
    let promise: EventLoopPromise<Void>
    init(promise: EventLoopPromise<Void>) { self.promise = promise }

    func userInboundEventTriggered(context: ChannelHandlerContext, event: Any) {
        if case TLSUserEvent.handshakeCompleted = event {
            promise.succeed(())
            context.pipeline.syncOperations.removeHandler(context: context, promise: nil)
        }
        context.fireUserInboundEventTriggered(event)
    }

    func errorCaught(context: ChannelHandlerContext, error: any Error) {
        promise.fail(error)
        context.fireErrorCaught(error)
    }

    func channelInactive(context: ChannelHandlerContext) {
        promise.fail(ChannelError.eof)
        context.fireChannelInactive()
    }
}
