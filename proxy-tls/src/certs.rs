//! Loading certificates and keys: PEM files with a full chain (leaf first), RSA, ECDSA or
//! Ed25519 keys in PKCS#1, PKCS#8 or SEC1 form. The key must match the leaf certificate.
//! The names a certificate serves (its DNS SANs) and its expiry are read once, at load.
//!
//! ```
//! use proxy_tls::certs::LoadedCert;
//! let key = rcgen::KeyPair::generate().unwrap();
//! let cert = rcgen::CertificateParams::new(vec!["example.test".into(), "*.example.test".into()])
//!     .unwrap()
//!     .self_signed(&key)
//!     .unwrap();
//! let loaded = LoadedCert::from_pem(cert.pem().as_bytes(), key.serialize_pem().as_bytes()).unwrap();
//! assert_eq!(loaded.names(), ["example.test", "*.example.test"]);
//! assert!(loaded.not_after() > std::time::SystemTime::now());
//! ```

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rustls::sign::CertifiedKey;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

use crate::error::{Error, Kind};

/// Largest PEM file read (a chain of a few certificates is ~10 KiB).
const MAX_PEM_BYTES: u64 = 1 << 20;

/// A certificate chain with its key, ready for rustls, plus the facts the store and the
/// metrics need. Cheap to clone.
#[derive(Clone)]
pub struct LoadedCert {
    key: Arc<CertifiedKey>,
    names: Arc<[String]>,
    not_before: SystemTime,
    not_after: SystemTime,
}

impl LoadedCert {
    /// Parse a PEM chain (leaf first) and a PEM private key.
    pub fn from_pem(cert_pem: &[u8], key_pem: &[u8]) -> Result<Self, Error> {
        let chain = CertificateDer::pem_slice_iter(cert_pem)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| Error::with_source(Kind::Pem, e))?;
        let key = PrivateKeyDer::from_pem_slice(key_pem).map_err(|e| match e {
            rustls_pki_types::pem::Error::NoItemsFound => {
                Error::with_source(Kind::Pem, "no private key found")
            }
            e => Error::with_source(Kind::Pem, e),
        })?;
        Self::from_der(chain, key)
    }

    /// Build from a DER chain (leaf first) and key.
    pub fn from_der(
        chain: Vec<CertificateDer<'static>>,
        key: PrivateKeyDer<'static>,
    ) -> Result<Self, Error> {
        let Some(leaf) = chain.first() else {
            return Err(Error::with_source(Kind::Pem, "no certificate found"));
        };
        let facts = leaf_facts(leaf)?;
        let provider = rustls::crypto::ring::default_provider();
        // `from_der` also checks that the key's public half is the leaf's.
        let key = CertifiedKey::from_der(chain, key, &provider)
            .map_err(|e| Error::with_source(Kind::Key, e))?;
        Ok(LoadedCert {
            key: Arc::new(key),
            names: facts.names.into(),
            not_before: facts.not_before,
            not_after: facts.not_after,
        })
    }

    /// The rustls certificate and signing key.
    pub fn certified_key(&self) -> &Arc<CertifiedKey> {
        &self.key
    }

    /// The same certificate with `response` as its stapled OCSP response (`None`: none).
    pub fn with_ocsp(&self, response: Option<Vec<u8>>) -> LoadedCert {
        let mut key = (*self.key).clone();
        key.ocsp = response;
        LoadedCert {
            key: Arc::new(key),
            ..self.clone()
        }
    }

    /// The leaf certificate (DER).
    pub fn leaf(&self) -> Option<&CertificateDer<'static>> {
        self.key.cert.first()
    }

    /// The DNS names the certificate is valid for, lowercase, wildcards as `*.example.com`.
    pub fn names(&self) -> &[String] {
        &self.names
    }

    /// Start of the leaf certificate's validity.
    pub fn not_before(&self) -> SystemTime {
        self.not_before
    }

    /// End of the leaf certificate's validity (the expiry metric).
    pub fn not_after(&self) -> SystemTime {
        self.not_after
    }

    /// Whether the certificate expires within `window` from `now` (or already has).
    pub fn expires_within(&self, now: SystemTime, window: Duration) -> bool {
        self.not_after <= now + window
    }
}

impl std::fmt::Debug for LoadedCert {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LoadedCert")
            .field("names", &self.names)
            .field("not_after", &self.not_after)
            .finish()
    }
}

