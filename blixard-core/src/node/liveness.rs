//! Liveness and fencing: how the cluster notices a dead node, and why a VM
//! never runs on two nodes at once.
//!
//! **Heartbeats.** Every node sends the leader a `Heartbeat` RPC about once
//! a second (at most a third of the fence timeout). The leader answers only
//! after confirming it still leads a quorum (`ensure_linearizable`), with
//! that confirmation's read index and the cluster's node timeout. It keeps
//! when it last heard each node as soft state ([`LeaderView`]); a leader
//! that takes over grants every node a full timeout from its election.
//!
//! **Marking down.** The leader's monitor proposes `SetNodeDown` for a node
//! not heard from for the node timeout `T`, and `down: false` once it
//! heartbeats again. Apply re-places the VMs of a node marked down. The
//! monitor proposes only to its own log, never forwarding: the decision is
//! this leader's, and a newer leader may have heard the node since (found
//! by the simulator: a deposed leader's retry, forwarded after a partition
//! healed, failed over a node that was heartbeating the new leader).
//!
//! **Fencing.** A node extends its lease to `sent + F` (`F` = 60% of `T`)
//! each time a heartbeat sent at `sent` is answered and it has applied up
//! to the reply's read index. It renews the same lease on its VM backend,
//! whose guard (a process that outlives the node, see `blixard_vm::guard`)
//! stops every VM once the lease lapses: gracefully, then forcibly after
//! `G` = 20% of `T`, so all are gone by `F + G` = 80% of `T`. While the
//! lease is not valid the reconciler starts nothing; once it is valid
//! again the state has caught up (the read index), so VMs placed elsewhere
//! meanwhile are removed, never started.
//!
//! Why it holds: the leader stamps "heard" when the heartbeat *arrives*
//! (after `sent`) and marks down no earlier than `T` after that on its own
//! clock; a new leader was elected after every quorum confirmation of an
//! older one (quorums intersect) and waits `T` from its election. So the
//! node's VMs stop by `sent + 0.8 T` on its clock, before the earliest
//! `sent + T` on the leader's, as long as clock *rates* differ by less than
//! 20% (no clock is compared across machines). The VMs then start elsewhere
//! only after the `SetNodeDown` commits and the new node boots them. A
//! heartbeat that arrives while the leader is marking its node down waits
//! until the mark-down has committed, so the read index it is answered
//! with covers it (`LeaderView::decide`).
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use tokio::time::Instant;

use super::{ForwardError, NodeShared};
use crate::command::Command;
use crate::raft::network::RaftRpc;
use crate::types::{NodeId, NodeStatus};

/// Heartbeats go out at least this often.
pub const HEARTBEAT_EVERY: Duration = Duration::from_secs(1);
/// How soon a heartbeat that was not confirmed is tried again.
const RETRY_EVERY: Duration = Duration::from_millis(100);
/// How often the leader looks for silent nodes and due drain deadlines.
const MONITOR_EVERY: Duration = Duration::from_millis(250);

/// The fence timeout for node timeout `t`: 60% of it.
pub fn fence_timeout(t: Duration) -> Duration {
    t * 3 / 5
}

/// How long the guard lets VMs stop gracefully once the lease lapsed: 20%
/// of the node timeout, so they are gone by 80% of it.
pub fn fence_grace(t: Duration) -> Duration {
    t / 5
}

/// How often a node heartbeats under node timeout `t`: every second, or
/// more often so that at least three heartbeats fit in the fence timeout.
pub fn heartbeat_every(t: Duration) -> Duration {
    HEARTBEAT_EVERY.min(fence_timeout(t) / 3)
}

#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct HeartbeatRequest {
    pub node: NodeId,
}

#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct HeartbeatReply {
    /// The log index the leader confirmed as committed while it still led a
    /// quorum, after the heartbeat arrived.
    pub read_index: u64,
    pub node_timeout_ms: u64,
}

pub type HeartbeatResult = Result<HeartbeatReply, ForwardError>;
/// The leader's heartbeat age of every member node, in ms.
pub type LivenessReply = Result<Vec<(NodeId, u64)>, ForwardError>;

/// The leader's soft state: when it last heard each node. Reset whenever
/// this node starts a new term as leader (a full grace period for all).
#[derive(Default)]
pub struct LeaderView {
    inner: Mutex<ViewInner>,
    /// Orders a mark-down against heartbeats: the monitor holds it from
    /// judging a node silent until its `SetNodeDown` has committed, and a
    /// heartbeat is stamped "heard" only under it. So a heartbeat either
    /// lands before the judgement (which then finds the node heard) or
    /// after the mark-down committed (and its read index covers it: the
    /// node sees its VMs moved before its lease is valid again). Without
    /// it, a heartbeat arriving between the judgement and the commit was
    /// answered with a read index before the mark-down, and the node
    /// restarted VMs that were being started elsewhere (found by the
    /// simulator).
    decide: tokio::sync::Mutex<()>,
}

