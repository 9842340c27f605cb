import Foundation
import MutualPKI
import X509

/// Headers that carry the verified client identity to the upstream application. Clients can never set them: the proxy
/// removes every incoming copy (``strippedHeaders``) before adding its own.
public enum ForwardedIdentity {
    /// Lower-case names of the headers the proxy owns.
    public static let strippedHeaders: Set<String> = ["x-forwarded-client-cert", "client-cert", "client-cert-chain", identityHeader]

    /// The simple identity header (`forward: [identity]`): the verified principal in allow-list notation.
    public static let identityHeader = "x-client-identity"

    /// Headers the proxy sets or extends itself; a client's look-alike spelling of one (`X_Forwarded_For`) is removed
    /// too, since CGI/WSGI backends read `_` and `-` alike.
    static let ownedHeaders: Set<String> = strippedHeaders.union(["x-forwarded-proto", "x-forwarded-for"]).union(TokenGate.ownedHeaders)

    /// Identity headers that other proxies and load balancers set, and that backends built for them trust: removed
    /// from every client request unless a listener's `strip-headers` says otherwise. Compared after lower-casing and
    /// `_` → `-`; a trailing `*` is a prefix.
    public static let defaultStrippedHeaders: [String] = [
        "x-client-cert*", "x-client-dn", "x-client-verify", "x-client-san", "x-client-subject*", "x-client-issuer*",
        "x-client-certificate*", "x-ssl-client-*", "x-ssl-cert*", "x-ssl-subject*", "x-ssl-issuer*", "x-ssl-verify*",
        "ssl-client-*", "x-arr-clientcert", "x-amzn-mtls-clientcert*", "x-forwarded-tls-client-cert*",
        "x-forwarded-client-cert-*", "x-spiffe-id", "x-mtls-*", "x-tls-client-*",
    ]

    /// Why a certificate's identity cannot be put into XFCC.
    public struct Unrepresentable: Error, Sendable, Equatable {
        public var field: String
    }

    /// Envoy's `x-forwarded-client-cert` element: `By=…;Hash=…;Cert="…";Chain="…";Subject="…";URI=…;DNS=…`.
    /// Cert and Chain are URL-encoded PEM, quoted; Subject is always quoted; By, URI and DNS are quoted when they
    /// contain a character of the grammar (`,` `;` `=` `"` `\` or a space), with `"` and `\` escaped, so a SAN can
    /// never add a key or a second element. A value with a control character (CR, LF, NUL, …) cannot be carried in
    /// a header at all: the element is refused (``Unrepresentable``) rather than forwarded altered.
    public static func xfcc(_ peer: VerifiedPeer, by: String?) throws -> String {
        var parts: [String] = []
        if let by { parts.append("By=" + (try xfccValue(by, field: "By"))) }
        parts.append("Hash=\(peer.fingerprint)")
        parts.append("Cert=\"\(urlEncode(PEMCodec.encode(try peer.leaf.der, label: "CERTIFICATE")))\"")
        let chainPEM = try peer.chain.map { PEMCodec.encode(try $0.der, label: "CERTIFICATE") }.joined()
        parts.append("Chain=\"\(urlEncode(chainPEM))\"")
        parts.append("Subject=" + (try xfccValue(peer.leaf.subject.description, field: "Subject", alwaysQuote: true)))
        if let uri = peer.spiffeID ?? peer.uris.first { parts.append("URI=" + (try xfccValue(uri, field: "URI"))) }
        for dns in peer.dnsNames { parts.append("DNS=" + (try xfccValue(dns, field: "DNS"))) }
        return parts.joined(separator: ";")
    }

    /// One XFCC value: as is when it has no special character, else quoted with `"` and `\` escaped.
    static func xfccValue(_ value: String, field: String, alwaysQuote: Bool = false) throws -> String {
        var needsQuotes = alwaysQuote || value.isEmpty
        for byte in value.utf8 {
            if byte < 0x20 || byte == 0x7F { throw Unrepresentable(field: field) }
            switch byte {
            case UInt8(ascii: ","), UInt8(ascii: ";"), UInt8(ascii: "="), UInt8(ascii: "\""), UInt8(ascii: "\\"), UInt8(ascii: " "):
                needsQuotes = true
            default: continue
            }
        }
        guard needsQuotes else { return value }
        var out = "\""
        for character in value.unicodeScalars {
            if character == "\"" || character == "\\" { out.unicodeScalars.append("\\") }
            out.unicodeScalars.append(character)
        }
        return out + "\""
    }

    /// RFC 9440 `Client-Cert`: the leaf's DER as a structured-field byte sequence (`:base64:`).
    public static func clientCert(_ peer: VerifiedPeer) throws -> String {
        ":\(Data(try peer.leaf.der).base64EncodedString()):"
    }

