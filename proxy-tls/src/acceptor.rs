//! [`TlsAcceptor`]: the TLS handshake of a listener, as a [`proxy_core::server::Accept`].
//!
//! rustls with the ring provider, TLS 1.2 and 1.3 (or either alone) and rustls' safe
//! default cipher suites, or a chosen subset of them in a chosen order (see
//! [`crate::policy`]); certificates chosen by SNI from a [`CertStore`], with their stapled
//! OCSP responses; ALPN `h2` and `http/1.1` (the connection driver then serves HTTP/2 or
//! HTTP/1.1 on the stream); session resumption by tickets (rotating keys) and a
//! server-side session cache, both with an optional timeout; a handshake timeout. A failed handshake closes that connection only; it is counted in
//! [`TlsStats`] and logged at debug level.
//!
//! The configuration can be replaced while the acceptor serves ([`TlsAcceptor::reconfigure`],
//! what a config reload does): each handshake reads the configuration current when it
//! starts, so new connections get the new protocols, suites, ALPN, session settings and
//! handshake timeout while established connections keep the ones they were made with.
//!
//! The handshake runs inside [`Accept::accept`]: a server must call it in the
//! connection's own task, not in the accept loop, or one slow client would stall every
//! other accept for up to the handshake timeout.
//!
//! ```
//! use std::time::Duration;
//! use proxy_tls::{acceptor::TlsAcceptor, policy::{self, Protocol}, selfsigned, sni::CertStore};
//! let store = CertStore::new();
//! store.insert("localhost", selfsigned::localhost().unwrap().loaded);
//! let acceptor = TlsAcceptor::builder(store)
//!     .handshake_timeout(Duration::from_secs(5))
//!     // nginx: ssl_protocols TLSv1.2 TLSv1.3; ssl_ciphers ...; ssl_prefer_server_ciphers on;
//!     .protocols(&[Protocol::Tls12, Protocol::Tls13])
//!     .cipher_suites(policy::parse_ciphers(&["ECDHE-ECDSA-AES128-GCM-SHA256"], &[Protocol::Tls12, Protocol::Tls13]).unwrap())
//!     .prefer_server_ciphers(true)
//!     // ssl_session_timeout 10m; ssl_session_cache shared:SSL:10m;
//!     .session_timeout(Some(Duration::from_secs(600)))
//!     .session_cache(40_000)
//!     .build()
//!     .unwrap();
//! assert_eq!(acceptor.server_config().alpn_protocols, [b"h2".to_vec(), b"http/1.1".to_vec()]);
//! assert!(acceptor.server_config().ignore_client_order);
//! assert_eq!(acceptor.server_config().ticketer.lifetime(), 600);
//! assert_eq!(acceptor.stats().failures(), 0);
//! ```

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use proxy_core::client_info::{ClientInfo, Scheme};
use proxy_core::server::Accept;
use rustls::server::ServerSessionMemoryCache;
use rustls::ServerConfig;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio_rustls::server::TlsStream;

use crate::error::{Error, Kind};
use crate::policy::Protocol;
use crate::sni::CertStore;

/// Default handshake timeout (nginx's `ssl_handshake_timeout` is 60 s; a handshake
/// takes one or two round trips, so 10 s is generous and frees slowloris sockets sooner).
pub const DEFAULT_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Default size of the server-side session cache, in sessions (a TLS 1.2 session is a
/// few hundred bytes; nginx's `shared:SSL:10m` holds about 40 000).
pub const DEFAULT_SESSION_CACHE: usize = 20_000;

/// Sessions per MiB of nginx's `ssl_session_cache shared:NAME:SIZE` ("one megabyte can
/// store about 4000 sessions", nginx's documentation), to translate its sizes.
pub const SESSIONS_PER_MIB: usize = 4000;

/// Terminates TLS on accepted connections. Cheap to clone: clones share the rustls
/// configuration (a replacement by [`TlsAcceptor::reconfigure`] applies to every clone),
/// the certificates and the counters. See the [module docs](self).
#[derive(Clone)]
pub struct TlsAcceptor {
    current: Arc<ArcSwap<Settings>>,
    stats: Arc<TlsStats>,
}

/// What one handshake runs with; replaced as a whole.
struct Settings {
    config: Arc<ServerConfig>,
    handshake_timeout: Duration,
    sessions: Sessions,
}

/// The settings the session cache and the ticketer were made from: a reconfiguration that
/// keeps them keeps the cache and the ticket keys, so sessions resume across it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Sessions {
    cache: usize,
    tickets: bool,
    timeout: Option<Duration>,
}

