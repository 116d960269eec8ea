//! [`Group`]: an upstream group's servers and their shared state, the pick, and the
//! [`Lease`] a request holds on the server it was sent to.
//!
//! The server set can be replaced at run time ([`Group::set_servers`], used by DNS
//! discovery): the set is an immutable snapshot behind an [`ArcSwap`], so a pick never
//! takes a lock to read it. A request pins the snapshot it started with (its
//! [`Tried`] holds it), so its retries index the same servers; its [`Lease`] keeps the
//! snapshot alive, so a removed server's in-flight requests finish normally (it drains).
//! Servers present before and after share one live state (`Arc<Peer>`): in-flight
//! counts, failures and health carry over.

use std::collections::HashMap;
use std::fmt;
use std::net::SocketAddr;
use std::ops::Deref;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, TryLockError};

use arc_swap::ArcSwap;
use tokio::time::Instant;

use crate::balance::health::{self, HealthCheck};
use crate::balance::pick::{self, Tried};
use crate::balance::server::{Peer, Server, ServerStats};

/// How a group chooses among its available servers.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Policy {
    /// Smooth weighted round-robin, nginx's default.
    #[default]
    RoundRobin,
    /// nginx's `least_conn`: the fewest in-flight requests relative to weight, ties
    /// broken by weighted round-robin.
    LeastConn,
}

/// An upstream group: nginx's `upstream NAME { ... }` block. Build it with
/// [`Group::builder`]; share it as `Arc<Group>` between every location and connection
/// that uses it. Dropping the last `Arc` stops its health check task.
pub struct Group {
    name: Arc<str>,
    policy: Policy,
    /// The current server set; replaced whole by [`Group::set_servers`].
    set: ArcSwap<Set>,
    shards: usize,
    epoch: Instant,
    /// Removed servers that an older set pinned by a request may still reach (not on
    /// the hot path).
    retired: Mutex<Vec<Arc<Peer>>>,
    /// Dropped with the group: tells the health check task to stop.
    _health: Option<health::Stop>,
}

/// One snapshot of a group's servers, with its own round-robin state.
pub(crate) struct Set {
    /// Primaries first, then backups.
    peers: Box<[Arc<Peer>]>,
    primaries: usize,
    single: bool,
    /// The round-robin state (one current weight per server). Sharded: a pick takes the
    /// first shard it can lock without waiting, so concurrent picks do not queue behind
    /// one lock, and an uncontended group (one shard in use) follows nginx's sequence
    /// exactly. Each shard on its own is an exact smooth weighted round-robin.
    first: Shard,
    more: Box<[Shard]>,
    /// Copies of the group's, so that a [`Lease`] needs only its snapshot.
    name: Arc<str>,
    epoch: Instant,
}

impl Deref for Set {
    type Target = [Arc<Peer>];

    fn deref(&self) -> &[Arc<Peer>] {
        &self.peers
    }
}

impl fmt::Debug for Set {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Set")
            .field("servers", &self.peers.len())
            .field("primaries", &self.primaries)
            .finish()
    }
}

impl Set {
    /// Primaries first (keeping the given order within each kind), reusing the live
    /// state of `old` peers whose configuration is unchanged.
    fn new(
        servers: Vec<Server>,
        old: Option<&Set>,
        shards: usize,
        name: Arc<str>,
        epoch: Instant,
    ) -> Result<Set, GroupError> {
        let mut servers = servers;
        servers.sort_by_key(|s| s.backup);
        let primaries = servers.iter().filter(|s| !s.backup).count();
        if primaries == 0 {
            return Err(GroupError::NoPrimary);
        }
        if servers.len() > 65_536 {
            return Err(GroupError::TooManyServers);
        }
        let mut reusable: HashMap<SocketAddr, Vec<&Arc<Peer>>> = HashMap::new();
        for p in old.map_or(&[][..], |o| &o.peers[..]) {
            reusable.entry(p.addr).or_default().push(p);
        }
        let peers: Box<[Arc<Peer>]> = servers
            .iter()
            .map(|s| {
                let same = reusable.get_mut(&s.addr).and_then(|list| {
                    let i = list.iter().position(|p| p.configured_as(s))?;
                    Some(Arc::clone(list.swap_remove(i)))
                });
                same.unwrap_or_else(|| Arc::new(Peer::new(s)))
            })
            .collect();
        let n = peers.len();
        Ok(Set {
            single: n == 1,
            peers,
            primaries,
            first: Shard::new(n),
            more: (1..shards).map(|_| Shard::new(n)).collect(),
            name,
            epoch,
        })
    }