#[derive(Default)]
struct ViewInner {
    /// The term this view belongs to; 0 = not leading.
    term: u64,
    /// When this node became leader of `term`, pushed later when the node
    /// timeout is lowered (leases granted under the old one still run).
    since: Option<Instant>,
    timeout: Duration,
    seen: HashMap<NodeId, Instant>,
}

impl LeaderView {
    /// Brings the view to leader term `term` under node timeout `timeout`.
    /// A new term waits `grace` (at least `timeout`: the longest timeout a
    /// live lease may have been granted under) before judging anyone.
    fn refresh(&self, term: u64, timeout: Duration, grace: Duration, now: Instant) {
        let mut v = self.inner.lock();
        if v.term != term {
            let since = now + grace.saturating_sub(timeout);
            *v = ViewInner { term, since: Some(since), timeout, seen: HashMap::new() };
        } else if timeout < v.timeout {
            // A node may hold a lease granted under the longer timeout:
            // wait that out before judging anyone by the shorter one.
            let grace = now + (v.timeout - timeout);
            v.since = v.since.max(Some(grace));
            v.timeout = timeout;
        } else {
            v.timeout = timeout;
        }
    }

    fn clear(&self) {
        *self.inner.lock() = ViewInner::default();
    }

    fn heard(&self, term: u64, node: NodeId, now: Instant) {
        let mut v = self.inner.lock();
        if v.term == term {
            v.seen.insert(node, now);
        }
    }

    /// Since `node` was last heard (or the grant, if later: what marking
    /// down goes by), and since it was last heard this term, if it was.
    fn age(&self, node: NodeId, now: Instant) -> Option<(Duration, Option<Duration>)> {
        let v = self.inner.lock();
        let since = v.since?;
        let seen = v.seen.get(&node).copied();
        let last = seen.map_or(since, |s| s.max(since));
        Some((now.saturating_duration_since(last), seen.map(|s| now.saturating_duration_since(s))))
    }
}

/// This node's fencing lease: VMs may run here while it is valid.
#[derive(Default)]
pub struct Fence {
    inner: Mutex<FenceInner>,
    /// The latest deadline handed to the VM backend (whose guard enforces it
    /// outside this process). Renewals of it are serialised and only ever
    /// extend it: a renewal that finishes late must not shorten the host's
    /// lease below this node's own.
    host: tokio::sync::Mutex<Option<Instant>>,
}

#[derive(Default, Clone, Copy)]
struct FenceInner {
    valid_until: Option<Instant>,
    /// Bumped by each renewal that finds the lease lapsed (or never held):
    /// the reconciler then re-examines every VM.
    epoch: u64,
    grace: Duration,
}

impl Fence {
    /// Extends the lease to `until` (never shortens it).
    pub fn renew(&self, until: Instant, grace: Duration) {
        self.renew_at(until, grace, Instant::now())
    }

    fn renew_at(&self, until: Instant, grace: Duration, now: Instant) {
        let mut f = self.inner.lock();
        if f.valid_until.is_none_or(|v| v <= now) {
            f.epoch += 1;
            tracing::info!(epoch = f.epoch, "fencing lease (re)gained: in contact with a quorum");
        }
        f.valid_until = f.valid_until.max(Some(until));
        f.grace = grace;
    }

    /// VMs may be started now.
    pub fn valid(&self) -> bool {
        self.valid_at(Instant::now())
    }

    fn valid_at(&self, now: Instant) -> bool {
        self.inner.lock().valid_until.is_some_and(|v| now < v)
    }

    /// The lease was held and has lapsed: VMs must stop.
    pub fn lapsed(&self) -> bool {
        self.inner.lock().valid_until.is_some_and(|v| Instant::now() >= v)
    }

    pub fn epoch(&self) -> u64 {
        self.inner.lock().epoch
    }

    /// How long a fenced VM may take to stop gracefully.
    pub fn grace(&self) -> Duration {
        self.inner.lock().grace
    }

    /// Time left on the lease (zero once lapsed or never held).
    pub fn remaining(&self) -> Duration {
        self.inner.lock().valid_until.map_or(Duration::ZERO, |v| v.saturating_duration_since(Instant::now()))
    }
}

