import Foundation
import NIOCore
import NIOHTTP1
import NIOPosix
import NIOTLS
import Prometheus
import Synchronization

/// Idle upstream HTTP/1.1 connections, one pool per (event loop, upstream): a request borrows a connection on its
/// own loop (no thread hop), returns it after a complete keep-alive response.
public final class UpstreamPools: Sendable {
    private let pools = Mutex<[String: UpstreamPool]>([:])
    /// Idle connections kept per loop and upstream.
    let maximumIdle: Int

    public init(maximumIdle: Int = 1024) { self.maximumIdle = maximumIdle }

    func pool(for loop: any EventLoop, front: any HTTPFront) -> UpstreamPool {
        let upstream = front.upstream
        // mTLS upstreams get a pool per credential state: a reload starts fresh connections with the new certificate.
        let tlsKey = front.upstreamTLS.map { "\(ObjectIdentifier($0))" } ?? "plain"
        let key = "\(ObjectIdentifier(loop))|\(upstream.host)|\(upstream.port)|\(tlsKey)"
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
                    // Header values reaching the encoder were validated by the inbound parser or are our own
                    // (base64 / percent-encoded); validating again costs a byte scan of every header per request.
                    try channel.pipeline.syncOperations.addHTTPClientHandlers(enableOutboundHeaderValidation: false)
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
        guard connection.channel.isActive, !connection.closed, idle.count < maximumIdle else {
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

/// Hands upstream response parts to whichever downstream request currently owns the connection.
final class UpstreamResponseHandler: ChannelInboundHandler {
    typealias InboundIn = HTTPClientResponsePart

    enum Event {
        case part(HTTPClientResponsePart)
        /// The end of one read from the upstream socket: time to flush what was relayed.
        case readComplete
        /// The upstream connection can take more of a request body again.
        case writable
        case closed
    }

    var sink: ((Event) -> Void)?
    var closed = false

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        sink?(.part(unwrapInboundIn(data)))
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

/// The HTTP/1.1 front end of an inbound listener: per request, route policy on the verified identity, identity
/// headers (clients' copies removed), forwarding over a pooled upstream connection, access log and metrics.
final class HTTPProxyHandler: ChannelInboundHandler {
    typealias InboundIn = HTTPServerRequestPart
    typealias OutboundOut = HTTPServerResponsePart

    /// Hop-by-hop headers (RFC 9110 7.6.1) never forwarded in either direction.
    static let hopByHop: Set<String> = ["connection", "keep-alive", "proxy-connection", "te", "trailer", "upgrade", "proxy-authenticate", "proxy-authorization"]
    /// Lengths of the hop-by-hop names: response header names of other lengths skip lower-casing entirely.
    static let specialLengths: Set<Int> = Set(hopByHop.map(\.utf8.count))

    let state: any HTTPFront
    let runtime: ProxyRuntime
    let pools: UpstreamPools
    private var exchange: Exchange?
    /// What happens to the exchange's parts: decided by the pure state machine, carried out here.
    private var machine = ExchangeStateMachine()
    private var counters: [String: Counter] = [:]
    private var latency: DurationHistogram
    /// Identity headers, looked up once per connection or stream (the identity does not change within it).
    private var identityHeaders: [(String, String)]?
    /// The connection's verified client: given at construction when the handler is built after the handshake
    /// (HTTP/2 streams, HTTP/1.1 chosen by ALPN), else delivered by ``PeerVerifiedEvent``. Nil means unauthenticated.
    private var peer: VerifiedPeer?

    final class Exchange {
        let head: HTTPRequestHead
        let started = ContinuousClock.now
        let keepAlive: Bool
        var route: String?
        var reason: String
        /// The refusal's stable code, when the proxy answers itself.
        var code: String?
        var closeAfter = false
        var closeHTTP2Connection = false
        var upstream: UpstreamConnection?
        /// Request parts held while the upstream connection is set up.
        var pending: [HTTPClientRequestPart] = []
        var status = 0
        var bytesIn = 0
        var bytesOut = 0

        init(head: HTTPRequestHead, reason: String) {
            self.head = head
            // An HTTP/2 stream (version 2.0 from the stream codec) ends with its stream; the connection stays.
            self.keepAlive = head.version.major >= 2 || head.isKeepAlive
            self.reason = reason
        }
    }

    init(state: any HTTPFront, peer: VerifiedPeer?, runtime: ProxyRuntime, pools: UpstreamPools) {
        self.state = state
        self.peer = peer
        self.runtime = runtime
        self.pools = pools
        self.latency = runtime.metrics.latency(listener: state.name)
    }

    private var loopPool: UpstreamPool?
    /// True while the client's reads are paused because the upstream is not taking the request body.
    private var clientPaused = false

    private func pauseClient(_ context: ChannelHandlerContext) {
        guard !clientPaused else { return }
        clientPaused = true
        try? context.channel.syncOptions?.setOption(ChannelOptions.autoRead, value: false)
    }

    private func resumeClient(_ context: ChannelHandlerContext) {
        guard clientPaused else { return }
        clientPaused = false
        try? context.channel.syncOptions?.setOption(ChannelOptions.autoRead, value: true)
        // A socket channel reads again by itself when autoRead is turned back on; an HTTP/2 stream channel does
        // not (and its peer is waiting for the window update that reading brings), so ask for the read.
        context.read()
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
        context.fireUserInboundEventTriggered(event)
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        let event: ExchangeStateMachine.Event
        let upstreamPart: HTTPClientRequestPart
        switch unwrapInboundIn(data) {
        case .head(let head):
            begin(context: context, head: head)
            return
        case .body(let buffer):
            exchange?.bytesIn += buffer.readableBytes
            event = .body(bytes: buffer.readableBytes)
            upstreamPart = .body(.byteBuffer(buffer))
        case .end(let trailers):
            event = .end
            upstreamPart = .end(trailers)
        }
        guard let exchange else { return }
        switch machine.receive(event) {
        case .hold:
            exchange.pending.append(upstreamPart)
        case .forward(let flush):
            guard let upstream = exchange.upstream else { return }
            if flush { upstream.channel.writeAndFlush(upstreamPart, promise: nil) } else { upstream.channel.write(upstreamPart, promise: nil) }
        case .answer(let status):
            respondDirectly(context: context, exchange: exchange, status: HTTPResponseStatus(statusCode: Int(status)))
        default:
            break  // discarded: the proxy answers this request itself
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
            if let upstream = exchange.upstream {
                upstream.handler.sink = nil
                upstream.channel.close(promise: nil)
            }
            finish(exchange: exchange, status: responseStarted ? exchange.status : 499, reason: "client closed the connection")
        }
        exchange = nil
        context.fireChannelInactive()
    }

    private func begin(context: ChannelHandlerContext, head: HTTPRequestHead) {
        guard machine.state == .idle else {
            // Cannot happen behind NIO's pipelining handler or on an HTTP/2 stream; fail closed if it does.
            if case .closeClient = machine.receive(.head(refusal: nil)) {
                if let upstream = exchange?.upstream {
                    upstream.handler.sink = nil
                    upstream.channel.close(promise: nil)
                }
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
        let decision = state.policy.decide(method: head.method.rawValue, path: target.routingKey, peer: peer)
        switch decision {
        case .unauthenticated(let reason):
            refuse(exchange, Refusal(status: .unauthorized, code: "client_certificate_required", reason: reason))
            return
        case .deny(let reason):
            refuse(exchange, Refusal(status: .forbidden, code: "forbidden", reason: reason))
            return
        case .allow(let route, let by):
            exchange.route = route
            exchange.reason = "allowed by \(by)"
        }
        let forwarded: HTTPHeaders
        switch forwardedHeaders(head.headers, context: context) {
        case .success(let headers): forwarded = headers
        case .failure(let refusal):
            exchange.route = nil
            refuse(exchange, refusal)
            return
        }
        var upstreamHead = HTTPRequestHead(version: .http1_1, method: head.method, uri: target.forwarded)
        upstreamHead.headers = forwarded
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
            upstreamHead.headers.add(name: ForwardedIdentity.identityHeader, value: name)
        }
        guard case .acquireUpstream = machine.receive(.head(refusal: nil)), let pool = loopPool else { return }
        exchange.pending.append(.head(upstreamHead))
        let loopBound = NIOLoopBound((self, context), eventLoop: context.eventLoop)
        pool.acquire { result in
            let (handler, context) = loopBound.value
            handler.upstreamReady(context: context, exchange: exchange, result: result)
        }
    }

    /// Marks the exchange as answered by the proxy; the answer goes out once the request has been read.
    private func refuse(_ exchange: Exchange, _ refusal: Refusal) {
        runtime.metrics.requestRefused(listener: state.name, code: refusal.code)
        if refusal.closesHTTP2Connection { runtime.metrics.connectionClosed(listener: state.name, reason: refusal.code) }
        exchange.reason = refusal.reason
        exchange.code = refusal.code
        exchange.closeAfter = refusal.closeConnection
        exchange.closeHTTP2Connection = refusal.closesHTTP2Connection
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
            if hopByHop.contains(canonical) || named.contains(canonical) { continue }
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
            let loopBound = NIOLoopBound((self, context), eventLoop: context.eventLoop)
            upstream.handler.sink = { event in
                let (handler, context) = loopBound.value
                handler.upstreamEvent(context: context, exchange: exchange, event: event)
            }
            let parts = exchange.pending
            exchange.pending = []
            for part in parts { upstream.channel.write(part, promise: nil) }
            upstream.channel.flush()
            if upstream.channel.isWritable { resumeClient(context) }
        }
    }

    private func upstreamEvent(context: ChannelHandlerContext, exchange: Exchange, event: UpstreamResponseHandler.Event) {
        guard self.exchange === exchange else { return }
        switch event {
        case .part(.head(let head)):
            guard case .relayResponseHead = machine.receive(.responseHead(informational: head.status.code < 200, keepAlive: head.isKeepAlive)) else {
                return  // informational responses are not relayed
            }
            exchange.status = Int(head.status.code)
            var response = HTTPResponseHead(version: exchange.head.version, status: head.status)
            var named = Set<String>()
            for value in head.headers["connection"] {
                for token in value.split(separator: ",") { named.insert(token.trimmingCharacters(in: .whitespaces).lowercased()) }
            }
            for (name, value) in head.headers {
                guard Self.specialLengths.contains(name.utf8.count) || !named.isEmpty else {
                    response.headers.add(name: name, value: value)
                    continue
                }
                let lower = name.lowercased()
                if Self.hopByHop.contains(lower) || named.contains(lower) { continue }
                response.headers.add(name: name, value: value)
            }
            if !exchange.keepAlive { response.headers.replaceOrAdd(name: "connection", value: "close") }
            context.write(wrapOutboundOut(.head(response)), promise: nil)
        case .part(.body(let buffer)):
            guard case .relayResponseBody = machine.receive(.responseBody) else { return }
            exchange.bytesOut += buffer.readableBytes
            context.write(wrapOutboundOut(.body(.byteBuffer(buffer))), promise: nil)
        case .writable:
            perform(machine.receive(.upstreamWritable), context: context, exchange: exchange)
        case .readComplete:
            perform(machine.receive(.responseReadComplete), context: context, exchange: exchange)
        case .part(.end(let trailers)):
            guard case .completeResponse(let reuse) = machine.receive(.responseEnd) else { return }
            resumeClient(context)  // an early answer (say 413) ends the exchange while the body is still coming
            let keepAlive = exchange.keepAlive
            if let upstream = exchange.upstream {
                if reuse { loopPool?.release(upstream) } else {
                    upstream.handler.sink = nil
                    upstream.channel.close(promise: nil)
                }
            }
            self.exchange = nil
            finish(exchange: exchange, status: exchange.status, reason: exchange.reason)
            context.writeAndFlush(wrapOutboundOut(.end(trailers))).assumeIsolated().whenComplete { _ in
                if !keepAlive { context.close(promise: nil) }
            }
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
            if !unreachable {
                exchange.reason = "upstream \(state.upstream.host):\(state.upstream.port) closed the connection before responding"
            }
            if answerNow { respondDirectly(context: context, exchange: exchange, status: .badGateway) }
        case .truncateResponse:
            // Truncated response: the client must not take it as complete.
            resumeClient(context)
            self.exchange = nil
            finish(exchange: exchange, status: exchange.status, reason: "upstream closed mid-response")
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
        var head = HTTPResponseHead(version: exchange.head.version, status: status)
        head.headers.add(name: "content-type", value: "application/json")
        head.headers.add(name: "content-length", value: String(body.utf8.count))
        let isHTTP2 = exchange.head.version.major >= 2
        if (!exchange.keepAlive || exchange.closeAfter) && !isHTTP2 { head.headers.add(name: "connection", value: "close") }
        context.write(wrapOutboundOut(.head(head)), promise: nil)
        context.write(wrapOutboundOut(.body(.byteBuffer(ByteBuffer(string: body)))), promise: nil)
        exchange.bytesOut = body.utf8.count
        finish(exchange: exchange, status: Int(status.code), reason: exchange.reason)
        // On HTTP/2 a refusal ends its stream; only one about the connection itself (an expired certificate) ends
        // the connection.
        let keepAlive = exchange.keepAlive && !(exchange.closeAfter && !isHTTP2)
        let closeParent = exchange.closeHTTP2Connection && isHTTP2
        context.writeAndFlush(wrapOutboundOut(.end(nil))).assumeIsolated().whenComplete { _ in
            // An HTTP/2 stream's refusal that ends the connection (an expired certificate) closes its parent.
            if closeParent { context.channel.parent?.close(promise: nil) }
            guard !keepAlive else { return }
            if isHTTP2 { context.close(promise: nil) } else { HTTP1ConnectionGuard.closeAfterAnswer(context) }
        }
    }

    private func finish(exchange: Exchange, status: Int, reason: String) {
        if let (timers, timerContext) = timers { timers.exchangeFinished(context: timerContext) }
        let elapsed = ContinuousClock.now - exchange.started
        latency.record(elapsed)
        let key = "\(status)|\(exchange.route ?? "none")"
        if let counter = counters[key] {
            counter.increment()
        } else {
            let counter = runtime.metrics.requestCounter(listener: state.name, route: exchange.route ?? "none", status: status)
            counters[key] = counter
            counter.increment()
        }
        guard runtime.accessLog.enabled else { return }
        let peer = self.peer
        let decision: String
        switch status {
        case 400, 405, 431: decision = "bad_request"
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
