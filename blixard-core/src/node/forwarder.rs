//! A follower's client writes, forwarded to the leader in batches.
//!
//! A follower used to forward every write as a call of its own, so at 256
//! clients it made 256 concurrent calls to the leader, each costing an HTTP/2
//! stream, headers, a task and an envelope on both ends: through a follower
//! the cluster did half the writes per second it did through the leader
//! (docs/PERFORMANCE.md (c)). The forwarder does for forwards what the
//! batcher does for proposals: whatever queued while earlier forwards were in
//! flight goes to the leader in one `ProposeBatch` call, and each caller gets
//! its own proposal's reply.
//!
//! What does not change: a forward carries the client it is for (auth.rs),
//! and the leader checks that client's rights again. A batch therefore holds
//! proposals of one caller only (the same token or certificate claim), sent
//! with that caller's metadata exactly as a single forward is; the leader
//! checks each proposal's command against the caller's role on its own. A
//! lone proposal goes as a plain `Propose`, the call every version of the
//! leader answers; a leader that predates `ProposeBatch` answers
//! "unimplemented" without touching the batch, after which its address gets
//! single calls.
//!
//! Where the leader serves a peer link (raft/link.rs), a forward goes on it
//! instead, lone or batched alike, as a [`LinkForward`]: the proposals with
//! the caller's token and the trace context that gRPC would carry as
//! metadata. A caller known by a certificate's claim is carried only on a
//! link with mutual TLS (the leader believes claims only from node
//! certificates), and over gRPC otherwise. So does a forward when
//! the link is not up, or when it fails on the link: every proposal carries
//! its request id, so a resend applies at most once (dedup.rs).
use std::borrow::Cow;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot, Semaphore};
use tracing::Instrument;

use super::ProposeReply;
use crate::auth::Caller;
use crate::command::Proposal;
use crate::format;
use crate::metrics::NodeMetrics;
use crate::raft::link::{Hello, LinkError, KIND_FORWARD};
use crate::raft::network::{PeerChannels, RaftRpc, RpcFailure};
use crate::types::NodeId;

/// Most proposals in one forwarded batch (the leader's batcher takes at
/// most as many per entry).
pub const MAX_FORWARD_BATCH: usize = super::batcher::MAX_BATCH;
/// Batch rounds in flight at once; while one is, forwards accumulate into
/// the next. One round sends a call per (leader, caller) group, all at
/// once. One at a time gives the leader fewer, larger batches: at 16
/// clients through a follower 6,890-7,446 writes/s against 5,786-5,990
/// with 4 and 6,427-6,710 with 2, no change at 1 or 256 clients
/// (docs/PERFORMANCE.md (c), item 9).
const MAX_IN_FLIGHT: usize = 1;
/// How long one round may hold the turn: a round that takes longer (a
/// leader that stopped answering, until its calls' deadline) no longer
/// holds back the next round, whose forwards may go to a new leader. A
/// healthy round takes milliseconds.
const ROUND_HOLD: Duration = Duration::from_millis(250);
/// Forwards waiting for a batch; beyond this, callers wait.
const QUEUE: usize = 16 * 1024;
/// The deadline of a batch call. Each caller bounds its own wait (what is
/// left of its write's deadline) and stops waiting on its own.
const CALL_DEADLINE: Duration = super::FORWARD_TIMEOUT;
/// How long a leader that predates `ProposeBatch` gets single calls before
/// a batch is tried again.
const SINGLE_FOR: Duration = Duration::from_secs(60);

/// One proposal of a `ProposeBatch` as the leader answers it: the reply a
/// single `Propose` would have had, or the refusal of the caller's rights for
/// this proposal's command (a gRPC code and message, as a single call would
/// have failed with).
pub type BatchItemReply = Result<ProposeReply, (i32, String)>;

/// A `ProposeBatch` request: proposals of one caller, in order.
#[derive(Serialize, Deserialize, Debug)]
pub struct ProposeBatchRequest {
    pub proposals: Vec<Proposal>,
}

