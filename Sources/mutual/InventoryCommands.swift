import ArgumentParser
import Foundation
import MutualAuthority
import MutualPKI
import MutualStore
import X509

struct ListCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "list", abstract: "List certificates in the inventory, soonest expiry first."
    )

    @OptionGroup var stateOptions: StateOptions

    @Option(help: "Only certificates that expire within this duration (and have not expired yet).", transform: ValidityDuration.argument)
    var expiringWithin: ValidityDuration?

    @Option(help: "Only certificates for this identity (SPIFFE ID, first SAN or CN); a final '*' matches a prefix ('spiffe://example.org/ns/web/*'), a leading '*.' any subdomain ('*.svc.example.org').")
    var identity: String?

    @Option(help: "Only certificates with this status: valid, expired (lapsed: no successor), superseded (expired after a renewal replaced it), revoked.")
    var status: String?

    @Option(help: "At most this many rows.")
    var limit: Int = 1000

    @Flag(help: "Print JSON.")
    var json = false

    func validate() throws {
        if let status, CertificateFilter.StatusFilter(rawValue: status) == nil {
            throw ValidationError("unknown status '\(status)': expected one of \(CertificateFilter.StatusFilter.choices)")
        }
        guard (1...100_000).contains(limit) else { throw ValidationError("--limit must be between 1 and 100000") }
    }

    func run() async throws {
        let authority = try await stateOptions.openAuthority()
        let now = Date.now
        let filter = CertificateFilter(
            expiringBefore: expiringWithin.map { now.addingTimeInterval($0.timeInterval) }, identity: identity,
            status: status.flatMap(CertificateFilter.StatusFilter.init(rawValue:)), now: now, limit: limit
        )
        let records = try await failing { try await authority.store.certificates(filter) }
        try await authority.close()
        if json {
            try printJSON(records.map { CertificateRecordView($0, now: now) })
            return
        }
        if records.isEmpty {
            print("No certificates match.")
            return
        }
        let header = ["SERIAL", "PROFILE", "STATUS", "NOT AFTER", "IDENTITY", "OWNER", "RENEWED BY"]
        var rows = [header]
        for r in records {
            rows.append([
                r.serial, r.profile, r.effectiveStatus(at: now), AuditTime.short(r.notAfter), r.identity, r.owner ?? "-",
                r.successor.map { String($0.prefix(12)) } ?? "-",
            ])
        }
        printTable(rows)
    }
}

struct ShowCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(commandName: "show", abstract: "Show one certificate of the inventory.")

    @OptionGroup var stateOptions: StateOptions

    @Flag(help: "Print the certificate as PEM.")
    var pem = false

    @Flag(help: "Print JSON.")
    var json = false

    @Argument(help: "Serial number (hex, colons allowed), or a unique prefix of at least 6 digits (as `list` shows).")
    var serial: String

    func run() async throws {
        let normalized = Authority.normalizeSerial(serial)
        guard !normalized.isEmpty, normalized.allSatisfy(\.isHexDigit) else {
            throw CommandFailure("invalid serial '\(serial.prefix(80))': expected hex digits (colons allowed)", exitCode: 2)
        }
        let authority = try await stateOptions.openAuthority()
        let found: (CertificateRecord?, [CertificateRecord], [CertificateRecord])
        do {
            found = try await failing {
                var record = try await authority.store.certificate(serial: normalized)
                var candidates: [CertificateRecord] = []
                if record == nil, normalized.count >= 6 {
                    candidates = try await authority.store.certificates(serialPrefix: normalized, limit: 10)
                    if candidates.count == 1 { record = candidates[0] }
                }
                var successors: [CertificateRecord] = []
                if let record { successors = try await authority.store.successors(of: record.serial) }
                return (record, candidates, successors)
            }
            try await authority.close()
        } catch {
            try? await authority.close()
            throw error
        }
        let (record, candidates, successors) = found
        if record == nil, candidates.count > 1 {
            throw CommandFailure("serial prefix \(normalized) is ambiguous: \(candidates.map(\.serial).joined(separator: ", "))\(candidates.count == 10 ? ", …" : ""); give more digits", exitCode: 2)
        }
        guard let record else {
            throw CommandFailure("no certificate with serial \(normalized)\(normalized.count >= 6 ? " (or starting with it)" : "") in the inventory\(normalized.count < 6 ? "; a prefix needs at least 6 hex digits" : "")")
        }
        if pem {
            // The stored DER as issued, whatever its algorithm (an ML-DSA certificate has no `Certificate` form).
            print(PEMCodec.encode(record.der, label: "CERTIFICATE"), terminator: "")
            return
        }
        if json {
            try printJSON(CertificateRecordView(record, now: .now))
            return
        }
        let now = Date.now
        print("Serial:      \(record.serial)")
        print("Status:      \(record.effectiveStatus(at: now))\(record.revokedAt.map { " at \($0) (\(record.revocationReason ?? "unspecified"))" } ?? "")")
        print("Profile:     \(record.profile)")
        print("Identity:    \(record.identity)")
        print("Key:         \((try? AnyCertificate(derEncoded: record.der))?.keyAlgorithm ?? "unreadable")")
        print("Subject:     \(record.subject.isEmpty ? "(empty)" : record.subject)")
        print("Issuer:      \(record.issuer)")
        print("SANs:        \(record.subjectAlternativeNames.isEmpty ? "-" : record.subjectAlternativeNames.joined(separator: ", "))")
        print("Not before:  \(record.notBefore)")
        print("Not after:   \(record.notAfter)")
        print("Owner:       \(record.owner ?? "-")")
        print("Requester:   \(record.requester)")
        print("SHA-256:     \(record.fingerprint)")
        print("Renewed from: \(record.predecessor ?? "- (first issuance)")")
        print("Renewed by:  \(successors.isEmpty ? "-" : successors.map(\.serial).joined(separator: ", "))")
    }
}

