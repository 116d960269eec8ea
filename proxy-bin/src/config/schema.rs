//! The TOML schema. Every struct refuses unknown keys, so a typo is an error with a line
//! number rather than a silently ignored setting.

use std::collections::BTreeMap;

use serde::Deserialize;
use toml::Spanned;

use super::values::{Dur, Size};

/// Declares a struct with the settings a `[[server]]` gives its locations and a
/// `[[server.location]]` may override (nginx's inheritance), so the two lists cannot drift.
macro_rules! with_inherited_settings {
    ($(#[$meta:meta])* pub struct $name:ident { $($body:tt)* }) => {
        $(#[$meta])*
        pub struct $name {
            $($body)*
    /// nginx's `client_max_body_size` (default 1m; 0 = unlimited).
    pub client_max_body_size: Option<Size>,
    /// nginx's `client_body_timeout` between two reads (default 60s).
    pub client_body_timeout: Option<Dur>,
    /// nginx's `proxy_request_buffering` (default on).
    pub proxy_request_buffering: Option<bool>,
    /// nginx's `client_body_buffer_size`: request bodies past it spill to a temp file
    /// (default 16k).
    pub client_body_buffer_size: Option<Size>,
    /// nginx's `proxy_buffering` (default on).
    pub proxy_buffering: Option<bool>,
    /// Memory for reading a response ahead (nginx's `proxy_buffers`, default 64k).
    pub proxy_buffers: Option<Size>,
    /// nginx's `proxy_max_temp_file_size` (default 1024m; 0 = memory only).
    pub proxy_max_temp_file_size: Option<Size>,
    /// Requests handled at once; more are answered 503 (default: no limit).
    pub max_concurrent_requests: Option<usize>,
    /// nginx's `proxy_next_upstream` (`["error", "timeout", "http_502", "non_idempotent"]`,
    /// `[]` = off; default `["error", "timeout"]`).
    pub next_upstream: Option<Vec<Spanned<String>>>,
    /// nginx's `proxy_next_upstream_tries` (0 = every server).
    pub next_upstream_tries: Option<u32>,
    /// nginx's `proxy_next_upstream_timeout` (0 = unlimited).
    pub next_upstream_timeout: Option<Dur>,
    /// Forwarded headers and the real client address.
    pub forwarded: Option<Spanned<ForwardedCfg>>,
    /// nginx's `limit_req` lines.
    pub limit_req: Option<Vec<Spanned<LimitReqCfg>>>,
    /// nginx's `limit_req_status` (default 503).
    pub limit_req_status: Option<u16>,
    /// nginx's `limit_req_dry_run`.
    pub limit_req_dry_run: Option<bool>,
    /// nginx's `limit_conn` lines.
    pub limit_conn: Option<Vec<Spanned<LimitConnCfg>>>,
    /// nginx's `limit_conn_status` (default 503).
    pub limit_conn_status: Option<u16>,
    /// The access log (overrides `[access_log]`); `"off"` disables it.
    pub access_log: Option<Spanned<AccessLogCfg>>,
        }
    };
}

/// The whole file.
#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Process-wide settings.
    #[serde(default)]
    pub global: Global,
    /// Upstream groups by name (`[upstream.NAME]`), like nginx's `upstream NAME { }`.
    #[serde(default)]
    pub upstream: BTreeMap<String, Spanned<Upstream>>,
    /// Request-rate zones (`[limit_req_zone.NAME]`), like nginx's `limit_req_zone`.
    #[serde(default)]
    pub limit_req_zone: BTreeMap<String, Spanned<ReqZoneCfg>>,
    /// Concurrency zones (`[limit_conn_zone.NAME]`), like nginx's `limit_conn_zone`.
    #[serde(default)]
    pub limit_conn_zone: BTreeMap<String, Spanned<ConnZoneCfg>>,
    /// The DNS resolver of `resolve = true` upstream servers (nginx's `resolver`);
    /// absent: the system's (`/etc/resolv.conf`).
    pub resolver: Option<Spanned<ResolverCfg>>,
    /// The admin listener: metrics, health and readiness.
    pub admin: Option<Admin>,
    /// The default access log of every server and location.
    pub access_log: Option<Spanned<AccessLogCfg>>,
    /// Automatic certificates (ACME, HTTP-01).
    pub acme: Option<Spanned<AcmeCfg>>,
    /// Virtual servers (`[[server]]`), like nginx's `server { }`.
    #[serde(default)]
    pub server: Vec<Server>,
}

/// `[limit_req_zone.NAME]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReqZoneCfg {
    /// `"5r/m"`, `"100r/s"`.
    pub rate: Spanned<String>,
    /// `"client_ip"` (default; nginx's `$binary_remote_addr`), `"header:NAME"` or `"shared"`.
    pub key: Option<Spanned<String>>,
    /// Memory for the zone's keys (nginx's `zone=NAME:10m`; default 10m). The least
    /// recently used idle keys are evicted when it is full.
    pub size: Option<Size>,
    /// Keep the zone's state in Redis, shared by every instance naming the zone there.
    pub backend: Option<Spanned<ZoneBackendCfg>>,
}

