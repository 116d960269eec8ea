//! OCSP stapling end to end: a CA and a leaf whose AIA names a real OCSP responder
//! (`openssl ocsp`) on 127.0.0.1; the stapler fetches, verifies and staples; a rustls
//! client sees the response in its certificate verifier, over TLS 1.3 and TLS 1.2.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use proxy_tls::ocsp::{CertPair, StapleSource, Stapler};
use proxy_tls::{CertStore, LoadedCert, TlsAcceptor};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};
use support::{app, serve, wait_for};

/// An `openssl ocsp` responder, stopped (by its PID) when dropped.
struct Responder(Child);

impl Drop for Responder {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

struct Pki {
    dir: tempfile::TempDir,
    ca_pem: String,
    issuer: rcgen::Issuer<'static, rcgen::KeyPair>,
    url: String,
    port: u16,
}

fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().port()
}

impl Pki {
    fn new() -> Pki {
        let dir = tempfile::tempdir().unwrap();
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "ocsp e2e CA");
        let ca = params.self_signed(&key).unwrap();
        std::fs::write(dir.path().join("ca.pem"), ca.pem()).unwrap();
        std::fs::write(dir.path().join("ca.key"), key.serialize_pem()).unwrap();
        let port = free_port();
        Pki {
            ca_pem: ca.pem(),
            issuer: rcgen::Issuer::new(params, key),
            url: format!("http://127.0.0.1:{port}"),
            port,
            dir,
        }
    }

    /// A leaf with serial `serial` and an AIA pointing at the responder; its index.txt
    /// line (`V` valid or `R` revoked) is appended.
    fn leaf(&self, serial: u32, status: char) -> LoadedCert {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(vec!["ocsp.test".to_string()]).unwrap();
        params.serial_number = Some(rcgen::SerialNumber::from(serial.to_be_bytes().to_vec()));
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "ocsp.test");
        params
            .custom_extensions
            .push(rcgen::CustomExtension::from_oid_content(
                &[1, 3, 6, 1, 5, 5, 7, 1, 1],
                proxy_tls::ocsp::aia_extension(&self.url).unwrap(),
            ));
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        // openssl's CA database: status, expiry, revocation date, serial (hex), file, DN.
        let revoked = if status == 'R' { "240101000000Z" } else { "" };
        let line =
            format!("{status}\t391231235959Z\t{revoked}\t{serial:08X}\tunknown\t/CN=ocsp.test\n");
        let mut index =
            std::fs::read_to_string(self.dir.path().join("index.txt")).unwrap_or_default();
        index.push_str(&line);
        std::fs::write(self.dir.path().join("index.txt"), index).unwrap();
        let chain = format!("{}{}", cert.pem(), self.ca_pem);
        LoadedCert::from_pem(chain.as_bytes(), key.serialize_pem().as_bytes()).unwrap()
    }

    /// Start `openssl ocsp` on the port the leaves name, and wait until it accepts.
    async fn responder(&self) -> Responder {
        let d = self.dir.path();
        let child = Command::new("openssl")
            .args(["ocsp", "-index"])
            .arg(d.join("index.txt"))
            // OpenSSL 3.0's `-port` takes a number only (it listens on every address);
            // the stapler reaches it on 127.0.0.1, as the leaves' AIA says.
            .arg("-port")
            .arg(self.port.to_string())
            .arg("-rsigner")
            .arg(d.join("ca.pem"))
            .arg("-rkey")
            .arg(d.join("ca.key"))
            .arg("-CA")
            .arg(d.join("ca.pem"))
            .args(["-nmin", "60"])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("openssl is installed");
        // Ready once it prints `ACCEPT [::]:PORT`. (A probe connection would not do: the
        // responder serves one connection at a time and waits on an idle one.) The
        // thread keeps draining stdout so the responder never blocks on a full pipe.
        let mut child = child;
        let stdout = child.stdout.take().unwrap();
        let (ready_tx, ready_rx) = tokio::sync::oneshot::channel::<()>();
        std::thread::spawn(move || {
            use std::io::BufRead;
            let mut ready = Some(ready_tx);
            for line in std::io::BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if line.starts_with("ACCEPT") {
                    if let Some(tx) = ready.take() {
                        let _ = tx.send(());
                    }
                }
            }
        });
        let responder = Responder(child);
        let ready = tokio::time::timeout(Duration::from_secs(10), ready_rx).await;
        assert!(
            matches!(ready, Ok(Ok(()))),
            "openssl ocsp did not start listening"
        );
        responder
    }
}

/// A verifier that checks the chain as usual and records the stapled OCSP response.
#[derive(Debug)]
struct Recording {
    inner: Arc<WebPkiServerVerifier>,
    ocsp: Mutex<Option<Vec<u8>>>,
}

