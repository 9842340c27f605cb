import ArgumentParser
import Foundation
import Logging
import ServiceLifecycle
import AsyncHTTPClient
import HTTPTypes
import Hummingbird
import MutualAgent
import MutualAuthority
import MutualClient
import MutualPKI
import MutualProxy
import MutualServer
import NIOCore
import NIOSSL
import X509

struct QuickstartCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "quickstart",
        abstract: "The whole story in one command: an authority, an app behind mutual proxy with an agent-managed identity, a client enrolling with a token and calling over mTLS, refusals, revocation, inventory and audit."
    )

    @Flag(help: "Keep the temporary directory instead of deleting it.")
    var keep = false

    func run() async throws {
        let started = Date.now
        let dir = FileManager.default.temporaryDirectory.appendingPathComponent("mutual-quickstart-\(UUID().uuidString.prefix(8))").path
        defer { if !keep { try? FileManager.default.removeItem(atPath: dir) } }
        let state = StateDirectory(path: dir + "/ca")
        func step(_ text: String) { print(String(format: "[%4.1fs] ", Date.now.timeIntervalSince(started)) + text) }

        step("Creating a throwaway CA in \(state.path) (SQLite inventory, P-256)")
        let initResult = try await failing {
            try await Authority.initialize(state: state, name: "Quickstart CA", keyType: .p256, constraints: .init(), passphrase: nil, actor: "quickstart")
        }
        print("       root SHA-256 \(initResult.rootFingerprint)")
        let authority = try await failing { try await Authority.open(state: state) }
        var logger = Logger(label: "mutual.quickstart")
        logger.logLevel = .critical
        let server = AuthorityServer(authority: authority, configuration: .init(host: "127.0.0.1", port: 0), logger: logger)
        let (ports, portContinuation) = AsyncStream<Int>.makeStream()
        let serverTask = Task { try await server.run { portContinuation.yield($0) } }
        var port = 0
        for await p in ports { port = p; break }
        let url = "https://127.0.0.1:\(port)"
        do {
            step("Authority listening on \(url) (its own server certificate, issued from the intermediate)")
            let tokens = TokenService(store: authority.store)
            func mint(_ scope: String, owner: String) async throws -> String {
                try await failing {
                    try await tokens.create(
                        scopes: [scope], profile: .workload, maxValidity: .hours(1), ttl: .minutes(10), uses: 1, owner: owner,
                        actor: "quickstart", caMaximum: authority.ca.policy.maximumValidity
                    ).token
                }
            }

            // 1. A tiny app that answers with the identity the proxy forwarded to it.
            let app = try await EchoApp.start(logger: logger)
            step("Started a tiny app on http://127.0.0.1:\(app.port) that prints the identity it is given")

            // 2. The app's sidecar: mutual proxy with an agent-managed identity.
            let appIdentity = "spiffe://quickstart.test/ns/demo/sa/app"
            let appToken = try await mint(appIdentity, owner: "quickstart app")
            let agentLogger = Logger(label: "mutual.quickstart.agent", factory: { _ in SwiftLogNoOpLogHandler() })
            let appAgent = Agent(configuration: try Agent.Configuration(
                authority: url, rootFingerprint: initResult.rootFingerprint, token: appToken, identity: appIdentity, outDir: dir + "/app-identity",
                validity: .minutes(10)
            ), logger: agentLogger)
            guard case .enrolled(let appSerial) = await appAgent.step() else { throw CommandFailure("quickstart: the app's agent could not enroll") }
            step("The app's agent generated a key locally and enrolled \(appIdentity) with a 1-use token (serial \(appSerial))")
            let proxyConfiguration = ProxyConfiguration(
                listeners: [.init(
                    name: "app", listen: "127.0.0.1:0", upstream: "http://127.0.0.1:\(app.port)", cert: dir + "/app-identity/chain.pem",
                    key: dir + "/app-identity/key.pem", clientCA: dir + "/app-identity/bundle.pem", allow: ["spiffe://quickstart.test/ns/demo/*"]
                )],
                revocation: .init(authority: url, authorityCA: state.rootCertificatePath), accessLog: "off", drainTimeout: 1
            )
            let proxy = try ProxyServer(configuration: proxyConfiguration, logger: logger)
            try await proxy.start()
            // The proxy runs as a service (file watching, revocation events) until the end of the story.
            let proxyGroup = ServiceGroup(configuration: .init(services: [proxy], logger: logger))
            async let proxyServed: Void = proxyGroup.run()
            let proxyPort = proxy.boundAddresses["app"]?.port ?? 0
            let renewals = Task { try? await Agent(configuration: appAgent.configuration, logger: agentLogger, onDelivered: { await proxy.reload(force: false) }).run() }
            defer { renewals.cancel() }
            step("mutual proxy in front of the app on https://127.0.0.1:\(proxyPort): allow spiffe://quickstart.test/ns/demo/*, revocation events from the authority")

            // 3. A client enrolls with its own scoped token and calls the app over mTLS.
            let clientIdentity = "spiffe://quickstart.test/ns/demo/sa/client"
            let clientAgent = Agent(configuration: try Agent.Configuration(
                authority: url, rootFingerprint: initResult.rootFingerprint, token: try await mint(clientIdentity, owner: "quickstart client"),
                identity: clientIdentity, outDir: dir + "/client-identity", validity: .minutes(10)
            ), logger: agentLogger)
            guard case .enrolled(let clientSerial) = await clientAgent.step() else { throw CommandFailure("quickstart: the client could not enroll") }
            step("Client enrolled \(clientIdentity) (serial \(clientSerial)); its key never left \(dir)/client-identity")
            let proxyURL = "https://127.0.0.1:\(proxyPort)/hello"
            let answer = try await QuickstartCall.get(proxyURL, root: authority.ca.root, identityDir: dir + "/client-identity")
            guard answer.status == 200 else { throw CommandFailure("quickstart: the client's call failed: \(answer)") }
            step("Client -> proxy -> app: 200; the app saw: \(answer.body)")

            // 4. Refusals: no certificate, and an identity the policy does not allow.
            let anonymous = try await QuickstartCall.get(proxyURL, root: authority.ca.root, identityDir: nil)
            step("Call without a client certificate: refused (\(anonymous.body))")
            let intruderIdentity = "spiffe://quickstart.test/ns/other/sa/intruder"
            let intruder = Agent(configuration: try Agent.Configuration(
                authority: url, rootFingerprint: initResult.rootFingerprint, token: try await mint(intruderIdentity, owner: "quickstart intruder"),
                identity: intruderIdentity, outDir: dir + "/intruder-identity", validity: .minutes(10)
            ), logger: agentLogger)
            _ = await intruder.step()
            let denied = try await QuickstartCall.get(proxyURL, root: authority.ca.root, identityDir: dir + "/intruder-identity")
            step("Call as \(intruderIdentity): \(denied.status) \(denied.body)")

            // 5. Revoke the client: the proxy hears it from the event stream and refuses the next call.
            let revokedAt = Date.now
            _ = try await authority.revoke(serial: clientSerial, reason: .keyCompromise, actor: "quickstart")
            var refused: QuickstartCall.Answer?
            for _ in 0..<40 {
                let next = try await QuickstartCall.get(proxyURL, root: authority.ca.root, identityDir: dir + "/client-identity")
                if next.status != 200 { refused = next; break }
                try await Task.sleep(for: .milliseconds(50))
            }
            guard let refused else { throw CommandFailure("quickstart: the revoked client was still accepted after 2 s") }
            step(String(format: "Revoked the client; %.0f ms later its next call was refused (%@)", Date.now.timeIntervalSince(revokedAt) * 1000, refused.body))
            await proxyGroup.triggerGracefulShutdown()
            try await proxyServed
            try await app.stop()

            print("\nInventory:")
            for r in try await authority.store.certificates(.init(now: .now)) {
                print("  \(r.serial)  \(r.profile.padding(toLength: 12, withPad: " ", startingAt: 0)) \(r.effectiveStatus(at: .now).padding(toLength: 8, withPad: " ", startingAt: 0)) \(r.identity)  (by \(r.requester))")
            }
            print("\nAudit trail:")
            for e in try await authority.store.auditEvents() {
                print("  #\(e.sequence) \(e.action.padding(toLength: 12, withPad: " ", startingAt: 0)) \(e.actor.padding(toLength: 40, withPad: " ", startingAt: 0)) \(e.subject)")
            }
            switch try await authority.store.verifyAudit() {
            case .intact(let count, _): print("  audit trail intact: \(count) events, hash chain verified")
            case .broken(let sequence, let reason): throw CommandFailure("audit trail broken at #\(sequence): \(reason)")
            }
        } catch {
            serverTask.cancel()
            _ = try? await serverTask.value
            try? await authority.close()
            throw error
        }
        serverTask.cancel()
        _ = try? await serverTask.value
        try await authority.close()
        print(String(format: "\nDone in %.1f s.%@", Date.now.timeIntervalSince(started), keep ? " Files kept in \(dir)" : ""))
    }
}

