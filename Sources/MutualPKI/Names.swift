import Foundation
#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

/// Syntax checks and normalisation for the names that go into certificates.
///
/// Hand-written because swift-certificates parses and matches names but has no validator for names a CA is asked to
/// *issue*: its DNS matcher accepts anything a relying party might see, which is more than a CA should sign.
public enum Names {
    /// Validates and normalises (lowercases) a DNS name. A wildcard is allowed only as the whole leftmost label and
    /// only when `allowWildcard` is true.
    public static func normalizedDNSName(_ name: String, allowWildcard: Bool) throws -> String {
        let lower = name.lowercased()
        guard !lower.isEmpty, lower.utf8.count <= 253 else {
            throw PKIError(.invalidName, "invalid DNS name '\(name.prefix(64))': must be 1 to 253 characters")
        }
        guard lower.utf8.allSatisfy({ $0 < 0x80 }) else {
            throw PKIError(.invalidName, "invalid DNS name '\(name)': only ASCII is allowed (use the punycode A-label form)")
        }
        let labels = lower.split(separator: ".", omittingEmptySubsequences: false)
        for (index, label) in labels.enumerated() {
            if label == "*" && index == 0 && labels.count > 1 {
                guard allowWildcard else {
                    throw PKIError(.invalidName, "invalid DNS name '\(name)': wildcards are not allowed for this profile")
                }
                continue
            }
            guard !label.isEmpty else {
                throw PKIError(.invalidName, "invalid DNS name '\(name)': empty label")
            }
            guard label.utf8.count <= 63 else {
                throw PKIError(.invalidName, "invalid DNS name '\(name)': label longer than 63 characters")
            }
            guard label.utf8.allSatisfy({ isLDH($0) }) else {
                throw PKIError(.invalidName, "invalid DNS name '\(name)': label '\(label)' may contain only letters, digits and hyphens")
            }
            guard label.first != "-", label.last != "-" else {
                throw PKIError(.invalidName, "invalid DNS name '\(name)': label '\(label)' starts or ends with a hyphen")
            }
        }
        return lower
    }

    private static func isLDH(_ byte: UInt8) -> Bool {
        (byte >= 0x61 && byte <= 0x7A) || (byte >= 0x30 && byte <= 0x39) || byte == 0x2D
    }

    /// Parses an IPv4 or IPv6 address into its 4 or 16 network-order bytes.
    public static func ipAddressBytes(_ text: String) throws -> [UInt8] {
        var v4 = in_addr()
        if inet_pton(AF_INET, text, &v4) == 1 {
            return withUnsafeBytes(of: &v4) { Array($0) }
        }
        var v6 = in6_addr()
        if inet_pton(AF_INET6, text, &v6) == 1 {
            return withUnsafeBytes(of: &v6) { Array($0) }
        }
        throw PKIError(.invalidName, "invalid IP address '\(text.prefix(64))'")
    }

    /// Formats 4 or 16 address bytes as text (`192.0.2.1`, `2001:db8::1`).
    public static func ipAddressString(_ bytes: [UInt8]) -> String {
        var buffer = [CChar](repeating: 0, count: Int(INET6_ADDRSTRLEN))
        let family = bytes.count == 4 ? AF_INET : bytes.count == 16 ? AF_INET6 : -1
        guard family != -1 else { return bytes.hexString }
        let ok = bytes.withUnsafeBytes { raw in
            inet_ntop(family, raw.baseAddress, &buffer, socklen_t(buffer.count)) != nil
        }
        return ok ? String(cString: buffer) : bytes.hexString
    }

    /// A parsed, valid SPIFFE ID (`spiffe://trust-domain/path`), per the SPIFFE ID specification.
    public struct SPIFFEID: Hashable, Sendable, CustomStringConvertible {
        public let trustDomain: String
        public let path: String
        public var description: String { "spiffe://\(trustDomain)\(path)" }

