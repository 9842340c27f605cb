import Foundation
import MutualPKI
@testable import MutualProxy
import NIOCore
import NIOHTTP1
import NIOHTTP2
import NIOEmbedded
import NIOPosix
import NIOSSL
import Testing
import TestSupport
import X509

@Suite("Proxy configuration: YAML and flags, with hostile input")
struct ProxyConfigurationTests {
    static let full = """
        admin-listen: 127.0.0.1:9901
        access-log: off
        watch-interval: 0.5
        listeners:
          - name: gateway
            listen: 127.0.0.1:8443
            upstream: http://127.0.0.1:8080
            cert: certs/server.pem
            key: certs/server.key
            client-ca: /etc/mutual/roots.pem
            client-certificate: optional
            max-depth: 2
            routes:
              - path: /healthz
                open: true
              - path: /admin
                methods: [POST, delete]
                allow: ["spiffe://example.org/ns/ops/*"]
            allow: ["spiffe://example.org/ns/web/*", "dns:*.partner.example", "cn:legacy-client"]
          - name: db
            listen: 127.0.0.1:15432
            mode: tcp
            upstream: 127.0.0.1:5432
            proxy-protocol: true
            cert: /c.pem
            key: /k.pem
            client-ca: /ca.pem
            allow: ["spiffe://example.org/ns/api/sa/app"]
        outbound:
          - listen: 127.0.0.1:15001
            upstream: https://10.0.0.5:8443
            cert: /c.pem
            key: /k.pem
            server-ca: /ca.pem
            expect: ["spiffe://example.org/ns/db/sa/pg", "dns:db.internal"]
        revocation:
          crl: [crl.pem, "http://ca.internal:9080/crl"]
          authority: https://ca.internal:9443
          authority-ca: /ca.pem
          on-stale: allow
        """

    @Test("a complete file parses; relative paths resolve against the file's directory; routes become a policy")
    func parsesFullExample() throws {
        let configuration = try ProxyConfiguration.parse(yaml: Self.full, baseDirectory: URL(fileURLWithPath: "/srv/proxy"))
        #expect(configuration.listeners.count == 2 && configuration.outbound.count == 1)
        let gateway = configuration.listeners[0]
        #expect(gateway.cert == "/srv/proxy/certs/server.pem" && gateway.clientCA == "/etc/mutual/roots.pem")
        #expect(gateway.clientCertificate == .optional && gateway.maxDepth == 2)
        #expect(configuration.revocation?.crl == ["/srv/proxy/crl.pem", "http://ca.internal:9080/crl"])
        #expect(configuration.revocation?.onStale == .allow && configuration.adminListen == "127.0.0.1:9901")
        let policy = try configuration.policy(for: gateway)
        #expect(policy.routes.map(\.pathPrefix) == ["/healthz", "/admin", "/"])
        #expect(policy.routes[1].methods == ["POST", "DELETE"])
        #expect(policy.routes[0].allowWithoutCertificate)
        #expect(configuration.listeners[1].mode == .tcp && configuration.listeners[1].proxyProtocol == true)
    }

