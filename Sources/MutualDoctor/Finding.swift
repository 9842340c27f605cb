import Foundation

/// One thing `mutual doctor` found: a stable code programs branch on, how bad it is, what it is about, the cause in
/// plain words and the fix.
public struct Finding: Sendable, Hashable, Codable {
    public enum Severity: String, Sendable, Hashable, Codable, Comparable {
        case error, warning, info

        var rank: Int { self == .error ? 0 : self == .warning ? 1 : 2 }
        public static func < (lhs: Self, rhs: Self) -> Bool { lhs.rank < rhs.rank }
    }

    public var code: String
    public var severity: Severity
    public var subject: String
    public var message: String
    public var fix: String?

    public init(_ code: String, _ severity: Severity, subject: String, _ message: String, fix: String? = nil) {
        self.code = code
        self.severity = severity
        self.subject = subject
        self.message = message
        self.fix = fix
    }
}

/// A diagnosis: the findings, worst first. Healthy when nothing is an error or a warning.
public struct Diagnosis: Sendable, Codable {
    public var findings: [Finding]

    public init(_ findings: [Finding]) {
        self.findings = findings.enumerated().sorted { ($0.element.severity, $0.offset) < ($1.element.severity, $1.offset) }.map(\.element)
    }

    public var isHealthy: Bool { !findings.contains { $0.severity != .info } }

    /// One line per finding: severity, code, subject, cause, and the fix.
    public var text: String {
        if findings.isEmpty { return "healthy: nothing to report\n" }
        var out = ""
        for finding in findings {
            out += "\(finding.severity.rawValue.padding(toLength: 7, withPad: " ", startingAt: 0)) \(finding.code)  \(finding.subject): \(finding.message)\n"
            if let fix = finding.fix { out += "        fix: \(fix)\n" }
        }
        if isHealthy { out += "healthy\n" }
        return out
    }
}

/// Human spelling of a duration: "3 d", "5.0 h", "12 min", "40 s".
func humanDuration(_ seconds: TimeInterval) -> String {
    let s = abs(seconds)
    if s >= 86_400 { return String(format: "%.0f d", s / 86_400) }
    if s >= 3600 { return String(format: "%.1f h", s / 3600) }
    if s >= 60 { return "\(Int(s / 60)) min" }
    return "\(Int(s)) s"
}
