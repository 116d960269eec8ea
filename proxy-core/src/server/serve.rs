//! [`Server`]: the accept loop, connection driving and graceful shutdown.

use std::convert::Infallible;
use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use std::pin::Pin;

use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, OwnedSemaphorePermit, Semaphore};

use crate::body::{Request, Response};
use crate::client_info::{ClientInfo, Scheme};
use crate::server::adapter::{Adapter, ConnState};
use crate::server::h1::Parked;
use crate::server::{Accept, HttpConfig, Plain};

/// Serves a tower service on a listener: HTTP/1.1 and cleartext HTTP/2 (prior knowledge)
/// on one port, keep-alive, upgrades, graceful shutdown.
///
/// ```
/// use proxy_core::server::Server;
/// use proxy_core::{ProxyBody, Request, Response};
/// use std::convert::Infallible;
/// # tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async {
/// let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
/// let addr = listener.local_addr().unwrap();
/// let hello = tower::service_fn(|_req: Request| async {
///     Ok::<_, Infallible>(Response::new(ProxyBody::from("hello")))
/// });
/// let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
/// let server = tokio::spawn(Server::new(listener).serve(hello, async { stopped.await.ok(); }));
///
/// let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
/// let (mut send, conn) = hyper::client::conn::http1::handshake::<_, ProxyBody>(
///     hyper_util::rt::TokioIo::new(stream)).await.unwrap();
/// tokio::spawn(conn);
/// let resp = send.send_request(http::Request::new(ProxyBody::empty())).await.unwrap();
/// assert_eq!(resp.status(), 200);
/// stop.send(()).unwrap();
/// server.await.unwrap().unwrap();
/// # });
/// ```
#[derive(Debug)]
pub struct Server<A = Plain> {
    listener: TcpListener,
    acceptor: A,
    scheme: Scheme,
    config: HttpConfig,
    stats: Arc<ServerStats>,
}

/// Live counters of a server, shared with whoever holds a clone of the `Arc`.
#[derive(Debug, Default)]
pub struct ServerStats {
    accepted: AtomicUsize,
    active: AtomicUsize,
    refused: AtomicUsize,
    pub(crate) parked: AtomicUsize,
}

impl ServerStats {
    /// Connections accepted since start.
    pub fn accepted(&self) -> usize {
        self.accepted.load(Ordering::Relaxed)
    }

    /// Connections open now.
    pub fn active(&self) -> usize {
        self.active.load(Ordering::Relaxed)
    }

    /// Connections answered 503 because the connection cap was reached.
    pub fn refused(&self) -> usize {
        self.refused.load(Ordering::Relaxed)
    }

    /// HTTP/1 connections waiting for their next (or first) request with no HTTP state
    /// and no buffers ([`HttpConfig::park_idle`]), including those whose request head
    /// has begun but is not complete (it is read without hyper until it is).
    pub fn parked(&self) -> usize {
        self.parked.load(Ordering::Relaxed)
    }
}

impl Server<Plain> {
    /// A plain-HTTP server on `listener` with default settings.
    pub fn new(listener: TcpListener) -> Self {
        Server {
            listener,
            acceptor: Plain,
            scheme: Scheme::Http,
            config: HttpConfig::default(),
            stats: Arc::default(),
        }
    }
}

impl<A: Accept> Server<A> {
    /// Use `acceptor` for each connection (TLS, PROXY protocol). `scheme` is what the
    /// connection's [`ClientInfo`] starts with; the acceptor may change it.
    pub fn with_acceptor<B: Accept>(self, acceptor: B, scheme: Scheme) -> Server<B> {
        Server {
            listener: self.listener,
            acceptor,
            scheme,
            config: self.config,
            stats: self.stats,
        }
    }

    /// Use these connection settings.
    pub fn config(mut self, config: HttpConfig) -> Self {
        self.config = config;
        self
    }

    /// The server's live counters.
    pub fn stats(&self) -> Arc<ServerStats> {
        self.stats.clone()
    }

    /// The address the listener is bound to.
    pub fn local_addr(&self) -> std::io::Result<std::net::SocketAddr> {
        self.listener.local_addr()
    }

