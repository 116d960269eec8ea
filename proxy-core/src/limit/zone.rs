//! Zones: the shared, bounded state of the limits (nginx's `limit_req_zone` and
//! `limit_conn_zone`).
//!
//! A zone is a fixed number of shards, each a mutex around a hash map plus a slab of
//! entries threaded on a least-recently-used list. Both are allocated at full size when
//! the zone is built (the slab as reserved, untouched memory), so neither grows: the
//! memory bound holds whatever keys arrive, and a full request-zone shard makes room by
//! evicting its least recently used entry inline, in constant time, with no background
//! task. A full connection zone refuses new keys instead (their counts must stay exact).

use std::num::NonZeroUsize;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use hashbrown::HashTable;

use tokio::time::Instant;

use super::key::{Hashers, Key, Prehashed};
use super::rate::{self, Rate, State};

/// The most bytes one zone entry takes, its slot and its share of the hash table
/// together (used by `size_bytes`: nginx's `zone=NAME:10m`). nginx's states are about
/// 64 bytes, so a zone of the same size holds a little fewer keys here.
pub const ENTRY_BYTES: usize = 80;

/// The default zone capacity, in entries (1 MiB of [`ENTRY_BYTES`] entries).
pub const DEFAULT_CAPACITY: usize = (1 << 20) / ENTRY_BYTES;

const NIL: u32 = u32::MAX;

/// A request-rate zone (nginx's `limit_req_zone`): a key, a rate and a bounded table of
/// per-key state, shared by every clone, every connection and every location that names
/// it. Cheap to clone.
///
/// ```
/// use std::num::{NonZeroU32, NonZeroUsize};
/// use proxy_core::limit::{Key, Rate, ReqZone};
/// let zone = ReqZone::builder(Rate::per_minute(NonZeroU32::new(5).unwrap()))
///     .name("auth")
///     .key(Key::ClientIp)
///     .capacity(NonZeroUsize::new(10_000).unwrap())
///     .build();
/// assert_eq!(zone.capacity(), 10_000);
/// assert!(zone.is_empty());
/// ```
#[derive(Debug, Clone)]
pub struct ReqZone {
    inner: Arc<ReqZoneInner>,
}

#[derive(Debug)]
struct ReqZoneInner {
    name: Box<str>,
    key: Key,
    rate: Rate,
    table: Shards<State>,
    epoch: Instant,
}

/// Builds a [`ReqZone`].
#[derive(Debug, Clone)]
pub struct ReqZoneBuilder {
    name: Box<str>,
    key: Key,
    rate: Rate,
    capacity: NonZeroUsize,
}

/// What a step on a request zone does (see nginx's lookup and account phases).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Step {
    /// Compute the excess; reject above the burst; change nothing.
    Check,
    /// Compute the excess; reject above the burst, else store it.
    Account,
    /// Compute the excess and store it (an earlier limit of a request already admitted).
    Force,
}

impl ReqZone {
    /// A zone limiting to `rate`, keyed on the client address, holding
    /// [`DEFAULT_CAPACITY`] entries, named `"default"`.
    pub fn builder(rate: Rate) -> ReqZoneBuilder {
        ReqZoneBuilder {
            name: "default".into(),
            key: Key::ClientIp,
            rate,
            capacity: NonZeroUsize::new(DEFAULT_CAPACITY).unwrap_or(NonZeroUsize::MIN),
        }
    }

    /// The zone's name, for logs.
    pub fn name(&self) -> &str {
        &self.inner.name
    }

    /// The zone's rate.
    pub fn rate(&self) -> Rate {
        self.inner.rate
    }

    /// What the zone counts by.
    pub fn key(&self) -> &Key {
        &self.inner.key
    }

    /// The most entries the zone holds.
    pub fn capacity(&self) -> usize {
        self.inner.table.capacity()
    }

    /// The entries held now (locks every shard in turn: for tests and metrics).
    pub fn len(&self) -> usize {
        self.inner.table.len()
    }

