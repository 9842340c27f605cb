import Crypto
import Foundation
import MutualPKI
import MutualStore
import SwiftASN1
import X509

/// The post-quantum hierarchy: an ML-DSA root and issuing CA beside the classical ones, in the same state directory,
/// inventory and audit chain. A leaf's key type decides which hierarchy signs it.
extension Authority {
    /// Where the ML-DSA issuing CA's CRL is served (the classical one is `/crl`).
    public static let pqCRLPath = "/pq/crl"

    /// A certificate for an ML-DSA key, in the inventory.
    public struct IssuedMLDSACertificate: Sendable {
        public var certificate: MLDSACertificate
        /// Leaf, then the ML-DSA issuing CA.
        public var chain: [MLDSACertificate]
        public var record: CertificateRecord
    }

    static func loadPQ(state: StateDirectory, policy: IssuancePolicy, passphrase: () throws -> String?) throws -> MLDSAIssuingCA {
        do {
            let intermediate = try MLDSACertificate(pem: try AtomicFile.read(state.pqIntermediateCertificatePath, limit: 1 << 20, what: "ML-DSA issuing CA certificate"))
            let root = try MLDSACertificate(pem: try AtomicFile.read(state.pqRootCertificatePath, limit: 1 << 20, what: "ML-DSA root certificate"))
            let keyText = String(decoding: try AtomicFile.read(state.pqIntermediateKeyPath, limit: 1 << 20, what: "ML-DSA issuing key"), as: UTF8.self)
            let key = try MLDSASigningKey(pem: keyText, passphrase: passphrase)
            // The URLs are set by `open` from the recorded public URL (`/pq/crl`, and `/ocsp`, where the ML-DSA
            // issuing CA answers for its own certificates with ML-DSA signatures).
            var pqPolicy = policy
            pqPolicy.crlURL = nil
            pqPolicy.ocspURL = nil
            return try MLDSAIssuingCA(certificate: intermediate, key: key, root: root, policy: pqPolicy)
        } catch let error as PKIError {
            if error.code == .wrongPassphrase { throw error }
            throw AuthorityError(.corruptState, "the ML-DSA CA files in \(state.caDirectory) are unusable: \(error.reason)")
        }
    }

    /// Adds the ML-DSA hierarchy to an initialized CA: keys (encrypted like the classical ones), certificates,
    /// inventory records and the audit event `pq-init`. Refuses when one exists. A running `mutual serve` picks it up at
    /// its next start.
    public func addPQHierarchy(
        variant: MLDSAVariant, passphrase: String?, actor: String, now: Date = .now
    ) async throws -> MLDSAHierarchy {
        let fm = FileManager.default
        if configuration.pqKeyType != nil || fm.fileExists(atPath: state.pqIntermediateKeyPath) || fm.fileExists(atPath: state.pqRootKeyPath) {
            throw AuthorityError(.alreadyInitialized, "\(state.path) already holds an ML-DSA hierarchy (ca/pq-*.pem); refusing to replace it")
        }
        if configuration.keysEncrypted, passphrase == nil {
            throw PKIError(.wrongPassphrase, "the CA's keys are encrypted: the ML-DSA keys need the same passphrase (MUTUAL_PASSPHRASE or the prompt)")
        }
        let constraints = CAFactory.Constraints(permittedDNS: configuration.permittedDNS, permittedURIPrefixes: configuration.policy.permittedURIPrefixes)
        let hierarchy = try MLDSAHierarchy.make(name: configuration.name, variant: variant, constraints: constraints, now: now)
        var written: [String] = []
        do {
            try AtomicFile.write(try hierarchy.rootKey.pem(passphrase: passphrase), to: state.pqRootKeyPath, mode: 0o600)
            written.append(state.pqRootKeyPath)
            try AtomicFile.write(try hierarchy.intermediateKey.pem(passphrase: passphrase), to: state.pqIntermediateKeyPath, mode: 0o600)
            written.append(state.pqIntermediateKeyPath)
            try AtomicFile.write(hierarchy.root.pem, to: state.pqRootCertificatePath)
            written.append(state.pqRootCertificatePath)
            try AtomicFile.write(hierarchy.intermediate.pem, to: state.pqIntermediateCertificatePath)
            written.append(state.pqIntermediateCertificatePath)
            let fingerprint = SHA256.hash(data: hierarchy.root.der).hexString
            try await store.appendAudit(
                AuditEntry(
                    time: now, actor: actor, action: "pq-init", subject: hierarchy.intermediate.subject.description,
                    details: ["key_type": variant.rawValue, "root_fingerprint": fingerprint]
                )
            )
            for (certificate, profile) in [(hierarchy.root, CertificateProfile.root), (hierarchy.intermediate, .intermediate)] {
                let record = try Self.makeRecord(certificate, profile: profile, owner: "mutual", requester: actor)
                try await store.recordIssuance(
                    record,
                    audit: AuditEntry(time: now, actor: actor, action: "issue", subject: record.serial,
                                      details: ["serial": record.serial, "identity": record.identity, "profile": profile.rawValue, "key_type": variant.rawValue])
                )
            }
            // config.json last: its pqKeyType is what tells `open` to load the hierarchy.
            var updated = configuration
            updated.pqKeyType = variant
            let encoder = JSONEncoder()
            encoder.outputFormatting = [.prettyPrinted, .sortedKeys]
            encoder.dateEncodingStrategy = .iso8601
            try AtomicFile.write(Array(try encoder.encode(updated)), to: state.configPath, mode: 0o600)
        } catch {
            for path in written.reversed() { try? fm.removeItem(atPath: path) }
            throw error
        }
        let loaded = try MLDSAIssuingCA(certificate: hierarchy.intermediate, key: hierarchy.intermediateKey, root: hierarchy.root, policy: Self.pqPolicy(from: ca.policy))
        setPQ(loaded)
        return hierarchy
    }

