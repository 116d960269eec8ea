//! The foundation over real sockets: forwarding, streaming, hop-by-hop headers,
//! keep-alive, failures, routing, 444, redirects, graceful shutdown, malformed input.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::time::Duration;

use bytes::Bytes;
use http::{Method, StatusCode};
use http_body_util::{BodyExt, StreamBody};
use proxy_core::router::{Location, Pattern, Redirect, Return, Router, ServerName, VirtualServer};
use proxy_core::upstream::{ClientConfig, Forward, UpstreamClient};
use proxy_core::ProxyBody;
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn forward(up: &Upstream) -> Forward {
    Forward::new(UpstreamClient::new(ClientConfig::default()), up.addr)
}

#[tokio::test]
async fn methods_and_targets_are_preserved_byte_exact() {
    let up = Upstream::ok().await;
    let proxy = Proxy::start(forward(&up)).await;
    let targets = [
        "/",
        "/a/b?x=1&y=%2F%20+z",
        "/%7Euser/p;param?q=a%26b#frag",
        "/x?",
    ];
    let methods = [
        Method::GET,
        Method::HEAD,
        Method::POST,
        Method::PUT,
        Method::DELETE,
        Method::OPTIONS,
    ];
    for (i, m) in methods.iter().enumerate() {
        let target = targets[i % targets.len()];
        let req = http::Request::builder()
            .method(m.clone())
            .uri(target)
            .header("host", "example.test")
            .body(ProxyBody::empty())
            .unwrap();
        let (parts, _) = send(proxy.addr, req).await;
        assert_eq!(parts.status, 200, "{m} {target}");
        let seen = up.seen();
        let last = seen.last().unwrap();
        assert_eq!(&last.method, m);
        // The fragment never goes on the wire; the rest arrives byte for byte.
        let want = target.split('#').next().unwrap();
        assert_eq!(last.uri.to_string(), want);
    }
}

#[tokio::test]
async fn host_is_passed_as_sent_with_port() {
    let up = Upstream::ok().await;
    let proxy = Proxy::start(forward(&up)).await;
    let req = http::Request::builder()
        .uri("/")
        .header("host", "API.example.com:8443")
        .body(ProxyBody::empty())
        .unwrap();
    send(proxy.addr, req).await;
    assert_eq!(up.seen()[0].headers["host"], "API.example.com:8443");
}

#[tokio::test]
async fn absolute_form_target_replaces_host() {
    let up = Upstream::ok().await;
    let proxy = Proxy::start(forward(&up)).await;
    let out = raw(
        proxy.addr,
        b"GET http://other.example:81/p?q HTTP/1.1\r\nHost: example.test\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(
        out.starts_with(b"HTTP/1.1 200"),
        "{}",
        String::from_utf8_lossy(&out)
    );
    let seen = up.seen();
    assert_eq!(seen[0].headers["host"], "other.example:81");
    assert_eq!(seen[0].uri, "/p?q");
}

#[tokio::test]
async fn http10_without_host_gets_the_listener_name() {
    let up = Upstream::ok().await;
    let router = Router::builder()
        .server(
            VirtualServer::new([ServerName::parse("app.example").unwrap()])
                .location(Location::new(Pattern::parse("/").unwrap(), forward(&up))),
        )
        .build()
        .unwrap();
    let proxy = Proxy::start(router).await;
    let out = raw(proxy.addr, b"GET / HTTP/1.0\r\n\r\n").await;
    assert!(
        out.starts_with(b"HTTP/1."),
        "{}",
        String::from_utf8_lossy(&out)
    );
    assert_eq!(up.seen()[0].headers["host"], "app.example");
}

/// Streams `total` bytes in 64 KiB chunks and a checksum of what was produced.
fn pattern(total: usize) -> (Vec<Bytes>, u64) {
    let mut chunks = Vec::new();
    let mut sum = 0u64;
    let mut n = 0usize;
    while n < total {
        let len = (total - n).min(64 * 1024);
        let chunk: Vec<u8> = (0..len).map(|i| ((n + i) * 31 % 251) as u8).collect();
        sum = chunk
            .iter()
            .fold(sum, |s, b| s.wrapping_mul(31).wrapping_add(u64::from(*b)));
        chunks.push(Bytes::from(chunk));
        n += len;
    }
    (chunks, sum)
}

