//! nginx's `send_timeout`: [`SendTimeoutIo`] on the client connection, and
//! [`SendTimeoutAccept`] to put it there from a listener.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use pin_project_lite::pin_project;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::time::Sleep;

use crate::client_info::ClientInfo;
use crate::server::Accept;
use crate::timeout::idle::deadline_after;

// Why on the connection and not on the response body: when a client stops reading, the
// socket's send buffer fills, hyper stops polling the response body and waits for the
// socket to become writable. A body wrapper is then never polled again, so it cannot notice
// anything; the stalled write is only visible on the connection's I/O object. Doing it
// here also covers HTTP/2, where one slow reader stalls the whole connection's writes.

pin_project! {
    /// A client connection whose writes fail with [`io::ErrorKind::TimedOut`] when the
    /// peer accepts nothing for the timeout: the clock starts when a write (or flush)
    /// cannot proceed and stops as soon as one makes progress, so it measures the time
    /// between two successful writes while there is something to send, like nginx's
    /// `send_timeout`. Idle connections (nothing to write) are never timed out by it.
    ///
    /// hyper treats the error like any broken connection: it closes it.
    pub struct SendTimeoutIo<T> {
        #[pin]
        io: T,
        // Boxed so that the wrapper stays `Unpin` when `T` is (the server's I/O objects
        // must be); one allocation per connection at its first stalled write, reused.
        sleep: Option<Pin<Box<Sleep>>>,
        timeout: Duration,
        armed: bool,
    }
}

impl<T> SendTimeoutIo<T> {
    /// Wrap `io` with a send timeout.
    pub fn new(io: T, timeout: Duration) -> Self {
        SendTimeoutIo {
            io,
            sleep: None,
            timeout,
            armed: false,
        }
    }

    /// The wrapped I/O object.
    pub fn get_ref(&self) -> &T {
        &self.io
    }
}

impl<T> std::fmt::Debug for SendTimeoutIo<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SendTimeoutIo")
            .field("timeout", &self.timeout)
            .field("armed", &self.armed)
            .finish()
    }
}

/// Apply the write timer to the outcome of one write-side operation.
fn check<R>(
    poll: Poll<io::Result<R>>,
    sleep: &mut Option<Pin<Box<Sleep>>>,
    armed: &mut bool,
    timeout: Duration,
    cx: &mut Context<'_>,
) -> Poll<io::Result<R>> {
    if poll.is_ready() {
        *armed = false;
        return poll;
    }
    if !*armed {
        let deadline = deadline_after(timeout);
        match sleep {
            Some(s) => s.as_mut().reset(deadline),
            None => *sleep = Some(Box::pin(tokio::time::sleep_until(deadline))),
        }
        *armed = true;
    }
    if let Some(s) = sleep {
        if s.as_mut().poll(cx).is_ready() {
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "client accepted no data within the send timeout",
            )));
        }
    }
    Poll::Pending
}

impl<T: AsyncRead> AsyncRead for SendTimeoutIo<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        self.project().io.poll_read(cx, buf)
    }
}

impl<T: AsyncWrite> AsyncWrite for SendTimeoutIo<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.project();
        let poll = this.io.poll_write(cx, buf);
        check(poll, this.sleep, this.armed, *this.timeout, cx)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.project();
        let poll = this.io.poll_write_vectored(cx, bufs);
        check(poll, this.sleep, this.armed, *this.timeout, cx)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.project();
        let poll = this.io.poll_flush(cx);
        check(poll, this.sleep, this.armed, *this.timeout, cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.project();
        let poll = this.io.poll_shutdown(cx);
        check(poll, this.sleep, this.armed, *this.timeout, cx)
    }
}

/// An [`Accept`] that wraps whatever another acceptor produces in a [`SendTimeoutIo`],
/// so a listener applies `send_timeout` to every connection.
///
/// ```
/// use std::time::Duration;
/// use proxy_core::server::{Accept, Plain};
/// use proxy_core::timeout::SendTimeoutAccept;
/// fn takes_acceptor<A: Accept>(_: A) {}
/// takes_acceptor(SendTimeoutAccept::new(Plain, Duration::from_secs(60)));
/// ```
#[derive(Debug, Clone)]
pub struct SendTimeoutAccept<A> {
    inner: A,
    timeout: Duration,
}

impl<A> SendTimeoutAccept<A> {
    /// Wrap the connections `inner` prepares with a send timeout of `timeout`
    /// (nginx's default is 60 s).
    pub fn new(inner: A, timeout: Duration) -> Self {
        SendTimeoutAccept { inner, timeout }
    }
}

impl<A: Accept> Accept for SendTimeoutAccept<A> {
    type Io = SendTimeoutIo<A::Io>;

    fn accept(
        &self,
        stream: TcpStream,
        info: &mut ClientInfo,
    ) -> impl Future<Output = io::Result<Self::Io>> + Send {
        let timeout = self.timeout;
        let inner = self.inner.accept(stream, info);
        async move { inner.await.map(|io| SendTimeoutIo::new(io, timeout)) }
    }

    fn raw_tcp(io: &Self::Io) -> Option<&TcpStream> {
        A::raw_tcp(io.get_ref())
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::time::Instant;

    #[tokio::test(start_paused = true)]
    async fn a_reader_that_stops_times_the_writer_out() {
        // A 1 KiB pipe: the writer stalls as soon as the reader stops.
        let (a, mut b) = tokio::io::duplex(1024);
        let mut io = SendTimeoutIo::new(a, Duration::from_secs(5));
        let chunk = [7u8; 512];
        // While the reader keeps up, no amount of time is too long.
        for _ in 0..10 {
            io.write_all(&chunk).await.unwrap();
            let mut got = [0u8; 512];
            b.read_exact(&mut got).await.unwrap();
            tokio::time::sleep(Duration::from_secs(30)).await;
        }
        let start = Instant::now();
        let err = loop {
            if let Err(e) = io.write_all(&chunk).await {
                break e;
            }
        };
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
        assert_eq!(start.elapsed(), Duration::from_secs(5));
    }

    #[tokio::test(start_paused = true)]
    async fn progress_resets_the_clock() {
        let (a, mut b) = tokio::io::duplex(16);
        let mut io = SendTimeoutIo::new(a, Duration::from_secs(5));
        // The reader takes 16 bytes every 4 s: each stall is shorter than the timeout.
        let reader = tokio::spawn(async move {
            let mut total = 0;
            let mut buf = [0u8; 16];
            while total < 16 * 8 {
                tokio::time::sleep(Duration::from_secs(4)).await;
                total += b.read(&mut buf).await.unwrap();
            }
        });
        io.write_all(&[1u8; 16 * 8]).await.unwrap();
        reader.await.unwrap();
    }
}
