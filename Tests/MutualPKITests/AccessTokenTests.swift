import Crypto
import Foundation
import MutualPKI
import Testing
import X509

/// JWS compact tokens, JWKs and the access-token checks (RFC 7515, 7517, 7519, 8705), without sockets.
@Suite("Access tokens: JWS, JWK, claims and every refusal (in memory)")
struct AccessTokenTests {
    static let now = Date(timeIntervalSince1970: 1_800_000_000)
    static let issuer = "https://authority.example:9443"
    static let thumbprint = AccessTokenClaims.thumbprint(certificateDER: [1, 2, 3])

    static func claims(
        aud: [String] = ["payments"], scope: String? = "read write", exp: Double? = nil, nbf: Double? = nil, iss: String = issuer,
        bound: String? = thumbprint
    ) -> AccessTokenClaims {
        let time = now.timeIntervalSince1970
        return AccessTokenClaims(
            iss: iss, sub: "spiffe://example.org/ns/a/client", aud: aud, scope: scope, exp: exp ?? time + 300, nbf: nbf ?? time, iat: time,
            jti: "j1", clientID: "spiffe://example.org/ns/a/client", cnf: bound.map { .init(x5tS256: $0) }
        )
    }

    static func sign(_ claims: AccessTokenClaims, key: Certificate.PrivateKey, kid: String) throws -> String {
        try CompactJWS.sign(payload: try JSONEncoder().encode(claims), key: key, kid: kid)
    }

    /// A token with a hand-made header and signature, as an attacker would send it.
    static func forged(header: String, claims: AccessTokenClaims, signature: [UInt8]) throws -> String {
        Base64URL.encode(Data(header.utf8)) + "." + Base64URL.encode(try JSONEncoder().encode(claims)) + "." + Base64URL.encode(signature)
    }

    let key: Certificate.PrivateKey
    let jwk: JSONWebKey
    var keys: [String: JSONWebKey] { [jwk.kid: jwk] }
    let verifier = AccessTokenVerifier(issuer: issuer, audience: "payments", requiredScopes: ["read"])

    init() throws {
        key = try KeyType.p256.generate()
        jwk = try JSONWebKey(publicKey: key.publicKey)
    }

    func code(_ token: String, thumbprint: String? = AccessTokenTests.thumbprint, keys: [String: JSONWebKey]? = nil,
              verifier: AccessTokenVerifier? = nil) -> String {
        switch (verifier ?? self.verifier).verify(Substring(token), keys: keys ?? self.keys, thumbprint: thumbprint, now: Self.now) {
        case .success: return "ok"
        case .failure(let refusal): return refusal.code.name
        }
    }

    @Test("ES256, ES384 and EdDSA tokens verify, with the key's RFC 7638 thumbprint as kid")
    func roundTrip() throws {
        for type in [KeyType.p256, .p384, .ed25519] {
            let key = try type.generate()
            let jwk = try JSONWebKey(publicKey: key.publicKey)
            let token = try Self.sign(Self.claims(), key: key, kid: jwk.kid)
            let header = try JSONSerialization.jsonObject(with: Base64URL.decode(token.split(separator: ".")[0])!) as! [String: String]
            #expect(header["alg"] == jwk.algorithm.rawValue && header["kid"] == jwk.kid && header["typ"] == "at+jwt")
            let result = verifier.verify(Substring(token), keys: [jwk.kid: jwk], thumbprint: Self.thumbprint, now: Self.now)
            #expect((try? result.get()) == Self.claims(), "\(type)")
            // The published form parses back to the same key.
            let parsed = try JSONWebKey(object: jwk.object)
            #expect(parsed == jwk)
        }
        #expect(throws: PKIError.self) { _ = try JSONWebKey(publicKey: try KeyType.rsa2048.generate().publicKey) }
    }

