import Foundation
@testable import MutualAuthority
import MutualPKI
import MutualStore
import Synchronization
import Testing
import TestSupport
import X509

@Suite("Authority with an ML-DSA hierarchy beside the classical one: files, inventory, audit, CRLs, report")
struct PQAuthorityTests {
    @Test("pq init: encrypted 0600 keys, records and audit; reopened with one passphrase prompt; refused twice")
    func addHierarchy() async throws {
        let dir = TestPKI.temporaryDirectory("pq-authority")
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let state = StateDirectory(path: dir + "/state")
        _ = try await Authority.initialize(state: state, name: "PQ", keyType: .p256, constraints: .init(permittedDNS: ["example.org"]), passphrase: "secret", actor: "test")
        let authority = try await Authority.open(state: state, passphrase: { "secret" })
        #expect(authority.pqCA == nil)
        // Issuing for an ML-DSA key without the hierarchy is refused by code, and nothing is recorded.
        let key = try MLDSASigningKey(generating: .mlDSA65)
        let publicKey = try MLDSAPublicKey(variant: .mlDSA65, rawRepresentation: key.publicKey)
        await #expect(throws: PKIError.self) { _ = try await authority.issue(.init(profile: .server, dnsNames: ["a.example.org"]), mldsaKey: publicKey, owner: nil, requester: "test") }
        let before = try await authority.store.countCertificates()
        // Encrypted CA keys: the ML-DSA keys need the passphrase too.
        await #expect(throws: PKIError.self) { _ = try await authority.addPQHierarchy(variant: .mlDSA65, passphrase: nil, actor: "test") }
        #expect(!FileManager.default.fileExists(atPath: state.pqRootKeyPath))

        let hierarchy = try await authority.addPQHierarchy(variant: .mlDSA65, passphrase: "secret", actor: "test")
        for path in [state.pqRootKeyPath, state.pqIntermediateKeyPath] {
            let mode = try FileManager.default.attributesOfItem(atPath: path)[.posixPermissions] as? Int
            #expect(mode == 0o600)
            #expect(KeyFile.isEncrypted(try String(contentsOfFile: path, encoding: .utf8)))
        }
        // The name constraints of the classical CA carry over: the ML-DSA issuing CA refuses other names.
        await #expect(throws: PKIError.self) { _ = try await authority.issue(.init(profile: .server, dnsNames: ["evil.com"]), mldsaKey: publicKey, owner: nil, requester: "test") }
        let issued = try await authority.issue(.init(profile: .server, dnsNames: ["a.example.org"]), mldsaKey: publicKey, owner: "team-a", requester: "test")
        #expect(issued.chain == [issued.certificate, hierarchy.intermediate])
        let record = try #require(try await authority.store.certificate(serial: issued.record.serial))
        #expect(record.der == issued.certificate.der && record.issuer == hierarchy.intermediate.subject.description && record.owner == "team-a")
        #expect(try await authority.store.countCertificates() == before + 3)  // PQ root, PQ intermediate, the leaf
        let actions = try await authority.store.auditEvents().map(\.action)
        #expect(actions.contains("pq-init"))
        guard case .intact = try await authority.store.verifyAudit() else {
            Issue.record("the audit chain is broken")
            return
        }
        await #expect(throws: AuthorityError.self) { _ = try await authority.addPQHierarchy(variant: .mlDSA87, passphrase: "secret", actor: "test") }
        try await authority.close()

        // Reopened: both keys decrypted with a single ask of the passphrase.
        let asks = Mutex(0)
        let reopened = try await Authority.open(state: state, passphrase: { asks.withLock { $0 += 1 }; return "secret" })
        #expect(asks.withLock { $0 } == 1)
        #expect(reopened.pqCA?.certificate == hierarchy.intermediate)
        #expect(reopened.configuration.pqKeyType == .mlDSA65)
        await #expect(throws: PKIError.self) { _ = try await Authority.open(state: state, passphrase: { "wrong" }) }
        try await reopened.close()
    }

