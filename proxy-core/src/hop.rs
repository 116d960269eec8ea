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

use http::header::{HeaderMap, HeaderName, CONNECTION, TE, TRAILER, TRANSFER_ENCODING, UPGRADE};

/// The hop-by-hop headers that are always removed, besides those `Connection` names.
const ALWAYS: [&str; 2] = ["keep-alive", "proxy-connection"];

/// Remove every hop-by-hop header from `headers`. With `keep_upgrade`, `Upgrade` and a
/// `Connection: upgrade` survive (the caller is proxying an upgrade).
pub fn strip(headers: &mut HeaderMap, keep_upgrade: bool) {
    // Most messages carry no hop-by-hop header at all. One pass over the names (pointer
    // and length compares, no hashing) is far cheaper than the eight removals below,
    // each of which hashes its name; the removals run only when one is present.
    if !headers.keys().any(is_hop_by_hop) {
        return;
    }
    // Collect the names every Connection line lists before removing anything. The common
    // case (no Connection header at all, or only close/keep-alive) allocates nothing.
    if headers.contains_key(CONNECTION) {
        let mut named: Vec<HeaderName> = Vec::new();
        for value in headers.get_all(CONNECTION) {
            let Ok(value) = value.to_str() else { continue };
            for token in connection_tokens(value) {
                if keep_upgrade && token.eq_ignore_ascii_case("upgrade") {
                    continue;
                }
                if let Ok(name) = HeaderName::from_bytes(token.as_bytes()) {
                    named.push(name);
                }
            }
        }
        headers.remove(CONNECTION);
        for name in named {
            headers.remove(name);
        }
    }
    for name in ALWAYS {
        headers.remove(name);
    }
    headers.remove(TE);
    headers.remove(TRAILER);
    headers.remove(TRANSFER_ENCODING);
    if keep_upgrade {
        if headers.contains_key(UPGRADE) {
            headers.insert(CONNECTION, http::HeaderValue::from_static("upgrade"));
        }
    } else {
        headers.remove(UPGRADE);
    }
}

/// Whether `name` is one of the headers [`strip`] always considers (those a `Connection`
/// header names are only removed when a `Connection` header is present).
fn is_hop_by_hop(name: &HeaderName) -> bool {
    name == CONNECTION
        || name == TE
        || name == TRAILER
        || name == TRANSFER_ENCODING
        || name == UPGRADE
        || ALWAYS.iter().any(|a| name.as_str() == *a)
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

    proptest::proptest! {
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
