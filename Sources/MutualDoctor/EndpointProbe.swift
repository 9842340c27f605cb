import Foundation
import MutualClient
import MutualPKI
import NIOCore
import NIOPosix
import NIOSSL
import Synchronization
import X509

/// `mutual doctor https://host:port`: connects as a client, keeps whatever the server presents (verification is done
/// afterwards, by the same checks as `doctor files`, so one mistake does not hide the others), sends one HTTP request
/// to read the server's clock, and turns every failure — a TLS alert, a closed connection, a timeout — into a finding
/// with a code.
public struct EndpointProbe: Sendable {
    public struct Options: Sendable {
        public var host: String
        public var port: Int
        /// SNI and the name checked against the server's SANs (default: the URL's host when it is a name).
        public var serverName: String?
        public var clientChain: [Certificate]?
        public var clientKey: Certificate.PrivateKey?
        public var roots: [Certificate]?
        public var expectedIdentity: String?
        public var timeout: Duration = .seconds(10)
        public var checkRevocation = true

        public init(host: String, port: Int) {
            self.host = host
            self.port = port
        }
    }

    /// What was seen on the wire.
    public struct Observation: Sendable {
        public var connectError: String?
        /// The certificates the server presented, in the order it sent them.
        public var presented: [Certificate] = []
        /// BoringSSL reason codes of the TLS failure, if any (upper case, as BoringSSL names them).
        public var tlsReasons: Set<String> = []
        public var tlsError: String?
        public var timedOut = false
        public var httpStatus: Int?
        /// The start of the answer's body (up to 4 KiB).
        public var httpBody: String?
        /// The server's `Date` header.
        public var serverDate: Date?
        /// Local time when the answer arrived.
        public var answeredAt: Date?
        /// The server's CertificateRequest, read from a TLS 1.2 flight: whether it asks for a client certificate, and
        /// from which CAs. Nil when not read (a TLS 1.3-only server, or nothing made it worth asking).
        public var clientCertificateRequest: CertificateRequestReader.Outcome?

        public init() {}
    }

    public var options: Options

    public init(options: Options) { self.options = options }

    /// Connects, handshakes, asks `GET /`, and records what happened. Bounded by `options.timeout`.
    public func observe() async -> Observation {
        var tls = TLSConfiguration.makeClientConfiguration()
        tls.minimumTLSVersion = .tlsv12
        tls.certificateVerification = .noHostnameVerification  // replaced by the callback: keep everything, judge later
        var observation = Observation()
        do {
            if let chain = options.clientChain, let key = options.clientKey {
                tls.certificateChain = try chain.map { .certificate(try NIOSSLCertificate(bytes: try $0.derBytes, format: .der)) }
                tls.privateKey = .privateKey(try NIOSSLPrivateKey(bytes: Array(try KeyFile.pem(for: key, passphrase: nil).utf8), format: .pem))
            }
        } catch {
            observation.connectError = "cannot use the client certificate: \(error)"
            return observation
        }
        let context: NIOSSLContext
        do {
            context = try NIOSSLContext(configuration: tls)
        } catch {
            observation.connectError = "cannot build a TLS client: \(error)"
            return observation
        }
        let collector = Collector()
        let sniffer = CertificateRequestSniffer(closeWhenKnown: false)
        let sni = self.sni
        let hostHeader = sni ?? options.host
        let timeout = options.timeout
        do {
            let channel = try await ClientBootstrap(group: MultiThreadedEventLoopGroup.singleton)
                .connectTimeout(.nanoseconds(Int64(timeout.components.seconds) * 1_000_000_000 + timeout.components.attoseconds / 1_000_000_000))
                .channelInitializer { channel in
                    channel.eventLoop.makeCompletedFuture {
                        let handler = try NIOSSLClientHandler(context: context, serverHostname: sni, customVerificationCallbackWithMetadata: { presented, promise in
                            collector.presented(presented.compactMap { try? Certificate(derEncoded: try $0.toDERBytes()) })
                            promise.succeed(.certificateVerified(.init(nil)))
                        })
                        try channel.pipeline.syncOperations.addHandlers([sniffer, handler, collector])
                    }
                }
                .connect(host: options.host, port: options.port).get()
            let request = "GET / HTTP/1.1\r\nHost: \(hostHeader)\r\nUser-Agent: mutual-doctor\r\nConnection: close\r\n\r\n"
            channel.writeAndFlush(ByteBuffer(string: request), promise: nil)
            // The whole exchange is bounded: past the deadline the connection is closed, which ends the wait below.
            let expired = Mutex(false)
            let timer = Task {
                try await Task.sleep(for: timeout)
                expired.withLock { $0 = true }
                channel.close(promise: nil)
            }
            try? await channel.closeFuture.get()
            timer.cancel()
            observation.timedOut = expired.withLock { $0 }
        } catch {
            observation.connectError = Self.describeConnect(error)
            return observation
        }
        collector.fill(&observation)
        if case .unreadable = sniffer.reader.outcome {} else { observation.clientCertificateRequest = sniffer.reader.outcome }
        // A TLS 1.3 server encrypts its CertificateRequest: when a client certificate is in play, ask again with
        // TLS 1.2 for the CA names it accepts (a server without TLS 1.2 leaves this unknown).
        let clientTrouble = options.clientChain != nil || observation.httpStatus == 400 || !observation.tlsReasons.isEmpty
        if observation.clientCertificateRequest == nil, !observation.presented.isEmpty, clientTrouble {
            observation.clientCertificateRequest = await readCertificateRequest()
        }
        return observation
    }

