//! Keeping what is needed to send a request again on another server.
//!
//! A buffered or empty body is copied. A streamed body cannot be copied; it is lent to
//! the attempt through a [`Handoff`] and can be taken back only if the attempt never
//! read a frame of it (the connection to the server could not be made), so a streamed
//! body is never sent twice, as nginx's `proxy_request_buffering off` promises.

use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};

use crate::body::{ProxyBody, Request};
use crate::error::Error;

type Slot = Arc<Mutex<Option<ProxyBody>>>;

/// What an attempt keeps to retry with.
pub(crate) enum Spare {
    /// No retry possible.
    None,
    /// A full copy (empty or buffered body).
    Copy(Request),
    /// The head, and the streamed body if the attempt never reads it.
    Unsent(Request, Slot),
}

impl Spare {
    /// Prepare `req` for an attempt that may be followed by another: returns the
    /// request to send now and what to retry with.
    pub(crate) fn prepare(req: Request) -> (Request, Spare) {
        if let Some(copy) = replay(&req) {
            return (req, Spare::Copy(copy));
        }
        let head = copy_head(&req, ProxyBody::empty());
        let (parts, body) = req.into_parts();
        let slot: Slot = Arc::new(Mutex::new(Some(body)));
        let lent = ProxyBody::boxed(Handoff {
            slot: Arc::clone(&slot),
            body: None,
        });
        (Request::from_parts(parts, lent), Spare::Unsent(head, slot))
    }

    #[cfg(test)]
    pub(crate) fn is_copy(&self) -> bool {
        matches!(self, Spare::Copy(_))
    }

    /// The request to retry with. `connected`: the attempt got a connection, so a
    /// streamed body may have started; it is then never reclaimed.
    pub(crate) fn take(self, connected: bool) -> Option<Request> {
        match self {
            Spare::None => None,
            Spare::Copy(req) => Some(req),
            Spare::Unsent(_, _) if connected => None,
            Spare::Unsent(head, slot) => {
                let body = lock(&slot).take()?;
                Some(head.map(|_| body))
            }
        }
    }
}

/// A copy of `req` to send again, if its body can be replayed.
fn replay(req: &Request) -> Option<Request> {
    let body = if req.body().is_end_stream() {
        // Includes hyper's incoming body of a request without one.
        ProxyBody::empty()
    } else {
        req.body().try_clone()?
    };
    Some(copy_head(req, body))
}

fn copy_head(req: &Request, body: ProxyBody) -> Request {
    let mut copy = http::Request::new(body);
    *copy.method_mut() = req.method().clone();
    *copy.uri_mut() = req.uri().clone();
    *copy.version_mut() = req.version();
    *copy.headers_mut() = req.headers().clone();
    *copy.extensions_mut() = req.extensions().clone();
    copy
}

fn lock(slot: &Slot) -> std::sync::MutexGuard<'_, Option<ProxyBody>> {
    slot.lock().unwrap_or_else(PoisonError::into_inner)
}

/// A streamed body lent to one attempt: it takes the body out of the shared slot on
/// its first read, after which the body can no longer be reclaimed.
struct Handoff {
    slot: Slot,
    body: Option<ProxyBody>,
}

impl Body for Handoff {
    type Data = Bytes;
    type Error = Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Error>>> {
        let this = &mut *self;
        if this.body.is_none() {
            this.body = lock(&this.slot).take();
        }
        match &mut this.body {
            Some(body) => Pin::new(body).poll_frame(cx),
            None => Poll::Ready(None),
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.body {
            Some(body) => body.is_end_stream(),
            None => lock(&self.slot).as_ref().is_none_or(Body::is_end_stream),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.body {
            Some(body) => body.size_hint(),
            None => lock(&self.slot)
                .as_ref()
                .map_or_else(|| SizeHint::with_exact(0), Body::size_hint),
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use http_body_util::{BodyExt, StreamBody};

    fn streamed(data: &'static str) -> ProxyBody {
        let frames = [Ok::<_, Error>(Frame::data(Bytes::from_static(
            data.as_bytes(),
        )))];
        ProxyBody::boxed(StreamBody::new(futures_util::stream::iter(frames)))
    }

    #[tokio::test]
    async fn unread_streamed_body_is_reclaimed() {
        let req = http::Request::post("/x").body(streamed("abc")).unwrap();
        let (sent, spare) = Spare::prepare(req);
        assert!(!spare.is_copy());
        drop(sent); // the connection failed: the body was never read
        let again = spare.take(false).unwrap();
        assert_eq!(again.method(), http::Method::POST);
        let body = again.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(&body[..], b"abc");
    }

    #[tokio::test]
    async fn read_streamed_body_is_never_sent_twice() {
        let req = http::Request::post("/x").body(streamed("abc")).unwrap();
        let (sent, spare) = Spare::prepare(req);
        let body = sent.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(&body[..], b"abc");
        let Spare::Unsent(head, slot) = spare else {
            panic!("expected a lent body");
        };
        assert!(Spare::Unsent(head, slot).take(false).is_none());
    }

    #[test]
    fn buffered_body_is_copied() {
        let req = http::Request::put("/x")
            .body(ProxyBody::from("abc"))
            .unwrap();
        let (_, spare) = Spare::prepare(req);
        assert!(spare.is_copy());
        assert!(spare.take(true).is_some());
    }
}
