import Foundation
import MutualPKI
import MutualStore
import X509

/// Answers OCSP requests for the issuing CA, signing with a delegated responder certificate (EKU OCSPSigning,
/// id-pkix-ocsp-nocheck) that it issues for itself and rotates at two thirds of its lifetime.
///
/// Responses without a nonce are cached per request until half their validity has passed or any revocation
/// happens (``noteRevocation(sequence:)``), so answering a repeated question costs a dictionary lookup.
public actor OCSPResponder {
    struct Signer {
        var certificate: Certificate
        var key: Certificate.PrivateKey
    }

    struct CachedResponse {
        var der: [UInt8]
        var producedAt: Date
        var nextUpdate: Date
        var watermark: Int64
    }

    let authority: Authority
    /// How long a response is valid (nextUpdate - thisUpdate).
    public let responseValidity: ValidityDuration
    let signerValidity: ValidityDuration
    private var signer: Signer?
    private var cache: [[UInt8]: CachedResponse] = [:]
    private var watermark: Int64 = 0
    private static let cacheLimit = 100_000

    /// Reads a certificate's record by serial; the inventory, or in tests a reader that lets a revocation happen
    /// while it is suspended.
    let lookup: @Sendable (String) async throws -> CertificateRecord?

    public init(authority: Authority, responseValidity: ValidityDuration = .hours(1), signerValidity: ValidityDuration = .days(7)) {
        self.init(authority: authority, responseValidity: responseValidity, signerValidity: signerValidity) { serial in
            try await authority.store.certificate(serial: serial)
        }
    }

    init(
        authority: Authority, responseValidity: ValidityDuration, signerValidity: ValidityDuration,
        lookup: @escaping @Sendable (String) async throws -> CertificateRecord?
    ) {
        self.lookup = lookup
        self.authority = authority
        self.responseValidity = responseValidity
        self.signerValidity = signerValidity
    }

    /// A response (DER) and how long it may be cached (seconds), for the HTTP layer's Cache-Control.
    public struct Answer: Sendable {
        public var der: [UInt8]
        public var maxAge: Int
        public var cacheHit: Bool
        /// `good`, `revoked`, `unknown`, `malformedRequest`, `unauthorized`, `internalError`: for metrics and logs.
        public var outcome: String
    }

    /// Invalidates cached answers when the revocation log moves.
    public func noteRevocation(sequence: Int64) {
        if sequence > watermark {
            watermark = sequence
            cache.removeAll(keepingCapacity: true)
        }
    }

    public func currentSigner(now: Date = .now) async throws -> Certificate {
        try await ensureSigner(now: now).certificate
    }

    private func ensureSigner(now: Date) async throws -> Signer {
        // A fresh signer at two thirds of its lifetime, and as soon as another CA issues (a rotation's activation):
        // the delegated responder must be certified by the issuer the answers are about.
        if let signer, signer.certificate.issuer == authority.ca.certificate.subject {
            let lifetime = signer.certificate.notValidAfter.timeIntervalSince(signer.certificate.notValidBefore)
            if now < signer.certificate.notValidBefore.addingTimeInterval(lifetime * 2 / 3) { return signer }
        }
        let key = try KeyType.p256.generate()
        let issued = try await authority.issue(
            IssuanceRequest(profile: .ocspSigner, publicKey: key.publicKey, commonName: "\(authority.configuration.name) OCSP Responder",
                            validity: signerValidity),
            owner: "mutual serve", requester: "mutual-ocsp", now: now,
            maximumValidityOverride: max(signerValidity, authority.ca.policy.maximumValidity)
        )
        let fresh = Signer(certificate: issued.certificate, key: key)
        signer = fresh
        cache.removeAll(keepingCapacity: true)
        return fresh
    }

    /// Answers one DER request. Never throws: malformed input gets a `malformedRequest` response.
    public func respond(to requestDER: [UInt8], now: Date = .now) async -> Answer {
        // The revocation watermark this answer is computed under, taken before any suspension point: this actor is
        // reentrant, so a revocation noted while the status is being read must leave the answer uncached under the
        // new watermark (a "good" read before the revocation would otherwise be served from the cache after it).
        let observed = watermark
        if let hit = cache[requestDER], hit.watermark == observed,
            now < hit.producedAt.addingTimeInterval(responseValidity.timeInterval / 2)
        {
            return Answer(der: hit.der, maxAge: max(0, Int(hit.nextUpdate.timeIntervalSince(now))), cacheHit: true, outcome: "cached")
        }
        let request: OCSP.Request
        do {
            request = try OCSP.Request(derEncoded: requestDER)
        } catch {
            return Answer(der: OCSP.errorResponse(.malformedRequest), maxAge: 0, cacheHit: false, outcome: "malformedRequest")
        }
        let issuer = authority.ca.certificate
        // A request about the ML-DSA issuing CA's certificates is answered by that CA itself, signed with ML-DSA; one
        // about the classical CA's by the delegated responder. A request naming neither is not ours to answer.
        let pq = authority.pqCA.flatMap { pq in request.certIDs.contains(where: { $0.matches(issuer: pq.certificate) }) ? pq : nil }
        // A CA replaced by a rotation but not retired answers for its own certificates itself, as the ML-DSA CA does.
        let previous = pq != nil || request.certIDs.contains(where: { $0.matches(issuer: issuer) })
            ? nil : authority.active.rotation.previous.first { ca in request.certIDs.contains { $0.matches(issuer: ca.certificate) } }
        let ours: (OCSP.CertID) -> Bool = { id in
            if let pq { return id.matches(issuer: pq.certificate) }
            if let previous { return id.matches(issuer: previous.certificate) }
            return id.matches(issuer: issuer)
        }
        guard pq != nil || previous != nil || request.certIDs.contains(where: { $0.matches(issuer: issuer) }) else {
            return Answer(der: OCSP.errorResponse(.unauthorized), maxAge: 0, cacheHit: false, outcome: "unauthorized")
        }
        do {
            let nextUpdate = now.addingTimeInterval(responseValidity.timeInterval)
            var singles: [OCSP.SingleResponse] = []
            var outcome = "good"
            for id in request.certIDs {
                var status: OCSP.CertStatus = .unknown
                if ours(id), let record = try await lookup(id.serialNumber.bytes.hexString) {
                    if record.status == .revoked {
                        status = .revoked(time: record.revokedAt ?? now, reason: record.revocationReason.flatMap(RevocationReason.init(rawValue:)))
                    } else {
                        status = .good
                    }
                }
                switch status {
                case .revoked: outcome = "revoked"
                case .unknown where outcome == "good": outcome = "unknown"
                default: break
                }
                singles.append(OCSP.SingleResponse(certID: id, status: status, thisUpdate: now, nextUpdate: nextUpdate))
            }
            let der: [UInt8]
            if let pq {
                der = try OCSP.successfulResponse(responses: singles, nonce: request.nonce, producedAt: now, mldsaIssuer: pq.certificate, key: pq.key)
            } else if let previous {
                der = try OCSP.successfulResponse(
                    responses: singles, nonce: request.nonce, producedAt: now, responderCertificate: previous.certificate,
                    responderKey: previous.privateKey
                )
            } else {
                let signer = try await ensureSigner(now: now)
                der = try OCSP.successfulResponse(
                    responses: singles, nonce: request.nonce, producedAt: now, responderCertificate: signer.certificate, responderKey: signer.key
                )
            }
            if request.nonce == nil {
                if cache.count >= Self.cacheLimit { cache.removeAll(keepingCapacity: true) }
                cache[requestDER] = CachedResponse(der: der, producedAt: now, nextUpdate: nextUpdate, watermark: observed)
            }
            return Answer(der: der, maxAge: request.nonce == nil ? Int(responseValidity.seconds) : 0, cacheHit: false, outcome: outcome)
        } catch {
            return Answer(der: OCSP.errorResponse(.internalError), maxAge: 0, cacheHit: false, outcome: "internalError")
        }
    }
}
