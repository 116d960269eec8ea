//! [`LimitReqLayer`]: nginx's `limit_req` as a tower layer.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use http::StatusCode;
use pin_project_lite::pin_project;
use tower_layer::Layer;
use tower_service::Service;

use super::hold::{self, Hold};
use super::key::Prehashed;
use super::rate;
use super::zone::{ReqZone, Step};
use crate::body::{Request, Response};
use crate::client_info::client_ip;

/// What happens to requests above the rate but within the burst.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum Delay {
    /// Every one is delayed so that requests leave at the rate (nginx's default).
    #[default]
    All,
    /// None is delayed (`nodelay`): the burst passes at once.
    Never,
    /// The first `n` pass at once, later ones are delayed (`delay=n`).
    After(u32),
}

impl Delay {
    /// The threshold in milli-requests.
    pub(crate) fn threshold(self) -> u64 {
        match self {
            Delay::All => 0,
            Delay::Never => u64::MAX,
            Delay::After(n) => u64::from(n) * 1000,
        }
    }
}

/// One `limit_req` line: a [`ReqZone`], a burst and a [`Delay`] mode.
///
/// ```
/// use std::num::NonZeroU32;
/// use std::time::Duration;
/// use proxy_core::limit::{Decision, Rate, ReqLimit, ReqZone};
/// let zone = ReqZone::builder(Rate::per_second(NonZeroU32::MIN)).build();
/// let limit = ReqLimit::new(zone).burst(1);
/// let mut req = http::Request::new(());
/// req.extensions_mut().insert(proxy_core::ClientInfo::new(
///     "10.0.0.1:1".parse().unwrap(), "10.0.0.2:80".parse().unwrap(), proxy_core::Scheme::Http));
/// # tokio::runtime::Builder::new_current_thread().enable_time().start_paused(true).build().unwrap().block_on(async {
/// assert_eq!(limit.check(&req), Decision::Admit { delay: Duration::ZERO });
/// assert_eq!(limit.check(&req), Decision::Admit { delay: Duration::from_secs(1) });
/// assert_eq!(limit.check(&req), Decision::Reject { retry_after: Duration::from_secs(1) });
/// # });
/// ```
#[derive(Debug, Clone)]
pub struct ReqLimit {
    zone: ReqZone,
    burst: u32,
    delay: Delay,
}

/// The verdict of [`ReqLimit::check`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// Admitted (and accounted); hold the request for `delay` first.
    Admit {
        /// How long to hold the request.
        delay: Duration,
    },
    /// Over the burst; not accounted.
    Reject {
        /// How long until a request with this key would be admitted.
        retry_after: Duration,
    },
}

impl ReqLimit {
    /// A limit on `zone` with burst 0, every excess request delayed.
    pub fn new(zone: ReqZone) -> Self {
        ReqLimit {
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

    /// The zone this limit counts in.
    pub fn zone(&self) -> &ReqZone {
        &self.zone
    }

    /// Checks and accounts one request on its own, outside any layer: the building block
    /// for a custom stack. A request with an empty key is admitted without delay.
    pub fn check<B>(&self, req: &http::Request<B>) -> Decision {
        let Some(k) = self.key_of(req) else {
            return Decision::Admit {
                delay: Duration::ZERO,
            };
        };
        match self.step(&k, Step::Account) {
            Ok(excess) => Decision::Admit {
                delay: Duration::from_millis(self.delay_ms(excess)),
            },
            Err(excess) => Decision::Reject {
                retry_after: Duration::from_millis(self.retry_after_ms(excess)),
            },
        }
    }

    fn key_of<B>(&self, req: &http::Request<B>) -> Option<Prehashed> {
        self.zone.key().of(req, self.zone.hashers())
    }

    fn burst_milli(&self) -> u64 {
        u64::from(self.burst) * 1000
    }

    fn step(&self, k: &Prehashed, step: Step) -> Result<u64, u64> {
        let now = self.zone.now_ms();
        self.zone.step(k, self.burst_milli(), step, now)
    }

    fn delay_ms(&self, excess: u64) -> u64 {
        rate::delay_ms(excess, self.delay.threshold(), self.zone.rate())
    }

    fn retry_after_ms(&self, excess: u64) -> u64 {
        rate::retry_after_ms(excess, self.burst_milli(), self.zone.rate())
    }
}

/// A response extension naming the zone that rejected a request, for metrics.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RejectedBy {
    /// The zone's name.
    pub zone: String,
}

/// nginx's `$limit_req_status`, put in the request's extensions when a limit acted (and
/// in the response's when the request was rejected). Absent means passed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum LimitReqStatus {
    /// The request was held to fit the rate.
    Delayed,
    /// The request was refused.
    Rejected,
    /// Dry run: the request would have been held.
    DelayedDryRun,
    /// Dry run: the request would have been refused.
    RejectedDryRun,
}