    var sni: String? { options.serverName ?? ((try? Names.ipAddressBytes(options.host)) == nil ? options.host : nil) }

    /// A TLS 1.2 handshake without a client certificate, read only as far as the server's CertificateRequest (or
    /// ServerHelloDone), then closed. Bounded by `options.timeout`.
    func readCertificateRequest() async -> CertificateRequestReader.Outcome? {
        var tls = TLSConfiguration.makeClientConfiguration()
        tls.minimumTLSVersion = .tlsv12
        tls.maximumTLSVersion = .tlsv12
        tls.certificateVerification = .none
        guard let context = try? NIOSSLContext(configuration: tls) else { return nil }
        let sniffer = CertificateRequestSniffer(closeWhenKnown: true)
        let sni = self.sni
        let timeout = options.timeout
        guard let channel = try? await ClientBootstrap(group: MultiThreadedEventLoopGroup.singleton)
            .connectTimeout(.seconds(max(1, timeout.components.seconds)))
            .channelInitializer({ channel in
                channel.eventLoop.makeCompletedFuture {
                    try channel.pipeline.syncOperations.addHandlers([sniffer, try NIOSSLClientHandler(context: context, serverHostname: sni), Collector()])
                }
            })
            .connect(host: options.host, port: options.port).get()
        else { return nil }
        let timer = Task {
            try await Task.sleep(for: timeout)
            channel.close(promise: nil)
        }
        try? await channel.closeFuture.get()
        timer.cancel()
        return sniffer.reader.outcome
    }

    static func describeConnect(_ error: any Error) -> String {
        if let io = error as? IOError { return String(cString: strerror(io.errnoCode)).lowercased() }
        if error is ChannelError { return "connection timed out" }
        return "\(error)"
    }

