import HummingbirdCore
import HummingbirdTLS
import Logging
import NIOCore
import NIOSSL

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
        guard let range = text.range(of: "OPENSSL_internal:", options: .backwards) else { return "other" }
        let code = text[range.upperBound...].prefix { $0.isLetter || $0.isNumber || $0 == "_" }
        return code.isEmpty ? "other" : code.lowercased()
    }
}
