import AsyncHTTPClient
import Foundation
import HTTPTypes
import Hummingbird
import MutualAuthority
import NIOCore
import NIOPosix

/// Serves `/acme/<provisioner>/...` through the ACME service; the service decides everything, this only translates
/// HTTP in and out.
struct ACMERoutes: Sendable {
    let service: ACMEService
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
                return ACMEProblem(.incorrectResponse, "\(url) answered with \"\(text.prefix(80))\", not the key authorization for this token and account", status: 403)
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