    /// Turns an observation into findings. `now` is this host's clock.
    public func diagnose(_ observation: Observation, now: Date) async -> Diagnosis {
        let subject = "\(options.host):\(options.port)"
        if let error = observation.connectError {
            return Diagnosis([Finding("unreachable", .error, subject: subject, "cannot connect: \(error)", fix: "check the host, the port and the firewall; is the server running?")])
        }
        var findings: [Finding] = []
        let reasons = observation.tlsReasons
        let sentClientCertificate = options.clientChain != nil
        func has(_ codes: String...) -> Bool { codes.contains { reasons.contains($0) } }

        if observation.presented.isEmpty {
            if has("WRONG_VERSION_NUMBER", "HTTP_REQUEST") {
                findings.append(Finding("not-tls", .error, subject: subject, "the port does not speak TLS (plain HTTP, or another protocol)", fix: "use http:// or the TLS port"))
            } else if has("TLSV1_ALERT_PROTOCOL_VERSION", "UNSUPPORTED_PROTOCOL", "NO_SUPPORTED_VERSIONS_ENABLED") {
                findings.append(Finding("no-common-protocol", .error, subject: subject, "the server and this client share no TLS version (this client speaks TLS 1.2 and 1.3)", fix: "enable TLS 1.2 or 1.3 on the server"))
            } else if has("SSLV3_ALERT_HANDSHAKE_FAILURE", "NO_SHARED_CIPHER", "NO_SHARED_GROUP", "NO_CIPHER_MATCH") {
                findings.append(Finding("no-common-protocol", .error, subject: subject, "the server refused the handshake before sending its certificate: no cipher suite, group or signature algorithm in common (\(reasons.sorted().joined(separator: ", ")))", fix: "allow modern suites on the server (TLS 1.3, or TLS 1.2 ECDHE with AES-GCM/ChaCha20) and a certificate key the client supports"))
            } else if observation.timedOut {
                findings.append(Finding("timeout", .error, subject: subject, "no TLS answer within \(options.timeout)", fix: "check that the port is the TLS port and that the server is not overloaded"))
            } else {
                findings.append(Finding("handshake-failed", .error, subject: subject, "the TLS handshake failed before the server sent a certificate: \(observation.tlsError ?? "the connection closed")", fix: nil))
            }
            return Diagnosis(findings)
        }

        // The server's certificate, judged as a TLS client would (purpose server, the name we asked for).
        var server = FileChecks(presented: observation.presented)
        server.certPath = "server certificate"
        server.roots = options.roots
        server.purpose = .server
        if let name = sni { server.dnsName = name }
        server.expectedIdentity = options.expectedIdentity
        findings += await server.run(now: now).findings
        if options.roots == nil {
            findings.append(Finding("trust-unchecked", .info, subject: subject, "no --ca given: whether the chain leads to a trusted root was not checked", fix: "give --ca ROOTS.pem (the authority's roots.pem)"))
        }

        // What the server asks for, before it judges anything: the CAs of its CertificateRequest.
        if case .requested(let names) = observation.clientCertificateRequest, !names.isEmpty {
            let accepted = names.map(\.description).joined(separator: "; ")
            if let chain = options.clientChain {
                if !chain.contains(where: { names.contains($0.issuer) || names.contains($0.subject) }) {
                    findings.append(Finding(
                        "client-ca-mismatch", .error, subject: "client certificate",
                        "the server asks for a client certificate issued by \(accepted); ours is issued by \(chain[0].issuer)\(chain.count > 1 ? " under \(chain.last!.issuer)" : ""): it will not be accepted (many clients do not even send it)",
                        fix: "add our CA (the authority's roots.pem) to the server's client-CA file (nginx ssl_client_certificate, mutual proxy --client-ca), or use a certificate from a CA it accepts"
                    ))
                }
            } else {
                findings.append(Finding("client-cert-requested", .info, subject: subject, "the server asks for a client certificate issued by \(accepted)", fix: "pass --cert CHAIN.pem --key KEY.pem to test with one"))
            }
        }

        // Our client certificate: what the server said about it, and what is wrong with it locally.
        if has("TLSV13_ALERT_CERTIFICATE_REQUIRED", "TLSV1_ALERT_CERTIFICATE_REQUIRED") || (!sentClientCertificate && has("SSLV3_ALERT_HANDSHAKE_FAILURE", "PEER_DID_NOT_RETURN_A_CERTIFICATE")) {
            findings.append(Finding("client-cert-required", .error, subject: subject, "the server requires a client certificate and none was sent", fix: "pass --cert CHAIN.pem --key KEY.pem (the agent's chain.pem and key.pem)"))
        } else if has("TLSV1_ALERT_UNKNOWN_CA") {
            if !findings.contains(where: { $0.code == "client-ca-mismatch" }) { findings.append(Finding("client-ca-mismatch", .error, subject: "client certificate", "the server does not trust the CA that issued our client certificate (alert unknown_ca)", fix: "add our root (and intermediate, for leaf-only clients) to the server's client-CA file, or use a certificate from the CA the server trusts")) }
        } else if has("SSLV3_ALERT_CERTIFICATE_EXPIRED") {
            if let chain = options.clientChain, clientChainLooksValid(now) {
                // Valid here: OpenSSL servers (nginx) send the same alert for a CRL past its nextUpdate.
                findings.append(Finding(
                    "client-cert-refused", .error, subject: "client certificate",
                    "the server refused our client certificate as expired (alert certificate_expired), but by this host's clock it and its chain are valid (until \(chain[0].notValidAfter)): either the server's clock is wrong, or its CRL for our CA is past nextUpdate (OpenSSL and nginx send this alert for a stale CRL too)",
                    fix: "check the server's clock, and its CRL file: `mutual doctor files --cert CHAIN.pem --ca ROOTS.pem --crl THE_SERVER_CRL`; keep it fresh with `mutual agent --crl-out FILE`"
                ))
            } else {
                findings.append(Finding("expired", .error, subject: "client certificate", "the server refused our client certificate as expired (alert certificate_expired)\(clientExpiryHint(now))", fix: "renew it (mutual agent), or check the server's clock"))
            }
        } else if has("SSLV3_ALERT_CERTIFICATE_REVOKED") {
            findings.append(Finding("revoked", .error, subject: "client certificate", "the server refused our client certificate as revoked (alert certificate_revoked)", fix: "enroll again with a new token once the cause of the revocation is fixed"))
        } else if has("SSLV3_ALERT_UNSUPPORTED_CERTIFICATE") {
            findings.append(Finding("wrong-eku", .error, subject: "client certificate", "the server refused our client certificate's purpose (alert unsupported_certificate): it lacks clientAuth", fix: "use a client or workload certificate"))
        } else if has("SSLV3_ALERT_BAD_CERTIFICATE", "SSLV3_ALERT_CERTIFICATE_UNKNOWN", "TLSV1_ALERT_ACCESS_DENIED") {
            findings.append(Finding("client-cert-refused", .error, subject: "client certificate", "the server refused our client certificate without saying why (\(reasons.sorted().joined(separator: ", ")))", fix: "check the server's log; run `mutual doctor files` on the client certificate"))
        } else if observation.httpStatus == 400, let page = observation.httpBody, page.contains("No required SSL certificate was sent") {
            // nginx completes the handshake and refuses in HTTP; its fixed page titles are the only codes it gives.
            findings.append(Finding("client-cert-required", .error, subject: subject, "the server (nginx) requires a client certificate and none was sent (400 No required SSL certificate was sent)", fix: "pass --cert CHAIN.pem --key KEY.pem (the agent's chain.pem and key.pem)"))
        } else if observation.httpStatus == 400, let page = observation.httpBody, page.contains("The SSL certificate error") {
            if !findings.contains(where: { $0.code == "client-ca-mismatch" }) {
                findings.append(Finding(
                    "client-cert-refused", .error, subject: "client certificate",
                    "the server (nginx) verified our client certificate after the handshake and refused it (400 The SSL certificate error); by this host it is \(clientChainLooksValid(now) ? "valid, so the cause is on the server: its client-CA file, its CRL (ssl_crl past nextUpdate) or its clock" : "not valid: see the findings below")",
                    fix: "nginx's error log names the reason (\"client SSL certificate verify error\"); check ssl_client_certificate and ssl_crl"
                ))
            }
        } else if observation.tlsError != nil, observation.httpStatus == nil {
            findings.append(Finding("handshake-failed", .error, subject: subject, "the connection failed after the server's certificate: \(observation.tlsError ?? "")", fix: nil))
        }
        if let chain = options.clientChain {
            var client = FileChecks(presented: chain)
            client.certPath = "client certificate"
            client.keyPath = "client key"
            client.key = options.clientKey
            client.purpose = .client
            if options.checkRevocation, let outcome = await CRLClient.fetch(for: chain[0], timeout: options.timeout) {
                findings += Self.apply(outcome, to: &client, subject: "client certificate")
            }
            findings += await client.run(now: now).findings.filter { finding in !findings.contains { $0.code == finding.code && $0.subject == finding.subject } }
        }

        // The server's clock, from its answer.
        if let serverDate = observation.serverDate, let at = observation.answeredAt {
            let gap = serverDate.timeIntervalSince(at)
            if abs(gap) > 60 {
                findings.append(Finding(
                    "clock-skew", .warning, subject: subject,
                    "this host's clock is \(humanDuration(gap)) \(gap > 0 ? "behind" : "ahead of") the server's (server Date \(serverDate), here \(at)): certificates will look not yet valid or expired to one side",
                    fix: "fix the clock that is wrong (NTP); Mutual's agent follows the authority's clock meanwhile"
                ))
            }
        }

        // The CRL the server's certificate names, as a client that enforces CRLs would judge it.
        if options.checkRevocation, let outcome = await CRLClient.fetch(for: observation.presented[0], timeout: options.timeout) {
            var crlChecks = FileChecks(presented: observation.presented)
            crlChecks.certPath = "server certificate"
            crlChecks.roots = options.roots
            findings += Self.apply(outcome, to: &crlChecks, subject: "server certificate")
            findings += crlChecks.crlFindings(observation.presented[0], now: now).filter { finding in !findings.contains { $0.code == finding.code && $0.subject == finding.subject } }
        }

        // Revocation of the server's certificate, through the OCSP URL it names.
        if options.checkRevocation, observation.presented.count >= 2, let url = Self.ocspURL(observation.presented[0]) {
            switch await OCSPClient.check(leaf: observation.presented[0], issuer: observation.presented[1], url: url, now: now) {
            case .good:
                break
            case .revoked(let time, let reason):
                // Said once, whether the CRL or OCSP said it first.
                if findings.contains(where: { $0.code == "revoked" && $0.subject == "server certificate" }) { break }
                findings.append(Finding("revoked", .error, subject: "server certificate", "the server's certificate was revoked at \(time)\(reason.map { " (\($0.rawValue))" } ?? "") (OCSP \(url))", fix: "the server needs a new certificate"))
            case .failed(let why):
                findings.append(Finding("revocation-unchecked", .warning, subject: "server certificate", "revocation could not be checked at \(url): \(why)", fix: "make the OCSP/CRL URL reachable from clients (mutual config --http-public-url)"))
            }
        }
        return Diagnosis(findings)
    }

