import Foundation
import MutualPKI
@testable import MutualProxy
import NIOCore
import NIOSSL
import Testing
import TestSupport
import X509

/// The proxy with ML-DSA identities, in memory: its own TLS context (an ML-DSA-65 server certificate) handshakes with
/// X25519MLKEM768, and its verifier accepts ML-DSA and classical clients from a mixed bundle and refuses by reason.
@Suite("Proxy with ML-DSA certificates: TLS 1.3 with X25519MLKEM768 and ML-DSA-65, mixed trust bundles (in memory)")
struct MLDSATLSTests {
    struct Fixture {
        let directory: String
        let pq: MLDSAHierarchy
        let pqCA: MLDSAIssuingCA
        let classical: IssuingCA
        let state: InboundState
        let now: Date

        func mldsaClient(_ contents: IssuanceRequest.Contents = .init(profile: .workload, uris: ["spiffe://example.org/ns/web/sa/api"]), at time: Date? = nil)
            throws -> (MLDSASigningKey, MLDSACertificate)
        {
            let key = try MLDSASigningKey(generating: .mlDSA65)
            let certificate = try pqCA.issue(contents, publicKey: try MLDSAPublicKey(variant: .mlDSA65, rawRepresentation: key.publicKey), now: time ?? now)
            return (key, certificate)
        }

        /// A TLS client context with an ML-DSA or classical identity, trusting both roots; `mldsa: false` leaves
        /// BoringSSL's default signature algorithms (no ML-DSA).
        func client(chain: [[UInt8]], keyPEM: String, mldsa: Bool = true, groups: [NIOTLSCurve] = [.x25519_MLKEM768]) throws -> NIOSSLContext {
            var tls = TLSConfiguration.makeClientConfiguration()
            tls.certificateChain = try chain.map { .certificate(try NIOSSLCertificate(bytes: $0, format: .der)) }
            tls.privateKey = .privateKey(try NIOSSLPrivateKey(bytes: Array(keyPEM.utf8), format: .pem))
            tls.trustRoots = .certificates([try NIOSSLCertificate(bytes: pq.root.der, format: .der), try NIOSSLCertificate(bytes: try classical.root.derBytes, format: .der)])
            tls.curves = groups
            if mldsa {
                tls.verifySignatureAlgorithms = InboundState.signatureAlgorithms
                tls.signingSignatureAlgorithms = InboundState.signatureAlgorithms
            }
            return try NIOSSLContext(configuration: tls)
        }
    }

    static func fixture() throws -> Fixture {
        let now = Date()
        let directory = TestPKI.temporaryDirectory("pq-proxy")
        let pq = try MLDSAHierarchy.make(name: "PQ", variant: .mlDSA65, now: now)
        let pqCA = try MLDSAIssuingCA(certificate: pq.intermediate, key: pq.intermediateKey, root: pq.root, policy: .init())
        let classical = try TestPKI.issuingCA(now: now)
        let serverKey = try MLDSASigningKey(generating: .mlDSA65)
        let server = try pqCA.issue(.init(profile: .server, dnsNames: ["localhost"]), publicKey: try MLDSAPublicKey(variant: .mlDSA65, rawRepresentation: serverKey.publicKey), now: now)
        try (server.pem + pq.intermediate.pem).write(toFile: directory + "/server.pem", atomically: true, encoding: .utf8)
        try serverKey.pem(passphrase: nil).write(toFile: directory + "/server.key", atomically: true, encoding: .utf8)
        // The migration bundle: the classical root and the ML-DSA root.
        try (PEMBundle.pem([classical.root]) + pq.root.pem).write(toFile: directory + "/roots.pem", atomically: true, encoding: .utf8)
        let listener = ProxyConfiguration.Listener(
            name: "inbound", listen: "127.0.0.1:0", upstream: "http://127.0.0.1:9", cert: directory + "/server.pem",
            key: directory + "/server.key", clientCA: directory + "/roots.pem", allow: ["spiffe://example.org/*"]
        )
        let state = try InboundState(name: "inbound", configuration: listener, policy: RoutePolicy(routes: []))
        return Fixture(directory: directory, pq: pq, pqCA: pqCA, classical: classical, state: state, now: now)
    }

