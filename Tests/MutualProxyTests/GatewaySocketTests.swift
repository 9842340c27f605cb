import Foundation
import Logging
import MutualPKI
@testable import MutualProxy
import NIOConcurrencyHelpers
import NIOCore
import NIOHTTP1
import NIOPosix
import NIOSSL
import ServiceLifecycle
import Testing
import TestSupport
import X509

/// Issue #13 over real sockets on 127.0.0.1: the attacks that need a TLS peer, each while a good client is served.
@Suite("Gateway hardening over real sockets", .serialized)
struct GatewaySocketTests {
    /// An upstream that answers 200 with the request target it received.
    final class EchoUpstream: ChannelInboundHandler, Sendable {
        typealias InboundIn = HTTPServerRequestPart
        typealias OutboundOut = HTTPServerResponsePart
        func channelRead(context: ChannelHandlerContext, data: NIOAny) {
            guard case .head(let head) = unwrapInboundIn(data) else {
                if case .end = unwrapInboundIn(data) {} else { return }
                return
            }
            let body = head.uri
            var response = HTTPResponseHead(version: .http1_1, status: .ok)
            response.headers.add(name: "content-length", value: String(body.utf8.count))
            context.write(wrapOutboundOut(.head(response)), promise: nil)
            context.write(wrapOutboundOut(.body(.byteBuffer(ByteBuffer(string: body)))), promise: nil)
            context.writeAndFlush(wrapOutboundOut(.end(nil)), promise: nil)
        }
    }

    struct Fixture {
        let directory: String
        let server: ProxyServer
        let upstream: any Channel
        let port: Int
        let ca: IssuingCA
        let good: (chain: [Certificate], key: Certificate.PrivateKey)

        func stop() async {
            await server.shutdown()
            try? await upstream.close()
            try? FileManager.default.removeItem(atPath: directory)
        }

        func metric(_ name: String, _ labels: String) -> Double {
            let text = String(decoding: server.runtime.metrics.render(), as: UTF8.self)
            for line in text.split(separator: "\n") where line.hasPrefix(name + "{") && line.contains(labels) {
                return Double(line.split(separator: " ").last ?? "0") ?? 0
            }
            return 0
        }
    }

    static func start(watchInterval: Double? = nil, _ adjust: (inout ProxyConfiguration.Listener) -> Void = { _ in }) async throws -> Fixture {
        let ca = try TestPKI.issuingCA(now: Date())
        let directory = TestPKI.temporaryDirectory("gateway")
        let serverKey = try KeyType.p256.generate()
        let serverCert = try ca.issue(.init(profile: .server, publicKey: serverKey.publicKey, dnsNames: ["localhost"], ipAddresses: ["127.0.0.1"]), now: Date())
        let clientKey = try KeyType.p256.generate()
        let clientCert = try ca.issue(.init(profile: .workload, publicKey: clientKey.publicKey, uris: ["spiffe://example.org/ns/web/sa/api"]), now: Date())
        try PEMBundle.pem([serverCert, ca.certificate]).write(toFile: directory + "/server.pem", atomically: true, encoding: .utf8)
        try KeyFile.pem(for: serverKey, passphrase: nil).write(toFile: directory + "/server.key", atomically: true, encoding: .utf8)
        try PEMBundle.pem([ca.root]).write(toFile: directory + "/roots.pem", atomically: true, encoding: .utf8)
        let upstream = try await ServerBootstrap(group: MultiThreadedEventLoopGroup.singleton)
            .childChannelInitializer { channel in
                channel.eventLoop.makeCompletedFuture {
                    try channel.pipeline.syncOperations.configureHTTPServerPipeline()
                    try channel.pipeline.syncOperations.addHandler(EchoUpstream())
                }
            }
            .bind(host: "127.0.0.1", port: 0).get()
        var listener = ProxyConfiguration.Listener(
            name: "inbound", listen: "127.0.0.1:0", upstream: "http://127.0.0.1:\(upstream.localAddress!.port!)",
            cert: directory + "/server.pem", key: directory + "/server.key", clientCA: directory + "/roots.pem",
            allow: ["spiffe://example.org/ns/web/*", "spiffe://lattice.test/x"]
        )
        adjust(&listener)
        let server = try ProxyServer(
            configuration: ProxyConfiguration(listeners: [listener], accessLog: "off", watchInterval: watchInterval, drainTimeout: 0),
            logger: Logger(label: "test", factory: { _ in SwiftLogNoOpLogHandler() })
        )
        try await server.start()
        let port = try #require(server.boundAddresses["inbound"]?.port)
        return Fixture(directory: directory, server: server, upstream: upstream, port: port, ca: ca, good: ([clientCert, ca.certificate], clientKey))
    }

