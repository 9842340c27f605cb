import Crypto
import Foundation
import SwiftASN1
import X509

/// OCSP (RFC 6960) requests and responses.
///
/// Hand-written on swift-asn1: swift-certificates 1.21 has OCSP types, but they are internal to the package, so
/// neither a responder nor a client can be built on them from outside.
public enum OCSP {
    public static let basicResponseOID: ASN1ObjectIdentifier = [1, 3, 6, 1, 5, 5, 7, 48, 1, 1]
    public static let nonceOID: ASN1ObjectIdentifier = [1, 3, 6, 1, 5, 5, 7, 48, 1, 2]
    public static let noCheckOID: ASN1ObjectIdentifier = [1, 3, 6, 1, 5, 5, 7, 48, 1, 5]
    static let sha1OID: ASN1ObjectIdentifier = [1, 3, 14, 3, 2, 26]
    static let sha256OID: ASN1ObjectIdentifier = [2, 16, 840, 1, 101, 3, 4, 2, 1]

    /// The largest OCSP request accepted (a request for one certificate is ~100 bytes).
    public static let maximumRequestSize = 16 * 1024

    public enum HashAlgorithm: Sendable, Hashable {
        case sha1, sha256

        var oid: ASN1ObjectIdentifier { self == .sha1 ? OCSP.sha1OID : OCSP.sha256OID }

        func hash(_ bytes: some DataProtocol) -> [UInt8] {
            switch self {
            case .sha1: return Array(Insecure.SHA1.hash(data: bytes))
            case .sha256: return Array(SHA256.hash(data: bytes))
            }
        }
    }

    /// CertID: which certificate a request asks about.
    public struct CertID: Sendable, Hashable {
        public var hashAlgorithm: HashAlgorithm
        public var issuerNameHash: [UInt8]
        public var issuerKeyHash: [UInt8]
        public var serialNumber: Certificate.SerialNumber

        /// The CertID of `serial` under `issuer`.
        public init(issuer: Certificate, serialNumber: Certificate.SerialNumber, hashAlgorithm: HashAlgorithm = .sha1) throws {
            var name = DER.Serializer()
            try name.serialize(issuer.subject)
            self.hashAlgorithm = hashAlgorithm
            self.issuerNameHash = hashAlgorithm.hash(name.serializedBytes)
            self.issuerKeyHash = hashAlgorithm.hash(OCSP.subjectPublicKeyBits(issuer))
            self.serialNumber = serialNumber
        }

        /// The CertID of `serial` under an ML-DSA issuer (its key hash covers the raw ML-DSA public key).
        public init(issuer: MLDSACertificate, serialNumber: Certificate.SerialNumber, hashAlgorithm: HashAlgorithm = .sha1) throws {
            var name = DER.Serializer()
            try name.serialize(issuer.subject)
            self.hashAlgorithm = hashAlgorithm
            self.issuerNameHash = hashAlgorithm.hash(name.serializedBytes)
            self.issuerKeyHash = hashAlgorithm.hash(issuer.subjectPublicKey)
            self.serialNumber = serialNumber
        }

        /// Whether this CertID names the ML-DSA `issuer`.
        public func matches(issuer: MLDSACertificate) -> Bool {
            guard let mine = try? CertID(issuer: issuer, serialNumber: serialNumber, hashAlgorithm: hashAlgorithm) else { return false }
            return mine.issuerNameHash == issuerNameHash && mine.issuerKeyHash == issuerKeyHash
        }

        init(hashAlgorithm: HashAlgorithm, issuerNameHash: [UInt8], issuerKeyHash: [UInt8], serialNumber: Certificate.SerialNumber) {
            self.hashAlgorithm = hashAlgorithm
            self.issuerNameHash = issuerNameHash
            self.issuerKeyHash = issuerKeyHash
            self.serialNumber = serialNumber
        }

        /// Whether this CertID names `issuer` (by name hash and key hash).
        public func matches(issuer: Certificate) -> Bool {
            guard let mine = try? CertID(issuer: issuer, serialNumber: serialNumber, hashAlgorithm: hashAlgorithm) else { return false }
            return mine.issuerNameHash == issuerNameHash && mine.issuerKeyHash == issuerKeyHash
        }

