import Crypto
import Foundation
import MutualClient
import MutualPKI
import NIOCore
import NIOSSL
import Synchronization
import X509

/// One inbound listener's complete, immutable state: credentials, client-CA bundle, TLS context and policy. A
/// reload builds a new one and swaps it in (``InboundSlot``): new connections take the new state, established ones
/// keep the one they started with.
public final class InboundState: Sendable {
    public let name: String
    public let configuration: ProxyConfiguration.Listener
    public let credentials: LoadedCredentials
    /// The client-CA bundle, classical and ML-DSA roots alike.
    public let clientRoots: [AnyCertificate]
    /// Its classical roots, for swift-certificates' verifier; and every root in the ML-DSA verifier's form.
    let classicalClientRoots: [Certificate]
    let genericClientRoots: [MLDSACertificate]
    public let sslContext: NIOSSLContext
    /// The same TLS settings with X25519MLKEM768 as the only group, for clients that offer it (see
    /// ``GroupPreferenceHandler``).
    let hybridOnlyContext: NIOSSLContext
    public let policy: RoutePolicy
    public let upstream: UpstreamAddress
    public let requireCertificate: Bool
    public let maxDepth: Int
    public let forwardXFCC: Bool
    public let forwardRFC9440: Bool
    /// `x-client-identity: <principal>` (opt-in with `forward: [..., identity]`).
    public let forwardIdentity: Bool
    let stamps: [String: FileStamp?]
    /// Identities verified by full handshakes on this TLS context, by leaf fingerprint. A resumed session (which
    /// skips certificate verification) is only accepted when its certificate is found here, then re-checked for
    /// expiry and revocation. Session tickets are bound to this context, so the cache never outlives them.
    private let verifiedIdentities = Mutex<[String: VerifiedPeer]>([:])
    /// Chains this context verified, by ``chainKey(_:)`` of the presented DER: a client that reconnects with the same
    /// chain is checked only for what can change since (time and revocation), not parsed and path-validated again,
    /// and its connections share one ``VerifiedPeer``. Bounded like `verifiedIdentities`; a reload builds a new state
    /// (new roots, empty cache).
    private let verifiedChains = Mutex<[[UInt8]: VerifiedPeer]>([:])
    static let verifiedIdentityLimit = 10_000
    /// Intermediates clients send, parsed once and shared by every connection that presents the same DER (they are
    /// the same few certificates for a whole fleet): saves parsing time and memory per connection.
    private let parsedIntermediates = Mutex<[[UInt8]: AnyCertificate]>([:])
    static let parsedIntermediateLimit = 256
    /// Identity headers by leaf fingerprint: computed once per client certificate, not once per connection or per
    /// HTTP/2 stream (XFCC with the PEM chain and RFC 9440's base64 are several KiB of encoding). They depend only on
    /// the certificate and on this state's identity and `forward` setting, so they live exactly as long as it does.
    private let identityHeaderCache = Mutex<[String: Result<[(String, String)], ForwardedIdentity.Unrepresentable>]>([:])
    static let identityHeaderLimit = 4096
    /// Limits and timeouts of this listener.
    public let limits: ProxyLimits
    /// Client headers removed before forwarding, besides the ones the proxy owns.
    let stripMatcher: HeaderNames.Matcher

    func identityHeaders(for peer: VerifiedPeer) -> Result<[(String, String)], ForwardedIdentity.Unrepresentable> {
        guard forwardXFCC || forwardRFC9440 else { return .success([]) }
        if let cached = identityHeaderCache.withLock({ $0[peer.fingerprint] }) { return cached }
        let computed = Result {
            try ForwardedIdentity.headers(for: peer, by: credentials.identity, xfcc: forwardXFCC, rfc9440: forwardRFC9440)
        }.mapError { $0 as? ForwardedIdentity.Unrepresentable ?? .init(field: "Cert") }
        identityHeaderCache.withLock {
            if $0.count >= Self.identityHeaderLimit { $0.removeAll(keepingCapacity: true) }
            $0[peer.fingerprint] = computed
        }
        return computed
    }

