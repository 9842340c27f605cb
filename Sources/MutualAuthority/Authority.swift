import Crypto
import Foundation
import Logging
import MutualPKCS11
import MutualPKI
import MutualStore
import Synchronization
import SwiftASN1
import X509

/// The CA's business rules on top of the PKI core and the store: who gets which certificate, revocation, audit.
///
/// Every issuance is committed to the inventory together with its audit event *before* the certificate is returned;
/// a failure at any step returns an error and leaves no certificate behind.
public final class Authority: Sendable {
    public let state: StateDirectory
    public let configuration: AuthorityConfiguration
    /// The active issuing CA, its subject as recorded, and the CAs a rotation keeps beside it.
    struct ActiveCA: Sendable {
        var ca: IssuingCA
        var issuer: String
        var rotation: CARotation.Loaded
    }
    let caBox: Mutex<ActiveCA>
    /// The issuing CA with its current policy (CRL/OCSP URLs can change while serving).
    public var ca: IssuingCA { caBox.withLock { $0.ca } }
    var active: ActiveCA { caBox.withLock { $0 } }
    /// The issuing CA's subject as stored in every record it issues (computed once per CA).
    var issuerDescription: String { caBox.withLock { $0.issuer } }
    public let store: Store
    let logger: Logger
    let pqBox: Mutex<MLDSAIssuingCA?>
    /// The ML-DSA issuing CA, when the state directory holds the post-quantum hierarchy (`mutual pq init`).
    public var pqCA: MLDSAIssuingCA? { pqBox.withLock { $0 } }
    /// Proofs of possession already used (kept for as long as they could still be accepted).
    let proofs = ProofLedger()
    /// CA keys held in PKCS#11 tokens (probed by `/readyz`).
    let tokenKeysBox: Mutex<[PKCS11Key]>
    var tokenKeys: [PKCS11Key] { tokenKeysBox.withLock { $0 } }
    /// The passphrase of the CA's key files, when they are encrypted and it was given at open (a rotation's reload
    /// reads the new generation's key with it).
    let passphrase: String?

    init(
        state: StateDirectory, configuration: AuthorityConfiguration, ca: IssuingCA, store: Store, logger: Logger,
        pqCA: MLDSAIssuingCA? = nil, tokenKeys: [PKCS11Key] = [], rotation: CARotation.Loaded = .init(), passphrase: String? = nil
    ) {
        self.tokenKeysBox = Mutex(tokenKeys)
        self.passphrase = passphrase
        self.pqBox = Mutex(pqCA)
        self.state = state
        self.configuration = configuration
        var ca = ca
        ca.crossCertificates = rotation.crossCertificates
        self.caBox = Mutex(ActiveCA(ca: ca, issuer: ca.certificate.subject.description, rotation: rotation))
        self.store = store
        self.logger = logger
    }

    /// What `initialize` made.
    public struct InitResult: Sendable {
        public var root: Certificate
        public var intermediate: Certificate
        public var rootFingerprint: String
    }

