//! [`Balance`]: the terminal service that picks a server of a [`Group`] per request,
//! forwards through the pooled [`UpstreamClient`], and tries the next server on failure
//! as nginx's `proxy_next_upstream` says ([`NextUpstream`]).

use std::convert::Infallible;
use std::net::SocketAddr;
use std::str::FromStr;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use http::{Method, StatusCode};
use http_body::Body;
use tokio::time::Instant;

use crate::balance::future::{ResponseBody, ResponseFuture};
use crate::balance::group::{Group, Lease};
use crate::balance::replay::Spare;
use crate::body::{ProxyBody, Request, Response};
use crate::error::{Error, Kind};
use crate::response;
use crate::upstream::pool::Endpoint;
use crate::upstream::{UpstreamClient, UpstreamTimeouts};

/// One condition of nginx's `proxy_next_upstream`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Condition {
    /// `error`: connecting, sending the request or reading the response header failed.
    Error,
    /// `timeout`: connecting or reading the response header timed out.
    Timeout,
    /// `invalid_header`: the server sent an empty or invalid response header.
    InvalidHeader,
    /// `http_500`.
    Http500,
    /// `http_502`.
    Http502,
    /// `http_503`.
    Http503,
    /// `http_504`.
    Http504,
    /// `http_403` (retried, never counted as a failure).
    Http403,
    /// `http_404` (retried, never counted as a failure).
    Http404,
    /// `http_429`.
    Http429,
    /// `non_idempotent`: also retry POST, PATCH and LOCK after they were sent.
    NonIdempotent,
}

impl Condition {
    const fn bit(self) -> u16 {
        1 << self as u16
    }

    fn of_status(status: StatusCode) -> Option<Condition> {
        Some(match status.as_u16() {
            500 => Condition::Http500,
            502 => Condition::Http502,
            503 => Condition::Http503,
            504 => Condition::Http504,
            403 => Condition::Http403,
            404 => Condition::Http404,
            429 => Condition::Http429,
            _ => return None,
        })
    }
}

impl FromStr for Condition {
    type Err = UnknownCondition;

    /// nginx's spelling: `error`, `timeout`, `invalid_header`, `http_500`, ...,
    /// `non_idempotent`.
    fn from_str(s: &str) -> Result<Self, UnknownCondition> {
        Ok(match s {
            "error" => Condition::Error,
            "timeout" => Condition::Timeout,
            "invalid_header" => Condition::InvalidHeader,
            "http_500" => Condition::Http500,
            "http_502" => Condition::Http502,
            "http_503" => Condition::Http503,
            "http_504" => Condition::Http504,
            "http_403" => Condition::Http403,
            "http_404" => Condition::Http404,
            "http_429" => Condition::Http429,
            "non_idempotent" => Condition::NonIdempotent,
            _ => return Err(UnknownCondition),
        })
    }
}

/// A `proxy_next_upstream` condition name that nginx does not know.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UnknownCondition;

impl std::fmt::Display for UnknownCondition {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("unknown proxy_next_upstream condition")
    }
}

impl std::error::Error for UnknownCondition {}

/// When a request goes on to the next server: nginx's `proxy_next_upstream`,
/// `proxy_next_upstream_tries` and `proxy_next_upstream_timeout`.
///
/// The default is nginx's: `error timeout`, unlimited tries (bounded by the number of
/// servers), no time limit.
///
/// ```
/// use proxy_core::balance::{Condition, NextUpstream};
/// let next = NextUpstream::default().on(Condition::Http502).tries(3);
/// assert!(next.has(Condition::Error) && next.has(Condition::Http502));
/// assert!(!NextUpstream::off().has(Condition::Error));
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NextUpstream {
    conditions: u16,
    tries: u32,
    timeout: Duration,
}

impl Default for NextUpstream {
    fn default() -> Self {
        NextUpstream::off()
            .on(Condition::Error)
            .on(Condition::Timeout)
    }
}

impl NextUpstream {
    /// `proxy_next_upstream off`: never try another server.
    pub const fn off() -> Self {
        NextUpstream {
            conditions: 0,
            tries: 0,
            timeout: Duration::ZERO,
        }
    }

    /// Also go on to the next server on `condition`.
    pub const fn on(mut self, condition: Condition) -> Self {
        self.conditions |= condition.bit();
        self
    }

    /// Whether `condition` is set.
    pub const fn has(&self, condition: Condition) -> bool {
        self.conditions & condition.bit() != 0
    }

    /// `proxy_next_upstream_tries`: at most this many servers per request; 0 (the
    /// default) means every server of the group.
    pub const fn tries(mut self, tries: u32) -> Self {
        self.tries = tries;
        self
    }

    /// `proxy_next_upstream_timeout`: no new try after this long since the first one
    /// started; zero (the default) means no limit.
    pub const fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    fn retries_anything(&self) -> bool {
        self.conditions & !Condition::NonIdempotent.bit() != 0
    }

