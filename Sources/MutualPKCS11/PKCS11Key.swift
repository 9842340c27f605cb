import CPKCS11
import Crypto
import Foundation
import MutualPKI
import Synchronization
import SwiftASN1
import X509

/// A private key held in a PKCS#11 token: P-256 or P-384 (CKM_ECDSA over a digest computed here) or Ed25519
/// (CKM_EDDSA). It signs through the token; the private key never exists in this process. As a
/// `Certificate.PrivateKey` (``certificatePrivateKey``) it signs certificates, CRLs, OCSP responses and CSRs like a
/// key in a file.
public final class PKCS11Key: Sendable {
    public let token: PKCS11Token
    /// The URI of this key (its token, and `object`/`id`).
    public let uri: PKCS11URI
    public let keyType: KeyType
    public let publicKey: Certificate.PublicKey
    /// The key's CKA_ID, used to look the private object up again after the token came back.
    public let id: [UInt8]
    private let handle: Mutex<(generation: Int, handle: CK_OBJECT_HANDLE)?>

    private init(token: PKCS11Token, uri: PKCS11URI, keyType: KeyType, publicKey: Certificate.PublicKey, id: [UInt8], handle: CK_OBJECT_HANDLE, generation: Int) {
        self.token = token
        self.uri = uri
        self.keyType = keyType
        self.publicKey = publicKey
        self.id = id
        self.handle = Mutex((generation, handle))
    }

    /// Keys this process holds in tokens, by SubjectPublicKeyInfo: lets code that only has a
    /// `Certificate.PrivateKey` (a TLS client identity, a delivery) see that the key lives in a token.
    private static let registry = Mutex<[[UInt8]: PKCS11Key]>([:])

    /// The token key with this public key, when this process found or generated one.
    public static func holding(_ publicKey: Certificate.PublicKey) -> PKCS11Key? {
        let spki = Self.spki(publicKey)
        return registry.withLock { $0[spki] }
    }

    static func spki(_ publicKey: Certificate.PublicKey) -> [UInt8] {
        var serializer = DER.Serializer()
        try? serializer.serialize(publicKey)
        return serializer.serializedBytes
    }

    private static func registered(_ key: PKCS11Key) -> PKCS11Key {
        registry.withLock { $0[spki(key.publicKey)] = key }
        return key
    }

    /// The key in the token the URI names, generated there (as ``generate(_:keyType:)``) when there is none.
    public static func findOrGenerate(_ uri: PKCS11URI, keyType: KeyType) throws -> PKCS11Key {
        do {
            let key = try find(uri)
            guard key.keyType == keyType else {
                throw PKCS11Error(.unsupportedKey, "the token's key \(uri) is \(key.keyType.rawValue), not the \(keyType.rawValue) asked for")
            }
            return key
        } catch let error as PKCS11Error where error.code == .objectNotFound {
            return try generate(uri, keyType: keyType)
        }
    }

    /// The key types a token key may have.
    public static let supportedTypes: [KeyType] = [.p256, .p384, .ed25519]

    // MARK: Finding and generating

    /// The existing private key the URI names (by `object` and/or `id`; exactly one must match).
    public static func find(_ uri: PKCS11URI) throws -> PKCS11Key {
        guard uri.object != nil || uri.id != nil else {
            throw PKCS11Error(.badURI, "the PKCS#11 URI must name the key with object= or id=: \(uri)")
        }
        let token = try PKCS11Token.open(uri)
        let generation = token.generation
        return try token.withSession { session in
            let handle = try Self.findPrivate(session: session, token: token, label: uri.object, id: uri.id)
            let id = try Self.attribute(session: session, token: token, object: handle, type: CKA_ID) ?? []
            let (keyType, publicKey) = try Self.publicKey(session: session, token: token, privateHandle: handle, id: id, label: uri.object)
            var named = uri
            named.id = id.isEmpty ? uri.id : id
            named.type = nil
            return registered(PKCS11Key(token: token, uri: named, keyType: keyType, publicKey: publicKey, id: id, handle: handle, generation: generation))
        }
    }

