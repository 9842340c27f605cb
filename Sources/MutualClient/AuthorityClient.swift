import AsyncHTTPClient
import Foundation
import MutualPKI
import NIOCore
import NIOHTTP1
import NIOSSL
import X509

/// A refusal or failure reported by the authority (its RFC 9457 problem), or a transport failure (status 0).
public struct AuthorityClientError: Error, Sendable, CustomStringConvertible {
    public var status: Int
    public var type: String
    public var detail: String
    /// The authority's `Date` header, when it answered (for clock-skew checks).
    public var serverDate: Date?
    /// The problem's extension members (`key_type` of `key-type-required`).
    public var members: [String: String] = [:]

    public var description: String {
        status == 0 ? "authority unreachable: \(detail)" : "authority refused (\(status) \(type)): \(detail)"
    }

    /// The problem code (`certificate-revoked`, `clock-skew`, …: the part of `type` after `urn:mutual:problem:`), or
    /// `transport` when the authority did not answer. Programs branch on this, never on `detail`.
    public var code: String {
        if status == 0 { return "transport" }
        let prefix = "urn:mutual:problem:"
        return type.hasPrefix(prefix) ? String(type.dropFirst(prefix.count)) : type
    }

    /// For a transport failure inside TLS: BoringSSL's reason code, lower-cased (`sslv3_alert_certificate_expired`,
    /// `certificate_verify_failed`, …) — the library's stable identifier, not prose.
    public var tlsReason: String? {
        status == 0 ? Self.tlsReason(in: detail) : nil
    }

    /// BoringSSL's last reason code in an error description, lower-cased, or nil.
    public static func tlsReason(in text: String) -> String? {
        TLSReasonCodes.last(in: text)
    }
}

/// What the authority returns for `/v1/sign`, `/v1/renew` and `/v1/renew-expired`.
public struct Enrollment: Sendable {
    /// Classical or ML-DSA: the CSR's key decides.
    public var certificate: AnyCertificate
    public var chain: [AnyCertificate]
    public var serial: String
    public var notAfter: Date
    /// How the authority will renew this certificate (`mtls` or `proof`); nil from an authority that does not say.
    public var renewal: String?
    /// The authority's `Date` header.
    public var serverDate: Date?

    public init(certificate: AnyCertificate, chain: [AnyCertificate], serial: String, notAfter: Date, renewal: String?, serverDate: Date?) {
        self.certificate = certificate
        self.chain = chain
        self.serial = serial
        self.notAfter = notAfter
        self.renewal = renewal
        self.serverDate = serverDate
    }
}

/// The project's own client for the authority API, over HTTPS with an optional client certificate (mTLS).
///
/// Owns an `HTTPClient`: call ``shutdown()`` when done.
public final class AuthorityClient: Sendable {
    let http: HTTPClient
    public let baseURL: String
    /// Deadline of one request, connection attempts included (a refused connection is retried until then).
    let requestTimeout: Duration

    /// - Parameters:
    ///   - trustRoots: the roots the authority's server certificate must chain to (never the system store).
    ///   - identity: the client certificate chain and key for mTLS endpoints.
    public convenience init(baseURL: String, trustRoots: [Certificate], identity: (chain: [Certificate], key: Certificate.PrivateKey)? = nil,
                            timeout: Duration = .seconds(30)) throws {
        try self.init(
            baseURL: baseURL, trustRoots: trustRoots.map { AnyCertificate.classical($0) },
            anyIdentity: identity.map { ($0.chain.map { AnyCertificate.classical($0) }, AnySigningKey.classical($0.key)) }, timeout: timeout
        )
    }

    /// The same with an identity of either family (an ML-DSA client certificate renews over mTLS like any other).
    public init(baseURL: String, trustRoots: [AnyCertificate], anyIdentity identity: (chain: [AnyCertificate], key: AnySigningKey)? = nil,
                timeout: Duration = .seconds(30)) throws {
        var tls = TLSConfiguration.makeClientConfiguration()
        tls.minimumTLSVersion = .tlsv12
        tls.verifySignatureAlgorithms = TLSSignatureAlgorithms.all
        tls.signingSignatureAlgorithms = TLSSignatureAlgorithms.all
        tls.trustRoots = .certificates(try trustRoots.map { try NIOSSLCertificate(bytes: try $0.der, format: .der) })
        if let identity {
            tls.certificateChain = try identity.chain.map { .certificate(try NIOSSLCertificate(bytes: try $0.der, format: .der)) }
            tls.privateKey = .privateKey(try identity.key.tlsPrivateKey())
        }
        var configuration = HTTPClient.Configuration(tlsConfiguration: tls)
        let seconds = Int64(timeout.components.seconds)
        configuration.timeout = .init(connect: .seconds(min(seconds, 10)), read: .seconds(seconds))
        self.http = HTTPClient(eventLoopGroupProvider: .singleton, configuration: configuration)
        self.baseURL = baseURL.hasSuffix("/") ? String(baseURL.dropLast()) : baseURL
        self.requestTimeout = timeout
    }

