import Crypto
import Foundation

/// Why a bearer token was not accepted. `code` is stable (metric label, access-log `code`, the `error` of the JSON
/// body); `error` is the RFC 6750 3.1 error code for `WWW-Authenticate`; `reason` is for people.
public struct TokenRefusal: Error, Sendable, Equatable, CustomStringConvertible {
    public struct Code: Hashable, Sendable, CustomStringConvertible {
        public let name: String
        private init(_ name: String) { self.name = name }

        /// No `Authorization: Bearer` on a route that needs a token (401 with a bare `WWW-Authenticate: Bearer`).
        public static let missing = Code("token_missing")
        /// Two tokens, or a token where RFC 6750 does not allow one (400 `invalid_request`).
        public static let badRequest = Code("token_request_invalid")
        /// Not a compact JWS, bad base64url, not JSON, too long, `crit` present.
        public static let malformed = Code("token_malformed")
        /// `alg` is not ES256/ES384/EdDSA (`none`, HS256 …) or not the algorithm of the key `kid` names.
        public static let algorithm = Code("token_algorithm")
        /// `kid` names no key of the issuer (after a refresh of the key set).
        public static let unknownKey = Code("token_unknown_key")
        public static let signature = Code("token_signature")
        public static let expired = Code("token_expired")
        public static let notYetValid = Code("token_not_yet_valid")
        public static let issuer = Code("token_issuer")
        public static let audience = Code("token_audience")
        /// The token has no `cnf.x5t#S256`: a plain bearer token, which a route for bound tokens does not take.
        public static let unbound = Code("token_unbound")
        /// `cnf.x5t#S256` is not the thumbprint of the client certificate on this connection.
        public static let bindingMismatch = Code("token_binding_mismatch")
        /// The connection has no client certificate, so a bound token cannot be checked.
        public static let noCertificate = Code("token_no_certificate")
        /// The certificate the token is bound to is revoked.
        public static let certificateRevoked = Code("token_certificate_revoked")
        /// Valid, but without a scope the route requires (403 `insufficient_scope`).
        public static let scope = Code("token_scope")

        public var description: String { name }
    }

    public var code: Code
    public var reason: String

    public init(_ code: Code, _ reason: String) {
        self.code = code
        self.reason = reason
    }

    public var description: String { reason }

    /// The RFC 6750 error code (nil for a missing token, which RFC 6750 3.1 answers without one).
    public var error: String? {
        switch code {
        case .missing: nil
        case .badRequest: "invalid_request"
        case .scope: "insufficient_scope"
        default: "invalid_token"
        }
    }

    public var status: Int {
        switch code {
        case .badRequest: 400
        case .scope: 403
        default: 401
        }
    }

    /// The `WWW-Authenticate` challenge (RFC 6750 3): the realm, the error and its description, and for a scope
    /// refusal the scope needed.
    public func challenge(realm: String, scope: [String] = []) -> String {
        var parts = ["Bearer realm=\"\(Self.quoted(realm))\""]
        if let error {
            parts.append("error=\"\(error)\"")
            parts.append("error_description=\"\(Self.quoted(reason))\"")
        }
        if code == .scope, !scope.isEmpty { parts.append("scope=\"\(Self.quoted(scope.joined(separator: " ")))\"") }
        return parts.joined(separator: ", ")
    }

    /// RFC 6750 restricts these values to printable ASCII without `"` and `\`: anything else becomes `?`.
    static func quoted(_ text: String) -> String {
        String(String.UnicodeScalarView(text.unicodeScalars.prefix(300).map { scalar in
            (scalar.value >= 0x20 && scalar.value < 0x7F && scalar != "\"" && scalar != "\\") ? scalar : "?"
        }))
    }
}

/// The claims of a Mutual access token (RFC 9068 shape, RFC 8705 3.1 binding).
public struct AccessTokenClaims: Codable, Sendable, Equatable {
    public struct Confirmation: Codable, Sendable, Equatable {
        /// base64url(SHA-256(DER of the client certificate)).
        public var x5tS256: String?

        public init(x5tS256: String?) { self.x5tS256 = x5tS256 }

        enum CodingKeys: String, CodingKey { case x5tS256 = "x5t#S256" }
    }

    public var iss: String
    public var sub: String
    public var aud: [String]
    /// Space-separated (RFC 8693 4.2); nil or empty: no scope.
    public var scope: String?
    public var exp: Double
    public var nbf: Double?
    public var iat: Double?
    public var jti: String?
    public var clientID: String?
    public var cnf: Confirmation?

    public init(
        iss: String, sub: String, aud: [String], scope: String?, exp: Double, nbf: Double?, iat: Double?, jti: String?,
        clientID: String?, cnf: Confirmation?
    ) {
        self.iss = iss
        self.sub = sub
        self.aud = aud
        self.scope = scope
        self.exp = exp
        self.nbf = nbf
        self.iat = iat
        self.jti = jti
        self.clientID = clientID
        self.cnf = cnf
    }