        public init(parsing text: String) throws {
            func fail(_ why: String) -> PKIError {
                PKIError(.invalidName, "invalid SPIFFE ID '\(text.prefix(80))': \(why)")
            }
            guard text.utf8.count <= 2048 else { throw fail("longer than 2048 bytes") }
            guard text.hasPrefix("spiffe://") else { throw fail("must start with spiffe://") }
            let rest = text.dropFirst("spiffe://".count)
            let slash = rest.firstIndex(of: "/") ?? rest.endIndex
            let domain = String(rest[..<slash])
            let path = String(rest[slash...])
            guard !domain.isEmpty else { throw fail("trust domain is empty") }
            guard domain.utf8.count <= 255 else { throw fail("trust domain longer than 255 bytes") }
            for byte in domain.utf8 {
                let ok = (byte >= 0x61 && byte <= 0x7A) || (byte >= 0x30 && byte <= 0x39) || byte == 0x2E
                    || byte == 0x2D || byte == 0x5F
                guard ok else {
                    throw fail("trust domain may contain only lowercase letters, digits, '.', '-' and '_'")
                }
            }
            if !path.isEmpty {
                guard path != "/" else { throw fail("path must not end with '/'") }
                let segments = path.dropFirst().split(separator: "/", omittingEmptySubsequences: false)
                for segment in segments {
                    guard !segment.isEmpty else { throw fail("path has an empty segment or a trailing '/'") }
                    guard segment != ".", segment != ".." else { throw fail("path must not contain '.' or '..' segments") }
                    for byte in segment.utf8 {
                        let ok = (byte >= 0x61 && byte <= 0x7A) || (byte >= 0x41 && byte <= 0x5A)
                            || (byte >= 0x30 && byte <= 0x39) || byte == 0x2E || byte == 0x2D || byte == 0x5F
                        guard ok else {
                            throw fail("path may contain only letters, digits, '.', '-' and '_' (no query, fragment or percent-encoding)")
                        }
                    }
                }
            }
            self.trustDomain = domain
            self.path = path
        }
    }

    /// A workload's SPIFFE ID names a workload, so it has a path: `spiffe://acme.test` alone is the trust domain's own
    /// ID, never a workload's (SPIFFE X.509-SVID: the leaf's ID must not be the trust domain ID).
    public static func requireWorkloadPath(_ text: String) throws {
        let id = try SPIFFEID(parsing: text)
        guard !id.path.isEmpty else {
            throw PKIError(.invalidName, "'\(text.prefix(80))' is a trust domain ID, not a workload ID: add a path, e.g. \(id.description)/ns/prod/sa/api")
        }
    }

    /// Validates a URI SAN that is not a SPIFFE ID: an absolute URI with a scheme and no spaces or control characters.
    public static func validatedURI(_ text: String) throws -> String {
        if text.hasPrefix("spiffe:") {
            return try SPIFFEID(parsing: text).description
        }
        guard text.utf8.count <= 2048,
            let components = URLComponents(string: text),
            let scheme = components.scheme, !scheme.isEmpty,
            text.utf8.allSatisfy({ $0 > 0x20 && $0 < 0x7F })
        else {
            throw PKIError(.invalidName, "invalid URI '\(text.prefix(80))': must be an absolute URI such as spiffe://example.org/x or https://host/path")
        }
        return text
    }

    /// Whether a DNS name lies within a DNS name constraint subtree (RFC 5280 4.2.1.10: `example.com` permits
    /// `example.com` and any subdomain; a leading dot, `.example.com`, permits subdomains only).
    public static func dnsName(_ name: String, isWithin constraint: String) -> Bool {
        let name = name.lowercased()
        var c = constraint.lowercased()
        if c.isEmpty { return true }
        if c.hasPrefix(".") {
            return name.hasSuffix(c)
        }
        if name == c { return true }
        c = "." + c
        return name.hasSuffix(c)
    }
}