        func serialize(into coder: inout DER.Serializer) throws {
            try coder.appendConstructedNode(identifier: .sequence) { seq in
                try seq.appendConstructedNode(identifier: .sequence) { alg in
                    try alg.serialize(hashAlgorithm.oid)
                    try alg.serialize(ASN1Null())
                }
                try seq.serialize(ASN1OctetString(contentBytes: issuerNameHash[...]))
                try seq.serialize(ASN1OctetString(contentBytes: issuerKeyHash[...]))
                try seq.serialize(serialNumber.bytes)
            }
        }

        static func parse(_ node: ASN1Node) throws -> CertID {
            try DER.sequence(node, identifier: .sequence) { nodes in
                guard let algNode = nodes.next() else { throw PKIError(.malformedInput, "CertID is truncated") }
                let oid: ASN1ObjectIdentifier = try DER.sequence(algNode, identifier: .sequence) { alg in
                    let oid = try ASN1ObjectIdentifier(derEncoded: &alg)
                    while alg.next() != nil {}
                    return oid
                }
                let algorithm: HashAlgorithm
                switch oid {
                case OCSP.sha1OID: algorithm = .sha1
                case OCSP.sha256OID: algorithm = .sha256
                default: throw PKIError(.unsupportedKey, "unsupported CertID hash algorithm \(oid)")
                }
                let nameHash = try ASN1OctetString(derEncoded: &nodes)
                let keyHash = try ASN1OctetString(derEncoded: &nodes)
                let serial = try ArraySlice<UInt8>(derEncoded: &nodes)
                return CertID(hashAlgorithm: algorithm, issuerNameHash: Array(nameHash.bytes), issuerKeyHash: Array(keyHash.bytes),
                              serialNumber: .init(bytes: serial))
            }
        }
    }

    /// The BIT STRING contents of a certificate's subjectPublicKey (what the issuer key hash covers).
    /// swift-certificates' `subjectPublicKeyInfoBytes` is exactly that (it is what the SKI hash covers too).
    static func subjectPublicKeyBits(_ certificate: Certificate) -> [UInt8] {
        Array(certificate.publicKey.subjectPublicKeyInfoBytes)
    }

    /// A parsed request: the certificates asked about and the nonce, if any.
    public struct Request: Sendable, Hashable {
        public var certIDs: [CertID]
        public var nonce: [UInt8]?

        public init(certIDs: [CertID], nonce: [UInt8]? = nil) {
            self.certIDs = certIDs
            self.nonce = nonce
        }

        /// Parses DER; throws on anything malformed (the responder answers `malformedRequest`).
        public init(derEncoded der: [UInt8]) throws {
            guard der.count <= OCSP.maximumRequestSize else { throw PKIError(.inputTooLarge, "OCSP request larger than \(OCSP.maximumRequestSize) bytes") }
            do {
                let root = try DER.parse(der)
                var ids: [CertID] = []
                var nonce: [UInt8]?
                try DER.sequence(root, identifier: .sequence) { outer in
                    guard let tbs = outer.next() else { throw PKIError(.malformedInput, "empty OCSP request") }
                    while outer.next() != nil {}  // optional signature: not required, ignored
                    try DER.sequence(tbs, identifier: .sequence) { fields in
                        var next = fields.next()
                        if let node = next, node.identifier == ASN1Identifier(tagWithNumber: 0, tagClass: .contextSpecific) { next = fields.next() }
                        if let node = next, node.identifier == ASN1Identifier(tagWithNumber: 1, tagClass: .contextSpecific) { next = fields.next() }
                        guard let list = next else { throw PKIError(.malformedInput, "OCSP request has no request list") }
                        try DER.sequence(list, identifier: .sequence) { requests in
                            while let request = requests.next() {
                                try DER.sequence(request, identifier: .sequence) { parts in
                                    guard let certID = parts.next() else { throw PKIError(.malformedInput, "OCSP request entry is empty") }
                                    ids.append(try CertID.parse(certID))
                                    while parts.next() != nil {}
                                }
                            }
                        }
                        if let extsWrapper = fields.next(), extsWrapper.identifier == ASN1Identifier(tagWithNumber: 2, tagClass: .contextSpecific),
                            case .constructed(let inner) = extsWrapper.content, let exts = inner.first(where: { _ in true })
                        {
                            for ext in try DER.sequence(of: Certificate.Extension.self, identifier: .sequence, rootNode: exts) where ext.oid == OCSP.nonceOID {
                                // The nonce extension's value is an OCTET STRING holding the nonce.
                                if let parsed = try? ASN1OctetString(derEncoded: Array(ext.value)) {
                                    nonce = Array(parsed.bytes)
                                } else {
                                    nonce = Array(ext.value)
                                }
                            }
                        }
                        while fields.next() != nil {}
                    }
                }
                guard !ids.isEmpty else { throw PKIError(.malformedInput, "OCSP request asks about no certificate") }
                guard ids.count <= 100 else { throw PKIError(.inputTooLarge, "OCSP request asks about more than 100 certificates") }
                if let nonce, nonce.isEmpty || nonce.count > 128 { throw PKIError(.malformedInput, "OCSP nonce must be 1 to 128 bytes") }
                self.certIDs = ids
                self.nonce = nonce
            } catch let error as PKIError {
                throw error
            } catch {
                throw PKIError(.malformedInput, "OCSP request is not valid DER (\(error))")
            }
        }

