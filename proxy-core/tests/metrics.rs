//! Metrics over real sockets: a proxy with the metrics layer and an admin listener; the
//! scrape is valid exposition text and its counters move with requests.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::collections::{HashMap, HashSet};
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Instant;

use http::StatusCode;
use proxy_core::access_log::UpstreamInfo;
use proxy_core::metrics::{AdminService, Metrics, MetricsLayer, Readiness, UpstreamServerStat};
use proxy_core::router::{Location, Pattern, Return, Router, ServerName, VirtualServer};
use proxy_core::server::Server;
use proxy_core::upstream::{ClientConfig, Forward, UpstreamClient};
use proxy_core::{ProxyBody, Request};
use support::*;
use tokio::net::TcpListener;
use tower::{Layer, ServiceExt};

/// Serve `service` on an ephemeral port; the server's stats go to `metrics`.
async fn serve<S>(service: S, metrics: Option<(&Metrics, &str)>) -> std::net::SocketAddr
where
    S: tower::Service<Request, Response = proxy_core::Response, Error = Infallible>
        + Clone
        + Send
        + Sync
        + 'static,
    S::Future: Send + 'static,
{
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = Server::new(listener);
    if let Some((m, name)) = metrics {
        m.register_server(name, server.stats());
    }
    tokio::spawn(server.serve(service, std::future::pending()));
    addr
}

/// A strict reading of the text exposition: every line is a `# HELP`, `# TYPE`,
/// `# UNIT` or a sample of a declared family; it ends with `# EOF`. Returns each
/// sample (name with labels) and its value.
fn parse_exposition(text: &str) -> HashMap<String, f64> {
    let sample = regex::Regex::new(
        r#"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{(?:[a-zA-Z_][a-zA-Z0-9_]*="(?:[^"\\\n]|\\["\\n])*",?)*\})? (\S+)$"#,
    )
    .unwrap();
    let meta = regex::Regex::new(r"^# (HELP|TYPE|UNIT) ([a-zA-Z_:][a-zA-Z0-9_:]*)( .*)?$").unwrap();
    assert!(text.ends_with("# EOF\n"), "no EOF marker");
    let mut families: HashMap<String, String> = HashMap::new();
    let mut samples = HashMap::new();
    let mut seen_families = HashSet::new();
    for line in text.lines().take_while(|l| *l != "# EOF") {
        if let Some(c) = meta.captures(line) {
            if &c[1] == "TYPE" {
                let kind = c[3].trim().to_owned();
                assert!(
                    ["counter", "gauge", "histogram", "info", "unknown"].contains(&kind.as_str()),
                    "{line}"
                );
                assert!(
                    seen_families.insert(c[2].to_owned()),
                    "family declared twice: {line}"
                );
                families.insert(c[2].to_owned(), kind);
            }
            continue;
        }
        let c = sample
            .captures(line)
            .unwrap_or_else(|| panic!("bad line: {line:?}"));
        let name = &c[1];
        let family_ok = families.iter().any(|(f, kind)| match kind.as_str() {
            "counter" => name == format!("{f}_total") || name == format!("{f}_created"),
            "histogram" => ["_bucket", "_count", "_sum", "_created"]
                .iter()
                .any(|s| name == format!("{f}{s}")),
            _ => name == f,
        });
        assert!(family_ok, "sample of an undeclared family: {line}");
        let value: f64 = c[3].parse().unwrap_or_else(|_| panic!("bad value: {line}"));
        let key = format!("{}{}", name, c.get(2).map_or("", |m| m.as_str()));
        assert!(
            samples.insert(key, value).is_none(),
            "duplicate sample: {line}"
        );
    }
    assert_eq!(text.lines().filter(|l| *l == "# EOF").count(), 1);
    samples
}

async fn scrape(admin: std::net::SocketAddr) -> HashMap<String, f64> {
    let (parts, body) = send(admin, get("/metrics")).await;
    assert_eq!(parts.status, 200);
    assert!(parts.headers["content-type"]
        .to_str()
        .unwrap()
        .starts_with("application/openmetrics-text"));
    parse_exposition(std::str::from_utf8(&body).unwrap())
}

