//! Protocols, cipher suites, server cipher preference and session timeouts, checked on
//! real handshakes between a rustls client and the acceptor on a loopback listener.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::sync::Arc;
use std::time::Duration;

use hyper_util::rt::TokioIo;
use proxy_tls::policy::{self, Protocol};
use proxy_tls::{CertStore, TlsAcceptor};
use rustls::crypto::ring::cipher_suite as cs;
use rustls::{CipherSuite, ProtocolVersion, SupportedCipherSuite};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::CertificateDer;
use support::*;

/// A client offering exactly `suites`, in this order, over `versions`.
fn client(
    ca: &TestCa,
    suites: Vec<SupportedCipherSuite>,
    versions: &[&'static rustls::SupportedProtocolVersion],
) -> rustls::ClientConfig {
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_slice_iter(ca.cert_pem.as_bytes()) {
        roots.add(c.unwrap()).unwrap();
    }
    let provider = rustls::crypto::CryptoProvider {
        cipher_suites: suites,
        ..rustls::crypto::ring::default_provider()
    };
    let mut cfg = rustls::ClientConfig::builder_with_provider(Arc::new(provider))
        .with_protocol_versions(versions)
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    cfg.resumption = rustls::client::Resumption::disabled();
    cfg
}

fn store(ca: &TestCa) -> CertStore {
    let s = CertStore::new();
    // rcgen's default key is ECDSA P-256: the ECDHE-ECDSA suites apply.
    s.insert("a", ca.loaded(&["a.test"]));
    s
}

fn negotiated(
    tls: &tokio_rustls::client::TlsStream<tokio::net::TcpStream>,
) -> (ProtocolVersion, CipherSuite) {
    let conn = tls.get_ref().1;
    (
        conn.protocol_version().unwrap(),
        conn.negotiated_cipher_suite().unwrap().suite(),
    )
}

#[tokio::test]
async fn the_guides_modern_config_negotiates_what_it_lists() {
    let ca = TestCa::new();
    let protocols = policy::parse_protocols(["TLSv1.2", "TLSv1.3"]).unwrap();
    let suites = policy::parse_ciphers(
        &policy::split_cipher_list("ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-RSA-AES128-GCM-SHA256"),
        &protocols,
    )
    .unwrap();
    let acceptor = TlsAcceptor::builder(store(&ca))
        .protocols(&protocols)
        .cipher_suites(suites)
        .prefer_server_ciphers(true)
        .build()
        .unwrap();
    let addr = serve(acceptor.clone(), app()).await;

    // A TLS 1.3 client: TLS 1.3 suites are untouched by ssl_ciphers (OpenSSL's rule).
    let tls = connect(
        addr,
        ca.client_config(&[b"http/1.1"]),
        Some("a.test"),
        "a.test",
    )
    .await
    .unwrap();
    assert_eq!(negotiated(&tls).0, ProtocolVersion::TLSv1_3);

    // A TLS 1.2 client offering every suite gets the listed ECDSA one.
    let tls = connect(addr, ca.client_config_tls12(), Some("a.test"), "a.test")
        .await
        .unwrap();
    assert_eq!(
        negotiated(&tls),
        (
            ProtocolVersion::TLSv1_2,
            CipherSuite::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256
        )
    );

    // A TLS 1.2 client offering only suites outside the list is refused.
    let refused = client(
        &ca,
        vec![cs::TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384],
        &[&rustls::version::TLS12],
    );
    let before = acceptor.stats().failures();
    assert!(connect(addr, refused, Some("a.test"), "a.test")
        .await
        .is_err());
    assert!(
        wait_for(Duration::from_secs(5), || async {
            acceptor.stats().failures() > before
        })
        .await
    );
}

#[tokio::test]
async fn a_disabled_protocol_fails_the_handshake() {
    let ca = TestCa::new();
    let only13 = TlsAcceptor::builder(store(&ca))
        .protocols(&[Protocol::Tls13])
        .build()
        .unwrap();
    let addr = serve(only13, app()).await;
    assert!(
        connect(addr, ca.client_config_tls12(), Some("a.test"), "a.test")
            .await
            .is_err()
    );
    let tls = connect(
        addr,
        ca.client_config(&[b"http/1.1"]),
        Some("a.test"),
        "a.test",
    )
    .await
    .unwrap();
    assert_eq!(negotiated(&tls).0, ProtocolVersion::TLSv1_3);

    let only12 = TlsAcceptor::builder(store(&ca))
        .protocols(&[Protocol::Tls12])
        .build()
        .unwrap();
    let addr = serve(only12, app()).await;
    let tls13_client = client(
        &ca,
        policy::default_suites(&[Protocol::Tls13]),
        &[&rustls::version::TLS13],
    );
    assert!(connect(addr, tls13_client, Some("a.test"), "a.test")
        .await
        .is_err());
    let tls = connect(
        addr,
        ca.client_config(&[b"http/1.1"]),
        Some("a.test"),
        "a.test",
    )
    .await
    .unwrap();
    assert_eq!(negotiated(&tls).0, ProtocolVersion::TLSv1_2);
}

#[tokio::test]
async fn tls13_suites_can_be_chosen_by_name() {
    let ca = TestCa::new();
    let suites =
        policy::parse_ciphers(&["TLS_CHACHA20_POLY1305_SHA256"], &[Protocol::Tls13]).unwrap();
    let acceptor = TlsAcceptor::builder(store(&ca))
        .protocols(&[Protocol::Tls13])
        .cipher_suites(suites)
        .build()
        .unwrap();
    let addr = serve(acceptor, app()).await;
    let tls = connect(
        addr,
        ca.client_config(&[b"http/1.1"]),
        Some("a.test"),
        "a.test",
    )
    .await
    .unwrap();
    assert_eq!(
        negotiated(&tls).1,
        CipherSuite::TLS13_CHACHA20_POLY1305_SHA256
    );
    let aes_only = client(
        &ca,
        vec![cs::TLS13_AES_128_GCM_SHA256],
        &[&rustls::version::TLS13],
    );
    assert!(connect(addr, aes_only, Some("a.test"), "a.test")
        .await
        .is_err());
}

#[tokio::test]
async fn prefer_server_ciphers_decides_between_client_and_server_order() {
    let ca = TestCa::new();
    let server_order = policy::parse_ciphers(
        &[
            "ECDHE-ECDSA-AES128-GCM-SHA256",
            "ECDHE-ECDSA-AES256-GCM-SHA384",
        ],
        &[Protocol::Tls12],
    )
    .unwrap();
    // The client prefers AES-256; the server list puts AES-128 first.
    let client_order = vec![
        cs::TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384,
        cs::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256,
    ];
    for (prefer, want) in [
        (true, CipherSuite::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256),
        (false, CipherSuite::TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384),
    ] {
        let acceptor = TlsAcceptor::builder(store(&ca))
            .protocols(&[Protocol::Tls12])
            .cipher_suites(server_order.clone())
            .prefer_server_ciphers(prefer)
            .build()
            .unwrap();
        let addr = serve(acceptor, app()).await;
        let cfg = client(&ca, client_order.clone(), &[&rustls::version::TLS12]);
        let tls = connect(addr, cfg, Some("a.test"), "a.test").await.unwrap();
        assert_eq!(negotiated(&tls).1, want, "prefer_server_ciphers={prefer}");
    }
}

#[tokio::test]
async fn sessions_resume_with_a_session_timeout() {
    let ca = TestCa::new();
    for (tickets, tls12) in [(true, false), (false, false), (true, true), (false, true)] {
        let acceptor = TlsAcceptor::builder(store(&ca))
            .session_tickets(tickets)
            .session_timeout(Some(Duration::from_secs(600)))
            .session_cache(40_000)
            .build()
            .unwrap();
        if tickets {
            assert_eq!(acceptor.server_config().ticketer.lifetime(), 600);
        }
        let addr = serve(acceptor, app()).await;
        let mut cfg = if tls12 {
            ca.client_config_tls12()
        } else {
            ca.client_config(&[b"http/1.1"])
        };
        cfg.resumption = rustls::client::Resumption::default();
        let first = connect(addr, cfg.clone(), Some("a.test"), "a.test")
            .await
            .unwrap();
        // TLS 1.3 tickets arrive after the handshake: make a request so the client has them.
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

#[tokio::test]
async fn reconfigure_applies_to_new_handshakes_and_spares_open_connections() {
    let ca = TestCa::new();
    let certs = store(&ca);
    let acceptor = TlsAcceptor::builder(certs.clone()).build().unwrap();
    // The server holds a clone, as a listener does.
    let addr = serve(acceptor.clone(), app()).await;

    // Before: TLS 1.2 is served; this connection stays open across the change.
    let tls12 = connect(addr, ca.client_config_tls12(), Some("a.test"), "a.test")
        .await
        .unwrap();
    assert_eq!(negotiated(&tls12).0, ProtocolVersion::TLSv1_2);
    let (mut open, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls12))
        .await
        .unwrap();
    tokio::spawn(conn);
    assert_eq!(get_h1(&mut open, "a.test", "/").await.0, 200);

    // A TLS 1.3 client that keeps its tickets.
    let mut resuming = ca.client_config(&[b"h2", b"http/1.1"]);
    resuming.resumption = rustls::client::Resumption::in_memory_sessions(8);
    let first = connect(addr, resuming.clone(), Some("a.test"), "a.test")
        .await
        .unwrap();
    assert_eq!(first.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    // TLS 1.3 tickets arrive after the handshake: a request makes the client read them.
    let (mut h2, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        TokioIo::new(first),
    )
    .await
    .unwrap();
    tokio::spawn(conn);
    let req = http::Request::get("https://a.test/")
        .body(http_body_util::Empty::<bytes::Bytes>::new())
        .unwrap();
    assert_eq!(h2.send_request(req).await.unwrap().status(), 200);

    // The reload's new settings, built on a store of their own (empty here): TLS 1.3
    // only, no HTTP/2, same session settings.
    let new = TlsAcceptor::builder(CertStore::new())
        .protocols(&[Protocol::Tls13])
        .http2(false)
        .build()
        .unwrap();
    acceptor.reconfigure(&new);

    // New handshakes: TLS 1.2 refused, TLS 1.3 served with the acceptor's own
    // certificates, ALPN without h2.
    assert!(
        connect(addr, ca.client_config_tls12(), Some("a.test"), "a.test")
            .await
            .is_err()
    );
    let tls13 = connect(
        addr,
        ca.client_config(&[b"h2", b"http/1.1"]),
        Some("a.test"),
        "a.test",
    )
    .await
    .unwrap();
    assert_eq!(negotiated(&tls13).0, ProtocolVersion::TLSv1_3);
    assert_eq!(tls13.get_ref().1.alpn_protocol(), Some(&b"http/1.1"[..]));
    assert_eq!(peer_names(&tls13), ["a.test"]);
    // Session settings unchanged: a ticket from before the change still resumes.
    let resumed = connect(addr, resuming, Some("a.test"), "a.test")
        .await
        .unwrap();
    assert_eq!(
        resumed.get_ref().1.handshake_kind(),
        Some(rustls::HandshakeKind::Resumed)
    );
    // The certificate store is still the live one: a certificate added now is served.
    certs.insert("b", ca.loaded(&["b.test"]));
    let b = connect(
        addr,
        ca.client_config(&[b"http/1.1"]),
        Some("b.test"),
        "b.test",
    )
    .await
    .unwrap();
    assert_eq!(peer_names(&b), ["b.test"]);

    // The TLS 1.2 connection opened before the change still works.
    assert_eq!(
        get_h1(&mut open, "a.test", "/").await,
        (http::StatusCode::OK, "sni=a.test scheme=https".to_owned())
    );
}
