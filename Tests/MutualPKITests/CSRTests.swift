import Foundation
import MutualPKI
import SwiftASN1
import Testing
import TestSupport
import X509

@Suite("CSR decoding and hostile requests")
struct CSRTests {
    @Test("a CSR asking to be a CA gets a plain leaf, and the request is noted")
    func caRequestBecomesLeaf() throws {
        let ca = try TestPKI.issuingCA()
        let key = try KeyType.p256.generate()
        let csr = try TestPKI.csr(
            key: key, commonName: "evil", sans: [.dnsName("evil.test")],
            extraExtensions: [
                try Certificate.Extension(BasicConstraints.isCertificateAuthority(maxPathLength: nil), critical: true),
                try Certificate.Extension(KeyUsage(keyCertSign: true, cRLSign: true), critical: true),
                try Certificate.Extension(ExtendedKeyUsage([.codeSigning]), critical: false),
            ]
        )
        let verified = try CSRDecoder.decode(TestPKI.pem(csr))
        let request = try IssuanceRequest(verifiedCSR: verified, profile: .client, validity: nil)
        #expect(request.droppedRequests.contains { $0.contains("cA=true") })
        let certificate = try ca.issue(request, now: TestPKI.now)
        #expect(try certificate.extensions.basicConstraints == .notCertificateAuthority)
        #expect(try certificate.extensions.keyUsage?.keyCertSign == false)
        #expect(try certificate.extensions.extendedKeyUsage.map(Array.init) == [.clientAuth])
    }

    @Test("DER and PEM CSRs decode alike")
    func derAndPEM() throws {
        let key = try KeyType.ed25519.generate()
        let csr = try TestPKI.csr(key: key, commonName: "x", sans: [.uniformResourceIdentifier("spiffe://a.test/w")])
        #expect(try CSRDecoder.decode(TestPKI.der(csr)).request == CSRDecoder.decode(TestPKI.pem(csr)).request)
    }

    @Test("garbage, truncated, oversized and wrongly signed CSRs are refused with a reason")
    func badCSRs() throws {
        let key = try KeyType.p256.generate()
        let good = try TestPKI.der(TestPKI.csr(key: key, commonName: "x"))

        let cases: [(String, [UInt8], PKIError.Code)] = [
            ("empty", [], .malformedInput),
            ("garbage", Array("hello, I am not a CSR".utf8), .malformedInput),
            ("truncated DER", Array(good.prefix(good.count / 2)), .malformedInput),
            ("oversized", [UInt8](repeating: 0x30, count: 70_000), .inputTooLarge),
            ("PEM of the wrong type", Array("-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n".utf8), .malformedInput),
            ("bad base64", Array("-----BEGIN CERTIFICATE REQUEST-----\n!!!!\n-----END CERTIFICATE REQUEST-----\n".utf8), .malformedInput),
        ]
        for (label, bytes, code) in cases {
            let error = #expect(throws: PKIError.self, "\(label)") { try CSRDecoder.decode(bytes) }
            #expect(error?.code == code, "\(label): \(error?.reason ?? "-")")
        }

        // Flip one byte of the signature: the proof of possession no longer verifies.
        var tampered = good
        tampered[tampered.count - 3] ^= 0x55
        let error = #expect(throws: PKIError.self) { try CSRDecoder.decode(tampered) }
        #expect(error?.code == .badSignature || error?.code == .malformedInput)
    }

    @Test("a trust-domain SPIFFE ID (no path) is not a workload ID: invalid-name")
    func trustDomainIsNotAWorkload() throws {
        let ca = try TestPKI.issuingCA()
        let key = try KeyType.p256.generate()
        let error = #expect(throws: PKIError.self) {
            try ca.issue(.init(profile: .workload, publicKey: key.publicKey, uris: ["spiffe://example.org"]), now: TestPKI.now)
        }
        #expect(error?.code == .invalidName)
        _ = try ca.issue(.init(profile: .workload, publicKey: key.publicKey, uris: ["spiffe://example.org/ns/a"]), now: TestPKI.now)
    }

    @Test("an RSA-1024 key is refused")
    func weakKeyRefused() throws {
        let ca = try TestPKI.issuingCA()
        let weak = Certificate.PrivateKey(try _RSAKey.make1024())
        let error = #expect(throws: PKIError.self) {
            try ca.issue(.init(profile: .client, publicKey: weak.publicKey, commonName: "x"), now: TestPKI.now)
        }
        #expect(error?.code == .unsupportedKey)
    }

    @Test("a CSR with an RSA-1024 key (made by openssl) is refused as unsupported-key, not as malformed; RSA-2048 passes")
    func weakRSACSR() throws {
        let dir = TestPKI.temporaryDirectory("csr")
        defer { try? FileManager.default.removeItem(atPath: dir) }
        for bits in [1024, 2048] {
            let process = Process()
            process.executableURL = URL(fileURLWithPath: "/usr/bin/openssl")
            process.arguments = ["req", "-new", "-newkey", "rsa:\(bits)", "-nodes", "-keyout", "\(dir)/k\(bits).pem", "-subj", "/CN=weak", "-out", "\(dir)/r\(bits).csr"]
            process.standardError = FileHandle.nullDevice
            try process.run()
            process.waitUntilExit()
            let pem = try String(contentsOfFile: "\(dir)/r\(bits).csr", encoding: .utf8)
            if bits == 1024 {
                let error = #expect(throws: PKIError.self) { try CSRDecoder.decode(pem: pem) }
                #expect(error?.code == .unsupportedKey)
                let der = try #require(PEMCodec.decode(Array(pem.utf8), label: "CERTIFICATE REQUEST"))
                #expect((#expect(throws: PKIError.self) { try CSRDecoder.decode(der) })?.code == .unsupportedKey, "DER too")
                // Truncated: malformed, never a crash.
                #expect((#expect(throws: PKIError.self) { try CSRDecoder.decode(Array(der.prefix(der.count / 2))) })?.code == .malformedInput)
            } else {
                _ = try CSRDecoder.decode(pem: pem)
            }
        }
    }
}

import _CryptoExtras

enum _RSAKey {
    static func make1024() throws -> _RSA.Signing.PrivateKey {
        try _RSA.Signing.PrivateKey(unsafeKeySize: .init(bitCount: 1024))
    }
}
