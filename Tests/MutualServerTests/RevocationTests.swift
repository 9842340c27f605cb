import Foundation
#if canImport(FoundationNetworking)
import FoundationNetworking
#endif
import MutualAuthority
import MutualClient
import MutualPKI
import MutualStore
import Testing
import TestSupport
import X509

@Suite("CRL, OCSP and revocation events on a running authority", .serialized)
struct RevocationTests {
    func issue(_ server: ServerHarness, _ name: String) async throws -> Authority.IssuedCertificate {
        let key = try KeyType.p256.generate()
        return try await server.authority.issue(.init(profile: .client, publicKey: key.publicKey, commonName: name), owner: nil, requester: "test")
    }

    func post(_ url: String, body: [UInt8], contentType: String = "application/ocsp-request") async throws -> (Int, [UInt8]) {
        var request = URLRequest(url: URL(string: url)!)
        request.httpMethod = "POST"
        request.setValue(contentType, forHTTPHeaderField: "Content-Type")
        request.httpBody = Data(body)
        let (data, response) = try await URLSession.shared.data(for: request)
        return ((response as? HTTPURLResponse)?.statusCode ?? 0, Array(data))
    }

    @Test("OCSP: good, then revoked with time and reason; the cached answer is invalidated by the revocation")
    func ocspLifecycle() async throws {
        let server = try await ServerHarness.start()
        do {
            let leaf = try await issue(server, "alice")
            let id = try OCSP.CertID(issuer: server.authority.ca.certificate, serialNumber: leaf.certificate.serialNumber)
            let request = try OCSP.Request(certIDs: [id]).derEncoded()
            let (status1, first) = try await post(server.httpURL + "/ocsp", body: request)
            #expect(status1 == 200)
            let parsed1 = try OCSP.ParsedResponse(derEncoded: first)
            #expect(parsed1.responses.first?.status == .good)
            let signer = try #require(parsed1.certificates.first)
            #expect(parsed1.isSigned(by: signer))
            #expect(try signer.extensions.extendedKeyUsage?.contains(.ocspSigning) == true)
            #expect(signer.extensions[oid: OCSP.noCheckOID] != nil)
            // Same question again: the cached bytes.
            let (_, second) = try await post(server.httpURL + "/ocsp", body: request)
            #expect(second == first)

            let mtls = try server.client(identity: try server.adminIdentity())
            try await mtls.revoke(serial: leaf.record.serial, reason: "keyCompromise")
            try await mtls.shutdown()
            try await Task.sleep(for: .milliseconds(200))
            let (_, third) = try await post(server.httpURL + "/ocsp", body: request)
            guard case .revoked(_, let reason)? = try OCSP.ParsedResponse(derEncoded: third).responses.first?.status else {
                Issue.record("expected revoked")
                return
            }
            #expect(reason == .keyCompromise)

            // Nonce echoed.
            let withNonce = try OCSP.Request(certIDs: [id], nonce: [1, 2, 3, 4, 5, 6, 7, 8]).derEncoded()
            let (_, noncedBytes) = try await post(server.httpURL + "/ocsp", body: withNonce)
            #expect(try OCSP.ParsedResponse(derEncoded: noncedBytes).nonce == [1, 2, 3, 4, 5, 6, 7, 8])
        } catch {
            await server.stop()
            throw error
        }
        await server.stop()
    }