fn checksum(data: &[u8]) -> u64 {
    data.iter()
        .fold(0u64, |s, b| s.wrapping_mul(31).wrapping_add(u64::from(*b)))
}

#[tokio::test]
async fn ten_mib_bodies_stream_both_ways_intact() {
    const SIZE: usize = 10 * 1024 * 1024;
    // The upstream echoes the checksum of what it got, then sends 10 MiB back.
    let up = Upstream::start(|seen| async move {
        let (chunks, _) = pattern(SIZE);
        let sum = checksum(&seen.body);
        let stream = futures_util::stream::iter(
            chunks
                .into_iter()
                .map(|c| Ok::<_, std::convert::Infallible>(hyper::body::Frame::data(c))),
        );
        http::Response::builder()
            .header("x-sum", sum.to_string())
            .header("x-len", seen.body.len().to_string())
            .body(ProxyBody::boxed(StreamBody::new(stream)))
            .unwrap()
    })
    .await;
    let proxy = Proxy::start(forward(&up)).await;
    let (chunks, want) = pattern(SIZE);
    // Chunked request body (no Content-Length).
    let stream = futures_util::stream::iter(
        chunks
            .into_iter()
            .map(|c| Ok::<_, std::convert::Infallible>(hyper::body::Frame::data(c))),
    );
    let req = http::Request::builder()
        .method(Method::POST)
        .uri("/upload")
        .header("host", "example.test")
        .body(ProxyBody::boxed(StreamBody::new(stream)))
        .unwrap();
    let (parts, body) = send(proxy.addr, req).await;
    assert_eq!(parts.status, 200);
    assert_eq!(parts.headers["x-len"], SIZE.to_string().as_str());
    assert_eq!(parts.headers["x-sum"], want.to_string().as_str());
    assert_eq!(body.len(), SIZE);
    assert_eq!(checksum(&body), want);
    let seen = up.seen();
    assert_eq!(
        seen[0]
            .headers
            .get("transfer-encoding")
            .map(|v| v.to_str().unwrap()),
        Some("chunked")
    );
}

#[tokio::test]
async fn response_streams_before_the_upstream_finishes() {
    // The upstream sends one chunk, then waits until the test saw it before finishing:
    // a proxy that buffered the whole response would deadlock here (and time out).
    let (tx, rx) = tokio::sync::mpsc::channel::<()>(1);
    let rx = std::sync::Arc::new(tokio::sync::Mutex::new(rx));
    let up = Upstream::start(move |_| {
        let rx = rx.clone();
        async move {
            let stream = futures_util::stream::unfold(0u8, move |state| {
                let rx = rx.clone();
                async move {
                    match state {
                        0 => Some((
                            Ok::<_, std::convert::Infallible>(hyper::body::Frame::data(
                                Bytes::from_static(b"first;"),
                            )),
                            1,
                        )),
                        1 => {
                            rx.lock().await.recv().await;
                            Some((
                                Ok(hyper::body::Frame::data(Bytes::from_static(b"second"))),
                                2,
                            ))
                        }
                        _ => None,
                    }
                }
            });
            http::Response::new(ProxyBody::boxed(StreamBody::new(stream)))
        }
    })
    .await;
    let proxy = Proxy::start(forward(&up)).await;
    let mut s = connect(proxy.addr).await;
    let resp = s.send_request(get("/stream")).await.unwrap();
    let mut body = resp.into_body();
    let first = tokio::time::timeout(DEADLINE, body.frame())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(first.into_data().unwrap(), "first;");
    tx.send(()).await.unwrap();
    let rest = tokio::time::timeout(DEADLINE, body.collect())
        .await
        .unwrap()
        .unwrap()
        .to_bytes();
    assert_eq!(rest, "second");
}