/// The quickstart's app: answers every request with the identity the proxy forwarded (the URI in XFCC).
struct EchoApp {
    let port: Int
    let task: Task<Void, any Error>

    static func start(logger: Logger) async throws -> EchoApp {
        let router = Router()
        router.get("/**") { request, _ -> String in
            let xfcc = request.headers[HTTPField.Name("x-forwarded-client-cert")!] ?? ""
            let uri = xfcc.split(separator: ";").first { $0.hasPrefix("URI=") }.map { String($0.dropFirst(4)) } ?? "no identity"
            return "hello \(uri)"
        }
        let (ports, continuation) = AsyncStream<Int>.makeStream()
        let app = Application(
            router: router, configuration: .init(address: .hostname("127.0.0.1", port: 0), serverName: nil),
            onServerRunning: { channel in continuation.yield(channel.localAddress?.port ?? 0) }, logger: logger
        )
        let task = Task { try await app.runService() }
        var port = 0
        for await p in ports { port = p; break }
        return EchoApp(port: port, task: task)
    }

    func stop() async throws {
        task.cancel()
        _ = try? await task.value
    }
}

/// One HTTPS GET as a client would make it, with the agent-delivered certificate (or none).
enum QuickstartCall {
    struct Answer: CustomStringConvertible {
        var status: Int
        var body: String
        var description: String { "\(status) \(body)" }
    }

