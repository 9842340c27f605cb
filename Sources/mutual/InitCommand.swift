import ArgumentParser
import Foundation
import MutualAuthority
import MutualPKI

struct InitCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "init",
        abstract: "Create a private CA: a root and an issuing intermediate (path length 0).",
        discussion: """
            Writes ca/root.pem, ca/root.key, ca/intermediate.pem, ca/intermediate.key (keys mode 0600), the SQLite
            inventory mutual.db, config.json and an admin client certificate in admin/. Keys are encrypted with a
            passphrase when MUTUAL_PASSPHRASE is set or --encrypt-keys is given (then you are prompted).
            Prints the SHA-256 fingerprint of the root, which agents pin with --root-fingerprint.
            """
    )

    @OptionGroup var stateOptions: StateOptions

    @Option(help: "Name of the CA, used in the subjects of its certificates.")
    var name: String = "Mutual Internal CA"

    @Option(help: "Key type of the CA keys: \(KeyType.choices).")
    var keyType: KeyType = .p256

    @Option(name: .customLong("permit-dns"), help: "Name constraint: DNS suffix the issuing CA may certify (repeatable).")
    var permitDNS: [String] = []

    @Option(name: .customLong("permit-uri"), help: "Name constraint: URI prefix the issuing CA may certify, e.g. spiffe://example.org/ns/prod (repeatable).")
    var permitURI: [String] = []

    @Option(help: "Longest leaf validity the CA will sign.")
    var maxValidity: ValidityDuration = .days(90)

    @Flag(help: "Encrypt the CA keys with a passphrase (from MUTUAL_PASSPHRASE or a prompt).")
    var encryptKeys = false

    @Flag(help: "Print the result as JSON.")
    var json = false

    func run() async throws {
        let state = stateOptions.state
        var passphrase: String?
        if let env = ProcessInfo.processInfo.environment["MUTUAL_PASSPHRASE"], !env.isEmpty {
            passphrase = env
        } else if encryptKeys {
            guard let entered = Passphrase.read(), !entered.isEmpty else {
                throw CommandFailure("--encrypt-keys needs a passphrase: set MUTUAL_PASSPHRASE or run on a terminal", exitCode: 2)
            }
            passphrase = entered
        }
        let result = try await failing {
            try await Authority.initialize(
                state: state, name: name, keyType: keyType,
                constraints: .init(permittedDNS: permitDNS, permittedURIPrefixes: permitURI),
                passphrase: passphrase, policy: IssuancePolicy(maximumValidity: maxValidity), actor: cliActor,
                databaseURL: stateOptions.databaseURL
            )
        }
        if json {
            try printJSON([
                "state_dir": state.path, "root": state.rootCertificatePath, "intermediate": state.intermediateCertificatePath,
                "root_fingerprint": result.rootFingerprint, "admin_cert": state.adminDirectory + "/cert.pem",
            ])
            return
        }
        print("Created CA \"\(name)\" in \(state.path)")
        print("  root:          \(state.rootCertificatePath)  (\(keyType.rawValue), valid until \(result.root.notValidAfter))")
        print("  issuing CA:    \(state.intermediateCertificatePath)  (path length 0\(permitDNS.isEmpty && permitURI.isEmpty ? "" : ", name constraints"))")
        print("  keys:          \(state.caDirectory)/*.key  (mode 0600\(passphrase != nil ? ", encrypted" : ""))")
        print("  admin client:  \(state.adminDirectory)/cert.pem")
        print("  root SHA-256:  \(result.rootFingerprint)")
        print("Take the root key offline once you no longer need to re-issue the intermediate: see docs/operations.md.")
    }
}

struct RootCRLCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "root-crl",
        abstract: "Re-sign the root's CRL (ca/root-crl.pem) with the next number; needs the root key.",
        discussion: "The root CRL is valid for a year. Run this where the root key is (bring it back from offline storage), then publish the file; `mutual serve` serves it in /crls.pem."
    )

    @OptionGroup var stateOptions: StateOptions

    func run() async throws {
        let state = stateOptions.state
        let result = try await failing { try Authority.refreshRootCRL(state: state, passphrase: Passphrase.read) }
        print("Signed root CRL #\(result.number) in \(state.rootCRLPath), valid until \(result.nextUpdate)")
    }
}
