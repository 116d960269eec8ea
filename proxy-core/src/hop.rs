//! Hop-by-hop header removal (RFC 9110 §7.6.1).
//!
//! A proxy must not forward `Connection`, the headers that any `Connection` line names,
//! nor the well-known hop-by-hop headers: `Keep-Alive`, `Proxy-Connection`, `TE`,
//! `Trailer`, `Transfer-Encoding`, `Upgrade` (kept only while an upgrade is proxied, see
//! [`strip`]'s `keep_upgrade`).
//!
//! ```
//! use http::HeaderMap;
//! let mut h = HeaderMap::new();
//! h.insert("connection", "close, x-secret".parse().unwrap());
//! h.append("connection", "x-other".parse().unwrap());
//! h.insert("x-secret", "1".parse().unwrap());
//! h.insert("x-other", "1".parse().unwrap());
//! h.insert("keep-alive", "timeout=5".parse().unwrap());
//! h.insert("x-kept", "1".parse().unwrap());
//! proxy_core::hop::strip(&mut h, false);
//! assert_eq!(h.len(), 1);
//! assert!(h.contains_key("x-kept"));
//! ```

use http::header::{
    Entry, HeaderMap, HeaderName, CONNECTION, TE, TRAILER, TRANSFER_ENCODING, UPGRADE,
};

/// The hop-by-hop headers that are always removed, besides those `Connection` names.
const ALWAYS: [&str; 2] = ["keep-alive", "proxy-connection"];

// One bit per fixed hop-by-hop header, for the single pass over the names in `strip`.
const B_CONNECTION: u8 = 1;
const B_KEEP_ALIVE: u8 = 1 << 1;
const B_PROXY_CONNECTION: u8 = 1 << 2;
const B_TE: u8 = 1 << 3;
const B_TRAILER: u8 = 1 << 4;
const B_TRANSFER_ENCODING: u8 = 1 << 5;
const B_UPGRADE: u8 = 1 << 6;

/// Remove every hop-by-hop header from `headers`. With `keep_upgrade`, `Upgrade` and a
/// `Connection: upgrade` survive (the caller is proxying an upgrade).
pub fn strip(headers: &mut HeaderMap, keep_upgrade: bool) {
    // One pass over the names (compares, no hashing) finds which fixed hop-by-hop headers
    // are present; only those are removed, each removal hashing its name once. Most
    // messages carry none or only `Connection`, where this is several times cheaper
    // than trying all eight removals.
    let found = headers.keys().fold(0, |acc, name| acc | hop_bit(name));
    if found == 0 {
        return;
    }
    // One lookup of `Connection` for reading its lines and removing them. (`try_entry`
    // fails only past `HeaderMap`'s maximum size; `found` says the header is there.)
    let connection = match found & B_CONNECTION {
        0 => None,
        _ => headers.try_entry(CONNECTION).ok(),
    };
    if let Some(Entry::Occupied(lines)) = connection {
        let mut named: Vec<HeaderName> = Vec::new();
        for value in lines.iter() {
            let Ok(value) = value.to_str() else { continue };
            for token in connection_tokens(value) {
                if keep_upgrade && token.eq_ignore_ascii_case("upgrade") {
                    continue;
                }
                // `close` names no header; the fixed ones are handled by their bits below.
                if token.eq_ignore_ascii_case("close") || fixed_hop_token(token) {
                    continue;
                }
                if let Ok(name) = HeaderName::from_bytes(token.as_bytes()) {
                    named.push(name);
                }
            }
        }
        lines.remove();
        for name in named {
            headers.remove(name);
        }
    }
    if found & B_KEEP_ALIVE != 0 {
        headers.remove(ALWAYS[0]);
    }
    if found & B_PROXY_CONNECTION != 0 {
        headers.remove(ALWAYS[1]);
    }
    if found & B_TE != 0 {
        headers.remove(TE);
    }
    if found & B_TRAILER != 0 {
        headers.remove(TRAILER);
    }
    if found & B_TRANSFER_ENCODING != 0 {
        headers.remove(TRANSFER_ENCODING);
    }
    if keep_upgrade {
        if found & B_UPGRADE != 0 {
            headers.insert(CONNECTION, http::HeaderValue::from_static("upgrade"));
        }
    } else if found & B_UPGRADE != 0 {
        headers.remove(UPGRADE);
    }
}

