import Foundation
import Logging
import MutualPKI
@testable import MutualProxy
import NIOCore
import NIOEmbedded
import NIOHTTP1
import Synchronization
import Testing
import TestSupport
import X509

/// Routes that require certificate-bound access tokens (RFC 8705 in the proxy), without sockets: the gate, the key
/// set and its refresh, the HTTP front's refusals, and the configuration.
@Suite("Token routes: bound-token checks in the proxy (in memory)")
struct TokenRouteTests {
    static let issuer = "https://authority.test:9443"

    /// An issuer in memory: its signing key, and the metadata and JWKS the proxy fetches, counted.
    final class FakeIssuer: Sendable {
        let keys = Mutex<[(kid: String, key: Certificate.PrivateKey)]>([])
        let fetches = Mutex(0)
        let failing = Mutex(false)

        func addKey() throws -> (kid: String, key: Certificate.PrivateKey) {
            let key = try KeyType.p256.generate()
            let entry = (kid: try JSONWebKey(publicKey: key.publicKey).kid, key: key)
            keys.withLock { $0.append(entry) }
            return entry
        }

        func fetch(_ url: String) throws -> Data {
            if failing.withLock({ $0 }) { throw ProxyError("authority down") }
            if url.hasSuffix("/.well-known/oauth-authorization-server") {
                return try JSONSerialization.data(withJSONObject: ["issuer": TokenRouteTests.issuer, "jwks_uri": TokenRouteTests.issuer + "/.well-known/jwks.json"])
            }
            fetches.withLock { $0 += 1 }
            let published = try keys.withLock { try $0.map { try JSONWebKey(publicKey: $0.key.publicKey, kid: $0.kid).object } }
            return try JSONSerialization.data(withJSONObject: ["keys": published])
        }

        func token(for peer: VerifiedPeer?, key: (kid: String, key: Certificate.PrivateKey), audience: String = "payments", scope: String = "read",
                   exp: Double = TestPKI.now.timeIntervalSince1970 + 300) throws -> String {
            let claims = AccessTokenClaims(
                iss: TokenRouteTests.issuer, sub: "spiffe://example.org/ns/web/sa/app", aud: [audience], scope: scope, exp: exp,
                nbf: TestPKI.now.timeIntervalSince1970 - 1, iat: TestPKI.now.timeIntervalSince1970, jti: "j", clientID: nil,
                cnf: .init(x5tS256: peer?.x5tS256 ?? "none")
            )
            return try CompactJWS.sign(payload: try JSONEncoder().encode(claims), key: key.key, kid: key.kid)
        }
    }

    /// A monotonic clock the test moves by hand.
    final class Uptime: Sendable {
        let seconds = Mutex(100.0)
        func advance(_ by: Double) { seconds.withLock { $0 += by } }
    }

    static func keySet(_ issuer: FakeIssuer, uptime: Uptime? = nil) -> AccessTokenKeys {
        var clock: @Sendable () -> Double = AccessTokenKeys.monotonicSeconds
        if let uptime { clock = { uptime.seconds.withLock { value in value } } }
        return AccessTokenKeys(
            authority: TokenRouteTests.issuer, refreshInterval: 60, leeway: 30, logger: Logger(label: "t", factory: { _ in SwiftLogNoOpLogHandler() }),
            uptime: clock
        ) { url in
            try issuer.fetch(url)
        }
    }

    static let rule = TokenRule(audience: "payments", scopes: ["read"])

    func gate(_ token: String?, peer: VerifiedPeer?, keys: AccessTokenKeys, cache: inout TokenGate.Verified?) -> String {
        switch TokenGate.check(
            authorization: token.map { ["Bearer \($0)"] } ?? [], rule: Self.rule, peer: peer, keys: keys.keys, leeway: 30, now: TestPKI.now, cache: &cache
        ) {
        case .success: return "ok"
        case .failure(let refusal): return refusal.code.name
        }
    }

