//! [`RequestBuffer`]: nginx's `proxy_request_buffering on`.

use std::future::Future;
use std::io;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::{Bytes, BytesMut};
use http::header::{HeaderValue, CONNECTION, CONTENT_LENGTH, TRANSFER_ENCODING};
use http::HeaderMap;
use http_body::Body;
use pin_project_lite::pin_project;
use tokio::fs::File;
use tokio::io::AsyncWrite;
use tower_layer::Layer;
use tower_service::Service;

use crate::body::{ProxyBody, Request, Response};
use crate::buffer::spill::{self, FileBody};
use crate::error::{Error, Kind};
use crate::response;

#[derive(Debug, Clone)]
struct Config {
    max_body_size: u64,
    memory: usize,
    temp_dir: Arc<Path>,
}

/// Reads each request body completely before the inner service sees the request: see
/// [`RequestBuffer`].
#[derive(Debug, Clone)]
pub struct RequestBufferLayer {
    config: Arc<Config>,
}

impl Default for RequestBufferLayer {
    fn default() -> Self {
        Self::new()
    }
}

impl RequestBufferLayer {
    /// nginx's defaults: bodies up to 1 MiB (`client_max_body_size 1m`), the first 16 KiB
    /// in memory (`client_body_buffer_size 16k`), the rest in the system's temporary
    /// directory.
    pub fn new() -> Self {
        RequestBufferLayer {
            config: Arc::new(Config {
                max_body_size: 1024 * 1024,
                memory: 16 * 1024,
                temp_dir: Arc::from(std::env::temp_dir()),
            }),
        }
    }

    fn config_mut(&mut self) -> &mut Config {
        Arc::make_mut(&mut self.config)
    }

    /// Largest body accepted, in bytes (413 beyond); 0 is unlimited, every byte past the
    /// memory part then goes to disk. Use the same value as a [`BodyLimitLayer`]
    /// in front, if any.
    ///
    /// [`BodyLimitLayer`]: crate::buffer::BodyLimitLayer
    pub fn max_body_size(mut self, max: u64) -> Self {
        self.config_mut().max_body_size = max;
        self
    }

    /// How much of a body is kept in memory before it is spilled to a temporary file
    /// (nginx's `client_body_buffer_size`). A body that fits is handed on as one buffer,
    /// which the balancer can replay on another upstream.
    pub fn memory_limit(mut self, bytes: usize) -> Self {
        self.config_mut().memory = bytes;
        self
    }

    /// Where spill files are created (nginx's `client_body_temp_path`).
    pub fn temp_dir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.config_mut().temp_dir = Arc::from(dir.into());
        self
    }
}

impl<S> Layer<S> for RequestBufferLayer {
    type Service = RequestBuffer<S>;

    fn layer(&self, inner: S) -> RequestBuffer<S> {
        RequestBuffer {
            inner,
            config: self.config.clone(),
        }
    }
}

/// Reads the whole request body (bounded) before calling the inner service, so a slow
/// upload never holds an upstream connection, and a body that fits in memory can be
/// retried on another upstream.
///
/// The body is handed on with a `Content-Length` (never chunked): as
/// [`ProxyBody::full`] when it fit in memory, as a body streamed from an unlinked
/// temporary file otherwise. Failures while reading are answered here: 413 (too large),
/// 408 (the client's body timed out, when a [`ClientBodyTimeoutLayer`] is in front), 500
/// (the temporary file failed); a client that went away gets nothing.
///
/// [`ClientBodyTimeoutLayer`]: crate::timeout::ClientBodyTimeoutLayer
#[derive(Debug, Clone)]
pub struct RequestBuffer<S> {
    inner: S,
    config: Arc<Config>,
}

impl<S> Service<Request> for RequestBuffer<S>
where
    S: Service<Request, Response = Response> + Clone,
{
    type Response = Response;
    type Error = S::Error;
    type Future = ResponseFuture<S>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request) -> Self::Future {
        // Collect counts the bytes itself: only the declared length is checked here.
        let req = match crate::buffer::limit::check(req, self.config.max_body_size, false) {
            Ok(req) => req,
            Err(crate::buffer::limit::TooLarge) => {
                return ResponseFuture {
                    state: State::Done {
                        resp: Some(crate::buffer::limit::too_large()),
                    },
                }
            }
        };
        // Nothing to read, or already in memory: no detour.
        if req.body().is_end_stream() || req.body().try_clone().is_some() {
            return ResponseFuture {
                state: State::Calling {
                    fut: self.inner.call(req),
                },
            };
        }
        // The service that was made ready goes with the future; this one gets a clone.
        let clone = self.inner.clone();
        let svc = std::mem::replace(&mut self.inner, clone);
        let (parts, body) = req.into_parts();
        let expected = body.size_hint().exact();
        ResponseFuture {
            state: State::Collecting {
                collect: Collect::new(body, expected, self.config.clone()),
                rest: Some((svc, parts)),
            },
        }
    }
}