impl ServerCertVerifier for Recording {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        *self.ocsp.lock().unwrap() = Some(ocsp_response.to_vec());
        self.inner
            .verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// Handshake with a client that records the staple; the staple it saw (empty: none).
async fn staple_seen(
    addr: SocketAddr,
    ca_pem: &str,
    version: &'static rustls::SupportedProtocolVersion,
) -> Vec<u8> {
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        roots.add(c.unwrap()).unwrap();
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let verifier = Arc::new(Recording {
        inner: WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider.clone())
            .build()
            .unwrap(),
        ocsp: Mutex::new(None),
    });
    let mut cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[version])
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(verifier.clone())
        .with_no_client_auth();
    cfg.resumption = rustls::client::Resumption::disabled();
    let tls = support::connect(addr, cfg, Some("ocsp.test"), "ocsp.test")
        .await
        .unwrap();
    drop(tls);
    let seen = verifier.ocsp.lock().unwrap().clone();
    seen.expect("the verifier ran")
}

async fn stapled(store: &CertStore) -> bool {
    store
        .get("site")
        .is_some_and(|c| c.certified_key().ocsp.is_some())
}

#[tokio::test]
async fn the_responders_answer_is_fetched_verified_and_stapled() {
    let pki = Pki::new();
    let cert = pki.leaf(0x1001, 'V');
    let chain = cert.certified_key().cert.clone();
    let store = CertStore::new();
    store.insert("site", cert);
    let _responder = pki.responder().await;
    let stapler = Stapler::new(store.clone())
        .source("site", StapleSource::Responder { verify: true })
        .spawn();
    let acceptor = TlsAcceptor::builder(store.clone()).build().unwrap();
    let addr = serve(acceptor, app()).await;
    assert!(
        wait_for(Duration::from_secs(15), || stapled(&store)).await,
        "no OCSP response stapled"
    );
    let stored = store
        .get("site")
        .unwrap()
        .certified_key()
        .ocsp
        .clone()
        .unwrap();
    for version in [&rustls::version::TLS13, &rustls::version::TLS12] {
        let seen = staple_seen(addr, &pki.ca_pem, version).await;
        assert!(!seen.is_empty(), "{version:?}: no staple");
        assert_eq!(seen, stored);
    }
    // What arrived is a good, signed response for this certificate.
    let pair = CertPair::new(&chain[0], &chain[1]).unwrap();
    let staple = pair.check(&stored, SystemTime::now(), true).unwrap();
    assert!(staple.next_update.is_some());

    // The same response, saved to a file, is stapled by `ocsp_file` (re-read at start).
    let file = pki.dir.path().join("site.ocsp.der");
    std::fs::write(&file, &stored).unwrap();
    let from_file = CertStore::new();
    from_file.insert("site", store.get("site").unwrap().with_ocsp(None));
    let file_stapler = Stapler::new(from_file.clone())
        .source(
            "site",
            StapleSource::File {
                path: file,
                verify: true,
            },
        )
        .spawn();
    assert!(wait_for(Duration::from_secs(10), || stapled(&from_file)).await);
    stapler.abort();
    file_stapler.abort();
}

#[tokio::test]
async fn a_revoked_certificate_gets_no_staple_and_a_certificate_change_refetches() {
    let pki = Pki::new();
    let revoked = pki.leaf(0x2002, 'R');
    let good = pki.leaf(0x2003, 'V');
    let chain = revoked.certified_key().cert.clone();
    let pair = CertPair::new(&chain[0], &chain[1]).unwrap();
    let store = CertStore::new();
    store.insert("site", revoked);
    let _responder = pki.responder().await;
    let stapler = Stapler::new(store.clone())
        .source("site", StapleSource::Responder { verify: true })
        .spawn();
    let acceptor = TlsAcceptor::builder(store.clone()).build().unwrap();
    let addr = serve(acceptor, app()).await;
    // The responder answers "revoked", which the check refuses: nothing is stapled and
    // handshakes still work.
    let answer = proxy_tls::ocsp::fetch(&pki.url, pair.request().unwrap())
        .await
        .unwrap();
    let e = pair.check(&answer, SystemTime::now(), true).unwrap_err();
    assert!(e.to_string().contains("REVOKED"), "{e}");
    assert!(staple_seen(addr, &pki.ca_pem, &rustls::version::TLS13)
        .await
        .is_empty());
    // A renewed certificate is fetched for at once, without waiting for the retry.
    store.insert("site", good);
    assert!(wait_for(Duration::from_secs(15), || stapled(&store)).await);
    assert!(!staple_seen(addr, &pki.ca_pem, &rustls::version::TLS13)
        .await
        .is_empty());
    stapler.abort();
}
