//! The pooled upstream client.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use http::header::{HeaderName, HeaderValue, CONTENT_LENGTH, HOST, UPGRADE};
use http::uri::{Authority, PathAndQuery, Uri};
use http::{Method, Version};

use crate::access_log::UpstreamInfo;
use crate::body::{ProxyBody, Request, Response};
use crate::error::{Error, Kind};
use crate::hop;
use crate::upstream::extended_connect;
use crate::upstream::pool::{Endpoint, Pool, SendError};
use crate::upstream::tunnel::{self, UpstreamTimeouts};

/// How the [`UpstreamClient`] connects and pools.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct ClientConfig {
    /// Idle keep-alive connections kept per upstream address (nginx's `keepalive`).
    /// Default 32; 0 disables reuse.
    pub keepalive: usize,
    /// How long an idle pooled connection is kept. Default 4 s: below uvicorn's 5 s
    /// `--timeout-keep-alive`, so the pool never reuses a connection the backend is
    /// about to close (the classic intermittent 502).
    pub keepalive_timeout: Duration,
    /// Connect timeout (nginx's `proxy_connect_timeout`, default 60 s).
    pub connect_timeout: Duration,
    /// Time allowed for the response header after the request was sent
    /// (nginx's `proxy_read_timeout` for the first byte, default 60 s).
    pub read_timeout: Duration,
    /// Longest time a write to the upstream may make no progress (nginx's
    /// `proxy_send_timeout`, default 60 s): a request body the upstream stops reading.
    pub send_timeout: Duration,
    /// Upgrade protocols forwarded to the upstream (case-insensitive). Default
    /// `["websocket"]`; `h2c` is never forwarded whatever this says.
    pub upgrades: Vec<String>,
}

impl Default for ClientConfig {
    fn default() -> Self {
        ClientConfig {
            keepalive: 32,
            keepalive_timeout: Duration::from_secs(4),
            connect_timeout: Duration::from_secs(60),
            read_timeout: Duration::from_secs(60),
            send_timeout: Duration::from_secs(60),
            upgrades: vec!["websocket".to_owned()],
        }
    }
}

/// A pooled HTTP/1.1 client for upstream servers. Cheap to clone: clones share the pool.
#[derive(Clone, Debug)]
pub struct UpstreamClient {
    pool: Arc<Pool>,
    config: Arc<ClientConfig>,
}

impl UpstreamClient {
    /// A client with its own connection pool.
    pub fn new(config: ClientConfig) -> Self {
        let pool = Pool::new(
            config.keepalive,
            config.keepalive_timeout,
            config.connect_timeout,
            config.send_timeout,
        );
        UpstreamClient {
            pool: Arc::new(pool),
            config: Arc::new(config),
        }
    }

    /// The pool's endpoint for `addr`, for callers that send there many times
    /// ([`Forward`](super::Forward)) and so look it up once.
    pub(crate) fn endpoint(&self, addr: SocketAddr) -> Result<Arc<Endpoint>, Error> {
        self.pool.endpoint(addr, || authority_of(addr))
    }

    /// The configuration this client was built with.
    pub fn config(&self) -> &ClientConfig {
        &self.config
    }

    /// Send `req` to `addr` and return the upstream's response header with its body
    /// streaming behind it.
    ///
    /// The request is rewritten for the hop: HTTP/1.1, origin-form target, hop-by-hop
    /// headers removed, `Host` kept as the client sent it (or taken from an absolute-form
    /// target or HTTP/2 `:authority`). An idempotent request without a body that fails on
    /// a connection the upstream closed before answering is retried once on a fresh one.
    pub async fn send(&self, addr: SocketAddr, req: Request) -> Result<Response, Error> {
        let timeouts = UpstreamTimeouts {
            read_timeout: self.config.read_timeout,
            idle_timeout: self.config.read_timeout,
        };
        self.send_with(addr, req, &timeouts).await
    }

    /// [`send`](Self::send) with a location's own read and upgraded-connection timeouts
    /// (nginx's per-location `proxy_read_timeout`).
    pub async fn send_with(
        &self,
        addr: SocketAddr,
        req: Request,
        timeouts: &UpstreamTimeouts,
    ) -> Result<Response, Error> {
        let endpoint = self.endpoint(addr)?;
        self.send_to(&endpoint, req, timeouts, true).await
    }