pin_project! {
    /// The response future of [`RequestBuffer`].
    pub struct ResponseFuture<S: Service<Request>> {
        #[pin]
        state: State<S, S::Future>,
    }
}

pin_project! {
    #[project = StateProj]
    enum State<S, F> {
        Collecting { collect: Collect, rest: Option<(S, http::request::Parts)> },
        Calling { #[pin] fut: F },
        Done { resp: Option<Response> },
    }
}

impl<S: Service<Request>> std::fmt::Debug for ResponseFuture<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("request_buffer::ResponseFuture")
    }
}

impl<S> Future for ResponseFuture<S>
where
    S: Service<Request, Response = Response>,
{
    type Output = Result<Response, S::Error>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        loop {
            let next = match self.as_mut().project().state.project() {
                StateProj::Calling { fut } => return fut.poll(cx),
                StateProj::Done { resp } => {
                    return Poll::Ready(Ok(resp.take().unwrap_or_else(|| {
                        response::status(http::StatusCode::INTERNAL_SERVER_ERROR)
                    })))
                }
                StateProj::Collecting { collect, rest } => {
                    let outcome = std::task::ready!(collect.poll(cx));
                    match (outcome, rest.take()) {
                        (Ok((body, len)), Some((mut svc, mut parts))) => {
                            parts.headers.remove(TRANSFER_ENCODING);
                            parts.headers.insert(CONTENT_LENGTH, HeaderValue::from(len));
                            State::Calling {
                                fut: svc.call(Request::from_parts(parts, body)),
                            }
                        }
                        (Err(e), _) => State::Done {
                            resp: Some(failure(e)),
                        },
                        (Ok(_), None) => State::Done { resp: None },
                    }
                }
            };
            self.as_mut().project().state.set(next);
        }
    }
}

fn failure(e: Error) -> Response {
    match e.kind() {
        Kind::Internal => tracing::warn!(error = %e, "request buffering failed"),
        _ => tracing::debug!(error = %e, "reading the request body failed"),
    }
    let close = e.side() == crate::error::Side::Downstream;
    let mut resp = response::from_error(e);
    if close {
        resp.headers_mut()
            .insert(CONNECTION, HeaderValue::from_static("close"));
    }
    resp
}

/// Reading a body into memory, then into a spill file.
struct Collect {
    body: ProxyBody,
    config: Arc<Config>,
    mem: BytesMut,
    total: u64,
    trailers: Option<HeaderMap>,
    spill: Spill,
}

/// Creating a spill file (the writer and reader descriptors).
type Opening = Pin<Box<dyn Future<Output = io::Result<(File, File)>> + Send>>;

// The file variant is the large one and the one every spilled body ends in; boxing it
// would only add an allocation next to the file's own.
#[allow(clippy::large_enum_variant)]
enum Spill {
    /// Everything so far is in `mem`.
    Memory,
    /// Creating the file; `next` is the chunk that did not fit in memory. (Boxed: it
    /// happens once per spilled body, next to the cost of a file.)
    Opening { open: Opening, next: Bytes },
    /// Appending to the file: `pending`, then `queued`, are still to be written;
    /// `ended` once the body has.
    Writing {
        writer: File,
        reader: Option<File>,
        pending: Bytes,
        queued: Bytes,
        ended: bool,
    },
}

impl Collect {
    fn new(body: ProxyBody, expected: Option<u64>, config: Arc<Config>) -> Self {
        // Allocate for what is announced, within the memory part.
        let cap = expected
            .map_or(0, |n| usize::try_from(n).unwrap_or(usize::MAX))
            .min(config.memory);
        Collect {
            body,
            mem: BytesMut::with_capacity(cap),
            config,
            total: 0,
            trailers: None,
            spill: Spill::Memory,
        }
    }

