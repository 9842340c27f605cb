import Crypto
import Foundation
import X509

/// Base64url without padding (RFC 7515 2), strict: any other byte is an error. Byte-level rather than Foundation's
/// base64 plus character replacement: the proxy decodes three parts of a token on every token check.
public enum Base64URL {
    static let alphabet = Array("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_".utf8)
    static let values: [UInt8] = {
        var table = [UInt8](repeating: 0xFF, count: 256)
        for (index, byte) in alphabet.enumerated() { table[Int(byte)] = UInt8(index) }
        return table
    }()

    public static func encode<D: DataProtocol>(_ data: D) -> String {
        let bytes = Array(data)
        var out = [UInt8]()
        out.reserveCapacity((bytes.count * 4 + 2) / 3)
        var index = 0
        while index + 3 <= bytes.count {
            let chunk = UInt32(bytes[index]) << 16 | UInt32(bytes[index + 1]) << 8 | UInt32(bytes[index + 2])
            for shift in [18, 12, 6, 0] { out.append(alphabet[Int((chunk >> UInt32(shift)) & 0x3F)]) }
            index += 3
        }
        let rest = bytes.count - index
        if rest > 0 {
            let chunk = UInt32(bytes[index]) << 16 | (rest == 2 ? UInt32(bytes[index + 1]) << 8 : 0)
            out.append(alphabet[Int(chunk >> 18 & 0x3F)])
            out.append(alphabet[Int(chunk >> 12 & 0x3F)])
            if rest == 2 { out.append(alphabet[Int(chunk >> 6 & 0x3F)]) }
        }
        return String(decoding: out, as: UTF8.self)
    }

    public static func decode<S: StringProtocol>(_ text: S) -> Data? {
        let count = text.utf8.count
        guard count % 4 != 1 else { return nil }
        var out = [UInt8]()
        out.reserveCapacity(count * 3 / 4)
        var accumulator: UInt32 = 0
        var bits = 0
        for byte in text.utf8 {
            let value = values[Int(byte)]
            guard value != 0xFF else { return nil }
            accumulator = accumulator << 6 | UInt32(value)
            bits += 6
            if bits >= 8 {
                bits -= 8
                out.append(UInt8(truncatingIfNeeded: accumulator >> UInt32(bits)))
            }
        }
        // The unused low bits of the last character must be zero (one encoding per byte string).
        guard accumulator & ((1 << UInt32(bits)) - 1) == 0 else { return nil }
        return Data(out)
    }
}

/// The JWS algorithms Mutual signs access tokens with and accepts (RFC 7518 3.4, RFC 8037). `none` and the HMAC
/// family are never accepted: a verifier that holds only public keys must not let a token choose a shared-secret
/// algorithm (the classic "HS256 signed with the public key" confusion).
public enum JWSAlgorithm: String, Sendable, CaseIterable, Codable {
    case es256 = "ES256"
    case es384 = "ES384"
    case edDSA = "EdDSA"

    /// The algorithm a key of this type signs with.
    public init?(publicKey: Certificate.PublicKey) {
        if P256.Signing.PublicKey(publicKey) != nil {
            self = .es256
        } else if P384.Signing.PublicKey(publicKey) != nil {
            self = .es384
        } else if Curve25519.Signing.PublicKey(publicKey) != nil {
            self = .edDSA
        } else {
            return nil
        }
    }

    var certificateAlgorithm: Certificate.SignatureAlgorithm {
        switch self {
        case .es256: .ecdsaWithSHA256
        case .es384: .ecdsaWithSHA384
        case .edDSA: .ed25519
        }
    }
}

/// A public signing key as a JWK (RFC 7517) with its `kid`: what a JWKS document publishes and a verifier uses.
/// EC P-256 / P-384 and Ed25519 (OKP) only, matching ``JWSAlgorithm``.
///
/// Hand-written on swift-crypto rather than taken from jwt-kit: token signing goes through Mutual's keys, which may
/// live in a PKCS#11 token (jwt-kit's custom-signer entry point is internal), and the proxy verifies on its event
/// loop with a fixed allow-list, where jwt-kit's key collection is an actor with an async `verify`.
public struct JSONWebKey: Sendable, Equatable {
    public enum Key: Sendable, Equatable {
        case p256(P256.Signing.PublicKey)
        case p384(P384.Signing.PublicKey)
        case ed25519(Curve25519.Signing.PublicKey)

