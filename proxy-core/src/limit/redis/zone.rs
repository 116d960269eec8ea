//! [`RedisZone`]: a request-rate zone whose state lives in Redis, shared by every proxy
//! instance that names it, with a bounded local fast path and a fail mode.

use std::collections::HashMap;
use std::fmt;
use std::num::NonZeroUsize;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::time::Duration;

use arc_swap::ArcSwapOption;
use redis::aio::MultiplexedConnection;
use redis::{AsyncConnectionConfig, Client, Script};
use tokio::sync::mpsc;
use tokio::time::Instant;

use super::super::key::{Hashers, Key, Prehashed};
use super::super::rate::Rate;
use super::super::zone::ReqZone;
use crate::client_info::client_ip;

/// nginx's `limit_req` step in Redis, atomically: the same integer arithmetic as
/// `limit/rate.rs` (excess in milli-requests, decayed by `rate·ms/1000`, +1000 per
/// request, floored at 0; `last` moves only forward), on Redis's own clock so that every
/// instance shares one time. ARGV: rate (milli-requests/s), burst (milli-requests),
/// account (1 to store an admitted request, 0 to only look), and optionally the time in
/// ms (tests compare the script with the local limiter at chosen times). Returns
/// {admitted, excess}.
/// The key expires once its excess has drained, so Redis holds only active clients.
const SCRIPT: &str = r"
local now
if ARGV[4] then
  now = tonumber(ARGV[4])
else
  local t = redis.call('TIME')
  now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
local rate = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local s = redis.call('HMGET', KEYS[1], 'e', 'l')
local excess = 0
local last = now
if s[1] then
  local prev = tonumber(s[1])
  last = tonumber(s[2])
  local ms = now - last
  if ms < 0 then ms = 0 end
  excess = prev + 1000 - math.floor(rate * ms / 1000)
  if excess < 0 then excess = 0 end
  if now > last then last = now end
end
if excess > burst then
  return {0, excess}
end
if ARGV[3] == '1' then
  redis.call('HSET', KEYS[1], 'e', excess, 'l', last)
  redis.call('PEXPIRE', KEYS[1], math.floor(excess * 1000 / rate) + 1000)
end
return {1, excess}
";

/// What a zone does when Redis cannot answer (down, unreachable, or slower than the
/// operation timeout).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum FailMode {
    /// Admit the request (availability first). Counted in
    /// [`RedisZoneStats::failed_open`].
    Open,
    /// Reject the request with the layer's status (protection first). Counted in
    /// [`RedisZoneStats::failed_closed`].
    Closed,
    /// Limit it with a per-instance zone of the same rate instead: each instance
    /// admits up to the limit on its own, so N instances admit up to N times it while
    /// Redis is away. Counted in [`RedisZoneStats::failed_local`]. The default.
    #[default]
    Local,
}

/// Counters of a [`RedisZone`], for metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct RedisZoneStats {
    /// Requests decided by a Redis round trip.
    pub remote: u64,
    /// Requests admitted by the local fast path without waiting for Redis.
    pub fast_path: u64,
    /// Fast-path admissions that Redis then refused (the overshoot actually taken).
    pub overshoot: u64,
    /// Redis errors and timeouts (each one also counts in one of the three below, or
    /// in the fast path's background accounting).
    pub redis_errors: u64,
    /// Requests admitted because Redis could not answer ([`FailMode::Open`]).
    pub failed_open: u64,
    /// Requests rejected because Redis could not answer ([`FailMode::Closed`]).
    pub failed_closed: u64,
    /// Requests decided by the local fallback zone ([`FailMode::Local`]).
    pub failed_local: u64,
}

