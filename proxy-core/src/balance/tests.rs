//! Unit tests of the group: nginx's sequences and bookkeeping on a paused clock, and
//! property tests of the policies and the in-flight counts.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::num::{NonZeroU32, NonZeroUsize};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use http_body_util::BodyExt;
use proptest::prelude::*;

use super::*;

fn addr(port: u16) -> std::net::SocketAddr {
    std::net::SocketAddr::from(([127, 0, 0, 1], port))
}

fn w(n: u32) -> NonZeroU32 {
    NonZeroU32::new(n).unwrap()
}

fn group(policy: Policy, servers: Vec<Server>) -> Arc<Group> {
    let mut b = Group::builder("test")
        .policy(policy)
        .shards(NonZeroUsize::MIN);
    for s in servers {
        b = b.server(s);
    }
    b.build().unwrap()
}

fn weighted(weights: &[u32]) -> Vec<Server> {
    weights
        .iter()
        .enumerate()
        .map(|(i, &x)| Server::new(addr(8000 + i as u16)).weight(w(x)))
        .collect()
}

/// The index picked by a fresh request, lease dropped at once.
fn pick(g: &Arc<Group>) -> Option<usize> {
    g.select(&mut g.tried()).map(|l| l.index())
}

/// A lease on server `i`, by excluding every other server.
fn lease_on(g: &Arc<Group>, i: usize) -> Option<Lease> {
    let mut tried = g.tried();
    for j in 0..g.stats().len() {
        if j != i {
            tried.insert(j);
        }
    }
    g.select(&mut tried)
}

fn fails(g: &Group, i: usize) -> u32 {
    g.stats().nth(i).unwrap().fails
}

fn state(g: &Group, i: usize) -> ServerState {
    g.stats().nth(i).unwrap().state
}

#[test]
fn smooth_sequence_5_1_1() {
    let g = group(Policy::RoundRobin, weighted(&[5, 1, 1]));
    let seq: Vec<_> = (0..14).map(|_| pick(&g).unwrap()).collect();
    assert_eq!(seq, [0, 0, 1, 0, 2, 0, 0, 0, 0, 1, 0, 2, 0, 0]);
}

#[test]
fn retry_skips_tried_servers() {
    let g = group(Policy::RoundRobin, weighted(&[1, 1, 1]));
    let mut tried = g.tried();
    let picks: Vec<_> = (0..3)
        .map(|_| g.select(&mut tried).unwrap().index())
        .collect();
    let mut sorted = picks.clone();
    sorted.sort();
    assert_eq!(sorted, [0, 1, 2]);
    assert!(g.select(&mut tried).is_none());
}

#[tokio::test(start_paused = true)]
async fn max_fails_and_fail_timeout_golden() {
    let a = Server::new(addr(1))
        .max_fails(3)
        .fail_timeout(Duration::from_secs(30));
    let g = group(Policy::RoundRobin, vec![a, Server::new(addr(2))]);
    // Two failures: still up.
    for _ in 0..2 {
        lease_on(&g, 0).unwrap().failure();
    }
    assert_eq!((fails(&g, 0), state(&g, 0)), (2, ServerState::Up));
    // The third marks it down: only server 1 is picked now.
    lease_on(&g, 0).unwrap().failure();
    assert_eq!(state(&g, 0), ServerState::Down);
    assert!(lease_on(&g, 0).is_none());
    assert!((0..10).all(|_| pick(&g) == Some(1)));
    // Still down at exactly fail_timeout (`now - checked <= fail_timeout`).
    tokio::time::advance(Duration::from_secs(30)).await;
    assert!(lease_on(&g, 0).is_none());
    // Just after: exactly one request probes it.
    tokio::time::advance(Duration::from_millis(1)).await;
    let probe = lease_on(&g, 0).expect("probe after fail_timeout");
    assert!(lease_on(&g, 0).is_none(), "only one probe");
    // A failed probe: down for another fail_timeout.
    probe.failure();
    drop(probe);
    assert_eq!(fails(&g, 0), 4);
    tokio::time::advance(Duration::from_secs(30)).await;
    assert!(lease_on(&g, 0).is_none());
    tokio::time::advance(Duration::from_millis(1)).await;
    // A good probe resets the count: up again.
    let probe = lease_on(&g, 0).unwrap();
    probe.success();
    drop(probe);
    assert_eq!((fails(&g, 0), state(&g, 0)), (0, ServerState::Up));
    assert!(lease_on(&g, 0).is_some());
}

