import Foundation
import MutualPKI
import Prometheus
import Synchronization

/// Why a handshake (or a resumed session) was refused. The raw value is the `reason` label of
/// `mutual_proxy_handshakes_total` and the `reason` field of the log line.
public enum HandshakeFailure: String, Sendable, CaseIterable {
    case noCertificate = "no_certificate"
    case unknownCA = "unknown_ca"
    case expired
    case notYetValid = "not_yet_valid"
    case revoked
    case eku
    case invalidChain = "invalid_chain"
    case policy
    case revocationUnavailable = "revocation_unavailable"
    case malformed
    case tls
    case upstreamIdentity = "upstream_identity"
    /// The presented chain is longer than the listener's depth allows, or path building ran out of budget.
    case chainTooComplex = "chain_too_complex"
    /// The TLS handshake did not finish within the handshake timeout.
    case handshakeTimeout = "handshake_timeout"
    /// The client ended the handshake with an alert about our side (it does not trust our certificate, …).
    case clientAborted = "client_aborted"

    /// The handshake failure for a verifier's rejection code.
    init(_ code: ChainVerifier.RejectionCode) {
        switch code {
        case .unknownIssuer: self = .unknownCA
        case .expired: self = .expired
        case .notYetValid: self = .notYetValid
        case .revoked: self = .revoked
        case .chainTooComplex: self = .chainTooComplex
        case .cancelled: self = .tls
        case .unusableCRL: self = .revocationUnavailable
        case .invalid: self = .invalidChain
        }
    }
}

/// The proxy's Prometheus metrics, served on the admin listener.
public final class ProxyMetrics: Sendable {
    public let registry = PrometheusCollectorRegistry()
    private let cache = Mutex<[String: Counter]>([:])
    private let histograms = Mutex<[String: DurationHistogram]>([:])
    private let gauges = Mutex<[String: Gauge]>([:])
    /// Seconds until each listener's own certificate expires, computed at scrape time.
    private let expiries = Mutex<[String: Date]>([:])

    public init() {}

    private func counter(_ name: String, _ labels: [(String, String)]) -> Counter {
        let key = name + labels.map { "|\($0.0)=\($0.1)" }.joined()
        return cache.withLock { cache in
            if let counter = cache[key] { return counter }
            let counter = registry.makeCounter(name: name, labels: labels)
            cache[key] = counter
            return counter
        }
    }

    func gauge(_ name: String, _ labels: [(String, String)] = []) -> Gauge {
        let key = name + labels.map { "|\($0.0)=\($0.1)" }.joined()
        return gauges.withLock { gauges in
            if let gauge = gauges[key] { return gauge }
            let gauge = registry.makeGauge(name: name, labels: labels)
            gauges[key] = gauge
            return gauge
        }
    }

    func handshake(listener: String, failure: HandshakeFailure?) {
        counter("mutual_proxy_handshakes_total", [("listener", listener), ("outcome", failure == nil ? "ok" : "failed"), ("reason", failure?.rawValue ?? "")]).increment()
    }

    /// Completed handshakes by key exchange group (`X25519MLKEM768` when the client offered it, else `classical`) and
    /// by the key algorithm of each side's certificate (`ML-DSA-65`, `P-256`, …; `none` without a client certificate):
    /// in TLS 1.3 the certificate's key decides the CertificateVerify signature, so this is how far a migration to
    /// post-quantum identities has come (`mutual pq report` reads it).
    func tlsAlgorithms(listener: String, group: String, serverKey: String, clientKey: String) {
        counter("mutual_proxy_tls_handshakes_total", [("listener", listener), ("group", group), ("server_key", serverKey), ("client_key", clientKey)]).increment()
    }

    /// A counter for one (listener, route, status) triple; handlers keep it to avoid the lookup per request.
    func requestCounter(listener: String, route: String, status: Int) -> Counter {
        counter("mutual_proxy_requests_total", [("listener", listener), ("route", route), ("status", String(status))])
    }

