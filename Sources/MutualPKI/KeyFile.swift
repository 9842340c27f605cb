import Crypto
import _CryptoExtras
import Foundation
import SwiftASN1
import X509

/// Private keys as PEM files: plain PKCS#8 (or PKCS#1 for RSA), or PKCS#8 `ENCRYPTED PRIVATE KEY` with PBES2
/// (PBKDF2-HMAC-SHA256, AES-256-CBC) as OpenSSL writes and reads it (`openssl pkey -in key.pem` asks for the
/// passphrase).
///
/// The PBES2 envelope is hand-written on swift-asn1 and swift-crypto's PBKDF2/AES-CBC primitives: no maintained Swift
/// library reads or writes encrypted PKCS#8. Deriving the key costs ~0.1 s by design (210,000 PBKDF2 rounds).
public enum KeyFile {
    static let pbes2: ASN1ObjectIdentifier = [1, 2, 840, 113549, 1, 5, 13]
    static let pbkdf2: ASN1ObjectIdentifier = [1, 2, 840, 113549, 1, 5, 12]
    static let hmacWithSHA256: ASN1ObjectIdentifier = [1, 2, 840, 113549, 2, 9]
    static let aes256CBC: ASN1ObjectIdentifier = [2, 16, 840, 1, 101, 3, 4, 1, 42]
    static let rsaEncryption: ASN1ObjectIdentifier = [1, 2, 840, 113549, 1, 1, 1]
    static let rounds = 210_000

    /// PEM text for a key; encrypted when `passphrase` is non-nil.
    public static func pem(for key: Certificate.PrivateKey, passphrase: String?) throws -> String {
        let plain = try key.serializeAsPEM()
        guard let passphrase else { return plain.pemString + "\n" }
        guard !passphrase.isEmpty else { throw PKIError(.wrongPassphrase, "the passphrase must not be empty") }
        let pkcs8 = plain.discriminator == "RSA PRIVATE KEY" ? try wrapPKCS1(plain.derBytes) : plain.derBytes
        return try encrypt(pkcs8: pkcs8, passphrase: passphrase)
    }

    /// `ENCRYPTED PRIVATE KEY` PEM (PBES2: PBKDF2-HMAC-SHA256, AES-256-CBC) around a PKCS#8 key.
    static func encrypt(pkcs8: [UInt8], passphrase: String) throws -> String {
        var salt = [UInt8](repeating: 0, count: 16)
        var rng = SystemRandomNumberGenerator()
        for i in salt.indices { salt[i] = rng.next() }
        var ivBytes = [UInt8](repeating: 0, count: 16)
        for i in ivBytes.indices { ivBytes[i] = rng.next() }
        let iv = try AES._CBC.IV(ivBytes: ivBytes)
        let symmetric = try KDF.Insecure.PBKDF2.deriveKey(
            from: Array(passphrase.utf8), salt: salt, using: .sha256, outputByteCount: 32, rounds: rounds
        )
        let ciphertext = try AES._CBC.encrypt(pkcs8, using: symmetric, iv: iv)
        var coder = DER.Serializer()
        try coder.appendConstructedNode(identifier: .sequence) { info in
            try info.appendConstructedNode(identifier: .sequence) { alg in
                try alg.serialize(pbes2)
                try alg.appendConstructedNode(identifier: .sequence) { params in
                    try params.appendConstructedNode(identifier: .sequence) { kdf in
                        try kdf.serialize(pbkdf2)
                        try kdf.appendConstructedNode(identifier: .sequence) { p in
                            try p.serialize(ASN1OctetString(contentBytes: salt[...]))
                            try p.serialize(rounds)
                            try p.appendConstructedNode(identifier: .sequence) { prf in
                                try prf.serialize(hmacWithSHA256)
                                try prf.serialize(ASN1Null())
                            }
                        }
                    }
                    try params.appendConstructedNode(identifier: .sequence) { enc in
                        try enc.serialize(aes256CBC)
                        try enc.serialize(ASN1OctetString(contentBytes: ivBytes[...]))
                    }
                }
            }
            try info.serialize(ASN1OctetString(contentBytes: Array(ciphertext)[...]))
        }
        return PEMDocument(type: "ENCRYPTED PRIVATE KEY", derBytes: coder.serializedBytes).pemString + "\n"
    }

    /// Whether a PEM text holds an encrypted key (so the caller knows to ask for a passphrase).
    public static func isEncrypted(_ pem: String) -> Bool { pem.contains("BEGIN ENCRYPTED PRIVATE KEY") }

