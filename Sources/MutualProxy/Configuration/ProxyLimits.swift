import Foundation

/// Every limit and timeout of an inbound listener, with its default, in one place (docs/proxy.md has the same table).
/// A value of the listener's YAML (or its flag) overrides the default; the resolved limits live in the listener state.
public struct ProxyLimits: Sendable, Equatable {
    /// Seconds from accept to a finished TLS handshake (verification included); then the connection is closed.
    public var handshakeTimeout: Double = 10
    /// Seconds from the first byte of an HTTP/1.1 request head to its end (slowly sent heads).
    public var requestHeadTimeout: Double = 10
    /// Seconds an HTTP connection may sit with no request in flight (HTTP/1.1 keep-alive, HTTP/2 with no stream).
    public var idleTimeout: Double = 60
    /// Open connections per listener. At the limit a new connection first displaces the oldest one that has not
    /// finished its handshake; if there is none, the new connection is closed. The default fits the process's file
    /// descriptor limit (each proxied connection may hold two): (soft RLIMIT_NOFILE − 64) / 2, at most 10,000.
    public var maxConnections: Int = ProxyLimits.descriptorBoundedConnections()
    /// Header fields in one request (HTTP/1.1 and HTTP/2); more get 431.
    public var maxHeaderCount: Int = 100
    /// Bytes of header names and values in one request; more get 431.
    public var maxHeaderBytes: Int = 32 * 1024

    public init() {}

    /// Raises the soft RLIMIT_NOFILE to the hard limit (at most 1,048,576), as Go's runtime and nginx's
    /// `worker_rlimit_nofile` do: the common soft default of 1,024 would otherwise cap a gateway at a few hundred
    /// connections. Returns the soft limit in force afterwards. Process-wide: the `mutual proxy` command calls it once
    /// at start, before any listener computes its default.
    @discardableResult
    public static func raiseDescriptorLimit() -> UInt64 {
        var limit = rlimit()
        guard getrlimit(Int32(RLIMIT_NOFILE.rawValue), &limit) == 0 else { return 0 }
        let target = min(UInt64(limit.rlim_max), 1 << 20)
        if UInt64(limit.rlim_cur) < target {
            limit.rlim_cur = rlim_t(target)
            _ = setrlimit(Int32(RLIMIT_NOFILE.rawValue), &limit)
            _ = getrlimit(Int32(RLIMIT_NOFILE.rawValue), &limit)
        }
        return UInt64(limit.rlim_cur)
    }

    /// (soft RLIMIT_NOFILE − 64) / 2, between 16 and 10,000: so the limit is reached before accept() fails for lack of
    /// descriptors, and displacing silent sockets can still make room for good clients.
    public static func descriptorBoundedConnections() -> Int {
        var limit = rlimit()
        guard getrlimit(Int32(RLIMIT_NOFILE.rawValue), &limit) == 0 else { return 10_000 }
        let soft = UInt64(limit.rlim_cur)
        return Int(min(10_000, max(16, (Int64(clamping: min(soft, 1 << 40)) - 64) / 2)))
    }

    /// The table of names, flags, YAML keys and defaults, as printed in the documentation.
    public static let table: [(name: String, flag: String, key: String, value: String)] = {
        let d = ProxyLimits()
        return [
            ("handshake timeout", "--handshake-timeout", "handshake-timeout", "\(d.handshakeTimeout) s"),
            ("request head timeout", "--request-head-timeout", "request-head-timeout", "\(d.requestHeadTimeout) s"),
            ("idle timeout", "--idle-timeout", "idle-timeout", "\(d.idleTimeout) s"),
            ("maximum connections", "--max-connections", "max-connections", "(RLIMIT_NOFILE − 64) / 2, at most 10000"),
            ("maximum header count", "--max-header-count", "max-header-count", "\(d.maxHeaderCount)"),
            ("maximum header bytes", "--max-header-bytes", "max-header-bytes", "\(d.maxHeaderBytes)"),
        ]
    }()
}

extension ProxyConfiguration.Listener {
    /// The listener's limits: its own values over the defaults.
    public var limits: ProxyLimits {
        var limits = ProxyLimits()
        if let handshakeTimeout { limits.handshakeTimeout = handshakeTimeout }
        if let requestHeadTimeout { limits.requestHeadTimeout = requestHeadTimeout }
        if let idleTimeout { limits.idleTimeout = idleTimeout }
        if let maxConnections { limits.maxConnections = maxConnections }
        if let maxHeaderCount { limits.maxHeaderCount = maxHeaderCount }
        if let maxHeaderBytes { limits.maxHeaderBytes = maxHeaderBytes }
        return limits
    }

    /// Problems with the limit values, for `validate()`.
    func limitProblems(label: String) -> [String] {
        var problems: [String] = []
        for (key, value) in [("handshake-timeout", handshakeTimeout), ("request-head-timeout", requestHeadTimeout), ("idle-timeout", idleTimeout)] {
            if let value, !(value > 0 && value <= 86_400) { problems.append("\(label).\(key) must be between 0 and 86400 seconds (got \(value))") }
        }
        for (key, value, upper) in [("max-connections", maxConnections, 1_000_000), ("max-header-count", maxHeaderCount, 10_000), ("max-header-bytes", maxHeaderBytes, 1 << 20)] {
            if let value, !(value >= 1 && value <= upper) { problems.append("\(label).\(key) must be between 1 and \(upper) (got \(value))") }
        }
        return problems
    }
}