    /// [`send_with`](Self::send_with) to an endpoint already looked up. `upstream_info`:
    /// whether to put an [`UpstreamInfo`] on the response, which only access logs and
    /// metrics read (an extension costs two allocations on a response that has none).
    pub(crate) async fn send_to(
        &self,
        endpoint: &Arc<Endpoint>,
        mut req: Request,
        timeouts: &UpstreamTimeouts,
        upstream_info: bool,
    ) -> Result<Response, Error> {
        let addr = endpoint.addr();
        let upgrade = self.prepare(endpoint.authority(), &mut req)?;
        // Take the client side of a possible upgrade before the request is consumed. Its
        // upgraded stream only exists after we answered 101 (or 200 to an HTTP/2
        // extended CONNECT), so no byte the client sent after its upgrade request can
        // reach the upstream before the upstream agreed.
        let client_upgrade = if upgrade != Upgrade::No {
            req.extensions_mut().remove::<hyper::upgrade::OnUpgrade>()
        } else {
            None
        };
        let retry = retry_template(&req);
        let started = tokio::time::Instant::now();
        let first = self
            .send_once(endpoint, req, deadline_from(started, timeouts.read_timeout))
            .await;
        let resp = match (first, retry) {
            (Err(e), Some(again)) if is_stale_connection(&e) => {
                tracing::debug!(%addr, error = ?e, "retrying on a fresh upstream connection");
                let deadline = deadline_from(tokio::time::Instant::now(), timeouts.read_timeout);
                self.send_once(endpoint, again.into_request(), deadline)
                    .await
                    .map_err(map_error)?
            }
            (r, _) => r.map_err(map_error)?,
        };
        if resp.status() == http::StatusCode::SWITCHING_PROTOCOLS {
            return match client_upgrade {
                Some(client_side) => {
                    let mut resp = resp;
                    if upgrade == Upgrade::Extended && !extended_connect::accepted(&resp, WEBSOCKET)
                    {
                        return Err(Error::new(Kind::UpstreamProtocol));
                    }
                    let upstream_side = hyper::upgrade::on(&mut resp);
                    tunnel::spawn(client_side, upstream_side, timeouts.idle_timeout);
                    if upgrade == Upgrade::Extended {
                        return Ok(extended_connect::to_h2_response(resp));
                    }
                    let mut resp = resp.map(|_| ProxyBody::empty());
                    hop::strip(resp.headers_mut(), true);
                    Ok(resp)
                }
                // A 101 we did not ask for cannot be relayed.
                None => Err(Error::new(Kind::UpstreamProtocol)),
            };
        }
        let mut resp = resp.map(ProxyBody::from);
        // For access logs and metrics: which server answered, and how fast.
        if upstream_info {
            resp.extensions_mut()
                .insert(UpstreamInfo::new(addr, started.elapsed()));
        }
        // The client's connection has its own version; an HTTP/1.0 upstream's answer is
        // relayed on it as HTTP/1.1 framing decided by hyper.
        *resp.version_mut() = Version::HTTP_11;
        hop::strip(resp.headers_mut(), false);
        Ok(resp)
    }

    /// One exchange, the response header due by `deadline` (`proxy_read_timeout` from
    /// the send; the pool watches it with the connection's own timer).
    async fn send_once(
        &self,
        endpoint: &Arc<Endpoint>,
        req: Request,
        deadline: tokio::time::Instant,
    ) -> Result<http::Response<hyper::body::Incoming>, ClientError> {
        match self.pool.send(endpoint, req, deadline).await {
            Ok(resp) => Ok(resp),
            Err(SendError::Timeout) => Err(ClientError::Timeout),
            Err(e) => Err(ClientError::Send(e)),
        }
    }