    @Test("garbage, truncated, oversized and contradictory files are refused with the reason")
    func refusesBadInput() throws {
        func reason(_ yaml: String) -> String {
            do {
                _ = try ProxyConfiguration.parse(yaml: yaml)
                return "accepted"
            } catch {
                return "\(error)"
            }
        }
        let listener = "listeners:\n  - listen: 127.0.0.1:1\n    cert: /c\n    key: /k\n    client-ca: /ca\n"
        #expect(reason("").contains("no listeners"))
        #expect(reason(": : :\n\t- [").contains("proxy configuration"))
        #expect(reason(Self.full.components(separatedBy: "    key: certs")[0]).contains("missing 'key'"))
        #expect(reason(String(repeating: "#", count: ProxyConfiguration.maximumFileSize + 1)).contains("larger than"))
        #expect(reason(listener + "    upstream: http://127.0.0.1:2\n").contains("everything would be denied"))
        #expect(reason(listener + "    upstream: ftp://x:1\n    allow: [spiffe://a.b/c]\n").contains("unsupported scheme"))
        #expect(reason(listener + "    upstream: 127.0.0.1:2\n    allow: [spiffe://a.b/c]\n").contains("http:// upstream"))
        #expect(reason(listener + "    upstream: http://x:2/path\n    allow: [spiffe://a.b/c]\n").contains("without a path"))
        #expect(reason(listener + "    mode: tcp\n    upstream: x:2\n    routes: [{path: /a, allow: [spiffe://a.b/c]}]\n").contains("no paths"))
        #expect(reason(listener + "    mode: udp\n    upstream: x:2\n").contains("mode"))
        #expect(reason(listener + "    upstream: http://x:2\n    allow: ['spiffe://a.b/*/c']\n").contains("invalid principal"))
        #expect(reason(listener + "    upstream: http://x:2\n    routes: [{path: /h, open: true, allow: [spiffe://a.b/c]}]\n").contains("open route"))
        #expect(reason(listener + "    upstream: http://x:2\n    routes: [{path: h, open: true}]\n").contains("must start with '/'"))
        #expect(reason(listener + "    upstream: http://x:2\n    max-depth: 99\n    allow: [spiffe://a.b/c]\n").contains("max-depth"))
        #expect(reason(listener + "    upstream: http://x:2\n    forward: [magic]\n    allow: [spiffe://a.b/c]\n").contains("unknown 'magic'"))
        #expect(reason(listener + "    upstream: http://x:2\n    allow: [spiffe://a.b/c]\n  - listen: 127.0.0.1:1\n    cert: /c\n    key: /k\n    client-ca: /ca\n    upstream: http://x:2\n    allow: [spiffe://a.b/c]\n").contains("used by two listeners"))
        #expect(reason("outbound:\n  - listen: 127.0.0.1:3\n    upstream: https://x:1\n    cert: /c\n    key: /k\n    server-ca: /ca\n    expect: []\n").contains("'expect'"))
        #expect(reason(listener + "    upstream: http://x:2\n    allow: [spiffe://a.b/c]\nrevocation:\n  authority: http://ca:1\n").contains("https://"))
        #expect(reason(listener + "    upstream: http://x:2\n    allow: [spiffe://a.b/c]\nrevocation:\n  authority: https://ca:1\n").contains("authority-ca"))
    }

    @Test("request paths that could route differently at the backend are refused")
    func pathProblems() {
        func refused(_ path: String) -> Bool {
            if case .failure = RequestTarget.parse(path) { return true }
            return false
        }
        for path in ["/api/v1/items", "/a/.hidden", "/a/...", "/a/b.c/d", "/", "/%41"] {
            #expect(!refused(path), "\(path)")
        }
        for path in ["/a/../admin", "/a/./b", "/a/..", "/.", "/a/%2E%2E/b", "/a/%2e%2e/admin", "/a%2Fb", "/a//b", "http://evil/", "*", "/a\\b", "/a/%5c", "/x%2"] {
            #expect(refused(path), "\(path)")
        }
    }
}