/// Answers a heartbeat from `from` (also this node's own): only a leader
/// that confirms its quorum after the heartbeat arrived says yes.
pub async fn answer(node: &NodeShared, from: NodeId) -> HeartbeatResult {
    let term = {
        let m = node.raft.metrics();
        let m = m.borrow();
        if m.state != openraft::ServerState::Leader {
            let leader = m
                .current_leader
                .and_then(|id| m.membership_config.membership().get_node(&id).map(|n| (id, n.addr.clone())));
            return Err(ForwardError::NotLeader { leader });
        }
        m.current_term
    };
    let timeout = node.state.node_timeout();
    {
        let _decide = node.liveness.decide.lock().await;
        let now = Instant::now();
        node.liveness.refresh(term, timeout, node.state.node_timeout_grace(), now);
        node.liveness.heard(term, from, now);
    }
    let read_index = node.confirm_leadership().await?;
    Ok(HeartbeatReply { read_index, node_timeout_ms: timeout.as_millis() as u64 })
}

/// The leader's heartbeat ages, in ms, of every member node.
pub fn ages(node: &NodeShared) -> LivenessReply {
    if !node.is_leader() {
        return Err(ForwardError::NotLeader { leader: node.leader() });
    }
    let (mut out, now) = (Vec::new(), Instant::now());
    node.state.for_each_node(|n| {
        if let Some((age, _)) = node.liveness.age(n.id, now) {
            out.push((n.id, age.as_millis() as u64));
        }
    });
    out.sort_unstable();
    Ok(out)
}

/// Heartbeats the leader forever, renewing this node's lease (and its VM
/// backend's) on every confirmed answer.
pub async fn heartbeat_loop(node: Arc<NodeShared>) {
    loop {
        let timeout = node.state.node_timeout();
        let every = heartbeat_every(timeout);
        let sent = Instant::now();
        let next = match heartbeat_once(&node, every).await {
            Ok(reply) => {
                renew(&node, sent, &reply).await;
                sent + every
            }
            // No leader (an election), or it moved: try again soon, so that
            // the lease is renewed from the new leader's first answer rather
            // than a whole interval later.
            Err(why) => {
                tracing::debug!(%why, lease_left = ?node.fence.remaining(), "heartbeat not confirmed");
                Instant::now() + RETRY_EVERY.min(every)
            }
        };
        tokio::time::sleep_until(next).await;
    }
}

async fn heartbeat_once(node: &Arc<NodeShared>, every: Duration) -> Result<HeartbeatReply, String> {
    if node.is_leader() {
        return answer(node, node.id).await.map_err(|e| e.to_string());
    }
    let Some((id, addr)) = node.leader() else { return Err("no leader known".into()) };
    let req = HeartbeatRequest { node: node.id };
    let wait = every.max(Duration::from_millis(500));
    let r: Result<HeartbeatResult, _> =
        node.channels.call(&addr, RaftRpc::Heartbeat, &node.cluster_id, node.id, &req, wait).await;
    match r {
        Ok(Ok(reply)) => Ok(reply),
        Ok(Err(e)) => Err(format!("leader {id}: {e}")),
        Err(e) => Err(format!("leader {id}: {e}")),
    }
}

/// Extends the lease from `sent` once this node has applied up to the
/// confirmed read index, so that a valid lease always comes with a state at
/// least that fresh.
async fn renew(node: &NodeShared, sent: Instant, reply: &HeartbeatReply) {
    let timeout = Duration::from_millis(reply.node_timeout_ms);
    let until = sent + fence_timeout(timeout);
    let left = until.saturating_duration_since(Instant::now());
    let caught_up = node
        .raft
        .wait(Some(left))
        .applied_index_at_least(Some(reply.read_index), "fencing lease")
        .await
        .is_ok();
    if !caught_up || Instant::now() >= until {
        tracing::debug!(read_index = reply.read_index, "lease not renewed: this node is behind the leader");
        return;
    }
    let grace = fence_grace(timeout);
    // The host's lease first, then this node's: the guard's deadline is
    // never earlier than the node's, so whenever the guard stopped VMs the
    // node's own lease had lapsed too, and the renewal that follows starts a
    // new epoch in which the reconciler starts them again.
    if let Some(backend) = &node.vm_backend {
        let mut host = node.fence.host.lock().await;
        if host.is_none_or(|h| h < until) {
            let valid_for = until.saturating_duration_since(Instant::now());
            if let Err(e) = backend.renew_lease(valid_for, grace).await {
                // The guard keeps the old deadline; so does this node.
                tracing::warn!(error = %e, "could not renew the VM backend's fencing lease");
                return;
            }
            *host = Some(until);
        }
    }
    node.fence.renew(until, grace);
}

