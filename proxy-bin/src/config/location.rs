//! One `[[server.location]]`: its terminal service (proxy, return, files) and the layers
//! around it, outermost first, each present only when configured:
//!
//! ```text
//! Forwarded → Metrics → AccessLog → Hsts → AddHeaders → ErrorPage → Access (allow/deny)
//!   → LimitConn → LimitReq → RedisLimitReq → ConcurrencyLimit → ClientBodyTimeout → BodyLimit
//!   → RequestBuffer → ResponseBuffer → UpstreamBodyTimeout → terminal
//! ```
//!
//! Why this order: the real client address is resolved first, so logs, metrics, allow/deny
//! and rate limits all see it; logs and metrics wrap everything so they see every answer
//! (429s and 413s included); local rate zones come before Redis ones, so a request they
//! reject costs no Redis round trip; response headers sit outside error pages so an error page
//! gets `add_header ... always` too; limits come before the body is read, so a rejected
//! request costs no upload; the body timeout wraps request buffering, which reads the
//! body; response buffering reads ahead of the upstream body timeout, which watches the
//! upstream.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use http::header::{HeaderName, HeaderValue};
use http::StatusCode;
use ipnet::IpNet;
use proxy_core::access::{AccessLayer, AccessRules};
use proxy_core::error_page::{ErrorPageLayer, ErrorPages, Page};
use proxy_core::headers::{AddHeadersLayer, ResponseHeaders};
use proxy_core::router::{Location, LocationService, Locations, Pattern, Redirect, Return};
use proxy_core::static_files::StaticFiles;
use proxy_core::upstream::{ClientConfig, UpstreamClient, UpstreamTimeouts};
use toml::Spanned;
use tower::ServiceBuilder;

use std::num::NonZeroU32;

use proxy_core::access_log::{AccessLogLayer, AccessLogWriter};
use proxy_core::balance::{
    Balance, Condition, Group as BalanceGroup, NextUpstream, Server as Peer,
};
use proxy_core::buffer::{BodyLimitLayer, RequestBufferLayer, ResponseBufferLayer};
use proxy_core::forwarded::{
    ClientHeader, ForwardedLayer, HeaderPolicy, TrustedProxies, XffPolicy,
};
use proxy_core::limit::redis::{RedisLimit, RedisLimitReqLayer};
use proxy_core::limit::{Delay, LimitConnLayer, LimitReqLayer, ReqLimit};
use proxy_core::metrics::MetricsLayer;
use proxy_core::timeout::{
    ClientBodyTimeoutLayer, ConcurrencyLimitLayer, UpstreamBodyTimeoutLayer,
};
use proxy_core::{Request, Response};
use proxy_tls::hsts::HstsLayer;
use std::convert::Infallible;
use tower::util::Either;

use super::build::{Group, Zones};
use super::schema::{self, AccessRule, AddHeader, ErrorPageCfg, ForwardedCfg, IndexCfg};
use super::shared::{AnyReqZone, Shared};
use super::{Diagnostic, Source};

/// What a location needs from around it.
pub(super) struct Ctx<'a, 's> {
    pub(super) src: &'a Source,
    pub(super) server: &'a schema::Server,
    pub(super) groups: &'a std::collections::HashMap<String, Group>,
    /// `proxy_pass = "http://HOST:PORT"` names, resolved once.
    pub(super) passes: &'a std::collections::HashMap<String, Result<Vec<SocketAddr>, String>>,
    /// Upstream groups that are defined but could not be built (already reported).
    pub(super) failed_groups: &'a std::collections::HashSet<String>,
    pub(super) zones: &'a Zones,
    pub(super) shared: &'s mut Shared,
    pub(super) default_log: Option<AccessLogWriter>,
    /// Set when a location has an access log (which reads each request's route).
    pub(super) logs_routes: &'a std::cell::Cell<bool>,
}

/// A setting of the location, or else of its server.
macro_rules! inherit {
    ($ctx:expr, $loc:expr, $field:ident) => {
        $loc.$field.as_ref().or($ctx.server.$field.as_ref())
    };
}

