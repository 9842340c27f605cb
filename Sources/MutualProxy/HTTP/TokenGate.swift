import Foundation
import MutualPKI
import NIOHTTP1

/// The bound-token check of a route (RFC 6750 + RFC 8705 3): the one `Authorization: Bearer` token must verify under
/// the issuer's keys, be for the route's audience with its scopes, and be bound to the certificate of this
/// connection. Pure (keys, peer and time are given); the handler keeps one verified token per connection so a client
/// that sends the same token on every request pays for the signature once.
struct TokenGate {
    /// The last token whose signature verified on this connection, with its claims and key.
    struct Verified {
        let token: String
        let kid: String
        let claims: AccessTokenClaims
        /// The claims as signed (the token's middle segment, base64url JSON), forwarded as `x-token-claims`.
        let payload: Substring
    }

    /// The headers the upstream gets for a verified token (clients' copies are always removed).
    static let claimsHeader = "x-token-claims"
    static let subjectHeader = "x-token-subject"
    static let scopeHeader = "x-token-scope"
    static let ownedHeaders: Set<String> = [claimsHeader, subjectHeader, scopeHeader]

    static func check(
        authorization: [String], rule: TokenRule, peer: VerifiedPeer?, keys: AccessTokenKeys.Keys, leeway: Double, now: Date,
        cache: inout Verified?, shared: AccessTokenKeys? = nil
    ) -> Result<Verified, TokenRefusal> {
        guard let bearer = AccessTokenVerifier.bearer(fromAuthorization: authorization) else {
            return .failure(TokenRefusal(.missing, "this route needs an access token bound to your certificate (Authorization: Bearer …; get one from the authority's /oauth2/token)"))
        }
        let token: Substring
        switch bearer {
        case .failure(let refusal): return .failure(refusal)
        case .success(let value): token = value
        }
        guard let issuer = keys.issuer else {
            return .failure(TokenRefusal(.unknownKey, "the issuer's keys are not loaded yet (the authority's key set could not be fetched)"))
        }
        let verifier = AccessTokenVerifier(issuer: issuer, audience: rule.audience, requiredScopes: rule.scopes, leeway: leeway)
        let thumbprint = peer?.x5tS256
        if let cached = cache, cached.token == token, keys.keys[cached.kid] != nil {
            return verifier.check(cached.claims, thumbprint: thumbprint, now: now).map { _ in cached }
        }
        if let known = shared?.verifiedToken(token), keys.keys[known.kid] != nil {
            cache = known
            return verifier.check(known.claims, thumbprint: thumbprint, now: now).map { _ in known }
        }
        switch verifier.verifyNamingKey(token, keys: keys.keys, thumbprint: thumbprint, now: now) {
        case .failure(let refusal):
            return .failure(refusal)
        case .success(let (claims, kid)):
            guard headerSafe(claims.sub), headerSafe(claims.scope ?? "") else {
                return .failure(TokenRefusal(.malformed, "the token's subject or scope contains characters that cannot be forwarded in a header"))
            }
            // The middle part (verification found exactly two dots).
            let bytes = token.utf8
            let first = bytes.firstIndex(of: UInt8(ascii: "."))!
            let last = bytes.lastIndex(of: UInt8(ascii: "."))!
            let verified = Verified(token: String(token), kid: kid, claims: claims, payload: token[bytes.index(after: first)..<last])
            cache = verified
            shared?.remember(verified)
            return .success(verified)
        }
    }

    static func headerSafe(_ text: String) -> Bool {
        text.utf8.count <= 4096 && !text.unicodeScalars.contains { $0.value < 0x20 || $0.value == 0x7F }
    }

    /// The headers added upstream for a verified token.
    static func headers(for verified: Verified) -> [(String, String)] {
        var headers = [(claimsHeader, String(verified.payload)), (subjectHeader, verified.claims.sub)]
        if let scope = verified.claims.scope { headers.append((scopeHeader, scope)) }
        return headers
    }
}
