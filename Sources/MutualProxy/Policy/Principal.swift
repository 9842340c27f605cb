import Foundation
import MutualPKI

/// One entry of an allow list.
///
/// - `spiffe://example.org/ns/web/sa/api` — that SPIFFE ID exactly;
/// - `spiffe://example.org/ns/web/*` — any SPIFFE ID below that path (path-segment boundary);
/// - `uri:https://partner.example/client` — a URI SAN exactly;
/// - `dns:api.example.org` or `dns:*.example.org` — a DNS SAN (wildcard: exactly one more label);
/// - `cn:alice`, `ou:payments` — subject attributes, matched only because they were asked for explicitly.
///
/// SANs never fall back to the subject: a `spiffe://` or `dns:` pattern never matches a CN.
public enum Principal: Sendable, Hashable, CustomStringConvertible {
    case spiffeID(String)
    case spiffePrefix(String)
    case uri(String)
    case dns(String)
    case dnsWildcard(String)
    case commonName(String)
    case organizationalUnit(String)

    public init(parsing text: String) throws {
        let t = text.trimmingCharacters(in: .whitespaces)
        func fail(_ why: String) -> PKIError { PKIError(.invalidName, "invalid principal '\(text.prefix(80))': \(why)") }
        if t.hasPrefix("spiffe://") {
            if t.hasSuffix("/*") {
                let base = String(t.dropLast(2))
                do { _ = try Names.SPIFFEID(parsing: base) } catch { throw fail("\(error)") }
                self = .spiffePrefix(base + "/")
            } else {
                guard !t.contains("*") else { throw fail("'*' is only allowed as a final '/*'") }
                do {
                    try Names.requireWorkloadPath(t)
                    self = .spiffeID(try Names.SPIFFEID(parsing: t).description)
                } catch { throw fail("\(error)") }
            }
        } else if t.hasPrefix("uri:") {
            let value = String(t.dropFirst(4))
            guard !value.isEmpty else { throw fail("empty URI") }
            self = .uri(value)
        } else if t.hasPrefix("dns:") {
            let value = String(t.dropFirst(4)).lowercased()
            if value.hasPrefix("*.") {
                self = .dnsWildcard(try Names.normalizedDNSName(String(value.dropFirst(2)), allowWildcard: false))
            } else {
                self = .dns(try Names.normalizedDNSName(value, allowWildcard: false))
            }
        } else if t.hasPrefix("cn:") {
            guard t.count > 3 else { throw fail("empty common name") }
            self = .commonName(String(t.dropFirst(3)))
        } else if t.hasPrefix("ou:") {
            guard t.count > 3 else { throw fail("empty organizational unit") }
            self = .organizationalUnit(String(t.dropFirst(3)))
        } else {
            throw fail("expected spiffe://…, uri:…, dns:…, cn:… or ou:…")
        }
    }

    public func matches(_ peer: VerifiedPeer) -> Bool {
        switch self {
        case .spiffeID(let id): return peer.spiffeID == id
        case .spiffePrefix(let prefix):
            guard let id = peer.spiffeID else { return false }
            return id.hasPrefix(prefix) && id.count > prefix.count
        case .uri(let uri): return peer.uris.contains(uri)
        case .dns(let name): return peer.dnsNames.contains(name)
        case .dnsWildcard(let base):
            return peer.dnsNames.contains { name in
                guard name.hasSuffix("." + base) else { return false }
                let label = name.dropLast(base.count + 1)
                return !label.isEmpty && !label.contains(".")
            }
        case .commonName(let cn): return peer.commonName == cn
        case .organizationalUnit(let ou): return peer.organizationalUnits.contains(ou)
        }
    }

    /// The name of `peer` this principal matched, written as a principal (`spiffe://…`, `uri:…`, `dns:…`, `cn:…`,
    /// `ou:…`), or nil when it does not match. What the `x-client-identity` header carries.
    public func matchedName(_ peer: VerifiedPeer) -> String? {
        guard matches(peer) else { return nil }
        switch self {
        case .spiffeID, .spiffePrefix: return peer.spiffeID
        case .uri(let uri): return "uri:" + uri
        case .dns(let name): return "dns:" + name
        case .dnsWildcard(let base):
            return peer.dnsNames.first { $0.hasSuffix("." + base) && !$0.dropLast(base.count + 1).contains(".") }.map { "dns:" + $0 }
        case .commonName(let cn): return "cn:" + cn
        case .organizationalUnit(let ou): return "ou:" + ou
        }
    }

    public var description: String {
        switch self {
        case .spiffeID(let id): return id
        case .spiffePrefix(let prefix): return prefix + "*"
        case .uri(let uri): return "uri:" + uri
        case .dns(let name): return "dns:" + name
        case .dnsWildcard(let base): return "dns:*." + base
        case .commonName(let cn): return "cn:" + cn
        case .organizationalUnit(let ou): return "ou:" + ou
        }
    }
}
