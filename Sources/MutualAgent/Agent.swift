import AsyncHTTPClient
import Crypto
import Foundation
import Logging
import MutualClient
import MutualPKCS11
import MutualPKI
import NIOCore
import NIOSSL
import Synchronization
import X509

/// `mutual agent`: keeps a private key that never leaves the host and a certificate that is always fresh.
/// First enrollment uses a token (`/v1/sign`); every renewal goes over mTLS with the current certificate and a new
/// key (`/v1/renew`); after an expiry (host offline) it tries `/v1/renew-expired`. Files are delivered atomically
/// (``Delivery``) and then the reload hook runs.
public final class Agent: Sendable {
    public struct Configuration: Sendable {
        public var authority: String
        public var rootFingerprint: String
        public var token: String?
        /// A SPIFFE ID / URI (URI SAN) or a DNS name.
        public var identity: String
        public var dnsNames: [String]
        public var outDir: String
        /// The key type of new keys; an identity the authority is moving to ML-DSA switches by itself (see
        /// ``Agent/keyChoice``).
        public var keyType: KeyChoice
        public var schedule: RenewalSchedule
        public var validity: ValidityDuration?
        public var profile: String?
        public var hook: ReloadHook
        /// Deadline of one call to the authority, connection attempts included.
        public var requestTimeout: Duration = .seconds(15)
        /// The private key lives in this PKCS#11 token (generated there on first use) and is kept across renewals:
        /// only certificates are renewed, the key never leaves the token. nil: a new key file at every renewal.
        public var keyStore: PKCS11URI?
        /// How often a waiting agent asks the authority whether its certificate's CA is being rotated out with
        /// `--renew-now` (then it renews at once).
        public var caCheckInterval: TimeInterval = 300

        public init(
            authority: String, rootFingerprint: String, token: String?, identity: String, dnsNames: [String] = [], outDir: String,
            keyType: KeyChoice = .classical(.p256), schedule: RenewalSchedule = .init(), validity: ValidityDuration? = nil, profile: String? = nil,
            hook: ReloadHook = .init()
        ) throws {
            self.authority = authority.hasSuffix("/") ? String(authority.dropLast()) : authority
            guard let url = URL(string: self.authority), url.scheme == "https", url.host != nil else {
                throw AgentError(.usage, "--authority must be an https:// URL, got '\(authority)'")
            }
            self.rootFingerprint = try normalizedFingerprint(rootFingerprint)
            self.token = token
            if identity.contains("://") {
                if identity.hasPrefix("spiffe://") { try Names.requireWorkloadPath(identity) } else { _ = try Names.validatedURI(identity) }
            } else {
                _ = try Names.normalizedDNSName(identity, allowWildcard: false)
            }
            self.identity = identity
            self.dnsNames = try dnsNames.map { try Names.normalizedDNSName($0, allowWildcard: false) }
            self.outDir = outDir
            self.keyType = keyType
            guard schedule.fraction > 0 && schedule.fraction < 1 else { throw AgentError(.usage, "--renew-at must be between 0 and 1 (e.g. 2/3)") }
            self.schedule = schedule
            self.validity = validity
            self.profile = profile
            self.hook = hook
        }
    }

    public enum Outcome: Sendable, Equatable {
        case enrolled(serial: String)
        case renewed(serial: String)
        case notDue(until: Date)
        case failed(reason: String, retryAt: Date)
        case stopped(reason: String)
    }

    public let configuration: Configuration
    let clock: any AgentClock
    let logger: Logger
    let random: @Sendable () -> Double
    private let status: Mutex<AgentStatus>
    /// The key type the authority asked for (`key-type-required`: a migration to ML-DSA, or a token's key types), once
    /// it did.
    private let movedTo = Mutex<KeyChoice?>(nil)
    /// When the agent last asked the authority about a CA rotation (`GET /v1/ca`).
    private let lastCACheck = Mutex<Date?>(nil)
    /// The authority's clock relative to ours, measured on verified exchanges (see ``authorityNow()``).
    private let time: Mutex<TimeKeeping>

