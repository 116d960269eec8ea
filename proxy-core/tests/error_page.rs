//! Error pages over real sockets: a client → a hyper server running
//! `ErrorPageLayer(Forward)` → a real upstream (or none at all).

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests may unwrap

use std::convert::Infallible;
use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use proxy_core::error_page::{ErrorPageLayer, ErrorPages, Page};
use proxy_core::upstream::{ClientConfig, Forward, UpstreamClient};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tower::Layer;

mod support;
use support::serve;

const MAINTENANCE: &str = "<html><body>Down for maintenance</body></html>";

/// An upstream app: `/busy` is its own 503 with a JSON body, anything else 200.
async fn upstream() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(|req: http::Request<Incoming>| async move {
                    let resp = if req.uri().path() == "/busy" {
                        http::Response::builder()
                            .status(503)
                            .header("content-type", "application/json")
                            .body(Full::new(Bytes::from_static(b"{\"detail\":\"busy\"}")))
                    } else {
                        http::Response::builder().body(Full::new(Bytes::from_static(b"app")))
                    };
                    Ok::<_, Infallible>(resp.unwrap())
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    addr
}

/// A 127.0.0.1 port nothing listens on.
async fn closed_port() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    drop(l);
    addr
}

async fn raw_get(addr: SocketAddr, path: &str) -> String {
    let mut s = TcpStream::connect(addr).await.unwrap();
    let req = format!("GET {path} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n");
    s.write_all(req.as_bytes()).await.unwrap();
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut out))
        .await
        .unwrap()
        .unwrap();
    String::from_utf8_lossy(&out).into_owned()
}

fn pages(dir: &tempfile::TempDir) -> ErrorPages {
    let file = dir.path().join("maintenance.html");
    std::fs::write(&file, MAINTENANCE).unwrap();
    ErrorPages::new()
        .page([502, 503, 504], Page::from_file(&file).unwrap())
        .unwrap()
}

#[tokio::test]
async fn maintenance_page_when_upstream_is_down() {
    let dir = tempfile::tempdir().unwrap();
    let client = UpstreamClient::new(ClientConfig::default());
    let forward = Forward::new(client, closed_port().await);
    let addr = serve(ErrorPageLayer::new(pages(&dir)).layer(forward)).await;

    let resp = raw_get(addr, "/anything").await;
    assert!(resp.starts_with("HTTP/1.1 502 Bad Gateway\r\n"), "{resp}");
    let lower = resp.to_ascii_lowercase();
    assert!(
        lower.contains("content-type: text/html; charset=utf-8\r\n"),
        "{resp}"
    );
    assert!(
        lower.contains(&format!("content-length: {}\r\n", MAINTENANCE.len())),
        "{resp}"
    );
    assert!(resp.ends_with(MAINTENANCE), "{resp}");
}

#[tokio::test]
async fn upstream_answers_pass_through_unless_intercepted() {
    let dir = tempfile::tempdir().unwrap();
    let up = upstream().await;
    let client = UpstreamClient::new(ClientConfig::default());

    let addr =
        serve(ErrorPageLayer::new(pages(&dir)).layer(Forward::new(client.clone(), up))).await;
    let resp = raw_get(addr, "/").await;
    assert!(resp.starts_with("HTTP/1.1 200"), "{resp}");
    assert!(resp.ends_with("app"), "{resp}");
    // The app's own 503 reaches the client as the app wrote it.
    let resp = raw_get(addr, "/busy").await;
    assert!(resp.starts_with("HTTP/1.1 503"), "{resp}");
    assert!(resp.ends_with("{\"detail\":\"busy\"}"), "{resp}");

    // proxy_intercept_errors on: the page replaces it.
    let intercepting = ErrorPageLayer::new(pages(&dir).intercept_upstream(true));
    let addr = serve(intercepting.layer(Forward::new(client, up))).await;
    let resp = raw_get(addr, "/busy").await;
    assert!(resp.starts_with("HTTP/1.1 503"), "{resp}");
    assert!(resp.ends_with(MAINTENANCE), "{resp}");
}