    fn max_tries(&self, servers: usize) -> usize {
        match usize::try_from(self.tries) {
            Ok(0) | Err(_) => servers,
            Ok(t) => t.min(servers),
        }
    }

    fn expired(&self, start: Instant) -> bool {
        !self.timeout.is_zero() && start.elapsed() >= self.timeout
    }

    /// Whether `status` is a listed failure that counts against the server: listed
    /// 500/502/503/504/429; 403 and 404 never count.
    fn counts(&self, status: StatusCode) -> bool {
        match Condition::of_status(status) {
            Some(Condition::Http403 | Condition::Http404) | None => false,
            Some(c) => self.has(c),
        }
    }

    fn retries_status(&self, status: StatusCode) -> bool {
        Condition::of_status(status).is_some_and(|c| self.has(c))
    }

    fn retries_error(&self, e: &Error) -> bool {
        match e.kind() {
            Kind::UpstreamConnect => self.has(Condition::Error),
            Kind::UpstreamConnectTimeout | Kind::UpstreamTimeout => self.has(Condition::Timeout),
            // A closed connection before a complete header is nginx's `error`
            // ("upstream prematurely closed"); a malformed one its `invalid_header`.
            Kind::UpstreamProtocol => {
                self.has(Condition::Error) || self.has(Condition::InvalidHeader)
            }
            // Sending failed once the body was streaming, or the client's fault.
            _ => false,
        }
    }
}

/// Proxies each request to a server of a [`Group`], trying the next server as
/// [`NextUpstream`] allows. Failures are responses (502, 504), never errors. Cheap to
/// clone: clones share one group, one client and one configuration.
///
/// ```
/// use proxy_core::balance::{Balance, Group, Server};
/// use proxy_core::upstream::{ClientConfig, UpstreamClient};
/// use tower::ServiceExt;
/// # tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async {
/// // Nothing listens on port 9 (discard): both tries fail, the answer is a 502.
/// let group = Group::builder("app")
///     .server(Server::new("127.0.0.1:9".parse().unwrap()))
///     .server(Server::new("127.0.0.2:9".parse().unwrap()))
///     .build()
///     .unwrap();
/// let balance = Balance::new(group.clone(), UpstreamClient::new(ClientConfig::default()));
/// let resp = balance.oneshot(http::Request::new(Default::default())).await.unwrap();
/// assert_eq!(resp.status(), 502);
/// assert!(group.stats().all(|s| s.fails == 1 && s.in_flight == 0));
/// # });
/// ```
#[derive(Clone, Debug)]
pub struct Balance {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    group: Arc<Group>,
    client: UpstreamClient,
    timeouts: UpstreamTimeouts,
    next: NextUpstream,
    /// The pool endpoints of the group's servers when it was built, so a request does not
    /// look its server up in the pool (a lock and a hash). A server added later (DNS
    /// discovery) is looked up per request.
    endpoints: Vec<Arc<Endpoint>>,
    upstream_info: bool,
}

impl Inner {
    fn endpoint(&self, addr: SocketAddr) -> Result<Arc<Endpoint>, Error> {
        match self.endpoints.iter().find(|e| e.addr() == addr) {
            Some(e) => Ok(Arc::clone(e)),
            None => self.client.endpoint(addr),
        }
    }
}

impl Balance {
    /// Balance over `group` through `client`, with the client's timeouts and nginx's
    /// default `proxy_next_upstream error timeout`.
    pub fn new(group: Arc<Group>, client: UpstreamClient) -> Self {
        let timeouts = UpstreamTimeouts {
            read_timeout: client.config().read_timeout,
            idle_timeout: client.config().read_timeout,
        };
        let endpoints = group
            .stats()
            .filter_map(|s| client.endpoint(s.addr).ok())
            .collect();
        Balance {
            inner: Arc::new(Inner {
                group,
                client,
                timeouts,
                next: NextUpstream::default(),
                endpoints,
                upstream_info: true,
            }),
        }
    }

    /// Use a location's own read and upgraded-connection timeouts.
    pub fn with_timeouts(self, timeouts: UpstreamTimeouts) -> Self {
        self.map(|i| i.timeouts = timeouts)
    }

    /// When to try the next server.
    pub fn with_next_upstream(self, next: NextUpstream) -> Self {
        self.map(|i| i.next = next)
    }

    /// Whether responses carry an [`UpstreamInfo`](crate::access_log::UpstreamInfo)
    /// (which server answered, how fast), read by access logs and metrics. Default on;
    /// a stack with neither can turn it off and save its cost.
    pub fn with_upstream_info(self, on: bool) -> Self {
        self.map(|i| i.upstream_info = on)
    }

    /// The group requests are balanced over.
    pub fn group(&self) -> &Arc<Group> {
        &self.inner.group
    }

