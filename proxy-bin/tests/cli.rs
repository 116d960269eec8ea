//! The `proxy` binary as a user runs it: `check` on good and bad files, `run` with a
//! config file and with the one-line form, SIGTERM draining an in-flight request.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

const DEADLINE: Duration = Duration::from_secs(15);

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_proxy"))
}

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_owned()
}

#[test]
fn check_accepts_every_example_config() {
    let dir = repo().join("examples/configs");
    let mut n = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().and_then(|e| e.to_str()) != Some("toml") {
            continue;
        }
        let out = bin().arg("check").arg("-c").arg(&path).output().unwrap();
        assert!(
            out.status.success(),
            "{} rejected:\n{}",
            path.display(),
            String::from_utf8_lossy(&out.stderr)
        );
        n += 1;
    }
    assert!(n >= 3, "expected one example config per seed, found {n}");
}

#[test]
fn check_reports_file_line_and_key() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.toml");
    std::fs::write(
        &path,
        "[[server]]\nlisten = [\"127.0.0.1:8080\"]\n\n[[server.location]]\npath = \"/\"\nproxy_pass = \"missing\"\nproxy_read_timeout = \"60\"\n",
    )
    .unwrap();
    let out = bin().arg("check").arg("-c").arg(&path).output().unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    let want = format!("{}:7:", path.display());
    assert!(err.contains(&want), "{err}");
    assert!(err.contains("proxy_read_timeout"), "{err}");
}

/// A blocking upstream on an ephemeral port: answers `ok`, or waits for a go signal
/// when the path is /slow.
fn upstream() -> (SocketAddr, mpsc::Sender<()>, mpsc::Receiver<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let (go_tx, go_rx) = mpsc::channel::<()>();
    let (started_tx, started_rx) = mpsc::channel::<()>();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut s) = stream else { return };
            let mut head = Vec::new();
            let mut buf = [0u8; 1024];
            while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                match s.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => head.extend_from_slice(&buf[..n]),
                }
            }
            if head.starts_with(b"GET /slow") {
                let _ = started_tx.send(());
                let _ = go_rx.recv_timeout(DEADLINE);
            }
            let _ =
                s.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok");
        }
    });
    (addr, go_tx, started_rx)
}

fn free_port() -> SocketAddr {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn start(cmd: &mut Command, listen: SocketAddr) -> Running {
    let child = cmd
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let running = Running(child);
    let start = Instant::now();
    while TcpStream::connect(listen).is_err() {
        assert!(start.elapsed() < DEADLINE, "proxy did not start listening");
        std::thread::sleep(Duration::from_millis(20));
    }
    running
}

/// A proxy process started from a config file in a temp dir, with a pid file for reloads.
struct Managed {
    _running: Running,
    _dir: tempfile::TempDir,
    conf: PathBuf,
    pid: PathBuf,
}

impl Managed {
    /// Write `config` into `dir` (relative paths in it resolve there), run it and wait
    /// until `listen` accepts. The directory lives as long as the process.
    fn start(dir: tempfile::TempDir, config: &str, listen: SocketAddr) -> Managed {
        let conf = dir.path().join("proxy.toml");
        let pid = dir.path().join("proxy.pid");
        std::fs::write(&conf, config).unwrap();
        let running = start(
            bin()
                .arg("run")
                .arg("-c")
                .arg(&conf)
                .arg("--pid-file")
                .arg(&pid),
            listen,
        );
        Managed {
            _running: running,
            _dir: dir,
            conf,
            pid,
        }
    }

    /// Replace the config file and ask the running proxy to reload it.
    fn reload(&self, config: &str) {
        std::fs::write(&self.conf, config).unwrap();
        self.signal_reload();
    }

    fn signal_reload(&self) {
        let st = bin()
            .arg("reload")
            .arg("--pid-file")
            .arg(&self.pid)
            .status()
            .unwrap();
        assert!(st.success());
    }
}

fn get(addr: SocketAddr, path: &str) -> String {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(DEADLINE)).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: example.test\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    out
}

#[test]
fn run_with_a_config_file_forwards() {
    let (up, _go, _started) = upstream();
    let listen = free_port();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("proxy.toml");
    std::fs::write(
        &path,
        format!("[upstream.app]\nservers = [{{ addr = \"{up}\" }}]\n\n[[server]]\nlisten = [\"{listen}\"]\n\n[[server.location]]\npath = \"/\"\nproxy_pass = \"app\"\n\n[[server.location]]\npath = \"~* \\\\.env$\"\nreturn = 403\n"),
    )
    .unwrap();
    let _p = start(bin().arg("run").arg("-c").arg(&path), listen);
    let resp = get(listen, "/hello");
    assert!(resp.starts_with("HTTP/1.1 200"), "{resp}");
    assert!(resp.ends_with("ok"), "{resp}");
    assert!(get(listen, "/app/.env").starts_with("HTTP/1.1 403"));
}

