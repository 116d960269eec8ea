//! [`IdleTimeoutBody`]: a body that fails when its source stays silent too long.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;
use tokio::time::{Instant, Sleep};

use crate::error::{Error, Kind};

pin_project! {
    /// A body that errors with a chosen [`Kind`] when the wrapped body keeps its reader
    /// waiting longer than `timeout` for the next frame.
    ///
    /// The clock only runs while the reader is actually waiting: it starts when a poll
    /// finds no frame ready and stops when a frame arrives. Time the reader spends not
    /// polling (because the other side of the proxy is slow to take the data) is not
    /// counted against this body's source. This is nginx's "time between two successive
    /// read operations", for `client_body_timeout` ([`Kind::ClientTimeout`]) and for
    /// `proxy_read_timeout` on a response body ([`Kind::UpstreamTimeout`]).
    ///
    /// After the timeout error the body ends.
    pub struct IdleTimeoutBody<B> {
        #[pin]
        body: B,
        // Created on the first wait and reset afterwards: no timer for bodies that never
        // make their reader wait, and no allocation at all (the timer lives inline).
        #[pin]
        sleep: Option<Sleep>,
        timeout: Duration,
        kind: Kind,
        armed: bool,
        done: bool,
    }
}

impl<B> IdleTimeoutBody<B> {
    /// Wrap `body`; a wait longer than `timeout` fails it with an error of `kind`.
    pub fn new(body: B, timeout: Duration, kind: Kind) -> Self {
        IdleTimeoutBody {
            body,
            sleep: None,
            timeout,
            kind,
            armed: false,
            done: false,
        }
    }
}

/// `now + d`, saturating far in the future instead of overflowing.
pub(crate) fn deadline_after(d: Duration) -> Instant {
    let now = Instant::now();
    now.checked_add(d)
        .unwrap_or_else(|| now + Duration::from_secs(60 * 60 * 24 * 365 * 30))
}

impl<B> Body for IdleTimeoutBody<B>
where
    B: Body<Data = Bytes>,
    B::Error: Into<Error>,
{
    type Data = Bytes;
    type Error = Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Error>>> {
        let mut this = self.project();
        if *this.done {
            return Poll::Ready(None);
        }
        if let Poll::Ready(frame) = this.body.poll_frame(cx) {
            *this.armed = false;
            return Poll::Ready(frame.map(|f| f.map_err(Into::into)));
        }
        if !*this.armed {
            let deadline = deadline_after(*this.timeout);
            match this.sleep.as_mut().as_pin_mut() {
                Some(sleep) => sleep.reset(deadline),
                None => this.sleep.set(Some(tokio::time::sleep_until(deadline))),
            }
            *this.armed = true;
        }
        if let Some(sleep) = this.sleep.as_pin_mut() {
            if sleep.poll(cx).is_ready() {
                *this.done = true;
                return Poll::Ready(Some(Err(Error::new(*this.kind))));
            }
        }
        Poll::Pending
    }

    fn is_end_stream(&self) -> bool {
        self.done || self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

impl<B> std::fmt::Debug for IdleTimeoutBody<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IdleTimeoutBody")
            .field("timeout", &self.timeout)
            .field("kind", &self.kind)
            .finish()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;
    use tokio::sync::mpsc;

    /// A body fed by the test, one frame at a time.
    struct Fed(mpsc::Receiver<Bytes>);

    impl Body for Fed {
        type Data = Bytes;
        type Error = Error;
        fn poll_frame(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, Error>>> {
            self.0.poll_recv(cx).map(|o| o.map(|b| Ok(Frame::data(b))))
        }
    }

    #[tokio::test(start_paused = true)]
    async fn frames_within_the_timeout_pass() {
        let (tx, rx) = mpsc::channel(1);
        let mut body = std::pin::pin!(IdleTimeoutBody::new(
            Fed(rx),
            Duration::from_secs(10),
            Kind::ClientTimeout
        ));
        for _ in 0..5 {
            let tx = tx.clone();
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_secs(9)).await;
                tx.send(Bytes::from_static(b"x")).await.unwrap();
            });
            let frame = body.frame().await.unwrap().unwrap();
            assert_eq!(frame.into_data().unwrap(), "x");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_silent_source_times_out_with_the_kind() {
        let (_tx, rx) = mpsc::channel::<Bytes>(1);
        let mut body = std::pin::pin!(IdleTimeoutBody::new(
            Fed(rx),
            Duration::from_secs(10),
            Kind::UpstreamTimeout
        ));
        let start = Instant::now();
        let err = body.frame().await.unwrap().unwrap_err();
        assert_eq!(err.kind(), Kind::UpstreamTimeout);
        assert_eq!(start.elapsed(), Duration::from_secs(10));
        assert!(
            body.frame().await.is_none(),
            "the body ends after the error"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn time_not_spent_waiting_is_not_counted() {
        let (tx, rx) = mpsc::channel(4);
        let mut body = std::pin::pin!(IdleTimeoutBody::new(
            Fed(rx),
            Duration::from_secs(10),
            Kind::ClientTimeout
        ));
        tx.send(Bytes::from_static(b"a")).await.unwrap();
        assert!(body.frame().await.unwrap().is_ok());
        // The reader goes away for longer than the timeout (its consumer was slow); the
        // next frame is already there when it comes back.
        tokio::time::sleep(Duration::from_secs(60)).await;
        tx.send(Bytes::from_static(b"b")).await.unwrap();
        assert!(body.frame().await.unwrap().is_ok());
    }

    #[tokio::test(start_paused = true)]
    async fn huge_timeouts_do_not_overflow() {
        let (tx, rx) = mpsc::channel(1);
        let mut body = std::pin::pin!(IdleTimeoutBody::new(
            Fed(rx),
            Duration::MAX,
            Kind::ClientTimeout
        ));
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_secs(3600)).await;
            tx.send(Bytes::from_static(b"late")).await.unwrap();
        });
        assert!(body.frame().await.unwrap().is_ok());
    }
}
