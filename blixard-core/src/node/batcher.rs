//! Group commit at the proposal level.
//!
//! openraft 0.9's core appends one client write at a time and waits for its
//! fsync before taking the next, so N concurrent writes would cost N fsyncs
//! and N replication rounds. The batcher turns concurrent proposals into one
//! Raft entry: it collects whatever has queued while the previous batches
//! were in flight (at most `MAX_BATCH`), submits them as one entry, and hands
//! each caller its own result. Each proposal in an entry is applied on its
//! own: batching changes cost, never meaning. A proposal that arrives with
//! nothing queued and a batch slot free is an entry of its own, handed to
//! Raft from its caller's task (one client's writes do not wait for the
//! batcher task).
use std::sync::Arc;

use openraft::error::{ClientWriteError, RaftError};
use parking_lot::Mutex;
use tokio::sync::{mpsc, oneshot, Notify};
use tracing::Instrument;

use crate::command::{CommandResult, Proposal, ProposalBatch};
use crate::metrics::NodeMetrics;
use crate::raft::progress::Progress;
use crate::raft::Raft;
use crate::types::NodeId;

/// Most proposals in one entry.
pub const MAX_BATCH: usize = 128;
/// Proposals waiting for a batch; beyond this, callers wait (backpressure).
const QUEUE: usize = 16 * 1024;
/// How long one batch may wait for commit. openraft 0.9 never answers a
/// write whose entry was replaced by a snapshot install after this node lost
/// leadership (it only answers entries truncated by a log conflict); without
/// a bound such a batch would hold its in-flight slot, and with it every
/// later write through this node, forever. A healthy commit takes
/// milliseconds; retrying after the bound is safe because request ids
/// deduplicate.
const WRITE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// Why a proposal got no result. The variants split on one question: could
/// the proposal still be committed? Clients are told the truth about it.
#[derive(Debug, Clone)]
pub enum SubmitError {
    /// This node does not lead, and the proposal was never handed to Raft:
    /// it did not and will never apply (through this attempt). The leader
    /// this node knows of, if any.
    NotLeader(Option<(NodeId, String)>),
    /// The proposal reached this node's log (or may have) but its fate is
    /// not known: the commit was not confirmed in time, or leadership moved
    /// while it was in flight. It may still commit; a retry with the same
    /// request id is answered with the first outcome.
    Unknown { why: &'static str, leader: Option<(NodeId, String)> },
    /// The node is shutting down; the proposal was not handed to Raft.
    Closed,
}

type Reply = oneshot::Sender<Result<(u64, CommandResult), SubmitError>>;

/// A proposal, where to send its result, and the span it was submitted in
/// (so its batch's span joins the submitter's trace).
type Item = (Proposal, Reply, tracing::Span);

pub struct Batcher {
    tx: mpsc::Sender<Item>,
    raft: Raft,
    /// Batches in Raft's hands, shared by the batcher task and the direct
    /// path of [`Batcher::submit`].
    slots: Arc<Slots>,
    metrics: Arc<NodeMetrics>,
}

/// When a batch may go to Raft: when none is in flight; beside one, when
/// that one is a lone proposal or a follower has already accepted its
/// entry; beside two, when a follower has accepted the newer one's entry;
/// never beside three. openraft 0.9 has one AppendEntries in flight per
/// follower, so an entry submitted while the one before is still on its
/// way to the followers only waits there, and costs an entry (an
/// AppendEntries to each follower, an fsync on each node) for nothing;
/// with several writers each entry is better spent carrying all of them.
/// Once a follower has accepted the newest entry in flight, its
/// replication is free and a new entry leaves at once, overlapping the
/// commit, apply and answer of those before it; unless that entry is full
/// (`MAX_BATCH`): then the node is saturated, and another entry beside it
/// was measured to cost CPU for no gain. Two writers overlap either way
/// (docs/PERFORMANCE.md (c) items 19, 21 and 23).
struct Slots {
    state: Mutex<SlotState>,
    freed: Notify,
    progress: Arc<Progress>,
}

#[derive(Default, Debug)]
struct SlotState {
    in_flight: Vec<InFlight>,
    next_id: u64,
    /// The batcher task holds proposals and waits for a slot: the direct
    /// path must not overtake it.
    holding: bool,
}

#[derive(Debug, Clone, Copy)]
struct InFlight {
    id: u64,
    /// A batch of one proposal.
    lone: bool,
    /// A batch of `MAX_BATCH` proposals: more writers wait than an entry
    /// holds.
    full: bool,
    /// The log's last index when it went: its entry comes after.
    after: u64,
}

impl SlotState {
    fn open(&self, accepted: u64) -> bool {
        match self.in_flight.as_slice() {
            [] => true,
            [one] => one.lone || (!one.full && accepted > one.after),
            [_, newer] => !newer.full && accepted > newer.after,
            _ => false,
        }
    }
}

/// A batch's place in flight; given back when dropped.
struct Slot {
    slots: Arc<Slots>,
    id: u64,
}

impl Slots {
    fn new(progress: Arc<Progress>) -> Self {
        Self { state: Mutex::default(), freed: Notify::new(), progress }
    }

