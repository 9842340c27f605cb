import Crypto
import Foundation
import SwiftASN1
import X509

/// ML-DSA (FIPS 204) in X.509, as RFC 9881 specifies it: the algorithm identifiers have no parameters, the
/// SubjectPublicKeyInfo holds the raw public key, the signature is the raw ML-DSA signature (empty context).
///
/// Hand-written with swift-asn1 because swift-certificates 1.21 cannot hold an ML-DSA key or signature (its key and
/// algorithm types are closed enums); swift-crypto provides ML-DSA-65 and ML-DSA-87 (no ML-DSA-44). Kept to building,
/// parsing and checking signatures; names and extensions reuse swift-certificates' own DER types.
public enum MLDSAVariant: String, CaseIterable, Sendable, Codable {
    case mlDSA65 = "ml-dsa-65"
    case mlDSA87 = "ml-dsa-87"

    /// id-ml-dsa-65 / id-ml-dsa-87 (NIST, RFC 9881).
    public var oid: ASN1ObjectIdentifier {
        switch self {
        case .mlDSA65: [2, 16, 840, 1, 101, 3, 4, 3, 18]
        case .mlDSA87: [2, 16, 840, 1, 101, 3, 4, 3, 19]
        }
    }

    public init?(oid: ASN1ObjectIdentifier) {
        guard let variant = Self.allCases.first(where: { $0.oid == oid }) else { return nil }
        self = variant
    }

    /// The OID's DER encoding (tag, length, contents), as it appears in every structure that names the algorithm.
    public var encodedOID: [UInt8] {
        var serializer = DER.Serializer()
        try? serializer.serialize(oid)
        return serializer.serializedBytes
    }

    /// FIPS 204 sizes: public key and signature, in bytes.
    public var publicKeySize: Int { self == .mlDSA65 ? 1952 : 2592 }
    public var signatureSize: Int { self == .mlDSA65 ? 3309 : 4627 }

    /// Whether `signature` over `message` verifies under the raw public key `publicKey`. (Parsing the raw key costs
    /// under 1 % of a verification: `mutual bench pq` measured it, so parsed keys are not cached.)
    public func isValidSignature(_ signature: [UInt8], for message: [UInt8], publicKey: [UInt8]) -> Bool {
        guard publicKey.count == publicKeySize, signature.count == signatureSize else { return false }
        switch self {
        case .mlDSA65: return (try? MLDSA65.PublicKey(rawRepresentation: publicKey))?.isValidSignature(signature, for: message) ?? false
        case .mlDSA87: return (try? MLDSA87.PublicKey(rawRepresentation: publicKey))?.isValidSignature(signature, for: message) ?? false
        }
    }
}

/// An ML-DSA private key, kept as its 32-byte seed (the form RFC 9881 recommends for PKCS#8).
public struct MLDSASigningKey: Sendable {
    enum Key: Sendable {
        case k65(MLDSA65.PrivateKey)
        case k87(MLDSA87.PrivateKey)
    }

    let key: Key
    /// The raw public key, derived once: swift-crypto derives it from the private key on every access, which
    /// recomputes t1 (about 180 µs for ML-DSA-65, as much as a verification).
    public let publicKey: [UInt8]
    public var variant: MLDSAVariant { if case .k65 = key { .mlDSA65 } else { .mlDSA87 } }

    public init(generating variant: MLDSAVariant) throws {
        switch variant {
        case .mlDSA65: key = .k65(try MLDSA65.PrivateKey())
        case .mlDSA87: key = .k87(try MLDSA87.PrivateKey())
        }
        publicKey = Self.derivePublicKey(key)
    }

    public init(variant: MLDSAVariant, seed: [UInt8]) throws {
        guard seed.count == 32 else { throw PKIError(.malformedInput, "an ML-DSA seed is 32 bytes (got \(seed.count))") }
        switch variant {
        case .mlDSA65: key = .k65(try MLDSA65.PrivateKey(seedRepresentation: seed, publicKey: nil))
        case .mlDSA87: key = .k87(try MLDSA87.PrivateKey(seedRepresentation: seed, publicKey: nil))
        }
        publicKey = Self.derivePublicKey(key)
    }

