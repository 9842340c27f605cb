import Foundation
import MutualPKI
import MutualStore
import X509

/// ACME Renewal Information (RFC 9773): when a certificate should be renewed, by its unique identifier
/// `base64url(AKI keyIdentifier) "." base64url(serial DER content)`.
public enum ACMERenewalInfo {
    /// The identifier of `certificate` (nil without an authority key identifier).
    public static func certID(_ certificate: Certificate) -> String? {
        guard let aki = try? certificate.extensions.authorityKeyIdentifier?.keyIdentifier else { return nil }
        return Base64URL.encode(Data(aki)) + "." + Base64URL.encode(Data(serialContent(certificate.serialNumber)))
    }

    /// The serial as the content octets of a DER INTEGER: minimal, with a leading zero when the high bit is set.
    static func serialContent(_ serial: Certificate.SerialNumber) -> [UInt8] {
        var bytes = Array(serial.bytes.drop { $0 == 0 })
        if bytes.isEmpty { bytes = [0] }
        if bytes[0] & 0x80 != 0 { bytes.insert(0, at: 0) }
        return bytes
    }

    /// The serial (lowercase hex, as the inventory stores it) and AKI named by a certID, or nil if it is malformed.
    static func parse(_ certID: String) -> (aki: Data, serialHex: String)? {
        let parts = certID.split(separator: ".", omittingEmptySubsequences: false)
        guard parts.count == 2, let aki = Base64URL.decode(String(parts[0])), !aki.isEmpty,
              let serial = Base64URL.decode(String(parts[1])), !serial.isEmpty, serial.count <= 21 else { return nil }
        let hex = serial.drop { $0 == 0 }.map { String(format: "%02x", $0) }.joined()
        return (aki, hex.isEmpty ? "00" : hex)
    }

    /// The suggested window: the middle third of the last half of the lifetime for a current certificate (so a fleet
    /// spreads its renewals), and already past for a revoked one (renew now).
    public static func window(notBefore: Date, notAfter: Date, revokedAt: Date?, now: Date) -> (start: Date, end: Date) {
        if revokedAt != nil {
            return (now.addingTimeInterval(-3600), now.addingTimeInterval(-60))
        }
        let lifetime = notAfter.timeIntervalSince(notBefore)
        return (notBefore.addingTimeInterval(lifetime * 2 / 3), notBefore.addingTimeInterval(lifetime * 5 / 6))
    }
}

extension ACMEService {
    /// GET renewal-info/<certID>: the window, with Retry-After telling clients when to ask again.
    func renewalInfo(certID: String, urls: ACMEURLs) async throws -> ACMEResponse {
        guard let (aki, serial) = ACMERenewalInfo.parse(certID) else {
            throw ACMEProblem(.malformed, "'\(certID.prefix(80))' is not a certificate identifier (base64url AKI, '.', base64url serial)")
        }
        guard let record = try await authority.store.certificate(serial: serial),
              let certificate = try? Certificate(derEncoded: record.der),
              let ownAKI = try? certificate.extensions.authorityKeyIdentifier?.keyIdentifier, Data(ownAKI) == aki else {
            throw ACMEProblem(.malformed, "no certificate of this authority has that identifier", status: 404)
        }
        let now = clock()
        let window = ACMERenewalInfo.window(
            notBefore: record.notBefore, notAfter: record.notAfter, revokedAt: record.status == .revoked ? record.revokedAt ?? now : nil, now: now
        )
        let json: [String: Any] = ["suggestedWindow": ["start": Self.time(window.start), "end": Self.time(window.end)]]
        var response = try respond(200, json: json, urls: urls)
        // Ask again in a tenth of the lifetime (at most 6 hours, at least a minute): a revocation moves the window.
        let lifetime = record.notAfter.timeIntervalSince(record.notBefore)
        response.headers.append(("retry-after", String(Int(min(21_600, max(60, lifetime / 10))))))
        return response
    }

    /// Checks an order's `replaces`: a certificate of this account that no other live order replaces yet. Returns
    /// its serial.
    func replacedSerial(_ value: Any?, account: ACMEAccount) async throws -> String? {
        guard let value else { return nil }
        guard let certID = value as? String, let (_, serial) = ACMERenewalInfo.parse(certID) else {
            throw ACMEProblem(.malformed, "'replaces' must be a certificate identifier (RFC 9773)")
        }
        guard let record = try await authority.store.certificate(serial: serial), record.owner == account.owner else {
            throw ACMEProblem(.malformed, "'replaces' names no certificate of this account")
        }
        for row in try await authority.store.acmeOrders(account: account.id) where row.status != ACMEStatus.invalid {
            if let order = try? Self.decode(ACMEOrder.self, row.body), order.replaces == serial {
                throw ACMEProblem(.alreadyReplaced, "certificate \(serial) is already replaced by order \(order.id)", status: 409)
            }
        }
        return serial
    }

    /// POST key-change (RFC 8555 7.3.5): the outer JWS signed by the account's key, the inner by the new key.
    func keyChange(_ request: ACMESignedRequest, account: ACMEAccount, urls: ACMEURLs, now: Date) async throws -> ACMEResponse {
        let inner = try ACMESignedRequest.parse(request.payload, requireNonce: false)
        guard case .jwk(let newKey) = inner.signer else {
            throw ACMEProblem(.malformed, "the inner JWS of a key change must carry the new key as 'jwk'")
        }
        guard inner.url == request.url else { throw ACMEProblem(.malformed, "the inner JWS's 'url' must equal the outer one's") }
        let payload = try inner.object()
        guard payload["account"] as? String == urls.url("account/\(account.id)") else {
            throw ACMEProblem(.malformed, "the inner payload's 'account' is not the signer's account URL")
        }
        guard let oldJWK = payload["oldKey"] as? [String: Any], try ACMEAccountKey(jwk: oldJWK).thumbprint == account.thumbprint else {
            throw ACMEProblem(.malformed, "the inner payload's 'oldKey' is not the account's current key")
        }
        let thumbprint = newKey.thumbprint
        if let other = try await authority.store.acmeAccount(provisioner: account.provisioner, thumbprint: thumbprint) {
            var response = problemResponse(ACMEProblem(.malformed, "the new key already belongs to an account", status: 409), urls: urls)
            response.headers.append(("location", urls.url("account/\(other.id)")))
            return response
        }
        var updated = account
        updated.jwk = newKey.canonicalJSON
        updated.thumbprint = thumbprint
        do {
            try await authority.store.acme(
                [.updateAccount(ACMERow(id: account.id, status: updated.status, body: try Self.encode(updated)), from: [ACMEStatus.valid], thumbprint: thumbprint)],
                audit: [AuditEntry(time: now, actor: account.owner, action: "acme-key-change", subject: account.id, details: [
                    "old_thumbprint": account.thumbprint, "new_thumbprint": thumbprint,
                ])]
            )
        } catch let error as StoreError where error.code == .conflict {
            throw ACMEProblem(.malformed, "the account changed meanwhile, or the new key was just registered: \(error.reason)", status: 409)
        }
        return try respond(200, json: accountJSON(updated, urls: urls), urls: urls, location: urls.url("account/\(account.id)"))
    }
}
