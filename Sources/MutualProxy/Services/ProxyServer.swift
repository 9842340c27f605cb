import Foundation
import Logging
import NIOCore
import NIOHTTP1
import NIOPosix
import ServiceLifecycle
import Synchronization
import UnixSignals

/// `mutual proxy`: binds every listener of a ``ProxyConfiguration``, keeps credentials, bundles, CRLs and policy
/// fresh (file changes and SIGHUP, atomically, keeping the old state when a reload fails), follows revocation, and
/// drains on shutdown. A `Service`: run it in a `ServiceGroup`, whose graceful shutdown (SIGTERM, SIGINT) drains it.
public final class ProxyServer: Service, Sendable {
    public let runtime: ProxyRuntime
    let group: any EventLoopGroup
    let configurationPath: String?
    private let configuration: Mutex<ProxyConfiguration>
    let inbound: [InboundSlot]
    let outbound: [OutboundSlot]
    let pools = UpstreamPools()
    let revocationSources: RevocationSources?
    private let serverChannels = Mutex<[any Channel]>([])
    private let children = ChannelSet()
    private let bound = Mutex<[String: SocketAddress]>([:])
    private let started = Mutex(false)
    private let configurationStamp: Mutex<FileStamp?>

    /// Loads every listener's files; throws with the file and the reason when one cannot be used.
    private let ownedGroup: MultiThreadedEventLoopGroup?

    /// Called after a reload that changed something, with the configuration now in force (the CLI re-runs
    /// `doctor proxy`'s checks there, so a mistake in new files is said when it arrives, not when a client fails).
    private let onReloaded: (@Sendable (ProxyConfiguration) async -> Void)?
    /// Called once ``run()`` has bound every listener (the CLI announces the addresses there).
    private let onStarted: (@Sendable (ProxyServer) async -> Void)?

    /// Runs on `group` when given, else on a group of its own with `threads` event loops (shut down by ``shutdown()``).
    public init(
        configuration: ProxyConfiguration, configurationPath: String? = nil, logger: Logger, group: (any EventLoopGroup)? = nil,
        onReloaded: (@Sendable (ProxyConfiguration) async -> Void)? = nil, onStarted: (@Sendable (ProxyServer) async -> Void)? = nil
    ) throws {
        try configuration.validate()
        self.onReloaded = onReloaded
        self.onStarted = onStarted
        self.configuration = Mutex(configuration)
        self.configurationPath = configurationPath
        self.configurationStamp = Mutex(configurationPath.flatMap(FileStamp.init(path:)))
        if let group {
            self.group = group
            self.ownedGroup = nil
        } else {
            let owned = MultiThreadedEventLoopGroup(numberOfThreads: configuration.threads ?? System.coreCount)
            self.group = owned
            self.ownedGroup = owned
        }
        let revocation = RevocationState(stalePolicy: configuration.revocation?.onStale ?? .deny)
        let accessTokens = try configuration.tokenSource.map { try AccessTokenKeys(source: $0, logger: logger) }
        let runtime = ProxyRuntime(
            metrics: ProxyMetrics(), accessLog: try AccessLog(destination: configuration.accessLog), revocation: revocation, logger: logger,
            accessTokens: accessTokens
        )
        self.runtime = runtime
        var inbound: [InboundSlot] = []
        for (index, listener) in configuration.listeners.enumerated() {
            let name = listener.name ?? "inbound-\(index)"
            let state = try InboundState(name: name, configuration: listener, policy: try configuration.policy(for: listener, label: name))
            runtime.metrics.certificateExpiry(listener: name, notAfter: state.credentials.leaf.notValidAfter)
            inbound.append(InboundSlot(state))
        }
        self.inbound = inbound
        self.outbound = try configuration.outbound.enumerated().map { index, out in
            let state = try OutboundState(name: out.name ?? "outbound-\(index)", configuration: out)
            return OutboundSlot(state)
        }
        for slot in outbound {
            runtime.metrics.certificateExpiry(listener: slot.current.name, notAfter: slot.current.credentials.leaf.notValidAfter)
        }
        self.revocationSources = try configuration.revocation.map { try RevocationSources(configuration: $0, runtime: runtime) }
    }

    /// The address each listener is bound to, by name (`admin` for the admin listener): how tests find port 0 binds.
    public var boundAddresses: [String: SocketAddress] { bound.withLock { $0 } }

    public func inboundState(named name: String) -> InboundState? {
        inbound.first { $0.current.name == name }?.current
    }

