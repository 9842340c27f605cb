import Foundation
import Logging
import MutualPKI
import MutualStore
import X509

/// Publishes the issuing CA's CRL: one per number, regenerated after revocations and before nextUpdate.
///
/// An actor so that concurrent requests for a fresh CRL share one generation; building it is linear in the number
/// of revoked, unexpired certificates and runs outside the store's write queue, so it never holds up issuance.
public actor RevocationPublisher {
    let authority: Authority
    /// How long a CRL is valid; a new one is made when half of that has passed.
    public nonisolated let validity: ValidityDuration
    private var cached: StoredCRL?
    /// The generation under way, shared by everyone who asks meanwhile (single flight).
    private var inFlight: Task<StoredCRL, any Error>?
    /// The ML-DSA issuing CA's current CRL, and the last revocation it covers.
    private var pqCached: (crl: RevocationList, der: [UInt8], lastRevocation: Int64)?
    private var issuerOfNumber: (number: Int64, issuer: DistinguishedName)?
    /// CRLs of replaced issuing CAs, by generation.
    private var previousCached: [Int: (der: [UInt8], thisUpdate: Date, number: UInt64, lastRevocation: Int64)] = [:]

    public init(authority: Authority, validity: ValidityDuration = .hours(24)) {
        self.authority = authority
        self.validity = validity
    }

    /// The CRL to serve now: the latest published one if it covers every revocation and is not half-way to its
    /// nextUpdate, else a new one.
    public func current(now: Date = .now) async throws -> StoredCRL {
        let lastRevocation = try await authority.store.lastRevocationSequence()
        if let cached, isFresh(cached, lastRevocation: lastRevocation, now: now) { return cached }
        if let stored = try await authority.store.latestCRL(), isFresh(stored, lastRevocation: lastRevocation, now: now) {
            cached = stored
            return stored
        }
        let published = try await publish(now: now)
        cached = published
        return published
    }

    func isFresh(_ crl: StoredCRL, lastRevocation: Int64, now: Date) -> Bool {
        crl.lastRevocation >= lastRevocation && now < crl.thisUpdate.addingTimeInterval(validity.timeInterval / 2)
            && issuer(of: crl) == authority.ca.certificate.subject  // a rotation's activation changes the issuer
    }

    /// The issuer of a stored CRL, parsed once per CRL number.
    private func issuer(of crl: StoredCRL) -> DistinguishedName? {
        if let memo = issuerOfNumber, memo.number == crl.number { return memo.issuer }
        guard let parsed = try? RevocationList(bytes: crl.der) else { return nil }
        issuerOfNumber = (crl.number, parsed.issuer)
        return parsed.issuer
    }

    /// The CRL of an issuing CA generation: the active one's (numbered in the inventory), or that of a CA a rotation
    /// replaced and has not retired (signed by that CA, numbered by time like the ML-DSA CRL); nil for any other.
    public func crl(generation: Int, now: Date = .now) async throws -> [UInt8]? {
        let active = authority.active
        if active.rotation.state.active(.intermediate)?.generation ?? 1 == generation { return try await current(now: now).der }
        guard let index = active.rotation.previousGenerations.firstIndex(of: generation) else { return nil }
        let ca = active.rotation.previous[index]
        let lastRevocation = try await authority.store.lastRevocationSequence()
        if let cached = previousCached[generation], cached.lastRevocation >= lastRevocation,
           now < cached.thisUpdate.addingTimeInterval(validity.timeInterval / 2) {
            return cached.der
        }
        let entries = try await entries(issuer: ca.certificate.subject.description, now: now)
        var number = UInt64(max(0, now.timeIntervalSince1970 * 1000))
        if let previous = previousCached[generation] { number = max(number, previous.number + 1) }
        let der = try RevocationListBuilder(issuer: ca.certificate, issuerKey: ca.privateKey)
            .build(number: number, thisUpdate: now, nextUpdate: min(now.addingTimeInterval(validity.timeInterval), ca.certificate.notValidAfter), entries: entries)
        previousCached[generation] = (der, now, number, lastRevocation)
        return der
    }

    /// The CRL entries of an issuer: its revoked certificates that have not expired.
    func entries(issuer: String, now: Date) async throws -> [RevocationListBuilder.Entry] {
        try await authority.store.revokedUnexpired(now: now, issuer: issuer).compactMap { item in
            guard let bytes = [UInt8](hex: item.serial) else { return nil }
            return .init(serialNumber: .init(bytes: bytes), revocationDate: item.revokedAt, reason: RevocationReason(rawValue: item.reason) ?? .unspecified)
        }
    }

    /// The generation `/crl` serves: the first issuing CA's while it is active or replaced but not retired (the
    /// certificates it issued carry `/crl`), afterwards the active one's.
    public nonisolated func plainCRLGeneration() -> Int {
        let rotation = authority.active.rotation.state
        let first = rotation.intermediates.first { $0.generation == 1 }
        if first == nil || first?.stage == .active || first?.stage == .previous { return 1 }
        return rotation.active(.intermediate)?.generation ?? 1
    }

    /// Every issuing CA's CRL (DER): the active one's and those of replaced, unretired ones.
    public func allIssuerCRLs(now: Date = .now) async throws -> [[UInt8]] {
        var result = [try await current(now: now).der]
        for generation in authority.active.rotation.previousGenerations {
            if let der = try await crl(generation: generation, now: now) { result.append(der) }
        }
        return result
    }

    /// Publishes a CRL that covers every revocation recorded when this was called. Concurrent callers share one
    /// generation; a caller whose revocation came after that generation started waits for the next one.
    @discardableResult
    public func publish(now: Date = .now) async throws -> StoredCRL {
        while true {
            let wanted = try await authority.store.lastRevocationSequence()
            if let running = inFlight {
                let crl = try await running.value
                if crl.lastRevocation >= wanted { return crl }
                continue
            }
            let task = Task { try await self.generate(now: now) }
            inFlight = task
            do {
                let crl = try await task.value
                inFlight = nil
                cached = crl
                return crl
            } catch {
                inFlight = nil
                throw error
            }
        }
    }

    /// The ML-DSA issuing CA's CRL (DER), listing the revoked certificates it issued; nil without an ML-DSA hierarchy.
    /// Made again after a revocation and half-way to its nextUpdate. Its number is the thisUpdate time in milliseconds:
    /// increasing across restarts and replicas without a table of its own.
    public func currentPQ(now: Date = .now) async throws -> [UInt8]? {
        guard let pq = authority.pqCA else { return nil }
        let lastRevocation = try await authority.store.lastRevocationSequence()
        if let cached = pqCached, cached.lastRevocation >= lastRevocation,
           now < cached.crl.thisUpdate.addingTimeInterval(validity.timeInterval / 2) {
            return cached.der
        }
        let entries = try await entries(issuer: pq.certificate.subject.description, now: now)
        var number = UInt64(max(0, now.timeIntervalSince1970 * 1000))
        if let previous = pqCached?.crl.crlNumber {
            number = max(number, previous.reduce(0) { $0 << 8 | UInt64($1) } + 1)
        }
        let der = try RevocationListBuilder.build(
            mldsaIssuer: pq.certificate, key: pq.key, number: number, thisUpdate: now,
            nextUpdate: min(now.addingTimeInterval(validity.timeInterval), pq.certificate.notAfter), entries: entries
        )
        pqCached = (try RevocationList(derEncoded: der), der, lastRevocation)
        return der
    }

    /// Builds, signs and stores the next CRL. Retries when another writer (process or replica) published the same
    /// number first.
    private func generate(now: Date) async throws -> StoredCRL {
        for _ in 0..<5 {
            let lastRevocation = try await authority.store.lastRevocationSequence()
            let latest = try await authority.store.latestCRL()
            let active = authority.active
            let entries = try await entries(issuer: active.issuer, now: now)
            let number = (latest?.number ?? 0) + 1
            let nextUpdate = now.addingTimeInterval(validity.timeInterval)
            let der = try RevocationListBuilder(issuer: active.ca.certificate, issuerKey: active.ca.privateKey)
                .build(number: UInt64(number), thisUpdate: now, nextUpdate: nextUpdate, entries: entries)
            let crl = StoredCRL(number: number, thisUpdate: now, nextUpdate: nextUpdate, lastRevocation: lastRevocation, der: der)
            do {
                try await authority.store.storeCRL(crl)
                return crl
            } catch let error as StoreError where error.code == .conflict {
                continue
            }
        }
        throw AuthorityError(.conflict, "could not publish a CRL: other writers kept taking the next number")
    }
}

extension Authority {
    /// Revokes and then publishes a new CRL, so the inventory, audit trail, CRL and event log change together.
    /// A failure to publish the CRL is reported but does not undo the revocation (it is already durable).
    public func revokeAndPublish(serial: String, reason: RevocationReason, actor: String, publisher: RevocationPublisher,
                                 now: Date = .now) async throws -> (CertificateRecord, StoredCRL?) {
        let record = try await revoke(serial: serial, reason: reason, actor: actor, now: now)
        let crl = try? await publisher.publish(now: now)
        return (record, crl)
    }
}