    struct TimeKeeping {
        /// Authority minus local, seconds.
        var offset: Double?
        /// Local time of the last measurement.
        var measuredAt: Date?
    }

    /// Offsets below this are measurement noise (the `Date` header has whole seconds) and are not applied.
    static let offsetTolerance: TimeInterval = 2
    /// The offset is measured again when the last measurement is older than this (by the local clock, either way:
    /// a clock stepped back makes the last measurement look like the future).
    static let probeInterval: TimeInterval = 300
    /// The agent never sleeps longer than this, so a local clock step is noticed within it.
    static let maximumSleep: TimeInterval = 600
    /// Called after each delivery (the sidecar proxy reloads from it).
    let onDelivered: (@Sendable () async -> Void)?

    public init(configuration: Configuration, clock: any AgentClock = SystemClock(), logger: Logger,
                random: @escaping @Sendable () -> Double = { Double.random(in: -1...1) }, onDelivered: (@Sendable () async -> Void)? = nil) {
        self.configuration = configuration
        self.clock = clock
        self.logger = logger
        self.random = random
        self.onDelivered = onDelivered
        var initial = AgentStatus(identity: configuration.identity, authority: configuration.authority, state: "starting", consecutiveFailures: 0, renewals: 0)
        if let previous = AgentStatus.read(outDir: configuration.outDir), previous.identity == configuration.identity {
            initial = previous
        }
        self.status = Mutex(initial)
        self.time = Mutex(TimeKeeping(offset: initial.clockSkewSeconds, measuredAt: nil))
    }

    public var currentStatus: AgentStatus { status.withLock { $0 } }

    /// Runs until cancelled, or throws ``AgentError`` when renewal can no longer succeed without a person.
    public func run() async throws {
        while !Task.isCancelled {
            switch await step() {
            case .stopped(let reason):
                throw AgentError(.fatal, reason)
            case .notDue(let until):
                try await sleep(until: min(until, authorityNow().addingTimeInterval(configuration.caCheckInterval)))
            case .failed(_, let retryAt):
                try await sleep(until: retryAt)
            case .enrolled, .renewed:
                continue
            }
        }
    }

    /// Whether the authority asked certificates of CAs other than the one issuing now to renew at once (a CA
    /// rotation activated with `--renew-now`) and this certificate is one of them. Asked at most every
    /// ``Configuration/caCheckInterval``; an authority that cannot be asked (or an older one) means no.
    func askedToRenewNow(leaf: AnyCertificate, roots: [AnyCertificate], now: Date) async -> Bool {
        let due = lastCACheck.withLock { last -> Bool in
            if let last, now.timeIntervalSince(last) < configuration.caCheckInterval, now >= last { return false }
            last = now
            return true
        }
        guard due, let client = try? AuthorityClient(baseURL: configuration.authority, trustRoots: roots, timeout: configuration.requestTimeout) else {
            return false
        }
        defer { Task { try? await client.shutdown() } }
        guard let info = try? await client.issuingCA(), info.renewNow else { return false }
        return leaf.issuer.description != info.issuer
    }

    /// The authority's time now, as far as this host knows: the local clock plus the measured offset. Every decision
    /// (is it due, has it expired, the timestamp of a proof) is taken on it, so a host whose clock is off by hours
    /// still renews on time and is not refused for its clock.
    public func authorityNow() -> Date { clock.now.addingTimeInterval(appliedOffset) }

    var appliedOffset: TimeInterval {
        time.withLock { t in
            guard let offset = t.offset, abs(offset) >= Self.offsetTolerance else { return 0 }
            return offset
        }
    }

    /// Sleeps until an instant on the authority's clock, converted to ours; never longer than ``maximumSleep``.
    func sleep(until authorityTime: Date) async throws {
        let local = authorityTime.addingTimeInterval(-appliedOffset)
        try await clock.sleep(until: min(local, clock.now.addingTimeInterval(Self.maximumSleep)))
    }

