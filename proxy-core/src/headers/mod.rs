//! Response headers per server and location: nginx's `add_header NAME VALUE [always]`,
//! as [`AddHeadersLayer`].
//!
//! Without `always` a header is added only to answers with status 200, 201, 204, 206,
//! 301, 302, 303, 304, 307 or 308 (nginx's documented list); with `always`, to every
//! answer, errors included — what you want for HSTS and the other security headers.
//!
//! [`ResponseHeaders::add`] appends like nginx does (an upstream's own header of the same name
//! stays, and the client sees both); [`ResponseHeaders::set`] replaces the upstream's value,
//! which is usually what you mean for `Strict-Transport-Security`.
//!
//! Names and values are typed ([`HeaderName`], [`HeaderValue`]) and checked once when the
//! configuration is built; the per-request cost is the inserts themselves.
//!
//! ```
//! use std::convert::Infallible;
//! use http::header::{HeaderName, HeaderValue, STRICT_TRANSPORT_SECURITY, X_CONTENT_TYPE_OPTIONS};
//! use proxy_core::headers::{ResponseHeaders, AddHeadersLayer};
//! use proxy_core::{ProxyBody, Request, Response};
//! use tower::{service_fn, Layer, ServiceExt};
//! # tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(async {
//! // add_header Strict-Transport-Security "max-age=31536000; includeSubDomains" always;
//! // add_header X-Content-Type-Options nosniff;
//! let headers = ResponseHeaders::new()
//!     .set_always(STRICT_TRANSPORT_SECURITY, HeaderValue::from_static("max-age=31536000; includeSubDomains"))
//!     .add(X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
//! let app = service_fn(|req: Request| async move {
//!     let status = if req.uri().path() == "/" { 200 } else { 404 };
//!     let mut resp = Response::new(ProxyBody::empty());
//!     *resp.status_mut() = http::StatusCode::from_u16(status).unwrap();
//!     Ok::<_, Infallible>(resp)
//! });
//! let svc = AddHeadersLayer::new(headers).layer(app);
//!
//! let ok = svc.clone().oneshot(http::Request::get("/").body(ProxyBody::empty()).unwrap()).await.unwrap();
//! assert!(ok.headers().contains_key("strict-transport-security"));
//! assert_eq!(ok.headers()["x-content-type-options"], "nosniff");
//!
//! let missing = svc.oneshot(http::Request::get("/x").body(ProxyBody::empty()).unwrap()).await.unwrap();
//! assert!(missing.headers().contains_key("strict-transport-security")); // always
//! assert!(!missing.headers().contains_key("x-content-type-options"));   // 404: not added
//! # });
//! ```
//!
//! nginx gotcha kept visible: in nginx a location with any `add_header` does not inherit
//! the server's. Here nothing is inherited implicitly; the binary decides what list each
//! location gets.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use http::{HeaderName, HeaderValue, StatusCode};
use pin_project_lite::pin_project;
use tower_layer::Layer;
use tower_service::Service;

use crate::body::{Request, Response};

/// The headers a server or location adds to its answers.
#[derive(Debug, Clone, Default)]
#[must_use]
pub struct ResponseHeaders {
    entries: Vec<Entry>,
}

#[derive(Debug, Clone)]
struct Entry {
    name: HeaderName,
    value: HeaderValue,
    always: bool,
    replace: bool,
}

impl ResponseHeaders {
    /// No headers yet.
    pub fn new() -> Self {
        ResponseHeaders::default()
    }

    /// nginx `add_header NAME VALUE`: appended to successful and redirect answers.
    pub fn add(self, name: HeaderName, value: HeaderValue) -> Self {
        self.push(name, value, false, false)
    }

    /// nginx `add_header NAME VALUE always`: appended to every answer.
    pub fn add_always(self, name: HeaderName, value: HeaderValue) -> Self {
        self.push(name, value, true, false)
    }

    /// Like [`add`](Self::add), but replaces any value the inner service set.
    pub fn set(self, name: HeaderName, value: HeaderValue) -> Self {
        self.push(name, value, false, true)
    }

    /// Like [`add_always`](Self::add_always), but replaces any value the inner service set.
    pub fn set_always(self, name: HeaderName, value: HeaderValue) -> Self {
        self.push(name, value, true, true)
    }

    fn push(mut self, name: HeaderName, value: HeaderValue, always: bool, replace: bool) -> Self {
        self.entries.push(Entry {
            name,
            value,
            always,
            replace,
        });
        self
    }

