//! The balancer against real upstream servers on 127.0.0.1: failover under a steady
//! stream of requests, nginx's retry rules, 502 when everything is down, backup servers,
//! active health checks, in-flight counts under cancellation.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU16, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Method, StatusCode};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use proxy_core::balance::{
    Balance, Condition, Group, HealthCheck, NextUpstream, Server, ServerState,
};
use proxy_core::response::ErrorCause;
use proxy_core::upstream::{ClientConfig, UpstreamClient};
use proxy_core::ProxyBody;
use tokio::io::AsyncReadExt;
use tokio::net::TcpListener;
use tokio::task::{JoinHandle, JoinSet};
use tokio::time::Instant;
use tower::ServiceExt;

/// A test upstream: answers `name` with `status`, `/health` with `health`, and never
/// answers `/slow`.
struct Upstream {
    addr: SocketAddr,
    hits: Arc<AtomicUsize>,
    health_hits: Arc<AtomicUsize>,
    status: Arc<AtomicU16>,
    health: Arc<AtomicU16>,
    task: JoinHandle<()>,
}

impl Upstream {
    async fn start(name: &'static str) -> Upstream {
        Upstream::bind(name, SocketAddr::from(([127, 0, 0, 1], 0))).await
    }

    async fn bind(name: &'static str, addr: SocketAddr) -> Upstream {
        let listener = TcpListener::bind(addr).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let hits = Arc::new(AtomicUsize::new(0));
        let health_hits = Arc::new(AtomicUsize::new(0));
        let status = Arc::new(AtomicU16::new(200));
        let health = Arc::new(AtomicU16::new(200));
        let (h, hh, st, he) = (
            hits.clone(),
            health_hits.clone(),
            status.clone(),
            health.clone(),
        );
        let task = tokio::spawn(async move {
            // Dropping the set (the task is aborted) kills every open connection too.
            let mut conns = JoinSet::new();
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let (h, hh, st, he) = (h.clone(), hh.clone(), st.clone(), he.clone());
                let svc = service_fn(move |req: http::Request<Incoming>| {
                    let (h, hh, st, he) = (h.clone(), hh.clone(), st.clone(), he.clone());
                    async move {
                        let (status, body) = match req.uri().path() {
                            "/health" => {
                                hh.fetch_add(1, Ordering::SeqCst);
                                (he.load(Ordering::SeqCst), "health")
                            }
                            "/slow" => {
                                h.fetch_add(1, Ordering::SeqCst);
                                std::future::pending::<()>().await;
                                (200, name)
                            }
                            _ => {
                                h.fetch_add(1, Ordering::SeqCst);
                                (st.load(Ordering::SeqCst), name)
                            }
                        };
                        // A request with a body gets it echoed back.
                        let received = req.into_body().collect().await.map(|b| b.to_bytes());
                        let body = match received {
                            Ok(b) if !b.is_empty() => b,
                            _ => Bytes::from_static(body.as_bytes()),
                        };
                        let mut resp = http::Response::new(http_body_util::Full::new(body));
                        *resp.status_mut() = StatusCode::from_u16(status).unwrap();
                        Ok::<_, Infallible>(resp)
                    }
                });
                conns.spawn(async move {
                    let _ = http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        Upstream {
            addr,
            hits,
            health_hits,
            status,
            health,
            task,
        }
    }

    fn hits(&self) -> usize {
        self.hits.load(Ordering::SeqCst)
    }

    /// Stop listening and close every connection.
    async fn kill(self) -> SocketAddr {
        self.task.abort();
        let _ = self.task.await;
        self.addr
    }
}

/// An upstream that reads a request header and closes the connection without a word.
/// Returns its address and how many connections it took.
async fn closer() -> (SocketAddr, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let accepted = Arc::new(AtomicUsize::new(0));
    let count = accepted.clone();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            count.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 1024];
                while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
                    match stream.read(&mut chunk).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => buf.extend_from_slice(&chunk[..n]),
                    }
                }
            });
        }
    });
    (addr, accepted)
}

/// An address nothing listens on.
async fn dead_addr() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    l.local_addr().unwrap()
}

