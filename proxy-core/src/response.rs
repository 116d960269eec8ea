//! Small, consistent error responses: a status with a short plain-text body.
//!
//! ```
//! let resp = proxy_core::response::status(http::StatusCode::BAD_GATEWAY);
//! assert_eq!(resp.status(), 502);
//! assert_eq!(resp.headers()["content-type"], "text/plain; charset=utf-8");
//! ```

use http::header::{HeaderValue, CONTENT_LENGTH, CONTENT_TYPE};
use http::StatusCode;

use crate::body::{ProxyBody, Response};
use crate::error::Error;

/// A response with `status` and a one-line body naming it, e.g. `502 Bad Gateway`.
pub fn status(status: StatusCode) -> Response {
    let text = match status.canonical_reason() {
        Some(reason) => format!("{} {}\n", status.as_str(), reason),
        None => format!("{}\n", status.as_str()),
    };
    let len = text.len();
    let mut resp = http::Response::new(ProxyBody::from(text));
    *resp.status_mut() = status;
    let headers = resp.headers_mut();
    headers.insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    headers.insert(CONTENT_LENGTH, HeaderValue::from(len));
    resp
}

/// The response a client gets for `err` (its [`Error::status`]); the error itself is put
/// in the response's extensions so an access log or error page layer can see it.
pub fn from_error(err: Error) -> Response {
    let mut resp = status(err.status());
    resp.extensions_mut()
        .insert(ErrorCause(std::sync::Arc::new(err)));
    resp
}

/// The error behind a proxy-generated error response, kept in its extensions.
#[derive(Debug, Clone)]
pub struct ErrorCause(pub std::sync::Arc<Error>);

/// A marker in a response's extensions: close the client connection without sending
/// anything (nginx's `return 444`). The server honours it; on HTTP/2 the stream is reset.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CloseConnection;

/// A response that makes the server close the connection with no bytes sent.
///
/// ```
/// let resp = proxy_core::response::close();
/// assert!(resp.extensions().get::<proxy_core::response::CloseConnection>().is_some());
/// ```
pub fn close() -> Response {
    let mut resp = http::Response::new(ProxyBody::empty());
    resp.extensions_mut().insert(CloseConnection);
    resp
}

/// A 400 that also closes the connection, as nginx does for a request it could not make
/// sense of: what follows on the connection cannot be trusted to be framed right.
///
/// ```
/// let resp = proxy_core::response::bad_request();
/// assert_eq!(resp.status(), 400);
/// assert_eq!(resp.headers()["connection"], "close");
/// ```
pub fn bad_request() -> Response {
    let mut resp = status(StatusCode::BAD_REQUEST);
    resp.headers_mut()
        .insert(http::header::CONNECTION, HeaderValue::from_static("close"));
    resp
}
