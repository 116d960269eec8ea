//! The Redis-shared `limit_req` zone against a real redis-server (Debian's package,
//! started here on a free 127.0.0.1 port with no persistence, killed at the end) and
//! real proxies on loopback: two instances admit `rate·t + burst` in total, delays
//! follow nginx, the fast path's overshoot is bounded, and each fail mode does what it
//! says when Redis goes away (and the zone reconnects when it comes back).
#![cfg(feature = "redis")]
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use proxy_core::limit::redis::{FailMode, RedisLimit, RedisLimitReqLayer, RedisZone};
use proxy_core::limit::Delay;
use proxy_core::{ProxyBody, Request, Response};
use support::{get, send, Proxy, DEADLINE};
use tower::Layer;

/// A redis-server on 127.0.0.1, killed when dropped.
struct Redis {
    port: u16,
    child: Child,
}

impl Redis {
    fn start() -> Redis {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        Redis::start_on(port)
    }

    fn start_on(port: u16) -> Redis {
        let child = Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no", "--protected-mode", "no"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect(
                "redis-server not found: run scripts/test-setup.sh (apt-get install redis-server)",
            );
        let start = Instant::now();
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(start.elapsed() < DEADLINE, "redis-server did not start");
            std::thread::sleep(Duration::from_millis(10));
        }
        Redis { port, child }
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        self.stop();
    }
}

fn app() -> impl tower::Service<
    Request,
    Response = Response,
    Error = Infallible,
    Future = impl Send + 'static,
> + Clone
       + Send
       + Sync
       + 'static {
    tower::service_fn(|_req: Request| async {
        Ok::<_, Infallible>(http::Response::new(ProxyBody::from("ok")))
    })
}

async fn proxy(limit: RedisLimit) -> Proxy {
    let layer = RedisLimitReqLayer::new(limit).status(http::StatusCode::TOO_MANY_REQUESTS);
    Proxy::start(layer.layer(app())).await
}

/// One GET on a fresh connection: its status.
async fn status(addr: SocketAddr) -> u16 {
    send(addr, get("/")).await.0.status.as_u16()
}

fn zone(redis: &Redis, name: &str, rate: &str) -> proxy_core::limit::redis::RedisZoneBuilder {
    RedisZone::builder(&redis.url(), rate.parse().unwrap())
        .unwrap()
        .name(name)
        .timeout(Duration::from_millis(500))
}

