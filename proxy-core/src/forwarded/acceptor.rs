//! [`ProxyProtocol`]: an [`Accept`] wrapper that reads a PROXY protocol header before
//! handing the stream on.

use std::io;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;

use super::cidr::TrustedProxies;
use super::proxy_protocol::{
    parse, ParseError, ProxyHeader, V1_MAX_LEN, V2_PREFIX_LEN, V2_SIGNATURE,
};
use crate::client_info::ClientInfo;
use crate::server::Accept;

/// What to do with a connection from a source outside the trusted list.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum Untrusted {
    /// Close it: on a listener that speaks PROXY protocol only the load balancer
    /// should connect. The default.
    #[default]
    Reject,
    /// Serve it as it is, reading no header: its socket address stands. A PROXY header
    /// it sends anyway is not understood and fails as a bad request.
    Serve,
}

#[derive(Debug, Clone)]
struct Config {
    trusted: TrustedProxies,
    timeout: Duration,
    untrusted: Untrusted,
}

/// Reads a PROXY protocol v1 or v2 header from connections of trusted sources (an L4
/// load balancer: AWS NLB, HAProxy `send-proxy`), sets [`ClientInfo::peer`] to the
/// source address it names, then hands the stream to the inner acceptor (plain, or a
/// TLS handshake: the header comes before TLS). Not one byte past the header is read,
/// so nothing of the stream is lost.
///
/// A malformed header, a missing one (the connection closes or says something else
/// first) or a header that takes longer than the timeout (default 5 s) closes the
/// connection. A v2 `LOCAL` header or a v1 `UNKNOWN` keeps the socket address.
///
/// ```
/// use proxy_core::forwarded::ProxyProtocol;
/// use proxy_core::server::{Accept, Plain};
/// fn listener_acceptor<A: Accept>(_: A) {}
/// let nlb = ProxyProtocol::new(Plain, "10.0.0.0/8".parse().unwrap())
///     .header_timeout(std::time::Duration::from_secs(3));
/// listener_acceptor(nlb);
/// ```
#[derive(Debug, Clone)]
pub struct ProxyProtocol<A> {
    inner: A,
    config: Arc<Config>,
}

impl<A> ProxyProtocol<A> {
    /// Read headers from connections whose source is in `trusted`; close others.
    pub fn new(inner: A, trusted: TrustedProxies) -> Self {
        ProxyProtocol {
            inner,
            config: Arc::new(Config {
                trusted,
                timeout: Duration::from_secs(5),
                untrusted: Untrusted::Reject,
            }),
        }
    }

    /// How long a trusted source has to send its header (default 5 s; a load balancer
    /// sends it with the connection).
    pub fn header_timeout(mut self, timeout: Duration) -> Self {
        self.config_mut().timeout = timeout;
        self
    }

    /// What to do with connections from untrusted sources (default: close them).
    pub fn untrusted(mut self, untrusted: Untrusted) -> Self {
        self.config_mut().untrusted = untrusted;
        self
    }

    fn config_mut(&mut self) -> &mut Config {
        Arc::make_mut(&mut self.config)
    }
}

impl<A: Accept> Accept for ProxyProtocol<A> {
    type Io = A::Io;

    async fn accept(&self, mut stream: TcpStream, info: &mut ClientInfo) -> io::Result<A::Io> {
        if !self.config.trusted.contains(info.peer.ip()) {
            match self.config.untrusted {
                Untrusted::Reject => {
                    return Err(io::Error::new(
                        io::ErrorKind::PermissionDenied,
                        "PROXY protocol connection from an untrusted source",
                    ))
                }
                Untrusted::Serve => return self.inner.accept(stream, info).await,
            }
        }
        let header = tokio::time::timeout(self.config.timeout, read_header(&mut stream))
            .await
            .map_err(|_| {
                io::Error::new(io::ErrorKind::TimedOut, "PROXY protocol header timeout")
            })??;
        if let ProxyHeader::Proxy { src, .. } = header {
            info.peer = src;
        }
        self.inner.accept(stream, info).await
    }

    fn raw_tcp(io: &A::Io) -> Option<&TcpStream> {
        A::raw_tcp(io)
    }
}

/// Read one header, exactly: never a byte of the stream behind it.
///
/// Both versions are at least 15 bytes long (`PROXY UNKNOWN\r\n`), so those are read
/// whole. A v2 header then says its length. A v1 header ends at the first LF: the
/// socket is peeked, and only bytes up to that LF are consumed (peeked bytes with no LF
/// are all header bytes, so they are consumed too and the peek waits for more).
pub async fn read_header(stream: &mut TcpStream) -> io::Result<ProxyHeader> {
    // Every index below is bounded by constants (`len < V1_MAX_LEN <= buf.len()`,
    // `n <= V1_MAX_LEN - len`), never by what the peer sent.
    const MIN: usize = 15;
    let mut buf = [0u8; V2_PREFIX_LEN + 216];
    let mut len = MIN;
    stream.read_exact(&mut buf[..MIN]).await?;
    if buf[..12] == V2_SIGNATURE {
        stream.read_exact(&mut buf[MIN..V2_PREFIX_LEN]).await?;
        let body = usize::from(u16::from_be_bytes([buf[14], buf[15]]));
        let total = V2_PREFIX_LEN + body;
        if total <= buf.len() {
            stream.read_exact(&mut buf[V2_PREFIX_LEN..total]).await?;
            return finish(parse(&buf[..total]));
        }
        // Long TLVs: rare, up to 64 KiB, from a trusted source only.
        let mut big = Vec::with_capacity(total);
        big.extend_from_slice(&buf[..V2_PREFIX_LEN]);
        big.resize(total, 0);
        stream.read_exact(&mut big[V2_PREFIX_LEN..]).await?;
        return finish(parse(&big));
    }
    if !buf[..MIN].starts_with(b"PROXY ") {
        return Err(invalid());
    }
    while !buf[..len].contains(&b'\n') {
        if len >= V1_MAX_LEN {
            return Err(invalid());
        }
        let n = stream.peek(&mut buf[len..V1_MAX_LEN]).await?;
        if n == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        let take = buf[len..len + n]
            .iter()
            .position(|&b| b == b'\n')
            .map_or(n, |i| i + 1);
        stream.read_exact(&mut buf[len..len + take]).await?;
        len += take;
    }
    finish(parse(&buf[..len]))
}

fn finish(parsed: Result<(ProxyHeader, usize), ParseError>) -> io::Result<ProxyHeader> {
    match parsed {
        Ok((header, _)) => Ok(header),
        Err(_) => Err(invalid()),
    }
}

fn invalid() -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, "invalid PROXY protocol header")
}
