//! The FastAPI deployment: proxy-core and proxy-tls put together the way the nginx guides
//! front a uvicorn app, with builders instead of a config file.
//!
//! What it serves:
//!
//! | listener / location | what happens | nginx |
//! | --- | --- | --- |
//! | plain HTTP listener | `301` to the same URI over HTTPS | `return 301 https://$host$request_uri;` |
//! | HTTPS listener | TLS 1.2/1.3, ALPN `h2` + `http/1.1`, HSTS | `listen 443 ssl http2; add_header Strict-Transport-Security ...` |
//! | `/static/` | files from disk, `expires 30d`, never reaches the app | `alias DIR; expires 30d; access_log off;` |
//! | `/ws/` | WebSocket upgrade passed through, idle for up to an hour | `proxy_read_timeout 3600s;` |
//! | `/auth/token` | `5r/m`, `burst=10 nodelay`, `429` past it | `limit_req zone=auth burst=10 nodelay; limit_req_status 429;` |
//! | `~* /(wp-login\|wp-admin\|xmlrpc)` | connection closed, no answer | `return 444;` |
//! | `/` | `least_conn` over the uvicorn processes, `max_fails=3 fail_timeout=30s` | `proxy_pass http://fastapi_app;` |
//!
//! Every request to the app carries `X-Forwarded-For`, `X-Forwarded-Proto: https`,
//! `X-Real-IP`, `X-Forwarded-Host` and `X-Forwarded-Port`, which uvicorn started with
//! `--proxy-headers --forwarded-allow-ips=127.0.0.1` turns into `request.client.host` and
//! `request.url.scheme`. The proxy itself trusts no forwarded header from its clients: it
//! is their first hop.
//!
//! ```
//! use examples::fastapi::{Certificate, Deployment};
//! # tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async {
//! let deployment = Deployment {
//!     https: "127.0.0.1:0".parse().unwrap(),
//!     http: "127.0.0.1:0".parse().unwrap(),
//!     upstreams: vec!["127.0.0.1:8001".parse().unwrap(), "127.0.0.1:8002".parse().unwrap()],
//!     certificate: Certificate::SelfSigned,
//!     ..Deployment::default()
//! };
//! let bound = deployment.bind().unwrap();
//! assert_ne!(bound.https_addr().port(), 0);
//! assert!(bound.dev_certificate_pem().is_some_and(|p| p.starts_with("-----BEGIN CERTIFICATE")));
//! let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
//! let serving = tokio::spawn(bound.serve(async { stopped.await.ok(); }));
//! stop.send(()).unwrap();
//! serving.await.unwrap().unwrap();
//! # });
//! ```

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::num::NonZeroU32;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use http::StatusCode;
use proxy_core::balance::{Balance, Group, Policy, Server as UpstreamServer};
use proxy_core::client_info::Scheme;
use proxy_core::forwarded::{Forwarded, ForwardedLayer};
use proxy_core::limit::{Key, LimitReqLayer, Rate, ReqLimit, ReqZone};
use proxy_core::router::{Location, Pattern, Return, Router, VirtualServer};
use proxy_core::server::{ListenConfig, Plain, Server};
use proxy_core::static_files::StaticFiles;
use proxy_core::upstream::{ClientConfig, UpstreamClient, UpstreamTimeouts};
use proxy_tls::acceptor::TlsAcceptor;
use proxy_tls::hsts::{Hsts, HstsLayer};
use proxy_tls::redirect::{HttpsRedirect, HttpsRedirectLayer};
use proxy_tls::sni::CertStore;
use tower::Layer;

/// Where the HTTPS listener's certificate comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Certificate {
    /// A self-signed certificate for `localhost`, `127.0.0.1` and `::1`, generated at
    /// start (what mkcert is used for in local set-ups). Its PEM is
    /// [`Bound::dev_certificate_pem`], for clients to trust.
    SelfSigned,
    /// A PEM chain (leaf first) and its key, as nginx's `ssl_certificate` and
    /// `ssl_certificate_key`.
    Files {
        /// The certificate chain.
        cert: PathBuf,
        /// The private key.
        key: PathBuf,
    },
}