        public func derEncoded() throws -> [UInt8] {
            var coder = DER.Serializer()
            try coder.appendConstructedNode(identifier: .sequence) { outer in
                try outer.appendConstructedNode(identifier: .sequence) { tbs in
                    try tbs.appendConstructedNode(identifier: .sequence) { list in
                        for id in certIDs {
                            try list.appendConstructedNode(identifier: .sequence) { request in try id.serialize(into: &request) }
                        }
                    }
                    if let nonce {
                        try tbs.appendConstructedNode(identifier: .init(tagWithNumber: 2, tagClass: .contextSpecific)) { wrapper in
                            try wrapper.appendConstructedNode(identifier: .sequence) { exts in
                                var value = DER.Serializer()
                                try value.serialize(ASN1OctetString(contentBytes: nonce[...]))
                                try exts.serialize(Certificate.Extension(oid: OCSP.nonceOID, critical: false, value: value.serializedBytes[...]))
                            }
                        }
                    }
                }
            }
            return coder.serializedBytes
        }
    }

    /// The status of one certificate.
    public enum CertStatus: Sendable, Hashable {
        case good
        case revoked(time: Date, reason: RevocationReason?)
        case unknown
    }

    public struct SingleResponse: Sendable, Hashable {
        public var certID: CertID
        public var status: CertStatus
        public var thisUpdate: Date
        public var nextUpdate: Date?

        public init(certID: CertID, status: CertStatus, thisUpdate: Date, nextUpdate: Date?) {
            self.certID = certID
            self.status = status
            self.thisUpdate = thisUpdate
            self.nextUpdate = nextUpdate
        }
    }

    /// The OCSPResponseStatus values other than `successful`.
    public enum ErrorStatus: UInt8, Sendable {
        case malformedRequest = 1
        case internalError = 2
        case tryLater = 3
        case unauthorized = 6
    }

    /// An unsigned error response (RFC 6960 4.2.1: no responseBytes).
    public static func errorResponse(_ status: ErrorStatus) -> [UInt8] {
        [0x30, 0x03, 0x0A, 0x01, status.rawValue]
    }

    /// Builds and signs a successful basic response. `responderCertificate` is included in `certs` so relying
    /// parties can check a delegated signer (EKU OCSPSigning, issued by the CA).
    public static func successfulResponse(
        responses: [SingleResponse], nonce: [UInt8]?, producedAt: Date, responderCertificate: Certificate,
        responderKey: Certificate.PrivateKey
    ) throws -> [UInt8] {
        let algorithm = responderKey.preferredSignatureAlgorithm
        var certificate = DER.Serializer()
        try certificate.serialize(responderCertificate)
        return try encodeResponse(
            responses: responses, nonce: nonce, producedAt: producedAt, responderKeyBits: subjectPublicKeyBits(responderCertificate),
            certificates: [certificate.serializedBytes],
            algorithm: { try SignatureAlgorithmDER.serialize(algorithm, into: &$0) },
            sign: { Array(try responderKey.sign(bytes: $0, signatureAlgorithm: algorithm).rawRepresentation) }
        )
    }

