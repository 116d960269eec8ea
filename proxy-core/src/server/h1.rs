//! The parking HTTP/1 connection driver: a keep-alive connection holds no hyper state
//! and no buffers while it waits for its next request, as nginx frees its buffers on
//! idle keep-alive connections.
//!
//! hyper keeps an 8 KiB read buffer and an 8 KiB write buffer for the whole life of a
//! connection, idle or not; 5,000 idle keep-alive clients cost 100 MB that way. So a
//! connection here is served one request (or one pipelined batch) at a time:
//!
//! 1. Read the start of the next request into a buffer sized to what arrived, with no
//!    hyper connection yet, until its head is complete (an empty line), with the header
//!    timeout of the accept for the first request and the keep-alive timeout, then the
//!    header timeout, afterwards; EOF, the timeout with nothing read or server shutdown
//!    close the connection (with part of a head too, without an answer, as hyper's own
//!    header timer did). A slow client costs the bytes it sent. A head that grows past
//!    8 KiB, or bytes no head has (control characters), go to hyper as they are (hyper
//!    answers 431, 414 or 400 as before).
//! 2. Start a hyper HTTP/1 connection on the stream ([`ParkIo`], with the bytes read
//!    or left from before in front) and let it serve keep-alive requests as usual. Once the
//!    service has produced the response head of every request read so far (hyper encodes
//!    a head in the poll that receives it) and no new request came for `park_after`
//!    (zero: at once), tell hyper to end the connection after the current message
//!    (`graceful_shutdown`: keep-alive off; the heads are already encoded, so no
//!    `Connection: close` is added). hyper sends the rest of the response, flushes, and
//!    returns. (Re-creating hyper's connection costs about 11,000 instructions, hence
//!    the delay: busy connections never pay it.)
//! 3. Take the stream and any bytes hyper read past the message (`into_parts`). If the
//!    message ended cleanly (the request body was read whole, nobody asked to close, the
//!    server is not stopping), go to 1 with those bytes; otherwise close the socket.
//!
//! Upgrades stay hyper's: the connection runs `with_upgrades`, so after a 101 hyper hands
//! the stream (and bytes read past the request) to `hyper::upgrade::on`, and the library
//! works the same inside any hyper server. A connection whose first bytes are the HTTP/2
//! preface goes to hyper-util's HTTP/1 + HTTP/2 builder instead.

use std::future::{poll_fn, Future};
use std::mem::MaybeUninit;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, ReadBuf};
use tokio::time::{Instant, Sleep};

use crate::server::adapter::{Adapter, ConnState};
use crate::server::park_io::ParkIo;
use crate::server::serve::{serve_auto, ConnService, Shared};
use crate::server::{Accept, ServerStats};

/// The HTTP/2 connection preface (RFC 9113 §3.4).
const H2_PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

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

