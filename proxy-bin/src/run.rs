//! Running a config: the runtime, the listeners, reloads and signals.
//!
//! Every listener serves a [`Reloadable`] service. SIGHUP re-reads the config file: when
//! it is valid, each listener's routes are swapped atomically (requests in flight finish
//! on the old ones), new listen addresses start and vanished ones drain; when it is
//! invalid, the errors are logged with file, line and key and the old config keeps
//! serving. A TLS listener that stays gets the new TLS settings (protocols, ciphers,
//! sessions, ALPN, handshake timeout) for its new handshakes, and the new certificates;
//! its open connections keep theirs. SIGUSR1 reopens the access logs (logrotate). SIGTERM/SIGINT drain and exit 0.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use proxy_core::balance::{Group, ServerState};
use proxy_core::client_info::Scheme;
use proxy_core::forwarded::ProxyProtocol;
use proxy_core::metrics::{AdminService, Readiness, UpstreamServerStat};
use proxy_core::reload::{ReloadHandle, Reloadable};
use proxy_core::router::LocationService;
use proxy_core::server::{Accept, HttpConfig, Plain, Server};
use proxy_core::timeout::SendTimeoutAccept;
use proxy_tls::reload::Reloader;
use proxy_tls::sni::CertStore;
use proxy_tls::TlsAcceptor;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::config::{self, ListenerPlan, Plan, Shared, Source};

/// Where the running config came from, so a reload can read it again.
#[derive(Debug, Clone)]
pub enum Origin {
    /// A file: SIGHUP re-reads it.
    File(PathBuf),
    /// The embedded default or the command line: nothing to re-read.
    Fixed,
}

/// Parse the config, build the runtime, check and bind everything (before serving, so a
/// bad config or address fails the start), serve until SIGTERM or SIGINT, then drain.
pub fn run(
    source: Source,
    origin: Origin,
    workers: Option<usize>,
    pid_file: Option<PathBuf>,
) -> Result<(), String> {
    let parsed = source.parse().map_err(|errs| join(&errs))?;
    let mut rt = tokio::runtime::Builder::new_multi_thread();
    if let Some(n) = workers.or(parsed.global.workers) {
        rt.worker_threads(n);
    }
    let rt = rt.enable_all().build().map_err(|e| e.to_string())?;
    rt.block_on(async move {
        let mut running = Running::default();
        let plan = config::build(&source, &parsed, &mut running.shared)
            .await
            .map_err(|errs| join(&errs))?;
        running.apply(plan).map_err(|e| e.to_string())?;
        let _pid = match pid_file {
            Some(path) => Some(PidFile::write(path).map_err(|e| e.to_string())?),
            None => None,
        };
        running.readiness.set_ready(true);
        let mut signals = Signals::new().map_err(|e| e.to_string())?;
        loop {
            match signals.next().await {
                Signal::Reload => running.reload(&origin).await,
                Signal::Reopen => running.reopen_logs().await,
                Signal::Stop => break,
            }
        }
        running.readiness.set_ready(false);
        tracing::info!(deadline = ?running.shutdown_timeout, "shutting down: draining in-flight requests");
        tokio::select! {
            () = running.stop_all() => tracing::info!("stopped"),
            () = async { while !matches!(signals.next().await, Signal::Stop) {} } => {
                tracing::warn!("second signal: stopping now");
            }
        }
        Ok(())
    })
}

fn join(errs: &[config::Diagnostic]) -> String {
    errs.iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("\n")
}

/// One serving listener.
struct Live {
    handle: ReloadHandle<LocationService>,
    stop: watch::Sender<bool>,
    task: JoinHandle<std::io::Result<()>>,
    /// Its TLS acceptor (a clone of the serving one), reconfigured in place on reload.
    tls: Option<TlsAcceptor>,
    /// The certificates its TLS acceptor serves, updated in place on reload.
    certs: Option<CertStore>,
    /// Re-reads certificate files when they change on disk; copies TLS handshake counts
    /// into the metrics.
    watcher: Option<JoinHandle<()>>,
    tls_metrics: Option<JoinHandle<()>>,
    /// Keeps the OCSP staples of its certificates fresh; replaced on every reload (so
    /// `ocsp_file`s are re-read and responders asked again).
    stapler: Option<JoinHandle<()>>,
}

/// How often the TLS acceptor's handshake counters are copied into the metrics.
const TLS_METRICS_EVERY: Duration = Duration::from_secs(5);

