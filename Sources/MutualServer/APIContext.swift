import MutualPKI
import Hummingbird
import NIOCore
import NIOSSL
import X509

/// The request context: carries the connection, so handlers can ask for the client certificate the TLS layer
/// verified against the CA's root.
public struct APIContext: RequestContext {
    public var coreContext: CoreRequestContextStorage
    let channel: any Channel

    public init(source: ApplicationRequestContextSource) {
        self.coreContext = .init(source: source)
        self.channel = source.channel
    }

    /// Bodies above 64 KiB are refused with 413 before they are read in full.
    public var maxUploadSize: Int { 64 * 1024 }

    /// The client certificate presented and verified during the handshake, if any.
    func peerCertificate() async throws -> AnyCertificate? {
        guard let certificate = try await channel.nioSSL_peerCertificate().get() else { return nil }
        return try AnyCertificate(derEncoded: try certificate.toDERBytes())
    }
}
