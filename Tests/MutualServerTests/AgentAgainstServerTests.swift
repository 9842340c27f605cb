import Foundation
import Logging
import MutualAuthority
import MutualClient
@testable import MutualAgent
import MutualPKI
import Testing
import TestSupport
import X509

/// The agent's view of time, held where the test puts it, while the authority uses the real clock.
struct FixedClock: AgentClock {
    let now: Date
    func sleep(until deadline: Date) async throws { try Task.checkCancellation() }
}

@Suite("The agent against a real authority")
struct AgentAgainstServerTests {
    @Test("host clock behind the authority's: the TLS layer refuses the expired certificate and the same step renews it through renew-expired")
    func clockBehind() async throws {
        let server = try await ServerHarness.start(renewExpiredGrace: .hours(1))
        let dir = TestPKI.temporaryDirectory("agent-late")
        defer { try? FileManager.default.removeItem(atPath: dir) }
        do {
            let key = try KeyType.p256.generate()
            let uri = "spiffe://example.org/ns/web/sa/late"
            // Issued an hour and 20 s ago for one hour: expired 20 s ago by the authority's clock.
            let old = try await server.authority.issue(
                .init(profile: .workload, publicKey: key.publicKey, uris: [uri], validity: .hours(1)),
                owner: "test", requester: "test", now: Date.now.addingTimeInterval(-3620)
            )
            try Delivery.deliver(outDir: dir + "/out", key: key, chain: old.chain, roots: [server.root])
            var configuration = try Agent.Configuration(
                authority: server.baseURL, rootFingerprint: try Authority.fingerprint(server.root), token: nil, identity: uri,
                outDir: dir + "/out"
            )
            configuration.requestTimeout = .seconds(10)
            // This host's clock is 30 s behind: the certificate is still valid for it, and past its renewal time.
            let clock = FixedClock(now: old.certificate.notValidAfter.addingTimeInterval(-10))
            let agent = Agent(configuration: configuration, clock: clock, logger: Logger(label: "test"), random: { 0 })

            let outcome = await agent.step()
            guard case .renewed(let serial) = outcome else {
                Issue.record("expected a renewal through renew-expired in the same step, got \(outcome)")
                await server.stop()
                return
            }
            let record = try await server.authority.store.certificate(serial: serial)
            #expect(record?.requester == "cert:\(old.record.serial)", "renewed by renew-expired, with proof of the old key")
            #expect(record?.identity == uri)
            let delivered = try Delivery.read(outDir: dir + "/out")
            #expect(delivered?.leaf.serialHex == serial)
            #expect(delivered?.leaf.publicKey != old.certificate.publicKey, "a new key")
            #expect(agent.currentStatus.state == "ok" && agent.currentStatus.consecutiveFailures == 0)
        } catch {
            await server.stop()
            throw error
        }
        await server.stop()
    }
}