@Suite("Proxy wire formats: PROXY protocol v2 and Server-Sent Events")
struct ProxyWireTests {
    @Test("PROXY v2 header: signature, version/command, family, length, addresses, SSL TLV with CN and version, custom TLVs")
    func proxyV2() throws {
        let ca = try TestPKI.issuingCA()
        let key = try KeyType.p256.generate()
        let leaf = try ca.issue(.init(profile: .workload, publicKey: key.publicKey, commonName: "api", uris: ["spiffe://example.org/ns/web/sa/api"]), now: TestPKI.now)
        let peer = try VerifiedPeer(validatedChain: [leaf, ca.certificate, ca.root])
        let source = try SocketAddress(ipAddress: "10.1.2.3", port: 40000)
        let destination = try SocketAddress(ipAddress: "127.0.0.1", port: 8443)
        var header = ProxyProtocolV2.header(source: source, destination: destination, peer: peer, tlsVersion: .tlsv13, resumed: false, allocator: ByteBufferAllocator())
        let bytes = Array(header.readableBytesView)
        #expect(Array(bytes[0..<12]) == [0x0D, 0x0A, 0x0D, 0x0A, 0x00, 0x0D, 0x0A, 0x51, 0x55, 0x49, 0x54, 0x0A])
        #expect(bytes[12] == 0x21 && bytes[13] == 0x11)
        let length = Int(bytes[14]) << 8 | Int(bytes[15])
        #expect(length == bytes.count - 16)
        #expect(Array(bytes[16..<20]) == [10, 1, 2, 3] && Array(bytes[20..<24]) == [127, 0, 0, 1])
        #expect(Int(bytes[24]) << 8 | Int(bytes[25]) == 40000 && Int(bytes[26]) << 8 | Int(bytes[27]) == 8443)
        header.moveReaderIndex(forwardBy: 28)
        var tlvs: [UInt8: [UInt8]] = [:]
        while header.readableBytes >= 3, let type: UInt8 = header.readInteger(), let size: UInt16 = header.readInteger(), let value = header.readBytes(length: Int(size)) {
            tlvs[type] = value
        }
        #expect(header.readableBytes == 0)
        let ssl = try #require(tlvs[0x20])
        #expect(ssl[0] == 0x03 && Array(ssl[1..<5]) == [0, 0, 0, 0])
        let sub = Array(ssl[5...])
        #expect(sub[0] == 0x21 && String(decoding: sub[3..<(3 + Int(sub[2]))], as: UTF8.self) == "TLSv1.3")
        #expect(tlvs[0xE0] == (try leaf.derBytes))
        #expect(tlvs[0xE1].map { String(decoding: $0, as: UTF8.self) } == "spiffe://example.org/ns/web/sa/api")
    }

    @Test("SSE parser: events split across chunks, CRLF, comments, multi-line data, ids")
    func serverSentEvents() {
        var parser = ServerSentEvents()
        var events = parser.feed(Array("retry: 1000\n: comment\n\nid: 7\nevent: revocation\nda".utf8))
        #expect(events.isEmpty)
        events = parser.feed(Array("ta: {\"serial\":\"ab\"}\r\n\r\n: keep-alive\n\nid: 8\nevent: revocation\ndata: a\ndata: b\n\n".utf8))
        #expect(events.count == 2)
        #expect(events[0].id == "7" && events[0].type == "revocation" && events[0].data == "{\"serial\":\"ab\"}")
        #expect(events[1].id == "8" && events[1].data == "a\nb")
        // A line longer than the cap is truncated, not buffered without bound.
        events = parser.feed(Array(repeating: UInt8(ascii: "x"), count: 200_000) + Array("\n\n".utf8))
        #expect(events.isEmpty)
    }
}