    /// Collects a response's status and body, or the error that ended the connection.
    final class ResponseCatcher: ChannelInboundHandler, Sendable {
        typealias InboundIn = HTTPClientResponsePart
        let promise: EventLoopPromise<(Int, String)>
        private let state = NIOLockedValueBox<(Int, String)>((0, ""))
        init(promise: EventLoopPromise<(Int, String)>) { self.promise = promise }
        func channelRead(context: ChannelHandlerContext, data: NIOAny) {
            switch unwrapInboundIn(data) {
            case .head(let head): state.withLockedValue { $0.0 = Int(head.status.code) }
            case .body(let buffer): state.withLockedValue { $0.1 += String(buffer: buffer) }
            case .end: promise.succeed(state.withLockedValue { $0 })
            }
        }
        func errorCaught(context: ChannelHandlerContext, error: any Error) { promise.fail(error) }
        func channelInactive(context: ChannelHandlerContext) { promise.fail(ChannelError.eof) }
    }

    /// Records the group a server selected: the key_share of its ServerHello or HelloRetryRequest (RFC 8446 4.2.8),
    /// read from the plaintext records before the TLS handler sees them.
    final class ServerGroupObserver: ChannelInboundHandler, Sendable {
        typealias InboundIn = ByteBuffer
        typealias InboundOut = ByteBuffer
        let groups = NIOLockedValueBox<[UInt16]>([])
        private let seen = NIOLockedValueBox<[UInt8]>([])
        func channelRead(context: ChannelHandlerContext, data: NIOAny) {
            let buffer = unwrapInboundIn(data)
            seen.withLockedValue { bytes in
                bytes += buffer.readableBytesView
                while bytes.count >= 5 {
                    let length = Int(bytes[3]) << 8 | Int(bytes[4])
                    guard bytes.count >= 5 + length else { break }
                    if bytes[0] == 22, length > 4, bytes[5] == 2, let group = Self.keyShareGroup(Array(bytes[9..<(5 + length)])) {
                        groups.withLockedValue { $0.append(group) }
                    }
                    bytes.removeFirst(5 + length)
                }
            }
            context.fireChannelRead(data)
        }

        static func keyShareGroup(_ hello: [UInt8]) -> UInt16? {
            var index = 2 + 32
            guard index < hello.count else { return nil }
            index += 1 + Int(hello[index]) + 2 + 1
            guard index + 2 <= hello.count else { return nil }
            let end = index + 2 + (Int(hello[index]) << 8 | Int(hello[index + 1]))
            index += 2
            while index + 4 <= min(end, hello.count) {
                let type = Int(hello[index]) << 8 | Int(hello[index + 1])
                let size = Int(hello[index + 2]) << 8 | Int(hello[index + 3])
                if type == 0x33, size >= 2 { return UInt16(hello[index + 4]) << 8 | UInt16(hello[index + 5]) }
                index += 4 + size
            }
            return nil
        }
    }

