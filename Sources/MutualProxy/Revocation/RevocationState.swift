import Foundation
import MutualPKI
import Synchronization
import X509

/// What the proxy knows about revoked certificates: CRLs (from files or URLs, refreshed) and serials pushed by the
/// authority's event stream. Checked on every full handshake and every resumed session; when it grows, open
/// connections of newly revoked certificates are closed (``ConnectionRegistry``).
public final class RevocationState: Sendable {
    struct LoadedCRL: Sendable {
        var source: String
        var crl: RevocationList
        var serials: [String: RevocationList.Entry]
    }

    struct Snapshot: Sendable {
        /// Keyed by issuer name; one CRL per issuer (the newest loaded).
        var crls: [DistinguishedName: LoadedCRL] = [:]
        /// Sources configured but never loaded successfully.
        var unavailable: Set<String> = []
        /// Serial (lowercase hex) → human reason, from the authority's event stream.
        var pushed: [String: String] = [:]
        /// Counts changes (a CRL installed, a revocation pushed): a decision made at one generation holds until it moves.
        var generation = 0
    }

    private let state = Mutex(Snapshot())
    /// Issuer public keys a given CRL (by source and number) was verified against, so a signature is checked once.
    private let verified = Mutex<[String: Set<[UInt8]>]>([:])
    public let stalePolicy: ProxyConfiguration.StalePolicy

    public init(stalePolicy: ProxyConfiguration.StalePolicy = .deny) {
        self.stalePolicy = stalePolicy
    }

    /// Marks sources that must load before handshakes can be checked against them (fail closed until then).
    func expect(sources: [String]) {
        state.withLock { $0.unavailable.formUnion(sources) }
    }

    /// Installs a CRL read from `source`; returns the serials it newly revokes.
    @discardableResult
    func install(_ crl: RevocationList, source: String) -> Set<String> {
        var serials: [String: RevocationList.Entry] = [:]
        for entry in crl.entries { serials[Self.hex(entry.serialNumber)] = entry }
        return state.withLock { snapshot in
            let previous = snapshot.crls[crl.issuer]
            if let previous, previous.crl.thisUpdate > crl.thisUpdate { return [] }
            snapshot.crls[crl.issuer] = LoadedCRL(source: source, crl: crl, serials: serials)
            snapshot.unavailable.remove(source)
            snapshot.generation += 1
            return Set(serials.keys).subtracting(previous.map { Set($0.serials.keys) } ?? [])
        }
    }

    /// Records a revocation pushed by the authority; true if it was new.
    @discardableResult
    func push(serial: String, reason: String) -> Bool {
        let key = serial.lowercased()
        return state.withLock { snapshot in
            snapshot.generation += 1
            return snapshot.pushed.updateValue(reason, forKey: key) == nil
        }
    }

    /// The current generation (see ``Snapshot/generation``).
    var generation: Int { state.withLock { $0.generation } }

    /// True when some CRL is past its nextUpdate (the metric `mutual_proxy_crl_stale`).
    func isStale(now: Date = Date()) -> Bool {
        state.withLock { snapshot in snapshot.crls.values.contains { ($0.crl.nextUpdate ?? .distantFuture) < now } }
    }

    /// The earliest moment a loaded CRL should be refreshed: half way through its validity.
    func refreshDue(source: String) -> Date? {
        state.withLock { snapshot in
            guard let loaded = snapshot.crls.values.first(where: { $0.source == source }), let next = loaded.crl.nextUpdate else { return nil }
            return loaded.crl.thisUpdate.addingTimeInterval(next.timeIntervalSince(loaded.crl.thisUpdate) / 2)
        }
    }

    /// Checks a validated chain (leaf first, root last). Returns nil when no certificate in it is revoked, or the
    /// failure and its reason.
    func check(chain: [Certificate], now: Date = Date()) -> (HandshakeFailure, String)? {
        check(chain: chain.map { AnyCertificate.classical($0) }, now: now)
    }

    /// The same checks for a chain of either family: the ML-DSA issuing CA's CRL is signed with ML-DSA.
    func check(chain: [AnyCertificate], now: Date = Date()) -> (HandshakeFailure, String)? {
        let snapshot = state.withLock { $0 }
        if !snapshot.unavailable.isEmpty && stalePolicy == .deny {
            return (.revocationUnavailable, "revocation information unavailable: CRL \(snapshot.unavailable.sorted().joined(separator: ", ")) has not been loaded yet (on-stale: deny)")
        }
        guard chain.count >= 2 else { return nil }
        for index in 0..<(chain.count - 1) {
            let subject = chain[index]
            let serial = subject.serialHex
            if let reason = snapshot.pushed[serial] {
                return (.revoked, "certificate \(serial) was revoked (\(reason)), pushed by the authority")
            }
            let issuer = chain[index + 1]
            guard let loaded = snapshot.crls[issuer.subject] else { continue }
            guard isVerified(loaded, by: issuer) else {
                if stalePolicy == .deny {
                    return (.revocationUnavailable, "CRL from \(loaded.source) does not verify against its issuer \(issuer.subject)")
                }
                continue
            }
            if let next = loaded.crl.nextUpdate, next < now, stalePolicy == .deny {
                return (.revocationUnavailable, "revocation information is stale: the CRL from \(issuer.subject) expired \(next.relativeDescription(from: now)) (nextUpdate \(next)) and could not be refreshed (on-stale: deny)")
            }
            if let entry = loaded.serials[serial] {
                let reason = entry.reason.map { ", \($0.rawValue)" } ?? ""
                return (.revoked, "certificate \(serial) was revoked \(entry.revocationDate.relativeDescription(from: now)) (\(entry.revocationDate)\(reason))")
            }
        }
        return nil
    }

    private func isVerified(_ loaded: LoadedCRL, by issuer: AnyCertificate) -> Bool {
        let key = "\(loaded.source)#\(loaded.crl.crlNumber ?? [])#\(loaded.crl.thisUpdate.timeIntervalSince1970)"
        let issuerKey = issuer.subjectPublicKeyInfo
        if verified.withLock({ $0[key]?.contains(issuerKey) ?? false }) { return true }
        guard issuer.hasSigned(loaded.crl) else { return false }
        if let usage = try? issuer.extensions.keyUsage, !usage.cRLSign { return false }
        verified.withLock { $0[key, default: []].insert(issuerKey) }
        return true
    }

    static func hex(_ serial: Certificate.SerialNumber) -> String {
        serial.bytes.hexString
    }
}
