import ArgumentParser
import Foundation
import Logging
import MutualAgent
import MutualPKCS11
import MutualPKI

struct AgentCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "agent",
        abstract: "Keep a local key and an always-fresh certificate: enroll with a token, renew over mTLS, deliver atomically.",
        subcommands: [Run.self, Status.self],
        defaultSubcommand: Run.self
    )

    struct Run: AsyncParsableCommand {
        static let configuration = CommandConfiguration(
            commandName: "run",
            abstract: "Enroll (first run, with --token), then renew at --renew-at of the lifetime (with jitter) until stopped.",
            discussion: """
                Trust in the authority comes from --root-fingerprint (SHA-256 of the root's DER, as `mutual init` prints
                it; colons optional). The private key is generated here (mode 0600) and never sent. OUT-DIR gets key.pem,
                cert.pem, chain.pem (leaf + intermediate), bundle.pem (roots) and status.json; each version is published
                with one atomic rename. Failures are retried with capped exponential backoff while the current
                certificate keeps being served. Exit status 1 when renewal cannot succeed without a person (revoked,
                expired beyond the authority's grace, token refused, fingerprint mismatch).
                """
        )

        @Option(help: "The authority's base URL, https://HOST:PORT.") var authority: String
        @Option(help: "SHA-256 fingerprint of the authority's root certificate (hex, colons optional).") var rootFingerprint: String
        @Option(help: "Enrollment token (needed for the first run only).") var token: String?
        @Option(help: "Identity to request: a SPIFFE ID / URI (URI SAN) or a DNS name.") var identity: String
        @Option(name: .customLong("dns"), help: "Additional DNS SAN (repeatable).") var dnsNames: [String] = []
        @Option(help: "Directory for key.pem, cert.pem, chain.pem, bundle.pem and status.json.") var outDir: String
        @Option(help: "Key type: \(KeyChoice.choices). An identity the authority moves to ML-DSA (`mutual pq migrate`) switches at its next renewal by itself.") var keyType: KeyChoice = .classical(.p256)
        @Option(help: "Keep the private key in a PKCS#11 token (RFC 7512 URI naming token and object, with module-path and pin-source), e.g. a TPM through libtpm2_pkcs11: generated there on first use, kept across renewals, never written to disk; out-dir gets key.uri instead of key.pem.") var keyStore: String?
        @Option(help: "Renew after this fraction of the lifetime, e.g. 2/3 or 0.5.") var renewAt: String = "2/3"
        @Option(help: "How often to ask the authority whether a CA rotation wants certificates renewed now (`mutual ca rotate … --renew-now`).", transform: ValidityDuration.argument) var caCheck: ValidityDuration = .minutes(5)
        @Option(help: "Requested lifetime at enrollment (within the token's maximum), e.g. 24h.", transform: ValidityDuration.argument) var validity: ValidityDuration?
        @Option(help: "Profile to request at enrollment (default: the token's).") var profile: String?
        @Option(help: "Command run with /bin/sh after each delivery, e.g. 'systemctl reload nginx'.") var exec: String?
        @Option(help: "Signal sent after each delivery to the process in --pid-file, e.g. HUP.") var signal: String?
        @Option(help: "File holding the PID to signal.") var pidFile: String?
        @Option(help: "Keep this file filled with the CRLs of every CA level (PEM, for nginx ssl_crl): fetched from the authority, checked, written atomically when they change, then the reload hook runs.") var crlOut: String?
        @Option(help: "Refresh --crl-out at least this often (and always before the CRLs' nextUpdate).", transform: ValidityDuration.argument) var crlRefresh: ValidityDuration = .minutes(5)
        @Flag(help: "Enroll or renew if due, then exit (for cron/CI).") var once = false
        @Option(help: "Log level: trace|debug|info|notice|warning|error|critical.") var logLevel: String = "info"

        func run() async throws {
            let fraction = try inputFailure { try Self.parseFraction(renewAt) }
            var signalNumber: Int32?
            if let signal {
                guard let number = Self.signals[signal.uppercased().replacingOccurrences(of: "SIG", with: "")] else {
                    throw CommandFailure("unknown --signal '\(signal)': use HUP, USR1, USR2, TERM or INT", exitCode: 2)
                }
                guard pidFile != nil else { throw CommandFailure("--signal needs --pid-file", exitCode: 2) }
                signalNumber = number
            }
            var configuration = try inputFailure {
                try Agent.Configuration(
                    authority: authority, rootFingerprint: rootFingerprint, token: token, identity: identity, dnsNames: dnsNames,
                    outDir: outDir, keyType: keyType, schedule: RenewalSchedule(fraction: fraction), validity: validity, profile: profile,
                    hook: ReloadHook(exec: exec, signal: signalNumber, pidFile: pidFile)
                )
            }
            configuration.caCheckInterval = max(1, caCheck.timeInterval)
            if let keyStore {
                do {
                    configuration.keyStore = try PKCS11URI(keyStore)
                } catch let error as PKCS11Error {
                    throw CommandFailure("invalid --key-store: \(error.reason)", exitCode: 2, code: error.code.name)
                }
            }
            var logger = Logger(label: "mutual.agent")
            logger.logLevel = Logger.Level(rawValue: logLevel) ?? .info
            let agent = Agent(configuration: configuration, logger: logger)
            if let crlOut, crlOut.isEmpty || crlOut.hasSuffix("/") {
                throw CommandFailure("invalid --crl-out '\(crlOut)': expected a file path", exitCode: 2)
            }
            let refresher = crlOut.map {
                var refresherConfiguration = CRLRefresher.Configuration(
                    authority: configuration.authority, outDir: outDir, crlPath: $0, interval: crlRefresh, hook: configuration.hook
                )
                refresherConfiguration.keyStore = configuration.keyStore
                return CRLRefresher(configuration: refresherConfiguration, logger: logger)
            }
            if once {
                switch await agent.step() {
                case .enrolled(let serial): print("enrolled: serial \(serial) in \(outDir)")
                case .renewed(let serial): print("renewed: serial \(serial) in \(outDir)")
                case .notDue(let until): print("not due: renewal at \(until)")
                case .failed(let reason, _): throw CommandFailure(reason)
                case .stopped(let reason): throw CommandFailure(reason)
                }
                if let refresher {
                    switch await refresher.refresh() {
                    case .fresh(let changed, let nextUpdate, _): print("CRLs \(changed ? "written to" : "unchanged in") \(refresher.configuration.crlPath) (next update \(nextUpdate))")
                    case .failed(let reason, _): throw CommandFailure(reason)
                    }
                }
                return
            }
            let task = Task {
                try await withThrowingTaskGroup(of: Void.self) { group in
                    group.addTask { try await agent.run() }
                    if let refresher { group.addTask { try await refresher.run() } }
                    // The first to end (the agent stopping for good, or cancellation) ends the other.
                    try await group.next()
                    group.cancelAll()
                }
            }
            let stop = AsyncStream<Int32> { continuation in
                for number in [SIGTERM, SIGINT] {
                    Foundation.signal(number, SIG_IGN)
                    let source = DispatchSource.makeSignalSource(signal: number, queue: .global())
                    source.setEventHandler { continuation.yield(number) }
                    source.resume()
                    SignalKeeper.shared.keep(source)
                }
            }
            let watcher = Task {
                for await _ in stop { task.cancel(); break }
            }
            do {
                try await task.value
            } catch is CancellationError {
                logger.info("stopped by signal")
            } catch let error as AgentError {
                watcher.cancel()
                throw CommandFailure(error.message)
            }
            watcher.cancel()
        }

        static let signals: [String: Int32] = ["HUP": SIGHUP, "USR1": SIGUSR1, "USR2": SIGUSR2, "TERM": SIGTERM, "INT": SIGINT]

        static func parseFraction(_ text: String) throws -> Double {
            let parts = text.split(separator: "/")
            let value: Double?
            if parts.count == 2, let a = Double(parts[0]), let b = Double(parts[1]), b != 0 { value = a / b } else { value = Double(text) }
            guard let value, value > 0, value < 1 else {
                throw CommandFailure("invalid --renew-at '\(text)': a fraction between 0 and 1 such as 2/3 or 0.5", exitCode: 2)
            }
            return value
        }
    }

    struct Status: AsyncParsableCommand {
        static let configuration = CommandConfiguration(abstract: "Show what the agent delivered and how long until expiry.")
        @Option(help: "The agent's output directory.") var outDir: String
        @Flag(help: "Print JSON.") var json = false

        func run() async throws {
            guard let status = AgentStatus.read(outDir: outDir) else {
                throw CommandFailure("no agent status in \(outDir) (has `mutual agent` run with --out-dir \(outDir)?)", exitCode: 1)
            }
            // Times in the status are the authority's; compare them with the authority's now.
            let now = Date().addingTimeInterval(abs(status.clockSkewSeconds ?? 0) >= 2 ? status.clockSkewSeconds ?? 0 : 0)
            if json {
                struct View: Encodable {
                    var status: AgentStatus
                    var expires_in_seconds: Double?
                }
                let encoder = JSONEncoder()
                encoder.dateEncodingStrategy = .iso8601
                encoder.outputFormatting = [.prettyPrinted, .sortedKeys, .withoutEscapingSlashes]
                let data = try encoder.encode(View(status: status, expires_in_seconds: status.notAfter.map { $0.timeIntervalSince(now).rounded() }))
                print(String(decoding: data, as: UTF8.self))
                return
            }
            func ago(_ date: Date?) -> String {
                guard let date else { return "-" }
                let s = Int(date.timeIntervalSince(now))
                return "\(date) (\(s >= 0 ? "in \(s)s" : "\(-s)s ago"))"
            }
            print("identity:        \(status.identity)")
            print("authority:       \(status.authority)")
            print("state:           \(status.state)")
            print("serial:          \(status.serial ?? "-")")
            print("expires:         \(ago(status.notAfter))")
            print("renews at:       \(ago(status.renewAt))\(status.renewalMethod.map { $0 == "proof" ? " (by proof of possession: no clientAuth)" : " (over mTLS)" } ?? "")")
            print("last success:    \(ago(status.lastSuccess))")
            print("renewals:        \(status.renewals)")
            if let error = status.lastError {
                print("last error:      \(error) (\(status.consecutiveFailures) consecutive failures)")
                if let code = status.lastErrorCode { print("error code:      \(code)") }
                if let hint = Self.hint(for: status.lastErrorCode) { print("what to do:      \(hint)") }
            }
            if let skew = status.clockSkewSeconds {
                print("clock skew:      \(skew)s (authority minus local)\(abs(skew) > 60 ? " — this host's clock is off; renewals follow the authority's clock" : "")")
            }
            if status.state == "stopped" { throw ExitCode(1) }
        }
    }
}