/// A forward on the peer link (raft/link.rs, `KIND_FORWARD`): a
/// `ProposeBatch` with what its gRPC call carries as metadata. (No `Debug`:
/// it holds a token.)
#[derive(Serialize, Deserialize)]
pub struct LinkForward<'a> {
    /// The caller's `authorization` value (`Bearer <token>`), checked by the
    /// leader as a gRPC forward's; `None` for the forwarding node's own
    /// writes and on a cluster without tokens.
    pub token: Option<Cow<'a, str>>,
    /// What the forwarding node asserts for a caller without a token
    /// (`Caller::claim`: a client certificate's identity), believed only on
    /// a link with mutual TLS.
    pub claim: Option<Cow<'a, str>>,
    /// The W3C `traceparent` of the forward's span, if traced.
    pub traceparent: Option<Cow<'a, str>>,
    pub proposals: Cow<'a, [Proposal]>,
}

/// The leader's answer to a [`LinkForward`]: one reply per proposal, in
/// order, or the refusal of the whole call (a gRPC code and message, as a
/// `ProposeBatch` would have failed: an unknown token, too many proposals).
pub type LinkForwardReply = Result<Vec<BatchItemReply>, (i32, String)>;

type Reply = oneshot::Sender<Result<ProposeReply, RpcFailure>>;
/// A leader address that gets single calls, and since when.
type SingleOnly = (Arc<str>, tokio::time::Instant);

struct Item {
    addr: Arc<str>,
    caller: Option<Caller>,
    proposal: Proposal,
    span: tracing::Span,
    reply: Reply,
}

#[derive(Clone)]
struct Sender {
    channels: PeerChannels,
    cluster_id: Arc<str>,
    me: NodeId,
    metrics: Arc<NodeMetrics>,
    /// Leader addresses that answered `ProposeBatch` with "unimplemented",
    /// and when: they get single calls for [`SINGLE_FOR`] (a leader may be
    /// upgraded in place).
    single_only: Arc<Mutex<Vec<SingleOnly>>>,
}

pub struct Forwarder {
    tx: mpsc::Sender<Item>,
    sender: Sender,
    /// Forward calls in flight (direct or batched).
    busy: Arc<AtomicUsize>,
}

/// Counts a call in flight for as long as it lives (also when the waiting
/// caller gives up and drops it).
struct Busy(Arc<AtomicUsize>);