    /// Measures the offset again over a verified connection when the last measurement is stale.
    func refreshTime(roots: [AnyCertificate]) async {
        let stale = time.withLock { t in t.measuredAt.map { abs(clock.now.timeIntervalSince($0)) > Self.probeInterval } ?? true }
        guard stale else { return }
        do {
            let client = try AuthorityClient(baseURL: configuration.authority, trustRoots: roots, timeout: configuration.requestTimeout)
            defer { Task { try? await client.shutdown() } }
            noteSkew(try await client.serverTime())
        } catch {
            logger.debug("time probe failed", metadata: ["error": "\(error)"])
        }
    }

    /// One decision: enroll, renew, or say when to come back.
    public func step() async -> Outcome {
        let current: Delivery.Current?
        do {
            current = try Delivery.read(outDir: configuration.outDir, pinFrom: configuration.keyStore)
        } catch {
            return stop("the delivered files in \(configuration.outDir) are unreadable (\(error)); remove them and enroll again with a new token")
        }
        guard let current else { return await enroll(now: authorityNow()) }
        await refreshTime(roots: current.roots)
        let now = authorityNow()
        let leaf = current.leaf
        let lifetime = leaf.notValidAfter.timeIntervalSince(leaf.notValidBefore)
        if status.withLock({ $0.state }) == "stopped", status.withLock({ $0.serial }) == leaf.serialHex {
            return .stopped(reason: status.withLock { $0.lastError ?? "stopped" })
        }
        let renewAt = status.withLock { status -> Date in
            if status.serial == leaf.serialHex, let renewAt = status.renewAt { return renewAt }
            let at = configuration.schedule.renewalTime(notBefore: leaf.notValidBefore, notAfter: leaf.notValidAfter, unit: random())
            status.serial = leaf.serialHex
            status.notAfter = leaf.notValidAfter
            status.renewAt = at
            status.renewalMethod = RenewalMethod(for: leaf).rawValue
            if status.state == "starting" { status.state = "ok" }
            return at
        }
        if now < renewAt && status.withLock({ $0.consecutiveFailures == 0 }) {
            if await askedToRenewNow(leaf: leaf, roots: current.roots, now: now) {
                logger.notice("the authority asks certificates of its replaced CA to renew now: renewing before the schedule", metadata: ["issuer": "\(leaf.issuer)"])
            } else {
                writeStatus()
                return .notDue(until: renewAt)
            }
        }
        if now < leaf.notValidAfter {
            let method = RenewalMethod(for: leaf)
            let (outcome, verdict) = await attemptClassified(now: now, lifetime: lifetime, what: "renewal") {
                switch method {
                case .mtls:
                    let client = try AuthorityClient(baseURL: self.configuration.authority, trustRoots: current.roots, anyIdentity: (current.chain, current.key), timeout: self.configuration.requestTimeout)
                    defer { Task { try? await client.shutdown() } }
                    let (enrollment, key) = try await self.withKeyType(current: current.key) { key in
                        try await client.renew(csrPEM: try self.csr(key: key).pem)
                    }
                    return (enrollment, key, (try? await client.allRoots()) ?? current.roots)
                case .proof:
                    // A certificate without clientAuth cannot be a TLS client: the authority's TLS would refuse it. It
                    // renews over server-authenticated TLS with a proof of possession of its current key instead.
                    let client = try AuthorityClient(baseURL: self.configuration.authority, trustRoots: current.roots, timeout: self.configuration.requestTimeout)
                    defer { Task { try? await client.shutdown() } }
                    let (enrollment, key) = try await self.withKeyType(current: current.key) { key in
                        try await client.renewByProof(certificate: leaf, key: current.key, csr: try self.csr(key: key), now: self.authorityNow())
                    }
                    return (enrollment, key, (try? await client.allRoots()) ?? current.roots)
                }
            }
            // Refused because it expired meanwhile: go on to renew-expired now rather than after a back-off.
            guard case .failed = outcome, authorityNow() >= leaf.notValidAfter || verdict?.expiredMeanwhile == true else {
                return outcome
            }
        }
        logger.warning("certificate expired; trying renew-expired", metadata: ["serial": "\(leaf.serialHex)", "not_after": "\(leaf.notValidAfter)"])
        return await attempt(now: now, lifetime: lifetime, what: "renewal after expiry") {
            let client = try AuthorityClient(baseURL: self.configuration.authority, trustRoots: current.roots, timeout: self.configuration.requestTimeout)
            defer { Task { try? await client.shutdown() } }
            let (enrollment, key) = try await self.withKeyType(current: current.key) { key in
                try await client.renewExpired(certificate: leaf, oldKey: current.key, csr: try self.csr(key: key), now: self.authorityNow())
            }
            return (enrollment, key, current.roots)
        }
    }