    @Test("each check refuses with its own code: time, issuer, audience, binding, scope")
    func claimRefusals() throws {
        let time = Self.now.timeIntervalSince1970
        #expect(code(try Self.sign(Self.claims(), key: key, kid: jwk.kid)) == "ok")
        #expect(code(try Self.sign(Self.claims(exp: time - 31), key: key, kid: jwk.kid)) == "token_expired")
        #expect(code(try Self.sign(Self.claims(exp: time - 29), key: key, kid: jwk.kid)) == "ok", "30 s of leeway")
        #expect(code(try Self.sign(Self.claims(nbf: time + 60), key: key, kid: jwk.kid)) == "token_not_yet_valid")
        #expect(code(try Self.sign(Self.claims(iss: "https://evil.example"), key: key, kid: jwk.kid)) == "token_issuer")
        #expect(code(try Self.sign(Self.claims(aud: ["other"]), key: key, kid: jwk.kid)) == "token_audience")
        #expect(code(try Self.sign(Self.claims(aud: ["other", "payments"]), key: key, kid: jwk.kid)) == "ok")
        #expect(code(try Self.sign(Self.claims(bound: nil), key: key, kid: jwk.kid)) == "token_unbound")
        #expect(code(try Self.sign(Self.claims(), key: key, kid: jwk.kid), thumbprint: "other") == "token_binding_mismatch")
        #expect(code(try Self.sign(Self.claims(), key: key, kid: jwk.kid), thumbprint: nil) == "token_no_certificate")
        #expect(code(try Self.sign(Self.claims(scope: "write"), key: key, kid: jwk.kid)) == "token_scope")
        #expect(code(try Self.sign(Self.claims(scope: nil), key: key, kid: jwk.kid)) == "token_scope")
        // Introspection skips the binding (no connection) but not the rest.
        let introspecting = AccessTokenVerifier(issuer: Self.issuer, audience: nil, leeway: 0)
        let unbound = try Self.sign(Self.claims(bound: nil), key: key, kid: jwk.kid)
        #expect((try? introspecting.verify(Substring(unbound), keys: keys, thumbprint: nil, requireBinding: false, now: Self.now).get()) != nil)
    }