/// Copy a listener's handshake counts into the registry's counters, as deltas.
fn export_handshakes(
    stats: Arc<proxy_tls::acceptor::TlsStats>,
    metrics: proxy_core::metrics::Metrics,
) -> JoinHandle<()> {
    tokio::spawn(async move {
        let (ok, failed) = (metrics.tls_handshakes(true), metrics.tls_handshakes(false));
        let (mut seen_ok, mut seen_failed) = (0u64, 0u64);
        let mut tick = tokio::time::interval(TLS_METRICS_EVERY);
        loop {
            tick.tick().await;
            let (now_ok, now_failed) = (stats.handshakes(), stats.failures());
            ok.inc_by(now_ok.saturating_sub(seen_ok));
            failed.inc_by(now_failed.saturating_sub(seen_failed));
            (seen_ok, seen_failed) = (now_ok, now_failed);
        }
    })
}

/// How often certificate files are checked for changes (certbot renewals).
const CERT_POLL: Duration = Duration::from_secs(5);

/// Make `live` serve exactly the certificates of `new` (same ids replaced, others
/// removed): new handshakes get them, established connections keep theirs.
fn sync_certs(live: &CertStore, new: &CertStore) {
    let wanted: Vec<Arc<str>> = new.certificates().into_iter().map(|c| c.id).collect();
    for id in &wanted {
        if let Some(cert) = new.get(id) {
            live.insert(id.clone(), cert);
        }
    }
    for c in live.certificates() {
        if !wanted.contains(&c.id) {
            live.remove(&c.id);
        }
    }
}

fn watch_files(store: &CertStore, files: &[(String, PathBuf, PathBuf)]) -> Option<JoinHandle<()>> {
    if files.is_empty() {
        return None;
    }
    let mut reloader = Reloader::new(store.clone());
    for (id, cert, key) in files {
        reloader = reloader.with_files(id.clone(), cert.clone(), key.clone());
    }
    Some(reloader.spawn_watcher(CERT_POLL))
}

#[derive(Default)]
struct Running {
    shared: Shared,
    listeners: HashMap<SocketAddr, Live>,
    admin: Option<(SocketAddr, Live)>,
    acme: Vec<JoinHandle<()>>,
    readiness: Readiness,
    shutdown_timeout: Duration,
}

impl Running {
    /// Make the running listeners match `plan`: swap the services of kept addresses,
    /// start new ones, drain removed ones. Binding happens before anything is changed, so
    /// a reload that cannot bind changes nothing.
    fn apply(&mut self, plan: Plan) -> std::io::Result<()> {
        let mut bound = HashMap::new();
        for p in &plan.listeners {
            if !self.listeners.contains_key(&p.listen.addr) {
                let l = p.listen.bind().map_err(|e| {
                    std::io::Error::new(
                        e.kind(),
                        format!("cannot listen on {}: {e}", p.listen.addr),
                    )
                })?;
                bound.insert(p.listen.addr, l);
            }
        }
        let admin_listener = match plan.admin {
            Some(addr) if self.admin.as_ref().map(|(a, _)| *a) != Some(addr) => {
                Some((addr, bind_admin(addr)?))
            }
            _ => None,
        };
        self.shutdown_timeout = plan.shutdown_timeout;
        let keep: Vec<SocketAddr> = plan.listeners.iter().map(|p| p.listen.addr).collect();
        for lp in plan.listeners {
            let addr = lp.listen.addr;
            if let Some(live) = self.listeners.get_mut(&addr) {
                if let (Some(old), Some(new)) = (&live.certs, &lp.tls) {
                    sync_certs(old, &new.store);
                    // New handshakes take the new protocols, ciphers, sessions, ALPN and
                    // timeout, with the live store as their certificates.
                    if let Some(acceptor) = &live.tls {
                        acceptor.reconfigure(&new.acceptor);
                    }
                    if let Some(w) = live.watcher.take() {
                        w.abort();
                    }
                    live.watcher = watch_files(old, &new.files);
                    if let Some(s) = live.stapler.take() {
                        s.abort();
                    }
                    // The new plan's stapler is built on the new plan's store; the live
                    // store is the one handshakes read, so staple into that one.
                    live.stapler = new
                        .stapler
                        .clone()
                        .map(|s| s.with_store(old.clone()).spawn());
                }
                live.handle.swap(lp.service);
                continue;
            }
            let Some(listener) = bound.remove(&addr) else {
                continue;
            };
            let live = self.start(listener, lp);
            tracing::info!(%addr, "listening");
            self.listeners.insert(addr, live);
        }
        let gone: Vec<SocketAddr> = self
            .listeners
            .keys()
            .filter(|a| !keep.contains(a))
            .copied()
            .collect();
        for addr in gone {
            if let Some(live) = self.listeners.remove(&addr) {
                tracing::info!(%addr, "listener removed by reload: draining");
                let _ = live.stop.send(true);
                for task in [live.watcher, live.tls_metrics, live.stapler]
                    .into_iter()
                    .flatten()
                {
                    task.abort();
                }
            }
        }
        self.export_certificate_expiry();
        if let Some((addr, listener)) = admin_listener {
            if let Some((_, old)) = self.admin.take() {
                let _ = old.stop.send(true);
            }
            self.admin = self.start_admin(addr, listener);
        }
        if let Some(m) = &self.shared.metrics {
            m.register_upstream_stats(upstream_stats(plan.groups));
        }
        for task in self.acme.drain(..) {
            task.abort();
        }
        self.acme = plan.acme.iter().map(|m| m.spawn()).collect();
        // Groups that follow DNS: those of the new config are kept (unchanged ones are
        // the same groups, still resolving); the others' resolution stops here.
        self.shared.set_dns_groups(plan.dns);
        Ok(())
    }