    static func derivePublicKey(_ key: Key) -> [UInt8] {
        switch key {
        case .k65(let k): Array(k.publicKey.rawRepresentation)
        case .k87(let k): Array(k.publicKey.rawRepresentation)
        }
    }

    public var seed: [UInt8] {
        switch key {
        case .k65(let k): Array(k.seedRepresentation)
        case .k87(let k): Array(k.seedRepresentation)
        }
    }

    public func sign(_ message: [UInt8]) throws -> [UInt8] {
        switch key {
        case .k65(let k): Array(try k.signature(for: message))
        case .k87(let k): Array(try k.signature(for: message))
        }
    }

    /// PKCS#8 in the seed form RFC 9881 recommends: OneAsymmetricKey { 0, { OID }, OCTET STRING { [0] IMPLICIT seed } }.
    public var pkcs8: [UInt8] {
        get throws {
            var serializer = DER.Serializer()
            try serializer.appendConstructedNode(identifier: .sequence) { k in
                try k.serialize(0)
                try k.appendConstructedNode(identifier: .sequence) { try $0.serialize(variant.oid) }
                try k.serialize(ASN1OctetString(contentBytes: ([0x80, 0x20] + seed)[...]))
            }
            return serializer.serializedBytes
        }
    }

    /// The key file: `PRIVATE KEY` PEM, or `ENCRYPTED PRIVATE KEY` (PBES2, as every Mutual key file) with a passphrase.
    public func pem(passphrase: String?) throws -> String {
        guard let passphrase else { return PEMCodec.encode(try pkcs8, label: "PRIVATE KEY") }
        guard !passphrase.isEmpty else { throw PKIError(.wrongPassphrase, "the passphrase must not be empty") }
        return try KeyFile.encrypt(pkcs8: try pkcs8, passphrase: passphrase)
    }

    /// Reads an ML-DSA key file (seed form; plain or encrypted). `.unsupportedKey` for another algorithm or a key stored
    /// without its seed; `.wrongPassphrase`, `.malformedInput` as for the other key files.
    public init(pem: String, passphrase: () throws -> String?) throws {
        let document: PEMDocument
        do { document = try PEMDocument(pemString: pem) } catch {
            throw PKIError(.malformedInput, "private key file is not valid PEM (\(error))")
        }
        var der = document.derBytes
        if document.discriminator == "ENCRYPTED PRIVATE KEY" {
            guard let secret = try passphrase(), !secret.isEmpty else {
                throw PKIError(.wrongPassphrase, "the private key is encrypted: set MUTUAL_PASSPHRASE or enter the passphrase")
            }
            der = try KeyFile.decrypt(der, passphrase: secret)
        } else if document.discriminator == "EC PRIVATE KEY" || document.discriminator == "RSA PRIVATE KEY" {
            throw PKIError(.unsupportedKey, "the key is not ML-DSA (\(document.discriminator))")
        } else if document.discriminator != "PRIVATE KEY" {
            throw PKIError(.malformedInput, "expected a PRIVATE KEY, got \(document.discriminator)")
        }
        let (variant, privateKey): (MLDSAVariant, [UInt8])
        do {
            (variant, privateKey) = try DER.sequence(try DER.parse(der), identifier: .sequence) { k in
                _ = try Int(derEncoded: &k)
                let oid = try DER.sequence(k.next() ?? { throw PKIError(.malformedInput, "no key algorithm") }(), identifier: .sequence) {
                    let oid = try ASN1ObjectIdentifier(derEncoded: &$0)
                    _ = $0.next()  // parameters: none for ML-DSA, a curve for EC
                    return oid
                }
                guard let variant = MLDSAVariant(oid: oid) else { throw PKIError(.unsupportedKey, "the key is not ML-DSA (\(oid))") }
                let privateKey = Array(try ASN1OctetString(derEncoded: &k).bytes)
                while k.next() != nil {}  // attributes, public key: not needed
                return (variant, privateKey)
            }
        } catch let error as PKIError {
            throw document.discriminator == "ENCRYPTED PRIVATE KEY" && error.code == .malformedInput ? PKIError(.wrongPassphrase, "wrong passphrase for the private key") : error
        } catch {
            throw document.discriminator == "ENCRYPTED PRIVATE KEY" ? PKIError(.wrongPassphrase, "wrong passphrase for the private key") : PKIError(.malformedInput, "not a PKCS#8 key: \(error)")
        }
        guard privateKey.count == 34, privateKey[0] == 0x80, privateKey[1] == 0x20 else {
            throw PKIError(.unsupportedKey, "only the seed form of an ML-DSA private key is read (RFC 9881); this one holds the expanded key")
        }
        try self.init(variant: variant, seed: Array(privateKey[2...]))
    }

