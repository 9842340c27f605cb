import Foundation
@testable import MutualPKI
import SwiftASN1
import Testing
import TestSupport
import X509

@Suite("Chain verification")
struct VerifierTests {
    let ca: IssuingCA
    let key: Certificate.PrivateKey

    init() throws {
        ca = try TestPKI.issuingCA()
        key = try KeyType.p256.generate()
    }

    func verify(_ leaf: Certificate, eku: ExtendedKeyUsage.Usage? = nil, peer: ChainVerifier.PeerName? = nil,
                crls: [RevocationList] = [], at time: Date = TestPKI.now, maxDepth: Int? = nil) async -> ChainVerifier.Outcome {
        await ChainVerifier(options: .init(roots: [ca.root], intermediates: [ca.certificate], validationTime: time,
                                           requiredEKU: eku, peerName: peer, crls: crls, maxDepth: maxDepth)).verify(leaf)
    }

    func reason(_ outcome: ChainVerifier.Outcome) -> String? {
        if case .rejected(let reason, _) = outcome { return reason }
        return nil
    }

    @Test("issued server and client certificates verify for their purpose and not the other")
    func purposes() async throws {
        let server = try ca.issue(.init(profile: .server, publicKey: key.publicKey, dnsNames: ["api.test"], ipAddresses: ["127.0.0.1"]), now: TestPKI.now)
        let client = try ca.issue(.init(profile: .client, publicKey: key.publicKey, commonName: "api.test"), now: TestPKI.now)
        #expect(reason(await verify(server, eku: .serverAuth, peer: .dns("API.test"))) == nil)
        #expect(reason(await verify(server, eku: .serverAuth, peer: .ip("127.0.0.1"))) == nil)
        #expect(reason(await verify(client, eku: .clientAuth)) == nil)
        #expect(reason(await verify(server, eku: .clientAuth))?.contains("does not allow clientAuth") == true)
        #expect(reason(await verify(server, eku: .serverAuth, peer: .dns("other.test")))?.contains("not valid for DNS name") == true)
        // CN is never used as a fallback for the peer name.
        #expect(reason(await verify(client, peer: .dns("api.test")))?.contains("CN is not used") == true)
    }

    @Test("expired and not-yet-valid certificates are refused with the dates")
    func validityWindow() async throws {
        let leaf = try ca.issue(.init(profile: .client, publicKey: key.publicKey, commonName: "c", validity: .hours(1)), now: TestPKI.now)
        #expect(reason(await verify(leaf, at: TestPKI.now.addingTimeInterval(7200))) != nil)
        #expect(reason(await verify(leaf, at: TestPKI.now.addingTimeInterval(-3600))) != nil)
        #expect(reason(await verify(leaf, at: TestPKI.now.addingTimeInterval(1800))) == nil)
    }

    @Test("a CRL from the issuer revokes; a CRL from anyone else does not; a stale CRL fails closed")
    func crls() async throws {
        let leaf = try ca.issue(.init(profile: .client, publicKey: key.publicKey, commonName: "c"), now: TestPKI.now)
        let builder = RevocationListBuilder(issuer: ca.certificate, issuerKey: ca.privateKey)
        let revokedDER = try builder.build(
            number: 7, thisUpdate: TestPKI.now.addingTimeInterval(-60), nextUpdate: TestPKI.now.addingTimeInterval(3600),
            entries: [.init(serialNumber: leaf.serialNumber, revocationDate: TestPKI.now.addingTimeInterval(-30), reason: .keyCompromise)]
        )
        let crl = try RevocationList(derEncoded: revokedDER)
        #expect(crl.crlNumber == [7])
        #expect(crl.entries.first?.reason == .keyCompromise)
        #expect(crl.isSigned(by: ca.certificate))
        #expect(!crl.isSigned(by: ca.root))
        #expect(reason(await verify(leaf, crls: [crl]))?.contains("revoked") == true)

        // Same serial on a CRL signed by another CA: ignored.
        let other = try TestPKI.issuingCA()
        let foreign = try RevocationList(derEncoded: RevocationListBuilder(issuer: other.certificate, issuerKey: other.privateKey).build(
            number: 1, thisUpdate: TestPKI.now.addingTimeInterval(-60), nextUpdate: TestPKI.now.addingTimeInterval(3600),
            entries: [.init(serialNumber: leaf.serialNumber, revocationDate: TestPKI.now, reason: .unspecified)]))
        #expect(reason(await verify(leaf, crls: [foreign])) == nil)

        let stale = try RevocationList(derEncoded: builder.build(
            number: 8, thisUpdate: TestPKI.now.addingTimeInterval(-7200), nextUpdate: TestPKI.now.addingTimeInterval(-3600), entries: []))
        #expect(reason(await verify(leaf, crls: [stale]))?.contains("stale") == true)

        // PEM round trip and hostile CRL bytes.
        let pem = RevocationListBuilder.pem(revokedDER)
        #expect(try RevocationList(bytes: Array(pem.utf8)).entries.count == 1)
        for bad in [[UInt8](), Array(revokedDER.prefix(40)), Array("garbage".utf8), [0x30, 0x84, 0xFF, 0xFF, 0xFF, 0xFF]] {
            #expect(throws: PKIError.self) { try RevocationList(bytes: bad) }
        }
    }