    /// Creates a new CA in an empty (or missing) state directory: root, intermediate, admin client certificate,
    /// database, config. Refuses to touch a directory that already holds a CA.
    public static func initialize(
        state: StateDirectory, name: String, keyType: KeyType, constraints: CAFactory.Constraints,
        passphrase: String?, policy: IssuancePolicy = IssuancePolicy(), actor: String, now: Date = .now,
        databaseURL: String? = nil, keyStore: PKCS11URI? = nil, rootKeyStore: PKCS11URI? = nil,
        logger: Logger = Logger(label: "mutual.authority")
    ) async throws -> InitResult {
        let fm = FileManager.default
        if state.isInitialized || fm.fileExists(atPath: state.databasePath) || fm.fileExists(atPath: state.rootKeyPath) {
            throw AuthorityError(.alreadyInitialized, "\(state.path) already holds a Mutual CA; refusing to overwrite it")
        }
        var policy = policy
        policy.permittedURIPrefixes = constraints.permittedURIPrefixes
        // Keys in a PKCS#11 token: found there, or generated there (sensitive, never extractable).
        var tokenKeys: (root: PKCS11Key, intermediate: PKCS11Key)?
        if let keyStore {
            let rootURI = rootKeyStore ?? keyStore.naming(object: (keyStore.object ?? "mutual") + "-root")
            tokenKeys = (try Self.tokenKey(rootURI, keyType: keyType), try Self.tokenKey(keyStore, keyType: keyType))
        }
        let hierarchy = try CAFactory.makeHierarchy(
            name: name, keyType: keyType, constraints: constraints, rootKey: tokenKeys?.root.certificatePrivateKey,
            intermediateKey: tokenKeys?.intermediate.certificatePrivateKey, now: now
        )
        var created: [String] = []
        do {
            for dir in [state.path, state.caDirectory, state.adminDirectory] where !fm.fileExists(atPath: dir) {
                try fm.createDirectory(atPath: dir, withIntermediateDirectories: true, attributes: [.posixPermissions: 0o700])
                created.append(dir)
            }
            if tokenKeys == nil {
                try AtomicFile.write(KeyFile.pem(for: hierarchy.rootKey, passphrase: passphrase), to: state.rootKeyPath, mode: 0o600)
                created.append(state.rootKeyPath)
                try AtomicFile.write(
                    KeyFile.pem(for: hierarchy.intermediateKey, passphrase: passphrase), to: state.intermediateKeyPath, mode: 0o600
                )
                created.append(state.intermediateKeyPath)
            }
            try AtomicFile.write(PEMBundle.pem([hierarchy.root]), to: state.rootCertificatePath)
            created.append(state.rootCertificatePath)
            try AtomicFile.write(PEMBundle.pem([hierarchy.intermediate]), to: state.intermediateCertificatePath)
            created.append(state.intermediateCertificatePath)
            try AtomicFile.write(
                try Self.rootCRLPEM(root: hierarchy.root, rootKey: hierarchy.rootKey, number: 1, now: now), to: state.rootCRLPath
            )
            created.append(state.rootCRLPath)

            let store = try await Store.open(databaseURL: databaseURL, sqlitePath: state.databasePath, logger: logger)
            if databaseURL == nil { created.append(state.databasePath) }
            do {
                if databaseURL != nil, try await !store.auditEvents(limit: 1).isEmpty {
                    throw AuthorityError(.alreadyInitialized, "the database already holds a Mutual CA; refusing to mix a second one into it")
                }
                var configuration = AuthorityConfiguration(
                    name: name, keyType: keyType, policy: policy, permittedDNS: constraints.permittedDNS, createdAt: now,
                    keysEncrypted: passphrase != nil
                )
                configuration.databaseURL = databaseURL
                if let tokenKeys {
                    configuration.keyStore = tokenKeys.intermediate.uri.description
                    configuration.rootKeyStore = tokenKeys.root.uri.description
                    configuration.keysEncrypted = false
                }
                let ca = try IssuingCA(
                    certificate: hierarchy.intermediate, privateKey: hierarchy.intermediateKey, root: hierarchy.root,
                    policy: policy
                )
                let authority = Authority(state: state, configuration: configuration, ca: ca, store: store, logger: logger)
                let fingerprint = try Self.fingerprint(hierarchy.root)
                try await store.appendAudit(
                    AuditEntry(
                        time: now, actor: actor, action: "init", subject: hierarchy.intermediate.subject.description,
                        details: [
                            "name": name, "key_type": keyType.rawValue, "root_fingerprint": fingerprint,
                            "permitted_dns": constraints.permittedDNS.joined(separator: ","),
                            "permitted_uri": constraints.permittedURIPrefixes.joined(separator: ","),
                            "key_store": tokenKeys.map { $0.intermediate.uri.description } ?? "file",
                            "root_key_store": tokenKeys.map { $0.root.uri.description } ?? "file",
                        ]
                    )
                )
                try await authority.record(hierarchy.root, profile: .root, owner: "mutual", requester: actor, now: now)
                try await authority.record(hierarchy.intermediate, profile: .intermediate, owner: "mutual", requester: actor, now: now)
                // The operator's client certificate for the admin API (mTLS).
                let adminKey = try keyType.generate()
                let admin = try await authority.issue(
                    IssuanceRequest(profile: .admin, publicKey: adminKey.publicKey, commonName: "mutual admin", validity: nil),
                    owner: "operator", requester: actor, now: now, maximumValidityOverride: .days(365)
                )
                try AtomicFile.write(KeyFile.pem(for: adminKey, passphrase: nil), to: state.adminDirectory + "/key.pem", mode: 0o600)
                try AtomicFile.write(PEMBundle.pem([admin.certificate]), to: state.adminDirectory + "/cert.pem")
                try AtomicFile.write(PEMBundle.pem([admin.certificate, hierarchy.intermediate]), to: state.adminDirectory + "/chain.pem")
                let encoder = JSONEncoder()
                encoder.outputFormatting = [.prettyPrinted, .sortedKeys]
                encoder.dateEncodingStrategy = .iso8601
                try AtomicFile.write(Array(try encoder.encode(configuration)), to: state.configPath, mode: 0o600)
                try await store.close()
                return InitResult(root: hierarchy.root, intermediate: hierarchy.intermediate, rootFingerprint: fingerprint)
            } catch {
                try? await store.close()
                throw error
            }
        } catch {
            for path in created.reversed() {
                try? fm.removeItem(atPath: path)
                if path == state.databasePath {
                    try? fm.removeItem(atPath: path + "-wal")
                    try? fm.removeItem(atPath: path + "-shm")
                }
            }
            throw error
        }
    }

