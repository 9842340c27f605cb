import ArgumentParser
import Foundation
import MutualAuthority
import MutualClient
import MutualPKI
import MutualStore

struct PQCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "pq",
        abstract: "The post-quantum (ML-DSA) hierarchy: add it to a CA and follow the migration.",
        subcommands: [PQInitCommand.self, PQMigrateCommand.self, PQReportCommand.self]
    )
}

struct PQInitCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "init",
        abstract: "Add an ML-DSA root and issuing CA beside this CA's classical ones.",
        discussion: """
            Writes ca/pq-root.pem, ca/pq-intermediate.pem and their keys (mode 0600, encrypted with the CA's passphrase
            when its keys are), records both in the inventory and the audit trail (`pq-init`). From then on every
            ML-DSA key (`mutual issue --key-type ml-dsa-65`, ML-DSA CSRs) is certified by the ML-DSA issuing CA, every
            classical key by the classical one. A running `mutual serve` uses the new hierarchy after a restart.
            """
    )

    @OptionGroup var stateOptions: StateOptions

    @Option(help: "ML-DSA parameter set: \(MLDSAVariant.allCases.map(\.rawValue).joined(separator: "|")).")
    var keyType: MLDSAVariant = .mlDSA65

    @Flag(help: "Print the result as JSON.")
    var json = false

    func run() async throws {
        let authority = try await stateOptions.openAuthority()
        do {
            let passphrase = authority.configuration.keysEncrypted ? Passphrase.read() : nil
            let hierarchy = try await failing {
                try await authority.addPQHierarchy(variant: keyType, passphrase: passphrase, actor: cliActor)
            }
            try await authority.close()
            let state = stateOptions.state
            if json {
                try printJSON([
                    "pq_root": state.pqRootCertificatePath, "pq_intermediate": state.pqIntermediateCertificatePath,
                    "pq_root_fingerprint": hierarchy.root.fingerprint, "pq_key_type": keyType.rawValue,
                ])
                return
            }
            print("Added the \(keyType.rawValue) hierarchy to the CA in \(state.path)")
            printPQHierarchy(hierarchy, state: state)
        } catch {
            try? await authority.close()
            throw error
        }
    }
}

struct PQMigrateCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "migrate",
        abstract: "Move identities to ML-DSA at their next renewal or enrollment.",
        discussion: """
            Each PATTERN is an identity pattern as token scopes take them (`spiffe://example.org/ns/web/*`,
            `*.svc.example.org`, an exact name). From then on a renewal or a token enrollment for a matching identity
            with a classical CSR is refused with `key-type-required` (HTTP 409, `key_type` in the problem), and
            `mutual agent` answers it by generating an ML-DSA key and asking again, so the identity moves at its next
            renewal with no one touching the host. Without PATTERN it prints the current migration. Audited as
            `pq-migrate`.
            """
    )

    @OptionGroup var stateOptions: StateOptions

    @Argument(help: "Identity patterns to move (spiffe://example.org/ns/web/*, *.svc.example.org, an exact identity).")
    var patterns: [String] = []

    @Option(help: "Stop moving these patterns (repeatable).")
    var remove: [String] = []

    @Option(help: "The ML-DSA parameter set to move to (default: the hierarchy's).")
    var keyType: MLDSAVariant?

    @Flag(help: "Print JSON.")
    var json = false

    func run() async throws {
        let authority = try await stateOptions.openAuthority()
        do {
            let migration: Authority.Migration?
            if patterns.isEmpty && remove.isEmpty && keyType == nil {
                migration = try await failing { try await authority.migration() }
            } else {
                migration = try await failing {
                    try await authority.updateMigration(adding: patterns, removing: remove, keyType: keyType, actor: cliActor)
                }
            }
            try await authority.close()
            if json {
                try printJSON(migration ?? Authority.Migration(keyType: authority.pqCA?.key.variant ?? .mlDSA65, patterns: []))
                return
            }
            guard let migration, !migration.patterns.isEmpty else {
                print("No identities are being moved to ML-DSA.")
                return
            }
            print("Moving to \(migration.keyType.rawValue) at their next renewal or enrollment:")
            for pattern in migration.patterns { print("  \(pattern)") }
        } catch {
            try? await authority.close()
            throw error
        }
    }
}

func printPQHierarchy(_ hierarchy: MLDSAHierarchy, state: StateDirectory) {
    let variant = hierarchy.root.subjectKeyVariant?.rawValue ?? "ML-DSA"
    print("  PQ root:       \(state.pqRootCertificatePath)  (\(variant), valid until \(hierarchy.root.notAfter))")
    print("  PQ issuing CA: \(state.pqIntermediateCertificatePath)  (certifies every ML-DSA key)")
    print("  PQ root SHA-256: \(hierarchy.root.fingerprint)")
}