#[test]
fn sigterm_drains_an_in_flight_request_and_exits_zero() {
    let (up, go, started) = upstream();
    let listen = free_port();
    let mut p = start(
        bin().args([
            "run",
            "--listen",
            &listen.to_string(),
            "--upstream",
            &up.to_string(),
        ]),
        listen,
    );
    let client = std::thread::spawn(move || get(listen, "/slow"));
    started.recv_timeout(DEADLINE).unwrap();
    let status = Command::new("kill")
        .args(["-TERM", &p.0.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    // The listener closes; the in-flight request is still answered.
    let start = Instant::now();
    while TcpStream::connect(listen).is_ok() {
        assert!(
            start.elapsed() < DEADLINE,
            "listener still open after SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    go.send(()).unwrap();
    let resp = client.join().unwrap();
    assert!(resp.starts_with("HTTP/1.1 200"), "{resp}");
    let start = Instant::now();
    let code = loop {
        if let Some(code) = p.0.try_wait().unwrap() {
            break code;
        }
        assert!(start.elapsed() < DEADLINE, "proxy did not exit");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(code.success(), "{code:?}");
}

/// An upstream answering every request with `name`, keep-alive, until the test ends.
fn named_upstream(name: &'static str) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut s) = stream else { return };
            std::thread::spawn(move || {
                let mut buf = [0u8; 4096];
                let mut pending = Vec::new();
                loop {
                    while let Some(end) = pending.windows(4).position(|w| w == b"\r\n\r\n") {
                        pending.drain(..end + 4);
                        let resp = format!(
                            "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n{name}",
                            name.len()
                        );
                        if s.write_all(resp.as_bytes()).is_err() {
                            return;
                        }
                    }
                    match s.read(&mut buf) {
                        Ok(0) | Err(_) => return,
                        Ok(n) => pending.extend_from_slice(&buf[..n]),
                    }
                }
            });
        }
    });
    addr
}

fn config_for(listen: SocketAddr, up: SocketAddr) -> String {
    format!("[upstream.app]\nservers = [{{ addr = \"{up}\" }}]\n\n[[server]]\nlisten = [\"{listen}\"]\n\n[[server.location]]\npath = \"/\"\nproxy_pass = \"app\"\n")
}

#[test]
fn reload_switches_upstreams_with_zero_failed_requests() {
    let blue = named_upstream("blue");
    let green = named_upstream("green");
    let listen = free_port();
    let p = Managed::start(
        tempfile::tempdir().unwrap(),
        &config_for(listen, blue),
        listen,
    );
    assert!(get(listen, "/").ends_with("blue"));

    // A steady, bounded stream of requests while the config changes under it.
    let (stop_tx, stop_rx) = mpsc::channel::<()>();
    let load = std::thread::spawn(move || {
        let mut answers = Vec::new();
        for _ in 0..5000 {
            let resp = get(listen, "/");
            assert!(
                resp.starts_with("HTTP/1.1 200"),
                "failed request during reload: {resp}"
            );
            answers.push(resp.ends_with("green"));
            if stop_rx.try_recv().is_ok() {
                break;
            }
        }
        answers
    });

    // A broken config is refused; the old one keeps serving.
    p.reload(
        "[[server]]
listen = 5
",
    );
    // Blue-green: point the group at the new server and reload.
    p.reload(&config_for(listen, green));
    let start = Instant::now();
    while !get(listen, "/").ends_with("green") {
        assert!(start.elapsed() < DEADLINE, "reload never took effect");
        std::thread::sleep(Duration::from_millis(20));
    }
    stop_tx.send(()).unwrap();
    let answers = load.join().unwrap();
    assert!(!answers.is_empty());
    // Once green answered, blue never does again.
    if let Some(first_green) = answers.iter().position(|g| *g) {
        assert!(answers[first_green..].iter().all(|g| *g));
    }
}

/// A self-signed certificate for `name` with `cn` as its subject, written as PEM files.
fn make_cert(dir: &Path, cn: &str) -> (PathBuf, PathBuf) {
    let (cert, key) = (dir.join(format!("{cn}.pem")), dir.join(format!("{cn}.key")));
    let st = Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-days",
            "30",
        ])
        .arg("-keyout")
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .args([
            "-subj",
            &format!("/CN={cn}"),
            "-addext",
            "subjectAltName=DNS:api.example.test",
        ])
        .stderr(Stdio::null())
        .status()
        .expect("openssl is needed for this test");
    assert!(st.success());
    (cert, key)
}