/// Handshake counters, shared by every clone of a [`TlsAcceptor`] (for metrics).
#[derive(Debug, Default)]
pub struct TlsStats {
    ok: AtomicU64,
    failed: AtomicU64,
    timed_out: AtomicU64,
}

impl TlsStats {
    /// Completed handshakes.
    pub fn handshakes(&self) -> u64 {
        self.ok.load(Ordering::Relaxed)
    }

    /// Failed handshakes of any cause, timeouts included.
    pub fn failures(&self) -> u64 {
        self.failed.load(Ordering::Relaxed)
    }

    /// Handshakes that did not complete within the handshake timeout.
    pub fn timeouts(&self) -> u64 {
        self.timed_out.load(Ordering::Relaxed)
    }
}

/// Builds a [`TlsAcceptor`]; from [`TlsAcceptor::builder`].
#[derive(Debug)]
pub struct TlsAcceptorBuilder {
    store: CertStore,
    http2: bool,
    handshake_timeout: Duration,
    session_cache: usize,
    session_tickets: bool,
    session_timeout: Option<Duration>,
    protocols: Vec<Protocol>,
    cipher_suites: Option<Vec<rustls::SupportedCipherSuite>>,
    prefer_server_ciphers: bool,
}

impl TlsAcceptor {
    /// A builder serving the certificates of `store`.
    pub fn builder(store: CertStore) -> TlsAcceptorBuilder {
        TlsAcceptorBuilder {
            store,
            http2: true,
            handshake_timeout: DEFAULT_HANDSHAKE_TIMEOUT,
            session_cache: DEFAULT_SESSION_CACHE,
            session_tickets: true,
            session_timeout: None,
            protocols: vec![Protocol::Tls12, Protocol::Tls13],
            cipher_suites: None,
            prefer_server_ciphers: false,
        }
    }

    /// The rustls configuration new handshakes use (a snapshot: a later
    /// [`reconfigure`](Self::reconfigure) does not change the returned value).
    pub fn server_config(&self) -> Arc<ServerConfig> {
        self.current.load().config.clone()
    }

    /// The handshake timeout new handshakes use.
    pub fn handshake_timeout(&self) -> Duration {
        self.current.load().handshake_timeout
    }

    /// Make new handshakes use the configuration of `new` (protocols, cipher suites,
    /// server preference, ALPN, session settings, handshake timeout); handshakes already
    /// started and established connections keep the configuration they began with.
    ///
    /// What stays this acceptor's own: its certificate resolver (the [`CertStore`] it was
    /// built on, which the caller keeps up to date with the new certificates, its file
    /// watcher and OCSP stapler), its counters, and, when `new`'s session cache size,
    /// tickets and session timeout equal the current ones, its session cache and ticket
    /// keys, so sessions made before the change still resume.
    pub fn reconfigure(&self, new: &TlsAcceptor) {
        let old = self.current.load_full();
        let next = new.current.load_full();
        let mut config = ServerConfig::clone(&next.config);
        config.cert_resolver = old.config.cert_resolver.clone();
        if next.sessions == old.sessions {
            config.session_storage = old.config.session_storage.clone();
            config.ticketer = old.config.ticketer.clone();
        }
        self.current.store(Arc::new(Settings {
            config: Arc::new(config),
            handshake_timeout: next.handshake_timeout,
            sessions: next.sessions,
        }));
    }

    /// The handshake counters.
    pub fn stats(&self) -> &Arc<TlsStats> {
        &self.stats
    }

