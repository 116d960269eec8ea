//! Error pages: nginx's `error_page 502 503 504 /maintenance.html`, as [`ErrorPageLayer`].
//!
//! An answer whose status is listed gets its body replaced by the page's content, with the
//! page's `Content-Type` and `Content-Length`, optionally under another status
//! (`error_page 404 =200 /empty.gif` is [`Page::with_status`]). The page is read once,
//! when the configuration is built ([`Page::from_file`], at most [`MAX_PAGE_SIZE`]), and
//! shared by every request: serving it copies nothing. To pick up an edited page, rebuild
//! the layer (a config reload).
//!
//! **Which answers are replaced.** Like nginx with `proxy_intercept_errors off` (its
//! default), only answers the proxy itself made: those carrying an
//! [`ErrorCause`] extension, as every
//! [`response::from_error`](crate::response::from_error) answer does (upstream down → 502,
//! upstream timeout → 504). An upstream's own 503 passes through untouched, so a FastAPI
//! error body reaches the client. [`ErrorPages::intercept_upstream`] (nginx
//! `proxy_intercept_errors on`) replaces every listed status.
//!
//! [`ErrorCause`]: crate::response::ErrorCause
//!
//! The replaced answer keeps its extensions (the `ErrorCause` stays visible to logs) and
//! its `Retry-After` header; its other headers and body are dropped.
//!
//! ```
//! use std::convert::Infallible;
//! use http_body_util::BodyExt;
//! use proxy_core::error::{Error, Kind};
//! use proxy_core::error_page::{ErrorPageLayer, ErrorPages, Page};
//! use proxy_core::{response, ProxyBody, Request};
//! use tower::{service_fn, Layer, ServiceExt};
//! # tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(async {
//! let dir = tempfile::tempdir().unwrap();
//! let file = dir.path().join("maintenance.html");
//! std::fs::write(&file, "<h1>Back soon</h1>").unwrap();
//!
//! // error_page 502 503 504 /maintenance.html;
//! let pages = ErrorPages::new().page([502, 503, 504], Page::from_file(&file).unwrap()).unwrap();
//! // An upstream that is down: the forwarding service answers 502 from an error.
//! let upstream_down = service_fn(|_req: Request| async {
//!     Ok::<_, Infallible>(response::from_error(Error::new(Kind::UpstreamConnect)))
//! });
//! let svc = ErrorPageLayer::new(pages).layer(upstream_down);
//!
//! let resp = svc.oneshot(http::Request::new(ProxyBody::empty())).await.unwrap();
//! assert_eq!(resp.status(), 502);
//! assert_eq!(resp.headers()["content-type"], "text/html; charset=utf-8");
//! assert_eq!(&resp.into_body().collect().await.unwrap().to_bytes()[..], b"<h1>Back soon</h1>");
//! # });
//! ```
//!
//! **`internal` locations** are the router's part: nginx's
//! `location = /maintenance.html { root /srv/app/static; internal; }` becomes a
//! [`Page::from_file`] of `/srv/app/static/maintenance.html`, and the router answers 404
//! to a client asking for an `internal` location directly (or simply has no such route:
//! the page is served from memory, not through the router).

use std::future::Future;
use std::io::{self, Read};
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use bytes::Bytes;
use http::header::{CONTENT_LENGTH, CONTENT_TYPE, RETRY_AFTER};
use http::{HeaderValue, StatusCode};
use pin_project_lite::pin_project;
use tower_layer::Layer;
use tower_service::Service;

use crate::body::{ProxyBody, Request, Response};
use crate::response::ErrorCause;

/// The largest page [`Page::from_file`] accepts: 1 MiB. Error pages are held in memory.
pub const MAX_PAGE_SIZE: u64 = 1024 * 1024;

/// One error page: its bytes, content type and optional replacement status.
#[derive(Debug, Clone)]
pub struct Page {
    body: Bytes,
    content_type: HeaderValue,
    status: Option<StatusCode>,
}

