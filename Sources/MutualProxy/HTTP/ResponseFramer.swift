import NIOCore
import NIOHTTP1

/// Reads an upstream's HTTP/1.1 responses from raw bytes: parses each response head strictly, then finds where the
/// body ends (content length, chunk boundaries, or the upstream closing) without decoding it, so the proxy relays the
/// body as the bytes that arrived. Pure: bytes in, events out; no channel (`ResponseFramerTests`).
///
/// Hand-written because NIO's `HTTPResponseDecoder` turns every body into parts (de-chunking, then re-chunked by the
/// encoder on the way out); no maintained library frames an HTTP/1.1 message while leaving its bytes alone. It is
/// small on purpose: the head grammar of RFC 9112 §4–5, the framing rules of §6.3 and the chunked coding of §7.1.
///
/// A response the framer cannot frame unambiguously is refused (``FramingError``), as nginx refuses it (502): both
/// `Content-Length` and `Transfer-Encoding`, differing lengths, a transfer coding other than `chunked`, a folded
/// or malformed field line. Bytes after a response's end mean the connection is not reused.
struct ResponseFramer {
    /// How a response's body ends.
    enum Framing: Equatable {
        case none
        case length(Int)
        case chunked
        /// Until the upstream closes (no length given): the connection cannot be reused.
        case untilClose
    }

    struct FramingError: Error, Equatable {
        /// Stable code (`upstream_malformed_response`, `upstream_response_too_large`).
        let code: String
        let reason: String
    }

    /// One field line of a head, as offsets into ``Head/bytes``.
    struct Field {
        let nameStart: Int
        let nameLength: Int
        let valueStart: Int
        let valueLength: Int
        /// Where the whole line (name to CRLF inclusive) starts and its length.
        let lineStart: Int
        let lineLength: Int
    }

    /// A final response head, kept as the bytes that arrived with the offsets of its parts.
    struct Head {
        let bytes: ByteBuffer
        let status: Int
        let minorVersion: Int
        /// The reason phrase, as offsets into `bytes`.
        let reasonStart: Int
        let reasonLength: Int
        let fields: [Field]
        let framing: Framing
        /// The upstream allows the connection to be reused after this response.
        let keepAlive: Bool
        /// Field names listed in `Connection` (lower-cased), besides `close` and `keep-alive`.
        let connectionNames: [String]

        func name(_ field: Field) -> String { bytes.getString(at: field.nameStart, length: field.nameLength) ?? "" }
        func value(_ field: Field) -> String { bytes.getString(at: field.valueStart, length: field.valueLength) ?? "" }
        var reason: String { bytes.getString(at: reasonStart, length: reasonLength) ?? "" }

        static func lower(_ byte: UInt8) -> UInt8 { byte >= 65 && byte <= 90 ? byte | 0x20 : byte }
    }

    enum Event {
        case head(Head)
        /// Body bytes: as they arrived (``relayRaw``) or, de-chunked, the content only.
        case body(ByteBuffer)
        /// The response is complete; trailers only when de-chunking and the upstream sent some.
        case end(trailers: HTTPHeaders?, reusable: Bool)
    }

    /// Longest response head accepted (status line and fields); NIO's decoder allows 80 KiB of fields.
    static let maximumHeadBytes = 80 * 1024
    static let maximumFields = 500
    /// Longest chunk-size line (size and extensions) and trailer section.
    static let maximumChunkLineBytes = 4096
    static let maximumTrailerBytes = 16 * 1024

    private enum State {
        case head
        case body(remaining: Int)
        case chunkSize(value: Int, digits: Int, lineBytes: Int, inExtension: Bool, sawCR: Bool)
        case chunkData(remaining: Int)
        case chunkDataCR
        case chunkDataLF
        /// Trailer section: `lineBytes` of the current line, `total` of all of them.
        case trailers(line: [UInt8], total: Int, sawCR: Bool, fields: HTTPHeaders)
        case untilClose
        /// The message's last byte is read; `.end` not yet given.
        case complete
        /// `.end` given.
        case done
    }

    private var state: State = .head
    private var keepAlive = false
    /// Body bytes are handed on as they arrived (true) or de-chunked (false: HTTP/2 and HTTP/1.0 clients).
    var relayRaw: Bool
    /// The response answers a HEAD request: it has no body whatever its fields say.
    let requestWasHEAD: Bool

