//! [`Reloader`]: certificates re-read from their files on demand (the binary calls
//! [`Reloader::reload`] on SIGHUP) and when the files change on disk, swapped into the
//! [`CertStore`] atomically. New handshakes get the new certificate; established
//! connections keep the one they negotiated. A file that fails to load (half written,
//! wrong key, garbage) keeps the old certificate in service and is logged with the reason.
//!
//! Changes are found by polling: each file is read and hashed on an interval (default
//! 5 s) rather than watched with inotify. It needs no extra dependency, sees certbot's
//! symlink swaps in `live/` (reads follow the link), works on network and
//! container-mounted filesystems where inotify events never arrive, and costs reading a
//! few kilobytes per certificate per interval. Hashing content rather than comparing
//! modification times also catches two writes within the filesystem's timestamp
//! granularity.
//!
//! Every load also checks the expiry: a certificate expiring within 14 days is logged as
//! a warning (and again once a day by the watcher).
//!
//! ```
//! use proxy_tls::{reload::Reloader, selfsigned, sni::CertStore};
//! let dir = tempfile::tempdir().unwrap();
//! selfsigned::generate(&["one.test"]).unwrap().write_to(dir.path()).unwrap();
//! let store = CertStore::new();
//! let reloader = Reloader::new(store.clone())
//!     .with_files("site", dir.path().join("cert.pem"), dir.path().join("key.pem"));
//! reloader.load().unwrap(); // at start-up a bad file is an error
//! assert_eq!(&*store.certificates()[0].names[0], "one.test");
//!
//! selfsigned::generate(&["two.test"]).unwrap().write_to(dir.path()).unwrap();
//! let report = reloader.reload(); // later, a bad file only logs and keeps the old one
//! assert_eq!((report.reloaded, report.failed.len()), (1, 0));
//! assert_eq!(&*store.certificates()[0].names[0], "two.test");
//! ```

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use crate::certs::load_pem_files;
use crate::error::Error;
use crate::sni::CertStore;

/// Certificates expiring within this window are warned about.
pub const EXPIRY_WARNING: Duration = Duration::from_secs(14 * 24 * 3600);

/// Default interval between two looks at the files.
pub const DEFAULT_POLL_INTERVAL: Duration = Duration::from_secs(5);

/// Re-reads certificate files into a [`CertStore`]. Cheap to clone. See the
/// [module docs](self).
#[derive(Clone)]
pub struct Reloader {
    store: CertStore,
    files: Arc<[CertFiles]>,
    /// What each file pair looked like when last read (attempts included, so a broken
    /// file is reported once, not at every poll).
    seen: Arc<Mutex<Vec<Option<Fingerprint>>>>,
}

#[derive(Debug, Clone)]
struct CertFiles {
    id: Arc<str>,
    cert: PathBuf,
    key: PathBuf,
}

/// A hash of a file's content, `None` when it cannot be read.
type FileStamp = u64;

type Fingerprint = (Option<FileStamp>, Option<FileStamp>);

/// What a [`Reloader::reload`] did.
#[derive(Debug, Default)]
#[non_exhaustive]
pub struct ReloadReport {
    /// Certificates read and swapped in.
    pub reloaded: usize,
    /// Certificates that failed to load and kept their previous version, with why.
    pub failed: Vec<(Arc<str>, Error)>,
}

impl Reloader {
    /// A reloader feeding `store`, with no files yet.
    pub fn new(store: CertStore) -> Self {
        Reloader {
            store,
            files: Arc::from(Vec::new()),
            seen: Arc::default(),
        }
    }

    /// Also manage the certificate `id` read from `cert` (a PEM chain, leaf first) and
    /// `key` (may be the same file).
    pub fn with_files(
        mut self,
        id: impl Into<Arc<str>>,
        cert: impl Into<PathBuf>,
        key: impl Into<PathBuf>,
    ) -> Self {
        let mut files = self.files.to_vec();
        files.push(CertFiles {
            id: id.into(),
            cert: cert.into(),
            key: key.into(),
        });
        self.files = files.into();
        self
    }

    /// The store this reloader feeds.
    pub fn store(&self) -> &CertStore {
        &self.store
    }

    /// Load every certificate, failing on the first bad one (start-up and config check).
    pub fn load(&self) -> Result<(), Error> {
        for (i, f) in self.files.iter().enumerate() {
            let stamp = fingerprint(f);
            let cert = load_pem_files(&f.cert, &f.key)?;
            warn_if_expiring(&f.id, &cert, SystemTime::now());
            self.store.insert(f.id.clone(), cert);
            self.remember(i, stamp);
        }
        Ok(())
    }

    /// Re-read every certificate now (SIGHUP). Each good file is swapped in; each bad one
    /// keeps the certificate in service and is logged. Blocking file I/O: from async
    /// code call it in `spawn_blocking`.
    pub fn reload(&self) -> ReloadReport {
        let mut report = ReloadReport::default();
        for i in 0..self.files.len() {
            self.reload_one(i, &mut report);
        }
        report
    }

    /// Re-read only the certificates whose files changed since they were last read.
    pub fn reload_changed(&self) -> ReloadReport {
        let mut report = ReloadReport::default();
        for (i, f) in self.files.iter().enumerate() {
            let stamp = fingerprint(f);
            let changed = self.lock().get(i).copied().flatten() != Some(stamp);
            if changed {
                self.reload_one(i, &mut report);
            }
        }
        report
    }