    /// Drive to the end of the body: the body to hand on and its length.
    fn poll(&mut self, cx: &mut Context<'_>) -> Poll<Result<(ProxyBody, u64), Error>> {
        loop {
            match &mut self.spill {
                Spill::Memory => {}
                Spill::Opening { open, next } => {
                    let (writer, reader) = std::task::ready!(open.as_mut().poll(cx))?;
                    // The memory part goes first, then the chunk that overflowed it.
                    self.spill = Spill::Writing {
                        writer,
                        reader: Some(reader),
                        pending: std::mem::take(&mut self.mem).freeze(),
                        queued: std::mem::take(next),
                        ended: false,
                    };
                    continue;
                }
                Spill::Writing {
                    pending, queued, ..
                } if pending.is_empty() && !queued.is_empty() => {
                    *pending = std::mem::take(queued);
                    continue;
                }
                Spill::Writing {
                    writer, pending, ..
                } if !pending.is_empty() => {
                    let n = std::task::ready!(Pin::new(writer).poll_write(cx, pending))?;
                    if n == 0 {
                        return Poll::Ready(Err(io::Error::from(io::ErrorKind::WriteZero).into()));
                    }
                    let _ = pending.split_to(n);
                    continue;
                }
                Spill::Writing {
                    writer,
                    reader,
                    ended: true,
                    ..
                } => {
                    // tokio's file writes complete in the background: flush before the
                    // reader may look.
                    std::task::ready!(Pin::new(writer).poll_flush(cx))?;
                    let reader = reader.take().ok_or_else(|| Error::new(Kind::Internal))?;
                    let body = FileBody::new(reader, self.total, self.trailers.take());
                    return Poll::Ready(Ok((ProxyBody::boxed(body), self.total)));
                }
                Spill::Writing { .. } => {}
            }
            let frame = std::task::ready!(Pin::new(&mut self.body).poll_frame(cx));
            let data = match frame {
                None => match &mut self.spill {
                    Spill::Writing { ended, .. } => {
                        *ended = true;
                        continue;
                    }
                    _ => return Poll::Ready(Ok(self.in_memory())),
                },
                Some(frame) => match frame?.into_data() {
                    Ok(data) => data,
                    Err(frame) => {
                        if let Ok(t) = frame.into_trailers() {
                            self.trailers = Some(t);
                        }
                        continue;
                    }
                },
            };
            self.total += data.len() as u64;
            if self.config.max_body_size != 0 && self.total > self.config.max_body_size {
                return Poll::Ready(Err(Error::new(Kind::BodyTooLarge)));
            }
            match &mut self.spill {
                Spill::Memory if self.mem.len() + data.len() <= self.config.memory => {
                    self.mem.extend_from_slice(&data);
                }
                Spill::Memory => {
                    self.spill = Spill::Opening {
                        open: Box::pin(spill::create(self.config.temp_dir.clone())),
                        next: data,
                    };
                }
                // Only reached with nothing pending (see above).
                Spill::Writing { pending, .. } => *pending = data,
                Spill::Opening { next, .. } => *next = data,
            }
        }
    }

    /// The whole body fit in memory.
    fn in_memory(&mut self) -> (ProxyBody, u64) {
        let data = std::mem::take(&mut self.mem).freeze();
        let body = match self.trailers.take() {
            None => ProxyBody::full(data),
            Some(trailers) => ProxyBody::boxed(WithTrailers {
                data: Some(data),
                trailers: Some(trailers),
            }),
        };
        (body, self.total)
    }
}

/// One buffer and the client's trailers (rare: only chunked uploads carry them).
struct WithTrailers {
    data: Option<Bytes>,
    trailers: Option<HeaderMap>,
}

impl Body for WithTrailers {
    type Data = Bytes;
    type Error = Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, Error>>> {
        if let Some(data) = self.data.take().filter(|d| !d.is_empty()) {
            return Poll::Ready(Some(Ok(http_body::Frame::data(data))));
        }
        Poll::Ready(
            self.trailers
                .take()
                .map(|t| Ok(http_body::Frame::trailers(t))),
        )
    }