#[tokio::test]
async fn scrape_is_valid_and_counters_move_with_requests() {
    let up = Upstream::ok().await;
    let metrics = Metrics::new();
    let fwd = Forward::new(UpstreamClient::new(ClientConfig::default()), up.addr);
    let addr = up.addr;
    // What the forwarding code is to do: say which upstream answered.
    let forward = tower::service_fn(move |req: Request| {
        let fwd = fwd.clone();
        async move {
            let start = Instant::now();
            let mut resp = fwd.oneshot(req).await?;
            resp.extensions_mut()
                .insert(UpstreamInfo::new(addr, start.elapsed()));
            Ok::<_, Infallible>(resp)
        }
    });
    let layer = MetricsLayer::new(metrics.clone());
    let router = Router::builder()
        .server(
            VirtualServer::new([ServerName::parse("example.test").unwrap()])
                .location(Location::new(
                    Pattern::parse("/").unwrap(),
                    layer.layer(forward),
                ))
                .location(Location::new(
                    Pattern::parse("= /gone").unwrap(),
                    layer.layer(Return::new(StatusCode::GONE)),
                )),
        )
        .build()
        .unwrap();
    let proxy = serve(router, Some((&metrics, "main"))).await;
    metrics.register_upstream_stats(Box::new(move || {
        vec![UpstreamServerStat {
            upstream: Arc::from("app"),
            server: addr,
            healthy: true,
            in_flight: 0,
        }]
    }));
    let readiness = Readiness::new();
    let admin = serve(AdminService::new(metrics.clone(), readiness.clone()), None).await;

    let ok_key = format!(
        "proxy_http_requests_total{{server=\"example.test\",location=\"/\",upstream=\"{addr}\",class=\"2xx\"}}"
    );
    let gone_key = "proxy_http_requests_total{server=\"example.test\",location=\"= /gone\",upstream=\"\",class=\"4xx\"}";
    let count_key =
        "proxy_http_request_duration_seconds_count{server=\"example.test\",location=\"/\"}";
    let accepted_key = "proxy_connections_accepted_total{listener=\"main\"}";

    for _ in 0..3 {
        assert_eq!(send(proxy, get("/api")).await.0.status, 200);
    }
    assert_eq!(send(proxy, get("/gone")).await.0.status, 410);
    let first = scrape(admin).await;
    assert_eq!(first.get(&ok_key), Some(&3.0), "{first:#?}");
    assert_eq!(first.get(gone_key), Some(&1.0));
    assert_eq!(first.get(count_key), Some(&3.0));
    assert_eq!(first[accepted_key], 4.0);
    let up_key = format!("proxy_upstream_server_up{{upstream=\"app\",server=\"{addr}\"}}");
    assert_eq!(first.get(&up_key), Some(&1.0));
    // Buckets are cumulative, ending in +Inf with the count.
    let inf = first
        .iter()
        .find(|(k, _)| {
            k.starts_with("proxy_http_request_duration_seconds_bucket{le=\"+Inf\"")
                && k.contains("location=\"/\"")
        })
        .map(|(_, v)| *v);
    assert_eq!(inf, Some(3.0));

    for _ in 0..2 {
        send(proxy, get("/api")).await;
    }
    let second = scrape(admin).await;
    assert_eq!(second.get(&ok_key), Some(&5.0));
    assert_eq!(second.get(count_key), Some(&5.0));
    assert_eq!(second[accepted_key], 6.0);
    assert_eq!(second.get(gone_key), Some(&1.0));
}

#[tokio::test]
async fn health_and_readiness_over_the_admin_listener() {
    let readiness = Readiness::new();
    let admin = serve(AdminService::new(Metrics::new(), readiness.clone()), None).await;
    assert_eq!(send(admin, get("/healthz")).await.0.status, 200);
    assert_eq!(send(admin, get("/readyz")).await.0.status, 503);
    readiness.set_ready(true);
    assert_eq!(send(admin, get("/readyz")).await.0.status, 200);
    readiness.set_ready(false);
    assert_eq!(send(admin, get("/readyz")).await.0.status, 503);
    assert_eq!(send(admin, get("/nope")).await.0.status, 404);
    let post = http::Request::builder()
        .method("POST")
        .uri("/metrics")
        .header("host", "x")
        .body(ProxyBody::empty())
        .unwrap();
    assert_eq!(send(admin, post).await.0.status, 405);
}
