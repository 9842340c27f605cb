import NIOCore

/// Holds an HTTP/2 connection's flushes until the end of the current event-loop tick, so that the responses of
/// several streams finished in one tick go out in one socket write (one `writev` of their TLS records) instead of
/// one write each. The idea of Netty's `FlushConsolidationHandler`; NIO has none, hence this small handler.
///
/// Without it each stream's response cost a write system call of its own: under 10 concurrent streams per
/// connection the proxy made as many client writes as it relayed responses.
final class FlushConsolidator: ChannelOutboundHandler, RemovableChannelHandler {
    typealias OutboundIn = NIOAny
    typealias OutboundOut = NIOAny

    private var flushPending = false

    func flush(context: ChannelHandlerContext) {
        guard !flushPending else { return }
        flushPending = true
        let loopBound = NIOLoopBound((self, context), eventLoop: context.eventLoop)
        // Tasks run after the I/O events of the current tick: every flush asked for in this tick is served by one.
        context.eventLoop.execute {
            let (handler, context) = loopBound.value
            handler.flushPending = false
            context.flush()
        }
    }

    func close(context: ChannelHandlerContext, mode: CloseMode, promise: EventLoopPromise<Void>?) {
        // Whatever waits for the held flush goes out before the connection closes.
        if flushPending {
            flushPending = false
            context.flush()
        }
        context.close(mode: mode, promise: promise)
    }
}
