//! Soak and faults over real loopback sockets, bounded in count and time: upstreams
//! restarted under load, upstreams that reset mid-body, clients that vanish mid-request
//! and mid-response, 10,000 concurrent client connections, and a panic inside one
//! connection. After each, the server's live-connection count returns to zero, and where
//! it is measured, memory and the runtime's live-task count return near their baseline.
//!
//! Run alone with `cargo nextest run -p proxy-core --test soak`; each test is its own
//! process there, which the memory and task measurements rely on.
#![allow(clippy::unwrap_used, clippy::expect_used)]

/// The allocator the `proxy` binary ships with (jemalloc, purging freed pages from a
/// background thread), so the memory figures here are the binary's.
#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

mod robust_support;

use std::convert::Infallible;
use std::io::{BufRead, Write};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, StreamBody};
use proxy_core::server::HttpConfig;
use proxy_core::upstream::{ClientConfig, Forward, UpstreamClient};
use proxy_core::{ProxyBody, Request, Response};
use robust_support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

fn client_config() -> ClientConfig {
    let mut c = ClientConfig::default();
    c.connect_timeout = Duration::from_secs(2);
    c.read_timeout = Duration::from_secs(5);
    // Short, so idle pooled connections (and their tasks) go away within the test.
    c.keepalive_timeout = Duration::from_millis(300);
    c
}

fn forward(addr: SocketAddr) -> Forward {
    Forward::new(UpstreamClient::new(client_config()), addr)
}

async fn ok(_req: http::Request<hyper::body::Incoming>) -> http::Response<ProxyBody> {
    http::Response::new(ProxyBody::from("ok"))
}

fn alive_tasks() -> usize {
    tokio::runtime::Handle::current()
        .metrics()
        .num_alive_tasks()
}

async fn wait_idle(stats: &proxy_core::server::ServerStats) {
    wait_until(DEADLINE, "active connections back to zero", || {
        stats.active() == 0
    })
    .await;
}

/// Eight keep-alive clients hammer the proxy while the upstream is killed (listener and
/// every connection) and restarted on the same port. Every request gets an answer (200,
/// or 502 while the upstream is down), no client connection breaks, and once the
/// upstream is back every request succeeds: stale pooled connections are not fatal.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_restarted_under_load() {
    let up = HyperUpstream::start("127.0.0.1:0".parse().unwrap(), ok).await;
    let up_addr = up.addr;
    let proxy = StatsProxy::start(forward(up_addr), HttpConfig::default()).await;
    let statuses = Arc::new(Mutex::new(Vec::<u16>::new()));
    let client_errors = Arc::new(AtomicUsize::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let mut workers = tokio::task::JoinSet::new();
    for _ in 0..8 {
        let (statuses, errors, stop, addr) = (
            statuses.clone(),
            client_errors.clone(),
            stop.clone(),
            proxy.addr,
        );
        workers.spawn(async move {
            let mut s = TcpStream::connect(addr).await.unwrap();
            // Bounded: a worker never sends more than 5,000 requests.
            for _ in 0..5_000 {
                if stop.load(Ordering::Relaxed) {
                    return;
                }
                s.write_all(b"GET / HTTP/1.1\r\nHost: h.test\r\n\r\n")
                    .await
                    .unwrap();
                match tokio::time::timeout(DEADLINE, read_one_response(&mut s)).await {
                    Ok(Ok(status)) => statuses.lock().unwrap().push(status),
                    _ => {
                        errors.fetch_add(1, Ordering::Relaxed);
                        s = TcpStream::connect(addr).await.unwrap();
                    }
                }
            }
        });
    }
    let count = || statuses.lock().unwrap().len();
    wait_until(DEADLINE, "200 requests before the restart", || {
        count() >= 200
    })
    .await;
    up.kill().await;
    wait_until(DEADLINE, "a 502 while the upstream is down", || {
        statuses.lock().unwrap().contains(&502)
    })
    .await;
    let up = HyperUpstream::start(up_addr, ok).await;
    let restarted_at = count();
    wait_until(DEADLINE, "300 requests after the restart", || {
        count() >= restarted_at + 300
    })
    .await;
    stop.store(true, Ordering::Relaxed);
    while let Some(r) = workers.join_next().await {
        r.unwrap();
    }
    let statuses = statuses.lock().unwrap().clone();
    assert_eq!(
        client_errors.load(Ordering::Relaxed),
        0,
        "a client connection broke"
    );
    assert!(
        statuses.iter().all(|s| *s == 200 || *s == 502),
        "{:?}",
        statuses.iter().filter(|s| **s != 200).collect::<Vec<_>>()
    );
    // The tail, well after the restart, is all 200: the pool recovered by itself.
    let tail = &statuses[statuses.len() - 100..];
    assert!(tail.iter().all(|s| *s == 200), "{tail:?}");
    wait_idle(&proxy.stats).await;
    drop(up);
}