    /// Parses a presented chain, reusing intermediates seen before.
    func parse(presentedDER: [[UInt8]]) throws -> [AnyCertificate] {
        var result: [AnyCertificate] = []
        result.reserveCapacity(presentedDER.count)
        for (index, der) in presentedDER.enumerated() {
            if index == 0 {
                result.append(try AnyCertificate(derEncoded: der))
                continue
            }
            if let cached = parsedIntermediates.withLock({ $0[der] }) {
                result.append(cached)
                continue
            }
            let certificate = try AnyCertificate(derEncoded: der)
            parsedIntermediates.withLock { cache in
                if cache.count >= Self.parsedIntermediateLimit { cache.removeAll(keepingCapacity: true) }
                cache[der] = certificate
            }
            result.append(certificate)
        }
        return result
    }

    /// The key exchange groups offered, hybrid post-quantum first.
    public static let groups: [NIOTLSCurve] = [.x25519_MLKEM768, .x25519, .secp256r1, .secp384r1]

    /// Signature algorithms accepted in a client's CertificateVerify and used in our own handshake signatures.
    public static let signatureAlgorithms = TLSSignatureAlgorithms.all

    /// TLS 1.2 suites: ECDHE key exchange with AEAD only (no static RSA, no CBC, no SHA-1 MACs). TLS 1.3 suites are all
    /// AEAD and not configurable in BoringSSL.
    public static let tls12CipherSuites = [
        "ECDHE-ECDSA-AES128-GCM-SHA256", "ECDHE-RSA-AES128-GCM-SHA256", "ECDHE-ECDSA-AES256-GCM-SHA384",
        "ECDHE-RSA-AES256-GCM-SHA384", "ECDHE-ECDSA-CHACHA20-POLY1305", "ECDHE-RSA-CHACHA20-POLY1305",
    ].joined(separator: ":")

    public init(name: String, configuration: ProxyConfiguration.Listener, policy: RoutePolicy) throws {
        self.name = name
        self.configuration = configuration
        self.policy = policy
        self.upstream = try UpstreamAddress(parsing: configuration.upstream, what: "\(name).upstream")
        self.credentials = try LoadedCredentials.load(cert: configuration.cert, key: configuration.key)
        self.clientRoots = try LoadedCredentials.readAnyCertificates(configuration.clientCA, what: "client-CA bundle")
        self.classicalClientRoots = clientRoots.compactMap(\.classical)
        self.genericClientRoots = try clientRoots.map { try $0.generic }
        self.requireCertificate = (configuration.clientCertificate ?? .require) == .require
        self.maxDepth = configuration.maxDepth ?? 3
        let forward = configuration.forward ?? ["xfcc", "rfc9440"]
        self.forwardXFCC = forward.contains("xfcc")
        self.forwardRFC9440 = forward.contains("rfc9440")
        self.forwardIdentity = forward.contains("identity")
        self.stamps = FileStamp.stamps([configuration.cert, configuration.key, configuration.clientCA])
        self.limits = configuration.limits
        self.stripMatcher = HeaderNames.Matcher(patterns: configuration.stripHeaders ?? ForwardedIdentity.defaultStrippedHeaders)

        var tls = TLSConfiguration.makeServerConfiguration(
            certificateChain: credentials.nioChain.map { .certificate($0) }, privateKey: .privateKey(credentials.nioKey)
        )
        tls.minimumTLSVersion = .tlsv12
        tls.curves = Self.groups
        tls.cipherSuites = Self.tls12CipherSuites
        tls.verifySignatureAlgorithms = Self.signatureAlgorithms
        tls.signingSignatureAlgorithms = Self.signatureAlgorithms
        // The custom verification callback replaces BoringSSL's chain checks; the mode still decides whether a
        // certificate is requested and whether its absence fails the handshake.
        tls.certificateVerification = requireCertificate ? .noHostnameVerification : .optionalVerification
        tls.trustRoots = .certificates(try clientRoots.map { try NIOSSLCertificate(bytes: try $0.der, format: .der) })
        tls.sendCANameList = true
        tls.applicationProtocols = configuration.mode == .tcp ? [] : configuration.http2 == false ? ["http/1.1"] : ["h2", "http/1.1"]
        do {
            self.sslContext = try NIOSSLContext(configuration: tls)
            var hybrid = tls
            hybrid.curves = [.x25519_MLKEM768]
            self.hybridOnlyContext = try NIOSSLContext(configuration: hybrid)
        } catch {
            throw ProxyError("\(name): cannot build the TLS context: \(error)")
        }
    }