    func latency(listener: String) -> DurationHistogram {
        histograms.withLock { histograms in
            if let histogram = histograms[listener] { return histogram }
            let buckets: [Duration] = [.microseconds(250), .microseconds(500), .milliseconds(1), .milliseconds(2), .milliseconds(5), .milliseconds(10), .milliseconds(25), .milliseconds(50), .milliseconds(100), .milliseconds(250), .milliseconds(500), .seconds(1), .seconds(5)]
            let histogram = registry.makeDurationHistogram(name: "mutual_proxy_request_duration_seconds", labels: [("listener", listener)], buckets: buckets)
            histograms[listener] = histogram
            return histogram
        }
    }

    /// Connections the proxy closed or turned away on its own: `max_connections` (refused at accept),
    /// `displaced` (a pre-handshake connection closed for a new one at the limit), `handshake_timeout`,
    /// `request_head_timeout`, `idle_timeout`, `certificate_expired`.
    func connectionClosed(listener: String, reason: String) {
        counter("mutual_proxy_connections_closed_total", [("listener", listener), ("reason", reason)]).increment()
    }

    /// Requests the proxy answered itself, by code (`dot_segment`, `too_many_headers`, `duplicate_host`, …).
    func requestRefused(listener: String, code: String) {
        counter("mutual_proxy_requests_refused_total", [("listener", listener), ("code", code)]).increment()
    }

    func openConnections(listener: String) -> Gauge { gauge("mutual_proxy_open_connections", [("listener", listener)]) }

    func reload(success: Bool, listener: String) {
        if success {
            gauge("mutual_proxy_last_reload_success_timestamp_seconds", [("listener", listener)]).set(to: Date().timeIntervalSince1970)
        } else {
            counter("mutual_proxy_reload_failures_total", [("listener", listener)]).increment()
        }
    }

    func crlRefreshed(source: String) {
        gauge("mutual_proxy_crl_last_refresh_timestamp_seconds", [("source", source)]).set(to: Date().timeIntervalSince1970)
    }

    func crlRefreshFailed(source: String) {
        counter("mutual_proxy_crl_refresh_failures_total", [("source", source)]).increment()
    }

    func setCRLStale(_ stale: Bool) { gauge("mutual_proxy_crl_stale").set(to: stale ? 1 : 0) }

    func revokedConnectionsClosed(_ count: Int) {
        counter("mutual_proxy_revoked_connections_closed_total", []).increment(by: Int64(count))
    }

    func revocationEventsConnected(_ connected: Bool) { gauge("mutual_proxy_revocation_events_connected").set(to: connected ? 1 : 0) }

    func revocationEvent() { counter("mutual_proxy_revocation_events_total", []).increment() }

    func certificateExpiry(listener: String, notAfter: Date) { expiries.withLock { $0[listener] = notAfter } }

    /// The text exposition, with the certificate-expiry gauges brought up to date.
    public func render() -> [UInt8] {
        let now = Date()
        for (listener, notAfter) in expiries.withLock({ $0 }) {
            gauge("mutual_proxy_certificate_expiry_seconds", [("listener", listener)]).set(to: notAfter.timeIntervalSince(now))
        }
        return registry.emitToBuffer()
    }
}

/// JSON-lines access log. Lines are buffered and written in batches (every 100 ms or 64 KiB) so logging costs no
/// system call per request; `flush()` runs at shutdown.
public final class AccessLog: Sendable {
    private let fd: Int32
    private let ownsDescriptor: Bool
    private let buffer = Mutex<[UInt8]>([])
    public let enabled: Bool

    /// `stdout`, `off`, or a path opened for appending.
    public init(destination: String?) throws {
        switch destination ?? "stdout" {
        case "off":
            fd = -1; ownsDescriptor = false; enabled = false
        case "stdout", "-":
            fd = STDOUT_FILENO; ownsDescriptor = false; enabled = true
        case let path:
            let descriptor = open(path, O_WRONLY | O_APPEND | O_CREAT | O_CLOEXEC, 0o640)
            guard descriptor >= 0 else {
                throw ProxyError("cannot open access log \(path): \(String(cString: strerror(errno)))")
            }
            fd = descriptor; ownsDescriptor = true; enabled = true
        }
    }