/// `backend = { redis = "redis://...", fail, timeout, backoff, local_allowance }`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ZoneBackendCfg {
    /// The Redis URL: `redis://host:port/db`, `redis://:password@host`, `unix:///path`.
    pub redis: Spanned<String>,
    /// When Redis cannot answer: `"open"` (admit), `"closed"` (reject) or `"local"`
    /// (limit per instance; default).
    pub fail: Option<Spanned<String>>,
    /// How long a request waits for Redis before `fail` decides (default 100ms).
    pub timeout: Option<Dur>,
    /// After a failed connection, how long Redis is not tried again (default 1s).
    pub backoff: Option<Dur>,
    /// Requests per key an instance may admit without waiting for Redis (default 0:
    /// exact).
    pub local_allowance: Option<u32>,
}

/// `[resolver]`: nginx's `resolver` and `resolver_timeout`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ResolverCfg {
    /// Name servers, `"IP"` or `"IP:PORT"` (port 53 by default); none: the system's.
    #[serde(default)]
    pub nameservers: Vec<Spanned<String>>,
    /// Re-resolve on this fixed interval instead of at the answers' TTL (nginx's
    /// `valid=`).
    pub valid: Option<Dur>,
    /// Re-resolve no sooner than this, however short the TTL (default 1s).
    pub min_ttl: Option<Dur>,
    /// Re-resolve no later than this, however long the TTL (default 60s).
    pub max_ttl: Option<Dur>,
    /// Time allowed for one query (nginx's `resolver_timeout`; default 5s).
    pub timeout: Option<Dur>,
    /// After a failed lookup, try again this soon (default 5s).
    pub retry: Option<Dur>,
}

/// `[limit_conn_zone.NAME]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConnZoneCfg {
    /// As for `limit_req_zone`.
    pub key: Option<Spanned<String>>,
    /// As for `limit_req_zone`.
    pub size: Option<Size>,
}

/// `[admin]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Admin {
    /// Where `/metrics`, `/healthz` and `/readyz` are served (keep it on loopback).
    pub listen: Spanned<String>,
}

/// `access_log = { path, format, buffer, flush }` or `access_log = "off"`.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum AccessLogCfg {
    /// `false` is `"off"`; `true` keeps the inherited log.
    Enabled(bool),
    /// `"off"`, `"stdout"` or a file path, with the default format.
    Path(String),
    /// The full form.
    Full {
        /// `"stdout"`, a file path or `"off"`.
        path: String,
        /// `"combined"`, `"combined_timed"` (default) or `"json"`.
        format: Option<String>,
        /// Bytes gathered before a write (nginx's `buffer=32k`).
        buffer: Option<Size>,
        /// Longest time a line waits in the buffer (nginx's `flush=5s`).
        flush: Option<Dur>,
    },
}

/// `[acme]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AcmeCfg {
    /// The ACME directory URL.
    pub directory: String,
    /// Contact URLs (`mailto:...`).
    #[serde(default)]
    pub contact: Vec<String>,
    /// Where certificates, keys and the account are kept (0600 files).
    pub storage: String,
    /// A PEM file with the ACME server's root (a private CA such as Pebble or step-ca).
    pub ca_root: Option<String>,
}

/// `[global]`.
#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct Global {
    /// Worker threads (nginx's `worker_processes`); default: one per core.
    pub workers: Option<usize>,
    /// How long a graceful shutdown waits for in-flight requests (default 30s).
    pub shutdown_timeout: Option<Dur>,
}

/// `[upstream.NAME]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Upstream {
    /// `"round_robin"` (default, smooth weighted) or `"least_conn"`.
    pub policy: Option<Spanned<String>>,
    /// Active health checks.
    pub health_check: Option<HealthCheckCfg>,
    /// The servers of the group.
    pub servers: Vec<Spanned<UpstreamServer>>,
    /// Idle keep-alive connections kept per server (nginx's `keepalive`, default 32).
    pub keepalive: Option<usize>,
    /// How long an idle upstream connection is kept (default 4s, below uvicorn's 5s).
    pub keepalive_timeout: Option<Dur>,
    /// nginx's `proxy_connect_timeout` for this group (default 60s).
    pub connect_timeout: Option<Dur>,
    /// nginx's `proxy_send_timeout` for this group (default 60s): a write to the
    /// upstream that makes no progress this long fails.
    pub send_timeout: Option<Dur>,
}

