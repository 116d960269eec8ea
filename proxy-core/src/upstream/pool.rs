//! The upstream connection pool: idle HTTP/1.1 keep-alive connections per address.
//!
//! Why not hyper-util's legacy client: per request it hashes a (scheme, authority) key
//! with SipHash twice (checkout and return), races a checkout against a lazy connect
//! with a boxed future, and clones the URI; measured with callgrind that was about a
//! seventh of all the instructions of a small proxied request. Here each address has an
//! [`Endpoint`] that a [`Forward`](super::Forward) resolves once, at construction, so the
//! hot path is: lock the endpoint's short idle list, pop a connection, send, and push it
//! back when hyper says it is ready for the next request.

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::task::Poll;
use std::time::Duration;

use http::uri::Authority;
use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;
use tokio::time::{Instant, Sleep};

use crate::body::ProxyBody;

/// What a send can fail with.
#[derive(Debug)]
pub(crate) enum SendError {
    /// The TCP connect failed.
    Connect(std::io::Error),
    /// The TCP connect did not finish within the connect timeout.
    ConnectTimeout,
    /// The HTTP exchange failed.
    Http(hyper::Error),
    /// No response header before the deadline.
    Timeout,
}

/// Idle connections per upstream address, shared by every clone of the client.
#[derive(Debug)]
pub(crate) struct Pool {
    endpoints: RwLock<HashMap<SocketAddr, Arc<Endpoint>>>,
    builder: http1::Builder,
    max_idle: usize,
    idle_timeout: Duration,
    connect_timeout: Duration,
    send_timeout: Duration,
}

/// One upstream address: its authority and its idle connections.
#[derive(Debug)]
pub(crate) struct Endpoint {
    addr: SocketAddr,
    authority: Authority,
    idle: Mutex<Vec<Idle>>,
    /// Whether a reaper task is closing this endpoint's expired idle connections.
    reaping: std::sync::atomic::AtomicBool,
}

#[derive(Debug)]
struct Idle {
    sender: http1::SendRequest<ProxyBody>,
    since: Instant,
    /// The connection's response-header timer (see [`Pool::send`]), still registered
    /// at its last request's deadline; dropped (deregistered) with the connection.
    timer: Pin<Box<Sleep>>,
}

impl Pool {
    pub(crate) fn new(
        max_idle: usize,
        idle_timeout: Duration,
        connect_timeout: Duration,
        send_timeout: Duration,
    ) -> Self {
        Pool {
            send_timeout,
            endpoints: RwLock::default(),
            builder: http1::Builder::new(),
            max_idle,
            idle_timeout,
            connect_timeout,
        }
    }

    /// The endpoint of `addr`, created on first use (`authority` is only called then).
    /// Keep it to skip this lookup.
    pub(crate) fn endpoint<E>(
        &self,
        addr: SocketAddr,
        authority: impl FnOnce() -> Result<Authority, E>,
    ) -> Result<Arc<Endpoint>, E> {
        if let Some(e) = self
            .endpoints
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .get(&addr)
        {
            return Ok(e.clone());
        }
        let authority = authority()?;
        Ok(self
            .endpoints
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .entry(addr)
            .or_insert_with(|| {
                Arc::new(Endpoint {
                    addr,
                    authority,
                    idle: Mutex::new(Vec::new()),
                    reaping: std::sync::atomic::AtomicBool::new(false),
                })
            })
            .clone())
    }

