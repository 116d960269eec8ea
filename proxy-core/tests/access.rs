//! AccessLayer over real sockets: the server puts the socket peer in ClientInfo, the
//! layer decides on it, a raw TCP client reads the answer.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests may unwrap

use std::convert::Infallible;
use std::net::SocketAddr;
use std::time::Duration;

use proxy_core::access::{AccessLayer, AccessRules};
use proxy_core::body::{ProxyBody, Request, Response};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tower::{service_fn, Layer, Service};

mod support;
use support::serve;

async fn raw_get(addr: SocketAddr, path: &str) -> String {
    let mut s = TcpStream::connect(addr).await.unwrap();
    let req = format!("GET {path} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n");
    s.write_all(req.as_bytes()).await.unwrap();
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut out))
        .await
        .unwrap()
        .unwrap();
    String::from_utf8_lossy(&out).into_owned()
}

fn app(
) -> impl Service<Request, Response = Response, Error = Infallible, Future: Send> + Clone + Send {
    service_fn(|_req: Request| async { Ok::<_, Infallible>(Response::new(ProxyBody::from("APP"))) })
}

#[tokio::test]
async fn deny_gives_403_and_never_reaches_the_app() {
    // location ~* \.(env|git|svn|config)$ { deny all; }
    let deny_all = AccessLayer::new(AccessRules::builder().deny_all().build()).layer(app());
    let addr = serve(deny_all).await;
    let resp = raw_get(addr, "/.env").await;
    assert!(resp.starts_with("HTTP/1.1 403 Forbidden\r\n"), "{resp}");
    assert!(!resp.contains("APP"), "{resp}");
}

#[tokio::test]
async fn loopback_client_is_matched_by_cidr() {
    let deny_loopback = AccessLayer::new(
        AccessRules::builder()
            .deny("127.0.0.0/8".parse().unwrap())
            .allow_all()
            .build(),
    )
    .layer(app());
    let addr = serve(deny_loopback).await;
    let resp = raw_get(addr, "/").await;
    assert!(resp.starts_with("HTTP/1.1 403"), "{resp}");

    let allow_loopback = AccessLayer::new(
        AccessRules::builder()
            .allow("127.0.0.1/32".parse().unwrap())
            .deny_all()
            .build(),
    )
    .layer(app());
    let addr = serve(allow_loopback).await;
    let resp = raw_get(addr, "/").await;
    assert!(resp.starts_with("HTTP/1.1 200"), "{resp}");
    assert!(resp.ends_with("APP"), "{resp}");
}
