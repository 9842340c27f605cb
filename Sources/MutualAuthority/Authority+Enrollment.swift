import Crypto
import Foundation
import MutualPKI
import MutualStore
import X509

extension Authority {
    /// Token-authorised issuance: the token's profile, validity cap and scopes are checked against the CSR's
    /// contents, and one use of the token is consumed in the same transaction that records the certificate. A
    /// refused token is audited with its reason.
    public func sign(
        csr bytes: [UInt8], profile requestedProfile: CertificateProfile?, validity: ValidityDuration?, bearer: String,
        now: Date = .now
    ) async throws -> IssuedAnyCertificate {
        let tokens = TokenService(store: store)
        let token: TokenRecord
        do {
            token = try await tokens.authenticate(bearer, now: now)
        } catch let error as AuthorityError {
            try? await auditRefusal(actor: "token:\(Self.tokenID(bearer) ?? "unknown")", reason: error, now: now)
            throw error
        }
        let actor = "token:\(token.id)"
        let profile = try requestedProfile ?? CertificateProfile(leafName: token.profile)
        let defaultValidity = min(profile.defaultValidity, ValidityDuration(seconds: token.maxValiditySeconds), ca.policy.maximumValidity)
        if Self.mldsaRequest(bytes) != nil {
            var (contents, key) = try Self.contents(ofMLDSACSR: bytes, profile: profile, validity: validity)
            if contents.validity == nil { contents.validity = defaultValidity }
            let names = contents.dnsNames + contents.ipAddresses + contents.uris + (contents.commonName.map { [$0] } ?? [])
            do {
                try TokenService.authorize(profile: profile, validity: contents.validity, names: names, keyType: .mldsa(key.variant), token: token)
            } catch let error as AuthorityError {
                try? await auditRefusal(actor: actor, reason: error, now: now)
                throw error
            }
            do {
                var details = ["token": token.id]
                if !contents.droppedRequests.isEmpty { details["dropped"] = contents.droppedRequests.joined(separator: "; ") }
                return IssuedAnyCertificate(try await issue(contents, mldsaKey: key, owner: token.owner, requester: actor, now: now, details: details, consumingToken: token.id))
            } catch let error as StoreError where error.code == .conflict {
                let refusal = AuthorityError(.tokenUsedUp, "token \(token.id) is used up or no longer valid")
                try? await auditRefusal(actor: actor, reason: refusal, now: now)
                throw refusal
            }
        }
        let csr = try CSRDecoder.decode(bytes)
        var request = try IssuanceRequest(verifiedCSR: csr, profile: profile, validity: validity)
        if request.validity == nil { request.validity = defaultValidity }
        do {
            try TokenService.authorize(request, token: token)
        } catch let error as AuthorityError {
            try? await auditRefusal(actor: actor, reason: error, now: now)
            throw error
        }
        for name in request.uris + request.dnsNames {
            if let required = try await requiredKeyType(for: name) {
                let refusal = AuthorityError.keyTypeRequired(required, identity: name)
                try? await auditRefusal(actor: actor, reason: refusal, now: now)
                throw refusal
            }
        }
        // One snapshot of the issuing CA for signing, the record and the chain (a rotation may switch it meanwhile).
        let active = self.active
        let ca = active.ca
        let certificate = try ca.issue(request, now: now)
        let record = try Self.makeRecord(certificate, profile: profile, owner: token.owner, requester: actor, issuerDescription: active.issuer)
        var details = ["profile": profile.rawValue, "serial": record.serial, "identity": record.identity, "token": token.id]
        if !request.droppedRequests.isEmpty { details["dropped"] = request.droppedRequests.joined(separator: "; ") }
        do {
            try await store.recordIssuance(
                record, audit: AuditEntry(time: now, actor: actor, action: "issue", subject: record.serial, details: details),
                consumingToken: token.id, now: now
            )
        } catch let error as StoreError where error.code == .conflict {
            let refusal = AuthorityError(.tokenUsedUp, "token \(token.id) is used up or no longer valid")
            try? await auditRefusal(actor: actor, reason: refusal, now: now)
            throw refusal
        }
        return IssuedAnyCertificate(IssuedCertificate(certificate: certificate, chain: [certificate] + ca.chain, record: record))
    }

