//! The plain-HTTP listener with real sockets: 301 to HTTPS keeping host and URI, the
//! ACME webroot path served over plain HTTP, and the same stack over TLS passing
//! through with HSTS.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::time::Duration;

use hyper_util::rt::TokioIo;
use proxy_core::server::Plain;
use proxy_tls::challenge::AcmeChallengeLayer;
use proxy_tls::hsts::HstsLayer;
use proxy_tls::redirect::HttpsRedirectLayer;
use proxy_tls::{CertStore, TlsAcceptor};
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tower::ServiceBuilder;

/// Both listeners' stack: challenges, then redirect-if-plain, then HSTS, then the app.
fn stack(
    webroot: &std::path::Path,
) -> impl tower::Service<
    proxy_core::Request,
    Response = proxy_core::Response,
    Error = std::convert::Infallible,
    Future: Send,
> + Clone
       + Send
       + Sync
       + 'static {
    ServiceBuilder::new()
        .layer(AcmeChallengeLayer::new().webroot(webroot))
        .layer(HttpsRedirectLayer::new().https_port(8443))
        .layer(HstsLayer::new(Duration::from_secs(31_536_000)).include_subdomains(true))
        .service(app())
}

async fn raw(addr: std::net::SocketAddr, request: &str) -> String {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(request.as_bytes()).await.unwrap();
    let mut got = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut got))
        .await
        .expect("the server answers and closes")
        .unwrap();
    String::from_utf8(got).unwrap()
}

#[tokio::test]
async fn plain_listener_redirects_and_serves_the_webroot() {
    let root = tempfile::tempdir().unwrap();
    let challenge_dir = root.path().join(".well-known/acme-challenge");
    std::fs::create_dir_all(&challenge_dir).unwrap();
    std::fs::write(challenge_dir.join("Tok-en_42"), "Tok-en_42.thumb").unwrap();
    let addr = serve(Plain, stack(root.path())).await;

    let resp = raw(
        addr,
        "GET /a/b%20c?x=1&y=2 HTTP/1.1\r\nHost: Example.test:8080\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(
        resp.starts_with("HTTP/1.1 301 Moved Permanently\r\n"),
        "{resp}"
    );
    assert!(
        resp.to_ascii_lowercase()
            .contains("\r\nlocation: https://example.test:8443/a/b%20c?x=1&y=2\r\n"),
        "{resp}"
    );
    // No HSTS over plain HTTP.
    assert!(
        !resp
            .to_ascii_lowercase()
            .contains("strict-transport-security"),
        "{resp}"
    );

    let resp = raw(
        addr,
        "GET /.well-known/acme-challenge/Tok-en_42 HTTP/1.1\r\nHost: example.test\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(resp.starts_with("HTTP/1.1 200 OK\r\n"), "{resp}");
    assert!(resp.ends_with("\r\n\r\nTok-en_42.thumb"), "{resp}");

    let resp = raw(addr, "GET / HTTP/1.0\r\n\r\n").await;
    assert!(
        resp.starts_with("HTTP/1.0 400") || resp.starts_with("HTTP/1.1 400"),
        "{resp}"
    );
}

#[tokio::test]
async fn the_same_stack_over_tls_passes_through_with_hsts() {
    let root = tempfile::tempdir().unwrap();
    let ca = TestCa::new();
    let store = CertStore::new();
    store.insert("a", ca.loaded(&["a.test"]));
    let addr = serve(
        TlsAcceptor::builder(store).build().unwrap(),
        stack(root.path()),
    )
    .await;
    let tls = connect(
        addr,
        ca.client_config(&[b"http/1.1"]),
        Some("a.test"),
        "a.test",
    )
    .await
    .unwrap();
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
        .await
        .unwrap();
    tokio::spawn(conn);
    let req = http::Request::get("/x")
        .header("host", "a.test")
        .body(http_body_util::Empty::<bytes::Bytes>::new())
        .unwrap();
    let resp = sender.send_request(req).await.unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(
        resp.headers()["strict-transport-security"],
        "max-age=31536000; includeSubDomains"
    );
}