/// An upstream that answers `/reset-cl` and `/reset-chunked` with a 200 head and 64 KiB
/// of a longer body, then resets the connection (SO_LINGER 0); anything else gets a
/// short 200.
async fn resetting_upstream() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = listener.accept().await else {
                return;
            };
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut buf = [0u8; 4096];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    match s.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => head.extend_from_slice(&buf[..n]),
                    }
                }
                let text = String::from_utf8_lossy(&head).into_owned();
                let data = vec![b'x'; 64 * 1024];
                if text.starts_with("GET /reset-cl ") {
                    let _ = s
                        .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 1048576\r\n\r\n")
                        .await;
                    let _ = s.write_all(&data).await;
                } else if text.starts_with("GET /reset-chunked ") {
                    let _ = s
                        .write_all(
                            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n10000\r\n",
                        )
                        .await;
                    let _ = s.write_all(&data).await;
                    let _ = s.write_all(b"\r\n").await;
                } else {
                    let _ = s
                        .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
                        .await;
                    return;
                }
                let _ = s.flush().await;
                // Reset, not a clean FIN.
                let _ = socket2::SockRef::from(&s).set_linger(Some(Duration::ZERO));
                drop(s);
            });
        }
    });
    addr
}

/// An upstream that dies mid-body must not make the client believe it got a whole
/// response: with Content-Length the proxy closes early (short body); with chunked it
/// never sends the last chunk. Either way the client connection closes and the server
/// goes on serving.
#[tokio::test]
async fn upstream_reset_mid_body_truncates_visibly() {
    let up = resetting_upstream().await;
    let proxy = StatsProxy::start(forward(up), HttpConfig::default()).await;
    for path in ["/reset-cl", "/reset-chunked"] {
        let req = format!("GET {path} HTTP/1.1\r\nHost: h.test\r\n\r\n");
        let out = exchange(proxy.addr, req.as_bytes()).await;
        let head_end = out
            .windows(4)
            .position(|w| w == b"\r\n\r\n")
            .unwrap_or_else(|| panic!("{path}: no head: {:?}", String::from_utf8_lossy(&out)));
        let head = String::from_utf8_lossy(&out[..head_end]).to_ascii_lowercase();
        assert!(head.starts_with("http/1.1 200"), "{path}: {head}");
        let body = &out[head_end + 4..];
        if let Some(cl) = head.lines().find_map(|l| l.strip_prefix("content-length:")) {
            let cl: usize = cl.trim().parse().unwrap();
            assert!(body.len() < cl, "{path}: a truncated body looked complete");
        } else {
            assert!(
                head.contains("transfer-encoding: chunked"),
                "{path}: {head}"
            );
            assert!(
                !body.ends_with(b"0\r\n\r\n"),
                "{path}: the proxy ended a broken chunked body cleanly"
            );
        }
    }
    let out = exchange(
        proxy.addr,
        b"GET /fine HTTP/1.1\r\nHost: h.test\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(out.starts_with(b"HTTP/1.1 200"));
    wait_idle(&proxy.stats).await;
}

/// What the recording upstream saw of one request body.
#[derive(Debug)]
enum BodyOutcome {
    Complete(#[allow(dead_code)] usize),
    Broken,
}

/// A client that vanishes mid-request: the upstream must see the request body fail,
/// never end cleanly (a truncated body taken as complete is a corrupted write), and the
/// proxy must let go of the connection.
#[tokio::test]
async fn client_vanishing_mid_request_aborts_the_upstream_request() {
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<BodyOutcome>();
    let up = HyperUpstream::start("127.0.0.1:0".parse().unwrap(), move |req| {
        let tx = tx.clone();
        async move {
            let outcome = match req.into_body().collect().await {
                Ok(b) => BodyOutcome::Complete(b.to_bytes().len()),
                Err(_) => BodyOutcome::Broken,
            };
            let _ = tx.send(outcome);
            http::Response::new(ProxyBody::from("ok"))
        }
    })
    .await;
    let proxy = StatsProxy::start(forward(up.addr), HttpConfig::default()).await;
    let tasks_before = alive_tasks();
    let heads: [&[u8]; 2] = [
        b"POST /cl HTTP/1.1\r\nHost: h.test\r\nContent-Length: 1048576\r\n\r\n",
        b"POST /chunked HTTP/1.1\r\nHost: h.test\r\nTransfer-Encoding: chunked\r\n\r\n100000\r\n",
    ];
    for head in heads {
        let mut c = TcpStream::connect(proxy.addr).await.unwrap();
        c.write_all(head).await.unwrap();
        c.write_all(&vec![b'y'; 64 * 1024]).await.unwrap();
        // Make sure the head went upstream before vanishing: the upstream's read of the
        // body is what must fail.
        wait_until(DEADLINE, "the proxy to open an upstream request", || {
            proxy.stats.active() == 1
        })
        .await;
        let _ = socket2::SockRef::from(&c).set_linger(Some(Duration::ZERO));
        drop(c);
        let outcome = tokio::time::timeout(DEADLINE, rx.recv())
            .await
            .expect("the upstream request was left hanging")
            .unwrap();
        assert!(
            matches!(outcome, BodyOutcome::Broken),
            "{}: upstream saw {outcome:?}",
            String::from_utf8_lossy(head)
        );
        wait_idle(&proxy.stats).await;
    }
    wait_until(DEADLINE, "tasks back to the baseline", || {
        alive_tasks() <= tasks_before
    })
    .await;
}

/// A client that vanishes mid-response: the proxy stops pulling the upstream body (the
/// upstream's body stream is dropped), instead of draining an endless response.
#[tokio::test]
async fn client_vanishing_mid_response_releases_the_upstream() {
    let dropped = Arc::new(AtomicUsize::new(0));
    let produced = Arc::new(AtomicUsize::new(0));
    let (d, p) = (dropped.clone(), produced.clone());
    let up = HyperUpstream::start("127.0.0.1:0".parse().unwrap(), move |_req| {
        let guard = DropFlag(d.clone());
        let produced = p.clone();
        async move {
            // At most 16 GiB in 64 KiB chunks: "endless" for this test, still bounded.
            let chunks = futures_util::stream::iter(0..262_144usize).map(move |_| {
                let _keep = &guard;
                produced.fetch_add(1, Ordering::Relaxed);
                Ok::<_, Infallible>(http_body::Frame::data(Bytes::from_static(&[b'z'; 65536])))
            });
            http::Response::new(ProxyBody::boxed(StreamBody::new(chunks)))
        }
    })
    .await;
    let proxy = StatsProxy::start(forward(up.addr), HttpConfig::default()).await;
    for _ in 0..3 {
        let mut c = TcpStream::connect(proxy.addr).await.unwrap();
        c.write_all(b"GET /stream HTTP/1.1\r\nHost: h.test\r\n\r\n")
            .await
            .unwrap();
        let mut got = 0usize;
        let mut buf = vec![0u8; 64 * 1024];
        while got < 256 * 1024 {
            let n = tokio::time::timeout(DEADLINE, c.read(&mut buf))
                .await
                .unwrap()
                .unwrap();
            assert!(n > 0);
            got += n;
        }
        drop(c);
    }
    wait_until(DEADLINE, "the upstream bodies to be dropped", || {
        dropped.load(Ordering::SeqCst) == 3
    })
    .await;
    // Not drained: far less than the 16 GiB each response offered went out.
    assert!(produced.load(Ordering::Relaxed) < 3 * 10_000);
    wait_idle(&proxy.stats).await;
}

struct DropFlag(Arc<AtomicUsize>);

impl Drop for DropFlag {
    fn drop(&mut self) {
        self.0.fetch_add(1, Ordering::SeqCst);
    }
}

use futures_util::StreamExt as _;

/// A service that panics on `/panic-call` (while being called), on `/panic-future`
/// (inside its future) and on `/panic-body` (while its body is polled).
fn panicky(
) -> impl tower::Service<Request, Response = Response, Error = Infallible, Future = impl Send>
       + Clone
       + Send
       + Sync
       + 'static {
    tower::service_fn(|req: Request| {
        let path = req.uri().path().to_owned();
        assert!(path != "/panic-call", "deliberate panic in call");
        async move {
            match path.as_str() {
                "/panic-future" => panic!("deliberate panic in the response future"),
                "/panic-body" => {
                    let chunks = futures_util::stream::iter(0..2).map(|i| {
                        assert!(i == 0, "deliberate panic in the body");
                        Ok::<_, Infallible>(http_body::Frame::data(Bytes::from_static(b"x")))
                    });
                    Ok(http::Response::new(ProxyBody::boxed(StreamBody::new(
                        chunks,
                    ))))
                }
                _ => Ok(http::Response::new(ProxyBody::from("ok"))),
            }
        }
    })
}

/// Everything logged through `tracing` in this process, from the first call on.
fn captured_logs() -> Arc<Mutex<Vec<u8>>> {
    static LOGS: std::sync::OnceLock<Arc<Mutex<Vec<u8>>>> = std::sync::OnceLock::new();
    LOGS.get_or_init(|| {
        let logs = Arc::new(Mutex::new(Vec::new()));
        let sink = logs.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_max_level(tracing::Level::WARN)
            .with_ansi(false)
            .with_writer(move || LogSink(sink.clone()))
            .finish();
        // Fails only if another test of this binary installed one first, which none does.
        let _ = tracing::subscriber::set_global_default(subscriber);
        logs
    })
    .clone()
}

/// A `tracing` writer appending to the shared buffer.
struct LogSink(Arc<Mutex<Vec<u8>>>);

impl Write for LogSink {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn count_panic_lines(logs: &Mutex<Vec<u8>>) -> usize {
    String::from_utf8_lossy(&logs.lock().unwrap())
        .lines()
        .filter(|l| l.contains("ERROR") && l.contains("a connection task panicked"))
        .count()
}

/// A panic inside one connection's task takes down that connection only: its client
/// sees the connection close, the panic is logged as an error through `tracing`, the
/// live-connection count still returns to zero, and the next connection is served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn panic_in_one_connection_keeps_the_server_serving() {
    let logs = captured_logs();
    let proxy = StatsProxy::start(panicky(), HttpConfig::default()).await;
    let tasks_before = alive_tasks();
    for path in ["/panic-call", "/panic-future", "/panic-body"] {
        // A neighbour connection, open across the panic, must survive it.
        let mut neighbour = TcpStream::connect(proxy.addr).await.unwrap();
        neighbour
            .write_all(b"GET /ok HTTP/1.1\r\nHost: h.test\r\n\r\n")
            .await
            .unwrap();
        assert_eq!(read_one_response(&mut neighbour).await.unwrap(), 200);

        let req = format!("GET {path} HTTP/1.1\r\nHost: h.test\r\n\r\n");
        let out = exchange(proxy.addr, req.as_bytes()).await;
        let text = String::from_utf8_lossy(&out);
        assert!(
            !text.contains("\r\n0\r\n\r\n") && !text.ends_with("x"),
            "{path}: a panicking response looked complete: {text:?}"
        );

        neighbour
            .write_all(b"GET /ok HTTP/1.1\r\nHost: h.test\r\n\r\n")
            .await
            .unwrap();
        assert_eq!(read_one_response(&mut neighbour).await.unwrap(), 200);
        drop(neighbour);
        let out = exchange(
            proxy.addr,
            b"GET /ok HTTP/1.1\r\nHost: h.test\r\nConnection: close\r\n\r\n",
        )
        .await;
        assert!(out.starts_with(b"HTTP/1.1 200"), "{path}: not served after");
        wait_idle(&proxy.stats).await;
    }
    wait_until(DEADLINE, "each panic logged as an error", || {
        count_panic_lines(&logs) == 3
    })
    .await;
    wait_until(DEADLINE, "tasks back to the baseline", || {
        alive_tasks() <= tasks_before
    })
    .await;
}

/// Environment variables that turn the `swarm_child` test into the client side of
/// `ten_thousand_concurrent_connections`.
const SWARM_ADDR: &str = "ROBUST_SWARM_ADDR";
const SWARM_N: &str = "ROBUST_SWARM_N";

/// 10,000 client connections open at once through the proxy, each having had one request
/// answered. The clients live in a child process (this test binary re-run as
/// `swarm_child`), so each side has its own file-descriptor budget. After each wave the
/// live-connection count returns to zero and the process's RSS returns near its baseline
/// (within a quarter of the wave's growth; jemalloc hands freed pages back after its
/// 10 s decay), and afterwards the runtime's live tasks return to their baseline.
/// `ROBUST_SWARM_CONNECTIONS` and `ROBUST_SWARM_WAVES` scale it up for a long run.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_concurrent_connections() {
    let want: u64 = env_or("ROBUST_SWARM_CONNECTIONS", 10_000);
    let waves: usize = env_or("ROBUST_SWARM_WAVES", 2).max(2);
    let limit = raise_nofile();
    // This process holds the server side of every connection plus upstream sockets.
    let n = want.min(limit.saturating_sub(512));
    if n < want {
        println!(
            "open-file limit is {limit} (hard limit reached): running with {n} connections instead of {want}"
        );
    }
    let up = HyperUpstream::start("127.0.0.1:0".parse().unwrap(), ok).await;
    let mut config = HttpConfig::default();
    config.header_read_timeout = Duration::from_secs(60);
    let proxy = StatsProxy::start(forward(up.addr), config).await;
    // As the binary does at start.
    tikv_jemalloc_ctl::background_thread::write(true).unwrap();
    let rss_base = rss_kib().unwrap_or(0);
    let tasks_base = alive_tasks();
    let t0 = std::time::Instant::now();
    for wave in 0..waves {
        let peak = swarm_wave(&proxy, n).await;
        let near = rss_base + peak.saturating_sub(rss_base) / 4;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        let settled = loop {
            let now = rss_kib().unwrap_or(0);
            if now <= near {
                break now;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "wave {wave}: RSS stays at {now} KiB after {n} connections closed \
                 (baseline {rss_base} KiB, peak {peak} KiB): memory is not returned"
            );
            tokio::time::sleep(Duration::from_millis(250)).await;
        };
        println!(
            "wave {wave}: {n} connections, {:?} in, RSS baseline {rss_base} KiB, peak {peak} KiB, settled at {settled} KiB",
            t0.elapsed()
        );
    }
    // Every connection task is gone (idle pooled upstream connections expire in 300 ms).
    wait_until(DEADLINE, "tasks back to the baseline", || {
        alive_tasks() <= tasks_base
    })
    .await;
    proxy.stop().await;
    drop(up);
}

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Open `n` connections from a child process, check every one is live on the server,
/// release them all, and wait for the server to see them closed. Returns peak RSS.
async fn swarm_wave(proxy: &StatsProxy, n: u64) -> u64 {
    let exe = std::env::current_exe().unwrap();
    let mut child = std::process::Command::new(exe)
        .args(["swarm_child", "--exact", "--ignored", "--nocapture"])
        .env(SWARM_ADDR, proxy.addr.to_string())
        .env(SWARM_N, n.to_string())
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let (line_tx, mut line_rx) = tokio::sync::mpsc::unbounded_channel::<String>();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout).lines() {
            let Ok(line) = line else { return };
            if line_tx.send(line).is_err() {
                return;
            }
        }
    });
    let ready = tokio::time::timeout(Duration::from_secs(60), async {
        while let Some(line) = line_rx.recv().await {
            if let Some(rest) = line.strip_prefix("SWARM READY ") {
                return rest.to_owned();
            }
        }
        panic!("the swarm child exited before it was ready");
    })
    .await
    .expect("the swarm child did not open its connections in time");
    let answered: u64 = ready.trim().parse().unwrap();
    assert_eq!(answered, n, "not every connection got its answer");
    wait_until(DEADLINE, "every connection live on the server", || {
        proxy.stats.active() as u64 == n
    })
    .await;
    let peak = rss_kib().unwrap_or(0);
    // Let the clients go, all at once.
    child.stdin.take().unwrap().write_all(b"go\n").unwrap();
    let status = tokio::task::spawn_blocking(move || child.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(status.success(), "swarm child failed: {status}");
    wait_until(Duration::from_secs(20), "all connections closed", || {
        proxy.stats.active() == 0
    })
    .await;
    peak
}

