//! A TLS endpoint for the load comparison with nginx: our acceptor (SNI store, ALPN h2 +
//! http/1.1, tickets, session cache) in front of a fixed `200 hello`, on hyper-util's
//! HTTP/1.1 + HTTP/2 driver. Usage: `tls_hello ADDR CERT KEY`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::convert::Infallible;
use std::net::SocketAddr;

use hyper_util::rt::{TokioExecutor, TokioIo};
use proxy_core::client_info::{ClientInfo, Scheme};
use proxy_core::server::Accept;
use proxy_tls::reload::Reloader;
use proxy_tls::{CertStore, TlsAcceptor};

#[tokio::main]
async fn main() {
    let mut args = std::env::args().skip(1);
    let usage = "usage: tls_hello ADDR CERT KEY";
    let addr: SocketAddr = args.next().expect(usage).parse().expect("ADDR");
    let (cert, key) = (args.next().expect(usage), args.next().expect(usage));
    let store = CertStore::new();
    Reloader::new(store.clone())
        .with_files("main", cert, key)
        .load()
        .expect("certificate");
    let acceptor = TlsAcceptor::builder(store).build().expect("acceptor");
    let listener = tokio::net::TcpListener::bind(addr).await.expect("bind");
    println!("listening on {addr}");
    loop {
        let Ok((stream, peer)) = listener.accept().await else {
            continue;
        };
        let _ = stream.set_nodelay(true);
        let acceptor = acceptor.clone();
        tokio::spawn(async move {
            let mut info = ClientInfo::new(peer, addr, Scheme::Http);
            let Ok(io) = acceptor.accept(stream, &mut info).await else {
                return;
            };
            let svc = hyper::service::service_fn(|_req| async {
                Ok::<_, Infallible>(http::Response::new(http_body_util::Full::new(
                    bytes::Bytes::from_static(b"hello\n"),
                )))
            });
            let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(io), svc)
                .await;
        });
    }
}
