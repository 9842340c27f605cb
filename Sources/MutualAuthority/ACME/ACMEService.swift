import Crypto
import Foundation
import Logging
import MutualPKI
import MutualStore
import Synchronization
import X509

/// Checks one challenge (http-01, ...) against the network. Returns nil when it is met, or the problem that says
/// why not (connection refused, wrong token, ...).
public protocol ACMEValidator: Sendable {
    func validate(challenge: ACMEChallenge, identifier: ACMEIdentifier, keyAuthorization: String, provisioner: ACMEProvisioner) async -> ACMEProblem?
}

/// A response of the ACME server, independent of the HTTP library that sends it.
public struct ACMEResponse: Sendable {
    public var status: Int
    public var headers: [(String, String)]
    public var body: Data
    /// The refusal's type, for metrics and logs (nil on success).
    public var problem: ACMEProblem?

    init(status: Int, headers: [(String, String)] = [], body: Data = Data()) {
        self.status = status
        self.headers = headers
        self.body = body
    }
}

/// The ACME server (RFC 8555) of the authority: every request in, a response out, with all state in the store so any
/// replica can answer. Certificates go through the authority's CA and land in the inventory, with the account as owner,
/// in the same transaction that marks the order valid.
public final class ACMEService: Sendable {
    let authority: Authority
    public let provisioners: [String: ACMEProvisioner]
    let nonces: ACMENonces
    let validator: any ACMEValidator
    let clock: @Sendable () -> Date
    let logger: Logger
    /// Validations started by this process, so tests and shutdown can wait for them.
    let running = ValidationTasks()

    static let nonceKeyMetadata = "acme_nonce_key"
    /// A validation that has not finished after this long (the process died during it) is failed, never left pending.
    static let validationDeadline: TimeInterval = 120

    public static func make(
        authority: Authority, provisioners: [ACMEProvisioner], validator: any ACMEValidator,
        clock: @escaping @Sendable () -> Date = { Date() }, logger: Logger = Logger(label: "mutual.acme")
    ) async throws -> ACMEService {
        let candidate = SymmetricKey(size: .bits256).withUnsafeBytes { Data($0) }.map { String(format: "%02x", $0) }.joined()
        let stored = try await authority.store.metadataSettingIfAbsent(nonceKeyMetadata, value: candidate)
        guard stored.count == 64, let bytes = Self.hexBytes(stored) else {
            throw AuthorityError(.corruptState, "the stored ACME nonce key is not 32 bytes of hex")
        }
        var byName: [String: ACMEProvisioner] = [:]
        for provisioner in provisioners { byName[provisioner.name] = provisioner }
        return ACMEService(
            authority: authority, provisioners: byName, nonces: ACMENonces(key: SymmetricKey(data: bytes)), validator: validator,
            clock: clock, logger: logger
        )
    }

    init(authority: Authority, provisioners: [String: ACMEProvisioner], nonces: ACMENonces, validator: any ACMEValidator,
         clock: @escaping @Sendable () -> Date, logger: Logger) {
        self.authority = authority
        self.provisioners = provisioners
        self.nonces = nonces
        self.validator = validator
        self.clock = clock
        self.logger = logger
    }

    static func hexBytes(_ text: String) -> [UInt8]? {
        var bytes: [UInt8] = []
        var index = text.startIndex
        while index < text.endIndex {
            let next = text.index(index, offsetBy: 2, limitedBy: text.endIndex) ?? text.endIndex
            guard let byte = UInt8(text[index..<next], radix: 16) else { return nil }
            bytes.append(byte)
            index = next
        }
        return bytes
    }

    /// Waits for the validations this process started (tests; graceful shutdown).
    public func waitForValidations() async { await running.waitAll() }

    // MARK: Entry point

    /// Handles one request. `base` is `https://host[:port]` as the client addressed this server; `path` starts with
    /// `/acme/`.
    public func handle(method: String, path: String, base: String, contentType: String?, body: Data) async -> ACMEResponse {
        let parts = path.split(separator: "/", omittingEmptySubsequences: false).map(String.init)
        // "", "acme", provisioner, rest...
        guard parts.count >= 4, parts[1] == "acme", let provisioner = provisioners[parts[2]] else {
            return problemResponse(ACMEProblem(.malformed, "no ACME provisioner at \(path.prefix(80))", status: 404), urls: nil)
        }
        let urls = ACMEURLs(base: base, provisioner: provisioner.name)
        let rest = Array(parts[3...])
        do {
            switch (method, rest.first ?? "") {
            case ("GET", "renewal-info") where rest.count == 2:
                return try await renewalInfo(certID: rest[1], urls: urls)
            case ("GET", "directory"):
                return try respond(200, json: directory(provisioner, urls), urls: urls)
            case ("HEAD", "new-nonce"):
                return ACMEResponse(status: 200, headers: commonHeaders(urls) + [("cache-control", "no-store")])
            case ("GET", "new-nonce"):
                return ACMEResponse(status: 204, headers: commonHeaders(urls) + [("cache-control", "no-store")])
            case ("POST", _):
                guard contentType?.lowercased().hasPrefix("application/jose+json") == true else {
                    throw ACMEProblem(.malformed, "ACME requests are sent as application/jose+json", status: 415)
                }
                return try await post(rest: rest, path: path, provisioner: provisioner, urls: urls, body: body)
            default:
                let known = ["directory", "new-nonce", "new-account", "new-order", "revoke-cert", "key-change", "account", "order", "authz", "chall", "cert", "renewal-info"]
                if known.contains(rest.first ?? "") {
                    var response = problemResponse(ACMEProblem(.malformed, "\(method) is not allowed here: ACME resources are read with POST-as-GET", status: 405), urls: urls)
                    response.headers.append(("allow", ["directory", "renewal-info"].contains(rest.first ?? "") ? "GET" : rest.first == "new-nonce" ? "GET, HEAD" : "POST"))
                    return response
                }
                throw ACMEProblem(.malformed, "no such ACME resource", status: 404)
            }
        } catch let problem as ACMEProblem {
            return problemResponse(problem, urls: urls)
        } catch {
            logger.error("ACME request failed", metadata: ["path": "\(path)", "error": "\(error)"])
            return problemResponse(ACMEProblem(.serverInternal, "the server could not complete the request; see its log"), urls: urls)
        }
    }

    // MARK: POST

