//! [`LimitConnLayer`]: nginx's `limit_conn` as a tower layer.
//!
//! Counts requests in flight per key: from the moment the request header has been read
//! (the layer's `call`) until its response body has been sent or dropped. Each HTTP/2
//! stream is a request of its own; keep-alive requests on one HTTP/1.1 connection are
//! counted one at a time.

use std::fmt;
use std::future::Future;
use std::num::NonZeroU32;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use bytes::Bytes;
use http::StatusCode;
use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;
use tower_layer::Layer;
use tower_service::Service;

use super::key::Prehashed;
use super::zone::{ConnZone, Refused};
use crate::body::{ProxyBody, Request, Response};
use crate::client_info::client_ip;
use crate::error::Error;

/// Caps the requests in flight per key in one or more [`ConnZone`]s (consecutive
/// `limit_conn` lines). A request over any cap, or whose key finds its zone full, gets
/// [`status`](Self::status) (503 by default, like nginx).
///
/// The count is released when the response body ends or is dropped; holding it that long
/// boxes the response body (one allocation per counted request), which is what lets a cap
/// of one limit concurrent downloads as nginx does.
#[derive(Debug, Clone)]
pub struct LimitConnLayer {
    cfg: Arc<ConnConfig>,
}

#[derive(Debug, Clone)]
struct ConnConfig {
    limits: Vec<(ConnZone, NonZeroU32)>,
    status: StatusCode,
    dry_run: bool,
}

impl LimitConnLayer {
    /// At most `max` requests in flight per key of `zone` (`limit_conn zone max`).
    pub fn new(zone: ConnZone, max: NonZeroU32) -> Self {
        LimitConnLayer {
            cfg: Arc::new(ConnConfig {
                limits: vec![(zone, max)],
                status: StatusCode::SERVICE_UNAVAILABLE,
                dry_run: false,
            }),
        }
    }

    /// Also at most `max` in flight per key of `zone`.
    pub fn and(mut self, zone: ConnZone, max: NonZeroU32) -> Self {
        Arc::make_mut(&mut self.cfg).limits.push((zone, max));
        self
    }

    /// The status of refused requests (`limit_conn_status`, default 503).
    pub fn status(mut self, status: StatusCode) -> Self {
        Arc::make_mut(&mut self.cfg).status = status;
        self
    }

    /// Count and log, but never refuse (`limit_conn_dry_run`).
    pub fn dry_run(mut self, dry_run: bool) -> Self {
        Arc::make_mut(&mut self.cfg).dry_run = dry_run;
        self
    }
}

impl<S> Layer<S> for LimitConnLayer {
    type Service = LimitConn<S>;

    fn layer(&self, inner: S) -> LimitConn<S> {
        LimitConn {
            inner,
            cfg: self.cfg.clone(),
        }
    }
}

/// nginx's `$limit_conn_status` when a limit acted, in the request's extensions (dry
/// run) or the response's (refused). Absent means passed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum LimitConnStatus {
    /// The request was refused.
    Rejected,
    /// Dry run: the request would have been refused.
    RejectedDryRun,
}

/// The service of [`LimitConnLayer`].
#[derive(Debug, Clone)]
pub struct LimitConn<S> {
    inner: S,
    cfg: Arc<ConnConfig>,
}

impl<S> LimitConn<S> {
    /// The wrapped service.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// The wrapped service, unwrapped.
    pub fn into_inner(self) -> S {
        self.inner
    }
}

impl<S> Service<Request> for LimitConn<S>
where
    S: Service<Request, Response = Response>,
{
    type Response = Response;
    type Error = S::Error;
    type Future = ResponseFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request) -> Self::Future {
        let cfg = &*self.cfg;
        let mut guards = Guards::None;
        for (zone, max) in &cfg.limits {
            let Some(key) = zone.key().of(&req, zone.hashers()) else {
                continue;
            };
            match zone.acquire(&key, max.get()) {
                Ok(()) => guards.push(Guard {
                    zone: zone.clone(),
                    key,
                }),
                Err(why) => {
                    let full = why == Refused::Full;
                    let client = client_ip(&req);
                    let dry_run = cfg.dry_run;
                    tracing::warn!(
                        zone = zone.name(),
                        ?client,
                        full,
                        dry_run,
                        "limiting connections"
                    );
                    if dry_run {
                        req.extensions_mut().insert(LimitConnStatus::RejectedDryRun);
                        continue;
                    }
                    // Dropping `guards` gives back what earlier zones granted.
                    drop(guards);
                    let mut resp = crate::response::status(cfg.status);
                    resp.extensions_mut().insert(LimitConnStatus::Rejected);
                    return ResponseFuture {
                        state: State::Limited { resp: Some(resp) },
                    };
                }
            }
        }
        ResponseFuture {
            state: State::Call {
                fut: self.inner.call(req),
                guards,
            },
        }
    }
}

/// One granted slot, given back on drop.
struct Guard {
    zone: ConnZone,
    key: Prehashed,
}

impl Drop for Guard {
    fn drop(&mut self) {
        self.zone.release(&self.key);
    }
}

/// The slots of one request: usually none or one, so no vector then.
#[derive(Default)]
enum Guards {
    #[default]
    None,
    One(Guard),
    Many(Vec<Guard>),
}

impl Guards {
    fn push(&mut self, g: Guard) {
        *self = match std::mem::take(self) {
            Guards::None => Guards::One(g),
            Guards::One(first) => Guards::Many(vec![first, g]),
            Guards::Many(mut v) => {
                v.push(g);
                Guards::Many(v)
            }
        };
    }

    fn is_none(&self) -> bool {
        matches!(self, Guards::None)
    }
}