    @Test("the gate: own certificate passes; another certificate of the same CA, none, no token, another audience or scope are refused by code")
    func gateDecisions() async throws {
        let issuer = FakeIssuer()
        let signer = try issuer.addKey()
        let keys = Self.keySet(issuer)
        #expect(await keys.load())
        let peer = try GatewayHardeningTests.peer(uris: ["spiffe://example.org/ns/web/sa/app"])
        let other = try GatewayHardeningTests.peer(uris: ["spiffe://example.org/ns/web/sa/app"])
        let token = try issuer.token(for: peer, key: signer)
        var cache: TokenGate.Verified?
        #expect(gate(token, peer: peer, keys: keys, cache: &cache) == "ok")
        var otherCache: TokenGate.Verified?
        #expect(gate(token, peer: other, keys: keys, cache: &otherCache) == "token_binding_mismatch", "same identity, same CA, other certificate")
        #expect(gate(token, peer: nil, keys: keys, cache: &otherCache) == "token_no_certificate")
        #expect(gate(nil, peer: peer, keys: keys, cache: &otherCache) == "token_missing")
        #expect(gate(try issuer.token(for: peer, key: signer, audience: "billing"), peer: peer, keys: keys, cache: &otherCache) == "token_audience")
        #expect(gate(try issuer.token(for: peer, key: signer, scope: "write"), peer: peer, keys: keys, cache: &otherCache) == "token_scope")
        let expired = try issuer.token(for: peer, key: signer, exp: TestPKI.now.timeIntervalSince1970 - 60)
        #expect(gate(expired, peer: peer, keys: keys, cache: &otherCache) == "token_expired")
    }

    @Test("a token verified once on a connection is not verified again, but time, binding and a withdrawn key still apply")
    func connectionCache() async throws {
        let issuer = FakeIssuer()
        let signer = try issuer.addKey()
        let keys = Self.keySet(issuer)
        #expect(await keys.load())
        let peer = try GatewayHardeningTests.peer(uris: ["spiffe://example.org/ns/web/sa/app"])
        let token = try issuer.token(for: peer, key: signer)
        var cache: TokenGate.Verified?
        #expect(gate(token, peer: peer, keys: keys, cache: &cache) == "ok")
        #expect(cache?.kid == signer.kid && cache?.token == token)
        #expect(gate(token, peer: peer, keys: keys, cache: &cache) == "ok")
        // The cache cannot be used to pass a token on another connection's certificate.
        let other = try GatewayHardeningTests.peer(uris: ["spiffe://example.org/ns/web/sa/app"])
        #expect(gate(token, peer: other, keys: keys, cache: &cache) == "token_binding_mismatch")
        // An emergency rotation withdraws the key: the cached token is checked again, and refused.
        issuer.keys.withLock { $0.removeAll() }
        _ = try issuer.addKey()
        #expect(await keys.load())
        #expect(gate(token, peer: peer, keys: keys, cache: &cache) == "token_unknown_key")
    }

    @Test("the signature cache shared by connections and streams never stands in for the binding, the time or a withdrawn key")
    func sharedCache() async throws {
        let issuer = FakeIssuer()
        let signer = try issuer.addKey()
        let keys = Self.keySet(issuer)
        #expect(await keys.load())
        let peer = try GatewayHardeningTests.peer(uris: ["spiffe://example.org/ns/web/sa/app"])
        let token = try issuer.token(for: peer, key: signer)
        func check(_ peer: VerifiedPeer?, at now: Date = TestPKI.now) -> String {
            var fresh: TokenGate.Verified?  // a new connection or HTTP/2 stream
            switch TokenGate.check(authorization: ["Bearer \(token)"], rule: Self.rule, peer: peer, keys: keys.keys, leeway: 30, now: now, cache: &fresh, shared: keys) {
            case .success: return "ok"
            case .failure(let refusal): return refusal.code.name
            }
        }
        #expect(keys.verifiedToken(Substring(token)) == nil)
        #expect(check(peer) == "ok")
        #expect(keys.verifiedToken(Substring(token))?.kid == signer.kid, "remembered after one verification")
        #expect(check(peer) == "ok")
        let thief = try GatewayHardeningTests.peer(uris: ["spiffe://example.org/ns/web/sa/app"])
        #expect(check(thief) == "token_binding_mismatch")
        #expect(check(peer, at: TestPKI.now.addingTimeInterval(3600)) == "token_expired")
        issuer.keys.withLock { $0.removeAll() }
        _ = try issuer.addKey()
        #expect(await keys.load())
        #expect(check(peer) == "token_unknown_key")
    }

