//! The internal RaftService: node-to-node Raft RPCs and request forwarding.
//!
//! Every request carries the sender's cluster id; a mismatch is refused with
//! `PermissionDenied` before anything is decoded. Payloads are decoded with
//! a size limit; a corrupt payload is `InvalidArgument`, never a panic. A
//! message in a format version newer than this node reads is
//! `FailedPrecondition`, naming both versions.
//!
//! On a node with TLS only other nodes of the cluster may call it: the
//! caller must present a node certificate of the cluster's CA (verified in
//! the handshake) naming the node the request says it is from. Anything
//! else (no certificate, a client certificate, another node's) is
//! `PermissionDenied` before anything is decoded.
use std::sync::Arc;

use blixard_proto::raft_service_server::RaftService;
use blixard_proto::{RaftReply, RaftRequest};
use openraft::raft::{AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, VoteRequest};
use serde::de::DeserializeOwned;
use serde::Serialize;
use tonic::{Request, Response, Status};
use tracing::Instrument;

use super::batcher::SubmitError;
use super::election::{self, PreVoteRequest};
use super::forwarder::{BatchItemReply, ProposeBatchRequest, MAX_FORWARD_BATCH};
use super::liveness::{self, HeartbeatRequest, HeartbeatResult, LivenessReply};
use super::{disks, ForwardError, NodeShared, ProposeReply, ReadIndexReply};
use crate::auth::Caller;
use crate::codec;
use crate::command::Proposal;
use crate::format;
use crate::raft::TypeConfig;
use crate::tls::PeerIdentity;
use crate::types::NodeId;

pub struct RaftGrpc {
    node: Arc<NodeShared>,
}

impl RaftGrpc {
    pub fn new(node: Arc<NodeShared>) -> Self {
        Self { node }
    }

    fn open<T: DeserializeOwned>(&self, req: Request<RaftRequest>) -> Result<T, Status> {
        if self.node.tls {
            check_peer(self.node.id, &req)?;
        }
        let req = req.into_inner();
        if req.cluster_id != *self.node.cluster_id {
            return Err(Status::permission_denied(format!(
                "node {} belongs to cluster {}, request from node {} is for cluster {:?}",
                self.node.id, self.node.cluster_id, req.from, req.cluster_id
            )));
        }
        let what = format!("a Raft message from node {}", req.from);
        format::check(&what, format::wire(req.format))
            .map_err(|e| Status::failed_precondition(e.to_string()))?;
        codec::decode(&req.payload).map_err(|e| Status::invalid_argument(format!("bad payload: {e}")))
    }
}

/// On a node with TLS: the caller's certificate must be the node
/// certificate of the node the request is from.
fn check_peer(me: NodeId, req: &Request<RaftRequest>) -> Result<(), Status> {
    let from = req.get_ref().from;
    let denied = |who: String| {
        Status::permission_denied(format!(
            "node {me} takes Raft messages only from nodes of its cluster (a node certificate of the cluster's CA); {who}"
        ))
    };
    match crate::tls::peer_identity(req) {
        Some(PeerIdentity::Node(id)) if id == from => Ok(()),
        Some(PeerIdentity::Node(id)) => Err(denied(format!(
            "the caller's certificate is node {id}'s, but the request claims node {from}"
        ))),
        Some(client @ PeerIdentity::Client { .. }) => {
            Err(denied(format!("the caller presented the certificate of {client}")))
        }
        None => Err(denied("the caller presented no node certificate".into())),
    }
}

/// Hands a forwarded proposal to this node's batcher (as if proposed here)
/// and says what became of it. One of several forwarded together
/// (`alone` false) always queues, so they stay one entry.
async fn submit_forwarded(node: &NodeShared, p: Proposal, alone: bool) -> ProposeReply {
    let submitted = if alone { node.batcher.submit(p).await } else { node.batcher.submit_queued(p).await };
    submitted.map_err(|e| match e {
        SubmitError::NotLeader(leader) => ForwardError::NotLeader { leader },
        SubmitError::Unknown { why, .. } => ForwardError::Unknown(why.to_string()),
        SubmitError::Closed => ForwardError::Unavailable(format!("node {} is shutting down", node.id)),
    })
}