    init(requestWasHEAD: Bool, relayRaw: Bool) {
        self.requestWasHEAD = requestWasHEAD
        self.relayRaw = relayRaw
    }

    /// The response's end has been given.
    var isComplete: Bool { if case .done = state { true } else { false } }

    /// The next event from `buffer` (consuming what it covers), or nil when more bytes are needed. After `.end`,
    /// bytes left in `buffer` belong to no response.
    mutating func next(_ buffer: inout ByteBuffer) throws(FramingError) -> Event? {
        while true {
            switch state {
            case .done:
                return nil
            case .complete:
                state = .done
                let trailers = finishedTrailers
                finishedTrailers = nil
                return .end(trailers: trailers, reusable: keepAlive)
            case .head:
                guard let head = try parseHead(&buffer) else { return nil }
                if head.status < 200 {
                    // 1xx: informational, not relayed (101 cannot happen: the proxy never asks for an upgrade).
                    guard head.status != 101 else {
                        throw FramingError(code: "upstream_malformed_response", reason: "the upstream switched protocols unasked (101)")
                    }
                    continue
                }
                keepAlive = head.keepAlive
                switch head.framing {
                case .none: state = .complete
                case .length(let length): state = length == 0 ? .complete : .body(remaining: length)
                case .chunked: state = .chunkSize(value: 0, digits: 0, lineBytes: 0, inExtension: false, sawCR: false)
                case .untilClose: state = .untilClose
                }
                return .head(head)
            case .body(let remaining):
                guard buffer.readableBytes > 0 else { return nil }
                let take = min(remaining, buffer.readableBytes)
                let slice = buffer.readSlice(length: take)!
                state = take == remaining ? .complete : .body(remaining: remaining - take)
                return .body(slice)
            case .untilClose:
                guard buffer.readableBytes > 0 else { return nil }
                return .body(buffer.readSlice(length: buffer.readableBytes)!)
            case .chunkSize, .chunkData, .chunkDataCR, .chunkDataLF, .trailers:
                // Bytes before the reader index cannot be read back: keep the unread view (no copy) to slice from.
                let unread = buffer
                var content: ByteBuffer?
                let walked = try walkChunked(&buffer, content: &content, dechunk: !relayRaw)
                if relayRaw {
                    // Everything walked is handed on as it arrived; the framing only says where the message ends.
                    guard walked > 0 else { return nil }
                    return .body(unread.getSlice(at: unread.readerIndex, length: walked)!)
                }
                if let content { return .body(content) }
                if case .complete = state { continue }
                return nil
            }
        }
    }

    /// The end of a body with no length, or the failure of one cut short, when the upstream closes.
    mutating func upstreamClosed() -> Event? {
        guard case .untilClose = state else { return nil }
        state = .done
        return .end(trailers: nil, reusable: false)
    }

    private var finishedTrailers: HTTPHeaders?

