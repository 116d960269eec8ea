//! [`ResponseBuffer`]: nginx's `proxy_buffering on`.

use std::collections::VecDeque;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll, Waker};

use bytes::{Bytes, BytesMut};
use http::header::{HeaderName, HeaderValue, CONTENT_TYPE};
use http::{HeaderMap, StatusCode};
use http_body::{Body, Frame, SizeHint};
use http_body_util::BodyExt;
use pin_project_lite::pin_project;
use tokio::fs::File;
use tokio::io::AsyncWriteExt;
use tokio::sync::Notify;
use tower_layer::Layer;
use tower_service::Service;

use crate::body::{ProxyBody, Request, Response};
use crate::buffer::spill;
use crate::error::{Error, Kind};

/// The upstream's per-response switch (`no` turns buffering off); never passed on.
pub const X_ACCEL_BUFFERING: HeaderName = HeaderName::from_static("x-accel-buffering");

#[derive(Debug, Clone)]
struct Config {
    memory: usize,
    max_temp_file_size: u64,
    temp_dir: Arc<Path>,
}

/// Reads upstream responses ahead of the client: see [`ResponseBuffer`].
#[derive(Debug, Clone)]
pub struct ResponseBufferLayer {
    config: Arc<Config>,
}

impl Default for ResponseBufferLayer {
    fn default() -> Self {
        Self::new()
    }
}

impl ResponseBufferLayer {
    /// 64 KiB of memory per response (nginx: `proxy_buffer_size` + `proxy_buffers 8 8k`,
    /// 72 KiB), then up to 1 GiB in a temporary file (`proxy_max_temp_file_size 1024m`)
    /// in the system's temporary directory.
    pub fn new() -> Self {
        ResponseBufferLayer {
            config: Arc::new(Config {
                memory: 64 * 1024,
                max_temp_file_size: 1024 * 1024 * 1024,
                temp_dir: Arc::from(std::env::temp_dir()),
            }),
        }
    }

    /// Bytes of a response held in memory ahead of the client.
    pub fn memory_limit(mut self, bytes: usize) -> Self {
        Arc::make_mut(&mut self.config).memory = bytes;
        self
    }

    /// Bytes of a response written to its temporary file at most
    /// (`proxy_max_temp_file_size`); past it, the rest streams with backpressure. 0 keeps
    /// the read-ahead in memory only.
    pub fn max_temp_file_size(mut self, bytes: u64) -> Self {
        Arc::make_mut(&mut self.config).max_temp_file_size = bytes;
        self
    }

    /// Where temporary files are created (`proxy_temp_path`).
    pub fn temp_dir(mut self, dir: impl Into<PathBuf>) -> Self {
        Arc::make_mut(&mut self.config).temp_dir = Arc::from(dir.into());
        self
    }
}

impl<S> Layer<S> for ResponseBufferLayer {
    type Service = ResponseBuffer<S>;

    fn layer(&self, inner: S) -> ResponseBuffer<S> {
        ResponseBuffer {
            inner,
            config: self.config.clone(),
        }
    }
}

/// Reads each response body of the inner service ahead of the client, in a task of its
/// own, into bounded memory and then a temporary file, so the upstream connection goes
/// back to the pool as soon as the upstream has sent everything while a slow client
/// drains at its own pace.
///
/// Past the temporary file's cap the read-ahead stops and the rest streams with
/// backpressure, as in nginx. Not buffered: responses with `X-Accel-Buffering: no`
/// (the header is removed, whatever its value), `text/event-stream`, upgrades, and empty
/// bodies. An upstream error is delivered after the bytes that came before it, so the
/// client gets everything that arrived before its connection is cut. When the client goes
/// away the read-ahead stops and the upstream connection is closed. The temporary file is
/// unlinked when created, so it never outlives the response.
///
/// A body that is already complete when its header arrives (a small response read with
/// its head in one go, the common case) is answered from memory without a task: the
/// response future reads the frames that are ready at once, up to the memory limit, and
/// when the body ends there the upstream body is dropped at once (its connection goes
/// back to the pool) and the client gets the bytes, then the trailers or the error, as
/// from the task. Otherwise the task carries on from what was already read.
#[derive(Debug, Clone)]
pub struct ResponseBuffer<S> {
    inner: S,
    config: Arc<Config>,
}

