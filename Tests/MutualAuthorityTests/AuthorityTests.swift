import Foundation
@testable import MutualAuthority
import MutualPKI
import MutualStore
import SwiftASN1
import Testing
import TestSupport
import X509

@Suite("Authority: init, issuance, revocation on a real state directory")
struct AuthorityTests {
    func withAuthority(passphrase: String? = nil, _ body: (Authority, StateDirectory) async throws -> Void) async throws {
        let dir = TestPKI.temporaryDirectory("authority")
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let state = StateDirectory(path: dir + "/state")
        _ = try await Authority.initialize(
            state: state, name: "Test", keyType: .p256, constraints: .init(), passphrase: passphrase, actor: "test"
        )
        let authority = try await Authority.open(state: state, passphrase: { passphrase })
        do {
            try await body(authority, state)
            try await authority.close()
        } catch {
            try? await authority.close()
            throw error
        }
    }

    /// A proof of possession of `key` over `csr`, as the agent makes it.
    static func proof(_ purpose: Authority.ProofPurpose, key: Certificate.PrivateKey, csr: CertificateSigningRequest, at time: Date) throws -> (String, [UInt8]) {
        let timestamp = time.formatted(.iso8601)
        var serializer = DER.Serializer()
        try serializer.serialize(csr)
        let statement = Authority.proofStatement(purpose: purpose, timestamp: timestamp, csrDER: serializer.serializedBytes)
        let signature = try key.sign(bytes: statement, signatureAlgorithm: key.preferredSignatureAlgorithm)
        return (timestamp, Array(signature.rawRepresentation))
    }

    /// Lets the test revoke a certificate while the responder is suspended reading its status.
    final class RaceHolder: @unchecked Sendable {
        var responder: OCSPResponder?
        var armed = true
    }

    @Test("OCSP: a revocation noted while a status is being read leaves no stale 'good' in the cache (actor reentrancy)")
    func ocspCacheRace() async throws {
        try await withAuthority { authority, _ in
            let key = try KeyType.p256.generate()
            let issued = try await authority.issue(
                IssuanceRequest(profile: .client, publicKey: key.publicKey, uris: ["spiffe://example.org/race"], validity: .hours(1)),
                owner: nil, requester: "test"
            )
            let serial = issued.certificate.serialHex
            let holder = RaceHolder()
            // The first lookup reads the record (good), then — before returning it — the certificate is revoked and the
            // responder told, as the revocation watcher does while a request is in flight.
            let responder = OCSPResponder(authority: authority, responseValidity: .hours(1), signerValidity: .days(7)) { lookup in
                let record = try await authority.store.certificate(serial: lookup)
                if holder.armed {
                    holder.armed = false
                    _ = try await authority.revoke(serial: serial, reason: .keyCompromise, actor: "test")
                    await holder.responder?.noteRevocation(sequence: try await authority.store.lastRevocationSequence())
                }
                return record
            }
            holder.responder = responder
            let request = try OCSP.Request(certIDs: [try OCSP.CertID(issuer: authority.ca.certificate, serialNumber: issued.certificate.serialNumber)]).derEncoded()
            let first = await responder.respond(to: request)
            #expect(first.outcome == "good", "read before the revocation")
            let second = await responder.respond(to: request)
            #expect(!second.cacheHit && second.outcome == "revoked", "\(second.outcome), cache hit: \(second.cacheHit)")
        }
    }

