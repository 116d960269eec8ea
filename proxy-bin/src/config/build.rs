//! From the checked schema to proxy-core services.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::time::Duration;

use proxy_core::router::{Router, ServerName, VirtualServer};
use proxy_core::server::{HttpConfig, ListenConfig};
use proxy_core::upstream::{ClientConfig, UpstreamClient};

use super::schema::{self, Config};
use super::{Diagnostic, Source};

/// Everything the binary needs to run.
#[derive(Debug)]
pub struct Plan {
    /// Worker threads (None: one per core).
    pub workers: Option<usize>,
    /// Graceful shutdown deadline.
    pub shutdown_timeout: Duration,
    /// One entry per distinct listen address.
    pub listeners: Vec<ListenerPlan>,
}

/// One listening address and what it serves.
#[derive(Debug)]
pub struct ListenerPlan {
    /// How to bind.
    pub listen: ListenConfig,
    /// Connection settings (from the first server on this address).
    pub http: HttpConfig,
    /// The virtual servers on this address.
    pub router: Router,
}

/// An upstream group, ready to forward to.
pub(super) struct Group {
    pub(super) client: UpstreamClient,
    pub(super) addrs: Vec<SocketAddr>,
}

/// Check `config` and build the plan, reporting every problem found.
pub fn build(src: &Source, config: &Config) -> Result<Plan, Vec<Diagnostic>> {
    let mut errs = Vec::new();
    let shutdown_timeout = config
        .global
        .shutdown_timeout
        .map_or(Duration::from_secs(30), |d| d.0);
    if config.global.workers == Some(0) {
        errs.push(src.diag(None, "global.workers", "must be at least 1"));
    }
    let groups = build_groups(src, &config.upstream, &mut errs);
    if config.server.is_empty() {
        errs.push(src.diag(None, "server", "no [[server]] configured"));
    }

    // Listen address → (settings, virtual servers), in file order.
    let mut by_addr: Vec<(ListenConfig, HttpConfig, Vec<VirtualServer>)> = Vec::new();
    for (si, server) in config.server.iter().enumerate() {
        let key = format!("server[{si}]");
        let vs = build_server(src, &key, server, &groups, &mut errs);
        if server.listen.is_empty() {
            errs.push(src.diag(
                None,
                format!("{key}.listen"),
                "at least one address is needed",
            ));
        }
        for l in &server.listen {
            let addr: SocketAddr = match l.get_ref().parse() {
                Ok(a) => a,
                Err(_) => {
                    errs.push(src.diag(
                        Some(l.span()),
                        format!("{key}.listen"),
                        format!(
                            "{:?} is not an address such as \"127.0.0.1:8080\"",
                            l.get_ref()
                        ),
                    ));
                    continue;
                }
            };
            match by_addr.iter_mut().find(|(lc, _, _)| lc.addr == addr) {
                Some((_, _, servers)) => servers.push(vs.clone()),
                None => {
                    let listen = ListenConfig::new(addr)
                        .reuse_port(server.reuse_port)
                        .backlog(server.backlog.unwrap_or(511));
                    by_addr.push((
                        listen,
                        http_config(server, shutdown_timeout),
                        vec![vs.clone()],
                    ));
                }
            }
        }
    }

    let mut listeners = Vec::new();
    for (listen, http, servers) in by_addr {
        let mut b = Router::builder();
        for s in servers {
            b = b.server(s);
        }
        match b.build() {
            Ok(router) => listeners.push(ListenerPlan {
                listen,
                http,
                router,
            }),
            Err(e) => errs.push(src.diag(None, "server", e.to_string())),
        }
    }
    if errs.is_empty() {
        Ok(Plan {
            workers: config.global.workers,
            shutdown_timeout,
            listeners,
        })
    } else {
        Err(errs)
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

fn build_groups(
    src: &Source,
    upstreams: &BTreeMap<String, toml::Spanned<schema::Upstream>>,
    errs: &mut Vec<Diagnostic>,
) -> HashMap<String, Group> {
    let mut groups = HashMap::new();
    for (name, up) in upstreams {
        let key = format!("upstream.{name}");
        let up_ref = up.get_ref();
        if up_ref.servers.is_empty() {
            errs.push(src.diag(
                Some(up.span()),
                format!("{key}.servers"),
                "an upstream group needs at least one server",
            ));
        }
        let mut addrs = Vec::new();
        for (i, s) in up_ref.servers.iter().enumerate() {
            let a = &s.get_ref().addr;
            match a.get_ref().parse::<SocketAddr>() {
                Ok(addr) => addrs.push(addr),
                Err(_) => errs.push(src.diag(
                    Some(a.span()),
                    format!("{key}.servers[{i}].addr"),
                    format!(
                        "{:?} is not an IP address and port such as \"127.0.0.1:8000\"",
                        a.get_ref()
                    ),
                )),
            }
        }
        let mut cc = ClientConfig::default();
        if let Some(k) = up_ref.keepalive {
            cc.keepalive = k;
        }
        if let Some(d) = up_ref.keepalive_timeout {
            cc.keepalive_timeout = d.0;
        }
        if let Some(d) = up_ref.connect_timeout {
            cc.connect_timeout = d.0;
        }
        groups.insert(
            name.clone(),
            Group {
                client: UpstreamClient::new(cc),
                addrs,
            },
        );
    }
    groups
}

fn build_server(
    src: &Source,
    key: &str,
    server: &schema::Server,
    groups: &HashMap<String, Group>,
    errs: &mut Vec<Diagnostic>,
) -> VirtualServer {
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
    let read_timeout = server.proxy_read_timeout.map(|d| d.0);
    for (li, loc) in server.location.iter().enumerate() {
        let lkey = format!("{key}.location[{li}]");
        let ctx = super::location::Ctx {
            src,
            server,
            read_timeout,
            groups,
        };
        if let Some(l) = super::location::build(&ctx, &lkey, loc, errs) {
            vs = vs.location(l);
        }
    }
    vs
}
