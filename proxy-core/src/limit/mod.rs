//! Per-client rate limits: nginx's `limit_req` and `limit_conn` as tower layers.
//!
//! * [`LimitReqLayer`] limits the request **rate** per key with nginx's exact arithmetic:
//!   the excess (in milli-requests) decays at the [`Rate`]; a request that would push it
//!   past the burst is rejected (503 by default, with `Retry-After`); one within the burst
//!   is delayed by `(excess - delay) / rate` ([`Delay::All`], nginx's default), passes at
//!   once ([`Delay::Never`], `nodelay`), or passes once `n` are waiting
//!   ([`Delay::After`], `delay=n`).
//! * [`LimitConnLayer`] limits the requests **in flight** per key (503 beyond).
//!
//! Both count in named zones ([`ReqZone`], [`ConnZone`]) that are built once and cloned
//! into every location that uses them: every clone, connection and location shares one
//! budget. A zone is bounded (a fixed number of entries, sharded, least recently used
//! entries evicted inline), so a flood of distinct keys costs constant memory and
//! constant time per request. Keys are the real client address (the default, see
//! [`client_ip`](crate::client_info::client_ip)), a header, or one shared key ([`Key`]);
//! requests with an empty key are not counted.
//!
//! Time is tokio's clock, so tests run on a paused clock.
//!
//! ```
//! use std::num::{NonZeroU32, NonZeroUsize};
//! use http::StatusCode;
//! use proxy_core::limit::{Key, LimitConnLayer, LimitReqLayer, ConnZone, ReqLimit, ReqZone};
//! use proxy_core::{ClientInfo, ProxyBody, Scheme};
//! use tower::{Layer, ServiceBuilder, ServiceExt};
//!
//! // limit_req_zone $binary_remote_addr zone=auth:10m rate=5r/m;
//! let auth = ReqZone::builder("5r/m".parse().unwrap())
//!     .name("auth")
//!     .key(Key::ClientIp)
//!     .size_bytes(10 << 20)
//!     .build();
//! // limit_conn_zone $binary_remote_addr zone=addr:1m;
//! let addr = ConnZone::builder().name("addr").build();
//!
//! // location /auth/token { limit_req zone=auth burst=10 nodelay; limit_req_status 429;
//! //                        limit_conn addr 4; proxy_pass ...; }
//! let app = tower::service_fn(|_req: proxy_core::Request| async {
//!     Ok::<_, std::convert::Infallible>(http::Response::new(ProxyBody::from("token")))
//! });
//! let svc = ServiceBuilder::new()
//!     .layer(LimitReqLayer::new(ReqLimit::new(auth).burst(10).nodelay())
//!         .status(StatusCode::TOO_MANY_REQUESTS))
//!     .layer(LimitConnLayer::new(addr, NonZeroU32::new(4).unwrap()))
//!     .service(app);
//!
//! let request = || {
//!     let mut req = http::Request::new(ProxyBody::empty());
//!     // The server puts this in every request; the forwarded-headers layer may refine it.
//!     req.extensions_mut().insert(ClientInfo::new(
//!         "192.0.2.7:50000".parse().unwrap(), "127.0.0.1:80".parse().unwrap(), Scheme::Http));
//!     req
//! };
//! # tokio::runtime::Builder::new_current_thread().enable_time().build().unwrap().block_on(async {
//! for _ in 0..11 {
//!     assert_eq!(svc.clone().oneshot(request()).await.unwrap().status(), 200);
//! }
//! let limited = svc.clone().oneshot(request()).await.unwrap();
//! assert_eq!(limited.status(), 429);
//! assert_eq!(limited.headers()["retry-after"], "13");
//! # });
//! ```

mod hold;
mod key;
mod rate;
mod zone;

pub mod conn;
#[cfg(feature = "redis")]
pub mod redis;
pub mod req;

pub use conn::{LimitConnLayer, LimitConnStatus};
pub use key::Key;
pub use rate::{ParseRateError, Rate};
pub use req::{Decision, Delay, LimitReqLayer, LimitReqStatus, RejectedBy, ReqLimit};
pub use zone::{ConnZone, ConnZoneBuilder, ReqZone, ReqZoneBuilder, DEFAULT_CAPACITY, ENTRY_BYTES};
