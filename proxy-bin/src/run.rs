//! Running a plan: the runtime, the listeners, and the signals.

use proxy_core::server::Server;
use tokio::sync::watch;

use crate::config::Plan;

/// Build the runtime, bind every listener (all before serving, so a bad address fails
/// the start), serve until SIGTERM or SIGINT, then drain. A second signal exits at once.
pub fn run(plan: Plan) -> std::io::Result<()> {
    let mut rt = tokio::runtime::Builder::new_multi_thread();
    if let Some(n) = plan.workers {
        rt.worker_threads(n);
    }
    let rt = rt.enable_all().build()?;
    rt.block_on(serve(plan))
}

async fn serve(plan: Plan) -> std::io::Result<()> {
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut servers = Vec::new();
    for l in plan.listeners {
        let listener = l.listen.bind().map_err(|e| {
            std::io::Error::new(e.kind(), format!("cannot listen on {}: {e}", l.listen.addr))
        })?;
        tracing::info!(addr = %l.listen.addr, "listening");
        let server = Server::new(listener).config(l.http);
        servers.push(tokio::spawn(
            server.serve(l.router, stopped(stop_rx.clone())),
        ));
    }
    shutdown_signal().await;
    tracing::info!(deadline = ?plan.shutdown_timeout, "shutting down: draining in-flight requests");
    let _ = stop_tx.send(true);
    let drain = async {
        for s in servers {
            match s.await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => tracing::warn!(error = %e, "listener ended with an error"),
                Err(e) => tracing::warn!(error = %e, "listener task failed"),
            }
        }
    };
    tokio::select! {
        () = drain => tracing::info!("stopped"),
        () = shutdown_signal() => tracing::warn!("second signal: stopping now"),
    }
    Ok(())
}

async fn stopped(mut rx: watch::Receiver<bool>) {
    let _ = rx.wait_for(|stop| *stop).await;
}

/// SIGTERM (systemd, Kubernetes) or SIGINT (Ctrl-C).
async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = tokio::signal::ctrl_c() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}
