import NIOSSL

extension SignatureAlgorithm {
    /// TLS SignatureScheme code points for ML-DSA (draft-ietf-tls-mldsa; BoringSSL's SSL_SIGN_ML_DSA_65/87).
    public static let mlDSA65 = SignatureAlgorithm(rawValue: 0x0905)
    public static let mlDSA87 = SignatureAlgorithm(rawValue: 0x0906)
}

/// The signature algorithms every Mutual TLS endpoint (authority, proxy, agent) signs and accepts: every key type
/// Mutual issues — Ed25519 and ML-DSA included, which BoringSSL leaves out of its defaults, so a peer must opt in —
/// and no SHA-1.
public enum TLSSignatureAlgorithms {
    public static let all: [SignatureAlgorithm] = [
        .ed25519, .ecdsaSecp256R1Sha256, .ecdsaSecp384R1Sha384, .ecdsaSecp521R1Sha512,
        .rsaPssRsaeSha256, .rsaPssRsaeSha384, .rsaPssRsaeSha512, .rsaPkcs1Sha256, .rsaPkcs1Sha384, .rsaPkcs1Sha512,
        .mlDSA65, .mlDSA87,
    ]
}
