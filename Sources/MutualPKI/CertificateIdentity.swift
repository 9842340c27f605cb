import X509

/// The one rule for "a certificate's identity", used by the authority's inventory, the proxy's logs and policy
/// display, the agent, `mutual verify` and `mutual doctor`: its first `spiffe://` URI SAN; else its first SAN in the
/// certificate's order (DNS name, IP address, URI, e-mail); else the subject's CN; else nil.
public enum CertificateIdentity {
    public static func of(_ certificate: Certificate) -> String? {
        of(names: ((try? certificate.extensions.subjectAlternativeNames) ?? nil) ?? SubjectAlternativeNames(), subject: certificate.subject)
    }

    /// The same rule for a certificate swift-certificates cannot parse (an ML-DSA subject key).
    public static func of(_ certificate: MLDSACertificate) -> String? {
        of(names: certificate.subjectAlternativeNames, subject: certificate.subject)
    }

    static func of(names: SubjectAlternativeNames, subject: DistinguishedName) -> String? {
        var first: String?
        for name in names {
            let value: String
            switch name {
            case .uniformResourceIdentifier(let uri):
                if uri.hasPrefix("spiffe://") { return uri }
                value = uri
            case .dnsName(let dns): value = dns
            case .ipAddress(let ip): value = Names.ipAddressString(Array(ip.bytes))
            case .rfc822Name(let email): value = email
            default: continue
            }
            if first == nil { first = value }
        }
        return first ?? subject.lastCommonNameString
    }

    /// The identity, else the subject DN, else `serial HEX`: how `mutual verify` and `mutual doctor` name a
    /// certificate, CAs included.
    public static func describe(_ certificate: Certificate) -> String {
        of(certificate) ?? (certificate.subject.isEmpty ? "serial \(certificate.serialHex)" : certificate.subject.description)
    }

    /// The identity, or `serial HEX` for a certificate that names nothing: what logs and messages show.
    public static func display(_ certificate: Certificate) -> String {
        of(certificate) ?? "serial \(certificate.serialHex)"
    }
}
