//! TLS for a listen address: one certificate store for all its servers (chosen by SNI),
//! from PEM files, a self-signed development certificate, or ACME; the protocols, cipher
//! suites and session settings of its one rustls configuration; OCSP stapling per
//! certificate.
//!
//! The servers of one address share one rustls configuration (SNI picks a certificate,
//! not a configuration), so the listener-wide keys (`protocols`, `ciphers`,
//! `prefer_server_ciphers`, `session_timeout`, `session_cache`) may be set by any of
//! them, and two servers that set one differently are an error rather than a silent
//! choice.

use std::ops::Range;
use std::time::Duration;

use proxy_tls::acceptor::{TlsAcceptor, DEFAULT_SESSION_CACHE, SESSIONS_PER_MIB};
use proxy_tls::acme::AcmeManager;
use proxy_tls::challenge::ChallengeStore;
use proxy_tls::ocsp::{StapleSource, Stapler};
use proxy_tls::policy::{self, Protocol};
use proxy_tls::sni::CertStore;

use super::schema::{CipherList, Config};
use super::{Diagnostic, Source};

/// A listener-wide value, with the server that set it first.
struct Shared<T> {
    first: Option<(usize, T)>,
}

impl<T: PartialEq> Shared<T> {
    fn new() -> Self {
        Shared { first: None }
    }

    /// Record `value` from server `si`; `Err(other)` when server `other` set a different
    /// one.
    fn set(&mut self, si: usize, value: T) -> Result<(), usize> {
        match &self.first {
            Some((other, v)) if *v != value => Err(*other),
            Some(_) => Ok(()),
            None => {
                self.first = Some((si, value));
                Ok(())
            }
        }
    }

    fn get(self) -> Option<T> {
        self.first.map(|(_, v)| v)
    }
}

fn conflict(src: &Source, span: Range<usize>, key: String, other: usize) -> Diagnostic {
    src.diag(
        Some(span),
        key,
        format!(
            "servers on the same listen address share one TLS configuration, and server[{other}] sets this differently"
        ),
    )
}

/// nginx's `ssl_session_cache` value as a number of sessions: `"off"`/`"none"` is 0, a
/// size (`"10m"`, or nginx's `"shared:SSL:10m"`) is ~4000 sessions per MiB,
/// `"builtin:N"` is N sessions; several parts add up.
fn session_cache_size(text: &str) -> Result<usize, String> {
    let parts: Vec<&str> = text.split_whitespace().collect();
    if matches!(parts.as_slice(), ["off"] | ["none"]) {
        return Ok(0);
    }
    if parts.is_empty() {
        return Err("expected a size such as \"10m\", or \"off\"".into());
    }
    let mut total = 0usize;
    for part in parts {
        let sessions = if let Some(n) = part.strip_prefix("builtin") {
            match n.strip_prefix(':') {
                Some(n) => n
                    .parse::<usize>()
                    .map_err(|_| format!("invalid session count in {part:?}"))?,
                None if n.is_empty() => DEFAULT_SESSION_CACHE,
                None => return Err(format!("invalid session cache {part:?}")),
            }
        } else {
            // `shared:NAME:SIZE`: the zone name has no meaning here (one process).
            let size = match part.strip_prefix("shared:") {
                Some(rest) => rest
                    .split_once(':')
                    .map(|(_, size)| size)
                    .ok_or_else(|| format!("{part:?}: expected shared:NAME:SIZE"))?,
                None => part,
            };
            let bytes = super::values::parse_size(size)?;
            let per_mib = u64::try_from(SESSIONS_PER_MIB).unwrap_or(u64::MAX);
            let sessions = bytes.saturating_mul(per_mib) / (1 << 20);
            usize::try_from(sessions.max(1)).unwrap_or(usize::MAX)
        };
        total = total.saturating_add(sessions);
    }
    Ok(total)
}

