import Foundation
import MutualAuthority
import MutualClient
import MutualPKI
@testable import MutualServer
import MutualStore
import NIOCore
import NIOPosix
import Testing
import TestSupport
import X509

@Suite("Authority server on 127.0.0.1 with real TLS", .serialized)
struct ServerTests {
    @Test("enroll with a token, renew over mTLS with a new key, then the revoked certificate cannot renew")
    func enrollRenewRevoke() async throws {
        let server = try await ServerHarness.start()
        do {
            let token = try await server.token(scopes: ["spiffe://example.org/ns/prod/*"])
            let key = try KeyType.p256.generate()
            let anonymous = try server.client()
            let enrollment = try await anonymous.sign(csrPEM: try ServerHarness.csr(key, uri: "spiffe://example.org/ns/prod/sa/api"), token: token.token)
            try await anonymous.shutdown()
            #expect(enrollment.chain.count == 2)
            let record = try #require(try await server.authority.store.certificate(serial: enrollment.serial))
            #expect(record.requester == "token:\(token.record.id)")

            // Renewal: the CSR asks for another identity; the new certificate keeps the current one.
            let mtls = try server.client(identity: (enrollment.chain.compactMap(\.classical), key))
            let newKey = try KeyType.p256.generate()
            let renewed = try await mtls.renew(csrPEM: try ServerHarness.csr(newKey, uri: "spiffe://example.org/ns/prod/sa/admin"))
            let sans = try #require(try renewed.certificate.extensions.subjectAlternativeNames)
            #expect(Array(sans) == [.uniformResourceIdentifier("spiffe://example.org/ns/prod/sa/api")])
            #expect(renewed.certificate.classical?.publicKey == newKey.publicKey)
            let lifetime = renewed.certificate.notValidAfter.timeIntervalSince(renewed.certificate.notValidBefore)
            let original = enrollment.certificate.notValidAfter.timeIntervalSince(enrollment.certificate.notValidBefore)
            #expect(abs(lifetime - original) < 2, "same lifetime")

            // The same key again is refused.
            let sameKey = await #expect(throws: AuthorityClientError.self) { _ = try await mtls.renew(csrPEM: try ServerHarness.csr(key, uri: "spiffe://example.org/ns/prod/sa/api")) }
            #expect(sameKey?.status == 403)

            // A client may revoke itself; then its certificate can no longer renew (passive revocation).
            try await mtls.revoke(serial: enrollment.serial, reason: "keyCompromise")
            let revoked = await #expect(throws: AuthorityClientError.self) { _ = try await mtls.renew(csrPEM: try ServerHarness.csr(try KeyType.p256.generate())) }
            #expect(revoked?.status == 403)
            #expect(revoked?.detail.contains("revoked") == true)
            try await mtls.shutdown()
        } catch {
            await server.stop()
            throw error
        }
        await server.stop()
    }

    @Test("100 concurrent signs with a 1-use token: exactly one succeeds, exactly one certificate recorded")
    func oneUseTokenUnderConcurrency() async throws {
        let server = try await ServerHarness.start()
        do {
            let token = try await server.token(scopes: ["*.svc.example.org"], profile: .server, uses: 1)
            let before = try await server.authority.store.countCertificates()
            let client = try server.client()
            let csrs = try (0..<100).map { _ in try ServerHarness.csr(try KeyType.p256.generate(), dns: ["api.svc.example.org"]) }
            let results = await withTaskGroup(of: Int.self) { group in
                for csr in csrs {
                    group.addTask {
                        do {
                            _ = try await client.sign(csrPEM: csr, token: token.token)
                            return 200
                        } catch let error as AuthorityClientError {
                            return error.status
                        } catch {
                            return -1
                        }
                    }
                }
                return await group.reduce(into: [Int]()) { $0.append($1) }
            }
            try await client.shutdown()
            #expect(results.filter { $0 == 200 }.count == 1)
            #expect(results.filter { $0 == 403 }.count == 99, "\(Dictionary(grouping: results, by: { $0 }).mapValues(\.count))")
            #expect(try await server.authority.store.countCertificates() == before + 1)
            let refusals = try await server.authority.store.auditEvents().filter { $0.action == "refused" }
            #expect(refusals.count == 99)
            guard case .intact = try await server.authority.store.verifyAudit() else { Issue.record("audit chain broken"); return }
        } catch {
            await server.stop()
            throw error
        }
        await server.stop()
    }

