//! [`AcmeManager`]: automatic certificates from an ACME directory (Let's Encrypt, ZeroSSL,
//! a private CA, Pebble in tests) with the HTTP-01 challenge, as Caddy and Traefik do.
//!
//! For one certificate (one or more names) the manager:
//! 1. loads the certificate and key stored in its directory, if they exist and are not
//!    due for renewal, and serves them at once;
//! 2. otherwise creates (or reuses) an ACME account, orders a certificate, publishes each
//!    HTTP-01 key authorization in a [`ChallengeStore`] that the plain-HTTP listener's
//!    [`AcmeChallengeLayer`](crate::challenge::AcmeChallengeLayer) answers from, waits for
//!    validation, finalizes with a fresh ECDSA P-256 key, and downloads the chain;
//! 3. stores chain and key (mode 0600, written atomically) and hot-swaps the certificate
//!    into the [`CertStore`];
//! 4. sleeps until two thirds of the certificate's lifetime have passed and renews it;
//!    a failure is logged and retried with a growing delay (1 min doubling up to 6 h),
//!    while the old certificate stays in service.
//!
//! The names must resolve to this host and port 80 must reach the plain listener (the
//! ACME server connects to it), which is the operator's business, as with certbot.
//!
//! ```no_run
//! use proxy_tls::{acme::AcmeManager, challenge::ChallengeStore, sni::CertStore};
//! # async fn run() -> Result<(), proxy_tls::Error> {
//! let store = CertStore::new();
//! let challenges = ChallengeStore::new();
//! let acme = AcmeManager::builder("https://acme-v02.api.letsencrypt.org/directory", ["example.com"])
//!     .contact("mailto:ops@example.com")
//!     .cache_dir("/var/lib/proxy/acme")
//!     .build(store.clone(), challenges.clone())?;
//! acme.ensure().await?;   // a certificate is served from here on
//! let _task = acme.spawn(); // renews it in the background
//! # Ok(()) }
//! ```

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use instant_acme::{
    Account, AccountCredentials, AuthorizationStatus, ChallengeType, Identifier, NewAccount,
    NewOrder, OrderStatus, RetryPolicy,
};

use crate::certs::{load_pem_files, LoadedCert};
use crate::challenge::ChallengeStore;
use crate::error::{Error, Kind};
use crate::fsutil::write_atomic;
use crate::sni::CertStore;

/// Renew when this fraction of the lifetime has passed (a 90-day certificate at day 60).
pub const DEFAULT_RENEW_FRACTION: f64 = 2.0 / 3.0;

const FIRST_RETRY: Duration = Duration::from_secs(60);
const MAX_RETRY: Duration = Duration::from_secs(6 * 3600);

/// Obtains, stores, renews and hot-swaps one certificate. Cheap to clone. See the
/// [module docs](self).
#[derive(Clone)]
pub struct AcmeManager {
    config: Arc<Config>,
    store: CertStore,
    challenges: ChallengeStore,
}

struct Config {
    directory_url: String,
    names: Vec<String>,
    contact: Vec<String>,
    cache_dir: PathBuf,
    root_ca: Option<PathBuf>,
    renew_fraction: f64,
    id: Arc<str>,
    poll_timeout: Duration,
}

/// Configures an [`AcmeManager`]; from [`AcmeManager::builder`].
#[derive(Debug)]
pub struct AcmeBuilder {
    directory_url: String,
    names: Vec<String>,
    contact: Vec<String>,
    cache_dir: PathBuf,
    root_ca: Option<PathBuf>,
    renew_fraction: f64,
    id: Option<String>,
    poll_timeout: Duration,
}

impl AcmeManager {
    /// A certificate for `names` (the first is the store id unless [`AcmeBuilder::id`] is
    /// set) from the ACME directory at `directory_url`.
    pub fn builder<I, N>(directory_url: impl Into<String>, names: I) -> AcmeBuilder
    where
        I: IntoIterator<Item = N>,
        N: Into<String>,
    {
        AcmeBuilder {
            directory_url: directory_url.into(),
            names: names.into_iter().map(Into::into).collect(),
            contact: Vec::new(),
            cache_dir: PathBuf::from("acme"),
            root_ca: None,
            renew_fraction: DEFAULT_RENEW_FRACTION,
            id: None,
            poll_timeout: Duration::from_secs(90),
        }
    }

    /// The id the certificate has in the [`CertStore`].
    pub fn id(&self) -> &str {
        &self.config.id
    }

