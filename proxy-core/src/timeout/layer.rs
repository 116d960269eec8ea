//! The body timeout layers: [`ClientBodyTimeout`] on the request body and
//! [`UpstreamBodyTimeout`] on the response body.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use http_body::Body;
use pin_project_lite::pin_project;
use tower_layer::Layer;
use tower_service::Service;

use crate::body::{ProxyBody, Request, Response};
use crate::buffer::client_fault;
use crate::error::Kind;
use crate::timeout::IdleTimeoutBody;

/// Applies nginx's `client_body_timeout` to the request body: see [`ClientBodyTimeout`].
#[derive(Debug, Clone, Copy)]
pub struct ClientBodyTimeoutLayer {
    timeout: Duration,
}

impl ClientBodyTimeoutLayer {
    /// Fail a request whose client stays silent for `timeout` between two body reads
    /// (nginx's default is 60 s).
    pub fn new(timeout: Duration) -> Self {
        ClientBodyTimeoutLayer { timeout }
    }
}

impl<S> Layer<S> for ClientBodyTimeoutLayer {
    type Service = ClientBodyTimeout<S>;

    fn layer(&self, inner: S) -> ClientBodyTimeout<S> {
        ClientBodyTimeout {
            inner,
            timeout: self.timeout,
        }
    }
}

/// Wraps each request body in an [`IdleTimeoutBody`] that fails with
/// [`Kind::ClientTimeout`] when the client sends nothing for the timeout while the proxy
/// waits for it.
///
/// Whoever reads the body sees the error: request buffering answers 408 itself; a
/// response an inner service built from the failure (a 502 because the upload to the
/// upstream broke) is turned into the 408 it really is, with `Connection: close`.
#[derive(Debug, Clone)]
pub struct ClientBodyTimeout<S> {
    inner: S,
    timeout: Duration,
}

impl<S> Service<Request> for ClientBodyTimeout<S>
where
    S: Service<Request, Response = Response>,
{
    type Response = Response;
    type Error = S::Error;
    type Future = ResponseFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request) -> Self::Future {
        let req = if req.body().is_end_stream() {
            req
        } else {
            let timeout = self.timeout;
            req.map(|b| ProxyBody::boxed(IdleTimeoutBody::new(b, timeout, Kind::ClientTimeout)))
        };
        ResponseFuture {
            inner: self.inner.call(req),
            upstream_body: None,
        }
    }
}

/// Applies nginx's `proxy_read_timeout` between two reads of the upstream's response
/// body: see [`UpstreamBodyTimeout`].
#[derive(Debug, Clone, Copy)]
pub struct UpstreamBodyTimeoutLayer {
    timeout: Duration,
}

impl UpstreamBodyTimeoutLayer {
    /// Fail a response body whose upstream stays silent for `timeout` (nginx's default is
    /// 60 s). The time to the response header is the upstream client's own read timeout.
    pub fn new(timeout: Duration) -> Self {
        UpstreamBodyTimeoutLayer { timeout }
    }
}

impl<S> Layer<S> for UpstreamBodyTimeoutLayer {
    type Service = UpstreamBodyTimeout<S>;

    fn layer(&self, inner: S) -> UpstreamBodyTimeout<S> {
        UpstreamBodyTimeout {
            inner,
            timeout: self.timeout,
        }
    }
}

/// Wraps each response body of the inner service in an [`IdleTimeoutBody`] that fails
/// with [`Kind::UpstreamTimeout`]. The header is already on its way to the client when
/// that happens, so the only honest signal left is to cut the client connection, which
/// hyper does when a body errors.
///
/// Put it right around the forwarding service, inside response buffering, so a stalled
/// upstream also stops the read-ahead.
#[derive(Debug, Clone)]
pub struct UpstreamBodyTimeout<S> {
    inner: S,
    timeout: Duration,
}

impl<S> Service<Request> for UpstreamBodyTimeout<S>
where
    S: Service<Request, Response = Response>,
{
    type Response = Response;
    type Error = S::Error;
    type Future = ResponseFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request) -> Self::Future {
        ResponseFuture {
            inner: self.inner.call(req),
            upstream_body: Some(self.timeout),
        }
    }
}

pin_project! {
    /// The response future of [`ClientBodyTimeout`] and [`UpstreamBodyTimeout`].
    #[derive(Debug)]
    pub struct ResponseFuture<F> {
        #[pin]
        inner: F,
        // Some: wrap the response body (UpstreamBodyTimeout); None: check the response
        // for a client-side body failure (ClientBodyTimeout).
        upstream_body: Option<Duration>,
    }
}

impl<F, E> Future for ResponseFuture<F>
where
    F: Future<Output = Result<Response, E>>,
{
    type Output = Result<Response, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let resp = std::task::ready!(this.inner.poll(cx))?;
        let resp = match *this.upstream_body {
            Some(timeout) if !resp.body().is_end_stream() => resp
                .map(|b| ProxyBody::boxed(IdleTimeoutBody::new(b, timeout, Kind::UpstreamTimeout))),
            Some(_) => resp,
            None => client_fault(resp),
        };
        Poll::Ready(Ok(resp))
    }
}
