//! Request and response buffering, and the request body size limit.
//!
//! | nginx | here |
//! | --- | --- |
//! | `client_max_body_size 1m` (0 = unlimited) | [`BodyLimitLayer`] |
//! | `proxy_request_buffering on`, `client_body_buffer_size`, `client_body_temp_path` | [`RequestBufferLayer`] |
//! | `proxy_buffering on`, `proxy_buffers`, `proxy_max_temp_file_size`, `proxy_temp_path`, `X-Accel-Buffering` | [`ResponseBufferLayer`] |
//!
//! Leaving a layer out is the `off` setting: bodies then stream with backpressure.
//! Everything is bounded: memory per request or response by its layer's memory limit,
//! disk by the body limit or the temporary file cap. Temporary files are unlinked as soon
//! as they are created, so they cannot outlive the request, whatever ends it.
//!
//! In a location's stack, request buffering sits in front of the balancer (nothing
//! connects to an upstream before the body is complete) and response buffering around the
//! forwarding service (see `docs/buffering.md` for the whole order):
//!
//! ```
//! use http_body_util::BodyExt;
//! use proxy_core::body::{ProxyBody, Request, Response};
//! use proxy_core::buffer::{BodyLimitLayer, RequestBufferLayer, ResponseBufferLayer};
//! use tower::{ServiceBuilder, ServiceExt};
//!
//! # tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async {
//! // Stands in for the balancer and forwarding service: echoes the body it was given.
//! let upstream = tower::service_fn(|req: Request| async move {
//!     assert!(req.body().try_clone().is_some(), "buffered in memory: replayable");
//!     let mut resp = Response::new(req.into_body());
//!     resp.headers_mut().insert("x-accel-buffering", "yes".parse().unwrap());
//!     Ok::<_, std::convert::Infallible>(resp)
//! });
//! let svc = ServiceBuilder::new()
//!     .layer(BodyLimitLayer::new(10 * 1024 * 1024))
//!     .layer(RequestBufferLayer::new().max_body_size(10 * 1024 * 1024))
//!     .layer(ResponseBufferLayer::new())
//!     .service(upstream);
//!
//! let chunked = http_body_util::StreamBody::new(futures_util::stream::iter([
//!     Ok::<_, proxy_core::Error>(http_body::Frame::data(bytes::Bytes::from("hello "))),
//!     Ok(http_body::Frame::data(bytes::Bytes::from("world"))),
//! ]));
//! let resp = svc.oneshot(Request::new(ProxyBody::boxed(chunked))).await.unwrap();
//! assert!(resp.headers().get("x-accel-buffering").is_none());
//! let body = resp.into_body().collect().await.unwrap().to_bytes();
//! assert_eq!(&body[..], b"hello world");
//! # });
//! ```

pub(crate) mod limit;
pub mod request;
pub mod response;
mod spill;

pub use limit::{BodyLimit, BodyLimitLayer, LimitedBody};
pub use request::{RequestBuffer, RequestBufferLayer};
pub use response::{ResponseBuffer, ResponseBufferLayer, X_ACCEL_BUFFERING};

pub(crate) use limit::client_fault;

/// The response future of [`BodyLimit`].
pub use limit::ResponseFuture as BodyLimitFuture;
