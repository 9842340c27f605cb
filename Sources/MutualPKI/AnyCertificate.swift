import Crypto
import Foundation
import SwiftASN1
import X509

/// A certificate of either family: what a TLS peer presents and a mixed trust bundle holds during a migration to
/// ML-DSA. The fields every relying party reads (names, serial, validity, extensions, DER) are read the same way for
/// both.
public enum AnyCertificate: Sendable, Hashable {
    case classical(Certificate)
    /// An ML-DSA key or signature, which swift-certificates cannot parse.
    case mldsa(MLDSACertificate)

    /// swift-certificates first (the common case), the ML-DSA reader for what it refuses.
    public init(derEncoded der: [UInt8]) throws {
        if let classical = try? Certificate(derEncoded: der) {
            self = .classical(classical)
        } else {
            self = .mldsa(try MLDSACertificate(derEncoded: der))
        }
    }

    public var classical: Certificate? { if case .classical(let c) = self { c } else { nil } }
    public var mldsa: MLDSACertificate? { if case .mldsa(let c) = self { c } else { nil } }

    /// The structure-only reader's view (any algorithm), for the ML-DSA chain verifier.
    public var generic: MLDSACertificate {
        get throws {
            switch self {
            case .mldsa(let c): c
            case .classical(let c): try MLDSACertificate(derEncoded: try c.derBytes)
            }
        }
    }

    public var der: [UInt8] {
        get throws {
            switch self {
            case .classical(let c): try c.derBytes
            case .mldsa(let c): c.der
            }
        }
    }

    public var subject: DistinguishedName {
        switch self {
        case .classical(let c): c.subject
        case .mldsa(let c): c.subject
        }
    }

    public var issuer: DistinguishedName {
        switch self {
        case .classical(let c): c.issuer
        case .mldsa(let c): c.issuer
        }
    }

    public var serialNumber: Certificate.SerialNumber {
        switch self {
        case .classical(let c): c.serialNumber
        case .mldsa(let c): Certificate.SerialNumber(bytes: c.serialNumber[...])
        }
    }

    public var serialHex: String {
        switch self {
        case .classical(let c): c.serialHex
        case .mldsa(let c): c.serialHex
        }
    }

    public var notValidBefore: Date {
        switch self {
        case .classical(let c): c.notValidBefore
        case .mldsa(let c): c.notBefore
        }
    }

    public var notValidAfter: Date {
        switch self {
        case .classical(let c): c.notValidAfter
        case .mldsa(let c): c.notAfter
        }
    }

    /// The extensions (empty when an ML-DSA certificate's list is malformed; its verifier refuses such a chain).
    public var extensions: Certificate.Extensions {
        switch self {
        case .classical(let c): c.extensions
        case .mldsa(let c): (try? Certificate.Extensions(c.extensions)) ?? Certificate.Extensions()
        }
    }

    /// The subject key's algorithm as people and metrics name it: `ML-DSA-65`, `P-256`, `RSA-2048`, `Ed25519`.
    public var keyAlgorithm: String {
        switch self {
        case .classical(let c): c.publicKey.algorithmDescription
        case .mldsa(let c): c.subjectKeyVariant.map(\.displayName) ?? "unknown"
        }
    }

    /// The signature algorithm of this certificate as people and metrics name it (`ML-DSA-65`, `ECDSA-SHA256`, …).
    public var signatureAlgorithmName: String {
        switch self {
        case .classical(let c): String(describing: c.signatureAlgorithm).replacingOccurrences(of: "SignatureAlgorithm.", with: "")
        case .mldsa(let c): MLDSAVariant(oid: c.signatureAlgorithm)?.displayName ?? c.signatureAlgorithm.description
        }
    }

    /// The DER SubjectPublicKeyInfo: identifies the key (caches, CRL checks) whatever its algorithm.
    public var subjectPublicKeyInfo: [UInt8] {
        switch self {
        case .classical(let c): c.publicKey.subjectPublicKeyInfoDER
        case .mldsa(let c): c.subjectPublicKeyInfo
        }
    }

    /// Whether this (issuer) certificate's key signed `crl`, whatever the key's algorithm.
    public func hasSigned(_ crl: RevocationList) -> Bool {
        switch self {
        case .classical(let c): crl.isSigned(by: c)
        case .mldsa(let c): crl.isSigned(by: c)
        }
    }

    /// Whether this is an ML-DSA key or signature (post-quantum on the certificate axis).
    public var isPostQuantum: Bool { mldsa != nil }
}

extension MLDSAVariant {
    /// `ML-DSA-65`, as FIPS 204 writes it.
    public var displayName: String { rawValue.uppercased() }
}

extension CertificateIdentity {
    public static func of(_ certificate: AnyCertificate) -> String? {
        switch certificate {
        case .classical(let c): of(c)
        case .mldsa(let c): of(c)
        }
    }

    public static func display(_ certificate: AnyCertificate) -> String {
        of(certificate) ?? "serial \(certificate.serialHex)"
    }
}

extension Certificate.PublicKey {
    /// The whole DER SubjectPublicKeyInfo (swift-certificates' `subjectPublicKeyInfoBytes` is only the key bits).
    public var subjectPublicKeyInfoDER: [UInt8] {
        var serializer = DER.Serializer()
        try? serializer.serialize(self)
        return serializer.serializedBytes
    }
}
