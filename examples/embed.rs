//! Embedding proxy-core in your own program: a server on 127.0.0.1:8080 that proxies
//! `/api/` to 127.0.0.1:8000, refuses scanner paths with 444, and answers `/healthz`.
//!
//! Run: `cargo run -p examples --example embed`

use http::StatusCode;
use proxy_core::router::{Location, Pattern, Return, Router, ServerName, VirtualServer};
use proxy_core::server::{ListenConfig, Server};
use proxy_core::upstream::{ClientConfig, Forward, UpstreamClient};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    tracing_subscriber::fmt::init();
    let client = UpstreamClient::new(ClientConfig::default());
    let app = Forward::new(client, "127.0.0.1:8000".parse()?);
    let router = Router::builder()
        .server(
            VirtualServer::new(ServerName::parse("localhost"))
                .location(Location::new(Pattern::parse("/").ok_or("pattern")?, app))
                .location(Location::new(
                    Pattern::parse("= /healthz").ok_or("pattern")?,
                    Return::new(StatusCode::OK).body("ok\n"),
                ))
                .location(Location::new(
                    Pattern::parse("~* /(wp-login|wp-admin|xmlrpc)").ok_or("pattern")?,
                    Return::close(),
                )),
        )
        .build()?;
    let listener = ListenConfig::new("127.0.0.1:8080".parse()?).bind()?;
    tracing::info!("listening on http://127.0.0.1:8080");
    Server::new(listener)
        .serve(router, async {
            let _ = tokio::signal::ctrl_c().await;
        })
        .await?;
    Ok(())
}