    /// Opens an initialized state directory. `passphrase` is asked only if the issuing key is encrypted.
    public static func open(
        state: StateDirectory, passphrase: () throws -> String? = { nil }, databaseURL: String? = nil,
        logger: Logger = Logger(label: "mutual.authority")
    ) async throws -> Authority {
        guard state.isInitialized else {
            throw AuthorityError(.notInitialized, "no Mutual CA in \(state.path): run `mutual init --state-dir \(state.path)` first")
        }
        let configuration = try loadConfiguration(state)
        // Asked at most once: the classical and the ML-DSA keys share one passphrase.
        var answered: String??
        func passphraseOnce() throws -> String? {
            if let answered { return answered }
            let value = try passphrase()
            answered = .some(value)
            return value
        }
        let ca: IssuingCA
        var tokenKeys: [PKCS11Key] = []
        var rotation = CARotation.Loaded()
        if let rotationState = try CARotation.readState(state) {
            do {
                (ca, rotation) = try CARotation.load(
                    state: state, rotation: rotationState, policy: configuration.policy, passphrase: passphraseOnce, tokenKeys: &tokenKeys
                )
            } catch let error as PKIError {
                if error.code == .wrongPassphrase { throw error }
                throw AuthorityError(.corruptState, "the CA files in \(state.caDirectory) are unusable: \(error.reason)")
            }
        } else {
        do {
            let intermediate = try PEMBundle.certificates(
                fromBytes: try AtomicFile.read(state.intermediateCertificatePath, limit: 1 << 20, what: "issuing CA certificate"),
                what: state.intermediateCertificatePath
            )[0]
            let root = try PEMBundle.certificates(
                fromBytes: try AtomicFile.read(state.rootCertificatePath, limit: 1 << 20, what: "root certificate"),
                what: state.rootCertificatePath
            )[0]
            let key: Certificate.PrivateKey
            if let keyStore = configuration.keyStore {
                let tokenKey = try PKCS11Key.find(try PKCS11URI(keyStore))
                tokenKeys.append(tokenKey)
                key = tokenKey.certificatePrivateKey
            } else {
                let keyText = String(
                    decoding: try AtomicFile.read(state.intermediateKeyPath, limit: 1 << 20, what: "issuing CA key"), as: UTF8.self
                )
                key = try KeyFile.load(pem: keyText, passphrase: passphraseOnce)
            }
            ca = try IssuingCA(certificate: intermediate, privateKey: key, root: root, policy: configuration.policy)
            rotation = CARotation.Loaded(
                state: CARotation.State(
                    intermediates: [.init(generation: 1, stage: .active, keyStore: configuration.keyStore, root: 1, changedAt: configuration.createdAt)],
                    roots: [.init(generation: 1, stage: .active, keyStore: configuration.rootKeyStore, root: nil, changedAt: configuration.createdAt)]
                ),
                trustedRoots: [root], rootCRLPaths: [state.rootCRLPath]
            )
        } catch let error as PKIError {
            if error.code == .wrongPassphrase { throw error }
            throw AuthorityError(.corruptState, "the CA files in \(state.caDirectory) are unusable: \(error.reason)")
        }
        }
        var pqCA = try configuration.pqKeyType.map { _ in try Self.loadPQ(state: state, policy: configuration.policy, passphrase: passphraseOnce) }
        let store = try await Store.open(databaseURL: databaseURL ?? configuration.databaseURL, sqlitePath: state.databasePath, logger: logger)
        var configured = ca
        // Where relying parties fetch the CRL and ask OCSP: set by `mutual serve --http-public-url`, used by every
        // process that issues from this state directory.
        if let url = try? await store.metadata(Self.httpPublicURLKey) {
            configured.policy.crlURL = url + Self.crlPath(generation: rotation.state.active(.intermediate)?.generation ?? 1)
            configured.policy.ocspURL = url + "/ocsp"
            pqCA?.policy.crlURL = url + Self.pqCRLPath
            pqCA?.policy.ocspURL = url + "/ocsp"
        }
        return Authority(
            state: state, configuration: configuration, ca: configured, store: store, logger: logger, pqCA: pqCA, tokenKeys: tokenKeys,
            rotation: rotation, passphrase: answered ?? nil
        )
    }