    private func post(rest: [String], path: String, provisioner: ACMEProvisioner, urls: ACMEURLs, body: Data) async throws -> ACMEResponse {
        let request = try ACMESignedRequest.parse(body)
        let now = clock()
        guard request.url == urls.base + path else {
            throw ACMEProblem(.unauthorized, "the JWS 'url' (\(request.url.prefix(120))) is not the URL this request was sent to")
        }
        // The nonce's HMAC and age are checked first (no I/O); it is recorded as used only once the request is known
        // to be signed by its account, so a stranger cannot make the server write to its database at will.
        let nonceExpiry = try checkedNonce(request.nonce, now: now)
        let resource = rest.first ?? ""
        if case .jwk(let key) = request.signer {
            guard resource == "new-account" || resource == "revoke-cert" else {
                throw ACMEProblem(.malformed, "this request must be signed with the account's 'kid', not a 'jwk'")
            }
            try await use(nonce: request.nonce, expires: nonceExpiry, now: now)
            switch resource {
            case "new-account": return try await newAccount(request, key: key, provisioner: provisioner, urls: urls, now: now)
            case "revoke-cert": return try await revoke(request, account: nil, jwk: key, urls: urls, now: now)
            default: throw ACMEProblem(.malformed, "this request must be signed with the account's 'kid', not a 'jwk'")
            }
        }
        guard case .kid(let kid) = request.signer else { throw ACMEProblem(.malformed, "no signer") }
        if resource == "new-account" {
            throw ACMEProblem(.malformed, "newAccount must be signed with a 'jwk', not a 'kid'")
        }
        let account = try await account(kid: kid, urls: urls, provisioner: provisioner)
        try request.verify(with: try account.key())
        try await use(nonce: request.nonce, expires: nonceExpiry, now: now)
        switch (resource, rest.count) {
        case ("account", 2): return try await accountUpdate(request, account: account, id: rest[1], urls: urls, now: now)
        case ("account", 3) where rest[2] == "orders": return try await accountOrders(account: account, id: rest[1], urls: urls)
        case ("new-order", 1): return try await newOrder(request, account: account, provisioner: provisioner, urls: urls, now: now)
        case ("order", 2): return try await orderRead(account: account, id: rest[1], urls: urls, now: now)
        case ("order", 3) where rest[2] == "finalize":
            return try await finalize(request, account: account, id: rest[1], provisioner: provisioner, urls: urls, now: now)
        case ("authz", 2): return try await authorization(request, account: account, id: rest[1], urls: urls, now: now)
        case ("chall", 3):
            return try await challenge(request, account: account, authzID: rest[1], type: rest[2], provisioner: provisioner, urls: urls, now: now)
        case ("cert", 2): return try await certificate(account: account, orderID: rest[1], urls: urls)
        case ("revoke-cert", 1): return try await revoke(request, account: account, jwk: nil, urls: urls, now: now)
        case ("key-change", 1): return try await keyChange(request, account: account, urls: urls, now: now)
        default: throw ACMEProblem(.malformed, "no such ACME resource", status: 404)
        }
    }

    /// A nonce is accepted once: it must be ours, fresh, and not used before on any replica.
    private func checkedNonce(_ nonce: String, now: Date) throws -> Date {
        guard let expires = nonces.expiry(of: nonce, now: now) else {
            throw ACMEProblem(.badNonce, "the nonce is not one this server issued, or it is stale; get a new one")
        }
        return expires
    }

    private func use(nonce: String, expires: Date, now: Date) async throws {
        do {
            try await authority.store.acme([.useNonce(nonce, expires: expires, now: now)])
        } catch let error as StoreError where error.code == .conflict {
            throw ACMEProblem(.badNonce, "the nonce was already used; get a new one")
        }
    }

    private func account(kid: String, urls: ACMEURLs, provisioner: ACMEProvisioner) async throws -> ACMEAccount {
        let prefix = urls.url("account/")
        guard kid.hasPrefix(prefix), case let id = String(kid.dropFirst(prefix.count)), !id.isEmpty, !id.contains("/") else {
            throw ACMEProblem(.accountDoesNotExist, "'kid' is not an account URL of this provisioner")
        }
        guard let row = try await authority.store.acmeAccount(id: id), let account = try? Self.decode(ACMEAccount.self, row.body),
              account.provisioner == provisioner.name else {
            throw ACMEProblem(.accountDoesNotExist, "no account \(id.prefix(40)) at this provisioner")
        }
        guard account.status == ACMEStatus.valid else {
            throw ACMEProblem(.unauthorized, "account \(id) is \(account.status)")
        }
        return account
    }

    // MARK: Directory and accounts

    private func directory(_ provisioner: ACMEProvisioner, _ urls: ACMEURLs) -> [String: Any] {
        var meta: [String: Any] = [
            "externalAccountRequired": provisioner.requireEAB,
            "profiles": Dictionary(uniqueKeysWithValues: provisioner.profiles.map {
                ($0.rawValue, "Mutual's \($0.rawValue) profile (\($0 == .client ? "clientAuth" : "serverAuth")), \(provisioner.validity) certificates")
            }),
        ]
        if let terms = provisioner.termsOfService { meta["termsOfService"] = terms }
        return [
            "newNonce": urls.url("new-nonce"), "newAccount": urls.url("new-account"), "newOrder": urls.url("new-order"),
            "revokeCert": urls.url("revoke-cert"), "keyChange": urls.url("key-change"), "renewalInfo": urls.url("renewal-info"),
            "meta": meta,
        ]
    }

    func accountJSON(_ account: ACMEAccount, urls: ACMEURLs) -> [String: Any] {
        [
            "status": account.status, "contact": account.contact, "orders": urls.url("account/\(account.id)/orders"),
            "termsOfServiceAgreed": account.termsOfServiceAgreed, "createdAt": Self.time(account.createdAt),
            "key": (try? JSONSerialization.jsonObject(with: Data(account.jwk.utf8))) ?? [:],
        ]
    }

    static func contacts(_ value: Any?) throws -> [String] {
        guard let value else { return [] }
        guard let list = value as? [String], list.count <= 10 else {
            throw ACMEProblem(.malformed, "'contact' must be a list of at most 10 URLs")
        }
        for contact in list {
            guard contact.lowercased().hasPrefix("mailto:") else {
                throw ACMEProblem(.unsupportedContact, "only mailto: contacts are accepted (got '\(contact.prefix(40))')")
            }
            let address = contact.dropFirst("mailto:".count)
            let pieces = address.split(separator: "@")
            guard pieces.count == 2, !pieces[0].isEmpty, pieces[1].contains("."), address.count <= 254,
                  !address.contains(where: { $0.isWhitespace || $0 == "," || $0 == "?" || $0 == "<" || $0 == ">" }) else {
                throw ACMEProblem(.invalidContact, "'\(contact.prefix(60))' is not a single e-mail address")
            }
        }
        return list
    }

