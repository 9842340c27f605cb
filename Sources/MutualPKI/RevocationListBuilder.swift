import Crypto
import Foundation
import SwiftASN1
import X509

/// Produces signed X.509 v2 CRLs (RFC 5280 section 5) with CRL number, AKI, reason codes and revocation dates.
///
/// Hand-written on swift-asn1: swift-certificates 1.21 cannot encode CRLs. Cost is linear in the number of entries
/// (DER encoding) plus one signature.
public struct RevocationListBuilder: Sendable {
    public struct Entry: Sendable, Hashable {
        public var serialNumber: Certificate.SerialNumber
        public var revocationDate: Date
        public var reason: RevocationReason

        public init(serialNumber: Certificate.SerialNumber, revocationDate: Date, reason: RevocationReason) {
            self.serialNumber = serialNumber
            self.revocationDate = revocationDate
            self.reason = reason
        }
    }

    public var issuer: Certificate
    public var issuerKey: Certificate.PrivateKey

    public init(issuer: Certificate, issuerKey: Certificate.PrivateKey) {
        self.issuer = issuer
        self.issuerKey = issuerKey
    }

    /// Encodes and signs a CRL; returns its DER bytes.
    public func build(number: UInt64, thisUpdate: Date, nextUpdate: Date, entries: [Entry]) throws -> [UInt8] {
        let algorithm = issuerKey.preferredSignatureAlgorithm
        let aki =
            (try? issuer.extensions.subjectKeyIdentifier)??.keyIdentifier
            ?? SubjectKeyIdentifier(hash: issuer.publicKey).keyIdentifier
        return try Self.encode(
            issuer: issuer.subject, authorityKeyIdentifier: aki, number: number, thisUpdate: thisUpdate, nextUpdate: nextUpdate,
            entries: entries, algorithm: { try SignatureAlgorithmDER.serialize(algorithm, into: &$0) },
            sign: { Array(try issuerKey.sign(bytes: $0, signatureAlgorithm: algorithm).rawRepresentation) }
        )
    }

    /// The CRL structure for any signature algorithm: `algorithm` writes the AlgorithmIdentifier (in the TBS and
    /// outside it), `sign` signs the TBS bytes.
    static func encode(
        issuer: DistinguishedName, authorityKeyIdentifier aki: ArraySlice<UInt8>, number: UInt64, thisUpdate: Date, nextUpdate: Date,
        entries: [Entry], algorithm: (inout DER.Serializer) throws -> Void, sign: ([UInt8]) throws -> [UInt8]
    ) throws -> [UInt8] {
        var tbs = DER.Serializer()
        try tbs.appendConstructedNode(identifier: .sequence) { coder in
            try coder.serialize(1)  // v2
            try algorithm(&coder)
            try coder.serialize(issuer)
            try X509Time.serialize(thisUpdate, into: &coder)
            try X509Time.serialize(nextUpdate, into: &coder)
            if !entries.isEmpty {
                try coder.appendConstructedNode(identifier: .sequence) { list in
                    for entry in entries {
                        try list.appendConstructedNode(identifier: .sequence) { item in
                            try item.serialize(entry.serialNumber.bytes)
                            try X509Time.serialize(entry.revocationDate, into: &item)
                            // RFC 5280 5.3.1: omit the reason code rather than use unspecified.
                            if entry.reason != .unspecified {
                                try item.appendConstructedNode(identifier: .sequence) { exts in
                                    try exts.serialize(
                                        Certificate.Extension(
                                            oid: RevocationList.reasonCodeOID, critical: false,
                                            value: [0x0A, 0x01, entry.reason.code]
                                        )
                                    )
                                }
                            }
                        }
                    }
                }
            }
            try coder.appendConstructedNode(identifier: .init(tagWithNumber: 0, tagClass: .contextSpecific)) { wrapper in
                try wrapper.appendConstructedNode(identifier: .sequence) { exts in
                    try exts.serialize(
                        Certificate.Extension(AuthorityKeyIdentifier(keyIdentifier: aki), critical: false)
                    )
                    var numberDER = DER.Serializer()
                    try numberDER.serialize(Int64(clamping: number))
                    try exts.serialize(
                        Certificate.Extension(
                            oid: RevocationList.crlNumberOID, critical: false, value: numberDER.serializedBytes[...]
                        )
                    )
                }
            }
        }
        let tbsBytes = tbs.serializedBytes
        let signature = try sign(tbsBytes)
        var outer = DER.Serializer()
        try outer.appendConstructedNode(identifier: .sequence) { coder in
            coder.serializeRawBytes(tbsBytes)
            try algorithm(&coder)
            try coder.serialize(ASN1BitString(bytes: signature[...]))
        }
        return outer.serializedBytes
    }

    /// A CRL signed by an ML-DSA issuer (RFC 9881 algorithm identifiers), same structure as ``build(number:thisUpdate:nextUpdate:entries:)``.
    public static func build(
        mldsaIssuer issuer: MLDSACertificate, key: MLDSASigningKey, number: UInt64, thisUpdate: Date, nextUpdate: Date, entries: [Entry]
    ) throws -> [UInt8] {
        guard issuer.subjectPublicKey == key.publicKey else { throw PKIError(.malformedInput, "the key is not the issuer certificate's") }
        let aki = (try? issuer.extensions.first { $0.oid == .X509ExtensionID.subjectKeyIdentifier }.map(SubjectKeyIdentifier.init))??.keyIdentifier
            ?? ArraySlice(Insecure.SHA1.hash(data: key.publicKey))
        return try encode(
            issuer: issuer.subject, authorityKeyIdentifier: aki, number: number, thisUpdate: thisUpdate, nextUpdate: nextUpdate, entries: entries,
            algorithm: { coder in try coder.appendConstructedNode(identifier: .sequence) { try $0.serialize(key.variant.oid) } },
            sign: { try key.sign($0) }
        )
    }

    /// PEM text of a DER CRL.
    public static func pem(_ der: [UInt8]) -> String {
        PEMDocument(type: "X509 CRL", derBytes: der).pemString + "\n"
    }
}
