//! The cost of one pick (select + release) in an upstream group of 2, 16 and 256
//! servers, round-robin and least_conn, from one thread and from two threads at once.
#![allow(clippy::unwrap_used)]

use std::hint::black_box;
use std::net::SocketAddr;
use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use proxy_core::balance::{Group, Policy, Server};

fn group(n: usize, policy: Policy) -> Arc<Group> {
    let mut b = Group::builder("bench").policy(policy);
    for i in 0..n {
        let addr = SocketAddr::from(([127, 0, 0, 1], 10_000 + i as u16));
        let weight = NonZeroU32::new(1 + (i % 3) as u32).unwrap_or(NonZeroU32::MIN);
        b = b.server(Server::new(addr).weight(weight));
    }
    b.build().unwrap()
}

fn pick(g: &Arc<Group>) {
    let mut tried = g.tried();
    black_box(g.select(&mut tried));
}

fn bench(c: &mut Criterion) {
    // Group construction stays outside the timed closures.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .unwrap();
    let _enter = rt.enter();
    for (name, policy) in [
        ("round_robin", Policy::RoundRobin),
        ("least_conn", Policy::LeastConn),
    ] {
        let mut one = c.benchmark_group(format!("balance/{name}/1_thread"));
        for n in [2usize, 16, 256] {
            let g = group(n, policy);
            one.bench_with_input(BenchmarkId::from_parameter(n), &g, |b, g| {
                b.iter(|| pick(g))
            });
        }
        one.finish();

        let mut two = c.benchmark_group(format!("balance/{name}/2_threads"));
        for n in [2usize, 16, 256] {
            let g = group(n, policy);
            two.bench_with_input(BenchmarkId::from_parameter(n), &g, |b, g| {
                // Each of two threads does `iters` picks; the time is per pick pair.
                b.iter_custom(|iters| {
                    let other = Arc::clone(g);
                    let start = Instant::now();
                    let helper = std::thread::spawn(move || {
                        for _ in 0..iters {
                            pick(&other);
                        }
                    });
                    for _ in 0..iters {
                        pick(g);
                    }
                    let _ = helper.join();
                    start.elapsed()
                })
            });
        }
        two.finish();
    }
}

criterion_group! {
    name = benches;
    config = Criterion::default().measurement_time(Duration::from_secs(3));
    targets = bench
}
criterion_main!(benches);
