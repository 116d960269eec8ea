//! What outlives one config: rate-limit zones (their counters survive a reload when the
//! zone is unchanged; a Redis zone keeps its connection), upstream groups that follow
//! DNS (their servers and background resolution survive a reload when the group is
//! unchanged), access log writers (one per file), and the metrics registry.

use std::collections::HashMap;
use std::num::NonZeroUsize;

use http::HeaderName;
use proxy_core::access_log::{AccessLogWriter, Format, Target};
use proxy_core::limit::redis::{FailMode, RedisZone};
use proxy_core::limit::{ConnZone, Key, Rate, ReqZone, ENTRY_BYTES};
use proxy_core::metrics::Metrics;

use super::dns::{DnsGroup, DnsGroups};
use super::schema::{self, AccessLogCfg};
use super::values::Size;

/// A request-rate zone: in this process, or shared through Redis.
#[derive(Debug, Clone)]
pub enum AnyReqZone {
    /// Counted by this process alone.
    Local(ReqZone),
    /// Counted in Redis, shared by every instance naming the zone there.
    Redis(RedisZone),
}

/// State kept across reloads.
#[derive(Default)]
pub struct Shared {
    req_zones: HashMap<String, (String, AnyReqZone)>,
    conn_zones: HashMap<String, (String, ConnZone)>,
    logs: HashMap<String, AccessLogWriter>,
    /// The upstream groups following DNS of the running config.
    dns: DnsGroups,
    /// The metrics registry, when an admin listener is configured.
    pub metrics: Option<Metrics>,
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shared")
            .field("req_zones", &self.req_zones.keys())
            .field("conn_zones", &self.conn_zones.keys())
            .field("logs", &self.logs.keys())
            .field("dns", &self.dns)
            .finish()
    }
}

/// nginx's zone sizes count 64 bytes per key; ours are honoured as memory by the zone.
const DEFAULT_ZONE: u64 = 10 << 20;

/// Parse a zone key: `client_ip` (or nginx's `$binary_remote_addr`/`$remote_addr`),
/// `header:NAME` (or `$http_name`), `shared` (or `$server_name`).
pub fn parse_key(s: &str) -> Result<Key, String> {
    match s {
        "client_ip" | "$binary_remote_addr" | "$remote_addr" => Ok(Key::ClientIp),
        "shared" | "$server_name" => Ok(Key::Shared),
        _ => {
            let name = s
                .strip_prefix("header:")
                .map(str::to_owned)
                .or_else(|| s.strip_prefix("$http_").map(|h| h.replace('_', "-")))
                .ok_or_else(|| {
                    format!("unknown key {s:?}: use \"client_ip\", \"header:NAME\" or \"shared\"")
                })?;
            HeaderName::from_bytes(name.as_bytes())
                .map(Key::Header)
                .map_err(|_| format!("{name:?} is not a header name"))
        }
    }
}

/// A zone kept in Redis. Connecting happens on first use (a Redis that is down at
/// start is the fail mode's business, not a config error).
fn redis_zone(
    name: &str,
    rate: Rate,
    key: Key,
    size: Option<Size>,
    b: &schema::ZoneBackendCfg,
) -> Result<RedisZone, (&'static str, String)> {
    let fail = match b.fail.as_ref().map(|f| f.get_ref().as_str()) {
        None | Some("local") => FailMode::Local,
        Some("open") => FailMode::Open,
        Some("closed") => FailMode::Closed,
        Some(other) => {
            return Err((
                "backend.fail",
                format!("{other:?}: use \"open\", \"closed\" or \"local\""),
            ))
        }
    };
    let mut zb = RedisZone::builder(b.redis.get_ref(), rate)
        .map_err(|e| ("backend.redis", format!("invalid Redis URL: {e}")))?
        .name(name)
        .key(key)
        .fail(fail)
        .capacity(NonZeroUsize::new(zone_bytes(size) / ENTRY_BYTES).unwrap_or(NonZeroUsize::MIN));
    if let Some(d) = b.timeout {
        if d.0.is_zero() {
            return Err(("backend.timeout", "must be more than 0".into()));
        }
        zb = zb.timeout(d.0);
    }
    if let Some(d) = b.backoff {
        zb = zb.backoff(d.0);
    }
    if let Some(n) = b.local_allowance {
        zb = zb.local_allowance(n);
    }
    Ok(zb.build())
}

fn backend_fingerprint(b: &schema::ZoneBackendCfg) -> String {
    format!(
        "{}|{:?}|{:?}|{:?}|{:?}",
        b.redis.get_ref(),
        b.fail.as_ref().map(|f| f.get_ref()),
        b.timeout,
        b.backoff,
        b.local_allowance
    )
}

fn zone_bytes(size: Option<Size>) -> usize {
    usize::try_from(size.map_or(DEFAULT_ZONE, |s| s.0)).unwrap_or(usize::MAX)
}