/// A listener's TLS: the acceptor, its certificate store (kept across reloads by the
/// binary) and the certificate files to watch for changes.
pub struct TlsPlan {
    /// The acceptor, reading certificates from `store`.
    pub acceptor: TlsAcceptor,
    /// The certificates by id.
    pub store: CertStore,
    /// (id, certificate file, key file) of the certificates read from disk.
    pub files: Vec<(String, std::path::PathBuf, std::path::PathBuf)>,
    /// The OCSP stapler of the certificates with `ocsp_stapling`, to run while the
    /// listener serves (a new one per config load: files are re-read, URLs re-fetched).
    pub stapler: Option<Stapler>,
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
    let mut protocols = Shared::<Vec<Protocol>>::new();
    let mut ciphers: Option<(usize, Range<usize>, Vec<String>)> = None;
    let mut prefer = Shared::<bool>::new();
    let mut session_timeout = Shared::<Duration>::new();
    let mut session_cache = Shared::<usize>::new();
    let mut stapler = Stapler::new(store.clone());
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
        if let Some(p) = &cfg.protocols {
            match policy::parse_protocols(p.get_ref()) {
                Ok(list) => protocols.set(si, list).unwrap_or_else(|o| {
                    errs.push(conflict(src, p.span(), format!("{key}.protocols"), o))
                }),
                Err(e) => {
                    errs.push(src.diag(Some(p.span()), format!("{key}.protocols"), e.to_string()))
                }
            }
        }
        if let Some(c) = &cfg.ciphers {
            let names: Vec<String> = match c.get_ref() {
                CipherList::Joined(s) => policy::split_cipher_list(s)
                    .into_iter()
                    .map(str::to_owned)
                    .collect(),
                CipherList::List(l) => l.clone(),
            };
            match &ciphers {
                Some((other, _, n)) if *n != names => {
                    errs.push(conflict(src, c.span(), format!("{key}.ciphers"), *other));
                }
                Some(_) => {}
                None => ciphers = Some((si, c.span(), names)),
            }
        }
        if let Some(p) = &cfg.prefer_server_ciphers {
            prefer.set(si, *p.get_ref()).unwrap_or_else(|o| {
                errs.push(conflict(
                    src,
                    p.span(),
                    format!("{key}.prefer_server_ciphers"),
                    o,
                ))
            });
        }
        if let Some(t) = &cfg.session_timeout {
            if t.get_ref().0.is_zero() {
                errs.push(src.diag(Some(t.span()), format!("{key}.session_timeout"), "must be longer than 0 (session_cache = \"off\" and no tickets: use session_cache)"));
            } else {
                session_timeout.set(si, t.get_ref().0).unwrap_or_else(|o| {
                    errs.push(conflict(src, t.span(), format!("{key}.session_timeout"), o))
                });
            }
        }
        if let Some(c) = &cfg.session_cache {
            match session_cache_size(c.get_ref()) {
                Ok(n) => session_cache.set(si, n).unwrap_or_else(|o| {
                    errs.push(conflict(src, c.span(), format!("{key}.session_cache"), o))
                }),
                Err(e) => errs.push(src.diag(Some(c.span()), format!("{key}.session_cache"), e)),
            }
        }
        let id = format!("server{si}");
        // OCSP: per certificate. nginx needs `ssl_stapling on` for `ssl_stapling_verify`
        // and `ssl_stapling_file` to mean anything; say so instead of ignoring them.
        if !cfg.ocsp_stapling {
            if let Some(v) = &cfg.ocsp_stapling_verify {
                errs.push(src.diag(
                    Some(v.span()),
                    format!("{key}.ocsp_stapling_verify"),
                    "needs ocsp_stapling = true",
                ));
            }
            if let Some(f) = &cfg.ocsp_file {
                errs.push(src.diag(
                    Some(f.span()),
                    format!("{key}.ocsp_file"),
                    "needs ocsp_stapling = true",
                ));
            }
        } else {
            let verify = cfg
                .ocsp_stapling_verify
                .as_ref()
                .is_some_and(|v| *v.get_ref());
            let source = match &cfg.ocsp_file {
                Some(f) => {
                    let path = super::location::resolve(src, f.get_ref());
                    // Read at load, as nginx does: a missing file fails the config; its
                    // content is checked when stapled (a stale file only logs).
                    if let Err(e) = std::fs::File::open(&path) {
                        errs.push(src.diag(
                            Some(f.span()),
                            format!("{key}.ocsp_file"),
                            format!("cannot read {}: {e}", path.display()),
                        ));
                    }
                    StapleSource::File { path, verify }
                }
                None => StapleSource::Responder { verify },
            };
            stapler = stapler.source(id.clone(), source);
        }
        let names: Vec<String> = server
            .server_name
            .iter()
            .map(|n| n.get_ref().clone())
            .filter(|n| n != "_")
            .collect();
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
    let protocols = protocols
        .get()
        .unwrap_or_else(|| vec![Protocol::Tls12, Protocol::Tls13]);
    let mut builder = TlsAcceptor::builder(store.clone())
        .http2(http2)
        .handshake_timeout(handshake_timeout)
        .protocols(&protocols)
        .prefer_server_ciphers(prefer.get().unwrap_or(false))
        .session_timeout(session_timeout.get());
    if let Some(n) = session_cache.get() {
        builder = builder.session_cache(n);
    }
    if let Some((si, span, names)) = ciphers {
        match policy::parse_ciphers(&names, &protocols) {
            Ok(suites) => builder = builder.cipher_suites(suites),
            Err(e) => {
                errs.push(src.diag(
                    Some(span),
                    format!("server[{si}].tls.ciphers"),
                    e.to_string(),
                ));
                return None;
            }
        }
    }
    let stapler = (!stapler.is_empty()).then_some(stapler);
    match builder.build() {
        Ok(acceptor) => Some(TlsPlan {
            acceptor,
            store,
            files,
            stapler,
        }),
        Err(e) => {
            errs.push(src.diag(None, "server.tls", e.to_string()));
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Plan, Shared as Kept};
    use std::path::PathBuf;

    fn load(text: &str) -> Result<Plan, Vec<Diagnostic>> {
        let source = Source {
            file: PathBuf::from("tls.toml"),
            text: text.to_owned(),
        };
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async { crate::config::load(&source, &mut Kept::default()).await })
    }

