//! One upstream server: its configuration ([`Server`]), its live state shared by every
//! connection ([`Peer`], crate-private) and the read-only view of it ([`ServerStats`]).

use std::net::SocketAddr;
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU32, AtomicU64, Ordering};
use std::time::Duration;

/// An upstream server as configured: nginx's `server ADDR weight=.. max_fails=..
/// fail_timeout=.. max_conns=.. backup;` line.
///
/// ```
/// use std::time::Duration;
/// use proxy_core::balance::Server;
/// let s = Server::new("127.0.0.1:8001".parse().unwrap())
///     .max_fails(3)
///     .fail_timeout(Duration::from_secs(30));
/// assert_eq!(s.addr().port(), 8001);
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Server {
    pub(crate) addr: SocketAddr,
    pub(crate) weight: NonZeroU32,
    pub(crate) max_fails: u32,
    pub(crate) fail_timeout: Duration,
    pub(crate) max_conns: Option<NonZeroU32>,
    pub(crate) backup: bool,
}

impl Server {
    /// A primary server at `addr` with nginx's defaults: `weight=1 max_fails=1
    /// fail_timeout=10s`, no `max_conns` limit.
    pub fn new(addr: SocketAddr) -> Self {
        Server {
            addr,
            weight: NonZeroU32::MIN,
            max_fails: 1,
            fail_timeout: Duration::from_secs(10),
            max_conns: None,
            backup: false,
        }
    }

    /// The server's address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// nginx's `weight=`: the share of requests relative to the other servers. Default 1.
    pub fn weight(mut self, weight: NonZeroU32) -> Self {
        self.weight = weight;
        self
    }

    /// nginx's `max_fails=`: failures within `fail_timeout` after which the server is
    /// skipped for `fail_timeout`. Default 1; 0 disables the accounting.
    pub fn max_fails(mut self, max_fails: u32) -> Self {
        self.max_fails = max_fails;
        self
    }

    /// nginx's `fail_timeout=`: the window failures are counted in, and how long the
    /// server is then skipped. Default 10 s.
    pub fn fail_timeout(mut self, fail_timeout: Duration) -> Self {
        self.fail_timeout = fail_timeout;
        self
    }

    /// nginx's `max_conns=`: at most this many requests in flight to the server at once
    /// across all connections. Default unlimited.
    pub fn max_conns(mut self, max_conns: NonZeroU32) -> Self {
        self.max_conns = Some(max_conns);
        self
    }

    /// nginx's `backup`: the server takes requests only when every primary server is
    /// unavailable.
    pub fn backup(mut self) -> Self {
        self.backup = true;
        self
    }
}

/// What a server looks like right now, for metrics and status pages.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct ServerStats {
    /// The server's address.
    pub addr: SocketAddr,
    /// Whether it is a backup server.
    pub backup: bool,
    /// Its configured weight.
    pub weight: u32,
    /// Requests in flight to it (until their response body is finished or dropped).
    pub in_flight: u32,
    /// Failures counted since the last reset (nginx's `fails`).
    pub fails: u32,
    /// Whether it takes requests.
    pub state: ServerState,
}

/// Whether a server takes requests.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ServerState {
    /// Available.
    Up,
    /// Skipped after `max_fails` failures until `fail_timeout` has passed (passive).
    Down,
    /// Marked unhealthy by the active health check.
    Unhealthy,
}

/// The live state of one server, shared by every connection. Aligned to a cache line so
/// that the in-flight counters of neighbouring servers do not share one.
///
/// The fields mirror nginx's `ngx_http_upstream_rr_peer_t`. nginx updates them under a
/// per-peer lock; here each is an atomic. The few multi-field rules that must hold
/// exactly (`max_conns`, one probe per `fail_timeout`) are enforced with compare-and-swap
/// in [`Peer::claim`]; the rest tolerates the benign races nginx's workers also have
/// across processes.
#[derive(Debug)]
#[repr(align(64))]
pub(crate) struct Peer {
    pub(crate) addr: SocketAddr,
    pub(crate) weight: i64,
    pub(crate) max_fails: u32,
    /// `fail_timeout` in nanoseconds of the group clock.
    pub(crate) fail_timeout: u64,
    /// 0 = unlimited.
    pub(crate) max_conns: u32,
    pub(crate) backup: bool,
    pub(crate) conns: AtomicU32,
    pub(crate) fails: AtomicU32,
    /// When a failure was last recorded (group clock).
    pub(crate) accessed: AtomicU64,
    /// When the server was last failed or picked after `fail_timeout` (group clock).
    pub(crate) checked: AtomicU64,
    /// nginx's `effective_weight`: lowered on failure, recovers by one per pick round.
    pub(crate) effective: AtomicI64,
    /// Set by the active health check.
    pub(crate) unhealthy: AtomicBool,
}

