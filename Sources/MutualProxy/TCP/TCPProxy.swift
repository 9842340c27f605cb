import Foundation
import MutualPKI
import NIOCore
import NIOPosix
import NIOSSL
import NIOTLS
import X509

/// Joins two channels on one event loop: what one reads the other writes, with back-pressure (a side only reads
/// while its partner is writable), and closing either closes both.
final class GlueHandler: ChannelDuplexHandler, RemovableChannelHandler {
    typealias InboundIn = ByteBuffer
    typealias OutboundIn = ByteBuffer
    typealias OutboundOut = ByteBuffer

    private var partner: GlueHandler?
    private var context: ChannelHandlerContext?
    private var pendingRead = false
    private(set) var bytesRead = 0
    /// Called once when this side closes, with (bytes this side read, bytes the partner read).
    var onClose: ((Int, Int) -> Void)?

    static func pair() -> (GlueHandler, GlueHandler) {
        let first = GlueHandler()
        let second = GlueHandler()
        first.partner = second
        second.partner = first
        return (first, second)
    }

    func handlerAdded(context: ChannelHandlerContext) { self.context = context }

    func handlerRemoved(context: ChannelHandlerContext) {
        self.context = nil
        self.partner = nil
    }

    private func partnerWrite(_ data: ByteBuffer) { context?.write(wrapOutboundOut(data), promise: nil) }
    private func partnerFlush() { context?.flush() }
    private func partnerClose() { context?.close(promise: nil) }
    private var partnerWritable: Bool { context?.channel.isWritable ?? false }
    private func partnerBecameWritable() {
        if pendingRead {
            pendingRead = false
            context?.read()
        }
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        let buffer = unwrapInboundIn(data)
        bytesRead += buffer.readableBytes
        partner?.partnerWrite(buffer)
    }

    func channelReadComplete(context: ChannelHandlerContext) { partner?.partnerFlush() }

    func channelInactive(context: ChannelHandlerContext) {
        if let onClose {
            self.onClose = nil
            onClose(bytesRead, partner?.bytesRead ?? 0)
        }
        partner?.partnerClose()
        context.fireChannelInactive()
    }

    func userInboundEventTriggered(context: ChannelHandlerContext, event: Any) {
        if let event = event as? ChannelEvent, case .inputClosed = event {
            partner?.partnerClose()
            context.close(promise: nil)
            return
        }
        context.fireUserInboundEventTriggered(event)
    }

    func errorCaught(context: ChannelHandlerContext, error: any Error) { context.close(promise: nil) }

    func channelWritabilityChanged(context: ChannelHandlerContext) {
        if context.channel.isWritable { partner?.partnerBecameWritable() }
        context.fireChannelWritabilityChanged()
    }

    func read(context: ChannelHandlerContext) {
        if partner?.partnerWritable ?? false { context.read() } else { pendingRead = true }
    }

    /// Replaces `handler` (at `context`, which buffered the bytes read so far) by a glued pair with `upstream`:
    /// `first` goes upstream before anything else, `onClose` reports the byte counts when the connection ends.
    static func join(
        _ context: ChannelHandlerContext, replacing handler: any ChannelHandler, upstream: any Channel, first: [ByteBuffer],
        onClose: @escaping (Int, Int) -> Void
    ) {
        let (inbound, outbound) = pair()
        inbound.onClose = onClose
        do {
            try upstream.pipeline.syncOperations.addHandler(outbound)
            for buffer in first { upstream.write(buffer, promise: nil) }
            upstream.flush()
            try context.pipeline.syncOperations.addHandler(inbound, position: .after(handler))
            let channel = context.channel
            context.pipeline.syncOperations.removeHandler(context: context, promise: nil)
            channel.read()  // listeners that start with autoRead off begin reading now
        } catch {
            upstream.close(promise: nil)
            context.close(promise: nil)
        }
    }
}

/// tcp mode: after the handshake, checks the identity against the listener's allow list, connects to the upstream
/// (optionally announcing the client with a PROXY v2 header), then glues the two connections.
final class TCPInboundHandler: ChannelInboundHandler, RemovableChannelHandler {
    typealias InboundIn = ByteBuffer

