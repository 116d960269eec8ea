//! PROXY protocol headers, version 1 (text) and 2 (binary): parsing and writing.
//! Sans-I/O; the listener side is [`ProxyProtocol`](super::ProxyProtocol).

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use super::parse_decimal;

/// The 12 bytes every version 2 header starts with.
pub const V2_SIGNATURE: [u8; 12] = *b"\r\n\r\n\0\r\nQUIT\n";

/// The longest version 1 header, `\r\n` included.
pub const V1_MAX_LEN: usize = 107;

/// The fixed part of a version 2 header: signature, version/command, family, length.
pub const V2_PREFIX_LEN: usize = 16;

/// What a PROXY protocol header says about the connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum ProxyHeader {
    /// The connection was proxied for this source, to this destination.
    Proxy {
        /// The client's address.
        src: SocketAddr,
        /// The address the client connected to.
        dst: SocketAddr,
    },
    /// A v2 `LOCAL` command: the proxy's own connection (a health check); the socket
    /// peer is the client.
    Local,
    /// The proxy did not know or could not express the client (v1 `UNKNOWN`, v2
    /// `UNSPEC` or `AF_UNIX`): the socket peer stands.
    Unknown,
}

/// Why [`parse`] could not return a header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ParseError {
    /// The bytes so far are a valid beginning: read more.
    Incomplete,
    /// Not a PROXY protocol header.
    Invalid,
}

impl fmt::Display for ParseError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ParseError::Incomplete => "incomplete PROXY protocol header",
            ParseError::Invalid => "invalid PROXY protocol header",
        })
    }
}

impl std::error::Error for ParseError {}

/// Parse a v1 or v2 header at the start of `buf`; on success, also the header's length
/// (the bytes after it are the proxied stream). Never reads past the header, never
/// allocates, never panics.
///
/// ```
/// use proxy_core::forwarded::proxy_protocol::{parse, ProxyHeader, ParseError};
/// let (h, len) = parse(b"PROXY TCP4 192.0.2.1 198.51.100.1 56324 443\r\nGET /").unwrap();
/// assert_eq!(h, ProxyHeader::Proxy {
///     src: "192.0.2.1:56324".parse().unwrap(),
///     dst: "198.51.100.1:443".parse().unwrap(),
/// });
/// assert_eq!(len, 45);
/// assert_eq!(parse(b"PROXY TCP4 192"), Err(ParseError::Incomplete));
/// assert_eq!(parse(b"GET / HTTP/1.1\r\n"), Err(ParseError::Invalid));
/// ```
pub fn parse(buf: &[u8]) -> Result<(ProxyHeader, usize), ParseError> {
    if is_prefix_of(buf, &V2_SIGNATURE) {
        parse_v2(buf)
    } else if is_prefix_of(buf, b"PROXY ") {
        parse_v1(buf)
    } else {
        Err(ParseError::Invalid)
    }
}

/// Whether `buf` and `sig` agree on their common length, i.e. `buf` may be (the start
/// of) something that begins with `sig`.
fn is_prefix_of(buf: &[u8], sig: &[u8]) -> bool {
    buf.iter().zip(sig).all(|(a, b)| a == b)
}

