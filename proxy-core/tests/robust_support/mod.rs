//! Pieces shared by the robustness tests (`smuggling.rs`, `soak.rs`): a strict RFC 9112
//! request parser, an upstream that records the raw bytes it receives on a plain
//! `TcpListener` (no HTTP library in the way), a small response reader for raw clients,
//! and process-level probes (RSS, file-descriptor limits).
//!
//! The parser is deliberately stricter than RFC 9112 allows a recipient to be: it is the
//! judge of what the proxy *sends*, and a proxy re-serialising a request has no reason to
//! use obs-fold, bare LF, chunk extensions, duplicate framing headers or leading zeros.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// How long any wait in these tests may last before the test fails.
#[path = "../support/mod.rs"]
pub mod support;
/// Write `bytes` on a fresh connection and read until the proxy closes it.
pub use support::raw as exchange;

pub const DEADLINE: Duration = Duration::from_secs(10);

pub use proxy_core::testing::strict::*;

/// What a [`RawUpstream`] recorded.
#[derive(Debug, Default)]
pub struct Record {
    /// The raw bytes of each connection, in accept order.
    pub raw: Vec<Vec<u8>>,
    /// Every request parsed, in arrival order.
    pub requests: Vec<Parsed>,
    /// Every strict-parser violation (the connection was closed after it).
    pub violations: Vec<Violation>,
    /// Bytes that arrived right behind an upgrade request, before the 101 went out.
    pub early: Vec<u8>,
    /// Bytes received on upgraded connections, after the 101.
    pub tunnelled: Vec<u8>,
}

/// How a [`RawUpstream`] answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Every request gets `200` with `X-Seq: n` and the body `METHOD TARGET BODYLEN`.
    Echo,
    /// Requests with an `Upgrade` header get a 101 after `grace` (so bytes the proxy must
    /// not forward early have had their chance), then the connection echoes raw bytes.
    Upgrade {
        /// How long the upstream watches for early bytes before answering 101.
        grace: Duration,
    },
    /// Requests with an `Upgrade` header are refused with a plain 200; no tunnel.
    RefuseUpgrade,
    /// Every request gets a 101 at once, asked for or not, then raw echo.
    Unsolicited101,
}

/// An upstream on a raw `TcpListener` that records every byte it receives and judges
/// each request with [`parse_request`].
pub struct RawUpstream {
    /// Where it listens.
    pub addr: SocketAddr,
    record: Arc<Mutex<Record>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for RawUpstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl RawUpstream {
    /// Start one on an ephemeral loopback port.
    pub async fn start(mode: Mode) -> RawUpstream {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let record = Arc::new(Mutex::new(Record::default()));
        let rec = record.clone();
        let task = tokio::spawn(async move {
            let mut conns = tokio::task::JoinSet::new();
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                let index = {
                    let mut r = rec.lock().unwrap();
                    r.raw.push(Vec::new());
                    r.raw.len() - 1
                };
                conns.spawn(serve_raw(stream, index, rec.clone(), mode));
            }
        });
        RawUpstream { addr, record, task }
    }

    /// Run `f` on the record.
    pub fn with<T>(&self, f: impl FnOnce(&Record) -> T) -> T {
        f(&self.record.lock().unwrap())
    }

    /// The requests parsed so far.
    pub fn requests(&self) -> Vec<Parsed> {
        self.with(|r| r.requests.clone())
    }

    /// Fail the test if any byte the proxy sent broke the strict parser.
    pub fn assert_clean(&self) {
        self.with(|r| {
            assert!(
                r.violations.is_empty(),
                "the proxy sent something a strict parser refuses: {:?}\nraw: {:?}",
                r.violations,
                r.raw
                    .iter()
                    .map(|c| String::from_utf8_lossy(c).into_owned())
                    .collect::<Vec<_>>()
            );
        });
    }
}

