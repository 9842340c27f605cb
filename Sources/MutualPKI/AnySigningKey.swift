import Foundation
import SwiftASN1
import X509

/// A key type Mutual generates: a classical ``KeyType`` or an ML-DSA parameter set (RFC 9881). What `--key-type`
/// takes wherever an ML-DSA key is accepted (`issue`, `agent`, `init`).
public enum KeyChoice: Sendable, Hashable, CustomStringConvertible {
    case classical(KeyType)
    case mldsa(MLDSAVariant)

    public init?(rawValue: String) {
        if let classical = KeyType(rawValue: rawValue) {
            self = .classical(classical)
        } else if let variant = MLDSAVariant(rawValue: rawValue) {
            self = .mldsa(variant)
        } else {
            return nil
        }
    }

    public var rawValue: String {
        switch self {
        case .classical(let k): k.rawValue
        case .mldsa(let v): v.rawValue
        }
    }

    public var description: String { rawValue }

    public static var allValueStrings: [String] { KeyType.allCases.map(\.rawValue) + MLDSAVariant.allCases.map(\.rawValue) }
    public static var choices: String { allValueStrings.joined(separator: "|") }

    public func generate() throws -> AnySigningKey {
        switch self {
        case .classical(let k): .classical(try k.generate())
        case .mldsa(let v): .mldsa(try MLDSASigningKey(generating: v))
        }
    }
}

/// A private key of either family, as the agent holds one: classical (swift-certificates) or ML-DSA.
public enum AnySigningKey: Sendable {
    case classical(Certificate.PrivateKey)
    case mldsa(MLDSASigningKey)

    /// Reads a PEM key file: an ML-DSA PKCS#8 seed key, else any key ``KeyFile`` reads.
    public init(pem: String, passphrase: () throws -> String?) throws {
        if let key = try? MLDSASigningKey(pem: pem, passphrase: passphrase) {
            self = .mldsa(key)
        } else {
            self = .classical(try KeyFile.load(pem: pem, passphrase: passphrase))
        }
    }

    /// The unencrypted PEM key file (PKCS#8; the seed form for ML-DSA).
    public func pem() throws -> String {
        switch self {
        case .classical(let k): try KeyFile.pem(for: k, passphrase: nil)
        case .mldsa(let k): try k.pem(passphrase: nil)
        }
    }

    public var keyChoice: KeyChoice? {
        switch self {
        case .classical(let k): KeyType.allCases.first { $0.matches(k.publicKey) }.map { .classical($0) }
        case .mldsa(let k): .mldsa(k.variant)
        }
    }

    public var subjectPublicKeyInfo: [UInt8] {
        get throws {
            switch self {
            case .classical(let k): k.publicKey.subjectPublicKeyInfoDER
            case .mldsa(let k): try k.subjectPublicKeyInfo
            }
        }
    }

    /// Whether `certificate` certifies this key.
    public func matches(_ certificate: AnyCertificate) -> Bool {
        (try? subjectPublicKeyInfo) == certificate.subjectPublicKeyInfo
    }

    /// A raw signature over `statement`, as a proof of possession: the key's preferred algorithm for a classical key,
    /// ML-DSA (empty context) for an ML-DSA key.
    public func proofSignature(_ statement: [UInt8]) throws -> [UInt8] {
        switch self {
        case .classical(let k): Array(try k.sign(bytes: statement, signatureAlgorithm: k.preferredSignatureAlgorithm).rawRepresentation)
        case .mldsa(let k): try k.sign(statement)
        }
    }

    /// A PKCS#10 request for this key with `subject` and `names` as subjectAltName: its DER and PEM.
    public func certificationRequest(subject: DistinguishedName, names: [GeneralName]) throws -> (der: [UInt8], pem: String) {
        switch self {
        case .classical(let k):
            let extensions = try Certificate.Extensions { SubjectAlternativeNames(names) }
            let csr = try CertificateSigningRequest(
                version: .v1, subject: subject, privateKey: k,
                attributes: try .init([.init(ExtensionRequest(extensions: extensions))]), signatureAlgorithm: k.preferredSignatureAlgorithm
            )
            var serializer = DER.Serializer()
            try serializer.serialize(csr)
            return (serializer.serializedBytes, try csr.serializeAsPEM().pemString)
        case .mldsa(let k):
            let csr = try MLDSACertificationRequest.build(
                subject: subject, extensions: [try Certificate.Extension(SubjectAlternativeNames(names), critical: false)], key: k
            )
            return (csr.der, PEMCodec.encode(csr.der, label: "CERTIFICATE REQUEST"))
        }
    }
}

extension KeyType {
    /// Whether `key` is of this type (RSA by its size).
    public func matches(_ key: Certificate.PublicKey) -> Bool {
        let description = key.algorithmDescription
        switch self {
        case .p256: return description == "P-256"
        case .p384: return description == "P-384"
        case .ed25519: return description == "Ed25519"
        case .rsa2048: return description == "RSA-2048"
        case .rsa3072: return description == "RSA-3072"
        case .rsa4096: return description == "RSA-4096"
        }
    }
}
