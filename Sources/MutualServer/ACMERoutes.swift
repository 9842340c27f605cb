import AsyncHTTPClient
import Crypto
import Foundation
import HTTPTypes
import Hummingbird
import MutualAuthority
import MutualPKI
import NIOConcurrencyHelpers
import NIOCore
import NIOPosix
import NIOSSL
import NIOTLS
import SwiftASN1
import X509

/// Serves `/acme/<provisioner>/...` through the ACME service; the service decides everything, this only translates
/// HTTP in and out.
struct ACMERoutes: Sendable {
    let service: ACMEService
    let metrics: ServerMetrics
    /// `host:port` to use when a request carries no Host (HTTP/1.0).
    let fallbackAuthority: String

    func register(on router: Router<APIContext>) {
        for method in [HTTPRequest.Method.get, .head, .post, .put, .delete, .patch] {
            router.on("/acme/**", method: method) { request, context in try await self.handle(request, context) }
        }
    }

    func handle(_ request: Request, _ context: APIContext) async throws -> Response {
        let body: ByteBuffer
        do {
            body = try await request.body.collect(upTo: context.maxUploadSize)
        } catch {
            body = ByteBuffer(repeating: 0x20, count: context.maxUploadSize + 1)  // let the service refuse it as too large
        }
        let authority = request.head.authority ?? fallbackAuthority
        let answer = await service.handle(
            method: request.method.rawValue, path: request.uri.path, base: "https://\(authority)",
            contentType: request.headers[.contentType], body: Data(buffer: body)
        )
        // Label values come from a fixed set: a known provisioner and resource, or "unknown".
        let parts = request.uri.path.split(separator: "/").map(String.init)
        let provisioner = parts.count > 1 && service.provisioners[parts[1]] != nil ? parts[1] : "unknown"
        let resources: Set<String> = ["directory", "new-nonce", "new-account", "new-order", "revoke-cert", "key-change", "account", "order", "authz", "chall", "cert", "renewal-info"]
        let resource = parts.count > 2 && resources.contains(parts[2]) ? parts[2] : "unknown"
        let outcome = answer.status < 400 ? "ok" : answer.status >= 500 ? "error" : "refused"
        metrics.countACME(provisioner: provisioner, resource: resource, outcome: outcome, type: answer.problem?.kind.rawValue ?? "none")
        if let problem = answer.problem, answer.status < 500 {
            context.logger.info("ACME request refused", metadata: [
                "path": "\(request.uri.path.prefix(200))", "status": "\(answer.status)", "code": "\(problem.kind.rawValue)", "reason": "\(problem.detail)",
            ])
        }
        var fields = HTTPFields()
        for (name, value) in answer.headers {
            if let field = HTTPField.Name(name) { fields.append(HTTPField(name: field, value: value)) }
        }
        return Response(status: .init(code: answer.status), headers: fields, body: .init(byteBuffer: ByteBuffer(bytes: answer.body)))
    }
}

/// Checks challenges over the network, as a CA must: http-01 fetches
/// `http://<identifier>:<http port>/.well-known/acme-challenge/<token>` (no redirects) and compares the body with the
/// key authorization. Failures name their cause with an ACME problem type: `connection` (refused, unreachable,
/// timed out), `dns` (the name does not resolve), `incorrectResponse` (wrong status or body).
struct ACMENetworkValidator: ACMEValidator {
    static let client: HTTPClient = {
        var configuration = HTTPClient.Configuration(redirectConfiguration: .disallow, timeout: .init(connect: .seconds(5), read: .seconds(10)))
        configuration.decompression = .disabled
        return HTTPClient(eventLoopGroupProvider: .singleton, configuration: configuration)
    }()

    func validate(challenge: ACMEChallenge, identifier: ACMEIdentifier, keyAuthorization: String, provisioner: ACMEProvisioner) async -> ACMEProblem? {
        switch challenge.type {
        case "http-01":
            return await http01(token: challenge.token, identifier: identifier, keyAuthorization: keyAuthorization, port: provisioner.httpPort)
        case "dns-01":
            return await dns01(identifier: identifier, keyAuthorization: keyAuthorization, resolver: provisioner.dnsResolver)
        case "tls-alpn-01":
            return await tlsALPN01(identifier: identifier, keyAuthorization: keyAuthorization, port: provisioner.tlsPort)
        default:
            return ACMEProblem(.serverInternal, "challenge type \(challenge.type) is not implemented by this server")
        }
    }