#[tokio::test(start_paused = true)]
async fn success_resets_only_after_fail_timeout() {
    let a = Server::new(addr(1)).max_fails(3);
    let g = group(Policy::RoundRobin, vec![a, Server::new(addr(2))]);
    lease_on(&g, 0).unwrap().failure();
    // A success within fail_timeout of the failure does not reset (accessed == checked).
    tokio::time::advance(Duration::from_secs(5)).await;
    lease_on(&g, 0).unwrap().success();
    assert_eq!(fails(&g, 0), 1);
    // Picked more than fail_timeout after the failure: checked moves, success resets.
    tokio::time::advance(Duration::from_secs(6)).await;
    lease_on(&g, 0).unwrap().success();
    assert_eq!(fails(&g, 0), 0);
}

#[tokio::test(start_paused = true)]
async fn failures_accumulate_within_the_window() {
    let a = Server::new(addr(1)).max_fails(2);
    let g = group(Policy::RoundRobin, vec![a, Server::new(addr(2))]);
    lease_on(&g, 0).unwrap().failure();
    lease_on(&g, 0).unwrap().success();
    lease_on(&g, 0).unwrap().failure();
    assert_eq!(state(&g, 0), ServerState::Down);
}

#[tokio::test(start_paused = true)]
async fn max_fails_zero_disables_accounting() {
    let a = Server::new(addr(1)).max_fails(0);
    let g = group(Policy::RoundRobin, vec![a, Server::new(addr(2))]);
    for _ in 0..10 {
        lease_on(&g, 0).unwrap().failure();
    }
    assert_eq!(state(&g, 0), ServerState::Up);
    assert!(lease_on(&g, 0).is_some());
}

#[tokio::test(start_paused = true)]
async fn single_server_is_never_marked_down() {
    let g = group(Policy::RoundRobin, vec![Server::new(addr(1))]);
    for _ in 0..5 {
        let l = g.select(&mut g.tried()).unwrap();
        l.failure();
    }
    assert_eq!(state(&g, 0), ServerState::Up);
    assert_eq!(g.max_tries(), 1);
    assert!(pick(&g).is_some());
}

#[tokio::test(start_paused = true)]
async fn backup_only_when_every_primary_is_unavailable() {
    let g = group(
        Policy::RoundRobin,
        vec![
            Server::new(addr(9)).backup(),
            Server::new(addr(1)),
            Server::new(addr(2)),
        ],
    );
    // Primaries come first whatever the order they were added in.
    let stats: Vec<_> = g.stats().map(|s| (s.addr.port(), s.backup)).collect();
    assert_eq!(stats, [(1, false), (2, false), (9, true)]);
    assert!((0..10).all(|_| pick(&g).is_some_and(|i| i < 2)));
    lease_on(&g, 0).unwrap().failure();
    assert!((0..10).all(|_| pick(&g) == Some(1)));
    lease_on(&g, 1).unwrap().failure();
    let l = g.select(&mut g.tried()).unwrap();
    assert!(l.is_backup());
    // A request that tried a primary and found the others down goes to the backup.
    tokio::time::advance(Duration::from_secs(11)).await;
    let mut tried = g.tried();
    let first = g.select(&mut tried).unwrap();
    assert!(!first.is_backup());
    first.failure();
    let second = g.select(&mut tried).unwrap();
    assert!(!second.is_backup(), "the other primary's probe comes first");
    second.failure();
    assert!(g.select(&mut tried).unwrap().is_backup());
}

#[tokio::test(start_paused = true)]
async fn all_unavailable_gives_none() {
    let g = group(Policy::LeastConn, weighted(&[1, 1]));
    lease_on(&g, 0).unwrap().failure();
    lease_on(&g, 1).unwrap().failure();
    assert!(pick(&g).is_none());
    assert!(g
        .stats()
        .all(|s| s.state == ServerState::Down && s.in_flight == 0));
}

