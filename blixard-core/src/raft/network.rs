//! Raft RPCs over gRPC.
//!
//! One lazily connected tonic `Channel` per peer address, shared by every
//! task that talks to that peer (replication, votes, forwarding): HTTP/2
//! multiplexes them over one connection. Every call has a deadline, and both
//! directions cap message sizes. Payloads are bincode of openraft's own
//! request/response types, wrapped with the cluster id so a node never
//! accepts traffic meant for another cluster. A node with TLS dials its
//! peers over `https://` with mutual TLS: it verifies them against the
//! cluster's CA and presents its own node certificate.
use std::sync::Arc;
use std::time::Duration;

use blixard_proto::raft_service_client::RaftServiceClient;
use blixard_proto::{RaftReply, RaftRequest};
use dashmap::DashMap;
use openraft::error::{
    InstallSnapshotError, NetworkError, PayloadTooLarge, RPCError, RaftError, RemoteError, Unreachable,
};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};
use openraft::BasicNode;
use serde::de::DeserializeOwned;
use serde::Serialize;
use tonic::transport::{Channel, Endpoint};

use super::link::{self, Dialer, Hello, Link};
use super::log_store::EarlyAcks;
use super::progress::Progress;
use super::TypeConfig;
use crate::codec;
use crate::format;
use crate::tls::NodeTls;
use crate::types::NodeId;

/// Largest gRPC message a node sends or accepts: a snapshot chunk, or a
/// batch of entries, with room to spare.
pub const MAX_MESSAGE_BYTES: usize = 16 * 1024 * 1024;
const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
/// HTTP/2 pings on every peer connection, also while idle: a connection
/// whose peer vanished (paused, cut off by a partition) is declared dead
/// after `KEEPALIVE + KEEPALIVE_TIMEOUT` and the next call dials afresh,
/// instead of waiting out TCP's retransmission backoff (tens of seconds
/// after a long partition).
const KEEPALIVE: Duration = Duration::from_secs(1);
const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(1);
/// Pause before openraft retries a peer that was unreachable (its default
/// is 500 ms): a restarted follower is caught up a little sooner.
const UNREACHABLE_BACKOFF: Duration = Duration::from_millis(200);

/// The internal RPCs a node can make to a peer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RaftRpc {
    AppendEntries,
    Vote,
    InstallSnapshot,
    Propose,
    /// Several client writes of one caller, forwarded in one call
    /// (node/forwarder.rs).
    ProposeBatch,
    ReadIndex,
    PreVote,
    Heartbeat,
    Liveness,
}

/// Why an internal RPC produced no decoded reply.
#[derive(Debug, Clone, thiserror::Error)]
pub enum RpcFailure {
    #[error("invalid peer address {addr:?}: {reason}")]
    BadAddress { addr: String, reason: String },
    #[error("peer {addr} unreachable: {reason}")]
    Unreachable { addr: String, reason: String },
    /// The peer refused the connection: the request was never sent.
    #[error("peer {addr} refused the connection")]
    Refused { addr: String },
    #[error("peer {addr} did not answer within {after:?}")]
    Timeout { addr: String, after: Duration },
    #[error("peer {addr} sent a bad reply: {reason}")]
    BadReply { addr: String, reason: String },
    #[error("request of {bytes} bytes exceeds the {MAX_MESSAGE_BYTES}-byte message limit")]
    TooLarge { bytes: usize },
    /// The peer refused the request for who sent it or for whom (a
    /// forwarded caller's token is unknown there, or its role may not do
    /// this): definite, nothing was applied.
    #[error("{reason}")]
    Denied { addr: String, code: tonic::Code, reason: String },
    /// The peer does not know this call (it predates it): nothing was done.
    #[error("peer {addr} does not implement {rpc:?}")]
    Unsupported { addr: String, rpc: RaftRpc },
}

