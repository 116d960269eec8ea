//! Many instances on one machine: two `proxy` processes listen on one port with
//! SO_REUSEPORT (`reuse_port = true`), both serve (each forwards to its own upstream,
//! so an answer tells which process gave it), and one is restarted gracefully (SIGTERM:
//! it stops accepting, finishes what it has, exits; a new process takes its place)
//! under a steady stream of requests, without a failed request.
//!
//! Linux drops the connections still queued on a closing SO_REUSEPORT listener unless
//! `net.ipv4.tcp_migrate_req = 1` (kernel 5.14 and later), which moves them to another
//! listener of the group. The test turns it on when it may (root, in its network
//! namespace); when it cannot, it says so and checks only what still holds then (every
//! request already accepted is answered), rather than pretend.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const DEADLINE: Duration = Duration::from_secs(15);
const MIGRATE: &str = "/proc/sys/net/ipv4/tcp_migrate_req";

/// A raw HTTP/1.1 upstream answering `name` (after 400 ms for `/slow`), one request per
/// connection. Counts the `/slow` requests it has started.
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

async fn upstream(name: &'static str) -> Upstream {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let slow = Arc::new(AtomicUsize::new(0));
    let counter = slow.clone();
    let task = tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            let counter = counter.clone();
            tokio::spawn(async move {
                let head = read_head(&mut s).await;
                if head.starts_with("GET /slow ") {
                    counter.fetch_add(1, Ordering::SeqCst);
                    tokio::time::sleep(Duration::from_millis(400)).await;
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

/// One request on a fresh connection: `Ok(body)` for a 200, `Err(what)` otherwise.
async fn request(addr: SocketAddr, path: &str) -> Result<String, String> {
    let go = async {
        let mut s = TcpStream::connect(addr)
            .await
            .map_err(|e| format!("connect: {e}"))?;
        let req = format!("GET {path} HTTP/1.1\r\nhost: app.test\r\nconnection: close\r\n\r\n");
        s.write_all(req.as_bytes())
            .await
            .map_err(|e| format!("write: {e}"))?;
        let mut out = Vec::new();
        s.read_to_end(&mut out)
            .await
            .map_err(|e| format!("read: {e}"))?;
        let text = String::from_utf8_lossy(&out).into_owned();
        if !text.starts_with("HTTP/1.1 200") {
            return Err(format!("answer: {:?}", text.lines().next().unwrap_or("")));
        }
        Ok(text.rsplit("\r\n\r\n").next().unwrap_or("").to_owned())
    };
    tokio::time::timeout(Duration::from_secs(5), go)
        .await
        .unwrap_or_else(|_| Err("timeout".into()))
}

/// A `proxy` process, killed if still running when dropped.
struct Proc {
    child: Child,
}

impl Proc {
    fn start(dir: &Path, name: &str, listen: SocketAddr, upstream: SocketAddr) -> Proc {
        let config = dir.join(format!("{name}.toml"));
        std::fs::write(
            &config,
            format!(
                r#"
[global]
shutdown_timeout = "5s"

[upstream.app]
servers = [{{ addr = "{upstream}" }}]

[[server]]
listen = ["{listen}"]
reuse_port = true

[[server.location]]
path = "/"
proxy_pass = "app"
"#
            ),
        )
        .unwrap();
        let log = std::fs::File::create(dir.join(format!("{name}.log"))).unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_proxy"))
            .args(["--log-level", "info", "run", "-c"])
            .arg(&config)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        Proc { child }
    }

    /// SIGTERM (the workspace forbids unsafe code, so through kill(1)).
    fn terminate(&self) {
        let ok = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .unwrap()
            .success();
        assert!(ok, "kill -TERM failed");
    }

    async fn wait_exit(&mut self) -> std::process::ExitStatus {
        let start = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(
                start.elapsed() < DEADLINE,
                "proxy did not exit after SIGTERM"
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

/// Whether queued connections of a closing listener move to the others: on, or turned
/// on now (root, this network namespace), or not possible here.
fn migrate_req() -> bool {
    let on = || std::fs::read_to_string(MIGRATE).is_ok_and(|s| s.trim() == "1");
    on() || (std::fs::write(MIGRATE, "1").is_ok() && on())
}

/// Send requests until `answer` shows up (both processes serving), within the deadline.
async fn wait_for_answer(addr: SocketAddr, answer: &str) {
    let start = Instant::now();
    loop {
        if request(addr, "/").await.is_ok_and(|b| b == answer) {
            return;
        }
        assert!(
            start.elapsed() < DEADLINE,
            "no answer {answer:?} from {addr}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_processes_share_a_port_and_restart_without_a_failed_request() {
    // PROXY_TEST_NO_MIGRATE=1 shows what happens without it (it is left as it was).
    let migrate = if std::env::var_os("PROXY_TEST_NO_MIGRATE").is_some() {
        std::fs::write(MIGRATE, "0").is_ok_and(|()| false)
    } else {
        migrate_req()
    };
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (upstream("A").await, upstream("B").await);
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let listen = SocketAddr::from(([127, 0, 0, 1], port));

    let mut first = Proc::start(dir.path(), "first", listen, a.addr);
    wait_for_answer(listen, "A").await;
    let _second = Proc::start(dir.path(), "second", listen, b.addr);
    // Both serve: the kernel spreads new connections over both listeners.
    wait_for_answer(listen, "B").await;
    wait_for_answer(listen, "A").await;

    // A steady, bounded stream of requests from eight clients (enough that some
    // connections sit in the accept queue when the listener closes).
    let stop = Arc::new(AtomicBool::new(false));
    let mut clients = Vec::new();
    for _ in 0..8 {
        let stop = stop.clone();
        clients.push(tokio::spawn(async move {
            let (mut ok, mut failed) = (0usize, Vec::new());
            for _ in 0..2_000 {
                if stop.load(Ordering::SeqCst) {
                    break;
                }
                match request(listen, "/").await {
                    Ok(_) => ok += 1,
                    Err(e) => failed.push(e),
                }
            }
            (ok, failed)
        }));
    }
    // Requests in flight through the first process when it is told to stop.
    let mut slow = Vec::new();
    for _ in 0..8 {
        slow.push(tokio::spawn(request(listen, "/slow")));
    }
    let start = Instant::now();
    while a.slow.load(Ordering::SeqCst) == 0 {
        assert!(
            start.elapsed() < DEADLINE,
            "no /slow request reached the first process"
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
    }

    // Graceful restart of the first process.
    first.terminate();
    let status = first.wait_exit().await;
    assert!(status.success(), "first process exited with {status}");
    let _first_again = Proc::start(dir.path(), "first-again", listen, a.addr);
    wait_for_answer(listen, "A").await;
    // Let the stream run a little on the restarted pair, then stop it.
    tokio::time::sleep(Duration::from_millis(200)).await;
    stop.store(true, Ordering::SeqCst);

    // The requests the first process had accepted all finished (drained).
    let mut drained = 0;
    for s in slow {
        let r = s.await.unwrap();
        assert!(r.is_ok(), "a /slow request failed: {r:?}");
        drained += usize::from(r.as_deref() == Ok("A"));
    }
    assert!(
        drained >= 1,
        "at least one /slow was served by the first process"
    );

    let (mut ok, mut failed) = (0, Vec::new());
    for c in clients {
        let (o, f) = c.await.unwrap();
        ok += o;
        failed.extend(f);
    }
    eprintln!(
        "stream: {ok} answered, {} failed; migrate_req {migrate}",
        failed.len()
    );
    assert!(ok > 50, "the stream ran ({ok} requests)");
    if migrate {
        assert!(
            failed.is_empty(),
            "{} of {} requests failed: {:?}",
            failed.len(),
            ok + failed.len(),
            &failed[..failed.len().min(5)]
        );
    } else {
        // Without tcp_migrate_req the kernel resets what was queued on the closed
        // listener: the restart is only as good as the backlog's luck. Say so.
        eprintln!(
            "NOTE: {MIGRATE} is 0 and cannot be set here: {} of {} requests failed during the restart (expected without it)",
            failed.len(),
            ok + failed.len()
        );
    }
}