    func http01(token: String, identifier: ACMEIdentifier, keyAuthorization: String, port: Int) async -> ACMEProblem? {
        let host = identifier.type == "ip" && identifier.value.contains(":") ? "[\(identifier.value)]" : identifier.value
        let url = "http://\(host):\(port)/.well-known/acme-challenge/\(token)"
        do {
            var request = HTTPClientRequest(url: url)
            request.headers.add(name: "user-agent", value: "mutual-acme-validator")
            let response = try await Self.client.execute(request, timeout: .seconds(15))
            guard response.status == .ok else {
                return ACMEProblem(.incorrectResponse, "\(url) answered HTTP \(response.status.code), not 200 with the key authorization", status: 403)
            }
            let body: ByteBuffer
            do {
                body = try await response.body.collect(upTo: 8 * 1024)
            } catch {
                return ACMEProblem(.incorrectResponse, "\(url) answered with more than 8 KiB; expected the key authorization", status: 403)
            }
            let text = String(buffer: body).trimmingCharacters(in: .whitespacesAndNewlines)
            guard text == keyAuthorization else {
                // The body is not echoed: the validator may be pointed at internal services, and their answers are
                // not the client's to read.
                return ACMEProblem(.incorrectResponse, "\(url) answered with \(body.readableBytes) bytes that are not the key authorization for this token and account", status: 403)
            }
            return nil
        } catch {
            return Self.problem(for: error, target: "\(host):\(port)")
        }
    }

    /// Names why a connection failed, by error type and errno, never by message text.
    static func problem(for error: any Error, target: String) -> ACMEProblem {
        if let io = error as? IOError {
            return ACMEProblem(.connection, "could not connect to \(target): \(String(cString: strerror(io.errnoCode)).lowercased())", status: 403)
        }
        if let connection = error as? NIOConnectionError {
            if connection.dnsAAAAError != nil || connection.dnsAError != nil, connection.connectionErrors.isEmpty {
                return ACMEProblem(.dns, "\(target): the name does not resolve", status: 403)
            }
            if let first = connection.connectionErrors.first { return problem(for: first.error, target: target) }
        }
        if let client = error as? HTTPClientError {
            switch client {
            case .connectTimeout: return ACMEProblem(.connection, "connecting to \(target) timed out", status: 403)
            case .readTimeout, .deadlineExceeded: return ACMEProblem(.connection, "\(target) did not answer in time", status: 403)
            case .remoteConnectionClosed: return ACMEProblem(.connection, "\(target) closed the connection without an answer", status: 403)
            default: break
            }
        }
        if error is ChannelError { return ACMEProblem(.connection, "could not connect to \(target): \(error)", status: 403) }
        if let resolution = error as? SocketAddressError {
            return ACMEProblem(.dns, "\(target): the name does not resolve (\(resolution))", status: 403)
        }
        return ACMEProblem(.connection, "could not fetch from \(target): \(error)", status: 403)
    }
}

extension ACMENetworkValidator {
    /// id-pe-acmeIdentifier (RFC 8737 6.1).
    static let acmeIdentifierOID: ASN1ObjectIdentifier = [1, 3, 6, 1, 5, 5, 7, 1, 31]

    /// The SNI for an identifier: the name, or for an IP address its reverse-mapping name (RFC 8738 6).
    static func serverName(for identifier: ACMEIdentifier) -> String {
        guard identifier.type == "ip", let bytes = try? Names.ipAddressBytes(identifier.value) else { return identifier.value }
        if bytes.count == 4 { return bytes.reversed().map(String.init).joined(separator: ".") + ".in-addr.arpa" }
        let nibbles = bytes.flatMap { [$0 >> 4, $0 & 0x0F] }
        return nibbles.reversed().map { String($0, radix: 16) }.joined(separator: ".") + ".ip6.arpa"
    }

