//! TLS termination with real sockets: SNI, ALPN/HTTP/2 proxied to an HTTP/1.1 upstream,
//! session resumption, reload under a live connection, refusals of bad handshakes.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::convert::Infallible;
use std::time::Duration;

use http_body_util::BodyExt;
use hyper_util::rt::{TokioExecutor, TokioIo};
use proxy_core::client_info::ClientInfo;
use proxy_core::upstream::{ClientConfig, Forward, UpstreamClient};
use proxy_core::{Request, Response};
use proxy_tls::reload::Reloader;
use proxy_tls::{CertStore, TlsAcceptor};
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

fn three_names(ca: &TestCa) -> CertStore {
    let store = CertStore::new();
    store.insert("a", ca.loaded(&["a.test"]));
    store.insert("b", ca.loaded(&["b.test"]));
    store.insert("wild", ca.loaded(&["*.wild.test"]));
    store.set_default("b");
    store
}

#[tokio::test]
async fn sni_picks_the_certificate_and_no_sni_gets_the_default() {
    let ca = TestCa::new();
    let acceptor = TlsAcceptor::builder(three_names(&ca)).build().unwrap();
    let addr = serve(acceptor.clone(), app()).await;
    let cfg = ca.client_config(&[b"http/1.1"]);
    for (sni, want) in [
        ("a.test", "a.test"),
        ("b.test", "b.test"),
        ("x.wild.test", "*.wild.test"),
    ] {
        let tls = connect(addr, cfg.clone(), Some(sni), sni).await.unwrap();
        assert_eq!(peer_names(&tls), [want], "sni {sni}");
    }
    // No SNI: the default certificate (b), verified as b.test.
    let tls = connect(addr, cfg.clone(), None, "b.test").await.unwrap();
    assert_eq!(peer_names(&tls), ["b.test"]);
    // The request sees the SNI and the https scheme through ClientInfo.
    let tls = connect(addr, cfg, Some("a.test"), "a.test").await.unwrap();
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
        .await
        .unwrap();
    tokio::spawn(conn);
    assert_eq!(
        get_h1(&mut sender, "a.test", "/").await.1,
        "sni=a.test scheme=https"
    );
    assert_eq!(acceptor.stats().failures(), 0);
    assert!(acceptor.stats().handshakes() >= 5);
}

/// The stack under test for the proxy path: X-Forwarded-Proto from the connection's
/// scheme (the forwarded-headers layer's job in the full proxy), then Forward.
fn proxy(
    upstream: std::net::SocketAddr,
) -> impl tower::Service<Request, Response = Response, Error = Infallible, Future: Send>
       + Clone
       + Send
       + Sync
       + 'static {
    let forward = Forward::new(UpstreamClient::new(ClientConfig::default()), upstream);
    tower::service_fn(move |mut req: Request| {
        let proto = ClientInfo::of(&req).map_or("http", |c| c.scheme.as_str());
        req.headers_mut()
            .insert("x-forwarded-proto", http::HeaderValue::from_static(proto));
        tower::ServiceExt::oneshot(forward.clone(), req)
    })
}

#[tokio::test]
async fn alpn_h2_streams_are_proxied_to_an_http1_upstream() {
    let ca = TestCa::new();
    let up = upstream().await;
    let acceptor = TlsAcceptor::builder(three_names(&ca)).build().unwrap();
    let addr = serve(acceptor, proxy(up)).await;
    let tls = connect(
        addr,
        ca.client_config(&[b"h2", b"http/1.1"]),
        Some("a.test"),
        "a.test",
    )
    .await
    .unwrap();
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    let (sender, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tls))
            .await
            .unwrap();
    tokio::spawn(conn);
    // Several streams at once on the one connection.
    let mut set = tokio::task::JoinSet::new();
    for i in 0..8 {
        let mut sender = sender.clone();
        set.spawn(async move {
            let req = http::Request::get(format!("https://a.test/s/{i}"))
                .body(http_body_util::Empty::<bytes::Bytes>::new())
                .unwrap();
            let resp = sender.send_request(req).await.unwrap();
            assert_eq!(resp.version(), http::Version::HTTP_2);
            let body = resp.into_body().collect().await.unwrap().to_bytes();
            (i, String::from_utf8(body.to_vec()).unwrap())
        });
    }
    let mut seen = 0;
    while let Some(r) = set.join_next().await {
        let (i, body) = r.unwrap();
        assert_eq!(body, format!("version=HTTP/1.1 proto=https path=/s/{i}"));
        seen += 1;
    }
    assert_eq!(seen, 8);
}