/// Answers the writes of one caller a follower forwarded (a gRPC
/// `ProposeBatch`, or a forward on the peer link): each proposal's command
/// is checked against the caller's role (`None`: the node's own writes),
/// then joins the leader's batches like a local one. `None` when there are
/// more than a batch may hold (nothing is proposed then).
pub(super) async fn answer_forwards(
    node: &NodeShared,
    caller: Option<&Caller>,
    proposals: Vec<Proposal>,
) -> Result<Vec<BatchItemReply>, Status> {
    if proposals.len() > MAX_FORWARD_BATCH {
        return Err(Status::invalid_argument(format!(
            "a batch of {} forwarded writes; at most {MAX_FORWARD_BATCH}",
            proposals.len()
        )));
    }
    let alone = proposals.len() == 1;
    let answers = proposals.into_iter().map(|p| {
        let allowed = match caller {
            Some(c) => c.require(crate::auth::required(&p.command), "this write"),
            None => Ok(()),
        };
        async move {
            match allowed {
                Ok(()) => Ok(submit_forwarded(node, p, alone).await),
                Err(denied) => Err((denied.code() as i32, denied.message().to_string())),
            }
        }
    });
    Ok(futures::future::join_all(answers).await)
}

impl RaftGrpc {
    /// Every reply announces this node's format version and its peer link
    /// port (raft/link.rs), so a peer learns both from any call.
    fn reply<T: Serialize>(&self, v: &T) -> Result<Response<RaftReply>, Status> {
        let payload = codec::encode(v).map_err(|e| Status::internal(e.to_string()))?;
        Ok(Response::new(RaftReply {
            payload,
            format: u32::from(format::CURRENT),
            link_port: u32::from(self.node.link_port.load(std::sync::atomic::Ordering::Relaxed)),
        }))
    }
}

/// Hands an AppendEntries to openraft, from gRPC or (`link`) the peer link.
pub(super) async fn append_entries(
    node: &NodeShared,
    rpc: AppendEntriesRequest<TypeConfig>,
    link: bool,
) -> Result<AppendEntriesResponse<NodeId>, openraft::error::RaftError<NodeId>> {
    if link {
        node.metrics.append_entries_link.add(1);
    } else {
        node.metrics.append_entries_grpc.add(1);
    }
    let resp = node.raft.append_entries(rpc).await;
    // Anything but "your term is stale" came from a current leader.
    if matches!(&resp, Ok(r) if !matches!(r, AppendEntriesResponse::HigherVote(_))) {
        node.contact.touch();
    }
    resp
}

#[tonic::async_trait]
impl RaftService for RaftGrpc {
    async fn append_entries(&self, request: Request<RaftRequest>) -> Result<Response<RaftReply>, Status> {
        let rpc: AppendEntriesRequest<TypeConfig> = self.open(request)?;
        let resp = append_entries(&self.node, rpc, false).await;
        self.reply(&resp)
    }

    async fn vote(&self, request: Request<RaftRequest>) -> Result<Response<RaftReply>, Status> {
        let rpc: VoteRequest<NodeId> = self.open(request)?;
        let resp = self.node.raft.vote(rpc).await;
        // Campaigning right after voting for a candidate would depose it
        // the moment it wins: a granted vote restarts our own wait.
        if matches!(&resp, Ok(r) if r.vote_granted) {
            self.node.contact.voted();
        }
        self.reply(&resp)
    }

    async fn install_snapshot(&self, request: Request<RaftRequest>) -> Result<Response<RaftReply>, Status> {
        let rpc: InstallSnapshotRequest<TypeConfig> = self.open(request)?;
        let vote = rpc.vote;
        let resp = self.node.raft.install_snapshot(rpc).await;
        if matches!(&resp, Ok(r) if r.vote <= vote) {
            self.node.contact.touch();
        }
        self.reply(&resp)
    }

    async fn pre_vote(&self, request: Request<RaftRequest>) -> Result<Response<RaftReply>, Status> {
        let req: PreVoteRequest = self.open(request)?;
        self.reply(&election::answer(&self.node, &req))
    }