    let state: InboundState
    let runtime: ProxyRuntime
    private var buffered: [ByteBuffer] = []
    private var connecting = false
    private let started = ContinuousClock.now

    init(state: InboundState, runtime: ProxyRuntime) {
        self.state = state
        self.runtime = runtime
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        buffered.append(unwrapInboundIn(data))
    }

    /// The verified client, from the handshake observer's ``PeerVerifiedEvent``.
    private var peer: VerifiedPeer?
    private var resumed = false

    func userInboundEventTriggered(context: ChannelHandlerContext, event: Any) {
        if let verified = event as? PeerVerifiedEvent {
            peer = verified.peer
            resumed = verified.resumed
            return
        }
        guard case TLSUserEvent.handshakeCompleted = event, !connecting else {
            context.fireUserInboundEventTriggered(event)
            return
        }
        connecting = true
        switch state.policy.decide(method: "CONNECT", path: "/", peer: peer) {
        case .allow:
            break
        case .deny(let reason), .unauthenticated(let reason):
            log(peer: peer, decision: "deny", reason: reason, status: 403, bytesIn: 0, bytesOut: 0, context: context)
            runtime.metrics.requestCounter(listener: state.name, route: "tcp", status: 403).increment()
            context.close(promise: nil)
            return
        }
        var header: ByteBuffer?
        if state.configuration.proxyProtocol == true, let peer {
            let version = try? context.pipeline.syncOperations.handler(type: NIOSSLServerHandler.self).tlsVersion
            header = ProxyProtocolV2.header(
                source: context.channel.remoteAddress, destination: context.channel.localAddress, peer: peer,
                tlsVersion: version, resumed: resumed, allocator: context.channel.allocator
            )
        }
        let loopBound = NIOLoopBound((self, context), eventLoop: context.eventLoop)
        ClientBootstrap(group: context.eventLoop)
            .channelOption(.socketOption(.tcp_nodelay), value: 1)
            .connectTimeout(.seconds(5))
            .connect(host: state.upstream.host, port: state.upstream.port)
            .assumeIsolated()
            .whenComplete { result in
                let (handler, context) = loopBound.value
                handler.connected(context: context, result: result, header: header)
            }
    }

    private func connected(context: ChannelHandlerContext, result: Result<any Channel, any Error>, header: ByteBuffer?) {
        switch result {
        case .failure(let error):
            let reason = "upstream \(state.upstream.host):\(state.upstream.port) unreachable: \(HTTPProxyHandler.describe(error))"
            runtime.logger.warning("upstream unreachable", metadata: ["listener": "\(state.name)", "error": "\(reason)"])
            log(peer: peer, decision: "error", reason: reason, status: 502, bytesIn: 0, bytesOut: 0, context: context)
            context.close(promise: nil)
        case .success(let upstream):
            guard context.channel.isActive else {
                upstream.close(promise: nil)
                return
            }
            let name = state.name
            let peer = self.peer
            let started = self.started
            let runtime = self.runtime
            let remote = context.channel.remoteAddress?.display
            let first = (header.map { [$0] } ?? []) + buffered
            buffered = []
            GlueHandler.join(context, replacing: self, upstream: upstream, first: first) { bytesIn, bytesOut in
                runtime.metrics.requestCounter(listener: name, route: "tcp", status: 200).increment()
                runtime.accessLog.record(.init(
                    listener: name, client: peer?.displayName, serial: peer?.serial, method: nil, path: nil, route: "tcp",
                    decision: "allow", reason: "connection closed", status: 200, bytesIn: bytesIn, bytesOut: bytesOut,
                    latency: ContinuousClock.now - started, peer: remote
                ))
            }
        }
    }

    private func log(peer: VerifiedPeer?, decision: String, reason: String, status: Int, bytesIn: Int, bytesOut: Int, context: ChannelHandlerContext) {
        runtime.accessLog.record(.init(
            listener: state.name, client: peer?.displayName, serial: peer?.serial, method: nil, path: nil, route: "tcp",
            decision: decision, reason: reason, status: status, bytesIn: bytesIn, bytesOut: bytesOut,
            latency: ContinuousClock.now - started, peer: context.channel.remoteAddress?.display
        ))
    }
}

