import Foundation
import Hummingbird
import MutualAuthority
import MutualPKI
import MutualStore
import NIOCore
import HTTPTypes

/// CRL, OCSP and revocation-event endpoints. The CRL and OCSP routes are mounted on both the HTTPS and the plain-HTTP
/// listener (relying parties fetch signed objects over plain HTTP); the event stream only on HTTPS.
struct RevocationRoutes: Sendable {
    let authority: Authority
    let publisher: RevocationPublisher
    let ocsp: OCSPResponder
    let feed: RevocationFeed
    let metrics: ServerMetrics

    func registerSignedObjects<Context: RequestContext>(on router: Router<Context>) {
        router.get("/crl") { _, _ in try await self.crl(pem: false) }
        router.get("/crl.pem") { _, _ in try await self.crl(pem: true) }
        // The CRL of issuing CA generation N (`/crl/g2`, `/crl/g2.pem`): what certificates of a rotated CA carry.
        router.get("/crl/:generation") { _, context in
            let name = context.parameters.get("generation") ?? ""
            let pem = name.hasSuffix(".pem")
            let digits = name.dropFirst(name.hasPrefix("g") ? 1 : 0).prefix { $0.isNumber }
            guard name.hasPrefix("g"), digits.count <= 6, let generation = Int(digits), generation >= 1,
                  "g\(generation)" + (pem ? ".pem" : "") == name
            else {
                throw AuthorityError(.notFound, "no CRL named '\(name.prefix(40))': issuing CA generations are named g1, g2, …")
            }
            return try await self.crl(generation: generation, pem: pem)
        }
        router.post("/ocsp") { request, _ in try await self.ocspPost(request) }
        router.get("/ocsp/**") { request, _ in await self.ocspGet(request) }
        router.get("/roots.pem") { _, _ in
            Response(status: .ok, headers: [.contentType: "application/x-pem-file"],
                     body: .init(byteBuffer: ByteBuffer(string: try PEMBundle.pem(self.authority.trustedRoots))))
        }
        // The post-quantum hierarchy: its CRL (signed with ML-DSA) and the migration trust bundle, the classical root
        // then the ML-DSA one. `/roots.pem` stays classical: clients that cannot parse ML-DSA keep working.
        router.get("/pq/crl") { _, _ in try await self.pqCRL(pem: false) }
        router.get("/pq/crl.pem") { _, _ in try await self.pqCRL(pem: true) }
        router.get("/pq/roots.pem") { _, _ in
            guard let pq = self.authority.pqCA else { throw Self.noPQ }
            return Response(status: .ok, headers: [.contentType: "application/x-pem-file"],
                            body: .init(byteBuffer: ByteBuffer(string: try PEMBundle.pem([self.authority.ca.root]) + pq.root.pem)))
        }
    }

    static let noPQ = AuthorityError(.notFound, "this CA has no ML-DSA hierarchy (`mutual pq init` adds one)")

    func pqCRL(pem: Bool) async throws -> Response {
        guard let der = try await publisher.currentPQ() else { throw Self.noPQ }
        return timeNumberedCRL(der, pem: pem)
    }

    /// A CRL numbered by time (ML-DSA, a replaced issuing CA), DER or PEM, cacheable for a quarter of its validity.
    func timeNumberedCRL(_ der: [UInt8], pem: Bool) -> Response {
        var headers: HTTPFields = [.cacheControl: "public, max-age=\(max(0, Int(publisher.validity.timeInterval / 4)))"]
        if pem {
            headers[.contentType] = "application/x-pem-file"
            return Response(status: .ok, headers: headers, body: .init(byteBuffer: ByteBuffer(string: RevocationListBuilder.pem(der))))
        }
        headers[.contentType] = "application/pkix-crl"
        return Response(status: .ok, headers: headers, body: .init(byteBuffer: ByteBuffer(bytes: der)))
    }

