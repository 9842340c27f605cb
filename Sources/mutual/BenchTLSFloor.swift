import ArgumentParser
import MutualProxy
import NIOCore
import NIOHTTP1
import NIOPosix
import NIOSSL

/// The floor of the stack `mutual proxy` is built on, for the issue #5 performance analysis: SwiftNIO, swift-nio-ssl
/// and NIO's HTTP/1.1 codec with BoringSSL's own client-certificate check, answering `200 ok` itself. No upstream,
/// no policy, no identity headers, no metrics. Run by `../shared/bench/peers.sh` in place of the proxy
/// (`OUR_PROXY_CMD`), it measures what one keep-alive request and one idle mTLS connection cost on this stack before
/// the proxy does any of its own work.
struct BenchTLSFloor: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "tls-floor",
        abstract: "Bench only: a bare NIO + swift-nio-ssl mTLS server answering 200 itself (the proxy's stack floor)."
    )

    @Option(help: "HOST:PORT to listen on.") var listen = "127.0.0.1:9443"
    @Option(help: "Server certificate chain (PEM).") var cert: String
    @Option(help: "Server private key (PEM).") var key: String
    @Option(help: "CA bundle client certificates must chain to (PEM).") var clientCa: String

    func run() async throws {
        let address = try await failing { try SocketAddressSpec(parsing: listen, what: "--listen") }
        func load<T>(_ flag: String, _ path: String, _ body: () throws -> T) throws -> T {
            do { return try body() } catch { throw CommandFailure("cannot load \(flag) \(path): \(error)", exitCode: 2) }
        }
        func certificates(_ flag: String, _ path: String) throws -> [NIOSSLCertificate] {
            let found = try load(flag, path) { try NIOSSLCertificate.fromPEMFile(path) }
            guard !found.isEmpty else { throw CommandFailure("\(flag) \(path) holds no PEM certificate", exitCode: 2) }
            return found
        }
        let chain = try certificates("--cert", cert)
        let privateKey = try load("--key", key) { try NIOSSLPrivateKey(file: key, format: .pem) }
        let roots = try certificates("--client-ca", clientCa)
        var tls = TLSConfiguration.makeServerConfiguration(certificateChain: chain.map { .certificate($0) }, privateKey: .privateKey(privateKey))
        tls.certificateVerification = .noHostnameVerification
        tls.trustRoots = .certificates(roots)
        let context = try await failing { try NIOSSLContext(configuration: tls) }
        let server = try await ServerBootstrap(group: MultiThreadedEventLoopGroup.singleton)
            .serverChannelOption(.backlog, value: 1024)
            .serverChannelOption(.socketOption(.so_reuseaddr), value: 1)
            .childChannelInitializer { channel in
                channel.eventLoop.makeCompletedFuture {
                    try channel.pipeline.syncOperations.addHandler(NIOSSLServerHandler(context: context))
                    try channel.pipeline.syncOperations.configureHTTPServerPipeline(withErrorHandling: true)
                    try channel.pipeline.syncOperations.addHandler(OKResponder())
                }
            }
            .bind(host: address.host, port: address.port).get()
        print("mutual bench tls-floor: https://\(address.host):\(address.port)/ (mTLS, answers 200 itself)")
        try await server.closeFuture.get()
    }
}

/// Answers every request with `200 ok`, keeping the connection open when the client asked for keep-alive.
private final class OKResponder: ChannelInboundHandler {
    typealias InboundIn = HTTPServerRequestPart
    typealias OutboundOut = HTTPServerResponsePart

    private var keepAlive = true
    private let body = ByteBuffer(string: "ok")

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        switch unwrapInboundIn(data) {
        case .head(let head):
            keepAlive = head.isKeepAlive
        case .body:
            break
        case .end:
            var headers = HTTPHeaders()
            headers.add(name: "content-length", value: "2")
            if !keepAlive { headers.add(name: "connection", value: "close") }
            context.write(wrapOutboundOut(.head(HTTPResponseHead(version: .http1_1, status: .ok, headers: headers))), promise: nil)
            context.write(wrapOutboundOut(.body(.byteBuffer(body))), promise: nil)
            let keep = keepAlive
            context.writeAndFlush(wrapOutboundOut(.end(nil))).whenComplete { _ in
                if !keep { context.close(promise: nil) }
            }
        }
    }
}