    fn is_end_stream(&self) -> bool {
        self.data.as_ref().is_none_or(|d| d.is_empty()) && self.trailers.is_none()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        http_body::SizeHint::with_exact(self.data.as_ref().map_or(0, |d| d.len() as u64))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use futures_util::StreamExt as _;
    use http_body_util::BodyExt;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use tower::ServiceExt;

    fn chunked(chunks: Vec<Vec<u8>>) -> ProxyBody {
        let frames = chunks
            .into_iter()
            .map(|c| Ok::<_, Error>(http_body::Frame::data(Bytes::from(c))));
        ProxyBody::boxed(http_body_util::StreamBody::new(futures_util::stream::iter(
            frames,
        )))
    }

    /// Answers with what it saw: replayable?, Content-Length, the body.
    fn inspect(
        calls: Arc<AtomicUsize>,
    ) -> impl Service<
        Request,
        Response = Response,
        Error = std::convert::Infallible,
        Future = impl Send,
    > + Clone {
        tower::service_fn(move |req: Request| {
            calls.fetch_add(1, Ordering::SeqCst);
            async move {
                let replayable = req.body().try_clone().is_some();
                let len = req.headers()[CONTENT_LENGTH].to_str().unwrap().to_owned();
                let body = req.into_body().collect().await.unwrap().to_bytes();
                let mut resp = Response::new(ProxyBody::from(body));
                resp.headers_mut()
                    .insert("x-replayable", HeaderValue::from(u16::from(replayable)));
                resp.headers_mut().insert("x-len", len.parse().unwrap());
                Ok(resp)
            }
        })
    }

    #[tokio::test]
    async fn a_small_body_is_handed_on_in_memory_with_a_length() {
        let calls = Arc::new(AtomicUsize::new(0));
        let svc = RequestBufferLayer::new().layer(inspect(calls.clone()));
        let resp = svc
            .oneshot(Request::new(chunked(vec![
                b"abc".to_vec(),
                b"def".to_vec(),
            ])))
            .await
            .unwrap();
        assert_eq!(resp.headers()["x-replayable"], "1");
        assert_eq!(resp.headers()["x-len"], "6");
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(&body[..], b"abcdef");
    }

    #[tokio::test]
    async fn a_large_body_spills_to_an_unlinked_file() {
        let dir = tempfile::tempdir().unwrap();
        let calls = Arc::new(AtomicUsize::new(0));
        let svc = RequestBufferLayer::new()
            .memory_limit(1000)
            .temp_dir(dir.path())
            .layer(inspect(calls.clone()));
        let chunks: Vec<Vec<u8>> = (0..50u8).map(|i| vec![i; 777]).collect();
        let expected: Vec<u8> = chunks.concat();
        let resp = svc.oneshot(Request::new(chunked(chunks))).await.unwrap();
        assert_eq!(resp.headers()["x-replayable"], "0");
        assert_eq!(resp.headers()["x-len"], expected.len().to_string().as_str());
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(&body[..], &expected[..]);
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    }

    #[tokio::test]
    async fn too_large_is_413_and_the_inner_service_is_not_called() {
        let calls = Arc::new(AtomicUsize::new(0));
        let svc = RequestBufferLayer::new()
            .max_body_size(100)
            .memory_limit(10)
            .layer(inspect(calls.clone()));
        let resp = svc
            .clone()
            .oneshot(Request::new(chunked(vec![vec![0; 60], vec![0; 60]])))
            .await
            .unwrap();
        assert_eq!(resp.status(), 413);
        let resp = svc
            .oneshot(Request::new(ProxyBody::from(vec![0; 101])))
            .await
            .unwrap();
        assert_eq!(resp.status(), 413);
        assert_eq!(calls.load(Ordering::SeqCst), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_client_body_timeout_is_408_and_closes() {
        let calls = Arc::new(AtomicUsize::new(0));
        let svc = tower::ServiceBuilder::new()
            .layer(crate::timeout::ClientBodyTimeoutLayer::new(
                std::time::Duration::from_secs(5),
            ))
            .layer(RequestBufferLayer::new())
            .service(inspect(calls.clone()));
        let stalled = futures_util::stream::iter([Ok::<_, Error>(http_body::Frame::data(
            Bytes::from_static(b"start"),
        ))])
        .chain(futures_util::stream::pending());
        let req = Request::new(ProxyBody::boxed(http_body_util::StreamBody::new(stalled)));
        let resp = svc.oneshot(req).await.unwrap();
        assert_eq!(resp.status(), 408);
        assert_eq!(resp.headers()[CONNECTION], "close");
        assert_eq!(calls.load(Ordering::SeqCst), 0);
    }

    #[tokio::test]
    async fn trailers_survive_buffering() {
        let calls = Arc::new(AtomicUsize::new(0));
        let inner = tower::service_fn(move |req: Request| async move {
            let collected = req.into_body().collect().await.unwrap();
            let t = collected.trailers().cloned().unwrap();
            assert_eq!(t["x-sum"], "1");
            Ok::<_, std::convert::Infallible>(Response::new(ProxyBody::from(collected.to_bytes())))
        });
        let _ = calls;
        let mut trailers = HeaderMap::new();
        trailers.insert("x-sum", HeaderValue::from_static("1"));
        for memory in [1000, 2] {
            let frames = [
                Ok::<_, Error>(http_body::Frame::data(Bytes::from_static(b"abc"))),
                Ok(http_body::Frame::trailers(trailers.clone())),
            ];
            let body = ProxyBody::boxed(http_body_util::StreamBody::new(
                futures_util::stream::iter(frames),
            ));
            let svc = RequestBufferLayer::new().memory_limit(memory).layer(inner);
            let resp = svc.oneshot(Request::new(body)).await.unwrap();
            assert_eq!(resp.status(), 200);
        }
    }
}
