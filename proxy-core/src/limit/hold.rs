//! What a `limit_req` layer does with a request once it has decided: pass it on, answer
//! for it, or hold it and then pass it on. Shared by the local limiter
//! ([`LimitReq`](super::LimitReq)) and the Redis-backed one, which only differ in how
//! they decide.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use http::header::{HeaderValue, RETRY_AFTER};
use http::StatusCode;
use pin_project_lite::pin_project;
use tokio::time::Sleep;
use tower_service::Service;

use super::req::{LimitReqStatus, RejectedBy};
use crate::body::{Request, Response};

/// The answer to a request over its burst: `status` with a `Retry-After` in whole
/// seconds (at least one), tagged with the zone for metrics and access logs.
pub(crate) fn rejection(status: StatusCode, retry_after: Duration, zone: &str) -> Response {
    let mut resp = crate::response::status(status);
    let secs = retry_after.as_millis().div_ceil(1000).max(1);
    resp.headers_mut().insert(
        RETRY_AFTER,
        HeaderValue::from(u64::try_from(secs).unwrap_or(u64::MAX)),
    );
    resp.extensions_mut().insert(LimitReqStatus::Rejected);
    resp.extensions_mut().insert(RejectedBy {
        zone: zone.to_owned(),
    });
    resp
}

/// Takes the service `poll_ready` readied out of `slot`, leaving a clone in its place, so
/// that it can be called later (after a delay, or after a remote decision). Calling it
/// only then keeps the work done in `call` (an upstream pick, a connection count) at the
/// time the request really leaves.
pub(crate) fn take_ready<S: Clone>(slot: &mut S) -> S {
    let clone = slot.clone();
    std::mem::replace(slot, clone)
}

pin_project! {
    /// The future of a decided request.
    pub(crate) struct Hold<S>
    where
        S: Service<Request>,
    {
        #[pin]
        state: State<S, S::Future>,
    }
}

pin_project! {
    #[project = StateProj]
    enum State<S, F> {
        Call { #[pin] fut: F },
        Limited { resp: Option<Response> },
        Delayed { #[pin] sleep: Sleep, svc: Option<S>, req: Option<Request> },
    }
}

impl<S: Service<Request>> Hold<S> {
    /// Passed on: `fut` is the inner service's answer.
    pub(crate) fn call(fut: S::Future) -> Self {
        Hold {
            state: State::Call { fut },
        }
    }

    /// Answered by the limiter itself.
    pub(crate) fn limited(resp: Response) -> Self {
        Hold {
            state: State::Limited { resp: Some(resp) },
        }
    }

    /// Held for `delay`, then given to `svc` (a service readied by `poll_ready`, see
    /// [`take_ready`]).
    pub(crate) fn delayed(svc: S, req: Request, delay: Duration) -> Self {
        Hold {
            state: State::Delayed {
                sleep: tokio::time::sleep(delay),
                svc: Some(svc),
                req: Some(req),
            },
        }
    }

    /// The state's name, for `Debug`.
    pub(crate) fn name(&self) -> &'static str {
        match self.state {
            State::Call { .. } => "call",
            State::Limited { .. } => "limited",
            State::Delayed { .. } => "delayed",
        }
    }
}

impl<S> Future for Hold<S>
where
    S: Service<Request, Response = Response>,
{
    type Output = Result<Response, S::Error>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        loop {
            let mut this = self.as_mut().project();
            let fut = match this.state.as_mut().project() {
                StateProj::Call { fut } => return fut.poll(cx),
                StateProj::Limited { resp } => {
                    // Polled again after completion: answer rather than panic.
                    let resp = resp.take().unwrap_or_else(|| {
                        crate::response::status(StatusCode::INTERNAL_SERVER_ERROR)
                    });
                    return Poll::Ready(Ok(resp));
                }
                StateProj::Delayed { sleep, svc, req } => {
                    ready!(sleep.poll(cx));
                    // The delay may have outlasted the readiness `poll_ready` gave.
                    if let Some(s) = svc.as_mut() {
                        ready!(s.poll_ready(cx))?;
                    }
                    match (svc.take(), req.take()) {
                        (Some(mut s), Some(r)) => s.call(r),
                        _ => {
                            let resp = crate::response::status(StatusCode::INTERNAL_SERVER_ERROR);
                            return Poll::Ready(Ok(resp));
                        }
                    }
                }
            };
            this.state.set(State::Call { fut });
        }
    }
}

impl<S: Service<Request>> fmt::Debug for Hold<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}
