//! [`Discovery`]: the names to resolve, the resolver, and one resolution round.

use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use hickory_resolver::config::{
    ConnectionConfig, LookupIpStrategy, NameServerConfig, ResolverConfig, ResolverOpts,
};
use hickory_resolver::net::runtime::TokioRuntimeProvider;
use hickory_resolver::net::NetError;
use hickory_resolver::proto::rr::{Name, RData};
use hickory_resolver::TokioResolver;

use crate::balance::{Group, GroupBuilder, Server};
use crate::discovery::task::DiscoveryTask;

/// A name whose addresses become servers of a group.
///
/// ```
/// use std::num::NonZeroU32;
/// use proxy_core::balance::Server;
/// use proxy_core::discovery::Target;
/// // server backend.internal:8000 resolve weight=2;
/// let t = Target::host("backend.internal", 8000).unwrap()
///     .template(Server::new("0.0.0.0:0".parse().unwrap()).weight(NonZeroU32::new(2).unwrap()));
/// // server backend.internal service=_http._tcp resolve;
/// let srv = Target::srv("_http._tcp.backend.internal").unwrap();
/// assert!(Target::host("bad..name", 80).is_err());
/// # let _ = (t, srv);
/// ```
#[derive(Debug, Clone)]
pub struct Target {
    name: Name,
    kind: Kind,
    template: Server,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// A/AAAA records, every address on this port.
    Host(u16),
    /// SRV records: port, weight and priority from each record.
    Srv,
}

impl Target {
    /// Every A and AAAA address of `name`, on `port`. A name without a final dot is
    /// also tried with the system's search domains.
    ///
    /// # Errors
    ///
    /// `name` is not a valid DNS name.
    pub fn host(name: &str, port: u16) -> Result<Target, DiscoveryError> {
        Ok(Target {
            name: parse_name(name)?,
            kind: Kind::Host(port),
            template: Server::new(SocketAddr::from(([0, 0, 0, 0], port))),
        })
    }

    /// The SRV records of `name` (`_service._proto.domain`), as nginx Plus's
    /// `service=`: each record's target is resolved to addresses on the record's port,
    /// with the record's weight (0 counts as 1); the records of the lowest priority
    /// value are primary servers, the others backups.
    ///
    /// # Errors
    ///
    /// `name` is not a valid DNS name.
    pub fn srv(name: &str) -> Result<Target, DiscoveryError> {
        Ok(Target {
            name: parse_name(name)?,
            kind: Kind::Srv,
            template: Server::new(SocketAddr::from(([0, 0, 0, 0], 0))),
        })
    }

    /// The parameters every server of this name gets (weight, `max_fails`,
    /// `fail_timeout`, `max_conns`, backup). Its address is replaced by each resolved
    /// one; for SRV, the weight and backup flag come from the records.
    pub fn template(mut self, template: Server) -> Self {
        self.template = template;
        self
    }

    /// The name, for logs.
    pub fn name(&self) -> String {
        self.name.to_ascii()
    }
}

fn parse_name(name: &str) -> Result<Name, DiscoveryError> {
    if name.is_empty() || name.len() > 253 {
        return Err(DiscoveryError::InvalidName);
    }
    Name::from_ascii(name).map_err(|_| DiscoveryError::InvalidName)
}

/// Why a [`Discovery`] could not be built or started.
#[derive(Debug)]
#[non_exhaustive]
pub enum DiscoveryError {
    /// A target's name is not a valid DNS name.
    InvalidName,
    /// The system's resolver configuration could not be read.
    SystemConfig(NetError),
    /// The resolver could not be built.
    Resolver(NetError),
    /// The first resolution gave no primary server.
    NoServers,
    /// The group could not be built.
    Group(crate::balance::GroupError),
}

impl fmt::Display for DiscoveryError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DiscoveryError::InvalidName => f.write_str("invalid DNS name"),
            DiscoveryError::SystemConfig(e) => {
                write!(f, "cannot read the system resolver configuration: {e}")
            }
            DiscoveryError::Resolver(e) => write!(f, "cannot build the DNS resolver: {e}"),
            DiscoveryError::NoServers => f.write_str("no upstream server resolved"),
            DiscoveryError::Group(e) => e.fmt(f),
        }
    }
}

impl std::error::Error for DiscoveryError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            DiscoveryError::SystemConfig(e) | DiscoveryError::Resolver(e) => Some(e),
            DiscoveryError::Group(e) => Some(e),
            _ => None,
        }
    }
}

