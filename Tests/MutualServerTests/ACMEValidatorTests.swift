import Crypto
import Foundation
import MutualAuthority
import MutualPKI
@testable import MutualServer
import NIOCore
import NIOHTTP1
import NIOPosix
import NIOSSL
import NIOTLS
import SwiftASN1
import Testing
import X509

/// The http-01 check against real HTTP servers on 127.0.0.1: each way a challenge can fail gets its ACME type.
@Suite("ACME http-01 validator over real sockets")
struct ACMEValidatorTests {
    /// Answers every request with a fixed status, body and extra headers.
    final class FixedAnswer: ChannelInboundHandler, Sendable {
        typealias InboundIn = HTTPServerRequestPart
        typealias OutboundOut = HTTPServerResponsePart
        let status: HTTPResponseStatus
        let body: String
        let headers: [(String, String)]
        init(status: HTTPResponseStatus, body: String, headers: [(String, String)] = []) {
            self.status = status
            self.body = body
            self.headers = headers
        }
        func channelRead(context: ChannelHandlerContext, data: NIOAny) {
            guard case .end = unwrapInboundIn(data) else { return }
            var head = HTTPResponseHead(version: .http1_1, status: status)
            head.headers.add(name: "content-length", value: String(body.utf8.count))
            for (name, value) in headers { head.headers.add(name: name, value: value) }
            context.write(wrapOutboundOut(.head(head)), promise: nil)
            context.write(wrapOutboundOut(.body(.byteBuffer(ByteBuffer(string: body)))), promise: nil)
            context.writeAndFlush(wrapOutboundOut(.end(nil)), promise: nil)
        }
    }

    static func serve(_ make: @escaping @Sendable () -> FixedAnswer) async throws -> any Channel {
        try await ServerBootstrap(group: MultiThreadedEventLoopGroup.singleton)
            .serverChannelOption(.socketOption(.so_reuseaddr), value: 1)
            .childChannelInitializer { channel in
                channel.eventLoop.makeCompletedFuture {
                    try channel.pipeline.syncOperations.configureHTTPServerPipeline()
                    try channel.pipeline.syncOperations.addHandler(make())
                }
            }
            .bind(host: "127.0.0.1", port: 0).get()
    }

    static func check(port: Int, type: String = "ip", value: String = "127.0.0.1") async -> ACMEProblem? {
        await ACMENetworkValidator().http01(token: "tok", identifier: ACMEIdentifier(type: type, value: value), keyAuthorization: "tok.thumb", port: port)
    }

    @Test("the key authorization (whitespace around it allowed) passes; a wrong body, a 404, a redirect and an oversized answer are incorrectResponse")
    func answers() async throws {
        let cases: [(FixedAnswer, String?)] = [
            (FixedAnswer(status: .ok, body: "tok.thumb\n"), nil),
            (FixedAnswer(status: .ok, body: "tok.other"), "incorrectResponse"),
            (FixedAnswer(status: .notFound, body: "nope"), "incorrectResponse"),
            (FixedAnswer(status: .found, body: "", headers: [("location", "http://127.0.0.1:1/elsewhere")]), "incorrectResponse"),
            (FixedAnswer(status: .ok, body: String(repeating: "x", count: 20_000)), "incorrectResponse"),
        ]
        for (answer, expected) in cases {
            let server = try await Self.serve { FixedAnswer(status: answer.status, body: answer.body, headers: answer.headers) }
            let problem = await Self.check(port: server.localAddress!.port!)
            #expect(problem?.kind.rawValue == expected, "\(answer.status.code): \(problem?.detail ?? "valid")")
            #expect(problem == nil || problem?.status == 403)
            #expect(problem?.detail.contains("tok.other") != true, "the answer's body is never echoed to the client")
            try await server.close()
        }
        // A DNS identifier goes through name resolution: localhost resolves here.
        let server = try await Self.serve { FixedAnswer(status: .ok, body: "tok.thumb") }
        #expect(await Self.check(port: server.localAddress!.port!, type: "dns", value: "localhost") == nil)
        try await server.close()
    }

    @Test("nothing listening: connection, naming the address and the cause")
    func refused() async throws {
        let server = try await Self.serve { FixedAnswer(status: .ok, body: "") }
        let port = server.localAddress!.port!
        try await server.close()
        let problem = await Self.check(port: port)
        #expect(problem?.kind == .connection)
        #expect(problem?.detail.hasPrefix("could not connect to 127.0.0.1:\(port)") == true)
    }
}

/// tls-alpn-01 against real TLS servers on 127.0.0.1 built as RFC 8737 says, and as it must not be.
@Suite("ACME tls-alpn-01 validator over real sockets")
struct ACMEALPNValidatorTests {
    static let keyAuthorization = "tok.thumb"

