import Foundation
import Synchronization

/// A SoftHSM2 token store private to this test process. SoftHSM reads `SOFTHSM2_CONF` and its token directory once,
/// when the module is initialized, so every test in a process shares one store, made up front with a pool of tokens;
/// ``makeToken()`` hands each test a token of its own. Tokens are made with Debian's `softhsm2-util` (the tool an
/// operator uses), not through the code under test.
public final class SoftHSM: Sendable {
    public static let modulePath = "/usr/lib/softhsm/libsofthsm2.so"
    public let directory: String
    public let configPath: String
    public let pinFile: String
    public static let userPIN = "246810"
    public static let soPIN = "13579111"

    public static let shared: SoftHSM = {
        let directory = NSTemporaryDirectory() + "mutual-softhsm-\(getpid())"
        try? FileManager.default.createDirectory(atPath: directory + "/tokens", withIntermediateDirectories: true)
        let config = directory + "/softhsm2.conf"
        try? "directories.tokendir = \(directory)/tokens\nobjectstore.backend = file\nlog.level = ERROR\n".write(
            toFile: config, atomically: true, encoding: .utf8
        )
        let pin = directory + "/pin"
        try? (userPIN + "\n").write(toFile: pin, atomically: true, encoding: .utf8)
        setenv("SOFTHSM2_CONF", config, 1)
        let hsm = SoftHSM(directory: directory, configPath: config, pinFile: pin)
        for i in 0..<poolSize { try? hsm.initToken(label(i)) }
        return hsm
    }()

    static let poolSize = 24
    private let next = Mutex(0)

    private init(directory: String, configPath: String, pinFile: String) {
        self.directory = directory
        self.configPath = configPath
        self.pinFile = pinFile
    }

    /// A token no other test has used; returns its label.
    public func makeToken() throws -> String {
        let index = next.withLock { n -> Int in
            defer { n += 1 }
            return n
        }
        guard index < Self.poolSize else { throw SoftHSMError(message: "the test token pool (\(Self.poolSize)) is used up: raise SoftHSM.poolSize") }
        return Self.label(index)
    }

    /// Fixed width ("pool-07"), so that no label is a prefix of another.
    static func label(_ index: Int) -> String { "pool-" + (index < 10 ? "0" : "") + String(index) }

    /// Makes a token with `softhsm2-util`.
    func initToken(_ label: String) throws {
        let process = Process()
        process.executableURL = URL(fileURLWithPath: "/usr/bin/softhsm2-util")
        process.arguments = ["--init-token", "--free", "--label", label, "--pin", Self.userPIN, "--so-pin", Self.soPIN]
        var environment = ProcessInfo.processInfo.environment
        environment["SOFTHSM2_CONF"] = configPath
        process.environment = environment
        process.standardOutput = FileHandle.nullDevice
        let errors = Pipe()
        process.standardError = errors
        try process.run()
        process.waitUntilExit()
        guard process.terminationStatus == 0 else {
            let text = String(decoding: errors.fileHandleForReading.readDataToEndOfFile(), as: UTF8.self)
            throw SoftHSMError(message: "softhsm2-util --init-token failed: \(text)")
        }
    }

    /// A key-store URI for `object` in `token`, the PIN from a file.
    public func uri(token: String, object: String) -> String {
        "pkcs11:token=\(token);object=\(object)?module-path=\(Self.modulePath)&pin-source=file:\(pinFile)"
    }

    /// The directory SoftHSM keeps the token labelled `label` in (moving it away is how a test takes the token away).
    public func tokenDirectory(label: String) -> String? {
        let directories = ((try? FileManager.default.contentsOfDirectory(atPath: directory + "/tokens")) ?? []).map { directory + "/tokens/" + $0 }
        return directories.first { dir in
            (try? Data(contentsOf: URL(fileURLWithPath: dir + "/token.object")))?.range(of: Data(label.utf8)) != nil
        }
    }

    public struct SoftHSMError: Error, CustomStringConvertible {
        public var message: String
        public var description: String { message }
    }
}