    @Test("the key set: nothing before the first fetch (fail closed), the last good set kept when the authority fails, an unknown kid refreshes at most once a second")
    func keySetRefresh() async throws {
        let issuer = FakeIssuer()
        let first = try issuer.addKey()
        let uptime = Uptime()
        let keys = Self.keySet(issuer, uptime: uptime)
        let peer = try GatewayHardeningTests.peer(uris: ["spiffe://example.org/ns/web/sa/app"])
        var cache: TokenGate.Verified?
        #expect(gate(try issuer.token(for: peer, key: first), peer: peer, keys: keys, cache: &cache) == "token_unknown_key", "no keys yet")
        #expect(await keys.load())
        #expect(keys.keys.issuer == Self.issuer)
        issuer.failing.withLock { $0 = true }
        #expect(await keys.load() == false)
        #expect(keys.keys.keys[first.kid] != nil, "kept")
        issuer.failing.withLock { $0 = false }
        // A key published after the last fetch: an unknown-kid refresh picks it up.
        let second = try issuer.addKey()
        #expect(gate(try issuer.token(for: peer, key: second), peer: peer, keys: keys, cache: &cache) == "token_unknown_key")
        let before = issuer.fetches.withLock { $0 }
        await withCheckedContinuation { done in keys.refreshForUnknownKey { done.resume() } }
        #expect(issuer.fetches.withLock { $0 } == before + 1)
        #expect(gate(try issuer.token(for: peer, key: second), peer: peer, keys: keys, cache: &cache) == "ok")
        // A flood of unknown kids (forged tokens) cannot make the proxy hammer the authority.
        for _ in 0..<20 {
            uptime.advance(0.04)
            await withCheckedContinuation { done in keys.refreshForUnknownKey { done.resume() } }
        }
        #expect(issuer.fetches.withLock { $0 } == before + 1)
        // A second later the next unknown kid may ask again.
        uptime.advance(0.5)
        await withCheckedContinuation { done in keys.refreshForUnknownKey { done.resume() } }
        #expect(issuer.fetches.withLock { $0 } == before + 2)
        // A set that turns to garbage is not installed.
        let garbage = AccessTokenKeys(authority: Self.issuer, logger: Logger(label: "t", factory: { _ in SwiftLogNoOpLogHandler() })) { url in
            url.hasSuffix("jwks.json") ? Data("{\"keys\":[{\"kty\":\"EC\"}]}".utf8) : try issuer.fetch(url)
        }
        #expect(await garbage.load() == false)
        #expect(garbage.keys.keys.isEmpty)
    }

    // MARK: The HTTP front

    /// The proxy's HTTP/1.1 front on an embedded channel with a verified peer and one token route.
    func channel(peer: VerifiedPeer, keys: AccessTokenKeys, revocation: RevocationState = RevocationState(stalePolicy: .allow)) throws -> EmbeddedChannel {
        let runtime = ProxyRuntime(
            metrics: ProxyMetrics(), accessLog: try AccessLog(destination: "off"), revocation: revocation,
            logger: Logger(label: "test", factory: { _ in SwiftLogNoOpLogHandler() }), now: { TestPKI.now }, accessTokens: keys
        )
        let front = try PolicyOnlyFront(policy: RoutePolicy(routes: [
            .init(pathPrefix: "/", allow: [try Principal(parsing: "spiffe://example.org/ns/web/*")], token: Self.rule),
        ]))
        let channel = EmbeddedChannel()
        try HTTPProxyHandler.addRequestDecoder(channel.pipeline.syncOperations)
        try channel.pipeline.syncOperations.addHandler(HTTPProxyHandler(state: front, peer: peer, runtime: runtime, pools: UpstreamPools()))
        try channel.connect(to: SocketAddress(ipAddress: "127.0.0.1", port: 1)).wait()
        return channel
    }