struct RevokeCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "revoke", abstract: "Revoke a certificate: the inventory and the audit trail change together."
    )

    @OptionGroup var stateOptions: StateOptions

    @Option(help: "Reason: \(RevocationReason.choices).")
    var reason: RevocationReason

    @Flag(help: "Print JSON.")
    var json = false

    @Argument(help: "Serial number (hex, colons allowed).")
    var serial: String

    func run() async throws {
        let authority = try await stateOptions.openAuthority()
        do {
            let (record, crl) = try await failing {
                try await authority.revokeAndPublish(serial: serial, reason: reason, actor: cliActor, publisher: RevocationPublisher(authority: authority))
            }
            try await authority.close()
            if json {
                try printJSON(CertificateRecordView(record, now: .now))
            } else {
                print("Revoked \(record.serial) (\(record.identity)) at \(record.revokedAt ?? .now): \(reason.rawValue)")
                if let crl { print("Published CRL #\(crl.number) (\(crl.der.count) bytes); subscribed relying parties learn of it from the event stream.") }
            }
        } catch {
            try? await authority.close()
            throw error
        }
    }
}

struct AuditCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "audit", abstract: "Read and verify the tamper-evident audit trail.",
        subcommands: [AuditList.self, AuditVerify.self]
    )

    struct AuditList: AsyncParsableCommand {
        static let configuration = CommandConfiguration(commandName: "list", abstract: "List audit events, oldest first.")
        @OptionGroup var stateOptions: StateOptions
        @Option(help: "Only the last N events.") var last: Int?
        @Flag(help: "Print JSON.") var json = false

        func run() async throws {
            let authority = try await stateOptions.openAuthority()
            let events = try await failing { try await authority.store.auditEvents(limit: last) }
            try await authority.close()
            if json {
                try printJSON(events)
                return
            }
            var rows = [["#", "TIME", "ACTOR", "ACTION", "SUBJECT", "DETAILS"]]
            for e in events {
                rows.append([String(e.sequence), e.time, e.actor, e.action, e.subject, e.details])
            }
            printTable(rows)
        }
    }

    struct AuditVerify: AsyncParsableCommand {
        static let configuration = CommandConfiguration(
            commandName: "verify", abstract: "Recompute the hash chain; fail naming the first bad event."
        )
        @OptionGroup var stateOptions: StateOptions
        @Flag(help: "Print JSON.") var json = false

        func run() async throws {
            let authority = try await stateOptions.openAuthority()
            let result = try await failing { try await authority.store.verifyAudit() }
            try await authority.close()
            switch result {
            case .intact(let count, let head):
                if json { try printJSON(["result": "intact", "events": String(count), "head": head]) } else {
                    print("Audit trail intact: \(count) events, head \(head)")
                }
            case .broken(let sequence, let reason):
                if json { try printJSON(["result": "broken", "event": String(sequence), "reason": reason]) }
                throw CommandFailure("audit trail broken at event #\(sequence): \(reason)")
            }
        }
    }
}

enum AuditTime {
    static func short(_ date: Date) -> String {
        date.formatted(Date.ISO8601FormatStyle().year().month().day().dateSeparator(.dash).time(includingFractionalSeconds: false).timeSeparator(.colon))
    }
}

func printTable(_ rows: [[String]]) {
    guard let first = rows.first else { return }
    var widths = [Int](repeating: 0, count: first.count)
    for row in rows {
        for (i, cell) in row.enumerated() where i < widths.count - 1 { widths[i] = max(widths[i], cell.count) }
    }
    for row in rows {
        var line = ""
        for (i, cell) in row.enumerated() {
            line += i < widths.count - 1 ? cell.padding(toLength: widths[i] + 2, withPad: " ", startingAt: 0) : cell
        }
        print(line)
    }
}