    /// Generates a key pair inside the token: private key sensitive, never extractable, on the token; labelled with
    /// the URI's `object`, with a random 16-byte CKA_ID unless the URI gives one. Refuses when a key with that label
    /// or id already exists (use ``find(_:)`` to adopt it).
    /// `anotherGeneration`: the label may already be in use (an agent's earlier keys, told apart by their ids).
    public static func generate(_ uri: PKCS11URI, keyType: KeyType, anotherGeneration: Bool = false) throws -> PKCS11Key {
        guard let label = uri.object, !label.isEmpty else {
            throw PKCS11Error(.badURI, "name the new key with object= in the PKCS#11 URI: \(uri)")
        }
        let token = try PKCS11Token.open(uri)
        return try token.withSession { session in
            if !anotherGeneration, !((try? Self.objects(session: session, token: token, template: Self.privateTemplate(label: label, id: nil))) ?? []).isEmpty {
                throw PKCS11Error(.objectExists, "token '\(uri.token ?? "?")' already holds a key labelled '\(label)'")
            }
            let id = uri.id ?? (0..<16).map { _ in UInt8.random(in: 0...255) }
            let mechanismType: UInt
            let parameters: [UInt8]
            switch keyType {
            case .p256:
                mechanismType = CKM_EC_KEY_PAIR_GEN
                parameters = [0x06, 0x08, 0x2A, 0x86, 0x48, 0xCE, 0x3D, 0x03, 0x01, 0x07]
            case .p384:
                mechanismType = CKM_EC_KEY_PAIR_GEN
                parameters = [0x06, 0x05, 0x2B, 0x81, 0x04, 0x00, 0x22]
            case .ed25519:
                mechanismType = CKM_EC_EDWARDS_KEY_PAIR_GEN
                parameters = [0x06, 0x03, 0x2B, 0x65, 0x70]
            default:
                throw PKCS11Error(.unsupportedKey, "keys in a PKCS#11 token may be p256, p384 or ed25519, not \(keyType.rawValue)")
            }
            let keyKind: UInt = keyType == .ed25519 ? CKK_EC_EDWARDS : CKK_EC
            let publicTemplate = AttributeTemplate()
            publicTemplate.add(CKA_CLASS, ulong: CKO_PUBLIC_KEY)
            publicTemplate.add(CKA_KEY_TYPE, ulong: keyKind)
            publicTemplate.add(CKA_TOKEN, bool: true)
            publicTemplate.add(CKA_VERIFY, bool: true)
            publicTemplate.add(CKA_EC_PARAMS, bytes: parameters)
            publicTemplate.add(CKA_LABEL, bytes: Array(label.utf8))
            publicTemplate.add(CKA_ID, bytes: id)
            let privateTemplate = AttributeTemplate()
            privateTemplate.add(CKA_CLASS, ulong: CKO_PRIVATE_KEY)
            privateTemplate.add(CKA_KEY_TYPE, ulong: keyKind)
            privateTemplate.add(CKA_TOKEN, bool: true)
            privateTemplate.add(CKA_PRIVATE, bool: true)
            privateTemplate.add(CKA_SENSITIVE, bool: true)
            privateTemplate.add(CKA_EXTRACTABLE, bool: false)
            privateTemplate.add(CKA_SIGN, bool: true)
            // (CKA_DECRYPT/CKA_UNWRAP false would say "signing only" once more for an EC key, but libtpm2_pkcs11
            // takes any encryption attribute for an RSA template and fails the generation.)
            privateTemplate.add(CKA_LABEL, bytes: Array(label.utf8))
            privateTemplate.add(CKA_ID, bytes: id)
            var mechanism = CK_MECHANISM(mechanism: CK_MECHANISM_TYPE(mechanismType), pParameter: nil, ulParameterLen: 0)
            var publicHandle: CK_OBJECT_HANDLE = 0
            var privateHandle: CK_OBJECT_HANDLE = 0
            let rv = publicTemplate.withPointer { pub, pubCount in
                privateTemplate.withPointer { priv, privCount in
                    token.module.f.C_GenerateKeyPair!(session, &mechanism, pub, pubCount, priv, privCount, &publicHandle, &privateHandle)
                }
            }
            try PKCS11.check(rv, "generating a \(keyType.rawValue) key in token '\(uri.token ?? "?")'")
            let (foundType, publicKey) = try Self.publicKey(session: session, token: token, privateHandle: privateHandle, id: id, label: label)
            guard foundType == keyType else {
                throw PKCS11Error(.unsupportedKey, "the token made a \(foundType.rawValue) key when asked for \(keyType.rawValue)")
            }
            var named = uri
            named.id = id
            named.type = nil
            return registered(PKCS11Key(
                token: token, uri: named, keyType: keyType, publicKey: publicKey, id: id, handle: privateHandle,
                generation: token.generation
            ))
        }
    }

