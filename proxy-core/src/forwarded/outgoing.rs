//! What the upstream sees: the forwarded headers rewritten per the layer's policies.

use std::fmt::Write as _;
use std::net::SocketAddr;

use bytes::{BufMut, Bytes, BytesMut};
use http::header::{HeaderMap, HeaderName, HeaderValue, CONNECTION, HOST};
use http::Uri;

use super::host::parse_host;
use super::layer::{Config, HeaderPolicy, XffPolicy};
use super::resolve::{
    Resolved, FORWARDED, X_FORWARDED_FOR, X_FORWARDED_HOST, X_FORWARDED_PORT, X_FORWARDED_PROTO,
    X_REAL_IP,
};
use super::rfc7239::{Element, Node};
use crate::client_info::Scheme;
use crate::hop::connection_tokens;

/// The connection facts the rewrite needs (copied out of `ClientInfo`, so the request's
/// headers can be borrowed mutably meanwhile).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Hop {
    pub(crate) peer: SocketAddr,
    pub(crate) local: SocketAddr,
    pub(crate) scheme: Scheme,
}

/// Rewrite the forwarded headers of a request that came from `info` and resolved to
/// `resolved`.
pub(crate) fn rewrite(
    config: &Config,
    info: Hop,
    resolved: &Resolved,
    request_host: Option<HeaderValue>,
    headers: &mut HeaderMap,
) {
    let peer_ip = info.peer.ip().to_canonical();
    let keep_chain = match config.xff {
        XffPolicy::ReplaceUntrusted | XffPolicy::ResolvedClient => resolved.peer_trusted,
        _ => true,
    };

    // The peer's and the client's addresses as text, shared between headers (they are
    // the same string unless a trusted proxy named another client).
    let peer_text = ip_bytes(peer_ip);
    let client_text = if resolved.client.ip == peer_ip {
        peer_text.clone()
    } else {
        ip_bytes(resolved.client.ip)
    };

    match config.xff {
        XffPolicy::Pass => {}
        XffPolicy::Remove => {
            headers.remove(&X_FORWARDED_FOR);
        }
        XffPolicy::ResolvedClient => set(headers, X_FORWARDED_FOR, value(client_text.clone())),
        XffPolicy::Append | XffPolicy::ReplaceUntrusted => {
            let list = append_to_list(headers, &X_FORWARDED_FOR, keep_chain, |buf| {
                buf.put_slice(&peer_text)
            })
            .unwrap_or_else(|| peer_text.clone());
            set(headers, X_FORWARDED_FOR, value(list));
        }
    }

    apply(headers, config.real_ip, X_REAL_IP, || value(client_text));
    apply(headers, config.proto, X_FORWARDED_PROTO, || {
        Some(HeaderValue::from_static(resolved.client.scheme.as_str()))
    });
    apply(headers, config.host, X_FORWARDED_HOST, || {
        resolved
            .client
            .host
            .clone()
            .or_else(|| request_host.clone())
    });
    apply(headers, config.port, X_FORWARDED_PORT, || {
        Some(HeaderValue::from(
            resolved.port.unwrap_or(info.local.port()),
        ))
    });
    if config.forwarded == HeaderPolicy::Set {
        let element = Element {
            for_: Some(Node::from(SocketAddr::new(peer_ip, info.peer.port()))),
            by: Some(Node::from(info.local)),
            host: request_host
                .as_ref()
                .and_then(|h| h.to_str().ok())
                .map(Into::into),
            proto: Some(info.scheme.as_str().into()),
        };
        let list = append_to_list(headers, &FORWARDED, keep_chain, |buf| {
            let _ = write!(buf, "{element}");
        });
        let list = list.unwrap_or_else(|| {
            let mut buf = BytesMut::new();
            let _ = write!(buf, "{element}");
            buf.freeze()
        });
        set(headers, FORWARDED, value(list));
    } else {
        apply(headers, config.forwarded, FORWARDED, || None);
    }

    protect_from_connection(config, headers);
}

/// Without a `ClientInfo` nothing can be vouched for: every header this layer would
/// set is removed instead, so a client cannot pass its own off as the proxy's.
pub(crate) fn remove_unvouched(config: &Config, headers: &mut HeaderMap) {
    if config.xff != XffPolicy::Pass {
        headers.remove(&X_FORWARDED_FOR);
    }
    for (policy, name) in [
        (config.real_ip, X_REAL_IP),
        (config.proto, X_FORWARDED_PROTO),
        (config.host, X_FORWARDED_HOST),
        (config.port, X_FORWARDED_PORT),
        (config.forwarded, FORWARDED),
    ] {
        if policy != HeaderPolicy::Pass {
            headers.remove(name);
        }
    }
}

