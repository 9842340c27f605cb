import Crypto
import _CryptoExtras
import Foundation
@testable import MutualAuthority
import MutualPKI
import MutualStore
import Synchronization
import SwiftASN1
import Testing
import TestSupport
import X509

/// Answers challenges from a table the test fills, standing in for the network in these in-memory tests (the network
/// validator has its own socket test, and certbot and lego run against the real one in scripts/interop-acme.sh).
final class TableValidator: ACMEValidator {
    /// identifier value → the key authorization the "web server" serves there.
    let served = Mutex<[String: String]>([:])
    let checks = Mutex(0)

    func validate(challenge: ACMEChallenge, identifier: ACMEIdentifier, keyAuthorization: String, provisioner: ACMEProvisioner) async -> ACMEProblem? {
        checks.withLock { $0 += 1 }
        guard let answer = served.withLock({ $0[identifier.value] }) else {
            return ACMEProblem(.connection, "could not connect to \(identifier.value):\(provisioner.httpPort): connection refused", status: 403)
        }
        return answer == keyAuthorization ? nil : ACMEProblem(.incorrectResponse, "wrong key authorization", status: 403)
    }
}

/// A small ACME client for the tests: signs flattened JWS requests with any of the four account key types.
struct TestACMEClient: Sendable {
    enum Key: Sendable {
        case p256(P256.Signing.PrivateKey)
        case p384(P384.Signing.PrivateKey)
        case rsa(_RSA.Signing.PrivateKey)
        case ed25519(Curve25519.Signing.PrivateKey)
    }

    let service: ACMEService
    let key: Key
    var kid: String?
    static let base = "https://acme.test:443"
    static let prefix = "/acme/test/"

    init(service: ACMEService, key: Key = .p256(P256.Signing.PrivateKey())) {
        self.service = service
        self.key = key
    }

    var jwk: [String: Any] {
        switch key {
        case .p256(let k):
            let raw = k.publicKey.rawRepresentation
            return ["kty": "EC", "crv": "P-256", "x": Base64URL.encode(raw.prefix(32)), "y": Base64URL.encode(raw.suffix(32))]
        case .p384(let k):
            let raw = k.publicKey.rawRepresentation
            return ["kty": "EC", "crv": "P-384", "x": Base64URL.encode(raw.prefix(48)), "y": Base64URL.encode(raw.suffix(48))]
        case .rsa(let k):
            let numbers = try! k.publicKey.getKeyPrimitives()
            return ["kty": "RSA", "n": Base64URL.encode(numbers.modulus), "e": Base64URL.encode(numbers.publicExponent)]
        case .ed25519(let k):
            return ["kty": "OKP", "crv": "Ed25519", "x": Base64URL.encode(k.publicKey.rawRepresentation)]
        }
    }

    var alg: String {
        switch key {
        case .p256: return "ES256"
        case .p384: return "ES384"
        case .rsa: return "RS256"
        case .ed25519: return "EdDSA"
        }
    }

    func sign(_ input: Data) throws -> Data {
        switch key {
        case .p256(let k): return try k.signature(for: input).rawRepresentation
        case .p384(let k): return try k.signature(for: input).rawRepresentation
        case .rsa(let k): return try k.signature(for: input, padding: .insecurePKCS1v1_5).rawRepresentation
        case .ed25519(let k): return try k.signature(for: input)
        }
    }

    func nonce() async -> String {
        let response = await service.handle(method: "HEAD", path: Self.prefix + "new-nonce", base: Self.base, contentType: nil, body: Data())
        return response.headers.first { $0.0 == "replay-nonce" }!.1
    }

    /// The JWS body for `resource` (a path under the provisioner, or a full URL), with `payload` (nil: POST-as-GET).
    func jws(_ resource: String, payload: Any?, nonce: String, useJWK: Bool? = nil, header: (inout [String: Any]) -> Void = { _ in }) throws -> Data {
        var protected: [String: Any] = ["alg": alg, "nonce": nonce, "url": resource.hasPrefix("https://") ? resource : Self.base + Self.prefix + resource]
        if useJWK ?? (kid == nil) { protected["jwk"] = jwk } else { protected["kid"] = kid! }
        header(&protected)
        let protected64 = Base64URL.encode(try JSONSerialization.data(withJSONObject: protected))
        let payload64 = try payload.map { Base64URL.encode(try JSONSerialization.data(withJSONObject: $0)) } ?? ""
        let signature = try sign(Data((protected64 + "." + payload64).utf8))
        return try JSONSerialization.data(withJSONObject: ["protected": protected64, "payload": payload64, "signature": Base64URL.encode(signature)])
    }

    /// POSTs to `resource` (a path under the provisioner, or a full URL).
    func post(_ resource: String, _ payload: Any?, useJWK: Bool? = nil) async throws -> ACMEResponse {
        let body = try jws(resource, payload: payload, nonce: await nonce(), useJWK: useJWK)
        return await raw(resource, body)
    }

    func raw(_ resource: String, _ body: Data, contentType: String = "application/jose+json", method: String = "POST") async -> ACMEResponse {
        let path = resource.hasPrefix("https://") ? String(resource.dropFirst(Self.base.count)) : Self.prefix + resource
        return await service.handle(method: method, path: path, base: Self.base, contentType: contentType, body: body)
    }

    mutating func register() async throws -> ACMEResponse {
        let response = try await post("new-account", ["termsOfServiceAgreed": true, "contact": ["mailto:ops@example.org"]], useJWK: true)
        kid = response.header("location")
        return response
    }
}

extension ACMEResponse {
    func header(_ name: String) -> String? { headers.first { $0.0 == name }?.1 }
    var json: [String: Any] { (try? JSONSerialization.jsonObject(with: body) as? [String: Any]) ?? [:] }
    /// The ACME error type's last part (`badNonce`), or nil for a success.
    var problem: String? {
        guard header("content-type") == "application/problem+json", let type = json["type"] as? String else { return nil }
        return type.hasPrefix("urn:ietf:params:acme:error:") ? String(type.dropFirst("urn:ietf:params:acme:error:".count)) : type
    }
}

