//! Upstream servers found through DNS: nginx's `server backend.internal resolve;`.
//!
//! A [`Discovery`] knows some names ([`Target`]s: a host name and a port, resolved
//! through A/AAAA, or an SRV name that gives ports, weights and priorities) and some
//! fixed servers. It resolves them once at start, then again in a background task
//! ([`DiscoveryTask`]) when the answers' TTL runs out (or on a fixed interval, nginx's
//! `resolver ... valid=`), and hands every resulting server list to the
//! [`Group`](crate::balance::Group) with [`Group::set_servers`](crate::balance::Group::set_servers): addresses that
//! appear become servers with the target's parameters, addresses that disappear are
//! drained (their in-flight requests finish; no new request goes to them).
//!
//! A failed lookup (timeout, SERVFAIL, no name server reachable) keeps the name's last
//! good addresses and is logged and counted ([`DiscoveryStats::failures`]). An answer
//! that the name has no address (NXDOMAIN, no records) is an answer: the name's
//! servers go, unless that would leave the group without a primary server, which
//! [`Group::set_servers`](crate::balance::Group::set_servers) refuses (the old set stays, and it is logged).
//!
//! The DNS itself is [hickory-resolver](https://docs.rs/hickory-resolver); name servers
//! come from `/etc/resolv.conf` unless given.
//!
//! ```
//! use std::time::Duration;
//! use proxy_core::balance::{Group, Server};
//! use proxy_core::discovery::{Discovery, Target};
//! # tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async {
//! // upstream app { server localhost:8000 resolve max_fails=3; server 127.0.0.1:8009 backup; }
//! let discovery = Discovery::builder()
//!     .target(Target::host("localhost", 8000).unwrap()
//!         .template(Server::new("0.0.0.0:0".parse().unwrap()).max_fails(3)))
//!     .server(Server::new("127.0.0.1:8009".parse().unwrap()).backup())
//!     .max_ttl(Duration::from_secs(30))
//!     .build()
//!     .unwrap();
//! // Resolves now (localhost comes from /etc/hosts), builds the group, and keeps it
//! // up to date until `task` is dropped.
//! let (group, task) = discovery.group(Group::builder("app")).await.unwrap();
//! let servers: Vec<_> = group.stats().map(|s| (s.addr.port(), s.backup)).collect();
//! assert!(servers.contains(&(8000, false)) && servers.contains(&(8009, true)));
//! assert_eq!(discovery.stats().failures, 0);
//! drop(task);
//! # });
//! ```

mod resolve;
mod task;

pub use resolve::{Discovery, DiscoveryBuilder, DiscoveryError, DiscoveryStats, Target};
pub use task::DiscoveryTask;

/// The README section (`docs/scaling.md`), so that its example is compiled by the doc
/// tests.
#[cfg(all(doctest, feature = "redis"))]
#[doc = include_str!("../../../docs/scaling.md")]
struct ReadmeSection;