#[tokio::test]
async fn hop_by_hop_headers_reach_neither_side() {
    let up = Upstream::start(|_| async {
        http::Response::builder()
            .header("connection", "x-up-secret")
            .header("connection", "keep-alive")
            .header("x-up-secret", "1")
            .header("keep-alive", "timeout=5")
            .header("x-up-kept", "1")
            .body(ProxyBody::from("ok"))
            .unwrap()
    })
    .await;
    let proxy = Proxy::start(forward(&up)).await;
    let out = raw(
        proxy.addr,
        b"GET / HTTP/1.1\r\nHost: example.test\r\nConnection: x-first\r\nConnection: x-second, close\r\n\
X-First: 1\r\nX-Second: 2\r\nKeep-Alive: 300\r\nProxy-Connection: keep-alive\r\nTE: trailers\r\n\
Upgrade: h2c\r\nX-Kept: 1\r\n\r\n",
    )
    .await;
    let text = String::from_utf8_lossy(&out).to_ascii_lowercase();
    assert!(text.starts_with("http/1.1 200"), "{text}");
    assert!(text.contains("x-up-kept: 1"));
    assert!(!text.contains("x-up-secret"), "{text}");
    assert!(!text.contains("keep-alive: timeout"), "{text}");
    let seen = up.seen();
    let h = &seen[0].headers;
    for name in [
        "x-first",
        "x-second",
        "keep-alive",
        "proxy-connection",
        "te",
        "upgrade",
    ] {
        assert!(!h.contains_key(name), "{name} reached the upstream");
    }
    assert_eq!(h["x-kept"], "1");
}

#[tokio::test]
async fn upstream_connections_are_reused() {
    let up = Upstream::ok().await;
    let proxy = Proxy::start(forward(&up)).await;
    let mut s = connect(proxy.addr).await;
    for _ in 0..100 {
        let resp = s.send_request(get("/")).await.unwrap();
        assert_eq!(resp.status(), 200);
        resp.into_body().collect().await.unwrap();
    }
    assert_eq!(
        up.accepted(),
        1,
        "100 sequential requests should share one upstream connection"
    );
}

#[tokio::test]
async fn upstream_down_is_502() {
    // Bind then drop: nothing listens on the port any more.
    let dead = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .unwrap()
        .local_addr()
        .unwrap();
    let proxy = Proxy::start(Forward::new(
        UpstreamClient::new(ClientConfig::default()),
        dead,
    ))
    .await;
    let (parts, body) = send(proxy.addr, get("/")).await;
    assert_eq!(parts.status, StatusCode::BAD_GATEWAY);
    assert_eq!(body, "502 Bad Gateway\n");
}

#[tokio::test]
async fn malformed_upstream_response_is_502() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut buf = [0u8; 4096];
                let _ = s.read(&mut buf).await;
                let _ = s
                    .write_all(
                        b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello!",
                    )
                    .await;
            });
        }
    });
    let proxy = Proxy::start(Forward::new(
        UpstreamClient::new(ClientConfig::default()),
        addr,
    ))
    .await;
    let (parts, _) = send(proxy.addr, get("/")).await;
    assert_eq!(parts.status, StatusCode::BAD_GATEWAY);
}

/// The race uvicorn's 5 s keep-alive causes: the upstream closes a pooled connection just
/// as the proxy sends the next request on it. Here the upstream answers the first request
/// on each connection with keep-alive, then closes on the second without answering.
#[tokio::test]
async fn stale_pooled_connection_is_retried_transparently() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let accepted = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let acc = accepted.clone();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            acc.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            tokio::spawn(async move {
                let mut buf = [0u8; 4096];
                let mut got = Vec::new();
                // First request: answer with keep-alive.
                while !got.windows(4).any(|w| w == b"\r\n\r\n") {
                    match s.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => got.extend_from_slice(&buf[..n]),
                    }
                }
                let _ = s
                    .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
                    .await;
                // Second request: read it, then close without a byte.
                let _ = s.read(&mut buf).await;
            });
        }
    });
    let proxy = Proxy::start(Forward::new(
        UpstreamClient::new(ClientConfig::default()),
        addr,
    ))
    .await;
    let mut c = connect(proxy.addr).await;
    for i in 0..5 {
        let resp = c.send_request(get("/")).await.unwrap();
        assert_eq!(resp.status(), 200, "request {i}");
        resp.into_body().collect().await.unwrap();
    }
    assert!(accepted.load(std::sync::atomic::Ordering::SeqCst) >= 3);
}

