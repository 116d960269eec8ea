//! Protocol versions and cipher suites by the names nginx users write: `ssl_protocols`
//! (`"TLSv1.2"`, `"TLSv1.3"`) and `ssl_ciphers` (OpenSSL names such as
//! `ECDHE-ECDSA-AES128-GCM-SHA256`, colon-separated), mapped to the suites of rustls'
//! ring provider.
//!
//! As with OpenSSL's `ssl_ciphers`, TLS 1.2 names restrict only the TLS 1.2 suites: a
//! list of TLS 1.2 names leaves every TLS 1.3 suite on. TLS 1.3 suites can be chosen too,
//! by their RFC names (`TLS_AES_128_GCM_SHA256`, what OpenSSL calls `Ciphersuites`): a
//! list that names any TLS 1.3 suite offers only the TLS 1.3 suites it names.
//!
//! ```
//! use proxy_tls::policy::{self, Protocol};
//! let protocols = policy::parse_protocols(["TLSv1.2", "TLSv1.3"]).unwrap();
//! assert_eq!(protocols, [Protocol::Tls12, Protocol::Tls13]);
//! let suites = policy::parse_ciphers(
//!     &policy::split_cipher_list("ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-RSA-AES128-GCM-SHA256"),
//!     &protocols,
//! )
//! .unwrap();
//! // The two TLS 1.2 suites named, then the three TLS 1.3 suites (untouched).
//! assert_eq!(suites.len(), 5);
//! assert!(policy::parse_protocols(["TLSv1.1"]).unwrap_err().to_string().contains("TLSv1.1"));
//! ```

use std::fmt;

use rustls::crypto::ring::cipher_suite as cs;
use rustls::SupportedCipherSuite;

/// A TLS protocol version rustls implements.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Protocol {
    /// TLS 1.2 (`"TLSv1.2"`).
    Tls12,
    /// TLS 1.3 (`"TLSv1.3"`).
    Tls13,
}