/// Counters of a [`Discovery`], for metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct DiscoveryStats {
    /// Lookups done (one per target per round).
    pub lookups: u64,
    /// Lookups that failed (the name's last good addresses were kept).
    pub failures: u64,
    /// Times the group's server set was replaced.
    pub updates: u64,
}

/// Names and fixed servers of one upstream group, and the resolver that resolves them.
/// Cheap to clone; clones share the resolver, the last good answers and the counters.
#[derive(Clone)]
pub struct Discovery {
    pub(crate) inner: Arc<Inner>,
}

pub(crate) struct Inner {
    resolver: TokioResolver,
    statics: Vec<Server>,
    targets: Vec<Target>,
    /// The last good servers of each target (same order as `targets`).
    last: Mutex<Vec<Option<Vec<Server>>>>,
    pub(crate) interval: Option<Duration>,
    pub(crate) min_ttl: Duration,
    pub(crate) max_ttl: Duration,
    pub(crate) retry: Duration,
    lookups: AtomicU64,
    failures: AtomicU64,
    pub(crate) updates: AtomicU64,
}

impl fmt::Debug for Discovery {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Discovery")
            .field("targets", &self.inner.targets)
            .field("servers", &self.inner.statics.len())
            .finish()
    }
}

/// Builds a [`Discovery`].
#[derive(Debug, Clone)]
pub struct DiscoveryBuilder {
    nameservers: Vec<SocketAddr>,
    statics: Vec<Server>,
    targets: Vec<Target>,
    interval: Option<Duration>,
    min_ttl: Duration,
    max_ttl: Duration,
    retry: Duration,
    timeout: Duration,
}

/// What one round found: the servers, and when to look again.
#[derive(Debug)]
pub(crate) struct Round {
    pub(crate) servers: Vec<Server>,
    pub(crate) next: Duration,
}

impl Discovery {
    /// Start describing the names of one group. Defaults: the system's name servers,
    /// re-resolution at the answers' TTL bounded to 1 s – 60 s, 5 s after a failure,
    /// 5 s per query.
    pub fn builder() -> DiscoveryBuilder {
        DiscoveryBuilder {
            nameservers: Vec::new(),
            statics: Vec::new(),
            targets: Vec::new(),
            interval: None,
            min_ttl: Duration::from_secs(1),
            max_ttl: Duration::from_secs(60),
            retry: Duration::from_secs(5),
            timeout: Duration::from_secs(5),
        }
    }

    /// The counters.
    pub fn stats(&self) -> DiscoveryStats {
        DiscoveryStats {
            lookups: self.inner.lookups.load(Ordering::Relaxed),
            failures: self.inner.failures.load(Ordering::Relaxed),
            updates: self.inner.updates.load(Ordering::Relaxed),
        }
    }

    /// Resolve every target now and give the whole server list: the fixed servers
    /// first, then each target's servers sorted by address (so that unchanged answers
    /// give an unchanged list). A target whose lookup fails contributes its last good
    /// servers (none before its first success).
    pub async fn resolve(&self) -> Vec<Server> {
        self.round().await.servers
    }

    /// Resolve now, build `builder`'s group with the result (servers already added to
    /// `builder` are kept as fixed servers), and keep it up to date in a background
    /// task until the returned [`DiscoveryTask`] or the group is dropped.
    ///
    /// # Errors
    ///
    /// No primary server resolved, or the group cannot be built.
    pub async fn group(
        &self,
        mut builder: GroupBuilder,
    ) -> Result<(Arc<Group>, DiscoveryTask), DiscoveryError> {
        let extra = std::mem::take(builder.servers_mut());
        let this = if extra.is_empty() {
            self.clone()
        } else {
            self.with_statics(extra)
        };
        let round = this.round().await;
        if round.servers.iter().all(|s| s.backup) {
            return Err(DiscoveryError::NoServers);
        }
        for s in round.servers {
            builder = builder.server(s);
        }
        let group = builder.build().map_err(DiscoveryError::Group)?;
        let task = this.spawn_after(&group, round.next);
        Ok((group, task))
    }

    /// Keep `group` up to date in a background task (the first re-resolution after
    /// the minimum TTL or the fixed interval), until the returned [`DiscoveryTask`] or
    /// the group is dropped. Needs a tokio runtime.
    pub fn spawn(&self, group: &Arc<Group>) -> DiscoveryTask {
        let first = self.inner.interval.unwrap_or(self.inner.min_ttl);
        self.spawn_after(group, first)
    }

    fn spawn_after(&self, group: &Arc<Group>, first: Duration) -> DiscoveryTask {
        DiscoveryTask::spawn(self.clone(), Arc::downgrade(group), first)
    }

