//! [`HttpsRedirectLayer`]: requests that arrived over plain HTTP get a `301` to the same
//! host and URI over HTTPS (nginx's `return 301 https://$host$request_uri;`); requests
//! that arrived over TLS go through to the inner service. One stack can so serve both
//! listeners. Put [`AcmeChallengeLayer`](crate::challenge::AcmeChallengeLayer) in front
//! of it so `/.well-known/acme-challenge/` stays reachable over plain HTTP.
//!
//! Which listener a request came from is read from its
//! [`ClientInfo`]; a request without one is treated as plain.
//!
//! ```
//! use proxy_tls::redirect::HttpsRedirectLayer;
//! use tower::{service_fn, ServiceExt, Layer};
//! # tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(async {
//! let app = service_fn(|_req: proxy_core::Request| async {
//!     Ok::<_, std::convert::Infallible>(proxy_core::Response::new(Default::default()))
//! });
//! let svc = HttpsRedirectLayer::new().layer(app);
//! let req = http::Request::get("/a/b?c=d")
//!     .header("host", "example.com:8080")
//!     .body(Default::default())
//!     .unwrap();
//! let resp = svc.oneshot(req).await.unwrap();
//! assert_eq!(resp.status(), 301);
//! assert_eq!(resp.headers()["location"], "https://example.com/a/b?c=d");
//! # });
//! ```

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use http::header::{HeaderValue, CONTENT_LENGTH, HOST, LOCATION};
use http::uri::{Authority, Uri};
use http::StatusCode;
use pin_project_lite::pin_project;
use proxy_core::client_info::{ClientInfo, Scheme};
use proxy_core::{ProxyBody, Request, Response};
use tower_layer::Layer;
use tower_service::Service;

/// Redirects plain-HTTP requests to HTTPS. See the [module docs](self).
#[derive(Debug, Clone, Copy, Default)]
pub struct HttpsRedirectLayer {
    https_port: Option<u16>,
}

impl HttpsRedirectLayer {
    /// Redirect to the default HTTPS port (443).
    pub fn new() -> Self {
        HttpsRedirectLayer { https_port: None }
    }

    /// Redirect to this HTTPS port (written into the `Location` unless it is 443).
    pub fn https_port(mut self, port: u16) -> Self {
        self.https_port = (port != 443).then_some(port);
        self
    }
}

impl<S> Layer<S> for HttpsRedirectLayer {
    type Service = HttpsRedirect<S>;

    fn layer(&self, inner: S) -> HttpsRedirect<S> {
        HttpsRedirect {
            inner,
            https_port: self.https_port,
        }
    }
}

/// The service of [`HttpsRedirectLayer`].
#[derive(Debug, Clone)]
pub struct HttpsRedirect<S> {
    inner: S,
    https_port: Option<u16>,
}

impl<S> Service<Request> for HttpsRedirect<S>
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
        let tls = ClientInfo::of(&req).is_some_and(|c| c.scheme == Scheme::Https);
        if tls {
            return ResponseFuture {
                state: State::Inner {
                    fut: self.inner.call(req),
                },
            };
        }
        ResponseFuture {
            state: State::Ready {
                resp: Some(redirect(&req, self.https_port)),
            },
        }
    }
}

/// The `301` for a plain request, or `400` when it names no valid host.
fn redirect(req: &Request, https_port: Option<u16>) -> Response {
    let authority = req
        .headers()
        .get(HOST)
        .and_then(|h| Authority::try_from(h.as_bytes()).ok())
        .or_else(|| req.uri().authority().cloned());
    // Userinfo (`user@host`) is not a host: refuse rather than redirect to it.
    let Some(authority) = authority.filter(|a| !a.as_str().contains('@')) else {
        return proxy_core::response::status(StatusCode::BAD_REQUEST);
    };
    let host = authority.host();
    let target = match https_port {
        Some(port) => Authority::try_from(format!("{host}:{port}")),
        None => Authority::try_from(host),
    };
    let path = req.uri().path_and_query().map_or("/", |pq| pq.as_str());
    let location = target.ok().and_then(|authority| {
        Uri::builder()
            .scheme("https")
            .authority(authority)
            .path_and_query(path)
            .build()
            .ok()
    });
    let Some(value) = location.and_then(|l| HeaderValue::try_from(l.to_string()).ok()) else {
        return proxy_core::response::status(StatusCode::BAD_REQUEST);
    };
    let mut resp = http::Response::new(ProxyBody::empty());
    *resp.status_mut() = StatusCode::MOVED_PERMANENTLY;
    resp.headers_mut().insert(LOCATION, value);
    resp.headers_mut()
        .insert(CONTENT_LENGTH, HeaderValue::from_static("0"));
    resp
}