impl Shared {
    /// The request zone `name`, reused when its settings did not change. An error is
    /// the key (below `limit_req_zone.NAME`) and what is wrong with it.
    pub fn req_zone(
        &mut self,
        name: &str,
        cfg: &schema::ReqZoneCfg,
    ) -> Result<AnyReqZone, (&'static str, String)> {
        let rate: Rate = cfg.rate.get_ref().parse().map_err(|e| {
            (
                "rate",
                format!("invalid rate {:?}: {e}", cfg.rate.get_ref()),
            )
        })?;
        let key_text = cfg
            .key
            .as_ref()
            .map_or("client_ip", |k| k.get_ref().as_str());
        let key = parse_key(key_text).map_err(|e| ("key", e))?;
        let backend = cfg.backend.as_ref().map(|b| b.get_ref());
        let fingerprint = format!(
            "{}|{key_text}|{:?}|{}",
            cfg.rate.get_ref(),
            cfg.size.map(|s| s.0),
            backend.map_or_else(String::new, backend_fingerprint)
        );
        if let Some((fp, zone)) = self.req_zones.get(name) {
            if *fp == fingerprint {
                return Ok(zone.clone());
            }
        }
        let zone = match backend {
            None => AnyReqZone::Local(
                ReqZone::builder(rate)
                    .name(name)
                    .key(key)
                    .size_bytes(zone_bytes(cfg.size))
                    .build(),
            ),
            Some(b) => {
                let zone = redis_zone(name, rate, key, cfg.size, b)?;
                if let Some(m) = &self.metrics {
                    m.register_redis_zone(name, zone.clone());
                }
                AnyReqZone::Redis(zone)
            }
        };
        self.req_zones
            .insert(name.to_owned(), (fingerprint, zone.clone()));
        Ok(zone)
    }

    /// The connection zone `name`, reused when its settings did not change.
    pub fn conn_zone(&mut self, name: &str, cfg: &schema::ConnZoneCfg) -> Result<ConnZone, String> {
        let key_text = cfg
            .key
            .as_ref()
            .map_or("client_ip", |k| k.get_ref().as_str());
        let key = parse_key(key_text)?;
        let fingerprint = format!("{key_text}|{:?}", cfg.size.map(|s| s.0));
        if let Some((fp, zone)) = self.conn_zones.get(name) {
            if *fp == fingerprint {
                return Ok(zone.clone());
            }
        }
        let zone = ConnZone::builder()
            .name(name)
            .key(key)
            .size_bytes(zone_bytes(cfg.size))
            .build();
        self.conn_zones
            .insert(name.to_owned(), (fingerprint, zone.clone()));
        Ok(zone)
    }

    /// The writer for an access log setting, or `None` for `off`. One writer per
    /// (path, format, buffer, flush), shared by every location that logs there.
    pub fn access_log(
        &mut self,
        cfg: &AccessLogCfg,
        base: &std::path::Path,
    ) -> Result<Option<AccessLogWriter>, String> {
        let (path, format, buffer, flush) = match cfg {
            AccessLogCfg::Enabled(false) => return Ok(None),
            AccessLogCfg::Enabled(true) => ("stdout", None, None, None),
            AccessLogCfg::Path(p) => (p.as_str(), None, None, None),
            AccessLogCfg::Full {
                path,
                format,
                buffer,
                flush,
            } => (path.as_str(), format.as_deref(), *buffer, *flush),
        };
        if path == "off" {
            return Ok(None);
        }
        let format = match format.unwrap_or("combined_timed") {
            "combined" => Format::Combined,
            "combined_timed" => Format::CombinedTimed,
            "json" => Format::Json,
            other => {
                return Err(format!(
                    "unknown format {other:?}: use \"combined\", \"combined_timed\" or \"json\""
                ))
            }
        };
        let id = format!("{path}|{format:?}|{buffer:?}|{flush:?}");
        if let Some(w) = self.logs.get(&id) {
            return Ok(Some(w.clone()));
        }
        let target = if path == "stdout" {
            Target::Stdout
        } else {
            let p = std::path::PathBuf::from(path);
            Target::File(if p.is_absolute() { p } else { base.join(p) })
        };
        let mut b = AccessLogWriter::builder(target).format(format);
        if let Some(buf) = buffer {
            b = b.buffer(usize::try_from(buf.0).unwrap_or(usize::MAX));
        }
        if let Some(f) = flush {
            b = b.flush(f.0);
        }
        let b = b.queue(NonZeroUsize::new(4096).unwrap_or(NonZeroUsize::MIN));
        let writer = b
            .spawn()
            .map_err(|e| format!("cannot open access log {path:?}: {e}"))?;
        if let Some(m) = &self.metrics {
            m.register_access_log(path.to_owned(), writer.stats());
        }
        self.logs.insert(id, writer.clone());
        Ok(Some(writer))
    }

