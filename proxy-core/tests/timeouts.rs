//! Timeouts and limits over real sockets: slowloris, hung and stalling upstreams, slow
//! uploads, clients that stop reading, the concurrency cap, 414 and 431.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use proxy_core::buffer::RequestBufferLayer;
use proxy_core::timeout::{
    ClientBodyTimeoutLayer, ConcurrencyLimitLayer, SendTimeoutIo, UpstreamBodyTimeoutLayer,
};
use proxy_core::upstream::{ClientConfig, Forward, UpstreamClient, UpstreamTimeouts};
use proxy_core::{ProxyBody, Request, Response};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, Notify};
use tokio::time::Instant;
use tower::{Layer, Service, ServiceExt};

mod support;
use support::*;

// ---- support ----------------------------------------------------------------------

#[derive(Default, Clone, Copy)]
struct Opts {
    header_timeout: Option<Duration>,
    send_timeout: Option<Duration>,
}

/// The proxy: `svc` served by hyper on an ephemeral port; each connection's outcome is
/// reported on the returned channel.
async fn spawn_proxy<S>(svc: S, opts: Opts) -> (SocketAddr, mpsc::Receiver<hyper::Result<()>>)
where
    S: Service<Request, Response = Response, Error = Infallible> + Clone + Send + 'static,
    S::Future: Send + 'static,
{
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = mpsc::channel(64);
    tokio::spawn(async move {
        let mut builder = hyper::server::conn::http1::Builder::new();
        builder.timer(TokioTimer::new());
        builder.header_read_timeout(opts.header_timeout);
        loop {
            let (stream, _) = listener.accept().await.unwrap();
            let io = SendTimeoutIo::new(stream, opts.send_timeout.unwrap_or(Duration::MAX));
            let svc = svc.clone();
            let tx = tx.clone();
            let conn = builder.serve_connection(
                TokioIo::new(io),
                hyper::service::service_fn(move |req: http::Request<Incoming>| {
                    svc.clone().oneshot(req.map(ProxyBody::from))
                }),
            );
            tokio::spawn(async move {
                let _ = tx.send(conn.await).await;
            });
        }
    });
    (addr, rx)
}

fn forward(upstream: SocketAddr, read_timeout: Duration) -> Forward {
    let mut config = ClientConfig::default();
    config.read_timeout = read_timeout;
    Forward::new(UpstreamClient::new(config), upstream).with_timeouts(UpstreamTimeouts {
        read_timeout,
        idle_timeout: read_timeout,
    })
}

fn ok_upstream() -> impl Fn(http::Request<Incoming>) -> std::future::Ready<http::Response<ProxyBody>>
       + Clone
       + Send
       + Sync
       + 'static {
    |_req| std::future::ready(http::Response::new(ProxyBody::from("ok")))
}

/// Read a response head from a raw stream: (status, head, body bytes already read).
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

/// Send a simple GET on a fresh connection; the status.
async fn get(proxy: SocketAddr, target: &str) -> u16 {
    let mut client = TcpStream::connect(proxy).await.unwrap();
    client
        .write_all(format!("GET {target} HTTP/1.1\r\nhost: x\r\n\r\n").as_bytes())
        .await
        .unwrap();
    read_head(&mut client).await.0
}

/// Read until the peer closes (EOF or reset), returning how many bytes came.
async fn read_to_close(stream: &mut TcpStream) -> usize {
    let mut total = 0;
    let mut buf = [0u8; 64 * 1024];
    loop {
        match stream.read(&mut buf).await {
            Ok(0) | Err(_) => return total,
            Ok(n) => total += n,
        }
    }
}

const DEADLINE: Duration = Duration::from_secs(5);

// ---- client side --------------------------------------------------------------------

#[tokio::test]
async fn slowloris_is_cut_off_at_the_header_timeout_while_others_are_served() {
    let (upstream, _) = upstream_counting_requests(ok_upstream()).await;
    let opts = Opts {
        header_timeout: Some(Duration::from_millis(500)),
        ..Opts::default()
    };
    let (proxy, _) = spawn_proxy(forward(upstream, DEADLINE), opts).await;

    let mut slow = TcpStream::connect(proxy).await.unwrap();
    let start = Instant::now();
    let slowloris = tokio::spawn(async move {
        // One header byte every 50 ms, forever: the header never completes.
        let line = b"GET / HTTP/1.1\r\nhost: x\r\nx-slow: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";
        let mut tick = tokio::time::interval(Duration::from_millis(50));
        for b in line.iter().cycle() {
            tick.tick().await;
            if slow.write_all(&[*b]).await.is_err() {
                break;
            }
            let mut probe = [0u8; 1];
            // A closed connection reads as EOF (or reset) at once.
            if let Ok(r) =
                tokio::time::timeout(Duration::from_millis(1), slow.read(&mut probe)).await
            {
                if matches!(r, Ok(0) | Err(_)) {
                    break;
                }
            }
        }
        Instant::now()
    });
    // Others are served normally meanwhile.
    for _ in 0..5 {
        assert_eq!(get(proxy, "/").await, 200);
    }
    let cut_at = tokio::time::timeout(DEADLINE, slowloris)
        .await
        .unwrap()
        .unwrap();
    let after = cut_at - start;
    assert!(after >= Duration::from_millis(500), "cut after {after:?}");
    assert!(after < Duration::from_secs(3), "cut after {after:?}");
}

