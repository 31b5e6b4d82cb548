//! When to campaign: pre-vote with leader stickiness.
//!
//! openraft 0.9 has no pre-vote. A voter that cannot hear the leader (cut off
//! by a partition, paused, overloaded) starts an election at every timeout
//! and raises its term each time; once it can talk again, its higher term in
//! an AppendEntries reply makes a perfectly healthy leader step down, and
//! the cluster has no leader for an election's time. So openraft's own
//! election timer is off (`enable_elect = false`) and this driver decides
//! when a voter campaigns:
//!
//! 1. Only after it has heard nothing from a leader for the leader lease
//!    (`election_timeout_max`, which is also openraft's lease) plus a random
//!    part of `election_timeout_min`, so voters rarely campaign at once.
//! 2. Only if a quorum answers a pre-vote: a voter grants one only if it has
//!    not heard from a leader for the whole lease itself, is not the leader,
//!    and the candidate's log is at least as up to date as its own. The term
//!    is not raised by asking, so a node that cannot win changes nothing.
//!
//! Then it calls openraft's election (`trigger().elect()`), whose vote the
//! voters grant because their own leases expired too (a voter's contact time
//! is taken after openraft handled the leader's message, so ours expires no
//! earlier than openraft's). Safety never depends on this module: openraft's
//! vote rules still decide who wins; pre-vote only decides who may try.
//!
//! Clocks: each node measures only its own elapsed time (the runtime's
//! monotonic clock, virtual under madsim); nothing compares clocks across
//! nodes.
use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use openraft::ServerState;
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use tokio::time::Instant;

use super::NodeShared;
use crate::raft::network::{RaftRpc, RpcFailure};
use crate::raft::LogId;
use crate::types::NodeId;

/// When this node last heard from a leader of the current (or a newer)
/// term: an AppendEntries or snapshot chunk it accepted.
pub struct LeaderContact {
    last: Mutex<Instant>,
    /// When this node last granted its vote to a candidate.
    voted: Mutex<Instant>,
}

impl LeaderContact {
    /// A node starts as if it had just heard from a leader: it waits a full
    /// lease before campaigning or granting a pre-vote, as a restarted
    /// follower of a healthy cluster should.
    pub fn new() -> Self {
        Self { last: Mutex::new(Instant::now()), voted: Mutex::new(Instant::now()) }
    }

    /// Granting a vote restarts this node's own wait to campaign, as in
    /// Raft (campaigning right after voting would depose the candidate the
    /// moment it wins); it does not count as leader contact for pre-vote
    /// answers.
    pub fn voted(&self) {
        *self.voted.lock() = Instant::now();
    }

    /// Since the last leader message or granted vote, whichever is later.
    pub fn quiet(&self) -> Duration {
        self.since().min(self.voted.lock().elapsed())
    }

    /// The later of the last leader message and the last granted vote.
    pub fn last_event(&self) -> Instant {
        self.last().max(*self.voted.lock())
    }

    pub fn touch(&self) {
        *self.last.lock() = Instant::now();
    }

    pub fn since(&self) -> Duration {
        self.last.lock().elapsed()
    }

    pub fn last(&self) -> Instant {
        *self.last.lock()
    }
}

impl Default for LeaderContact {
    fn default() -> Self {
        Self::new()
    }
}

/// "Would you vote for me now?" Asking does not change the receiver.
#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct PreVoteRequest {
    pub candidate: NodeId,
    /// The candidate's last log id: a voter refuses a candidate whose log is
    /// behind its own, as its real vote would.
    pub last_log_id: Option<LogId>,
}

#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct PreVoteReply {
    pub granted: bool,
}

/// Answers a pre-vote: granted only if this node is not the leader, has not
/// heard from one for the whole lease, and the candidate's log is at least
/// as up to date as its own.
pub fn answer(node: &NodeShared, req: &PreVoteRequest) -> PreVoteReply {
    let leading = node.raft.metrics().borrow().state == ServerState::Leader;
    let heard = node.contact.since() < node.tuning.leader_lease();
    let mine = node.raft.data_metrics().borrow().last_log;
    let granted = !leading && !heard && req.last_log_id >= mine;
    tracing::debug!(candidate = req.candidate, granted, leading, heard, "pre-vote");
    PreVoteReply { granted }
}

