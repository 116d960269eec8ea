//! The rate limiter's hot path: one `ReqLimit::check` (key hash, shard lock, nginx
//! arithmetic, clock read), alone, from two threads on one key, from two threads on many
//! keys, and under a flood of keys that evicts on every request.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::net::{Ipv4Addr, SocketAddr};
use std::num::{NonZeroU32, NonZeroUsize};
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion};
use proxy_core::limit::{Rate, ReqLimit, ReqZone};
use proxy_core::{ClientInfo, Scheme};

/// A request from `ip`, as the server would hand it on.
fn request(ip: u32) -> http::Request<()> {
    let mut req = http::Request::new(());
    req.extensions_mut().insert(ClientInfo::new(
        SocketAddr::from((Ipv4Addr::from(ip), 40_000)),
        "127.0.0.1:80".parse().unwrap(),
        Scheme::Http,
    ));
    req
}

/// A limit that admits everything, so the same path runs on every iteration.
fn limit(capacity: usize) -> ReqLimit {
    let zone = ReqZone::builder(Rate::per_second(NonZeroU32::MAX))
        .capacity(NonZeroUsize::new(capacity).unwrap())
        .build();
    ReqLimit::new(zone).burst(u32::MAX).nodelay()
}

/// Runs `per_thread(thread, iters)` on two threads at once; the time is the slower one's.
fn two_threads(limit: &ReqLimit, reqs: &[Vec<http::Request<()>>; 2], iters: u64) -> Duration {
    let barrier = std::sync::Barrier::new(2);
    std::thread::scope(|s| {
        let handles: Vec<_> = reqs
            .iter()
            .map(|mine| {
                let barrier = &barrier;
                s.spawn(move || {
                    barrier.wait();
                    let start = Instant::now();
                    for i in 0..iters as usize {
                        std::hint::black_box(limit.check(&mine[i % mine.len()]));
                    }
                    start.elapsed()
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap())
            .max()
            .unwrap_or_default()
    })
}

fn bench(c: &mut Criterion) {
    let mut g = c.benchmark_group("limit_req");

    let one = limit(16_384);
    let req = request(0x0a00_0001);
    g.bench_function("check_uncontended", |b| {
        b.iter(|| std::hint::black_box(one.check(&req)))
    });

    let shared = limit(16_384);
    let same = [vec![request(0x0a00_0001)], vec![request(0x0a00_0001)]];
    g.bench_function("two_threads_one_key", |b| {
        b.iter_custom(|iters| two_threads(&shared, &same, iters))
    });

    let spread = limit(16_384);
    let many = [
        (0..1024).map(|i| request(0x0a00_0000 + i)).collect(),
        (0..1024).map(|i| request(0x0b00_0000 + i)).collect(),
    ];
    g.bench_function("two_threads_many_keys", |b| {
        b.iter_custom(|iters| two_threads(&spread, &many, iters))
    });

    // 65 536 addresses through a zone of 4 096: every check inserts and evicts.
    let small = limit(4096);
    let flood: Vec<_> = (0..65_536).map(|i| request(0x0c00_0000 + i)).collect();
    let mut i = 0;
    g.bench_function("check_flood_evicting", |b| {
        b.iter(|| {
            i = (i + 1) % flood.len();
            std::hint::black_box(small.check(&flood[i]))
        })
    });
    g.finish();
    assert!(small.zone().len() <= 4096);
}

criterion_group!(benches, bench);
criterion_main!(benches);
