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
    resp.extensions_mut().insert(ErrorCause(std::sync::Arc::new(err)));
    resp
}

/// The error behind a proxy-generated error response, kept in its extensions.
#[derive(Debug, Clone)]
pub struct ErrorCause(pub std::sync::Arc<Error>);