    /// Whether no entry is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub(crate) fn hashers(&self) -> &Hashers {
        &self.inner.table.hashers
    }

    /// Milliseconds since the zone was built, on tokio's clock (pausable in tests).
    pub(crate) fn now_ms(&self) -> u64 {
        let ms = Instant::now()
            .saturating_duration_since(self.inner.epoch)
            .as_millis();
        u64::try_from(ms).unwrap_or(u64::MAX)
    }

    /// One nginx step for key `k` at `now` against `burst` (milli-requests): `Ok(excess)`
    /// when admitted, `Err(excess)` when rejected.
    pub(crate) fn step(&self, k: &Prehashed, burst: u64, step: Step, now: u64) -> Result<u64, u64> {
        let rate = self.inner.rate;
        let Some(mut t) = self.inner.table.lock(k) else {
            return Ok(0);
        };
        let idx = t.find(k);
        if let Some(i) = idx {
            // Like nginx, a lookup makes the entry the most recently used one.
            t.touch(i);
        }
        let prev = idx.and_then(|i| t.value(i));
        let excess = rate::excess(prev, now, rate);
        if step != Step::Force && excess > burst {
            return Err(excess);
        }
        if step == Step::Check {
            return Ok(excess);
        }
        let state = rate::account(prev, now, excess);
        match idx {
            Some(i) => t.set(i, state),
            None => {
                if t.is_full() {
                    t.evict_lru();
                }
                t.insert(*k, state);
            }
        }
        Ok(excess)
    }
}

impl ReqZoneBuilder {
    /// The zone's name, shown in logs (nginx's `zone=NAME`).
    pub fn name(mut self, name: &str) -> Self {
        self.name = name.into();
        self
    }

    /// What requests are counted by (default: [`Key::ClientIp`]).
    pub fn key(mut self, key: Key) -> Self {
        self.key = key;
        self
    }

    /// The most keys remembered at once; when full, the least recently used is forgotten.
    pub fn capacity(mut self, entries: NonZeroUsize) -> Self {
        self.capacity = entries;
        self
    }

    /// The capacity that fits in `bytes` of entries (nginx's `zone=NAME:10m`), at
    /// [`ENTRY_BYTES`] each, at least one.
    pub fn size_bytes(mut self, bytes: usize) -> Self {
        self.capacity = NonZeroUsize::new(bytes / ENTRY_BYTES).unwrap_or(NonZeroUsize::MIN);
        self
    }

    /// The zone.
    pub fn build(self) -> ReqZone {
        ReqZone {
            inner: Arc::new(ReqZoneInner {
                name: self.name,
                key: self.key,
                rate: self.rate,
                table: Shards::new(self.capacity.get()),
                epoch: Instant::now(),
            }),
        }
    }
}

/// A concurrency zone (nginx's `limit_conn_zone`): a key and a bounded table of
/// in-flight request counts, shared by every clone and location that names it.
///
/// ```
/// use proxy_core::limit::{ConnZone, Key};
/// let zone = ConnZone::builder().name("addr").key(Key::ClientIp).build();
/// assert!(zone.is_empty());
/// ```
#[derive(Debug, Clone)]
pub struct ConnZone {
    inner: Arc<ConnZoneInner>,
}

#[derive(Debug)]
struct ConnZoneInner {
    name: Box<str>,
    key: Key,
    table: Shards<u32>,
}

/// Builds a [`ConnZone`].
#[derive(Debug, Clone)]
pub struct ConnZoneBuilder {
    name: Box<str>,
    key: Key,
    capacity: NonZeroUsize,
}

/// Why a connection slot was not granted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Refused {
    /// The key is at its limit.
    Busy,
    /// The zone has no room for another key.
    Full,
}

impl ConnZone {
    /// A zone keyed on the client address, holding [`DEFAULT_CAPACITY`] keys.
    pub fn builder() -> ConnZoneBuilder {
        ConnZoneBuilder {
            name: "default".into(),
            key: Key::ClientIp,
            capacity: NonZeroUsize::new(DEFAULT_CAPACITY).unwrap_or(NonZeroUsize::MIN),
        }
    }

    /// The zone's name, for logs.
    pub fn name(&self) -> &str {
        &self.inner.name
    }

    /// What the zone counts by.
    pub fn key(&self) -> &Key {
        &self.inner.key
    }

    /// The most keys the zone holds at once.
    pub fn capacity(&self) -> usize {
        self.inner.table.capacity()
    }

    /// Keys with requests in flight (locks every shard in turn: for tests and metrics).
    pub fn len(&self) -> usize {
        self.inner.table.len()
    }

    /// Whether no request is in flight.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The requests in flight for the key of `req` (0 when its key is empty).
    pub fn in_flight<B>(&self, req: &http::Request<B>) -> u32 {
        let Some(k) = self.inner.key.of(req, self.hashers()) else {
            return 0;
        };
        let Some(t) = self.inner.table.lock(&k) else {
            return 0;
        };
        t.find(&k).and_then(|i| t.value(i)).unwrap_or(0)
    }