    private func enroll(now: Date) async -> Outcome {
        guard let token = configuration.token else {
            return stop("no certificate in \(configuration.outDir) and no --token to enroll with")
        }
        return await attempt(now: now, lifetime: 600, what: "enrollment") {
            let roots = try await self.bootstrapRoots()
            let client = try AuthorityClient(baseURL: self.configuration.authority, trustRoots: roots, timeout: self.configuration.requestTimeout)
            defer { Task { try? await client.shutdown() } }
            let (enrollment, key) = try await self.withKeyType(current: nil) { key in
                try await client.sign(csrPEM: try self.csr(key: key).pem, token: token, profile: self.configuration.profile, validity: self.configuration.validity?.description)
            }
            try Self.checkRenewable(enrollment)
            // The pinned root, and the ML-DSA root the authority serves over this verified connection (the bundle a
            // proxy needs while identities of both families call it).
            return (enrollment, key, (try? await client.allRoots()).flatMap { $0.contains(roots[0]) ? $0 : nil } ?? roots)
        }
    }

    /// Runs one enrollment/renewal, delivers, and turns errors into the next step: retry with backoff, or stop.
    private func attempt(now: Date, lifetime: TimeInterval, what: String,
                         _ body: @escaping @Sendable () async throws -> (Enrollment, AnySigningKey, [AnyCertificate])) async -> Outcome {
        await attemptClassified(now: now, lifetime: lifetime, what: what, body).outcome
    }