/// Build one location, or push why it cannot be built.
pub(super) fn build(
    ctx: &mut Ctx<'_, '_>,
    key: &str,
    loc: &schema::Location,
    errs: &mut Vec<Diagnostic>,
) -> Option<Location> {
    let src = ctx.src;
    let path_key = format!("{key}.path");
    let Some(pattern) = Pattern::parse(loc.path.get_ref()) else {
        errs.push(src.diag(Some(loc.path.span()), path_key, format!("{:?} is not a location: use \"/prefix\", \"= /exact\", \"^~ /prefix\", \"~ regex\" or \"~* regex\"", loc.path.get_ref())));
        return None;
    };
    if let Err(e) = pattern.compile() {
        errs.push(src.diag(
            Some(loc.path.span()),
            path_key,
            format!("invalid regex: {e}"),
        ));
        return None;
    }
    let before = errs.len();
    let proxied = loc.proxy_pass.is_some();
    let terminal = terminal(ctx, key, &pattern, loc, errs);
    let headers = response_headers(
        src,
        key,
        loc.add_header.as_ref().unwrap_or(&ctx.server.add_header),
        errs,
    );
    let pages = error_pages(
        ctx,
        key,
        loc.error_page.as_ref().unwrap_or(&ctx.server.error_page),
        errs,
    );
    let access = access_rules(
        src,
        key,
        loc.access.as_ref().unwrap_or(&ctx.server.access),
        errs,
    );
    let forwarded = match inherit!(ctx, loc, forwarded) {
        Some(f) => forwarded_layer(src, key, f, errs),
        None => proxied.then(default_forwarded),
    };
    let (limit_req, redis_limit_req) = limit_req(ctx, key, loc, errs);
    let limit_conn = limit_conn(ctx, key, loc, errs);
    let log = access_log(ctx, key, loc, errs);
    if log.is_some() {
        ctx.logs_routes.set(true);
    }
    if errs.len() > before {
        return None;
    }
    // Which server answered is read only by access logs and metrics: without them the
    // upstream client does not record it.
    let terminal = match terminal? {
        Either::Left(b) => {
            proxy(b.with_upstream_info(log.is_some() || ctx.shared.metrics.is_some()))
        }
        other => other,
    };
    let body_limit = inherit!(ctx, loc, client_max_body_size).map_or(1 << 20, |s| s.0);
    let request_buffering = proxied
        && inherit!(ctx, loc, proxy_request_buffering)
            .copied()
            .unwrap_or(true);
    let response_buffering =
        proxied && inherit!(ctx, loc, proxy_buffering).copied().unwrap_or(true);
    let body_timeout =
        inherit!(ctx, loc, client_body_timeout).map_or(Duration::from_secs(60), |d| d.0);
    let read_timeout = read_timeout(ctx, loc);
    let request_buffer = request_buffering.then(|| {
        let max = if body_limit == 0 {
            u64::MAX
        } else {
            body_limit
        };
        let mut l = RequestBufferLayer::new().max_body_size(max);
        if let Some(s) = inherit!(ctx, loc, client_body_buffer_size) {
            l = l.memory_limit(usize::try_from(s.0).unwrap_or(usize::MAX));
        }
        l
    });
    let response_buffer = response_buffering.then(|| {
        let mut l = ResponseBufferLayer::new();
        if let Some(s) = inherit!(ctx, loc, proxy_buffers) {
            l = l.memory_limit(usize::try_from(s.0).unwrap_or(usize::MAX));
        }
        if let Some(s) = inherit!(ctx, loc, proxy_max_temp_file_size) {
            l = l.max_temp_file_size(s.0);
        }
        l
    });
    let hsts = ctx.server.hsts.as_ref().map(|h| {
        HstsLayer::new(h.max_age.0)
            .include_subdomains(h.include_subdomains)
            .preload(h.preload)
    });
    let metrics = ctx.shared.metrics.clone().map(MetricsLayer::new);
    let concurrency =
        inherit!(ctx, loc, max_concurrent_requests).map(|n| ConcurrencyLimitLayer::new(*n));
    let svc = ServiceBuilder::new()
        .option_layer(forwarded)
        .option_layer(metrics)
        .option_layer(log.map(AccessLogLayer::new))
        .option_layer(hsts)
        .option_layer(headers.map(AddHeadersLayer::new))
        .option_layer(pages.map(ErrorPageLayer::new))
        .option_layer(access.map(AccessLayer::new))
        .option_layer(limit_conn)
        .option_layer(limit_req)
        .option_layer(redis_limit_req)
        .option_layer(concurrency)
        .option_layer(proxied.then(|| ClientBodyTimeoutLayer::new(body_timeout)))
        .option_layer((proxied && body_limit > 0).then(|| BodyLimitLayer::new(body_limit)))
        .option_layer(request_buffer)
        .option_layer(response_buffer)
        .option_layer(proxied.then(|| UpstreamBodyTimeoutLayer::new(read_timeout)))
        .service(terminal);
    let location = Location::new(pattern, svc);
    Some(
        location
            .internal(loc.internal)
            .allow_connect(loc.allow_connect),
    )
}