    /// Loads a key from PEM. `passphrase` is consulted only for encrypted keys.
    public static func load(pem: String, passphrase: () throws -> String?) throws -> Certificate.PrivateKey {
        let document: PEMDocument
        do {
            document = try PEMDocument(pemString: pem)
        } catch {
            throw PKIError(.malformedInput, "private key file is not valid PEM (\(error))")
        }
        if document.discriminator == "ENCRYPTED PRIVATE KEY" {
            guard let secret = try passphrase(), !secret.isEmpty else {
                throw PKIError(.wrongPassphrase, "the private key is encrypted: set MUTUAL_PASSPHRASE or enter the passphrase")
            }
            let der = try decrypt(document.derBytes, passphrase: secret)
            do {
                return try Certificate.PrivateKey(derBytes: der)
            } catch {
                throw PKIError(.wrongPassphrase, "wrong passphrase for the private key")
            }
        }
        do {
            return try Certificate.PrivateKey(pemDocument: document)
        } catch {
            throw PKIError(.malformedInput, "private key file holds no usable key (\(error))")
        }
    }

    static func decrypt(_ der: [UInt8], passphrase: String) throws -> [UInt8] {
        do {
            let root = try DER.parse(der)
            return try DER.sequence(root, identifier: .sequence) { info in
                let (salt, iterations, iv): ([UInt8], Int, [UInt8]) = try DER.sequence(try next(&info), identifier: .sequence) { alg in
                    let oid = try ASN1ObjectIdentifier(derEncoded: &alg)
                    guard oid == pbes2 else { throw PKIError(.unsupportedKey, "encrypted key uses \(oid), not PBES2") }
                    return try DER.sequence(try next(&alg), identifier: .sequence) { params in
                        let (salt, iterations) = try DER.sequence(try next(&params), identifier: .sequence) { kdf in
                            guard try ASN1ObjectIdentifier(derEncoded: &kdf) == pbkdf2 else {
                                throw PKIError(.unsupportedKey, "encrypted key does not use PBKDF2")
                            }
                            return try DER.sequence(try next(&kdf), identifier: .sequence) { p in
                                let salt = try ASN1OctetString(derEncoded: &p)
                                let iterations = try Int(derEncoded: &p)
                                var sawSHA256 = false
                                while let node = p.next() {
                                    if node.identifier == .sequence {
                                        sawSHA256 = try DER.sequence(node, identifier: .sequence) { prf in
                                            let oid = try ASN1ObjectIdentifier(derEncoded: &prf)
                                            while prf.next() != nil {}
                                            return oid == hmacWithSHA256
                                        }
                                    }
                                }
                                guard sawSHA256 else {
                                    throw PKIError(.unsupportedKey, "encrypted key must use PBKDF2 with HMAC-SHA256")
                                }
                                return (Array(salt.bytes), iterations)
                            }
                        }
                        let iv = try DER.sequence(try next(&params), identifier: .sequence) { enc in
                            guard try ASN1ObjectIdentifier(derEncoded: &enc) == aes256CBC else {
                                throw PKIError(.unsupportedKey, "encrypted key must use AES-256-CBC")
                            }
                            return Array(try ASN1OctetString(derEncoded: &enc).bytes)
                        }
                        return (salt, iterations, iv)
                    }
                }
                let ciphertext = try ASN1OctetString(derEncoded: &info)
                guard iterations > 0, iterations <= 10_000_000 else {
                    throw PKIError(.unsupportedKey, "encrypted key has an unreasonable PBKDF2 iteration count")
                }
                let key = try KDF.Insecure.PBKDF2.deriveKey(
                    from: Array(passphrase.utf8), salt: salt, using: .sha256, outputByteCount: 32,
                    unsafeUncheckedRounds: iterations
                )
                do {
                    return Array(try AES._CBC.decrypt(ciphertext.bytes, using: key, iv: try AES._CBC.IV(ivBytes: iv)))
                } catch {
                    throw PKIError(.wrongPassphrase, "wrong passphrase for the private key")
                }
            }
        } catch let error as PKIError {
            throw error
        } catch {
            throw PKIError(.malformedInput, "encrypted private key is malformed (\(error))")
        }
    }

    private static func next(_ nodes: inout ASN1NodeCollection.Iterator) throws -> ASN1Node {
        guard let node = nodes.next() else { throw PKIError(.malformedInput, "encrypted private key is truncated") }
        return node
    }

    private static func wrapPKCS1(_ pkcs1: [UInt8]) throws -> [UInt8] {
        var coder = DER.Serializer()
        try coder.appendConstructedNode(identifier: .sequence) { seq in
            try seq.serialize(0)
            try seq.appendConstructedNode(identifier: .sequence) { alg in
                try alg.serialize(rsaEncryption)
                try alg.serialize(ASN1Null())
            }
            try seq.serialize(ASN1OctetString(contentBytes: pkcs1[...]))
        }
        return coder.serializedBytes
    }
}
