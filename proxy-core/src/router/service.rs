//! [`LocationService`]: the one type-erased service of the router, built so that a request
//! crosses at most one box on its way through a listener, the router and a location.
//!
//! tower's `BoxCloneSyncService` costs two allocations per request and level: cloning the
//! box for the call, and boxing the call's future. A listener serving a boxed router whose
//! locations were boxed stacks around a boxed terminal paid that three times. Here:
//!
//! - clones share one `Arc` (no allocation), and the concrete service is cloned only
//!   inside the call, where it is a few reference counts;
//! - a [`Router`] is held as itself, so the listener → router step is not boxed at all;
//! - wrapping a `LocationService` again (a location whose service is already one) reuses
//!   it instead of boxing it a second time.

use std::any::Any;
use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use pin_project_lite::pin_project;
use tower::ServiceExt;

use super::{RouteFuture, Router};
use crate::body::{Request, Response};

/// A location's (or a listener's) service, type-erased: any
/// `Service<Request, Response = Response, Error = Infallible>` that is `Clone + Send +
/// Sync`. Cheap to clone (one reference count).
///
/// ```
/// use proxy_core::router::{LocationService, Return};
/// use tower::ServiceExt;
/// # tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(async {
/// let svc = LocationService::new(Return::new(http::StatusCode::IM_A_TEAPOT));
/// let resp = svc.clone().oneshot(http::Request::new(Default::default())).await.unwrap();
/// assert_eq!(resp.status(), 418);
/// # });
/// ```
#[derive(Clone)]
pub struct LocationService {
    kind: Kind,
}

#[derive(Clone)]
enum Kind {
    /// A router, called directly: its future is a named type, no box.
    Router(Router),
    /// Anything else, behind one shared allocation.
    Erased(Arc<dyn Call>),
}

impl std::fmt::Debug for LocationService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.kind {
            Kind::Router(r) => f.debug_tuple("LocationService").field(r).finish(),
            Kind::Erased(_) => f.write_str("LocationService(..)"),
        }
    }
}

/// The boxed future of an erased service.
pub(crate) type BoxFuture = Pin<Box<dyn Future<Output = Result<Response, Infallible>> + Send>>;

/// An erased service, called through a shared reference: the concrete service is cloned
/// for the call (tower's contract gives each call a ready service of its own).
pub(crate) trait Call: Send + Sync + 'static {
    fn call(&self, req: Request) -> BoxFuture;
}

struct Erased<S>(S);

impl<S> Call for Erased<S>
where
    S: tower_service::Service<Request, Response = Response, Error = Infallible>
        + Clone
        + Send
        + Sync
        + 'static,
    S::Future: Send + 'static,
{
    fn call(&self, req: Request) -> BoxFuture {
        // The stacks here are ready at once (they answer overload with a response rather
        // than wait in `poll_ready`), so the clone is asked once, without a waker, and
        // only the call's future is boxed: a oneshot would move the clone and the
        // request into the box and out again. A stack that is not ready (a concurrency
        // limit's permit) is driven by the oneshot as before, which polls it again with
        // the task's waker.
        let mut svc = self.0.clone();
        let mut cx = Context::from_waker(std::task::Waker::noop());
        match tower_service::Service::poll_ready(&mut svc, &mut cx) {
            Poll::Ready(Ok(())) => Box::pin(tower_service::Service::call(&mut svc, req)),
            Poll::Ready(Err(never)) => match never {},
            Poll::Pending => Box::pin(svc.oneshot(req)),
        }
    }
}

/// `service` as an `Arc<dyn Call>`, reusing the one inside when it is already a
/// [`LocationService`].
pub(crate) fn erase<S>(service: S) -> Arc<dyn Call>
where
    S: tower_service::Service<Request, Response = Response, Error = Infallible>
        + Clone
        + Send
        + Sync
        + 'static,
    S::Future: Send + 'static,
{
    match copy_as::<S, LocationService>(&service) {
        Some(LocationService {
            kind: Kind::Erased(call),
        }) => call,
        Some(LocationService {
            kind: Kind::Router(r),
        }) => Arc::new(Erased(r)),
        None => Arc::new(Erased(service)),
    }
}

