//! The command line.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use crate::config::{self, Source};
use crate::run::Origin;

/// A reverse proxy for web applications (FastAPI/uvicorn first of all).
#[derive(Debug, Parser)]
#[command(name = "proxy", version, about)]
struct Cli {
    /// Log level or filter (`info`, `debug`, `proxy_core=trace`); RUST_LOG also works.
    #[arg(long, global = true, default_value = "info")]
    log_level: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the proxy. Without -c and without --upstream it uses the embedded default:
    /// listen on 127.0.0.1:8080, forward to 127.0.0.1:8000.
    Run {
        /// The config file.
        #[arg(short, long, conflicts_with_all = ["listen", "upstream"])]
        config: Option<PathBuf>,
        /// One-line form: the address to listen on (with --upstream).
        #[arg(long, requires = "upstream")]
        listen: Option<SocketAddr>,
        /// One-line form: an upstream address; repeat for several.
        #[arg(long)]
        upstream: Vec<SocketAddr>,
        /// Worker threads (default: one per core; overrides the config file).
        #[arg(long)]
        workers: Option<usize>,
        /// Write the process id here (for `proxy reload` and init systems).
        #[arg(long)]
        pid_file: Option<PathBuf>,
    },
    /// Ask a running proxy to reload its config file (sends SIGHUP to the pid in the
    /// pid file). A config with errors is refused by the running proxy, which keeps
    /// serving the old one and logs every error with file, line and key.
    Reload {
        /// The pid file the running proxy was started with.
        #[arg(long)]
        pid_file: PathBuf,
    },
    /// Check a config file and report every error with file, line and key (like `nginx -t`).
    Check {
        /// The config file.
        #[arg(short, long)]
        config: PathBuf,
    },
}

