//! Hidden entry points for fuzzing and robustness tests. Not part of the stable API.
//!
//! [`http1_stack`] feeds arbitrary bytes, as one HTTP/1.1 client connection, through the
//! whole stack the binary runs ([`Server`](crate::server::Server) → [`Router`] →
//! [`Forward`] over the pooled [`UpstreamClient`]) to an upstream on loopback that judges
//! every byte it receives with the [`strict`] parser. It panics (which a fuzzer reports)
//! when:
//!
//! - the upstream receives anything a strict RFC 9112 parser refuses;
//! - the upstream receives a request the proxy's front end did not accept, or in another
//!   order, or with another method or target (a smuggled or desynchronised request);
//! - the client is answered for more upstream requests than the upstream received;
//! - the proxy keeps the client connection open after the client has sent everything
//!   and half-closed (a hang);
//! - anything in the stack panics.
//!
//! The stack (runtime, upstream, server) is built once per thread and reused across
//! inputs, as a fuzzer calls the entry point millions of times.
//!
//! ```
//! proxy_core::testing::http1_stack(b"GET / HTTP/1.1\r\nHost: h.test\r\n\r\n");
//! let report = proxy_core::testing::http1_stack(
//!     b"POST / HTTP/1.1\r\nHost: h.test\r\nContent-Length: 3\r\n\r\nabc\
//!       GET /next HTTP/1.1\r\nHost: h.test\r\n\r\n",
//! );
//! assert_eq!(report.upstream_requests, 2);
//! assert_eq!(report.forwarded_responses, 2);
//! ```

pub mod strict;

use std::cell::RefCell;
use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::body::{Request, Response};
use crate::router::{Location, Pattern, Router, ServerName, VirtualServer};
use crate::server::{HttpConfig, Server};
use crate::upstream::{ClientConfig, Forward, UpstreamClient};

/// What one [`http1_stack`] run observed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StackReport {
    /// Requests the router handed to the forwarding location.
    pub accepted: usize,
    /// Complete requests the upstream parsed.
    pub upstream_requests: usize,
    /// Responses the client got that came from the upstream.
    pub forwarded_responses: usize,
    /// Responses the client got that the proxy made itself (400, 404, 502...).
    pub proxy_responses: usize,
    /// Strict-parser refusals of a known, reported gap (see [`TOLERATED`]).
    pub tolerated: usize,
}

/// Violations of known, reported gaps in the proxy, tolerated so fuzzing can find new
/// ones. Empty: the gaps the first fuzzing runs found (repeated Host, Content-Length with
/// leading zeros) are fixed, and the `bug_*` tests in `tests/smuggling.rs` pin them.
pub const TOLERATED: &[&str] = &[];

/// How long one input may take before it counts as a hang.
const HANG: Duration = Duration::from_secs(5);

/// Run `data` through the whole stack as one client connection; see the module docs.
///
/// # Panics
///
/// On any invariant violation listed in the module docs: that is the point.
pub fn http1_stack(data: &[u8]) -> StackReport {
    STACK.with(|cell| {
        let mut slot = cell.borrow_mut();
        if slot.is_none() {
            *slot = Some(Stack::new());
        }
        match slot.as_ref() {
            Some(stack) => stack.run(data),
            None => unreachable!("the stack was just built"),
        }
    })
}

thread_local! {
    // Per thread, not global: a fuzzer's inputs run one after another on one thread.
    static STACK: RefCell<Option<Stack>> = const { RefCell::new(None) };
}

/// The long-lived parts: a runtime, an upstream, and a proxy in front of it.
struct Stack {
    rt: tokio::runtime::Runtime,
    proxy: SocketAddr,
    shared: Arc<Shared>,
}