/// The service at the bottom of a location's stack, as a concrete type: the location is
/// boxed once (by `Location::new`), so a second box here would be a second allocation
/// and indirect call per request.
type Terminal = Either<Balance, Either<Return, Either<Redirect, StaticFiles>>>;

fn proxy(b: Balance) -> Terminal {
    Either::Left(b)
}

fn ret(r: Return) -> Terminal {
    Either::Right(Either::Left(r))
}

fn redirect_to(r: Redirect) -> Terminal {
    Either::Right(Either::Right(Either::Left(r)))
}

fn files(f: StaticFiles) -> Terminal {
    Either::Right(Either::Right(Either::Right(f)))
}

/// The service at the bottom of the stack: exactly one of proxy_pass, return, root, alias.
fn terminal(
    ctx: &Ctx<'_, '_>,
    key: &str,
    pattern: &Pattern,
    loc: &schema::Location,
    errs: &mut Vec<Diagnostic>,
) -> Option<Terminal> {
    let src = ctx.src;
    let chosen = [
        loc.proxy_pass.as_ref().map(|s| ("proxy_pass", s.span())),
        loc.return_.as_ref().map(|s| ("return", s.span())),
        loc.root.as_ref().map(|s| ("root", s.span())),
        loc.alias.as_ref().map(|s| ("alias", s.span())),
    ];
    let chosen: Vec<_> = chosen.into_iter().flatten().collect();
    match chosen.as_slice() {
        [] => {
            errs.push(src.diag(
                Some(loc.path.span()),
                key.to_owned(),
                "a location needs one of proxy_pass, return, root or alias",
            ));
            return None;
        }
        [_] => {}
        [(first, _), (second, span), ..] => {
            errs.push(src.diag(Some(span.clone()), format!("{key}.{second}"), format!("a location takes only one of proxy_pass, return, root and alias (it already has {first})")));
            return None;
        }
    }
    if let Some(pass) = &loc.proxy_pass {
        let read = read_timeout(ctx, loc);
        let timeouts = UpstreamTimeouts {
            read_timeout: read,
            idle_timeout: read,
        };
        let next = next_upstream(ctx, key, loc, errs)?;
        let balance = proxy_pass(ctx, &format!("{key}.proxy_pass"), pass, loc, errs)?;
        return Some(proxy(
            balance.with_timeouts(timeouts).with_next_upstream(next),
        ));
    }
    if let Some(r) = &loc.return_ {
        return return_service(src, &format!("{key}.return"), r, errs);
    }
    static_files(src, key, pattern, loc, errs).map(files)
}

fn static_files(
    src: &Source,
    key: &str,
    pattern: &Pattern,
    loc: &schema::Location,
    errs: &mut Vec<Diagnostic>,
) -> Option<StaticFiles> {
    let (builder, dir_key, dir) = match (&loc.root, &loc.alias) {
        (Some(root), _) => (
            StaticFiles::root(resolve(src, root.get_ref())),
            "root",
            root,
        ),
        (None, Some(alias)) => {
            let prefix = match pattern {
                Pattern::Prefix(p) | Pattern::PrefixNoRegex(p) | Pattern::Exact(p) => p.clone(),
                Pattern::Regex(_) | Pattern::RegexCaseless(_) => {
                    errs.push(src.diag(
                        Some(alias.span()),
                        format!("{key}.alias"),
                        "alias needs a prefix or exact location (regex captures are not supported)",
                    ));
                    return None;
                }
            };
            (
                StaticFiles::alias(prefix, resolve(src, alias.get_ref())),
                "alias",
                alias,
            )
        }
        (None, None) => return None,
    };
    let mut b = builder.danger_allow_symlinks_outside_root(loc.allow_symlinks_outside_root);
    if let Some(index) = &loc.index {
        b = match index.get_ref() {
            IndexCfg::Name(n) => b.index(Some(n)),
            IndexCfg::Enabled(false) => b.index(None),
            IndexCfg::Enabled(true) => b,
        };
    }
    if let Some(e) = loc.expires {
        b = b.expires(e.0);
    }
    if let Some(cc) = &loc.cache_control {
        match HeaderValue::from_str(cc.get_ref()) {
            Ok(v) => b = b.cache_control(v),
            Err(_) => {
                errs.push(src.diag(
                    Some(cc.span()),
                    format!("{key}.cache_control"),
                    "not a valid header value",
                ));
                return None;
            }
        }
    }
    for p in &loc.precompressed {
        match p.get_ref().as_str() {
            "gzip" => b = b.precompressed_gzip(true),
            "br" => b = b.precompressed_br(true),
            other => {
                errs.push(src.diag(
                    Some(p.span()),
                    format!("{key}.precompressed"),
                    format!("{other:?}: expected \"gzip\" or \"br\""),
                ));
                return None;
            }
        }
    }
    match b.build() {
        Ok(files) => Some(files),
        Err(e) => {
            errs.push(src.diag(
                Some(dir.span()),
                format!("{key}.{dir_key}"),
                format!("{:?}: {e}", dir.get_ref()),
            ));
            None
        }
    }
}

