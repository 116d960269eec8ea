//! [`Reloadable`]: a service whose inner service can be replaced while it serves — how a
//! config reload swaps routers, upstream groups and limits without dropping a request.
//!
//! Each request runs on the service that was current when it arrived; requests in flight
//! finish on the old one. Swapping is one atomic pointer store.
//!
//! ```
//! use http::StatusCode;
//! use proxy_core::reload::Reloadable;
//! use proxy_core::router::Return;
//! use tower::ServiceExt;
//! # tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(async {
//! let (svc, handle) = Reloadable::new(Return::new(StatusCode::OK));
//! let resp = svc.clone().oneshot(http::Request::new(Default::default())).await.unwrap();
//! assert_eq!(resp.status(), 200);
//! handle.swap(Return::new(StatusCode::SERVICE_UNAVAILABLE));
//! let resp = svc.oneshot(http::Request::new(Default::default())).await.unwrap();
//! assert_eq!(resp.status(), 503);
//! # });
//! ```

use std::sync::Arc;
use std::task::{Context, Poll};

use arc_swap::ArcSwap;
use tower::util::Oneshot;
use tower::ServiceExt;

use crate::body::Request;

/// A service that forwards to whatever service its [`ReloadHandle`] last installed.
#[derive(Debug)]
pub struct Reloadable<S> {
    current: Arc<ArcSwap<S>>,
}

impl<S> Clone for Reloadable<S> {
    fn clone(&self) -> Self {
        Reloadable {
            current: self.current.clone(),
        }
    }
}

/// Replaces the service behind a [`Reloadable`].
#[derive(Debug)]
pub struct ReloadHandle<S> {
    current: Arc<ArcSwap<S>>,
}

impl<S> Clone for ReloadHandle<S> {
    fn clone(&self) -> Self {
        ReloadHandle {
            current: self.current.clone(),
        }
    }
}

impl<S> Reloadable<S> {
    /// A reloadable service starting with `service`, and its handle.
    pub fn new(service: S) -> (Self, ReloadHandle<S>) {
        let current = Arc::new(ArcSwap::from_pointee(service));
        (
            Reloadable {
                current: current.clone(),
            },
            ReloadHandle { current },
        )
    }
}

impl<S> ReloadHandle<S> {
    /// Install `service` for every request that arrives from now on.
    pub fn swap(&self, service: S) {
        self.current.store(Arc::new(service));
    }

    /// The service currently installed.
    pub fn current(&self) -> Arc<S> {
        self.current.load_full()
    }
}

impl<S, Resp, E> tower_service::Service<Request> for Reloadable<S>
where
    S: tower_service::Service<Request, Response = Resp, Error = E> + Clone,
{
    type Response = Resp;
    type Error = E;
    type Future = Oneshot<S, Request>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), E>> {
        // Readiness is the inner service's, checked by the oneshot per request.
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request) -> Self::Future {
        let svc = S::clone(&self.current.load());
        svc.oneshot(req)
    }
}