#[test]
fn max_conns_is_enforced() {
    let servers = vec![
        Server::new(addr(1)).max_conns(w(1)),
        Server::new(addr(2)).max_conns(w(2)),
    ];
    let g = group(Policy::RoundRobin, servers);
    let held: Vec<_> = (0..3).map(|_| g.select(&mut g.tried()).unwrap()).collect();
    assert!(g.select(&mut g.tried()).is_none());
    let in_flight: Vec<_> = g.stats().map(|s| s.in_flight).collect();
    assert_eq!(in_flight, [1, 2]);
    drop(held);
    assert!(g.stats().all(|s| s.in_flight == 0));
    assert!(pick(&g).is_some());
}

#[test]
fn failure_lowers_effective_weight_which_recovers() {
    let servers = vec![
        Server::new(addr(1)).weight(w(4)).max_fails(2),
        Server::new(addr(2)).weight(w(4)).max_fails(2),
    ];
    let g = group(Policy::RoundRobin, servers);
    lease_on(&g, 0).unwrap().failure();
    let eff = |i: usize| g.peers()[i].effective.load(Ordering::Relaxed);
    assert_eq!(eff(0), 2);
    pick(&g);
    pick(&g);
    assert_eq!(eff(0), 4);
}

#[test]
fn least_conn_prefers_fewest_relative_to_weight() {
    let g = group(Policy::LeastConn, weighted(&[1, 2, 1]));
    // Empty group: ties all round, broken by weighted round-robin: server 1 first.
    let a = g.select(&mut g.tried()).unwrap();
    assert_eq!(a.index(), 1);
    // 1 has 1/2, the others 0: server 0 then 2 (round-robin among the tie).
    let b = g.select(&mut g.tried()).unwrap();
    let c = g.select(&mut g.tried()).unwrap();
    let mut bc = [b.index(), c.index()];
    bc.sort();
    assert_eq!(bc, [0, 2]);
    // Now 1/1, 1/2, 1/1: server 1 has the lowest ratio.
    assert_eq!(pick(&g), Some(1));
}

#[tokio::test]
async fn response_body_holds_the_slot_until_finished() {
    let g = group(Policy::RoundRobin, weighted(&[1]));
    let lease = g.select(&mut g.tried()).unwrap();
    let body = ResponseBody::new(crate::body::ProxyBody::from("hello"), lease);
    assert_eq!(g.stats().next().unwrap().in_flight, 1);
    let bytes = body.collect().await.unwrap().to_bytes();
    assert_eq!(&bytes[..], b"hello");
    assert_eq!(g.stats().next().unwrap().in_flight, 0);
}

#[test]
fn next_upstream_conditions_parse_like_nginx() {
    assert_eq!("http_502".parse(), Ok(Condition::Http502));
    assert_eq!("non_idempotent".parse(), Ok(Condition::NonIdempotent));
    assert!("http_501".parse::<Condition>().is_err());
}

#[test]
fn group_needs_a_primary() {
    let err = Group::builder("x")
        .server(Server::new(addr(1)).backup())
        .build()
        .unwrap_err();
    assert_eq!(err, GroupError::NoPrimary);
    assert_eq!(
        Group::builder("x")
            .server(Server::new(addr(1)))
            .health_check(HealthCheck::new())
            .build()
            .unwrap_err(),
        GroupError::NoRuntime
    );
}

fn ports(g: &Group) -> Vec<u16> {
    g.stats().map(|s| s.addr.port()).collect()
}

#[tokio::test(start_paused = true)]
async fn set_servers_keeps_live_state_and_drains_removed_servers() {
    let g = group(Policy::RoundRobin, weighted(&[1, 1]));
    lease_on(&g, 0).unwrap().failure();
    let held = lease_on(&g, 1).unwrap();
    assert_eq!(held.addr(), addr(8001));
    // 8000 stays (with its failure), 8001 goes (a request still on it), 8002 is new.
    g.set_servers([Server::new(addr(8000)), Server::new(addr(8002))])
        .unwrap();
    assert_eq!(ports(&g), [8000, 8002]);
    assert_eq!(fails(&g, 0), 1);
    assert_eq!(fails(&g, 1), 0);
    // The removed server takes no new request but keeps the one it has.
    assert!((0..10).all(|_| pick(&g).is_some_and(|i| i < 2)));
    let draining = g.draining();
    assert_eq!(draining.len(), 1);
    assert_eq!((draining[0].addr, draining[0].in_flight), (addr(8001), 1));
    held.success();
    drop(held);
    assert!(g.draining().is_empty());
    assert!(g.stats().all(|s| s.in_flight == 0));
}