    /// Send `req` on an idle connection of `ep`, or a new one, and wait for the response
    /// header until `deadline` (nginx's `proxy_read_timeout`; [`SendError::Timeout`]
    /// after it). A request that an idle connection refused before writing any of it
    /// (the connection was closing) is sent again on the next one, as the legacy
    /// client's `retry_canceled_requests` did.
    ///
    /// The deadline is watched by the connection's own timer, which stays registered
    /// with tokio's timer while the connection is pooled: for the next request it is
    /// only moved later (`Sleep::reset` of a registered timer to a later deadline is one
    /// atomic compare-and-swap), instead of a timer registered and removed per request.
    pub(crate) async fn send(
        self: &Arc<Self>,
        ep: &Arc<Endpoint>,
        mut req: http::Request<ProxyBody>,
        deadline: Instant,
    ) -> Result<http::Response<hyper::body::Incoming>, SendError> {
        while let Some(Idle {
            mut sender,
            mut timer,
            ..
        }) = self.checkout(ep)
        {
            timer.as_mut().reset(deadline);
            match until(&mut timer, sender.try_send_request(req)).await {
                None => return Err(SendError::Timeout),
                Some(Ok(resp)) => {
                    self.release(ep, sender, timer);
                    return Ok(resp);
                }
                Some(Err(mut e)) => match e.take_message() {
                    Some(back) => req = back,
                    None => {
                        return Err(SendError::Http(e.into_error()));
                    }
                },
            }
        }
        let mut timer = Box::pin(tokio::time::sleep_until(deadline));
        let mut sender = match until(&mut timer, self.connect(ep.addr)).await {
            None => return Err(SendError::Timeout),
            Some(sender) => sender?,
        };
        match until(&mut timer, sender.send_request(req)).await {
            None => Err(SendError::Timeout),
            Some(Ok(resp)) => {
                self.release(ep, sender, timer);
                Ok(resp)
            }
            Some(Err(error)) => Err(SendError::Http(error)),
        }
    }

    /// The most recently used idle connection that is still open and not past the idle
    /// timeout (those are dropped, which closes them).
    fn checkout(&self, ep: &Endpoint) -> Option<Idle> {
        let mut idle = ep.idle.lock().unwrap_or_else(PoisonError::into_inner);
        while let Some(i) = idle.pop() {
            if i.since.elapsed() < self.idle_timeout && i.sender.is_ready() {
                return Some(i);
            }
        }
        None
    }

    /// Return `sender` to the idle list once hyper can take the next request on it,
    /// which is when the response body has been read to its end.
    fn release(
        self: &Arc<Self>,
        ep: &Arc<Endpoint>,
        mut sender: http1::SendRequest<ProxyBody>,
        timer: Pin<Box<Sleep>>,
    ) {
        if self.max_idle == 0 {
            return;
        }
        if sender.is_ready() {
            self.put(ep, sender, timer);
            return;
        }
        // The body is still streaming (or the connection was upgraded or will close):
        // wait for it in a small task; it ends when the connection does.
        let (pool, ep) = (self.clone(), ep.clone());
        tokio::spawn(async move {
            if sender.ready().await.is_ok() {
                pool.put(&ep, sender, timer);
            }
        });
    }

    fn put(
        &self,
        ep: &Arc<Endpoint>,
        sender: http1::SendRequest<ProxyBody>,
        timer: Pin<Box<Sleep>>,
    ) {
        {
            let mut idle = ep.idle.lock().unwrap_or_else(PoisonError::into_inner);
            if idle.len() >= self.max_idle {
                // nginx's `keepalive N` keeps the N most recent; drop the oldest.
                idle.remove(0);
            }
            idle.push(Idle {
                sender,
                since: Instant::now(),
                timer,
            });
        }
        self.reap(ep);
    }