impl<S> Service<Request> for ResponseBuffer<S>
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
            inner: self.inner.call(req),
            config: self.config.clone(),
        }
    }
}

pin_project! {
    /// The response future of [`ResponseBuffer`].
    #[derive(Debug)]
    pub struct ResponseFuture<F> {
        #[pin]
        inner: F,
        config: Arc<Config>,
    }
}

impl<F, E> Future for ResponseFuture<F>
where
    F: Future<Output = Result<Response, E>>,
{
    type Output = Result<Response, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let resp = std::task::ready!(this.inner.poll(cx))?;
        Poll::Ready(Ok(buffer(resp, this.config, cx)))
    }
}

/// How an upstream body ended: `Ok(Some(trailers))`, `Ok(None)`, or its error.
type End = Result<Option<HeaderMap>, Error>;

/// What the response future read of the upstream body without waiting.
#[derive(Default)]
struct Early {
    // The first chunk apart: a small body is one chunk, and then nothing is allocated.
    first: Option<Bytes>,
    more: VecDeque<Bytes>,
    len: usize,
    end: Option<End>,
}

impl Early {
    fn push(&mut self, data: Bytes) {
        self.len += data.len();
        if self.first.is_none() {
            self.first = Some(data);
        } else {
            self.more.push_back(data);
        }
    }

    fn chunks(self) -> impl Iterator<Item = Bytes> {
        self.first.into_iter().chain(self.more)
    }
}

/// Read the frames of `body` that are ready now, until it ends, would make the reader
/// wait, or `memory` bytes were read. A `Pending` poll leaves the caller's waker with the
/// body; the filling task polls it next and so replaces it, at worst one spurious wake.
fn read_ready(body: &mut ProxyBody, memory: usize, cx: &mut Context<'_>) -> Early {
    let mut early = Early::default();
    while early.len < memory {
        match Pin::new(&mut *body).poll_frame(cx) {
            Poll::Pending => break,
            Poll::Ready(None) => {
                early.end = Some(Ok(None));
                break;
            }
            Poll::Ready(Some(Err(e))) => {
                early.end = Some(Err(e));
                break;
            }
            Poll::Ready(Some(Ok(frame))) => match frame.into_data() {
                Ok(data) => {
                    if !data.is_empty() {
                        early.push(data);
                    }
                    // hyper may not be polled again after a Content-Length body's last
                    // byte; its end is known from `is_end_stream`.
                    if body.is_end_stream() {
                        early.end = Some(Ok(None));
                        break;
                    }
                }
                Err(frame) => {
                    if let Ok(trailers) = frame.into_trailers() {
                        early.end = Some(Ok(Some(trailers)));
                        break;
                    }
                }
            },
        }
    }
    early
}

fn buffer(mut resp: Response, config: &Arc<Config>, cx: &mut Context<'_>) -> Response {
    // One pass over the names (compares, no hashing) finds the two headers read here;
    // `X-Accel-Buffering` (rare) is removed only when present. The first value of each
    // counts, as `remove` and `get` would return it.
    let (mut accel, mut content_type) = (None, None);
    for (name, value) in resp.headers() {
        if content_type.is_none() && name == CONTENT_TYPE {
            content_type = Some(is_event_stream(value));
        } else if accel.is_none() && name == X_ACCEL_BUFFERING {
            accel = Some(value.as_bytes().eq_ignore_ascii_case(b"no"));
        }
    }
    if accel.is_some() {
        resp.headers_mut().remove(X_ACCEL_BUFFERING);
    }
    if accel == Some(true)
        || content_type == Some(true)
        || resp.status() == StatusCode::SWITCHING_PROTOCOLS
        || resp.body().is_end_stream()
    {
        return resp;
    }
    let (parts, mut body) = resp.into_parts();
    let remaining = body.size_hint().exact();
    let early = read_ready(&mut body, config.memory, cx);
    let body = match early.end {
        // Complete and within the memory limit: answered from memory, no task. The
        // upstream body is dropped here, so its connection is free before the client
        // has read a byte, as nginx's buffering frees it.
        Some(_) if early.len <= config.memory => {
            drop(body);
            return Response::from_parts(parts, from_memory(early, remaining));
        }
        // Complete but over the limit (one large chunk): the task spills the excess.
        Some(_) => {
            drop(body);
            None
        }
        None => Some(body),
    };
    let shared = Arc::new(Shared {
        state: Mutex::new(State::default()),
        writer: Notify::new(),
    });
    tokio::spawn(fill(shared.clone(), body, early, config.clone()));
    let body = BufferedBody {
        shared,
        file: None,
        buf: BytesMut::new(),
        remaining,
        finished: false,
    };
    Response::from_parts(parts, ProxyBody::boxed(body))
}

