import Foundation
import Logging
import MutualClient
import MutualPKCS11
import MutualPKI
import Synchronization
import X509

/// Keeps a CRL file fresh for servers that check revocation from files (nginx `ssl_crl`, HAProxy `crl-file`): fetches
/// the CRLs of every CA level from the authority (`/crls.pem`) over the verified connection, checks each one (signed by
/// a CA of the agent's own chain, not past its nextUpdate, one per CA level), writes the file atomically when it
/// changed, and runs the reload hook. It refreshes every `interval`, and always well before the earliest nextUpdate (at
/// half of the time left), so a server never holds an expired CRL — which nginx answers by refusing every client.
/// A failed refresh keeps the current file and is retried with backoff, still ahead of nextUpdate.
public final class CRLRefresher: Sendable {
    public struct Configuration: Sendable {
        public var authority: String
        /// The agent's output directory: its chain and bundle are the trust for the fetch and the CRL issuers.
        public var outDir: String
        public var crlPath: String
        public var interval: ValidityDuration
        public var hook: ReloadHook
        public var requestTimeout: Duration = .seconds(15)
        /// The agent's PKCS#11 key store (for the PIN of a token-held key named by key.uri).
        public var keyStore: PKCS11URI?

        public init(authority: String, outDir: String, crlPath: String, interval: ValidityDuration = .minutes(5), hook: ReloadHook = .init()) {
            self.authority = authority.hasSuffix("/") ? String(authority.dropLast()) : authority
            self.outDir = outDir
            self.crlPath = crlPath
            self.interval = interval
            self.hook = hook
        }
    }

    public enum Outcome: Sendable, Equatable {
        /// The file holds fresh CRLs (`changed`: it was rewritten and the hook ran); refresh again at `next`.
        case fresh(changed: Bool, nextUpdate: Date, next: Date)
        /// Nothing to trust yet (the agent has not enrolled) or the refresh failed; try again at `next`.
        case failed(reason: String, next: Date)
    }

    public let configuration: Configuration
    let clock: any AgentClock
    let logger: Logger
    private let failures = Mutex(0)

    public init(configuration: Configuration, clock: any AgentClock = SystemClock(), logger: Logger) {
        self.configuration = configuration
        self.clock = clock
        self.logger = logger
    }

    public func run() async throws {
        while !Task.isCancelled {
            switch await refresh() {
            case .fresh(_, _, let next), .failed(_, let next):
                try await clock.sleep(until: next)
            }
        }
    }

    /// One refresh: fetch, check, write if changed, run the hook.
    public func refresh() async -> Outcome {
        let now = clock.now
        do {
            guard let current = try Delivery.read(outDir: configuration.outDir, pinFrom: configuration.keyStore) else {
                return fail("no certificate in \(configuration.outDir) yet: the CRLs are fetched once the agent has enrolled", now: now, quiet: true)
            }
            let client = try AuthorityClient(baseURL: configuration.authority, trustRoots: current.roots, timeout: configuration.requestTimeout)
            defer { Task { try? await client.shutdown() } }
            let bytes = try await client.chainCRLs()
            // /crls.pem is the classical hierarchy's (nginx's ssl_crl); its issuers are the classical certificates here.
            let roots = current.roots.compactMap(\.classical)
            // A cross-certificate (a root certified by the root before it, during a root rotation) is another path to
            // a root this agent trusts, not a CA whose CRL it needs.
            let chain = current.chain.dropFirst().compactMap(\.classical).filter { ca in !roots.contains { $0.subject == ca.subject } }
            // Required: a CRL for every CA of this agent's own chain, up to the root that anchors it. During a CA
            // rotation /crls.pem also carries the CRLs of the other root and issuing CA (old or new): accepted when
            // that CA is one of this agent's roots, or an issuing CA from /bundle.pem that one of its roots signed.
            let own = chain + roots.filter { root in chain.isEmpty || chain.contains { $0.issuer == root.subject } }
            let known = Self.certifiedBy(roots, among: ((try? await client.bundle()) ?? []).prefix(64)).filter { !own.contains($0) }
            let nextUpdate = try Self.check(bytes, issuers: own, alsoKnown: known, now: now)
            let existing = FileManager.default.contents(atPath: configuration.crlPath).map { Array($0) }
            let changed = existing != bytes
            if changed {
                try AtomicFile.write(bytes, to: configuration.crlPath, mode: 0o644)
                logger.info("CRLs written", metadata: ["path": "\(configuration.crlPath)", "next_update": "\(nextUpdate)"])
                await configuration.hook.run(logger: logger)
            }
            failures.withLock { $0 = 0 }
            let next = min(now.addingTimeInterval(configuration.interval.timeInterval), now.addingTimeInterval(max(1, nextUpdate.timeIntervalSince(now) / 2)))
            return .fresh(changed: changed, nextUpdate: nextUpdate, next: next)
        } catch let error as AuthorityClientError {
            return fail("fetching \(configuration.authority)/crls.pem: \(error)", now: now)
        } catch let error as PKIError {
            return fail("the authority's CRLs were refused, the current file is kept: \(error.reason)", now: now)
        } catch let error as AgentError {
            return fail(error.message, now: now)
        } catch {
            return fail("CRL refresh failed: \(error)", now: now)
        }
    }