    /// Rewrite `req` for the upstream hop; returns which upgrade is being proxied.
    fn prepare(&self, upstream: &Authority, req: &mut Request) -> Result<Upgrade, Error> {
        // Host: as the client sent it; an absolute-form target (or HTTP/2 :authority)
        // replaces it (RFC 9112 §3.2.2).
        let authority = req.uri().authority().cloned();
        if let Some(auth) = authority {
            let value = HeaderValue::from_str(auth.as_str())
                .map_err(|e| Error::with_source(Kind::BadRequest, e))?;
            req.headers_mut().insert(HOST, value);
        }
        let upgrade = match extended_connect::protocol(req) {
            Some(p) if p.eq_ignore_ascii_case(WEBSOCKET) && self.allows_upgrade(WEBSOCKET) => {
                Upgrade::Extended
            }
            // Other extended CONNECT protocols (WebTransport, CONNECT-UDP) have no
            // HTTP/1.1 form an upstream could be asked for.
            Some(_) => return Err(Error::new(Kind::BadRequest)),
            None if self.wants_upgrade(req) => Upgrade::Http1,
            None => Upgrade::No,
        };
        hop::strip(req.headers_mut(), upgrade == Upgrade::Http1);
        if upgrade == Upgrade::Extended {
            extended_connect::to_http1_upgrade(req, WEBSOCKET);
        }
        // Re-serialise Content-Length canonically (no leading zeros an upstream could
        // read as octal): the body's exact length is what will be sent.
        if req.headers().contains_key(CONTENT_LENGTH) {
            if let Some(n) = http_body::Body::size_hint(req.body()).exact() {
                req.headers_mut()
                    .insert(CONTENT_LENGTH, HeaderValue::from(n));
            }
        }
        // The target goes upstream in origin form (`/path?query`; an absolute-form target
        // with no path becomes `/`); CONNECT in authority form, naming the upstream, as
        // the pooled client always sent it.
        *req.uri_mut() = if req.method() == Method::CONNECT {
            Uri::from(upstream.clone())
        } else if req.uri().scheme().is_none() && req.uri().authority().is_none() {
            // Origin form already: keep it byte for byte, unless it holds raw non-ASCII
            // bytes (outside RFC 9112's grammar): those go percent-encoded.
            match req.uri().path_and_query() {
                Some(pq) if !pq.as_str().is_ascii() => Uri::from(percent_encode_non_ascii(pq)?),
                Some(pq) => Uri::from(pq.clone()),
                None => Uri::from(PathAndQuery::from_static("/")),
            }
        } else {
            // Absolute form (rare): rebuild `/path?query` from its parts, since an
            // absolute URI may store an empty path it only displays as `/`.
            let target = match req.uri().query() {
                Some(q) => format!("{}?{q}", req.uri().path()),
                None => req.uri().path().to_owned(),
            };
            let pq = PathAndQuery::try_from(target)
                .map_err(|e| Error::with_source(Kind::BadRequest, e))?;
            if pq.as_str().is_ascii() {
                Uri::from(pq)
            } else {
                Uri::from(percent_encode_non_ascii(&pq)?)
            }
        };
        *req.version_mut() = Version::HTTP_11;
        Ok(upgrade)
    }

    fn wants_upgrade(&self, req: &Request) -> bool {
        if req.version() != Version::HTTP_11 || !hop::connection_has(req.headers(), "upgrade") {
            return false;
        }
        let Some(proto) = req.headers().get(UPGRADE).and_then(|v| v.to_str().ok()) else {
            return false;
        };
        let proto = proto.split('/').next().unwrap_or("").trim();
        !proto.eq_ignore_ascii_case("h2c") && self.allows_upgrade(proto)
    }

    fn allows_upgrade(&self, proto: &str) -> bool {
        self.config
            .upgrades
            .iter()
            .any(|p| p.eq_ignore_ascii_case(proto))
    }
}

/// The one protocol HTTP/2 extended CONNECT is translated for (RFC 8441).
const WEBSOCKET: &str = "websocket";

/// Which upgrade a request going upstream asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Upgrade {
    /// None: an ordinary request.
    No,
    /// An HTTP/1.1 `Upgrade` (WebSocket), passed on as it came.
    Http1,
    /// An HTTP/2 extended CONNECT for a WebSocket, sent upstream as an HTTP/1.1 upgrade.
    Extended,
}

/// `start + timeout`, saturating far in the future instead of overflowing.
fn deadline_from(start: tokio::time::Instant, timeout: Duration) -> tokio::time::Instant {
    start
        .checked_add(timeout)
        .unwrap_or_else(|| start + Duration::from_secs(60 * 60 * 24 * 365 * 30))
}

/// `IP:PORT` as a URI authority (the upstream client's pool key).
pub(crate) fn authority_of(addr: SocketAddr) -> Result<Authority, Error> {
    Authority::try_from(addr.to_string()).map_err(|e| Error::with_source(Kind::Internal, e))
}

/// What the one stale-connection retry needs of a body-less idempotent request: its
/// head, copied before hyper consumes the request.
///
/// Nearly every request is answered, so this copy is nearly always thrown away: the
/// headers are kept as a plain list of (shared, reference-counted) names and values,
/// one allocation, instead of a `HeaderMap` clone (its index and its entries, two), and
/// the map is rebuilt only when the retry happens.
struct RetryTemplate {
    method: Method,
    uri: Uri,
    version: Version,
    headers: Vec<(HeaderName, HeaderValue)>,
}

impl RetryTemplate {
    /// The request again, as it was prepared for the upstream.
    fn into_request(self) -> Request {
        let mut req = http::Request::new(ProxyBody::empty());
        *req.method_mut() = self.method;
        *req.uri_mut() = self.uri;
        *req.version_mut() = self.version;
        let headers = req.headers_mut();
        headers.reserve(self.headers.len());
        for (name, value) in self.headers {
            // `append`: a name listed twice keeps both of its lines, in order.
            headers.append(name, value);
        }
        req
    }
}

