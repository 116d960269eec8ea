//! [`ProxyBody`]: the one body type that flows through every service of the proxy.
//!
//! A request or response body is either empty, a single buffer, a streamed hyper body
//! passed through untouched, or any other body behind a box (the buffering and limit
//! layers wrap bodies this way). The common case, an incoming hyper body relayed to the
//! other side, costs no allocation.
//!
//! ```
//! use http_body_util::BodyExt;
//! use proxy_core::body::ProxyBody;
//! # tokio_test_block_on(async {
//! let body = ProxyBody::from("hello");
//! let bytes = body.collect().await.unwrap().to_bytes();
//! assert_eq!(&bytes[..], b"hello");
//! # });
//! # fn tokio_test_block_on<F: std::future::Future>(f: F) -> F::Output {
//! #     tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(f)
//! # }
//! ```

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use http_body_util::combinators::UnsyncBoxBody;
use pin_project_lite::pin_project;

use crate::error::{Error, Kind};
use crate::server::ConnState;

pin_project! {
    /// A request or response body. See the [module docs](self).
    #[derive(Default)]
    pub struct ProxyBody {
        #[pin]
        inner: Inner,
    }
}

pin_project! {
    #[project = InnerProj]
    #[derive(Default)]
    enum Inner {
        #[default]
        Empty,
        Full { data: Option<Bytes> },
        Incoming { #[pin] body: hyper::body::Incoming },
        // A client request body whose end the connection driver needs to know about
        // (see `server/h1.rs`): no allocation, one reference count per request.
        Watched { #[pin] body: hyper::body::Incoming, conn: Arc<ConnState> },
        Boxed { #[pin] body: UnsyncBoxBody<Bytes, Error> },
    }
}

impl ProxyBody {
    /// An empty body.
    pub fn empty() -> Self {
        ProxyBody {
            inner: Inner::Empty,
        }
    }

    /// A body of one buffer.
    pub fn full(data: impl Into<Bytes>) -> Self {
        let data = data.into();
        if data.is_empty() {
            ProxyBody::empty()
        } else {
            ProxyBody {
                inner: Inner::Full { data: Some(data) },
            }
        }
    }

    /// A copy of this body if it can be replayed (empty or a single buffer), for retrying
    /// a request on another upstream. Streamed bodies give `None`.
    pub fn try_clone(&self) -> Option<ProxyBody> {
        match &self.inner {
            Inner::Empty => Some(ProxyBody::empty()),
            Inner::Full { data } => Some(ProxyBody {
                inner: Inner::Full { data: data.clone() },
            }),
            Inner::Incoming { .. } | Inner::Watched { .. } | Inner::Boxed { .. } => None,
        }
    }

    /// A client request body that tells `conn` when it has been read to its end.
    pub(crate) fn watched(body: hyper::body::Incoming, conn: Arc<ConnState>) -> Self {
        ProxyBody {
            inner: Inner::Watched { body, conn },
        }
    }

    /// Wrap any body whose errors convert into [`Error`].
    pub fn boxed<B>(body: B) -> Self
    where
        B: Body<Data = Bytes> + Send + 'static,
        B::Error: Into<Error>,
    {
        use http_body_util::BodyExt;
        ProxyBody {
            inner: Inner::Boxed {
                body: body.map_err(Into::into).boxed_unsync(),
            },
        }
    }
}

impl From<hyper::body::Incoming> for ProxyBody {
    fn from(body: hyper::body::Incoming) -> Self {
        ProxyBody {
            inner: Inner::Incoming { body },
        }
    }
}

impl From<Bytes> for ProxyBody {
    fn from(data: Bytes) -> Self {
        ProxyBody::full(data)
    }
}

impl From<&'static str> for ProxyBody {
    fn from(data: &'static str) -> Self {
        ProxyBody::full(Bytes::from_static(data.as_bytes()))
    }
}

impl From<String> for ProxyBody {
    fn from(data: String) -> Self {
        ProxyBody::full(Bytes::from(data))
    }
}

impl From<Vec<u8>> for ProxyBody {
    fn from(data: Vec<u8>) -> Self {
        ProxyBody::full(Bytes::from(data))
    }
}

impl From<hyper::Error> for Error {
    fn from(e: hyper::Error) -> Self {
        // A body error from hyper: the peer broke framing (400 when it is the client's
        // request body) or went away mid-body.
        let kind = if e.is_timeout() {
            Kind::UpstreamTimeout
        } else if e.is_parse() || is_invalid_data(&e) {
            Kind::BadRequest
        } else {
            Kind::Downstream
        };
        Error::with_source(kind, e)
    }
}

/// Whether a hyper body error is the peer's malformed framing (an invalid chunk size or
/// extension), which hyper reports as an I/O error of kind `InvalidInput` or `InvalidData`.
fn is_invalid_data(e: &hyper::Error) -> bool {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = std::error::Error::source(e);
    while let Some(err) = cur {
        if let Some(io) = err.downcast_ref::<std::io::Error>() {
            return matches!(
                io.kind(),
                std::io::ErrorKind::InvalidData | std::io::ErrorKind::InvalidInput
            );
        }
        cur = err.source();
    }
    false
}

impl From<std::io::Error> for Error {
    fn from(e: std::io::Error) -> Self {
        Error::with_source(Kind::Internal, e)
    }
}

impl From<std::convert::Infallible> for Error {
    fn from(e: std::convert::Infallible) -> Self {
        match e {}
    }
}

impl Body for ProxyBody {
    type Data = Bytes;
    type Error = Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Error>>> {
        match self.project().inner.project() {
            InnerProj::Empty => Poll::Ready(None),
            InnerProj::Full { data } => Poll::Ready(data.take().map(|d| Ok(Frame::data(d)))),
            InnerProj::Incoming { body } => body.poll_frame(cx).map_err(Error::from),
            InnerProj::Watched { mut body, conn } => {
                let frame = body.as_mut().poll_frame(cx);
                match &frame {
                    Poll::Ready(None) => conn.request_body_read(),
                    Poll::Ready(Some(Ok(_))) if body.is_end_stream() => conn.request_body_read(),
                    _ => {}
                }
                frame.map_err(Error::from)
            }
            InnerProj::Boxed { body } => body.poll_frame(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.inner {
            Inner::Empty => true,
            Inner::Full { data } => data.is_none(),
            Inner::Incoming { body } | Inner::Watched { body, .. } => body.is_end_stream(),
            Inner::Boxed { body } => body.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.inner {
            Inner::Empty => SizeHint::with_exact(0),
            Inner::Full { data } => {
                SizeHint::with_exact(data.as_ref().map_or(0, |d| d.len() as u64))
            }
            Inner::Incoming { body } | Inner::Watched { body, .. } => body.size_hint(),
            Inner::Boxed { body } => body.size_hint(),
        }
    }
}

impl std::fmt::Debug for ProxyBody {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.inner {
            Inner::Empty => f.write_str("ProxyBody::Empty"),
            Inner::Full { data } => f
                .debug_struct("ProxyBody::Full")
                .field("len", &data.as_ref().map_or(0, |d| d.len()))
                .finish(),
            Inner::Incoming { .. } | Inner::Watched { .. } => f.write_str("ProxyBody::Incoming"),
            Inner::Boxed { .. } => f.write_str("ProxyBody::Boxed"),
        }
    }
}

/// A request as every proxy service takes it.
pub type Request = http::Request<ProxyBody>;
/// A response as every proxy service returns it.
pub type Response = http::Response<ProxyBody>;
