import Crypto
import Foundation

/// The audit hash chain: each event's hash commits to the previous event's hash and to every field of the event.
///
/// `hash = SHA-256("mutual-audit-v1\n" + previousHash + "\n" + sequence + "\n" + time + "\n" + actor + "\n" + action
/// + "\n" + subject + "\n" + details)` with newlines in fields escaped, so no two different events hash alike.
public enum AuditChain {
    /// The previous hash of the first event.
    public static let genesis = String(repeating: "0", count: 64)

    /// RFC 3339 UTC with milliseconds, the form stored in the chain.
    public static func format(_ date: Date) -> String {
        JSONText.time(date)
    }

    static func canonicalJSON(_ details: [String: String]) -> String {
        JSONText.object(details)
    }

    static func escape(_ field: String) -> String {
        // Fast path: most fields contain neither a backslash nor a newline.
        guard field.utf8.contains(where: { $0 == 0x5C || $0 == 0x0A }) else { return field }
        var out = ""
        out.reserveCapacity(field.utf8.count + 8)
        for ch in field {
            switch ch {
            case "\\": out += "\\\\"
            case "\n": out += "\\n"
            default: out.append(ch)
            }
        }
        return out
    }

    static func hex<D: Sequence>(_ bytes: D) -> String where D.Element == UInt8 {
        let digits = Array("0123456789abcdef".utf8)
        var out = [UInt8]()
        out.reserveCapacity(64)
        for byte in bytes {
            out.append(digits[Int(byte >> 4)])
            out.append(digits[Int(byte & 0x0F)])
        }
        return String(decoding: out, as: UTF8.self)
    }

    /// Computes an event's hash from its fields.
    public static func hash(
        sequence: Int64, time: String, actor: String, action: String, subject: String, details: String,
        previousHash: String
    ) -> String {
        let material = ["mutual-audit-v1", previousHash, String(sequence), time, actor, action, subject, details]
            .map(escape).joined(separator: "\n")
        return hex(SHA256.hash(data: Array(material.utf8)))
    }

    /// Chains a new entry after `previous` (sequence, hash).
    static func chain(_ entry: AuditEntry, after previous: (sequence: Int64, hash: String)) -> AuditEvent {
        let sequence = previous.sequence + 1
        let time = format(entry.time)
        let details = canonicalJSON(entry.details)
        let hash = hash(
            sequence: sequence, time: time, actor: entry.actor, action: entry.action, subject: entry.subject,
            details: details, previousHash: previous.hash
        )
        return AuditEvent(
            sequence: sequence, time: time, actor: entry.actor, action: entry.action, subject: entry.subject,
            details: details, previousHash: previous.hash, hash: hash
        )
    }

    /// Recomputes a chain read in sequence order; names the first event that does not fit.
    public static func verify(_ events: [AuditEvent], head: (sequence: Int64, hash: String)?) -> AuditVerification {
        var previous: (sequence: Int64, hash: String) = (0, genesis)
        for event in events {
            if event.sequence != previous.sequence + 1 {
                return .broken(
                    sequence: previous.sequence + 1,
                    reason: "event #\(previous.sequence + 1) is missing (next stored event is #\(event.sequence)): events were removed or reordered"
                )
            }
            if event.previousHash != previous.hash {
                return .broken(sequence: event.sequence, reason: "event #\(event.sequence) does not link to event #\(previous.sequence): the chain was reordered or rewritten")
            }
            let expected = hash(
                sequence: event.sequence, time: event.time, actor: event.actor, action: event.action,
                subject: event.subject, details: event.details, previousHash: event.previousHash
            )
            if expected != event.hash {
                return .broken(sequence: event.sequence, reason: "event #\(event.sequence) (\(event.action)) was altered: its contents do not match its hash")
            }
            previous = (event.sequence, event.hash)
        }
        if let head, head.sequence != previous.sequence || head.hash != previous.hash {
            if head.sequence > previous.sequence {
                return .broken(sequence: previous.sequence + 1, reason: "event #\(previous.sequence + 1) and later are missing: the chain head records #\(head.sequence)")
            }
            return .broken(sequence: head.sequence, reason: "the chain head (#\(head.sequence)) does not match the stored events")
        }
        return .intact(events: events.count, head: previous.hash)
    }
}