        public static func == (a: Key, b: Key) -> Bool {
            switch (a, b) {
            case (.p256(let x), .p256(let y)): x.rawRepresentation == y.rawRepresentation
            case (.p384(let x), .p384(let y)): x.rawRepresentation == y.rawRepresentation
            case (.ed25519(let x), .ed25519(let y)): x.rawRepresentation == y.rawRepresentation
            default: false
            }
        }
    }

    public let kid: String
    public let key: Key

    public var algorithm: JWSAlgorithm {
        switch key {
        case .p256: .es256
        case .p384: .es384
        case .ed25519: .edDSA
        }
    }

    /// The key of a certificate-style public key; `kid` defaults to its RFC 7638 thumbprint.
    public init(publicKey: Certificate.PublicKey, kid: String? = nil) throws {
        let key: Key
        if let parsed = P256.Signing.PublicKey(publicKey) {
            key = .p256(parsed)
        } else if let parsed = P384.Signing.PublicKey(publicKey) {
            key = .p384(parsed)
        } else if let parsed = Curve25519.Signing.PublicKey(publicKey) {
            key = .ed25519(parsed)
        } else {
            throw PKIError(.unsupportedKey, "access tokens are signed with P-256, P-384 or Ed25519 keys")
        }
        self.init(kid: kid ?? JSONWebKey(kid: "", key: key).thumbprint, key: key)
    }

    public init(kid: String, key: Key) {
        self.kid = kid
        self.key = key
    }

    /// Parses one member of a JWKS. Private members, unknown types and curves, a missing `kid`, an `alg` that is not
    /// the key's own and a `use` other than `sig` are refused: a key set is trusted input only as far as it is strict.
    public init(object jwk: [String: Any]) throws {
        guard jwk["d"] == nil, jwk["p"] == nil, jwk["k"] == nil else {
            throw PKIError(.malformedInput, "the JWK carries private key material")
        }
        guard let kid = jwk["kid"] as? String, !kid.isEmpty, kid.utf8.count <= 128 else {
            throw PKIError(.malformedInput, "the JWK has no usable 'kid'")
        }
        func member(_ name: String, bytes: Int) throws -> Data {
            guard let text = jwk[name] as? String, let value = Base64URL.decode(text), value.count == bytes else {
                throw PKIError(.malformedInput, "JWK \(kid.prefix(40)): '\(name)' is missing or not \(bytes) base64url bytes")
            }
            return value
        }
        let key: Key
        switch (jwk["kty"] as? String, jwk["crv"] as? String) {
        case ("EC", "P-256"):
            guard let parsed = try? P256.Signing.PublicKey(rawRepresentation: try member("x", bytes: 32) + member("y", bytes: 32)) else {
                throw PKIError(.malformedInput, "JWK \(kid.prefix(40)): not a point on P-256")
            }
            key = .p256(parsed)
        case ("EC", "P-384"):
            guard let parsed = try? P384.Signing.PublicKey(rawRepresentation: try member("x", bytes: 48) + member("y", bytes: 48)) else {
                throw PKIError(.malformedInput, "JWK \(kid.prefix(40)): not a point on P-384")
            }
            key = .p384(parsed)
        case ("OKP", "Ed25519"):
            guard let parsed = try? Curve25519.Signing.PublicKey(rawRepresentation: try member("x", bytes: 32)) else {
                throw PKIError(.malformedInput, "JWK \(kid.prefix(40)): not an Ed25519 public key")
            }
            key = .ed25519(parsed)
        case (let kty, let crv):
            throw PKIError(.unsupportedKey, "JWK \(kid.prefix(40)): key type \(kty ?? "none")\(crv.map { "/" + $0 } ?? "") is not accepted (EC P-256/P-384 or OKP Ed25519)")
        }
        self.init(kid: kid, key: key)
        if let alg = jwk["alg"], (alg as? String) != algorithm.rawValue {
            throw PKIError(.malformedInput, "JWK \(kid.prefix(40)): 'alg' \(String(describing: alg).prefix(20)) is not \(algorithm.rawValue)")
        }
        if let use = jwk["use"], (use as? String) != "sig" {
            throw PKIError(.malformedInput, "JWK \(kid.prefix(40)): 'use' must be sig")
        }
    }