/// Applies one or more [`ReqLimit`]s to every request, as consecutive `limit_req` lines in
/// one nginx location do: a request over any limit's burst is rejected and counted in
/// none; an admitted one is counted in all and held for the longest delay they ask.
///
/// Rejected requests get [`status`](Self::status) (503 by default, like nginx) with a
/// `Retry-After` in whole seconds. Delayed requests wait in the response future on tokio's
/// timer; a client that goes away simply drops it.
#[derive(Debug, Clone)]
pub struct LimitReqLayer {
    cfg: Arc<ReqConfig>,
}

#[derive(Debug, Clone)]
struct ReqConfig {
    limits: Vec<ReqLimit>,
    status: StatusCode,
    dry_run: bool,
}

impl LimitReqLayer {
    /// A layer applying `limit`, rejecting with 503.
    pub fn new(limit: ReqLimit) -> Self {
        LimitReqLayer {
            cfg: Arc::new(ReqConfig {
                limits: vec![limit],
                status: StatusCode::SERVICE_UNAVAILABLE,
                dry_run: false,
            }),
        }
    }

    /// Also applies `limit` (another `limit_req` line in the same location).
    pub fn and(mut self, limit: ReqLimit) -> Self {
        Arc::make_mut(&mut self.cfg).limits.push(limit);
        self
    }

    /// The status of rejected requests (`limit_req_status`; default 503, 429 is common).
    pub fn status(mut self, status: StatusCode) -> Self {
        Arc::make_mut(&mut self.cfg).status = status;
        self
    }

    /// Count and log, but neither delay nor reject (`limit_req_dry_run`).
    pub fn dry_run(mut self, dry_run: bool) -> Self {
        Arc::make_mut(&mut self.cfg).dry_run = dry_run;
        self
    }
}

impl<S> Layer<S> for LimitReqLayer {
    type Service = LimitReq<S>;

    fn layer(&self, inner: S) -> LimitReq<S> {
        LimitReq {
            inner,
            cfg: self.cfg.clone(),
        }
    }
}

/// The service of [`LimitReqLayer`].
#[derive(Debug, Clone)]
pub struct LimitReq<S> {
    inner: S,
    cfg: Arc<ReqConfig>,
}

impl<S> LimitReq<S> {
    /// The wrapped service.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// The wrapped service, unwrapped.
    pub fn into_inner(self) -> S {
        self.inner
    }
}

enum Outcome {
    Pass,
    Delay { ms: u64, limit: usize, excess: u64 },
    Reject { limit: usize, excess: u64 },
}