/// Channels to peers, one per address, created on first use and reused.
#[derive(Clone, Default)]
pub struct PeerChannels {
    channels: Arc<DashMap<String, Channel>>,
    /// The node's TLS: peers are dialled with mutual TLS; `None` dials
    /// plaintext. (Ignored under madsim, whose transport has no TLS.)
    tls: Option<Arc<NodeTls>>,
    /// The format version each peer last replied in (see
    /// [`PeerClient::install_snapshot`]).
    formats: Arc<DashMap<String, u16>>,
    /// The peer link port each peer last announced (raft/link.rs); a peer
    /// without one is absent.
    links: Arc<DashMap<String, u16>>,
    /// This node's link connections to each peer (raft/link.rs), shared
    /// by replication and forwarding.
    link_conns: Arc<DashMap<String, Arc<Link>>>,
    /// How those links dial: with mutual TLS when the node has TLS.
    dialer: Dialer,
}

impl PeerChannels {
    /// Channels that dial with `tls` (mutual TLS), or plaintext without.
    pub fn new(tls: Option<NodeTls>) -> Self {
        let dialer = match &tls {
            None => Dialer::Plain,
            #[cfg(not(madsim))]
            Some(t) => match t.link_client_config() {
                Ok(config) => Dialer::Tls(tokio_rustls::TlsConnector::from(config)),
                Err(e) => {
                    tracing::error!(error = %e, "cannot dial peer links with TLS: everything goes over gRPC");
                    Dialer::Off
                }
            },
            // The simulated transport has no TLS.
            #[cfg(madsim)]
            Some(_) => Dialer::Plain,
        };
        Self { tls: tls.map(Arc::new), dialer, ..Self::default() }
    }

    /// Whether peers are dialled with TLS.
    pub fn tls(&self) -> bool {
        self.tls.is_some()
    }

    /// The format version `addr` last answered in, if it ever answered.
    pub fn peer_format(&self, addr: &str) -> Option<u16> {
        self.formats.get(addr).map(|f| *f)
    }

    /// The peer link port `addr` last announced, if it has one.
    pub fn link_port(&self, addr: &str) -> Option<u16> {
        self.links.get(addr).map(|p| *p)
    }

    /// This node's link connections to the peer at `addr` (its gRPC
    /// address).
    pub fn link(&self, addr: &str) -> Arc<Link> {
        if let Some(l) = self.link_conns.get(addr) {
            return l.clone();
        }
        self.link_conns
            .entry(addr.to_string())
            .or_insert_with(|| Arc::new(Link::new(self.dialer.clone())))
            .clone()
    }

    fn note_link_port(&self, addr: &str, port: u32) {
        match u16::try_from(port).ok().filter(|p| *p != 0) {
            Some(p) if self.link_port(addr) != Some(p) => {
                self.links.insert(addr.to_string(), p);
            }
            Some(_) => {}
            None if self.links.contains_key(addr) => {
                self.links.remove(addr);
            }
            None => {}
        }
    }

    pub fn channel(&self, addr: &str) -> Result<Channel, RpcFailure> {
        if let Some(c) = self.channels.get(addr) {
            return Ok(c.clone());
        }
        let bad = |e: &dyn std::fmt::Display| RpcFailure::BadAddress {
            addr: addr.to_string(),
            reason: e.to_string(),
        };
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        let endpoint = Endpoint::from_shared(format!("{scheme}://{addr}")).map_err(|e| bad(&e))?;
        // The handshake shares the dial's deadline (tonic's connect timeout
        // covers TCP and TLS).
        #[cfg(not(madsim))]
        let endpoint = match &self.tls {
            Some(tls) => endpoint
                .tls_config(tls.client_config(CONNECT_TIMEOUT))
                .map_err(|e| bad(&format!("TLS: {}", crate::tls::error_chain(&e))))?,
            None => endpoint,
        };
        let endpoint = endpoint
            .connect_timeout(CONNECT_TIMEOUT)
            .tcp_nodelay(true)
            .http2_keep_alive_interval(KEEPALIVE)
            .keep_alive_timeout(KEEPALIVE_TIMEOUT)
            .keep_alive_while_idle(true);
        let channel = endpoint.connect_lazy();
        self.channels.insert(addr.to_string(), channel.clone());
        Ok(channel)
    }

