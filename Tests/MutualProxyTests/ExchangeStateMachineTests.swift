@testable import MutualProxy
import Testing

@Suite("The exchange state machine: every event in every state, without sockets")
struct ExchangeStateMachineTests {
    typealias Machine = ExchangeStateMachine
    typealias State = ExchangeStateMachine.State

    /// Every state, each reached the way the handler reaches it.
    static let states: [(String, [Machine.Event])] = [
        ("idle", []),
        ("answering", [.head(refusal: 403)]),
        ("connecting", [.head(refusal: nil)]),
        ("connecting, request read", [.head(refusal: nil), .end]),
        ("connecting, over the held-bytes bound", [.head(refusal: nil), .body(bytes: Machine.maximumHeldBytes + 1)]),
        ("relaying", [.head(refusal: nil), .upstreamConnected]),
        ("relaying, request read", [.head(refusal: nil), .upstreamConnected, .end]),
        ("streaming", [.head(refusal: nil), .upstreamConnected, .responseHead(informational: false, keepAlive: true)]),
        ("streaming, request read", [.head(refusal: nil), .upstreamConnected, .end, .responseHead(informational: false, keepAlive: true)]),
        ("streaming, upstream not reusable", [.head(refusal: nil), .upstreamConnected, .end, .responseHead(informational: false, keepAlive: false)]),
    ]

    static let events: [Machine.Event] = [
        .head(refusal: nil), .head(refusal: 401), .body(bytes: 10), .end, .clientReadComplete, .upstreamConnected,
        .upstreamUnreachable, .responseHead(informational: true, keepAlive: true), .responseHead(informational: false, keepAlive: true),
        .responseBody, .responseReadComplete, .responseEnd, .upstreamClosed, .upstreamWritable, .clientWritable, .clientClosed,
        .lateRefusal(status: 401), .lateRefusal(status: 403),
    ]

    func machine(_ path: [Machine.Event]) -> Machine {
        var machine = Machine()
        for event in path { _ = machine.receive(event) }
        return machine
    }

    /// What each event does in each state (the table the handler relies on).
    func expected(_ state: State, _ event: Machine.Event) -> (Machine.Action, State) {
        switch (state, event) {
        case (.idle, .head(nil)): return (.acquireUpstream, .connecting(heldBytes: 0, requestEnded: false))
        case (.idle, .head(let status?)): return (.none, .answering(status: status, requestEnded: false))
        case (_, .head): return (.closeClient, .idle)
        case (.answering(let status, false), .body): return (.discard, .answering(status: status, requestEnded: false))
        case (.answering(let status, false), .end): return (.answer(status: status), .idle)
        case (.connecting(let held, false), .body(let n)): return (.hold, .connecting(heldBytes: held + n, requestEnded: false))
        case (.connecting(let held, false), .end): return (.hold, .connecting(heldBytes: held, requestEnded: true))
        case (.relaying(false, let r), .body): return (.forward(flush: false), .relaying(requestEnded: false, response: r))
        case (.relaying(false, let r), .end): return (.forward(flush: true), .relaying(requestEnded: true, response: r))
        case (_, .body), (_, .end): return (.discard, state)
        case (.connecting(let held, false), .clientReadComplete): return (held > Machine.maximumHeldBytes ? .pauseClient : .none, state)
        case (.relaying(false, _), .clientReadComplete): return (.flushUpstream, state)
        case (_, .clientReadComplete): return (.none, state)
        case (.connecting(_, let ended), .upstreamConnected): return (.sendHeld, .relaying(requestEnded: ended, response: .awaiting))
        case (.connecting(_, let ended), .upstreamUnreachable):
            return (.upstreamFailed(unreachable: true, answerNow: ended), ended ? .idle : .answering(status: 502, requestEnded: false))
        case (.connecting(_, let ended), .lateRefusal(let status)):
            return (.dropHeld(answerNow: ended), ended ? .idle : .answering(status: status, requestEnded: false))
        case (_, .lateRefusal): return (.none, state)
        case (_, .upstreamConnected), (_, .upstreamUnreachable): return (.none, state)
        case (.relaying(_, .awaiting), .responseHead(true, _)): return (.none, state)
        case (.relaying(let ended, .awaiting), .responseHead(false, let keepAlive)):
            return (.relayResponseHead, .relaying(requestEnded: ended, response: .streaming(reusable: keepAlive)))
        case (.relaying(_, .streaming), .responseBody): return (.relayResponseBody, state)
        case (.relaying(_, .streaming), .responseReadComplete): return (.flushClient, state)
        case (.relaying(let ended, .streaming(let reusable)), .responseEnd): return (.completeResponse(reuseUpstream: ended && reusable), .idle)
        case (.relaying(_, .streaming), .upstreamClosed): return (.truncateResponse, .idle)
        case (.relaying(let ended, .awaiting), .upstreamClosed):
            return (.upstreamFailed(unreachable: false, answerNow: ended), ended ? .idle : .answering(status: 502, requestEnded: false))
        case (_, .responseHead), (_, .responseBody), (_, .responseReadComplete), (_, .responseEnd), (_, .upstreamClosed): return (.none, state)
        case (.connecting, .upstreamWritable), (.relaying, .upstreamWritable): return (.resumeClient, state)
        case (.relaying, .clientWritable): return (.resumeUpstreamReads, state)
        case (_, .upstreamWritable), (_, .clientWritable): return (.none, state)
        case (.relaying(_, .streaming), .clientClosed): return (.abandon(responseStarted: true), .idle)
        case (.relaying, .clientClosed): return (.abandon(responseStarted: false), .idle)
        case (_, .clientClosed): return (.none, .idle)
        }
    }

