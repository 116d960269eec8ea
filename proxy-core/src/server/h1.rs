//! The parking HTTP/1 connection driver: a keep-alive connection holds no hyper state
//! and no buffers while it waits for its next request, as nginx frees its buffers on
//! idle keep-alive connections.
//!
//! hyper keeps an 8 KiB read buffer and an 8 KiB write buffer for the whole life of a
//! connection, idle or not; 5,000 idle keep-alive clients cost 100 MB that way. So a
//! connection here is served one request (or one pipelined batch) at a time:
//!
//! 1. Wait until the socket has bytes ([`Accept::raw_tcp`], peeked, not read), with the
//!    header timeout for the first request and the keep-alive timeout afterwards; EOF,
//!    the timeout or server shutdown close the connection. Nothing HTTP exists yet.
//! 2. Start a hyper HTTP/1 connection on the stream ([`ParkIo`], with any bytes left
//!    from before in front) and let it serve keep-alive requests as usual. Once the
//!    service has produced the response head of every request read so far (hyper encodes
//!    a head in the poll that receives it) and no new request came for `park_after`
//!    (zero: at once), tell hyper to end the connection after the current message
//!    (`graceful_shutdown`: keep-alive off; the heads are already encoded, so no
//!    `Connection: close` is added). hyper sends the rest of the response, flushes, and
//!    returns. (Re-creating hyper's connection costs about 11,000 instructions, hence
//!    the delay: busy connections never pay it.)
//! 3. Take the stream and any bytes hyper read past the message (`into_parts`). If the
//!    message ended cleanly (the request body was read whole, nobody asked to close, the
//!    server is not stopping), go to 1 with those bytes; otherwise shut the socket down.
//!
//! Upgrades stay hyper's: the connection runs `with_upgrades`, so after a 101 hyper hands
//! the stream (and bytes read past the request) to `hyper::upgrade::on`, and the library
//! works the same inside any hyper server. A connection whose first bytes are the HTTP/2
//! preface goes to hyper-util's HTTP/1 + HTTP/2 builder instead.

use std::future::{poll_fn, Future};
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;
use tokio::time::{Instant, Sleep};

use crate::body::{Request, Response};
use crate::server::adapter::{Adapter, ConnState};
use crate::server::park_io::ParkIo;
use crate::server::serve::{serve_auto, Shared};
use crate::server::{Accept, ServerStats};

/// The HTTP/2 connection preface (RFC 9113 §3.4).
const H2_PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Why a wait for the next request ended.
enum Woke {
    /// Bytes are there; this many were peeked.
    Data(usize),
    /// The peer closed, the socket failed, the timeout passed or the server is stopping.
    Close,
}

/// What the connection task keeps between requests.
pub(crate) struct Parked<'a, F> {
    pub(crate) shared: &'a Shared,
    pub(crate) stats: &'a ServerStats,
    pub(crate) state: Arc<ConnState>,
    /// Resolves when the server begins its graceful shutdown.
    pub(crate) stopped: Pin<&'a mut F>,
    pub(crate) stopping: bool,
    /// One timer per connection, re-armed for each wait.
    pub(crate) sleep: Pin<&'a mut Sleep>,
}

