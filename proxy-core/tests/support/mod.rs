//! Shared pieces of the integration tests: real upstream servers, a proxy on an
//! ephemeral port, raw and hyper clients. Everything on 127.0.0.1.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use proxy_core::server::{HttpConfig, Server};
use proxy_core::{ProxyBody, Request, Response};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// How long any test waits for anything before failing.
pub const DEADLINE: Duration = Duration::from_secs(10);

/// A request as the upstream saw it.
#[derive(Debug, Clone)]
pub struct Seen {
    pub method: http::Method,
    pub uri: http::Uri,
    pub version: http::Version,
    pub headers: http::HeaderMap,
    pub body: Bytes,
}

/// A real HTTP/1.1 upstream (hyper) that records what it receives and counts connections.
pub struct Upstream {
    pub addr: SocketAddr,
    pub accepted: Arc<AtomicUsize>,
    pub seen: Arc<Mutex<Vec<Seen>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Upstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Upstream {
    /// An upstream answering every request with `handler` (the body is read whole first
    /// and recorded).
    pub async fn start<F, Fut>(handler: F) -> Upstream
    where
        F: Fn(Seen) -> Fut + Clone + Send + Sync + 'static,
        Fut: Future<Output = http::Response<ProxyBody>> + Send + 'static,
    {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let accepted = Arc::new(AtomicUsize::new(0));
        let seen = Arc::new(Mutex::new(Vec::new()));
        let (acc, rec) = (accepted.clone(), seen.clone());
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                acc.fetch_add(1, Ordering::SeqCst);
                let (handler, rec) = (handler.clone(), rec.clone());
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(move |req: http::Request<Incoming>| {
                        let (handler, rec) = (handler.clone(), rec.clone());
                        async move {
                            let (parts, body) = req.into_parts();
                            let body = body
                                .collect()
                                .await
                                .map(|c| c.to_bytes())
                                .unwrap_or_default();
                            let seen = Seen {
                                method: parts.method,
                                uri: parts.uri,
                                version: parts.version,
                                headers: parts.headers,
                                body,
                            };
                            rec.lock().unwrap().push(seen.clone());
                            Ok::<_, Infallible>(handler(seen).await)
                        }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), svc)
                        .with_upgrades()
                        .await;
                });
            }
        });
        Upstream {
            addr,
            accepted,
            seen,
            task,
        }
    }

    /// An upstream answering 200 "ok" to everything.
    pub async fn ok() -> Upstream {
        Upstream::start(|_| async { http::Response::new(ProxyBody::from("ok")) }).await
    }

    pub fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }

    pub fn accepted(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }
}

/// A proxy serving `service` on an ephemeral port until dropped or stopped.
pub struct Proxy {
    pub addr: SocketAddr,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    pub task: Option<tokio::task::JoinHandle<std::io::Result<()>>>,
}

impl Proxy {
    pub async fn start<S>(service: S) -> Proxy
    where
        S: tower::Service<Request, Response = Response, Error = Infallible>
            + Clone
            + Send
            + Sync
            + 'static,
        S::Future: Send + 'static,
    {
        Proxy::start_with(service, HttpConfig::default()).await
    }

    pub async fn start_with<S>(service: S, config: HttpConfig) -> Proxy
    where
        S: tower::Service<Request, Response = Response, Error = Infallible>
            + Clone
            + Send
            + Sync
            + 'static,
        S::Future: Send + 'static,
    {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let server = Server::new(listener).config(config);
        let task = tokio::spawn(server.serve(service, async move {
            let _ = rx.await;
        }));
        Proxy {
            addr,
            stop: Some(tx),
            task: Some(task),
        }
    }

    /// Begin graceful shutdown; returns the server task to await.
    pub fn stop(&mut self) -> tokio::task::JoinHandle<std::io::Result<()>> {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        self.task.take().unwrap()
    }
}

