import X509

/// What a certificate is for. The profile, not the requester, decides every extension that reaches a certificate.
public enum CertificateProfile: String, CaseIterable, Sendable, Codable {
    /// A TLS client: EKU clientAuth, KU digitalSignature. Needs a common name or at least one SAN.
    case client
    /// A TLS server: EKU serverAuth, KU digitalSignature, at least one DNS or IP SAN.
    case server
    /// A SPIFFE X.509-SVID: exactly one `spiffe://` URI SAN, EKU serverAuth and clientAuth, cA false.
    case workload
    /// The operator's client certificate for the authority's admin endpoints (clientAuth).
    case admin
    /// The authority's delegated OCSP responder: EKU OCSPSigning, id-pkix-ocsp-nocheck, short-lived, rotated.
    case ocspSigner
    /// The issuing intermediate made by `init`: CA, path length 0, optional name constraints.
    case intermediate
    /// The self-signed root made by `init`.
    case root

    /// Profiles an operator or a token may ask for by name.
    public static let leafProfiles: [CertificateProfile] = [.client, .server, .workload]

    /// A `client|server|workload` string for help texts.
    public static var leafChoices: String { leafProfiles.map(\.rawValue).joined(separator: "|") }

    /// Parses a leaf profile name; anything else is a clear error.
    public init(leafName: String) throws {
        guard let profile = CertificateProfile(rawValue: leafName), Self.leafProfiles.contains(profile) else {
            throw PKIError(.profileViolation, "unknown profile '\(leafName.prefix(40))': expected one of \(Self.leafChoices)")
        }
        self = profile
    }

    /// The lifetime used when the request names none: short by design (workload 24h, client/server 30d).
    public var defaultValidity: ValidityDuration {
        switch self {
        case .workload: return .hours(24)
        case .client, .server: return .days(30)
        case .admin: return .days(365)
        case .ocspSigner: return .days(7)
        case .intermediate: return .days(5 * 365)
        case .root: return .days(10 * 365)
        }
    }

    public var isCertificateAuthority: Bool { self == .intermediate || self == .root }

    /// Extended key usages placed in certificates of this profile.
    var extendedKeyUsages: [ExtendedKeyUsage.Usage] {
        switch self {
        case .client, .admin: return [.clientAuth]
        case .server: return [.serverAuth]
        case .workload: return [.serverAuth, .clientAuth]
        case .ocspSigner: return [.ocspSigning]
        case .intermediate, .root: return []
        }
    }
}
