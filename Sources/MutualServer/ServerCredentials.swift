import Foundation
import Logging
import MutualAuthority
import MutualClient
import MutualPKI
import NIOCore
import NIOSSL
import ServiceLifecycle
import Synchronization
import X509

/// The authority's own TLS server certificate: issued from its intermediate at start-up, renewed at two thirds of
/// its lifetime, and swapped in for new handshakes through NIOSSL's context callback (established connections keep
/// theirs).
final class ServerCredentials: Sendable {
    struct Current: Sendable {
        var chain: [NIOSSLCertificate]
        var key: NIOSSLPrivateKey
        var notBefore: Date
        var notAfter: Date
    }

    private let current: Mutex<Current>
    let authority: Authority
    let names: (dns: [String], ips: [String])
    let lifetime: ValidityDuration

    init(authority: Authority, dnsNames: [String], ipAddresses: [String], lifetime: ValidityDuration) async throws {
        self.authority = authority
        self.names = (dnsNames, ipAddresses)
        self.lifetime = lifetime
        self.current = Mutex(try await Self.issue(authority: authority, dns: dnsNames, ips: ipAddresses, lifetime: lifetime))
    }

    static func issue(authority: Authority, dns: [String], ips: [String], lifetime: ValidityDuration) async throws -> Current {
        let key = try KeyType.p256.generate()
        var request = IssuanceRequest(profile: .server, publicKey: key.publicKey, dnsNames: dns, ipAddresses: ips, validity: lifetime)
        // Back-dated a day (bounded by the intermediate's own notBefore), as public CAs back-date: a client whose
        // clock is hours behind can still verify the authority and learn its time from it.
        request.backdate = Self.backdate
        let issued = try await authority.issue(
            request,
            owner: "mutual serve", requester: "mutual-serve", maximumValidityOverride: max(lifetime, authority.ca.policy.maximumValidity)
        )
        let chain = try issued.chain.map { try NIOSSLCertificate(bytes: try $0.derBytes, format: .der) }
        let keyPEM = try KeyFile.pem(for: key, passphrase: nil)
        return Current(
            chain: chain, key: try NIOSSLPrivateKey(bytes: Array(keyPEM.utf8), format: .pem),
            notBefore: issued.certificate.notValidBefore, notAfter: issued.certificate.notValidAfter
        )
    }

    var snapshot: Current { current.withLock { $0 } }

    /// The TLS configuration: TLS 1.2+, client certificates optional but verified against the CA's root when sent.
    func tlsConfiguration() throws -> TLSConfiguration {
        let now = snapshot
        var configuration = TLSConfiguration.makeServerConfiguration(
            certificateChain: now.chain.map { .certificate($0) }, privateKey: .privateKey(now.key)
        )
        configuration.minimumTLSVersion = .tlsv12
        configuration.certificateVerification = .optionalVerification
        // The ML-DSA root too, when there is one: an agent whose identity moved to ML-DSA renews over mTLS with it.
        var roots = try authority.trustedRoots.map { try NIOSSLCertificate(bytes: try $0.derBytes, format: .der) }
        if let pq = authority.pqCA { roots.append(try NIOSSLCertificate(bytes: pq.root.der, format: .der)) }
        configuration.trustRoots = .certificates(roots)
        configuration.verifySignatureAlgorithms = TLSSignatureAlgorithms.all
        configuration.signingSignatureAlgorithms = TLSSignatureAlgorithms.all
        configuration.sslContextCallback = { [self] _, promise in
            let fresh = self.snapshot
            var override = NIOSSLContextConfigurationOverride()
            override.certificateChain = fresh.chain.map { .certificate($0) }
            override.privateKey = .privateKey(fresh.key)
            promise.succeed(override)
        }
        return configuration
    }

    static let backdate = ValidityDuration.hours(24)