    /// Runs a handshake against the proxy's own context, accepting whatever the client presents (the verifier is
    /// tested separately below); returns the pair and the DER the client presented.
    static func handshake(_ f: Fixture, client: NIOSSLContext) throws -> (TLSPair, [[UInt8]]) {
        var presented: [[UInt8]] = []
        let pair = try TLSPair(client: client, server: f.state.sslContext, serverHostname: "localhost", serverVerification: { certificates, promise in
            presented = certificates.compactMap { try? $0.toDERBytes() }
            promise.succeed(.certificateVerified)
        })
        try pair.handshake()
        return (pair, presented)
    }

    @Test("an ML-DSA-65 client and a P-256 client both complete TLS 1.3 with the ML-DSA-65 proxy; each verifies to its root")
    func bothFamilies() async throws {
        let f = try Self.fixture()
        defer { try? FileManager.default.removeItem(atPath: f.directory) }
        #expect(f.state.credentials.leaf.keyAlgorithm == "ML-DSA-65")
        #expect(f.state.clientRoots.count == 2)

        let (key, certificate) = try f.mldsaClient()
        let (pair, presented) = try Self.handshake(f, client: try f.client(chain: [certificate.der, f.pq.intermediate.der], keyPEM: try key.pem(passphrase: nil)))
        #expect(pair.clientEvents.errors.isEmpty, "\(pair.clientEvents.errors)")
        #expect(pair.clientEvents.handshakeCompleted && pair.serverEvents.handshakeCompleted)
        #expect(presented.first == certificate.der)
        guard case .success(let peer) = await f.state.verify(presented: try f.state.parse(presentedDER: presented), revocation: RevocationState(), now: f.now) else {
            Issue.record("the ML-DSA client chain should verify")
            return
        }
        #expect(peer.spiffeID == "spiffe://example.org/ns/web/sa/api")
        #expect(peer.keyAlgorithm == "ML-DSA-65")
        #expect(peer.chain.count == 3 && peer.chain.allSatisfy(\.isPostQuantum))

        // A classical client through the same listener: the mixed bundle serves both during a migration. It verifies
        // the proxy's ML-DSA certificate because it opted in to ML-DSA signatures.
        let classicalKey = try KeyType.p256.generate()
        let classicalLeaf = try f.classical.issue(.init(profile: .workload, publicKey: classicalKey.publicKey, uris: ["spiffe://example.org/ns/web/sa/old"]), now: f.now)
        let (pair2, presented2) = try Self.handshake(f, client: try f.client(
            chain: [try classicalLeaf.derBytes, try f.classical.certificate.derBytes], keyPEM: try KeyFile.pem(for: classicalKey, passphrase: nil), groups: [.x25519_MLKEM768, .x25519]
        ))
        #expect(pair2.clientEvents.errors.isEmpty, "\(pair2.clientEvents.errors)")
        #expect(pair2.serverEvents.handshakeCompleted)
        guard case .success(let oldPeer) = await f.state.verify(presented: try f.state.parse(presentedDER: presented2), revocation: RevocationState(), now: f.now) else {
            Issue.record("the classical client chain should verify against the mixed bundle")
            return
        }
        #expect(oldPeer.keyAlgorithm == "P-256" && !oldPeer.leaf.isPostQuantum)
    }

    @Test("a client that does not opt in to ML-DSA signatures cannot verify an ML-DSA server: the handshake fails, nothing is accepted")
    func noOptIn() throws {
        let f = try Self.fixture()
        defer { try? FileManager.default.removeItem(atPath: f.directory) }
        let (key, certificate) = try f.mldsaClient()
        let (pair, _) = try Self.handshake(f, client: try f.client(chain: [certificate.der, f.pq.intermediate.der], keyPEM: try key.pem(passphrase: nil), mldsa: false))
        #expect(!pair.clientEvents.handshakeCompleted)
        #expect(!pair.serverEvents.handshakeCompleted)
    }