    /// How a certificate renews: over mTLS when it may be a TLS client (clientAuth EKU, or no EKU restriction),
    /// otherwise with a proof of possession of its key over server-authenticated TLS.
    public enum RenewalMethod: String, Sendable {
        case mtls
        case proof
    }

    public static func renewalMethod(for certificate: Certificate) -> RenewalMethod {
        renewalMethod(for: AnyCertificate.classical(certificate))
    }

    public static func renewalMethod(for certificate: AnyCertificate) -> RenewalMethod {
        guard let eku = try? certificate.extensions.extendedKeyUsage else { return .mtls }
        return eku.contains(.clientAuth) || eku.contains(.any) ? .mtls : .proof
    }

    static func tokenID(_ bearer: String) -> String? {
        guard bearer.hasPrefix(TokenService.prefix) else { return nil }
        let id = bearer.dropFirst(TokenService.prefix.count).prefix(16)
        return id.count == 16 && id.allSatisfy(\.isHexDigit) ? String(id) : nil
    }

    /// Appends a `refused` audit event naming the reason.
    public func auditRefusal(actor: String, reason: AuthorityError, now: Date = .now) async throws {
        try await store.appendAudit(
            AuditEntry(time: now, actor: actor, action: "refused", subject: reason.code.name, details: ["reason": reason.reason])
        )
    }

    /// The inventory record for a certificate a client presented, if this authority issued exactly that certificate.
    public func presentedRecord(_ certificate: Certificate) async throws -> CertificateRecord? {
        try await presentedRecord(AnyCertificate.classical(certificate))
    }

    /// The same for a certificate of either family.
    public func presentedRecord(_ certificate: AnyCertificate) async throws -> CertificateRecord? {
        guard let record = try await store.certificate(serial: certificate.serialHex) else { return nil }
        let fingerprint = SHA256.hash(data: try certificate.der).hexString
        return record.fingerprint == fingerprint ? record : nil
    }

    /// Checks that a presented client certificate is one this authority issued and is still current.
    public func checkPresented(_ certificate: Certificate, now: Date = .now, allowExpired: Bool = false) async throws -> CertificateRecord {
        try await checkPresented(AnyCertificate.classical(certificate), now: now, allowExpired: allowExpired)
    }

    /// The same for a certificate of either family.
    public func checkPresented(_ certificate: AnyCertificate, now: Date = .now, allowExpired: Bool = false) async throws -> CertificateRecord {
        guard let record = try await presentedRecord(certificate) else {
            throw AuthorityError(.certificateUnknown, "the client certificate \(certificate.serialHex) was not issued by this authority")
        }
        if record.status == .revoked {
            throw AuthorityError(.certificateRevoked, "the client certificate \(record.serial) is revoked (\(record.revocationReason ?? "unspecified"))")
        }
        if !allowExpired, record.notAfter <= now {
            throw AuthorityError(.certificateExpired, "the client certificate \(record.serial) expired at \(AuditChain.format(record.notAfter))")
        }
        if now < record.notBefore {
            throw AuthorityError(.certificateNotYetValid, "the client certificate \(record.serial) is not valid before \(AuditChain.format(record.notBefore))")
        }
        return record
    }

    /// Renewal over mTLS: the identity and profile come from the current certificate, never from the CSR; the CSR only
    /// contributes its (new) public key. Same lifetime as the current certificate.
    public func renew(current certificate: Certificate, csr bytes: [UInt8], now: Date = .now) async throws -> IssuedCertificate {
        try await renew(current: AnyCertificate.classical(certificate), csr: bytes, now: now).requireClassical()
    }

