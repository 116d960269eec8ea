//! OCSP stapling (nginx's `ssl_stapling`, `ssl_stapling_verify`, `ssl_stapling_file`):
//! each certificate's OCSP response is fetched from the responder named in its
//! Authority Information Access extension (or read from a file), checked, and stapled to
//! the handshakes that serve that certificate (rustls' [`CertifiedKey::ocsp`]).
//!
//! A [`Stapler`] runs as one background task per certificate store:
//!
//! - it fetches at start and whenever a certificate changes (reload, ACME renewal);
//!   handshakes and start-up never wait for a responder: until the first response
//!   arrives, handshakes simply carry no staple;
//! - it refreshes as nginx does: at the response's `nextUpdate` less 5 minutes, but at
//!   least every hour and at most every 5 minutes ([`refresh_delay`]);
//! - a failed fetch is logged and retried in 5 minutes; the last good response stays
//!   stapled until its `nextUpdate` (an expired response is withdrawn rather than
//!   stapled: a client would reject it);
//! - a certificate whose chain has no issuer certificate, or (with a responder) that
//!   names no OCSP responder, is logged as a warning and served without a staple.
//!
//! Every response is checked before it is stapled, as nginx does even without
//! `ssl_stapling_verify`: a successful response, a `good` status for this certificate
//! (CertID: issuer name and key hashes, serial number), and `thisUpdate`/`nextUpdate`
//! around now. With verification on ([`StapleSource`]'s `verify`), its signature must
//! also be the issuer's, or that of a responder certificate the issuer signed with the
//! OCSP-signing extended key usage (RFC 6960 §4.2.2.2).
//!
//! Responders are asked with a plain HTTP POST (`application/ocsp-request`), as OCSP
//! responders are HTTP-only by design (the response is signed; RFC 6960 Appendix A).
//!
//! ```
//! use proxy_tls::{ocsp::{StapleSource, Stapler}, CertStore};
//! # async fn f() {
//! let store = CertStore::new();
//! // ... insert certificates under ids "site" and "other" ...
//! let stapler = Stapler::new(store.clone())
//!     .source("site", StapleSource::Responder { verify: true })
//!     .source("other", StapleSource::File { path: "/etc/ssl/other.ocsp.der".into(), verify: false });
//! let task = stapler.spawn(); // abort it when the listener goes away
//! # task.abort();
//! # }
//! ```

use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use der::asn1::{Null, ObjectIdentifier, OctetString};
use der::{Decode, Encode};
use rustls::sign::CertifiedKey;
use rustls_pki_types::CertificateDer;
use x509_cert::spki::{AlgorithmIdentifierOwned, SubjectPublicKeyInfoOwned};
use x509_cert::Certificate;
use x509_ocsp::{BasicOcspResponse, CertId, CertStatus, OcspResponse, OcspResponseStatus};

use crate::error::{Error, Kind};
use crate::sni::CertStore;

const ID_SHA1: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.3.14.3.2.26");
const ID_SHA256: ObjectIdentifier = ObjectIdentifier::new_unwrap("2.16.840.1.101.3.4.2.1");
const ID_PKIX_OCSP_BASIC: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.3.6.1.5.5.7.48.1.1");
const ID_AD_OCSP: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.3.6.1.5.5.7.48.1");
const ID_PE_AUTHORITY_INFO_ACCESS: ObjectIdentifier =
    ObjectIdentifier::new_unwrap("1.3.6.1.5.5.7.1.1");
const ID_CE_EXT_KEY_USAGE: ObjectIdentifier = ObjectIdentifier::new_unwrap("2.5.29.37");
const ID_KP_OCSP_SIGNING: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.3.6.1.5.5.7.3.9");

/// Earliest refresh after a fetch, and the retry delay after a failed one (nginx's).
pub const MIN_REFRESH: Duration = Duration::from_secs(300);
/// Latest refresh after a fetch (nginx re-fetches at least hourly).
pub const MAX_REFRESH: Duration = Duration::from_secs(3600);
/// Time allowed for one request to a responder.
pub const FETCH_TIMEOUT: Duration = Duration::from_secs(10);
/// Clock skew tolerated on `thisUpdate` (a responder whose clock runs slightly ahead).
const CLOCK_SKEW: Duration = Duration::from_secs(300);
/// Largest response accepted (a response with a delegated responder certificate is
/// 2-3 KiB).
const MAX_RESPONSE: usize = 64 * 1024;

fn err(msg: impl Into<String>) -> Error {
    Error::with_source(Kind::Ocsp, msg.into())
}

fn der_err(what: &str, e: der::Error) -> Error {
    err(format!("{what}: {e}"))
}

