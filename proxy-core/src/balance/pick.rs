//! The two selection policies, as nginx implements them: smooth weighted round-robin
//! (`ngx_http_upstream_get_peer`) and weighted least connections
//! (`ngx_http_upstream_get_least_conn_peer`), over one range of a group's servers
//! (primaries or backups) and one shard's current weights.

use std::ops::Range;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use crate::balance::group::Set;
use crate::balance::server::Peer;

/// The servers one request has already tried (nginx's `tried` bitmap), so a retry goes
/// to another one. Make one with [`Group::tried`](super::Group::tried); groups of up to
/// 256 servers need no allocation. It holds the server set the request picks from, so
/// that a set replaced meanwhile does not shift the indices under it.
#[derive(Debug, Clone)]
pub struct Tried {
    bits: Bits,
    /// Whether selection moved on to the backup servers (nginx switches `rrp->peers`).
    pub(crate) backup: bool,
    set: Arc<Set>,
}

#[derive(Debug, Clone)]
enum Bits {
    Inline([u64; 4]),
    Heap(Box<[u64]>),
}

impl Tried {
    pub(crate) fn new(set: Arc<Set>) -> Self {
        let words = set.len().div_ceil(64);
        let bits = if words <= 4 {
            Bits::Inline([0; 4])
        } else {
            Bits::Heap(vec![0; words].into_boxed_slice())
        };
        Tried {
            bits,
            backup: false,
            set,
        }
    }

    /// The server set this request picks from.
    pub(crate) fn set(&self) -> &Arc<Set> {
        &self.set
    }

    /// How many servers this request may try at most (nginx's `peer.tries`).
    pub(crate) fn max_tries(&self) -> usize {
        self.set.max_tries()
    }

    fn words(&self) -> &[u64] {
        match &self.bits {
            Bits::Inline(w) => w,
            Bits::Heap(w) => w,
        }
    }

    /// Whether server `i` (in group order) was tried.
    pub fn contains(&self, i: usize) -> bool {
        self.words()
            .get(i / 64)
            .is_some_and(|w| w & (1 << (i % 64)) != 0)
    }

    pub(crate) fn insert(&mut self, i: usize) {
        let words = match &mut self.bits {
            Bits::Inline(w) => &mut w[..],
            Bits::Heap(w) => &mut w[..],
        };
        if let Some(w) = words.get_mut(i / 64) {
            *w |= 1 << (i % 64);
        }
    }
}

/// Smooth weighted round-robin: every eligible server adds its effective weight to its
/// current weight; the highest current weight wins and loses the total.
pub(crate) fn round_robin(
    peers: &[Arc<Peer>],
    range: Range<usize>,
    current: &mut [i64],
    tried: &Tried,
    now: u64,
    single: bool,
) -> Option<usize> {
    let start = range.start;
    let (Some(ps), Some(cs)) = (peers.get(range.clone()), current.get_mut(range)) else {
        return None;
    };
    let mut best: Option<(usize, i64)> = None;
    let mut total: i64 = 0;
    for (k, (p, cw)) in ps.iter().zip(cs.iter_mut()).enumerate() {
        if tried.contains(start + k) || !p.eligible(now, single) {
            continue;
        }
        add_effective(p, cw, &mut total);
        if best.is_none_or(|(_, b)| *cw > b) {
            best = Some((k, *cw));
        }
    }
    let (k, _) = best?;
    if let Some(cw) = cs.get_mut(k) {
        *cw -= total;
    }
    Some(start + k)
}

/// Weighted least connections: the fewest in-flight requests relative to weight
/// (`conns_a * weight_b < conns_b * weight_a`), ties broken by smooth weighted
/// round-robin among the tied servers.
pub(crate) fn least_conn(
    peers: &[Arc<Peer>],
    range: Range<usize>,
    current: &mut [i64],
    tried: &Tried,
    now: u64,
    single: bool,
) -> Option<usize> {
    let start = range.start;
    let (Some(ps), Some(cs)) = (peers.get(range.clone()), current.get_mut(range)) else {
        return None;
    };
    // (index, conns, weight) of the best so far.
    let mut best: Option<(usize, u64, u64)> = None;
    let mut many = false;
    for (k, p) in ps.iter().enumerate() {
        if tried.contains(start + k) || !p.eligible(now, single) {
            continue;
        }
        let conns = u64::from(p.conns.load(Ordering::Acquire));
        let weight = p.weight.unsigned_abs();
        match best {
            Some((_, bc, bw)) => {
                let (lhs, rhs) = (conns * bw, bc * weight);
                if lhs < rhs {
                    best = Some((k, conns, weight));
                    many = false;
                } else if lhs == rhs {
                    many = true;
                }
            }
            None => best = Some((k, conns, weight)),
        }
    }
    let (bk, bc, bw) = best?;
    if many {
        let mut chosen: Option<(usize, i64)> = None;
        let mut total: i64 = 0;
        let tail = ps.iter().zip(cs.iter_mut()).enumerate().skip(bk);
        for (k, (p, cw)) in tail {
            if tried.contains(start + k) || !p.eligible(now, single) {
                continue;
            }
            let conns = u64::from(p.conns.load(Ordering::Acquire));
            if conns * bw != bc * p.weight.unsigned_abs() {
                continue;
            }
            add_effective(p, cw, &mut total);
            if chosen.is_none_or(|(_, c)| *cw > c) {
                chosen = Some((k, *cw));
            }
        }
        if let Some((k, _)) = chosen {
            if let Some(cw) = cs.get_mut(k) {
                *cw -= total;
            }
            return Some(start + k);
        }
    }
    Some(start + bk)
}

/// `current_weight += effective_weight; total += effective_weight;` and the effective
/// weight's recovery by one towards the configured weight.
fn add_effective(p: &Peer, cw: &mut i64, total: &mut i64) {
    let eff = p.effective.load(Ordering::Acquire);
    *cw = cw.saturating_add(eff);
    *total = total.saturating_add(eff);
    if eff < p.weight {
        // A lost race means another pick already moved it: either way it recovers.
        let _ = p
            .effective
            .compare_exchange(eff, eff + 1, Ordering::AcqRel, Ordering::Relaxed);
    }
}
