import Foundation
import Testing

/// Runs the built `mutual` executable as a user would, with its own environment.
struct CLI {
    struct Result {
        var status: Int32
        var stdout: String
        var stderr: String
        var output: String { stdout + stderr }
    }

    static let binary: String = {
        if let explicit = ProcessInfo.processInfo.environment["MUTUAL_BIN"] { return explicit }
        // Tests/MutualCLITests/CLIRunner.swift -> package root -> .build/debug/mutual
        let root = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent().deletingLastPathComponent()
        return root.appendingPathComponent(".build/debug/mutual").path
    }()

    let home: String

    init() {
        home = FileManager.default.temporaryDirectory.appendingPathComponent("mutual-cli-\(UUID().uuidString.prefix(8))").path
        try? FileManager.default.createDirectory(atPath: home, withIntermediateDirectories: true)
    }

    func cleanup() { try? FileManager.default.removeItem(atPath: home) }

    @discardableResult
    func run(_ arguments: [String], environment: [String: String] = [:], stdin: Data? = nil) throws -> Result {
        let process = Process()
        process.executableURL = URL(fileURLWithPath: Self.binary)
        process.arguments = arguments
        var env = ["HOME": home, "PATH": "/usr/bin:/bin", "MUTUAL_STATE_DIR": home + "/state"]
        env.merge(environment) { $1 }
        process.environment = env
        let out = Pipe()
        let err = Pipe()
        process.standardOutput = out
        process.standardError = err
        process.standardInput = FileHandle.nullDevice
        try process.run()
        let stdoutData = out.fileHandleForReading.readDataToEndOfFile()
        let stderrData = err.fileHandleForReading.readDataToEndOfFile()
        process.waitUntilExit()
        return Result(status: process.terminationStatus, stdout: String(decoding: stdoutData, as: UTF8.self),
                      stderr: String(decoding: stderrData, as: UTF8.self))
    }

    /// `mutual list --json` rows and `audit list --json` events, to check "nothing changed".
    func snapshot(_ state: String) throws -> (certificates: Int, events: Int) {
        let list = try run(["list", "--state-dir", state, "--json"])
        let audit = try run(["audit", "list", "--state-dir", state, "--json"])
        let certificates = (try JSONSerialization.jsonObject(with: Data(list.stdout.utf8)) as? [Any])?.count ?? -1
        let events = (try JSONSerialization.jsonObject(with: Data(audit.stdout.utf8)) as? [Any])?.count ?? -1
        return (certificates, events)
    }
}
