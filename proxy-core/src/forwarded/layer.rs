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
    /// The client this layer resolved, alone. For an upstream that trusts only this
    /// proxy (uvicorn's `--forwarded-allow-ips=127.0.0.1`) while this proxy sits behind
    /// other trusted proxies: with `Append` such an upstream would stop at the nearest
    /// of them and take it for the client.
    ResolvedClient,
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
    /// to the incoming list; an untrusted peer's list is dropped when `X-Forwarded-For`
    /// is [`ReplaceUntrusted`](XffPolicy::ReplaceUntrusted) or
    /// [`ResolvedClient`](XffPolicy::ResolvedClient), kept otherwise (default `Pass`).
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

#[cfg(test)]
#[allow(clippy::unwrap_used)] // Tests may unwrap.
mod tests {
    use std::convert::Infallible;

    use http::{HeaderMap, Request, Response};
    use tower::{service_fn, ServiceExt};

    use super::*;
    use crate::client_info::{ClientInfo, RealClient, Scheme};

    /// Run one request through the layer; what the inner service saw.
    async fn seen(
        layer: ForwardedLayer,
        peer: Option<&str>,
        headers: &[(&str, &str)],
    ) -> (HeaderMap, Option<RealClient>) {
        let svc = layer.layer(service_fn(|req: Request<()>| async move {
            let client = req.extensions().get::<RealClient>().cloned();
            Ok::<_, Infallible>(Response::new((req.headers().clone(), client)))
        }));
        let mut req = Request::builder().uri("/").header("host", "example.com");
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let mut req = req.body(()).unwrap();
        if let Some(peer) = peer {
            req.extensions_mut().insert(ClientInfo::new(
                peer.parse().unwrap(),
                "127.0.0.1:8080".parse().unwrap(),
                Scheme::Http,
            ));
        }
        svc.oneshot(req).await.unwrap().into_body()
    }

    fn trusted() -> ForwardedLayer {
        ForwardedLayer::new().trusted("10.0.0.0/8".parse().unwrap())
    }

    const SPOOF: [(&str, &str); 4] = [
        ("x-forwarded-for", "1.1.1.1"),
        ("x-real-ip", "1.1.1.1"),
        ("x-forwarded-proto", "https"),
        ("x-forwarded-host", "evil.example"),
    ];

    #[tokio::test]
    async fn untrusted_spoof_is_recorded_not_believed() {
        let (h, client) = seen(trusted(), Some("192.0.2.9:5000"), &SPOOF).await;
        let client = client.unwrap();
        assert_eq!(client.ip, "192.0.2.9".parse::<std::net::IpAddr>().unwrap());
        assert_eq!(client.scheme, Scheme::Http);
        assert_eq!(client.host, None);
        assert_eq!(h["x-forwarded-for"], "1.1.1.1, 192.0.2.9");
        assert_eq!(h["x-real-ip"], "192.0.2.9");
        assert_eq!(h["x-forwarded-proto"], "http");
        assert_eq!(h["x-forwarded-host"], "example.com");
        assert_eq!(h["x-forwarded-port"], "8080");

        let strict = trusted().x_forwarded_for(XffPolicy::ReplaceUntrusted);
        let (h, _) = seen(strict, Some("192.0.2.9:5000"), &SPOOF).await;
        assert_eq!(h["x-forwarded-for"], "192.0.2.9");
    }

    #[tokio::test]
    async fn trusted_chain_is_believed_and_extended() {
        let headers = [
            ("x-forwarded-for", "203.0.113.7, 10.0.0.3"),
            ("x-forwarded-proto", "https"),
            ("x-forwarded-host", "app.example:8443"),
            ("x-forwarded-port", "8443"),
        ];
        let strict = trusted().x_forwarded_for(XffPolicy::ReplaceUntrusted);
        let (h, client) = seen(strict, Some("10.0.0.2:5000"), &headers).await;
        let client = client.unwrap();
        assert_eq!(
            client.ip,
            "203.0.113.7".parse::<std::net::IpAddr>().unwrap()
        );
        assert_eq!(client.port, None);
        assert_eq!(client.scheme, Scheme::Https);
        assert_eq!(h["x-forwarded-for"], "203.0.113.7, 10.0.0.3, 10.0.0.2");
        assert_eq!(h["x-real-ip"], "203.0.113.7");
        assert_eq!(h["x-forwarded-proto"], "https");
        assert_eq!(h["x-forwarded-host"], "app.example:8443");
        assert_eq!(h["x-forwarded-port"], "8443");
    }

