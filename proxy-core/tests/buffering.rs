//! Request and response buffering over real sockets: a hyper upstream on 127.0.0.1, the
//! layers served by hyper in front of `Forward`, raw TCP clients.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body, Frame};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use proxy_core::buffer::{BodyLimitLayer, RequestBufferLayer, ResponseBufferLayer};
use proxy_core::upstream::{ClientConfig, Forward, UpstreamClient};
use proxy_core::{Error, ProxyBody};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;
use tower::Layer;

mod support;
use support::*;

// ---- support ----------------------------------------------------------------------

fn forward(upstream: SocketAddr) -> Forward {
    Forward::new(UpstreamClient::new(ClientConfig::default()), upstream)
}

/// Read a response head from a raw stream: (status, head text, body bytes already read).
async fn read_head(stream: &mut TcpStream) -> (u16, String, Vec<u8>) {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end]).into_owned();
            let status = head[9..12].parse().unwrap();
            return (status, head, buf[end + 4..].to_vec());
        }
        let n = stream.read(&mut chunk).await.unwrap();
        assert!(n > 0, "connection closed before a response head");
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// Wait for `cond` to hold, failing the test at the deadline.
async fn wait_until(what: &str, within: Duration, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + within;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// The files this process holds open under `dir`, with their sizes (Linux: /proc).
fn open_files_under(dir: &Path) -> Vec<(PathBuf, u64)> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir("/proc/self/fd").unwrap().flatten() {
        let Ok(target) = std::fs::read_link(entry.path()) else {
            continue;
        };
        if target.starts_with(dir) {
            let size = std::fs::metadata(entry.path())
                .map(|m| m.len())
                .unwrap_or(0);
            out.push((target, size));
        }
    }
    out
}

const PERIOD: usize = 251 * 256;

fn reference() -> Bytes {
    Bytes::from((0..PERIOD).map(|i| (i % 251) as u8).collect::<Vec<u8>>())
}

/// Whether `chunk`, found at `offset` in the stream, matches the repeating pattern.
fn matches_pattern(reference: &[u8], offset: usize, chunk: &[u8]) -> bool {
    let mut at = offset;
    let mut rest = chunk;
    while !rest.is_empty() {
        let start = at % PERIOD;
        let take = rest.len().min(PERIOD - start);
        if rest[..take] != reference[start..start + take] {
            return false;
        }
        rest = &rest[take..];
        at += take;
    }
    true
}

/// A response body of `copies` × the pattern that records when it has been sent entirely.
struct Pattern {
    chunk: Bytes,
    left: usize,
    done: Arc<AtomicBool>,
}

