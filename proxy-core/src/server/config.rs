//! Connection-level HTTP settings, with nginx's defaults.

use std::time::Duration;

/// Per-connection HTTP settings of a server.
///
/// ```
/// use proxy_core::server::HttpConfig;
/// let c = HttpConfig::default();
/// assert_eq!(c.header_read_timeout, std::time::Duration::from_secs(60));
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct HttpConfig {
    /// Time allowed to receive a whole request header (nginx's `client_header_timeout`,
    /// default 60 s), counted from the connection's accept for its first request.
    pub header_read_timeout: Duration,
    /// Keep client connections open between requests (default on).
    pub keep_alive: bool,
    /// How long a keep-alive connection may wait for its next request (nginx's
    /// `keepalive_timeout`). `None` (the default): [`header_read_timeout`](Self::header_read_timeout).
    pub keep_alive_timeout: Option<Duration>,
    /// Release an HTTP/1 connection's HTTP state and buffers (about 16 KiB) while it waits
    /// for its next request, as nginx does (default on). Applies to connections whose
    /// [`Accept::raw_tcp`](crate::server::Accept::raw_tcp) gives the socket: plain TCP
    /// and PROXY protocol listeners, not TLS.
    pub park_idle: bool,
    /// How long a connection must have been idle (every response sent, no new request)
    /// before it is parked (default 250 ms; it is parked within twice that). Zero parks
    /// after every response, which costs about 11,000 instructions per request for
    /// setting up hyper's connection again; with a delay, busy connections stay with hyper
    /// and parking costs nothing measurable.
    pub park_after: Duration,
    /// Requests served on one connection before it is closed (nginx's
    /// `keepalive_requests`, default 1000).
    pub max_requests_per_connection: u32,
    /// Largest request header block in bytes, request line included (nginx's
    /// `large_client_header_buffers`, default 8 KiB × 4 = 32 KiB). Past it: 431, or 414
    /// for an overlong request line.
    pub max_header_size: usize,
    /// Most header fields in one request (default 100). Past it: 431.
    pub max_headers: usize,
    /// HTTP/2 PING interval on idle connections (default 20 s; none disables).
    pub h2_keep_alive_interval: Option<Duration>,
    /// HTTP/2 PING acknowledgement timeout (default 20 s).
    pub h2_keep_alive_timeout: Duration,
    /// Concurrent HTTP/2 streams per connection (nginx's `http2_max_concurrent_streams`,
    /// default 128).
    pub h2_max_concurrent_streams: u32,
    /// Connections served at once by one listener; further connections get a 503 and
    /// are closed (nginx's `limit_conn` per server / `worker_connections`). None: no cap.
    pub max_connections: Option<usize>,
    /// How long graceful shutdown waits for in-flight requests (default 30 s).
    pub shutdown_timeout: Duration,
    /// After the listener closes, how long connections that were just accepted get to
    /// send their first request before idle connections are closed (default 500 ms).
    pub shutdown_linger: Duration,
}

impl Default for HttpConfig {
    fn default() -> Self {
        HttpConfig {
            header_read_timeout: Duration::from_secs(60),
            keep_alive: true,
            keep_alive_timeout: None,
            park_idle: true,
            park_after: Duration::from_millis(250),
            max_requests_per_connection: 1000,
            max_header_size: 32 * 1024,
            max_headers: 100,
            h2_keep_alive_interval: Some(Duration::from_secs(20)),
            h2_keep_alive_timeout: Duration::from_secs(20),
            h2_max_concurrent_streams: 128,
            max_connections: None,
            shutdown_timeout: Duration::from_secs(30),
            shutdown_linger: Duration::from_millis(500),
        }
    }
}