/// PROXY protocol version 2 (HAProxy's proxy-protocol.txt, section 2.2) with the SSL TLV, as HAProxy sends it with
/// `send-proxy-v2-ssl-cn`. Hand-written: no maintained Swift library encodes it.
public enum ProxyProtocolV2 {
    static let signature: [UInt8] = [0x0D, 0x0A, 0x0D, 0x0A, 0x00, 0x0D, 0x0A, 0x51, 0x55, 0x49, 0x54, 0x0A]
    static let typeSSL: UInt8 = 0x20
    static let subtypeVersion: UInt8 = 0x21
    static let subtypeCN: UInt8 = 0x22
    /// Custom TLV types (0xE0–0xEF are reserved for applications): the client leaf certificate's DER and its identity.
    public static let typeClientCertificate: UInt8 = 0xE0
    public static let typeClientIdentity: UInt8 = 0xE1
    static let clientSSL: UInt8 = 0x01
    static let clientCertConnection: UInt8 = 0x02
    static let clientCertSession: UInt8 = 0x04

    public static func header(
        source: SocketAddress?, destination: SocketAddress?, peer: VerifiedPeer, tlsVersion: TLSVersion?, resumed: Bool,
        allocator: ByteBufferAllocator
    ) -> ByteBuffer {
        var addresses = allocator.buffer(capacity: 36)
        var family: UInt8 = 0x00
        switch (source, destination) {
        case (.v4(let s)?, .v4(let d)?):
            family = 0x11
            withUnsafeBytes(of: s.address.sin_addr.s_addr) { addresses.writeBytes($0) }
            withUnsafeBytes(of: d.address.sin_addr.s_addr) { addresses.writeBytes($0) }
            addresses.writeInteger(UInt16(s.address.sin_port.bigEndian))
            addresses.writeInteger(UInt16(d.address.sin_port.bigEndian))
        case (.v6(let s)?, .v6(let d)?):
            family = 0x21
            withUnsafeBytes(of: s.address.sin6_addr) { addresses.writeBytes($0) }
            withUnsafeBytes(of: d.address.sin6_addr) { addresses.writeBytes($0) }
            addresses.writeInteger(UInt16(s.address.sin6_port.bigEndian))
            addresses.writeInteger(UInt16(d.address.sin6_port.bigEndian))
        default:
            family = 0x00
        }
        var ssl = allocator.buffer(capacity: 128)
        ssl.writeInteger(clientSSL | clientCertConnection | (resumed ? clientCertSession : 0))
        ssl.writeInteger(UInt32(0))  // verify: 0 = the client certificate verified
        if let name = versionName(tlsVersion) { writeTLV(&ssl, subtypeVersion, Array(name.utf8)) }
        if let cn = peer.commonName { writeTLV(&ssl, subtypeCN, Array(cn.utf8)) }
        var tlvs = allocator.buffer(capacity: 1024)
        writeTLV(&tlvs, typeSSL, Array(ssl.readableBytesView))
        if let der = try? peer.leaf.der { writeTLV(&tlvs, typeClientCertificate, der) }
        writeTLV(&tlvs, typeClientIdentity, Array(peer.displayName.utf8))

        var header = allocator.buffer(capacity: 16 + addresses.readableBytes + tlvs.readableBytes)
        header.writeBytes(signature)
        header.writeInteger(UInt8(0x21))  // version 2, PROXY command
        header.writeInteger(family)
        header.writeInteger(UInt16(addresses.readableBytes + tlvs.readableBytes))
        header.writeBuffer(&addresses)
        header.writeBuffer(&tlvs)
        return header
    }

    static func writeTLV(_ buffer: inout ByteBuffer, _ type: UInt8, _ value: [UInt8]) {
        buffer.writeInteger(type)
        buffer.writeInteger(UInt16(value.count))
        buffer.writeBytes(value)
    }

    static func versionName(_ version: TLSVersion?) -> String? {
        switch version {
        case .tlsv13?: return "TLSv1.3"
        case .tlsv12?: return "TLSv1.2"
        case .tlsv11?: return "TLSv1.1"
        case .tlsv1?: return "TLSv1"
        default: return nil
        }
    }
}