    /// Binds all listeners and starts the background work (file watching, CRL refresh, revocation events). Every
    /// address is bound before any is announced: when one cannot be bound, this throws a ``ProxyError`` naming the
    /// key and flag of that address, and nothing has been said to listen (``shutdown()`` closes what was bound).
    public func start() async throws {
        let configuration = self.configuration.withLock { $0 }
        if let sources = revocationSources { try await sources.loadAll(initial: true) }
        var announcements: [(String, Logger.Metadata)] = []
        for slot in inbound {
            let state = slot.current
            let address = try SocketAddressSpec(parsing: state.configuration.listen, what: "\(state.name).listen")
            let channel = try await bind(address: address, name: state.name, what: "\(state.name).listen (--listen)") { [runtime, pools] channel in
                try InboundPipeline.configure(channel, slot: slot, runtime: runtime, pools: pools)
            }
            register(server: channel, name: state.name)
            announcements.append(("listening", [
                "listener": "\(state.name)", "address": "\(channel.localAddress?.display ?? "?")",
                "mode": "\((state.configuration.mode ?? .http).rawValue)", "upstream": "\(state.configuration.upstream)",
                "max_connections": "\(state.limits.maxConnections)", "handshake_timeout": "\(state.limits.handshakeTimeout)",
            ]))
        }
        for slot in outbound {
            let state = slot.current
            let address = try SocketAddressSpec(parsing: state.configuration.listen, what: "\(state.name).listen")
            let http = state.configuration.mode == .http
            let channel = try await bind(address: address, name: state.name, what: "\(state.name).listen (--listen)", autoRead: http) { [runtime, pools] channel in
                if http {
                    try HTTPProxyHandler.addRequestDecoder(channel.pipeline.syncOperations)
                    try channel.pipeline.syncOperations.addHandler(HTTPProxyHandler(state: slot.current, peer: nil, runtime: runtime, pools: pools))
                } else {
                    try channel.pipeline.syncOperations.addHandler(OutboundHandler(state: slot.current, runtime: runtime))
                }
            }
            register(server: channel, name: state.name)
            announcements.append(("listening (outbound)", ["listener": "\(state.name)", "address": "\(channel.localAddress?.display ?? "?")", "upstream": "\(state.configuration.upstream)"]))
        }
        if let admin = configuration.adminListen {
            let address = try SocketAddressSpec(parsing: admin, what: "admin-listen")
            let metrics = runtime.metrics
            let channel: any Channel
            do {
                channel = try await ServerBootstrap(group: group)
                    .serverChannelOption(.socketOption(.so_reuseaddr), value: 1)
                    .childChannelInitializer { channel in
                        channel.eventLoop.makeCompletedFuture {
                            try channel.pipeline.syncOperations.configureHTTPServerPipeline()
                            try channel.pipeline.syncOperations.addHandler(AdminHandler(metrics: metrics))
                        }
                    }
                    .bind(host: address.host, port: address.port).get()
            } catch {
                throw ProxyError("admin-listen (--admin-listen) \(address): cannot listen: \(HTTPProxyHandler.describe(error))")
            }
            register(server: channel, name: "admin")
        }
        for (message, metadata) in announcements { runtime.logger.info("\(message)", metadata: metadata) }
        started.withLock { $0 = true }
    }

    /// Serves until the service group's graceful shutdown (or cancellation), then drains. Binds first unless
    /// ``start()`` already did (callers that want bind errors before anything else call it first). The background
    /// work — file watching, CRL refresh, revocation events, the access-log flusher, SIGHUP reloads — runs as child
    /// tasks of this call and ends with it.
    public func run() async throws {
        if !started.withLock({ $0 }) {
            do {
                try await start()
            } catch {
                await shutdown()
                throw error
            }
        }
        await onStarted?(self)
        let interval = configuration.withLock { $0.watchInterval ?? 1 }
        let hangups = await UnixSignalsSequence(trapping: .sighup)
        await withDiscardingTaskGroup { group in
            group.addTask {
                while !Task.isCancelled {
                    try? await Task.sleep(for: .seconds(interval))
                    if Task.isCancelled { return }
                    await self.reload(force: false)
                }
            }
            if let tokens = runtime.accessTokens {
                group.addTask { await tokens.run() }
            }
            if let sources = revocationSources {
                group.addTask { await sources.refreshLoop() }
                group.addTask { await sources.eventLoop() }
            }
            group.addTask { [runtime] in
                while !Task.isCancelled {
                    try? await Task.sleep(for: .milliseconds(100))
                    runtime.accessLog.flush()
                }
            }
            group.addTask {
                for await _ in hangups {
                    self.runtime.logger.info("SIGHUP: reloading")
                    await self.reload(force: true)
                }
            }
            try? await gracefulShutdown()
            runtime.logger.info("shutting down: draining connections")
            group.cancelAll()
        }
        await shutdown()
    }

