//! [`ForwardedLayer`] and its service [`Forwarded`]: configuration and the tower glue.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use pin_project_lite::pin_project;
use tower_layer::Layer;
use tower_service::Service;

use super::cidr::TrustedProxies;

/// Which request header names the client, when the socket peer is a trusted proxy
/// (nginx's `real_ip_header`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum ClientHeader {
    /// `X-Forwarded-For`, with `X-Forwarded-Proto`/`-Host`/`-Port` for the scheme, host
    /// and port. The default.
    #[default]
    XForwardedFor,
    /// `X-Real-IP` (one address), with `X-Forwarded-Proto`/`-Host`/`-Port`.
    XRealIp,
    /// RFC 7239 `Forwarded`: `for=`, and the same element's `proto=` and `host=`.
    Forwarded,
}

/// What the upstream receives as `X-Forwarded-For`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum XffPolicy {
    /// The incoming list with the socket peer appended, so the list records every hop
    /// (nginx's `$proxy_add_x_forwarded_for`). The default. A spoofed list from an
    /// untrusted client is passed on, but to the left of the peer's real address, where
    /// an upstream walking from the right never reaches it.
    #[default]
    Append,
    /// As `Append` for trusted peers; an untrusted peer's list is replaced by its
    /// address alone (the stricter way some proxies take).
    ReplaceUntrusted,
    /// Pass the client's header on untouched.
    Pass,
    /// Remove the header.
    Remove,
}

/// What the upstream receives as `X-Real-IP`, `X-Forwarded-Proto`, `X-Forwarded-Host`,
/// `X-Forwarded-Port` or `Forwarded`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum HeaderPolicy {
    /// Set it from what this proxy resolved (see [`ForwardedLayer`] for each header).
    Set,
    /// Pass the client's header on untouched (nginx's behaviour for a header it has no
    /// `proxy_set_header` line for).
    Pass,
    /// Remove the header.
    Remove,
}

#[derive(Debug, Clone)]
pub(crate) struct Config {
    pub(crate) trusted: TrustedProxies,
    pub(crate) client_header: ClientHeader,
    pub(crate) recursive: bool,
    pub(crate) xff: XffPolicy,
    pub(crate) real_ip: HeaderPolicy,
    pub(crate) proto: HeaderPolicy,
    pub(crate) host: HeaderPolicy,
    pub(crate) port: HeaderPolicy,
    pub(crate) forwarded: HeaderPolicy,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            trusted: TrustedProxies::none(),
            client_header: ClientHeader::XForwardedFor,
            recursive: true,
            xff: XffPolicy::Append,
            real_ip: HeaderPolicy::Set,
            proto: HeaderPolicy::Set,
            host: HeaderPolicy::Set,
            port: HeaderPolicy::Set,
            forwarded: HeaderPolicy::Pass,
        }
    }
}

/// Resolves the real client of each request into a
/// [`RealClient`](crate::client_info::RealClient) extension and rewrites the forwarded
/// headers the upstream sees. See the [module docs](super) for the rules.
///
/// Defaults: trust nobody; `X-Forwarded-For`, walked recursively; upstream headers
/// `X-Forwarded-For` appended, `X-Real-IP`, `X-Forwarded-Proto`, `X-Forwarded-Host`,
/// `X-Forwarded-Port` set, `Forwarded` passed. Cheap to clone (the configuration is
/// shared).
#[derive(Debug, Clone, Default)]
pub struct ForwardedLayer {
    config: Arc<Config>,
}

impl ForwardedLayer {
    /// The defaults above.
    pub fn new() -> Self {
        ForwardedLayer::default()
    }

    fn config(&mut self) -> &mut Config {
        Arc::make_mut(&mut self.config)
    }

    /// The peers whose headers are believed (nginx's `set_real_ip_from`, uvicorn's
    /// `--forwarded-allow-ips`).
    pub fn trusted(mut self, trusted: TrustedProxies) -> Self {
        self.config().trusted = trusted;
        self
    }

    /// The header a trusted peer names the client in (nginx's `real_ip_header`).
    pub fn client_header(mut self, header: ClientHeader) -> Self {
        self.config().client_header = header;
        self
    }

    /// Walk the list from the right past trusted addresses (`true`, the default; nginx's
    /// `real_ip_recursive on`), or take its last entry (`false`).
    pub fn recursive(mut self, recursive: bool) -> Self {
        self.config().recursive = recursive;
        self
    }

    /// What the upstream receives as `X-Forwarded-For`.
    pub fn x_forwarded_for(mut self, policy: XffPolicy) -> Self {
        self.config().xff = policy;
        self
    }

    /// `X-Real-IP`: `Set` writes the resolved client address (default `Set`).
    pub fn x_real_ip(mut self, policy: HeaderPolicy) -> Self {
        self.config().real_ip = policy;
        self
    }

    /// `X-Forwarded-Proto`: `Set` writes the resolved scheme, `https` on TLS listeners
    /// unless a trusted proxy said otherwise (default `Set`).
    pub fn x_forwarded_proto(mut self, policy: HeaderPolicy) -> Self {
        self.config().proto = policy;
        self
    }

    /// `X-Forwarded-Host`: `Set` writes the host a trusted proxy named, else the
    /// request's `Host` (default `Set`).
    pub fn x_forwarded_host(mut self, policy: HeaderPolicy) -> Self {
        self.config().host = policy;
        self
    }

    /// `X-Forwarded-Port`: `Set` writes the port a trusted proxy named, else the port
    /// the connection was accepted on (default `Set`).
    pub fn x_forwarded_port(mut self, policy: HeaderPolicy) -> Self {
        self.config().port = policy;
        self
    }

    /// RFC 7239 `Forwarded`: `Set` appends `for=<peer>;by=<local>;host=<host>;proto=<scheme>`
    /// to the incoming list, which is kept or dropped as the `X-Forwarded-For` list is
    /// (default `Pass`).
    pub fn forwarded(mut self, policy: HeaderPolicy) -> Self {
        self.config().forwarded = policy;
        self
    }
}

impl<S> Layer<S> for ForwardedLayer {
    type Service = Forwarded<S>;

    fn layer(&self, inner: S) -> Forwarded<S> {
        Forwarded {
            inner,
            config: self.config.clone(),
        }
    }
}

/// The service [`ForwardedLayer`] makes. It never fails on its own: a bad header is
/// ignored or falls back to the socket peer.
#[derive(Debug, Clone)]
pub struct Forwarded<S> {
    inner: S,
    config: Arc<Config>,
}

impl<S> Forwarded<S> {
    /// Wrap `inner` with the configuration of `layer`.
    pub fn new(inner: S, layer: &ForwardedLayer) -> Self {
        layer.layer(inner)
    }

    /// The wrapped service.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }
}

impl<S, B> Service<http::Request<B>> for Forwarded<S>
where
    S: Service<http::Request<B>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = ResponseFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: http::Request<B>) -> Self::Future {
        super::apply(&self.config, &mut req);
        ResponseFuture {
            inner: self.inner.call(req),
        }
    }
}

pin_project! {
    /// The response future of [`Forwarded`]: the inner service's, untouched.
    #[derive(Debug)]
    pub struct ResponseFuture<F> {
        #[pin]
        inner: F,
    }
}

impl<F: Future> Future for ResponseFuture<F> {
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        self.project().inner.poll(cx)
    }
}
