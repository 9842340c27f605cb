import Foundation
import NIOCore
import Synchronization

/// The open connections of one listener, bounded by `max-connections`.
///
/// At the limit, a new connection first displaces the oldest connection that has not finished its TLS handshake
/// (idle sockets that never send a ClientHello are the cheapest attack); only when every slot holds an established
/// connection is the new one refused. So a few hundred silent sockets cannot keep a good client out, and the file
/// descriptors in use stay bounded.
final class ConnectionLimiter: Sendable {
    enum Admission: Equatable {
        case admitted
        /// Admitted after closing this older, not yet authenticated connection.
        case admittedDisplacing(ObjectIdentifier)
        case refused
    }

    private struct State {
        var open = Set<ObjectIdentifier>()
        /// Connections still in their handshake, oldest first (insertion order kept by a sequence number).
        var pending: [ObjectIdentifier: UInt64] = [:]
        var channels: [ObjectIdentifier: any Channel] = [:]
        var sequence: UInt64 = 0
        var lastWarning: Date = .distantPast
    }

    private let state = Mutex(State())

    /// Admits `id` (keeping `channel` to close it if it is displaced later); pure bookkeeping, no I/O.
    func admit(_ id: ObjectIdentifier, channel: (any Channel)?, limit: Int) -> (Admission, (any Channel)?) {
        state.withLock { state in
            var displaced: (any Channel)?
            var admission = Admission.admitted
            if state.open.count >= limit {
                guard let oldest = state.pending.min(by: { $0.value < $1.value })?.key else { return (.refused, nil) }
                state.pending.removeValue(forKey: oldest)
                state.open.remove(oldest)
                displaced = state.channels.removeValue(forKey: oldest)
                admission = .admittedDisplacing(oldest)
            }
            state.sequence += 1
            state.open.insert(id)
            state.pending[id] = state.sequence
            if let channel { state.channels[id] = channel }
            return (admission, displaced)
        }
    }

    /// The handshake finished: the connection can no longer be displaced.
    func established(_ id: ObjectIdentifier) {
        state.withLock { state in
            state.pending.removeValue(forKey: id)
            state.channels.removeValue(forKey: id)
        }
    }

    func closed(_ id: ObjectIdentifier) {
        state.withLock { state in
            state.open.remove(id)
            state.pending.removeValue(forKey: id)
            state.channels.removeValue(forKey: id)
        }
    }

    var openCount: Int { state.withLock { $0.open.count } }

    /// True at most once per `interval`: the "limit reached" log line is not written for every refused connection.
    func shouldWarn(now: Date, interval: TimeInterval = 10) -> Bool {
        state.withLock { state in
            guard now.timeIntervalSince(state.lastWarning) >= interval else { return false }
            state.lastWarning = now
            return true
        }
    }
}
