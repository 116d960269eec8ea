//! The router: virtual servers chosen by `Host`, locations chosen by path with nginx's
//! precedence, each location a tower service.
//!
//! ```
//! use proxy_core::router::{Location, Pattern, Return, Router, ServerName, VirtualServer};
//! use http::StatusCode;
//! use tower::ServiceExt;
//! # tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(async {
//! let router = Router::builder()
//!     .server(
//!         VirtualServer::new([ServerName::parse("api.example.com").unwrap()])
//!             .location(Location::new(Pattern::parse("/").unwrap(), Return::new(StatusCode::OK)))
//!             .location(Location::new(Pattern::parse("~* /(wp-login|xmlrpc)").unwrap(), Return::close())),
//!     )
//!     .build()
//!     .unwrap();
//! let req = http::Request::builder().uri("/wp-login.php").header("host", "api.example.com")
//!     .body(Default::default()).unwrap();
//! let resp = router.oneshot(req).await.unwrap();
//! assert!(resp.extensions().get::<proxy_core::response::CloseConnection>().is_some());
//! # });
//! ```

mod actions;
mod fuzz;
mod host;
mod location;
mod path;
mod service;

use std::borrow::Cow;
use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::Arc;
use std::task::{Context, Poll};

use http::header::{HeaderValue, HOST};
use http::{Method, StatusCode, Version};

pub use actions::{Redirect, Return};
#[doc(hidden)]
pub use fuzz::fuzz_route;
use host::host_of_cow;
pub use host::{host_of, ServerName};
pub use location::{Locations, Pattern};
use path::normalize_path_cow;
pub use path::{normalize_path, PathError};
use service::{BoxFuture, Call};
pub use service::{LocationFuture, LocationService};

use crate::body::{Request, Response};
use crate::client_info::ClientInfo;
use crate::response;

/// One `location` block: a pattern and the service that handles what it matches.
#[derive(Clone)]
pub struct Location {
    pattern: Pattern,
    /// Erased once here; a [`LocationService`] given to `new` is not boxed again.
    service: Arc<dyn Call>,
    internal: bool,
    allow_connect: bool,
}

impl std::fmt::Debug for Location {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Location")
            .field("pattern", &self.pattern)
            .field("internal", &self.internal)
            .finish()
    }
}

impl Location {
    /// A location handled by `service` (any service, or a [`LocationService`]).
    pub fn new<S>(pattern: Pattern, service: S) -> Self
    where
        S: tower_service::Service<Request, Response = Response, Error = Infallible>
            + Clone
            + Send
            + Sync
            + 'static,
        S::Future: Send + 'static,
    {
        Location {
            pattern,
            service: service::erase(service),
            internal: false,
            allow_connect: false,
        }
    }

    /// nginx's `internal`: clients cannot request this location directly (404); error
    /// pages and other internal uses still reach it.
    pub fn internal(mut self, on: bool) -> Self {
        self.internal = on;
        self
    }

    /// Let CONNECT requests reach this location (refused with 405 otherwise).
    pub fn allow_connect(mut self, on: bool) -> Self {
        self.allow_connect = on;
        self
    }

    /// The location's pattern.
    pub fn pattern(&self) -> &Pattern {
        &self.pattern
    }
}

/// Which server and location handled a request; inserted into its extensions for logs
/// and metrics.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    /// The virtual server's first name (`_` for none).
    pub server: Arc<str>,
    /// The location's pattern as configured.
    pub location: Arc<str>,
}

/// A `server` block: its names and locations.
#[derive(Debug, Clone)]
pub struct VirtualServer {
    names: Vec<ServerName>,
    locations: Vec<Location>,
    default: bool,
}

impl VirtualServer {
    /// A server answering to `names` (may be empty: then only as the default).
    pub fn new(names: impl IntoIterator<Item = ServerName>) -> Self {
        VirtualServer {
            names: names.into_iter().collect(),
            locations: Vec::new(),
            default: false,
        }
    }