    /// Parses a JWKS document (`{"keys": [...]}`, at most 64 KiB and 100 keys). Members that are not for signing with
    /// an accepted algorithm are skipped (a set may carry other keys); duplicate `kid`s are an error.
    public static func keySet(json: Data) throws -> [String: JSONWebKey] {
        guard json.count <= 64 * 1024 else { throw PKIError(.inputTooLarge, "the JWKS is over 64 KiB") }
        guard let object = try? JSONSerialization.jsonObject(with: json) as? [String: Any], let keys = object["keys"] as? [Any] else {
            throw PKIError(.malformedInput, "the JWKS is not a JSON object with a 'keys' list")
        }
        guard keys.count <= 100 else { throw PKIError(.inputTooLarge, "the JWKS has more than 100 keys") }
        var set: [String: JSONWebKey] = [:]
        for member in keys {
            guard let jwk = member as? [String: Any] else { throw PKIError(.malformedInput, "a JWKS member is not an object") }
            let key: JSONWebKey
            do { key = try JSONWebKey(object: jwk) } catch let error as PKIError where error.code == .unsupportedKey { continue }
            guard set[key.kid] == nil else { throw PKIError(.malformedInput, "the JWKS names kid \(key.kid.prefix(40)) twice") }
            set[key.kid] = key
        }
        return set
    }

    /// The members that define the key (RFC 7638 3.2).
    var requiredMembers: [String: String] {
        switch key {
        case .p256(let key):
            let raw = key.rawRepresentation
            return ["kty": "EC", "crv": "P-256", "x": Base64URL.encode(raw.prefix(32)), "y": Base64URL.encode(raw.suffix(32))]
        case .p384(let key):
            let raw = key.rawRepresentation
            return ["kty": "EC", "crv": "P-384", "x": Base64URL.encode(raw.prefix(48)), "y": Base64URL.encode(raw.suffix(48))]
        case .ed25519(let key):
            return ["kty": "OKP", "crv": "Ed25519", "x": Base64URL.encode(key.rawRepresentation)]
        }
    }

    /// The required members only, in lexicographic order, no whitespace (RFC 7638 3.2). Every value is a name or
    /// base64url, so none needs escaping.
    public var canonicalJSON: String {
        "{" + requiredMembers.sorted { $0.key < $1.key }.map { "\"\($0.key)\":\"\($0.value)\"" }.joined(separator: ",") + "}"
    }

    /// RFC 7638 thumbprint (SHA-256, base64url): the `kid` Mutual gives its keys.
    public var thumbprint: String { Base64URL.encode(Data(SHA256.hash(data: Data(canonicalJSON.utf8)))) }

    /// The JWK as published: the required members plus `kid`, `alg` and `use`.
    public var object: [String: String] {
        requiredMembers.merging(["kid": kid, "alg": algorithm.rawValue, "use": "sig"]) { $1 }
    }

    /// Whether `signature` (JWS form: raw r‖s for ECDSA) signs `input` under this key.
    public func verify(signature: some DataProtocol, input: some DataProtocol) -> Bool {
        switch key {
        case .p256(let key):
            guard let sig = try? P256.Signing.ECDSASignature(rawRepresentation: signature) else { return false }
            return key.isValidSignature(sig, for: SHA256.hash(data: Data(input)))
        case .p384(let key):
            guard let sig = try? P384.Signing.ECDSASignature(rawRepresentation: signature) else { return false }
            return key.isValidSignature(sig, for: SHA384.hash(data: Data(input)))
        case .ed25519(let key):
            return key.isValidSignature(Data(signature), for: Data(input))
        }
    }
}

