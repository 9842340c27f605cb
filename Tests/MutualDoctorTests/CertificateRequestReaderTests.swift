import Foundation
import MutualDoctor
import MutualPKI
import NIOCore
import NIOEmbedded
import NIOSSL
import Testing
import TestSupport
import X509

@Suite("the server's CertificateRequest, read from a real TLS 1.2 flight in memory")
struct CertificateRequestReaderTests {
    /// A swift-nio-ssl (BoringSSL) client and server on two embedded channels; returns every byte the server sent.
    func serverFlight(requestClientCertificate: Bool, acceptedCAs: [Certificate]) throws -> [UInt8] {
        let ca = try TestPKI.issuingCA()
        let key = try KeyType.p256.generate()
        let leaf = try ca.issue(.init(profile: .server, publicKey: key.publicKey, dnsNames: ["web.test"], validity: .days(1)), now: .now.addingTimeInterval(-60))
        var server = TLSConfiguration.makeServerConfiguration(
            certificateChain: [.certificate(try NIOSSLCertificate(bytes: try leaf.derBytes, format: .der))],
            privateKey: .privateKey(try NIOSSLPrivateKey(bytes: Array(try KeyFile.pem(for: key, passphrase: nil).utf8), format: .pem))
        )
        server.maximumTLSVersion = .tlsv12
        if requestClientCertificate {
            server.certificateVerification = .noHostnameVerification
            server.trustRoots = .certificates(try acceptedCAs.map { try NIOSSLCertificate(bytes: try $0.derBytes, format: .der) })
            server.sendCANameList = true
        }
        var client = TLSConfiguration.makeClientConfiguration()
        client.certificateVerification = .none
        client.maximumTLSVersion = .tlsv12
        let serverChannel = EmbeddedChannel(handler: NIOSSLServerHandler(context: try NIOSSLContext(configuration: server)))
        let clientChannel = EmbeddedChannel(handler: try NIOSSLClientHandler(context: try NIOSSLContext(configuration: client), serverHostname: "web.test"))
        // Not finished: closing would start TLS shutdown, which waits for a peer nobody pumps any more.
        var sent: [UInt8] = []
        serverChannel.pipeline.fireChannelActive()
        _ = clientChannel.connect(to: try SocketAddress(ipAddress: "127.0.0.1", port: 443))
        for _ in 0..<8 {
            while let bytes = try clientChannel.readOutbound(as: ByteBuffer.self) { try? serverChannel.writeInbound(bytes) }
            while let bytes = try serverChannel.readOutbound(as: ByteBuffer.self) {
                sent += bytes.readableBytesView
                try? clientChannel.writeInbound(bytes)
            }
        }
        return sent
    }

    @Test("a server that asks for a client certificate: the CA names it sends, whole or in 1-byte pieces")
    func requested() throws {
        let accepted = try TestPKI.issuingCA()
        let flight = try serverFlight(requestClientCertificate: true, acceptedCAs: [accepted.root, accepted.certificate])
        var reader = CertificateRequestReader()
        #expect(reader.feed(flight) == .requested([accepted.root.subject, accepted.certificate.subject]))
        var bytewise = CertificateRequestReader()
        var outcome: CertificateRequestReader.Outcome?
        for byte in flight where outcome == nil { outcome = bytewise.feed([byte]) }
        #expect(outcome == .requested([accepted.root.subject, accepted.certificate.subject]))
    }

    @Test("a server that does not ask: notRequested; truncated flights: no outcome yet")
    func notRequested() throws {
        let flight = try serverFlight(requestClientCertificate: false, acceptedCAs: [])
        var reader = CertificateRequestReader()
        #expect(reader.feed(flight) == .notRequested)
        var truncated = CertificateRequestReader()
        #expect(truncated.feed(flight.prefix(flight.count / 2)) == nil)
    }

    @Test("garbage, plain HTTP, a TLS 1.3 encrypted record, a hostile CertificateRequest: unreadable, never a crash")
    func hostile() {
        var http = CertificateRequestReader()
        #expect(http.feed(Array("HTTP/1.1 400 Bad Request\r\n\r\n".utf8)) == .unreadable)
        var appData = CertificateRequestReader()
        #expect(appData.feed([23, 3, 3, 0, 4, 1, 2, 3, 4]) == .unreadable)
        var oversizedRecord = CertificateRequestReader()
        #expect(oversizedRecord.feed([22, 3, 3, 0xff, 0xff]) == .unreadable)
        // A CertificateRequest whose CA list claims more bytes than it has, then one with a name that is not DER.
        for body: [UInt8] in [[1, 64, 0, 2, 4, 3, 0, 9, 0, 1], [1, 64, 0, 2, 4, 3, 0, 4, 0, 2, 0xde, 0xad], [1]] {
            let message: [UInt8] = [13, 0, 0, UInt8(body.count)] + body
            var reader = CertificateRequestReader()
            #expect(reader.feed([22, 3, 3, 0, UInt8(message.count)] + message) == .unreadable, "\(body)")
        }
        // An empty CA list is a request from any CA.
        let any: [UInt8] = [1, 64, 0, 2, 4, 3, 0, 0]
        var reader = CertificateRequestReader()
        #expect(reader.feed([22, 3, 3, 0, UInt8(any.count + 4), 13, 0, 0, UInt8(any.count)] + any) == .requested([]))
    }
}
