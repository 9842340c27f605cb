import Foundation
import MutualAuthority
import MutualPKI
import Yams

/// `mutual serve --config authority.yaml`: the server's settings and its ACME provisioners in one file. Every key is
/// the name of the `serve` flag it stands for; a flag given on the command line wins over the file. Unknown keys are
/// refused with their path, so a typo never silently turns a setting off.
public struct AuthorityFile: Sendable, Equatable {
    public var listen: String?
    public var publicURL: String?
    public var httpListen: String?
    public var httpPublicURL: String?
    public var renewExpiredGrace: ValidityDuration?
    public var crlValidity: ValidityDuration?
    public var serverCertValidity: ValidityDuration?
    public var logLevel: String?
    public var acme: [ACMEProvisioner] = []
    /// `dashboard: false` turns the dashboard off.
    public var dashboard: Bool?
    /// `oauth-allow`: token endpoint rules, `IDENTITY_PATTERN=AUDIENCE[:SCOPE,…]` each.
    public var oauthAllow: [OAuthRule] = []
    public var oauthTokenLifetime: ValidityDuration?
    public var oauthIntrospectors: [ScopePattern] = []
    public var oauthIssuer: String?

    public init() {}

    public static let maximumSize = 1 << 20

    public struct Problem: Error, CustomStringConvertible, Equatable {
        public var path: String
        public var reason: String
        public var description: String { path.isEmpty ? reason : "\(path): \(reason)" }
    }

    public static func load(path: String) throws -> AuthorityFile {
        let attributes = try? FileManager.default.attributesOfItem(atPath: path)
        if let size = attributes?[.size] as? Int, size > maximumSize {
            throw Problem(path: "", reason: "\(path) is larger than \(maximumSize) bytes")
        }
        guard let data = FileManager.default.contents(atPath: path) else { throw Problem(path: "", reason: "cannot read \(path)") }
        guard let text = String(data: data, encoding: .utf8) else { throw Problem(path: "", reason: "\(path) is not UTF-8 text") }
        return try parse(yaml: text)
    }

    public static func parse(yaml text: String) throws -> AuthorityFile {
        guard text.utf8.count <= maximumSize else { throw Problem(path: "", reason: "the file is larger than \(maximumSize) bytes") }
        let root: Any?
        do { root = try Yams.load(yaml: text) } catch { throw Problem(path: "", reason: "not valid YAML: \(error)") }
        guard let root else { return AuthorityFile() }
        let top = try Self.map(root, "")
        try Self.known(top, ["listen", "public-url", "http-listen", "http-public-url", "renew-expired-grace", "crl-validity", "server-cert-validity", "log-level", "dashboard", "acme", "oauth-allow", "oauth-token-lifetime", "oauth-introspector", "oauth-issuer"], "")
        var file = AuthorityFile()
        file.listen = try Self.string(top["listen"], "listen")
        file.publicURL = try Self.string(top["public-url"], "public-url")
        // YAML 1.1 reads a bare `off` as false.
        file.httpListen = top["http-listen"] as? Bool == false ? "off" : try Self.string(top["http-listen"], "http-listen")
        file.httpPublicURL = try Self.string(top["http-public-url"], "http-public-url")
        file.renewExpiredGrace = try Self.duration(top["renew-expired-grace"], "renew-expired-grace")
        file.crlValidity = try Self.duration(top["crl-validity"], "crl-validity")
        file.serverCertValidity = try Self.duration(top["server-cert-validity"], "server-cert-validity")
        file.logLevel = try Self.string(top["log-level"], "log-level")
        if let dashboard = top["dashboard"] {
            guard let enabled = dashboard as? Bool else { throw Problem(path: "dashboard", reason: "must be true or false") }
            file.dashboard = enabled
        }
        if let level = file.logLevel, !["trace", "debug", "info", "notice", "warning", "error", "critical"].contains(level) {
            throw Problem(path: "log-level", reason: "'\(level.prefix(20))' is not one of trace|debug|info|notice|warning|error|critical")
        }
        if let listen = file.listen { _ = try Self.address(listen, "listen") }
        if let http = file.httpListen, http != "off" { _ = try Self.address(http, "http-listen") }
        for (index, rule) in (try Self.strings(top["oauth-allow"], "oauth-allow") ?? []).enumerated() {
            do { file.oauthAllow.append(try OAuthRule(parsing: rule)) } catch let error as OAuthError {
                throw Problem(path: "oauth-allow[\(index)]", reason: error.reason)
            }
        }
        file.oauthTokenLifetime = try Self.duration(top["oauth-token-lifetime"], "oauth-token-lifetime")
        for (index, pattern) in (try Self.strings(top["oauth-introspector"], "oauth-introspector") ?? []).enumerated() {
            do { file.oauthIntrospectors.append(try ScopePattern(pattern)) } catch let error as AuthorityError {
                throw Problem(path: "oauth-introspector[\(index)]", reason: error.reason)
            }
        }
        file.oauthIssuer = try Self.string(top["oauth-issuer"], "oauth-issuer")
        if let acme = top["acme"] {
            guard let list = acme as? [Any] else { throw Problem(path: "acme", reason: "must be a list of provisioners") }
            for (index, item) in list.enumerated() {
                file.acme.append(try provisioner(item, "acme[\(index)]"))
            }
            let names = file.acme.map(\.name)
            if let duplicate = names.first(where: { name in names.filter { $0 == name }.count > 1 }) {
                throw Problem(path: "acme", reason: "provisioner '\(duplicate)' appears twice")
            }
        }
        return file
    }