    /// Where the chain is stored.
    pub fn cert_path(&self) -> PathBuf {
        self.config
            .cache_dir
            .join(format!("{}.crt", self.config.id))
    }

    /// Where the private key is stored (mode 0600).
    pub fn key_path(&self) -> PathBuf {
        self.config
            .cache_dir
            .join(format!("{}.key", self.config.id))
    }

    /// When `cert` is due for renewal: after the configured fraction of its lifetime.
    pub fn renewal_time(&self, cert: &LoadedCert) -> SystemTime {
        let lifetime = cert
            .not_after()
            .duration_since(cert.not_before())
            .unwrap_or_default();
        cert.not_before() + lifetime.mul_f64(self.config.renew_fraction)
    }

    /// Make sure a valid certificate is in the store: the stored one if it is not yet
    /// due for renewal, else a new one from the ACME server.
    pub async fn ensure(&self) -> Result<LoadedCert, Error> {
        if let Some(cert) = self.stored() {
            if self.renewal_time(&cert) > SystemTime::now() {
                tracing::info!(id = %self.config.id, "using stored ACME certificate");
                self.store.insert(self.config.id.clone(), cert.clone());
                return Ok(cert);
            }
        }
        self.obtain().await
    }

    /// Order a new certificate now, store it and swap it in.
    pub async fn obtain(&self) -> Result<LoadedCert, Error> {
        let acme = |e: instant_acme::Error| Error::with_source(Kind::Acme, e);
        let account = self.account().await?;
        let identifiers: Vec<Identifier> = self
            .config
            .names
            .iter()
            .map(|n| Identifier::Dns(n.clone()))
            .collect();
        let mut order = account
            .new_order(&NewOrder::new(&identifiers))
            .await
            .map_err(acme)?;
        // Tokens are withdrawn however this ends.
        let mut published = Published {
            store: &self.challenges,
            tokens: Vec::new(),
        };
        {
            let mut authorizations = order.authorizations();
            while let Some(authz) = authorizations.next().await {
                let mut authz = authz.map_err(acme)?;
                match authz.status {
                    AuthorizationStatus::Pending => {}
                    AuthorizationStatus::Valid => continue,
                    other => {
                        return Err(Error::with_source(
                            Kind::Acme,
                            format!("authorization is {other:?}"),
                        ))
                    }
                }
                let mut challenge = authz.challenge(ChallengeType::Http01).ok_or_else(|| {
                    Error::with_source(Kind::Acme, "the server offers no http-01 challenge")
                })?;
                let key_auth = challenge.key_authorization();
                self.challenges.insert(&challenge.token, key_auth.as_str());
                published.tokens.push(challenge.token.clone());
                challenge.set_ready().await.map_err(acme)?;
            }
        }
        let retry = RetryPolicy::new().timeout(self.config.poll_timeout);
        let status = order.poll_ready(&retry).await.map_err(acme)?;
        drop(published);
        if status != OrderStatus::Ready {
            return Err(Error::with_source(
                Kind::Acme,
                format!("order is {status:?}, not ready"),
            ));
        }
        let key_pem = order.finalize().await.map_err(acme)?;
        let chain_pem = order.poll_certificate(&retry).await.map_err(acme)?;
        let cert = LoadedCert::from_pem(chain_pem.as_bytes(), key_pem.as_bytes())?;
        self.create_dir()?;
        write_atomic(&self.key_path(), key_pem.as_bytes(), 0o600)?;
        write_atomic(&self.cert_path(), chain_pem.as_bytes(), 0o600)?;
        tracing::info!(id = %self.config.id, names = ?cert.names(), expires = ?cert.not_after(), "ACME certificate obtained");
        self.store.insert(self.config.id.clone(), cert.clone());
        Ok(cert)
    }

    /// Keep the certificate valid in the background: [`ensure`](Self::ensure) now, then
    /// renew at each renewal time, retrying failures with a growing delay.
    pub fn spawn(&self) -> tokio::task::JoinHandle<()> {
        let this = self.clone();
        tokio::spawn(async move {
            let mut retry = FIRST_RETRY;
            let mut current: Option<LoadedCert> = None;
            loop {
                let result = match &current {
                    None => this.ensure().await,
                    Some(c) if this.renewal_time(c) <= SystemTime::now() => this.obtain().await,
                    Some(c) => Ok(c.clone()),
                };
                let wait = match result {
                    Ok(cert) => {
                        retry = FIRST_RETRY;
                        let wait = this
                            .renewal_time(&cert)
                            .duration_since(SystemTime::now())
                            .unwrap_or_default();
                        current = Some(cert);
                        wait
                    }
                    Err(e) => {
                        tracing::warn!(id = %this.config.id, error = %e, retry_in = ?retry, "ACME certificate renewal failed; keeping the current certificate");
                        let wait = retry;
                        retry = (retry * 2).min(MAX_RETRY);
                        wait
                    }
                };
                tokio::time::sleep(wait.max(Duration::from_secs(1))).await;
            }
        })
    }