/// The OCSP responder URL of a certificate's Authority Information Access extension;
/// `None` when it names none.
pub fn responder_url(leaf: &CertificateDer<'_>) -> Result<Option<String>, Error> {
    let cert = Certificate::from_der(leaf).map_err(|e| der_err("certificate", e))?;
    let Some(exts) = &cert.tbs_certificate.extensions else {
        return Ok(None);
    };
    for ext in exts
        .iter()
        .filter(|e| e.extn_id == ID_PE_AUTHORITY_INFO_ACCESS)
    {
        let aia =
            x509_cert::ext::pkix::AuthorityInfoAccessSyntax::from_der(ext.extn_value.as_bytes())
                .map_err(|e| der_err("authority information access", e))?;
        for ad in aia.0.iter().filter(|ad| ad.access_method == ID_AD_OCSP) {
            if let x509_cert::ext::pkix::name::GeneralName::UniformResourceIdentifier(uri) =
                &ad.access_location
            {
                return Ok(Some(uri.as_str().to_owned()));
            }
        }
    }
    Ok(None)
}

/// A certificate and its issuer, parsed once for building requests and checking
/// responses.
#[derive(Debug)]
pub struct CertPair {
    leaf: Certificate,
    issuer: Certificate,
}

impl CertPair {
    /// Parse the certificate and the certificate of its issuer (DER).
    pub fn new(leaf: &[u8], issuer: &[u8]) -> Result<Self, Error> {
        Ok(CertPair {
            leaf: Certificate::from_der(leaf).map_err(|e| der_err("certificate", e))?,
            issuer: Certificate::from_der(issuer).map_err(|e| der_err("issuer certificate", e))?,
        })
    }

    /// The pair from a chain (leaf first, its issuer second), as loaded for rustls.
    pub fn from_chain(key: &CertifiedKey) -> Result<Self, Error> {
        match (key.cert.first(), key.cert.get(1)) {
            (Some(leaf), Some(issuer)) => Self::new(leaf, issuer),
            _ => Err(err(
                "the certificate file holds no issuer certificate after the leaf (a full chain is needed for OCSP)",
            )),
        }
    }

    /// The CertID of the leaf, hashed with `hash` (SHA-1 or SHA-256).
    fn cert_id(&self, hash: ObjectIdentifier) -> Result<CertId, Error> {
        let alg = if hash == ID_SHA1 {
            &ring::digest::SHA1_FOR_LEGACY_USE_ONLY
        } else if hash == ID_SHA256 {
            &ring::digest::SHA256
        } else {
            return Err(err(format!("unsupported CertID hash algorithm {hash}")));
        };
        // The issuer's name as the leaf writes it, and the issuer's public key bits
        // (the BIT STRING's content: RFC 6960 §4.1.1).
        let name = self
            .leaf
            .tbs_certificate
            .issuer
            .to_der()
            .map_err(|e| der_err("issuer name", e))?;
        let key = self
            .issuer
            .tbs_certificate
            .subject_public_key_info
            .subject_public_key
            .raw_bytes();
        let octets = |b: &[u8]| OctetString::new(b).map_err(|e| der_err("hash", e));
        Ok(CertId {
            hash_algorithm: AlgorithmIdentifierOwned {
                oid: hash,
                parameters: Some(Null.into()),
            },
            issuer_name_hash: octets(ring::digest::digest(alg, &name).as_ref())?,
            issuer_key_hash: octets(ring::digest::digest(alg, key).as_ref())?,
            serial_number: self.leaf.tbs_certificate.serial_number.clone(),
        })
    }

    /// A DER OCSP request for the leaf (SHA-1 CertID, what every responder answers).
    pub fn request(&self) -> Result<Vec<u8>, Error> {
        let req = x509_ocsp::OcspRequest {
            tbs_request: x509_ocsp::TbsRequest {
                version: x509_ocsp::Version::V1,
                requestor_name: None,
                request_list: vec![x509_ocsp::Request {
                    req_cert: self.cert_id(ID_SHA1)?,
                    single_request_extensions: None,
                }],
                request_extensions: None,
            },
            optional_signature: None,
        };
        req.to_der().map_err(|e| der_err("request", e))
    }