/// The body for a response read to its end by the response future.
fn from_memory(early: Early, remaining: Option<u64>) -> ProxyBody {
    match early {
        // The common case: one chunk of the declared length. `ProxyBody::full` has the
        // same exact size hint, so the client's framing does not change; a body whose
        // length was not declared keeps the stream's framing through `MemoryBody`.
        Early {
            first: Some(chunk),
            more,
            end: Some(Ok(None)),
            ..
        } if more.is_empty() && remaining == Some(chunk.len() as u64) => ProxyBody::full(chunk),
        Early {
            first: None,
            end: Some(Ok(None)),
            ..
        } if remaining == Some(0) => ProxyBody::empty(),
        mut early => {
            let end = early.end.take();
            ProxyBody::boxed(MemoryBody {
                chunks: early.chunks().collect(),
                end,
                remaining,
            })
        }
    }
}

/// A body read to its end before the response was answered: its chunks, then its end.
struct MemoryBody {
    chunks: VecDeque<Bytes>,
    end: Option<End>,
    remaining: Option<u64>,
}

impl Body for MemoryBody {
    type Data = Bytes;
    type Error = Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Error>>> {
        if let Some(chunk) = self.chunks.pop_front() {
            if let Some(r) = &mut self.remaining {
                *r = r.saturating_sub(chunk.len() as u64);
            }
            return Poll::Ready(Some(Ok(Frame::data(chunk))));
        }
        Poll::Ready(match self.end.take() {
            None | Some(Ok(None)) => None,
            Some(Ok(Some(trailers))) => Some(Ok(Frame::trailers(trailers))),
            Some(Err(e)) => Some(Err(e)),
        })
    }

    fn is_end_stream(&self) -> bool {
        self.chunks.is_empty() && matches!(self.end, None | Some(Ok(None)))
    }

    fn size_hint(&self) -> SizeHint {
        match self.remaining {
            Some(n) => SizeHint::with_exact(n),
            None => SizeHint::default(),
        }
    }
}

/// Whether a `Content-Type` value is `text/event-stream` (parameters ignored).
fn is_event_stream(value: &HeaderValue) -> bool {
    let v = value.as_bytes();
    let essence = v.split(|b| *b == b';').next().unwrap_or(v);
    essence
        .trim_ascii()
        .eq_ignore_ascii_case(b"text/event-stream")
}

/// What the filling task and the client's body share. One per buffered response; the
/// lock is only ever contended by these two.
struct Shared {
    state: Mutex<State>,
    /// Wakes the filling task: room was made, or the client went away.
    writer: Notify,
}

// The stream's order: every byte in `mem` comes before every unread byte of the file.
// The writer keeps it so by only appending to `mem` when the file has been read up to
// what was written to it.
#[derive(Default)]
struct State {
    mem: VecDeque<Bytes>,
    mem_len: usize,
    /// Bytes written (and flushed) to the file.
    written: u64,
    /// Bytes the client's body has read back from it.
    read: u64,
    /// The read side of the file, until the client's body takes it.
    reader_file: Option<File>,
    /// How the upstream body ended (trailers or error), once it has.
    end: Option<End>,
    reader: Option<Waker>,
    gone: bool,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Update the state and wake the client's body.
    fn publish(&self, f: impl FnOnce(&mut State)) {
        let waker = {
            let mut st = self.lock();
            f(&mut st);
            st.reader.take()
        };
        if let Some(w) = waker {
            w.wake();
        }
    }

