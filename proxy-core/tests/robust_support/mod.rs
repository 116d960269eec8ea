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
pub const DEADLINE: Duration = Duration::from_secs(10);

/// Largest header block the strict parser accepts.
const MAX_HEAD: usize = 64 * 1024;
/// Largest body the strict parser accepts.
const MAX_BODY: u64 = 64 * 1024 * 1024;

/// One request as the strict parser read it off the wire.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Parsed {
    /// The method token.
    pub method: String,
    /// The request target, as sent.
    pub target: String,
    /// Header fields in order, names lowercased, values with OWS trimmed.
    pub headers: Vec<(String, Vec<u8>)>,
    /// The decoded body.
    pub body: Vec<u8>,
    /// Framed with `Transfer-Encoding: chunked`.
    pub chunked: bool,
}

impl Parsed {
    /// Every value of header `name` (lowercase).
    pub fn all(&self, name: &str) -> Vec<&[u8]> {
        self.headers
            .iter()
            .filter(|(n, _)| n == name)
            .map(|(_, v)| v.as_slice())
            .collect()
    }

    /// The single value of header `name`, as text.
    pub fn one(&self, name: &str) -> Option<String> {
        let all = self.all(name);
        assert!(all.len() <= 1, "header {name} repeated: {all:?}");
        all.first().map(|v| String::from_utf8_lossy(v).into_owned())
    }
}

/// Why the strict parser refused the bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Violation(pub String);

fn bad<T>(why: impl Into<String>) -> Result<T, Violation> {
    Err(Violation(why.into()))
}

fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

/// A field value byte: VCHAR, obs-text, SP or HTAB. No CR, LF or NUL.
fn is_field_byte(b: u8) -> bool {
    b == b' ' || b == b'\t' || (0x21..=0x7e).contains(&b) || b >= 0x80
}

/// Finds the next CRLF-terminated line starting at `at`; a bare LF or bare CR is a
/// violation. Returns the line (without CRLF) and the index after it.
fn line(buf: &[u8], at: usize) -> Result<Option<(&[u8], usize)>, Violation> {
    let rest = buf.get(at..).unwrap_or_default();
    for (i, &b) in rest.iter().enumerate() {
        match b {
            b'\n' => return bad("bare LF"),
            b'\r' => {
                return match rest.get(i + 1) {
                    None => Ok(None),
                    Some(b'\n') => Ok(Some((&rest[..i], at + i + 2))),
                    Some(_) => bad("bare CR"),
                }
            }
            _ => {}
        }
    }
    Ok(None)
}