    /// Where an issuing CA generation's CRL is published: `/crl` for the first (what certificates issued before any
    /// rotation carry), `/crl/gN` for later ones, so that every certificate's distribution point names its own issuer's
    /// CRL while two issuers coexist.
    public static func crlPath(generation: Int) -> String { generation <= 1 ? "/crl" : "/crl/g\(generation)" }

    /// The CA's settings (config.json).
    public static func loadConfiguration(_ state: StateDirectory) throws -> AuthorityConfiguration {
        do {
            let decoder = JSONDecoder()
            decoder.dateDecodingStrategy = .iso8601
            return try decoder.decode(
                AuthorityConfiguration.self, from: Data(try AtomicFile.read(state.configPath, limit: 1 << 20, what: "config"))
            )
        } catch {
            throw AuthorityError(.corruptState, "\(state.configPath) is unreadable or corrupt: \(error)")
        }
    }

    /// The key a URI names in a token, generated there when the token has none by that name.
    static func tokenKey(_ uri: PKCS11URI, keyType: KeyType) throws -> PKCS11Key {
        guard PKCS11Key.supportedTypes.contains(keyType) else {
            throw PKCS11Error(.unsupportedKey, "CA keys in a PKCS#11 token may be \(PKCS11Key.supportedTypes.map(\.rawValue).joined(separator: ", ")), not \(keyType.rawValue)")
        }
        return try PKCS11Key.findOrGenerate(uri, keyType: keyType)
    }

    /// Signs a probe with every token-held key this authority uses: nil when they all can, else the failure
    /// (`/readyz` turns red with its code while a token cannot sign).
    public func probeSigningKeys() -> PKCS11Error? {
        for key in tokenKeys {
            do {
                try key.probe()
            } catch let error as PKCS11Error {
                return error
            } catch {
                return PKCS11Error(.failed, "\(error)")
            }
        }
        return nil
    }

    /// How long a root CRL is valid: the root key may be offline, so it is re-signed rarely (`mutual root-crl`).
    public static let rootCRLValidity = ValidityDuration.days(365)

    /// An (empty) CRL signed by the root: Mutual's root revokes nothing; the CRL exists so that relying parties that
    /// check every level of a chain (nginx `ssl_crl`, OpenSSL `-crl_check_all`) can validate the intermediate.
    public static func rootCRLPEM(root: Certificate, rootKey: Certificate.PrivateKey, number: UInt64, now: Date) throws -> String {
        let der = try RevocationListBuilder(issuer: root, issuerKey: rootKey)
            .build(number: number, thisUpdate: now, nextUpdate: min(now.addingTimeInterval(rootCRLValidity.timeInterval), root.notValidAfter), entries: [])
        return RevocationListBuilder.pem(der)
    }