#[tokio::test]
async fn post_is_not_retried_on_a_stale_connection() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut buf = [0u8; 4096];
                let _ = s.read(&mut buf).await;
                // Close without answering.
            });
        }
    });
    let proxy = Proxy::start(Forward::new(
        UpstreamClient::new(ClientConfig::default()),
        addr,
    ))
    .await;
    let req = http::Request::builder()
        .method(Method::POST)
        .uri("/")
        .header("host", "x")
        .body(ProxyBody::from("data"))
        .unwrap();
    let (parts, _) = send(proxy.addr, req).await;
    assert_eq!(parts.status, StatusCode::BAD_GATEWAY);
}

#[tokio::test]
async fn upstream_read_timeout_is_504() {
    let up = Upstream::start(|_| async {
        std::future::pending::<()>().await;
        http::Response::new(ProxyBody::empty())
    })
    .await;
    let fwd = forward(&up).with_timeouts(proxy_core::upstream::UpstreamTimeouts {
        read_timeout: Duration::from_millis(200),
        idle_timeout: Duration::from_millis(200),
    });
    let proxy = Proxy::start(fwd).await;
    let (parts, _) = send(proxy.addr, get("/")).await;
    assert_eq!(parts.status, StatusCode::GATEWAY_TIMEOUT);
}

fn router_for(up: &Upstream) -> Router {
    let fwd = || forward(up);
    Router::builder()
        .server(
            VirtualServer::new([ServerName::parse("example.test").unwrap()])
                .location(Location::new(Pattern::parse("/").unwrap(), fwd()))
                .location(Location::new(
                    Pattern::parse("~* /(wp-login|wp-admin|xmlrpc)").unwrap(),
                    Return::close(),
                ))
                .location(Location::new(
                    Pattern::parse("~* \\.(env|git)$").unwrap(),
                    Return::new(StatusCode::FORBIDDEN),
                ))
                .location(Location::new(
                    Pattern::parse("= /exact").unwrap(),
                    Return::new(StatusCode::from_u16(201).unwrap()),
                ))
                .location(Location::new(
                    Pattern::parse("^~ /static/").unwrap(),
                    Return::new(StatusCode::from_u16(202).unwrap()),
                ))
                .location(Location::new(
                    Pattern::parse("/old/").unwrap(),
                    Redirect::new(StatusCode::MOVED_PERMANENTLY).scheme("https"),
                ))
                .location(
                    Location::new(
                        Pattern::parse("/internal/").unwrap(),
                        Return::new(StatusCode::OK),
                    )
                    .internal(true),
                ),
        )
        .server(
            VirtualServer::new([ServerName::parse("*.wild.test").unwrap()]).location(
                Location::new(
                    Pattern::parse("/").unwrap(),
                    Return::new(StatusCode::from_u16(203).unwrap()),
                ),
            ),
        )
        .build()
        .unwrap()
}

#[tokio::test]
async fn routing_follows_nginx_precedence_over_sockets() {
    let up = Upstream::ok().await;
    let proxy = Proxy::start(router_for(&up)).await;
    let host = |h: &str, p: &str| {
        http::Request::builder()
            .uri(p)
            .header("host", h)
            .body(ProxyBody::empty())
            .unwrap()
    };
    for (h, p, want) in [
        ("example.test", "/anything", 200),
        ("example.test", "/exact", 201),
        ("example.test", "/exact/more", 200),
        ("example.test", "/static/x.env", 202), // ^~ stops the regex search
        ("example.test", "/app/.ENV", 403),     // regex beats the plain prefix
        ("example.test", "/app/%2eenv", 403),   // matched on the decoded path
        ("example.test", "/internal/x", 404),
        ("a.wild.test", "/", 203),
        ("unknown.test", "/exact", 201), // default server is the first
    ] {
        let (parts, _) = send(proxy.addr, host(h, p)).await;
        assert_eq!(parts.status.as_u16(), want, "{h}{p}");
    }
    let (parts, _) = send(proxy.addr, host("example.test:8080", "/old/a?b")).await;
    assert_eq!(parts.status, 301);
    assert_eq!(parts.headers["location"], "https://example.test/old/a?b");
}