    pub(crate) fn hashers(&self) -> &Hashers {
        &self.inner.table.hashers
    }

    pub(crate) fn acquire(&self, k: &Prehashed, max: u32) -> Result<(), Refused> {
        let Some(mut t) = self.inner.table.lock(k) else {
            return Ok(());
        };
        match t.find(k) {
            Some(i) => {
                let n = t.value(i).unwrap_or(0);
                if n >= max {
                    return Err(Refused::Busy);
                }
                t.set(i, n + 1);
            }
            None if t.is_full() => return Err(Refused::Full),
            None => t.insert(*k, 1),
        }
        Ok(())
    }

    pub(crate) fn release(&self, k: &Prehashed) {
        let Some(mut t) = self.inner.table.lock(k) else {
            return;
        };
        if let Some(i) = t.find(k) {
            match t.value(i) {
                Some(n) if n > 1 => t.set(i, n - 1),
                _ => t.remove(i),
            }
        }
    }
}

impl ConnZoneBuilder {
    /// The zone's name, shown in logs.
    pub fn name(mut self, name: &str) -> Self {
        self.name = name.into();
        self
    }

    /// What requests are counted by (default: [`Key::ClientIp`]).
    pub fn key(mut self, key: Key) -> Self {
        self.key = key;
        self
    }

    /// The most keys with requests in flight at once; beyond, new keys are refused.
    pub fn capacity(mut self, entries: NonZeroUsize) -> Self {
        self.capacity = entries;
        self
    }

    /// The capacity that fits in `bytes` at [`ENTRY_BYTES`] per key, at least one.
    pub fn size_bytes(mut self, bytes: usize) -> Self {
        self.capacity = NonZeroUsize::new(bytes / ENTRY_BYTES).unwrap_or(NonZeroUsize::MIN);
        self
    }

    /// The zone.
    pub fn build(self) -> ConnZone {
        ConnZone {
            inner: Arc::new(ConnZoneInner {
                name: self.name,
                key: self.key,
                table: Shards::new(self.capacity.get()),
            }),
        }
    }
}

/// The shards of a zone. The shard of a key comes from bits of its hash the maps inside
/// do not lean on (they use the low bits and the top seven).
#[derive(Debug)]
struct Shards<V> {
    shards: Box<[Mutex<Table<V>>]>,
    mask: usize,
    capacity: usize,
    hashers: Hashers,
}

impl<V: Copy> Shards<V> {
    fn new(capacity: usize) -> Self {
        // Shards of at least 256 entries, at most 64 shards: enough to keep two threads
        // (or sixty) off each other's locks, few enough that the bound is not spread thin.
        let n = (capacity / 256).clamp(1, 64).next_power_of_two().min(64);
        let shards = (0..n)
            .map(|i| {
                // Split the capacity exactly: the first `capacity % n` shards take one more.
                let cap = capacity / n + usize::from(i < capacity % n);
                Mutex::new(Table::new(cap))
            })
            .collect();
        Shards {
            shards,
            mask: n - 1,
            capacity,
            hashers: Hashers::new(),
        }
    }

    fn lock(&self, k: &Prehashed) -> Option<MutexGuard<'_, Table<V>>> {
        // Truncation intended: bits 32.. of the hash pick the shard.
        let i = (k.hash >> 32) as usize & self.mask;
        // Nothing panics while a shard is locked, so a poisoned lock still holds a
        // consistent table.
        let shard = self.shards.get(i)?;
        Some(shard.lock().unwrap_or_else(PoisonError::into_inner))
    }

    fn capacity(&self) -> usize {
        self.capacity
    }

    fn len(&self) -> usize {
        self.shards
            .iter()
            .map(|s| s.lock().unwrap_or_else(PoisonError::into_inner).len())
            .sum()
    }
}

/// One shard: a hash table of slot indices, and slots on a doubly linked LRU list.
///
/// The table holds only `u32` indices (the keys and their hashes live in the slots), and
/// is sized for twice the entries it may hold: removals leave tombstones, and with that
/// much room the table reclaims them in place instead of ever growing.
#[derive(Debug)]
struct Table<V> {
    map: HashTable<u32>,
    len: usize,
    slots: Vec<Slot<V>>,
    /// Most recently used.
    head: u32,
    /// Least recently used.
    tail: u32,
    /// Free slots, linked through `next`.
    free: u32,
    cap: usize,
}

