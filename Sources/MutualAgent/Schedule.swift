import Foundation

/// Time as the agent sees it. Production uses the system clock; tests drive a manual one, so the renewal schedule,
/// backoff and expiry paths are tested without sleeping.
public protocol AgentClock: Sendable {
    var now: Date { get }
    /// Returns at `deadline` (or at once when it has passed); throws when the task is cancelled.
    func sleep(until deadline: Date) async throws
}

public struct SystemClock: AgentClock {
    public init() {}
    public var now: Date { Date() }
    public func sleep(until deadline: Date) async throws {
        let seconds = deadline.timeIntervalSinceNow
        if seconds > 0 { try await Task.sleep(for: .milliseconds(Int64(seconds * 1000))) }
    }
}

/// When to renew and how long to wait after a failure.
public struct RenewalSchedule: Sendable {
    /// Fraction of the lifetime after which to renew (default 2/3).
    public var fraction: Double
    /// Jitter as a fraction of the lifetime, applied both ways (default 1/20): a fleet issued together does not
    /// renew together.
    public var jitter: Double

    public init(fraction: Double = 2.0 / 3.0, jitter: Double = 1.0 / 20.0) {
        self.fraction = fraction
        self.jitter = jitter
    }

    /// `unit` is a random number in -1...1 (injected for tests).
    public func renewalTime(notBefore: Date, notAfter: Date, unit: Double) -> Date {
        let lifetime = max(1, notAfter.timeIntervalSince(notBefore))
        let offset = lifetime * fraction + lifetime * jitter * max(-1, min(1, unit))
        // Never before issuance, and always with at least 5% of the lifetime left to retry in.
        let latest = lifetime * 0.95
        return notBefore.addingTimeInterval(max(0, min(latest, offset)))
    }

    /// Capped exponential backoff after `attempt` consecutive failures (1, 2, 4 … seconds, at most a tenth of the
    /// lifetime and 5 minutes), scaled by `unit` in 0.5...1 so retries spread out.
    public func backoff(attempt: Int, lifetime: TimeInterval, unit: Double) -> TimeInterval {
        let cap = max(1, min(300, lifetime / 10))
        let exponential = pow(2, Double(min(max(attempt - 1, 0), 20)))
        return min(cap, exponential) * max(0.5, min(1, unit))
    }
}

/// Parses a root fingerprint as `mutual init` prints it or `openssl x509 -fingerprint -sha256` shows it: 64 hex
/// digits, colons optional, any case.
public func normalizedFingerprint(_ text: String) throws -> String {
    let hex = text.replacingOccurrences(of: ":", with: "").lowercased().trimmingCharacters(in: .whitespaces)
    let body = hex.hasPrefix("sha256=") ? String(hex.dropFirst(7)) : hex
    guard body.count == 64, body.allSatisfy({ $0.isHexDigit }) else {
        throw AgentError(.usage, "root fingerprint must be the 64 hex digits of SHA-256 over the root certificate's DER (colons optional), got '\(text.prefix(100))'")
    }
    return body
}

/// Why the agent stopped or failed.
public struct AgentError: Error, CustomStringConvertible, Sendable {
    public enum Kind: String, Sendable {
        /// Bad flags or files: fix the invocation.
        case usage
        /// Retry later (authority down, network, 5xx).
        case transient
        /// Renewal cannot succeed without a person: revoked, expired beyond grace, token refused, fingerprint mismatch.
        case fatal
    }
    public var kind: Kind
    public var message: String
    public init(_ kind: Kind, _ message: String) {
        self.kind = kind
        self.message = message
    }
    public var description: String { message }
}
