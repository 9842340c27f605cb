import SwiftASN1
import X509

/// The CRL distribution points extension (RFC 5280 4.2.1.13) with one URI full name.
///
/// Hand-written: swift-certificates 1.21 has no type for this extension.
public struct CRLDistributionPoints: Sendable, Hashable {
    public static let oid: ASN1ObjectIdentifier = [2, 5, 29, 31]
    public var urls: [String]

    public init(url: String) { self.urls = [url] }

    /// Reads the URI full names of every distribution point in a certificate's extension, if present.
    public init?(_ certificate: Certificate) throws {
        guard let ext = certificate.extensions[oid: Self.oid] else { return nil }
        var urls: [String] = []
        let root = try DER.parse(ext.value)
        try DER.sequence(root, identifier: .sequence) { points in
            while let point = points.next() {
                try DER.sequence(point, identifier: .sequence) { fields in
                    guard let name = fields.next(), name.identifier == ASN1Identifier(tagWithNumber: 0, tagClass: .contextSpecific) else {
                        while fields.next() != nil {}
                        return
                    }
                    guard case .constructed(let inner) = name.content else { return }
                    for choice in inner where choice.identifier == ASN1Identifier(tagWithNumber: 0, tagClass: .contextSpecific) {
                        guard case .constructed(let generalNames) = choice.content else { continue }
                        for gn in generalNames {
                            if case .uniformResourceIdentifier(let uri) = try GeneralName(derEncoded: gn) {
                                urls.append(uri)
                            }
                        }
                    }
                    while fields.next() != nil {}
                }
            }
        }
        self.urls = urls
    }

    public func makeExtension() throws -> Certificate.Extension {
        var serializer = DER.Serializer()
        try serializer.appendConstructedNode(identifier: .sequence) { points in
            for url in urls {
                try points.appendConstructedNode(identifier: .sequence) { point in
                    try point.appendConstructedNode(identifier: .init(tagWithNumber: 0, tagClass: .contextSpecific)) { dpName in
                        try dpName.appendConstructedNode(identifier: .init(tagWithNumber: 0, tagClass: .contextSpecific)) { names in
                            try names.serialize(GeneralName.uniformResourceIdentifier(url))
                        }
                    }
                }
            }
        }
        return Certificate.Extension(oid: Self.oid, critical: false, value: serializer.serializedBytes[...])
    }
}
