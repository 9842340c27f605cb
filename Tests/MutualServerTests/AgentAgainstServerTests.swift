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

/// A host clock at a fixed offset from the real one, which the test can step (NTP, a restored snapshot).
final class ShiftedClock: AgentClock, @unchecked Sendable {
    // @unchecked: `offset` is only changed by the test between agent steps.
    var offset: TimeInterval
    init(offset: TimeInterval) { self.offset = offset }
    var now: Date { Date().addingTimeInterval(offset) }
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
            #expect(delivered?.leaf.classical?.publicKey != old.certificate.publicKey, "a new key")
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
            #expect(delivered.leaf.serialHex == serial && delivered.leaf.subjectPublicKeyInfo != enrolled.leaf.subjectPublicKeyInfo)
            let event = try await server.authority.store.auditEvents().last
            #expect(event?.action == "renew" && event?.details.contains("\"method\":\"proof\"") == true)
            #expect(AgentStatus.read(outDir: dir + "/out")?.renewalMethod == "proof", "status says how it renews")
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
            Enrollment(certificate: .classical(certificate), chain: [.classical(certificate)], serial: certificate.serialHex, notAfter: certificate.notValidAfter, renewal: renewal, serverDate: nil)
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

    @Test("--crl-out: the CRLs of every level are fetched, checked, written atomically when they change, the hook runs; bad answers keep the file")
    func crlRefresher() async throws {
        let server = try await ServerHarness.start()
        let dir = TestPKI.temporaryDirectory("agent-crl")
        defer { try? FileManager.default.removeItem(atPath: dir) }
        do {
            let key = try KeyType.p256.generate()
            let issued = try await server.authority.issue(
                .init(profile: .server, publicKey: key.publicKey, dnsNames: ["web.example.org"]), owner: "test", requester: "test"
            )
            try Delivery.deliver(outDir: dir + "/out", key: key, chain: issued.chain, roots: [server.root])
            let marker = dir + "/reloads"
            let refresher = CRLRefresher(
                configuration: .init(authority: server.baseURL, outDir: dir + "/out", crlPath: dir + "/crls.pem", interval: .minutes(5),
                                     hook: ReloadHook(exec: "echo reload >> '\(marker)'")),
                clock: FixedClock(now: .now), logger: Logger(label: "test")
            )
            guard case .fresh(true, let nextUpdate, let next) = await refresher.refresh() else {
                Issue.record("first refresh did not write the file")
                await server.stop()
                return
            }
            #expect(next <= Date.now.addingTimeInterval(301) && next < nextUpdate, "refresh within the interval and before nextUpdate")
            let written = try String(contentsOfFile: dir + "/crls.pem", encoding: .utf8)
            #expect(written.components(separatedBy: "BEGIN X509 CRL").count == 3, "the root's CRL and the issuing CA's")
            guard case .fresh(false, _, _) = await refresher.refresh() else {
                Issue.record("an unchanged answer rewrote the file")
                await server.stop()
                return
            }
            #expect(try String(contentsOfFile: marker, encoding: .utf8) == "reload\n", "the hook ran once, for the change only")

            // A revocation changes the issuing CA's CRL: rewritten, hook again.
            let victim = try await server.authority.issue(.init(profile: .client, publicKey: key.publicKey, commonName: "victim"), owner: nil, requester: "test")
            _ = try await server.authority.revokeAndPublish(serial: victim.record.serial, reason: .keyCompromise, actor: "test",
                                                             publisher: RevocationPublisher(authority: server.authority))
            guard case .fresh(true, _, _) = await refresher.refresh() else {
                Issue.record("a revocation did not rewrite the file")
                await server.stop()
                return
            }
            let crls = try RevocationList.pemDocuments(try String(contentsOfFile: dir + "/crls.pem", encoding: .utf8)).map { try RevocationList(derEncoded: $0) }
            #expect(crls.contains { $0.entry(for: victim.certificate.serialNumber) != nil })
        } catch {
            await server.stop()
            throw error
        }
        await server.stop()
    }