    /// Poll the files every `interval` and reload the ones that changed; also repeat the
    /// expiry warnings once a day. Runs until the returned task is aborted.
    pub fn spawn_watcher(&self, interval: Duration) -> tokio::task::JoinHandle<()> {
        let this = self.clone();
        tokio::spawn(async move {
            let mut ticker = tokio::time::interval(interval);
            ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let day = Duration::from_secs(24 * 3600);
            let mut last_warning = tokio::time::Instant::now();
            ticker.tick().await;
            loop {
                ticker.tick().await;
                let worker = this.clone();
                // File reads and key parsing are blocking work: keep them off the
                // reactor threads.
                let _ = tokio::task::spawn_blocking(move || worker.reload_changed()).await;
                if last_warning.elapsed() >= day {
                    last_warning = tokio::time::Instant::now();
                    for c in this.store.certificates() {
                        if c.not_after <= SystemTime::now() + EXPIRY_WARNING {
                            tracing::warn!(id = %c.id, expires = ?c.not_after, "certificate expires within 14 days");
                        }
                    }
                }
            }
        })
    }

    fn reload_one(&self, i: usize, report: &mut ReloadReport) {
        let Some(f) = self.files.get(i) else { return };
        let stamp = fingerprint(f);
        match load_pem_files(&f.cert, &f.key) {
            Ok(cert) => {
                warn_if_expiring(&f.id, &cert, SystemTime::now());
                tracing::info!(id = %f.id, names = ?cert.names(), "certificate reloaded");
                self.store.insert(f.id.clone(), cert);
                report.reloaded += 1;
            }
            Err(e) => {
                tracing::warn!(id = %f.id, error = %e, "certificate reload failed; keeping the previous certificate");
                report.failed.push((f.id.clone(), e));
            }
        }
        self.remember(i, stamp);
    }

    fn remember(&self, i: usize, stamp: Fingerprint) {
        let mut seen = self.lock();
        if seen.len() < self.files.len() {
            seen.resize(self.files.len(), None);
        }
        if let Some(slot) = seen.get_mut(i) {
            *slot = Some(stamp);
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Option<Fingerprint>>> {
        self.seen
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

impl std::fmt::Debug for Reloader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Reloader")
            .field("files", &self.files)
            .finish()
    }
}

fn fingerprint(f: &CertFiles) -> Fingerprint {
    (stamp(&f.cert), stamp(&f.key))
}

fn stamp(path: &Path) -> Option<FileStamp> {
    use std::hash::{Hash, Hasher};
    // The content, not the mtime: two writes within the filesystem's timestamp
    // granularity (a few ms) would otherwise look unchanged.
    let data = crate::certs::read_bounded(path).ok()?;
    let mut h = std::collections::hash_map::DefaultHasher::new();
    data.hash(&mut h);
    Some(h.finish())
}

/// Log a warning when `cert` expires within [`EXPIRY_WARNING`] of `now`.
pub(crate) fn warn_if_expiring(id: &str, cert: &crate::certs::LoadedCert, now: SystemTime) -> bool {
    let expiring = cert.expires_within(now, EXPIRY_WARNING);
    if expiring {
        tracing::warn!(id, names = ?cert.names(), expires = ?cert.not_after(), "certificate expires within 14 days");
    }
    expiring
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use crate::selfsigned;

    #[test]
    fn broken_replacement_keeps_the_old_certificate() {
        let dir = tempfile::tempdir().unwrap();
        selfsigned::generate(&["old.test"])
            .unwrap()
            .write_to(dir.path())
            .unwrap();
        let store = CertStore::new();
        let r = Reloader::new(store.clone()).with_files(
            "s",
            dir.path().join("cert.pem"),
            dir.path().join("key.pem"),
        );
        r.load().unwrap();
        // A new certificate with the old key: a mismatch, as when a deploy is half done.
        let new = selfsigned::generate(&["new.test"]).unwrap();
        std::fs::write(dir.path().join("cert.pem"), &new.cert_pem).unwrap();
        let report = r.reload_changed();
        assert_eq!(report.failed.len(), 1);
        assert_eq!(&*store.certificates()[0].names[0], "old.test");
        // Unchanged since the failed attempt: not retried, not logged again.
        assert_eq!(r.reload_changed().failed.len(), 0);
        // The key lands: the pair is complete and swapped in.
        std::fs::write(dir.path().join("key.pem"), &new.key_pem).unwrap();
        assert_eq!(r.reload_changed().reloaded, 1);
        assert_eq!(&*store.certificates()[0].names[0], "new.test");
    }

    #[test]
    fn expiry_window() {
        let dev = selfsigned::generate(&["x.test"]).unwrap();
        let now = SystemTime::now();
        assert!(!warn_if_expiring("x", &dev.loaded, now));
        let later = dev.loaded.not_after() - Duration::from_secs(3600);
        assert!(warn_if_expiring("x", &dev.loaded, later));
    }

    #[test]
    fn startup_load_fails_on_a_missing_file() {
        let r = Reloader::new(CertStore::new()).with_files("s", "/nonexistent/c", "/nonexistent/k");
        assert!(r.load().is_err());
    }
}