/// What the front end and the upstream record, reset before each input.
#[derive(Default)]
struct Shared {
    /// The input being run; tags every forwarded request with `x-fuzz-seq: INPUT.K`.
    input: AtomicUsize,
    /// (method, origin-form target) of each request that reached the forwarding location.
    accepted: Mutex<Vec<(String, String)>>,
    /// Forward futures alive now.
    in_flight: AtomicUsize,
    /// (tag, method, target) of each complete request the upstream parsed.
    upstream: Mutex<Vec<(Option<String>, String, String)>>,
    /// What the strict parser refused.
    violations: Mutex<Vec<String>>,
    /// Refusals listed in [`TOLERATED`].
    tolerated: AtomicUsize,
    /// Upstream connections holding a partial request right now.
    partial: AtomicUsize,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding the lock already failed the input; keep going with the data.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Stack {
    fn new() -> Stack {
        let rt = match tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
        {
            Ok(rt) => rt,
            Err(e) => panic!("cannot build a runtime for the fuzz stack: {e}"),
        };
        let shared = Arc::new(Shared::default());
        let proxy = rt.block_on(async {
            let upstream = match TcpListener::bind("127.0.0.1:0").await {
                Ok(l) => l,
                Err(e) => panic!("cannot bind the fuzz upstream: {e}"),
            };
            let upstream_addr = match upstream.local_addr() {
                Ok(a) => a,
                Err(e) => panic!("no upstream address: {e}"),
            };
            tokio::spawn(upstream_loop(upstream, shared.clone()));
            let client = ClientConfig {
                connect_timeout: Duration::from_secs(2),
                read_timeout: Duration::from_secs(2),
                ..ClientConfig::default()
            };
            let forward = Forward::new(UpstreamClient::new(client), upstream_addr);
            let location = Counting {
                inner: forward,
                shared: shared.clone(),
            };
            let router = Router::builder()
                .server(
                    VirtualServer::new(ServerName::parse("h.test"))
                        .default_server(true)
                        .location(Location::new(root(), location)),
                )
                .build();
            let router = match router {
                Ok(r) => r,
                Err(e) => panic!("cannot build the fuzz router: {e}"),
            };
            let listener = match TcpListener::bind("127.0.0.1:0").await {
                Ok(l) => l,
                Err(e) => panic!("cannot bind the fuzz proxy: {e}"),
            };
            let config = HttpConfig {
                header_read_timeout: Duration::from_secs(2),
                ..HttpConfig::default()
            };
            let server = Server::new(listener).config(config);
            let addr = match server.local_addr() {
                Ok(a) => a,
                Err(e) => panic!("no proxy address: {e}"),
            };
            tokio::spawn(server.serve(router, std::future::pending::<()>()));
            addr
        });
        Stack { rt, proxy, shared }
    }

    fn run(&self, data: &[u8]) -> StackReport {
        let s = &self.shared;
        let input = s.input.fetch_add(1, Ordering::SeqCst) + 1;
        lock(&s.accepted).clear();
        lock(&s.upstream).clear();
        lock(&s.violations).clear();
        s.tolerated.store(0, Ordering::SeqCst);
        let out = self.rt.block_on(async {
            let out = tokio::time::timeout(HANG, exchange(self.proxy, data, s)).await;
            // Let what the proxy sent upstream for this input land before judging:
            // forwarding futures finished, no upstream connection mid-request.
            let settle = async {
                while s.in_flight.load(Ordering::SeqCst) > 0 || s.partial.load(Ordering::SeqCst) > 0
                {
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
            };
            let settled = tokio::time::timeout(HANG, settle).await.is_ok();
            (out, settled)
        });
        let (out, settled) = out;
        let out = match out {
            Ok(bytes) => bytes,
            Err(_) => panic!(
                "the proxy kept the connection open {HANG:?} after the client half-closed: {:?}",
                String::from_utf8_lossy(data)
            ),
        };
        assert!(settled, "forwarding did not settle within {HANG:?}");
        let violations = lock(&s.violations).clone();
        assert!(
            violations.is_empty(),
            "the upstream received bytes a strict parser refuses: {violations:?}"
        );
        let accepted = lock(&s.accepted).clone();
        let upstream = lock(&s.upstream).clone();
        // Every request the upstream parsed carries the tag the forwarding location put
        // on a request it was handed; an untagged one was hidden inside another's bytes.
        // Requests of an earlier input that landed late are skipped.
        let prefix = format!("{input}.");
        let mut seen = vec![false; accepted.len()];
        let mut upstream_requests = 0;
        for (tag, method, target) in &upstream {
            let Some(tag) = tag else {
                panic!("the upstream got a request the proxy never forwarded: {method} {target}\n  accepted {accepted:?}");
            };
            let Some(k) = tag.strip_prefix(&prefix) else {
                continue;
            };
            let k: usize = match k.parse() {
                Ok(k) => k,
                Err(_) => panic!("malformed tag {tag:?}"),
            };
            let Some(expected) = accepted.get(k) else {
                panic!("tag {tag} names no accepted request: {accepted:?}");
            };
            assert!(
                (method, target) == (&expected.0, &expected.1),
                "request {k} changed between the front end and the upstream: {expected:?} became {method} {target}"
            );
            assert!(!seen[k], "request {k} reached the upstream twice");
            seen[k] = true;
            upstream_requests += 1;
        }
        let upstream = upstream_requests;
        let (forwarded, own) = count_responses(&out);
        assert!(
            forwarded <= upstream,
            "the client was answered {forwarded} times by an upstream that got {upstream} requests"
        );
        StackReport {
            accepted: accepted.len(),
            upstream_requests: upstream,
            forwarded_responses: forwarded,
            proxy_responses: own,
            tolerated: s.tolerated.load(Ordering::SeqCst),
        }
    }
}

fn root() -> Pattern {
    match Pattern::parse("/") {
        Some(p) => p,
        None => unreachable!("`/` is a valid location pattern"),
    }
}

/// Write everything, let the stack go quiet, half-close, read until the proxy closes.
///
/// The pause before the half-close matters: hyper (like nginx) takes a client's EOF as
/// the client leaving and drops a request still in progress, so half-closing at once
/// would abort nearly every request before it reached the upstream.
async fn exchange(addr: SocketAddr, data: &[u8], shared: &Shared) -> Vec<u8> {
    let Ok(s) = TcpStream::connect(addr).await else {
        return Vec::new();
    };
    let (mut r, mut w) = s.into_split();
    let received = Arc::new(AtomicUsize::new(0));
    let seen = received.clone();
    let reader = tokio::spawn(async move {
        let mut out = Vec::new();
        let mut buf = [0u8; 8192];
        loop {
            match r.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    out.extend_from_slice(buf.get(..n).unwrap_or_default());
                    seen.store(out.len(), Ordering::SeqCst);
                }
            }
        }
        out
    });
    let _ = w.write_all(data).await;
    if data.windows(2).any(|p| p == b"\n\n" || p == b"\n\r") {
        // Something may be a complete head: wait until nothing moves for 1 ms.
        let snapshot = || {
            (
                lock(&shared.accepted).len(),
                lock(&shared.upstream).len(),
                shared.in_flight.load(Ordering::SeqCst),
                shared.partial.load(Ordering::SeqCst),
                received.load(Ordering::SeqCst),
            )
        };
        let mut last = snapshot();
        loop {
            tokio::time::sleep(Duration::from_millis(1)).await;
            let now = snapshot();
            // Quiet, even with a forward in flight: it may be waiting for body bytes
            // the input does not have, which only the half-close will settle.
            if now == last {
                break;
            }
            last = now;
        }
    }
    let _ = w.shutdown().await;
    reader.await.unwrap_or_default()
}