    async fn gone(&self) {
        loop {
            if self.lock().gone {
                return;
            }
            self.writer.notified().await;
        }
    }
}

/// The filling task: stores what the response future already read (`early`), then reads
/// the upstream body to its end (or until the client goes away). `body` is `None` when
/// `early` already holds the end.
async fn fill(shared: Arc<Shared>, mut body: Option<ProxyBody>, early: Early, config: Arc<Config>) {
    let end = read_ahead(&shared, &mut body, early, &config).await;
    // Release the upstream side (back to the pool, or closed if unfinished) before
    // telling the client the end.
    drop(body);
    if let Some(end) = end {
        shared.publish(|st| st.end = Some(end));
    }
}

/// `None` when the client went away.
async fn read_ahead(
    shared: &Shared,
    body: &mut Option<ProxyBody>,
    mut early: Early,
    config: &Config,
) -> Option<End> {
    let mut spill = Spill {
        writer: None,
        spilled: 0,
    };
    let end = early.end.take();
    for data in early.chunks() {
        if let Err(stop) = spill.put(shared, config, data).await {
            return stop;
        }
    }
    if end.is_some() {
        return end;
    }
    let Some(body) = body else {
        return Some(Ok(None));
    };
    loop {
        let frame = tokio::select! {
            biased;
            () = shared.gone() => return None,
            frame = body.frame() => frame,
        };
        let data = match frame {
            None => return Some(Ok(None)),
            Some(Err(e)) => return Some(Err(e)),
            Some(Ok(frame)) => match frame.into_data() {
                Ok(data) => data,
                Err(frame) => match frame.into_trailers() {
                    Ok(trailers) => return Some(Ok(Some(trailers))),
                    Err(_) => continue,
                },
            },
        };
        if let Err(stop) = spill.put(shared, config, data).await {
            return stop;
        }
        // As in `read_ready`: a body that says it has ended is not polled again.
        if body.is_end_stream() {
            return Some(Ok(None));
        }
    }
}

/// The filling task's temporary file, created on the first byte that does not fit in
/// memory.
struct Spill {
    writer: Option<File>,
    spilled: u64,
}

impl Spill {
    /// Store `data` in memory or in the file, waiting for room when both are full.
    /// `Err(None)`: the client went away; `Err(Some(e))`: the file failed.
    async fn put(
        &mut self,
        shared: &Shared,
        config: &Config,
        mut data: Bytes,
    ) -> Result<(), Option<End>> {
        while !data.is_empty() {
            let to_file = {
                let mut st = shared.lock();
                if st.gone {
                    return Err(None);
                }
                let file_drained = st.read == st.written;
                let room = config.memory.saturating_sub(st.mem_len);
                if file_drained && (room > 0 || st.mem_len == 0) {
                    // With nothing buffered the chunk goes through whatever its size:
                    // the stream always moves.
                    let n = if room > 0 {
                        room.min(data.len())
                    } else {
                        data.len()
                    };
                    let chunk = data.split_to(n);
                    st.mem_len += chunk.len();
                    st.mem.push_back(chunk);
                    let waker = st.reader.take();
                    drop(st);
                    if let Some(w) = waker {
                        w.wake();
                    }
                    continue;
                }
                self.spilled < config.max_temp_file_size
            };
            if !to_file {
                // Full: wait for the client to take something (or leave).
                shared.writer.notified().await;
                continue;
            }
            let file = match &mut self.writer {
                Some(file) => file,
                None => match spill::create(config.temp_dir.clone()).await {
                    Ok((w, r)) => {
                        shared.lock().reader_file = Some(r);
                        self.writer.insert(w)
                    }
                    Err(e) => return Err(Some(Err(Error::with_source(Kind::Internal, e)))),
                },
            };
            let room = config.max_temp_file_size - self.spilled;
            let n = usize::try_from(room).unwrap_or(usize::MAX).min(data.len());
            let chunk = data.split_to(n);
            let written = async {
                file.write_all(&chunk).await?;
                // tokio's file writes complete in the background: flushed before the
                // reader is told.
                file.flush().await
            };
            if let Err(e) = written.await {
                tracing::warn!(error = %e, "response buffering: temporary file failed");
                return Err(Some(Err(Error::with_source(Kind::Internal, e))));
            }
            self.spilled += n as u64;
            shared.publish(|st| st.written += n as u64);
        }
        Ok(())
    }
}

