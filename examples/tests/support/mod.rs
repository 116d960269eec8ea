//! The end-to-end test's parts: real uvicorn processes from the project's virtual env,
//! the deployment running in-process, and clients (HTTPS from 127.0.0.2, plain HTTP,
//! WebSocket over TLS).
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::future::Future;
use std::net::{SocketAddr, TcpListener as StdListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use examples::fastapi::{Bound, Certificate, Deployment};
use http::{HeaderMap, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, ServerName};
use tokio::net::{TcpSocket, TcpStream};

/// The client's own source address: differs from the proxy's (127.0.0.1), so the app
/// seeing it proves the forwarded headers went through.
pub const CLIENT_IP: [u8; 4] = [127, 0, 0, 2];

/// Upper bound for anything this test waits on.
pub const DEADLINE: Duration = Duration::from_secs(20);

/// The repository root (the `examples` package is one level down).
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("examples/ has a parent")
        .to_path_buf()
}

/// `.venv/bin/uvicorn`, or a failure that says how to create it. Never a skip: the test
/// is part of CI, and `.ci/run` provisions the environment.
pub fn uvicorn_bin() -> PathBuf {
    let bin = repo_root().join(".venv/bin/uvicorn");
    assert!(
        bin.is_file(),
        "{} is missing: the FastAPI end-to-end test needs the Python environment. \
         Run `bash scripts/test-setup.sh` from the repository root (it creates .venv with \
         fastapi, uvicorn and websockets from examples/fastapi/requirements.txt).",
        bin.display()
    );
    bin
}

/// A uvicorn process serving `examples/fastapi/app.py`; killed when dropped.
pub struct Uvicorn {
    child: Option<Child>,
    /// Where it listens.
    pub addr: SocketAddr,
    /// Its `APP_NAME`.
    pub name: String,
    log: PathBuf,
}

impl Uvicorn {
    /// Start one on a free port and wait until it answers, within [`DEADLINE`].
    /// `keep_alive`: uvicorn's `--timeout-keep-alive` in seconds (its default is 5).
    pub async fn start(name: &str, keep_alive: u32, logs: &Path) -> Uvicorn {
        let bin = uvicorn_bin();
        let deadline = tokio::time::Instant::now() + DEADLINE;
        // A port found free can be taken by someone else before uvicorn binds it: then
        // uvicorn exits at once, and we try another.
        for attempt in 0..3 {
            let port = StdListener::bind("127.0.0.1:0")
                .unwrap()
                .local_addr()
                .unwrap()
                .port();
            let log = logs.join(format!("{name}-{attempt}.log"));
            let out = std::fs::File::create(&log).unwrap();
            let child = Command::new(&bin)
                .current_dir(repo_root().join("examples/fastapi"))
                .env("APP_NAME", name)
                .args(["app:app", "--host", "127.0.0.1", "--port"])
                .arg(port.to_string())
                .args(["--proxy-headers", "--forwarded-allow-ips=127.0.0.1"])
                .arg(format!("--timeout-keep-alive={keep_alive}"))
                .args(["--log-level", "warning"])
                .stdin(Stdio::null())
                .stdout(out.try_clone().unwrap())
                .stderr(out)
                .spawn()
                .unwrap_or_else(|e| panic!("cannot start {}: {e}", bin.display()));
            let mut app = Uvicorn {
                child: Some(child),
                addr: SocketAddr::from(([127, 0, 0, 1], port)),
                name: name.to_owned(),
                log,
            };
            match app.wait_ready(deadline).await {
                Ok(()) => return app,
                Err(Exited) => continue,
            }
        }
        panic!("uvicorn {name} exited three times at start; see the logs above");
    }