    /// Checks a `/crls.pem` answer: PEM CRLs, each signed by one of `issuers`, none past its nextUpdate, and one for
    /// every CA among `issuers` (a server that checks every level refuses clients when a level has no CRL). Returns the
    /// earliest nextUpdate.
    /// `anchors` and every certificate of `candidates` reachable from them by signatures: a CA certified by a
    /// known CA becomes known (a cross-certificate makes a new root known, then the CAs that root certified).
    static func certifiedBy(_ anchors: [Certificate], among candidates: some Collection<Certificate>) -> [Certificate] {
        var known = anchors
        var added = true
        while added {
            added = false
            for candidate in candidates where !known.contains(candidate) {
                if known.contains(where: { $0.subject == candidate.issuer && $0.publicKey.isValidSignature(candidate.signature, for: candidate) }) {
                    known.append(candidate)
                    added = true
                }
            }
        }
        return known
    }

    /// Checks the CRL file: every CRL signed by its issuer, none expired, one for each of `issuers` (this agent's
    /// roots and chain). CRLs of `alsoKnown` CAs (another issuing CA during a rotation, certified by one of the roots)
    /// are accepted too, checked the same way, but not required.
    static func check(_ bytes: [UInt8], issuers: [Certificate], alsoKnown: [Certificate] = [], now: Date) throws -> Date {
        guard bytes.count <= 16 << 20 else { throw PKIError(.inputTooLarge, "the CRL file is over 16 MiB") }
        let text = String(decoding: bytes, as: UTF8.self)
        let crls = try RevocationList.pemDocuments(text).map { try RevocationList(derEncoded: $0) }
        guard !crls.isEmpty else { throw PKIError(.malformedInput, "no X509 CRL block in the answer") }
        var earliest = Date.distantFuture
        var covered = Set<DistinguishedName>()
        for crl in crls {
            guard let issuer = (issuers + alsoKnown).first(where: { $0.subject == crl.issuer && crl.isSigned(by: $0) }) else {
                throw PKIError(.badSignature, "a CRL for \(crl.issuer) is not signed by a CA of this agent's chain")
            }
            guard let nextUpdate = crl.nextUpdate, nextUpdate > now else {
                throw PKIError(.malformedInput, "the CRL of \(crl.issuer) has expired (nextUpdate \(crl.nextUpdate.map { "\($0)" } ?? "absent"))")
            }
            covered.insert(issuer.subject)
            earliest = min(earliest, nextUpdate)
        }
        let missing = Set(issuers.map(\.subject)).subtracting(covered)
        guard missing.isEmpty else {
            throw PKIError(.malformedInput, "no CRL for \(missing.map(\.description).sorted().joined(separator: ", "))")
        }
        return earliest
    }

    private func fail(_ reason: String, now: Date, quiet: Bool = false) -> Outcome {
        let attempt = failures.withLock { value -> Int in
            value += 1
            return value
        }
        var delay = min(configuration.interval.timeInterval, 5 * pow(2, Double(min(attempt - 1, 10))))
        // Never wait past half the time the current file has left.
        if let bytes = FileManager.default.contents(atPath: configuration.crlPath),
           let crls = try? RevocationList.pemDocuments(String(decoding: bytes, as: UTF8.self)).compactMap({ try? RevocationList(derEncoded: $0) }),
           let earliest = crls.compactMap(\.nextUpdate).min() {
            delay = min(delay, max(1, earliest.timeIntervalSince(now) / 2))
        }
        if quiet {
            logger.info("CRL refresh waiting", metadata: ["reason": "\(reason)"])
        } else {
            logger.warning("CRL refresh failed; keeping the current file", metadata: ["error": "\(reason)", "retry_in_s": "\(Int(delay))"])
        }
        return .failed(reason: reason, next: now.addingTimeInterval(delay))
    }
}
