import ArgumentParser
import Foundation
import MutualAuthority
import MutualPKI
import MutualStore

struct PQCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "pq",
        abstract: "The post-quantum (ML-DSA) hierarchy: add it to a CA and follow the migration.",
        subcommands: [PQInitCommand.self]
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

func printPQHierarchy(_ hierarchy: MLDSAHierarchy, state: StateDirectory) {
    let variant = hierarchy.root.subjectKeyVariant?.rawValue ?? "ML-DSA"
    print("  PQ root:       \(state.pqRootCertificatePath)  (\(variant), valid until \(hierarchy.root.notAfter))")
    print("  PQ issuing CA: \(state.pqIntermediateCertificatePath)  (certifies every ML-DSA key)")
    print("  PQ root SHA-256: \(hierarchy.root.fingerprint)")
}