    /// Adds the headers to `resp` as configured (what the layer does to each answer).
    pub fn apply(&self, resp: &mut Response) {
        let success = is_success(resp.status());
        let headers = resp.headers_mut();
        // A `set` entry replaces what the inner service sent; two `set`s of one name both
        // stay, so remove first, then append everything in order.
        for e in &self.entries {
            if e.replace && (e.always || success) {
                headers.remove(&e.name);
            }
        }
        for e in &self.entries {
            if e.always || success {
                headers.append(e.name.clone(), e.value.clone());
            }
        }
    }
}

/// nginx's list for `add_header` without `always`.
fn is_success(status: StatusCode) -> bool {
    matches!(
        status.as_u16(),
        200 | 201 | 204 | 206 | 301 | 302 | 303 | 304 | 307 | 308
    )
}

/// Adds [`ResponseHeaders`] to every answer of the inner service. See the [module docs](self).
#[derive(Debug, Clone)]
pub struct AddHeadersLayer {
    headers: Arc<ResponseHeaders>,
}

impl AddHeadersLayer {
    /// A layer adding `headers`; every service it makes shares them.
    pub fn new(headers: ResponseHeaders) -> Self {
        AddHeadersLayer {
            headers: Arc::new(headers),
        }
    }
}

impl<S> Layer<S> for AddHeadersLayer {
    type Service = AddHeaders<S>;

    fn layer(&self, inner: S) -> AddHeaders<S> {
        AddHeaders {
            inner,
            headers: self.headers.clone(),
        }
    }
}

/// The service made by [`AddHeadersLayer`].
#[derive(Debug, Clone)]
pub struct AddHeaders<S> {
    inner: S,
    headers: Arc<ResponseHeaders>,
}

impl<S> Service<Request> for AddHeaders<S>
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
        ResponseFuture {
            fut: self.inner.call(req),
            headers: self.headers.clone(),
        }
    }
}

pin_project! {
    /// The future of [`AddHeaders`] responses.
    pub struct ResponseFuture<F> {
        #[pin]
        fut: F,
        headers: Arc<ResponseHeaders>,
    }
}

impl<F> std::fmt::Debug for ResponseFuture<F> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("headers::ResponseFuture")
    }
}

impl<F, E> Future for ResponseFuture<F>
where
    F: Future<Output = Result<Response, E>>,
{
    type Output = Result<Response, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let mut resp = ready!(this.fut.poll(cx))?;
        this.headers.apply(&mut resp);
        Poll::Ready(Ok(resp))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)] // tests may unwrap
mod tests {
    use super::*;
    use crate::body::ProxyBody;
    use http::header::{CACHE_CONTROL, STRICT_TRANSPORT_SECURITY};

    fn resp(status: u16) -> Response {
        let mut r = Response::new(ProxyBody::empty());
        *r.status_mut() = StatusCode::from_u16(status).unwrap();
        r.headers_mut()
            .insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
        r.headers_mut().insert(
            STRICT_TRANSPORT_SECURITY,
            HeaderValue::from_static("max-age=1"),
        );
        r
    }

    #[test]
    fn nginx_status_list_and_always() {
        let h = ResponseHeaders::new()
            .add(
                HeaderName::from_static("x-a"),
                HeaderValue::from_static("a"),
            )
            .add_always(
                HeaderName::from_static("x-b"),
                HeaderValue::from_static("b"),
            );
        for (status, want_a) in [
            (200, true),
            (201, true),
            (202, false),
            (204, true),
            (206, true),
            (301, true),
            (304, true),
            (308, true),
            (404, false),
            (500, false),
            (502, false),
        ] {
            let mut r = resp(status);
            h.apply(&mut r);
            assert_eq!(r.headers().contains_key("x-a"), want_a, "{status}");
            assert_eq!(r.headers()["x-b"], "b", "{status}");
        }
    }

    #[test]
    fn add_appends_and_set_replaces() {
        let h = ResponseHeaders::new()
            .add(CACHE_CONTROL, HeaderValue::from_static("public"))
            .set_always(
                STRICT_TRANSPORT_SECURITY,
                HeaderValue::from_static("max-age=9"),
            );
        let mut r = resp(200);
        h.apply(&mut r);
        let cc: Vec<_> = r.headers().get_all(CACHE_CONTROL).iter().collect();
        assert_eq!(cc, ["no-store", "public"]);
        let hsts: Vec<_> = r
            .headers()
            .get_all(STRICT_TRANSPORT_SECURITY)
            .iter()
            .collect();
        assert_eq!(hsts, ["max-age=9"]);
        // `set` without `always` leaves an error answer's header alone.
        let h = ResponseHeaders::new().set(CACHE_CONTROL, HeaderValue::from_static("public"));
        let mut r = resp(503);
        h.apply(&mut r);
        assert_eq!(r.headers()[CACHE_CONTROL], "no-store");
    }
}
