//! One `[[server.location]]`: its terminal service (proxy, return, files) and the layers
//! around it, outermost first:
//!
//! ```text
//! AddHeaders → ErrorPage → Access (allow/deny) → terminal
//! ```
//!
//! Response headers sit outside error pages so an error page gets `add_header ... always`
//! too; allow/deny sits inside so a denied request can get an error page.

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
use proxy_core::upstream::{ClientConfig, Forward, UpstreamClient, UpstreamTimeouts};
use toml::Spanned;
use tower::ServiceBuilder;

use super::build::Group;
use super::schema::{self, AccessRule, AddHeader, ErrorPageCfg, IndexCfg};
use super::{Diagnostic, Source};

/// What a location needs from around it.
pub(super) struct Ctx<'a> {
    pub(super) src: &'a Source,
    pub(super) server: &'a schema::Server,
    pub(super) read_timeout: Option<Duration>,
    pub(super) groups: &'a std::collections::HashMap<String, Group>,
}

/// Build one location, or push why it cannot be built.
pub(super) fn build(
    ctx: &Ctx<'_>,
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
    if errs.len() > before {
        return None;
    }
    let terminal = terminal?;
    let svc = ServiceBuilder::new()
        .option_layer(headers.map(AddHeadersLayer::new))
        .option_layer(pages.map(ErrorPageLayer::new))
        .option_layer(access.map(AccessLayer::new))
        .service(terminal);
    let location = Location::new(pattern, svc);
    Some(
        location
            .internal(loc.internal)
            .allow_connect(loc.allow_connect),
    )
}

/// The service at the bottom of the stack: exactly one of proxy_pass, return, root, alias.
fn terminal(
    ctx: &Ctx<'_>,
    key: &str,
    pattern: &Pattern,
    loc: &schema::Location,
    errs: &mut Vec<Diagnostic>,
) -> Option<LocationService> {
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
        let read = loc
            .proxy_read_timeout
            .map(|d| d.0)
            .or(ctx.read_timeout)
            .unwrap_or(Duration::from_secs(60));
        let forward = proxy_pass(ctx, &format!("{key}.proxy_pass"), pass, loc, errs)?;
        let forward = forward.with_timeouts(UpstreamTimeouts {
            read_timeout: read,
            idle_timeout: read,
        });
        return Some(LocationService::new(forward));
    }
    if let Some(r) = &loc.return_ {
        return return_service(src, &format!("{key}.return"), r, errs);
    }
    static_files(src, key, pattern, loc, errs).map(LocationService::new)
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
    let mut b = builder
        .access_log(loc.access_log.unwrap_or(true))
        .danger_allow_symlinks_outside_root(loc.allow_symlinks_outside_root);
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

fn proxy_pass(
    ctx: &Ctx<'_>,
    key: &str,
    pass: &Spanned<String>,
    loc: &schema::Location,
    errs: &mut Vec<Diagnostic>,
) -> Option<Forward> {
    let src = ctx.src;
    let target = pass.get_ref();
    let mut cc = ClientConfig::default();
    if let Some(up) = &loc.proxy_upgrade {
        cc.upgrades = up.clone();
    }
    if let Some(rest) = target.strip_prefix("http://") {
        let addr = rest.trim_end_matches('/');
        return match addr.parse::<std::net::SocketAddr>() {
            Ok(a) => Some(Forward::new(UpstreamClient::new(cc), a)),
            Err(_) => {
                errs.push(src.diag(
                    Some(pass.span()),
                    key.to_owned(),
                    format!("{target:?}: expected http://IP:PORT or an upstream name"),
                ));
                None
            }
        };
    }
    match ctx.groups.get(target) {
        Some(g) => {
            let addr = *g.addrs.first()?;
            let client = if loc.proxy_upgrade.is_some() {
                UpstreamClient::new(cc)
            } else {
                g.client.clone()
            };
            Some(Forward::new(client, addr))
        }
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

fn return_service(
    src: &Source,
    key: &str,
    r: &Spanned<schema::Return>,
    errs: &mut Vec<Diagnostic>,
) -> Option<LocationService> {
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
        return Some(LocationService::new(Return::close()));
    }
    if let Some(url) = url {
        if !code.is_redirection() {
            errs.push(src.diag(Some(r.span()), key.to_owned(), "url needs a 3xx status"));
            return None;
        }
        return match redirect(code, url) {
            Some(r) => Some(LocationService::new(r)),
            None => {
                errs.push(src.diag(Some(r.span()), key.to_owned(), format!("unsupported redirect url {url:?}: use SCHEME://$host$request_uri or SCHEME://HOST$request_uri")));
                None
            }
        };
    }
    let ret = match body {
        Some(b) => Return::new(code).body(b.to_owned()),
        None => Return::new(code),
    };
    Some(LocationService::new(ret))
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
    ctx: &Ctx<'_>,
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
fn file_for_uri(ctx: &Ctx<'_>, uri: &str) -> Option<PathBuf> {
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