/// A path from the config, relative ones taken from the config file's directory.
pub(super) fn resolve(src: &Source, path: &str) -> PathBuf {
    let p = PathBuf::from(path);
    if p.is_absolute() {
        p
    } else {
        src.base_dir().join(p)
    }
}

fn read_timeout(ctx: &Ctx<'_, '_>, loc: &schema::Location) -> Duration {
    inherit!(ctx, loc, proxy_read_timeout).map_or(Duration::from_secs(60), |d| d.0)
}

/// `proxy_pass NAME` (an upstream group), `proxy_pass http://IP:PORT` (a group of one) or
/// `proxy_pass http://HOST[:PORT]` (a group of the name's addresses, resolved once).
fn proxy_pass(
    ctx: &Ctx<'_, '_>,
    key: &str,
    pass: &Spanned<String>,
    loc: &schema::Location,
    errs: &mut Vec<Diagnostic>,
) -> Option<Balance> {
    let src = ctx.src;
    let target = pass.get_ref();
    let custom_upgrades = loc.proxy_upgrade.as_ref().map(|up| {
        let mut cc = ClientConfig::default();
        cc.upgrades = up.clone();
        UpstreamClient::new(cc)
    });
    if let Some(rest) = target.strip_prefix("http://") {
        let authority = rest.trim_end_matches('/');
        let addrs = match (authority.parse::<SocketAddr>(), ctx.passes.get(authority)) {
            (Ok(a), _) => vec![a],
            (Err(_), Some(Ok(addrs))) => addrs.clone(),
            (Err(_), Some(Err(e))) => {
                errs.push(src.diag(Some(pass.span()), key.to_owned(), e.clone()));
                return None;
            }
            (Err(_), None) => {
                errs.push(src.diag(
                    Some(pass.span()),
                    key.to_owned(),
                    format!("{target:?}: expected http://IP:PORT, http://HOST[:PORT] or an upstream name"),
                ));
                return None;
            }
        };
        // A name with several addresses is a group of them, round robin (nginx).
        let builder = addrs
            .into_iter()
            .fold(BalanceGroup::builder(target.as_str()), |b, a| {
                b.server(Peer::new(a))
            });
        let group = match builder.build() {
            Ok(g) => g,
            Err(e) => {
                errs.push(src.diag(Some(pass.span()), key.to_owned(), e.to_string()));
                return None;
            }
        };
        let client =
            custom_upgrades.unwrap_or_else(|| UpstreamClient::new(ClientConfig::default()));
        return Some(Balance::new(group, client));
    }
    match ctx.groups.get(target) {
        Some(g) => Some(Balance::new(
            g.group.clone(),
            custom_upgrades.unwrap_or_else(|| g.client.clone()),
        )),
        None if ctx.failed_groups.contains(target) => None,
        None => {
            errs.push(src.diag(
                Some(pass.span()),
                key.to_owned(),
                format!("unknown upstream {target:?} (define it as [upstream.{target}])"),
            ));
            None
        }
    }
}

fn next_upstream(
    ctx: &Ctx<'_, '_>,
    key: &str,
    loc: &schema::Location,
    errs: &mut Vec<Diagnostic>,
) -> Option<NextUpstream> {
    let mut next = match inherit!(ctx, loc, next_upstream) {
        None => NextUpstream::default(),
        Some(list) => {
            let mut n = NextUpstream::off();
            for c in list {
                if c.get_ref() == "off" {
                    continue;
                }
                match c.get_ref().parse::<Condition>() {
                    Ok(cond) => n = n.on(cond),
                    Err(_) => {
                        errs.push(ctx.src.diag(Some(c.span()), format!("{key}.next_upstream"), format!("unknown condition {:?}: use error, timeout, invalid_header, http_500, http_502, http_503, http_504, http_403, http_404, http_429, non_idempotent", c.get_ref())));
                        return None;
                    }
                }
            }
            n
        }
    };
    if let Some(t) = inherit!(ctx, loc, next_upstream_tries) {
        next = next.tries(*t);
    }
    if let Some(t) = inherit!(ctx, loc, next_upstream_timeout) {
        next = next.timeout(t.0);
    }
    Some(next)
}