    private func newAccount(_ request: ACMESignedRequest, key: ACMEAccountKey, provisioner: ACMEProvisioner, urls: ACMEURLs, now: Date) async throws -> ACMEResponse {
        let payload = try request.object()
        let thumbprint = key.thumbprint
        if let row = try await authority.store.acmeAccount(provisioner: provisioner.name, thumbprint: thumbprint) {
            let existing = try Self.decode(ACMEAccount.self, row.body)
            guard existing.status == ACMEStatus.valid else { throw ACMEProblem(.unauthorized, "the account of this key is \(existing.status)") }
            return try respond(200, json: accountJSON(existing, urls: urls), urls: urls, location: urls.url("account/\(existing.id)"))
        }
        if payload["onlyReturnExisting"] as? Bool == true {
            throw ACMEProblem(.accountDoesNotExist, "no account exists for this key")
        }
        let contact = try Self.contacts(payload["contact"])
        let agreed = payload["termsOfServiceAgreed"] as? Bool ?? false
        if provisioner.termsOfService != nil, !agreed {
            throw ACMEProblem(.userActionRequired, "agree to the terms of service (termsOfServiceAgreed: true)")
        }
        let id = ACMERandom.id()
        var binding: ACMEEABKey?
        if let external = payload["externalAccountBinding"] {
            binding = try await checkedBinding(external, accountKey: key, provisioner: provisioner, urls: urls)
        } else if provisioner.requireEAB {
            throw ACMEProblem(.externalAccountRequired, "provisioner \(provisioner.name) requires an external account binding: an operator makes one with `mutual acme eab create --provisioner \(provisioner.name) --owner TEAM`")
        }
        let account = ACMEAccount(
            id: id, provisioner: provisioner.name, status: ACMEStatus.valid, contact: contact, jwk: key.canonicalJSON,
            thumbprint: thumbprint, termsOfServiceAgreed: agreed, owner: binding?.owner ?? "acme:\(provisioner.name)/\(id)", createdAt: now
        )
        var steps: [ACMEStep] = [.insertAccount(ACMERow(id: id, status: account.status, body: try Self.encode(account)), provisioner: provisioner.name, thumbprint: thumbprint, created: now)]
        var details = ["provisioner": provisioner.name, "thumbprint": thumbprint, "contact": contact.joined(separator: ","), "status": "valid", "owner": account.owner]
        if let binding {
            steps.append(.bindEAB(kid: binding.kid, accountID: id))
            details["eab_kid"] = binding.kid
        }
        do {
            try await authority.store.acme(steps, audit: [AuditEntry(time: now, actor: "acme:\(provisioner.name)/\(id)", action: "acme-account", subject: id, details: details)])
        } catch let error as StoreError where error.code == .conflict {
            // The same key registered concurrently (here or on another replica): that account is the answer.
            guard let row = try await authority.store.acmeAccount(provisioner: provisioner.name, thumbprint: thumbprint) else {
                throw ACMEProblem(.unauthorized, "the external account binding key was used by another account meanwhile")
            }
            let existing = try Self.decode(ACMEAccount.self, row.body)
            return try respond(200, json: accountJSON(existing, urls: urls), urls: urls, location: urls.url("account/\(existing.id)"))
        }
        return try respond(201, json: accountJSON(account, urls: urls), urls: urls, location: urls.url("account/\(id)"))
    }

    /// Checks an External Account Binding (RFC 8555 7.3.4): a JWS MACed with the operator-issued key over the new
    /// account's key, for this provisioner's newAccount URL, with a key that has bound no account yet.
    func checkedBinding(_ value: Any, accountKey: ACMEAccountKey, provisioner: ACMEProvisioner, urls: ACMEURLs) async throws -> ACMEEABKey {
        guard let object = value as? [String: Any], let protected64 = object["protected"] as? String, let payload64 = object["payload"] as? String,
              let signature64 = object["signature"] as? String, let protectedBytes = Base64URL.decode(protected64),
              let header = try? JSONSerialization.jsonObject(with: protectedBytes) as? [String: Any],
              let payload = Base64URL.decode(payload64), let signature = Base64URL.decode(signature64) else {
            throw ACMEProblem(.malformed, "externalAccountBinding must be a flattened JWS (protected, payload, signature)")
        }
        guard let alg = header["alg"] as? String, ["HS256", "HS384", "HS512"].contains(alg) else {
            throw ACMEProblem(.badSignatureAlgorithm, "the external account binding must be MACed with HS256, HS384 or HS512")
        }
        guard header["nonce"] == nil else { throw ACMEProblem(.malformed, "the external account binding must not carry a nonce") }
        guard header["url"] as? String == urls.url("new-account") else {
            throw ACMEProblem(.malformed, "the external account binding's 'url' must be the newAccount URL")
        }
        guard let kid = header["kid"] as? String, kid.count <= 100, let eab = try await authority.store.acmeEABKey(kid: kid),
              eab.provisioner == provisioner.name else {
            throw ACMEProblem(.unauthorized, "unknown external account binding key for provisioner \(provisioner.name)")
        }
        guard eab.accountID == nil else { throw ACMEProblem(.unauthorized, "external account binding key \(kid) is already bound to an account") }
        guard let jwk = try? JSONSerialization.jsonObject(with: payload) as? [String: Any], try ACMEAccountKey(jwk: jwk).thumbprint == accountKey.thumbprint else {
            throw ACMEProblem(.malformed, "the external account binding must sign the account's own key")
        }
        guard let keyBytes = Base64URL.decode(eab.hmacKey) else { throw ACMEProblem(.serverInternal, "stored EAB key is unreadable") }
        let input = Data((protected64 + "." + payload64).utf8)
        let key = SymmetricKey(data: keyBytes)
        let valid: Bool
        switch alg {
        case "HS384": valid = HMAC<SHA384>.isValidAuthenticationCode(signature, authenticating: input, using: key)
        case "HS512": valid = HMAC<SHA512>.isValidAuthenticationCode(signature, authenticating: input, using: key)
        default: valid = HMAC<SHA256>.isValidAuthenticationCode(signature, authenticating: input, using: key)
        }
        guard valid else { throw ACMEProblem(.unauthorized, "the external account binding's MAC does not verify with key \(kid)") }
        return eab
    }

    /// Makes an EAB key for a provisioner and owner (`mutual acme eab create`); the HMAC key is returned once.
    public static func createEABKey(store: Store, provisioner: String, owner: String, actor: String, now: Date = Date()) async throws -> ACMEEABKey {
        _ = try ACMEProvisioner(name: provisioner)
        guard !owner.isEmpty, owner.count <= 100, !owner.contains(where: { $0.isNewline }) else {
            throw PKIError(.malformedInput, "--owner must be 1 to 100 characters on one line")
        }
        let key = ACMEEABKey(
            kid: ACMERandom.id(), provisioner: provisioner, owner: owner,
            hmacKey: Base64URL.encode(SymmetricKey(size: .bits256).withUnsafeBytes { Data($0) }), createdAt: now
        )
        try await store.acme([.insertEAB(key)], audit: [AuditEntry(time: now, actor: actor, action: "acme-eab-create", subject: key.kid, details: [
            "provisioner": provisioner, "owner": owner,
        ])])
        return key
    }

