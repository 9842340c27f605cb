import AsyncHTTPClient
import Foundation
import MutualPKI
import NIOCore
import NIOHTTP1
import X509

/// Asks an OCSP responder about one certificate and checks the answer as a relying party must (RFC 6960 3.2):
/// signed by the issuer or by a responder the issuer delegated to (EKU OCSPSigning), our nonce echoed, times current.
public enum OCSPClient {
    public enum Verdict: Sendable, Equatable {
        case good
        case revoked(time: Date, reason: RevocationReason?)
        /// The responder does not know the certificate, or the answer cannot be trusted: fail closed.
        case failed(String)
    }

    public static func check(leaf: Certificate, issuer: Certificate, url: String, now: Date = .now) async -> Verdict {
        await check(serial: leaf.serialNumber, certID: { try OCSP.CertID(issuer: issuer, serialNumber: leaf.serialNumber) }, url: url, now: now) { parsed in
            // Who signed: the issuer itself, or a delegated responder certificate issued by it for OCSP signing.
            if parsed.isSigned(by: issuer) { return true }
            for candidate in parsed.certificates where candidate.issuer == issuer.subject {
                guard issuer.publicKey.isValidSignature(candidate.signature, for: candidate),
                    let eku = try? candidate.extensions.extendedKeyUsage, eku.contains(.ocspSigning),
                    candidate.notValidBefore <= now, now <= candidate.notValidAfter
                else { continue }
                if parsed.isSigned(by: candidate) { return true }
            }
            return false
        }
    }

    /// An ML-DSA certificate: its issuing CA signs its own answers with ML-DSA (no delegated responder).
    public static func check(leaf: MLDSACertificate, issuer: MLDSACertificate, url: String, now: Date = .now) async -> Verdict {
        let serial = Certificate.SerialNumber(bytes: leaf.serialNumber[...])
        return await check(serial: serial, certID: { try OCSP.CertID(issuer: issuer, serialNumber: serial) }, url: url, now: now) {
            $0.isSigned(by: issuer)
        }
    }

    static func check(
        serial: Certificate.SerialNumber, certID makeCertID: () throws -> OCSP.CertID, url: String, now: Date,
        trusted isTrusted: (OCSP.ParsedResponse) -> Bool
    ) async -> Verdict {
        do {
            let certID = try makeCertID()
            var nonce = [UInt8](repeating: 0, count: 16)
            var rng = SystemRandomNumberGenerator()
            for i in nonce.indices { nonce[i] = rng.next() }
            let requestDER = try OCSP.Request(certIDs: [certID], nonce: nonce).derEncoded()
            var request = HTTPClientRequest(url: url)
            request.method = .POST
            request.headers.add(name: "Content-Type", value: "application/ocsp-request")
            request.body = .bytes(ByteBuffer(bytes: requestDER))
            let response = try await HTTPClient.shared.execute(request, timeout: .seconds(10))
            guard response.status == .ok else { return .failed("OCSP responder answered HTTP \(response.status.code)") }
            let body = try await response.body.collect(upTo: 1 << 20)
            let parsed = try OCSP.ParsedResponse(derEncoded: Array(body.readableBytesView))
            guard parsed.status == 0 else { return .failed("OCSP responder refused the request (status \(parsed.status))") }
            guard isTrusted(parsed) else { return .failed("the OCSP response is not signed by the issuer or a responder it authorised") }
            guard parsed.nonce == nonce else { return .failed("the OCSP response does not echo our nonce (possible replay)") }
            guard let single = parsed.responses.first(where: { $0.certID.serialNumber == serial }) else {
                return .failed("the OCSP response does not cover this certificate")
            }
            if single.thisUpdate > now.addingTimeInterval(300) { return .failed("the OCSP response is from the future (thisUpdate \(single.thisUpdate))") }
            if let next = single.nextUpdate, next < now { return .failed("the OCSP response is stale (nextUpdate \(next))") }
            switch single.status {
            case .good: return .good
            case .revoked(let time, let reason): return .revoked(time: time, reason: reason)
            case .unknown: return .failed("the OCSP responder does not know this certificate")
            }
        } catch {
            return .failed("OCSP check failed: \(error)")
        }
    }
}
