import Foundation
import Hummingbird
import MutualAuthority
import MutualPKCS11
import MutualPKI
import MutualStore
import X509

/// JSON request and response bodies of the API (see docs/api.md and docs/openapi.yaml).
struct SignRequest: Decodable {
    var csr: String
    var profile: String?
    var validity: String?
}

/// Over mTLS only `csr`; without a client certificate, the current certificate and a proof of possession of its key.
struct RenewRequest: Decodable {
    var csr: String
    var certificate: String?
    var timestamp: String?
    var signature: String?
}

struct RenewExpiredRequest: Decodable {
    var certificate: String
    var csr: String
    var timestamp: String
    var signature: String
}

struct RevokeRequest: Decodable {
    var serial: String
    var reason: String?
}

struct IssuedResponse: Encodable {
    var certificate: String
    var chain: String
    var serial: String
    var not_after: String
    var identity: String
    /// How this certificate renews: `mtls` (it can be a TLS client) or `proof` (proof of possession in the body).
    var renewal: String
}

/// The handlers. Each decides, through the authority, and maps errors to problems only via ``ProblemMiddleware``.
struct AuthorityRoutes: Sendable {
    let authority: Authority
    let metrics: ServerMetrics
    let renewExpiredGrace: ValidityDuration?
    let publisher: RevocationPublisher
    let feed: RevocationFeed
    let readinessProbe = ReadinessProbe()

    func register(on router: Router<APIContext>) {
        router.post("/v1/sign") { request, context in try await self.sign(request, context) }
        router.post("/v1/renew") { request, context in try await self.renew(request, context) }
        router.post("/v1/renew-expired") { request, context in try await self.renewExpired(request, context) }
        router.post("/v1/revoke") { request, context in try await self.revoke(request, context) }
        router.get("/v1/certificates") { request, context in try await self.listCertificates(request, context) }
        router.get("/v1/certificates/:serial") { request, context in try await self.showCertificate(request, context) }
        router.get("/v1/ca") { _, _ in
            let info = try await self.authority.issuingCAInfo()
            return try self.json(["issuing_ca": info.issuer, "generation": String(info.generation), "renew_now": info.renewNow ? "true" : "false"])
        }
        router.get("/bundle.pem") { _, _ in try self.pem(self.authority.trustedRoots + self.authority.publishedIntermediates) }
        router.get("/healthz") { _, _ in try await self.health() }
        router.get("/readyz") { _, _ in try await self.readiness() }
        router.get("/metrics") { _, _ in
            Response(
                status: .ok, headers: [.contentType: "text/plain; version=0.0.4; charset=utf-8"],
                body: .init(byteBuffer: ByteBuffer(bytes: await self.metrics.render(store: self.authority.store, now: .now)))
            )
        }
    }

    // MARK: Helpers

    static let jsonDecoder = JSONDecoder()

    /// Reads a JSON body: 415 unless the content type is JSON, 413 over 64 KiB, 400 with the reason if malformed.
    func decode<T: Decodable>(_ type: T.Type, from request: Request, context: APIContext) async throws -> T {
        let contentType = request.headers[.contentType]?.lowercased() ?? ""
        guard contentType.hasPrefix("application/json") else {
            throw Problem(.unsupportedMediaType, code: "unsupported-media-type", title: "Unsupported Media Type",
                          detail: "send the body as application/json (got \(contentType.isEmpty ? "no content type" : contentType))")
        }
        let buffer = try await request.body.collect(upTo: context.maxUploadSize)
        do {
            return try Self.jsonDecoder.decode(T.self, from: Data(buffer: buffer))
        } catch let DecodingError.keyNotFound(key, _) {
            throw Problem(.badRequest, code: "malformed-json", title: "Bad Request", detail: "missing field '\(key.stringValue)'")
        } catch let DecodingError.typeMismatch(_, ctx) {
            throw Problem(.badRequest, code: "malformed-json", title: "Bad Request", detail: "wrong type at \(ctx.codingPath.map(\.stringValue).joined(separator: "."))")
        } catch {
            throw Problem(.badRequest, code: "malformed-json", title: "Bad Request", detail: "the body is not valid JSON for this endpoint")
        }
    }

