//! The `proxy` binary beyond one machine, as a user runs it: upstream servers found
//! through DNS (a small DNS server on 127.0.0.1 run by the test, named in `[resolver]`),
//! and a `limit_req` zone shared by two processes through a real redis-server.
//!
//! * A group with `resolve = true` follows the DNS answers: a new address receives the
//!   traffic, the old one drains (its in-flight request completes); a reload that leaves
//!   the group unchanged keeps it (and its resolution), one that removes a group stops
//!   that group's resolution, one that changes it rebuilds it.
//! * A host name without `resolve` is resolved once; an unresolvable one is refused by
//!   `proxy check` with file, line, column and key.
//! * Two processes sharing a Redis zone admit about `rate·t + burst` in total; a reload
//!   that points the zone at another Redis takes effect.
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "../../proxy-core/tests/dns_server/mod.rs"]
mod dns_server;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use dns_server::{a, Dns, RecordType};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Notify;

const DEADLINE: Duration = Duration::from_secs(15);

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_proxy"))
}

fn free_port() -> SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

/// Wait until `cond` holds, checking every 10 ms, failing after the deadline.
async fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    let start = Instant::now();
    while !cond() {
        assert!(start.elapsed() < DEADLINE, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// A raw HTTP/1.1 upstream at `ip:port` answering its own IP (so an answer tells which
/// server gave it); `/slow` is held until `release` is notified.
struct Upstream {
    addr: SocketAddr,
    slow: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Upstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn upstream(ip: [u8; 4], port: u16, release: Arc<Notify>) -> Upstream {
    let listener = TcpListener::bind(SocketAddr::from((ip, port)))
        .await
        .unwrap();
    let addr = listener.local_addr().unwrap();
    let slow = Arc::new(AtomicUsize::new(0));
    let counter = slow.clone();
    let name = addr.ip().to_string();
    let task = tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            let (counter, release, name) = (counter.clone(), release.clone(), name.clone());
            tokio::spawn(async move {
                let head = read_head(&mut s).await;
                if head.starts_with("GET /slow ") {
                    counter.fetch_add(1, Ordering::SeqCst);
                    release.notified().await;
                }
                let resp = format!(
                    "HTTP/1.1 200 OK\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{name}",
                    name.len()
                );
                let _ = s.write_all(resp.as_bytes()).await;
            });
        }
    });
    Upstream { addr, slow, task }
}

