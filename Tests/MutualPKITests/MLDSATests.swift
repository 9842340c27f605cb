import Crypto
import Foundation
import MutualPKI
import SwiftASN1
import Testing
import X509

/// The ML-DSA (RFC 9881) certificate foundation: build, parse and check hierarchies with hand-written DER. Set
/// MUTUAL_PQ_OUT to a directory to keep the DER files for an independent checker (python `cryptography` 50).
@Suite("ML-DSA certificates (RFC 9881): built, parsed and verified without swift-certificates' closed enums")
struct MLDSATests {
    static func name(_ cn: String) throws -> DistinguishedName { try DistinguishedName { CommonName(cn); OrganizationName("PQ Test") } }

    static func extensions(ca: Bool, subjectKey: [UInt8], authorityKey: [UInt8]) throws -> [Certificate.Extension] {
        var list = [
            try Certificate.Extension(ca ? BasicConstraints.isCertificateAuthority(maxPathLength: nil) : .notCertificateAuthority, critical: true),
            // RFC 9881: digitalSignature, keyCertSign and cRLSign only; never keyEncipherment.
            try Certificate.Extension(ca ? KeyUsage(keyCertSign: true, cRLSign: true) : KeyUsage(digitalSignature: true), critical: true),
            try Certificate.Extension(SubjectKeyIdentifier(keyIdentifier: Array(Insecure.SHA1.hash(data: subjectKey))[...]), critical: false),
            try Certificate.Extension(AuthorityKeyIdentifier(keyIdentifier: Array(Insecure.SHA1.hash(data: authorityKey))[...]), critical: false),
        ]
        if !ca {
            list.append(try Certificate.Extension(ExtendedKeyUsage([.serverAuth, .clientAuth]), critical: false))
            list.append(try Certificate.Extension(SubjectAlternativeNames([.dnsName("pq.example.org"), .uniformResourceIdentifier("spiffe://example.org/pq")]), critical: false))
        }
        return list
    }