    /// SEQUENCE { body, AlgorithmIdentifier, BIT STRING signature }: the envelope of certificates, requests and CRLs.
    func signed(_ body: [UInt8]) throws -> [UInt8] {
        let signature = try sign(body)
        var serializer = DER.Serializer()
        try serializer.appendConstructedNode(identifier: .sequence) { s in
            s.serializeRawBytes(body)
            try s.appendConstructedNode(identifier: .sequence) { try $0.serialize(variant.oid) }
            try s.serialize(ASN1BitString(bytes: signature[...]))
        }
        return serializer.serializedBytes
    }

    /// SubjectPublicKeyInfo: SEQUENCE { SEQUENCE { OID }, BIT STRING raw key }.
    public var subjectPublicKeyInfo: [UInt8] {
        get throws { try MLDSACertificate.subjectPublicKeyInfo(variant: variant, publicKey: publicKey) }
    }
}

/// A certificate whose signature is ML-DSA, or whose subject key is (the outer structure, read without
/// swift-certificates): what building, chain checks and the tests need.
public struct MLDSACertificate: Sendable, Hashable {
    public var der: [UInt8]
    /// The TBSCertificate, exactly as signed.
    public var tbsBytes: [UInt8]
    public var signatureAlgorithm: ASN1ObjectIdentifier
    public var signature: [UInt8]
    public var serialNumber: [UInt8]
    public var issuer: DistinguishedName
    public var subject: DistinguishedName
    public var notBefore: Date
    public var notAfter: Date
    /// The whole SubjectPublicKeyInfo, its algorithm, and the key bits (the raw key for ML-DSA).
    public var subjectPublicKeyInfo: [UInt8]
    public var subjectPublicKeyAlgorithm: ASN1ObjectIdentifier
    public var subjectPublicKey: [UInt8]
    public var extensions: [Certificate.Extension]

    /// Serial number, lowercase hex (as `mutual list` prints every serial).
    public var serialHex: String { serialNumber.hexString }

    /// The subjectAltName extension's names (none when absent or unreadable).
    public var subjectAlternativeNames: SubjectAlternativeNames {
        guard let e = extensions.first(where: { $0.oid == .X509ExtensionID.subjectAlternativeName }) else { return SubjectAlternativeNames() }
        return (try? SubjectAlternativeNames(e)) ?? SubjectAlternativeNames()
    }

    /// Reads the first `CERTIFICATE` block of PEM text (or DER bytes).
    public init(pem bytes: [UInt8]) throws {
        try self.init(derEncoded: try PEMBundle.firstDocument(bytes, type: "CERTIFICATE"))
    }

    /// SHA-256 of the DER, lowercase hex (the form `mutual init` prints and agents pin).
    public var fingerprint: String { SHA256.hash(data: der).hexString }

