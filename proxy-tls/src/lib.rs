//! # proxy-tls
//!
//! TLS termination for proxy-core with rustls (ring provider, TLS 1.2 and 1.3 only):
//!
//! - [`acceptor::TlsAcceptor`]: the handshake as a [`proxy_core::server::Accept`], with SNI
//!   certificate selection, ALPN `h2`/`http/1.1`, session resumption and a timeout;
//! - [`certs`]: PEM chains and RSA/ECDSA/Ed25519 keys (PKCS#1, PKCS#8, SEC1);
//! - [`policy`]: protocol versions and cipher suites by their nginx/OpenSSL names;
//! - [`sni::CertStore`]: exact and wildcard names from the certificates' SANs, a default;
//! - [`reload::Reloader`]: re-read on demand (SIGHUP) and on file change, atomic swap;
//! - [`redirect::HttpsRedirectLayer`], [`challenge::AcmeChallengeLayer`],
//!   [`hsts::HstsLayer`]: the plain-HTTP listener's redirect, the ACME HTTP-01 challenge
//!   path (ours and certbot's webroot), HSTS;
//! - [`ocsp::Stapler`]: OCSP responses fetched (or read from a file), checked, stapled
//!   and refreshed;
//! - [`acme::AcmeManager`]: certificates obtained and renewed from an ACME directory;
//! - [`selfsigned`]: a localhost certificate for local development.
//!
//! ```
//! use proxy_tls::{acceptor::TlsAcceptor, selfsigned, sni::CertStore};
//! let store = CertStore::new();
//! store.insert("dev", selfsigned::localhost().unwrap().loaded);
//! let acceptor = TlsAcceptor::builder(store).build().unwrap();
//! // Hand `acceptor` to the server as the listener's `Accept`.
//! fn is_accept<A: proxy_core::server::Accept>(_: &A) -> bool { true }
//! assert!(is_accept(&acceptor));
//! ```
#![deny(missing_docs)]

pub mod acceptor;
pub mod acme;
pub mod certs;
pub mod challenge;
pub mod error;
mod fsutil;
pub mod hsts;
pub mod ocsp;
pub mod policy;
pub mod redirect;
pub mod reload;
pub mod selfsigned;
pub mod sni;
mod tickets;

pub use acceptor::{TlsAcceptor, TlsStats};
pub use certs::LoadedCert;
pub use error::Error;
pub use sni::CertStore;