    /// The ML-DSA CA's policy: the classical one's rules and OCSP URL, its own CRL.
    static func pqPolicy(from classical: IssuancePolicy) -> IssuancePolicy {
        var policy = classical
        if let crl = classical.crlURL, crl.hasSuffix("/crl") { policy.crlURL = String(crl.dropLast(4)) + pqCRLPath } else { policy.crlURL = nil }
        return policy
    }

    /// Issues a certificate for an ML-DSA key from the ML-DSA hierarchy: the classical profile rules, durable in the
    /// inventory with its audit event before it is returned.
    public func issue(
        _ contents: IssuanceRequest.Contents, mldsaKey: MLDSAPublicKey, owner: String?, requester: String, now: Date = .now,
        maximumValidityOverride: ValidityDuration? = nil, action: String = "issue", details extra: [String: String] = [:],
        consumingToken token: String? = nil
    ) async throws -> IssuedMLDSACertificate {
        guard var ca = pqCA else {
            throw PKIError(.unsupportedKey, "this CA has no ML-DSA hierarchy for an \(mldsaKey.variant.rawValue) key: run `mutual pq init` first")
        }
        if let maximumValidityOverride { ca.policy.maximumValidity = maximumValidityOverride }
        let certificate = try ca.issue(contents, publicKey: mldsaKey, now: now)
        var details: [String: String] = [
            "profile": contents.profile.rawValue, "not_after": AuditChain.format(certificate.notAfter), "key_type": mldsaKey.variant.rawValue,
        ]
        if !contents.droppedRequests.isEmpty { details["dropped"] = contents.droppedRequests.joined(separator: "; ") }
        if let owner { details["owner"] = owner }
        details.merge(extra) { a, _ in a }
        let record = try Self.makeRecord(certificate, profile: contents.profile, owner: owner, requester: requester, issuerDescription: ca.certificate.subject.description)
        details["serial"] = record.serial
        details["identity"] = record.identity
        let audit = AuditEntry(time: now, actor: requester, action: action, subject: record.serial, details: details)
        if let token {
            try await store.recordIssuance(record, audit: audit, consumingToken: token, now: now)
        } else {
            try await store.recordIssuance(record, audit: audit)
        }
        return IssuedMLDSACertificate(certificate: certificate, chain: [certificate, ca.certificate], record: record)
    }

