import HummingbirdCore
import HummingbirdTLS
import Logging
import MutualPKI
import NIOCore
import NIOSSL
import NIOHTTP1
import NIOHTTPTypes
import HTTPTypes

/// The authority's TLS listener, which also says why a handshake failed. Hummingbird logs handshake errors only at
/// trace level, so a client refused at the TLS layer (a certificate the CA's root does not sign, an expired one, one
/// whose key usages forbid client authentication) left no trace on the authority: the operator saw nothing while the
/// client saw an alert. Each failure is logged at notice with the peer and BoringSSL's reason code, and counted by that
/// code in `mutual_tls_handshake_failures_total{reason}`.
struct HandshakeLoggingChannel<Base: ServerChildChannel>: ServerChildChannel {
    typealias Value = Base.Value
    let base: Base
    let metrics: ServerMetrics

    func setup(channel: any Channel, logger: Logger) -> EventLoopFuture<Value> {
        base.setup(channel: channel, logger: logger).flatMapThrowing { value in
            let tls = try channel.pipeline.syncOperations.handler(type: NIOSSLServerHandler.self)
            try channel.pipeline.syncOperations.addHandler(
                HandshakeFailureLogger(logger: logger, metrics: metrics), position: .after(tls)
            )
            return value
        }
    }

    func handle(value: Value, logger: Logger) async {
        await base.handle(value: value, logger: logger)
    }
}

extension HandshakeLoggingChannel: HTTPChannelHandler where Base: HTTPChannelHandler {
    var responder: HTTPChannelHandler.Responder { base.responder }
}

extension HTTPServerBuilder {
    /// HTTP/1.1 over TLS (as `.tls(.http1(…))`) with every failed handshake logged and counted.
    static func loggedTLS(http1: HTTP1Channel.Configuration, tls: TLSChannelConfiguration, metrics: ServerMetrics) -> HTTPServerBuilder {
        .init { responder in
            HandshakeLoggingChannel(base: try TLSChannel(HTTP1Channel(responder: responder, configuration: http1), configuration: tls), metrics: metrics)
        }
    }
}

final class HandshakeFailureLogger: ChannelInboundHandler, RemovableChannelHandler {
    typealias InboundIn = NIOAny
    let logger: Logger
    let metrics: ServerMetrics
    private var reported = false

    init(logger: Logger, metrics: ServerMetrics) {
        self.logger = logger
        self.metrics = metrics
    }

    func errorCaught(context: ChannelHandlerContext, error: any Error) {
        if !reported, let ssl = error as? NIOSSLError, case .handshakeFailed(let stack) = ssl {
            reported = true
            let reason = Self.reasonCode("\(stack)")
            metrics.countHandshakeFailure(reason: reason)
            logger.notice("TLS handshake failed", metadata: [
                "reason": "\(reason)", "peer": "\(context.remoteAddress.map { "\($0)" } ?? "-")", "error": "\(stack)",
            ])
        }
        context.fireErrorCaught(error)
    }

    /// BoringSSL's reason code from an error stack (`…:OPENSSL_internal:CERTIFICATE_VERIFY_FAILED…` →
    /// `certificate_verify_failed`): a stable identifier of a bounded set, fit for a metric label.
    static func reasonCode(_ text: String) -> String {
        TLSReasonCodes.last(in: text) ?? "other"
    }
}

/// Requests the HTTP/1.1 parser cannot read (headers over the limits, bad syntax) are answered below the router; by
/// default Hummingbird sends a bare `400` with no body. This handler answers them as every other refusal is answered: a
/// problem+json body with a stable `type` (`headers-too-large` with 431, `malformed-request` with 400), then closes.
final class ParseErrorProblemResponder: ChannelInboundHandler, RemovableChannelHandler {
    typealias InboundIn = HTTPRequestPart
    typealias InboundOut = HTTPRequestPart
    typealias OutboundOut = HTTPResponsePart
    private var answered = false

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        context.fireChannelRead(data)
    }

    func errorCaught(context: ChannelHandlerContext, error: any Error) {
        guard let parse = error as? HTTPParserError else {
            context.fireErrorCaught(error)
            return
        }
        guard !answered else { return }
        answered = true
        let tooLarge = parse == .headerOverflow
        let problem = Self.body(
            code: tooLarge ? "headers-too-large" : "malformed-request", status: tooLarge ? 431 : 400,
            title: tooLarge ? "Request Header Fields Too Large" : "Bad Request",
            detail: tooLarge ? "the request's header section is over the server's limit (80 KiB)" : "the request is not valid HTTP/1.1 (\(parse))"
        )
        var fields = HTTPFields()
        fields[.contentType] = "application/problem+json"
        fields[.contentLength] = String(problem.readableBytes)
        fields[.connection] = "close"
        context.write(wrapOutboundOut(.head(HTTPResponse(status: .init(code: tooLarge ? 431 : 400), headerFields: fields))), promise: nil)
        context.write(wrapOutboundOut(.body(problem)), promise: nil)
        context.writeAndFlush(wrapOutboundOut(.end(nil))).whenComplete { _ in context.close(promise: nil) }
    }

    static func body(code: String, status: Int, title: String, detail: String) -> ByteBuffer {
        ByteBuffer(string: "{\"type\":\(Problem.quote("urn:mutual:problem:\(code)")),\"title\":\(Problem.quote(title)),\"status\":\(status),\"detail\":\(Problem.quote(detail))}")
    }
}