/// The deployment's settings. `Default` is the README's: HTTPS on 127.0.0.1:8443, plain
/// HTTP on 127.0.0.1:8080, uvicorn on 127.0.0.1:8001 and 127.0.0.1:8002, the example's
/// static directory, a self-signed localhost certificate.
#[derive(Debug, Clone)]
pub struct Deployment {
    /// The HTTPS listener (nginx `listen 443 ssl`).
    pub https: SocketAddr,
    /// The plain-HTTP listener that redirects to HTTPS (nginx `listen 80`).
    pub http: SocketAddr,
    /// The uvicorn processes (nginx `upstream { server ...; }`).
    pub upstreams: Vec<SocketAddr>,
    /// The directory served under `/static/` (nginx `alias`).
    pub static_dir: PathBuf,
    /// The HTTPS certificate.
    pub certificate: Certificate,
    /// How long an idle pooled upstream connection is kept: below the app's keep-alive
    /// (uvicorn's `--timeout-keep-alive`, 5 s by default), so the proxy never sends a
    /// request on a connection uvicorn is closing. Default 4 s.
    pub upstream_keepalive_timeout: Duration,
    /// nginx `proxy_connect_timeout` (default 10 s, as in the guide).
    pub connect_timeout: Duration,
    /// nginx `proxy_read_timeout` for plain requests (default 60 s).
    pub read_timeout: Duration,
    /// Idle timeout of `/ws/` tunnels (nginx `proxy_read_timeout 3600s` there).
    pub websocket_idle_timeout: Duration,
    /// The `/auth/token` rate (default `5r/m`).
    pub auth_rate: Rate,
    /// The `/auth/token` burst, passed at once (`burst=10 nodelay`).
    pub auth_burst: u32,
    /// nginx `max_fails` of each upstream server (default 3).
    pub max_fails: u32,
    /// nginx `fail_timeout` of each upstream server (default 30 s).
    pub fail_timeout: Duration,
    /// HSTS `max-age` (default one year, `includeSubDomains`).
    pub hsts_max_age: Duration,
}

impl Default for Deployment {
    fn default() -> Self {
        Deployment {
            https: SocketAddr::from(([127, 0, 0, 1], 8443)),
            http: SocketAddr::from(([127, 0, 0, 1], 8080)),
            upstreams: vec![
                SocketAddr::from(([127, 0, 0, 1], 8001)),
                SocketAddr::from(([127, 0, 0, 1], 8002)),
            ],
            static_dir: PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/fastapi/static")),
            certificate: Certificate::SelfSigned,
            upstream_keepalive_timeout: Duration::from_secs(4),
            connect_timeout: Duration::from_secs(10),
            read_timeout: Duration::from_secs(60),
            websocket_idle_timeout: Duration::from_secs(3600),
            auth_rate: Rate::per_minute(NonZeroU32::new(5).unwrap_or(NonZeroU32::MIN)),
            auth_burst: 10,
            max_fails: 3,
            fail_timeout: Duration::from_secs(30),
            hsts_max_age: Duration::from_secs(365 * 24 * 3600),
        }
    }
}

/// The service both listeners run, outermost first: HSTS on HTTPS answers, the redirect
/// of plain-HTTP requests, forwarded headers, then the router's locations.
pub type Stack = Hsts<HttpsRedirect<Forwarded<Router>>>;

/// Why the deployment could not start.
#[derive(Debug)]
#[non_exhaustive]
pub enum StartError {
    /// No upstream server was given, or the group could not be built.
    Upstreams(proxy_core::balance::GroupError),
    /// The static directory does not exist or cannot be read.
    StaticDir(PathBuf, std::io::Error),
    /// The certificate could not be generated or loaded, or TLS not configured.
    Tls(proxy_tls::Error),
    /// A location pattern did not parse.
    Pattern(&'static str),
    /// The router did not build.
    Router(proxy_core::router::RouterError),
    /// A listener could not be bound.
    Bind(SocketAddr, std::io::Error),
}

impl std::fmt::Display for StartError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StartError::Upstreams(e) => write!(f, "upstream group: {e}"),
            StartError::StaticDir(dir, e) => write!(f, "static directory {}: {e}", dir.display()),
            StartError::Tls(e) => write!(f, "TLS: {e}"),
            StartError::Pattern(p) => write!(f, "location pattern {p:?} does not parse"),
            StartError::Router(e) => write!(f, "router: {e}"),
            StartError::Bind(addr, e) => write!(f, "cannot listen on {addr}: {e}"),
        }
    }
}

impl std::error::Error for StartError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            StartError::Upstreams(e) => Some(e),
            StartError::StaticDir(_, e) | StartError::Bind(_, e) => Some(e),
            StartError::Tls(e) => Some(e),
            StartError::Router(e) => Some(e),
            StartError::Pattern(_) => None,
        }
    }
}

