import Crypto
import Foundation
import MutualPKCS11
import MutualPKI
import MutualStore
import X509

/// A refusal of the token or introspection endpoint in OAuth's own shape (RFC 6749 5.2): `error` is the protocol's
/// code, `code` Mutual's finer stable one (metric label, log field), `reason` for people.
public struct OAuthError: Error, Sendable, Equatable, CustomStringConvertible {
    public var error: String
    public var code: String
    public var status: Int
    public var reason: String

    public init(_ error: String, code: String, status: Int = 400, _ reason: String) {
        self.error = error
        self.code = code
        self.status = status
        self.reason = reason
    }

    public var description: String { "\(reason) [\(code)]" }
}

/// Who may get tokens for what: identity patterns (as for enrollment tokens: `spiffe://td/ns/*`, `*.svc.example.org`,
/// exact names) mapped to an audience and the scopes they may ask for it. No rule, no token.
public struct OAuthRule: Sendable, Equatable, CustomStringConvertible {
    public var identity: ScopePattern
    public var audience: String
    public var scopes: [String]

    public init(identity: ScopePattern, audience: String, scopes: [String]) throws {
        guard !audience.isEmpty, audience.utf8.count <= 512, Self.isPrintable(audience), !audience.contains(" ") else {
            throw OAuthError("invalid_request", code: "oauth-bad-rule", "audience '\(audience.prefix(60))' must be 1 to 512 printable characters without spaces")
        }
        for scope in scopes where !Self.isScopeToken(scope) {
            throw OAuthError("invalid_request", code: "oauth-bad-rule", "scope '\(scope.prefix(60))' is not a scope token (RFC 6749 3.3: printable ASCII without space, '\"' or '\\')")
        }
        self.identity = identity
        self.audience = audience
        self.scopes = scopes
    }

    /// `IDENTITY_PATTERN=AUDIENCE[:SCOPE,…]` (`mutual serve --oauth-allow`). The scopes follow the audience's last
    /// `:`, unless what follows it has a `/` (a URL's path) or is a port number.
    public init(parsing text: String) throws {
        guard let equals = text.firstIndex(of: "=") else {
            throw OAuthError("invalid_request", code: "oauth-bad-rule", "'\(text.prefix(80))': expected IDENTITY_PATTERN=AUDIENCE[:SCOPE,…]")
        }
        let pattern: ScopePattern
        do { pattern = try ScopePattern(String(text[..<equals])) } catch let error as AuthorityError {
            throw OAuthError("invalid_request", code: "oauth-bad-rule", error.reason)
        }
        var audience = String(text[text.index(after: equals)...])
        var scopes: [String] = []
        if let colon = audience.lastIndex(of: ":") {
            let tail = audience[audience.index(after: colon)...]
            let isPort = !tail.isEmpty && tail.allSatisfy(\.isNumber) && audience[..<colon].contains("://")
            if !tail.contains("/") && !isPort {
                scopes = tail.split(separator: ",").map { String($0) }
                audience = String(audience[..<colon])
            }
        }
        try self.init(identity: pattern, audience: audience, scopes: scopes)
    }

    public var description: String { "\(identity)=\(audience)\(scopes.isEmpty ? "" : ":" + scopes.joined(separator: ","))" }

    static func isPrintable(_ text: String) -> Bool { text.unicodeScalars.allSatisfy { $0.value > 0x20 && $0.value < 0x7F } }

    static func isScopeToken(_ text: String) -> Bool {
        !text.isEmpty && text.utf8.count <= 128 && text.unicodeScalars.allSatisfy { $0.value >= 0x21 && $0.value <= 0x7E && $0 != "\"" && $0 != "\\" }
    }
}

/// The token endpoint's settings (`mutual serve --oauth-allow`, or `oauth:` in the configuration file).
public struct OAuthSettings: Sendable, Equatable {
    public var rules: [OAuthRule] = []
    /// Lifetime of issued tokens (default 5 minutes, at most 24 hours).
    public var tokenLifetime: TimeInterval = 300
    /// Patterns of callers besides the admin certificate that may use introspection (resource servers).
    public var introspectors: [ScopePattern] = []
    /// The `iss` of tokens and the metadata; default the authority's public HTTPS URL.
    public var issuer: String?

    public init() {}

    public var enabled: Bool { !rules.isEmpty }
}