    @Test("token refusals: each with its status and reason, each audited")
    func tokenRefusals() async throws {
        let server = try await ServerHarness.start()
        do {
            let key = try KeyType.p256.generate()
            let csr = try ServerHarness.csr(key, uri: "spiffe://example.org/ns/prod/sa/api")
            let scoped = try await server.token(scopes: ["spiffe://example.org/ns/dev/*"], uses: 5)
            let expired = try await server.token(scopes: ["spiffe://example.org/*"], ttl: .seconds(1))
            let revoked = try await server.token(scopes: ["spiffe://example.org/*"])
            try await TokenService(store: server.authority.store).revoke(id: revoked.record.id, actor: "test")
            let serverToken = try await server.token(scopes: ["spiffe://example.org/*"], profile: .server)
            let short = try await server.token(scopes: ["spiffe://example.org/*"], maxValidity: .hours(1))
            try await Task.sleep(for: .seconds(1.2))
            let wrongSecret = String(scoped.token.dropLast(4)) + "AAAA"

            let cases: [(String, String?, String, Int, String)] = [
                ("no token", nil, ServerHarness.encode(["csr": csr]), 401, "unauthenticated"),
                ("not a Mutual token", "Bearer abc", ServerHarness.encode(["csr": csr]), 401, "token-invalid"),
                ("wrong secret", "Bearer \(wrongSecret)", ServerHarness.encode(["csr": csr]), 401, "token-invalid"),
                ("out of scope", "Bearer \(scoped.token)", ServerHarness.encode(["csr": csr]), 403, "token-out-of-scope"),
                ("expired", "Bearer \(expired.token)", ServerHarness.encode(["csr": csr]), 403, "token-expired"),
                ("revoked", "Bearer \(revoked.token)", ServerHarness.encode(["csr": csr]), 403, "token-revoked"),
                ("wrong profile", "Bearer \(serverToken.token)", ServerHarness.encode(["csr": csr]), 422, "profile-violation"),
                ("validity above the token's", "Bearer \(short.token)", ServerHarness.encode(["csr": csr, "validity": "2h"]), 403, "token-not-allowed"),
            ]
            for (label, authorization, body, status, type) in cases {
                let (code, text) = try await server.curl("/v1/sign", method: "POST", body: body, headers: authorization.map { ["Authorization: \($0)"] } ?? [])
                #expect(code == status, "\(label): \(code) \(text)")
                #expect((ServerHarness.json(text)["type"] as? String) == "urn:mutual:problem:\(type)", "\(label): \(text)")
                #expect(!((ServerHarness.json(text)["detail"] as? String) ?? "").isEmpty)
            }
            let reasons = try await server.authority.store.auditEvents().filter { $0.action == "refused" }.map(\.subject)
            for code in ["token-invalid", "token-out-of-scope", "token-expired", "token-revoked", "token-not-allowed"] {
                #expect(reasons.contains(code), "\(code) not audited: \(reasons)")
            }
            #expect(try await server.authority.store.certificates(.init(now: .now)).allSatisfy { $0.requester != "token:\(scoped.record.id)" })
        } catch {
            await server.stop()
            throw error
        }
        await server.stop()
    }