    /// A response signed by an ML-DSA issuing CA itself (RFC 6960 2.6: the CA may sign its own responses), so a
    /// relying party checks it against the issuer it already holds; no responder certificate is carried.
    public static func successfulResponse(
        responses: [SingleResponse], nonce: [UInt8]?, producedAt: Date, mldsaIssuer: MLDSACertificate, key: MLDSASigningKey
    ) throws -> [UInt8] {
        guard mldsaIssuer.subjectPublicKey == key.publicKey else { throw PKIError(.inconsistentCA, "the key is not the OCSP issuer certificate's") }
        return try encodeResponse(
            responses: responses, nonce: nonce, producedAt: producedAt, responderKeyBits: key.publicKey, certificates: [],
            algorithm: { coder in try coder.appendConstructedNode(identifier: .sequence) { try $0.serialize(key.variant.oid) } },
            sign: { try key.sign($0) }
        )
    }

    /// The BasicOCSPResponse for any signer: `algorithm` writes its AlgorithmIdentifier, `sign` signs the
    /// ResponseData.
    static func encodeResponse(
        responses: [SingleResponse], nonce: [UInt8]?, producedAt: Date, responderKeyBits: [UInt8], certificates: [[UInt8]],
        algorithm: (inout DER.Serializer) throws -> Void, sign: ([UInt8]) throws -> [UInt8]
    ) throws -> [UInt8] {
        var tbs = DER.Serializer()
        try tbs.appendConstructedNode(identifier: .sequence) { data in
            // responderID byKey [2] EXPLICIT KeyHash (SHA-1 of the responder's public key bits)
            try data.appendConstructedNode(identifier: .init(tagWithNumber: 2, tagClass: .contextSpecific)) { id in
                try id.serialize(ASN1OctetString(contentBytes: HashAlgorithm.sha1.hash(responderKeyBits)[...]))
            }
            try data.serialize(try generalizedTime(producedAt))
            try data.appendConstructedNode(identifier: .sequence) { list in
                for response in responses {
                    try list.appendConstructedNode(identifier: .sequence) { single in
                        try response.certID.serialize(into: &single)
                        switch response.status {
                        case .good:
                            single.appendPrimitiveNode(identifier: .init(tagWithNumber: 0, tagClass: .contextSpecific)) { _ in }
                        case .unknown:
                            single.appendPrimitiveNode(identifier: .init(tagWithNumber: 2, tagClass: .contextSpecific)) { _ in }
                        case .revoked(let time, let reason):
                            try single.appendConstructedNode(identifier: .init(tagWithNumber: 1, tagClass: .contextSpecific)) { info in
                                try info.serialize(try generalizedTime(time))
                                if let reason, reason != .unspecified {
                                    try info.appendConstructedNode(identifier: .init(tagWithNumber: 0, tagClass: .contextSpecific)) { r in
                                        r.appendPrimitiveNode(identifier: .enumerated) { $0.append(reason.code) }
                                    }
                                }
                            }
                        }
                        try single.serialize(try generalizedTime(response.thisUpdate))
                        if let next = response.nextUpdate {
                            try single.appendConstructedNode(identifier: .init(tagWithNumber: 0, tagClass: .contextSpecific)) { n in
                                try n.serialize(try generalizedTime(next))
                            }
                        }
                    }
                }
            }
            if let nonce {
                try data.appendConstructedNode(identifier: .init(tagWithNumber: 1, tagClass: .contextSpecific)) { wrapper in
                    try wrapper.appendConstructedNode(identifier: .sequence) { exts in
                        var value = DER.Serializer()
                        try value.serialize(ASN1OctetString(contentBytes: nonce[...]))
                        try exts.serialize(Certificate.Extension(oid: nonceOID, critical: false, value: value.serializedBytes[...]))
                    }
                }
            }
        }
        let tbsBytes = tbs.serializedBytes
        let signature = try sign(tbsBytes)
        var basic = DER.Serializer()
        try basic.appendConstructedNode(identifier: .sequence) { coder in
            coder.serializeRawBytes(tbsBytes)
            try algorithm(&coder)
            try coder.serialize(ASN1BitString(bytes: signature[...]))
            if !certificates.isEmpty {
                try coder.appendConstructedNode(identifier: .init(tagWithNumber: 0, tagClass: .contextSpecific)) { certs in
                    try certs.appendConstructedNode(identifier: .sequence) { list in
                        for der in certificates { list.serializeRawBytes(der) }
                    }
                }
            }
        }
        var response = DER.Serializer()
        try response.appendConstructedNode(identifier: .sequence) { outer in
            outer.appendPrimitiveNode(identifier: .enumerated) { $0.append(0) }
            try outer.appendConstructedNode(identifier: .init(tagWithNumber: 0, tagClass: .contextSpecific)) { wrapper in
                try wrapper.appendConstructedNode(identifier: .sequence) { bytes in
                    try bytes.serialize(basicResponseOID)
                    try bytes.serialize(ASN1OctetString(contentBytes: basic.serializedBytes[...]))
                }
            }
        }
        return response.serializedBytes
    }

