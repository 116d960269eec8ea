//! The byte tunnel behind a proxied upgrade (WebSocket): both directions copied until
//! either side closes or nothing moves for the idle timeout.

use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use hyper::upgrade::{OnUpgrade, Upgraded};
use hyper_util::rt::TokioIo;
use pin_project_lite::pin_project;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::Instant;

/// Per-request upstream timeouts, as a location sets them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UpstreamTimeouts {
    /// Time allowed for the upstream's response header (nginx's `proxy_read_timeout`).
    pub read_timeout: Duration,
    /// How long an upgraded connection (WebSocket) may stay silent in both directions
    /// before it is closed (nginx applies `proxy_read_timeout` here too; the seeds use
    /// 3600 s for `/ws/`).
    pub idle_timeout: Duration,
}

impl Default for UpstreamTimeouts {
    fn default() -> Self {
        UpstreamTimeouts {
            read_timeout: Duration::from_secs(60),
            idle_timeout: Duration::from_secs(60),
        }
    }
}

/// Wait for both upgrades, then copy bytes both ways in a task of its own.
pub(crate) fn spawn(client: OnUpgrade, upstream: OnUpgrade, idle: Duration) {
    tokio::spawn(async move {
        let (client, upstream) = match tokio::try_join!(client, upstream) {
            Ok(pair) => pair,
            Err(e) => {
                tracing::debug!(error = %e, "upgrade failed");
                return;
            }
        };
        if let Err(e) = run(client, upstream, idle).await {
            tracing::debug!(error = %e, "upgraded connection ended with an error");
        }
    });
}

async fn run(client: Upgraded, upstream: Upgraded, idle: Duration) -> std::io::Result<()> {
    let start = Instant::now();
    let last = Arc::new(AtomicU64::new(0));
    let mut client = Activity::new(TokioIo::new(client), start, last.clone());
    let mut upstream = Activity::new(TokioIo::new(upstream), start, last.clone());
    let copy = tokio::io::copy_bidirectional(&mut client, &mut upstream);
    tokio::pin!(copy);
    let mut deadline = start + idle;
    loop {
        tokio::select! {
            r = &mut copy => return r.map(|_| ()),
            () = tokio::time::sleep_until(deadline) => {
                let seen = start + Duration::from_millis(last.load(Ordering::Relaxed));
                if seen + idle <= Instant::now() {
                    tracing::debug!("upgraded connection idle, closing");
                    return Ok(());
                }
                deadline = seen + idle;
            }
        }
    }
}

pin_project! {
    /// An I/O object that records when it last moved a byte.
    struct Activity<T> {
        #[pin]
        io: T,
        start: Instant,
        last: Arc<AtomicU64>,
    }
}

impl<T> Activity<T> {
    fn new(io: T, start: Instant, last: Arc<AtomicU64>) -> Self {
        Activity { io, start, last }
    }
}

fn touch(start: Instant, last: &AtomicU64) {
    let ms = u64::try_from(start.elapsed().as_millis()).unwrap_or(u64::MAX);
    last.store(ms, Ordering::Relaxed);
}

impl<T: AsyncRead> AsyncRead for Activity<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = self.project();
        let before = buf.filled().len();
        let r = this.io.poll_read(cx, buf);
        if buf.filled().len() > before {
            touch(*this.start, this.last);
        }
        r
    }
}

impl<T: AsyncWrite> AsyncWrite for Activity<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        self.project().io.poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        self.project().io.poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        self.project().io.poll_shutdown(cx)
    }
}
