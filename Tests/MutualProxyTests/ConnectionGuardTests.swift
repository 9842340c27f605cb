import Foundation
import Logging
import MutualPKI
@testable import MutualProxy
import NIOCore
import NIOEmbedded
import NIOConcurrencyHelpers
import NIOHPACK
import NIOHTTP2
import NIOHTTP1
import NIOSSL
import Testing
import TestSupport
import X509

/// Issue #13, in memory: timers, limits and the HTTP/2 guard, each on an embedded channel with time advanced by hand.
@Suite("Gateway hardening: connection limits and timers (in memory)")
struct ConnectionGuardTests {
    @Test("HTTP/1.1 timer: idle → head → busy → idle; each phase's limit from when it began")
    func timerStateMachine() {
        var limits = ProxyLimits()
        limits.idleTimeout = 60
        limits.requestHeadTimeout = 10
        let t0 = NIODeadline.uptimeNanoseconds(0)
        var timer = HTTP1TimerState(limits: limits, now: t0)
        #expect(timer.checkInterval == .milliseconds(2500))
        #expect(timer.expired(now: t0 + .seconds(59)) == nil)
        #expect(timer.expired(now: t0 + .seconds(60)) == "idle_timeout")
        timer.bytesArrived(now: t0 + .seconds(5))
        timer.bytesArrived(now: t0 + .seconds(12))
        #expect(timer.expired(now: t0 + .seconds(14)) == nil)
        #expect(timer.expired(now: t0 + .seconds(15)) == "request_head_timeout", "more head bytes do not extend the deadline (slowloris)")
        timer.headComplete()
        #expect(timer.expired(now: t0 + .seconds(3600)) == nil, "no limit while the exchange runs")
        timer.bytesArrived(now: t0 + .seconds(3600))
        #expect(timer.phase == .busy, "body bytes while busy change nothing")
        timer.exchangeFinished(now: t0 + .seconds(4000))
        #expect(timer.phase == .idle && timer.expired(now: t0 + .seconds(4059)) == nil && timer.expired(now: t0 + .seconds(4060)) == "idle_timeout")
    }

    @Test("a silent keep-alive connection and a slowly sent request head are closed at their deadlines")
    func http1Timeouts() throws {
        var limits = ProxyLimits()
        limits.idleTimeout = 30
        limits.requestHeadTimeout = 5
        var reasons: [String] = []
        let channel = EmbeddedChannel()
        try channel.pipeline.syncOperations.addHandler(HTTP1ConnectionGuard(limits: limits) { reason, _ in reasons.append(reason) })
        try channel.connect(to: SocketAddress(ipAddress: "127.0.0.1", port: 1)).wait()
        channel.embeddedEventLoop.advanceTime(by: .seconds(29))
        #expect(channel.isActive)
        channel.embeddedEventLoop.advanceTime(by: .seconds(2))  // checked every 1.25 s: closed at 30 s
        #expect(!channel.isActive && reasons == ["idle_timeout"])

        let slow = EmbeddedChannel()
        try slow.pipeline.syncOperations.addHandler(HTTP1ConnectionGuard(limits: limits) { reason, _ in reasons.append(reason) })
        try slow.connect(to: SocketAddress(ipAddress: "127.0.0.1", port: 1)).wait()
        for byte in ("GET / HTTP/1.1\r\nHost: a\r\n" + String(repeating: "X-Slow: 1\r\n", count: 6)).utf8 {
            try slow.writeInbound(ByteBuffer(bytes: [byte]))
            slow.embeddedEventLoop.advanceTime(by: .milliseconds(150))
            if !slow.isActive { break }
        }
        #expect(!slow.isActive, "the head did not finish within 5 s although bytes kept coming")
        #expect(reasons == ["idle_timeout", "request_head_timeout"])
    }

    @Test("connections on one event loop share one timer sweep; each is closed at its own deadline and leaves it")
    func sharedSweep() throws {
        var limits = ProxyLimits()
        limits.idleTimeout = 20
        limits.requestHeadTimeout = 5
        var reasons: [String] = []
        let loop = EmbeddedEventLoop()
        func connection() throws -> EmbeddedChannel {
            let channel = EmbeddedChannel(loop: loop)
            try channel.pipeline.syncOperations.addHandler(HTTP1ConnectionGuard(limits: limits) { reason, _ in reasons.append(reason) })
            try channel.connect(to: SocketAddress(ipAddress: "127.0.0.1", port: 1)).wait()
            return channel
        }
        let idle = try connection()
        let slow = try connection()
        let closedEarly = try connection()
        let sweep = HTTP1TimerSweep.on(loop, interval: HTTP1TimerState(limits: limits, now: loop.now).checkInterval)
        #expect(sweep.count == 3, "one sweep for the loop's connections")
        try slow.writeInbound(ByteBuffer(string: "GET / HTTP/1.1\r\n"))  // a head begins and never ends
        _ = try closedEarly.close().wait()
        #expect(sweep.count == 2, "a closed connection leaves the sweep")
        loop.advanceTime(by: .seconds(6))
        #expect(idle.isActive && !slow.isActive && reasons == ["request_head_timeout"])
        loop.advanceTime(by: .seconds(15))
        #expect(!idle.isActive && reasons == ["request_head_timeout", "idle_timeout"])
        #expect(sweep.count == 0)
    }

