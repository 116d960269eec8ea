//! The FastAPI deployment as a program: HTTPS with a development certificate, HTTP →
//! HTTPS redirect, `/static/` from disk, `/ws/` WebSockets, a rate-limited
//! `/auth/token`, and `least_conn` over two uvicorn processes. The deployment itself is
//! `examples::fastapi::Deployment`, which the end-to-end test runs too.
//!
//! ```sh
//! cd examples/fastapi
//! ../../.venv/bin/uvicorn app:app --port 8001 --proxy-headers --forwarded-allow-ips=127.0.0.1 &
//! ../../.venv/bin/uvicorn app:app --port 8002 --proxy-headers --forwarded-allow-ips=127.0.0.1 &
//! cd ../..
//! cargo run -p examples --example fastapi_proxy -- --help
//! cargo run -p examples --example fastapi_proxy
//! ```

use examples::fastapi::{Certificate, Deployment};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();

    let deployment =
        match Deployment::from_args(std::env::args().skip(1), |k| std::env::var(k).ok()) {
            Ok(d) => d,
            Err(e) => {
                eprintln!("{e}");
                std::process::exit(2);
            }
        };
    let self_signed = deployment.certificate == Certificate::SelfSigned;
    let upstreams = deployment.upstreams.clone();
    let bound = deployment.bind()?;

    println!("https://{}", bound.https_addr());
    println!("http://{} (redirects to HTTPS)", bound.http_addr());
    println!(
        "upstreams (least_conn): {}",
        upstreams
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join(", ")
    );
    if self_signed {
        if let Some(pem) = bound.dev_certificate_pem() {
            let path = std::env::temp_dir().join("fastapi_proxy-localhost.pem");
            std::fs::write(&path, pem)?;
            println!(
                "self-signed certificate: curl --cacert {} https://localhost:{}/whoami",
                path.display(),
                bound.https_addr().port()
            );
        }
    }

    bound.serve(shutdown_signal()).await?;
    Ok(())
}

/// Ctrl-C or SIGTERM.
async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {}
        () = term => {}
    }
    tracing::info!("stopping: finishing in-flight requests");
}
