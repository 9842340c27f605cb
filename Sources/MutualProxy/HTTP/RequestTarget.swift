/// A request target in the one form the proxy routes on and forwards.
///
/// Backends disagree on what a path means: nginx and Python decode percent-escapes, Express matches routes without
/// regard to letter case, Tomcat/Spring drop `;parameters` from each segment (and read `..;` as `..`). A route that
/// matched one spelling must not let another spelling of the same resource through. So:
///
/// - percent-escapes of unreserved characters (`A–Z a–z 0–9 - . _ ~`) are decoded once (RFC 3986 6.2.2.2) and the
///   remaining escapes get upper-case hex (6.2.2.1); that form is what the upstream receives;
/// - what cannot be normalized unambiguously is refused: escapes of `/`, `\`, `#`, `?`, `;`, `%` (double encoding), control
///   characters and NUL, malformed escapes, escapes that decode to invalid UTF-8, raw `\`, `#`, control or non-ASCII
///   bytes, dot segments and empty segments (also once `;parameters` are removed);
/// - routes are matched on ``routingKey``: the path with each segment's `;parameters` removed and ASCII letters
///   lower-cased, so `/ADMIN`, `/admin;x` and `/%61dmin` all meet the rules of `/admin`.
///
/// One pass over the bytes, no Foundation: this runs for every request.
struct RequestTarget: Equatable, Sendable {
    /// Why a target was refused: `code` is stable (access log, error body); `reason` is for people.
    struct Refusal: Error, Equatable, Sendable {
        var code: String
        var reason: String
    }

    /// The path sent upstream (normalized).
    let path: String
    /// What route prefixes are compared with: `;parameters` removed from each segment, ASCII lower-cased.
    let routingKey: String
    /// The query without its `?`, as sent; nil when there is none.
    let query: String?

    /// The request target forwarded to the upstream.
    var forwarded: String { query.map { path + "?" + $0 } ?? path }