    /// Check a DER OCSP response for the leaf at `now`; `verify` also checks who signed
    /// it. See the [module docs](self) for what is checked.
    pub fn check(&self, der: &[u8], now: SystemTime, verify: bool) -> Result<Staple, Error> {
        let resp = OcspResponse::from_der(der).map_err(|e| der_err("response", e))?;
        if resp.response_status != OcspResponseStatus::Successful {
            return Err(err(format!(
                "responder answered {:?}",
                resp.response_status
            )));
        }
        let bytes = resp
            .response_bytes
            .ok_or_else(|| err("successful response without a body"))?;
        if bytes.response_type != ID_PKIX_OCSP_BASIC {
            return Err(err(format!(
                "unsupported response type {}",
                bytes.response_type
            )));
        }
        let basic = BasicOcspResponse::from_der(bytes.response.as_bytes())
            .map_err(|e| der_err("basic response", e))?;
        let single = basic
            .tbs_response_data
            .responses
            .iter()
            .find(|r| {
                self.cert_id(r.cert_id.hash_algorithm.oid)
                    .is_ok_and(|id| same_cert_id(&id, &r.cert_id))
            })
            .ok_or_else(|| err("the response is not for this certificate (CertID mismatch)"))?;
        match &single.cert_status {
            CertStatus::Good(_) => {}
            CertStatus::Revoked(info) => {
                return Err(err(format!(
                    "the certificate is REVOKED (since {})",
                    info.revocation_time.0.to_date_time()
                )))
            }
            CertStatus::Unknown(_) => {
                return Err(err("the responder does not know this certificate"))
            }
        }
        let this_update = single.this_update.0.to_system_time();
        let next_update = single.next_update.map(|t| t.0.to_system_time());
        if this_update > now + CLOCK_SKEW {
            return Err(err("the response's thisUpdate is in the future"));
        }
        if next_update.is_some_and(|n| n <= now) {
            return Err(err("the response has expired (nextUpdate has passed)"));
        }
        if verify {
            self.verify_signer(&basic, now)?;
        }
        Ok(Staple {
            der: der.to_vec(),
            this_update,
            next_update,
        })
    }

    /// The response is signed by the issuer, or by a certificate it carries that the
    /// issuer signed for OCSP signing and that is valid now.
    fn verify_signer(&self, basic: &BasicOcspResponse, now: SystemTime) -> Result<(), Error> {
        let tbs = basic
            .tbs_response_data
            .to_der()
            .map_err(|e| der_err("response data", e))?;
        let sig = basic.signature.raw_bytes();
        let issuer_key = &self.issuer.tbs_certificate.subject_public_key_info;
        if verify_signature(issuer_key, &basic.signature_algorithm, &tbs, sig).is_ok() {
            return Ok(());
        }
        for responder in basic.certs.iter().flatten() {
            if self.is_delegated_responder(responder, now).is_ok()
                && verify_signature(
                    &responder.tbs_certificate.subject_public_key_info,
                    &basic.signature_algorithm,
                    &tbs,
                    sig,
                )
                .is_ok()
            {
                return Ok(());
            }
        }
        Err(err(
            "the response is not signed by the issuer nor by a responder it authorized",
        ))
    }

    fn is_delegated_responder(&self, cert: &Certificate, now: SystemTime) -> Result<(), Error> {
        let tbs = cert
            .tbs_certificate
            .to_der()
            .map_err(|e| der_err("responder certificate", e))?;
        verify_signature(
            &self.issuer.tbs_certificate.subject_public_key_info,
            &cert.signature_algorithm,
            &tbs,
            cert.signature.raw_bytes(),
        )?;
        let validity = &cert.tbs_certificate.validity;
        if now < validity.not_before.to_system_time() || now > validity.not_after.to_system_time() {
            return Err(err("responder certificate outside its validity"));
        }
        let ocsp_signing = cert
            .tbs_certificate
            .extensions
            .iter()
            .flatten()
            .filter(|e| e.extn_id == ID_CE_EXT_KEY_USAGE)
            .filter_map(|e| {
                x509_cert::ext::pkix::ExtendedKeyUsage::from_der(e.extn_value.as_bytes()).ok()
            })
            .any(|eku| eku.0.contains(&ID_KP_OCSP_SIGNING));
        if !ocsp_signing {
            return Err(err(
                "responder certificate lacks the OCSP-signing key usage",
            ));
        }
        Ok(())
    }
}

/// Same certificate: same hash algorithm (by OID; parameters may be absent or NULL),
/// hashes and serial.
fn same_cert_id(a: &CertId, b: &CertId) -> bool {
    a.hash_algorithm.oid == b.hash_algorithm.oid
        && a.issuer_name_hash == b.issuer_name_hash
        && a.issuer_key_hash == b.issuer_key_hash
        && a.serial_number == b.serial_number
}