    func answer(_ channel: EmbeddedChannel) throws -> (status: String, fields: [String: String], code: String?) {
        var all = ByteBuffer()
        while var buffer = try channel.readOutbound(as: ByteBuffer.self) { all.writeBuffer(&buffer) }
        let lines = String(buffer: all).components(separatedBy: "\r\n")
        var fields: [String: String] = [:]
        for line in lines.dropFirst().prefix(while: { !$0.isEmpty }) {
            guard let colon = line.firstIndex(of: ":") else { continue }
            fields[line[..<colon].lowercased()] = line[line.index(after: colon)...].trimmingCharacters(in: .whitespaces)
        }
        let body = lines.last.flatMap { try? JSONSerialization.jsonObject(with: Data($0.utf8)) as? [String: Any] }
        return (lines.first ?? "", fields, body?["error"] as? String)
    }

    @Test("refusals are 401/403 with an RFC 6750 challenge and the stable code in the body; the connection stays usable")
    func frontRefusals() throws {
        let issuer = FakeIssuer()
        let signer = try issuer.addKey()
        let keys = Self.keySet(issuer)
        let done = DispatchSemaphore(value: 0)
        Task { _ = await keys.load(); done.signal() }
        done.wait()
        let peer = try GatewayHardeningTests.peer(uris: ["spiffe://example.org/ns/web/sa/app"])
        let other = try GatewayHardeningTests.peer(uris: ["spiffe://example.org/ns/web/sa/app"])
        let channel = try channel(peer: peer, keys: keys)
        let cases: [(String, String, String, String?)] = [
            ("", "HTTP/1.1 401 Unauthorized", "token_missing", nil),
            ("Authorization: Bearer \(try issuer.token(for: other, key: signer))\r\n", "HTTP/1.1 401 Unauthorized", "token_binding_mismatch", "invalid_token"),
            ("Authorization: Bearer \(try issuer.token(for: peer, key: signer, scope: "write"))\r\n", "HTTP/1.1 403 Forbidden", "token_scope", "insufficient_scope"),
            ("Authorization: Bearer a\r\nAuthorization: Bearer b\r\n", "HTTP/1.1 400 Bad Request", "token_request_invalid", "invalid_request"),
            ("Authorization: Bearer not-a-token\r\n", "HTTP/1.1 401 Unauthorized", "token_malformed", "invalid_token"),
        ]
        for (header, status, code, error) in cases {
            try channel.writeInbound(ByteBuffer(string: "GET /pay HTTP/1.1\r\nHost: a\r\n\(header)\r\n"))
            let (line, fields, body) = try answer(channel)
            #expect(line == status, "\(code)")
            #expect(body == code)
            let challenge = fields["www-authenticate"] ?? ""
            #expect(challenge.hasPrefix("Bearer realm=\"mutual\""), "\(code)")
            if let error { #expect(challenge.contains("error=\"\(error)\"")) } else { #expect(!challenge.contains("error=")) }
            #expect(channel.isActive)
        }
        _ = try? channel.finish()
    }

    @Test("a token for a certificate revoked after the handshake is refused on the open connection")
    func revokedAfterHandshake() async throws {
        let issuer = FakeIssuer()
        let signer = try issuer.addKey()
        let keys = Self.keySet(issuer)
        #expect(await keys.load())
        // A chain with an issuer, so the pushed revocation applies to the leaf.
        let caKey = try KeyType.p256.generate()
        var caExtensions = Certificate.Extensions()
        try caExtensions.append(Certificate.Extension(BasicConstraints.isCertificateAuthority(maxPathLength: 0), critical: true))
        let ca = try TestPKI.certificate(subject: "CA", issuer: nil, issuerKey: caKey, publicKey: caKey.publicKey, extensions: caExtensions)
        let leafKey = try KeyType.p256.generate()
        var extensions = Certificate.Extensions()
        try extensions.append(Certificate.Extension(SubjectAlternativeNames([.uniformResourceIdentifier("spiffe://example.org/ns/web/sa/app")]), critical: false))
        let leaf = try TestPKI.certificate(subject: "leaf", issuer: ca, issuerKey: caKey, publicKey: leafKey.publicKey, extensions: extensions)
        let peer = try VerifiedPeer(validatedChain: [leaf, ca])
        let revocation = RevocationState(stalePolicy: .allow)
        let channel = try channel(peer: peer, keys: keys, revocation: revocation)
        _ = revocation.push(serial: peer.serial, reason: "keyCompromise")
        try channel.writeInbound(ByteBuffer(string: "GET /pay HTTP/1.1\r\nHost: a\r\nAuthorization: Bearer \(try issuer.token(for: peer, key: signer))\r\n\r\n"))
        let (status, _, code) = try answer(channel)
        #expect(status == "HTTP/1.1 401 Unauthorized")
        #expect(code == "token_certificate_revoked")
        _ = try? channel.finish()
    }

    @Test("headers the proxy owns for tokens are removed from clients in every spelling, even on routes without tokens")
    func ownedHeaders() {
        let incoming: HTTPHeaders = [
            "x-token-claims": "forged", "X-Token-Subject": "admin", "x_token_scope": "admin", "X-TOKEN-SCOPE": "admin", "authorization": "Bearer t", "keep": "1",
        ]
        let out = HTTPProxyHandler.forwardHeaders(
            incoming, strip: HeaderNames.Matcher(patterns: []), identity: [], addsForwardingHeaders: false, clientAddress: nil
        )
        #expect(out.map(\.name).sorted() == ["authorization", "keep"])
        let trailers = HTTPProxyHandler.forwardTrailers(["X-Token-Scope": "admin"], strip: HeaderNames.Matcher(patterns: []))
        #expect(trailers.isEmpty)
    }

    // MARK: Configuration

    @Test("token: on routes and listeners; refused on open routes, in tcp mode, without an authority, with bad audiences or scopes")
    func configuration() throws {
        func parse(_ yaml: String) -> String {
            do {
                let configuration = try ProxyConfiguration.parse(yaml: yaml)
                let policy = try configuration.policy(for: configuration.listeners[0])
                return policy.routes.map { "\($0.pathPrefix)=\($0.token.map { "\($0.audience):\($0.scopes.joined(separator: ","))" } ?? "-")" }.joined(separator: " ")
            } catch let error as PKIError {
                return "error: \(error.reason)"
            } catch {
                return "error: \(error)"
            }
        }
        let base = """
            revocation: {authority: "https://127.0.0.1:9443", authority-ca: /tmp/root.pem}
            listeners:
              - listen: 127.0.0.1:0
                upstream: http://127.0.0.1:1
                cert: c
                key: k
                client-ca: ca
            """
        #expect(parse(base + """

                token: {audience: payments, scopes: [read]}
                routes:
                  - {path: /healthz, open: true}
                  - {path: /admin, allow: ["spiffe://x/ops"], token: {audience: admin}}
                  - {path: /, allow: ["spiffe://x/*"]}
            """) == "/healthz=- /admin=admin: /=payments:read")
        #expect(parse(base + "\n    routes: [{path: /h, open: true, token: {audience: a}}]").contains("open route cannot require a token"))
        let tcp = base.replacingOccurrences(of: "upstream: http://127.0.0.1:1", with: "upstream: 127.0.0.1:1\n    mode: tcp")
        #expect(parse(tcp + "\n    allow: [\"spiffe://x/a\"]\n    token: {audience: a}").contains("tcp mode cannot require them"))
        #expect(parse(base + "\n    allow: [\"spiffe://x/a\"]\n    token: {audience: \"has space\"}").contains("audience"))
        #expect(parse(base + "\n    allow: [\"spiffe://x/a\"]\n    token: {audience: a, scopes: [\"bad\\\"quote\"]}").contains("scope"))
        let withoutAuthority = base.replacingOccurrences(of: "revocation: {authority: \"https://127.0.0.1:9443\", authority-ca: /tmp/root.pem}\n", with: "")
        #expect(parse(withoutAuthority + "\n    allow: [\"spiffe://x/a\"]\n    token: {audience: a}").contains("tokens.authority"))
        #expect(parse(withoutAuthority + "\n    allow: [\"spiffe://x/a\"]\ntokens: {authority: \"http://plain\", authority-ca: r}\n").hasPrefix("error") == false, "no route needs tokens: no source needed")
    }
}
