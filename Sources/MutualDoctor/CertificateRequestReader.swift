import NIOCore
import SwiftASN1
import X509

/// Reads a server's plaintext TLS 1.2 handshake flight for the one thing a TLS client library does not hand to its
/// caller: the CA names of the server's CertificateRequest ("acceptable client certificate CA names"). Hand-written
/// because swift-nio-ssl exposes them only to servers; it reads record and handshake framing only (RFC 5246 §6.2.1,
/// §7.4, §7.4.4), and stops at the first record that is not a handshake record (TLS 1.3 encrypts the request, so a
/// 1.3 server is asked again with TLS 1.2 at most).
public struct CertificateRequestReader: Sendable {
    public enum Outcome: Sendable, Equatable {
        /// The server asked for a client certificate from one of these CAs (empty: any CA).
        case requested([DistinguishedName])
        /// The server finished its flight (ServerHelloDone) without asking for a client certificate.
        case notRequested
        /// The flight could not be read as TLS 1.2 handshake records (a TLS 1.3 server, or not TLS).
        case unreadable
    }

    private var records: [UInt8] = []
    private var handshake: [UInt8] = []
    private(set) public var outcome: Outcome?
    /// Bound on what is buffered: a server flight with a few certificates is well under this.
    static let limit = 256 * 1024

    public init() {}

    /// Feeds bytes the server sent; returns the outcome once it is known.
    public mutating func feed(_ bytes: some Sequence<UInt8>) -> Outcome? {
        guard outcome == nil else { return outcome }
        records.append(contentsOf: bytes)
        while records.count >= 5 {
            let type = records[0]
            let length = Int(records[3]) << 8 | Int(records[4])
            guard type == 22, records[1] == 3, length <= 16_384 + 2048 else {
                outcome = .unreadable
                return outcome
            }
            guard records.count >= 5 + length else { break }
            handshake.append(contentsOf: records[5..<(5 + length)])
            records.removeFirst(5 + length)
            if let found = readMessages() {
                outcome = found
                return outcome
            }
        }
        if records.count + handshake.count > Self.limit { outcome = .unreadable }
        return outcome
    }

    /// Consumes complete handshake messages; the outcome once a CertificateRequest (13) or ServerHelloDone (14) is seen.
    private mutating func readMessages() -> Outcome? {
        while handshake.count >= 4 {
            let type = handshake[0]
            let length = Int(handshake[1]) << 16 | Int(handshake[2]) << 8 | Int(handshake[3])
            guard handshake.count >= 4 + length else { return nil }
            let body = Array(handshake[4..<(4 + length)])
            handshake.removeFirst(4 + length)
            switch type {
            case 13: return Self.parseCertificateRequest(body).map(Outcome.requested) ?? .unreadable
            case 14: return .notRequested
            default: continue
            }
        }
        return nil
    }

    /// TLS 1.2 CertificateRequest: certificate_types<1..255>, supported_signature_algorithms<2..2^16-2>,
    /// certificate_authorities<0..2^16-1> of DistinguishedName<1..2^16-1> (DER).
    static func parseCertificateRequest(_ body: [UInt8]) -> [DistinguishedName]? {
        var index = 0
        func take(_ count: Int) -> ArraySlice<UInt8>? {
            guard count >= 0, index + count <= body.count else { return nil }
            defer { index += count }
            return body[index..<(index + count)]
        }
        func length(_ bytes: Int) -> Int? {
            guard let raw = take(bytes) else { return nil }
            return raw.reduce(0) { $0 << 8 | Int($1) }
        }
        guard let types = length(1), take(types) != nil,
              let algorithms = length(2), take(algorithms) != nil,
              let total = length(2), var list = take(total)
        else { return nil }
        var names: [DistinguishedName] = []
        while !list.isEmpty {
            guard list.count >= 2 else { return nil }
            let size = Int(list[list.startIndex]) << 8 | Int(list[list.startIndex + 1])
            list = list.dropFirst(2)
            guard size <= list.count, let name = try? DistinguishedName(derEncoded: Array(list.prefix(size))) else { return nil }
            names.append(name)
            list = list.dropFirst(size)
        }
        return names
    }
}

/// Passes the server's bytes through unchanged, showing each to a `CertificateRequestReader` until it has an outcome.
final class CertificateRequestSniffer: ChannelInboundHandler, @unchecked Sendable {
    // @unchecked: `reader` is touched only on the channel's event loop, and read after the channel closed.
    typealias InboundIn = ByteBuffer
    typealias InboundOut = ByteBuffer
    private(set) var reader = CertificateRequestReader()
    /// Close the connection as soon as the outcome is known (a probe that wants nothing else from the server).
    let closeWhenKnown: Bool

    init(closeWhenKnown: Bool) { self.closeWhenKnown = closeWhenKnown }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        if reader.outcome == nil, reader.feed(unwrapInboundIn(data).readableBytesView) != nil, closeWhenKnown {
            context.close(promise: nil)
            return
        }
        context.fireChannelRead(data)
    }
}
