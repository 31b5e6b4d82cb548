//! How far the leader's entries have got: the last index appended to this
//! node's log, and the last index of an AppendEntries a follower accepted.
//!
//! The batcher (node/batcher.rs) reads it to decide when a second batch may
//! go to Raft: once a follower has accepted the entry of the batch in
//! flight, openraft's replication task for that follower is free again, and
//! a new entry leaves at once instead of after the first batch's commit,
//! apply and answer (docs/PERFORMANCE.md (c) item 21). Both indexes only
//! grow; they steer batching and nothing else.
use std::sync::atomic::{AtomicU64, Ordering};

use tokio::sync::Notify;

#[derive(Default)]
pub struct Progress {
    appended: AtomicU64,
    accepted: AtomicU64,
    accepted_grew: Notify,
}

impl Progress {
    /// The log took entries up to `index` (log_store, `append`).
    pub fn appended(&self, index: u64) {
        self.appended.fetch_max(index, Ordering::AcqRel);
    }

    pub fn last_appended(&self) -> u64 {
        self.appended.load(Ordering::Acquire)
    }

    /// A follower accepted entries up to `index` (raft/network.rs).
    pub fn accepted(&self, index: u64) {
        if self.accepted.fetch_max(index, Ordering::AcqRel) < index {
            self.accepted_grew.notify_one();
        }
    }

    pub fn last_accepted(&self) -> u64 {
        self.accepted.load(Ordering::Acquire)
    }

    /// Resolves after [`accepted`](Self::accepted) raised the index (at
    /// once if it did since the last wait; it may also resolve without a
    /// change, so a waiter checks again).
    pub async fn accepted_grew(&self) {
        self.accepted_grew.notified().await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn indexes_only_grow_and_a_rise_wakes_the_next_wait() {
        let p = Progress::default();
        p.appended(7);
        p.appended(5);
        assert_eq!(p.last_appended(), 7);
        p.accepted(6);
        p.accepted(3);
        assert_eq!(p.last_accepted(), 6);
        // The rise to 6 left a wake-up for the next wait.
        tokio::time::timeout(std::time::Duration::from_secs(5), p.accepted_grew()).await.expect("woken");
    }
}
