import Foundation
import MutualPKCS11
import MutualPKI
import MutualStore
import X509

/// One CA as `mutual ca status` shows it.
public struct CAStatus: Sendable, Codable {
    public var kind: String
    public var generation: Int
    public var stage: String
    public var subject: String
    public var notAfter: Date
    public var keyStore: String
    /// Valid (unexpired, unrevoked) certificates it issued, and their owners (intermediates only).
    public var validCertificates: Int?
    public var owners: [String: Int]?
}

/// What a rotation stage did.
public struct RotationReport: Sendable {
    public var kind: CARotation.Kind
    public var stage: String
    public var generation: Int
    public var lines: [String]
}

extension Authority {
    /// Roots relying parties should trust now (during a root rotation: the current and the new or the old one).
    public var trustedRoots: [Certificate] {
        let active = self.active
        return active.rotation.trustedRoots.isEmpty ? [active.ca.root] : active.rotation.trustedRoots
    }

    /// The root CRL files of every trusted root.
    public var rootCRLPaths: [String] {
        let paths = active.rotation.rootCRLPaths
        return paths.isEmpty ? [state.rootCRLPath] : paths
    }

    /// The generation number of the issuing CA in use.
    public var activeGeneration: Int { active.rotation.state.active(.intermediate)?.generation ?? 1 }

    /// Every issuing CA certificate relying parties may meet now: the active one, a prepared one, replaced ones not
    /// retired, and a root rotation's cross-certificate.
    public var publishedIntermediates: [Certificate] {
        let active = self.active
        return [active.ca.certificate] + (active.rotation.preparedIntermediate.map { [$0] } ?? []) + active.rotation.previous.map(\.certificate)
            + active.ca.crossCertificates + active.rotation.preparedCross
    }

    /// Metadata key bumped at every rotation stage: `mutual serve` reloads its CAs when it changes.
    public static let rotationEpochKey = "ca_rotation_epoch"

    /// The rotation state on disk, or the implicit one of a CA never rotated.
    func currentRotationState() throws -> CARotation.State {
        if let state = try CARotation.readState(state) { return state }
        return active.rotation.state
    }

    /// Before the first rotation, the CA's files move into generation directories (`ca/g1`, `ca/r1`): copied,
    /// fsynced, recorded in `ca/rotation.json`, and only then are the old key files removed.
    func migrateToGenerations() throws -> CARotation.State {
        if let existing = try CARotation.readState(state) { return existing }
        let fm = FileManager.default
        let current = active.rotation.state
        for (kind, from) in [(CARotation.Kind.intermediate, state.intermediateCertificatePath), (.root, state.rootCertificatePath)] {
            let directory = CARotation.directory(state, kind, 1)
            if !fm.fileExists(atPath: directory) { try fm.createDirectory(atPath: directory, withIntermediateDirectories: true, attributes: [.posixPermissions: 0o700]) }
            try AtomicFile.write(try AtomicFile.read(from, what: "CA certificate"), to: CARotation.certificatePath(state, kind, 1), mode: 0o644)
            let keyFrom = kind == .intermediate ? state.intermediateKeyPath : state.rootKeyPath
            if current.active(kind)?.keyStore == nil, fm.fileExists(atPath: keyFrom) {
                try AtomicFile.write(try AtomicFile.read(keyFrom, what: "CA key"), to: CARotation.keyPath(state, kind, 1), mode: 0o600)
            }
        }
        if fm.fileExists(atPath: state.rootCRLPath) {
            try AtomicFile.write(try AtomicFile.read(state.rootCRLPath, what: "root CRL"), to: CARotation.rootCRLPath(state, 1), mode: 0o644)
        }
        AtomicFile.syncDirectory(state.caDirectory)
        try CARotation.writeState(current, to: state)
        for key in [state.intermediateKeyPath, state.rootKeyPath] where fm.fileExists(atPath: key) { try? fm.removeItem(atPath: key) }
        return current
    }

