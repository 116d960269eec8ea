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
                // hyper stops polling a body once it wrote Content-Length bytes and may
                // drop it without reading its end: a body that delivered all its declared
                // bytes is complete.
                let expected = resp
                    .headers()
                    .get(http::header::CONTENT_LENGTH)
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.parse::<u64>().ok())
                    .or_else(|| resp.body().size_hint().exact());
                Poll::Ready(Ok(resp.map(|body| {
                    // One box per logged response: every service speaks `ProxyBody`.
                    ProxyBody::boxed(ResponseBody {
                        inner: body,
                        log: Some((started, end)),
                        status: status.as_u16(),
                        bytes: 0,
                        expected,
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
        expected: Option<u64>,
        bodiless: bool,
    }

    impl<B> PinnedDrop for ResponseBody<B>
    where
        B: Body,
    {
        fn drop(this: Pin<&mut Self>) {
            let this = this.project();
            if let Some((started, end)) = this.log.take() {
                let complete = *this.bodiless
                    || this.inner.as_ref().get_ref().is_end_stream()
                    || *this.expected == Some(*this.bytes);
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

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use std::convert::Infallible;
    use std::num::NonZeroUsize;
    use std::sync::Mutex;
    use std::time::Duration;

    use http_body_util::{BodyExt, StreamBody};
    use tokio::io::AsyncWrite;
    use tower::{Layer, ServiceExt};

    use super::*;
    use crate::access_log::{AccessLogLayer, Format, Target};

    /// An in-memory target.
    #[derive(Clone, Default)]
    struct Mem(Arc<Mutex<Vec<u8>>>);

    impl Mem {
        fn text(&self) -> String {
            String::from_utf8(self.0.lock().unwrap().clone()).unwrap()
        }
    }

    impl AsyncWrite for Mem {
        fn poll_write(
            self: Pin<&mut Self>,
            _: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<std::io::Result<usize>> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Poll::Ready(Ok(buf.len()))
        }
        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
            Poll::Ready(Ok(()))
        }
        fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    fn writer(format: Format) -> (AccessLogWriter, Mem) {
        let mem = Mem::default();
        let w = AccessLogWriter::builder(Target::Writer(Box::new(mem.clone())))
            .format(format)
            .spawn()
            .unwrap();
        (w, mem)
    }

    fn req(method: http::Method, path: &str) -> Request {
        http::Request::builder()
            .method(method)
            .uri(path)
            .body(ProxyBody::empty())
            .unwrap()
    }

    fn ok(body: &'static str) -> Response {
        Response::new(ProxyBody::from(body))
    }

    #[tokio::test]
    async fn logs_status_bytes_upstream_and_route() {
        let (w, mem) = writer(Format::Json);
        let svc = AccessLogLayer::new(w.clone()).layer(tower::service_fn(|_req: Request| async {
            let mut resp = ok("hello");
            *resp.status_mut() = StatusCode::CREATED;
            resp.extensions_mut().insert(UpstreamInfo::new(
                "127.0.0.1:9".parse().unwrap(),
                Duration::from_millis(3),
            ));
            Ok::<_, Infallible>(resp)
        }));
        let mut r = req(http::Method::POST, "/x?y");
        r.extensions_mut().insert(Arc::new(Route {
            server: "s".into(),
            location: "/x".into(),
        }));
        let resp = svc.oneshot(r).await.unwrap();
        resp.into_body().collect().await.unwrap();
        w.flush().await.unwrap();
        let v: serde_json::Value = serde_json::from_str(mem.text().trim_end()).unwrap();
        assert_eq!(v["status"], 201);
        assert_eq!(v["method"], "POST");
        assert_eq!(v["uri"], "/x?y");
        assert_eq!(v["body_bytes_sent"], 5);
        assert_eq!(v["upstream_addr"], "127.0.0.1:9");
        assert_eq!(v["upstream_response_time"], 0.003);
        assert_eq!(v["location"], "/x");
        assert_eq!(v["remote_addr"], serde_json::Value::Null);
    }

    #[tokio::test]
    async fn client_gone_before_response_is_499() {
        let (w, mem) = writer(Format::Combined);
        let svc = AccessLogLayer::new(w.clone()).layer(tower::service_fn(|_req: Request| {
            std::future::pending::<Result<Response, Infallible>>()
        }));
        let fut = svc.oneshot(req(http::Method::GET, "/slow"));
        let _ = tokio::time::timeout(Duration::from_millis(1), fut).await;
        w.flush().await.unwrap();
        assert!(
            mem.text().contains("\"GET /slow HTTP/1.1\" 499 0 "),
            "{}",
            mem.text()
        );
    }

    #[tokio::test]
    async fn client_gone_mid_body_is_499_with_bytes_sent() {
        let (w, mem) = writer(Format::Combined);
        let (tx, rx) = tokio::sync::mpsc::channel::<Result<Frame<Bytes>, Error>>(4);
        let body = Mutex::new(Some(rx));
        let svc =
            AccessLogLayer::new(w.clone()).layer(tower::service_fn(move |_req: Request| {
                let rx = body.lock().unwrap().take().unwrap();
                let stream = futures_util::stream::unfold(rx, |mut rx| async move {
                    rx.recv().await.map(|f| (f, rx))
                });
                async move {
                    Ok::<_, Infallible>(Response::new(ProxyBody::boxed(StreamBody::new(stream))))
                }
            }));
        let resp = svc
            .oneshot(req(http::Method::GET, "/stream"))
            .await
            .unwrap();
        let mut body = resp.into_body();
        tx.send(Ok(Frame::data(Bytes::from_static(b"abc"))))
            .await
            .unwrap();
        let first = body.frame().await.unwrap().unwrap();
        assert_eq!(first.into_data().unwrap(), "abc");
        drop(body);
        w.flush().await.unwrap();
        assert!(
            mem.text().contains("\"GET /stream HTTP/1.1\" 499 3 "),
            "{}",
            mem.text()
        );
    }

    #[tokio::test]
    async fn unread_body_of_head_and_204_is_not_499() {
        let (w, mem) = writer(Format::Combined);
        let svc =
            AccessLogLayer::new(w.clone()).layer(tower::service_fn(|req: Request| async move {
                let mut resp = Response::new(ProxyBody::boxed(StreamBody::new(
                    futures_util::stream::pending::<Result<Frame<Bytes>, Error>>(),
                )));
                if req.uri().path() == "/nc" {
                    *resp.status_mut() = StatusCode::NO_CONTENT;
                }
                Ok::<_, Infallible>(resp)
            }));
        drop(
            svc.clone()
                .oneshot(req(http::Method::HEAD, "/h"))
                .await
                .unwrap(),
        );
        drop(svc.oneshot(req(http::Method::GET, "/nc")).await.unwrap());
        w.flush().await.unwrap();
        let text = mem.text();
        assert!(text.contains("\"HEAD /h HTTP/1.1\" 200 0 "), "{text}");
        assert!(text.contains("\"GET /nc HTTP/1.1\" 204 0 "), "{text}");
    }

    #[tokio::test]
    async fn off_logs_nothing() {
        let (w, mem) = writer(Format::Combined);
        let svc = AccessLogLayer::off().layer(tower::service_fn(|_req: Request| async {
            Ok::<_, Infallible>(ok("x"))
        }));
        let resp = svc.oneshot(req(http::Method::GET, "/")).await.unwrap();
        resp.into_body().collect().await.unwrap();
        w.flush().await.unwrap();
        assert_eq!(mem.text(), "");
    }

    #[tokio::test]
    async fn full_queue_drops_and_counts_without_waiting() {
        let mem = Mem::default();
        // The task is never run: the queue fills up.
        let (w, _task) = AccessLogWriter::builder(Target::Writer(Box::new(mem.clone())))
            .queue(NonZeroUsize::new(2).unwrap())
            .build()
            .unwrap();
        let svc = AccessLogLayer::new(w.clone()).layer(tower::service_fn(|_req: Request| async {
            Ok::<_, Infallible>(ok("x"))
        }));
        for _ in 0..5 {
            let resp = svc
                .clone()
                .oneshot(req(http::Method::GET, "/"))
                .await
                .unwrap();
            resp.into_body().collect().await.unwrap();
        }
        assert_eq!(w.stats().dropped(), 3);
        assert_eq!(w.stats().written(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn buffered_lines_are_written_on_the_flush_interval() {
        let mem = Mem::default();
        let w = AccessLogWriter::builder(Target::Writer(Box::new(mem.clone())))
            .flush(Duration::from_secs(5))
            .spawn()
            .unwrap();
        let svc = AccessLogLayer::new(w.clone()).layer(tower::service_fn(|_req: Request| async {
            Ok::<_, Infallible>(ok("x"))
        }));
        let resp = svc.oneshot(req(http::Method::GET, "/")).await.unwrap();
        resp.into_body().collect().await.unwrap();
        tokio::time::sleep(Duration::from_millis(4900)).await;
        assert_eq!(mem.text(), "", "written before the flush interval");
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert_eq!(mem.text().lines().count(), 1);
        assert_eq!(w.stats().written(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_full_buffer_is_written_at_once() {
        let mem = Mem::default();
        let w = AccessLogWriter::builder(Target::Writer(Box::new(mem.clone())))
            .buffer(0)
            .flush(Duration::from_secs(3600))
            .spawn()
            .unwrap();
        let svc = AccessLogLayer::new(w.clone()).layer(tower::service_fn(|_req: Request| async {
            Ok::<_, Infallible>(ok("x"))
        }));
        let resp = svc.oneshot(req(http::Method::GET, "/")).await.unwrap();
        resp.into_body().collect().await.unwrap();
        // No flush call and no time passing: only the task's own turns.
        for _ in 0..100 {
            if !mem.text().is_empty() {
                break;
            }
            tokio::task::yield_now().await;
        }
        assert_eq!(mem.text().lines().count(), 1);
    }

    #[tokio::test]
    async fn the_task_ends_with_a_last_flush_when_handles_are_gone() {
        let mem = Mem::default();
        let (w, task) = AccessLogWriter::builder(Target::Writer(Box::new(mem.clone())))
            .build()
            .unwrap();
        let task = tokio::spawn(task);
        let svc = AccessLogLayer::new(w).layer(tower::service_fn(|_req: Request| async {
            Ok::<_, Infallible>(ok("x"))
        }));
        let resp = svc.oneshot(req(http::Method::GET, "/")).await.unwrap();
        resp.into_body().collect().await.unwrap();
        tokio::time::timeout(Duration::from_secs(5), task)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(mem.text().lines().count(), 1);
    }
}
