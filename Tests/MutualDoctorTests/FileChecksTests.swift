import Foundation
import MutualDoctor
import MutualPKI
import Testing
import TestSupport
import X509

@Suite("mutual doctor files: each mistake named by its code, a healthy pair by none")
struct FileChecksTests {
    let now = TestPKI.now
    let ca: IssuingCA
    let key: Certificate.PrivateKey
    let server: Certificate

    init() throws {
        ca = try TestPKI.issuingCA(now: TestPKI.now.addingTimeInterval(-86_400))
        key = try KeyType.p256.generate()
        server = try ca.issue(.init(profile: .server, publicKey: key.publicKey, dnsNames: ["api.example.org"], validity: .days(30)), now: TestPKI.now.addingTimeInterval(-3600))
    }

    func codes(_ checks: FileChecks, at time: Date? = nil) async -> [String] {
        await checks.run(now: time ?? now).findings.map(\.code)
    }

    func checks(_ presented: [Certificate], roots: [Certificate]? = nil) -> FileChecks {
        var checks = FileChecks(presented: presented)
        checks.roots = roots ?? [ca.root]
        checks.key = key
        checks.keyMode = 0o600
        return checks
    }

    @Test("a healthy certificate, chain and key: no findings, exit 0")
    func healthy() async {
        var healthy = checks([server, ca.certificate])
        healthy.purpose = .server
        healthy.dnsName = "api.example.org"
        let diagnosis = await healthy.run(now: now)
        #expect(diagnosis.findings.isEmpty, "\(diagnosis.text)")
        #expect(diagnosis.isHealthy)
    }

    @Test("leaf only: missing-intermediate; with the intermediate in --chain it is still named")
    func leafOnly() async {
        #expect(await codes(checks([server])) == ["missing-intermediate"])
        var withExtra = checks([server])
        withExtra.extraIntermediates = [ca.certificate]
        #expect(await codes(withExtra) == ["missing-intermediate"])
    }

    @Test("leaf only and no roots to try: the shape alone names missing-intermediate")
    func leafOnlyWithoutRoots() async {
        var noRoots = checks([server])
        noRoots.roots = nil
        #expect(await codes(noRoots) == ["missing-intermediate"])
        var chain = checks([server, ca.certificate])
        chain.roots = nil
        #expect(await codes(chain).isEmpty)
    }

    @Test("a chain out of order or with extras: chain-order")
    func order() async {
        let other = try! TestPKI.issuingCA(now: now.addingTimeInterval(-86_400))
        #expect(await codes(checks([server, other.certificate, ca.certificate])).contains("chain-order"))
    }

    @Test("a chain that leads to another CA: unknown-ca")
    func foreign() async throws {
        let other = try TestPKI.issuingCA(now: now.addingTimeInterval(-86_400))
        #expect(await codes(checks([server, ca.certificate], roots: [other.root])) == ["unknown-ca"])
    }

    @Test("a key that does not belong to the certificate, a key readable by others")
    func keys() async throws {
        var mismatched = checks([server, ca.certificate])
        mismatched.key = try KeyType.p256.generate()
        #expect(await codes(mismatched) == ["key-mismatch"])
        var open = checks([server, ca.certificate])
        open.keyMode = 0o644
        #expect(await codes(open) == ["key-file-permissions"])
    }

    @Test("expired, not yet valid, expiring soon — the leaf and the intermediate")
    func validity() async throws {
        #expect(await codes(checks([server, ca.certificate]), at: now.addingTimeInterval(40 * 86_400)).contains("expired"))
        #expect(await codes(checks([server, ca.certificate]), at: now.addingTimeInterval(-7200)).contains("not-yet-valid"))
        #expect(await codes(checks([server, ca.certificate]), at: now.addingTimeInterval(27 * 86_400)) == ["expiring-soon"])
        let lapsedIntermediate = try TestPKI.certificate(
            subject: "Old Issuing CA", issuer: ca.root, issuerKey: ca.privateKey, publicKey: ca.certificate.publicKey,
            notBefore: now.addingTimeInterval(-90 * 86_400), notAfter: now.addingTimeInterval(-86_400), extensions: ca.certificate.extensions
        )
        #expect(await codes(checks([server, lapsedIntermediate], roots: [])).contains("expired"))
    }

    @Test("wrong purpose, wrong name (the CN is not a name), wrong identity")
    func names() async throws {
        var asClient = checks([server, ca.certificate])
        asClient.purpose = .client
        #expect(await codes(asClient) == ["wrong-eku"])
        var leafOnlyClient = checks([server])
        leafOnlyClient.purpose = .client
        #expect(Set(await codes(leafOnlyClient)) == ["missing-intermediate", "wrong-eku"], "one finding does not hide another")
        var otherName = checks([server, ca.certificate])
        otherName.dnsName = "web.example.org"
        #expect(await codes(otherName) == ["name-mismatch"])
        var identity = checks([server, ca.certificate])
        identity.expectedIdentity = "spiffe://example.org/ns/web/sa/api"
        #expect(await codes(identity) == ["identity-mismatch"])
        identity.expectedIdentity = "dns:api.example.org"
        #expect(await codes(identity).isEmpty)
    }