    func json(_ value: some Encodable, status: HTTPResponse.Status = .ok) throws -> Response {
        let encoder = JSONEncoder()
        encoder.outputFormatting = [.sortedKeys, .withoutEscapingSlashes]
        encoder.dateEncodingStrategy = .iso8601
        return Response(status: status, headers: [.contentType: "application/json", .cacheControl: "no-store"],
                        body: .init(byteBuffer: ByteBuffer(bytes: try encoder.encode(value))))
    }

    func pem(_ certificates: [Certificate]) throws -> Response {
        Response(status: .ok, headers: [.contentType: "application/x-pem-file"],
                 body: .init(byteBuffer: ByteBuffer(string: try PEMBundle.pem(certificates))))
    }

    func issuedResponse(_ issued: Authority.IssuedCertificate) throws -> Response {
        try issuedResponse(IssuedAnyCertificate(issued))
    }

    func issuedResponse(_ issued: IssuedAnyCertificate) throws -> Response {
        // The inventory record already holds the leaf's DER: encode it once, not again from the parsed certificate.
        let leaf = PEMCodec.encode(issued.record.der, label: "CERTIFICATE")
        let rest = try issued.chain.dropFirst().map { PEMCodec.encode(try $0.der, label: "CERTIFICATE") }.joined()
        return try json(IssuedResponse(
            certificate: leaf, chain: leaf + rest,
            serial: issued.record.serial, not_after: AuditChain.format(issued.record.notAfter), identity: issued.record.identity,
            renewal: Authority.renewalMethod(for: issued.certificate).rawValue
        ))
    }

    /// The verified client certificate, checked against the inventory; 401 when none was sent.
    func presentedRecord(_ context: APIContext) async throws -> (AnyCertificate, CertificateRecord) {
        guard let certificate = try await context.peerCertificate() else {
            throw AuthorityError(.unauthenticated, "this endpoint needs a client certificate (mTLS) issued by this authority")
        }
        return (certificate, try await authority.checkPresented(certificate))
    }

    func requireAdmin(_ context: APIContext) async throws -> CertificateRecord {
        let (_, record) = try await presentedRecord(context)
        guard record.profile == CertificateProfile.admin.rawValue else {
            throw AuthorityError(.certificateRefused, "this endpoint needs the admin client certificate (admin/cert.pem), not \(record.profile) certificate \(record.serial)")
        }
        return record
    }

    /// Runs a handler, counting its outcome and reason and timing it.
    func measured(_ operation: String, route: String, _ body: () async throws -> Response) async throws -> Response {
        let start = ContinuousClock.now
        defer { metrics.observe(route: route, since: start) }
        do {
            let response = try await body()
            metrics.count(operation, outcome: "ok", reason: "none")
            return response
        } catch {
            let problem = Problem.from(error)
            metrics.count(operation, outcome: problem.status.code >= 500 ? "error" : "refused", reason: String(problem.type.split(separator: ":").last ?? "unknown"))
            throw error
        }
    }

    // MARK: Handlers

    func sign(_ request: Request, _ context: APIContext) async throws -> Response {
        try await measured("issuance", route: "/v1/sign") {
            guard let authorization = request.headers[.authorization], authorization.lowercased().hasPrefix("bearer ") else {
                throw AuthorityError(.unauthenticated, "missing 'Authorization: Bearer <token>' (create one with `mutual token create`)")
            }
            let bearer = String(authorization.dropFirst("bearer ".count)).trimmingCharacters(in: .whitespaces)
            let body = try await decode(SignRequest.self, from: request, context: context)
            let profile = try body.profile.map { try CertificateProfile(leafName: $0) }
            let validity = try body.validity.map { try ValidityDuration(parsing: $0) }
            let issued = try await authority.sign(csr: Array(body.csr.utf8), profile: profile, validity: validity, bearer: bearer)
            return try issuedResponse(issued)
        }
    }