    /// Renewal over mTLS for a current certificate of either family; the CSR's key decides the new certificate's
    /// hierarchy (an ML-DSA CSR moves a classical identity to ML-DSA).
    public func renew(current certificate: AnyCertificate, csr bytes: [UInt8], now: Date = .now) async throws -> IssuedAnyCertificate {
        let record = try await checkPresented(certificate, now: now)
        return try await reissue(from: certificate, record: record, csr: bytes, action: "renew", method: "mtls", now: now)
    }

    func reissue(
        from certificate: AnyCertificate, record: CertificateRecord, csr bytes: [UInt8], action: String, method: String, now: Date
    ) async throws -> IssuedAnyCertificate {
        let actor = "cert:\(record.serial)"
        guard let profile = CertificateProfile(rawValue: record.profile), CertificateProfile.leafProfiles.contains(profile) else {
            throw AuthorityError(.certificateRefused, "certificates of profile \(record.profile) cannot be renewed")
        }
        let mldsaCSR = Self.mldsaRequest(bytes)
        if mldsaCSR == nil, let required = try await requiredKeyType(for: record.identity) {
            let refusal = AuthorityError.keyTypeRequired(required, identity: record.identity)
            try? await auditRefusal(actor: actor, reason: refusal, now: now)
            throw refusal
        }
        var dns: [String] = []
        var ips: [String] = []
        var uris: [String] = []
        for name in (try certificate.extensions.subjectAlternativeNames) ?? SubjectAlternativeNames() {
            switch name {
            case .dnsName(let d): dns.append(d)
            case .ipAddress(let ip): ips.append(Names.ipAddressString(Array(ip.bytes)))
            case .uniformResourceIdentifier(let u): uris.append(u)
            default: break
            }
        }
        let lifetime = certificate.notValidAfter.timeIntervalSince(certificate.notValidBefore) - ca.policy.backdate.timeInterval
        let validity = min(ValidityDuration(seconds: max(1, Int64(lifetime.rounded()))), ca.policy.maximumValidity)
        let details = ["renewed_from": record.serial, "method": method]
        if let mldsaCSR {
            guard mldsaCSR.isSignatureValid else {
                throw PKIError(.badSignature, "the ML-DSA CSR's signature does not verify under its own key (no proof of possession)")
            }
            guard mldsaCSR.subjectPublicKeyInfo != certificate.subjectPublicKeyInfo else {
                let refusal = AuthorityError(.forbidden, "renewal needs a new key: the CSR carries the current certificate's key")
                try? await auditRefusal(actor: actor, reason: refusal, now: now)
                throw refusal
            }
            let contents = IssuanceRequest.Contents(
                profile: profile, commonName: certificate.subject.lastCommonNameString, dnsNames: dns, ipAddresses: ips, uris: uris,
                validity: validity
            )
            let key = try MLDSAPublicKey(variant: mldsaCSR.variant, rawRepresentation: mldsaCSR.publicKey)
            return IssuedAnyCertificate(try await issue(contents, mldsaKey: key, owner: record.owner, requester: actor, now: now, action: action, details: details))
        }
        let csr = try CSRDecoder.decode(bytes)
        let sameKey = certificate.classical.map { csr.request.publicKey == $0.publicKey } ?? false
        guard !sameKey else {
            let refusal = AuthorityError(.forbidden, "renewal needs a new key: the CSR carries the current certificate's key")
            try? await auditRefusal(actor: actor, reason: refusal, now: now)
            throw refusal
        }
        let request = IssuanceRequest(
            profile: profile, publicKey: csr.request.publicKey, commonName: certificate.subject.lastCommonNameString, dnsNames: dns,
            ipAddresses: ips, uris: uris, validity: validity
        )
        let active = self.active
        let ca = active.ca
        let issued = try ca.issue(request, now: now)
        let newRecord = try Self.makeRecord(issued, profile: profile, owner: record.owner, requester: actor, issuerDescription: active.issuer)
        try await store.recordIssuance(
            newRecord,
            audit: AuditEntry(
                time: now, actor: actor, action: action, subject: newRecord.serial,
                details: details.merging(["profile": profile.rawValue, "serial": newRecord.serial, "identity": newRecord.identity]) { a, _ in a }
            )
        )
        return IssuedAnyCertificate(IssuedCertificate(certificate: issued, chain: [issued] + ca.chain, record: newRecord))
    }