    static func tls(_ fixture: Fixture, chain: [Certificate], key: Certificate.PrivateKey, groups: [NIOTLSCurve]? = nil) throws -> NIOSSLContext {
        var tls = TLSConfiguration.makeClientConfiguration()
        if let groups { tls.curves = groups }
        tls.trustRoots = .certificates([try NIOSSLCertificate(bytes: try fixture.ca.root.derBytes, format: .der)])
        tls.certificateChain = try chain.map { .certificate(try NIOSSLCertificate(bytes: try $0.derBytes, format: .der)) }
        tls.privateKey = .privateKey(try NIOSSLPrivateKey(bytes: Array(try KeyFile.pem(for: key, passphrase: nil).utf8), format: .pem))
        return try NIOSSLContext(configuration: tls)
    }

    /// One HTTP/1.1 request; the status and body, or the error.
    static func request(
        _ fixture: Fixture, context: NIOSSLContext, path: String = "/hello", headers: [(String, String)] = [("host", "localhost")],
        observer: ServerGroupObserver? = nil
    ) async throws -> (Int, String) {
        let loop = MultiThreadedEventLoopGroup.singleton.next()
        let promise = loop.makePromise(of: (Int, String).self)
        let channel = try await ClientBootstrap(group: loop)
            .channelInitializer { channel in
                channel.eventLoop.makeCompletedFuture {
                    if let observer { try channel.pipeline.syncOperations.addHandler(observer) }
                    try channel.pipeline.syncOperations.addHandler(try NIOSSLClientHandler(context: context, serverHostname: "localhost"))
                    try channel.pipeline.syncOperations.addHTTPClientHandlers()
                    try channel.pipeline.syncOperations.addHandler(ResponseCatcher(promise: promise))
                }
            }
            .connect(host: "127.0.0.1", port: fixture.port).get()
        defer { channel.close(promise: nil) }
        let head = HTTPRequestHead(version: .http1_1, method: .GET, uri: path, headers: HTTPHeaders(headers))
        channel.write(HTTPClientRequestPart.head(head), promise: nil)
        try await channel.writeAndFlush(HTTPClientRequestPart.end(nil)).get()
        return try await promise.futureResult.get()
    }

    @Test("a lattice of intermediates is refused as chain_too_complex, with bounded work, while a good client is served")
    func latticeClient() async throws {
        let fixture = try await Self.start { $0.maxDepth = 8 }
        let attackerKey = try KeyType.p256.generate()
        let (leaf, lattice) = try TestPKI.lattice(subjects: 8, perSubject: 4, leafKey: attackerKey, now: Date())
        // The chain sent is the whole lattice (33 certificates): longer than max-depth allows, refused before building.
        let attacker = try Self.tls(fixture, chain: [leaf] + lattice, key: attackerKey)
        // And one within the length bound (10 certificates), which takes the bounded search and finds no root.
        let shorter = try Self.tls(fixture, chain: [leaf] + lattice.prefix(9), key: attackerKey)
        let goodTLS = try Self.tls(fixture, chain: fixture.good.chain, key: fixture.good.key)
        let cpuBefore = ProcessCPU.seconds()
        try await withThrowingTaskGroup(of: Void.self) { group in
            for index in 0..<8 {
                group.addTask {
                    await #expect(throws: (any Error).self) { _ = try await Self.request(fixture, context: index % 2 == 0 ? attacker : shorter) }
                }
            }
            for _ in 0..<4 {
                group.addTask {
                    let (status, body) = try await Self.request(fixture, context: goodTLS)
                    #expect(status == 200 && body == "/hello")
                }
            }
            try await group.waitForAll()
        }
        let cpu = ProcessCPU.seconds() - cpuBefore
        #expect(fixture.metric("mutual_proxy_handshakes_total", "reason=\"chain_too_complex\"") == 4)
        #expect(fixture.metric("mutual_proxy_handshakes_total", "reason=\"unknown_ca\"") == 4)
        // Bound: 8 refused handshakes with at most 64 signature checks each, 4 good ones, and both ends of TLS in
        // this process. Unbounded, one such handshake took seconds.
        #expect(cpu < 8, "the attack cost \(cpu) s of CPU")
        await fixture.stop()
    }

