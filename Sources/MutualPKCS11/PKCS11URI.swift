import Foundation

/// A PKCS#11 URI (RFC 7512) naming a token, an object in it, the module to load and where the PIN comes from:
///
/// ```
/// pkcs11:token=mutual;object=issuing?module-path=/usr/lib/softhsm/libsofthsm2.so&pin-source=file:/etc/mutual/pin
/// ```
///
/// Path attributes select (`token`, `manufacturer`, `serial`, `model`, `slot-id`, `object`, `id`, `type`); query
/// attributes say how to get there (`module-path`, `module-name`, `pin-source`, `pin-value`). Values are
/// percent-decoded; `id` is bytes. Unknown standard attributes are refused rather than ignored (a URI that silently
/// matched a different key would be worse than one that fails); `x-` vendor attributes are kept and ignored.
public struct PKCS11URI: Sendable, Hashable, CustomStringConvertible {
    public var token: String?
    public var manufacturer: String?
    public var serial: String?
    public var model: String?
    public var slotID: UInt?
    public var object: String?
    public var id: [UInt8]?
    public var type: String?
    public var modulePath: String?
    public var moduleName: String?
    public var pinSource: String?
    public var pinValue: String?

    static let pathNames: Set<String> = [
        "token", "manufacturer", "serial", "model", "slot-id", "object", "id", "type",
        "library-manufacturer", "library-description", "library-version", "slot-description", "slot-manufacturer",
    ]
    static let queryNames: Set<String> = ["module-path", "module-name", "pin-source", "pin-value"]

    public init(
        token: String? = nil, object: String? = nil, id: [UInt8]? = nil, modulePath: String? = nil, pinSource: String? = nil,
        pinValue: String? = nil
    ) {
        self.token = token
        self.object = object
        self.id = id
        self.modulePath = modulePath
        self.pinSource = pinSource
        self.pinValue = pinValue
    }

    public init(_ text: String) throws {
        guard text.utf8.count <= 4096 else { throw PKCS11Error(.badURI, "the PKCS#11 URI is longer than 4096 bytes") }
        guard text.lowercased().hasPrefix("pkcs11:") else {
            throw PKCS11Error(.badURI, "a key store must be a PKCS#11 URI starting with 'pkcs11:' (RFC 7512), got '\(text.prefix(40))'")
        }
        let body = text.dropFirst("pkcs11:".count)
        let parts = body.split(separator: "?", maxSplits: 1, omittingEmptySubsequences: false)
        let path = parts.first.map(String.init) ?? ""
        let query = parts.count > 1 ? String(parts[1]) : ""
        var seen = Set<String>()
        for (component, separator, names) in [(path, Character(";"), Self.pathNames), (query, Character("&"), Self.queryNames)] {
            for attribute in component.split(separator: separator) where !attribute.isEmpty {
                let pair = attribute.split(separator: "=", maxSplits: 1, omittingEmptySubsequences: false)
                let name = String(pair[0]).lowercased()
                guard pair.count == 2 else { throw PKCS11Error(.badURI, "PKCS#11 URI attribute '\(name)' has no value") }
                if name.hasPrefix("x-") { continue }
                guard names.contains(name) else {
                    throw PKCS11Error(.badURI, "unknown PKCS#11 URI attribute '\(name)' in the \(separator == ";" ? "path" : "query")")
                }
                guard seen.insert(name).inserted else { throw PKCS11Error(.badURI, "PKCS#11 URI attribute '\(name)' is given twice") }
                let bytes = try Self.percentDecoded(pair[1])
                let value = String(decoding: bytes, as: UTF8.self)
                switch name {
                case "token": token = value
                case "manufacturer": manufacturer = value
                case "serial": serial = value
                case "model": model = value
                case "slot-id":
                    guard let n = UInt(value) else { throw PKCS11Error(.badURI, "PKCS#11 URI slot-id '\(value)' is not a number") }
                    slotID = n
                case "object": object = value
                case "id": id = bytes
                case "type":
                    guard ["private", "public", "cert", "secret-key", "data"].contains(value) else {
                        throw PKCS11Error(.badURI, "PKCS#11 URI type '\(value)' is not one of private, public, cert, secret-key, data")
                    }
                    type = value
                case "module-path": modulePath = value
                case "module-name": moduleName = value
                case "pin-source": pinSource = value
                case "pin-value": pinValue = value
                default: break  // library-*, slot-description, slot-manufacturer: accepted, not used to select
                }
            }
        }
        if pinSource != nil && pinValue != nil {
            throw PKCS11Error(.badURI, "a PKCS#11 URI gives either pin-source or pin-value, not both")
        }
        guard modulePath != nil || moduleName != nil else {
            throw PKCS11Error(.badURI, "the PKCS#11 URI names no module: add ?module-path=/path/to/module.so")
        }
    }

