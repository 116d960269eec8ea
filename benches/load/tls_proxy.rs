//! The HTTPS scenarios of the load comparison without the binary's layers
//! (`TLS_SIDE=example`; by default compare.py measures the `proxy` binary's TLS
//! listener): server → router → location `/` → pooled [`Forward`] behind proxy-tls's
//! acceptor. Like the binary, it serves from a task of the runtime (not from `block_on`'s
//! thread, which would hand every accepted connection to the worker across threads) and
//! allocates with jemalloc.
//!
//! Usage: `load_tls_proxy LISTEN UPSTREAM CERT KEY WORKERS`. Stops on SIGTERM/SIGINT.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;

use proxy_core::client_info::Scheme;
use proxy_core::router::{Location, Pattern, Router, VirtualServer};
use proxy_core::server::{HttpConfig, ListenConfig, Server};
use proxy_core::upstream::{ClientConfig, Forward, UpstreamClient};
use proxy_tls::reload::Reloader;
use proxy_tls::{CertStore, TlsAcceptor};

#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [listen, upstream, cert, key, workers] = args.as_slice() else {
        panic!("usage: load_tls_proxy LISTEN UPSTREAM CERT KEY WORKERS");
    };
    let listen: SocketAddr = listen.parse().expect("LISTEN");
    let upstream: SocketAddr = upstream.parse().expect("UPSTREAM");
    let workers: usize = workers.parse().expect("WORKERS");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(workers)
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async move {
        let store = CertStore::new();
        Reloader::new(store.clone())
            .with_files("main", cert, key)
            .load()
            .expect("certificate");
        let acceptor = TlsAcceptor::builder(store).build().expect("acceptor");
        let forward = Forward::new(UpstreamClient::new(ClientConfig::default()), upstream);
        let router = Router::builder()
            .server(VirtualServer::new([]).location(Location::new(
                Pattern::parse("/").expect("pattern"),
                forward,
            )))
            .build()
            .expect("router");
        let mut http = HttpConfig::default();
        http.max_requests_per_connection = 100_000;
        let listener = ListenConfig::new(listen).bind().expect("bind");
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("signal");
        let stop = async move {
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
        };
        let server = Server::new(listener)
            .with_acceptor(acceptor, Scheme::Https)
            .config(http)
            .serve(router, stop);
        tokio::spawn(server)
            .await
            .expect("server task")
            .expect("serve");
    });
}
