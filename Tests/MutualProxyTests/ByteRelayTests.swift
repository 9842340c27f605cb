import Foundation
import Logging
import NIOCore
import NIOEmbedded
import NIOHTTP1
@testable import MutualProxy
import Testing

/// Feeds `input` to a framer in pieces of `step` bytes the way ``UpstreamResponseHandler`` does (a head that has not
/// fully arrived is kept and the next piece appended), collecting the events.
struct FramerRun {
    var heads: [ResponseFramer.Head] = []
    var body = ByteBuffer()
    var bodyEvents = 0
    var ends: [(trailers: HTTPHeaders?, reusable: Bool)] = []
    var error: ResponseFramer.FramingError?
    var leftover = ByteBuffer()

    init(_ input: String, step: Int = .max, head: Bool = false, raw: Bool = true, closeAtEnd: Bool = false) {
        self.init(bytes: Array(input.utf8), step: step, head: head, raw: raw, closeAtEnd: closeAtEnd)
    }

    init(bytes input: [UInt8], step: Int = .max, head: Bool = false, raw: Bool = true, closeAtEnd: Bool = false) {
        var framer = ResponseFramer(requestWasHEAD: head, relayRaw: raw)
        var pending = ByteBuffer()
        var offset = 0
        repeat {
            let end = min(input.count, offset + min(step, input.count))
            pending.writeBytes(input[offset..<end])
            offset = end
            do {
                while !framer.isComplete, let event = try framer.next(&pending) {
                    switch event {
                    case .head(let head): heads.append(head)
                    case .body(var bytes): body.writeBuffer(&bytes); bodyEvents += 1
                    case .end(let trailers, let reusable): ends.append((trailers, reusable))
                    }
                }
            } catch {
                self.error = error
                return
            }
        } while offset < input.count
        if closeAtEnd, case .end(let trailers, let reusable)? = framer.upstreamClosed() { ends.append((trailers, reusable)) }
        leftover = pending
    }

    var bodyString: String { String(buffer: body) }
}

@Suite("The byte-level relay's response framer: strict heads, exact framing, hostile upstreams (in memory)")
struct ResponseFramerTests {
    static let steps = [Int.max, 1, 2, 7]

    @Test("Content-Length: the head, the body as it arrived, then a reusable end; whole or a byte at a time")
    func contentLength() {
        for step in Self.steps {
            let run = FramerRun("HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 11\r\n\r\nhello world", step: step)
            #expect(run.error == nil)
            #expect(run.heads.count == 1)
            #expect(run.heads.first?.status == 200)
            #expect(run.heads.first?.reason == "OK")
            #expect(run.heads.first?.framing == .length(11))
            #expect(run.bodyString == "hello world")
            #expect(run.ends.count == 1 && run.ends.first?.reusable == true)
        }
    }