    @Test("bad input never gets a 500: 415, 413, 400 with reasons")
    func badInput() async throws {
        let server = try await ServerHarness.start()
        do {
            let token = try await server.token(scopes: ["spiffe://example.org/*"], uses: 100)
            let auth = ["Authorization: Bearer \(token.token)"]
            let big = String(repeating: "a", count: 70_000)
            let cases: [(String, String, String?, Int)] = [
                ("wrong content type", "csr=abc", "text/plain", 415),
                ("no content type", "{}", nil, 415),
                ("oversized body", "{\"csr\":\"\(big)\"}", "application/json", 413),
                ("not JSON", "{{{", "application/json", 400),
                ("missing csr", "{}", "application/json", 400),
                ("csr not a string", "{\"csr\": 5}", "application/json", 400),
                ("garbage csr", "{\"csr\": \"garbage\"}", "application/json", 400),
                ("truncated PEM", "{\"csr\": \"-----BEGIN CERTIFICATE REQUEST-----\\nMIIB\\n-----END CERTIFICATE REQUEST-----\"}", "application/json", 400),
                ("bad validity", ServerHarness.encode(["csr": "x", "validity": "forever"]), "application/json", 400),
                ("unknown profile", ServerHarness.encode(["csr": "x", "profile": "root"]), "application/json", 422),
                ("binary junk", String(decoding: (0..<2000).map { UInt8($0 % 256) }, as: UTF8.self), "application/json", 400),
            ]
            for (label, body, contentType, status) in cases {
                let (code, text) = try await server.curl("/v1/sign", method: "POST", body: body, contentType: contentType, headers: auth)
                #expect(code == status, "\(label): \(code) \(text.prefix(200))")
                #expect(ServerHarness.json(text)["type"] != nil, "\(label): not problem+json: \(text.prefix(100))")
            }
            // mTLS endpoints without a client certificate: 401.
            for path in ["/v1/renew", "/v1/revoke"] {
                let (code, _) = try await server.curl(path, method: "POST", body: "{\"csr\":\"x\",\"serial\":\"ab\"}")
                #expect(code == 401, "\(path)")
            }
            let (listCode, _) = try await server.curl("/v1/certificates")
            #expect(listCode == 401)
            // renew-expired is off by default.
            let (expiredCode, expiredText) = try await server.curl("/v1/renew-expired", method: "POST", body: "{\"certificate\":\"x\",\"csr\":\"x\",\"timestamp\":\"x\",\"signature\":\"\"}")
            #expect(expiredCode == 400 || expiredCode == 403, "\(expiredText)")
        } catch {
            await server.stop()
            throw error
        }
        await server.stop()
    }

    @Test("admin endpoints: admin certificate lists and revokes; a workload certificate may not")
    func adminEndpoints() async throws {
        let server = try await ServerHarness.start()
        do {
            let admin = (cert: server.state.adminDirectory + "/chain.pem", key: server.state.adminDirectory + "/key.pem")
            let (code, text) = try await server.curl("/v1/certificates?limit=2", clientCert: admin)
            #expect(code == 200, "\(text)")
            let page = ServerHarness.json(text)
            #expect((page["items"] as? [Any])?.count == 2)
            #expect(page["next_offset"] as? Int == 2)
            let (badFilter, _) = try await server.curl("/v1/certificates?status=weird", clientCert: admin)
            #expect(badFilter == 400)

            // A workload certificate issued by this CA: can read itself, not list, not revoke others.
            let key = try KeyType.p256.generate()
            let issued = try await server.authority.issue(.init(profile: .workload, publicKey: key.publicKey, uris: ["spiffe://example.org/w"]), owner: nil, requester: "test")
            let other = try await server.authority.issue(.init(profile: .workload, publicKey: key.publicKey, uris: ["spiffe://example.org/x"]), owner: nil, requester: "test")
            try PEMBundle.pem(issued.chain).write(toFile: server.dir + "/w.pem", atomically: true, encoding: .utf8)
            try KeyFile.pem(for: key, passphrase: nil).write(toFile: server.dir + "/w.key", atomically: true, encoding: .utf8)
            let workload = (cert: server.dir + "/w.pem", key: server.dir + "/w.key")
            #expect(try await server.curl("/v1/certificates", clientCert: workload).0 == 403)
            #expect(try await server.curl("/v1/certificates/\(issued.record.serial)", clientCert: workload).0 == 200)
            #expect(try await server.curl("/v1/certificates/\(other.record.serial)", clientCert: workload).0 == 403)
            let (revokeOther, _) = try await server.curl("/v1/revoke", method: "POST", body: ServerHarness.encode(["serial": other.record.serial, "reason": "superseded"]), clientCert: workload)
            #expect(revokeOther == 403)
            let (adminRevoke, adminText) = try await server.curl("/v1/revoke", method: "POST", body: ServerHarness.encode(["serial": other.record.serial, "reason": "superseded"]), clientCert: admin)
            #expect(adminRevoke == 200, "\(adminText)")
            let (again, _) = try await server.curl("/v1/revoke", method: "POST", body: ServerHarness.encode(["serial": other.record.serial, "reason": "superseded"]), clientCert: admin)
            #expect(again == 409)
            let (unknown, _) = try await server.curl("/v1/revoke", method: "POST", body: ServerHarness.encode(["serial": "abcdef", "reason": "superseded"]), clientCert: admin)
            #expect(unknown == 404)
            let (badReason, _) = try await server.curl("/v1/revoke", method: "POST", body: ServerHarness.encode(["serial": issued.record.serial, "reason": "because"]), clientCert: admin)
            #expect(badReason == 400)

            let (rootsCode, roots) = try await server.curl("/roots.pem")
            #expect(rootsCode == 200 && roots.contains("BEGIN CERTIFICATE"))
            let (bundleCode, bundle) = try await server.curl("/bundle.pem")
            #expect(bundleCode == 200 && bundle.components(separatedBy: "BEGIN CERTIFICATE").count == 3)
            #expect(try await server.curl("/healthz").0 == 200)
            let (metricsCode, metrics) = try await server.curl("/metrics")
            #expect(metricsCode == 200)
            #expect(metrics.contains("mutual_revocation_total{outcome=\"ok\",reason=\"none\"} 1"))
            #expect(metrics.contains("mutual_certificates{status=\"revoked\"} 1"))
            #expect(metrics.contains("mutual_soonest_expiry_seconds"))
        } catch {
            await server.stop()
            throw error
        }
        await server.stop()
    }

