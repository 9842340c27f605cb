import Foundation
#if canImport(Glibc)
import Glibc
#endif

/// Small, allocation-light JSON and time encoders for the write path (one call per issued certificate).
///
/// Hand-written because Foundation's JSONEncoder and date format styles cost tens of microseconds per call, a
/// measurable share of durable issuance (see BENCHMARKS.md). Output is canonical: sorted keys, RFC 8259 escaping.
enum JSONText {
    static func string(_ value: String, into out: inout String) {
        // Fast path: nothing to escape (the common case for names, serials and dates).
        if !value.utf8.contains(where: { $0 < 0x20 || $0 == 0x22 || $0 == 0x5C }) {
            out.append("\"")
            out.append(value)
            out.append("\"")
            return
        }
        out.append("\"")
        for scalar in value.unicodeScalars {
            switch scalar {
            case "\"": out.append("\\\"")
            case "\\": out.append("\\\\")
            case "\n": out.append("\\n")
            case "\r": out.append("\\r")
            case "\t": out.append("\\t")
            case "/": out.append("/")
            default:
                if scalar.value < 0x20 {
                    let hex = String(scalar.value, radix: 16)
                    out.append("\\u" + String(repeating: "0", count: 4 - hex.count) + hex)
                } else {
                    out.unicodeScalars.append(scalar)
                }
            }
        }
        out.append("\"")
    }

    static func array(_ values: [String]) -> String {
        var out = "["
        for (i, v) in values.enumerated() {
            if i > 0 { out.append(",") }
            string(v, into: &out)
        }
        out.append("]")
        return out
    }

    /// An object with keys in sorted order (byte order, as JSONEncoder's .sortedKeys does for ASCII keys).
    static func object(_ values: [String: String]) -> String {
        var out = "{"
        for (i, key) in values.keys.sorted().enumerated() {
            if i > 0 { out.append(",") }
            string(key, into: &out)
            out.append(":")
            string(values[key]!, into: &out)
        }
        out.append("}")
        return out
    }

    /// RFC 3339 UTC with milliseconds: `2026-11-23T03:21:59.123Z`.
    static func time(_ date: Date) -> String {
        let interval = date.timeIntervalSince1970
        var seconds = time_t(interval.rounded(.down))
        var millis = Int(((interval - Double(seconds)) * 1000).rounded())
        if millis >= 1000 {
            seconds += 1
            millis -= 1000
        }
        var parts = tm()
        gmtime_r(&seconds, &parts)
        func pad(_ n: Int32, _ width: Int) -> String {
            let s = String(n)
            return s.count >= width ? s : String(repeating: "0", count: width - s.count) + s
        }
        return "\(pad(parts.tm_year + 1900, 4))-\(pad(parts.tm_mon + 1, 2))-\(pad(parts.tm_mday, 2))T\(pad(parts.tm_hour, 2)):\(pad(parts.tm_min, 2)):\(pad(parts.tm_sec, 2)).\(pad(Int32(millis), 3))Z"
    }
}
