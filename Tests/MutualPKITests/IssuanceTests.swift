import Crypto
import Foundation
import MutualPKI
import SwiftASN1
import Testing
import TestSupport
import X509

@Suite("Issuance under profiles")
struct IssuanceTests {
    @Test("every profile gets exactly its extensions", arguments: KeyType.allCases.filter { $0 != .rsa4096 && $0 != .rsa3072 })
    func profilesDecideExtensions(keyType: KeyType) throws {
        let ca = try TestPKI.issuingCA(keyType: keyType)
        let key = try keyType.generate()

        let client = try ca.issue(.init(profile: .client, publicKey: key.publicKey, commonName: "alice"), now: TestPKI.now)
        #expect(try client.extensions.extendedKeyUsage.map(Array.init) == [.clientAuth])
        #expect(try client.extensions.keyUsage?.digitalSignature == true)
        #expect(try client.extensions.keyUsage?.keyCertSign == false)
        #expect(try client.extensions.basicConstraints == .notCertificateAuthority)

        let server = try ca.issue(
            .init(profile: .server, publicKey: key.publicKey, dnsNames: ["API.Example.org"], ipAddresses: ["10.0.0.1"]),
            now: TestPKI.now
        )
        #expect(try server.extensions.extendedKeyUsage.map(Array.init) == [.serverAuth])
        let sans = try #require(try server.extensions.subjectAlternativeNames)
        #expect(Array(sans).contains(.dnsName("api.example.org")), "DNS names are lowercased")

        let workload = try ca.issue(
            .init(profile: .workload, publicKey: key.publicKey, uris: ["spiffe://example.org/ns/prod/sa/api"]), now: TestPKI.now
        )
        let ekus = try #require(try workload.extensions.extendedKeyUsage)
        #expect(Set(ekus.map { "\($0)" }) == Set(["serverAuth", "clientAuth"]))
        #expect(workload.subject.isEmpty)
        let sanExtension = try #require(workload.extensions[oid: .X509ExtensionID.subjectAlternativeName])
        #expect(sanExtension.critical, "an empty subject requires a critical SAN (RFC 5280 4.2.1.6)")

        for certificate in [client, server, workload] {
            #expect(try certificate.issuedDER == certificate.derBytes, "the fast DER path must equal the full encoding")
            #expect(try certificate.extensions.subjectKeyIdentifier != nil)
            let aki = try #require(try certificate.extensions.authorityKeyIdentifier)
            #expect(aki.keyIdentifier == (try ca.certificate.extensions.subjectKeyIdentifier)?.keyIdentifier)
            #expect(certificate.serialNumber.bytes.count == 16)
            #expect(certificate.serialNumber.bytes.first! & 0x80 == 0, "serial is positive")
            #expect(certificate.issuer == ca.certificate.subject)
            #expect(ca.certificate.publicKey.isValidSignature(certificate.signature, for: certificate))
        }
    }