    /// PEM (`CERTIFICATE`).
    public var pem: String { PEMCodec.encode(der, label: "CERTIFICATE") }

    /// The subject key's ML-DSA variant, if it is one.
    public var subjectKeyVariant: MLDSAVariant? { MLDSAVariant(oid: subjectPublicKeyAlgorithm) }

    /// Whether this certificate's signature verifies under an ML-DSA issuer key.
    public func isSigned(by issuerVariant: MLDSAVariant, publicKey: [UInt8]) -> Bool {
        signatureAlgorithm == issuerVariant.oid && issuerVariant.isValidSignature(signature, for: tbsBytes, publicKey: publicKey)
    }

    /// Whether `issuer` (an ML-DSA certificate) signed this one: names chain and the signature verifies.
    public func isIssued(by issuer: MLDSACertificate) -> Bool {
        guard let variant = issuer.subjectKeyVariant, self.issuer == issuer.subject else { return false }
        return isSigned(by: variant, publicKey: issuer.subjectPublicKey)
    }

    /// A SubjectPublicKeyInfo's algorithm and key bits (parameters, as EC keys carry, are skipped).
    static func subjectPublicKey(_ node: ASN1Node) throws -> (ASN1ObjectIdentifier, [UInt8]) {
        try DER.sequence(node, identifier: .sequence) { s in
            let algorithm = try DER.sequence(s.next() ?? { throw PKIError(.malformedInput, "no key algorithm") }(), identifier: .sequence) {
                let oid = try ASN1ObjectIdentifier(derEncoded: &$0)
                _ = $0.next()
                return oid
            }
            return (algorithm, Array(try ASN1BitString(derEncoded: &s).bytes))
        }
    }

    static func subjectPublicKeyInfo(variant: MLDSAVariant, publicKey: [UInt8]) throws -> [UInt8] {
        var serializer = DER.Serializer()
        try serializer.appendConstructedNode(identifier: .sequence) { spki in
            try spki.appendConstructedNode(identifier: .sequence) { try $0.serialize(variant.oid) }
            try spki.serialize(ASN1BitString(bytes: publicKey[...]))
        }
        return serializer.serializedBytes
    }

    /// Builds and signs a v3 certificate with an ML-DSA issuer key. The subject key may be of any algorithm: pass its
    /// DER SubjectPublicKeyInfo (an ML-DSA key's comes from ``MLDSASigningKey/subjectPublicKeyInfo``).
    public static func build(
        serialNumber: [UInt8], issuer: DistinguishedName, subject: DistinguishedName, notBefore: Date, notAfter: Date,
        subjectPublicKeyInfo: [UInt8], extensions: [Certificate.Extension], issuerKey: MLDSASigningKey
    ) throws -> MLDSACertificate {
        guard !serialNumber.isEmpty, serialNumber.count <= 20, serialNumber[0] & 0x80 == 0 else {
            throw PKIError(.malformedInput, "a serial number is 1 to 20 bytes and positive")
        }
        guard notAfter > notBefore else { throw PKIError(.malformedInput, "notAfter must follow notBefore") }
        var tbs = DER.Serializer()
        try tbs.appendConstructedNode(identifier: .sequence) { t in
            try t.serialize(explicitlyTaggedWithTagNumber: 0, tagClass: .contextSpecific) { try $0.serialize(2) }
            try t.serialize(ArraySlice(serialNumber))
            try t.appendConstructedNode(identifier: .sequence) { try $0.serialize(issuerKey.variant.oid) }
            try t.serialize(issuer)
            try t.appendConstructedNode(identifier: .sequence) { validity in
                try Self.serializeTime(notBefore, into: &validity)
                try Self.serializeTime(notAfter, into: &validity)
            }
            try t.serialize(subject)
            t.serializeRawBytes(subjectPublicKeyInfo)
            if !extensions.isEmpty {
                try t.serialize(explicitlyTaggedWithTagNumber: 3, tagClass: .contextSpecific) { try $0.serializeSequenceOf(extensions) }
            }
        }
        return try MLDSACertificate(derEncoded: try issuerKey.signed(tbs.serializedBytes))
    }