    /// Puts fetched CRLs into `checks`; a CRL that could not be fetched is a finding of its own.
    static func apply(_ outcome: CRLClient.Outcome, to checks: inout FileChecks, subject: String) -> [Finding] {
        switch outcome {
        case .fetched(let url, let crls):
            checks.crls = crls
            checks.crlPath = url
            checks.crlsCoverEveryLevel = false
            return []
        case .failed(let url, let reason):
            return [Finding("revocation-unchecked", .warning, subject: subject, "the CRL at \(url) could not be fetched: \(reason)", fix: "make the CRL URL reachable from every relying party (mutual config --http-public-url)")]
        }
    }

    func clientChainLooksValid(_ now: Date) -> Bool {
        guard let chain = options.clientChain else { return false }
        return !chain.contains { $0.notValidAfter <= now || $0.notValidBefore > now }
    }

    func clientExpiryHint(_ now: Date) -> String {
        guard let leaf = options.clientChain?.first else { return "" }
        if leaf.notValidAfter <= now { return "; it expired \(humanDuration(now.timeIntervalSince(leaf.notValidAfter))) ago" }
        return "; by this host's clock it is still valid until \(leaf.notValidAfter): one of the clocks is wrong"
    }

    static func ocspURL(_ certificate: Certificate) -> String? {
        guard let access = try? certificate.extensions.authorityInformationAccess else { return nil }
        for description in access where description.method == .ocspServer {
            if case .uniformResourceIdentifier(let url) = description.location { return url }
        }
        return nil
    }
}