fn parse_v1(buf: &[u8]) -> Result<(ProxyHeader, usize), ParseError> {
    let window = &buf[..buf.len().min(V1_MAX_LEN)];
    let Some(lf) = window.iter().position(|&b| b == b'\n') else {
        return if buf.len() < V1_MAX_LEN {
            Err(ParseError::Incomplete)
        } else {
            Err(ParseError::Invalid)
        };
    };
    // The header is "PROXY " ... "\r\n"; the line holds nothing but visible ASCII and
    // single spaces.
    let line = window
        .get(6..lf.checked_sub(1).ok_or(ParseError::Invalid)?)
        .ok_or(ParseError::Invalid)?;
    if window.get(lf - 1) != Some(&b'\r')
        || line.iter().any(|&b| !(b == b' ' || b.is_ascii_graphic()))
    {
        return Err(ParseError::Invalid);
    }
    let line = std::str::from_utf8(line).map_err(|_| ParseError::Invalid)?;
    let len = lf + 1;
    // Whatever follows UNKNOWN is to be ignored (the spec lets senders put addresses there).
    if line == "UNKNOWN" || line.starts_with("UNKNOWN ") {
        return Ok((ProxyHeader::Unknown, len));
    }
    let mut fields = line.split(' ');
    let (Some(proto), Some(src), Some(dst), Some(sport), Some(dport), None) = (
        fields.next(),
        fields.next(),
        fields.next(),
        fields.next(),
        fields.next(),
        fields.next(),
    ) else {
        return Err(ParseError::Invalid);
    };
    let (src, dst) = match proto {
        "TCP4" => (
            IpAddr::V4(src.parse::<Ipv4Addr>().map_err(|_| ParseError::Invalid)?),
            IpAddr::V4(dst.parse::<Ipv4Addr>().map_err(|_| ParseError::Invalid)?),
        ),
        "TCP6" => (
            IpAddr::V6(src.parse::<Ipv6Addr>().map_err(|_| ParseError::Invalid)?),
            IpAddr::V6(dst.parse::<Ipv6Addr>().map_err(|_| ParseError::Invalid)?),
        ),
        _ => return Err(ParseError::Invalid),
    };
    let src = SocketAddr::new(src, v1_port(sport)?);
    let dst = SocketAddr::new(dst, v1_port(dport)?);
    Ok((ProxyHeader::Proxy { src, dst }, len))
}

/// A v1 port: decimal, no sign, no leading zero.
fn v1_port(s: &str) -> Result<u16, ParseError> {
    if s.len() > 1 && s.starts_with('0') {
        return Err(ParseError::Invalid);
    }
    parse_decimal(s.as_bytes(), 5)
        .and_then(|p| u16::try_from(p).ok())
        .ok_or(ParseError::Invalid)
}

fn parse_v2(buf: &[u8]) -> Result<(ProxyHeader, usize), ParseError> {
    let Some(&[.., ver_cmd, family, l0, l1]) = buf.get(..V2_PREFIX_LEN) else {
        return Err(ParseError::Incomplete);
    };
    let len = usize::from(u16::from_be_bytes([l0, l1]));
    if ver_cmd >> 4 != 2 {
        return Err(ParseError::Invalid);
    }
    let local = match ver_cmd & 0x0f {
        0 => true,
        1 => false,
        _ => return Err(ParseError::Invalid),
    };
    let addr_len = match family {
        0x00 => 0,
        0x11 | 0x12 => 12,
        0x21 | 0x22 => 36,
        0x31 | 0x32 => 216,
        _ => return Err(ParseError::Invalid),
    };
    let total = V2_PREFIX_LEN + len;
    let Some(body) = buf.get(V2_PREFIX_LEN..total) else {
        return Err(ParseError::Incomplete);
    };
    if local {
        // A LOCAL header's addresses and TLVs carry nothing for us: skip them whole.
        return Ok((ProxyHeader::Local, total));
    }
    let (addrs, tlvs) = body.split_at_checked(addr_len).ok_or(ParseError::Invalid)?;
    check_tlvs(tlvs)?;
    // `addrs` is exactly `addr_len` long, so these conversions cannot fail; they are
    // written as fallible ones all the same so no index can panic.
    let header = match family {
        0x11 | 0x12 => {
            let a: [u8; 12] = addrs.try_into().map_err(|_| ParseError::Invalid)?;
            let [s0, s1, s2, s3, d0, d1, d2, d3, sp0, sp1, dp0, dp1] = a;
            ProxyHeader::Proxy {
                src: SocketAddr::new(
                    Ipv4Addr::new(s0, s1, s2, s3).into(),
                    u16::from_be_bytes([sp0, sp1]),
                ),
                dst: SocketAddr::new(
                    Ipv4Addr::new(d0, d1, d2, d3).into(),
                    u16::from_be_bytes([dp0, dp1]),
                ),
            }
        }
        0x21 | 0x22 => {
            let a: [u8; 36] = addrs.try_into().map_err(|_| ParseError::Invalid)?;
            let (ips, ports) = a.split_at(32);
            let (src, dst) = ips.split_at(16);
            let v6 = |b: &[u8]| -> Result<IpAddr, ParseError> {
                let b: [u8; 16] = b.try_into().map_err(|_| ParseError::Invalid)?;
                Ok(IpAddr::V6(Ipv6Addr::from(b)))
            };
            let &[sp0, sp1, dp0, dp1] = ports else {
                return Err(ParseError::Invalid);
            };
            ProxyHeader::Proxy {
                src: SocketAddr::new(v6(src)?, u16::from_be_bytes([sp0, sp1])),
                dst: SocketAddr::new(v6(dst)?, u16::from_be_bytes([dp0, dp1])),
            }
        }
        _ => ProxyHeader::Unknown,
    };
    Ok((header, total))
}