    @Test("ML-DSA CSRs: proof of possession required, only CN and SANs taken; garbage and classical CSRs refused by code")
    func signCSR() async throws {
        let dir = TestPKI.temporaryDirectory("pq-csr")
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let state = StateDirectory(path: dir + "/state")
        _ = try await Authority.initialize(state: state, name: "PQ", keyType: .p256, constraints: .init(), passphrase: nil, actor: "test")
        let authority = try await Authority.open(state: state)
        defer { Task { try? await authority.close() } }
        _ = try await authority.addPQHierarchy(variant: .mlDSA65, passphrase: nil, actor: "test")
        let key = try MLDSASigningKey(generating: .mlDSA65)
        let subject = try DistinguishedName { OrganizationName("asks for more"); CommonName("svc.example.org") }
        let csr = try MLDSACertificationRequest.build(
            subject: subject,
            extensions: [
                try .init(SubjectAlternativeNames([.dnsName("svc.example.org")]), critical: false),
                try .init(BasicConstraints.isCertificateAuthority(maxPathLength: nil), critical: true),
            ],
            key: key
        )
        let issued = try await authority.sign(mldsaCSR: csr.der, profile: .server, validity: .hours(1), owner: nil, requester: "test")
        #expect(issued.certificate.subjectPublicKey == key.publicKey)
        let extensions = try Certificate.Extensions(issued.certificate.extensions)
        #expect(try extensions.basicConstraints == .notCertificateAuthority)
        #expect(issued.record.subjectAlternativeNames == ["dns:svc.example.org"])
        let audit = try await authority.store.auditEvents().last
        #expect(audit?.details.contains("extension 2.5.29.19") == true, "the CA request is dropped and noted")

        func code(_ bytes: [UInt8]) async -> String? {
            do {
                _ = try await authority.sign(mldsaCSR: bytes, profile: .server, validity: nil, owner: nil, requester: "test")
                return nil
            } catch let error as PKIError { return error.code.name } catch { return "\(error)" }
        }
        var tampered = csr.der
        tampered[tampered.count - 20] ^= 0x01
        #expect(await code(tampered) == "bad-signature")
        #expect(await code(Array(csr.der.prefix(100))) == "malformed-input")
        #expect(await code(Array("not a csr".utf8)) == "malformed-input")
        let classical = try TestPKI.der(try TestPKI.csr(key: try KeyType.p256.generate(), sans: [.dnsName("c.example.org")]))
        #expect(await code(classical) == "unsupported-key")
    }

