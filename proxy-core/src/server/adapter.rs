//! The adapter between hyper's connection and the proxy's tower service: it converts the
//! body, attaches [`ClientInfo`], refuses ambiguous framing, counts requests per
//! connection and turns [`CloseConnection`] into a dropped connection.
//!
//! On a parking HTTP/1 connection (see `h1.rs`) it also records, in [`ConnState`], what
//! the connection driver needs to know to take the connection back from hyper between
//! requests: whether every request read so far has its response head, whether the last
//! request's body was read to its end, and whether the connection must close.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use http::header::{HeaderValue, CONNECTION, CONTENT_LENGTH, TRANSFER_ENCODING};
use http::Version;
use pin_project_lite::pin_project;
use tower::util::Oneshot;
use tower::ServiceExt;

use crate::body::{ProxyBody, Request, Response};
use crate::client_info::ClientInfo;
use crate::response::{self, CloseConnection};

/// The error that makes hyper drop a connection without answering (`return 444`).
#[derive(Debug)]
pub(crate) struct Closed;

impl std::fmt::Display for Closed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("connection closed by the proxy")
    }
}

impl std::error::Error for Closed {}

/// What one connection's requests tell its driver; shared by the adapter, the futures
/// and bodies of its requests, and the driver. One allocation per connection.
///
/// Atomics only because hyper wants a `Send + Sync` service; every access is from the
/// connection's own task, so `Relaxed` is enough.
#[derive(Debug)]
pub(crate) struct ConnState {
    /// Requests handed to the service.
    served: AtomicU32,
    /// Requests whose response head hyper has (the service's future resolved).
    responded: AtomicU32,
    /// The connection must close after the current response: the client or the response
    /// asked for it, or the request limit was reached.
    close: AtomicBool,
    /// The last request's body was read to its end (or it had none).
    body_done: AtomicBool,
    /// A 101 response was produced: the I/O belongs to the upgrade from now on.
    upgraded: AtomicBool,
}

impl ConnState {
    pub(crate) fn new() -> Arc<Self> {
        Arc::new(ConnState {
            served: AtomicU32::new(0),
            responded: AtomicU32::new(0),
            close: AtomicBool::new(false),
            body_done: AtomicBool::new(true),
            upgraded: AtomicBool::new(false),
        })
    }

    /// Requests handed to the service so far.
    pub(crate) fn served(&self) -> u32 {
        self.served.load(Ordering::Relaxed)
    }

    /// Whether every request handed to the service has its response head.
    pub(crate) fn all_responded(&self) -> bool {
        self.responded.load(Ordering::Relaxed) == self.served.load(Ordering::Relaxed)
    }

    /// Whether the connection is at a clean message boundary that may be kept: the last
    /// request body was read whole and nobody asked to close.
    pub(crate) fn reusable(&self) -> bool {
        self.body_done.load(Ordering::Relaxed)
            && !self.close.load(Ordering::Relaxed)
            && !self.upgraded.load(Ordering::Relaxed)
    }

    /// Whether the connection was upgraded.
    pub(crate) fn upgraded(&self) -> bool {
        self.upgraded.load(Ordering::Relaxed)
    }

    /// Called by a watched request body when it has been read to its end.
    pub(crate) fn request_body_read(&self) {
        self.body_done.store(true, Ordering::Relaxed);
    }
}

/// One connection's service.
#[derive(Clone)]
pub(crate) struct Adapter<S> {
    inner: S,
    info: ClientInfo,
    state: Arc<ConnState>,
    max_requests: u32,
    /// Record what the parking HTTP/1 driver needs (see [`ConnState`]).
    park: bool,
}

impl<S> Adapter<S> {
    pub(crate) fn new(
        inner: S,
        info: ClientInfo,
        max_requests: u32,
        state: Arc<ConnState>,
    ) -> Self {
        Adapter {
            inner,
            info,
            state,
            max_requests,
            park: false,
        }
    }

    /// The connection facts every request of this connection carries.
    pub(crate) fn info(&self) -> &ClientInfo {
        &self.info
    }

    /// The connection facts, for the acceptor to refine (PROXY protocol, TLS) before
    /// the first request.
    pub(crate) fn info_mut(&mut self) -> &mut ClientInfo {
        &mut self.info
    }

    /// Record what the parking HTTP/1 driver needs on each HTTP/1 request.
    pub(crate) fn set_park(&mut self, on: bool) {
        self.park = on;
    }
}

impl<S> hyper::service::Service<http::Request<hyper::body::Incoming>> for Adapter<S>
where
    S: tower_service::Service<Request, Response = Response, Error = Infallible> + Clone,
{
    type Response = Response;
    type Error = Closed;
    type Future = AdapterFuture<S>;

    fn call(&self, req: http::Request<hyper::body::Incoming>) -> Self::Future {
        let n = self.state.served.fetch_add(1, Ordering::Relaxed) + 1;
        // `Connection: close` only means something on HTTP/1.x.
        let h1 = req.version() <= Version::HTTP_11;
        let last = n >= self.max_requests && h1;
        let watch = self.park && h1;
        let mut req = if watch {
            if last || client_closes(&req) {
                self.state.close.store(true, Ordering::Relaxed);
            }
            let (parts, body) = req.into_parts();
            let done = http_body::Body::is_end_stream(&body);
            self.state.body_done.store(done, Ordering::Relaxed);
            let body = if done {
                ProxyBody::from(body)
            } else {
                ProxyBody::watched(body, self.state.clone())
            };
            Request::from_parts(parts, body)
        } else {
            req.map(ProxyBody::from)
        };
        let state = watch.then(|| self.state.clone());
        if let Some(resp) = reject_framing(&req) {
            return AdapterFuture::Ready {
                resp: Some(resp),
                last: true,
                state,
            };
        }
        req.extensions_mut().insert(self.info.clone());
        AdapterFuture::Call {
            fut: self.inner.clone().oneshot(req),
            last,
            state,
        }
    }
}