/// Read and parse a certificate chain file and a key file (they may be the same file).
pub fn load_pem_files(
    cert_path: impl AsRef<Path>,
    key_path: impl AsRef<Path>,
) -> Result<LoadedCert, Error> {
    let (cert_path, key_path) = (cert_path.as_ref(), key_path.as_ref());
    let cert_pem = read_bounded(cert_path)?;
    let key_pem = if key_path == cert_path {
        cert_pem.clone()
    } else {
        read_bounded(key_path)?
    };
    let chain = CertificateDer::pem_slice_iter(&cert_pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| Error::with_source(Kind::Pem, e).at(cert_path))?;
    if chain.is_empty() {
        return Err(Error::with_source(Kind::Pem, "no certificate found").at(cert_path));
    }
    let key = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|e| match e {
        rustls_pki_types::pem::Error::NoItemsFound => {
            Error::with_source(Kind::Pem, "no private key found").at(key_path)
        }
        e => Error::with_source(Kind::Pem, e).at(key_path),
    })?;
    LoadedCert::from_der(chain, key).map_err(|e| match e.kind() {
        Kind::Key => e.at(key_path),
        _ => e.at(cert_path),
    })
}

/// Read a whole file, refusing anything larger than a PEM file can sensibly be.
pub(crate) fn read_bounded(path: &Path) -> Result<Vec<u8>, Error> {
    use std::io::Read;
    let file = std::fs::File::open(path).map_err(|e| Error::with_source(Kind::Io, e).at(path))?;
    let mut buf = Vec::new();
    file.take(MAX_PEM_BYTES + 1)
        .read_to_end(&mut buf)
        .map_err(|e| Error::with_source(Kind::Io, e).at(path))?;
    if buf.len() as u64 > MAX_PEM_BYTES {
        return Err(Error::with_source(Kind::Pem, "file larger than 1 MiB").at(path));
    }
    Ok(buf)
}

struct LeafFacts {
    names: Vec<String>,
    not_before: SystemTime,
    not_after: SystemTime,
}

/// SANs and validity of the leaf. Without a SAN extension, the subject's common name is
/// used (legacy certificates); a certificate with neither serves only as a default.
fn leaf_facts(leaf: &CertificateDer<'_>) -> Result<LeafFacts, Error> {
    use x509_parser::extensions::GeneralName;
    let (_, cert) = x509_parser::parse_x509_certificate(leaf.as_ref())
        .map_err(|e| Error::with_source(Kind::Certificate, e.to_string()))?;
    let mut names = Vec::new();
    match cert.subject_alternative_name() {
        Ok(Some(san)) => {
            for name in &san.value.general_names {
                if let GeneralName::DNSName(dns) = name {
                    push_name(&mut names, dns);
                }
            }
        }
        Ok(None) => {
            for cn in cert.subject().iter_common_name() {
                if let Ok(cn) = cn.as_str() {
                    push_name(&mut names, cn);
                }
            }
        }
        Err(e) => return Err(Error::with_source(Kind::Certificate, e.to_string())),
    }
    let validity = cert.validity();
    Ok(LeafFacts {
        names,
        not_before: to_system_time(validity.not_before.timestamp()),
        not_after: to_system_time(validity.not_after.timestamp()),
    })
}

fn push_name(names: &mut Vec<String>, name: &str) {
    let name = name.trim_end_matches('.').to_ascii_lowercase();
    if is_valid_name(&name) && !names.iter().any(|n| **n == *name) {
        names.push(name);
    } else {
        tracing::debug!(name, "certificate name ignored");
    }
}

/// A DNS name (`a.example.com`) or a wildcard of exactly one leftmost label
/// (`*.example.com`). Lowercase ASCII expected.
pub(crate) fn is_valid_name(name: &str) -> bool {
    let rest = name.strip_prefix("*.").unwrap_or(name);
    !rest.is_empty()
        && rest.len() <= 253
        && rest.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_')
        })
}