    deinit { if ownsDescriptor { close(fd) } }

    public struct Entry {
        public var listener: String
        public var client: String?
        public var serial: String?
        public var method: String?
        public var path: String?
        public var route: String?
        public var decision: String
        public var reason: String
        public var status: Int
        public var bytesIn: Int
        public var bytesOut: Int
        public var latency: Duration
        public var peer: String?
        /// The refusal's stable code (`too_many_headers`, `dot_segment`, `forbidden`, …); nil when forwarded.
        public var code: String? = nil
    }

    public func record(_ entry: Entry) {
        guard enabled else { return }
        var line = "{\"time\":\"\(Self.timestamp())\",\"listener\":\(Self.quote(entry.listener))"
        line += ",\"client\":\(entry.client.map(Self.quote) ?? "null"),\"serial\":\(entry.serial.map(Self.quote) ?? "null")"
        if let method = entry.method { line += ",\"method\":\(Self.quote(method))" }
        if let path = entry.path { line += ",\"path\":\(Self.quote(path))" }
        line += ",\"route\":\(entry.route.map(Self.quote) ?? "null"),\"decision\":\(Self.quote(entry.decision)),\"reason\":\(Self.quote(entry.reason))"
        let ms = Double(entry.latency.components.seconds) * 1000 + Double(entry.latency.components.attoseconds) / 1e15
        line += ",\"status\":\(entry.status),\"bytes_in\":\(entry.bytesIn),\"bytes_out\":\(entry.bytesOut),\"latency_ms\":\(String(format: "%.3f", ms))"
        if let peer = entry.peer { line += ",\"peer\":\(Self.quote(peer))" }
        if let code = entry.code { line += ",\"code\":\(Self.quote(code))" }
        line += "}\n"
        let full = buffer.withLock { buffer -> Bool in
            buffer.append(contentsOf: line.utf8)
            return buffer.count >= 64 * 1024
        }
        if full { flush() }
    }

    public func flush() {
        let bytes = buffer.withLock { buffer -> [UInt8] in
            defer { buffer.removeAll(keepingCapacity: true) }
            return buffer
        }
        guard enabled, !bytes.isEmpty else { return }
        bytes.withUnsafeBytes { raw in
            var offset = 0
            while offset < raw.count {
                let n = write(fd, raw.baseAddress! + offset, raw.count - offset)
                if n < 0 && errno == EINTR { continue }
                if n <= 0 { return }
                offset += n
            }
        }
    }

    static func timestamp() -> String {
        var tv = timeval()
        gettimeofday(&tv, nil)
        var seconds = time_t(tv.tv_sec)
        var parts = tm()
        gmtime_r(&seconds, &parts)
        return String(format: "%04d-%02d-%02dT%02d:%02d:%02d.%03dZ", parts.tm_year + 1900, parts.tm_mon + 1, parts.tm_mday, parts.tm_hour, parts.tm_min, parts.tm_sec, Int(tv.tv_usec / 1000))
    }

    /// A JSON string literal (RFC 8259 escaping).
    static func quote(_ text: String) -> String {
        var out = "\""
        for scalar in text.unicodeScalars {
            switch scalar {
            case "\"": out += "\\\""
            case "\\": out += "\\\\"
            case "\n": out += "\\n"
            case "\r": out += "\\r"
            case "\t": out += "\\t"
            case _ where scalar.value < 0x20: out += String(format: "\\u%04x", scalar.value)
            default: out.unicodeScalars.append(scalar)
            }
        }
        return out + "\""
    }
}

/// An error of the proxy's own (configuration that cannot be loaded, a listener that cannot bind).
public struct ProxyError: Error, CustomStringConvertible, Sendable {
    public var description: String
    public init(_ description: String) { self.description = description }
}

import NIOCore

extension SocketAddress {
    /// `ip:port` (`[ip]:port` for IPv6), as logs show peers.
    public var display: String {
        guard let ip = ipAddress, let port else { return description }
        return ip.contains(":") ? "[\(ip)]:\(port)" : "\(ip):\(port)"
    }
}
