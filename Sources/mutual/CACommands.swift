import ArgumentParser
import Foundation
import MutualAuthority
import MutualPKI
import MutualStore

struct CACommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "ca",
        abstract: "The CA's own certificates: rotate the issuing CA or the root without downtime, and see where a rotation is.",
        subcommands: [CARotateCommand.self, CAStatusCommand.self]
    )
}

extension CARotation.Kind: ExpressibleByArgument {}

struct CARotateCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "rotate",
        abstract: "Replace the issuing CA (intermediate) or the root in three stages: prepare, activate, retire.",
        discussion: """
            prepare   makes the new CA (its key in the same token as the current one, or a file) and publishes it in
                      /roots.pem and /bundle.pem; the current CA keeps issuing. For a root: a new root, its CRL, a new
                      issuing CA under it, and a cross-certificate of the new root by the current one.
            activate  issues from the new CA. Certificates of the old one stay valid and revocable (its CRL at /crl or
                      /crl/gN, OCSP answered by it); agents renew onto the new chain at their normal schedule. The admin
                      client certificate is re-issued from the new CA.
            retire    once no valid certificate of the old CA remains (it says how many do, and whose; --force to
                      retire anyway), drops it from the bundles.
            Every stage is in the audit trail (`ca-rotate`); a running `mutual serve` on this state directory picks it up
            within a second. Making a CA needs the current root key (bring it back if it is offline).
            """
    )

    @OptionGroup var stateOptions: StateOptions

    @Argument(help: "What to rotate: intermediate|root.")
    var kind: CARotation.Kind

    @Option(help: "Stage: prepare|activate|retire.")
    var stage: String

    @Flag(help: "retire: even though certificates of the old CA are still valid.")
    var force = false

    @Flag(help: "activate: ask agents to renew onto the new CA at their next check (within 5 minutes) instead of at their normal schedule.")
    var renewNow = false

    @Flag(help: "Print the result as JSON.")
    var json = false

    func validate() throws {
        guard ["prepare", "activate", "retire"].contains(stage) else {
            throw ValidationError("--stage must be prepare, activate or retire (got '\(stage)')")
        }
        if renewNow && stage != "activate" { throw ValidationError("--renew-now goes with --stage activate") }
        if force && stage != "retire" { throw ValidationError("--force goes with --stage retire") }
    }

    func run() async throws {
        let authority = try await stateOptions.openAuthority()
        do {
            let report = try await failing { () -> RotationReport in
                switch stage {
                case "prepare": return try await authority.prepareRotation(kind, passphrase: Passphrase.read, actor: cliActor)
                case "activate": return try await authority.activateRotation(kind, passphrase: Passphrase.read, renewNow: renewNow, actor: cliActor)
                default: return try await authority.retireRotation(kind, force: force, actor: cliActor)
                }
            }
            try await authority.close()
            if json {
                try printJSON(["kind": report.kind.rawValue, "stage": report.stage, "generation": String(report.generation), "summary": report.lines.joined(separator: "\n")])
                return
            }
            print("\(report.kind.rawValue) rotation: \(report.stage) done (generation \(report.generation))")
            for line in report.lines { print("  \(line)") }
        } catch {
            try? await authority.close()
            throw error
        }
    }
}

struct CAStatusCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "status",
        abstract: "The CA's issuing CAs and roots, their rotation stages, and the valid certificates each issuing CA has out."
    )

    @OptionGroup var stateOptions: StateOptions

    @Flag(help: "Print the result as JSON.")
    var json = false

    func run() async throws {
        let authority = try await stateOptions.openAuthority()
        defer { Task { try? await authority.close() } }
        let cas = try await failing { try await authority.caStatus() }
        if json {
            try printJSON(cas)
            return
        }
        for ca in cas {
            let name = (ca.kind == "intermediate" ? "g" : "r") + String(ca.generation)
            var line = "\(ca.kind) \(name)  \(ca.stage)  \(ca.subject)  until \(AuditChain.format(ca.notAfter))  key: \(ca.keyStore)"
            if let count = ca.validCertificates {
                let owners = (ca.owners ?? [:]).sorted { $0.value > $1.value }.map { "\($0.key) \($0.value)" }.joined(separator: ", ")
                line += "\n    \(count) valid certificate(s)\(owners.isEmpty ? "" : ": \(owners)")"
            }
            print(line)
        }
    }
}
