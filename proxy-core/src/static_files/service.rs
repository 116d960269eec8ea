//! [`StaticFiles`] and its [`Builder`].

use std::convert::Infallible;
use std::io;
use std::num::NonZeroUsize;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use arc_swap::ArcSwapOption;
use http::{HeaderValue, StatusCode, Uri};
use tower_http::services::fs::{DefaultServeDirFallback, ServeDir};

use super::backend::Confined;
use super::future::ResponseFuture;
use super::path::check_path;
use crate::body::Request;
use crate::response;

/// nginx's `expires max`: ten years. Longer values are refused by [`Builder::build`].
pub const MAX_EXPIRES: Duration = Duration::from_secs(315_360_000);

/// Default read size per body chunk: 64 KiB, so a file of any size streams with one chunk
/// in flight per connection (hyper writes it before the next is read).
const DEFAULT_CHUNK: usize = 64 * 1024;

/// Serves the files under one directory, as an nginx location with `root` or `alias` does.
/// A terminal service: it never calls another one. See the [module docs](super) for the
/// behaviour and an example.
#[derive(Clone, Debug)]
pub struct StaticFiles {
    serve: ServeDir<DefaultServeDirFallback, Confined>,
    shared: Arc<Shared>,
}

/// What every clone and every request share.
#[derive(Debug)]
pub(crate) struct Shared {
    /// `alias` mode: the location prefix replaced by the directory.
    prefix: Option<Box<str>>,
    /// An index file name other than `index.html` (which ServeDir handles itself).
    custom_index: Option<Box<str>>,
    /// The whole `Cache-Control` value: `max-age=N` from `expires`, then the extra value.
    pub(crate) cache_control: Option<HeaderValue>,
    pub(crate) expires: Option<ExpiresClock>,
    pub(crate) access_log: bool,
}

/// Builds a [`StaticFiles`]; made by [`StaticFiles::root`] or [`StaticFiles::alias`].
#[derive(Debug, Clone)]
#[must_use]
pub struct Builder {
    dir: PathBuf,
    prefix: Option<String>,
    index: Option<String>,
    expires: Option<Duration>,
    cache_control: Option<HeaderValue>,
    gzip: bool,
    br: bool,
    access_log: bool,
    allow_symlinks_outside: bool,
    chunk: usize,
}

impl StaticFiles {
    /// nginx `root DIR`: the request path is appended to `dir`
    /// (`/static/app.css` → `DIR/static/app.css`).
    pub fn root(dir: impl Into<PathBuf>) -> Builder {
        Builder::new(dir.into(), None)
    }

    /// nginx `location PREFIX { alias DIR; }`: the location prefix is replaced by `dir`
    /// (`/static/app.css` with prefix `/static/` → `DIR/app.css`). Requests whose path does
    /// not start with `prefix` get 404. When `prefix` does not end with `/`, the rest of
    /// the path must be empty or start with `/` (so `/static../x` never maps to `DIR/../x`,
    /// nginx's classic alias mistake).
    pub fn alias(prefix: impl Into<String>, dir: impl Into<PathBuf>) -> Builder {
        Builder::new(dir.into(), Some(prefix.into()))
    }
}

impl Builder {
    fn new(dir: PathBuf, prefix: Option<String>) -> Self {
        Builder {
            dir,
            prefix,
            index: Some("index.html".to_owned()),
            expires: None,
            cache_control: None,
            gzip: false,
            br: false,
            access_log: true,
            allow_symlinks_outside: false,
            chunk: DEFAULT_CHUNK,
        }
    }

    /// nginx `index NAME`: the file served for a path ending in `/`. Default `index.html`;
    /// `None` disables it (a directory path is then 404). A path naming a directory
    /// without the trailing `/` is redirected to it (301, as nginx) while an index is set.
    pub fn index(mut self, name: Option<&str>) -> Self {
        self.index = name.map(str::to_owned);
        self
    }

