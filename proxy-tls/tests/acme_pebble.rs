//! End to end against Pebble, the ACME test server (Debian package `pebble`): obtain a
//! certificate with HTTP-01 answered by our plain listener, store it, serve it to a
//! client that trusts Pebble's root, then renew and hot-swap it.
//!
//! Pebble must be installed (`apt-get install -y pebble`); without it this test fails
//! with a message saying so, it does not skip.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::net::SocketAddr;
use std::process::Stdio;
use std::time::Duration;

use http_body_util::BodyExt;
use hyper_util::rt::TokioIo;
use proxy_core::server::Plain;
use proxy_tls::acme::AcmeManager;
use proxy_tls::challenge::{AcmeChallengeLayer, ChallengeStore};
use proxy_tls::redirect::HttpsRedirectLayer;
use proxy_tls::{CertStore, TlsAcceptor};
use support::*;
use tokio::net::TcpStream;
use tower::Layer;

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

struct Pebble {
    _child: tokio::process::Child,
    dir_url: String,
    mgmt: SocketAddr,
}

/// Start Pebble on loopback with its API certificate from `ca`, validating HTTP-01 on
/// `http_port`.
async fn start_pebble(ca: &TestCa, dir: &std::path::Path, http_port: u16) -> Pebble {
    let (cert, key) = ca.leaf(&["localhost", "127.0.0.1"]);
    std::fs::write(dir.join("pebble.crt"), cert).unwrap();
    std::fs::write(dir.join("pebble.key"), key).unwrap();
    let (api, mgmt) = (free_port(), free_port());
    let config = format!(
        r#"{{"pebble": {{
            "listenAddress": "127.0.0.1:{api}",
            "managementListenAddress": "127.0.0.1:{mgmt}",
            "certificate": "{crt}",
            "privateKey": "{key}",
            "httpPort": {http_port},
            "tlsPort": {tls_port},
            "ocspResponderURL": "",
            "externalAccountBindingRequired": false
        }}}}"#,
        crt = dir.join("pebble.crt").display(),
        key = dir.join("pebble.key").display(),
        tls_port = free_port(),
    );
    std::fs::write(dir.join("pebble.json"), config).unwrap();
    let child = tokio::process::Command::new("pebble")
        .arg("-config")
        .arg(dir.join("pebble.json"))
        .arg("-strict=false")
        .env("PEBBLE_VA_NOSLEEP", "1")
        .env("PEBBLE_WFE_NONCEREJECT", "0")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn();
    let child = match child {
        Ok(c) => c,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => panic!(
            "pebble is not installed: run `apt-get update && apt-get install -y pebble` (see docs/tls.md)"
        ),
        Err(e) => panic!("cannot start pebble: {e}"),
    };
    let api_addr: SocketAddr = ([127, 0, 0, 1], api).into();
    let mgmt_addr: SocketAddr = ([127, 0, 0, 1], mgmt).into();
    let up = wait_for(Duration::from_secs(10), || async {
        TcpStream::connect(api_addr).await.is_ok() && TcpStream::connect(mgmt_addr).await.is_ok()
    })
    .await;
    assert!(up, "pebble did not start listening on {api_addr}");
    Pebble {
        _child: child,
        dir_url: format!("https://localhost:{api}/dir"),
        mgmt: mgmt_addr,
    }
}

/// Pebble's issuing root, from its management API.
async fn pebble_root(ca: &TestCa, mgmt: SocketAddr) -> Vec<u8> {
    let tls = connect(
        mgmt,
        ca.client_config(&[b"http/1.1"]),
        Some("localhost"),
        "localhost",
    )
    .await
    .unwrap();
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
        .await
        .unwrap();
    tokio::spawn(conn);
    let req = http::Request::get("/roots/0")
        .header("host", "localhost")
        .body(http_body_util::Empty::<bytes::Bytes>::new())
        .unwrap();
    let resp = sender.send_request(req).await.unwrap();
    assert_eq!(resp.status(), 200);
    resp.into_body()
        .collect()
        .await
        .unwrap()
        .to_bytes()
        .to_vec()
}

fn leaf_der(tls: &tokio_rustls::client::TlsStream<TcpStream>) -> Vec<u8> {
    tls.get_ref().1.peer_certificates().unwrap()[0].to_vec()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pebble_issues_a_certificate_that_is_then_served_and_renewed() {
    let ca = TestCa::new();
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("test-ca.pem"), &ca.cert_pem).unwrap();

    // The plain listener: challenges, then the redirect (as in production).
    let challenges = ChallengeStore::new();
    let validations = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let seen = validations.clone();
    let plain = tower::ServiceBuilder::new()
        .map_request(move |req: proxy_core::Request| {
            if req.uri().path().starts_with("/.well-known/acme-challenge/") {
                seen.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            }
            req
        })
        .layer(AcmeChallengeLayer::new().store(challenges.clone()))
        .service(HttpsRedirectLayer::new().layer(app()));
    let http_addr = serve(Plain, plain).await;
    let pebble = start_pebble(&ca, dir.path(), http_addr.port()).await;

    let store = CertStore::new();
    let acme = AcmeManager::builder(pebble.dir_url.clone(), ["localhost"])
        .contact("mailto:ops@example.com")
        .cache_dir(dir.path().join("acme"))
        .root_ca(dir.path().join("test-ca.pem"))
        .poll_timeout(Duration::from_secs(30))
        .build(store.clone(), challenges)
        .unwrap();
    let first = acme.ensure().await.expect("pebble issues a certificate");
    assert_eq!(first.names(), ["localhost"]);
    // Pebble really validated through our plain listener.
    assert!(validations.load(std::sync::atomic::Ordering::SeqCst) >= 1);

    #[cfg(unix)]
    for path in [acme.cert_path(), acme.key_path()] {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600, "{}", path.display());
    }

    // Served to a client that trusts Pebble's root (and nothing else).
    let root = pebble_root(&ca, pebble.mgmt).await;
    let trusting = client_config_for(&root, &[b"h2", b"http/1.1"]);
    let https = serve(TlsAcceptor::builder(store).build().unwrap(), app()).await;
    let tls = connect(https, trusting.clone(), Some("localhost"), "localhost")
        .await
        .expect("the client trusts the ACME certificate");
    assert_eq!(peer_names(&tls), ["localhost"]);
    let served_first = leaf_der(&tls);
    assert_eq!(served_first, first.certified_key().cert[0].to_vec());

    // Renewal: a new certificate is obtained and hot-swapped; the old connection stays.
    let second = acme.obtain().await.expect("pebble renews");
    assert_ne!(
        second.certified_key().cert[0],
        first.certified_key().cert[0]
    );
    let tls2 = connect(https, trusting, Some("localhost"), "localhost")
        .await
        .unwrap();
    assert_eq!(leaf_der(&tls2), second.certified_key().cert[0].to_vec());

    // A restart finds the stored certificate and does not order again.
    let again = AcmeManager::builder("https://127.0.0.1:9/dir", ["localhost"])
        .cache_dir(dir.path().join("acme"))
        .build(CertStore::new(), ChallengeStore::new())
        .unwrap()
        .ensure()
        .await
        .unwrap();
    assert_eq!(
        again.certified_key().cert[0],
        second.certified_key().cert[0]
    );
}