    /// A new CA key: in the token the active one lives in (label `<label>-g<N>` / `-r<N>`), else a file in the
    /// generation's directory (encrypted when the CA's keys are).
    func makeKey(
        _ kind: CARotation.Kind, generation: Int, like entry: CARotation.Entry, passphrase: () throws -> String?
    ) throws -> (key: Certificate.PrivateKey, keyStore: String?) {
        if let keyStore = entry.keyStore {
            let uri = try PKCS11URI(keyStore)
            let label = (uri.object ?? "mutual").replacingOccurrences(of: #"-[gr][0-9]+$"#, with: "", options: .regularExpression)
            let key = try PKCS11Key.findOrGenerate(uri.naming(object: label + (kind == .intermediate ? "-g" : "-r") + String(generation)), keyType: configuration.keyType)
            return (key.certificatePrivateKey, key.uri.description)
        }
        let key = try configuration.keyType.generate()
        let secret = configuration.keysEncrypted ? try passphrase() : nil
        if configuration.keysEncrypted && secret == nil {
            throw PKIError(.wrongPassphrase, "the CA's keys are encrypted: set MUTUAL_PASSPHRASE for the new key")
        }
        let directory = CARotation.directory(state, kind, generation)
        try FileManager.default.createDirectory(atPath: directory, withIntermediateDirectories: true, attributes: [.posixPermissions: 0o700])
        try AtomicFile.write(KeyFile.pem(for: key, passphrase: secret), to: CARotation.keyPath(state, kind, generation), mode: 0o600)
        return (key, nil)
    }

    /// The active root's key (needed to certify a new intermediate or cross-sign a new root).
    func activeRootKey(_ rotation: CARotation.State, passphrase: () throws -> String?) throws -> (Certificate, Certificate.PrivateKey) {
        guard let entry = rotation.active(.root) else { throw AuthorityError(.corruptState, "no active root in the rotation state") }
        let root = try CARotation.readCertificate(CARotation.certificatePath(state, .root, entry.generation))
        var ignored: [PKCS11Key] = []
        do {
            let key = try CARotation.loadKey(state, .root, entry, passphrase: passphrase, tokenKeys: &ignored)
            guard key.publicKey == root.publicKey else { throw PKIError(.inconsistentCA, "the root key does not match root r\(entry.generation)") }
            return (root, key)
        } catch let error as PKIError where error.code == .malformedInput {
            throw AuthorityError(.rootKeyUnavailable, "the root key of r\(entry.generation) is unreadable: \(error.reason)")
        } catch let error as PKIError where error.code != .wrongPassphrase {
            throw AuthorityError(.rootKeyUnavailable, "the root key of r\(entry.generation) is not available (\(error.reason)): bring it back to \(CARotation.keyPath(state, .root, entry.generation)) for the rotation")
        }
    }

    /// Makes the next issuing CA (and for `.root` the next root, its CRL and a cross-certificate from the current
    /// root), records them, and publishes them in the trust bundles; issuance stays with the current CA.
    public func prepareRotation(
        _ kind: CARotation.Kind, passphrase: () throws -> String?, actor: String, now: Date = .now
    ) async throws -> RotationReport {
        var rotation = try currentRotationState()
        guard !rotation.inProgress else {
            throw AuthorityError(.rotationInProgress, "a rotation is under way (\(Self.describe(rotation))): activate and retire it first (`mutual ca status`)")
        }
        rotation = try migrateToGenerations()
        guard let activeIntermediate = rotation.active(.intermediate), let activeRoot = rotation.active(.root) else {
            throw AuthorityError(.corruptState, "no active CA in the rotation state")
        }
        let (root, rootKey) = try activeRootKey(rotation, passphrase: passphrase)
        let generation = (rotation.intermediates.map(\.generation).max() ?? 1) + 1
        var lines: [String] = []
        var newRoot = root
        var newRootKey = rootKey
        var rootGeneration = activeRoot.generation
        if kind == .root {
            rootGeneration = (rotation.roots.map(\.generation).max() ?? 1) + 1
            let made = try makeKey(.root, generation: rootGeneration, like: activeRoot, passphrase: passphrase)
            newRootKey = made.key
            newRoot = try CAFactory.makeRoot(name: configuration.name, key: made.key, generation: rootGeneration, now: now)
            let cross = try CAFactory.crossCertify(newRoot, issuer: root, issuerKey: rootKey, now: now)
            let directory = CARotation.directory(state, .root, rootGeneration)
            try FileManager.default.createDirectory(atPath: directory, withIntermediateDirectories: true, attributes: [.posixPermissions: 0o700])
            try AtomicFile.write(PEMBundle.pem([newRoot]), to: CARotation.certificatePath(state, .root, rootGeneration))
            try AtomicFile.write(PEMBundle.pem([cross]), to: CARotation.crossPath(state, rootGeneration))
            try AtomicFile.write(try Self.rootCRLPEM(root: newRoot, rootKey: made.key, number: 1, now: now), to: CARotation.rootCRLPath(state, rootGeneration))
            try await record(newRoot, profile: .root, owner: "mutual", requester: actor, now: now)
            try await record(cross, profile: .root, owner: "mutual", requester: actor, now: now, details: ["cross_certified_by": root.subject.description])
            rotation.roots.append(.init(generation: rootGeneration, stage: .prepared, keyStore: made.keyStore, root: nil, changedAt: now))
            lines.append("root r\(rootGeneration): \(newRoot.subject) (valid until \(AuditChain.format(newRoot.notValidAfter)))")
            lines.append("cross-certificate: r\(rootGeneration) certified by r\(activeRoot.generation), sent in chains after activation so that relying parties still trusting only r\(activeRoot.generation) accept the new chains until they have the new root")
        }
        let made = try makeKey(.intermediate, generation: generation, like: activeIntermediate, passphrase: passphrase)
        let constraints = CAFactory.Constraints(permittedDNS: configuration.permittedDNS, permittedURIPrefixes: configuration.policy.permittedURIPrefixes)
        let intermediate = try CAFactory.makeIntermediate(
            name: configuration.name, constraints: constraints, key: made.key, generation: generation, root: newRoot, rootKey: newRootKey, now: now
        )
        try FileManager.default.createDirectory(atPath: CARotation.directory(state, .intermediate, generation), withIntermediateDirectories: true, attributes: [.posixPermissions: 0o700])
        try AtomicFile.write(PEMBundle.pem([intermediate]), to: CARotation.certificatePath(state, .intermediate, generation))
        AtomicFile.syncDirectory(state.caDirectory)
        try await record(intermediate, profile: .intermediate, owner: "mutual", requester: actor, now: now)
        rotation.intermediates.append(.init(generation: generation, stage: .prepared, keyStore: made.keyStore, root: rootGeneration, changedAt: now))
        lines.insert("issuing CA g\(generation): \(intermediate.subject) (valid until \(AuditChain.format(intermediate.notValidAfter)), key in \(made.keyStore ?? "a file"))", at: 0)
        lines.append("published: /roots.pem and /bundle.pem now carry the new CA beside the current one; agents take the new bundle at their next renewal")
        lines.append("still issuing from g\(activeIntermediate.generation); next: `mutual ca rotate \(kind.rawValue) --stage activate`")
        try await commit(rotation, kind: kind, stage: "prepare", generation: generation, actor: actor, now: now, details: ["root_generation": String(rootGeneration)])
        try reloadCAs()
        return RotationReport(kind: kind, stage: "prepare", generation: generation, lines: lines)
    }

    /// Metadata key set by `activate --renew-now`: agents whose certificate another CA issued renew at their next check.
    public static let renewNowKey = "ca_renew_now"

    /// What `GET /v1/ca` tells agents: the issuing CA in use, and whether certificates of other CAs should renew now.
    public func issuingCAInfo() async throws -> (issuer: String, generation: Int, renewNow: Bool) {
        let active = self.active
        let asked = try await store.metadata(Self.renewNowKey) == "true"
        return (active.issuer, active.rotation.state.active(.intermediate)?.generation ?? 1, asked && !active.rotation.previous.isEmpty)
    }

    /// Issues from the prepared CA from now on; the replaced one stays valid and revocable. `renewNow`: agents renew
    /// onto the new CA at their next check (within minutes) instead of at their normal schedule.
    public func activateRotation(
        _ kind: CARotation.Kind, passphrase: () throws -> String?, renewNow: Bool = false, actor: String, now: Date = .now
    ) async throws -> RotationReport {
        var rotation = try currentRotationState()
        guard let prepared = rotation.prepared(.intermediate), kind == .intermediate || rotation.prepared(.root) != nil else {
            throw AuthorityError(.rotationNotPrepared, "no \(kind.rawValue) rotation is prepared: run `mutual ca rotate \(kind.rawValue) --stage prepare` first")
        }
        if kind == .intermediate, rotation.prepared(.root) != nil {
            throw AuthorityError(.rotationInProgress, "the prepared CA belongs to a root rotation: `mutual ca rotate root --stage activate`")
        }
        // The new key must sign before anything switches to it.
        var tokenKeys: [PKCS11Key] = []
        let key = try CARotation.loadKey(state, .intermediate, prepared, passphrase: passphrase, tokenKeys: &tokenKeys)
        let certificate = try CARotation.readCertificate(CARotation.certificatePath(state, .intermediate, prepared.generation))
        guard key.publicKey == certificate.publicKey else { throw PKIError(.inconsistentCA, "the prepared key does not match issuing CA g\(prepared.generation)") }
        func move(_ kindToMove: CARotation.Kind) {
            let list = kindToMove == .intermediate ? \CARotation.State.intermediates : \CARotation.State.roots
            for index in rotation[keyPath: list].indices {
                switch rotation[keyPath: list][index].stage {
                case .active: rotation[keyPath: list][index].stage = .previous
                case .prepared: rotation[keyPath: list][index].stage = .active
                default: continue
                }
                rotation[keyPath: list][index].changedAt = now
            }
        }
        move(.intermediate)
        if kind == .root { move(.root) }
        try await store.setMetadata([Self.renewNowKey: renewNow ? "true" : "false"], audit: nil)
        try await commit(rotation, kind: kind, stage: "activate", generation: prepared.generation, actor: actor, now: now, details: ["renew_now": String(renewNow)])
        try reloadCAs()
        // The copies of the active CA files that tools and docs point at.
        let activeRoot = rotation.active(.root)!.generation
        try AtomicFile.write(PEMBundle.pem([certificate]), to: state.intermediateCertificatePath)
        try AtomicFile.write(try AtomicFile.read(CARotation.certificatePath(state, .root, activeRoot), what: "root"), to: state.rootCertificatePath)
        if let crl = try? AtomicFile.read(CARotation.rootCRLPath(state, activeRoot), what: "root CRL") { try AtomicFile.write(crl, to: state.rootCRLPath) }
        let admin = try await reissueAdmin(actor: actor, now: now)
        var lines = [
            "issuing from g\(prepared.generation) (\(certificate.subject)) from now on",
            "the previous CA stays valid and revocable: its CRL at /crl\(prepared.generation - 1 <= 1 ? "" : "/g\(prepared.generation - 1)"), OCSP answers for both issuers",
            renewNow ? "agents renew onto the new chain at their next check (within 5 minutes), not waiting for their schedule" : "agents renew onto the new chain at their normal schedule",
            "admin client certificate re-issued from the new CA in \(state.adminDirectory) (the old one revoked: \(admin))",
        ]
        if kind == .root { lines.insert("root r\(activeRoot) is now the anchor; chains carry its cross-certificate until r\(activeRoot - 1) is retired", at: 1) }
        lines.append("next, once no certificate of the old CA is in use: `mutual ca rotate \(kind.rawValue) --stage retire`")
        return RotationReport(kind: kind, stage: "activate", generation: prepared.generation, lines: lines)
    }

    /// Drops the replaced CA from the bundles once none of its certificates is valid (or with `force`). Certificates
    /// that `mutual serve` holds for itself (its TLS and OCSP certificates, replaced on reload) are revoked as
    /// superseded rather than counted.
    public func retireRotation(_ kind: CARotation.Kind, force: Bool, actor: String, now: Date = .now) async throws -> RotationReport {
        var rotation = try currentRotationState()
        let previousRoots = rotation.previous(.root)
        if kind == .root, previousRoots.isEmpty {
            throw AuthorityError(.rotationNotPrepared, "no root is waiting to be retired (`mutual ca status`)")
        }
        let intermediates = rotation.previous(.intermediate).filter { kind == .intermediate || previousRoots.map(\.generation).contains($0.root ?? 0) }
        if kind == .intermediate, !previousRoots.isEmpty {
            throw AuthorityError(.rotationInProgress, "the previous issuing CA belongs to a root rotation: `mutual ca rotate root --stage retire`")
        }
        guard !intermediates.isEmpty else {
            throw AuthorityError(.rotationNotPrepared, "no issuing CA is waiting to be retired (`mutual ca status`)")
        }
        var lines: [String] = []
        var blocking: [String: Int] = [:]
        var selfHeld: [CertificateRecord] = []
        for entry in intermediates {
            let subject = try CARotation.readCertificate(CARotation.certificatePath(state, .intermediate, entry.generation)).subject.description
            for record in try await validCertificates(issuer: subject, now: now) {
                if record.owner == "mutual serve" { selfHeld.append(record) } else { blocking[record.owner ?? "-", default: 0] += 1 }
            }
        }
        let remaining = blocking.values.reduce(0, +)
        if remaining > 0 && !force {
            let owners = blocking.sorted { $0.value > $1.value }.map { "\($0.key): \($0.value)" }.joined(separator: ", ")
            throw AuthorityError(
                .caStillInUse, "\(remaining) valid certificate(s) of the old CA remain (\(owners)); wait for them to renew or expire, or --force",
                details: ["remaining": String(remaining), "owners": owners]
            )
        }
        for record in selfHeld { _ = try? await revoke(serial: record.serial, reason: .superseded, actor: actor, now: now) }
        for index in rotation.intermediates.indices where intermediates.map(\.generation).contains(rotation.intermediates[index].generation) {
            rotation.intermediates[index].stage = .retired
            rotation.intermediates[index].changedAt = now
            lines.append("issuing CA g\(rotation.intermediates[index].generation) retired")
        }
        if kind == .root {
            for index in rotation.roots.indices where rotation.roots[index].stage == .previous {
                rotation.roots[index].stage = .retired
                rotation.roots[index].changedAt = now
                lines.append("root r\(rotation.roots[index].generation) retired: gone from /roots.pem, chains no longer carry the cross-certificate")
            }
        }
        if remaining > 0 { lines.append("forced: \(remaining) valid certificate(s) of the old CA remain and will no longer chain to a published CA") }
        if !selfHeld.isEmpty { lines.append("revoked \(selfHeld.count) superseded certificate(s) that mutual serve held for itself") }
        try await commit(rotation, kind: kind, stage: "retire", generation: intermediates.map(\.generation).max() ?? 0, actor: actor, now: now, details: ["remaining": String(remaining), "forced": String(force && remaining > 0)])
        try reloadCAs()
        return RotationReport(kind: kind, stage: "retire", generation: intermediates.map(\.generation).max() ?? 0, lines: lines)
    }

    func validCertificates(issuer: String, now: Date) async throws -> [CertificateRecord] {
        var filter = CertificateFilter(status: .valid, now: now, limit: 100_000)
        filter.issuer = issuer
        return try await store.certificates(filter)
    }

    /// Writes the new state and tells every `serve` on this state directory (through the database) to reload.
    func commit(_ rotation: CARotation.State, kind: CARotation.Kind, stage: String, generation: Int, actor: String, now: Date, details: [String: String]) async throws {
        try CARotation.writeState(rotation, to: state)
        let epoch = "\(AuditChain.format(now))/\(UUID().uuidString.prefix(8))"
        try await store.setMetadata(
            [Self.rotationEpochKey: epoch],
            audit: AuditEntry(
                time: now, actor: actor, action: "ca-rotate", subject: "\(kind.rawValue) g\(generation)",
                details: details.merging(["kind": kind.rawValue, "stage": stage, "generation": String(generation)]) { a, _ in a }
            )
        )
    }

    /// Re-reads the CA files (after a rotation stage, here or in another process): the active issuing CA, the
    /// previous ones, the trusted roots. Keys in files are read with the passphrase given at open.
    public func reloadCAs() throws {
        guard let rotation = try CARotation.readState(state) else { return }
        var tokenKeys: [PKCS11Key] = []
        var (ca, loaded) = try CARotation.load(
            state: state, rotation: rotation, policy: configuration.policy, passphrase: { self.passphrase }, tokenKeys: &tokenKeys
        )
        let current = self.ca
        let generation = rotation.active(.intermediate)?.generation ?? 1
        if let base = current.policy.ocspURL.map({ String($0.dropLast("/ocsp".count)) }) {
            ca.policy.crlURL = base + Self.crlPath(generation: generation)
            ca.policy.ocspURL = base + "/ocsp"
        }
        ca.crossCertificates = loaded.crossCertificates
        for index in loaded.previous.indices { loaded.previous[index].policy.crlURL = nil }
        caBox.withLock { $0 = ActiveCA(ca: ca, issuer: ca.certificate.subject.description, rotation: loaded) }
        tokenKeysBox.withLock { $0 = tokenKeys }
    }

    /// Issues the operator's admin client certificate (`admin/`) from the active CA and revokes the one it replaces.
    /// Other admin certificates (issued to people with `mutual issue --profile admin`) are theirs to renew: they count
    /// towards `retire` like any other certificate.
    func reissueAdmin(actor: String, now: Date) async throws -> Int {
        let replaced = (try? PEMBundle.certificates(fromBytes: try AtomicFile.read(state.adminDirectory + "/cert.pem", what: "admin certificate")))?.first
        let key = try configuration.keyType.generate()
        let admin = try await issue(
            IssuanceRequest(profile: .admin, publicKey: key.publicKey, commonName: "mutual admin", validity: nil),
            owner: "operator", requester: actor, now: now, maximumValidityOverride: .days(365)
        )
        try AtomicFile.write(KeyFile.pem(for: key, passphrase: nil), to: state.adminDirectory + "/key.pem", mode: 0o600)
        try AtomicFile.write(PEMBundle.pem([admin.certificate]), to: state.adminDirectory + "/cert.pem")
        try AtomicFile.write(PEMBundle.pem(admin.chain), to: state.adminDirectory + "/chain.pem")
        guard let replaced, replaced.serialNumber != admin.certificate.serialNumber else { return 0 }
        return (try? await revoke(serial: replaced.serialHex, reason: .superseded, actor: actor, now: now)) != nil ? 1 : 0
    }

    static func describe(_ rotation: CARotation.State) -> String {
        CARotation.Kind.allCases.flatMap { kind in
            rotation.entries(kind).filter { $0.stage == .prepared || $0.stage == .previous }.map {
                "\(kind == .intermediate ? "g" : "r")\($0.generation) \($0.stage.rawValue)"
            }
        }.joined(separator: ", ")
    }

    /// Every CA of this authority with its stage and, for issuing CAs, how many valid certificates it has out.
    public func caStatus(now: Date = .now) async throws -> [CAStatus] {
        let rotation = try currentRotationState()
        var result: [CAStatus] = []
        let rotated = CARotation.readStateExists(state)
        for kind in CARotation.Kind.allCases {
            for entry in rotation.entries(kind).sorted(by: { $0.generation > $1.generation }) {
                let path = rotated
                    ? CARotation.certificatePath(state, kind, entry.generation)
                    : (kind == .intermediate ? state.intermediateCertificatePath : state.rootCertificatePath)
                guard let certificate = try? CARotation.readCertificate(path) else { continue }
                var status = CAStatus(
                    kind: kind.rawValue, generation: entry.generation, stage: entry.stage.rawValue, subject: certificate.subject.description,
                    notAfter: certificate.notValidAfter, keyStore: entry.keyStore ?? "file"
                )
                if kind == .intermediate {
                    let records = try await validCertificates(issuer: certificate.subject.description, now: now)
                    status.validCertificates = records.count
                    status.owners = records.reduce(into: [:]) { $0[$1.owner ?? "-", default: 0] += 1 }
                }
                result.append(status)
            }
        }
        return result
    }
}

extension CARotation {
    static func readStateExists(_ state: StateDirectory) -> Bool {
        FileManager.default.fileExists(atPath: state.caDirectory + stateFile)
    }
}
