//! # proxy-core
//!
//! The reverse proxy as composable [`tower`] services: a server that accepts HTTP/1.1 and
//! HTTP/2, a router of virtual servers and locations with nginx's precedence, a pooled
//! upstream client, and one module per capability (forwarded headers, balancing, rate
//! limits, buffering and timeouts, static files), each a `Layer` + `Service` usable on its
//! own in any hyper or axum stack.
//!
//! Every service takes an [`http::Request<ProxyBody>`](body::ProxyBody) and answers with
//! an `http::Response<ProxyBody>`; failures are responses with a status (502, 504, 413,
//! 429...), never `Err`.
#![deny(missing_docs)]
// No unwrap or expect in library code: input reaches almost every path (tests may, see
// clippy.toml).
#![deny(clippy::unwrap_used, clippy::expect_used)]

pub mod access;
pub mod access_log;
pub mod balance;
pub mod body;
pub mod buffer;
pub mod client_info;
#[cfg(feature = "dns")]
pub mod discovery;
pub mod error;
pub mod error_page;
pub mod forwarded;
pub mod headers;
pub mod hop;
pub mod limit;
pub mod metrics;
pub mod reload;
pub mod response;
pub mod router;
pub mod server;
pub mod static_files;
#[doc(hidden)]
pub mod testing;
pub mod timeout;
pub mod upstream;

pub use body::{ProxyBody, Request, Response};
pub use client_info::{ClientInfo, Scheme};
pub use error::Error;
