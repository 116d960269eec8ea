//! [`RedisLimitReqLayer`]: nginx's `limit_req` over a [`RedisZone`].

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use http::StatusCode;
use pin_project_lite::pin_project;
use tower_layer::Layer;
use tower_service::Service;

use super::super::hold::{self, Hold};
use super::super::rate;
use super::super::req::{Decision, Delay, LimitReqStatus, ReqLimit};
use super::zone::{FailMode, RedisZone, Remote};
use crate::body::{Request, Response};
use crate::client_info::client_ip;

/// One `limit_req` line on a shared zone: a [`RedisZone`], a burst and a [`Delay`] mode,
/// with nginx's meaning.
#[derive(Debug, Clone)]
pub struct RedisLimit {
    zone: RedisZone,
    burst: u32,
    delay: Delay,
}

impl RedisLimit {
    /// A limit on `zone` with burst 0, every excess request delayed.
    pub fn new(zone: RedisZone) -> Self {
        RedisLimit {
            zone,
            burst: 0,
            delay: Delay::All,
        }
    }

    /// Requests allowed above the rate before rejecting (`burst=N`, default 0).
    pub fn burst(mut self, burst: u32) -> Self {
        self.burst = burst;
        self
    }

    /// How requests within the burst are held (default [`Delay::All`]).
    pub fn delay(mut self, delay: Delay) -> Self {
        self.delay = delay;
        self
    }

    /// Shorthand for `.delay(Delay::Never)` (`nodelay`).
    pub fn nodelay(self) -> Self {
        self.delay(Delay::Never)
    }

    /// The zone.
    pub fn zone(&self) -> &RedisZone {
        &self.zone
    }
}

/// Applies a [`RedisLimit`] to every request: the same decisions as
/// [`LimitReqLayer`](crate::limit::LimitReqLayer), with the state shared by every
/// instance through Redis. Rejected requests get [`status`](Self::status) (503 by
/// default) with `Retry-After`; delayed ones wait in the response future.
///
/// Unlike `LimitReqLayer::and`, two shared zones are two layers: a request rejected
/// by the inner one has been counted by the outer one.
#[derive(Debug, Clone)]
pub struct RedisLimitReqLayer {
    cfg: Arc<Config>,
}

#[derive(Debug)]
struct Config {
    limit: RedisLimit,
    /// The per-instance limit of [`FailMode::Local`].
    fallback: ReqLimit,
    status: StatusCode,
}

impl RedisLimitReqLayer {
    /// A layer applying `limit`, rejecting with 503.
    pub fn new(limit: RedisLimit) -> Self {
        let fallback = ReqLimit::new(limit.zone.inner.fallback.clone())
            .burst(limit.burst)
            .delay(limit.delay);
        RedisLimitReqLayer {
            cfg: Arc::new(Config {
                limit,
                fallback,
                status: StatusCode::SERVICE_UNAVAILABLE,
            }),
        }
    }

    /// The status of rejected requests (`limit_req_status`; default 503).
    pub fn status(self, status: StatusCode) -> Self {
        let cfg = &*self.cfg;
        RedisLimitReqLayer {
            cfg: Arc::new(Config {
                limit: cfg.limit.clone(),
                fallback: cfg.fallback.clone(),
                status,
            }),
        }
    }
}

impl<S> Layer<S> for RedisLimitReqLayer {
    type Service = RedisLimitReq<S>;

    fn layer(&self, inner: S) -> RedisLimitReq<S> {
        RedisLimitReq {
            inner,
            cfg: self.cfg.clone(),
        }
    }
}

/// The service of [`RedisLimitReqLayer`].
#[derive(Debug, Clone)]
pub struct RedisLimitReq<S> {
    inner: S,
    cfg: Arc<Config>,
}

impl<S> RedisLimitReq<S> {
    /// The wrapped service.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }
}

impl Config {
    fn burst_milli(&self) -> u64 {
        u64::from(self.limit.burst) * 1000
    }

    fn threshold(&self) -> u64 {
        self.limit.delay.threshold()
    }