    /// Poll `GET /count` until it answers 200. Err if the process exited (port taken).
    async fn wait_ready(&mut self, deadline: tokio::time::Instant) -> Result<(), Exited> {
        let mut tick = tokio::time::interval(Duration::from_millis(50));
        loop {
            tick.tick().await;
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                eprintln!(
                    "uvicorn {} exited ({status}):\n{}",
                    self.name,
                    self.log_text()
                );
                return Err(Exited);
            }
            if let Ok(Ok((200, _))) =
                tokio::time::timeout(Duration::from_secs(2), plain_get(self.addr, "/count")).await
            {
                return Ok(());
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "uvicorn {} did not answer on {} within {DEADLINE:?}; its log:\n{}",
                self.name,
                self.addr,
                self.log_text()
            );
        }
    }

    /// How many requests (other than `/count`) this process has served.
    pub async fn count(&self) -> u64 {
        let (status, body) = plain_get(self.addr, "/count").await.unwrap();
        assert_eq!(status, 200, "GET /count on {}", self.name);
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        v["count"].as_u64().unwrap()
    }

    /// Its process id.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().unwrap().id()
    }

    /// Send SIGTERM (uvicorn's graceful stop: refuse new connections, finish the
    /// requests in flight, close keep-alive connections, exit).
    pub fn terminate(&self) {
        let status = Command::new("kill")
            .args(["-TERM", &self.pid().to_string()])
            .status()
            .unwrap();
        assert!(status.success(), "kill -TERM {}", self.pid());
    }

    /// Wait until the process has exited, within [`DEADLINE`].
    pub async fn wait_exit(&mut self) {
        let child = self.child.as_mut().unwrap();
        let deadline = tokio::time::Instant::now() + DEADLINE;
        let mut tick = tokio::time::interval(Duration::from_millis(20));
        loop {
            tick.tick().await;
            if child.try_wait().unwrap().is_some() {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "uvicorn {} still running {DEADLINE:?} after SIGTERM",
                self.name
            );
        }
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

struct Exited;

impl Drop for Uvicorn {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// One `GET` over a fresh plain HTTP/1.1 connection: (status, body).
pub async fn plain_get(addr: SocketAddr, path: &str) -> Result<(u16, Bytes), String> {
    let stream = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
    plain_get_on(stream, &addr.to_string(), path)
        .await
        .map_err(|e| e.to_string())
}

/// One `GET` on `stream` with this `Host`: (status, body).
pub async fn plain_get_on(
    stream: TcpStream,
    host: &str,
    path: &str,
) -> Result<(u16, Bytes), hyper::Error> {
    let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(conn);
    let req = Request::get(path)
        .header("host", host)
        .body(Full::new(Bytes::new()))
        .unwrap();
    let resp = send.send_request(req).await?;
    let status = resp.status().as_u16();
    let body = resp.into_body().collect().await?.to_bytes();
    Ok((status, body))
}

/// The deployment running in-process in front of two uvicorn processes.
pub struct Fixture {
    /// The two apps, `a` and `b`.
    pub apps: Vec<Uvicorn>,
    /// The HTTPS listener.
    pub https: SocketAddr,
    /// The redirecting plain listener.
    pub http: SocketAddr,
    /// Trusts the deployment's self-signed certificate; ALPN `http/1.1`.
    pub tls: Arc<rustls::ClientConfig>,
    /// The same, offering `h2` only.
    pub tls_h2: Arc<rustls::ClientConfig>,
    /// The upstream group, for its stats.
    pub group: Arc<proxy_core::balance::Group>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    serving: Option<tokio::task::JoinHandle<std::io::Result<()>>>,
    _logs: tempfile::TempDir,
}

impl Fixture {
    /// Start two uvicorn processes (`--timeout-keep-alive keep_alive`) and the
    /// deployment with its defaults changed by `configure`.
    pub async fn start(keep_alive: u32, configure: impl FnOnce(&mut Deployment)) -> Fixture {
        let logs = tempfile::tempdir().unwrap();
        let (a, b) = tokio::join!(
            Uvicorn::start("a", keep_alive, logs.path()),
            Uvicorn::start("b", keep_alive, logs.path())
        );
        let mut deployment = Deployment {
            https: "127.0.0.1:0".parse().unwrap(),
            http: "127.0.0.1:0".parse().unwrap(),
            upstreams: vec![a.addr, b.addr],
            certificate: Certificate::SelfSigned,
            ..Deployment::default()
        };
        configure(&mut deployment);
        let bound: Bound = deployment.bind().unwrap();
        let pem = bound.dev_certificate_pem().unwrap().to_owned();
        let (https, http, group) = (bound.https_addr(), bound.http_addr(), bound.group().clone());
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let serving = tokio::spawn(bound.serve(async {
            let _ = stopped.await;
        }));
        Fixture {
            apps: vec![a, b],
            https,
            http,
            tls: Arc::new(client_config(&pem, &[b"http/1.1"])),
            tls_h2: Arc::new(client_config(&pem, &[b"h2"])),
            group,
            stop: Some(stop),
            serving: Some(serving),
            _logs: logs,
        }
    }

    /// The `Host` a browser would send to the HTTPS listener.
    pub fn host(&self) -> String {
        format!("localhost:{}", self.https.port())
    }

    /// A TCP connection to `addr` from [`CLIENT_IP`].
    pub async fn tcp_from_client_ip(addr: SocketAddr) -> TcpStream {
        let socket = TcpSocket::new_v4().unwrap();
        socket
            .bind(SocketAddr::from((CLIENT_IP, 0)))
            .expect("binding 127.0.0.2 (the loopback range must be usable)");
        socket.connect(addr).await.unwrap()
    }

    /// A TLS connection to the HTTPS listener from [`CLIENT_IP`], checked against the
    /// development certificate for `localhost`.
    pub async fn tls_stream(
        &self,
        config: &Arc<rustls::ClientConfig>,
    ) -> tokio_rustls::client::TlsStream<TcpStream> {
        let tcp = Self::tcp_from_client_ip(self.https).await;
        tokio_rustls::TlsConnector::from(config.clone())
            .connect(ServerName::try_from("localhost").unwrap(), tcp)
            .await
            .expect("TLS handshake with the deployment")
    }

    /// An HTTP/1.1 keep-alive connection over TLS from [`CLIENT_IP`].
    pub async fn https_client(&self) -> HttpsClient {
        let tls = self.tls_stream(&self.tls).await;
        let (send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
            .await
            .unwrap();
        tokio::spawn(conn);
        HttpsClient {
            send,
            host: self.host(),
        }
    }

    /// One request over HTTP/2 (TLS, ALPN `h2`): (status, body).
    pub async fn h2_get(&self, path: &str) -> (StatusCode, Bytes) {
        let tls = self.tls_stream(&self.tls_h2).await;
        let (mut send, conn) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tls))
                .await
                .unwrap();
        tokio::spawn(conn);
        let uri = format!("https://{}{path}", self.host());
        let resp = send
            .send_request(Request::get(uri).body(Full::new(Bytes::new())).unwrap())
            .await
            .unwrap();
        let status = resp.status();
        (status, resp.into_body().collect().await.unwrap().to_bytes())
    }

    /// A WebSocket opened as an HTTP/2 stream (RFC 8441 extended CONNECT over TLS, ALPN
    /// `h2`), as a browser holding an HTTP/2 connection does. Returns the status of the
    /// CONNECT and, when it is 200, the WebSocket.
    pub async fn h2_websocket(
        &self,
        path: &str,
    ) -> (
        StatusCode,
        Option<tokio_tungstenite::WebSocketStream<TokioIo<hyper::upgrade::Upgraded>>>,
    ) {
        let tls = self.tls_stream(&self.tls_h2).await;
        let (mut send, conn) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tls))
                .await
                .unwrap();
        tokio::spawn(conn);
        // Waits for the server's SETTINGS: the client only sends an extended CONNECT once
        // the server has enabled it.
        send.ready().await.unwrap();
        let mut req = Request::connect(format!("https://{}{path}", self.host()))
            .version(http::Version::HTTP_2)
            .header("sec-websocket-version", "13")
            .body(Full::new(Bytes::new()))
            .unwrap();
        req.extensions_mut()
            .insert(hyper::ext::Protocol::from_static("websocket"));
        let mut resp = send.send_request(req).await.unwrap();
        let status = resp.status();
        if status != StatusCode::OK {
            return (status, None);
        }
        let io = hyper::upgrade::on(&mut resp).await.unwrap();
        let ws = tokio_tungstenite::WebSocketStream::from_raw_socket(
            TokioIo::new(io),
            tokio_tungstenite::tungstenite::protocol::Role::Client,
            None,
        )
        .await;
        (status, Some(ws))
    }

    /// Sum of both apps' counters.
    pub async fn served(&self) -> u64 {
        let mut n = 0;
        for app in &self.apps {
            n += app.count().await;
        }
        n
    }

    /// Stop the deployment gracefully and wait for it (the apps stop on drop).
    pub async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(serving) = self.serving.take() {
            tokio::time::timeout(DEADLINE, serving)
                .await
                .expect("the deployment stops")
                .unwrap()
                .unwrap();
        }
    }
}