/// Verify `sig` over `msg` by `key`, with the algorithms rustls itself verifies
/// certificates with (ring, through webpki's algorithm identifiers): no other crypto.
fn verify_signature(
    key: &SubjectPublicKeyInfoOwned,
    alg: &AlgorithmIdentifierOwned,
    msg: &[u8],
    sig: &[u8],
) -> Result<(), Error> {
    // webpki identifies algorithms by the DER content of the AlgorithmIdentifier
    // SEQUENCE: the OID then the parameters, if any.
    let content = |a: &AlgorithmIdentifierOwned| -> Result<Vec<u8>, Error> {
        let mut out = a.oid.to_der().map_err(|e| der_err("algorithm", e))?;
        if let Some(p) = &a.parameters {
            out.extend(p.to_der().map_err(|e| der_err("algorithm", e))?);
        }
        Ok(out)
    };
    let key_alg = content(&key.algorithm)?;
    let sig_alg = content(alg)?;
    let provider = rustls::crypto::ring::default_provider();
    let found = provider
        .signature_verification_algorithms
        .all
        .iter()
        .find(|a| {
            a.public_key_alg_id().as_ref() == key_alg.as_slice()
                && a.signature_alg_id().as_ref() == sig_alg.as_slice()
        })
        .ok_or_else(|| err(format!("unsupported signature algorithm {}", alg.oid)))?;
    found
        .verify_signature(key.subject_public_key.raw_bytes(), msg, sig)
        .map_err(|_| err("bad signature"))
}

/// A checked OCSP response, ready to staple.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct Staple {
    /// The response as received (what is stapled).
    pub der: Vec<u8>,
    /// When the responder vouched for the status.
    pub this_update: SystemTime,
    /// Until when the response may be used (`None`: the responder gave no limit).
    pub next_update: Option<SystemTime>,
}

/// When to refresh a response fetched `now` with this `nextUpdate`: 5 minutes before it,
/// clamped to between 5 minutes and an hour from now (nginx's rule).
///
/// ```
/// use std::time::{Duration, SystemTime};
/// use proxy_tls::ocsp::refresh_delay;
/// let now = SystemTime::now();
/// let h = Duration::from_secs(3600);
/// assert_eq!(refresh_delay(now, Some(now + 7 * 24 * h)), h);
/// assert_eq!(refresh_delay(now, Some(now + h / 2)), Duration::from_secs(1500));
/// assert_eq!(refresh_delay(now, Some(now + Duration::from_secs(60))), Duration::from_secs(300));
/// assert_eq!(refresh_delay(now, None), h);
/// ```
pub fn refresh_delay(now: SystemTime, next_update: Option<SystemTime>) -> Duration {
    match next_update {
        None => MAX_REFRESH,
        Some(next) => next
            .duration_since(now)
            .unwrap_or(Duration::ZERO)
            .saturating_sub(MIN_REFRESH)
            .clamp(MIN_REFRESH, MAX_REFRESH),
    }
}

/// POST `request` to the responder at `url` (`http://host[:port][/path]`) and return
/// the response body, within [`FETCH_TIMEOUT`].
pub async fn fetch(url: &str, request: Vec<u8>) -> Result<Vec<u8>, Error> {
    match tokio::time::timeout(FETCH_TIMEOUT, fetch_inner(url, request)).await {
        Ok(r) => r,
        Err(_) => Err(err(format!(
            "responder {url} did not answer within {FETCH_TIMEOUT:?}"
        ))),
    }
}

async fn fetch_inner(url: &str, request: Vec<u8>) -> Result<Vec<u8>, Error> {
    use http_body_util::BodyExt;
    let uri: http::Uri = url
        .parse()
        .map_err(|e| err(format!("responder URL {url:?}: {e}")))?;
    if uri.scheme_str() != Some("http") {
        return Err(err(format!(
            "responder URL {url:?}: only http:// responders are supported"
        )));
    }
    let host = uri
        .host()
        .ok_or_else(|| err(format!("responder URL {url:?} has no host")))?;
    let port = uri.port_u16().unwrap_or(80);
    // A bracketed IPv6 literal connects without its brackets.
    let connect_host = host.trim_start_matches('[').trim_end_matches(']');
    let tcp = tokio::net::TcpStream::connect((connect_host, port))
        .await
        .map_err(|e| err(format!("responder {url}: {e}")))?;
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tcp))
            .await
            .map_err(|e| err(format!("responder {url}: {e}")))?;
    let conn = tokio::spawn(conn);
    let authority = uri.authority().map_or(host, |a| a.as_str());
    let path = uri.path_and_query().map_or("/", |p| p.as_str());
    let req = http::Request::post(path)
        .header(http::header::HOST, authority)
        .header(http::header::CONTENT_TYPE, "application/ocsp-request")
        .header(http::header::ACCEPT, "application/ocsp-response")
        .body(http_body_util::Full::new(bytes::Bytes::from(request)))
        .map_err(|e| err(format!("responder {url}: {e}")))?;
    let result = async {
        let resp = sender
            .send_request(req)
            .await
            .map_err(|e| err(format!("responder {url}: {e}")))?;
        if resp.status() != http::StatusCode::OK {
            return Err(err(format!("responder {url} answered {}", resp.status())));
        }
        let body = http_body_util::Limited::new(resp.into_body(), MAX_RESPONSE)
            .collect()
            .await
            .map_err(|e| err(format!("responder {url}: {e}")))?;
        Ok(body.to_bytes().to_vec())
    }
    .await;
    conn.abort();
    result
}

