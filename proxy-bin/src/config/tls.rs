//! TLS for a listen address: one certificate store for all its servers (chosen by SNI),
//! from PEM files, a self-signed development certificate, or ACME.

use std::time::Duration;

use proxy_tls::acceptor::TlsAcceptor;
use proxy_tls::acme::AcmeManager;
use proxy_tls::challenge::ChallengeStore;
use proxy_tls::sni::CertStore;

use super::schema::Config;
use super::{Diagnostic, Source};

/// A listener's TLS: the acceptor, its certificate store (kept across reloads by the
/// binary) and the certificate files to watch for changes.
pub struct TlsPlan {
    /// The acceptor, reading certificates from `store`.
    pub acceptor: TlsAcceptor,
    /// The certificates by id.
    pub store: CertStore,
    /// (id, certificate file, key file) of the certificates read from disk.
    pub files: Vec<(String, std::path::PathBuf, std::path::PathBuf)>,
}

/// The TLS of the servers (indices into `config.server`) sharing one address.
pub(super) fn acceptor(
    src: &Source,
    config: &Config,
    servers: &[usize],
    challenges: Option<&ChallengeStore>,
    acme: &mut Vec<AcmeManager>,
    errs: &mut Vec<Diagnostic>,
) -> Option<TlsPlan> {
    let store = CertStore::new();
    let mut files = Vec::new();
    let mut http2 = true;
    let mut handshake_timeout = Duration::from_secs(10);
    for &si in servers {
        let server = config.server.get(si)?;
        let Some(tls) = &server.tls else { continue };
        let key = format!("server[{si}].tls");
        let cfg = tls.get_ref();
        if let Some(h) = cfg.http2 {
            http2 = h;
        }
        if let Some(t) = cfg.handshake_timeout {
            handshake_timeout = t.0;
        }
        let names: Vec<String> = server
            .server_name
            .iter()
            .map(|n| n.get_ref().clone())
            .filter(|n| n != "_")
            .collect();
        let id = format!("server{si}");
        let sources = [
            cfg.certificate.is_some() || cfg.key.is_some(),
            cfg.self_signed,
            cfg.acme,
        ];
        if sources.iter().filter(|s| **s).count() != 1 {
            errs.push(src.diag(
                Some(tls.span()),
                key,
                "tls needs exactly one of { certificate, key }, self_signed = true or acme = true",
            ));
            continue;
        }
        if let (Some(cert), Some(k)) = (&cfg.certificate, &cfg.key) {
            let cert = super::location::resolve(src, cert);
            let k = super::location::resolve(src, k);
            match proxy_tls::certs::load_pem_files(&cert, &k) {
                Ok(loaded) => {
                    let soon = Duration::from_secs(14 * 24 * 3600);
                    if loaded.expires_within(std::time::SystemTime::now(), soon) {
                        tracing::warn!(
                            certificate = %cert.display(),
                            names = ?loaded.names(),
                            "certificate expires within 14 days"
                        );
                    }
                    store.insert(id.clone(), loaded);
                    files.push((id, cert, k));
                }
                Err(e) => errs.push(src.diag(Some(tls.span()), key, e.to_string())),
            }
            continue;
        }
        if cfg.certificate.is_some() != cfg.key.is_some() {
            errs.push(src.diag(Some(tls.span()), key, "certificate and key go together"));
            continue;
        }
        // Self-signed, or the placeholder an ACME certificate replaces once issued.
        let refs: Vec<&str> = names.iter().map(String::as_str).collect();
        let generated = if refs.is_empty() {
            proxy_tls::selfsigned::localhost()
        } else {
            proxy_tls::selfsigned::generate(&refs)
        };
        match generated {
            Ok(s) => store.insert(id.clone(), s.loaded),
            Err(e) => {
                errs.push(src.diag(Some(tls.span()), key, e.to_string()));
                continue;
            }
        }
        if cfg.acme {
            let (Some(acme_cfg), Some(challenges)) = (&config.acme, challenges) else {
                errs.push(src.diag(Some(tls.span()), key, "acme = true needs an [acme] section"));
                continue;
            };
            if names.is_empty() {
                errs.push(src.diag(Some(tls.span()), key, "acme = true needs server_name"));
                continue;
            }
            let a = acme_cfg.get_ref();
            let mut b = AcmeManager::builder(a.directory.clone(), names.clone())
                .id(id)
                .cache_dir(super::location::resolve(src, &a.storage));
            for c in &a.contact {
                b = b.contact(c.clone());
            }
            if let Some(root) = &a.ca_root {
                b = b.root_ca(super::location::resolve(src, root));
            }
            match b.build(store.clone(), challenges.clone()) {
                Ok(m) => acme.push(m),
                Err(e) => errs.push(src.diag(Some(acme_cfg.span()), "acme", e.to_string())),
            }
        }
    }
    match TlsAcceptor::builder(store.clone())
        .http2(http2)
        .handshake_timeout(handshake_timeout)
        .build()
    {
        Ok(acceptor) => Some(TlsPlan {
            acceptor,
            store,
            files,
        }),
        Err(e) => {
            errs.push(src.diag(None, "server.tls", e.to_string()));
            None
        }
    }
}