    fn is_open(&self, st: &SlotState) -> bool {
        st.open(self.progress.last_accepted())
    }

    /// A slot for a lone proposal, if one is open and the batcher task is
    /// not waiting for it.
    fn take_direct(self: &Arc<Self>) -> Option<Slot> {
        let mut st = self.state.lock();
        (!st.holding && self.is_open(&st)).then(|| self.take(&mut st, 1))
    }

    fn take(self: &Arc<Self>, st: &mut SlotState, size: usize) -> Slot {
        let id = st.next_id;
        st.next_id += 1;
        let after = self.progress.last_appended();
        st.in_flight.push(InFlight { id, lone: size == 1, full: size >= MAX_BATCH, after });
        Slot { slots: self.clone(), id }
    }

    /// The batcher task's wait for an open slot while it holds proposals.
    async fn wait_open(&self) {
        loop {
            {
                let mut st = self.state.lock();
                st.holding = true;
                if self.is_open(&st) {
                    return;
                }
            }
            // A slot freed or an entry accepted between the check and here
            // left a permit.
            tokio::select! {
                _ = self.freed.notified() => {}
                _ = self.progress.accepted_grew() => {}
            }
        }
    }

    /// Takes the slot `wait_open` found open, for a batch of `size`.
    fn take_held(self: &Arc<Self>, size: usize) -> Slot {
        let mut st = self.state.lock();
        st.holding = false;
        self.take(&mut st, size)
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.slots.state.lock().in_flight.retain(|f| f.id != self.id);
        self.slots.freed.notify_one();
    }
}

impl Batcher {
    /// `progress`: the log's, which the network also feeds
    /// (raft/progress.rs).
    pub fn start(raft: Raft, metrics: Arc<NodeMetrics>, progress: Arc<Progress>) -> Self {
        let (tx, rx) = mpsc::channel(QUEUE);
        let slots = Arc::new(Slots::new(progress));
        tokio::spawn(run(raft.clone(), rx, slots.clone(), metrics.clone()));
        Self { tx, raft, slots, metrics }
    }

    /// Submits one proposal; resolves once its entry is committed and applied
    /// on this node, with the entry's log index and the proposal's result.
    ///
    /// A proposal that finds nothing queued and a batch slot free is a batch
    /// of its own: its caller's task hands it to Raft and gets its result
    /// back from Raft, without the two hand-offs through the batcher task
    /// and a write task each way (docs/PERFORMANCE.md (c) item 18). Anything
    /// else queues for the next batch.
    pub async fn submit(&self, p: Proposal) -> Result<(u64, CommandResult), SubmitError> {
        if self.tx.capacity() == self.tx.max_capacity() {
            if let Some(slot) = self.slots.take_direct() {
                let span = batch_span(&tracing::Span::current());
                let (index, mut results) = propose(&self.raft, vec![p], &span, &self.metrics, slot).await?;
                return Ok((index, results.pop().expect("one result for each proposal")));
            }
        }
        self.submit_queued(p).await
    }