    static func percentDecoded(_ text: Substring) throws -> [UInt8] {
        var out: [UInt8] = []
        var bytes = Array(text.utf8)[...]
        while let byte = bytes.popFirst() {
            guard byte == UInt8(ascii: "%") else { out.append(byte); continue }
            guard bytes.count >= 2, let value = UInt8(String(decoding: bytes.prefix(2), as: UTF8.self), radix: 16) else {
                throw PKCS11Error(.badURI, "bad percent-encoding in PKCS#11 URI value '\(text.prefix(40))'")
            }
            out.append(value)
            bytes = bytes.dropFirst(2)
        }
        return out
    }

    static func percentEncoded(_ bytes: [UInt8], all: Bool = false) -> String {
        bytes.map { byte -> String in
            let c = Character(Unicode.Scalar(byte))
            if !all, byte < 0x80, c.isLetter || c.isNumber || "-._~:/@!$'()*+,".contains(c) { return String(c) }
            return String(format: "%%%02X", byte)
        }.joined()
    }

    /// The module file to `dlopen`: `module-path`, else `module-name` looked up in the system's PKCS#11 directories.
    public func resolvedModulePath() throws -> String {
        if let modulePath { return modulePath }
        guard let moduleName, !moduleName.contains("/") else { throw PKCS11Error(.badURI, "module-name must be a bare name") }
        let directories = ["/usr/lib/x86_64-linux-gnu/pkcs11", "/usr/lib/aarch64-linux-gnu/pkcs11", "/usr/lib/pkcs11", "/usr/lib/softhsm", "/usr/lib64/pkcs11"]
        for directory in directories {
            for candidate in [moduleName, moduleName + ".so", "lib" + moduleName + ".so"] {
                let path = directory + "/" + candidate
                if FileManager.default.fileExists(atPath: path) { return path }
            }
        }
        throw PKCS11Error(.moduleUnloadable, "no PKCS#11 module named '\(moduleName)' in \(directories.joined(separator: ", "))")
    }

    /// The user PIN: `pin-value`, else the first line of `pin-source` (`file:/path` or a plain path), else the
    /// `MUTUAL_PKCS11_PIN` environment variable. Nil when none is given (tokens with a protected authentication path).
    public func pin(environment: [String: String] = ProcessInfo.processInfo.environment) throws -> String? {
        if let pinValue { return pinValue }
        if let pinSource {
            var path = pinSource
            if path.hasPrefix("file:") { path = String(path.dropFirst(5)) }
            if path.hasPrefix("//") { path = String(path.dropFirst(2)) }
            guard let handle = FileHandle(forReadingAtPath: path) else {
                throw PKCS11Error(.pinUnreadable, "cannot read the PIN from \(path) (pin-source)")
            }
            defer { try? handle.close() }
            let data = (try? handle.read(upToCount: 4097)) ?? Data()
            guard data.count <= 4096 else { throw PKCS11Error(.pinUnreadable, "the PIN file \(path) is larger than 4 KiB") }
            let text = String(decoding: data, as: UTF8.self)
            return String(text.split(separator: "\n", omittingEmptySubsequences: false).first ?? "")
                .trimmingCharacters(in: CharacterSet(charactersIn: "\r"))
        }
        return environment["MUTUAL_PKCS11_PIN"]
    }

    /// The same URI naming another object in the same token (a fresh `id`).
    public func naming(object: String) -> PKCS11URI {
        var copy = self
        copy.object = object
        copy.id = nil
        return copy
    }

    /// The canonical text, without `pin-value` (a secret never written to config files or logs).
    public var description: String {
        var path: [String] = []
        func add(_ name: String, _ value: String?) { if let value { path.append(name + "=" + Self.percentEncoded(Array(value.utf8))) } }
        add("token", token)
        add("manufacturer", manufacturer)
        add("serial", serial)
        add("model", model)
        if let slotID { path.append("slot-id=\(slotID)") }
        add("object", object)
        if let id { path.append("id=" + Self.percentEncoded(id, all: true)) }
        add("type", type)
        var query: [String] = []
        if let modulePath { query.append("module-path=" + Self.percentEncoded(Array(modulePath.utf8))) }
        if let moduleName { query.append("module-name=" + Self.percentEncoded(Array(moduleName.utf8))) }
        if let pinSource { query.append("pin-source=" + Self.percentEncoded(Array(pinSource.utf8))) }
        return "pkcs11:" + path.joined(separator: ";") + (query.isEmpty ? "" : "?" + query.joined(separator: "&"))
    }
}
