//! Session resumption with a lifetime: nginx's `ssl_session_timeout` for both session
//! tickets and the server-side session cache.
//!
//! rustls' ring [`Ticketer`](rustls::crypto::ring::Ticketer) has a fixed lifetime (keys
//! rotate every 6 h, tickets live 12 h) and its inner AEAD ticketer is private, so a
//! configurable lifetime needs our own: [`TicketRotator`] (rustls' rotation, public)
//! over [`AeadTickets`], a ChaCha20-Poly1305 ticket sealer with a random key, the same
//! construction as rustls' own. The rotator makes a new key every `timeout / 2` and keeps
//! the previous one, so a ticket is accepted for at most `timeout` and at least
//! `timeout / 2`, and the lifetime hint sent to clients is `timeout`.
//!
//! rustls' session cache never expires an entry by age (only by size), so
//! [`TimedSessions`] stores each session with its creation time and forgets it once
//! older than the timeout.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use ring::aead;
use ring::rand::{SecureRandom, SystemRandom};
use rustls::crypto::GetRandomFailed;
use rustls::server::{ProducesTickets, ServerSessionMemoryCache, StoresServerSessions};
use rustls::ticketer::TicketRotator;

use crate::error::{Error, Kind};

const KEY_NAME_LEN: usize = 16;
const NONCE_LEN: usize = 12;

/// Seals tickets with one random ChaCha20-Poly1305 key; the rotator replaces it.
struct AeadTickets {
    key: aead::LessSafeKey,
    key_name: [u8; KEY_NAME_LEN],
}

impl AeadTickets {
    fn generate() -> Result<Box<dyn ProducesTickets>, GetRandomFailed> {
        let rng = SystemRandom::new();
        let mut key = [0u8; 32];
        rng.fill(&mut key).map_err(|_| GetRandomFailed)?;
        let mut key_name = [0u8; KEY_NAME_LEN];
        rng.fill(&mut key_name).map_err(|_| GetRandomFailed)?;
        let key =
            aead::UnboundKey::new(&aead::CHACHA20_POLY1305, &key).map_err(|_| GetRandomFailed)?;
        Ok(Box::new(AeadTickets {
            key: aead::LessSafeKey::new(key),
            key_name,
        }))
    }
}

impl ProducesTickets for AeadTickets {
    fn enabled(&self) -> bool {
        true
    }

    fn lifetime(&self) -> u32 {
        // Unused: the rotator answers for the lifetime.
        0
    }

    /// `key_name || nonce || ciphertext || tag`, the key name authenticated as AAD.
    fn encrypt(&self, plain: &[u8]) -> Option<Vec<u8>> {
        let mut nonce = [0u8; NONCE_LEN];
        SystemRandom::new().fill(&mut nonce).ok()?;
        let mut out = Vec::with_capacity(KEY_NAME_LEN + NONCE_LEN + plain.len() + 16);
        out.extend_from_slice(&self.key_name);
        out.extend_from_slice(&nonce);
        let mut body = plain.to_vec();
        self.key
            .seal_in_place_append_tag(
                aead::Nonce::assume_unique_for_key(nonce),
                aead::Aad::from(&self.key_name),
                &mut body,
            )
            .ok()?;
        out.extend_from_slice(&body);
        Some(out)
    }

    fn decrypt(&self, cipher: &[u8]) -> Option<Vec<u8>> {
        let (name, rest) = cipher.split_at_checked(KEY_NAME_LEN)?;
        if name != self.key_name {
            return None;
        }
        let (nonce, sealed) = rest.split_at_checked(NONCE_LEN)?;
        let nonce = aead::Nonce::try_assume_unique_for_key(nonce).ok()?;
        let mut body = sealed.to_vec();
        let plain = self
            .key
            .open_in_place(nonce, aead::Aad::from(&self.key_name), &mut body)
            .ok()?;
        Some(plain.to_vec())
    }
}

impl std::fmt::Debug for AeadTickets {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AeadTickets").finish_non_exhaustive()
    }
}

/// A ticketer whose tickets are valid for `timeout` (rounded to whole seconds, at least
/// 2 s, at most 7 days: RFC 8446's cap on a ticket's lifetime).
pub(crate) fn ticketer(timeout: Duration) -> Result<Arc<dyn ProducesTickets>, Error> {
    let secs = timeout.as_secs().clamp(2, 7 * 24 * 3600);
    let half = u32::try_from(secs / 2).unwrap_or(u32::MAX);
    let rotator = TicketRotator::new(half, AeadTickets::generate)
        .map_err(|e| Error::with_source(Kind::Config, e))?;
    Ok(Arc::new(rotator))
}

/// rustls' in-memory session cache, forgetting sessions older than a timeout.
#[derive(Debug)]
pub(crate) struct TimedSessions {
    inner: Arc<ServerSessionMemoryCache>,
    timeout_secs: u64,
}

impl TimedSessions {
    pub(crate) fn new(size: usize, timeout: Duration) -> Arc<Self> {
        Arc::new(TimedSessions {
            inner: ServerSessionMemoryCache::new(size),
            timeout_secs: timeout.as_secs(),
        })
    }

    fn fresh(&self, stored: Vec<u8>) -> Option<Vec<u8>> {
        let (stamp, value) = stored.split_at_checked(8)?;
        let created = u64::from_be_bytes(stamp.try_into().ok()?);
        (now_secs().saturating_sub(created) <= self.timeout_secs).then(|| value.to_vec())
    }
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

impl StoresServerSessions for TimedSessions {
    fn put(&self, key: Vec<u8>, value: Vec<u8>) -> bool {
        let mut stored = Vec::with_capacity(8 + value.len());
        stored.extend_from_slice(&now_secs().to_be_bytes());
        stored.extend_from_slice(&value);
        self.inner.put(key, stored)
    }

    fn get(&self, key: &[u8]) -> Option<Vec<u8>> {
        self.fresh(self.inner.get(key)?)
    }

    fn take(&self, key: &[u8]) -> Option<Vec<u8>> {
        self.fresh(self.inner.take(key)?)
    }

    fn can_cache(&self) -> bool {
        true
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn tickets_round_trip_and_reject_tampering() {
        let t = ticketer(Duration::from_secs(600)).unwrap();
        assert!(t.enabled());
        assert_eq!(t.lifetime(), 600);
        let sealed = t.encrypt(b"session state").unwrap();
        assert_eq!(t.decrypt(&sealed).unwrap(), b"session state");
        let mut bad = sealed.clone();
        let last = bad.len() - 1;
        bad[last] ^= 1;
        assert!(t.decrypt(&bad).is_none());
        assert!(t.decrypt(&sealed[..10]).is_none());
        // Another ticketer's key does not open it.
        let other = ticketer(Duration::from_secs(600)).unwrap();
        assert!(other.decrypt(&sealed).is_none());
    }

    #[test]
    fn timed_sessions_expire() {
        let s = TimedSessions::new(10, Duration::from_secs(60));
        assert!(s.put(b"k".to_vec(), b"v".to_vec()));
        assert_eq!(s.get(b"k").unwrap(), b"v");
        // An entry stamped two minutes ago is stale.
        let old = (now_secs() - 120).to_be_bytes();
        s.inner.put(b"old".to_vec(), [&old[..], b"v"].concat());
        assert!(s.get(b"old").is_none());
        assert_eq!(s.take(b"k").unwrap(), b"v");
        assert!(s.get(b"k").is_none());
    }
}