    /// A self-signed certificate with `sans` and, unless nil, the acmeIdentifier extension holding `digest`.
    static func certificate(key: Certificate.PrivateKey, sans: [GeneralName], digest: [UInt8]?, critical: Bool = true, keyUsage: KeyUsage? = nil) throws -> Certificate {
        var extensions = Certificate.Extensions()
        if let keyUsage { try extensions.append(Certificate.Extension(keyUsage, critical: true)) }
        try extensions.append(Certificate.Extension(SubjectAlternativeNames(sans), critical: false))
        if let digest {
            var serializer = DER.Serializer()
            try serializer.serialize(ASN1OctetString(contentBytes: ArraySlice(digest)))
            try extensions.append(Certificate.Extension(oid: ACMENetworkValidator.acmeIdentifierOID, critical: critical, value: ArraySlice(serializer.serializedBytes)))
        }
        let name = try DistinguishedName { CommonName("acme") }
        return try Certificate(
            version: .v3, serialNumber: .init(), publicKey: key.publicKey, notValidBefore: Date().addingTimeInterval(-60),
            notValidAfter: Date().addingTimeInterval(3600), issuer: name, subject: name, signatureAlgorithm: key.preferredSignatureAlgorithm,
            extensions: extensions, issuerPrivateKey: key
        )
    }

    /// Closes the connection as soon as the handshake is done, as Go's tls-alpn-01 responders (lego) do.
    final class CloseAfterHandshake: ChannelInboundHandler, Sendable {
        typealias InboundIn = ByteBuffer
        func userInboundEventTriggered(context: ChannelHandlerContext, event: Any) {
            if case TLSUserEvent.handshakeCompleted = event { context.close(promise: nil) }
            context.fireUserInboundEventTriggered(event)
        }
    }

    static func serve(_ certificate: Certificate, key: Certificate.PrivateKey, alpn: [String] = ["acme-tls/1"], closeAfterHandshake: Bool = false) async throws -> any Channel {
        var configuration = TLSConfiguration.makeServerConfiguration(
            certificateChain: [.certificate(try NIOSSLCertificate(bytes: try certificate.derBytes, format: .der))],
            privateKey: .privateKey(try NIOSSLPrivateKey(bytes: Array(try KeyFile.pem(for: key, passphrase: nil).utf8), format: .pem))
        )
        configuration.applicationProtocols = alpn
        let context = try NIOSSLContext(configuration: configuration)
        return try await ServerBootstrap(group: MultiThreadedEventLoopGroup.singleton)
            .childChannelInitializer { channel in
                channel.eventLoop.makeCompletedFuture {
                    try channel.pipeline.syncOperations.addHandler(NIOSSLServerHandler(context: context))
                    if closeAfterHandshake { try channel.pipeline.syncOperations.addHandler(CloseAfterHandshake()) }
                }
            }
            .bind(host: "127.0.0.1", port: 0).get()
    }

    @Test("the right certificate passes, for an IP (reverse-name SNI) and for localhost; a wrong digest, a non-critical extension, none, extra names, no acme-tls/1 fail with their types")
    func certificates() async throws {
        let key = try KeyType.p256.generate()
        let digest = Array(SHA256.hash(data: Data(Self.keyAuthorization.utf8)))
        let ip = GeneralName.ipAddress(ASN1OctetString(contentBytes: [127, 0, 0, 1]))
        let cases: [(String, Certificate, [String], String?)] = [
            ("right", try Self.certificate(key: key, sans: [ip], digest: digest), ["acme-tls/1"], nil),
            ("wrong digest", try Self.certificate(key: key, sans: [ip], digest: Array(repeating: 0, count: 32)), ["acme-tls/1"], "incorrectResponse"),
            ("not critical", try Self.certificate(key: key, sans: [ip], digest: digest, critical: false), ["acme-tls/1"], "incorrectResponse"),
            ("no extension", try Self.certificate(key: key, sans: [ip], digest: nil), ["acme-tls/1"], "incorrectResponse"),
            ("extra name", try Self.certificate(key: key, sans: [ip, .dnsName("other.test")], digest: digest), ["acme-tls/1"], "incorrectResponse"),
            ("no acme-tls/1", try Self.certificate(key: key, sans: [ip], digest: digest), ["http/1.1"], "tls"),
        ]
        for (label, certificate, alpn, expected) in cases {
            let server = try await Self.serve(certificate, key: key, alpn: alpn)
            let problem = await ACMENetworkValidator().tlsALPN01(
                identifier: ACMEIdentifier(type: "ip", value: "127.0.0.1"), keyAuthorization: Self.keyAuthorization, port: server.localAddress!.port!
            )
            #expect(problem?.kind.rawValue == expected, "\(label): \(problem?.detail ?? "valid")")
            try await server.close()
        }
        let named = try await Self.serve(try Self.certificate(key: key, sans: [.dnsName("localhost")], digest: digest), key: key)
        #expect(await ACMENetworkValidator().tlsALPN01(identifier: ACMEIdentifier(type: "dns", value: "localhost"), keyAuthorization: Self.keyAuthorization, port: named.localAddress!.port!) == nil)
        try await named.close()
        #expect(ACMENetworkValidator.serverName(for: ACMEIdentifier(type: "ip", value: "127.0.0.1")) == "1.0.0.127.in-addr.arpa")
        #expect(ACMENetworkValidator.serverName(for: ACMEIdentifier(type: "ip", value: "2001:db8::1")).hasSuffix(".8.b.d.0.1.0.0.2.ip6.arpa"))
    }

