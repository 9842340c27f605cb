import Foundation
import SwiftASN1
import X509

/// Why a certificate was revoked (RFC 5280 5.3.1 CRLReason). `removeFromCRL` is not offered: Mutual never un-revokes.
public enum RevocationReason: String, CaseIterable, Sendable, Codable {
    case unspecified
    case keyCompromise
    case caCompromise
    case affiliationChanged
    case superseded
    case cessationOfOperation
    case certificateHold
    case privilegeWithdrawn
    case aaCompromise

    /// The CRLReason code.
    public var code: UInt8 {
        switch self {
        case .unspecified: return 0
        case .keyCompromise: return 1
        case .caCompromise: return 2
        case .affiliationChanged: return 3
        case .superseded: return 4
        case .cessationOfOperation: return 5
        case .certificateHold: return 6
        case .privilegeWithdrawn: return 9
        case .aaCompromise: return 10
        }
    }

    public init?(code: UInt8) {
        guard let match = Self.allCases.first(where: { $0.code == code }) else { return nil }
        self = match
    }

    public static var choices: String { allCases.map(\.rawValue).joined(separator: "|") }
}

/// A parsed X.509 v2 CRL (RFC 5280 section 5).
///
/// Hand-written on swift-asn1: swift-certificates 1.21 does not model CRLs. Parsing keeps the exact TBS bytes so the
/// issuer's signature can be checked over them.
public struct RevocationList: Sendable {
    public struct Entry: Sendable, Hashable {
        public var serialNumber: Certificate.SerialNumber
        public var revocationDate: Date
        public var reason: RevocationReason?
    }

    public var issuer: DistinguishedName
    public var thisUpdate: Date
    public var nextUpdate: Date?
    public var crlNumber: [UInt8]?
    public var authorityKeyIdentifier: [UInt8]?
    public var entries: [Entry]
    /// Extensions present and marked critical that this parser does not understand (the CRL must not be used).
    public var unhandledCriticalExtensions: [ASN1ObjectIdentifier]
    /// RFC 5280 5.2.3: the CRL number must be non-critical.
    public var crlNumberIsCritical: Bool
    /// The classical signature algorithm; nil when the CRL is signed with ML-DSA (see ``signatureAlgorithmOID``).
    public var signatureAlgorithm: Certificate.SignatureAlgorithm?
    public var signatureAlgorithmOID: ASN1ObjectIdentifier
    let tbsBytes: ArraySlice<UInt8>
    let signatureBytes: ArraySlice<UInt8>

    static let crlNumberOID: ASN1ObjectIdentifier = [2, 5, 29, 20]
    static let reasonCodeOID: ASN1ObjectIdentifier = [2, 5, 29, 21]
    static let authorityKeyIdentifierOID: ASN1ObjectIdentifier = [2, 5, 29, 35]

    /// Parses DER, or PEM `X509 CRL` blocks (the first one).
    public init(bytes: [UInt8]) throws {
        if let text = String(validating: bytes, as: UTF8.self), text.contains("-----BEGIN") {
            let docs = try Self.pemDocuments(text)
            guard let first = docs.first else { throw PKIError(.malformedInput, "no PEM X509 CRL block") }
            try self.init(derEncoded: first)
        } else {
            try self.init(derEncoded: bytes)
        }
    }

    /// Every CRL in a file: one DER CRL, or all `X509 CRL` blocks of a PEM file (a PEM file without any is an error).
    public static func all(in bytes: [UInt8]) throws -> [RevocationList] {
        if let text = String(validating: bytes, as: UTF8.self), text.contains("-----BEGIN") {
            let crls = try pemDocuments(text).map { try RevocationList(derEncoded: $0) }
            guard !crls.isEmpty else { throw PKIError(.malformedInput, "no PEM X509 CRL block") }
            return crls
        }
        return [try RevocationList(derEncoded: bytes)]
    }

    /// Every `X509 CRL` block of a PEM file, as DER.
    public static func pemDocuments(_ text: String) throws -> [[UInt8]] {
        do {
            return try PEMDocument.parseMultiple(pemString: text).filter { $0.discriminator == "X509 CRL" }.map(\.derBytes)
        } catch {
            throw PKIError(.malformedInput, "CRL file is not valid PEM (\(error))")
        }
    }