/// Where a certificate's staple comes from.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub enum StapleSource {
    /// Fetched from the responder in the certificate (nginx's `ssl_stapling on`).
    Responder {
        /// Also check the response's signature (nginx's `ssl_stapling_verify on`).
        verify: bool,
    },
    /// Read from a DER file (nginx's `ssl_stapling_file`), re-read on the same schedule
    /// and whenever the certificate changes.
    File {
        /// The DER response file.
        path: PathBuf,
        /// Also check the response's signature.
        verify: bool,
    },
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;
/// How responses are obtained: `(url, request) -> response`. [`fetch`] in production; a
/// stand-in in the scheduling tests.
type Fetcher = Arc<dyn Fn(String, Vec<u8>) -> BoxFuture<Result<Vec<u8>, Error>> + Send + Sync>;

/// Keeps the OCSP responses of a store's certificates stapled and fresh. See the
/// [module docs](self).
#[derive(Clone)]
pub struct Stapler {
    store: CertStore,
    sources: Vec<(Arc<str>, StapleSource)>,
    fetcher: Fetcher,
}

impl std::fmt::Debug for Stapler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Stapler")
            .field("sources", &self.sources)
            .finish_non_exhaustive()
    }
}

/// Per-certificate schedule.
struct Slot {
    id: Arc<str>,
    source: StapleSource,
    /// The leaf the schedule is for; a different leaf in the store restarts it.
    leaf: Option<Vec<u8>>,
    next: tokio::time::Instant,
    /// When the stapled response expires.
    expires: Option<SystemTime>,
    /// Nothing to do until the certificate changes (no issuer, no responder URL).
    idle: bool,
}

impl Stapler {
    /// A stapler for the certificates of `store`, with no certificate yet.
    pub fn new(store: CertStore) -> Self {
        Stapler {
            store,
            sources: Vec::new(),
            fetcher: Arc::new(|url, req| Box::pin(async move { fetch(&url, req).await })),
        }
    }

    /// Staple the certificate inserted under `id` from `source`.
    pub fn source(mut self, id: impl Into<Arc<str>>, source: StapleSource) -> Self {
        self.sources.push((id.into(), source));
        self
    }

    /// The same sources, stapling into `store` instead (a reloaded config's stapler for
    /// the store a running listener already serves from).
    pub fn with_store(mut self, store: CertStore) -> Self {
        self.store = store;
        self
    }

    /// Whether any certificate is to be stapled.
    pub fn is_empty(&self) -> bool {
        self.sources.is_empty()
    }

    #[cfg(test)]
    fn with_fetcher(mut self, fetcher: Fetcher) -> Self {
        self.fetcher = fetcher;
        self
    }

    /// Run in the background until the task is aborted.
    pub fn spawn(self) -> tokio::task::JoinHandle<()> {
        tokio::spawn(self.run())
    }