    /// ``attempt(now:lifetime:what:_:)``, also returning how a failure was classified (nil when it succeeded).
    private func attemptClassified(now: Date, lifetime: TimeInterval, what: String,
                                   _ body: @escaping @Sendable () async throws -> (Enrollment, AnySigningKey, [AnyCertificate])) async
        -> (outcome: Outcome, verdict: Verdict?)
    {
        status.withLock { $0.lastAttempt = now }
        do {
            let (enrollment, key, roots) = try await body()
            noteSkew(enrollment.serverDate)
            let previous = try? Delivery.read(outDir: configuration.outDir, pinFrom: configuration.keyStore)
            try Delivery.deliver(outDir: configuration.outDir, key: key, chain: enrollment.chain, roots: roots)
            if let keyStore = configuration.keyStore, let label = keyStore.object {
                // Keys of the token that no delivered certificate uses any more (the previous one stays, as its
                // delivery directory does, for a consumer still reading the previous version).
                let keeping = [key, previous?.key].compactMap { k -> [UInt8]? in
                    guard case .classical(let c)? = k else { return nil }
                    return PKCS11Key.holding(c.publicKey)?.id
                }
                do {
                    try PKCS11Key.destroyGenerations(keyStore, label: label, keeping: keeping)
                } catch {
                    logger.warning("could not remove superseded keys from the token", metadata: ["error": "\(error)"])
                }
            }
            let leaf = enrollment.certificate
            // Authorities backdate notBefore (clock skew allowance); the lifetime we schedule on starts when we got it.
            let start = min(max(leaf.notValidBefore, authorityNow()), leaf.notValidAfter)
            let renewAt = configuration.schedule.renewalTime(notBefore: start, notAfter: leaf.notValidAfter, unit: random())
            let first = status.withLock { status -> Bool in
                let first = status.serial == nil
                if !first { status.renewals += 1 }
                status.state = "ok"
                status.serial = enrollment.serial
                status.notAfter = enrollment.notAfter
                status.renewalMethod = RenewalMethod(for: enrollment.certificate).rawValue
                status.renewAt = renewAt
                status.lastSuccess = clock.now
                status.lastError = nil
                status.lastErrorCode = nil
                status.consecutiveFailures = 0
                return first
            }
            writeStatus()
            logger.info("\(what): certificate delivered", metadata: [
                "serial": "\(enrollment.serial)", "not_after": "\(enrollment.notAfter)", "renew_at": "\(renewAt)", "out_dir": "\(configuration.outDir)",
            ])
            await configuration.hook.run(logger: logger)
            await onDelivered?()
            return (first && what == "enrollment" ? .enrolled(serial: enrollment.serial) : .renewed(serial: enrollment.serial), nil)
        } catch {
            if let serverDate = (error as? AuthorityClientError)?.serverDate { noteSkew(serverDate) }
            var verdict = classify(error, what: what)
            if (error as? AuthorityClientError)?.tlsReason == "certificate_verify_failed", let diagnosis = await diagnoseVerifyFailure() {
                verdict = Verdict(kind: .transient, code: "clock-skew", reason: diagnosis)
            }
            let reason = verdict.reason
            if verdict.kind == .fatal { return (stop(reason, code: verdict.code), verdict) }
            let attempt = status.withLock { status -> Int in
                status.consecutiveFailures += 1
                status.state = "retrying"
                status.lastError = reason
                status.lastErrorCode = verdict.code
                return status.consecutiveFailures
            }
            let delay = configuration.schedule.backoff(attempt: attempt, lifetime: lifetime, unit: abs(random()))
            let retryAt = authorityNow().addingTimeInterval(delay)
            writeStatus()
            let left = status.withLock { $0.notAfter }.map { $0.timeIntervalSince(authorityNow()) }
            logger.warning("\(what) failed; keeping the current certificate and retrying", metadata: [
                "error": "\(reason)", "retry_in_s": "\(String(format: "%.1f", delay))", "attempt": "\(attempt)",
                "expires_in_s": "\(left.map { String(Int($0)) } ?? "-")",
            ])
            return (.failed(reason: reason, retryAt: retryAt), verdict)
        }
    }

    /// Refuses, before anything is delivered, a certificate this agent could not renew: one that cannot be a TLS
    /// client from an authority that does not offer renewal by proof of possession. Delivering it would start a
    /// countdown to an outage.
    static func checkRenewable(_ enrollment: Enrollment) throws {
        let method = RenewalMethod(for: enrollment.certificate)
        guard method == .mtls || enrollment.renewal == RenewalMethod.proof.rawValue else {
            throw AgentError(.fatal, "the issued certificate \(enrollment.serial) has no clientAuth usage and the authority does not offer renewal by proof of possession (it answered renewal=\(enrollment.renewal ?? "none")): the agent could not renew it; upgrade the authority or enroll with a profile that includes clientAuth (workload, client)")
        }
    }

    private func stop(_ reason: String, code: String = "stopped") -> Outcome {
        status.withLock { status in
            status.state = "stopped"
            status.lastError = reason
            status.lastErrorCode = code
        }
        writeStatus()
        logger.error("stopped: \(reason)")
        return .stopped(reason: reason)
    }

    /// How a failed attempt is taken: retried, or the agent stops. `expiredMeanwhile`: a renewal refused because the
    /// certificate expired between the agent's check and the authority's; the same step goes on to renew-expired.
    /// `code` is the stable reason (the authority's problem code, a TLS reason, or the agent's own), kept in the status.
    struct Verdict: Equatable {
        var kind: AgentError.Kind
        var expiredMeanwhile = false
        var code: String
        var reason: String
    }

