//! [`BodyLimit`]: nginx's `client_max_body_size`.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::header::{HeaderValue, CONNECTION};
use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;
use tower_layer::Layer;
use tower_service::Service;

use crate::body::{ProxyBody, Request, Response};
use crate::error::{Error, Kind};
use crate::response::{self, ErrorCause};

/// Limits the request body size: see [`BodyLimit`].
#[derive(Debug, Clone, Copy)]
pub struct BodyLimitLayer {
    max: u64,
}

impl BodyLimitLayer {
    /// Allow request bodies of at most `max` bytes; `0` means unlimited (as in nginx,
    /// whose default is 1 MiB).
    pub fn new(max: u64) -> Self {
        BodyLimitLayer { max }
    }
}

impl<S> Layer<S> for BodyLimitLayer {
    type Service = BodyLimit<S>;

    fn layer(&self, inner: S) -> BodyLimit<S> {
        BodyLimit {
            inner,
            max: self.max,
        }
    }
}

/// Answers `413 Payload Too Large` without reading anything when the declared length
/// (`Content-Length`, or HTTP/2's) is over the limit; a body of unknown length (chunked)
/// is counted as it streams and fails with [`Kind::BodyTooLarge`] once it passes the
/// limit. Whoever reads it sees that error: request buffering answers 413 itself, and a
/// response an inner service built from the broken upload is turned into a 413 with
/// `Connection: close`.
#[derive(Debug, Clone)]
pub struct BodyLimit<S> {
    inner: S,
    max: u64,
}

impl<S> Service<Request> for BodyLimit<S>
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
        match check(req, self.max, true) {
            Ok(req) => ResponseFuture {
                state: State::Called {
                    inner: self.inner.call(req),
                },
            },
            Err(TooLarge) => ResponseFuture {
                state: State::Rejected {
                    resp: Some(too_large()),
                },
            },
        }
    }
}

/// Reject a request whose declared length is over `max`, or (if `wrap`) wrap a body of
/// unknown length in a [`LimitedBody`]. `max == 0`: no limit.
pub(crate) fn check(req: Request, max: u64, wrap: bool) -> Result<Request, TooLarge> {
    if max == 0 {
        return Ok(req);
    }
    let hint = req.body().size_hint();
    if hint.lower() > max {
        return Err(TooLarge);
    }
    // A body whose length is known and within the limit cannot grow past it: hyper
    // enforces the declared length itself. Only the unknown need counting.
    match hint.upper() {
        Some(upper) if upper <= max => Ok(req),
        _ if !wrap || req.body().is_end_stream() => Ok(req),
        _ => Ok(req.map(|body| ProxyBody::boxed(LimitedBody::new(body, max)))),
    }
}

/// A declared body length over the limit.
#[derive(Debug)]
pub(crate) struct TooLarge;

/// The 413 answer.
pub(crate) fn too_large() -> Response {
    let mut resp = response::from_error(Error::new(Kind::BodyTooLarge));
    // The unread body makes the connection unusable for another request anyway.
    resp.headers_mut()
        .insert(CONNECTION, HeaderValue::from_static("close"));
    resp
}

pin_project! {
    /// The response future of [`BodyLimit`].
    #[derive(Debug)]
    pub struct ResponseFuture<F> {
        #[pin]
        state: State<F>,
    }
}

pin_project! {
    #[project = Proj]
    #[derive(Debug)]
    enum State<F> {
        // The request went on to the inner service.
        Called { #[pin] inner: F },
        // Rejected before reading: a 413.
        Rejected { resp: Option<Response> },
    }
}

impl<F, E> Future for ResponseFuture<F>
where
    F: Future<Output = Result<Response, E>>,
{
    type Output = Result<Response, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project().state.project() {
            Proj::Called { inner } => inner.poll(cx).map_ok(client_fault),
            Proj::Rejected { resp } => Poll::Ready(Ok(resp.take().unwrap_or_else(too_large))),
        }
    }
}

pin_project! {
    /// A body that fails with [`Kind::BodyTooLarge`] as soon as more than its limit of
    /// data has come through.
    pub struct LimitedBody<B> {
        #[pin]
        body: B,
        remaining: u64,
        failed: bool,
    }
}

impl<B> LimitedBody<B> {
    /// Let at most `max` bytes of `body` through.
    pub fn new(body: B, max: u64) -> Self {
        LimitedBody {
            body,
            remaining: max,
            failed: false,
        }
    }
}

impl<B> std::fmt::Debug for LimitedBody<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LimitedBody")
            .field("remaining", &self.remaining)
            .finish()
    }
}