/// A header value from bytes built here (shared, not copied).
fn value(bytes: Bytes) -> Option<HeaderValue> {
    HeaderValue::from_maybe_shared(bytes).ok()
}

fn ip_bytes(ip: std::net::IpAddr) -> Bytes {
    let mut buf = BytesMut::with_capacity(39);
    let _ = write!(buf, "{ip}");
    buf.freeze()
}

/// Set, remove or leave one header.
fn apply(
    headers: &mut HeaderMap,
    policy: HeaderPolicy,
    name: HeaderName,
    value: impl FnOnce() -> Option<HeaderValue>,
) {
    match policy {
        HeaderPolicy::Pass => {}
        HeaderPolicy::Remove => {
            headers.remove(name);
        }
        HeaderPolicy::Set => set(headers, name, value()),
    }
}

fn set(headers: &mut HeaderMap, name: HeaderName, value: Option<HeaderValue>) {
    match value {
        Some(v) => {
            headers.insert(name, v);
        }
        // Only values built from addresses and validated input reach here; a value that
        // is not a header value after all is dropped rather than sent half-made.
        None => {
            headers.remove(name);
        }
    }
}

/// The incoming lines of a list header joined with `, `, then `, ` and what `push`
/// writes; `None` when there is no incoming list to keep.
fn append_to_list(
    headers: &HeaderMap,
    name: &HeaderName,
    keep: bool,
    push: impl FnOnce(&mut BytesMut),
) -> Option<Bytes> {
    if !keep || !headers.contains_key(name) {
        return None;
    }
    let lines = headers.get_all(name);
    let len: usize = lines.iter().map(|v| v.len() + 2).sum();
    let mut buf = BytesMut::with_capacity(len + 64);
    for line in lines {
        let line = trim_list(line.as_bytes());
        if !line.is_empty() {
            buf.put_slice(line);
            buf.put_slice(b", ");
        }
    }
    push(&mut buf);
    Some(buf.freeze())
}

/// A list value without surrounding whitespace and trailing commas.
fn trim_list(mut v: &[u8]) -> &[u8] {
    while let [b' ' | b'\t' | b',', rest @ ..] = v {
        v = rest;
    }
    while let [rest @ .., b' ' | b'\t' | b','] = v {
        v = rest;
    }
    v
}

/// The host this hop received: `Host`, else the URI authority (HTTP/2), if it is one.
/// A clone of the `Host` value shares its bytes.
pub(crate) fn request_host(headers: &HeaderMap, uri: &Uri) -> Option<HeaderValue> {
    match headers.get(HOST) {
        Some(h) => parse_host(h.to_str().ok()?).map(|_| h.clone()),
        None => {
            let authority = uri.authority()?.as_str();
            parse_host(authority)?;
            HeaderValue::from_str(authority).ok()
        }
    }
}

/// A client could list `X-Forwarded-For` or `X-Real-IP` in `Connection`, and the
/// hop-by-hop strip before forwarding would then remove the headers this layer set:
/// the upstream would see the proxy as the client. Such tokens are dropped here.
/// Allocates only when a `Connection` line names one of these headers.
fn protect_from_connection(config: &Config, headers: &mut HeaderMap) {
    let ours = |t: &str| {
        let set = |p: HeaderPolicy| p == HeaderPolicy::Set;
        (t.eq_ignore_ascii_case(X_FORWARDED_FOR.as_str()) && config.xff != XffPolicy::Pass)
            || (t.eq_ignore_ascii_case(X_REAL_IP.as_str()) && set(config.real_ip))
            || (t.eq_ignore_ascii_case(X_FORWARDED_PROTO.as_str()) && set(config.proto))
            || (t.eq_ignore_ascii_case(X_FORWARDED_HOST.as_str()) && set(config.host))
            || (t.eq_ignore_ascii_case(X_FORWARDED_PORT.as_str()) && set(config.port))
            || (t.eq_ignore_ascii_case(FORWARDED.as_str()) && set(config.forwarded))
    };
    let names_ours = headers
        .get_all(CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .any(|v| connection_tokens(v).any(ours));
    if !names_ours {
        return;
    }
    let mut kept = String::new();
    for line in headers.get_all(CONNECTION) {
        let Ok(line) = line.to_str() else { continue };
        for token in connection_tokens(line).filter(|t| !ours(t)) {
            if !kept.is_empty() {
                kept.push_str(", ");
            }
            kept.push_str(token);
        }
    }
    headers.remove(CONNECTION);
    if let Ok(v) = HeaderValue::from_str(&kept) {
        if !kept.is_empty() {
            headers.insert(CONNECTION, v);
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // Tests may unwrap.
mod tests {
    use super::*;

    #[test]
    fn trims_lists() {
        assert_eq!(trim_list(b" , a, b ,, "), b"a, b");
        assert_eq!(trim_list(b" ,, "), b"");
    }
}
