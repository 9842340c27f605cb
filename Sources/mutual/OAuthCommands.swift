import ArgumentParser
import Foundation
import MutualAuthority
import MutualClient
import MutualPKI
import MutualStore

/// `mutual oauth`: certificate-bound access tokens (RFC 8705) — fetch one with a certificate, introspect one, and
/// look after the keys that sign them.
struct OAuthCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "oauth",
        abstract: "Certificate-bound OAuth access tokens (RFC 8705): get, introspect, signing keys. See docs/oauth.md.",
        subcommands: [Token.self, Introspect.self, Keys.self]
    )

    /// Where the authority is and who we are to it.
    struct ClientOptions: ParsableArguments {
        @Option(help: "The authority's base URL, https://HOST:PORT.") var authority: String
        @Option(help: "Client certificate (PEM; leaf first, chain after it).") var cert: String
        @Option(help: "Its private key (unencrypted PEM).") var key: String
        @Option(help: "Root certificate(s) the authority's TLS certificate chains to (PEM), e.g. the agent's bundle.pem.") var ca: String

        func client() throws -> AuthorityClient {
            let roots = try readCertificates(ca, what: "--ca")
            let chain = try readCertificates(cert, what: "--cert")
            let pem = try inputFailure { String(decoding: try AtomicFile.read(key, limit: 1 << 20, what: "--key"), as: UTF8.self) }
            let signingKey = try inputFailure { try AnySigningKey(pem: pem, passphrase: { nil }) }
            return try AuthorityClient(
                baseURL: authority, trustRoots: roots.map { .classical($0) },
                anyIdentity: (chain.map { .classical($0) }, signingKey), timeout: .seconds(15)
            )
        }
    }

    struct Token: AsyncParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Get an access token bound to --cert (client_credentials over mTLS) and print it.",
            discussion: """
                Prints the token alone, for scripts: curl -H "Authorization: Bearer $(mutual oauth token …)" with the
                same --cert/--key. With --json, the token endpoint's whole answer. Refusals exit 1 and end with the
                authority's code, e.g. [oauth-scope-not-allowed].
                """
        )
        @OptionGroup var client: ClientOptions
        @Option(help: "Audience (resource) the token is for; may be left out when the policy allows this identity exactly one.") var audience: String?
        @Option(name: .customLong("scope"), help: "Scope to ask for (repeatable; default: all the policy allows for the audience).") var scopes: [String] = []
        @Flag(help: "Print the token endpoint's JSON answer.") var json = false

        func run() async throws {
            let authority = try client.client()
            defer { Task { try? await authority.shutdown() } }
            let answer: [String: Any]
            do {
                answer = try await authority.accessToken(audience: audience, scopes: scopes)
            } catch let error as AuthorityClientError {
                try? await authority.shutdown()
                throw CommandFailure("the authority refused the token: \(error.detail)", code: error.type)
            }
            try? await authority.shutdown()
            guard let token = answer["access_token"] as? String else {
                throw CommandFailure("the authority's answer has no access_token", code: "malformed-response")
            }
            if json {
                let data = try JSONSerialization.data(withJSONObject: answer, options: [.prettyPrinted, .sortedKeys, .withoutEscapingSlashes])
                print(String(decoding: data, as: UTF8.self))
            } else {
                print(token)
            }
        }
    }

    struct Introspect: AsyncParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Ask the authority whether a token is active (RFC 7662): prints its claims, exit 1 when inactive.",
            discussion: "Needs the admin certificate, or one the authority lets introspect (--oauth-introspector)."
        )
        @OptionGroup var client: ClientOptions
        @Argument(help: "The access token ('-' reads it from standard input).") var token: String

        func run() async throws {
            var text = token
            if token == "-" { text = (readLine(strippingNewline: true) ?? "").trimmingCharacters(in: .whitespaces) }
            let authority = try client.client()
            let answer: [String: Any]
            do {
                answer = try await authority.introspect(token: text)
            } catch let error as AuthorityClientError {
                try? await authority.shutdown()
                throw CommandFailure("introspection refused: \(error.detail)", code: error.type)
            }
            try? await authority.shutdown()
            let data = try JSONSerialization.data(withJSONObject: answer, options: [.prettyPrinted, .sortedKeys, .withoutEscapingSlashes])
            print(String(decoding: data, as: UTF8.self))
            if answer["active"] as? Bool != true { throw ExitCode(1) }
        }
    }

    struct Keys: AsyncParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "The keys that sign access tokens: list them, or rotate with overlap.",
            subcommands: [List.self, Rotate.self], defaultSubcommand: List.self
        )

        struct List: AsyncParsableCommand {
            static let configuration = CommandConfiguration(abstract: "List signing keys with their stage (next, active, previous, retired).")
            @OptionGroup var stateOptions: StateOptions
            @Flag(help: "Print JSON.") var json = false

            func run() async throws {
                let ring = OAuthKeyRing(directory: stateOptions.state.path + "/oauth", passphrase: nil, keyStore: nil)
                let entries = try await failing { try ring.entries() }
                let now = Date.now
                let rows = entries.enumerated().map { index, entry in
                    let successorActive = entries[(index + 1)...].contains { $0.activatesAt <= now }
                    return (entry, entry.stage(at: now, successorActive: successorActive))
                }
                if json {
                    struct View: Encodable {
                        var kid: String
                        var alg: String
                        var stage: String
                        var activates_at: Date
                        var retires_at: Date?
                        var key: String
                    }
                    try printJSON(rows.map { View(kid: $0.0.kid, alg: $0.0.alg, stage: $0.1, activates_at: $0.0.activatesAt, retires_at: $0.0.retiresAt, key: $0.0.keyStore ?? $0.0.file ?? "") })
                    return
                }
                guard !rows.isEmpty else {
                    print("No access-token signing keys yet: `mutual serve --oauth-allow …` makes the first.")
                    return
                }
                var table = [["KID", "ALG", "STAGE", "SIGNS FROM", "LEAVES JWKS"]]
                for (entry, stage) in rows {
                    table.append([entry.kid, entry.alg, stage, AuditTime.short(entry.activatesAt), entry.retiresAt.map(AuditTime.short) ?? "-"])
                }
                printTable(table)
            }
        }

        struct Rotate: AsyncParsableCommand {
            static let configuration = CommandConfiguration(
                abstract: "Make a new signing key: published now, signing after --publish-ahead; the old one leaves the JWKS --keep-previous later.",
                discussion: """
                    A running `mutual serve` on this state directory follows within a second (copy oauth/ to replicas).
                    --publish-ahead must exceed how long resource servers cache the JWKS (the proxy: 60 s, and it
                    refetches on an unknown kid); --keep-previous must exceed the token lifetime, so tokens signed
                    just before the switch stay valid until they expire. --emergency (a key believed stolen) switches
                    at once and drops the old key: its tokens stop working immediately.
                    """
            )
            @OptionGroup var stateOptions: StateOptions
            @Option(help: "How long the new key is published before it signs (0 signs at once; the proxy fetches a key it does not know).", transform: Self.durationOrZero) var publishAhead: TimeInterval = 600
            @Option(help: "How long the replaced key stays published after the switch.", transform: ValidityDuration.argument) var keepPrevious: ValidityDuration = .hours(1)
            @Flag(help: "Switch now and withdraw the old key at once (its tokens fail from now on).") var emergency = false

            /// A duration as everywhere else, or `0` / `0s`.
            static func durationOrZero(_ text: String) throws -> TimeInterval {
                if text == "0" || text == "0s" { return 0 }
                return try ValidityDuration.argument(text).timeInterval
            }

            func run() async throws {
                let authority = try await stateOptions.openAuthority()
                defer { Task { try? await authority.close() } }
                let service = OAuthService(authority: authority, settings: OAuthSettings(), issuer: "")
                let now = Date.now
                let entry = try await failing {
                    try service.keys.rotate(
                        publishAhead: emergency ? 0 : publishAhead, keepPrevious: emergency ? 0 : keepPrevious.timeInterval, now: now
                    )
                }
                try? await authority.store.appendAudit(AuditEntry(
                    time: now, actor: cliActor, action: "oauth-key-rotate", subject: "oauth-key:\(entry.kid)",
                    details: ["activates_at": AuditChain.format(entry.activatesAt), "emergency": emergency ? "true" : "false"]
                ))
                print("New signing key \(entry.kid): published now, signs from \(AuditChain.format(entry.activatesAt))\(emergency ? " (emergency: the previous key is withdrawn)" : "; the previous key leaves the JWKS at \(AuditChain.format(entry.activatesAt.addingTimeInterval(keepPrevious.timeInterval)))").")
            }
        }
    }
}
