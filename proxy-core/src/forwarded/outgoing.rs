//! What the upstream sees: the forwarded headers rewritten per the layer's policies.

use std::fmt::Write as _;
use std::net::{IpAddr, SocketAddr};

use bytes::{BufMut, Bytes, BytesMut};
use http::header::{Entry, HeaderMap, HeaderName, HeaderValue, CONNECTION, HOST};
use http::Uri;

use super::host::{is_host, parse_host};
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

    // The peer's and the client's addresses and the port as text, in one shared buffer
    // (one allocation for every header value built from them).
    let Texts {
        peer: peer_text,
        client: client_text,
        port: port_text,
    } = Texts::new(
        peer_ip,
        resolved.client.ip,
        resolved.port.unwrap_or(info.local.port()),
    );

    match config.xff {
        XffPolicy::Pass => {}
        XffPolicy::Remove => {
            headers.remove(&X_FORWARDED_FOR);
        }
        XffPolicy::ResolvedClient => set(headers, X_FORWARDED_FOR, value(client_text.clone())),
        XffPolicy::Append | XffPolicy::ReplaceUntrusted => append_to_list(
            headers,
            X_FORWARDED_FOR,
            keep_chain,
            |buf| buf.put_slice(&peer_text),
            Some(peer_text.clone()),
        ),
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
    apply(headers, config.port, X_FORWARDED_PORT, || value(port_text));
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
        append_to_list(
            headers,
            FORWARDED,
            keep_chain,
            |buf| {
                let _ = write!(buf, "{element}");
            },
            None,
        );
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

/// The texts the forwarded headers are made of, slices of one buffer.
struct Texts {
    peer: Bytes,
    client: Bytes,
    port: Bytes,
}

/// Longest text of an address (`ffff:ffff:ffff:ffff:ffff:ffff:255.255.255.255`).
const IP_TEXT_MAX: usize = 45;

impl Texts {
    /// `peer`, `client` (shared with `peer` when equal) and `port` as text. Written on the
    /// stack and moved into one allocation; IPv4 addresses without `fmt`, which costs
    /// about a thousand instructions per address.
    fn new(peer: IpAddr, client: IpAddr, port: u16) -> Texts {
        let mut buf = [0u8; 2 * IP_TEXT_MAX + 5];
        let peer_end = write_ip(&mut buf, 0, peer);
        let client_end = if client == peer {
            peer_end
        } else {
            write_ip(&mut buf, peer_end, client)
        };
        let port_end = write_decimal(&mut buf, client_end, port);
        let all = Bytes::from_owner(buf);
        let client_start = if client == peer { 0 } else { peer_end };
        Texts {
            peer: all.slice(..peer_end),
            client: all.slice(client_start..client_end),
            port: all.slice(client_end..port_end),
        }
    }
}

/// Write `ip` at `buf[at..]`; returns where it ends. `buf` has room for
/// [`IP_TEXT_MAX`] bytes from `at`.
fn write_ip(buf: &mut [u8], at: usize, ip: IpAddr) -> usize {
    match ip {
        IpAddr::V4(v4) => {
            let mut end = at;
            for (i, octet) in v4.octets().into_iter().enumerate() {
                if i > 0 {
                    if let Some(b) = buf.get_mut(end) {
                        *b = b'.';
                    }
                    end += 1;
                }
                end = write_decimal(buf, end, u16::from(octet));
            }
            end
        }
        IpAddr::V6(v6) => {
            let mut cursor = Cursor { buf, at };
            let _ = write!(cursor, "{v6}");
            cursor.at
        }
    }
}

/// Write `n` in decimal at `buf[at..]`; returns where it ends (bytes that do not fit are
/// not written; callers size `buf` so that all do).
fn write_decimal(buf: &mut [u8], at: usize, n: u16) -> usize {
    let mut digits = [0u8; 5];
    let mut len = 0;
    let mut rest = n;
    loop {
        if let Some(d) = digits.get_mut(len) {
            // `rest % 10` is below 10.
            *d = b'0' + (rest % 10) as u8;
        }
        len += 1;
        rest /= 10;
        if rest == 0 {
            break;
        }
    }
    for (i, d) in digits.iter().take(len).rev().enumerate() {
        if let Some(b) = buf.get_mut(at + i) {
            *b = *d;
        }
    }
    at + len
}

/// `fmt::Write` into a byte slice from `at` (what does not fit is an error).
struct Cursor<'a> {
    buf: &'a mut [u8],
    at: usize,
}