impl<'a, F: Future<Output = ()>> Parked<'a, F> {
    /// Serve `io` until the connection ends.
    ///
    /// Written as a function returning an `async move` block, not an `async fn`: the
    /// latter keeps a second copy of its arguments in the future, and this future is
    /// what a parked connection costs.
    // Not an `async fn` on purpose: see above.
    #[allow(clippy::manual_async_fn)]
    pub(crate) fn serve<A, S>(
        mut self,
        mut io: A::Io,
        adapter: &'a Adapter<S>,
    ) -> impl Future<Output = ()> + 'a
    where
        A: Accept,
        S: ConnService,
    {
        async move {
            let config = &self.shared.config;
            // The first request's header must be complete within the header timeout of the
            // accept (nginx's `client_header_timeout`), the wait for its first byte included.
            let mut first = Some(Instant::now() + config.header_read_timeout);
            let mut prefix = Bytes::new();
            loop {
                // `Some`: what is left of the header timeout for a head hyper is to finish.
                let mut partial = None;
                if prefix.is_empty() {
                    // The first head must be in by the header timeout of the accept; a later
                    // one has the keep-alive timeout to begin and then the header timeout.
                    let wait = match first {
                        Some(deadline) => Wait::Head(deadline),
                        None => Wait::Idle(
                            config
                                .keep_alive_timeout
                                .unwrap_or(config.header_read_timeout),
                        ),
                    };
                    match self.read_head(&mut io, first.is_some(), wait).await {
                        Head::Close => break,
                        Head::H2(bytes) => {
                            // HTTP/2 with prior knowledge (or too little to tell yet).
                            // Boxed: rare, and it would size every connection's task; the
                            // values are moved straight in, for the same reason.
                            Box::pin(serve_auto(
                                ParkIo::handed_over(bytes, io),
                                {
                                    let mut adapter = adapter.clone();
                                    adapter.set_park(false);
                                    adapter
                                },
                                &self.shared.auto,
                                self.stopped,
                                self.stopping,
                            ))
                            .await;
                            return;
                        }
                        Head::Complete(bytes) => prefix = bytes,
                        Head::Partial(bytes, deadline) => {
                            partial = Some(deadline.saturating_duration_since(Instant::now()));
                            prefix = bytes;
                        }
                    }
                }
                first = None;
                // Boxed, once per period of service: the connection task itself stays small
                // (it is what a parked connection costs); hyper's connection and the state
                // of serving it live in this box only while serving.
                let served = Box::pin(self.serve_hyper(
                    std::mem::take(&mut prefix),
                    io,
                    adapter.clone(),
                    partial,
                ))
                .await;
                let Served::Parts {
                    io: inner,
                    rest,
                    graceful,
                } = served
                else {
                    return;
                };
                io = inner;
                if !graceful || self.stopping || !config.keep_alive || !self.state.reusable() {
                    break;
                }
                prefix = rest;
            }
            // The response is flushed (hyper flushes before it returns). Dropping the stream
            // closes it, which sends the FIN: a `shutdown` first would only cost a syscall
            // (with unread input, the kernel resets the connection on close either way).
            drop(io);
        }
    }

