import NIOCore
import NIOHTTP1

/// Writes HTTP/1.1 heads and chunk framing as bytes: the relay writes these itself instead of going through NIO's
/// encoders, so a response's body can follow as the bytes the upstream sent. Pure (`HTTP1WireTests`).
enum HTTP1Wire {
    /// Hop-by-hop fields (RFC 9110 §7.6.1), never relayed in either direction.
    static let hopByHop: Set<String> = ["connection", "keep-alive", "proxy-connection", "te", "trailer", "upgrade", "proxy-authenticate", "proxy-authorization"]
    /// Lengths of the hop-by-hop names: a field of another length is kept without looking at its name further.
    static let hopByHopLengths: Set<Int> = Set(hopByHop.map(\.utf8.count))

    /// `METHOD target HTTP/1.1`, the fields, the empty line. Values were validated by the inbound parser or are the
    /// proxy's own (base64, percent-encoded).
    static func writeRequestHead(method: String, target: String, headers: HTTPHeaders, into buffer: inout ByteBuffer) {
        buffer.writeString(method)
        buffer.writeStaticString(" ")
        buffer.writeString(target)
        buffer.writeStaticString(" HTTP/1.1\r\n")
        for (name, value) in headers {
            buffer.writeString(name)
            buffer.writeStaticString(": ")
            buffer.writeString(value)
            buffer.writeStaticString("\r\n")
        }
        buffer.writeStaticString("\r\n")
    }

    /// The upstream's response head as relayed to an HTTP/1.x client: the client's version, the upstream's status
    /// and reason, its field lines copied as they arrived except hop-by-hop ones and those its `Connection` names
    /// (and `Transfer-Encoding` when the body is de-chunked), then `connection: close` when the client connection
    /// ends after this response, or `connection: keep-alive` for an HTTP/1.0 client whose connection stays.
    static func writeResponseHead(
        _ head: ResponseFramer.Head, clientMinorVersion: Int, dropTransferEncoding: Bool, close: Bool, keepAlive: Bool,
        into buffer: inout ByteBuffer
    ) {
        buffer.reserveCapacity(minimumWritableBytes: head.bytes.readableBytes + 32)
        buffer.writeStaticString(clientMinorVersion == 0 ? "HTTP/1.0 " : "HTTP/1.1 ")
        writeStatus(head.status, into: &buffer)
        buffer.writeStaticString(" ")
        if head.reasonLength > 0, let reason = head.bytes.getSlice(at: head.reasonStart, length: head.reasonLength) {
            buffer.writeImmutableBuffer(reason)
        }
        buffer.writeStaticString("\r\n")
        let names = head.connectionNames
        for field in head.fields {
            if hopByHopLengths.contains(field.nameLength) || !names.isEmpty || dropTransferEncoding {
                let lower = head.name(field).lowercased()
                if hopByHop.contains(lower) || names.contains(lower) { continue }
                if dropTransferEncoding && lower == "transfer-encoding" { continue }
            }
            if let line = head.bytes.getSlice(at: field.lineStart, length: field.lineLength) { buffer.writeImmutableBuffer(line) }
        }
        if close {
            buffer.writeStaticString("connection: close\r\n")
        } else if keepAlive {
            buffer.writeStaticString("connection: keep-alive\r\n")
        }
        buffer.writeStaticString("\r\n")
    }

    /// The same head as NIO's types, for HTTP/2 streams (whose codec encodes it).
    static func responseHead(_ head: ResponseFramer.Head, version: HTTPVersion) -> HTTPResponseHead {
        var response = HTTPResponseHead(version: version, status: .init(statusCode: head.status, reasonPhrase: head.reason))
        let names = head.connectionNames
        for field in head.fields {
            let name = head.name(field)
            let lower = name.lowercased()
            if hopByHop.contains(lower) || names.contains(lower) || lower == "transfer-encoding" { continue }
            response.headers.add(name: name, value: head.value(field))
        }
        return response
    }

    /// A response the proxy writes itself (refusals, 502): status, fields, body (left out for HEAD).
    static func writeResponse(
        version: HTTPVersion, status: HTTPResponseStatus, headers: [(String, String)], body: String, omitBody: Bool, into buffer: inout ByteBuffer
    ) {
        buffer.writeStaticString(version.minor == 0 && version.major == 1 ? "HTTP/1.0 " : "HTTP/1.1 ")
        writeStatus(Int(status.code), into: &buffer)
        buffer.writeStaticString(" ")
        buffer.writeString(status.reasonPhrase)
        buffer.writeStaticString("\r\n")
        for (name, value) in headers {
            buffer.writeString(name)
            buffer.writeStaticString(": ")
            buffer.writeString(value)
            buffer.writeStaticString("\r\n")
        }
        buffer.writeStaticString("content-length: ")
        buffer.writeString(String(body.utf8.count))
        buffer.writeStaticString("\r\n\r\n")
        if !omitBody { buffer.writeString(body) }
    }

    private static func writeStatus(_ status: Int, into buffer: inout ByteBuffer) {
        buffer.writeInteger(UInt8(48 + status / 100 % 10))
        buffer.writeInteger(UInt8(48 + status / 10 % 10))
        buffer.writeInteger(UInt8(48 + status % 10))
    }

    /// The line that opens a chunk of `size` bytes.
    static func chunkHeader(size: Int, allocator: ByteBufferAllocator) -> ByteBuffer {
        var buffer = allocator.buffer(capacity: 18)
        buffer.writeString(String(size, radix: 16))
        buffer.writeStaticString("\r\n")
        return buffer
    }

    static let crlf = ByteBuffer(string: "\r\n")

    /// The last chunk and the trailer section.
    static func lastChunk(trailers: HTTPHeaders?) -> ByteBuffer {
        var buffer = ByteBuffer(string: "0\r\n")
        for (name, value) in trailers ?? [:] {
            buffer.writeString(name)
            buffer.writeStaticString(": ")
            buffer.writeString(value)
            buffer.writeStaticString("\r\n")
        }
        buffer.writeStaticString("\r\n")
        return buffer
    }
}
