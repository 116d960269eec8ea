//! [`CertStore`]: the certificates of a TLS listener, chosen by the name the client asks
//! for (SNI), exact names before wildcards, with a default for clients that send no name
//! or an unknown one (nginx's default server).
//!
//! The lookup table is immutable and swapped atomically ([`arc_swap`]) whenever a
//! certificate is added, replaced or removed: a handshake never waits for a lock, new
//! handshakes see the new certificate at once, and established connections keep theirs.
//!
//! ```
//! use proxy_tls::{certs::LoadedCert, sni::CertStore};
//! fn cert(names: &[&str]) -> LoadedCert {
//!     let key = rcgen::KeyPair::generate().unwrap();
//!     let names: Vec<String> = names.iter().map(|s| s.to_string()).collect();
//!     let c = rcgen::CertificateParams::new(names).unwrap().self_signed(&key).unwrap();
//!     LoadedCert::from_pem(c.pem().as_bytes(), key.serialize_pem().as_bytes()).unwrap()
//! }
//! let store = CertStore::new();
//! store.insert("a", cert(&["a.test"]));
//! store.insert("wild", cert(&["*.b.test"]));
//! let wild = store.get("wild").unwrap();
//! assert!(std::sync::Arc::ptr_eq(&store.resolve_name(Some("x.b.test")).unwrap(), wild.certified_key()));
//! // No SNI, or a name nobody serves: the default (the first inserted unless set).
//! let a = store.get("a").unwrap();
//! assert!(std::sync::Arc::ptr_eq(&store.resolve_name(None).unwrap(), a.certified_key()));
//! assert!(std::sync::Arc::ptr_eq(&store.resolve_name(Some("other.test")).unwrap(), a.certified_key()));
//! ```

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use arc_swap::ArcSwap;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;

use crate::certs::LoadedCert;

/// The certificates of one TLS listener, selected by SNI. Cheap to clone; clones share
/// the certificates. See the [module docs](self).
#[derive(Clone, Default)]
pub struct CertStore {
    inner: Arc<Inner>,
}

struct Inner {
    /// What handshakes read: lock-free.
    table: ArcSwap<Table>,
    /// The source of truth, in insertion order; only writers (reload, ACME) lock it.
    entries: Mutex<Entries>,
    /// Bumped whenever a certificate is inserted or removed (not when a staple is set):
    /// the OCSP stapler waits on it to fetch for new certificates at once.
    changes: tokio::sync::watch::Sender<u64>,
}

impl Default for Inner {
    fn default() -> Self {
        Inner {
            table: ArcSwap::default(),
            entries: Mutex::default(),
            changes: tokio::sync::watch::Sender::new(0),
        }
    }
}

#[derive(Default)]
struct Entries {
    list: Vec<(Arc<str>, LoadedCert)>,
    default: Option<Arc<str>>,
}

#[derive(Default)]
struct Table {
    exact: HashMap<Box<str>, Arc<CertifiedKey>>,
    /// Keyed by the part after `*.`: `*.example.com` is stored as `example.com`.
    wildcard: HashMap<Box<str>, Arc<CertifiedKey>>,
    default: Option<Arc<CertifiedKey>>,
}

/// One certificate of a store, as the metrics and the expiry warnings see it.
#[derive(Debug, Clone)]
pub struct CertInfo {
    /// The id the certificate was inserted under.
    pub id: Arc<str>,
    /// Its DNS names.
    pub names: Vec<String>,
    /// Its expiry.
    pub not_after: SystemTime,
}

impl CertStore {
    /// An empty store (every handshake fails until a certificate is inserted).
    pub fn new() -> Self {
        CertStore::default()
    }

    /// Add a certificate under `id`, or replace the one that had this id (keeping its
    /// place in the order). When two certificates claim the same name, the one inserted
    /// first serves it, as nginx's first server block does.
    ///
    /// A replacement with the same leaf certificate and no OCSP response keeps the
    /// response stapled to the one it replaces: a config reload re-reads unchanged
    /// certificates, and they should not lose their staple until the next fetch.
    pub fn insert(&self, id: impl Into<Arc<str>>, cert: LoadedCert) {
        let id = id.into();
        self.update(|e| match e.list.iter_mut().find(|(i, _)| *i == id) {
            Some(slot) => {
                let old = &slot.1;
                let same_leaf = old.leaf().is_some() && old.leaf() == cert.leaf();
                slot.1 = match &old.certified_key().ocsp {
                    Some(ocsp) if same_leaf && cert.certified_key().ocsp.is_none() => {
                        cert.with_ocsp(Some(ocsp.clone()))
                    }
                    _ => cert,
                };
            }
            None => e.list.push((id, cert)),
        });
        self.inner.changes.send_modify(|n| *n = n.wrapping_add(1));
    }