    async fn run(self) {
        let mut changes = self.store.subscribe();
        let now = tokio::time::Instant::now();
        let mut slots: Vec<Slot> = self
            .sources
            .iter()
            .map(|(id, source)| Slot {
                id: id.clone(),
                source: source.clone(),
                leaf: None,
                next: now,
                expires: None,
                idle: false,
            })
            .collect();
        loop {
            // Mark the store's state as seen before reading it: a change from here on
            // wakes the wait below.
            changes.borrow_and_update();
            let mut wake: Option<tokio::time::Instant> = None;
            for slot in &mut slots {
                if let Some(at) = self.step(slot).await {
                    wake = Some(wake.map_or(at, |w| w.min(at)));
                }
            }
            let sleep = async {
                match wake {
                    Some(at) => tokio::time::sleep_until(at).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                () = sleep => {}
                changed = changes.changed() => {
                    if changed.is_err() {
                        return; // the store is gone
                    }
                }
            }
        }
    }

    /// Bring one certificate up to date; when to look at it again.
    async fn step(&self, slot: &mut Slot) -> Option<tokio::time::Instant> {
        let cert = self.store.get(&slot.id)?;
        let key = cert.certified_key().clone();
        let leaf = key.cert.first()?.as_ref().to_vec();
        let now = tokio::time::Instant::now();
        if slot.leaf.as_deref() != Some(leaf.as_slice()) {
            // A new certificate (or the first look): fetch for it now.
            slot.leaf = Some(leaf.clone());
            slot.next = now;
            slot.expires = None;
            slot.idle = false;
        }
        if slot.idle {
            return None;
        }
        if let Some(exp) = slot.expires {
            if exp <= SystemTime::now() {
                tracing::warn!(id = %slot.id, "OCSP response expired and could not be refreshed: no longer stapled");
                self.store.set_ocsp(&slot.id, &leaf, None);
                slot.expires = None;
            }
        }
        if slot.next <= now {
            self.refresh(slot, &key, &leaf).await;
        }
        if slot.idle {
            return None;
        }
        let mut at = slot.next;
        if let Some(exp) = slot.expires {
            let left = exp
                .duration_since(SystemTime::now())
                .unwrap_or(Duration::ZERO);
            at = at.min(tokio::time::Instant::now() + left);
        }
        Some(at)
    }

    async fn refresh(&self, slot: &mut Slot, key: &CertifiedKey, leaf: &[u8]) {
        let pair = match CertPair::from_chain(key) {
            Ok(p) => p,
            Err(e) => {
                tracing::warn!(id = %slot.id, error = %e, "OCSP stapling off for this certificate");
                slot.idle = true;
                return;
            }
        };
        let (der, verify) = match &slot.source {
            StapleSource::Responder { verify } => {
                let url = match key.cert.first().map(responder_url) {
                    Some(Ok(Some(url))) => url,
                    Some(Ok(None)) | None => {
                        // Let's Encrypt ended OCSP in 2025: its certificates name no
                        // responder. Not an error; there is just nothing to staple.
                        tracing::warn!(id = %slot.id, "the certificate names no OCSP responder: nothing to staple");
                        slot.idle = true;
                        return;
                    }
                    Some(Err(e)) => {
                        tracing::warn!(id = %slot.id, error = %e, "OCSP stapling off for this certificate");
                        slot.idle = true;
                        return;
                    }
                };
                let result = match pair.request() {
                    Ok(req) => (self.fetcher)(url, req).await,
                    Err(e) => Err(e),
                };
                (result, *verify)
            }
            StapleSource::File { path, verify } => {
                let path = path.clone();
                let read = tokio::task::spawn_blocking(move || crate::certs::read_bounded(&path))
                    .await
                    .unwrap_or_else(|e| Err(err(format!("reading the OCSP file: {e}"))));
                (read, *verify)
            }
        };
        let now = tokio::time::Instant::now();
        match der.and_then(|d| pair.check(&d, SystemTime::now(), verify)) {
            Ok(staple) => {
                self.store.set_ocsp(&slot.id, leaf, Some(staple.der));
                slot.expires = staple.next_update;
                slot.next = now + refresh_delay(SystemTime::now(), staple.next_update);
                tracing::debug!(id = %slot.id, next_update = ?staple.next_update, "OCSP response stapled");
            }
            Err(e) => {
                let kept = self
                    .store
                    .get(&slot.id)
                    .is_some_and(|c| c.certified_key().ocsp.is_some());
                tracing::warn!(id = %slot.id, error = %e, keeping_previous = kept, "OCSP refresh failed; retrying in 5 minutes");
                slot.next = now + MIN_REFRESH;
            }
        }
    }
}

/// The DER content of an Authority Information Access extension naming `url` as the
/// OCSP responder (for certificates made in tests and by tools that lack AIA support).
pub fn aia_extension(url: &str) -> Result<Vec<u8>, Error> {
    use x509_cert::ext::pkix::{name::GeneralName, AccessDescription, AuthorityInfoAccessSyntax};
    let uri = der::asn1::Ia5String::new(url).map_err(|e| der_err("responder URL", e))?;
    AuthorityInfoAccessSyntax(vec![AccessDescription {
        access_method: ID_AD_OCSP,
        access_location: GeneralName::UniformResourceIdentifier(uri),
    }])
    .to_der()
    .map_err(|e| der_err("authority information access", e))
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use std::sync::Mutex;
    use x509_ocsp::{OcspGeneralizedTime, ResponderId, ResponseData, SingleResponse};

    struct Pki {
        store: CertStore,
        pair: CertPair,
        issuer: rcgen::Issuer<'static, rcgen::KeyPair>,
        ca_pem: String,
    }

    fn leaf(
        issuer: &rcgen::Issuer<'static, rcgen::KeyPair>,
        ca_pem: &str,
        aia: Option<&str>,
    ) -> (crate::LoadedCert, Vec<u8>) {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(vec!["site.test".to_string()]).unwrap();
        if let Some(url) = aia {
            params
                .custom_extensions
                .push(rcgen::CustomExtension::from_oid_content(
                    &[1, 3, 6, 1, 5, 5, 7, 1, 1],
                    aia_extension(url).unwrap(),
                ));
        }
        let leaf = params.signed_by(&key, issuer).unwrap();
        let chain = format!("{}{}", leaf.pem(), ca_pem);
        let loaded =
            crate::LoadedCert::from_pem(chain.as_bytes(), key.serialize_pem().as_bytes()).unwrap();
        (loaded, leaf.der().to_vec())
    }

    /// A CA and a leaf (chain: leaf, CA) in a store under "site".
    fn pki(aia: Option<&str>) -> Pki {
        let ca_key = rcgen::KeyPair::generate().unwrap();
        let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "ocsp test CA");
        let ca = ca_params.self_signed(&ca_key).unwrap();
        let issuer = rcgen::Issuer::new(ca_params, ca_key);
        let (loaded, leaf_der) = leaf(&issuer, &ca.pem(), aia);
        let store = CertStore::new();
        store.insert("site", loaded);
        Pki {
            store,
            pair: CertPair::new(&leaf_der, ca.der()).unwrap(),
            issuer,
            ca_pem: ca.pem(),
        }
    }