    @Test("ML-DSA client chains refused by reason: unknown root, no clientAuth, expired, RFC 9881 key usage, revoked by an ML-DSA CRL")
    func refusals() async throws {
        let f = try Self.fixture()
        defer { try? FileManager.default.removeItem(atPath: f.directory) }
        func kind(_ chain: [[UInt8]], revocation: RevocationState = RevocationState(), at time: Date? = nil) async throws -> HandshakeFailure? {
            switch await f.state.verify(presented: try f.state.parse(presentedDER: chain), revocation: revocation, now: time ?? f.now) {
            case .success: return nil
            case .failure(let failure): return failure.kind
            }
        }
        let stranger = try MLDSAHierarchy.make(name: "PQ", variant: .mlDSA65, now: f.now)
        let strangerCA = try MLDSAIssuingCA(certificate: stranger.intermediate, key: stranger.intermediateKey, root: stranger.root, policy: .init())
        let key = try MLDSASigningKey(generating: .mlDSA65)
        let foreign = try strangerCA.issue(.init(profile: .workload, uris: ["spiffe://example.org/x"]), publicKey: try MLDSAPublicKey(variant: .mlDSA65, rawRepresentation: key.publicKey), now: f.now)
        #expect(try await kind([foreign.der, stranger.intermediate.der]) == .unknownCA)

        let (_, server) = try f.mldsaClient(.init(profile: .server, dnsNames: ["a.example.org"]))
        #expect(try await kind([server.der, f.pq.intermediate.der]) == .eku)

        let (_, good) = try f.mldsaClient()
        #expect(try await kind([good.der, f.pq.intermediate.der], at: good.notAfter.addingTimeInterval(10)) == .expired)
        #expect(try await kind([good.der, f.pq.intermediate.der]) == nil)

        // Signed by the real ML-DSA issuing CA, but with keyEncipherment: RFC 9881 forbids it for ML-DSA keys.
        let forged = try MLDSACertificate.build(
            serialNumber: [0x11], issuer: f.pq.intermediate.subject, subject: DistinguishedName(), notBefore: f.now.addingTimeInterval(-60),
            notAfter: f.now.addingTimeInterval(3600), subjectPublicKeyInfo: try key.subjectPublicKeyInfo,
            extensions: [
                try .init(BasicConstraints.notCertificateAuthority, critical: true),
                try .init(KeyUsage(digitalSignature: true, keyEncipherment: true), critical: true),
                try .init(ExtendedKeyUsage([.clientAuth]), critical: false),
                try .init(SubjectAlternativeNames([.uniformResourceIdentifier("spiffe://example.org/forged")]), critical: true),
            ],
            issuerKey: f.pq.intermediateKey
        )
        #expect(try await kind([forged.der, f.pq.intermediate.der]) == .invalidChain)

        // The ML-DSA issuing CA's CRL (signed with ML-DSA) revokes `good`; a CRL signed by another key is ignored and,
        // with on-stale deny, makes revocation unavailable rather than passing.
        let revocation = RevocationState(stalePolicy: .deny)
        let crl = try RevocationListBuilder.build(
            mldsaIssuer: f.pq.intermediate, key: f.pq.intermediateKey, number: 1, thisUpdate: f.now.addingTimeInterval(-60),
            nextUpdate: f.now.addingTimeInterval(3600), entries: [.init(serialNumber: .init(bytes: good.serialNumber[...]), revocationDate: f.now, reason: .keyCompromise)]
        )
        _ = revocation.install(try RevocationList(derEncoded: crl), source: "pq")
        #expect(try await kind([good.der, f.pq.intermediate.der], revocation: revocation) == .revoked)
        let (_, other) = try f.mldsaClient()
        #expect(try await kind([other.der, f.pq.intermediate.der], revocation: revocation) == nil)

        let impostor = RevocationState(stalePolicy: .deny)
        let forgedCRL = try RevocationListBuilder.build(
            mldsaIssuer: stranger.intermediate, key: stranger.intermediateKey, number: 1, thisUpdate: f.now.addingTimeInterval(-60),
            nextUpdate: f.now.addingTimeInterval(3600), entries: []
        )
        _ = impostor.install(try RevocationList(derEncoded: forgedCRL), source: "forged")
        #expect(try await kind([good.der, f.pq.intermediate.der], revocation: impostor) == .revocationUnavailable)
    }
}
