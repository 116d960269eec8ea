//! [`AccessLayer`], [`Access`] and their [`ResponseFuture`].

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use pin_project_lite::pin_project;
use tower_layer::Layer;
use tower_service::Service;

use super::rules::{AccessRules, Action};
use crate::body::{Request, Response};
use crate::client_info::client_ip;
use crate::response;

/// Applies [`AccessRules`] in front of a service. See the [module docs](super).
#[derive(Debug, Clone)]
pub struct AccessLayer {
    rules: AccessRules,
}

impl AccessLayer {
    /// A layer checking `rules`; every service it makes shares them.
    pub fn new(rules: AccessRules) -> Self {
        AccessLayer { rules }
    }
}

impl<S> Layer<S> for AccessLayer {
    type Service = Access<S>;

    fn layer(&self, inner: S) -> Access<S> {
        Access {
            inner,
            rules: self.rules.clone(),
        }
    }
}

/// The service made by [`AccessLayer`]: calls `S` for allowed clients, answers 403 to the
/// others.
#[derive(Debug, Clone)]
pub struct Access<S> {
    inner: S,
    rules: AccessRules,
}

impl<S> Service<Request> for Access<S>
where
    S: Service<Request, Response = Response>,
{
    type Response = Response;
    type Error = S::Error;
    type Future = ResponseFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request) -> Self::Future {
        let ip = client_ip(&req);
        match self.rules.decide(ip) {
            Action::Allow => ResponseFuture {
                state: State::Inner {
                    fut: self.inner.call(req),
                },
            },
            Action::Deny => {
                tracing::debug!(client = ?ip, path = req.uri().path(), "access denied");
                ResponseFuture {
                    state: State::Denied {
                        resp: Some(response::status(self.rules.deny_status())),
                    },
                }
            }
        }
    }
}

pin_project! {
    /// The future of [`Access`] responses.
    pub struct ResponseFuture<F> {
        #[pin]
        state: State<F>,
    }
}

pin_project! {
    #[project = StateProj]
    enum State<F> {
        Inner { #[pin] fut: F },
        Denied { resp: Option<Response> },
    }
}

impl<F> std::fmt::Debug for ResponseFuture<F> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("access::ResponseFuture")
    }
}

impl<F, E> Future for ResponseFuture<F>
where
    F: Future<Output = Result<Response, E>>,
{
    type Output = Result<Response, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project().state.project() {
            StateProj::Inner { fut } => fut.poll(cx),
            StateProj::Denied { resp } => Poll::Ready(Ok(resp
                .take()
                .unwrap_or_else(|| response::status(http::StatusCode::FORBIDDEN)))),
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)] // tests may unwrap
mod tests {
    use super::*;
    use crate::body::ProxyBody;
    use crate::client_info::{ClientInfo, RealClient, Scheme};
    use std::convert::Infallible;
    use tower::{service_fn, ServiceExt};

    fn app() -> impl Service<Request, Response = Response, Error = Infallible, Future: Send> + Clone
    {
        service_fn(|_req: Request| async {
            Ok::<_, Infallible>(Response::new(ProxyBody::from("app")))
        })
    }

    #[tokio::test]
    async fn uses_the_real_client_not_the_peer() {
        let rules = AccessRules::builder()
            .allow("203.0.113.0/24".parse().unwrap())
            .deny_all()
            .deny_status(http::StatusCode::NOT_FOUND)
            .build();
        let svc = AccessLayer::new(rules).layer(app());
        let mut req = http::Request::new(ProxyBody::empty());
        req.extensions_mut().insert(ClientInfo::new(
            "127.0.0.1:1".parse().unwrap(),
            "127.0.0.1:2".parse().unwrap(),
            Scheme::Http,
        ));
        assert_eq!(svc.clone().oneshot(req).await.unwrap().status(), 404);

        let mut req = http::Request::new(ProxyBody::empty());
        req.extensions_mut().insert(RealClient {
            ip: "203.0.113.9".parse().unwrap(),
            port: None,
            scheme: Scheme::Https,
            host: None,
        });
        assert_eq!(svc.oneshot(req).await.unwrap().status(), 200);
    }
}
