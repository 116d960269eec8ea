//! The `Host` header (and `X-Forwarded-Host`, RFC 7239 `host=`): `host[:port]` with
//! IPv6 literals in brackets.

use std::net::Ipv6Addr;

use super::parse_decimal;

/// The longest host name accepted (DNS names are at most 253 octets).
const MAX_NAME: usize = 253;

/// Split a `Host` value into its host and optional port, rejecting anything that is not
/// a DNS-style name (letters, digits, `-`, `.`, `_`), an IPv4 address or a bracketed
/// IPv6 literal. The host is returned as written (brackets kept for IPv6, case kept:
/// compare case-insensitively). Linear, no allocation.
///
/// ```
/// use proxy_core::forwarded::parse_host;
/// assert_eq!(parse_host("example.com"), Some(("example.com", None)));
/// assert_eq!(parse_host("Example.com:8080"), Some(("Example.com", Some(8080))));
/// assert_eq!(parse_host("[::1]:443"), Some(("[::1]", Some(443))));
/// assert_eq!(parse_host("[::1"), None);
/// assert_eq!(parse_host("a b"), None);
/// assert_eq!(parse_host("example.com:99999"), None);
/// ```
pub fn parse_host(value: &str) -> Option<(&str, Option<u16>)> {
    let (host, port) = if value.starts_with('[') {
        let end = value.find(']')?;
        let literal = value.get(1..end)?;
        // Zone identifiers and IPvFuture are not hosts a client may ask for.
        literal.parse::<Ipv6Addr>().ok()?;
        (&value[..=end], &value[end + 1..])
    } else {
        let end = value.find(':').unwrap_or(value.len());
        let name = &value[..end];
        if name.is_empty() || name.len() > MAX_NAME || !name.bytes().all(is_name_byte) {
            return None;
        }
        (name, &value[end..])
    };
    let port = match port.strip_prefix(':') {
        None if port.is_empty() => None,
        None => return None,
        Some(digits) => Some(u16::try_from(parse_decimal(digits.as_bytes(), 5)?).ok()?),
    };
    Some((host, port))
}

/// Whether `value` is a host [`parse_host`] accepts, checked on the bytes of a header
/// value in one pass (no UTF-8 check first: every byte a valid host can hold is ASCII).
/// The request path's check of `Host`, which every proxied request pays.
pub(crate) fn is_host(value: &[u8]) -> bool {
    if value.first() == Some(&b'[') {
        // IPv6 literals (rare) take the full parser.
        return std::str::from_utf8(value).is_ok_and(|s| parse_host(s).is_some());
    }
    let mut name_len = 0;
    let mut bytes = value.iter();
    for &b in bytes.by_ref() {
        if b == b':' {
            // At most five digits, at most 65535.
            let digits = bytes.as_slice();
            return name_len > 0
                && name_len <= MAX_NAME
                && parse_decimal(digits, 5).is_some_and(|p| u16::try_from(p).is_ok());
        }
        if !is_name_byte(b) {
            return false;
        }
        name_len += 1;
    }
    name_len > 0 && name_len <= MAX_NAME
}

fn is_name_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_')
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // Tests may unwrap.
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn accepts() {
        assert_eq!(parse_host("localhost"), Some(("localhost", None)));
        assert_eq!(parse_host("127.0.0.1:80"), Some(("127.0.0.1", Some(80))));
        assert_eq!(parse_host("[2001:db8::1]"), Some(("[2001:db8::1]", None)));
        assert_eq!(parse_host("a_b.example."), Some(("a_b.example.", None)));
        assert_eq!(parse_host("x:0"), Some(("x", Some(0))));
        assert_eq!(parse_host("x:65535"), Some(("x", Some(65535))));
    }

    #[test]
    fn rejects() {
        for bad in [
            "",
            ":80",
            "x:",
            "x:+1",
            "x:65536",
            "x:123456",
            "x:8:8",
            "[::1]x",
            "[::1]:",
            "[1.2.3.4]",
            "[::1%eth0]",
            "::1",
            "ex ample",
            "ex/ample",
            "ex@ample",
            "[]",
            "example.com\t",
            "[::1]]",
        ] {
            assert_eq!(parse_host(bad), None, "{bad:?}");
        }
        assert_eq!(parse_host(&"a".repeat(254)), None);
        assert!(parse_host(&"a".repeat(253)).is_some());
        for bad in [
            "x:8:8", ":80", "x:", "x:65536", "ex ample", "[::1]x", "\u{e9}x",
        ] {
            assert!(!is_host(bad.as_bytes()), "{bad:?}");
        }
        assert!(!is_host(&[b'a'; 254]));
        assert!(is_host(&[b'a'; 253]));
    }

    proptest! {
        #[test]
        fn round_trip(name in "[a-zA-Z0-9._-]{1,60}", port in proptest::option::of(any::<u16>())) {
            let text = match port { Some(p) => format!("{name}:{p}"), None => name.clone() };
            prop_assert_eq!(parse_host(&text), Some((name.as_str(), port)));
        }

        #[test]
        fn ipv6_round_trip(ip in any::<[u8; 16]>(), port in proptest::option::of(any::<u16>())) {
            let host = format!("[{}]", Ipv6Addr::from(ip));
            let text = match port { Some(p) => format!("{host}:{p}"), None => host.clone() };
            prop_assert_eq!(parse_host(&text), Some((host.as_str(), port)));
        }

        #[test]
        fn never_panics(s in "\\PC{0,100}") {
            let _ = parse_host(&s);
        }

        /// The one-pass check agrees with the parser on anything, host-like or not.
        #[test]
        fn is_host_agrees_with_parse_host(
            b in prop_oneof![
                proptest::collection::vec(any::<u8>(), 0..40),
                "[a-zA-Z0-9._:\\[\\]-]{0,20}(:[0-9]{0,7})?".prop_map(String::into_bytes),
                "[a-z]{250,256}(:80)?".prop_map(String::into_bytes),
            ]
        ) {
            let parsed = std::str::from_utf8(&b).ok().and_then(parse_host).is_some();
            prop_assert_eq!(is_host(&b), parsed, "{:?}", String::from_utf8_lossy(&b));
        }
    }
}