    private func accountUpdate(_ request: ACMESignedRequest, account: ACMEAccount, id: String, urls: ACMEURLs, now: Date) async throws -> ACMEResponse {
        guard id == account.id else { throw ACMEProblem(.unauthorized, "this account URL is not the signer's") }
        if request.isPostAsGet {
            return try respond(200, json: accountJSON(account, urls: urls), urls: urls, location: urls.url("account/\(id)"))
        }
        let payload = try request.object()
        var updated = account
        var details: [String: String] = [:]
        if let status = payload["status"] {
            guard status as? String == ACMEStatus.deactivated else {
                throw ACMEProblem(.malformed, "an account's status can only be set to \"deactivated\"")
            }
            updated.status = ACMEStatus.deactivated
            details["status"] = ACMEStatus.deactivated
        }
        if payload["contact"] != nil {
            updated.contact = try Self.contacts(payload["contact"])
            details["contact"] = updated.contact.joined(separator: ",")
        }
        if updated != account {
            try await authority.store.acme(
                [.updateAccount(ACMERow(id: id, status: updated.status, body: try Self.encode(updated)), from: [ACMEStatus.valid], thumbprint: updated.thumbprint)],
                audit: [AuditEntry(time: now, actor: account.owner, action: "acme-account", subject: id, details: details)]
            )
        }
        return try respond(200, json: accountJSON(updated, urls: urls), urls: urls, location: urls.url("account/\(id)"))
    }

    private func accountOrders(account: ACMEAccount, id: String, urls: ACMEURLs) async throws -> ACMEResponse {
        guard id == account.id else { throw ACMEProblem(.unauthorized, "these orders are not the signer's") }
        let rows = try await authority.store.acmeOrders(account: id)
        let live = rows.filter { [ACMEStatus.pending, ACMEStatus.ready, ACMEStatus.processing, ACMEStatus.valid].contains($0.status) }
        return try respond(200, json: ["orders": live.map { urls.url("order/\($0.id)") }], urls: urls)
    }

    // MARK: Orders

    /// Checks and normalizes the identifiers of a new order under the provisioner's and the CA's policy; all problems
    /// at once, as subproblems.
    func checkedIdentifiers(_ value: Any?, provisioner: ACMEProvisioner) throws -> [ACMEIdentifier] {
        guard let list = value as? [[String: Any]], !list.isEmpty else {
            throw ACMEProblem(.malformed, "'identifiers' must be a non-empty list of {type, value}")
        }
        guard list.count <= 100 else { throw ACMEProblem(.rejectedIdentifier, "at most 100 identifiers per order") }
        var result: [ACMEIdentifier] = []
        var problems: [ACMEProblem.Subproblem] = []
        let caPermitted = authority.configuration.permittedDNS
        for item in list {
            guard let type = item["type"] as? String, let value = item["value"] as? String else {
                throw ACMEProblem(.malformed, "each identifier needs a string 'type' and 'value'")
            }
            let original = ACMEIdentifier(type: type, value: value)
            func refuse(_ kind: ACMEProblem.Kind, _ detail: String) {
                problems.append(.init(type: "urn:ietf:params:acme:error:\(kind.rawValue)", detail: detail, identifier: original))
            }
            switch type {
            case "dns" where provisioner.allowDNS:
                if value.hasPrefix("*."), !provisioner.challenges.contains("dns-01") {
                    refuse(.rejectedIdentifier, "\(value): wildcard names need the dns-01 challenge, which this provisioner does not offer")
                    continue
                }
                guard let name = try? Names.normalizedDNSName(value, allowWildcard: true) else {
                    refuse(.rejectedIdentifier, "'\(value.prefix(80))' is not a valid DNS name")
                    continue
                }
                guard name.contains(".") || name == "localhost" || !caPermitted.isEmpty || !provisioner.permittedDNS.isEmpty else {
                    refuse(.rejectedIdentifier, "\(name): a single-label name is not accepted")
                    continue
                }
                if !caPermitted.isEmpty, !caPermitted.contains(where: { Names.dnsName(name, isWithin: $0) }) {
                    refuse(.rejectedIdentifier, "\(name) is outside the CA's name constraints (\(caPermitted.joined(separator: ", ")))")
                    continue
                }
                if !provisioner.permittedDNS.isEmpty, !provisioner.permittedDNS.contains(where: { Names.dnsName(name, isWithin: $0) }) {
                    refuse(.rejectedIdentifier, "\(name) is outside the names provisioner \(provisioner.name) certifies (\(provisioner.permittedDNS.joined(separator: ", ")))")
                    continue
                }
                result.append(ACMEIdentifier(type: "dns", value: name))
            case "ip" where provisioner.allowIP:
                guard let bytes = try? Names.ipAddressBytes(value) else {
                    refuse(.rejectedIdentifier, "'\(value.prefix(60))' is not an IP address")
                    continue
                }
                result.append(ACMEIdentifier(type: "ip", value: Names.ipAddressString(bytes)))
            default:
                refuse(.unsupportedIdentifier, "identifiers of type '\(type.prefix(20))' are not issued by provisioner \(provisioner.name)")
            }
        }
        if !problems.isEmpty {
            let kind: ACMEProblem.Kind = problems.count == 1 && problems[0].type.hasSuffix(":unsupportedIdentifier") ? .unsupportedIdentifier : .rejectedIdentifier
            throw ACMEProblem(kind, problems.map(\.detail).joined(separator: "; "), subproblems: problems)
        }
        var seen = Set<ACMEIdentifier>()
        return result.filter { seen.insert($0).inserted }
    }

    private func newOrder(_ request: ACMESignedRequest, account: ACMEAccount, provisioner: ACMEProvisioner, urls: ACMEURLs, now: Date) async throws -> ACMEResponse {
        let payload = try request.object()
        if payload["notBefore"] != nil || payload["notAfter"] != nil {
            throw ACMEProblem(.malformed, "notBefore and notAfter are not accepted: provisioner \(provisioner.name) issues \(provisioner.validity) certificates")
        }
        var profile = provisioner.profile
        if let requested = payload["profile"] {
            guard let name = requested as? String, let chosen = provisioner.profiles.first(where: { $0.rawValue == name }) else {
                throw ACMEProblem(.invalidProfile, "profile '\(String(describing: requested).prefix(40))' is not offered; this provisioner offers \(provisioner.profiles.map { "'\($0.rawValue)'" }.joined(separator: ", "))")
            }
            profile = chosen
        }
        let identifiers = try checkedIdentifiers(payload["identifiers"], provisioner: provisioner)
        try await checkRateLimits(account: account, identifiers: identifiers, provisioner: provisioner, now: now)
        let replaces = try await replacedSerial(payload["replaces"], account: account)
        let expires = now.addingTimeInterval(provisioner.orderLifetime.timeInterval)
        let orderID = ACMERandom.id()
        var steps: [ACMEStep] = []
        var authorizationIDs: [String] = []
        for identifier in identifiers {
            // A wildcard is authorized for its base name, and only DNS can show control of every name under it.
            let wildcard = identifier.type == "dns" && identifier.value.hasPrefix("*.")
            let types = wildcard ? ["dns-01"] : provisioner.challenges
            let challenges = types.map {
                ACMEChallenge(type: $0, token: ACMERandom.token(), status: ACMEStatus.pending, validated: nil, error: nil)
            }
            let authorization = ACMEAuthorization(
                id: ACMERandom.id(), orderID: orderID, accountID: account.id,
                identifier: wildcard ? ACMEIdentifier(type: "dns", value: String(identifier.value.dropFirst(2))) : identifier,
                status: ACMEStatus.pending, expires: expires, challenges: challenges, wildcard: wildcard ? true : nil
            )
            authorizationIDs.append(authorization.id)
            steps.append(.insertAuthorization(ACMERow(id: authorization.id, status: authorization.status, body: try Self.encode(authorization)), orderID: orderID, accountID: account.id))
        }
        let order = ACMEOrder(
            id: orderID, accountID: account.id, provisioner: provisioner.name, status: ACMEStatus.pending, expires: expires,
            identifiers: identifiers, authorizations: authorizationIDs, profile: profile.rawValue, error: nil,
            certificateSerial: nil, createdAt: now, replaces: replaces
        )
        steps.insert(.insertOrder(ACMERow(id: orderID, status: order.status, body: try Self.encode(order)), accountID: account.id, expires: expires, created: now), at: 0)
        try await authority.store.acme(steps, audit: [AuditEntry(time: now, actor: account.owner, action: "acme-order", subject: orderID, details: [
            "identifiers": identifiers.map { "\($0.type):\($0.value)" }.joined(separator: ","), "status": order.status,
        ])])
        return try respond(201, json: orderJSON(order, urls: urls), urls: urls, location: urls.url("order/\(orderID)"))
    }

