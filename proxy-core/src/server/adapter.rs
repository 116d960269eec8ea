//! The adapter between hyper's connection and the proxy's tower service: it converts the
//! body, attaches [`ClientInfo`], refuses ambiguous framing, counts requests per
//! connection and turns [`CloseConnection`] into a dropped connection.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU32, Ordering};
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

/// One connection's service.
#[derive(Clone)]
pub(crate) struct Adapter<S> {
    inner: S,
    info: ClientInfo,
    served: Arc<AtomicU32>,
    max_requests: u32,
}

impl<S> Adapter<S> {
    pub(crate) fn new(inner: S, info: ClientInfo, max_requests: u32) -> Self {
        Adapter {
            inner,
            info,
            served: Arc::new(AtomicU32::new(0)),
            max_requests,
        }
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
        let n = self.served.fetch_add(1, Ordering::Relaxed) + 1;
        // `Connection: close` only means something on HTTP/1.x.
        let last = n >= self.max_requests && req.version() <= Version::HTTP_11;
        let mut req = req.map(ProxyBody::from);
        if let Some(resp) = reject_framing(&req) {
            return AdapterFuture::Ready {
                resp: Some(resp),
                last: true,
            };
        }
        req.extensions_mut().insert(self.info.clone());
        AdapterFuture::Call {
            fut: self.inner.clone().oneshot(req),
            last,
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

pin_project! {
    /// The future of one request on a connection.
    #[project = AdapterProj]
    pub(crate) enum AdapterFuture<S: tower_service::Service<Request>> {
        Call { #[pin] fut: Oneshot<S, Request>, last: bool },
        Ready { resp: Option<Response>, last: bool },
    }
}

impl<S> Future for AdapterFuture<S>
where
    S: tower_service::Service<Request, Response = Response, Error = Infallible>,
{
    type Output = Result<Response, Closed>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let (resp, last) = match self.project() {
            AdapterProj::Call { fut, last } => match fut.poll(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Ok(resp)) => (resp, *last),
                Poll::Ready(Err(never)) => match never {},
            },
            AdapterProj::Ready { resp, last } => match resp.take() {
                Some(resp) => (resp, *last),
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
        Poll::Ready(Ok(resp))
    }
}
