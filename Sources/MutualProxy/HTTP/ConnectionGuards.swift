import Foundation
import NIOCore
import NIOHPACK
import NIOHTTP1
import NIOHTTP2
import Synchronization

/// Time limits of one HTTP/1.1 connection, as a value: events in, a verdict when asked. Tested without a channel.
///
/// - `idle`: no request in flight; the connection may wait `idleTimeout` for the next request's first byte.
/// - `receivingHead`: bytes of a request head have arrived; the whole head must be in within `requestHeadTimeout`.
/// - `busy`: a request is being handled (body streaming, upstream answering); no limit here.
///
/// Events only note the phase and when it began (no timer is touched per request: re-arming NIO timers on every
/// request cost about a tenth of the proxy's CPU under keep-alive load). A periodic check (``checkInterval``) asks
/// ``expired(now:)``, so a timeout fires at most a quarter of the shorter timeout late.
struct HTTP1TimerState: Equatable {
    enum Phase: Equatable { case idle, receivingHead, busy }

    private(set) var phase: Phase = .idle
    private(set) var since: NIODeadline
    let limits: ProxyLimits

    init(limits: ProxyLimits, now: NIODeadline) {
        self.limits = limits
        self.since = now
    }

    /// Bytes arrived from the client: in `idle`, a request head has started.
    mutating func bytesArrived(now: NIODeadline) {
        guard phase == .idle else { return }
        phase = .receivingHead
        since = now
    }

    mutating func headComplete() { phase = .busy }

    mutating func exchangeFinished(now: NIODeadline) {
        guard phase == .busy else { return }
        phase = .idle
        since = now
    }

    /// The timeout that has passed at `now`, by its code, or nil.
    func expired(now: NIODeadline) -> String? {
        switch phase {
        case .idle: now - since >= Self.amount(limits.idleTimeout) ? "idle_timeout" : nil
        case .receivingHead: now - since >= Self.amount(limits.requestHeadTimeout) ? "request_head_timeout" : nil
        case .busy: nil
        }
    }

    /// How often a connection's timeouts are checked: a quarter of the shorter one.
    var checkInterval: TimeAmount { Self.amount(min(limits.idleTimeout, limits.requestHeadTimeout) / 4) }

    static func amount(_ seconds: Double) -> TimeAmount { .nanoseconds(Int64(seconds * 1e9)) }
}

/// Enforces ``HTTP1TimerState`` on a channel (it sits between TLS and the HTTP decoder, seeing raw bytes), and closes
/// a connection after its final answer without losing that answer (``closeAfterDraining(context:)``).
final class HTTP1ConnectionGuard: ChannelDuplexHandler, RemovableChannelHandler {
    typealias InboundIn = ByteBuffer
    typealias InboundOut = ByteBuffer
    typealias OutboundIn = ByteBuffer
    typealias OutboundOut = ByteBuffer

    private let limits: ProxyLimits
    private var timer: HTTP1TimerState?
    /// The event loop's sweep that checks this connection's timers (one repeating task per loop, not per connection).
    private var sweep: HTTP1TimerSweep?
    private var scheduled: Scheduled<Void>?
    private let onTimeout: (String, ChannelHandlerContext) -> Void

    /// `onTimeout` gets the reason (`idle_timeout`, `request_head_timeout`) before the connection is closed.
    init(limits: ProxyLimits, onTimeout: @escaping (String, ChannelHandlerContext) -> Void) {
        self.limits = limits
        self.onTimeout = onTimeout
    }

    func handlerAdded(context: ChannelHandlerContext) {
        if context.channel.isActive { start(context: context) }
    }

    func handlerRemoved(context: ChannelHandlerContext) {
        sweep?.remove(self)
        sweep = nil
        scheduled?.cancel()
    }

    func channelActive(context: ChannelHandlerContext) {
        start(context: context)
        context.fireChannelActive()
    }