fn forwarded_layer(
    src: &Source,
    key: &str,
    f: &Spanned<ForwardedCfg>,
    errs: &mut Vec<Diagnostic>,
) -> Option<ForwardedLayer> {
    let cfg = f.get_ref();
    let k = format!("{key}.forwarded");
    let mut bad = |what: &str, v: &str| {
        errs.push(src.diag(
            Some(f.span()),
            k.clone(),
            format!("{what}: unknown value {v:?}"),
        ));
    };
    let trusted = match cfg.trusted.join(",").parse::<TrustedProxies>() {
        Ok(t) => t,
        Err(e) => {
            bad("trusted", &e.to_string());
            return None;
        }
    };
    let mut l = ForwardedLayer::new().trusted(trusted);
    if let Some(h) = &cfg.client_header {
        l = match h.to_ascii_lowercase().as_str() {
            "x-forwarded-for" => l.client_header(ClientHeader::XForwardedFor),
            "x-real-ip" => l.client_header(ClientHeader::XRealIp),
            "forwarded" => l.client_header(ClientHeader::Forwarded),
            other => {
                bad("client_header", other);
                return None;
            }
        };
    }
    if let Some(r) = cfg.recursive {
        l = l.recursive(r);
    }
    if let Some(x) = &cfg.x_forwarded_for {
        l = l.x_forwarded_for(match x.as_str() {
            "append" => XffPolicy::Append,
            "replace-untrusted" => XffPolicy::ReplaceUntrusted,
            "resolved-client" => XffPolicy::ResolvedClient,
            "pass" => XffPolicy::Pass,
            "remove" => XffPolicy::Remove,
            other => {
                bad("x_forwarded_for", other);
                return None;
            }
        });
    }
    let policy = |v: &Option<String>| -> Result<Option<HeaderPolicy>, String> {
        match v.as_deref() {
            None => Ok(None),
            Some("set") => Ok(Some(HeaderPolicy::Set)),
            Some("pass") => Ok(Some(HeaderPolicy::Pass)),
            Some("remove") => Ok(Some(HeaderPolicy::Remove)),
            Some(other) => Err(other.to_owned()),
        }
    };
    let fields = [
        ("x_real_ip", &cfg.x_real_ip),
        ("x_forwarded_proto", &cfg.x_forwarded_proto),
        ("x_forwarded_host", &cfg.x_forwarded_host),
        ("x_forwarded_port", &cfg.x_forwarded_port),
        ("forwarded", &cfg.forwarded),
    ];
    for (name, value) in fields {
        match policy(value) {
            Ok(None) => {}
            Ok(Some(p)) => {
                l = match name {
                    "x_real_ip" => l.x_real_ip(p),
                    "x_forwarded_proto" => l.x_forwarded_proto(p),
                    "x_forwarded_host" => l.x_forwarded_host(p),
                    "x_forwarded_port" => l.x_forwarded_port(p),
                    _ => l.forwarded(p),
                }
            }
            Err(v) => {
                bad(name, &v);
                return None;
            }
        }
    }
    Some(l)
}

/// The forwarded-headers layer every proxying location gets when it sets none: nobody
/// trusted, the seeds' `proxy_set_header` lines as defaults.
pub(super) fn default_forwarded() -> ForwardedLayer {
    ForwardedLayer::new()
}

fn status_of(
    src: &Source,
    key: &str,
    code: Option<u16>,
    default: StatusCode,
    errs: &mut Vec<Diagnostic>,
) -> StatusCode {
    match code {
        None => default,
        Some(c) => match StatusCode::from_u16(c) {
            Ok(s) if (400..600).contains(&c) => s,
            _ => {
                errs.push(src.diag(
                    None,
                    key.to_owned(),
                    format!("{c} is not a 4xx or 5xx status"),
                ));
                default
            }
        },
    }
}

