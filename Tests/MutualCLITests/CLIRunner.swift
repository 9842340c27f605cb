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

    /// Runs the command on a dispatch thread, so waiting for it never blocks a Swift concurrency thread that servers
    /// in other tests of the same process need.
    @discardableResult
    func run(_ arguments: [String], environment: [String: String] = [:]) async throws -> Result {
        try await withCheckedThrowingContinuation { continuation in
            DispatchQueue.global().async {
                do {
                    continuation.resume(returning: try self.runBlocking(arguments, environment: environment))
                } catch {
                    continuation.resume(throwing: error)
                }
            }
        }
    }

    func runBlocking(_ arguments: [String], environment: [String: String]) throws -> Result {
        let process = Process()
        process.executableURL = URL(fileURLWithPath: Self.binary)
        process.arguments = arguments
        var env = ["HOME": home, "PATH": "/usr/bin:/bin", "MUTUAL_STATE_DIR": home + "/state"]
        env.merge(environment) { $1 }
        process.environment = env
        // Output goes to files, not pipes: a pipe's write end can leak into a child another test spawns at the same
        // moment, and then EOF never comes.
        let outPath = home + "/.out-\(UUID().uuidString)"
        let errPath = home + "/.err-\(UUID().uuidString)"
        FileManager.default.createFile(atPath: outPath, contents: nil)
        FileManager.default.createFile(atPath: errPath, contents: nil)
        let outHandle = try FileHandle(forWritingTo: URL(fileURLWithPath: outPath))
        let errHandle = try FileHandle(forWritingTo: URL(fileURLWithPath: errPath))
        process.standardOutput = outHandle
        process.standardError = errHandle
        process.standardInput = FileHandle.nullDevice
        try process.run()
        // A command that hangs (a daemon that never exits) is ended after two minutes so the suite reports it
        // instead of waiting for ever; it then exits with SIGTERM's status, which no test expects.
        let watchdog = DispatchWorkItem { if process.isRunning { process.terminate() } }
        DispatchQueue.global().asyncAfter(deadline: .now() + 120, execute: watchdog)
        process.waitUntilExit()
        watchdog.cancel()
        try outHandle.close()
        try errHandle.close()
        defer {
            try? FileManager.default.removeItem(atPath: outPath)
            try? FileManager.default.removeItem(atPath: errPath)
        }
        return Result(status: process.terminationStatus, stdout: (try? String(contentsOfFile: outPath, encoding: .utf8)) ?? "",
                      stderr: (try? String(contentsOfFile: errPath, encoding: .utf8)) ?? "")
    }

    /// Starts a daemon (`serve`, `proxy`), waits until its combined output contains `marker` (or `timeout` passes), stops
    /// it with SIGTERM and returns what it printed. Output goes to files, as in ``runBlocking``.
    func runDaemon(_ arguments: [String], until marker: String, timeout: TimeInterval = 20) async throws -> Result {
        let process = Process()
        process.executableURL = URL(fileURLWithPath: Self.binary)
        process.arguments = arguments
        process.environment = ["HOME": home, "PATH": "/usr/bin:/bin", "MUTUAL_STATE_DIR": home + "/state"]
        let outPath = home + "/.out-\(UUID().uuidString)"
        let errPath = home + "/.err-\(UUID().uuidString)"
        FileManager.default.createFile(atPath: outPath, contents: nil)
        FileManager.default.createFile(atPath: errPath, contents: nil)
        let outHandle = try FileHandle(forWritingTo: URL(fileURLWithPath: outPath))
        let errHandle = try FileHandle(forWritingTo: URL(fileURLWithPath: errPath))
        process.standardOutput = outHandle
        process.standardError = errHandle
        process.standardInput = FileHandle.nullDevice
        try process.run()
        let read = { () -> (String, String) in
            ((try? String(contentsOfFile: outPath, encoding: .utf8)) ?? "", (try? String(contentsOfFile: errPath, encoding: .utf8)) ?? "")
        }
        let deadline = Date.now.addingTimeInterval(timeout)
        while process.isRunning && Date.now < deadline {
            let (out, err) = read()
            if (out + err).contains(marker) { break }
            try await Task.sleep(for: .milliseconds(50))
        }
        if process.isRunning { process.terminate() }
        let stopDeadline = Date.now.addingTimeInterval(10)
        while process.isRunning && Date.now < stopDeadline { try await Task.sleep(for: .milliseconds(50)) }
        if process.isRunning { kill(process.processIdentifier, SIGKILL) }
        process.waitUntilExit()
        try outHandle.close()
        try errHandle.close()
        let (out, err) = read()
        try? FileManager.default.removeItem(atPath: outPath)
        try? FileManager.default.removeItem(atPath: errPath)
        return Result(status: process.terminationStatus, stdout: out, stderr: err)
    }

    /// `mutual list --json` rows and `audit list --json` events, to check "nothing changed".
    func snapshot(_ state: String) async throws -> (certificates: Int, events: Int) {
        let list = try await run(["list", "--state-dir", state, "--json"])
        let audit = try await run(["audit", "list", "--state-dir", state, "--json"])
        let certificates = (try JSONSerialization.jsonObject(with: Data(list.stdout.utf8)) as? [Any])?.count ?? -1
        let events = (try JSONSerialization.jsonObject(with: Data(audit.stdout.utf8)) as? [Any])?.count ?? -1
        return (certificates, events)
    }
}

/// A TCP port on 127.0.0.1 held open (listening) by this process, for "address already in use" tests.
final class BusyPort {
    let port: Int
    private let descriptor: Int32

    init() throws {
        let fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
        var address = sockaddr_in()
        address.sin_family = sa_family_t(AF_INET)
        address.sin_addr.s_addr = inet_addr("127.0.0.1")
        address.sin_port = 0
        var length = socklen_t(MemoryLayout<sockaddr_in>.size)
        let bound = withUnsafePointer(to: &address) { $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(fd, $0, length) } }
        guard fd >= 0, bound == 0, listen(fd, 1) == 0 else { throw CocoaError(.fileWriteUnknown) }
        withUnsafeMutablePointer(to: &address) { pointer in
            pointer.withMemoryRebound(to: sockaddr.self, capacity: 1) { _ = getsockname(fd, $0, &length) }
        }
        descriptor = fd
        port = Int(UInt16(bigEndian: address.sin_port))
    }

    deinit { close(descriptor) }
}
