import Foundation
import Logging
import MutualAuthority
import MutualClient
@testable import MutualAgent
import MutualPKI
import MutualStore
import Testing
import TestSupport
import X509

@Suite("Moving an identity to ML-DSA: the authority asks at renewal, the agent answers with an ML-DSA key (real TLS)")
struct PQMigrationTests {
    @Test("classical identity under `pq migrate`: refused with key-type-required, renewed in the same step with ML-DSA-65; the ML-DSA certificate renews over mTLS")
    func migrateAtRenewal() async throws {
        let server = try await ServerHarness.start(pq: .mlDSA65)
        let dir = TestPKI.temporaryDirectory("agent-pq")
        defer { try? FileManager.default.removeItem(atPath: dir) }
        do {
            let uri = "spiffe://example.org/ns/web/sa/api"
            let key = try KeyType.p256.generate()
            // Issued 50 minutes ago for an hour: past two thirds of its life, still valid.
            let old = try await server.authority.issue(
                .init(profile: .workload, publicKey: key.publicKey, uris: [uri], validity: .hours(1)),
                owner: "web", requester: "test", now: Date.now.addingTimeInterval(-3000)
            )
            try Delivery.deliver(outDir: dir + "/out", key: key, chain: old.chain, roots: [server.root])
            var configuration = try Agent.Configuration(
                authority: server.baseURL, rootFingerprint: try Authority.fingerprint(server.root), token: nil, identity: uri,
                outDir: dir + "/out"
            )
            configuration.requestTimeout = .seconds(10)
            let agent = Agent(configuration: configuration, clock: FixedClock(now: Date()), logger: Logger(label: "test"), random: { 0 })

            // The operator moves every web identity; the agent was started with --key-type p256 (the default).
            let migration = try await server.authority.updateMigration(adding: ["spiffe://example.org/ns/web/*"], removing: [], keyType: nil, actor: "test")
            #expect(migration.keyType == .mlDSA65)
            let outcome = await agent.step()
            guard case .renewed(let serial) = outcome else {
                Issue.record("expected the renewal to move to ML-DSA in one step, got \(outcome)")
                await server.stop()
                return
            }
            let delivered = try #require(try Delivery.read(outDir: dir + "/out"))
            #expect(delivered.leaf.serialHex == serial)
            #expect(delivered.leaf.keyAlgorithm == "ML-DSA-65")
            guard case .mldsa = delivered.key else {
                Issue.record("the delivered key is not ML-DSA")
                await server.stop()
                return
            }
            #expect(delivered.key.matches(delivered.leaf))
            #expect(delivered.roots.map(\.keyAlgorithm).sorted() == ["ML-DSA-65", "P-256"], "the bundle carries both roots")
            #expect(agent.keyChoice == .mldsa(.mlDSA65))
            let record = try #require(try await server.authority.store.certificate(serial: serial))
            #expect(record.identity == uri && record.owner == "web" && record.requester == "cert:\(old.record.serial)")
            let events = try await server.authority.store.auditEvents()
            #expect(events.contains { $0.action == "refused" && $0.subject == "key-type-required" })
            #expect(events.last?.action == "renew")

            // The ML-DSA certificate is a TLS client credential for the authority: renew over mTLS with it.
            let client = try AuthorityClient(baseURL: server.baseURL, trustRoots: delivered.roots, anyIdentity: (delivered.chain, delivered.key))
            let next = try AnySigningKey.mldsa(try MLDSASigningKey(generating: .mlDSA65))
            let csr = try next.certificationRequest(subject: DistinguishedName(), names: [.uniformResourceIdentifier(uri)])
            let renewed = try await client.renew(csrPEM: csr.pem)
            #expect(renewed.certificate.keyAlgorithm == "ML-DSA-65" && next.matches(renewed.certificate))
            #expect(try await server.authority.store.certificate(serial: renewed.serial)?.requester == "cert:\(serial)")
            // Moving back is refused while the migration covers the identity.
            let classical = try AnySigningKey.classical(try KeyType.p256.generate()).certificationRequest(subject: DistinguishedName(), names: [.uniformResourceIdentifier(uri)])
            let refusal = await #expect(throws: AuthorityClientError.self) { _ = try await client.renew(csrPEM: classical.pem) }
            #expect(refusal?.code == "key-type-required" && refusal?.status == 409 && refusal?.members["key_type"] == "ml-dsa-65")
            try await client.shutdown()
        } catch {
            await server.stop()
            throw error
        }
        await server.stop()
    }

    @Test("a token that allows only ML-DSA-65 keys: a P-256 enrollment is refused with key-type-required, uses nothing, and the agent enrolls with ML-DSA-65")
    func tokenKeyTypes() async throws {
        let server = try await ServerHarness.start(pq: .mlDSA65)
        let dir = TestPKI.temporaryDirectory("agent-pq-token")
        defer { try? FileManager.default.removeItem(atPath: dir) }
        do {
            let tokens = TokenService(store: server.authority.store)
            let token = try await tokens.create(
                scopes: ["spiffe://example.org/ns/web/*"], profile: .workload, maxValidity: .hours(1), ttl: .hours(1), uses: 1,
                owner: "web", actor: "test", caMaximum: .days(90), keyTypes: [.mldsa(.mlDSA65)]
            )
            #expect(try await server.authority.store.token(id: token.record.id)?.keyTypes == ["ml-dsa-65"])
            let any = try await tokens.create(scopes: ["x.test"], profile: .server, maxValidity: .hours(1), ttl: .hours(1), uses: 1, owner: nil, actor: "test", caMaximum: .days(90))
            #expect(try await server.authority.store.token(id: any.record.id)?.keyTypes == nil)

            // By hand: refused by code with the key type to use, and the token's one use is still there.
            let client = try server.client()
            let uri = "spiffe://example.org/ns/web/sa/new"
            let classical = try AnySigningKey.classical(try KeyType.p256.generate()).certificationRequest(subject: DistinguishedName(), names: [.uniformResourceIdentifier(uri)])
            let refusal = await #expect(throws: AuthorityClientError.self) { _ = try await client.sign(csrPEM: classical.pem, token: token.token) }
            #expect(refusal?.code == "key-type-required" && refusal?.members["key_type"] == "ml-dsa-65")
            #expect(try await server.authority.store.token(id: token.record.id)?.usesConsumed == 0)
            try await client.shutdown()

            // The agent, started with the default P-256, answers the refusal and enrolls with ML-DSA-65.
            var configuration = try Agent.Configuration(
                authority: server.baseURL, rootFingerprint: try Authority.fingerprint(server.root), token: token.token, identity: uri,
                outDir: dir + "/out"
            )
            configuration.requestTimeout = .seconds(10)
            let agent = Agent(configuration: configuration, clock: FixedClock(now: Date()), logger: Logger(label: "test"), random: { 0 })
            let outcome = await agent.step()
            guard case .enrolled = outcome else {
                Issue.record("expected an ML-DSA enrollment, got \(outcome)")
                await server.stop()
                return
            }
            let delivered = try #require(try Delivery.read(outDir: dir + "/out"))
            #expect(delivered.leaf.keyAlgorithm == "ML-DSA-65" && delivered.key.matches(delivered.leaf))
            #expect(try await server.authority.store.token(id: token.record.id)?.usesConsumed == 1)
        } catch {
            await server.stop()
            throw error
        }
        await server.stop()
    }
}