    /// Rebuilds this state if any of its files changed (or `force`); nil when nothing changed.
    func reloaded(configuration: ProxyConfiguration.Listener? = nil, policy: RoutePolicy? = nil, force: Bool) throws -> InboundState? {
        let config = configuration ?? self.configuration
        let changedFiles = FileStamp.stamps([config.cert, config.key, config.clientCA]) != stamps
        guard force || changedFiles || config != self.configuration else { return nil }
        return try InboundState(name: name, configuration: config, policy: policy ?? self.policy)
    }

    /// Verifies a presented client chain (leaf first): validity, clientAuth EKU, a path to a root in the bundle
    /// within max depth, revocation. The reason strings are what logs and metrics show.
    func verify(presented: [Certificate], revocation: RevocationState, now: Date = Date()) async -> Result<VerifiedPeer, VerificationFailure> {
        await verify(presented: presented.map { AnyCertificate.classical($0) }, revocation: revocation, now: now)
    }

    /// The same checks for a chain of either family: a classical chain goes to swift-certificates' verifier, one with
    /// an ML-DSA certificate to Mutual's ML-DSA verifier (same rules, same refusal codes).
    func verify(presented: [AnyCertificate], revocation: RevocationState, now: Date = Date()) async -> Result<VerifiedPeer, VerificationFailure> {
        guard let leaf = presented.first else {
            return .failure(.init(.noCertificate, "no client certificate presented"))
        }
        // Refused before any path building: a chain longer than the leaf, max-depth intermediates and a root.
        if presented.count > maxDepth + 2 {
            return .failure(.init(.chainTooComplex, "the client sent \(presented.count) certificates; with max-depth \(maxDepth) at most \(maxDepth + 2) are considered (leaf, intermediates, root)"))
        }
        if now > leaf.notValidAfter {
            return .failure(.init(.expired, "client certificate expired \(leaf.notValidAfter.relativeDescription(from: now)) (notAfter \(leaf.notValidAfter), serial \(leaf.serialHex))"))
        }
        if now < leaf.notValidBefore {
            return .failure(.init(.notYetValid, "client certificate is not valid until \(leaf.notValidBefore) (\(leaf.notValidBefore.relativeDescription(from: now)))"))
        }
        let eku = try? leaf.extensions.extendedKeyUsage
        if eku == nil || !(eku!.contains(.clientAuth) || eku!.contains(.any)) {
            return .failure(.init(.eku, "client certificate (serial \(leaf.serialHex)) lacks the clientAuth extended key usage"))
        }
        let outcome: Result<[AnyCertificate], VerificationFailure>
        if case .classical(let classicalLeaf) = leaf, let intermediates = Self.allClassical(presented.dropFirst()) {
            let verifier = ChainVerifier(options: .init(
                roots: classicalClientRoots, intermediates: intermediates, validationTime: now,
                requiredEKU: .clientAuth, maxDepth: maxDepth
            ))
            switch await verifier.verify(classicalLeaf) {
            case .rejected(let reason, let code):
                outcome = .failure(.init(HandshakeFailure(code), "client certificate rejected: \(reason)"))
            case .accepted(let chain): outcome = .success(chain.map { .classical($0) })
            }
        } else {
            outcome = Self.verifyMLDSA(presented, roots: genericClientRoots, now: now, eku: .clientAuth, maxDepth: maxDepth, who: "client")
        }
        switch outcome {
        case .failure(let failure):
            return .failure(failure)
        case .success(let chain):
            if let (kind, reason) = revocation.check(chain: chain, now: now) {
                return .failure(.init(kind, reason))
            }
            do {
                let identity = try VerifiedPeer(validatedChain: chain)
                verifiedIdentities.withLock { cache in
                    if cache.count >= Self.verifiedIdentityLimit { cache.removeAll(keepingCapacity: true) }
                    cache[identity.fingerprint] = identity
                }
                return .success(identity)
            } catch {
                return .failure(.init(.malformed, "client certificate: \(error)"))
            }
        }
    }

