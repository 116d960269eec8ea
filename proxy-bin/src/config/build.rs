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
use proxy_core::discovery::{DiscoveryError, Target};
use proxy_core::forwarded::TrustedProxies;
use proxy_core::limit::ConnZone;
use proxy_core::router::{
    Location, LocationService, Pattern, Redirect, Router, ServerName, VirtualServer,
};
use proxy_core::server::{HttpConfig, ListenConfig};
use proxy_core::static_files::StaticFiles;
use proxy_core::upstream::{ClientConfig, UpstreamClient};
use proxy_tls::challenge::{AcmeChallengeLayer, ChallengeStore};
use tower::Layer;

use super::dns::{self, DnsGroup, DnsGroups, Resolver};
use super::schema::{self, Config};
use super::shared::{AnyReqZone, Shared};
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
    /// The upstream groups that follow DNS, to keep while this plan runs.
    pub dns: DnsGroups,
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
    pub(super) req: HashMap<String, AnyReqZone>,
    /// Request zones defined but not built (already reported).
    pub(super) failed_req: std::collections::HashSet<String>,
    pub(super) conn: HashMap<String, ConnZone>,
}

/// Check `config` and build the plan, reporting every problem found. Must run inside a
/// tokio runtime (health checks, access log writers and DNS resolution start tasks).
/// Host names are resolved here: those of `resolve = true` servers (unless their group
/// is unchanged since the running config, which keeps its own), the others once.
pub async fn build(
    src: &Source,
    config: &Config,
    shared: &mut Shared,
) -> Result<Plan, Vec<Diagnostic>> {
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
    let resolver = dns::resolver(src, config, &mut errs);
    let (groups, dns_groups) =
        build_groups(src, &config.upstream, &resolver, shared, &mut errs).await;
    let passes = dns::proxy_pass_names(config, &resolver).await;
    // Groups defined but not built have been reported: locations naming them say no more.
    let failed_groups: std::collections::HashSet<String> = config
        .upstream
        .keys()
        .filter(|name| !groups.contains_key(*name))
        .cloned()
        .collect();
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
    // Whether any location logs: the router then gives each request its route.
    let logs_routes = std::cell::Cell::new(false);
    for (si, server) in config.server.iter().enumerate() {
        let key = format!("server[{si}]");
        let ctx = super::location::Ctx {
            src,
            server,
            groups: &groups,
            passes: &passes,
            failed_groups: &failed_groups,
            zones: &zones,
            shared: &mut *shared,
            default_log: default_log.clone(),
            logs_routes: &logs_routes,
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
        // The route is read only by access logs and metrics.
        let mut b = Router::builder().route_info(logs_routes.get() || shared.metrics.is_some());
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
            dns: DnsGroups(dns_groups),
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
            Err((field, e)) => {
                let c = cfg.get_ref();
                let span = match field {
                    "rate" => Some(c.rate.span()),
                    "key" => c.key.as_ref().map(|k| k.span()),
                    "backend.redis" => c.backend.as_ref().map(|b| b.get_ref().redis.span()),
                    "backend.fail" => c
                        .backend
                        .as_ref()
                        .and_then(|b| b.get_ref().fail.as_ref().map(|f| f.span())),
                    _ => c.backend.as_ref().map(|b| b.span()),
                };
                errs.push(src.diag(
                    span.or(Some(cfg.span())),
                    format!("limit_req_zone.{name}.{field}"),
                    e,
                ));
            }
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
    let failed_req = config
        .limit_req_zone
        .keys()
        .filter(|name| !req.contains_key(*name))
        .cloned()
        .collect();
    Zones {
        req,
        failed_req,
        conn,
    }
}

/// Every `[upstream.NAME]`: its servers (IP addresses, host names resolved once, or
/// names kept resolved), policy, health check and client settings. Groups with
/// `resolve = true` names come with their background resolution (second value).
async fn build_groups(
    src: &Source,
    upstreams: &BTreeMap<String, toml::Spanned<schema::Upstream>>,
    resolver: &Resolver,
    shared: &Shared,
    errs: &mut Vec<Diagnostic>,
) -> (HashMap<String, Group>, HashMap<String, DnsGroup>) {
    let mut groups = HashMap::new();
    let mut dns_groups = HashMap::new();
    for (name, up) in upstreams {
        let key = format!("upstream.{name}");
        let cfg = up.get_ref();
        let client = UpstreamClient::new(client_config(cfg));
        let fingerprint = dns::follows_dns(cfg).then(|| dns::fingerprint(cfg, resolver));
        // Unchanged since the running config: keep the group, its servers' state and
        // its resolution task.
        if let Some(kept) = fingerprint
            .as_ref()
            .and_then(|fp| shared.dns_group(name, fp))
        {
            groups.insert(
                name.clone(),
                Group {
                    group: kept.group.clone(),
                    client,
                },
            );
            dns_groups.insert(name.clone(), kept);
            continue;
        }
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
        let before = errs.len();
        let mut b = BalanceGroup::builder(name.as_str()).policy(policy);
        let mut targets = Vec::new();
        let mut first_target = None;
        for (i, s) in cfg.servers.iter().enumerate() {
            match server(src, &format!("{key}.servers[{i}]"), s, resolver, errs).await {
                Servers::Fixed(peers) => {
                    for p in peers {
                        b = b.server(p);
                    }
                }
                Servers::Resolved(t) => {
                    first_target.get_or_insert(s.span());
                    targets.push(t);
                }
                Servers::Invalid => {}
            }
        }
        if let Some(hc) = &cfg.health_check {
            match health_check(hc) {
                Ok(h) => b = b.health_check(h),
                Err(e) => errs.push(src.diag(Some(up.span()), format!("{key}.health_check"), e)),
            }
        }
        if errs.len() > before {
            continue;
        }
        let group = match fingerprint {
            None => match b.build() {
                Ok(g) => g,
                Err(e) => {
                    errs.push(src.diag(Some(up.span()), format!("{key}.servers"), e.to_string()));
                    continue;
                }
            },
            Some(fp) => {
                let names: Vec<String> = targets.iter().map(|t| t.name()).collect();
                let discovery = match targets
                    .into_iter()
                    .fold(resolver.discovery(), |d, t| d.target(t))
                    .build()
                {
                    Ok(d) => d,
                    Err(e) => {
                        errs.push(src.diag(None, "resolver", e.to_string()));
                        continue;
                    }
                };
                match discovery.group(b).await {
                    Ok((group, task)) => {
                        tracing::info!(
                            upstream = %name,
                            servers = group.stats().len(),
                            "upstream servers resolved; following DNS"
                        );
                        dns_groups.insert(
                            name.clone(),
                            DnsGroup::new(fp, group.clone(), discovery, task),
                        );
                        group
                    }
                    Err(e) => {
                        let why = match e {
                            DiscoveryError::NoServers if discovery.stats().failures > 0 => {
                                "the name servers gave no answer (timeout or server failure)"
                                    .to_owned()
                            }
                            DiscoveryError::NoServers => "no such name, or no address".to_owned(),
                            other => other.to_string(),
                        };
                        errs.push(src.diag(
                            first_target.or(Some(up.span())),
                            format!("{key}.servers"),
                            format!(
                                "no primary server resolved from {}: {why}",
                                names.join(", ")
                            ),
                        ));
                        continue;
                    }
                }
            }
        };
        groups.insert(name.clone(), Group { group, client });
    }
    (groups, dns_groups)
}

fn client_config(cfg: &schema::Upstream) -> ClientConfig {
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
    cc
}

/// What one `servers` entry gives.
enum Servers {
    /// Fixed servers: an IP address, or every address of a name resolved once.
    Fixed(Vec<Peer>),
    /// A name to keep resolving.
    Resolved(Target),
    /// Reported.
    Invalid,
}

/// One `servers` entry, checked; host names without `resolve` are resolved now.
async fn server(
    src: &Source,
    key: &str,
    s: &toml::Spanned<schema::UpstreamServer>,
    resolver: &Resolver,
    errs: &mut Vec<Diagnostic>,
) -> Servers {
    let sc = s.get_ref();
    if sc.weight == Some(0) {
        errs.push(src.diag(
            Some(s.span()),
            format!("{key}.weight"),
            "must be at least 1",
        ));
        return Servers::Invalid;
    }
    // The parameters every address of this entry gets (the template's own address is
    // replaced by each resolved one).
    let at = |addr: SocketAddr| {
        let mut p = Peer::new(addr);
        if let Some(w) = sc.weight.and_then(NonZeroU32::new) {
            p = p.weight(w);
        }
        if let Some(n) = sc.max_fails {
            p = p.max_fails(n);
        }
        if let Some(d) = sc.fail_timeout {
            p = p.fail_timeout(d.0);
        }
        if let Some(n) = sc.max_conns.and_then(NonZeroU32::new) {
            p = p.max_conns(n);
        }
        if sc.backup {
            p = p.backup();
        }
        p
    };
    let template = at(SocketAddr::from(([0, 0, 0, 0], 0)));
    match (&sc.addr, &sc.srv) {
        (Some(a), Some(_)) => {
            errs.push(src.diag(
                Some(a.span()),
                format!("{key}.srv"),
                "give either addr or srv, not both",
            ));
            Servers::Invalid
        }
        (None, None) => {
            errs.push(src.diag(
                Some(s.span()),
                key.to_owned(),
                "a server needs addr (\"IP:PORT\" or \"HOST:PORT\") or srv",
            ));
            Servers::Invalid
        }
        (None, Some(srv)) => {
            let k = format!("{key}.srv");
            if !sc.resolve {
                errs.push(src.diag(Some(srv.span()), k, "an SRV name needs resolve = true"));
                return Servers::Invalid;
            }
            if sc.weight.is_some() || sc.backup {
                errs.push(src.diag(
                    Some(s.span()),
                    k,
                    "weight and backup come from the SRV records: leave them out",
                ));
                return Servers::Invalid;
            }
            match Target::srv(srv.get_ref()) {
                Ok(t) => Servers::Resolved(t.template(template)),
                Err(_) => {
                    errs.push(src.diag(
                        Some(srv.span()),
                        k,
                        format!("{:?} is not a DNS name", srv.get_ref()),
                    ));
                    Servers::Invalid
                }
            }
        }
        (Some(addr), None) => {
            let k = format!("{key}.addr");
            if let Ok(ip) = addr.get_ref().parse::<SocketAddr>() {
                return Servers::Fixed(vec![at(ip)]);
            }
            let Some((host, port)) = dns::host_port(addr.get_ref(), None) else {
                errs.push(src.diag(
                    Some(addr.span()),
                    k,
                    format!(
                        "{:?} is not an address such as \"127.0.0.1:8000\" or \"backend.internal:8000\"",
                        addr.get_ref()
                    ),
                ));
                return Servers::Invalid;
            };
            if sc.resolve {
                return match Target::host(host, port) {
                    Ok(t) => Servers::Resolved(t.template(template)),
                    Err(_) => {
                        errs.push(src.diag(
                            Some(addr.span()),
                            k,
                            format!("{host:?} is not a DNS name"),
                        ));
                        Servers::Invalid
                    }
                };
            }
            match resolver.lookup(host, port).await {
                Ok(addrs) => Servers::Fixed(addrs.into_iter().map(at).collect()),
                Err(e) => {
                    errs.push(src.diag(
                        Some(addr.span()),
                        k,
                        format!("{e} (add resolve = true to keep resolving it while running)"),
                    ));
                    Servers::Invalid
                }
            }
        }
    }
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