/// The bit of `name` if it is one of the fixed hop-by-hop headers, else 0.
///
/// By length first (names are stored in lower case): most names are ruled out by that
/// one comparison, and the rest by one comparison of their bytes with a constant, where
/// comparing `HeaderName`s one by one cost seven comparisons for every name.
fn hop_bit(name: &HeaderName) -> u8 {
    let s = name.as_str().as_bytes();
    match s {
        b"te" => B_TE,
        b"trailer" => B_TRAILER,
        b"upgrade" => B_UPGRADE,
        b"connection" => B_CONNECTION,
        b"keep-alive" => B_KEEP_ALIVE,
        b"proxy-connection" => B_PROXY_CONNECTION,
        b"transfer-encoding" => B_TRANSFER_ENCODING,
        _ => 0,
    }
}

/// Whether a `Connection` token names one of the fixed hop-by-hop headers.
fn fixed_hop_token(token: &str) -> bool {
    [
        "connection",
        ALWAYS[0],
        ALWAYS[1],
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
    ]
    .iter()
    .any(|h| token.eq_ignore_ascii_case(h))
}

/// The comma-separated tokens of one `Connection` header value, trimmed, empty ones
/// skipped. Linear, allocation-free.
pub fn connection_tokens(value: &str) -> impl Iterator<Item = &str> {
    value
        .split(',')
        .map(|t| t.trim_matches([' ', '\t']))
        .filter(|t| !t.is_empty())
}

/// Whether any `Connection` line of `headers` lists `token` (case-insensitive).
pub fn connection_has(headers: &HeaderMap, token: &str) -> bool {
    headers
        .get_all(CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .any(|v| connection_tokens(v).any(|t| t.eq_ignore_ascii_case(token)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_upgrade_when_asked() {
        let mut h = HeaderMap::new();
        h.insert(CONNECTION, "Upgrade".parse().unwrap());
        h.insert(UPGRADE, "websocket".parse().unwrap());
        strip(&mut h, true);
        assert_eq!(h[UPGRADE], "websocket");
        assert_eq!(h[CONNECTION], "upgrade");
    }

    #[test]
    fn removes_upgrade_otherwise() {
        let mut h = HeaderMap::new();
        h.insert(CONNECTION, "Upgrade".parse().unwrap());
        h.insert(UPGRADE, "h2c".parse().unwrap());
        strip(&mut h, false);
        assert!(h.is_empty());
    }

    #[test]
    fn tokens_are_trimmed() {
        let t: Vec<_> = connection_tokens(" a ,\tb,, c").collect();
        assert_eq!(t, ["a", "b", "c"]);
    }

    /// The definition, written the slow way: what `strip` must keep.
    fn reference(headers: &HeaderMap, keep_upgrade: bool) -> HeaderMap {
        let mut named: Vec<String> = Vec::new();
        for v in headers.get_all(CONNECTION) {
            if let Ok(v) = v.to_str() {
                named.extend(connection_tokens(v).map(|t| t.to_ascii_lowercase()));
            }
        }
        let mut out = HeaderMap::new();
        for (name, value) in headers {
            let n = name.as_str();
            let upgrade_kept = keep_upgrade && n == "upgrade";
            let hop = n == "connection"
                || ALWAYS.contains(&n)
                || ["te", "trailer", "transfer-encoding", "upgrade"].contains(&n)
                || named.iter().any(|t| t == n);
            if !hop || upgrade_kept {
                out.append(name.clone(), value.clone());
            }
        }
        if keep_upgrade && out.contains_key(UPGRADE) {
            out.insert(CONNECTION, http::HeaderValue::from_static("upgrade"));
        }
        out
    }

    proptest::proptest! {
        #[test]
        fn matches_the_definition(
            headers in proptest::collection::vec((
                proptest::sample::select(vec![
                    "connection", "keep-alive", "proxy-connection", "te", "trailer",
                    "transfer-encoding", "upgrade", "x-a", "x-b", "host", "accept",
                ]),
                proptest::sample::select(vec![
                    "close", "keep-alive", "Upgrade", "x-a", "X-B, te", "x-a, , upgrade", "1",
                ]),
            ), 0..8),
            keep_upgrade: bool,
        ) {
            let mut h = HeaderMap::new();
            for (n, v) in headers {
                h.append(n, http::HeaderValue::from_static(v));
            }
            let want = reference(&h, keep_upgrade);
            strip(&mut h, keep_upgrade);
            proptest::prop_assert_eq!(h, want);
        }

        #[test]
        fn never_panics(v in "\\PC*") {
            let mut h = HeaderMap::new();
            if let Ok(v) = http::HeaderValue::from_str(&v) {
                h.insert(CONNECTION, v);
            }
            strip(&mut h, false);
            proptest::prop_assert!(!h.contains_key(CONNECTION));
        }
    }
}