    /// The statement a device signs with its current key to prove possession when it renews without presenting the
    /// certificate over TLS: `<purpose>\n<timestamp>\n<hex SHA-256 of the new CSR's DER>`. The purpose separates the
    /// two uses (`mutual-renew-v1`: a certificate that cannot be a TLS client, a server certificate say;
    /// `mutual-renew-expired-v1`: after expiry), so a proof made for one is never accepted for the other.
    public static func proofStatement(purpose: ProofPurpose, timestamp: String, csrDER: [UInt8]) -> [UInt8] {
        Array("\(purpose.rawValue)\n\(timestamp)\n\(SHA256.hash(data: csrDER).hexString)".utf8)
    }

    public enum ProofPurpose: String, Sendable {
        case renew = "mutual-renew-v1"
        case renewExpired = "mutual-renew-expired-v1"
    }

    /// How far a proof's timestamp may be from the authority's clock.
    public static let proofWindow: TimeInterval = 300

    /// Checks a proof of possession of `certificate`'s key over `csr`: a timestamp within ``proofWindow`` of now, a
    /// signature that verifies, and not a proof seen before (a replayed proof would issue a second certificate for
    /// the same CSR). Refusals are audited with their code.
    func checkProof(
        _ purpose: ProofPurpose, certificate: AnyCertificate, record: CertificateRecord, csrDER: [UInt8],
        timestamp: String, signature: [UInt8], now: Date
    ) async throws {
        let actor = "cert:\(record.serial)"
        guard let signedAt = try? Date(timestamp, strategy: .iso8601) else {
            throw AuthorityError(.proofInvalid, "the proof's timestamp '\(timestamp.prefix(40))' is not an RFC 3339 time")
        }
        guard abs(signedAt.timeIntervalSince(now)) <= Self.proofWindow else {
            let refusal = AuthorityError(.clockSkew, "the proof was made at \(timestamp.prefix(40)), more than 5 minutes from the authority's clock (\(AuditChain.format(now))); check this host's clock")
            try? await auditRefusal(actor: actor, reason: refusal, now: now)
            throw refusal
        }
        let statement = Self.proofStatement(purpose: purpose, timestamp: timestamp, csrDER: csrDER)
        let valid: Bool
        switch certificate {
        case .classical(let c):
            valid = c.publicKey.isValidSignature(signature, for: statement, signatureAlgorithm: Self.proofAlgorithm(for: c.publicKey))
        case .mldsa(let c):
            // An ML-DSA key proves possession with a plain ML-DSA signature over the same statement.
            valid = c.subjectKeyVariant?.isValidSignature(signature, for: statement, publicKey: c.subjectPublicKey) ?? false
        }
        guard valid else {
            let refusal = AuthorityError(.proofInvalid, "the proof of possession does not verify against the key of certificate \(record.serial)")
            try? await auditRefusal(actor: actor, reason: refusal, now: now)
            throw refusal
        }
        guard proofs.claim(SHA256.hash(data: signature).hexString, until: signedAt.addingTimeInterval(Self.proofWindow), now: now) else {
            let refusal = AuthorityError(.proofReplayed, "this proof of possession was already used; sign a new one")
            try? await auditRefusal(actor: actor, reason: refusal, now: now)
            throw refusal
        }
    }

    /// Renewal without a TLS client certificate, for certificates that cannot be one (a `server` profile certificate
    /// has no clientAuth EKU, so a TLS stack rightly refuses it as a client credential): the current, unexpired,
    /// unrevoked certificate travels in the body with a proof of possession of its key over the new CSR. Identity,
    /// profile and lifetime come from the current certificate, exactly as with renewal over mTLS.
    public func renewByProof(
        current certificate: Certificate, csr bytes: [UInt8], timestamp: String, signature: [UInt8], now: Date = .now
    ) async throws -> IssuedCertificate {
        try await renewByProof(current: AnyCertificate.classical(certificate), csr: bytes, timestamp: timestamp, signature: signature, now: now).requireClassical()
    }