    /// Re-signs the root CRL with the next number (needs the root key, so run it where the key is).
    public static func refreshRootCRL(
        state: StateDirectory, passphrase: () throws -> String?, rootKeyStore: String? = nil, now: Date = .now
    ) throws -> (number: UInt64, nextUpdate: Date) {
        // After a CA rotation the active root and its key live in their generation directory (ca/rN).
        if let rotation = try CARotation.readState(state), let entry = rotation.active(.root) {
            let root = try CARotation.readCertificate(CARotation.certificatePath(state, .root, entry.generation))
            var ignored: [PKCS11Key] = []
            let key = try CARotation.loadKey(state, .root, entry, passphrase: passphrase, tokenKeys: &ignored)
            guard key.publicKey == root.publicKey else { throw PKIError(.inconsistentCA, "the root key does not match root r\(entry.generation)") }
            let path = CARotation.rootCRLPath(state, entry.generation)
            var number: UInt64 = 1
            if let bytes = try? AtomicFile.read(path, what: "root CRL"), let current = try? RevocationList(bytes: bytes), let n = current.crlNumber {
                number = n.reduce(0) { $0 << 8 | UInt64($1) } + 1
            }
            let pem = try rootCRLPEM(root: root, rootKey: key, number: number, now: now)
            try AtomicFile.write(pem, to: path)
            try AtomicFile.write(pem, to: state.rootCRLPath)
            return (number, min(now.addingTimeInterval(rootCRLValidity.timeInterval), root.notValidAfter))
        }
        let root = try PEMBundle.certificates(fromBytes: try AtomicFile.read(state.rootCertificatePath, what: "root certificate"))[0]
        let key: Certificate.PrivateKey
        if let rootKeyStore {
            key = try PKCS11Key.find(try PKCS11URI(rootKeyStore)).certificatePrivateKey
        } else {
            let keyText = String(decoding: try AtomicFile.read(state.rootKeyPath, what: "root key (take it out of offline storage first)"), as: UTF8.self)
            key = try KeyFile.load(pem: keyText, passphrase: passphrase)
        }
        guard key.publicKey == root.publicKey else { throw PKIError(.inconsistentCA, "the root key does not match ca/root.pem") }
        var number: UInt64 = 1
        if let bytes = try? AtomicFile.read(state.rootCRLPath, what: "root CRL"), let current = try? RevocationList(bytes: bytes),
           let n = current.crlNumber {
            number = n.reduce(0) { $0 << 8 | UInt64($1) } + 1
        }
        try AtomicFile.write(try rootCRLPEM(root: root, rootKey: key, number: number, now: now), to: state.rootCRLPath)
        return (number, min(now.addingTimeInterval(rootCRLValidity.timeInterval), root.notValidAfter))
    }

    /// Sets the plain-HTTP base URL placed in certificates issued from now on (CRL distribution point `URL/crl`, OCSP
    /// `URL/ocsp`), here and, through the database, in every other process using this state directory (the CLI issues
    /// the same extensions as the server). `explicit`: set by a person (`init`/`config`/`serve --http-public-url`), kept
    /// across restarts; otherwise derived from the listener by `serve`, and derived again at its next start.
    public func setHTTPPublicURL(_ url: String, explicit: Bool = true, actor: String, now: Date = .now) async throws {
        let trimmed = try Self.validatedHTTPPublicURL(url)
        let values = [Self.httpPublicURLKey: trimmed, Self.httpPublicURLExplicitKey: explicit ? "true" : "false"]
        let storedURL = try await store.metadata(Self.httpPublicURLKey)
        let storedExplicit = try await store.metadata(Self.httpPublicURLExplicitKey)
        if storedURL != trimmed || storedExplicit != values[Self.httpPublicURLExplicitKey] {
            try await store.setMetadata(
                values,
                audit: AuditEntry(time: now, actor: actor, action: "configure", subject: Self.httpPublicURLKey, details: ["value": trimmed, "explicit": "\(explicit)"])
            )
        }
        caBox.withLock {
            $0.ca.policy.crlURL = trimmed + Self.crlPath(generation: $0.rotation.state.active(.intermediate)?.generation ?? 1)
            $0.ca.policy.ocspURL = trimmed + "/ocsp"
        }
        pqBox.withLock {
            $0?.policy.crlURL = trimmed + Self.pqCRLPath
            $0?.policy.ocspURL = trimmed + "/ocsp"
        }
    }

    /// The recorded base URL for CRL and OCSP, and whether a person set it (nil: none yet).
    public func httpPublicURL() async throws -> (url: String, explicit: Bool)? {
        guard let url = try await store.metadata(Self.httpPublicURLKey) else { return nil }
        // Recorded before the flag existed: treat as set by a person, so it is not silently replaced.
        return (url, (try await store.metadata(Self.httpPublicURLExplicitKey)) != "false")
    }