    public init(derEncoded der: [UInt8]) throws {
        do {
            let root = try DER.parse(der)
            var parsed: (tbs: ASN1Node, alg: ASN1Node, sig: ASN1BitString)?
            try DER.sequence(root, identifier: .sequence) { nodes in
                guard let tbs = nodes.next(), let alg = nodes.next() else {
                    throw PKIError(.malformedInput, "CRL is truncated")
                }
                let sig = try ASN1BitString(derEncoded: &nodes)
                parsed = (tbs, alg, sig)
            }
            guard let parsed else { throw PKIError(.malformedInput, "CRL is empty") }
            (self.signatureAlgorithmOID, self.signatureAlgorithm) = try SignatureAlgorithmDER.parseAny(parsed.alg)
            self.signatureBytes = parsed.sig.bytes
            self.tbsBytes = parsed.tbs.encodedBytes
            var issuer = DistinguishedName()
            var thisUpdate = Date.distantPast
            var nextUpdate: Date?
            var entries: [Entry] = []
            var crlNumber: [UInt8]?
            var aki: [UInt8]?
            var unhandled: [ASN1ObjectIdentifier] = []
            var numberCritical = false
            let outerAlgorithm = signatureAlgorithmOID
            try DER.sequence(parsed.tbs, identifier: .sequence) { nodes in
                var next = nodes.next()
                if let node = next, node.identifier == .integer {
                    let version = try Int(derEncoded: node)
                    guard version == 1 else { throw PKIError(.malformedInput, "CRL version \(version + 1) is not supported") }
                    next = nodes.next()
                }
                guard let algNode = next else { throw PKIError(.malformedInput, "CRL is truncated") }
                guard try SignatureAlgorithmDER.oid(algNode) == outerAlgorithm else {
                    throw PKIError(.malformedInput, "CRL signature algorithms in TBS and outer structure differ")
                }
                guard let issuerNode = nodes.next() else { throw PKIError(.malformedInput, "CRL has no issuer") }
                issuer = try DistinguishedName(derEncoded: issuerNode)
                guard let thisNode = nodes.next() else { throw PKIError(.malformedInput, "CRL has no thisUpdate") }
                thisUpdate = try X509Time.parse(thisNode)
                next = nodes.next()
                if let node = next, node.identifier == UTCTime.defaultIdentifier || node.identifier == GeneralizedTime.defaultIdentifier {
                    nextUpdate = try X509Time.parse(node)
                    next = nodes.next()
                }
                if let node = next, node.identifier == .sequence {
                    try DER.sequence(node, identifier: .sequence) { revoked in
                        while let entryNode = revoked.next() {
                            entries.append(try Self.parseEntry(entryNode, unhandled: &unhandled))
                        }
                    }
                    next = nodes.next()
                }
                if let node = next, node.identifier == ASN1Identifier(tagWithNumber: 0, tagClass: .contextSpecific) {
                    guard case .constructed(let inner) = node.content, let extsNode = inner.first(where: { _ in true }) else {
                        throw PKIError(.malformedInput, "CRL extensions are malformed")
                    }
                    for ext in try Self.parseExtensions(extsNode) {
                        switch ext.oid {
                        case Self.crlNumberOID:
                            crlNumber = Array(try ArraySlice<UInt8>(derEncoded: DER.parse(ext.value)))
                            numberCritical = ext.critical
                        case Self.authorityKeyIdentifierOID:
                            aki = (try AuthorityKeyIdentifier(ext).keyIdentifier).map { Array($0) }
                        default:
                            if ext.critical { unhandled.append(ext.oid) }
                        }
                    }
                    next = nodes.next()
                }
                guard next == nil else { throw PKIError(.malformedInput, "CRL has unexpected trailing fields") }
            }
            self.issuer = issuer
            self.thisUpdate = thisUpdate
            self.nextUpdate = nextUpdate
            self.entries = entries
            self.crlNumber = crlNumber
            self.authorityKeyIdentifier = aki
            self.unhandledCriticalExtensions = unhandled
            self.crlNumberIsCritical = numberCritical
        } catch let error as PKIError {
            throw error
        } catch {
            throw PKIError(.malformedInput, "CRL is not valid DER (\(error))")
        }
    }

    private static func parseEntry(_ node: ASN1Node, unhandled: inout [ASN1ObjectIdentifier]) throws -> Entry {
        try DER.sequence(node, identifier: .sequence) { fields in
            let serialBytes = try ArraySlice<UInt8>(derEncoded: &fields)
            guard let timeNode = fields.next() else { throw PKIError(.malformedInput, "CRL entry has no revocation date") }
            let date = try X509Time.parse(timeNode)
            var reason: RevocationReason?
            if let extsNode = fields.next() {
                for ext in try parseExtensions(extsNode) {
                    if ext.oid == reasonCodeOID {
                        let value = try DER.parse(ext.value)
                        guard value.identifier == .enumerated, case .primitive(let bytes) = value.content, bytes.count == 1,
                            let parsed = RevocationReason(code: bytes.first!)
                        else { throw PKIError(.malformedInput, "CRL entry has an invalid reason code") }
                        reason = parsed
                    } else if ext.critical {
                        unhandled.append(ext.oid)
                    }
                }
            }
            return Entry(serialNumber: .init(bytes: serialBytes), revocationDate: date, reason: reason)
        }
    }

    private static func parseExtensions(_ node: ASN1Node) throws -> [Certificate.Extension] {
        try DER.sequence(of: Certificate.Extension.self, identifier: .sequence, rootNode: node)
    }

    /// Whether `issuerCertificate`'s key signed this CRL.
    public func isSigned(by issuerCertificate: Certificate) -> Bool {
        guard let signatureAlgorithm else { return false }
        return issuerCertificate.publicKey.isValidSignature(signatureBytes, for: tbsBytes, signatureAlgorithm: signatureAlgorithm)
    }

    /// Whether the key of `issuerCertificate` (ML-DSA, or classical read without swift-certificates' parser) signed
    /// this CRL.
    public func isSigned(by issuerCertificate: MLDSACertificate) -> Bool {
        if let variant = issuerCertificate.subjectKeyVariant {
            return signatureAlgorithmOID == variant.oid
                && variant.isValidSignature(Array(signatureBytes), for: Array(tbsBytes), publicKey: issuerCertificate.subjectPublicKey)
        }
        guard let signatureAlgorithm, let key = try? Certificate.PublicKey(derEncoded: issuerCertificate.subjectPublicKeyInfo) else { return false }
        return key.isValidSignature(signatureBytes, for: tbsBytes, signatureAlgorithm: signatureAlgorithm)
    }

    /// The entry for a serial number, if revoked here.
    public func entry(for serial: Certificate.SerialNumber) -> Entry? {
        entries.first { $0.serialNumber == serial }
    }
}