    /// One TLS server on 127.0.0.1:1 with these `[server.tls]` lines (from line 4 on).
    fn server(tls_lines: &str) -> String {
        format!("[[server]]\nlisten = [\"127.0.0.1:1\"]\n[server.tls]\n{tls_lines}\n[[server.location]]\npath = \"/\"\nreturn = 200\n")
    }

    /// The single error, checked for line, key and a word of its message.
    fn one_error(text: &str, line: usize, key: &str, needle: &str) {
        let errs = match load(text) {
            Ok(_) => panic!("accepted:\n{text}"),
            Err(e) => e,
        };
        assert_eq!(errs.len(), 1, "{errs:?}");
        let e = &errs[0];
        let shown = e.to_string();
        assert_eq!((e.line, e.key.as_str()), (line, key), "{shown}");
        assert!(e.column > 0, "{shown}");
        assert!(shown.starts_with(&format!("tls.toml:{line}:")), "{shown}");
        assert!(shown.contains(needle), "{shown}");
    }

    #[test]
    fn the_guides_modern_configuration_is_accepted() {
        let plan = load(&server(
            "self_signed = true\nprotocols = [\"TLSv1.2\", \"TLSv1.3\"]\nprefer_server_ciphers = true\nciphers = \"ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-RSA-AES128-GCM-SHA256\"\nsession_cache = \"shared:SSL:10m\"\nsession_timeout = \"10m\"\nocsp_stapling = true\nocsp_stapling_verify = true",
        ))
        .unwrap();
        let tls = plan.listeners[0].tls.as_ref().unwrap();
        let cfg = tls.acceptor.server_config();
        assert!(cfg.ignore_client_order);
        assert_eq!(cfg.ticketer.lifetime(), 600);
        // Two TLS 1.2 suites listed plus the three TLS 1.3 suites.
        assert_eq!(cfg.crypto_provider().cipher_suites.len(), 5);
        assert!(tls.stapler.is_some());
        // The array form is the same list.
        let plan = load(&server(
            "self_signed = true\nciphers = [\"ECDHE-ECDSA-AES128-GCM-SHA256\", \"TLS_AES_128_GCM_SHA256\"]\nprotocols = [\"TLSv1.2\", \"TLSv1.3\"]",
        ))
        .unwrap();
        let cfg = plan.listeners[0]
            .tls
            .as_ref()
            .unwrap()
            .acceptor
            .server_config()
            .clone();
        assert_eq!(cfg.crypto_provider().cipher_suites.len(), 2);
        assert!(!cfg.ignore_client_order);
        assert!(plan.listeners[0].tls.as_ref().unwrap().stapler.is_none());
    }

