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
    public static func makeHierarchy(
        name: String,
        keyType: KeyType,
        constraints: Constraints = .init(),
        now: Date,
        rootValidity: ValidityDuration = CertificateProfile.root.defaultValidity,
        intermediateValidity: ValidityDuration = CertificateProfile.intermediate.defaultValidity
    ) throws -> Hierarchy {
        guard !name.isEmpty, name.count <= 52,
            name.unicodeScalars.allSatisfy({ !CharacterSet.controlCharacters.contains($0) })
        else {
            throw PKIError(.invalidName, "invalid CA name: must be 1 to 52 printable characters")
        }
        let (dns, uriHosts) = try constraints.validated()
        let rootKey = try keyType.generate()
        let intermediateKey = try keyType.generate()
        // Back-dated a day: a host whose clock is hours behind can still verify the hierarchy (and the authority's
        // back-dated TLS certificate under it) and learn the right time from the authority.
        let notBefore = now.addingTimeInterval(-CAFactory.backdate.timeInterval)

        let rootSubject = try DistinguishedName {
            OrganizationName(name)
            CommonName("\(name) Root CA")
        }
        let rootSKI = SubjectKeyIdentifier(hash: rootKey.publicKey)
        let rootExtensions = try Certificate.Extensions {
            Critical(BasicConstraints.isCertificateAuthority(maxPathLength: nil))
            Critical(KeyUsage(keyCertSign: true, cRLSign: true))
            rootSKI
        }
        let root = try Certificate(
            version: .v3,
            serialNumber: IssuingCA.randomSerialNumber(),
            publicKey: rootKey.publicKey,
            notValidBefore: notBefore,
            notValidAfter: now.addingTimeInterval(rootValidity.timeInterval),
            issuer: rootSubject,
            subject: rootSubject,
            signatureAlgorithm: rootKey.preferredSignatureAlgorithm,
            extensions: rootExtensions,
            issuerPrivateKey: rootKey
        )

        let intermediateSubject = try DistinguishedName {
            OrganizationName(name)
            CommonName("\(name) Issuing CA")
        }
        var intermediateExtensions = try Certificate.Extensions {
            Critical(BasicConstraints.isCertificateAuthority(maxPathLength: 0))
            Critical(KeyUsage(digitalSignature: true, keyCertSign: true, cRLSign: true))
            SubjectKeyIdentifier(hash: intermediateKey.publicKey)
            AuthorityKeyIdentifier(keyIdentifier: rootSKI.keyIdentifier)
        }
        if !dns.isEmpty || !uriHosts.isEmpty {
            try intermediateExtensions.append(
                Certificate.Extension(
                    NameConstraints(permittedDNSDomains: dns, permittedURIDomains: uriHosts),
                    critical: true
                )
            )
        }
        let intermediate = try Certificate(
            version: .v3,
            serialNumber: IssuingCA.randomSerialNumber(),
            publicKey: intermediateKey.publicKey,
            notValidBefore: notBefore,
            notValidAfter: min(now.addingTimeInterval(intermediateValidity.timeInterval), root.notValidAfter),
            issuer: rootSubject,
            subject: intermediateSubject,
            signatureAlgorithm: rootKey.preferredSignatureAlgorithm,
            extensions: intermediateExtensions,
            issuerPrivateKey: rootKey
        )
        return Hierarchy(root: root, rootKey: rootKey, intermediate: intermediate, intermediateKey: intermediateKey)
    }
}
