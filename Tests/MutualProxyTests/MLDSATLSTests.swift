import Foundation
import MutualPKI
import NIOCore
import NIOSSL
import Testing
import TestSupport
import X509

@Suite("TLS 1.3 with ML-DSA certificates (spike)")
struct MLDSATLSTests {
    @Test("BoringSSL through NIOSSL: ML-DSA-65 server and client certificates, X25519MLKEM768")
    func handshake() throws {
        let now = Date()
        let h = try MLDSAHierarchy.make(name: "TLS", variant: .mlDSA65, now: now)
        let ca = try MLDSAIssuingCA(certificate: h.intermediate, key: h.intermediateKey, root: h.root, policy: .init())
        let serverKey = try MLDSASigningKey(generating: .mlDSA65)
        let server = try ca.issue(.init(profile: .server, dnsNames: ["localhost"]), publicKey: try MLDSAPublicKey(variant: .mlDSA65, rawRepresentation: serverKey.publicKey), now: now)
        let clientKey = try MLDSASigningKey(generating: .mlDSA65)
        let client = try ca.issue(.init(profile: .workload, uris: ["spiffe://example.org/c"]), publicKey: try MLDSAPublicKey(variant: .mlDSA65, rawRepresentation: clientKey.publicKey), now: now)
        let algorithms: [SignatureAlgorithm] = [.init(rawValue: 0x0905), .ecdsaSecp256R1Sha256]
        var serverTLS = TLSConfiguration.makeServerConfiguration(
            certificateChain: try [server.der, h.intermediate.der].map { .certificate(try NIOSSLCertificate(bytes: $0, format: .der)) },
            privateKey: .privateKey(try NIOSSLPrivateKey(bytes: Array(try serverKey.pem(passphrase: nil).utf8), format: .pem))
        )
        serverTLS.minimumTLSVersion = .tlsv13
        serverTLS.curves = [.x25519_MLKEM768]
        serverTLS.verifySignatureAlgorithms = algorithms
        serverTLS.signingSignatureAlgorithms = algorithms
        serverTLS.certificateVerification = .noHostnameVerification
        var clientTLS = TLSConfiguration.makeClientConfiguration()
        clientTLS.certificateChain = try [client.der, h.intermediate.der].map { .certificate(try NIOSSLCertificate(bytes: $0, format: .der)) }
        clientTLS.privateKey = .privateKey(try NIOSSLPrivateKey(bytes: Array(try clientKey.pem(passphrase: nil).utf8), format: .pem))
        clientTLS.curves = [.x25519_MLKEM768]
        clientTLS.verifySignatureAlgorithms = algorithms
        clientTLS.signingSignatureAlgorithms = algorithms
        clientTLS.trustRoots = .certificates([try NIOSSLCertificate(bytes: h.root.der, format: .der)])
        var seen: [[UInt8]] = []
        let pair = try TLSPair(
            client: try NIOSSLContext(configuration: clientTLS), server: try NIOSSLContext(configuration: serverTLS), serverHostname: "localhost",
            serverVerification: { certificates, promise in
                seen = certificates.compactMap { try? $0.toDERBytes() }
                promise.succeed(.certificateVerified)
            }
        )
        try pair.handshake()
        #expect(pair.clientEvents.errors.isEmpty, "\(pair.clientEvents.errors)")
        #expect(pair.serverEvents.errors.isEmpty, "\(pair.serverEvents.errors)")
        #expect(pair.clientEvents.handshakeCompleted)
        #expect(pair.serverEvents.handshakeCompleted)
        #expect(seen.first == client.der)
    }
}