    /// RFC 5280 4.1.2.5: UTCTime through 2049, GeneralizedTime from 2050.
    static func serializeTime(_ date: Date, into serializer: inout DER.Serializer) throws {
        let c = Calendar.utc.dateComponents([.year, .month, .day, .hour, .minute, .second], from: date)
        if c.year! < 2050 {
            try serializer.serialize(try UTCTime(year: c.year!, month: c.month!, day: c.day!, hours: c.hour!, minutes: c.minute!, seconds: c.second!))
        } else {
            try serializer.serialize(try GeneralizedTime(year: c.year!, month: c.month!, day: c.day!, hours: c.hour!, minutes: c.minute!, seconds: c.second!, fractionalSeconds: 0))
        }
    }

    static func time(_ node: ASN1Node) throws -> Date {
        let components: DateComponents
        if node.identifier == UTCTime.defaultIdentifier {
            let t = try UTCTime(derEncoded: node)
            components = DateComponents(timeZone: .init(identifier: "UTC"), year: t.year, month: t.month, day: t.day, hour: t.hours, minute: t.minutes, second: t.seconds)
        } else {
            let t = try GeneralizedTime(derEncoded: node)
            components = DateComponents(timeZone: .init(identifier: "UTC"), year: t.year, month: t.month, day: t.day, hour: t.hours, minute: t.minutes, second: t.seconds)
        }
        guard let date = Calendar.utc.date(from: components) else { throw PKIError(.malformedInput, "a certificate time is out of range") }
        return date
    }

    /// Parses the DER of a certificate (any algorithm). Malformed or truncated input throws `.malformedInput`.
    public init(derEncoded der: [UInt8]) throws {
        guard der.count <= 64 * 1024 else { throw PKIError(.inputTooLarge, "a certificate over 64 KiB") }
        do {
            let root = try DER.parse(der)
            var fields: (tbs: [UInt8], algorithm: ASN1ObjectIdentifier, signature: [UInt8])?
            var tbsFields: (serial: [UInt8], issuer: DistinguishedName, subject: DistinguishedName, notBefore: Date, notAfter: Date,
                            spki: [UInt8], spkiAlgorithm: ASN1ObjectIdentifier, key: [UInt8], extensions: [Certificate.Extension])?
            try DER.sequence(root, identifier: .sequence) { nodes in
                guard let tbsNode = nodes.next(), let algorithmNode = nodes.next(), let signatureNode = nodes.next() else {
                    throw PKIError(.malformedInput, "a certificate is SEQUENCE { tbsCertificate, signatureAlgorithm, signature }")
                }
                let algorithm = try DER.sequence(algorithmNode, identifier: .sequence) { try ASN1ObjectIdentifier(derEncoded: &$0) }
                let signature = try ASN1BitString(derEncoded: signatureNode)
                fields = (Array(tbsNode.encodedBytes), algorithm, Array(signature.bytes))
                tbsFields = try DER.sequence(tbsNode, identifier: .sequence) { t in
                    guard let version = t.next(), version.identifier == ASN1Identifier(tagWithNumber: 0, tagClass: .contextSpecific) else {
                        throw PKIError(.malformedInput, "only v3 certificates are read")
                    }
                    let serial = try ArraySlice<UInt8>(derEncoded: &t)
                    _ = t.next()  // the inner signature algorithm, checked against the outer one below
                    let issuer = try DistinguishedName(derEncoded: &t)
                    let (notBefore, notAfter) = try DER.sequence(t.next() ?? { throw PKIError(.malformedInput, "no validity") }(), identifier: .sequence) { v in
                        (try Self.time(v.next() ?? { throw PKIError(.malformedInput, "no notBefore") }()),
                         try Self.time(v.next() ?? { throw PKIError(.malformedInput, "no notAfter") }()))
                    }
                    let subject = try DistinguishedName(derEncoded: &t)
                    guard let spkiNode = t.next() else { throw PKIError(.malformedInput, "no subjectPublicKeyInfo") }
                    let (spkiAlgorithm, key) = try Self.subjectPublicKey(spkiNode)
                    var extensions: [Certificate.Extension] = []
                    while let node = t.next() {
                        if node.identifier == ASN1Identifier(tagWithNumber: 3, tagClass: .contextSpecific) {
                            extensions = try DER.sequence(of: Certificate.Extension.self, identifier: .sequence, rootNode: try DER.explicitlyTagged(node, tagNumber: 3, tagClass: .contextSpecific) { $0 })
                        }
                    }
                    return (Array(serial), issuer, subject, notBefore, notAfter, Array(spkiNode.encodedBytes), spkiAlgorithm, key, extensions)
                }
            }
            guard let fields, let tbsFields else { throw PKIError(.malformedInput, "an empty certificate") }
            self.der = der
            self.tbsBytes = fields.tbs
            self.signatureAlgorithm = fields.algorithm
            self.signature = fields.signature
            self.serialNumber = tbsFields.serial
            self.issuer = tbsFields.issuer
            self.subject = tbsFields.subject
            self.notBefore = tbsFields.notBefore
            self.notAfter = tbsFields.notAfter
            self.subjectPublicKeyInfo = tbsFields.spki
            self.subjectPublicKeyAlgorithm = tbsFields.spkiAlgorithm
            self.subjectPublicKey = tbsFields.key
            self.extensions = tbsFields.extensions
        } catch let error as PKIError {
            throw error
        } catch {
            throw PKIError(.malformedInput, "not a DER certificate: \(error)")
        }
    }
}