    func renew(_ request: Request, _ context: APIContext) async throws -> Response {
        try await measured("renewal", route: "/v1/renew") {
            let body = try await decode(RenewRequest.self, from: request, context: context)
            if let certificate = try await context.peerCertificate() {
                return try issuedResponse(try await authority.renew(current: certificate, csr: Array(body.csr.utf8)))
            }
            guard let certificatePEM = body.certificate, let timestamp = body.timestamp, let signatureText = body.signature else {
                throw AuthorityError(.unauthenticated, "renewal needs the current certificate: as the TLS client certificate, or in the body with a proof of possession of its key (certificate, timestamp, signature)")
            }
            let certificate = try PEMBundle.anyCertificates(fromBytes: Array(certificatePEM.utf8), what: "certificate")[0]
            guard let signature = Data(base64Encoded: signatureText) else {
                throw Problem(.badRequest, code: "malformed-signature", title: "Bad Request", detail: "signature must be base64")
            }
            return try issuedResponse(try await authority.renewByProof(
                current: certificate, csr: Array(body.csr.utf8), timestamp: timestamp, signature: Array(signature)
            ))
        }
    }

    func renewExpired(_ request: Request, _ context: APIContext) async throws -> Response {
        try await measured("renewal", route: "/v1/renew-expired") {
            let body = try await decode(RenewExpiredRequest.self, from: request, context: context)
            let certificate = try PEMBundle.anyCertificates(fromBytes: Array(body.certificate.utf8), what: "certificate")[0]
            guard let signature = Data(base64Encoded: body.signature) else {
                throw Problem(.badRequest, code: "malformed-signature", title: "Bad Request", detail: "signature must be base64")
            }
            let issued = try await authority.renewExpired(
                current: certificate, csr: Array(body.csr.utf8), timestamp: body.timestamp, signature: Array(signature),
                grace: renewExpiredGrace
            )
            return try issuedResponse(issued)
        }
    }

    func revoke(_ request: Request, _ context: APIContext) async throws -> Response {
        try await measured("revocation", route: "/v1/revoke") {
            let (_, presented) = try await presentedRecord(context)
            let body = try await decode(RevokeRequest.self, from: request, context: context)
            let reasonText = body.reason ?? "unspecified"
            guard let reason = RevocationReason(rawValue: reasonText) else {
                throw Problem(.badRequest, code: "unknown-reason", title: "Bad Request", detail: "unknown reason '\(reasonText.prefix(40))': expected one of \(RevocationReason.choices)")
            }
            let record = try await authority.revoke(serial: body.serial, reason: reason, requestedBy: presented)
            // Push the event to subscribers now rather than at the watcher's next poll (subscribers drop duplicates by
            // sequence), then bring the CRL up to date.
            await AuthorityServer.pushRecentRevocations(authority: authority, feed: feed)
            _ = try? await publisher.publish()
            return try json(CertificateRecordView(record, now: .now))
        }
    }

    func listCertificates(_ request: Request, _ context: APIContext) async throws -> Response {
        _ = try await requireAdmin(context)
        let query = request.uri.queryParameters
        let now = Date.now
        var filter = CertificateFilter(now: now, limit: 100)
        if let within = query["expiring_within"] {
            filter.expiringBefore = now.addingTimeInterval(try ValidityDuration(parsing: String(within)).timeInterval)
        }
        if let identity = query["identity"] { filter.identity = String(identity) }
        if let status = query["status"] {
            guard let parsed = CertificateFilter.StatusFilter(rawValue: String(status)) else {
                throw Problem(.badRequest, code: "bad-filter", title: "Bad Request", detail: "status must be one of \(CertificateFilter.StatusFilter.choices)")
            }
            filter.status = parsed
        }
        if let limit = query["limit"] {
            guard let value = Int(String(limit)), (1...1000).contains(value) else {
                throw Problem(.badRequest, code: "bad-filter", title: "Bad Request", detail: "limit must be 1 to 1000")
            }
            filter.limit = value
        }
        if let offset = query["offset"] {
            guard let value = Int(String(offset)), value >= 0 else {
                throw Problem(.badRequest, code: "bad-filter", title: "Bad Request", detail: "offset must be 0 or more")
            }
            filter.offset = value
        }
        let records = try await authority.store.certificates(filter)
        struct Page: Encodable {
            var items: [CertificateRecordView]
            var next_offset: Int?
        }
        return try json(Page(items: records.map { CertificateRecordView($0, now: now) },
                             next_offset: records.count == filter.limit ? filter.offset + filter.limit : nil))
    }

