/// A length of time as operators write it: `90s`, `15m`, `24h`, `30d`, `2w`, or combinations like `1h30m`.
///
/// Months and years are not accepted: their length varies and certificate lifetimes should be precise.
public struct ValidityDuration: Hashable, Sendable, Comparable, Codable, CustomStringConvertible {
    /// The length in whole seconds.
    public let seconds: Int64

    public init(seconds: Int64) { self.seconds = seconds }

    /// Parses a duration; throws ``PKIError/Code-swift.struct/invalidDuration`` naming what was wrong.
    public init(parsing text: String) throws {
        let trimmed = text.trimmingCharacters(in: .whitespaces)
        guard !trimmed.isEmpty, trimmed.count <= 32 else {
            throw PKIError(.invalidDuration, "invalid duration '\(text.prefix(40))': expected a number and a unit: \(Self.units)")
        }
        var total: Int64 = 0
        var digits = ""
        var sawUnit = false
        for ch in trimmed {
            if ch.isASCII, ch.isNumber {
                digits.append(ch)
                continue
            }
            let unit: Int64
            switch ch {
            case "s": unit = 1
            case "m": unit = 60
            case "h": unit = 3600
            case "d": unit = 86_400
            case "w": unit = 7 * 86_400
            default:
                throw PKIError(.invalidDuration, "invalid duration '\(text)': unknown unit '\(ch)' (\(Self.units))")
            }
            guard let value = Int64(digits) else {
                throw PKIError(.invalidDuration, "invalid duration '\(text)': a number must come before '\(ch)'")
            }
            let (product, overflow1) = value.multipliedReportingOverflow(by: unit)
            let (sum, overflow2) = total.addingReportingOverflow(product)
            guard !overflow1, !overflow2, sum <= 100 * 365 * 86_400 else {
                throw PKIError(.invalidDuration, "invalid duration '\(text)': longer than 100 years")
            }
            total = sum
            digits = ""
            sawUnit = true
        }
        guard digits.isEmpty, sawUnit else {
            throw PKIError(.invalidDuration, "invalid duration '\(text)': missing unit (\(Self.units))")
        }
        guard total > 0 else {
            throw PKIError(.invalidDuration, "invalid duration '\(text)': must be longer than zero")
        }
        self.seconds = total
    }

    /// The units, for error messages.
    public static let units = "units s, m, h, d, w — e.g. 90s, 15m, 24h, 30d, 2w, 1h30m"

    public static func seconds(_ s: Int64) -> Self { .init(seconds: s) }
    public static func minutes(_ m: Int64) -> Self { .init(seconds: m * 60) }
    public static func hours(_ h: Int64) -> Self { .init(seconds: h * 3600) }
    public static func days(_ d: Int64) -> Self { .init(seconds: d * 86_400) }

    public var timeInterval: Double { Double(seconds) }

    public static func < (lhs: Self, rhs: Self) -> Bool { lhs.seconds < rhs.seconds }

    /// The shortest exact spelling: `30d`, `24h` → `1d`, `90s` → `90s`, `1h30m` stays `90m`.
    public var description: String {
        for (unit, suffix) in [(Int64(86_400), "d"), (3600, "h"), (60, "m")] where seconds % unit == 0 {
            return "\(seconds / unit)\(suffix)"
        }
        return "\(seconds)s"
    }
}

import Foundation