    /// Decides on codes only — the authority's problem code and BoringSSL's reason code — never on message text, so a
    /// reworded message cannot change what the agent does.
    func classify(_ error: any Error, what: String) -> Verdict {
        switch error {
        case let error as AgentError:
            return Verdict(kind: error.kind, code: error.kind == .fatal ? "agent-stopped" : "agent-retrying", reason: error.message)
        case let error as AuthorityClientError:
            if error.status == 0 {
                switch error.tlsReason {
                case "sslv3_alert_certificate_expired" where what == "renewal":
                    // The authority's TLS layer refused our certificate as expired while our clock still has it valid:
                    // the clocks differ. Renew-expired now instead of retrying until ours catches up.
                    return Verdict(
                        kind: .transient, expiredMeanwhile: true, code: "certificate-expired",
                        reason: "the authority refused the certificate as expired at the TLS handshake while this host's clock still has it valid (\(error.detail)); trying renew-expired"
                    )
                case "sslv3_alert_unsupported_certificate":
                    // Our certificate's key usages do not allow TLS client authentication. Retrying changes nothing,
                    // but the certificate is still valid: say so.
                    return Verdict(kind: .transient, code: "unsupported-certificate", reason: "the authority's TLS refused this certificate as a client certificate (alert unsupported_certificate: its extended key usage does not include clientAuth) — \(error.detail)")
                default:
                    return Verdict(kind: .transient, code: error.tlsReason ?? "transport", reason: "authority unreachable or failing: \(error.detail)")
                }
            }
            if error.status >= 500 || error.status == 429 {
                return Verdict(kind: .transient, code: error.code, reason: "authority failing (\(error.status) \(error.code)): \(error.detail)")
            }
            switch error.code {
            case "certificate-revoked":
                return Verdict(kind: .fatal, code: error.code, reason: "the certificate was revoked (\(error.detail)); renewal stopped — enroll again with a new token once the cause is fixed")
            case "certificate-expired" where what == "renewal":
                // It expired between our check and the authority's (a late wake-up, a slow network, clock skew):
                // not a reason to stop; renew-expired comes next.
                return Verdict(kind: .transient, expiredMeanwhile: true, code: error.code, reason: "the certificate expired during the renewal (\(error.detail)); trying renew-expired")
            case "clock-skew", "certificate-not-yet-valid":
                // A matter of clocks, never a reason to stop: the offset was just measured from the answer's Date, and
                // the next attempt uses the authority's time.
                return Verdict(kind: .transient, code: error.code, reason: "refused because of the clocks (\(error.detail)); retrying on the authority's time (offset \(Int(appliedOffset)) s)")
            default:
                if what == "renewal after expiry" {
                    return Verdict(kind: .fatal, code: error.code, reason: "the certificate expired and the authority refused to renew it (\(error.code)): \(error.detail); a new token is needed")
                }
                return Verdict(kind: .fatal, code: error.code, reason: "the authority refused the \(what) (\(error.status) \(error.code)): \(error.detail)")
            }
        default:
            return Verdict(kind: .transient, code: "failed", reason: "\(what) failed: \(String(describing: error))")
        }
    }

    /// After the authority's certificate failed to verify: if the authority's clock (read without verification, only
    /// for this message) is far from ours, the clock is the likely cause — say so, with the size of the gap.
    func diagnoseVerifyFailure() async -> String? {
        guard let theirs = await AuthorityClient.unverifiedServerTime(baseURL: configuration.authority) else { return nil }
        let gap = theirs.timeIntervalSince(clock.now)
        guard abs(gap) > 300 else { return nil }
        let size = Self.humanDuration(abs(gap))
        return "the authority's certificate does not verify at this host's time (\(clock.now)), and the authority's clock says \(theirs): this host's clock is about \(size) \(gap > 0 ? "behind" : "ahead") — fix the clock (NTP); the agent keeps retrying"
    }