/// Count the responses in what the client received: (from the upstream, from the proxy).
/// The fuzz upstream marks its own with `x-fuzz-upstream`.
fn count_responses(out: &[u8]) -> (usize, usize) {
    let mut forwarded = 0;
    let mut own = 0;
    let mut rest = out;
    while let Some(end) = rest.windows(4).position(|w| w == b"\r\n\r\n") {
        let head =
            String::from_utf8_lossy(rest.get(..end).unwrap_or_default()).to_ascii_lowercase();
        if !head.starts_with("http/1.") {
            break;
        }
        if head.contains("\r\nx-fuzz-upstream:") {
            forwarded += 1;
        } else {
            own += 1;
        }
        let len: usize = head
            .lines()
            .find_map(|l| l.strip_prefix("content-length:"))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0);
        rest = rest.get(end + 4 + len..).unwrap_or_default();
    }
    (forwarded, own)
}

/// The upstream: a raw listener that parses strictly and answers each complete request.
async fn upstream_loop(listener: TcpListener, shared: Arc<Shared>) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        tokio::spawn(upstream_conn(stream, shared.clone()));
    }
}

async fn upstream_conn(mut s: TcpStream, shared: Arc<Shared>) {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 16 * 1024];
    let mut partial = Partial::new(&shared);
    loop {
        loop {
            let (req, used) = match strict::parse_request(&buf) {
                Ok(Some(pair)) => pair,
                Ok(None) => break,
                Err(v) if TOLERATED.contains(&v.0.as_str()) => {
                    shared.tolerated.fetch_add(1, Ordering::SeqCst);
                    return;
                }
                Err(v) => {
                    lock(&shared.violations).push(format!(
                        "{}: {:?}",
                        v.0,
                        String::from_utf8_lossy(&buf)
                    ));
                    return;
                }
            };
            buf.drain(..used.min(buf.len()));
            let tag = req.one("x-fuzz-seq");
            lock(&shared.upstream).push((tag, req.method.clone(), req.target.clone()));
            let resp: &[u8] = if req.method == "HEAD" {
                b"HTTP/1.1 200 OK\r\nx-fuzz-upstream: 1\r\ncontent-length: 0\r\n\r\n"
            } else {
                b"HTTP/1.1 200 OK\r\nx-fuzz-upstream: 1\r\ncontent-length: 2\r\n\r\nok"
            };
            if s.write_all(resp).await.is_err() {
                return;
            }
        }
        partial.set(!buf.is_empty());
        let n = match s.read(&mut chunk).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        buf.extend_from_slice(chunk.get(..n).unwrap_or_default());
    }
}

