//! [`ResponseFuture`] of [`Balance`](super::Balance) and the [`ResponseBody`] that keeps
//! a server's in-flight slot until the response body is finished or dropped.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;

use crate::balance::group::Lease;
use crate::body::Response;

/// The future of [`Balance`](super::Balance)'s responses. Dropping it (the client went
/// away) gives the server's in-flight slot back.
pub struct ResponseFuture {
    // The retry loop awaits the upstream client's `async fn`, whose future cannot be
    // named: one box per request, as `Forward` does.
    pub(crate) inner: Pin<Box<dyn Future<Output = Response> + Send>>,
}

impl std::fmt::Debug for ResponseFuture {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ResponseFuture")
    }
}

impl Future for ResponseFuture {
    type Output = Result<Response, std::convert::Infallible>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        self.inner.as_mut().poll(cx).map(Ok)
    }
}

pin_project! {
    /// A response body that holds the server's [`Lease`] until its last frame, an
    /// error, or its drop, so that `least_conn` and `max_conns` see responses still
    /// streaming as in flight.
    pub struct ResponseBody<B> {
        #[pin]
        inner: B,
        lease: Option<Lease>,
    }
}

impl<B> ResponseBody<B> {
    /// Wrap `inner`, releasing `lease` when it ends.
    pub fn new(inner: B, lease: Lease) -> Self {
        ResponseBody {
            inner,
            lease: Some(lease),
        }
    }
}

impl<B: Body<Data = Bytes>> Body for ResponseBody<B> {
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let this = self.project();
        let polled = this.inner.poll_frame(cx);
        match &polled {
            Poll::Ready(None) | Poll::Ready(Some(Err(_))) => {
                this.lease.take();
            }
            _ => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl<B> std::fmt::Debug for ResponseBody<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ResponseBody")
            .field("lease", &self.lease)
            .finish()
    }
}