struct PQReportCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "report",
        abstract: "How far the move to ML-DSA has come: the inventory by key algorithm, and proxies' handshakes.",
        discussion: """
            Counts valid end-entity certificates by key algorithm and identities by their newest certificate (moved
            when it has an ML-DSA key), and lists the classical identities whose renewals come next. With
            --proxy-metrics (a proxy's admin /metrics URL, repeatable) it adds the proxies' completed handshakes by key
            exchange group and by each side's certificate key (`mutual_proxy_tls_handshakes_total`).
            """
    )

    @OptionGroup var stateOptions: StateOptions

    @Option(help: "A proxy's metrics URL, e.g. http://127.0.0.1:9901/metrics (repeatable).")
    var proxyMetrics: [String] = []

    @Flag(help: "Print JSON.")
    var json = false

    func validate() throws {
        for url in proxyMetrics where !(url.hasPrefix("http://") || url.hasPrefix("https://")) {
            throw ValidationError("--proxy-metrics needs an http:// URL, got '\(url.prefix(100))'")
        }
    }

    struct ProxyHandshakes: Codable {
        var source: String
        var group: String
        var serverKey: String
        var clientKey: String
        var count: Double
    }

    struct Output: Codable {
        var inventory: PQReport
        var proxies: [ProxyHandshakes]
        var proxyErrors: [String: String]
    }

    func run() async throws {
        let authority = try await stateOptions.openAuthority()
        let report: PQReport
        do {
            report = try await failing { try await authority.pqReport() }
            try await authority.close()
        } catch {
            try? await authority.close()
            throw error
        }
        var handshakes: [ProxyHandshakes] = []
        var errors: [String: String] = [:]
        for url in proxyMetrics {
            do {
                let (status, _, body) = try await AuthorityClient.unverifiedGET(url, timeout: .seconds(10), limit: 16 << 20)
                guard status == 200 else {
                    errors[url] = "HTTP \(status)"
                    continue
                }
                handshakes += Self.parse(String(decoding: body, as: UTF8.self), source: url)
            } catch {
                errors[url] = "\(error)"
            }
        }
        if json {
            try printJSON(Output(inventory: report, proxies: handshakes, proxyErrors: errors))
            return
        }
        print("ML-DSA hierarchy: \(report.hierarchy ?? "none (`mutual pq init` adds one)")")
        let total = report.certificatesByAlgorithm.values.reduce(0, +)
        print("Valid certificates (CAs excluded): \(total)")
        for (algorithm, count) in report.certificatesByAlgorithm.sorted(by: { $0.value > $1.value || ($0.value == $1.value && $0.key < $1.key) }) {
            print("  \(algorithm.padding(toLength: 12, withPad: " ", startingAt: 0)) \(String(count).leftPad(7))  \(Self.percent(count, of: total))")
        }
        print("Identities: \(report.identities), on ML-DSA: \(report.postQuantumIdentities) (\(Self.percent(report.postQuantumIdentities, of: report.identities)))")
        if !report.classicalIdentities.isEmpty {
            print("Still classical (next renewal first):")
            for item in report.classicalIdentities {
                print("  \(item.notAfter.formatted(.iso8601))  \(item.algorithm.padding(toLength: 9, withPad: " ", startingAt: 0)) \(item.identity)\(item.owner.map { "  (\($0))" } ?? "")")
            }
            if report.moreClassicalIdentities > 0 { print("  … and \(report.moreClassicalIdentities) more") }
        }
        if !proxyMetrics.isEmpty {
            let all = handshakes.reduce(0) { $0 + $1.count }
            let hybrid = handshakes.filter { $0.group == "X25519MLKEM768" }.reduce(0) { $0 + $1.count }
            let pqClients = handshakes.filter { $0.clientKey.hasPrefix("ML-DSA") }.reduce(0) { $0 + $1.count }
            let both = handshakes.filter { $0.group == "X25519MLKEM768" && $0.clientKey.hasPrefix("ML-DSA") && $0.serverKey.hasPrefix("ML-DSA") }.reduce(0) { $0 + $1.count }
            print("Proxy handshakes: \(Int(all))")
            print("  key exchange X25519MLKEM768:     \(Self.percent(hybrid, of: all))")
            print("  ML-DSA client certificates:      \(Self.percent(pqClients, of: all))")
            print("  post-quantum on both axes:       \(Self.percent(both, of: all))  (hybrid group, ML-DSA on both sides)")
            for (url, error) in errors.sorted(by: { $0.key < $1.key }) { print("  \(url): unreadable (\(error))") }
        }
    }

    static func percent(_ part: Int, of whole: Int) -> String { percent(Double(part), of: Double(whole)) }
    static func percent(_ part: Double, of whole: Double) -> String {
        whole > 0 ? String(format: "%.1f %%", part * 100 / whole) : "-"
    }

    /// The `mutual_proxy_tls_handshakes_total` samples of a Prometheus text page.
    static func parse(_ text: String, source: String) -> [ProxyHandshakes] {
        text.split(separator: "\n").compactMap { line -> ProxyHandshakes? in
            guard line.hasPrefix("mutual_proxy_tls_handshakes_total{"), let close = line.lastIndex(of: "}") else { return nil }
            let labelText = line[line.index(line.startIndex, offsetBy: "mutual_proxy_tls_handshakes_total{".count)..<close]
            var labels: [String: String] = [:]
            for pair in labelText.split(separator: ",") {
                let parts = pair.split(separator: "=", maxSplits: 1)
                guard parts.count == 2 else { continue }
                labels[String(parts[0])] = String(parts[1]).trimmingCharacters(in: CharacterSet(charactersIn: "\""))
            }
            guard let value = Double(line[line.index(after: close)...].trimmingCharacters(in: .whitespaces)) else { return nil }
            return ProxyHandshakes(source: source, group: labels["group"] ?? "?", serverKey: labels["server_key"] ?? "?", clientKey: labels["client_key"] ?? "?", count: value)
        }
    }
}

extension String {
    func leftPad(_ width: Int) -> String { count >= width ? self : String(repeating: " ", count: width - count) + self }
}