async fn serve_raw(mut s: TcpStream, index: usize, rec: Arc<Mutex<Record>>, mode: Mode) {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 16 * 1024];
    loop {
        // Serve every complete request in the buffer.
        loop {
            let parsed = parse_request(&buf);
            let (req, used) = match parsed {
                Ok(Some(pair)) => pair,
                Ok(None) => break,
                Err(v) => {
                    rec.lock().unwrap().violations.push(v);
                    return;
                }
            };
            buf.drain(..used);
            let upgrade = !req.all("upgrade").is_empty();
            let seq = {
                let mut r = rec.lock().unwrap();
                r.requests.push(req.clone());
                r.requests.len()
            };
            match mode {
                Mode::Upgrade { grace } if upgrade => {
                    tunnel(&mut s, buf, grace, &rec).await;
                    return;
                }
                Mode::Unsolicited101 => {
                    tunnel(&mut s, buf, Duration::ZERO, &rec).await;
                    return;
                }
                _ => {
                    let body = format!("{} {} {}", req.method, req.target, req.body.len());
                    let head = format!(
                        "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nX-Seq: {seq}\r\n\r\n",
                        body.len()
                    );
                    let mut out = head.into_bytes();
                    if req.method != "HEAD" {
                        out.extend_from_slice(body.as_bytes());
                    }
                    if s.write_all(&out).await.is_err() {
                        return;
                    }
                }
            }
        }
        let n = match s.read(&mut chunk).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        rec.lock().unwrap().raw[index].extend_from_slice(&chunk[..n]);
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// Upgrade: watch for early bytes for `grace`, answer 101, then echo.
async fn tunnel(s: &mut TcpStream, mut early: Vec<u8>, grace: Duration, rec: &Mutex<Record>) {
    let mut chunk = [0u8; 4096];
    // A negative check needs a bounded wait: nothing may arrive before the 101.
    let watch = async {
        loop {
            match s.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => early.extend_from_slice(&chunk[..n]),
            }
        }
    };
    let _ = tokio::time::timeout(grace, watch).await;
    rec.lock().unwrap().early = early;
    let head =
        b"HTTP/1.1 101 Switching Protocols\r\nConnection: upgrade\r\nUpgrade: websocket\r\n\r\n";
    if s.write_all(head).await.is_err() {
        return;
    }
    loop {
        let n = match s.read(&mut chunk).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        rec.lock().unwrap().tunnelled.extend_from_slice(&chunk[..n]);
        if s.write_all(&chunk[..n]).await.is_err() {
            return;
        }
    }
}

/// One response as a raw client read it.
#[derive(Debug, Clone)]
pub struct RawResponse {
    /// The status code.
    pub status: u16,
    /// Header fields, names lowercased.
    pub headers: Vec<(String, String)>,
    /// The body (Content-Length or chunked framing; none for 1xx/204/304).
    pub body: Vec<u8>,
}

impl RawResponse {
    /// The first value of header `name` (lowercase).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    /// Whether this response came from the upstream (it carries `X-Seq`).
    pub fn forwarded(&self) -> bool {
        self.header("x-seq").is_some()
    }
}

/// Split everything a client received into responses. Panics (failing the test) if the
/// proxy's own output is malformed.
pub fn parse_responses(mut buf: &[u8]) -> Vec<RawResponse> {
    let mut out = Vec::new();
    while !buf.is_empty() {
        let text = String::from_utf8_lossy(buf).into_owned();
        let head_end = text
            .find("\r\n\r\n")
            .unwrap_or_else(|| panic!("incomplete response head: {text:?}"));
        let head = &text[..head_end];
        let mut lines = head.split("\r\n");
        let status_line = lines.next().unwrap();
        assert!(
            status_line.starts_with("HTTP/1.1 ") || status_line.starts_with("HTTP/1.0 "),
            "bad status line {status_line:?}"
        );
        let status: u16 = status_line[9..12].parse().unwrap();
        let headers: Vec<(String, String)> = lines
            .map(|l| {
                let (n, v) = l.split_once(':').unwrap();
                (n.to_ascii_lowercase(), v.trim().to_owned())
            })
            .collect();
        let mut rest = &buf[head_end + 4..];
        let mut resp = RawResponse {
            status,
            headers,
            body: Vec::new(),
        };
        if status == 101 {
            resp.body = rest.to_vec();
            out.push(resp);
            return out;
        }
        if let Some(cl) = resp.header("content-length") {
            let n: usize = cl.parse().unwrap();
            resp.body = rest[..n].to_vec();
            rest = &rest[n..];
        } else if resp
            .header("transfer-encoding")
            .is_some_and(|v| v.eq_ignore_ascii_case("chunked"))
        {
            let (body, used) = parse_chunked(rest, 0).unwrap().unwrap();
            resp.body = body;
            rest = &rest[used..];
        } else if !(status == 204 || status == 304 || (100..200).contains(&status)) {
            // Close-delimited.
            resp.body = rest.to_vec();
            rest = &[];
        }
        out.push(resp);
        buf = rest;
    }
    out
}

