import Foundation
import Logging
import MutualPKI
@testable import MutualProxy
import NIOCore
import NIOEmbedded
import NIOHTTP1
import Synchronization
import Testing
import TestSupport
import X509

/// Issue #13, in memory: each class of bending the gateway, with the fix's behaviour pinned per case.
@Suite("Gateway hardening: spelling, headers, identity, logs (in memory)")
struct GatewayHardeningTests {
    static let policy = RoutePolicy(routes: [
        .init(pathPrefix: "/healthz", allow: [], allowWithoutCertificate: true),
        .init(pathPrefix: "/admin", allow: [try! Principal(parsing: "spiffe://example.org/ns/ops/*")]),
        .init(pathPrefix: "/", allow: [try! Principal(parsing: "spiffe://example.org/ns/web/*")]),
    ])

    static func peer(uris: [String], notAfter: Date = TestPKI.now.addingTimeInterval(86_400), subject: String = "client") throws -> VerifiedPeer {
        let key = try KeyType.p256.generate()
        var extensions = Certificate.Extensions()
        try extensions.append(Certificate.Extension(ExtendedKeyUsage([.clientAuth]), critical: false))
        try extensions.append(Certificate.Extension(SubjectAlternativeNames(uris.map { .uniformResourceIdentifier($0) }), critical: false))
        let leaf = try TestPKI.certificate(subject: subject, issuer: nil, issuerKey: key, publicKey: key.publicKey, notAfter: notAfter, extensions: extensions)
        return try VerifiedPeer(validatedChain: [leaf])
    }

    /// What a request to `target` by `peer` comes to: the refusal code, or the route decision on the normalized form.
    static func outcome(_ target: String, peer: VerifiedPeer?) -> String {
        switch RequestTarget.parse(target) {
        case .failure(let refusal): return "refused:\(refusal.code)"
        case .success(let normalized):
            switch policy.decide(method: "GET", path: normalized.routingKey, peer: peer) {
            case .allow(let route, _): return "allow:\(route)"
            case .deny: return "deny"
            case .unauthenticated: return "unauthenticated"
            }
        }
    }