/// The `limit_req` lines: local zones as one layer (checked first: a request they
/// reject costs no Redis round trip), then the Redis zones.
fn limit_req(
    ctx: &Ctx<'_, '_>,
    key: &str,
    loc: &schema::Location,
    errs: &mut Vec<Diagnostic>,
) -> (Option<LimitReqLayer>, Option<RedisLayers>) {
    let Some(list) = inherit!(ctx, loc, limit_req) else {
        return (None, None);
    };
    let mut layer: Option<LimitReqLayer> = None;
    let mut shared: Vec<RedisLimit> = Vec::new();
    let k = format!("{key}.limit_req");
    let dry = inherit!(ctx, loc, limit_req_dry_run)
        .copied()
        .unwrap_or(false);
    for l in list {
        let cfg = l.get_ref();
        let Some(zone) = ctx.zones.req.get(&cfg.zone) else {
            if ctx.zones.failed_req.contains(&cfg.zone) {
                continue;
            }
            errs.push(ctx.src.diag(
                Some(l.span()),
                k.clone(),
                format!(
                    "unknown zone {:?} (define it as [limit_req_zone.{}])",
                    cfg.zone, cfg.zone
                ),
            ));
            continue;
        };
        let delay = match (cfg.nodelay, cfg.delay) {
            (true, Some(_)) => {
                errs.push(ctx.src.diag(
                    Some(l.span()),
                    k.clone(),
                    "nodelay and delay exclude each other",
                ));
                continue;
            }
            (true, None) => Delay::Never,
            (false, Some(n)) => Delay::After(n),
            (false, None) => Delay::All,
        };
        match zone {
            AnyReqZone::Local(zone) => {
                let limit = ReqLimit::new(zone.clone()).burst(cfg.burst).delay(delay);
                layer = Some(match layer {
                    None => LimitReqLayer::new(limit),
                    Some(prev) => prev.and(limit),
                });
            }
            AnyReqZone::Redis(zone) => {
                if dry {
                    errs.push(ctx.src.diag(
                        Some(l.span()),
                        k.clone(),
                        format!(
                            "limit_req_dry_run is not available for zone {:?}, which is kept in Redis",
                            cfg.zone
                        ),
                    ));
                    continue;
                }
                shared.push(RedisLimit::new(zone.clone()).burst(cfg.burst).delay(delay));
            }
        }
    }
    let status = status_of(
        ctx.src,
        &format!("{key}.limit_req_status"),
        inherit!(ctx, loc, limit_req_status).copied(),
        StatusCode::SERVICE_UNAVAILABLE,
        errs,
    );
    let redis: Vec<RedisLimitReqLayer> = shared
        .into_iter()
        .map(|l| RedisLimitReqLayer::new(l).status(status))
        .collect();
    let redis = match <[RedisLimitReqLayer; 1]>::try_from(redis) {
        Ok([one]) => Some(Either::Left(one)),
        Err(v) if v.is_empty() => None,
        Err(v) => Some(Either::Right(RedisChain(v))),
    };
    (layer.map(|l| l.status(status).dry_run(dry)), redis)
}

/// The Redis zones of a location: one is a plain layer; more are chained through boxed
/// services (a rare set-up, which pays one box per extra zone and request).
type RedisLayers = Either<RedisLimitReqLayer, RedisChain>;

/// Several Redis zones, the first outermost.
#[derive(Debug, Clone)]
struct RedisChain(Vec<RedisLimitReqLayer>);

impl<S> tower::Layer<S> for RedisChain
where
    S: tower::Service<Request, Response = Response, Error = Infallible>
        + Clone
        + Send
        + Sync
        + 'static,
    S::Future: Send + 'static,
{
    type Service = LocationService;

    fn layer(&self, inner: S) -> LocationService {
        let mut svc = LocationService::new(inner);
        for l in self.0.iter().rev() {
            svc = LocationService::new(tower::Layer::layer(l, svc));
        }
        svc
    }
}

fn limit_conn(
    ctx: &Ctx<'_, '_>,
    key: &str,
    loc: &schema::Location,
    errs: &mut Vec<Diagnostic>,
) -> Option<LimitConnLayer> {
    let list = inherit!(ctx, loc, limit_conn)?;
    let mut layer: Option<LimitConnLayer> = None;
    for l in list {
        let cfg = l.get_ref();
        let k = format!("{key}.limit_conn");
        let Some(zone) = ctx.zones.conn.get(&cfg.zone) else {
            errs.push(ctx.src.diag(
                Some(l.span()),
                k,
                format!(
                    "unknown zone {:?} (define it as [limit_conn_zone.{}])",
                    cfg.zone, cfg.zone
                ),
            ));
            continue;
        };
        let Some(max) = NonZeroU32::new(cfg.max) else {
            errs.push(ctx.src.diag(Some(l.span()), k, "max must be at least 1"));
            continue;
        };
        layer = Some(match layer {
            None => LimitConnLayer::new(zone.clone(), max),
            Some(prev) => prev.and(zone.clone(), max),
        });
    }
    let status = status_of(
        ctx.src,
        &format!("{key}.limit_conn_status"),
        inherit!(ctx, loc, limit_conn_status).copied(),
        StatusCode::SERVICE_UNAVAILABLE,
        errs,
    );
    layer.map(|l| l.status(status))
}

