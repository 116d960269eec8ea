//! Idle HTTP/1 keep-alive connections are parked between requests with no HTTP state
//! (`HttpConfig::park_idle`): real sockets on 127.0.0.1, raw clients where the bytes on
//! the wire matter, the parked gauge of `ServerStats` to see a connection parked.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::convert::Infallible;
use std::sync::Arc;
use std::time::{Duration, Instant};

use http_body_util::BodyExt;
use proxy_core::server::{HttpConfig, Server, ServerStats};
use proxy_core::upstream::{ClientConfig, Forward, UpstreamClient};
use proxy_core::{ProxyBody, Request, Response};
use support::{read_to_close, wait_for, Upstream, DEADLINE};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// A server on an ephemeral port with its stats and a stop switch.
struct Running {
    addr: std::net::SocketAddr,
    stats: Arc<ServerStats>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<std::io::Result<()>>,
}

async fn start<S>(service: S, config: HttpConfig) -> Running
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
    let server = Server::new(listener).config(config);
    let stats = server.stats();
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(server.serve(service, async move {
        let _ = rx.await;
    }));
    Running {
        addr,
        stats,
        stop: Some(tx),
        task,
    }
}

/// Answers with the request's method and path; reads (and counts) the body first.
fn echo() -> impl tower::Service<
    Request,
    Response = Response,
    Error = Infallible,
    Future = impl Send + 'static,
> + Clone
       + Send
       + Sync
       + 'static {
    tower::service_fn(|req: Request| async move {
        let line = format!("{} {}", req.method(), req.uri().path());
        let body = req.into_body().collect().await.map(|c| c.to_bytes());
        let n = body.map(|b| b.len()).unwrap_or(0);
        Ok::<_, Infallible>(http::Response::new(ProxyBody::from(format!("{line} {n}"))))
    })
}

/// Answers at once without reading the request body.
fn hasty() -> impl tower::Service<
    Request,
    Response = Response,
    Error = Infallible,
    Future = impl Send + 'static,
> + Clone
       + Send
       + Sync
       + 'static {
    tower::service_fn(|_req: Request| async move {
        Ok::<_, Infallible>(http::Response::new(ProxyBody::from("early")))
    })
}

/// Parking after every response: the tests see each park at once.
fn config() -> HttpConfig {
    let mut c = HttpConfig::default();
    c.shutdown_linger = Duration::ZERO;
    c.park_after = Duration::ZERO;
    c
}

/// Read one response with a `Content-Length` body from a raw stream (after `buf`).
async fn read_response(s: &mut TcpStream, buf: &mut Vec<u8>) -> (String, String) {
    let read = async {
        loop {
            if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                let head = String::from_utf8_lossy(&buf[..end]).into_owned();
                let len: usize = head
                    .lines()
                    .find_map(|l| {
                        let (k, v) = l.split_once(':')?;
                        k.eq_ignore_ascii_case("content-length")
                            .then(|| v.trim().parse().unwrap())
                    })
                    .expect("content-length");
                if buf.len() >= end + 4 + len {
                    let body = String::from_utf8_lossy(&buf[end + 4..end + 4 + len]).into_owned();
                    buf.drain(..end + 4 + len);
                    return (head, body);
                }
            }
            let mut chunk = [0u8; 4096];
            let n = s.read(&mut chunk).await.unwrap();
            assert!(
                n > 0,
                "closed mid-response: {:?}",
                String::from_utf8_lossy(buf)
            );
            buf.extend_from_slice(&chunk[..n]);
        }
    };
    tokio::time::timeout(DEADLINE, read)
        .await
        .expect("no response")
}

#[tokio::test]
async fn keep_alive_requests_park_in_between_and_reuse_one_upstream_connection() {
    let upstream = Upstream::start(|seen| async move {
        http::Response::new(ProxyBody::from(format!("up {}", seen.uri.path())))
    })
    .await;
    let forward = Forward::new(UpstreamClient::new(ClientConfig::default()), upstream.addr);
    let server = start(forward, config()).await;
    let mut s = TcpStream::connect(server.addr).await.unwrap();
    // Before its first byte the connection is parked too.
    wait_for(|| server.stats.parked() == 1).await;
    let mut buf = Vec::new();
    for i in 0..20 {
        let req = format!("GET /r{i} HTTP/1.1\r\nHost: a.test\r\n\r\n");
        s.write_all(req.as_bytes()).await.unwrap();
        let (head, body) = read_response(&mut s, &mut buf).await;
        assert!(head.starts_with("HTTP/1.1 200"), "{head}");
        assert!(
            !head.to_ascii_lowercase().contains("connection: close"),
            "{head}"
        );
        assert_eq!(body, format!("up /r{i}"));
        wait_for(|| server.stats.parked() == 1).await;
    }
    assert_eq!(upstream.accepted(), 1);
    assert_eq!(server.stats.active(), 1);
}