#[derive(Debug)]
struct Slot<V> {
    key: Prehashed,
    prev: u32,
    next: u32,
    value: V,
}

impl<V: Copy> Table<V> {
    fn new(cap: usize) -> Self {
        // Slot indices are u32 with u32::MAX as the list end.
        let cap = cap.min(NIL as usize - 1);
        Table {
            map: HashTable::with_capacity(cap.saturating_mul(2)),
            len: 0,
            slots: Vec::with_capacity(cap),
            head: NIL,
            tail: NIL,
            free: NIL,
            cap,
        }
    }

    fn len(&self) -> usize {
        self.len
    }

    fn is_full(&self) -> bool {
        self.len >= self.cap
    }

    fn find(&self, k: &Prehashed) -> Option<u32> {
        let slots = &self.slots;
        self.map
            .find(k.hash, |&i| {
                slots.get(i as usize).is_some_and(|s| s.key == *k)
            })
            .copied()
    }

    fn value(&self, i: u32) -> Option<V> {
        self.slots.get(i as usize).map(|s| s.value)
    }

    fn set(&mut self, i: u32, value: V) {
        if let Some(s) = self.slots.get_mut(i as usize) {
            s.value = value;
        }
    }

    /// Makes slot `i` the most recently used.
    fn touch(&mut self, i: u32) {
        if self.head != i {
            self.unlink(i);
            self.push_front(i);
        }
    }

    /// Inserts an absent key; does nothing when full (callers evict first).
    fn insert(&mut self, key: Prehashed, value: V) {
        if self.is_full() {
            return;
        }
        let slot = Slot {
            key,
            prev: NIL,
            next: NIL,
            value,
        };
        let i = if self.free != NIL {
            let i = self.free;
            match self.slots.get_mut(i as usize) {
                Some(s) => {
                    self.free = s.next;
                    *s = slot;
                }
                None => return,
            }
            i
        } else {
            // `len < cap <= u32::MAX - 1` here, and the vector was reserved at `cap`: this
            // push never reallocates.
            let Ok(i) = u32::try_from(self.slots.len()) else {
                return;
            };
            self.slots.push(slot);
            i
        };
        let slots = &self.slots;
        self.map.insert_unique(key.hash, i, |&j| {
            slots.get(j as usize).map_or(0, |s| s.key.hash)
        });
        self.len += 1;
        self.push_front(i);
    }

    /// Forgets the least recently used entry.
    fn evict_lru(&mut self) {
        if self.tail != NIL {
            self.remove(self.tail);
        }
    }

    /// Forgets slot `i`.
    fn remove(&mut self, i: u32) {
        let Some(key) = self.slots.get(i as usize).map(|s| s.key) else {
            return;
        };
        self.unlink(i);
        if let Ok(entry) = self.map.find_entry(key.hash, |&j| j == i) {
            entry.remove();
            self.len -= 1;
        }
        let free = self.free;
        if let Some(s) = self.slots.get_mut(i as usize) {
            s.next = free;
            self.free = i;
        }
    }

    fn unlink(&mut self, i: u32) {
        let Some((prev, next)) = self.slots.get(i as usize).map(|s| (s.prev, s.next)) else {
            return;
        };
        match self.slots.get_mut(prev as usize) {
            Some(p) => p.next = next,
            None => self.head = next,
        }
        match self.slots.get_mut(next as usize) {
            Some(n) => n.prev = prev,
            None => self.tail = prev,
        }
    }