    /// RFC 9440 `Client-Cert-Chain`: the certificates after the leaf, each a byte sequence, comma-separated; nil when
    /// the client sent no intermediates.
    public static func clientCertChain(_ peer: VerifiedPeer) throws -> String? {
        let rest = peer.chain.dropFirst()
        guard !rest.isEmpty else { return nil }
        return try rest.map { ":\(Data(try $0.der).base64EncodedString()):" }.joined(separator: ", ")
    }

    /// Percent-encoding as Envoy applies it to PEM in XFCC: every byte but the unreserved ASCII characters
    /// (`A–Z a–z 0–9 - . _ ~`) becomes `%XX`. A byte loop: Foundation's `addingPercentEncoding` cost about 40 µs for
    /// one certificate and its chain, which made it the most expensive step of an HTTP/2 stream.
    static func urlEncode(_ text: String) -> String {
        let hex: [UInt8] = Array("0123456789ABCDEF".utf8)
        var out: [UInt8] = []
        out.reserveCapacity(text.utf8.count * 5 / 4)
        for byte in text.utf8 {
            switch byte {
            case UInt8(ascii: "A")...UInt8(ascii: "Z"), UInt8(ascii: "a")...UInt8(ascii: "z"), UInt8(ascii: "0")...UInt8(ascii: "9"),
                UInt8(ascii: "-"), UInt8(ascii: "."), UInt8(ascii: "_"), UInt8(ascii: "~"):
                out.append(byte)
            default:
                out.append(UInt8(ascii: "%"))
                out.append(hex[Int(byte >> 4)])
                out.append(hex[Int(byte & 0x0F)])
            }
        }
        return String(decoding: out, as: UTF8.self)
    }

    /// The identity headers one listener adds for `peer`, in order: XFCC, then RFC 9440's pair, as configured.
    /// Throws ``Unrepresentable`` when the identity cannot be forwarded faithfully (the request is then refused).
    static func headers(for peer: VerifiedPeer, by: String?, xfcc: Bool, rfc9440: Bool) throws -> [(String, String)] {
        var computed: [(String, String)] = []
        if xfcc {
            do {
                computed.append(("x-forwarded-client-cert", try Self.xfcc(peer, by: by)))
            } catch let error as Unrepresentable {
                throw error
            } catch {
                throw Unrepresentable(field: "Cert")
            }
        }
        if rfc9440 {
            if let cert = try? clientCert(peer) { computed.append(("client-cert", cert)) }
            if let chain = try? clientCertChain(peer) { computed.append(("client-cert-chain", chain)) }
        }
        return computed
    }
}

/// Header names as backends compare them: ASCII lower-case with `_` read as `-` (CGI, WSGI and PHP turn both into
/// `HTTP_X_…`), so `X_Forwarded_Client_Cert` is `x-forwarded-client-cert`.
enum HeaderNames {
    /// The canonical form; returns `name` itself when it is canonical already (the common case: no allocation).
    static func canonical(_ name: String) -> String {
        var clean = true
        for byte in name.utf8 where (byte >= UInt8(ascii: "A") && byte <= UInt8(ascii: "Z")) || byte == UInt8(ascii: "_") {
            clean = false
            break
        }
        if clean { return name }
        return String(decoding: name.utf8.map { byte in
            byte == UInt8(ascii: "_") ? UInt8(ascii: "-") : (byte >= UInt8(ascii: "A") && byte <= UInt8(ascii: "Z") ? byte | 0x20 : byte)
        }, as: UTF8.self)
    }

    /// A `strip-headers` entry: a token (RFC 9110 5.6.2), optionally ending in `*`.
    static func isValidPattern(_ pattern: String) -> Bool {
        let body = pattern.hasSuffix("*") ? pattern.dropLast() : Substring(pattern)
        guard !body.isEmpty, body.utf8.count <= 128 else { return false }
        return body.utf8.allSatisfy { byte in
            (byte >= UInt8(ascii: "a") && byte <= UInt8(ascii: "z")) || (byte >= UInt8(ascii: "A") && byte <= UInt8(ascii: "Z"))
                || (byte >= UInt8(ascii: "0") && byte <= UInt8(ascii: "9")) || "!#$%&'+-.^_`|~".utf8.contains(byte)
        }
    }

    /// Compiled `strip-headers` patterns: exact names and prefixes, canonical.
    struct Matcher: Sendable {
        let exact: Set<String>
        let prefixes: [String]

        init(patterns: [String]) {
            var exact = Set<String>()
            var prefixes: [String] = []
            for pattern in patterns {
                if pattern.hasSuffix("*") {
                    prefixes.append(HeaderNames.canonical(String(pattern.dropLast())))
                } else {
                    exact.insert(HeaderNames.canonical(pattern))
                }
            }
            self.exact = exact
            self.prefixes = prefixes
        }

        /// `canonical` is a name already in canonical form.
        func matches(canonical: String) -> Bool {
            exact.contains(canonical) || prefixes.contains { canonical.hasPrefix($0) }
        }
    }
}