impl ReqConfig {
    /// nginx's order: look every limit up, accounting only the last; on any rejection
    /// stop, having accounted nothing; then account the earlier ones and take the
    /// longest delay.
    fn decide<B>(&self, req: &http::Request<B>) -> Outcome {
        let Some(last) = self.limits.len().checked_sub(1) else {
            return Outcome::Pass;
        };
        let mut worst = (0, 0, 0);
        for (i, l) in self.limits.iter().enumerate() {
            let Some(k) = l.key_of(req) else { continue };
            let step = if i == last {
                Step::Account
            } else {
                Step::Check
            };
            match l.step(&k, step) {
                Err(excess) => return Outcome::Reject { limit: i, excess },
                Ok(excess) if i == last => worst = (l.delay_ms(excess), i, excess),
                Ok(_) => {}
            }
        }
        for (i, l) in self.limits.iter().enumerate().take(last) {
            let Some(k) = l.key_of(req) else { continue };
            let excess = l.step(&k, Step::Force).unwrap_or_else(|e| e);
            let ms = l.delay_ms(excess);
            if ms > worst.0 {
                worst = (ms, i, excess);
            }
        }
        match worst {
            (0, _, _) => Outcome::Pass,
            (ms, limit, excess) => Outcome::Delay { ms, limit, excess },
        }
    }

    fn reject(&self, limit: usize, excess: u64) -> Response {
        let (retry_ms, zone) = self
            .limits
            .get(limit)
            .map_or((1000, ""), |l| (l.retry_after_ms(excess), l.zone.name()));
        hold::rejection(self.status, Duration::from_millis(retry_ms), zone)
    }

    fn log<B>(&self, req: &http::Request<B>, limit: usize, excess: u64, delay_ms: Option<u64>) {
        let zone = self.limits.get(limit).map_or("", |l| l.zone.name());
        let excess = Milli(excess);
        let client = client_ip(req);
        let dry_run = self.dry_run;
        match delay_ms {
            None => tracing::warn!(zone, %excess, ?client, dry_run, "limiting requests"),
            Some(ms) => {
                tracing::info!(zone, %excess, ?client, dry_run, delay_ms = ms, "delaying request")
            }
        }
    }
}

/// Milli-requests shown as nginx logs them, `10.000`.
struct Milli(u64);

impl fmt::Display for Milli {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{:03}", self.0 / 1000, self.0 % 1000)
    }
}

impl<S> Service<Request> for LimitReq<S>
where
    S: Service<Request, Response = Response> + Clone,
{
    type Response = Response;
    type Error = S::Error;
    type Future = ResponseFuture<S>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request) -> ResponseFuture<S> {
        let cfg = &*self.cfg;
        let state = match cfg.decide(&req) {
            Outcome::Pass => Hold::call(self.inner.call(req)),
            Outcome::Reject { limit, excess } => {
                cfg.log(&req, limit, excess, None);
                if cfg.dry_run {
                    req.extensions_mut().insert(LimitReqStatus::RejectedDryRun);
                    Hold::call(self.inner.call(req))
                } else {
                    Hold::limited(cfg.reject(limit, excess))
                }
            }
            Outcome::Delay { ms, limit, excess } => {
                cfg.log(&req, limit, excess, Some(ms));
                if cfg.dry_run {
                    req.extensions_mut().insert(LimitReqStatus::DelayedDryRun);
                    Hold::call(self.inner.call(req))
                } else {
                    req.extensions_mut().insert(LimitReqStatus::Delayed);
                    let svc = hold::take_ready(&mut self.inner);
                    Hold::delayed(svc, req, Duration::from_millis(ms))
                }
            }
        };
        ResponseFuture { state }
    }
}

pin_project! {
    /// The response future of [`LimitReq`].
    pub struct ResponseFuture<S>
    where
        S: Service<Request>,
    {
        #[pin]
        state: Hold<S>,
    }
}

impl<S> Future for ResponseFuture<S>
where
    S: Service<Request, Response = Response>,
{
    type Output = Result<Response, S::Error>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        self.project().state.poll(cx)
    }
}