#[tokio::test]
async fn a_stalled_upload_is_408_at_the_body_timeout() {
    let (upstream, requests) = upstream_counting_requests(ok_upstream()).await;
    let stack = tower::ServiceBuilder::new()
        .layer(ClientBodyTimeoutLayer::new(Duration::from_millis(300)))
        .layer(RequestBufferLayer::new())
        .service(forward(upstream, DEADLINE));
    let (proxy, _) = spawn_proxy(stack, Opts::default()).await;
    let mut client = TcpStream::connect(proxy).await.unwrap();
    client
        .write_all(b"POST / HTTP/1.1\r\nhost: x\r\ncontent-length: 100\r\n\r\n0123456789")
        .await
        .unwrap();
    let start = Instant::now();
    let (status, _, _) = tokio::time::timeout(DEADLINE, read_head(&mut client))
        .await
        .unwrap();
    assert_eq!(status, 408);
    assert!(start.elapsed() >= Duration::from_millis(250));
    tokio::time::timeout(DEADLINE, read_to_close(&mut client))
        .await
        .unwrap();
    assert_eq!(requests.load(Ordering::SeqCst), 0);
}

#[tokio::test]
async fn a_streamed_upload_that_stalls_is_408_not_502() {
    // Without request buffering the body streams to the upstream; its failure is still
    // reported as the client's.
    let (upstream, _) = upstream_counting_requests(|req: http::Request<Incoming>| async move {
        let _ = http_body_util::BodyExt::collect(req.into_body()).await;
        http::Response::new(ProxyBody::from("ok"))
    })
    .await;
    let stack =
        ClientBodyTimeoutLayer::new(Duration::from_millis(300)).layer(forward(upstream, DEADLINE));
    let (proxy, _) = spawn_proxy(stack, Opts::default()).await;
    let mut client = TcpStream::connect(proxy).await.unwrap();
    client
        .write_all(
            b"POST / HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\n",
        )
        .await
        .unwrap();
    let (status, _, _) = tokio::time::timeout(DEADLINE, read_head(&mut client))
        .await
        .unwrap();
    assert_eq!(status, 408);
}