    /// Issues from an ML-DSA CSR (PEM or DER): proof of possession checked, contents decided by the profile exactly as
    /// for a classical CSR (only the CN and the SANs are taken; every other request is dropped and noted).
    public func sign(
        mldsaCSR bytes: [UInt8], profile: CertificateProfile, validity: ValidityDuration?, owner: String?, requester: String,
        now: Date = .now
    ) async throws -> IssuedMLDSACertificate {
        let (contents, key) = try Self.contents(ofMLDSACSR: bytes, profile: profile, validity: validity)
        return try await issue(contents, mldsaKey: key, owner: owner, requester: requester, now: now)
    }

    /// A verified ML-DSA CSR's key and the contents it may ask for: the CN and the SANs, everything else dropped and
    /// noted, as for a classical CSR.
    static func contents(ofMLDSACSR bytes: [UInt8], profile: CertificateProfile, validity: ValidityDuration?) throws
        -> (IssuanceRequest.Contents, MLDSAPublicKey)
    {
        let csr = try MLDSACertificationRequest(pemOrDER: bytes)
        guard csr.isSignatureValid else {
            throw PKIError(.badSignature, "the ML-DSA CSR's signature does not verify under its own key (no proof of possession)")
        }
        var contents = IssuanceRequest.Contents(profile: profile, validity: validity)
        var commonNames: [String] = []
        for rdn in csr.subject {
            for attribute in rdn {
                if attribute.type == .RDNAttributeType.commonName {
                    commonNames.append(String(describing: attribute.value))
                } else {
                    contents.droppedRequests.append("subject attribute \(attribute.type)")
                }
            }
        }
        guard commonNames.count <= 1 else {
            throw PKIError(.profileViolation, "CSR subject has \(commonNames.count) common names; at most one is allowed")
        }
        contents.commonName = commonNames.first
        for e in csr.requestedExtensions {
            guard e.oid == .X509ExtensionID.subjectAlternativeName else {
                contents.droppedRequests.append("extension \(e.oid)")
                continue
            }
            for name in try SubjectAlternativeNames(e) {
                switch name {
                case .dnsName(let d): contents.dnsNames.append(d)
                case .ipAddress(let ip): contents.ipAddresses.append(Names.ipAddressString(Array(ip.bytes)))
                case .uniformResourceIdentifier(let u): contents.uris.append(u)
                default: contents.droppedRequests.append("SAN \(name)")
                }
            }
        }
        return (contents, try MLDSAPublicKey(variant: csr.variant, rawRepresentation: csr.publicKey))
    }

    /// An ML-DSA CSR, or nil when `bytes` are not one (a classical CSR, or garbage the classical decoder will name).
    static func mldsaRequest(_ bytes: [UInt8]) -> MLDSACertificationRequest? {
        // Every CSR the authority receives is asked this: a classical one (the common case) is told apart by a byte
        // scan for the ML-DSA algorithm identifiers, before any parsing (which cost ~6 % of a renewal's CPU).
        guard let der = PEMCodec.decode(bytes, label: "CERTIFICATE REQUEST") ?? (bytes.first == 0x30 ? bytes : nil) else {
            return try? MLDSACertificationRequest(pemOrDER: bytes)
        }
        guard MLDSAVariant.allCases.contains(where: { Self.contains(der, $0.encodedOID) }) else { return nil }
        return try? MLDSACertificationRequest(derEncoded: der)
    }

    static func contains(_ haystack: [UInt8], _ needle: [UInt8]) -> Bool {
        guard let first = needle.first, haystack.count >= needle.count else { return false }
        var i = 0
        let last = haystack.count - needle.count
        while i <= last {
            if haystack[i] == first && haystack[i..<(i + needle.count)].elementsEqual(needle) { return true }
            i += 1
        }
        return false
    }

    /// The DER a proof of possession covers: the CSR as sent (an ML-DSA one), or the classical CSR re-encoded.
    static func csrDER(_ bytes: [UInt8]) throws -> [UInt8] {
        if let request = mldsaRequest(bytes) { return request.der }
        var serializer = DER.Serializer()
        try serializer.serialize(try CSRDecoder.decode(bytes).request)
        return serializer.serializedBytes
    }

    // MARK: Migration

