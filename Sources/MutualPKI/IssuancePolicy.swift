/// The CA-wide limits that apply to every certificate an ``IssuingCA`` signs, whoever asks.
public struct IssuancePolicy: Sendable, Hashable, Codable {
    /// The longest lifetime the CA will sign for a leaf; longer requests are refused, not shortened.
    public var maximumValidity: ValidityDuration
    /// `spiffe://` or other URI prefixes that URI SANs must start with (empty: any URI within the X.509 name
    /// constraints). X.509 URI name constraints only constrain the host, so Mutual enforces the full prefix itself.
    public var permittedURIPrefixes: [String]
    /// CRL distribution point URL placed in issued certificates (nil: none).
    public var crlURL: String?
    /// OCSP responder URL placed in issued certificates' AIA (nil: none).
    public var ocspURL: String?
    /// How far notBefore is set in the past to tolerate clock skew between the CA and relying parties.
    public var backdate: ValidityDuration

    public init(
        maximumValidity: ValidityDuration = .days(90),
        permittedURIPrefixes: [String] = [],
        crlURL: String? = nil,
        ocspURL: String? = nil,
        backdate: ValidityDuration = .seconds(60)
    ) {
        self.maximumValidity = maximumValidity
        self.permittedURIPrefixes = permittedURIPrefixes
        self.crlURL = crlURL
        self.ocspURL = ocspURL
        self.backdate = backdate
    }
}