/// TLVs are skipped, but they must frame exactly: a length running past the header
/// means the sender and we disagree about where the stream starts.
fn check_tlvs(mut tlvs: &[u8]) -> Result<(), ParseError> {
    while !tlvs.is_empty() {
        let Some(&[_kind, hi, lo]) = tlvs.get(..3) else {
            return Err(ParseError::Invalid);
        };
        let end = 3 + usize::from(u16::from_be_bytes([hi, lo]));
        tlvs = tlvs.get(end..).ok_or(ParseError::Invalid)?;
    }
    Ok(())
}

/// Append a version 2 `PROXY` header for a connection from `src` to `dst` (both TCP)
/// to `out`, as a proxy sends it to an upstream. Mixed families are written as IPv6
/// (the IPv4 side as `::ffff:a.b.c.d`).
///
/// ```
/// use proxy_core::forwarded::proxy_protocol::{parse, write_v2, ProxyHeader};
/// let src = "192.0.2.1:4711".parse().unwrap();
/// let dst = "127.0.0.1:8000".parse().unwrap();
/// let mut out = Vec::new();
/// write_v2(src, dst, &mut out);
/// assert_eq!(out.len(), 28);
/// assert_eq!(parse(&out), Ok((ProxyHeader::Proxy { src, dst }, 28)));
/// ```
pub fn write_v2(src: SocketAddr, dst: SocketAddr, out: &mut Vec<u8>) {
    out.extend_from_slice(&V2_SIGNATURE);
    out.push(0x21); // version 2, PROXY
    match (src.ip(), dst.ip()) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            out.extend_from_slice(&[0x11, 0, 12]);
            out.extend_from_slice(&s.octets());
            out.extend_from_slice(&d.octets());
        }
        (s, d) => {
            let v6 = |ip: IpAddr| match ip {
                IpAddr::V4(v4) => v4.to_ipv6_mapped(),
                IpAddr::V6(v6) => v6,
            };
            out.extend_from_slice(&[0x21, 0, 36]);
            out.extend_from_slice(&v6(s).octets());
            out.extend_from_slice(&v6(d).octets());
        }
    }
    out.extend_from_slice(&src.port().to_be_bytes());
    out.extend_from_slice(&dst.port().to_be_bytes());
}

/// Append a version 2 `LOCAL` header (no addresses) to `out`.
pub fn write_v2_local(out: &mut Vec<u8>) {
    out.extend_from_slice(&V2_SIGNATURE);
    out.extend_from_slice(&[0x20, 0x00, 0, 0]);
}