impl std::fmt::Write for Cursor<'_> {
    fn write_str(&mut self, s: &str) -> std::fmt::Result {
        let end = self.at + s.len();
        let dst = self.buf.get_mut(self.at..end).ok_or(std::fmt::Error)?;
        dst.copy_from_slice(s.as_bytes());
        self.at = end;
        Ok(())
    }
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

/// Set the list header `name` to its incoming lines joined with `, `, then `, ` and
/// what `push` writes; when there is no incoming list to keep (`keep` false, or no such
/// header), to `alone`, or to what `push` writes alone. One lookup of the name for
/// reading and replacing the lines.
fn append_to_list(
    headers: &mut HeaderMap,
    name: HeaderName,
    keep: bool,
    push: impl FnOnce(&mut BytesMut),
    alone: Option<Bytes>,
) {
    // Only fails past `HeaderMap`'s maximum size, which a request parsed by hyper is far
    // from; nothing is set then.
    let Ok(entry) = headers.try_entry(name) else {
        return;
    };
    match entry {
        Entry::Occupied(mut lines) => {
            let list = if keep {
                let len: usize = lines.iter().map(|v| v.len() + 2).sum();
                let mut buf = BytesMut::with_capacity(len + 64);
                for line in lines.iter() {
                    let line = trim_list(line.as_bytes());
                    if !line.is_empty() {
                        buf.put_slice(line);
                        buf.put_slice(b", ");
                    }
                }
                push(&mut buf);
                buf.freeze()
            } else {
                alone_or(alone, push)
            };
            match value(list) {
                // Replaces every incoming line.
                Some(v) => {
                    lines.insert(v);
                }
                None => {
                    lines.remove();
                }
            }
        }
        Entry::Vacant(slot) => {
            if let Some(v) = value(alone_or(alone, push)) {
                slot.insert(v);
            }
        }
    }
}

/// `alone`, or what `push` writes into a new buffer.
fn alone_or(alone: Option<Bytes>, push: impl FnOnce(&mut BytesMut)) -> Bytes {
    alone.unwrap_or_else(|| {
        let mut buf = BytesMut::new();
        push(&mut buf);
        buf.freeze()
    })
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
        // One pass over the bytes: this runs for every proxied request.
        Some(h) => is_host(h.as_bytes()).then(|| h.clone()),
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
    fn texts_of_addresses_and_ports() {
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        for (peer, client, port) in [
            ("0.0.0.0", "0.0.0.0", 0),
            ("127.0.0.1", "127.0.0.1", 80),
            ("255.255.255.255", "10.0.0.1", 65535),
            ("10.20.3.4", "::1", 8080),
            (
                "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff",
                "::ffff:255.255.255.255",
                9,
            ),
            ("2001:db8::1", "2001:db8::1", 443),
        ] {
            let t = Texts::new(ip(peer), ip(client), port);
            assert_eq!(t.peer, ip(peer).to_string().as_bytes());
            assert_eq!(t.client, ip(client).to_string().as_bytes());
            assert_eq!(t.port, port.to_string().as_bytes());
        }
    }

    proptest::proptest! {
        #[test]
        fn texts_match_display(a: u32, b: [u16; 8], port: u16) {
            let v4 = IpAddr::from(std::net::Ipv4Addr::from(a));
            let v6 = IpAddr::from(std::net::Ipv6Addr::from(b));
            let t = Texts::new(v4, v6, port);
            proptest::prop_assert_eq!(&t.peer[..], v4.to_string().as_bytes().to_vec());
            proptest::prop_assert_eq!(&t.client[..], v6.to_string().as_bytes().to_vec());
            proptest::prop_assert_eq!(&t.port[..], port.to_string().as_bytes().to_vec());
        }
    }

    #[test]
    fn trims_lists() {
        assert_eq!(trim_list(b" , a, b ,, "), b"a, b");
        assert_eq!(trim_list(b" ,, "), b"");
    }
}
