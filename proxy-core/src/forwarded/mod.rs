//! Forwarded headers and the real client address: `X-Forwarded-For`, `X-Real-IP`,
//! RFC 7239 `Forwarded`, trusted proxies, and the PROXY protocol.
//!
//! # Who the client is
//!
//! [`ForwardedLayer`] resolves every request's client into a
//! [`RealClient`](crate::client_info::RealClient) extension (address, port, scheme,
//! host), which rate limits and access logs read through
//! [`client_ip`](crate::client_info::client_ip):
//!
//! - The socket peer ([`ClientInfo::peer`](crate::client_info::ClientInfo)), unless the
//!   peer is in the [`TrustedProxies`] list (nginx's `set_real_ip_from`, uvicorn's
//!   `--forwarded-allow-ips`). An untrusted peer's headers are never read.
//! - From a trusted peer, the client comes from the configured [`ClientHeader`]: the
//!   list is walked from the right past trusted addresses (nginx's
//!   `real_ip_recursive on`, the default), or its last entry is taken (`off`). The
//!   scheme and host come from `X-Forwarded-Proto` / `X-Forwarded-Host` (or the
//!   `Forwarded` element's `proto=` / `host=`), again only from trusted peers.
//! - A malformed value from a trusted peer falls back to the socket peer (logged at
//!   debug level); nothing here ever answers with an error.
//!
//! # What the upstream sees
//!
//! Per header, set, pass or remove ([`XffPolicy`], [`HeaderPolicy`]), like nginx's
//! `proxy_set_header` lines. The defaults are the usual nginx block, so uvicorn with
//! `--proxy-headers --forwarded-allow-ips=<this proxy>` sees the right client and
//! scheme with no extra line:
//!
//! ```text
//! X-Forwarded-For:   <incoming list>, <socket peer>     ($proxy_add_x_forwarded_for)
//! X-Real-IP:         <resolved client>
//! X-Forwarded-Proto: <resolved scheme: https on TLS listeners>
//! X-Forwarded-Host:  <resolved host>
//! X-Forwarded-Port:  <port the client connected to>
//! ```
//!
//! ```
//! use proxy_core::client_info::{client_ip, ClientInfo, Scheme};
//! use proxy_core::forwarded::{ForwardedLayer, TrustedProxies};
//! use tower::{service_fn, ServiceBuilder, ServiceExt};
//! # tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(async {
//! let svc = ServiceBuilder::new()
//!     .layer(ForwardedLayer::new().trusted("10.0.0.0/8".parse().unwrap()))
//!     .service(service_fn(|req: http::Request<()>| async move {
//!         // What the next layer (or the upstream) gets.
//!         assert_eq!(client_ip(&req), Some("203.0.113.7".parse().unwrap()));
//!         assert_eq!(req.headers()["x-forwarded-for"], "203.0.113.7, 10.0.0.2");
//!         assert_eq!(req.headers()["x-real-ip"], "203.0.113.7");
//!         assert_eq!(req.headers()["x-forwarded-proto"], "https");
//!         Ok::<_, std::convert::Infallible>(http::Response::new(()))
//!     }));
//!
//! let mut req = http::Request::new(());
//! req.headers_mut().insert("x-forwarded-for", "203.0.113.7".parse().unwrap());
//! req.headers_mut().insert("x-forwarded-proto", "https".parse().unwrap());
//! req.extensions_mut().insert(ClientInfo::new(
//!     "10.0.0.2:51000".parse().unwrap(), // a trusted load balancer
//!     "10.0.0.1:80".parse().unwrap(),
//!     Scheme::Http,
//! ));
//! svc.oneshot(req).await.unwrap();
//! # });
//! ```
//!
//! # PROXY protocol
//!
//! [`ProxyProtocol`] wraps a listener's [`Accept`](crate::server::Accept) and reads a
//! v1 or v2 header from trusted sources before TLS or HTTP; [`proxy_protocol`] parses
//! and writes headers. [`proxy_protocol::write_v2`] makes the header for sending to an
//! upstream; the pooled upstream client does not send it yet (a pooled connection
//! serves many clients, so it would need a connection per client address).
//!
//! # Parsers
//!
//! [`parse_xff_addr`], [`parse_forwarded`], [`parse_host`], [`parse_cidr_list`] and
//! [`proxy_protocol::parse`] are strict, linear, never panic, and allocate at most in
//! proportion to their input (`parse_forwarded` only to unescape).

mod acceptor;
mod cidr;
mod host;
mod layer;
mod outgoing;
pub mod proxy_protocol;
mod resolve;
mod rfc7239;
mod xff;

pub use acceptor::{read_header, ProxyProtocol, Untrusted};
pub use cidr::{parse_cidr, parse_cidr_list, CidrError, TrustedProxies};
pub use host::parse_host;
pub use layer::{ClientHeader, Forwarded, ForwardedLayer, HeaderPolicy, ResponseFuture, XffPolicy};
pub use rfc7239::{
    parse_forwarded, parse_node, Element, Elements, Malformed, Node, NodeName, NodePort,
};
pub use xff::{parse_xff_addr, xff_entries};

