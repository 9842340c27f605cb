import Foundation
import Hummingbird
import MutualAuthority
import MutualPKCS11
import MutualPKI
import MutualStore
import NIOCore

/// An RFC 9457 problem: a stable `type`, a short `title`, the HTTP status and a `detail` for people. Errors from the
/// modules become problems here, at the edge, and nowhere else.
public struct Problem: Error, HTTPResponseError, Sendable {
    public var status: HTTPResponse.Status
    /// Stable identifier, `urn:mutual:problem:<code>`.
    public var type: String
    public var title: String
    public var detail: String
    /// RFC 9457 extension members a program reads beside the code (`key_type` of `key-type-required`).
    public var members: [String: String] = [:]

    public init(_ status: HTTPResponse.Status, code: String, title: String, detail: String, members: [String: String] = [:]) {
        self.status = status
        self.type = "urn:mutual:problem:\(code)"
        self.title = title
        self.detail = detail
        self.members = members
    }

    public func response(from request: Request, context: some RequestContext) throws -> Response {
        var body = "{"
        body += "\"type\":\(Self.quote(type)),\"title\":\(Self.quote(title)),\"status\":\(status.code),\"detail\":\(Self.quote(detail))"
        for (name, value) in members.sorted(by: { $0.key < $1.key }) { body += ",\(Self.quote(name)):\(Self.quote(value))" }
        body += "}"
        return Response(
            status: status,
            headers: [.contentType: "application/problem+json", .cacheControl: "no-store"],
            body: .init(byteBuffer: ByteBuffer(string: body))
        )
    }

    static func quote(_ s: String) -> String {
        let data = (try? JSONSerialization.data(withJSONObject: [s], options: [.withoutEscapingSlashes])) ?? Data("[\"\"]".utf8)
        let text = String(decoding: data, as: UTF8.self)
        return String(text.dropFirst().dropLast())
    }

    /// Maps any error to a problem; unexpected errors become a 500 without internals in the detail.
    static func from(_ error: any Error) -> Problem {
        switch error {
        case let problem as Problem:
            return problem
        case let e as AuthorityError:
            switch e.code {
            case .unauthenticated, .tokenInvalid:
                return Problem(.unauthorized, code: e.code.name, title: "Unauthorized", detail: e.reason)
            case .tokenExpired, .tokenUsedUp, .tokenRevoked, .tokenOutOfScope, .tokenNotAllowed, .certificateRefused, .forbidden,
                 .proofInvalid, .clockSkew, .proofReplayed, .renewExpiredDisabled, .beyondGrace,
                 .certificateRevoked, .certificateExpired, .certificateNotYetValid, .certificateUnknown:
                return Problem(.forbidden, code: e.code.name, title: "Forbidden", detail: e.reason)
            case .notFound:
                return Problem(.notFound, code: e.code.name, title: "Not Found", detail: e.reason)
            case .keyTypeRequired:
                // 409: the request is fine but conflicts with the identity's migration; the same request with an
                // ML-DSA key succeeds.
                return Problem(.conflict, code: e.code.name, title: "Conflict", detail: e.reason, members: e.details)
            case .conflict:
                return Problem(.conflict, code: e.code.name, title: "Conflict", detail: e.reason)
            default:
                return Problem(.serviceUnavailable, code: e.code.name, title: "Unavailable", detail: e.reason)
            }
        case let e as PKIError:
            switch e.code {
            case .inputTooLarge:
                return Problem(.contentTooLarge, code: e.code.name, title: "Content Too Large", detail: e.reason)
            case .malformedInput, .badSignature, .invalidDuration:
                return Problem(.badRequest, code: e.code.name, title: "Bad Request", detail: e.reason)
            case .invalidName, .nameNotPermitted, .profileViolation, .validityTooLong, .unsupportedKey:
                return Problem(.unprocessableContent, code: e.code.name, title: "Refused by policy", detail: e.reason)
            default:
                return Problem(.internalServerError, code: e.code.name, title: "Internal Server Error", detail: "the CA could not sign: \(e.reason)")
            }
        case let e as StoreError:
            return Problem(.serviceUnavailable, code: e.code.name, title: "Service Unavailable", detail: "inventory unavailable: \(e.reason)")
        case let e as PKCS11Error:
            // The CA key's token cannot sign (removed, logged out, failing): the request may succeed later or on
            // another replica, as with an unavailable inventory.
            return Problem(.serviceUnavailable, code: e.code.name, title: "Service Unavailable", detail: "the CA's key in its PKCS#11 token cannot sign: \(e.reason)")
        case is NIOTooManyBytesError:
            return Problem(.contentTooLarge, code: "body-too-large", title: "Content Too Large", detail: "request bodies are limited to 64 KiB")
        case let e as HTTPError:
            if e.status == .contentTooLarge {
                return Problem(.contentTooLarge, code: "body-too-large", title: "Content Too Large", detail: "request bodies are limited to 64 KiB")
            }
            return Problem(e.status, code: "http-\(e.status.code)", title: e.status.reasonPhrase, detail: e.body ?? e.status.reasonPhrase)
        default:
            return Problem(.internalServerError, code: "internal", title: "Internal Server Error", detail: "unexpected error; see the server log")
        }
    }
}

/// Turns every thrown error into a problem+json response and logs refusals with their reason.
struct ProblemMiddleware<Context: RequestContext>: RouterMiddleware {
    func handle(_ request: Request, context: Context, next: (Request, Context) async throws -> Response) async throws -> Response {
        do {
            return try await next(request, context)
        } catch {
            let problem = Problem.from(error)
            if problem.status.code >= 500 {
                context.logger.error("request failed", metadata: ["path": "\(request.uri.path)", "error": "\(error)"])
            } else {
                context.logger.info("request refused", metadata: [
                    "path": "\(request.uri.path)", "status": "\(problem.status.code)",
                    "code": "\(problem.type.split(separator: ":").last ?? "unknown")", "reason": "\(problem.detail)",
                ])
            }
            throw problem
        }
    }
}