    static func humanDuration(_ seconds: TimeInterval) -> String {
        if seconds >= 86_400 { return String(format: "%.1f d", seconds / 86_400) }
        if seconds >= 3600 { return String(format: "%.1f h", seconds / 3600) }
        if seconds >= 60 { return "\(Int(seconds / 60)) min" }
        return "\(Int(seconds)) s"
    }

    func noteSkew(_ serverDate: Date?) {
        guard let serverDate else { return }
        let local = clock.now
        let skew = serverDate.timeIntervalSince(local)
        let previous = time.withLock { t -> Double? in
            let previous = t.offset
            t.offset = skew
            t.measuredAt = local
            return previous
        }
        status.withLock { $0.clockSkewSeconds = (skew * 10).rounded() / 10 }
        if abs(skew) > 60, previous.map({ abs($0 - skew) > 30 }) ?? true {
            logger.warning("clock skew: this host's clock differs from the authority's; renewals are scheduled on the authority's clock", metadata: [
                "skew_s": "\(Int(skew))", "host_clock": "\(abs(skew) > 0 && skew > 0 ? "behind" : "ahead")", "code": "clock-skew",
            ])
        }
    }

    private func writeStatus() {
        // Before the first delivery the directory may not exist yet: a failed enrollment must still leave a status.
        try? FileManager.default.createDirectory(atPath: configuration.outDir, withIntermediateDirectories: true, attributes: [.posixPermissions: 0o700])
        currentStatus.write(outDir: configuration.outDir)
    }

    /// The request for a new key: no subject, the identity (and `--dns` names) as subjectAltName.
    func csr(key: AnySigningKey) throws -> (der: [UInt8], pem: String) {
        var names: [GeneralName] = []
        if configuration.identity.contains("://") {
            names.append(.uniformResourceIdentifier(configuration.identity))
        } else {
            names.append(.dnsName(configuration.identity))
        }
        for dns in configuration.dnsNames where dns != configuration.identity { names.append(.dnsName(dns)) }
        return try key.certificationRequest(subject: DistinguishedName(), names: names)
    }

    /// The key type of the next key: the configured one, except that an identity already on ML-DSA stays there (a
    /// unit file still saying `--key-type p256` does not move it back), and one the authority asked to move uses the
    /// parameter set it named.
    public var keyChoice: KeyChoice {
        if let asked = movedTo.withLock({ $0 }) { return asked }
        return configuration.keyType
    }

    /// Generates a key of ``keyChoice`` and runs `body` with it; when the authority answers `key-type-required` (the
    /// identity is being moved to ML-DSA), generates a key of the type it names and runs `body` once more.
    func withKeyType(current: AnySigningKey?, _ body: (AnySigningKey) async throws -> Enrollment) async throws -> (Enrollment, AnySigningKey) {
        var choice = keyChoice
        if case .mldsa(let variant)? = current?.keyChoice, case .classical = choice { choice = .mldsa(variant) }
        if let keyStore = configuration.keyStore {
            // The token's key, the same one at every renewal (a token key cannot be replaced by a fresh file).
            guard case .classical(let keyType) = choice, PKCS11Key.supportedTypes.contains(keyType) else {
                throw AgentError(.usage, "a key in a PKCS#11 token may be \(PKCS11Key.supportedTypes.map(\.rawValue).joined(separator: ", ")), not \(choice.rawValue)")
            }
            // A new key pair in the token for every certificate (the authority refuses to renew onto the same key),
            // with the URI's label and a fresh id; superseded ones are destroyed after delivery.
            let key = AnySigningKey.classical(try PKCS11Key.generate(keyStore, keyType: keyType, anotherGeneration: true).certificatePrivateKey)
            return (try await body(key), key)
        }
        let key = try choice.generate()
        do {
            return (try await body(key), key)
        } catch let error as AuthorityClientError where error.code == "key-type-required" {
            guard let asked = error.members["key_type"].flatMap(KeyChoice.init(rawValue:)), asked != choice else { throw error }
            logger.notice("the authority asks for a \(asked.rawValue) key: asking again with a new one", metadata: ["identity": "\(configuration.identity)"])
            movedTo.withLock { $0 = asked }
            let moved = try asked.generate()
            return (try await body(moved), moved)
        }
    }

