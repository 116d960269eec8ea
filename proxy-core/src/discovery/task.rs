//! [`DiscoveryTask`]: the background re-resolution of one group.

use std::sync::atomic::Ordering;
use std::sync::Weak;
use std::time::Duration;

use tokio::task::JoinHandle;

use crate::balance::Group;
use crate::discovery::resolve::Discovery;

/// The background task that re-resolves a group's names and updates its servers.
/// Dropping it stops the task; so does dropping the group (the task holds it weakly).
#[derive(Debug)]
pub struct DiscoveryTask {
    handle: JoinHandle<()>,
}

impl DiscoveryTask {
    pub(crate) fn spawn(discovery: Discovery, group: Weak<Group>, first: Duration) -> Self {
        DiscoveryTask {
            handle: tokio::spawn(run(discovery, group, first)),
        }
    }

    /// Whether the task has stopped (its group was dropped).
    pub fn is_finished(&self) -> bool {
        self.handle.is_finished()
    }
}

impl Drop for DiscoveryTask {
    fn drop(&mut self) {
        self.handle.abort();
    }
}

async fn run(discovery: Discovery, group: Weak<Group>, first: Duration) {
    let mut wait = first;
    loop {
        tokio::time::sleep(wait).await;
        if group.strong_count() == 0 {
            return;
        }
        let round = discovery.round().await;
        wait = round.next;
        let Some(group) = group.upgrade() else {
            return;
        };
        let before: Vec<_> = group.stats().map(|s| s.addr).collect();
        match group.set_servers(round.servers) {
            Ok(()) => {
                let after: Vec<_> = group.stats().map(|s| s.addr).collect();
                if before != after {
                    discovery.inner.updates.fetch_add(1, Ordering::Relaxed);
                    let added = after.iter().filter(|a| !before.contains(a)).count();
                    let removed = before.iter().filter(|a| !after.contains(a)).count();
                    tracing::info!(
                        group = group.name(),
                        servers = after.len(),
                        added,
                        removed,
                        "upstream servers changed after DNS resolution"
                    );
                }
            }
            Err(e) => {
                tracing::warn!(group = group.name(), error = %e, "DNS resolution gave no usable server set; keeping the current one");
            }
        }
    }
}
