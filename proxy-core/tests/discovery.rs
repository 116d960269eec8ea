//! DNS discovery against a real DNS server on 127.0.0.1 (a tiny one, run by the test:
//! its answers are hand-written, encoded with hickory-proto) and real upstreams: the
//! group follows the answers, a removed server drains (its in-flight request
//! completes), a failed resolution keeps the last good set, SRV gives ports, weights
//! and backups. The DNS server is `dns_server/` (shared with the binary's tests).
#![cfg(feature = "dns")]
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod dns_server;
mod support;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use dns_server::{a, srv, Dns, RecordType};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use proxy_core::balance::{Balance, Group, Server};
use proxy_core::discovery::{Discovery, Target};
use proxy_core::upstream::{ClientConfig, UpstreamClient};
use proxy_core::ProxyBody;
use support::{get, wait_for};
use tokio::net::TcpListener;
use tokio::sync::Notify;
use tower::ServiceExt;

/// A real HTTP/1.1 upstream that records the paths it was asked for.
struct Upstream {
    addr: SocketAddr,
    paths: Arc<Mutex<Vec<String>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Upstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// An upstream at `ip:port` that answers `ip` (so a response tells which server it
/// came from), and holds `/slow` until `release` is notified.
async fn upstream(ip: [u8; 4], port: u16, release: Arc<Notify>) -> Upstream {
    let listener = TcpListener::bind(SocketAddr::from((ip, port)))
        .await
        .unwrap();
    let addr = listener.local_addr().unwrap();
    let paths: Arc<Mutex<Vec<String>>> = Arc::default();
    let seen = paths.clone();
    let task = tokio::spawn(async move {
        let mut conns = tokio::task::JoinSet::new();
        while let Ok((stream, _)) = listener.accept().await {
            let (release, seen) = (release.clone(), seen.clone());
            let svc = service_fn(move |req: http::Request<Incoming>| {
                let (release, seen) = (release.clone(), seen.clone());
                async move {
                    seen.lock().unwrap().push(req.uri().path().to_owned());
                    if req.uri().path() == "/slow" {
                        release.notified().await;
                    }
                    let body = format!("{}.{}.{}.{}", ip[0], ip[1], ip[2], ip[3]);
                    Ok::<_, Infallible>(http::Response::new(ProxyBody::from(body)))
                }
            });
            conns.spawn(http1::Builder::new().serve_connection(TokioIo::new(stream), svc));
        }
    });
    Upstream { addr, paths, task }
}

async fn body_of(balance: &Balance, path: &str) -> (u16, String) {
    let resp = balance.clone().oneshot(get(path)).await.unwrap();
    let status = resp.status().as_u16();
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    (status, String::from_utf8_lossy(&body).into_owned())
}

#[tokio::test]
async fn group_follows_dns_and_removed_servers_drain() {
    let dns = Dns::start().await;
    let release = Arc::new(Notify::new());
    let first = upstream([127, 0, 0, 1], 0, release.clone()).await;
    let port = first.addr.port();
    let second = upstream([127, 0, 0, 2], port, release.clone()).await;
    dns.set("app.test.", RecordType::A, vec![a([127, 0, 0, 1])]);

    let discovery = Discovery::builder()
        .nameserver(dns.addr)
        .target(Target::host("app.test.", port).unwrap())
        .interval(Duration::from_millis(50))
        .timeout(Duration::from_millis(200))
        .retry(Duration::from_millis(50))
        .build()
        .unwrap();
    let (group, _task) = discovery.group(Group::builder("app")).await.unwrap();
    let addrs = |g: &Group| g.stats().map(|s| s.addr).collect::<Vec<_>>();
    assert_eq!(addrs(&group), [first.addr]);
    let balance = Balance::new(group.clone(), UpstreamClient::new(ClientConfig::default()));
    assert_eq!(body_of(&balance, "/").await, (200, "127.0.0.1".into()));

    // A request held by the first server...
    let held = tokio::spawn({
        let balance = balance.clone();
        async move { body_of(&balance, "/slow").await }
    });
    wait_for(|| first.paths.lock().unwrap().iter().any(|p| p == "/slow")).await;

    // ... while DNS moves the name to the second one.
    dns.set("app.test.", RecordType::A, vec![a([127, 0, 0, 2])]);
    wait_for(|| addrs(&group) == [second.addr]).await;
    assert!(discovery.stats().updates >= 1);
    let draining = group.draining();
    assert_eq!(draining.len(), 1);
    assert_eq!((draining[0].addr, draining[0].in_flight), (first.addr, 1));
    // New requests go to the second server only.
    for _ in 0..5 {
        assert_eq!(body_of(&balance, "/").await, (200, "127.0.0.2".into()));
    }
    // The drained request completes normally.
    release.notify_one();
    let done = tokio::time::timeout(support::DEADLINE, held)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(done, (200, "127.0.0.1".into()));
    assert!(group.draining().is_empty());

    // Both addresses: the group grows, the kept server keeps its state.
    dns.set(
        "app.test.",
        RecordType::A,
        vec![a([127, 0, 0, 1]), a([127, 0, 0, 2])],
    );
    wait_for(|| addrs(&group).len() == 2).await;

    // The DNS server goes silent: lookups fail, the last good set stays.
    let failures = discovery.stats().failures;
    dns.set_silent(true);
    wait_for(|| discovery.stats().failures >= failures + 2).await;
    assert_eq!(addrs(&group), [first.addr, second.addr]);
    assert_eq!(body_of(&balance, "/").await.0, 200);

    // NXDOMAIN is an answer, but it would leave no server: refused, the set stays.
    dns.set_silent(false);
    dns.clear();
    let lookups = discovery.stats().lookups;
    wait_for(|| discovery.stats().lookups >= lookups + 2).await;
    assert_eq!(addrs(&group), [first.addr, second.addr]);
}

#[tokio::test]
async fn srv_records_give_ports_weights_and_backups() {
    let dns = Dns::start().await;
    let release = Arc::new(Notify::new());
    let main = upstream([127, 0, 0, 1], 0, release.clone()).await;
    let spare = upstream([127, 0, 0, 1], 0, release.clone()).await;
    dns.set(
        "_http._tcp.app.test.",
        RecordType::SRV,
        vec![
            srv(10, 3, main.addr.port(), "main.app.test."),
            srv(20, 0, spare.addr.port(), "spare.app.test."),
        ],
    );
    dns.set("main.app.test.", RecordType::A, vec![a([127, 0, 0, 1])]);
    dns.set("spare.app.test.", RecordType::A, vec![a([127, 0, 0, 1])]);
    let fixed = Server::new("127.0.0.9:9".parse().unwrap()).backup();
    let discovery = Discovery::builder()
        .nameserver(dns.addr)
        .target(
            Target::srv("_http._tcp.app.test.")
                .unwrap()
                .template(Server::new("0.0.0.0:0".parse().unwrap()).max_fails(0)),
        )
        .interval(Duration::from_millis(50))
        .build()
        .unwrap();
    let (group, _task) = discovery
        .group(Group::builder("app").server(fixed))
        .await
        .unwrap();
    let view = |g: &Group| {
        g.stats()
            .map(|s| (s.addr, s.weight, s.backup))
            .collect::<Vec<_>>()
    };
    assert_eq!(
        view(&group),
        [
            (main.addr, 3, false),
            ("127.0.0.9:9".parse().unwrap(), 1, true),
            (spare.addr, 1, true),
        ]
    );
    // The primary changes port: the fixed server stays through every update.
    let other = upstream([127, 0, 0, 1], 0, release.clone()).await;
    dns.set(
        "_http._tcp.app.test.",
        RecordType::SRV,
        vec![srv(10, 1, other.addr.port(), "main.app.test.")],
    );
    wait_for(|| view(&group).len() == 2 && view(&group)[0].0 == other.addr).await;
    assert_eq!(view(&group)[1], ("127.0.0.9:9".parse().unwrap(), 1, true));
}

#[tokio::test]
async fn nothing_resolved_at_start_is_an_error() {
    let dns = Dns::start().await;
    let discovery = Discovery::builder()
        .nameserver(dns.addr)
        .target(Target::host("missing.test.", 80).unwrap())
        .build()
        .unwrap();
    assert!(discovery.group(Group::builder("app")).await.is_err());
    assert_eq!(
        discovery.stats().failures,
        0,
        "NXDOMAIN is an answer, not a failure"
    );
}