/// A PKCS#10 certification request signed with an ML-DSA key (RFC 2986 with RFC 9881's algorithms): how an agent with an
/// ML-DSA key asks for a certificate. Hand-written for the same reason as ``MLDSACertificate``.
public struct MLDSACertificationRequest: Sendable, Hashable {
    public var der: [UInt8]
    public var subject: DistinguishedName
    public var variant: MLDSAVariant
    /// The raw ML-DSA public key the request is for (and was signed with).
    public var publicKey: [UInt8]
    public var subjectPublicKeyInfo: [UInt8]
    /// The extensions of its extensionRequest attribute (SANs, …), empty if none.
    public var requestedExtensions: [Certificate.Extension]
    /// Whether the request's signature verifies under its own key (proof of possession).
    public var isSignatureValid: Bool

    static let attributesTag = ASN1Identifier(tagWithNumber: 0, tagClass: .contextSpecific)

    /// Builds and signs a request for `key`, asking for `extensions` (an extensionRequest attribute when not empty).
    public static func build(subject: DistinguishedName, extensions: [Certificate.Extension], key: MLDSASigningKey) throws -> MLDSACertificationRequest {
        var attributes: [CertificateSigningRequest.Attribute] = []
        if !extensions.isEmpty {
            attributes.append(try CertificateSigningRequest.Attribute(ExtensionRequest(extensions: Certificate.Extensions(extensions))))
        }
        var info = DER.Serializer()
        try info.appendConstructedNode(identifier: .sequence) { i in
            try i.serialize(0)
            try i.serialize(subject)
            i.serializeRawBytes(try key.subjectPublicKeyInfo)
            try i.serializeSetOf(attributes, identifier: attributesTag)
        }
        return try MLDSACertificationRequest(derEncoded: try key.signed(info.serializedBytes))
    }