impl Peer {
    pub(crate) fn new(s: &Server) -> Self {
        let weight = i64::from(s.weight.get());
        Peer {
            addr: s.addr,
            weight,
            max_fails: s.max_fails,
            fail_timeout: u64::try_from(s.fail_timeout.as_nanos()).unwrap_or(u64::MAX),
            max_conns: s.max_conns.map_or(0, NonZeroU32::get),
            backup: s.backup,
            conns: AtomicU32::new(0),
            fails: AtomicU32::new(0),
            accessed: AtomicU64::new(0),
            checked: AtomicU64::new(0),
            effective: AtomicI64::new(weight),
            unhealthy: AtomicBool::new(false),
        }
    }

    /// Whether this state was made for exactly `s` (address and every parameter), so
    /// that a new server set may keep it.
    pub(crate) fn configured_as(&self, s: &Server) -> bool {
        self.addr == s.addr
            && self.weight == i64::from(s.weight.get())
            && self.max_fails == s.max_fails
            && self.fail_timeout == u64::try_from(s.fail_timeout.as_nanos()).unwrap_or(u64::MAX)
            && self.max_conns == s.max_conns.map_or(0, NonZeroU32::get)
            && self.backup == s.backup
    }

    /// Requests in flight to the server now.
    pub(crate) fn in_flight(&self) -> u32 {
        self.conns.load(Ordering::Acquire)
    }

    /// Whether the passive accounting currently skips the server (nginx's
    /// `fails >= max_fails && now - checked <= fail_timeout`).
    pub(crate) fn failed(&self, now: u64) -> bool {
        self.max_fails != 0
            && self.fails.load(Ordering::Acquire) >= self.max_fails
            && now.saturating_sub(self.checked.load(Ordering::Acquire)) <= self.fail_timeout
    }

    /// Whether the server may take a request now. A single-server group ignores the
    /// passive accounting (nginx never marks its only server down).
    pub(crate) fn eligible(&self, now: u64, single: bool) -> bool {
        if self.unhealthy.load(Ordering::Acquire) {
            return false;
        }
        if !single && self.failed(now) {
            return false;
        }
        self.max_conns == 0 || self.conns.load(Ordering::Acquire) < self.max_conns
    }

    /// Take an in-flight slot on a server the policy picked. Fails (and takes nothing)
    /// when another request filled the last `max_conns` slot meanwhile, or already took
    /// the one probe a failed server gets after `fail_timeout`.
    pub(crate) fn claim(&self, now: u64, single: bool) -> bool {
        if self.max_conns == 0 {
            self.conns.fetch_add(1, Ordering::AcqRel);
        } else if self
            .conns
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |c| {
                (c < self.max_conns).then_some(c + 1)
            })
            .is_err()
        {
            return false;
        }
        // nginx: `if (now - best->checked > best->fail_timeout) best->checked = now;`.
        // For a server past max_fails this is the probe; only one request may win it.
        let checked = self.checked.load(Ordering::Acquire);
        if now.saturating_sub(checked) > self.fail_timeout {
            let probing = !single
                && self.max_fails != 0
                && self.fails.load(Ordering::Acquire) >= self.max_fails;
            let won = self
                .checked
                .compare_exchange(checked, now, Ordering::AcqRel, Ordering::Acquire)
                .is_ok();
            if probing && !won {
                self.release();
                return false;
            }
        }
        true
    }

    /// Give back an in-flight slot.
    pub(crate) fn release(&self) {
        // Never below zero, whatever happens.
        let _ = self
            .conns
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |c| c.checked_sub(1));
    }

    /// nginx's `free_peer` with `NGX_PEER_FAILED`. Returns whether this failure is the
    /// one that reached `max_fails`.
    pub(crate) fn record_failure(&self, now: u64) -> bool {
        let before = self
            .fails
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |f| {
                Some(f.saturating_add(1))
            })
            .unwrap_or(u32::MAX);
        self.accessed.store(now, Ordering::Release);
        self.checked.store(now, Ordering::Release);
        if self.max_fails == 0 {
            return false;
        }
        let step = self.weight / i64::from(self.max_fails);
        let _ = self
            .effective
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |e| {
                Some((e - step).max(0))
            });
        before.saturating_add(1) == self.max_fails
    }

    /// nginx's `free_peer` without `NGX_PEER_FAILED`: the failure count is reset only
    /// when the server was picked after `fail_timeout` since its last failure.
    pub(crate) fn record_success(&self) {
        if self.accessed.load(Ordering::Acquire) < self.checked.load(Ordering::Acquire) {
            self.fails.store(0, Ordering::Release);
        }
    }

    pub(crate) fn stats(&self, now: u64, single: bool) -> ServerStats {
        let state = if self.unhealthy.load(Ordering::Acquire) {
            ServerState::Unhealthy
        } else if !single && self.failed(now) {
            ServerState::Down
        } else {
            ServerState::Up
        };
        ServerStats {
            addr: self.addr,
            backup: self.backup,
            weight: u32::try_from(self.weight).unwrap_or(u32::MAX),
            in_flight: self.conns.load(Ordering::Acquire),
            fails: self.fails.load(Ordering::Acquire),
            state,
        }
    }
}