    static func allClassical(_ certificates: ArraySlice<AnyCertificate>) -> [Certificate]? {
        var result: [Certificate] = []
        for c in certificates {
            guard case .classical(let classical) = c else { return nil }
            result.append(classical)
        }
        return result
    }

    /// A chain holding ML-DSA certificates, checked by ``MLDSAChainVerifier`` against every root of the bundle;
    /// the accepted chain keeps the presented certificates' own form.
    static func verifyMLDSA(
        _ presented: [AnyCertificate], roots: [MLDSACertificate], now: Date, eku: ExtendedKeyUsage.Usage, maxDepth: Int, who: String
    ) -> Result<[AnyCertificate], VerificationFailure> {
        let generic: [MLDSACertificate]
        do {
            generic = try presented.map { try $0.generic }
        } catch {
            return .failure(.init(.malformed, "\(who) certificate could not be parsed: \(error)"))
        }
        let verifier = MLDSAChainVerifier(options: .init(
            roots: roots, intermediates: Array(generic.dropFirst()), validationTime: now, requiredEKU: eku, maxDepth: maxDepth
        ))
        switch verifier.verify(generic[0]) {
        case .rejected(let reason, let code):
            return .failure(.init(HandshakeFailure(code), "\(who) certificate rejected: \(reason)"))
        case .accepted(let chain):
            return .success(chain.map { c in presented.first(where: { (try? $0.der) == c.der }) ?? ((try? AnyCertificate(derEncoded: c.der)) ?? .mldsa(c)) })
        }
    }

    /// The key of a presented chain: SHA-256 over every certificate's DER, each preceded by its length.
    static func chainKey(_ presentedDER: [[UInt8]]) -> [UInt8] {
        var hasher = SHA256()
        for der in presentedDER {
            withUnsafeBytes(of: UInt32(der.count).bigEndian) { hasher.update(bufferPointer: $0) }
            hasher.update(data: der)
        }
        return Array(hasher.finalize())
    }

    /// A chain verified before, still inside its validity window: its identity if unrevoked, the revocation
    /// failure if revoked since; nil when it was not verified here or its time checks need the full verification
    /// (which names the exact reason).
    func cachedVerification(chainKey: [UInt8], revocation: RevocationState, now: Date = Date()) -> Result<VerifiedPeer, VerificationFailure>? {
        guard let peer = verifiedChains.withLock({ $0[chainKey] }), now >= peer.validFrom, now <= peer.validUntil else { return nil }
        if let (kind, reason) = revocation.check(chain: peer.chain, now: now) { return .failure(.init(kind, reason)) }
        return .success(peer)
    }

    /// Remembers a chain the full verification accepted.
    func rememberVerified(chainKey: [UInt8], peer: VerifiedPeer) {
        verifiedChains.withLock { cache in
            if cache.count >= Self.verifiedIdentityLimit { cache.removeAll(keepingCapacity: true) }
            cache[chainKey] = peer
        }
    }

    /// The identity of a resumed session: found among those this context verified, and still valid and unrevoked.
    func resumedIdentity(leafDER: [UInt8], revocation: RevocationState, now: Date = Date()) -> Result<VerifiedPeer, VerificationFailure> {
        let fingerprint = SHA256Hex.of(leafDER)
        guard let identity = verifiedIdentities.withLock({ $0[fingerprint] }) else {
            return .failure(.init(.invalidChain, "resumed TLS session carries a certificate this proxy did not verify; refusing it"))
        }
        if now > identity.leaf.notValidAfter {
            return .failure(.init(.expired, "client certificate expired \(identity.leaf.notValidAfter.relativeDescription(from: now)) (notAfter \(identity.leaf.notValidAfter)); resumed session refused"))
        }
        if let (kind, reason) = revocation.check(chain: identity.chain, now: now) {
            return .failure(.init(kind, reason + "; resumed session refused"))
        }
        return .success(identity)
    }
}

public struct VerificationFailure: Error, Sendable {
    public var kind: HandshakeFailure
    public var reason: String
    init(_ kind: HandshakeFailure, _ reason: String) {
        self.kind = kind
        self.reason = reason
    }
}