    @Test("forged tokens: alg none, HS256 keyed with the public key, another key, a swapped kid, crit, a changed claim")
    func forgeries() throws {
        let claims = Self.claims()
        // alg none with an empty signature, and with the real signature kept.
        let none = try Self.forged(header: #"{"alg":"none","kid":"\#(jwk.kid)"}"#, claims: claims, signature: [])
        #expect(code(none) == "token_algorithm")
        #expect(code(Base64URL.encode(Data(#"{"alg":"none"}"#.utf8)) + "." + Base64URL.encode(try JSONEncoder().encode(claims)) + ".") == "token_algorithm")
        for alg in ["None", "NONE", "HS256", "HS384", "HS512", "RS256", "PS256", "ES512", "ES256K", ""] {
            #expect(code(try Self.forged(header: #"{"alg":"\#(alg)","kid":"\#(jwk.kid)"}"#, claims: claims, signature: [1])) == "token_algorithm", "\(alg)")
        }
        // The classic confusion: HS256 with the verifier's public key (as PEM, DER or JWK JSON) for the HMAC secret.
        let header = #"{"alg":"HS256","kid":"\#(jwk.kid)","typ":"at+jwt"}"#
        let input = Base64URL.encode(Data(header.utf8)) + "." + Base64URL.encode(try JSONEncoder().encode(claims))
        for secret in [Data(key.publicKey.subjectPublicKeyInfoDER), Data(PEMCodec.encode(key.publicKey.subjectPublicKeyInfoDER, label: "PUBLIC KEY").utf8), Data(jwk.canonicalJSONForTests.utf8)] {
            let mac = HMAC<SHA256>.authenticationCode(for: Data(input.utf8), using: SymmetricKey(data: secret))
            #expect(code(input + "." + Base64URL.encode(Data(mac))) == "token_algorithm")
        }
        // Signed by another key under our kid; under a kid we do not know; ES384 claimed for a P-256 key.
        let other = try KeyType.p256.generate()
        #expect(code(try Self.sign(claims, key: other, kid: jwk.kid)) == "token_signature")
        #expect(code(try Self.sign(claims, key: other, kid: "unknown")) == "token_unknown_key")
        #expect(code(try Self.forged(header: #"{"alg":"ES256"}"#, claims: claims, signature: [1])) == "token_unknown_key")
        let es384 = try Self.forged(header: #"{"alg":"ES384","kid":"\#(jwk.kid)"}"#, claims: claims, signature: Array(repeating: 1, count: 96))
        #expect(code(es384) == "token_algorithm")
        #expect(code(try Self.forged(header: #"{"alg":"ES256","kid":"\#(jwk.kid)","crit":["exp"]}"#, claims: claims, signature: [1])) == "token_malformed")
        // A valid token with one claim changed (scope widened) no longer verifies.
        let token = try Self.sign(Self.claims(scope: "read"), key: key, kid: jwk.kid)
        let parts = token.split(separator: ".")
        let widened = parts[0] + "." + Base64URL.encode(try JSONEncoder().encode(Self.claims(scope: "read admin"))) + "." + parts[2]
        #expect(code(String(widened)) == "token_signature")
        // The same signature in DER form (as X.509 carries it) is not a JWS signature.
        let raw = Base64URL.decode(parts[2])!
        let der = try P256.Signing.ECDSASignature(rawRepresentation: raw).derRepresentation
        #expect(code(parts[0] + "." + parts[1] + "." + Base64URL.encode(der)) == "token_signature")
    }

    @Test("garbage, truncated, oversized and hostile tokens are refused as malformed, never crash")
    func garbage() throws {
        let token = try Self.sign(Self.claims(), key: key, kid: jwk.kid)
        let cases = [
            "", ".", "..", "...", "a.b", "a.b.c.d", "a.b.c.d.e", "!!!.???.***", "eyJ.eyJ.x", token + ".", token + "=", "Bearer " + token,
            String(repeating: "A", count: 9000), token.replacingOccurrences(of: ".", with: ".."),
            Base64URL.encode(Data("[]".utf8)) + ".e30.AA", Base64URL.encode(Data(#"{"alg":5}"#.utf8)) + ".e30.AA",
            Base64URL.encode(Data("not json".utf8)) + ".e30.AA",
        ]
        for text in cases {
            let result = code(text)
            #expect(result == "token_malformed", "\(text.prefix(40)) → \(result)")
        }
        for length in stride(from: 0, to: token.count, by: 7) {
            #expect(code(String(token.prefix(length))) != "ok")
        }
        // A signed token whose claims are not what we expect (missing sub, aud of the wrong type).
        for payload in [#"{"iss":"x"}"#, #"{"iss":"\#(Self.issuer)","sub":"s","aud":5,"exp":1}"#, "[]", "null"] {
            let key = self.key
            let signed = try CompactJWS.sign(payload: Data(payload.utf8), key: key, kid: jwk.kid)
            #expect(code(signed) == "token_malformed", "\(payload)")
        }
        var generator = SystemRandomNumberGenerator()
        for _ in 0..<300 {
            let bytes = (0..<Int.random(in: 0...200, using: &generator)).map { _ in UInt8.random(in: 0x20...0x7E, using: &generator) }
            #expect(code(String(decoding: bytes, as: UTF8.self)) != "ok")
        }
    }

    @Test("base64url: round trips of every length, the same as Foundation's base64 with the URL alphabet, strict on input")
    func base64url() {
        var generator = SystemRandomNumberGenerator()
        for length in 0..<200 {
            let bytes = (0..<length).map { _ in UInt8.random(in: 0...255, using: &generator) }
            let encoded = Base64URL.encode(bytes)
            let foundation = Data(bytes).base64EncodedString().replacingOccurrences(of: "+", with: "-")
                .replacingOccurrences(of: "/", with: "_").replacingOccurrences(of: "=", with: "")
            #expect(encoded == foundation)
            #expect(Base64URL.decode(encoded) == Data(bytes))
        }
        for bad in ["A", "AB=", "A+B_", "AB/C", "ab cd", "é", "AB\n", "AR"] {
            #expect(Base64URL.decode(bad) == nil, "\(bad)")
        }
        #expect(Base64URL.decode("") == Data())
        #expect(Base64URL.decode("AQ") == Data([1]))
    }

    @Test("the Authorization field: one Bearer token, any scheme case; none, two, or two tokens in one field are told apart")
    func bearer() {
        func parse(_ values: [String]) -> String {
            switch AccessTokenVerifier.bearer(fromAuthorization: values) {
            case nil: return "none"
            case .success(let token): return "token:\(token)"
            case .failure(let refusal): return refusal.code.name
            }
        }
        #expect(parse([]) == "none")
        #expect(parse(["Basic dXNlcjpwYXNz"]) == "none")
        #expect(parse(["Bearer abc.def.ghi"]) == "token:abc.def.ghi")
        #expect(parse(["bearer   abc  "]) == "token:abc")
        #expect(parse(["BEARER abc"]) == "token:abc")
        #expect(parse(["Bearer a", "Bearer b"]) == "token_request_invalid")
        #expect(parse(["Bearer a", "Basic b"]) == "token_request_invalid")
        #expect(parse(["Bearer a b"]) == "token_malformed")
        #expect(parse(["Bearer "]) == "token_malformed")
    }

    @Test("WWW-Authenticate: RFC 6750 challenge, with the error only when a token was sent, and quoting that cannot break out")
    func challenge() {
        #expect(TokenRefusal(.missing, "x").challenge(realm: "mutual") == #"Bearer realm="mutual""#)
        #expect(TokenRefusal(.expired, "it expired").challenge(realm: "mutual")
                == #"Bearer realm="mutual", error="invalid_token", error_description="it expired""#)
        #expect(TokenRefusal(.scope, "no").challenge(realm: "mutual", scope: ["read", "write"]).hasSuffix(#"scope="read write""#))
        #expect(TokenRefusal(.scope, "no").status == 403 && TokenRefusal(.badRequest, "no").status == 400 && TokenRefusal(.signature, "no").status == 401)
        let hostile = TokenRefusal(.audience, "a\"b\\c\r\nX-Injected: 1 ä").challenge(realm: "mutual")
        #expect(!hostile.contains("\r") && !hostile.contains("\n") && !hostile.contains("\\") && hostile.components(separatedBy: "\"").count == 7)
    }

    @Test("JWKS: private members, duplicate kids, an alg that is not the key's, use other than sig, bad points and oversize are refused; other key types skipped")
    func keySets() throws {
        var object: [String: Any] = jwk.object
        let good = try JSONSerialization.data(withJSONObject: ["keys": [object]])
        let loaded = try JSONWebKey.keySet(json: good)
        #expect(loaded[jwk.kid] == jwk)
        func refused(_ keys: [Any]) -> Bool {
            (try? JSONWebKey.keySet(json: try! JSONSerialization.data(withJSONObject: ["keys": keys]))) == nil
        }
        object["d"] = "AAAA"
        #expect(refused([object]))
        #expect(refused([jwk.object, jwk.object]))
        var wrongAlg: [String: Any] = jwk.object
        wrongAlg["alg"] = "HS256"
        #expect(refused([wrongAlg]))
        var encryption: [String: Any] = jwk.object
        encryption["use"] = "enc"
        #expect(refused([encryption]))
        var offCurve: [String: Any] = jwk.object
        offCurve["x"] = Base64URL.encode(Data(repeating: 0, count: 32))
        #expect(refused([offCurve]))
        var noKid: [String: Any] = jwk.object
        noKid["kid"] = nil
        #expect(refused([noKid]))
        #expect(refused(["not an object"]))
        // An RSA key and a symmetric one are not ours to use: skipped, the EC key still loads.
        let mixed = try JSONSerialization.data(withJSONObject: ["keys": [["kty": "RSA", "kid": "r", "n": "AQAB", "e": "AQAB"], jwk.object]])
        let mixedSet = try JSONWebKey.keySet(json: mixed)
        #expect(mixedSet.count == 1)
        #expect((try? JSONWebKey.keySet(json: Data("{}".utf8))) == nil)
        #expect((try? JSONWebKey.keySet(json: Data("garbage".utf8))) == nil)
        #expect((try? JSONWebKey.keySet(json: Data(repeating: 0x20, count: 70_000))) == nil)
    }
}

extension JSONWebKey {
    /// The JWK JSON as an attacker would copy it from the JWKS to use as an HMAC secret.
    var canonicalJSONForTests: String {
        String(decoding: try! JSONSerialization.data(withJSONObject: object, options: [.sortedKeys]), as: UTF8.self)
    }
}