    /// tls-alpn-01 (RFC 8737): a TLS handshake to `identifier:port` with ALPN `acme-tls/1` and the identifier as SNI;
    /// the server must negotiate that protocol and present a certificate for exactly the identifier with a critical
    /// acmeIdentifier extension holding SHA-256 of the key authorization.
    func tlsALPN01(identifier: ACMEIdentifier, keyAuthorization: String, port: Int) async -> ACMEProblem? {
        let target = "\(identifier.type == "ip" && identifier.value.contains(":") ? "[\(identifier.value)]" : identifier.value):\(port)"
        var configuration = TLSConfiguration.makeClientConfiguration()
        configuration.certificateVerification = .none  // the certificate is self-signed by design; its contents are checked below
        configuration.applicationProtocols = ["acme-tls/1"]
        var outcome = await handshake(identifier: identifier, port: port, target: target, configuration: configuration)
        if case .failure(let problem) = outcome, problem.kind == .tls {
            // BoringSSL insists on the keyUsage a cipher needs (digitalSignature for ECDHE and TLS 1.3), which some
            // clients' challenge certificates lack (lego's RSA certificate has keyEncipherment only). RFC 8737 puts no
            // rule on keyUsage, and Go-based validators accept such certificates, so retry once with TLS 1.2 and RSA
            // key transport, for which keyEncipherment is the right bit.
            var legacy = configuration
            legacy.maximumTLSVersion = .tlsv12
            legacy.cipherSuites = "AES128-GCM-SHA256:AES256-GCM-SHA384"
            if case .success(let certificate) = await handshake(identifier: identifier, port: port, target: target, configuration: legacy) {
                outcome = .success(certificate)
            }
        }
        switch outcome {
        case .failure(let problem): return problem
        case .success(let certificate):
            return Self.checkALPNCertificate(certificate, identifier: identifier, keyAuthorization: keyAuthorization, target: target)
        }
    }

    /// One handshake with ALPN acme-tls/1: the certificate presented, or why there is none.
    private func handshake(identifier: ACMEIdentifier, port: Int, target: String, configuration: TLSConfiguration) async -> Result<Certificate, ACMEProblem> {
        let context: NIOSSLContext
        do { context = try NIOSSLContext(configuration: configuration) } catch {
            return .failure(ACMEProblem(.serverInternal, "cannot set up TLS for validation: \(error)"))
        }
        let loop = MultiThreadedEventLoopGroup.singleton.next()
        let negotiated = loop.makePromise(of: HandshakeOutcome.Result.self)
        let channel: any Channel
        do {
            channel = try await ClientBootstrap(group: loop)
                .connectTimeout(.seconds(5))
                .channelInitializer { channel in
                    channel.eventLoop.makeCompletedFuture {
                        try channel.pipeline.syncOperations.addHandler(try NIOSSLClientHandler(context: context, serverHostname: Self.serverName(for: identifier)))
                        try channel.pipeline.syncOperations.addHandler(HandshakeOutcome(promise: negotiated))
                    }
                }
                .connect(host: identifier.value, port: port).get()
        } catch {
            negotiated.fail(ChannelError.alreadyClosed)
            return .failure(Self.problem(for: error, target: target))
        }
        defer { channel.close(promise: nil) }
        let timeout = loop.scheduleTask(in: .seconds(10)) { negotiated.fail(ChannelError.connectTimeout(.seconds(10))) }
        defer { timeout.cancel() }
        let result: HandshakeOutcome.Result
        do {
            result = try await negotiated.futureResult.get()
        } catch {
            return .failure(ACMEProblem(.tls, "the TLS handshake with \(target) failed: \(error)", status: 403))
        }
        guard result.protocolName == "acme-tls/1" else {
            return .failure(ACMEProblem(.tls, "\(target) did not negotiate the acme-tls/1 protocol (ALPN)", status: 403))
        }
        guard let der = result.certificate, let certificate = try? Certificate(derEncoded: der) else {
            return .failure(ACMEProblem(.tls, "\(target) presented no certificate", status: 403))
        }
        return .success(certificate)
    }

