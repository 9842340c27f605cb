import NIOCore
import NIOTLS
import NIOEmbedded
import NIOSSL

/// A TLS client and server joined in memory: two `EmbeddedChannel`s whose bytes are carried across by ``interact()``,
/// so handshakes (certificates, groups, signature algorithms, verification callbacks) are tested without sockets, as
/// swift-nio-ssl's own tests do.
public final class TLSPair {
    public let client: EmbeddedChannel
    public let server: EmbeddedChannel
    public let clientEvents = EventRecorder()
    public let serverEvents = EventRecorder()

    public init(
        client clientContext: NIOSSLContext, server serverContext: NIOSSLContext, serverHostname: String? = nil,
        serverVerification: NIOSSLCustomVerificationCallback? = nil, clientVerification: NIOSSLCustomVerificationCallback? = nil
    ) throws {
        client = EmbeddedChannel()
        server = EmbeddedChannel()
        let clientHandler = try clientVerification.map {
            try NIOSSLClientHandler(context: clientContext, serverHostname: serverHostname, customVerificationCallback: $0)
        } ?? NIOSSLClientHandler(context: clientContext, serverHostname: serverHostname)
        let serverHandler = serverVerification.map { NIOSSLServerHandler(context: serverContext, customVerificationCallback: $0) }
            ?? NIOSSLServerHandler(context: serverContext)
        try client.pipeline.syncOperations.addHandlers([clientHandler, clientEvents])
        try server.pipeline.syncOperations.addHandlers([serverHandler, serverEvents])
    }

    /// Connects the client and carries bytes both ways until neither side has anything left to send.
    public func handshake() throws {
        _ = try client.connect(to: SocketAddress(ipAddress: "127.0.0.1", port: 443)).wait()
        _ = try server.connect(to: SocketAddress(ipAddress: "127.0.0.1", port: 50000)).wait()
        try interact()
    }

    public func interact() throws {
        var rounds = 0
        while rounds < 64 {
            rounds += 1
            var moved = false
            client.embeddedEventLoop.run()
            server.embeddedEventLoop.run()
            while let bytes = try client.readOutbound(as: ByteBuffer.self) {
                moved = true
                try server.writeInbound(bytes)
            }
            while let bytes = try server.readOutbound(as: ByteBuffer.self) {
                moved = true
                try client.writeInbound(bytes)
            }
            if !moved { return }
        }
    }

    /// Records the TLS events and errors a side saw.
    public final class EventRecorder: ChannelInboundHandler, @unchecked Sendable {
        public typealias InboundIn = ByteBuffer
        public private(set) var events: [TLSUserEvent] = []
        public private(set) var errors: [any Error] = []
        public var handshakeCompleted: Bool { events.contains { if case .handshakeCompleted = $0 { true } else { false } } }

        public func userInboundEventTriggered(context: ChannelHandlerContext, event: Any) {
            if let tls = event as? TLSUserEvent { events.append(tls) }
            context.fireUserInboundEventTriggered(event)
        }

        public func errorCaught(context: ChannelHandlerContext, error: any Error) {
            errors.append(error)
        }
    }
}