/// JWS compact serialization (RFC 7515 3.1): `base64url(header).base64url(payload).base64url(signature)`.
public enum CompactJWS {
    /// The protected header members Mutual reads.
    public struct Header: Codable, Sendable {
        public var alg: String
        public var kid: String?
        public var typ: String?
        /// `crit` names extensions a verifier must understand; Mutual understands none, so a token with it is refused.
        public var crit: [String]?
    }

    public struct Parsed: Sendable {
        public var header: Header
        public var payload: Data
        public var signingInput: Data
        public var signature: Data
    }

    /// Largest token accepted (a Mutual token is about 700 bytes).
    public static let maximumLength = 8 * 1024

    /// Signs `payload` with `key` (a software key or one held in a PKCS#11 token), setting `alg`, `kid` and `typ`.
    public static func sign(payload: Data, key: Certificate.PrivateKey, kid: String, type: String = "at+jwt") throws -> String {
        guard let algorithm = JWSAlgorithm(publicKey: key.publicKey) else {
            throw PKIError(.unsupportedKey, "access tokens are signed with P-256, P-384 or Ed25519 keys")
        }
        let header = "{\"alg\":\"\(algorithm.rawValue)\",\"kid\":\(jsonString(kid)),\"typ\":\(jsonString(type))}"
        let input = Base64URL.encode(Data(header.utf8)) + "." + Base64URL.encode(payload)
        let signature = try key.sign(bytes: Array(input.utf8), signatureAlgorithm: algorithm.certificateAlgorithm)
        let raw: Data
        switch algorithm {
        case .es256: raw = try P256.Signing.ECDSASignature(derRepresentation: signature.rawRepresentation).rawRepresentation
        case .es384: raw = try P384.Signing.ECDSASignature(derRepresentation: signature.rawRepresentation).rawRepresentation
        case .edDSA: raw = Data(signature.rawRepresentation)
        }
        return input + "." + Base64URL.encode(raw)
    }

    static func jsonString(_ text: String) -> String {
        let data = (try? JSONEncoder().encode(text)) ?? Data("\"\"".utf8)
        return String(decoding: data, as: UTF8.self)
    }

    /// Splits and decodes a compact JWS; the signature is not checked here. Refusals carry ``TokenRefusal/Code``s.
    public static func parse(_ token: Substring) throws(TokenRefusal) -> Parsed {
        guard token.utf8.count <= maximumLength else {
            throw TokenRefusal(.malformed, "the token is longer than \(maximumLength) bytes")
        }
        // Split on bytes: Character-wise splitting (grapheme breaking over ~700 bytes) showed in the proxy's profile.
        var dots: [Substring.Index] = []
        let bytes = token.utf8
        var index = bytes.startIndex
        while index < bytes.endIndex {
            if bytes[index] == UInt8(ascii: ".") { dots.append(index) }
            index = bytes.index(after: index)
        }
        guard dots.count == 2 else {
            throw TokenRefusal(.malformed, dots.count == 4 ? "an encrypted token (JWE) is not accepted" : "the token is not a JWS in compact form (three dot-separated parts)")
        }
        let parts = [
            token[token.startIndex..<dots[0]], token[bytes.index(after: dots[0])..<dots[1]], token[bytes.index(after: dots[1])..<token.endIndex],
        ]
        guard let headerBytes = Base64URL.decode(parts[0]), let payload = Base64URL.decode(parts[1]), let signature = Base64URL.decode(parts[2]) else {
            throw TokenRefusal(.malformed, "a part of the token is not base64url")
        }
        guard let header = try? JSONDecoder().decode(Header.self, from: headerBytes) else {
            throw TokenRefusal(.malformed, "the token's header is not a JSON object with a string 'alg'")
        }
        let signingInput = Data(token[token.startIndex..<parts[1].endIndex].utf8)
        return Parsed(header: header, payload: payload, signingInput: signingInput, signature: signature)
    }
}