    /// `GET /crls.pem`: the root's CRL followed by the issuing CA's current CRL — the file nginx's `ssl_crl` wants.
    func registerChainCRLs(on router: Router<APIContext>) {
        router.get("/crls.pem") { _, _ in
            // Every trusted root's CRL, then every issuing CA's (during a rotation: the old and the new one).
            let roots = self.authority.rootCRLPaths.map { (try? String(contentsOfFile: $0, encoding: .utf8)) ?? "" }.joined()
            let issuers = try await self.publisher.allIssuerCRLs().map(RevocationListBuilder.pem).joined()
            return Response(status: .ok, headers: [.contentType: "application/x-pem-file", .cacheControl: "no-store"],
                            body: .init(byteBuffer: ByteBuffer(string: roots + issuers)))
        }
    }

    func registerEvents(on router: Router<APIContext>) {
        router.get("/v1/revocations") { request, _ in try await self.catchUp(request) }
        router.get("/v1/revocations/events") { request, _ in await self.events(request) }
    }

    func crl(generation: Int, pem: Bool) async throws -> Response {
        if generation == authority.activeGeneration { return try await crl(pem: pem, current: true) }
        guard let der = try await publisher.crl(generation: generation) else {
            throw AuthorityError(.notFound, "issuing CA g\(generation) is not one of this authority's current CAs")
        }
        return timeNumberedCRL(der, pem: pem)
    }

    func crl(pem: Bool, current: Bool = false) async throws -> Response {
        if !current, case let generation = publisher.plainCRLGeneration(), generation != authority.activeGeneration {
            return try await crl(generation: generation, pem: pem)
        }
        let crl = try await publisher.current()
        let maxAge = max(0, Int(crl.nextUpdate.timeIntervalSinceNow / 2))
        var headers: HTTPFields = [.cacheControl: "public, max-age=\(maxAge)"]
        headers[.lastModified] = Self.httpDate(crl.thisUpdate)
        if pem {
            headers[.contentType] = "application/x-pem-file"
            return Response(status: .ok, headers: headers, body: .init(byteBuffer: ByteBuffer(string: RevocationListBuilder.pem(crl.der))))
        }
        headers[.contentType] = "application/pkix-crl"
        return Response(status: .ok, headers: headers, body: .init(byteBuffer: ByteBuffer(bytes: crl.der)))
    }

    func ocspPost(_ request: Request) async throws -> Response {
        let contentType = request.headers[.contentType]?.lowercased() ?? ""
        guard contentType.hasPrefix("application/ocsp-request") else {
            return ocspResponse(OCSP.errorResponse(.malformedRequest), maxAge: 0, outcome: "malformedRequest")
        }
        let body: ByteBuffer
        do {
            body = try await request.body.collect(upTo: OCSP.maximumRequestSize)
        } catch {
            return ocspResponse(OCSP.errorResponse(.malformedRequest), maxAge: 0, outcome: "malformedRequest")
        }
        let answer = await ocsp.respond(to: Array(body.readableBytesView))
        return ocspResponse(answer.der, maxAge: answer.maxAge, outcome: answer.outcome)
    }

    /// RFC 6960 A.1: GET {url}/{url-encoding of base-64 encoding of the DER request}.
    func ocspGet(_ request: Request) async -> Response {
        let path = request.uri.path
        guard let range = path.range(of: "/ocsp/") else {
            return ocspResponse(OCSP.errorResponse(.malformedRequest), maxAge: 0, outcome: "malformedRequest")
        }
        let encoded = String(path[range.upperBound...])
        guard encoded.count <= OCSP.maximumRequestSize * 2,
            let decoded = encoded.removingPercentEncoding,
            let der = Data(base64Encoded: decoded) ?? Data(base64Encoded: Self.padded(decoded.replacingOccurrences(of: "-", with: "+").replacingOccurrences(of: "_", with: "/")))
        else {
            return ocspResponse(OCSP.errorResponse(.malformedRequest), maxAge: 0, outcome: "malformedRequest")
        }
        let answer = await ocsp.respond(to: Array(der))
        return ocspResponse(answer.der, maxAge: answer.maxAge, outcome: answer.outcome)
    }

    static func padded(_ s: String) -> String {
        let remainder = s.count % 4
        return remainder == 0 ? s : s + String(repeating: "=", count: 4 - remainder)
    }