impl Deployment {
    /// Build the service stack for an HTTPS listener on `https_port` (the port the
    /// plain listener redirects to), with the upstream group it balances over.
    ///
    /// Must run inside a tokio runtime.
    pub fn stack(&self, https_port: u16) -> Result<(Stack, Arc<Group>), StartError> {
        let mut group = Group::builder("fastapi_app").policy(Policy::LeastConn);
        for &addr in &self.upstreams {
            group = group.server(
                UpstreamServer::new(addr)
                    .max_fails(self.max_fails)
                    .fail_timeout(self.fail_timeout),
            );
        }
        let group = group.build().map_err(StartError::Upstreams)?;

        let mut client = ClientConfig::default();
        client.keepalive_timeout = self.upstream_keepalive_timeout;
        client.connect_timeout = self.connect_timeout;
        client.read_timeout = self.read_timeout;
        // One pool for every location: a connection to a uvicorn process is reused by
        // whichever location sends there next.
        let client = UpstreamClient::new(client);
        let app = Balance::new(group.clone(), client);
        let websocket = app.clone().with_timeouts(UpstreamTimeouts {
            read_timeout: self.read_timeout,
            idle_timeout: self.websocket_idle_timeout,
        });

        // One zone, built once: every connection and clone shares its budget.
        let auth_zone = ReqZone::builder(self.auth_rate)
            .name("auth")
            .key(Key::ClientIp)
            .size_bytes(10 << 20)
            .build();
        let auth = LimitReqLayer::new(ReqLimit::new(auth_zone).burst(self.auth_burst).nodelay())
            .status(StatusCode::TOO_MANY_REQUESTS)
            .layer(app.clone());

        let statics = StaticFiles::alias("/static/", &self.static_dir)
            .expires(Duration::from_secs(30 * 24 * 3600))
            .access_log(false)
            .build()
            .map_err(|e| StartError::StaticDir(self.static_dir.clone(), e))?;

        let router = Router::builder()
            .server(
                VirtualServer::new([])
                    .location(Location::new(pattern("/")?, app))
                    .location(Location::new(pattern("/static/")?, statics))
                    .location(Location::new(pattern("/ws/")?, websocket))
                    .location(Location::new(pattern("/auth/token")?, auth))
                    .location(Location::new(
                        pattern("~* /(wp-login|wp-admin|xmlrpc)")?,
                        Return::close(),
                    )),
            )
            .build()
            .map_err(StartError::Router)?;

        // The proxy is the clients' first hop: it trusts nobody's forwarded headers
        // (the default), and tells uvicorn the real client and scheme.
        let forwarded = ForwardedLayer::new().layer(router);
        let redirect = HttpsRedirectLayer::new()
            .https_port(https_port)
            .layer(forwarded);
        let stack = HstsLayer::new(self.hsts_max_age)
            .include_subdomains(true)
            .layer(redirect);
        Ok((stack, group))
    }

    /// Load or generate the certificate, build the stack and bind both listeners.
    ///
    /// Must run inside a tokio runtime.
    pub fn bind(self) -> Result<Bound, StartError> {
        let (loaded, dev_pem) = match &self.certificate {
            Certificate::SelfSigned => {
                let dev = proxy_tls::selfsigned::localhost().map_err(StartError::Tls)?;
                (dev.loaded, Some(dev.cert_pem))
            }
            Certificate::Files { cert, key } => (
                proxy_tls::certs::load_pem_files(cert, key).map_err(StartError::Tls)?,
                None,
            ),
        };
        let store = CertStore::new();
        store.insert("fastapi", loaded);
        let acceptor = TlsAcceptor::builder(store)
            .build()
            .map_err(StartError::Tls)?;

        let bind = |addr: SocketAddr| {
            ListenConfig::new(addr)
                .bind()
                .map_err(|e| StartError::Bind(addr, e))
        };
        let https = Server::new(bind(self.https)?).with_acceptor(acceptor, Scheme::Https);
        let http = Server::new(bind(self.http)?);
        let https_addr = https
            .local_addr()
            .map_err(|e| StartError::Bind(self.https, e))?;
        let http_addr = http
            .local_addr()
            .map_err(|e| StartError::Bind(self.http, e))?;
        let (stack, group) = self.stack(https_addr.port())?;
        Ok(Bound {
            https,
            http,
            https_addr,
            http_addr,
            stack,
            group,
            dev_pem,
        })
    }
}