/// A `limit_req` zone kept in Redis, so that every proxy instance naming the same zone
/// (same Redis, same name, same rate) shares one budget per key. Cheap to clone; clones
/// share one connection, one local table and one set of counters. Build it inside a
/// tokio runtime (the connection and the fast path's accounting run as tasks).
///
/// ```
/// use std::time::Duration;
/// use proxy_core::limit::redis::{FailMode, RedisZone};
/// # tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async {
/// let zone = RedisZone::builder("redis://127.0.0.1:6379", "10r/s".parse().unwrap())
///     .unwrap()
///     .name("api")
///     .fail(FailMode::Open)
///     .timeout(Duration::from_millis(50))
///     .build();
/// assert_eq!(zone.name(), "api");
/// # });
/// ```
#[derive(Clone)]
pub struct RedisZone {
    pub(crate) inner: Arc<Inner>,
}

pub(crate) struct Inner {
    name: Box<str>,
    prefix: Box<[u8]>,
    key: Key,
    rate: Rate,
    client: Client,
    script: Script,
    conn: ArcSwapOption<MultiplexedConnection>,
    /// Serializes reconnects; `down_until` spaces them out while Redis is away.
    reconnect: tokio::sync::Mutex<()>,
    down_until: Mutex<Option<Instant>>,
    timeout: Duration,
    backoff: Duration,
    pub(crate) fail: FailMode,
    pub(crate) fallback: ReqZone,
    allowance: u32,
    local: Local,
    sync: Option<mpsc::Sender<Sync>>,
    pub(crate) stats: Counters,
}

#[derive(Default)]
pub(crate) struct Counters {
    pub(crate) remote: AtomicU64,
    pub(crate) fast_path: AtomicU64,
    pub(crate) overshoot: AtomicU64,
    pub(crate) redis_errors: AtomicU64,
    pub(crate) failed_open: AtomicU64,
    pub(crate) failed_closed: AtomicU64,
    pub(crate) failed_local: AtomicU64,
}

/// One fast-path admission, accounted in Redis in the background.
struct Sync {
    key: Vec<u8>,
    local: Prehashed,
    burst: u64,
}

/// Builds a [`RedisZone`].
#[derive(Debug, Clone)]
pub struct RedisZoneBuilder {
    client: Client,
    name: Box<str>,
    key: Key,
    rate: Rate,
    timeout: Duration,
    backoff: Duration,
    fail: FailMode,
    allowance: u32,
    capacity: NonZeroUsize,
}

/// The verdict of a Redis step, in milli-requests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Remote {
    Admit(u64),
    Reject(u64),
    Unavailable,
}

impl RedisZone {
    /// A zone limiting to `rate` in the Redis at `url` (`redis://host:port/db`,
    /// `redis://:password@host`, `unix:///path`), keyed on the client address, named
    /// `"default"`.
    ///
    /// # Errors
    ///
    /// `url` is not a Redis URL. Nothing is connected yet.
    pub fn builder(url: &str, rate: Rate) -> Result<RedisZoneBuilder, redis::RedisError> {
        Ok(RedisZoneBuilder {
            client: Client::open(url)?,
            name: "default".into(),
            key: Key::ClientIp,
            rate,
            timeout: Duration::from_millis(100),
            backoff: Duration::from_secs(1),
            fail: FailMode::Local,
            allowance: 0,
            capacity: NonZeroUsize::new(super::super::DEFAULT_CAPACITY)
                .unwrap_or(NonZeroUsize::MIN),
        })
    }

    /// The zone's name (part of the Redis key: instances share a budget by name).
    pub fn name(&self) -> &str {
        &self.inner.name
    }

    /// The zone's rate.
    pub fn rate(&self) -> Rate {
        self.inner.rate
    }

    /// What the zone counts by.
    pub fn key(&self) -> &Key {
        &self.inner.key
    }

    /// The counters.
    pub fn stats(&self) -> RedisZoneStats {
        let c = &self.inner.stats;
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        RedisZoneStats {
            remote: get(&c.remote),
            fast_path: get(&c.fast_path),
            overshoot: get(&c.overshoot),
            redis_errors: get(&c.redis_errors),
            failed_open: get(&c.failed_open),
            failed_closed: get(&c.failed_closed),
            failed_local: get(&c.failed_local),
        }
    }