    public func shutdown() async throws {
        try await http.shutdown()
    }

    public func sign(csrPEM: String, token: String, profile: String? = nil, validity: String? = nil) async throws -> Enrollment {
        var body: [String: String] = ["csr": csrPEM]
        if let profile { body["profile"] = profile }
        if let validity { body["validity"] = validity }
        return try await enrollment(path: "/v1/sign", body: body, bearer: token)
    }

    public func renew(csrPEM: String) async throws -> Enrollment {
        try await enrollment(path: "/v1/renew", body: ["csr": csrPEM], bearer: nil)
    }

    /// Renews a current certificate that cannot be a TLS client (no clientAuth EKU: a server certificate) with a proof
    /// of possession of its key, over server-authenticated TLS (see docs/api.md).
    public func renewByProof(certificate: Certificate, key: Certificate.PrivateKey, csr: CertificateSigningRequest, now: Date = .now) async throws -> Enrollment {
        try await renewByProof(certificate: .classical(certificate), key: .classical(key), csr: try Self.encoded(csr), now: now)
    }

    /// Either family: `csr` is the new request's DER and PEM (``AnySigningKey/certificationRequest(subject:names:)``).
    public func renewByProof(certificate: AnyCertificate, key: AnySigningKey, csr: (der: [UInt8], pem: String), now: Date = .now) async throws -> Enrollment {
        try await enrollment(path: "/v1/renew", body: try Self.proofBody(purpose: "mutual-renew-v1", certificate: certificate, key: key, csr: csr, now: now), bearer: nil)
    }

    /// Renews an expired certificate with proof of possession of its key (see docs/api.md).
    public func renewExpired(certificate: Certificate, oldKey: Certificate.PrivateKey, csr: CertificateSigningRequest, now: Date = .now) async throws -> Enrollment {
        try await renewExpired(certificate: .classical(certificate), oldKey: .classical(oldKey), csr: try Self.encoded(csr), now: now)
    }

    public func renewExpired(certificate: AnyCertificate, oldKey: AnySigningKey, csr: (der: [UInt8], pem: String), now: Date = .now) async throws -> Enrollment {
        try await enrollment(path: "/v1/renew-expired", body: try Self.proofBody(purpose: "mutual-renew-expired-v1", certificate: certificate, key: oldKey, csr: csr, now: now), bearer: nil)
    }

    static func encoded(_ csr: CertificateSigningRequest) throws -> (der: [UInt8], pem: String) {
        var serializer = DER.Serializer()
        try serializer.serialize(csr)
        return (serializer.serializedBytes, try csr.serializeAsPEM().pemString)
    }

    /// `{certificate, csr, timestamp, signature}`: the key signs `<purpose>\n<timestamp>\n<hex SHA-256 of the CSR's DER>`
    /// (ECDSA, Ed25519 or RSA for a classical key, ML-DSA for an ML-DSA one).
    static func proofBody(purpose: String, certificate: AnyCertificate, key: AnySigningKey, csr: (der: [UInt8], pem: String), now: Date) throws -> [String: String] {
        let timestamp = now.formatted(.iso8601)
        let statement = Array("\(purpose)\n\(timestamp)\n\(sha256Hex(csr.der))".utf8)
        return [
            "certificate": PEMCodec.encode(try certificate.der, label: "CERTIFICATE"), "csr": csr.pem,
            "timestamp": timestamp, "signature": Data(try key.proofSignature(statement)).base64EncodedString(),
        ]
    }

    public func revoke(serial: String, reason: String) async throws {
        _ = try await send(path: "/v1/revoke", method: .POST, body: ["serial": serial, "reason": reason], bearer: nil)
    }

    /// The CRLs of every CA level, root first (`/crls.pem`): what nginx's `ssl_crl` wants.
    public func chainCRLs() async throws -> [UInt8] {
        try await send(path: "/crls.pem", method: .GET, body: nil, bearer: nil).0
    }

    /// The authority's clock (its `Date` header on `/healthz`), over this client's verified connection.
    public func serverTime() async throws -> Date? {
        try await send(path: "/healthz", method: .GET, body: nil, bearer: nil).1
    }

