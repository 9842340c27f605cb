import Crypto
import Foundation
@testable import MutualAuthority
import MutualPKCS11
import MutualPKI
import MutualStore
import TestSupport
import Testing
import X509

/// CA rotation on a real state directory and SQLite inventory, in process (the sockets are in
/// scripts/interop-rotation.sh).
@Suite("CA rotation: prepare, activate, retire", .serialized)
struct RotationTests {
    func withAuthority(_ body: (Authority, StateDirectory) async throws -> Void) async throws {
        let dir = TestPKI.temporaryDirectory("rotation")
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let state = StateDirectory(path: dir + "/state")
        _ = try await Authority.initialize(state: state, name: "Rotating", keyType: .p256, constraints: .init(), passphrase: nil, actor: "test")
        let authority = try await Authority.open(state: state)
        do {
            try await authority.setHTTPPublicURL("http://ca.test:9080", actor: "test")
            try await body(authority, state)
            try await authority.close()
        } catch {
            try? await authority.close()
            throw error
        }
    }

    func leaf(_ authority: Authority, _ name: String) async throws -> Authority.IssuedCertificate {
        let key = P256.Signing.PrivateKey()
        return try await authority.issue(
            IssuanceRequest(profile: .workload, publicKey: Certificate.PublicKey(key.publicKey), uris: ["spiffe://example.org/\(name)"], validity: .hours(1)),
            owner: "team-\(name)", requester: "test"
        )
    }

