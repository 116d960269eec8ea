//! Prometheus metrics and the admin endpoints.
//!
//! [`Metrics`] holds every proxy metric in a [prometheus-client] registry. It is fed by
//! [`MetricsLayer`] (requests by server, location, upstream server and status class;
//! latency histograms from which p50/p99 come with `histogram_quantile`) and by the
//! parts that know the rest: listener connection counters (nginx `stub_status`), the
//! balancer's per-server health and in-flight requests, retries, limiter rejections,
//! TLS handshakes and certificate expiry, configuration reloads, access log drops.
//! [`AdminService`] serves it at `/metrics`, with `/healthz` and `/readyz`, on a
//! listener of its own.
//!
//! [prometheus-client]: https://docs.rs/prometheus-client
//!
//! ```
//! use std::convert::Infallible;
//! use proxy_core::metrics::{AdminService, Metrics, MetricsLayer, Readiness};
//! use proxy_core::{ProxyBody, Request, Response};
//! use http_body_util::BodyExt;
//! use tower::{Layer, ServiceExt};
//! # tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async {
//! let metrics = Metrics::new();
//! let app = tower::service_fn(|_req: Request| async {
//!     Ok::<_, Infallible>(Response::new(ProxyBody::from("hello")))
//! });
//! let svc = MetricsLayer::new(metrics.clone()).layer(app);
//! svc.oneshot(Request::new(ProxyBody::empty())).await.unwrap();
//!
//! let readiness = Readiness::new();
//! let admin = AdminService::new(metrics, readiness.clone());
//! let get = |path: &str| http::Request::builder().uri(path).body(()).unwrap();
//! let resp = admin.clone().oneshot(get("/metrics")).await.unwrap();
//! let text = resp.into_body().collect().await.unwrap().to_bytes();
//! let text = std::str::from_utf8(&text).unwrap();
//! assert!(text.contains(r#"proxy_http_requests_total{server="",location="",upstream="",class="2xx"} 1"#));
//! assert!(text.ends_with("# EOF\n"));
//!
//! assert_eq!(admin.clone().oneshot(get("/readyz")).await.unwrap().status(), 503);
//! readiness.set_ready(true);
//! assert_eq!(admin.oneshot(get("/readyz")).await.unwrap().status(), 200);
//! # });
//! ```

mod admin;
mod layer;
mod registry;

pub use admin::{AdminService, Readiness};
pub use layer::{MetricsLayer, MetricsService, ResponseFuture};
pub use registry::{Metrics, UpstreamServerStat};

/// A counter handed out by [`Metrics`] (retries, rejections, handshakes): clones share
/// one value; `inc()` is one atomic add.
pub type Counter = prometheus_client::metrics::counter::Counter;