    @Test("CRL answers that would break a server are refused: garbage, a foreign signer, an expired CRL, a missing level")
    func crlChecks() async throws {
        let ca = try TestPKI.issuingCA(now: .now)
        let other = try TestPKI.issuingCA(now: .now)
        let now = Date.now
        func crl(_ issuer: IssuingCA, nextUpdate: Date) throws -> String {
            let builder = RevocationListBuilder(issuer: issuer.certificate, issuerKey: issuer.privateKey)
            return RevocationListBuilder.pem(try builder.build(number: 1, thisUpdate: now.addingTimeInterval(-60), nextUpdate: nextUpdate, entries: []))
        }
        let issuers = [ca.root, ca.certificate]
        let good = try crl(ca, nextUpdate: now.addingTimeInterval(3600))
        // Garbage, an empty answer, a missing level (no root CRL): refused by PKIError.
        for bad in ["garbage", "", good] {
            #expect(throws: PKIError.self) { try CRLRefresher.check(Array(bad.utf8), issuers: issuers, now: now) }
        }
        // Only the issuing CA level is required when it is the only issuer given.
        #expect(try CRLRefresher.check(Array(good.utf8), issuers: [ca.certificate], now: now) <= now.addingTimeInterval(3600))
        let expired = try crl(ca, nextUpdate: now.addingTimeInterval(-1))
        #expect(throws: PKIError.self) { try CRLRefresher.check(Array(expired.utf8), issuers: [ca.certificate], now: now) }
        let foreign = try crl(other, nextUpdate: now.addingTimeInterval(3600))
        #expect(throws: PKIError.self) { try CRLRefresher.check(Array(foreign.utf8), issuers: [ca.certificate], now: now) }
        // During a rotation the file also carries the other issuing CA's CRL: accepted when that CA is known (from
        // /bundle.pem, certified by a root), still refused when it is not.
        let both = Array((good + foreign).utf8)
        #expect(throws: PKIError.self) { try CRLRefresher.check(both, issuers: [ca.certificate], now: now) }
        #expect(try CRLRefresher.check(both, issuers: [ca.certificate], alsoKnown: [other.certificate], now: now) <= now.addingTimeInterval(3600))
        // What the agent learns from /bundle.pem: only CAs its roots reach by signatures (through a cross-certificate
        // too), never a CA nobody it trusts certified.
        #expect(CRLRefresher.certifiedBy([ca.root], among: [other.root, other.certificate, ca.certificate]) == [ca.root, ca.certificate])
        let h = try CAFactory.makeHierarchy(name: "Test CA", keyType: .p256, now: now)
        let r2Key = try KeyType.p256.generate()
        let r2 = try CAFactory.makeRoot(name: "Test CA", key: r2Key, generation: 2, now: now)
        let cross = try CAFactory.crossCertify(r2, issuer: h.root, issuerKey: h.rootKey, now: now)
        let g3 = try CAFactory.makeIntermediate(name: "Test CA", key: try KeyType.p256.generate(), generation: 3, root: r2, rootKey: r2Key, now: now)
        #expect(CRLRefresher.certifiedBy([h.root], among: [g3, cross]) == [h.root, cross, g3])
        #expect(CRLRefresher.certifiedBy([h.root], among: [g3]) == [h.root])
        let expiredOther = try crl(other, nextUpdate: now.addingTimeInterval(-1))
        #expect(throws: PKIError.self) {
            try CRLRefresher.check(Array((good + expiredOther).utf8), issuers: [ca.certificate], alsoKnown: [other.certificate], now: now)
        }
    }

    /// Runs `body` against a fresh authority (renew-expired allowed for 2 h) with an agent directory, stopping it after.
    func withAuthority(_ label: String, _ body: (ServerHarness, String) async throws -> Void) async throws {
        let server = try await ServerHarness.start(renewExpiredGrace: .hours(2))
        let dir = TestPKI.temporaryDirectory(label)
        defer { try? FileManager.default.removeItem(atPath: dir) }
        do {
            try await body(server, dir)
        } catch {
            await server.stop()
            throw error
        }
        await server.stop()
    }

    func configuration(_ server: ServerHarness, dir: String, token: String?, uri: String, validity: ValidityDuration? = nil, fraction: Double = 2.0 / 3.0) throws -> Agent.Configuration {
        var configuration = try Agent.Configuration(
            authority: server.baseURL, rootFingerprint: try Authority.fingerprint(server.root), token: token, identity: uri, outDir: dir + "/out",
            schedule: RenewalSchedule(fraction: fraction, jitter: 0), validity: validity
        )
        configuration.requestTimeout = .seconds(10)
        return configuration
    }

    @Test("host clock 2 h ahead, 10-minute certificate: the new certificate is not taken for expired; the agent renews it over mTLS on the authority's time")
    func clockAhead() async throws {
        try await withAuthority("agent-ahead") { server, dir in
            let uri = "spiffe://example.org/ns/web/sa/ahead"
            let token = try await server.token(scopes: ["spiffe://example.org/ns/web/*"], maxValidity: .minutes(10))
            let clock = ShiftedClock(offset: 7200)
            var configuration = try configuration(server, dir: dir, token: token.token, uri: uri, validity: .minutes(10))
            let agent = Agent(configuration: configuration, clock: clock, logger: Logger(label: "test"), random: { 0 })
            guard case .enrolled = await agent.step() else { Issue.record("enrollment: \(agent.currentStatus.lastError ?? "-")"); return }
            #expect(abs((agent.currentStatus.clockSkewSeconds ?? 0) + 7200) < 5, "the skew is measured and reported: \(agent.currentStatus.clockSkewSeconds ?? 0)")
            let next = await agent.step()
            guard case .notDue = next else { Issue.record("expected not due on the authority's clock, got \(next): \(agent.currentStatus.lastError ?? "-")"); return }
            // Due (an early renewal point stands in for time passing): renewed over mTLS, not through renew-expired.
            configuration.schedule = RenewalSchedule(fraction: 0.01, jitter: 0)
            try FileManager.default.removeItem(atPath: AgentStatus.path(outDir: dir + "/out"))
            let later = Agent(configuration: configuration, clock: clock, logger: Logger(label: "test"), random: { 0 })
            let outcome = await later.step()
            guard case .renewed(let serial) = outcome else { Issue.record("expected a renewal, got \(outcome): \(later.currentStatus.lastError ?? "-")"); return }
            let event = try await server.authority.store.auditEvents().last
            #expect(event?.action == "renew" && event?.subject == serial, "renewed over mTLS (action renew), not renew-expired")
            #expect(later.currentStatus.state == "ok")
        }
    }

    @Test("host clock stepped 2 h back while running: the agent notices at its next step and renews on the authority's time")
    func clockSteppedBack() async throws {
        try await withAuthority("agent-stepped") { server, dir in
            let uri = "spiffe://example.org/ns/web/sa/stepped"
            let key = try KeyType.p256.generate()
            // 50 minutes into a one-hour certificate: past its renewal point in real time.
            let old = try await server.authority.issue(
                .init(profile: .workload, publicKey: key.publicKey, uris: [uri], validity: .hours(1)), owner: "test", requester: "test",
                now: Date.now.addingTimeInterval(-3000)
            )
            try Delivery.deliver(outDir: dir + "/out", key: key, chain: old.chain, roots: [server.root])
            let clock = ShiftedClock(offset: 0)
            let agent = Agent(configuration: try configuration(server, dir: dir, token: nil, uri: uri), clock: clock, logger: Logger(label: "test"), random: { 0 })
            await agent.refreshTime(roots: [.classical(server.root)])   // the agent has measured the clocks agree
            clock.offset = -7200   // then NTP steps the host clock back two hours
            let outcome = await agent.step()
            guard case .renewed = outcome else { Issue.record("expected a renewal on the authority's time, got \(outcome)"); return }
            #expect(abs((agent.currentStatus.clockSkewSeconds ?? 0) - 7200) < 5, "status names the skew: \(agent.currentStatus.clockSkewSeconds ?? 0)")
        }
    }

    @Test("expired certificate, host clock 2 h ahead: renew-expired's proof is stamped with the authority's time and accepted")
    func renewExpiredUnderSkew() async throws {
        try await withAuthority("agent-expired-skew") { server, dir in
            let uri = "spiffe://example.org/ns/web/sa/offline"
            let key = try KeyType.p256.generate()
            // Issued two hours ago for one hour (the hierarchy is back-dated a day, so this is possible): expired an hour ago.
            let old = try await server.authority.issue(
                .init(profile: .workload, publicKey: key.publicKey, uris: [uri], validity: .hours(1)), owner: "test", requester: "test",
                now: Date.now.addingTimeInterval(-7200)
            )
            try Delivery.deliver(outDir: dir + "/out", key: key, chain: old.chain, roots: [server.root])
            let agent = Agent(configuration: try configuration(server, dir: dir, token: nil, uri: uri), clock: ShiftedClock(offset: 7200),
                              logger: Logger(label: "test"), random: { 0 })
            let outcome = await agent.step()
            guard case .renewed(let serial) = outcome else { Issue.record("expected renew-expired to succeed, got \(outcome): \(agent.currentStatus.lastError ?? "-")"); return }
            #expect(try await server.authority.store.certificate(serial: serial)?.requester == "cert:\(old.record.serial)")
        }
    }

    @Test("a failed enrollment leaves a status that says what failed, with its code")
    func failedEnrollmentStatus() async throws {
        try await withAuthority("agent-badtoken") { server, dir in
            let agent = Agent(configuration: try configuration(server, dir: dir, token: "mtk_0123456789abcdef_wrongsecret", uri: "spiffe://example.org/ns/web/sa/x"),
                              clock: FixedClock(now: .now), logger: Logger(label: "test"), random: { 0 })
            guard case .stopped = await agent.step() else { Issue.record("a wrong token should stop the agent"); return }
            let status = AgentStatus.read(outDir: dir + "/out")
            #expect(status?.state == "stopped" && status?.lastErrorCode == "token-invalid" && status?.lastError != nil, "\(String(describing: status))")
        }
    }
}

