import Foundation
import MutualPKI
import X509

/// Headers that carry the verified client identity to the upstream application. Clients can never set them: the proxy
/// removes every incoming copy (``strippedHeaders``) before adding its own.
public enum ForwardedIdentity {
    /// Lower-case names of the headers the proxy owns.
    public static let strippedHeaders: Set<String> = ["x-forwarded-client-cert", "client-cert", "client-cert-chain"]

    /// Envoy's `x-forwarded-client-cert` element: `By=…;Hash=…;Cert="…";Chain="…";Subject="…";URI=…;DNS=…`.
    /// Cert and Chain are URL-encoded PEM, quoted; Subject is quoted with `"` and `\` escaped; DNS repeats per SAN.
    /// `by` is the proxy's own identity (its SPIFFE ID or first URI SAN), as Envoy writes it.
    public static func xfcc(_ peer: PeerIdentity, by: String?) throws -> String {
        var parts: [String] = []
        if let by { parts.append("By=\(by)") }
        parts.append("Hash=\(peer.fingerprint)")
        parts.append("Cert=\"\(urlEncode(PEMCodec.encode(try peer.leaf.derBytes, label: "CERTIFICATE")))\"")
        let chainPEM = try peer.chain.map { PEMCodec.encode(try $0.derBytes, label: "CERTIFICATE") }.joined()
        parts.append("Chain=\"\(urlEncode(chainPEM))\"")
        let subject = peer.leaf.subject.description.replacingOccurrences(of: "\\", with: "\\\\").replacingOccurrences(of: "\"", with: "\\\"")
        parts.append("Subject=\"\(subject)\"")
        if let uri = peer.spiffeID ?? peer.uris.first { parts.append("URI=\(uri)") }
        for dns in peer.dnsNames { parts.append("DNS=\(dns)") }
        return parts.joined(separator: ";")
    }

    /// RFC 9440 `Client-Cert`: the leaf's DER as a structured-field byte sequence (`:base64:`).
    public static func clientCert(_ peer: PeerIdentity) throws -> String {
        ":\(Data(try peer.leaf.derBytes).base64EncodedString()):"
    }

    /// RFC 9440 `Client-Cert-Chain`: the certificates after the leaf, each a byte sequence, comma-separated; nil when
    /// the client sent no intermediates.
    public static func clientCertChain(_ peer: PeerIdentity) throws -> String? {
        let rest = peer.chain.dropFirst()
        guard !rest.isEmpty else { return nil }
        return try rest.map { ":\(Data(try $0.derBytes).base64EncodedString()):" }.joined(separator: ", ")
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
    static func headers(for peer: PeerIdentity, by: String?, xfcc: Bool, rfc9440: Bool) -> [(String, String)] {
        var computed: [(String, String)] = []
        if xfcc, let value = try? Self.xfcc(peer, by: by) { computed.append(("x-forwarded-client-cert", value)) }
        if rfc9440 {
            if let cert = try? clientCert(peer) { computed.append(("client-cert", cert)) }
            if let chain = try? clientCertChain(peer) { computed.append(("client-cert-chain", chain)) }
        }
        return computed
    }
}
