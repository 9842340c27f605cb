/// The life of one HTTP exchange through the proxy, as a value: events in, one action out. The handler owns the
/// channels, the request parts and the bookkeeping (route, reason, byte counts); this decides what happens to them —
/// hold, forward, answer ourselves, pause or resume either side, reuse or close the upstream connection. Pure (no
/// channel, no clock), in the style of swift-nio's `ProtocolNegotiationHandlerStateMachine`, and tested for every
/// event in every state (`ExchangeStateMachineTests`).
struct ExchangeStateMachine: Sendable, Equatable {
    enum State: Sendable, Equatable {
        /// No request in progress (before the first, or after the last one finished).
        case idle
        /// The proxy answers this request itself (refused by a check or the policy, or the upstream failed before
        /// responding); the answer goes out once the request has been read.
        case answering(status: UInt, requestEnded: Bool)
        /// Allowed; the upstream connection is being set up and request parts are held (`heldBytes` of body).
        case connecting(heldBytes: Int, requestEnded: Bool)
        /// Connected: the request flows upstream and the response back.
        case relaying(requestEnded: Bool, response: Response)
    }

    enum Response: Sendable, Equatable {
        case awaiting
        /// The final response head was relayed; whether the upstream said the connection may be reused.
        case streaming(reusable: Bool)
    }

    enum Event: Sendable, Equatable {
        /// A request head, refused with this status, or allowed (nil).
        case head(refusal: UInt?)
        case body(bytes: Int)
        case end
        /// The end of one read from the client.
        case clientReadComplete
        case upstreamConnected
        case upstreamUnreachable
        /// A request allowed at its head is refused after all, before any upstream was asked (an access token whose
        /// key had to be fetched first turned out bad).
        case lateRefusal(status: UInt)
        case responseHead(informational: Bool, keepAlive: Bool)
        case responseBody
        /// The end of one read from the upstream.
        case responseReadComplete
        case responseEnd
        case upstreamClosed
        case upstreamWritable
        case clientWritable
        case clientClosed
    }

    enum Action: Sendable, Equatable {
        case none
        /// Hold the (rewritten) head and borrow an upstream connection.
        case acquireUpstream
        /// Keep this request part until the upstream is connected.
        case hold
        /// Write this request part upstream (and flush).
        case forward(flush: Bool)
        /// Read and discard this request part (the proxy answers the request itself).
        case discard
        /// Answer the request ourselves, now, with this status; the exchange is over.
        case answer(status: UInt)
        case pauseClient
        /// Flush what one client read brought upstream; stop reading the client while the upstream is full.
        case flushUpstream
        /// Write the held parts upstream and flush; read the client again if the upstream can take more.
        case sendHeld
        /// The upstream cannot be used before a response: drop held parts, read the client again, and answer 502
        /// now if the request was read (else once it is).
        case upstreamFailed(unreachable: Bool, answerNow: Bool)
        /// A late refusal: drop the held parts, read the client again, and answer now if the request was read (else
        /// once it is, with the refusal's status).
        case dropHeld(answerNow: Bool)
        case relayResponseHead
        case relayResponseBody
        /// Flush the response so far; stop reading the upstream while the client is full.
        case flushClient
        /// The response is complete: read the client again, return the upstream connection to the pool (or close
        /// it), record the exchange and write the end.
        case completeResponse(reuseUpstream: Bool)
        /// The upstream closed mid-response: record it and close the client, which must not take it as complete.
        case truncateResponse
        case resumeClient
        case resumeUpstreamReads
        /// The client left mid-exchange: close the upstream (its state is unknown) and record the exchange.
        case abandon(responseStarted: Bool)
        /// End the client connection (a second head inside an open exchange).
        case closeClient
    }

    private(set) var state: State = .idle

    /// Bound on request body bytes held while the upstream connection is being set up, before the client is paused.
    static let maximumHeldBytes = 1 << 20