    @Test("default lifetimes are short, capped by the issuer, and the CA maximum is enforced")
    func lifetimes() throws {
        let ca = try TestPKI.issuingCA(policy: .init(maximumValidity: .days(60)))
        let key = try KeyType.p256.generate()
        let workload = try ca.issue(.init(profile: .workload, publicKey: key.publicKey, uris: ["spiffe://a.test/x"]), now: TestPKI.now)
        #expect(workload.notValidAfter == TestPKI.now.addingTimeInterval(24 * 3600))
        let client = try ca.issue(.init(profile: .client, publicKey: key.publicKey, commonName: "c"), now: TestPKI.now)
        #expect(client.notValidAfter == TestPKI.now.addingTimeInterval(30 * 86_400))

        #expect(throws: PKIError.self) {
            try ca.issue(.init(profile: .client, publicKey: key.publicKey, commonName: "c", validity: .days(61)), now: TestPKI.now)
        }
        // Near the end of the issuer's life, leaves end with it.
        let late = ca.certificate.notValidAfter.addingTimeInterval(-3600)
        let capped = try ca.issue(.init(profile: .client, publicKey: key.publicKey, commonName: "c"), now: late)
        #expect(capped.notValidAfter == ca.certificate.notValidAfter)
    }

    @Test(
        "profile rules refuse bad requests with a named reason",
        arguments: [
            (IssuanceRequestShape.serverWithoutSAN, "needs at least one DNS or IP SAN"),
            (.workloadWithoutURI, "exactly one URI SAN"),
            (.workloadWithHTTPSURI, "must be a spiffe:// ID"),
            (.workloadWithTwoURIs, "exactly one URI SAN"),
            (.clientWithNothing, "needs a common name or at least one SAN"),
            (.badDNS, "invalid DNS name"),
            (.wildcardClient, "wildcards are not allowed"),
            (.badIP, "invalid IP address"),
            (.badSPIFFE, "invalid SPIFFE ID"),
            (.serverCNNotInSAN, "must also be one of the DNS or IP SANs"),
        ]
    )
    func refusals(shape: IssuanceRequestShape, expected: String) throws {
        let ca = try TestPKI.issuingCA()
        let key = try KeyType.p256.generate()
        let error = #expect(throws: PKIError.self) { try ca.issue(shape.request(key.publicKey), now: TestPKI.now) }
        #expect(error?.reason.contains(expected) == true, "got: \(error?.reason ?? "nothing")")
    }

    @Test("names outside the issuing CA's name constraints are refused before signing")
    func nameConstraints() throws {
        let ca = try TestPKI.issuingCA(
            constraints: .init(permittedDNS: ["svc.example.org"], permittedURIPrefixes: ["spiffe://example.org/ns/prod"])
        )
        let key = try KeyType.p256.generate()
        _ = try ca.issue(.init(profile: .server, publicKey: key.publicKey, dnsNames: ["api.svc.example.org"]), now: TestPKI.now)
        _ = try ca.issue(.init(profile: .workload, publicKey: key.publicKey, uris: ["spiffe://example.org/ns/prod/sa/x"]), now: TestPKI.now)
        for request in [
            IssuanceRequest(profile: .server, publicKey: key.publicKey, dnsNames: ["evil.org"]),
            IssuanceRequest(profile: .server, publicKey: key.publicKey, dnsNames: ["svc.example.org.evil.org"]),
            IssuanceRequest(profile: .workload, publicKey: key.publicKey, uris: ["spiffe://example.org/ns/production/sa/x"]),
            IssuanceRequest(profile: .workload, publicKey: key.publicKey, uris: ["spiffe://other.org/ns/prod/sa/x"]),
            IssuanceRequest(profile: .server, publicKey: key.publicKey, ipAddresses: ["10.1.1.1"]),
        ] {
            let error = #expect(throws: PKIError.self) { try ca.issue(request, now: TestPKI.now) }
            #expect(error?.code == .nameNotPermitted)
        }
        let nc = try #require(try ca.certificate.extensions.nameConstraints)
        #expect(nc.permittedSubtrees.contains(.dnsName("svc.example.org")))
        #expect(nc.permittedSubtrees.contains(.uniformResourceIdentifier("example.org")))
    }

    @Test("init's hierarchy: root and pathlen-0 intermediate with SKI/AKI and CA key usages")
    func hierarchy() throws {
        let h = try CAFactory.makeHierarchy(name: "Acme", keyType: .p384, now: TestPKI.now)
        #expect(try h.root.extensions.basicConstraints == .isCertificateAuthority(maxPathLength: nil))
        #expect(try h.intermediate.extensions.basicConstraints == .isCertificateAuthority(maxPathLength: 0))
        #expect(try h.intermediate.extensions.keyUsage?.keyCertSign == true)
        #expect(try h.intermediate.extensions.keyUsage?.cRLSign == true)
        #expect(try h.intermediate.extensions.authorityKeyIdentifier?.keyIdentifier == h.root.extensions.subjectKeyIdentifier?.keyIdentifier)
        #expect(h.root.signatureAlgorithm == .ecdsaWithSHA384)
        #expect(h.root.publicKey.isValidSignature(h.intermediate.signature, for: h.intermediate))
        #expect(throws: PKIError.self) { try CAFactory.makeHierarchy(name: "", keyType: .p256, now: TestPKI.now) }
        #expect(throws: PKIError.self) {
            try CAFactory.makeHierarchy(name: "x", keyType: .p256, constraints: .init(permittedURIPrefixes: ["not a uri"]), now: TestPKI.now)
        }
    }
}

