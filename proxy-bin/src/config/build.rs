//! From the checked schema to proxy-core services: upstream groups, zones, listeners
//! (TLS, PROXY protocol), and one router per listen address.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::Duration;

use http::uri::PathAndQuery;
use http::StatusCode;
use proxy_core::balance::{Group as BalanceGroup, HealthCheck, Policy, Server as Peer};
use proxy_core::forwarded::TrustedProxies;
use proxy_core::limit::{ConnZone, ReqZone};
use proxy_core::router::{
    Location, LocationService, Pattern, Redirect, Router, ServerName, VirtualServer,
};
use proxy_core::server::{HttpConfig, ListenConfig};
use proxy_core::static_files::StaticFiles;
use proxy_core::upstream::{ClientConfig, UpstreamClient};
use proxy_tls::challenge::{AcmeChallengeLayer, ChallengeStore};
use tower::Layer;

use super::schema::{self, Config};
use super::shared::Shared;
use super::{Diagnostic, Source};

/// Everything the binary needs to run.
#[derive(Debug)]
pub struct Plan {
    /// Graceful shutdown deadline.
    pub shutdown_timeout: Duration,
    /// One entry per distinct listen address.
    pub listeners: Vec<ListenerPlan>,
    /// The admin listener's address.
    pub admin: Option<SocketAddr>,
    /// Upstream groups, for metrics.
    pub groups: Vec<Arc<BalanceGroup>>,
    /// Certificates to obtain and renew with ACME.
    pub acme: Vec<proxy_tls::acme::AcmeManager>,
}

/// One listening address and what it serves.
pub struct ListenerPlan {
    /// How to bind.
    pub listen: ListenConfig,
    /// Connection settings (from the first server on this address).
    pub http: HttpConfig,
    /// The virtual servers on this address (with ACME challenges answered first).
    pub service: LocationService,
    /// TLS, when the servers on this address have it.
    pub tls: Option<super::tls::TlsPlan>,
    /// Read a PROXY protocol header from these sources first.
    pub proxy_protocol: Option<TrustedProxies>,
    /// nginx's `send_timeout`.
    pub send_timeout: Duration,
}

impl std::fmt::Debug for ListenerPlan {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ListenerPlan")
            .field("listen", &self.listen)
            .field("tls", &self.tls.is_some())
            .field("proxy_protocol", &self.proxy_protocol.is_some())
            .finish()
    }
}

/// An upstream group, ready to forward to.
pub(super) struct Group {
    pub(super) group: Arc<BalanceGroup>,
    pub(super) client: UpstreamClient,
}

/// The zones locations refer to, by name.
pub(super) struct Zones {
    pub(super) req: HashMap<String, ReqZone>,
    pub(super) conn: HashMap<String, ConnZone>,
}

