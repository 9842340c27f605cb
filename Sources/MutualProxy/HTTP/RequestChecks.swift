import Foundation
import NIOHTTP1

/// A request the proxy answers itself, with a stable code (access log `code`, error body `error`) and words for
/// people (`reason`).
struct Refusal: Error, Equatable, Sendable {
    var status: HTTPResponseStatus
    var code: String
    var reason: String
    /// Close the connection after the answer (the client cannot be trusted to frame the next request, or its
    /// certificate is no longer valid). On HTTP/2 only the stream ends, unless `closesHTTP2Connection`.
    var closeConnection: Bool = false
    /// Also close an HTTP/2 connection (and its other streams): the connection itself is no longer acceptable.
    var closesHTTP2Connection: Bool = false
    /// The `WWW-Authenticate` challenge of an access-token refusal (RFC 6750 3).
    var wwwAuthenticate: String? = nil
}

/// The checks every request head passes before policy, in order: the connection's certificate is still valid, the
/// head is within the header limits, the method is one the proxy forwards, `Host` is unambiguous, and the target
/// normalizes (``RequestTarget``). Pure: no channel, no clock of its own; tested per case without sockets.
enum RequestChecks {
    static func check(head: HTTPRequestHead, peer: VerifiedPeer?, limits: ProxyLimits, now: Date) -> Result<RequestTarget, Refusal> {
        // A certificate that expired while its connection stayed open: refuse and close, as revocation does.
        if let peer, now > peer.validUntil {
            return .failure(Refusal(
                status: .unauthorized, code: "certificate_expired",
                reason: "the client certificate chain expired \(peer.validUntil.relativeDescription(from: now)) (notAfter \(peer.validUntil)); reconnect with a current certificate",
                closeConnection: true, closesHTTP2Connection: true
            ))
        }
        if head.headers.count > limits.maxHeaderCount {
            return .failure(Refusal(
                status: .requestHeaderFieldsTooLarge, code: "too_many_headers",
                reason: "the request has \(head.headers.count) header fields; at most \(limits.maxHeaderCount) are accepted",
                closeConnection: true
            ))
        }
        var bytes = 0
        for (name, value) in head.headers { bytes += name.utf8.count + value.utf8.count }
        if bytes > limits.maxHeaderBytes {
            return .failure(Refusal(
                status: .requestHeaderFieldsTooLarge, code: "headers_too_large",
                reason: "the request's header fields take \(bytes) bytes; at most \(limits.maxHeaderBytes) are accepted",
                closeConnection: true
            ))
        }
        if head.method == .CONNECT {
            return .failure(Refusal(status: .methodNotAllowed, code: "connect_not_supported", reason: "CONNECT is not proxied"))
        }
        let hosts = head.headers["host"]
        if hosts.count > 1 {
            // HTTP/2 clients that send `host` beside `:authority` arrive here with both (see HTTP2RequestGuard).
            return .failure(Refusal(
                status: .badRequest, code: "duplicate_host", reason: "the request carries \(hosts.count) Host fields (RFC 9112 3.2)",
                closeConnection: head.version.major < 2
            ))
        }
        if hosts.isEmpty && head.version == .http1_1 {
            return .failure(Refusal(status: .badRequest, code: "missing_host", reason: "an HTTP/1.1 request needs a Host field (RFC 9112 3.2)", closeConnection: true))
        }
        if let host = hosts.first, !isValidHost(host) {
            return .failure(Refusal(status: .badRequest, code: "invalid_host", reason: "the Host field is not a valid host[:port]"))
        }
        switch RequestTarget.parse(head.uri) {
        case .success(let target):
            return .success(target)
        case .failure(let refusal):
            return .failure(Refusal(status: .badRequest, code: refusal.code, reason: refusal.reason))
        }
    }

    /// `host[:port]` (RFC 3986 authority without userinfo): reg-name characters, an IP literal in brackets, digits.
    static func isValidHost(_ value: String) -> Bool {
        guard !value.isEmpty, value.utf8.count <= 255 else { return false }
        return value.utf8.allSatisfy { byte in
            (byte >= UInt8(ascii: "a") && byte <= UInt8(ascii: "z")) || (byte >= UInt8(ascii: "A") && byte <= UInt8(ascii: "Z"))
                || (byte >= UInt8(ascii: "0") && byte <= UInt8(ascii: "9")) || "-._~:[]!$&'()*+=%".utf8.contains(byte)
        }
    }
}