    /// The Redis key of `req` (the zone's prefix and the client's key), `None` for an
    /// empty key. Addresses are their 16 bytes (IPv4 mapped); header values are kept
    /// as they are up to 64 bytes, longer ones as a 128-bit FNV-1a digest: the same
    /// bytes on every instance, whatever its build.
    pub(crate) fn redis_key<B>(&self, req: &http::Request<B>) -> Option<Vec<u8>> {
        let prefix = &self.inner.prefix;
        let mut out = Vec::with_capacity(prefix.len() + 17);
        out.extend_from_slice(prefix);
        match &self.inner.key {
            Key::ClientIp => {
                let v6 = match client_ip(req)? {
                    std::net::IpAddr::V4(v4) => v4.to_ipv6_mapped(),
                    std::net::IpAddr::V6(v6) => v6,
                };
                out.push(b'i');
                out.extend_from_slice(&v6.octets());
            }
            Key::Header(name) => {
                let v = req.headers().get(name)?.as_bytes();
                if v.is_empty() {
                    return None;
                }
                if v.len() <= 64 {
                    out.push(b'h');
                    out.extend_from_slice(v);
                } else {
                    out.push(b'd');
                    out.extend_from_slice(&fnv1a_128(v).to_be_bytes());
                }
            }
            Key::Shared => out.push(b's'),
            // `Key` is non-exhaustive; a kind this zone does not know is not counted.
            #[allow(unreachable_patterns)]
            _ => return None,
        }
        Some(out)
    }

    /// The local table's key for `req` (same emptiness as [`Self::redis_key`]).
    pub(crate) fn local_key<B>(&self, req: &http::Request<B>) -> Option<Prehashed> {
        self.inner.key.of(req, &self.inner.local.hashers)
    }

    /// The fast path: admit at once if this instance's view of the key says the
    /// request fits without delay, with fewer than `allowance` admissions still
    /// unconfirmed by Redis; the accounting then goes to Redis in the background.
    pub(crate) fn try_fast(
        &self,
        local: &Prehashed,
        key: &[u8],
        burst: u64,
        threshold: u64,
    ) -> bool {
        let inner = &self.inner;
        let Some(sync) = &inner.sync else {
            return false;
        };
        let rate = inner.rate;
        let admitted = inner.local.with(local, |e| {
            let e = e?;
            if e.pending >= inner.allowance {
                return None;
            }
            let ms = u64::try_from(e.at.elapsed().as_millis()).unwrap_or(u64::MAX);
            // Like nginx: +1000 per request, decayed by the rate, floored at 0; the
            // pending ones count as already there.
            let decay = rate.milli_per_second().saturating_mul(ms) / 1000;
            let estimate = e
                .excess
                .saturating_sub(decay)
                .saturating_add(1000 * u64::from(e.pending + 1));
            if estimate > burst || estimate > threshold {
                return None;
            }
            e.pending += 1;
            Some(())
        });
        if admitted.is_none() {
            return false;
        }
        let job = Sync {
            key: key.to_vec(),
            local: *local,
            burst,
        };
        if sync.try_send(job).is_err() {
            // The background queue is full: undo, and take the slow path.
            inner.local.with(local, |e| {
                if let Some(e) = e {
                    e.pending = e.pending.saturating_sub(1);
                }
                Some(())
            });
            return false;
        }
        inner.stats.fast_path.fetch_add(1, Ordering::Relaxed);
        true
    }

    /// One step in Redis (waiting for it), recorded in the local table.
    pub(crate) async fn remote(&self, local: Option<Prehashed>, key: &[u8], burst: u64) -> Remote {
        let verdict = self.inner.step(key, burst).await;
        if let (Some(local), Remote::Admit(e) | Remote::Reject(e)) = (local, verdict) {
            self.inner.local.record(&local, e, false);
        }
        verdict
    }
}

