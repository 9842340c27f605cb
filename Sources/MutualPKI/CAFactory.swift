import Foundation
import SwiftASN1
import X509

/// Creates the CA hierarchy `mutual init` sets up: a self-signed root and an issuing intermediate (path length 0,
/// optional name constraints).
public enum CAFactory {
    /// How far the root and intermediate are back-dated.
    public static let backdate = ValidityDuration.hours(24)

    public struct Hierarchy: Sendable {
        public var root: Certificate
        public var rootKey: Certificate.PrivateKey
        public var intermediate: Certificate
        public var intermediateKey: Certificate.PrivateKey
    }

    /// Name constraints for the issuing CA.
    public struct Constraints: Sendable, Hashable {
        /// DNS subtrees (`example.org` permits it and its subdomains).
        public var permittedDNS: [String]
        /// URI prefixes (`spiffe://example.org/ns/prod`): the host goes into the X.509 constraint; the full prefix is
        /// enforced by Mutual's issuance policy.
        public var permittedURIPrefixes: [String]

        public init(permittedDNS: [String] = [], permittedURIPrefixes: [String] = []) {
            self.permittedDNS = permittedDNS
            self.permittedURIPrefixes = permittedURIPrefixes
        }

        public var isEmpty: Bool { permittedDNS.isEmpty && permittedURIPrefixes.isEmpty }

        func validated() throws -> (dns: [String], uriHosts: [String]) {
            var dns: [String] = []
            for suffix in permittedDNS {
                let bare = suffix.hasPrefix(".") ? String(suffix.dropFirst()) : suffix
                _ = try Names.normalizedDNSName(bare, allowWildcard: false)
                dns.append(suffix.lowercased())
            }
            var hosts: [String] = []
            for prefix in permittedURIPrefixes {
                guard let host = URLComponents(string: prefix)?.host, !host.isEmpty, prefix.contains("://") else {
                    throw PKIError(.invalidName, "invalid --permit-uri '\(prefix)': expected a URI prefix such as spiffe://example.org/ns/prod")
                }
                if prefix.hasPrefix("spiffe:") {
                    var bare = prefix
                    if bare.hasSuffix("/*") { bare.removeLast(2) }
                    if bare.hasSuffix("/") { bare.removeLast() }
                    _ = try Names.SPIFFEID(parsing: bare)
                }
                if !hosts.contains(host) { hosts.append(host) }
            }
            return (dns, hosts)
        }
    }

    /// Generates keys and certificates for a new hierarchy. `now` is injected so tests control validity.
    /// `rootKey`/`intermediateKey`: keys made elsewhere (in a PKCS#11 token) instead of generated here.
    public static func makeHierarchy(
        name: String,
        keyType: KeyType,
        constraints: Constraints = .init(),
        rootKey: Certificate.PrivateKey? = nil,
        intermediateKey: Certificate.PrivateKey? = nil,
        now: Date,
        rootValidity: ValidityDuration = CertificateProfile.root.defaultValidity,
        intermediateValidity: ValidityDuration = CertificateProfile.intermediate.defaultValidity
    ) throws -> Hierarchy {
        try validate(name: name)
        let rootKey = try rootKey ?? keyType.generate()
        let intermediateKey = try intermediateKey ?? keyType.generate()
        let root = try makeRoot(name: name, key: rootKey, generation: 1, now: now, validity: rootValidity)
        let intermediate = try makeIntermediate(
            name: name, constraints: constraints, key: intermediateKey, generation: 1, root: root, rootKey: rootKey, now: now,
            validity: intermediateValidity
        )
        return Hierarchy(root: root, rootKey: rootKey, intermediate: intermediate, intermediateKey: intermediateKey)
    }

    static func validate(name: String) throws {
        guard !name.isEmpty, name.count <= 52,
            name.unicodeScalars.allSatisfy({ !CharacterSet.controlCharacters.contains($0) })
        else {
            throw PKIError(.invalidName, "invalid CA name: must be 1 to 52 printable characters")
        }
    }

    /// " G2", " G3", ... after the first generation: a rotated CA gets its own subject, so path builders that look
    /// issuers up by name never confuse the old and the new one.
    static func suffix(_ generation: Int) -> String { generation > 1 ? " G\(generation)" : "" }