    func channelInactive(context: ChannelHandlerContext) {
        sweep?.remove(self)
        sweep = nil
        scheduled?.cancel()
        scheduled = nil
        context.fireChannelInactive()
    }

    private func start(context: ChannelHandlerContext) {
        guard timer == nil else { return }
        let state = HTTP1TimerState(limits: limits, now: context.eventLoop.now)
        timer = state
        let sweep = HTTP1TimerSweep.on(context.eventLoop, interval: state.checkInterval)
        sweep.add(self, context: context)
        self.sweep = sweep
    }

    /// Called by the sweep: the timeout that has passed, if any (none while an answer drains).
    func expired(now: NIODeadline) -> String? {
        guard drainUntil == nil else { return nil }
        return timer?.expired(now: now)
    }

    /// Called by the sweep when ``expired(now:)`` named a timeout.
    func timedOut(_ reason: String, context: ChannelHandlerContext) {
        sweep = nil
        onTimeout(reason, context)
        context.close(promise: nil)
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        if let drainUntil {
            // The answer is out; what the client still sends is read and dropped so that closing does not reset the
            // connection (a reset can destroy the answer before the client reads it).
            armDrain(context: context, hardDeadline: drainUntil)
            return
        }
        if timer?.phase == .idle { timer?.bytesArrived(now: context.eventLoop.now) }
        context.fireChannelRead(data)
    }

    /// When draining: the time the connection is closed at the latest.
    private var drainUntil: NIODeadline?
    static let drainQuiet = TimeAmount.milliseconds(300)
    static let drainLimit = TimeAmount.seconds(3)

    /// Closes the connection after its final answer, like nginx's lingering close: input is read and dropped until
    /// the client has been quiet for 300 ms (at most 3 s), then the connection closes.
    func closeAfterDraining(context: ChannelHandlerContext) {
        guard drainUntil == nil else { return }
        let until = context.eventLoop.now + Self.drainLimit
        drainUntil = until
        armDrain(context: context, hardDeadline: until)
    }

    private func armDrain(context: ChannelHandlerContext, hardDeadline: NIODeadline) {
        scheduled?.cancel()
        let at = min(context.eventLoop.now + Self.drainQuiet, hardDeadline)
        let loopBound = NIOLoopBound(context, eventLoop: context.eventLoop)
        scheduled = context.eventLoop.scheduleTask(deadline: at) { loopBound.value.close(promise: nil) }
    }

    /// Called by the proxy handler on the same event loop.
    func headComplete(context: ChannelHandlerContext) {
        timer?.headComplete()
    }

    func exchangeFinished(context: ChannelHandlerContext) {
        timer?.exchangeFinished(now: context.eventLoop.now)
    }

    /// Closes a connection after a final answer: through the guard's drain when the pipeline has one, else at once.
    static func closeAfterAnswer(_ context: ChannelHandlerContext) {
        if let guardContext = try? context.pipeline.syncOperations.context(handlerType: HTTP1ConnectionGuard.self),
           let handler = guardContext.handler as? HTTP1ConnectionGuard {
            handler.closeAfterDraining(context: guardContext)
        } else {
            context.close(promise: nil)
        }
    }
}

/// Checks the HTTP/1.1 connections of one event loop for their timeouts: one repeating task per loop (and check
/// interval) instead of one per connection, which cost about 0.8 KiB of memory per idle connection (a `RepeatedTask`,
/// its closure and its scheduled task). Lives on its loop; connections register on their loop.
final class HTTP1TimerSweep: @unchecked Sendable {
    private struct Key: Hashable {
        let loop: ObjectIdentifier
        let interval: Int64
    }

    /// One sweep per loop and interval (listeners with other timeouts get their own); never removed: a few per loop.
    private static let sweeps = Mutex<[Key: HTTP1TimerSweep]>([:])

    static func on(_ loop: any EventLoop, interval: TimeAmount) -> HTTP1TimerSweep {
        sweeps.withLock { sweeps in
            let key = Key(loop: ObjectIdentifier(loop), interval: interval.nanoseconds)
            if let sweep = sweeps[key] { return sweep }
            let sweep = HTTP1TimerSweep(loop: loop, interval: interval)
            sweeps[key] = sweep
            return sweep
        }
    }