impl Busy {
    fn enter(n: &Arc<AtomicUsize>) -> Self {
        n.fetch_add(1, Ordering::AcqRel);
        Self(n.clone())
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Forwarder {
    pub fn start(
        channels: PeerChannels,
        cluster_id: Arc<str>,
        me: NodeId,
        metrics: Arc<NodeMetrics>,
    ) -> Self {
        let (tx, rx) = mpsc::channel(QUEUE);
        let sender = Sender { channels, cluster_id, me, metrics, single_only: Arc::default() };
        let busy = Arc::new(AtomicUsize::new(0));
        tokio::spawn(run(sender.clone(), rx, busy.clone()));
        Self { tx, sender, busy }
    }

    /// Forwards `proposal` for `caller` to the leader at `addr`; resolves
    /// with the leader's reply, or why there was none (as a single call's
    /// [`RpcFailure`]). The caller bounds the wait.
    ///
    /// With no forward in flight the call goes out at once from the
    /// caller's own task (a lone writer pays no hand-off to the forwarder);
    /// while others are in flight it queues for the next batch.
    pub async fn forward(
        &self,
        addr: &str,
        proposal: &Proposal,
        caller: Option<&Caller>,
    ) -> Result<ProposeReply, RpcFailure> {
        if self.busy.load(Ordering::Acquire) == 0 {
            let _busy = Busy::enter(&self.busy);
            return self.sender.call_one(addr, proposal, caller, &tracing::Span::current()).await;
        }
        let (reply, rx) = oneshot::channel();
        let item = Item {
            addr: Arc::from(addr),
            caller: caller.cloned(),
            proposal: proposal.clone(),
            span: tracing::Span::current(),
            reply,
        };
        let closed = || RpcFailure::Refused { addr: addr.to_string() };
        self.tx.send(item).await.map_err(|_| closed())?;
        // Every item taken is answered; dropped unanswered only if the
        // forwarder stopped (the node is shutting down) before sending it.
        rx.await.map_err(|_| closed())?
    }
}

async fn run(sender: Sender, mut rx: mpsc::Receiver<Item>, busy: Arc<AtomicUsize>) {
    let in_flight = Arc::new(Semaphore::new(MAX_IN_FLIGHT));
    loop {
        let Ok(permit) = in_flight.clone().acquire_owned().await else { return };
        let Some(first) = rx.recv().await else { return };
        let busy = Busy::enter(&busy);
        let mut items = vec![first];
        while items.len() < MAX_FORWARD_BATCH {
            match rx.try_recv() {
                Ok(item) => items.push(item),
                Err(_) => break,
            }
        }
        let sender = sender.clone();
        tokio::spawn(async move {
            let sends = groups(items).into_iter().map(|g| sender.send(g));
            hold_turn(futures::future::join_all(sends), permit, ROUND_HOLD).await;
            drop(busy);
        });
    }
}

/// Runs `round`, holding `turn` until it ends or for `hold`, whichever
/// comes first (then the next round may start while this one finishes).
async fn hold_turn<F: std::future::Future>(
    round: F,
    turn: tokio::sync::OwnedSemaphorePermit,
    hold: Duration,
) -> F::Output {
    tokio::pin!(round);
    match tokio::time::timeout(hold, round.as_mut()).await {
        Ok(out) => out,
        Err(_) => {
            drop(turn);
            round.await
        }
    }
}

/// Splits `items` into groups with one leader address and one caller, in
/// arrival order within each.
fn groups(items: Vec<Item>) -> Vec<Vec<Item>> {
    let mut out: Vec<Vec<Item>> = Vec::new();
    for item in items {
        match out.iter_mut().find(|g| g[0].addr == item.addr && same_caller(&g[0].caller, &item.caller)) {
            Some(g) => g.push(item),
            None => out.push(vec![item]),
        }
    }
    out
}

/// Whether two forwards carry the same caller to the leader (and so may
/// share one call's metadata).
fn same_caller(a: &Option<Caller>, b: &Option<Caller>) -> bool {
    match (a, b) {
        (None, None) => true,
        (Some(Caller::Token { token: x, .. }), Some(Caller::Token { token: y, .. })) => x == y,
        (Some(Caller::Cert { role: r1, name: n1 }), Some(Caller::Cert { role: r2, name: n2 })) => {
            r1 == r2 && n1 == n2
        }
        (Some(Caller::Node(x)), Some(Caller::Node(y))) => x == y,
        _ => false,
    }
}

impl Sender {
    async fn send(&self, group: Vec<Item>) {
        let batch = group.len() > 1 && !self.single_only(&group[0].addr);
        if batch {
            self.metrics.forward_batch_proposals.record(group.len() as u64);
        }
        if !batch {
            futures::future::join_all(group.into_iter().map(|item| self.send_one(item))).await;
            return;
        }
        let addr = group[0].addr.clone();
        // A child of the first forward's span, linked to the others'; the
        // leader's handler continues it.
        let span = tracing::debug_span!(
            parent: &group[0].span,
            "forward_batch",
            otel.name = "raft.forward_batch",
            otel.kind = "client",
            batch.size = group.len(),
        );
        for item in &group[1..] {
            span.follows_from(&item.span);
        }
        let traceparent = crate::trace::traceparent(&span);
        let caller = group[0].caller.clone();
        let (replies, proposals): (Vec<Reply>, Vec<Proposal>) =
            group.into_iter().map(|i| (i.reply, i.proposal)).unzip();
        let request = ProposeBatchRequest { proposals };
        let on_link = self
            .on_link(&addr, caller.as_ref(), &request.proposals, traceparent.as_deref())
            .instrument(span.clone())
            .await;
        let outcome: Result<Vec<BatchItemReply>, RpcFailure> = match on_link {
            Some(outcome) => outcome,
            None => {
                self.channels
                    .call_traced(
                        &addr,
                        RaftRpc::ProposeBatch,
                        &self.cluster_id,
                        self.me,
                        &request,
                        CALL_DEADLINE,
                        traceparent,
                        caller.as_ref(),
                    )
                    .instrument(span)
                    .await
            }
        };
        match outcome {
            Ok(answers) if answers.len() == replies.len() => {
                for (reply, answer) in replies.into_iter().zip(answers) {
                    let _ = reply.send(item_reply(&addr, answer));
                }
            }
            Ok(answers) => {
                let e = RpcFailure::BadReply {
                    addr: addr.to_string(),
                    reason: format!("{} replies to a batch of {}", answers.len(), replies.len()),
                };
                for reply in replies {
                    let _ = reply.send(Err(e.clone()));
                }
            }
            Err(e @ (RpcFailure::Unsupported { .. } | RpcFailure::TooLarge { .. })) => {
                // Never sent, or not understood: nothing was handed to Raft.
                // One by one, then (each fits a message, or says so itself).
                if matches!(e, RpcFailure::Unsupported { .. }) {
                    tracing::info!(leader = %addr, "the leader predates batched forwards; forwarding one by one");
                    self.single_only.lock().push((addr.clone(), tokio::time::Instant::now()));
                }
                let singles = request.proposals.into_iter().zip(replies).map(|(proposal, reply)| {
                    let item = Item {
                        addr: addr.clone(),
                        caller: caller.clone(),
                        proposal,
                        span: tracing::Span::current(),
                        reply,
                    };
                    self.send_one(item)
                });
                futures::future::join_all(singles).await;
            }
            Err(e) => {
                for reply in replies {
                    let _ = reply.send(Err(e.clone()));
                }
            }
        }
    }

    fn single_only(&self, addr: &Arc<str>) -> bool {
        let mut list = self.single_only.lock();
        list.retain(|(_, since)| since.elapsed() < SINGLE_FOR);
        list.iter().any(|(a, _)| a == addr)
    }

    async fn send_one(&self, item: Item) {
        let reply = self.call_one(&item.addr, &item.proposal, item.caller.as_ref(), &item.span).await;
        let _ = item.reply.send(reply);
    }

    /// One proposal in a `Propose` call of its own.
    async fn call_one(
        &self,
        addr: &str,
        proposal: &Proposal,
        caller: Option<&Caller>,
        parent: &tracing::Span,
    ) -> Result<ProposeReply, RpcFailure> {
        let span = tracing::debug_span!(
            parent: parent,
            "forward",
            otel.name = "raft.forward",
            otel.kind = "client",
            otel.status_code = tracing::field::Empty,
        );
        let traceparent = crate::trace::traceparent(&span);
        self.metrics.forward_batch_proposals.record(1);
        let on_link = self
            .on_link(addr, caller, std::slice::from_ref(proposal), traceparent.as_deref())
            .instrument(span.clone())
            .await;
        let reply: Result<ProposeReply, RpcFailure> = match on_link {
            Some(Ok(mut answers)) if answers.len() == 1 => item_reply(addr, answers.remove(0)),
            Some(Ok(answers)) => Err(RpcFailure::BadReply {
                addr: addr.to_string(),
                reason: format!("{} replies to one forwarded write", answers.len()),
            }),
            Some(Err(e)) => Err(e),
            None => {
                self.channels
                    .call_traced(
                        addr,
                        RaftRpc::Propose,
                        &self.cluster_id,
                        self.me,
                        proposal,
                        CALL_DEADLINE,
                        traceparent,
                        caller,
                    )
                    .instrument(span.clone())
                    .await
            }
        };
        span.record("otel.status_code", if matches!(reply, Ok(Ok(_))) { "OK" } else { "ERROR" });
        reply
    }
}

impl Sender {
    /// Forwards `proposals` of `caller` on the leader's peer link, if it has
    /// one up and the caller can go on it: the leader's answers, or its
    /// refusal of the caller. `None`: send them over gRPC instead (no link,
    /// or the link failed; a proposal that did reach the leader is applied
    /// once however often it is sent, by its request id).
    async fn on_link(
        &self,
        addr: &str,
        caller: Option<&Caller>,
        proposals: &[Proposal],
        traceparent: Option<&str>,
    ) -> Option<Result<Vec<BatchItemReply>, RpcFailure>> {
        let link = self.channels.link(addr);
        let (token, claim) = match caller {
            None => (None, None),
            Some(Caller::Token { token, .. }) => (Some(token.to_str().ok()?), None),
            // A claim is believed only from a node certificate: on a link
            // without TLS it would be refused, so it goes over gRPC.
            Some(c) if link.dialer().authenticated() => (None, c.claim()),
            Some(_) => return None,
        };
        let announced = self.channels.link_port(addr);
        let hello =
            || Hello { format: format::CURRENT, cluster_id: self.cluster_id.to_string(), from: self.me };
        let request = LinkForward {
            token: token.map(Cow::Borrowed),
            claim: claim.map(Cow::Owned),
            traceparent: traceparent.map(Cow::Borrowed),
            proposals: Cow::Borrowed(proposals),
        };
        let out: Result<LinkForwardReply, LinkError> =
            link.call(addr, announced, hello, KIND_FORWARD, &request).await?;
        match out {
            Ok(Ok(answers)) => Some(Ok(answers)),
            Ok(Err((code, reason))) => Some(Err(match tonic::Code::from_i32(code) {
                code @ (tonic::Code::Unauthenticated | tonic::Code::PermissionDenied) => {
                    RpcFailure::Denied { addr: addr.to_string(), code, reason }
                }
                _ => RpcFailure::BadReply { addr: addr.to_string(), reason },
            })),
            Err(e) => {
                tracing::debug!(leader = %addr, error = %e, "a forward failed on the peer link; sending it over gRPC");
                None
            }
        }
    }
}

/// One proposal's answer in a batch's reply, as a single forward's.
fn item_reply(addr: &str, answer: BatchItemReply) -> Result<ProposeReply, RpcFailure> {
    answer.map_err(|(code, reason)| RpcFailure::Denied {
        addr: addr.to_string(),
        code: tonic::Code::from_i32(code),
        reason,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::Role;
    use crate::command::Command;

    fn item(addr: &str, caller: Option<Caller>, seq: u64) -> Item {
        let proposal =
            Proposal { at_ms: seq, request: None, command: Command::DeleteVm { name: format!("v{seq}") } };
        Item {
            addr: Arc::from(addr),
            caller,
            proposal,
            span: tracing::Span::none(),
            reply: oneshot::channel().0,
        }
    }

    #[tokio::test]
    async fn a_round_that_hangs_gives_up_the_turn() {
        let turns = Arc::new(Semaphore::new(1));
        // A quick round keeps the turn to its end.
        let turn = turns.clone().acquire_owned().await.unwrap();
        let quick = hold_turn(async { 7 }, turn, Duration::from_secs(60)).await;
        assert_eq!(quick, 7);
        // A round that never ends (a leader that stopped answering) lets the
        // next one start after the hold.
        let turn = turns.clone().acquire_owned().await.unwrap();
        let hung = tokio::spawn(hold_turn(std::future::pending::<()>(), turn, Duration::from_millis(50)));
        assert!(turns.try_acquire().is_err(), "the hung round holds the turn at first");
        let next = tokio::time::timeout(Duration::from_secs(10), turns.acquire()).await;
        assert!(next.is_ok(), "the next round never got the turn");
        assert!(!hung.is_finished());
        hung.abort();
    }

    #[test]
    fn a_batch_holds_one_leader_and_one_caller_in_arrival_order() {
        let token = |t: &str| Caller::Token { role: Role::Operator, token: t.parse().unwrap() };
        let cert = |n: &str| Caller::Cert { role: Role::Viewer, name: n.into() };
        let items = vec![
            item("a", Some(token("Bearer x")), 1),
            item("a", Some(token("Bearer y")), 2),
            item("a", None, 3),
            item("a", Some(token("Bearer x")), 4),
            item("b", Some(token("Bearer x")), 5),
            item("a", Some(cert("ci")), 6),
            item("a", Some(cert("ci")), 7),
            item("a", Some(Caller::Node(2)), 8),
            item("a", None, 9),
            item("a", Some(Caller::Node(3)), 10),
        ];
        let got: Vec<Vec<u64>> =
            groups(items).iter().map(|g| g.iter().map(|i| i.proposal.at_ms).collect()).collect();
        assert_eq!(got, vec![vec![1, 4], vec![2], vec![3, 9], vec![5], vec![6, 7], vec![8], vec![10]]);
    }
}