pin_project! {
    /// The response future of [`LimitConn`].
    pub struct ResponseFuture<F> {
        #[pin]
        state: State<F>,
    }
}

pin_project! {
    #[project = StateProj]
    enum State<F> {
        Call { #[pin] fut: F, guards: Guards },
        Limited { resp: Option<Response> },
    }
}

impl<F, E> Future for ResponseFuture<F>
where
    F: Future<Output = Result<Response, E>>,
{
    type Output = Result<Response, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project().state.project() {
            StateProj::Call { fut, guards } => {
                let resp = ready!(fut.poll(cx))?;
                let guards = std::mem::take(guards);
                Poll::Ready(Ok(hold_until_sent(resp, guards)))
            }
            StateProj::Limited { resp } => Poll::Ready(Ok(resp
                .take()
                // Polled again after completion: answer rather than panic.
                .unwrap_or_else(|| crate::response::status(StatusCode::INTERNAL_SERVER_ERROR)))),
        }
    }
}

impl<F> fmt::Debug for ResponseFuture<F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = match &self.state {
            State::Call { .. } => "call",
            State::Limited { .. } => "limited",
        };
        f.debug_struct("ResponseFuture")
            .field("state", &state)
            .finish()
    }
}

/// Keeps the slots until the body is sent: at once when there is no body to send.
fn hold_until_sent(resp: Response, guards: Guards) -> Response {
    if guards.is_none() || resp.body().is_end_stream() {
        return resp;
    }
    resp.map(|inner| ProxyBody::boxed(GuardedBody { inner, guards }))
}

pin_project! {
    struct GuardedBody {
        #[pin]
        inner: ProxyBody,
        guards: Guards,
    }
}

impl Body for GuardedBody {
    type Data = Bytes;
    type Error = Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Error>>> {
        let this = self.project();
        let frame = ready!(this.inner.poll_frame(cx));
        if !matches!(frame, Some(Ok(_))) {
            // The body is over (or broken): give the slots back now, not at drop.
            *this.guards = Guards::None;
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use crate::client_info::{ClientInfo, Scheme};
    use crate::limit::Key;
    use http_body_util::BodyExt;
    use std::convert::Infallible;
    use tower::ServiceExt;

    fn req(peer: &str) -> Request {
        let mut req = http::Request::new(ProxyBody::empty());
        req.extensions_mut().insert(ClientInfo::new(
            peer.parse().unwrap(),
            "127.0.0.1:80".parse().unwrap(),
            Scheme::Http,
        ));
        req
    }

    fn ok_service(
    ) -> impl Service<Request, Response = Response, Error = Infallible, Future: Send> + Clone {
        tower::service_fn(|_req: Request| async {
            Ok::<_, Infallible>(http::Response::new(ProxyBody::from("body")))
        })
    }

    #[tokio::test]
    async fn counts_until_the_body_is_done() {
        let zone = ConnZone::builder().build();
        let layer = LimitConnLayer::new(zone.clone(), NonZeroU32::MIN);
        let svc = layer.layer(ok_service());
        let first = svc.clone().oneshot(req("10.0.0.1:1")).await.unwrap();
        assert_eq!(zone.in_flight(&req("10.0.0.1:9")), 1);
        let refused = svc.clone().oneshot(req("10.0.0.1:2")).await.unwrap();
        assert_eq!(refused.status(), 503);
        assert_eq!(refused.extensions().get(), Some(&LimitConnStatus::Rejected));
        // Another key is not affected.
        let other = svc.clone().oneshot(req("10.0.0.2:1")).await.unwrap();
        assert_eq!(other.status(), 200);
        drop(other);
        let body = first.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(&body[..], b"body");
        assert!(zone.is_empty());
        assert_eq!(
            svc.clone()
                .oneshot(req("10.0.0.1:1"))
                .await
                .unwrap()
                .status(),
            200
        );
    }

    #[tokio::test]
    async fn dropped_futures_and_bodies_give_slots_back() {
        let zone = ConnZone::builder().key(Key::Shared).build();
        let svc =
            LimitConnLayer::new(zone.clone(), NonZeroU32::new(2).unwrap()).layer(ok_service());
        let mut s = svc.clone();
        let fut = s.call(req("10.0.0.1:1"));
        let resp = svc.clone().oneshot(req("10.0.0.2:1")).await.unwrap();
        assert_eq!(zone.in_flight(&req("10.0.0.3:1")), 2);
        drop(fut);
        drop(resp);
        assert!(zone.is_empty());
    }

    #[tokio::test]
    async fn a_refusal_in_one_zone_gives_back_the_others() {
        let per_client = ConnZone::builder().build();
        let shared = ConnZone::builder().key(Key::Shared).build();
        let svc = LimitConnLayer::new(per_client.clone(), NonZeroU32::new(5).unwrap())
            .and(shared.clone(), NonZeroU32::MIN)
            .layer(ok_service());
        let held = svc.clone().oneshot(req("10.0.0.1:1")).await.unwrap();
        let refused = svc.clone().oneshot(req("10.0.0.2:1")).await.unwrap();
        assert_eq!(refused.status(), 503);
        assert_eq!(per_client.len(), 1, "10.0.0.2 was given back");
        drop(held);
        assert!(per_client.is_empty() && shared.is_empty());
    }

    #[tokio::test]
    async fn dry_run_never_refuses() {
        let zone = ConnZone::builder().build();
        let svc = LimitConnLayer::new(zone, NonZeroU32::MIN)
            .dry_run(true)
            .layer(ok_service());
        let _a = svc.clone().oneshot(req("10.0.0.1:1")).await.unwrap();
        let b = svc.clone().oneshot(req("10.0.0.1:1")).await.unwrap();
        assert_eq!(b.status(), 200);
    }
}