    /// An unsigned (garbage signature) response: enough for everything but `verify`.
    fn response(
        pair: &CertPair,
        status: CertStatus,
        this: SystemTime,
        next: SystemTime,
    ) -> Vec<u8> {
        let t = |s: SystemTime| {
            OcspGeneralizedTime(der::asn1::GeneralizedTime::from_system_time(s).unwrap())
        };
        let data = ResponseData {
            version: x509_ocsp::Version::V1,
            responder_id: ResponderId::ByName(pair.issuer.tbs_certificate.subject.clone()),
            produced_at: t(this),
            responses: vec![SingleResponse {
                cert_id: pair.cert_id(ID_SHA1).unwrap(),
                cert_status: status,
                this_update: t(this),
                next_update: Some(t(next)),
                single_extensions: None,
            }],
            response_extensions: None,
        };
        let basic = BasicOcspResponse {
            tbs_response_data: data,
            signature_algorithm: AlgorithmIdentifierOwned {
                oid: ObjectIdentifier::new_unwrap("1.2.840.10045.4.3.2"),
                parameters: None,
            },
            signature: der::asn1::BitString::from_bytes(&[0u8; 8]).unwrap(),
            certs: None,
        };
        OcspResponse {
            response_status: OcspResponseStatus::Successful,
            response_bytes: Some(x509_ocsp::ResponseBytes {
                response_type: ID_PKIX_OCSP_BASIC,
                response: OctetString::new(basic.to_der().unwrap()).unwrap(),
            }),
        }
        .to_der()
        .unwrap()
    }

    const H: Duration = Duration::from_secs(3600);
    const M: Duration = Duration::from_secs(60);

    #[test]
    fn checks_status_identity_and_time_and_signature_when_asked() {
        let p = pki(None);
        let now = SystemTime::now();
        let good = response(&p.pair, CertStatus::Good(Null), now, now + 2 * H);
        let s = p.pair.check(&good, now, false).unwrap();
        assert_eq!(s.der, good);
        // Signature checking refuses the garbage signature.
        let e = p.pair.check(&good, now, true).unwrap_err().to_string();
        assert!(e.contains("not signed by the issuer"), "{e}");
        // Expired; from the future.
        assert!(p.pair.check(&good, now + 3 * H, false).is_err());
        assert!(p.pair.check(&good, now - H, false).is_err());
        // Revoked.
        let revoked = response(
            &p.pair,
            CertStatus::Revoked(x509_ocsp::RevokedInfo {
                revocation_time: OcspGeneralizedTime(
                    der::asn1::GeneralizedTime::from_system_time(now).unwrap(),
                ),
                revocation_reason: None,
            }),
            now,
            now + 2 * H,
        );
        let e = p.pair.check(&revoked, now, false).unwrap_err().to_string();
        assert!(e.contains("REVOKED"), "{e}");
        // Another certificate's response.
        let other = pki(None);
        let e = other.pair.check(&good, now, false).unwrap_err().to_string();
        assert!(e.contains("CertID"), "{e}");
        // Not a response at all; an error status.
        assert!(p.pair.check(b"garbage", now, false).is_err());
        let try_later = OcspResponse {
            response_status: OcspResponseStatus::TryLater,
            response_bytes: None,
        }
        .to_der()
        .unwrap();
        let e = p
            .pair
            .check(&try_later, now, false)
            .unwrap_err()
            .to_string();
        assert!(e.contains("TryLater"), "{e}");
        // The request is a DER OCSPRequest for this certificate.
        let req = x509_ocsp::OcspRequest::from_der(&p.pair.request().unwrap()).unwrap();
        assert_eq!(
            req.tbs_request.request_list[0].req_cert.serial_number,
            p.pair.leaf.tbs_certificate.serial_number
        );
    }