    /// nginx `expires TIME`: `Expires` (now + `after`) and `Cache-Control: max-age=SECS` on
    /// 200, 204, 206, 301, 302, 304, 307 and 308 answers. At most [`MAX_EXPIRES`].
    pub fn expires(mut self, after: Duration) -> Self {
        self.expires = Some(after);
        self
    }

    /// Extra `Cache-Control` directives, e.g. `public, immutable` (the seed's
    /// `add_header Cache-Control "public, immutable"`). Joined with `expires`'s `max-age`
    /// into one header (nginx would send two header lines; caches read them as one list).
    pub fn cache_control(mut self, value: HeaderValue) -> Self {
        self.cache_control = Some(value);
        self
    }

    /// nginx `gzip_static on`: serve `FILE.gz` with `Content-Encoding: gzip` when it exists
    /// and the client accepts gzip. Default off.
    pub fn precompressed_gzip(mut self, on: bool) -> Self {
        self.gzip = on;
        self
    }

    /// Serve `FILE.br` with `Content-Encoding: br` when it exists and the client accepts
    /// brotli (nginx needs the brotli module for this). Default off.
    pub fn precompressed_br(mut self, on: bool) -> Self {
        self.br = on;
        self
    }

    /// nginx `access_log off`: responses carry a [`SkipAccessLog`](super::SkipAccessLog)
    /// extension that the access log honours. Default on.
    pub fn access_log(mut self, on: bool) -> Self {
        self.access_log = on;
        self
    }

    /// Follow symbolic links that resolve outside the directory (nginx's default,
    /// `disable_symlinks off`). By default such links are refused with 403, and links
    /// inside the directory work.
    pub fn danger_allow_symlinks_outside_root(mut self, allow: bool) -> Self {
        self.allow_symlinks_outside = allow;
        self
    }

    /// Bytes read from disk per body chunk (default 64 KiB). Memory per streaming
    /// response stays about one chunk.
    pub fn chunk_size(mut self, size: NonZeroUsize) -> Self {
        self.chunk = size.get();
        self
    }

    /// Checks the settings and resolves the directory. Fails (`InvalidInput`) on a prefix
    /// not starting with `/`, an index name with `/` or `\` or that is `.`/`..`/empty, an
    /// `expires` over [`MAX_EXPIRES`]; and with the file system's error if the directory
    /// cannot be resolved.
    pub fn build(self) -> io::Result<StaticFiles> {
        let invalid = |msg: &str| io::Error::new(io::ErrorKind::InvalidInput, msg.to_owned());
        if let Some(p) = &self.prefix {
            if !p.starts_with('/') {
                return Err(invalid("alias location prefix must start with '/'"));
            }
        }
        if let Some(name) = &self.index {
            if name.is_empty()
                || name == "."
                || name == ".."
                || name.contains(['/', '\\', '\0', '?', '#', '%'])
            {
                return Err(invalid("index must be a plain file name"));
            }
        }
        let expires = match self.expires {
            Some(d) if d > MAX_EXPIRES => return Err(invalid("expires is longer than ten years")),
            other => other,
        };
        let root: Arc<Path> = std::fs::canonicalize(&self.dir)?.into();
        if !std::fs::metadata(&root)?.is_dir() {
            return Err(invalid("static root is not a directory"));
        }

        let cache_control = match (expires, &self.cache_control) {
            (None, None) => None,
            (Some(d), None) => Some(HeaderValue::from(MaxAge(d))),
            (None, Some(v)) => Some(v.clone()),
            (Some(d), Some(v)) => {
                let mut s = MaxAge(d).to_string();
                s.push_str(", ");
                let extra = v
                    .to_str()
                    .map_err(|_| invalid("cache_control must be visible ASCII"))?;
                s.push_str(extra);
                Some(HeaderValue::from_str(&s).map_err(|_| invalid("bad cache_control"))?)
            }
        };

        // `index.html` is ServeDir's own index; any other name is rewritten in `call`.
        let builtin_index = self.index.as_deref() == Some("index.html");
        let custom_index = match &self.index {
            Some(name) if !builtin_index => Some(name.clone().into_boxed_str()),
            _ => None,
        };

        let backend = Confined::new(root.clone(), !self.allow_symlinks_outside);
        let mut serve = ServeDir::with_backend(&*root, backend)
            .append_index_html_on_directories(self.index.is_some())
            .with_buf_chunk_size(self.chunk);
        if let Some(p) = &self.prefix {
            serve = serve.redirect_path_prefix(p.trim_end_matches('/'));
        }
        if self.gzip {
            serve = serve.precompressed_gzip();
        }
        if self.br {
            serve = serve.precompressed_br();
        }

        Ok(StaticFiles {
            serve,
            shared: Arc::new(Shared {
                prefix: self.prefix.map(String::into_boxed_str),
                custom_index,
                cache_control,
                expires: expires.map(ExpiresClock::new),
                access_log: self.access_log,
            }),
        })
    }
}