    @Test("a server certificate (no clientAuth) renews with a proof of possession; stale, forged, replayed, cross-purpose proofs and revoked certificates are refused by code")
    func renewalByProof() async throws {
        try await withAuthority { authority, _ in
            let now = Date.now
            for type in [KeyType.p256, .p384, .ed25519] {
                let key = try type.generate()
                let current = try await authority.issue(
                    .init(profile: .server, publicKey: key.publicKey, dnsNames: ["web.example.org"], validity: .hours(1)), owner: "web", requester: "test",
                    now: now.addingTimeInterval(-2400)
                )
                #expect(Authority.renewalMethod(for: current.certificate) == .proof)
                let newKey = try KeyType.p256.generate()
                let csr = try TestPKI.csr(key: newKey, commonName: nil, sans: [.dnsName("other.example.org")])
                let csrPEM = Array(try csr.serializeAsPEM().pemString.utf8)

                // A proof made for renew-expired is not a proof for renewal, a stale one is refused, a forged one too.
                let (crossTime, crossSignature) = try Self.proof(.renewExpired, key: key, csr: csr, at: now)
                await #expect(throws: AuthorityError.self) {
                    try await authority.renewByProof(current: current.certificate, csr: csrPEM, timestamp: crossTime, signature: crossSignature, now: now)
                }
                let codeOf: (Authority.ProofPurpose, Certificate.PrivateKey, Date) async -> String? = { purpose, signer, time in
                    do {
                        let (timestamp, signature) = try Self.proof(purpose, key: signer, csr: csr, at: time)
                        _ = try await authority.renewByProof(current: current.certificate, csr: csrPEM, timestamp: timestamp, signature: signature, now: now)
                        return nil
                    } catch let error as AuthorityError {
                        return error.code.name
                    } catch {
                        return "\(error)"
                    }
                }
                #expect(await codeOf(.renewExpired, key, now) == "proof-invalid")
                #expect(await codeOf(.renew, key, now.addingTimeInterval(-301)) == "clock-skew")
                #expect(await codeOf(.renew, newKey, now) == "proof-invalid", "signed by the new key, not the current one")

                let (timestamp, signature) = try Self.proof(.renew, key: key, csr: csr, at: now.addingTimeInterval(-60))
                let renewed = try await authority.renewByProof(current: current.certificate, csr: csrPEM, timestamp: timestamp, signature: signature, now: now)
                #expect(renewed.certificate.publicKey == newKey.publicKey)
                #expect(renewed.record.identity == current.record.identity, "the identity comes from the current certificate, not the CSR")
                #expect(try renewed.certificate.extensions.subjectAlternativeNames.map(Array.init) == [.dnsName("web.example.org")])
                #expect(renewed.record.requester == "cert:\(current.record.serial)")
                let event = try await authority.store.auditEvents().last
                #expect(event?.action == "renew" && event?.details.contains("\"method\":\"proof\"") == true && event?.details.contains("\"renewed_from\":\"\(current.record.serial)\"") == true)

                // The same proof again: refused, nothing issued.
                let before = try await authority.store.countCertificates()
                do {
                    _ = try await authority.renewByProof(current: current.certificate, csr: csrPEM, timestamp: timestamp, signature: signature, now: now)
                    Issue.record("a replayed proof was accepted")
                } catch let error as AuthorityError {
                    #expect(error.code == .proofReplayed)
                }
                #expect(try await authority.store.countCertificates() == before)

                // Revoked: refused whatever the proof.
                _ = try await authority.revoke(serial: renewed.record.serial, reason: .keyCompromise, actor: "test", now: now)
                let csr2 = try TestPKI.csr(key: try KeyType.p256.generate(), commonName: nil, sans: [])
                let (t2, s2) = try Self.proof(.renew, key: newKey, csr: csr2, at: now)
                do {
                    _ = try await authority.renewByProof(current: renewed.certificate, csr: Array(try csr2.serializeAsPEM().pemString.utf8), timestamp: t2, signature: s2, now: now)
                    Issue.record("a revoked certificate was renewed")
                } catch let error as AuthorityError {
                    #expect(error.code == .certificateRevoked)
                }
            }
        }
    }

    @Test("init writes the hierarchy, keys 0600, admin client certificate, inventory and audit")
    func initLayout() async throws {
        try await withAuthority { authority, state in
            for path in [state.rootKeyPath, state.intermediateKeyPath, state.adminDirectory + "/key.pem"] {
                let mode = try FileManager.default.attributesOfItem(atPath: path)[.posixPermissions] as? Int
                #expect(mode == 0o600, "\(path)")
            }
            let admin = try PEMBundle.certificates(fromPEM: String(contentsOfFile: state.adminDirectory + "/chain.pem", encoding: .utf8))
            #expect(admin.count == 2)
            #expect(try admin[0].extensions.extendedKeyUsage.map(Array.init) == [.clientAuth])
            let records = try await authority.store.certificates(.init(now: .now))
            #expect(Set(records.map(\.profile)) == ["root", "intermediate", "admin"])
            let actions = try await authority.store.auditEvents().map(\.action)
            #expect(actions.first == "init")
        }
    }

    @Test("an issued certificate is in the inventory, with its audit event, when issue returns")
    func durableIssuance() async throws {
        try await withAuthority { authority, state in
            let key = try KeyType.p256.generate()
            let issued = try await authority.issue(
                .init(profile: .workload, publicKey: key.publicKey, uris: ["spiffe://example.org/ns/a/sa/b"]), owner: "team-a", requester: "test"
            )
            // A second process's view: open the database file anew.
            let store = try await Store.openSQLite(path: state.databasePath)
            let record = try #require(try await store.certificate(serial: issued.certificate.serialHex))
            #expect(record.identity == "spiffe://example.org/ns/a/sa/b")
            #expect(record.owner == "team-a")
            #expect(record.der == (try issued.certificate.derBytes))
            #expect(try await store.auditEvents().last?.subject == issued.certificate.serialHex)
            try await store.close()
        }
    }

    @Test("refused requests change neither the inventory nor the audit trail")
    func refusalsLeaveNoTrace() async throws {
        try await withAuthority { authority, _ in
            let before = (try await authority.store.countCertificates(), try await authority.store.auditEvents().count)
            let key = try KeyType.p256.generate()
            let wrongSignature: [UInt8] = {
                var der = (try? TestPKI.der(TestPKI.csr(key: key, commonName: "x"))) ?? []
                der[der.count - 2] ^= 0x01
                return der
            }()
            let inputs: [[UInt8]] = [
                Array("garbage".utf8), [], [UInt8](repeating: 0x41, count: 65 * 1024), wrongSignature,
                try TestPKI.pem(TestPKI.csr(key: key, sans: [.uniformResourceIdentifier("https://not-spiffe.test")])),
            ]
            for input in inputs {
                await #expect(throws: (any Error).self) {
                    _ = try await authority.sign(csr: input, profile: .workload, validity: nil, owner: nil, requester: "test")
                }
            }
            await #expect(throws: (any Error).self) {
                _ = try await authority.sign(csr: try TestPKI.pem(TestPKI.csr(key: key, commonName: "c")), profile: .client,
                                             validity: .days(365), owner: nil, requester: "test")
            }
            await #expect(throws: AuthorityError.self) { _ = try await authority.revoke(serial: "zz-not-hex", reason: .superseded, actor: "t") }
            await #expect(throws: AuthorityError.self) { _ = try await authority.revoke(serial: "abcdef", reason: .superseded, actor: "t") }
            let after = (try await authority.store.countCertificates(), try await authority.store.auditEvents().count)
            #expect(before == after)
        }
    }

    @Test("init refuses an existing CA; open refuses a missing or corrupt one")
    func stateDirectoryErrors() async throws {
        try await withAuthority { _, state in
            let again = await #expect(throws: AuthorityError.self) {
                _ = try await Authority.initialize(state: state, name: "x", keyType: .p256, constraints: .init(), passphrase: nil, actor: "t")
            }
            #expect(again?.code == .alreadyInitialized)
        }
        let dir = TestPKI.temporaryDirectory("corrupt")
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let missing = await #expect(throws: AuthorityError.self) { _ = try await Authority.open(state: StateDirectory(path: dir + "/none")) }
        #expect(missing?.code == .notInitialized)

        let state = StateDirectory(path: dir + "/s")
        _ = try await Authority.initialize(state: state, name: "x", keyType: .p256, constraints: .init(), passphrase: nil, actor: "t")
        try "{not json".write(toFile: state.configPath, atomically: true, encoding: .utf8)
        let corrupt = await #expect(throws: AuthorityError.self) { _ = try await Authority.open(state: state) }
        #expect(corrupt?.code == .corruptState)
    }

    @Test("encrypted CA keys need the right passphrase")
    func passphrase() async throws {
        try await withAuthority(passphrase: "s3cret") { _, state in
            let keyText = try String(contentsOfFile: state.intermediateKeyPath, encoding: .utf8)
            #expect(KeyFile.isEncrypted(keyText))
            let wrong = await #expect(throws: PKIError.self) { _ = try await Authority.open(state: state, passphrase: { "nope" }) }
            #expect(wrong?.code == .wrongPassphrase)
            let none = await #expect(throws: PKIError.self) { _ = try await Authority.open(state: state, passphrase: { nil }) }
            #expect(none?.code == .wrongPassphrase)
        }
    }

    @Test("revocation is recorded with reason and audited")
    func revoke() async throws {
        try await withAuthority { authority, _ in
            let key = try KeyType.p256.generate()
            let issued = try await authority.issue(.init(profile: .client, publicKey: key.publicKey, commonName: "c"), owner: nil, requester: "t")
            let serialWithColons = issued.record.serial.uppercased().enumerated().map { $0.offset > 0 && $0.offset % 2 == 0 ? ":\($0.element)" : "\($0.element)" }.joined()
            let record = try await authority.revoke(serial: serialWithColons, reason: .keyCompromise, actor: "t")
            #expect(record.status == .revoked)
            let again = await #expect(throws: AuthorityError.self) { _ = try await authority.revoke(serial: issued.record.serial, reason: .keyCompromise, actor: "t") }
            #expect(again?.code == .conflict)
            #expect(try await authority.store.auditEvents().last?.action == "revoke")
        }
    }
}