    /// Opens the `FetchDisk` stream of the node at `addr` (node/disks.rs);
    /// its replies carry bincode `DiskPiece`s. No deadline on the stream
    /// as a whole: the caller bounds each piece.
    pub async fn fetch_disk(
        &self,
        addr: &str,
        cluster_id: &str,
        from: NodeId,
        req: &crate::node::disks::FetchDisk,
        open_deadline: Duration,
    ) -> Result<tonic::Streaming<RaftReply>, RpcFailure> {
        let payload = codec::encode(req)
            .map_err(|e| RpcFailure::BadReply { addr: addr.to_string(), reason: e.to_string() })?;
        let request = tonic::Request::new(RaftRequest {
            cluster_id: cluster_id.to_string(),
            from,
            payload,
            format: u32::from(format::CURRENT),
        });
        let mut client = RaftServiceClient::new(self.channel(addr)?)
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES);
        match tokio::time::timeout(open_deadline, client.fetch_disk(request)).await {
            Err(_) => Err(RpcFailure::Timeout { addr: addr.to_string(), after: open_deadline }),
            Ok(Err(status)) if connection_refused(&status) => {
                Err(RpcFailure::Refused { addr: addr.to_string() })
            }
            Ok(Err(status)) => {
                Err(RpcFailure::BadReply { addr: addr.to_string(), reason: status.message().to_string() })
            }
            Ok(Ok(r)) => Ok(r.into_inner()),
        }
    }

    /// Sends one internal RPC and decodes the reply as `Resp`.
    pub async fn call<Req: Serialize, Resp: DeserializeOwned>(
        &self,
        addr: &str,
        rpc: RaftRpc,
        cluster_id: &str,
        from: NodeId,
        req: &Req,
        deadline: Duration,
    ) -> Result<Resp, RpcFailure> {
        self.call_traced(addr, rpc, cluster_id, from, req, deadline, None, None).await
    }

    /// [`call`](Self::call) carrying a W3C `traceparent` in the request's
    /// metadata, so the peer continues the caller's trace, and the client
    /// a forwarded write is for (auth.rs), so the peer checks its rights.
    #[allow(clippy::too_many_arguments)]
    pub async fn call_traced<Req: Serialize, Resp: DeserializeOwned>(
        &self,
        addr: &str,
        rpc: RaftRpc,
        cluster_id: &str,
        from: NodeId,
        req: &Req,
        deadline: Duration,
        traceparent: Option<String>,
        caller: Option<&crate::auth::Caller>,
    ) -> Result<Resp, RpcFailure> {
        let payload = codec::encode(req)
            .map_err(|e| RpcFailure::BadReply { addr: addr.to_string(), reason: e.to_string() })?;
        // Leave room for the envelope; the peer would refuse the message anyway.
        if payload.len() > MAX_MESSAGE_BYTES - 4096 {
            return Err(RpcFailure::TooLarge { bytes: payload.len() });
        }
        let mut request = tonic::Request::new(RaftRequest {
            cluster_id: cluster_id.to_string(),
            from,
            payload,
            format: u32::from(format::CURRENT),
        });
        if let Some(tp) = traceparent.and_then(|tp| tonic::metadata::MetadataValue::try_from(tp).ok()) {
            request.metadata_mut().insert(crate::trace::TRACEPARENT, tp);
        }
        if let Some(c) = caller {
            c.forward_on(request.metadata_mut());
        }
        let mut client = RaftServiceClient::new(self.channel(addr)?)
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES);
        let fut = async move {
            match rpc {
                RaftRpc::AppendEntries => client.append_entries(request).await,
                RaftRpc::Vote => client.vote(request).await,
                RaftRpc::InstallSnapshot => client.install_snapshot(request).await,
                RaftRpc::Propose => client.propose(request).await,
                RaftRpc::ProposeBatch => client.propose_batch(request).await,
                RaftRpc::ReadIndex => client.read_index(request).await,
                RaftRpc::PreVote => client.pre_vote(request).await,
                RaftRpc::Heartbeat => client.heartbeat(request).await,
                RaftRpc::Liveness => client.liveness(request).await,
            }
        };
        let reply: RaftReply = match tokio::time::timeout(deadline, fut).await {
            Err(_) => return Err(RpcFailure::Timeout { addr: addr.to_string(), after: deadline }),
            Ok(Err(status)) => {
                // A rejection by the peer itself (wrong cluster, bad payload)
                // is not a connectivity problem: report it as a bad reply.
                let reason = status.message().to_string();
                return Err(match status.code() {
                    code @ (tonic::Code::Unauthenticated | tonic::Code::PermissionDenied)
                        if matches!(rpc, RaftRpc::Propose | RaftRpc::ProposeBatch) =>
                    {
                        RpcFailure::Denied { addr: addr.to_string(), code, reason }
                    }
                    tonic::Code::Unimplemented => RpcFailure::Unsupported { addr: addr.to_string(), rpc },
                    tonic::Code::InvalidArgument
                    | tonic::Code::PermissionDenied
                    | tonic::Code::FailedPrecondition => {
                        RpcFailure::BadReply { addr: addr.to_string(), reason }
                    }
                    _ if connection_refused(&status) => RpcFailure::Refused { addr: addr.to_string() },
                    _ => RpcFailure::Unreachable { addr: addr.to_string(), reason: status_reason(&status) },
                });
            }
            Ok(Ok(r)) => r.into_inner(),
        };
        let what = format!("the reply of {addr}");
        let version = format::check(&what, format::wire(reply.format))
            .map_err(|e| RpcFailure::BadReply { addr: addr.to_string(), reason: e.to_string() })?;
        if self.peer_format(addr) != Some(version) {
            self.formats.insert(addr.to_string(), version);
        }
        self.note_link_port(addr, reply.link_port);
        codec::decode(&reply.payload)
            .map_err(|e| RpcFailure::BadReply { addr: addr.to_string(), reason: e.to_string() })
    }
}