    fn now(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_nanos()).unwrap_or(u64::MAX)
    }

    fn lock_shard(&self) -> MutexGuard<'_, Box<[i64]>> {
        for shard in std::iter::once(&self.first).chain(self.more.iter()) {
            match shard.0.try_lock() {
                Ok(guard) => return guard,
                Err(TryLockError::Poisoned(p)) => return p.into_inner(),
                Err(TryLockError::WouldBlock) => {}
            }
        }
        // Every shard busy: wait for the first (the critical section is a short loop).
        self.first.0.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

#[repr(align(64))]
struct Shard(Mutex<Box<[i64]>>);

impl Shard {
    fn new(n: usize) -> Self {
        Shard(Mutex::new(vec![0; n].into_boxed_slice()))
    }
}

impl Group {
    /// Start describing a group named `name` (used in logs).
    pub fn builder(name: impl Into<Box<str>>) -> GroupBuilder {
        GroupBuilder {
            name: name.into(),
            policy: Policy::RoundRobin,
            servers: Vec::new(),
            health: None,
            shards: None,
        }
    }

    /// The group's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The group's policy.
    pub fn policy(&self) -> Policy {
        self.policy
    }

    /// A fresh record of tried servers for one request. It pins the group's current
    /// server set: every [`select`](Self::select) with it picks from that set, even if
    /// the set is replaced meanwhile.
    pub fn tried(&self) -> Tried {
        Tried::new(self.set.load_full())
    }

    /// How many servers one request may try at most (nginx's `peer.tries`): every
    /// server, primary and backup; 1 for a group of a single server.
    pub fn max_tries(&self) -> usize {
        self.set.load().max_tries()
    }

    /// Replace the group's servers (DNS re-resolution, an API). Servers whose address
    /// and parameters are unchanged keep their live state (in-flight count, failures,
    /// health); new ones start fresh; removed ones take no new request but finish the
    /// ones they have (see [`draining`](Self::draining)). An unchanged list changes
    /// nothing. The round-robin position restarts when the set changes.
    ///
    /// # Errors
    ///
    /// No primary server or more than 65,536 servers: the current set is kept.
    pub fn set_servers(&self, servers: impl IntoIterator<Item = Server>) -> Result<(), GroupError> {
        let servers: Vec<Server> = servers.into_iter().collect();
        // One writer at a time: the lock is taken before the current set is read.
        let mut retired = self.retired.lock().unwrap_or_else(PoisonError::into_inner);
        let old = self.set.load_full();
        let unchanged = {
            let mut sorted: Vec<&Server> = servers.iter().collect();
            sorted.sort_by_key(|s| s.backup);
            sorted.len() == old.peers.len()
                && sorted
                    .iter()
                    .zip(old.peers.iter())
                    .all(|(s, p)| p.configured_as(s))
        };
        if unchanged {
            return Ok(());
        }
        let new = Set::new(
            servers,
            Some(&old),
            self.shards,
            Arc::clone(&self.name),
            self.epoch,
        )?;
        let kept: std::collections::HashSet<*const Peer> =
            new.peers.iter().map(Arc::as_ptr).collect();
        retired.extend(
            old.peers
                .iter()
                .filter(|p| !kept.contains(&Arc::as_ptr(p)))
                .cloned(),
        );
        self.set.store(Arc::new(new));
        drop(old);
        prune(&mut retired);
        Ok(())
    }

