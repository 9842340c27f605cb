import ArgumentParser
import Foundation
import Logging
import MutualAuthority
import MutualClient
import MutualPKI
import MutualServer
import X509

struct QuickstartCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "quickstart",
        abstract: "A tour in one command: a throwaway authority on 127.0.0.1, a token, enrollment over the API, renewal over mTLS, revocation, inventory and audit."
    )

    @Flag(help: "Keep the temporary directory instead of deleting it.")
    var keep = false

    func run() async throws {
        let started = Date.now
        let dir = FileManager.default.temporaryDirectory.appendingPathComponent("mutual-quickstart-\(UUID().uuidString.prefix(8))").path
        defer { if !keep { try? FileManager.default.removeItem(atPath: dir) } }
        let state = StateDirectory(path: dir + "/ca")
        func step(_ text: String) { print(String(format: "[%4.1fs] ", Date.now.timeIntervalSince(started)) + text) }

        step("Creating a throwaway CA in \(state.path) (SQLite inventory, P-256)")
        let initResult = try await failing {
            try await Authority.initialize(state: state, name: "Quickstart CA", keyType: .p256, constraints: .init(), passphrase: nil, actor: "quickstart")
        }
        print("       root SHA-256 \(initResult.rootFingerprint)")
        let authority = try await failing { try await Authority.open(state: state) }
        var logger = Logger(label: "mutual.quickstart")
        logger.logLevel = .critical
        let server = AuthorityServer(authority: authority, configuration: .init(host: "127.0.0.1", port: 0), logger: logger)
        let (ports, portContinuation) = AsyncStream<Int>.makeStream()
        let serverTask = Task { try await server.run { portContinuation.yield($0) } }
        var port = 0
        for await p in ports { port = p; break }
        let url = "https://127.0.0.1:\(port)"
        do {
            step("Authority listening on \(url) (its own server certificate, issued from the intermediate)")

            let token = try await failing {
                try await TokenService(store: authority.store).create(
                    scopes: ["spiffe://quickstart.test/ns/demo/*"], profile: .workload, maxValidity: .hours(24), ttl: .minutes(10),
                    uses: 1, owner: "quickstart", actor: "quickstart", caMaximum: authority.ca.policy.maximumValidity
                )
            }
            step("Minted a 1-use token for spiffe://quickstart.test/ns/demo/* (only its hash is stored)")

            let key = try KeyType.p256.generate()
            let identity = "spiffe://quickstart.test/ns/demo/sa/api"
            let csr = try CertificateSigningRequest(
                version: .v1, subject: DistinguishedName(), privateKey: key,
                attributes: try .init([.init(ExtensionRequest(extensions: try Certificate.Extensions { SubjectAlternativeNames([.uniformResourceIdentifier(identity)]) }))]),
                signatureAlgorithm: .ecdsaWithSHA256
            )
            let anonymous = try AuthorityClient(baseURL: url, trustRoots: [authority.ca.root])
            let enrolled = try await anonymous.sign(csrPEM: try csr.serializeAsPEM().pemString, token: token.token)
            step("Enrolled \(identity) over POST /v1/sign: serial \(enrolled.serial), until \(enrolled.notAfter)")
            do {
                _ = try await anonymous.sign(csrPEM: try csr.serializeAsPEM().pemString, token: token.token)
                throw CommandFailure("quickstart: a used-up token was accepted")
            } catch let error as AuthorityClientError {
                step("Second use of the token refused: \(error.status) \(error.detail)")
            }
            try await anonymous.shutdown()

            let mtls = try AuthorityClient(baseURL: url, trustRoots: [authority.ca.root], identity: (enrolled.chain, key))
            let newKey = try KeyType.p256.generate()
            let renewCSR = try CertificateSigningRequest(version: .v1, subject: DistinguishedName(), privateKey: newKey, attributes: .init(), signatureAlgorithm: .ecdsaWithSHA256)
            let renewed = try await mtls.renew(csrPEM: try renewCSR.serializeAsPEM().pemString)
            step("Renewed over mTLS with a new key: serial \(renewed.serial), same identity, until \(renewed.notAfter)")

            let verdict = await ChainVerifier(options: .init(
                roots: [authority.ca.root], intermediates: [authority.ca.certificate], validationTime: .now, requiredEKU: .clientAuth
            )).verify(renewed.certificate)
            if case .rejected(let reason) = verdict { throw CommandFailure("quickstart: renewed certificate rejected: \(reason)") }
            step("The renewed certificate verifies as a TLS client (chain, EKU clientAuth)")

            try await mtls.revoke(serial: enrolled.serial, reason: "superseded")
            do {
                _ = try await mtls.renew(csrPEM: try renewCSR.serializeAsPEM().pemString)
                throw CommandFailure("quickstart: a revoked certificate renewed")
            } catch let error as AuthorityClientError {
                step("Revoked the old certificate; it can no longer renew: \(error.status) \(error.detail)")
            }
            try await mtls.shutdown()

            print("\nInventory:")
            for r in try await authority.store.certificates(.init(now: .now)) {
                print("  \(r.serial)  \(r.profile.padding(toLength: 12, withPad: " ", startingAt: 0)) \(r.effectiveStatus(at: .now).padding(toLength: 8, withPad: " ", startingAt: 0)) \(r.identity)  (by \(r.requester))")
            }
            print("\nAudit trail:")
            for e in try await authority.store.auditEvents() {
                print("  #\(e.sequence) \(e.action.padding(toLength: 12, withPad: " ", startingAt: 0)) \(e.actor.padding(toLength: 40, withPad: " ", startingAt: 0)) \(e.subject)")
            }
            switch try await authority.store.verifyAudit() {
            case .intact(let count, _): print("  audit trail intact: \(count) events, hash chain verified")
            case .broken(let sequence, let reason): throw CommandFailure("audit trail broken at #\(sequence): \(reason)")
            }
        } catch {
            serverTask.cancel()
            _ = try? await serverTask.value
            try? await authority.close()
            throw error
        }
        serverTask.cancel()
        _ = try? await serverTask.value
        try await authority.close()
        print(String(format: "\nDone in %.1f s.%@", Date.now.timeIntervalSince(started), keep ? " Files kept in \(dir)" : ""))
    }
}