impl RedisZone {
    /// The script's step for `key` (under the zone's prefix) at `now_ms` instead of
    /// Redis's clock: `Some((admitted, excess))`. For tests comparing the script with
    /// the local limiter; not for requests.
    #[doc(hidden)]
    pub async fn step_at(&self, key: &[u8], burst: u32, now_ms: u64) -> Option<(bool, u64)> {
        let mut full = self.inner.prefix.to_vec();
        full.extend_from_slice(key);
        match self
            .inner
            .step_with(&full, u64::from(burst) * 1000, Some(now_ms))
            .await
        {
            Remote::Admit(e) => Some((true, e)),
            Remote::Reject(e) => Some((false, e)),
            Remote::Unavailable => None,
        }
    }
}

impl Inner {
    /// The script on the shared connection, within the timeout.
    async fn step(&self, key: &[u8], burst: u64) -> Remote {
        self.step_with(key, burst, None).await
    }

    async fn step_with(&self, key: &[u8], burst: u64, now: Option<u64>) -> Remote {
        let Some(mut conn) = self.connection().await else {
            self.stats.redis_errors.fetch_add(1, Ordering::Relaxed);
            return Remote::Unavailable;
        };
        let mut call = self.script.key(key);
        call.arg(self.rate.milli_per_second()).arg(burst).arg(1);
        if let Some(now) = now {
            call.arg(now);
        }
        let result: Result<redis::RedisResult<(i64, i64)>, _> =
            tokio::time::timeout(self.timeout, call.invoke_async(&mut conn)).await;
        match result {
            Ok(Ok((admitted, excess))) => {
                let excess = u64::try_from(excess).unwrap_or(0);
                if admitted == 1 {
                    Remote::Admit(excess)
                } else {
                    Remote::Reject(excess)
                }
            }
            Ok(Err(e))
                if e.is_io_error() || e.is_connection_dropped() || e.is_connection_refusal() =>
            {
                self.broken(&e.to_string());
                Remote::Unavailable
            }
            Ok(Err(e)) => {
                // Redis answered with an error (a script or key problem): the
                // connection is fine; this request gets the fail mode.
                self.stats.redis_errors.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(zone = %self.name, error = %e, "Redis step failed");
                Remote::Unavailable
            }
            Err(_) => {
                // A timeout is not a broken connection: keep it.
                self.stats.redis_errors.fetch_add(1, Ordering::Relaxed);
                Remote::Unavailable
            }
        }
    }

    /// The shared connection, (re)connecting when there is none, at most once per
    /// `backoff` while Redis is away so that a dead Redis costs no time per request.
    async fn connection(&self) -> Option<MultiplexedConnection> {
        if let Some(c) = self.conn.load_full() {
            return Some((*c).clone());
        }
        if self.is_down() {
            return None;
        }
        let _one = self.reconnect.lock().await;
        if let Some(c) = self.conn.load_full() {
            return Some((*c).clone());
        }
        if self.is_down() {
            return None;
        }
        let config = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(self.timeout))
            .set_response_timeout(Some(self.timeout));
        match self
            .client
            .get_multiplexed_async_connection_with_config(&config)
            .await
        {
            Ok(c) => {
                tracing::info!(zone = %self.name, "connected to Redis");
                self.conn.store(Some(Arc::new(c.clone())));
                Some(c)
            }
            Err(e) => {
                self.mark_down();
                tracing::warn!(zone = %self.name, error = %e, "cannot connect to Redis");
                None
            }
        }
    }

    fn broken(&self, error: &str) {
        self.stats.redis_errors.fetch_add(1, Ordering::Relaxed);
        if self.conn.swap(None).is_some() {
            tracing::warn!(zone = %self.name, error, "Redis connection lost");
        }
        self.mark_down();
    }

    fn is_down(&self) -> bool {
        let down = self
            .down_until
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        down.is_some_and(|until| Instant::now() < until)
    }

    fn mark_down(&self) {
        let mut down = self
            .down_until
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        *down = Some(Instant::now() + self.backoff);
    }
}