/// A bad command line or environment variable, with what was wrong.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ArgError(pub String);

impl std::fmt::Display for ArgError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for ArgError {}

/// The command-line usage of the example program.
pub const USAGE: &str = "\
usage: fastapi_proxy [--https ADDR] [--http ADDR] [--upstream ADDR]... [--static DIR]
                     [--cert FILE --key FILE]

  --https ADDR      HTTPS listener        (FASTAPI_PROXY_HTTPS, default 127.0.0.1:8443)
  --http ADDR       redirecting listener  (FASTAPI_PROXY_HTTP, default 127.0.0.1:8080)
  --upstream ADDR   a uvicorn process, repeat for each
                    (FASTAPI_PROXY_UPSTREAMS=a,b, default 127.0.0.1:8001,127.0.0.1:8002)
  --static DIR      served under /static/ (FASTAPI_PROXY_STATIC, default examples/fastapi/static)
  --cert FILE       PEM chain; with --key (FASTAPI_PROXY_CERT, FASTAPI_PROXY_KEY);
                    without them a self-signed localhost certificate is generated
";

impl Deployment {
    /// The settings from command-line `args` (without the program name) and the
    /// environment (read through `env`); a flag wins over its variable, which wins over
    /// the default. See [`USAGE`].
    ///
    /// ```
    /// use examples::fastapi::Deployment;
    /// let args = ["--https", "127.0.0.1:9443", "--upstream", "127.0.0.1:9001"].map(String::from);
    /// let d = Deployment::from_args(args, |k| (k == "FASTAPI_PROXY_HTTP").then(|| "127.0.0.1:9080".into())).unwrap();
    /// assert_eq!(d.https.port(), 9443);
    /// assert_eq!(d.http.port(), 9080);
    /// assert_eq!(d.upstreams, ["127.0.0.1:9001".parse().unwrap()]);
    /// ```
    pub fn from_args(
        args: impl IntoIterator<Item = String>,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<Deployment, ArgError> {
        let mut d = Deployment::default();
        let addr = |key: &str, text: &str| -> Result<SocketAddr, ArgError> {
            text.trim()
                .parse()
                .map_err(|_| ArgError(format!("{key}: {text:?} is not an IP:PORT address")))
        };
        if let Some(v) = env("FASTAPI_PROXY_HTTPS") {
            d.https = addr("FASTAPI_PROXY_HTTPS", &v)?;
        }
        if let Some(v) = env("FASTAPI_PROXY_HTTP") {
            d.http = addr("FASTAPI_PROXY_HTTP", &v)?;
        }
        if let Some(v) = env("FASTAPI_PROXY_UPSTREAMS") {
            d.upstreams = v
                .split(',')
                .map(|a| addr("FASTAPI_PROXY_UPSTREAMS", a))
                .collect::<Result<_, _>>()?;
        }
        if let Some(v) = env("FASTAPI_PROXY_STATIC") {
            d.static_dir = PathBuf::from(v);
        }
        let (mut cert, mut key) = (
            env("FASTAPI_PROXY_CERT").map(PathBuf::from),
            env("FASTAPI_PROXY_KEY").map(PathBuf::from),
        );

        let mut upstreams = Vec::new();
        let mut args = args.into_iter();
        while let Some(flag) = args.next() {
            let mut value = || {
                args.next()
                    .ok_or_else(|| ArgError(format!("{flag} needs a value\n\n{USAGE}")))
            };
            match flag.as_str() {
                "--https" => d.https = addr("--https", &value()?)?,
                "--http" => d.http = addr("--http", &value()?)?,
                "--upstream" => upstreams.push(addr("--upstream", &value()?)?),
                "--static" => d.static_dir = PathBuf::from(value()?),
                "--cert" => cert = Some(PathBuf::from(value()?)),
                "--key" => key = Some(PathBuf::from(value()?)),
                "-h" | "--help" => return Err(ArgError(USAGE.to_owned())),
                other => return Err(ArgError(format!("unknown argument {other:?}\n\n{USAGE}"))),
            }
        }
        if !upstreams.is_empty() {
            d.upstreams = upstreams;
        }
        d.certificate = match (cert, key) {
            (Some(cert), Some(key)) => Certificate::Files { cert, key },
            (None, None) => Certificate::SelfSigned,
            _ => return Err(ArgError("--cert and --key go together".to_owned())),
        };
        Ok(d)
    }
}

/// A location pattern written in this file.
fn pattern(text: &'static str) -> Result<Pattern, StartError> {
    Pattern::parse(text).ok_or(StartError::Pattern(text))
}

/// The deployment with both listeners bound, ready to serve.
#[derive(Debug)]
pub struct Bound {
    https: Server<TlsAcceptor>,
    http: Server<Plain>,
    https_addr: SocketAddr,
    http_addr: SocketAddr,
    stack: Stack,
    group: Arc<Group>,
    dev_pem: Option<String>,
}

impl Bound {
    /// The address the HTTPS listener is bound to.
    pub fn https_addr(&self) -> SocketAddr {
        self.https_addr
    }

