//! Host names in the config: the `[resolver]` table, upstream servers given by name
//! (resolved once at start and at each reload, like nginx, or kept resolved with
//! `resolve = true`), and `proxy_pass = "http://name:port"` (resolved once).
//!
//! Names resolved once go through the system resolver (`getaddrinfo`: `/etc/hosts`,
//! `/etc/resolv.conf`, nsswitch), unless `[resolver] nameservers` is set: then the
//! configured servers answer every name of the config, so that one file decides.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use proxy_core::balance::Group as BalanceGroup;
use proxy_core::discovery::{Discovery, DiscoveryBuilder, DiscoveryTask, Target};

use super::schema::{Config, Upstream};
use super::{Diagnostic, Source};

/// Default time allowed for one lookup (nginx's `resolver_timeout`).
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(5);

/// The checked `[resolver]` table.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(super) struct Resolver {
    nameservers: Vec<SocketAddr>,
    valid: Option<Duration>,
    min_ttl: Option<Duration>,
    max_ttl: Option<Duration>,
    timeout: Option<Duration>,
    retry: Option<Duration>,
}

/// Check `[resolver]` (absent: the system's resolver with the library's defaults).
pub(super) fn resolver(src: &Source, config: &Config, errs: &mut Vec<Diagnostic>) -> Resolver {
    let Some(cfg) = &config.resolver else {
        return Resolver::default();
    };
    let c = cfg.get_ref();
    let mut nameservers = Vec::new();
    for ns in &c.nameservers {
        match nameserver(ns.get_ref()) {
            Some(addr) => nameservers.push(addr),
            None => errs.push(src.diag(
                Some(ns.span()),
                "resolver.nameservers",
                format!(
                    "{:?} is not a name server address such as \"10.0.0.2\" or \"10.0.0.2:53\"",
                    ns.get_ref()
                ),
            )),
        }
    }
    let r = Resolver {
        nameservers,
        valid: c.valid.map(|d| d.0),
        min_ttl: c.min_ttl.map(|d| d.0),
        max_ttl: c.max_ttl.map(|d| d.0),
        timeout: c.timeout.map(|d| d.0),
        retry: c.retry.map(|d| d.0),
    };
    let zero = [
        ("valid", r.valid),
        ("min_ttl", r.min_ttl),
        ("max_ttl", r.max_ttl),
        ("timeout", r.timeout),
        ("retry", r.retry),
    ];
    for (name, d) in zero {
        if d == Some(Duration::ZERO) {
            errs.push(src.diag(
                Some(cfg.span()),
                format!("resolver.{name}"),
                "must be more than 0",
            ));
        }
    }
    if let (Some(min), Some(max)) = (r.min_ttl, r.max_ttl) {
        if min > max {
            errs.push(src.diag(
                Some(cfg.span()),
                "resolver.min_ttl",
                "must not be more than max_ttl",
            ));
        }
    }
    r
}

/// `IP` (port 53) or `IP:PORT`, IPv6 as `[::1]:53` or `::1`.
fn nameserver(s: &str) -> Option<SocketAddr> {
    let s = s.trim();
    s.parse::<SocketAddr>()
        .ok()
        .or_else(|| s.parse::<IpAddr>().ok().map(|ip| SocketAddr::new(ip, 53)))
}

impl Resolver {
    /// A discovery builder with these settings.
    pub(super) fn discovery(&self) -> DiscoveryBuilder {
        let mut b = Discovery::builder();
        for ns in &self.nameservers {
            b = b.nameserver(*ns);
        }
        if let Some(d) = self.valid {
            b = b.interval(d);
        }
        if let Some(d) = self.min_ttl {
            b = b.min_ttl(d);
        }
        if let Some(d) = self.max_ttl {
            b = b.max_ttl(d);
        }
        if let Some(d) = self.timeout {
            b = b.timeout(d);
        }
        if let Some(d) = self.retry {
            b = b.retry(d);
        }
        b
    }

    /// Resolve `host` once: every address, on `port`. An error says why in words.
    pub(super) async fn lookup(&self, host: &str, port: u16) -> Result<Vec<SocketAddr>, String> {
        let timeout = self.timeout.unwrap_or(DEFAULT_TIMEOUT);
        if self.nameservers.is_empty() {
            let found = tokio::time::timeout(timeout, tokio::net::lookup_host((host, port)))
                .await
                .map_err(|_| format!("cannot resolve {host:?}: no answer within {timeout:?}"))?
                .map_err(|e| format!("cannot resolve {host:?}: {e}"))?;
            let mut addrs: Vec<SocketAddr> = found.collect();
            addrs.sort_unstable();
            addrs.dedup();
            if addrs.is_empty() {
                return Err(format!("cannot resolve {host:?}: no address"));
            }
            return Ok(addrs);
        }
        let target =
            Target::host(host, port).map_err(|e| format!("{host:?} is not a host name ({e})"))?;
        let discovery = self
            .discovery()
            .target(target)
            .build()
            .map_err(|e| e.to_string())?;
        let addrs: Vec<SocketAddr> = discovery.resolve().await.iter().map(|s| s.addr()).collect();
        if !addrs.is_empty() {
            Ok(addrs)
        } else if discovery.stats().failures > 0 {
            Err(format!(
                "cannot resolve {host:?}: the name servers gave no answer (timeout or server failure)"
            ))
        } else {
            Err(format!(
                "cannot resolve {host:?}: no such name, or no address"
            ))
        }
    }
}