/// Parse one request from the start of `buf` with RFC 9112 rules applied strictly.
/// `Ok(None)`: more bytes are needed. `Ok(Some((req, used)))`: one request and the
/// number of bytes it took.
pub fn parse_request(buf: &[u8]) -> Result<Option<(Parsed, usize)>, Violation> {
    let Some((request_line, mut at)) = line(buf, 0)? else {
        if buf.len() > MAX_HEAD {
            return bad("request line too long");
        }
        return Ok(None);
    };
    let mut parts = request_line.split(|&b| b == b' ');
    let (Some(method), Some(target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return bad(format!(
            "request line is not three fields separated by single spaces: {:?}",
            String::from_utf8_lossy(request_line)
        ));
    };
    if method.is_empty() || !method.iter().copied().all(is_tchar) {
        return bad("method is not a token");
    }
    if version != b"HTTP/1.1" {
        return bad(format!(
            "version is not HTTP/1.1: {:?}",
            String::from_utf8_lossy(version)
        ));
    }
    // A proxy talks to its upstream in origin-form (or `*` for OPTIONS).
    let origin_form = target.first() == Some(&b'/');
    let asterisk = target == b"*" && method == b"OPTIONS";
    if !(origin_form || asterisk) {
        return bad("target is not in origin-form");
    }
    if !target.iter().all(|b| (0x21..=0x7e).contains(b)) || target.contains(&b'#') {
        return bad("target has bytes outside VCHAR or a fragment");
    }
    let mut headers = Vec::new();
    loop {
        let Some((field, next)) = line(buf, at)? else {
            if buf.len() > MAX_HEAD {
                return bad("header block too long");
            }
            return Ok(None);
        };
        at = next;
        if field.is_empty() {
            break;
        }
        if field[0] == b' ' || field[0] == b'\t' {
            return bad("obs-fold");
        }
        let Some(colon) = field.iter().position(|&b| b == b':') else {
            return bad("field line without a colon");
        };
        let (name, value) = (&field[..colon], &field[colon + 1..]);
        if name.is_empty() || !name.iter().copied().all(is_tchar) {
            return bad(format!(
                "field name is not a token: {:?}",
                String::from_utf8_lossy(name)
            ));
        }
        if !value.iter().copied().all(is_field_byte) {
            return bad("control byte in a field value");
        }
        let value = trim_ows(value);
        headers.push((
            String::from_utf8_lossy(name).to_ascii_lowercase(),
            value.to_vec(),
        ));
        if headers.len() > 200 {
            return bad("too many fields");
        }
    }
    let mut req = Parsed {
        method: String::from_utf8_lossy(method).into_owned(),
        target: String::from_utf8_lossy(target).into_owned(),
        headers,
        body: Vec::new(),
        chunked: false,
    };
    if req.all("host").len() != 1 {
        return bad("an HTTP/1.1 request needs exactly one Host");
    }
    let te = req.all("transfer-encoding");
    let cl = req.all("content-length");
    if !te.is_empty() && !cl.is_empty() {
        return bad("both Transfer-Encoding and Content-Length");
    }
    if cl.len() > 1 {
        return bad("Content-Length repeated");
    }
    if te.len() > 1 || te.first().is_some_and(|v| *v != b"chunked") {
        return bad("Transfer-Encoding other than one plain `chunked`");
    }
    if !te.is_empty() {
        req.chunked = true;
        let Some((body, used)) = parse_chunked(buf, at)? else {
            return Ok(None);
        };
        req.body = body;
        return Ok(Some((req, used)));
    }
    let len = match cl.first() {
        None => 0,
        Some(v) => parse_content_length(v)?,
    };
    let end = at as u64 + len;
    if (buf.len() as u64) < end {
        return Ok(None);
    }
    let end = end as usize;
    req.body = buf[at..end].to_vec();
    Ok(Some((req, end)))
}

/// `Content-Length`: 1*DIGIT, no sign, no leading zero unless it is `0`, bounded.
pub fn parse_content_length(v: &[u8]) -> Result<u64, Violation> {
    if v.is_empty() || !v.iter().all(u8::is_ascii_digit) {
        return bad(format!(
            "Content-Length is not 1*DIGIT: {:?}",
            String::from_utf8_lossy(v)
        ));
    }
    if v.len() > 1 && v[0] == b'0' {
        return bad("Content-Length with a leading zero");
    }
    if v.len() > 15 {
        return bad("Content-Length too large");
    }
    let n = v.iter().fold(0u64, |n, &d| n * 10 + u64::from(d - b'0'));
    if n > MAX_BODY {
        return bad("Content-Length too large");
    }
    Ok(n)
}

/// A chunked body: lowercase-or-uppercase hex sizes without leading zeros (except `0`),
/// no extensions, CRLF after each chunk, then trailer fields and the final CRLF.
fn parse_chunked(buf: &[u8], mut at: usize) -> Result<Option<(Vec<u8>, usize)>, Violation> {
    let mut body = Vec::new();
    loop {
        let Some((size_line, next)) = line(buf, at)? else {
            return Ok(None);
        };
        if size_line.is_empty() || size_line.len() > 15 {
            return bad("chunk size line empty or too long");
        }
        if !size_line.iter().all(u8::is_ascii_hexdigit) {
            return bad(format!(
                "chunk size line is not bare hex (extension, space or sign): {:?}",
                String::from_utf8_lossy(size_line)
            ));
        }
        if size_line.len() > 1 && size_line[0] == b'0' {
            return bad("chunk size with a leading zero");
        }
        let size = size_line.iter().fold(0u64, |n, &d| {
            n * 16 + u64::from(char::from(d).to_digit(16).unwrap_or(0))
        });
        if body.len() as u64 + size > MAX_BODY {
            return bad("chunked body too large");
        }
        at = next;
        if size == 0 {
            break;
        }
        let end = at + size as usize;
        if buf.len() < end + 2 {
            return Ok(None);
        }
        body.extend_from_slice(&buf[at..end]);
        if &buf[end..end + 2] != b"\r\n" {
            return bad("chunk data not followed by CRLF");
        }
        at = end + 2;
    }
    // Trailer section.
    loop {
        let Some((field, next)) = line(buf, at)? else {
            return Ok(None);
        };
        at = next;
        if field.is_empty() {
            return Ok(Some((body, at)));
        }
        let Some(colon) = field.iter().position(|&b| b == b':') else {
            return bad("trailer line without a colon");
        };
        let name = String::from_utf8_lossy(&field[..colon]).to_ascii_lowercase();
        if matches!(
            name.as_str(),
            "content-length" | "transfer-encoding" | "host" | "trailer"
        ) {
            return bad(format!("framing field {name} in a trailer"));
        }
    }
}

fn trim_ows(mut v: &[u8]) -> &[u8] {
    while let [b' ' | b'\t', rest @ ..] = v {
        v = rest;
    }
    while let [rest @ .., b' ' | b'\t'] = v {
        v = rest;
    }
    v
}

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

/// Write `bytes` on a fresh connection to `addr` and read until the proxy closes it.
pub async fn exchange(addr: SocketAddr, bytes: &[u8]) -> Vec<u8> {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(bytes).await.unwrap();
    read_to_close(&mut s).await
}

/// Read until EOF or reset; fails the test if the peer keeps the connection open past
/// the deadline.
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
        .expect("the proxy neither answered and closed nor closed");
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