/// Check `config` and build the plan, reporting every problem found. Must run inside a
/// tokio runtime (health checks and access log writers start tasks).
pub fn build(src: &Source, config: &Config, shared: &mut Shared) -> Result<Plan, Vec<Diagnostic>> {
    let mut errs = Vec::new();
    let shutdown_timeout = config
        .global
        .shutdown_timeout
        .map_or(Duration::from_secs(30), |d| d.0);
    if config.global.workers == Some(0) {
        errs.push(src.diag(None, "global.workers", "must be at least 1"));
    }
    let admin = config
        .admin
        .as_ref()
        .and_then(|a| match a.listen.get_ref().parse() {
            Ok(addr) => Some(addr),
            Err(_) => {
                errs.push(src.diag(
                    Some(a.listen.span()),
                    "admin.listen",
                    "expected an address such as \"127.0.0.1:9145\"",
                ));
                None
            }
        });
    if admin.is_some() && shared.metrics.is_none() {
        shared.metrics = Some(proxy_core::metrics::Metrics::new());
    }
    let groups = build_groups(src, &config.upstream, &mut errs);
    let zones = build_zones(src, config, shared, &mut errs);
    let default_log = match &config.access_log {
        Some(cfg) => match shared.access_log(cfg.get_ref(), &src.base_dir()) {
            Ok(w) => w,
            Err(e) => {
                errs.push(src.diag(Some(cfg.span()), "access_log", e));
                None
            }
        },
        None => None,
    };
    if config.server.is_empty() {
        errs.push(src.diag(None, "server", "no [[server]] configured"));
    }
    let challenges = config.acme.as_ref().map(|_| ChallengeStore::new());

    // Listen address → everything on it, in file order.
    let mut by_addr: Vec<AddrPlan> = Vec::new();
    for (si, server) in config.server.iter().enumerate() {
        let key = format!("server[{si}]");
        let ctx = super::location::Ctx {
            src,
            server,
            groups: &groups,
            zones: &zones,
            shared: &mut *shared,
            default_log: default_log.clone(),
        };
        let vs = build_server(ctx, &key, &mut errs);
        if server.listen.is_empty() {
            errs.push(src.diag(
                None,
                format!("{key}.listen"),
                "at least one address is needed",
            ));
        }
        for l in &server.listen {
            let Ok(addr) = l.get_ref().parse::<SocketAddr>() else {
                errs.push(src.diag(
                    Some(l.span()),
                    format!("{key}.listen"),
                    format!(
                        "{:?} is not an address such as \"127.0.0.1:8080\"",
                        l.get_ref()
                    ),
                ));
                continue;
            };
            match by_addr.iter_mut().find(|p| p.listen.addr == addr) {
                Some(p) => {
                    if p.tls != server.tls.is_some() {
                        errs.push(src.diag(
                            Some(l.span()),
                            format!("{key}.listen"),
                            format!("{addr} is used with and without TLS"),
                        ));
                    }
                    p.servers.push((si, vs.clone()));
                }
                None => by_addr.push(AddrPlan {
                    listen: ListenConfig::new(addr)
                        .reuse_port(server.reuse_port)
                        .backlog(server.backlog.unwrap_or(511)),
                    http: http_config(server, shutdown_timeout),
                    tls: server.tls.is_some(),
                    proxy_protocol: server.proxy_protocol.as_ref().and_then(|pp| {
                        trusted(src, &format!("{key}.proxy_protocol"), pp, &mut errs)
                    }),
                    send_timeout: server.send_timeout.map_or(Duration::from_secs(60), |d| d.0),
                    servers: vec![(si, vs.clone())],
                }),
            }
        }
    }

    let mut listeners = Vec::new();
    let mut acme = Vec::new();
    for p in by_addr {
        let mut b = Router::builder();
        for (_, s) in &p.servers {
            b = b.server(s.clone());
        }
        let router = match b.build() {
            Ok(r) => r,
            Err(e) => {
                errs.push(src.diag(None, "server", e.to_string()));
                continue;
            }
        };
        let service = match (&challenges, p.tls) {
            (Some(store), false) => {
                LocationService::new(AcmeChallengeLayer::new().store(store.clone()).layer(router))
            }
            _ => LocationService::new(router),
        };
        let tls = if p.tls {
            let servers: Vec<usize> = p.servers.iter().map(|(i, _)| *i).collect();
            super::tls::acceptor(
                src,
                config,
                &servers,
                challenges.as_ref(),
                &mut acme,
                &mut errs,
            )
        } else {
            None
        };
        listeners.push(ListenerPlan {
            listen: p.listen,
            http: p.http,
            service,
            tls,
            proxy_protocol: p.proxy_protocol,
            send_timeout: p.send_timeout,
        });
    }
    if errs.is_empty() {
        Ok(Plan {
            shutdown_timeout,
            listeners,
            admin,
            groups: groups.into_values().map(|g| g.group).collect(),
            acme,
        })
    } else {
        Err(errs)
    }
}

struct AddrPlan {
    listen: ListenConfig,
    http: HttpConfig,
    tls: bool,
    proxy_protocol: Option<TrustedProxies>,
    send_timeout: Duration,
    servers: Vec<(usize, VirtualServer)>,
}