    static func get(_ url: String, root: Certificate, identityDir: String?) async throws -> Answer {
        var tls = TLSConfiguration.makeClientConfiguration()
        tls.trustRoots = .certificates([try NIOSSLCertificate(bytes: try root.derBytes, format: .der)])
        tls.certificateVerification = .noHostnameVerification
        if let identityDir, let current = try Delivery.read(outDir: identityDir) {
            tls.certificateChain = try current.chain.map { .certificate(try NIOSSLCertificate(bytes: try $0.der, format: .der)) }
            tls.privateKey = .privateKey(try current.key.tlsPrivateKey())
        }
        var configuration = HTTPClient.Configuration(tlsConfiguration: tls)
        configuration.connectionPool = .init(idleTimeout: .seconds(1), concurrentHTTP1ConnectionsPerHostSoftLimit: 1)
        // Over TLS 1.3 the proxy refuses a client certificate after the client has finished its side of the
        // handshake; AsyncHTTPClient (negotiating h2) takes the alert as a failed connection attempt and, by default,
        // retries with back-off until the request's deadline. Show the refusal as curl does: at once.
        configuration.connectionPool.retryConnectionEstablishment = false
        let client = HTTPClient(eventLoopGroupProvider: .singleton, configuration: configuration)
        defer { Task { try? await client.shutdown() } }
        do {
            let response = try await client.execute(HTTPClientRequest(url: url), timeout: .seconds(5))
            var body = try await response.body.collect(upTo: 64 * 1024)
            return Answer(status: Int(response.status.code), body: (body.readString(length: body.readableBytes) ?? "").trimmingCharacters(in: .whitespacesAndNewlines))
        } catch {
            // BoringSSL's reason code for the alert the proxy sent (a stable identifier), not the error's prose.
            let reason = AuthorityClientError.tlsReason(in: "\(error)")
            return Answer(status: 0, body: reason == "tlsv1_alert_certificate_required" || reason == "tlsv13_alert_certificate_required" ? "TLS alert: certificate required" : "TLS handshake failed")
        }
    }
}
