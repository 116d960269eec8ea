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

use std::net::{IpAddr, SocketAddr};
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

/// The client as the forwarded-headers layer resolved it (from trusted proxies' headers,
/// or the socket peer). Rate limits and access logs key on it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RealClient {
    /// The client's address.
    pub ip: IpAddr,
    /// The client's port, when known.
    pub port: Option<u16>,
    /// The scheme the client used to reach the first proxy.
    pub scheme: Scheme,
    /// The host the client asked for, when a trusted proxy said so.
    pub host: Option<http::HeaderValue>,
}

/// The real client address of a request: the [`RealClient`] a forwarded-headers layer
/// resolved, else the socket peer from [`ClientInfo`], else `None`.
///
/// ```
/// use proxy_core::client_info::{client_ip, ClientInfo, Scheme};
/// let mut req = http::Request::new(());
/// assert_eq!(client_ip(&req), None);
/// req.extensions_mut().insert(ClientInfo::new(
///     "127.0.0.2:1".parse().unwrap(), "127.0.0.1:80".parse().unwrap(), Scheme::Http));
/// assert_eq!(client_ip(&req), Some("127.0.0.2".parse().unwrap()));
/// ```
pub fn client_ip<B>(req: &http::Request<B>) -> Option<IpAddr> {
    let ext = req.extensions();
    ext.get::<RealClient>()
        .map(|c| c.ip)
        .or_else(|| ext.get::<ClientInfo>().map(|c| c.peer.ip()))
}