    /// Removed servers that still have requests in flight, until those finish.
    pub fn draining(&self) -> Vec<ServerStats> {
        let mut retired = self.retired.lock().unwrap_or_else(PoisonError::into_inner);
        prune(&mut retired);
        let now = self.now();
        retired
            .iter()
            .filter(|p| p.in_flight() > 0)
            .map(|p| p.stats(now, false))
            .collect()
    }

    /// Pick a server for a request that already tried the servers in `tried`, and take
    /// an in-flight slot on it. Backup servers are considered only when no primary is
    /// available. `None` when no server is available: answer 502 at once.
    pub fn select(self: &Arc<Self>, tried: &mut Tried) -> Option<Lease> {
        let set = Arc::clone(tried.set());
        let now = set.now();
        let mut current = set.lock_shard();
        let (n, primaries, single) = (set.peers.len(), set.primaries, set.single);
        // Each round either returns or marks one more server as tried: bounded.
        for _ in 0..=n * 2 {
            let range = if tried.backup {
                primaries..n
            } else {
                0..primaries
            };
            let pick = match self.policy {
                Policy::RoundRobin => {
                    pick::round_robin(&set.peers, range, &mut current, tried, now, single)
                }
                Policy::LeastConn => {
                    pick::least_conn(&set.peers, range, &mut current, tried, now, single)
                }
            };
            let Some(index) = pick else {
                if !tried.backup && primaries < n {
                    tried.backup = true;
                    continue;
                }
                return None;
            };
            tried.insert(index);
            let peer = set.peers.get(index)?;
            if peer.claim(now, single) {
                drop(current);
                return Some(Lease { set, index });
            }
        }
        None
    }

    /// A read-only view of every server of the current set, primaries first, for
    /// metrics.
    pub fn stats(&self) -> impl ExactSizeIterator<Item = ServerStats> {
        let set = self.set.load();
        let now = self.now();
        let stats: Vec<ServerStats> = set.peers.iter().map(|p| p.stats(now, set.single)).collect();
        stats.into_iter()
    }

    /// The current server set.
    pub(crate) fn peers(&self) -> Arc<Set> {
        self.set.load_full()
    }

    /// The group clock: nanoseconds since the group was built, on tokio's clock so that
    /// tests can pause it.
    pub(crate) fn now(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_nanos()).unwrap_or(u64::MAX)
    }
}

/// Forget removed servers that no request can reach any more: only this list holds
/// them (no older set is pinned by a request's `Tried` or `Lease`).
fn prune(retired: &mut Vec<Arc<Peer>>) {
    retired.retain(|p| Arc::strong_count(p) > 1 || p.in_flight() > 0);
}

impl Set {
    pub(crate) fn max_tries(&self) -> usize {
        if self.single {
            1
        } else {
            self.peers.len()
        }
    }
}

impl fmt::Debug for Group {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let set = self.set.load();
        f.debug_struct("Group")
            .field("name", &self.name)
            .field("policy", &self.policy)
            .field("servers", &set.peers.len())
            .field("backups", &(set.peers.len() - set.primaries))
            .finish()
    }
}

/// Builds a [`Group`].
#[derive(Debug)]
pub struct GroupBuilder {
    name: Box<str>,
    policy: Policy,
    servers: Vec<Server>,
    health: Option<HealthCheck>,
    shards: Option<usize>,
}

impl GroupBuilder {
    /// The policy. Default [`Policy::RoundRobin`].
    pub fn policy(mut self, policy: Policy) -> Self {
        self.policy = policy;
        self
    }

    /// Add a server. Order matters only for ties, as in nginx.
    pub fn server(mut self, server: Server) -> Self {
        self.servers.push(server);
        self
    }

    /// The servers added so far (for DNS discovery, which takes them as fixed ones).
    #[cfg_attr(not(feature = "dns"), allow(dead_code))]
    pub(crate) fn servers_mut(&mut self) -> &mut Vec<Server> {
        &mut self.servers
    }

    /// Check every server actively in a background task (stopped when the group is
    /// dropped). Building then needs a tokio runtime.
    pub fn health_check(mut self, check: HealthCheck) -> Self {
        self.health = Some(check);
        self
    }