    /// Run the handshake on any stream, within the handshake timeout. Counts and logs a
    /// failure; the caller only has to drop the connection.
    pub async fn handshake<IO>(&self, io: IO) -> std::io::Result<TlsStream<IO>>
    where
        IO: AsyncRead + AsyncWrite + Unpin,
    {
        let settings = self.current.load_full();
        let acceptor = tokio_rustls::TlsAcceptor::from(settings.config.clone());
        match tokio::time::timeout(settings.handshake_timeout, acceptor.accept(io)).await {
            Ok(Ok(tls)) => {
                self.stats.ok.fetch_add(1, Ordering::Relaxed);
                Ok(tls)
            }
            Ok(Err(e)) => {
                self.stats.failed.fetch_add(1, Ordering::Relaxed);
                Err(e)
            }
            Err(_) => {
                self.stats.failed.fetch_add(1, Ordering::Relaxed);
                self.stats.timed_out.fetch_add(1, Ordering::Relaxed);
                Err(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    "TLS handshake timed out",
                ))
            }
        }
    }
}

impl Accept for TlsAcceptor {
    type Io = TlsStream<TcpStream>;

    async fn accept(&self, stream: TcpStream, info: &mut ClientInfo) -> std::io::Result<Self::Io> {
        match self.handshake(stream).await {
            Ok(tls) => {
                info.scheme = Scheme::Https;
                info.sni = tls.get_ref().1.server_name().map(Arc::from);
                Ok(tls)
            }
            Err(e) => {
                // Routine on the internet (scanners, plain HTTP to 443, old clients).
                tracing::debug!(peer = %info.peer, error = %e, "TLS handshake failed");
                Err(e)
            }
        }
    }
}

impl std::fmt::Debug for TlsAcceptor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let settings = self.current.load();
        f.debug_struct("TlsAcceptor")
            .field("alpn", &settings.config.alpn_protocols)
            .field("handshake_timeout", &settings.handshake_timeout)
            .field("stats", &self.stats)
            .finish()
    }
}

impl TlsAcceptorBuilder {
    /// Offer HTTP/2 by ALPN (default on). Off: ALPN offers `http/1.1` only.
    pub fn http2(mut self, on: bool) -> Self {
        self.http2 = on;
        self
    }

    /// Time allowed for the whole handshake (default [`DEFAULT_HANDSHAKE_TIMEOUT`]).
    pub fn handshake_timeout(mut self, timeout: Duration) -> Self {
        self.handshake_timeout = timeout;
        self
    }

    /// Sessions kept for resumption by session id (default [`DEFAULT_SESSION_CACHE`];
    /// 0 disables the cache, nginx's `ssl_session_cache off`).
    pub fn session_cache(mut self, sessions: usize) -> Self {
        self.session_cache = sessions;
        self
    }

    /// Issue session tickets (default on; nginx's `ssl_session_tickets`). Ticket keys
    /// live in memory only and rotate every 6 hours.
    pub fn session_tickets(mut self, on: bool) -> Self {
        self.session_tickets = on;
        self
    }

    /// How long a session can be resumed, by ticket or from the cache (nginx's
    /// `ssl_session_timeout`). `None` (the default): rustls' ticketer, whose keys rotate
    /// every 6 hours (tickets live 12 hours), and cache entries evicted by size only.
    pub fn session_timeout(mut self, timeout: Option<Duration>) -> Self {
        self.session_timeout = timeout;
        self
    }

    /// The protocol versions offered (nginx's `ssl_protocols`; default TLS 1.2 and 1.3).
    pub fn protocols(mut self, protocols: &[Protocol]) -> Self {
        self.protocols = protocols.to_vec();
        self
    }

    /// The cipher suites offered, in preference order (nginx's `ssl_ciphers`; build the
    /// list with [`crate::policy::parse_ciphers`]). Default: rustls' safe defaults.
    pub fn cipher_suites(mut self, suites: Vec<rustls::SupportedCipherSuite>) -> Self {
        self.cipher_suites = Some(suites);
        self
    }