#[tokio::test]
async fn pipelined_requests_are_answered_in_order() {
    let server = start(echo(), config()).await;
    let mut s = TcpStream::connect(server.addr).await.unwrap();
    let mut batch = String::new();
    for i in 0..5 {
        batch += &format!("GET /p{i} HTTP/1.1\r\nHost: a.test\r\n\r\n");
    }
    batch += "POST /last HTTP/1.1\r\nHost: a.test\r\nContent-Length: 3\r\n\r\nabc";
    s.write_all(batch.as_bytes()).await.unwrap();
    let mut buf = Vec::new();
    for i in 0..5 {
        let (_, body) = read_response(&mut s, &mut buf).await;
        assert_eq!(body, format!("GET /p{i} 0"));
    }
    let (_, body) = read_response(&mut s, &mut buf).await;
    assert_eq!(body, "POST /last 3");
    wait_for(|| server.stats.parked() == 1).await;
}

#[tokio::test]
async fn a_request_split_across_the_park_is_read_whole() {
    let server = start(echo(), config()).await;
    let mut s = TcpStream::connect(server.addr).await.unwrap();
    let mut buf = Vec::new();
    s.write_all(b"GET /one HTTP/1.1\r\nHost: a.test\r\n\r\n")
        .await
        .unwrap();
    assert_eq!(read_response(&mut s, &mut buf).await.1, "GET /one 0");
    wait_for(|| server.stats.parked() == 1).await;
    // The first bytes wake the connection, which reads the head on its own until it is
    // complete; the body comes while hyper serves the request.
    s.write_all(b"POST /tw").await.unwrap();
    s.write_all(b"o HTTP/1.1\r\nHost: a.test\r\nContent-Length: 4\r\n\r\nab")
        .await
        .unwrap();
    wait_for(|| server.stats.parked() == 0).await;
    s.write_all(b"cd").await.unwrap();
    assert_eq!(read_response(&mut s, &mut buf).await.1, "POST /two 4");
    wait_for(|| server.stats.parked() == 1).await;
}

#[tokio::test]
async fn a_head_sent_byte_by_byte_is_served_whole() {
    let server = start(echo(), config()).await;
    let mut s = TcpStream::connect(server.addr).await.unwrap();
    let mut buf = Vec::new();
    for round in 0..2 {
        let req = format!("GET /slow{round} HTTP/1.1\r\nHost: a.test\r\nX-Pad: abc\r\n\r\n");
        for b in req.as_bytes() {
            s.write_all(&[*b]).await.unwrap();
            s.flush().await.unwrap();
        }
        assert_eq!(
            read_response(&mut s, &mut buf).await.1,
            format!("GET /slow{round} 0")
        );
        wait_for(|| server.stats.parked() == 1).await;
    }
}

#[tokio::test]
async fn bare_line_feeds_end_a_head_as_hyper_reads_them() {
    let server = start(echo(), config()).await;
    let mut s = TcpStream::connect(server.addr).await.unwrap();
    let mut buf = Vec::new();
    s.write_all(b"GET /lf HTTP/1.1\nHost: a.test\n\n")
        .await
        .unwrap();
    assert_eq!(read_response(&mut s, &mut buf).await.1, "GET /lf 0");
}

#[tokio::test]
async fn a_first_head_incomplete_at_the_header_timeout_is_closed() {
    let mut c = config();
    c.header_read_timeout = Duration::from_millis(300);
    let server = start(echo(), c).await;
    let mut s = TcpStream::connect(server.addr).await.unwrap();
    let sent = Instant::now();
    s.write_all(b"GET / HTTP/1.1\r\nHost: a.te").await.unwrap();
    // No answer: hyper's header timer did the same (an incomplete head gets none).
    let rest = read_to_close(&mut s).await;
    assert!(rest.is_empty(), "{:?}", String::from_utf8_lossy(&rest));
    assert!(sent.elapsed() >= Duration::from_millis(250));
    wait_for(|| server.stats.active() == 0).await;
}