/// Counts an upstream connection holding a partial request, until it completes or the
/// connection ends.
struct Partial<'a> {
    shared: &'a Shared,
    on: bool,
}

impl<'a> Partial<'a> {
    fn new(shared: &'a Shared) -> Self {
        Partial { shared, on: false }
    }

    fn set(&mut self, on: bool) {
        if on != self.on {
            if on {
                self.shared.partial.fetch_add(1, Ordering::SeqCst);
            } else {
                self.shared.partial.fetch_sub(1, Ordering::SeqCst);
            }
            self.on = on;
        }
    }
}

impl Drop for Partial<'_> {
    fn drop(&mut self) {
        self.set(false);
    }
}

/// The forwarding location, recording each request it is handed and counting the
/// forwards in flight.
#[derive(Clone)]
struct Counting {
    inner: Forward,
    shared: Arc<Shared>,
}

impl tower_service::Service<Request> for Counting {
    type Response = Response;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Response, Infallible>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request) -> Self::Future {
        // An absolute-form target with an empty path (`http://h?q`) goes upstream with
        // `/` as its path (RFC 9112 §3.2.1); raw non-ASCII bytes go percent-encoded.
        let target = match req.uri().path_and_query() {
            None => "/".to_owned(),
            Some(pq) if !pq.as_str().is_ascii() => crate::upstream::percent_encode_non_ascii(pq)
                .map_or_else(|_| pq.as_str().to_owned(), |pq| pq.as_str().to_owned()),
            Some(pq) => pq.as_str().to_owned(),
        };
        let target = match target.as_str() {
            "" => "/".to_owned(),
            t if t.starts_with('?') => format!("/{t}"),
            _ => target,
        };
        let k = {
            let mut accepted = lock(&self.shared.accepted);
            accepted.push((req.method().as_str().to_owned(), target));
            accepted.len() - 1
        };
        let input = self.shared.input.load(Ordering::SeqCst);
        if let Ok(tag) = http::HeaderValue::try_from(format!("{input}.{k}")) {
            req.headers_mut().insert("x-fuzz-seq", tag);
        }
        self.shared.in_flight.fetch_add(1, Ordering::SeqCst);
        let guard = InFlight(self.shared.clone());
        let fut = self.inner.call(req);
        Box::pin(async move {
            let _guard = guard;
            fut.await
        })
    }
}

struct InFlight(Arc<Shared>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::SeqCst);
    }
}