    #[test]
    fn responder_url_from_aia() {
        let p = pki(None);
        let leaf = CertificateDer::from(p.pair.leaf.to_der().unwrap());
        assert_eq!(responder_url(&leaf).unwrap(), None);
        let p = pki(Some("http://ocsp.example.test/x"));
        let leaf = CertificateDer::from(p.pair.leaf.to_der().unwrap());
        assert_eq!(
            responder_url(&leaf).unwrap().as_deref(),
            Some("http://ocsp.example.test/x")
        );
    }

    async fn staple_of(store: &CertStore) -> Option<Vec<u8>> {
        // The stapler sets the staple right after the fetch returns; give it its turn.
        for _ in 0..100 {
            if let Some(o) = store
                .get("site")
                .and_then(|c| c.certified_key().ocsp.clone())
            {
                return Some(o);
            }
            tokio::task::yield_now().await;
        }
        None
    }

    /// OCSP times are whole seconds (GeneralizedTime), and the wall clock the response's
    /// nextUpdate is read against keeps moving while tokio's clock is paused: a
    /// schedule is right when it is within two seconds.
    fn near(a: Duration, b: Duration) -> bool {
        a.abs_diff(b) <= Duration::from_secs(2)
    }

    /// The stapler's schedule on tokio's paused clock: fetch at start, refresh at
    /// nextUpdate - 5 min capped at 1 h, retry 5 min after a failure keeping the staple,
    /// and fetch again at once when the certificate changes.
    #[tokio::test(start_paused = true)]
    async fn refresh_schedule() {
        let p = pki(Some("http://127.0.0.1:9/"));
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<tokio::time::Instant>();
        // What the stand-in responder answers: a response valid this long, or a failure.
        let validity: Arc<Mutex<Option<Duration>>> = Arc::new(Mutex::new(Some(2 * H)));
        let (store, v) = (p.store.clone(), validity.clone());
        let fetcher: Fetcher = Arc::new(move |url, _req| {
            assert_eq!(url, "http://127.0.0.1:9/");
            let _ = tx.send(tokio::time::Instant::now());
            let valid = *v.lock().unwrap();
            let pair = CertPair::from_chain(store.get("site").unwrap().certified_key()).unwrap();
            Box::pin(async move {
                let now = SystemTime::now();
                match valid {
                    Some(v) => Ok(response(&pair, CertStatus::Good(Null), now, now + v)),
                    None => Err(err("responder down")),
                }
            })
        });
        let task = Stapler::new(p.store.clone())
            .source("site", StapleSource::Responder { verify: false })
            .with_fetcher(fetcher)
            .spawn();
        let t0 = rx.recv().await.unwrap();
        let first = staple_of(&p.store)
            .await
            .expect("stapled after the first fetch");
        // nextUpdate in 2 h: refreshed after the 1 h cap.
        let t1 = rx.recv().await.unwrap();
        assert!(near(t1 - t0, H), "{:?}", t1 - t0);
        // The responder goes down: the next fetch fails, the staple stays, retry in 5 min.
        *validity.lock().unwrap() = None;
        let t2 = rx.recv().await.unwrap();
        assert!(near(t2 - t1, H));
        let t3 = rx.recv().await.unwrap();
        assert!(near(t3 - t2, 5 * M), "{:?}", t3 - t2);
        assert!(
            staple_of(&p.store).await.is_some(),
            "the last good staple is kept"
        );
        let _ = first;
        // Back, with a response valid 20 min: refreshed 5 min before it ends.
        *validity.lock().unwrap() = Some(20 * M);
        let t4 = rx.recv().await.unwrap();
        assert!(near(t4 - t3, 5 * M));
        let t5 = rx.recv().await.unwrap();
        assert!(near(t5 - t4, 15 * M), "{:?}", t5 - t4);
        // A new certificate under the same id: fetched for at once, not at the schedule.
        let (new, _) = leaf(&p.issuer, &p.ca_pem, Some("http://127.0.0.1:9/"));
        let changed_at = tokio::time::Instant::now();
        p.store.insert("site", new);
        let t6 = rx.recv().await.unwrap();
        assert!(
            near(t6 - changed_at, Duration::ZERO),
            "{:?}",
            t6 - changed_at
        );
        task.abort();
    }

    #[tokio::test(start_paused = true)]
    async fn no_responder_url_is_not_fetched() {
        let p = pki(None);
        let called = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let c = called.clone();
        let fetcher: Fetcher = Arc::new(move |_, _| {
            c.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            Box::pin(async { Err(err("unreachable")) })
        });
        let task = Stapler::new(p.store.clone())
            .source("site", StapleSource::Responder { verify: false })
            .with_fetcher(fetcher)
            .spawn();
        tokio::time::sleep(3 * H).await;
        assert_eq!(called.load(std::sync::atomic::Ordering::SeqCst), 0);
        assert!(p.store.get("site").unwrap().certified_key().ocsp.is_none());
        task.abort();
    }
}
