import Crypto
import _CryptoExtras
import Foundation
import MutualPKI
import X509

/// An account key as a JWK (RFC 7517): the key types ACME clients use — EC P-256/P-384 (ES256/ES384), RSA (RS256,
/// certbot's default) and Ed25519 (EdDSA).
///
/// Hand-written on swift-crypto because ACME's JWS is the flattened JSON serialization with the key embedded in the
/// protected header and empty payloads for POST-as-GET, which the JWT libraries (jwt-kit) do not model.
public enum ACMEAccountKey: Sendable, Equatable {
    case p256(P256.Signing.PublicKey)
    case p384(P384.Signing.PublicKey)
    case rsa(n: Data, e: Data)
    case ed25519(Curve25519.Signing.PublicKey)

    public static func == (a: Self, b: Self) -> Bool { a.thumbprint == b.thumbprint }

    /// Parses a JWK object; refuses private members, unknown types and curves, and RSA keys under 2048 bits.
    public init(jwk: [String: Any]) throws {
        guard jwk["d"] == nil, jwk["p"] == nil, jwk["k"] == nil else {
            throw ACMEProblem(.badPublicKey, "the JWK carries private key material; send only the public key")
        }
        func member(_ name: String) throws -> Data {
            guard let text = jwk[name] as? String, let bytes = Base64URL.decode(text), !bytes.isEmpty else {
                throw ACMEProblem(.badPublicKey, "the JWK's '\(name)' is missing or not base64url")
            }
            return bytes
        }
        switch (jwk["kty"] as? String, jwk["crv"] as? String) {
        case ("EC", "P-256"):
            let x = try member("x"), y = try member("y")
            guard x.count == 32, y.count == 32, let key = try? P256.Signing.PublicKey(rawRepresentation: x + y) else {
                throw ACMEProblem(.badPublicKey, "the P-256 JWK is not a point on the curve")
            }
            self = .p256(key)
        case ("EC", "P-384"):
            let x = try member("x"), y = try member("y")
            guard x.count == 48, y.count == 48, let key = try? P384.Signing.PublicKey(rawRepresentation: x + y) else {
                throw ACMEProblem(.badPublicKey, "the P-384 JWK is not a point on the curve")
            }
            self = .p384(key)
        case ("RSA", _):
            var n = try member("n")
            let e = try member("e")
            while n.first == 0 { n.removeFirst() }
            guard n.count * 8 >= 2048, n.count * 8 <= 8192, e.count <= 8 else {
                throw ACMEProblem(.badPublicKey, "RSA account keys must have 2048 to 8192 bits (got \(n.count * 8))")
            }
            guard (try? _RSA.Signing.PublicKey(n: n, e: e)) != nil else {
                throw ACMEProblem(.badPublicKey, "the RSA JWK is not a usable public key")
            }
            self = .rsa(n: n, e: e)
        case ("OKP", "Ed25519"):
            let x = try member("x")
            guard x.count == 32, let key = try? Curve25519.Signing.PublicKey(rawRepresentation: x) else {
                throw ACMEProblem(.badPublicKey, "the Ed25519 JWK is not a 32-byte public key")
            }
            self = .ed25519(key)
        case (let kty, let crv):
            throw ACMEProblem(.badPublicKey, "unsupported account key type \(kty ?? "none")\(crv.map { "/" + $0 } ?? ""): use EC P-256/P-384, RSA or Ed25519")
        }
    }

    /// The JWS `alg` this key signs with.
    public var algorithm: String {
        switch self {
        case .p256: return "ES256"
        case .p384: return "ES384"
        case .rsa: return "RS256"
        case .ed25519: return "EdDSA"
        }
    }

    /// The JWK's required members only (RFC 7638 3.2), in lexicographic order: the canonical form.
    public var canonicalJSON: String {
        switch self {
        case .p256(let key): return JSONWebKey(kid: "", key: .p256(key)).canonicalJSON
        case .p384(let key): return JSONWebKey(kid: "", key: .p384(key)).canonicalJSON
        case .ed25519(let key): return JSONWebKey(kid: "", key: .ed25519(key)).canonicalJSON
        case .rsa(let n, let e):
            return "{\"e\":\"\(Base64URL.encode(e))\",\"kty\":\"RSA\",\"n\":\"\(Base64URL.encode(n))\"}"
        }
    }

    /// RFC 7638 thumbprint: SHA-256 of the canonical JSON, base64url.
    public var thumbprint: String { Base64URL.encode(Data(SHA256.hash(data: Data(canonicalJSON.utf8)))) }

    /// Checks `signature` over `input` with the algorithm `alg`, which must be this key's.
    public func verify(signature: Data, input: Data, alg: String) -> Bool {
        guard alg == algorithm else { return false }
        switch self {
        case .p256(let key):
            guard let sig = try? P256.Signing.ECDSASignature(rawRepresentation: signature) else { return false }
            return key.isValidSignature(sig, for: SHA256.hash(data: input))
        case .p384(let key):
            guard let sig = try? P384.Signing.ECDSASignature(rawRepresentation: signature) else { return false }
            return key.isValidSignature(sig, for: SHA384.hash(data: input))
        case .rsa(let n, let e):
            guard let key = try? _RSA.Signing.PublicKey(n: n, e: e) else { return false }
            return key.isValidSignature(_RSA.Signing.RSASignature(rawRepresentation: signature), for: SHA256.hash(data: input), padding: .insecurePKCS1v1_5)
        case .ed25519(let key):
            return key.isValidSignature(signature, for: input)
        }
    }

