import ArgumentParser
import Foundation
import MutualPKCS11
import MutualPKI
import X509

/// Certificate signatures per second with the CA key in a PKCS#11 token beside the same work with a software key,
/// in one run: the TBS, its signature (through the token, or in process) and the DER. Says what a token-held CA costs.
struct BenchSign: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "sign", abstract: "Certificate signing rate: a key in a PKCS#11 token beside a software key, same run."
    )

    @Option(help: "PKCS#11 URI of the token and a key label (generated there when absent), e.g. 'pkcs11:token=bench;object=bench?module-path=/usr/lib/softhsm/libsofthsm2.so&pin-source=file:/tmp/pin'.") var keyStore: String
    @Option(help: "Key type: p256|p384|ed25519.") var keyType: KeyType = .p256
    @Option(help: "Certificates to sign with each key.") var count = 5_000
    @Option(help: "Concurrent signers (the token gets one session each, pooled).") var concurrency = 8
    @Flag(help: "Print JSON.") var json = false

    func validate() throws {
        guard (1...1_000_000).contains(count), (1...256).contains(concurrency) else {
            throw ValidationError("--count must be 1...1000000 and --concurrency 1...256")
        }
    }

    func run() async throws {
        let uri = try await failing { try PKCS11URI(keyStore) }
        let tokenKey = try await failing { try PKCS11Key.findOrGenerate(uri, keyType: keyType) }
        let software = try keyType.generate()
        let subjectKey = try KeyType.p256.generate().publicKey
        var results: [String: Double] = [:]
        var lines: [String] = []
        for (name, key) in [("software", software), ("token", tokenKey.certificatePrivateKey)] {
            let issuer = try DistinguishedName { CommonName("Bench \(name) CA") }
            let cpuBefore = BenchIssue.cpuSeconds()
            let started = ContinuousClock.now
            let failures = try await BenchIssue.failures(count: count, concurrency: concurrency) { index in
                _ = try Certificate(
                    version: .v3, serialNumber: IssuingCA.randomSerialNumber(), publicKey: subjectKey,
                    notValidBefore: Date(), notValidAfter: Date().addingTimeInterval(3600), issuer: issuer,
                    subject: try DistinguishedName { CommonName("leaf \(index)") }, signatureAlgorithm: key.preferredSignatureAlgorithm,
                    extensions: Certificate.Extensions(), issuerPrivateKey: key
                )
            }
            let elapsed = ContinuousClock.now - started
            let cpu = BenchIssue.cpuSeconds() - cpuBefore
            let seconds = Double(elapsed.components.seconds) + Double(elapsed.components.attoseconds) / 1e18
            let rate = Double(count - failures) / seconds
            let cpuPer = cpu / Double(max(1, count - failures)) * 1e6
            results["\(name)_per_second"] = rate
            results["\(name)_cpu_us_per_signature"] = cpuPer
            results["\(name)_failures"] = Double(failures)
            lines.append(String(format: "%@: %d certificates in %.2f s, %.0f/s, %.0f µs CPU each (this process; a token's own work is in its module, in-process for SoftHSM)", name, count - failures, seconds, rate, cpuPer))
        }
        results["token_to_software_ratio"] = (results["token_per_second"] ?? 0) / max(1, results["software_per_second"] ?? 1)
        if json {
            try printJSON(results)
        } else {
            lines.forEach { print($0) }
            print(String(format: "token / software: %.2f", results["token_to_software_ratio"] ?? 0))
        }
        if (results["software_failures"] ?? 0) + (results["token_failures"] ?? 0) > 0 { throw ExitCode(1) }
    }
}