    /// Advances through chunked framing; returns how many bytes were consumed. De-chunking, stops after the first run
    /// of chunk data and returns it in `content`, and keeps the trailer fields.
    private mutating func walkChunked(_ buffer: inout ByteBuffer, content: inout ByteBuffer?, dechunk: Bool) throws(FramingError) -> Int {
        let start = buffer.readerIndex
        func fail(_ reason: String) -> FramingError {
            FramingError(code: "upstream_malformed_response", reason: "malformed chunked body: \(reason)")
        }
        loop: while buffer.readableBytes > 0 {
            switch state {
            case .chunkData(let remaining):
                let take = min(remaining, buffer.readableBytes)
                if dechunk {
                    content = buffer.readSlice(length: take)!
                    state = take == remaining ? .chunkDataCR : .chunkData(remaining: remaining - take)
                    break loop
                }
                buffer.moveReaderIndex(forwardBy: take)
                state = take == remaining ? .chunkDataCR : .chunkData(remaining: remaining - take)
            case .chunkDataCR:
                guard buffer.readInteger(as: UInt8.self) == UInt8(ascii: "\r") else { throw fail("chunk data not followed by CRLF") }
                state = .chunkDataLF
            case .chunkDataLF:
                guard buffer.readInteger(as: UInt8.self) == UInt8(ascii: "\n") else { throw fail("chunk data not followed by CRLF") }
                state = .chunkSize(value: 0, digits: 0, lineBytes: 0, inExtension: false, sawCR: false)
            case .chunkSize(var value, var digits, var lineBytes, var inExtension, let sawCR):
                let byte = buffer.readInteger(as: UInt8.self)!
                lineBytes += 1
                guard lineBytes <= Self.maximumChunkLineBytes else { throw fail("chunk-size line too long") }
                if sawCR {
                    guard byte == UInt8(ascii: "\n"), digits > 0 else { throw fail("bad chunk-size line") }
                    if value == 0 {
                        state = .trailers(line: [], total: 0, sawCR: false, fields: HTTPHeaders())
                    } else {
                        state = .chunkData(remaining: value)
                    }
                    continue
                }
                if byte == UInt8(ascii: "\r") {
                    state = .chunkSize(value: value, digits: digits, lineBytes: lineBytes, inExtension: inExtension, sawCR: true)
                    continue
                }
                if inExtension {
                    // chunk-ext: skipped, but no control characters (a bare LF would desynchronise readers).
                    guard byte >= 0x20 || byte == 0x09, byte != 0x7F else { throw fail("control character in a chunk extension") }
                } else if let digit = Self.hexValue(byte) {
                    guard digits < 15 else { throw fail("chunk size too large") }
                    value = value << 4 | digit
                    digits += 1
                } else if byte == UInt8(ascii: ";") || byte == UInt8(ascii: " ") || byte == UInt8(ascii: "\t") {
                    guard digits > 0 else { throw fail("chunk size missing") }
                    inExtension = true
                } else {
                    throw fail("chunk size is not hexadecimal")
                }
                state = .chunkSize(value: value, digits: digits, lineBytes: lineBytes, inExtension: inExtension, sawCR: false)
            case .trailers(var line, let total, let sawCR, var fields):
                let byte = buffer.readInteger(as: UInt8.self)!
                guard total + 1 <= Self.maximumTrailerBytes else { throw fail("trailer section too large") }
                if sawCR {
                    guard byte == UInt8(ascii: "\n") else { throw fail("bare CR in the trailer section") }
                    if line.isEmpty {
                        finishedTrailers = fields.isEmpty ? nil : fields
                        state = .complete
                        break loop
                    }
                    guard let (name, value) = Self.parseFieldLine(line[...]) else { throw fail("malformed trailer field") }
                    if dechunk { fields.add(name: name, value: value) }
                    state = .trailers(line: [], total: total + 1, sawCR: false, fields: fields)
                    continue
                }
                if byte == UInt8(ascii: "\r") {
                    state = .trailers(line: line, total: total + 1, sawCR: true, fields: fields)
                    continue
                }
                line.append(byte)
                state = .trailers(line: line, total: total + 1, sawCR: false, fields: fields)
            default:
                break loop
            }
        }
        return buffer.readerIndex - start
    }

    static func hexValue(_ byte: UInt8) -> Int? {
        switch byte {
        case 48...57: Int(byte - 48)
        case 65...70: Int(byte - 55)
        case 97...102: Int(byte - 87)
        default: nil
        }
    }

    /// RFC 9110 §5.6.2 tchar.
    static func isTokenByte(_ byte: UInt8) -> Bool {
        switch byte {
        case 48...57, 65...90, 97...122: true
        case UInt8(ascii: "!"), UInt8(ascii: "#"), UInt8(ascii: "$"), UInt8(ascii: "%"), UInt8(ascii: "&"), UInt8(ascii: "'"),
             UInt8(ascii: "*"), UInt8(ascii: "+"), UInt8(ascii: "-"), UInt8(ascii: "."), UInt8(ascii: "^"), UInt8(ascii: "_"),
             UInt8(ascii: "`"), UInt8(ascii: "|"), UInt8(ascii: "~"): true
        default: false
        }
    }

    /// field-value bytes: VCHAR, obs-text, SP, HTAB.
    static func isValueByte(_ byte: UInt8) -> Bool { byte == 0x09 || (byte >= 0x20 && byte != 0x7F) }

    /// `name: value` of one line (no CRLF), OWS trimmed; nil when malformed.
    static func parseFieldLine(_ line: ArraySlice<UInt8>) -> (String, String)? {
        guard let colon = line.firstIndex(of: UInt8(ascii: ":")), colon > line.startIndex,
              line[line.startIndex..<colon].allSatisfy(isTokenByte) else { return nil }
        var value = line[(colon + 1)...]
        guard value.allSatisfy(isValueByte) else { return nil }
        while let first = value.first, first == 0x20 || first == 0x09 { value = value.dropFirst() }
        while let last = value.last, last == 0x20 || last == 0x09 { value = value.dropLast() }
        return (String(decoding: line[line.startIndex..<colon], as: UTF8.self), String(decoding: value, as: UTF8.self))
    }