    static func provisioner(_ value: Any, _ path: String) throws -> ACMEProvisioner {
        let map = try Self.map(value, path)
        try Self.known(map, [
            "name", "identifiers", "dns-names", "profile", "profiles", "validity", "challenges", "external-account-required", "http-port",
            "tls-port", "dns-resolver", "terms-of-service", "rate-limits",
        ], path)
        guard let name = try Self.string(map["name"], path + ".name") else { throw Problem(path: path + ".name", reason: "is required") }
        var provisioner: ACMEProvisioner
        do { provisioner = try ACMEProvisioner(name: name) } catch let error as PKIError { throw Problem(path: path + ".name", reason: error.reason) }
        if let types = try Self.strings(map["identifiers"], path + ".identifiers") {
            guard !types.isEmpty, types.allSatisfy({ $0 == "dns" || $0 == "ip" }) else {
                throw Problem(path: path + ".identifiers", reason: "list dns, ip or both")
            }
            provisioner.allowDNS = types.contains("dns")
            provisioner.allowIP = types.contains("ip")
        }
        if let names = try Self.strings(map["dns-names"], path + ".dns-names") {
            provisioner.permittedDNS = try names.map { name in
                do { return try Names.normalizedDNSName(name.hasPrefix(".") ? String(name.dropFirst()) : name, allowWildcard: false) } catch let error as PKIError {
                    throw Problem(path: path + ".dns-names", reason: error.reason)
                }
            }
        }
        func acmeProfile(_ name: String, _ keyPath: String) throws -> CertificateProfile {
            guard let parsed = CertificateProfile(rawValue: name), parsed == .server || parsed == .client else {
                throw Problem(path: keyPath, reason: "ACME issues the server or client profile (got '\(name.prefix(20))')")
            }
            return parsed
        }
        if map["profile"] != nil, map["profiles"] != nil {
            throw Problem(path: path + ".profiles", reason: "give profile or profiles, not both")
        }
        if let profile = try Self.string(map["profile"], path + ".profile") {
            provisioner.profiles = [try acmeProfile(profile, path + ".profile")]
        }
        if let names = try Self.strings(map["profiles"], path + ".profiles") {
            let parsed = try names.map { try acmeProfile($0, path + ".profiles") }
            guard !parsed.isEmpty, Set(parsed).count == parsed.count else { throw Problem(path: path + ".profiles", reason: "list server, client or both, each once") }
            provisioner.profiles = parsed
        }
        if let validity = try Self.duration(map["validity"], path + ".validity") { provisioner.validity = validity }
        if let challenges = try Self.strings(map["challenges"], path + ".challenges") {
            let known = ["http-01", "tls-alpn-01", "dns-01"]
            guard !challenges.isEmpty, challenges.allSatisfy(known.contains), Set(challenges).count == challenges.count else {
                throw Problem(path: path + ".challenges", reason: "list one or more of \(known.joined(separator: ", ")), each once")
            }
            provisioner.challenges = challenges
        }
        if let required = map["external-account-required"] {
            guard let flag = required as? Bool else { throw Problem(path: path + ".external-account-required", reason: "must be true or false") }
            provisioner.requireEAB = flag
        }
        for (key, keyPath) in [("http-port", \ACMEProvisioner.httpPort), ("tls-port", \ACMEProvisioner.tlsPort)] {
            if let value = map[key] {
                guard let port = value as? Int, (1...65535).contains(port) else { throw Problem(path: "\(path).\(key)", reason: "must be a port between 1 and 65535") }
                provisioner[keyPath: keyPath] = port
            }
        }
        if let resolver = try Self.string(map["dns-resolver"], path + ".dns-resolver") {
            let (_, port) = try Self.address(resolver, path + ".dns-resolver")
            guard port != 0 else { throw Problem(path: path + ".dns-resolver", reason: "needs a port, e.g. 127.0.0.1:53") }
            provisioner.dnsResolver = resolver
            if map["challenges"] == nil { provisioner.challenges.append("dns-01") }
        }
        if provisioner.challenges.contains("dns-01"), provisioner.dnsResolver == nil {
            throw Problem(path: path + ".challenges", reason: "dns-01 needs dns-resolver: HOST:PORT")
        }
        provisioner.termsOfService = try Self.string(map["terms-of-service"], path + ".terms-of-service")
        if let limits = map["rate-limits"] {
            let limitMap = try Self.map(limits, path + ".rate-limits")
            try Self.known(limitMap, ["orders-per-account-per-hour", "certificates-per-identifier-per-hour"], path + ".rate-limits")
            for (key, keyPath) in [("orders-per-account-per-hour", \ACMEProvisioner.ordersPerAccountPerHour), ("certificates-per-identifier-per-hour", \ACMEProvisioner.certificatesPerIdentifierPerHour)] {
                guard let value = limitMap[key] else { continue }
                if value is NSNull || (value as? String) == "none" { provisioner[keyPath: keyPath] = nil; continue }
                guard let number = value as? Int, number >= 1, number <= 10_000_000 else {
                    throw Problem(path: "\(path).rate-limits.\(key)", reason: "must be a number from 1 to 10000000, or none")
                }
                provisioner[keyPath: keyPath] = number
            }
        }
        return provisioner
    }