    #[tokio::test]
    async fn resolved_client_alone() {
        let layer = trusted().x_forwarded_for(XffPolicy::ResolvedClient);
        let chain = [("x-forwarded-for", "6.6.6.6, 203.0.113.7, 10.0.0.3")];
        let (h, _) = seen(layer.clone(), Some("10.0.0.2:5000"), &chain).await;
        assert_eq!(h["x-forwarded-for"], "203.0.113.7");
        let (h, _) = seen(layer, Some("192.0.2.9:5000"), &chain).await;
        assert_eq!(h["x-forwarded-for"], "192.0.2.9");
    }

    #[tokio::test]
    async fn forwarded_header_set() {
        let layer = trusted().forwarded(HeaderPolicy::Set);
        let (h, _) = seen(
            layer.clone(),
            Some("[::1]:5000"),
            &[("forwarded", "for=_hidden")],
        )
        .await;
        assert_eq!(
            h["forwarded"],
            r#"for=_hidden, for="[::1]:5000";by="127.0.0.1:8080";host=example.com;proto=http"#
        );
        let (h, _) = seen(
            layer.x_forwarded_for(XffPolicy::ReplaceUntrusted),
            Some("192.0.2.1:7"),
            &[("forwarded", "for=_hidden")],
        )
        .await;
        assert_eq!(
            h["forwarded"],
            r#"for="192.0.2.1:7";by="127.0.0.1:8080";host=example.com;proto=http"#
        );
    }

    #[tokio::test]
    async fn pass_and_remove() {
        let layer = trusted()
            .x_forwarded_for(XffPolicy::Pass)
            .x_real_ip(HeaderPolicy::Remove)
            .x_forwarded_proto(HeaderPolicy::Pass)
            .x_forwarded_host(HeaderPolicy::Remove)
            .x_forwarded_port(HeaderPolicy::Remove)
            .forwarded(HeaderPolicy::Remove);
        let mut headers = SPOOF.to_vec();
        headers.push(("forwarded", "for=1.1.1.1"));
        let (h, _) = seen(layer, Some("192.0.2.9:5000"), &headers).await;
        assert_eq!(h["x-forwarded-for"], "1.1.1.1");
        assert_eq!(h["x-forwarded-proto"], "https");
        for gone in [
            "x-real-ip",
            "x-forwarded-host",
            "x-forwarded-port",
            "forwarded",
        ] {
            assert!(!h.contains_key(gone), "{gone}");
        }
    }

    #[tokio::test]
    async fn without_client_info_nothing_is_vouched_for() {
        let (h, client) = seen(trusted(), None, &SPOOF).await;
        assert_eq!(client, None);
        for gone in [
            "x-forwarded-for",
            "x-real-ip",
            "x-forwarded-proto",
            "x-forwarded-host",
        ] {
            assert!(!h.contains_key(gone), "{gone}");
        }
    }

    #[tokio::test]
    async fn connection_cannot_strip_our_headers() {
        let (mut h, _) = seen(
            trusted(),
            Some("192.0.2.9:5000"),
            &[
                ("connection", "keep-alive, X-Real-IP, x-forwarded-for"),
                ("connection", "x-other"),
            ],
        )
        .await;
        assert_eq!(h["connection"], "keep-alive, x-other");
        crate::hop::strip(&mut h, false);
        assert_eq!(h["x-real-ip"], "192.0.2.9");
        assert_eq!(h["x-forwarded-for"], "192.0.2.9");
    }

    #[tokio::test]
    async fn http2_authority_is_the_host() {
        let svc = trusted().layer(service_fn(|req: Request<()>| async move {
            Ok::<_, Infallible>(Response::new(req.headers().clone()))
        }));
        let mut req = Request::builder()
            .uri("https://example.org:8443/x")
            .body(())
            .unwrap();
        req.extensions_mut().insert(ClientInfo::new(
            "192.0.2.9:5000".parse().unwrap(),
            "127.0.0.1:8443".parse().unwrap(),
            Scheme::Https,
        ));
        let h = svc.oneshot(req).await.unwrap().into_body();
        assert_eq!(h["x-forwarded-host"], "example.org:8443");
        assert_eq!(h["x-forwarded-proto"], "https");
    }
}