/// The subject of the certificate `addr` serves for `api.example.test`.
fn served_subject(addr: SocketAddr) -> String {
    let mut child = Command::new("openssl")
        .args([
            "s_client",
            "-connect",
            &addr.to_string(),
            "-servername",
            "api.example.test",
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    drop(child.stdin.take());
    let out = child.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    text.lines()
        .find(|l| l.starts_with("subject="))
        .unwrap_or("")
        .to_owned()
}

#[test]
fn reload_swaps_the_tls_certificate_of_a_running_listener() {
    let dir = tempfile::tempdir().unwrap();
    let (cert_a, key_a) = make_cert(dir.path(), "first");
    let (cert_b, key_b) = make_cert(dir.path(), "second");
    let (live_cert, live_key) = (dir.path().join("live.pem"), dir.path().join("live.key"));
    std::fs::copy(&cert_a, &live_cert).unwrap();
    std::fs::copy(&key_a, &live_key).unwrap();
    let up = named_upstream("tls");
    let listen = free_port();
    let config = format!(
        "[[server]]\nlisten = [\"{listen}\"]\nserver_name = [\"api.example.test\"]\ntls = {{ certificate = \"live.pem\", key = \"live.key\" }}\n\n[[server.location]]\npath = \"/\"\nproxy_pass = \"http://{up}\"\n"
    );
    let p = Managed::start(dir, &config, listen);
    assert!(
        served_subject(listen).contains("first"),
        "{}",
        served_subject(listen)
    );
    // certbot renews: the files change, then a reload.
    std::fs::copy(&cert_b, &live_cert).unwrap();
    std::fs::copy(&key_b, &live_key).unwrap();
    p.signal_reload();
    let start = Instant::now();
    loop {
        let subject = served_subject(listen);
        if subject.contains("second") {
            break;
        }
        assert!(start.elapsed() < DEADLINE, "still serving {subject}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A blocking TLS client trusting `cert_pem`, speaking only `versions`.
fn tls_client(
    cert_pem: &str,
    versions: &[&'static rustls::SupportedProtocolVersion],
) -> std::sync::Arc<rustls::ClientConfig> {
    use rustls_pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls_pki_types::CertificateDer::pem_slice_iter(cert_pem.as_bytes()) {
        roots.add(c.unwrap()).unwrap();
    }
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let mut cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(versions)
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    std::sync::Arc::new(cfg)
}

type TlsConn = rustls::StreamOwned<rustls::ClientConnection, TcpStream>;

/// A completed handshake with `addr` as `api.example.test`, or the handshake's error.
fn tls_connect(
    addr: SocketAddr,
    cfg: &std::sync::Arc<rustls::ClientConfig>,
) -> std::io::Result<TlsConn> {
    let name = rustls_pki_types::ServerName::try_from("api.example.test").unwrap();
    let mut conn = rustls::ClientConnection::new(cfg.clone(), name).unwrap();
    let mut tcp = TcpStream::connect(addr)?;
    tcp.set_read_timeout(Some(DEADLINE))?;
    while conn.is_handshaking() {
        conn.complete_io(&mut tcp)?;
    }
    Ok(rustls::StreamOwned::new(conn, tcp))
}

/// One keep-alive GET on `tls`: the status line and the body (Content-Length framed).
fn tls_get(tls: &mut TlsConn) -> (String, String) {
    tls.write_all(b"GET / HTTP/1.1\r\nHost: api.example.test\r\n\r\n")
        .unwrap();
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let head_end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        let n = tls.read(&mut chunk).unwrap();
        assert!(n > 0, "connection closed mid-response");
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
    let len: usize = head
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case("content-length")
                .then(|| v.trim().parse().ok())?
        })
        .unwrap_or_else(|| panic!("no content-length in {head}"));
    while buf.len() < head_end + len {
        let n = tls.read(&mut chunk).unwrap();
        assert!(n > 0, "connection closed mid-body");
        buf.extend_from_slice(&chunk[..n]);
    }
    let status = head.lines().next().unwrap_or("").to_owned();
    let body = String::from_utf8_lossy(&buf[head_end..head_end + len]).into_owned();
    (status, body)
}

#[test]
fn reload_applies_new_tls_protocols_to_new_connections_only() {
    let dir = tempfile::tempdir().unwrap();
    let dev = proxy_tls::selfsigned::generate(&["api.example.test"]).unwrap();
    std::fs::write(dir.path().join("site.pem"), &dev.cert_pem).unwrap();
    std::fs::write(dir.path().join("site.key"), &dev.key_pem).unwrap();
    let up = named_upstream("tls-up");
    let listen = free_port();
    let config = |protocols: &str| {
        format!(
            "[[server]]\nlisten = [\"{listen}\"]\nserver_name = [\"api.example.test\"]\ntls = {{ certificate = \"site.pem\", key = \"site.key\", protocols = {protocols} }}\n\n[[server.location]]\npath = \"/\"\nproxy_pass = \"http://{up}\"\n"
        )
    };
    let p = Managed::start(dir, &config(r#"["TLSv1.2", "TLSv1.3"]"#), listen);
    let tls12 = tls_client(&dev.cert_pem, &[&rustls::version::TLS12]);
    let tls13 = tls_client(&dev.cert_pem, &[&rustls::version::TLS13]);

    // Opened before the reload, over TLS 1.2, and kept open across it.
    let mut before = tls_connect(listen, &tls12).unwrap();
    assert_eq!(
        before.conn.protocol_version(),
        Some(rustls::ProtocolVersion::TLSv1_2)
    );
    let (status, body) = tls_get(&mut before);
    assert!(status.starts_with("HTTP/1.1 200"), "{status}");
    assert_eq!(body, "tls-up");

    p.reload(&config(r#"["TLSv1.3"]"#));
    // The reload is asynchronous: new TLS 1.2 handshakes fail once it has applied.
    let start = Instant::now();
    while tls_connect(listen, &tls12).is_ok() {
        assert!(
            start.elapsed() < DEADLINE,
            "TLS 1.2 still accepted after the reload"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    // And it stays refused, while TLS 1.3 is served.
    assert!(tls_connect(listen, &tls12).is_err());
    let mut after = tls_connect(listen, &tls13).unwrap();
    assert_eq!(
        after.conn.protocol_version(),
        Some(rustls::ProtocolVersion::TLSv1_3)
    );
    let (status, body) = tls_get(&mut after);
    assert!(status.starts_with("HTTP/1.1 200"), "{status}");
    assert_eq!(body, "tls-up");

    // The connection from before the reload still works, still on TLS 1.2.
    let (status, body) = tls_get(&mut before);
    assert!(status.starts_with("HTTP/1.1 200"), "{status}");
    assert_eq!(body, "tls-up");
    assert_eq!(
        before.conn.protocol_version(),
        Some(rustls::ProtocolVersion::TLSv1_2)
    );
}

#[test]
fn metrics_count_retries_rejections_and_reloads() {
    let up = named_upstream("alive");
    let dead = free_port(); // nothing listens there
    let (listen, admin) = (free_port(), free_port());
    let config = format!(
        "[admin]\nlisten = \"{admin}\"\n\n[limit_req_zone.one]\nrate = \"1r/m\"\n\n[upstream.app]\nservers = [{{ addr = \"{dead}\" }}, {{ addr = \"{up}\" }}]\n\n[[server]]\nlisten = [\"{listen}\"]\n\n[[server.location]]\npath = \"/\"\nproxy_pass = \"app\"\n\n[[server.location]]\npath = \"/limited\"\nproxy_pass = \"app\"\nlimit_req = [{{ zone = \"one\" }}]\n"
    );
    let p = Managed::start(tempfile::tempdir().unwrap(), &config, listen);
    // Round-robin reaches the dead server first at least once in two requests: retried.
    for _ in 0..2 {
        assert!(get(listen, "/").starts_with("HTTP/1.1 200"));
    }
    assert!(get(listen, "/limited").starts_with("HTTP/1.1 200"));
    assert!(get(listen, "/limited").starts_with("HTTP/1.1 503"));
    p.signal_reload();
    let start = Instant::now();
    let metrics = loop {
        let m = get(admin, "/metrics");
        if m.contains("proxy_config_reloads_total{result=\"ok\"} 1") {
            break m;
        }
        assert!(start.elapsed() < DEADLINE, "reload never counted:\n{m}");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(
        metrics.contains("proxy_upstream_retries_total{upstream=\"app\"} 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("proxy_rate_limit_rejections_total{zone=\"one\"} 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("proxy_config_last_reload_successful 1"),
        "{metrics}"
    );
    assert!(get(admin, "/readyz").starts_with("HTTP/1.1 200"));
}

/// A raw upstream that answers an upgrade with 101 and then echoes bytes.
fn echo_upgrade_upstream() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut s) = stream else { return };
            std::thread::spawn(move || {
                let mut head = Vec::new();
                let mut buf = [0u8; 1024];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    match s.read(&mut buf) {
                        Ok(0) | Err(_) => return,
                        Ok(n) => head.extend_from_slice(&buf[..n]),
                    }
                }
                let _ = s.write_all(b"HTTP/1.1 101 Switching Protocols\r\nConnection: upgrade\r\nUpgrade: websocket\r\n\r\n");
                loop {
                    match s.read(&mut buf) {
                        Ok(0) | Err(_) => return,
                        Ok(n) => {
                            if s.write_all(&buf[..n]).is_err() {
                                return;
                            }
                        }
                    }
                }
            });
        }
    });
    addr
}

#[test]
fn websocket_opened_before_a_reload_still_echoes_after_it() {
    let ws = echo_upgrade_upstream();
    let other = named_upstream("other");
    let listen = free_port();
    let p = Managed::start(
        tempfile::tempdir().unwrap(),
        &config_for(listen, ws),
        listen,
    );
    let mut c = TcpStream::connect(listen).unwrap();
    c.set_read_timeout(Some(DEADLINE)).unwrap();
    c.write_all(b"GET /ws/ HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n").unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 1024];
    while !got.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = c.read(&mut buf).unwrap();
        assert!(n > 0, "closed before the 101");
        got.extend_from_slice(&buf[..n]);
    }
    assert!(
        got.starts_with(b"HTTP/1.1 101"),
        "{}",
        String::from_utf8_lossy(&got)
    );
    // Reload to a config that sends everything elsewhere.
    p.reload(&config_for(listen, other));
    let start = Instant::now();
    while !get(listen, "/").ends_with("other") {
        assert!(start.elapsed() < DEADLINE, "reload never took effect");
        std::thread::sleep(Duration::from_millis(20));
    }
    // The tunnel opened before the reload still carries bytes both ways.
    c.write_all(b"still here").unwrap();
    let mut echoed = Vec::new();
    while echoed.len() < b"still here".len() {
        let n = c.read(&mut buf).unwrap();
        assert!(n > 0, "tunnel closed by the reload");
        echoed.extend_from_slice(&buf[..n]);
    }
    assert_eq!(echoed, b"still here");
}

#[test]
fn access_log_is_combined_and_reopened_on_sigusr1() {
    let up = named_upstream("logged");
    let listen = free_port();
    let dir = tempfile::tempdir().unwrap();
    let conf = dir.path().join("proxy.toml");
    let log = dir.path().join("access.log");
    std::fs::write(
        &conf,
        format!(
            "[access_log]\npath = \"access.log\"\nformat = \"combined\"\nbuffer = 0\nflush = \"100ms\"\n\n{}",
            config_for(listen, up)
        ),
    )
    .unwrap();
    let p = start(bin().arg("run").arg("-c").arg(&conf), listen);
    let wait_line = |path: &Path, what: &str| {
        let start = Instant::now();
        loop {
            let text = std::fs::read_to_string(path).unwrap_or_default();
            if let Some(line) = text.lines().find(|l| l.contains(what)) {
                return line.to_owned();
            }
            assert!(
                start.elapsed() < DEADLINE,
                "no {what:?} line in {}: {text:?}",
                path.display()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    };
    assert!(get(listen, "/first?x=1").starts_with("HTTP/1.1 200"));
    let line = wait_line(&log, "/first");
    // 127.0.0.1 - - [22/Nov/2026:05:30:00 +0000] "GET /first?x=1 HTTP/1.1" 200 6 "-" "-"
    assert!(line.starts_with("127.0.0.1 - - ["), "{line}");
    assert!(
        line.contains("] \"GET /first?x=1 HTTP/1.1\" 200 6 \"-\" \"-\""),
        "{line}"
    );
    // logrotate: move the file, then SIGUSR1; new lines go to a new file at the old path.
    let rotated = dir.path().join("access.log.1");
    std::fs::rename(&log, &rotated).unwrap();
    let st = Command::new("kill")
        .args(["-USR1", &p.0.id().to_string()])
        .status()
        .unwrap();
    assert!(st.success());
    let start = Instant::now();
    loop {
        assert!(get(listen, "/second").starts_with("HTTP/1.1 200"));
        if std::fs::read_to_string(&log).is_ok_and(|t| t.contains("/second")) {
            break;
        }
        assert!(start.elapsed() < DEADLINE, "the log was not reopened");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(std::fs::read_to_string(&rotated)
        .unwrap()
        .contains("/first"));
}