    /// Parses a whole head once its empty line is in; consumes it from `buffer`.
    private func parseHead(_ buffer: inout ByteBuffer) throws(FramingError) -> Head? {
        func malformed(_ reason: String) -> FramingError {
            FramingError(code: "upstream_malformed_response", reason: "the upstream's response is not valid HTTP/1.1: \(reason)")
        }
        // Find the CRLF CRLF that ends the head.
        let headLength: Int? = buffer.withUnsafeReadableBytes { raw in
            let count = min(raw.count, Self.maximumHeadBytes)
            guard count >= 4 else { return nil }
            var index = 3
            while index < count {
                if raw[index] == 0x0A && raw[index - 1] == 0x0D && raw[index - 2] == 0x0A && raw[index - 3] == 0x0D { return index + 1 }
                index += 1
            }
            return nil
        }
        guard let headLength else {
            if buffer.readableBytes >= Self.maximumHeadBytes {
                throw FramingError(code: "upstream_response_too_large", reason: "the upstream's response head exceeds \(Self.maximumHeadBytes) bytes")
            }
            // A first line that cannot begin a status line fails now rather than after 80 KiB.
            let prefix = Array("HTTP/1.".utf8)
            let seen = buffer.readableBytesView.prefix(prefix.count)
            guard seen.elementsEqual(prefix.prefix(seen.count)) else { throw malformed("no status line") }
            return nil
        }
        let bytes = buffer.readSlice(length: headLength)!
        let base = bytes.readerIndex
        var status = 0
        var minor = 0
        var reasonStart = 0
        var reasonLength = 0
        var fields: [Field] = []
        var framing: Framing = .untilClose
        var connectionClose = false
        var connectionKeepAlive = false
        var connectionNames: [String] = []
        var contentLength: Int?
        var transferEncoding: [UInt8]?
        var problem: String?
        bytes.withUnsafeReadableBytes { raw in
            // Status line: HTTP/1.x SP 3DIGIT [SP reason] CRLF.
            let prefix = Array("HTTP/1.".utf8)
            guard raw.count >= 14, raw.prefix(7).elementsEqual(prefix), raw[7] == 48 || raw[7] == 49, raw[8] == 0x20,
                  raw[9...11].allSatisfy({ $0 >= 48 && $0 <= 57 }) else {
                problem = "bad status line"
                return
            }
            minor = Int(raw[7] - 48)
            status = Int(raw[9] - 48) * 100 + Int(raw[10] - 48) * 10 + Int(raw[11] - 48)
            guard status >= 100 else {
                problem = "bad status code"
                return
            }
            var index = 12
            if raw[index] == 0x20 {
                index += 1
                let start = index
                while index < raw.count && raw[index] != 0x0D {
                    guard raw[index] == 0x09 || (raw[index] >= 0x20 && raw[index] != 0x7F) else {
                        problem = "control character in the reason phrase"
                        return
                    }
                    index += 1
                }
                reasonStart = base + start
                reasonLength = index - start
            }
            guard index + 1 < raw.count, raw[index] == 0x0D, raw[index + 1] == 0x0A else {
                problem = "bad status line"
                return
            }
            index += 2
            // Field lines until the empty line.
            while index < raw.count {
                if raw[index] == 0x0D {
                    break  // the final CRLF (the search above guarantees it is CRLF)
                }
                let lineStart = index
                guard raw[index] != 0x20 && raw[index] != 0x09 else {
                    problem = "folded field line (obs-fold)"
                    return
                }
                while index < raw.count && Self.isTokenByte(raw[index]) { index += 1 }
                guard index < raw.count, raw[index] == UInt8(ascii: ":"), index > lineStart else {
                    problem = "malformed field name"
                    return
                }
                let nameLength = index - lineStart
                index += 1
                while index < raw.count && (raw[index] == 0x20 || raw[index] == 0x09) { index += 1 }
                let valueStart = index
                while index < raw.count && raw[index] != 0x0D {
                    guard Self.isValueByte(raw[index]) else {
                        problem = "control character in a field value"
                        return
                    }
                    index += 1
                }
                guard index + 1 < raw.count, raw[index + 1] == 0x0A else {
                    problem = "bare CR in a field line"
                    return
                }
                var valueEnd = index
                while valueEnd > valueStart && (raw[valueEnd - 1] == 0x20 || raw[valueEnd - 1] == 0x09) { valueEnd -= 1 }
                index += 2
                guard fields.count < Self.maximumFields else {
                    problem = "more than \(Self.maximumFields) fields"
                    return
                }
                let field = Field(
                    nameStart: base + lineStart, nameLength: nameLength, valueStart: base + valueStart, valueLength: valueEnd - valueStart,
                    lineStart: base + lineStart, lineLength: index - lineStart
                )
                fields.append(field)
                // The fields that decide framing and reuse.
                let value = raw[valueStart..<valueEnd]
                switch nameLength {
                case 10 where Self.equalsLowercased(raw[lineStart..<(lineStart + 10)], "connection"):
                    for token in value.split(separator: UInt8(ascii: ",")) {
                        let name = String(decoding: token, as: UTF8.self).trimmingSpaces.lowercased()
                        if name == "close" { connectionClose = true } else if name == "keep-alive" { connectionKeepAlive = true } else if !name.isEmpty {
                            connectionNames.append(name)
                        }
                    }
                case 14 where Self.equalsLowercased(raw[lineStart..<(lineStart + 14)], "content-length"):
                    for item in value.split(separator: UInt8(ascii: ","), omittingEmptySubsequences: false) {
                        let digits = item.drop(while: { $0 == 0x20 || $0 == 0x09 }).reversed().drop(while: { $0 == 0x20 || $0 == 0x09 }).reversed()
                        guard !digits.isEmpty, digits.count <= 18, digits.allSatisfy({ $0 >= 48 && $0 <= 57 }) else {
                            problem = "invalid Content-Length"
                            return
                        }
                        let length = digits.reduce(0) { $0 * 10 + Int($1 - 48) }
                        guard contentLength == nil || contentLength == length else {
                            problem = "conflicting Content-Length values"
                            return
                        }
                        contentLength = length
                    }
                case 17 where Self.equalsLowercased(raw[lineStart..<(lineStart + 17)], "transfer-encoding"):
                    transferEncoding = (transferEncoding.map { $0 + [UInt8(ascii: ",")] } ?? []) + Array(value)
                default:
                    break
                }
            }
        }
        if let problem { throw malformed(problem) }
        if let transferEncoding {
            guard contentLength == nil else { throw malformed("both Content-Length and Transfer-Encoding") }
            let codings = transferEncoding.split(separator: UInt8(ascii: ","))
                .map { String(decoding: $0, as: UTF8.self).trimmingSpaces.lowercased() }
                .filter { !$0.isEmpty }
            guard codings == ["chunked"] else {
                throw malformed("transfer coding other than chunked (\(codings.joined(separator: ", ").prefix(80)))")
            }
            framing = .chunked
        } else if let contentLength {
            framing = .length(contentLength)
        }
        if requestWasHEAD || status < 200 || status == 204 || status == 304 { framing = .none }
        let keepAlive = framing != .untilClose && (minor == 1 ? !connectionClose : connectionKeepAlive)
        return Head(
            bytes: bytes, status: status, minorVersion: minor, reasonStart: reasonStart, reasonLength: reasonLength, fields: fields,
            framing: framing, keepAlive: keepAlive, connectionNames: connectionNames
        )
    }

    static func equalsLowercased(_ bytes: UnsafeRawBufferPointer.SubSequence, _ lowercased: StaticString) -> Bool {
        guard bytes.count == lowercased.utf8CodeUnitCount else { return false }
        let expected = UnsafeBufferPointer(start: lowercased.utf8Start, count: lowercased.utf8CodeUnitCount)
        var index = 0
        for byte in bytes {
            if Head.lower(byte) != expected[index] { return false }
            index += 1
        }
        return true
    }
}

extension String {
    fileprivate var trimmingSpaces: Substring {
        var view = self[...]
        while let first = view.first, first == " " || first == "\t" { view = view.dropFirst() }
        while let last = view.last, last == " " || last == "\t" { view = view.dropLast() }
        return view
    }
}