/// A hyper HTTP/1.1 connection to `addr`.
pub async fn connect(addr: SocketAddr) -> hyper::client::conn::http1::SendRequest<ProxyBody> {
    let stream = TcpStream::connect(addr).await.unwrap();
    let (send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(conn);
    send
}

/// Send one request on a new connection and read the whole response.
pub async fn send(
    addr: SocketAddr,
    req: http::Request<ProxyBody>,
) -> (http::response::Parts, Bytes) {
    let mut s = connect(addr).await;
    let resp = tokio::time::timeout(DEADLINE, s.send_request(req))
        .await
        .unwrap()
        .unwrap();
    let (parts, body) = resp.into_parts();
    let body = tokio::time::timeout(DEADLINE, body.collect())
        .await
        .unwrap()
        .unwrap()
        .to_bytes();
    (parts, body)
}

/// A GET with a Host header.
pub fn get(path: &str) -> http::Request<ProxyBody> {
    http::Request::builder()
        .uri(path)
        .header("host", "example.test")
        .body(ProxyBody::empty())
        .unwrap()
}

/// Write `bytes` on a raw connection and read until the server closes it.
pub async fn raw(addr: SocketAddr, bytes: &[u8]) -> Vec<u8> {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(bytes).await.unwrap();
    read_to_close(&mut s).await
}

/// Read until EOF (or a reset), failing the test after the deadline.
pub async fn read_to_close(s: &mut TcpStream) -> Vec<u8> {
    let mut out = Vec::new();
    let read = async {
        let mut buf = [0u8; 8192];
        loop {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => out.extend_from_slice(&buf[..n]),
            }
        }
    };
    tokio::time::timeout(DEADLINE, read)
        .await
        .expect("server did not close the connection");
    out
}

/// Wait until `cond` holds, failing after the deadline.
pub async fn wait_for(mut cond: impl FnMut() -> bool) {
    let start = std::time::Instant::now();
    while !cond() {
        assert!(
            start.elapsed() < DEADLINE,
            "condition not met before the deadline"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Full body helper for upstream responses.
pub fn full(b: impl Into<Bytes>) -> ProxyBody {
    ProxyBody::boxed(Full::new(b.into()))
}

/// Serve `service` with the crate's [`Server`] on an ephemeral port for the rest of the
/// test (the server puts the socket peer in `ClientInfo`, as in production).
pub async fn serve<S>(service: S) -> SocketAddr
where
    S: tower::Service<Request, Response = Response, Error = Infallible>
        + Clone
        + Send
        + Sync
        + 'static,
    S::Future: Send + 'static,
{
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(Server::new(listener).serve(service, std::future::pending::<()>()));
    addr
}

/// A streaming upstream (the handler gets hyper's request with its body unread), with
/// counts of the connections it accepted and the requests it was handed.
pub struct CountingUpstream {
    pub addr: SocketAddr,
    pub connections: Arc<AtomicUsize>,
    pub requests: Arc<AtomicUsize>,
}

impl CountingUpstream {
    pub async fn start<F, Fut>(handler: F) -> CountingUpstream
    where
        F: Fn(http::Request<Incoming>) -> Fut + Clone + Send + Sync + 'static,
        Fut: Future<Output = http::Response<ProxyBody>> + Send + 'static,
    {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let connections = Arc::new(AtomicUsize::new(0));
        let requests = Arc::new(AtomicUsize::new(0));
        let (conns, reqs) = (connections.clone(), requests.clone());
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                conns.fetch_add(1, Ordering::SeqCst);
                let (handler, reqs) = (handler.clone(), reqs.clone());
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(move |req| {
                        reqs.fetch_add(1, Ordering::SeqCst);
                        let h = handler.clone();
                        async move { Ok::<_, Infallible>(h(req).await) }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        CountingUpstream {
            addr,
            connections,
            requests,
        }
    }
}

/// [`CountingUpstream::start`], giving its address and its count of connections.
pub async fn upstream_counting_connections<F, Fut>(handler: F) -> (SocketAddr, Arc<AtomicUsize>)
where
    F: Fn(http::Request<Incoming>) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = http::Response<ProxyBody>> + Send + 'static,
{
    let u = CountingUpstream::start(handler).await;
    (u.addr, u.connections)
}

/// [`CountingUpstream::start`], giving its address and its count of requests.
pub async fn upstream_counting_requests<F, Fut>(handler: F) -> (SocketAddr, Arc<AtomicUsize>)
where
    F: Fn(http::Request<Incoming>) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = http::Response<ProxyBody>> + Send + 'static,
{
    let u = CountingUpstream::start(handler).await;
    (u.addr, u.requests)
}