    /// The certificate rules of RFC 8737 3: exactly the identifier as SAN, and the critical acmeIdentifier extension
    /// with SHA-256 of the key authorization.
    static func checkALPNCertificate(_ certificate: Certificate, identifier: ACMEIdentifier, keyAuthorization: String, target: String) -> ACMEProblem? {
        let names = (try? certificate.extensions.subjectAlternativeNames).flatMap { $0.map(Array.init) } ?? []
        let matches: Bool
        if identifier.type == "ip" {
            let bytes = (try? Names.ipAddressBytes(identifier.value)) ?? []
            matches = names.count == 1 && names.first.map { if case .ipAddress(let ip) = $0 { return Array(ip.bytes) == bytes } else { return false } } == true
        } else {
            matches = names.count == 1 && names.first.map { if case .dnsName(let name) = $0 { return name.lowercased() == identifier.value } else { return false } } == true
        }
        guard matches else {
            return ACMEProblem(.incorrectResponse, "the certificate from \(target) must name exactly \(identifier.value) in its subjectAltName", status: 403)
        }
        guard let ext = certificate.extensions.first(where: { $0.oid == acmeIdentifierOID }) else {
            return ACMEProblem(.incorrectResponse, "the certificate from \(target) has no acmeIdentifier extension", status: 403)
        }
        guard ext.critical else {
            return ACMEProblem(.incorrectResponse, "the acmeIdentifier extension from \(target) must be critical", status: 403)
        }
        let expected = Array(SHA256.hash(data: Data(keyAuthorization.utf8)))
        guard let value = try? ASN1OctetString(derEncoded: ext.value), Array(value.bytes) == expected else {
            return ACMEProblem(.incorrectResponse, "the acmeIdentifier extension from \(target) does not hold the key authorization's digest", status: 403)
        }
        return nil
    }

    /// Reports the protocol ALPN negotiated and the certificate presented, taken when the handshake completes (the
    /// peer may close the connection right after it), or the error that ended it.
    final class HandshakeOutcome: ChannelInboundHandler, Sendable {
        typealias InboundIn = ByteBuffer
        struct Result: Sendable {
            var protocolName: String?
            var certificate: [UInt8]?
        }
        let promise: EventLoopPromise<Result>
        init(promise: EventLoopPromise<Result>) { self.promise = promise }
        func userInboundEventTriggered(context: ChannelHandlerContext, event: Any) {
            if case TLSUserEvent.handshakeCompleted(let negotiated) = event {
                let handler = try? context.pipeline.syncOperations.handler(type: NIOSSLClientHandler.self)
                promise.succeed(Result(protocolName: negotiated, certificate: try? handler?.peerCertificate?.toDERBytes()))
            }
            context.fireUserInboundEventTriggered(event)
        }
        func errorCaught(context: ChannelHandlerContext, error: any Error) {
            promise.fail(error)
            context.close(promise: nil)
        }
        func channelInactive(context: ChannelHandlerContext) {
            promise.fail(ChannelError.eof)
        }
    }
}

extension ACMENetworkValidator {
    /// dns-01 (RFC 8555 8.4): the TXT records of `_acme-challenge.<name>` at the configured resolver must include
    /// base64url(SHA-256(key authorization)). UDP first; over TCP when the answer is truncated.
    func dns01(identifier: ACMEIdentifier, keyAuthorization: String, resolver: String?) async -> ACMEProblem? {
        guard let resolver, let (host, port) = try? AuthorityServer.Configuration.parseListen(resolver) else {
            return ACMEProblem(.serverInternal, "dns-01 needs a resolver (--acme-dns-resolver HOST:PORT)")
        }
        let name = "_acme-challenge." + identifier.value
        let expected = Base64URL.encode(Data(SHA256.hash(data: Data(keyAuthorization.utf8))))
        let id = UInt16.random(in: 0...UInt16.max)
        let answer: DNSMessage.Answer
        do {
            let query = try DNSMessage.query(id: id, name: name)
            var reply = try await DNSTransport.udp(query, host: host, port: port)
            var parsed = try DNSMessage.parse(reply, expectedID: id, name: name)
            if parsed.truncated {
                reply = try await DNSTransport.tcp(query, host: host, port: port)
                parsed = try DNSMessage.parse(reply, expectedID: id, name: name)
            }
            answer = parsed
        } catch let error as DNSMessage.ParseError {
            return ACMEProblem(.dns, "the resolver \(resolver) sent an unusable answer for \(name): \(error.reason)", status: 403)
        } catch {
            return ACMEProblem(.dns, "the resolver \(resolver) did not answer for \(name): \(error)", status: 403)
        }
        switch answer.rcode {
        case 0: break
        case 3: return ACMEProblem(.dns, "\(name) does not exist (NXDOMAIN at \(resolver)): no TXT record is set", status: 403)
        default: return ACMEProblem(.dns, "the resolver \(resolver) answered rcode \(answer.rcode) for \(name)", status: 403)
        }
        guard !answer.txt.isEmpty else {
            return ACMEProblem(.dns, "no TXT record at \(name)", status: 403)
        }
        guard answer.txt.contains(expected) else {
            return ACMEProblem(.incorrectResponse, "the TXT records at \(name) (\(answer.txt.map { "\"\($0.prefix(60))\"" }.joined(separator: ", "))) do not include the digest of the key authorization", status: 403)
        }
        return nil
    }
}