    /// Choose the suite by the server's order rather than the client's (nginx's
    /// `ssl_prefer_server_ciphers`, default off as in nginx).
    pub fn prefer_server_ciphers(mut self, on: bool) -> Self {
        self.prefer_server_ciphers = on;
        self
    }

    /// Build the acceptor. Fails when no protocol is enabled or when an enabled protocol
    /// has no cipher suite.
    pub fn build(self) -> Result<TlsAcceptor, Error> {
        if self.protocols.is_empty() {
            return Err(Error::with_source(
                Kind::Config,
                "no protocol version enabled",
            ));
        }
        let suites = match self.cipher_suites {
            Some(s) => s,
            None => crate::policy::default_suites(&self.protocols),
        };
        for p in &self.protocols {
            let has = suites.iter().any(|s| s.version() == p.rustls());
            if !has {
                return Err(Error::with_source(
                    Kind::Config,
                    format!("no cipher suite for {p}"),
                ));
            }
        }
        let provider = Arc::new(rustls::crypto::CryptoProvider {
            cipher_suites: suites,
            ..rustls::crypto::ring::default_provider()
        });
        let versions: Vec<&'static rustls::SupportedProtocolVersion> =
            self.protocols.iter().map(|p| p.rustls()).collect();
        let mut config = ServerConfig::builder_with_provider(provider)
            .with_protocol_versions(&versions)
            .map_err(|e| Error::with_source(Kind::Config, e))?
            .with_no_client_auth()
            .with_cert_resolver(Arc::new(self.store));
        config.ignore_client_order = self.prefer_server_ciphers;
        config.alpn_protocols = if self.http2 {
            vec![b"h2".to_vec(), b"http/1.1".to_vec()]
        } else {
            vec![b"http/1.1".to_vec()]
        };
        config.session_storage = match (self.session_cache, self.session_timeout) {
            (0, _) => Arc::new(rustls::server::NoServerSessionStorage {}),
            (n, None) => ServerSessionMemoryCache::new(n),
            (n, Some(t)) => crate::tickets::TimedSessions::new(n, t),
        };
        if self.session_tickets {
            config.ticketer = match self.session_timeout {
                None => rustls::crypto::ring::Ticketer::new()
                    .map_err(|e| Error::with_source(Kind::Config, e))?,
                Some(t) => crate::tickets::ticketer(t)?,
            };
        }
        let settings = Settings {
            config: Arc::new(config),
            handshake_timeout: self.handshake_timeout,
            sessions: Sessions {
                cache: self.session_cache,
                tickets: self.session_tickets,
                timeout: self.session_timeout,
            },
        };
        Ok(TlsAcceptor {
            current: Arc::new(ArcSwap::from_pointee(settings)),
            stats: Arc::default(),
        })
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn builder_knobs() {
        let store = CertStore::new();
        let a = TlsAcceptor::builder(store)
            .http2(false)
            .session_cache(0)
            .session_tickets(false)
            .build()
            .unwrap();
        assert_eq!(a.server_config().alpn_protocols, [b"http/1.1".to_vec()]);
        assert!(!a.server_config().ticketer.enabled());
        assert!(!a.server_config().ignore_client_order);
    }

    #[test]
    fn default_tickets_as_rustls_and_openssl() {
        let c = TlsAcceptor::builder(CertStore::new())
            .build()
            .unwrap()
            .server_config();
        // rustls' own ticketer's lifetime hint (12 h); two TLS 1.3 tickets per full
        // handshake, as OpenSSL's default (`SSL_CTX_set_num_tickets`) and so nginx.
        assert!(c.ticketer.enabled());
        assert_eq!(c.ticketer.lifetime(), 12 * 3600);
        assert_eq!(c.send_tls13_tickets, 2);
        let sealed = c.ticketer.encrypt(b"state").unwrap();
        assert_eq!(c.ticketer.decrypt(&sealed).unwrap(), b"state");
    }

    #[test]
    fn a_protocol_without_suites_is_refused() {
        let tls13_only = crate::policy::default_suites(&[Protocol::Tls13]);
        let e = TlsAcceptor::builder(CertStore::new())
            .cipher_suites(tls13_only.clone())
            .build()
            .unwrap_err();
        assert!(e.to_string().contains("TLSv1.2"), "{e}");
        assert!(TlsAcceptor::builder(CertStore::new())
            .protocols(&[Protocol::Tls13])
            .cipher_suites(tls13_only)
            .build()
            .is_ok());
        assert!(TlsAcceptor::builder(CertStore::new())
            .protocols(&[])
            .build()
            .is_err());
    }

    #[test]
    fn reconfigure_takes_the_new_settings_and_keeps_certificates_and_sessions() {
        let a = TlsAcceptor::builder(CertStore::new())
            .session_timeout(Some(Duration::from_secs(600)))
            .build()
            .unwrap();
        let clone = a.clone();
        let before = a.server_config();
        let new = TlsAcceptor::builder(CertStore::new())
            .protocols(&[Protocol::Tls13])
            .http2(false)
            .prefer_server_ciphers(true)
            .handshake_timeout(Duration::from_secs(3))
            .session_timeout(Some(Duration::from_secs(600)))
            .build()
            .unwrap();
        a.reconfigure(&new);
        // Every clone sees it (the server holds a clone).
        let after = clone.server_config();
        assert_eq!(after.alpn_protocols, [b"http/1.1".to_vec()]);
        assert!(after.ignore_client_order);
        assert_eq!(clone.handshake_timeout(), Duration::from_secs(3));
        assert!(Arc::ptr_eq(&after.cert_resolver, &before.cert_resolver));
        assert!(!Arc::ptr_eq(
            &after.cert_resolver,
            &new.server_config().cert_resolver
        ));
        // Same session settings: the same cache and ticket keys.
        assert!(Arc::ptr_eq(&after.ticketer, &before.ticketer));
        assert!(Arc::ptr_eq(&after.session_storage, &before.session_storage));
        // The snapshot taken before is unchanged.
        assert!(!before.ignore_client_order);

        // Changed session settings: the new ones.
        let shorter = TlsAcceptor::builder(CertStore::new())
            .session_timeout(Some(Duration::from_secs(60)))
            .build()
            .unwrap();
        a.reconfigure(&shorter);
        let after = a.server_config();
        assert_eq!(after.ticketer.lifetime(), 60);
        assert!(Arc::ptr_eq(
            &after.ticketer,
            &shorter.server_config().ticketer
        ));
        assert!(Arc::ptr_eq(&after.cert_resolver, &before.cert_resolver));
    }

    #[tokio::test(start_paused = true)]
    async fn a_reconfigured_timeout_applies_to_the_next_handshake() {
        let a = TlsAcceptor::builder(CertStore::new()).build().unwrap();
        a.reconfigure(
            &TlsAcceptor::builder(CertStore::new())
                .handshake_timeout(Duration::from_secs(2))
                .build()
                .unwrap(),
        );
        let (_client, server) = tokio::io::duplex(1024);
        let started = tokio::time::Instant::now();
        let e = a.handshake(server).await.unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::TimedOut);
        assert_eq!(started.elapsed(), Duration::from_secs(2));
    }

    #[tokio::test(start_paused = true)]
    async fn silent_client_times_out_and_is_counted() {
        let a = TlsAcceptor::builder(CertStore::new())
            .handshake_timeout(Duration::from_secs(3))
            .build()
            .unwrap();
        // The client end stays open and silent.
        let (_client, server) = tokio::io::duplex(1024);
        let e = a.handshake(server).await.unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::TimedOut);
        assert_eq!((a.stats().failures(), a.stats().timeouts()), (1, 1));
    }

    #[tokio::test]
    async fn garbage_is_a_counted_failure() {
        use tokio::io::AsyncWriteExt;
        let a = TlsAcceptor::builder(CertStore::new()).build().unwrap();
        let (mut client, server) = tokio::io::duplex(1024);
        client.write_all(b"GET / HTTP/1.1\r\n\r\n").await.unwrap();
        assert!(a.handshake(server).await.is_err());
        assert_eq!((a.stats().failures(), a.stats().timeouts()), (1, 0));
    }
}
