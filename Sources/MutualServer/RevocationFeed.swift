import Foundation
import Logging
import MutualAuthority
import MutualStore
import ServiceLifecycle

/// Fans revocation events out to Server-Sent-Events subscribers.
actor RevocationFeed {
    enum Item: Sendable {
        case event(RevocationEvent)
        case heartbeat
    }

    private var subscribers: [UUID: AsyncStream<Item>.Continuation] = [:]
    private var finished = false

    func subscribe() -> (UUID, AsyncStream<Item>) {
        let (stream, continuation) = AsyncStream<Item>.makeStream(bufferingPolicy: .bufferingNewest(10_000))
        let id = UUID()
        if finished {
            continuation.finish()
        } else {
            subscribers[id] = continuation
        }
        return (id, stream)
    }

    func unsubscribe(_ id: UUID) {
        subscribers.removeValue(forKey: id)?.finish()
    }

    func publish(_ items: [Item]) {
        for continuation in subscribers.values {
            for item in items { continuation.yield(item) }
        }
    }

    var subscriberCount: Int { subscribers.count }

    /// Ends every stream (graceful shutdown: open event streams must not hold the server up).
    func finishAll() {
        finished = true
        for continuation in subscribers.values { continuation.finish() }
        subscribers.removeAll()
    }
}

/// Watches the revocation log (every 50 ms: it also sees revocations made by `mutual revoke` in another process or by
/// another replica), pushes new events to subscribers, invalidates cached OCSP answers, and keeps the CRL fresh.
struct RevocationWatcher: Service {
    let authority: Authority
    let feed: RevocationFeed
    let ocsp: OCSPResponder
    let publisher: RevocationPublisher
    let logger: Logger
    let interval: Duration = .milliseconds(50)

    func run() async throws {
        do {
            try await cancelWhenGracefulShutdown { try await self.watch() }
        } catch {}
        await feed.finishAll()
    }

    private func watch() async throws {
        var last = (try? await authority.store.lastRevocationSequence()) ?? 0
        await ocsp.noteRevocation(sequence: last)
        var ticks = 0
        var failing = false
        while !Task.isCancelled {
            try await Task.sleep(for: interval)
            ticks += 1
            do {
                let events = try await authority.store.revocations(after: last, limit: 1000)
                if let newest = events.last {
                    last = newest.sequence
                    await ocsp.noteRevocation(sequence: last)
                    await feed.publish(events.map { .event($0) })
                    _ = try? await publisher.current()
                }
                if ticks % 300 == 0 {  // every 15 s
                    await feed.publish([.heartbeat])
                    _ = try await publisher.current()
                }
                if failing {
                    failing = false
                    logger.notice("revocation watcher: store reachable again")
                }
            } catch {
                // Logged once per outage, not every 50 ms.
                if !failing {
                    failing = true
                    logger.warning("revocation watcher: store unavailable; events and OCSP freshness wait for it", metadata: ["error": "\(error)"])
                }
            }
        }
    }
}