/// `HOST:PORT` with a host name (not an IP address) → its parts. `default_port` when
/// the port is left out (`None`: the port is required).
pub(super) fn host_port(s: &str, default_port: Option<u16>) -> Option<(&str, u16)> {
    let (host, port) = match s.rsplit_once(':') {
        Some((h, p)) => (h, p.parse::<u16>().ok()?),
        None => (s, default_port?),
    };
    let valid = !host.is_empty()
        && host.len() <= 253
        && host
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_'))
        && host.parse::<IpAddr>().is_err();
    valid.then_some((host, port))
}

/// An upstream group kept up to date from DNS, with what it was built from. Clones
/// share the background task; it stops when the last clone goes (the group was removed
/// or changed by a reload) or when the group itself is dropped.
#[derive(Clone)]
pub struct DnsGroup {
    fingerprint: String,
    pub(super) group: Arc<BalanceGroup>,
    discovery: Discovery,
    _task: Arc<DiscoveryTask>,
}

impl std::fmt::Debug for DnsGroup {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DnsGroup")
            .field("group", &self.group.name())
            .field("stats", &self.discovery.stats())
            .finish()
    }
}

impl DnsGroup {
    pub(super) fn new(
        fingerprint: String,
        group: Arc<BalanceGroup>,
        discovery: Discovery,
        task: DiscoveryTask,
    ) -> Self {
        DnsGroup {
            fingerprint,
            group,
            discovery,
            _task: Arc::new(task),
        }
    }

    /// Whether this group was built from exactly these settings.
    pub(super) fn matches(&self, fingerprint: &str) -> bool {
        self.fingerprint == fingerprint
    }
}

/// The DNS-backed groups of one config, by upstream name. Handed to the running proxy
/// when the config is applied; the previous set is dropped then, which stops the tasks
/// of groups the new config removed or changed.
#[derive(Debug, Default)]
pub struct DnsGroups(pub(super) HashMap<String, DnsGroup>);

/// Everything a DNS-backed group is built from, as text: equal fingerprints mean the
/// group can be kept as it is across a reload. Values only (no file positions), so
/// edits elsewhere in the file do not restart the group.
pub(super) fn fingerprint(up: &Upstream, resolver: &Resolver) -> String {
    use std::fmt::Write as _;
    let mut s = format!(
        "{resolver:?}|{:?}|{:?}",
        up.policy.as_ref().map(|p| p.get_ref()),
        up.health_check
    );
    for sv in &up.servers {
        let v = sv.get_ref();
        let _ = write!(
            s,
            "|{:?} {:?} {} {:?} {:?} {:?} {:?} {}",
            v.addr.as_ref().map(|a| a.get_ref()),
            v.srv.as_ref().map(|a| a.get_ref()),
            v.resolve,
            v.weight,
            v.max_fails,
            v.fail_timeout,
            v.max_conns,
            v.backup
        );
    }
    s
}

/// Whether a group has a server to keep resolving.
pub(super) fn follows_dns(up: &Upstream) -> bool {
    up.servers.iter().any(|s| {
        let s = s.get_ref();
        s.resolve
            && (s.srv.is_some()
                || s.addr
                    .as_ref()
                    .is_some_and(|a| a.get_ref().parse::<SocketAddr>().is_err()))
    })
}

/// Every `proxy_pass = "http://HOST[:PORT]"` with a host name, resolved once.
pub(super) async fn proxy_pass_names(
    config: &Config,
    resolver: &Resolver,
) -> HashMap<String, Result<Vec<SocketAddr>, String>> {
    let mut out = HashMap::new();
    for server in &config.server {
        for loc in &server.location {
            let Some(pass) = &loc.proxy_pass else {
                continue;
            };
            let Some(rest) = pass.get_ref().strip_prefix("http://") else {
                continue;
            };
            let authority = rest.trim_end_matches('/');
            if out.contains_key(authority) || authority.parse::<SocketAddr>().is_ok() {
                continue;
            }
            let Some((host, port)) = host_port(authority, Some(80)) else {
                continue;
            };
            let found = resolver.lookup(host, port).await;
            out.insert(authority.to_owned(), found);
        }
    }
    out
}

