import MutualPKCS11
import MutualPKI
import NIOCore
import NIOSSL
import X509

/// A PKCS#11 token key as a TLS private key: the handshake's signature is made by the token (BoringSSL hands over
/// the unhashed message and the algorithm; the hash is computed here, the signature there).
public struct TokenTLSKey: NIOSSLCustomPrivateKey, Hashable {
    public let key: PKCS11Key

    public init(_ key: PKCS11Key) { self.key = key }

    public static func == (lhs: TokenTLSKey, rhs: TokenTLSKey) -> Bool { lhs.key === rhs.key }
    public func hash(into hasher: inout Hasher) { hasher.combine(ObjectIdentifier(key)) }

    public var signatureAlgorithms: [SignatureAlgorithm] {
        switch key.keyType {
        case .p384: [.ecdsaSecp384R1Sha384]
        case .ed25519: [.ed25519]
        default: [.ecdsaSecp256R1Sha256]
        }
    }

    public func sign(channel: Channel, algorithm: SignatureAlgorithm, data: ByteBuffer) -> EventLoopFuture<ByteBuffer> {
        let hash: PKCS11Key.HashChoice?
        switch algorithm {
        case .ecdsaSecp256R1Sha256: hash = .sha256
        case .ecdsaSecp384R1Sha384: hash = .sha384
        case .ed25519: hash = nil
        default:
            return channel.eventLoop.makeFailedFuture(PKCS11Error(.unsupportedKey, "the token key cannot make a \(algorithm) TLS signature"))
        }
        do {
            // A token signs in about a millisecond (SoftHSM, a TPM a few); done inline on the connection's loop.
            let signature = try key.sign(message: Array(data.readableBytesView), hash: hash)
            return channel.eventLoop.makeSucceededFuture(ByteBuffer(bytes: signature))
        } catch {
            return channel.eventLoop.makeFailedFuture(error)
        }
    }

    public func decrypt(channel: Channel, data: ByteBuffer) -> EventLoopFuture<ByteBuffer> {
        channel.eventLoop.makeFailedFuture(PKCS11Error(.unsupportedKey, "token keys are EC keys: no RSA decryption"))
    }
}

extension AnySigningKey {
    /// This key for a TLS configuration: a PEM-loaded key, or the token itself when the key lives in a PKCS#11 token.
    public func tlsPrivateKey() throws -> NIOSSLPrivateKey {
        if case .classical(let key) = self, let token = PKCS11Key.holding(key.publicKey) {
            return NIOSSLPrivateKey(customPrivateKey: TokenTLSKey(token))
        }
        return try NIOSSLPrivateKey(bytes: Array(try pem().utf8), format: .pem)
    }
}