    /// What to do with a request once Redis (or the fail mode) has decided.
    fn settle(&self, req: &mut Request, verdict: Remote) -> Settled {
        let zone = &self.limit.zone;
        let rate = zone.rate();
        let stats = &zone.inner.stats;
        let decision = match verdict {
            Remote::Admit(excess) => {
                stats.remote.fetch_add(1, Ordering::Relaxed);
                Decision::Admit {
                    delay: Duration::from_millis(rate::delay_ms(excess, self.threshold(), rate)),
                }
            }
            Remote::Reject(excess) => {
                stats.remote.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(zone = zone.name(), excess, client = ?client_ip(req), "limiting requests (shared zone)");
                let ms = rate::retry_after_ms(excess, self.burst_milli(), rate);
                Decision::Reject {
                    retry_after: Duration::from_millis(ms),
                }
            }
            Remote::Unavailable => match zone.inner.fail {
                FailMode::Open => {
                    stats.failed_open.fetch_add(1, Ordering::Relaxed);
                    Decision::Admit {
                        delay: Duration::ZERO,
                    }
                }
                FailMode::Closed => {
                    stats.failed_closed.fetch_add(1, Ordering::Relaxed);
                    Decision::Reject {
                        retry_after: Duration::from_secs(1),
                    }
                }
                FailMode::Local => {
                    stats.failed_local.fetch_add(1, Ordering::Relaxed);
                    self.fallback.check(req)
                }
            },
        };
        match decision {
            Decision::Admit { delay } if delay.is_zero() => Settled::Pass,
            Decision::Admit { delay } => {
                req.extensions_mut().insert(LimitReqStatus::Delayed);
                Settled::Delay(delay)
            }
            Decision::Reject { retry_after } => {
                Settled::Reject(hold::rejection(self.status, retry_after, zone.name()))
            }
        }
    }
}

enum Settled {
    Pass,
    Delay(Duration),
    Reject(Response),
}

type RemoteFuture = Pin<Box<dyn Future<Output = Remote> + Send>>;

impl<S> Service<Request> for RedisLimitReq<S>
where
    S: Service<Request, Response = Response> + Clone,
{
    type Response = Response;
    type Error = S::Error;
    type Future = ResponseFuture<S>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request) -> ResponseFuture<S> {
        let cfg = &self.cfg;
        let zone = &cfg.limit.zone;
        let Some(key) = zone.redis_key(&req) else {
            return ResponseFuture::hold(Hold::call(self.inner.call(req)));
        };
        let local = zone.local_key(&req);
        let burst = cfg.burst_milli();
        if let Some(lk) = &local {
            if zone.try_fast(lk, &key, burst, cfg.threshold()) {
                return ResponseFuture::hold(Hold::call(self.inner.call(req)));
            }
        }
        // The slow path waits for Redis: the readied service goes with the request, a
        // clone takes its place (as `LimitReq` does for delays). The Redis call is an
        // `async fn` of the client, which cannot be named: one box per remote decision.
        let zone = zone.clone();
        let fut: RemoteFuture = Box::pin(async move { zone.remote(local, &key, burst).await });
        let svc = hold::take_ready(&mut self.inner);
        ResponseFuture {
            state: State::Remote {
                fut,
                cfg: cfg.clone(),
                svc: Some(svc),
                req: Some(req),
            },
        }
    }
}

pin_project! {
    /// The response future of [`RedisLimitReq`].
    pub struct ResponseFuture<S>
    where
        S: Service<Request>,
    {
        #[pin]
        state: State<S>,
    }
}

pin_project! {
    #[project = StateProj]
    enum State<S>
    where
        S: Service<Request>,
    {
        Remote { fut: RemoteFuture, cfg: Arc<Config>, svc: Option<S>, req: Option<Request> },
        Decided { #[pin] hold: Hold<S> },
    }
}

impl<S: Service<Request>> ResponseFuture<S> {
    fn hold(hold: Hold<S>) -> Self {
        ResponseFuture {
            state: State::Decided { hold },
        }
    }
}

impl<S> Future for ResponseFuture<S>
where
    S: Service<Request, Response = Response>,
{
    type Output = Result<Response, S::Error>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        loop {
            let mut this = self.as_mut().project();
            let hold = match this.state.as_mut().project() {
                StateProj::Decided { hold } => return hold.poll(cx),
                StateProj::Remote { fut, cfg, svc, req } => {
                    let verdict = ready!(fut.as_mut().poll(cx));
                    let (Some(mut r), Some(mut s)) = (req.take(), svc.take()) else {
                        let resp = crate::response::status(StatusCode::INTERNAL_SERVER_ERROR);
                        return Poll::Ready(Ok(resp));
                    };
                    match cfg.settle(&mut r, verdict) {
                        // `s` is the service `poll_ready` readied before `call`.
                        Settled::Pass => Hold::call(s.call(r)),
                        Settled::Delay(d) => Hold::delayed(s, r, d),
                        Settled::Reject(resp) => Hold::limited(resp),
                    }
                }
            };
            this.state.set(State::Decided { hold });
        }
    }
}

impl<S> fmt::Debug for ResponseFuture<S>
where
    S: Service<Request>,
{
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = match &self.state {
            State::Remote { .. } => "remote",
            State::Decided { hold } => hold.name(),
        };
        f.debug_struct("ResponseFuture")
            .field("state", &state)
            .finish()
    }
}
