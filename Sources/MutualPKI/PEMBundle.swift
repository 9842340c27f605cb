import Foundation
import SwiftASN1
import X509

/// Reading certificates, CSRs and keys from files as users hand them over: PEM (one or many blocks) or DER.
public enum PEMBundle {
    /// The largest single input Mutual will parse: CSRs and certificates are a few KiB; bundles of many CAs stay
    /// well under this.
    public static let maximumInputSize = 64 * 1024

    /// Parses every `CERTIFICATE` block of a PEM text, in order. Throws if there is none or one is malformed.
    public static func certificates(fromPEM text: String, what: String = "certificate file") throws -> [Certificate] {
        let documents: [PEMDocument]
        do {
            documents = try PEMDocument.parseMultiple(pemString: text)
        } catch {
            throw PKIError(.malformedInput, "\(what): not valid PEM (\(error))")
        }
        var result: [Certificate] = []
        for (index, document) in documents.enumerated() where document.discriminator == "CERTIFICATE" {
            do {
                result.append(try Certificate(derEncoded: document.derBytes))
            } catch {
                throw PKIError(.malformedInput, "\(what): certificate #\(index + 1) is not a valid X.509 certificate (\(error))")
            }
        }
        guard !result.isEmpty else {
            throw PKIError(.malformedInput, "\(what): contains no PEM CERTIFICATE block")
        }
        return result
    }

    /// Parses certificates from bytes that are PEM text or a single DER certificate.
    public static func certificates(fromBytes bytes: [UInt8], what: String = "certificate file") throws -> [Certificate] {
        if let text = String(validating: bytes, as: UTF8.self), text.contains("-----BEGIN") {
            return try certificates(fromPEM: text, what: what)
        }
        do {
            return [try Certificate(derEncoded: bytes)]
        } catch {
            throw PKIError(.malformedInput, "\(what): neither PEM nor a DER certificate (\(error))")
        }
    }

    /// The DER of every `type` block of PEM text, in order; bytes that are not PEM are taken as one DER document.
    public static func documents(_ bytes: [UInt8], type: String, what: String = "file") throws -> [[UInt8]] {
        guard bytes.count <= maximumInputSize * 16 else { throw PKIError(.inputTooLarge, "\(what): larger than \(maximumInputSize * 16) bytes") }
        guard let text = String(validating: bytes, as: UTF8.self), text.contains("-----BEGIN") else { return [bytes] }
        let documents: [PEMDocument]
        do {
            documents = try PEMDocument.parseMultiple(pemString: text)
        } catch {
            throw PKIError(.malformedInput, "\(what): not valid PEM (\(error))")
        }
        let matching = documents.filter { $0.discriminator == type }.map(\.derBytes)
        guard !matching.isEmpty else { throw PKIError(.malformedInput, "\(what): contains no PEM \(type) block") }
        return matching
    }

    /// The first `type` block of PEM text, or the bytes themselves when they are not PEM.
    public static func firstDocument(_ bytes: [UInt8], type: String, what: String = "file") throws -> [UInt8] {
        try documents(bytes, type: type, what: what)[0]
    }

    /// Certificates of any algorithm: what a trust bundle carrying a classical and an ML-DSA root holds. Each
    /// certificate swift-certificates reads is `classical`; one it cannot (an ML-DSA key or signature) is `mldsa`.
    public static func anyCertificates(fromBytes bytes: [UInt8], what: String = "certificate file") throws -> [AnyCertificate] {
        let isPEM = String(validating: bytes, as: UTF8.self)?.contains("-----BEGIN") ?? false
        return try documents(bytes, type: "CERTIFICATE", what: what).enumerated().map { index, der in
            if let classical = try? Certificate(derEncoded: der) { return .classical(classical) }
            do {
                return .mldsa(try MLDSACertificate(derEncoded: der))
            } catch {
                // The same words as the classical reader's, so a file of garbage is named as such.
                guard isPEM else { throw PKIError(.malformedInput, "\(what): neither PEM nor a DER certificate (\(error))") }
                throw PKIError(.malformedInput, "\(what): certificate #\(index + 1) is not a valid X.509 certificate (\(error))")
            }
        }
    }

    /// Serializes certificates as concatenated PEM blocks.
    public static func pem(_ certificates: [Certificate]) throws -> String {
        try certificates.map { PEMCodec.encode(try $0.derBytes, label: "CERTIFICATE") }.joined()
    }

    /// DER bytes of a certificate.
    public static func der(_ certificate: Certificate) throws -> [UInt8] {
        var serializer = DER.Serializer()
        try serializer.serialize(certificate)
        return serializer.serializedBytes
    }
}

extension Certificate {
    /// DER encoding of the certificate.
    public var derBytes: [UInt8] {
        get throws { try PEMBundle.der(self) }
    }

    /// Serial number as lowercase hex without separators, as stored in the inventory and printed by the CLI.
    public var serialHex: String { serialNumber.bytes.hexString }
}

extension Sequence where Element == UInt8 {
    /// Lowercase hex, two digits per byte.
    public var hexString: String {
        let digits: [UInt8] = Array("0123456789abcdef".utf8)
        var out = [UInt8]()
        out.reserveCapacity(underestimatedCount * 2)
        for byte in self {
            out.append(digits[Int(byte >> 4)])
            out.append(digits[Int(byte & 0x0F)])
        }
        return String(decoding: out, as: UTF8.self)
    }
}

extension Array where Element == UInt8 {
    /// Parses hex, allowing colons and whitespace between bytes (as `openssl x509 -fingerprint` prints).
    public init?(hex: String) {
        let cleaned = hex.filter { !$0.isWhitespace && $0 != ":" }
        guard cleaned.count % 2 == 0 else { return nil }
        var bytes: [UInt8] = []
        bytes.reserveCapacity(cleaned.count / 2)
        var index = cleaned.startIndex
        while index < cleaned.endIndex {
            let next = cleaned.index(index, offsetBy: 2)
            guard let byte = UInt8(cleaned[index..<next], radix: 16) else { return nil }
            bytes.append(byte)
            index = next
        }
        self = bytes
    }
}

extension Certificate {
    /// DER of a certificate this process has just signed, assembled from the TBS bytes the signature covers instead of
    /// re-encoding the whole structure (about a tenth of the issuance path's encoding work). Only for certificates made
    /// by ``IssuingCA`` (whose algorithm encodings Mutual chooses); tests check it equals ``derBytes``.
    public var issuedDER: [UInt8] {
        get throws {
            var serializer = DER.Serializer()
            try serializer.appendConstructedNode(identifier: .sequence) { coder in
                coder.serializeRawBytes(tbsCertificateBytes)
                try SignatureAlgorithmDER.serialize(signatureAlgorithm, into: &coder)
                try coder.serialize(ASN1BitString(bytes: signature.rawRepresentation[...]))
            }
            return serializer.serializedBytes
        }
    }
}