impl Body for Pattern {
    type Data = Bytes;
    type Error = Error;
    fn poll_frame(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Error>>> {
        if self.left == 0 {
            return Poll::Ready(None);
        }
        self.left -= 1;
        if self.left == 0 {
            // hyper may not poll again after the declared length is complete.
            self.done.store(true, Ordering::SeqCst);
        }
        Poll::Ready(Some(Ok(Frame::data(self.chunk.clone()))))
    }
    fn is_end_stream(&self) -> bool {
        self.left == 0
    }
    fn size_hint(&self) -> http_body::SizeHint {
        http_body::SizeHint::with_exact((self.left * self.chunk.len()) as u64)
    }
}

/// An upstream answering every request with `copies` × the pattern.
async fn pattern_upstream(copies: usize) -> (SocketAddr, Arc<AtomicBool>) {
    let done = Arc::new(AtomicBool::new(false));
    let flag = done.clone();
    let (addr, _) = upstream_counting_connections(move |_req| {
        let body = Pattern {
            chunk: reference(),
            left: copies,
            done: flag.clone(),
        };
        async move { http::Response::new(ProxyBody::boxed(body)) }
    })
    .await;
    (addr, done)
}

/// Read the rest of a `total`-byte pattern body and check every byte.
async fn drain_pattern(stream: &mut TcpStream, already: Vec<u8>, total: usize) {
    let reference = reference();
    assert!(matches_pattern(&reference, 0, &already));
    let mut got = already.len();
    let mut buf = vec![0u8; 256 * 1024];
    while got < total {
        let n = stream.read(&mut buf).await.unwrap();
        assert!(n > 0, "closed after {got} of {total} bytes");
        assert!(
            matches_pattern(&reference, got, &buf[..n]),
            "corrupt at {got}"
        );
        got += n;
    }
    assert_eq!(got, total);
}

// ---- request buffering --------------------------------------------------------------

/// An upstream that answers with the length of the body it got and whether it was
/// sent with a Content-Length.
async fn echo_upstream() -> (SocketAddr, Arc<AtomicUsize>) {
    upstream_counting_connections(|req: http::Request<Incoming>| async move {
        let cl = req.headers().contains_key(http::header::CONTENT_LENGTH);
        let body = req.into_body().collect().await.unwrap().to_bytes();
        let ok = body.iter().enumerate().all(|(i, b)| *b == (i % 251) as u8);
        http::Response::new(ProxyBody::from(format!("{} cl={cl} ok={ok}", body.len())))
    })
    .await
}

#[tokio::test]
async fn a_slow_upload_opens_no_upstream_connection_until_it_is_complete() {
    let (upstream, accepts) = echo_upstream().await;
    let dir = tempfile::tempdir().unwrap();
    let dir_path = dir.path().canonicalize().unwrap();
    let layer = RequestBufferLayer::new()
        .memory_limit(1024)
        .temp_dir(&dir_path);
    let proxy = serve(layer.layer(forward(upstream))).await;

    let body: Vec<u8> = (0..10_000).map(|i| (i % 251) as u8).collect();
    let mut client = TcpStream::connect(proxy).await.unwrap();
    client
        .write_all(b"POST /upload HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n\r\n")
        .await
        .unwrap();
    // The first 4 KiB: past the memory part, so the proxy spills it to a file; once the
    // file exists, the proxy has demonstrably been reading the body.
    for part in body[..4000].chunks(1000) {
        client
            .write_all(format!("{:x}\r\n", part.len()).as_bytes())
            .await
            .unwrap();
        client.write_all(part).await.unwrap();
        client.write_all(b"\r\n").await.unwrap();
    }
    wait_until("the spill file", Duration::from_secs(5), || {
        open_files_under(&dir_path)
            .iter()
            .any(|(_, size)| *size >= 3000)
    })
    .await;
    assert_eq!(
        accepts.load(Ordering::SeqCst),
        0,
        "upstream connected mid-upload"
    );
    // The client is slow: nothing reaches the upstream meanwhile.
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(
        accepts.load(Ordering::SeqCst),
        0,
        "upstream connected mid-upload"
    );

    for part in body[4000..].chunks(1000) {
        client
            .write_all(format!("{:x}\r\n", part.len()).as_bytes())
            .await
            .unwrap();
        client.write_all(part).await.unwrap();
        client.write_all(b"\r\n").await.unwrap();
    }
    client.write_all(b"0\r\n\r\n").await.unwrap();
    let (status, _, mut rest) = read_head(&mut client).await;
    assert_eq!(status, 200);
    while !rest.ends_with(b"ok=true") && !rest.ends_with(b"ok=false") {
        let mut buf = [0u8; 256];
        let n = client.read(&mut buf).await.unwrap();
        assert!(n > 0);
        rest.extend_from_slice(&buf[..n]);
    }
    assert_eq!(String::from_utf8(rest).unwrap(), "10000 cl=true ok=true");
    assert_eq!(accepts.load(Ordering::SeqCst), 1);
    wait_until("the spill file to go", Duration::from_secs(5), || {
        open_files_under(&dir_path).is_empty()
    })
    .await;
    assert_eq!(std::fs::read_dir(&dir_path).unwrap().count(), 0);
}

#[tokio::test]
async fn a_body_over_the_limit_is_413_and_nothing_reaches_the_upstream() {
    let (upstream, accepts) = echo_upstream().await;
    let stack = tower::ServiceBuilder::new()
        .layer(BodyLimitLayer::new(1000))
        .layer(
            RequestBufferLayer::new()
                .max_body_size(1000)
                .memory_limit(100),
        )
        .service(forward(upstream));
    let proxy = serve(stack).await;

    // Declared: refused before any body byte is read.
    let mut client = TcpStream::connect(proxy).await.unwrap();
    client
        .write_all(b"POST / HTTP/1.1\r\nhost: x\r\ncontent-length: 5000\r\n\r\n")
        .await
        .unwrap();
    let (status, head, _) = read_head(&mut client).await;
    assert_eq!(status, 413);
    assert!(head.to_ascii_lowercase().contains("connection: close"));

    // Chunked: refused once it passes the limit.
    let mut client = TcpStream::connect(proxy).await.unwrap();
    client
        .write_all(b"POST / HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n\r\n")
        .await
        .unwrap();
    for _ in 0..3 {
        client.write_all(b"1f4\r\n").await.unwrap();
        client.write_all(&[b'a'; 500]).await.unwrap();
        client.write_all(b"\r\n").await.unwrap();
    }
    let (status, _, _) = read_head(&mut client).await;
    assert_eq!(status, 413);
    assert_eq!(accepts.load(Ordering::SeqCst), 0);
}

// ---- response buffering -------------------------------------------------------------

#[tokio::test]
async fn a_slow_reader_does_not_hold_the_upstream() {
    // 32 MiB: more than the kernel's socket buffers between the three parties can hold,
    // so without buffering the upstream could not finish while the client reads nothing.
    let copies = 32 * 1024 * 1024 / PERIOD + 1;
    let total = copies * PERIOD;
    let (upstream, sent_everything) = pattern_upstream(copies).await;
    let dir = tempfile::tempdir().unwrap();
    let layer = ResponseBufferLayer::new().temp_dir(dir.path());
    let proxy = serve(layer.layer(forward(upstream))).await;

    let mut client = TcpStream::connect(proxy).await.unwrap();
    client
        .write_all(b"GET /big HTTP/1.1\r\nhost: x\r\n\r\n")
        .await
        .unwrap();
    // The client reads nothing; the upstream still gets to send everything.
    wait_until(
        "the upstream to finish sending",
        Duration::from_secs(20),
        || sent_everything.load(Ordering::SeqCst),
    )
    .await;
    let (status, _, rest) = read_head(&mut client).await;
    assert_eq!(status, 200);
    drain_pattern(&mut client, rest, total).await;
}

#[tokio::test]
async fn without_buffering_the_upstream_waits_for_the_client() {
    // The control for the test above: the same exchange streamed.
    let copies = 32 * 1024 * 1024 / PERIOD + 1;
    let (upstream, sent_everything) = pattern_upstream(copies).await;
    let proxy = serve(forward(upstream)).await;
    let mut client = TcpStream::connect(proxy).await.unwrap();
    client
        .write_all(b"GET /big HTTP/1.1\r\nhost: x\r\n\r\n")
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(!sent_everything.load(Ordering::SeqCst));
}

#[tokio::test]
async fn a_100_mib_response_spills_to_disk_and_the_file_goes_away() {
    let copies = 100 * 1024 * 1024 / PERIOD + 1;
    let total = copies * PERIOD;
    let (upstream, sent_everything) = pattern_upstream(copies).await;
    let dir = tempfile::tempdir().unwrap();
    let dir_path = dir.path().canonicalize().unwrap();
    let memory = 64 * 1024;
    let layer = ResponseBufferLayer::new()
        .memory_limit(memory)
        .temp_dir(&dir_path);
    let proxy = serve(layer.layer(forward(upstream))).await;

    let mut client = TcpStream::connect(proxy).await.unwrap();
    client
        .write_all(b"GET /huge HTTP/1.1\r\nhost: x\r\n\r\n")
        .await
        .unwrap();
    wait_until(
        "the upstream to finish sending",
        Duration::from_secs(30),
        || sent_everything.load(Ordering::SeqCst),
    )
    .await;
    // All but what the memory part and the sockets hold is in the file: the proxy did not
    // keep the response in memory.
    wait_until("the spill file to fill", Duration::from_secs(30), || {
        open_files_under(&dir_path)
            .iter()
            .any(|(_, size)| *size as usize >= total - memory - 16 * 1024 * 1024)
    })
    .await;
    assert_eq!(
        std::fs::read_dir(&dir_path).unwrap().count(),
        0,
        "spill files are unlinked"
    );
    let (status, _, rest) = read_head(&mut client).await;
    assert_eq!(status, 200);
    drain_pattern(&mut client, rest, total).await;
    wait_until(
        "the spill file to be closed",
        Duration::from_secs(5),
        || open_files_under(&dir_path).is_empty(),
    )
    .await;
}

#[tokio::test]
async fn a_client_abort_removes_the_spill_file() {
    let copies = 8 * 1024 * 1024 / PERIOD + 1;
    let (upstream, _) = pattern_upstream(copies).await;
    let dir = tempfile::tempdir().unwrap();
    let dir_path = dir.path().canonicalize().unwrap();
    let layer = ResponseBufferLayer::new()
        .memory_limit(1024)
        .temp_dir(&dir_path);
    let proxy = serve(layer.layer(forward(upstream))).await;
    let mut client = TcpStream::connect(proxy).await.unwrap();
    client
        .write_all(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n")
        .await
        .unwrap();
    wait_until("a spill file", Duration::from_secs(10), || {
        !open_files_under(&dir_path).is_empty()
    })
    .await;
    drop(client);
    wait_until(
        "the spill file to be closed",
        Duration::from_secs(10),
        || open_files_under(&dir_path).is_empty(),
    )
    .await;
}

#[tokio::test]
async fn x_accel_buffering_no_streams_and_is_not_passed_on() {
    let copies = 32 * 1024 * 1024 / PERIOD + 1;
    let done = Arc::new(AtomicBool::new(false));
    let flag = done.clone();
    let (upstream, _) = upstream_counting_connections(move |_req| {
        let body = Pattern {
            chunk: reference(),
            left: copies,
            done: flag.clone(),
        };
        async move {
            let mut resp = http::Response::new(ProxyBody::boxed(body));
            resp.headers_mut()
                .insert("x-accel-buffering", http::HeaderValue::from_static("no"));
            resp
        }
    })
    .await;
    let proxy = serve(ResponseBufferLayer::new().layer(forward(upstream))).await;
    let mut client = TcpStream::connect(proxy).await.unwrap();
    client
        .write_all(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n")
        .await
        .unwrap();
    let (status, head, _) = read_head(&mut client).await;
    assert_eq!(status, 200);
    assert!(!head.to_ascii_lowercase().contains("x-accel-buffering"));
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        !done.load(Ordering::SeqCst),
        "streamed responses are not read ahead"
    );
}

/// A chunked response body: `first`, then `rest` once the test opens the gate.
struct Gated {
    first: Option<Bytes>,
    gate: Option<tokio::sync::oneshot::Receiver<()>>,
    rest: Option<Bytes>,
    done: Arc<AtomicBool>,
}

impl Body for Gated {
    type Data = Bytes;
    type Error = Error;
    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Error>>> {
        if let Some(first) = self.first.take() {
            return Poll::Ready(Some(Ok(Frame::data(first))));
        }
        if let Some(gate) = &mut self.gate {
            let _ = std::task::ready!(std::future::Future::poll(Pin::new(gate), cx));
            self.gate = None;
        }
        match self.rest.take() {
            Some(rest) => {
                self.done.store(true, Ordering::SeqCst);
                Poll::Ready(Some(Ok(Frame::data(rest))))
            }
            None => Poll::Ready(None),
        }
    }
}

#[tokio::test]
async fn small_responses_and_partly_ready_ones_reuse_one_upstream_connection() {
    let gates = Arc::new(std::sync::Mutex::new(Vec::new()));
    let done = Arc::new(AtomicBool::new(false));
    let (g, flag) = (gates.clone(), done.clone());
    let (upstream, connections) = upstream_counting_connections(move |req| {
        let (g, flag) = (g.clone(), flag.clone());
        async move {
            if req.uri().path() == "/small" {
                return http::Response::new(ProxyBody::from("hello"));
            }
            let (tx, rx) = tokio::sync::oneshot::channel();
            g.lock().unwrap().push(tx);
            http::Response::new(ProxyBody::boxed(Gated {
                first: Some(Bytes::from_static(b"first ")),
                gate: Some(rx),
                rest: Some(Bytes::from_static(b"rest")),
                done: flag,
            }))
        }
    })
    .await;
    let proxy = serve(ResponseBufferLayer::new().layer(forward(upstream))).await;
    let mut client = TcpStream::connect(proxy).await.unwrap();
    // Complete with its head: answered from memory, the upstream connection reused.
    for _ in 0..2 {
        client
            .write_all(b"GET /small HTTP/1.1\r\nhost: x\r\n\r\n")
            .await
            .unwrap();
        let (status, head, mut body) = read_head(&mut client).await;
        assert_eq!(status, 200);
        assert!(head.to_ascii_lowercase().contains("content-length: 5"));
        while body.len() < 5 {
            let mut buf = [0u8; 64];
            let n = client.read(&mut buf).await.unwrap();
            assert!(n > 0);
            body.extend_from_slice(&buf[..n]);
        }
        assert_eq!(&body[..], b"hello");
    }
    // Partly ready: the first chunk reaches the client, the rest follows from the task.
    client
        .write_all(b"GET /gated HTTP/1.1\r\nhost: x\r\n\r\n")
        .await
        .unwrap();
    let (status, head, mut body) = read_head(&mut client).await;
    assert_eq!(status, 200);
    assert!(head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked"));
    let expected = b"6\r\nfirst \r\n4\r\nrest\r\n0\r\n\r\n";
    wait_until("the gated request", Duration::from_secs(5), || {
        !gates.lock().unwrap().is_empty()
    })
    .await;
    for tx in gates.lock().unwrap().drain(..) {
        let _ = tx.send(());
    }
    wait_until(
        "the upstream to send the rest",
        Duration::from_secs(5),
        || done.load(Ordering::SeqCst),
    )
    .await;
    while body.len() < expected.len() {
        let mut buf = [0u8; 64];
        let n = client.read(&mut buf).await.unwrap();
        assert!(n > 0, "closed after {:?}", String::from_utf8_lossy(&body));
        body.extend_from_slice(&buf[..n]);
    }
    assert_eq!(&body[..], &expected[..]);
    assert_eq!(connections.load(Ordering::SeqCst), 1);
}
