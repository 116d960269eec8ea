//! Access logs: nginx's `combined` format (optionally with timings) or JSON lines, one
//! line per request, written off the request path.
//!
//! [`AccessLogLayer`] wraps a location's (or a whole router's) service. When a
//! response body ends, or is dropped before its end, the request's facts are queued to
//! an [`AccessLogWriter`] without formatting or waiting; a background task formats the
//! lines, collects them up to `buffer` bytes and writes them at least every `flush`
//! interval (nginx's `access_log PATH combined buffer=32k flush=5s`). A full queue drops
//! lines and counts them ([`AccessLogStats::dropped`]): requests never wait for a disk.
//!
//! Each line carries the real client address ([`client_ip`](crate::client_info::client_ip):
//! the forwarded-headers layer's [`RealClient`](crate::client_info::RealClient), else the
//! socket peer), the request line, status, body bytes sent, referer, user agent, the
//! request time and, when the forwarding code put an [`UpstreamInfo`] in the response's
//! extensions, the upstream address and response time. A client that went away before
//! its response was complete is logged with status 499, as nginx does.
//!
//! [`AccessLogWriter::reopen`] is the library half of logrotate's SIGUSR1: after the
//! file was renamed, new lines go to a new file at the configured path.
//!
//! ```
//! use std::convert::Infallible;
//! use http_body_util::BodyExt;
//! use proxy_core::access_log::{AccessLogLayer, AccessLogWriter, Format, Target};
//! use proxy_core::{ProxyBody, Request, Response};
//! use tower::{Layer, ServiceExt};
//! # tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async {
//! let dir = tempfile::tempdir().unwrap();
//! let path = dir.path().join("access.log");
//! let writer = AccessLogWriter::builder(Target::File(path.clone()))
//!     .format(Format::Combined)
//!     .spawn()
//!     .unwrap();
//! let app = tower::service_fn(|_req: Request| async {
//!     Ok::<_, Infallible>(Response::new(ProxyBody::from("hello")))
//! });
//! let svc = AccessLogLayer::new(writer.clone()).layer(app);
//!
//! let req = http::Request::builder()
//!     .uri("/hi")
//!     .header("user-agent", "doc")
//!     .body(ProxyBody::empty())
//!     .unwrap();
//! let resp = svc.oneshot(req).await.unwrap();
//! resp.into_body().collect().await.unwrap(); // the line is queued when the body ends
//!
//! writer.flush().await.unwrap();
//! let log = std::fs::read_to_string(&path).unwrap();
//! assert!(log.ends_with("\"GET /hi HTTP/1.1\" 200 5 \"-\" \"doc\"\n"), "{log}");
//! # });
//! ```

mod format;
mod layer;
mod service;
mod writer;

use std::net::SocketAddr;
use std::time::Duration;

pub use format::Format;
pub use layer::AccessLogLayer;
pub use service::{AccessLog, ResponseFuture};
pub use writer::{AccessLogStats, AccessLogWriter, AccessLogWriterBuilder, Target, WriterTask};

/// Which upstream server answered and how long it took: the forwarding code puts it in
/// the response's extensions; access logs (`$upstream_addr`,
/// `$upstream_response_time`) and metrics read it.
///
/// ```
/// use proxy_core::access_log::UpstreamInfo;
/// let mut resp = http::Response::new(());
/// resp.extensions_mut().insert(UpstreamInfo::new(
///     "127.0.0.1:8001".parse().unwrap(),
///     std::time::Duration::from_millis(7),
/// ));
/// assert_eq!(resp.extensions().get::<UpstreamInfo>().unwrap().addr.port(), 8001);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct UpstreamInfo {
    /// The upstream server's address.
    pub addr: SocketAddr,
    /// From sending the request to receiving the response header (nginx's
    /// `$upstream_header_time`, which is what most dashboards call upstream time).
    pub duration: Duration,
}

impl UpstreamInfo {
    /// The upstream at `addr` answered after `duration`.
    pub fn new(addr: SocketAddr, duration: Duration) -> Self {
        UpstreamInfo { addr, duration }
    }
}