/// One `server` line of an upstream group: `addr` or `srv`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpstreamServer {
    /// `IP:PORT` or `HOST:PORT`. A host name is resolved once at start (and at each
    /// reload), every address becoming a server, unless `resolve` is set.
    pub addr: Option<Spanned<String>>,
    /// An SRV name (`_http._tcp.backend.internal`): ports, weights and backups come from
    /// its records. Needs `resolve = true`.
    pub srv: Option<Spanned<String>>,
    /// Keep resolving the name (at the answers' TTL, or `[resolver] valid`): servers
    /// follow DNS, removed ones drain (nginx's `resolve`).
    #[serde(default)]
    pub resolve: bool,
    /// nginx's `weight=` (default 1).
    pub weight: Option<u32>,
    /// nginx's `max_fails=` (default 1; 0 disables).
    pub max_fails: Option<u32>,
    /// nginx's `fail_timeout=` (default 10s).
    pub fail_timeout: Option<Dur>,
    /// nginx's `max_conns=`.
    pub max_conns: Option<u32>,
    /// nginx's `backup`.
    #[serde(default)]
    pub backup: bool,
}

/// `[upstream.NAME.health_check]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HealthCheckCfg {
    /// Between checks (default 5s).
    pub interval: Option<Dur>,
    /// The path requested (default `/`).
    pub path: Option<String>,
    /// Inclusive status range that passes (default `[200, 399]`).
    pub status: Option<[u16; 2]>,
    /// Failed checks before a server is marked down (default 1).
    pub fails: Option<u32>,
    /// Passed checks before it is up again (default 1).
    pub passes: Option<u32>,
    /// Per check (default 5s).
    pub timeout: Option<Dur>,
}

with_inherited_settings! {
/// `[[server]]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Server {
    /// Addresses to listen on, `"127.0.0.1:8080"`.
    pub listen: Vec<Spanned<String>>,
    /// Host names (`"api.example.com"`, `"*.example.com"`); none: only as default.
    #[serde(default)]
    pub server_name: Vec<Spanned<String>>,
    /// Use this server when no name matches on its listeners.
    #[serde(default)]
    pub default_server: bool,
    /// nginx's `client_header_timeout` (default 60s; also the keep-alive idle timeout).
    pub client_header_timeout: Option<Dur>,
    /// nginx's `keepalive_requests` (default 1000).
    pub keepalive_requests: Option<u32>,
    /// Largest request header block, request line included (default 32k).
    pub max_header_size: Option<Size>,
    /// Most header fields in a request (default 100).
    pub max_headers: Option<usize>,
    /// Connections served at once on each listener; more get 503.
    pub max_connections: Option<usize>,
    /// Listen backlog (default 511).
    pub backlog: Option<i32>,
    /// SO_REUSEPORT on the listeners.
    #[serde(default)]
    pub reuse_port: bool,
    /// TLS on this server's listeners.
    pub tls: Option<Spanned<TlsCfg>>,
    /// Expect a PROXY protocol (v1 or v2) header from these sources (CIDRs) on every
    /// connection of this server's listeners.
    pub proxy_protocol: Option<Spanned<Vec<String>>>,
    /// nginx's `send_timeout` (default 60s): a client that reads nothing for this long
    /// is disconnected.
    pub send_timeout: Option<Dur>,
    /// Answer every request with a 301 to https (except ACME challenges).
    #[serde(default)]
    pub redirect_to_https: bool,
    /// The port in those redirects (default 443, left out of the URL).
    pub https_port: Option<u16>,
    /// A certbot `--webroot` directory served at `/.well-known/acme-challenge/`.
    pub acme_webroot: Option<Spanned<String>>,
    /// `Strict-Transport-Security` on TLS responses.
    pub hsts: Option<HstsCfg>,
    /// Default `proxy_read_timeout` for this server's locations (default 60s).
    pub proxy_read_timeout: Option<Dur>,

    /// nginx's `add_header`, for every location that sets none of its own.
    #[serde(default)]
    pub add_header: Vec<Spanned<AddHeader>>,
    /// nginx's `error_page`, for every location that sets none of its own.
    #[serde(default)]
    pub error_page: Vec<Spanned<ErrorPageCfg>>,
    /// nginx's `allow`/`deny`, in order, for every location that sets none of its own.
    #[serde(default)]
    pub access: Vec<Spanned<AccessRule>>,
    /// The locations, matched with nginx's precedence.
    #[serde(default)]
    pub location: Vec<Location>,
}
}