fn access_log(
    ctx: &mut Ctx<'_, '_>,
    key: &str,
    loc: &schema::Location,
    errs: &mut Vec<Diagnostic>,
) -> Option<AccessLogWriter> {
    let cfg = loc.access_log.as_ref().or(ctx.server.access_log.as_ref());
    let Some(cfg) = cfg else {
        return ctx.default_log.clone();
    };
    if let schema::AccessLogCfg::Enabled(true) = cfg.get_ref() {
        return ctx.default_log.clone();
    }
    match ctx.shared.access_log(cfg.get_ref(), &ctx.src.base_dir()) {
        Ok(w) => w,
        Err(e) => {
            errs.push(
                ctx.src
                    .diag(Some(cfg.span()), format!("{key}.access_log"), e),
            );
            None
        }
    }
}

fn return_service(
    src: &Source,
    key: &str,
    r: &Spanned<schema::Return>,
    errs: &mut Vec<Diagnostic>,
) -> Option<Terminal> {
    let (status, url, body) = match r.get_ref() {
        schema::Return::Status(s) => (*s, None, None),
        schema::Return::Full { status, url, body } => (*status, url.as_deref(), body.as_deref()),
    };
    let Some(code) = StatusCode::from_u16(status)
        .ok()
        .filter(|_| (100..=999).contains(&status))
    else {
        errs.push(src.diag(
            Some(r.span()),
            key.to_owned(),
            format!("{status} is not an HTTP status"),
        ));
        return None;
    };
    if status == 444 {
        return Some(ret(Return::close()));
    }
    if let Some(url) = url {
        if !code.is_redirection() {
            errs.push(src.diag(Some(r.span()), key.to_owned(), "url needs a 3xx status"));
            return None;
        }
        return match redirect(code, url) {
            Some(r) => Some(redirect_to(r)),
            None => {
                errs.push(src.diag(Some(r.span()), key.to_owned(), format!("unsupported redirect url {url:?}: use SCHEME://$host$request_uri or SCHEME://HOST$request_uri")));
                None
            }
        };
    }
    let r = match body {
        Some(b) => Return::new(code).body(b.to_owned()),
        None => Return::new(code),
    };
    Some(ret(r))
}

/// `https://$host$request_uri`, `$scheme://NAME$request_uri`, `https://NAME:8443$request_uri`.
fn redirect(code: StatusCode, url: &str) -> Option<Redirect> {
    let (scheme, rest) = url.split_once("://")?;
    let host = rest.strip_suffix("$request_uri")?;
    let mut r = Redirect::new(code);
    match scheme {
        "$scheme" => {}
        "http" | "https" => r = r.scheme(scheme),
        _ => return None,
    }
    match host {
        "$host" | "$http_host" => {}
        // $server_name: the request's host is the server's name once routed here.
        "$server_name" => {}
        h if h.contains('$') || h.contains('/') || h.is_empty() => return None,
        h => match h.rsplit_once(':') {
            Some((name, port)) if !h.ends_with(']') => {
                let port: u16 = port.parse().ok()?;
                r = r.host(name.to_owned()).port(port);
            }
            _ => r = r.host(h.to_owned()),
        },
    }
    Some(r)
}

fn response_headers(
    src: &Source,
    key: &str,
    list: &[Spanned<AddHeader>],
    errs: &mut Vec<Diagnostic>,
) -> Option<ResponseHeaders> {
    if list.is_empty() {
        return None;
    }
    let mut headers = ResponseHeaders::new();
    for h in list {
        let cfg = h.get_ref();
        let (Ok(name), Ok(value)) = (
            HeaderName::from_bytes(cfg.name.as_bytes()),
            HeaderValue::from_str(&cfg.value),
        ) else {
            errs.push(src.diag(
                Some(h.span()),
                format!("{key}.add_header"),
                format!("invalid header {:?}: {:?}", cfg.name, cfg.value),
            ));
            continue;
        };
        headers = match (cfg.replace, cfg.always) {
            (false, false) => headers.add(name, value),
            (false, true) => headers.add_always(name, value),
            (true, false) => headers.set(name, value),
            (true, true) => headers.set_always(name, value),
        };
    }
    Some(headers)
}