    /// Orders per account and certificates per identifier, each over the last hour: over the limit, `rateLimited` with
    /// Retry-After saying when the oldest counted one leaves the window.
    func checkRateLimits(account: ACMEAccount, identifiers: [ACMEIdentifier], provisioner: ACMEProvisioner, now: Date) async throws {
        let window: TimeInterval = 3600
        let since = now.addingTimeInterval(-window)
        func retry(_ oldest: Date?) -> Int { max(1, Int(((oldest ?? now).addingTimeInterval(window)).timeIntervalSince(now).rounded(.up))) }
        if let limit = provisioner.ordersPerAccountPerHour {
            let (count, oldest) = try await authority.store.acmeOrderCount(account: account.id, since: since)
            if count >= limit {
                throw ACMEProblem(.rateLimited, "account \(account.id) made \(count) orders in the last hour; the limit is \(limit)", retryAfter: retry(oldest))
            }
        }
        if let limit = provisioner.certificatesPerIdentifierPerHour {
            for identifier in identifiers {
                let (count, oldest) = try await authority.store.certificateCount(san: "\(identifier.type):\(identifier.value)", since: since)
                if count >= limit {
                    throw ACMEProblem(.rateLimited, "\(count) certificates named \(identifier.value) in the last hour; the limit is \(limit)", retryAfter: retry(oldest))
                }
            }
        }
    }

    private func orderJSON(_ order: ACMEOrder, urls: ACMEURLs) -> [String: Any] {
        var json: [String: Any] = [
            "status": order.status, "expires": Self.time(order.expires),
            "identifiers": order.identifiers.map { ["type": $0.type, "value": $0.value] },
            "authorizations": order.authorizations.map { urls.url("authz/\($0)") }, "finalize": urls.url("order/\(order.id)/finalize"),
        ]
        if let profile = order.profile { json["profile"] = profile }
        if let error = order.error { json["error"] = Self.problemJSON(error) }
        if order.status == ACMEStatus.valid { json["certificate"] = urls.url("cert/\(order.id)") }
        return json
    }

    /// The order as it stands now: pending becomes ready when every authorization is valid and invalid when one failed
    /// (recorded, whichever request notices first); an unfinished order past its expiry is invalid.
    func currentOrder(id: String, account: ACMEAccount, now: Date) async throws -> ACMEOrder {
        guard let row = try await authority.store.acmeOrder(id: id), var order = try? Self.decode(ACMEOrder.self, row.body),
              order.accountID == account.id else {
            throw ACMEProblem(.malformed, "no order \(id.prefix(40)) of this account", status: 404)
        }
        order.status = row.status
        guard order.status == ACMEStatus.pending || order.status == ACMEStatus.ready else { return order }
        var next = order
        if order.expires <= now {
            next.status = ACMEStatus.invalid
            next.error = ACMEProblem(.malformed, "the order expired before it was finalized").document
        } else if order.status == ACMEStatus.pending {
            let authorizations = try await currentAuthorizations(order: order, now: now)
            if let failed = authorizations.first(where: { $0.status != ACMEStatus.valid && $0.status != ACMEStatus.pending }) {
                next.status = ACMEStatus.invalid
                let cause = failed.challenges.compactMap(\.error).first
                next.error = ACMEProblemDocument(
                    type: cause?.type ?? "urn:ietf:params:acme:error:unauthorized",
                    detail: "authorization for \(failed.identifier.value) is \(failed.status)\(cause.map { ": " + $0.detail } ?? "")", status: 403,
                    subproblems: nil
                )
            } else if authorizations.allSatisfy({ $0.status == ACMEStatus.valid }) {
                next.status = ACMEStatus.ready
            }
        }
        guard next.status != order.status else { return order }
        do {
            try await authority.store.acme([.updateOrder(ACMERow(id: id, status: next.status, body: try Self.encode(next)), from: [order.status])], audit: [
                AuditEntry(time: now, actor: "acme:\(order.provisioner)", action: "acme-order", subject: id, details: ["status": next.status]),
            ])
            return next
        } catch let error as StoreError where error.code == .conflict {
            // Moved meanwhile by another request: read what it became.
            return try await currentOrder(id: id, account: account, now: now)
        }
    }

    /// The order's authorizations, with any validation that died with its process failed (never left pending).
    private func currentAuthorizations(order: ACMEOrder, now: Date) async throws -> [ACMEAuthorization] {
        var result: [ACMEAuthorization] = []
        for row in try await authority.store.acmeAuthorizations(order: order.id) {
            result.append(try await current(row, now: now))
        }
        return result
    }

    /// Reads an authorization, expiring it or failing an abandoned validation as time says.
    private func current(_ row: ACMERow, now: Date) async throws -> ACMEAuthorization {
        var authorization = try Self.decode(ACMEAuthorization.self, row.body)
        let stored = row.status
        authorization.status = stored == "validating" ? ACMEStatus.pending : stored
        var next: ACMEAuthorization?
        if stored == ACMEStatus.pending, authorization.expires <= now {
            var expired = authorization
            expired.status = ACMEStatus.expired
            next = expired
        } else if stored == "validating", let started = authorization.challenges.compactMap(\.validated).first,
                  now.timeIntervalSince(started) > Self.validationDeadline {
            var failed = authorization
            failed.status = ACMEStatus.invalid
            for index in failed.challenges.indices where failed.challenges[index].status == ACMEStatus.processing {
                failed.challenges[index].status = ACMEStatus.invalid
                failed.challenges[index].validated = nil
                failed.challenges[index].error = ACMEProblem(.serverInternal, "the validation was interrupted (the server restarted); start a new order").document
            }
            next = failed
        }
        guard let next else { return authorization }
        do {
            try await authority.store.acme([.updateAuthorization(ACMERow(id: next.id, status: next.status, body: try Self.encode(next)), from: [stored])], audit: [
                AuditEntry(time: now, actor: "acme", action: "acme-authorization", subject: next.id, details: [
                    "status": next.status, "reason": next.status == ACMEStatus.expired ? "expired unvalidated" : "validation interrupted",
                ]),
            ])
        } catch let error as StoreError where error.code == .conflict {
            guard let again = try await authority.store.acmeAuthorization(id: next.id) else { throw error }
            return try await current(again, now: now)
        }
        return next
    }