/// The client side of `ten_thousand_concurrent_connections`; does nothing unless that
/// test started it.
#[test]
#[ignore = "helper process of ten_thousand_concurrent_connections"]
fn swarm_child() {
    let (Ok(addr), Ok(n)) = (std::env::var(SWARM_ADDR), std::env::var(SWARM_N)) else {
        return;
    };
    let addr: SocketAddr = addr.parse().unwrap();
    let n: usize = n.parse().unwrap();
    raise_nofile();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async move {
        // At most 256 connections being set up at a time, so the accept queue holds.
        let sem = Arc::new(tokio::sync::Semaphore::new(256));
        let mut set = tokio::task::JoinSet::new();
        for _ in 0..n {
            let permit = sem.clone().acquire_owned().await.unwrap();
            set.spawn(async move {
                let _permit = permit;
                let mut s = TcpStream::connect(addr).await.ok()?;
                s.write_all(b"GET / HTTP/1.1\r\nHost: h.test\r\n\r\n")
                    .await
                    .ok()?;
                let status = tokio::time::timeout(DEADLINE, read_one_response(&mut s))
                    .await
                    .ok()?
                    .ok()?;
                (status == 200).then_some(s)
            });
        }
        let mut open = Vec::with_capacity(n);
        while let Some(r) = set.join_next().await {
            if let Ok(Some(s)) = r {
                open.push(s);
            }
        }
        println!("SWARM READY {}", open.len());
        std::io::stdout().flush().unwrap();
        let mut line = String::new();
        let _ = std::io::stdin().read_line(&mut line);
        drop(open);
    });
}
