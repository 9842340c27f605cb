import ArgumentParser
import Foundation
import MutualAuthority
import MutualPKI

/// `mutual dashboard login`: a one-time sign-in link for the dashboard that `mutual serve` serves.
struct DashboardCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "dashboard", abstract: "The authority's web dashboard: inventory, expiries, revocations, tokens, audit trail.",
        subcommands: [Login.self]
    )

    struct Login: AsyncParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Print a one-time login link for the dashboard.",
            discussion: "The link signs one browser in once, before --ttl runs out, into a session cookie (HttpOnly, Secure, SameSite=Strict) that lasts --session; the code is gone from the address bar after sign-in. Sessions end on logout or when the authority restarts. Every login and every action is in the audit trail."
        )
        @OptionGroup var stateOptions: StateOptions
        @Option(help: "How long the link can be used.", transform: ValidityDuration.argument) var ttl: ValidityDuration = .minutes(15)
        @Option(help: "How long the session it opens lasts (at most 12h).", transform: ValidityDuration.argument) var session: ValidityDuration = .hours(1)
        @Flag(help: "A session that can look but not act (for auditors).") var readOnly = false
        @Option(name: .customLong("as"), help: "Name the session acts as in the audit trail (default: your user name).") var name: String?
        @Option(help: "Dashboard address to print (default: where `mutual serve` last served it).") var url: String?
        @Flag(help: "Print JSON.") var json = false

        /// Input mistakes are refused before anything is stored.
        func validate() throws {
            if let name, name.isEmpty || name.count > 64 || !name.allSatisfy({ $0.isLetter || $0.isNumber || "-_.@:".contains($0) }) {
                throw ValidationError("--as '\(name.prefix(64))': 1 to 64 letters, digits or - _ . @ :")
            }
            if let url, URL(string: url).map({ $0.scheme == "https" && $0.host != nil }) != true {
                throw ValidationError("invalid --url '\(url.prefix(100))': expected https://HOST:PORT/dashboard/")
            }
            guard (60...86_400).contains(ttl.timeInterval) else { throw ValidationError("--ttl must be between 1m and 24h (a login link is for now, not for later)") }
            guard (60...(12 * 3600)).contains(session.timeInterval) else { throw ValidationError("--session must be between 1m and 12h") }
        }

        func run() async throws {
            let authority = try await stateOptions.openAuthority()
            let base: String
            let issued: DashboardLoginCode
            do {
                let user = ProcessInfo.processInfo.environment["USER"] ?? ProcessInfo.processInfo.environment["LOGNAME"] ?? "uid\(getuid())"
                issued = try await failing {
                    try await authority.createDashboardLogin(name: name ?? user, readOnly: readOnly, ttl: ttl, session: session, actor: cliActor)
                }
                let recorded = try? await authority.store.metadata(Authority.dashboardURLKey)
                base = url ?? recorded ?? "https://127.0.0.1:9443/dashboard/"
                try await authority.close()
            } catch {
                try? await authority.close()
                throw error
            }
            guard let parsed = URL(string: base), parsed.scheme == "https", parsed.host != nil else {
                throw CommandFailure("invalid --url '\(base.prefix(100))': expected https://HOST:PORT/dashboard/", exitCode: 2)
            }
            let link = (base.hasSuffix("/") ? base : base + "/") + "login?code=" + issued.code
            if json {
                struct View: Encodable { var url: String; var role: String; var actor: String; var expires: Date; var session_seconds: Int64 }
                try printJSON(View(url: link, role: issued.login.role, actor: issued.login.actor, expires: issued.login.expiresAt,
                                   session_seconds: issued.login.sessionSeconds))
            } else {
                print(link)
                FileHandle.standardError.write(Data("one sign-in as \(issued.login.actor) (\(issued.login.role)) until \(issued.login.expiresAt); keep the link private\n".utf8))
            }
        }
    }
}
