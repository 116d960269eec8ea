//! TLS termination for proxy-core (rustls).
#![deny(missing_docs)]
