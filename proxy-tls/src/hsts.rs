//! [`HstsLayer`]: adds `Strict-Transport-Security` to responses of requests that came
//! over TLS (nginx's `add_header Strict-Transport-Security "max-age=31536000;
//! includeSubDomains" always;`). Browsers ignore the header over plain HTTP (RFC 6797
//! §8.1), so requests whose [`ClientInfo`] says `http` are left
//! alone; a request without `ClientInfo` (an embedding without our server) gets it. A
//! header the upstream set itself is kept.
//!
//! ```
//! use std::time::Duration;
//! use proxy_tls::hsts::HstsLayer;
//! use tower::{service_fn, Layer, ServiceExt};
//! # tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(async {
//! let app = service_fn(|_req: proxy_core::Request| async {
//!     Ok::<_, std::convert::Infallible>(proxy_core::Response::new(Default::default()))
//! });
//! let svc = HstsLayer::new(Duration::from_secs(31_536_000)).include_subdomains(true).layer(app);
//! let resp = svc.oneshot(http::Request::new(Default::default())).await.unwrap();
//! assert_eq!(resp.headers()["strict-transport-security"], "max-age=31536000; includeSubDomains");
//! # });
//! ```

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use http::header::{HeaderValue, STRICT_TRANSPORT_SECURITY};
use pin_project_lite::pin_project;
use proxy_core::client_info::{ClientInfo, Scheme};
use proxy_core::{Request, Response};
use tower_layer::Layer;
use tower_service::Service;

/// Adds HSTS to HTTPS responses. See the [module docs](self).
#[derive(Debug, Clone)]
pub struct HstsLayer {
    max_age: Duration,
    include_subdomains: bool,
    preload: bool,
    value: HeaderValue,
}

impl HstsLayer {
    /// `max-age` of `max_age` (whole seconds); no `includeSubDomains`, no `preload`.
    pub fn new(max_age: Duration) -> Self {
        let mut layer = HstsLayer {
            max_age,
            include_subdomains: false,
            preload: false,
            value: HeaderValue::from_static("max-age=0"),
        };
        layer.render();
        layer
    }

    /// Add `includeSubDomains`.
    pub fn include_subdomains(mut self, on: bool) -> Self {
        self.include_subdomains = on;
        self.render();
        self
    }

    /// Add `preload` (only for sites submitted to the browsers' preload lists).
    pub fn preload(mut self, on: bool) -> Self {
        self.preload = on;
        self.render();
        self
    }

    /// The header value sent.
    pub fn value(&self) -> &HeaderValue {
        &self.value
    }

    fn render(&mut self) {
        // Rendered once here, cloned (a refcount bump at most) per response.
        let mut v = format!("max-age={}", self.max_age.as_secs());
        if self.include_subdomains {
            v.push_str("; includeSubDomains");
        }
        if self.preload {
            v.push_str("; preload");
        }
        if let Ok(v) = HeaderValue::try_from(v) {
            self.value = v;
        }
    }
}

impl<S> Layer<S> for HstsLayer {
    type Service = Hsts<S>;

    fn layer(&self, inner: S) -> Hsts<S> {
        Hsts {
            inner,
            value: self.value.clone(),
        }
    }
}

/// The service of [`HstsLayer`].
#[derive(Debug, Clone)]
pub struct Hsts<S> {
    inner: S,
    value: HeaderValue,
}

impl<S> Service<Request> for Hsts<S>
where
    S: Service<Request, Response = Response>,
{
    type Response = Response;
    type Error = S::Error;
    type Future = ResponseFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request) -> Self::Future {
        let plain = ClientInfo::of(&req).is_some_and(|c| c.scheme == Scheme::Http);
        ResponseFuture {
            fut: self.inner.call(req),
            value: (!plain).then(|| self.value.clone()),
        }
    }
}

pin_project! {
    /// The future of [`Hsts`].
    pub struct ResponseFuture<F> {
        #[pin]
        fut: F,
        value: Option<HeaderValue>,
    }
}

impl<F> std::fmt::Debug for ResponseFuture<F> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ResponseFuture")
    }
}

impl<F, E> Future for ResponseFuture<F>
where
    F: Future<Output = Result<Response, E>>,
{
    type Output = Result<Response, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let mut resp = match this.fut.poll(cx) {
            Poll::Ready(Ok(r)) => r,
            other => return other,
        };
        if let Some(v) = this.value.take() {
            resp.headers_mut()
                .entry(STRICT_TRANSPORT_SECURITY)
                .or_insert(v);
        }
        Poll::Ready(Ok(resp))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use std::convert::Infallible;
    use tower::{service_fn, ServiceExt};

    #[test]
    fn values() {
        let l = HstsLayer::new(Duration::from_secs(300)).preload(true);
        assert_eq!(l.value(), "max-age=300; preload");
    }

    #[tokio::test]
    async fn plain_requests_and_upstream_headers_are_left_alone() {
        let app = service_fn(|req: Request| async move {
            let mut r = Response::new(Default::default());
            if req.uri().path() == "/own" {
                r.headers_mut().insert(
                    STRICT_TRANSPORT_SECURITY,
                    HeaderValue::from_static("max-age=1"),
                );
            }
            Ok::<_, Infallible>(r)
        });
        let svc = HstsLayer::new(Duration::from_secs(10)).layer(app);
        let with = |scheme, path: &str| {
            let mut req = http::Request::get(path).body(Default::default()).unwrap();
            req.extensions_mut().insert(ClientInfo::new(
                "127.0.0.1:1".parse().unwrap(),
                "127.0.0.1:2".parse().unwrap(),
                scheme,
            ));
            req
        };
        let r = svc.clone().oneshot(with(Scheme::Http, "/")).await.unwrap();
        assert!(r.headers().get(STRICT_TRANSPORT_SECURITY).is_none());
        let r = svc.clone().oneshot(with(Scheme::Https, "/")).await.unwrap();
        assert_eq!(r.headers()[STRICT_TRANSPORT_SECURITY], "max-age=10");
        let r = svc.oneshot(with(Scheme::Https, "/own")).await.unwrap();
        assert_eq!(r.headers()[STRICT_TRANSPORT_SECURITY], "max-age=1");
    }
}