    @Test("CRLs: the ML-DSA issuing CA lists only its revoked certificates, the classical CRL only the classical ones")
    func revocationLists() async throws {
        let dir = TestPKI.temporaryDirectory("pq-crl")
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let state = StateDirectory(path: dir + "/state")
        _ = try await Authority.initialize(state: state, name: "PQ", keyType: .p256, constraints: .init(), passphrase: nil, actor: "test")
        let authority = try await Authority.open(state: state)
        defer { Task { try? await authority.close() } }
        let publisher = RevocationPublisher(authority: authority)
        #expect(try await publisher.currentPQ() == nil, "no ML-DSA hierarchy, no ML-DSA CRL")
        let hierarchy = try await authority.addPQHierarchy(variant: .mlDSA65, passphrase: nil, actor: "test")
        let key = try MLDSAPublicKey(variant: .mlDSA65, rawRepresentation: try MLDSASigningKey(generating: .mlDSA65).publicKey)
        let pqLeaf = try await authority.issue(.init(profile: .client, commonName: "pq"), mldsaKey: key, owner: nil, requester: "test")
        let classicalLeaf = try await authority.issue(.init(profile: .client, publicKey: try KeyType.p256.generate().publicKey, commonName: "old"), owner: nil, requester: "test")
        let now = Date()
        _ = try await authority.revokeAndPublish(serial: pqLeaf.record.serial, reason: .keyCompromise, actor: "test", publisher: publisher, now: now)
        _ = try await authority.revokeAndPublish(serial: classicalLeaf.record.serial, reason: .superseded, actor: "test", publisher: publisher, now: now)

        let pqDER = try #require(try await publisher.currentPQ(now: now))
        let pqCRL = try RevocationList(derEncoded: pqDER)
        #expect(pqCRL.isSigned(by: hierarchy.intermediate))
        #expect(!pqCRL.isSigned(by: hierarchy.root))
        #expect(pqCRL.signatureAlgorithm == nil && pqCRL.signatureAlgorithmOID == MLDSAVariant.mlDSA65.oid)
        #expect(pqCRL.entries.map { $0.serialNumber.bytes.hexString } == [pqLeaf.record.serial])
        let classical = try RevocationList(derEncoded: try await publisher.current(now: now).der)
        #expect(classical.entries.map { $0.serialNumber.bytes.hexString } == [classicalLeaf.record.serial])
        // Cached until the next revocation; a newer one has a larger number.
        #expect(try await publisher.currentPQ(now: now) == pqDER)
        let another = try await authority.issue(.init(profile: .client, commonName: "pq2"), mldsaKey: key, owner: nil, requester: "test")
        _ = try await authority.revokeAndPublish(serial: another.record.serial, reason: .unspecified, actor: "test", publisher: publisher, now: now)
        let newer = try RevocationList(derEncoded: try #require(try await publisher.currentPQ(now: now)))
        #expect(newer.entries.count == 2)
        let number = { (crl: RevocationList) in (crl.crlNumber ?? []).reduce(UInt64(0)) { $0 << 8 | UInt64($1) } }
        #expect(number(newer) > number(pqCRL))
    }

    @Test("OCSP: the ML-DSA issuing CA answers for its certificates with ML-DSA signatures; the classical responder is unchanged")
    func ocsp() async throws {
        let dir = TestPKI.temporaryDirectory("pq-ocsp")
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let state = StateDirectory(path: dir + "/state")
        _ = try await Authority.initialize(state: state, name: "PQ", keyType: .p256, constraints: .init(), passphrase: nil, actor: "test")
        let authority = try await Authority.open(state: state)
        defer { Task { try? await authority.close() } }
        let hierarchy = try await authority.addPQHierarchy(variant: .mlDSA65, passphrase: nil, actor: "test")
        let responder = OCSPResponder(authority: authority)
        let key = try MLDSAPublicKey(variant: .mlDSA65, rawRepresentation: try MLDSASigningKey(generating: .mlDSA65).publicKey)
        let good = try await authority.issue(.init(profile: .client, commonName: "good"), mldsaKey: key, owner: nil, requester: "t")
        let bad = try await authority.issue(.init(profile: .client, commonName: "bad"), mldsaKey: key, owner: nil, requester: "t")
        _ = try await authority.revoke(serial: bad.record.serial, reason: .keyCompromise, actor: "t")
        let now = Date()
        func ask(_ leaf: MLDSACertificate, issuer: MLDSACertificate) async throws -> OCSP.ParsedResponse {
            let id = try OCSP.CertID(issuer: issuer, serialNumber: Certificate.SerialNumber(bytes: leaf.serialNumber[...]))
            let answer = await responder.respond(to: try OCSP.Request(certIDs: [id], nonce: [1, 2, 3, 4, 5, 6, 7, 8]).derEncoded(), now: now)
            return try OCSP.ParsedResponse(derEncoded: answer.der)
        }
        let goodAnswer = try await ask(good.certificate, issuer: hierarchy.intermediate)
        #expect(goodAnswer.status == 0 && goodAnswer.isSigned(by: hierarchy.intermediate) && !goodAnswer.isSigned(by: hierarchy.root))
        #expect(goodAnswer.signatureAlgorithmOID == MLDSAVariant.mlDSA65.oid && goodAnswer.certificates.isEmpty)
        #expect(goodAnswer.nonce == [1, 2, 3, 4, 5, 6, 7, 8])
        #expect(goodAnswer.responses.first?.status == .good)
        let badAnswer = try await ask(bad.certificate, issuer: hierarchy.intermediate)
        guard case .revoked(_, let reason)? = badAnswer.responses.first?.status else {
            Issue.record("the revoked ML-DSA certificate is not reported revoked")
            return
        }
        #expect(reason == .keyCompromise && badAnswer.isSigned(by: hierarchy.intermediate))
        // A CertID naming the ML-DSA root (not an issuer of leaves here) is not ours to answer.
        let foreign = try await ask(good.certificate, issuer: hierarchy.root)
        #expect(foreign.status == 6, "unauthorized")
        // Classical certificates are still answered by the delegated classical responder.
        let classical = try await authority.issue(.init(profile: .client, publicKey: try KeyType.p256.generate().publicKey, commonName: "c"), owner: nil, requester: "t")
        let id = try OCSP.CertID(issuer: authority.ca.certificate, serialNumber: classical.certificate.serialNumber)
        let answer = try OCSP.ParsedResponse(derEncoded: await responder.respond(to: try OCSP.Request(certIDs: [id]).derEncoded(), now: now).der)
        #expect(answer.responses.first?.status == .good && answer.certificates.count == 1 && answer.signatureAlgorithmOID != MLDSAVariant.mlDSA65.oid)
    }

    @Test("the report counts valid end-entity certificates by key and identities by their newest certificate")
    func report() async throws {
        let dir = TestPKI.temporaryDirectory("pq-report")
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let state = StateDirectory(path: dir + "/state")
        _ = try await Authority.initialize(state: state, name: "PQ", keyType: .p256, constraints: .init(), passphrase: nil, actor: "test")
        let authority = try await Authority.open(state: state)
        defer { Task { try? await authority.close() } }
        _ = try await authority.addPQHierarchy(variant: .mlDSA65, passphrase: nil, actor: "test")
        let now = Date()
        // "a" moved (P-256 then ML-DSA), "b" still classical, "c" ML-DSA-87 from the start.
        _ = try await authority.issue(.init(profile: .client, publicKey: try KeyType.p256.generate().publicKey, commonName: "a"), owner: nil, requester: "t", now: now.addingTimeInterval(-60))
        _ = try await authority.issue(.init(profile: .client, commonName: "a"), mldsaKey: try MLDSAPublicKey(variant: .mlDSA65, rawRepresentation: try MLDSASigningKey(generating: .mlDSA65).publicKey), owner: nil, requester: "t", now: now)
        _ = try await authority.issue(.init(profile: .client, publicKey: try KeyType.p384.generate().publicKey, commonName: "b"), owner: "team-b", requester: "t", now: now)
        _ = try await authority.issue(.init(profile: .client, commonName: "c"), mldsaKey: try MLDSAPublicKey(variant: .mlDSA87, rawRepresentation: try MLDSASigningKey(generating: .mlDSA87).publicKey), owner: nil, requester: "t", now: now)
        let report = try await authority.pqReport(now: now.addingTimeInterval(1))
        #expect(report.hierarchy == "ml-dsa-65")
        // The admin certificate made by init is a classical identity too.
        #expect(report.certificatesByAlgorithm == ["P-256": 2, "ML-DSA-65": 1, "P-384": 1, "ML-DSA-87": 1])
        #expect(report.identities == 4 && report.postQuantumIdentities == 2)
        #expect(Set(report.classicalIdentities.map(\.identity)) == ["b", "mutual admin"])
        #expect(report.classicalIdentities.first { $0.identity == "b" }?.owner == "team-b")
    }
}
