//! Shared pieces of the integration tests: a test CA, a tiny accept loop serving a
//! tower service over our acceptor, an HTTP/1.1 upstream, TLS clients.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use http_body_util::BodyExt;
use hyper_util::rt::{TokioExecutor, TokioIo};
use proxy_core::client_info::{ClientInfo, Scheme};
use proxy_core::server::Accept;
use proxy_core::{ProxyBody, Request, Response};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, ServerName};
use tokio::net::{TcpListener, TcpStream};
use tower::ServiceExt;

/// A CA that issues leaf certificates; clients trust it.
pub struct TestCa {
    pub cert_pem: String,
    issuer: rcgen::Issuer<'static, rcgen::KeyPair>,
}

impl TestCa {
    pub fn new() -> TestCa {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "proxy-tls test CA");
        let cert = params.self_signed(&key).unwrap();
        TestCa {
            cert_pem: cert.pem(),
            issuer: rcgen::Issuer::new(params, key),
        }
    }

    /// A leaf for `names`: (chain PEM, key PEM).
    pub fn leaf(&self, names: &[&str]) -> (String, String) {
        let key = rcgen::KeyPair::generate().unwrap();
        let names: Vec<String> = names.iter().map(|s| s.to_string()).collect();
        let cert = rcgen::CertificateParams::new(names)
            .unwrap()
            .signed_by(&key, &self.issuer)
            .unwrap();
        (
            format!("{}{}", cert.pem(), self.cert_pem),
            key.serialize_pem(),
        )
    }

    pub fn loaded(&self, names: &[&str]) -> proxy_tls::LoadedCert {
        let (c, k) = self.leaf(names);
        proxy_tls::LoadedCert::from_pem(c.as_bytes(), k.as_bytes()).unwrap()
    }

    pub fn client_config(&self, alpn: &[&[u8]]) -> rustls::ClientConfig {
        client_config_for(self.cert_pem.as_bytes(), alpn)
    }

    /// A client that speaks TLS 1.2 only.
    pub fn client_config_tls12(&self) -> rustls::ClientConfig {
        client_config_versions(
            self.cert_pem.as_bytes(),
            &[b"http/1.1"],
            &[&rustls::version::TLS12],
        )
    }
}

pub fn client_config_for(ca_pem: &[u8], alpn: &[&[u8]]) -> rustls::ClientConfig {
    client_config_versions(ca_pem, alpn, rustls::DEFAULT_VERSIONS)
}

pub fn client_config_versions(
    ca_pem: &[u8],
    alpn: &[&[u8]],
    versions: &[&'static rustls::SupportedProtocolVersion],
) -> rustls::ClientConfig {
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_slice_iter(ca_pem) {
        roots.add(c.unwrap()).unwrap();
    }
    let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_protocol_versions(versions)
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    // A resumed session reports the certificate of the original handshake: tests that
    // look at the served certificate need full handshakes.
    config.resumption = rustls::client::Resumption::disabled();
    config
}

/// Connect with TLS; `sni: None` sends no server name (the certificate is then checked
/// against `verify_as`).
pub async fn connect(
    addr: SocketAddr,
    mut config: rustls::ClientConfig,
    sni: Option<&str>,
    verify_as: &str,
) -> std::io::Result<tokio_rustls::client::TlsStream<TcpStream>> {
    if sni.is_none() {
        config.enable_sni = false;
    }
    let name = ServerName::try_from(sni.unwrap_or(verify_as).to_owned()).unwrap();
    let tcp = TcpStream::connect(addr).await?;
    tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(name, tcp)
        .await
}

/// The DNS SANs of the certificate the server presented.
pub fn peer_names(tls: &tokio_rustls::client::TlsStream<TcpStream>) -> Vec<String> {
    let leaf = &tls.get_ref().1.peer_certificates().unwrap()[0];
    let (_, cert) = x509_parser::parse_x509_certificate(leaf.as_ref()).unwrap();
    let san = cert.subject_alternative_name().unwrap().unwrap();
    san.value
        .general_names
        .iter()
        .filter_map(|n| match n {
            x509_parser::extensions::GeneralName::DNSName(d) => Some(d.to_string()),
            _ => None,
        })
        .collect()
}

/// Serve `svc` on 127.0.0.1 behind `acceptor`, HTTP/1.1 and HTTP/2 (hyper-util auto),
/// with a `ClientInfo` in each request, as the lead's server does.
pub async fn serve<A, S>(acceptor: A, svc: S) -> SocketAddr
where
    A: Accept,
    S: tower::Service<Request, Response = Response, Error = Infallible>
        + Clone
        + Send
        + Sync
        + 'static,
    S::Future: Send,
{
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((stream, peer)) = listener.accept().await else {
                continue;
            };
            let acceptor = acceptor.clone();
            let svc = svc.clone();
            tokio::spawn(async move {
                let mut info = ClientInfo::new(peer, addr, Scheme::Http);
                let Ok(io) = acceptor.accept(stream, &mut info).await else {
                    return;
                };
                let hyper_svc =
                    hyper::service::service_fn(move |req: http::Request<hyper::body::Incoming>| {
                        let mut req = req.map(ProxyBody::from);
                        req.extensions_mut().insert(info.clone());
                        svc.clone().oneshot(req)
                    });
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(io), hyper_svc)
                    .await;
            });
        }
    });
    addr
}

/// An HTTP/1.1-only upstream answering with what it saw:
/// `version=<v> proto=<x-forwarded-proto> path=<path>`.
pub async fn upstream() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(
                    |req: http::Request<hyper::body::Incoming>| async move {
                        let proto = req
                            .headers()
                            .get("x-forwarded-proto")
                            .and_then(|v| v.to_str().ok())
                            .unwrap_or("-")
                            .to_owned();
                        let body = format!(
                            "version={:?} proto={proto} path={}",
                            req.version(),
                            req.uri().path()
                        );
                        Ok::<_, Infallible>(http::Response::new(http_body_util::Full::new(
                            bytes::Bytes::from(body),
                        )))
                    },
                );
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    addr
}

/// A trivial app: 200 with `sni=<sni> scheme=<scheme>`.
pub fn app() -> impl tower::Service<Request, Response = Response, Error = Infallible, Future: Send>
       + Clone
       + Send
       + Sync
       + 'static {
    tower::service_fn(|req: Request| async move {
        let info = ClientInfo::of(&req).cloned();
        let body = match info {
            Some(i) => format!(
                "sni={} scheme={}",
                i.sni.as_deref().unwrap_or("-"),
                i.scheme.as_str()
            ),
            None => "no-info".to_owned(),
        };
        Ok::<_, Infallible>(http::Response::new(ProxyBody::from(body)))
    })
}

/// Send a GET over an HTTP/1.1 connection handle and read the body.
pub async fn get_h1(
    sender: &mut hyper::client::conn::http1::SendRequest<http_body_util::Empty<bytes::Bytes>>,
    host: &str,
    path: &str,
) -> (http::StatusCode, String) {
    let req = http::Request::get(path)
        .header("host", host)
        .body(http_body_util::Empty::new())
        .unwrap();
    let resp = sender.send_request(req).await.unwrap();
    let status = resp.status();
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    (status, String::from_utf8_lossy(&body).into_owned())
}

/// Poll `cond` every 20 ms until it holds or `deadline` passes.
pub async fn wait_for<F, Fut>(deadline: Duration, mut cond: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let end = tokio::time::Instant::now() + deadline;
    loop {
        if cond().await {
            return true;
        }
        if tokio::time::Instant::now() >= end {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