/// Runs until aborted: campaigns when the leader has been silent for long
/// enough and a quorum agrees that it has.
pub async fn run(node: Arc<NodeShared>) {
    let tuning = node.tuning.clone();
    let tick = (tuning.heartbeat / 2).max(Duration::from_millis(10));
    let mut rng = Jitter::new(node.id);
    let mut wait = tuning.leader_lease() + rng.below(tuning.election_timeout_min);
    let mut last_try: Option<Instant> = None;
    loop {
        tokio::time::sleep(tick).await;
        let (state, joint) = {
            let m = node.raft.metrics();
            let m = m.borrow();
            if m.running_state.is_err() {
                return;
            }
            (m.state, m.membership_config.membership().get_joint_config().clone())
        };
        let voter = joint.iter().any(|c| c.contains(&node.id));
        if state == ServerState::Leader || state == ServerState::Shutdown || !voter {
            continue;
        }
        if last_try.is_some_and(|t| node.contact.last() > t) {
            // A leader emerged since our last try: back to a full lease.
            last_try = None;
            wait = tuning.leader_lease() + rng.below(tuning.election_timeout_min);
        }
        // A sole voter needs nobody's agreement: it elects itself at once
        // (and again after a while if that did not make it leader).
        let alone = joint.iter().all(|c| c.len() == 1);
        let due = match last_try {
            _ if alone => last_try.is_none_or(|t| t.elapsed() >= tuning.election_timeout_min),
            None => node.contact.quiet() >= wait,
            Some(t) => node.contact.quiet() >= wait && t.elapsed() >= wait,
        };
        if !due {
            continue;
        }
        last_try = Some(Instant::now());
        // After a failed try (split vote, no quorum) the next one comes
        // after a fresh random wait.
        wait = tuning.election_timeout_min + rng.below(tuning.election_timeout_min);
        let before = Round::now(&node);
        if !alone && !pre_vote(&node, &joint, tuning.election_timeout_min / 2).await {
            continue;
        }
        // The round took time: if a leader appeared or another candidate's
        // election moved the term meanwhile, campaigning now would depose
        // it (openraft's elect raises the term unconditionally).
        if !alone && !before.still_current(&node) {
            tracing::debug!(node = node.id, "pre-vote granted but overtaken by a newer term or leader");
            continue;
        }
        tracing::info!(node = node.id, "starting an election (pre-vote granted)");
        if node.raft.trigger().elect().await.is_err() {
            return;
        }
    }
}

/// What a pre-vote round started from; campaigning is only right if none
/// of it changed while the round was out.
struct Round {
    vote: crate::raft::Vote,
    contact: Instant,
}

impl Round {
    fn now(node: &NodeShared) -> Self {
        Self { vote: node.raft.metrics().borrow().vote, contact: node.contact.last_event() }
    }

    /// The vote is unchanged (granting another candidate raises its term; a
    /// leader's election commits it) and no leader was heard nor vote
    /// granted since the round began. Not "no leader known": openraft
    /// reports the leader of the committed vote, which stays set after that
    /// leader died (with its election timer off nothing clears it).
    fn still_current(&self, node: &NodeShared) -> bool {
        let m = node.raft.metrics();
        let m = m.borrow();
        m.vote == self.vote && m.state != ServerState::Leader && node.contact.last_event() <= self.contact
    }
}