    /// The authority's clock as it answers without verifying its certificate: only to explain a verification failure
    /// ("this host's clock is 3 h behind"), never to schedule anything.
    public static func unverifiedServerTime(baseURL: String, timeout: Duration = .seconds(10)) async -> Date? {
        let url = (baseURL.hasSuffix("/") ? String(baseURL.dropLast()) : baseURL) + "/healthz"
        return try? await unverifiedGET(url, timeout: timeout, limit: 64 * 1024).date
    }

    /// A GET whose server is not verified: for the two answers that need no trust or come before it exists — the
    /// `Date` that explains a verification failure, and `/roots.pem`, which the caller checks against a pinned
    /// fingerprint. Status, `Date` header and body (at most `limit` bytes).
    public static func unverifiedGET(_ url: String, timeout: Duration, limit: Int) async throws -> (status: Int, date: Date?, body: [UInt8]) {
        var tls = TLSConfiguration.makeClientConfiguration()
        tls.certificateVerification = .none
        var configuration = HTTPClient.Configuration(tlsConfiguration: tls)
        configuration.timeout = .init(connect: .seconds(min(10, max(1, timeout.components.seconds))), read: .seconds(max(1, timeout.components.seconds)))
        let http = HTTPClient(eventLoopGroupProvider: .singleton, configuration: configuration)
        defer { Task { try? await http.shutdown() } }
        let response = try await http.execute(HTTPClientRequest(url: url), timeout: .seconds(max(1, timeout.components.seconds)))
        let body = try await response.body.collect(upTo: limit)
        return (Int(response.status.code), response.headers.first(name: "date").flatMap { parseHTTPDate($0) }, Array(body.readableBytesView))
    }

    /// The authority's published CA certificates (`/bundle.pem`: roots, then issuing CAs, during a rotation the
    /// prepared and the replaced ones and a cross-certificate), over this verified connection.
    public func bundle() async throws -> [Certificate] {
        let (bytes, _) = try await send(path: "/bundle.pem", method: .GET, body: nil, bearer: nil)
        return try PEMBundle.certificates(fromBytes: bytes, what: "bundle.pem")
    }

    /// The issuing CA in use (`GET /v1/ca`), and whether an operator asked certificates of other CAs to renew now
    /// (`mutual ca rotate … --stage activate --renew-now`).
    public func issuingCA() async throws -> (issuer: String, renewNow: Bool) {
        let (bytes, _) = try await send(path: "/v1/ca", method: .GET, body: nil, bearer: nil)
        guard let object = try? JSONSerialization.jsonObject(with: Data(bytes)) as? [String: Any], let issuer = object["issuing_ca"] as? String else {
            throw AuthorityClientError(status: 0, type: "malformed-answer", detail: "/v1/ca did not answer with issuing_ca")
        }
        return (issuer, (object["renew_now"] as? String) == "true")
    }

    /// The authority's trust anchors (`/roots.pem`).
    public func roots() async throws -> [Certificate] {
        let (bytes, _) = try await send(path: "/roots.pem", method: .GET, body: nil, bearer: nil)
        return try PEMBundle.certificates(fromBytes: bytes, what: "roots.pem")
    }

    /// Every trust anchor: the classical root and, when the authority has one, the ML-DSA root (`/pq/roots.pem`),
    /// over this verified connection.
    public func allRoots() async throws -> [AnyCertificate] {
        do {
            let (bytes, _) = try await send(path: "/pq/roots.pem", method: .GET, body: nil, bearer: nil)
            return try PEMBundle.anyCertificates(fromBytes: bytes, what: "pq/roots.pem")
        } catch let error as AuthorityClientError where error.status == 404 {
            return try await roots().map { .classical($0) }
        }
    }

    /// RFC 8705 `client_credentials` with this client's certificate: the token endpoint's JSON answer
    /// (`access_token`, `expires_in`, `scope`). Refusals carry the OAuth `error` in `members` and Mutual's code as type.
    public func accessToken(audience: String?, scopes: [String]) async throws -> [String: Any] {
        var form = [("grant_type", "client_credentials")]
        if let audience { form.append(("audience", audience)) }
        if !scopes.isEmpty { form.append(("scope", scopes.joined(separator: " "))) }
        return try await postForm(path: "/oauth2/token", form: form)
    }

    /// RFC 7662 introspection (the admin certificate, or one the authority lets introspect).
    public func introspect(token: String) async throws -> [String: Any] {
        try await postForm(path: "/oauth2/introspect", form: [("token", token)])
    }