/// Request shapes the profiles must refuse.
enum IssuanceRequestShape: String, CaseIterable, Sendable, CustomTestStringConvertible {
    case serverWithoutSAN, workloadWithoutURI, workloadWithHTTPSURI, workloadWithTwoURIs, clientWithNothing, badDNS,
        wildcardClient, badIP, badSPIFFE, serverCNNotInSAN

    var testDescription: String { rawValue }

    func request(_ key: Certificate.PublicKey) -> IssuanceRequest {
        switch self {
        case .serverWithoutSAN: return .init(profile: .server, publicKey: key, commonName: "x")
        case .workloadWithoutURI: return .init(profile: .workload, publicKey: key, dnsNames: ["a.test"])
        case .workloadWithHTTPSURI: return .init(profile: .workload, publicKey: key, uris: ["https://a.test/x"])
        case .workloadWithTwoURIs: return .init(profile: .workload, publicKey: key, uris: ["spiffe://a.test/x", "spiffe://a.test/y"])
        case .clientWithNothing: return .init(profile: .client, publicKey: key)
        case .badDNS: return .init(profile: .server, publicKey: key, dnsNames: ["bad_name..test"])
        case .wildcardClient: return .init(profile: .client, publicKey: key, dnsNames: ["*.a.test"])
        case .badIP: return .init(profile: .server, publicKey: key, ipAddresses: ["300.1.1.1"])
        case .badSPIFFE: return .init(profile: .workload, publicKey: key, uris: ["spiffe://Example.org/../x"])
        case .serverCNNotInSAN: return .init(profile: .server, publicKey: key, commonName: "other.test", dnsNames: ["a.test"])
        }
    }
}

@Suite("One rule for a certificate's identity (inventory, proxy, verify, doctor)")
struct CertificateIdentityTests {
    func certificate(_ sans: [GeneralName], cn: String? = nil) throws -> Certificate {
        let key = try KeyType.p256.generate()
        var extensions = Certificate.Extensions()
        if !sans.isEmpty { try extensions.append(Certificate.Extension(SubjectAlternativeNames(sans), critical: false)) }
        let subject = try cn.map { cn in try DistinguishedName { CommonName(cn) } } ?? DistinguishedName()
        return try Certificate(
            version: .v3, serialNumber: .init(bytes: [1, 2, 3]), publicKey: key.publicKey, notValidBefore: TestPKI.now,
            notValidAfter: TestPKI.now.addingTimeInterval(60), issuer: subject, subject: subject,
            signatureAlgorithm: key.preferredSignatureAlgorithm, extensions: extensions, issuerPrivateKey: key
        )
    }

    @Test("a SPIFFE ID wins wherever it is; else the first SAN in order; else the CN; else nothing")
    func rule() throws {
        #expect(CertificateIdentity.of(try certificate([.dnsName("a.test"), .uniformResourceIdentifier("spiffe://t/x")], cn: "c")) == "spiffe://t/x")
        #expect(CertificateIdentity.of(try certificate([.dnsName("a.test"), .uniformResourceIdentifier("https://u")])) == "a.test")
        #expect(CertificateIdentity.of(try certificate([.ipAddress(ASN1OctetString(contentBytes: [127, 0, 0, 1])), .dnsName("b.test")])) == "127.0.0.1")
        #expect(CertificateIdentity.of(try certificate([.rfc822Name("ops@example.org")], cn: "c")) == "ops@example.org")
        #expect(CertificateIdentity.of(try certificate([], cn: "alice")) == "alice")
        #expect(CertificateIdentity.of(try certificate([])) == nil)
        #expect(CertificateIdentity.display(try certificate([])) == "serial 010203")
    }
}