with_inherited_settings! {
/// `[[server.location]]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Location {
    /// nginx's location syntax: `"/"`, `"= /x"`, `"^~ /x"`, `"~ regex"`, `"~* regex"`.
    pub path: Spanned<String>,
    /// An upstream group name, or `http://host:port`.
    pub proxy_pass: Option<Spanned<String>>,
    /// nginx's `return`: a status (`444` closes), or `{ status, body }`, or
    /// `{ status = 301, url = "https://$host$request_uri" }`.
    #[serde(rename = "return")]
    pub return_: Option<Spanned<Return>>,
    /// nginx's `proxy_read_timeout` (also the idle timeout of WebSocket tunnels).
    pub proxy_read_timeout: Option<Dur>,
    /// `Upgrade` protocols passed to the upstream (default `["websocket"]`).
    pub proxy_upgrade: Option<Vec<String>>,
    /// nginx's `internal`.
    #[serde(default)]
    pub internal: bool,
    /// Let CONNECT reach this location.
    #[serde(default)]
    pub allow_connect: bool,
    /// nginx's `root`: serve files from this directory (the whole path appended).
    pub root: Option<Spanned<String>>,
    /// nginx's `alias`: serve files from this directory (the location prefix replaced).
    pub alias: Option<Spanned<String>>,
    /// nginx's `index` (default `"index.html"`; `false` disables).
    pub index: Option<Spanned<IndexCfg>>,
    /// nginx's `expires` (`Expires` and `Cache-Control: max-age`).
    pub expires: Option<Dur>,
    /// Extra `Cache-Control` directives for files, e.g. `"public, immutable"`.
    pub cache_control: Option<Spanned<String>>,
    /// Serve `.gz` / `.br` siblings to clients that accept them (`["gzip", "br"]`).
    #[serde(default)]
    pub precompressed: Vec<Spanned<String>>,
    /// Follow symbolic links that leave the directory (refused with 403 by default).
    #[serde(default)]
    pub allow_symlinks_outside_root: bool,
    /// nginx's `add_header`; replaces the server's list when set.
    pub add_header: Option<Vec<Spanned<AddHeader>>>,
    /// nginx's `error_page`; replaces the server's list when set.
    pub error_page: Option<Vec<Spanned<ErrorPageCfg>>>,
    /// nginx's `allow`/`deny`; replaces the server's list when set.
    pub access: Option<Vec<Spanned<AccessRule>>>,
}
}

/// `tls = { certificate, key }`, `tls = { self_signed = true }` or `tls = { acme = true }`,
/// with the protocol, cipher, session and OCSP settings of nginx's `ssl_*` directives.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsCfg {
    /// PEM certificate chain.
    pub certificate: Option<String>,
    /// PEM private key (PKCS#8, PKCS#1 or SEC1).
    pub key: Option<String>,
    /// A self-signed certificate for the server names (or localhost), for development.
    #[serde(default)]
    pub self_signed: bool,
    /// Obtain and renew the certificate with ACME (see `[acme]`).
    #[serde(default)]
    pub acme: bool,
    /// Offer HTTP/2 through ALPN (default true).
    pub http2: Option<bool>,
    /// TLS handshake timeout (default 10s).
    pub handshake_timeout: Option<Dur>,
    /// nginx's `ssl_protocols`: `["TLSv1.2", "TLSv1.3"]` (the default; nothing older
    /// exists in rustls).
    pub protocols: Option<Spanned<Vec<String>>>,
    /// nginx's `ssl_ciphers`: OpenSSL names, `"A:B"` or `["A", "B"]`; TLS 1.2 names
    /// restrict only TLS 1.2 suites (default: rustls' safe suites).
    pub ciphers: Option<Spanned<CipherList>>,
    /// nginx's `ssl_prefer_server_ciphers` (default false).
    pub prefer_server_ciphers: Option<Spanned<bool>>,
    /// nginx's `ssl_session_timeout`, for tickets and the session cache (default:
    /// tickets live 12h, cache entries until evicted).
    pub session_timeout: Option<Spanned<Dur>>,
    /// nginx's `ssl_session_cache`: a size (`"10m"`, ~4000 sessions per MiB;
    /// `"shared:SSL:10m"` is accepted too) or `"off"` (default 20000 sessions).
    pub session_cache: Option<Spanned<String>>,
    /// nginx's `ssl_stapling`: staple the OCSP response fetched from the certificate's
    /// responder (default false).
    #[serde(default)]
    pub ocsp_stapling: bool,
    /// nginx's `ssl_stapling_verify`: check the response's signature before stapling.
    pub ocsp_stapling_verify: Option<Spanned<bool>>,
    /// nginx's `ssl_stapling_file`: staple this DER response instead of fetching one.
    pub ocsp_file: Option<Spanned<String>>,
}

