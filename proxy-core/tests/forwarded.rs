//! Forwarded headers and PROXY protocol over real sockets: a raw TCP client (bound to
//! chosen loopback source addresses), a tiny accept loop running the acceptor and the
//! layer, and a hyper upstream that echoes what it received.
#![allow(clippy::unwrap_used, clippy::expect_used)] // Tests may unwrap.

use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use http::HeaderValue;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use proxy_core::client_info::{RealClient, Scheme};
use proxy_core::forwarded::proxy_protocol::{self, write_v2};
use proxy_core::forwarded::{ForwardedLayer, ProxyProtocol, TrustedProxies, XffPolicy};
use proxy_core::server::{Accept, Plain};
use proxy_core::upstream::{ClientConfig, Forward, UpstreamClient};
use proxy_core::{ClientInfo, ProxyBody};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tower::{Layer, ServiceExt};

const DEADLINE: Duration = Duration::from_secs(5);

/// An upstream that answers with the forwarded headers it received, as `x-up-*`.
async fn spawn_upstream() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(|req: http::Request<Incoming>| async move {
                    let mut resp = http::Response::new(ProxyBody::from("ok"));
                    for name in [
                        "x-forwarded-for",
                        "x-real-ip",
                        "x-forwarded-proto",
                        "x-forwarded-host",
                        "forwarded",
                    ] {
                        let seen = req
                            .headers()
                            .get(name)
                            .cloned()
                            .unwrap_or(HeaderValue::from_static("-"));
                        resp.headers_mut().insert(
                            http::HeaderName::from_bytes(format!("x-up-{name}").as_bytes())
                                .unwrap(),
                            seen,
                        );
                    }
                    Ok::<_, Infallible>(resp)
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    addr
}

/// The proxy: accept, run `acceptor`, serve HTTP/1.1 through `layer` and a `Forward` to
/// `upstream`; the resolved client comes back as `x-client`.
async fn spawn_proxy<A: Accept>(
    bind: &str,
    acceptor: A,
    layer: ForwardedLayer,
    upstream: SocketAddr,
) -> SocketAddr {
    let listener = TcpListener::bind(bind).await.unwrap();
    let local = listener.local_addr().unwrap();
    let client = UpstreamClient::new(ClientConfig::default());
    tokio::spawn(async move {
        loop {
            let Ok((stream, peer)) = listener.accept().await else {
                return;
            };
            let (acceptor, layer, client) = (acceptor.clone(), layer.clone(), client.clone());
            tokio::spawn(async move {
                let mut info = ClientInfo::new(peer, local, Scheme::Http);
                // An acceptor error closes the connection, as the server does.
                let Ok(io) = acceptor.accept(stream, &mut info).await else {
                    return;
                };
                let forward = Forward::new(client, upstream);
                let stack = layer.layer(tower::service_fn(move |req: proxy_core::Request| {
                    let client = req.extensions().get::<RealClient>().cloned();
                    let forward = forward.clone();
                    async move {
                        let mut resp = forward.oneshot(req).await?;
                        if let Some(c) = client {
                            resp.headers_mut()
                                .insert("x-client", c.ip.to_string().parse().unwrap());
                        }
                        Ok::<_, Infallible>(resp)
                    }
                }));
                let svc = hyper::service::service_fn(move |req: http::Request<Incoming>| {
                    let mut req = req.map(ProxyBody::from);
                    req.extensions_mut().insert(info.clone());
                    stack.clone().oneshot(req)
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(io), svc)
                    .await;
            });
        }
    });
    local
}

async fn connect_from(src: &str, dst: SocketAddr) -> TcpStream {
    let src: IpAddr = src.parse().unwrap();
    let sock = if src.is_ipv4() {
        TcpSocket::new_v4()
    } else {
        TcpSocket::new_v6()
    }
    .unwrap();
    sock.bind(SocketAddr::new(src, 0)).unwrap();
    sock.connect(dst).await.unwrap()
}

/// Write `bytes` (one write), then read until the server closes; `None` if it closed
/// without answering.
async fn exchange(mut stream: TcpStream, bytes: &[u8]) -> Option<Response> {
    stream.write_all(bytes).await.unwrap();
    read_response(stream).await
}

async fn read_response(mut stream: TcpStream) -> Option<Response> {
    let mut buf = Vec::new();
    // A reset counts as closed: what was read so far is the answer.
    let _ = tokio::time::timeout(DEADLINE, stream.read_to_end(&mut buf))
        .await
        .expect("the proxy neither answered nor closed in time");
    (!buf.is_empty()).then(|| Response(String::from_utf8(buf).unwrap()))
}

fn get(headers: &str) -> Vec<u8> {
    format!("GET / HTTP/1.1\r\nHost: example.com\r\n{headers}Connection: close\r\n\r\n")
        .into_bytes()
}

#[derive(Debug)]
struct Response(String);

impl Response {
    fn header(&self, name: &str) -> &str {
        let head = self.0.split("\r\n\r\n").next().unwrap();
        head.lines()
            .find_map(|l| {
                let (n, v) = l.split_once(':')?;
                n.eq_ignore_ascii_case(name).then(|| v.trim())
            })
            .unwrap_or_else(|| panic!("no {name} in {:?}", self.0))
    }

    fn status(&self) -> &str {
        self.0.split(' ').nth(1).unwrap()
    }
}

fn trusting(cidrs: &str) -> ForwardedLayer {
    ForwardedLayer::new().trusted(cidrs.parse().unwrap())
}

#[tokio::test]
async fn untrusted_spoofed_headers_are_not_the_client() {
    let up = spawn_upstream().await;
    let proxy = spawn_proxy("127.0.0.1:0", Plain, trusting("127.0.0.3/32"), up).await;
    let spoof = "X-Forwarded-For: 6.6.6.6\r\nX-Real-IP: 6.6.6.6\r\nX-Forwarded-Proto: https\r\n";
    let resp = exchange(connect_from("127.0.0.2", proxy).await, &get(spoof))
        .await
        .unwrap();
    assert_eq!(resp.status(), "200");
    assert_eq!(resp.header("x-client"), "127.0.0.2");
    // Recorded to the left of the real peer, where a right-to-left walk never trusts it.
    assert_eq!(resp.header("x-up-x-forwarded-for"), "6.6.6.6, 127.0.0.2");
    assert_eq!(resp.header("x-up-x-real-ip"), "127.0.0.2");
    assert_eq!(resp.header("x-up-x-forwarded-proto"), "http");

    let strict = trusting("127.0.0.3/32").x_forwarded_for(XffPolicy::ReplaceUntrusted);
    let proxy = spawn_proxy("127.0.0.1:0", Plain, strict, up).await;
    let resp = exchange(connect_from("127.0.0.2", proxy).await, &get(spoof))
        .await
        .unwrap();
    assert_eq!(resp.header("x-client"), "127.0.0.2");
    assert_eq!(resp.header("x-up-x-forwarded-for"), "127.0.0.2");
}

#[tokio::test]
async fn trusted_chain_is_walked_from_the_right() {
    let up = spawn_upstream().await;
    let proxy = spawn_proxy("127.0.0.1:0", Plain, trusting("127.0.0.3, 10.0.0.0/8"), up).await;
    let chain = "X-Forwarded-For: 6.6.6.6, 203.0.113.7, 10.1.1.1\r\nX-Forwarded-Proto: https\r\n\
                 X-Forwarded-Host: app.example\r\n";
    let resp = exchange(connect_from("127.0.0.3", proxy).await, &get(chain))
        .await
        .unwrap();
    assert_eq!(resp.header("x-client"), "203.0.113.7");
    assert_eq!(
        resp.header("x-up-x-forwarded-for"),
        "6.6.6.6, 203.0.113.7, 10.1.1.1, 127.0.0.3"
    );
    assert_eq!(resp.header("x-up-x-real-ip"), "203.0.113.7");
    assert_eq!(resp.header("x-up-x-forwarded-proto"), "https");
    assert_eq!(resp.header("x-up-x-forwarded-host"), "app.example");

    // Not recursive: the last entry, trusted or not.
    let last = trusting("127.0.0.3, 10.0.0.0/8").recursive(false);
    let proxy = spawn_proxy("127.0.0.1:0", Plain, last, up).await;
    let resp = exchange(connect_from("127.0.0.3", proxy).await, &get(chain))
        .await
        .unwrap();
    assert_eq!(resp.header("x-client"), "10.1.1.1");
}

#[tokio::test]
async fn two_sources_are_told_apart() {
    let up = spawn_upstream().await;
    let proxy = spawn_proxy("127.0.0.1:0", Plain, trusting("127.0.0.1"), up).await;
    for src in ["127.0.0.2", "127.0.0.3", "127.0.0.2"] {
        let resp = exchange(connect_from(src, proxy).await, &get(""))
            .await
            .unwrap();
        assert_eq!(resp.header("x-client"), src);
        assert_eq!(resp.header("x-up-x-forwarded-for"), src);
        assert_eq!(resp.header("x-up-x-real-ip"), src);
    }
}

#[tokio::test]
async fn ipv6_client() {
    let up = spawn_upstream().await;
    let layer = trusting("127.0.0.1").forwarded(proxy_core::forwarded::HeaderPolicy::Set);
    let proxy = spawn_proxy("[::1]:0", Plain, layer, up).await;
    let resp = exchange(
        connect_from("::1", proxy).await,
        &get("X-Forwarded-For: 6.6.6.6\r\n"),
    )
    .await
    .unwrap();
    assert_eq!(resp.header("x-client"), "::1");
    assert_eq!(resp.header("x-up-x-forwarded-for"), "6.6.6.6, ::1");
    let fwd = resp.header("x-up-forwarded");
    assert!(fwd.starts_with(r#"for="[::1]:"#), "{fwd}");
    assert!(fwd.ends_with(";host=example.com;proto=http"), "{fwd}");
}

fn lb_acceptor(trusted: &str) -> ProxyProtocol<Plain> {
    ProxyProtocol::new(Plain, trusted.parse::<TrustedProxies>().unwrap())
}

#[tokio::test]
async fn proxy_v1_sets_the_client_and_loses_no_byte() {
    let up = spawn_upstream().await;
    let proxy = spawn_proxy("127.0.0.1:0", lb_acceptor("127.0.0.2"), trusting(""), up).await;
    // Header and request in one write: the request must survive the header read.
    let mut bytes = b"PROXY TCP4 198.51.100.7 127.0.0.1 4711 80\r\n".to_vec();
    bytes.extend(get(""));
    let resp = exchange(connect_from("127.0.0.2", proxy).await, &bytes)
        .await
        .unwrap();
    assert_eq!(resp.status(), "200");
    assert_eq!(resp.header("x-client"), "198.51.100.7");
    assert_eq!(resp.header("x-up-x-forwarded-for"), "198.51.100.7");

    // The same header in pieces: the reader waits for the rest.
    let mut stream = connect_from("127.0.0.2", proxy).await;
    stream
        .write_all(b"PROXY TCP6 2001:db8::7 ::1 ")
        .await
        .unwrap();
    stream.flush().await.unwrap();
    tokio::time::sleep(Duration::from_millis(20)).await; // shape the stream, not a wait
    stream.write_all(b"4711 80\r").await.unwrap();
    stream.flush().await.unwrap();
    tokio::time::sleep(Duration::from_millis(20)).await;
    let mut rest = b"\n".to_vec();
    rest.extend(get(""));
    let resp = exchange(stream, &rest).await.unwrap();
    assert_eq!(resp.header("x-client"), "2001:db8::7");
}

#[tokio::test]
async fn proxy_v2_sets_the_client_and_skips_tlvs() {
    let up = spawn_upstream().await;
    let proxy = spawn_proxy("127.0.0.1:0", lb_acceptor("127.0.0.2"), trusting(""), up).await;
    let mut header = Vec::new();
    write_v2(
        "[2001:db8::9]:4711".parse().unwrap(),
        "[::1]:443".parse().unwrap(),
        &mut header,
    );
    // Add a TLV (an AWS VPC endpoint id) and fix up the length.
    header.extend_from_slice(&[0xea, 0, 4, 1, b'v', b'p', b'c']);
    let len = u16::try_from(header.len() - 16).unwrap().to_be_bytes();
    header[14..16].copy_from_slice(&len);
    header.extend(get(""));
    let resp = exchange(connect_from("127.0.0.2", proxy).await, &header)
        .await
        .unwrap();
    assert_eq!(resp.header("x-client"), "2001:db8::9");

    // LOCAL (a health check): the socket peer stands.
    let mut local = Vec::new();
    proxy_core::forwarded::proxy_protocol::write_v2_local(&mut local);
    local.extend(get(""));
    let resp = exchange(connect_from("127.0.0.2", proxy).await, &local)
        .await
        .unwrap();
    assert_eq!(resp.header("x-client"), "127.0.0.2");
}

#[tokio::test]
async fn malformed_or_missing_proxy_header_closes_the_connection() {
    let up = spawn_upstream().await;
    let acceptor = lb_acceptor("127.0.0.2").header_timeout(Duration::from_millis(300));
    let proxy = spawn_proxy("127.0.0.1:0", acceptor, trusting(""), up).await;
    let cases: [Vec<u8>; 4] = [
        b"PROXY TCP4 198.51.100.7 127.0.0.1 4711\r\n".to_vec(),
        // No LF within the 107 bytes a v1 header may take.
        b"PROXY UNKNOWN ".repeat(9),
        b"\r\n\r\n\0\r\nQUIT\n\x21\x11\x00\x0b0123456789a".to_vec(),
        b"GET / HTTP/1.1\r\nHost: example.com\r\n\r\n".to_vec(),
    ];
    for case in cases {
        let mut bytes = case.clone();
        bytes.extend(get(""));
        let resp = exchange(connect_from("127.0.0.2", proxy).await, &bytes).await;
        assert!(
            resp.is_none(),
            "{:?} got {resp:?}",
            String::from_utf8_lossy(&case)
        );
    }
    // Silence past the header timeout.
    let resp = read_response(connect_from("127.0.0.2", proxy).await).await;
    assert!(resp.is_none());
}

#[tokio::test]
async fn proxy_header_from_an_untrusted_source_is_refused() {
    let up = spawn_upstream().await;
    let proxy = spawn_proxy("127.0.0.1:0", lb_acceptor("127.0.0.3"), trusting(""), up).await;
    let mut bytes = b"PROXY TCP4 198.51.100.7 127.0.0.1 4711 80\r\n".to_vec();
    bytes.extend(get(""));
    assert!(exchange(connect_from("127.0.0.2", proxy).await, &bytes)
        .await
        .is_none());

    // Served as plain if the listener says so: the header is then just a bad request.
    let serve = lb_acceptor("127.0.0.3").untrusted(proxy_core::forwarded::Untrusted::Serve);
    let proxy = spawn_proxy("127.0.0.1:0", serve, trusting(""), up).await;
    let resp = exchange(connect_from("127.0.0.2", proxy).await, &bytes)
        .await
        .unwrap();
    assert_eq!(resp.status(), "400");
    let resp = exchange(connect_from("127.0.0.2", proxy).await, &get(""))
        .await
        .unwrap();
    assert_eq!(resp.header("x-client"), "127.0.0.2");
}

/// The committed fuzz seeds are the inputs they claim to be (a seed that no longer
/// parses would fuzz the error path only).
#[test]
fn fuzz_seeds_are_valid_inputs() {
    use proxy_core::forwarded::{
        parse_cidr_list, parse_forwarded, parse_host, parse_xff_addr, xff_entries,
    };
    let corpus = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus");
    let read = |target: &str, seed: &str| std::fs::read(corpus.join(target).join(seed)).unwrap();
    let text = |target: &str, seed: &str| String::from_utf8(read(target, seed)).unwrap();
    for seed in ["list", "ports"] {
        let s = text("xff", seed);
        assert!(
            xff_entries(&s).all(|e| parse_xff_addr(e).is_some()),
            "{seed}"
        );
    }
    for seed in ["rfc", "obfuscated", "escapes"] {
        let s = text("forwarded", seed);
        assert!(parse_forwarded(&s).all(|e| e.is_ok()), "{seed}");
    }
    for seed in ["name", "ipv6", "dot"] {
        assert!(parse_host(&text("host", seed)).is_some(), "{seed}");
    }
    for seed in ["list", "star", "mixed"] {
        assert!(parse_cidr_list(&text("cidr", seed)).is_ok(), "{seed}");
    }
    for seed in [
        "v1_tcp4",
        "v1_tcp6",
        "v1_unknown",
        "v2_tcp4_tlv",
        "v2_local",
    ] {
        assert!(
            proxy_protocol::parse(&read("proxy_protocol", seed)).is_ok(),
            "{seed}"
        );
    }
    // Every target has a seed directory.
    for target in [
        "xff",
        "forwarded",
        "connection",
        "host",
        "cidr",
        "proxy_protocol",
    ] {
        assert!(
            corpus.join(target).read_dir().unwrap().next().is_some(),
            "{target}"
        );
    }
}
