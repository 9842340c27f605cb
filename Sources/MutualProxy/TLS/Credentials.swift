import Crypto
import Foundation
import MutualPKI
import NIOSSL
import X509

/// A certificate chain and its private key, read from files and checked to belong together. The key is classical or
/// ML-DSA (RFC 9881 seed form); BoringSSL signs the handshake with either.
public struct LoadedCredentials: Sendable {
    public let chain: [AnyCertificate]
    public let nioChain: [NIOSSLCertificate]
    public let nioKey: NIOSSLPrivateKey
    public var leaf: AnyCertificate { chain[0] }

    /// The identity this certificate names: its SPIFFE ID, else first URI SAN, else first DNS SAN.
    public var identity: String? {
        guard let sans = try? leaf.extensions.subjectAlternativeNames else { return nil }
        var dns: String?
        var uri: String?
        for name in sans {
            switch name {
            case .uniformResourceIdentifier(let value) where value.hasPrefix("spiffe://"): return value
            case .uniformResourceIdentifier(let value): uri = uri ?? value
            case .dnsName(let value): dns = dns ?? value
            default: continue
            }
        }
        return uri ?? dns
    }

    public init(chain: [Certificate], key: Certificate.PrivateKey) throws {
        guard let leaf = chain.first else { throw ProxyError("certificate chain is empty") }
        guard key.publicKey == leaf.publicKey else {
            throw ProxyError("the private key does not match the certificate (\(leaf.subject), serial \(leaf.serialHex))")
        }
        try self.init(chain: chain.map { .classical($0) }, keyPEM: try KeyFile.pem(for: key, passphrase: nil))
    }

    /// An ML-DSA key and its certificate chain.
    public init(chain: [AnyCertificate], key: MLDSASigningKey) throws {
        guard let leaf = chain.first?.mldsa else { throw ProxyError("certificate chain is empty or its leaf is not an ML-DSA certificate") }
        guard leaf.subjectKeyVariant == key.variant, leaf.subjectPublicKey == key.publicKey else {
            throw ProxyError("the ML-DSA private key does not match the certificate (\(leaf.subject), serial \(leaf.serialHex))")
        }
        try self.init(chain: chain, keyPEM: try key.pem(passphrase: nil))
    }

    private init(chain: [AnyCertificate], keyPEM: String) throws {
        self.chain = chain
        self.nioChain = try chain.map { try NIOSSLCertificate(bytes: try $0.der, format: .der) }
        self.nioKey = try NIOSSLPrivateKey(bytes: Array(keyPEM.utf8), format: .pem)
    }

    /// Reads `certPath` (leaf first, then intermediates) and `keyPath` (PKCS#8 or SEC1/PKCS#1 PEM, unencrypted; or
    /// an ML-DSA PKCS#8 seed key).
    public static func load(cert certPath: String, key keyPath: String) throws -> LoadedCredentials {
        let chain = try readAnyCertificates(certPath, what: "certificate")
        let keyBytes = try readFile(keyPath, what: "private key")
        guard let keyText = String(validating: keyBytes, as: UTF8.self) else {
            throw ProxyError("private key \(keyPath) is not PEM text")
        }
        if KeyFile.isEncrypted(keyText) {
            throw ProxyError("private key \(keyPath) is encrypted; the proxy needs an unencrypted key file (mode 0600)")
        }
        do {
            if case .mldsa = chain[0] {
                let key: MLDSASigningKey
                do {
                    key = try MLDSASigningKey(pem: keyText, passphrase: { nil })
                } catch {
                    throw ProxyError("private key \(keyPath): not an ML-DSA key for the ML-DSA certificate \(certPath) (\(error))")
                }
                return try LoadedCredentials(chain: chain, key: key)
            }
            let key: Certificate.PrivateKey
            do {
                key = try KeyFile.load(pem: keyText, passphrase: { nil })
            } catch {
                throw ProxyError("private key \(keyPath): \(error)")
            }
            return try LoadedCredentials(chain: chain.compactMap(\.classical), key: key)
        } catch let error as ProxyError {
            throw ProxyError("\(certPath) and \(keyPath): \(error.description)")
        }
    }

    /// Largest certificate, key, bundle or CRL file the proxy reads.
    public static let maximumFileSize = 4 << 20

    static func readFile(_ path: String, what: String) throws -> [UInt8] {
        let attributes: [FileAttributeKey: Any]
        do {
            attributes = try FileManager.default.attributesOfItem(atPath: path)
        } catch {
            throw ProxyError("cannot read \(what) \(path): no such file or not readable")
        }
        if let size = attributes[.size] as? Int, size > maximumFileSize {
            throw ProxyError("\(what) \(path) is larger than \(maximumFileSize) bytes")
        }
        guard let data = FileManager.default.contents(atPath: path) else {
            throw ProxyError("cannot read \(what) \(path)")
        }
        guard !data.isEmpty else { throw ProxyError("\(what) \(path) is empty") }
        return Array(data)
    }

    /// Certificates of either family (a bundle with a classical and an ML-DSA root, an ML-DSA chain).
    static func readAnyCertificates(_ path: String, what: String) throws -> [AnyCertificate] {
        let bytes = try readFile(path, what: what)
        do {
            return try PEMBundle.anyCertificates(fromBytes: bytes, what: "\(what) \(path)")
        } catch let error as PKIError {
            throw ProxyError(error.reason)
        }
    }

    static func readCertificates(_ path: String, what: String) throws -> [Certificate] {
        let bytes = try readFile(path, what: what)
        do {
            if let text = String(validating: bytes, as: UTF8.self), text.contains("-----BEGIN") {
                return try PEMBundle.certificates(fromPEM: text, what: "\(what) \(path)")
            }
            return try PEMBundle.certificates(fromBytes: bytes, what: "\(what) \(path)")
        } catch let error as PKIError {
            throw ProxyError(error.reason)
        }
    }
}

/// Fingerprint of a file's identity and content version, to notice rotation (rename over, or rewrite in place).
struct FileStamp: Equatable, Sendable {
    var inode: UInt64
    var size: Int64
    var modified: Double

    init?(path: String) {
        var st = stat()
        guard stat(path, &st) == 0 else { return nil }
        inode = UInt64(st.st_ino)
        size = Int64(st.st_size)
        modified = Double(st.st_mtim.tv_sec) + Double(st.st_mtim.tv_nsec) / 1e9
    }

    static func stamps(_ paths: [String]) -> [String: FileStamp?] {
        Dictionary(uniqueKeysWithValues: paths.map { ($0, FileStamp(path: $0)) })
    }
}

extension Date {
    /// "3h ago" / "in 5m": how far a time is from now, for error messages people read.
    func relativeDescription(from now: Date = Date()) -> String {
        let seconds = Int(abs(timeIntervalSince(now)))
        let amount: String
        if seconds < 120 { amount = "\(seconds)s" }
        else if seconds < 7200 { amount = "\(seconds / 60)m" }
        else if seconds < 172_800 { amount = "\(seconds / 3600)h" }
        else { amount = "\(seconds / 86400)d" }
        return self < now ? "\(amount) ago" : "in \(amount)"
    }
}