fn error_pages(
    ctx: &Ctx<'_, '_>,
    key: &str,
    list: &[Spanned<ErrorPageCfg>],
    errs: &mut Vec<Diagnostic>,
) -> Option<ErrorPages> {
    if list.is_empty() {
        return None;
    }
    let src = ctx.src;
    let mut pages = ErrorPages::new();
    for p in list {
        let cfg = p.get_ref();
        let k = format!("{key}.error_page");
        let file = match (&cfg.uri, &cfg.file) {
            (Some(uri), None) => match file_for_uri(ctx, uri) {
                Some(f) => f,
                None => {
                    errs.push(src.diag(
                        Some(p.span()),
                        k,
                        format!("no root or alias location of this server serves {uri:?}"),
                    ));
                    continue;
                }
            },
            (None, Some(file)) => resolve(src, file),
            _ => {
                errs.push(src.diag(
                    Some(p.span()),
                    k,
                    "error_page needs exactly one of uri or file",
                ));
                continue;
            }
        };
        let page = match Page::from_file(&file) {
            Ok(page) => page,
            Err(e) => {
                errs.push(src.diag(Some(p.span()), k, format!("{}: {e}", file.display())));
                continue;
            }
        };
        let page = match cfg.status.map(StatusCode::from_u16) {
            None => page,
            Some(Ok(s)) => page.with_status(s),
            Some(Err(_)) => {
                errs.push(src.diag(Some(p.span()), k, "status is not an HTTP status"));
                continue;
            }
        };
        match pages.page(cfg.codes.iter().copied(), page) {
            Ok(next) => pages = next.intercept_upstream(cfg.intercept_upstream),
            Err(e) => {
                errs.push(src.diag(Some(p.span()), k, e.to_string()));
                return None;
            }
        }
    }
    Some(pages)
}

/// The file a `root`/`alias` location of the server serves for `uri`, as nginx resolves
/// `error_page 502 /maintenance.html` through `location = /maintenance.html { root ...; }`.
fn file_for_uri(ctx: &Ctx<'_, '_>, uri: &str) -> Option<PathBuf> {
    let patterns: Vec<Pattern> = ctx
        .server
        .location
        .iter()
        .map(|l| Pattern::parse(l.path.get_ref()).unwrap_or(Pattern::Exact(String::new())))
        .collect();
    let i = Locations::new(&patterns).ok()?.find(uri)?;
    let loc = ctx.server.location.get(i)?;
    let rel = uri.trim_start_matches('/');
    if let Some(root) = &loc.root {
        return Some(resolve(ctx.src, root.get_ref()).join(rel));
    }
    let alias = loc.alias.as_ref()?;
    let prefix = match patterns.get(i)? {
        Pattern::Prefix(p) | Pattern::PrefixNoRegex(p) | Pattern::Exact(p) => p.as_str(),
        _ => return None,
    };
    let rest = uri.strip_prefix(prefix)?.trim_start_matches('/');
    Some(resolve(ctx.src, alias.get_ref()).join(rest))
}

fn access_rules(
    src: &Source,
    key: &str,
    list: &[Spanned<AccessRule>],
    errs: &mut Vec<Diagnostic>,
) -> Option<AccessRules> {
    if list.is_empty() {
        return None;
    }
    let mut b = AccessRules::builder();
    for r in list {
        let k = format!("{key}.access");
        let (allow, what) = match (&r.get_ref().allow, &r.get_ref().deny) {
            (Some(a), None) => (true, a),
            (None, Some(d)) => (false, d),
            _ => {
                errs.push(src.diag(
                    Some(r.span()),
                    k,
                    "each rule is { allow = \"...\" } or { deny = \"...\" }",
                ));
                continue;
            }
        };
        if what == "all" {
            b = if allow { b.allow_all() } else { b.deny_all() };
            continue;
        }
        let net = what
            .parse::<IpNet>()
            .or_else(|_| what.parse::<std::net::IpAddr>().map(IpNet::from));
        match net {
            Ok(net) => b = if allow { b.allow(net) } else { b.deny(net) },
            Err(_) => errs.push(src.diag(
                Some(r.span()),
                k,
                format!("{what:?}: expected \"all\", an address or a CIDR"),
            )),
        }
    }
    Some(b.build())
}