    /// Trust in the authority from the pinned root fingerprint, not from first use: `/roots.pem` is fetched without
    /// verifying the TLS connection (there is nothing to verify against yet), and only a root whose SHA-256 equals
    /// the pin is kept; every later connection verifies against it.
    func bootstrapRoots() async throws -> [AnyCertificate] {
        let bytes: [UInt8]
        do {
            let answer = try await AuthorityClient.unverifiedGET(
                self.configuration.authority + "/roots.pem", timeout: self.configuration.requestTimeout, limit: 1 << 20
            )
            guard answer.status == 200 else {
                throw AgentError(.transient, "GET \(self.configuration.authority)/roots.pem: HTTP \(answer.status)")
            }
            bytes = answer.body
        } catch let error as AgentError {
            throw error
        } catch {
            throw AgentError(.transient, "authority unreachable: \(error)")
        }
        let roots = try PEMBundle.certificates(fromBytes: bytes, what: "roots.pem")
        var seen: [String] = []
        for root in roots {
            let fingerprint = SHA256.hash(data: try root.derBytes).hexString
            if fingerprint == self.configuration.rootFingerprint { return [.classical(root)] }
            seen.append(fingerprint)
        }
        throw AgentError(.fatal, "the authority's roots do not match --root-fingerprint \(self.configuration.rootFingerprint) (it offered \(seen.joined(separator: ", "))); refusing to trust it")
    }
}

/// What to run after a delivery: a command (`--exec`) and/or a signal to a process (`--signal HUP --pid-file F`).
public struct ReloadHook: Sendable {
    public var exec: String?
    public var signal: Int32?
    public var pidFile: String?

    public init(exec: String? = nil, signal: Int32? = nil, pidFile: String? = nil) {
        self.exec = exec
        self.signal = signal
        self.pidFile = pidFile
    }

    func run(logger: Logger) async {
        if let exec {
            let status: Int32 = await withCheckedContinuation { continuation in
                let process = Process()
                process.executableURL = URL(fileURLWithPath: "/bin/sh")
                process.arguments = ["-c", exec]
                process.terminationHandler = { continuation.resume(returning: $0.terminationStatus) }
                do { try process.run() } catch { continuation.resume(returning: -1) }
            }
            if status == 0 {
                logger.info("reload hook ran", metadata: ["exec": "\(exec)"])
            } else {
                logger.error("reload hook failed", metadata: ["exec": "\(exec)", "status": "\(status)"])
            }
        }
        if let signal, let pidFile {
            let text = (try? String(contentsOfFile: pidFile, encoding: .utf8))?.trimmingCharacters(in: .whitespacesAndNewlines)
            if let text, let pid = pid_t(text), pid > 0, kill(pid, signal) == 0 {
                logger.info("signalled", metadata: ["pid": "\(pid)", "signal": "\(signal)"])
            } else {
                logger.error("could not signal the process in the pid file", metadata: ["pid_file": "\(pidFile)"])
            }
        }
    }
}

/// How the agent renews a certificate: over mTLS when it may be a TLS client, else with a proof of possession of its
/// key (the authority's `/v1/renew` accepts both).
enum RenewalMethod: String, Sendable {
    case mtls
    case proof

    init(for certificate: AnyCertificate) {
        guard let eku = try? certificate.extensions.extendedKeyUsage else {
            self = .mtls
            return
        }
        self = eku.contains(.clientAuth) || eku.contains(.any) ? .mtls : .proof
    }
}
