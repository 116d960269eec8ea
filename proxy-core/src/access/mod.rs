//! Allow and deny by client address: nginx's `allow` / `deny`, as [`AccessLayer`].
//!
//! Rules are checked in order and the first that matches decides (nginx's semantics); when
//! none matches the request is allowed. A denied request is answered **403** (or the
//! status set with [`AccessRulesBuilder::deny_status`]) without calling the inner service.
//!
//! The address checked is the *real* client, [`client_ip`](crate::client_info::client_ip):
//! the one a forwarded-headers layer resolved from trusted proxies, else the socket peer.
//! So put this layer *inside* (after) the forwarded-headers layer. IPv4-mapped IPv6
//! addresses (`::ffff:10.0.0.1`, from dual-stack listeners) are matched as IPv4. A request
//! with no known address matches only the `all` rules.
//!
//! ```
//! use std::convert::Infallible;
//! use proxy_core::access::{AccessLayer, AccessRules};
//! use proxy_core::client_info::{ClientInfo, Scheme};
//! use proxy_core::{ProxyBody, Request, Response};
//! use tower::{service_fn, Layer, ServiceExt};
//! # tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(async {
//! // allow 10.0.0.0/8; allow 2001:db8::/32; deny all;
//! let rules = AccessRules::builder()
//!     .allow("10.0.0.0/8".parse().unwrap())
//!     .allow("2001:db8::/32".parse().unwrap())
//!     .deny_all()
//!     .build();
//! let app = service_fn(|_req: Request| async { Ok::<_, Infallible>(Response::new(ProxyBody::from("hi"))) });
//! let svc = AccessLayer::new(rules).layer(app);
//!
//! let from = |peer: &str| {
//!     let mut req = http::Request::new(ProxyBody::empty());
//!     req.extensions_mut().insert(ClientInfo::new(
//!         peer.parse().unwrap(), "127.0.0.1:80".parse().unwrap(), Scheme::Http));
//!     req
//! };
//! assert_eq!(svc.clone().oneshot(from("10.1.2.3:5000")).await.unwrap().status(), 200);
//! assert_eq!(svc.clone().oneshot(from("[::ffff:10.9.9.9]:5000")).await.unwrap().status(), 200);
//! assert_eq!(svc.oneshot(from("192.0.2.7:5000")).await.unwrap().status(), 403);
//! # });
//! ```

mod rules;
mod service;

pub use rules::{AccessRules, AccessRulesBuilder, Action};
pub use service::{Access, AccessLayer, ResponseFuture};