#[tokio::test]
async fn return_444_closes_with_zero_bytes() {
    let up = Upstream::ok().await;
    let proxy = Proxy::start(router_for(&up)).await;
    let out = raw(
        proxy.addr,
        b"GET /wp-login.php HTTP/1.1\r\nHost: example.test\r\n\r\n",
    )
    .await;
    assert!(out.is_empty(), "got {:?}", String::from_utf8_lossy(&out));
    assert!(up.seen().is_empty());
}

#[tokio::test]
async fn malformed_requests_get_400_and_nothing_reaches_the_upstream() {
    let up = Upstream::ok().await;
    let proxy = Proxy::start(router_for(&up)).await;
    let cases: &[&[u8]] = &[
        b"GET / HTTP/1.1\r\nHost: example.test\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\nabcd",
        b"GET / HTTP/1.1\r\nHost: example.test\r\nContent-Length: +3\r\n\r\nabc",
        b"GET / HTTP/1.1\r\nHost : example.test\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: example.test\r\n folded\r\n\r\n",
        b"GET /a\x00b HTTP/1.1\r\nHost: example.test\r\n\r\n",
        b"GET /%00 HTTP/1.1\r\nHost: example.test\r\n\r\n",
        b"GET /../../etc/passwd HTTP/1.1\r\nHost: example.test\r\n\r\n",
        b"GET / HTTP/1.1\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: bad host\r\n\r\n",
        b"POST / HTTP/1.0\r\nHost: example.test\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        b"NOT HTTP AT ALL\r\n\r\n",
    ];
    for case in cases {
        let out = raw(proxy.addr, case).await;
        let text = String::from_utf8_lossy(&out);
        assert!(
            text.starts_with("HTTP/1.1 400"),
            "{:?} -> {text:?}",
            String::from_utf8_lossy(case)
        );
    }
    assert!(up.seen().is_empty(), "{:?}", up.seen());
}

/// Content-Length with Transfer-Encoding: hyper frames by chunked, drops the
/// Content-Length and closes the connection after the answer; the upstream gets exactly
/// one cleanly re-serialised request, and a smuggled second request is never forwarded.
#[tokio::test]
async fn content_length_with_chunked_is_one_clean_request() {
    let up = Upstream::ok().await;
    let proxy = Proxy::start(router_for(&up)).await;
    let out = raw(
        proxy.addr,
        b"POST / HTTP/1.1\r\nHost: example.test\r\nContent-Length: 40\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: example.test\r\n\r\n",
    )
    .await;
    let text = String::from_utf8_lossy(&out);
    let seen = up.seen();
    if text.starts_with("HTTP/1.1 400") {
        assert!(seen.is_empty());
    } else {
        assert!(text.starts_with("HTTP/1.1 200"), "{text}");
        assert_eq!(seen.len(), 1, "{seen:?}");
        assert!(seen[0]
            .headers
            .get("content-length")
            .is_none_or(|v| v == "0"));
        assert!(seen[0].body.is_empty());
        assert_eq!(text.matches("HTTP/1.1").count(), 1, "{text}");
    }
}

#[tokio::test]
async fn connect_is_refused_unless_allowed() {
    let up = Upstream::ok().await;
    let proxy = Proxy::start(router_for(&up)).await;
    let mut c = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
    c.write_all(b"CONNECT example.test:443 HTTP/1.1\r\nHost: example.test:443\r\n\r\n")
        .await
        .unwrap();
    let mut buf = [0u8; 64];
    let n = tokio::time::timeout(DEADLINE, c.read(&mut buf))
        .await
        .unwrap()
        .unwrap();
    assert!(
        buf[..n].starts_with(b"HTTP/1.1 405"),
        "{}",
        String::from_utf8_lossy(&buf[..n])
    );
    assert!(up.seen().is_empty());
}

