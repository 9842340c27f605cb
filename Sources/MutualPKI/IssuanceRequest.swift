import Foundation
import SwiftASN1
import X509

/// What someone asks the CA to certify: a public key, a profile and names. Nothing here is trusted yet: the
/// ``IssuingCA`` validates every field against the profile and its own constraints before signing.
public struct IssuanceRequest: Sendable, Hashable {
    public var profile: CertificateProfile
    public var publicKey: Certificate.PublicKey
    public var commonName: String?
    public var dnsNames: [String]
    public var ipAddresses: [String]
    public var uris: [String]
    /// Requested lifetime; the profile default when nil. Capped by the CA's maximum and the issuer's notAfter.
    public var validity: ValidityDuration?
    /// How far notBefore is set before now; nil: the CA policy's (60 s). Only the authority sets it (its own TLS
    /// certificate is back-dated a day, so clients whose clocks are behind can still verify it); never from a CSR.
    public var backdate: ValidityDuration?
    /// Notes on what the request asked for that the profile dropped (for the audit trail).
    public var droppedRequests: [String]

    public init(
        profile: CertificateProfile,
        publicKey: Certificate.PublicKey,
        commonName: String? = nil,
        dnsNames: [String] = [],
        ipAddresses: [String] = [],
        uris: [String] = [],
        validity: ValidityDuration? = nil
    ) {
        self.profile = profile
        self.publicKey = publicKey
        self.commonName = commonName
        self.dnsNames = dnsNames
        self.ipAddresses = ipAddresses
        self.uris = uris
        self.validity = validity
        self.droppedRequests = []
    }

    /// Builds a request from a CSR whose signature has already been verified (see ``CSRDecoder``).
    ///
    /// Only the subject common name and the subjectAltName extension are taken from the CSR. Every other requested
    /// extension (basicConstraints cA=true, keyUsage keyCertSign, EKUs, ...) is dropped and noted in
    /// ``droppedRequests``: the profile decides those.
    public init(verifiedCSR csr: VerifiedCSR, profile: CertificateProfile, validity: ValidityDuration?) throws {
        self.init(profile: profile, publicKey: csr.request.publicKey, validity: validity)
        let request = csr.request
        var commonNames: [String] = []
        for rdn in request.subject {
            for attribute in rdn {
                if attribute.type == .RDNAttributeType.commonName {
                    commonNames.append(String(describing: attribute.value))
                } else {
                    droppedRequests.append("subject attribute \(attribute.type)")
                }
            }
        }
        guard commonNames.count <= 1 else {
            throw PKIError(.profileViolation, "CSR subject has \(commonNames.count) common names; at most one is allowed")
        }
        commonName = commonNames.first

        let requested: Certificate.Extensions
        do {
            requested = try request.attributes.extensionRequest?.extensions ?? Certificate.Extensions()
        } catch {
            throw PKIError(.malformedInput, "CSR extension request is malformed (\(error))")
        }
        for ext in requested {
            if ext.oid == .X509ExtensionID.subjectAlternativeName {
                let sans: SubjectAlternativeNames
                do {
                    sans = try SubjectAlternativeNames(ext)
                } catch {
                    throw PKIError(.malformedInput, "CSR subjectAltName is malformed (\(error))")
                }
                for name in sans {
                    switch name {
                    case .dnsName(let dns): dnsNames.append(dns)
                    case .ipAddress(let octets): ipAddresses.append(Names.ipAddressString(Array(octets.bytes)))
                    case .uniformResourceIdentifier(let uri): uris.append(uri)
                    default:
                        throw PKIError(.profileViolation, "CSR asks for a SAN of a type Mutual does not issue: \(name)")
                    }
                }
            } else if ext.oid == .X509ExtensionID.basicConstraints, let bc = try? BasicConstraints(ext),
                case .isCertificateAuthority = bc
            {
                droppedRequests.append("basicConstraints cA=true (leaf issued instead)")
            } else {
                droppedRequests.append("extension \(ext.oid)")
            }
        }
    }
}

/// A CSR whose self-signature (proof of possession of the private key) has been checked. Only ``CSRDecoder`` makes
/// one, so holding a `VerifiedCSR` means the check happened.
public struct VerifiedCSR: Sendable, Hashable {
    public let request: CertificateSigningRequest
    fileprivate init(request: CertificateSigningRequest) { self.request = request }
}