    /// Whether the private key is flagged sensitive and not extractable by the token (what `pkcs11-tool` shows).
    public func protection() throws -> (sensitive: Bool, extractable: Bool) {
        try token.withSession { session in
            let object = try privateHandle(session: session)
            let sensitive = try Self.attribute(session: session, token: token, object: object, type: CKA_SENSITIVE) ?? [0]
            let extractable = try Self.attribute(session: session, token: token, object: object, type: CKA_EXTRACTABLE) ?? [1]
            return (sensitive.first == 1, extractable.first == 1)
        }
    }

    private func privateHandle(session: CK_SESSION_HANDLE) throws -> CK_OBJECT_HANDLE {
        let generation = token.generation
        if let cached = handle.withLock({ $0 }), cached.generation == generation { return cached.handle }
        let found = try Self.findPrivate(session: session, token: token, label: uri.object, id: id.isEmpty ? uri.id : id)
        handle.withLock { $0 = (generation, found) }
        return found
    }

    static func privateTemplate(label: String?, id: [UInt8]?, keyClass: UInt = CKO_PRIVATE_KEY) -> AttributeTemplate {
        let template = AttributeTemplate()
        template.add(CKA_CLASS, ulong: keyClass)
        if let label { template.add(CKA_LABEL, bytes: Array(label.utf8)) }
        if let id { template.add(CKA_ID, bytes: id) }
        return template
    }

    /// Destroys the key pairs labelled `label` in the token whose ids are not in `keeping` (an agent's superseded
    /// keys once their certificates are replaced). Returns how many private keys went.
    @discardableResult
    public static func destroyGenerations(_ uri: PKCS11URI, label: String, keeping: [[UInt8]]) throws -> Int {
        let token = try PKCS11Token.open(uri)
        return try token.withSession { session in
            var destroyed = 0
            for keyClass in [CKO_PRIVATE_KEY, CKO_PUBLIC_KEY] {
                for object in try objects(session: session, token: token, template: privateTemplate(label: label, id: nil, keyClass: keyClass), limit: 64) {
                    let id = try attribute(session: session, token: token, object: object, type: CKA_ID) ?? []
                    guard !keeping.contains(id) else { continue }
                    try PKCS11.check(token.module.f.C_DestroyObject!(session, object), "destroying an old key labelled '\(label)'")
                    if keyClass == CKO_PRIVATE_KEY { destroyed += 1 }
                }
            }
            return destroyed
        }
    }

    static func findPrivate(session: CK_SESSION_HANDLE, token: PKCS11Token, label: String?, id: [UInt8]?) throws -> CK_OBJECT_HANDLE {
        let template = privateTemplate(label: label, id: id)
        let found = try objects(session: session, token: token, template: template)
        let what = [label.map { "object=\($0)" }, id.map { "id=" + PKCS11URI.percentEncoded($0, all: true) }].compactMap { $0 }
            .joined(separator: ";")
        guard let first = found.first else {
            throw PKCS11Error(.objectNotFound, "token '\(token.uri.token ?? "?")' holds no private key \(what)")
        }
        guard found.count == 1 else {
            throw PKCS11Error(.objectAmbiguous, "token '\(token.uri.token ?? "?")' holds \(found.count) private keys \(what): add id= to the URI")
        }
        return first
    }

