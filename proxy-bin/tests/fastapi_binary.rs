//! The `proxy` binary with `examples/configs/fastapi-deployment.toml` in front of two real
//! uvicorn processes (from the `.venv` that `scripts/test-setup.sh` creates): the README's
//! "same deployment with the binary", run as a user would, checked with curl.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const DEADLINE: Duration = Duration::from_secs(30);

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_owned()
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Kills the process when the test ends, pass or fail.
struct Guard(Child);

impl Drop for Guard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn wait_listening(port: u16) {
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let start = Instant::now();
    while TcpStream::connect(addr).is_err() {
        assert!(start.elapsed() < DEADLINE, "nothing listens on {addr}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn uvicorn(port: u16, name: &str) -> Guard {
    let bin = repo().join(".venv/bin/uvicorn");
    assert!(
        bin.exists(),
        "{} is missing: run `bash scripts/test-setup.sh` first",
        bin.display()
    );
    let child = Command::new(bin)
        .args([
            "app:app",
            "--host",
            "127.0.0.1",
            "--port",
            &port.to_string(),
        ])
        .args([
            "--proxy-headers",
            "--forwarded-allow-ips=127.0.0.1",
            "--log-level",
            "warning",
        ])
        .env("APP_NAME", name)
        .current_dir(repo().join("examples/fastapi"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    Guard(child)
}

fn curl(args: &[&str]) -> String {
    let out = Command::new("curl")
        .args(["-s", "-k", "--max-time", "10", "--interface", "127.0.0.2"])
        .args(args)
        .output()
        .expect("curl is needed for this test");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn binary_fronts_two_uvicorn_processes_as_documented() {
    let (a, b) = (free_port(), free_port());
    let (http, https) = (free_port(), free_port());
    let _apps = (uvicorn(a, "a"), uvicorn(b, "b"));
    let text = std::fs::read_to_string(repo().join("examples/configs/fastapi-deployment.toml"))
        .unwrap()
        .replace("127.0.0.1:8001", &format!("127.0.0.1:{a}"))
        .replace("127.0.0.1:8002", &format!("127.0.0.1:{b}"))
        .replace("127.0.0.1:8080", &format!("127.0.0.1:{http}"))
        .replace("127.0.0.1:8443", &format!("127.0.0.1:{https}"))
        .replace("https_port = 8443", &format!("https_port = {https}"));
    // Same directory as the original, so relative paths resolve the same way.
    let conf = repo().join(format!("examples/configs/.test-{https}.toml"));
    std::fs::write(&conf, text).unwrap();
    struct Remove(PathBuf);
    impl Drop for Remove {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }
    let _conf = Remove(conf.clone());
    wait_listening(a);
    wait_listening(b);
    let proxy = Command::new(env!("CARGO_BIN_EXE_proxy"))
        .arg("run")
        .arg("-c")
        .arg(&conf)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let _proxy = Guard(proxy);
    wait_listening(https);

    let base = format!("https://localhost:{https}");
    let resolve = format!("localhost:{https}:127.0.0.1");
    let whoami = curl(&["--resolve", &resolve, &format!("{base}/whoami")]);
    assert!(whoami.contains("\"client\":\"127.0.0.2\""), "{whoami}");
    assert!(whoami.contains("\"scheme\":\"https\""), "{whoami}");
    assert!(
        whoami.contains(&format!("\"url_for\":\"https://localhost:{https}/whoami\"")),
        "{whoami}"
    );

    // Both processes answer (least_conn spreads sequential requests when counts tie).
    let mut apps = std::collections::HashSet::new();
    for _ in 0..10 {
        let r = curl(&["--resolve", &resolve, &format!("{base}/whoami")]);
        if r.contains("\"app\":\"a\"") {
            apps.insert('a');
        }
        if r.contains("\"app\":\"b\"") {
            apps.insert('b');
        }
    }
    assert_eq!(
        apps.len(),
        2,
        "least_conn should use both uvicorn processes"
    );

    // Plain HTTP is redirected to the HTTPS port.
    let head = curl(&["-I", &format!("http://127.0.0.1:{http}/whoami?x=1")]);
    assert!(head.starts_with("HTTP/1.1 301"), "{head}");
    assert!(
        head.contains(&format!("https://127.0.0.1:{https}/whoami?x=1")),
        "{head}"
    );

    // Static files never reach the app.
    let css = curl(&[
        "-i",
        "--resolve",
        &resolve,
        &format!("{base}/static/app.css"),
    ]);
    assert!(
        css.starts_with("HTTP/1.1 200") || css.starts_with("HTTP/2 200"),
        "{css}"
    );
    assert!(css.contains("max-age=2592000"), "{css}");

    // /auth/token: 11 at once (1 + burst 10), then 429.
    let mut codes = Vec::new();
    for _ in 0..12 {
        codes.push(curl(&[
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            "-X",
            "POST",
            "--resolve",
            &resolve,
            &format!("{base}/auth/token"),
        ]));
    }
    assert!(codes[..11].iter().all(|c| c == "200"), "{codes:?}");
    assert_eq!(codes[11], "429", "{codes:?}");
}