/// A list of CIDRs (or `"*"`) as trusted sources.
pub(super) fn trusted(
    src: &Source,
    key: &str,
    list: &toml::Spanned<Vec<String>>,
    errs: &mut Vec<Diagnostic>,
) -> Option<TrustedProxies> {
    let text = list.get_ref().join(",");
    match text.parse::<TrustedProxies>() {
        Ok(t) => Some(t),
        Err(e) => {
            errs.push(src.diag(
                Some(list.span()),
                key.to_owned(),
                format!("invalid address list: {e}"),
            ));
            None
        }
    }
}

fn http_config(s: &schema::Server, shutdown_timeout: Duration) -> HttpConfig {
    let mut h = HttpConfig::default();
    if let Some(d) = s.client_header_timeout {
        h.header_read_timeout = d.0;
    }
    if let Some(n) = s.keepalive_requests {
        h.max_requests_per_connection = n;
    }
    if let Some(n) = s.max_header_size {
        h.max_header_size = usize::try_from(n.0).unwrap_or(usize::MAX);
    }
    if let Some(n) = s.max_headers {
        h.max_headers = n;
    }
    h.max_connections = s.max_connections;
    h.shutdown_timeout = shutdown_timeout;
    h
}

fn build_zones(
    src: &Source,
    config: &Config,
    shared: &mut Shared,
    errs: &mut Vec<Diagnostic>,
) -> Zones {
    let mut req = HashMap::new();
    for (name, cfg) in &config.limit_req_zone {
        match shared.req_zone(name, cfg.get_ref()) {
            Ok(z) => {
                req.insert(name.clone(), z);
            }
            Err(e) => errs.push(src.diag(Some(cfg.span()), format!("limit_req_zone.{name}"), e)),
        }
    }
    let mut conn = HashMap::new();
    for (name, cfg) in &config.limit_conn_zone {
        match shared.conn_zone(name, cfg.get_ref()) {
            Ok(z) => {
                conn.insert(name.clone(), z);
            }
            Err(e) => errs.push(src.diag(Some(cfg.span()), format!("limit_conn_zone.{name}"), e)),
        }
    }
    Zones { req, conn }
}

fn build_groups(
    src: &Source,
    upstreams: &BTreeMap<String, toml::Spanned<schema::Upstream>>,
    errs: &mut Vec<Diagnostic>,
) -> HashMap<String, Group> {
    let mut groups = HashMap::new();
    for (name, up) in upstreams {
        let key = format!("upstream.{name}");
        let cfg = up.get_ref();
        let policy = match cfg.policy.as_ref().map(|p| p.get_ref().as_str()) {
            None | Some("round_robin") => Policy::RoundRobin,
            Some("least_conn") => Policy::LeastConn,
            Some(other) => {
                let span = cfg.policy.as_ref().map(|p| p.span());
                errs.push(src.diag(
                    span,
                    format!("{key}.policy"),
                    format!("{other:?}: use \"round_robin\" or \"least_conn\""),
                ));
                continue;
            }
        };
        let mut b = BalanceGroup::builder(name.as_str()).policy(policy);
        for (i, s) in cfg.servers.iter().enumerate() {
            let sc = s.get_ref();
            let Ok(addr) = sc.addr.get_ref().parse::<SocketAddr>() else {
                errs.push(src.diag(
                    Some(sc.addr.span()),
                    format!("{key}.servers[{i}].addr"),
                    format!(
                        "{:?} is not an IP address and port such as \"127.0.0.1:8000\"",
                        sc.addr.get_ref()
                    ),
                ));
                continue;
            };
            let mut peer = Peer::new(addr);
            if let Some(w) = sc.weight {
                match NonZeroU32::new(w) {
                    Some(w) => peer = peer.weight(w),
                    None => errs.push(src.diag(
                        Some(s.span()),
                        format!("{key}.servers[{i}].weight"),
                        "must be at least 1",
                    )),
                }
            }
            if let Some(n) = sc.max_fails {
                peer = peer.max_fails(n);
            }
            if let Some(d) = sc.fail_timeout {
                peer = peer.fail_timeout(d.0);
            }
            if let Some(n) = sc.max_conns.and_then(NonZeroU32::new) {
                peer = peer.max_conns(n);
            }
            if sc.backup {
                peer = peer.backup();
            }
            b = b.server(peer);
        }
        if let Some(hc) = &cfg.health_check {
            match health_check(hc) {
                Ok(h) => b = b.health_check(h),
                Err(e) => errs.push(src.diag(Some(up.span()), format!("{key}.health_check"), e)),
            }
        }
        let group = match b.build() {
            Ok(g) => g,
            Err(e) => {
                errs.push(src.diag(Some(up.span()), format!("{key}.servers"), e.to_string()));
                continue;
            }
        };
        let mut cc = ClientConfig::default();
        if let Some(k) = cfg.keepalive {
            cc.keepalive = k;
        }
        if let Some(d) = cfg.keepalive_timeout {
            cc.keepalive_timeout = d.0;
        }
        if let Some(d) = cfg.connect_timeout {
            cc.connect_timeout = d.0;
        }
        if let Some(d) = cfg.send_timeout {
            cc.send_timeout = d.0;
        }
        groups.insert(
            name.clone(),
            Group {
                group,
                client: UpstreamClient::new(cc),
            },
        );
    }
    groups
}