    /// Accept and serve connections until `shutdown` completes; then stop accepting,
    /// close idle keep-alive connections, let in-flight requests finish for up to
    /// [`HttpConfig::shutdown_timeout`], and return.
    pub async fn serve<S>(
        self,
        service: S,
        shutdown: impl Future<Output = ()>,
    ) -> std::io::Result<()>
    where
        S: tower_service::Service<Request, Response = Response, Error = Infallible>
            + Clone
            + Send
            + Sync
            + 'static,
        S::Future: Send + 'static,
    {
        let shared = Arc::new(Shared {
            auto: http_builder(&self.config),
            h1: http1_builder(&self.config),
            config: self.config.clone(),
            set_nodelay: !nodelay_inherited(&self.listener),
        });
        // Graceful shutdown: every connection watches this; idle ones close at once,
        // busy ones after their current response.
        let (stop, _) = watch::channel(false);
        let cap = self
            .config
            .max_connections
            .map(|n| Arc::new(Semaphore::new(n)));
        let local = self.listener.local_addr()?;
        tokio::pin!(shutdown);
        // Connection tasks, reaped here so that a panic inside one (a bug) is logged
        // through tracing with the rest of the logs; the other connections go on.
        let mut tasks = tokio::task::JoinSet::new();
        loop {
            let (stream, peer) = tokio::select! {
                biased;
                () = &mut shutdown => break,
                Some(done) = tasks.join_next(), if !tasks.is_empty() => {
                    if let Err(e) = done {
                        if e.is_panic() {
                            tracing::error!(error = %e, "a connection task panicked; the server keeps serving");
                        }
                    }
                    continue;
                }
                r = self.listener.accept() => match r {
                    Ok(pair) => pair,
                    Err(e) => {
                        // EMFILE and friends: log and keep going after a pause, as
                        // nginx does, rather than spin or exit.
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                        continue;
                    }
                },
            };
            self.stats.accepted.fetch_add(1, Ordering::Relaxed);
            let permit = match &cap {
                None => None,
                Some(sem) => match sem.clone().try_acquire_owned() {
                    Ok(p) => Some(p),
                    Err(_) => {
                        self.stats.refused.fetch_add(1, Ordering::Relaxed);
                        tokio::spawn(refuse(stream, self.config.header_read_timeout));
                        continue;
                    }
                },
            };
            let info = ClientInfo::new(peer, local, self.scheme);
            let conn = Connection {
                acceptor: self.acceptor.clone(),
                service: service.clone(),
                shared: shared.clone(),
                stop: stop.subscribe(),
                stats: self.stats.clone(),
                _permit: permit,
            };
            tasks.spawn(conn.run(stream, info));
        }
        drop(self.listener);
        // A connection accepted just before the stop may not have sent its request yet;
        // closing it as idle would leave the request unread, and the client would see a
        // reset. Give such connections a moment first.
        tokio::time::sleep(
            self.config
                .shutdown_linger
                .min(self.config.shutdown_timeout),
        )
        .await;
        stop.send_replace(true);
        let drained = tokio::time::timeout(self.config.shutdown_timeout, async {
            while let Some(done) = tasks.join_next().await {
                if let Err(e) = done {
                    if e.is_panic() {
                        tracing::error!(error = %e, "a connection task panicked");
                    }
                }
            }
        })
        .await;
        if drained.is_err() {
            tracing::warn!("graceful shutdown deadline passed with requests in flight");
        }
        // Dropping a JoinSet aborts its tasks: detach them so in-flight requests finish.
        tasks.detach_all();
        Ok(())
    }
}

/// What every connection of a server shares.
pub(crate) struct Shared {
    /// HTTP/1.1 + HTTP/2 (TLS, h2c prior knowledge, streams that cannot park).
    pub(crate) auto: auto::Builder<TokioExecutor>,
    /// HTTP/1 for parking connections; the same settings as `auto`'s HTTP/1 side.
    pub(crate) h1: hyper::server::conn::http1::Builder,
    pub(crate) config: HttpConfig,
    /// Set TCP_NODELAY on each accepted socket: false when it comes from the listener.
    pub(crate) set_nodelay: bool,
}

/// Whether sockets accepted from `listener` start with TCP_NODELAY on. Linux copies the
/// option from the listening socket to the accepted one, and [`ListenConfig::bind`]
/// sets it on the listener, so the server can spare a `setsockopt` per connection; a
/// listener bound some other way (tokio's `TcpListener::bind`) has it off, and other
/// systems do not promise the inheritance, so there each connection sets it.
///
/// [`ListenConfig::bind`]: crate::server::ListenConfig::bind
fn nodelay_inherited(listener: &TcpListener) -> bool {
    cfg!(any(target_os = "linux", target_os = "android"))
        && socket2::SockRef::from(listener)
            .tcp_nodelay()
            .unwrap_or(false)
}