#[tokio::test]
async fn a_client_that_stops_reading_is_disconnected_at_the_send_timeout() {
    let big = Bytes::from(vec![b'x'; 1024 * 1024]);
    let (upstream, _) = upstream_counting_requests(move |_req| {
        let big = big.clone();
        async move {
            let frames = std::iter::repeat_n(big, 64)
                .map(|b| Ok::<_, proxy_core::Error>(http_body::Frame::data(b)));
            let body = http_body_util::StreamBody::new(futures_util::stream::iter(frames));
            http::Response::new(ProxyBody::boxed(body))
        }
    })
    .await;
    let opts = Opts {
        send_timeout: Some(Duration::from_millis(300)),
        ..Opts::default()
    };
    let (proxy, mut outcomes) = spawn_proxy(forward(upstream, DEADLINE), opts).await;
    let mut client = TcpStream::connect(proxy).await.unwrap();
    client
        .write_all(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n")
        .await
        .unwrap();
    // The client reads nothing: the proxy gives up on the connection.
    let outcome = tokio::time::timeout(DEADLINE, outcomes.recv())
        .await
        .unwrap()
        .unwrap();
    let err = outcome.unwrap_err();
    let io = std::error::Error::source(&err)
        .and_then(|s| s.downcast_ref::<std::io::Error>())
        .map(|e| e.kind());
    assert_eq!(io, Some(std::io::ErrorKind::TimedOut), "{err:?}");
    // The client sees its connection end short of the 64 MiB.
    let got = tokio::time::timeout(DEADLINE, read_to_close(&mut client))
        .await
        .unwrap();
    assert!(got < 64 * 1024 * 1024);
}

#[tokio::test]
async fn a_long_uri_is_414_and_huge_headers_are_431() {
    let (upstream, _) = upstream_counting_requests(ok_upstream()).await;
    let (proxy, _) = spawn_proxy(forward(upstream, DEADLINE), Opts::default()).await;
    // hyper's own limits: request target over 64 KiB, head over its buffer (~400 KiB),
    // more than 100 header fields.
    let long = format!("/{}", "a".repeat(70 * 1024));
    assert_eq!(get(proxy, &long).await, 414);

    let mut client = TcpStream::connect(proxy).await.unwrap();
    let huge = format!(
        "GET / HTTP/1.1\r\nhost: x\r\nx-big: {}\r\n\r\n",
        "b".repeat(500 * 1024)
    );
    let _ = client.write_all(huge.as_bytes()).await;
    assert_eq!(read_head(&mut client).await.0, 431);

    let mut client = TcpStream::connect(proxy).await.unwrap();
    let mut many = String::from("GET / HTTP/1.1\r\nhost: x\r\n");
    for i in 0..150 {
        many.push_str(&format!("x-h{i}: v\r\n"));
    }
    many.push_str("\r\n");
    client.write_all(many.as_bytes()).await.unwrap();
    assert_eq!(read_head(&mut client).await.0, 431);
}

#[tokio::test]
async fn requests_over_the_concurrency_cap_get_503_at_once() {
    let release = Arc::new(Notify::new());
    let gate = release.clone();
    let (upstream, requests) = upstream_counting_requests(move |_req| {
        let gate = gate.clone();
        async move {
            gate.notified().await;
            http::Response::new(ProxyBody::from("ok"))
        }
    })
    .await;
    let stack = ConcurrencyLimitLayer::new(1).layer(forward(upstream, DEADLINE));
    let (proxy, _) = spawn_proxy(stack, Opts::default()).await;

    let first = tokio::spawn(get(proxy, "/slow"));
    let deadline = Instant::now() + DEADLINE;
    while requests.load(Ordering::SeqCst) == 0 {
        assert!(Instant::now() < deadline, "the first request never arrived");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let start = Instant::now();
    assert_eq!(get(proxy, "/over").await, 503);
    assert!(
        start.elapsed() < Duration::from_secs(1),
        "503 must not wait"
    );
    release.notify_one();
    assert_eq!(first.await.unwrap(), 200);
    release.notify_one();
    assert_eq!(get(proxy, "/again").await, 200);
}

// ---- upstream side ------------------------------------------------------------------

#[tokio::test]
async fn a_hung_upstream_is_504_at_the_read_timeout() {
    let (upstream, _) = upstream_counting_requests(|_req| std::future::pending()).await;
    let (proxy, _) = spawn_proxy(
        forward(upstream, Duration::from_millis(300)),
        Opts::default(),
    )
    .await;
    let start = Instant::now();
    let status = tokio::time::timeout(DEADLINE, get(proxy, "/"))
        .await
        .unwrap();
    assert_eq!(status, 504);
    assert!(start.elapsed() >= Duration::from_millis(250));
}

#[tokio::test]
async fn an_upstream_stalling_mid_body_closes_the_client_connection() {
    let (upstream, _) = upstream_counting_requests(|_req| async {
        let frames = futures_util::StreamExt::chain(
            futures_util::stream::iter([Ok::<_, proxy_core::Error>(http_body::Frame::data(
                Bytes::from_static(b"0123456789"),
            ))]),
            futures_util::stream::pending(),
        );
        let mut resp =
            http::Response::new(ProxyBody::boxed(http_body_util::StreamBody::new(frames)));
        resp.headers_mut()
            .insert(http::header::CONTENT_LENGTH, http::HeaderValue::from(1000));
        resp
    })
    .await;
    let stack = UpstreamBodyTimeoutLayer::new(Duration::from_millis(300))
        .layer(forward(upstream, DEADLINE));
    let (proxy, _) = spawn_proxy(stack, Opts::default()).await;
    let mut client = TcpStream::connect(proxy).await.unwrap();
    client
        .write_all(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n")
        .await
        .unwrap();
    let (status, _, rest) = read_head(&mut client).await;
    assert_eq!(status, 200);
    let start = Instant::now();
    let more = tokio::time::timeout(DEADLINE, read_to_close(&mut client))
        .await
        .expect("the client connection must close, not hang");
    assert!(rest.len() + more < 1000, "the body cannot be complete");
    assert!(start.elapsed() >= Duration::from_millis(200));
}