    private func orderRead(account: ACMEAccount, id: String, urls: ACMEURLs, now: Date) async throws -> ACMEResponse {
        let order = try await currentOrder(id: id, account: account, now: now)
        var response = try respond(200, json: orderJSON(order, urls: urls), urls: urls)
        if order.status == ACMEStatus.processing { response.headers.append(("retry-after", "1")) }
        return response
    }

    // MARK: Authorizations and challenges

    private func authorizationJSON(_ authorization: ACMEAuthorization, urls: ACMEURLs) -> [String: Any] {
        var json: [String: Any] = [
            "identifier": ["type": authorization.identifier.type, "value": authorization.identifier.value],
            "status": authorization.status, "expires": Self.time(authorization.expires),
            "challenges": authorization.challenges.map { challengeJSON($0, authorizationID: authorization.id, urls: urls) },
        ]
        if authorization.wildcard == true { json["wildcard"] = true }
        return json
    }

    private func challengeJSON(_ challenge: ACMEChallenge, authorizationID: String, urls: ACMEURLs) -> [String: Any] {
        var json: [String: Any] = [
            "type": challenge.type, "url": urls.url("chall/\(authorizationID)/\(challenge.type)"), "token": challenge.token,
            "status": challenge.status,
        ]
        if challenge.status == ACMEStatus.valid, let validated = challenge.validated { json["validated"] = Self.time(validated) }
        if let error = challenge.error { json["error"] = Self.problemJSON(error) }
        return json
    }

    private func authorizationRow(id: String, account: ACMEAccount) async throws -> ACMERow {
        guard let row = try await authority.store.acmeAuthorization(id: id),
              let authorization = try? Self.decode(ACMEAuthorization.self, row.body), authorization.accountID == account.id else {
            throw ACMEProblem(.malformed, "no authorization \(id.prefix(40)) of this account", status: 404)
        }
        return row
    }

    private func authorization(_ request: ACMESignedRequest, account: ACMEAccount, id: String, urls: ACMEURLs, now: Date) async throws -> ACMEResponse {
        let row = try await authorizationRow(id: id, account: account)
        var authorization = try await current(row, now: now)
        if !request.isPostAsGet {
            guard try request.object()["status"] as? String == ACMEStatus.deactivated else {
                throw ACMEProblem(.malformed, "an authorization's status can only be set to \"deactivated\"")
            }
            guard authorization.status == ACMEStatus.pending || authorization.status == ACMEStatus.valid else {
                throw ACMEProblem(.malformed, "an authorization that is \(authorization.status) cannot be deactivated")
            }
            let from = authorization.status
            authorization.status = ACMEStatus.deactivated
            try await authority.store.acme([.updateAuthorization(ACMERow(id: id, status: authorization.status, body: try Self.encode(authorization)), from: [from])], audit: [
                AuditEntry(time: now, actor: account.owner, action: "acme-authorization", subject: id, details: ["status": authorization.status]),
            ])
        }
        return try respond(200, json: authorizationJSON(authorization, urls: urls), urls: urls)
    }

    private func challenge(
        _ request: ACMESignedRequest, account: ACMEAccount, authzID: String, type: String, provisioner: ACMEProvisioner, urls: ACMEURLs, now: Date
    ) async throws -> ACMEResponse {
        let row = try await authorizationRow(id: authzID, account: account)
        var authorization = try await current(row, now: now)
        guard let index = authorization.challenges.firstIndex(where: { $0.type == type }) else {
            throw ACMEProblem(.malformed, "no \(type.prefix(20)) challenge on this authorization", status: 404)
        }
        let up = [("link", "<\(urls.url("authz/\(authzID)"))>;rel=\"up\"")]
        // POST-as-GET reads it; `{}` asks for validation. Anything but a pending challenge is only reported.
        guard !request.isPostAsGet, row.status == ACMEStatus.pending, authorization.challenges[index].status == ACMEStatus.pending else {
            var response = try respond(200, json: challengeJSON(authorization.challenges[index], authorizationID: authzID, urls: urls), urls: urls)
            response.headers += up
            return response
        }
        guard try request.object().isEmpty else { throw ACMEProblem(.malformed, "a challenge response is the empty object {}") }
        authorization.challenges[index].status = ACMEStatus.processing
        authorization.challenges[index].validated = now  // when validation started, until it ends
        do {
            try await authority.store.acme([.updateAuthorization(ACMERow(id: authzID, status: "validating", body: try Self.encode(authorization)), from: [ACMEStatus.pending])], audit: [
                AuditEntry(time: now, actor: account.owner, action: "acme-challenge", subject: authzID, details: [
                    "type": type, "identifier": "\(authorization.identifier.type):\(authorization.identifier.value)", "status": "processing",
                ]),
            ])
        } catch let error as StoreError where error.code == .conflict {
            // Another request started the validation first: report where it stands.
            let again = try await current(try await authorizationRow(id: authzID, account: account), now: now)
            var response = try respond(200, json: challengeJSON(again.challenges[index], authorizationID: authzID, urls: urls), urls: urls)
            response.headers += up
            return response
        }
        let keyAuthorization = authorization.challenges[index].token + "." + account.thumbprint
        let started = authorization
        let validation = running.start { [self] in
            await self.finishValidation(started, index: index, keyAuthorization: keyAuthorization, provisioner: provisioner, account: account)
        }
        // Most checks take milliseconds: answer with the outcome when it comes within a second, so the client's first
        // poll finds it; a slow check goes on after the answer ("processing"), and the client polls as usual.
        var reported = authorization.challenges[index]
        if await ValidationTasks.completes(validation, within: .seconds(1)),
           let row = try await authority.store.acmeAuthorization(id: authzID) {
            reported = try await current(row, now: clock()).challenges[index]
        }
        var response = try respond(200, json: challengeJSON(reported, authorizationID: authzID, urls: urls), urls: urls)
        response.headers += up
        return response
    }