/// True when the call failed because the peer refused the TCP connection,
/// so nothing was sent. Only that: a timeout or a reset may come after the
/// request left.
fn connection_refused(status: &tonic::Status) -> bool {
    let mut cur = std::error::Error::source(status);
    while let Some(e) = cur {
        if e.downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::ConnectionRefused)
        {
            return true;
        }
        cur = e.source();
    }
    false
}

/// One line for a failed call: the status message, or the code when the
/// message is empty (never tonic's `Debug` of the metadata).
fn status_reason(status: &tonic::Status) -> String {
    let mut reason = if status.message().is_empty() {
        status.code().description().to_string()
    } else {
        status.message().to_string()
    };
    // A transport error's cause ("Connection refused") sits in its source.
    let mut cur = std::error::Error::source(status);
    while let Some(c) = cur {
        reason.push_str(": ");
        reason.push_str(&c.to_string());
        cur = c.source();
    }
    reason
}

/// openraft's factory: hands out a client per target.
#[derive(Clone)]
pub struct NetworkFactory {
    pub channels: PeerChannels,
    pub cluster_id: Arc<str>,
    pub from: NodeId,
    /// The log's early-reported entries, when it reports the leader's own
    /// entries flushed before their `fdatasync` (log_store/early.rs):
    /// followers are never told a commit index past the leader's disk.
    pub early: Option<Arc<EarlyAcks>>,
    /// Where a follower's acceptance of entries is recorded, for the
    /// batcher (raft/progress.rs).
    pub progress: Option<Arc<Progress>>,
}

