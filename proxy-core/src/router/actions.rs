//! Terminal actions a location can take besides proxying: `return` and redirects.

use std::convert::Infallible;
use std::future::{ready, Ready};
use std::task::{Context, Poll};

use bytes::Bytes;
use http::header::{HeaderValue, CONTENT_TYPE, HOST, LOCATION};
use http::StatusCode;

use crate::body::{ProxyBody, Request, Response};
use crate::client_info::{ClientInfo, Scheme};
use crate::response;

/// nginx's `return CODE [TEXT]`; status 444 closes the connection with no response.
///
/// ```
/// use proxy_core::router::Return;
/// use tower::ServiceExt;
/// # tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(async {
/// let r = Return::new(http::StatusCode::FORBIDDEN).body("nope\n");
/// let resp = r.oneshot(http::Request::new(Default::default())).await.unwrap();
/// assert_eq!(resp.status(), 403);
/// # });
/// ```
#[derive(Debug, Clone)]
pub struct Return {
    status: StatusCode,
    body: Option<Bytes>,
}

impl Return {
    /// Answer with `status` (and a one-line default body).
    pub fn new(status: StatusCode) -> Self {
        Return { status, body: None }
    }

    /// nginx's `return 444`: close the connection without answering.
    pub fn close() -> Self {
        // 444 is a valid status number; it is never sent.
        Return::new(StatusCode::from_u16(444).unwrap_or(StatusCode::BAD_REQUEST))
    }

    /// Answer with this body (text/plain) instead of the default.
    pub fn body(mut self, body: impl Into<Bytes>) -> Self {
        self.body = Some(body.into());
        self
    }
}

impl tower_service::Service<Request> for Return {
    type Response = Response;
    type Error = Infallible;
    type Future = Ready<Result<Response, Infallible>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _req: Request) -> Self::Future {
        if self.status.as_u16() == 444 {
            return ready(Ok(response::close()));
        }
        let resp = match &self.body {
            None => response::status(self.status),
            Some(b) => {
                let mut resp = http::Response::new(ProxyBody::full(b.clone()));
                *resp.status_mut() = self.status;
                resp.headers_mut().insert(
                    CONTENT_TYPE,
                    HeaderValue::from_static("text/plain; charset=utf-8"),
                );
                resp
            }
        };
        ready(Ok(resp))
    }
}

/// A redirect keeping the request's host and URI, optionally changing the scheme, host
/// or port: nginx's `return 301 https://$host$request_uri`.
///
/// ```
/// use proxy_core::router::Redirect;
/// use tower::ServiceExt;
/// # tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(async {
/// let r = Redirect::new(http::StatusCode::MOVED_PERMANENTLY).scheme("https");
/// let req = http::Request::builder().uri("/a?b=1").header("host", "example.com:8080")
///     .body(Default::default()).unwrap();
/// let resp = r.oneshot(req).await.unwrap();
/// assert_eq!(resp.status(), 301);
/// assert_eq!(resp.headers()["location"], "https://example.com/a?b=1");
/// # });
/// ```
#[derive(Debug, Clone)]
pub struct Redirect {
    status: StatusCode,
    scheme: Option<&'static str>,
    host: Option<String>,
    port: Option<u16>,
}

impl Redirect {
    /// Redirect with `status` (301, 302, 303, 307 or 308) to the same URL.
    pub fn new(status: StatusCode) -> Self {
        Redirect {
            status,
            scheme: None,
            host: None,
            port: None,
        }
    }

    /// Change the scheme (`"http"` or `"https"`; anything else means https). The
    /// request's port is dropped unless [`port`](Self::port) sets one.
    pub fn scheme(mut self, scheme: &str) -> Self {
        self.scheme = Some(if scheme.eq_ignore_ascii_case("http") {
            "http"
        } else {
            "https"
        });
        self
    }

    /// Redirect to this host instead of the request's.
    pub fn host(mut self, host: impl Into<String>) -> Self {
        self.host = Some(host.into());
        self
    }

    /// Redirect to this port.
    pub fn port(mut self, port: u16) -> Self {
        self.port = Some(port);
        self
    }

    fn location(&self, req: &Request) -> Option<HeaderValue> {
        let req_scheme = ClientInfo::of(req)
            .map_or(Scheme::Http, |c| c.scheme)
            .as_str();
        let scheme = self.scheme.unwrap_or(req_scheme);
        let host_header = req
            .headers()
            .get(HOST)
            .and_then(|h| h.to_str().ok())
            .map(str::to_owned)
            .or_else(|| req.uri().authority().map(|a| a.to_string()))?;
        let mut host = match &self.host {
            Some(h) => h.clone(),
            // nginx's $host: without the port when the scheme changes.
            None if self.scheme.is_some() && self.scheme != Some(req_scheme) => {
                super::host_of(&host_header)?
            }
            None => host_header,
        };
        if let Some(p) = self.port {
            host = format!("{}:{p}", super::host_of(&host)?);
        }
        let pq = req.uri().path_and_query().map_or("/", |pq| pq.as_str());
        HeaderValue::try_from(format!("{scheme}://{host}{pq}")).ok()
    }
}

impl tower_service::Service<Request> for Redirect {
    type Response = Response;
    type Error = Infallible;
    type Future = Ready<Result<Response, Infallible>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request) -> Self::Future {
        let resp = match self.location(&req) {
            Some(loc) => {
                let mut resp = response::status(self.status);
                resp.headers_mut().insert(LOCATION, loc);
                resp
            }
            None => response::status(StatusCode::BAD_REQUEST),
        };
        ready(Ok(resp))
    }
}
