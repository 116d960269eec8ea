//! Hot pieces of the request path: hop-by-hop stripping, path normalisation, route
//! matching with 10 and 1,000 locations, and a whole request through the router to a
//! terminal service in process (no sockets).
#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, BatchSize, Criterion};
use http::{HeaderMap, HeaderValue, StatusCode};
use proxy_core::router::{
    normalize_path, Location, Locations, Pattern, Return, Router, ServerName, VirtualServer,
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

criterion_group!(benches, hop, routing, whole_request);
criterion_main!(benches);
