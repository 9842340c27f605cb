import Foundation
import Logging
import NIOCore
import NIOEmbedded
import NIOHTTP1
import MutualPKI
@testable import MutualProxy
import Testing
import TestSupport
import X509

@Suite("Proxy identity policy and identity forwarding (pure logic)")
struct PolicyTests {
    let ca: IssuingCA

    init() throws { ca = try TestPKI.issuingCA() }

    func peer(_ request: IssuanceRequest) throws -> VerifiedPeer {
        let leaf = try ca.issue(request, now: TestPKI.now)
        return try VerifiedPeer(validatedChain: [leaf, ca.certificate])
    }

    func workload(_ id: String) throws -> VerifiedPeer {
        try peer(.init(profile: .workload, publicKey: try KeyType.p256.generate().publicKey, uris: [id]))
    }

    @Test("principals: SPIFFE exact and /* on a segment boundary, URI, DNS, and subject only when asked")
    func principals() throws {
        let api = try workload("spiffe://example.org/ns/web/sa/api")
        let webAdmin = try workload("spiffe://example.org/ns/web-admin/sa/x")
        #expect(try Principal(parsing: "spiffe://example.org/ns/web/sa/api").matches(api))
        #expect(try Principal(parsing: "spiffe://example.org/ns/web/*").matches(api))
        #expect(!(try Principal(parsing: "spiffe://example.org/ns/web/*").matches(webAdmin)), "prefix stops at a segment")
        #expect(!(try Principal(parsing: "spiffe://example.org/ns/web/sa/api/*").matches(api)), "a prefix does not match itself")

        let server = try peer(.init(profile: .server, publicKey: try KeyType.p256.generate().publicKey, commonName: "db.example.org",
                                    dnsNames: ["db.example.org"]))
        #expect(try Principal(parsing: "dns:db.example.org").matches(server))
        #expect(try Principal(parsing: "dns:*.example.org").matches(server))
        #expect(!(try Principal(parsing: "dns:*.org").matches(server)), "wildcard covers exactly one label")

        // A client with only a CN: SAN patterns never fall back to it; cn: must be asked for.
        let alice = try peer(.init(profile: .client, publicKey: try KeyType.p256.generate().publicKey, commonName: "alice"))
        #expect(!(try Principal(parsing: "dns:alice").matches(alice)))
        #expect(try Principal(parsing: "cn:alice").matches(alice))
        #expect(alice.spiffeID == nil)

        for bad in ["", "alice", "spiffe://example.org/*/x", "spiffe://Example.org/x", "dns:bad_name", "dns:", "uri:", "cn:", "http://x"] {
            #expect(throws: PKIError.self, "\(bad)") { try Principal(parsing: bad) }
        }
    }

    @Test("routes: first match decides, default deny, 401 versus 403 on optional-certificate routes")
    func routes() throws {
        let policy = RoutePolicy(routes: [
            .init(pathPrefix: "/healthz", allow: [], allowWithoutCertificate: true),
            .init(pathPrefix: "/admin", methods: ["POST"], allow: [try Principal(parsing: "spiffe://example.org/ns/ops/*")]),
            .init(pathPrefix: "/api", allow: [try Principal(parsing: "spiffe://example.org/ns/web/*")]),
        ])
        let web = try workload("spiffe://example.org/ns/web/sa/frontend")
        let ops = try workload("spiffe://example.org/ns/ops/sa/oncall")
        #expect(policy.decide(method: "GET", path: "/healthz", peer: nil) == .allow(route: "/healthz", by: "no certificate required"))
        #expect(policy.decide(method: "GET", path: "/api/orders", peer: web) == .allow(route: "/api", by: "spiffe://example.org/ns/web/*"))
        guard case .unauthenticated = policy.decide(method: "GET", path: "/api/orders", peer: nil) else { Issue.record("401 expected"); return }
        guard case .deny(let reason) = policy.decide(method: "GET", path: "/api/orders", peer: ops) else { Issue.record("403 expected"); return }
        #expect(reason.contains("spiffe://example.org/ns/ops/sa/oncall"))
        guard case .deny = policy.decide(method: "GET", path: "/admin", peer: ops) else { Issue.record("method not allowed: deny"); return }
        #expect(policy.decide(method: "post", path: "/admin/restart", peer: ops) == .allow(route: "/admin", by: "spiffe://example.org/ns/ops/*"))
        guard case .deny(let none) = policy.decide(method: "GET", path: "/apix", peer: web) else { Issue.record("no route: deny"); return }
        #expect(none.contains("default deny"), "/apix is not under /api")
    }

    @Test("forwarded identity: Envoy XFCC fields and RFC 9440 byte sequences; client copies are stripped")
    func forwarding() throws {
        let web = try workload("spiffe://example.org/ns/web/sa/frontend")
        let xfcc = try ForwardedIdentity.xfcc(web, by: "spiffe://example.org/ns/proxy")
        #expect(xfcc.hasPrefix("By=spiffe://example.org/ns/proxy;Hash=\(web.fingerprint);Cert=\"-----BEGIN%20CERTIFICATE-----%0A"))
        #expect(xfcc.contains(";Chain=\""))
        #expect(xfcc.contains(";Subject=\"\""), "empty subject of an SVID, quoted")
        #expect(xfcc.hasSuffix(";URI=spiffe://example.org/ns/web/sa/frontend"))
        let clientCert = try ForwardedIdentity.clientCert(web)
        #expect(clientCert.hasPrefix(":") && clientCert.hasSuffix(":"))
        let der = try #require(Data(base64Encoded: String(clientCert.dropFirst().dropLast())))
        #expect(Array(der) == (try web.leaf.der))
        #expect(try ForwardedIdentity.clientCertChain(web)?.split(separator: ",").count == 1)
        #expect(ForwardedIdentity.strippedHeaders == ["x-forwarded-client-cert", "client-cert", "client-cert-chain", "x-client-identity"])

        // A subject with quotes is escaped inside the quoted field.
        let tricky = try peer(.init(profile: .client, publicKey: try KeyType.p256.generate().publicKey, commonName: "a\"b"))
        let escaped = tricky.leaf.subject.description.replacingOccurrences(of: "\\", with: "\\\\").replacingOccurrences(of: "\"", with: "\\\"")
        #expect(try ForwardedIdentity.xfcc(tricky, by: nil).hasSuffix("Subject=\"\(escaped)\""))
        #expect(escaped.contains("\\\""), "the quote inside the subject is escaped")
    }

