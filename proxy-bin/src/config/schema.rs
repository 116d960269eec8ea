//! The TOML schema. Every struct refuses unknown keys, so a typo is an error with a line
//! number rather than a silently ignored setting.

use std::collections::BTreeMap;

use serde::Deserialize;
use toml::Spanned;

use super::values::{Dur, Size};

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
    /// Virtual servers (`[[server]]`), like nginx's `server { }`.
    #[serde(default)]
    pub server: Vec<Server>,
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
    /// The servers of the group.
    pub servers: Vec<Spanned<UpstreamServer>>,
    /// Idle keep-alive connections kept per server (nginx's `keepalive`, default 32).
    pub keepalive: Option<usize>,
    /// How long an idle upstream connection is kept (default 4s, below uvicorn's 5s).
    pub keepalive_timeout: Option<Dur>,
    /// nginx's `proxy_connect_timeout` for this group (default 60s).
    pub connect_timeout: Option<Dur>,
}

/// One `server` line of an upstream group.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpstreamServer {
    /// `host:port` (an IP address for now).
    pub addr: Spanned<String>,
}

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
    /// nginx's `access_log off` when false.
    pub access_log: Option<bool>,
    /// nginx's `add_header`; replaces the server's list when set.
    pub add_header: Option<Vec<Spanned<AddHeader>>>,
    /// nginx's `error_page`; replaces the server's list when set.
    pub error_page: Option<Vec<Spanned<ErrorPageCfg>>>,
    /// nginx's `allow`/`deny`; replaces the server's list when set.
    pub access: Option<Vec<Spanned<AccessRule>>>,
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