    @Test("renew-expired: within the grace window with proof of possession; refused without proof or past the window")
    func renewExpired() async throws {
        let server = try await ServerHarness.start(renewExpiredGrace: .hours(2))
        do {
            let key = try KeyType.p256.generate()
            // Issued two hours ago for one hour: expired an hour ago.
            let old = try await server.authority.issue(
                .init(profile: .workload, publicKey: key.publicKey, uris: ["spiffe://example.org/device/7"], validity: .hours(1)),
                owner: "fleet", requester: "test", now: Date.now.addingTimeInterval(-7200)
            )
            let client = try server.client()
            let newKey = try KeyType.p256.generate()
            let csr = try TestPKI.csr(key: newKey, sans: [.uniformResourceIdentifier("spiffe://example.org/device/7")])
            // Proof signed by the wrong key: refused.
            let forged = await #expect(throws: AuthorityClientError.self) {
                _ = try await client.renewExpired(certificate: old.certificate, oldKey: try KeyType.p256.generate(), csr: csr)
            }
            #expect(forged?.status == 403)
            let renewed = try await client.renewExpired(certificate: old.certificate, oldKey: key, csr: csr)
            #expect(renewed.certificate.classical?.publicKey == newKey.publicKey)
            #expect(try await server.authority.store.certificate(serial: renewed.serial)?.requester == "cert:\(old.record.serial)")

            // Expired longer ago than the window: refused with the reason.
            let ancient = try await server.authority.issue(
                .init(profile: .workload, publicKey: key.publicKey, uris: ["spiffe://example.org/device/8"], validity: .hours(1)),
                owner: "fleet", requester: "test", now: Date.now.addingTimeInterval(-5 * 3600)
            )
            let late = await #expect(throws: AuthorityClientError.self) {
                _ = try await client.renewExpired(certificate: ancient.certificate, oldKey: key, csr: csr)
            }
            #expect(late?.type == "urn:mutual:problem:beyond-grace")
            try await client.shutdown()
        } catch {
            await server.stop()
            throw error
        }
        await server.stop()
    }

    @Test("a client refused at the TLS handshake (a server-only certificate used as a client's) is counted by reason on the authority, not lost")
    func handshakeRefusalsCounted() async throws {
        let server = try await ServerHarness.start()
        do {
            let key = try KeyType.p256.generate()
            let issued = try await server.authority.issue(.init(profile: .server, publicKey: key.publicKey, dnsNames: ["web.example.org"]), owner: nil, requester: "test")
            try PEMBundle.pem(issued.chain).write(toFile: server.dir + "/s.pem", atomically: true, encoding: .utf8)
            try KeyFile.pem(for: key, passphrase: nil).write(toFile: server.dir + "/s.key", atomically: true, encoding: .utf8)
            let (refused, _) = try await server.curl("/healthz", clientCert: (cert: server.dir + "/s.pem", key: server.dir + "/s.key"))
            #expect(refused != 200)
            let (code, metrics) = try await server.curl("/metrics")
            #expect(code == 200)
            let line = metrics.split(separator: "\n").first { $0.hasPrefix("mutual_tls_handshake_failures_total{") }
            #expect(line != nil, "no handshake failure counted")
            #expect(line?.hasSuffix(" 1") == true, "\(line ?? "-")")
        } catch {
            await server.stop()
            throw error
        }
        await server.stop()
    }

    @Test("requests the HTTP parser refuses get problem+json with a code too: oversized headers 431, garbage 400, on both listeners")
    func parserRefusalsAreProblems() async throws {
        let server = try await ServerHarness.start()
        do {
            let huge = "X-Big: " + String(repeating: "a", count: 100_000)
            let (code, body) = try await server.curl("/healthz", headers: [huge])
            #expect(code == 431, "\(code) \(body.prefix(200))")
            #expect(ServerHarness.json(body)["type"] as? String == "urn:mutual:problem:headers-too-large", "\(body.prefix(200))")
            // A request line that is not HTTP, on the plain listener, read with a raw socket.
            let process = Process()
            process.executableURL = URL(fileURLWithPath: "/bin/bash")
            process.arguments = ["-c", "exec 3<>/dev/tcp/127.0.0.1/\(server.httpPort); printf 'GARBAGE \\x01\\r\\n\\r\\n' >&3; timeout 5 cat <&3"]
            let pipe = Pipe()
            process.standardOutput = pipe
            try process.run()
            let output = String(decoding: pipe.fileHandleForReading.readDataToEndOfFile(), as: UTF8.self)
            process.waitUntilExit()
            #expect(output.hasPrefix("HTTP/1.1 400"), "\(output.prefix(200))")
            #expect(output.contains("application/problem+json") && output.contains("urn:mutual:problem:malformed-request"), "\(output.prefix(400))")
        } catch {
            await server.stop()
            throw error
        }
        await server.stop()
    }

    @Test("BoringSSL reason codes become bounded metric labels")
    func handshakeReasonCodes() {
        #expect(HandshakeFailureLogger.reasonCode("sslError([Error: 268436499 error:10000413:SSL routines:OPENSSL_internal:SSLV3_ALERT_UNSUPPORTED_CERTIFICATE at x.cc:491])") == "sslv3_alert_unsupported_certificate")
        #expect(HandshakeFailureLogger.reasonCode("a:OPENSSL_internal:FIRST b:OPENSSL_internal:CERTIFICATE_VERIFY_FAILED at y") == "certificate_verify_failed")
        #expect(HandshakeFailureLogger.reasonCode("garbage") == "other")
        #expect(HandshakeFailureLogger.reasonCode("OPENSSL_internal:") == "other")
    }

    @Test("a slow client that stops sending is disconnected by the idle timeout")
    func slowClient() async throws {
        let server = try await ServerHarness.start(idleTimeout: .seconds(1))
        do {
            let group = MultiThreadedEventLoopGroup.singleton
            let channel = try await ClientBootstrap(group: group).connect(host: "127.0.0.1", port: server.port).get()
            // Send half a TLS ClientHello's worth of nothing useful and stall.
            try await channel.writeAndFlush(ByteBuffer(bytes: [0x16, 0x03, 0x01, 0x02, 0x00])).get()
            let closed = Date.now
            try await withThrowingTaskGroup(of: Void.self) { tasks in
                tasks.addTask { try await channel.closeFuture.get() }
                tasks.addTask {
                    try await Task.sleep(for: .seconds(10))
                    throw CancellationError()
                }
                try await tasks.next()
                tasks.cancelAll()
            }
            #expect(Date.now.timeIntervalSince(closed) < 9, "the server closed the stalled connection")
        } catch {
            await server.stop()
            throw error
        }
        await server.stop()
    }
}