    static func objects(session: CK_SESSION_HANDLE, token: PKCS11Token, template: AttributeTemplate, limit: Int = 4) throws -> [CK_OBJECT_HANDLE] {
        let f = token.module.f
        try template.withPointer { pointer, count in
            try PKCS11.check(f.C_FindObjectsInit!(session, pointer, count), "searching token '\(token.uri.token ?? "?")'")
        }
        defer { _ = f.C_FindObjectsFinal!(session) }
        var handles = [CK_OBJECT_HANDLE](repeating: 0, count: limit)
        var found: CK_ULONG = 0
        try PKCS11.check(f.C_FindObjects!(session, &handles, CK_ULONG(handles.count), &found), "searching token '\(token.uri.token ?? "?")'")
        return Array(handles.prefix(Int(found)))
    }

    /// One attribute's bytes; nil when the object does not have it.
    static func attribute(session: CK_SESSION_HANDLE, token: PKCS11Token, object: CK_OBJECT_HANDLE, type: UInt) throws -> [UInt8]? {
        let f = token.module.f
        var attribute = CK_ATTRIBUTE(type: CK_ATTRIBUTE_TYPE(type), pValue: nil, ulValueLen: 0)
        let sized = f.C_GetAttributeValue!(session, object, &attribute, 1)
        if sized == CKR_ATTRIBUTE_TYPE_INVALID || sized == CKR_ATTRIBUTE_SENSITIVE { return nil }
        try PKCS11.check(sized, "reading a key attribute in token '\(token.uri.token ?? "?")'")
        guard attribute.ulValueLen != CK_ULONG(bitPattern: -1), attribute.ulValueLen <= 1 << 16 else { return nil }
        var bytes = [UInt8](repeating: 0, count: Int(attribute.ulValueLen))
        let rv = bytes.withUnsafeMutableBytes { buffer -> CK_RV in
            attribute.pValue = buffer.baseAddress
            return f.C_GetAttributeValue!(session, object, &attribute, 1)
        }
        try PKCS11.check(rv, "reading a key attribute in token '\(token.uri.token ?? "?")'")
        return Array(bytes.prefix(Int(attribute.ulValueLen)))
    }

    /// The public half, from the public-key object with the same CKA_ID (or label).
    static func publicKey(
        session: CK_SESSION_HANDLE, token: PKCS11Token, privateHandle: CK_OBJECT_HANDLE, id: [UInt8], label: String?
    ) throws -> (KeyType, Certificate.PublicKey) {
        let template = AttributeTemplate()
        template.add(CKA_CLASS, ulong: CKO_PUBLIC_KEY)
        if !id.isEmpty { template.add(CKA_ID, bytes: id) } else if let label { template.add(CKA_LABEL, bytes: Array(label.utf8)) }
        var source = try objects(session: session, token: token, template: template).first
        if source == nil { source = privateHandle }  // some tokens keep CKA_EC_POINT on the private object
        guard let object = source,
              let parameters = try attribute(session: session, token: token, object: object, type: CKA_EC_PARAMS),
              let point = try attribute(session: session, token: token, object: object, type: CKA_EC_POINT)
        else {
            throw PKCS11Error(.unsupportedKey, "the key in token '\(token.uri.token ?? "?")' has no EC public key object Mutual can read (only P-256, P-384, Ed25519 are supported)")
        }
        return try decodePublicKey(parameters: parameters, point: point)
    }