impl RaftNetworkFactory<TypeConfig> for NetworkFactory {
    type Network = PeerClient;

    async fn new_client(&mut self, target: NodeId, node: &BasicNode) -> PeerClient {
        PeerClient {
            target,
            addr: node.addr.clone(),
            channels: self.channels.clone(),
            cluster_id: self.cluster_id.clone(),
            from: self.from,
            early: self.early.clone(),
            progress: self.progress.clone(),
            link: self.channels.link(&node.addr),
        }
    }
}

pub struct PeerClient {
    target: NodeId,
    addr: String,
    channels: PeerChannels,
    cluster_id: Arc<str>,
    from: NodeId,
    early: Option<Arc<EarlyAcks>>,
    progress: Option<Arc<Progress>>,
    /// AppendEntries outside gRPC, once the peer announced a link.
    link: Arc<Link>,
}

impl PeerClient {
    /// One Raft RPC over gRPC within `deadline`; `entries` as for
    /// [`Self::failure`].
    async fn raft_call<Req, Resp, E>(
        &self,
        rpc: RaftRpc,
        req: &Req,
        deadline: Duration,
        entries: Option<usize>,
    ) -> Result<Resp, RPCError<NodeId, BasicNode, RaftError<NodeId, E>>>
    where
        Req: Serialize,
        Resp: DeserializeOwned,
        E: std::error::Error + DeserializeOwned,
    {
        let reply: Result<Resp, RaftError<NodeId, E>> = self
            .channels
            .call(&self.addr, rpc, &self.cluster_id, self.from, req, deadline)
            .await
            .map_err(|f| self.failure(f, entries))?;
        reply.map_err(|e| RPCError::RemoteError(RemoteError::new(self.target, e)))
    }

    /// What openraft is told of a failed call.
    ///
    /// `entries` is the number of log entries in an AppendEntries request: a
    /// request too large to send, or one that a slow follower did not answer
    /// in time, asks openraft to retry at once with half as many.
    ///
    /// openraft gives an AppendEntries only a heartbeat interval and, on a
    /// timeout, resends the same range: a follower that needs longer for a
    /// full batch (a busy disk, a long catch-up) would fail every attempt and
    /// stall until a snapshot. So a multi-entry request gets the soft
    /// deadline (ending before openraft's own), and a timeout shrinks the
    /// batch (openraft keeps the smaller size for the next few requests).
    fn failure<E: std::error::Error>(
        &self,
        f: RpcFailure,
        entries: Option<usize>,
    ) -> RPCError<NodeId, BasicNode, RaftError<NodeId, E>> {
        let batch = entries.is_some_and(|n| n > 1);
        match f {
            RpcFailure::TooLarge { .. } | RpcFailure::Timeout { .. } if batch => {
                tracing::debug!(target = self.target, entries, reason = %f, "halving the AppendEntries batch");
                let half = entries.unwrap_or(2) as u64 / 2;
                RPCError::PayloadTooLarge(PayloadTooLarge::new_entries_hint(half))
            }
            RpcFailure::BadReply { .. }
            | RpcFailure::BadAddress { .. }
            | RpcFailure::TooLarge { .. }
            | RpcFailure::Denied { .. } => RPCError::Network(NetworkError::new(&f)),
            RpcFailure::Unreachable { .. }
            | RpcFailure::Refused { .. }
            | RpcFailure::Timeout { .. }
            | RpcFailure::Unsupported { .. } => RPCError::Unreachable(Unreachable::new(&f)),
        }
    }