    /// Runs the check and records its outcome: the challenge and the authorization become valid or invalid (with the
    /// reason), and the order follows.
    private func finishValidation(_ started: ACMEAuthorization, index: Int, keyAuthorization: String, provisioner: ACMEProvisioner, account: ACMEAccount) async {
        let problem = await validator.validate(
            challenge: started.challenges[index], identifier: started.identifier, keyAuthorization: keyAuthorization, provisioner: provisioner
        )
        let now = clock()
        var finished = started
        finished.challenges[index].status = problem == nil ? ACMEStatus.valid : ACMEStatus.invalid
        finished.challenges[index].validated = problem == nil ? now : nil
        finished.challenges[index].error = problem?.document
        finished.status = finished.challenges[index].status
        do {
            try await authority.store.acme([.updateAuthorization(ACMERow(id: finished.id, status: finished.status, body: try Self.encode(finished)), from: ["validating"])], audit: [
                AuditEntry(time: now, actor: "acme:\(provisioner.name)", action: "acme-challenge", subject: finished.id, details: [
                    "type": finished.challenges[index].type, "identifier": "\(finished.identifier.type):\(finished.identifier.value)",
                    "status": finished.status, "code": problem?.kind.rawValue ?? "none", "reason": problem?.detail ?? "",
                ]),
            ])
            _ = try await currentOrder(id: finished.orderID, account: account, now: now)
        } catch {
            logger.error("recording an ACME validation failed", metadata: ["authorization": "\(finished.id)", "error": "\(error)"])
        }
    }

    // MARK: Finalize and certificates

    private func finalize(
        _ request: ACMESignedRequest, account: ACMEAccount, id: String, provisioner: ACMEProvisioner, urls: ACMEURLs, now: Date
    ) async throws -> ACMEResponse {
        let payload = try request.object()
        var order = try await currentOrder(id: id, account: account, now: now)
        guard order.status == ACMEStatus.ready else {
            throw ACMEProblem(.orderNotReady, "the order is \(order.status), not ready: \(order.status == ACMEStatus.pending ? "complete its authorizations first" : "it cannot be finalized again")")
        }
        guard let csrText = payload["csr"] as? String, let der = Base64URL.decode(csrText), !der.isEmpty else {
            throw ACMEProblem(.malformed, "'csr' must be the base64url DER of a CSR")
        }
        let issuance: IssuanceRequest
        do {
            let csr = try CSRDecoder.decode(Array(der))
            let profile = order.profile.flatMap { name in provisioner.profiles.first { $0.rawValue == name } } ?? provisioner.profile
            issuance = try IssuanceRequest(verifiedCSR: csr, profile: profile, validity: provisioner.validity)
        } catch let error as PKIError {
            throw ACMEProblem(.badCSR, error.reason)
        }
        var requested = Set(issuance.dnsNames.compactMap { try? Names.normalizedDNSName($0, allowWildcard: true) }.map { ACMEIdentifier(type: "dns", value: $0) })
        requested.formUnion(issuance.ipAddresses.compactMap { try? Names.ipAddressBytes($0) }.map { ACMEIdentifier(type: "ip", value: Names.ipAddressString($0)) })
        let ordered = Set(order.identifiers)
        guard issuance.uris.isEmpty, requested.count == issuance.dnsNames.count + issuance.ipAddresses.count, requested == ordered else {
            let names = { (set: Set<ACMEIdentifier>) in set.map(\.value).sorted().joined(separator: ", ") }
            throw ACMEProblem(.badCSR, "the CSR must ask for exactly the order's identifiers (\(names(ordered))); it asks for \(names(requested))\(issuance.uris.isEmpty ? "" : " and URIs")")
        }
        if let cn = issuance.commonName, !order.identifiers.contains(where: { $0.value == cn.lowercased() }) {
            throw ACMEProblem(.badCSR, "the CSR's common name '\(cn.prefix(64))' is not one of the order's identifiers")
        }
        // Claim the order: only one finalize proceeds.
        order.status = ACMEStatus.processing
        do {
            try await authority.store.acme([.updateOrder(ACMERow(id: id, status: order.status, body: try Self.encode(order)), from: [ACMEStatus.ready])])
        } catch let error as StoreError where error.code == .conflict {
            throw ACMEProblem(.orderNotReady, "the order is being finalized by another request")
        }
        do {
            let issued = try await authority.issueForACME(issuance, order: order, account: account, now: now) { certified in
                var valid = order
                valid.status = ACMEStatus.valid
                valid.certificateSerial = certified.serial
                return (.updateOrder(ACMERow(id: id, status: valid.status, body: try Self.encode(valid)), from: [ACMEStatus.processing]), valid)
            }
            return try respond(200, json: orderJSON(issued, urls: urls), urls: urls, location: urls.url("order/\(id)"))
        } catch {
            let problem: ACMEProblem
            if let error = error as? PKIError {
                problem = ACMEProblem(.badCSR, error.reason)
            } else {
                logger.error("ACME issuance failed", metadata: ["order": "\(id)", "error": "\(error)"])
                problem = ACMEProblem(.serverInternal, "the certificate could not be issued; see the server log")
            }
            var failed = order
            failed.status = ACMEStatus.invalid
            failed.error = problem.document
            try? await authority.store.acme([.updateOrder(ACMERow(id: id, status: failed.status, body: try Self.encode(failed)), from: [ACMEStatus.processing])], audit: [
                AuditEntry(time: now, actor: account.owner, action: "acme-order", subject: id, details: ["status": "invalid", "code": problem.kind.rawValue, "reason": problem.detail]),
            ])
            throw problem
        }
    }

    private func certificate(account: ACMEAccount, orderID: String, urls: ACMEURLs) async throws -> ACMEResponse {
        let order = try await currentOrder(id: orderID, account: account, now: clock())
        guard order.status == ACMEStatus.valid, let serial = order.certificateSerial,
              let record = try await authority.store.certificate(serial: serial) else {
            throw ACMEProblem(.malformed, "no certificate for this order", status: 404)
        }
        let pem = PEMCodec.encode(record.der, label: "CERTIFICATE") + (try PEMBundle.pem([authority.ca.certificate]))
        return ACMEResponse(
            status: 200, headers: commonHeaders(urls) + [("content-type", "application/pem-certificate-chain")], body: Data(pem.utf8)
        )
    }

    // MARK: Revocation

    private func revoke(_ request: ACMESignedRequest, account: ACMEAccount?, jwk: ACMEAccountKey?, urls: ACMEURLs, now: Date) async throws -> ACMEResponse {
        let payload = try request.object()
        guard let text = payload["certificate"] as? String, let der = Base64URL.decode(text),
              let certificate = try? Certificate(derEncoded: Array(der)) else {
            throw ACMEProblem(.malformed, "'certificate' must be the base64url DER of a certificate")
        }
        guard let record = try await authority.presentedRecord(certificate) else {
            throw ACMEProblem(.malformed, "this certificate was not issued by this authority", status: 404)
        }
        if let account {
            // The account that finalized the order for it (not merely one with the same owner: a team's EAB keys may
            // bind several accounts).
            let orders = try await authority.store.acmeOrders(account: account.id, limit: 100_000)
            guard orders.contains(where: { row in row.status == ACMEStatus.valid && (try? Self.decode(ACMEOrder.self, row.body))?.certificateSerial == record.serial }) else {
                throw ACMEProblem(.unauthorized, "account \(account.id) did not obtain certificate \(record.serial)")
            }
        } else if let jwk {
            guard let key = jwk.certificatePublicKey, key == certificate.publicKey else {
                throw ACMEProblem(.unauthorized, "the JWS is not signed with the certificate's key")
            }
        }
        let reasonCode = payload["reason"] == nil ? 0 : (payload["reason"] as? Int ?? -1)
        let allowed: [Int: RevocationReason] = [0: .unspecified, 1: .keyCompromise, 3: .affiliationChanged, 4: .superseded, 5: .cessationOfOperation]
        guard let reason = allowed[reasonCode] else {
            throw ACMEProblem(.badRevocationReason, "revocation reason \(reasonCode) is not accepted (use 0, 1, 3, 4 or 5)")
        }
        let actor = account?.owner ?? "acme:certificate-key:\(record.serial)"
        do {
            _ = try await authority.revoke(serial: record.serial, reason: reason, actor: actor, now: now)
        } catch let error as AuthorityError where error.code == .conflict {
            throw ACMEProblem(.alreadyRevoked, "certificate \(record.serial) is already revoked")
        }
        return ACMEResponse(status: 200, headers: commonHeaders(urls))
    }