/// Wait until `cond` holds, failing after `deadline`.
pub async fn wait_until(deadline: Duration, what: &str, mut cond: impl FnMut() -> bool) {
    let start = std::time::Instant::now();
    while !cond() {
        assert!(start.elapsed() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Resident set size of this process in KiB (Linux), from `/proc/self/status`.
pub fn rss_kib() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// (soft, hard) open-file limits of this process, from `/proc/self/limits`.
pub fn nofile_limits() -> Option<(u64, u64)> {
    let limits = std::fs::read_to_string("/proc/self/limits").ok()?;
    let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
    let mut nums = line
        .split_whitespace()
        .filter_map(|w| w.parse::<u64>().ok());
    Some((nums.next()?, nums.next()?))
}

/// Raise this process's soft open-file limit to its hard limit with util-linux `prlimit`
/// (no libc binding needed). Returns the soft limit in force afterwards.
pub fn raise_nofile() -> u64 {
    let Some((soft, hard)) = nofile_limits() else {
        return 1024;
    };
    if soft < hard {
        let pid = std::process::id().to_string();
        let _ = std::process::Command::new("prlimit")
            .args(["--pid", &pid, &format!("--nofile={hard}:{hard}")])
            .status();
    }
    nofile_limits().map_or(soft, |(s, _)| s)
}

/// A proxy on an ephemeral port whose [`ServerStats`](proxy_core::server::ServerStats)
/// the test can watch.
pub struct StatsProxy {
    /// Where it listens.
    pub addr: SocketAddr,
    /// The server's live counters.
    pub stats: Arc<proxy_core::server::ServerStats>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<std::io::Result<()>>>,
}

impl StatsProxy {
    /// Serve `service` with `config`.
    pub async fn start<S>(service: S, config: proxy_core::server::HttpConfig) -> StatsProxy
    where
        S: tower::Service<
                proxy_core::Request,
                Response = proxy_core::Response,
                Error = std::convert::Infallible,
            > + Clone
            + Send
            + Sync
            + 'static,
        S::Future: Send + 'static,
    {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let server = proxy_core::server::Server::new(listener).config(config);
        let addr = server.local_addr().unwrap();
        let stats = server.stats();
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(server.serve(service, async move {
            let _ = rx.await;
        }));
        StatsProxy {
            addr,
            stats,
            stop: Some(tx),
            task: Some(task),
        }
    }

    /// Graceful shutdown; waits for the server task.
    pub async fn stop(mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        if let Some(task) = self.task.take() {
            tokio::time::timeout(DEADLINE, task)
                .await
                .expect("server did not stop")
                .unwrap()
                .unwrap();
        }
    }
}

impl Drop for StatsProxy {
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

/// A hyper HTTP/1.1 upstream that can be stopped hard (listener and every open
/// connection closed at once) and started again on the same port.
pub struct HyperUpstream {
    /// Where it listens.
    pub addr: SocketAddr,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl Drop for HyperUpstream {
    fn drop(&mut self) {
        if let Some(task) = &self.task {
            task.abort();
        }
    }
}

impl HyperUpstream {
    /// Listen on `addr` (port 0 for an ephemeral one) and answer with `handler`.
    pub async fn start<F, Fut>(addr: SocketAddr, handler: F) -> HyperUpstream
    where
        F: Fn(http::Request<hyper::body::Incoming>) -> Fut + Clone + Send + Sync + 'static,
        Fut: std::future::Future<Output = http::Response<proxy_core::ProxyBody>> + Send + 'static,
    {
        // SO_REUSEADDR, so a restart can bind the port its predecessor left in TIME_WAIT.
        let listener = proxy_core::server::ListenConfig::new(addr).bind().unwrap();
        let addr = listener.local_addr().unwrap();
        let task = tokio::spawn(async move {
            // Owned here: aborting this task aborts every connection with it.
            let mut conns = tokio::task::JoinSet::new();
            loop {
                let stream = tokio::select! {
                    r = listener.accept() => match r {
                        Ok((s, _)) => s,
                        Err(_) => return,
                    },
                    Some(_) = conns.join_next(), if !conns.is_empty() => continue,
                };
                let handler = handler.clone();
                conns.spawn(async move {
                    let svc = hyper::service::service_fn(move |req| {
                        let fut = handler(req);
                        async move { Ok::<_, std::convert::Infallible>(fut.await) }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        HyperUpstream {
            addr,
            task: Some(task),
        }
    }

    /// Stop hard: the listener and all connections close now.
    pub async fn kill(mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
            let _ = task.await;
        }
    }
}

/// Read one HTTP/1.1 response with a Content-Length body from `s`; returns its status.
pub async fn read_one_response(s: &mut TcpStream) -> std::io::Result<u16> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
            let status = head.get(9..12).and_then(|s| s.parse().ok()).unwrap_or(0);
            let len: usize = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .and_then(|v| v.trim().parse().ok())
                .unwrap_or(0);
            while buf.len() < end + 4 + len {
                let n = s.read(&mut chunk).await?;
                if n == 0 {
                    return Err(std::io::ErrorKind::UnexpectedEof.into());
                }
                buf.extend_from_slice(&chunk[..n]);
            }
            return Ok(status);
        }
        let n = s.read(&mut chunk).await?;
        if n == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}