    /// How many round-robin shards concurrent picks spread over. Default: the number
    /// of CPUs, at most 8. 1 gives nginx's exact sequence under any concurrency.
    pub fn shards(mut self, shards: std::num::NonZeroUsize) -> Self {
        self.shards = Some(shards.get());
        self
    }

    /// Build the group.
    ///
    /// # Errors
    ///
    /// No primary server, more than 65,536 servers, or a health check without a tokio
    /// runtime to run it on.
    pub fn build(self) -> Result<Arc<Group>, GroupError> {
        let shards = self
            .shards
            .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |p| p.get().min(8)))
            .max(1);
        let name: Arc<str> = self.name.into();
        let epoch = Instant::now();
        let set = Set::new(self.servers, None, shards, Arc::clone(&name), epoch)?;
        let handle = match &self.health {
            Some(_) => {
                Some(tokio::runtime::Handle::try_current().map_err(|_| GroupError::NoRuntime)?)
            }
            None => None,
        };
        let (stop, task) = match (self.health, handle) {
            (Some(check), Some(handle)) => {
                let (stop, task) = health::prepare(check);
                (Some(stop), Some((task, handle)))
            }
            _ => (None, None),
        };
        let group = Arc::new(Group {
            name,
            policy: self.policy,
            set: ArcSwap::from_pointee(set),
            shards,
            epoch,
            retired: Mutex::new(Vec::new()),
            _health: stop,
        });
        if let Some((task, handle)) = task {
            handle.spawn(task.run(Arc::downgrade(&group)));
        }
        Ok(group)
    }
}

/// Why a [`Group`] could not be built.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum GroupError {
    /// The group has no primary (non-backup) server.
    NoPrimary,
    /// More than 65,536 servers.
    TooManyServers,
    /// A health check was configured outside a tokio runtime.
    NoRuntime,
}

impl fmt::Display for GroupError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            GroupError::NoPrimary => "upstream group has no primary server",
            GroupError::TooManyServers => "upstream group has more than 65536 servers",
            GroupError::NoRuntime => "health checks need a tokio runtime",
        })
    }
}

impl std::error::Error for GroupError {}

/// An in-flight slot on the server a request was sent to. Dropping it gives the slot
/// back (a cancelled request or a finished response body); [`success`](Self::success)
/// and [`failure`](Self::failure) feed nginx's `max_fails` accounting.
pub struct Lease {
    /// The snapshot the server was picked from: keeps a removed server's state alive
    /// until its requests finish.
    set: Arc<Set>,
    index: usize,
}

impl Lease {
    fn peer(&self) -> Option<&Peer> {
        self.set.peers.get(self.index).map(|p| &**p)
    }

    /// The server's address.
    pub fn addr(&self) -> SocketAddr {
        self.peer()
            .map_or(SocketAddr::from(([0, 0, 0, 0], 0)), |p| p.addr)
    }

    /// The server's position in [`Group::stats`].
    pub fn index(&self) -> usize {
        self.index
    }

    /// Whether the server is a backup server.
    pub fn is_backup(&self) -> bool {
        self.peer().is_some_and(|p| p.backup)
    }

    /// The request succeeded: resets the failure count if the server was picked after
    /// `fail_timeout` since its last failure (nginx's probe).
    pub fn success(&self) {
        if self.set.single {
            return;
        }
        if let Some(p) = self.peer() {
            p.record_success();
        }
    }

    /// The request failed (connect error, timeout, invalid header or a counted status).
    pub fn failure(&self) {
        if self.set.single {
            return;
        }
        if let Some(p) = self.peer() {
            if p.record_failure(self.set.now()) {
                tracing::warn!(
                    upstream = %p.addr,
                    group = %self.set.name,
                    "upstream server temporarily disabled"
                );
            }
        }
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        if let Some(p) = self.peer() {
            p.release();
        }
    }
}

impl fmt::Debug for Lease {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Lease")
            .field("group", &self.set.name)
            .field("addr", &self.addr())
            .finish()
    }
}