    fn with_statics(&self, extra: Vec<Server>) -> Discovery {
        let i = &self.inner;
        let mut statics = extra;
        statics.extend(i.statics.iter().cloned());
        Discovery {
            inner: Arc::new(Inner {
                resolver: i.resolver.clone(),
                statics,
                targets: i.targets.clone(),
                last: Mutex::new(vec![None; i.targets.len()]),
                interval: i.interval,
                min_ttl: i.min_ttl,
                max_ttl: i.max_ttl,
                retry: i.retry,
                lookups: AtomicU64::new(0),
                failures: AtomicU64::new(0),
                updates: AtomicU64::new(0),
            }),
        }
    }

    /// One round: every target looked up (concurrently), failures replaced by the last
    /// good answer.
    pub(crate) async fn round(&self) -> Round {
        let inner = &self.inner;
        // Fresh answers every round: the TTL decides *when* a round happens.
        inner.resolver.clear_cache();
        let lookups = inner.targets.iter().map(|t| self.lookup(t));
        let results = futures_join_all(lookups).await;
        let mut servers = inner.statics.clone();
        let mut ttl = inner.max_ttl;
        let mut failed = false;
        let mut last = inner.last.lock().unwrap_or_else(PoisonError::into_inner);
        last.resize(inner.targets.len(), None);
        for ((target, result), slot) in inner.targets.iter().zip(results).zip(last.iter_mut()) {
            inner.lookups.fetch_add(1, Ordering::Relaxed);
            match result {
                Ok((found, valid)) => {
                    ttl = ttl.min(valid);
                    *slot = Some(found);
                }
                Err(e) => {
                    failed = true;
                    inner.failures.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(name = %target.name, error = %e, "DNS lookup failed, keeping the last good addresses");
                }
            }
            if let Some(found) = slot {
                servers.extend(found.iter().cloned());
            }
        }
        drop(last);
        let mut next = match inner.interval {
            Some(fixed) => fixed,
            None => ttl.clamp(inner.min_ttl, inner.max_ttl.max(inner.min_ttl)),
        };
        if failed {
            next = next.min(inner.retry);
        }
        Round { servers, next }
    }

    /// The servers of one target and how long the answer is valid. "No such name" and
    /// "no records" are answers (no servers); anything else is a failure.
    async fn lookup(&self, t: &Target) -> Result<(Vec<Server>, Duration), NetError> {
        let r = &self.inner.resolver;
        match t.kind {
            Kind::Host(port) => match r.lookup_ip(t.name.clone()).await {
                Ok(found) => {
                    let valid = until(found.valid_until());
                    let mut servers: Vec<Server> = found
                        .iter()
                        .map(|ip| at(&t.template, SocketAddr::new(ip, port)))
                        .collect();
                    sort_dedup(&mut servers);
                    Ok((servers, valid))
                }
                Err(e) if e.is_no_records_found() || e.is_nx_domain() => {
                    Ok((Vec::new(), self.inner.min_ttl))
                }
                Err(e) => Err(e),
            },
            Kind::Srv => {
                let found = match r.srv_lookup(t.name.clone()).await {
                    Ok(found) => found,
                    Err(e) if e.is_no_records_found() || e.is_nx_domain() => {
                        return Ok((Vec::new(), self.inner.min_ttl));
                    }
                    Err(e) => return Err(e),
                };
                let mut valid = until(found.valid_until());
                let records: Vec<_> = found
                    .answers()
                    .iter()
                    .filter_map(|rec| match &rec.data {
                        RData::SRV(srv) => Some(srv.clone()),
                        _ => None,
                    })
                    .collect();
                let best = records.iter().map(|s| s.priority).min().unwrap_or(0);
                let mut servers = Vec::new();
                for srv in records {
                    let ips: Vec<IpAddr> = match r.lookup_ip(srv.target.clone()).await {
                        Ok(ips) => {
                            valid = valid.min(until(ips.valid_until()));
                            ips.iter().collect()
                        }
                        Err(e) if e.is_no_records_found() || e.is_nx_domain() => Vec::new(),
                        Err(e) => return Err(e),
                    };
                    let weight = NonZeroU32::new(u32::from(srv.weight)).unwrap_or(NonZeroU32::MIN);
                    for ip in ips {
                        let mut s = at(&t.template, SocketAddr::new(ip, srv.port)).weight(weight);
                        s.backup = srv.priority != best;
                        servers.push(s);
                    }
                }
                sort_dedup(&mut servers);
                Ok((servers, valid))
            }
        }
    }
}

fn until(valid_until: std::time::Instant) -> Duration {
    valid_until.saturating_duration_since(std::time::Instant::now())
}