async fn read_head(s: &mut TcpStream) -> String {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 1024];
    while !buf.windows(4).any(|w| w == b"\r\n\r\n") && buf.len() < 16 * 1024 {
        match s.read(&mut chunk).await {
            Ok(0) | Err(_) => break,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
    String::from_utf8_lossy(&buf).into_owned()
}

/// One GET on a fresh connection: (status, body).
async fn get(addr: SocketAddr, path: &str) -> (u16, String) {
    let go = async {
        let mut s = TcpStream::connect(addr).await.unwrap();
        let req = format!("GET {path} HTTP/1.1\r\nhost: app.test\r\nconnection: close\r\n\r\n");
        s.write_all(req.as_bytes()).await.unwrap();
        let mut out = Vec::new();
        s.read_to_end(&mut out).await.unwrap();
        let text = String::from_utf8_lossy(&out).into_owned();
        let status = text
            .get(9..12)
            .and_then(|c| c.parse().ok())
            .unwrap_or_else(|| panic!("not an HTTP response: {text:?}"));
        let body = text
            .split_once("\r\n\r\n")
            .map_or("", |(_, b)| b)
            .to_owned();
        (status, body)
    };
    tokio::time::timeout(DEADLINE, go)
        .await
        .expect("request timed out")
}

/// A `proxy run` process from a config file, its log in a file; killed when dropped.
struct Proc {
    child: Child,
    conf: PathBuf,
    log: PathBuf,
}

impl Proc {
    async fn start(dir: &Path, name: &str, config: &str, listen: SocketAddr) -> Proc {
        let conf = dir.join(format!("{name}.toml"));
        let log = dir.join(format!("{name}.log"));
        std::fs::write(&conf, config).unwrap();
        let child = bin()
            .args(["--log-level", "info", "run", "-c"])
            .arg(&conf)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        let mut p = Proc { child, conf, log };
        let start = Instant::now();
        while TcpStream::connect(listen).await.is_err() {
            if let Some(status) = p.child.try_wait().unwrap() {
                panic!("proxy exited with {status}:\n{}", p.log_text());
            }
            assert!(start.elapsed() < DEADLINE, "proxy did not start listening");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        p
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// How many log lines contain `what`.
    fn logged(&self, what: &str) -> usize {
        self.log_text().lines().filter(|l| l.contains(what)).count()
    }

    /// Replace the config, send SIGHUP, and wait until the reload is logged as done.
    async fn reload(&mut self, config: &str) {
        let before = self.logged("config reloaded");
        std::fs::write(&self.conf, config).unwrap();
        let ok = Command::new("kill")
            .args(["-HUP", &self.child.id().to_string()])
            .status()
            .unwrap()
            .success();
        assert!(ok, "kill -HUP failed");
        let start = Instant::now();
        while self.logged("config reloaded") == before {
            assert!(
                self.logged("reload refused") == 0,
                "reload refused:\n{}",
                self.log_text()
            );
            assert!(
                start.elapsed() < DEADLINE,
                "reload not done:\n{}",
                self.log_text()
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

const FOLLOWING: &str = "following DNS";

/// `app` follows app.test; `other` (when `with_other`) follows other.test; /fixed goes to
/// fixed.test, resolved once.
fn dns_config(
    dns: SocketAddr,
    listen: SocketAddr,
    port: u16,
    max_fails: u32,
    with_other: bool,
) -> String {
    let mut c = format!(
        r#"
[resolver]
nameservers = ["{dns}"]
valid = "100ms"
timeout = "500ms"
retry = "100ms"

[upstream.app]
servers = [{{ addr = "app.test:{port}", resolve = true, max_fails = {max_fails} }}]
"#
    );
    if with_other {
        c += &format!(
            "\n[upstream.other]\nservers = [{{ addr = \"other.test:{port}\", resolve = true }}]\n"
        );
    }
    c += &format!(
        r#"
[[server]]
listen = ["{listen}"]

[[server.location]]
path = "/"
proxy_pass = "app"

[[server.location]]
path = "/fixed"
proxy_pass = "http://fixed.test:{port}"
"#
    );
    if with_other {
        c += "\n[[server.location]]\npath = \"/other\"\nproxy_pass = \"other\"\n";
    }
    c
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstreams_follow_dns_and_reloads_keep_stop_or_rebuild_them() {
    let dns = Dns::start().await;
    let release = Arc::new(Notify::new());
    let one = upstream([127, 0, 0, 1], 0, release.clone()).await;
    let port = one.addr.port();
    let two = upstream([127, 0, 0, 2], port, release.clone()).await;
    dns.set("app.test.", RecordType::A, vec![a([127, 0, 0, 1])]);
    dns.set("other.test.", RecordType::A, vec![a([127, 0, 0, 1])]);
    dns.set("fixed.test.", RecordType::A, vec![a([127, 0, 0, 2])]);

    let dir = tempfile::tempdir().unwrap();
    let listen = free_port();
    let mut proxy = Proc::start(
        dir.path(),
        "dns",
        &dns_config(dns.addr, listen, port, 0, true),
        listen,
    )
    .await;
    assert_eq!(get(listen, "/").await, (200, "127.0.0.1".into()));
    assert_eq!(get(listen, "/fixed").await, (200, "127.0.0.2".into()));
    assert_eq!(get(listen, "/other").await, (200, "127.0.0.1".into()));
    assert_eq!(proxy.logged(FOLLOWING), 2, "{}", proxy.log_text());

    // A request held by the first server while DNS moves the name to the second.
    let held = tokio::spawn(get(listen, "/slow"));
    wait_until("the held request to reach 127.0.0.1", || {
        one.slow.load(Ordering::SeqCst) == 1
    })
    .await;
    dns.set("app.test.", RecordType::A, vec![a([127, 0, 0, 2])]);
    let start = Instant::now();
    while get(listen, "/").await.1 != "127.0.0.2" {
        assert!(
            start.elapsed() < DEADLINE,
            "traffic did not move to 127.0.0.2"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    for _ in 0..10 {
        assert_eq!(get(listen, "/").await, (200, "127.0.0.2".into()));
    }
    // The removed server drained: its in-flight request completes normally.
    release.notify_one();
    let done = tokio::time::timeout(DEADLINE, held).await.unwrap().unwrap();
    assert_eq!(done, (200, "127.0.0.1".into()));
    assert_eq!(two.slow.load(Ordering::SeqCst), 0);

    // Reload without `other`, `app` unchanged: `app` is kept (not built again) and
    // still follows DNS; `other` is no longer resolved.
    proxy
        .reload(&dns_config(dns.addr, listen, port, 0, false))
        .await;
    assert_eq!(proxy.logged(FOLLOWING), 2, "{}", proxy.log_text());
    let (app_q, other_q) = (dns.queries("app.test."), dns.queries("other.test."));
    wait_until("app.test to be resolved again, three rounds", || {
        dns.queries("app.test.") >= app_q + 6
    })
    .await;
    // One round (A and AAAA) may have been under way during the reload.
    assert!(
        dns.queries("other.test.") <= other_q + 2,
        "the removed group is still resolved"
    );
    assert_eq!(
        get(listen, "/other").await.1,
        "127.0.0.2",
        "/other now goes to app"
    );
    dns.set("app.test.", RecordType::A, vec![a([127, 0, 0, 1])]);
    let start = Instant::now();
    while get(listen, "/").await.1 != "127.0.0.1" {
        assert!(
            start.elapsed() < DEADLINE,
            "the kept group stopped following DNS"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }

    // A changed group is built again, resolved at the reload.
    proxy
        .reload(&dns_config(dns.addr, listen, port, 3, false))
        .await;
    assert_eq!(proxy.logged(FOLLOWING), 3, "{}", proxy.log_text());
    assert_eq!(get(listen, "/").await, (200, "127.0.0.1".into()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_refuses_unresolvable_names_with_file_line_and_key() {
    let dns = Dns::start().await;
    dns.set("app.test.", RecordType::A, vec![a([127, 0, 0, 1])]);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("proxy.toml");
    let config = |server: &str| {
        format!(
            "[resolver]\nnameservers = [\"{}\"]\ntimeout = \"1s\"\n\n[upstream.app]\nservers = [{server}]\n\n[[server]]\nlisten = [\"127.0.0.1:8080\"]\n\n[[server.location]]\npath = \"/\"\nproxy_pass = \"app\"\n",
            dns.addr
        )
    };
    let check = |text: String| {
        let path = path.clone();
        tokio::task::spawn_blocking(move || {
            std::fs::write(&path, text).unwrap();
            bin().arg("check").arg("-c").arg(&path).output().unwrap()
        })
    };
    let out = check(config("{ addr = \"app.test:8000\" }")).await.unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = check(config("{ addr = \"missing.test:8000\", max_fails = 2 }"))
        .await
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    let want = format!(
        "{}:6:21: upstream.app.servers[0].addr: cannot resolve \"missing.test\"",
        path.display()
    );
    assert!(err.contains(&want), "{err}");
    // With resolve = true, a name that resolves to nothing at start is refused too.
    let out = check(config("{ addr = \"missing.test:8000\", resolve = true }"))
        .await
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(":6:12: upstream.app.servers: no primary server resolved from missing.test"),
        "{err}"
    );
}

/// A redis-server on a free 127.0.0.1 port, no persistence, killed when dropped.
struct Redis {
    port: u16,
    child: Child,
}

impl Redis {
    async fn start() -> Redis {
        let port = free_port().port();
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
        while TcpStream::connect(("127.0.0.1", port)).await.is_err() {
            assert!(start.elapsed() < DEADLINE, "redis-server did not start");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        Redis { port, child }
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
    }

    /// `KEYS *`, raw (RESP), for looking at what the zones stored.
    async fn keys(&self) -> String {
        let mut s = TcpStream::connect(("127.0.0.1", self.port)).await.unwrap();
        s.write_all(b"*2\r\n$4\r\nKEYS\r\n$1\r\n*\r\n")
            .await
            .unwrap();
        let mut buf = vec![0u8; 64 * 1024];
        let n = tokio::time::timeout(DEADLINE, s.read(&mut buf))
            .await
            .unwrap()
            .unwrap();
        String::from_utf8_lossy(&buf[..n]).into_owned()
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn redis_config(listen: SocketAddr, redis: &str, rate: &str, burst: u32) -> String {
    format!(
        r#"
[limit_req_zone.api]
rate = "{rate}"
backend = {{ redis = "{redis}", fail = "closed", timeout = "500ms" }}

[[server]]
listen = ["{listen}"]
limit_req = [{{ zone = "api", burst = {burst}, nodelay = true }}]
limit_req_status = 429

[[server.location]]
path = "/"
return = 200
"#
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_processes_share_a_redis_zone_and_a_reload_can_move_it() {
    let redis = Redis::start().await;
    let dir = tempfile::tempdir().unwrap();
    let (la, lb) = (free_port(), free_port());
    let mut pa = Proc::start(
        dir.path(),
        "a",
        &redis_config(la, &redis.url(), "10r/s", 5),
        la,
    )
    .await;
    let _pb = Proc::start(
        dir.path(),
        "b",
        &redis_config(lb, &redis.url(), "10r/s", 5),
        lb,
    )
    .await;

    // Requests alternate between the two processes.
    let start = Instant::now();
    let (mut ok, mut limited, mut i) = (0u32, 0u32, 0usize);
    let mut by_instance = [0u32; 2];
    while start.elapsed() < Duration::from_millis(1200) {
        match get([la, lb][i % 2], "/").await.0 {
            200 => {
                ok += 1;
                by_instance[i % 2] += 1;
            }
            429 => limited += 1,
            other => panic!("unexpected status {other}"),
        }
        i += 1;
    }
    let elapsed = start.elapsed();
    // nginx: the burst (5) and the first request at once, then one per 100 ms, for both
    // processes together. The lower bound only says the budget refills (a loaded
    // machine may send fewer requests than the rate).
    let expected = 6.0 + 10.0 * elapsed.as_secs_f64();
    assert!(
        f64::from(ok) <= expected + 1.0 && ok >= 7,
        "admitted {ok} in {elapsed:?}, expected about {expected:.1} (rejected {limited})"
    );
    assert!(limited > ok, "one budget for both: most requests rejected");
    assert!(
        by_instance.iter().all(|n| *n > 0),
        "both processes admitted some: {by_instance:?}"
    );

    // The zone moves to another Redis (and rate) on reload: its first request is
    // counted there.
    let other = Redis::start().await;
    assert!(other.keys().await.starts_with("*0"));
    pa.reload(&redis_config(la, &other.url(), "1r/m", 0)).await;
    assert_eq!(get(la, "/").await.0, 200);
    assert_eq!(get(la, "/").await.0, 429, "1r/m, no burst");
    let keys = other.keys().await;
    assert!(keys.contains("proxy:limit_req:api:"), "{keys:?}");
}