    fn push_front(&mut self, i: u32) {
        let head = self.head;
        if let Some(s) = self.slots.get_mut(i as usize) {
            s.prev = NIL;
            s.next = head;
        }
        match self.slots.get_mut(head as usize) {
            Some(h) => h.prev = i,
            None => self.tail = i,
        }
        self.head = i;
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::VecDeque;

    fn k(n: u64) -> Prehashed {
        Prehashed {
            hash: n.wrapping_mul(0x9E37_79B9_7F4A_7C15),
            fp: [n, 0],
        }
    }

    impl<V: Copy> Table<V> {
        /// Walks the list both ways and checks it against the map.
        fn check(&self) {
            let mut fwd = vec![];
            let mut i = self.head;
            while i != NIL {
                fwd.push(i);
                i = self.slots[i as usize].next;
            }
            let mut back = vec![];
            let mut i = self.tail;
            while i != NIL {
                back.push(i);
                i = self.slots[i as usize].prev;
            }
            back.reverse();
            assert_eq!(fwd, back);
            assert_eq!(fwd.len(), self.map.len());
            assert_eq!(fwd.len(), self.len);
            for &i in &fwd {
                assert_eq!(self.find(&self.slots[i as usize].key), Some(i));
            }
        }
    }

    #[derive(Debug, Clone)]
    enum Op {
        Use(u8),
        Remove(u8),
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        /// The table behaves like a simple LRU list of bounded length.
        #[test]
        fn table_is_an_lru(ops in prop::collection::vec(
            prop_oneof![(0u8..24).prop_map(Op::Use), (0u8..24).prop_map(Op::Remove)], 0..300),
            cap in 1usize..10,
        ) {
            let mut t: Table<u8> = Table::new(cap);
            let mut model: VecDeque<u8> = VecDeque::new(); // front = most recent
            for op in ops {
                match op {
                    Op::Use(n) => {
                        match t.find(&k(n.into())) {
                            Some(i) => t.touch(i),
                            None => {
                                if t.is_full() {
                                    t.evict_lru();
                                }
                                t.insert(k(n.into()), n);
                            }
                        }
                        model.retain(|&m| m != n);
                        model.push_front(n);
                        model.truncate(cap);
                    }
                    Op::Remove(n) => {
                        if let Some(i) = t.find(&k(n.into())) {
                            t.remove(i);
                        }
                        model.retain(|&m| m != n);
                    }
                }
                t.check();
                prop_assert!(t.slots.len() <= cap);
                let mut order = vec![];
                let mut i = t.head;
                while i != NIL {
                    order.push(t.slots[i as usize].value);
                    i = t.slots[i as usize].next;
                }
                prop_assert_eq!(order, model.iter().copied().collect::<Vec<_>>());
            }
        }
    }

    #[test]
    fn a_flood_of_addresses_stays_within_the_bound() {
        // 300 000 keeps a debug build under two seconds; the bench floods a million.
        let zone = ReqZone::builder(Rate::per_second(std::num::NonZeroU32::MIN))
            .capacity(NonZeroUsize::new(4096).unwrap())
            .build();
        let reserved: Vec<(usize, usize)> = zone
            .inner
            .table
            .shards
            .iter()
            .map(|s| {
                let t = s.lock().unwrap();
                (t.slots.capacity(), t.map.allocation_size())
            })
            .collect();
        let h = zone.hashers().clone();
        for n in 0u32..300_000 {
            let key = super::super::key::ip_key(std::net::Ipv4Addr::from(n).into(), &h);
            assert!(zone.step(&key, 0, Step::Account, 0).is_ok());
        }
        assert_eq!(zone.len(), 4096);
        // Nothing grew: the memory reserved at build time is all there is.
        for (s, r) in zone.inner.table.shards.iter().zip(reserved) {
            let t = s.lock().unwrap();
            t.check();
            assert_eq!((t.slots.capacity(), t.map.allocation_size()), r);
        }
    }

    #[test]
    fn entries_fit_in_entry_bytes() {
        // Tiny tables carry a fixed overhead; zones are split in shards of 256 or more.
        for cap in [256usize, 1000, 4096, 5000, 100_000] {
            let t: Table<State> = Table::new(cap);
            let table = t.map.allocation_size();
            let slots = t.slots.capacity() * std::mem::size_of::<Slot<State>>();
            assert!(
                (table + slots) / cap <= ENTRY_BYTES,
                "{cap}: {}",
                (table + slots) / cap
            );
        }
    }

    #[test]
    fn capacity_is_split_exactly() {
        for cap in [1, 7, 255, 256, 1000, 16_385, 100_000] {
            let s: Shards<u8> = Shards::new(cap);
            let total: usize = s.shards.iter().map(|t| t.lock().unwrap().cap).sum();
            assert_eq!(total, cap);
            assert!(s.shards.len().is_power_of_two() && s.shards.len() <= 64);
        }
    }

    #[test]
    fn conn_zone_counts_and_forgets() {
        let zone = ConnZone::builder()
            .capacity(NonZeroUsize::new(1).unwrap())
            .build();
        assert_eq!(zone.acquire(&k(1), 2), Ok(()));
        assert_eq!(zone.acquire(&k(1), 2), Ok(()));
        assert_eq!(zone.acquire(&k(1), 2), Err(Refused::Busy));
        assert_eq!(zone.acquire(&k(2), 2), Err(Refused::Full));
        zone.release(&k(1));
        zone.release(&k(1));
        assert!(zone.is_empty());
        assert_eq!(zone.acquire(&k(2), 2), Ok(()));
    }
}