    @Test("CRLs a server enforces: fresh and complete says nothing; stale, future, forged, incomplete, listing the leaf")
    func crls() async throws {
        let h = try CAFactory.makeHierarchy(name: "CRL CA", keyType: .p256, constraints: .init(), now: now.addingTimeInterval(-86_400))
        let issuing = try IssuingCA(certificate: h.intermediate, privateKey: h.intermediateKey, root: h.root, policy: .init())
        let leafKey = try KeyType.p256.generate()
        let leaf = try issuing.issue(.init(profile: .client, publicKey: leafKey.publicKey, uris: ["spiffe://example.org/app"], validity: .days(30)), now: now.addingTimeInterval(-3600))
        func crl(_ issuer: Certificate, _ key: Certificate.PrivateKey, from: TimeInterval = -600, next: TimeInterval = 3600, listing: [Certificate] = []) throws -> RevocationList {
            let der = try RevocationListBuilder(issuer: issuer, issuerKey: key).build(
                number: 1, thisUpdate: now.addingTimeInterval(from), nextUpdate: now.addingTimeInterval(next),
                entries: listing.map { .init(serialNumber: $0.serialNumber, revocationDate: now.addingTimeInterval(-60), reason: .keyCompromise) }
            )
            return try RevocationList(derEncoded: der)
        }
        func codes(_ crls: [RevocationList]) async -> [String] {
            var checks = FileChecks(presented: [leaf, h.intermediate])
            checks.roots = [h.root]
            checks.crls = crls
            return await checks.run(now: now).findings.map(\.code)
        }
        let rootCRL = try crl(h.root, h.rootKey)
        #expect(await codes([try crl(h.intermediate, h.intermediateKey), rootCRL]).isEmpty)
        #expect(await codes([try crl(h.intermediate, h.intermediateKey, from: -7200, next: -1800), rootCRL]) == ["crl-stale"])
        #expect(await codes([try crl(h.intermediate, h.intermediateKey, from: 7200, next: 9000), rootCRL]) == ["crl-not-yet-valid"])
        #expect(await codes([try crl(h.intermediate, try KeyType.p256.generate()), rootCRL]) == ["crl-signature-invalid", "crl-missing"])
        #expect(await codes([try crl(h.intermediate, h.intermediateKey)]) == ["crl-missing"], "nginx checks every level: the root's CRL is needed too")
        // The CRL a certificate's distribution point names covers that certificate only: no level is missing.
        var fetched = FileChecks(presented: [leaf, h.intermediate])
        fetched.roots = [h.root]
        fetched.crls = [try crl(h.intermediate, h.intermediateKey)]
        fetched.crlsCoverEveryLevel = false
        #expect(await fetched.run(now: now).findings.isEmpty)
        #expect(await codes([try crl(h.intermediate, h.intermediateKey, listing: [leaf]), rootCRL]) == ["revoked"])
        #expect(await codes([try crl(ca.certificate, ca.privateKey), try crl(h.intermediate, h.intermediateKey), rootCRL]) == ["crl-unrelated"])
    }

    @Test("an empty certificate file: no-certificate")
    func empty() async {
        #expect(await codes(FileChecks(presented: [])) == ["no-certificate"])
    }
}

@Suite("mutual doctor endpoint: what was seen on the wire becomes codes (no sockets)")
struct EndpointDiagnosisTests {
    let ca: IssuingCA
    let server: Certificate

    init() throws {
        ca = try TestPKI.issuingCA(now: TestPKI.now.addingTimeInterval(-86_400))
        let key = try KeyType.p256.generate()
        server = try ca.issue(.init(profile: .server, publicKey: key.publicKey, dnsNames: ["web.test"], validity: .days(30)), now: TestPKI.now.addingTimeInterval(-3600))
    }

    func probe(client: Bool = false) -> EndpointProbe {
        var options = EndpointProbe.Options(host: "127.0.0.1", port: 8443)
        options.serverName = "web.test"
        options.roots = [ca.root]
        options.checkRevocation = false
        return EndpointProbe(options: options)
    }

    func codes(_ observation: EndpointProbe.Observation, _ probe: EndpointProbe? = nil) async -> [String] {
        await (probe ?? self.probe()).diagnose(observation, now: TestPKI.now).findings.map(\.code)
    }

