//! The server: listeners bound with socket2, connections served with hyper-util's
//! HTTP/1.1 + HTTP/2 builder, graceful shutdown.

mod accept;

pub use accept::{Accept, Plain};
