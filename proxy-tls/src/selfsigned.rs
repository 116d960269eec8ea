//! Self-signed certificates for local development (what a laptop set-up would use
//! mkcert for): `localhost`, `127.0.0.1` and `::1`, or any names, generated in memory and
//! optionally written out as PEM so a browser or `curl --cacert` can be told to trust it.
//!
//! ```
//! let dev = proxy_tls::selfsigned::localhost().unwrap();
//! assert_eq!(dev.loaded.names(), ["localhost"]);
//! assert!(dev.cert_pem.starts_with("-----BEGIN CERTIFICATE-----"));
//! ```

use std::path::Path;

use crate::certs::LoadedCert;
use crate::error::{Error, Kind};

/// A generated certificate: the PEM texts and the loaded form.
#[derive(Clone)]
pub struct SelfSigned {
    /// The certificate, PEM.
    pub cert_pem: String,
    /// Its private key (ECDSA P-256, PKCS#8), PEM.
    pub key_pem: String,
    /// Ready for a [`CertStore`](crate::sni::CertStore).
    pub loaded: LoadedCert,
}

impl std::fmt::Debug for SelfSigned {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SelfSigned")
            .field("loaded", &self.loaded)
            .finish_non_exhaustive()
    }
}

/// A certificate for `localhost`, `127.0.0.1` and `::1`.
pub fn localhost() -> Result<SelfSigned, Error> {
    generate(&["localhost", "127.0.0.1", "::1"])
}

/// A self-signed certificate for these DNS names or IP addresses.
pub fn generate(names: &[&str]) -> Result<SelfSigned, Error> {
    let names: Vec<String> = names.iter().map(|s| (*s).to_owned()).collect();
    let generated = rcgen::generate_simple_self_signed(names)
        .map_err(|e| Error::with_source(Kind::Generate, e))?;
    let cert_pem = generated.cert.pem();
    let key_pem = generated.signing_key.serialize_pem();
    let loaded = LoadedCert::from_pem(cert_pem.as_bytes(), key_pem.as_bytes())?;
    Ok(SelfSigned {
        cert_pem,
        key_pem,
        loaded,
    })
}

impl SelfSigned {
    /// Write `cert.pem` (mode 0644) and `key.pem` (mode 0600) into `dir`, creating it.
    pub fn write_to(&self, dir: &Path) -> Result<(), Error> {
        std::fs::create_dir_all(dir).map_err(|e| Error::with_source(Kind::Io, e).at(dir))?;
        crate::fsutil::write_atomic(&dir.join("cert.pem"), self.cert_pem.as_bytes(), 0o644)?;
        crate::fsutil::write_atomic(&dir.join("key.pem"), self.key_pem.as_bytes(), 0o600)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn writes_pem_files_that_load_back() {
        let dir = tempfile::tempdir().unwrap();
        let dev = generate(&["dev.test"]).unwrap();
        dev.write_to(dir.path()).unwrap();
        let back =
            crate::certs::load_pem_files(dir.path().join("cert.pem"), dir.path().join("key.pem"))
                .unwrap();
        assert_eq!(back.names(), ["dev.test"]);
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(dir.path().join("key.pem"))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600);
        }
    }
}