fn to_system_time(secs: i64) -> SystemTime {
    match u64::try_from(secs) {
        Ok(s) => UNIX_EPOCH + Duration::from_secs(s),
        Err(_) => UNIX_EPOCH,
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn gen(alg: &'static rcgen::SignatureAlgorithm, names: &[&str]) -> (String, String) {
        let key = rcgen::KeyPair::generate_for(alg).unwrap();
        let names = names.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let cert = rcgen::CertificateParams::new(names)
            .unwrap()
            .self_signed(&key)
            .unwrap();
        (cert.pem(), key.serialize_pem())
    }

    #[test]
    fn ecdsa_pkcs8_and_ed25519() {
        for alg in [
            &rcgen::PKCS_ECDSA_P256_SHA256,
            &rcgen::PKCS_ECDSA_P384_SHA384,
            &rcgen::PKCS_ED25519,
        ] {
            let (c, k) = gen(alg, &["A.Example.TEST"]);
            let l = LoadedCert::from_pem(c.as_bytes(), k.as_bytes()).unwrap();
            assert_eq!(l.names(), ["a.example.test"]);
        }
    }

    #[test]
    fn rsa_pkcs1_and_ec_sec1_fixtures() {
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures");
        let rsa = load_pem_files(format!("{dir}/rsa.crt"), format!("{dir}/rsa-pkcs1.key")).unwrap();
        assert_eq!(rsa.names(), ["rsa.test"]);
        let ec = load_pem_files(format!("{dir}/ec.crt"), format!("{dir}/ec-sec1.key")).unwrap();
        assert_eq!(ec.names(), ["ec.test"]);
    }

    #[test]
    fn full_chain_keeps_every_certificate() {
        let ca_key = rcgen::KeyPair::generate().unwrap();
        let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let ca = ca_params.self_signed(&ca_key).unwrap();
        let issuer = rcgen::Issuer::new(ca_params, ca_key);
        let key = rcgen::KeyPair::generate().unwrap();
        let leaf = rcgen::CertificateParams::new(vec!["leaf.test".to_string()])
            .unwrap()
            .signed_by(&key, &issuer)
            .unwrap();
        let chain = format!("{}{}", leaf.pem(), ca.pem());
        let l = LoadedCert::from_pem(chain.as_bytes(), key.serialize_pem().as_bytes()).unwrap();
        assert_eq!(l.certified_key().cert.len(), 2);
        assert_eq!(l.names(), ["leaf.test"]);
    }

    #[test]
    fn mismatched_key_is_refused() {
        let (c, _) = gen(&rcgen::PKCS_ECDSA_P256_SHA256, &["a.test"]);
        let (_, k) = gen(&rcgen::PKCS_ECDSA_P256_SHA256, &["a.test"]);
        let e = LoadedCert::from_pem(c.as_bytes(), k.as_bytes()).unwrap_err();
        assert_eq!(e.kind(), Kind::Key);
    }

    #[test]
    fn missing_parts_are_pem_errors() {
        let (c, k) = gen(&rcgen::PKCS_ECDSA_P256_SHA256, &["a.test"]);
        assert_eq!(
            LoadedCert::from_pem(b"", k.as_bytes()).unwrap_err().kind(),
            Kind::Pem
        );
        assert_eq!(
            LoadedCert::from_pem(c.as_bytes(), b"garbage")
                .unwrap_err()
                .kind(),
            Kind::Pem
        );
        let truncated = &c.as_bytes()[..c.len() / 2];
        assert!(LoadedCert::from_pem(truncated, k.as_bytes()).is_err());
    }

    #[test]
    fn names_validation() {
        assert!(is_valid_name("a.b"));
        assert!(is_valid_name("*.b.c"));
        assert!(!is_valid_name("*"));
        assert!(!is_valid_name("*."));
        assert!(!is_valid_name("a.*.c"));
        assert!(!is_valid_name("a..c"));
        assert!(!is_valid_name(""));
    }

    proptest! {
        #[test]
        fn pem_parsing_never_panics(cert in proptest::collection::vec(any::<u8>(), 0..512),
                                    key in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = LoadedCert::from_pem(&cert, &key);
        }

        #[test]
        fn pem_with_garbage_body_never_panics(body in "[A-Za-z0-9+/=\n]{0,400}") {
            let pem = format!("-----BEGIN CERTIFICATE-----\n{body}\n-----END CERTIFICATE-----\n");
            let _ = LoadedCert::from_pem(pem.as_bytes(), pem.as_bytes());
        }

        #[test]
        fn name_check_never_panics(s in "\\PC{0,80}") {
            let _ = is_valid_name(&s);
        }
    }
}
