//! Upstream groups and load balancing, with nginx's decisions.
//!
//! A [`Group`] is nginx's `upstream { ... }` block: [`Server`]s with a weight,
//! `max_fails`/`fail_timeout` accounting, a `max_conns` cap and backup servers, chosen
//! by smooth weighted round-robin or [`least_conn`](Policy::LeastConn). [`Balance`] is
//! the terminal service that sends each request to a server of the group through the
//! pooled [`UpstreamClient`](crate::upstream::UpstreamClient), and on failure tries the
//! next one as [`NextUpstream`] (nginx's `proxy_next_upstream`) allows. An optional
//! [`HealthCheck`] probes every server in the background.
//!
//! The group's state is shared by every connection (`Arc<Group>`): in-flight counts
//! and failure counts are atomics, and the round-robin state is sharded so concurrent
//! picks do not wait on one lock. A request's in-flight slot ([`Lease`]) is given back
//! when its response body ends or when the request is dropped (client gone).
//!
//! Weights 5, 1, 1 give nginx's smooth sequence `a a b a c a a`:
//!
//! ```
//! use std::num::NonZeroU32;
//! use proxy_core::balance::{Group, Server};
//! let w = |n| NonZeroU32::new(n).unwrap();
//! let group = Group::builder("app")
//!     .server(Server::new("127.0.0.1:8001".parse().unwrap()).weight(w(5)))
//!     .server(Server::new("127.0.0.1:8002".parse().unwrap()).weight(w(1)))
//!     .server(Server::new("127.0.0.1:8003".parse().unwrap()).weight(w(1)))
//!     .build()
//!     .unwrap();
//! let ports: Vec<u16> = (0..7)
//!     .map(|_| group.select(&mut group.tried()).unwrap().addr().port())
//!     .collect();
//! assert_eq!(ports, [8001, 8001, 8002, 8001, 8003, 8001, 8001]);
//! // Every lease was dropped: nothing is in flight.
//! assert!(group.stats().all(|s| s.in_flight == 0));
//! ```
//!
//! In a stack, `Balance` is the innermost service:
//!
//! ```
//! use std::time::Duration;
//! use proxy_core::balance::{Balance, Condition, Group, NextUpstream, Policy, Server};
//! use proxy_core::upstream::{ClientConfig, UpstreamClient};
//! let group = Group::builder("uvicorn")
//!     .policy(Policy::LeastConn)
//!     .server(Server::new("127.0.0.1:8001".parse().unwrap()).max_fails(3).fail_timeout(Duration::from_secs(30)))
//!     .server(Server::new("127.0.0.1:8002".parse().unwrap()).max_fails(3).fail_timeout(Duration::from_secs(30)))
//!     .server(Server::new("127.0.0.1:8009".parse().unwrap()).backup())
//!     .build()
//!     .unwrap();
//! let service = tower::ServiceBuilder::new()
//!     // ... rate limits, body limits, timeouts ...
//!     .service(Balance::new(group, UpstreamClient::new(ClientConfig::default()))
//!         .with_next_upstream(NextUpstream::default().on(Condition::Http502).tries(2)));
//! # let _ = service;
//! ```

mod future;
mod group;
mod health;
mod pick;
mod replay;
mod server;
mod service;

pub use future::{ResponseBody, ResponseFuture};
pub use group::{Group, GroupBuilder, GroupError, Lease, Policy};
pub use health::HealthCheck;
pub use pick::Tried;
pub use server::{Server, ServerState, ServerStats};
pub use service::{Balance, Condition, NextUpstream, Retries, UnknownCondition};

/// The README section (`docs/balance.md`), so that its example is compiled by the doc
/// tests.
#[cfg(doctest)]
#[doc = include_str!("../../../docs/balance.md")]
struct ReadmeSection;

#[cfg(test)]
mod tests;