    /// Client certificates are verified here rather than by BoringSSL's fixed trust store, so that the roots a CA
    /// rotation adds (and later retires) take effect in a running server: the chain must lead to a root the authority
    /// trusts now (or to the ML-DSA root), be valid now, and allow client authentication.
    func verifyClient(_ certificates: [NIOSSLCertificate]) async -> NIOSSLVerificationResult {
        guard !certificates.isEmpty, let ders = try? certificates.map({ try $0.toDERBytes() }),
              let leaf = try? AnyCertificate(derEncoded: ders[0])
        else { return .failed }
        let now = Date()
        switch leaf {
        case .classical(let certificate):
            let intermediates = ders.dropFirst().compactMap { try? Certificate(derEncoded: $0) }
            let outcome = await ChainVerifier(
                options: .init(roots: authority.trustedRoots, intermediates: intermediates, validationTime: now, requiredEKU: .clientAuth)
            ).verify(certificate)
            if case .accepted = outcome { return .certificateVerified }
            return .failed
        case .mldsa(let certificate):
            guard let pq = authority.pqCA else { return .failed }
            let intermediates = ders.dropFirst().compactMap { try? MLDSACertificate(derEncoded: $0) }
            let outcome = MLDSAChainVerifier(
                options: .init(roots: [pq.root], intermediates: intermediates, validationTime: now, requiredEKU: .clientAuth)
            ).verify(certificate)
            if case .accepted = outcome { return .certificateVerified }
            return .failed
        }
    }

    /// A new server certificate now (after a rotation's activation: from the CA that issues now).
    func reissue(logger: Logger) async {
        do {
            let fresh = try await Self.issue(authority: authority, dns: names.dns, ips: names.ips, lifetime: lifetime)
            current.withLock { $0 = fresh }
            logger.notice("server certificate re-issued from the active CA", metadata: ["not_after": "\(fresh.notAfter)"])
        } catch {
            logger.error("server certificate re-issue failed; keeping the current one", metadata: ["error": "\(error)"])
        }
    }

    /// Renews the certificate when two thirds of its lifetime have passed (counted from issuance, not from the
    /// back-dated notBefore).
    func renewIfDue(now: Date = .now, logger: Logger) async {
        let snapshot = self.snapshot
        let issuedAt = snapshot.notAfter.addingTimeInterval(-lifetime.timeInterval)
        let renewAt = issuedAt.addingTimeInterval(lifetime.timeInterval * 2 / 3)
        guard now >= renewAt else { return }
        do {
            let fresh = try await Self.issue(authority: authority, dns: names.dns, ips: names.ips, lifetime: lifetime)
            current.withLock { $0 = fresh }
            logger.info("server certificate renewed", metadata: ["not_after": "\(fresh.notAfter)"])
        } catch {
            logger.error("server certificate renewal failed; keeping the current one", metadata: ["error": "\(error)"])
        }
    }
}

/// Checks the server certificate once a minute and renews it when due.
struct ServerCertificateRenewal: Service {
    let credentials: ServerCredentials
    let logger: Logger
    /// Called after the CAs were reloaded (a rotation stage in this or another process).
    var onRotation: @Sendable () async -> Void = {}

    /// Renews the server certificate when due, and every second looks whether a CA rotation stage happened
    /// (`mutual ca rotate` bumps a value in the shared database): then the CAs are read again, and after an
    /// activation the server certificate is re-issued from the new CA.
    func run() async throws {
        var epoch = try? await credentials.authority.store.metadata(Authority.rotationEpochKey)
        // Also the rotation file itself: a replica whose ca/ directory was copied from the host that ran the stage
        // reloads when the copy lands, not only when the database says a stage happened.
        let rotationFile = credentials.authority.state.caDirectory + "/rotation.json"
        func stamp() -> Date? { (try? FileManager.default.attributesOfItem(atPath: rotationFile))?[.modificationDate] as? Date }
        var fileStamp = stamp()
        var ticks = 0
        while !Task.isShuttingDownGracefully && !Task.isCancelled {
            do {
                try await cancelWhenGracefulShutdown { try await Task.sleep(for: .seconds(1)) }
            } catch {
                return
            }
            ticks += 1
            let currentEpoch = try? await credentials.authority.store.metadata(Authority.rotationEpochKey)
            let currentStamp = stamp()
            if (currentEpoch != nil && currentEpoch != epoch) || currentStamp != fileStamp {
                let now = currentEpoch
                let issuerBefore = credentials.authority.ca.certificate.subject
                do {
                    try credentials.authority.reloadCAs()
                    epoch = now
                    fileStamp = currentStamp
                    logger.notice("CA rotation: reloaded the CAs", metadata: ["issuing_ca": "\(credentials.authority.ca.certificate.subject)"])
                    if credentials.authority.ca.certificate.subject != issuerBefore { await credentials.reissue(logger: logger) }
                    await onRotation()
                } catch {
                    logger.error("CA rotation: reloading the CAs failed; still serving the ones loaded before", metadata: ["error": "\(error)"])
                }
            }
            if ticks % 60 == 0 { await credentials.renewIfDue(logger: logger) }
        }
    }
}
