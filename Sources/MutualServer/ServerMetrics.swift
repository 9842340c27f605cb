import Foundation
import MutualStore
import Prometheus

/// The authority's Prometheus metrics. Counters carry the outcome and the refusal reason, so a dashboard can show
/// *why* requests fail, not only that they do. Gauges about the inventory are computed when scraped.
final class ServerMetrics: Sendable {
    let registry: PrometheusCollectorRegistry

    init(registry: PrometheusCollectorRegistry) {
        self.registry = registry
    }

    static let buckets: [Duration] = [.milliseconds(1), .milliseconds(2), .milliseconds(5), .milliseconds(10),
                                      .milliseconds(25), .milliseconds(50), .milliseconds(100), .milliseconds(250),
                                      .milliseconds(500), .seconds(1), .seconds(2.5)]

    /// `mutual_<operation>_total{outcome, reason}` for issuance, renewal and revocation.
    func count(_ operation: String, outcome: String, reason: String) {
        registry.makeCounter(
            descriptor: .init(metricName: "mutual_\(operation)", unitName: "total", helpText: "Authority \(operation) requests by outcome and reason"),
            labels: [("outcome", outcome), ("reason", reason)]
        ).increment()
    }

    /// ACME requests by provisioner, resource (`new-order`, `chall`, ...), outcome and problem type (`none` on success).
    func countACME(provisioner: String, resource: String, outcome: String, type: String) {
        registry.makeCounter(
            descriptor: .init(metricName: "mutual_acme_requests", unitName: "total", helpText: "ACME requests by provisioner, resource, outcome and problem type"),
            labels: [("provisioner", provisioner), ("resource", resource), ("outcome", outcome), ("type", type)]
        ).increment()
    }

    /// `mutual_dashboard_requests_total{page, outcome, code}`: dashboard pages and actions, refusals by code.
    func countDashboard(page: String, outcome: String, code: String) {
        registry.makeCounter(
            descriptor: .init(metricName: "mutual_dashboard_requests", unitName: "total", helpText: "Dashboard requests by page, outcome and refusal code"),
            labels: [("page", page), ("outcome", outcome), ("code", code)]
        ).increment()
    }

    /// `mutual_tls_handshake_failures_total{reason}`: BoringSSL's reason code for each failed handshake.
    func countHandshakeFailure(reason: String) {
        registry.makeCounter(
            descriptor: .init(metricName: "mutual_tls_handshake_failures", unitName: "total", helpText: "Failed TLS handshakes on the authority's listener by BoringSSL reason"),
            labels: [("reason", reason)]
        ).increment()
    }

    /// `mutual_request_duration_seconds{route}`.
    func observe(route: String, since start: ContinuousClock.Instant) {
        registry.makeDurationHistogram(
            descriptor: .init(metricName: "mutual_request_duration", unitName: "seconds", helpText: "Authority API request latency"),
            labels: [("route", route)], buckets: Self.buckets
        ).record(ContinuousClock.now - start)
    }

    /// Refreshes the inventory gauges and renders the exposition text.
    func render(store: Store, now: Date) async -> [UInt8] {
        if let counts = try? await store.statusCounts(now: now) {
            for (status, count) in counts {
                registry.makeGauge(
                    descriptor: .init(metricName: "mutual_certificates", unitName: "", helpText: "Certificates in the inventory by status"),
                    labels: [("status", status)]
                ).set(Double(count))
            }
        }
        let soonest = (try? await store.soonestExpiry(now: now)) ?? nil
        registry.makeGauge(
            descriptor: .init(metricName: "mutual_soonest_expiry", unitName: "seconds", helpText: "Seconds until the soonest expiry of a valid certificate (-1: none)")
        ).set(soonest.map { $0.timeIntervalSince(now) } ?? -1)
        return registry.emitToBuffer()
    }
}
