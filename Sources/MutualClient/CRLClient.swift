import AsyncHTTPClient
import Foundation
import MutualPKI
import NIOCore
import X509

/// Fetches the CRLs a certificate names in its distribution points, as a relying party would. Nothing is trusted
/// here: the caller checks the signatures against the chain.
public enum CRLClient {
    public enum Outcome: Sendable {
        case fetched(url: String, crls: [RevocationList])
        case failed(url: String, reason: String)
    }

    /// The first HTTP(S) distribution point of `certificate`, fetched; nil when it names none.
    public static func fetch(for certificate: Certificate, timeout: Duration = .seconds(10)) async -> Outcome? {
        guard let points = try? CRLDistributionPoints(certificate),
              let url = points.urls.first(where: { $0.hasPrefix("http://") || $0.hasPrefix("https://") })
        else { return nil }
        do {
            let response = try await HTTPClient.shared.execute(HTTPClientRequest(url: url), timeout: .seconds(max(1, timeout.components.seconds)))
            guard response.status == .ok else { return .failed(url: url, reason: "HTTP \(response.status.code)") }
            let body = try await response.body.collect(upTo: 16 << 20)
            return .fetched(url: url, crls: try RevocationList.all(in: Array(body.readableBytesView)))
        } catch let error as PKIError {
            return .failed(url: url, reason: error.reason)
        } catch {
            return .failed(url: url, reason: "\(error)")
        }
    }
}
