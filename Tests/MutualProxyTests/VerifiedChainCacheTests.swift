import Foundation
import MutualPKI
@testable import MutualProxy
import Testing
import TestSupport
import X509

@Suite("Verified chains are remembered per TLS context: time and revocation re-checked on every handshake (in memory)")
struct VerifiedChainCacheTests {
    @Test("a chain verified once is accepted again without path validation while valid and unrevoked; never otherwise")
    func cache() async throws {
        let now = Date()
        let ca = try TestPKI.issuingCA(now: now)
        let directory = TestPKI.temporaryDirectory("chain-cache")
        defer { try? FileManager.default.removeItem(atPath: directory) }
        let serverKey = try KeyType.p256.generate()
        let server = try ca.issue(.init(profile: .server, publicKey: serverKey.publicKey, dnsNames: ["localhost"]), now: now)
        try PEMBundle.pem([server, ca.certificate]).write(toFile: directory + "/server.pem", atomically: true, encoding: .utf8)
        try KeyFile.pem(for: serverKey, passphrase: nil).write(toFile: directory + "/server.key", atomically: true, encoding: .utf8)
        try PEMBundle.pem([ca.root]).write(toFile: directory + "/roots.pem", atomically: true, encoding: .utf8)
        let listener = ProxyConfiguration.Listener(
            name: "inbound", listen: "127.0.0.1:0", upstream: "http://127.0.0.1:9", cert: directory + "/server.pem",
            key: directory + "/server.key", clientCA: directory + "/roots.pem", allow: ["spiffe://example.org/*"]
        )
        let state = try InboundState(name: "inbound", configuration: listener, policy: RoutePolicy(routes: []))
        let revocation = RevocationState(stalePolicy: .deny)

        let leaf = try ca.issue(.init(profile: .workload, publicKey: try KeyType.p256.generate().publicKey, uris: ["spiffe://example.org/a"]), now: now)
        let der = [try leaf.derBytes, try ca.certificate.derBytes]
        let key = InboundState.chainKey(der)
        #expect(state.cachedVerification(chainKey: key, revocation: revocation, now: now) == nil, "nothing verified yet")

        guard case .success(let peer) = await state.verify(presented: [leaf, ca.certificate], revocation: revocation, now: now) else {
            Issue.record("the chain should verify")
            return
        }
        state.rememberVerified(chainKey: key, peer: peer)
        guard case .success(let again)? = state.cachedVerification(chainKey: key, revocation: revocation, now: now) else {
            Issue.record("a remembered chain is accepted")
            return
        }
        #expect(again === peer, "connections of one client share one identity")

        // Another chain (the same leaf without its intermediate, or another leaf) is not the remembered one.
        #expect(state.cachedVerification(chainKey: InboundState.chainKey([der[0]]), revocation: revocation, now: now) == nil)
        #expect(InboundState.chainKey([der[0] + der[1]]) != key, "lengths are part of the key")

        // Outside the chain's validity window the full verification decides (and names the reason).
        #expect(state.cachedVerification(chainKey: key, revocation: revocation, now: peer.validUntil.addingTimeInterval(1)) == nil)
        #expect(state.cachedVerification(chainKey: key, revocation: revocation, now: peer.validFrom.addingTimeInterval(-1)) == nil)

        // Revoked since: refused with the revocation's code, not accepted from the cache.
        #expect(revocation.push(serial: leaf.serialHex, reason: "keyCompromise"))
        guard case .failure(let failure)? = state.cachedVerification(chainKey: key, revocation: revocation, now: now) else {
            Issue.record("a revoked chain must not be accepted from the cache")
            return
        }
        #expect(failure.kind == .revoked)
    }
}
