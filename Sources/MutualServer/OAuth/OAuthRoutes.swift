import Foundation
import HTTPTypes
import Hummingbird
import Logging
import MutualAuthority
import MutualPKI
import MutualStore
import NIOCore
import Synchronization

/// The OAuth 2.0 edge: the token endpoint (RFC 6749 4.4 with RFC 8705 `tls_client_auth`), the key set, RFC 8414
/// metadata and RFC 7662 introspection. The service decides; this translates HTTP, in OAuth's error shape
/// (`{"error", "error_description"}`, plus Mutual's stable `code`).
final class OAuthRoutes: Sendable {
    let authority: Authority
    let settings: OAuthSettings
    let metrics: ServerMetrics
    let logger: Logger
    /// Made once the listener's address is known (the issuer URL contains its port).
    let serviceBox = Mutex<OAuthService?>(nil)

    init(authority: Authority, settings: OAuthSettings, metrics: ServerMetrics, logger: Logger) {
        self.authority = authority
        self.settings = settings
        self.metrics = metrics
        self.logger = logger
    }

    /// The issuer (and base URL of every endpoint): the configured one, else the public URL, else the listener.
    func start(base: String) {
        serviceBox.withLock { $0 = OAuthService(authority: authority, settings: settings, issuer: base) }
    }

    func register(on router: Router<APIContext>) {
        router.post("/oauth2/token") { request, context in await self.token(request, context) }
        router.post("/oauth2/introspect") { request, context in await self.introspect(request, context) }
        router.get("/.well-known/jwks.json") { _, _ in self.jwks() }
        router.get("/.well-known/oauth-authorization-server") { _, _ in self.metadata() }
    }

    func service() throws(OAuthError) -> OAuthService {
        guard let service = serviceBox.withLock({ $0 }) else {
            throw OAuthError("temporarily_unavailable", code: "not-ready", status: 503, "the authorization server is starting")
        }
        return service
    }

    // MARK: Endpoints

    func token(_ request: Request, _ context: APIContext) async -> Response {
        let start = ContinuousClock.now
        defer { metrics.observe(route: "/oauth2/token", since: start) }
        do throws(OAuthError) {
            let service = try service()
            let form = try await Self.form(request, context)
            let certificate = try? await context.peerCertificate()
            let issued = try await service.issue(form: form, certificate: certificate)
            metrics.count("oauth_token", outcome: "ok", reason: "none")
            logger.info("access token issued", metadata: [
                "sub": "\(certificate.map { CertificateIdentity.display($0) } ?? "-")", "aud": "\(form["audience"] ?? form["resource"] ?? "default")",
                "scope": "\(issued.scope ?? "")", "expires_in": "\(issued.expires_in)",
            ])
            return Self.json(issued, headers: [HTTPField.Name("Pragma")!: "no-cache"])
        } catch {
            metrics.count("oauth_token", outcome: error.status >= 500 ? "error" : "refused", reason: error.code)
            logger.notice("access token refused", metadata: ["code": "\(error.code)", "error": "\(error.error)", "reason": "\(error.reason)"])
            return Self.refusal(error)
        }
    }

    func introspect(_ request: Request, _ context: APIContext) async -> Response {
        do throws(OAuthError) {
            let service = try service()
            guard let certificate = try? await context.peerCertificate() else {
                throw OAuthError("invalid_client", code: "oauth-no-certificate", status: 401, "introspection needs a client certificate: the admin certificate or one allowed by --oauth-introspector")
            }
            let record: CertificateRecord
            do { record = try await authority.checkPresented(certificate) } catch let error as AuthorityError {
                throw OAuthError("invalid_client", code: error.code.name, status: 401, error.reason)
            } catch {
                throw OAuthError("server_error", code: "inventory-unavailable", status: 503, "the inventory could not be read")
            }
            guard service.mayIntrospect(record, certificate: certificate) else {
                throw OAuthError("unauthorized_client", code: "oauth-introspection-not-allowed", status: 403, "\(record.identity) may not introspect tokens (admin certificate or --oauth-introspector)")
            }
            let form = try await Self.form(request, context)
            guard let token = form["token"], !token.isEmpty else {
                throw OAuthError("invalid_request", code: "oauth-missing-parameter", "token is required")
            }
            metrics.count("oauth_introspection", outcome: "ok", reason: "none")
            guard let claims = await service.introspect(token) else { return Self.json(["active": false]) }
            return Self.json(Introspection(claims))
        } catch {
            metrics.count("oauth_introspection", outcome: error.status >= 500 ? "error" : "refused", reason: error.code)
            return Self.refusal(error)
        }
    }

    func jwks() -> Response {
        do {
            let keys = try service().keySet()
            // Resource servers may cache the set for a minute; a new key is published well before it signs
            // (`mutual oauth keys rotate --publish-ahead`), so a cached set always holds the keys in use.
            return Self.json(["keys": keys.map(\.object)], headers: [.cacheControl: "public, max-age=60"])
        } catch let error as OAuthError {
            return Self.refusal(error)
        } catch {
            return Self.refusal(OAuthError("server_error", code: "oauth-signing-key-unavailable", status: 503, "\(error)"))
        }
    }