    /// An AppendEntries on the peer link (raft/link.rs), if it is up.
    /// `None`: it is not, or it failed before any reply: send it over gRPC
    /// (AppendEntries are idempotent) in what is left of `deadline`.
    async fn append_on_link(
        &mut self,
        rpc: &AppendEntriesRequest<TypeConfig>,
        deadline: Duration,
    ) -> Option<Result<Result<AppendEntriesResponse<NodeId>, RaftError<NodeId>>, RpcFailure>> {
        let announced = self.channels.link_port(&self.addr);
        let hello =
            || Hello { format: format::CURRENT, cluster_id: self.cluster_id.to_string(), from: self.from };
        let call = self.link.call(&self.addr, announced, hello, link::KIND_APPEND, rpc);
        match tokio::time::timeout(deadline, call).await {
            Ok(None) => None,
            Ok(Some(Ok(reply))) => Some(Ok(reply)),
            Ok(Some(Err(e))) => {
                tracing::debug!(target = self.target, error = %e, "AppendEntries failed on the peer link; resending over gRPC");
                None
            }
            Err(_) => {
                self.link.failed(&self.addr, "an AppendEntries timed out");
                Some(Err(RpcFailure::Timeout { addr: self.addr.clone(), after: deadline }))
            }
        }
    }
}

impl RaftNetwork<TypeConfig> for PeerClient {
    fn backoff(&self) -> openraft::network::Backoff {
        openraft::network::Backoff::new(std::iter::repeat(UNREACHABLE_BACKOFF))
    }

    async fn append_entries(
        &mut self,
        mut rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<NodeId>, RPCError<NodeId, BasicNode, RaftError<NodeId>>> {
        if let Some(early) = &self.early {
            // openraft may have committed entries that are not yet on this
            // leader's disk (log_store/early.rs); a follower must not apply
            // them before they are. An update that only carries the commit
            // index waits for the flush (a fraction of a millisecond; if
            // the write failed, the node is stopping); one with entries
            // goes at once, with the commit index lowered.
            if let Some(c) = rpc.leader_commit.filter(|c| rpc.entries.is_empty() && early.unflushed(c.index))
            {
                let _ = tokio::time::timeout(option.soft_ttl(), early.wait_flushed(c.index)).await;
            }
            rpc.leader_commit = early.cap_commit(rpc.leader_commit);
        }
        let entries = rpc.entries.len();
        let deadline = if entries > 1 { option.soft_ttl() } else { option.hard_ttl() };
        let started = tokio::time::Instant::now();
        let reply = match self.append_on_link(&rpc, deadline).await {
            Some(out) => {
                let reply = out.map_err(|f| self.failure(f, Some(entries)))?;
                reply.map_err(|e| RPCError::RemoteError(RemoteError::new(self.target, e)))
            }
            None => {
                let left = deadline.saturating_sub(started.elapsed());
                self.raft_call(RaftRpc::AppendEntries, &rpc, left, Some(entries)).await
            }
        };
        if let (Some(progress), Ok(accepted)) = (&self.progress, &reply) {
            let upto = match accepted {
                AppendEntriesResponse::Success => rpc.entries.last().map(|e| e.log_id.index),
                AppendEntriesResponse::PartialSuccess(upto) => upto.map(|id| id.index),
                _ => None,
            };
            if let Some(index) = upto.filter(|_| entries > 0) {
                progress.accepted(index);
            }
        }
        reply
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<
        InstallSnapshotResponse<NodeId>,
        RPCError<NodeId, BasicNode, RaftError<NodeId, InstallSnapshotError>>,
    > {
        if let Some(v) = self.channels.peer_format(&self.addr).filter(|v| *v < format::CURRENT) {
            if rpc.offset == 0 {
                tracing::warn!(
                    target = self.target,
                    peer_format = v,
                    format = format::CURRENT,
                    "sending a snapshot to a node of an older format version: it cannot install it until it is upgraded"
                );
            }
        }
        self.raft_call(RaftRpc::InstallSnapshot, &rpc, option.hard_ttl(), None).await
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<NodeId>,
        option: RPCOption,
    ) -> Result<VoteResponse<NodeId>, RPCError<NodeId, BasicNode, RaftError<NodeId>>> {
        self.raft_call(RaftRpc::Vote, &rpc, option.hard_ttl(), None).await
    }
}
