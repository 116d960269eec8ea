//! A `limit_req` zone shared by many proxy instances through Redis.
//!
//! [`RedisZone`] keeps nginx's per-key state (the excess, in milli-requests, and the
//! time of the last request) in Redis, and steps it atomically with a Lua script that
//! does the same integer arithmetic as the local limiter, on Redis's clock. Every
//! instance that names the same zone in the same Redis shares one budget per key: two
//! instances admit `rate·t + burst` in total, not twice that. Keys expire once their
//! excess has drained.
//!
//! * **Exact by default**: each counted request waits for one Redis round trip
//!   (`EVALSHA`, on one multiplexed connection shared by every connection of the
//!   instance).
//! * **Local fast path** ([`RedisZoneBuilder::local_allowance`]): when a small
//!   overshoot is acceptable, an instance admits up to `n` requests per key without
//!   waiting, as long as its last view of the key says they fit without delay; their
//!   accounting goes to Redis in the background and refreshes the view.
//! * **When Redis cannot answer** (down, unreachable, slower than the timeout), the
//!   [`FailMode`] decides: admit ([`FailMode::Open`]), reject ([`FailMode::Closed`]),
//!   or limit per instance with the same rate ([`FailMode::Local`], the default). Each
//!   outcome is counted ([`RedisZone::stats`]); while Redis is away, reconnection is
//!   tried at most once per backoff, so requests do not pay a connect timeout each.
//!
//! [`RedisLimitReqLayer`] applies it, with the decisions of
//! [`LimitReqLayer`](crate::limit::LimitReqLayer): reject above the burst (503 or the
//! configured status, `Retry-After`), delay within it unless `nodelay` or `delay=N`.
//!
//! ```
//! use std::time::Duration;
//! use proxy_core::limit::redis::{FailMode, RedisLimit, RedisLimitReqLayer, RedisZone};
//! use proxy_core::{ClientInfo, ProxyBody, Scheme};
//! use tower::{Layer, ServiceExt};
//! # tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async {
//! // limit_req_zone $binary_remote_addr zone=api:10m rate=10r/s;  (in Redis)
//! // Nothing listens on port 1: Redis is "down", and the zone fails closed.
//! let zone = RedisZone::builder("redis://127.0.0.1:1", "10r/s".parse().unwrap())
//!     .unwrap()
//!     .name("api")
//!     .fail(FailMode::Closed)
//!     .build();
//! let app = tower::service_fn(|_req: proxy_core::Request| async {
//!     Ok::<_, std::convert::Infallible>(http::Response::new(ProxyBody::from("ok")))
//! });
//! let svc = RedisLimitReqLayer::new(RedisLimit::new(zone.clone()).burst(20).nodelay())
//!     .status(http::StatusCode::TOO_MANY_REQUESTS)
//!     .layer(app);
//! let mut req = http::Request::new(ProxyBody::empty());
//! req.extensions_mut().insert(ClientInfo::new(
//!     "192.0.2.7:50000".parse().unwrap(), "127.0.0.1:80".parse().unwrap(), Scheme::Http));
//! let resp = svc.oneshot(req).await.unwrap();
//! assert_eq!(resp.status(), 429);
//! assert_eq!(zone.stats().failed_closed, 1);
//! # });
//! ```

mod layer;
mod zone;

pub use layer::{RedisLimit, RedisLimitReq, RedisLimitReqLayer, ResponseFuture};
pub use zone::{FailMode, RedisZone, RedisZoneBuilder, RedisZoneStats};