    fn stored(&self) -> Option<LoadedCert> {
        let (cert, key) = (self.cert_path(), self.key_path());
        if !cert.exists() {
            return None;
        }
        match load_pem_files(&cert, &key) {
            Ok(c) => Some(c),
            Err(e) => {
                tracing::warn!(id = %self.config.id, error = %e, "stored ACME certificate unusable; ordering a new one");
                None
            }
        }
    }

    async fn account(&self) -> Result<Account, Error> {
        let acme = |e: instant_acme::Error| Error::with_source(Kind::Acme, e);
        let builder = || match &self.config.root_ca {
            Some(root) => Account::builder_with_root(root).map_err(acme),
            None => Account::builder().map_err(acme),
        };
        let path = self.account_path();
        if let Ok(data) = std::fs::read(&path) {
            match serde_json::from_slice::<AccountCredentials>(&data) {
                Ok(creds) => match builder()?.from_credentials(creds).await {
                    Ok(account) => return Ok(account),
                    Err(e) => {
                        tracing::warn!(error = %e, "stored ACME account refused; creating a new one")
                    }
                },
                Err(e) => {
                    tracing::warn!(path = %path.display(), error = %e, "stored ACME account unreadable; creating a new one")
                }
            }
        }
        let contact: Vec<&str> = self.config.contact.iter().map(String::as_str).collect();
        let (account, creds) = builder()?
            .create(
                &NewAccount {
                    contact: &contact,
                    terms_of_service_agreed: true,
                    only_return_existing: false,
                },
                self.config.directory_url.clone(),
                None,
            )
            .await
            .map_err(acme)?;
        let data = serde_json::to_vec(&creds).map_err(|e| Error::with_source(Kind::Acme, e))?;
        self.create_dir()?;
        write_atomic(&path, &data, 0o600)?;
        Ok(account)
    }

    /// One account file per directory URL, so a staging and a production account do not
    /// overwrite each other.
    fn account_path(&self) -> PathBuf {
        use std::hash::{Hash, Hasher};
        let mut h = std::collections::hash_map::DefaultHasher::new();
        self.config.directory_url.hash(&mut h);
        self.config
            .cache_dir
            .join(format!("account-{:016x}.json", h.finish()))
    }

    fn create_dir(&self) -> Result<(), Error> {
        let dir = &self.config.cache_dir;
        let mut b = std::fs::DirBuilder::new();
        b.recursive(true);
        #[cfg(unix)]
        {
            use std::os::unix::fs::DirBuilderExt;
            b.mode(0o700);
        }
        b.create(dir)
            .map_err(|e| Error::with_source(Kind::Io, e).at(dir))
    }
}

impl std::fmt::Debug for AcmeManager {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AcmeManager")
            .field("directory_url", &self.config.directory_url)
            .field("names", &self.config.names)
            .field("cache_dir", &self.config.cache_dir)
            .finish()
    }
}

/// Withdraws published challenge tokens when dropped.
struct Published<'a> {
    store: &'a ChallengeStore,
    tokens: Vec<String>,
}

impl Drop for Published<'_> {
    fn drop(&mut self) {
        for t in &self.tokens {
            self.store.remove(t);
        }
    }
}

impl AcmeBuilder {
    /// A contact URI for the account (`mailto:ops@example.com`); repeatable.
    pub fn contact(mut self, uri: impl Into<String>) -> Self {
        self.contact.push(uri.into());
        self
    }