    @Test("one lifecycle: in a ServiceGroup the proxy watches its files; graceful shutdown ends that work, drains and closes the listener")
    func serviceLifecycle() async throws {
        let fixture = try await Self.start(watchInterval: 0.05)
        let group = ServiceGroup(configuration: .init(services: [fixture.server], logger: Logger(label: "test", factory: { _ in SwiftLogNoOpLogHandler() })))
        try await withThrowingTaskGroup(of: Void.self) { tasks in
            tasks.addTask { try await group.run() }
            // The file watcher is a child of run(): a certificate file replaced (new inode) is reloaded.
            let certificate = URL(fileURLWithPath: fixture.directory + "/server.pem")
            let bytes = try Data(contentsOf: certificate)
            try FileManager.default.removeItem(at: certificate)
            try bytes.write(to: certificate)
            var reloaded = false
            for _ in 0..<300 where !reloaded {
                reloaded = fixture.metric("mutual_proxy_last_reload_success_timestamp_seconds", "listener=\"inbound\"") > 0
                if !reloaded { try await Task.sleep(for: .milliseconds(10)) }
            }
            #expect(reloaded, "the watcher did not run under the service group")
            let (status, _) = try await Self.request(fixture, context: try Self.tls(fixture, chain: fixture.good.chain, key: fixture.good.key))
            #expect(status == 200)
            await group.triggerGracefulShutdown()
            try await tasks.waitForAll()
        }
        // run() returned after draining: nothing listens any more.
        let late = try? await ClientBootstrap(group: MultiThreadedEventLoopGroup.singleton).connect(host: "127.0.0.1", port: fixture.port).get()
        #expect(late == nil)
        try? await late?.close()
        try? await fixture.upstream.close()
        try? FileManager.default.removeItem(atPath: fixture.directory)
    }

    @Test("a client listing x25519 before X25519MLKEM768 gets X25519MLKEM768; a classical-only client still connects")
    func serverGroupPreference() async throws {
        let fixture = try await Self.start()
        for (groups, expected) in [([NIOTLSCurve.x25519, .x25519_MLKEM768], NIOTLSCurve.x25519_MLKEM768), ([.secp256r1, .x25519], .secp256r1)] {
            let observer = ServerGroupObserver()
            let context = try Self.tls(fixture, chain: fixture.good.chain, key: fixture.good.key, groups: groups)
            let (status, _) = try await Self.request(fixture, context: context, observer: observer)
            #expect(status == 200)
            #expect(observer.groups.withLockedValue { $0 }.last == expected.rawValue, "\(groups) → \(observer.groups.withLockedValue { $0 })")
        }
        await fixture.stop()
    }

    @Test("Ed25519, P-384 and RSA client certificates, which mutual issues, authenticate")
    func everyKeyTypeAuthenticates() async throws {
        let fixture = try await Self.start()
        for keyType in [KeyType.ed25519, .p384, .rsa2048] {
            let key = try keyType.generate()
            let leaf = try fixture.ca.issue(.init(profile: .workload, publicKey: key.publicKey, uris: ["spiffe://example.org/ns/web/sa/\(keyType)"]), now: Date())
            let context = try Self.tls(fixture, chain: [leaf, fixture.ca.certificate], key: key)
            let (status, _) = try await Self.request(fixture, context: context)
            #expect(status == 200, "\(keyType)")
        }
        await fixture.stop()
    }