    /// The address the redirecting plain-HTTP listener is bound to.
    pub fn http_addr(&self) -> SocketAddr {
        self.http_addr
    }

    /// The upstream group: per-server in-flight requests, failures and state.
    pub fn group(&self) -> &Arc<Group> {
        &self.group
    }

    /// The generated certificate (PEM) when [`Certificate::SelfSigned`] is used, for
    /// clients to trust (`curl --cacert`).
    pub fn dev_certificate_pem(&self) -> Option<&str> {
        self.dev_pem.as_deref()
    }

    /// Serve both listeners until `shutdown` completes, then stop both gracefully.
    pub async fn serve(self, shutdown: impl Future<Output = ()>) -> std::io::Result<()> {
        let (tx, rx) = tokio::sync::watch::channel(false);
        let stopped = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
            // An error means the sender is gone: stop as well.
            let _ = rx.wait_for(|stop| *stop).await;
        };
        let https = self.https.serve(self.stack.clone(), stopped(rx.clone()));
        let http = self.http.serve(self.stack, stopped(rx));
        let signal = async move {
            shutdown.await;
            let _ = tx.send(true);
            Ok::<(), std::io::Error>(())
        };
        tokio::try_join!(https, http, signal).map(|_| ())
    }
}

// The stack is a service both listeners accept.
const _: fn() = || {
    fn served<S>()
    where
        S: tower::Service<proxy_core::Request, Response = proxy_core::Response, Error = Infallible>
            + Clone
            + Send
            + Sync
            + 'static,
        S::Future: Send + 'static,
    {
    }
    served::<Stack>();
};

/// The README section (`docs/fastapi.md`), so that its Rust example is compiled by the
/// doc tests.
#[cfg(doctest)]
#[doc = include_str!("../../docs/fastapi.md")]
struct ReadmeSection;

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn defaults_match_the_guides() {
        let d = Deployment::default();
        assert_eq!(d.auth_rate, "5r/m".parse().unwrap());
        assert_eq!(d.auth_burst, 10);
        assert_eq!(d.upstreams.len(), 2);
        assert!(d.static_dir.join("hello.txt").is_file());
        assert!(d.upstream_keepalive_timeout < Duration::from_secs(5));
    }

    #[test]
    fn flags_win_over_environment() {
        let env = |k: &str| match k {
            "FASTAPI_PROXY_UPSTREAMS" => Some("127.0.0.1:1, 127.0.0.1:2".to_owned()),
            "FASTAPI_PROXY_HTTPS" => Some("127.0.0.1:3".to_owned()),
            _ => None,
        };
        let d =
            Deployment::from_args(["--https".to_owned(), "127.0.0.1:4".to_owned()], env).unwrap();
        assert_eq!(d.https.port(), 4);
        assert_eq!(d.upstreams.len(), 2);
        assert_eq!(d.certificate, Certificate::SelfSigned);
    }

    #[test]
    fn bad_arguments_are_errors() {
        let none = |_: &str| None;
        let args = |a: &[&str]| a.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert!(Deployment::from_args(args(&["--https"]), none).is_err());
        assert!(Deployment::from_args(args(&["--https", "localhost"]), none).is_err());
        assert!(Deployment::from_args(args(&["--cert", "a.pem"]), none).is_err());
        assert!(Deployment::from_args(args(&["--bogus"]), none).is_err());
        let e = Deployment::from_args(Vec::new(), |k: &str| {
            (k == "FASTAPI_PROXY_UPSTREAMS").then(|| "127.0.0.1:1,,".to_owned())
        });
        assert!(e.is_err());
    }

    #[test]
    fn every_pattern_parses() {
        for p in [
            "/",
            "/static/",
            "/ws/",
            "/auth/token",
            "~* /(wp-login|wp-admin|xmlrpc)",
        ] {
            assert!(Pattern::parse(p).is_some(), "{p}");
        }
    }
}
