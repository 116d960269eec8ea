//! What a limit counts by: the real client address, a request header, or one shared key.

use std::hash::BuildHasher;
use std::net::IpAddr;

use http::HeaderName;

use crate::client_info::client_ip;

/// What requests are counted by (nginx's `limit_req_zone <key>`). Requests whose key is
/// empty (no client address known, header absent or empty) are not counted, as in nginx.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum Key {
    /// The real client address ([`client_ip`]: the forwarded-headers layer's
    /// `RealClient`, else the socket peer), like `$binary_remote_addr`.
    #[default]
    ClientIp,
    /// The first value of a request header, like `$http_x_api_key`.
    Header(HeaderName),
    /// One key for every request: the whole location shares one budget.
    Shared,
}

/// A key reduced to a fixed-size fingerprint plus the hash that places it in a shard.
///
/// Addresses are kept exactly (IPv4 as its IPv6-mapped form); header values, which are
/// unbounded, as 128 bits of two independently keyed SipHashes, so a zone entry has a
/// fixed size and an attacker who does not know the per-zone keys cannot aim collisions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Prehashed {
    pub(crate) hash: u64,
    pub(crate) fp: [u64; 2],
}

/// The per-zone random hash keys.
#[derive(Debug, Clone)]
pub(crate) struct Hashers {
    a: std::collections::hash_map::RandomState,
    b: std::collections::hash_map::RandomState,
}

impl Hashers {
    pub(crate) fn new() -> Self {
        Hashers {
            a: Default::default(),
            b: Default::default(),
        }
    }
}

impl Key {
    /// The fingerprint of `req`'s key, or `None` when the key is empty.
    pub(crate) fn of<B>(&self, req: &http::Request<B>, h: &Hashers) -> Option<Prehashed> {
        match self {
            Key::ClientIp => client_ip(req).map(|ip| ip_key(ip, h)),
            Key::Header(name) => {
                let v = req.headers().get(name)?.as_bytes();
                if v.is_empty() {
                    return None;
                }
                let x = h.a.hash_one(v);
                Some(Prehashed {
                    hash: x,
                    fp: [x, h.b.hash_one(v)],
                })
            }
            Key::Shared => Some(Prehashed {
                hash: 0,
                fp: [0, 0],
            }),
        }
    }
}

pub(crate) fn ip_key(ip: IpAddr, h: &Hashers) -> Prehashed {
    let v6 = match ip {
        IpAddr::V4(v4) => v4.to_ipv6_mapped(),
        IpAddr::V6(v6) => v6,
    };
    let bits = u128::from(v6);
    // Truncations are the intent: the two halves of the address.
    let fp = [(bits >> 64) as u64, bits as u64];
    Prehashed {
        hash: h.a.hash_one(fp),
        fp,
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use crate::client_info::{ClientInfo, RealClient, Scheme};

    fn req_from(peer: &str) -> http::Request<()> {
        let mut req = http::Request::new(());
        req.extensions_mut().insert(ClientInfo::new(
            peer.parse().unwrap(),
            "127.0.0.1:80".parse().unwrap(),
            Scheme::Http,
        ));
        req
    }

    #[test]
    fn client_ip_key_prefers_real_client_and_ignores_port() {
        let h = Hashers::new();
        let a = Key::ClientIp.of(&req_from("10.0.0.1:1"), &h).unwrap();
        let b = Key::ClientIp.of(&req_from("10.0.0.1:2"), &h).unwrap();
        let c = Key::ClientIp.of(&req_from("10.0.0.2:1"), &h).unwrap();
        assert_eq!(a, b);
        assert_ne!(a, c);
        let mut r = req_from("10.0.0.2:1");
        r.extensions_mut().insert(RealClient {
            ip: "10.0.0.1".parse().unwrap(),
            port: None,
            scheme: Scheme::Http,
            host: None,
        });
        assert_eq!(Key::ClientIp.of(&r, &h), Some(a));
        assert_eq!(Key::ClientIp.of(&http::Request::new(()), &h), None);
    }

    #[test]
    fn header_key_empty_is_not_counted() {
        let h = Hashers::new();
        let k = Key::Header(HeaderName::from_static("x-api-key"));
        let mut r = http::Request::new(());
        assert_eq!(k.of(&r, &h), None);
        r.headers_mut().insert("x-api-key", "".parse().unwrap());
        assert_eq!(k.of(&r, &h), None);
        r.headers_mut().insert("x-api-key", "abc".parse().unwrap());
        let abc = k.of(&r, &h).unwrap();
        r.headers_mut().insert("x-api-key", "abd".parse().unwrap());
        assert_ne!(k.of(&r, &h), Some(abc));
        assert!(Key::Shared.of(&r, &h).is_some());
    }
}