    let loop: any EventLoop
    let interval: TimeAmount
    private var connections: [ObjectIdentifier: (HTTP1ConnectionGuard, ChannelHandlerContext)] = [:]
    private var task: RepeatedTask?

    private init(loop: any EventLoop, interval: TimeAmount) {
        self.loop = loop
        self.interval = interval
    }

    var count: Int {
        loop.preconditionInEventLoop()
        return connections.count
    }

    func add(_ handler: HTTP1ConnectionGuard, context: ChannelHandlerContext) {
        loop.preconditionInEventLoop()
        connections[ObjectIdentifier(handler)] = (handler, context)
        guard task == nil else { return }
        task = loop.scheduleRepeatedTask(initialDelay: interval, delay: interval) { [self] _ in tick() }
    }

    func remove(_ handler: HTTP1ConnectionGuard) {
        loop.preconditionInEventLoop()
        connections[ObjectIdentifier(handler)] = nil
        if connections.isEmpty {
            task?.cancel()
            task = nil
        }
    }

    private func tick() {
        let now = loop.now
        var expired: [(HTTP1ConnectionGuard, ChannelHandlerContext, String)] = []
        for (handler, context) in connections.values {
            if let reason = handler.expired(now: now) { expired.append((handler, context, reason)) }
        }
        for (handler, context, reason) in expired {
            remove(handler)
            handler.timedOut(reason, context: context)
        }
    }
}

/// Closes an HTTP/2 connection that has had no open stream for `idleTimeout` seconds (NIOHTTP2 reports streams
/// opening and closing as user events on the connection channel).
final class HTTP2IdleGuard: ChannelInboundHandler, RemovableChannelHandler {
    typealias InboundIn = NIOAny
    private let idleTimeout: TimeAmount
    private let onTimeout: (ChannelHandlerContext) -> Void
    private var open = 0
    private var idleSince = NIODeadline.distantFuture
    private var check: RepeatedTask?

    init(idleTimeout: Double, onTimeout: @escaping (ChannelHandlerContext) -> Void) {
        self.idleTimeout = HTTP1TimerState.amount(idleTimeout)
        self.onTimeout = onTimeout
    }

    /// Checked a quarter of the timeout apart (no timer is touched as streams open and close).
    func handlerAdded(context: ChannelHandlerContext) {
        idleSince = context.eventLoop.now
        let interval = HTTP1TimerState.amount(Double(idleTimeout.nanoseconds) / 4e9)
        let loopBound = NIOLoopBound((self, context), eventLoop: context.eventLoop)
        check = context.eventLoop.scheduleRepeatedTask(initialDelay: interval, delay: interval) { task in
            let (handler, context) = loopBound.value
            guard handler.open == 0, context.eventLoop.now - handler.idleSince >= handler.idleTimeout else { return }
            task.cancel()
            handler.onTimeout(context)
            context.close(promise: nil)
        }
    }

    func handlerRemoved(context: ChannelHandlerContext) { check?.cancel() }

    func channelInactive(context: ChannelHandlerContext) {
        check?.cancel()
        context.fireChannelInactive()
    }

    func userInboundEventTriggered(context: ChannelHandlerContext, event: Any) {
        if event is NIOHTTP2StreamCreatedEvent {
            open += 1
        } else if event is StreamClosedEvent {
            open = max(0, open - 1)
            if open == 0 { idleSince = context.eventLoop.now }
        }
        context.fireUserInboundEventTriggered(event)
    }
}

