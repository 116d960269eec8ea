//! Hot pieces of the request path: hop-by-hop stripping, path normalisation, route
//! matching with 10 and 1,000 locations, a whole request through the router to a
//! terminal service in process (no sockets), and a whole proxied request through the
//! stack the binary builds for a `proxy_pass` location, to an upstream on loopback.
#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, BatchSize, Criterion};
use http::{HeaderMap, HeaderValue, StatusCode};
use proxy_core::router::{
    normalize_path, Location, LocationService, Locations, Pattern, Return, Router, ServerName,
    VirtualServer,
};
use proxy_core::ProxyBody;
use tower::ServiceExt;

fn browser_headers() -> HeaderMap {
    let mut h = HeaderMap::new();
    for (k, v) in [
        ("host", "api.example.com"),
        (
            "user-agent",
            "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36",
        ),
        (
            "accept",
            "text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8",
        ),
        ("accept-language", "en-US,en;q=0.5"),
        ("accept-encoding", "gzip, deflate, br"),
        ("connection", "keep-alive"),
        ("cookie", "session=abcdef0123456789"),
        ("upgrade-insecure-requests", "1"),
    ] {
        h.insert(k, HeaderValue::from_static(v));
    }
    h
}

fn hop(c: &mut Criterion) {
    let headers = browser_headers();
    c.bench_function("hop_strip/browser_request", |b| {
        b.iter_batched_ref(
            || headers.clone(),
            |h| proxy_core::hop::strip(h, false),
            BatchSize::SmallInput,
        )
    });
    let mut named = headers.clone();
    named.append("connection", HeaderValue::from_static("x-a, x-b"));
    named.insert("x-a", HeaderValue::from_static("1"));
    c.bench_function("hop_strip/named_in_connection", |b| {
        b.iter_batched_ref(
            || named.clone(),
            |h| proxy_core::hop::strip(h, false),
            BatchSize::SmallInput,
        )
    });
}

fn locations(n: usize) -> Locations {
    let mut patterns = vec![Pattern::Prefix("/".into())];
    for i in 0..n.saturating_sub(3) {
        patterns.push(Pattern::Prefix(format!("/svc{i}/api/")));
    }
    patterns.push(Pattern::Exact("/healthz".into()));
    patterns.push(Pattern::RegexCaseless("\\.(env|git|svn|config)$".into()));
    Locations::new(&patterns).expect("valid patterns")
}

fn routing(c: &mut Criterion) {
    c.bench_function("normalize_path/typical", |b| {
        b.iter(|| normalize_path(black_box("/api/v1/users/42/profile")))
    });
    for n in [10, 1000] {
        let l = locations(n);
        c.bench_function(&format!("route_match/{n}_locations"), |b| {
            b.iter(|| l.find(black_box("/svc5/api/users/42")))
        });
    }
}

fn whole_request(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("runtime");
    let router = Router::builder()
        .server(
            VirtualServer::new(ServerName::parse("api.example.com"))
                .location(Location::new(
                    Pattern::Prefix("/".into()),
                    Return::new(StatusCode::OK),
                ))
                .location(Location::new(
                    Pattern::RegexCaseless("\\.(env|git)$".into()),
                    Return::new(StatusCode::FORBIDDEN),
                )),
        )
        .build()
        .expect("router");
    let headers = browser_headers();
    c.bench_function("in_process/router_to_return", |b| {
        b.iter_batched(
            || {
                let mut req = http::Request::new(ProxyBody::empty());
                *req.uri_mut() = http::Uri::from_static("/api/v1/users/42");
                *req.headers_mut() = headers.clone();
                req
            },
            |req| rt.block_on(router.clone().oneshot(req)),
            BatchSize::SmallInput,
        )
    });
}