    /// Metadata key of the migration: JSON `{"key_type": "ml-dsa-65", "patterns": ["spiffe://example.org/ns/web/*", …]}`.
    static let migrationKey = "pq_migration"

    /// What `mutual pq migrate` recorded: identities (scope patterns, as tokens use them) whose next certificate must
    /// be for an ML-DSA key.
    public struct Migration: Codable, Sendable, Hashable {
        public var keyType: MLDSAVariant
        public var patterns: [String]

        public init(keyType: MLDSAVariant, patterns: [String]) {
            self.keyType = keyType
            self.patterns = patterns
        }

        enum CodingKeys: String, CodingKey {
            case keyType = "key_type"
            case patterns
        }
    }

    public func migration() async throws -> Migration? {
        guard let text = try await store.metadata(Self.migrationKey) else { return nil }
        return try? JSONDecoder().decode(Migration.self, from: Data(text.utf8))
    }

    /// Adds (or with `remove`, drops) identity patterns to move to ML-DSA at their next renewal or enrollment. Audited
    /// as `pq-migrate`; every authority process sharing the database applies it from the next request.
    public func updateMigration(adding: [String], removing: [String], keyType: MLDSAVariant?, actor: String, now: Date = .now) async throws -> Migration {
        guard let pq = pqCA else {
            throw PKIError(.unsupportedKey, "this CA has no ML-DSA hierarchy to move identities to: run `mutual pq init` first")
        }
        var current = try await migration() ?? Migration(keyType: keyType ?? pq.key.variant, patterns: [])
        if let keyType { current.keyType = keyType }
        for pattern in adding {
            guard let parsed = try? ScopePattern(pattern) else {
                throw PKIError(.malformedInput, "invalid identity pattern '\(pattern.prefix(80))': use 'spiffe://domain/path/*', '*.domain' or an exact identity")
            }
            if !current.patterns.contains(parsed.text) { current.patterns.append(parsed.text) }
        }
        current.patterns.removeAll { removing.contains($0) }
        guard current.keyType == pq.key.variant || (current.keyType == .mlDSA87 && pq.key.variant == .mlDSA65) else {
            throw PKIError(.unsupportedKey, "the \(pq.key.variant.rawValue) hierarchy does not certify \(current.keyType.rawValue) keys")
        }
        let encoder = JSONEncoder()
        encoder.outputFormatting = [.sortedKeys]
        let text = String(decoding: try encoder.encode(current), as: UTF8.self)
        try await store.setMetadata(
            [Self.migrationKey: text],
            audit: AuditEntry(time: now, actor: actor, action: "pq-migrate", subject: Self.migrationKey,
                              details: ["key_type": current.keyType.rawValue, "patterns": current.patterns.joined(separator: " ")])
        )
        return current
    }

    /// The ML-DSA parameter set `identity` must move to, if a migration pattern covers it (nil without an ML-DSA
    /// hierarchy: nothing is read then, so a classical-only CA pays nothing per renewal).
    func requiredKeyType(for identity: String) async throws -> MLDSAVariant? {
        guard pqCA != nil, let migration = try await migration() else { return nil }
        let patterns = migration.patterns.compactMap { try? ScopePattern($0) }
        return patterns.contains(where: { $0.matches(identity) }) ? migration.keyType : nil
    }

    func setPQ(_ ca: MLDSAIssuingCA) {
        pqBox.withLock { $0 = ca }
    }

    static func makeRecord(_ certificate: MLDSACertificate, profile: CertificateProfile, owner: String?, requester: String,
                           issuerDescription: String? = nil) throws -> CertificateRecord
    {
        CertificateRecord(
            serial: certificate.serialHex, issuer: issuerDescription ?? certificate.issuer.description,
            subject: certificate.subject.isEmpty ? "" : certificate.subject.description,
            subjectAlternativeNames: sanStrings(certificate.subjectAlternativeNames),
            identity: CertificateIdentity.of(certificate) ?? certificate.serialHex, profile: profile.rawValue, owner: owner,
            requester: requester, notBefore: certificate.notBefore, notAfter: certificate.notAfter,
            fingerprint: SHA256.hash(data: certificate.der).hexString, der: certificate.der
        )
    }
}