/// The OAuth 2.0 authorization server: `client_credentials` with `tls_client_auth` (RFC 8705 2.1), JWT access tokens
/// bound to the client certificate (RFC 8705 3.1), introspection (RFC 7662).
///
/// No `jti` is stored: a token is as durable as the certificate it is bound to, and revoking that certificate is how
/// its tokens are withdrawn (introspection and the proxy both check it). Issuance is counted and logged, not written.
public struct OAuthService: Sendable {
    public let authority: Authority
    public let settings: OAuthSettings
    public let keys: OAuthKeyRing
    public let issuer: String

    public init(authority: Authority, settings: OAuthSettings, issuer: String) {
        self.authority = authority
        self.settings = settings
        self.issuer = settings.issuer ?? issuer
        self.keys = OAuthKeyRing(
            directory: authority.state.path + "/oauth", passphrase: authority.passphrase,
            keyStore: authority.configuration.keyStore.flatMap { try? PKCS11URI($0) }
        )
    }

    /// What the token endpoint answers (RFC 6749 5.1).
    public struct Issued: Sendable, Encodable {
        public var access_token: String
        public var token_type = "Bearer"
        public var expires_in: Int
        public var scope: String?
    }

    /// The names of a certificate that policy patterns are matched against: URI SANs, DNS SANs, the CN.
    static func names(of certificate: AnyCertificate) -> [String] {
        var names: [String] = []
        if let sans = try? certificate.extensions.subjectAlternativeNames {
            for name in sans {
                switch name {
                case .uniformResourceIdentifier(let uri): names.append(uri)
                case .dnsName(let dns): names.append(dns)
                default: continue
                }
            }
        }
        if let cn = certificate.subject.lastCommonNameString { names.append(cn) }
        return names
    }

    /// `grant_type=client_credentials` from the verified client certificate `certificate`. `form` is the request's
    /// parameters (each given at most once). The certificate must be in the inventory, current and unrevoked.
    public func issue(form: [String: String], certificate: AnyCertificate?, now: Date = .now) async throws(OAuthError) -> Issued {
        guard let grant = form["grant_type"] else {
            throw OAuthError("invalid_request", code: "oauth-missing-parameter", "grant_type is required")
        }
        guard grant == "client_credentials" else {
            throw OAuthError("unsupported_grant_type", code: "oauth-unsupported-grant", "grant_type '\(grant.prefix(60))' is not supported; this server issues client_credentials only")
        }
        guard let certificate else {
            throw OAuthError("invalid_client", code: "oauth-no-certificate", status: 401, "the token endpoint authenticates clients by their TLS client certificate (tls_client_auth); none was presented")
        }
        let record: CertificateRecord
        do {
            record = try await authority.checkPresented(certificate, now: now)
        } catch let error as AuthorityError {
            throw OAuthError("invalid_client", code: error.code.name, status: 401, error.reason)
        } catch {
            throw OAuthError("server_error", code: "inventory-unavailable", status: 503, "the inventory could not be read: \(error)")
        }
        let names = Self.names(of: certificate)
        if let clientID = form["client_id"], clientID != record.identity, !names.contains(clientID) {
            throw OAuthError("invalid_client", code: "oauth-client-id-mismatch", status: 401, "client_id '\(clientID.prefix(100))' is not a name of the presented certificate (\(record.identity))")
        }
        let rules = settings.rules.filter { rule in names.contains { rule.identity.matches($0) } }
        guard !rules.isEmpty else {
            throw OAuthError("unauthorized_client", code: "oauth-not-allowed", "no --oauth-allow rule lets \(record.identity) get access tokens")
        }
        let requested = [form["audience"], form["resource"]].compactMap { $0 }
        if requested.count == 2, requested[0] != requested[1] {
            throw OAuthError("invalid_request", code: "oauth-ambiguous-audience", "give the audience once (audience or resource)")
        }
        let audiences = rules.map(\.audience).reduce(into: [String]()) { if !$0.contains($1) { $0.append($1) } }
        let audience: String
        if let asked = requested.first {
            guard audiences.contains(asked) else {
                throw OAuthError("invalid_target", code: "oauth-audience-not-allowed", "\(record.identity) may not get tokens for '\(asked.prefix(200))' (allowed: \(audiences.joined(separator: ", ")))")
            }
            audience = asked
        } else {
            guard audiences.count == 1 else {
                throw OAuthError("invalid_request", code: "oauth-audience-required", "\(record.identity) may get tokens for several audiences; name one with audience= (\(audiences.joined(separator: ", ")))")
            }
            audience = audiences[0]
        }
        let allowedScopes = rules.filter { $0.audience == audience }.flatMap(\.scopes).reduce(into: [String]()) { if !$0.contains($1) { $0.append($1) } }
        var scopes = allowedScopes
        if let scopeText = form["scope"] {
            let asked = scopeText.split(separator: " ").map(String.init)
            guard !asked.isEmpty, asked.allSatisfy(OAuthRule.isScopeToken) else {
                throw OAuthError("invalid_scope", code: "oauth-bad-scope", "scope must be space-separated scope tokens")
            }
            if let denied = asked.first(where: { !allowedScopes.contains($0) }) {
                throw OAuthError("invalid_scope", code: "oauth-scope-not-allowed", "\(record.identity) may not get scope '\(denied.prefix(100))' for \(audience) (allowed: \(allowedScopes.isEmpty ? "none" : allowedScopes.joined(separator: " ")))")
            }
            scopes = asked.reduce(into: [String]()) { if !$0.contains($1) { $0.append($1) } }
        }
        let snapshot: OAuthKeyRing.Snapshot
        do { snapshot = try keys.snapshot(now: now) } catch {
            throw OAuthError("server_error", code: "oauth-signing-key-unavailable", status: 503, "\(error)")
        }
        let lifetime = min(settings.tokenLifetime, record.notAfter.timeIntervalSince(now))
        let issuedAt = now.timeIntervalSince1970.rounded(.down)
        var jti = [UInt8](repeating: 0, count: 16)
        for index in jti.indices { jti[index] = UInt8.random(in: 0...255) }
        let der: [UInt8]
        do { der = try certificate.der } catch { throw OAuthError("invalid_client", code: "oauth-no-certificate", status: 401, "the client certificate cannot be encoded") }
        let claims = AccessTokenClaims(
            iss: issuer, sub: record.identity, aud: [audience], scope: scopes.isEmpty ? nil : scopes.joined(separator: " "),
            exp: issuedAt + lifetime.rounded(.down), nbf: issuedAt, iat: issuedAt, jti: Base64URL.encode(jti), clientID: record.identity,
            cnf: .init(x5tS256: AccessTokenClaims.thumbprint(certificateDER: der))
        )
        do {
            let encoder = JSONEncoder()
            encoder.outputFormatting = [.sortedKeys, .withoutEscapingSlashes]
            let token = try CompactJWS.sign(payload: try encoder.encode(claims), key: snapshot.signer.key, kid: snapshot.signer.kid)
            return Issued(access_token: token, expires_in: Int(lifetime.rounded(.down)), scope: claims.scope)
        } catch {
            throw OAuthError("server_error", code: "oauth-signing-failed", status: 503, "the access token could not be signed: \(error)")
        }
    }

