//! [`ClientInfo`]: what the listener knows about the connection a request came on.
//!
//! The server inserts it into every request's extensions; later layers (forwarded
//! headers, rate limits, access logs) read it.
//!
//! ```
//! use proxy_core::client_info::{ClientInfo, Scheme};
//! let info = ClientInfo::new(
//!     "127.0.0.2:40000".parse().unwrap(),
//!     "127.0.0.1:8080".parse().unwrap(),
//!     Scheme::Http,
//! );
//! let mut req = http::Request::new(());
//! req.extensions_mut().insert(info.clone());
//! assert_eq!(ClientInfo::of(&req).map(|c| c.peer), Some(info.peer));
//! ```

use std::net::SocketAddr;
use std::sync::Arc;

/// The scheme a request arrived with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Scheme {
    /// Plain HTTP.
    Http,
    /// HTTP over TLS.
    Https,
}

impl Scheme {
    /// `"http"` or `"https"`.
    pub fn as_str(self) -> &'static str {
        match self {
            Scheme::Http => "http",
            Scheme::Https => "https",
        }
    }
}

/// The connection a request arrived on. Cheap to clone (the SNI name is shared).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientInfo {
    /// The socket peer (or the address a trusted PROXY protocol header named).
    pub peer: SocketAddr,
    /// The local address the connection was accepted on.
    pub local: SocketAddr,
    /// `https` on TLS listeners.
    pub scheme: Scheme,
    /// The TLS server name the client sent, if any.
    pub sni: Option<Arc<str>>,
}

impl ClientInfo {
    /// Connection facts without TLS details.
    pub fn new(peer: SocketAddr, local: SocketAddr, scheme: Scheme) -> Self {
        ClientInfo {
            peer,
            local,
            scheme,
            sni: None,
        }
    }

    /// The `ClientInfo` of a request, if a server put one there.
    pub fn of<B>(req: &http::Request<B>) -> Option<&ClientInfo> {
        req.extensions().get::<ClientInfo>()
    }
}