    @Test("silent sockets at max-connections are displaced, so a good client is still served; the metric counts them")
    func idleSocketsAtTheLimit() async throws {
        let fixture = try await Self.start { $0.maxConnections = 8 }
        var silent: [any Channel] = []
        for _ in 0..<24 {
            let channel = try await ClientBootstrap(group: MultiThreadedEventLoopGroup.singleton)
                .channelInitializer { $0.eventLoop.makeSucceededVoidFuture() }
                .connect(host: "127.0.0.1", port: fixture.port).get()
            silent.append(channel)
        }
        let goodTLS = try Self.tls(fixture, chain: fixture.good.chain, key: fixture.good.key)
        for _ in 0..<3 {
            let (status, _) = try await Self.request(fixture, context: goodTLS)
            #expect(status == 200)
        }
        #expect(fixture.metric("mutual_proxy_connections_closed_total", "reason=\"displaced\"") >= 16)
        #expect(fixture.server.inboundState(named: "inbound")?.limits.maxConnections == 8)
        for channel in silent { channel.close(promise: nil) }
        await fixture.stop()
    }

    @Test("a socket that never starts its handshake is closed at the handshake timeout")
    func handshakeTimeout() async throws {
        let fixture = try await Self.start { $0.handshakeTimeout = 0.3 }
        let closed = MultiThreadedEventLoopGroup.singleton.next().makePromise(of: Void.self)
        let channel = try await ClientBootstrap(group: MultiThreadedEventLoopGroup.singleton)
            .channelInitializer { $0.eventLoop.makeSucceededVoidFuture() }
            .connect(host: "127.0.0.1", port: fixture.port).get()
        channel.closeFuture.cascade(to: closed)
        let start = ContinuousClock.now
        try await closed.futureResult.get()
        #expect(ContinuousClock.now - start < .seconds(5))
        #expect(fixture.metric("mutual_proxy_handshakes_total", "reason=\"handshake_timeout\"") == 1)
        await fixture.stop()
    }

    /// Collects every byte a TLS connection receives until it closes.
    final class ByteCollector: ChannelInboundHandler, Sendable {
        typealias InboundIn = ByteBuffer
        let closed: EventLoopPromise<String>
        private let bytes = NIOLockedValueBox<[UInt8]>([])
        init(closed: EventLoopPromise<String>) { self.closed = closed }
        func channelRead(context: ChannelHandlerContext, data: NIOAny) {
            let buffer = unwrapInboundIn(data)
            bytes.withLockedValue { $0 += buffer.readableBytesView }
        }
        func errorCaught(context: ChannelHandlerContext, error: any Error) { context.close(promise: nil) }
        func channelInactive(context: ChannelHandlerContext) {
            closed.succeed(bytes.withLockedValue { String(decoding: $0, as: UTF8.self) })
        }
    }

    /// Splits bytes into HTTP/1.1 responses framed by Content-Length (all the proxy's answers here have one).
    static func responses(_ bytes: [UInt8]) -> [(status: Int, body: String)] {
        var result: [(status: Int, body: String)] = []
        var index = 0
        let separator: [UInt8] = Array("\r\n\r\n".utf8)
        while index < bytes.count {
            guard let end = (index...(bytes.count - 4)).first(where: { Array(bytes[$0..<($0 + 4)]) == separator }) else { break }
            let head = String(decoding: bytes[index..<end], as: UTF8.self).split(separator: "\r\n")
            let status = head.first.flatMap { Int($0.split(separator: " ")[1]) } ?? 0
            let length = head.dropFirst().compactMap { line -> Int? in
                let parts = line.split(separator: ":", maxSplits: 1)
                return parts.count == 2 && parts[0].lowercased() == "content-length" ? Int(parts[1].trimmingCharacters(in: .whitespaces)) : nil
            }.first ?? 0
            let bodyEnd = min(bytes.count, end + 4 + length)
            result.append((status, String(decoding: bytes[(end + 4)..<bodyEnd], as: UTF8.self).trimmingCharacters(in: .newlines)))
            index = bodyEnd
        }
        return result
    }

