//! Active health checks (what nginx Plus's `health_check` and Caddy's `health_uri` do;
//! open-source nginx has none): a background task per group sends `GET path` to every
//! server each interval and marks a server unhealthy after `fails` consecutive failed
//! checks, healthy again after `passes` consecutive good ones.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::num::NonZeroU32;
use std::sync::{Arc, Weak};
use std::time::Duration;

use http::uri::{Authority, PathAndQuery, Scheme, Uri};
use http::StatusCode;
use tokio::sync::oneshot;
use tokio::task::JoinSet;

use crate::balance::group::Group;
use crate::balance::server::Peer;
use crate::body::ProxyBody;
use crate::upstream::{ClientConfig, UpstreamClient, UpstreamTimeouts};

/// An active health check for every server of a group.
///
/// ```
/// use std::time::Duration;
/// use proxy_core::balance::HealthCheck;
/// let check = HealthCheck::new()
///     .interval(Duration::from_secs(5))
///     .path(http::uri::PathAndQuery::from_static("/health"))
///     .fails(3.try_into().unwrap())
///     .passes(2.try_into().unwrap());
/// # let _ = check;
/// ```
#[derive(Debug, Clone)]
pub struct HealthCheck {
    interval: Duration,
    path: PathAndQuery,
    expect: (StatusCode, StatusCode),
    fails: NonZeroU32,
    passes: NonZeroU32,
    timeout: Duration,
}

impl Default for HealthCheck {
    fn default() -> Self {
        HealthCheck::new()
    }
}

impl HealthCheck {
    /// nginx Plus's defaults: every 5 s, `GET /`, a 2xx or 3xx status passes, one
    /// failure marks a server unhealthy, one pass marks it healthy; each check may take
    /// 5 s (connect and response header).
    pub fn new() -> Self {
        HealthCheck {
            interval: Duration::from_secs(5),
            path: PathAndQuery::from_static("/"),
            expect: (StatusCode::OK, StatusCode::PERMANENT_REDIRECT),
            fails: NonZeroU32::MIN,
            passes: NonZeroU32::MIN,
            timeout: Duration::from_secs(5),
        }
    }

    /// Time between two rounds of checks (`interval=`).
    pub fn interval(mut self, interval: Duration) -> Self {
        self.interval = interval.max(Duration::from_millis(1));
        self
    }

    /// The path and query checked (`uri=`).
    pub fn path(mut self, path: PathAndQuery) -> Self {
        self.path = path;
        self
    }

    /// The statuses that pass, inclusive. Default 200 to 399.
    pub fn expect(mut self, low: StatusCode, high: StatusCode) -> Self {
        self.expect = (low, high);
        self
    }

    /// Consecutive failed checks that mark a server unhealthy (`fails=`).
    pub fn fails(mut self, fails: NonZeroU32) -> Self {
        self.fails = fails;
        self
    }

    /// Consecutive passed checks that mark it healthy again (`passes=`).
    pub fn passes(mut self, passes: NonZeroU32) -> Self {
        self.passes = passes;
        self
    }

    /// Time allowed for one check's connect and response header.
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    fn passed(&self, status: StatusCode) -> bool {
        self.expect.0 <= status && status <= self.expect.1
    }
}

/// Held by the group: dropping it stops the task at once.
#[derive(Debug)]
pub(crate) struct Stop(#[allow(dead_code)] oneshot::Sender<()>);

/// The task, before it is spawned.
pub(crate) struct Task {
    check: HealthCheck,
    stop: oneshot::Receiver<()>,
}

pub(crate) fn prepare(check: HealthCheck) -> (Stop, Task) {
    let (tx, rx) = oneshot::channel();
    (Stop(tx), Task { check, stop: rx })
}

/// Consecutive results of one server.
#[derive(Clone, Copy, Default)]
struct Streak {
    fails: u32,
    passes: u32,
}

impl Task {
    /// Run until the group is dropped. The task holds only a `Weak` to the group
    /// between rounds, so it never keeps a replaced group alive.
    pub(crate) async fn run(mut self, group: Weak<Group>) {
        // No pooling: a check is a fresh connection, as a new client's would be.
        let config = ClientConfig {
            keepalive: 0,
            connect_timeout: self.check.timeout,
            read_timeout: self.check.timeout,
            ..ClientConfig::default()
        };
        let client = UpstreamClient::new(config);
        let mut ticker = tokio::time::interval(self.check.interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // Keyed by address: the group's server set may change between rounds.
        let mut streaks: HashMap<SocketAddr, Streak> = HashMap::new();
        loop {
            tokio::select! {
                _ = &mut self.stop => return,
                _ = ticker.tick() => {}
            }
            let peers: Vec<Arc<Peer>> = match group.upgrade() {
                Some(g) => g.peers().iter().cloned().collect(),
                None => return,
            };
            streaks.retain(|addr, _| peers.iter().any(|p| p.addr == *addr));
            let mut round = JoinSet::new();
            for peer in peers {
                let client = client.clone();
                let check = self.check.clone();
                round.spawn(async move {
                    let ok = probe(&client, peer.addr, &check).await;
                    (peer, ok)
                });
            }
            let mut results = Vec::with_capacity(streaks.len());
            loop {
                tokio::select! {
                    _ = &mut self.stop => return,
                    next = round.join_next() => match next {
                        Some(Ok(r)) => results.push(r),
                        Some(Err(_)) => {}
                        None => break,
                    },
                }
            }
            let Some(g) = group.upgrade() else { return };
            for (peer, ok) in results {
                let streak = streaks.entry(peer.addr).or_default();
                apply(&self.check, streak, &peer, ok, g.name());
            }
        }
    }
}

fn apply(check: &HealthCheck, streak: &mut Streak, peer: &Peer, ok: bool, group: &str) {
    use std::sync::atomic::Ordering;
    if ok {
        streak.fails = 0;
        streak.passes = streak.passes.saturating_add(1);
        if streak.passes >= check.passes.get() && peer.unhealthy.swap(false, Ordering::AcqRel) {
            tracing::info!(upstream = %peer.addr, %group, "health check passed, server up");
        }
    } else {
        streak.passes = 0;
        streak.fails = streak.fails.saturating_add(1);
        if streak.fails >= check.fails.get() && !peer.unhealthy.swap(true, Ordering::AcqRel) {
            tracing::warn!(upstream = %peer.addr, %group, "health check failed, server down");
        }
    }
}

/// One check of one server: whether it answered with an expected status in time.
async fn probe(client: &UpstreamClient, addr: std::net::SocketAddr, check: &HealthCheck) -> bool {
    let Ok(authority) = Authority::try_from(addr.to_string()) else {
        return false;
    };
    let mut parts = http::uri::Parts::default();
    parts.scheme = Some(Scheme::HTTP);
    parts.authority = Some(authority);
    parts.path_and_query = Some(check.path.clone());
    let Ok(uri) = Uri::from_parts(parts) else {
        return false;
    };
    let mut req = http::Request::new(ProxyBody::empty());
    *req.uri_mut() = uri;
    let timeouts = UpstreamTimeouts {
        read_timeout: check.timeout,
        idle_timeout: check.timeout,
    };
    let send = client.send_with(addr, req, &timeouts);
    match tokio::time::timeout(check.timeout, send).await {
        Ok(Ok(resp)) => check.passed(resp.status()),
        _ => false,
    }
}