#[tokio::test]
async fn curl_speaks_http2_through_the_acceptor() {
    let ca = TestCa::new();
    let dir = tempfile::tempdir().unwrap();
    let ca_file = dir.path().join("ca.pem");
    std::fs::write(&ca_file, &ca.cert_pem).unwrap();
    let up = upstream().await;
    let addr = serve(
        TlsAcceptor::builder(three_names(&ca)).build().unwrap(),
        proxy(up),
    )
    .await;
    let out = tokio::process::Command::new("curl")
        .args(["-sS", "--http2", "--max-time", "10", "--cacert"])
        .arg(&ca_file)
        .arg("--resolve")
        .arg(format!("x.wild.test:{}:127.0.0.1", addr.port()))
        .args(["-w", " http=%{http_version}"])
        .arg(format!("https://x.wild.test:{}/c", addr.port()))
        .output()
        .await
        .expect("curl is in the base image");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "curl failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(text, "version=HTTP/1.1 proto=https path=/c http=2");
}

#[tokio::test]
async fn sessions_resume_by_ticket_and_by_cache() {
    let ca = TestCa::new();
    for (tickets, tls12) in [(true, false), (false, false), (true, true), (false, true)] {
        let acceptor = TlsAcceptor::builder(three_names(&ca))
            .session_tickets(tickets)
            .build()
            .unwrap();
        let addr = serve(acceptor, app()).await;
        let mut cfg = if tls12 {
            ca.client_config_tls12()
        } else {
            ca.client_config(&[b"http/1.1"])
        };
        cfg.resumption = rustls::client::Resumption::default();
        // One client config: its session cache carries the resumption state.
        let first = connect(addr, cfg.clone(), Some("a.test"), "a.test")
            .await
            .unwrap();
        assert_eq!(
            first.get_ref().1.handshake_kind(),
            Some(rustls::HandshakeKind::Full)
        );
        // TLS 1.3 tickets arrive after the handshake: read until the client has them.
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(first))
            .await
            .unwrap();
        tokio::spawn(conn);
        get_h1(&mut sender, "a.test", "/").await;
        let second = connect(addr, cfg, Some("a.test"), "a.test").await.unwrap();
        assert_eq!(
            second.get_ref().1.handshake_kind(),
            Some(rustls::HandshakeKind::Resumed),
            "tickets={tickets} tls12={tls12}"
        );
    }
}

fn write_pair(dir: &std::path::Path, pair: &(String, String)) {
    std::fs::write(dir.join("site.crt"), &pair.0).unwrap();
    std::fs::write(dir.join("site.key"), &pair.1).unwrap();
}

