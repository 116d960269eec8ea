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
