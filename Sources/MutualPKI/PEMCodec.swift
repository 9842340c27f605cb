import Foundation

/// Byte-level PEM encoding and decoding for the hot path (one CSR in, one certificate out per issuance).
///
/// Hand-written because swift-asn1's `PEMDocument` walks `String` indices character by character, which showed up
/// as ~10 % of the authority's CPU per certificate under load (see BENCHMARKS.md). This codec handles exactly one
/// block with a known label and falls back to nothing: anything unusual is an error, reported by the caller.
public enum PEMCodec {
    /// Encodes DER as a PEM block with 64-character lines and `\n` line ends.
    public static func encode(_ der: [UInt8], label: String) -> String {
        let base64 = Data(der).base64EncodedString()
        var out = "-----BEGIN \(label)-----\n"
        out.reserveCapacity(base64.utf8.count + base64.utf8.count / 64 + 64)
        var line = Substring(base64)
        while !line.isEmpty {
            out += line.prefix(64)
            out += "\n"
            line = line.dropFirst(64)
        }
        out += "-----END \(label)-----\n"
        return out
    }

    /// Decodes the first block with `label` in `bytes`; nil when there is none or its base64 is invalid.
    public static func decode(_ bytes: [UInt8], label: String) -> [UInt8]? {
        let begin = Array("-----BEGIN \(label)-----".utf8)
        let end = Array("-----END \(label)-----".utf8)
        guard let start = find(begin, in: bytes, from: 0) else { return nil }
        let bodyStart = start + begin.count
        guard let stop = find(end, in: bytes, from: bodyStart) else { return nil }
        var base64: [UInt8] = []
        base64.reserveCapacity(stop - bodyStart)
        for byte in bytes[bodyStart..<stop] {
            switch byte {
            case 0x0A, 0x0D, 0x20, 0x09: continue
            case 0x41...0x5A, 0x61...0x7A, 0x30...0x39, 0x2B, 0x2F, 0x3D: base64.append(byte)
            default: return nil  // headers (Proc-Type, ...) or junk: not a plain PEM block
            }
        }
        guard let data = Data(base64Encoded: Data(base64)), !data.isEmpty else { return nil }
        return Array(data)
    }

    static func find(_ needle: [UInt8], in haystack: [UInt8], from: Int) -> Int? {
        guard needle.count <= haystack.count - from, let first = needle.first else { return nil }
        var i = from
        let last = haystack.count - needle.count
        while i <= last {
            if haystack[i] == first {
                var j = 1
                while j < needle.count && haystack[i + j] == needle[j] { j += 1 }
                if j == needle.count { return i }
            }
            i += 1
        }
        return nil
    }
}