    @Test("an ML-DSA-65 root over an ML-DSA-87 intermediate over a P-256 and an ML-DSA-65 leaf: each signature checks, names chain")
    func hierarchy() throws {
        let now = Date(timeIntervalSince1970: 1_800_000_000)
        let rootKey = try MLDSASigningKey(generating: .mlDSA65)
        let intermediateKey = try MLDSASigningKey(generating: .mlDSA87)
        let root = try MLDSACertificate.build(
            serialNumber: [0x01, 0x02], issuer: try Self.name("PQ Root"), subject: try Self.name("PQ Root"), notBefore: now,
            notAfter: now.addingTimeInterval(86_400 * 3650), subjectPublicKeyInfo: try rootKey.subjectPublicKeyInfo,
            extensions: try Self.extensions(ca: true, subjectKey: rootKey.publicKey, authorityKey: rootKey.publicKey), issuerKey: rootKey
        )
        let intermediate = try MLDSACertificate.build(
            serialNumber: [0x03], issuer: root.subject, subject: try Self.name("PQ Issuing"), notBefore: now,
            notAfter: now.addingTimeInterval(86_400 * 365 * 30), subjectPublicKeyInfo: try intermediateKey.subjectPublicKeyInfo,
            extensions: try Self.extensions(ca: true, subjectKey: intermediateKey.publicKey, authorityKey: rootKey.publicKey), issuerKey: rootKey
        )
        let classicalKey = P256.Signing.PrivateKey()
        let classicalSPKI = classicalKey.publicKey.derRepresentation
        let leafKey = try MLDSASigningKey(generating: .mlDSA65)
        func leaf(serial: UInt8, spki: [UInt8], rawKey: [UInt8]) throws -> MLDSACertificate {
            try MLDSACertificate.build(
                serialNumber: [serial], issuer: intermediate.subject, subject: try Self.name("pq.example.org"), notBefore: now,
                notAfter: now.addingTimeInterval(86_400), subjectPublicKeyInfo: spki,
                extensions: try Self.extensions(ca: false, subjectKey: rawKey, authorityKey: intermediateKey.publicKey), issuerKey: intermediateKey
            )
        }
        let leaves = [
            try leaf(serial: 0x04, spki: Array(classicalSPKI), rawKey: Array(classicalKey.publicKey.x963Representation)),
            try leaf(serial: 0x05, spki: try leafKey.subjectPublicKeyInfo, rawKey: leafKey.publicKey),
        ]
        #expect(root.isIssued(by: root))
        #expect(intermediate.isIssued(by: root))
        #expect(!intermediate.isIssued(by: intermediate))
        for leaf in leaves {
            #expect(leaf.isIssued(by: intermediate))
            #expect(!leaf.isIssued(by: root))
            #expect(leaf.signatureAlgorithm == MLDSAVariant.mlDSA87.oid)
            #expect(leaf.signature.count == MLDSAVariant.mlDSA87.signatureSize)
            #expect(abs(leaf.notAfter.timeIntervalSince(now) - 86_400) < 1)
        }
        #expect(root.subjectKeyVariant == MLDSAVariant.mlDSA65 && root.subjectPublicKey == rootKey.publicKey)
        #expect(leaves[0].subjectKeyVariant == nil)
        #expect(leaves[1].subjectKeyVariant == MLDSAVariant.mlDSA65)
        // swift-certificates reads the classical parts it knows: names and extensions round-trip.
        #expect(leaves[0].extensions.count == 6)
        #expect(try SubjectAlternativeNames(leaves[0].extensions[5]).contains(.dnsName("pq.example.org")))

        // Any flipped bit in what was signed breaks the signature.
        var tampered = leaves[1].der
        let index = tampered.count / 3
        tampered[index] ^= 0x01
        if let parsed = try? MLDSACertificate(derEncoded: tampered) { #expect(!parsed.isIssued(by: intermediate)) }

        // A CRL signed by the ML-DSA-87 intermediate, revoking the P-256 leaf.
        let crl = try RevocationListBuilder.build(
            mldsaIssuer: intermediate, key: intermediateKey, number: 7, thisUpdate: now, nextUpdate: now.addingTimeInterval(86_400),
            entries: [.init(serialNumber: Certificate.SerialNumber(bytes: [0x04]), revocationDate: now, reason: .keyCompromise)]
        )
        let (crlTBS, crlAlgorithm, crlSignature) = try DER.sequence(try DER.parse(crl), identifier: .sequence) { nodes in
            guard let tbs = nodes.next(), let algorithmNode = nodes.next() else { throw PKIError(.malformedInput, "short CRL") }
            let algorithm = try DER.sequence(algorithmNode, identifier: .sequence) { try ASN1ObjectIdentifier(derEncoded: &$0) }
            return (Array(tbs.encodedBytes), algorithm, Array(try ASN1BitString(derEncoded: &nodes).bytes))
        }
        #expect(crlAlgorithm == MLDSAVariant.mlDSA87.oid)
        #expect(MLDSAVariant.mlDSA87.isValidSignature(crlSignature, for: crlTBS, publicKey: intermediateKey.publicKey))
        #expect(!MLDSAVariant.mlDSA87.isValidSignature(crlSignature, for: crlTBS, publicKey: rootKey.publicKey))
        #expect(throws: PKIError.self) {
            _ = try RevocationListBuilder.build(mldsaIssuer: intermediate, key: rootKey, number: 1, thisUpdate: now, nextUpdate: now.addingTimeInterval(60), entries: [])
        }

        if let out = ProcessInfo.processInfo.environment["MUTUAL_PQ_OUT"] {
            for (file, certificate) in [("root", root), ("intermediate", intermediate), ("leaf-p256", leaves[0]), ("leaf-mldsa65", leaves[1])] {
                FileManager.default.createFile(atPath: "\(out)/\(file).der", contents: Data(certificate.der))
            }
            FileManager.default.createFile(atPath: "\(out)/intermediate.crl", contents: Data(crl))
        }
    }