    enum CodingKeys: String, CodingKey {
        case iss, sub, aud, scope, exp, nbf, iat, jti, cnf
        case clientID = "client_id"
    }

    public init(from decoder: any Decoder) throws {
        let container = try decoder.container(keyedBy: CodingKeys.self)
        iss = try container.decode(String.self, forKey: .iss)
        sub = try container.decode(String.self, forKey: .sub)
        // `aud` is a string or a list of strings (RFC 7519 4.1.3).
        if let single = try? container.decode(String.self, forKey: .aud) {
            aud = [single]
        } else {
            aud = try container.decode([String].self, forKey: .aud)
        }
        scope = try container.decodeIfPresent(String.self, forKey: .scope)
        exp = try container.decode(Double.self, forKey: .exp)
        nbf = try container.decodeIfPresent(Double.self, forKey: .nbf)
        iat = try container.decodeIfPresent(Double.self, forKey: .iat)
        jti = try container.decodeIfPresent(String.self, forKey: .jti)
        clientID = try container.decodeIfPresent(String.self, forKey: .clientID)
        cnf = try container.decodeIfPresent(Confirmation.self, forKey: .cnf)
    }

    public func encode(to encoder: any Encoder) throws {
        var container = encoder.container(keyedBy: CodingKeys.self)
        try container.encode(iss, forKey: .iss)
        try container.encode(sub, forKey: .sub)
        if aud.count == 1 { try container.encode(aud[0], forKey: .aud) } else { try container.encode(aud, forKey: .aud) }
        try container.encodeIfPresent(scope, forKey: .scope)
        try container.encode(exp, forKey: .exp)
        try container.encodeIfPresent(nbf, forKey: .nbf)
        try container.encodeIfPresent(iat, forKey: .iat)
        try container.encodeIfPresent(jti, forKey: .jti)
        try container.encodeIfPresent(clientID, forKey: .clientID)
        try container.encodeIfPresent(cnf, forKey: .cnf)
    }

    public var scopes: [String] { (scope ?? "").split(separator: " ").map(String.init) }

    /// The RFC 8705 3.1 thumbprint of a certificate: base64url(SHA-256(DER)).
    public static func thumbprint(certificateDER: some DataProtocol) -> String {
        Base64URL.encode(Data(SHA256.hash(data: Data(certificateDER))))
    }
}

/// The checks a resource server (the proxy, or the authority's introspection) makes on a Mutual access token, in a
/// fixed order: form, algorithm, key, signature, claims, time, issuer, audience, binding to this connection's
/// certificate, scopes. Pure: keys, thumbprint and time are given.
public struct AccessTokenVerifier: Sendable {
    /// `iss` must equal this when set.
    public var issuer: String?
    /// `aud` must contain this when set.
    public var audience: String?
    /// Every one of these must be in `scope`.
    public var requiredScopes: [String]
    /// Clock skew allowed on `exp` and `nbf`.
    public var leeway: TimeInterval

    public init(issuer: String?, audience: String?, requiredScopes: [String] = [], leeway: TimeInterval = 30) {
        self.issuer = issuer
        self.audience = audience
        self.requiredScopes = requiredScopes
        self.leeway = leeway
    }

    /// Checks `token` against `keys`. `thumbprint` is the connection's certificate's (nil: none on this connection);
    /// `requireBinding: false` skips the binding check (introspection, where there is no connection to compare).
    public func verify(
        _ token: Substring, keys: [String: JSONWebKey], thumbprint: String?, requireBinding: Bool = true, now: Date
    ) -> Result<AccessTokenClaims, TokenRefusal> {
        verifyNamingKey(token, keys: keys, thumbprint: thumbprint, requireBinding: requireBinding, now: now).map(\.claims)
    }

    /// The same, also saying which key signed the token.
    public func verifyNamingKey(
        _ token: Substring, keys: [String: JSONWebKey], thumbprint: String?, requireBinding: Bool = true, now: Date
    ) -> Result<(claims: AccessTokenClaims, kid: String), TokenRefusal> {
        let parsed: CompactJWS.Parsed
        do { parsed = try CompactJWS.parse(token) } catch { return .failure(error) }
        let alg = parsed.header.alg
        guard let algorithm = JWSAlgorithm(rawValue: alg) else {
            return .failure(TokenRefusal(.algorithm, "algorithm '\(alg.prefix(20))' is not accepted (ES256, ES384 or EdDSA)"))
        }
        if let crit = parsed.header.crit {
            return .failure(TokenRefusal(.malformed, "the token requires extensions this verifier does not know (crit: \(crit.joined(separator: ",").prefix(60)))"))
        }
        guard let kid = parsed.header.kid else { return .failure(TokenRefusal(.unknownKey, "the token's header names no 'kid'")) }
        guard let key = keys[kid] else {
            return .failure(TokenRefusal(.unknownKey, "no key '\(kid.prefix(60))' in the issuer's key set"))
        }
        guard key.algorithm == algorithm else {
            return .failure(TokenRefusal(.algorithm, "key '\(kid.prefix(60))' signs with \(key.algorithm.rawValue), the token says \(alg)"))
        }
        guard key.verify(signature: parsed.signature, input: parsed.signingInput) else {
            return .failure(TokenRefusal(.signature, "the token's signature does not verify with key '\(kid.prefix(60))'"))
        }
        guard let claims = try? JSONDecoder().decode(AccessTokenClaims.self, from: parsed.payload) else {
            return .failure(TokenRefusal(.malformed, "the token's claims are not a JSON object with iss, sub, aud and exp"))
        }
        return check(claims, thumbprint: thumbprint, requireBinding: requireBinding, now: now).map { ($0, kid) }
    }

