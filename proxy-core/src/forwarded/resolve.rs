//! Who the client is: the socket peer, or what a trusted peer's headers say.

use std::net::IpAddr;

use http::header::{HeaderMap, HeaderName, HeaderValue};

use super::cidr::TrustedProxies;
use super::host::parse_host;
use super::layer::{ClientHeader, Config};
use super::rfc7239::{parse_forwarded, Element};
use super::xff::{parse_port, parse_xff_addr, xff_entries};
use crate::client_info::{ClientInfo, RealClient, Scheme};

pub(crate) const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
pub(crate) const X_REAL_IP: HeaderName = HeaderName::from_static("x-real-ip");
pub(crate) const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
pub(crate) const X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
pub(crate) const X_FORWARDED_PORT: HeaderName = HeaderName::from_static("x-forwarded-port");
pub(crate) const FORWARDED: HeaderName = http::header::FORWARDED;

/// The outcome of resolution: the client, and facts the header rewrite needs.
#[derive(Debug)]
pub(crate) struct Resolved {
    pub(crate) client: RealClient,
    /// Whether the socket peer is a trusted proxy.
    pub(crate) peer_trusted: bool,
    /// The port the client reached the first proxy on, when a trusted proxy said so.
    pub(crate) port: Option<u16>,
}

/// What a right-to-left walk of an address list found.
#[derive(Debug, PartialEq, Eq)]
enum Pick<T> {
    /// No header, or an empty one.
    Absent,
    /// The client.
    Found(T),
    /// The entry that would be the client is not an address.
    Malformed,
}

pub(crate) fn resolve(config: &Config, info: &ClientInfo, headers: &HeaderMap) -> Resolved {
    let peer_ip = info.peer.ip().to_canonical();
    let mut resolved = Resolved {
        client: RealClient {
            ip: peer_ip,
            port: Some(info.peer.port()),
            scheme: info.scheme,
            host: None,
        },
        peer_trusted: config.trusted.contains(peer_ip),
        port: None,
    };
    if !resolved.peer_trusted {
        // The untrusted path reads no header at all.
        return resolved;
    }
    let client = &mut resolved.client;
    let found = match config.client_header {
        ClientHeader::XForwardedFor => walk_xff(headers, &config.trusted, config.recursive),
        ClientHeader::XRealIp => real_ip(headers),
        ClientHeader::Forwarded => {
            match walk_forwarded(headers, &config.trusted, config.recursive) {
                Pick::Found(el) => {
                    match el
                        .for_
                        .as_ref()
                        .and_then(|n| n.ip().map(|ip| (ip, n.port_number())))
                    {
                        Some(addr) => {
                            if let Some(scheme) = el.proto.as_deref().and_then(parse_scheme) {
                                client.scheme = scheme;
                            }
                            client.host = el.host.as_deref().and_then(host_value);
                            Pick::Found(addr)
                        }
                        // `unknown`, an obfuscated node or no `for=`: no address to use.
                        None => Pick::Malformed,
                    }
                }
                Pick::Absent => Pick::Absent,
                Pick::Malformed => Pick::Malformed,
            }
        }
    };
    match found {
        Pick::Found((ip, port)) => {
            client.ip = ip.to_canonical();
            client.port = port;
        }
        Pick::Absent => {}
        Pick::Malformed => {
            tracing::debug!(peer = %info.peer, header = ?config.client_header,
                "malformed forwarded header from a trusted peer; using the socket peer");
        }
    }
    if config.client_header != ClientHeader::Forwarded {
        if let Some(scheme) = first_entry(headers, &X_FORWARDED_PROTO).and_then(parse_scheme) {
            client.scheme = scheme;
        }
        client.host = first_entry(headers, &X_FORWARDED_HOST).and_then(host_value);
        resolved.port = first_entry(headers, &X_FORWARDED_PORT).and_then(parse_port);
    }
    resolved
}

/// X-Forwarded-For across all its lines, from the right.
fn walk_xff(
    headers: &HeaderMap,
    trusted: &TrustedProxies,
    recursive: bool,
) -> Pick<(IpAddr, Option<u16>)> {
    let mut last = None;
    for line in headers.get_all(&X_FORWARDED_FOR).iter().rev() {
        let Ok(line) = line.to_str() else {
            return Pick::Malformed;
        };
        for entry in xff_entries(line).rev() {
            let Some(addr) = parse_xff_addr(entry) else {
                return Pick::Malformed;
            };
            if !recursive || !trusted.contains(addr.0) {
                return Pick::Found(addr);
            }
            last = Some(addr);
        }
    }
    // Every entry was trusted: the leftmost is the client.
    last.map_or(Pick::Absent, Pick::Found)
}