    /// The same key as a certificate's public key (for revocation signed with the certificate's key).
    public var certificatePublicKey: Certificate.PublicKey? {
        switch self {
        case .p256(let key): return Certificate.PublicKey(key)
        case .p384(let key): return Certificate.PublicKey(key)
        case .ed25519(let key): return Certificate.PublicKey(key)
        case .rsa(let n, let e): return (try? _RSA.Signing.PublicKey(n: n, e: e)).map { Certificate.PublicKey($0) }
        }
    }
}

/// A verified ACME request body (RFC 8555 6.2): a flattened JWS whose signature has been checked against the key it
/// names. `kid` requests still need the account looked up; `jwk` requests carry their key.
public struct ACMESignedRequest: Sendable {
    public enum Signer: Sendable {
        case jwk(ACMEAccountKey)
        case kid(String)
    }

    public var alg: String
    public var nonce: String
    public var url: String
    public var signer: Signer
    /// Empty for POST-as-GET.
    public var payload: Data
    /// The signed bytes and signature, kept so a `kid` request can be verified once its account key is known.
    let signingInput: Data
    let signature: Data

    public var isPostAsGet: Bool { payload.isEmpty }

    /// The payload as a JSON object (`{}` for POST-as-GET is not allowed where a body is needed).
    public func object() throws -> [String: Any] {
        guard let object = try? JSONSerialization.jsonObject(with: payload) as? [String: Any] else {
            throw ACMEProblem(.malformed, "the JWS payload is not a JSON object")
        }
        return object
    }

    static let allowedAlgorithms: Set<String> = ["ES256", "ES384", "RS256", "EdDSA"]

    /// Parses and checks the JWS's form (one signature, protected header only, allowed `alg`, exactly one of `jwk` and
    /// `kid`, `url` present; `nonce` present unless `requireNonce` is false, as for keyChange's inner JWS). With a `jwk`,
    /// the signature is verified here; with a `kid`, by `verify(with:)` once the account is found.
    public static func parse(_ body: Data, requireNonce: Bool = true) throws -> ACMESignedRequest {
        guard body.count <= 64 * 1024 else { throw ACMEProblem(.malformed, "the request body is over 64 KiB") }
        guard let outer = try? JSONSerialization.jsonObject(with: body) as? [String: Any] else {
            throw ACMEProblem(.malformed, "the request body is not a JWS in flattened JSON serialization")
        }
        guard outer["signatures"] == nil else {
            throw ACMEProblem(.malformed, "a JWS with several signatures is not allowed (RFC 8555 6.2)")
        }
        guard outer["header"] == nil else {
            throw ACMEProblem(.malformed, "the JWS unprotected header must not be used (RFC 8555 6.2)")
        }
        guard let protected64 = outer["protected"] as? String, let payload64 = outer["payload"] as? String,
              let signature64 = outer["signature"] as? String else {
            throw ACMEProblem(.malformed, "the JWS needs 'protected', 'payload' and 'signature'")
        }
        guard let protectedBytes = Base64URL.decode(protected64), let payload = Base64URL.decode(payload64),
              let signature = Base64URL.decode(signature64), !signature.isEmpty else {
            throw ACMEProblem(.malformed, "the JWS's parts are not base64url")
        }
        guard let header = try? JSONSerialization.jsonObject(with: protectedBytes) as? [String: Any] else {
            throw ACMEProblem(.malformed, "the JWS protected header is not a JSON object")
        }
        guard let alg = header["alg"] as? String else { throw ACMEProblem(.malformed, "the JWS protected header has no 'alg'") }
        guard allowedAlgorithms.contains(alg) else {
            throw ACMEProblem(.badSignatureAlgorithm, "JWS algorithm '\(alg.prefix(20))' is not accepted: use ES256, ES384, RS256 or EdDSA")
        }
        guard let url = header["url"] as? String, !url.isEmpty else {
            throw ACMEProblem(.malformed, "the JWS protected header has no 'url'", status: 400)
        }
        let nonce = header["nonce"] as? String ?? ""
        if requireNonce, nonce.isEmpty { throw ACMEProblem(.badNonce, "the JWS protected header has no 'nonce'") }
        let signer: Signer
        switch (header["jwk"], header["kid"]) {
        case (let jwk as [String: Any], nil):
            signer = .jwk(try ACMEAccountKey(jwk: jwk))
        case (nil, let kid as String):
            signer = .kid(kid)
        case (nil, nil):
            throw ACMEProblem(.malformed, "the JWS protected header needs 'jwk' or 'kid'")
        default:
            throw ACMEProblem(.malformed, "the JWS protected header must have exactly one of 'jwk' and 'kid'")
        }
        let request = ACMESignedRequest(
            alg: alg, nonce: nonce, url: url, signer: signer, payload: payload,
            signingInput: Data((protected64 + "." + payload64).utf8), signature: signature
        )
        if case .jwk(let key) = signer { try request.verify(with: key) }
        return request
    }

    /// Verifies the signature with `key` (the account's key for a `kid` request).
    public func verify(with key: ACMEAccountKey) throws {
        guard alg == key.algorithm else {
            throw ACMEProblem(.badSignatureAlgorithm, "the JWS says '\(alg)' but the account key signs with \(key.algorithm)")
        }
        guard key.verify(signature: signature, input: signingInput, alg: alg) else {
            throw ACMEProblem(.malformed, "the JWS signature does not verify", status: 400)
        }
    }
}