/// The client's side: the buffered response body.
struct BufferedBody {
    shared: Arc<Shared>,
    file: Option<File>,
    buf: BytesMut,
    remaining: Option<u64>,
    finished: bool,
}

impl BufferedBody {
    fn data(&mut self, chunk: Bytes) -> Poll<Option<Result<Frame<Bytes>, Error>>> {
        self.shared.writer.notify_one();
        if let Some(r) = &mut self.remaining {
            *r = r.saturating_sub(chunk.len() as u64);
        }
        Poll::Ready(Some(Ok(Frame::data(chunk))))
    }

    fn fail(&mut self, e: Error) -> Poll<Option<Result<Frame<Bytes>, Error>>> {
        self.finished = true;
        Poll::Ready(Some(Err(e)))
    }
}

impl Body for BufferedBody {
    type Data = Bytes;
    type Error = Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Error>>> {
        let this = &mut *self;
        if this.finished {
            return Poll::Ready(None);
        }
        let shared = this.shared.clone();
        let mut st = shared.lock();
        if let Some(chunk) = st.mem.pop_front() {
            st.mem_len -= chunk.len();
            drop(st);
            return this.data(chunk);
        }
        let available = st.written - st.read;
        if available > 0 {
            if this.file.is_none() {
                this.file = st.reader_file.take();
            }
            drop(st);
            let Some(file) = &mut this.file else {
                return this.fail(Error::new(Kind::Internal));
            };
            return match std::task::ready!(spill::poll_read_chunk(
                file,
                &mut this.buf,
                available,
                cx
            )) {
                Ok(chunk) => {
                    shared.lock().read += chunk.len() as u64;
                    this.data(chunk)
                }
                Err(e) => this.fail(Error::with_source(Kind::Internal, e)),
            };
        }
        if let Some(end) = st.end.take() {
            drop(st);
            this.finished = true;
            return Poll::Ready(match end {
                Ok(None) => None,
                Ok(Some(trailers)) => Some(Ok(Frame::trailers(trailers))),
                Err(e) => Some(Err(e)),
            });
        }
        // Checked and registered under one lock: the writer cannot slip in between.
        match &st.reader {
            Some(w) if w.will_wake(cx.waker()) => {}
            _ => st.reader = Some(cx.waker().clone()),
        }
        Poll::Pending
    }

    fn is_end_stream(&self) -> bool {
        self.finished
    }

    fn size_hint(&self) -> SizeHint {
        match self.remaining {
            Some(n) => SizeHint::with_exact(n),
            None => SizeHint::default(),
        }
    }
}

