//! The server: listeners bound with socket2, connections served with hyper-util's
//! HTTP/1.1 + HTTP/2 builder, graceful shutdown.
//!
//! Each accepted connection goes through an [`Accept`] (plain, PROXY protocol, TLS),
//! gets a [`ClientInfo`](crate::ClientInfo) that every request on it carries, and is
//! served by the tower service given to [`Server::serve`].

mod accept;
mod adapter;
mod config;
mod h1;
mod listener;
mod park_io;
mod serve;

pub(crate) use adapter::ConnState;

pub use accept::{Accept, Plain};
pub use config::HttpConfig;
pub use listener::ListenConfig;
pub use serve::{Server, ServerStats};
