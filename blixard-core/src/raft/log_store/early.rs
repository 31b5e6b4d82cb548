//! The leader's own entries, reported flushed before their `fdatasync`.
//!
//! openraft 0.9 appends a leader's new entries and waits for them to be
//! flushed before it hands them to its replication tasks, so every write
//! paid the leader's `fdatasync` and then the followers' round trip (their
//! own `fdatasync` included), one after the other. The log store therefore
//! reports a leader's own entries flushed as soon as they are queued for
//! the writer: the leader's `fdatasync` runs while the entries travel to
//! the followers. The log store never reports a follower's entries early:
//! a follower's acknowledgement is its promise to the leader.
//!
//! openraft may then count the leader in a quorum for an entry that is not
//! yet on the leader's disk. Nothing it does with such a commit can be
//! seen before the entry is on a quorum's disks, the leader's included,
//! because everything that would show it waits here for the leader's
//! flush:
//! - the state machine applies an entry only once no early-reported entry
//!   at or below it is still unflushed; a client's answer, a read, a read
//!   index a follower waits on and a snapshot all come after apply;
//! - an AppendEntries never tells a follower a commit index past the
//!   leader's flushed entries (`network.rs`: a commit-only update waits for
//!   the flush, one that carries entries carries the lower bound), so no
//!   follower applies one early;
//! - the commit index the log persists never passes the entries it has
//!   written (the writer's rule, `mod.rs`).
//!
//! If the leader crashes before the flush, the entry may be lost with it,
//! as an unacknowledged write may be; nothing was applied anywhere. Its
//! followers may still hold it, so the restarted node must not write
//! another entry at that index under the same leader id: the log reports a
//! committed vote for itself uncommitted when it is opened, and openraft
//! then leads again only from a new term (`LogStore::report_own_entries_early`).
use std::collections::VecDeque;

use parking_lot::Mutex;

use super::LogId;

/// Early-reported appends not yet on disk, oldest first.
#[derive(Default)]
pub struct EarlyAcks {
    state: Mutex<State>,
    changed: tokio::sync::Notify,
}

#[derive(Default)]
struct State {
    /// Per unflushed early append: the index of its first entry and the id
    /// of the entry before it (the last one known to be on disk below it).
    pending: VecDeque<(u64, Option<LogId>)>,
    /// Set when a write failed: the pending entries never reach the disk.
    failed: Option<String>,
}

impl EarlyAcks {
    /// An append of entries from `first` on, after `before`, is reported
    /// flushed now. Called before it is queued for the writer.
    pub(crate) fn reported(&self, first: u64, before: Option<LogId>) {
        self.state.lock().pending.push_back((first, before));
    }

    /// The writer flushed the oldest `n` early appends.
    pub(crate) fn flushed(&self, n: usize) {
        if n == 0 {
            return;
        }
        {
            let mut s = self.state.lock();
            for _ in 0..n {
                s.pending.pop_front();
            }
        }
        self.changed.notify_waiters();
    }

    /// A write failed: nothing pending will ever be flushed.
    pub(crate) fn failed(&self, why: &str) {
        self.state.lock().failed.get_or_insert_with(|| why.to_string());
        self.changed.notify_waiters();
    }

    /// True when the entry at `index` may still be an unflushed early one.
    pub fn unflushed(&self, index: u64) -> bool {
        self.state.lock().pending.front().is_some_and(|(first, _)| *first <= index)
    }

    /// `commit`, lowered to the last entry known to be on the leader's disk.
    pub fn cap_commit(&self, commit: Option<LogId>) -> Option<LogId> {
        let s = self.state.lock();
        match (commit, s.pending.front()) {
            (Some(c), Some((first, before))) if c.index >= *first => *before,
            _ => commit,
        }
    }

    /// Waits until the entry at `index` is not an unflushed early one; an
    /// error if the write that held it failed.
    pub async fn wait_flushed(&self, index: u64) -> Result<(), String> {
        loop {
            let changed = self.changed.notified();
            tokio::pin!(changed);
            // Registered before the check: a flush between the check and
            // the wait still wakes it.
            changed.as_mut().enable();
            {
                let s = self.state.lock();
                if s.pending.front().is_none_or(|(first, _)| *first > index) {
                    return Ok(());
                }
                if let Some(why) = &s.failed {
                    return Err(why.clone());
                }
            }
            changed.await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use openraft::CommittedLeaderId;

    fn id(index: u64) -> LogId {
        LogId::new(CommittedLeaderId::new(1, 0), index)
    }

    #[test]
    fn commit_is_capped_below_the_first_unflushed_append() {
        let e = EarlyAcks::default();
        assert_eq!(e.cap_commit(Some(id(7))), Some(id(7)));
        e.reported(5, Some(id(4)));
        e.reported(6, Some(id(5)));
        assert!(!e.unflushed(4));
        assert!(e.unflushed(5) && e.unflushed(9));
        assert_eq!(e.cap_commit(Some(id(4))), Some(id(4)));
        assert_eq!(e.cap_commit(Some(id(6))), Some(id(4)));
        assert_eq!(e.cap_commit(None), None);
        e.flushed(1);
        assert!(!e.unflushed(5) && e.unflushed(6));
        assert_eq!(e.cap_commit(Some(id(6))), Some(id(5)));
        e.flushed(1);
        assert_eq!(e.cap_commit(Some(id(6))), Some(id(6)));
        // The very first entry: nothing before it is on disk.
        e.reported(1, None);
        assert_eq!(e.cap_commit(Some(id(1))), None);
    }

    #[tokio::test]
    async fn a_wait_ends_at_the_flush_or_the_failure() {
        let e = std::sync::Arc::new(EarlyAcks::default());
        e.reported(3, Some(id(2)));
        e.reported(4, Some(id(3)));
        e.wait_flushed(2).await.unwrap();
        let waiter = {
            let e = e.clone();
            tokio::spawn(async move { e.wait_flushed(3).await })
        };
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished());
        e.flushed(1);
        waiter.await.unwrap().unwrap();
        let waiter = {
            let e = e.clone();
            tokio::spawn(async move { e.wait_flushed(4).await })
        };
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished());
        e.failed("disk full");
        assert_eq!(waiter.await.unwrap(), Err("disk full".to_string()));
    }
}