    /// [`submit`](Self::submit) for a proposal that arrives with others
    /// (a follower's forwarded batch): it always queues, so the batch
    /// stays one entry instead of its first proposal going alone.
    pub async fn submit_queued(&self, p: Proposal) -> Result<(u64, CommandResult), SubmitError> {
        let (reply, rx) = oneshot::channel();
        self.tx.send((p, reply, tracing::Span::current())).await.map_err(|_| SubmitError::Closed)?;
        // The batcher dropped the reply only if it stopped before submitting.
        rx.await.map_err(|_| SubmitError::Closed)?
    }
}

/// A batch's span: a child of the first submitter's span; linked to the
/// others'.
fn batch_span(parent: &tracing::Span) -> tracing::Span {
    tracing::debug_span!(
        parent: parent,
        "batch",
        otel.name = "raft.batch",
        batch.size = tracing::field::Empty,
        raft.commit_index = tracing::field::Empty,
        otel.status_code = tracing::field::Empty,
        otel.status_description = tracing::field::Empty,
    )
}

async fn run(raft: Raft, mut rx: mpsc::Receiver<Item>, slots: Arc<Slots>, metrics: Arc<NodeMetrics>) {
    loop {
        let Some(first) = rx.recv().await else { return };
        // What queues meanwhile joins this batch.
        slots.wait_open().await;
        let mut proposals = Vec::with_capacity(8);
        let mut replies = Vec::with_capacity(8);
        proposals.push(first.0);
        replies.push(first.1);
        let span = batch_span(&first.2);
        while proposals.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok((p, r, from)) => {
                    proposals.push(p);
                    replies.push(r);
                    span.follows_from(&from);
                }
                Err(_) => break,
            }
        }
        let slot = slots.take_held(proposals.len());
        let raft = raft.clone();
        let metrics = metrics.clone();
        tokio::spawn(async move {
            match propose(&raft, proposals, &span, &metrics, slot).await {
                Ok((index, results)) => {
                    for (reply, result) in replies.into_iter().zip(results) {
                        let _ = reply.send(Ok((index, result)));
                    }
                }
                Err(err) => {
                    for reply in replies {
                        let _ = reply.send(Err(err.clone()));
                    }
                }
            }
        });
    }
}

