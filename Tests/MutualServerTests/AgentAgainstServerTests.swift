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

    @Test("an agent holding a server certificate (no clientAuth) renews it before expiry by proof of possession; the authority's TLS never sees it as a client")
    func serverCertificateRenews() async throws {
        let server = try await ServerHarness.start()
        let dir = TestPKI.temporaryDirectory("agent-server")
        defer { try? FileManager.default.removeItem(atPath: dir) }
        do {
            // Enrolled like the README's nginx host: a server-profile token, a DNS identity.
            let token = try await server.token(scopes: ["web.example.org"], profile: .server)
            var configuration = try Agent.Configuration(
                authority: server.baseURL, rootFingerprint: try Authority.fingerprint(server.root), token: token.token,
                identity: "web.example.org", outDir: dir + "/out", validity: .hours(1), profile: "server"
            )
            configuration.requestTimeout = .seconds(10)
            let enrolling = Agent(configuration: configuration, clock: FixedClock(now: .now), logger: Logger(label: "test"), random: { 0 })
            guard case .enrolled(let enrolledSerial) = await enrolling.step() else {
                Issue.record("enrollment failed: \(enrolling.currentStatus.lastError ?? "-")")
                await server.stop()
                return
            }
            let enrolled = try #require(try Delivery.read(outDir: dir + "/out"))
            #expect(try enrolled.leaf.extensions.extendedKeyUsage.map(Array.init) == [.serverAuth], "a server-only certificate")

            // Renewal comes due (an early renewal point stands in for time passing; the authority keeps real time).
            configuration.schedule = RenewalSchedule(fraction: 0.01, jitter: 0)
            try FileManager.default.removeItem(atPath: AgentStatus.path(outDir: dir + "/out"))
            let later = Agent(configuration: configuration, clock: FixedClock(now: Date.now.addingTimeInterval(5)), logger: Logger(label: "test"), random: { 0 })
            let outcome = await later.step()
            guard case .renewed(let serial) = outcome else {
                Issue.record("expected a renewal, got \(outcome); status: \(later.currentStatus.lastError ?? "-")")
                await server.stop()
                return
            }
            let first = enrolledSerial
            #expect(serial != first)
            let record = try #require(try await server.authority.store.certificate(serial: serial))
            #expect(record.requester == "cert:\(first)" && record.identity == "web.example.org" && record.profile == "server")
            let delivered = try #require(try Delivery.read(outDir: dir + "/out"))
            #expect(delivered.leaf.serialHex == serial && delivered.leaf.publicKey != enrolled.leaf.publicKey)
            let event = try await server.authority.store.auditEvents().last
            #expect(event?.action == "renew" && event?.details.contains("\"method\":\"proof\"") == true)
        } catch {
            await server.stop()
            throw error
        }
        await server.stop()
    }

    @Test("enrollment refuses, before delivering, a certificate the agent could not renew (no clientAuth, no proof renewal offered)")
    func unrenewableRefused() throws {
        let ca = try TestPKI.issuingCA(now: .now)
        let key = try KeyType.p256.generate()
        let server = try ca.issue(.init(profile: .server, publicKey: key.publicKey, dnsNames: ["web.example.org"]), now: .now)
        let workload = try ca.issue(.init(profile: .workload, publicKey: key.publicKey, uris: ["spiffe://example.org/web"]), now: .now)
        let make = { (certificate: Certificate, renewal: String?) in
            Enrollment(certificate: certificate, chain: [certificate], serial: certificate.serialHex, notAfter: certificate.notValidAfter, renewal: renewal, serverDate: nil)
        }
        #expect(throws: AgentError.self) { try Agent.checkRenewable(make(server, nil)) }
        #expect(throws: AgentError.self) { try Agent.checkRenewable(make(server, "mtls")) }
        try Agent.checkRenewable(make(server, "proof"))
        try Agent.checkRenewable(make(workload, nil))
    }

    @Test("an expired certificate on an authority without renew-expired: the agent stops and says what to do once, not twice")
    func refusalSaidOnce() async throws {
        let server = try await ServerHarness.start()
        let dir = TestPKI.temporaryDirectory("agent-once")
        defer { try? FileManager.default.removeItem(atPath: dir) }
        do {
            let key = try KeyType.p256.generate()
            let uri = "spiffe://example.org/ns/web/sa/once"
            let old = try await server.authority.issue(
                .init(profile: .workload, publicKey: key.publicKey, uris: [uri], validity: .hours(1)),
                owner: "test", requester: "test", now: Date.now.addingTimeInterval(-7200)
            )
            try Delivery.deliver(outDir: dir + "/out", key: key, chain: old.chain, roots: [server.root])
            var configuration = try Agent.Configuration(
                authority: server.baseURL, rootFingerprint: try Authority.fingerprint(server.root), token: nil, identity: uri, outDir: dir + "/out"
            )
            configuration.requestTimeout = .seconds(10)
            let agent = Agent(configuration: configuration, clock: FixedClock(now: .now), logger: Logger(label: "test"), random: { 0 })
            guard case .stopped(let reason) = await agent.step() else {
                Issue.record("expected the agent to stop")
                await server.stop()
                return
            }
            #expect(reason.components(separatedBy: "a new token is needed").count == 2, "said exactly once: \(reason)")
        } catch {
            await server.stop()
            throw error
        }
        await server.stop()
    }
}