    @Test("an RSA challenge certificate with keyEncipherment only (as lego makes it) is accepted over TLS 1.2 RSA key transport")
    func keyEnciphermentOnly() async throws {
        let key = try KeyType.rsa2048.generate()
        let digest = Array(SHA256.hash(data: Data(Self.keyAuthorization.utf8)))
        let certificate = try Self.certificate(key: key, sans: [.dnsName("localhost")], digest: digest, keyUsage: KeyUsage(keyEncipherment: true))
        let server = try await Self.serve(certificate, key: key)
        let problem = await ACMENetworkValidator().tlsALPN01(identifier: ACMEIdentifier(type: "dns", value: "localhost"), keyAuthorization: Self.keyAuthorization, port: server.localAddress!.port!)
        #expect(problem == nil, "\(problem?.detail ?? "")")
        try await server.close()
    }

    @Test("a responder that closes right after the handshake (as lego's does) is still judged by the certificate it presented")
    func closedAfterHandshake() async throws {
        let key = try KeyType.p256.generate()
        let digest = Array(SHA256.hash(data: Data(Self.keyAuthorization.utf8)))
        for _ in 0..<20 {
            let server = try await Self.serve(try Self.certificate(key: key, sans: [.dnsName("localhost")], digest: digest), key: key, closeAfterHandshake: true)
            let problem = await ACMENetworkValidator().tlsALPN01(identifier: ACMEIdentifier(type: "dns", value: "localhost"), keyAuthorization: Self.keyAuthorization, port: server.localAddress!.port!)
            #expect(problem == nil, "\(problem?.detail ?? "")")
            try await server.close()
        }
    }

    @Test("nothing listening: connection")
    func refused() async throws {
        let key = try KeyType.p256.generate()
        let server = try await Self.serve(try Self.certificate(key: key, sans: [.dnsName("localhost")], digest: nil), key: key)
        let port = server.localAddress!.port!
        try await server.close()
        let problem = await ACMENetworkValidator().tlsALPN01(identifier: ACMEIdentifier(type: "ip", value: "127.0.0.1"), keyAuthorization: "x", port: port)
        #expect(problem?.kind == .connection)
    }
}

/// The ACME routes inside a real `mutual serve` over TLS: JSON out, problems in, each counted by its type.
@Suite("ACME over the authority's HTTPS listener", .serialized)
struct ACMEServerTests {
    @Test("the directory over TLS names this host; a garbage POST is a malformed problem; an unknown provisioner 404; each counted by type in /metrics")
    func directoryAndMetrics() async throws {
        let server = try await ServerHarness.start(acme: [try ACMEProvisioner(name: "web")])
        do {
            let (status, directory) = try await server.curl("/acme/web/directory")
            #expect(status == 200)
            let json = try JSONSerialization.jsonObject(with: Data(directory.utf8)) as? [String: Any]
            #expect(json?["newOrder"] as? String == server.baseURL + "/acme/web/new-order")
            let (refused, problem) = try await server.curl("/acme/web/new-order", method: "POST", body: "garbage", contentType: "application/jose+json")
            #expect(refused == 400)
            #expect((try JSONSerialization.jsonObject(with: Data(problem.utf8)) as? [String: Any])?["type"] as? String == "urn:ietf:params:acme:error:malformed")
            let (missing, _) = try await server.curl("/acme/nope/directory")
            #expect(missing == 404)
            let (_, metrics) = try await server.curl("/metrics")
            #expect(metrics.contains("mutual_acme_requests_total{provisioner=\"web\",resource=\"directory\",outcome=\"ok\",type=\"none\"} 1"))
            #expect(metrics.contains("mutual_acme_requests_total{provisioner=\"web\",resource=\"new-order\",outcome=\"refused\",type=\"malformed\"} 1"))
            #expect(metrics.contains("mutual_acme_requests_total{provisioner=\"unknown\",resource=\"directory\",outcome=\"refused\",type=\"malformed\"} 1"))
        } catch {
            await server.stop()
            throw error
        }
        await server.stop()
    }
}