    @Test("x-client-identity: the name the route's rule matched, in allow-list notation; open routes give the SPIFFE ID or first SAN")
    func identityHeaderValue() throws {
        let policy = RoutePolicy(routes: [
            .init(pathPrefix: "/healthz", allow: [], allowWithoutCertificate: true),
            .init(pathPrefix: "/partner", allow: [try Principal(parsing: "dns:*.partner.example"), try Principal(parsing: "cn:legacy")]),
            .init(pathPrefix: "/", allow: [try Principal(parsing: "spiffe://example.org/ns/web/*")]),
        ])
        let web = try workload("spiffe://example.org/ns/web/sa/frontend")
        #expect(policy.identity(of: web, route: "/") == "spiffe://example.org/ns/web/sa/frontend")
        #expect(policy.identity(of: web, route: "/healthz") == "spiffe://example.org/ns/web/sa/frontend")
        let partner = try peer(.init(profile: .server, publicKey: try KeyType.p256.generate().publicKey, commonName: "www.example.org",
                                     dnsNames: ["www.example.org", "api.partner.example"]))
        #expect(policy.identity(of: partner, route: "/partner") == "dns:api.partner.example", "the SAN the rule matched, not the first")
        #expect(policy.identity(of: partner, route: "/healthz") == "dns:www.example.org")
        let legacy = try peer(.init(profile: .client, publicKey: try KeyType.p256.generate().publicKey, commonName: "legacy"))
        #expect(policy.identity(of: legacy, route: "/partner") == "cn:legacy")
        #expect(try Principal(parsing: "dns:*.partner.example").matchedName(web) == nil)
    }
}

/// A front with a fixed policy and no upstream reached: enough to see which identity a request is judged as.
final class PolicyOnlyFront: HTTPFront {
    let name = "test"
    let policy: RoutePolicy
    let upstream: UpstreamAddress
    let forwardXFCC = false
    let forwardRFC9440 = false
    let forwardIdentity = false
    let proxyIdentity: String? = nil
    let addsForwardingHeaders = false
    let upstreamTLS: OutboundState? = nil
    let limits = ProxyLimits()
    let stripMatcher = HeaderNames.Matcher(patterns: ForwardedIdentity.defaultStrippedHeaders)

    init(policy: RoutePolicy) throws {
        self.policy = policy
        self.upstream = try UpstreamAddress(parsing: "http://127.0.0.1:9", what: "upstream")
    }

    func identityHeaders(for peer: VerifiedPeer) -> Result<[(String, String)], ForwardedIdentity.Unrepresentable> { .success([]) }
}

@Suite("The verified client reaches the HTTP exchange only as a value the verifier made (in memory)")
struct VerifiedPeerDeliveryTests {
    func status(peerEvent: VerifiedPeer??) throws -> UInt {
        let runtime = ProxyRuntime(
            metrics: ProxyMetrics(), accessLog: try AccessLog(destination: "off"), revocation: RevocationState(stalePolicy: .deny),
            logger: Logger(label: "test", factory: { _ in SwiftLogNoOpLogHandler() })
        )
        let front = try PolicyOnlyFront(policy: RoutePolicy(routes: [.init(pathPrefix: "/", allow: [try Principal(parsing: "spiffe://example.org/allowed")])]))
        let channel = EmbeddedChannel(handler: HTTPProxyHandler(state: front, peer: nil, runtime: runtime, pools: UpstreamPools()))
        if let event = peerEvent { channel.pipeline.fireUserInboundEventTriggered(PeerVerifiedEvent(peer: event, resumed: false)) }
        try channel.writeInbound(HTTPServerRequestPart.head(.init(version: .http1_1, method: .GET, uri: "/x", headers: ["host": "a"])))
        try channel.writeInbound(HTTPServerRequestPart.end(nil))
        // The HTTP/1.1 front writes its answer as bytes: the status line's code.
        guard let answer = try channel.readOutbound(as: ByteBuffer.self) else { return 0 }
        _ = try? channel.finish()
        return UInt(String(buffer: answer).split(separator: " ").dropFirst().first ?? "") ?? 0
    }

    @Test("no event: unauthenticated (401); an event with a verified peer the route does not allow: 403; nil peer: 401")
    func delivery() throws {
        let ca = try TestPKI.issuingCA()
        let other = try ca.issue(.init(profile: .workload, publicKey: try KeyType.p256.generate().publicKey, uris: ["spiffe://example.org/other"]), now: TestPKI.now)
        #expect(try status(peerEvent: nil) == 401)
        #expect(try status(peerEvent: .some(try VerifiedPeer(validatedChain: [other, ca.certificate]))) == 403)
        #expect(try status(peerEvent: .some(nil)) == 401)
    }
}