/// Hands one batch to Raft if this node leads, holding its in-flight slot
/// (`slot`) until Raft has answered or the wait has timed out; the
/// entry's index and each proposal's result, in order.
async fn propose(
    raft: &Raft,
    proposals: Vec<Proposal>,
    span: &tracing::Span,
    metrics: &NodeMetrics,
    slot: Slot,
) -> Result<(u64, Vec<CommandResult>), SubmitError> {
    span.record("batch.size", proposals.len());
    // Only a leader hands proposals to Raft. openraft answers "forward
    // to leader" both for a write it refused up front and for one it
    // appended and later lost to a log conflict (which another leader may
    // still commit), so that answer cannot tell "never applied" from
    // "unknown". Checking first keeps the definite case definite.
    let leader = {
        let m = raft.metrics();
        let m = m.borrow();
        if m.state != openraft::ServerState::Leader {
            let known = m
                .current_leader
                .and_then(|id| Some((id, m.membership_config.membership().get_node(&id)?.addr.clone())));
            Some(known)
        } else {
            None
        }
    };
    if let Some(known) = leader {
        span.record("otel.status_code", "ERROR");
        span.record("otel.status_description", "not the leader");
        return Err(SubmitError::NotLeader(known));
    }
    let proposed = proposals.len();
    metrics.proposals.add(proposed as u64);
    metrics.batch_proposals.record(proposed as u64);
    let write = raft.client_write(ProposalBatch(proposals)).instrument(span.clone());
    let outcome = tokio::time::timeout(WRITE_TIMEOUT, write).await;
    span.record("otel.status_code", if matches!(outcome, Ok(Ok(_))) { "OK" } else { "ERROR" });
    drop(slot);
    let Ok(outcome) = outcome else {
        tracing::warn!(proposals = proposed, "write batch not confirmed within {WRITE_TIMEOUT:?}");
        return Err(SubmitError::Unknown { why: "the write was not confirmed in time", leader: None });
    };
    match outcome {
        Ok(resp) => {
            let index = resp.log_id.index;
            span.record("raft.commit_index", index);
            Ok((index, resp.data))
        }
        Err(e) => Err(match e {
            RaftError::APIError(ClientWriteError::ForwardToLeader(f)) => SubmitError::Unknown {
                why: "leadership moved while the write was in flight",
                leader: f.leader_id.zip(f.leader_node.map(|n| n.addr)),
            },
            // Not produced for normal entries; treated as unknown
            // because the entry was handed to Raft.
            RaftError::APIError(ClientWriteError::ChangeMembershipError(_)) => {
                SubmitError::Unknown { why: "the write raced a membership change", leader: None }
            }
            RaftError::Fatal(_) => {
                SubmitError::Unknown { why: "raft stopped while the write was in flight", leader: None }
            }
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn slots() -> Arc<Slots> {
        Arc::new(Slots::new(Arc::new(Progress::default())))
    }

    fn state(s: &Arc<Slots>) -> (usize, bool) {
        let st = s.state.lock();
        (st.in_flight.len(), st.holding)
    }

    /// The batcher task's part: waits for an open slot and takes it for a
    /// batch of `size`; returns once the wait has begun.
    async fn batcher_waits(s: &Arc<Slots>, size: usize) -> tokio::task::JoinHandle<Slot> {
        let waiter = {
            let s = s.clone();
            tokio::spawn(async move {
                s.wait_open().await;
                s.take_held(size)
            })
        };
        while !state(s).1 {
            tokio::task::yield_now().await;
        }
        waiter
    }

    #[test]
    fn a_second_batch_goes_only_beside_a_lone_one() {
        let s = slots();
        let a = s.take_direct().expect("nothing in flight: open");
        let b = s.take_direct().expect("beside a lone proposal: open");
        assert!(s.take_direct().is_none(), "two in flight: closed");
        drop(a);
        drop(b);
        assert_eq!(state(&s), (0, false), "slots given back");

        // A batch of several in flight: nothing goes beside it.
        let big = s.take_held(5);
        assert!(s.take_direct().is_none());
        drop(big);
        let lone = s.take_direct().expect("open again once it is answered");
        let big = s.take_held(3);
        drop(lone);
        assert!(s.take_direct().is_none(), "the batch of three is still in flight");
        drop(big);
        assert_eq!(state(&s), (0, false));
    }

    #[test]
    fn another_batch_goes_once_a_follower_accepted_the_newest() {
        let s = slots();
        s.progress.appended(10);
        s.progress.accepted(10);
        let big = s.take_held(4);
        assert!(s.take_direct().is_none(), "the batch's entry is not even appended");
        s.progress.appended(11);
        assert!(s.take_direct().is_none(), "appended, not accepted");
        s.progress.accepted(11);
        let beside = s.take_direct().expect("accepted by a follower: open");
        assert!(s.take_direct().is_none(), "beside two, the newer one not appended");
        s.progress.appended(12);
        assert!(s.take_direct().is_none(), "beside two, the newer one not accepted");
        // The older one's entry accepted again (a second follower): not
        // what a third waits for.
        s.progress.accepted(11);
        assert!(s.take_direct().is_none());
        s.progress.accepted(12);
        let third = s.take_direct().expect("the newer one accepted: open");
        s.progress.appended(13);
        s.progress.accepted(13);
        assert!(s.take_direct().is_none(), "never beside three");
        drop(big);
        drop(beside);
        drop(third);
        assert_eq!(state(&s), (0, false));

        // A full batch: nothing beside it, accepted or not.
        let full = s.take_held(MAX_BATCH);
        s.progress.appended(14);
        s.progress.accepted(14);
        assert!(s.take_direct().is_none(), "beside a full batch");
        drop(full);
        // Nor a third beside a full newer one.
        let first = s.take_held(2);
        s.progress.appended(15);
        s.progress.accepted(15);
        let full = s.take_held(MAX_BATCH);
        s.progress.appended(16);
        s.progress.accepted(16);
        assert!(s.take_direct().is_none(), "beside a full newer batch");
        drop(first);
        drop(full);
        assert!(s.take_direct().is_some());
    }

    #[tokio::test]
    async fn the_batcher_task_is_not_overtaken_and_wakes_when_a_slot_frees_or_an_entry_is_accepted() {
        let s = slots();
        let big = s.take_held(4);
        // The batcher task holds proposals: a lone one may not slip past it.
        let waiter = batcher_waits(&s, 2).await;
        drop(big);
        assert!(s.take_direct().is_none(), "the direct path overtook the waiting batcher task");
        let held = waiter.await.unwrap();
        assert_eq!(state(&s), (1, false));

        // Waiting beside a batch of two: woken by a follower's acceptance.
        let waiter = batcher_waits(&s, 3).await;
        s.progress.appended(1);
        s.progress.accepted(1);
        let second = tokio::time::timeout(std::time::Duration::from_secs(5), waiter)
            .await
            .expect("not woken by the acceptance")
            .unwrap();
        assert_eq!(state(&s), (2, false));
        drop(held);
        drop(second);
        assert!(s.take_direct().is_some());
    }
}