    static let p256Parameters: [UInt8] = [0x06, 0x08, 0x2A, 0x86, 0x48, 0xCE, 0x3D, 0x03, 0x01, 0x07]
    static let p384Parameters: [UInt8] = [0x06, 0x05, 0x2B, 0x81, 0x04, 0x00, 0x22]
    static let ed25519Parameters: [UInt8] = [0x06, 0x03, 0x2B, 0x65, 0x70]
    /// PrintableString "edwards25519", the form older tokens use for CKA_EC_PARAMS.
    static let ed25519Name: [UInt8] = [0x13, 0x0C] + Array("edwards25519".utf8)

    /// CKA_EC_PARAMS + CKA_EC_POINT (a DER OCTET STRING around the point, or the bare point) to a public key.
    static func decodePublicKey(parameters: [UInt8], point: [UInt8]) throws -> (KeyType, Certificate.PublicKey) {
        func unwrap(_ bytes: [UInt8], size: Int) -> [UInt8]? {
            if bytes.count == size { return bytes }
            if bytes.count == size + 2, bytes[0] == 0x04, Int(bytes[1]) == size { return Array(bytes[2...]) }
            if bytes.count == size + 3, bytes[0] == 0x04, bytes[1] == 0x81, Int(bytes[2]) == size { return Array(bytes[3...]) }
            return nil
        }
        do {
            switch parameters {
            case p256Parameters:
                guard let raw = unwrap(point, size: 65) else { break }
                return (.p256, Certificate.PublicKey(try P256.Signing.PublicKey(x963Representation: raw)))
            case p384Parameters:
                guard let raw = unwrap(point, size: 97) else { break }
                return (.p384, Certificate.PublicKey(try P384.Signing.PublicKey(x963Representation: raw)))
            case ed25519Parameters, ed25519Name:
                guard let raw = unwrap(point, size: 32) else { break }
                return (.ed25519, Certificate.PublicKey(try Curve25519.Signing.PublicKey(rawRepresentation: raw)))
            default:
                throw PKCS11Error(.unsupportedKey, "the token's key is on a curve Mutual does not support (only P-256, P-384, Ed25519)")
            }
        } catch let error as PKCS11Error {
            throw error
        } catch {
            throw PKCS11Error(.unsupportedKey, "the token's public key point is invalid: \(error)")
        }
        throw PKCS11Error(.unsupportedKey, "the token's public key point has an unexpected length (\(point.count) bytes)")
    }

    // MARK: Signing

    /// Signs `message`: ECDSA over its SHA-256 (P-256) or SHA-384 (P-384) digest, or Ed25519 over the message.
    /// Returns the signature as X.509 and TLS carry it: DER ECDSA-Sig-Value, or the 64 Ed25519 bytes.
    public func sign(message: some DataProtocol, hash: HashChoice? = nil) throws -> [UInt8] {
        switch keyType {
        case .p256, .p384:
            let digest: [UInt8]
            switch hash ?? (keyType == .p256 ? .sha256 : .sha384) {
            case .sha256: digest = Array(SHA256.hash(data: message))
            case .sha384: digest = Array(SHA384.hash(data: message))
            case .sha512: digest = Array(SHA512.hash(data: message))
            }
            let raw = try rawSign(mechanism: CKM_ECDSA, input: digest, size: keyType == .p256 ? 64 : 96)
            return keyType == .p256
                ? Array(try P256.Signing.ECDSASignature(rawRepresentation: raw).derRepresentation)
                : Array(try P384.Signing.ECDSASignature(rawRepresentation: raw).derRepresentation)
        case .ed25519:
            return try rawSign(mechanism: CKM_EDDSA, input: Array(message), size: 64)
        default:
            throw PKCS11Error(.unsupportedKey, "cannot sign with a \(keyType.rawValue) token key")
        }
    }

    public enum HashChoice: Sendable { case sha256, sha384, sha512 }

