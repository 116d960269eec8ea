//! Trusted proxy address lists: CIDR blocks, as nginx's `set_real_ip_from` and uvicorn's
//! `--forwarded-allow-ips` take them.

use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;
use std::sync::Arc;

use ipnet::IpNet;

use super::parse_decimal;

/// The addresses whose forwarded headers (or PROXY protocol headers) are believed.
///
/// Cheap to clone: clones share one list. Matching is a linear scan, which beats any
/// tree for the handful of blocks a deployment lists. IPv4-mapped IPv6 peers
/// (`::ffff:10.0.0.1`, what a dual-stack listener reports) match IPv4 blocks.
///
/// ```
/// use proxy_core::forwarded::TrustedProxies;
/// let trusted: TrustedProxies = "10.0.0.0/8, 127.0.0.1 ::1".parse().unwrap();
/// assert!(trusted.contains("10.1.2.3".parse().unwrap()));
/// assert!(trusted.contains("::ffff:127.0.0.1".parse().unwrap()));
/// assert!(!trusted.contains("192.0.2.1".parse().unwrap()));
/// ```
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TrustedProxies {
    nets: Arc<[IpNet]>,
}

impl TrustedProxies {
    /// Trust nobody: only the socket peer counts. The default.
    pub fn none() -> Self {
        TrustedProxies::default()
    }

    /// Trust these blocks (host bits are ignored: `10.1.2.3/8` is `10.0.0.0/8`).
    pub fn new(nets: impl IntoIterator<Item = IpNet>) -> Self {
        TrustedProxies {
            nets: nets.into_iter().map(|n| n.trunc()).collect(),
        }
    }

    /// The loopback blocks `127.0.0.0/8` and `::1/128` (a proxy on the same host).
    pub fn loopback() -> Self {
        TrustedProxies::new([
            IpNet::V4(ipnet::Ipv4Net::new_assert(
                std::net::Ipv4Addr::new(127, 0, 0, 0),
                8,
            )),
            IpNet::V6(ipnet::Ipv6Net::new_assert(
                std::net::Ipv6Addr::LOCALHOST,
                128,
            )),
        ])
    }

    /// Whether `ip` lies in one of the trusted blocks.
    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = ip.to_canonical();
        self.nets.iter().any(|n| n.contains(&ip))
    }

    /// The trusted blocks.
    pub fn nets(&self) -> &[IpNet] {
        &self.nets
    }

    /// Whether no address is trusted.
    pub fn is_empty(&self) -> bool {
        self.nets.is_empty()
    }
}

impl FromStr for TrustedProxies {
    type Err = CidrError;

    fn from_str(s: &str) -> Result<Self, CidrError> {
        parse_cidr_list(s).map(TrustedProxies::new)
    }
}

impl FromIterator<IpNet> for TrustedProxies {
    fn from_iter<I: IntoIterator<Item = IpNet>>(iter: I) -> Self {
        TrustedProxies::new(iter)
    }
}

/// A CIDR list entry that is not an address or block.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CidrError {
    /// Byte offset of the bad entry in the input.
    pub offset: usize,
}

impl fmt::Display for CidrError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "invalid address or CIDR block at byte {}", self.offset)
    }
}

impl std::error::Error for CidrError {}

/// Parse a list of CIDR blocks separated by commas and/or whitespace. An entry is a block
/// (`10.0.0.0/8`, `2001:db8::/32`), a bare address (a `/32` or `/128`), or `*` (every
/// address, as uvicorn's `--forwarded-allow-ips='*'`). An empty list is valid.
///
/// ```
/// let nets = proxy_core::forwarded::parse_cidr_list("127.0.0.1, 10.0.0.0/8").unwrap();
/// assert_eq!(nets.len(), 2);
/// assert_eq!(nets[1].to_string(), "10.0.0.0/8");
/// assert!(proxy_core::forwarded::parse_cidr_list("10.0.0.0/33").is_err());
/// ```
pub fn parse_cidr_list(s: &str) -> Result<Vec<IpNet>, CidrError> {
    let mut out = Vec::new();
    let mut rest = s;
    while let Some(start) = rest.find(|c: char| !is_separator(c)) {
        let tail = &rest[start..];
        let len = tail.find(is_separator).unwrap_or(tail.len());
        let entry = &tail[..len];
        let offset = s.len() - tail.len();
        if entry == "*" {
            out.push(IpNet::V4(ipnet::Ipv4Net::default()));
            out.push(IpNet::V6(ipnet::Ipv6Net::default()));
        } else {
            out.push(parse_cidr(entry).ok_or(CidrError { offset })?);
        }
        rest = &tail[len..];
    }
    Ok(out)
}

