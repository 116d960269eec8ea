//! [`ResponseFuture`]: ServeDir's future, its answer decorated and mapped into
//! [`ProxyBody`].

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use http::header::{ALLOW, CACHE_CONTROL, CONTENT_RANGE, EXPIRES};
use http::StatusCode;
use http_body::Body as _;
use pin_project_lite::pin_project;
use tower_http::services::fs::{
    DefaultServeDirFallback, ServeFileSystemResponseBody, ServeFileSystemResponseFuture,
};

use super::backend::is_outside_root;
use super::service::Shared;
use super::SkipAccessLog;
use crate::body::{ProxyBody, Response};
use crate::error::{Error, Kind};
use crate::response;

type ServeFuture = ServeFileSystemResponseFuture<ProxyBody, DefaultServeDirFallback>;

pin_project! {
    /// The future of [`StaticFiles`](super::StaticFiles) responses.
    pub struct ResponseFuture {
        #[pin]
        state: State,
    }
}

pin_project! {
    #[project = StateProj]
    enum State {
        Ready { resp: Option<Response> },
        Serving { #[pin] fut: ServeFuture, shared: Arc<Shared> },
    }
}

impl ResponseFuture {
    pub(crate) fn ready(resp: Response) -> Self {
        ResponseFuture {
            state: State::Ready { resp: Some(resp) },
        }
    }

    pub(crate) fn serving(fut: ServeFuture, shared: Arc<Shared>) -> Self {
        ResponseFuture {
            state: State::Serving { fut, shared },
        }
    }
}

impl std::fmt::Debug for ResponseFuture {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("static_files::ResponseFuture")
    }
}

impl Future for ResponseFuture {
    type Output = Result<Response, std::convert::Infallible>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project().state.project() {
            StateProj::Ready { resp } => Poll::Ready(Ok(resp
                .take()
                .unwrap_or_else(|| response::status(StatusCode::INTERNAL_SERVER_ERROR)))),
            StateProj::Serving { fut, shared } => {
                let resp = match ready!(fut.poll(cx)) {
                    Ok(resp) => decorate(finish(resp), shared),
                    Err(e) => {
                        let mut resp = from_io_error(e);
                        if !shared.access_log {
                            resp.extensions_mut().insert(SkipAccessLog);
                        }
                        resp
                    }
                };
                Poll::Ready(Ok(resp))
            }
        }
    }
}

/// Maps ServeDir's body into ours; its empty error answers get our short text body
/// (keeping `Allow` and `Content-Range`).
fn finish(resp: http::Response<ServeFileSystemResponseBody>) -> Response {
    let (mut parts, body) = resp.into_parts();
    // ServeDir's one redirect is a directory named without its trailing slash; nginx
    // answers that with 301.
    if parts.status == StatusCode::TEMPORARY_REDIRECT {
        parts.status = StatusCode::MOVED_PERMANENTLY;
    }
    let status = parts.status;
    if (status.is_client_error() || status.is_server_error()) && body.is_end_stream() {
        let mut out = response::status(status);
        for name in [ALLOW, CONTENT_RANGE] {
            if let Some(v) = parts.headers.get(&name) {
                out.headers_mut().insert(name, v.clone());
            }
        }
        return out;
    }
    let body = if body.is_end_stream() {
        ProxyBody::empty()
    } else {
        ProxyBody::boxed(body)
    };
    Response::from_parts(parts, body)
}

/// `expires`, `Cache-Control` and `access_log off`, as nginx applies them.
fn decorate(mut resp: Response, shared: &Shared) -> Response {
    // nginx's `expires` applies to these statuses only.
    let cacheable = matches!(
        resp.status().as_u16(),
        200 | 201 | 204 | 206 | 301 | 302 | 303 | 304 | 307 | 308
    );
    if cacheable {
        if let Some(cc) = &shared.cache_control {
            resp.headers_mut().insert(CACHE_CONTROL, cc.clone());
        }
        if let Some(v) = shared.expires.as_ref().and_then(|e| e.value()) {
            resp.headers_mut().insert(EXPIRES, v);
        }
    }
    if !shared.access_log {
        resp.extensions_mut().insert(SkipAccessLog);
    }
    resp
}

fn from_io_error(e: io::Error) -> Response {
    if is_outside_root(&e) {
        return response::status(StatusCode::FORBIDDEN);
    }
    // 20 is ENOTDIR: `/file.txt/more`.
    let not_found = matches!(
        e.kind(),
        io::ErrorKind::NotFound | io::ErrorKind::PermissionDenied
    ) || (cfg!(unix) && e.raw_os_error() == Some(20));
    if not_found {
        return response::status(StatusCode::NOT_FOUND);
    }
    if e.kind() == io::ErrorKind::InvalidInput {
        return response::status(StatusCode::BAD_REQUEST);
    }
    tracing::error!(error = %e, "static file read failed");
    response::from_error(Error::with_source(Kind::Internal, e))
}
