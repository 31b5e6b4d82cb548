//! The change feed: what each applied Raft entry changed, kept for watchers.
//!
//! Apply records the VMs and nodes each entry touched and, when the entry is
//! applied, turns them into one [`Revision`] (the entry's log index) holding
//! the records as they are after it: a VM is its `Arc<VmRecord>` (shared with
//! the table, never copied), a removed VM or node is a delete. Only records
//! that differ from before the entry are events, so a rejected command or a
//! rolled-back batch produces none. Every replica applies the same log, so
//! every replica produces the same revisions: a watcher may resume on any
//! member.
//!
//! The history is soft state: bounded ([`HISTORY_EVENTS`]), never persisted,
//! never part of a snapshot or the digest. After a restore (start-up from a
//! snapshot, snapshot install) it starts just after the snapshot's index.
//! Apply never waits for a watcher: it appends under a short lock and signals
//! a `tokio::sync::watch`; watchers copy out `Arc`s under the same lock and
//! filter on their own task. A watcher that asks for (or falls behind to) a
//! revision older than the history gets [`Compacted`] and must re-list.
use std::collections::VecDeque;
use std::sync::Arc;

use parking_lot::Mutex;

use crate::types::{NodeRecord, VmRecord};

/// How many events the history keeps (whole revisions, oldest evicted
/// first). An event is a few pointers plus a shared record (a VM's record is
/// the table's own `Arc`, about 600 B with its strings; a node's is a copy).
/// Under steady writes most records in the history are no longer in the
/// table (deleted or since replaced), so a full history holds about
/// 8,192 × 600 B ≈ 5 MiB. At a busy cluster's rate of a few hundred changes
/// per second it covers half a minute or more: reconnecting after a leader
/// change takes a second or two. It was 20,000 until the write-path work
/// measured what a full one costs (docs/PERFORMANCE.md (c)).
pub const HISTORY_EVENTS: usize = 8_192;

/// At most this many revisions are handed to a watcher per call, so a
/// far-behind watcher holds the lock only briefly.
const READ_BATCH: usize = 256;

/// One change: the record after the revision, or, for a delete, as it was
/// before.
#[derive(Clone, Debug, PartialEq)]
pub enum Change {
    Vm { record: Arc<VmRecord>, deleted: bool },
    Node { record: Arc<NodeRecord>, deleted: bool },
}

/// Everything one Raft entry changed, VMs by name then nodes by id (the same
/// order on every replica).
#[derive(Debug, PartialEq)]
pub struct Revision {
    pub index: u64,
    pub changes: Vec<Change>,
}

/// A watcher asked for revisions the history no longer holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error(
    "compacted: revision {asked} is older than the retained history, which starts at revision {oldest}; \
     re-list (vm list) and watch from the current revision (cluster status shows it)"
)]
pub struct Compacted {
    pub asked: u64,
    pub oldest: u64,
}

/// What a watcher reads: the revisions from its position on, and where to
/// continue.
#[derive(Debug)]
pub struct Since {
    pub revisions: Vec<Arc<Revision>>,
    /// The next revision to ask for.
    pub next: u64,
}

struct History {
    revisions: VecDeque<Arc<Revision>>,
    events: usize,
    cap: usize,
    /// The lowest revision a watcher may still start from: everything from
    /// it on is retained.
    oldest: u64,
    /// The last applied (published) revision.
    applied: u64,
}

/// The change feed of one [`crate::state::ClusterState`].
pub struct Feed {
    history: Mutex<History>,
    applied: tokio::sync::watch::Sender<u64>,
    /// Set when the node shuts down: watchers end their streams.
    closed: std::sync::atomic::AtomicBool,
}

impl Default for Feed {
    fn default() -> Self {
        Self {
            history: Mutex::new(History {
                revisions: VecDeque::new(),
                events: 0,
                cap: HISTORY_EVENTS,
                oldest: 1,
                applied: 0,
            }),
            applied: tokio::sync::watch::channel(0).0,
            closed: std::sync::atomic::AtomicBool::new(false),
        }
    }
}

impl Feed {
    /// Sets how many events are kept (at least 1); evicts at once if needed.
    pub fn set_capacity(&self, events: usize) {
        let mut h = self.history.lock();
        h.cap = events.max(1);
        h.evict();
    }

    /// The last published revision: everything up to it is visible to
    /// readers. Read it before listing, then watch from it + 1: no gap.
    pub fn revision(&self) -> u64 {
        self.history.lock().applied
    }

    /// The oldest revision a watcher may start from.
    pub fn oldest(&self) -> u64 {
        self.history.lock().oldest
    }

    /// Ends every watcher (the node is shutting down).
    pub fn close(&self) {
        self.closed.store(true, std::sync::atomic::Ordering::Release);
        self.applied.send_modify(|_| ());
    }

    pub fn is_closed(&self) -> bool {
        self.closed.load(std::sync::atomic::Ordering::Acquire)
    }

    /// Wakes on every publish; the value is the last published revision.
    pub fn subscribe(&self) -> tokio::sync::watch::Receiver<u64> {
        self.applied.subscribe()
    }

    /// The revisions from `from` on (at most a batch of them); `from` 0
    /// means "from now". Revisions without events are not stored, so
    /// `next` may jump past the last one returned.
    pub fn since(&self, from: u64) -> Result<Since, Compacted> {
        let h = self.history.lock();
        let from = if from == 0 { h.applied.saturating_add(1) } else { from };
        if from < h.oldest {
            return Err(Compacted { asked: from, oldest: h.oldest });
        }
        let start = h.revisions.partition_point(|r| r.index < from);
        let revisions: Vec<Arc<Revision>> = h.revisions.range(start..).take(READ_BATCH).cloned().collect();
        let next = match revisions.last() {
            Some(last) if start + revisions.len() < h.revisions.len() => last.index + 1,
            _ => from.max(h.applied.saturating_add(1)),
        };
        Ok(Since { revisions, next })
    }