/// X-Real-IP: one line holding one address.
fn real_ip(headers: &HeaderMap) -> Pick<(IpAddr, Option<u16>)> {
    let mut lines = headers.get_all(&X_REAL_IP).iter();
    match (lines.next(), lines.next()) {
        (None, _) => Pick::Absent,
        (Some(v), None) => match v.to_str().ok().map(|s| s.trim_matches([' ', '\t'])) {
            Some(s) => parse_xff_addr(s).map_or(Pick::Malformed, Pick::Found),
            None => Pick::Malformed,
        },
        (Some(_), Some(_)) => Pick::Malformed,
    }
}

/// Forwarded across all its lines. The grammar is read left to right (quoted strings
/// may hold commas), so the right-to-left walk is done in one forward pass: the
/// candidate is the last element whose `for=` is not a trusted address; if every one
/// is, the first.
fn walk_forwarded<'h>(
    headers: &'h HeaderMap,
    trusted: &TrustedProxies,
    recursive: bool,
) -> Pick<Element<'h>> {
    let mut first: Option<Element<'h>> = None;
    let mut candidate: Option<Element<'h>> = None;
    for line in headers.get_all(&FORWARDED) {
        let Ok(line) = line.to_str() else {
            return Pick::Malformed;
        };
        for el in parse_forwarded(line) {
            let Ok(el) = el else {
                return Pick::Malformed;
            };
            let trusted_hop = recursive
                && el
                    .for_
                    .as_ref()
                    .and_then(|n| n.ip())
                    .is_some_and(|ip| trusted.contains(ip));
            if trusted_hop {
                if first.is_none() {
                    first = Some(el);
                }
            } else {
                candidate = Some(el);
            }
        }
    }
    candidate.or(first).map_or(Pick::Absent, Pick::Found)
}

/// The leftmost entry of a comma-separated header (the value the first proxy wrote).
fn first_entry<'h>(headers: &'h HeaderMap, name: &HeaderName) -> Option<&'h str> {
    let line = headers.get(name)?.to_str().ok()?;
    xff_entries(line).next()
}

fn parse_scheme(s: &str) -> Option<Scheme> {
    if s.eq_ignore_ascii_case("https") {
        Some(Scheme::Https)
    } else if s.eq_ignore_ascii_case("http") {
        Some(Scheme::Http)
    } else {
        None
    }
}