    /// Serve keep-alive requests with a hyper connection on `io` (`prefix` in front of
    /// it) until the connection is idle (then take the stream back), ends, or is
    /// upgraded. `partial`: the head in `prefix` is not complete, and hyper is to read
    /// the rest within this much time.
    async fn serve_hyper<Io, S>(
        &mut self,
        prefix: Bytes,
        io: Io,
        adapter: Adapter<S>,
        partial: Option<Duration>,
    ) -> Served<Io>
    where
        Io: AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
        S: ConnService,
    {
        let own_builder;
        let builder = match partial {
            None => &self.shared.h1,
            Some(left) => {
                // hyper reads the rest (or refuses what it has) with its own limits, by
                // what is left of the header timeout.
                let mut b = self.shared.h1.clone();
                b.header_read_timeout(left.max(Duration::from_millis(1)));
                own_builder = b;
                &own_builder
            }
        };
        let conn = builder
            .serve_connection(
                TokioIo::new(ParkIo::new(prefix, io, self.state.clone())),
                adapter,
            )
            .with_upgrades();
        // hyper's connection is `Unpin` (its I/O is): it is moved out at the end.
        let mut conn = conn;
        let start = self.state.served();
        let mut graceful = false;
        let state = &self.state;
        let stopped = &mut self.stopped;
        let stopping = &mut self.stopping;
        let sleep = &mut self.sleep;
        let park_after = self.shared.config.park_after;
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
                    Pin::new(&mut conn).graceful_shutdown();
                    graceful = true;
                }
            }
            match Pin::new(&mut conn).poll(cx) {
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
            return Served::Ended;
        }
        // None: upgraded, the stream went to `hyper::upgrade::on`.
        let Some(parts) = conn.into_parts() else {
            return Served::Ended;
        };
        let (rest, io) = parts.io.into_inner().into_parts();
        Served::Parts {
            io,
            rest: join(parts.read_buf, rest),
            graceful,
        }
    }

    /// Read the start of the next request into a buffer of its own size, until its head
    /// is complete, without a hyper connection: a client that sends its head slowly (or
    /// not at all) costs the bytes it sent, not hyper's 16 KiB of buffers, and its bytes
    /// are not parsed again on every read. Reading instead of peeking also spares a
    /// syscall per request: hyper gets the bytes in front of the stream.
    ///
    /// Each read goes to a stack buffer; bytes are copied to the heap only once they
    /// arrive, so an idle connection holds no buffer (and a stale readiness left by
    /// hyper's last read costs one `EAGAIN`, nothing more).
    ///
    /// A plain function returning the polling closure, not an `async fn`, so that the
    /// future holds each of its values once (it is part of what a parked connection
    /// costs).
    fn read_head<'s, I: AsyncRead + Unpin>(
        &'s mut self,
        io: &'s mut I,
        first: bool,
        wait: Wait,
    ) -> impl Future<Output = Head> + use<'a, 's, F, I> {
        let header_timeout = self.shared.config.header_read_timeout;
        let stats = self.stats;
        let sleep = &mut self.sleep;
        let stopped = &mut self.stopped;
        let stopping = &mut self.stopping;
        let mut parked: Option<ParkedGuard<'_>> = None;
        let mut head = BytesMut::new();
        let mut wait = wait;
        // The timer is armed lazily, on the first read that would block: a request whose
        // bytes are already there never touches the timer wheel.
        let mut armed = false;
        poll_fn(move |cx| {
            loop {
                let mut chunk = [MaybeUninit::<u8>::uninit(); READ_CHUNK];
                let mut rb = ReadBuf::uninit(&mut chunk);
                match Pin::new(&mut *io).poll_read(cx, &mut rb) {
                    Poll::Ready(Ok(())) => {}
                    Poll::Ready(Err(_)) => return Poll::Ready(Head::Close),
                    Poll::Pending => break,
                }
                let got = rb.filled();
                if got.is_empty() {
                    // EOF, mid-head or not: hyper would close without an answer too
                    // (an incomplete head gets no automatic response).
                    return Poll::Ready(Head::Close);
                }
                if head.is_empty() {
                    if let Wait::Idle(_) = wait {
                        // The next request has begun: its head has the header timeout.
                        wait = Wait::Head(Instant::now() + header_timeout);
                        armed = false;
                    }
                }
                let from = head.len();
                head.extend_from_slice(got);
                if first && is_h2_start(&head) {
                    return Poll::Ready(Head::H2(take(&mut head)));
                }
                if head_complete(&head, from) {
                    return Poll::Ready(Head::Complete(take(&mut head)));
                }
                if head.len() >= HEAD_MAX || !plausible(got) {
                    // A long head: hyper reads the rest with its own buffers and limits.
                    // Bytes no request head has (a TLS hello on the plain port, binary
                    // garbage): hyper answers 400 at once, as it did when it read them
                    // itself, rather than the client waiting for an empty line.
                    return Poll::Ready(Head::Partial(take(&mut head), wait.deadline()));
                }
            }
            if !*stopping && stopped.as_mut().poll(cx).is_ready() {
                *stopping = true;
            }
            if *stopping {
                return Poll::Ready(Head::Close);
            }
            if parked.is_none() {
                parked = Some(ParkedGuard::new(stats));
            }
            if !armed {
                sleep.as_mut().reset(wait.deadline());
                armed = true;
            }
            // Timed out, with or without part of a head: close without an answer, as
            // hyper does when its header timer fires (nginx too, for
            // `client_header_timeout`: the 408 is only logged).
            match sleep.as_mut().poll(cx) {
                Poll::Ready(()) => Poll::Ready(Head::Close),
                Poll::Pending => Poll::Pending,
            }
        })
    }
}

/// The bytes read so far, for hyper. `BytesMut::split` would turn the buffer into a
/// shared one (an allocation); taking it whole keeps it a plain vector that becomes a
/// `Bytes` as it is.
fn take(head: &mut BytesMut) -> Bytes {
    std::mem::take(head).freeze()
}

/// Bytes read per `read` while waiting for a head (on the stack, not kept).
const READ_CHUNK: usize = 4096;