/// The template's parameters at `addr`.
fn at(template: &Server, addr: SocketAddr) -> Server {
    let mut s = template.clone();
    s.addr = addr;
    s
}

fn sort_dedup(servers: &mut Vec<Server>) {
    servers.sort_by_key(|s| (s.backup, s.addr));
    servers.dedup_by_key(|s| s.addr());
}

/// Await every future, concurrently, in order (no extra dependency for `join_all`).
async fn futures_join_all<F: std::future::Future>(futs: impl Iterator<Item = F>) -> Vec<F::Output> {
    let mut set: Vec<std::pin::Pin<Box<F>>> = futs.map(Box::pin).collect();
    let mut out: Vec<Option<F::Output>> = (0..set.len()).map(|_| None).collect();
    std::future::poll_fn(|cx| {
        let mut pending = false;
        for (fut, slot) in set.iter_mut().zip(out.iter_mut()) {
            if slot.is_none() {
                match fut.as_mut().poll(cx) {
                    std::task::Poll::Ready(v) => *slot = Some(v),
                    std::task::Poll::Pending => pending = true,
                }
            }
        }
        if pending {
            std::task::Poll::Pending
        } else {
            std::task::Poll::Ready(())
        }
    })
    .await;
    out.into_iter().flatten().collect()
}

impl DiscoveryBuilder {
    /// Ask this name server (UDP, and TCP for long answers) instead of the system's.
    /// May be given several times.
    pub fn nameserver(mut self, addr: SocketAddr) -> Self {
        self.nameservers.push(addr);
        self
    }

    /// A fixed server of the group, kept whatever the names resolve to.
    pub fn server(mut self, server: Server) -> Self {
        self.statics.push(server);
        self
    }

    /// A name to resolve.
    pub fn target(mut self, target: Target) -> Self {
        self.targets.push(target);
        self
    }

    /// Re-resolve on this fixed interval, whatever the TTL (nginx's `resolver ...
    /// valid=`).
    pub fn interval(mut self, interval: Duration) -> Self {
        self.interval = Some(interval.max(Duration::from_millis(10)));
        self
    }

    /// Re-resolve no sooner than this after a round, however short the TTL. Default 1 s.
    pub fn min_ttl(mut self, min: Duration) -> Self {
        self.min_ttl = min.max(Duration::from_millis(10));
        self
    }

    /// Re-resolve no later than this after a round, however long the TTL. Default 60 s.
    pub fn max_ttl(mut self, max: Duration) -> Self {
        self.max_ttl = max.max(Duration::from_millis(10));
        self
    }

    /// After a failed lookup, try again this soon (at the latest). Default 5 s.
    pub fn retry(mut self, retry: Duration) -> Self {
        self.retry = retry.max(Duration::from_millis(10));
        self
    }

    /// Time allowed for one query (nginx's `resolver_timeout`). Default 5 s.
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// Build it.
    ///
    /// # Errors
    ///
    /// No name server given and the system's configuration cannot be read, or the
    /// resolver cannot be built.
    pub fn build(self) -> Result<Discovery, DiscoveryError> {
        let provider = TokioRuntimeProvider::default();
        let mut builder = if self.nameservers.is_empty() {
            TokioResolver::builder(provider).map_err(DiscoveryError::SystemConfig)?
        } else {
            let servers = self
                .nameservers
                .iter()
                .map(|addr| {
                    let mut udp = ConnectionConfig::udp();
                    udp.port = addr.port();
                    let mut tcp = ConnectionConfig::tcp();
                    tcp.port = addr.port();
                    NameServerConfig::new(addr.ip(), true, vec![udp, tcp])
                })
                .collect();
            TokioResolver::builder_with_config(ResolverConfig::from_name_servers(servers), provider)
        };
        let opts: &mut ResolverOpts = builder.options_mut();
        opts.timeout = self.timeout;
        opts.attempts = 1;
        opts.ip_strategy = LookupIpStrategy::Ipv4AndIpv6;
        let resolver = builder.build().map_err(DiscoveryError::Resolver)?;
        let n = self.targets.len();
        Ok(Discovery {
            inner: Arc::new(Inner {
                resolver,
                statics: self.statics,
                targets: self.targets,
                last: Mutex::new(vec![None; n]),
                interval: self.interval,
                min_ttl: self.min_ttl,
                max_ttl: self.max_ttl.max(self.min_ttl),
                retry: self.retry,
                lookups: AtomicU64::new(0),
                failures: AtomicU64::new(0),
                updates: AtomicU64::new(0),
            }),
        })
    }
}