    @Test("alerts before and after the server's certificate, and connection failures")
    func alerts() async {
        var refused = EndpointProbe.Observation()
        refused.connectError = "connection refused"
        #expect(await codes(refused) == ["unreachable"])
        var plain = EndpointProbe.Observation()
        plain.tlsReasons = ["WRONG_VERSION_NUMBER"]
        #expect(await codes(plain) == ["not-tls"])
        var suites = EndpointProbe.Observation()
        suites.tlsReasons = ["SSLV3_ALERT_HANDSHAKE_FAILURE"]
        #expect(await codes(suites) == ["no-common-protocol"])
        var silent = EndpointProbe.Observation()
        silent.timedOut = true
        #expect(await codes(silent) == ["timeout"])
        for (reason, code) in [("TLSV1_ALERT_CERTIFICATE_REQUIRED", "client-cert-required"), ("TLSV1_ALERT_UNKNOWN_CA", "client-ca-mismatch"),
                               ("SSLV3_ALERT_CERTIFICATE_REVOKED", "revoked"), ("SSLV3_ALERT_UNSUPPORTED_CERTIFICATE", "wrong-eku")] {
            var observation = EndpointProbe.Observation()
            observation.presented = [server, ca.certificate]
            observation.tlsReasons = [reason]
            observation.tlsError = "handshakeFailed(\(reason))"
            #expect(await codes(observation) == [code], "\(reason)")
        }
    }

    @Test("alert certificate_expired: expired when our chain is expired here; otherwise the server's clock or CRL, not a false 'expired'")
    func expiredAlert() async throws {
        let key = try KeyType.p256.generate()
        let client = try ca.issue(.init(profile: .client, publicKey: key.publicKey, uris: ["spiffe://example.org/c"], validity: .days(1)), now: TestPKI.now.addingTimeInterval(-3600))
        var options = probe().options
        options.clientChain = [client, ca.certificate]
        options.clientKey = key
        var observation = EndpointProbe.Observation()
        observation.presented = [server, ca.certificate]
        observation.tlsReasons = ["SSLV3_ALERT_CERTIFICATE_EXPIRED"]
        observation.tlsError = "handshakeFailed(SSLV3_ALERT_CERTIFICATE_EXPIRED)"
        let valid = await EndpointProbe(options: options).diagnose(observation, now: TestPKI.now).findings.map(\.code)
        #expect(valid == ["client-cert-refused"])
        let later = await EndpointProbe(options: options).diagnose(observation, now: TestPKI.now.addingTimeInterval(2 * 86_400)).findings.map(\.code)
        #expect(later.contains("expired") && !later.contains("client-cert-refused"))
    }

    @Test("the CA names of the server's CertificateRequest: client-ca-mismatch before any alert; nginx's refusal pages")
    func certificateRequest() async throws {
        let key = try KeyType.p256.generate()
        let client = try ca.issue(.init(profile: .client, publicKey: key.publicKey, uris: ["spiffe://example.org/c"], validity: .days(1)), now: TestPKI.now.addingTimeInterval(-3600))
        // Another CA by another name: the request carries names, not keys.
        let foreign = try CAFactory.makeHierarchy(name: "Foreign", keyType: .p256, constraints: .init(), now: TestPKI.now.addingTimeInterval(-86_400))
        var options = probe().options
        options.clientChain = [client, ca.certificate]
        options.clientKey = key
        var observation = EndpointProbe.Observation()
        observation.presented = [server, ca.certificate]
        observation.httpStatus = 200
        observation.clientCertificateRequest = .requested([foreign.root.subject])
        #expect(await codes(observation, EndpointProbe(options: options)) == ["client-ca-mismatch"])
        observation.clientCertificateRequest = .requested([ca.root.subject])
        #expect(await codes(observation, EndpointProbe(options: options)).isEmpty)
        observation.clientCertificateRequest = .requested([])
        #expect(await codes(observation, EndpointProbe(options: options)).isEmpty, "an empty list accepts any CA")
        // The alert and the request name the same cause once.
        observation.clientCertificateRequest = .requested([foreign.root.subject])
        observation.httpStatus = nil
        observation.tlsReasons = ["TLSV1_ALERT_UNKNOWN_CA"]
        observation.tlsError = "handshakeFailed(TLSV1_ALERT_UNKNOWN_CA)"
        #expect(await codes(observation, EndpointProbe(options: options)) == ["client-ca-mismatch"])
        // nginx refuses in HTTP, after the handshake.
        var nginx = EndpointProbe.Observation()
        nginx.presented = [server, ca.certificate]
        nginx.httpStatus = 400
        nginx.httpBody = "<html><head><title>400 No required SSL certificate was sent</title></head></html>"
        #expect(await codes(nginx) == ["client-cert-required"])
        nginx.httpBody = "<html><head><title>400 The SSL certificate error</title></head></html>"
        #expect(await codes(nginx, EndpointProbe(options: options)) == ["client-cert-refused"])
        nginx.clientCertificateRequest = .requested([foreign.root.subject])
        #expect(await codes(nginx, EndpointProbe(options: options)) == ["client-ca-mismatch"])
    }

    @Test("a healthy answer: nothing; the server's clock 2 h ahead: clock-skew")
    func clock() async {
        var healthy = EndpointProbe.Observation()
        healthy.presented = [server, ca.certificate]
        healthy.httpStatus = 200
        healthy.serverDate = TestPKI.now
        healthy.answeredAt = TestPKI.now
        #expect(await codes(healthy).isEmpty)
        var skewed = healthy
        skewed.serverDate = TestPKI.now.addingTimeInterval(7200)
        #expect(await codes(skewed) == ["clock-skew"])
    }
}