#[tokio::test]
async fn reload_swaps_the_certificate_under_a_live_connection() {
    let ca = TestCa::new();
    let dir = tempfile::tempdir().unwrap();
    write_pair(dir.path(), &ca.leaf(&["old.test", "site.test"]));
    let store = CertStore::new();
    let reloader = Reloader::new(store.clone()).with_files(
        "site",
        dir.path().join("site.crt"),
        dir.path().join("site.key"),
    );
    reloader.load().unwrap();
    let addr = serve(TlsAcceptor::builder(store).build().unwrap(), app()).await;
    let cfg = ca.client_config(&[b"http/1.1"]);

    // A long-lived keep-alive connection on the old certificate.
    let tls = connect(addr, cfg.clone(), Some("site.test"), "site.test")
        .await
        .unwrap();
    assert_eq!(peer_names(&tls), ["old.test", "site.test"]);
    let (mut live, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
        .await
        .unwrap();
    tokio::spawn(conn);
    assert_eq!(get_h1(&mut live, "site.test", "/").await.0, 200);

    write_pair(dir.path(), &ca.leaf(&["new.test", "site.test"]));
    let report = reloader.reload();
    assert_eq!((report.reloaded, report.failed.len()), (1, 0));
    let tls = connect(addr, cfg.clone(), Some("site.test"), "site.test")
        .await
        .unwrap();
    assert_eq!(peer_names(&tls), ["new.test", "site.test"]);
    // The old connection is untouched and keeps working.
    assert_eq!(get_h1(&mut live, "site.test", "/again").await.0, 200);

    // A broken replacement: the new certificate stays in service.
    std::fs::write(
        dir.path().join("site.crt"),
        "-----BEGIN CERTIFICATE-----\ngarbage\n",
    )
    .unwrap();
    let report = reloader.reload();
    assert_eq!((report.reloaded, report.failed.len()), (0, 1));
    let tls = connect(addr, cfg, Some("site.test"), "site.test")
        .await
        .unwrap();
    assert_eq!(peer_names(&tls), ["new.test", "site.test"]);
    assert_eq!(get_h1(&mut live, "site.test", "/still").await.0, 200);
}

#[tokio::test]
async fn watcher_reloads_a_changed_file() {
    let ca = TestCa::new();
    let dir = tempfile::tempdir().unwrap();
    write_pair(dir.path(), &ca.leaf(&["one.test", "site.test"]));
    let store = CertStore::new();
    let reloader = Reloader::new(store.clone()).with_files(
        "site",
        dir.path().join("site.crt"),
        dir.path().join("site.key"),
    );
    reloader.load().unwrap();
    let watcher = reloader.spawn_watcher(Duration::from_millis(50));
    let addr = serve(TlsAcceptor::builder(store).build().unwrap(), app()).await;
    let cfg = ca.client_config(&[b"http/1.1"]);
    write_pair(dir.path(), &ca.leaf(&["two.test", "site.test"]));
    let swapped = wait_for(Duration::from_secs(5), || {
        let cfg = cfg.clone();
        async move {
            let tls = connect(addr, cfg, Some("site.test"), "site.test")
                .await
                .unwrap();
            peer_names(&tls)[0] == "two.test"
        }
    })
    .await;
    watcher.abort();
    assert!(swapped, "the watcher did not pick up the new certificate");
}

/// Bytes a real client sends first: a TLS 1.2/1.3 ClientHello.
fn client_hello(ca: &TestCa) -> Vec<u8> {
    let mut conn = rustls::ClientConnection::new(
        std::sync::Arc::new(ca.client_config(&[b"h2"])),
        rustls_pki_types::ServerName::try_from("a.test").unwrap(),
    )
    .unwrap();
    let mut out = Vec::new();
    conn.write_tls(&mut out).unwrap();
    out
}

/// A ClientHello that offers only `version` (0x0301 TLS 1.0, 0x0302 TLS 1.1), with
/// their era's suites and no supported_versions extension; with or without a
/// signature_algorithms extension (which TLS 1.0/1.1 clients do not normally send).
fn legacy_client_hello(version: u16, sig_algs: bool) -> Vec<u8> {
    let [hi, lo] = version.to_be_bytes();
    let mut body = vec![hi, lo];
    body.extend_from_slice(&[7u8; 32]); // random
    body.push(0); // session id
    body.extend_from_slice(&[0, 4, 0xc0, 0x13, 0x00, 0x2f]); // ECDHE-RSA-AES128-SHA, AES128-SHA
    body.extend_from_slice(&[1, 0]); // null compression
    if sig_algs {
        // extensions: signature_algorithms = rsa_pkcs1_sha256, ecdsa_secp256r1_sha256
        body.extend_from_slice(&[0, 10, 0x00, 0x0d, 0, 6, 0, 4, 4, 1, 4, 3]);
    }
    let mut hs = vec![1u8, 0, 0, body.len() as u8];
    hs.extend_from_slice(&body);
    let mut rec = vec![0x16, 0x03, 0x01, 0, hs.len() as u8];
    rec.extend_from_slice(&hs);
    rec
}

/// Send `bytes` (then maybe close our write side) and read until the server closes.
async fn refused(addr: std::net::SocketAddr, bytes: &[u8], half_close: bool) -> Vec<u8> {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(bytes).await.unwrap();
    if half_close {
        s.shutdown().await.unwrap();
    }
    let mut got = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut got)).await;
    assert!(read.is_ok(), "server did not close the connection");
    got
}

#[tokio::test]
async fn bad_handshakes_are_refused_counted_and_not_fatal() {
    let ca = TestCa::new();
    let acceptor = TlsAcceptor::builder(three_names(&ca))
        .handshake_timeout(Duration::from_millis(300))
        .build()
        .unwrap();
    let addr = serve(acceptor.clone(), app()).await;

    // Plain HTTP to the TLS port: no HTTP answer, the connection is closed.
    let got = refused(addr, b"GET / HTTP/1.1\r\nHost: a.test\r\n\r\n", false).await;
    assert!(!got.starts_with(b"HTTP/"), "{got:?}");
    // A truncated ClientHello, then EOF.
    let hello = client_hello(&ca);
    refused(addr, &hello[..hello.len() / 2], true).await;
    // TLS 1.0 and 1.1: a fatal alert, never a ServerHello. rustls checks for the
    // signature_algorithms extension before the version: without it the alert is
    // handshake_failure (40), with it protocol_version (70).
    for v in [0x0301, 0x0302] {
        for (sig_algs, alert) in [(false, 40), (true, 70)] {
            let got = refused(addr, &legacy_client_hello(v, sig_algs), false).await;
            assert_eq!(
                got[..],
                [0x15, 0x03, 0x03, 0, 2, 2, alert],
                "version {v:#x}"
            );
        }
    }
    // A client that connects and says nothing: closed after the handshake timeout.
    refused(addr, b"", false).await;

    let counted = wait_for(Duration::from_secs(5), || async {
        acceptor.stats().failures() >= 7
    })
    .await;
    assert!(counted, "failures: {}", acceptor.stats().failures());
    assert!(acceptor.stats().timeouts() >= 1);
    // The listener is unharmed.
    let tls = connect(
        addr,
        ca.client_config(&[b"http/1.1"]),
        Some("a.test"),
        "a.test",
    )
    .await
    .unwrap();
    assert_eq!(peer_names(&tls), ["a.test"]);
}