impl<F: Future<Output = ()>> Parked<'_, F> {
    /// Serve `io` until the connection ends.
    pub(crate) async fn serve<A, S>(mut self, mut io: A::Io, mut adapter: Adapter<S>)
    where
        A: Accept,
        S: tower_service::Service<Request, Response = Response, Error = std::convert::Infallible>
            + Clone
            + Send
            + Sync
            + 'static,
        S::Future: Send + 'static,
    {
        let config = &self.shared.config;
        let keep_alive_timeout = config
            .keep_alive_timeout
            .unwrap_or(config.header_read_timeout);
        // The first request's header must be complete within the header timeout of the
        // accept (nginx's `client_header_timeout`), the wait for its first byte included.
        let accepted = Instant::now();
        let mut first = true;
        let mut prefix = Bytes::new();
        loop {
            let mut builder = &self.shared.h1;
            let own_builder;
            if prefix.is_empty() {
                let Some(tcp) = A::raw_tcp(&io) else { return };
                let timeout = if first {
                    config.header_read_timeout
                } else {
                    keep_alive_timeout
                };
                let mut peek = [0u8; H2_PREFACE.len()];
                let want = if first { peek.len() } else { 1 };
                match self.wait(tcp, &mut peek[..want], timeout).await {
                    Woke::Close => break,
                    Woke::Data(n) => {
                        if first && peek.get(..n) == H2_PREFACE.get(..n) {
                            // HTTP/2 with prior knowledge (or too little to tell yet).
                            adapter.set_park(false);
                            serve_auto(io, adapter, &self.shared.auto, self.stopped, self.stopping)
                                .await;
                            return;
                        }
                    }
                }
                if first {
                    let left = config
                        .header_read_timeout
                        .saturating_sub(accepted.elapsed());
                    if left < config.header_read_timeout {
                        let mut b = self.shared.h1.clone();
                        b.header_read_timeout(left.max(Duration::from_millis(1)));
                        own_builder = b;
                        builder = &own_builder;
                    }
                }
            }
            first = false;
            // Boxed: the connection task itself stays small (it is what a parked
            // connection costs); hyper's state lives in this box only while serving.
            let mut conn = Box::pin(
                builder
                    .serve_connection(
                        TokioIo::new(ParkIo::new(prefix, io, self.state.clone())),
                        adapter,
                    )
                    .with_upgrades(),
            );
            let start = self.state.served();
            let mut graceful = false;
            let state = &self.state;
            let stopped = &mut self.stopped;
            let stopping = &mut self.stopping;
            let sleep = &mut self.sleep;
            let park_after = config.park_after;
            // Delayed parking: the timer is armed once per `park_after` period, not per
            // request; a connection that served nothing new for a whole period while
            // every request had its response is idle.
            let mut armed: Option<u32> = None;
            let done = poll_fn(|cx| loop {
                // Set when the timer was reset in this pass: it must be polled once to
                // register; otherwise the check below already polled it.
                let mut reset = false;
                if !*stopping && stopped.as_mut().poll(cx).is_ready() {
                    *stopping = true;
                }
                if !graceful {
                    let served = state.served();
                    let answered = served > start && state.all_responded();
                    let idle = if *stopping {
                        true
                    } else if park_after.is_zero() {
                        answered
                    } else if served == start {
                        false
                    } else if let Some(seen) = armed {
                        if sleep.as_mut().poll(cx).is_ready() {
                            if seen == served && answered {
                                true
                            } else {
                                sleep.as_mut().reset(Instant::now() + park_after);
                                armed = Some(served);
                                reset = true;
                                false
                            }
                        } else {
                            false
                        }
                    } else {
                        sleep.as_mut().reset(Instant::now() + park_after);
                        armed = Some(served);
                        reset = true;
                        false
                    };
                    if idle {
                        conn.as_mut().graceful_shutdown();
                        graceful = true;
                    }
                }
                match conn.as_mut().poll(cx) {
                    Poll::Ready(r) => return Poll::Ready(r),
                    Poll::Pending if graceful => return Poll::Pending,
                    Poll::Pending => {
                        // What this poll did that the checks above have not seen: a
                        // response head (end now, or arm the timer), a timer to register.
                        let served = state.served();
                        let again = if park_after.is_zero() {
                            served > start && state.all_responded()
                        } else {
                            (served > start && armed.is_none())
                                || (reset && sleep.as_mut().poll(cx).is_ready())
                        };
                        if !again {
                            return Poll::Pending;
                        }
                    }
                }
            })
            .await;
            if let Err(e) = done {
                tracing::debug!(error = %e, "connection ended with an error");
                return;
            }
            // None: upgraded, the stream went to `hyper::upgrade::on`.
            let Some(parts) = Pin::into_inner(conn).into_parts() else {
                return;
            };
            let (rest, inner) = parts.io.into_inner().into_parts();
            io = inner;
            if !graceful || self.stopping || !config.keep_alive || !self.state.reusable() {
                break;
            }
            adapter = parts.service;
            prefix = join(parts.read_buf, rest);
        }
        // The response is flushed (hyper flushes before it returns); send FIN.
        let _ = io.shutdown().await;
    }

    /// Wait until `tcp` has bytes to read; peek up to `buf.len()` of them.
    async fn wait(&mut self, tcp: &TcpStream, buf: &mut [u8], timeout: Duration) -> Woke {
        let mut parked: Option<ParkedGuard<'_>> = None;
        let stats = self.stats;
        let sleep = &mut self.sleep;
        let stopped = &mut self.stopped;
        let stopping = &mut self.stopping;
        poll_fn(|cx| {
            // Peeking (not only polling readiness) also clears a stale readiness left by
            // hyper's last read, which would otherwise wake this wait at once.
            let mut rb = ReadBuf::new(buf);
            match tcp.poll_peek(cx, &mut rb) {
                Poll::Ready(Ok(0)) | Poll::Ready(Err(_)) => return Poll::Ready(Woke::Close),
                Poll::Ready(Ok(n)) => return Poll::Ready(Woke::Data(n)),
                Poll::Pending => {}
            }
            if !*stopping && stopped.as_mut().poll(cx).is_ready() {
                *stopping = true;
            }
            if *stopping {
                return Poll::Ready(Woke::Close);
            }
            if parked.is_none() {
                sleep.as_mut().reset(Instant::now() + timeout);
                parked = Some(ParkedGuard::new(stats));
            }
            match sleep.as_mut().poll(cx) {
                Poll::Ready(()) => Poll::Ready(Woke::Close),
                Poll::Pending => Poll::Pending,
            }
        })
        .await
    }
}

/// Bytes hyper read past the message, then bytes it never read.
fn join(read: Bytes, rest: Bytes) -> Bytes {
    if rest.is_empty() {
        read
    } else if read.is_empty() {
        rest
    } else {
        let mut b = BytesMut::with_capacity(read.len() + rest.len());
        b.extend_from_slice(&read);
        b.extend_from_slice(&rest);
        b.freeze()
    }
}

/// Counts a connection in [`ServerStats::parked`] while it waits.
struct ParkedGuard<'a>(&'a ServerStats);

impl<'a> ParkedGuard<'a> {
    fn new(stats: &'a ServerStats) -> Self {
        stats.parked.fetch_add(1, Ordering::Relaxed);
        ParkedGuard(stats)
    }
}

impl Drop for ParkedGuard<'_> {
    fn drop(&mut self) {
        self.0.parked.fetch_sub(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn join_keeps_order() {
        assert_eq!(join(Bytes::from_static(b"ab"), Bytes::new()), "ab");
        assert_eq!(join(Bytes::new(), Bytes::from_static(b"cd")), "cd");
        assert_eq!(
            join(Bytes::from_static(b"ab"), Bytes::from_static(b"cd")),
            "abcd"
        );
    }
}