/// One DNS exchange over UDP or TCP (RFC 1035 4.2), bounded by a timeout.
enum DNSTransport {
    struct Timeout: Error, CustomStringConvertible { var description: String { "no answer within 5 seconds" } }

    final class Collector: ChannelInboundHandler, Sendable {
        typealias InboundIn = AddressedEnvelope<ByteBuffer>
        let promise: EventLoopPromise<[UInt8]>
        init(promise: EventLoopPromise<[UInt8]>) { self.promise = promise }
        func channelRead(context: ChannelHandlerContext, data: NIOAny) {
            promise.succeed(Array(unwrapInboundIn(data).data.readableBytesView))
        }
        func errorCaught(context: ChannelHandlerContext, error: any Error) { promise.fail(error) }
    }

    static func udp(_ query: [UInt8], host: String, port: Int) async throws -> [UInt8] {
        let loop = MultiThreadedEventLoopGroup.singleton.next()
        let reply = loop.makePromise(of: [UInt8].self)
        let remote = try SocketAddress.makeAddressResolvingHost(host, port: port)
        let channel = try await DatagramBootstrap(group: loop)
            .channelInitializer { channel in channel.eventLoop.makeCompletedFuture { try channel.pipeline.syncOperations.addHandler(Collector(promise: reply)) } }
            .bind(host: remote.protocol == .inet6 ? "::" : "0.0.0.0", port: 0).get()
        defer { channel.close(promise: nil) }
        let timeout = loop.scheduleTask(in: .seconds(5)) { reply.fail(Timeout()) }
        defer { timeout.cancel() }
        try await channel.writeAndFlush(AddressedEnvelope(remoteAddress: remote, data: ByteBuffer(bytes: query))).get()
        return try await reply.futureResult.get()
    }

    /// Collects a length-prefixed DNS message from a TCP stream.
    final class StreamCollector: ChannelInboundHandler, Sendable {
        typealias InboundIn = ByteBuffer
        let promise: EventLoopPromise<[UInt8]>
        private let buffer = NIOLockedValueBox<[UInt8]>([])
        init(promise: EventLoopPromise<[UInt8]>) { self.promise = promise }
        func channelRead(context: ChannelHandlerContext, data: NIOAny) {
            let bytes = buffer.withLockedValue { stored -> [UInt8]? in
                stored += unwrapInboundIn(data).readableBytesView
                guard stored.count >= 2 else { return nil }
                let length = Int(stored[0]) << 8 | Int(stored[1])
                return stored.count >= 2 + length ? Array(stored[2..<(2 + length)]) : nil
            }
            if let bytes { promise.succeed(bytes) }
        }
        func errorCaught(context: ChannelHandlerContext, error: any Error) { promise.fail(error) }
        func channelInactive(context: ChannelHandlerContext) { promise.fail(ChannelError.eof) }
    }

    static func tcp(_ query: [UInt8], host: String, port: Int) async throws -> [UInt8] {
        let loop = MultiThreadedEventLoopGroup.singleton.next()
        let reply = loop.makePromise(of: [UInt8].self)
        let channel = try await ClientBootstrap(group: loop)
            .connectTimeout(.seconds(5))
            .channelInitializer { channel in channel.eventLoop.makeCompletedFuture { try channel.pipeline.syncOperations.addHandler(StreamCollector(promise: reply)) } }
            .connect(host: host, port: port).get()
        defer { channel.close(promise: nil) }
        let timeout = loop.scheduleTask(in: .seconds(5)) { reply.fail(Timeout()) }
        defer { timeout.cancel() }
        try await channel.writeAndFlush(ByteBuffer(bytes: [UInt8(query.count >> 8), UInt8(query.count & 0xFF)] + query)).get()
        return try await reply.futureResult.get()
    }
}