#[test]
fn set_servers_with_changed_parameters_starts_fresh() {
    let g = group(Policy::RoundRobin, weighted(&[1, 1]));
    let held = lease_on(&g, 0).unwrap();
    g.set_servers([
        Server::new(addr(8000)).weight(w(3)),
        Server::new(addr(8001)),
    ])
    .unwrap();
    let stats: Vec<_> = g.stats().map(|s| (s.weight, s.in_flight)).collect();
    assert_eq!(stats, [(3, 0), (1, 0)]);
    // The old state of 8000 drains separately.
    assert_eq!(g.draining().len(), 1);
    drop(held);
    assert!(g.draining().is_empty());
}

#[test]
fn set_servers_unchanged_keeps_the_round_robin_position() {
    let g = group(Policy::RoundRobin, weighted(&[5, 1, 1]));
    let first: Vec<_> = (0..3).map(|_| pick(&g).unwrap()).collect();
    g.set_servers(weighted(&[5, 1, 1])).unwrap();
    let rest: Vec<_> = (0..4).map(|_| pick(&g).unwrap()).collect();
    assert_eq!([first, rest].concat(), [0, 0, 1, 0, 2, 0, 0]);
}

#[test]
fn set_servers_without_primary_keeps_the_old_set() {
    let g = group(Policy::RoundRobin, weighted(&[1, 1]));
    assert_eq!(
        g.set_servers([Server::new(addr(1)).backup()]),
        Err(GroupError::NoPrimary)
    );
    assert_eq!(ports(&g), [8000, 8001]);
    assert_eq!(g.set_servers([]), Err(GroupError::NoPrimary));
    assert_eq!(ports(&g), [8000, 8001]);
}

#[test]
fn a_request_keeps_its_server_set_across_a_change() {
    let g = group(Policy::RoundRobin, weighted(&[1, 1, 1]));
    let mut tried = g.tried();
    let first = g.select(&mut tried).unwrap();
    // The set shrinks to one server and grows again with another order: the retries
    // of this request still walk the three servers it started with, never one twice.
    g.set_servers([Server::new(addr(9000))]).unwrap();
    let second = g.select(&mut tried).unwrap();
    let third = g.select(&mut tried).unwrap();
    let mut seen = [first.addr(), second.addr(), third.addr()].map(|a| a.port());
    seen.sort();
    assert_eq!(seen, [8000, 8001, 8002]);
    assert!(g.select(&mut tried).is_none());
    // A new request sees the new set.
    assert_eq!(g.select(&mut g.tried()).unwrap().addr(), addr(9000));
    assert_eq!(g.max_tries(), 1);
}

#[derive(Debug, Clone)]
enum Op {
    Acquire,
    Release(usize),
    Fail(usize),
    Succeed(usize),
    /// The lease moves into a response body that is dropped mid-stream (cancel).
    Cancel(usize),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        3 => Just(Op::Acquire),
        1 => any::<usize>().prop_map(Op::Release),
        1 => any::<usize>().prop_map(Op::Fail),
        1 => any::<usize>().prop_map(Op::Succeed),
        1 => any::<usize>().prop_map(Op::Cancel),
    ]
}

