import Foundation
import MutualAuthority
@testable import MutualServer
import NIOCore
import NIOHTTP1
import NIOPosix
import Testing

/// The http-01 check against real HTTP servers on 127.0.0.1: each way a challenge can fail gets its ACME type.
@Suite("ACME http-01 validator over real sockets")
struct ACMEValidatorTests {
    /// Answers every request with a fixed status, body and extra headers.
    final class FixedAnswer: ChannelInboundHandler, Sendable {
        typealias InboundIn = HTTPServerRequestPart
        typealias OutboundOut = HTTPServerResponsePart
        let status: HTTPResponseStatus
        let body: String
        let headers: [(String, String)]
        init(status: HTTPResponseStatus, body: String, headers: [(String, String)] = []) {
            self.status = status
            self.body = body
            self.headers = headers
        }
        func channelRead(context: ChannelHandlerContext, data: NIOAny) {
            guard case .end = unwrapInboundIn(data) else { return }
            var head = HTTPResponseHead(version: .http1_1, status: status)
            head.headers.add(name: "content-length", value: String(body.utf8.count))
            for (name, value) in headers { head.headers.add(name: name, value: value) }
            context.write(wrapOutboundOut(.head(head)), promise: nil)
            context.write(wrapOutboundOut(.body(.byteBuffer(ByteBuffer(string: body)))), promise: nil)
            context.writeAndFlush(wrapOutboundOut(.end(nil)), promise: nil)
        }
    }

    static func serve(_ make: @escaping @Sendable () -> FixedAnswer) async throws -> any Channel {
        try await ServerBootstrap(group: MultiThreadedEventLoopGroup.singleton)
            .serverChannelOption(.socketOption(.so_reuseaddr), value: 1)
            .childChannelInitializer { channel in
                channel.eventLoop.makeCompletedFuture {
                    try channel.pipeline.syncOperations.configureHTTPServerPipeline()
                    try channel.pipeline.syncOperations.addHandler(make())
                }
            }
            .bind(host: "127.0.0.1", port: 0).get()
    }

    static func check(port: Int, type: String = "ip", value: String = "127.0.0.1") async -> ACMEProblem? {
        await ACMENetworkValidator().http01(token: "tok", identifier: ACMEIdentifier(type: type, value: value), keyAuthorization: "tok.thumb", port: port)
    }

    @Test("the key authorization (whitespace around it allowed) passes; a wrong body, a 404, a redirect and an oversized answer are incorrectResponse")
    func answers() async throws {
        let cases: [(FixedAnswer, String?)] = [
            (FixedAnswer(status: .ok, body: "tok.thumb\n"), nil),
            (FixedAnswer(status: .ok, body: "tok.other"), "incorrectResponse"),
            (FixedAnswer(status: .notFound, body: "nope"), "incorrectResponse"),
            (FixedAnswer(status: .found, body: "", headers: [("location", "http://127.0.0.1:1/elsewhere")]), "incorrectResponse"),
            (FixedAnswer(status: .ok, body: String(repeating: "x", count: 20_000)), "incorrectResponse"),
        ]
        for (answer, expected) in cases {
            let server = try await Self.serve { FixedAnswer(status: answer.status, body: answer.body, headers: answer.headers) }
            let problem = await Self.check(port: server.localAddress!.port!)
            #expect(problem?.kind.rawValue == expected, "\(answer.status.code): \(problem?.detail ?? "valid")")
            #expect(problem == nil || problem?.status == 403)
            try await server.close()
        }
        // A DNS identifier goes through name resolution: localhost resolves here.
        let server = try await Self.serve { FixedAnswer(status: .ok, body: "tok.thumb") }
        #expect(await Self.check(port: server.localAddress!.port!, type: "dns", value: "localhost") == nil)
        try await server.close()
    }

    @Test("nothing listening: connection, naming the address and the cause")
    func refused() async throws {
        let server = try await Self.serve { FixedAnswer(status: .ok, body: "") }
        let port = server.localAddress!.port!
        try await server.close()
        let problem = await Self.check(port: port)
        #expect(problem?.kind == .connection)
        #expect(problem?.detail.hasPrefix("could not connect to 127.0.0.1:\(port)") == true)
    }
}