    /// Checks a base URL for certificates: `http://HOST[:PORT][/PATH]` (RFC 5280 and RFC 6960 fetches are plain HTTP;
    /// HTTPS would need revocation checking to check revocation), never the unspecified address, which no client can
    /// reach. Returns it without a trailing slash.
    public static func validatedHTTPPublicURL(_ text: String) throws -> String {
        let trimmed = text.hasSuffix("/") ? String(text.dropLast()) : text
        guard let url = URL(string: trimmed), url.scheme == "http", let host = url.host, !host.isEmpty,
              url.query == nil, url.fragment == nil, url.user == nil, !trimmed.contains(where: { $0.isWhitespace })
        else {
            throw PKIError(.malformedInput, "invalid --http-public-url '\(text.prefix(100))': expected http://HOST[:PORT][/PATH] (CRL and OCSP are fetched over plain HTTP)")
        }
        if Self.isUnspecifiedHost(host) {
            throw PKIError(.malformedInput, "invalid --http-public-url '\(text.prefix(100))': \(host) is the unspecified address, which no client can reach; use the name or address other hosts use")
        }
        return trimmed
    }

    /// 0.0.0.0 or :: (listen on every address; never a destination).
    public static func isUnspecifiedHost(_ host: String) -> Bool {
        let bare = host.trimmingCharacters(in: CharacterSet(charactersIn: "[]"))
        return bare == "0.0.0.0" || bare == "::" || bare == "0:0:0:0:0:0:0:0"
    }

    /// localhost, 127.0.0.0/8 or ::1: reachable from this host only.
    public static func isLoopbackHost(_ host: String) -> Bool {
        let bare = host.trimmingCharacters(in: CharacterSet(charactersIn: "[]")).lowercased()
        return bare == "localhost" || bare.hasSuffix(".localhost") || bare == "::1" || bare.hasPrefix("127.")
    }

    /// Metadata key holding the plain-HTTP base URL placed in certificates (CRL distribution point, OCSP in AIA).
    public static let httpPublicURLKey = "http_public_url"
    /// Where `mutual serve` last served its dashboard, for the links `mutual dashboard login` prints.
    public static let dashboardURLKey = "dashboard_url"
    /// Metadata key: "true" when a person set the URL, "false" when `serve` derived it from its listener.
    public static let httpPublicURLExplicitKey = "http_public_url_explicit"

    public func close() async throws {
        try await store.close()
    }

    // MARK: Issuance

    /// A certificate that is in the inventory.
    public struct IssuedCertificate: Sendable {
        public var certificate: Certificate
        public var chain: [Certificate]
        public var record: CertificateRecord
    }

    /// Validates, signs, records (durably, with its audit event) and only then returns a certificate.
    public func issue(
        _ request: IssuanceRequest, owner: String?, requester: String, now: Date = .now,
        maximumValidityOverride: ValidityDuration? = nil
    ) async throws -> IssuedCertificate {
        var ca = self.ca
        if let maximumValidityOverride { ca.policy.maximumValidity = maximumValidityOverride }
        let certificate = try ca.issue(request, now: now)
        var details: [String: String] = ["profile": request.profile.rawValue, "not_after": AuditChain.format(certificate.notValidAfter)]
        if !request.droppedRequests.isEmpty { details["dropped"] = request.droppedRequests.joined(separator: "; ") }
        if let owner { details["owner"] = owner }
        let record = try await record(certificate, profile: request.profile, owner: owner, requester: requester, now: now, details: details)
        return IssuedCertificate(certificate: certificate, chain: [certificate] + ca.chain, record: record)
    }

    /// Issues from a CSR (PEM or DER bytes): signature verified, contents decided by the profile.
    public func sign(
        csr bytes: [UInt8], profile: CertificateProfile, validity: ValidityDuration?, owner: String?, requester: String,
        now: Date = .now
    ) async throws -> IssuedCertificate {
        let csr = try CSRDecoder.decode(bytes)
        let request = try IssuanceRequest(verifiedCSR: csr, profile: profile, validity: validity)
        return try await issue(request, owner: owner, requester: requester, now: now)
    }