proptest! {
    #[test]
    fn every_window_of_total_weight_is_exact(weights in prop::collection::vec(1u32..=10, 1..=8)) {
        let g = group(Policy::RoundRobin, weighted(&weights));
        let total: usize = weights.iter().map(|&x| x as usize).sum();
        let seq: Vec<usize> = (0..3 * total).map(|_| pick(&g).unwrap()).collect();
        for window in seq.windows(total) {
            let mut counts = vec![0u32; weights.len()];
            for &i in window {
                counts[i] += 1;
            }
            prop_assert_eq!(&counts, &weights);
        }
    }

    #[test]
    fn least_conn_never_picks_a_higher_ratio(
        servers in prop::collection::vec((1u32..=5, 0u32..=6), 1..=8),
    ) {
        let weights: Vec<u32> = servers.iter().map(|s| s.0).collect();
        let g = group(Policy::LeastConn, weighted(&weights));
        for (p, &(_, conns)) in g.peers().iter().zip(&servers) {
            p.conns.store(conns, Ordering::Relaxed);
        }
        let i = pick(&g).unwrap();
        let (wi, ci) = (u64::from(servers[i].0), u64::from(servers[i].1));
        for &(wj, cj) in &servers {
            prop_assert!(ci * u64::from(wj) <= u64::from(cj) * wi);
        }
        // The lease was dropped: the counts are as set.
        let back: Vec<u32> = g.stats().map(|s| s.in_flight).collect();
        prop_assert_eq!(back, servers.iter().map(|s| s.1).collect::<Vec<_>>());
    }

    #[test]
    fn unavailable_servers_are_never_picked(
        lc in any::<bool>(),
        servers in prop::collection::vec((1u32..=5, 0u8..4), 1..=8),
        rounds in 1usize..20,
    ) {
        let policy = if lc { Policy::LeastConn } else { Policy::RoundRobin };
        let list = servers
            .iter()
            .enumerate()
            .map(|(i, &(wt, _))| Server::new(addr(i as u16 + 1)).weight(w(wt)).max_conns(w(3)))
            .collect();
        let g = group(policy, list);
        let now = g.now();
        // 0 available, 1 failed (max_fails reached just now), 2 unhealthy, 3 full.
        for (p, &(_, st)) in g.peers().iter().zip(&servers) {
            match st {
                1 => {
                    p.fails.store(1, Ordering::Relaxed);
                    p.checked.store(now, Ordering::Relaxed);
                    p.accessed.store(now, Ordering::Relaxed);
                }
                2 => p.unhealthy.store(true, Ordering::Relaxed),
                3 => p.conns.store(3, Ordering::Relaxed),
                _ => {}
            }
        }
        let single = servers.len() == 1;
        let available = |st: u8| st == 0 || (single && st == 1);
        let any = servers.iter().any(|s| available(s.1));
        for _ in 0..rounds {
            match pick(&g) {
                Some(i) => prop_assert!(available(servers[i].1)),
                None => prop_assert!(!any),
            }
        }
    }

    #[test]
    fn in_flight_returns_to_zero(
        weights in prop::collection::vec(1u32..=3, 1..=5),
        lc in any::<bool>(),
        ops in prop::collection::vec(op(), 0..60),
    ) {
        let policy = if lc { Policy::LeastConn } else { Policy::RoundRobin };
        let g = group(policy, weighted(&weights));
        let mut held: Vec<Lease> = Vec::new();
        for op in ops {
            match op {
                Op::Acquire => held.extend(g.select(&mut g.tried())),
                Op::Release(i) | Op::Fail(i) | Op::Succeed(i) | Op::Cancel(i) if !held.is_empty() => {
                    let lease = held.swap_remove(i % held.len());
                    match op {
                        Op::Fail(_) => lease.failure(),
                        Op::Succeed(_) => lease.success(),
                        Op::Cancel(_) => drop(ResponseBody::new(crate::body::ProxyBody::from("x"), lease)),
                        _ => drop(lease),
                    }
                }
                _ => {}
            }
            let total: u32 = g.stats().map(|s| s.in_flight).sum();
            prop_assert_eq!(total as usize, held.len());
        }
        drop(held);
        prop_assert!(g.stats().all(|s| s.in_flight == 0));
    }

    #[test]
    fn set_changes_never_lose_an_in_flight_slot(
        steps in prop::collection::vec((any::<bool>(), prop::collection::vec(0u16..6, 1..5), 0usize..4), 1..30),
    ) {
        let g = group(Policy::LeastConn, weighted(&[1, 1]));
        let mut held: Vec<Lease> = Vec::new();
        for (change, ports, acquire) in steps {
            if change {
                let list: Vec<Server> = ports.iter().map(|&p| Server::new(addr(8000 + p))).collect();
                g.set_servers(list).unwrap();
            }
            let current = self::ports(&g);
            for _ in 0..acquire {
                if let Some(l) = g.select(&mut g.tried()) {
                    // New requests go to servers of the current set only.
                    prop_assert!(current.contains(&l.addr().port()));
                    held.push(l);
                }
            }
            if held.len() > 3 {
                held.remove(0);
            }
            let total: u32 = g.stats().chain(g.draining()).map(|s| s.in_flight).sum();
            prop_assert_eq!(total as usize, held.len());
        }
        drop(held);
        prop_assert!(g.draining().is_empty());
        prop_assert!(g.stats().all(|s| s.in_flight == 0));
    }
}