    // MARK: Typed access with paths in errors

    static func map(_ value: Any, _ path: String) throws -> [String: Any] {
        guard let map = value as? [String: Any] else { throw Problem(path: path, reason: "must be a mapping of keys to values") }
        return map
    }

    static func known(_ map: [String: Any], _ keys: [String], _ path: String) throws {
        if let unknown = map.keys.sorted().first(where: { !keys.contains($0) }) {
            throw Problem(path: path.isEmpty ? unknown : "\(path).\(unknown)", reason: "unknown key (known: \(keys.joined(separator: ", ")))")
        }
    }

    static func string(_ value: Any?, _ path: String) throws -> String? {
        guard let value, !(value is NSNull) else { return nil }
        guard let text = value as? String, !text.isEmpty, text.count <= 2048 else { throw Problem(path: path, reason: "must be a non-empty string") }
        return text
    }

    static func strings(_ value: Any?, _ path: String) throws -> [String]? {
        guard let value, !(value is NSNull) else { return nil }
        guard let list = value as? [Any], let texts = list as? [String] else { throw Problem(path: path, reason: "must be a list of strings") }
        return texts
    }

    static func duration(_ value: Any?, _ path: String) throws -> ValidityDuration? {
        guard let text = try string(value, path) else { return nil }
        do { return try ValidityDuration(parsing: text) } catch let error as PKIError { throw Problem(path: path, reason: error.reason) }
    }

    static func address(_ text: String, _ path: String) throws -> (String, Int) {
        do { return try AuthorityServer.Configuration.parseListen(text) } catch let error as PKIError { throw Problem(path: path, reason: error.reason) }
    }
}
