//! [`AdminService`]: `/metrics`, `/healthz` and `/readyz` for the admin listener.

use std::convert::Infallible;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use http::header::{HeaderValue, ALLOW, CONTENT_LENGTH, CONTENT_TYPE};
use http::{Method, StatusCode};

use crate::body::{ProxyBody, Response};
use crate::metrics::Metrics;
use crate::response;

/// The content type of the OpenMetrics text exposition, which Prometheus negotiates.
const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Whether the proxy is ready for traffic; shared by every clone.
///
/// Starts not ready: the binary sets it once its listeners are up, and clears it when
/// it starts draining, so load balancers stop sending before the listeners close.
#[derive(Debug, Clone, Default)]
pub struct Readiness(Arc<AtomicBool>);

impl Readiness {
    /// A flag that starts not ready.
    pub fn new() -> Self {
        Readiness::default()
    }

    /// Mark ready (`true`) or not ready (`false`, e.g. while draining).
    pub fn set_ready(&self, ready: bool) {
        self.0.store(ready, Ordering::Release);
    }

    /// Whether ready.
    pub fn is_ready(&self) -> bool {
        self.0.load(Ordering::Acquire)
    }
}

/// The admin endpoints, to serve on a separate listener (127.0.0.1 by default):
///
/// - `GET /metrics`: every metric in the OpenMetrics text format;
/// - `GET /healthz`: 200 while the process runs;
/// - `GET /readyz`: 200 when [`Readiness`] is set, 503 before and while draining.
///
/// Other paths get 404, other methods 405. Takes any request body type.
#[derive(Debug, Clone)]
pub struct AdminService {
    metrics: Metrics,
    readiness: Readiness,
}

impl AdminService {
    /// Serve `metrics` and `readiness`.
    pub fn new(metrics: Metrics, readiness: Readiness) -> Self {
        AdminService { metrics, readiness }
    }

    fn answer(&self, method: &Method, path: &str) -> Response {
        if !matches!(path, "/metrics" | "/healthz" | "/readyz") {
            return response::status(StatusCode::NOT_FOUND);
        }
        if method != Method::GET && method != Method::HEAD {
            let mut resp = response::status(StatusCode::METHOD_NOT_ALLOWED);
            resp.headers_mut()
                .insert(ALLOW, HeaderValue::from_static("GET, HEAD"));
            return resp;
        }
        match path {
            "/metrics" => {
                let text = self.metrics.encode();
                let len = text.len();
                let mut resp = Response::new(ProxyBody::from(text));
                let h = resp.headers_mut();
                h.insert(CONTENT_TYPE, HeaderValue::from_static(OPENMETRICS));
                h.insert(CONTENT_LENGTH, HeaderValue::from(len));
                resp
            }
            "/readyz" if !self.readiness.is_ready() => {
                response::status(StatusCode::SERVICE_UNAVAILABLE)
            }
            _ => response::status(StatusCode::OK),
        }
    }
}

impl<B> tower_service::Service<http::Request<B>> for AdminService {
    type Response = Response;
    type Error = Infallible;
    type Future = std::future::Ready<Result<Response, Infallible>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        std::future::ready(Ok(self.answer(req.method(), req.uri().path())))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use tower::ServiceExt;

    use super::*;

    async fn call(admin: &AdminService, method: Method, path: &str) -> Response {
        let req = http::Request::builder()
            .method(method)
            .uri(path)
            .body(())
            .unwrap();
        admin.clone().oneshot(req).await.unwrap()
    }

    #[tokio::test]
    async fn endpoints() {
        let ready = Readiness::new();
        let admin = AdminService::new(Metrics::new(), ready.clone());
        assert_eq!(call(&admin, Method::GET, "/healthz").await.status(), 200);
        assert_eq!(call(&admin, Method::GET, "/readyz").await.status(), 503);
        ready.set_ready(true);
        assert_eq!(call(&admin, Method::HEAD, "/readyz").await.status(), 200);
        ready.set_ready(false);
        assert_eq!(call(&admin, Method::GET, "/readyz").await.status(), 503);
        let m = call(&admin, Method::GET, "/metrics").await;
        assert_eq!(m.status(), 200);
        assert_eq!(m.headers()[CONTENT_TYPE], OPENMETRICS);
        assert_eq!(call(&admin, Method::GET, "/").await.status(), 404);
        let post = call(&admin, Method::POST, "/metrics").await;
        assert_eq!(post.status(), 405);
        assert_eq!(post.headers()[ALLOW], "GET, HEAD");
    }
}