impl Protocol {
    /// The nginx/OpenSSL name: `"TLSv1.2"` or `"TLSv1.3"`.
    pub fn name(self) -> &'static str {
        match self {
            Protocol::Tls12 => "TLSv1.2",
            Protocol::Tls13 => "TLSv1.3",
        }
    }

    pub(crate) fn rustls(self) -> &'static rustls::SupportedProtocolVersion {
        match self {
            Protocol::Tls12 => &rustls::version::TLS12,
            Protocol::Tls13 => &rustls::version::TLS13,
        }
    }

    fn of(suite: &SupportedCipherSuite) -> Protocol {
        match suite {
            SupportedCipherSuite::Tls12(_) => Protocol::Tls12,
            SupportedCipherSuite::Tls13(_) => Protocol::Tls13,
        }
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A protocol or cipher name that cannot be used, with what to write instead.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicyError(String);

impl fmt::Display for PolicyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for PolicyError {}

/// Parse nginx's `ssl_protocols` names. Duplicates are ignored; an empty list and the
/// versions rustls does not implement (`SSLv2`, `SSLv3`, `TLSv1`, `TLSv1.1`) are errors.
pub fn parse_protocols<I, S>(names: I) -> Result<Vec<Protocol>, PolicyError>
where
    I: IntoIterator<Item = S>,
    S: AsRef<str>,
{
    let mut out = Vec::new();
    for name in names {
        let name = name.as_ref().trim();
        let p = match name {
            "TLSv1.2" => Protocol::Tls12,
            "TLSv1.3" => Protocol::Tls13,
            "SSLv2" | "SSLv3" | "TLSv1" | "TLSv1.1" => {
                return Err(PolicyError(format!(
                    "{name} is not supported (rustls implements only TLSv1.2 and TLSv1.3, \
                     the versions current browsers still offer)"
                )))
            }
            _ => {
                return Err(PolicyError(format!(
                    "unknown protocol {name:?}: expected \"TLSv1.2\" or \"TLSv1.3\""
                )))
            }
        };
        if !out.contains(&p) {
            out.push(p);
        }
    }
    if out.is_empty() {
        return Err(PolicyError(
            "no protocol: list at least one of \"TLSv1.2\", \"TLSv1.3\"".into(),
        ));
    }
    Ok(out)
}

/// Split an nginx `ssl_ciphers` string (`"A:B:C"`; spaces and commas also separate, as
/// OpenSSL allows) into names.
pub fn split_cipher_list(list: &str) -> Vec<&str> {
    list.split([':', ',', ' '])
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .collect()
}

/// Every suite this crate can offer, with its OpenSSL name, its RFC (IANA) name, and
/// the suite. TLS 1.3 suites have one name (OpenSSL uses the RFC name).
const SUITES: &[(&str, &str, SupportedCipherSuite)] = &[
    (
        "TLS_AES_256_GCM_SHA384",
        "TLS_AES_256_GCM_SHA384",
        cs::TLS13_AES_256_GCM_SHA384,
    ),
    (
        "TLS_AES_128_GCM_SHA256",
        "TLS_AES_128_GCM_SHA256",
        cs::TLS13_AES_128_GCM_SHA256,
    ),
    (
        "TLS_CHACHA20_POLY1305_SHA256",
        "TLS_CHACHA20_POLY1305_SHA256",
        cs::TLS13_CHACHA20_POLY1305_SHA256,
    ),
    (
        "ECDHE-ECDSA-AES256-GCM-SHA384",
        "TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384",
        cs::TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384,
    ),
    (
        "ECDHE-ECDSA-AES128-GCM-SHA256",
        "TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256",
        cs::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256,
    ),
    (
        "ECDHE-ECDSA-CHACHA20-POLY1305",
        "TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256",
        cs::TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256,
    ),
    (
        "ECDHE-RSA-AES256-GCM-SHA384",
        "TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384",
        cs::TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384,
    ),
    (
        "ECDHE-RSA-AES128-GCM-SHA256",
        "TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256",
        cs::TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256,
    ),
    (
        "ECDHE-RSA-CHACHA20-POLY1305",
        "TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256",
        cs::TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256,
    ),
];

/// The suite called `name` (OpenSSL or RFC name, case-insensitive).
pub fn cipher_suite(name: &str) -> Result<SupportedCipherSuite, PolicyError> {
    let found = SUITES.iter().find(|(openssl, rfc, _)| {
        openssl.eq_ignore_ascii_case(name) || rfc.eq_ignore_ascii_case(name)
    });
    if let Some((_, _, suite)) = found {
        return Ok(*suite);
    }
    let upper = name.to_ascii_uppercase();
    // OpenSSL's cipher-string language (`HIGH:!aNULL:!MD5`, nginx's default) selects by
    // property; rustls has no weak suites to exclude, so only explicit names are taken.
    let keyword = name.starts_with(['!', '-', '+', '@'])
        || matches!(
            upper.as_str(),
            "HIGH"
                | "MEDIUM"
                | "LOW"
                | "DEFAULT"
                | "ALL"
                | "COMPLEMENTOFDEFAULT"
                | "ECDHE"
                | "EECDH"
        );
    if keyword {
        return Err(PolicyError(format!(
            "{name:?}: OpenSSL cipher-string keywords are not supported; list suites by name \
             (rustls offers no weak suite, so there is nothing to exclude)"
        )));
    }
    // Real OpenSSL suites that rustls does not implement (CBC, plain RSA key exchange,
    // finite-field DHE, CCM): say so rather than "unknown".
    let known_elsewhere = upper.contains("CBC")
        || upper.contains("-SHA")
        || upper.contains("AES")
        || upper.contains("CHACHA")
        || upper.contains("CAMELLIA")
        || upper.contains("3DES")
        || upper.contains("RC4");
    if known_elsewhere {
        return Err(PolicyError(format!(
            "cipher {name:?} is not supported by rustls; supported: {}",
            supported_names()
        )));
    }
    Err(PolicyError(format!(
        "unknown cipher {name:?}; supported: {}",
        supported_names()
    )))
}

fn supported_names() -> String {
    SUITES
        .iter()
        .map(|(n, _, _)| *n)
        .collect::<Vec<_>>()
        .join(", ")
}

/// The suites to offer for `names` (in their order, duplicates dropped) and `protocols`.
///
/// TLS 1.2 names restrict the TLS 1.2 suites; TLS 1.3 names, when any is given, restrict
/// the TLS 1.3 suites, which are otherwise all kept (OpenSSL's `ssl_ciphers` semantics).
/// A list that leaves an enabled protocol without a suite is an error, as OpenSSL's
/// "no cipher match" is: a list of TLS 1.3 names alone with TLS 1.2 enabled is refused.
/// Suites of a protocol not in `protocols` are dropped.
pub fn parse_ciphers<S: AsRef<str>>(
    names: &[S],
    protocols: &[Protocol],
) -> Result<Vec<SupportedCipherSuite>, PolicyError> {
    let mut chosen: Vec<SupportedCipherSuite> = Vec::new();
    for name in names {
        let suite = cipher_suite(name.as_ref().trim())?;
        if !chosen.iter().any(|s| s.suite() == suite.suite()) {
            chosen.push(suite);
        }
    }
    if chosen.is_empty() {
        return Err(PolicyError("no cipher listed".into()));
    }
    if !chosen.iter().any(|s| Protocol::of(s) == Protocol::Tls13) {
        chosen.extend(
            SUITES
                .iter()
                .map(|(_, _, s)| *s)
                .filter(|s| Protocol::of(s) == Protocol::Tls13),
        );
    }
    chosen.retain(|s| protocols.contains(&Protocol::of(s)));
    for p in protocols {
        if !chosen.iter().any(|s| Protocol::of(s) == *p) {
            let hint = match p {
                Protocol::Tls12 => {
                    "add a TLS 1.2 suite (e.g. ECDHE-RSA-AES128-GCM-SHA256) or set protocols = [\"TLSv1.3\"]"
                }
                Protocol::Tls13 => "add a TLS 1.3 suite (e.g. TLS_AES_128_GCM_SHA256)",
            };
            return Err(PolicyError(format!(
                "the cipher list leaves {p} with no cipher suite: {hint}"
            )));
        }
    }
    Ok(chosen)
}

/// The ring provider's default suites for `protocols` (rustls' order).
pub fn default_suites(protocols: &[Protocol]) -> Vec<SupportedCipherSuite> {
    rustls::crypto::ring::DEFAULT_CIPHER_SUITES
        .iter()
        .copied()
        .filter(|s| protocols.contains(&Protocol::of(s)))
        .collect()
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use rustls::CipherSuite;

    #[test]
    fn protocols() {
        assert_eq!(
            parse_protocols(["TLSv1.3", "TLSv1.3"]).unwrap(),
            [Protocol::Tls13]
        );
        for old in ["SSLv3", "TLSv1", "TLSv1.1"] {
            let e = parse_protocols([old]).unwrap_err().to_string();
            assert!(e.contains(old) && e.contains("not supported"), "{e}");
        }
        assert!(parse_protocols(["tls1.2"])
            .unwrap_err()
            .0
            .contains("unknown"));
        assert!(parse_protocols(Vec::<&str>::new()).is_err());
    }

    #[test]
    fn guide_list_restricts_tls12_only() {
        let both = [Protocol::Tls12, Protocol::Tls13];
        let names = split_cipher_list("ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-RSA-AES128-GCM-SHA256");
        let s: Vec<CipherSuite> = parse_ciphers(&names, &both)
            .unwrap()
            .iter()
            .map(|s| s.suite())
            .collect();
        assert_eq!(
            &s[..2],
            [
                CipherSuite::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256,
                CipherSuite::TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256
            ]
        );
        assert_eq!(s.len(), 5);
        // TLS 1.3 only: the TLS 1.2 names are dropped, every TLS 1.3 suite stays.
        let only13 = parse_ciphers(&names, &[Protocol::Tls13]).unwrap();
        assert_eq!(only13.len(), 3);
    }

    #[test]
    fn tls13_names_restrict_tls13() {
        let s = parse_ciphers(
            &["TLS_AES_128_GCM_SHA256", "ECDHE-RSA-AES128-GCM-SHA256"],
            &[Protocol::Tls12, Protocol::Tls13],
        )
        .unwrap();
        assert_eq!(s.len(), 2);
        let e = parse_ciphers(
            &["TLS_AES_128_GCM_SHA256"],
            &[Protocol::Tls12, Protocol::Tls13],
        )
        .unwrap_err();
        assert!(e.0.contains("TLSv1.2 with no cipher suite"), "{e}");
        assert!(parse_ciphers(&["TLS_AES_128_GCM_SHA256"], &[Protocol::Tls13]).is_ok());
    }

    #[test]
    fn bad_names() {
        let both = [Protocol::Tls12, Protocol::Tls13];
        assert!(parse_ciphers(&["AES128-SHA"], &both)
            .unwrap_err()
            .0
            .contains("not supported by rustls"));
        assert!(parse_ciphers(&["DHE-RSA-AES128-GCM-SHA256"], &both)
            .unwrap_err()
            .0
            .contains("not supported"));
        assert!(parse_ciphers(&["HIGH", "!aNULL"], &both)
            .unwrap_err()
            .0
            .contains("keywords"));
        assert!(parse_ciphers(&["NOPE"], &both)
            .unwrap_err()
            .0
            .contains("unknown cipher"));
        assert!(parse_ciphers::<&str>(&[], &both).is_err());
        // RFC names and any case work.
        assert!(parse_ciphers(&["tls_ecdhe_rsa_with_aes_128_gcm_sha256"], &both).is_ok());
    }

    #[test]
    fn defaults_follow_protocols() {
        assert_eq!(default_suites(&[Protocol::Tls13]).len(), 3);
        assert_eq!(default_suites(&[Protocol::Tls12, Protocol::Tls13]).len(), 9);
    }
}