    @Test("HTTP/1.1 pipelining is bounded: 32 requests wait behind the one being answered, the next gets 429 pipeline_too_deep, then the connection closes")
    func pipelineDepth() async throws {
        let fixture = try await Self.start()
        let context = try Self.tls(fixture, chain: fixture.good.chain, key: fixture.good.key)
        let loop = MultiThreadedEventLoopGroup.singleton.next()
        let closed = loop.makePromise(of: String.self)
        let channel = try await ClientBootstrap(group: loop)
            .channelInitializer { channel in
                channel.eventLoop.makeCompletedFuture {
                    try channel.pipeline.syncOperations.addHandler(try NIOSSLClientHandler(context: context, serverHostname: "localhost"))
                    try channel.pipeline.syncOperations.addHandler(ByteCollector(closed: closed))
                }
            }
            .connect(host: "127.0.0.1", port: fixture.port).get()
        // 100 requests in one write: the first opens an exchange (its upstream connection takes a loop tick), the
        // others arrive in the same read while it is open.
        let requests = (0..<100).map { "GET /r\($0) HTTP/1.1\r\nHost: localhost\r\n\r\n" }.joined()
        try await channel.writeAndFlush(ByteBuffer(string: requests)).get()
        let out = try await closed.futureResult.get()
        let responses = Self.responses(Array(out.utf8))
        #expect(responses.count == 1 + HTTPProxyHandler.maxWaitingRequests + 1, "\(responses.count) responses")
        #expect(responses.dropLast().allSatisfy { $0.status == 200 })
        #expect(responses.dropLast().map(\.body) == (0...HTTPProxyHandler.maxWaitingRequests).map { "/r\($0)" }, "answered in order, each once")
        #expect(responses.last?.status == 429)
        let code = responses.last.flatMap { try? JSONSerialization.jsonObject(with: Data($0.body.utf8)) as? [String: Any] }?["error"] as? String
        #expect(code == "pipeline_too_deep")
        #expect(fixture.metric("mutual_proxy_requests_refused_total", "code=\"pipeline_too_deep\"") == 1)
        await fixture.stop()
    }

    @Test("over HTTP/1.1: too many headers get 431, spellings of a denied path never reach the upstream, the forwarded target is normalized")
    func http1Requests() async throws {
        let fixture = try await Self.start { listener in
            listener.allow = nil
            listener.routes = [
                .init(path: "/admin", allow: ["spiffe://example.org/ns/ops/*"]),
                .init(path: "/", allow: ["spiffe://example.org/ns/web/*"]),
            ]
        }
        let goodTLS = try Self.tls(fixture, chain: fixture.good.chain, key: fixture.good.key)
        let many = [("host", "localhost")] + (0..<10_000).map { ("x-h\($0)", "v") }
        let (tooMany, body) = try await Self.request(fixture, context: goodTLS, headers: many)
        #expect(tooMany == 431 && body.contains("headers_too_large"))
        for path in ["/%61dmin", "/ADMIN", "/admin;x", "/admin%00", "/%2561dmin"] {
            let (status, body) = try await Self.request(fixture, context: goodTLS, path: path)
            #expect(status == 403 || status == 400, "\(path) → \(status) \(body)")
        }
        let (ok, echoed) = try await Self.request(fixture, context: goodTLS, path: "/%7Euser/%41pi?x=%41")
        #expect(ok == 200 && echoed == "/~user/Api?x=%41")
        let (noHost, _) = try await Self.request(fixture, context: goodTLS, headers: [])
        #expect(noHost == 400)
        let (twoHosts, _) = try await Self.request(fixture, context: goodTLS, headers: [("host", "a"), ("host", "b")])
        #expect(twoHosts == 400)
        await fixture.stop()
    }
}

enum ProcessCPU {
    /// User + system CPU of this process, in seconds.
    static func seconds() -> Double {
        var usage = rusage()
        getrusage(RUSAGE_SELF.rawValue, &usage)
        return Double(usage.ru_utime.tv_sec + usage.ru_stime.tv_sec) + Double(usage.ru_utime.tv_usec + usage.ru_stime.tv_usec) / 1e6
    }
}