impl Drop for BufferedBody {
    fn drop(&mut self) {
        {
            let mut st = self.shared.lock();
            st.gone = true;
            st.reader_file = None;
            st.mem.clear();
            st.mem_len = 0;
        }
        self.shared.writer.notify_one();
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use http::HeaderValue;
    use proptest::prelude::*;
    use tokio::sync::mpsc;
    use tower::ServiceExt;

    /// A body fed by the test; the sender sees when it is dropped.
    struct Fed(mpsc::Receiver<Result<Frame<Bytes>, Error>>);

    impl Body for Fed {
        type Data = Bytes;
        type Error = Error;
        fn poll_frame(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, Error>>> {
            self.0.poll_recv(cx)
        }
    }

    fn fed_response(
        rx: mpsc::Receiver<Result<Frame<Bytes>, Error>>,
        headers: &[(&'static str, &'static str)],
    ) -> Response {
        let mut resp = Response::new(ProxyBody::boxed(Fed(rx)));
        for (k, v) in headers {
            resp.headers_mut().insert(*k, HeaderValue::from_static(v));
        }
        resp
    }

    async fn serve(layer: ResponseBufferLayer, resp: Response) -> Response {
        let resp = std::sync::Mutex::new(Some(resp));
        let svc = layer.layer(tower::service_fn(move |_req: Request| {
            let r = resp.lock().unwrap().take().unwrap();
            async move { Ok::<_, std::convert::Infallible>(r) }
        }));
        svc.oneshot(Request::default()).await.unwrap()
    }

    #[tokio::test]
    async fn the_upstream_is_read_to_its_end_before_the_client_reads() {
        let (tx, rx) = mpsc::channel(1);
        let dir = tempfile::tempdir().unwrap();
        let layer = ResponseBufferLayer::new()
            .memory_limit(100)
            .temp_dir(dir.path());
        let resp = serve(layer, fed_response(rx, &[])).await;
        // The channel holds one frame: every send past the first needs the read-ahead.
        for i in 0..50u8 {
            tx.send(Ok(Frame::data(Bytes::from(vec![i; 64]))))
                .await
                .unwrap();
        }
        drop(tx);
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        let expected: Vec<u8> = (0..50u8).flat_map(|i| vec![i; 64]).collect();
        assert_eq!(&body[..], &expected[..]);
    }

    #[tokio::test]
    async fn x_accel_buffering_no_and_event_streams_are_not_buffered() {
        for headers in [
            &[("x-accel-buffering", "no")][..],
            &[("content-type", "text/event-stream; charset=utf-8")][..],
        ] {
            let (tx, rx) = mpsc::channel(1);
            let resp = serve(ResponseBufferLayer::new(), fed_response(rx, headers)).await;
            assert!(resp.headers().get(X_ACCEL_BUFFERING).is_none());
            tx.send(Ok(Frame::data(Bytes::from_static(b"a"))))
                .await
                .unwrap();
            // Nobody reads ahead: the one-slot channel stays full.
            assert!(tx
                .try_send(Ok(Frame::data(Bytes::from_static(b"b"))))
                .is_err());
            drop(resp);
        }
    }

    #[tokio::test]
    async fn a_client_that_leaves_stops_the_read_ahead() {
        let (tx, rx) = mpsc::channel(1);
        let resp = serve(ResponseBufferLayer::new(), fed_response(rx, &[])).await;
        tx.send(Ok(Frame::data(Bytes::from_static(b"a"))))
            .await
            .unwrap();
        drop(resp);
        // The filling task drops the upstream body: the sender sees it closed.
        tokio::time::timeout(std::time::Duration::from_secs(5), tx.closed())
            .await
            .unwrap();
    }

    #[tokio::test]
    async fn an_upstream_error_comes_after_the_data() {
        let (tx, rx) = mpsc::channel(4);
        let resp = serve(ResponseBufferLayer::new(), fed_response(rx, &[])).await;
        tx.send(Ok(Frame::data(Bytes::from_static(b"part"))))
            .await
            .unwrap();
        tx.send(Err(Error::new(Kind::UpstreamTimeout)))
            .await
            .unwrap();
        let mut body = resp.into_body();
        let first = body.frame().await.unwrap().unwrap();
        assert_eq!(first.into_data().unwrap(), "part");
        let err = body.frame().await.unwrap().unwrap_err();
        assert_eq!(err.kind(), Kind::UpstreamTimeout);
    }

    /// A body fed by the test with a declared length; `dropped` closes when it is dropped.
    struct Sized {
        rx: mpsc::Receiver<Result<Frame<Bytes>, Error>>,
        left: Option<u64>,
        _dropped: tokio::sync::oneshot::Sender<()>,
    }

    impl Body for Sized {
        type Data = Bytes;
        type Error = Error;
        fn poll_frame(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, Error>>> {
            let frame = std::task::ready!(self.rx.poll_recv(cx));
            if let (Some(Ok(f)), Some(left)) = (&frame, &mut self.left) {
                if let Some(d) = f.data_ref() {
                    *left -= d.len() as u64;
                }
            }
            Poll::Ready(frame)
        }
        fn is_end_stream(&self) -> bool {
            self.left == Some(0)
        }
        fn size_hint(&self) -> SizeHint {
            self.left.map(SizeHint::with_exact).unwrap_or_default()
        }
    }

    type Upstream = (
        mpsc::Sender<Result<Frame<Bytes>, Error>>,
        tokio::sync::oneshot::Receiver<()>,
        Response,
    );

    fn sized_response(len: Option<u64>) -> Upstream {
        let (tx, rx) = mpsc::channel(8);
        let (dropped_tx, dropped) = tokio::sync::oneshot::channel();
        let body = Sized {
            rx,
            left: len,
            _dropped: dropped_tx,
        };
        (tx, dropped, Response::new(ProxyBody::boxed(body)))
    }

    fn data(b: &'static [u8]) -> Result<Frame<Bytes>, Error> {
        Ok(Frame::data(Bytes::from_static(b)))
    }

    /// Whether the upstream body has been dropped, without waiting.
    fn is_dropped(dropped: &mut tokio::sync::oneshot::Receiver<()>) -> bool {
        matches!(
            dropped.try_recv(),
            Err(tokio::sync::oneshot::error::TryRecvError::Closed)
        )
    }

    #[tokio::test]
    async fn a_complete_small_body_is_answered_from_memory_without_a_task() {
        let (tx, mut dropped, upstream) = sized_response(Some(5));
        tx.send(data(b"hello")).await.unwrap();
        let resp = serve(ResponseBufferLayer::new(), upstream).await;
        // Dropped when the response was answered, not by a task running later.
        assert!(is_dropped(&mut dropped));
        let body = resp.into_body();
        assert_eq!(format!("{body:?}"), "ProxyBody::Full { len: 5 }");
        assert_eq!(body.size_hint().exact(), Some(5));
        assert_eq!(&body.collect().await.unwrap().to_bytes()[..], b"hello");
    }

    #[tokio::test]
    async fn a_complete_body_of_unknown_length_keeps_its_framing() {
        let (tx, mut dropped, upstream) = sized_response(None);
        tx.send(data(b"ab")).await.unwrap();
        tx.send(data(b"cd")).await.unwrap();
        drop(tx);
        let resp = serve(ResponseBufferLayer::new(), upstream).await;
        assert!(is_dropped(&mut dropped));
        let body = resp.into_body();
        assert_eq!(body.size_hint().exact(), None);
        assert_eq!(&body.collect().await.unwrap().to_bytes()[..], b"abcd");
    }

    #[tokio::test]
    async fn trailers_and_errors_read_at_once_come_after_the_data() {
        let (tx, mut dropped, upstream) = sized_response(None);
        tx.send(data(b"abc")).await.unwrap();
        let mut t = HeaderMap::new();
        t.insert("x-done", HeaderValue::from_static("1"));
        tx.send(Ok(Frame::trailers(t))).await.unwrap();
        let resp = serve(ResponseBufferLayer::new(), upstream).await;
        assert!(is_dropped(&mut dropped));
        let collected = resp.into_body().collect().await.unwrap();
        assert_eq!(collected.trailers().unwrap()["x-done"], "1");
        assert_eq!(&collected.to_bytes()[..], b"abc");

        let (tx, mut dropped, upstream) = sized_response(None);
        tx.send(data(b"part")).await.unwrap();
        tx.send(Err(Error::new(Kind::UpstreamTimeout)))
            .await
            .unwrap();
        let resp = serve(ResponseBufferLayer::new(), upstream).await;
        assert!(is_dropped(&mut dropped));
        let mut body = resp.into_body();
        let first = body.frame().await.unwrap().unwrap();
        assert_eq!(first.into_data().unwrap(), "part");
        let err = body.frame().await.unwrap().unwrap_err();
        assert_eq!(err.kind(), Kind::UpstreamTimeout);
        assert!(body.frame().await.is_none());
    }

    #[tokio::test]
    async fn a_body_partly_ready_then_slow_is_read_ahead_and_freed_early() {
        let (tx, mut dropped, upstream) = sized_response(Some(6));
        tx.send(data(b"abc")).await.unwrap();
        let resp = serve(ResponseBufferLayer::new(), upstream).await;
        // Not complete: the task carries on from what was read.
        assert!(!is_dropped(&mut dropped));
        assert_eq!(resp.body().size_hint().exact(), Some(6));
        tx.send(data(b"def")).await.unwrap();
        // The task reads the rest and drops the upstream before the client reads a byte.
        tokio::time::timeout(std::time::Duration::from_secs(5), &mut dropped)
            .await
            .unwrap()
            .unwrap_err();
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(&body[..], b"abcdef");
    }

    #[tokio::test]
    async fn a_complete_body_over_the_memory_limit_goes_through_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let (tx, mut dropped, upstream) = sized_response(Some(10));
        tx.send(data(b"0123456789")).await.unwrap();
        let layer = ResponseBufferLayer::new()
            .memory_limit(4)
            .temp_dir(dir.path());
        let resp = serve(layer, upstream).await;
        // Read at once, so the upstream is already gone; the bytes past the limit are
        // the task's to spill.
        assert!(is_dropped(&mut dropped));
        assert_eq!(format!("{:?}", resp.body()), "ProxyBody::Boxed");
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(&body[..], b"0123456789");
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(48))]
        /// Whatever the frame sizes, memory, file cap and client pace, the client gets the
        /// upstream's bytes in order, then its trailers, and no file is left behind.
        #[test]
        fn every_byte_arrives_in_order(
            sizes in proptest::collection::vec(1usize..300, 0..40),
            memory in 0usize..500,
            max_file in prop_oneof![Just(0u64), 1u64..2000, Just(u64::MAX)],
            pauses in proptest::collection::vec(0usize..4, 40),
            trailers in any::<bool>(),
        ) {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            let dir = tempfile::tempdir().unwrap();
            let expected: Vec<u8> = sizes
                .iter()
                .enumerate()
                .flat_map(|(i, n)| (0..*n).map(move |j| (i * 31 + j) as u8))
                .collect();
            let (got, got_trailers) = rt.block_on(async {
                let (tx, rx) = mpsc::channel(2);
                let layer = ResponseBufferLayer::new()
                    .memory_limit(memory)
                    .max_temp_file_size(max_file)
                    .temp_dir(dir.path());
                let resp = serve(layer, fed_response(rx, &[])).await;
                let chunks: Vec<Bytes> = {
                    let mut at = 0;
                    sizes.iter().map(|n| { let c = Bytes::copy_from_slice(&expected[at..at + n]); at += n; c }).collect()
                };
                tokio::spawn(async move {
                    for c in chunks {
                        tx.send(Ok(Frame::data(c))).await.unwrap();
                    }
                    if trailers {
                        let mut t = HeaderMap::new();
                        t.insert("x-done", HeaderValue::from_static("1"));
                        tx.send(Ok(Frame::trailers(t))).await.unwrap();
                    }
                });
                let mut body = resp.into_body();
                let mut got = Vec::new();
                let mut got_trailers = false;
                let mut i = 0;
                while let Some(frame) = body.frame().await {
                    for _ in 0..pauses[i % pauses.len()] {
                        tokio::task::yield_now().await;
                    }
                    i += 1;
                    match frame.unwrap().into_data() {
                        Ok(d) => got.extend_from_slice(&d),
                        Err(f) => got_trailers = f.into_trailers().is_ok(),
                    }
                }
                (got, got_trailers)
            });
            prop_assert_eq!(got, expected);
            prop_assert_eq!(got_trailers, trailers);
            prop_assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
        }
    }
}