/// Asks every other voter for a pre-vote; true if a quorum of every
/// configuration (both halves of a joint one) grants, counting this node.
async fn pre_vote(node: &Arc<NodeShared>, joint: &[BTreeSet<NodeId>], deadline: Duration) -> bool {
    let req = PreVoteRequest { candidate: node.id, last_log_id: node.raft.data_metrics().borrow().last_log };
    let peers: Vec<(NodeId, String)> = {
        let m = node.raft.metrics();
        let m = m.borrow();
        let membership = m.membership_config.membership();
        let voters: BTreeSet<NodeId> = joint.iter().flatten().copied().collect();
        voters
            .into_iter()
            .filter(|id| *id != node.id)
            .filter_map(|id| Some((id, membership.get_node(&id)?.addr.clone())))
            .collect()
    };
    let asks = peers.iter().map(|(id, addr)| {
        let req = &req;
        async move {
            let r: Result<PreVoteReply, RpcFailure> =
                node.channels.call(addr, RaftRpc::PreVote, &node.cluster_id, node.id, req, deadline).await;
            (*id, r.map(|r| r.granted).unwrap_or(false))
        }
    });
    // Decide as soon as a quorum has granted: waiting for a slow or
    // unreachable voter's deadline would only widen the window in which a
    // leader can emerge and be deposed by our election.
    let mut granted = BTreeSet::from([node.id]);
    let mut pending: futures::stream::FuturesUnordered<_> = asks.collect();
    let mut won = quorum_of_each(joint, &granted);
    while !won {
        match futures::StreamExt::next(&mut pending).await {
            Some((id, true)) => {
                granted.insert(id);
                won = quorum_of_each(joint, &granted);
            }
            Some((_, false)) => {}
            None => break,
        }
    }
    tracing::debug!(node = node.id, ?granted, won, "pre-vote round");
    won
}

/// Whether `granted` holds a majority of every configuration in `joint`
/// (one configuration normally, two during a joint-consensus change).
fn quorum_of_each(joint: &[BTreeSet<NodeId>], granted: &BTreeSet<NodeId>) -> bool {
    joint.iter().all(|c| c.iter().filter(|id| granted.contains(id)).count() * 2 > c.len())
}

/// A small deterministic generator (xorshift) for election jitter, seeded
/// per node; under madsim the seed comes from the simulation's RNG.
struct Jitter(u64);

impl Jitter {
    fn new(id: NodeId) -> Self {
        Self(super::identity::random_u64(id, super::now_ms()) | 1)
    }

    fn below(&mut self, max: Duration) -> Duration {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        let ms = max.as_millis().max(1) as u64;
        Duration::from_millis(self.0 % ms)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(ids: &[NodeId]) -> BTreeSet<NodeId> {
        ids.iter().copied().collect()
    }

    #[test]
    fn a_pre_vote_needs_a_majority_of_every_configuration() {
        let one = [set(&[1, 2, 3])];
        assert!(quorum_of_each(&one, &set(&[1, 2])));
        assert!(!quorum_of_each(&one, &set(&[1])), "self alone is not a quorum of three");
        assert!(!quorum_of_each(&one, &set(&[1, 4, 5])), "non-members do not count");
        let four = [set(&[1, 2, 3, 4])];
        assert!(!quorum_of_each(&four, &set(&[1, 2])), "half is not a majority");
        // Joint consensus: {1,2,3} -> {3,4,5} needs both majorities.
        let joint = [set(&[1, 2, 3]), set(&[3, 4, 5])];
        assert!(!quorum_of_each(&joint, &set(&[1, 2, 3])));
        assert!(quorum_of_each(&joint, &set(&[2, 3, 4])));
        assert!(quorum_of_each(&[set(&[7])], &set(&[7])), "a sole voter is its own quorum");
    }

    #[test]
    fn jitter_stays_below_its_bound() {
        let mut j = Jitter(0x9e37_79b9_7f4a_7c15);
        let max = Duration::from_millis(400);
        let draws: Vec<Duration> = (0..1000).map(|_| j.below(max)).collect();
        assert!(draws.iter().all(|d| *d < max));
        let distinct: BTreeSet<_> = draws.iter().collect();
        assert!(distinct.len() > 300, "jitter should spread: {} distinct values", distinct.len());
    }
}
