import AsyncHTTPClient
import Foundation
import Logging
import MutualPKI
import NIOCore
import NIOSSL
import Synchronization
import X509

/// Feeds ``RevocationState``: CRL files (re-read when they change), CRL URLs (fetched every `refresh` seconds and at
/// half their validity), and the authority's revocation event stream (Server-Sent Events, resumed with
/// `Last-Event-ID`). Whatever newly revokes a certificate closes its open connections.
final class RevocationSources: Sendable {
    let configuration: ProxyConfiguration.Revocation
    let runtime: ProxyRuntime
    let http: HTTPClient?
    let events: HTTPClient?
    private let fileStamps = Mutex<[String: FileStamp?]>([:])
    private let lastEventID = Mutex<Int64>(0)

    var sources: [String] { configuration.crl ?? [] }
    var refreshInterval: Double { configuration.refresh ?? 60 }

    init(configuration: ProxyConfiguration.Revocation, runtime: ProxyRuntime) throws {
        var configuration = configuration
        if configuration.crl == nil, let authority = configuration.authority {
            configuration.crl = [authority.trimmingSuffixSlash() + "/crls.pem"]
        }
        self.configuration = configuration
        self.runtime = runtime
        var tls = TLSConfiguration.makeClientConfiguration()
        tls.minimumTLSVersion = .tlsv12
        if let caPath = configuration.authorityCA {
            let roots = try LoadedCredentials.readCertificates(caPath, what: "authority-ca")
            tls.trustRoots = .certificates(try roots.map { try NIOSSLCertificate(bytes: try $0.derBytes, format: .der) })
        }
        if (configuration.crl ?? []).contains(where: { $0.hasPrefix("http") }) {
            var client = HTTPClient.Configuration(tlsConfiguration: tls)
            client.timeout = .init(connect: .seconds(5), read: .seconds(15))
            http = HTTPClient(eventLoopGroupProvider: .singleton, configuration: client)
        } else {
            http = nil
        }
        if configuration.authority != nil {
            // The event stream is closed by us mid-response (at shutdown); the authority keeps streaming instead of
            // answering our close_notify, so do not wait swift-nio-ssl's default 5 s for it.
            var streamTLS = tls
            streamTLS.shutdownTimeout = .milliseconds(200)
            var client = HTTPClient.Configuration(tlsConfiguration: streamTLS)
            // The authority sends a keep-alive comment at least every 15 s; silence longer than this is a dead stream.
            client.timeout = .init(connect: .seconds(5), read: .seconds(45))
            events = HTTPClient(eventLoopGroupProvider: .singleton, configuration: client)
        } else {
            events = nil
        }
        runtime.revocation.expect(sources: sources)
    }

    func shutdown() async {
        try? await http?.shutdown()
        try? await events?.shutdown()
    }

    /// Loads every source once; files that fail are an error at start (a typo should not run unprotected).
    func loadAll(initial: Bool) async throws {
        for source in sources {
            do {
                try await load(source)
            } catch {
                runtime.metrics.crlRefreshFailed(source: source)
                if initial && !source.hasPrefix("http") { throw error }
                runtime.logger.error("CRL refresh failed; keeping the last good CRL", metadata: ["source": "\(source)", "error": "\(error)"])
            }
        }
        runtime.metrics.setCRLStale(runtime.revocation.isStale())
    }

    /// Re-reads file sources whose stamp changed.
    func reloadChangedFiles() async {
        for source in sources where !source.hasPrefix("http") {
            let stamp = FileStamp(path: source)
            let changed = fileStamps.withLock { stamps -> Bool in
                guard let old = stamps[source], old == stamp else { return true }
                return false
            }
            guard changed else { continue }
            do {
                try await load(source)
            } catch {
                runtime.metrics.crlRefreshFailed(source: source)
                runtime.logger.error("CRL reload failed; keeping the last good CRL", metadata: ["source": "\(source)", "error": "\(error)"])
            }
        }
        runtime.metrics.setCRLStale(runtime.revocation.isStale())
    }

    func load(_ source: String) async throws {
        let bytes: [UInt8]
        if source.hasPrefix("http"), let http {
            var request = HTTPClientRequest(url: source)
            request.method = .GET
            let response = try await http.execute(request, timeout: .seconds(15))
            guard response.status == .ok else { throw ProxyError("GET \(source): HTTP \(response.status.code)") }
            var body = try await response.body.collect(upTo: LoadedCredentials.maximumFileSize)
            bytes = body.readBytes(length: body.readableBytes) ?? []
        } else {
            let stamp = FileStamp(path: source)
            bytes = try LoadedCredentials.readFile(source, what: "CRL")
            fileStamps.withLock { $0[source] = stamp }
        }
        let crls: [RevocationList]
        do {
            crls = try RevocationList.all(in: bytes)
        } catch {
            throw ProxyError("CRL \(source) could not be parsed: \(error)")
        }
        guard !crls.isEmpty else { throw ProxyError("CRL \(source) contains no CRL") }
        var newlyRevoked = 0
        for crl in crls {
            newlyRevoked += runtime.revocation.install(crl, source: source).count
        }
        runtime.metrics.crlRefreshed(source: source)
        if newlyRevoked > 0 { closeRevoked(trigger: "CRL \(source)") }
    }