#[tokio::test]
async fn http2_prior_knowledge_is_proxied_to_http1() {
    let up = Upstream::ok().await;
    let proxy = Proxy::start(forward(&up)).await;
    let stream = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
    let (mut send, conn) = hyper::client::conn::http2::handshake::<_, _, ProxyBody>(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(stream),
    )
    .await
    .unwrap();
    tokio::spawn(conn);
    let mut handles = Vec::new();
    for i in 0..4 {
        let req = http::Request::builder()
            .uri(format!("http://h2.example:8080/s{i}"))
            .body(ProxyBody::empty())
            .unwrap();
        handles.push(send.send_request(req));
    }
    for h in handles {
        let resp = h.await.unwrap();
        assert_eq!(resp.status(), 200);
    }
    let seen = up.seen();
    assert_eq!(seen.len(), 4);
    assert!(seen
        .iter()
        .all(|s| s.version == http::Version::HTTP_11 && s.headers["host"] == "h2.example:8080"));
}

#[tokio::test]
async fn graceful_shutdown_completes_an_in_flight_request() {
    let (started_tx, mut started_rx) = tokio::sync::mpsc::channel::<()>(1);
    let (finish_tx, finish_rx) = tokio::sync::oneshot::channel::<()>();
    let finish_rx = std::sync::Arc::new(tokio::sync::Mutex::new(Some(finish_rx)));
    let up = Upstream::start(move |_| {
        let (started_tx, finish_rx) = (started_tx.clone(), finish_rx.clone());
        async move {
            let _ = started_tx.send(()).await;
            let rx = finish_rx.lock().await.take();
            if let Some(rx) = rx {
                let _ = rx.await;
            }
            http::Response::new(ProxyBody::from("slow but complete"))
        }
    })
    .await;
    let mut proxy = Proxy::start(forward(&up)).await;
    let addr = proxy.addr;
    let client = tokio::spawn(async move { send(addr, get("/slow")).await });
    tokio::time::timeout(DEADLINE, started_rx.recv())
        .await
        .unwrap();
    let server = proxy.stop();
    // New connections are refused once the listener is closed.
    wait_for(|| std::net::TcpStream::connect(addr).is_err()).await;
    finish_tx.send(()).unwrap();
    let (parts, body) = client.await.unwrap();
    assert_eq!(parts.status, 200);
    assert_eq!(body, "slow but complete");
    tokio::time::timeout(DEADLINE, server)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
}