@Suite("Proxy revocation state")
struct ProxyRevocationTests {
    @Test("a CRL revokes its serials; stale CRLs fail closed unless on-stale: allow; pushed serials; sources not yet loaded")
    func revocation() throws {
        let ca = try TestPKI.issuingCA(now: Date())
        let now = Date()
        func leaf() throws -> Certificate {
            try ca.issue(.init(profile: .workload, publicKey: try KeyType.p256.generate().publicKey, uris: ["spiffe://example.org/x"]), now: now)
        }
        let revoked = try leaf()
        let good = try leaf()
        let builder = RevocationListBuilder(issuer: ca.certificate, issuerKey: ca.privateKey)
        let fresh = try RevocationList(derEncoded: try builder.build(
            number: 1, thisUpdate: now.addingTimeInterval(-60), nextUpdate: now.addingTimeInterval(3600),
            entries: [.init(serialNumber: revoked.serialNumber, revocationDate: now.addingTimeInterval(-30), reason: .keyCompromise)]
        ))
        let state = RevocationState(stalePolicy: .deny)
        state.expect(sources: ["crl.pem"])
        #expect(state.check(chain: [good, ca.certificate, ca.root])?.0 == .revocationUnavailable, "fail closed until loaded")
        #expect(state.install(fresh, source: "crl.pem") == [revoked.serialHex])
        let verdict = state.check(chain: [revoked, ca.certificate, ca.root])
        #expect(verdict?.0 == .revoked && verdict?.1.contains("keyCompromise") == true)
        #expect(state.check(chain: [good, ca.certificate, ca.root]) == nil)

        // Past nextUpdate: deny names staleness; allow keeps using it.
        let later = now.addingTimeInterval(7200)
        #expect(state.check(chain: [good, ca.certificate, ca.root], now: later)?.0 == .revocationUnavailable)
        #expect(state.isStale(now: later))
        let lenient = RevocationState(stalePolicy: .allow)
        lenient.install(fresh, source: "crl.pem")
        #expect(lenient.check(chain: [good, ca.certificate, ca.root], now: later) == nil)
        #expect(lenient.check(chain: [revoked, ca.certificate, ca.root], now: later)?.0 == .revoked)

        // An older CRL never replaces a newer one.
        let older = try RevocationList(derEncoded: try builder.build(number: 0, thisUpdate: now.addingTimeInterval(-600), nextUpdate: now.addingTimeInterval(3600), entries: []))
        #expect(state.install(older, source: "crl.pem").isEmpty)
        #expect(state.check(chain: [revoked, ca.certificate, ca.root])?.0 == .revoked)

        // A CRL signed by someone else for the same issuer name does not count (and fails closed under deny).
        let impostor = try TestPKI.issuingCA(now: now)
        let forged = try RevocationList(derEncoded: try RevocationListBuilder(issuer: ca.certificate, issuerKey: impostor.privateKey).build(
            number: 5, thisUpdate: now, nextUpdate: now.addingTimeInterval(3600), entries: []
        ))
        let other = RevocationState(stalePolicy: .deny)
        other.install(forged, source: "forged.pem")
        #expect(other.check(chain: [good, ca.certificate, ca.root])?.1.contains("does not verify") == true)

        // Pushed by the event stream.
        #expect(state.push(serial: good.serialHex.uppercased(), reason: "superseded"))
        #expect(!state.push(serial: good.serialHex, reason: "superseded"), "idempotent")
        #expect(state.check(chain: [good, ca.certificate, ca.root])?.0 == .revoked)
    }
}

@Suite("Proxy over real sockets", .serialized)
struct ProxySocketTests {
    final class StatusCatcher: ChannelInboundHandler, Sendable {
        typealias InboundIn = HTTPClientResponsePart
        let promise: EventLoopPromise<Int>
        init(promise: EventLoopPromise<Int>) { self.promise = promise }
        func channelRead(context: ChannelHandlerContext, data: NIOAny) {
            if case .head(let head) = unwrapInboundIn(data) { promise.succeed(Int(head.status.code)) }
        }
        func errorCaught(context: ChannelHandlerContext, error: any Error) { promise.fail(error) }
        func channelInactive(context: ChannelHandlerContext) { promise.fail(ChannelError.eof) }
    }