    func closeRevoked(trigger: String) {
        let closed = runtime.registry.closeRevoked(runtime.revocation)
        guard !closed.isEmpty else { return }
        runtime.metrics.revokedConnectionsClosed(closed.count)
        for (serial, reason) in closed {
            runtime.logger.notice("closed connection of revoked certificate", metadata: ["serial": "\(serial)", "reason": "\(reason)", "trigger": "\(trigger)"])
        }
    }

    /// Periodic CRL URL refresh until cancelled.
    func refreshLoop() async {
        let urls = sources.filter { $0.hasPrefix("http") }
        guard !urls.isEmpty else { return }
        var next: [String: Date] = [:]
        for url in urls { next[url] = Date().addingTimeInterval(refreshInterval) }
        while !Task.isCancelled {
            try? await Task.sleep(for: .seconds(1))
            let now = Date()
            for url in urls where (next[url] ?? now) <= now || (runtime.revocation.refreshDue(source: url).map { $0 <= now && next[url]! > now.addingTimeInterval(5) } ?? false) {
                do {
                    try await load(url)
                } catch {
                    runtime.metrics.crlRefreshFailed(source: url)
                    runtime.logger.error("CRL refresh failed; keeping the last good CRL", metadata: ["source": "\(url)", "error": "\(error)"])
                }
                next[url] = now.addingTimeInterval(refreshInterval)
            }
            runtime.metrics.setCRLStale(runtime.revocation.isStale(now: now))
        }
    }

    /// Follows the authority's revocation events until cancelled, reconnecting with `Last-Event-ID`.
    func eventLoop() async {
        guard let events, let authority = configuration.authority else { return }
        let url = authority.trimmingSuffixSlash() + "/v1/revocations/events"
        while !Task.isCancelled {
            do {
                var request = HTTPClientRequest(url: url)
                let last = lastEventID.withLock { $0 }
                if last > 0 { request.headers.add(name: "Last-Event-ID", value: String(last)) }
                let response = try await events.execute(request, deadline: .distantFuture)
                guard response.status == .ok else { throw ProxyError("GET \(url): HTTP \(response.status.code)") }
                runtime.metrics.revocationEventsConnected(true)
                runtime.logger.info("following revocation events", metadata: ["authority": "\(authority)"])
                var parser = ServerSentEvents()
                for try await chunk in response.body {
                    for event in parser.feed(chunk.readableBytesView) where event.type == "revocation" {
                        handle(event)
                    }
                }
                throw ProxyError("event stream ended")
            } catch {
                runtime.metrics.revocationEventsConnected(false)
                if Task.isCancelled { return }
                runtime.logger.warning("revocation event stream interrupted; reconnecting", metadata: ["error": "\(error)"])
                try? await Task.sleep(for: .seconds(1))
            }
        }
    }

    private func handle(_ event: ServerSentEvents.Event) {
        struct Payload: Decodable {
            var serial: String
            var reason: String?
        }
        guard let payload = try? JSONDecoder().decode(Payload.self, from: Data(event.data.utf8)) else {
            runtime.logger.warning("ignoring malformed revocation event", metadata: ["data": "\(event.data.prefix(200))"])
            return
        }
        if let id = event.id.flatMap(Int64.init) { lastEventID.withLock { $0 = max($0, id) } }
        runtime.metrics.revocationEvent()
        if runtime.revocation.push(serial: payload.serial, reason: payload.reason ?? "unspecified") {
            closeRevoked(trigger: "revocation event \(event.id ?? "")")
        }
    }
}

/// A minimal Server-Sent Events parser (WHATWG HTML, "event stream interpretation"): fields `id`, `event`, `data`,
/// events separated by blank lines, comments ignored. Lines are capped at 64 KiB.
struct ServerSentEvents {
    struct Event {
        var id: String?
        var type: String
        var data: String
    }

    private var line: [UInt8] = []
    private var id: String?
    private var type = "message"
    private var data: [String] = []

    mutating func feed(_ bytes: some Sequence<UInt8>) -> [Event] {
        var out: [Event] = []
        for byte in bytes {
            if byte == UInt8(ascii: "\n") {
                if let event = process(line) { out.append(event) }
                line.removeAll(keepingCapacity: true)
            } else if byte != UInt8(ascii: "\r") && line.count < 65536 {
                line.append(byte)
            }
        }
        return out
    }

    private mutating func process(_ raw: [UInt8]) -> Event? {
        guard !raw.isEmpty else {
            defer { data = []; type = "message" }
            guard !data.isEmpty else { return nil }
            return Event(id: id, type: type, data: data.joined(separator: "\n"))
        }
        if raw.first == UInt8(ascii: ":") { return nil }
        let text = String(decoding: raw, as: UTF8.self)
        let field: Substring
        var value: Substring
        if let colon = text.firstIndex(of: ":") {
            field = text[..<colon]
            value = text[text.index(after: colon)...]
            if value.first == " " { value = value.dropFirst() }
        } else {
            field = Substring(text)
            value = ""
        }
        switch field {
        case "id": id = String(value)
        case "event": type = String(value)
        case "data": data.append(String(value))
        default: break
        }
        return nil
    }
}

extension String {
    func trimmingSuffixSlash() -> String { hasSuffix("/") ? String(dropLast()) : self }
}
