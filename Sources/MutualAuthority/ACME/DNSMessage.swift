import Foundation

/// The small part of DNS (RFC 1035) that dns-01 validation needs: a TXT query, and the TXT strings of the answer.
///
/// Hand-written because none of the listed packages has a DNS client; kept to one question, one record type, and a
/// parser that refuses anything malformed (truncated messages, compression pointers that loop or point forward,
/// labels over 63 bytes, names over 255) rather than guessing.
public enum DNSMessage {
    public static let typeTXT: UInt16 = 16
    public static let typeCNAME: UInt16 = 5

    public struct ParseError: Error, Equatable, CustomStringConvertible {
        public var reason: String
        public var description: String { reason }
    }

    /// The answer to one query: the response code, whether it was truncated (retry over TCP), and the TXT strings
    /// (each record's character-strings joined) of the records owned by the queried name or a CNAME target of it.
    public struct Answer: Equatable {
        public var id: UInt16
        public var rcode: UInt8
        public var truncated: Bool
        public var txt: [String]
    }

    /// A recursive TXT query for `name`.
    public static func query(id: UInt16, name: String) throws -> [UInt8] {
        var bytes: [UInt8] = [UInt8(id >> 8), UInt8(id & 0xFF), 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0]  // RD, one question
        bytes += try encodeName(name)
        bytes += [0, 16, 0, 1]  // TXT, IN
        return bytes
    }

    static func encodeName(_ name: String) throws -> [UInt8] {
        var bytes: [UInt8] = []
        let trimmed = name.hasSuffix(".") ? String(name.dropLast()) : name
        for label in trimmed.split(separator: ".", omittingEmptySubsequences: false) {
            let utf8 = Array(label.utf8)
            guard !utf8.isEmpty, utf8.count <= 63 else { throw ParseError(reason: "invalid DNS name '\(name.prefix(80))'") }
            bytes.append(UInt8(utf8.count))
            bytes += utf8
        }
        bytes.append(0)
        guard bytes.count <= 255 else { throw ParseError(reason: "DNS name longer than 255 bytes") }
        return bytes
    }

    /// Parses a response to `query(id:name:)`.
    public static func parse(_ bytes: [UInt8], expectedID: UInt16, name: String) throws -> Answer {
        guard bytes.count >= 12 else { throw ParseError(reason: "the DNS response is shorter than its header") }
        let id = UInt16(bytes[0]) << 8 | UInt16(bytes[1])
        guard id == expectedID else { throw ParseError(reason: "the DNS response answers another query (id \(id))") }
        guard bytes[2] & 0x80 != 0 else { throw ParseError(reason: "the DNS message is not a response") }
        let truncated = bytes[2] & 0x02 != 0
        let rcode = bytes[3] & 0x0F
        let questions = Int(bytes[4]) << 8 | Int(bytes[5])
        let answers = Int(bytes[6]) << 8 | Int(bytes[7])
        var offset = 12
        for _ in 0..<questions {
            _ = try readName(bytes, at: &offset)
            guard offset + 4 <= bytes.count else { throw ParseError(reason: "the DNS question is truncated") }
            offset += 4
        }
        var owners: Set<String> = [name.lowercased().trimmingCharacters(in: CharacterSet(charactersIn: "."))]
        var txt: [String] = []
        for _ in 0..<answers {
            let owner = try readName(bytes, at: &offset)
            guard offset + 10 <= bytes.count else { throw ParseError(reason: "a DNS answer record is truncated") }
            let type = UInt16(bytes[offset]) << 8 | UInt16(bytes[offset + 1])
            let length = Int(bytes[offset + 8]) << 8 | Int(bytes[offset + 9])
            offset += 10
            guard offset + length <= bytes.count else { throw ParseError(reason: "a DNS record's data runs past the message") }
            let end = offset + length
            if owners.contains(owner) {
                if type == typeCNAME {
                    var target = offset
                    owners.insert(try readName(bytes, at: &target))
                } else if type == typeTXT {
                    var position = offset
                    var joined: [UInt8] = []
                    while position < end {
                        let size = Int(bytes[position])
                        guard position + 1 + size <= end else { throw ParseError(reason: "a TXT string runs past its record") }
                        joined += bytes[(position + 1)..<(position + 1 + size)]
                        position += 1 + size
                    }
                    txt.append(String(decoding: joined, as: UTF8.self))
                }
            }
            offset = end
        }
        return Answer(id: id, rcode: rcode, truncated: truncated, txt: txt)
    }

    /// Reads a possibly compressed name (lowercased, no trailing dot); pointers must point backwards, so they cannot
    /// loop.
    static func readName(_ bytes: [UInt8], at offset: inout Int) throws -> String {
        var labels: [String] = []
        var position = offset
        var jumped = false
        var total = 0
        while true {
            guard position < bytes.count else { throw ParseError(reason: "a DNS name runs past the message") }
            let length = Int(bytes[position])
            if length & 0xC0 == 0xC0 {
                guard position + 1 < bytes.count else { throw ParseError(reason: "a DNS compression pointer is truncated") }
                let target = (length & 0x3F) << 8 | Int(bytes[position + 1])
                guard target < position else { throw ParseError(reason: "a DNS compression pointer does not point backwards") }
                if !jumped { offset = position + 2 }
                jumped = true
                position = target
                continue
            }
            guard length & 0xC0 == 0 else { throw ParseError(reason: "unknown DNS label type") }
            if length == 0 {
                if !jumped { offset = position + 1 }
                return labels.joined(separator: ".")
            }
            guard position + 1 + length <= bytes.count else { throw ParseError(reason: "a DNS label runs past the message") }
            total += length + 1
            guard total <= 255 else { throw ParseError(reason: "a DNS name is longer than 255 bytes") }
            labels.append(String(decoding: bytes[(position + 1)..<(position + 1 + length)], as: UTF8.self).lowercased())
            position += 1 + length
        }
    }
}