    /// Directory for the account, certificate and key (created mode 0700). Default `acme`.
    pub fn cache_dir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.cache_dir = dir.into();
        self
    }

    /// Trust this PEM root for the ACME server's own HTTPS (a private CA, Pebble).
    pub fn root_ca(mut self, pem_file: impl AsRef<Path>) -> Self {
        self.root_ca = Some(pem_file.as_ref().to_path_buf());
        self
    }

    /// Renew after this fraction of the lifetime, in `(0, 1)` (default 2/3).
    pub fn renew_fraction(mut self, fraction: f64) -> Self {
        self.renew_fraction = fraction;
        self
    }

    /// The id of the certificate in the store and of its files (default: the first name).
    pub fn id(mut self, id: impl Into<String>) -> Self {
        self.id = Some(id.into());
        self
    }

    /// How long to wait for validation and issuance (default 90 s).
    pub fn poll_timeout(mut self, timeout: Duration) -> Self {
        self.poll_timeout = timeout;
        self
    }

    /// Check the settings and build the manager, feeding `store` and publishing
    /// challenges in `challenges`.
    pub fn build(self, store: CertStore, challenges: ChallengeStore) -> Result<AcmeManager, Error> {
        let bad = |why: &str| Error::with_source(Kind::Config, why.to_owned());
        let mut names = Vec::with_capacity(self.names.len());
        for n in &self.names {
            let n = n.trim_end_matches('.').to_ascii_lowercase();
            // HTTP-01 cannot prove a wildcard.
            if n.starts_with("*.") || !crate::certs::is_valid_name(&n) {
                return Err(bad(&format!("not a DNS name for HTTP-01: {n:?}")));
            }
            names.push(n);
        }
        let Some(first) = names.first() else {
            return Err(bad("no names"));
        };
        if !(self.renew_fraction > 0.0 && self.renew_fraction < 1.0) {
            return Err(bad("renew fraction must be between 0 and 1"));
        }
        let id = self.id.unwrap_or_else(|| first.clone());
        if id.is_empty() || id.contains(['/', '\\']) || id.starts_with('.') {
            return Err(bad("id must be usable as a file name"));
        }
        Ok(AcmeManager {
            config: Arc::new(Config {
                directory_url: self.directory_url,
                names,
                contact: self.contact,
                cache_dir: self.cache_dir,
                root_ca: self.root_ca,
                renew_fraction: self.renew_fraction,
                id: Arc::from(id),
                poll_timeout: self.poll_timeout,
            }),
            store,
            challenges,
        })
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    fn manager(dir: &Path) -> AcmeManager {
        AcmeManager::builder("https://127.0.0.1:9/dir", ["Site.Test"])
            .cache_dir(dir)
            .build(CertStore::new(), ChallengeStore::new())
            .unwrap()
    }

    #[test]
    fn builder_checks() {
        let b = |names: &[&str]| {
            AcmeManager::builder("https://x/dir", names.to_vec())
                .build(CertStore::new(), ChallengeStore::new())
        };
        assert!(b(&[]).is_err());
        assert!(b(&["*.wild.test"]).is_err());
        assert!(b(&["a b"]).is_err());
        assert_eq!(b(&["A.test."]).unwrap().id(), "a.test");
        assert!(AcmeManager::builder("https://x/dir", ["a.test"])
            .renew_fraction(1.5)
            .build(CertStore::new(), ChallengeStore::new())
            .is_err());
    }

    #[test]
    fn renewal_at_two_thirds() {
        let dir = tempfile::tempdir().unwrap();
        let m = manager(dir.path());
        let mut params = rcgen::CertificateParams::new(vec!["site.test".to_string()]).unwrap();
        params.not_before = rcgen::date_time_ymd(2030, 1, 1);
        params.not_after = rcgen::date_time_ymd(2030, 4, 1); // 90 days
        let key = rcgen::KeyPair::generate().unwrap();
        let c = params.self_signed(&key).unwrap();
        let cert =
            LoadedCert::from_pem(c.pem().as_bytes(), key.serialize_pem().as_bytes()).unwrap();
        let at = m.renewal_time(&cert);
        assert_eq!(
            at.duration_since(cert.not_before()).unwrap(),
            Duration::from_secs(60 * 24 * 3600)
        );
    }

    #[tokio::test]
    async fn stored_certificate_not_due_is_used_without_the_server() {
        let dir = tempfile::tempdir().unwrap();
        let m = manager(dir.path());
        let dev = crate::selfsigned::generate(&["site.test"]).unwrap();
        std::fs::write(m.cert_path(), &dev.cert_pem).unwrap();
        std::fs::write(m.key_path(), &dev.key_pem).unwrap();
        // The directory URL points at nothing: only the stored files can satisfy this.
        let got = m.ensure().await.unwrap();
        assert_eq!(got.names(), ["site.test"]);
        assert!(!m.store.is_empty());
    }
}
