//! Running a plan: the runtime, the listeners, reloads and signals.
//!
//! Every listener serves a [`Reloadable`] router. SIGHUP re-reads the config file: when it
//! is valid, each listener's router is swapped atomically (requests in flight finish on
//! the old one), new listen addresses start and vanished ones drain; when it is invalid,
//! the errors are logged with file, line and key and the old config keeps serving.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;

use proxy_core::reload::{ReloadHandle, Reloadable};
use proxy_core::router::Router;
use proxy_core::server::Server;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::config::{self, ListenerPlan, Plan, Source};

/// Where the running config came from, so a reload can read it again.
#[derive(Debug, Clone)]
pub enum Origin {
    /// A file: SIGHUP re-reads it.
    File(PathBuf),
    /// The embedded default or the command line: nothing to re-read.
    Fixed,
}

/// Build the runtime, bind every listener (all before serving, so a bad address fails
/// the start), serve until SIGTERM or SIGINT, then drain. A second signal exits at once.
pub fn run(plan: Plan, origin: Origin, pid_file: Option<PathBuf>) -> std::io::Result<()> {
    let mut rt = tokio::runtime::Builder::new_multi_thread();
    if let Some(n) = plan.workers {
        rt.worker_threads(n);
    }
    let rt = rt.enable_all().build()?;
    let _pid = match pid_file {
        Some(path) => Some(PidFile::write(path)?),
        None => None,
    };
    rt.block_on(async move {
        let mut running = Running::default();
        running.apply(plan.listeners, plan.shutdown_timeout)?;
        let mut signals = Signals::new()?;
        while let Signal::Reload = signals.next().await {
            running.reload(&origin);
        }
        tracing::info!(deadline = ?running.shutdown_timeout, "shutting down: draining in-flight requests");
        tokio::select! {
            () = running.stop_all() => tracing::info!("stopped"),
            _ = signals.next() => tracing::warn!("second signal: stopping now"),
        }
        Ok(())
    })
}

/// One serving listener.
struct Live {
    handle: ReloadHandle<Router>,
    stop: watch::Sender<bool>,
    task: JoinHandle<std::io::Result<()>>,
}

#[derive(Default)]
struct Running {
    listeners: HashMap<SocketAddr, Live>,
    shutdown_timeout: std::time::Duration,
}

impl Running {
    /// Make the running listeners match `plans`: swap routers of kept addresses, start
    /// new ones, drain removed ones. Binding happens before anything is changed, so a
    /// reload that cannot bind changes nothing.
    fn apply(
        &mut self,
        plans: Vec<ListenerPlan>,
        shutdown_timeout: std::time::Duration,
    ) -> std::io::Result<()> {
        let mut bound = Vec::new();
        for p in &plans {
            if !self.listeners.contains_key(&p.listen.addr) {
                let l = p.listen.bind().map_err(|e| {
                    std::io::Error::new(
                        e.kind(),
                        format!("cannot listen on {}: {e}", p.listen.addr),
                    )
                })?;
                bound.push((p.listen.addr, l));
            }
        }
        self.shutdown_timeout = shutdown_timeout;
        let keep: Vec<SocketAddr> = plans.iter().map(|p| p.listen.addr).collect();
        for plan in plans {
            let addr = plan.listen.addr;
            if let Some(live) = self.listeners.get(&addr) {
                live.handle.swap(plan.router);
                continue;
            }
            let Some(pos) = bound.iter().position(|(a, _)| *a == addr) else {
                continue;
            };
            let (_, listener) = bound.swap_remove(pos);
            let (svc, handle) = Reloadable::new(plan.router);
            let (stop, stopped) = watch::channel(false);
            let server = Server::new(listener).config(plan.http);
            let task = tokio::spawn(server.serve(svc, wait_stop(stopped)));
            tracing::info!(%addr, "listening");
            self.listeners.insert(addr, Live { handle, stop, task });
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
            }
        }
        Ok(())
    }

    fn reload(&mut self, origin: &Origin) {
        let Origin::File(path) = origin else {
            tracing::warn!(
                "reload requested, but the config did not come from a file: nothing to re-read"
            );
            return;
        };
        tracing::info!(file = %path.display(), "reloading config");
        let source = match Source::read(path) {
            Ok(s) => s,
            Err(errs) => return log_errors(&errs),
        };
        let plan = match config::load(&source) {
            Ok(p) => p,
            Err(errs) => return log_errors(&errs),
        };
        match self.apply(plan.listeners, plan.shutdown_timeout) {
            Ok(()) => tracing::info!("config reloaded"),
            Err(e) => {
                tracing::error!(error = %e, "reload failed: the previous config keeps serving")
            }
        }
    }

    async fn stop_all(self) {
        for live in self.listeners.values() {
            let _ = live.stop.send(true);
        }
        for (addr, live) in self.listeners {
            match live.task.await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => tracing::warn!(%addr, error = %e, "listener ended with an error"),
                Err(e) => tracing::warn!(%addr, error = %e, "listener task failed"),
            }
        }
    }
}

fn log_errors(errs: &[config::Diagnostic]) {
    for e in errs {
        tracing::error!("{e}");
    }
    tracing::error!("reload refused: the previous config keeps serving");
}

async fn wait_stop(mut rx: watch::Receiver<bool>) {
    let _ = rx.wait_for(|stop| *stop).await;
}

enum Signal {
    Reload,
    Stop,
}

/// SIGHUP (reload), SIGTERM (systemd, Kubernetes) and SIGINT (Ctrl-C).
struct Signals {
    #[cfg(unix)]
    hup: tokio::signal::unix::Signal,
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