/// RFC 9112 §6.1/§6.3: refuse framing a strict parser could read differently.
///
/// - Transfer-Encoding with Content-Length, in two lines, or on HTTP/1.0: 400 (hyper drops the
///   Content-Length itself, but a request that sends both is not to be trusted).
/// - `chunked` absent, not last or repeated: 400 (the length cannot be determined).
/// - Other codings before a final `chunked`: 501, as nginx answers. hyper would
///   decode the chunked layer and the hop-by-hop strip would drop the header, so an
///   upstream would get still-compressed bytes as a plain body.
///
/// Both close the connection.
fn reject_framing(req: &Request) -> Option<Response> {
    let h = req.headers();
    let mut te = h.get_all(TRANSFER_ENCODING).iter();
    let first = te.next()?;
    let repeated = te.next().is_some();
    if repeated || h.contains_key(CONTENT_LENGTH) || req.version() == Version::HTTP_10 {
        return Some(response::bad_request());
    }
    let value = first.to_str().unwrap_or("");
    let codings: Vec<&str> = value
        .split(',')
        .map(|c| c.trim_matches([' ', '\t']))
        .collect();
    let chunked = |c: &&str| c.eq_ignore_ascii_case("chunked");
    match codings.as_slice() {
        [only] if chunked(only) => return None,
        // chunked last and only once, after codings we do not decode: 501.
        [rest @ .., last] if chunked(last) && !rest.iter().any(chunked) => {}
        // chunked missing, not last, or repeated: the length cannot be known (§6.3).
        _ => return Some(response::bad_request()),
    }
    let mut resp = response::status(http::StatusCode::NOT_IMPLEMENTED);
    resp.headers_mut()
        .insert(CONNECTION, HeaderValue::from_static("close"));
    Some(resp)
}

/// Whether an HTTP/1 request ends its connection: HTTP/1.0 without `Connection:
/// keep-alive`, or a `close` token in `Connection` (RFC 9112 §9.3), as hyper decides it.
fn client_closes<B>(req: &http::Request<B>) -> bool {
    let mut keep_alive = false;
    for value in req.headers().get_all(CONNECTION) {
        let Ok(value) = value.to_str() else { continue };
        for token in value.split(',').map(|t| t.trim_matches([' ', '\t'])) {
            if token.eq_ignore_ascii_case("close") {
                return true;
            }
            keep_alive |= token.eq_ignore_ascii_case("keep-alive");
        }
    }
    req.version() == Version::HTTP_10 && !keep_alive
}

/// Whether a response's `Connection` header has the `close` token.
fn response_closes(resp: &Response) -> bool {
    resp.headers().get_all(CONNECTION).iter().any(|v| {
        v.to_str().is_ok_and(|v| {
            v.split(',')
                .any(|t| t.trim_matches([' ', '\t']).eq_ignore_ascii_case("close"))
        })
    })
}

pin_project! {
    /// The future of one request on a connection.
    #[project = AdapterProj]
    pub(crate) enum AdapterFuture<S: tower_service::Service<Request>> {
        Call { #[pin] fut: Oneshot<S, Request>, last: bool, state: Option<Arc<ConnState>> },
        Ready { resp: Option<Response>, last: bool, state: Option<Arc<ConnState>> },
    }
}

impl<S> Future for AdapterFuture<S>
where
    S: tower_service::Service<Request, Response = Response, Error = Infallible>,
{
    type Output = Result<Response, Closed>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let (resp, last, state) = match self.project() {
            AdapterProj::Call { fut, last, state } => match fut.poll(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Ok(resp)) => (resp, *last, state.take()),
                Poll::Ready(Err(never)) => match never {},
            },
            AdapterProj::Ready { resp, last, state } => match resp.take() {
                Some(resp) => (resp, *last, state.take()),
                None => return Poll::Ready(Err(Closed)),
            },
        };
        if resp.extensions().get::<CloseConnection>().is_some() {
            return Poll::Ready(Err(Closed));
        }
        let mut resp = resp;
        if last {
            resp.headers_mut()
                .insert(CONNECTION, HeaderValue::from_static("close"));
        }
        if let Some(state) = state {
            // hyper encodes this head in the poll that takes it: from here on the
            // driver may tell hyper to end the connection after this message.
            if resp.status() == http::StatusCode::SWITCHING_PROTOCOLS {
                state.upgraded.store(true, Ordering::Relaxed);
            } else if last || response_closes(&resp) {
                state.close.store(true, Ordering::Relaxed);
            }
            state.responded.fetch_add(1, Ordering::Relaxed);
        }
        Poll::Ready(Ok(resp))
    }
}