#[tokio::test]
async fn connection_cap_answers_503() {
    let up = Upstream::ok().await;
    let mut config = proxy_core::server::HttpConfig::default();
    config.max_connections = Some(1);
    let proxy = Proxy::start_with(forward(&up), config).await;
    let mut first = connect(proxy.addr).await;
    let resp = first.send_request(get("/")).await.unwrap();
    assert_eq!(resp.status(), 200);
    let out = raw(proxy.addr, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await;
    assert!(String::from_utf8_lossy(&out).starts_with("HTTP/1.1 503"));
}

#[tokio::test]
async fn websocket_upgrade_is_tunnelled_after_the_101() {
    // A raw upstream that records what it got before answering 101, then echoes.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let got_before_101 = std::sync::Arc::new(std::sync::Mutex::new(Vec::<u8>::new()));
    let record = got_before_101.clone();
    tokio::spawn(async move {
        let (mut s, _) = listener.accept().await.unwrap();
        let mut head = Vec::new();
        let mut buf = [0u8; 1024];
        while !head.windows(4).any(|w| w == b"\r\n\r\n") {
            let n = s.read(&mut buf).await.unwrap();
            head.extend_from_slice(&buf[..n]);
        }
        *record.lock().unwrap() = head.clone();
        s.write_all(b"HTTP/1.1 101 Switching Protocols\r\nConnection: upgrade\r\nUpgrade: websocket\r\n\r\n").await.unwrap();
        loop {
            let n = s.read(&mut buf).await.unwrap();
            if n == 0 {
                return;
            }
            s.write_all(&buf[..n]).await.unwrap();
        }
    });
    let proxy = Proxy::start(Forward::new(
        UpstreamClient::new(ClientConfig::default()),
        addr,
    ))
    .await;
    let mut c = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
    // Early data right behind the upgrade request must not reach the upstream before its 101.
    c.write_all(b"GET /ws HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\nEARLY")
        .await
        .unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 1024];
    while !got.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = tokio::time::timeout(DEADLINE, c.read(&mut buf))
            .await
            .unwrap()
            .unwrap();
        assert!(n > 0);
        got.extend_from_slice(&buf[..n]);
    }
    assert!(
        got.starts_with(b"HTTP/1.1 101"),
        "{}",
        String::from_utf8_lossy(&got)
    );
    let head = String::from_utf8(got_before_101.lock().unwrap().clone()).unwrap();
    assert!(
        !head.contains("EARLY"),
        "early bytes reached the upstream before the 101: {head}"
    );
    assert!(head.to_ascii_lowercase().contains("upgrade: websocket"));
    // EARLY is delivered after the upgrade, then echoed back with what follows. Bytes the
    // upstream echoed may already sit behind the 101 in `got`.
    let head_end = got.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
    let mut echoed = got[head_end..].to_vec();
    c.write_all(b"ping").await.unwrap();
    while echoed.len() < b"EARLYping".len() {
        let n = tokio::time::timeout(DEADLINE, c.read(&mut buf))
            .await
            .unwrap()
            .unwrap();
        assert!(n > 0, "tunnel closed early");
        echoed.extend_from_slice(&buf[..n]);
    }
    assert_eq!(echoed, b"EARLYping");
}

/// The retry after a stale pooled connection sends the same head as the attempt that
/// failed: every header line, repeated names in order, the same target.
#[tokio::test]
async fn a_stale_connection_retry_sends_the_same_head() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    // (request on its connection, head) of every request the upstream read.
    let heads = std::sync::Arc::new(std::sync::Mutex::new(Vec::<(usize, String)>::new()));
    let seen = heads.clone();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            let seen = seen.clone();
            tokio::spawn(async move {
                let mut buf = [0u8; 4096];
                for nth in 0.. {
                    let mut got = Vec::new();
                    while !got.windows(4).any(|w| w == b"\r\n\r\n") {
                        match s.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => got.extend_from_slice(&buf[..n]),
                        }
                    }
                    seen.lock()
                        .unwrap()
                        .push((nth, String::from_utf8_lossy(&got).into_owned()));
                    if nth == 1 {
                        // The second request on a connection: closed without a byte.
                        return;
                    }
                    let _ = s
                        .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
                        .await;
                }
            });
        }
    });
    let proxy = Proxy::start(Forward::new(
        UpstreamClient::new(ClientConfig::default()),
        addr,
    ))
    .await;
    let mut c = connect(proxy.addr).await;
    let resp = c.send_request(get("/first")).await.unwrap();
    resp.into_body().collect().await.unwrap();
    let mut req = get("/again?x=1");
    for (k, v) in [("x-multi", "one"), ("x-other", "o"), ("x-multi", "two")] {
        req.headers_mut()
            .append(k, http::HeaderValue::from_static(v));
    }
    let resp = c.send_request(req).await.unwrap();
    assert_eq!(resp.status(), 200);
    resp.into_body().collect().await.unwrap();
    let heads = heads.lock().unwrap().clone();
    let failed = heads
        .iter()
        .find(|(nth, h)| *nth == 1 && h.starts_with("GET /again"))
        .expect("the attempt on the stale connection");
    let retried = heads
        .iter()
        .find(|(nth, h)| *nth == 0 && h.starts_with("GET /again"))
        .expect("the retry on a fresh connection");
    assert_eq!(failed.1, retried.1);
    let lower = retried.1.to_ascii_lowercase();
    let one = lower.find("x-multi: one").unwrap();
    let two = lower.find("x-multi: two").unwrap();
    assert!(one < two, "{lower}");
}