#[tokio::test]
async fn a_begun_keep_alive_request_has_the_header_timeout_not_the_keep_alive_one() {
    let mut c = config();
    c.header_read_timeout = Duration::from_millis(300);
    c.keep_alive_timeout = Some(Duration::from_secs(60));
    let server = start(echo(), c).await;
    let mut s = TcpStream::connect(server.addr).await.unwrap();
    let mut buf = Vec::new();
    s.write_all(b"GET /one HTTP/1.1\r\nHost: a.test\r\n\r\n")
        .await
        .unwrap();
    assert_eq!(read_response(&mut s, &mut buf).await.1, "GET /one 0");
    wait_for(|| server.stats.parked() == 1).await;
    let sent = Instant::now();
    s.write_all(b"GET /two HTTP/1.1\r\nHo").await.unwrap();
    // Closed well before the 60 s keep-alive timeout (read_to_close gives up after 10 s).
    let rest = read_to_close(&mut s).await;
    assert!(rest.is_empty(), "{:?}", String::from_utf8_lossy(&rest));
    assert!(sent.elapsed() >= Duration::from_millis(250));
}

#[tokio::test]
async fn bytes_that_are_not_http_get_400_at_once() {
    let mut c = config();
    c.header_read_timeout = Duration::from_secs(60);
    let server = start(echo(), c).await;
    let mut s = TcpStream::connect(server.addr).await.unwrap();
    // The start of a TLS ClientHello: no empty line will ever come.
    s.write_all(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03")
        .await
        .unwrap();
    let rest = read_to_close(&mut s).await;
    let text = String::from_utf8_lossy(&rest);
    assert!(text.starts_with("HTTP/1.1 400"), "{text:?}");
}

#[tokio::test]
async fn a_head_longer_than_the_first_buffer_goes_to_hyper_and_its_limits() {
    let server = start(echo(), config()).await;
    let mut s = TcpStream::connect(server.addr).await.unwrap();
    let mut buf = Vec::new();
    // 12 KiB: past the 8 KiB the driver reads itself, under max_header_size (32 KiB).
    let pad = "a".repeat(12 * 1024);
    s.write_all(format!("GET /long HTTP/1.1\r\nHost: a.test\r\nX-Pad: {pad}\r\n\r\n").as_bytes())
        .await
        .unwrap();
    assert_eq!(read_response(&mut s, &mut buf).await.1, "GET /long 0");
    // Sent slowly, in 1 KiB pieces, it is the same.
    let req = format!("GET /long2 HTTP/1.1\r\nHost: a.test\r\nX-Pad: {pad}\r\n\r\n");
    for piece in req.as_bytes().chunks(1024) {
        s.write_all(piece).await.unwrap();
        s.flush().await.unwrap();
    }
    assert_eq!(read_response(&mut s, &mut buf).await.1, "GET /long2 0");
    // Past max_header_size hyper answers 431 as before: smuggling.rs covers it.
}

#[tokio::test]
async fn a_parked_connection_is_closed_after_the_keep_alive_timeout() {
    let mut c = config();
    let timeout = Duration::from_millis(300);
    c.keep_alive_timeout = Some(timeout);
    let server = start(echo(), c).await;
    let mut s = TcpStream::connect(server.addr).await.unwrap();
    let mut buf = Vec::new();
    s.write_all(b"GET / HTTP/1.1\r\nHost: a.test\r\n\r\n")
        .await
        .unwrap();
    read_response(&mut s, &mut buf).await;
    let parked_at = Instant::now();
    let rest = read_to_close(&mut s).await;
    assert!(rest.is_empty(), "{rest:?}");
    assert!(parked_at.elapsed() >= timeout - Duration::from_millis(50));
    wait_for(|| server.stats.active() == 0 && server.stats.parked() == 0).await;
}

#[tokio::test]
async fn a_silent_new_connection_gets_the_header_timeout() {
    let mut c = config();
    c.header_read_timeout = Duration::from_millis(300);
    c.keep_alive_timeout = Some(Duration::from_secs(60));
    let server = start(echo(), c).await;
    let mut s = TcpStream::connect(server.addr).await.unwrap();
    let rest = read_to_close(&mut s).await;
    assert!(rest.is_empty());
    wait_for(|| server.stats.active() == 0).await;
}

#[tokio::test]
async fn shutdown_closes_parked_connections_at_once_and_lets_busy_ones_finish() {
    let (release, released) = tokio::sync::oneshot::channel::<()>();
    let released = Arc::new(tokio::sync::Mutex::new(Some(released)));
    let slow = tower::service_fn(move |req: Request| {
        let released = released.clone();
        async move {
            if req.uri().path() == "/slow" {
                if let Some(rx) = released.lock().await.take() {
                    let _ = rx.await;
                }
            }
            Ok::<_, Infallible>(http::Response::new(ProxyBody::from("done")))
        }
    });
    let mut c = config();
    c.shutdown_timeout = Duration::from_secs(30);
    let mut server = start(slow, c).await;
    let mut idle = TcpStream::connect(server.addr).await.unwrap();
    let mut buf = Vec::new();
    idle.write_all(b"GET / HTTP/1.1\r\nHost: a.test\r\n\r\n")
        .await
        .unwrap();
    read_response(&mut idle, &mut buf).await;
    let mut busy = TcpStream::connect(server.addr).await.unwrap();
    busy.write_all(b"GET /slow HTTP/1.1\r\nHost: a.test\r\n\r\n")
        .await
        .unwrap();
    wait_for(|| server.stats.parked() == 1 && server.stats.active() == 2).await;
    let _ = server.stop.take().unwrap().send(());
    // The parked one closes long before the 30 s deadline.
    let start = Instant::now();
    assert!(read_to_close(&mut idle).await.is_empty());
    assert!(start.elapsed() < Duration::from_secs(5));
    assert!(!server.task.is_finished());
    release.send(()).unwrap();
    let mut busy_buf = Vec::new();
    let (head, body) = read_response(&mut busy, &mut busy_buf).await;
    assert!(head.starts_with("HTTP/1.1 200"));
    assert_eq!(body, "done");
    assert!(read_to_close(&mut busy).await.is_empty());
    tokio::time::timeout(DEADLINE, server.task)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
}

#[tokio::test]
async fn close_requests_and_http_1_0_close_after_the_response() {
    let server = start(echo(), config()).await;
    for req in [
        "GET /a HTTP/1.0\r\n\r\n",
        "GET /b HTTP/1.1\r\nHost: a.test\r\nConnection: close\r\n\r\n",
        "GET /c HTTP/1.1\r\nHost: a.test\r\nConnection: keep-alive, close\r\n\r\n",
    ] {
        let mut s = TcpStream::connect(server.addr).await.unwrap();
        s.write_all(req.as_bytes()).await.unwrap();
        let out = String::from_utf8(read_to_close(&mut s).await).unwrap();
        assert!(out.starts_with("HTTP/1."), "{out}");
        assert!(out.ends_with(" 0"), "{req:?}: {out}");
    }
    // HTTP/1.0 asking for keep-alive is kept, and told so.
    let mut s = TcpStream::connect(server.addr).await.unwrap();
    s.write_all(b"GET /d HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
        .await
        .unwrap();
    let mut buf = Vec::new();
    let (head, body) = read_response(&mut s, &mut buf).await;
    assert!(
        head.to_ascii_lowercase().contains("connection: keep-alive"),
        "{head}"
    );
    assert_eq!(body, "GET /d 0");
    wait_for(|| server.stats.parked() == 1).await;
    s.write_all(b"GET /e HTTP/1.0\r\n\r\n").await.unwrap();
    let (_, body) = read_response(&mut s, &mut buf).await;
    assert_eq!(body, "GET /e 0");
    assert!(read_to_close(&mut s).await.is_empty());
}

#[tokio::test]
async fn the_request_limit_closes_with_the_last_response() {
    let mut c = config();
    c.max_requests_per_connection = 3;
    let server = start(echo(), c).await;
    let mut s = TcpStream::connect(server.addr).await.unwrap();
    let mut buf = Vec::new();
    for i in 0..3 {
        s.write_all(b"GET / HTTP/1.1\r\nHost: a.test\r\n\r\n")
            .await
            .unwrap();
        let (head, _) = read_response(&mut s, &mut buf).await;
        let closes = head.to_ascii_lowercase().contains("connection: close");
        assert_eq!(closes, i == 2, "{head}");
    }
    assert!(read_to_close(&mut s).await.is_empty());
}

/// A response sent before the request body was read must not leave the rest of that
/// body to be read as the next request: the connection closes, as hyper would close it.
#[tokio::test]
async fn an_unread_request_body_closes_the_connection() {
    let server = start(hasty(), config()).await;
    let mut s = TcpStream::connect(server.addr).await.unwrap();
    let smuggled = "GET /smuggled HTTP/1.1\r\nHost: a.test\r\n\r\n";
    let head = "POST / HTTP/1.1\r\nHost: a.test\r\nContent-Length: 100000\r\n\r\n";
    s.write_all(head.as_bytes()).await.unwrap();
    let mut buf = Vec::new();
    let (_, body) = read_response(&mut s, &mut buf).await;
    assert_eq!(body, "early");
    // What follows is body, not a request.
    let _ = s.write_all(smuggled.as_bytes()).await;
    let rest = read_to_close(&mut s).await;
    assert!(
        !String::from_utf8_lossy(&rest).contains("HTTP/1.1"),
        "{rest:?}"
    );
    assert_eq!(server.stats.parked(), 0);
}

#[tokio::test]
async fn a_request_body_read_whole_parks() {
    let server = start(echo(), config()).await;
    let mut s = TcpStream::connect(server.addr).await.unwrap();
    let mut buf = Vec::new();
    s.write_all(
        b"POST /u HTTP/1.1\r\nHost: a.test\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
    )
    .await
    .unwrap();
    assert_eq!(read_response(&mut s, &mut buf).await.1, "POST /u 3");
    wait_for(|| server.stats.parked() == 1).await;
    s.write_all(b"GET /v HTTP/1.1\r\nHost: a.test\r\n\r\n")
        .await
        .unwrap();
    assert_eq!(read_response(&mut s, &mut buf).await.1, "GET /v 0");
}

#[tokio::test]
async fn a_busy_connection_stays_with_hyper_until_idle_for_the_delay() {
    let mut c = config();
    c.park_after = Duration::from_secs(60);
    let server = start(echo(), c).await;
    let mut s = TcpStream::connect(server.addr).await.unwrap();
    let mut buf = Vec::new();
    for _ in 0..3 {
        s.write_all(b"GET / HTTP/1.1\r\nHost: a.test\r\n\r\n")
            .await
            .unwrap();
        read_response(&mut s, &mut buf).await;
        assert_eq!(server.stats.parked(), 0);
    }
}

#[tokio::test]
async fn an_idle_connection_is_parked_after_the_delay() {
    let mut c = config();
    c.park_after = Duration::from_millis(100);
    let server = start(echo(), c).await;
    let mut s = TcpStream::connect(server.addr).await.unwrap();
    let mut buf = Vec::new();
    for i in 0..3 {
        s.write_all(format!("GET /{i} HTTP/1.1\r\nHost: a.test\r\n\r\n").as_bytes())
            .await
            .unwrap();
        assert_eq!(
            read_response(&mut s, &mut buf).await.1,
            format!("GET /{i} 0")
        );
        wait_for(|| server.stats.parked() == 1).await;
    }
}

#[tokio::test]
async fn with_parking_off_the_connection_stays_with_hyper() {
    let mut c = config();
    c.park_idle = false;
    let server = start(echo(), c).await;
    let mut s = TcpStream::connect(server.addr).await.unwrap();
    let mut buf = Vec::new();
    for _ in 0..3 {
        s.write_all(b"GET / HTTP/1.1\r\nHost: a.test\r\n\r\n")
            .await
            .unwrap();
        read_response(&mut s, &mut buf).await;
        assert_eq!(server.stats.parked(), 0);
    }
}

#[tokio::test]
async fn h2c_prior_knowledge_still_works() {
    let server = start(echo(), config()).await;
    let stream = TcpStream::connect(server.addr).await.unwrap();
    let (mut send, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(stream),
    )
    .await
    .unwrap();
    tokio::spawn(conn);
    for _ in 0..2 {
        let req = http::Request::builder()
            .uri("http://a.test/h2")
            .body(ProxyBody::empty())
            .unwrap();
        let resp = tokio::time::timeout(DEADLINE, send.send_request(req))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(resp.version(), http::Version::HTTP_2);
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(&body[..], b"GET /h2 0");
    }
}