/// One block or bare address.
pub fn parse_cidr(entry: &str) -> Option<IpNet> {
    // Bounds the work std's address parser does on hostile input.
    if entry.len() > 64 {
        return None;
    }
    match entry.split_once('/') {
        None => entry.parse::<IpAddr>().ok().map(IpNet::from),
        Some((ip, prefix)) => {
            let ip: IpAddr = ip.parse().ok()?;
            let prefix = u8::try_from(parse_decimal(prefix.as_bytes(), 3)?).ok()?;
            IpNet::new(ip, prefix).ok()
        }
    }
}

fn is_separator(c: char) -> bool {
    c == ',' || c.is_ascii_whitespace()
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // Tests may unwrap.
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn entries_and_separators() {
        let nets = parse_cidr_list(" 127.0.0.1,,10.0.0.0/8\t::1  2001:db8::/32 ").unwrap();
        let shown: Vec<_> = nets.iter().map(|n| n.to_string()).collect();
        assert_eq!(
            shown,
            ["127.0.0.1/32", "10.0.0.0/8", "::1/128", "2001:db8::/32"]
        );
        assert_eq!(parse_cidr_list("").unwrap(), []);
        assert_eq!(parse_cidr_list(" , ").unwrap(), []);
    }

    #[test]
    fn star_trusts_everything() {
        let t: TrustedProxies = "*".parse().unwrap();
        assert!(t.contains("192.0.2.1".parse().unwrap()));
        assert!(t.contains("2001:db8::1".parse().unwrap()));
    }

    #[test]
    fn rejects_garbage_with_offset() {
        for bad in [
            "10.0.0.0/",
            "10.0.0.0/+8",
            "10.0.0.0/33",
            "::/129",
            "1.2.3",
            "01.2.3.4",
            "a",
            "10.0.0.0/8/8",
            "localhost",
        ] {
            assert!(parse_cidr(bad).is_none(), "{bad}");
        }
        assert_eq!(
            parse_cidr_list("1.2.3.4, nope"),
            Err(CidrError { offset: 9 })
        );
    }

    #[test]
    fn host_bits_ignored() {
        let t = TrustedProxies::new([parse_cidr("10.1.2.3/8").unwrap()]);
        assert_eq!(t.nets()[0].to_string(), "10.0.0.0/8");
        assert!(t.contains("10.200.0.1".parse().unwrap()));
    }

    #[test]
    fn loopback_and_none() {
        assert!(TrustedProxies::loopback().contains("127.0.0.3".parse().unwrap()));
        assert!(TrustedProxies::loopback().contains("::1".parse().unwrap()));
        assert!(!TrustedProxies::none().contains("127.0.0.1".parse().unwrap()));
    }

    proptest::proptest! {
        #[test]
        fn round_trip(nets in proptest::collection::vec(
            proptest::prop_oneof![
                (any::<[u8; 4]>(), 0u8..=32).prop_map(|(a, p)|
                    IpNet::new(std::net::Ipv4Addr::from(a).into(), p).unwrap().trunc()),
                (any::<[u8; 16]>(), 0u8..=128).prop_map(|(a, p)|
                    IpNet::new(std::net::Ipv6Addr::from(a).into(), p).unwrap().trunc()),
            ], 0..8)) {
            let text = nets.iter().map(|n| n.to_string()).collect::<Vec<_>>().join(", ");
            proptest::prop_assert_eq!(parse_cidr_list(&text).unwrap(), nets);
        }

        #[test]
        fn never_panics(s in "\\PC{0,200}") {
            let _ = parse_cidr_list(&s);
        }
    }
}