    @Test("every spelling of a denied prefix that nginx, Python, Express or Spring read as it is denied or refused")
    func deniedPrefixUnderEverySpelling() throws {
        let web = try Self.peer(uris: ["spiffe://example.org/ns/web/sa/app"])
        #expect(Self.outcome("/admin", peer: web) == "deny")
        #expect(Self.outcome("/api/items", peer: web) == "allow:/")
        // The issue's examples, then the families they stand for.
        let spellings = [
            "/%61dmin", "/ADMIN", "/admin;x", "/admin%00", "/%2561dmin", "/Admin/users", "/%41%44%4d%49%4e", "/admin;jsessionid=1/users",
            "/admin/", "/admin%2F", "/x/..;/admin", "/x/%2e%2e/admin", "/x/.%2e/admin", "/;/admin", "/admin%23", "/admin%3Fx", "/admin%3bx", "/admin#frag",
            "/admin\\", "/%5cadmin", "/ad%6Din", "/a%64min?x=1", "/admin%0a", "/admin%7f", "/%c0%afadmin", "/ädmin", "/admin%",
            "/admin%zz", "//admin", "/./admin", "/admin/.",
        ]
        for spelling in spellings {
            let result = Self.outcome(spelling, peer: web)
            #expect(result == "deny" || result.hasPrefix("refused:") || result == "allow:/" && !spelling.lowercased().contains("admin"),
                    "\(spelling) → \(result)")
            #expect(result != "allow:/", "\(spelling) reached the backend under the catch-all route")
        }
        // Generated: every letter of "admin" in either case or percent-encoded (either hex case), with or without a
        // ;parameter and a trailing path: never allowed for a web identity.
        var generated = 0
        for mask in 0..<(1 << 5) {
            for encodeMask in [0, 0b10101, 0b01010, 0b11111] {
                var path = "/"
                for (index, character) in "admin".enumerated() {
                    let letter = mask & (1 << index) != 0 ? character.uppercased() : String(character)
                    if encodeMask & (1 << index) != 0 {
                        let hex = String(letter.utf8.first!, radix: 16)
                        path += "%" + (index % 2 == 0 ? hex.uppercased() : hex)
                    } else {
                        path += letter
                    }
                }
                for suffix in ["", "/", ";x", ";x/y", "/y?z=1"] {
                    #expect(Self.outcome(path + suffix, peer: web) == "deny", "\(path + suffix)")
                    generated += 1
                }
            }
        }
        #expect(generated == 32 * 4 * 5)
        // The form forwarded is the normalized one: a decoding backend sees exactly what was routed.
        let target = try RequestTarget.parse("/%61dmin%2a/%7euser;v=1?q=%41").get()
        #expect(target.path == "/admin%2A/~user;v=1" && target.routingKey == "/admin%2a/~user" && target.query == "q=%41")
        #expect(target.forwarded == "/admin%2A/~user;v=1?q=%41")
    }

    @Test("refusal codes of request targets", arguments: [
        ("/a%2Fb", "encoded_separator"), ("/a%23", "encoded_delimiter"), ("/a%3f", "encoded_delimiter"), ("/a%3B", "encoded_delimiter"), ("/a%5Cb", "encoded_separator"), ("/a%25b", "double_encoding"), ("/a%00", "encoded_control"),
        ("/a%0D%0A", "encoded_control"), ("/a%G1", "bad_percent_encoding"), ("/a%", "bad_percent_encoding"), ("/a%C3", "invalid_utf8"),
        ("/a#b", "fragment"), ("/a\\b", "backslash"), ("/a b", "control_character"), ("/ä", "non_ascii"), ("*", "not_origin_form"),
        ("http://evil/admin", "not_origin_form"), ("/a/../b", "dot_segment"), ("/a/..;x/b", "dot_segment"), ("/a//b", "empty_segment"),
        ("/a/;x/b", "empty_segment"),
    ])
    func targetRefusals(target: String, code: String) {
        guard case .failure(let refusal) = RequestTarget.parse(target) else {
            Issue.record("\(target) accepted")
            return
        }
        #expect(refusal.code == code)
        #expect(!refusal.reason.isEmpty)
    }

    @Test("request heads: Host exactly once, no CONNECT, header limits answer 431, an expired certificate closes the connection")
    func requestHeadChecks() throws {
        let web = try Self.peer(uris: ["spiffe://example.org/ns/web/sa/app"], notAfter: TestPKI.now.addingTimeInterval(60))
        var limits = ProxyLimits()
        limits.maxHeaderCount = 10
        limits.maxHeaderBytes = 200
        func check(_ head: HTTPRequestHead, now: Date = TestPKI.now) -> Refusal? {
            if case .failure(let refusal) = RequestChecks.check(head: head, peer: web, limits: limits, now: now) { return refusal }
            return nil
        }
        func head(_ headers: [(String, String)], method: HTTPMethod = .GET, uri: String = "/x", version: HTTPVersion = .http1_1) -> HTTPRequestHead {
            HTTPRequestHead(version: version, method: method, uri: uri, headers: HTTPHeaders(headers))
        }
        #expect(check(head([("host", "a")])) == nil)
        #expect(check(head([])).map(\.code) == "missing_host")
        #expect(check(head([]), now: TestPKI.now).map(\.closeConnection) == true)
        #expect(check(head([], version: .http1_0)) == nil, "HTTP/1.0 may omit Host")
        #expect(check(head([("host", "a"), ("Host", "b")])).map(\.code) == "duplicate_host")
        #expect(check(head([("host", "a"), ("host", "a")], version: HTTPVersion(major: 2, minor: 0))).map(\.code) == "duplicate_host")
        #expect(check(head([("host", "a b")])).map(\.code) == "invalid_host")
        #expect(check(head([("host", "a")], method: .CONNECT, uri: "a:443")).map(\.status) == .methodNotAllowed)
        #expect(check(head([("host", "a")] + (0..<10).map { ("x-\($0)", "v") })).map(\.status) == .requestHeaderFieldsTooLarge)
        #expect(check(head([("host", "a"), ("x", String(repeating: "v", count: 200))])).map(\.code) == "headers_too_large")
        let expired = check(head([("host", "a")]), now: TestPKI.now.addingTimeInterval(61))
        #expect(expired?.code == "certificate_expired" && expired?.closeConnection == true && expired?.status == .unauthorized)
    }

    /// A strict parser of Envoy's XFCC grammar (elements split on unquoted `,`, pairs on unquoted `;`, key=value,
    /// values optionally quoted with `\"`/`\\` escapes). Throws on anything else.
    static func parseXFCC(_ text: String) throws -> [[(String, String)]] {
        struct Malformed: Error {}
        var elements: [[(String, String)]] = [[]]
        var key = "", value = "", inKey = true, quoted = false, wasQuoted = false
        var chars = Array(text.unicodeScalars)[...]
        func endPair() throws {
            guard !key.isEmpty, !inKey else { throw Malformed() }
            elements[elements.count - 1].append((key, value))
            key = ""; value = ""; inKey = true; wasQuoted = false
        }
        while let c = chars.popFirst() {
            if quoted {
                if c == "\\" { guard let next = chars.popFirst() else { throw Malformed() }; value.unicodeScalars.append(next) }
                else if c == "\"" { quoted = false; wasQuoted = true }
                else { value.unicodeScalars.append(c) }
                continue
            }
            switch c {
            case "=" where inKey: inKey = false
            case "\"" where !inKey && value.isEmpty && !wasQuoted: quoted = true
            case ";": try endPair()
            case ",": try endPair(); elements.append([])
            default:
                if wasQuoted || c == "\"" || c == "=" || c == "\\" { throw Malformed() }
                if inKey { key.unicodeScalars.append(c) } else { value.unicodeScalars.append(c) }
            }
        }
        guard !quoted else { throw Malformed() }
        try endPair()
        return elements
    }

    @Test("hostile SAN values stay inside one XFCC element; values with control characters are refused")
    func xfccQuoting() throws {
        let hostile = [
            "spiffe://example.org/a,By=spiffe://evil;URI=spiffe://example.org/ns/ops/sa/admin",
            "spiffe://example.org/a;Hash=00",
            "spiffe://example.org/a\"b\\c=d e",
        ]
        for uri in hostile {
            let peer = try Self.peer(uris: [uri], subject: "x\",By=evil")
            let xfcc = try ForwardedIdentity.xfcc(peer, by: "spiffe://example.org/ns/proxy")
            let elements = try Self.parseXFCC(xfcc)
            #expect(elements.count == 1, "\(xfcc)")
            let pairs = elements[0]
            #expect(pairs.map(\.0) == ["By", "Hash", "Cert", "Chain", "Subject", "URI"])
            #expect(pairs.first { $0.0 == "URI" }?.1 == uri)
            #expect(pairs.first { $0.0 == "By" }?.1 == "spiffe://example.org/ns/proxy")
        }
        for bad in ["spiffe://example.org/a\r\nX-Evil: 1", "spiffe://example.org/a\u{0}"] {
            let peer = try Self.peer(uris: [bad])
            #expect(throws: ForwardedIdentity.Unrepresentable.self) { try ForwardedIdentity.xfcc(peer, by: nil) }
            #expect(throws: ForwardedIdentity.Unrepresentable.self) { try ForwardedIdentity.headers(for: peer, by: nil, xfcc: true, rfc9440: true) }
        }
        // A plain SPIFFE ID is written as before, unquoted.
        let plain = try Self.peer(uris: ["spiffe://example.org/ns/web/sa/app"])
        #expect(try ForwardedIdentity.xfcc(plain, by: nil).hasSuffix(";URI=spiffe://example.org/ns/web/sa/app"))
    }

    @Test("client headers that look like the proxy's own, or like other proxies' identity headers, never reach the backend")
    func headerStripping() {
        let incoming = HTTPHeaders([
            ("Host", "app"), ("X_Forwarded_Client_Cert", "By=forged"), ("x-forwarded-client-cert", "forged"), ("CLIENT_CERT", ":AAAA:"),
            ("Client-Cert-Chain", ":AAAA:"), ("x_forwarded_proto", "http"), ("X_Forwarded_For", "6.6.6.6"), ("x-forwarded-for", "10.0.0.1"),
            ("X-Client-DN", "CN=admin"), ("X-SSL-Client-Verify", "SUCCESS"), ("x_ssl_client_s_dn", "CN=admin"), ("X-Client-Cert", "x"),
            ("X-Client-Verify", "SUCCESS"), ("X-Amzn-Mtls-Clientcert-Leaf", "x"), ("Connection", "keep-alive, X-Custom-Hop"),
            ("X-Custom-Hop", "1"), ("Accept", "*/*"), ("X-Request-Id", "r1"),
        ])
        let forwarded = HTTPProxyHandler.forwardHeaders(
            incoming, strip: HeaderNames.Matcher(patterns: ForwardedIdentity.defaultStrippedHeaders),
            identity: [("x-forwarded-client-cert", "By=proxy")], addsForwardingHeaders: true, clientAddress: "127.0.0.1"
        )
        let names = forwarded.map { $0.name.lowercased() }
        #expect(names == ["host", "accept", "x-request-id", "x-forwarded-client-cert", "x-forwarded-proto", "x-forwarded-for"])
        #expect(forwarded["x-forwarded-client-cert"] == ["By=proxy"])
        #expect(forwarded["x-forwarded-for"] == ["10.0.0.1, 127.0.0.1"], "the look-alike X_Forwarded_For is dropped")
        // strip-headers replaces the default list; the owned headers are removed whatever it says.
        let custom = HTTPProxyHandler.forwardHeaders(
            incoming, strip: HeaderNames.Matcher(patterns: ["x-request-*"]), identity: [], addsForwardingHeaders: false, clientAddress: nil
        )
        #expect(custom["x-client-dn"] == ["CN=admin"] && custom["x-request-id"].isEmpty && custom["client-cert"].isEmpty)
        #expect(HeaderNames.isValidPattern("x-ssl-*") && !HeaderNames.isValidPattern("*") && !HeaderNames.isValidPattern("a b"))
    }

    final class Capture: LogHandler, @unchecked Sendable {
        // @unchecked: the lines are guarded by the mutex; the LogHandler properties are only set before use.
        let lines = Mutex<[String]>([])
        var metadata: Logger.Metadata = [:]
        var logLevel: Logger.Level = .trace
        subscript(metadataKey key: String) -> Logger.Metadata.Value? {
            get { metadata[key] }
            set { metadata[key] = newValue }
        }
        func log(event: LogEvent) {
            let meta = (event.metadata ?? [:]).sorted { $0.key < $1.key }.map { "\($0.key)=\($0.value)" }.joined(separator: " ")
            lines.withLock { $0.append("\(event.level) \(event.message) \(meta)") }
        }
    }

    @Test("CR, LF and other control characters from clients cannot forge a log line")
    func logInjection() {
        let capture = Capture()
        let runtime = ProxyRuntime(
            metrics: ProxyMetrics(), accessLog: try! AccessLog(destination: "off"), revocation: RevocationState(stalePolicy: .deny),
            logger: Logger(label: "test", factory: { _ in capture })
        )
        let forged = "bad header value\r\nnotice mutual.proxy: reason=ok handshake accepted\u{1B}[2J\u{0}"
        runtime.logger.notice("HTTP/2 connection error", metadata: ["error": "\(forged)", "list": .array([.string(forged)])])
        runtime.logger.notice("path \(forged)")
        let lines = capture.lines.withLock { $0 }
        #expect(lines.count == 2)
        for line in lines {
            #expect(!line.contains("\r") && !line.contains("\n") && !line.contains("\u{1B}") && !line.contains("\u{0}"), "\(line)")
            #expect(line.contains("\\r\\nnotice mutual.proxy"))
        }
        #expect(EscapingLogHandler.escape("plain") == "plain")
    }

    @Test("limits and strip-headers in YAML: parsed, defaulted, and bad values refused with the key named")
    func limitsConfiguration() throws {
        let listener = "listeners:\n  - listen: 127.0.0.1:1\n    cert: /c\n    key: /k\n    client-ca: /ca\n    upstream: http://x:2\n    allow: [spiffe://a.b/c]\n"
        let parsed = try ProxyConfiguration.parse(yaml: listener + "    handshake-timeout: 3\n    idle-timeout: 15.5\n    max-connections: 50\n    max-header-count: 20\n    max-header-bytes: 4096\n    request-head-timeout: 2\n    strip-headers: [x-internal-*, X_Legacy_User]\n")
        let limits = parsed.listeners[0].limits
        #expect(limits.handshakeTimeout == 3 && limits.idleTimeout == 15.5 && limits.maxConnections == 50)
        #expect(limits.maxHeaderCount == 20 && limits.maxHeaderBytes == 4096 && limits.requestHeadTimeout == 2)
        #expect(parsed.listeners[0].stripHeaders == ["x-internal-*", "X_Legacy_User"])
        #expect(try ProxyConfiguration.parse(yaml: listener).listeners[0].limits == ProxyLimits())
        func reason(_ extra: String) -> String {
            do {
                _ = try ProxyConfiguration.parse(yaml: listener + extra)
                return "accepted"
            } catch {
                return "\(error)"
            }
        }
        #expect(reason("    handshake-timeout: 0\n").contains("handshake-timeout"))
        #expect(reason("    idle-timeout: -1\n").contains("idle-timeout"))
        #expect(reason("    request-head-timeout: 1e9\n").contains("request-head-timeout"))
        #expect(reason("    max-connections: 0\n").contains("max-connections"))
        #expect(reason("    max-header-count: 100000\n").contains("max-header-count"))
        #expect(reason("    max-header-bytes: abc\n").contains("max-header-bytes"))
        #expect(reason("    strip-headers: ['a b']\n").contains("strip-headers"))
        #expect(reason("    strip-headers: ['*']\n").contains("strip-headers"))
        #expect(ProxyLimits.table.count == 6)
        #expect(reason("    routes: [{path: '/a/../b', allow: [spiffe://a.b/c]}]\n").contains("can never match"))
        // Route prefixes are normalized like requests: an encoded or upper-case prefix still guards its path.
        let policy = RoutePolicy(routes: [.init(pathPrefix: "/%41DMIN", allow: [])])
        #expect(policy.routes[0].applies(method: "GET", path: "/admin/x"))
    }
}
