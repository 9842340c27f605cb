import Foundation
import MutualAgent
import MutualAuthority
import MutualClient
import MutualPKI
import MutualServer
import MutualStore
import Testing
import TestSupport
import X509

/// The authority's OAuth edge over real TLS on 127.0.0.1: the token endpoint (RFC 8705 `tls_client_auth`), the key
/// set and metadata, introspection, and signing-key rotation.
@Suite("OAuth: certificate-bound access tokens from the authority")
struct OAuthTests {
    static func settings() throws -> OAuthSettings {
        var settings = OAuthSettings()
        settings.rules = try [
            "spiffe://example.org/ns/a/*=payments:read,write", "spiffe://example.org/ns/a/*=billing",
            "spiffe://example.org/ns/b/*=payments:read", "https-client.example.org=https://api.example.org:8443",
        ].map(OAuthRule.init(parsing:))
        settings.introspectors = [try ScopePattern("spiffe://example.org/ns/rs/*")]
        return settings
    }

    /// A client certificate for `uri`, written for curl, and its identity for the Swift client.
    struct Client {
        let chain: [Certificate]
        let key: Certificate.PrivateKey
        let certPath: String
        let keyPath: String
        let serial: String
        var identity: (chain: [Certificate], key: Certificate.PrivateKey) { (chain, key) }
    }

    static func client(_ server: ServerHarness, uri: String, name: String) async throws -> Client {
        let key = try KeyType.p256.generate()
        let issued = try await server.authority.issue(.init(profile: .workload, publicKey: key.publicKey, uris: [uri]), owner: "t", requester: "test")
        try Delivery.deliver(outDir: server.dir + "/" + name, key: key, chain: issued.chain, roots: [server.root])
        return Client(chain: issued.chain, key: key, certPath: server.dir + "/\(name)/chain.pem", keyPath: server.dir + "/\(name)/key.pem", serial: issued.record.serial)
    }

    static func json(_ text: String) -> [String: Any] {
        (try? JSONSerialization.jsonObject(with: Data(text.utf8)) as? [String: Any]) ?? [:]
    }

    static func claims(_ token: String) -> [String: Any] {
        let parts = token.split(separator: ".")
        guard parts.count == 3, let payload = Base64URL.decode(parts[1]) else { return [:] }
        return (try? JSONSerialization.jsonObject(with: payload) as? [String: Any]) ?? [:]
    }

    @Test("a token bound to the caller's certificate, with the policy's audience and scopes; metadata and JWKS describe it")
    func issueAndDescribe() async throws {
        let server = try await ServerHarness.start(oauth: try Self.settings())
        do {
            let alice = try await Self.client(server, uri: "spiffe://example.org/ns/a/alice", name: "alice")
            let client = try server.client(identity: alice.identity)
            let answer = try await client.accessToken(audience: "payments", scopes: ["read"])
            try await client.shutdown()
            let token = try #require(answer["access_token"] as? String)
            #expect(answer["token_type"] as? String == "Bearer" && answer["scope"] as? String == "read")
            #expect((answer["expires_in"] as? Int).map { (290...300).contains($0) } == true)
            let claims = Self.claims(token)
            #expect(claims["sub"] as? String == "spiffe://example.org/ns/a/alice")
            #expect(claims["aud"] as? String == "payments" && claims["scope"] as? String == "read" && claims["iss"] as? String == server.baseURL)
            let bound = (claims["cnf"] as? [String: String])?["x5t#S256"]
            #expect(bound == AccessTokenClaims.thumbprint(certificateDER: try alice.chain[0].derBytes))
            #expect(claims["jti"] as? String != nil)

            // The key set verifies it; the metadata names the endpoints and the binding.
            let (jwksStatus, jwksBody) = try await server.curl("/.well-known/jwks.json")
            #expect(jwksStatus == 200)
            let keys = try JSONWebKey.keySet(json: Data(jwksBody.utf8))
            let verifier = AccessTokenVerifier(issuer: server.baseURL, audience: "payments", requiredScopes: ["read"])
            #expect((try? verifier.verify(Substring(token), keys: keys, thumbprint: bound, now: .now).get()) != nil)
            let (_, metadataBody) = try await server.curl("/.well-known/oauth-authorization-server")
            let metadata = Self.json(metadataBody)
            #expect(metadata["issuer"] as? String == server.baseURL)
            #expect(metadata["token_endpoint"] as? String == server.baseURL + "/oauth2/token")
            #expect(metadata["jwks_uri"] as? String == server.baseURL + "/.well-known/jwks.json")
            #expect(metadata["tls_client_certificate_bound_access_tokens"] as? Bool == true)
            #expect((metadata["mtls_endpoint_aliases"] as? [String: String])?["token_endpoint"] == server.baseURL + "/oauth2/token")
            #expect(metadata["token_endpoint_auth_methods_supported"] as? [String] == ["tls_client_auth"])
            #expect(metadata["grant_types_supported"] as? [String] == ["client_credentials"])

            // Without scope: everything the policy allows for the audience; the only audience when one is allowed.
            let bob = try await Self.client(server, uri: "spiffe://example.org/ns/b/bob", name: "bob")
            let (status, body) = try await server.curl(
                "/oauth2/token", method: "POST", body: "grant_type=client_credentials", contentType: "application/x-www-form-urlencoded",
                clientCert: (bob.certPath, bob.keyPath)
            )
            #expect(status == 200)
            #expect(Self.claims(Self.json(body)["access_token"] as? String ?? "")["aud"] as? String == "payments")
            #expect(Self.json(body)["scope"] as? String == "read")
        } catch {
            await server.stop()
            throw error
        }
        await server.stop()
    }