    static func generalizedTime(_ date: Date) throws -> GeneralizedTime {
        let c = Calendar.utc.dateComponents([.year, .month, .day, .hour, .minute, .second], from: date)
        return try GeneralizedTime(year: c.year!, month: c.month!, day: c.day!, hours: c.hour!, minutes: c.minute!, seconds: c.second!, fractionalSeconds: 0)
    }

    /// A parsed response, as a relying party (`mutual verify --ocsp`) reads it.
    public struct ParsedResponse: Sendable {
        public var status: UInt8
        public var responses: [SingleResponse]
        public var nonce: [UInt8]?
        public var producedAt: Date?
        public var certificates: [Certificate]
        let tbsBytes: ArraySlice<UInt8>
        let signatureBytes: ArraySlice<UInt8>
        let signatureAlgorithm: Certificate.SignatureAlgorithm?
        /// The signature algorithm's OID (ML-DSA responses have no ``signatureAlgorithm``).
        public let signatureAlgorithmOID: ASN1ObjectIdentifier?

        /// Whether `signer` signed the response data.
        public func isSigned(by signer: Certificate) -> Bool {
            guard let signatureAlgorithm else { return false }
            return signer.publicKey.isValidSignature(signatureBytes, for: tbsBytes, signatureAlgorithm: signatureAlgorithm)
        }

        /// Whether the ML-DSA `signer` (an issuing CA signing its own responses) signed the response data.
        public func isSigned(by signer: MLDSACertificate) -> Bool {
            guard let variant = signer.subjectKeyVariant, signatureAlgorithmOID == variant.oid else { return false }
            return variant.isValidSignature(Array(signatureBytes), for: Array(tbsBytes), publicKey: signer.subjectPublicKey)
        }