    /// A self-signed root for `key`.
    public static func makeRoot(
        name: String, key: Certificate.PrivateKey, generation: Int, now: Date,
        validity: ValidityDuration = CertificateProfile.root.defaultValidity
    ) throws -> Certificate {
        try validate(name: name)
        // Back-dated a day: a host whose clock is hours behind can still verify the hierarchy (and the authority's
        // back-dated TLS certificate under it) and learn the right time from the authority.
        let notBefore = now.addingTimeInterval(-CAFactory.backdate.timeInterval)
        let subject = try DistinguishedName {
            OrganizationName(name)
            CommonName("\(name) Root CA\(suffix(generation))")
        }
        let extensions = try Certificate.Extensions {
            Critical(BasicConstraints.isCertificateAuthority(maxPathLength: nil))
            Critical(KeyUsage(keyCertSign: true, cRLSign: true))
            SubjectKeyIdentifier(hash: key.publicKey)
        }
        return try Certificate(
            version: .v3,
            serialNumber: IssuingCA.randomSerialNumber(),
            publicKey: key.publicKey,
            notValidBefore: notBefore,
            notValidAfter: now.addingTimeInterval(validity.timeInterval),
            issuer: subject,
            subject: subject,
            signatureAlgorithm: key.preferredSignatureAlgorithm,
            extensions: extensions,
            issuerPrivateKey: key
        )
    }

    /// An issuing CA for `key`, certified by `root`. Its validity ends no later than the root's.
    public static func makeIntermediate(
        name: String, constraints: Constraints = .init(), key: Certificate.PrivateKey, generation: Int, root: Certificate,
        rootKey: Certificate.PrivateKey, now: Date,
        validity: ValidityDuration = CertificateProfile.intermediate.defaultValidity
    ) throws -> Certificate {
        try validate(name: name)
        let (dns, uriHosts) = try constraints.validated()
        let notBefore = now.addingTimeInterval(-CAFactory.backdate.timeInterval)
        let subject = try DistinguishedName {
            OrganizationName(name)
            CommonName("\(name) Issuing CA\(suffix(generation))")
        }
        var extensions = try Certificate.Extensions {
            Critical(BasicConstraints.isCertificateAuthority(maxPathLength: 0))
            Critical(KeyUsage(digitalSignature: true, keyCertSign: true, cRLSign: true))
            SubjectKeyIdentifier(hash: key.publicKey)
            AuthorityKeyIdentifier(keyIdentifier: SubjectKeyIdentifier(hash: root.publicKey).keyIdentifier)
        }
        if !dns.isEmpty || !uriHosts.isEmpty {
            try extensions.append(
                Certificate.Extension(
                    NameConstraints(permittedDNSDomains: dns, permittedURIDomains: uriHosts),
                    critical: true
                )
            )
        }
        return try Certificate(
            version: .v3,
            serialNumber: IssuingCA.randomSerialNumber(),
            publicKey: key.publicKey,
            notValidBefore: notBefore,
            notValidAfter: min(now.addingTimeInterval(validity.timeInterval), root.notValidAfter),
            issuer: root.subject,
            subject: subject,
            signatureAlgorithm: rootKey.preferredSignatureAlgorithm,
            extensions: extensions,
            issuerPrivateKey: rootKey
        )
    }

    /// A cross-certificate: `subjectRoot`'s name and key, certified by `issuer` (another root). A relying party that
    /// still trusts only `issuer` reaches chains under `subjectRoot` through it. Valid no longer than either root.
    public static func crossCertify(
        _ subjectRoot: Certificate, issuer: Certificate, issuerKey: Certificate.PrivateKey, now: Date
    ) throws -> Certificate {
        let extensions = try Certificate.Extensions {
            Critical(BasicConstraints.isCertificateAuthority(maxPathLength: nil))
            Critical(KeyUsage(keyCertSign: true, cRLSign: true))
            SubjectKeyIdentifier(hash: subjectRoot.publicKey)
            AuthorityKeyIdentifier(keyIdentifier: SubjectKeyIdentifier(hash: issuer.publicKey).keyIdentifier)
        }
        return try Certificate(
            version: .v3,
            serialNumber: IssuingCA.randomSerialNumber(),
            publicKey: subjectRoot.publicKey,
            notValidBefore: now.addingTimeInterval(-CAFactory.backdate.timeInterval),
            notValidAfter: min(subjectRoot.notValidAfter, issuer.notValidAfter),
            issuer: issuer.subject,
            subject: subjectRoot.subject,
            signatureAlgorithm: issuerKey.preferredSignatureAlgorithm,
            extensions: extensions,
            issuerPrivateKey: issuerKey
        )
    }
}