impl<S> fmt::Debug for ResponseFuture<S>
where
    S: Service<Request>,
{
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ResponseFuture")
            .field("state", &self.state.name())
            .finish()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use crate::client_info::{ClientInfo, Scheme};
    use crate::limit::{Key, Rate};
    use http::header::RETRY_AFTER;
    use std::convert::Infallible;
    use std::sync::Mutex;
    use tokio::time::Instant;
    use tower::ServiceExt;

    fn req(peer: &str) -> Request {
        let mut req = http::Request::new(crate::body::ProxyBody::empty());
        req.extensions_mut().insert(ClientInfo::new(
            peer.parse().unwrap(),
            "127.0.0.1:80".parse().unwrap(),
            Scheme::Http,
        ));
        req
    }

    fn zone(rate: &str) -> ReqZone {
        ReqZone::builder(rate.parse::<Rate>().unwrap()).build()
    }

    /// An inner service that records when it was called.
    #[derive(Clone, Default)]
    struct Recorder(Arc<Mutex<Vec<Instant>>>);

    impl Service<Request> for Recorder {
        type Response = Response;
        type Error = Infallible;
        type Future = std::future::Ready<Result<Response, Infallible>>;
        fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
            Poll::Ready(Ok(()))
        }
        fn call(&mut self, _: Request) -> Self::Future {
            self.0.lock().unwrap().push(Instant::now());
            std::future::ready(Ok(crate::response::status(StatusCode::OK)))
        }
    }

    async fn status(svc: &LimitReq<Recorder>, peer: &str) -> u16 {
        svc.clone()
            .oneshot(req(peer))
            .await
            .unwrap()
            .status()
            .as_u16()
    }

    #[tokio::test(start_paused = true)]
    async fn golden_5_per_minute_burst_10_nodelay() {
        let layer = LimitReqLayer::new(ReqLimit::new(zone("5r/m")).burst(10).nodelay())
            .status(StatusCode::TOO_MANY_REQUESTS);
        let svc = layer.layer(Recorder::default());
        for _ in 0..11 {
            assert_eq!(status(&svc, "10.0.0.1:1").await, 200);
        }
        let resp = svc.clone().oneshot(req("10.0.0.1:2")).await.unwrap();
        assert_eq!(resp.status(), 429);
        assert_eq!(resp.headers()[RETRY_AFTER], "13");
        assert_eq!(resp.extensions().get(), Some(&LimitReqStatus::Rejected));
        // Another client is not affected.
        assert_eq!(status(&svc, "10.0.0.2:1").await, 200);
        // nginx keeps 5r/m as 83 milli-requests/s: at exactly 12 s one request has not
        // quite decayed; 49 ms later it has.
        tokio::time::advance(Duration::from_secs(12)).await;
        assert_eq!(status(&svc, "10.0.0.1:1").await, 429);
        tokio::time::advance(Duration::from_millis(49)).await;
        assert_eq!(status(&svc, "10.0.0.1:1").await, 200);
        assert_eq!(status(&svc, "10.0.0.1:1").await, 429);
        assert_eq!(svc.get_ref().0.lock().unwrap().len(), 13);
    }

    /// Sends `n` requests at once; returns each one's call time (s after start) or None.
    async fn burst_at_once(svc: LimitReq<Recorder>, n: usize) -> Vec<Option<u64>> {
        let start = Instant::now();
        let calls = svc.get_ref().0.clone();
        let mut tasks = vec![];
        for _ in 0..n {
            // Decisions are made in `call`, in this order; the futures run concurrently.
            let fut = svc.clone().oneshot(req("10.0.0.1:1"));
            tasks.push(tokio::spawn(fut));
            tokio::task::yield_now().await;
        }
        let mut statuses = vec![];
        for t in tasks {
            statuses.push(t.await.unwrap().unwrap().status());
        }
        let mut times = calls
            .lock()
            .unwrap()
            .iter()
            .map(|t| (*t - start).as_millis() as u64)
            .collect::<Vec<_>>()
            .into_iter();
        statuses
            .into_iter()
            .map(|s| (s == 200).then(|| times.next().unwrap()))
            .collect()
    }

    #[tokio::test(start_paused = true)]
    async fn golden_1_per_second_burst_5_spaces_a_second_apart() {
        let svc =
            LimitReqLayer::new(ReqLimit::new(zone("1r/s")).burst(5)).layer(Recorder::default());
        let got = burst_at_once(svc, 7).await;
        let want = [
            Some(0),
            Some(1000),
            Some(2000),
            Some(3000),
            Some(4000),
            Some(5000),
            None,
        ];
        assert_eq!(got, want);
    }

    #[tokio::test(start_paused = true)]
    async fn golden_delay_2() {
        let limit = ReqLimit::new(zone("1r/s")).burst(5).delay(Delay::After(2));
        let svc = LimitReqLayer::new(limit).layer(Recorder::default());
        let got = burst_at_once(svc, 7).await;
        let want = [
            Some(0),
            Some(0),
            Some(0),
            Some(1000),
            Some(2000),
            Some(3000),
            None,
        ];
        assert_eq!(got, want);
    }

    #[tokio::test(start_paused = true)]
    async fn a_client_that_goes_away_leaves_nothing_held() {
        let svc =
            LimitReqLayer::new(ReqLimit::new(zone("1r/s")).burst(1)).layer(Recorder::default());
        assert_eq!(status(&svc, "10.0.0.1:1").await, 200);
        let mut s = svc.clone();
        let fut = s.call(req("10.0.0.1:1"));
        drop(fut); // delayed by one second, then abandoned
        assert_eq!(status(&svc, "10.0.0.1:1").await, 503); // its excess was accounted
        tokio::time::advance(Duration::from_secs(2)).await;
        assert_eq!(status(&svc, "10.0.0.1:1").await, 200);
        assert_eq!(svc.get_ref().0.lock().unwrap().len(), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn several_limits_reject_in_none_and_delay_by_the_longest() {
        let per_client = ReqLimit::new(zone("1r/s")).burst(2);
        let shared = ReqZone::builder("1r/s".parse().unwrap())
            .key(Key::Shared)
            .build();
        let whole = ReqLimit::new(shared.clone()).burst(3).nodelay();
        let svc = LimitReqLayer::new(per_client)
            .and(whole)
            .layer(Recorder::default());
        assert_eq!(status(&svc, "10.0.0.1:1").await, 200);
        assert_eq!(status(&svc, "10.0.0.2:1").await, 200);
        assert_eq!(status(&svc, "10.0.0.3:1").await, 200);
        assert_eq!(status(&svc, "10.0.0.4:1").await, 200);
        // The shared budget is spent: rejected, and the per-client zone did not count it.
        assert_eq!(status(&svc, "10.0.0.5:1").await, 503);
        tokio::time::advance(Duration::from_secs(1)).await;
        let start = Instant::now();
        assert_eq!(status(&svc, "10.0.0.5:1").await, 200);
        assert_eq!(
            start.elapsed(),
            Duration::ZERO,
            "10.0.0.5 is new to the client zone"
        );
        // The second request from 10.0.0.1 within the second is delayed by the client zone.
        tokio::time::advance(Duration::from_secs(3)).await;
        let start = Instant::now();
        assert_eq!(status(&svc, "10.0.0.1:1").await, 200);
        assert_eq!(status(&svc, "10.0.0.1:1").await, 200);
        assert_eq!(start.elapsed(), Duration::from_secs(1));
    }

    #[tokio::test(start_paused = true)]
    async fn dry_run_neither_delays_nor_rejects() {
        let svc = LimitReqLayer::new(ReqLimit::new(zone("1r/s")))
            .dry_run(true)
            .layer(Recorder::default());
        let start = Instant::now();
        for _ in 0..5 {
            assert_eq!(status(&svc, "10.0.0.1:1").await, 200);
        }
        assert_eq!(start.elapsed(), Duration::ZERO);
    }

    #[tokio::test(start_paused = true)]
    async fn empty_keys_are_not_counted() {
        let z = ReqZone::builder("1r/m".parse().unwrap())
            .key(Key::Header(http::HeaderName::from_static("x-key")))
            .build();
        let svc = LimitReqLayer::new(ReqLimit::new(z.clone()).nodelay()).layer(Recorder::default());
        for _ in 0..3 {
            assert_eq!(status(&svc, "10.0.0.1:1").await, 200);
        }
        assert!(z.is_empty());
    }
}
