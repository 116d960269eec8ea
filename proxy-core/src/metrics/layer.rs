//! [`MetricsLayer`] and its service [`MetricsService`].

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use pin_project_lite::pin_project;
use tokio::time::Instant;
use tower_layer::Layer;

use crate::access_log::UpstreamInfo;
use crate::body::{Request, Response};
use crate::metrics::Metrics;
use crate::router::Route;

/// nginx's "client closed request": counted when the client went away before the
/// response header.
const CLIENT_CLOSED: u16 = 499;

/// Counts requests by server, location, upstream server and status class, and
/// observes their latency (to the response header) into [`Metrics`].
#[derive(Debug, Clone)]
pub struct MetricsLayer {
    metrics: Metrics,
}

impl MetricsLayer {
    /// Record into `metrics`.
    pub fn new(metrics: Metrics) -> Self {
        MetricsLayer { metrics }
    }
}

impl<S> Layer<S> for MetricsLayer {
    type Service = MetricsService<S>;

    fn layer(&self, inner: S) -> MetricsService<S> {
        MetricsService {
            inner,
            metrics: self.metrics.clone(),
        }
    }
}

/// The service of a [`MetricsLayer`]. (Not `Metrics<S>`: [`Metrics`] is the registry.)
#[derive(Debug, Clone)]
pub struct MetricsService<S> {
    inner: S,
    metrics: Metrics,
}

impl<S> tower_service::Service<Request> for MetricsService<S>
where
    S: tower_service::Service<Request, Response = Response>,
{
    type Response = Response;
    type Error = S::Error;
    type Future = ResponseFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request) -> Self::Future {
        self.metrics.request_started();
        let started = Started {
            metrics: self.metrics.clone(),
            start: Instant::now(),
            route: req.extensions().get::<Arc<Route>>().cloned(),
        };
        ResponseFuture {
            inner: self.inner.call(req),
            started: Some(started),
        }
    }
}

struct Started {
    metrics: Metrics,
    start: Instant,
    route: Option<Arc<Route>>,
}

pin_project! {
    /// The future of a [`MetricsService`] call; dropped before the inner service
    /// answered (the client went away), it counts a 499.
    pub struct ResponseFuture<F> {
        #[pin]
        inner: F,
        started: Option<Started>,
    }

    impl<F> PinnedDrop for ResponseFuture<F> {
        fn drop(this: Pin<&mut Self>) {
            if let Some(s) = this.project().started.take() {
                s.metrics
                    .request_finished(s.route.as_ref(), None, CLIENT_CLOSED, s.start.elapsed());
            }
        }
    }
}

impl<F> std::fmt::Debug for ResponseFuture<F> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ResponseFuture").finish_non_exhaustive()
    }
}

impl<F, E> Future for ResponseFuture<F>
where
    F: Future<Output = Result<Response, E>>,
{
    type Output = Result<Response, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let res = std::task::ready!(this.inner.poll(cx));
        if let Some(s) = this.started.take() {
            let elapsed = s.start.elapsed();
            match &res {
                Ok(resp) => {
                    let ext = resp.extensions();
                    // Per location the route is on the request; a layer around the
                    // whole router finds it on the response, if the router puts it there.
                    let route = s.route.as_ref().or_else(|| ext.get::<Arc<Route>>());
                    let status = resp.status().as_u16();
                    s.metrics
                        .request_finished(route, ext.get::<UpstreamInfo>(), status, elapsed);
                    if let Some(r) = ext.get::<crate::balance::Retries>() {
                        s.metrics.retries(&r.group).inc_by(u64::from(r.count));
                    }
                    if let Some(r) = ext.get::<crate::limit::RejectedBy>() {
                        s.metrics.rate_limit_rejections(&r.zone).inc();
                    }
                }
                // A service error reaches the client as a dropped connection.
                Err(_) => s
                    .metrics
                    .request_finished(s.route.as_ref(), None, 500, elapsed),
            }
        }
        Poll::Ready(res)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use std::convert::Infallible;
    use std::time::Duration;

    use tower::ServiceExt;

    use super::*;
    use crate::body::ProxyBody;

    #[tokio::test]
    async fn client_gone_counts_499_and_in_flight_returns_to_zero() {
        let m = Metrics::new();
        let svc = MetricsLayer::new(m.clone()).layer(tower::service_fn(|_req: Request| {
            std::future::pending::<Result<Response, Infallible>>()
        }));
        let fut = svc.oneshot(Request::new(ProxyBody::empty()));
        let _ = tokio::time::timeout(Duration::from_millis(1), fut).await;
        let text = m.encode();
        assert!(text.contains("class=\"4xx\"} 1\n"), "{text}");
        assert!(text.contains("proxy_http_requests_in_flight 0\n"), "{text}");
    }

    #[tokio::test]
    async fn route_and_upstream_from_the_response() {
        let m = Metrics::new();
        let svc = MetricsLayer::new(m.clone()).layer(tower::service_fn(|_req: Request| async {
            let mut resp = Response::new(ProxyBody::empty());
            *resp.status_mut() = http::StatusCode::NOT_FOUND;
            resp.extensions_mut().insert(Arc::new(Route {
                server: "s".into(),
                location: "= /x".into(),
            }));
            resp.extensions_mut().insert(UpstreamInfo::new(
                "127.0.0.1:1".parse().unwrap(),
                Duration::from_millis(1),
            ));
            Ok::<_, Infallible>(resp)
        }));
        svc.oneshot(Request::new(ProxyBody::empty())).await.unwrap();
        let text = m.encode();
        assert!(
            text.contains(
                "proxy_http_requests_total{server=\"s\",location=\"= /x\",upstream=\"127.0.0.1:1\",class=\"4xx\"} 1\n"
            ),
            "{text}"
        );
    }
}