    #[test]
    fn old_protocols_are_refused_with_their_line() {
        for old in ["TLSv1", "TLSv1.1", "SSLv3"] {
            one_error(
                &server(&format!(
                    "self_signed = true\nprotocols = [\"TLSv1.2\", \"{old}\"]"
                )),
                5,
                "server[0].tls.protocols",
                old,
            );
        }
        one_error(
            &server("self_signed = true\nprotocols = []"),
            5,
            "server[0].tls.protocols",
            "no protocol",
        );
    }

    #[test]
    fn bad_ciphers_are_refused_with_their_line() {
        let key = "server[0].tls.ciphers";
        one_error(
            &server("self_signed = true\nciphers = \"ECDHE-RSA-AES128-GCM-SHA256:NOPE\""),
            5,
            key,
            "unknown cipher \"NOPE\"",
        );
        one_error(
            &server("self_signed = true\nciphers = \"AES128-SHA\""),
            5,
            key,
            "not supported by rustls",
        );
        one_error(
            &server("self_signed = true\nciphers = \"HIGH:!aNULL:!MD5\""),
            5,
            key,
            "keywords",
        );
        // TLS 1.3 names only, with TLS 1.2 on: TLS 1.2 would have no suite.
        one_error(
            &server("self_signed = true\nciphers = [\"TLS_AES_128_GCM_SHA256\"]"),
            5,
            key,
            "TLSv1.2 with no cipher suite",
        );
        // The same list is fine once TLS 1.2 is off.
        assert!(load(&server(
            "self_signed = true\nprotocols = [\"TLSv1.3\"]\nciphers = [\"TLS_AES_128_GCM_SHA256\"]"
        ))
        .is_ok());
    }

    #[test]
    fn session_settings() {
        one_error(
            &server("self_signed = true\nsession_cache = \"lots\""),
            5,
            "server[0].tls.session_cache",
            "invalid size",
        );
        one_error(
            &server("self_signed = true\nsession_timeout = \"0\""),
            5,
            "server[0].tls.session_timeout",
            "longer than 0",
        );
        one_error(
            &server("self_signed = true\nsession_timeout = \"soon\""),
            5,
            "session_timeout",
            "invalid duration",
        );
        assert!(load(&server("self_signed = true\nsession_cache = \"off\"")).is_ok());
        assert_eq!(session_cache_size("10m"), Ok(40_000));
        assert_eq!(session_cache_size("shared:SSL:1m"), Ok(4000));
        assert_eq!(session_cache_size("builtin:1000 shared:SSL:1m"), Ok(5000));
        assert_eq!(session_cache_size("off"), Ok(0));
        assert_eq!(session_cache_size("1k"), Ok(3));
        assert!(session_cache_size("shared:SSL").is_err());
        assert!(session_cache_size("").is_err());
    }

    #[test]
    fn ocsp_settings() {
        one_error(
            &server("self_signed = true\nocsp_stapling_verify = true"),
            5,
            "server[0].tls.ocsp_stapling_verify",
            "needs ocsp_stapling = true",
        );
        one_error(
            &server("self_signed = true\nocsp_file = \"x.der\""),
            5,
            "server[0].tls.ocsp_file",
            "needs ocsp_stapling = true",
        );
        one_error(
            &server("self_signed = true\nocsp_stapling = true\nocsp_file = \"/nonexistent/x.der\""),
            6,
            "server[0].tls.ocsp_file",
            "cannot read /nonexistent/x.der",
        );
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("r.der");
        std::fs::write(&file, b"\x30\x03\x0a\x01\x00").unwrap();
        let plan = load(&server(&format!(
            "self_signed = true\nocsp_stapling = true\nocsp_file = \"{}\"",
            file.display()
        )))
        .unwrap();
        assert!(plan.listeners[0].tls.as_ref().unwrap().stapler.is_some());
    }

    #[test]
    fn servers_of_one_address_must_agree() {
        let text = "[[server]]\nlisten = [\"127.0.0.1:1\"]\nserver_name = [\"a.test\"]\ntls = { self_signed = true, protocols = [\"TLSv1.3\"] }\n\n[[server]]\nlisten = [\"127.0.0.1:1\"]\nserver_name = [\"b.test\"]\ntls = { self_signed = true, protocols = [\"TLSv1.2\"] }\n";
        one_error(
            text,
            9,
            "server[1].tls.protocols",
            "server[0] sets this differently",
        );
        // One server setting it and the other not is fine.
        let text = text.replace(", protocols = [\"TLSv1.2\"]", "");
        assert!(load(&text).is_ok());
    }
}