/// Append a version 1 header to `out` (`TCP4` or `TCP6`; mixed families as `UNKNOWN`).
///
/// ```
/// use proxy_core::forwarded::proxy_protocol::write_v1;
/// let mut out = Vec::new();
/// write_v1("[2001:db8::1]:4711".parse().unwrap(), "[::1]:443".parse().unwrap(), &mut out);
/// assert_eq!(out, b"PROXY TCP6 2001:db8::1 ::1 4711 443\r\n");
/// ```
pub fn write_v1(src: SocketAddr, dst: SocketAddr, out: &mut Vec<u8>) {
    use std::io::Write as _;
    // Writing to a Vec cannot fail.
    let _ = match (src, dst) {
        (SocketAddr::V4(s), SocketAddr::V4(d)) => write!(
            out,
            "PROXY TCP4 {} {} {} {}\r\n",
            s.ip(),
            d.ip(),
            s.port(),
            d.port()
        ),
        (SocketAddr::V6(s), SocketAddr::V6(d)) => write!(
            out,
            "PROXY TCP6 {} {} {} {}\r\n",
            s.ip(),
            d.ip(),
            s.port(),
            d.port()
        ),
        _ => write!(out, "PROXY UNKNOWN\r\n"),
    };
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // Tests may unwrap.
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn v2(family: u8, body: &[u8]) -> Vec<u8> {
        let mut out = V2_SIGNATURE.to_vec();
        out.push(0x21);
        out.push(family);
        out.extend_from_slice(&u16::try_from(body.len()).unwrap().to_be_bytes());
        out.extend_from_slice(body);
        out
    }

    #[test]
    fn v1_forms() {
        assert_eq!(parse(b"PROXY UNKNOWN\r\n"), Ok((ProxyHeader::Unknown, 15)));
        assert_eq!(
            parse(b"PROXY UNKNOWN ffff::1 ffff::2 1 2\r\nxx"),
            Ok((ProxyHeader::Unknown, 35))
        );
        let (h, n) = parse(b"PROXY TCP6 ::1 ::2 1 65535\r\n").unwrap();
        assert_eq!(n, 28);
        assert_eq!(
            h,
            ProxyHeader::Proxy {
                src: "[::1]:1".parse().unwrap(),
                dst: "[::2]:65535".parse().unwrap()
            }
        );
    }

    #[test]
    fn v1_rejects() {
        for bad in [
            &b"PROXY TCP4 1.2.3.4 1.2.3.4 1 2\n"[..],
            b"PROXY TCP4 1.2.3.4 1.2.3.4 1 2 \r\n",
            b"PROXY TCP4  1.2.3.4 1.2.3.4 1 2\r\n",
            b"PROXY TCP4 1.2.3.4 1.2.3.4 1\r\n",
            b"PROXY TCP4 ::1 ::1 1 2\r\n",
            b"PROXY TCP6 1.2.3.4 1.2.3.4 1 2\r\n",
            b"PROXY TCP4 1.2.3.4 1.2.3.4 01 2\r\n",
            b"PROXY TCP4 1.2.3.4 1.2.3.4 1 65536\r\n",
            b"PROXY TCP4 1.2.3.4 1.2.3.4 +1 2\r\n",
            b"PROXY UDP4 1.2.3.4 1.2.3.4 1 2\r\n",
            b"PROXY UNKNOWNX\r\n",
            b"PROXY \r\n",
            b"PROXY\tTCP4\r\n",
            b"PROXY UNKNOWN\x01\r\n",
            b"proxy TCP4 1.2.3.4 1.2.3.4 1 2\r\n",
        ] {
            assert_eq!(
                parse(bad),
                Err(ParseError::Invalid),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
        // No LF within the 107 bytes a v1 header may take.
        let mut long = b"PROXY UNKNOWN ".to_vec();
        long.resize(V1_MAX_LEN, b'a');
        assert_eq!(parse(&long), Err(ParseError::Invalid));
        long.truncate(V1_MAX_LEN - 1);
        assert_eq!(parse(&long), Err(ParseError::Incomplete));
    }

    #[test]
    fn incomplete_prefixes() {
        let mut h = Vec::new();
        write_v2(
            "[::1]:1".parse().unwrap(),
            "[::2]:2".parse().unwrap(),
            &mut h,
        );
        for n in 0..h.len() {
            assert_eq!(parse(&h[..n]), Err(ParseError::Incomplete), "{n}");
        }
        let v1 = b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\r\n";
        for n in 0..v1.len() {
            assert_eq!(parse(&v1[..n]), Err(ParseError::Incomplete), "{n}");
        }
    }

    #[test]
    fn v2_tlvs_skipped_and_checked() {
        let mut body = vec![1, 2, 3, 4, 5, 6, 7, 8, 0, 80, 1, 187];
        body.extend_from_slice(&[0x04, 0, 0]); // NOOP, empty
        body.extend_from_slice(&[0xea, 0, 3, b'v', b'p', b'c']);
        let h = v2(0x11, &body);
        assert_eq!(
            parse(&h),
            Ok((
                ProxyHeader::Proxy {
                    src: "1.2.3.4:80".parse().unwrap(),
                    dst: "5.6.7.8:443".parse().unwrap()
                },
                h.len()
            ))
        );
        let mut bad = body.clone();
        bad.extend_from_slice(&[0x01, 0, 9, 1]); // runs past the header
        assert_eq!(parse(&v2(0x11, &bad)), Err(ParseError::Invalid));
        let mut bad = body;
        bad.push(0x01); // a partial TLV header
        assert_eq!(parse(&v2(0x11, &bad)), Err(ParseError::Invalid));
    }

    #[test]
    fn v2_other_forms() {
        let mut local = Vec::new();
        write_v2_local(&mut local);
        assert_eq!(parse(&local), Ok((ProxyHeader::Local, 16)));
        assert_eq!(parse(&v2(0x00, &[])), Ok((ProxyHeader::Unknown, 16)));
        assert_eq!(parse(&v2(0x31, &[0; 216])), Ok((ProxyHeader::Unknown, 232)));
        assert_eq!(parse(&v2(0x11, &[0; 11])), Err(ParseError::Invalid));
        assert_eq!(parse(&v2(0x13, &[0; 12])), Err(ParseError::Invalid));
        let mut wrong_version = v2(0x11, &[0; 12]);
        wrong_version[12] = 0x11;
        assert_eq!(parse(&wrong_version), Err(ParseError::Invalid));
        let mut wrong_cmd = v2(0x11, &[0; 12]);
        wrong_cmd[12] = 0x22;
        assert_eq!(parse(&wrong_cmd), Err(ParseError::Invalid));
    }

    fn any_addr() -> impl Strategy<Value = SocketAddr> {
        prop_oneof![
            (any::<[u8; 4]>(), any::<u16>()).prop_map(|(a, p)| SocketAddr::new(IpAddr::from(a), p)),
            (any::<[u8; 16]>(), any::<u16>())
                .prop_map(|(a, p)| SocketAddr::new(IpAddr::from(a), p)),
        ]
    }

    fn as_v6(a: SocketAddr) -> SocketAddr {
        match a.ip() {
            IpAddr::V4(v4) => SocketAddr::new(IpAddr::V6(v4.to_ipv6_mapped()), a.port()),
            IpAddr::V6(_) => a,
        }
    }

    proptest! {
        #[test]
        fn v2_round_trip(src in any_addr(), dst in any_addr(), tail in proptest::collection::vec(any::<u8>(), 0..8)) {
            let mut out = Vec::new();
            write_v2(src, dst, &mut out);
            let len = out.len();
            out.extend_from_slice(&tail);
            let (h, n) = parse(&out).unwrap();
            prop_assert_eq!(n, len);
            let same_family = src.is_ipv4() == dst.is_ipv4();
            let want = if same_family { (src, dst) } else { (as_v6(src), as_v6(dst)) };
            prop_assert_eq!(h, ProxyHeader::Proxy { src: want.0, dst: want.1 });
        }

        #[test]
        fn v1_round_trip(src in any_addr(), dst in any_addr()) {
            let mut out = Vec::new();
            write_v1(src, dst, &mut out);
            prop_assert!(out.len() <= V1_MAX_LEN);
            let (h, n) = parse(&out).unwrap();
            prop_assert_eq!(n, out.len());
            if src.is_ipv4() == dst.is_ipv4() {
                prop_assert_eq!(h, ProxyHeader::Proxy { src, dst });
            } else {
                prop_assert_eq!(h, ProxyHeader::Unknown);
            }
        }

        #[test]
        fn never_panics(data in proptest::collection::vec(any::<u8>(), 0..300)) {
            let _ = parse(&data);
        }

        #[test]
        fn never_panics_after_signature(data in proptest::collection::vec(any::<u8>(), 0..300), v2 in any::<bool>()) {
            let mut buf = if v2 { V2_SIGNATURE.to_vec() } else { b"PROXY ".to_vec() };
            buf.extend_from_slice(&data);
            if let Ok((_, n)) = parse(&buf) {
                prop_assert!(n <= buf.len());
            }
        }
    }
}
