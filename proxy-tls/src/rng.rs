//! Random bytes for the handshake from a per-thread buffer of the operating system's
//! randomness, refilled 4 KiB at a time.
//!
//! ring's `SystemRandom` makes one `getrandom` system call per request, and a TLS 1.3
//! handshake asks for random bytes seven times outside the key exchange (the server
//! random; a nonce and an age mask for each of the two tickets; the AEAD nonce sealing
//! each ticket), so seven system calls per connection. OpenSSL draws them from a
//! user-space generator seeded once. Here the bytes are still the kernel's, read in bulk:
//! each one is handed out once and zeroed in the buffer as it is, so the buffer never
//! holds bytes that were already used. Requests larger than a quarter of the buffer go
//! to the system directly.
//!
//! What stays with ring's `SystemRandom` (its `SecureRandom` trait is sealed): the
//! ephemeral key-exchange keys and ECDSA signature nonces, and the ticket keys.

use std::cell::RefCell;

use ring::rand::{SecureRandom as _, SystemRandom};
use rustls::crypto::GetRandomFailed;

const POOL: usize = 4096;

struct Pool {
    bytes: [u8; POOL],
    /// Bytes `..used` were handed out (and zeroed); `used..` are unused.
    used: usize,
}

thread_local! {
    static THREAD_POOL: RefCell<Pool> = const {
        RefCell::new(Pool { bytes: [0; POOL], used: POOL })
    };
}

fn system(out: &mut [u8]) -> Result<(), GetRandomFailed> {
    SystemRandom::new().fill(out).map_err(|_| GetRandomFailed)
}

/// Fill `out` with random bytes (see the [module docs](self)).
pub(crate) fn fill(out: &mut [u8]) -> Result<(), GetRandomFailed> {
    if out.len() > POOL / 4 {
        return system(out);
    }
    let from_pool = THREAD_POOL.try_with(|pool| -> Result<bool, GetRandomFailed> {
        let Ok(mut pool) = pool.try_borrow_mut() else {
            return Ok(false);
        };
        let pool = &mut *pool;
        if POOL - pool.used < out.len() {
            system(&mut pool.bytes)?;
            pool.used = 0;
        }
        let taken = &mut pool.bytes[pool.used..pool.used + out.len()];
        out.copy_from_slice(taken);
        taken.fill(0);
        pool.used += out.len();
        Ok(true)
    });
    match from_pool {
        Ok(Ok(true)) => Ok(()),
        Ok(Err(e)) => Err(e),
        // Thread-local storage being torn down, or a re-entrant call: the system.
        Ok(Ok(false)) | Err(_) => system(out),
    }
}

/// The [`rustls::crypto::SecureRandom`] of the acceptor's crypto provider: [`fill`].
#[derive(Debug)]
pub(crate) struct BufferedRandom;

impl rustls::crypto::SecureRandom for BufferedRandom {
    fn fill(&self, buf: &mut [u8]) -> Result<(), GetRandomFailed> {
        fill(buf)
    }
}

/// The one instance (the provider takes a `&'static`).
pub(crate) static RANDOM: BufferedRandom = BufferedRandom;

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    #[test]
    fn bytes_are_never_handed_out_twice_across_refills() {
        // Three pools' worth in 36-byte requests (a ticket's nonce and age mask): every
        // request differs from every other and none is the zeroes of a used slot.
        let mut seen = HashSet::new();
        for _ in 0..(3 * POOL / 36) {
            let mut b = [0u8; 36];
            fill(&mut b).unwrap();
            assert_ne!(b, [0u8; 36]);
            assert!(seen.insert(b), "a repeated random value");
        }
    }

    #[test]
    fn odd_sizes_and_large_requests() {
        for n in [0, 1, 3, 31, POOL / 4, POOL / 4 + 1, 3 * POOL] {
            let mut a = vec![0u8; n];
            let mut b = vec![0u8; n];
            fill(&mut a).unwrap();
            fill(&mut b).unwrap();
            if n >= 16 {
                assert_ne!(a, b, "{n} bytes");
                assert!(a.iter().any(|&x| x != 0), "{n} bytes");
            }
        }
    }

    #[test]
    fn threads_get_their_own_bytes() {
        let take = || {
            let mut b = [0u8; 32];
            fill(&mut b).unwrap();
            b
        };
        let here = take();
        let there = std::thread::spawn(take).join().unwrap();
        assert_ne!(here, there);
    }

    #[test]
    fn the_provider_uses_it() {
        let mut b = [0u8; 32];
        rustls::crypto::SecureRandom::fill(&RANDOM, &mut b).unwrap();
        assert_ne!(b, [0u8; 32]);
    }
}