    func metadata() -> Response {
        do throws(OAuthError) {
            let service = try service()
            let base = service.issuer.hasSuffix("/") ? String(service.issuer.dropLast()) : service.issuer
            var scopes: [String] = []
            for rule in settings.rules { for scope in rule.scopes where !scopes.contains(scope) { scopes.append(scope) } }
            let endpoints = ["token_endpoint": base + "/oauth2/token", "introspection_endpoint": base + "/oauth2/introspect"]
            let document = Metadata(
                issuer: service.issuer, token_endpoint: endpoints["token_endpoint"]!, jwks_uri: base + "/.well-known/jwks.json",
                introspection_endpoint: endpoints["introspection_endpoint"]!, scopes_supported: scopes,
                mtls_endpoint_aliases: endpoints
            )
            return Self.json(document, headers: [.cacheControl: "public, max-age=300"])
        } catch {
            return Self.refusal(error)
        }
    }

    // MARK: Shapes

    struct Metadata: Encodable {
        var issuer: String
        var token_endpoint: String
        var jwks_uri: String
        var introspection_endpoint: String
        var scopes_supported: [String]
        /// RFC 8414 lists it as required; this server has no authorization endpoint, so it supports none.
        var response_types_supported: [String] = []
        var grant_types_supported = ["client_credentials"]
        var token_endpoint_auth_methods_supported = ["tls_client_auth"]
        var introspection_endpoint_auth_methods_supported = ["tls_client_auth"]
        var tls_client_certificate_bound_access_tokens = true
        var mtls_endpoint_aliases: [String: String]
    }

    /// RFC 7662 2.2.
    struct Introspection: Encodable {
        var active = true
        var token_type = "Bearer"
        var scope: String?
        var client_id: String?
        var sub: String
        var aud: [String]
        var iss: String
        var exp: Int
        var iat: Int?
        var nbf: Int?
        var jti: String?
        var cnf: AccessTokenClaims.Confirmation?

        init(_ claims: AccessTokenClaims) {
            scope = claims.scope
            client_id = claims.clientID
            sub = claims.sub
            aud = claims.aud
            iss = claims.iss
            exp = Int(claims.exp)
            iat = claims.iat.map { Int($0) }
            nbf = claims.nbf.map { Int($0) }
            jti = claims.jti
            cnf = claims.cnf
        }
    }

    static func json(_ value: some Encodable, status: HTTPResponse.Status = .ok, headers: HTTPFields = [:]) -> Response {
        let encoder = JSONEncoder()
        encoder.outputFormatting = [.sortedKeys, .withoutEscapingSlashes]
        var fields: HTTPFields = [.contentType: "application/json", .cacheControl: "no-store"]
        for field in headers { fields[field.name] = field.value }
        let body = (try? encoder.encode(value)) ?? Data("{}".utf8)
        return Response(status: status, headers: fields, body: .init(byteBuffer: ByteBuffer(bytes: body)))
    }

    static func refusal(_ error: OAuthError) -> Response {
        json(["error": error.error, "error_description": error.reason, "code": error.code], status: .init(code: error.status))
    }

    /// The request's form parameters (RFC 6749 3.2 / appendix B): `application/x-www-form-urlencoded` only, each
    /// parameter at most once. Hand-written because Hummingbird's form decoder maps into a `Decodable` and so cannot
    /// tell a repeated parameter (which OAuth refuses) from a single one.
    static func form(_ request: Request, _ context: APIContext) async throws(OAuthError) -> [String: String] {
        let contentType = (request.headers[.contentType] ?? "").lowercased()
        guard contentType.hasPrefix("application/x-www-form-urlencoded") else {
            throw OAuthError("invalid_request", code: "unsupported-media-type", "send the parameters as application/x-www-form-urlencoded (got \(contentType.isEmpty ? "no content type" : String(contentType.prefix(60))))")
        }
        let buffer: ByteBuffer
        do { buffer = try await request.body.collect(upTo: context.maxUploadSize) } catch {
            throw OAuthError("invalid_request", code: "body-too-large", status: 413, "the request body is over \(context.maxUploadSize) bytes")
        }
        return try parseForm(String(buffer: buffer))
    }

    static func parseForm(_ text: String) throws(OAuthError) -> [String: String] {
        var form: [String: String] = [:]
        for pair in text.split(separator: "&", omittingEmptySubsequences: true) {
            let parts = pair.split(separator: "=", maxSplits: 1, omittingEmptySubsequences: false)
            guard let name = decode(parts[0]), let value = decode(parts.count == 2 ? parts[1] : "") else {
                throw OAuthError("invalid_request", code: "malformed-form", "the form has bad percent-encoding")
            }
            guard !name.isEmpty else { continue }
            guard form[name] == nil else {
                throw OAuthError("invalid_request", code: "oauth-repeated-parameter", "parameter '\(name.prefix(40))' is given more than once (RFC 6749 3.2)")
            }
            form[name] = value
        }
        return form
    }

    static func decode(_ text: Substring) -> String? {
        text.replacingOccurrences(of: "+", with: " ").removingPercentEncoding
    }
}