/// The live state of a listener; swapped atomically by reloads.
public final class InboundSlot: Sendable {
    private let state: Mutex<InboundState>
    /// The listener's open connections; it outlives reloads of the state.
    let limiter = ConnectionLimiter()
    public init(_ state: InboundState) { self.state = Mutex(state) }
    public var current: InboundState { state.withLock { $0 } }
    func replace(_ new: InboundState) { state.withLock { $0 = new } }
}

/// What one TLS connection learned during its handshake; written by the verification task, read on the event loop.
final class ConnectionIdentity: Sendable {
    private struct State {
        var identity: VerifiedPeer?
        var failure: VerificationFailure?
        /// True once our verification callback ran (false after a resumed handshake).
        var verified = false
        /// Whether the hybrid-only context (X25519MLKEM768) took the handshake.
        var hybrid = false
        /// The running chain verification while it runs: cancelled if the connection closes first, and released as
        /// soon as it ends (a finished task kept alive holds its allocator's memory, about 40 KiB per connection).
        var task: Task<Void, Never>?
    }

    private let state = Mutex(State())
    var identity: VerifiedPeer? { state.withLock { $0.identity } }
    var failure: VerificationFailure? { state.withLock { $0.failure } }
    var verified: Bool { state.withLock { $0.verified } }
    var hybrid: Bool {
        get { state.withLock { $0.hybrid } }
        set { state.withLock { $0.hybrid = newValue } }
    }

    func set(_ result: Result<VerifiedPeer, VerificationFailure>) {
        state.withLock {
            switch result {
            case .success(let identity): $0.identity = identity
            case .failure(let failure): $0.failure = failure
            }
            $0.verified = true
            $0.task = nil
        }
    }

    func setResumed(_ identity: VerifiedPeer) { state.withLock { $0.identity = identity } }

    /// Keeps `task` for cancellation unless the verification already ended (the task may finish before this runs).
    func track(_ task: Task<Void, Never>) {
        state.withLock { if !$0.verified { $0.task = task } }
    }

    func cancelVerification() {
        let task = state.withLock { state -> Task<Void, Never>? in
            defer { state.task = nil }
            return state.task
        }
        task?.cancel()
    }

    /// Whether a verification task is being held (tests check that none outlives its verification).
    var holdsVerificationTask: Bool { state.withLock { $0.task != nil } }
}

/// Open connections by certificate serial, so a revocation closes the ones it concerns.
public final class ConnectionRegistry: Sendable {
    private struct Entry: Sendable {
        var channel: any Channel
        var chain: [AnyCertificate]
    }
    private let entries = Mutex<[ObjectIdentifier: Entry]>([:])

    public init() {}

    /// Registers an established connection; it is closed when its chain's earliest notAfter passes (`onExpiry`
    /// runs first), so an open connection never outlives its certificate, in tcp mode as in http mode.
    func register(_ channel: any Channel, identity: VerifiedPeer, now: Date = Date(), onExpiry: (@Sendable () -> Void)? = nil) {
        entries.withLock { $0[ObjectIdentifier(channel)] = Entry(channel: channel, chain: identity.chain) }
        let remaining = max(0, identity.validUntil.timeIntervalSince(now))
        let expiry = channel.eventLoop.scheduleTask(in: .nanoseconds(Int64(min(remaining, 400 * 86_400) * 1e9))) {
            onExpiry?()
            channel.close(promise: nil)
        }
        channel.closeFuture.whenComplete { [weak self] _ in
            expiry.cancel()
            self?.entries.withLock { _ = $0.removeValue(forKey: ObjectIdentifier(channel)) }
        }
    }

    public var count: Int { entries.withLock { $0.count } }

    /// Closes every registered connection whose chain is now revoked; returns how many, with their reasons.
    func closeRevoked(_ revocation: RevocationState) -> [(String, String)] {
        let all = entries.withLock { Array($0.values) }
        var closed: [(String, String)] = []
        for entry in all {
            if let (kind, reason) = revocation.check(chain: entry.chain), kind == .revoked {
                closed.append((entry.chain[0].serialHex, reason))
                entry.channel.close(promise: nil)
            }
        }
        return closed
    }
}

enum SHA256Hex {
    static func of(_ bytes: [UInt8]) -> String {
        Crypto.SHA256.hash(data: bytes).hexString
    }
}
