import ArgumentParser
import MutualProxy
import Logging
import Foundation
import MutualAuthority
import MutualPKCS11
import MutualPKI
import MutualStore
import NIOCore
import NIOPosix

@main
struct Mutual: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "mutual",
        abstract: "Verifiable machine identities and boring mutual TLS: a private CA, inventory and audit trail.",
        discussion: """
            Start with `mutual quickstart` for a tour, or `mutual init --state-dir DIR` to create a CA.
            The state directory defaults to $MUTUAL_STATE_DIR, else ~/.mutual.
            """,
        subcommands: [
            InitCommand.self, IssueCommand.self, SignCommand.self, ListCommand.self, ShowCommand.self,
            RevokeCommand.self, VerifyCommand.self, AuditCommand.self, ServeCommand.self, ProxyCommand.self, AgentCommand.self, TokenCommand.self, RootCRLCommand.self, ConfigCommand.self, DoctorCommand.self,
            QuickstartCommand.self, BenchCommand.self, ACMECommand.self, DashboardCommand.self, PQCommand.self, CACommand.self, OAuthCommand.self,
        ]
    )

    /// Usage and input errors exit 2 (as `verify` documents for scripts); failures exit 1.
    static func main() async {
        // Every log line of every role escapes control characters, so nothing a client sends (a path, a header value
        // inside an error description) can forge a line.
        LoggingSystem.bootstrap { EscapingLogHandler(wrapping: StreamLogHandler.standardError(label: $0)) }
        do {
            var command = try parseAsRoot()
            if var asyncCommand = command as? any AsyncParsableCommand {
                try await asyncCommand.run()
            } else {
                try command.run()
            }
        } catch let exit as ExitCode {
            Foundation.exit(exit.rawValue)
        } catch let failure as CommandFailure {
            FileHandle.standardError.write(Data("mutual: \(failure.message)\(failure.code.map { " [\($0)]" } ?? "")\n".utf8))
            Foundation.exit(failure.exitCode)
        } catch {
            let code = exitCode(for: error)
            if code == .success {
                exit(withError: error)
            }
            FileHandle.standardError.write(Data((fullMessage(for: error) + "\n").utf8))
            Foundation.exit(code == .validationFailure || code.rawValue == 64 ? 2 : code.rawValue)
        }
    }
}

/// Long-running servers built on Hummingbird run their request handlers as Swift tasks. By default those tasks run on
/// Swift's own thread pool and every request crosses threads twice (event loop → task → event loop). Installing
/// NIO's event loops as the global executor keeps a request on one thread: fewer context switches per request
/// (measured on `mutual bench ca-server`: 4.7 → 2.8 per certificate, about 4 % less CPU). Set
/// MUTUAL_GLOBAL_EXECUTOR=default to keep Swift's pool (for comparison, or if a future toolchain drops the hook).
enum GlobalExecutor {
    static func adoptEventLoops() {
        guard ProcessInfo.processInfo.environment["MUTUAL_GLOBAL_EXECUTOR"] != "default" else { return }
        _ = NIOSingletons.unsafeTryInstallSingletonPosixEventLoopGroupAsConcurrencyGlobalExecutor()
    }
}

/// An error the CLI reports as one line, with its exit code (1: refused/failed, 2: bad usage or input).
struct CommandFailure: Error {
    var message: String
    var exitCode: Int32
    /// The failure's stable code, printed after the message as `[code]` for scripts to match on.
    var code: String?

    init(_ message: String, exitCode: Int32 = 1, code: String? = nil) {
        self.message = message
        self.exitCode = exitCode
        self.code = code
    }