    /// One GET through a NIO TLS client that offers only `groups`; returns the HTTP status.
    static func request(port: Int, root: Certificate, client: (chain: [Certificate], key: Certificate.PrivateKey), groups: [NIOTLSCurve]) async throws -> Int {
        var tls = TLSConfiguration.makeClientConfiguration()
        tls.minimumTLSVersion = .tlsv13
        tls.curves = groups
        tls.trustRoots = .certificates([try NIOSSLCertificate(bytes: try root.derBytes, format: .der)])
        tls.certificateChain = try client.chain.map { .certificate(try NIOSSLCertificate(bytes: try $0.derBytes, format: .der)) }
        tls.privateKey = .privateKey(try NIOSSLPrivateKey(bytes: Array(try KeyFile.pem(for: client.key, passphrase: nil).utf8), format: .pem))
        let context = try NIOSSLContext(configuration: tls)
        let group = MultiThreadedEventLoopGroup.singleton
        let promise = group.next().makePromise(of: Int.self)
        let channel = try await ClientBootstrap(group: promise.futureResult.eventLoop)
            .channelInitializer { channel in
                channel.eventLoop.makeCompletedFuture {
                    try channel.pipeline.syncOperations.addHandler(try NIOSSLClientHandler(context: context, serverHostname: "localhost"))
                    try channel.pipeline.syncOperations.addHTTPClientHandlers()
                    try channel.pipeline.syncOperations.addHandler(StatusCatcher(promise: promise))
                }
            }
            .connect(host: "127.0.0.1", port: port).get()
        var head = HTTPRequestHead(version: .http1_1, method: .GET, uri: "/hybrid")
        head.headers.add(name: "host", value: "localhost")
        channel.write(HTTPClientRequestPart.head(head), promise: nil)
        try await channel.writeAndFlush(HTTPClientRequestPart.end(nil)).get()
        defer { channel.close(promise: nil) }
        return try await promise.futureResult.get()
    }

    @Test("a client offering only X25519MLKEM768 completes the handshake and is authorized; classical groups still work")
    func hybridKeyExchange() async throws {
        let fixture = try await GatewaySocketTests.start()
        let hybrid = try await Self.request(port: fixture.port, root: fixture.ca.root, client: fixture.good, groups: [.x25519_MLKEM768])
        #expect(hybrid == 200, "handshake, client verification and policy passed")
        let classical = try await Self.request(port: fixture.port, root: fixture.ca.root, client: fixture.good, groups: [.secp256r1])
        #expect(classical == 200)
        #expect(InboundState.groups.first == .x25519_MLKEM768, "the hybrid group is offered first")
        await fixture.stop()
    }
}

@Suite("Identity header encoding")
struct IdentityHeaderEncodingTests {
    static let unreserved = Set("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~".utf8)

    @Test("XFCC percent-encoding leaves only RFC 3986 unreserved bytes, escapes the rest as %XX, and round-trips")
    func percentEncoding() throws {
        var ascii = ""
        for byte in UInt8(0)...UInt8(0x7F) { ascii.unicodeScalars.append(UnicodeScalar(byte)) }
        let text = ascii + "ä€\u{1F512}"
        let encoded = ForwardedIdentity.urlEncode(text)
        #expect(encoded.removingPercentEncoding == text)
        let bytes = Array(encoded.utf8)
        var index = 0
        var escapes = 0
        while index < bytes.count {
            if bytes[index] == UInt8(ascii: "%") {
                let hex = Set("0123456789ABCDEF".utf8)
                #expect(index + 2 < bytes.count && hex.contains(bytes[index + 1]) && hex.contains(bytes[index + 2]))
                index += 3
                escapes += 1
            } else {
                #expect(Self.unreserved.contains(bytes[index]), "byte \(bytes[index]) left unescaped")
                index += 1
            }
        }
        #expect(escapes == text.utf8.count - text.utf8.filter { Self.unreserved.contains($0) }.count)
        // For ASCII it is exactly what Foundation produces with the same allowed set.
        let allowed = CharacterSet(charactersIn: "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")
        #expect(ForwardedIdentity.urlEncode(ascii) == ascii.addingPercentEncoding(withAllowedCharacters: allowed))
        #expect(ForwardedIdentity.urlEncode("-----BEGIN CERTIFICATE-----\nMIIB+/=\n") == "-----BEGIN%20CERTIFICATE-----%0AMIIB%2B%2F%3D%0A")
        #expect(ForwardedIdentity.urlEncode("") == "")
    }