impl fmt::Debug for RedisZone {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisZone")
            .field("name", &self.inner.name)
            .field("rate", &self.inner.rate)
            .field("key", &self.inner.key)
            .field("fail", &self.inner.fail)
            .field("allowance", &self.inner.allowance)
            .finish()
    }
}

impl RedisZoneBuilder {
    /// The zone's name. Instances share a budget when they use the same Redis and the
    /// same name (give them the same rate, too). Default `"default"`.
    pub fn name(mut self, name: &str) -> Self {
        self.name = name.into();
        self
    }

    /// What requests are counted by (default: [`Key::ClientIp`]).
    pub fn key(mut self, key: Key) -> Self {
        self.key = key;
        self
    }

    /// How long a request waits for Redis (connect or answer) before the fail mode
    /// decides. Default 100 ms.
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// After a failed connection, how long requests do not try Redis again (the fail
    /// mode decides at once). Default 1 s.
    pub fn backoff(mut self, backoff: Duration) -> Self {
        self.backoff = backoff;
        self
    }

    /// What to do when Redis cannot answer. Default [`FailMode::Local`].
    pub fn fail(mut self, fail: FailMode) -> Self {
        self.fail = fail;
        self
    }

    /// The local fast path: per key, up to `n` requests are admitted by this instance
    /// without waiting for Redis, as long as its last view of the key (Redis's answer
    /// plus its own admissions since) says they fit without delay. Their accounting
    /// goes to Redis in the background. The price is a bounded overshoot: at most `n`
    /// requests per instance per key above the shared limit, while other instances'
    /// requests have not been seen yet. Default 0: every request waits for Redis (exact).
    pub fn local_allowance(mut self, n: u32) -> Self {
        self.allowance = n;
        self
    }

    /// The most keys the local table (the fast path's view, and the fallback zone of
    /// [`FailMode::Local`]) remembers. Default as [`ReqZone`]'s.
    pub fn capacity(mut self, entries: NonZeroUsize) -> Self {
        self.capacity = entries;
        self
    }

    /// The zone. Spawns the fast path's background accounting when `local_allowance`
    /// is set, so call it inside a tokio runtime then.
    pub fn build(self) -> RedisZone {
        let mut prefix = b"proxy:limit_req:".to_vec();
        prefix.extend_from_slice(self.name.as_bytes());
        prefix.push(b':');
        let fallback = ReqZone::builder(self.rate)
            .name(&self.name)
            .key(self.key.clone())
            .capacity(self.capacity)
            .build();
        let (tx, rx) = if self.allowance > 0 && tokio::runtime::Handle::try_current().is_ok() {
            let (tx, rx) = mpsc::channel(4096);
            (Some(tx), Some(rx))
        } else {
            (None, None)
        };
        let inner = Arc::new(Inner {
            name: self.name,
            prefix: prefix.into_boxed_slice(),
            key: self.key,
            rate: self.rate,
            client: self.client,
            script: Script::new(SCRIPT),
            conn: ArcSwapOption::empty(),
            reconnect: tokio::sync::Mutex::new(()),
            down_until: Mutex::new(None),
            timeout: self.timeout,
            backoff: self.backoff,
            fail: self.fail,
            fallback,
            allowance: self.allowance,
            local: Local::new(self.capacity.get()),
            sync: tx,
            stats: Counters::default(),
        });
        if let Some(rx) = rx {
            tokio::spawn(background(Arc::downgrade(&inner), rx));
        }
        RedisZone { inner }
    }
}