/// A head not complete within this many bytes goes to hyper as it is; hyper reads the
/// rest into its own buffers (8 KiB and up) and applies `max_header_size`.
const HEAD_MAX: usize = 8192;

/// What a connection waits for.
#[derive(Clone, Copy)]
enum Wait {
    /// A request head, due by this instant.
    Head(Instant),
    /// The first byte of the next request, for this long; then its head.
    Idle(Duration),
}

impl Wait {
    fn deadline(self) -> Instant {
        match self {
            Wait::Head(at) => at,
            Wait::Idle(d) => Instant::now() + d,
        }
    }
}

/// What the wait for a request head gave.
enum Head {
    /// The peer closed, the socket failed, the wait timed out (with or without part of
    /// a head), or the server is stopping.
    Close,
    /// The start of an HTTP/2 connection preface (or too little to tell yet).
    H2(Bytes),
    /// A whole request head (and whatever followed it in the same reads).
    Complete(Bytes),
    /// The start of a head that hyper is to finish (past 8 KiB) or refuse (bytes no
    /// head has), with the header timeout ending at this instant.
    Partial(Bytes, Instant),
}

/// How a period of service by hyper ended.
enum Served<Io> {
    /// The connection failed, was closed, or was upgraded (the stream went to
    /// `hyper::upgrade::on`).
    Ended,
    /// hyper finished its last message and gave the stream back.
    Parts {
        io: Io,
        /// Bytes read past the message (the start of the next request).
        rest: Bytes,
        /// The driver asked hyper to end after the current message (idle, or the server
        /// is stopping); otherwise the message itself ended the connection.
        graceful: bool,
    },
}

/// Whether `bytes` may belong to a request head: no control characters other than
/// HTAB, CR and LF (hyper refuses them everywhere in a head with 400).
fn plausible(bytes: &[u8]) -> bool {
    bytes
        .iter()
        .all(|&b| (b >= 0x20 && b != 0x7f) || b == b'\t' || b == b'\r' || b == b'\n')
}

/// Whether `buf` could be the start of the HTTP/2 connection preface.
fn is_h2_start(buf: &[u8]) -> bool {
    let n = buf.len().min(H2_PREFACE.len());
    buf.get(..n) == H2_PREFACE.get(..n)
}

/// Whether `buf` holds the end of a request head (an empty line: CRLF CRLF, or bare LFs
/// as hyper also accepts them), looking only at bytes from `from` (and the three before
/// it, where the end may have begun). An empty line before the request line (which
/// hyper skips) may also match; that only hands the bytes to hyper early.
fn head_complete(buf: &[u8], from: usize) -> bool {
    // Usually the head is all there is: look at its end first.
    if buf.ends_with(b"\n\r\n") || buf.ends_with(b"\n\n") {
        return true;
    }
    let mut at = from.saturating_sub(3);
    while let Some(i) = buf
        .get(at..)
        .and_then(|t| t.iter().position(|&b| b == b'\n'))
    {
        let lf = at + i;
        match (buf.get(lf + 1), buf.get(lf + 2)) {
            (Some(b'\n'), _) | (Some(b'\r'), Some(b'\n')) => return true,
            _ => at = lf + 1,
        }
    }
    false
}