    /// The published key set (RFC 7517 5).
    public func keySet(now: Date = .now) throws -> [JSONWebKey] { try keys.snapshot(now: now).published }

    /// RFC 7662: whether a caller may introspect (the admin certificate, or a name matching an introspector pattern).
    public func mayIntrospect(_ record: CertificateRecord, certificate: AnyCertificate) -> Bool {
        if record.profile == CertificateProfile.admin.rawValue { return true }
        let names = Self.names(of: certificate)
        return settings.introspectors.contains { pattern in names.contains { pattern.matches($0) } }
    }

    /// RFC 7662 2.2: the claims of an active token, or nil (answered `{"active": false}`) for anything else —
    /// not ours, bad signature, expired, or bound to a certificate that is revoked or no longer current.
    public func introspect(_ token: String, now: Date = .now) async -> AccessTokenClaims? {
        guard let published = try? keys.snapshot(now: now).published else { return nil }
        let verifier = AccessTokenVerifier(issuer: issuer, audience: nil, leeway: 0)
        guard case .success(let claims) = verifier.verify(
            Substring(token), keys: Dictionary(published.map { ($0.kid, $0) }, uniquingKeysWith: { a, _ in a }), thumbprint: nil,
            requireBinding: false, now: now
        ), let thumbprint = claims.cnf?.x5tS256 else { return nil }
        // The certificate the token is bound to must still be good: revoking it withdraws its tokens.
        guard let records = try? await authority.store.certificates(CertificateFilter(identity: claims.sub, status: .valid, now: now)),
              records.contains(where: { AccessTokenClaims.thumbprint(certificateDER: $0.der) == thumbprint }) else { return nil }
        return claims
    }
}