    @Test("refusals: each in RFC 6749's shape with Mutual's code — no certificate, grant, repeated parameter, policy, audience, scope, client_id, revoked, bad bodies")
    func refusals() async throws {
        let server = try await ServerHarness.start(oauth: try Self.settings())
        do {
            let alice = try await Self.client(server, uri: "spiffe://example.org/ns/a/alice", name: "alice")
            let stranger = try await Self.client(server, uri: "spiffe://example.org/ns/z/zed", name: "zed")
            func post(_ body: String, as client: Client? = alice, contentType: String = "application/x-www-form-urlencoded") async throws -> (Int, String, String) {
                let (status, text) = try await server.curl(
                    "/oauth2/token", method: "POST", body: body, contentType: contentType, clientCert: client.map { ($0.certPath, $0.keyPath) }
                )
                let object = Self.json(text)
                return (status, object["error"] as? String ?? "-", object["code"] as? String ?? "-")
            }
            let cases: [(String, Client?, String, Int, String, String)] = [
                ("grant_type=client_credentials", nil, "application/x-www-form-urlencoded", 401, "invalid_client", "oauth-no-certificate"),
                ("grant_type=password&username=a&password=b", alice, "application/x-www-form-urlencoded", 400, "unsupported_grant_type", "oauth-unsupported-grant"),
                ("scope=read", alice, "application/x-www-form-urlencoded", 400, "invalid_request", "oauth-missing-parameter"),
                ("grant_type=client_credentials&grant_type=client_credentials", alice, "application/x-www-form-urlencoded", 400, "invalid_request", "oauth-repeated-parameter"),
                ("grant_type=client_credentials", stranger, "application/x-www-form-urlencoded", 400, "unauthorized_client", "oauth-not-allowed"),
                ("grant_type=client_credentials", alice, "application/x-www-form-urlencoded", 400, "invalid_request", "oauth-audience-required"),
                ("grant_type=client_credentials&audience=admin", alice, "application/x-www-form-urlencoded", 400, "invalid_target", "oauth-audience-not-allowed"),
                ("grant_type=client_credentials&audience=payments&resource=billing", alice, "application/x-www-form-urlencoded", 400, "invalid_request", "oauth-ambiguous-audience"),
                ("grant_type=client_credentials&audience=payments&scope=read%20admin", alice, "application/x-www-form-urlencoded", 400, "invalid_scope", "oauth-scope-not-allowed"),
                ("grant_type=client_credentials&audience=billing&scope=read", alice, "application/x-www-form-urlencoded", 400, "invalid_scope", "oauth-scope-not-allowed"),
                ("grant_type=client_credentials&audience=payments&scope=%22", alice, "application/x-www-form-urlencoded", 400, "invalid_scope", "oauth-bad-scope"),
                ("grant_type=client_credentials&audience=payments&client_id=spiffe://example.org/ns/a/mallory", alice, "application/x-www-form-urlencoded", 401, "invalid_client", "oauth-client-id-mismatch"),
                (#"{"grant_type":"client_credentials"}"#, alice, "application/json", 400, "invalid_request", "unsupported-media-type"),
                ("grant_type=%zz", alice, "application/x-www-form-urlencoded", 400, "invalid_request", "malformed-form"),
                (String(repeating: "a=b&", count: 20_000), alice, "application/x-www-form-urlencoded", 413, "invalid_request", "body-too-large"),
            ]
            for (body, client, contentType, status, error, code) in cases {
                let got = try await post(body, as: client, contentType: contentType)
                #expect(got.0 == status && got.1 == error && got.2 == code, "\(body.prefix(60)) → \(got)")
            }
            // client_id naming the certificate's own identity, and resource= for the audience, are accepted.
            #expect(try await post("grant_type=client_credentials&resource=billing&client_id=spiffe%3A%2F%2Fexample.org%2Fns%2Fa%2Falice").0 == 200)
            // A revoked certificate still completes the handshake here (the authority serves its CRL to it), but gets no token.
            _ = try await server.authority.revoke(serial: alice.serial, reason: .keyCompromise, actor: "test")
            let revoked = try await post("grant_type=client_credentials&audience=payments")
            #expect(revoked.0 == 401 && revoked.1 == "invalid_client" && revoked.2 == "certificate-revoked")
            // Refusals are counted by code.
            let (_, metrics) = try await server.curl("/metrics")
            #expect(metrics.contains(#"mutual_oauth_token_total{outcome="refused",reason="oauth-scope-not-allowed"}"#))
        } catch {
            await server.stop()
            throw error
        }
        await server.stop()
    }

    @Test("introspection: the admin and allowed resource servers see a token's claims and cnf; revocation makes it inactive; others are refused")
    func introspection() async throws {
        let server = try await ServerHarness.start(oauth: try Self.settings())
        do {
            let alice = try await Self.client(server, uri: "spiffe://example.org/ns/a/alice", name: "alice")
            let resourceServer = try await Self.client(server, uri: "spiffe://example.org/ns/rs/payments", name: "rs")
            let stranger = try await Self.client(server, uri: "spiffe://example.org/ns/z/zed", name: "zed")
            let client = try server.client(identity: alice.identity)
            let token = try #require(try await client.accessToken(audience: "payments", scopes: []).get("access_token") as? String)
            try await client.shutdown()
            let admin = try server.client(identity: try server.adminIdentity())
            let active = try await admin.introspect(token: token)
            #expect(active["active"] as? Bool == true)
            #expect(active["sub"] as? String == "spiffe://example.org/ns/a/alice" && active["scope"] as? String == "read write")
            #expect((active["cnf"] as? [String: String])?["x5t#S256"] == AccessTokenClaims.thumbprint(certificateDER: try alice.chain[0].derBytes))
            let rs = try server.client(identity: resourceServer.identity)
            #expect(try await rs.introspect(token: token)["active"] as? Bool == true)
            // Garbage and foreign tokens are simply inactive.
            #expect(try await admin.introspect(token: "garbage")["active"] as? Bool == false)
            #expect(try await admin.introspect(token: token + "x")["active"] as? Bool == false)
            let zed = try server.client(identity: stranger.identity)
            await #expect(throws: AuthorityClientError.self) { _ = try await zed.introspect(token: token) }
            // Revoking the certificate withdraws its tokens.
            _ = try await server.authority.revoke(serial: alice.serial, reason: .keyCompromise, actor: "test")
            let after = try await admin.introspect(token: token)
            #expect(after["active"] as? Bool == false && after.count == 1)
            for c in [admin, rs, zed] { try await c.shutdown() }
        } catch {
            await server.stop()
            throw error
        }
        await server.stop()
    }

    @Test("signing-key rotation is a timeline: next is published before it signs, previous stays published, emergency drops it at once")
    func rotationTimeline() async throws {
        let dir = TestPKI.temporaryDirectory("oauth-keys")
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let ring = OAuthKeyRing(directory: dir, passphrase: nil, keyStore: nil)
        let t0 = Date(timeIntervalSince1970: 1_800_000_000)
        let first = try ring.ensureKey(now: t0)
        #expect(try ring.ensureKey(now: t0).kid == first.kid, "idempotent")
        #expect(try ring.snapshot(now: t0).signer.kid == first.kid)
        let second = try ring.rotate(publishAhead: 600, keepPrevious: 3600, now: t0.addingTimeInterval(10))
        #expect(throws: AuthorityError.self) { _ = try ring.rotate(publishAhead: 600, keepPrevious: 3600, now: t0.addingTimeInterval(20)) }
        func state(_ offset: TimeInterval) throws -> (String, [String]) {
            // A fresh ring each time: what a replica or a restarted serve reads from the directory.
            let snapshot = try OAuthKeyRing(directory: dir, passphrase: nil, keyStore: nil).snapshot(now: t0.addingTimeInterval(offset))
            return (snapshot.signer.kid, snapshot.published.map(\.kid).sorted())
        }
        #expect(try state(300) == (first.kid, [first.kid, second.kid].sorted()), "next published ahead, not signing")
        #expect(try state(700) == (second.kid, [first.kid, second.kid].sorted()), "switched; previous still published")
        #expect(try state(610 + 3600 + 1) == (second.kid, [second.kid]), "previous retired")
        // Emergency: the new key signs now and the old one is withdrawn now.
        let third = try ring.rotate(publishAhead: 0, keepPrevious: 0, now: t0.addingTimeInterval(5000))
        #expect(try state(5000) == (third.kid, [third.kid]))
        // A first key made by a rotation (before any serve) has nothing to overlap with: it signs at once.
        let fresh = OAuthKeyRing(directory: dir + "/fresh", passphrase: nil, keyStore: nil)
        let only = try fresh.rotate(publishAhead: 600, keepPrevious: 3600, now: t0)
        #expect(only.activatesAt == t0)
        #expect(try fresh.snapshot(now: t0).signer.kid == only.kid)
        // Files: 0600, and a tampered list is refused rather than trusted.
        let attributes = try FileManager.default.attributesOfItem(atPath: dir + "/signer-\(third.kid).key")
        #expect((attributes[.posixPermissions] as? Int) == 0o600)
        try "{not json".write(toFile: dir + "/keys.json", atomically: true, encoding: .utf8)
        #expect(throws: AuthorityError.self) { _ = try OAuthKeyRing(directory: dir, passphrase: nil, keyStore: nil).snapshot(now: t0) }
    }

    @Test("--oauth-allow rules: patterns, audiences with ports and paths, scopes; garbage refused with a reason")
    func ruleParsing() throws {
        func parse(_ text: String) -> String {
            do { return try OAuthRule(parsing: text).description } catch let error as OAuthError { return "error:\(error.code)" } catch { return "error" }
        }
        #expect(parse("spiffe://td/ns/a/*=payments:read,write") == "spiffe://td/ns/a/*=payments:read,write")
        #expect(parse("*.svc.example.org=https://api.example.org/v1") == "*.svc.example.org=https://api.example.org/v1")
        #expect(parse("*.svc.example.org=https://api.example.org:8443") == "*.svc.example.org=https://api.example.org:8443")
        #expect(parse("*.svc.example.org=https://api.example.org:8443:read") == "*.svc.example.org=https://api.example.org:8443:read")
        #expect(parse("exact.example.org=aud") == "exact.example.org=aud")
        for bad in ["", "noequals", "=aud", "spiffe://td/*=", "a b=aud", "spiffe://td/**=aud", "x=aud:re\"ad", "x=a u d", "x=" + String(repeating: "a", count: 600)] {
            #expect(parse(bad).hasPrefix("error:oauth-bad-rule"), "\(bad.prefix(40))")
        }
    }

    @Test("the configuration file's oauth keys, with paths in errors")
    func configurationFile() throws {
        let file = try AuthorityFile.parse(yaml: """
            oauth-allow: ["spiffe://td/ns/a/*=payments:read"]
            oauth-token-lifetime: 2m
            oauth-introspector: ["spiffe://td/ns/rs/*"]
            oauth-issuer: https://ca.example.org
            """)
        #expect(file.oauthAllow.map(\.description) == ["spiffe://td/ns/a/*=payments:read"])
        #expect(file.oauthTokenLifetime == .minutes(2) && file.oauthIntrospectors.map(\.text) == ["spiffe://td/ns/rs/*"])
        let problem = #expect(throws: AuthorityFile.Problem.self) { _ = try AuthorityFile.parse(yaml: "oauth-allow: [nope]") }
        #expect(problem?.path == "oauth-allow[0]")
        #expect(throws: AuthorityFile.Problem.self) { _ = try AuthorityFile.parse(yaml: "oauth-allow: notalist") }
    }
}

extension Dictionary where Key == String, Value == Any {
    func get(_ key: String) -> Any? { self[key] }
}
