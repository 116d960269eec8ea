//! [`ParkIo`]: the I/O a parking HTTP/1 connection hands to each hyper connection it
//! starts: bytes already read (a pipelined request, the start of the next one) served
//! first, then the stream.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::{Buf, Bytes};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::server::adapter::ConnState;

/// A client stream with bytes in front of it.
///
/// Shutdown is the driver's to decide: while the connection is plain HTTP, hyper's
/// end-of-connection shutdown only flushes (the driver then parks the stream or closes
/// it itself). Once a 101 went out, the stream belongs to the upgrade (hyper hands this
/// object to `hyper::upgrade::on`), and shutdown is real. Without a state
/// ([`ParkIo::handed_over`]) the stream is hyper's for good and shutdown is always real.
pub(crate) struct ParkIo<T> {
    prefix: Bytes,
    io: T,
    state: Option<Arc<ConnState>>,
}

impl<T> ParkIo<T> {
    pub(crate) fn new(prefix: Bytes, io: T, state: Arc<ConnState>) -> Self {
        ParkIo {
            prefix,
            io,
            state: Some(state),
        }
    }

    /// `io` with `prefix` in front, given to hyper until the connection ends (HTTP/2 with
    /// prior knowledge): shutdown goes to the stream.
    pub(crate) fn handed_over(prefix: Bytes, io: T) -> Self {
        ParkIo {
            prefix,
            io,
            state: None,
        }
    }

    /// The bytes not read yet and the stream.
    pub(crate) fn into_parts(self) -> (Bytes, T) {
        (self.prefix, self.io)
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for ParkIo<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if !self.prefix.is_empty() {
            let n = self.prefix.len().min(buf.remaining());
            buf.put_slice(&self.prefix[..n]);
            self.prefix.advance(n);
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for ParkIo<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if self.state.as_ref().is_none_or(|s| s.upgraded()) {
            Pin::new(&mut self.io).poll_shutdown(cx)
        } else {
            Pin::new(&mut self.io).poll_flush(cx)
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn prefix_first_then_stream_and_shutdown_only_after_an_upgrade() {
        let (a, mut b) = tokio::io::duplex(64);
        let state = ConnState::new();
        let mut io = ParkIo::new(Bytes::from_static(b"GET /"), a, state.clone());
        b.write_all(b" HTTP/1.1").await.unwrap();
        let mut got = [0u8; 3];
        io.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"GET");
        let mut rest = [0u8; 11];
        io.read_exact(&mut rest).await.unwrap();
        assert_eq!(&rest, b" / HTTP/1.1");
        // Not upgraded: shutdown leaves the stream open for the next request.
        io.shutdown().await.unwrap();
        io.write_all(b"x").await.unwrap();
        let mut one = [0u8; 1];
        b.read_exact(&mut one).await.unwrap();
        let (prefix, _stream) = io.into_parts();
        assert!(prefix.is_empty());
    }

    #[tokio::test]
    async fn a_handed_over_stream_shuts_down_for_real() {
        let (a, mut b) = tokio::io::duplex(64);
        let mut io = ParkIo::handed_over(Bytes::from_static(b"PRI"), a);
        let mut got = [0u8; 3];
        io.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"PRI");
        io.shutdown().await.unwrap();
        let mut rest = Vec::new();
        b.read_to_end(&mut rest).await.unwrap();
        assert!(rest.is_empty());
    }
}