    public func renewByProof(
        current certificate: AnyCertificate, csr bytes: [UInt8], timestamp: String, signature: [UInt8], now: Date = .now
    ) async throws -> IssuedAnyCertificate {
        let record = try await checkPresented(certificate, now: now)
        try await checkProof(.renew, certificate: certificate, record: record, csrDER: try Self.csrDER(bytes), timestamp: timestamp, signature: signature, now: now)
        return try await reissue(from: certificate, record: record, csr: bytes, action: "renew", method: "proof", now: now)
    }

    /// Renewal of an expired certificate: allowed only within `grace` after its notAfter, only if it was never
    /// revoked, and only with proof of possession of the old key (a signature over ``proofStatement`` made within
    /// five minutes of now).
    public func renewExpired(
        current certificate: Certificate, csr bytes: [UInt8], timestamp: String, signature: [UInt8],
        grace: ValidityDuration?, now: Date = .now
    ) async throws -> IssuedCertificate {
        try await renewExpired(current: AnyCertificate.classical(certificate), csr: bytes, timestamp: timestamp, signature: signature, grace: grace, now: now)
            .requireClassical()
    }

    public func renewExpired(
        current certificate: AnyCertificate, csr bytes: [UInt8], timestamp: String, signature: [UInt8],
        grace: ValidityDuration?, now: Date = .now
    ) async throws -> IssuedAnyCertificate {
        guard let grace else {
            throw AuthorityError(.renewExpiredDisabled, "renewal of expired certificates is disabled on this authority (see --renew-expired-grace)")
        }
        let record = try await checkPresented(certificate, now: now, allowExpired: true)
        let actor = "cert:\(record.serial)"
        guard record.notAfter.addingTimeInterval(grace.timeInterval) > now else {
            let refusal = AuthorityError(.beyondGrace, "certificate \(record.serial) expired at \(AuditChain.format(record.notAfter)), beyond the renewal grace window of \(grace)")
            try? await auditRefusal(actor: actor, reason: refusal, now: now)
            throw refusal
        }
        try await checkProof(.renewExpired, certificate: certificate, record: record, csrDER: try Self.csrDER(bytes), timestamp: timestamp, signature: signature, now: now)
        return try await reissue(from: certificate, record: record, csr: bytes, action: "renew-expired", method: "proof", now: now)
    }

    /// The algorithm a proof of possession uses for a key: ECDSA with SHA-256 (P-256) or SHA-384 (P-384), Ed25519,
    /// RSA PKCS#1 v1.5 with SHA-256.
    public static func proofAlgorithm(for key: Certificate.PublicKey) -> Certificate.SignatureAlgorithm {
        if P384.Signing.PublicKey(key) != nil { return .ecdsaWithSHA384 }
        if Curve25519.Signing.PublicKey(key) != nil { return .ed25519 }
        if P256.Signing.PublicKey(key) != nil { return .ecdsaWithSHA256 }
        return .sha256WithRSAEncryption
    }

    /// Revocation requested over the API: by an admin, or by a client for its own certificate.
    public func revoke(serial: String, reason: RevocationReason, requestedBy presented: CertificateRecord, now: Date = .now) async throws -> CertificateRecord {
        let normalized = Self.normalizeSerial(serial)
        if presented.profile != CertificateProfile.admin.rawValue && presented.serial != normalized {
            let refusal = AuthorityError(.certificateRefused, "a client certificate may only revoke itself (\(presented.serial))")
            try? await auditRefusal(actor: "cert:\(presented.serial)", reason: refusal, now: now)
            throw refusal
        }
        return try await revoke(serial: normalized, reason: reason, actor: "cert:\(presented.serial)", now: now)
    }
}

import SwiftASN1