extension AgentCommand.Status {
    /// What a person does about the last error, by its code.
    static func hint(for code: String?) -> String? {
        switch code {
        case "token-used-up", "token-expired", "token-revoked", "token-invalid":
            return "create a new token (mutual token create --scope … --uses 1) and run the agent again with --token"
        case "token-out-of-scope", "token-not-allowed":
            return "the token does not allow this identity, profile or lifetime: create one with a matching --scope/--profile/--max-validity"
        case "transport", "failed":
            return "check --authority (URL, port, network, firewall); the agent keeps retrying with backoff"
        case "certificate_verify_failed":
            return "the authority's certificate does not verify: check --root-fingerprint and this host's clock"
        case "clock-skew", "certificate-not-yet-valid":
            return "fix this host's clock (NTP); meanwhile the agent follows the authority's clock and keeps retrying"
        case "certificate-revoked":
            return "find out why it was revoked (mutual show SERIAL), then enroll again with a new token"
        case "certificate-expired", "beyond-grace", "renew-expired-disabled":
            return "the certificate lapsed and cannot be renewed: enroll again with a new token"
        case "certificate-unknown":
            return "the authority does not know this certificate (another CA, or a restored inventory): enroll again with a new token"
        case "unsupported-certificate":
            return "upgrade the authority: this certificate renews by proof of possession"
        default:
            return nil
        }
    }
}

/// Keeps dispatch signal sources alive for the process lifetime.
final class SignalKeeper: @unchecked Sendable {
    static let shared = SignalKeeper()
    private let lock = NSLock()
    private var sources: [any DispatchSourceSignal] = []
    func keep(_ source: any DispatchSourceSignal) {
        lock.lock()
        sources.append(source)
        lock.unlock()
    }
}

/// Input problems in flags exit 2 with the reason.
func inputFailure<T>(_ body: () throws -> T) throws -> T {
    do {
        return try body()
    } catch let failure as CommandFailure {
        throw failure
    } catch let error as PKIError {
        throw CommandFailure(error.reason, exitCode: 2)
    } catch {
        throw CommandFailure("\(error)", exitCode: 2)
    }
}
