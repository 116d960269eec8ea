//! [`ConcurrencyLimit`]: a cap on requests in flight, shedding the excess with 503.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::StatusCode;
use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tower_layer::Layer;
use tower_service::Service;

use crate::body::{ProxyBody, Request, Response};
use crate::error::Error;
use crate::response;

/// Caps the requests in flight across every clone of the service: see
/// [`ConcurrencyLimit`].
#[derive(Debug, Clone)]
pub struct ConcurrencyLimitLayer {
    permits: Arc<Semaphore>,
}

impl ConcurrencyLimitLayer {
    /// At most `max` requests at once (clamped to tokio's semaphore maximum). All
    /// services made by this layer, and all their clones, share the one budget.
    pub fn new(max: usize) -> Self {
        ConcurrencyLimitLayer {
            permits: Arc::new(Semaphore::new(max.min(Semaphore::MAX_PERMITS))),
        }
    }

    /// Requests that may still start now.
    pub fn available(&self) -> usize {
        self.permits.available_permits()
    }
}

impl<S> Layer<S> for ConcurrencyLimitLayer {
    type Service = ConcurrencyLimit<S>;

    fn layer(&self, inner: S) -> ConcurrencyLimit<S> {
        ConcurrencyLimit {
            inner,
            permits: self.permits.clone(),
        }
    }
}

/// Lets a request through only while fewer than the cap are in flight; the one over the
/// cap is answered `503 Service Unavailable` at once, never queued (hyper gives every
/// connection its own clone, so waiting in `poll_ready` would be an unbounded queue).
///
/// A request counts until its response body has been sent or dropped, not just until the
/// response header: a slow download is a request in flight.
#[derive(Debug, Clone)]
pub struct ConcurrencyLimit<S> {
    inner: S,
    permits: Arc<Semaphore>,
}

impl<S> Service<Request> for ConcurrencyLimit<S>
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
        match self.permits.clone().try_acquire_owned() {
            Ok(permit) => ResponseFuture {
                state: State::Called {
                    inner: self.inner.call(req),
                    permit: Some(permit),
                },
            },
            Err(_) => {
                tracing::debug!("concurrency limit reached, answering 503");
                ResponseFuture {
                    state: State::Rejected {
                        resp: Some(response::status(StatusCode::SERVICE_UNAVAILABLE)),
                    },
                }
            }
        }
    }
}

pin_project! {
    /// The response future of [`ConcurrencyLimit`].
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
        // The request is being served.
        Called { #[pin] inner: F, permit: Option<OwnedSemaphorePermit> },
        // Over the cap: a 503.
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
            Proj::Called { inner, permit } => {
                let resp = std::task::ready!(inner.poll(cx))?;
                let permit = permit.take();
                Poll::Ready(Ok(if resp.body().is_end_stream() {
                    resp
                } else {
                    resp.map(|body| {
                        ProxyBody::boxed(PermitBody {
                            body,
                            _permit: permit,
                        })
                    })
                }))
            }
            Proj::Rejected { resp } => match resp.take() {
                Some(r) => Poll::Ready(Ok(r)),
                None => Poll::Ready(Ok(response::status(StatusCode::SERVICE_UNAVAILABLE))),
            },
        }
    }
}

pin_project! {
    /// A response body that holds its request's permit until it is finished or dropped.
    struct PermitBody {
        #[pin]
        body: ProxyBody,
        _permit: Option<OwnedSemaphorePermit>,
    }
}

impl Body for PermitBody {
    type Data = Bytes;
    type Error = Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Error>>> {
        let this = self.project();
        let frame = std::task::ready!(this.body.poll_frame(cx));
        if frame.is_none() {
            // Finished: free the slot now rather than when hyper drops the body.
            this._permit.take();
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;
    use tower::ServiceExt;

    #[tokio::test]
    async fn the_request_over_the_cap_gets_503_and_the_slot_frees_with_the_body() {
        let layer = ConcurrencyLimitLayer::new(1);
        let svc = layer.layer(tower::service_fn(|_req: Request| async {
            Ok::<_, std::convert::Infallible>(Response::new(ProxyBody::from("body")))
        }));
        let first = svc.clone().oneshot(Request::default()).await.unwrap();
        assert_eq!(first.status(), 200);
        assert_eq!(
            layer.available(),
            0,
            "the first response's body is still unsent"
        );
        // A clone shares the budget.
        let second = svc.clone().oneshot(Request::default()).await.unwrap();
        assert_eq!(second.status(), 503);
        let bytes = first.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(&bytes[..], b"body");
        assert_eq!(layer.available(), 1);
        let third = svc.oneshot(Request::default()).await.unwrap();
        assert_eq!(third.status(), 200);
    }

    #[tokio::test]
    async fn a_dropped_body_frees_the_slot() {
        let layer = ConcurrencyLimitLayer::new(2);
        let svc = layer.layer(tower::service_fn(|_req: Request| async {
            Ok::<_, std::convert::Infallible>(Response::new(ProxyBody::from("body")))
        }));
        let resp = svc.oneshot(Request::default()).await.unwrap();
        assert_eq!(layer.available(), 1);
        drop(resp);
        assert_eq!(layer.available(), 2);
    }
}