    @Test("the headers a listener adds follow its forward setting: XFCC, then Client-Cert and Client-Cert-Chain")
    func headerSelection() throws {
        let ca = try TestPKI.issuingCA()
        let key = try KeyType.p256.generate()
        let issued = try ca.issue(.init(profile: .workload, publicKey: key.publicKey, uris: ["spiffe://example.org/ns/web/sa/a"]), now: TestPKI.now)
        let peer = try VerifiedPeer(validatedChain: [issued, ca.certificate])
        let all = try ForwardedIdentity.headers(for: peer, by: "spiffe://example.org/ns/proxy", xfcc: true, rfc9440: true)
        #expect(all.map(\.0) == ["x-forwarded-client-cert", "client-cert", "client-cert-chain"])
        #expect(all[0].1.hasPrefix("By=spiffe://example.org/ns/proxy;Hash=\(peer.fingerprint);Cert=\"-----BEGIN%20CERTIFICATE-----%0A"))
        #expect(try ForwardedIdentity.headers(for: peer, by: nil, xfcc: false, rfc9440: true).map(\.0) == ["client-cert", "client-cert-chain"])
        #expect(try ForwardedIdentity.headers(for: peer, by: nil, xfcc: true, rfc9440: false).map(\.0) == ["x-forwarded-client-cert"])
        #expect(try ForwardedIdentity.headers(for: peer, by: nil, xfcc: false, rfc9440: false).isEmpty)
    }
}

@Suite("HTTP/2 response framing")
struct EndStreamCoalescerTests {
    /// Writes `payloads` through the coalescer on an embedded channel (flushing after the last one) and returns the
    /// frames that reach the network side, as (kind, payload bytes, END_STREAM).
    static func frames(_ payloads: [HTTP2Frame.FramePayload], flushEach: Bool = false) throws -> [(String, Int, Bool)] {
        let channel = EmbeddedChannel(handler: EndStreamCoalescer())
        for payload in payloads {
            if flushEach { try channel.writeAndFlush(payload).wait() } else { channel.write(payload, promise: nil) }
        }
        channel.flush()
        var out: [(String, Int, Bool)] = []
        while let frame = try channel.readOutbound(as: HTTP2Frame.FramePayload.self) {
            switch frame {
            case .headers(let headers): out.append(("headers", 0, headers.endStream))
            case .data(let data):
                guard case .byteBuffer(let bytes) = data.data else { throw PKIError(.malformedInput, "unexpected file region") }
                out.append(("data", bytes.readableBytes, data.endStream))
            default: out.append(("other", 0, false))
            }
        }
        _ = try channel.finish()
        return out
    }

    static let head = HTTP2Frame.FramePayload.headers(.init(headers: [":status": "200"]))
    static func data(_ count: Int, end: Bool = false) -> HTTP2Frame.FramePayload {
        .data(.init(data: .byteBuffer(ByteBuffer(repeating: 0x61, count: count)), endStream: end))
    }

    @Test("END_STREAM rides on the last DATA or HEADERS frame instead of an empty DATA frame of its own")
    func coalescing() throws {
        let body = try Self.frames([Self.head, Self.data(2), Self.data(0, end: true)])
        #expect(body.map(\.0) == ["headers", "data"] && body.map(\.1) == [0, 2] && body.map(\.2) == [false, true])
        let empty = try Self.frames([Self.head, Self.data(0, end: true)])
        #expect(empty.count == 1 && empty[0].0 == "headers" && empty[0].2, "a response without a body ends on its HEADERS")
        let trailers = try Self.frames([Self.head, Self.data(5), .headers(.init(headers: ["grpc-status": "0"], endStream: true))])
        #expect(trailers.map(\.0) == ["headers", "data", "headers"] && trailers.map(\.2) == [false, false, true])
        let streamed = try Self.frames([Self.head, Self.data(3), Self.data(4), Self.data(0, end: true)], flushEach: true)
        #expect(streamed.map(\.1) == [0, 3, 4, 0] && streamed.last?.2 == true,
                "a flush sends what is held, so a streamed body is not delayed; an END_STREAM after a flush goes alone")
    }
}