@Suite("ACME server (RFC 8555) in memory: accounts, orders, challenges, finalize, revocation, and every refusal by its type")
struct ACMETests {
    struct Setup {
        let authority: Authority
        let service: ACMEService
        let validator: TableValidator
        let dir: String
    }

    static func withService(
        permittedDNS: [String] = [], requireEAB: Bool = false, dnsResolver: String? = nil, limits: (orders: Int?, perIdentifier: Int?) = (300, 100), profiles: [CertificateProfile] = [.server], clock: @escaping @Sendable () -> Date = { Date() }, _ body: (Setup) async throws -> Void
    ) async throws {
        let dir = TestPKI.temporaryDirectory("acme")
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let state = StateDirectory(path: dir + "/state")
        _ = try await Authority.initialize(state: state, name: "ACME", keyType: .p256, constraints: .init(permittedDNS: permittedDNS), passphrase: nil, actor: "test")
        let authority = try await Authority.open(state: state)
        let validator = TableValidator()
        var provisioner = try ACMEProvisioner(name: "test")
        provisioner.requireEAB = requireEAB
        provisioner.profiles = profiles
        provisioner.ordersPerAccountPerHour = limits.orders
        provisioner.certificatesPerIdentifierPerHour = limits.perIdentifier
        if let dnsResolver {
            provisioner.dnsResolver = dnsResolver
            provisioner.challenges.append("dns-01")
        }
        let service = try await ACMEService.make(authority: authority, provisioners: [provisioner], validator: validator, clock: clock)
        do {
            try await body(Setup(authority: authority, service: service, validator: validator, dir: dir))
            await service.waitForValidations()
            try await authority.close()
        } catch {
            await service.waitForValidations()
            try? await authority.close()
            throw error
        }
    }

    /// Creates an order for `identifiers`, serves the right key authorizations, validates every challenge; returns the
    /// order URL.
    static func validOrder(_ client: TestACMEClient, _ setup: Setup, identifiers: [(String, String)]) async throws -> String {
        let order = try await client.post("new-order", ["identifiers": identifiers.map { ["type": $0.0, "value": $0.1] }])
        #expect(order.status == 201, "\(String(decoding: order.body, as: UTF8.self))")
        let orderURL = try #require(order.header("location"))
        for authzURL in order.json["authorizations"] as? [String] ?? [] {
            let authz = try await client.post(authzURL, nil)
            let challenge = try #require((authz.json["challenges"] as? [[String: Any]])?.first { $0["type"] as? String == "http-01" })
            let identifier = (authz.json["identifier"] as? [String: Any])?["value"] as? String ?? ""
            let thumbprint = try ACMEAccountKey(jwk: client.jwk).thumbprint
            setup.validator.served.withLock { $0[identifier] = "\(challenge["token"] as! String).\(thumbprint)" }
            let started = try await client.post(challenge["url"] as! String, [String: Any]())
            #expect(started.status == 200)
            #expect(started.json["status"] as? String == "valid", "a quick check is answered with its outcome")
            #expect(started.headers.contains { $0.0 == "link" && $0.1.hasSuffix(";rel=\"up\"") })
        }
        await setup.service.waitForValidations()
        return orderURL
    }

    static func csrDER(_ key: Certificate.PrivateKey, dns: [String] = [], ips: [String] = [], cn: String? = nil) throws -> String {
        let sans = dns.map { GeneralName.dnsName($0) } + (try ips.map { GeneralName.ipAddress(ASN1OctetString(contentBytes: ArraySlice(try Names.ipAddressBytes($0)))) })
        return Base64URL.encode(try TestPKI.der(TestPKI.csr(key: key, commonName: cn, sans: sans)))
    }