impl<B> Body for LimitedBody<B>
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
        let this = self.project();
        if *this.failed {
            return Poll::Ready(None);
        }
        let frame = match std::task::ready!(this.body.poll_frame(cx)) {
            Some(Ok(frame)) => frame,
            Some(Err(e)) => return Poll::Ready(Some(Err(e.into()))),
            None => return Poll::Ready(None),
        };
        if let Some(data) = frame.data_ref() {
            let len = data.len() as u64;
            if len > *this.remaining {
                *this.failed = true;
                return Poll::Ready(Some(Err(Error::new(Kind::BodyTooLarge))));
            }
            *this.remaining -= len;
        }
        Poll::Ready(Some(Ok(frame)))
    }

    fn is_end_stream(&self) -> bool {
        self.failed || self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

/// If `resp` is an error response an inner service built from a failure of the client's
/// own request body (too large, too slow, connection lost), answer what that failure
/// really is instead (413, 408, 499) and close the connection; otherwise `resp` as it is.
///
/// The forwarding service sees such a failure as "sending the request to the upstream
/// failed" (502); the cause is still in its error's source chain.
pub(crate) fn client_fault(resp: Response) -> Response {
    if !resp.status().is_server_error() {
        return resp;
    }
    let Some(kind) = resp
        .extensions()
        .get::<ErrorCause>()
        .and_then(|cause| client_kind(&cause.0))
    else {
        return resp;
    };
    let mut fixed = response::from_error(Error::new(kind));
    fixed
        .headers_mut()
        .insert(CONNECTION, HeaderValue::from_static("close"));
    fixed
}

/// The first client-side body failure in `err`'s source chain (the error itself
/// included).
fn client_kind(err: &Error) -> Option<Kind> {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(err);
    // Bounded: source chains are short, but a cycle must not hang a request.
    for _ in 0..16 {
        let e = cur?;
        if let Some(ours) = e.downcast_ref::<Error>() {
            if matches!(ours.kind(), Kind::BodyTooLarge | Kind::ClientTimeout) {
                return Some(ours.kind());
            }
        }
        cur = e.source();
    }
    None
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;
    use proptest::prelude::*;
    use tower::ServiceExt;

    fn echo_len() -> impl Service<
        Request,
        Response = Response,
        Error = std::convert::Infallible,
        Future = impl Send,
    > + Clone {
        tower::service_fn(|req: Request| async move {
            Ok(match req.into_body().collect().await {
                Ok(c) => Response::new(ProxyBody::from(c.to_bytes().len().to_string())),
                Err(e) => response::from_error(Error::with_source(Kind::UpstreamSend, e)),
            })
        })
    }

    fn chunked(chunks: Vec<Vec<u8>>) -> ProxyBody {
        let frames = chunks
            .into_iter()
            .map(|c| Ok::<_, Error>(Frame::data(Bytes::from(c))));
        ProxyBody::boxed(http_body_util::StreamBody::new(futures_util::stream::iter(
            frames,
        )))
    }

    #[tokio::test]
    async fn declared_length_over_the_limit_is_413_without_calling_inner() {
        let inner = tower::service_fn(|_req: Request| async {
            panic!("the inner service must not be called");
            #[allow(unreachable_code)]
            Ok::<_, std::convert::Infallible>(Response::default())
        });
        let svc = BodyLimitLayer::new(4).layer(inner);
        let resp = svc
            .oneshot(Request::new(ProxyBody::from("hello")))
            .await
            .unwrap();
        assert_eq!(resp.status(), 413);
        assert_eq!(resp.headers()[CONNECTION], "close");
    }

    #[tokio::test]
    async fn a_streamed_body_over_the_limit_becomes_413() {
        let svc = BodyLimitLayer::new(10).layer(echo_len());
        let req = Request::new(chunked(vec![vec![1; 6], vec![2; 6]]));
        let resp = svc.clone().oneshot(req).await.unwrap();
        assert_eq!(resp.status(), 413);
        let req = Request::new(chunked(vec![vec![1; 6], vec![2; 4]]));
        let resp = svc.oneshot(req).await.unwrap();
        assert_eq!(resp.status(), 200);
    }

    #[tokio::test]
    async fn zero_is_unlimited() {
        let svc = BodyLimitLayer::new(0).layer(echo_len());
        let resp = svc
            .oneshot(Request::new(chunked(vec![vec![0; 100_000]])))
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
    }

    proptest! {
        #[test]
        fn limited_body_passes_exactly_up_to_the_limit(
            sizes in proptest::collection::vec(0usize..64, 0..16),
            max in 0u64..512,
        ) {
            let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
            let total: u64 = sizes.iter().map(|s| *s as u64).sum();
            let body = LimitedBody::new(chunked(sizes.iter().map(|s| vec![0; *s]).collect()), max);
            let result = rt.block_on(body.collect());
            match result {
                Ok(c) => {
                    prop_assert!(total <= max);
                    prop_assert_eq!(c.to_bytes().len() as u64, total);
                }
                Err(e) => {
                    prop_assert!(total > max);
                    prop_assert_eq!(e.kind(), Kind::BodyTooLarge);
                }
            }
        }
    }
}
