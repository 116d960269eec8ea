//! The forwarded-header parsers on hostile 64 KiB inputs (and 4 KiB, to show the time
//! grows linearly), and the layer's per-request cost on an ordinary request.
//!
//! `cargo bench -p benches --bench forwarded`
#![allow(missing_docs, clippy::unwrap_used)]

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use proxy_core::client_info::{ClientInfo, Scheme};
use proxy_core::forwarded::{
    parse_cidr_list, parse_forwarded, parse_host, parse_xff_addr, proxy_protocol, xff_entries,
    ForwardedLayer,
};
use tower::{Layer, Service};

fn inputs(size: usize) -> Vec<(&'static str, String)> {
    let fill = |unit: &str| unit.repeat(size / unit.len());
    vec![
        ("xff_addresses", fill("203.0.113.7, ")),
        ("xff_commas", fill(",")),
        (
            "forwarded_elements",
            fill(r#"for="[2001:db8::1]:4711";proto=https, "#),
        ),
        ("forwarded_escapes", format!("host=\"{}\"", fill(r"\a"))),
        ("forwarded_unterminated", format!("for=\"{}", fill("a"))),
        ("host_long", fill("a")),
        ("cidr_list", fill("10.0.0.0/8, ")),
        ("proxy_v1_garbage", format!("PROXY {}", fill("x"))),
    ]
}

fn parsers(c: &mut Criterion) {
    let mut group = c.benchmark_group("forwarded_parsers");
    for size in [4 * 1024, 64 * 1024] {
        for (name, input) in inputs(size) {
            group.throughput(Throughput::Bytes(input.len() as u64));
            group.bench_with_input(BenchmarkId::new(name, size), &input, |b, input| {
                b.iter(|| match name {
                    n if n.starts_with("xff") => {
                        black_box(xff_entries(input).rev().filter_map(parse_xff_addr).count());
                    }
                    n if n.starts_with("forwarded") => {
                        black_box(parse_forwarded(input).count());
                    }
                    "host_long" => {
                        black_box(parse_host(input));
                    }
                    "cidr_list" => {
                        black_box(parse_cidr_list(input).map(|v| v.len()).ok());
                    }
                    _ => {
                        black_box(proxy_protocol::parse(input.as_bytes()).ok());
                    }
                })
            });
        }
    }
    group.finish();
}

fn layer(c: &mut Criterion) {
    let mut svc = ForwardedLayer::new()
        .trusted("10.0.0.0/8".parse().unwrap())
        .layer(tower::service_fn(|req: http::Request<()>| {
            std::future::ready(Ok::<_, std::convert::Infallible>(req))
        }));
    let info = ClientInfo::new(
        "10.0.0.2:51000".parse().unwrap(),
        "10.0.0.1:80".parse().unwrap(),
        Scheme::Http,
    );
    c.bench_function("forwarded_layer_request", |b| {
        b.iter_batched(
            || {
                let mut req = http::Request::builder()
                    .uri("/")
                    .header("host", "example.com")
                    .header("x-forwarded-for", "203.0.113.7")
                    .header("x-forwarded-proto", "https")
                    .body(())
                    .unwrap();
                req.extensions_mut().insert(info.clone());
                req
            },
            |req| black_box(svc.call(req)),
            criterion::BatchSize::SmallInput,
        )
    });
}

criterion_group!(benches, parsers, layer);
criterion_main!(benches);
