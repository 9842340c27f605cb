import Crypto
import Foundation
import MutualPKI
import SwiftASN1
import Testing
import X509

@Suite("ML-DSA hierarchy: issuance under the classical CA's rules, and chain verification with RFC 9881 key usage")
struct MLDSAAuthorityTests {
    static let now = Date(timeIntervalSince1970: 1_800_000_000)

    static func issuing(_ variant: MLDSAVariant = .mlDSA65, constraints: CAFactory.Constraints = .init()) throws -> (MLDSAHierarchy, MLDSAIssuingCA) {
        let hierarchy = try MLDSAHierarchy.make(name: "Acme", variant: variant, constraints: constraints, now: now)
        var policy = IssuancePolicy()
        policy.permittedURIPrefixes = constraints.permittedURIPrefixes
        let ca = try MLDSAIssuingCA(certificate: hierarchy.intermediate, key: hierarchy.intermediateKey, root: hierarchy.root, policy: policy)
        return (hierarchy, ca)
    }

    static func publicKey(_ variant: MLDSAVariant = .mlDSA65) throws -> (MLDSASigningKey, MLDSAPublicKey) {
        let key = try MLDSASigningKey(generating: variant)
        return (key, try MLDSAPublicKey(variant: variant, rawRepresentation: key.publicKey))
    }

    static func verifier(_ h: MLDSAHierarchy, at time: Date = now, eku: ExtendedKeyUsage.Usage? = nil, name: ChainVerifier.PeerName? = nil) -> MLDSAChainVerifier {
        MLDSAChainVerifier(options: .init(roots: [h.root], intermediates: [h.intermediate], validationTime: time, requiredEKU: eku, peerName: name))
    }

    static func code(_ outcome: MLDSAChainVerifier.Outcome) -> ChainVerifier.RejectionCode? {
        if case .rejected(_, let code) = outcome { return code }
        return nil
    }

    @Test("a workload and a server certificate: RFC 9881 extensions, verified to the root with EKU and peer name")
    func issueAndVerify() throws {
        let (h, ca) = try Self.issuing()
        let (_, key) = try Self.publicKey()
        let workload = try ca.issue(.init(profile: .workload, uris: ["spiffe://example.org/ns/prod/api"]), publicKey: key, now: Self.now)
        let extensions = try Certificate.Extensions(workload.extensions)
        #expect(try extensions.keyUsage == KeyUsage(digitalSignature: true))
        #expect(try extensions.basicConstraints == .notCertificateAuthority)
        #expect(workload.subjectKeyVariant == .mlDSA65)
        #expect(workload.signatureAlgorithm == MLDSAVariant.mlDSA65.oid)
        #expect(workload.notAfter == Self.now.addingTimeInterval(CertificateProfile.workload.defaultValidity.timeInterval))
        guard case .accepted(let chain) = Self.verifier(h, eku: .clientAuth, name: .uri("spiffe://example.org/ns/prod/api")).verify(workload) else {
            Issue.record("the workload chain was refused")
            return
        }
        #expect(chain == [workload, h.intermediate, h.root])

        let server = try ca.issue(.init(profile: .server, dnsNames: ["API.example.org"]), publicKey: key, now: Self.now)
        guard case .accepted = Self.verifier(h, eku: .serverAuth, name: .dns("api.example.org")).verify(server) else {
            Issue.record("the server chain was refused")
            return
        }
        #expect(Self.code(Self.verifier(h, eku: .serverAuth, name: .dns("other.example.org")).verify(server)) == .invalid)
        #expect(Self.code(Self.verifier(h, eku: .clientAuth).verify(server)) == .invalid)
        // The CA certificates carry keyCertSign and cRLSign, never encipherment (RFC 9881).
        let intermediateUsage = try Certificate.Extensions(h.intermediate.extensions).keyUsage
        #expect(intermediateUsage == KeyUsage(digitalSignature: true, keyCertSign: true, cRLSign: true))
        #expect(h.root.isIssued(by: h.root) && h.intermediate.isIssued(by: h.root))
    }