    private func bind(address: SocketAddressSpec, name: String, what: String, autoRead: Bool = true, configure: @escaping @Sendable (any Channel) throws -> Void) async throws -> any Channel {
        let children = self.children
        do {
            return try await ServerBootstrap(group: group)
                .serverChannelOption(.backlog, value: 1024)
                .serverChannelOption(.socketOption(.so_reuseaddr), value: 1)
                .childChannelOption(.socketOption(.tcp_nodelay), value: 1)
                .childChannelOption(.autoRead, value: autoRead)
                .childChannelInitializer { channel in
                    children.insert(channel)
                    return channel.eventLoop.makeCompletedFuture { try configure(channel) }
                }
                .bind(host: address.host, port: address.port).get()
        } catch {
            throw ProxyError("\(what) \(address): cannot listen: \(HTTPProxyHandler.describe(error))")
        }
    }

    private func register(server channel: any Channel, name: String) {
        serverChannels.withLock { $0.append(channel) }
        if let address = channel.localAddress { bound.withLock { $0[name] = address } }
    }

    /// Re-reads what changed (all of it when `force`, as on SIGHUP). A listener whose new files fail to load keeps
    /// its current state; the failure is logged with its reason and counted.
    public func reload(force: Bool) async {
        var newConfiguration: ProxyConfiguration?
        var changed = false
        if let path = configurationPath {
            let stamp = FileStamp(path: path)
            let changed = configurationStamp.withLock { $0 != stamp }
            if force || changed {
                do {
                    let loaded = try ProxyConfiguration.load(path: path)
                    configurationStamp.withLock { $0 = stamp }
                    newConfiguration = loaded
                } catch {
                    configurationStamp.withLock { $0 = stamp }
                    runtime.metrics.reload(success: false, listener: "config")
                    runtime.logger.error("configuration reload failed; keeping the current configuration", metadata: ["path": "\(path)", "error": "\(error)"])
                }
            }
        }
        for (index, slot) in inbound.enumerated() {
            let current = slot.current
            var listenerConfig: ProxyConfiguration.Listener?
            var policy: RoutePolicy?
            if let newConfiguration {
                guard index < newConfiguration.listeners.count, newConfiguration.listeners[index].listen == current.configuration.listen,
                      (newConfiguration.listeners[index].mode ?? .http) == (current.configuration.mode ?? .http) else {
                    runtime.logger.error("listeners were added, removed, moved or changed mode; that needs a restart (other changes applied)", metadata: ["listener": "\(current.name)"])
                    continue
                }
                listenerConfig = newConfiguration.listeners[index]
                do {
                    policy = try newConfiguration.policy(for: listenerConfig!, label: current.name)
                } catch {
                    runtime.logger.error("policy reload failed; keeping the current state", metadata: ["listener": "\(current.name)", "error": "\(error)"])
                    runtime.metrics.reload(success: false, listener: current.name)
                    continue
                }
            }
            do {
                if let fresh = try current.reloaded(configuration: listenerConfig, policy: policy, force: force) {
                    slot.replace(fresh)
                    changed = true
                    runtime.metrics.reload(success: true, listener: current.name)
                    runtime.metrics.certificateExpiry(listener: current.name, notAfter: fresh.credentials.leaf.notValidAfter)
                    runtime.logger.info("reloaded", metadata: ["listener": "\(current.name)", "certificate_serial": "\(fresh.credentials.leaf.serialHex)", "not_after": "\(fresh.credentials.leaf.notValidAfter)"])
                }
            } catch {
                runtime.metrics.reload(success: false, listener: current.name)
                runtime.logger.error("reload failed; keeping the current certificate, key, bundle and policy", metadata: ["listener": "\(current.name)", "error": "\(error)"])
            }
        }
        for (index, slot) in outbound.enumerated() {
            let current = slot.current
            var config: ProxyConfiguration.Outbound?
            if let newConfiguration, index < newConfiguration.outbound.count, newConfiguration.outbound[index].listen == current.configuration.listen {
                config = newConfiguration.outbound[index]
            }
            do {
                if let fresh = try current.reloaded(configuration: config, force: force) {
                    slot.replace(fresh)
                    changed = true
                    runtime.metrics.reload(success: true, listener: current.name)
                    runtime.metrics.certificateExpiry(listener: current.name, notAfter: fresh.credentials.leaf.notValidAfter)
                    runtime.logger.info("reloaded", metadata: ["listener": "\(current.name)"])
                }
            } catch {
                runtime.metrics.reload(success: false, listener: current.name)
                runtime.logger.error("reload failed; keeping the current state", metadata: ["listener": "\(current.name)", "error": "\(error)"])
            }
        }
        if let newConfiguration { self.configuration.withLock { $0 = newConfiguration } }
        if let sources = revocationSources {
            if force { try? await sources.loadAll(initial: false) } else { await sources.reloadChangedFiles() }
        }
        runtime.accessLog.flush()
        if changed || newConfiguration != nil, let onReloaded { await onReloaded(configuration.withLock { $0 }) }
    }

