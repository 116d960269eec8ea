//! [`Forward`]: a service that proxies every request to one upstream address.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use crate::body::{Request, Response};
use crate::response;
use crate::upstream::pool::Endpoint;
use crate::upstream::{UpstreamClient, UpstreamTimeouts};

/// Proxies each request to one fixed upstream address through a pooled
/// [`UpstreamClient`]. Failures become 502/504 responses, never errors.
///
/// ```
/// use proxy_core::upstream::{ClientConfig, Forward, UpstreamClient};
/// use tower::ServiceExt;
/// # tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async {
/// // Nothing listens on port 9 (discard): the answer is a 502, not an error.
/// let forward = Forward::new(UpstreamClient::new(ClientConfig::default()), "127.0.0.1:9".parse().unwrap());
/// let resp = forward.oneshot(http::Request::new(Default::default())).await.unwrap();
/// assert_eq!(resp.status(), 502);
/// # });
/// ```
#[derive(Clone, Debug)]
pub struct Forward {
    // One allocation shared by every clone: a clone per request is one reference count,
    // not a copy of the client and its configuration.
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    client: UpstreamClient,
    addr: SocketAddr,
    /// `addr`'s pool endpoint (its idle connections and authority), looked up once;
    /// `None` only if that failed, and then every request fails the same way through
    /// `send_with`.
    endpoint: Option<Arc<Endpoint>>,
    timeouts: UpstreamTimeouts,
}

impl Forward {
    /// Forward to `addr` with the client's default timeouts.
    pub fn new(client: UpstreamClient, addr: SocketAddr) -> Self {
        let timeouts = UpstreamTimeouts {
            read_timeout: client.config().read_timeout,
            idle_timeout: client.config().read_timeout,
        };
        Forward {
            inner: Arc::new(Inner {
                endpoint: client.endpoint(addr).ok(),
                client,
                addr,
                timeouts,
            }),
        }
    }

    /// Use these read and upgraded-connection timeouts instead.
    pub fn with_timeouts(self, timeouts: UpstreamTimeouts) -> Self {
        let inner = &self.inner;
        Forward {
            inner: Arc::new(Inner {
                client: inner.client.clone(),
                addr: inner.addr,
                endpoint: inner.endpoint.clone(),
                timeouts,
            }),
        }
    }
}

impl tower_service::Service<Request> for Forward {
    type Response = Response;
    type Error = Infallible;
    type Future = ResponseFuture;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request) -> ResponseFuture {
        let this = self.inner.clone();
        ResponseFuture {
            inner: Box::pin(async move {
                let Inner {
                    client,
                    addr,
                    endpoint,
                    timeouts,
                } = &*this;
                let sent = match endpoint {
                    Some(ep) => client.send_to(ep, req, timeouts, true).await,
                    None => client.send_with(*addr, req, timeouts).await,
                };
                match sent {
                    Ok(resp) => resp,
                    Err(e) => {
                        tracing::warn!(upstream = %addr, error = %e, "upstream request failed");
                        response::from_error(e)
                    }
                }
            }),
        }
    }
}

/// The future of [`Forward`]'s responses.
pub struct ResponseFuture {
    inner: Pin<Box<dyn Future<Output = Response> + Send>>,
}

impl std::fmt::Debug for ResponseFuture {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ResponseFuture")
    }
}

impl Future for ResponseFuture {
    type Output = Result<Response, Infallible>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        self.inner.as_mut().poll(cx).map(Ok)
    }
}