    /// Parses a request; `.malformedInput` for garbage, `.unsupportedKey` when its key or signature is not ML-DSA (the
    /// classical path reads those). The signature is checked, and its outcome kept in ``isSignatureValid``.
    /// Reads a `CERTIFICATE REQUEST` PEM block, or DER bytes.
    public init(pemOrDER bytes: [UInt8]) throws {
        // The byte-level codec first: the authority asks this of every CSR it receives, classical ones included.
        if let der = PEMCodec.decode(bytes, label: "CERTIFICATE REQUEST") {
            try self.init(derEncoded: der)
        } else {
            try self.init(derEncoded: try PEMBundle.firstDocument(bytes, type: "CERTIFICATE REQUEST"))
        }
    }

    public init(derEncoded der: [UInt8]) throws {
        guard der.count <= 64 * 1024 else { throw PKIError(.inputTooLarge, "a certification request over 64 KiB") }
        do {
            let root = try DER.parse(der)
            let parsed = try DER.sequence(root, identifier: .sequence) { nodes -> (info: [UInt8], subject: DistinguishedName, spki: [UInt8], keyAlgorithm: ASN1ObjectIdentifier, key: [UInt8], attributes: [CertificateSigningRequest.Attribute], algorithm: ASN1ObjectIdentifier, signature: [UInt8]) in
                guard let infoNode = nodes.next(), let algorithmNode = nodes.next(), let signatureNode = nodes.next() else {
                    throw PKIError(.malformedInput, "a request is SEQUENCE { certificationRequestInfo, signatureAlgorithm, signature }")
                }
                let fields = try DER.sequence(infoNode, identifier: .sequence) { i in
                    let version = try Int(derEncoded: &i)
                    guard version == 0 else { throw PKIError(.malformedInput, "request version \(version), expected 0 (v1)") }
                    let subject = try DistinguishedName(derEncoded: &i)
                    guard let spkiNode = i.next() else { throw PKIError(.malformedInput, "no subjectPublicKeyInfo") }
                    let (keyAlgorithm, key) = try MLDSACertificate.subjectPublicKey(spkiNode)
                    // A classical request stops here, before its attributes are read (the authority asks every CSR).
                    guard MLDSAVariant(oid: keyAlgorithm) != nil else {
                        throw PKIError(.unsupportedKey, "the request's key is not ML-DSA (\(keyAlgorithm))")
                    }
                    let attributes = try DER.set(of: CertificateSigningRequest.Attribute.self, identifier: Self.attributesTag, nodes: &i)
                    return (subject, Array(spkiNode.encodedBytes), keyAlgorithm, key, attributes)
                }
                let algorithm = try DER.sequence(algorithmNode, identifier: .sequence) { try ASN1ObjectIdentifier(derEncoded: &$0) }
                let signature = Array(try ASN1BitString(derEncoded: signatureNode).bytes)
                return (Array(infoNode.encodedBytes), fields.0, fields.1, fields.2, fields.3, fields.4, algorithm, signature)
            }
            guard let variant = MLDSAVariant(oid: parsed.keyAlgorithm) else {
                throw PKIError(.unsupportedKey, "the request's key is not ML-DSA (\(parsed.keyAlgorithm))")
            }
            guard parsed.algorithm == variant.oid else {
                throw PKIError(.unsupportedKey, "the request's signature algorithm \(parsed.algorithm) does not match its \(variant.rawValue) key")
            }
            var extensions: [Certificate.Extension] = []
            for attribute in parsed.attributes where attribute.oid == .CSRAttributes.extensionRequest {
                extensions.append(contentsOf: try ExtensionRequest(attribute).extensions)
            }
            self.der = der
            self.subject = parsed.subject
            self.variant = variant
            self.publicKey = parsed.key
            self.subjectPublicKeyInfo = parsed.spki
            self.requestedExtensions = extensions
            self.isSignatureValid = variant.isValidSignature(parsed.signature, for: parsed.info, publicKey: parsed.key)
        } catch let error as PKIError {
            throw error
        } catch {
            throw PKIError(.malformedInput, "not a DER certification request: \(error)")
        }
    }
}