    static func parse(_ target: String) -> Result<RequestTarget, Refusal> {
        let bytes = Array(target.utf8)
        guard bytes.first == UInt8(ascii: "/") else {
            return .failure(.init(code: "not_origin_form", reason: "request target must be an absolute path (origin-form)"))
        }
        for byte in bytes {
            if byte < 0x21 || byte == 0x7F {
                return .failure(.init(code: "control_character", reason: "control characters or spaces in the request target are refused"))
            }
            if byte >= 0x80 {
                return .failure(.init(code: "non_ascii", reason: "raw non-ASCII bytes in the request target are refused (percent-encode them)"))
            }
            if byte == UInt8(ascii: "#") {
                return .failure(.init(code: "fragment", reason: "a fragment ('#') has no place in a request target"))
            }
        }
        let queryStart = bytes.firstIndex(of: UInt8(ascii: "?"))
        let rawPath = bytes[..<(queryStart ?? bytes.endIndex)]
        let query = queryStart.map { String(decoding: bytes[bytes.index(after: $0)...], as: UTF8.self) }

        var path: [UInt8] = []
        path.reserveCapacity(rawPath.count)
        // Every escape decoded, only to check that non-ASCII escapes form valid UTF-8.
        var decoded: [UInt8] = []
        var index = rawPath.startIndex
        while index < rawPath.endIndex {
            let byte = rawPath[index]
            if byte == UInt8(ascii: "\\") {
                return .failure(.init(code: "backslash", reason: "'\\' in the path is refused (some backends read it as '/')"))
            }
            guard byte == UInt8(ascii: "%") else {
                path.append(byte)
                decoded.append(byte)
                index += 1
                continue
            }
            guard index + 2 < rawPath.endIndex, let hi = hexValue(rawPath[index + 1]), let lo = hexValue(rawPath[index + 2]) else {
                return .failure(.init(code: "bad_percent_encoding", reason: "'%' in the path must start an escape of two hex digits"))
            }
            let value = hi << 4 | lo
            switch value {
            case UInt8(ascii: "/"), UInt8(ascii: "\\"):
                return .failure(.init(code: "encoded_separator", reason: "encoded '/' or '\\' in the path is refused (ambiguous for routing)"))
            case UInt8(ascii: "#"), UInt8(ascii: "?"), UInt8(ascii: ";"):
                // A backend that decodes before splitting off the query, fragment or ;parameters would cut the path
                // there: `/admin%23x` and `/admin%3Bx` are `/admin` to it.
                return .failure(.init(code: "encoded_delimiter", reason: "encoded '#', '?' or ';' in the path is refused (ambiguous for routing)"))
            case UInt8(ascii: "%"):
                return .failure(.init(code: "double_encoding", reason: "an encoded '%' in the path is refused (double encoding is ambiguous for routing)"))
            case 0x00..<0x20, 0x7F:
                return .failure(.init(code: "encoded_control", reason: "encoded control characters (NUL, CR, LF, …) in the path are refused"))
            default:
                if isUnreserved(value) {
                    path.append(value)
                } else {
                    path.append(UInt8(ascii: "%"))
                    path.append(upperHex[Int(hi)])
                    path.append(upperHex[Int(lo)])
                }
                decoded.append(value)
            }
            index += 3
        }
        if String(validating: decoded, as: UTF8.self) == nil {
            return .failure(.init(code: "invalid_utf8", reason: "percent-escapes in the path do not decode to valid UTF-8"))
        }

        // Segments: dot and empty segments are refused, with and without their ;parameters.
        var routing: [UInt8] = []
        routing.reserveCapacity(path.count)
        let segments = path.split(separator: UInt8(ascii: "/"), omittingEmptySubsequences: false).dropFirst()
        for (position, segment) in segments.enumerated() {
            let isLast = position == segments.count - 1
            let bare = segment.prefix { $0 != UInt8(ascii: ";") }
            for form in [segment, bare] {
                if form.elementsEqual([UInt8(ascii: ".")]) || form.elementsEqual([UInt8(ascii: "."), UInt8(ascii: ".")]) {
                    return .failure(.init(code: "dot_segment", reason: "dot segments in the path are refused (ambiguous for routing)"))
                }
            }
            if bare.isEmpty && !(isLast && segment.isEmpty) {
                return .failure(.init(code: "empty_segment", reason: "empty path segments ('//', '/;x/') are refused (ambiguous for routing)"))
            }
            routing.append(UInt8(ascii: "/"))
            for byte in bare { routing.append(byte >= UInt8(ascii: "A") && byte <= UInt8(ascii: "Z") ? byte | 0x20 : byte) }
        }
        return .success(RequestTarget(
            path: String(decoding: path, as: UTF8.self), routingKey: String(decoding: routing, as: UTF8.self), query: query
        ))
    }

    /// The routing form of a configured route prefix, as request paths are compared: normalized like a request
    /// (so `/%61dmin` in a configuration means `/admin`) and lower-cased. A prefix that does not parse is only
    /// lower-cased (configuration validation reports it).
    static func routingForm(ofPrefix prefix: String) -> String {
        if case .success(let target) = parse(prefix) { return target.routingKey }
        return String(decoding: prefix.utf8.map { $0 >= UInt8(ascii: "A") && $0 <= UInt8(ascii: "Z") ? $0 | 0x20 : $0 }, as: UTF8.self)
    }

    private static let upperHex: [UInt8] = Array("0123456789ABCDEF".utf8)

    private static func hexValue(_ byte: UInt8) -> UInt8? {
        switch byte {
        case UInt8(ascii: "0")...UInt8(ascii: "9"): byte - UInt8(ascii: "0")
        case UInt8(ascii: "a")...UInt8(ascii: "f"): byte - UInt8(ascii: "a") + 10
        case UInt8(ascii: "A")...UInt8(ascii: "F"): byte - UInt8(ascii: "A") + 10
        default: nil
        }
    }

    private static func isUnreserved(_ byte: UInt8) -> Bool {
        switch byte {
        case UInt8(ascii: "A")...UInt8(ascii: "Z"), UInt8(ascii: "a")...UInt8(ascii: "z"), UInt8(ascii: "0")...UInt8(ascii: "9"),
            UInt8(ascii: "-"), UInt8(ascii: "."), UInt8(ascii: "_"), UInt8(ascii: "~"):
            true
        default: false
        }
    }
}