/// One accepted connection, everything it needs moved into its task.
struct Connection<A, S> {
    acceptor: A,
    service: S,
    shared: Arc<Shared>,
    stop: watch::Receiver<bool>,
    stats: Arc<ServerStats>,
    _permit: Option<OwnedSemaphorePermit>,
}

impl<A, S> Connection<A, S>
where
    A: Accept,
    S: tower_service::Service<Request, Response = Response, Error = Infallible>
        + Clone
        + Send
        + Sync
        + 'static,
    S::Future: Send + 'static,
{
    async fn run(self, stream: TcpStream, mut info: ClientInfo) {
        let _active = ActiveGuard::new(&self.stats);
        if self.shared.set_nodelay {
            let _ = stream.set_nodelay(true);
        }
        let io = match self.acceptor.accept(stream, &mut info).await {
            Ok(io) => io,
            Err(e) => {
                tracing::debug!(peer = %info.peer, error = %e, "connection refused by acceptor");
                return;
            }
        };
        let shared = &*self.shared;
        let state = ConnState::new();
        let mut adapter = Adapter::new(
            self.service,
            info,
            shared.config.max_requests_per_connection,
            state.clone(),
        );
        let mut stop = self.stop;
        let stopped = async move {
            let _ = stop.wait_for(|stopping| *stopping).await;
        };
        tokio::pin!(stopped);
        if shared.config.park_idle && A::raw_tcp(&io).is_some() {
            adapter.set_park(true);
            let sleep = tokio::time::sleep_until(tokio::time::Instant::now());
            tokio::pin!(sleep);
            let parked = Parked {
                shared,
                stats: &self.stats,
                state,
                stopped,
                stopping: false,
                sleep,
            };
            parked.serve::<A, S>(io, adapter).await;
        } else {
            serve_auto(io, adapter, &shared.auto, stopped, false).await;
        }
    }
}

/// Serve a connection with hyper-util's HTTP/1.1 + HTTP/2 builder until it ends; when
/// `stopped` resolves, let hyper finish what is in flight and close.
pub(crate) async fn serve_auto<I, S, F>(
    io: I,
    adapter: Adapter<S>,
    builder: &auto::Builder<TokioExecutor>,
    mut stopped: Pin<&mut F>,
    stopping: bool,
) where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    S: tower_service::Service<Request, Response = Response, Error = Infallible>
        + Clone
        + Send
        + Sync
        + 'static,
    S::Future: Send + 'static,
    F: Future<Output = ()>,
{
    // Boxed (once per connection) so that the connection task of a parking connection
    // is not sized for this larger future.
    let mut conn = Box::pin(builder.serve_connection_with_upgrades(TokioIo::new(io), adapter));
    if stopping {
        conn.as_mut().graceful_shutdown();
    }
    let mut stopping = stopping;
    let done = std::future::poll_fn(|cx| {
        if !stopping && stopped.as_mut().poll(cx).is_ready() {
            stopping = true;
            conn.as_mut().graceful_shutdown();
        }
        conn.as_mut().poll(cx)
    })
    .await;
    if let Err(e) = done {
        tracing::debug!(error = %e, "connection ended with an error");
    }
}

struct ActiveGuard(Arc<ServerStats>);

impl ActiveGuard {
    fn new(stats: &Arc<ServerStats>) -> Self {
        stats.active.fetch_add(1, Ordering::Relaxed);
        ActiveGuard(stats.clone())
    }
}