    @Test func intermediateRotationKeepsTheOldCARevocableUntilRetired() async throws {
        try await withAuthority { authority, state in
            let g1 = authority.ca.certificate
            let old = try await leaf(authority, "old")

            _ = try await authority.prepareRotation(.intermediate, passphrase: { nil }, actor: "test")
            #expect(authority.ca.certificate == g1, "prepare does not switch issuance")
            #expect(authority.publishedIntermediates.count == 2)
            let again = await #expect(throws: AuthorityError.self) { _ = try await authority.prepareRotation(.root, passphrase: { nil }, actor: "test") }
            #expect(again?.code == .rotationInProgress)
            let early = await #expect(throws: AuthorityError.self) { _ = try await authority.retireRotation(.intermediate, force: false, actor: "test") }
            #expect(early?.code == .rotationNotPrepared)

            let operatorCertificate = try PEMBundle.certificates(fromPEM: String(contentsOfFile: state.adminDirectory + "/cert.pem", encoding: .utf8))[0]
            let bob = try await authority.issue(
                IssuanceRequest(profile: .admin, publicKey: Certificate.PublicKey(P256.Signing.PrivateKey().publicKey), commonName: "bob", validity: .days(30)),
                owner: "bob", requester: "test"
            )
            _ = try await authority.activateRotation(.intermediate, passphrase: { nil }, actor: "test")
            let g2 = authority.ca.certificate
            // admin/ is re-issued from g2 and the certificate it replaces revoked; another person's admin certificate
            // is left alone (theirs to renew; it counts towards retire like any other).
            let reissued = try PEMBundle.certificates(fromPEM: String(contentsOfFile: state.adminDirectory + "/cert.pem", encoding: .utf8))[0]
            #expect(reissued.issuer == g2.subject)
            #expect(try await authority.store.certificate(serial: operatorCertificate.serialHex)?.status == .revoked)
            #expect(try await authority.store.certificate(serial: bob.record.serial)?.status == .valid)
            _ = try await authority.revoke(serial: bob.record.serial, reason: .superseded, actor: "test")
            #expect(g2 != g1 && g2.subject.description.contains("Issuing CA G2"))
            let new = try await leaf(authority, "new")
            #expect(new.certificate.issuer == g2.subject)
            #expect(new.chain == [new.certificate, g2])
            #expect(try CRLDistributionPoints(new.certificate)?.urls == ["http://ca.test:9080/crl/g2"])

            // The replaced CA still answers for its certificates: CRL signed by it, OCSP signed by it.
            _ = try await authority.revoke(serial: old.record.serial, reason: .keyCompromise, actor: "test")
            let publisher = RevocationPublisher(authority: authority)
            let oldCRL = try RevocationList(bytes: try #require(try await publisher.crl(generation: 1)))
            #expect(oldCRL.isSigned(by: g1))
            #expect(oldCRL.entry(for: old.certificate.serialNumber) != nil)
            #expect(publisher.plainCRLGeneration() == 1, "/crl stays the CRL the first CA's certificates name")
            let newCRL = try RevocationList(bytes: try #require(try await publisher.crl(generation: 2)))
            #expect(newCRL.isSigned(by: g2) && newCRL.entry(for: old.certificate.serialNumber) == nil)
            let responder = OCSPResponder(authority: authority)
            let answer = try OCSP.ParsedResponse(derEncoded: await responder.respond(
                to: try OCSP.Request(certIDs: [try OCSP.CertID(issuer: g1, serialNumber: old.certificate.serialNumber)]).derEncoded()
            ).der)
            #expect(answer.isSigned(by: g1))
            guard case .revoked = answer.responses.first?.status else { Issue.record("expected revoked, got \(String(describing: answer.responses.first?.status))"); return }

            // Retire: refused while a certificate of g1 is valid, with how many and whose.
            let blocker = try await authority.issue(
                IssuanceRequest(profile: .workload, publicKey: Certificate.PublicKey(P256.Signing.PrivateKey().publicKey), uris: ["spiffe://example.org/late"], validity: .hours(1)),
                owner: "team-late", requester: "test", now: Date()
            )
            #expect(blocker.certificate.issuer == g2.subject)  // issued from g2: not a blocker
            let g1Leaf = try await RotationTests.issue(from: state, generation: 1, authority: authority)
            let refused = await #expect(throws: AuthorityError.self) { _ = try await authority.retireRotation(.intermediate, force: false, actor: "test") }
            #expect(refused?.code == .caStillInUse)
            #expect(refused?.details["remaining"] == "1")
            #expect(refused?.details["owners"]?.contains("team-g1") == true)
            _ = try await authority.revoke(serial: g1Leaf, reason: .superseded, actor: "test")
            _ = try await authority.retireRotation(.intermediate, force: false, actor: "test")
            #expect(authority.publishedIntermediates == [g2])
            #expect(publisher.plainCRLGeneration() == 2)
            #expect(try await publisher.crl(generation: 1) == nil)

            // Every stage is audited; a new process sees the same CAs.
            let events = try await authority.store.auditEvents(limit: 1000).filter { $0.action == "ca-rotate" }
            let stages = events.map { event in
                (try? JSONSerialization.jsonObject(with: Data(event.details.utf8)) as? [String: String])?["stage"]
            }
            #expect(stages == ["prepare", "activate", "retire"])
            let reopened = try await Authority.open(state: state)
            #expect(reopened.ca.certificate == g2)
            try await reopened.close()
        }
    }

    /// A certificate signed by issuing CA generation `generation` (read from its directory), recorded as that CA's.
    static func issue(from state: StateDirectory, generation: Int, authority: Authority) async throws -> String {
        let directory = state.caDirectory + "/g\(generation)"
        let certificate = try PEMBundle.certificates(fromPEM: String(contentsOfFile: directory + "/intermediate.pem", encoding: .utf8))[0]
        let key = try KeyFile.load(pem: String(contentsOfFile: directory + "/intermediate.key", encoding: .utf8), passphrase: { nil })
        let ca = try IssuingCA(certificate: certificate, privateKey: key, root: authority.trustedRoots[0], policy: authority.ca.policy)
        let issued = try ca.issue(
            IssuanceRequest(profile: .workload, publicKey: Certificate.PublicKey(P256.Signing.PrivateKey().publicKey), uris: ["spiffe://example.org/g1"], validity: .hours(1)),
            now: Date()
        )
        try await authority.store.recordIssuance(
            try Authority.makeRecord(issued, profile: .workload, owner: "team-g1", requester: "test", issuerDescription: certificate.subject.description),
            audit: AuditEntry(time: Date(), actor: "test", action: "issue", subject: issued.serialHex, details: [:])
        )
        return issued.serialHex
    }

    @Test func rootRotationCrossCertifiesUntilTheOldRootRetires() async throws {
        try await withAuthority { authority, state in
            let r1 = authority.ca.root
            _ = try await authority.prepareRotation(.root, passphrase: { nil }, actor: "test")
            #expect(authority.trustedRoots.count == 2 && authority.trustedRoots.contains(r1))
            let wrongStage = await #expect(throws: AuthorityError.self) { _ = try await authority.activateRotation(.intermediate, passphrase: { nil }, actor: "test") }
            #expect(wrongStage?.code == .rotationInProgress)
            _ = try await authority.activateRotation(.root, passphrase: { nil }, actor: "test")
            let r2 = try #require(authority.trustedRoots.first { $0 != r1 })
            #expect(authority.ca.root == r2)
            let issued = try await leaf(authority, "after")
            #expect(issued.chain.count == 3, "leaf, the new issuing CA, the cross-certificate")
            let cross = issued.chain[2]
            #expect(cross.subject == r2.subject && cross.issuer == r1.subject && cross.publicKey == r2.publicKey)
            // A relying party that trusts only the old root, and one that trusts only the new one, both accept.
            for roots in [[r1], [r2]] {
                let outcome = await ChainVerifier(options: .init(roots: roots, intermediates: Array(issued.chain.dropFirst()), validationTime: Date()))
                    .verify(issued.certificate)
                guard case .accepted = outcome else { Issue.record("roots \(roots.map(\.subject)): \(outcome)"); return }
            }
            _ = try await authority.retireRotation(.root, force: false, actor: "test")
            #expect(authority.trustedRoots == [r2])
            let later = try await leaf(authority, "later")
            #expect(later.chain.count == 2, "no cross-certificate once the old root is retired")
            #expect(FileManager.default.contents(atPath: state.rootCertificatePath) == (try? Data(contentsOf: URL(fileURLWithPath: state.caDirectory + "/r2/root.pem"))))
            // `mutual root-crl` re-signs the active root's CRL with the key in its generation directory.
            let (number, _) = try Authority.refreshRootCRL(state: state, passphrase: { nil })
            #expect(number == 2)
            let rootCRL = try RevocationList(bytes: try AtomicFile.read(state.caDirectory + "/r2/root-crl.pem", what: "crl"))
            #expect(rootCRL.isSigned(by: r2))
            #expect(try AtomicFile.read(state.rootCRLPath, what: "crl") == (try AtomicFile.read(state.caDirectory + "/r2/root-crl.pem", what: "crl")))
        }
    }

    @Test func aTokenHeldCARotatesInsideItsToken() async throws {
        let hsm = SoftHSM.shared
        let label = try hsm.makeToken()
        let dir = TestPKI.temporaryDirectory("rotation-token")
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let state = StateDirectory(path: dir + "/state")
        let uri = try PKCS11URI(hsm.uri(token: label, object: "issuing"))
        _ = try await Authority.initialize(state: state, name: "Token", keyType: .p256, constraints: .init(), passphrase: nil, actor: "test", keyStore: uri)
        let authority = try await Authority.open(state: state)
        _ = try await authority.prepareRotation(.intermediate, passphrase: { nil }, actor: "test")
        _ = try await authority.activateRotation(.intermediate, passphrase: { nil }, actor: "test")
        let g2Key = try PKCS11Key.find(uri.naming(object: "issuing-g2"))
        #expect(authority.ca.certificate.publicKey == g2Key.publicKey, "the new issuing key was generated in the same token")
        #expect(!FileManager.default.fileExists(atPath: state.caDirectory + "/g2/intermediate.key"))
        let issued = try await leaf(authority, "token")
        #expect(g2Key.publicKey.isValidSignature(issued.certificate.signature, for: issued.certificate))
        #expect(authority.probeSigningKeys() == nil)
        try await authority.close()
    }

    @Test func preparingNeedsTheRootKey() async throws {
        try await withAuthority { authority, state in
            // The root key taken offline (moved out of the state directory).
            try FileManager.default.removeItem(atPath: state.rootKeyPath)
            let error = await #expect(throws: AuthorityError.self) { _ = try await authority.prepareRotation(.intermediate, passphrase: { nil }, actor: "test") }
            #expect(error?.code == .rootKeyUnavailable)
        }
    }
}
