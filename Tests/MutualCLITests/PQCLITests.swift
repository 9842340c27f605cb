import Foundation
import MutualPKI
import Testing
import TestSupport
import X509

@Suite("The ML-DSA commands, run as a user runs them", .serialized)
struct PQCLITests {
    static func json(_ text: String) -> [String: Any]? {
        (try? JSONSerialization.jsonObject(with: Data(text.utf8))) as? [String: Any]
    }

    @Test("init --key-type ml-dsa-65, issue, verify, doctor files, pq migrate and pq report")
    func happyPath() async throws {
        let cli = CLI()
        defer { cli.cleanup() }
        let state = cli.home + "/state"
        let initResult = try await cli.run(["init", "--state-dir", state, "--key-type", "ml-dsa-65", "--json"])
        #expect(initResult.status == 0, "\(initResult.output)")
        let made = Self.json(initResult.stdout)
        #expect(made?["pq_key_type"] as? String == "ml-dsa-65")
        #expect((made?["pq_root_fingerprint"] as? String)?.count == 64)
        let env = ["MUTUAL_STATE_DIR": state]

        let issue = try await cli.run(["issue", "--key-type", "ml-dsa-65", "--profile", "workload", "--uri", "spiffe://example.org/ns/web/sa/api", "--out-dir", cli.home + "/w"], environment: env)
        #expect(issue.status == 0, "\(issue.output)")
        let mode = try FileManager.default.attributesOfItem(atPath: cli.home + "/w/key.pem")[.posixPermissions] as? Int
        #expect(mode == 0o600)
        let key = try MLDSASigningKey(pem: try String(contentsOfFile: cli.home + "/w/key.pem", encoding: .utf8), passphrase: { nil })
        let leaf = try MLDSACertificate(pem: Array(try Data(contentsOf: URL(fileURLWithPath: cli.home + "/w/cert.pem"))))
        #expect(leaf.subjectPublicKey == key.publicKey && key.variant == .mlDSA65)

        let verify = try await cli.run(["verify", "--roots", cli.home + "/w/root.pem", "--intermediates", cli.home + "/w/chain.pem", "--eku", "clientAuth", "--json", cli.home + "/w/cert.pem"])
        #expect(verify.status == 0, "\(verify.output)")
        #expect(Self.json(verify.stdout)?["algorithm"] as? String == "ml-dsa-65")
        let wrongRoot = try await cli.run(["verify", "--roots", state + "/ca/root.pem", "--json", cli.home + "/w/cert.pem"])
        #expect(wrongRoot.status == 1 && Self.json(wrongRoot.stdout)?["code"] as? String == "unknown_issuer", "\(wrongRoot.output)")

        let doctor = try await cli.run(["doctor", "files", "--cert", cli.home + "/w/chain.pem", "--key", cli.home + "/w/key.pem", "--ca", cli.home + "/w/root.pem", "--purpose", "client", "--json"])
        #expect(doctor.status == 0, "\(doctor.output)")
        // Another ML-DSA key than the certificate's: key-mismatch, by code.
        try MLDSASigningKey(generating: .mlDSA65).pem(passphrase: nil).write(toFile: cli.home + "/other.key", atomically: true, encoding: .utf8)
        let mismatch = try await cli.run(["doctor", "files", "--cert", cli.home + "/w/chain.pem", "--key", cli.home + "/other.key", "--json"])
        #expect(mismatch.status == 1)
        let findings = Self.json(mismatch.stdout)?["findings"] as? [[String: Any]]
        #expect(findings?.contains { $0["code"] as? String == "key-mismatch" } == true, "\(mismatch.output)")

        let migrate = try await cli.run(["pq", "migrate", "spiffe://example.org/ns/web/*", "--json"], environment: env)
        #expect(migrate.status == 0 && Self.json(migrate.stdout)?["patterns"] as? [String] == ["spiffe://example.org/ns/web/*"], "\(migrate.output)")
        let badPattern = try await cli.run(["pq", "migrate", "spiffe://example.org/*/api"], environment: env)
        #expect(badPattern.status == 2 && badPattern.stderr.contains("spiffe://example.org/*/api"), "\(badPattern.output)")
        let report = try await cli.run(["pq", "report", "--json"], environment: env)
        let inventory = Self.json(report.stdout)?["inventory"] as? [String: Any]
        #expect((inventory?["certificatesByAlgorithm"] as? [String: Int])?["ML-DSA-65"] == 1, "\(report.output)")

        let again = try await cli.run(["pq", "init"], environment: env)
        #expect(again.status == 1, "\(again.output)")
        let audit = try await cli.run(["audit", "verify"], environment: env)
        #expect(audit.status == 0, "\(audit.output)")
    }