#[cfg(test)]
#[path = "../../../proxy-core/tests/dns_server/mod.rs"]
mod dns_server;

#[cfg(test)]
mod tests {
    use super::dns_server::{a, srv, Dns, RecordType};
    use super::*;
    use crate::config::{Shared, Source};

    fn src(text: &str) -> Source {
        Source {
            file: std::path::PathBuf::from("test.toml"),
            text: text.to_owned(),
        }
    }

    fn rt() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
    }

    /// The errors of `text` (which must have some).
    fn errors(text: &str) -> Vec<Diagnostic> {
        rt().block_on(async { crate::config::load(&src(text), &mut Shared::default()).await })
            .unwrap_err()
    }

    const SERVER: &str = "\n[[server]]\nlisten = [\"127.0.0.1:1\"]\n[[server.location]]\npath = \"/\"\nproxy_pass = \"app\"\n";

    #[test]
    fn server_entries_are_checked_with_line_and_key() {
        let cases = [
            (
                "{ srv = \"_http._tcp.app.test\" }",
                "upstream.app.servers[0].srv",
                "needs resolve = true",
            ),
            (
                "{ addr = \"app.test:80\", srv = \"_http._tcp.app.test\", resolve = true }",
                "upstream.app.servers[0].srv",
                "not both",
            ),
            ("{ weight = 2 }", "upstream.app.servers[0]", "needs addr"),
            (
                "{ srv = \"_http._tcp.app.test\", resolve = true, weight = 2 }",
                "upstream.app.servers[0].srv",
                "come from the SRV records",
            ),
            (
                "{ addr = \"app test:80\", resolve = true }",
                "upstream.app.servers[0].addr",
                "is not an address",
            ),
            (
                "{ addr = \"app.test\", resolve = true }",
                "upstream.app.servers[0].addr",
                "is not an address",
            ),
        ];
        for (server, key, message) in cases {
            let text = format!("[upstream.app]\nservers = [\n  {server},\n]\n{SERVER}");
            let errs = errors(&text);
            assert_eq!(errs.len(), 1, "{server}: {errs:?}");
            assert_eq!(errs[0].key, key, "{server}: {}", errs[0]);
            assert!(errs[0].message.contains(message), "{server}: {}", errs[0]);
            assert_eq!(errs[0].line, 3, "{server}: {}", errs[0]);
        }
    }

    #[test]
    fn resolver_table_is_checked() {
        let text = format!(
            "[resolver]\nnameservers = [\"127.0.0.1:53\", \"dns.example\"]\nmin_ttl = \"10s\"\nmax_ttl = \"5s\"\n\n[upstream.app]\nservers = [{{ addr = \"127.0.0.1:8000\" }}]\n{SERVER}"
        );
        let errs = errors(&text);
        assert_eq!(errs.len(), 2, "{errs:?}");
        assert_eq!(
            (errs[0].key.as_str(), errs[0].line, errs[0].column),
            ("resolver.nameservers", 2, 32),
            "{}",
            errs[0]
        );
        assert_eq!(errs[1].key, "resolver.min_ttl", "{}", errs[1]);
        let errs = errors(&format!("[resolver]\ntimeot = \"1s\"\n{SERVER}"));
        assert_eq!(
            (errs[0].line, errs[0].key.as_str()),
            (2, "timeot"),
            "{}",
            errs[0]
        );
    }

    #[test]
    fn names_resolved_once_become_servers_and_unresolvable_ones_are_errors() {
        rt().block_on(async {
            let dns = Dns::start().await;
            dns.set("app.test.", RecordType::A, vec![a([127, 0, 0, 1]), a([127, 0, 0, 2])]);
            dns.set("pass.test.", RecordType::A, vec![a([127, 0, 0, 3])]);
            let resolver = format!(
                "[resolver]\nnameservers = [\"{}\"]\ntimeout = \"1s\"\n",
                dns.addr
            );
            let good = format!(
                "{resolver}[upstream.app]\nservers = [{{ addr = \"app.test:8000\", max_fails = 3 }}]\n{SERVER}[[server.location]]\npath = \"/p\"\nproxy_pass = \"http://pass.test\"\n"
            );
            let plan = crate::config::load(&src(&good), &mut Shared::default())
                .await
                .unwrap();
            let mut servers: Vec<String> = plan
                .groups
                .iter()
                .flat_map(|g| g.stats().map(|s| s.addr.to_string()).collect::<Vec<_>>())
                .collect();
            servers.sort();
            assert_eq!(servers, ["127.0.0.1:8000", "127.0.0.2:8000"]);
            assert!(plan.dns.0.is_empty(), "resolved once: nothing follows DNS");

            let bad = format!(
                "{resolver}[upstream.app]\nservers = [{{ addr = \"missing.test:8000\" }}]\n{SERVER}[[server.location]]\npath = \"/p\"\nproxy_pass = \"http://gone.test:81/\"\n"
            );
            let errs = crate::config::load(&src(&bad), &mut Shared::default())
                .await
                .unwrap_err();
            assert_eq!(errs.len(), 2, "{errs:?}");
            assert_eq!(
                (errs[0].key.as_str(), errs[0].line),
                ("upstream.app.servers[0].addr", 5),
                "{}",
                errs[0]
            );
            assert!(errs[0].message.contains("missing.test"), "{}", errs[0]);
            assert_eq!(
                (errs[1].key.as_str(), errs[1].line),
                ("server[0].location[1].proxy_pass", 14),
                "{}",
                errs[1]
            );
        });
    }

    #[test]
    fn followed_groups_survive_a_reload_unless_changed() {
        rt().block_on(async {
            let dns = Dns::start().await;
            dns.set("app.test.", RecordType::A, vec![a([127, 0, 0, 1])]);
            dns.set(
                "_http._tcp.srv.test.",
                RecordType::SRV,
                vec![srv(10, 2, 8001, "app.test.")],
            );
            let config = |max_fails: u32| {
                format!(
                    "[resolver]\nnameservers = [\"{}\"]\nvalid = \"1h\"\n\n[upstream.app]\nservers = [{{ addr = \"app.test:8000\", resolve = true, max_fails = {max_fails} }}, {{ addr = \"127.0.0.9:9\", backup = true }}]\n\n[upstream.srv]\nservers = [{{ srv = \"_http._tcp.srv.test\", resolve = true }}]\n{SERVER}",
                    dns.addr
                )
            };
            let mut shared = Shared::default();
            let plan = crate::config::load(&src(&config(3)), &mut shared)
                .await
                .unwrap();
            let app = plan.dns.0["app"].group.clone();
            let view: Vec<_> = app.stats().map(|s| (s.addr.to_string(), s.backup)).collect();
            assert_eq!(
                view,
                [("127.0.0.1:8000".to_owned(), false), ("127.0.0.9:9".to_owned(), true)]
            );
            let srv_group = plan.dns.0["srv"].group.clone();
            let view: Vec<_> = srv_group.stats().map(|s| (s.addr.to_string(), s.weight)).collect();
            assert_eq!(view, [("127.0.0.1:8001".to_owned(), 2)]);
            shared.set_dns_groups(plan.dns);

            // Same settings: the same group (and task). Changed: a new one.
            let again = crate::config::load(&src(&config(3)), &mut shared)
                .await
                .unwrap();
            assert!(Arc::ptr_eq(&again.dns.0["app"].group, &app));
            let changed = crate::config::load(&src(&config(4)), &mut shared)
                .await
                .unwrap();
            assert!(!Arc::ptr_eq(&changed.dns.0["app"].group, &app));
            assert!(Arc::ptr_eq(&changed.dns.0["srv"].group, &srv_group));

            // Nothing resolves at start: an error with the group's key (the unchanged
            // SRV group is kept as it is, not resolved again).
            dns.clear();
            let errs = crate::config::load(&src(&config(5)), &mut shared)
                .await
                .unwrap_err();
            assert_eq!(errs.len(), 1, "{errs:?}");
            assert_eq!(
                (errs[0].key.as_str(), errs[0].line, errs[0].column),
                ("upstream.app.servers", 6, 12),
                "{}",
                errs[0]
            );
            assert!(errs[0].message.contains("app.test"), "{}", errs[0]);
        });
    }

    #[test]
    fn host_ports() {
        assert_eq!(
            host_port("backend.internal:8000", None),
            Some(("backend.internal", 8000))
        );
        assert_eq!(host_port("backend", Some(80)), Some(("backend", 80)));
        assert_eq!(host_port("backend", None), None);
        assert_eq!(host_port("backend:http", None), None);
        assert_eq!(host_port("127.0.0.1:80", None), None);
        assert_eq!(host_port("::1", Some(80)), None);
        assert_eq!(host_port("a b:80", None), None);
        assert_eq!(host_port(":80", None), None);
    }

    #[test]
    fn nameservers() {
        assert_eq!(nameserver("10.0.0.2"), Some("10.0.0.2:53".parse().unwrap()));
        assert_eq!(
            nameserver("127.0.0.1:5353"),
            Some("127.0.0.1:5353".parse().unwrap())
        );
        assert_eq!(nameserver("::1"), Some("[::1]:53".parse().unwrap()));
        assert_eq!(nameserver("dns.example"), None);
    }
}