    private func rawSign(mechanism type: UInt, input: [UInt8], size: Int) throws -> [UInt8] {
        try token.withSession { session in
            let object = try privateHandle(session: session)
            let f = token.module.f
            var mechanism = CK_MECHANISM(mechanism: CK_MECHANISM_TYPE(type), pParameter: nil, ulParameterLen: 0)
            try PKCS11.check(f.C_SignInit!(session, &mechanism, object), "starting a signature with \(uri)")
            var output = [UInt8](repeating: 0, count: size + 16)
            var length = CK_ULONG(output.count)
            var data = input
            let rv = f.C_Sign!(session, &data, CK_ULONG(data.count), &output, &length)
            try PKCS11.check(rv, "signing with \(uri)")
            guard Int(length) == size else {
                throw PKCS11Error(.failed, "the token returned a \(length)-byte signature where \(size) bytes were expected")
            }
            return Array(output.prefix(Int(length)))
        }
    }

    /// Signs a fixed message and checks the signature with the public key: what `/readyz` asks of a token key.
    public func probe() throws {
        let message = Array("mutual readiness probe".utf8)
        let signature = try sign(message: message)
        let valid: Bool
        switch keyType {
        case .p256:
            valid = (try? P256.Signing.PublicKey(publicKey)?.isValidSignature(.init(derRepresentation: signature), for: message)) == true
        case .p384:
            valid = (try? P384.Signing.PublicKey(publicKey)?.isValidSignature(.init(derRepresentation: signature), for: message)) == true
        default:
            valid = Curve25519.Signing.PublicKey(publicKey)?.isValidSignature(signature, for: message) == true
        }
        guard valid else { throw PKCS11Error(.failed, "the token key \(uri) made a signature its public key does not verify") }
    }

    /// This key as swift-certificates' private key type: certificates, CRLs, CSRs and OCSP responses sign through
    /// the token.
    public var certificatePrivateKey: Certificate.PrivateKey { Certificate.PrivateKey(TokenPrivateKey(key: self)) }
}

/// The swift-certificates face of a token key.
struct TokenPrivateKey: CustomPrivateKey {
    let key: PKCS11Key

    static func == (lhs: TokenPrivateKey, rhs: TokenPrivateKey) -> Bool { lhs.key === rhs.key }
    func hash(into hasher: inout Hasher) { hasher.combine(ObjectIdentifier(key)) }

    var publicKey: Certificate.PublicKey { key.publicKey }

    var defaultSignatureAlgorithm: Certificate.SignatureAlgorithm {
        switch key.keyType {
        case .p384: .ecdsaWithSHA384
        case .ed25519: .ed25519
        default: .ecdsaWithSHA256
        }
    }

    var supportedSignatureAlgorithms: [Certificate.SignatureAlgorithm] {
        switch key.keyType {
        case .ed25519: [.ed25519]
        default: [.ecdsaWithSHA256, .ecdsaWithSHA384, .ecdsaWithSHA512]
        }
    }

    func signSynchronously(bytes: some DataProtocol, signatureAlgorithm: Certificate.SignatureAlgorithm) throws -> Certificate.Signature {
        let hash: PKCS11Key.HashChoice?
        switch signatureAlgorithm {
        case .ecdsaWithSHA256: hash = .sha256
        case .ecdsaWithSHA384: hash = .sha384
        case .ecdsaWithSHA512: hash = .sha512
        case .ed25519: hash = nil
        default: throw PKCS11Error(.unsupportedKey, "a \(key.keyType.rawValue) token key cannot sign with \(signatureAlgorithm)")
        }
        guard (hash == nil) == (key.keyType == .ed25519) else {
            throw PKCS11Error(.unsupportedKey, "a \(key.keyType.rawValue) token key cannot sign with \(signatureAlgorithm)")
        }
        let signature = try key.sign(message: bytes, hash: hash)
        return try Certificate.Signature(signatureAlgorithm: signatureAlgorithm, signatureBytes: ASN1BitString(bytes: signature[...]))
    }

    // A token key cannot be written out: PEM/DER serialization refuses.
    static var defaultPEMDiscriminator: String { "PRIVATE KEY" }

    func serialize(into coder: inout DER.Serializer) throws {
        throw PKCS11Error(.unsupportedKey, "the key \(key.uri) lives in a PKCS#11 token and cannot be exported")
    }
}
