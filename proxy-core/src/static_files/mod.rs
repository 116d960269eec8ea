//! Static files: [`StaticFiles`] serves a directory as an nginx location with `root` or
//! `alias` does.
//!
//! Built on tower-http's `ServeDir`, which brings GET and HEAD (anything else is 405),
//! `Content-Type` by extension, `Last-Modified` and a strong `ETag`, conditional requests
//! (`If-None-Match` / `If-Modified-Since` → 304, `If-Match` / `If-Unmodified-Since` → 412),
//! a single byte range (206, or 416 with `Content-Range: bytes */LEN`; several ranges get
//! the whole file), precompressed
//! `.gz` / `.br` siblings chosen by `Accept-Encoding` (with `Vary: accept-encoding`), and
//! bodies streamed from disk in 64 KiB chunks with backpressure: a 200 MiB file costs one
//! chunk of memory, not 200 MiB. This module adds:
//!
//! - `root` vs `alias` mapping ([`StaticFiles::root`], [`StaticFiles::alias`]) and an
//!   `index` file name of your choice;
//! - a strict check of the raw path first ([`check_path`]): `..` or `.` segments (also as
//!   `%2e%2e`), encoded `/` or `\` (`%2f`, `%5c`), a raw `\`, NUL (`%00`) or a broken
//!   `%` escape answer **400** before the file system is touched;
//! - **symbolic links that resolve outside the directory answer 403** (links inside it
//!   work); see [`Builder::danger_allow_symlinks_outside_root`];
//! - `expires` (`Expires` + `Cache-Control: max-age`) plus extra `Cache-Control`
//!   directives, on the statuses nginx applies them to;
//! - `access_log off`: a [`SkipAccessLog`] response extension;
//! - every answer in [`ProxyBody`](crate::body::ProxyBody), errors with a short text body.
//!
//! ```
//! use std::time::Duration;
//! use http::HeaderValue;
//! use http_body_util::BodyExt;
//! use proxy_core::static_files::StaticFiles;
//! use tower::ServiceExt;
//! # tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async {
//! let dir = tempfile::tempdir().unwrap();
//! std::fs::write(dir.path().join("app.css"), "body{}").unwrap();
//!
//! // location /static/ { alias DIR/; expires 30d; add_header Cache-Control "public, immutable"; }
//! let files = StaticFiles::alias("/static/", dir.path())
//!     .expires(Duration::from_secs(30 * 24 * 3600))
//!     .cache_control(HeaderValue::from_static("public, immutable"))
//!     .build()
//!     .unwrap();
//!
//! let req = http::Request::get("/static/app.css").body(Default::default()).unwrap();
//! let resp = files.clone().oneshot(req).await.unwrap();
//! assert_eq!(resp.status(), 200);
//! assert_eq!(resp.headers()["content-type"], "text/css");
//! assert_eq!(resp.headers()["cache-control"], "max-age=2592000, public, immutable");
//! assert!(resp.headers().contains_key("etag"));
//! assert_eq!(&resp.into_body().collect().await.unwrap().to_bytes()[..], b"body{}");
//!
//! let req = http::Request::get("/static/%2e%2e/etc/passwd").body(Default::default()).unwrap();
//! assert_eq!(files.oneshot(req).await.unwrap().status(), 400);
//! # });
//! ```
//!
//! `StaticFiles` is a terminal service (like [`Forward`](crate::upstream::Forward)): the
//! router sends a location's requests to it with their original URI.

mod backend;
mod future;
mod path;
mod service;

pub use future::ResponseFuture;
pub use path::{check_path, PathError};
pub use service::{Builder, StaticFiles, MAX_EXPIRES};

/// Response extension set by a location with `access_log off`
/// ([`Builder::access_log`]): the access log skips responses that carry it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct SkipAccessLog;