    @Test("every event in every state gives the action and the next state of the table")
    func everyEventInEveryState() {
        var checked = 0
        for (name, path) in Self.states {
            for event in Self.events {
                var machine = machine(path)
                let before = machine.state
                let action = machine.receive(event)
                let (wantAction, wantState) = expected(before, event)
                #expect(action == wantAction, "\(name) + \(event)")
                #expect(machine.state == wantState, "\(name) + \(event)")
                checked += 1
            }
        }
        #expect(checked == Self.states.count * Self.events.count)
    }

    @Test("invariants: request parts go upstream only once connected, are held only before, never after the request ended")
    func invariants() {
        for (_, path) in Self.states {
            for first in Self.events {
                for second in Self.events {
                    var machine = machine(path)
                    for event in [first, second] {
                        let before = machine.state
                        let action = machine.receive(event)
                        if case .forward = action, case .relaying(false, _) = before {} else if case .forward = action { Issue.record("forward in \(before)") }
                        if case .hold = action, case .connecting(_, false) = before {} else if case .hold = action { Issue.record("hold in \(before)") }
                        if case .answer = action { #expect(machine.state == .idle) }
                        if case .completeResponse(true) = action, case .relaying(false, _) = before { Issue.record("upstream reused before the request was sent") }
                    }
                }
            }
        }
    }

    @Test("a whole keep-alive exchange, then the next one on the same connection")
    func keepAliveSequence() {
        var machine = Machine()
        let script: [(Machine.Event, Machine.Action)] = [
            (.head(refusal: nil), .acquireUpstream), (.body(bytes: 5), .hold), (.end, .hold), (.upstreamConnected, .sendHeld),
            (.responseHead(informational: true, keepAlive: true), .none), (.responseHead(informational: false, keepAlive: true), .relayResponseHead),
            (.responseBody, .relayResponseBody), (.responseReadComplete, .flushClient), (.responseEnd, .completeResponse(reuseUpstream: true)),
            (.head(refusal: 431), .none), (.body(bytes: 3), .discard), (.end, .answer(status: 431)),
            (.head(refusal: nil), .acquireUpstream), (.upstreamConnected, .sendHeld), (.body(bytes: 1), .forward(flush: false)),
            (.responseHead(informational: false, keepAlive: true), .relayResponseHead), (.responseEnd, .completeResponse(reuseUpstream: false)),
        ]
        for (event, action) in script { #expect(machine.receive(event) == action, "\(event)") }
        #expect(machine.state == .idle)
    }
}