/// Collects what the connection reveals: the presented chain (from the verification callback), the bytes of the
/// answer, and the first error. Shared with the callback, which runs on the channel's event loop.
final class Collector: ChannelInboundHandler, @unchecked Sendable {
    // @unchecked: every field is touched only on the channel's event loop, and read after the channel closed.
    typealias InboundIn = ByteBuffer
    private var chain: [Certificate] = []
    private var answer = ByteBuffer()
    private var error: (any Error)?
    private var answeredAt: Date?

    func presented(_ certificates: [Certificate]) { chain = certificates }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        var buffer = unwrapInboundIn(data)
        if answeredAt == nil { answeredAt = Date() }
        if answer.readableBytes < 64 * 1024 { answer.writeBuffer(&buffer) }
    }

    func errorCaught(context: ChannelHandlerContext, error: any Error) {
        if self.error == nil { self.error = error }
        context.close(promise: nil)
    }

    func fill(_ observation: inout EndpointProbe.Observation) {
        observation.presented = chain
        observation.answeredAt = answeredAt
        if let error {
            let text = "\(error)"
            observation.tlsError = text
            observation.tlsReasons = Set(TLSReasonCodes.all(in: text))
        }
        let text = String(decoding: answer.readableBytesView.prefix(16 * 1024), as: UTF8.self)
        if text.hasPrefix("HTTP/"), let status = Int(text.split(separator: " ").dropFirst().first ?? "") {
            observation.httpStatus = status
            if let end = text.range(of: "\r\n\r\n") { observation.httpBody = String(text[end.upperBound...].prefix(4096)) }
        }
        for line in text.split(separator: "\r\n").prefix(64) where line.lowercased().hasPrefix("date:") {
            observation.serverDate = AuthorityClient.parseHTTPDate(line.dropFirst(5).trimmingCharacters(in: .whitespaces))
        }
    }
}