impl Page {
    /// Reads `path` now (blocking; call at configuration time). The content type comes from
    /// the extension (`.html`/`.htm`, `.json`, `.txt`, `.xml`, `.svg`, `.css`, `.js`;
    /// else `application/octet-stream`). Fails on I/O errors and on files larger than
    /// [`MAX_PAGE_SIZE`] (`InvalidData`).
    pub fn from_file(path: impl AsRef<Path>) -> io::Result<Page> {
        let path = path.as_ref();
        let file = std::fs::File::open(path)?;
        let mut buf = Vec::new();
        // Read one byte past the limit to tell "exactly the limit" from "larger".
        file.take(MAX_PAGE_SIZE + 1).read_to_end(&mut buf)?;
        if buf.len() as u64 > MAX_PAGE_SIZE {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "error page larger than 1 MiB",
            ));
        }
        let ext = path
            .extension()
            .and_then(|e| e.to_str())
            .map(str::to_ascii_lowercase);
        let content_type = match ext.as_deref() {
            Some("html" | "htm") => "text/html; charset=utf-8",
            Some("json") => "application/json",
            Some("txt") => "text/plain; charset=utf-8",
            Some("xml") => "application/xml",
            Some("svg") => "image/svg+xml",
            Some("css") => "text/css",
            Some("js") => "text/javascript",
            _ => "application/octet-stream",
        };
        Ok(Page {
            body: Bytes::from(buf),
            content_type: HeaderValue::from_static(content_type),
            status: None,
        })
    }

    /// A page from memory.
    pub fn from_bytes(body: impl Into<Bytes>, content_type: HeaderValue) -> Page {
        Page {
            body: body.into(),
            content_type,
            status: None,
        }
    }

    /// nginx `error_page 404 =200 PAGE`: answer with `status` instead of the original one.
    pub fn with_status(mut self, status: StatusCode) -> Page {
        self.status = Some(status);
        self
    }

    fn render(&self, original: Response) -> Response {
        let (parts, _dropped_body) = original.into_parts();
        let mut resp = Response::new(ProxyBody::full(self.body.clone()));
        *resp.status_mut() = self.status.unwrap_or(parts.status);
        *resp.extensions_mut() = parts.extensions;
        let h = resp.headers_mut();
        h.insert(CONTENT_TYPE, self.content_type.clone());
        h.insert(CONTENT_LENGTH, HeaderValue::from(self.body.len()));
        if let Some(v) = parts.headers.get(RETRY_AFTER) {
            h.insert(RETRY_AFTER, v.clone());
        }
        resp
    }
}

/// Which statuses get which page (one server's or location's `error_page` lines).
#[derive(Debug, Clone, Default)]
#[must_use]
pub struct ErrorPages {
    pages: Vec<(StatusCode, Arc<Page>)>,
    intercept_upstream: bool,
}

impl ErrorPages {
    /// No pages yet.
    pub fn new() -> Self {
        ErrorPages::default()
    }

    /// nginx `error_page CODE... PAGE`. Codes must be 300..=599 (nginx's rule); a code
    /// listed twice keeps its first page. Fails (`InvalidInput`) on another code.
    pub fn page(mut self, codes: impl IntoIterator<Item = u16>, page: Page) -> io::Result<Self> {
        let page = Arc::new(page);
        for code in codes {
            let status = StatusCode::from_u16(code)
                .ok()
                .filter(|s| (300..=599).contains(&s.as_u16()))
                .ok_or_else(|| {
                    io::Error::new(
                        io::ErrorKind::InvalidInput,
                        "error_page code not in 300..=599",
                    )
                })?;
            if !self.pages.iter().any(|(s, _)| *s == status) {
                self.pages.push((status, page.clone()));
            }
        }
        Ok(self)
    }

    /// nginx `proxy_intercept_errors on`: replace listed statuses from upstreams too, not
    /// only the proxy's own error answers. Default off.
    pub fn intercept_upstream(mut self, on: bool) -> Self {
        self.intercept_upstream = on;
        self
    }

    /// The answer the client gets instead of `resp` (`resp` itself when no page applies).
    pub fn apply(&self, resp: Response) -> Response {
        let status = resp.status();
        let page = self.pages.iter().find(|(s, _)| *s == status);
        match page {
            Some((_, page))
                if self.intercept_upstream || resp.extensions().get::<ErrorCause>().is_some() =>
            {
                page.render(resp)
            }
            _ => resp,
        }
    }
}

/// Replaces the bodies of error answers with [`ErrorPages`]. See the [module docs](self).
#[derive(Debug, Clone)]
pub struct ErrorPageLayer {
    pages: Arc<ErrorPages>,
}

impl ErrorPageLayer {
    /// A layer serving `pages`; every service it makes shares them.
    pub fn new(pages: ErrorPages) -> Self {
        ErrorPageLayer {
            pages: Arc::new(pages),
        }
    }
}

