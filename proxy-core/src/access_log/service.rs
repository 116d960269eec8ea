//! [`AccessLog`]: the service, its [`ResponseFuture`] and the response body that logs
//! when it ends.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::SystemTime;

use bytes::Bytes;
use http::header::{REFERER, USER_AGENT};
use http::StatusCode;
use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;
use tokio::time::Instant;

use crate::access_log::format::Record;
use crate::access_log::{AccessLogWriter, UpstreamInfo};
use crate::body::{ProxyBody, Request, Response};
use crate::client_info::client_ip;
use crate::error::Error;
use crate::router::Route;

/// nginx's "client closed request": logged when the client went away before the
/// response was complete.
const CLIENT_CLOSED: u16 = 499;

/// Logs each request of the inner service when its response ends. See the
/// [module docs](crate::access_log).
#[derive(Debug, Clone)]
pub struct AccessLog<S> {
    inner: S,
    writer: Option<AccessLogWriter>,
}

impl<S> AccessLog<S> {
    /// Wrap `inner`, logging to `writer` (`None`: log nothing).
    pub fn new(inner: S, writer: Option<AccessLogWriter>) -> Self {
        AccessLog { inner, writer }
    }

    /// The wrapped service.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }
}

impl<S> tower_service::Service<Request> for AccessLog<S>
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
        let started = self.writer.as_ref().map(|w| Started::new(w.clone(), &req));
        ResponseFuture {
            inner: self.inner.call(req),
            started,
        }
    }
}

/// What is known of a request when it arrives; cheap clones only (header values and
/// the URI share their bytes), formatting happens in the writer task.
struct Started {
    writer: AccessLogWriter,
    start: Instant,
    client: Option<std::net::IpAddr>,
    method: http::Method,
    uri: http::Uri,
    version: http::Version,
    referer: Option<http::HeaderValue>,
    user_agent: Option<http::HeaderValue>,
    route: Option<Arc<Route>>,
}

impl Started {
    fn new(writer: AccessLogWriter, req: &Request) -> Self {
        Started {
            writer,
            start: Instant::now(),
            client: client_ip(req),
            method: req.method().clone(),
            uri: req.uri().clone(),
            version: req.version(),
            referer: req.headers().get(REFERER).cloned(),
            user_agent: req.headers().get(USER_AGENT).cloned(),
            route: req.extensions().get::<Arc<Route>>().cloned(),
        }
    }

    fn finish(self, end: &End, bytes: u64, status: u16) {
        let Started {
            writer,
            start,
            client,
            method,
            uri,
            version,
            referer,
            user_agent,
            route,
        } = self;
        writer.log(Record {
            time: SystemTime::now(),
            request_time: start.elapsed(),
            client,
            method,
            uri,
            version,
            referer,
            user_agent,
            status,
            bytes,
            upstream: end.upstream,
            route: route.or_else(|| end.route.clone()),
        });
    }
}

/// What the response said about itself.
#[derive(Default)]
struct End {
    upstream: Option<UpstreamInfo>,
    route: Option<Arc<Route>>,
}

pin_project! {
    /// The future of an [`AccessLog`] call. Dropped before the inner service answered
    /// (the client went away), it logs a 499.
    pub struct ResponseFuture<F> {
        #[pin]
        inner: F,
        started: Option<Started>,
    }

    impl<F> PinnedDrop for ResponseFuture<F> {
        fn drop(this: Pin<&mut Self>) {
            if let Some(started) = this.project().started.take() {
                started.finish(&End::default(), 0, CLIENT_CLOSED);
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
        let res = match this.inner.poll(cx) {
            Poll::Pending => return Poll::Pending,
            Poll::Ready(res) => res,
        };
        let Some(started) = this.started.take() else {
            return Poll::Ready(res);
        };
        match res {
            Ok(resp) => {
                let end = End {
                    upstream: resp.extensions().get::<UpstreamInfo>().copied(),
                    route: resp.extensions().get::<Arc<Route>>().cloned(),
                };
                let status = resp.status();
                // Responses that carry no body by definition: hyper drops their body
                // unread, which is no sign of a client gone.
                let bodiless = started.method == http::Method::HEAD
                    || status.is_informational()
                    || status == StatusCode::NO_CONTENT
                    || status == StatusCode::NOT_MODIFIED;
                Poll::Ready(Ok(resp.map(|body| {
                    // One box per logged response: every service speaks `ProxyBody`.
                    ProxyBody::boxed(ResponseBody {
                        inner: body,
                        log: Some((started, end)),
                        status: status.as_u16(),
                        bytes: 0,
                        bodiless,
                    })
                })))
            }
            Err(e) => {
                // A service error reaches the server as a dropped connection.
                started.finish(&End::default(), 0, 500);
                Poll::Ready(Err(e))
            }
        }
    }
}

pin_project! {
    /// A response body that logs its request when it ends, or when it is dropped
    /// before the end (a 499: the client went away mid-body).
    struct ResponseBody<B>
    where
        B: Body,
    {
        #[pin]
        inner: B,
        log: Option<(Started, End)>,
        status: u16,
        bytes: u64,
        bodiless: bool,
    }

    impl<B> PinnedDrop for ResponseBody<B>
    where
        B: Body,
    {
        fn drop(this: Pin<&mut Self>) {
            let this = this.project();
            if let Some((started, end)) = this.log.take() {
                let complete = *this.bodiless || this.inner.as_ref().get_ref().is_end_stream();
                let status = if complete { *this.status } else { CLIENT_CLOSED };
                started.finish(&end, *this.bytes, status);
            }
        }
    }
}

impl<B> Body for ResponseBody<B>
where
    B: Body<Data = Bytes, Error = Error>,
{
    type Data = Bytes;
    type Error = Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Error>>> {
        let mut this = self.project();
        let frame = std::task::ready!(this.inner.as_mut().poll_frame(cx));
        let done = match &frame {
            Some(Ok(f)) => {
                if let Some(data) = f.data_ref() {
                    *this.bytes += data.len() as u64;
                }
                this.inner.is_end_stream()
            }
            // The body failed (an upstream cut it short): the client got the status
            // and a truncated body, which is what nginx logs too.
            Some(Err(_)) | None => true,
        };
        if done {
            if let Some((started, end)) = this.log.take() {
                started.finish(&end, *this.bytes, *this.status);
            }
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