    mutating func receive(_ event: Event) -> Action {
        switch (state, event) {
        // A new request.
        case (.idle, .head(let refusal)):
            if let refusal {
                state = .answering(status: refusal, requestEnded: false)
                return .none
            }
            state = .connecting(heldBytes: 0, requestEnded: false)
            return .acquireUpstream
        case (_, .head):
            // A head while an exchange is open: the HTTP/1.1 handler holds pipelined requests back until the
            // exchange ends and an HTTP/2 stream carries one request, so this is a protocol violation: end the
            // connection rather than mix two exchanges.
            state = .idle
            return .closeClient

        // The request's body and end.
        case (.answering(let status, false), .body):
            state = .answering(status: status, requestEnded: false)
            return .discard
        case (.answering(let status, false), .end):
            state = .idle
            return .answer(status: status)
        case (.connecting(let held, false), .body(let bytes)):
            state = .connecting(heldBytes: held + bytes, requestEnded: false)
            return .hold
        case (.connecting(let held, false), .end):
            state = .connecting(heldBytes: held, requestEnded: true)
            return .hold
        case (.relaying(false, let response), .body):
            state = .relaying(requestEnded: false, response: response)
            return .forward(flush: false)
        case (.relaying(false, let response), .end):
            state = .relaying(requestEnded: true, response: response)
            return .forward(flush: true)
        case (_, .body), (_, .end):
            // Idle, or after the request ended: nothing belongs to an exchange.
            return .discard

        case (.connecting(let held, false), .clientReadComplete):
            return held > Self.maximumHeldBytes ? .pauseClient : .none
        case (.relaying(false, _), .clientReadComplete):
            return .flushUpstream
        case (_, .clientReadComplete):
            return .none

        // The upstream connection.
        case (.connecting(_, let requestEnded), .upstreamConnected):
            state = .relaying(requestEnded: requestEnded, response: .awaiting)
            return .sendHeld
        case (.connecting(_, let requestEnded), .upstreamUnreachable):
            state = requestEnded ? .idle : .answering(status: 502, requestEnded: false)
            return .upstreamFailed(unreachable: true, answerNow: requestEnded)
        case (.connecting(_, let requestEnded), .lateRefusal(let status)):
            state = requestEnded ? .idle : .answering(status: status, requestEnded: false)
            return .dropHeld(answerNow: requestEnded)
        case (_, .lateRefusal):
            // The exchange it was for is over (the client left).
            return .none
        case (_, .upstreamConnected), (_, .upstreamUnreachable):
            // Stale: the exchange it was for is over. The handler returns the connection to the pool.
            return .none

        // The response.
        case (.relaying(_, .awaiting), .responseHead(true, _)):
            return .none
        case (.relaying(let requestEnded, .awaiting), .responseHead(false, let keepAlive)):
            state = .relaying(requestEnded: requestEnded, response: .streaming(reusable: keepAlive))
            return .relayResponseHead
        case (.relaying(_, .streaming), .responseBody):
            return .relayResponseBody
        case (.relaying(_, .streaming), .responseReadComplete):
            return .flushClient
        case (.relaying(let requestEnded, .streaming(let reusable)), .responseEnd):
            state = .idle
            return .completeResponse(reuseUpstream: reusable && requestEnded)
        case (.relaying(_, .streaming), .upstreamClosed):
            state = .idle
            return .truncateResponse
        case (.relaying(let requestEnded, .awaiting), .upstreamClosed):
            state = requestEnded ? .idle : .answering(status: 502, requestEnded: false)
            return .upstreamFailed(unreachable: false, answerNow: requestEnded)
        case (_, .responseHead), (_, .responseBody), (_, .responseReadComplete), (_, .responseEnd), (_, .upstreamClosed):
            // A response without a request, or after it was finished: not relayed.
            return .none

        // Flow control.
        case (.connecting, .upstreamWritable), (.relaying, .upstreamWritable):
            return .resumeClient
        case (.relaying, .clientWritable):
            return .resumeUpstreamReads
        case (_, .upstreamWritable), (_, .clientWritable):
            return .none

        // The client went away.
        case (.relaying(_, let response), .clientClosed):
            state = .idle
            if case .streaming = response { return .abandon(responseStarted: true) }
            return .abandon(responseStarted: false)
        case (_, .clientClosed):
            state = .idle
            return .none
        }
    }
}