    @discardableResult
    func record(
        _ certificate: Certificate, profile: CertificateProfile, owner: String?, requester: String, now: Date,
        details: [String: String] = [:]
    ) async throws -> CertificateRecord {
        let record = try Self.makeRecord(
            certificate, profile: profile, owner: owner, requester: requester,
            issuerDescription: certificate.issuer == ca.certificate.subject ? issuerDescription : nil
        )
        var details = details
        details["serial"] = record.serial
        details["identity"] = record.identity
        try await store.recordIssuance(
            record,
            audit: AuditEntry(time: now, actor: requester, action: "issue", subject: record.serial, details: details)
        )
        return record
    }

    static func makeRecord(_ certificate: Certificate, profile: CertificateProfile, owner: String?, requester: String,
                           issuerDescription: String? = nil) throws -> CertificateRecord
    {
        let der = try certificate.issuedDER
        let fingerprint = SHA256.hash(data: der).hexString
        let sans = Self.sanStrings(try certificate.extensions.subjectAlternativeNames ?? SubjectAlternativeNames())
        let identity = CertificateIdentity.of(certificate) ?? certificate.serialHex
        return CertificateRecord(
            serial: certificate.serialHex, issuer: issuerDescription ?? certificate.issuer.description,
            subject: certificate.subject.isEmpty ? "" : certificate.subject.description,
            subjectAlternativeNames: sans, identity: identity, profile: profile.rawValue, owner: owner, requester: requester,
            notBefore: certificate.notValidBefore, notAfter: certificate.notValidAfter, fingerprint: fingerprint,
            der: der
        )
    }

    /// SANs as the inventory keeps them: `dns:`, `ip:`, `uri:`, `email:`.
    static func sanStrings(_ names: SubjectAlternativeNames) -> [String] {
        names.compactMap { name in
            switch name {
            case .dnsName(let d): "dns:\(d)"
            case .ipAddress(let ip): "ip:\(Names.ipAddressString(Array(ip.bytes)))"
            case .uniformResourceIdentifier(let u): "uri:\(u)"
            case .rfc822Name(let e): "email:\(e)"
            default: nil
            }
        }
    }

    /// SHA-256 of the certificate's DER, lowercase hex (the form `mutual init` prints and agents pin).
    public static func fingerprint(_ certificate: Certificate) throws -> String {
        SHA256.hash(data: try certificate.derBytes).hexString
    }

    // MARK: Revocation

    /// Revokes a certificate: inventory and audit in one transaction. Unknown or already-revoked serials are refused.
    public func revoke(serial: String, reason: RevocationReason, actor: String, now: Date = .now) async throws -> CertificateRecord {
        let normalized = Self.normalizeSerial(serial)
        guard !normalized.isEmpty, normalized.count <= 42, normalized.allSatisfy(\.isHexDigit) else {
            throw AuthorityError(.notFound, "'\(serial.prefix(60))' is not a serial number (expected hex, as `mutual list` prints)")
        }
        do {
            return try await store.revoke(
                serial: normalized, reason: reason.rawValue, at: now,
                audit: AuditEntry(time: now, actor: actor, action: "revoke", subject: normalized, details: ["reason": reason.rawValue])
            )
        } catch let error as StoreError where error.code == .notFound {
            throw AuthorityError(.notFound, error.reason)
        } catch let error as StoreError where error.code == .conflict {
            throw AuthorityError(.conflict, error.reason)
        }
    }

    /// Lowercase hex without colons or spaces.
    public static func normalizeSerial(_ serial: String) -> String {
        serial.lowercased().filter { $0 != ":" && !$0.isWhitespace }
    }
}

/// Remembers proof-of-possession signatures until their timestamps fall out of the acceptance window, so each proof
/// issues at most one certificate. In memory: a replica that restarts, or another replica, may accept a replay within
/// five minutes, which yields a second certificate for the same CSR key — useless to anyone without that key.
final class ProofLedger: Sendable {
    private let seen = Mutex<[String: Date]>([:])

    /// True the first time `digest` is presented; false for a replay.
    func claim(_ digest: String, until expiry: Date, now: Date) -> Bool {
        seen.withLock { seen in
            if seen.count > 4096 { seen = seen.filter { $0.value > now } }
            if let until = seen[digest], until > now { return false }
            seen[digest] = expiry
            return true
        }
    }
}