    @Test("chunked, relayed raw: the body bytes are exactly the chunked bytes, trailers included, and the end is found")
    func chunkedRaw() {
        let body = "5;ext=1\r\nhello\r\n6\r\n world\r\n0\r\nx-checksum: 42\r\n\r\n"
        for step in Self.steps {
            let run = FramerRun("HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + body + "HTTP/1.1 200 OK\r\n", step: step)
            #expect(run.error == nil)
            #expect(run.bodyString == body)
            #expect(run.ends.count == 1 && run.ends.first?.reusable == true)
            #expect(String(buffer: run.leftover) == "HTTP/1.1 200 OK\r\n", "bytes after the end are left for the caller")
        }
    }

    @Test("chunked, de-chunked (HTTP/2 and HTTP/1.0 clients): the content only, trailers handed over as fields")
    func chunkedDechunked() {
        for step in Self.steps {
            let run = FramerRun("HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n6\r\n world\r\n0\r\ngrpc-status: 0\r\n\r\n", step: step, raw: false)
            #expect(run.error == nil)
            #expect(run.bodyString == "hello world")
            #expect(run.ends.first?.trailers?["grpc-status"] == ["0"])
        }
    }

    @Test("no body: HEAD, 204, 304 whatever their fields say; 1xx skipped before the final head")
    func noBody() {
        let head = FramerRun("HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n", head: true)
        #expect(head.heads.first?.framing == FramerRun("HTTP/1.1 204 No Content\r\n\r\n").heads.first?.framing)
        #expect(head.heads.first?.framing == ResponseFramer.Framing.none && head.ends.first?.reusable == true)
        #expect(FramerRun("HTTP/1.1 304 Not Modified\r\nTransfer-Encoding: chunked\r\n\r\n").ends.count == 1)
        let continued = FramerRun("HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\nHTTP/1.1 201 Created\r\nContent-Length: 2\r\n\r\nok", step: 3)
        #expect(continued.heads.map(\.status) == [201])
        #expect(continued.bodyString == "ok")
    }

    @Test("reuse: Connection: close, HTTP/1.0 without keep-alive and a body until close are not reusable")
    func reuse() {
        #expect(FramerRun("HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 0\r\n\r\n").ends.first?.reusable == false)
        #expect(FramerRun("HTTP/1.0 200 OK\r\nContent-Length: 0\r\n\r\n").ends.first?.reusable == false)
        #expect(FramerRun("HTTP/1.0 200 OK\r\nConnection: Keep-Alive\r\nContent-Length: 0\r\n\r\n").ends.first?.reusable == true)
        let untilClose = FramerRun("HTTP/1.1 200 OK\r\n\r\nstreamed until the end", step: 4, closeAtEnd: true)
        #expect(untilClose.heads.first?.framing == .untilClose)
        #expect(untilClose.bodyString == "streamed until the end")
        #expect(untilClose.ends.count == 1 && untilClose.ends.first?.reusable == false)
        let named = FramerRun("HTTP/1.1 200 OK\r\nConnection: x-private, close\r\nContent-Length: 0\r\n\r\n")
        #expect(named.heads.first?.connectionNames == ["x-private"])
    }

    @Test("hostile or broken upstream responses are refused with a stable code, never framed by guesswork")
    func hostile() {
        let malformed: [(String, String)] = [
            ("HTTP/1.1 200 OK\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n", "CL and TE"),
            ("HTTP/1.1 200 OK\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\n", "conflicting lengths"),
            ("HTTP/1.1 200 OK\r\nContent-Length: 3, 4\r\n\r\n", "conflicting list"),
            ("HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n", "negative length"),
            ("HTTP/1.1 200 OK\r\nContent-Length: 99999999999999999999\r\n\r\n", "huge length"),
            ("HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n", "coding other than chunked"),
            ("HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked, chunked\r\n\r\n", "chunked twice"),
            ("HTTP/1.1 200 OK\r\nX-A: 1\r\n folded\r\n\r\n", "obs-fold"),
            ("HTTP/1.1 200 OK\r\nX-A : 1\r\n\r\n", "space before colon"),
            ("HTTP/1.1 200 OK\r\nX-A: 1\u{0}2\r\n\r\n", "NUL in a value"),
            ("HTTP/1.1 200 OK\r\nX-A: 1\r2\r\n\r\n", "bare CR in a value"),
            ("HTTP/1.1 200 OK\r\nX-A\r\n\r\n", "no colon"),
            ("HTTP/2 200 OK\r\n\r\n", "not HTTP/1.x"),
            ("HTTP/1.1 2000 OK\r\n\r\n", "four-digit status"),
            ("HTTP/1.1 099 Low\r\n\r\n", "status below 100"),
            ("hello there, this is not a response\r\n\r\n", "garbage"),
            ("HTTP/1.1 101 Switching Protocols\r\nUpgrade: h2c\r\n\r\n", "unasked upgrade"),
            ("HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n", "chunk size not hex"),
            ("HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n1000000000000000\r\n", "chunk size overflow"),
            ("HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabcX\r\n", "data not followed by CRLF"),
            ("HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3;a\u{1}\r\nabc\r\n", "control in extension"),
            ("HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n\r\n", "empty chunk size"),
            ("HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n0\r\nbad trailer\r\n\r\n", "malformed trailer"),
        ]
        for (input, what) in malformed {
            for step in [Int.max, 1] {
                let run = FramerRun(input, step: step)
                #expect(run.error?.code == "upstream_malformed_response", "\(what), step \(step)")
            }
        }
        // Too large: a head that never ends, and an endless chunk extension or trailer section.
        let endless = FramerRun("HTTP/1.1 200 OK\r\n" + String(repeating: "X-Fill: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\r\n", count: 3000))
        #expect(endless.error?.code == "upstream_response_too_large")
        let extensionRun = FramerRun("HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n1;" + String(repeating: "a", count: 5000))
        #expect(extensionRun.error?.code == "upstream_malformed_response")
        let trailers = FramerRun("HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n" + String(repeating: "x-t: 1\r\n", count: 3000))
        #expect(trailers.error?.code == "upstream_malformed_response")
        // Truncated input is not an error: the framer waits (the handler turns an early close into a failure).
        for cut in [5, 20, 40, 60] {
            let whole = Array("HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n".utf8)
            let run = FramerRun(bytes: Array(whole.prefix(cut)), step: 3)
            #expect(run.error == nil && run.ends.isEmpty, "cut at \(cut)")
        }
    }

    @Test("random bytes never crash the framer and never produce an end from nothing")
    func fuzz() {
        var generator = SystemRandomNumberGenerator()
        for _ in 0..<300 {
            let length = Int.random(in: 0...200, using: &generator)
            var bytes = (0..<length).map { _ in UInt8.random(in: 0...255, using: &generator) }
            if Bool.random(using: &generator) { bytes = Array("HTTP/1.1 200 OK\r\n".utf8) + bytes }
            let run = FramerRun(bytes: bytes, step: Int.random(in: 1...16, using: &generator))
            if run.error == nil { #expect(run.heads.count <= 1) }
        }
    }
}

@Suite("The relay's wire writer: heads written as bytes (in memory)")
struct HTTP1WireTests {
    func head(_ text: String) throws -> ResponseFramer.Head {
        try #require(FramerRun(text).heads.first)
    }

    @Test("a response head keeps the upstream's fields as sent, minus hop-by-hop and Connection-named ones")
    func responseHead() throws {
        let head = try head("HTTP/1.1 404 Not Here\r\nContent-Length: 0\r\nConnection: keep-alive, X-Secret\r\nKeep-Alive: timeout=5\r\nX-Secret: 1\r\nx-kept:  spaced  \r\nUpgrade: h2c\r\n\r\n")
        var out = ByteBuffer()
        HTTP1Wire.writeResponseHead(head, clientMinorVersion: 1, dropTransferEncoding: false, close: true, keepAlive: false, into: &out)
        #expect(String(buffer: out) == "HTTP/1.1 404 Not Here\r\nContent-Length: 0\r\nx-kept:  spaced  \r\nconnection: close\r\n\r\n")
        var ten = ByteBuffer()
        let chunked = try self.head("HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
        HTTP1Wire.writeResponseHead(chunked, clientMinorVersion: 0, dropTransferEncoding: true, close: true, keepAlive: false, into: &ten)
        #expect(String(buffer: ten) == "HTTP/1.0 200 OK\r\nconnection: close\r\n\r\n")
        let h2 = HTTP1Wire.responseHead(head, version: .init(major: 2, minor: 0))
        #expect(h2.status.code == 404)
        #expect(h2.headers.map(\.name) == ["Content-Length", "x-kept"])
    }

    @Test("a request head: method, target, HTTP/1.1, the fields given")
    func requestHead() {
        var out = ByteBuffer()
        HTTP1Wire.writeRequestHead(method: "POST", target: "/a?b=1", headers: ["host": "x", "content-length": "2"], into: &out)
        #expect(String(buffer: out) == "POST /a?b=1 HTTP/1.1\r\nhost: x\r\ncontent-length: 2\r\n\r\n")
        #expect(String(buffer: HTTP1Wire.lastChunk(trailers: ["x-sum": "1"])) == "0\r\nx-sum: 1\r\n\r\n")
        #expect(String(buffer: HTTP1Wire.chunkHeader(size: 255, allocator: .init())) == "ff\r\n")
    }

    @Test("request trailers lose forged identity fields in every spelling, hop-by-hop fields and the strip list")
    func trailers() {
        let strip = HeaderNames.Matcher(patterns: ForwardedIdentity.defaultStrippedHeaders)
        let incoming: HTTPHeaders = [
            "x-checksum": "abc", "X-Forwarded-Client-Cert": "By=evil", "client_cert": ":Zm9v:", "x-client-identity": "spiffe://evil",
            "te": "trailers", "x-forwarded-for": "6.6.6.6",
        ]
        let kept = HTTPProxyHandler.forwardTrailers(incoming, strip: strip)
        #expect(kept.map(\.name) == ["x-checksum"])
        #expect(String(buffer: HTTP1Wire.lastChunk(trailers: kept)) == "0\r\nx-checksum: abc\r\n\r\n")
    }

    @Test("HTTP/2 requests: a body without content-length goes chunked (not for GET or HEAD); HTTP/1.1 keeps its framing")
    func upstreamBody() {
        let h2 = HTTPVersion(major: 2, minor: 0)
        var headers: HTTPHeaders = ["host": "a"]
        #expect(HTTPProxyHandler.upstreamBody(for: .init(version: h2, method: .POST, uri: "/"), forwarded: &headers) == .chunked)
        #expect(headers["transfer-encoding"] == ["chunked"])
        headers = ["host": "a"]
        #expect(HTTPProxyHandler.upstreamBody(for: .init(version: h2, method: .GET, uri: "/"), forwarded: &headers) == .none)
        headers = ["host": "a", "content-length": "3"]
        #expect(HTTPProxyHandler.upstreamBody(for: .init(version: h2, method: .PUT, uri: "/"), forwarded: &headers) == .asReceived)
        headers = ["host": "a", "transfer-encoding": "chunked"]
        #expect(HTTPProxyHandler.upstreamBody(for: .init(version: .http1_1, method: .PUT, uri: "/"), forwarded: &headers) == .chunked)
    }
}

@Suite("The HTTP/1.1 front end writing its own bytes: pipelining, parse errors, HEAD (in memory)")
struct HTTP1FrontTests {
    /// A decoder and the proxy handler on an embedded channel; every request is refused (401: no certificate), so
    /// no upstream is needed.
    func channel() throws -> EmbeddedChannel {
        let runtime = ProxyRuntime(
            metrics: ProxyMetrics(), accessLog: try AccessLog(destination: "off"), revocation: RevocationState(stalePolicy: .deny),
            logger: Logger(label: "test", factory: { _ in SwiftLogNoOpLogHandler() })
        )
        let front = try PolicyOnlyFront(policy: RoutePolicy(routes: [.init(pathPrefix: "/", allow: [try Principal(parsing: "spiffe://example.org/a")])]))
        let channel = EmbeddedChannel()
        try HTTPProxyHandler.addRequestDecoder(channel.pipeline.syncOperations)
        try channel.pipeline.syncOperations.addHandler(HTTPProxyHandler(state: front, peer: nil, runtime: runtime, pools: UpstreamPools()))
        try channel.connect(to: SocketAddress(ipAddress: "127.0.0.1", port: 1)).wait()
        return channel
    }

    func written(_ channel: EmbeddedChannel) throws -> String {
        var all = ByteBuffer()
        while var buffer = try channel.readOutbound(as: ByteBuffer.self) { all.writeBuffer(&buffer) }
        return String(buffer: all)
    }

    /// The lines written, split at LF bytes (a Swift `Character` split would keep CRLF whole), CR removed.
    func lines(_ out: String) -> [String] {
        out.utf8.split(separator: UInt8(ascii: "\n")).map { String(decoding: $0.filter { $0 != UInt8(ascii: "\r") }, as: UTF8.self) }
    }

    /// The status lines of the responses written.
    func statuses(_ out: String) -> [String] { lines(out).filter { $0.hasPrefix("HTTP/1.") } }

    /// The `error` codes of the JSON bodies written (one line each).
    func codes(_ out: String) -> [String] {
        lines(out).filter { $0.hasPrefix("{") }.compactMap { line in
            (try? JSONSerialization.jsonObject(with: Data(line.utf8)) as? [String: Any])?["error"] as? String
        }
    }

    /// The header fields of the first response, lower-cased names.
    func fields(_ out: String) -> [String: String] {
        var fields: [String: String] = [:]
        for line in lines(out).dropFirst().prefix(while: { !$0.isEmpty }) {
            guard let colon = line.firstIndex(of: ":") else { continue }
            fields[line[..<colon].lowercased()] = line[line.index(after: colon)...].trimmingCharacters(in: .whitespaces)
        }
        return fields
    }

    @Test("pipelined requests in one read are answered in order, each once")
    func pipelined() throws {
        let channel = try channel()
        try channel.writeInbound(ByteBuffer(string: "GET /one HTTP/1.1\r\nHost: a\r\n\r\nHEAD /two HTTP/1.1\r\nHost: a\r\n\r\nGET /three HTTP/1.1\r\nHost: a\r\n\r\n"))
        let out = try written(channel)
        #expect(statuses(out) == ["HTTP/1.1 401 Unauthorized", "HTTP/1.1 401 Unauthorized", "HTTP/1.1 401 Unauthorized"])
        #expect(codes(out) == ["client_certificate_required", "client_certificate_required"], "HEAD's answer has no body")
        #expect(channel.isActive)
        _ = try? channel.finish()
    }

    @Test("bytes that are not HTTP/1.1 get 400 malformed_request; a head over the limit 431 headers_too_large")
    func parseErrors() throws {
        let garbage = try channel()
        _ = try? garbage.writeInbound(ByteBuffer(string: "GET / HTTP/1.1\r\nHost: a\r\nBad Header\r\n\r\n"))
        let out = try written(garbage)
        #expect(statuses(out) == ["HTTP/1.1 400 Bad Request"])
        #expect(codes(out) == ["malformed_request"])
        #expect(fields(out)["connection"] == "close")
        _ = try? garbage.finish()

        let large = try channel()
        _ = try? large.writeInbound(ByteBuffer(string: "GET / HTTP/1.1\r\nHost: a\r\nX-Big: " + String(repeating: "a", count: 200_000) + "\r\n\r\n"))
        let largeOut = try written(large)
        #expect(statuses(largeOut) == ["HTTP/1.1 431 Request Header Fields Too Large"])
        #expect(codes(largeOut) == ["headers_too_large"])
        _ = try? large.finish()

        // A valid request, then garbage in the same read: the first is answered, then the parse error.
        let both = try channel()
        _ = try? both.writeInbound(ByteBuffer(string: "GET /ok HTTP/1.1\r\nHost: a\r\n\r\n\u{1}\u{2}garbage\r\n\r\n"))
        let two = try written(both)
        #expect(statuses(two) == ["HTTP/1.1 401 Unauthorized", "HTTP/1.1 400 Bad Request"])
        #expect(codes(two) == ["client_certificate_required", "malformed_request"])
        _ = try? both.finish()
    }

    @Test("an HTTP/1.0 request without keep-alive is answered as HTTP/1.0 and the connection closes")
    func http10() throws {
        let channel = try channel()
        try channel.writeInbound(ByteBuffer(string: "GET / HTTP/1.0\r\n\r\n"))
        let out = try written(channel)
        #expect(statuses(out) == ["HTTP/1.0 401 Unauthorized"])
        #expect(fields(out)["connection"] == "close")
        _ = try? channel.finish()
    }
}

@Suite("HTTP/2 flush consolidation: the responses of one tick leave in one write (in memory)")
struct FlushConsolidatorTests {
    /// Counts the flushes that reach the socket side.
    final class FlushCounter: ChannelOutboundHandler {
        typealias OutboundIn = NIOAny
        var flushes = 0
        func flush(context: ChannelHandlerContext) {
            flushes += 1
            context.flush()
        }
    }

    @Test("three streams flushing in one tick: one flush after the tick, every byte out, none before")
    func consolidates() throws {
        let counter = FlushCounter()
        let channel = EmbeddedChannel()
        try channel.pipeline.syncOperations.addHandler(counter)
        try channel.pipeline.syncOperations.addHandler(FlushConsolidator())
        try channel.connect(to: SocketAddress(ipAddress: "127.0.0.1", port: 1)).wait()
        for stream in 1...3 {
            channel.write(ByteBuffer(string: "response \(stream)"), promise: nil)
            channel.flush()
        }
        #expect(try channel.readOutbound(as: ByteBuffer.self) == nil, "held until the tick ends")
        channel.embeddedEventLoop.run()
        #expect(counter.flushes == 1)
        var out: [String] = []
        while let buffer = try channel.readOutbound(as: ByteBuffer.self) { out.append(String(buffer: buffer)) }
        #expect(out == ["response 1", "response 2", "response 3"])
        // A close with a flush pending sends what is held first.
        channel.write(ByteBuffer(string: "last"), promise: nil)
        channel.flush()
        _ = channel.close()
        #expect(counter.flushes == 2)
        _ = try? channel.finish()
    }
}
