//! Binding listening sockets with socket2: SO_REUSEADDR, optional SO_REUSEPORT, a
//! configurable backlog.

use std::net::SocketAddr;

use socket2::{Domain, Protocol, Socket, Type};
use tokio::net::TcpListener;

/// How a listening socket is bound.
///
/// ```
/// # tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async {
/// use proxy_core::server::ListenConfig;
/// let listener = ListenConfig::new("127.0.0.1:0".parse().unwrap()).bind().unwrap();
/// assert_ne!(listener.local_addr().unwrap().port(), 0);
/// # });
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct ListenConfig {
    /// The address to listen on.
    pub addr: SocketAddr,
    /// The accept queue length (nginx's `backlog`, default 511 like nginx on Linux).
    pub backlog: i32,
    /// Set SO_REUSEPORT so several processes can share the port (default off).
    pub reuse_port: bool,
}

impl ListenConfig {
    /// Defaults for `addr`.
    pub fn new(addr: SocketAddr) -> Self {
        ListenConfig {
            addr,
            backlog: 511,
            reuse_port: false,
        }
    }

    /// Set SO_REUSEPORT.
    pub fn reuse_port(mut self, on: bool) -> Self {
        self.reuse_port = on;
        self
    }

    /// Set the listen backlog.
    pub fn backlog(mut self, backlog: i32) -> Self {
        self.backlog = backlog;
        self
    }

    /// Bind and listen. Must be called inside a tokio runtime.
    pub fn bind(&self) -> std::io::Result<TcpListener> {
        let domain = Domain::for_address(self.addr);
        let socket = Socket::new(domain, Type::STREAM, Some(Protocol::TCP))?;
        socket.set_reuse_address(true)?;
        #[cfg(unix)]
        if self.reuse_port {
            socket.set_reuse_port(true)?;
        }
        if self.addr.is_ipv6() {
            socket.set_only_v6(true)?;
        }
        socket.set_tcp_nodelay(true)?;
        socket.set_nonblocking(true)?;
        socket.bind(&self.addr.into())?;
        socket.listen(self.backlog)?;
        TcpListener::from_std(socket.into())
    }
}