    /// Each certificate's expiry as a metric (and the 14-day warning is the store's).
    fn export_certificate_expiry(&self) {
        let Some(m) = &self.shared.metrics else {
            return;
        };
        m.clear_certificate_expiry();
        for store in self.listeners.values().filter_map(|l| l.certs.as_ref()) {
            for c in store.certificates() {
                let name = c.names.first().cloned().unwrap_or_else(|| c.id.to_string());
                m.set_certificate_expiry(&name, c.not_after);
            }
        }
    }

    fn start(&self, listener: TcpListener, lp: ListenerPlan) -> Live {
        let (svc, handle) = Reloadable::new(lp.service);
        let (stop, stopped) = watch::channel(false);
        let t = lp.send_timeout;
        let name = lp.listen.addr.to_string();
        let certs = lp.tls.as_ref().map(|t| t.store.clone());
        let watcher = lp
            .tls
            .as_ref()
            .and_then(|t| watch_files(&t.store, &t.files));
        let stapler = lp
            .tls
            .as_ref()
            .and_then(|t| t.stapler.clone())
            .map(|s| s.spawn());
        let tls = lp.tls.map(|t| t.acceptor);
        let live_tls = tls.clone();
        let tls_metrics = match (&tls, &self.shared.metrics) {
            (Some(a), Some(m)) => Some(export_handshakes(a.stats().clone(), m.clone())),
            _ => None,
        };
        let task = match (tls, lp.proxy_protocol) {
            (None, None) => self.serve(
                listener,
                SendTimeoutAccept::new(Plain, t),
                Scheme::Http,
                lp.http,
                svc,
                stopped,
                name,
            ),
            (Some(tls), None) => self.serve(
                listener,
                SendTimeoutAccept::new(tls, t),
                Scheme::Https,
                lp.http,
                svc,
                stopped,
                name,
            ),
            (None, Some(pp)) => self.serve(
                listener,
                SendTimeoutAccept::new(ProxyProtocol::new(Plain, pp), t),
                Scheme::Http,
                lp.http,
                svc,
                stopped,
                name,
            ),
            (Some(tls), Some(pp)) => self.serve(
                listener,
                SendTimeoutAccept::new(ProxyProtocol::new(tls, pp), t),
                Scheme::Https,
                lp.http,
                svc,
                stopped,
                name,
            ),
        };
        Live {
            handle,
            stop,
            task,
            tls: live_tls,
            certs,
            watcher,
            tls_metrics,
            stapler,
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn serve<A: Accept>(
        &self,
        listener: TcpListener,
        acceptor: A,
        scheme: Scheme,
        http: HttpConfig,
        svc: Reloadable<LocationService>,
        stopped: watch::Receiver<bool>,
        name: String,
    ) -> JoinHandle<std::io::Result<()>> {
        let server = Server::new(listener)
            .with_acceptor(acceptor, scheme)
            .config(http);
        if let Some(m) = &self.shared.metrics {
            m.register_server(name, server.stats());
        }
        tokio::spawn(server.serve(svc, wait_stop(stopped)))
    }

    fn start_admin(&self, addr: SocketAddr, listener: TcpListener) -> Option<(SocketAddr, Live)> {
        let metrics = self.shared.metrics.clone()?;
        let admin = AdminService::new(metrics, self.readiness.clone());
        let svc = LocationService::new(admin);
        let (svc, handle) = Reloadable::new(svc);
        let (stop, stopped) = watch::channel(false);
        let task = tokio::spawn(Server::new(listener).serve(svc, wait_stop(stopped)));
        tracing::info!(%addr, "admin listener (metrics, /healthz, /readyz)");
        Some((
            addr,
            Live {
                handle,
                stop,
                task,
                tls: None,
                certs: None,
                watcher: None,
                tls_metrics: None,
                stapler: None,
            },
        ))
    }

    async fn reload(&mut self, origin: &Origin) {
        let Origin::File(path) = origin else {
            tracing::warn!(
                "reload requested, but the config did not come from a file: nothing to re-read"
            );
            return;
        };
        tracing::info!(file = %path.display(), "reloading config");
        let loaded = match Source::read(path) {
            Ok(source) => config::load(&source, &mut self.shared).await,
            Err(errs) => Err(errs),
        };
        let result = loaded
            .map_err(|errs| {
                for e in &errs {
                    tracing::error!("{e}");
                }
            })
            .and_then(|plan| {
                self.apply(plan)
                    .map_err(|e| tracing::error!(error = %e, "reload failed"))
            });
        let ok = result.is_ok();
        if ok {
            tracing::info!("config reloaded");
        } else {
            tracing::error!("reload refused: the previous config keeps serving");
        }
        if let Some(m) = &self.shared.metrics {
            m.record_reload(ok);
        }
    }

    async fn reopen_logs(&self) {
        for w in self.shared.log_writers() {
            if let Err(e) = w.reopen().await {
                tracing::error!(error = %e, "cannot reopen an access log");
            }
        }
        tracing::info!("access logs reopened");
    }

    async fn stop_all(mut self) {
        for live in self.listeners.values() {
            let _ = live.stop.send(true);
        }
        for (addr, live) in self.listeners.drain() {
            match live.task.await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => tracing::warn!(%addr, error = %e, "listener ended with an error"),
                Err(e) => tracing::warn!(%addr, error = %e, "listener task failed"),
            }
        }
        if let Some((_, admin)) = self.admin.take() {
            let _ = admin.stop.send(true);
            let _ = admin.task.await;
        }
        for w in self.shared.log_writers() {
            let _ = w.flush().await;
        }
    }
}

fn bind_admin(addr: SocketAddr) -> std::io::Result<TcpListener> {
    proxy_core::server::ListenConfig::new(addr)
        .bind()
        .map_err(|e| std::io::Error::new(e.kind(), format!("cannot listen on {addr} (admin): {e}")))
}

/// Per-server health and in-flight counts of every group, read at scrape time.
fn upstream_stats(
    groups: Vec<Arc<Group>>,
) -> Box<dyn Fn() -> Vec<UpstreamServerStat> + Send + Sync> {
    Box::new(move || {
        groups
            .iter()
            .flat_map(|g| {
                let name: Arc<str> = Arc::from(g.name());
                g.stats()
                    .map(|s| UpstreamServerStat {
                        upstream: name.clone(),
                        server: s.addr,
                        healthy: s.state == ServerState::Up,
                        in_flight: u64::from(s.in_flight),
                    })
                    .collect::<Vec<_>>()
            })
            .collect()
    })
}

async fn wait_stop(mut rx: watch::Receiver<bool>) {
    let _ = rx.wait_for(|stop| *stop).await;
}

enum Signal {
    Reload,
    Reopen,
    Stop,
}

/// SIGHUP (reload), SIGUSR1 (reopen logs), SIGTERM (systemd, Kubernetes) and SIGINT.
struct Signals {
    #[cfg(unix)]
    hup: tokio::signal::unix::Signal,
    #[cfg(unix)]
    usr1: tokio::signal::unix::Signal,
    #[cfg(unix)]
    term: tokio::signal::unix::Signal,
}

impl Signals {
    fn new() -> std::io::Result<Self> {
        #[cfg(unix)]
        {
            use tokio::signal::unix::{signal, SignalKind};
            Ok(Signals {
                hup: signal(SignalKind::hangup())?,
                usr1: signal(SignalKind::user_defined1())?,
                term: signal(SignalKind::terminate())?,
            })
        }
        #[cfg(not(unix))]
        Ok(Signals {})
    }

    async fn next(&mut self) -> Signal {
        #[cfg(unix)]
        {
            tokio::select! {
                _ = self.hup.recv() => Signal::Reload,
                _ = self.usr1.recv() => Signal::Reopen,
                _ = self.term.recv() => Signal::Stop,
                _ = tokio::signal::ctrl_c() => Signal::Stop,
            }
        }
        #[cfg(not(unix))]
        {
            let _ = tokio::signal::ctrl_c().await;
            Signal::Stop
        }
    }
}

/// The pid file, removed when the process ends normally.
struct PidFile(PathBuf);

impl PidFile {
    fn write(path: PathBuf) -> std::io::Result<Self> {
        std::fs::write(&path, format!("{}\n", std::process::id())).map_err(|e| {
            std::io::Error::new(
                e.kind(),
                format!("cannot write pid file {}: {e}", path.display()),
            )
        })?;
        Ok(PidFile(path))
    }
}

impl Drop for PidFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}