    func showCertificate(_ request: Request, _ context: APIContext) async throws -> Response {
        let (_, presented) = try await presentedRecord(context)
        let serial = Authority.normalizeSerial(context.parameters.get("serial") ?? "")
        guard presented.profile == CertificateProfile.admin.rawValue || presented.serial == serial else {
            throw AuthorityError(.certificateRefused, "a client certificate may only read its own record")
        }
        guard let record = try await authority.store.certificate(serial: serial) else {
            throw AuthorityError(.notFound, "no certificate with serial \(serial.prefix(64)) in the inventory")
        }
        return try json(CertificateRecordView(record, now: .now, pem: PEMCodec.encode(record.der, label: "CERTIFICATE")))
    }

    /// Readiness for load balancers: 200 only while the inventory accepts writes (a probe write through the same
    /// queue as issuance, at most once a second); 503 `not-ready` with the reason otherwise (a full disk, a database
    /// that stopped answering), so the node is taken out while it could not issue.
    func readiness() async throws -> Response {
        if let failure = await readinessProbe.check(store: authority.store) {
            throw Problem(.serviceUnavailable, code: "not-ready", title: "Service Unavailable", detail: "the inventory does not accept writes: \(failure)")
        }
        if let failure = await readinessProbe.checkSigning(authority: authority) {
            throw Problem(
                .serviceUnavailable, code: "signing-key-unavailable", title: "Service Unavailable",
                detail: "a CA key in a PKCS#11 token cannot sign: \(failure.reason)", members: ["key_error": failure.code.name]
            )
        }
        return try json(["status": "ready"])
    }

    func health() async throws -> Response {
        do {
            _ = try await authority.store.countCertificates()
            return try json(["status": "ok", "issuing_ca_not_after": AuditChain.format(authority.ca.certificate.notValidAfter)])
        } catch {
            return try json(["status": "unavailable", "reason": "inventory: \(error)"], status: .serviceUnavailable)
        }
    }
}

/// The readiness check's probe write, shared by concurrent checks and cached for a second.
actor ReadinessProbe {
    private var last: (at: ContinuousClock.Instant, failure: String?)?

    /// nil when a write succeeded within the last second, else why it failed.
    func check(store: Store) async -> String? {
        let now = ContinuousClock.now
        if let last, now - last.at < .seconds(1) { return last.failure }
        var failure: String?
        do {
            try await store.setMetadata(["readiness_probe": AuditChain.format(.now)], audit: nil)
        } catch let error as StoreError {
            failure = error.reason
        } catch {
            failure = "\(error)"
        }
        last = (ContinuousClock.now, failure)
        return failure
    }

    private var lastSigning: (at: ContinuousClock.Instant, failure: PKCS11Error?)?

    /// nil when every token-held CA key signed a probe within the last second, else the first failure.
    func checkSigning(authority: Authority) -> PKCS11Error? {
        let now = ContinuousClock.now
        if let lastSigning, now - lastSigning.at < .seconds(1) { return lastSigning.failure }
        let failure = authority.probeSigningKeys()
        lastSigning = (ContinuousClock.now, failure)
        return failure
    }
}