/// A clone of `value` as a `T` when `S` is `T`. Construction-time only: this is how a
/// router or an already erased service is recognised without specialisation (both
/// clone as one reference count).
fn copy_as<S: 'static, T: Clone + 'static>(value: &S) -> Option<T> {
    (value as &dyn Any).downcast_ref::<T>().cloned()
}

impl LocationService {
    /// Erase `service`. A [`Router`] is kept as itself (called without a box); a
    /// `LocationService` is returned as it is (not boxed again).
    pub fn new<S>(service: S) -> Self
    where
        S: tower_service::Service<Request, Response = Response, Error = Infallible>
            + Clone
            + Send
            + Sync
            + 'static,
        S::Future: Send + 'static,
    {
        if let Some(svc) = copy_as::<S, LocationService>(&service) {
            return svc;
        }
        let kind = match copy_as::<S, Router>(&service) {
            Some(router) => Kind::Router(router),
            None => Kind::Erased(Arc::new(Erased(service))),
        };
        LocationService { kind }
    }
}

impl From<Router> for LocationService {
    fn from(router: Router) -> Self {
        LocationService {
            kind: Kind::Router(router),
        }
    }
}

pin_project! {
    /// The future of a [`LocationService`]: the router's own, or an erased service's box.
    #[project = LocationFutureProj]
    pub struct LocationFuture {
        #[pin]
        inner: Inner,
    }
}

pin_project! {
    #[project = InnerProj]
    enum Inner {
        Route { #[pin] fut: RouteFuture },
        Boxed { fut: BoxFuture },
    }
}

impl std::fmt::Debug for LocationFuture {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("LocationFuture")
    }
}

impl Future for LocationFuture {
    type Output = Result<Response, Infallible>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project().inner.project() {
            InnerProj::Route { fut } => fut.poll(cx),
            InnerProj::Boxed { fut } => fut.as_mut().poll(cx),
        }
    }
}

impl tower_service::Service<Request> for LocationService {
    type Response = Response;
    type Error = Infallible;
    type Future = LocationFuture;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        // Both kinds are always ready: the router is, and an erased service is driven to
        // readiness inside its own call (a oneshot).
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request) -> LocationFuture {
        let inner = match &mut self.kind {
            Kind::Router(r) => Inner::Route {
                fut: tower_service::Service::call(r, req),
            },
            Kind::Erased(c) => Inner::Boxed { fut: c.call(req) },
        };
        LocationFuture { inner }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use http::StatusCode;

    use super::*;
    use crate::router::{Location, Pattern, Return, VirtualServer};

    fn router() -> Router {
        Router::builder()
            .server(VirtualServer::new([]).location(Location::new(
                Pattern::parse("/").unwrap(),
                Return::new(StatusCode::ACCEPTED),
            )))
            .build()
            .unwrap()
    }

    #[test]
    fn a_router_is_kept_as_itself_and_a_location_service_is_not_boxed_again() {
        assert!(matches!(
            LocationService::new(router()).kind,
            Kind::Router(_)
        ));
        let erased = LocationService::new(Return::new(StatusCode::OK));
        let Kind::Erased(first) = &erased.kind else {
            panic!("not erased")
        };
        let again = LocationService::new(erased.clone());
        let Kind::Erased(second) = &again.kind else {
            panic!("not erased")
        };
        assert!(Arc::ptr_eq(first, second));
        assert!(Arc::ptr_eq(first, &erase(erased.clone())));
    }

    #[tokio::test]
    async fn both_kinds_answer() {
        let req = || {
            http::Request::builder()
                .uri("/x")
                .header("host", "a")
                .body(Default::default())
                .unwrap()
        };
        let resp = LocationService::new(router()).oneshot(req()).await.unwrap();
        assert_eq!(resp.status(), StatusCode::ACCEPTED);
        let resp = LocationService::new(Return::new(StatusCode::GONE))
            .oneshot(req())
            .await
            .unwrap();
        assert_eq!(resp.status(), StatusCode::GONE);
    }
}