@Suite("The agent during a CA rotation")
struct AgentRotationTests {
    @Test("activate --renew-now: an agent whose certificate the replaced CA issued renews at its next check; without it, it waits for its schedule")
    func renewNow() async throws {
        let server = try await ServerHarness.start()
        let dir = TestPKI.temporaryDirectory("agent-rotation")
        defer { try? FileManager.default.removeItem(atPath: dir) }
        do {
            let key = try KeyType.p256.generate()
            let uri = "spiffe://example.org/ns/web/sa/rotating"
            let old = try await server.authority.issue(
                .init(profile: .workload, publicKey: key.publicKey, uris: [uri], validity: .hours(1)), owner: "test", requester: "test"
            )
            try Delivery.deliver(outDir: dir + "/out", key: key, chain: old.chain, roots: [server.root])
            var configuration = try Agent.Configuration(
                authority: server.baseURL, rootFingerprint: try Authority.fingerprint(server.root), token: nil, identity: uri, outDir: dir + "/out"
            )
            configuration.caCheckInterval = 0
            configuration.requestTimeout = .seconds(10)
            let agent = Agent(configuration: configuration, clock: ShiftedClock(offset: 0), logger: Logger(label: "test"), random: { 0.5 })
            guard case .notDue = await agent.step() else { Issue.record("a fresh certificate is not due"); await server.stop(); return }

            _ = try await server.authority.prepareRotation(.intermediate, passphrase: { nil }, actor: "test")
            _ = try await server.authority.activateRotation(.intermediate, passphrase: { nil }, actor: "test")
            guard case .notDue = await agent.step() else { Issue.record("without --renew-now the agent keeps its schedule"); await server.stop(); return }

            try await server.authority.store.setMetadata([Authority.renewNowKey: "true"], audit: nil)
            let outcome = await agent.step()
            guard case .renewed(let serial) = outcome else { Issue.record("expected a renewal at once, got \(outcome)"); await server.stop(); return }
            let record = try #require(try await server.authority.store.certificate(serial: serial))
            #expect(record.issuer == server.authority.ca.certificate.subject.description, "renewed onto the new issuing CA")
            guard case .notDue = await agent.step() else { Issue.record("once on the new CA, the agent waits again"); await server.stop(); return }
        } catch {
            Issue.record("\(error)")
        }
        await server.stop()
    }
}