pub fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logs(&cli.log_level);
    match cli.command {
        Command::Check { config } => check(&config),
        Command::Reload { pid_file } => signal_reload(&pid_file),
        Command::Run {
            config,
            listen,
            upstream,
            workers,
            pid_file,
        } => {
            let (source, origin) = match (config, upstream.is_empty()) {
                (Some(path), _) => match Source::read(&path) {
                    Ok(s) => (s, Origin::File(path)),
                    Err(errs) => return report(&errs),
                },
                (None, true) => (Source::default_config(), Origin::Fixed),
                (None, false) => (one_line(listen, &upstream), Origin::Fixed),
            };
            match crate::run::run(source, origin, workers, pid_file) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("proxy: {e}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}

fn check(path: &std::path::Path) -> ExitCode {
    let source = match Source::read(path) {
        Ok(s) => s,
        Err(errs) => return report(&errs),
    };
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("proxy: {e}");
            return ExitCode::FAILURE;
        }
    };
    let loaded = rt.block_on(async { config::load(&source, &mut config::Shared::default()).await });
    match loaded {
        Ok(plan) => {
            println!(
                "{}: ok ({} listener{})",
                path.display(),
                plan.listeners.len(),
                if plan.listeners.len() == 1 { "" } else { "s" }
            );
            ExitCode::SUCCESS
        }
        Err(errs) => report(&errs),
    }
}

fn signal_reload(pid_file: &std::path::Path) -> ExitCode {
    let pid = match std::fs::read_to_string(pid_file) {
        Ok(text) => match text.trim().parse::<u32>() {
            Ok(pid) => pid,
            Err(_) => {
                eprintln!("proxy: {}: not a process id", pid_file.display());
                return ExitCode::FAILURE;
            }
        },
        Err(e) => {
            eprintln!("proxy: cannot read {}: {e}", pid_file.display());
            return ExitCode::FAILURE;
        }
    };
    // The workspace forbids unsafe code, so the signal goes through kill(1).
    match std::process::Command::new("kill")
        .args(["-HUP", &pid.to_string()])
        .status()
    {
        Ok(s) if s.success() => {
            println!("reload signalled to process {pid}");
            ExitCode::SUCCESS
        }
        Ok(_) | Err(_) => {
            eprintln!("proxy: could not signal process {pid}");
            ExitCode::FAILURE
        }
    }
}

fn report(errs: &[config::Diagnostic]) -> ExitCode {
    for e in errs {
        eprintln!("{e}");
    }
    ExitCode::FAILURE
}

/// `proxy run --listen A --upstream B [--upstream C]` as a config text.
fn one_line(listen: Option<SocketAddr>, upstreams: &[SocketAddr]) -> Source {
    let listen = listen.map_or_else(|| "127.0.0.1:8080".to_owned(), |a| a.to_string());
    let servers: Vec<String> = upstreams
        .iter()
        .map(|u| format!("{{ addr = \"{u}\" }}"))
        .collect();
    let text = format!(
        "[upstream.app]\nservers = [{}]\n\n[[server]]\nlisten = [\"{listen}\"]\n\n[[server.location]]\npath = \"/\"\nproxy_pass = \"app\"\n",
        servers.join(", ")
    );
    Source {
        file: PathBuf::from("<command line>"),
        text,
    }
}

fn init_logs(level: &str) {
    tracing_subscriber::fmt()
        .with_env_filter(log_filter(std::env::var("RUST_LOG").ok().as_deref(), level))
        .with_writer(std::io::stderr)
        .init();
}

/// The log filter: RUST_LOG if set and valid, else `--log-level`, else `info`.
///
/// At `info` and quieter, rustls' own warnings are left out unless the filter names
/// rustls: they are about what a peer sent (an IP address as SNI, as wrk and some
/// scanners send, on every connection; a bad record) and would write a line per
/// connection that any client can trigger. nginx logs such client errors at `info`;
/// failed handshakes are still counted and logged at debug by the acceptor.
/// `info,rustls=warn` brings them back.
fn log_filter(env: Option<&str>, level: &str) -> tracing_subscriber::EnvFilter {
    use tracing_subscriber::filter::LevelFilter;
    use tracing_subscriber::EnvFilter;
    let (filter, text) = match env.map(|e| (EnvFilter::try_new(e), e)) {
        Some((Ok(f), e)) => (f, e),
        _ => match EnvFilter::try_new(level) {
            Ok(f) => (f, level),
            Err(_) => (EnvFilter::new("info"), "info"),
        },
    };
    let quiet = filter
        .max_level_hint()
        .is_some_and(|max| max <= LevelFilter::INFO);
    if quiet && !text.contains("rustls") {
        if let Ok(d) = "rustls=error".parse() {
            return filter.add_directive(d);
        }
    }
    filter
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod log_tests {
    use super::log_filter;
    use std::sync::{Arc, Mutex};

    /// What the binary's subscriber would print for a rustls warning and one of ours.
    fn printed(env: Option<&str>, level: &str) -> String {
        let out = Arc::new(Mutex::new(Vec::<u8>::new()));
        let sink = out.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_env_filter(log_filter(env, level))
            .with_ansi(false)
            .with_writer(move || WriteTo(sink.clone()))
            .finish();
        tracing::subscriber::with_default(subscriber, || {
            tracing::warn!(target: "rustls::msgs::handshake", "Illegal SNI extension");
            tracing::warn!(target: "proxy::run", "ours");
            tracing::debug!(target: "rustls::server::hs", "rustls debug");
        });
        let bytes = out.lock().unwrap().clone();
        String::from_utf8(bytes).unwrap()
    }

    struct WriteTo(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for WriteTo {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn rustls_peer_warnings_are_left_out_at_info() {
        let out = printed(None, "info");
        assert!(out.contains("ours"), "{out}");
        assert!(!out.contains("Illegal SNI"), "{out}");
        let out = printed(None, "warn");
        assert!(
            out.contains("ours") && !out.contains("Illegal SNI"),
            "{out}"
        );
        // RUST_LOG wins, with the same rule.
        let out = printed(Some("info"), "debug");
        assert!(
            !out.contains("Illegal SNI") && !out.contains("rustls debug"),
            "{out}"
        );
    }

    #[test]
    fn naming_rustls_or_debugging_shows_them() {
        let out = printed(None, "info,rustls=warn");
        assert!(out.contains("Illegal SNI") && out.contains("ours"), "{out}");
        let out = printed(None, "debug");
        assert!(
            out.contains("Illegal SNI") && out.contains("rustls debug"),
            "{out}"
        );
        let out = printed(Some("rustls=debug"), "info");
        assert!(out.contains("rustls debug"), "{out}");
    }
}