/// Requests alternate between `proxies` for `run`: (admitted, rejected, elapsed).
async fn hammer(proxies: &[SocketAddr], run: Duration) -> (u32, u32, Duration) {
    let start = Instant::now();
    let (mut ok, mut limited) = (0, 0);
    let mut i = 0;
    while start.elapsed() < run {
        match status(proxies[i % proxies.len()]).await {
            200 => ok += 1,
            429 => limited += 1,
            other => panic!("unexpected status {other}"),
        }
        i += 1;
    }
    (ok, limited, start.elapsed())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_instances_share_one_budget() {
    let redis = Redis::start();
    // Two instances: two zones (two connections, two local tables), one Redis name.
    let a = zone(&redis, "shared", "10r/s").build();
    let b = zone(&redis, "shared", "10r/s").build();
    let pa = proxy(RedisLimit::new(a.clone()).burst(5).nodelay()).await;
    let pb = proxy(RedisLimit::new(b.clone()).burst(5).nodelay()).await;

    let (ok, limited, elapsed) = hammer(&[pa.addr, pb.addr], Duration::from_millis(1200)).await;
    // nginx: the burst (5) and the first request pass at once, then one per 100 ms.
    let expected = 6.0 + 10.0 * elapsed.as_secs_f64();
    // The upper bound is the claim; the lower one only that the budget refills (a
    // loaded machine may send fewer requests than the rate).
    assert!(
        f64::from(ok) <= expected + 1.0 && ok >= 7,
        "admitted {ok} in {elapsed:?}, expected about {expected:.1} (rejected {limited})"
    );
    // Not twice the budget: each instance alone would have admitted about `expected`.
    assert!(limited > ok, "the shared budget rejected most requests");
    // Both instances decided through Redis, and both admitted some.
    let (sa, sb) = (a.stats(), b.stats());
    assert!(sa.remote > 0 && sb.remote > 0);
    assert_eq!(sa.redis_errors + sb.redis_errors, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delayed_requests_leave_at_the_rate() {
    let redis = Redis::start();
    let z = zone(&redis, "delay", "10r/s").build();
    let p = proxy(RedisLimit::new(z).burst(3).delay(Delay::After(1))).await;
    let start = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..5 {
        let addr = p.addr;
        tasks.push(tokio::spawn(async move {
            let s = status(addr).await;
            (s, start.elapsed())
        }));
    }
    let mut done = Vec::new();
    for t in tasks {
        done.push(t.await.unwrap());
    }
    // Excess 4000 is over the burst (3000): one is refused at once.
    assert_eq!(done.iter().filter(|d| d.0 == 429).count(), 1, "{done:?}");
    let mut passed: Vec<_> = done.iter().filter(|d| d.0 == 200).map(|d| d.1).collect();
    passed.sort();
    // Excess 0 and 1000 pass at once (delay=1); 2000 waits 100 ms, 3000 waits 200 ms.
    assert!(passed[1] < Duration::from_millis(90), "{done:?}");
    assert!(passed[2] >= Duration::from_millis(95), "{done:?}");
    assert!(passed[3] >= Duration::from_millis(195), "{done:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fast_path_overshoot_is_bounded() {
    let redis = Redis::start();
    let a = zone(&redis, "fast", "10r/s").local_allowance(2).build();
    let b = zone(&redis, "fast", "10r/s").local_allowance(2).build();
    let pa = proxy(RedisLimit::new(a.clone()).burst(5).nodelay()).await;
    let pb = proxy(RedisLimit::new(b.clone()).burst(5).nodelay()).await;

    let (ok, limited, elapsed) = hammer(&[pa.addr, pb.addr], Duration::from_millis(1200)).await;
    let expected = 6.0 + 10.0 * elapsed.as_secs_f64();
    // At most `allowance` per instance above the shared limit whenever the views are
    // stale; over a second that is a handful, never another instance's whole budget.
    let fast = a.stats().fast_path + b.stats().fast_path;
    assert!(fast > 0, "the fast path was used");
    assert!(
        f64::from(ok) <= expected + 2.0 * 2.0 + 2.0,
        "admitted {ok} in {elapsed:?}, expected about {expected:.1} (rejected {limited}, fast {fast})"
    );
    assert!(
        f64::from(ok) >= expected - 3.0,
        "admitted {ok}, expected about {expected:.1}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fail_modes_when_redis_is_down_and_reconnect() {
    let mut redis = Redis::start();
    let port = redis.port;
    let build = |name: &str, fail| {
        zone(&redis, name, "1r/s")
            .fail(fail)
            .timeout(Duration::from_millis(200))
            .backoff(Duration::from_millis(50))
            .build()
    };
    let open = build("open", FailMode::Open);
    let closed = build("closed", FailMode::Closed);
    let local = build("local", FailMode::Local);
    let p_open = proxy(RedisLimit::new(open.clone()).nodelay()).await;
    let p_closed = proxy(RedisLimit::new(closed.clone()).nodelay()).await;
    let p_local = proxy(RedisLimit::new(local.clone()).nodelay()).await;
    // Up: one request per second per client, shared.
    for p in [&p_open, &p_closed, &p_local] {
        assert_eq!(status(p.addr).await, 200);
        assert_eq!(status(p.addr).await, 429);
    }

    redis.stop();
    // Open: everything passes, counted.
    for _ in 0..3 {
        assert_eq!(status(p_open.addr).await, 200);
    }
    assert_eq!(open.stats().failed_open, 3);
    // Closed: everything is refused, counted.
    assert_eq!(status(p_closed.addr).await, 429);
    assert!(closed.stats().failed_closed >= 1);
    // Local: this instance limits on its own (a fresh local budget: 1 passes).
    assert_eq!(status(p_local.addr).await, 200);
    assert_eq!(status(p_local.addr).await, 429);
    assert_eq!(local.stats().failed_local, 2);
    assert!(open.stats().redis_errors >= 1);

    // Redis comes back (empty): the zones reconnect by themselves.
    let _again = Redis::start_on(port);
    let before = open.stats().remote;
    let start = Instant::now();
    while open.stats().remote == before {
        assert!(start.elapsed() < DEADLINE, "no reconnect");
        status(p_open.addr).await;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The Lua step against the local limiter (nginx's arithmetic, on a paused clock) for
/// random arrival times, rates and bursts: the same admissions and the same delays.
#[test]
fn lua_step_matches_the_local_limiter() {
    use proptest::prelude::*;
    use proxy_core::limit::{Decision, Rate, ReqLimit, ReqZone};
    use proxy_core::{ClientInfo, Scheme};
    use std::num::NonZeroU32;
    use std::sync::atomic::{AtomicU64, Ordering};

    let redis = Redis::start();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let zone = rt.block_on(async {
        RedisZone::builder(&redis.url(), "1r/s".parse().unwrap())
            .unwrap()
            .build()
    });
    let case = AtomicU64::new(0);

    let config = ProptestConfig {
        cases: 48,
        ..ProptestConfig::default()
    };
    proptest!(config, |(
        per_minute in any::<bool>(),
        n in 1u32..50,
        burst in 0u32..6,
        gaps in prop::collection::vec(0u64..700, 1..25),
    )| {
        let n = NonZeroU32::new(n).unwrap();
        let rate = if per_minute { Rate::per_minute(n) } else { Rate::per_second(n) };
        // The local limiter at each arrival, on a paused clock of its own.
        let local: Vec<Decision> = {
            let paused = tokio::runtime::Builder::new_current_thread()
                .enable_time()
                .start_paused(true)
                .build()
                .unwrap();
            paused.block_on(async {
                let limit = ReqLimit::new(ReqZone::builder(rate).build()).burst(burst);
                let mut req = http::Request::new(());
                req.extensions_mut().insert(ClientInfo::new(
                    "192.0.2.1:1".parse().unwrap(),
                    "127.0.0.1:80".parse().unwrap(),
                    Scheme::Http,
                ));
                let mut out = Vec::new();
                for &gap in &gaps {
                    tokio::time::advance(Duration::from_millis(gap)).await;
                    out.push(limit.check(&req));
                }
                out
            })
        };
        // The script at the same times, on a key of its own (Redis's state persists).
        let zone = RedisZone::builder(&redis.url(), rate).unwrap().name("parity").build();
        let key = case.fetch_add(1, Ordering::SeqCst).to_be_bytes();
        let remote: Vec<(bool, u64)> = rt.block_on(async {
            let mut now = 1_000_000u64;
            let mut out = Vec::new();
            for &gap in &gaps {
                now += gap;
                out.push(zone.step_at(&key, burst, now).await.expect("redis answers"));
            }
            out
        });
        let milli = rate.milli_per_second();
        for (l, (admitted, excess)) in local.iter().zip(&remote) {
            let expected = if *admitted {
                Decision::Admit { delay: Duration::from_millis(excess * 1000 / milli) }
            } else {
                let over = (excess - u64::from(burst) * 1000) * 1000;
                Decision::Reject { retry_after: Duration::from_millis(over.div_ceil(milli)) }
            };
            prop_assert_eq!(*l, expected, "rate {} burst {} gaps {:?}", rate, burst, &gaps);
        }
    });
    drop(zone);
}