    @Test("certbot's path: account, order for a DNS name and an IP, http-01, finalize, PEM chain; the certificate is in the inventory with the account as owner")
    func fullFlow() async throws {
        try await Self.withService { setup in
            var client = TestACMEClient(service: setup.service)
            let directory = await client.raw("directory", Data(), contentType: "", method: "GET")
            #expect(directory.status == 200)
            #expect(directory.json["newAccount"] as? String == TestACMEClient.base + "/acme/test/new-account")
            #expect(directory.json["keyChange"] as? String == TestACMEClient.base + "/acme/test/key-change")
            let created = try await client.register()
            #expect(created.status == 201)
            #expect(created.header("replay-nonce") != nil)
            let again = try await client.post("new-account", ["termsOfServiceAgreed": true], useJWK: true)
            #expect(again.status == 200 && again.header("location") == client.kid, "the same key finds the same account")

            let orderURL = try await Self.validOrder(client, setup, identifiers: [("dns", "App.Example.org"), ("ip", "127.0.0.1")])
            let ready = try await client.post(orderURL, nil)
            #expect(ready.json["status"] as? String == "ready")
            #expect((ready.json["identifiers"] as? [[String: String]])?.map { $0["value"]! } == ["app.example.org", "127.0.0.1"])

            let key = try KeyType.p256.generate()
            let finalized = try await client.post(ready.json["finalize"] as! String, ["csr": try Self.csrDER(key, dns: ["app.example.org"], ips: ["127.0.0.1"])])
            #expect(finalized.status == 200, "\(String(decoding: finalized.body, as: UTF8.self))")
            #expect(finalized.json["status"] as? String == "valid")
            let certificateURL = try #require(finalized.json["certificate"] as? String)
            let download = try await client.post(certificateURL, nil)
            #expect(download.header("content-type") == "application/pem-certificate-chain")
            let chain = try PEMBundle.certificates(fromPEM: String(decoding: download.body, as: UTF8.self))
            #expect(chain.count == 2)
            #expect(chain[0].publicKey == key.publicKey)
            #expect(chain[1] == setup.authority.ca.certificate)
            let record = try #require(try await setup.authority.store.certificate(serial: chain[0].serialHex))
            let accountID = String(client.kid!.split(separator: "/").last!)
            #expect(record.owner == "acme:test/\(accountID)")
            #expect(record.profile == "server")
            let actions = try await setup.authority.store.auditEvents(limit: 100).map(\.action)
            for action in ["acme-account", "acme-order", "acme-challenge", "issue"] { #expect(actions.contains(action), "\(action) audited") }

            // A second finalize of a valid order is refused; the account lists its order.
            let twice = try await client.post(ready.json["finalize"] as! String, ["csr": try Self.csrDER(key, dns: ["app.example.org"], ips: ["127.0.0.1"])])
            #expect(twice.problem == "orderNotReady")
            let orders = try await client.post(client.kid! + "/orders", nil)
            #expect((orders.json["orders"] as? [String]) == [orderURL])
        }
    }

    @Test("RS256 (certbot's default), ES384 and EdDSA account keys register and sign; an RSA key under 2048 bits is refused")
    func accountKeyTypes() async throws {
        try await Self.withService { setup in
            for key: TestACMEClient.Key in [.rsa(try _RSA.Signing.PrivateKey(keySize: .bits2048)), .p384(P384.Signing.PrivateKey()), .ed25519(Curve25519.Signing.PrivateKey())] {
                var client = TestACMEClient(service: setup.service, key: key)
                let created = try await client.register()
                #expect(created.status == 201, "\(client.alg): \(String(decoding: created.body, as: UTF8.self))")
                let read = try await client.post(client.kid!, nil)
                #expect(read.json["status"] as? String == "valid", "\(client.alg) signs kid requests")
            }
            let small = try _RSA.Signing.PrivateKey(unsafeKeySize: .init(bitCount: 1024))
            var weak = TestACMEClient(service: setup.service, key: .rsa(small))
            #expect(try await weak.register().problem == "badPublicKey")
        }
    }

    @Test("nonces: stale, forged, missing and replayed nonces get badNonce with a fresh nonce; a nonce from one replica is accepted once by another")
    func nonces() async throws {
        try await Self.withService { setup in
            var client = TestACMEClient(service: setup.service)
            _ = try await client.register()
            let stale = setup.service.nonces.make(now: Date().addingTimeInterval(-7200))
            let forged = ACMENonces(key: SymmetricKey(size: .bits256)).make(now: Date())
            for nonce in [stale, forged, "", "not-a-nonce"] {
                let response = await client.raw(client.kid!, try client.jws(client.kid!, payload: nil, nonce: nonce))
                #expect(response.problem == "badNonce", "nonce '\(nonce.prefix(10))'")
                #expect(response.status == 400)
                #expect(response.header("replay-nonce") != nil, "a fresh nonce comes with badNonce")
            }
            let nonce = await client.nonce()
            let body = try client.jws(client.kid!, payload: nil, nonce: nonce)
            #expect(await client.raw(client.kid!, body).status == 200)
            #expect(await client.raw(client.kid!, body).problem == "badNonce", "a replayed JWS is refused")

            // A second service on the same database (a replica): shares the nonce key, and a used nonce stays used.
            let replica = try await ACMEService.make(authority: setup.authority, provisioners: [try ACMEProvisioner(name: "test")], validator: setup.validator)
            var other = client
            other = TestACMEClient(service: replica, key: client.key)
            other.kid = client.kid
            let fromFirst = await client.nonce()
            let signed = try other.jws(client.kid!, payload: nil, nonce: fromFirst)
            #expect(await other.raw(client.kid!, signed).status == 200, "a nonce from one replica works on the other")
            #expect(await client.raw(client.kid!, signed).problem == "badNonce", "and only once, on either")
        }
    }

    @Test("hostile JWS: jwk and kid both, neither, wrong url, unknown kid, bad signature, alg none/HS256, unprotected header, garbage, truncated, oversized, wrong content type, GET")
    func hostileRequests() async throws {
        try await Self.withService { setup in
            var client = TestACMEClient(service: setup.service)
            _ = try await client.register()
            let kid = client.kid!
            func expectProblem(_ body: Data, _ expected: String, _ label: String, resource: String? = nil, contentType: String = "application/jose+json") async {
                let response = await client.raw(resource ?? kid, body, contentType: contentType)
                #expect(response.problem == expected, "\(label): \(response.status) \(String(decoding: response.body, as: UTF8.self))")
            }
            await expectProblem(try client.jws(kid, payload: nil, nonce: await client.nonce()) { $0["jwk"] = client.jwk }, "malformed", "jwk and kid")
            await expectProblem(try client.jws(kid, payload: nil, nonce: await client.nonce()) { $0["kid"] = nil }, "malformed", "neither")
            await expectProblem(try client.jws("https://elsewhere.test/acme/test/new-order", payload: nil, nonce: await client.nonce()), "unauthorized", "url of another resource")
            await expectProblem(try client.jws(kid, payload: nil, nonce: await client.nonce()) { $0["url"] = nil }, "malformed", "no url")
            await expectProblem(try client.jws(kid, payload: nil, nonce: await client.nonce()) { $0["kid"] = TestACMEClient.base + "/acme/test/account/nope" }, "accountDoesNotExist", "unknown kid")
            for alg in ["none", "HS256", "RS512"] {
                await expectProblem(try client.jws(kid, payload: nil, nonce: await client.nonce()) { $0["alg"] = alg }, "badSignatureAlgorithm", "alg \(alg)")
            }
            var tampered = try JSONSerialization.jsonObject(with: try client.jws(kid, payload: ["contact": []], nonce: await client.nonce())) as! [String: String]
            tampered["payload"] = Base64URL.encode(Data("{\"status\":\"deactivated\"}".utf8))
            await expectProblem(try JSONSerialization.data(withJSONObject: tampered), "malformed", "payload changed after signing")
            var unprotected = try JSONSerialization.jsonObject(with: try client.jws(kid, payload: nil, nonce: await client.nonce())) as! [String: Any]
            unprotected["header"] = ["kid": kid]
            await expectProblem(try JSONSerialization.data(withJSONObject: unprotected), "malformed", "unprotected header")
            let good = try client.jws(kid, payload: nil, nonce: await client.nonce())
            await expectProblem(good.prefix(good.count / 2), "malformed", "truncated")
            await expectProblem(Data("garbage".utf8), "malformed", "garbage")
            await expectProblem(Data(repeating: 0x7B, count: 70_000), "malformed", "oversized")
            let wrongType = await client.raw(kid, try client.jws(kid, payload: nil, nonce: await client.nonce()), contentType: "application/json")
            #expect(wrongType.status == 415 && wrongType.problem == "malformed")
            let get = await client.raw("order/x", Data(), contentType: "", method: "GET")
            #expect(get.status == 405 && get.header("allow") == "POST")
            // A request with a jwk may only create an account or revoke.
            #expect(try await client.post("new-order", ["identifiers": [["type": "dns", "value": "a.example.org"]]], useJWK: true).problem == "malformed")
            // The account still works after all that.
            #expect(try await client.post(kid, nil).status == 200)
        }
    }

    @Test("a request that is not signed by its account is refused without recording its nonce (a stranger cannot make the server write)")
    func unsignedRequestsWriteNothing() async throws {
        try await Self.withService { setup in
            var client = TestACMEClient(service: setup.service)
            _ = try await client.register()
            let stranger = TestACMEClient(service: setup.service)
            let nonce = await client.nonce()
            let before = try await setup.authority.store.auditEvents().count
            var forged = stranger
            forged.kid = client.kid
            #expect(await client.raw(client.kid!, try forged.jws(client.kid!, payload: nil, nonce: nonce)).problem == "malformed")
            #expect(await client.raw(client.kid!, try forged.jws(client.kid!, payload: nil, nonce: nonce) { $0["kid"] = TestACMEClient.base + "/acme/test/account/nope" }).problem == "accountDoesNotExist")
            // The nonce was not spent by the refused requests: the account's own request with it succeeds, once.
            let signed = try client.jws(client.kid!, payload: nil, nonce: nonce)
            #expect(await client.raw(client.kid!, signed).status == 200)
            #expect(await client.raw(client.kid!, signed).problem == "badNonce")
            #expect(try await setup.authority.store.auditEvents().count == before)
        }
    }

    @Test("orders outside policy are refused before any challenge: outside the CA's constraints, wildcard, bad names, unknown types, notAfter, unknown profile")
    func orderPolicy() async throws {
        try await Self.withService(permittedDNS: ["example.org"]) { setup in
            var client = TestACMEClient(service: setup.service)
            _ = try await client.register()
            func order(_ identifiers: [[String: String]], extra: [String: Any] = [:]) async throws -> ACMEResponse {
                try await client.post("new-order", ["identifiers": identifiers].merging(extra) { $1 })
            }
            let outside = try await order([["type": "dns", "value": "ok.example.org"], ["type": "dns", "value": "evil.example.com"]])
            #expect(outside.problem == "rejectedIdentifier")
            #expect((outside.json["subproblems"] as? [[String: Any]])?.count == 1)
            #expect(try await order([["type": "dns", "value": "*.example.org"]]).problem == "rejectedIdentifier")
            #expect(try await order([["type": "dns", "value": "bad_name.example.org"]]).problem == "rejectedIdentifier")
            #expect(try await order([["type": "email", "value": "a@example.org"]]).problem == "unsupportedIdentifier")
            #expect(try await order([["type": "ip", "value": "999.1.1.1"]]).problem == "rejectedIdentifier")
            #expect(try await order([]).problem == "malformed")
            #expect(try await order([["type": "dns", "value": "ok.example.org"]], extra: ["notAfter": "2030-01-01T00:00:00Z"]).problem == "malformed")
            #expect(try await order([["type": "dns", "value": "ok.example.org"]], extra: ["profile": "workload"]).problem == "invalidProfile")
            #expect(setup.validator.checks.withLock { $0 } == 0, "no challenge was ever checked")
            let fine = try await order([["type": "dns", "value": "ok.example.org"]], extra: ["profile": "server"])
            #expect(fine.status == 201)
            #expect(fine.json["profile"] as? String == "server")
        }
    }

    @Test("a failed validation marks the challenge, the authorization and the order invalid with the reason; never left pending")
    func failedValidation() async throws {
        try await Self.withService { setup in
            var client = TestACMEClient(service: setup.service)
            _ = try await client.register()
            let order = try await client.post("new-order", ["identifiers": [["type": "dns", "value": "down.example.org"], ["type": "dns", "value": "wrong.example.org"]]])
            let authorizations = order.json["authorizations"] as! [String]
            setup.validator.served.withLock { $0["wrong.example.org"] = "not-the-key-authorization" }
            for url in authorizations {
                let authz = try await client.post(url, nil)
                let challenge = (authz.json["challenges"] as! [[String: Any]])[0]
                _ = try await client.post(challenge["url"] as! String, [String: Any]())
            }
            await setup.service.waitForValidations()
            var types: [String] = []
            for url in authorizations {
                let authz = try await client.post(url, nil)
                #expect(authz.json["status"] as? String == "invalid")
                let challenge = (authz.json["challenges"] as! [[String: Any]])[0]
                #expect(challenge["status"] as? String == "invalid")
                types.append(((challenge["error"] as? [String: Any])?["type"] as? String) ?? "")
                // Asking again does not restart it.
                let retried = try await client.post(challenge["url"] as! String, [String: Any]())
                #expect(retried.json["status"] as? String == "invalid")
            }
            #expect(Set(types) == ["urn:ietf:params:acme:error:connection", "urn:ietf:params:acme:error:incorrectResponse"])
            let final = try await client.post(order.header("location")!, nil)
            #expect(final.json["status"] as? String == "invalid")
            #expect((final.json["error"] as? [String: Any])?["type"] != nil)
        }
    }

    @Test("finalize: a CSR for other names, with extra names or a foreign common name gets badCSR; before validation orderNotReady; two finalizes at once issue one certificate")
    func finalizeChecks() async throws {
        try await Self.withService { setup in
            var client = TestACMEClient(service: setup.service)
            _ = try await client.register()
            let early = try await client.post("new-order", ["identifiers": [["type": "dns", "value": "early.example.org"]]])
            let key = try KeyType.p256.generate()
            #expect(try await client.post(early.json["finalize"] as! String, ["csr": try Self.csrDER(key, dns: ["early.example.org"])]).problem == "orderNotReady")

            let orderURL = try await Self.validOrder(client, setup, identifiers: [("dns", "a.example.org")])
            let finalize = orderURL + "/finalize"
            #expect(try await client.post(finalize, ["csr": try Self.csrDER(key, dns: ["b.example.org"])]).problem == "badCSR")
            #expect(try await client.post(finalize, ["csr": try Self.csrDER(key, dns: ["a.example.org", "b.example.org"])]).problem == "badCSR")
            #expect(try await client.post(finalize, ["csr": try Self.csrDER(key, dns: ["a.example.org"], cn: "other.example.org")]).problem == "badCSR")
            #expect(try await client.post(finalize, ["csr": "AAAA"]).problem == "badCSR")
            #expect(try await client.post(finalize, ["csr": "not base64url!"]).problem == "malformed")

            let csr = try Self.csrDER(key, dns: ["a.example.org"], cn: "a.example.org")
            let racer = client
            async let first = racer.post(finalize, ["csr": csr])
            async let second = racer.post(finalize, ["csr": csr])
            let outcomes = try await [first, second]
            #expect(outcomes.filter { $0.status == 200 }.count == 1)
            #expect(outcomes.filter { $0.problem == "orderNotReady" }.count == 1)
            let issued = try await setup.authority.store.certificates(CertificateFilter(now: Date())).filter { $0.profile == "server" }
            #expect(issued.count == 1)
        }
    }

    @Test("revokeCert: by the account that got it or with the certificate's key; another account is refused; twice gives alreadyRevoked; reason 2 badRevocationReason")
    func revocation() async throws {
        try await Self.withService { setup in
            var client = TestACMEClient(service: setup.service)
            _ = try await client.register()
            var stranger = TestACMEClient(service: setup.service)
            _ = try await stranger.register()
            var certificates: [Certificate] = []
            var keys: [P256.Signing.PrivateKey] = []
            for name in ["one.example.org", "two.example.org"] {
                let orderURL = try await Self.validOrder(client, setup, identifiers: [("dns", name)])
                let key = P256.Signing.PrivateKey()
                let done = try await client.post(orderURL + "/finalize", ["csr": try Self.csrDER(.init(key), dns: [name])])
                let pem = try await client.post(done.json["certificate"] as! String, nil)
                certificates.append(try PEMBundle.certificates(fromPEM: String(decoding: pem.body, as: UTF8.self))[0])
                keys.append(key)
            }
            let der = { (c: Certificate) in Base64URL.encode(Data(try c.derBytes)) }
            #expect(try await stranger.post("revoke-cert", ["certificate": try der(certificates[0])]).problem == "unauthorized")
            #expect(try await client.post("revoke-cert", ["certificate": try der(certificates[0]), "reason": 2]).problem == "badRevocationReason")
            #expect(try await client.post("revoke-cert", ["certificate": try der(certificates[0]), "reason": 4]).status == 200)
            #expect(try await client.post("revoke-cert", ["certificate": try der(certificates[0])]).problem == "alreadyRevoked")
            // Signed with the certificate's own key (a jwk request, no account).
            let holder = TestACMEClient(service: setup.service, key: .p256(keys[1]))
            #expect(try await holder.post("revoke-cert", ["certificate": try der(certificates[1]), "reason": 1], useJWK: true).status == 200)
            let record = try await setup.authority.store.certificate(serial: certificates[1].serialHex)
            #expect(record?.status == .revoked && record?.revocationReason == "keyCompromise")
            #expect(try await client.post("revoke-cert", ["certificate": "AAAA"]).problem == "malformed")
        }
    }

    @Test("accounts: deactivation stops the account; a contact that is not mailto is refused; onlyReturnExisting finds nothing for a new key")
    func accounts() async throws {
        try await Self.withService { setup in
            var client = TestACMEClient(service: setup.service)
            let none = try await client.post("new-account", ["onlyReturnExisting": true], useJWK: true)
            #expect(none.problem == "accountDoesNotExist")
            #expect(try await client.post("new-account", ["contact": ["tel:+1555"]], useJWK: true).problem == "unsupportedContact")
            #expect(try await client.post("new-account", ["contact": ["mailto:a@b@c"]], useJWK: true).problem == "invalidContact")
            _ = try await client.register()
            let updated = try await client.post(client.kid!, ["contact": ["mailto:new@example.org"]])
            #expect((updated.json["contact"] as? [String]) == ["mailto:new@example.org"])
            #expect(try await client.post(client.kid!, ["status": "deactivated"]).json["status"] as? String == "deactivated")
            #expect(try await client.post(client.kid!, nil).problem == "unauthorized")
            #expect(try await client.post("new-account", ["termsOfServiceAgreed": true], useJWK: true).problem == "unauthorized")
        }
    }

    @Test("a validation that died with its process is failed once the deadline passes, not left pending")
    func interruptedValidation() async throws {
        let clock = Mutex(Date())
        try await Self.withService(clock: { clock.withLock { $0 } }) { setup in
            var client = TestACMEClient(service: setup.service)
            _ = try await client.register()
            let order = try await client.post("new-order", ["identifiers": [["type": "dns", "value": "lost.example.org"]]])
            let authzURL = (order.json["authorizations"] as! [String])[0]
            // Simulate a process that started validating and died: the stored authorization says "validating".
            let id = String(authzURL.split(separator: "/").last!)
            let row = try #require(try await setup.authority.store.acmeAuthorization(id: id))
            var authorization = try ACMEService.decode(ACMEAuthorization.self, row.body)
            authorization.challenges[0].status = "processing"
            authorization.challenges[0].validated = clock.withLock { $0 }
            try await setup.authority.store.acme([.updateAuthorization(ACMERow(id: id, status: "validating", body: try ACMEService.encode(authorization)), from: ["pending"])])
            #expect(try await client.post(authzURL, nil).json["status"] as? String == "pending")
            clock.withLock { $0 = $0.addingTimeInterval(ACMEService.validationDeadline + 1) }
            let later = try await client.post(authzURL, nil)
            #expect(later.json["status"] as? String == "invalid")
            #expect(try await client.post(order.header("location")!, nil).json["status"] as? String == "invalid")
            let audited = try await setup.authority.store.auditEvents(limit: 100).filter { $0.action == "acme-authorization" && $0.subject == id }
            #expect(audited.count == 1, "the failure of the interrupted validation is in the audit trail")
        }
    }

    static func date(_ text: String) -> Date? {
        let formatter = ISO8601DateFormatter()
        formatter.formatOptions = [.withInternetDateTime, .withFractionalSeconds]
        return formatter.date(from: text)
    }

    /// Issues one certificate for `name` through `client`'s account; returns it.
    static func issue(_ client: TestACMEClient, _ setup: Setup, name: String, replaces: String? = nil, profile: String? = nil) async throws -> Certificate {
        var payload: [String: Any] = ["identifiers": [["type": "dns", "value": name]]]
        if let profile { payload["profile"] = profile }
        if let replaces { payload["replaces"] = replaces }
        let order = try await client.post("new-order", payload)
        #expect(order.status == 201, "\(String(decoding: order.body, as: UTF8.self))")
        for authzURL in order.json["authorizations"] as? [String] ?? [] {
            let authz = try await client.post(authzURL, nil)
            let challenge = (authz.json["challenges"] as! [[String: Any]])[0]
            let thumbprint = try ACMEAccountKey(jwk: client.jwk).thumbprint
            setup.validator.served.withLock { $0[name] = "\(challenge["token"] as! String).\(thumbprint)" }
            _ = try await client.post(challenge["url"] as! String, [String: Any]())
        }
        await setup.service.waitForValidations()
        let done = try await client.post(order.header("location")! + "/finalize", ["csr": try csrDER(try KeyType.p256.generate(), dns: [name])])
        let pem = try await client.post(try #require(done.json["certificate"] as? String), nil)
        return try PEMBundle.certificates(fromPEM: String(decoding: pem.body, as: UTF8.self))[0]
    }

    @Test("ARI: renewal-info gives a window late in the lifetime, in the past once revoked; replaces links the new certificate to the old in the inventory, once")
    func renewalInformation() async throws {
        try await Self.withService { setup in
            var client = TestACMEClient(service: setup.service)
            _ = try await client.register()
            let directory = await client.raw("directory", Data(), contentType: "", method: "GET")
            #expect(directory.json["renewalInfo"] as? String == TestACMEClient.base + "/acme/test/renewal-info")
            let old = try await Self.issue(client, setup, name: "ari.example.org")
            let certID = try #require(ACMERenewalInfo.certID(old))
            let info = await client.raw("renewal-info/" + certID, Data(), contentType: "", method: "GET")
            #expect(info.status == 200)
            let window = try #require(info.json["suggestedWindow"] as? [String: String])
            let start = try #require(Self.date( window["start"]!)), end = try #require(Self.date( window["end"]!))
            let lifetime = old.notValidAfter.timeIntervalSince(old.notValidBefore)
            #expect(start > old.notValidBefore.addingTimeInterval(lifetime / 2) && end < old.notValidAfter && start < end)
            #expect(info.header("retry-after").flatMap(Int.init) != nil)
            #expect(await client.raw("renewal-info/AAAA", Data(), contentType: "", method: "GET").problem == "malformed")
            #expect(await client.raw("renewal-info/AAAA.AAAA", Data(), contentType: "", method: "GET").status == 404)

            var stranger = TestACMEClient(service: setup.service)
            _ = try await stranger.register()
            #expect(try await stranger.post("new-order", ["identifiers": [["type": "dns", "value": "ari.example.org"]], "replaces": certID]).problem == "malformed")
            let renewed = try await Self.issue(client, setup, name: "ari.example.org", replaces: certID)
            let successors = try await setup.authority.store.successors(of: old.serialHex).map(\.serial)
            #expect(successors == [renewed.serialHex], "the replacement is the old certificate's successor")
            #expect(try await client.post("new-order", ["identifiers": [["type": "dns", "value": "ari.example.org"]], "replaces": certID]).problem == "alreadyReplaced")

            _ = try await setup.authority.revoke(serial: renewed.serialHex, reason: .keyCompromise, actor: "test")
            let revoked = await client.raw("renewal-info/" + ACMERenewalInfo.certID(renewed)!, Data(), contentType: "", method: "GET")
            let revokedEnd = Self.date( (revoked.json["suggestedWindow"] as! [String: String])["end"]!)!
            #expect(revokedEnd < Date(), "a revoked certificate's window is already past: renew now")
        }
    }

    @Test("keyChange: the account moves to the new key (the old one no longer signs for it); a key of another account is a 409 naming it; a forged inner JWS is refused")
    func keyRollover() async throws {
        try await Self.withService { setup in
            var client = TestACMEClient(service: setup.service)
            _ = try await client.register()
            var other = TestACMEClient(service: setup.service)
            _ = try await other.register()
            var next = TestACMEClient(service: setup.service)
            next.kid = client.kid
            func inner(_ signer: TestACMEClient, account: String, oldKey: [String: Any]) throws -> Any {
                let body = try signer.jws("key-change", payload: ["account": account, "oldKey": oldKey], nonce: "", useJWK: true) { $0["nonce"] = nil }
                return try JSONSerialization.jsonObject(with: body)
            }
            // The new key belongs to another account: 409 with its location.
            let taken = try await client.post("key-change", try inner(other, account: client.kid!, oldKey: client.jwk))
            #expect(taken.status == 409 && taken.header("location") == other.kid)
            // oldKey that is not the account's key; account URL of someone else.
            #expect(try await client.post("key-change", try inner(next, account: client.kid!, oldKey: other.jwk)).problem == "malformed")
            #expect(try await client.post("key-change", try inner(next, account: other.kid!, oldKey: client.jwk)).problem == "malformed")
            let changed = try await client.post("key-change", try inner(next, account: client.kid!, oldKey: client.jwk))
            #expect(changed.status == 200, "\(String(decoding: changed.body, as: UTF8.self))")
            #expect(try await client.post(client.kid!, nil).problem == "malformed", "the old key no longer verifies")
            #expect(try await next.post(client.kid!, nil).status == 200, "the new key signs for the account")
            let found = try await next.post("new-account", ["onlyReturnExisting": true], useJWK: true)
            #expect(found.header("location") == client.kid)
            #expect(try await setup.authority.store.auditEvents(limit: 50).contains { $0.action == "acme-key-change" })
        }
    }

    /// An externalAccountBinding JWS over `client`'s key, MACed with `key` (base64url) under `kid`.
    static func binding(_ client: TestACMEClient, kid: String, key: String, alg: String = "HS256", url: String? = nil, jwk: [String: Any]? = nil) throws -> [String: Any] {
        let protected64 = Base64URL.encode(try JSONSerialization.data(withJSONObject: ["alg": alg, "kid": kid, "url": url ?? TestACMEClient.base + "/acme/test/new-account"]))
        let payload64 = Base64URL.encode(try JSONSerialization.data(withJSONObject: jwk ?? client.jwk))
        let mac = HMAC<SHA256>.authenticationCode(for: Data((protected64 + "." + payload64).utf8), using: SymmetricKey(data: Base64URL.decode(key)!))
        return ["protected": protected64, "payload": payload64, "signature": Base64URL.encode(Data(mac))]
    }

    @Test("External Account Binding: required when configured; a wrong MAC, another key's binding, a wrong url or a used key are refused; the team owns the account's certificates")
    func externalAccountBinding() async throws {
        try await Self.withService(requireEAB: true) { setup in
            let directory = await TestACMEClient(service: setup.service).raw("directory", Data(), contentType: "", method: "GET")
            #expect((directory.json["meta"] as? [String: Any])?["externalAccountRequired"] as? Bool == true)
            let eab = try await ACMEService.createEABKey(store: setup.authority.store, provisioner: "test", owner: "team-payments", actor: "test")
            var client = TestACMEClient(service: setup.service)
            #expect(try await client.post("new-account", ["termsOfServiceAgreed": true], useJWK: true).problem == "externalAccountRequired")
            let wrongKey = Base64URL.encode(SymmetricKey(size: .bits256).withUnsafeBytes { Data($0) })
            #expect(try await client.post("new-account", ["externalAccountBinding": try Self.binding(client, kid: eab.kid, key: wrongKey)], useJWK: true).problem == "unauthorized")
            #expect(try await client.post("new-account", ["externalAccountBinding": try Self.binding(client, kid: "unknown", key: eab.hmacKey)], useJWK: true).problem == "unauthorized")
            let other = TestACMEClient(service: setup.service)
            #expect(try await client.post("new-account", ["externalAccountBinding": try Self.binding(client, kid: eab.kid, key: eab.hmacKey, jwk: other.jwk)], useJWK: true).problem == "malformed")
            #expect(try await client.post("new-account", ["externalAccountBinding": try Self.binding(client, kid: eab.kid, key: eab.hmacKey, url: "https://elsewhere/new-account")], useJWK: true).problem == "malformed")
            #expect(try await client.post("new-account", ["externalAccountBinding": try Self.binding(client, kid: eab.kid, key: eab.hmacKey, alg: "none")], useJWK: true).problem == "badSignatureAlgorithm")
            #expect(try await client.post("new-account", ["externalAccountBinding": "garbage"], useJWK: true).problem == "malformed")
            let bound = try await client.post("new-account", ["externalAccountBinding": try Self.binding(client, kid: eab.kid, key: eab.hmacKey)], useJWK: true)
            #expect(bound.status == 201, "\(String(decoding: bound.body, as: UTF8.self))")
            client.kid = bound.header("location")
            #expect(try await setup.authority.store.acmeEABKey(kid: eab.kid)?.accountID == String(client.kid!.split(separator: "/").last!))
            // The key binds one account only.
            #expect(try await other.post("new-account", ["externalAccountBinding": try Self.binding(other, kid: eab.kid, key: eab.hmacKey)], useJWK: true).problem == "unauthorized")
            let certificate = try await Self.issue(client, setup, name: "pay.example.org")
            #expect(try await setup.authority.store.certificate(serial: certificate.serialHex)?.owner == "team-payments")
            // A second key of the same team binds a second account: same owner, but it did not obtain the certificate.
            let second = try await ACMEService.createEABKey(store: setup.authority.store, provisioner: "test", owner: "team-payments", actor: "test")
            var teammate = TestACMEClient(service: setup.service)
            let created = try await teammate.post("new-account", ["externalAccountBinding": try Self.binding(teammate, kid: second.kid, key: second.hmacKey)], useJWK: true)
            teammate.kid = created.header("location")
            let der = Base64URL.encode(Data(try certificate.derBytes))
            #expect(try await teammate.post("revoke-cert", ["certificate": der]).problem == "unauthorized")
            #expect(try await client.post("revoke-cert", ["certificate": der]).status == 200)
        }
    }

    @Test("wildcards: refused without dns-01; with it, the authorization is for the base name, marked wildcard, with dns-01 only, and the certificate names *.name")
    func wildcards() async throws {
        try await Self.withService { setup in
            var client = TestACMEClient(service: setup.service)
            _ = try await client.register()
            #expect(try await client.post("new-order", ["identifiers": [["type": "dns", "value": "*.wild.example.org"]]]).problem == "rejectedIdentifier")
        }
        try await Self.withService(dnsResolver: "127.0.0.1:53") { setup in
            var client = TestACMEClient(service: setup.service)
            _ = try await client.register()
            let order = try await client.post("new-order", ["identifiers": [["type": "dns", "value": "*.wild.example.org"], ["type": "dns", "value": "plain.example.org"]]])
            #expect(order.status == 201)
            var types: [String: [String]] = [:]
            for url in order.json["authorizations"] as! [String] {
                let authz = try await client.post(url, nil)
                let value = (authz.json["identifier"] as! [String: String])["value"]!
                types[value] = (authz.json["challenges"] as! [[String: Any]]).map { $0["type"] as! String }
                if value == "wild.example.org" { #expect(authz.json["wildcard"] as? Bool == true) }
                let challenge = (authz.json["challenges"] as! [[String: Any]]).first { $0["type"] as? String == "dns-01" }!
                let thumbprint = try ACMEAccountKey(jwk: client.jwk).thumbprint
                setup.validator.served.withLock { $0[value] = "\(challenge["token"] as! String).\(thumbprint)" }
                _ = try await client.post(challenge["url"] as! String, [String: Any]())
            }
            #expect(types["wild.example.org"] == ["dns-01"])
            #expect(types["plain.example.org"] == ["http-01", "tls-alpn-01", "dns-01"])
            await setup.service.waitForValidations()
            let done = try await client.post(order.header("location")! + "/finalize", ["csr": try Self.csrDER(try KeyType.p256.generate(), dns: ["*.wild.example.org", "plain.example.org"])])
            #expect(done.json["status"] as? String == "valid", "\(String(decoding: done.body, as: UTF8.self))")
            let pem = try await client.post(done.json["certificate"] as! String, nil)
            let certificate = try PEMBundle.certificates(fromPEM: String(decoding: pem.body, as: UTF8.self))[0]
            let names = try certificate.extensions.subjectAlternativeNames.map { Array($0) } ?? []
            #expect(names.contains(.dnsName("*.wild.example.org")))
        }
    }

    @Test("rate limits: orders per account and certificates per identifier per hour give rateLimited (429) with Retry-After; other accounts and names go on")
    func rateLimits() async throws {
        try await Self.withService(limits: (orders: 3, perIdentifier: 1)) { setup in
            var client = TestACMEClient(service: setup.service)
            _ = try await client.register()
            _ = try await Self.issue(client, setup, name: "once.example.org")
            let again = try await client.post("new-order", ["identifiers": [["type": "dns", "value": "once.example.org"]]])
            #expect(again.problem == "rateLimited" && again.status == 429)
            #expect((again.header("retry-after").flatMap(Int.init) ?? 0) > 3000, "the certificate leaves the window in about an hour")
            #expect(try await client.post("new-order", ["identifiers": [["type": "dns", "value": "two.example.org"]]]).status == 201)
            #expect(try await client.post("new-order", ["identifiers": [["type": "dns", "value": "three.example.org"]]]).status == 201)
            let fourth = try await client.post("new-order", ["identifiers": [["type": "dns", "value": "four.example.org"]]])
            #expect(fourth.problem == "rateLimited" && fourth.header("retry-after") != nil)
            var other = TestACMEClient(service: setup.service)
            _ = try await other.register()
            #expect(try await other.post("new-order", ["identifiers": [["type": "dns", "value": "four.example.org"]]]).status == 201)
        }
    }

    @Test("profiles: the directory lists the provisioner's; an order names one (client gets clientAuth) or gets the first; others are invalidProfile")
    func orderProfiles() async throws {
        try await Self.withService(profiles: [.server, .client]) { setup in
            var client = TestACMEClient(service: setup.service)
            _ = try await client.register()
            let directory = await client.raw("directory", Data(), contentType: "", method: "GET")
            #expect(((directory.json["meta"] as? [String: Any])?["profiles"] as? [String: String]).map { Set($0.keys) } == ["server", "client"])
            let forClient = try await Self.issue(client, setup, name: "device.example.org", profile: "client")
            #expect(try forClient.extensions.extendedKeyUsage.map(Array.init) == [.clientAuth])
            let byDefault = try await Self.issue(client, setup, name: "web.example.org")
            #expect(try byDefault.extensions.extendedKeyUsage.map(Array.init) == [.serverAuth])
            #expect(try await client.post("new-order", ["identifiers": [["type": "dns", "value": "x.example.org"]], "profile": "admin"]).problem == "invalidProfile")
            #expect(try await setup.authority.store.certificate(serial: forClient.serialHex)?.profile == "client")
        }
    }

    @Test("JWK parsing refuses private keys, points off the curve, unknown types; the RFC 7638 thumbprint matches the RFC's example")
    func jwkParsing() throws {
        // RFC 7638 section 3.1's example key and thumbprint.
        let rfc: [String: Any] = [
            "kty": "RSA", "e": "AQAB", "alg": "RS256", "kid": "2011-04-29",
            "n": "0vx7agoebGcQSuuPiLJXZptN9nndrQmbXEps2aiAFbWhM78LhWx4cbbfAAtVT86zwu1RK7aPFFxuhDR1L6tSoc_BJECPebWKRXjBZCiFV4n3oknjhMstn64tZ_2W-5JsGY4Hc5n9yBXArwl93lqt7_RN5w6Cf0h4QyQ5v-65YGjQR0_FDW2QvzqY368QQMicAtaSqzs8KJZgnYb9c7d0zgdAZHzu6qMQvRL5hajrn1n91CbOpbISD08qNLyrdkt-bFTWhAI4vMQFh6WeZu0fM4lFd2NcRwr3XPksINHaQ-G_xBniIqbw0Ls1jF44-csFCur-kEgU8awapJzKnqDKgw",
        ]
        #expect(try ACMEAccountKey(jwk: rfc).thumbprint == "NzbLsXh8uDCcd-6MNwXF4W_7noWXFZAfHkxZsRGC9Xs")
        #expect(throws: ACMEProblem.self) { try ACMEAccountKey(jwk: rfc.merging(["d": "AAAA"]) { $1 }) }
        #expect(throws: ACMEProblem.self) { try ACMEAccountKey(jwk: ["kty": "EC", "crv": "P-256", "x": Base64URL.encode(Data(repeating: 1, count: 32)), "y": Base64URL.encode(Data(repeating: 2, count: 32))]) }
        #expect(throws: ACMEProblem.self) { try ACMEAccountKey(jwk: ["kty": "oct", "k": "AAAA"]) }
        #expect(throws: ACMEProblem.self) { try ACMEAccountKey(jwk: ["kty": "EC", "crv": "P-521", "x": "AA", "y": "AA"]) }
        #expect(Base64URL.decode("a+b/") == nil && Base64URL.decode("ab=") == nil && Base64URL.decode("a") == nil)
    }
}