    /// The DNS-backed group `name` of the running config, if it was built from
    /// `fingerprint`.
    pub(super) fn dns_group(&self, name: &str, fingerprint: &str) -> Option<DnsGroup> {
        self.dns
            .0
            .get(name)
            .filter(|g| g.matches(fingerprint))
            .cloned()
    }

    /// The DNS-backed groups of the config now running. The previous ones that are not
    /// among them stop resolving.
    pub fn set_dns_groups(&mut self, groups: DnsGroups) {
        self.dns = groups;
    }

    /// Every access log writer, for SIGUSR1 (reopen) and shutdown (flush).
    pub fn log_writers(&self) -> impl Iterator<Item = &AccessLogWriter> {
        self.logs.values()
    }
}

#[cfg(test)]
mod tests {
    use crate::config::{Diagnostic, Shared, Source};

    fn load(text: &str, shared: &mut Shared) -> Result<crate::config::Plan, Vec<Diagnostic>> {
        let source = Source {
            file: std::path::PathBuf::from("test.toml"),
            text: text.to_owned(),
        };
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
            .block_on(async { crate::config::load(&source, shared).await })
    }

    const LOCATION: &str = "\n[[server]]\nlisten = [\"127.0.0.1:1\"]\n[[server.location]]\npath = \"/\"\nreturn = 200\nlimit_req = [{ zone = \"api\", burst = 5, nodelay = true }]\n";

    #[test]
    fn redis_backend_is_checked_with_line_and_key() {
        let cases = [
            (
                "{ redis = \"redis://127.0.0.1:6379/0\", fail = \"maybe\" }",
                "limit_req_zone.api.backend.fail",
                4,
                "\"maybe\"",
            ),
            (
                "{ redis = \"http://127.0.0.1\" }",
                "limit_req_zone.api.backend.redis",
                4,
                "invalid Redis URL",
            ),
            (
                "{ redis = \"redis://127.0.0.1\", timeout = \"0\" }",
                "limit_req_zone.api.backend.timeout",
                4,
                "more than 0",
            ),
            (
                "{ redis = \"redis://127.0.0.1\", retries = 3 }",
                "backend",
                4,
                "retries",
            ),
            ("{ fail = \"open\" }", "backend", 4, "redis"),
        ];
        for (backend, key, line, message) in cases {
            let text = format!(
                "[limit_req_zone.api]\nrate = \"10r/s\"\n\nbackend = {backend}\n{LOCATION}"
            );
            let errs = load(&text, &mut Shared::default()).unwrap_err();
            assert_eq!(errs.len(), 1, "{backend}: {errs:?}");
            assert_eq!(
                (errs[0].key.as_str(), errs[0].line),
                (key, line),
                "{backend}: {}",
                errs[0]
            );
            assert!(errs[0].message.contains(message), "{backend}: {}", errs[0]);
        }
    }

    #[test]
    fn redis_zones_are_built_kept_and_replaced() {
        let text = |fail: &str| {
            format!("[limit_req_zone.api]\nrate = \"10r/s\"\nbackend = {{ redis = \"redis://127.0.0.1:1/0\", fail = \"{fail}\", timeout = \"50ms\", local_allowance = 2 }}\n{LOCATION}")
        };
        let mut shared = Shared::default();
        load(&text("open"), &mut shared).unwrap();
        let first = shared.req_zones["api"].1.clone();
        let super::AnyReqZone::Redis(first) = first else {
            panic!("a Redis zone expected");
        };
        assert_eq!(first.name(), "api");
        load(&text("open"), &mut shared).unwrap();
        let super::AnyReqZone::Redis(same) = shared.req_zones["api"].1.clone() else {
            panic!("a Redis zone expected");
        };
        assert_eq!(format!("{same:?}"), format!("{first:?}"));
        load(&text("closed"), &mut shared).unwrap();
        let super::AnyReqZone::Redis(changed) = shared.req_zones["api"].1.clone() else {
            panic!("a Redis zone expected");
        };
        assert!(format!("{changed:?}").contains("Closed"), "{changed:?}");
    }

    #[test]
    fn dry_run_is_refused_on_a_redis_zone() {
        let text = format!("[limit_req_zone.api]\nrate = \"10r/s\"\nbackend = {{ redis = \"redis://127.0.0.1:1\" }}\n{LOCATION}limit_req_dry_run = true\n");
        let errs = load(&text, &mut Shared::default()).unwrap_err();
        assert_eq!(errs.len(), 1, "{errs:?}");
        assert_eq!(errs[0].key, "server[0].location[0].limit_req");
        assert!(errs[0].message.contains("Redis"), "{}", errs[0]);
    }
}
