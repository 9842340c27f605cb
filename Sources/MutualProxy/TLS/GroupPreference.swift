import NIOCore
import NIOSSL

/// The server's key-exchange preference, enforced: a client that can do X25519MLKEM768 gets it, even when it lists
/// x25519 first.
///
/// BoringSSL follows the client's group order unless `SSL_OP_CIPHER_SERVER_PREFERENCE` is set, and swift-nio-ssl
/// does not expose that option. So before TLS starts, this handler reads the ClientHello's `supported_groups`
/// (hand-written: a few bytes of the record, no library offers it) and picks the TLS context for the connection: one
/// that offers only the hybrid group when the client supports it, the full list otherwise. A client whose key share
/// is for x25519 only then gets a HelloRetryRequest for the hybrid group, as the server's preference demands.
final class GroupPreferenceHandler: ChannelInboundHandler, RemovableChannelHandler {
    typealias InboundIn = ByteBuffer
    typealias InboundOut = ByteBuffer

    /// Builds the TLS handler for the chosen context (the caller's verification callback and connection state).
    private let install: (NIOSSLContext, ChannelHandlerContext) throws -> Void
    private let hybridOnly: NIOSSLContext
    private let full: NIOSSLContext
    private var buffered: ByteBuffer?
    private var decided = false

    /// A ClientHello this large is not waited for beyond: one TLS record's worth.
    static let maximumHello = 5 + 16_384

    init(hybridOnly: NIOSSLContext, full: NIOSSLContext, install: @escaping (NIOSSLContext, ChannelHandlerContext) throws -> Void) {
        self.hybridOnly = hybridOnly
        self.full = full
        self.install = install
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        var incoming = unwrapInboundIn(data)
        guard !decided else {
            context.fireChannelRead(data)
            return
        }
        if var buffered {
            buffered.writeBuffer(&incoming)
            self.buffered = buffered
        } else {
            buffered = incoming
        }
        guard let bytes = buffered else { return }
        switch ClientHelloGroups.parse(bytes.readableBytesView) {
        case .needMoreBytes where bytes.readableBytes < Self.maximumHello:
            return
        case .groups(let groups):
            decide(context: context, hybrid: groups.contains(NIOTLSCurve.x25519_MLKEM768.rawValue))
        case .needMoreBytes, .notAClientHello:
            // Not TLS, or not a hello we can read: the full context fails or serves it as BoringSSL decides.
            decide(context: context, hybrid: false)
        }
    }

    private func decide(context: ChannelHandlerContext, hybrid: Bool) {
        decided = true
        do {
            try install(hybrid ? hybridOnly : full, context)
        } catch {
            context.fireErrorCaught(error)
            context.close(promise: nil)
            return
        }
        let bytes = buffered
        buffered = nil
        // The hello goes to the TLS handler now in place after this one; later reads pass straight through.
        if let bytes {
            context.fireChannelRead(wrapInboundOut(bytes))
            context.fireChannelReadComplete()
        }
        context.pipeline.syncOperations.removeHandler(context: context, promise: nil)
    }
}

/// Reads `supported_groups` from a TLS ClientHello at the start of `bytes` (RFC 8446 4.1.2, 4.2.7).
enum ClientHelloGroups {
    enum Result: Equatable {
        case groups([UInt16])
        case needMoreBytes
        case notAClientHello
    }

    static func parse<Bytes: Collection>(_ bytes: Bytes) -> Result where Bytes.Element == UInt8, Bytes.Index == Int {
        var reader = Reader(bytes: Array(bytes.prefix(GroupPreferenceHandler.maximumHello)))
        // Record header: handshake(22), legacy version, length. The hello must fit in the first record here.
        guard let type = reader.u8() else { return .needMoreBytes }
        guard type == 22 else { return .notAClientHello }
        guard reader.skip(2), let recordLength = reader.u16() else { return .needMoreBytes }
        guard reader.remaining >= Int(recordLength) else { return .needMoreBytes }
        reader.limit(to: Int(recordLength))
        guard reader.u8() == 1, let length = reader.u24(), length <= reader.remaining else { return .notAClientHello }
        reader.limit(to: length)
        guard reader.skip(2 + 32), let session = reader.u8(), reader.skip(Int(session)),
              let suites = reader.u16(), reader.skip(Int(suites)), let compression = reader.u8(), reader.skip(Int(compression))
        else { return .notAClientHello }
        guard let extensionsLength = reader.u16(), Int(extensionsLength) <= reader.remaining else { return .groups([]) }
        reader.limit(to: Int(extensionsLength))
        while let type = reader.u16(), let size = reader.u16() {
            guard Int(size) <= reader.remaining else { return .notAClientHello }
            if type == 0x000A {
                guard let listLength = reader.u16(), listLength % 2 == 0, Int(listLength) + 2 <= Int(size) else { return .notAClientHello }
                var groups: [UInt16] = []
                for _ in 0..<(Int(listLength) / 2) { if let group = reader.u16() { groups.append(group) } }
                return .groups(groups)
            }
            _ = reader.skip(Int(size))
        }
        return .groups([])
    }

    private struct Reader {
        var bytes: [UInt8]
        var index = 0
        var end: Int

        init(bytes: [UInt8]) {
            self.bytes = bytes
            self.end = bytes.count
        }

        var remaining: Int { end - index }
        mutating func limit(to count: Int) { end = min(end, index + count) }
        mutating func skip(_ count: Int) -> Bool {
            guard count <= remaining else { return false }
            index += count
            return true
        }
        mutating func u8() -> UInt8? {
            guard remaining >= 1 else { return nil }
            defer { index += 1 }
            return bytes[index]
        }
        mutating func u16() -> UInt16? {
            guard remaining >= 2 else { return nil }
            defer { index += 2 }
            return UInt16(bytes[index]) << 8 | UInt16(bytes[index + 1])
        }
        mutating func u24() -> Int? {
            guard remaining >= 3 else { return nil }
            defer { index += 3 }
            return Int(bytes[index]) << 16 | Int(bytes[index + 1]) << 8 | Int(bytes[index + 2])
        }
    }
}