    @Test("issuance keeps every classical rule, and refuses keys weaker than the hierarchy")
    func issuanceRules() throws {
        let (_, ca) = try Self.issuing(constraints: .init(permittedDNS: ["example.org"], permittedURIPrefixes: ["spiffe://example.org/ns/prod"]))
        let (_, key65) = try Self.publicKey()
        func code(_ contents: IssuanceRequest.Contents, _ key: MLDSAPublicKey = key65, ca: MLDSAIssuingCA = ca) -> String? {
            do {
                _ = try ca.issue(contents, publicKey: key, now: Self.now)
                return nil
            } catch let error as PKIError { return error.code.name } catch { return "\(error)" }
        }
        #expect(code(.init(profile: .server, dnsNames: ["evil.com"])) == "name-not-permitted")
        #expect(code(.init(profile: .workload, uris: ["spiffe://example.org/ns/dev/x"])) == "name-not-permitted")
        #expect(code(.init(profile: .workload, uris: ["https://example.org/x"])) == "profile-violation")
        #expect(code(.init(profile: .server, dnsNames: ["a.example.org"], validity: .days(4000))) == "validity-too-long")
        #expect(code(.init(profile: .intermediate, commonName: "sub")) == "profile-violation")
        #expect(code(.init(profile: .server, dnsNames: ["bad name.example.org"])) == "invalid-name")
        #expect(code(.init(profile: .server, dnsNames: ["a.example.org"])) == nil)
        // An ML-DSA-87 hierarchy certifies only ML-DSA-87 keys; an ML-DSA-65 one also takes the stronger ML-DSA-87.
        let (_, ca87) = try Self.issuing(.mlDSA87)
        #expect(code(.init(profile: .client, commonName: "c"), key65, ca: ca87) == "unsupported-key")
        let (_, key87) = try Self.publicKey(.mlDSA87)
        #expect(code(.init(profile: .client, commonName: "c"), key87, ca: ca87) == nil)
        #expect(code(.init(profile: .client, commonName: "c"), key87) == nil)
        // A public key of the wrong size for its variant is not a key.
        #expect(throws: PKIError.self) { try MLDSAPublicKey(variant: .mlDSA65, rawRepresentation: [UInt8](repeating: 1, count: 100)) }
        // A CA whose key does not match its certificate, or whose certificate the root did not sign, is refused.
        let (other, _) = try Self.issuing()
        #expect(throws: PKIError.self) { try MLDSAIssuingCA(certificate: other.intermediate, key: ca.key, root: other.root, policy: .init()) }
        #expect(throws: PKIError.self) { try MLDSAIssuingCA(certificate: other.intermediate, key: other.intermediateKey, root: ca.root, policy: .init()) }
    }

    @Test("hostile chains: wrong root, time, tampered signature, encipherment key usage, CA leaves, non-CA issuers, constraints")
    func hostileChains() throws {
        let (h, ca) = try Self.issuing(constraints: .init(permittedDNS: ["example.org"]))
        let (leafKey, key) = try Self.publicKey()
        let leaf = try ca.issue(.init(profile: .server, dnsNames: ["a.example.org"]), publicKey: key, now: Self.now)
        #expect(Self.code(Self.verifier(h).verify(leaf)) == nil)

        let (stranger, _) = try Self.issuing()
        #expect(Self.code(MLDSAChainVerifier(options: .init(roots: [stranger.root], intermediates: [h.intermediate], validationTime: Self.now)).verify(leaf)) == .unknownIssuer)
        #expect(Self.code(MLDSAChainVerifier(options: .init(roots: [h.root], validationTime: Self.now)).verify(leaf)) == .unknownIssuer)
        #expect(Self.code(Self.verifier(h, at: leaf.notAfter.addingTimeInterval(1)).verify(leaf)) == .expired)
        #expect(Self.code(Self.verifier(h, at: leaf.notBefore.addingTimeInterval(-1)).verify(leaf)) == .notYetValid)

        var tampered = leaf.der
        tampered[tampered.count - 10] ^= 0x01
        #expect(Self.code(Self.verifier(h).verify(try MLDSACertificate(derEncoded: tampered))) == .unknownIssuer)

        func forged(_ extensions: [Certificate.Extension], names: [GeneralName] = [.dnsName("a.example.org")], issuer: MLDSACertificate? = nil, issuerKey: MLDSASigningKey? = nil) throws -> MLDSACertificate {
            try MLDSACertificate.build(
                serialNumber: [0x42], issuer: (issuer ?? h.intermediate).subject, subject: try DistinguishedName { CommonName("forged") },
                notBefore: Self.now, notAfter: Self.now.addingTimeInterval(3600), subjectPublicKeyInfo: try leafKey.subjectPublicKeyInfo,
                extensions: extensions + [try .init(SubjectAlternativeNames(names), critical: false)], issuerKey: issuerKey ?? h.intermediateKey
            )
        }
        let endEntity = try Certificate.Extension(BasicConstraints.notCertificateAuthority, critical: true)
        // RFC 9881: an ML-DSA key never enciphers.
        let encipher = try forged([endEntity, try .init(KeyUsage(digitalSignature: true, keyEncipherment: true), critical: true)])
        #expect(Self.code(Self.verifier(h).verify(encipher)) == .invalid)
        #expect(Self.code(Self.verifier(h).verify(try forged([endEntity, try .init(KeyUsage(keyAgreement: true), critical: true)]))) == .invalid)
        #expect(Self.code(Self.verifier(h).verify(try forged([endEntity, try .init(KeyUsage(digitalSignature: true), critical: true)]))) == nil)
        // A CA certificate presented as a leaf; an unknown critical extension; a name outside the constraints.
        #expect(Self.code(Self.verifier(h).verify(try forged([try .init(BasicConstraints.isCertificateAuthority(maxPathLength: nil), critical: true)]))) == .invalid)
        let unknownCritical = Certificate.Extension(oid: [1, 3, 6, 1, 4, 1, 99999, 1], critical: true, value: [0x05, 0x00])
        #expect(Self.code(Self.verifier(h).verify(try forged([endEntity, unknownCritical]))) == .invalid)
        #expect(Self.code(Self.verifier(h).verify(try forged([endEntity], names: [.dnsName("evil.com")]))) == .invalid)
        // A leaf used as an issuer: signed by the leaf's key, chaining by name, refused because it is not a CA.
        let underLeaf = try MLDSACertificate.build(
            serialNumber: [0x43], issuer: leaf.subject, subject: try DistinguishedName { CommonName("below a leaf") },
            notBefore: Self.now, notAfter: Self.now.addingTimeInterval(3600), subjectPublicKeyInfo: try leafKey.subjectPublicKeyInfo,
            extensions: [endEntity], issuerKey: leafKey
        )
        let viaLeaf = MLDSAChainVerifier(options: .init(roots: [h.root], intermediates: [h.intermediate, leaf], validationTime: Self.now))
        #expect(Self.code(viaLeaf.verify(underLeaf)) == .invalid)
        // Path length: the intermediate allows no CA below it.
        let subCAKey = try MLDSASigningKey(generating: .mlDSA65)
        let subCA = try MLDSACertificate.build(
            serialNumber: [0x44], issuer: h.intermediate.subject, subject: try DistinguishedName { CommonName("sub CA") },
            notBefore: Self.now, notAfter: Self.now.addingTimeInterval(7200), subjectPublicKeyInfo: try subCAKey.subjectPublicKeyInfo,
            extensions: [try .init(BasicConstraints.isCertificateAuthority(maxPathLength: nil), critical: true), try .init(KeyUsage(keyCertSign: true), critical: true)],
            issuerKey: h.intermediateKey
        )
        let belowSub = try forged([endEntity], issuer: subCA, issuerKey: subCAKey)
        let deep = MLDSAChainVerifier(options: .init(roots: [h.root], intermediates: [h.intermediate, subCA], validationTime: Self.now))
        #expect(Self.code(deep.verify(belowSub)) == .invalid)
    }