/// A certificate of either family, in the inventory: what renewal returns (its CSR's key decides the family).
public struct IssuedAnyCertificate: Sendable {
    public var certificate: AnyCertificate
    /// Leaf, then the issuing CA of its hierarchy.
    public var chain: [AnyCertificate]
    public var record: CertificateRecord

    public init(_ issued: Authority.IssuedCertificate) {
        certificate = .classical(issued.certificate)
        chain = issued.chain.map { .classical($0) }
        record = issued.record
    }

    public init(_ issued: Authority.IssuedMLDSACertificate) {
        certificate = .mldsa(issued.certificate)
        chain = issued.chain.map { .mldsa($0) }
        record = issued.record
    }

    /// For the classical-only entry points: an ML-DSA result is refused (it cannot be a `Certificate`).
    func requireClassical() throws -> Authority.IssuedCertificate {
        guard case .classical(let leaf) = certificate else {
            throw PKIError(.unsupportedKey, "an ML-DSA certificate was issued where a classical one was expected; use the entry point for either family")
        }
        return Authority.IssuedCertificate(certificate: leaf, chain: chain.compactMap(\.classical), record: record)
    }
}

extension AuthorityError {
    static func keyTypeRequired(_ variant: MLDSAVariant, identity: String) -> AuthorityError {
        AuthorityError(
            .keyTypeRequired,
            "\(identity) is moving to ML-DSA: send a CSR for an \(variant.rawValue) key (`mutual agent --key-type \(variant.rawValue)` does this by itself)",
            details: ["key_type": variant.rawValue]
        )
    }
}

/// How far the inventory has moved to ML-DSA: valid end-entity certificates by key algorithm, and identities (an
/// identity counts as moved when its newest valid certificate has an ML-DSA key). What `mutual pq report` prints.
public struct PQReport: Sendable, Codable, Hashable {
    /// The ML-DSA hierarchy's parameter set, if there is one.
    public var hierarchy: String?
    /// Valid end-entity certificates (CAs excluded) by key algorithm (`ML-DSA-65`, `P-256`, …).
    public var certificatesByAlgorithm: [String: Int]
    public var identities: Int
    public var postQuantumIdentities: Int
    /// Identities whose newest valid certificate is still classical, soonest expiry first (at most 50): the next
    /// renewals that can move.
    public var classicalIdentities: [ClassicalIdentity]
    public var moreClassicalIdentities: Int

    public struct ClassicalIdentity: Sendable, Codable, Hashable {
        public var identity: String
        public var algorithm: String
        public var owner: String?
        public var notAfter: Date
    }
}

extension Authority {
    /// Reads every valid certificate (pages of 1,000) and classifies it by its key; CAs are left out.
    public func pqReport(now: Date = .now) async throws -> PQReport {
        var byAlgorithm: [String: Int] = [:]
        var newest: [String: (record: CertificateRecord, algorithm: String)] = [:]
        var offset = 0
        while true {
            var filter = CertificateFilter(status: .valid, now: now, limit: 1000, offset: offset)
            filter.newestFirst = true
            let page = try await store.certificates(filter)
            for record in page where record.profile != CertificateProfile.root.rawValue && record.profile != CertificateProfile.intermediate.rawValue {
                let algorithm = (try? AnyCertificate(derEncoded: record.der))?.keyAlgorithm ?? "unreadable"
                byAlgorithm[algorithm, default: 0] += 1
                if let seen = newest[record.identity], seen.record.notBefore >= record.notBefore { continue }
                newest[record.identity] = (record, algorithm)
            }
            if page.count < 1000 { break }
            offset += page.count
        }
        let classical = newest.values.filter { !$0.algorithm.hasPrefix("ML-DSA") }.sorted { $0.record.notAfter < $1.record.notAfter }
        return PQReport(
            hierarchy: pqCA?.key.variant.rawValue, certificatesByAlgorithm: byAlgorithm, identities: newest.count,
            postQuantumIdentities: newest.count - classical.count,
            classicalIdentities: classical.prefix(50).map {
                .init(identity: $0.record.identity, algorithm: $0.algorithm, owner: $0.record.owner, notAfter: $0.record.notAfter)
            },
            moreClassicalIdentities: max(0, classical.count - 50)
        )
    }
}