    /// Close idle connections once they pass the idle timeout, so an upstream that never
    /// closes them itself does not keep sockets (and their tasks) open for ever. One task
    /// per endpoint, only while it has idle connections; none on the request path.
    fn reap(&self, ep: &Arc<Endpoint>) {
        use std::sync::atomic::Ordering;
        if ep.reaping.swap(true, Ordering::AcqRel) {
            return;
        }
        let (ep, timeout) = (ep.clone(), self.idle_timeout);
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(timeout).await;
                let left = {
                    let mut idle = ep.idle.lock().unwrap_or_else(PoisonError::into_inner);
                    idle.retain(|i| i.since.elapsed() < timeout && i.sender.is_ready());
                    idle.len()
                };
                if left == 0 {
                    ep.reaping.store(false, Ordering::Release);
                    // A connection returned between the check and the store restarts
                    // the loop here rather than waiting for the next `put`.
                    let again = !ep
                        .idle
                        .lock()
                        .unwrap_or_else(PoisonError::into_inner)
                        .is_empty();
                    if !again || ep.reaping.swap(true, Ordering::AcqRel) {
                        return;
                    }
                }
            }
        });
    }

    async fn connect(&self, addr: SocketAddr) -> Result<http1::SendRequest<ProxyBody>, SendError> {
        let stream =
            match tokio::time::timeout(self.connect_timeout, tokio::net::TcpStream::connect(addr))
                .await
            {
                Ok(Ok(s)) => s,
                Ok(Err(e)) => return Err(SendError::Connect(e)),
                Err(_) => return Err(SendError::ConnectTimeout),
            };
        let _ = stream.set_nodelay(true);
        // nginx's proxy_send_timeout: a write to the upstream that cannot make progress
        // for this long fails the connection (the request gets a 502/504, the tunnel ends).
        let stream = crate::timeout::SendTimeoutIo::new(stream, self.send_timeout);
        let (sender, conn) = self
            .builder
            .handshake(TokioIo::new(stream))
            .await
            .map_err(SendError::Http)?;
        tokio::spawn(async move {
            if let Err(e) = conn.with_upgrades().await {
                tracing::debug!(upstream = %addr, error = %e, "upstream connection ended with an error");
            }
        });
        Ok(sender)
    }
}

/// `fut`'s output, or `None` when `timer` fires first (`fut` is polled first, as
/// `tokio::time::timeout` does).
async fn until<F: Future>(timer: &mut Pin<Box<Sleep>>, fut: F) -> Option<F::Output> {
    let mut fut = std::pin::pin!(fut);
    std::future::poll_fn(|cx| {
        if let Poll::Ready(out) = fut.as_mut().poll(cx) {
            return Poll::Ready(Some(out));
        }
        timer.as_mut().poll(cx).map(|()| None)
    })
    .await
}

impl Endpoint {
    /// The address's URI authority (`IP:PORT`).
    pub(crate) fn authority(&self) -> &Authority {
        &self.authority
    }

    /// The upstream address.
    pub(crate) fn addr(&self) -> SocketAddr {
        self.addr
    }