fn health_check(hc: &schema::HealthCheckCfg) -> Result<HealthCheck, String> {
    let mut h = HealthCheck::new();
    if let Some(d) = hc.interval {
        h = h.interval(d.0);
    }
    if let Some(p) = &hc.path {
        h = h.path(PathAndQuery::try_from(p.as_str()).map_err(|_| format!("{p:?} is not a path"))?);
    }
    if let Some([lo, hi]) = hc.status {
        let (Ok(lo), Ok(hi)) = (StatusCode::from_u16(lo), StatusCode::from_u16(hi)) else {
            return Err("status must be two HTTP statuses".into());
        };
        h = h.expect(lo, hi);
    }
    if let Some(n) = hc.fails {
        h = h.fails(NonZeroU32::new(n).ok_or("fails must be at least 1")?);
    }
    if let Some(n) = hc.passes {
        h = h.passes(NonZeroU32::new(n).ok_or("passes must be at least 1")?);
    }
    if let Some(d) = hc.timeout {
        h = h.timeout(d.0);
    }
    Ok(h)
}

fn build_server(
    mut ctx: super::location::Ctx<'_, '_>,
    key: &str,
    errs: &mut Vec<Diagnostic>,
) -> VirtualServer {
    let server = ctx.server;
    let src = ctx.src;
    let mut names = Vec::new();
    for n in &server.server_name {
        match ServerName::parse(n.get_ref()) {
            Some(name) => names.push(name),
            None if n.get_ref() == "_" => {}
            None => errs.push(src.diag(
                Some(n.span()),
                format!("{key}.server_name"),
                format!("invalid server name {:?}", n.get_ref()),
            )),
        }
    }
    let mut vs = VirtualServer::new(names).default_server(server.default_server);
    if server.redirect_to_https {
        // nginx: `location / { return 301 https://$host$request_uri; }`, plus the certbot
        // webroot when one is given.
        let mut r = Redirect::new(StatusCode::MOVED_PERMANENTLY).scheme("https");
        if let Some(port) = server.https_port.filter(|p| *p != 443) {
            r = r.port(port);
        }
        if let Some(p) = Pattern::parse("/") {
            vs = vs.location(Location::new(p, r));
        }
    }
    if let Some(webroot) = &server.acme_webroot {
        let dir = super::location::resolve(src, webroot.get_ref());
        match StaticFiles::root(dir).index(None).build() {
            Ok(files) => {
                if let Some(p) = Pattern::parse("^~ /.well-known/acme-challenge/") {
                    vs = vs.location(Location::new(p, files));
                }
            }
            Err(e) => errs.push(src.diag(
                Some(webroot.span()),
                format!("{key}.acme_webroot"),
                format!("{:?}: {e}", webroot.get_ref()),
            )),
        }
    }
    for (li, loc) in server.location.iter().enumerate() {
        let lkey = format!("{key}.location[{li}]");
        if let Some(l) = super::location::build(&mut ctx, &lkey, loc, errs) {
            vs = vs.location(l);
        }
    }
    vs
}
