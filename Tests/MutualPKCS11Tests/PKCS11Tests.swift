import Crypto
import Foundation
import MutualPKCS11
import MutualPKI
import SwiftASN1
import TestSupport
import Testing
import X509

@Suite("PKCS#11 URIs (RFC 7512)")
struct PKCS11URITests {
    @Test func parsesTheFormsOperatorsWrite() throws {
        let uri = try PKCS11URI(
            "pkcs11:token=mutual;object=issuing;id=%01%a2?module-path=/usr/lib/softhsm/libsofthsm2.so&pin-source=file:/etc/mutual/pin"
        )
        #expect(uri.token == "mutual")
        #expect(uri.object == "issuing")
        #expect(uri.id == [0x01, 0xA2])
        #expect(uri.modulePath == "/usr/lib/softhsm/libsofthsm2.so")
        #expect(uri.pinSource == "file:/etc/mutual/pin")
        // Round trip through the canonical text (what config.json keeps).
        #expect(try PKCS11URI(uri.description) == uri)
        let spaced = try PKCS11URI("pkcs11:token=My%20Token;object=a%3Bb?module-name=softhsm2&x-vendor=1")
        #expect(spaced.token == "My Token")
        #expect(spaced.object == "a;b")
        #expect(try PKCS11URI(spaced.description) == spaced)
    }

    @Test func neverWritesThePINValue() throws {
        let uri = try PKCS11URI("pkcs11:token=t;object=k?module-path=/m.so&pin-value=s3cret")
        #expect(try uri.pin() == "s3cret")
        #expect(!uri.description.contains("s3cret"))
    }

    @Test func readsThePINFromItsSourceOrTheEnvironment() throws {
        let file = NSTemporaryDirectory() + "pin-\(UUID().uuidString)"
        try "1234\nignored\n".write(toFile: file, atomically: true, encoding: .utf8)
        defer { try? FileManager.default.removeItem(atPath: file) }
        #expect(try PKCS11URI("pkcs11:token=t?module-path=/m.so&pin-source=file:\(file)").pin() == "1234")
        #expect(try PKCS11URI("pkcs11:token=t?module-path=/m.so&pin-source=\(file)").pin() == "1234")
        #expect(try PKCS11URI("pkcs11:token=t?module-path=/m.so").pin(environment: ["MUTUAL_PKCS11_PIN": "99"]) == "99")
        let missing = #expect(throws: PKCS11Error.self) {
            try PKCS11URI("pkcs11:token=t?module-path=/m.so&pin-source=file:/nonexistent/pin").pin()
        }
        #expect(missing?.code == .pinUnreadable)
    }

    @Test(arguments: [
        "", "pkcs12:token=a?module-path=/m.so", "token=a", "pkcs11:token=a", "pkcs11:token=a;token=b?module-path=/m.so",
        "pkcs11:tokn=a?module-path=/m.so", "pkcs11:token=%zz?module-path=/m.so", "pkcs11:token=%4?module-path=/m.so",
        "pkcs11:token?module-path=/m.so", "pkcs11:slot-id=x?module-path=/m.so", "pkcs11:type=weird?module-path=/m.so",
        "pkcs11:token=a?module-path=/m.so&pin-value=1&pin-source=/p", "pkcs11:token=a?module-path=/m.so&evil=1",
        "pkcs11:" + String(repeating: "a", count: 5000),
    ])
    func refusesMalformedURIs(text: String) {
        let error = #expect(throws: PKCS11Error.self) { try PKCS11URI(text) }
        #expect(error?.code == .badURI)
    }
}

@Suite("Keys in a PKCS#11 token (SoftHSM2)", .serialized)
struct PKCS11KeyTests {
    let hsm = SoftHSM.shared

    @Test(arguments: [KeyType.p256, .p384, .ed25519])
    func generatesSignsAndIsFoundAgain(keyType: KeyType) throws {
        let token = try hsm.makeToken()
        let uri = try PKCS11URI(hsm.uri(token: token, object: "ca-\(keyType.rawValue)"))
        let key = try PKCS11Key.generate(uri, keyType: keyType)
        #expect(key.keyType == keyType)
        let protection = try key.protection()
        #expect(protection.sensitive && !protection.extractable)

        // A self-signed CA certificate signed through the token verifies with its public key.
        let ca = try CAFactory.makeHierarchy(name: "Token CA", keyType: keyType, rootKey: key.certificatePrivateKey, now: TestPKI.now)
        #expect(ca.root.publicKey == key.publicKey)
        #expect(ca.root.publicKey.isValidSignature(ca.root.signature, for: ca.root))
        #expect(ca.root.publicKey.isValidSignature(ca.intermediate.signature, for: ca.intermediate))

        // Found again by label alone, and by the id the generated key got.
        let found = try PKCS11Key.find(uri)
        #expect(found.publicKey == key.publicKey)
        #expect(found.uri.id == key.id)
        var byID = uri
        byID.object = nil
        byID.id = key.id
        #expect(try PKCS11Key.find(byID).publicKey == key.publicKey)

        // A CRL signed through the token verifies.
        let crl = try RevocationListBuilder(issuer: ca.root, issuerKey: found.certificatePrivateKey)
            .build(number: 1, thisUpdate: TestPKI.now, nextUpdate: TestPKI.now + 3600, entries: [])
        #expect(try RevocationList(bytes: crl).isSigned(by: ca.root))
        try found.probe()
    }