    fn map(self, f: impl FnOnce(&mut Inner)) -> Self {
        let mut inner = Arc::try_unwrap(self.inner).unwrap_or_else(|shared| Inner {
            group: Arc::clone(&shared.group),
            client: shared.client.clone(),
            timeouts: shared.timeouts,
            next: shared.next,
            endpoints: shared.endpoints.clone(),
            upstream_info: shared.upstream_info,
        });
        f(&mut inner);
        Balance {
            inner: Arc::new(inner),
        }
    }
}

impl tower_service::Service<Request> for Balance {
    type Response = Response;
    type Error = Infallible;
    type Future = ResponseFuture;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request) -> ResponseFuture {
        ResponseFuture {
            inner: Box::pin(run(Arc::clone(&self.inner), req)),
        }
    }
}

/// What the last try left, for when no further try happens.
enum Last {
    Nothing,
    Failed(Error),
    Answered(Response, Lease),
}

/// The request loop of `ngx_http_upstream_next`.
/// A response extension set when a request was tried on more than one server, for
/// metrics (nginx's `proxy_next_upstream` retries).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Retries {
    /// The upstream group's name.
    pub group: String,
    /// How many times the request was sent again to another server.
    pub count: u32,
}

async fn run(inner: Arc<Inner>, req: Request) -> Response {
    let mut attempts = 0u32;
    let mut resp = attempt_all(&inner, req, &mut attempts).await;
    if attempts > 1 {
        resp.extensions_mut().insert(Retries {
            group: inner.group.name().to_owned(),
            count: attempts - 1,
        });
    }
    resp
}

async fn attempt_all(inner: &Arc<Inner>, req: Request, attempts: &mut u32) -> Response {
    let group = &inner.group;
    let next = inner.next;
    let non_idempotent = is_non_idempotent(req.method());
    let start = Instant::now();
    let mut tried = group.tried();
    let max_tries = next.max_tries(tried.max_tries());
    let mut last = Last::Nothing;
    let mut pending = Some(req);
    let mut attempt = 0;
    while let Some(req) = pending.take() {
        let Some(lease) = group.select(&mut tried) else {
            break;
        };
        // The previous answer is superseded only once another server was found; drop it
        // (and its slot) before sending.
        drop(std::mem::replace(&mut last, Last::Nothing));
        attempt += 1;
        *attempts = u32::try_from(attempt).unwrap_or(u32::MAX);
        // What to retry with, only when a retry may happen: a copy of a replayable
        // body, or a streamed body lent so that it can be reclaimed if never read.
        let (req, spare) = if next.retries_anything() && attempt < max_tries && !next.expired(start)
        {
            Spare::prepare(req)
        } else {
            (req, Spare::None)
        };
        let addr = lease.addr();
        let sent = match inner.endpoint(addr) {
            Ok(ep) => {
                inner
                    .client
                    .send_to(&ep, req, &inner.timeouts, inner.upstream_info)
                    .await
            }
            Err(e) => Err(e),
        };
        match sent {
            Ok(resp) => {
                let status = resp.status();
                if next.counts(status) {
                    lease.failure();
                } else {
                    lease.success();
                }
                let allowed = !non_idempotent || next.has(Condition::NonIdempotent);
                if next.retries_status(status) && allowed && !next.expired(start) {
                    if let Some(spare) = spare.take(true) {
                        tracing::debug!(upstream = %addr, %status, "trying the next upstream");
                        last = Last::Answered(resp, lease);
                        pending = Some(spare);
                        continue;
                    }
                }
                return finish(resp, lease);
            }
            Err(e) => {
                if e.counts_as_upstream_failure() {
                    lease.failure();
                }
                drop(lease);
                tracing::warn!(upstream = %addr, group = group.name(), error = %e, "upstream request failed");
                // POST, PATCH and LOCK only when the request cannot have been sent.
                let sent = !matches!(
                    e.kind(),
                    Kind::UpstreamConnect | Kind::UpstreamConnectTimeout
                );
                let allowed = !sent || !non_idempotent || next.has(Condition::NonIdempotent);
                if next.retries_error(&e) && allowed && !next.expired(start) {
                    if let Some(spare) = spare.take(sent) {
                        last = Last::Failed(e);
                        pending = Some(spare);
                        continue;
                    }
                }
                return response::from_error(e);
            }
        }
    }
    match last {
        Last::Answered(resp, lease) => finish(resp, lease),
        Last::Failed(e) => response::from_error(e),
        Last::Nothing => {
            tracing::warn!(group = group.name(), "no live upstreams");
            response::from_error(Error::new(Kind::NoLiveUpstreams))
        }
    }
}

fn is_non_idempotent(method: &Method) -> bool {
    *method == Method::POST || *method == Method::PATCH || method.as_str() == "LOCK"
}

/// The response, holding the server's in-flight slot until its body is done.
fn finish(resp: Response, lease: Lease) -> Response {
    if resp.body().is_end_stream() {
        // Nothing left to stream (HEAD, 204, 101 upgrades): no box needed.
        return resp;
    }
    resp.map(|body| ProxyBody::boxed(ResponseBody::new(body, lease)))
}
