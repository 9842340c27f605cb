import Crypto
import _CryptoExtras
import X509

/// The kinds of key Mutual generates and issues for.
///
/// Cost of ``generate()``: microseconds for the elliptic-curve and Ed25519 keys, tens to hundreds of milliseconds
/// for RSA (prime search); do not generate RSA keys on an event loop.
public enum KeyType: String, CaseIterable, Sendable, Codable {
    case p256
    case p384
    case ed25519
    case rsa2048
    case rsa3072
    case rsa4096

    /// Generates a fresh private key of this type from the system CSPRNG.
    public func generate() throws -> Certificate.PrivateKey {
        switch self {
        case .p256: return Certificate.PrivateKey(P256.Signing.PrivateKey())
        case .p384: return Certificate.PrivateKey(P384.Signing.PrivateKey())
        case .ed25519: return Certificate.PrivateKey(Curve25519.Signing.PrivateKey())
        case .rsa2048: return Certificate.PrivateKey(try _RSA.Signing.PrivateKey(keySize: .bits2048))
        case .rsa3072: return Certificate.PrivateKey(try _RSA.Signing.PrivateKey(keySize: .bits3072))
        case .rsa4096: return Certificate.PrivateKey(try _RSA.Signing.PrivateKey(keySize: .bits4096))
        }
    }

    /// A space-separated list of the accepted spellings, for help texts and error messages.
    public static var choices: String { allCases.map(\.rawValue).joined(separator: "|") }
}

extension Certificate.PrivateKey {
    /// The signature algorithm Mutual signs with for this key: SHA-256 for P-256 and RSA, SHA-384 for P-384.
    public var preferredSignatureAlgorithm: Certificate.SignatureAlgorithm {
        let supported = supportedSignatureAlgorithms
        if supported.contains(.ed25519) { return .ed25519 }
        if supported.contains(.sha256WithRSAEncryption) { return .sha256WithRSAEncryption }
        if case .p384 = publicKey.keyTypeHint { return .ecdsaWithSHA384 }
        return .ecdsaWithSHA256
    }
}

extension Certificate.PublicKey {
    enum KeyTypeHint { case p256, p384, p521, rsa, ed25519, other }

    var keyTypeHint: KeyTypeHint {
        if P256.Signing.PublicKey(self) != nil { return .p256 }
        if P384.Signing.PublicKey(self) != nil { return .p384 }
        if P521.Signing.PublicKey(self) != nil { return .p521 }
        if _RSA.Signing.PublicKey(self) != nil { return .rsa }
        if Curve25519.Signing.PublicKey(self) != nil { return .ed25519 }
        return .other
    }

    /// A short human description of the key ("P-256", "RSA-2048", "Ed25519").
    public var algorithmDescription: String {
        switch keyTypeHint {
        case .p256: return "P-256"
        case .p384: return "P-384"
        case .p521: return "P-521"
        case .ed25519: return "Ed25519"
        case .rsa:
            let bits = _RSA.Signing.PublicKey(self)?.keySizeInBits ?? 0
            return "RSA-\(bits)"
        case .other: return "unknown"
        }
    }

    /// Whether Mutual accepts this key in a request: the curves and RSA sizes of ``KeyType``; RSA below 2048 bits is
    /// refused.
    public var isAcceptableSubjectKey: Bool {
        switch keyTypeHint {
        case .p256, .p384, .ed25519: return true
        case .rsa: return (_RSA.Signing.PublicKey(self)?.keySizeInBits ?? 0) >= 2048
        case .p521, .other: return false
        }
    }
}
