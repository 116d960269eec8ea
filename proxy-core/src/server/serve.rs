//! [`Server`]: the accept loop, connection driving and graceful shutdown.

use std::convert::Infallible;
use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;

use std::pin::Pin;

use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

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
            stop: Stop::default(),
        });
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
            let state = ConnState::new();
            let conn = Connection {
                acceptor: self.acceptor.clone(),
                adapter: Adapter::new(
                    service.clone(),
                    ClientInfo::new(peer, local, self.scheme),
                    self.config.max_requests_per_connection,
                    state.clone(),
                ),
                state,
                shared: shared.clone(),
                stats: self.stats.clone(),
                _permit: permit,
            };
            tasks.spawn(conn.run(stream));
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
        // Graceful shutdown: idle connections close at once, busy ones after their
        // current response.
        shared.stop.stop();
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

/// The service a connection serves, with the bounds hyper's connection and the
/// connection task need of it (what [`Server::serve`] asks of its service).
pub(crate) trait ConnService:
    tower_service::Service<Request, Response = Response, Error = Infallible, Future: Send + 'static>
    + Clone
    + Send
    + Sync
    + 'static
{
}

impl<T> ConnService for T where
    T: tower_service::Service<
            Request,
            Response = Response,
            Error = Infallible,
            Future: Send + 'static,
        > + Clone
        + Send
        + Sync
        + 'static
{
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
    /// The server's graceful shutdown has begun.
    pub(crate) stop: Stop,
}

/// The signal of a graceful shutdown to every connection: a flag and a [`Notify`] that
/// wakes the connections waiting for it. Lighter than a `watch` channel per connection
/// (no receiver to register, and the waiting future is half the size, which every
/// parked connection pays).
///
/// [`Notify`]: tokio::sync::Notify
#[derive(Default)]
pub(crate) struct Stop {
    stopping: AtomicBool,
    notify: tokio::sync::Notify,
}

impl Stop {
    /// Begin the shutdown: wake every connection waiting for it.
    pub(crate) fn stop(&self) {
        self.stopping.store(true, Ordering::Release);
        self.notify.notify_waiters();
    }

    /// Resolves once the shutdown has begun (at once if it already has).
    pub(crate) async fn stopped(&self) {
        let notified = self.notify.notified();
        tokio::pin!(notified);
        // Registered before the flag is read, so a `stop` in between is not missed.
        notified.as_mut().enable();
        if self.stopping.load(Ordering::Acquire) {
            return;
        }
        notified.await;
    }
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
    adapter: Adapter<S>,
    state: Arc<ConnState>,
    shared: Arc<Shared>,
    stats: Arc<ServerStats>,
    _permit: Option<OwnedSemaphorePermit>,
}

impl<A, S> Connection<A, S>
where
    A: Accept,
    S: ConnService,
{
    /// The connection's task. Its size is what every connection costs while it waits
    /// (a parked keep-alive connection is this future and its socket), so it is written
    /// to hold each value once: an `async fn` keeps a copy of its arguments beside the
    /// captured ones, and a local stays in the future until its scope ends even when it
    /// was moved out; values are moved straight into the futures that use them.
    // Not an `async fn` on purpose: see above.
    #[allow(clippy::manual_async_fn)]
    fn run(mut self, stream: TcpStream) -> impl Future<Output = ()> + Send {
        async move {
            // An `async move` block takes only the fields it names: the permit (of
            // `max_connections`) must be named to be held until the connection ends.
            let _permit = &self._permit;
            let _active = ActiveGuard::new(&self.stats);
            if self.shared.set_nodelay {
                let _ = stream.set_nodelay(true);
            }
            let shared = &*self.shared;
            let stopped = shared.stop.stopped();
            tokio::pin!(stopped);
            // The stream is moved straight into the future that serves it: a local `io`
            // would stay in this task's future beside it.
            match self.acceptor.accept(stream, self.adapter.info_mut()).await {
                Ok(io) if shared.config.park_idle && A::raw_tcp(&io).is_some() => {
                    self.adapter.set_park(true);
                    let sleep = tokio::time::sleep_until(tokio::time::Instant::now());
                    tokio::pin!(sleep);
                    Parked {
                        shared,
                        stats: &self.stats,
                        state: self.state,
                        stopped,
                        stopping: false,
                        sleep,
                    }
                    .serve::<A, S>(io, &self.adapter)
                    .await;
                }
                // Boxed: this path (TLS, streams that cannot park) does not size the
                // task of every connection.
                Ok(io) => {
                    Box::pin(serve_auto(io, self.adapter, &shared.auto, stopped, false)).await
                }
                Err(e) => {
                    tracing::debug!(peer = %self.adapter.info().peer, error = %e, "connection refused by acceptor");
                }
            }
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
    S: ConnService,
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
    /// its largest state, plus tokio's task header. hyper's connection is boxed while it
    /// serves, and each value is held once (see `Connection::run`), so the future stays
    /// under 900 bytes (856 in a release build of the binary, whose task then fits the
    /// allocator's 1 KiB size class; it was 1,832 bytes and a 2 KiB task before).
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
        let state = ConnState::new();
        let conn = Connection {
            acceptor: Plain,
            adapter: Adapter::new(
                router,
                ClientInfo::new(peer, addr, Scheme::Http),
                config.max_requests_per_connection,
                state.clone(),
            ),
            state,
            shared: Arc::new(Shared {
                auto: http_builder(&config),
                h1: http1_builder(&config),
                config,
                set_nodelay: true,
                stop: Stop::default(),
            }),
            stats: Arc::default(),
            _permit: None,
        };
        let task = conn.run(stream);
        let size = std::mem::size_of_val(&task);
        assert!(size <= 900, "the connection future grew to {size} bytes");
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