/// Bytes hyper read past the message, then bytes it never read.
///
/// Nothing left is an empty `Bytes` of its own: hyper's leftover is a view of its read
/// buffer, and even an empty view keeps that buffer (8 KiB and up) alive, which a
/// parked connection would then hold while it waits.
fn join(read: Bytes, rest: Bytes) -> Bytes {
    if rest.is_empty() {
        if read.is_empty() {
            Bytes::new()
        } else {
            read
        }
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
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::server::serve::{http1_builder, http_builder};
    use crate::server::HttpConfig;
    use tokio::io::AsyncWriteExt;

    #[test]
    fn the_end_of_a_head_is_an_empty_line() {
        let head = b"GET / HTTP/1.1\r\nHost: a\r\n\r\n";
        assert!(head_complete(head, 0));
        assert!(head_complete(head, head.len() - 1));
        assert!(!head_complete(&head[..head.len() - 1], 0));
        assert!(head_complete(b"GET / HTTP/1.1\nHost: a\n\n", 0));
        // Only the bytes from `from` (and the three before) are looked at.
        let split = b"GET / HTTP/1.1\r\nHost: a\r\n\r";
        assert!(!head_complete(split, 0));
        let whole = b"GET / HTTP/1.1\r\nHost: a\r\n\r\n";
        assert!(head_complete(whole, split.len()));
        assert!(!head_complete(b"", 0));
        // A body or the next request after the head.
        assert!(head_complete(
            b"POST / HTTP/1.1\r\nContent-Length: 2\r\n\r\nab",
            0
        ));
        assert!(head_complete(b"GET / HTTP/1.1\n\nGET", 10));
        assert!(!head_complete(b"GET / HTTP/1.1\r\nHost: a\r\nX: \r\r\n", 0));
    }

    /// Drops its flag when the bytes it owns are freed.
    struct Owner(Vec<u8>, Arc<std::sync::atomic::AtomicBool>);

    impl AsRef<[u8]> for Owner {
        fn as_ref(&self) -> &[u8] {
            &self.0
        }
    }

    impl Drop for Owner {
        fn drop(&mut self) {
            self.1.store(true, Ordering::Relaxed);
        }
    }

    #[test]
    fn nothing_left_over_keeps_no_read_buffer_alive() {
        use bytes::Buf;
        let freed = Arc::new(std::sync::atomic::AtomicBool::new(false));
        // What hyper hands back after a whole message: an empty view of its buffer.
        let mut read = Bytes::from_owner(Owner(vec![b'x'; 8192], freed.clone()));
        read.advance(8192);
        let kept = join(read, Bytes::new());
        assert!(kept.is_empty());
        assert!(
            freed.load(Ordering::Relaxed),
            "the read buffer outlived the message"
        );

        // Bytes of a next request are kept, in order.
        let next = join(
            Bytes::from_static(b"GET /"),
            Bytes::from_static(b" HTTP/1.1"),
        );
        assert_eq!(&next[..], b"GET / HTTP/1.1");
        assert_eq!(&join(Bytes::new(), Bytes::from_static(b"G"))[..], b"G");
    }

    #[test]
    fn the_h2_preface_is_told_from_its_first_byte() {
        assert!(is_h2_start(b"P"));
        assert!(is_h2_start(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n..."));
        assert!(!is_h2_start(b"POST / HTTP/1.1\r\n"));
        assert!(!is_h2_start(b"GET"));
    }

    /// Reads `wait`'s head from `io` with a fresh driver state; the parked gauge after
    /// `probe` (time advanced by the paused clock) and the result.
    async fn read_head_of(
        io: &mut tokio::io::DuplexStream,
        first: bool,
        wait: Wait,
        probe: Duration,
        then: &[u8],
        client: &mut tokio::io::DuplexStream,
        eof: bool,
    ) -> (usize, Head) {
        let config = HttpConfig {
            header_read_timeout: Duration::from_secs(1),
            ..HttpConfig::default()
        };
        let shared = Shared {
            auto: http_builder(&config),
            h1: http1_builder(&config),
            config,
            set_nodelay: false,
            stop: crate::server::serve::Stop::default(),
        };
        let stats = ServerStats::default();
        let stopped = std::future::pending::<()>();
        tokio::pin!(stopped);
        let sleep = tokio::time::sleep(Duration::ZERO);
        tokio::pin!(sleep);
        let mut parked = Parked {
            shared: &shared,
            stats: &stats,
            state: crate::server::ConnState::new(),
            stopped,
            stopping: false,
            sleep,
        };
        let fut = parked.read_head(io, first, wait);
        tokio::pin!(fut);
        assert!(tokio::time::timeout(probe, &mut fut).await.is_err());
        let gauge = stats.parked();
        client.write_all(then).await.unwrap();
        if eof {
            client.shutdown().await.unwrap();
        }
        (gauge, fut.await)
    }

    #[tokio::test(start_paused = true)]
    async fn a_head_in_pieces_is_read_whole_while_counted_as_parked() {
        let (mut client, mut io) = tokio::io::duplex(1024);
        client.write_all(b"GET / HTTP/1.1\r\nHo").await.unwrap();
        let start = Instant::now();
        let wait = Wait::Head(start + Duration::from_secs(1));
        let (gauge, head) = read_head_of(
            &mut io,
            true,
            wait,
            Duration::from_millis(500),
            b"st: a\r\n\r\nGET",
            &mut client,
            false,
        )
        .await;
        assert_eq!(gauge, 1);
        let Head::Complete(bytes) = head else {
            panic!("not complete")
        };
        assert_eq!(bytes, "GET / HTTP/1.1\r\nHost: a\r\n\r\nGET");
    }

    #[tokio::test(start_paused = true)]
    async fn a_head_incomplete_at_its_deadline_closes() {
        let (mut client, mut io) = tokio::io::duplex(1024);
        client.write_all(b"GET / HTTP/1.1\r\nHo").await.unwrap();
        let start = Instant::now();
        let wait = Wait::Head(start + Duration::from_secs(1));
        let (_, head) = read_head_of(
            &mut io,
            true,
            wait,
            Duration::from_millis(500),
            b"st",
            &mut client,
            false,
        )
        .await;
        assert!(matches!(head, Head::Close));
        assert!(start.elapsed() >= Duration::from_secs(1));
    }

    #[tokio::test(start_paused = true)]
    async fn bytes_no_head_has_go_to_hyper_at_once() {
        let (mut client, mut io) = tokio::io::duplex(1024);
        client
            .write_all(b"GET / HTTP/1.1\r\nHost: a\r\n")
            .await
            .unwrap();
        let wait = Wait::Head(Instant::now() + Duration::from_secs(1));
        let probe = Duration::from_millis(10);
        let then = b"X-Bad: \x01\r\n";
        let (_, head) = read_head_of(&mut io, true, wait, probe, then, &mut client, false).await;
        assert!(matches!(head, Head::Partial(..)));
        assert!(plausible(b"GET /\xc3\xa9 HTTP/1.1\r\nX: a\tb\r\n\r\n"));
        assert!(!plausible(b"\x16\x03\x01"));
        assert!(!plausible(b"GET / HTTP/1.1\r\nX: \x7f"));
    }

    #[tokio::test(start_paused = true)]
    async fn a_begun_keep_alive_head_has_the_header_timeout() {
        let (mut client, mut io) = tokio::io::duplex(1024);
        let start = Instant::now();
        // 60 s to begin; once begun, the header timeout (1 s) applies.
        let (gauge, head) = read_head_of(
            &mut io,
            false,
            Wait::Idle(Duration::from_secs(60)),
            Duration::from_secs(30),
            b"GET / HT",
            &mut client,
            false,
        )
        .await;
        assert_eq!(gauge, 1);
        assert!(matches!(head, Head::Close));
        let took = start.elapsed();
        assert!(
            took >= Duration::from_secs(31) && took < Duration::from_secs(32),
            "{took:?}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn an_h2_preface_and_eof_end_the_wait() {
        let (mut client, mut io) = tokio::io::duplex(1024);
        let wait = Wait::Head(Instant::now() + Duration::from_secs(1));
        let (_, head) = read_head_of(
            &mut io,
            true,
            wait,
            Duration::from_millis(10),
            b"PRI * HTTP/2.0\r\n",
            &mut client,
            false,
        )
        .await;
        assert!(matches!(head, Head::H2(b) if b == "PRI * HTTP/2.0\r\n"));
        let (mut client, mut io) = tokio::io::duplex(1024);
        client.write_all(b"GET /").await.unwrap();
        let wait = Wait::Head(Instant::now() + Duration::from_secs(1));
        let probe = Duration::from_millis(10);
        let (_, head) = read_head_of(&mut io, true, wait, probe, b"", &mut client, true).await;
        assert!(matches!(head, Head::Close));
    }

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