impl Drop for ActiveGuard {
    fn drop(&mut self) {
        self.0.active.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Answer a connection over the cap with one 503 and close it.
async fn refuse(stream: TcpStream, header_timeout: std::time::Duration) {
    let svc = hyper::service::service_fn(|_req| async {
        let mut resp = crate::response::status(http::StatusCode::SERVICE_UNAVAILABLE);
        resp.headers_mut().insert(
            http::header::CONNECTION,
            http::HeaderValue::from_static("close"),
        );
        Ok::<_, Infallible>(resp)
    });
    let conn = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(header_timeout)
        .keep_alive(false)
        .serve_connection(TokioIo::new(stream), svc);
    let _ = conn.await;
}

/// hyper's built-in header count limit (`hyper::proto::h1::role::DEFAULT_MAX_HEADERS`).
const HYPER_DEFAULT_MAX_HEADERS: usize = 100;

pub(crate) fn http1_builder(c: &HttpConfig) -> hyper::server::conn::http1::Builder {
    let mut h1 = hyper::server::conn::http1::Builder::new();
    // `max_buf_size` alone is not a header limit: a fresh connection's first reads can
    // take in more than it before hyper checks (hyper-util's builder happened to read
    // the first 24 bytes apart, which kept it under). `max_header_size` is exact.
    h1.timer(TokioTimer::new())
        .header_read_timeout(c.header_read_timeout)
        .keep_alive(c.keep_alive)
        .max_buf_size(c.max_header_size.max(8192))
        .max_header_size(c.max_header_size)
        .half_close(false);
    if c.max_headers != HYPER_DEFAULT_MAX_HEADERS {
        h1.max_headers(c.max_headers);
    }
    h1
}

pub(crate) fn http_builder(c: &HttpConfig) -> auto::Builder<TokioExecutor> {
    let mut b = auto::Builder::new(TokioExecutor::new());
    let mut h1 = b.http1();
    h1.timer(TokioTimer::new())
        .header_read_timeout(c.header_read_timeout)
        .keep_alive(c.keep_alive)
        .max_buf_size(c.max_header_size.max(8192))
        .half_close(false);
    // hyper's own limit is 100 headers. Setting any limit explicitly, even 100, makes it
    // build and zero a 100-entry header index per request (about 1,700 instructions,
    // a 3% of a small proxied request); so only set it when it differs.
    if c.max_headers != HYPER_DEFAULT_MAX_HEADERS {
        h1.max_headers(c.max_headers);
    }
    b.http2()
        .timer(TokioTimer::new())
        .keep_alive_interval(c.h2_keep_alive_interval)
        .keep_alive_timeout(c.h2_keep_alive_timeout)
        .max_concurrent_streams(c.h2_max_concurrent_streams)
        // WebSockets over HTTP/2 (RFC 8441): the upstream client turns them into
        // HTTP/1.1 upgrades.
        .enable_connect_protocol();
    b
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::router::{Location, Pattern, Router, VirtualServer};
    use crate::upstream::{ClientConfig, Forward, UpstreamClient};

    /// A parked connection costs its task: the future of `Connection::run`, sized for
    /// its largest state. hyper's connection is boxed while it serves, so this stays
    /// near 1.5 KiB (1,552 bytes in a debug build) instead of 3.2 KiB.
    #[tokio::test]
    async fn the_connection_task_stays_small() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let _client = TcpStream::connect(addr).await.unwrap();
        let (stream, peer) = listener.accept().await.unwrap();
        let forward = Forward::new(UpstreamClient::new(ClientConfig::default()), addr);
        let router = Router::builder()
            .server(
                VirtualServer::new([])
                    .location(Location::new(Pattern::parse("/").unwrap(), forward)),
            )
            .build()
            .unwrap();
        let config = HttpConfig::default();
        let conn = Connection {
            acceptor: Plain,
            service: router,
            shared: Arc::new(Shared {
                auto: http_builder(&config),
                h1: http1_builder(&config),
                config,
                set_nodelay: true,
            }),
            stop: watch::channel(false).1,
            stats: Arc::default(),
            _permit: None,
        };
        let task = conn.run(stream, ClientInfo::new(peer, addr, Scheme::Http));
        let size = std::mem::size_of_val(&task);
        assert!(size <= 2048, "the connection future grew to {size} bytes");
    }

    /// The server skips `setsockopt(TCP_NODELAY)` per connection on Linux because an
    /// accepted socket inherits it from a listener bound by `ListenConfig`; a listener
    /// without it makes the server set it on each connection.
    #[tokio::test]
    async fn accepted_sockets_inherit_nodelay_from_a_bound_listener() {
        let listener = crate::server::ListenConfig::new("127.0.0.1:0".parse().unwrap())
            .bind()
            .unwrap();
        let addr = listener.local_addr().unwrap();
        let _client = TcpStream::connect(addr).await.unwrap();
        let (stream, _) = listener.accept().await.unwrap();
        if cfg!(any(target_os = "linux", target_os = "android")) {
            assert!(nodelay_inherited(&listener));
            assert!(stream.nodelay().unwrap(), "TCP_NODELAY not inherited");
        } else {
            assert!(!nodelay_inherited(&listener));
        }
        let plain = TcpListener::bind("127.0.0.1:0").await.unwrap();
        assert!(!nodelay_inherited(&plain));
    }
}
