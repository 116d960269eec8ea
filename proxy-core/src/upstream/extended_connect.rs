//! WebSockets over HTTP/2 (RFC 8441, extended CONNECT) to HTTP/1.1 upstreams.
//!
//! A browser that already holds an HTTP/2 connection to the proxy opens a WebSocket as a
//! stream of it: `CONNECT` with `:protocol = websocket`, answered by `200`, after which
//! the stream carries the WebSocket frames. Upstreams such as uvicorn speak WebSockets
//! only over HTTP/1.1, so the request is translated to the classic upgrade (`GET` with
//! `Connection: upgrade`, `Upgrade: websocket` and a fresh `Sec-WebSocket-Key`), the
//! upstream's `101` back to a `200`, and the two byte streams are joined by the same
//! tunnel as an HTTP/1.1 upgrade. WebSocket frames are identical in both, so nothing in
//! between is parsed.

use std::hash::{BuildHasher, Hasher};
use std::sync::atomic::{AtomicU64, Ordering};

use base64::Engine as _;
use http::header::{HeaderName, HeaderValue, CONNECTION, UPGRADE};
use http::{Method, StatusCode, Version};

use crate::body::{ProxyBody, Request, Response};
use crate::hop;

/// Sent to the upstream only: HTTP/2 WebSockets have no key (RFC 8441 §5).
const SEC_WEBSOCKET_KEY: HeaderName = HeaderName::from_static("sec-websocket-key");
/// The upstream's proof of the key, meaningless to an HTTP/2 client.
const SEC_WEBSOCKET_ACCEPT: HeaderName = HeaderName::from_static("sec-websocket-accept");

/// The `:protocol` of an HTTP/2 extended CONNECT, when the request is one.
pub(crate) fn protocol(req: &Request) -> Option<&str> {
    if req.version() != Version::HTTP_2 || req.method() != Method::CONNECT {
        return None;
    }
    req.extensions()
        .get::<hyper::ext::Protocol>()
        .map(hyper::ext::Protocol::as_str)
}

/// Turns an extended CONNECT for `protocol` into the HTTP/1.1 upgrade request an
/// upstream understands. The target (`:path`) and every end-to-end header are kept;
/// hop-by-hop headers must already be gone.
pub(crate) fn to_http1_upgrade(req: &mut Request, protocol: &str) {
    *req.method_mut() = Method::GET;
    let headers = req.headers_mut();
    headers.insert(CONNECTION, HeaderValue::from_static("upgrade"));
    let upgrade =
        HeaderValue::from_str(protocol).unwrap_or_else(|_| HeaderValue::from_static("websocket"));
    headers.insert(UPGRADE, upgrade);
    headers.insert(SEC_WEBSOCKET_KEY, fresh_key());
    req.extensions_mut().remove::<hyper::ext::Protocol>();
}

/// The HTTP/2 answer to an upstream's `101`: `200` with the upstream's end-to-end
/// headers (`Sec-WebSocket-Protocol`, `-Extensions`, cookies...), nothing of the
/// HTTP/1.1 handshake.
pub(crate) fn to_h2_response<B>(mut resp: http::Response<B>) -> Response {
    *resp.status_mut() = StatusCode::OK;
    let headers = resp.headers_mut();
    hop::strip(headers, false);
    headers.remove(SEC_WEBSOCKET_ACCEPT);
    resp.map(|_| ProxyBody::empty())
}

/// Whether an upstream's `101` accepted the protocol that was asked for.
pub(crate) fn accepted(resp: &http::Response<hyper::body::Incoming>, protocol: &str) -> bool {
    resp.headers()
        .get(UPGRADE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.trim().eq_ignore_ascii_case(protocol))
}

/// A `Sec-WebSocket-Key`: 16 unpredictable bytes, base64 (RFC 6455 §4.1). The key only
/// proves to the proxy that the upstream is a WebSocket server; std's randomly keyed
/// SipHash over a counter gives enough unpredictability without a random-number crate.
fn fresh_key() -> HeaderValue {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let state = std::hash::RandomState::new();
    let mut bytes = [0u8; 16];
    for (i, half) in bytes.chunks_exact_mut(8).enumerate() {
        let mut h = state.build_hasher();
        h.write_u64(n);
        h.write_usize(i);
        half.copy_from_slice(&h.finish().to_le_bytes());
    }
    let text = base64::engine::general_purpose::STANDARD.encode(bytes);
    // Base64 is always a valid header value.
    HeaderValue::from_str(&text)
        .unwrap_or_else(|_| HeaderValue::from_static("AAAAAAAAAAAAAAAAAAAAAA=="))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_sixteen_bytes_and_differ() {
        let a = fresh_key();
        let b = fresh_key();
        assert_ne!(a, b);
        let raw = base64::engine::general_purpose::STANDARD
            .decode(a.as_bytes())
            .unwrap();
        assert_eq!(raw.len(), 16);
    }

    #[test]
    fn only_http2_connect_with_a_protocol_is_extended() {
        let mut req = http::Request::builder()
            .method(Method::CONNECT)
            .version(Version::HTTP_2)
            .uri("https://h.test/ws?room=1")
            .body(ProxyBody::empty())
            .unwrap();
        assert_eq!(protocol(&req), None);
        req.extensions_mut()
            .insert(hyper::ext::Protocol::from_static("websocket"));
        assert_eq!(protocol(&req), Some("websocket"));
        *req.version_mut() = Version::HTTP_11;
        assert_eq!(protocol(&req), None);
    }

    #[test]
    fn translation_keeps_the_target_and_adds_the_handshake() {
        let mut req = http::Request::builder()
            .method(Method::CONNECT)
            .version(Version::HTTP_2)
            .uri("https://h.test/ws?room=1")
            .header("sec-websocket-version", "13")
            .header("sec-websocket-protocol", "chat")
            .body(ProxyBody::empty())
            .unwrap();
        to_http1_upgrade(&mut req, "websocket");
        assert_eq!(req.method(), Method::GET);
        assert_eq!(req.uri().path_and_query().unwrap(), "/ws?room=1");
        assert_eq!(req.headers()[CONNECTION], "upgrade");
        assert_eq!(req.headers()[UPGRADE], "websocket");
        assert!(req.headers().contains_key(SEC_WEBSOCKET_KEY));
        assert_eq!(req.headers()["sec-websocket-protocol"], "chat");

        let resp = http::Response::builder()
            .status(StatusCode::SWITCHING_PROTOCOLS)
            .header(CONNECTION, "upgrade")
            .header(UPGRADE, "websocket")
            .header(SEC_WEBSOCKET_ACCEPT, "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=")
            .header("sec-websocket-protocol", "chat")
            .body(ProxyBody::empty())
            .unwrap();
        let resp = to_h2_response(resp);
        assert_eq!(resp.status(), StatusCode::OK);
        assert!(!resp.headers().contains_key(CONNECTION));
        assert!(!resp.headers().contains_key(UPGRADE));
        assert!(!resp.headers().contains_key(SEC_WEBSOCKET_ACCEPT));
        assert_eq!(resp.headers()["sec-websocket-protocol"], "chat");
    }
}