    // MARK: Responses

    private func commonHeaders(_ urls: ACMEURLs?) -> [(String, String)] {
        var headers = [("replay-nonce", nonces.make(now: clock()))]
        if let urls { headers.append(("link", "<\(urls.url("directory"))>;rel=\"index\"")) }
        return headers
    }

    func respond(_ status: Int, json: [String: Any], urls: ACMEURLs, location: String? = nil) throws -> ACMEResponse {
        var headers = commonHeaders(urls) + [("content-type", "application/json"), ("cache-control", "no-store")]
        if let location { headers.append(("location", location)) }
        return ACMEResponse(status: status, headers: headers, body: try JSONSerialization.data(withJSONObject: json, options: [.sortedKeys, .withoutEscapingSlashes]))
    }

    func problemResponse(_ problem: ACMEProblem, urls: ACMEURLs?) -> ACMEResponse {
        var headers = commonHeaders(urls) + [("content-type", "application/problem+json"), ("cache-control", "no-store")]
        if let retry = problem.retryAfter { headers.append(("retry-after", String(retry))) }
        let body = (try? JSONSerialization.data(withJSONObject: Self.problemJSON(problem.document), options: [.sortedKeys, .withoutEscapingSlashes])) ?? Data()
        var response = ACMEResponse(status: problem.status, headers: headers, body: body)
        response.problem = problem
        return response
    }

    static func problemJSON(_ document: ACMEProblemDocument) -> [String: Any] {
        var json: [String: Any] = ["type": document.type, "detail": document.detail]
        if let status = document.status { json["status"] = status }
        if let subproblems = document.subproblems {
            json["subproblems"] = subproblems.map { sub -> [String: Any] in
                var item: [String: Any] = ["type": sub.type, "detail": sub.detail]
                if let identifier = sub.identifier { item["identifier"] = ["type": identifier.type, "value": identifier.value] }
                return item
            }
        }
        return json
    }

    static func time(_ date: Date) -> String { AuditChain.format(date) }

    static func encode<T: Encodable>(_ value: T) throws -> String {
        let encoder = JSONEncoder()
        encoder.dateEncodingStrategy = .secondsSince1970
        encoder.outputFormatting = [.sortedKeys]
        return String(decoding: try encoder.encode(value), as: UTF8.self)
    }

    public static func decode<T: Decodable>(_ type: T.Type, _ text: String) throws -> T {
        let decoder = JSONDecoder()
        decoder.dateDecodingStrategy = .secondsSince1970
        return try decoder.decode(type, from: Data(text.utf8))
    }
}

/// The URLs of one provisioner, as the client addressed the server.
struct ACMEURLs: Sendable {
    let base: String
    let provisioner: String
    func url(_ rest: String) -> String { "\(base)/acme/\(provisioner)/\(rest)" }
}

/// Validations running in this process.
final class ValidationTasks: Sendable {
    private let tasks = Mutex<[UInt64: Task<Void, Never>]>([:])
    private let counter = Mutex<UInt64>(0)

    @discardableResult
    func start(_ body: @escaping @Sendable () async -> Void) -> Task<Void, Never> {
        let id = counter.withLock { $0 += 1; return $0 }
        let task = Task {
            await body()
            _ = self.tasks.withLock { $0.removeValue(forKey: id) }
        }
        tasks.withLock { $0[id] = task }
        return task
    }

    /// Whether `task` finishes within `limit`; it runs on either way.
    static func completes(_ task: Task<Void, Never>, within limit: Duration) async -> Bool {
        let waiting = FirstOutcome()
        return await withCheckedContinuation { continuation in
            waiting.set(continuation)
            Task {
                await task.value
                waiting.resume(true)
            }
            Task {
                try? await Task.sleep(for: limit)
                waiting.resume(false)
            }
        }
    }

    /// Resumes a continuation with the first outcome only.
    final class FirstOutcome: Sendable {
        private let continuation = Mutex<CheckedContinuation<Bool, Never>?>(nil)
        func set(_ value: CheckedContinuation<Bool, Never>) { continuation.withLock { $0 = value } }
        func resume(_ value: Bool) { continuation.withLock { $0?.resume(returning: value); $0 = nil } }
    }

    func waitAll() async {
        while let next = tasks.withLock({ $0.values.first }) {
            await next.value
            // The task removes itself when done; wait for that bookkeeping too.
            await Task.yield()
            if tasks.withLock({ $0.values.first }) == next { tasks.withLock { $0 = $0.filter { $0.value != next } } }
        }
    }
}

extension Authority {
    /// Issues an ACME order's certificate: signed under the CA's policy, then recorded in the inventory (owner: the
    /// account) together with the order's own change, in one transaction, before anyone sees it.
    func issueForACME(
        _ request: IssuanceRequest, order: ACMEOrder, account: ACMEAccount, now: Date,
        orderChange: (CertificateRecord) throws -> (ACMEStep, ACMEOrder)
    ) async throws -> ACMEOrder {
        let certificate = try ca.issue(request, now: now)
        // A replacement is the replaced certificate's successor in the inventory's renewal lineage.
        let requester = order.replaces.map { "cert:\($0)" } ?? account.owner
        let record = try Self.makeRecord(certificate, profile: request.profile, owner: account.owner, requester: requester, issuerDescription: issuerDescription)
        let (step, updated) = try orderChange(record)
        try await store.acme([step], certificate: record, audit: [
            AuditEntry(time: now, actor: account.owner, action: "issue", subject: record.serial, details: [
                "profile": request.profile.rawValue, "serial": record.serial, "identity": record.identity, "owner": account.owner,
                "acme_order": order.id, "not_after": AuditChain.format(certificate.notValidAfter),
            ].merging(order.replaces.map { ["replaces": $0] } ?? [:]) { $1 }),
            AuditEntry(time: now, actor: account.owner, action: "acme-order", subject: order.id, details: ["status": "valid", "serial": record.serial]),
        ])
        return updated
    }
}