    func ocspResponse(_ der: [UInt8], maxAge: Int, outcome: String) -> Response {
        metrics.count("ocsp", outcome: outcome == "malformedRequest" || outcome == "unauthorized" || outcome == "internalError" ? "refused" : "ok", reason: outcome)
        return Response(
            status: .ok,
            headers: [.contentType: "application/ocsp-response",
                      .cacheControl: maxAge > 0 ? "public, max-age=\(maxAge), no-transform, must-revalidate" : "no-cache, no-store"],
            body: .init(byteBuffer: ByteBuffer(bytes: der))
        )
    }

    struct EventView: Encodable {
        var sequence: Int64
        var serial: String
        var reason: String
        var revoked_at: String

        init(_ event: RevocationEvent) {
            sequence = event.sequence
            serial = event.serial
            reason = event.reason
            revoked_at = AuditChain.format(event.revokedAt)
        }
    }

    /// `GET /v1/revocations?since=CRLNUMBER`: revocations not yet on that CRL (all of them without `since`).
    func catchUp(_ request: Request) async throws -> Response {
        var after: Int64 = 0
        if let since = request.uri.queryParameters["since"] {
            guard let number = Int64(String(since)), number >= 0 else {
                throw Problem(.badRequest, code: "bad-filter", title: "Bad Request", detail: "since must be a CRL number")
            }
            if number > 0 {
                guard let crl = try await authority.store.crl(number: number) else {
                    throw Problem(.notFound, code: "not-found", title: "Not Found", detail: "no CRL number \(number)")
                }
                after = crl.lastRevocation
            }
        }
        let events = try await authority.store.revocations(after: after)
        let latest = try await publisher.current()
        struct Body: Encodable {
            var crl_number: Int64
            var revocations: [EventView]
        }
        let encoder = JSONEncoder()
        encoder.outputFormatting = [.sortedKeys, .withoutEscapingSlashes]
        return Response(status: .ok, headers: [.contentType: "application/json", .cacheControl: "no-store"],
                        body: .init(byteBuffer: ByteBuffer(bytes: try encoder.encode(Body(crl_number: latest.number, revocations: events.map(EventView.init))))))
    }

    /// `GET /v1/revocations/events`: Server-Sent Events, one `revocation` event per revocation, `id` = log sequence,
    /// resumable with `Last-Event-ID` (or `?after=`). Missed events are replayed from the log before live ones.
    func events(_ request: Request) async -> Response {
        var after: Int64 = 0
        if let header = request.headers[HTTPField.Name("Last-Event-ID")!], let value = Int64(header.trimmingCharacters(in: .whitespaces)) {
            after = value
        } else if let query = request.uri.queryParameters["after"], let value = Int64(String(query)) {
            after = value
        }
        let feed = self.feed
        let store = authority.store
        let start = after
        let body = ResponseBody { writer in
            let (id, stream) = await feed.subscribe()
            var last = start
            do {
                try await writer.write(ByteBuffer(string: "retry: 1000\n: mutual revocation events\n\n"))
                for event in try await store.revocations(after: last) {
                    try await writer.write(Self.sse(event))
                    last = event.sequence
                }
                for await item in stream {
                    switch item {
                    case .event(let event) where event.sequence > last:
                        try await writer.write(Self.sse(event))
                        last = event.sequence
                    case .event:
                        continue
                    case .heartbeat:
                        try await writer.write(ByteBuffer(string: ": keep-alive\n\n"))
                    }
                }
            } catch {}
            await feed.unsubscribe(id)
            try? await writer.finish(nil)
        }
        return Response(status: .ok, headers: [.contentType: "text/event-stream", .cacheControl: "no-store"], body: body)
    }

    static func sse(_ event: RevocationEvent) -> ByteBuffer {
        let encoder = JSONEncoder()
        encoder.outputFormatting = [.sortedKeys, .withoutEscapingSlashes]
        let json = (try? encoder.encode(EventView(event))).map { String(decoding: $0, as: UTF8.self) } ?? "{}"
        return ByteBuffer(string: "id: \(event.sequence)\nevent: revocation\ndata: \(json)\n\n")
    }

    static func httpDate(_ date: Date) -> String {
        let formatter = DateFormatter()
        formatter.locale = Locale(identifier: "en_US_POSIX")
        formatter.timeZone = TimeZone(identifier: "GMT")
        formatter.dateFormat = "EEE, dd MMM yyyy HH:mm:ss 'GMT'"
        return formatter.string(from: date)
    }
}