/// The retry template of `req` when it may be retried: idempotent and without a body.
fn retry_template(req: &Request) -> Option<RetryTemplate> {
    let idempotent = matches!(
        *req.method(),
        Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE | Method::PUT | Method::DELETE
    );
    if !idempotent || !http_body::Body::is_end_stream(req.body()) {
        return None;
    }
    let mut headers = Vec::with_capacity(req.headers().len());
    headers.extend(req.headers().iter().map(|(n, v)| (n.clone(), v.clone())));
    Some(RetryTemplate {
        method: req.method().clone(),
        uri: req.uri().clone(),
        version: req.version(),
        headers,
    })
}

#[derive(Debug)]
enum ClientError {
    Send(SendError),
    Timeout,
}

/// Whether the upstream closed or reset the connection before any response byte: what a
/// pooled connection that the backend timed out at the same moment looks like.
fn is_stale_connection(e: &ClientError) -> bool {
    let ClientError::Send(SendError::Http(error)) = e else {
        return false;
    };
    if error.is_incomplete_message() || error.is_canceled() {
        return true;
    }
    find_source::<std::io::Error>(error).is_some_and(|io| {
        matches!(
            io.kind(),
            std::io::ErrorKind::ConnectionReset
                | std::io::ErrorKind::BrokenPipe
                | std::io::ErrorKind::ConnectionAborted
        )
    })
}

fn map_error(e: ClientError) -> Error {
    let error = match e {
        ClientError::Timeout => return Error::new(Kind::UpstreamTimeout),
        ClientError::Send(SendError::ConnectTimeout) => {
            return Error::new(Kind::UpstreamConnectTimeout)
        }
        ClientError::Send(SendError::Connect(io)) => {
            let kind = if io.kind() == std::io::ErrorKind::TimedOut {
                Kind::UpstreamConnectTimeout
            } else {
                Kind::UpstreamConnect
            };
            return Error::with_source(kind, io);
        }
        ClientError::Send(SendError::Http(error)) => error,
        // `send_once` reports it as `ClientError::Timeout`.
        ClientError::Send(SendError::Timeout) => return Error::new(Kind::UpstreamTimeout),
    };
    // The client's own body failing while we stream it up is the client's fault, never
    // the upstream's (a passive health check must not count it): keep the body's kind
    // (400 for broken chunked framing, 413, 408, 499 for a vanished client).
    if let Some(ours) = find_source::<Error>(&error) {
        let kind = ours.kind();
        return Error::with_source(kind, error);
    }
    if error.is_body_write_aborted() || error.is_user() {
        return Error::with_source(Kind::UpstreamSend, error);
    }
    Error::with_source(Kind::UpstreamProtocol, error)
}

/// The first error of type `T` in `e`'s source chain.
fn find_source<'a, T: std::error::Error + 'static>(
    e: &'a (dyn std::error::Error + 'static),
) -> Option<&'a T> {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = cur {
        if let Some(t) = err.downcast_ref::<T>() {
            return Some(t);
        }
        cur = err.source();
    }
    None
}

/// `pq` with every byte above 0x7F written as `%XX`. hyper accepts such bytes in a
/// request target, but RFC 9112 does not, and a strict upstream would refuse the request
/// (or read it differently); the encoded form means the same path to any application.
pub(crate) fn percent_encode_non_ascii(pq: &PathAndQuery) -> Result<PathAndQuery, Error> {
    const HEX: &[u8; 16] = b"0123456789ABCDEF";
    let raw = pq.as_str().as_bytes();
    let mut out = Vec::with_capacity(raw.len() + 16);
    for &b in raw {
        if b.is_ascii() {
            out.push(b);
        } else {
            out.extend_from_slice(&[b'%', HEX[usize::from(b >> 4)], HEX[usize::from(b & 0xF)]]);
        }
    }
    PathAndQuery::try_from(out).map_err(|e| Error::with_source(Kind::BadRequest, e))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // Tests may unwrap.
mod tests {
    use super::*;

    #[test]
    fn non_ascii_targets_are_percent_encoded() {
        let pq = PathAndQuery::try_from(&b"/a\xd1\xa6=1?q=\xc3\xa9"[..]).unwrap();
        assert_eq!(
            percent_encode_non_ascii(&pq).unwrap().as_str(),
            "/a%D1%A6=1?q=%C3%A9"
        );
    }
}