    /// The checks after the signature: time, issuer, audience, binding, scopes. A resource server that already
    /// verified this token's signature (the proxy, for a token used again on one connection) runs only these.
    public func check(_ claims: AccessTokenClaims, thumbprint: String?, requireBinding: Bool = true, now: Date) -> Result<AccessTokenClaims, TokenRefusal> {
        let time = now.timeIntervalSince1970
        guard claims.exp + leeway > time else {
            return .failure(TokenRefusal(.expired, "the token expired \(Int(time - claims.exp)) s ago"))
        }
        if let nbf = claims.nbf, nbf - leeway > time {
            return .failure(TokenRefusal(.notYetValid, "the token is not valid for another \(Int(nbf - time)) s"))
        }
        if let issuer, claims.iss != issuer {
            return .failure(TokenRefusal(.issuer, "the token was issued by '\(claims.iss.prefix(100))', not '\(issuer)'"))
        }
        if let audience, !claims.aud.contains(audience) {
            return .failure(TokenRefusal(.audience, "the token is for \(claims.aud.joined(separator: ", ").prefix(200)), not '\(audience)'"))
        }
        if requireBinding {
            guard let bound = claims.cnf?.x5tS256 else {
                return .failure(TokenRefusal(.unbound, "the token is not bound to a certificate (no cnf.x5t#S256)"))
            }
            guard let thumbprint else {
                return .failure(TokenRefusal(.noCertificate, "the token is bound to a certificate but this connection presented none"))
            }
            guard ConstantTime.equal(bound, thumbprint) else {
                return .failure(TokenRefusal(.bindingMismatch, "the token is bound to another certificate than the one on this connection"))
            }
        }
        let granted = Set(claims.scopes)
        if let missing = requiredScopes.first(where: { !granted.contains($0) }) {
            return .failure(TokenRefusal(.scope, "the token lacks scope '\(missing)' (it has: \(claims.scope ?? "none"))"))
        }
        return .success(claims)
    }


    /// The token of an `Authorization` header (RFC 6750 2.1): exactly one field, scheme `Bearer` (any case), one
    /// token68. nil when there is no bearer credential at all.
    public static func bearer(fromAuthorization values: [String]) -> Result<Substring, TokenRefusal>? {
        // Byte-level: this runs on every request of a token route (Foundation's Substring search costs ~10 µs).
        let bearers = values.filter(isBearer)
        guard !bearers.isEmpty else { return nil }
        guard bearers.count == 1, values.count == 1 else {
            return .failure(TokenRefusal(.badRequest, "more than one Authorization field"))
        }
        let bytes = bearers[0].utf8
        var start = bytes.index(bytes.startIndex, offsetBy: 7)
        while start < bytes.endIndex, bytes[start] == 0x20 { start = bytes.index(after: start) }
        var end = bytes.endIndex
        while end > start, bytes[bytes.index(before: end)] == 0x20 { end = bytes.index(before: end) }
        guard start < end, !bytes[start..<end].contains(0x20) else {
            return .failure(TokenRefusal(.malformed, "the Authorization field does not carry one bearer token"))
        }
        return .success(bearers[0][start..<end])
    }

    /// `Bearer ` in any letter case (RFC 7235: the scheme is case-insensitive).
    static func isBearer(_ value: String) -> Bool {
        let scheme = Array("bearer ".utf8)
        var index = 0
        for byte in value.utf8 {
            guard index < scheme.count else { return true }
            let lower = (byte >= 0x41 && byte <= 0x5A) ? byte | 0x20 : byte
            guard lower == scheme[index] else { return false }
            index += 1
        }
        return index == scheme.count
    }
}

/// Comparison of secrets and digests whose time does not depend on where they differ (token hashes, CSRF tokens,
/// certificate thumbprints): the one implementation every role uses.
public enum ConstantTime {
    public static func equal(_ a: String, _ b: String) -> Bool {
        let x = Array(a.utf8), y = Array(b.utf8)
        guard x.count == y.count else { return false }
        var difference: UInt8 = 0
        for index in x.indices { difference |= x[index] ^ y[index] }
        return difference == 0
    }
}