/// A keep-alive upstream on 127.0.0.1 answering every request with a 13-byte body (the
/// load comparison's `/small`). It reads up to the end of each request head.
async fn tiny_upstream() -> std::net::SocketAddr {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut sock, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut buf = Vec::with_capacity(4096);
                let mut chunk = [0u8; 4096];
                loop {
                    let Ok(n) = sock.read(&mut chunk).await else {
                        return;
                    };
                    if n == 0 {
                        return;
                    }
                    buf.extend_from_slice(&chunk[..n]);
                    while let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                        buf.drain(..end + 4);
                        let resp = b"HTTP/1.1 200 OK\r\nContent-Length: 13\r\nContent-Type: text/plain\r\n\r\nhello, world\n";
                        if sock.write_all(resp).await.is_err() {
                            return;
                        }
                    }
                }
            });
        }
    });
    addr
}

/// What `proxy-bin` builds for a `[[server.location]]` with `proxy_pass` and no other
/// key (see its `config/location.rs`): forwarded headers, client body timeout, body
/// limit, request and response buffering, upstream body timeout, the balancer; under
/// a router, under the listener's reloadable service.
fn binary_stack(upstream: std::net::SocketAddr) -> proxy_core::reload::Reloadable<LocationService> {
    use proxy_core::balance::{Balance, Group, NextUpstream, Server};
    use proxy_core::buffer::{BodyLimitLayer, RequestBufferLayer, ResponseBufferLayer};
    use proxy_core::forwarded::ForwardedLayer;
    use proxy_core::timeout::{ClientBodyTimeoutLayer, UpstreamBodyTimeoutLayer};
    use proxy_core::upstream::{ClientConfig, UpstreamClient, UpstreamTimeouts};
    use std::time::Duration;
    let minute = Duration::from_secs(60);
    let group = Group::builder("app")
        .server(Server::new(upstream))
        .build()
        .unwrap();
    let balance = Balance::new(group, UpstreamClient::new(ClientConfig::default()))
        .with_timeouts(UpstreamTimeouts {
            read_timeout: minute,
            idle_timeout: minute,
        })
        .with_next_upstream(NextUpstream::default())
        .with_upstream_info(false);
    let stack = tower::ServiceBuilder::new()
        .layer(ForwardedLayer::new())
        .layer(ClientBodyTimeoutLayer::new(minute))
        .layer(BodyLimitLayer::new(1 << 20))
        .layer(RequestBufferLayer::new().max_body_size(1 << 20))
        .layer(ResponseBufferLayer::new())
        .layer(UpstreamBodyTimeoutLayer::new(minute))
        .service(balance);
    let router = Router::builder()
        .server(VirtualServer::new([]).location(Location::new(Pattern::Prefix("/".into()), stack)))
        .build()
        .unwrap();
    proxy_core::reload::Reloadable::new(LocationService::new(router)).0
}

fn proxied_request(c: &mut Criterion) {
    use http_body_util::BodyExt;
    use proxy_core::{ClientInfo, Scheme};
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let svc = binary_stack(rt.block_on(tiny_upstream()));
    let info = ClientInfo::new(
        "127.0.0.1:50000".parse().unwrap(),
        "127.0.0.1:8080".parse().unwrap(),
        Scheme::Http,
    );
    let headers = browser_headers();
    c.bench_function("in_process/binary_stack_to_loopback_upstream", |b| {
        b.iter_batched(
            || {
                let mut req = http::Request::new(ProxyBody::empty());
                *req.uri_mut() = http::Uri::from_static("/small");
                *req.headers_mut() = headers.clone();
                req.extensions_mut().insert(info.clone());
                req
            },
            |req| {
                rt.block_on(async {
                    let resp = svc.clone().oneshot(req).await.unwrap();
                    assert_eq!(resp.status(), StatusCode::OK);
                    // To the end, so the upstream connection goes back to the pool.
                    resp.into_body().collect().await.unwrap().to_bytes()
                })
            },
            BatchSize::SmallInput,
        )
    });
}

criterion_group!(benches, hop, routing, whole_request, proxied_request);
criterion_main!(benches);