/// On the leader: marks silent nodes down and heard ones ready, and moves
/// every VM off a drained node whose deadline has passed.
pub async fn monitor_loop(node: Arc<NodeShared>) {
    loop {
        tokio::time::sleep(MONITOR_EVERY).await;
        let term = {
            let m = node.raft.metrics();
            let m = m.borrow();
            (m.state == openraft::ServerState::Leader).then_some(m.current_term)
        };
        let Some(term) = term else {
            node.liveness.clear();
            continue;
        };
        // Held until the changes below have committed (see `decide`).
        let _decide = node.liveness.decide.lock().await;
        let (timeout, now) = (node.state.node_timeout(), Instant::now());
        node.liveness.refresh(term, timeout, node.state.node_timeout_grace(), now);
        let now_ms = super::now_ms();
        let mut due = Vec::new();
        node.state.for_each_node(|n| {
            if n.status == NodeStatus::Left {
                return;
            }
            // Only nodes known to heartbeat are judged by it: one of an
            // older version neither heartbeats nor fences its VMs.
            if let Some((age, heard)) = node.liveness.age(n.id, now) {
                if !n.down && n.heartbeats && age > timeout {
                    due.push(Command::SetNodeDown { id: n.id, down: true });
                } else if (n.down || !n.heartbeats) && heard.is_some_and(|h| h < timeout / 2) {
                    due.push(Command::SetNodeDown { id: n.id, down: false });
                }
            }
            if let Some(d) = n.drain {
                if d.deadline_ms != 0 && now_ms >= d.deadline_ms && d.max_parallel != 0 && !n.down {
                    due.push(Command::DrainNode { id: n.id, max_parallel: 0, deadline_ms: 0 });
                }
            }
        });
        // Proposed here only: a decision of this leader's view, never
        // forwarded to (or retried under) another leader, which may have
        // heard the node meanwhile (see the module docs).
        for cmd in due {
            tracing::info!(?cmd, "liveness");
            if let Err(e) = node.propose_as_leader(cmd).await {
                tracing::warn!(error = %e, "liveness change not committed");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timings_leave_the_margin_the_guarantee_needs() {
        for secs in [2u64, 4, 10, 60] {
            let t = Duration::from_secs(secs);
            assert!(fence_timeout(t) + fence_grace(t) <= t * 4 / 5, "{secs}");
            assert!(heartbeat_every(t) * 3 <= fence_timeout(t), "{secs}");
        }
        assert_eq!(heartbeat_every(Duration::from_secs(10)), HEARTBEAT_EVERY);
    }

    #[test]
    fn a_new_term_grants_everyone_a_full_timeout() {
        let (v, t0, s) = (LeaderView::default(), Instant::now(), Duration::from_secs);
        let t = s(10);
        v.refresh(3, t, t, t0);
        v.heard(3, 1, t0);
        assert_eq!(v.age(1, t0 + s(4)), Some((s(4), Some(s(4)))));
        assert_eq!(v.age(2, t0 + s(4)), Some((s(4), None)));
        v.heard(2, 2, t0 + s(4));
        assert_eq!(v.age(2, t0 + s(5)).map(|a| a.1), Some(None), "another term's heartbeat");
        v.refresh(4, t, t, t0 + s(4));
        assert_eq!(v.age(1, t0 + s(4)), Some((Duration::ZERO, None)));
        // Lowering the timeout first waits out leases of the longer one
        // (for marking down; a heartbeat still counts as heard at once).
        v.refresh(4, s(4), t, t0 + s(4));
        v.heard(4, 1, t0 + s(5));
        assert_eq!(v.age(1, t0 + s(6)), Some((Duration::ZERO, Some(s(1)))));
        assert_eq!(v.age(2, t0 + s(9)).map(|a| a.0), Some(Duration::ZERO));
        assert_eq!(v.age(2, t0 + s(12)).map(|a| a.0), Some(s(2)));
        // A new leader under a lowered timeout waits out the previous one.
        v.refresh(5, s(4), s(10), t0 + s(20));
        assert_eq!(v.age(1, t0 + s(26)).map(|a| a.0), Some(Duration::ZERO));
        assert_eq!(v.age(1, t0 + s(29)).map(|a| a.0), Some(s(3)));
        v.clear();
        assert_eq!(v.age(1, t0), None);
    }

    #[test]
    fn a_lease_lapses_and_a_renewal_after_it_starts_a_new_epoch() {
        let (f, t0, s) = (Fence::default(), Instant::now(), Duration::from_secs);
        assert!(!f.valid_at(t0));
        f.renew_at(t0 + s(6), s(2), t0);
        assert!(f.valid_at(t0 + s(5)) && !f.valid_at(t0 + s(6)));
        assert_eq!(f.epoch(), 1);
        f.renew_at(t0 + s(1), s(2), t0 + s(1));
        assert!(f.valid_at(t0 + s(5)), "never shortened");
        assert_eq!(f.epoch(), 1);
        f.renew_at(t0 + s(13), s(2), t0 + s(7));
        assert_eq!(f.epoch(), 2, "renewed after it lapsed");
        assert_eq!(f.grace(), s(2));
    }
}