/// Decodes CSRs in PEM or DER and verifies their signatures.
public enum CSRDecoder {
    /// Parses a CSR given as PEM text or raw DER, refusing input over 64 KiB, and verifies its signature.
    public static func decode(_ bytes: [UInt8]) throws -> VerifiedCSR {
        guard bytes.count <= PEMBundle.maximumInputSize else {
            throw PKIError(.inputTooLarge, "CSR is \(bytes.count) bytes; the limit is \(PEMBundle.maximumInputSize)")
        }
        guard !bytes.isEmpty else { throw PKIError(.malformedInput, "CSR is empty") }
        let csr: CertificateSigningRequest
        let looksLikePEM = PEMCodec.find(Array("-----BEGIN".utf8), in: bytes, from: 0) != nil
        if looksLikePEM {
            guard let der = PEMCodec.decode(bytes, label: "CERTIFICATE REQUEST") ?? PEMCodec.decode(bytes, label: "NEW CERTIFICATE REQUEST") else {
                throw PKIError(.malformedInput, "expected one PEM CERTIFICATE REQUEST block with valid base64")
            }
            do {
                csr = try CertificateSigningRequest(derEncoded: der)
            } catch {
                try refuseWeakRSA(der)
                throw PKIError(.malformedInput, "CSR is not a valid PKCS#10 request (\(error))")
            }
        } else {
            do {
                csr = try CertificateSigningRequest(derEncoded: bytes)
            } catch {
                try refuseWeakRSA(bytes)
                throw PKIError(.malformedInput, "CSR is neither PEM nor a valid DER PKCS#10 request (\(error))")
            }
        }
        guard csr.publicKey.isValidSignature(csr.signature, for: csr) else {
            throw PKIError(.badSignature, "CSR signature does not verify: the request was not signed by the key it contains")
        }
        return VerifiedCSR(request: csr)
    }

    /// Decodes a CSR from a PEM string (convenience for the HTTP layer).
    /// swift-crypto refuses RSA keys under 2048 bits while parsing, so such a CSR would be reported as malformed. It is
    /// well-formed with a key too weak to certify: say so with the same code as every other refused key. Reads only
    /// the path CSR → subjectPKInfo → RSAPublicKey's modulus; anything else returns and the caller reports malformed.
    static func refuseWeakRSA(_ der: [UInt8]) throws {
        guard let bits = try? rsaModulusBits(der), bits < 2048 else { return }
        throw PKIError(.unsupportedKey, "the CSR's key is RSA-\(bits): RSA keys need at least 2048 bits (or use p256, p384 or ed25519)")
    }

    static func rsaModulusBits(_ der: [UInt8]) throws -> Int? {
        let rsaEncryption: ASN1ObjectIdentifier = [1, 2, 840, 113549, 1, 1, 1]
        guard case .constructed(let request) = try DER.parse(der).content, let info = request.first(where: { _ in true }),
              case .constructed(let infoFields) = info.content else { return nil }
        let fields = Array(infoFields)
        guard fields.count >= 3, case .constructed(let spki) = fields[2].content else { return nil }
        let spkiFields = Array(spki)
        guard spkiFields.count == 2, case .constructed(let algorithm) = spkiFields[0].content,
              let oidNode = algorithm.first(where: { _ in true }), try ASN1ObjectIdentifier(derEncoded: oidNode) == rsaEncryption else { return nil }
        let bitString = try ASN1BitString(derEncoded: spkiFields[1])
        guard case .constructed(let key) = try DER.parse(Array(bitString.bytes)).content, let modulusNode = key.first(where: { _ in true }),
              case .primitive(let modulus) = modulusNode.content else { return nil }
        let significant = modulus.drop { $0 == 0 }
        guard let top = significant.first else { return 0 }
        return (significant.count - 1) * 8 + (8 - top.leadingZeroBitCount)
    }

    public static func decode(pem: String) throws -> VerifiedCSR {
        try decode(Array(pem.utf8))
    }
}

extension IssuanceRequest {
    /// A request's contents without its key: what an ML-DSA key (which `Certificate.PublicKey` cannot hold) is
    /// certified with.
    public struct Contents: Sendable, Hashable {
        public var profile: CertificateProfile
        public var commonName: String?
        public var dnsNames: [String]
        public var ipAddresses: [String]
        public var uris: [String]
        public var validity: ValidityDuration?
        public var backdate: ValidityDuration?
        public var droppedRequests: [String] = []

        public init(
            profile: CertificateProfile, commonName: String? = nil, dnsNames: [String] = [], ipAddresses: [String] = [],
            uris: [String] = [], validity: ValidityDuration? = nil
        ) {
            self.profile = profile
            self.commonName = commonName
            self.dnsNames = dnsNames
            self.ipAddresses = ipAddresses
            self.uris = uris
            self.validity = validity
        }
    }
}
