//! The FastAPI deployment end to end: two real uvicorn processes (from `.venv`, made by
//! `scripts/test-setup.sh`) running `examples/fastapi/app.py`, the deployment of
//! `examples::fastapi` in-process (the code the `fastapi_proxy` example runs), and real
//! clients on 127.0.0.1/127.0.0.2 sockets.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_tungstenite::tungstenite::Message;

use support::{eventually, Fixture, DEADLINE};

/// uvicorn's default `--timeout-keep-alive`.
const UVICORN_KEEP_ALIVE: u32 = 5;

/// `proxy_read_timeout` of the main test, short so that a WebSocket outliving it
/// shows `/ws/` has its own idle timeout.
const READ_TIMEOUT: Duration = Duration::from_secs(2);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_app_behind_the_proxy_sees_the_client_https_and_its_routes() {
    let f = Fixture::start(UVICORN_KEEP_ALIVE, |d| d.read_timeout = READ_TIMEOUT).await;
    let mut client = f.https_client().await;

    // Forwarded headers: uvicorn trusts the proxy (127.0.0.1) and reports the client's
    // own source address, the scheme and URLs it builds are https.
    let who = client.get("/whoami").await;
    assert_eq!(who.status, 200, "{who:?}");
    let v = who.json();
    assert_eq!(v["client"], "127.0.0.2", "request.client.host: {v}");
    assert_eq!(v["scheme"], "https", "request.url.scheme: {v}");
    assert_eq!(v["host"], f.host().as_str());
    assert_eq!(
        v["url_for"],
        format!("https://{}/whoami", f.host()).as_str(),
        "url_for: {v}"
    );
    // HSTS on HTTPS answers.
    assert_eq!(
        who.headers["strict-transport-security"],
        "max-age=31536000; includeSubDomains"
    );

    // least_conn spreads sequential requests over both processes.
    let mut apps = HashSet::new();
    for _ in 0..6 {
        let a = client.get("/whoami").await;
        assert_eq!(a.status, 200);
        apps.insert(a.json()["app"].as_str().unwrap().to_owned());
    }
    assert_eq!(apps.len(), 2, "both uvicorn processes serve: {apps:?}");

    // HTTP/2 from the client, HTTP/1.1 to uvicorn, same view of the client.
    let (status, body) = f.h2_get("/whoami").await;
    assert_eq!(status, 200);
    let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(
        (v["client"].as_str(), v["scheme"].as_str()),
        (Some("127.0.0.2"), Some("https"))
    );

    // Plain HTTP: a 301 to the same URI over HTTPS, without reaching the app.
    let before = f.served().await;
    let mut tcp = Fixture::tcp_from_client_ip(f.http).await;
    let host = format!("localhost:{}", f.http.port());
    tcp.write_all(
        format!("GET /whoami?x=1 HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await
    .unwrap();
    let mut raw = String::new();
    tokio::time::timeout(DEADLINE, tcp.read_to_string(&mut raw))
        .await
        .unwrap()
        .unwrap();
    assert!(raw.starts_with("HTTP/1.1 301"), "{raw}");
    let location = format!(
        "location: https://localhost:{}/whoami?x=1\r\n",
        f.https.port()
    );
    assert!(raw.to_ascii_lowercase().contains(&location), "{raw}");

    // Static files come from disk with a 30-day expiry; the app never sees them.
    let file = client.get("/static/hello.txt").await;
    assert_eq!(file.status, 200);
    assert_eq!(
        &file.body[..],
        std::fs::read(support::repo_root().join("examples/fastapi/static/hello.txt")).unwrap()
    );
    assert_eq!(file.headers["cache-control"], "max-age=2592000");
    assert!(file.headers.contains_key("expires"));
    assert_eq!(client.get("/static/missing.txt").await.status, 404);
    // Scanner paths: the connection is closed without an answer (nginx's 444).
    let mut scanner = f.https_client().await;
    assert!(scanner.request("GET", "/wp-login.php").await.is_err());
    assert_eq!(
        f.served().await,
        before,
        "the app counted a redirect, file or 444"
    );

    // WebSocket echo through /ws/ over TLS.
    let tls = f.tls_stream(&f.tls).await;
    let url = format!("wss://{}/ws/echo", f.host());
    let (mut ws, resp) = tokio_tungstenite::client_async(url, tls).await.unwrap();
    assert_eq!(resp.status(), 101);
    for text in ["hello", "fastapi", &"x".repeat(100_000)] {
        ws.send(Message::text(text)).await.unwrap();
        let echoed = tokio::time::timeout(DEADLINE, ws.next())
            .await
            .expect("echo within the deadline")
            .unwrap()
            .unwrap();
        assert_eq!(echoed, Message::text(text));
    }
    // /ws/ tunnels have their own idle timeout (an hour), not proxy_read_timeout: a
    // socket silent for longer than the read timeout still echoes.
    // Pacing the scenario, not waiting for a condition.
    tokio::time::sleep(READ_TIMEOUT + Duration::from_millis(500)).await;
    ws.send(Message::text("still there")).await.unwrap();
    let echoed = tokio::time::timeout(DEADLINE, ws.next()).await.unwrap();
    assert_eq!(
        echoed.unwrap().unwrap(),
        Message::text("still there"),
        "the tunnel outlives proxy_read_timeout"
    );
    ws.close(None).await.unwrap();

    // The same WebSocket as an HTTP/2 stream (RFC 8441): uvicorn sees an HTTP/1.1 upgrade.
    let (status, ws) = f.h2_websocket("/ws/echo").await;
    assert_eq!(status, 200);
    let mut ws = ws.unwrap();
    for text in ["over h2", &"y".repeat(100_000)] {
        ws.send(Message::text(text)).await.unwrap();
        let echoed = tokio::time::timeout(DEADLINE, ws.next())
            .await
            .expect("echo within the deadline")
            .unwrap()
            .unwrap();
        assert_eq!(echoed, Message::text(text));
    }
    // Finish the closing handshake: uvicorn answers the close and ends the tunnel, which
    // ends the HTTP/2 stream (an open one would hold up the graceful stop below).
    ws.close(None).await.unwrap();
    while let Some(Ok(_)) = tokio::time::timeout(DEADLINE, ws.next()).await.unwrap() {}
    drop(ws);

    // /auth/token: 5r/m with burst=10 nodelay: 11 pass at once, then 429 without
    // reaching the app.
    let before = f.served().await;
    for i in 0..11 {
        let a = client.request("POST", "/auth/token").await.unwrap();
        assert_eq!(a.status, 200, "POST /auth/token #{i}: {a:?}");
    }
    for _ in 0..3 {
        let a = client.request("POST", "/auth/token").await.unwrap();
        assert_eq!(a.status, 429, "{a:?}");
        assert!(a.headers.contains_key("retry-after"));
    }
    assert_eq!(f.served().await, before + 11, "429s never reach the app");
    // Other paths are not limited.
    assert_eq!(client.get("/whoami").await.status, 200);

    f.stop().await;
}

/// One answer of the stream: (status, the app that served it or the body), or the
/// error text of a request that failed at the HTTP level.
type Outcome = Result<(u16, String), String>;

/// GETs from `clients` keep-alive connections until `stop` is set (or a bound is hit).
/// `progress` counts the answers. Each task returns its outcomes in order, stopping at
/// the first failed request.
async fn request_stream(
    f: &Fixture,
    clients: usize,
    stop: Arc<AtomicBool>,
    progress: Arc<tokio::sync::watch::Sender<usize>>,
) -> tokio::task::JoinSet<Vec<Outcome>> {
    const BOUND: usize = 5_000;
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..clients {
        let mut client = f.https_client().await;
        let (stop, progress) = (stop.clone(), progress.clone());
        tasks.spawn(async move {
            let mut seen = Vec::new();
            while !stop.load(Ordering::SeqCst) && seen.len() < BOUND {
                let r = match client.request("GET", "/whoami").await {
                    Ok(a) if a.status == 200 => {
                        Ok((200, a.json()["app"].as_str().unwrap_or("").to_owned()))
                    }
                    Ok(a) => Ok((a.status.as_u16(), String::from_utf8_lossy(&a.body).into())),
                    Err(e) => Err(e.to_string()),
                };
                let failed = r.is_err();
                seen.push(r);
                progress.send_modify(|n| *n += 1);
                if failed {
                    break;
                }
            }
            seen
        });
    }
    tasks
}

/// A stream of GETs, and app `a` stopped in its middle with SIGTERM, as a deploy or a
/// process manager stops uvicorn: it refuses new connections, finishes what is in
/// flight and closes its keep-alive connections, each of which the proxy must absorb.
/// (A SIGKILL can cut a response whose header was already relayed; no proxy can hide
/// that from the client, so it is not part of this promise.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stopping_one_uvicorn_during_a_stream_of_gets_is_invisible_to_clients() {
    let mut f = Fixture::start(UVICORN_KEEP_ALIVE, |_| {}).await;
    let (progress, mut answered) = tokio::sync::watch::channel(0usize);
    let stop = Arc::new(AtomicBool::new(false));
    let mut tasks = request_stream(&f, 4, stop.clone(), Arc::new(progress)).await;

    // 100 answers, then SIGTERM to a; once a has exited, 100 more, then stop.
    let wait_for = |n: usize, rx: &mut tokio::sync::watch::Receiver<usize>| {
        let mut rx = rx.clone();
        async move {
            tokio::time::timeout(DEADLINE, rx.wait_for(|m| *m >= n))
                .await
                .unwrap_or_else(|_| panic!("{n} answers within {DEADLINE:?}"))
                .map(|m| *m)
                .unwrap()
        }
    };
    wait_for(100, &mut answered).await;
    f.apps[0].terminate();
    f.apps[0].wait_exit().await;
    let at_exit = *answered.borrow();
    wait_for(at_exit + 100, &mut answered).await;
    stop.store(true, Ordering::SeqCst);

    let mut per_client = Vec::new();
    while let Some(r) = tokio::time::timeout(DEADLINE, tasks.join_next())
        .await
        .expect("the stream ends")
    {
        per_client.push(r.unwrap());
    }
    let all: Vec<&Outcome> = per_client.iter().flatten().collect();
    assert!(all.len() >= at_exit + 100);
    let bad: Vec<_> = all.iter().filter(|r| !matches!(r, Ok((200, _)))).collect();
    assert!(bad.is_empty(), "client-visible failures: {bad:?}");
    let apps: HashSet<&str> = all
        .iter()
        .filter_map(|r| r.as_ref().ok())
        .map(|r| r.1.as_str())
        .collect();
    assert!(apps.contains("a"), "a served before it stopped");
    // After a exited, b carries the stream: each client's last answers come from b.
    for answers in &per_client {
        let tail: HashSet<&str> = answers[answers.len().saturating_sub(5)..]
            .iter()
            .filter_map(|r| r.as_ref().ok())
            .map(|r| r.1.as_str())
            .collect();
        assert_eq!(tail, HashSet::from(["b"]), "the last answers come from b");
    }
    f.stop().await;
}

/// uvicorn closes idle keep-alive connections after `--timeout-keep-alive` (5 s by
/// default). Scaled down: uvicorn at 1 s, the pool at 0.8 s (the deployment's 4 s for
/// 5 s), requests paced around the 1 s boundary, where a pool without the shorter idle
/// timeout sends a request on a connection uvicorn is closing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_app_closing_idle_connections_never_causes_a_502() {
    let f = Fixture::start(1, |d| {
        d.upstream_keepalive_timeout = Duration::from_millis(800);
    })
    .await;

    // The premise: the app does close an idle connection after about a second.
    let mut raw = tokio::net::TcpStream::connect(f.apps[0].addr)
        .await
        .unwrap();
    raw.write_all(b"GET /count HTTP/1.1\r\nHost: a\r\n\r\n")
        .await
        .unwrap();
    let mut buf = vec![0u8; 4096];
    let n = raw.read(&mut buf).await.unwrap();
    assert!(buf[..n].starts_with(b"HTTP/1.1 200"));
    let closed = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            match raw.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    });
    closed
        .await
        .expect("uvicorn closes an idle connection after 1 s");

    // Three clients, each pacing its requests across the boundary (0.70 s .. 1.10 s),
    // alternating GETs (which the proxy could retry) and POSTs with a body (which it
    // must not: a POST sent on a connection the app is closing would be a 502).
    let mut tasks = tokio::task::JoinSet::new();
    for c in 0..3u64 {
        let mut client = f.https_client().await;
        tasks.spawn(async move {
            let mut statuses = Vec::new();
            for i in 0..8u64 {
                let gap = 700 + ((i * 3 + c) % 9) * 50;
                // Pacing the scenario, not waiting for a condition.
                tokio::time::sleep(Duration::from_millis(gap)).await;
                let a = if i % 2 == 0 {
                    client.request("GET", "/whoami").await
                } else {
                    client
                        .request_with("POST", "/items", bytes::Bytes::from_static(b"{}"))
                        .await
                };
                statuses.push(a.map(|a| a.status.as_u16()).map_err(|e| e.to_string()));
            }
            statuses
        });
    }
    let mut all = Vec::new();
    while let Some(r) = tokio::time::timeout(DEADLINE, tasks.join_next())
        .await
        .expect("paced clients finish")
    {
        all.extend(r.unwrap());
    }
    assert_eq!(all.len(), 24);
    assert!(
        all.iter().all(|s| matches!(s, Ok(200))),
        "a request failed: {all:?}"
    );
    // Nothing was taken out of rotation either.
    eventually("no upstream counted as failed", || async {
        f.group.stats().all(|s| s.fails == 0)
    })
    .await;
    f.stop().await;
}
