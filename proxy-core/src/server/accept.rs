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
}