/// `ciphers = "A:B"` (nginx's form) or `ciphers = ["A", "B"]`.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum CipherList {
    /// Colon-separated, as in nginx.
    Joined(String),
    /// One name per element.
    List(Vec<String>),
}

/// `hsts = { max_age = "365d", include_subdomains = true, preload = false }`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HstsCfg {
    /// `max-age`.
    pub max_age: Dur,
    /// `includeSubDomains`.
    #[serde(default)]
    pub include_subdomains: bool,
    /// `preload`.
    #[serde(default)]
    pub preload: bool,
}

/// `forwarded = { trusted = [...], ... }`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ForwardedCfg {
    /// nginx's `set_real_ip_from` / uvicorn's `--forwarded-allow-ips`: CIDRs, or `"*"`.
    #[serde(default)]
    pub trusted: Vec<String>,
    /// nginx's `real_ip_header`: `"x-forwarded-for"` (default), `"x-real-ip"`, `"forwarded"`.
    pub client_header: Option<String>,
    /// nginx's `real_ip_recursive` (default true).
    pub recursive: Option<bool>,
    /// `"append"` (default, `$proxy_add_x_forwarded_for`), `"replace-untrusted"`,
    /// `"resolved-client"`, `"pass"`, `"remove"`.
    pub x_forwarded_for: Option<String>,
    /// `"set"` (default), `"pass"` or `"remove"`.
    pub x_real_ip: Option<String>,
    /// As `x_real_ip`.
    pub x_forwarded_proto: Option<String>,
    /// As `x_real_ip`.
    pub x_forwarded_host: Option<String>,
    /// As `x_real_ip`.
    pub x_forwarded_port: Option<String>,
    /// RFC 7239 `Forwarded`: `"pass"` (default), `"set"` or `"remove"`.
    pub forwarded: Option<String>,
}

/// One `limit_req zone=NAME [burst=N] [nodelay | delay=N]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitReqCfg {
    /// The zone.
    pub zone: String,
    /// Excess requests allowed (default 0).
    #[serde(default)]
    pub burst: u32,
    /// Serve the burst at once instead of spacing it out.
    #[serde(default)]
    pub nodelay: bool,
    /// Serve this many excess requests at once, delay the rest.
    pub delay: Option<u32>,
}

/// One `limit_conn NAME N`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitConnCfg {
    /// The zone.
    pub zone: String,
    /// Concurrent requests per key.
    pub max: u32,
}

/// `index = "index.html"` or `index = false`.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum IndexCfg {
    /// A file name.
    Name(String),
    /// `false`: no index file.
    Enabled(bool),
}

/// One `add_header NAME VALUE [always]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AddHeader {
    /// The header name.
    pub name: String,
    /// The value.
    pub value: String,
    /// Also on error responses (nginx's `always`).
    #[serde(default)]
    pub always: bool,
    /// Replace a header of the same name from the upstream instead of adding another.
    #[serde(default)]
    pub replace: bool,
}

/// One `error_page CODES [=STATUS] URI`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ErrorPageCfg {
    /// The statuses the page replaces.
    pub codes: Vec<u16>,
    /// A URI served by a `root`/`alias` location of the same server (usually `internal`).
    pub uri: Option<String>,
    /// Or a file path.
    pub file: Option<String>,
    /// nginx's `=STATUS`: answer with this status instead.
    pub status: Option<u16>,
    /// Also replace the upstream's own error responses (nginx's `proxy_intercept_errors on`).
    #[serde(default)]
    pub intercept_upstream: bool,
}

/// One `allow X;` or `deny X;` (`"all"` or a CIDR / address).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AccessRule {
    /// Addresses to allow.
    pub allow: Option<String>,
    /// Addresses to deny (403).
    pub deny: Option<String>,
}

/// The value of `return`.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum Return {
    /// `return = 403`.
    Status(u16),
    /// `return = { status = 301, url = "..." }` or `{ status = 200, body = "..." }`.
    Full {
        /// The status.
        status: u16,
        /// A redirect target (3xx); `$host`, `$request_uri` and `$scheme` are supported.
        url: Option<String>,
        /// A text body.
        body: Option<String>,
    },
}