/// The fast path's accounting: each admitted request is stepped in Redis (concurrently,
/// up to 64 at once on the multiplexed connection); the answer refreshes the local view.
/// Ends when the zone is dropped (its sender goes).
async fn background(zone: Weak<Inner>, mut rx: mpsc::Receiver<Sync>) {
    let mut running = tokio::task::JoinSet::new();
    while let Some(job) = rx.recv().await {
        while running.len() >= 64 {
            running.join_next().await;
        }
        let Some(inner) = zone.upgrade() else { return };
        running.spawn(async move {
            let verdict = inner.step(&job.key, job.burst).await;
            match verdict {
                Remote::Admit(e) => inner.local.record(&job.local, e, true),
                Remote::Reject(e) => {
                    inner.stats.overshoot.fetch_add(1, Ordering::Relaxed);
                    inner.local.record(&job.local, e, true);
                }
                Remote::Unavailable => inner.local.forget(&job.local),
            }
        });
    }
}

/// The fast path's view of each key: Redis's last answer (its excess, when it came) and
/// how many local admissions Redis has not confirmed yet. Sharded, bounded: a full shard
/// is emptied (forgetting a view only sends those keys to the slow path once).
struct Local {
    hashers: Hashers,
    shards: Box<[Shard]>,
    per_shard: usize,
}

type Shard = Mutex<HashMap<[u64; 2], View>>;

#[derive(Debug, Clone, Copy)]
struct View {
    excess: u64,
    at: Instant,
    pending: u32,
}

impl Local {
    fn new(capacity: usize) -> Self {
        let n = capacity.clamp(1, 64);
        Local {
            hashers: Hashers::new(),
            shards: (0..n).map(|_| Mutex::new(HashMap::new())).collect(),
            per_shard: capacity.div_ceil(n).max(1),
        }
    }

    fn shard(&self, k: &Prehashed) -> Option<&Shard> {
        let i = usize::try_from(k.hash % self.shards.len() as u64).unwrap_or(0);
        self.shards.get(i)
    }

    fn with<T>(&self, k: &Prehashed, f: impl FnOnce(Option<&mut View>) -> Option<T>) -> Option<T> {
        let mut map = self
            .shard(k)?
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        f(map.get_mut(&k.fp))
    }

    /// Redis said `excess` for this key just now; `confirm` when it was the answer to
    /// a fast-path admission.
    fn record(&self, k: &Prehashed, excess: u64, confirm: bool) {
        let Some(shard) = self.shard(k) else { return };
        let mut map = shard.lock().unwrap_or_else(PoisonError::into_inner);
        if map.len() >= self.per_shard && !map.contains_key(&k.fp) {
            map.clear();
        }
        let view = map.entry(k.fp).or_insert(View {
            excess,
            at: Instant::now(),
            pending: 0,
        });
        view.excess = excess;
        view.at = Instant::now();
        if confirm {
            view.pending = view.pending.saturating_sub(1);
        }
    }

    /// Redis could not confirm: drop the view, so the key goes the slow path.
    fn forget(&self, k: &Prehashed) {
        if let Some(shard) = self.shard(k) {
            shard
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .remove(&k.fp);
        }
    }
}

/// FNV-1a, 128 bits: a stable digest of long header values for the Redis key.
fn fnv1a_128(bytes: &[u8]) -> u128 {
    const OFFSET: u128 = 0x6c62_272e_07bb_0142_62b8_2175_6295_c58d;
    const PRIME: u128 = 0x0000_0000_0100_0000_0000_0000_0000_013b;
    bytes
        .iter()
        .fold(OFFSET, |h, &b| (h ^ u128::from(b)).wrapping_mul(PRIME))
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn fnv_is_stable() {
        // Reference values of FNV-1a 128.
        assert_eq!(fnv1a_128(b""), 0x6c62_272e_07bb_0142_62b8_2175_6295_c58d);
        assert_eq!(fnv1a_128(b"a"), 0xd228_cb69_6f1a_8caf_7891_2b70_4e4a_8964);
    }
}
