//! The crate's error type: one opaque [`Error`] with a [`Kind`] and, for file errors, the
//! path that failed. TLS errors never reach a client as an HTTP response (a failed
//! handshake has no HTTP yet); these errors come out of loading, reloading and obtaining
//! certificates, and are logged by the reloader and the ACME task.
//!
//! ```
//! use proxy_tls::error::{Error, Kind};
//! let e = proxy_tls::certs::load_pem_files("/nonexistent.crt", "/nonexistent.key").unwrap_err();
//! assert_eq!(e.kind(), Kind::Io);
//! assert!(e.to_string().contains("/nonexistent.crt"));
//! ```

use std::fmt;
use std::path::{Path, PathBuf};

/// A boxed, thread-safe cause.
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// What went wrong.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Kind {
    /// A file could not be read or written.
    Io,
    /// A PEM file held no certificate, no private key, or something unparseable.
    Pem,
    /// A certificate could not be parsed as X.509, or has no usable names.
    Certificate,
    /// The private key is of an unsupported type, or does not match the certificate.
    Key,
    /// Building the rustls configuration failed.
    Config,
    /// Generating a certificate (self-signed, CSR) failed.
    Generate,
    /// Talking to the ACME server failed, or it refused the order.
    Acme,
    /// An OCSP response could not be fetched, or failed its checks.
    Ocsp,
}

/// A certificate loading, generation or ACME failure. See the [module docs](self).
pub struct Error {
    kind: Kind,
    path: Option<PathBuf>,
    source: Option<BoxError>,
}

impl Error {
    /// An error of `kind` with no cause.
    pub fn new(kind: Kind) -> Self {
        Error {
            kind,
            path: None,
            source: None,
        }
    }

    /// An error of `kind` caused by `source`.
    pub fn with_source(kind: Kind, source: impl Into<BoxError>) -> Self {
        Error {
            kind,
            path: None,
            source: Some(source.into()),
        }
    }

    /// The same error, naming the file it concerns.
    pub fn at(mut self, path: impl AsRef<Path>) -> Self {
        self.path = Some(path.as_ref().to_path_buf());
        self
    }

    /// What went wrong.
    pub fn kind(&self) -> Kind {
        self.kind
    }

    /// The file concerned, if any.
    pub fn path(&self) -> Option<&Path> {
        self.path.as_deref()
    }
}

impl fmt::Debug for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut d = f.debug_struct("Error");
        d.field("kind", &self.kind);
        if let Some(p) = &self.path {
            d.field("path", p);
        }
        if let Some(s) = &self.source {
            d.field("source", s);
        }
        d.finish()
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let what = match self.kind {
            Kind::Io => "file error",
            Kind::Pem => "invalid PEM",
            Kind::Certificate => "invalid certificate",
            Kind::Key => "invalid private key",
            Kind::Config => "invalid TLS configuration",
            Kind::Generate => "certificate generation failed",
            Kind::Acme => "ACME failed",
            Kind::Ocsp => "OCSP",
        };
        f.write_str(what)?;
        if let Some(p) = &self.path {
            write!(f, " ({})", p.display())?;
        }
        if let Some(s) = &self.source {
            write!(f, ": {s}")?;
        }
        Ok(())
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.source
            .as_deref()
            .map(|e| e as &(dyn std::error::Error + 'static))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn display_names_path_and_cause() {
        let e = Error::with_source(Kind::Key, "key does not match certificate").at("/etc/x.key");
        let s = e.to_string();
        assert!(s.starts_with("invalid private key (/etc/x.key): key does not match"));
        assert!(std::error::Error::source(&e).is_some());
        assert_eq!(e.path(), Some(Path::new("/etc/x.key")));
    }
}