    /// Stops accepting, lets open HTTP exchanges finish (idle keep-alive connections close at once), waits up to
    /// the drain timeout for connections to end, then closes the rest.
    public func shutdown() async {
        let servers = serverChannels.withLock { $0 }
        for channel in servers { try? await channel.close() }
        let open = children.all
        for channel in open { channel.pipeline.fireUserInboundEventTriggered(ChannelShouldQuiesceEvent()) }
        let timeout = configuration.withLock { $0.drainTimeout ?? 10 }
        let deadline = ContinuousClock.now + .milliseconds(Int64(timeout * 1000))
        while ContinuousClock.now < deadline, !children.isEmpty {
            try? await Task.sleep(for: .milliseconds(20))
        }
        for channel in children.all { try? await channel.close() }
        pools.closeAll()
        await revocationSources?.shutdown()
        await runtime.accessTokens?.shutdown()
        runtime.accessLog.flush()
        try? await ownedGroup?.shutdownGracefully()
    }
}

/// The admin listener: `GET /metrics` (Prometheus text format) and `GET /healthz`.
final class AdminHandler: ChannelInboundHandler {
    typealias InboundIn = HTTPServerRequestPart
    typealias OutboundOut = HTTPServerResponsePart
    let metrics: ProxyMetrics
    private var uri: String?
    private var keepAlive = true

    init(metrics: ProxyMetrics) { self.metrics = metrics }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        switch unwrapInboundIn(data) {
        case .head(let head):
            uri = head.method == .GET ? head.uri : nil
            keepAlive = head.isKeepAlive
        case .body:
            break
        case .end:
            let status: HTTPResponseStatus
            let body: ByteBuffer
            let type: String
            switch uri {
            case "/metrics"?:
                status = .ok; body = ByteBuffer(bytes: metrics.render()); type = "text/plain; version=0.0.4"
            case "/healthz"?:
                status = .ok; body = ByteBuffer(string: "ok\n"); type = "text/plain"
            default:
                status = .notFound; body = ByteBuffer(string: "not found: GET /metrics or /healthz\n"); type = "text/plain"
            }
            var head = HTTPResponseHead(version: .http1_1, status: status)
            head.headers.add(name: "content-type", value: type)
            head.headers.add(name: "content-length", value: String(body.readableBytes))
            if !keepAlive { head.headers.add(name: "connection", value: "close") }
            context.write(wrapOutboundOut(.head(head)), promise: nil)
            context.write(wrapOutboundOut(.body(.byteBuffer(body))), promise: nil)
            let keepAlive = self.keepAlive
            context.writeAndFlush(wrapOutboundOut(.end(nil))).assumeIsolated().whenComplete { _ in
                if !keepAlive { context.close(promise: nil) }
            }
        }
    }
}

/// Accepted connections still open, for draining at shutdown.
final class ChannelSet: Sendable {
    private let channels = Mutex<[ObjectIdentifier: any Channel]>([:])

    func insert(_ channel: any Channel) {
        channels.withLock { $0[ObjectIdentifier(channel)] = channel }
        channel.closeFuture.whenComplete { [weak self] _ in
            self?.channels.withLock { _ = $0.removeValue(forKey: ObjectIdentifier(channel)) }
        }
    }

    var all: [any Channel] { channels.withLock { Array($0.values) } }
    var isEmpty: Bool { channels.withLock { $0.isEmpty } }
}