    func postForm(path: String, form: [(String, String)]) async throws -> [String: Any] {
        var allowed = CharacterSet.alphanumerics
        allowed.insert(charactersIn: "-._~")
        let body = form.map { "\($0.0)=\($0.1.addingPercentEncoding(withAllowedCharacters: allowed) ?? "")" }.joined(separator: "&")
        var request = HTTPClientRequest(url: baseURL + path)
        request.method = .POST
        request.headers.add(name: "Content-Type", value: "application/x-www-form-urlencoded")
        request.body = .bytes(ByteBuffer(string: body))
        let response: HTTPClientResponse
        do {
            response = try await http.execute(request, timeout: .seconds(Int64(requestTimeout.components.seconds)))
        } catch {
            throw AuthorityClientError(status: 0, type: "transport", detail: "\(error)", serverDate: nil)
        }
        let bytes = Array(try await response.body.collect(upTo: 1024 * 1024).readableBytesView)
        let object = (try? JSONSerialization.jsonObject(with: Data(bytes))) as? [String: Any]
        guard (200..<300).contains(Int(response.status.code)), let object else {
            throw AuthorityClientError(
                status: Int(response.status.code), type: (object?["code"] as? String) ?? "http-\(response.status.code)",
                detail: (object?["error_description"] as? String) ?? String(decoding: bytes.prefix(200), as: UTF8.self), serverDate: nil,
                members: (object?["error"] as? String).map { ["error": $0] } ?? [:]
            )
        }
        return object
    }

    func enrollment(path: String, body: [String: String], bearer: String?) async throws -> Enrollment {
        let (bytes, date) = try await send(path: path, method: .POST, body: body, bearer: bearer)
        guard let object = try? JSONSerialization.jsonObject(with: Data(bytes)) as? [String: Any],
            let certificatePEM = object["certificate"] as? String, let chainPEM = object["chain"] as? String,
            let serial = object["serial"] as? String
        else {
            throw AuthorityClientError(status: 0, type: "malformed-response", detail: "the authority's answer is not an enrollment", serverDate: date)
        }
        let certificate = try PEMBundle.anyCertificates(fromBytes: Array(certificatePEM.utf8))[0]
        return Enrollment(certificate: certificate, chain: try PEMBundle.anyCertificates(fromBytes: Array(chainPEM.utf8)), serial: serial,
                          notAfter: certificate.notValidAfter, renewal: object["renewal"] as? String, serverDate: date)
    }

    func send(path: String, method: HTTPMethod, body: [String: String]?, bearer: String?) async throws -> ([UInt8], Date?) {
        var request = HTTPClientRequest(url: baseURL + path)
        request.method = method
        if let body {
            request.headers.add(name: "Content-Type", value: "application/json")
            request.body = .bytes(ByteBuffer(bytes: try JSONSerialization.data(withJSONObject: body)))
        }
        if let bearer { request.headers.add(name: "Authorization", value: "Bearer \(bearer)") }
        let response: HTTPClientResponse
        do {
            response = try await http.execute(request, timeout: .seconds(Int64(requestTimeout.components.seconds)))
        } catch {
            throw AuthorityClientError(status: 0, type: "transport", detail: "\(error)", serverDate: nil)
        }
        let date = response.headers.first(name: "date").flatMap { Self.parseHTTPDate($0) }
        let buffer = try await response.body.collect(upTo: 4 * 1024 * 1024)
        let bytes = Array(buffer.readableBytesView)
        guard (200..<300).contains(Int(response.status.code)) else {
            let problem = (try? JSONSerialization.jsonObject(with: Data(bytes))) as? [String: Any]
            var members: [String: String] = [:]
            for (name, value) in problem ?? [:] where !["type", "title", "status", "detail"].contains(name) {
                if let text = value as? String { members[name] = text }
            }
            throw AuthorityClientError(
                status: Int(response.status.code), type: (problem?["type"] as? String) ?? "http-\(response.status.code)",
                detail: (problem?["detail"] as? String) ?? String(decoding: bytes.prefix(200), as: UTF8.self), serverDate: date,
                members: members
            )
        }
        return (bytes, date)
    }

    /// Parses an IMF-fixdate (`Sun, 06 Nov 1994 08:49:37 GMT`), the form of HTTP's `Date` header.
    public static func parseHTTPDate(_ text: String) -> Date? {
        let formatter = DateFormatter()
        formatter.locale = Locale(identifier: "en_US_POSIX")
        formatter.timeZone = TimeZone(identifier: "GMT")
        formatter.dateFormat = "EEE, dd MMM yyyy HH:mm:ss zzz"
        return formatter.date(from: text)
    }
}

import Crypto
import SwiftASN1

func sha256Hex(_ bytes: [UInt8]) -> String {
    SHA256.hash(data: bytes).hexString
}