    @Test("bad input: unknown key types, ML-DSA without a hierarchy, bad URLs, garbage certificates; nothing is stored")
    func badInput() async throws {
        let cli = CLI()
        defer { cli.cleanup() }
        let state = cli.home + "/state"
        #expect(try await cli.run(["init", "--state-dir", state, "--json"]).status == 0)
        let env = ["MUTUAL_STATE_DIR": state]
        let before = try await cli.run(["list", "--json"], environment: env).stdout

        let bogus = try await cli.run(["issue", "--key-type", "ml-dsa-44", "--profile", "server", "--dns", "a.test", "--out-dir", cli.home + "/x"], environment: env)
        #expect(bogus.status == 2 && bogus.stderr.contains("--key-type"), "\(bogus.output)")
        let noHierarchy = try await cli.run(["issue", "--key-type", "ml-dsa-65", "--profile", "server", "--dns", "a.test", "--out-dir", cli.home + "/x"], environment: env)
        #expect(noHierarchy.status == 1, "\(noHierarchy.output)")
        #expect(!FileManager.default.fileExists(atPath: cli.home + "/x/key.pem"))
        let noMigration = try await cli.run(["pq", "migrate", "spiffe://example.org/ns/web/*"], environment: env)
        #expect(noMigration.status == 1, "\(noMigration.output)")
        let badURL = try await cli.run(["pq", "report", "--proxy-metrics", "ftp://127.0.0.1/metrics"], environment: env)
        #expect(badURL.status == 2, "\(badURL.output)")
        #expect(try await cli.run(["list", "--json"], environment: env).stdout == before, "nothing was stored")

        // Garbage, and an ML-DSA certificate cut in half, as --roots or the certificate: input errors (exit 2).
        #expect(try await cli.run(["pq", "init", "--key-type", "ml-dsa-65"], environment: env).status == 0)
        let issue = try await cli.run(["issue", "--key-type", "ml-dsa-87", "--profile", "server", "--dns", "a.test", "--out-dir", cli.home + "/s"], environment: env)
        #expect(issue.status == 0, "\(issue.output)")
        let pem = try String(contentsOfFile: cli.home + "/s/cert.pem", encoding: .utf8)
        try String(pem.prefix(pem.count / 2)).write(toFile: cli.home + "/half.pem", atomically: true, encoding: .utf8)
        try "garbage".write(toFile: cli.home + "/garbage.pem", atomically: true, encoding: .utf8)
        for leaf in ["half.pem", "garbage.pem"] {
            let result = try await cli.run(["verify", "--roots", cli.home + "/s/root.pem", cli.home + "/" + leaf])
            #expect(result.status == 2, "\(leaf): \(result.output)")
        }
        let halfRoot = try await cli.run(["verify", "--roots", cli.home + "/half.pem", cli.home + "/s/cert.pem"])
        #expect(halfRoot.status == 2, "\(halfRoot.output)")
        // A CSR cut short goes nowhere.
        let key = try MLDSASigningKey(generating: .mlDSA65)
        let csr = try MLDSACertificationRequest.build(subject: DistinguishedName(), extensions: [try .init(SubjectAlternativeNames([.dnsName("c.test")]), critical: false)], key: key)
        try Data(csr.der.prefix(200)).write(to: URL(fileURLWithPath: cli.home + "/short.der"))
        let sign = try await cli.run(["sign", "--profile", "server", "--out", cli.home + "/c.pem", cli.home + "/short.der"], environment: env)
        #expect(sign.status == 2, "\(sign.output)")
        #expect(!FileManager.default.fileExists(atPath: cli.home + "/c.pem"))
    }

    @Test("bench issue splits any count over its workers (a count not a multiple of --concurrency used to trap)")
    func benchUnevenSplit() async throws {
        let cli = CLI()
        defer { cli.cleanup() }
        let result = try await cli.run(["bench", "issue", "--count", "10", "--concurrency", "8", "--state-dir", cli.home + "/bench"])
        #expect(result.status == 0, "\(result.output)")
    }
}
