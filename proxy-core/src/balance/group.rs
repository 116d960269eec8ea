//! [`Group`]: an upstream group's servers and their shared state, the pick, and the
//! [`Lease`] a request holds on the server it was sent to.

use std::fmt;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, TryLockError};

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
    name: Box<str>,
    policy: Policy,
    /// Primaries first, then backups.
    peers: Box<[Peer]>,
    primaries: usize,
    single: bool,
    /// The round-robin state (one current weight per server). Sharded: a pick takes the
    /// first shard it can lock without waiting, so concurrent picks do not queue behind
    /// one lock, and an uncontended group (one shard in use) follows nginx's sequence
    /// exactly. Each shard on its own is an exact smooth weighted round-robin.
    first: Shard,
    more: Box<[Shard]>,
    epoch: Instant,
    /// Dropped with the group: tells the health check task to stop.
    _health: Option<health::Stop>,
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

    /// A fresh record of tried servers for one request.
    pub fn tried(&self) -> Tried {
        Tried::new(self.peers.len())
    }

    /// How many servers one request may try at most (nginx's `peer.tries`): every
    /// server, primary and backup; 1 for a group of a single server.
    pub fn max_tries(&self) -> usize {
        if self.single {
            1
        } else {
            self.peers.len()
        }
    }

    /// Pick a server for a request that already tried the servers in `tried`, and take
    /// an in-flight slot on it. Backup servers are considered only when no primary is
    /// available. `None` when no server is available: answer 502 at once.
    pub fn select(self: &Arc<Self>, tried: &mut Tried) -> Option<Lease> {
        let now = self.now();
        let mut current = self.lock_shard();
        // Each round either returns or marks one more server as tried: bounded.
        for _ in 0..=self.peers.len() * 2 {
            let range = if tried.backup {
                self.primaries..self.peers.len()
            } else {
                0..self.primaries
            };
            let pick = match self.policy {
                Policy::RoundRobin => {
                    pick::round_robin(&self.peers, range, &mut current, tried, now, self.single)
                }
                Policy::LeastConn => {
                    pick::least_conn(&self.peers, range, &mut current, tried, now, self.single)
                }
            };
            let Some(index) = pick else {
                if !tried.backup && self.primaries < self.peers.len() {
                    tried.backup = true;
                    continue;
                }
                return None;
            };
            tried.insert(index);
            let peer = self.peers.get(index)?;
            if peer.claim(now, self.single) {
                return Some(Lease {
                    group: Arc::clone(self),
                    index,
                });
            }
        }
        None
    }

    /// A read-only view of every server, primaries first, for metrics.
    pub fn stats(&self) -> impl ExactSizeIterator<Item = ServerStats> + '_ {
        let now = self.now();
        self.peers.iter().map(move |p| p.stats(now, self.single))
    }

    pub(crate) fn peers(&self) -> &[Peer] {
        &self.peers
    }

    /// The group clock: nanoseconds since the group was built, on tokio's clock so that
    /// tests can pause it.
    pub(crate) fn now(&self) -> u64 {
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

impl fmt::Debug for Group {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Group")
            .field("name", &self.name)
            .field("policy", &self.policy)
            .field("servers", &self.peers.len())
            .field("backups", &(self.peers.len() - self.primaries))
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
        let mut servers = self.servers;
        // Primaries first, keeping the configured order within each kind.
        servers.sort_by_key(|s| s.backup);
        let primaries = servers.iter().filter(|s| !s.backup).count();
        if primaries == 0 {
            return Err(GroupError::NoPrimary);
        }
        if servers.len() > 65_536 {
            return Err(GroupError::TooManyServers);
        }
        let handle = match &self.health {
            Some(_) => {
                Some(tokio::runtime::Handle::try_current().map_err(|_| GroupError::NoRuntime)?)
            }
            None => None,
        };
        let n = servers.len();
        let shards = self
            .shards
            .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |p| p.get().min(8)))
            .max(1);
        let peers: Box<[Peer]> = servers.iter().map(Peer::new).collect();
        let (stop, task) = match (self.health, handle) {
            (Some(check), Some(handle)) => {
                let (stop, task) = health::prepare(check);
                (Some(stop), Some((task, handle)))
            }
            _ => (None, None),
        };
        let group = Arc::new(Group {
            name: self.name,
            policy: self.policy,
            single: n == 1,
            peers,
            primaries,
            first: Shard::new(n),
            more: (1..shards).map(|_| Shard::new(n)).collect(),
            epoch: Instant::now(),
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
    group: Arc<Group>,
    index: usize,
}

impl Lease {
    fn peer(&self) -> Option<&Peer> {
        self.group.peers.get(self.index)
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
        if self.group.single {
            return;
        }
        if let Some(p) = self.peer() {
            p.record_success();
        }
    }

    /// The request failed (connect error, timeout, invalid header or a counted status).
    pub fn failure(&self) {
        if self.group.single {
            return;
        }
        if let Some(p) = self.peer() {
            if p.record_failure(self.group.now()) {
                tracing::warn!(
                    upstream = %p.addr,
                    group = %self.group.name,
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
            .field("group", &self.group.name)
            .field("addr", &self.addr())
            .finish()
    }
}