    /// Appends the revisions of one apply run and publishes `applied` (the
    /// last index the run applied). Called after the run's VM changes are
    /// visible to readers.
    pub(crate) fn publish(&self, revisions: Vec<Revision>, applied: u64) {
        let mut h = self.history.lock();
        // The state machine applies strictly increasing indices, so the
        // history stays sorted (`since` searches it).
        for r in revisions {
            h.events += r.changes.len();
            h.revisions.push_back(Arc::new(r));
        }
        h.applied = h.applied.max(applied);
        h.evict();
        let applied = h.applied;
        drop(h);
        self.applied.send_replace(applied);
    }

    /// Forgets the history: the state was replaced by a snapshot at
    /// `applied`, so the feed continues from `applied + 1`. Watchers still
    /// behind it are told they were compacted.
    pub(crate) fn reset(&self, applied: u64) {
        let mut h = self.history.lock();
        h.revisions.clear();
        h.events = 0;
        h.oldest = applied.saturating_add(1);
        h.applied = applied;
        drop(h);
        self.applied.send_replace(applied);
    }
}

impl History {
    fn evict(&mut self) {
        // The newest revision stays even when it alone exceeds the cap.
        while self.events > self.cap && self.revisions.len() > 1 {
            let Some(r) = self.revisions.pop_front() else { break };
            self.events -= r.changes.len();
            self.oldest = r.index.saturating_add(1);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rev(index: u64, events: usize) -> Revision {
        let state = crate::state::ClusterState::new();
        let register = crate::command::Command::RegisterNode {
            id: 1,
            addr: "127.0.0.1:7001".into(),
            resources: crate::types::NodeResources::plain(crate::types::Resources::new(1, 256, 1)),
            labels: Default::default(),
        };
        state.apply(&crate::command::Proposal { at_ms: 1, request: None, command: register }, 1).unwrap();
        let node = Arc::new(state.with_node(1, |n| n.clone()).unwrap());
        let changes = (0..events).map(|_| Change::Node { record: node.clone(), deleted: true }).collect();
        Revision { index, changes }
    }

    #[test]
    fn evicts_whole_revisions_and_moves_the_boundary() {
        let feed = Feed::default();
        feed.set_capacity(5);
        feed.publish(vec![rev(3, 2), rev(5, 2)], 6);
        assert_eq!(feed.oldest(), 1);
        let all = feed.since(1).unwrap();
        assert_eq!(all.revisions.iter().map(|r| r.index).collect::<Vec<_>>(), [3, 5]);
        assert_eq!(all.next, 7);
        // 2 + 2 + 3 = 7 events > 5: revision 3 goes, so 4 is the oldest.
        feed.publish(vec![rev(8, 3)], 8);
        assert_eq!(feed.oldest(), 4);
        assert_eq!(feed.since(3).err(), Some(Compacted { asked: 3, oldest: 4 }));
        let rest = feed.since(4).unwrap();
        assert_eq!(rest.revisions.iter().map(|r| r.index).collect::<Vec<_>>(), [5, 8]);
        assert_eq!(feed.since(6).unwrap().revisions[0].index, 8);
        // A revision larger than the cap is kept alone.
        feed.publish(vec![rev(9, 9)], 9);
        assert_eq!(feed.oldest(), 9);
        assert_eq!(feed.since(9).unwrap().revisions.len(), 1);
        let msg = feed.since(2).unwrap_err().to_string();
        assert!(msg.starts_with("compacted: revision 2"), "{msg}");
        assert!(msg.contains("starts at revision 9"), "{msg}");
    }

    #[test]
    fn zero_means_from_now_and_waiting_positions_advance() {
        let feed = Feed::default();
        feed.publish(vec![rev(2, 1)], 4);
        let now = feed.since(0).unwrap();
        assert!(now.revisions.is_empty());
        assert_eq!(now.next, 5);
        // A position past the applied index is kept (a lagging member).
        assert_eq!(feed.since(9).unwrap().next, 9);
        let mut rx = feed.subscribe();
        feed.publish(vec![rev(5, 1)], 5);
        assert!(rx.has_changed().unwrap());
        assert_eq!(*rx.borrow_and_update(), 5);
    }

    #[test]
    fn reset_starts_after_the_snapshot() {
        let feed = Feed::default();
        feed.publish(vec![rev(1, 1), rev(2, 1)], 2);
        feed.reset(100);
        assert_eq!(feed.revision(), 100);
        assert_eq!(feed.since(2).err(), Some(Compacted { asked: 2, oldest: 101 }));
        let next = feed.since(101).unwrap();
        assert!(next.revisions.is_empty());
        assert_eq!(next.next, 101);
    }

    #[test]
    fn reads_come_in_batches() {
        let feed = Feed::default();
        let revs: Vec<Revision> = (1..=(READ_BATCH as u64 + 10)).map(|i| rev(i, 1)).collect();
        feed.publish(revs, READ_BATCH as u64 + 10);
        let first = feed.since(1).unwrap();
        assert_eq!(first.revisions.len(), READ_BATCH);
        assert_eq!(first.next, READ_BATCH as u64 + 1);
        let second = feed.since(first.next).unwrap();
        assert_eq!(second.revisions.len(), 10);
        assert_eq!(second.next, READ_BATCH as u64 + 11);
    }
}