    #[cfg(test)]
    pub(crate) fn idle_len(&self) -> usize {
        self.idle
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::convert::Infallible;

    /// An upstream that answers every request `ok` and counts its connections.
    async fn upstream() -> (SocketAddr, Arc<std::sync::atomic::AtomicUsize>) {
        upstream_answering(usize::MAX).await
    }

    /// An upstream that answers the first `answered` requests of each connection `ok`
    /// and never the later ones, and counts its connections.
    async fn upstream_answering(
        answered: usize,
    ) -> (SocketAddr, Arc<std::sync::atomic::AtomicUsize>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let conns = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let counted = conns.clone();
        tokio::spawn(async move {
            loop {
                let (s, _) = listener.accept().await.unwrap();
                counted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                tokio::spawn(async move {
                    let served = Arc::new(std::sync::atomic::AtomicUsize::new(0));
                    let svc = hyper::service::service_fn(move |_req| {
                        let n = served.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                        async move {
                            if n >= answered {
                                std::future::pending::<()>().await;
                            }
                            Ok::<_, Infallible>(http::Response::new(ProxyBody::from("ok")))
                        }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(s), svc)
                        .await;
                });
            }
        });
        (addr, conns)
    }

    async fn get(pool: &Arc<Pool>, ep: &Arc<Endpoint>) {
        use http_body_util::BodyExt;
        let req = http::Request::get("/").body(ProxyBody::empty()).unwrap();
        let resp = pool.send(ep, req, far()).await.unwrap();
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(&body[..], b"ok");
    }

    /// A deadline no test reaches.
    fn far() -> Instant {
        Instant::now() + Duration::from_secs(60)
    }

    fn endpoint(pool: &Pool, addr: SocketAddr) -> Arc<Endpoint> {
        pool.endpoint(addr, || Authority::try_from(addr.to_string()))
            .unwrap()
    }

    /// Wait (bounded) until the endpoint holds `n` idle connections.
    async fn idle_becomes(ep: &Endpoint, n: usize) {
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while ep.idle_len() != n {
            assert!(
                std::time::Instant::now() < deadline,
                "idle stayed {}",
                ep.idle_len()
            );
            tokio::task::yield_now().await;
        }
    }

    #[tokio::test]
    async fn one_connection_serves_sequential_requests() {
        let (addr, conns) = upstream().await;
        let pool = Arc::new(Pool::new(
            4,
            Duration::from_secs(4),
            Duration::from_secs(1),
            Duration::from_secs(60),
        ));
        let ep = endpoint(&pool, addr);
        for _ in 0..5 {
            get(&pool, &ep).await;
            idle_becomes(&ep, 1).await;
        }
        assert_eq!(conns.load(std::sync::atomic::Ordering::SeqCst), 1);
        assert!(
            Arc::ptr_eq(&ep, &endpoint(&pool, addr)),
            "one endpoint per address"
        );
    }

    #[tokio::test]
    async fn keepalive_zero_keeps_nothing() {
        let (addr, conns) = upstream().await;
        let pool = Arc::new(Pool::new(
            0,
            Duration::from_secs(4),
            Duration::from_secs(1),
            Duration::from_secs(60),
        ));
        let ep = endpoint(&pool, addr);
        get(&pool, &ep).await;
        get(&pool, &ep).await;
        assert_eq!(ep.idle_len(), 0);
        assert_eq!(conns.load(std::sync::atomic::Ordering::SeqCst), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn idle_connections_expire_after_the_keepalive_timeout() {
        let (addr, conns) = upstream().await;
        let pool = Arc::new(Pool::new(
            4,
            Duration::from_secs(4),
            Duration::from_secs(1),
            Duration::from_secs(60),
        ));
        let ep = endpoint(&pool, addr);
        get(&pool, &ep).await;
        idle_becomes(&ep, 1).await;
        tokio::time::advance(Duration::from_secs(5)).await;
        get(&pool, &ep).await;
        assert_eq!(conns.load(std::sync::atomic::Ordering::SeqCst), 2);
    }

    /// A reused connection's timer, moved to a later deadline, fires at that deadline
    /// (not at the earlier one it was registered for), and a deadline earlier than the
    /// registered one still fires on time.
    #[tokio::test(start_paused = true)]
    async fn a_reused_connection_times_out_at_its_own_deadline() {
        // The first request on a connection is answered, the others never.
        let (addr, conns) = upstream_answering(1).await;
        let pool = Arc::new(Pool::new(
            4,
            Duration::from_secs(600),
            Duration::from_secs(1),
            Duration::from_secs(60),
        ));
        let ep = endpoint(&pool, addr);
        for (first, second) in [(10, 11), (10, 5)] {
            use http_body_util::BodyExt;
            let req = http::Request::get("/").body(ProxyBody::empty()).unwrap();
            let deadline = Instant::now() + Duration::from_secs(first);
            let resp = pool.send(&ep, req, deadline).await.unwrap();
            resp.into_body().collect().await.unwrap();
            idle_becomes(&ep, 1).await;
            let start = Instant::now();
            let req = http::Request::get("/").body(ProxyBody::empty()).unwrap();
            let sent = pool
                .send(&ep, req, start + Duration::from_secs(second))
                .await;
            assert!(matches!(sent, Err(SendError::Timeout)), "{sent:?}");
            let waited = start.elapsed();
            let due = Duration::from_secs(second);
            assert!(
                waited >= due && waited < due + Duration::from_millis(10),
                "{waited:?}"
            );
        }
        // Each round reused the connection of its first request.
        assert_eq!(conns.load(std::sync::atomic::Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn connect_refused_is_a_connect_error() {
        let addr: SocketAddr = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap()
        };
        let pool = Arc::new(Pool::new(
            4,
            Duration::from_secs(4),
            Duration::from_secs(1),
            Duration::from_secs(60),
        ));
        let ep = endpoint(&pool, addr);
        let req = http::Request::get("/").body(ProxyBody::empty()).unwrap();
        assert!(matches!(
            pool.send(&ep, req, far()).await,
            Err(SendError::Connect(_))
        ));
    }
}