struct MaxAge(Duration);

impl std::fmt::Display for MaxAge {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "max-age={}", self.0.as_secs())
    }
}

impl From<MaxAge> for HeaderValue {
    fn from(m: MaxAge) -> Self {
        // Digits and ASCII only: always a valid header value.
        HeaderValue::from_str(&m.to_string()).unwrap_or(HeaderValue::from_static("max-age=0"))
    }
}

/// `Expires` values, formatted at most once per second and shared by every request
/// (a lock-free swap; no allocation on the hot path within a second).
#[derive(Debug)]
pub(crate) struct ExpiresClock {
    after: Duration,
    cached: ArcSwapOption<(u64, HeaderValue)>,
}

impl ExpiresClock {
    fn new(after: Duration) -> Self {
        ExpiresClock {
            after,
            cached: ArcSwapOption::empty(),
        }
    }

    /// `Expires` for a response sent now, `None` if the clock is absurd.
    pub(crate) fn value(&self) -> Option<HeaderValue> {
        let now = SystemTime::now().duration_since(UNIX_EPOCH).ok()?.as_secs();
        if let Some(c) = &*self.cached.load() {
            if c.0 == now {
                return Some(c.1.clone());
            }
        }
        let at = now.checked_add(self.after.as_secs())?;
        // httpdate panics past year 9999; any sane clock plus ten years is far below.
        if at >= 253_402_300_799 {
            return None;
        }
        let date = UNIX_EPOCH.checked_add(Duration::from_secs(at))?;
        let v = HeaderValue::from_str(&httpdate::fmt_http_date(date)).ok()?;
        self.cached.store(Some(Arc::new((now, v.clone()))));
        Some(v)
    }
}

impl tower_service::Service<Request> for StaticFiles {
    type Response = crate::body::Response;
    type Error = Infallible;
    type Future = ResponseFuture;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, mut req: Request) -> ResponseFuture {
        let shared = self.shared.clone();
        let path = req.uri().path();
        // alias: the part after the location prefix, as a path of its own.
        let rest = match &shared.prefix {
            None => path,
            Some(prefix) => match path.strip_prefix(&**prefix) {
                Some(rest) if prefix.ends_with('/') || rest.is_empty() || rest.starts_with('/') => {
                    rest
                }
                _ => return early(&shared, StatusCode::NOT_FOUND),
            },
        };
        let rest_is_rooted = rest.starts_with('/');
        let check = if rest.is_empty() {
            Ok(())
        } else if rest_is_rooted {
            check_path(rest)
        } else {
            // `rest` follows a prefix ending in '/': check it with that '/' in front, a
            // slice of the same string (fails closed if the slice is somehow not there).
            let with_slash = path
                .len()
                .checked_sub(rest.len() + 1)
                .and_then(|i| path.get(i..))
                .unwrap_or("");
            check_path(with_slash)
        };
        if let Err(e) = check {
            tracing::debug!(path = %path, error = %e, "static path refused");
            return early(&shared, StatusCode::BAD_REQUEST);
        }

        let index = match &shared.custom_index {
            Some(name) if rest.is_empty() || rest.ends_with('/') => Some(&**name),
            _ => None,
        };
        if shared.prefix.is_some() || index.is_some() {
            match rewrite(rest, rest_is_rooted, index, req.uri()) {
                Some(uri) => *req.uri_mut() = uri,
                None => return early(&shared, StatusCode::BAD_REQUEST),
            }
        }
        // Several ranges would need a multipart/byteranges answer; the file is sent whole
        // instead (a server may ignore Range, RFC 9110 §14.2), rather than refused.
        let multi_range = req
            .headers()
            .get(http::header::RANGE)
            .is_some_and(|v| v.as_bytes().contains(&b','));
        if multi_range {
            req.headers_mut().remove(http::header::RANGE);
        }
        ResponseFuture::serving(self.serve.try_call(req), shared)
    }
}

