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