    @Test("PEM: an ML-DSA chain written block after block reads back as the same certificates, mixed with classical ones")
    func pemChain() throws {
        let (h, _) = try Self.issuing()
        let classical = try CAFactory.makeHierarchy(name: "Classic", keyType: .p256, now: Self.now)
        let text = h.intermediate.pem + h.root.pem + (try PEMBundle.pem([classical.root]))
        #expect(h.root.pem.hasSuffix("-----END CERTIFICATE-----\n"))
        let read = try PEMBundle.anyCertificates(fromBytes: Array(text.utf8))
        #expect(read.count == 3)
        #expect(read[0].mldsa == h.intermediate && read[1].mldsa == h.root && read[2].classical == classical.root)
        #expect(read.map(\.isPostQuantum) == [true, true, false])
        #expect(read[0].keyAlgorithm == "ML-DSA-65" && read[2].keyAlgorithm == "P-256")
        #expect(try MLDSACertificate(pem: Array(h.root.pem.utf8)) == h.root)
        // Garbage between blocks, a truncated block, or no block at all: refused as malformed input, never a crash.
        for bad in ["-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n", String(text.prefix(text.count / 2)), "hello"] {
            #expect(throws: PKIError.self) { _ = try PEMBundle.anyCertificates(fromBytes: Array(bad.utf8)) }
        }
    }

    @Test("a classical link verifies through swift-crypto: a P-256 hierarchy's leaf read as MLDSACertificates")
    func classicalLink() throws {
        let hierarchy = try CAFactory.makeHierarchy(name: "Classic", keyType: .p256, now: Self.now)
        let ca = try IssuingCA(certificate: hierarchy.intermediate, privateKey: hierarchy.intermediateKey, root: hierarchy.root, policy: .init())
        let leaf = try ca.issue(.init(profile: .server, publicKey: Certificate.PrivateKey(P256.Signing.PrivateKey()).publicKey, dnsNames: ["c.example.org"]), now: Self.now)
        let root = try MLDSACertificate(derEncoded: try hierarchy.root.derBytes)
        let intermediate = try MLDSACertificate(derEncoded: try hierarchy.intermediate.derBytes)
        let parsed = try MLDSACertificate(derEncoded: try leaf.derBytes)
        let verifier = MLDSAChainVerifier(options: .init(roots: [root], intermediates: [intermediate], validationTime: Self.now, requiredEKU: .serverAuth, peerName: .dns("c.example.org")))
        guard case .accepted(let chain) = verifier.verify(parsed) else {
            Issue.record("the classical chain was refused")
            return
        }
        #expect(chain.count == 3)
        var tampered = parsed.der
        tampered[tampered.count - 5] ^= 0x01
        #expect(Self.code(verifier.verify(try MLDSACertificate(derEncoded: tampered))) == .unknownIssuer)
    }
}
