// swift-tools-version: 6.1
import PackageDescription

let package = Package(
    name: "mutual",
    platforms: [.macOS(.v15)],
    products: [
        .executable(name: "mutual", targets: ["mutual"]),
        .library(name: "MutualPKI", targets: ["MutualPKI"]),
        .library(name: "MutualStore", targets: ["MutualStore"]),
        .library(name: "MutualAuthority", targets: ["MutualAuthority"]),
    ],
    dependencies: [
        .package(url: "https://github.com/apple/swift-certificates.git", from: "1.21.1"),
        .package(url: "https://github.com/apple/swift-crypto.git", from: "4.5.2"),
        .package(url: "https://github.com/apple/swift-asn1.git", from: "1.7.4"),
        .package(url: "https://github.com/apple/swift-argument-parser.git", from: "1.8.2"),
        .package(url: "https://github.com/apple/swift-log.git", from: "1.16.2"),
        .package(url: "https://github.com/vapor/sql-kit.git", from: "3.36.0"),
        .package(url: "https://github.com/vapor/sqlite-kit.git", from: "4.5.2"),
    ],
    targets: [
        .target(
            name: "MutualPKI",
            dependencies: [
                .product(name: "X509", package: "swift-certificates"),
                .product(name: "Crypto", package: "swift-crypto"),
                .product(name: "_CryptoExtras", package: "swift-crypto"),
                .product(name: "SwiftASN1", package: "swift-asn1"),
            ]
        ),
        .target(
            name: "MutualStore",
            dependencies: [
                .product(name: "SQLKit", package: "sql-kit"),
                .product(name: "SQLiteKit", package: "sqlite-kit"),
                .product(name: "Crypto", package: "swift-crypto"),
                .product(name: "Logging", package: "swift-log"),
            ]
        ),
        .target(
            name: "MutualAuthority",
            dependencies: [
                "MutualPKI",
                "MutualStore",
                .product(name: "Logging", package: "swift-log"),
            ]
        ),
        .target(
            name: "TestSupport",
            dependencies: [
                "MutualPKI",
                .product(name: "X509", package: "swift-certificates"),
                .product(name: "Crypto", package: "swift-crypto"),
                .product(name: "SwiftASN1", package: "swift-asn1"),
            ]
        ),
        .executableTarget(
            name: "mutual",
            dependencies: [
                "MutualPKI",
                "MutualStore",
                "MutualAuthority",
                .product(name: "ArgumentParser", package: "swift-argument-parser"),
                .product(name: "Logging", package: "swift-log"),
            ]
        ),
        .testTarget(
            name: "MutualPKITests",
            dependencies: [
                "MutualPKI", "TestSupport", .product(name: "X509", package: "swift-certificates"),
                .product(name: "SwiftASN1", package: "swift-asn1"), .product(name: "Crypto", package: "swift-crypto"),
                .product(name: "_CryptoExtras", package: "swift-crypto"),
            ]
        ),
        .testTarget(
            name: "MutualStoreTests",
            dependencies: ["MutualStore", .product(name: "SQLiteKit", package: "sqlite-kit")]
        ),
        .testTarget(
            name: "MutualAuthorityTests",
            dependencies: [
                "MutualAuthority", "MutualPKI", "MutualStore", "TestSupport",
                .product(name: "X509", package: "swift-certificates"),
                .product(name: "SQLiteKit", package: "sqlite-kit"),
            ]
        ),
        .testTarget(
            name: "MutualCLITests",
            dependencies: ["MutualPKI", "TestSupport", .product(name: "X509", package: "swift-certificates")]
        ),
    ],
    swiftLanguageModes: [.v6]
)