    @Test("hostile OCSP requests get protocol answers, never a crash")
    func hostileOCSP() async throws {
        let server = try await ServerHarness.start()
        do {
            let leaf = try await issue(server, "bob")
            let good = try OCSP.Request(certIDs: [try OCSP.CertID(issuer: server.authority.ca.certificate, serialNumber: leaf.certificate.serialNumber)]).derEncoded()
            let other = try TestPKI.issuingCA()
            let foreign = try OCSP.Request(certIDs: [try OCSP.CertID(issuer: other.certificate, serialNumber: leaf.certificate.serialNumber)]).derEncoded()
            let unknownSerial = try OCSP.Request(certIDs: [try OCSP.CertID(issuer: server.authority.ca.certificate, serialNumber: .init(bytes: [0x01, 0x02]))]).derEncoded()
            let cases: [(String, [UInt8], UInt8)] = [
                ("garbage", Array("hello".utf8), 1),
                ("empty", [], 1),
                ("truncated", Array(good.prefix(good.count / 2)), 1),
                ("oversized", [UInt8](repeating: 0x30, count: 20_000), 1),
                ("huge length", [0x30, 0x84, 0x7F, 0xFF, 0xFF, 0xFF], 1),
                ("unknown issuer", foreign, 6),
            ]
            for (label, body, expected) in cases {
                let (status, bytes) = try await post(server.httpURL + "/ocsp", body: body)
                #expect(status == 200, "\(label)")
                #expect(bytes == OCSP.errorResponse(OCSP.ErrorStatus(rawValue: expected)!), "\(label): \(bytes.prefix(8))")
            }
            let (_, unknownBytes) = try await post(server.httpURL + "/ocsp", body: unknownSerial)
            #expect(try OCSP.ParsedResponse(derEncoded: unknownBytes).responses.first?.status == .unknown)
            let (_, wrongType) = try await post(server.httpURL + "/ocsp", body: good, contentType: "text/plain")
            #expect(wrongType == OCSP.errorResponse(.malformedRequest))
            for path in ["/ocsp/!!!!", "/ocsp/" + String(repeating: "A", count: 40_000), "/ocsp/%ZZ"] {
                let (data, response) = try await URLSession.shared.data(from: URL(string: server.httpURL + path)!)
                #expect((response as? HTTPURLResponse)?.statusCode == 200 || (response as? HTTPURLResponse)?.statusCode == 414 || (response as? HTTPURLResponse)?.statusCode == 431, "\(path.prefix(20))")
                if (response as? HTTPURLResponse)?.statusCode == 200 { #expect(Array(data) == OCSP.errorResponse(.malformedRequest)) }
            }
            // Still alive and answering.
            let (_, after) = try await post(server.httpURL + "/ocsp", body: good)
            #expect(try OCSP.ParsedResponse(derEncoded: after).responses.first?.status == .good)
        } catch {
            await server.stop()
            throw error
        }
        await server.stop()
    }

    @Test("a revocation storm with concurrent CRL reads: every revocation lands on the final CRL, numbers increase")
    func revocationStorm() async throws {
        let server = try await ServerHarness.start()
        do {
            var serials: [Authority.IssuedCertificate] = []
            for i in 0..<40 { serials.append(try await issue(server, "storm-\(i)")) }
            let admin = try server.client(identity: try server.adminIdentity())
            let crlURL = URL(string: server.httpURL + "/crl")!
            var numbers: [Int] = []
            var failures: [String] = []
            await withTaskGroup(of: Result<Int?, any Error>.self) { group in
                for issued in serials {
                    group.addTask {
                        do {
                            try await admin.revoke(serial: issued.record.serial, reason: "superseded")
                            return .success(nil)
                        } catch { return .failure(error) }
                    }
                    group.addTask {
                        do {
                            let (data, _) = try await URLSession.shared.data(from: crlURL)
                            let crl = try RevocationList(derEncoded: Array(data))
                            return .success(Int(crl.crlNumber?.last ?? 0) + 256 * Int(crl.crlNumber?.dropLast().last ?? 0))
                        } catch { return .failure(error) }
                    }
                }
                for await result in group {
                    switch result {
                    case .success(let number?): numbers.append(number)
                    case .success(nil): break
                    case .failure(let error): failures.append("\(error)")
                    }
                }
            }
            try await admin.shutdown()
            #expect(failures.isEmpty, "\(failures.prefix(3))")
            let (data, _) = try await URLSession.shared.data(from: crlURL)
            let final = try RevocationList(derEncoded: Array(data))
            #expect(final.isSigned(by: server.authority.ca.certificate))
            let listed = Set(final.entries.map { $0.serialNumber.bytes.hexString })
            for issued in serials { #expect(listed.contains(issued.record.serial)) }
            #expect(numbers.allSatisfy { $0 >= 1 })
            let latest = try #require(try await server.authority.store.latestCRL())
            #expect(latest.number >= 2)
        } catch {
            await server.stop()
            throw error
        }
        await server.stop()
    }

    @Test("events: a subscriber resumes with Last-Event-ID and misses nothing")
    func eventResume() async throws {
        let server = try await ServerHarness.start()
        do {
            let first = try await issue(server, "e1")
            let second = try await issue(server, "e2")
            _ = try await server.authority.revoke(serial: first.record.serial, reason: .superseded, actor: "test")
            _ = try await server.authority.revoke(serial: second.record.serial, reason: .keyCompromise, actor: "test")
            // Resume after event 1: only event 2 is replayed.
            let (code, text) = try await server.curl("/v1/revocations/events", headers: ["Last-Event-ID: 1"], maxTime: 2)
            #expect(code == 200 || code == 0)
            #expect(text.contains("id: 2"))
            #expect(text.contains(second.record.serial))
            #expect(!text.contains(first.record.serial))
            let (catchCode, catchUp) = try await server.curl("/v1/revocations")
            #expect(catchCode == 200)
            #expect(catchUp.contains(first.record.serial) && catchUp.contains(second.record.serial))
            let (badCode, _) = try await server.curl("/v1/revocations?since=abc")
            #expect(badCode == 400)
            let (missingCode, _) = try await server.curl("/v1/revocations?since=9999")
            #expect(missingCode == 404)
        } catch {
            await server.stop()
            throw error
        }
        await server.stop()
    }
}
