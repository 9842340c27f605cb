import Crypto
import Foundation
import MutualAuthority
import MutualClient
import MutualPKCS11
import MutualPKI
import TestSupport
import Testing
import X509

/// An authority whose CA keys live in a SoftHSM2 token, serving over real TLS on 127.0.0.1.
@Suite("Authority with its keys in a PKCS#11 token", .serialized)
struct PKCS11ServerTests {
    @Test func issuesThroughTheTokenAndTurnsUnreadyWhenItGoesAway() async throws {
        let hsm = SoftHSM.shared
        let label = try hsm.makeToken()
        let server = try await ServerHarness.start(keyStore: try PKCS11URI(hsm.uri(token: label, object: "issuing")))
        do {
            // The issuing key is the token's, and nothing else holds it.
            let tokenKey = try #require(PKCS11Key.holding(server.authority.ca.certificate.publicKey))
            #expect(tokenKey.uri.object == "issuing")
            #expect(!FileManager.default.fileExists(atPath: server.state.intermediateKeyPath))
            #expect(try await server.curl("/readyz").0 == 200)

            let token = try await server.token(scopes: ["spiffe://example.org/hsm/*"], uses: 5)
            let client = try server.client()
            defer { Task { try? await client.shutdown() } }
            let key = P256.Signing.PrivateKey()
            let enrollment = try await client.sign(
                csrPEM: try ServerHarness.csr(Certificate.PrivateKey(key), uri: "spiffe://example.org/hsm/a"), token: token.token
            )
            let leaf = try #require(enrollment.certificate.classical)
            #expect(server.authority.ca.certificate.publicKey.isValidSignature(leaf.signature, for: leaf))

            // The token goes away: readiness names why, issuance is refused with the token's code (not a 500).
            let directory = try #require(hsm.tokenDirectory(label: label))
            try FileManager.default.moveItem(atPath: directory, toPath: directory + ".away")
            defer { try? FileManager.default.moveItem(atPath: directory + ".away", toPath: directory) }
            try await Task.sleep(for: .milliseconds(1100))  // past the readiness probe's one-second cache
            let (status, body) = try await server.curl("/readyz")
            #expect(status == 503)
            let problem = ServerHarness.json(body)
            #expect(problem["type"] as? String == "urn:mutual:problem:signing-key-unavailable")
            #expect(problem["key_error"] as? String == "pkcs11-token-removed")
            let refused = await #expect(throws: AuthorityClientError.self) {
                _ = try await client.sign(
                    csrPEM: try ServerHarness.csr(Certificate.PrivateKey(P256.Signing.PrivateKey()), uri: "spiffe://example.org/hsm/b"),
                    token: token.token
                )
            }
            #expect(refused?.status == 503)
            #expect(refused?.code == "pkcs11-token-removed")
        }
        await server.stop()
    }
}

/// The generation CRL route (`/crl/gN`) with what a client could send instead of a generation.
@Suite("Generation CRL routes")
struct GenerationCRLRouteTests {
    @Test func answersCurrentGenerationsAndRefusesTheRest() async throws {
        let server = try await ServerHarness.start()
        do {
            // (The DER form is fetched by scripts/interop-rotation.sh: this harness reads answers as text.)
            let (okPEM, pem) = try await server.curl("/crl/g1.pem")
            #expect(okPEM == 200 && pem.contains("BEGIN X509 CRL"))
            for path in ["/crl/g", "/crl/x1", "/crl/g1x", "/crl/g-1", "/crl/g0", "/crl/g99999999999999999999", "/crl/g1.pem.pem",
                         "/crl/g01", "/crl/g2", "/crl/G1", "/crl/g1.der"] {
                let (status, body) = try await server.curl(path)
                #expect(status == 404, "\(path): \(status)")
                #expect(ServerHarness.json(body)["type"] as? String == "urn:mutual:problem:not-found", "\(path): \(body.prefix(120))")
            }
            // After a rotation the replaced generation answers until it is retired.
            _ = try await server.authority.prepareRotation(.intermediate, passphrase: { nil }, actor: "test")
            _ = try await server.authority.activateRotation(.intermediate, passphrase: { nil }, actor: "test")
            #expect(try await server.curl("/crl/g1.pem").0 == 200)
            #expect(try await server.curl("/crl/g2.pem").0 == 200)
            #expect(try await server.curl("/crl/g3.pem").0 == 404)
        } catch {
            Issue.record("\(error)")
        }
        await server.stop()
    }
}
