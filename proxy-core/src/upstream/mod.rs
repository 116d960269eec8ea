//! Talking to upstream servers: a pooled HTTP/1.1 [`UpstreamClient`] and the
//! [`Forward`] service that proxies a request to one fixed address through it.
//!
//! The client keeps idle keep-alive connections per upstream (nginx's `keepalive 32`),
//! closes them after an idle timeout shorter than uvicorn's 5 s keep-alive, strips
//! hop-by-hop headers both ways, checks the upstream's response strictly, passes
//! WebSocket upgrades through (HTTP/1.1 upgrades, and HTTP/2 extended CONNECT turned into
//! them), and maps failures to 502/504.
//!
//! ```no_run
//! use proxy_core::upstream::{ClientConfig, Forward, UpstreamClient};
//! let client = UpstreamClient::new(ClientConfig::default());
//! let forward = Forward::new(client, "127.0.0.1:8000".parse().unwrap());
//! # let _ = forward;
//! ```

mod client;
mod extended_connect;
pub(crate) use client::percent_encode_non_ascii;
mod forward;
pub(crate) mod pool;
mod tunnel;

pub use client::{ClientConfig, UpstreamClient};
pub use forward::{Forward, ResponseFuture};
pub use tunnel::UpstreamTimeouts;
