import Crypto
import Foundation
import MutualPKI
import X509

/// The identity of a client whose certificate chain the proxy has verified. Only the verifier path creates one from a
/// validated chain; policy and identity forwarding read it.
/// A class: the proxy reads it on every request of a connection (policy, headers, access log), and copying a struct
/// of a parsed certificate and a dozen strings cost a retain and release per field each time.
public final class VerifiedPeer: Sendable, Hashable {
    /// Classical or ML-DSA (a migration's proxies accept both).
    public let leaf: AnyCertificate
    public let chain: [AnyCertificate]
    /// The one `spiffe://` URI SAN, if the certificate is a SPIFFE X.509-SVID.
    public let spiffeID: String?
    public let uris: [String]
    public let dnsNames: [String]
    public let commonName: String?
    public let organizationalUnits: [String]
    public let serial: String
    /// SHA-256 of the leaf's DER, lowercase hex (Envoy's XFCC `Hash`).
    public let fingerprint: String
    /// The same digest base64url-encoded: RFC 8705's `x5t#S256`, what a bound access token names.
    public let x5tS256: String
    /// The earliest notAfter in the chain: the identity is not valid past it, even on an open connection.
    public let validUntil: Date
    /// The latest notBefore in the chain: the identity is not valid before it.
    public let validFrom: Date

    /// `chain` is leaf first, as validated (trust anchor excluded or included: both work).
    /// Internal: only the verifier (the inbound handshake, the outbound upstream check) creates one, from a chain it
    /// validated, so holding a `VerifiedPeer` means verification happened.
    convenience init(validatedChain chain: [Certificate]) throws {
        try self.init(validatedChain: chain.map { AnyCertificate.classical($0) })
    }

    init(validatedChain chain: [AnyCertificate]) throws {
        guard let leaf = chain.first else { throw PKIError(.malformedInput, "empty certificate chain") }
        self.leaf = leaf
        self.chain = chain
        var uris: [String] = []
        var dns: [String] = []
        for name in (try leaf.extensions.subjectAlternativeNames) ?? SubjectAlternativeNames() {
            switch name {
            case .uniformResourceIdentifier(let uri): uris.append(uri)
            case .dnsName(let name): dns.append(name.lowercased())
            default: continue
            }
        }
        self.uris = uris
        self.dnsNames = dns
        let spiffe = uris.filter { $0.hasPrefix("spiffe://") }
        self.spiffeID = spiffe.count == 1 ? spiffe[0] : nil
        self.commonName = leaf.subject.lastCommonNameString
        var units: [String] = []
        for rdn in leaf.subject {
            for attribute in rdn where attribute.type == .RDNAttributeType.organizationalUnitName {
                units.append(String(describing: attribute.value))
            }
        }
        self.organizationalUnits = units
        self.serial = leaf.serialHex
        let digest = SHA256.hash(data: try leaf.der)
        self.fingerprint = digest.hexString
        self.x5tS256 = Base64URL.encode(Data(digest))
        self.validUntil = chain.map(\.notValidAfter).min() ?? leaf.notValidAfter
        self.validFrom = chain.map(\.notValidBefore).max() ?? leaf.notValidBefore
        self.displayName = CertificateIdentity.display(leaf)
        self.keyAlgorithm = leaf.keyAlgorithm
    }

    /// Two identities are the same when they carry the same certificate chain.
    public static func == (lhs: VerifiedPeer, rhs: VerifiedPeer) -> Bool {
        lhs === rhs || (lhs.fingerprint == rhs.fingerprint && lhs.chain == rhs.chain)
    }

    public func hash(into hasher: inout Hasher) { hasher.combine(fingerprint) }

    /// The name logs and errors show: the certificate's identity by the one rule every role uses
    /// (``CertificateIdentity``), else `serial HEX`.
    public let displayName: String
    /// The leaf key's algorithm (`ML-DSA-65`, `P-256`, …), for logs and the proxy's metrics.
    public let keyAlgorithm: String
}

/// Fired by the handshake observer when a handshake completed, just before `TLSUserEvent.handshakeCompleted`: the
/// verified client (nil on a listener where the certificate is optional and none was sent) and whether the session
/// was resumed. Handlers that exist before the handshake (HTTP/1.1 without ALPN, tcp mode) take the identity from it;
/// handlers built after it are given the same value. Only this module creates one.
struct PeerVerifiedEvent: Sendable {
    let peer: VerifiedPeer?
    let resumed: Bool
}