    /// Add a location. Order matters only among regex locations.
    pub fn location(mut self, location: Location) -> Self {
        self.locations.push(location);
        self
    }

    /// Make this the default server (nginx's `listen ... default_server`), used when no
    /// name matches. Without one, the first server is the default.
    pub fn default_server(mut self, on: bool) -> Self {
        self.default = on;
        self
    }
}

/// Why a router could not be built.
#[derive(Debug)]
#[non_exhaustive]
pub enum RouterError {
    /// A regex location did not compile.
    Regex(regex::Error),
    /// No server was added.
    NoServers,
}

impl std::fmt::Display for RouterError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RouterError::Regex(e) => write!(f, "invalid location regex: {e}"),
            RouterError::NoServers => f.write_str("no servers configured"),
        }
    }
}

impl std::error::Error for RouterError {}

/// Builds a [`Router`].
#[derive(Debug)]
pub struct RouterBuilder {
    servers: Vec<VirtualServer>,
    route_info: bool,
}

impl Default for RouterBuilder {
    fn default() -> Self {
        RouterBuilder {
            servers: Vec::new(),
            route_info: true,
        }
    }
}

impl RouterBuilder {
    /// Add a virtual server.
    pub fn server(mut self, server: VirtualServer) -> Self {
        self.servers.push(server);
        self
    }

    /// Whether each routed request carries its [`Route`] (an `Arc<Route>` request
    /// extension), which only access logs and metrics read. Default on; a router whose
    /// locations have neither can turn it off and save an extension insert (and its
    /// allocation) per request.
    pub fn route_info(mut self, on: bool) -> Self {
        self.route_info = on;
        self
    }

    /// Compile the router.
    pub fn build(self) -> Result<Router, RouterError> {
        if self.servers.is_empty() {
            return Err(RouterError::NoServers);
        }
        let default = self.servers.iter().position(|s| s.default).unwrap_or(0);
        let mut exact = HashMap::new();
        let mut compiled = Vec::with_capacity(self.servers.len());
        for (i, s) in self.servers.into_iter().enumerate() {
            for n in &s.names {
                if let ServerName::Exact(name) = n {
                    exact.entry(name.clone()).or_insert(i);
                }
            }
            let patterns: Vec<Pattern> = s.locations.iter().map(|l| l.pattern.clone()).collect();
            let matcher = Locations::new(&patterns).map_err(RouterError::Regex)?;
            let first_name: Arc<str> = match s.names.first() {
                Some(ServerName::Exact(n)) => Arc::from(n.as_str()),
                _ => Arc::from("_"),
            };
            let host_value = match s.names.first() {
                Some(ServerName::Exact(n)) => HeaderValue::from_str(n).ok(),
                _ => None,
            };
            let routes = s
                .locations
                .iter()
                .map(|l| {
                    Arc::new(Route {
                        server: first_name.clone(),
                        location: Arc::from(pattern_text(&l.pattern).as_str()),
                    })
                })
                .collect();
            compiled.push(CompiledServer {
                names: s.names,
                matcher,
                locations: s.locations,
                routes,
                host_value,
            });
        }
        Ok(Router {
            inner: Arc::new(Inner {
                servers: compiled,
                exact,
                default,
                route_info: self.route_info,
            }),
        })
    }
}

fn pattern_text(p: &Pattern) -> String {
    match p {
        Pattern::Exact(s) => format!("= {s}"),
        Pattern::Prefix(s) => s.clone(),
        Pattern::PrefixNoRegex(s) => format!("^~ {s}"),
        Pattern::Regex(s) => format!("~ {s}"),
        Pattern::RegexCaseless(s) => format!("~* {s}"),
    }
}

#[derive(Debug)]
struct CompiledServer {
    names: Vec<ServerName>,
    matcher: Locations,
    locations: Vec<Location>,
    routes: Vec<Arc<Route>>,
    /// `Host` given to HTTP/1.0 requests that sent none.
    host_value: Option<HeaderValue>,
}