/// An answer decided before touching the file system.
fn early(shared: &Shared, status: StatusCode) -> ResponseFuture {
    let mut resp = response::status(status);
    if !shared.access_log {
        resp.extensions_mut().insert(super::SkipAccessLog);
    }
    ResponseFuture::ready(resp)
}

/// The URI ServeDir sees: `/` + the path below the directory (+ index name), query kept.
fn rewrite(rest: &str, rooted: bool, index: Option<&str>, uri: &Uri) -> Option<Uri> {
    let query = uri.query();
    let mut s = String::with_capacity(
        1 + rest.len() + index.map_or(0, str::len) + query.map_or(0, |q| q.len() + 1),
    );
    if !rooted {
        s.push('/');
    }
    s.push_str(rest);
    if let Some(name) = index {
        if !s.ends_with('/') {
            s.push('/');
        }
        s.push_str(name);
    }
    if let Some(q) = query {
        s.push('?');
        s.push_str(q);
    }
    Uri::try_from(s).ok()
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)] // tests may unwrap
mod tests {
    use super::*;

    #[test]
    fn rewrite_keeps_query_and_adds_index() {
        let uri: Uri = "/static/a/?v=1".parse().unwrap();
        assert_eq!(
            rewrite("a/", false, Some("default.htm"), &uri).unwrap(),
            "/a/default.htm?v=1"
        );
        let uri: Uri = "/static".parse().unwrap();
        assert_eq!(rewrite("", false, None, &uri).unwrap(), "/");
        assert_eq!(rewrite("/x", true, None, &uri).unwrap(), "/x");
    }

    #[test]
    fn builder_refuses_bad_settings() {
        let dir = tempfile::tempdir().unwrap();
        let bad = [
            StaticFiles::alias("static/", dir.path()),
            StaticFiles::root(dir.path()).index(Some("../x")),
            StaticFiles::root(dir.path()).index(Some("")),
            StaticFiles::root(dir.path()).expires(MAX_EXPIRES + Duration::from_secs(1)),
        ];
        for b in bad {
            assert_eq!(b.build().unwrap_err().kind(), io::ErrorKind::InvalidInput);
        }
        assert!(StaticFiles::root(dir.path().join("missing"))
            .build()
            .is_err());
    }

    #[test]
    fn cache_control_joins_expires_and_extra() {
        let dir = tempfile::tempdir().unwrap();
        let s = StaticFiles::root(dir.path())
            .expires(Duration::from_secs(30 * 86400))
            .cache_control(HeaderValue::from_static("public, immutable"))
            .build()
            .unwrap();
        assert_eq!(
            s.shared.cache_control.as_ref().unwrap(),
            "max-age=2592000, public, immutable"
        );
    }

    #[test]
    fn expires_is_cached_within_a_second() {
        let c = ExpiresClock::new(Duration::from_secs(60));
        let a = c.value().unwrap();
        let parsed = httpdate::parse_http_date(a.to_str().unwrap()).unwrap();
        let delta = parsed.duration_since(SystemTime::now()).unwrap();
        assert!(delta > Duration::from_secs(55) && delta <= Duration::from_secs(60));
        assert!(c.cached.load().is_some());
    }
}
