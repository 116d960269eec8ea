//! [`Accept`]: what happens to an accepted TCP stream before HTTP is spoken on it
//! (nothing for plain listeners; a PROXY protocol header, a TLS handshake, or both).

use std::future::Future;

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;

use crate::client_info::ClientInfo;

/// Turns an accepted TCP stream into the I/O object HTTP is served on, and may refine
/// the connection's [`ClientInfo`] (a PROXY protocol header sets the peer; TLS sets the
/// scheme and SNI). Implementations compose: a PROXY protocol acceptor wraps a TLS one.
///
/// ```
/// use proxy_core::server::{Accept, Plain};
/// fn takes_acceptor<A: Accept>(_: A) {}
/// takes_acceptor(Plain);
/// ```
pub trait Accept: Clone + Send + Sync + 'static {
    /// The stream HTTP is served on.
    type Io: AsyncRead + AsyncWrite + Unpin + Send + 'static;

    /// Prepare one accepted connection. An error closes it (and is logged at debug level:
    /// failed handshakes are routine on the internet).
    fn accept(
        &self,
        stream: TcpStream,
        info: &mut ClientInfo,
    ) -> impl Future<Output = std::io::Result<Self::Io>> + Send;

    /// The TCP stream under `io`, when `io` keeps no input of its own: its readability
    /// then tells whether `io` has bytes to read. The server uses it to park idle HTTP/1
    /// keep-alive connections with no HTTP state or buffers while they wait for their next
    /// request (see [`HttpConfig::park_idle`](crate::server::HttpConfig::park_idle)).
    ///
    /// The default, `None`, suits streams that buffer input themselves (TLS): their
    /// connections stay with hyper between requests. Wrappers forward to what they wrap.
    fn raw_tcp(io: &Self::Io) -> Option<&TcpStream> {
        let _ = io;
        None
    }
}

/// Plain TCP: the stream is served as it is.
#[derive(Debug, Clone, Copy, Default)]
pub struct Plain;

impl Accept for Plain {
    type Io = TcpStream;

    fn accept(
        &self,
        stream: TcpStream,
        _info: &mut ClientInfo,
    ) -> impl Future<Output = std::io::Result<TcpStream>> + Send {
        std::future::ready(Ok(stream))
    }

    fn raw_tcp(io: &TcpStream) -> Option<&TcpStream> {
        Some(io)
    }
}