    @Test func refusesToExportOrToOverwrite() throws {
        let token = try hsm.makeToken()
        let uri = try PKCS11URI(hsm.uri(token: token, object: "k"))
        let key = try PKCS11Key.generate(uri, keyType: .p256)
        #expect(throws: (any Error).self) { try KeyFile.pem(for: key.certificatePrivateKey, passphrase: nil) }
        let again = #expect(throws: PKCS11Error.self) { try PKCS11Key.generate(uri, keyType: .p256) }
        #expect(again?.code == .objectExists)
        let unsupported = #expect(throws: PKCS11Error.self) { try PKCS11Key.generate(uri.naming(object: "rsa"), keyType: .rsa2048) }
        #expect(unsupported?.code == .unsupportedKey)
    }

    @Test func namesEachFailure() throws {
        let token = try hsm.makeToken()
        let good = try PKCS11URI(hsm.uri(token: token, object: "present"))
        // Before this process logs in to the token (login state is per process and token, see PKCS11Token.open).
        let wrongPIN = try PKCS11URI("pkcs11:token=\(token);object=present?module-path=\(SoftHSM.modulePath)&pin-value=000000")
        #expect((#expect(throws: PKCS11Error.self) { try PKCS11Key.find(wrongPIN) })?.code == .pinIncorrect)
        let noPIN = try PKCS11URI("pkcs11:token=\(token);object=present?module-path=\(SoftHSM.modulePath)")
        if ProcessInfo.processInfo.environment["MUTUAL_PKCS11_PIN"] == nil {
            #expect((#expect(throws: PKCS11Error.self) { try PKCS11Key.find(noPIN) })?.code == .pinIncorrect)
        }
        _ = try PKCS11Key.generate(good, keyType: .p256)

        let noToken = try PKCS11URI(hsm.uri(token: "no-such-token", object: "present"))
        #expect((#expect(throws: PKCS11Error.self) { try PKCS11Key.find(noToken) })?.code == .tokenNotFound)

        #expect((#expect(throws: PKCS11Error.self) { try PKCS11Key.find(good.naming(object: "absent")) })?.code == .objectNotFound)

        let noModule = try PKCS11URI("pkcs11:token=\(token);object=present?module-path=/nonexistent/libmodule.so&pin-value=1")
        #expect((#expect(throws: PKCS11Error.self) { try PKCS11Key.find(noModule) })?.code == .moduleUnloadable)

        // A shared library that is not a PKCS#11 module.
        let libz = ["/usr/lib/x86_64-linux-gnu/libz.so.1", "/lib/x86_64-linux-gnu/libz.so.1", "/usr/lib/aarch64-linux-gnu/libz.so.1"]
            .first { FileManager.default.fileExists(atPath: $0) }!
        let notModule = try PKCS11URI("pkcs11:token=\(token);object=present?module-path=\(libz)&pin-value=1")
        #expect((#expect(throws: PKCS11Error.self) { try PKCS11Key.find(notModule) })?.code == .moduleUnloadable)

        // A file that is not a shared library at all.
        let garbage = NSTemporaryDirectory() + "garbage-\(UUID().uuidString).so"
        try Data("not an ELF file".utf8).write(to: URL(fileURLWithPath: garbage))
        defer { try? FileManager.default.removeItem(atPath: garbage) }
        let garbageURI = try PKCS11URI("pkcs11:token=\(token);object=present?module-path=\(garbage)&pin-value=1")
        #expect((#expect(throws: PKCS11Error.self) { try PKCS11Key.find(garbageURI) })?.code == .moduleUnloadable)
    }

    @Test func tokenRemovedWhileInUseIsNamedAndRecovered() throws {
        let token = try hsm.makeToken()
        let uri = try PKCS11URI(hsm.uri(token: token, object: "removable"))
        let key = try PKCS11Key.generate(uri, keyType: .p256)
        try key.probe()
        // Take the token away: move its directory out of SoftHSM's store.
        let directory = try #require(hsm.tokenDirectory(label: token))
        let aside = directory + ".removed"
        try FileManager.default.moveItem(atPath: directory, toPath: aside)
        let error = #expect(throws: PKCS11Error.self) { try key.probe() }
        #expect(error?.code == .tokenRemoved)
        // And again: still named as removed, not as some other failure.
        #expect((#expect(throws: PKCS11Error.self) { try key.probe() })?.code == .tokenRemoved)
        // (SoftHSM does not look for tokens again after start, so putting it back is seen only by a new process.)
        try FileManager.default.moveItem(atPath: aside, toPath: directory)
    }

    @Test func signsConcurrently() async throws {
        let token = try hsm.makeToken()
        let key = try PKCS11Key.generate(try PKCS11URI(hsm.uri(token: token, object: "busy")), keyType: .p256)
        let publicKey = try #require(P256.Signing.PublicKey(key.publicKey))
        let results = try await withThrowingTaskGroup(of: Bool.self) { group in
            for i in 0..<64 {
                group.addTask {
                    let message = Array("message \(i)".utf8)
                    let signature = try key.sign(message: message)
                    return publicKey.isValidSignature(try P256.Signing.ECDSASignature(derRepresentation: signature), for: message)
                }
            }
            return try await group.reduce(into: [Bool]()) { $0.append($1) }
        }
        #expect(results.count == 64 && results.allSatisfy { $0 })
    }
}
