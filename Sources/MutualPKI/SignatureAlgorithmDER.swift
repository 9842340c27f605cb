import SwiftASN1
import X509

/// AlgorithmIdentifier encoding for the signature algorithms Mutual signs with.
///
/// Hand-written because swift-certificates keeps `AlgorithmIdentifier` internal, and CRLs (which it does not model)
/// need to encode and read one.
enum SignatureAlgorithmDER {
    static let table: [(Certificate.SignatureAlgorithm, ASN1ObjectIdentifier, Bool)] = [
        (.ecdsaWithSHA256, [1, 2, 840, 10045, 4, 3, 2], false),
        (.ecdsaWithSHA384, [1, 2, 840, 10045, 4, 3, 3], false),
        (.ecdsaWithSHA512, [1, 2, 840, 10045, 4, 3, 4], false),
        (.sha256WithRSAEncryption, [1, 2, 840, 113549, 1, 1, 11], true),
        (.sha384WithRSAEncryption, [1, 2, 840, 113549, 1, 1, 12], true),
        (.sha512WithRSAEncryption, [1, 2, 840, 113549, 1, 1, 13], true),
        (.sha1WithRSAEncryption, [1, 2, 840, 113549, 1, 1, 5], true),
        (.ed25519, [1, 3, 101, 112], false),
    ]

    static func serialize(_ algorithm: Certificate.SignatureAlgorithm, into coder: inout DER.Serializer) throws {
        guard let entry = table.first(where: { $0.0 == algorithm }) else {
            throw PKIError(.unsupportedKey, "cannot encode signature algorithm \(algorithm)")
        }
        try coder.appendConstructedNode(identifier: .sequence) { seq in
            try seq.serialize(entry.1)
            if entry.2 { try seq.serialize(ASN1Null()) }
        }
    }

    /// The algorithm's OID, parameters skipped.
    static func oid(_ node: ASN1Node) throws -> ASN1ObjectIdentifier {
        try DER.sequence(node, identifier: .sequence) { nodes in
            let oid = try ASN1ObjectIdentifier(derEncoded: &nodes)
            while nodes.next() != nil {}
            return oid
        }
    }

    /// A signature algorithm Mutual verifies: a classical one swift-certificates knows (returned), or ML-DSA (nil).
    static func parseAny(_ node: ASN1Node) throws -> (ASN1ObjectIdentifier, Certificate.SignatureAlgorithm?) {
        let oid = try oid(node)
        if MLDSAVariant(oid: oid) != nil { return (oid, nil) }
        return (oid, try parse(node))
    }

    static func parse(_ node: ASN1Node) throws -> Certificate.SignatureAlgorithm {
        let oid = try oid(node)
        guard let entry = table.first(where: { $0.1 == oid }) else {
            throw PKIError(.unsupportedKey, "unsupported signature algorithm \(oid)")
        }
        return entry.0
    }
}

/// X.509 Time (UTCTime before 2050, GeneralizedTime from 2050), as RFC 5280 4.1.2.5 requires.
enum X509Time {
    static func serialize(_ date: Date, into coder: inout DER.Serializer) throws {
        // gmtime_r rather than Calendar: a CRL with a million entries formats a million dates.
        var seconds = time_t(date.timeIntervalSince1970.rounded(.down))
        var t = tm()
        gmtime_r(&seconds, &t)
        let year = Int(t.tm_year) + 1900
        if year < 2050 {
            try coder.serialize(
                UTCTime(year: year, month: Int(t.tm_mon) + 1, day: Int(t.tm_mday), hours: Int(t.tm_hour), minutes: Int(t.tm_min), seconds: Int(t.tm_sec))
            )
        } else {
            try coder.serialize(
                GeneralizedTime(
                    year: year, month: Int(t.tm_mon) + 1, day: Int(t.tm_mday), hours: Int(t.tm_hour), minutes: Int(t.tm_min),
                    seconds: Int(t.tm_sec), fractionalSeconds: 0
                )
            )
        }
    }

    static func parse(_ node: ASN1Node) throws -> Date {
        let c: DateComponents
        if node.identifier == UTCTime.defaultIdentifier {
            let t = try UTCTime(derEncoded: node)
            c = DateComponents(year: t.year, month: t.month, day: t.day, hour: t.hours, minute: t.minutes, second: t.seconds)
        } else if node.identifier == GeneralizedTime.defaultIdentifier {
            let t = try GeneralizedTime(derEncoded: node)
            c = DateComponents(year: t.year, month: t.month, day: t.day, hour: t.hours, minute: t.minutes, second: t.seconds)
        } else {
            throw PKIError(.malformedInput, "expected UTCTime or GeneralizedTime")
        }
        guard let date = Calendar.utc.date(from: c) else { throw PKIError(.malformedInput, "invalid time") }
        return date
    }
}

extension Calendar {
    static let utc: Calendar = {
        var calendar = Calendar(identifier: .gregorian)
        calendar.timeZone = TimeZone(identifier: "UTC")!
        return calendar
    }()
}

import Foundation
#if canImport(Glibc)
import Glibc
#endif