#[derive(Debug)]
struct Inner {
    servers: Vec<CompiledServer>,
    exact: HashMap<String, usize>,
    default: usize,
    /// Whether routed requests get their `Arc<Route>` extension.
    route_info: bool,
}

/// The routing service. Cheap to clone; clones share the compiled tables.
#[derive(Debug, Clone)]
pub struct Router {
    inner: Arc<Inner>,
}

/// The future of a routed request: the location's (one box), or the router's own answer.
pub type RouteFuture = futures_like::Either<BoxFuture>;

mod futures_like {
    //! A two-way future: the location's, or an immediate response.
    use std::future::Future;
    use std::pin::Pin;
    use std::task::{Context, Poll};

    use pin_project_lite::pin_project;

    use crate::body::Response;

    pin_project! {
        /// Either a location's future or a ready response.
        #[project = EitherProj]
        #[derive(Debug)]
        pub enum Either<F> {
            /// The location's future.
            Call { #[pin] fut: F },
            /// An answer the router gave itself.
            Ready { resp: Option<Response> },
        }
    }

    impl<F, E> Future for Either<F>
    where
        F: Future<Output = Result<Response, E>>,
    {
        type Output = Result<Response, E>;

        fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
            match self.project() {
                EitherProj::Call { fut } => fut.poll(cx),
                EitherProj::Ready { resp } => match resp.take() {
                    Some(r) => Poll::Ready(Ok(r)),
                    None => Poll::Pending,
                },
            }
        }
    }
}

impl Router {
    /// Start building a router.
    pub fn builder() -> RouterBuilder {
        RouterBuilder::default()
    }

    fn server_for(&self, host: Option<&str>) -> usize {
        let Some(host) = host else {
            return self.inner.default;
        };
        // One server (the usual deployment) takes every request: skip hashing the name.
        if self.inner.servers.len() == 1 {
            return 0;
        }
        if let Some(&i) = self.inner.exact.get(host) {
            return i;
        }
        // Wildcards: nginx prefers the longest leading wildcard, then trailing ones.
        let mut best: Option<(usize, usize)> = None;
        for (i, s) in self.inner.servers.iter().enumerate() {
            for n in &s.names {
                if let ServerName::LeadingWildcard(suffix) = n {
                    if n.matches(host) && best.is_none_or(|(len, _)| suffix.len() > len) {
                        best = Some((suffix.len(), i));
                    }
                }
            }
        }
        if let Some((_, i)) = best {
            return i;
        }
        for (i, s) in self.inner.servers.iter().enumerate() {
            for n in &s.names {
                if let ServerName::TrailingWildcard(prefix) = n {
                    if n.matches(host) && best.is_none_or(|(len, _)| prefix.len() > len) {
                        best = Some((prefix.len(), i));
                    }
                }
            }
        }
        best.map_or(self.inner.default, |(_, i)| i)
    }