    @Test("an HTTP/2 connection without streams is closed after the idle timeout; an open stream keeps it")
    func http2Idle() throws {
        var closed = 0
        let channel = EmbeddedChannel()
        try channel.connect(to: SocketAddress(ipAddress: "127.0.0.1", port: 1)).wait()
        try channel.pipeline.syncOperations.addHandler(HTTP2IdleGuard(idleTimeout: 10) { _ in closed += 1 })
        channel.pipeline.fireUserInboundEventTriggered(NIOHTTP2StreamCreatedEvent(streamID: 1, localInitialWindowSize: nil, remoteInitialWindowSize: nil))
        channel.embeddedEventLoop.advanceTime(by: .seconds(30))
        #expect(channel.isActive && closed == 0)
        channel.pipeline.fireUserInboundEventTriggered(StreamClosedEvent(streamID: 1, reason: nil))
        channel.embeddedEventLoop.advanceTime(by: .seconds(11))
        #expect(!channel.isActive && closed == 1)
    }

    @Test("HTTP/2 request heads: CONNECT, host beside :authority, missing pseudo-headers")
    func http2Guard() {
        func verdict(_ headers: [(String, String)]) -> HTTP2RequestGuard.Verdict { HTTP2RequestGuard.examine(HPACKHeaders(headers)) }
        let base = [(":method", "GET"), (":scheme", "https"), (":path", "/x")]
        guard case .forward(let plain) = verdict(base + [(":authority", "app")]) else { Issue.record("plain refused"); return }
        #expect(plain[":authority"] == ["app"])
        #expect(verdict([(":method", "CONNECT"), (":authority", "evil:443")]) == .refuse(status: 405, code: "connect_not_supported", reason: "CONNECT is not proxied"))
        guard case .refuse(400, "conflicting_host", _) = verdict(base + [(":authority", "app"), ("host", "admin.internal")]) else {
            Issue.record("host overriding :authority was not refused"); return
        }
        guard case .forward(let same) = verdict(base + [(":authority", "app"), ("host", "APP")]) else { Issue.record("same host refused"); return }
        #expect(same["host"].isEmpty, "the duplicate is dropped; :authority is what the backend sees")
        guard case .forward(let hostOnly) = verdict(base + [("host", "app"), ("accept", "*/*")]) else { Issue.record("host-only refused"); return }
        #expect(hostOnly[":authority"] == ["app"] && hostOnly["host"].isEmpty)
        guard case .refuse(400, "duplicate_host", _) = verdict(base + [("host", "a"), ("host", "b")]) else { Issue.record("two hosts"); return }
        guard case .refuse(400, "malformed_request", _) = verdict([(":method", "GET"), (":authority", "a")]) else { Issue.record("no path"); return }
        guard case .refuse(400, "malformed_request", _) = verdict([(":method", "GET"), (":scheme", "https"), (":path", "/")]) else {
            Issue.record("no authority"); return
        }
    }

    @Test("at max-connections a new connection displaces the oldest pre-handshake one; established ones are never displaced")
    func limiter() {
        let limiter = ConnectionLimiter()
        final class Token {}
        let tokens = (0..<4).map { _ in Token() }
        let ids = tokens.map(ObjectIdentifier.init)
        #expect(limiter.admit(ids[0], channel: nil, limit: 2).0 == .admitted)
        #expect(limiter.admit(ids[1], channel: nil, limit: 2).0 == .admitted)
        limiter.established(ids[1])
        #expect(limiter.admit(ids[2], channel: nil, limit: 2).0 == .admittedDisplacing(ids[0]), "the silent socket goes")
        limiter.established(ids[2])
        #expect(limiter.admit(ids[3], channel: nil, limit: 2).0 == .refused, "every slot is an established connection")
        limiter.closed(ids[1])
        #expect(limiter.admit(ids[3], channel: nil, limit: 2).0 == .admitted)
        #expect(limiter.openCount == 2)
        #expect(limiter.shouldWarn(now: TestPKI.now) && !limiter.shouldWarn(now: TestPKI.now.addingTimeInterval(5)))
    }