use crate::client_info::ClientInfo;

/// The user guide in `docs/forwarded.md`, compiled here so its example is tested.
#[cfg(doctest)]
#[doc = include_str!("../../../docs/forwarded.md")]
pub struct ReadmeDoctests;

/// Resolve the client of `req` and rewrite its forwarded headers.
fn apply<B>(config: &layer::Config, req: &mut http::Request<B>) {
    let Some(info) = req.extensions().get::<ClientInfo>() else {
        tracing::debug!("request without ClientInfo: forwarded headers removed, no RealClient");
        outgoing::remove_unvouched(config, req.headers_mut());
        return;
    };
    let hop = outgoing::Hop {
        peer: info.peer,
        local: info.local,
        scheme: info.scheme,
    };
    let resolved = resolve::resolve(config, info, req.headers());
    let request_host = outgoing::request_host(req.headers(), req.uri());
    outgoing::rewrite(config, hop, &resolved, request_host, req.headers_mut());
    req.extensions_mut().insert(resolved.client);
}

/// Decimal digits only (no sign, no space), at most `max_digits` of them.
fn parse_decimal(s: &[u8], max_digits: usize) -> Option<u32> {
    if s.is_empty() || s.len() > max_digits {
        return None;
    }
    s.iter().try_fold(0u32, |n, &c| {
        c.is_ascii_digit().then(|| n * 10 + u32::from(c - b'0'))
    })
}

/// Fuzz entry point: `X-Forwarded-For` lists.
#[doc(hidden)]
pub fn fuzz_xff(data: &[u8]) {
    if let Ok(s) = std::str::from_utf8(data) {
        for entry in xff_entries(s).rev() {
            let _ = parse_xff_addr(entry);
        }
    }
}

/// Fuzz entry point: RFC 7239 `Forwarded`; what parses must format and parse again to
/// the same elements.
#[doc(hidden)]
pub fn fuzz_forwarded(data: &[u8]) {
    let Ok(s) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(elements) = parse_forwarded(s).collect::<Result<Vec<_>, _>>() else {
        return;
    };
    let elements: Vec<_> = elements
        .into_iter()
        .filter(|e| *e != Element::default())
        .collect();
    let text = elements
        .iter()
        .map(|e| e.to_string())
        .collect::<Vec<_>>()
        .join(", ");
    let again: Result<Vec<_>, _> = parse_forwarded(&text).collect();
    assert_eq!(again, Ok(elements), "format/parse round trip of {s:?}");
}

/// Fuzz entry point: `Connection` tokens (the parser lives in [`crate::hop`]).
#[doc(hidden)]
pub fn fuzz_connection(data: &[u8]) {
    if let Ok(s) = std::str::from_utf8(data) {
        for token in crate::hop::connection_tokens(s) {
            assert!(!token.is_empty() && !token.contains(','));
        }
    }
}

/// Fuzz entry point: `Host` values.
#[doc(hidden)]
pub fn fuzz_host(data: &[u8]) {
    if let Ok(s) = std::str::from_utf8(data) {
        if let Some((host, _)) = parse_host(s) {
            assert!(s.starts_with(host));
        }
    }
}

/// Fuzz entry point: CIDR lists.
#[doc(hidden)]
pub fn fuzz_cidr(data: &[u8]) {
    if let Ok(s) = std::str::from_utf8(data) {
        let _ = parse_cidr_list(s);
    }
}

/// Fuzz entry point: PROXY protocol v1/v2 headers; a parsed header never claims more
/// bytes than it was given.
#[doc(hidden)]
pub fn fuzz_proxy_protocol(data: &[u8]) {
    if let Ok((_, len)) = proxy_protocol::parse(data) {
        assert!(len <= data.len());
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // Tests may unwrap.
mod tests {
    use super::*;

    #[test]
    fn decimal() {
        assert_eq!(parse_decimal(b"0", 5), Some(0));
        assert_eq!(parse_decimal(b"65535", 5), Some(65535));
        assert_eq!(parse_decimal(b"99999", 5), Some(99999));
        assert_eq!(parse_decimal(b"123456", 5), None);
        assert_eq!(parse_decimal(b"", 5), None);
        assert_eq!(parse_decimal(b"+1", 5), None);
        assert_eq!(parse_decimal(b"1 ", 5), None);
    }

    #[test]
    fn fuzz_entry_points_take_anything() {
        let inputs: [&[u8]; 6] = [
            b"",
            b"\xff\xfe",
            b"for=\"[::1]:80\";proto=https, for=_x",
            b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\r\n",
            b"\r\n\r\n\0\r\nQUIT\n\x21\x11\x00\x0c",
            b"10.0.0.0/8, [::1]:80, a, b",
        ];
        for data in inputs {
            fuzz_xff(data);
            fuzz_forwarded(data);
            fuzz_connection(data);
            fuzz_host(data);
            fuzz_cidr(data);
            fuzz_proxy_protocol(data);
        }
    }
}