    /// Maps errors from the modules to a one-line message and their code. Input errors exit 2; refusals and
    /// failures exit 1.
    static func from(_ error: any Error) -> CommandFailure {
        switch error {
        case let e as CommandFailure: return e
        case let e as PKIError:
            let input: Set<PKIError.Code> = [.malformedInput, .inputTooLarge, .invalidDuration]
            return CommandFailure(e.reason, exitCode: input.contains(e.code) ? 2 : 1, code: e.code.name)
        case let e as AuthorityError: return CommandFailure(e.reason, exitCode: 1, code: e.code.name)
        case let e as StoreError: return CommandFailure(e.reason, exitCode: 1, code: e.code.name)
        case let e as PKCS11Error: return CommandFailure(e.reason, exitCode: e.code == .badURI ? 2 : 1, code: e.code.name)
        default: return CommandFailure("\(error)", exitCode: 1)
        }
    }
}

/// `--state-dir`, shared by every command that touches a CA.
struct StateOptions: ParsableArguments {
    @Option(name: .long, help: "State directory of the CA (default: $MUTUAL_STATE_DIR, else ~/.mutual).")
    var stateDir: String?

    @Option(help: "PostgreSQL inventory, postgres://user[:password]@host:port/db (default: $MUTUAL_DATABASE_URL, else what `init` recorded, else SQLite in the state directory).")
    var database: String?

    var state: StateDirectory { StateDirectory.resolve(stateDir) }

    var databaseURL: String? {
        if let database, !database.isEmpty { return database }
        if let env = ProcessInfo.processInfo.environment["MUTUAL_DATABASE_URL"], !env.isEmpty { return env }
        return nil
    }

    /// Opens the authority; asks for the passphrase (MUTUAL_PASSPHRASE or a prompt) only if keys are encrypted.
    func openAuthority() async throws -> Authority {
        do {
            return try await Authority.open(state: state, passphrase: Passphrase.read, databaseURL: databaseURL)
        } catch {
            throw CommandFailure.from(error)
        }
    }
}

enum Passphrase {
    /// `MUTUAL_PASSPHRASE`, else a prompt on the terminal; nil when neither is available.
    static func read() -> String? {
        if let env = ProcessInfo.processInfo.environment["MUTUAL_PASSPHRASE"], !env.isEmpty { return env }
        guard isatty(STDIN_FILENO) == 1 else { return nil }
        guard let pointer = getpass("Passphrase for the CA keys: ") else { return nil }
        return String(cString: pointer)
    }
}

/// Runs a body and turns module errors into one-line CLI failures.
func failing<T>(_ body: () async throws -> T) async throws -> T {
    do {
        return try await body()
    } catch let exit as ExitCode {
        throw exit
    } catch {
        throw CommandFailure.from(error)
    }
}

extension ValidityDuration {
    /// `@Option(transform:)` for durations: a bad value is refused with the parser's reason, which lists the units
    /// (ExpressibleByArgument alone can only say "invalid").
    static func argument(_ text: String) throws -> ValidityDuration {
        do {
            return try ValidityDuration(parsing: text)
        } catch let error as PKIError {
            throw ValidationError(error.reason)
        }
    }
}

extension ValidityDuration: ExpressibleByArgument {
    public init?(argument: String) {
        try? self.init(parsing: argument)
    }
}

extension KeyType: ExpressibleByArgument {}
extension MLDSAVariant: ExpressibleByArgument {}

extension KeyChoice: ExpressibleByArgument {
    public init?(argument: String) { self.init(rawValue: argument) }
}
extension RevocationReason: ExpressibleByArgument {}

/// The current user, for audit actors of CLI actions.
var cliActor: String {
    "cli:" + (ProcessInfo.processInfo.environment["USER"] ?? ProcessInfo.processInfo.environment["LOGNAME"] ?? "uid\(getuid())")
}

func printJSON(_ value: some Encodable) throws {
    let encoder = JSONEncoder()
    encoder.outputFormatting = [.prettyPrinted, .sortedKeys, .withoutEscapingSlashes]
    encoder.dateEncodingStrategy = .iso8601
    print(String(decoding: try encoder.encode(value), as: UTF8.self))
}