    @Test("an open connection is closed when its certificate chain expires")
    func expiryClosesOpenConnection() throws {
        let key = try KeyType.p256.generate()
        var extensions = Certificate.Extensions()
        try extensions.append(Certificate.Extension(ExtendedKeyUsage([.clientAuth]), critical: false))
        let leaf = try TestPKI.certificate(subject: "c", issuer: nil, issuerKey: key, publicKey: key.publicKey,
                                           notAfter: TestPKI.now.addingTimeInterval(120), extensions: extensions)
        let identity = try VerifiedPeer(validatedChain: [leaf])
        let registry = ConnectionRegistry()
        let channel = EmbeddedChannel()
        try channel.connect(to: SocketAddress(ipAddress: "127.0.0.1", port: 1)).wait()
        let expired = NIOLockedValueBox(false)
        registry.register(channel, identity: identity, now: TestPKI.now) { expired.withLockedValue { $0 = true } }
        #expect(registry.count == 1)
        channel.embeddedEventLoop.advanceTime(by: .seconds(119))
        #expect(channel.isActive)
        channel.embeddedEventLoop.advanceTime(by: .seconds(2))
        #expect(!channel.isActive && expired.withLockedValue { $0 })
        #expect(registry.count == 0)
    }

    @Test("the ClientHello's supported groups are read from a real NIO TLS client's first flight")
    func clientHelloGroups() throws {
        for groups in [[NIOTLSCurve.x25519, .x25519_MLKEM768], [.secp256r1], [.x25519_MLKEM768, .x25519]] {
            var tls = TLSConfiguration.makeClientConfiguration()
            tls.curves = groups
            tls.certificateVerification = .none
            let client = EmbeddedChannel()
            try client.pipeline.syncOperations.addHandler(try NIOSSLClientHandler(context: NIOSSLContext(configuration: tls), serverHostname: "a.test"))
            try client.connect(to: SocketAddress(ipAddress: "127.0.0.1", port: 1)).wait()
            var hello = ByteBuffer()
            while var part = try client.readOutbound(as: ByteBuffer.self) { hello.writeBuffer(&part) }
            #expect(ClientHelloGroups.parse(hello.readableBytesView) == .groups(groups.map(\.rawValue)))
            let bytes = Array(hello.readableBytesView)
            #expect(ClientHelloGroups.parse(bytes.prefix(40)) == .needMoreBytes, "truncated: wait for more")
            _ = try? client.finish()
        }
        #expect(ClientHelloGroups.parse(Array("GET / HTTP/1.1\r\n".utf8)) == .notAClientHello)
        #expect(ClientHelloGroups.parse([22, 3, 1, 0, 4, 1, 0, 0, 99]) == .notAClientHello, "hello length beyond the record")
        #expect(ClientHelloGroups.parse([22, 3, 1, 0, 5, 1, 0, 0, 1, 3]) == .notAClientHello, "garbage body")
    }

    @Test("a connection does not keep its finished verification task (it held ~40 KiB per idle connection)")
    func verificationTaskReleased() async {
        let connection = ConnectionIdentity()
        let gate = AsyncStream<Void>.makeStream()
        let task = Task {
            for await _ in gate.stream { break }
        }
        connection.track(task)
        #expect(connection.holdsVerificationTask, "kept while it runs, so a closing connection can cancel it")
        gate.continuation.yield()
        await task.value
        connection.set(.failure(VerificationFailure(.unknownCA, "x")))
        #expect(!connection.holdsVerificationTask)
        // A task that finished before it was tracked is not kept either.
        let late = ConnectionIdentity()
        late.set(.failure(VerificationFailure(.unknownCA, "x")))
        late.track(Task {})
        #expect(!late.holdsVerificationTask)
    }
}

@Suite("Alerts a client sends, in words (no sockets)")
struct ClientAlertTests {
    @Test("each alert about our side becomes client_aborted with a sentence; unreadable alert records too; others are not taken for alerts")
    func alerts() {
        for code in ["TLSV1_ALERT_UNKNOWN_CA", "SSLV3_ALERT_BAD_CERTIFICATE", "SSLV3_ALERT_CERTIFICATE_EXPIRED", "SSLV3_ALERT_CERTIFICATE_UNKNOWN",
                     "SSLV3_ALERT_UNSUPPORTED_CERTIFICATE", "SSLV3_ALERT_CERTIFICATE_REVOKED", "TLSV1_ALERT_DECRYPT_ERROR",
                     "TLSV1_ALERT_PROTOCOL_VERSION", "SSLV3_ALERT_HANDSHAKE_FAILURE", "BAD_PACKET_LENGTH", "DECRYPTION_FAILED_OR_BAD_RECORD_MAC"] {
            let failure = HandshakeObserver.clientAlert([code])
            #expect(failure?.kind == .clientAborted, "\(code)")
            #expect(failure?.reason.hasPrefix("client aborted: ") == true, "\(code)")
        }
        #expect(HandshakeObserver.clientAlert(["PEER_DID_NOT_RETURN_A_CERTIFICATE"]) == nil)
        #expect(HandshakeObserver.clientAlert([]) == nil)
        #expect(HandshakeObserver.reasonCodes("a:OPENSSL_internal:ONE at x, b:OPENSSL_internal:TWO at y") == ["ONE", "TWO"])
    }
}