    async fn propose(&self, request: Request<RaftRequest>) -> Result<Response<RaftReply>, Status> {
        // Continues the forwarding follower's trace, if it sent one.
        let span = tracing::debug_span!(
            "propose_handler",
            otel.name = "raft.Propose",
            otel.kind = "server",
            from = request.get_ref().from,
        );
        crate::trace::continue_from(&span, request.metadata());
        // A follower forwards a client's write with the client (auth.rs):
        // its rights are checked here too, against this node's state.
        let caller = crate::auth::forwarded_caller(&self.node.state, &request, super::now_ms())?;
        let p: Proposal = self.open(request)?;
        if let Some(c) = &caller {
            c.require(crate::auth::required(&p.command), "this write")?;
        }
        // Forwarded writes join the leader's batches like local ones.
        self.node.metrics.forwards_grpc.add(1);
        let out = submit_forwarded(&self.node, p, true).instrument(span).await;
        self.reply(&out)
    }

    async fn propose_batch(&self, request: Request<RaftRequest>) -> Result<Response<RaftReply>, Status> {
        let span = tracing::debug_span!(
            "propose_batch_handler",
            otel.name = "raft.ProposeBatch",
            otel.kind = "server",
            from = request.get_ref().from,
            batch.size = tracing::field::Empty,
        );
        crate::trace::continue_from(&span, request.metadata());
        // One caller for the whole batch, checked as for a single forward;
        // its rights are then checked for each proposal's command.
        let caller = crate::auth::forwarded_caller(&self.node.state, &request, super::now_ms())?;
        let batch: ProposeBatchRequest = self.open(request)?;
        span.record("batch.size", batch.proposals.len());
        self.node.metrics.forwards_grpc.add(1);
        let out = answer_forwards(&self.node, caller.as_ref(), batch.proposals).instrument(span).await?;
        self.reply(&out)
    }

    async fn read_index(&self, request: Request<RaftRequest>) -> Result<Response<RaftReply>, Status> {
        let () = self.open(request)?;
        let out: ReadIndexReply = self.node.confirm_leadership().await;
        self.reply(&out)
    }

    async fn heartbeat(&self, request: Request<RaftRequest>) -> Result<Response<RaftReply>, Status> {
        let req: HeartbeatRequest = self.open(request)?;
        let out: HeartbeatResult = liveness::answer(&self.node, req.node).await;
        self.reply(&out)
    }

    async fn liveness(&self, request: Request<RaftRequest>) -> Result<Response<RaftReply>, Status> {
        let () = self.open(request)?;
        let out: LivenessReply = liveness::ages(&self.node);
        self.reply(&out)
    }

    type FetchDiskStream =
        std::pin::Pin<Box<dyn futures::Stream<Item = Result<RaftReply, Status>> + Send + 'static>>;

    async fn fetch_disk(
        &self,
        request: Request<RaftRequest>,
    ) -> Result<Response<Self::FetchDiskStream>, Status> {
        let req: disks::FetchDisk = self.open(request)?;
        crate::validate::vm_name(&req.name).map_err(|e| Status::invalid_argument(e.to_string()))?;
        let path = disks::handoff_path(&self.node.data_dir, &req.name, req.placement_gen);
        if !path.is_file() {
            return Err(Status::not_found(format!(
                "node {} keeps no disk of VM {:?} for placement generation {}",
                self.node.id, req.name, req.placement_gen
            )));
        }
        tracing::info!(vm = %req.name, file = %path.display(), "sending a kept disk");
        let (tx, rx) = tokio::sync::mpsc::channel::<Result<RaftReply, Status>>(4);
        // File reads off the async threads (a plain task under madsim,
        // where no node keeps disks: the sim backend has none).
        tokio::spawn(crate::raft::blocking(move || {
            let sent = disks::read_pieces(&path, |piece| match codec::encode(&piece) {
                Ok(payload) => tx
                    .blocking_send(Ok(RaftReply {
                        payload,
                        format: u32::from(format::CURRENT),
                        link_port: 0,
                    }))
                    .is_ok(),
                Err(_) => false,
            });
            if let Err(e) = sent {
                let _ =
                    tx.blocking_send(Err(Status::unavailable(format!("reading {}: {e}", path.display()))));
            }
        }));
        Ok(Response::new(Box::pin(futures::stream::unfold(rx, |mut rx| async move {
            rx.recv().await.map(|m| (m, rx))
        }))))
    }
}