    fn route(&self, req: &mut Request) -> Result<(&Arc<dyn Call>, &Arc<Route>), Refusal> {
        let bad = || Refusal::BadRequest;
        // RFC 9112 §3.2: more than one Host is a 400. Routing on one line while the
        // upstream reads another would be virtual-host confusion.
        let mut hosts = req.headers().get_all(HOST).iter();
        if hosts.next().is_some() && hosts.next().is_some() {
            return Err(bad());
        }
        // The authority of an absolute-form target (or HTTP/2 :authority) wins over Host.
        let host_text: Option<Cow<'_, str>> = match req.uri().authority() {
            Some(a) => Some(host_of_cow(a.as_str()).ok_or_else(bad)?),
            None => match req.headers().get(HOST) {
                Some(v) => Some(host_of_cow(v.to_str().map_err(|_| bad())?).ok_or_else(bad)?),
                None if req.version() == Version::HTTP_11 => return Err(bad()),
                None => None,
            },
        };
        let no_host = host_text.is_none();
        let Some(server) = self
            .inner
            .servers
            .get(self.server_for(host_text.as_deref()))
        else {
            return Err(Refusal::NotFound);
        };
        if no_host {
            // An HTTP/1.0 request without Host gets the server's name, or the listener's
            // address, so the upstream still sees one.
            let value = server.host_value.clone().or_else(|| {
                ClientInfo::of(req).and_then(|c| HeaderValue::try_from(c.local.to_string()).ok())
            });
            if let Some(v) = value {
                req.headers_mut().insert(HOST, v);
            }
        }
        // A classic CONNECT names a host, not a path. An HTTP/2 extended CONNECT (a
        // WebSocket over HTTP/2, RFC 8441) has a path and is routed like a GET.
        if req.method() == Method::CONNECT
            && req.extensions().get::<hyper::ext::Protocol>().is_none()
        {
            let found = server
                .locations
                .iter()
                .zip(&server.routes)
                .find(|(l, _)| l.allow_connect);
            return match found {
                Some((l, r)) => Ok((&l.service, r)),
                None => Err(Refusal::MethodNotAllowed),
            };
        }
        let path = normalize_path_cow(req.uri().path()).map_err(|_| bad())?;
        let i = server.matcher.find(&path).ok_or(Refusal::NotFound)?;
        let (Some(loc), Some(route)) = (server.locations.get(i), server.routes.get(i)) else {
            return Err(Refusal::NotFound);
        };
        if loc.internal {
            return Err(Refusal::NotFound);
        }
        Ok((&loc.service, route))
    }
}

/// Why the router answered a request itself.
#[derive(Debug, Clone, Copy)]
enum Refusal {
    /// Unroutable: bad Host, bad path (closes the connection).
    BadRequest,
    /// No location matches, or the location is internal.
    NotFound,
    /// CONNECT without a location that allows it.
    MethodNotAllowed,
}

impl Refusal {
    fn response(self) -> Response {
        match self {
            Refusal::BadRequest => response::bad_request(),
            Refusal::NotFound => response::status(StatusCode::NOT_FOUND),
            Refusal::MethodNotAllowed => response::status(StatusCode::METHOD_NOT_ALLOWED),
        }
    }
}

impl tower_service::Service<Request> for Router {
    type Response = Response;
    type Error = Infallible;
    type Future = RouteFuture;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, mut req: Request) -> RouteFuture {
        match self.route(&mut req) {
            Ok((svc, route)) => {
                if self.inner.route_info {
                    req.extensions_mut().insert(Arc::clone(route));
                }
                futures_like::Either::Call { fut: svc.call(req) }
            }
            Err(refusal) => futures_like::Either::Ready {
                resp: Some(refusal.response()),
            },
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // Tests may unwrap.
mod tests {
    use super::*;
    use http_body_util::BodyExt;
    use tower::ServiceExt;

    /// What the location saw: whether the request carried its route.
    async fn route_seen(route_info: Option<bool>) -> String {
        let echo = tower::service_fn(|req: Request| async move {
            let seen = req
                .extensions()
                .get::<Arc<Route>>()
                .map(|r| r.location.to_string());
            Ok::<_, Infallible>(Response::new(crate::body::ProxyBody::from(
                seen.unwrap_or_else(|| "none".to_owned()),
            )))
        });
        let mut b = Router::builder().server(
            VirtualServer::new([]).location(Location::new(Pattern::parse("/").unwrap(), echo)),
        );
        if let Some(on) = route_info {
            b = b.route_info(on);
        }
        let req = http::Request::get("/x")
            .header(HOST, "example.com")
            .body(Default::default())
            .unwrap();
        let resp = b.build().unwrap().oneshot(req).await.unwrap();
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        String::from_utf8(body.to_vec()).unwrap()
    }

    #[tokio::test]
    async fn the_route_is_an_extension_unless_turned_off() {
        assert_eq!(route_seen(None).await, "/");
        assert_eq!(route_seen(Some(true)).await, "/");
        assert_eq!(route_seen(Some(false)).await, "none");
    }
}
