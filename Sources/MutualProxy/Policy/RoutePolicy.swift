import Foundation
import MutualPKI

/// Per-route authorization: the first route whose path prefix (and method list, if any) matches decides; no matching
/// route means deny. Routes may allow requests without a client certificate (`optionalClientCertificate`), which then
/// answer 401 for a missing certificate and 403 for a denied identity instead of failing the handshake.
public struct RoutePolicy: Sendable {
    public struct Route: Sendable {
        public var pathPrefix: String
        /// Upper-case methods; empty means any.
        public var methods: Set<String>
        public var allow: [Principal]
        /// An open route (e.g. `/healthz`): anyone may call it, with or without a certificate; `allow` is ignored.
        public var allowWithoutCertificate: Bool
        /// Requests also need a certificate-bound access token (RFC 8705).
        public var token: TokenRule?
        /// `pathPrefix` as request paths are compared: ASCII lower-case (see ``RequestTarget``).
        let matchPrefix: String

        public init(pathPrefix: String, methods: Set<String> = [], allow: [Principal], allowWithoutCertificate: Bool = false, token: TokenRule? = nil) {
            self.pathPrefix = pathPrefix
            self.matchPrefix = RequestTarget.routingForm(ofPrefix: pathPrefix)
            self.methods = Set(methods.map { $0.uppercased() })
            self.allow = allow
            self.allowWithoutCertificate = allowWithoutCertificate
            self.token = token
        }

        /// `path` is a routing key (``RequestTarget/routingKey``): lower-case, without `;parameters`.
        func applies(method: String, path: String) -> Bool {
            guard methods.isEmpty || methods.contains(method.uppercased()) else { return false }
            if matchPrefix == "/" { return true }
            return path == matchPrefix || path.hasPrefix(matchPrefix.hasSuffix("/") ? matchPrefix : matchPrefix + "/")
        }
    }

    /// A decision and its reason, for the access log, metrics and the error body.
    public enum Decision: Sendable, Equatable {
        case allow(route: String, by: String)
        /// 401: the route needs a client certificate and none was presented.
        case unauthenticated(reason: String)
        /// 403: the identity is not allowed (or no route matched: default deny).
        case deny(reason: String)
    }

    public var routes: [Route]

    public init(routes: [Route]) { self.routes = routes }

    /// Decides on a request; `path` is the target's routing key (``RequestTarget/routingKey``), so letter case and
    /// `;parameters` cannot route a request around the rules of a prefix.
    public func decide(method: String, path: String, peer: VerifiedPeer?) -> Decision {
        decideRoute(method: method, path: path, peer: peer).decision
    }

    /// The decision and the route that made it (its token rule applies after an allow).
    func decideRoute(method: String, path: String, peer: VerifiedPeer?) -> (decision: Decision, route: Route?) {
        guard let route = routes.first(where: { $0.applies(method: method, path: path) }) else {
            return (.deny(reason: "no route allows \(method) \(path) (default deny)"), nil)
        }
        return (decide(route: route, peer: peer), route)
    }

    private func decide(route: Route, peer: VerifiedPeer?) -> Decision {
        if route.allowWithoutCertificate {
            return .allow(route: route.pathPrefix, by: "no certificate required")
        }
        guard let peer else {
            return .unauthenticated(reason: "route \(route.pathPrefix) requires a client certificate")
        }
        if let match = route.allow.first(where: { $0.matches(peer) }) {
            return .allow(route: route.pathPrefix, by: match.description)
        }
        return .deny(reason: "\(peer.displayName) is not allowed on route \(route.pathPrefix) (allowed: \(route.allow.map(\.description).joined(separator: ", ")))")
    }

    /// The verified principal of `peer` on an allowed route, for the `x-client-identity` header: the name the route's
    /// first matching rule matched (a SPIFFE ID, `uri:…`, `dns:…`, `cn:…`, `ou:…`); on an open route, or when no rule
    /// names it, the SPIFFE ID, else the first URI or DNS SAN in the same notation.
    public func identity(of peer: VerifiedPeer, route: String) -> String? {
        if let rule = routes.first(where: { $0.pathPrefix == route }), !rule.allowWithoutCertificate {
            for principal in rule.allow {
                if let name = principal.matchedName(peer) { return name }
            }
        }
        return peer.spiffeID ?? peer.uris.first.map { "uri:" + $0 } ?? peer.dnsNames.first.map { "dns:" + $0 }
    }
}

/// A route's access-token requirement, validated: the audience the token must name and the scopes it must carry.
public struct TokenRule: Sendable, Equatable {
    public var audience: String
    public var scopes: [String]
    public var forwardToken: Bool

    public init(audience: String, scopes: [String] = [], forwardToken: Bool = false) {
        self.audience = audience
        self.scopes = scopes
        self.forwardToken = forwardToken
    }

    init(_ requirement: ProxyConfiguration.TokenRequirement, label: String) throws {
        let printable: (String) -> Bool = { !$0.isEmpty && $0.utf8.count <= 512 && $0.unicodeScalars.allSatisfy { $0.value > 0x20 && $0.value < 0x7F && $0 != "\"" && $0 != "\\" } }
        guard printable(requirement.audience) else {
            throw PKIError(.malformedInput, "\(label).audience must be 1 to 512 printable characters without spaces or quotes")
        }
        for scope in requirement.scopes ?? [] where !printable(scope) {
            throw PKIError(.malformedInput, "\(label).scopes: '\(scope.prefix(60))' is not a scope token")
        }
        self.init(audience: requirement.audience, scopes: requirement.scopes ?? [], forwardToken: requirement.forwardToken ?? false)
    }
}
