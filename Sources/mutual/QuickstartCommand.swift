import ArgumentParser
import Foundation
import MutualAuthority
import MutualPKI
import X509

struct QuickstartCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "quickstart",
        abstract: "A tour in one command: a throwaway CA, a server and a client certificate, verified both ways."
    )

    @Flag(help: "Keep the temporary directory instead of deleting it.")
    var keep = false

    func run() async throws {
        let started = Date.now
        let dir = FileManager.default.temporaryDirectory.appendingPathComponent("mutual-quickstart-\(UUID().uuidString.prefix(8))").path
        defer { if !keep { try? FileManager.default.removeItem(atPath: dir) } }
        let state = StateDirectory(path: dir + "/ca")
        print("1. Creating a throwaway CA in \(state.path)")
        let initResult = try await failing {
            try await Authority.initialize(
                state: state, name: "Quickstart CA", keyType: .p256, constraints: .init(), passphrase: nil, actor: "quickstart"
            )
        }
        print("   root SHA-256 \(initResult.rootFingerprint)")
        let authority = try await failing { try await Authority.open(state: state) }
        do {
            print("2. Issuing a server certificate for localhost / 127.0.0.1 and a client certificate for spiffe://quickstart.test/ns/demo/sa/client")
            let serverKey = try KeyType.p256.generate()
            let server = try await failing {
                try await authority.issue(
                    IssuanceRequest(profile: .server, publicKey: serverKey.publicKey, dnsNames: ["localhost"], ipAddresses: ["127.0.0.1"]),
                    owner: "quickstart", requester: "quickstart"
                )
            }
            let clientKey = try KeyType.p256.generate()
            let client = try await failing {
                try await authority.issue(
                    IssuanceRequest(profile: .workload, publicKey: clientKey.publicKey, uris: ["spiffe://quickstart.test/ns/demo/sa/client"]),
                    owner: "quickstart", requester: "quickstart"
                )
            }
            for (name, issued, key) in [("server", server, serverKey), ("client", client, clientKey)] {
                try FileManager.default.createDirectory(atPath: "\(dir)/\(name)", withIntermediateDirectories: true)
                try AtomicFile.write(KeyFile.pem(for: key, passphrase: nil), to: "\(dir)/\(name)/key.pem", mode: 0o600)
                try AtomicFile.write(PEMBundle.pem(issued.chain), to: "\(dir)/\(name)/chain.pem")
                print("   \(name): serial \(issued.record.serial), identity \(issued.record.identity), until \(issued.record.notAfter)")
            }

            print("3. Verifying both ways against the root, as a TLS client and a TLS server would")
            let checks: [(String, Certificate, ExtendedKeyUsage.Usage, ChainVerifier.PeerName?, Bool)] = [
                ("server as serverAuth for localhost", server.certificate, .serverAuth, .dns("localhost"), true),
                ("client as clientAuth", client.certificate, .clientAuth, nil, true),
                ("client cert used as a server for localhost (must fail)", client.certificate, .serverAuth, .dns("localhost"), false),
                ("server cert used as a client (must fail)", server.certificate, .clientAuth, nil, false),
            ]
            for (label, leaf, eku, peer, expected) in checks {
                let outcome = await ChainVerifier(
                    options: .init(roots: [authority.ca.root], intermediates: [authority.ca.certificate], validationTime: .now, requiredEKU: eku, peerName: peer)
                ).verify(leaf)
                let accepted: Bool
                let detail: String
                switch outcome {
                case .accepted: accepted = true; detail = "accepted"
                case .rejected(let reason): accepted = false; detail = "rejected: \(reason)"
                }
                print("   \(accepted == expected ? "✓" : "✗") \(label): \(detail)")
                if accepted != expected { throw CommandFailure("quickstart check failed: \(label)") }
            }

            print("4. Revoking the client certificate and checking the audit trail")
            _ = try await failing { try await authority.revoke(serial: client.record.serial, reason: .superseded, actor: "quickstart") }
            let records = try await authority.store.certificates(.init(now: .now))
            for r in records {
                print("   \(r.serial)  \(r.profile.padding(toLength: 12, withPad: " ", startingAt: 0)) \(r.effectiveStatus(at: .now).padding(toLength: 8, withPad: " ", startingAt: 0)) \(r.identity)")
            }
            switch try await authority.store.verifyAudit() {
            case .intact(let count, _): print("   audit trail intact: \(count) events")
            case .broken(let sequence, let reason): throw CommandFailure("audit trail broken at #\(sequence): \(reason)")
            }
            try await authority.close()
        } catch {
            try? await authority.close()
            throw error
        }
        print(String(format: "Done in %.1f s.%@", Date.now.timeIntervalSince(started), keep ? " Files kept in \(dir)" : ""))
    }
}