    /// Staple `response` (a DER OCSP response; `None` removes it) to the certificate
    /// inserted under `id`, if its leaf is still `leaf` (the certificate the response was
    /// fetched for: a concurrent reload may have replaced it). Whether it was set.
    pub fn set_ocsp(&self, id: &str, leaf: &[u8], response: Option<Vec<u8>>) -> bool {
        let mut set = false;
        self.update(|e| {
            if let Some((_, c)) = e.list.iter_mut().find(|(i, _)| &**i == id) {
                if c.leaf().is_some_and(|l| l.as_ref() == leaf) {
                    *c = c.with_ocsp(response);
                    set = true;
                }
            }
        });
        set
    }

    /// A receiver that sees a new value whenever a certificate is inserted or removed.
    pub fn subscribe(&self) -> tokio::sync::watch::Receiver<u64> {
        self.inner.changes.subscribe()
    }

    /// Remove the certificate inserted under `id`; whether there was one.
    pub fn remove(&self, id: &str) -> bool {
        let mut found = false;
        self.update(|e| {
            let before = e.list.len();
            e.list.retain(|(i, _)| &**i != id);
            found = e.list.len() != before;
        });
        self.inner.changes.send_modify(|n| *n = n.wrapping_add(1));
        found
    }

    /// Serve the certificate inserted under `id` to clients that send no SNI or an
    /// unknown name. Without this, the first inserted certificate is the default.
    pub fn set_default(&self, id: impl Into<Arc<str>>) {
        let id = id.into();
        self.update(|e| e.default = Some(id));
    }

    /// The certificate inserted under `id`.
    pub fn get(&self, id: &str) -> Option<LoadedCert> {
        let entries = self.lock();
        entries
            .list
            .iter()
            .find(|(i, _)| &**i == id)
            .map(|(_, c)| c.clone())
    }

    /// Every certificate with its names and expiry, for metrics and expiry warnings.
    pub fn certificates(&self) -> Vec<CertInfo> {
        self.lock()
            .list
            .iter()
            .map(|(id, c)| CertInfo {
                id: id.clone(),
                names: c.names().to_vec(),
                not_after: c.not_after(),
            })
            .collect()
    }

    /// Whether the store holds no certificate.
    pub fn is_empty(&self) -> bool {
        self.inner.table.load().default.is_none()
    }

