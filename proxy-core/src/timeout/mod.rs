//! Timeouts and load shedding that keep a slow peer from tying up the other side.
//!
//! nginx's timeouts measure the idle time between two operations, not totals, and so do
//! these:
//!
//! | nginx | here | where it goes |
//! | --- | --- | --- |
//! | `client_body_timeout 60s` | [`ClientBodyTimeoutLayer`] | outermost part of a location's stack, before request buffering |
//! | `proxy_read_timeout 60s` (response body) | [`UpstreamBodyTimeoutLayer`] | right around the forwarding service |
//! | `send_timeout 60s` | [`SendTimeoutAccept`] / [`SendTimeoutIo`] | on the listener's connections |
//! | max concurrent requests (`limit_conn`-like, one shared zone) | [`ConcurrencyLimitLayer`] | anywhere; shares one budget |
//!
//! The header read timeout, keep-alive and HTTP/2 pings are settings of the server's
//! hyper builders; the upstream connect timeout and the time to the upstream's response
//! header belong to [`UpstreamClient`](crate::upstream::UpstreamClient).
//!
//! ```
//! use std::time::Duration;
//! use http_body_util::BodyExt;
//! use proxy_core::body::{ProxyBody, Request, Response};
//! use proxy_core::timeout::{ClientBodyTimeoutLayer, ConcurrencyLimitLayer, UpstreamBodyTimeoutLayer};
//! use tower::{ServiceBuilder, ServiceExt};
//!
//! # tokio::runtime::Builder::new_current_thread().enable_all().start_paused(true).build().unwrap().block_on(async {
//! // An "upstream" whose body never ends.
//! let upstream = tower::service_fn(|_req: Request| async {
//!     let body = http_body_util::StreamBody::new(futures_pending());
//!     Ok::<_, std::convert::Infallible>(Response::new(ProxyBody::boxed(body)))
//! });
//! let svc = ServiceBuilder::new()
//!     .layer(ConcurrencyLimitLayer::new(100))
//!     .layer(ClientBodyTimeoutLayer::new(Duration::from_secs(60)))
//!     .layer(UpstreamBodyTimeoutLayer::new(Duration::from_secs(60)))
//!     .service(upstream);
//! let resp = svc.oneshot(Request::default()).await.unwrap();
//! let err = resp.into_body().collect().await.unwrap_err();
//! assert!(err.is_timeout());
//! # });
//! # fn futures_pending() -> impl futures_util::Stream<Item = Result<http_body::Frame<bytes::Bytes>, proxy_core::Error>> {
//! #     futures_util::stream::pending()
//! # }
//! ```

mod concurrency;
mod idle;
mod layer;
mod send;

pub use concurrency::{ConcurrencyLimit, ConcurrencyLimitLayer};
pub use idle::IdleTimeoutBody;
pub use layer::{
    ClientBodyTimeout, ClientBodyTimeoutLayer, UpstreamBodyTimeout, UpstreamBodyTimeoutLayer,
};
pub use send::{SendTimeoutAccept, SendTimeoutIo};

/// The response futures of the layers in this module.
pub mod future {
    pub use super::concurrency::ResponseFuture as ConcurrencyLimitFuture;
    pub use super::layer::ResponseFuture;
}