/// The first look at an HTTP/2 request stream, before NIO's HTTP/2-to-HTTP/1 codec: what the codec would mishandle
/// gets an explicit answer here.
///
/// - `CONNECT` (which has no `:path`; the codec fails the stream without a response) → 405 `connect_not_supported`;
/// - a `host` field beside `:authority` (the codec would let `host` win) → removed when it names the same
///   authority, 400 `conflicting_host` when it does not; several `host` fields → 400 `duplicate_host`;
/// - no `:authority` but one `host` → the host becomes `:authority`;
/// - a missing `:method`, `:scheme`, `:path` or authority → 400 `malformed_request`.
final class HTTP2RequestGuard: ChannelDuplexHandler, RemovableChannelHandler {
    typealias InboundIn = HTTP2Frame.FramePayload
    typealias InboundOut = HTTP2Frame.FramePayload
    typealias OutboundIn = HTTP2Frame.FramePayload
    typealias OutboundOut = HTTP2Frame.FramePayload

    private var refused = false
    private var sawHeaders = false
    let onRefusal: (String, Int) -> Void

    init(onRefusal: @escaping (String, Int) -> Void) { self.onRefusal = onRefusal }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        if refused { return }
        guard !sawHeaders, case .headers(var frame) = unwrapInboundIn(data) else {
            context.fireChannelRead(data)
            return
        }
        sawHeaders = true
        switch Self.examine(frame.headers) {
        case .forward(let headers):
            frame.headers = headers
            context.fireChannelRead(wrapInboundOut(.headers(frame)))
        case .refuse(let status, let code, let reason):
            refused = true
            onRefusal(code, status)
            let body = "{\"error\":\"\(code)\",\"reason\":\(AccessLog.quote(reason))}\n"
            let headers = HPACKHeaders([
                (":status", String(status)), ("content-type", "application/json"), ("content-length", String(body.utf8.count)),
            ])
            context.write(wrapOutboundOut(.headers(.init(headers: headers))), promise: nil)
            context.writeAndFlush(wrapOutboundOut(.data(.init(data: .byteBuffer(ByteBuffer(string: body)), endStream: true))), promise: nil)
        }
    }

    enum Verdict: Equatable {
        case forward(HPACKHeaders)
        case refuse(status: Int, code: String, reason: String)
    }

    /// The decision on a request's header block; pure, for tests.
    static func examine(_ headers: HPACKHeaders) -> Verdict {
        let methods = headers[":method"]
        guard methods.count == 1 else {
            return .refuse(status: 400, code: "malformed_request", reason: "an HTTP/2 request needs exactly one :method")
        }
        if methods[0] == "CONNECT" {
            return .refuse(status: 405, code: "connect_not_supported", reason: "CONNECT is not proxied")
        }
        let hosts = headers["host"]
        let authorities = headers[":authority"]
        if hosts.count > 1 || authorities.count > 1 {
            return .refuse(status: 400, code: "duplicate_host", reason: "the request carries more than one host or :authority")
        }
        var result = headers
        if let host = hosts.first {
            if let authority = authorities.first {
                guard authority.lowercased() == host.lowercased() else {
                    return .refuse(status: 400, code: "conflicting_host", reason: "the host field (\(host.prefix(100))) differs from :authority (\(authority.prefix(100))) (RFC 9113 8.3.1)")
                }
                result.remove(name: "host")
            } else {
                // RFC 9113 8.3.1: a request without :authority may carry Host; the codec wants :authority.
                var rebuilt = HPACKHeaders()
                var placed = false
                for (name, value, indexing) in headers where name != "host" {
                    if !placed && !name.hasPrefix(":") {
                        rebuilt.add(name: ":authority", value: host)
                        placed = true
                    }
                    rebuilt.add(name: name, value: value, indexing: indexing)
                }
                if !placed { rebuilt.add(name: ":authority", value: host) }
                result = rebuilt
            }
        } else if authorities.isEmpty {
            return .refuse(status: 400, code: "malformed_request", reason: "an HTTP/2 request needs :authority or host")
        }
        guard result[":scheme"].count == 1, result[":path"].count == 1 else {
            return .refuse(status: 400, code: "malformed_request", reason: "an HTTP/2 request needs exactly one :scheme and :path")
        }
        return .forward(result)
    }
}
