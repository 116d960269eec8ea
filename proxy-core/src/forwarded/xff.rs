//! `X-Forwarded-For` lists and `X-Real-IP` values.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use super::parse_decimal;

/// The longest entry accepted (`[` IPv6 `]:` port is 47 bytes); bounds the address
/// parser's work on hostile input.
const MAX_ENTRY: usize = 64;

/// The entries of one `X-Forwarded-For` value, OWS-trimmed, empty list elements skipped
/// (RFC 9110 §5.6.1). Walk it from the right with `.rev()`. Linear, no allocation.
///
/// ```
/// use proxy_core::forwarded::xff_entries;
/// let rightmost: Vec<_> = xff_entries("203.0.113.7 , 10.0.0.2,,").rev().collect();
/// assert_eq!(rightmost, ["10.0.0.2", "203.0.113.7"]);
/// ```
pub fn xff_entries(value: &str) -> impl DoubleEndedIterator<Item = &str> {
    value
        .split(',')
        .map(|e| e.trim_matches([' ', '\t']))
        .filter(|e| !e.is_empty())
}

/// One address of an `X-Forwarded-For` list or an `X-Real-IP` value: an IPv4 or IPv6
/// address, optionally with a port (`192.0.2.1:4711`, `[2001:db8::1]:4711`; a bare IPv6
/// address cannot carry one). Anything else (names, `unknown`, garbage) is `None`.
///
/// ```
/// use proxy_core::forwarded::parse_xff_addr;
/// assert_eq!(parse_xff_addr("::1"), Some(("::1".parse().unwrap(), None)));
/// assert_eq!(parse_xff_addr("[::1]:80"), Some(("::1".parse().unwrap(), Some(80))));
/// assert_eq!(parse_xff_addr("10.0.0.1:8080"), Some(("10.0.0.1".parse().unwrap(), Some(8080))));
/// assert_eq!(parse_xff_addr("unknown"), None);
/// ```
pub fn parse_xff_addr(entry: &str) -> Option<(IpAddr, Option<u16>)> {
    if entry.len() > MAX_ENTRY {
        return None;
    }
    if let Some(rest) = entry.strip_prefix('[') {
        let (ip, after) = rest.split_once(']')?;
        let ip: Ipv6Addr = ip.parse().ok()?;
        let port = match after {
            "" => None,
            _ => Some(parse_port(after.strip_prefix(':')?)?),
        };
        return Some((IpAddr::V6(ip), port));
    }
    if let Ok(ip) = entry.parse::<IpAddr>() {
        return Some((ip, None));
    }
    let (ip, port) = entry.split_once(':')?;
    let ip: Ipv4Addr = ip.parse().ok()?;
    Some((IpAddr::V4(ip), Some(parse_port(port)?)))
}

pub(super) fn parse_port(digits: &str) -> Option<u16> {
    u16::try_from(parse_decimal(digits.as_bytes(), 5)?).ok()
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // Tests may unwrap.
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn rejects() {
        for bad in [
            "",
            "1.2.3",
            "1.2.3.4:",
            "1.2.3.4:+1",
            "1.2.3.4:65536",
            "[::1]:",
            "[::1]x",
            "[1.2.3.4]",
            "::1:80x",
            "_hidden",
            "unknown",
            " 1.2.3.4",
            "1.2.3.4:80:80",
            "[::1",
            "localhost",
        ] {
            assert_eq!(parse_xff_addr(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn entries_skip_empty_and_trim() {
        let e: Vec<_> = xff_entries(" a,\tb ,, c ,").collect();
        assert_eq!(e, ["a", "b", "c"]);
        assert_eq!(xff_entries("").count(), 0);
    }

    fn format_addr(ip: IpAddr, port: Option<u16>) -> String {
        match (ip, port) {
            (ip, None) => ip.to_string(),
            (IpAddr::V4(ip), Some(p)) => format!("{ip}:{p}"),
            (IpAddr::V6(ip), Some(p)) => format!("[{ip}]:{p}"),
        }
    }

    fn any_ip() -> impl Strategy<Value = IpAddr> {
        prop_oneof![
            any::<[u8; 4]>().prop_map(IpAddr::from),
            any::<[u8; 16]>().prop_map(IpAddr::from),
        ]
    }

    proptest! {
        #[test]
        fn round_trip(list in proptest::collection::vec((any_ip(), proptest::option::of(any::<u16>())), 0..10)) {
            let text = list.iter().map(|(ip, p)| format_addr(*ip, *p)).collect::<Vec<_>>().join(", ");
            let parsed: Vec<_> = xff_entries(&text).map(|e| parse_xff_addr(e).unwrap()).collect();
            prop_assert_eq!(parsed, list);
        }

        #[test]
        fn never_panics(s in "\\PC{0,200}") {
            for e in xff_entries(&s).rev() {
                let _ = parse_xff_addr(e);
            }
        }
    }
}