pin_project! {
    /// The future of [`HttpsRedirect`].
    pub struct ResponseFuture<F> {
        #[pin]
        state: State<F>,
    }
}

pin_project! {
    #[project = StateProj]
    enum State<F> {
        Inner { #[pin] fut: F },
        Ready { resp: Option<Response> },
    }
}

impl<F: std::fmt::Debug> std::fmt::Debug for ResponseFuture<F> {
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
        match self.project().state.project() {
            StateProj::Inner { fut } => fut.poll(cx),
            StateProj::Ready { resp } => match resp.take() {
                Some(r) => Poll::Ready(Ok(r)),
                None => Poll::Pending,
            },
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::convert::Infallible;
    use tower::{service_fn, ServiceExt};

    fn app() -> impl Service<Request, Response = Response, Error = Infallible, Future: Send> + Clone
    {
        service_fn(|_req: Request| async {
            Ok::<_, Infallible>(proxy_core::response::status(StatusCode::IM_A_TEAPOT))
        })
    }

    async fn run(layer: HttpsRedirectLayer, req: Request) -> Response {
        layer.layer(app()).oneshot(req).await.unwrap()
    }

    fn get(uri: &str, host: Option<&str>) -> Request {
        let mut b = http::Request::get(uri);
        if let Some(h) = host {
            b = b.header("host", h);
        }
        b.body(ProxyBody::empty()).unwrap()
    }

    #[tokio::test]
    async fn keeps_host_and_uri_and_sets_port() {
        let r = run(
            HttpsRedirectLayer::new(),
            get("/x?y=%20z", Some("Site.test:80")),
        )
        .await;
        assert_eq!(r.headers()["location"], "https://Site.test/x?y=%20z");
        let r = run(
            HttpsRedirectLayer::new().https_port(8443),
            get("/", Some("[::1]:80")),
        )
        .await;
        assert_eq!(r.headers()["location"], "https://[::1]:8443/");
        let r = run(
            HttpsRedirectLayer::new().https_port(443),
            get("/", Some("a.test")),
        )
        .await;
        assert_eq!(r.headers()["location"], "https://a.test/");
        // HTTP/2 or absolute-form: the authority of the target.
        let r = run(HttpsRedirectLayer::new(), get("http://b.test/p", None)).await;
        assert_eq!(r.headers()["location"], "https://b.test/p");
    }

    #[tokio::test]
    async fn no_or_bad_host_is_400() {
        assert_eq!(
            run(HttpsRedirectLayer::new(), get("/", None))
                .await
                .status(),
            400
        );
        assert_eq!(
            run(HttpsRedirectLayer::new(), get("/", Some("a b")))
                .await
                .status(),
            400
        );
        assert_eq!(
            run(HttpsRedirectLayer::new(), get("/", Some("u@evil.test")))
                .await
                .status(),
            400
        );
    }

    #[tokio::test]
    async fn tls_requests_pass_through() {
        let mut req = get("/", Some("a.test"));
        req.extensions_mut().insert(ClientInfo::new(
            "127.0.0.1:1".parse().unwrap(),
            "127.0.0.1:443".parse().unwrap(),
            Scheme::Https,
        ));
        assert_eq!(run(HttpsRedirectLayer::new(), req).await.status(), 418);
    }

    proptest! {
        #[test]
        fn any_host_header_gives_301_or_400(host in proptest::collection::vec(any::<u8>(), 0..64)) {
            let Ok(value) = HeaderValue::from_bytes(&host) else { return Ok(()) };
            let mut req = get("/", None);
            req.headers_mut().insert(HOST, value);
            let resp = redirect(&req, Some(8443));
            prop_assert!(resp.status() == 301 || resp.status() == 400);
        }
    }
}