    /// The certificate for a server name: an exact name, else a wildcard one label up,
    /// else the default. `None` only when the store is empty.
    pub fn resolve_name(&self, sni: Option<&str>) -> Option<Arc<CertifiedKey>> {
        let table = self.inner.table.load();
        let found = sni.and_then(|name| {
            let name = name.strip_suffix('.').unwrap_or(name);
            if name.bytes().any(|b| b.is_ascii_uppercase()) {
                // rustls hands us lowercase names; direct callers may not.
                table.lookup(&name.to_ascii_lowercase())
            } else {
                table.lookup(name)
            }
        });
        found.or(table.default.as_ref()).cloned()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Entries> {
        // A panic while holding the lock cannot leave the entries half-updated (every
        // update is a single push/assign), so a poisoned lock is still usable.
        self.inner
            .entries
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn update(&self, f: impl FnOnce(&mut Entries)) {
        let mut entries = self.lock();
        f(&mut entries);
        self.inner.table.store(Arc::new(Table::build(&entries)));
    }
}

impl Table {
    fn build(entries: &Entries) -> Table {
        let mut table = Table::default();
        for (_, cert) in &entries.list {
            let key = cert.certified_key();
            for name in cert.names() {
                let (map, name) = match name.strip_prefix("*.") {
                    Some(suffix) => (&mut table.wildcard, suffix),
                    None => (&mut table.exact, &**name),
                };
                map.entry(name.into()).or_insert_with(|| key.clone());
            }
        }
        let default = entries
            .default
            .as_ref()
            .and_then(|id| entries.list.iter().find(|(i, _)| i == id))
            .or(entries.list.first());
        table.default = default.map(|(_, c)| c.certified_key().clone());
        table
    }

    fn lookup(&self, name: &str) -> Option<&Arc<CertifiedKey>> {
        if let Some(key) = self.exact.get(name) {
            return Some(key);
        }
        // A wildcard covers exactly one label: `*.example.com` serves `a.example.com`,
        // not `example.com` nor `a.b.example.com`.
        let (_, parent) = name.split_once('.')?;
        self.wildcard.get(parent)
    }
}

impl ResolvesServerCert for CertStore {
    fn resolve(&self, client_hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.resolve_name(client_hello.server_name())
    }
}

impl std::fmt::Debug for CertStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let entries = self.lock();
        f.debug_struct("CertStore")
            .field(
                "ids",
                &entries.list.iter().map(|(i, _)| i).collect::<Vec<_>>(),
            )
            .field("default", &entries.default)
            .finish()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn cert(names: &[&str]) -> LoadedCert {
        let key = rcgen::KeyPair::generate().unwrap();
        let names: Vec<String> = names.iter().map(|s| s.to_string()).collect();
        let c = rcgen::CertificateParams::new(names)
            .unwrap()
            .self_signed(&key)
            .unwrap();
        LoadedCert::from_pem(c.pem().as_bytes(), key.serialize_pem().as_bytes()).unwrap()
    }

    fn is(store: &CertStore, sni: Option<&str>, id: &str) -> bool {
        let want = store.get(id).unwrap();
        Arc::ptr_eq(&store.resolve_name(sni).unwrap(), want.certified_key())
    }

    #[test]
    fn exact_before_wildcard_and_one_label_only() {
        let store = CertStore::new();
        store.insert("wild", cert(&["*.example.test"]));
        store.insert("exact", cert(&["api.example.test"]));
        store.insert("apex", cert(&["example.test"]));
        store.set_default("apex");
        assert!(is(&store, Some("api.example.test"), "exact"));
        assert!(is(&store, Some("www.example.test"), "wild"));
        assert!(is(&store, Some("WWW.Example.Test."), "wild"));
        assert!(is(&store, Some("example.test"), "apex"));
        // Two labels deep: not covered by the wildcard, so the default.
        assert!(is(&store, Some("a.b.example.test"), "apex"));
        assert!(is(&store, None, "apex"));
    }

    #[test]
    fn replace_and_remove() {
        let store = CertStore::new();
        assert!(store.is_empty());
        assert!(store.resolve_name(None).is_none());
        store.insert("a", cert(&["a.test"]));
        let old = store.resolve_name(Some("a.test")).unwrap();
        store.insert("a", cert(&["a.test"]));
        let new = store.resolve_name(Some("a.test")).unwrap();
        assert!(!Arc::ptr_eq(&old, &new));
        assert_eq!(store.certificates().len(), 1);
        assert!(store.remove("a"));
        assert!(!store.remove("a"));
        assert!(store.is_empty());
    }

    #[test]
    fn first_inserted_wins_a_shared_name() {
        let store = CertStore::new();
        store.insert("one", cert(&["same.test"]));
        store.insert("two", cert(&["same.test", "two.test"]));
        assert!(is(&store, Some("same.test"), "one"));
        assert!(is(&store, Some("two.test"), "two"));
    }

    #[test]
    fn staples_follow_their_certificate() {
        let store = CertStore::new();
        let c = cert(&["a.test"]);
        let leaf = c.leaf().unwrap().to_vec();
        store.insert("a", c.clone());
        let mut changes = store.subscribe();
        changes.borrow_and_update();
        assert!(store.set_ocsp("a", &leaf, Some(vec![1, 2, 3])));
        assert!(
            !changes.has_changed().unwrap(),
            "a staple is not a certificate change"
        );
        assert_eq!(
            store.resolve_name(Some("a.test")).unwrap().ocsp.as_deref(),
            Some(&[1, 2, 3][..])
        );
        // The same certificate again (a config reload): the staple stays.
        store.insert("a", c);
        assert!(changes.has_changed().unwrap());
        assert!(store.resolve_name(None).unwrap().ocsp.is_some());
        // A different certificate: no staple, and a staple for the old leaf is refused.
        store.insert("a", cert(&["a.test"]));
        assert!(store.resolve_name(None).unwrap().ocsp.is_none());
        assert!(!store.set_ocsp("a", &leaf, Some(vec![9])));
        assert!(!store.set_ocsp("nope", &leaf, Some(vec![9])));
    }

    proptest! {
        #[test]
        fn resolve_never_panics_and_always_answers(name in "\\PC{0,64}") {
            let store = CertStore::new();
            store.insert("a", cert(&["a.test", "*.w.test"]));
            prop_assert!(store.resolve_name(Some(&name)).is_some());
        }
    }
}