    @Test("max depth counts intermediates")
    func maxDepth() async throws {
        let leaf = try ca.issue(.init(profile: .client, publicKey: key.publicKey, commonName: "c"), now: TestPKI.now)
        #expect(reason(await verify(leaf, maxDepth: 1)) == nil)
        #expect(reason(await verify(leaf, maxDepth: 0))?.contains("maximum depth") == true)
    }

    @Test("a lattice of intermediates sharing one key is refused within a bounded amount of work")
    func latticeIsBounded() async throws {
        // 8 names x 4 certificates, all signed by one key: every pair verifies, paths are permutations of the names.
        // Unbounded, swift-certificates' path builder verifies signatures along every one (seconds of CPU).
        let (leaf, lattice) = try TestPKI.lattice(subjects: 8, perSubject: 4, leafKey: key)
        for depth in [3, 8] {
            var search = PathSearch(roots: [ca.root], intermediates: ChainVerifier.bounded(lattice), maxDepth: depth)
            let start = ThreadCPU.now()
            let result = search.run(leaf: leaf)
            let cpu = ThreadCPU.now() - start
            let budget = PathSearch.Budget()
            #expect(search.expansions <= budget.maximumExpansions, "depth \(depth)")
            #expect(cpu < 0.5, "the search used \(cpu) s of CPU")
            if case .candidates(let found) = result { #expect(found.isEmpty) }
        }
        // Through the verifier: refused with the code, whatever the depth asked for.
        for depth in [nil, 3] as [Int?] {
            let outcome = await ChainVerifier(options: .init(roots: [ca.root], intermediates: lattice, validationTime: TestPKI.now,
                                                             requiredEKU: .clientAuth, maxDepth: depth)).verify(leaf)
            guard case .rejected(_, let code) = outcome else { Issue.record("lattice accepted"); continue }
            #expect(code == .chainTooComplex || code == .unknownIssuer || code == .invalid, "\(code)")
        }
        // A lattice that names the real root as its top issuer (names are public): candidates reach the verifier, at
        // most eight of them, each a linear chain that fails on its signature.
        let (rootedLeaf, rootedLattice) = try Self.latticeUnder(ca.root, subjects: 6, perSubject: 4)
        var rooted = PathSearch(roots: [ca.root], intermediates: rootedLattice, maxDepth: 8)
        let start = ThreadCPU.now()
        if case .candidates(let found) = rooted.run(leaf: rootedLeaf) {
            #expect(!found.isEmpty && found.count <= PathSearch.Budget().maximumCandidates)
        }
        #expect(ThreadCPU.now() - start < 0.5)
        let rootedOutcome = await ChainVerifier(options: .init(roots: [ca.root], intermediates: rootedLattice, validationTime: TestPKI.now, maxDepth: 8)).verify(rootedLeaf)
        if case .accepted = rootedOutcome { Issue.record("a lattice under a borrowed root name was accepted") }
        // The default search depth with the whole lattice exhausts the budget: that is the chain_too_complex refusal.
        let outcome = await ChainVerifier(options: .init(roots: [ca.root], intermediates: lattice, validationTime: TestPKI.now)).verify(leaf)
        if case .rejected(_, let code) = outcome { #expect(code == .chainTooComplex) } else { Issue.record("lattice accepted") }
    }

    /// A lattice like ``TestPKI/lattice`` whose last name is issued by `root`'s subject (without its key), and a leaf
    /// under its first name, all signed by one key.
    static func latticeUnder(_ root: Certificate, subjects: Int, perSubject: Int) throws -> (Certificate, [Certificate]) {
        let key = try KeyType.p256.generate()
        let names = try (0..<subjects).map { index in try DistinguishedName { CommonName("Rooted \(index)") } }
        var ca = Certificate.Extensions()
        try ca.append(Certificate.Extension(BasicConstraints.isCertificateAuthority(maxPathLength: nil), critical: true))
        func make(_ subject: DistinguishedName, _ issuer: DistinguishedName, _ extensions: Certificate.Extensions) throws -> Certificate {
            try Certificate(
                version: .v3, serialNumber: IssuingCA.randomSerialNumber(), publicKey: key.publicKey,
                notValidBefore: TestPKI.now.addingTimeInterval(-3600), notValidAfter: TestPKI.now.addingTimeInterval(86_400),
                issuer: issuer, subject: subject, signatureAlgorithm: key.preferredSignatureAlgorithm, extensions: extensions, issuerPrivateKey: key
            )
        }
        var out: [Certificate] = []
        for copy in 0..<perSubject {
            for (index, subject) in names.enumerated() {
                let other = (index + 1 + copy) % subjects == index ? (index + 1) % subjects : (index + 1 + copy) % subjects
                out.append(try make(subject, index == subjects - 1 ? root.subject : names[other], ca))
            }
        }
        return (try make(try DistinguishedName { CommonName("leaf") }, names[0], Certificate.Extensions()), out)
    }

    @Test("a good chain still verifies when decoys are sent with it, and the search stops when cancelled")
    func goodChainAmongDecoys() async throws {
        let leaf = try ca.issue(.init(profile: .client, publicKey: key.publicKey, commonName: "c"), now: TestPKI.now)
        let (_, lattice) = try TestPKI.lattice(subjects: 3, perSubject: 2, leafKey: key)
        let outcome = await ChainVerifier(options: .init(roots: [ca.root], intermediates: lattice + [ca.certificate],
                                                         validationTime: TestPKI.now, requiredEKU: .clientAuth, maxDepth: 3)).verify(leaf)
        guard case .accepted(let chain) = outcome else { Issue.record("good chain refused: \(outcome)"); return }
        #expect(chain.count == 3)

        let (latticeLeaf, big) = try TestPKI.lattice(subjects: 8, perSubject: 4, leafKey: key)
        let task = Task {
            withUnsafeCurrentTask { $0?.cancel() }
            return await ChainVerifier(options: .init(roots: [ca.root], intermediates: big, validationTime: TestPKI.now)).verify(latticeLeaf)
        }
        if case .rejected(_, let code) = await task.value { #expect(code == .cancelled) } else { Issue.record("accepted") }
    }

    @Test("rejections carry codes derived from the chain, not from the message")
    func rejectionCodes() async throws {
        let leaf = try ca.issue(.init(profile: .client, publicKey: key.publicKey, commonName: "c", validity: .hours(1)), now: TestPKI.now)
        func code(_ outcome: ChainVerifier.Outcome) -> ChainVerifier.RejectionCode? {
            if case .rejected(_, let code) = outcome { return code }
            return nil
        }
        #expect(code(await verify(leaf, at: TestPKI.now.addingTimeInterval(7200))) == .expired)
        #expect(code(await verify(leaf, at: TestPKI.now.addingTimeInterval(-3600))) == .notYetValid)
        #expect(code(await verify(leaf, eku: .serverAuth)) == .invalid)
        let other = try TestPKI.issuingCA()
        let stranger = try other.issue(.init(profile: .client, publicKey: key.publicKey, commonName: "c"), now: TestPKI.now)
        #expect(code(await verify(stranger)) == .unknownIssuer)
        let builder = RevocationListBuilder(issuer: ca.certificate, issuerKey: ca.privateKey)
        let crl = try RevocationList(derEncoded: builder.build(
            number: 7, thisUpdate: TestPKI.now.addingTimeInterval(-60), nextUpdate: TestPKI.now.addingTimeInterval(3600),
            entries: [.init(serialNumber: leaf.serialNumber, revocationDate: TestPKI.now.addingTimeInterval(-30), reason: .keyCompromise)]))
        #expect(code(await verify(leaf, crls: [crl])) == .revoked)
    }

    @Test("a CA certificate presented as a peer certificate is refused")
    func caAsLeaf() async throws {
        #expect(reason(await verify(ca.certificate)) != nil)
    }

    @Test("a leaf without an authority key identifier is refused")
    func missingAKI() async throws {
        var extensions = Certificate.Extensions()
        try extensions.append(Certificate.Extension(SubjectAlternativeNames([.dnsName("a.test")]), critical: false))
        let leaf = try TestPKI.certificate(subject: "a.test", issuer: ca.certificate, issuerKey: ca.privateKey, publicKey: key.publicKey, extensions: extensions)
        #expect(reason(await verify(leaf))?.contains("authorityKeyIdentifier") == true)
    }
}

@Suite("Names, durations, key files")
struct PrimitivesTests {
    @Test("durations", arguments: [("90s", 90), ("15m", 900), ("24h", 86_400), ("30d", 2_592_000), ("1h30m", 5400), ("2w", 1_209_600)])
    func durations(text: String, seconds: Int64) throws {
        #expect(try ValidityDuration(parsing: text).seconds == seconds)
    }

    @Test("bad durations", arguments: ["", "10", "h", "10y", "-5m", "0s", "1.5h", "999999999999999999999d", String(repeating: "9", count: 100)])
    func badDurations(text: String) {
        #expect(throws: PKIError.self) { try ValidityDuration(parsing: text) }
    }

    @Test("SPIFFE IDs follow the SPIFFE ID specification")
    func spiffe() throws {
        #expect(try Names.SPIFFEID(parsing: "spiffe://example.org/ns/prod/sa/api").trustDomain == "example.org")
        for bad in ["spiffe://", "spiffe://Example.org/x", "spiffe://a.test/x/", "spiffe://a.test//x", "spiffe://a.test/./x",
                    "spiffe://a.test/x?y=1", "spiffe://a.test/x#f", "spiffe://user@a.test/x", "spiffe://a.test:8080/x",
                    "http://a.test/x", "spiffe://a.test/%41"] {
            #expect(throws: PKIError.self, "\(bad)") { try Names.SPIFFEID(parsing: bad) }
        }
    }

    @Test("DNS names")
    func dns() throws {
        #expect(try Names.normalizedDNSName("A-b.Example.ORG", allowWildcard: false) == "a-b.example.org")
        #expect(try Names.normalizedDNSName("*.example.org", allowWildcard: true) == "*.example.org")
        for bad in ["", "-a.test", "a-.test", "a..test", "a_b.test", "ä.test", "*.test.*", "a.*.test", String(repeating: "a", count: 64) + ".test"] {
            #expect(throws: PKIError.self, "\(bad)") { try Names.normalizedDNSName(bad, allowWildcard: true) }
        }
    }

    @Test("encrypted key files round-trip; a wrong passphrase or garbage is refused", arguments: [KeyType.p256, .ed25519, .rsa2048])
    func keyFiles(keyType: KeyType) throws {
        let key = try keyType.generate()
        let pem = try KeyFile.pem(for: key, passphrase: "correct horse")
        #expect(KeyFile.isEncrypted(pem))
        #expect(try KeyFile.load(pem: pem, passphrase: { "correct horse" }) == key)
        let wrong = #expect(throws: PKIError.self) { try KeyFile.load(pem: pem, passphrase: { "battery staple" }) }
        #expect(wrong?.code == .wrongPassphrase)
        let missing = #expect(throws: PKIError.self) { try KeyFile.load(pem: pem, passphrase: { nil }) }
        #expect(missing?.code == .wrongPassphrase)
        #expect(throws: PKIError.self) { try KeyFile.load(pem: "-----BEGIN ENCRYPTED PRIVATE KEY-----\nMAA=\n-----END ENCRYPTED PRIVATE KEY-----\n", passphrase: { "x" }) }
        #expect(throws: PKIError.self) { try KeyFile.load(pem: "not a key", passphrase: { nil }) }
        let plain = try KeyFile.pem(for: key, passphrase: nil)
        #expect(try KeyFile.load(pem: plain, passphrase: { Issue.record("must not ask"); return nil }) == key)
    }

    @Test("atomic writes leave no temporary file and set the mode")
    func atomicFile() throws {
        let dir = TestPKI.temporaryDirectory("atomic")
        defer { try? FileManager.default.removeItem(atPath: dir) }
        try AtomicFile.write("one", to: dir + "/f", mode: 0o600)
        try AtomicFile.write("two", to: dir + "/f", mode: 0o600)
        #expect(try String(contentsOfFile: dir + "/f", encoding: .utf8) == "two")
        #expect(try FileManager.default.contentsOfDirectory(atPath: dir) == ["f"])
        let mode = try FileManager.default.attributesOfItem(atPath: dir + "/f")[.posixPermissions] as? Int
        #expect(mode == 0o600)
        #expect(throws: PKIError.self) { try AtomicFile.read(dir + "/f", limit: 2, what: "file") }
        #expect(throws: PKIError.self) { try AtomicFile.read(dir + "/missing", what: "file") }
    }
}

/// CPU time of the calling thread (synchronous code only), in seconds.
enum ThreadCPU {
    static func now() -> Double {
        var spec = timespec()
        clock_gettime(CLOCK_THREAD_CPUTIME_ID, &spec)
        return Double(spec.tv_sec) + Double(spec.tv_nsec) / 1e9
    }
}