impl Drop for Fixture {
    fn drop(&mut self) {
        if let Some(serving) = self.serving.take() {
            serving.abort();
        }
    }
}

/// A client HTTP/1.1 connection to the deployment over TLS.
pub struct HttpsClient {
    send: SendRequest<Full<Bytes>>,
    host: String,
}

/// A response read whole.
#[derive(Debug)]
pub struct Answer {
    /// Status.
    pub status: StatusCode,
    /// Headers.
    pub headers: HeaderMap,
    /// Body.
    pub body: Bytes,
}

impl Answer {
    /// The body as JSON.
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!(
                "not JSON ({e}): {} {:?}",
                self.status,
                String::from_utf8_lossy(&self.body)
            )
        })
    }
}

impl HttpsClient {
    /// Send one request and read the whole answer.
    pub async fn request(&mut self, method: &str, path: &str) -> Result<Answer, hyper::Error> {
        self.request_with(method, path, Bytes::new()).await
    }

    /// Send one request with a body and read the whole answer.
    pub async fn request_with(
        &mut self,
        method: &str,
        path: &str,
        body: Bytes,
    ) -> Result<Answer, hyper::Error> {
        self.send.ready().await?;
        let req = Request::builder()
            .method(method)
            .uri(path)
            .header("host", &self.host)
            .body(Full::new(body))
            .unwrap();
        let resp = self.send.send_request(req).await?;
        let (parts, body) = resp.into_parts();
        Ok(Answer {
            status: parts.status,
            headers: parts.headers,
            body: body.collect().await?.to_bytes(),
        })
    }

    /// `GET path`, which must succeed at the HTTP level.
    pub async fn get(&mut self, path: &str) -> Answer {
        self.request("GET", path).await.unwrap()
    }
}

/// A rustls client trusting `ca_pem`, offering `alpn`.
pub fn client_config(ca_pem: &str, alpn: &[&[u8]]) -> rustls::ClientConfig {
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        roots.add(c.unwrap()).unwrap();
    }
    let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    config
}

/// Wait for `cond` to hold, polling, within [`DEADLINE`].
pub async fn eventually<F, Fut>(what: &str, mut cond: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + DEADLINE;
    let mut tick = tokio::time::interval(Duration::from_millis(20));
    loop {
        tick.tick().await;
        if cond().await {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for: {what}"
        );
    }
}