    @Test("certification requests: ML-DSA-65 and -87 CSRs carry their SANs and prove possession; tampering and classical CSRs are told apart")
    func requests() throws {
        for variant in MLDSAVariant.allCases {
            let key = try MLDSASigningKey(generating: variant)
            let san = try Certificate.Extension(SubjectAlternativeNames([.dnsName("pq.example.org"), .uniformResourceIdentifier("spiffe://example.org/pq")]), critical: false)
            let request = try MLDSACertificationRequest.build(subject: try Self.name("pq.example.org"), extensions: [san], key: key)
            #expect(request.isSignatureValid)
            #expect(request.variant == variant)
            #expect(request.publicKey == key.publicKey)
            #expect(try SubjectAlternativeNames(try #require(request.requestedExtensions.first)).contains(.dnsName("pq.example.org")))
            var tampered = request.der
            tampered[tampered.count / 4] ^= 0x01
            if let parsed = try? MLDSACertificationRequest(derEncoded: tampered) { #expect(!parsed.isSignatureValid) }
            if let out = ProcessInfo.processInfo.environment["MUTUAL_PQ_OUT"] {
                FileManager.default.createFile(atPath: "\(out)/csr-\(variant.rawValue).der", contents: Data(request.der))
            }
            let bare = try MLDSACertificationRequest.build(subject: try Self.name("bare"), extensions: [], key: key)
            #expect(bare.isSignatureValid && bare.requestedExtensions.isEmpty)
        }
        let classical = try CertificateSigningRequest(
            version: .v1, subject: try Self.name("classic"), privateKey: .init(P256.Signing.PrivateKey()), attributes: .init(), signatureAlgorithm: .ecdsaWithSHA256
        )
        var serializer = DER.Serializer()
        try serializer.serialize(classical)
        do {
            _ = try MLDSACertificationRequest(derEncoded: serializer.serializedBytes)
            Issue.record("a P-256 request was read as ML-DSA")
        } catch let error as PKIError {
            #expect(error.code == .unsupportedKey)
        }
        for garbage: [UInt8] in [[], [0x30, 0x03, 0x02, 0x01, 0x00], Array(repeating: 0x41, count: 64)] {
            #expect(throws: PKIError.self) { _ = try MLDSACertificationRequest(derEncoded: garbage) }
        }
    }

    @Test("key files: PKCS#8 seed form, plain or PBES2-encrypted like every Mutual key; wrong or missing passphrases refused by code")
    func keyFiles() throws {
        for variant in MLDSAVariant.allCases {
            let key = try MLDSASigningKey(generating: variant)
            let plain = try key.pem(passphrase: nil)
            #expect(plain.hasPrefix("-----BEGIN PRIVATE KEY-----"))
            #expect(try MLDSASigningKey(pem: plain, passphrase: { nil }).publicKey == key.publicKey)
            let encrypted = try key.pem(passphrase: "correct horse")
            #expect(encrypted.hasPrefix("-----BEGIN ENCRYPTED PRIVATE KEY-----"))
            #expect(try MLDSASigningKey(pem: encrypted, passphrase: { "correct horse" }).seed == key.seed)
            for wrong in [nil, "", "wrong horse"] as [String?] {
                do {
                    _ = try MLDSASigningKey(pem: encrypted, passphrase: { wrong })
                    Issue.record("opened with \(wrong ?? "no passphrase")")
                } catch let error as PKIError {
                    #expect(error.code == .wrongPassphrase)
                }
            }
            if let out = ProcessInfo.processInfo.environment["MUTUAL_PQ_OUT"] {
                FileManager.default.createFile(atPath: "\(out)/key-\(variant.rawValue).pem", contents: Data(plain.utf8))
                FileManager.default.createFile(atPath: "\(out)/key-\(variant.rawValue)-encrypted.pem", contents: Data(encrypted.utf8))
                FileManager.default.createFile(atPath: "\(out)/key-\(variant.rawValue).pub", contents: Data(key.publicKey))
            }
        }
        let classical = try KeyFile.pem(for: .init(P256.Signing.PrivateKey()), passphrase: nil)
        do {
            _ = try MLDSASigningKey(pem: classical, passphrase: { nil })
            Issue.record("a P-256 key was read as ML-DSA")
        } catch let error as PKIError {
            #expect(error.code == .unsupportedKey)
        }
        for garbage in ["", "not pem", "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n", "-----BEGIN CERTIFICATE-----\nMAA=\n-----END CERTIFICATE-----\n"] {
            #expect(throws: PKIError.self) { _ = try MLDSASigningKey(pem: garbage, passphrase: { nil }) }
        }
    }

    @Test("keys: seeds restore the same key; signatures verify only under their own key, variant and message")
    func keys() throws {
        for variant in MLDSAVariant.allCases {
            let key = try MLDSASigningKey(generating: variant)
            let again = try MLDSASigningKey(variant: variant, seed: key.seed)
            #expect(again.publicKey == key.publicKey)
            #expect(key.publicKey.count == variant.publicKeySize)
            let signature = try key.sign(Array("hello".utf8))
            #expect(variant.isValidSignature(signature, for: Array("hello".utf8), publicKey: key.publicKey))
            #expect(!variant.isValidSignature(signature, for: Array("hellp".utf8), publicKey: key.publicKey))
            #expect(!variant.isValidSignature(signature, for: Array("hello".utf8), publicKey: try MLDSASigningKey(generating: variant).publicKey))
            #expect(!variant.isValidSignature(Array(signature.dropLast()), for: Array("hello".utf8), publicKey: key.publicKey))
            #expect(throws: PKIError.self) { _ = try MLDSASigningKey(variant: variant, seed: Array(key.seed.dropLast())) }
        }
        #expect(MLDSAVariant(oid: [2, 16, 840, 1, 101, 3, 4, 3, 18]) == .mlDSA65)
        #expect(MLDSAVariant(oid: [2, 16, 840, 1, 101, 3, 4, 3, 17]) == nil)  // ML-DSA-44: not in swift-crypto
    }

    @Test("garbage, truncated and oversized certificates are refused as malformed input, never a crash")
    func hostileInput() throws {
        let key = try MLDSASigningKey(generating: .mlDSA65)
        let now = Date(timeIntervalSince1970: 1_800_000_000)
        let good = try MLDSACertificate.build(
            serialNumber: [0x01], issuer: try Self.name("X"), subject: try Self.name("X"), notBefore: now, notAfter: now.addingTimeInterval(60),
            subjectPublicKeyInfo: try key.subjectPublicKeyInfo, extensions: [], issuerKey: key
        )
        #expect(good.isIssued(by: good))
        var inputs: [[UInt8]] = [[], [0x30], [0x30, 0x00], Array(repeating: 0xff, count: 100), Array(good.der.prefix(200)), Array(good.der.dropLast())]
        inputs.append(Array(repeating: 0x30, count: 70_000))
        for input in inputs {
            #expect(throws: PKIError.self) { _ = try MLDSACertificate(derEncoded: input) }
        }
        #expect(throws: PKIError.self) {
            _ = try MLDSACertificate.build(serialNumber: [0x80], issuer: try Self.name("X"), subject: try Self.name("X"), notBefore: now,
                                           notAfter: now.addingTimeInterval(60), subjectPublicKeyInfo: try key.subjectPublicKeyInfo, extensions: [], issuerKey: key)
        }
        #expect(throws: PKIError.self) {
            _ = try MLDSACertificate.build(serialNumber: [0x01], issuer: try Self.name("X"), subject: try Self.name("X"), notBefore: now,
                                           notAfter: now, subjectPublicKeyInfo: try key.subjectPublicKeyInfo, extensions: [], issuerKey: key)
        }
    }
}