        public init(derEncoded der: [UInt8]) throws {
            do {
                let root = try DER.parse(der)
                var status: UInt8 = 255
                var basicBytes: [UInt8]?
                try DER.sequence(root, identifier: .sequence) { outer in
                    guard let statusNode = outer.next(), statusNode.identifier == .enumerated, case .primitive(let value) = statusNode.content, value.count == 1 else {
                        throw PKIError(.malformedInput, "OCSP response has no status")
                    }
                    status = value.first!
                    if let wrapper = outer.next(), case .constructed(let inner) = wrapper.content, let bytesNode = inner.first(where: { _ in true }) {
                        try DER.sequence(bytesNode, identifier: .sequence) { parts in
                            let oid = try ASN1ObjectIdentifier(derEncoded: &parts)
                            guard oid == OCSP.basicResponseOID else { throw PKIError(.malformedInput, "OCSP response type \(oid) is not basic") }
                            basicBytes = Array(try ASN1OctetString(derEncoded: &parts).bytes)
                        }
                    }
                }
                self.status = status
                guard status == 0, let basicBytes else {
                    self.responses = []
                    self.certificates = []
                    self.tbsBytes = []
                    self.signatureBytes = []
                    self.signatureAlgorithm = nil
                    self.signatureAlgorithmOID = nil
                    return
                }
                let basic = try DER.parse(basicBytes)
                var tbsNode: ASN1Node?
                var algorithm: Certificate.SignatureAlgorithm?
                var algorithmOID: ASN1ObjectIdentifier?
                var signature: ASN1BitString?
                var certificates: [Certificate] = []
                try DER.sequence(basic, identifier: .sequence) { parts in
                    tbsNode = parts.next()
                    guard let algNode = parts.next() else { throw PKIError(.malformedInput, "OCSP basic response is truncated") }
                    (algorithmOID, algorithm) = try SignatureAlgorithmDER.parseAny(algNode)
                    signature = try ASN1BitString(derEncoded: &parts)
                    if let certsWrapper = parts.next(), case .constructed(let inner) = certsWrapper.content, let list = inner.first(where: { _ in true }) {
                        certificates = try DER.sequence(of: Certificate.self, identifier: .sequence, rootNode: list)
                    }
                }
                guard let tbsNode, let signature else { throw PKIError(.malformedInput, "OCSP basic response is truncated") }
                self.tbsBytes = tbsNode.encodedBytes
                self.signatureBytes = signature.bytes
                self.signatureAlgorithm = algorithm
                self.signatureAlgorithmOID = algorithmOID
                self.certificates = certificates
                var responses: [SingleResponse] = []
                var nonce: [UInt8]?
                var producedAt: Date?
                try DER.sequence(tbsNode, identifier: .sequence) { fields in
                    var next = fields.next()
                    if let node = next, node.identifier == ASN1Identifier(tagWithNumber: 0, tagClass: .contextSpecific) { next = fields.next() }
                    _ = next  // responderID
                    guard let produced = fields.next() else { throw PKIError(.malformedInput, "OCSP response has no producedAt") }
                    producedAt = try X509Time.parse(produced)
                    guard let list = fields.next() else { throw PKIError(.malformedInput, "OCSP response has no responses") }
                    try DER.sequence(list, identifier: .sequence) { items in
                        while let item = items.next() {
                            responses.append(try Self.parseSingle(item))
                        }
                    }
                    if let extsWrapper = fields.next(), case .constructed(let inner) = extsWrapper.content, let exts = inner.first(where: { _ in true }) {
                        for ext in try DER.sequence(of: Certificate.Extension.self, identifier: .sequence, rootNode: exts) where ext.oid == OCSP.nonceOID {
                            nonce = (try? ASN1OctetString(derEncoded: Array(ext.value))).map { Array($0.bytes) } ?? Array(ext.value)
                        }
                    }
                }
                self.responses = responses
                self.nonce = nonce
                self.producedAt = producedAt
            } catch let error as PKIError {
                throw error
            } catch {
                throw PKIError(.malformedInput, "OCSP response is not valid DER (\(error))")
            }
        }

        static func parseSingle(_ node: ASN1Node) throws -> SingleResponse {
            try DER.sequence(node, identifier: .sequence) { parts in
                guard let idNode = parts.next(), let statusNode = parts.next(), let thisNode = parts.next() else {
                    throw PKIError(.malformedInput, "OCSP single response is truncated")
                }
                let certID = try CertID.parse(idNode)
                var status: CertStatus = .unknown
                switch statusNode.identifier.tagNumber {
                case 0: status = .good
                case 1:
                    guard case .constructed(let info) = statusNode.content else { throw PKIError(.malformedInput, "bad revokedInfo") }
                    var iterator = info.makeIterator()
                    guard let timeNode = iterator.next() else { throw PKIError(.malformedInput, "revokedInfo has no time") }
                    let time = try X509Time.parse(timeNode)
                    var reason: RevocationReason?
                    if let reasonWrapper = iterator.next(), case .constructed(let r) = reasonWrapper.content,
                        let e = r.first(where: { _ in true }), case .primitive(let v) = e.content, let code = v.first
                    {
                        reason = RevocationReason(code: code)
                    }
                    status = .revoked(time: time, reason: reason)
                default: status = .unknown
                }
                let thisUpdate = try X509Time.parse(thisNode)
                var nextUpdate: Date?
                while let extra = parts.next() {
                    if extra.identifier == ASN1Identifier(tagWithNumber: 0, tagClass: .contextSpecific), case .constructed(let inner) = extra.content,
                        let t = inner.first(where: { _ in true })
                    {
                        nextUpdate = try X509Time.parse(t)
                    }
                }
                return SingleResponse(certID: certID, status: status, thisUpdate: thisUpdate, nextUpdate: nextUpdate)
            }
        }
    }
}