fn host_value(s: &str) -> Option<HeaderValue> {
    parse_host(s)?;
    HeaderValue::from_str(s).ok()
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // Tests may unwrap.
mod tests {
    use super::*;

    fn info(peer: &str) -> ClientInfo {
        ClientInfo::new(
            peer.parse().unwrap(),
            "127.0.0.1:8080".parse().unwrap(),
            Scheme::Http,
        )
    }

    fn config(trusted: &str, header: ClientHeader, recursive: bool) -> Config {
        Config {
            trusted: trusted.parse().unwrap(),
            client_header: header,
            recursive,
            ..Config::default()
        }
    }

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(
                HeaderName::from_bytes(k.as_bytes()).unwrap(),
                v.parse().unwrap(),
            );
        }
        h
    }

    fn ip(c: &Config, peer: &str, h: &[(&str, &str)]) -> IpAddr {
        resolve(c, &info(peer), &headers(h)).client.ip
    }

    #[test]
    fn untrusted_peer_reads_nothing() {
        let c = config("10.0.0.0/8", ClientHeader::XForwardedFor, true);
        let r = resolve(
            &c,
            &info("192.0.2.9:5000"),
            &headers(&[
                ("x-forwarded-for", "1.1.1.1"),
                ("x-forwarded-proto", "https"),
            ]),
        );
        assert_eq!(r.client.ip, "192.0.2.9".parse::<IpAddr>().unwrap());
        assert_eq!(r.client.port, Some(5000));
        assert_eq!(r.client.scheme, Scheme::Http);
        assert!(!r.peer_trusted);
    }

    #[test]
    fn recursive_walk_and_last_entry() {
        let h = [
            ("x-forwarded-for", "6.6.6.6, 1.1.1.1"),
            ("x-forwarded-for", "10.0.0.5"),
        ];
        let on = config("10.0.0.0/8", ClientHeader::XForwardedFor, true);
        assert_eq!(
            ip(&on, "10.0.0.1:1", &h),
            "1.1.1.1".parse::<IpAddr>().unwrap()
        );
        let off = config("10.0.0.0/8", ClientHeader::XForwardedFor, false);
        assert_eq!(
            ip(&off, "10.0.0.1:1", &h),
            "10.0.0.5".parse::<IpAddr>().unwrap()
        );
        // All trusted: the leftmost.
        let all = [("x-forwarded-for", "10.0.0.7, 10.0.0.5")];
        assert_eq!(
            ip(&on, "10.0.0.1:1", &all),
            "10.0.0.7".parse::<IpAddr>().unwrap()
        );
        // Garbage left of the client is never looked at.
        let junk = [("x-forwarded-for", "junk, 1.1.1.1")];
        assert_eq!(
            ip(&on, "10.0.0.1:1", &junk),
            "1.1.1.1".parse::<IpAddr>().unwrap()
        );
    }

    #[test]
    fn malformed_falls_back_to_peer() {
        let c = config("10.0.0.0/8", ClientHeader::XForwardedFor, true);
        for bad in ["1.1.1.1, junk", "unknown", "10.0.0.9, _x"] {
            assert_eq!(
                ip(&c, "10.0.0.1:1", &[("x-forwarded-for", bad)]),
                "10.0.0.1".parse::<IpAddr>().unwrap(),
                "{bad}"
            );
        }
        let r = resolve(&c, &info("10.0.0.1:1"), &headers(&[]));
        assert_eq!(r.client.port, Some(1));
    }

    #[test]
    fn proto_host_port_from_trusted() {
        let c = config("10.0.0.0/8", ClientHeader::XForwardedFor, true);
        let r = resolve(
            &c,
            &info("10.0.0.1:1"),
            &headers(&[
                ("x-forwarded-for", "[2001:db8::1]:4711"),
                ("x-forwarded-proto", "HTTPS, http"),
                ("x-forwarded-host", "example.com:8443"),
                ("x-forwarded-port", "8443"),
            ]),
        );
        assert_eq!(r.client.ip, "2001:db8::1".parse::<IpAddr>().unwrap());
        assert_eq!(r.client.port, Some(4711));
        assert_eq!(r.client.scheme, Scheme::Https);
        assert_eq!(r.client.host.unwrap(), "example.com:8443");
        assert_eq!(r.port, Some(8443));
        let r = resolve(
            &c,
            &info("10.0.0.1:1"),
            &headers(&[("x-forwarded-proto", "gopher"), ("x-forwarded-host", "a b")]),
        );
        assert_eq!(r.client.scheme, Scheme::Http);
        assert_eq!(r.client.host, None);
    }

    #[test]
    fn real_ip_header() {
        let c = config("10.0.0.0/8", ClientHeader::XRealIp, true);
        assert_eq!(
            ip(&c, "10.0.0.1:1", &[("x-real-ip", " 1.1.1.1 ")]),
            "1.1.1.1".parse::<IpAddr>().unwrap()
        );
        assert_eq!(
            ip(&c, "10.0.0.1:1", &[("x-real-ip", "1.1.1.1, 2.2.2.2")]),
            "10.0.0.1".parse::<IpAddr>().unwrap()
        );
        assert_eq!(
            ip(
                &c,
                "10.0.0.1:1",
                &[("x-real-ip", "1.1.1.1"), ("x-real-ip", "2.2.2.2")]
            ),
            "10.0.0.1".parse::<IpAddr>().unwrap()
        );
    }

    #[test]
    fn forwarded_header() {
        let c = config("10.0.0.0/8", ClientHeader::Forwarded, true);
        let h = [
            (
                "forwarded",
                r#"for=6.6.6.6;proto=http, for="[2001:db8::1]:4711";proto=https;host=example.com"#,
            ),
            ("forwarded", "for=10.0.0.3;proto=http"),
        ];
        let r = resolve(&c, &info("10.0.0.1:1"), &headers(&h));
        assert_eq!(r.client.ip, "2001:db8::1".parse::<IpAddr>().unwrap());
        assert_eq!(r.client.port, Some(4711));
        assert_eq!(r.client.scheme, Scheme::Https);
        assert_eq!(r.client.host.unwrap(), "example.com");
        for bad in ["for=_hidden", "for=unknown", "proto=https", "for=\"1.1.1.1"] {
            assert_eq!(
                ip(&c, "10.0.0.1:1", &[("forwarded", bad)]),
                "10.0.0.1".parse::<IpAddr>().unwrap(),
                "{bad}"
            );
        }
        let off = config("10.0.0.0/8", ClientHeader::Forwarded, false);
        assert_eq!(
            ip(&off, "10.0.0.1:1", &h),
            "10.0.0.3".parse::<IpAddr>().unwrap()
        );
    }

    #[test]
    fn mapped_peer_is_canonical() {
        let c = config("127.0.0.1", ClientHeader::XForwardedFor, true);
        let r = resolve(
            &c,
            &info("[::ffff:127.0.0.1]:9"),
            &headers(&[("x-forwarded-for", "::ffff:1.2.3.4")]),
        );
        assert!(r.peer_trusted);
        assert_eq!(r.client.ip, "1.2.3.4".parse::<IpAddr>().unwrap());
    }
}
