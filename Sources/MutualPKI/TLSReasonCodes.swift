/// BoringSSL's reason codes in an error description (`…:error:…:OPENSSL_internal:CERTIFICATE_VERIFY_FAILED …`): the
/// library's stable identifiers of a bounded set, the only part of its error text code may branch on. swift-nio-ssl
/// exposes a failed handshake only as that text, so one reader, used by every role, picks the codes out of it.
public enum TLSReasonCodes {
    /// Every reason code in `text`, upper case as BoringSSL spells them, in order of appearance.
    public static func all(in text: String) -> [String] {
        var codes: [String] = []
        var rest = Substring(text)
        while let range = rest.range(of: "OPENSSL_internal:") {
            let code = rest[range.upperBound...].prefix { $0.isLetter || $0.isNumber || $0 == "_" }
            if !code.isEmpty { codes.append(String(code)) }
            rest = rest[range.upperBound...]
        }
        return codes
    }

    /// The last reason code in `text` (the outermost error), lower case (`certificate_verify_failed`), or nil.
    public static func last(in text: String) -> String? {
        all(in: text).last?.lowercased()
    }
}