impl<S> Layer<S> for ErrorPageLayer {
    type Service = ErrorPage<S>;

    fn layer(&self, inner: S) -> ErrorPage<S> {
        ErrorPage {
            inner,
            pages: self.pages.clone(),
        }
    }
}

/// The service made by [`ErrorPageLayer`].
#[derive(Debug, Clone)]
pub struct ErrorPage<S> {
    inner: S,
    pages: Arc<ErrorPages>,
}

impl<S> Service<Request> for ErrorPage<S>
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
            pages: self.pages.clone(),
        }
    }
}

pin_project! {
    /// The future of [`ErrorPage`] responses.
    pub struct ResponseFuture<F> {
        #[pin]
        fut: F,
        pages: Arc<ErrorPages>,
    }
}

impl<F> std::fmt::Debug for ResponseFuture<F> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("error_page::ResponseFuture")
    }
}

impl<F, E> Future for ResponseFuture<F>
where
    F: Future<Output = Result<Response, E>>,
{
    type Output = Result<Response, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let resp = ready!(this.fut.poll(cx))?;
        Poll::Ready(Ok(this.pages.apply(resp)))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)] // tests may unwrap
mod tests {
    use super::*;
    use crate::error::{Error, Kind};
    use crate::response;

    fn pages() -> ErrorPages {
        ErrorPages::new()
            .page(
                [502, 503, 504],
                Page::from_bytes("down", HeaderValue::from_static("text/plain")),
            )
            .unwrap()
            .page(
                [404],
                Page::from_bytes("gif", HeaderValue::from_static("image/gif"))
                    .with_status(StatusCode::OK),
            )
            .unwrap()
    }

    #[test]
    fn only_generated_errors_by_default() {
        let p = pages();
        let mut generated = response::from_error(Error::new(Kind::UpstreamTimeout));
        generated
            .headers_mut()
            .insert(RETRY_AFTER, HeaderValue::from_static("5"));
        let out = p.apply(generated);
        assert_eq!(out.status(), 504);
        assert_eq!(out.headers()[CONTENT_TYPE], "text/plain");
        assert_eq!(out.headers()[CONTENT_LENGTH], "4");
        assert_eq!(out.headers()[RETRY_AFTER], "5");
        assert!(out.extensions().get::<ErrorCause>().is_some());

        // An upstream's own 503 passes through.
        let upstream = response::status(StatusCode::SERVICE_UNAVAILABLE);
        let out = p.apply(upstream);
        assert_eq!(out.headers()[CONTENT_TYPE], "text/plain; charset=utf-8");
        assert_eq!(out.headers()[CONTENT_LENGTH], "24");

        let out = p
            .intercept_upstream(true)
            .apply(response::status(StatusCode::NOT_FOUND));
        assert_eq!(out.status(), 200);
        assert_eq!(out.headers()[CONTENT_TYPE], "image/gif");
    }

    #[test]
    fn unlisted_status_untouched_and_bad_codes_refused() {
        let out = pages().apply(response::from_error(Error::new(Kind::BodyTooLarge)));
        assert_eq!(out.status(), 413);
        assert_eq!(out.headers()[CONTENT_TYPE], "text/plain; charset=utf-8");
        let page = Page::from_bytes("x", HeaderValue::from_static("text/plain"));
        assert!(ErrorPages::new().page([200], page.clone()).is_err());
        assert!(ErrorPages::new().page([600], page.clone()).is_err());
        assert!(ErrorPages::new().page([0], page).is_err());
    }

    #[test]
    fn file_pages_are_bounded_and_typed() {
        let dir = tempfile::tempdir().unwrap();
        let big = dir.path().join("big.html");
        std::fs::write(&big, vec![b'x'; MAX_PAGE_SIZE as usize + 1]).unwrap();
        assert_eq!(
            Page::from_file(&big).unwrap_err().kind(),
            io::ErrorKind::InvalidData
        );
        let exact = dir.path().join("exact.JSON");
        std::fs::write(&exact, vec![b'x'; MAX_PAGE_SIZE as usize]).unwrap();
        let page = Page::from_file(&exact).unwrap();
        assert_eq!(page.content_type, "application/json");
        assert_eq!(page.body.len() as u64, MAX_PAGE_SIZE);
        assert!(Page::from_file(dir.path().join("missing.html")).is_err());
    }
}