/// A front server on 127.0.0.1 that serves `balance`.
async fn front(balance: Balance) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let balance = balance.clone();
            let svc = service_fn(move |req: http::Request<Incoming>| {
                balance.clone().oneshot(req.map(ProxyBody::from))
            });
            tokio::spawn(async move {
                let _ = http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    addr
}

fn client() -> Client<HttpConnector, ProxyBody> {
    Client::builder(TokioExecutor::new()).build_http()
}

fn upstream_client() -> UpstreamClient {
    let mut config = ClientConfig::default();
    config.connect_timeout = Duration::from_secs(2);
    config.read_timeout = Duration::from_secs(5);
    UpstreamClient::new(config)
}

async fn send(
    client: &Client<HttpConnector, ProxyBody>,
    front: SocketAddr,
    method: Method,
    path: &str,
) -> Result<(StatusCode, String), String> {
    send_body(client, front, method, path, ProxyBody::empty()).await
}

async fn send_body(
    client: &Client<HttpConnector, ProxyBody>,
    front: SocketAddr,
    method: Method,
    path: &str,
    body: ProxyBody,
) -> Result<(StatusCode, String), String> {
    let req = http::Request::builder()
        .method(method)
        .uri(format!("http://{front}{path}"))
        .body(body)
        .unwrap();
    let resp = client.request(req).await.map_err(|e| e.to_string())?;
    let status = resp.status();
    let body = resp
        .into_body()
        .collect()
        .await
        .map_err(|e| e.to_string())?;
    Ok((
        status,
        String::from_utf8_lossy(&body.to_bytes()).into_owned(),
    ))
}

async fn get(client: &Client<HttpConnector, ProxyBody>, front: SocketAddr) -> (StatusCode, String) {
    send(client, front, Method::GET, "/").await.unwrap()
}

/// Wait for `cond` to hold, polling, for at most `secs` seconds.
async fn wait_until(what: &str, secs: u64, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

fn state(group: &Group, i: usize) -> ServerState {
    group.stats().nth(i).unwrap().state
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_upstream_costs_no_client_error_and_is_probed_again() {
    let fail_timeout = Duration::from_millis(600);
    let ups = [
        Upstream::start("a").await,
        Upstream::start("b").await,
        Upstream::start("c").await,
    ];
    let mut builder = Group::builder("three");
    for u in &ups {
        builder = builder.server(Server::new(u.addr).max_fails(2).fail_timeout(fail_timeout));
    }
    let group = builder.build().unwrap();
    let front = front(Balance::new(group.clone(), upstream_client())).await;

    // A steady stream of GETs from two clients.
    let stop = Arc::new(AtomicBool::new(false));
    let mut load = JoinSet::new();
    for _ in 0..2 {
        let stop = stop.clone();
        load.spawn(async move {
            let client = client();
            let (mut ok, mut bad) = (0usize, Vec::new());
            while !stop.load(Ordering::SeqCst) {
                match send(&client, front, Method::GET, "/").await {
                    Ok((StatusCode::OK, _)) => ok += 1,
                    other => bad.push(format!("{other:?}")),
                }
            }
            (ok, bad)
        });
    }
    wait_until("traffic on every upstream", 5, || {
        ups.iter().all(|u| u.hits() >= 3)
    })
    .await;

    let [a, b, c] = ups;
    let b_addr = b.kill().await;
    wait_until("b marked down", 5, || state(&group, 1) == ServerState::Down).await;
    let down_at = Instant::now();
    // b comes back on the same port; it gets one probe only after fail_timeout.
    let b2 = Upstream::bind("b", b_addr).await;
    wait_until("b probed again", 5, || b2.hits() > 0).await;
    assert!(
        down_at.elapsed() >= fail_timeout - Duration::from_millis(200),
        "probed {:?} after being marked down",
        down_at.elapsed()
    );
    wait_until("b up again", 5, || {
        let s = group.stats().nth(1).unwrap();
        s.state == ServerState::Up && s.fails == 0
    })
    .await;
    let before = b2.hits();
    wait_until("b back in rotation", 5, || b2.hits() > before + 3).await;

    stop.store(true, Ordering::SeqCst);
    let mut total = 0;
    while let Some(r) = load.join_next().await {
        let (ok, bad) = r.unwrap();
        assert!(bad.is_empty(), "client errors: {bad:?}");
        total += ok;
    }
    assert!(total > 20, "only {total} requests");
    assert!(a.hits() > 0 && c.hits() > 0);
    wait_until("nothing in flight", 5, || {
        group.stats().all(|s| s.in_flight == 0)
    })
    .await;
}

#[tokio::test]
async fn post_is_not_retried_once_sent() {
    let client = client();
    let (closer_addr, accepted) = closer().await;
    let good = Upstream::start("good").await;
    // The closer comes first in round-robin order, on a fresh group each time.
    let make = |next: NextUpstream| {
        let group = Group::builder("retry")
            .server(Server::new(closer_addr).max_fails(0))
            .server(Server::new(good.addr).max_fails(0))
            .build()
            .unwrap();
        Balance::new(group, upstream_client()).with_next_upstream(next)
    };

    let f = front(make(NextUpstream::default())).await;
    let (status, _) = send(&client, f, Method::POST, "/").await.unwrap();
    assert_eq!(status, StatusCode::BAD_GATEWAY);
    assert_eq!(accepted.load(Ordering::SeqCst), 1);
    assert_eq!(good.hits(), 0, "a sent POST went to a second upstream");

    // The same failure on a GET goes on to the next server.
    let f = front(make(NextUpstream::default())).await;
    assert_eq!(get(&client, f).await, (StatusCode::OK, "good".into()));
    assert_eq!(good.hits(), 1);

    // With non_idempotent, the POST is retried too.
    let f = front(make(NextUpstream::default().on(Condition::NonIdempotent))).await;
    let (status, body) = send(&client, f, Method::POST, "/").await.unwrap();
    assert_eq!((status, body.as_str()), (StatusCode::OK, "good"));

    // A POST that could not be sent (connection refused) is retried.
    let group = Group::builder("refused")
        .server(Server::new(dead_addr().await))
        .server(Server::new(good.addr))
        .build()
        .unwrap();
    let f = front(Balance::new(group, upstream_client())).await;
    let (status, _) = send(&client, f, Method::POST, "/").await.unwrap();
    assert_eq!(status, StatusCode::OK);
}

#[tokio::test]
async fn streamed_body_is_retried_only_if_never_read() {
    let client = client();
    let good = Upstream::start("good").await;
    // Connection refused: the body was never read, the request goes on with it whole.
    let group = Group::builder("refused")
        .server(Server::new(dead_addr().await))
        .server(Server::new(good.addr))
        .build()
        .unwrap();
    let f = front(Balance::new(group, upstream_client())).await;
    let sent = send_body(
        &client,
        f,
        Method::PUT,
        "/",
        ProxyBody::from("streamed body"),
    )
    .await;
    assert_eq!(sent.unwrap(), (StatusCode::OK, "streamed body".into()));
    assert_eq!(good.hits(), 1);

    // The first server took the request and closed: the body started, no second try
    // even for an idempotent PUT.
    let (closer_addr, accepted) = closer().await;
    let group = Group::builder("closed")
        .server(Server::new(closer_addr))
        .server(Server::new(good.addr))
        .build()
        .unwrap();
    let f = front(Balance::new(group, upstream_client())).await;
    let sent = send_body(
        &client,
        f,
        Method::PUT,
        "/",
        ProxyBody::from("streamed body"),
    )
    .await;
    assert_eq!(sent.unwrap().0, StatusCode::BAD_GATEWAY);
    assert_eq!(accepted.load(Ordering::SeqCst), 1);
    assert_eq!(good.hits(), 1);
}

#[tokio::test]
async fn listed_status_goes_to_the_next_server_and_counts() {
    let client = client();
    let bad = Upstream::start("bad").await;
    bad.status.store(502, Ordering::SeqCst);
    let good = Upstream::start("good").await;
    let group = Group::builder("status")
        .server(Server::new(bad.addr).max_fails(2))
        .server(Server::new(good.addr))
        .build()
        .unwrap();
    let balance = Balance::new(group.clone(), upstream_client());
    // Not listed: the 502 is the answer and does not count.
    let f = front(balance.clone()).await;
    assert_eq!(
        get(&client, f).await,
        (StatusCode::BAD_GATEWAY, "bad".into())
    );
    assert_eq!(group.stats().next().unwrap().fails, 0);
    // Listed: retried, and counted.
    let f = front(balance.with_next_upstream(NextUpstream::default().on(Condition::Http502))).await;
    for _ in 0..4 {
        assert_eq!(get(&client, f).await, (StatusCode::OK, "good".into()));
    }
    assert_eq!(state(&group, 0), ServerState::Down);
    assert_eq!(bad.hits(), 3);
}

#[tokio::test]
async fn all_down_is_502_at_once() {
    let client = client();
    let group = Group::builder("dead")
        .server(Server::new(dead_addr().await))
        .server(Server::new(dead_addr().await))
        .build()
        .unwrap();
    let balance = Balance::new(group.clone(), upstream_client());
    let f = front(balance.clone()).await;
    let start = Instant::now();
    assert_eq!(get(&client, f).await.0, StatusCode::BAD_GATEWAY);
    assert!(group.stats().all(|s| s.state == ServerState::Down));
    for _ in 0..3 {
        assert_eq!(get(&client, f).await.0, StatusCode::BAD_GATEWAY);
    }
    assert!(
        start.elapsed() < Duration::from_secs(1),
        "{:?}",
        start.elapsed()
    );
    // The cause is "no live upstreams".
    let resp = balance
        .oneshot(http::Request::new(ProxyBody::empty()))
        .await
        .unwrap();
    let cause = resp.extensions().get::<ErrorCause>().unwrap();
    assert_eq!(cause.0.kind(), proxy_core::error::Kind::NoLiveUpstreams);
}

#[tokio::test]
async fn backup_takes_over() {
    let client = client();
    let primary = Upstream::start("primary").await;
    let backup = Upstream::start("backup").await;
    let group = Group::builder("with-backup")
        .server(Server::new(backup.addr).backup())
        .server(Server::new(primary.addr))
        .server(Server::new(dead_addr().await))
        .build()
        .unwrap();
    let f = front(Balance::new(group.clone(), upstream_client())).await;
    for _ in 0..4 {
        assert_eq!(get(&client, f).await, (StatusCode::OK, "primary".into()));
    }
    assert_eq!(backup.hits(), 0);
    primary.kill().await;
    for _ in 0..4 {
        assert_eq!(get(&client, f).await, (StatusCode::OK, "backup".into()));
    }
    assert_eq!(state(&group, 0), ServerState::Down);
}

#[tokio::test]
async fn active_check_marks_down_and_up() {
    let client = client();
    let a = Upstream::start("a").await;
    let b = Upstream::start("b").await;
    let check = HealthCheck::new()
        .interval(Duration::from_millis(20))
        .path(http::uri::PathAndQuery::from_static("/health"))
        .fails(2.try_into().unwrap())
        .passes(2.try_into().unwrap())
        .timeout(Duration::from_secs(1));
    let group = Group::builder("checked")
        .server(Server::new(a.addr))
        .server(Server::new(b.addr))
        .health_check(check)
        .build()
        .unwrap();
    let f = front(Balance::new(group.clone(), upstream_client())).await;
    wait_until("first checks", 5, || {
        a.health_hits.load(Ordering::SeqCst) >= 2
    })
    .await;
    assert!(group.stats().all(|s| s.state == ServerState::Up));

    a.health.store(503, Ordering::SeqCst);
    wait_until("a unhealthy", 5, || {
        state(&group, 0) == ServerState::Unhealthy
    })
    .await;
    let before = a.hits();
    for _ in 0..6 {
        assert_eq!(get(&client, f).await, (StatusCode::OK, "b".into()));
    }
    assert_eq!(a.hits(), before);

    a.health.store(200, Ordering::SeqCst);
    wait_until("a healthy", 5, || state(&group, 0) == ServerState::Up).await;
    let answers: Vec<_> = [get(&client, f).await.1, get(&client, f).await.1].into();
    assert!(answers.contains(&"a".to_owned()), "{answers:?}");
}

#[tokio::test]
async fn health_task_stops_with_the_group() {
    let a = Upstream::start("a").await;
    let group = Group::builder("dropped")
        .server(Server::new(a.addr))
        .health_check(HealthCheck::new().interval(Duration::from_millis(10)))
        .build()
        .unwrap();
    let weak = Arc::downgrade(&group);
    wait_until("checks", 5, || {
        a.health_hits.load(Ordering::SeqCst) + a.hits() >= 2
    })
    .await;
    drop(group);
    assert!(weak.upgrade().is_none());
    let settled = a.hits();
    // Several intervals later, at most the round in flight at the drop arrived.
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(a.hits() <= settled + 1, "{} > {}", a.hits(), settled + 1);
}

#[tokio::test]
async fn cancelled_request_gives_its_slot_back() {
    let slow = Upstream::start("slow").await;
    let group = Group::builder("cancel")
        .server(Server::new(slow.addr))
        .build()
        .unwrap();
    let balance = Balance::new(group.clone(), upstream_client());
    let req = http::Request::builder()
        .uri("/slow")
        .body(ProxyBody::empty())
        .unwrap();
    let pending = tokio::spawn(balance.oneshot(req));
    wait_until("request at the upstream", 5, || slow.hits() == 1).await;
    assert_eq!(group.stats().next().unwrap().in_flight, 1);
    pending.abort();
    wait_until("slot given back", 5, || {
        group.stats().next().unwrap().in_flight == 0
    })
    .await;
}
