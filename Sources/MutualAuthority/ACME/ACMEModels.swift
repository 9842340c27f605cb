import Crypto
import Foundation
import MutualPKI

/// An identifier an order asks for (RFC 8555 9.7.7): `dns` or `ip` (RFC 8738).
public struct ACMEIdentifier: Codable, Hashable, Sendable {
    public var type: String
    public var value: String

    public init(type: String, value: String) {
        self.type = type
        self.value = value
    }
}

/// One ACME provisioner of the authority: which names it certifies, under which profile and lifetime, with which
/// challenges, and where the validator connects.
public struct ACMEProvisioner: Sendable, Equatable {
    public var name: String
    public var allowDNS = true
    public var allowIP = true
    /// DNS name constraints (`example.org` covers it and its subdomains); empty: whatever the CA may certify.
    public var permittedDNS: [String] = []
    /// The profiles orders may name (RFC 8555 profiles extension); the first is used when an order names none.
    public var profiles: [CertificateProfile] = [.server]
    /// The default profile.
    public var profile: CertificateProfile {
        get { profiles[0] }
        set { profiles = [newValue] + profiles.filter { $0 != newValue } }
    }
    public var validity: ValidityDuration = .days(7)
    public var challenges: [String] = ["http-01", "tls-alpn-01"]
    public var httpPort = 80
    public var tlsPort = 443
    public var termsOfService: String?
    /// The resolver dns-01 asks (`host:port`); dns-01 (and wildcard names) are offered only with one.
    public var dnsResolver: String?
    /// New orders one account may make per hour (nil: no limit).
    public var ordersPerAccountPerHour: Int? = 300
    /// Certificates naming one identifier per hour, across accounts (nil: no limit).
    public var certificatesPerIdentifierPerHour: Int? = 100
    /// Accounts need an External Account Binding made with `mutual acme eab create`.
    public var requireEAB = false
    /// Orders and authorizations expire this long after they are made.
    public var orderLifetime: ValidityDuration = .hours(8)

    public init(name: String) throws {
        guard !name.isEmpty, name.count <= 40, name.utf8.allSatisfy({ ($0 >= 0x61 && $0 <= 0x7A) || ($0 >= 0x30 && $0 <= 0x39) || $0 == 0x2D || $0 == 0x5F }) else {
            throw PKIError(.malformedInput, "invalid ACME provisioner name '\(name.prefix(40))': use 1 to 40 of a-z, 0-9, '-' and '_'")
        }
        self.name = name
    }
}

public enum ACMEStatus {
    public static let pending = "pending", ready = "ready", processing = "processing", valid = "valid", invalid = "invalid"
    public static let deactivated = "deactivated", revoked = "revoked", expired = "expired"
}

public struct ACMEAccount: Codable, Sendable, Equatable {
    public var id: String
    public var provisioner: String
    public var status: String
    public var contact: [String]
    /// The account key's canonical JWK (RFC 7638 form).
    public var jwk: String
    public var thumbprint: String
    public var termsOfServiceAgreed: Bool
    /// Recorded as the owner of every certificate the account gets.
    public var owner: String
    public var createdAt: Date

    public func key() throws -> ACMEAccountKey {
        guard let object = try JSONSerialization.jsonObject(with: Data(jwk.utf8)) as? [String: Any] else {
            throw ACMEProblem(.serverInternal, "stored account key is unreadable")
        }
        return try ACMEAccountKey(jwk: object)
    }
}

public struct ACMEChallenge: Codable, Sendable, Equatable {
    public var type: String
    public var token: String
    public var status: String
    public var validated: Date?
    public var error: ACMEProblemDocument?
}

public struct ACMEAuthorization: Codable, Sendable, Equatable {
    public var id: String
    public var orderID: String
    public var accountID: String
    public var identifier: ACMEIdentifier
    public var status: String
    public var expires: Date
    public var challenges: [ACMEChallenge]
    /// For `*.name` in the order: the authorization is for `name`, by dns-01 only.
    public var wildcard: Bool? = nil
}

public struct ACMEOrder: Codable, Sendable, Equatable {
    public var id: String
    public var accountID: String
    public var provisioner: String
    public var status: String
    public var expires: Date
    public var identifiers: [ACMEIdentifier]
    public var authorizations: [String]
    public var profile: String?
    public var error: ACMEProblemDocument?
    public var certificateSerial: String?
    public var createdAt: Date
    /// The serial of the certificate this order replaces (RFC 9773 `replaces`).
    public var replaces: String? = nil
}

/// Random identifiers and tokens: 128 bits (tokens 256 bits, RFC 8555 8.1 asks for at least 128), base64url.
enum ACMERandom {
    static func id() -> String { Base64URL.encode(SymmetricKey(size: .bits128).withUnsafeBytes { Data($0) }) }
    static func token() -> String { Base64URL.encode(SymmetricKey(size: .bits256).withUnsafeBytes { Data($0) }) }
}

/// Replay nonces (RFC 8555 6.5) that any replica can check: the issue time, random bytes and an HMAC under a key
/// shared through the database. A nonce is fresh for `lifetime`; the database remembers used ones until they expire,
/// so each is accepted once, whichever replica sees it.
public struct ACMENonces: Sendable {
    let key: SymmetricKey
    public let lifetime: TimeInterval

    public init(key: SymmetricKey, lifetime: TimeInterval = 3600) {
        self.key = key
        self.lifetime = lifetime
    }

    public func make(now: Date) -> String {
        var bytes = Data(count: 8)
        let seconds = UInt64(max(0, now.timeIntervalSince1970))
        for i in 0..<8 { bytes[i] = UInt8(truncatingIfNeeded: seconds >> (56 - 8 * UInt64(i))) }
        bytes += SymmetricKey(size: .bits128).withUnsafeBytes { Data($0.prefix(8)) }
        bytes += Data(HMAC<SHA256>.authenticationCode(for: bytes, using: key)).prefix(16)
        return Base64URL.encode(bytes)
    }

    /// When the nonce stops being accepted, if it is one of ours and still fresh; nil otherwise.
    public func expiry(of nonce: String, now: Date) -> Date? {
        guard nonce.utf8.count <= 64, let bytes = Base64URL.decode(nonce), bytes.count == 32 else { return nil }
        let body = bytes.prefix(16)
        let expected = Data(HMAC<SHA256>.authenticationCode(for: body, using: key)).prefix(16)
        // Constant-time comparison of the truncated tag.
        var difference: UInt8 = 0
        for (a, b) in zip(expected, bytes.suffix(16)) { difference |= a ^ b }
        guard difference == 0 else { return nil }
        let seconds = body.prefix(8).reduce(UInt64(0)) { $0 << 8 | UInt64($1) }
        let issued = Date(timeIntervalSince1970: TimeInterval(seconds))
        let expires = issued.addingTimeInterval(lifetime)
        guard issued <= now.addingTimeInterval(60), expires > now else { return nil }
        return expires
    }
}
