//! A Blixard node: Raft, storage, state and the gRPC endpoint of one machine.
//!
//! `Node::start` opens (or creates) the data dir, checks its identity, starts
//! Raft and the gRPC server on one listener, then bootstraps a new cluster,
//! joins an existing one, or simply resumes. The same type runs in
//! production, in the integration tests and inside the madsim simulator.
pub mod api;
pub mod batcher;
pub mod bootstrap;
pub mod console;
pub mod disks;
pub mod election;
pub mod forwarder;
#[cfg(not(madsim))]
mod health;
pub mod identity;
pub mod liveness;
pub mod logs;
mod peer_link;
#[cfg(not(madsim))]
pub mod ports;
pub mod raft_service;
#[cfg(not(madsim))]
pub mod vm_network;
pub mod watch;

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use openraft::error::{ChangeMembershipError, CheckIsLeaderError, ClientWriteError, RaftError};
use openraft::{BasicNode, ChangeMembers, ServerState};
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use tokio::sync::oneshot;

use crate::command::{Command, CommandOutput, CommandResult, Proposal, RequestId};
use crate::error::CommandError;
use crate::metrics::NodeMetrics;
use crate::raft::log_store::{LogStore, WriterStats};
use crate::raft::network::{NetworkFactory, PeerChannels, RaftRpc, RpcFailure};
use crate::raft::state_machine::StateMachineStore;
use crate::raft::{Raft, RaftTuning};
use crate::reconciler::ReconcilerConfig;
use crate::state::ClusterState;
use crate::types::{NodeId, NodeResources};
use batcher::{Batcher, SubmitError};
use blixard_vm::VmBackend;
use identity::{Identity, IdentityError};

/// How long a write may wait for a leader before the caller is told.
const PROPOSE_TIMEOUT: Duration = Duration::from_secs(10);
/// Deadline for one forwarded request.
const FORWARD_TIMEOUT: Duration = Duration::from_secs(8);
/// How long a learner may take to catch up before the join is abandoned.
const CATCH_UP_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a joining node keeps trying to reach its seed.
const JOIN_TIMEOUT: Duration = Duration::from_secs(90);

#[derive(Clone)]
pub struct NodeConfig {
    pub id: NodeId,
    /// Address the gRPC server listens on.
    pub bind: SocketAddr,
    /// Address other nodes and clients use to reach this node (defaults to `bind`).
    pub advertise: Option<String>,
    /// Port of the peer link (raft/link.rs: AppendEntries and forwarded
    /// writes to this node outside gRPC) on `bind`'s host; 0: any free port
    /// (peers learn it from this node's replies). `None`: no link, they come
    /// over gRPC. With `tls` the link is mutual TLS with node certificates.
    pub peer_port: Option<u16>,
    pub data_dir: PathBuf,
    /// Any member of the cluster to join; `None` bootstraps a new cluster
    /// when the data dir is empty.
    pub join: Option<String>,
    /// Capacity, host reservation and overcommit ratios, registered on
    /// every start.
    pub resources: NodeResources,
    pub labels: BTreeMap<String, String>,
    pub tuning: RaftTuning,
    /// Runs the VMs placed on this node; `None` runs none (a control-plane
    /// only node: VMs placed here stay pending).
    pub vm_backend: Option<Arc<dyn VmBackend>>,
    pub reconciler: ReconcilerConfig,
    /// Where the node's metrics go (see [`crate::metrics`]); `None` records
    /// nothing.
    pub meter: Option<opentelemetry::metrics::Meter>,
    /// The bearer token a joining node presents to its seed (an admin
    /// token). Never logged.
    pub join_token: Option<String>,
    /// TLS for the listener and for dialling peers (mutual TLS); the Raft
    /// service then takes only node certificates of the cluster's CA.
    /// `None`: plaintext. Ignored under madsim (no TLS in the simulated
    /// transport).
    pub tls: Option<crate::tls::NodeTls>,
    /// The VM network of a cluster this node founds (`--vm-cidr`); `None`:
    /// the default. Ignored when joining or restarting.
    pub vm_cidr: Option<crate::types::Ipv4Net>,
    /// Whether this node gives its VMs a NIC on its bridge (and routes,
    /// NAT and published ports), or why not.
    pub vm_network: Result<VmNetworkConfig, String>,
}

/// VM networking on a node: a bridge holding the node's subnet's gateway
/// address, a tap per VM, routes to the other nodes' subnets, published
/// ports (see `node/vm_network.rs`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VmNetworkConfig {
    /// Masquerade traffic from the VM network to anywhere else.
    pub nat: bool,
}

impl std::fmt::Debug for NodeConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NodeConfig")
            .field("id", &self.id)
            .field("bind", &self.bind)
            .field("advertise", &self.advertise)
            .field("peer_port", &self.peer_port)
            .field("data_dir", &self.data_dir)
            .field("join", &self.join)
            .field("resources", &self.resources)
            .field("labels", &self.labels)
            .field("tuning", &self.tuning)
            .field("vm_backend", &self.vm_backend.as_ref().map(|b| b.describe()))
            .field("reconciler", &self.reconciler)
            .field("meter", &self.meter.is_some())
            .field("join_token", &self.join_token.as_ref().map(|_| "<set>"))
            .field("tls", &self.tls)
            .field("vm_cidr", &self.vm_cidr)
            .field("vm_network", &self.vm_network)
            .finish()
    }
}

impl NodeConfig {
    pub fn advertised(&self) -> String {
        self.advertise.clone().unwrap_or_else(|| self.bind.to_string())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    #[error(transparent)]
    Identity(#[from] IdentityError),
    #[error("invalid configuration: {0}")]
    Config(String),
    #[error("cannot create data dir {dir}: {source}")]
    DataDir {
        dir: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("raft log {path}: {reason}")]
    Log { path: PathBuf, reason: String },
    #[error("snapshot in {dir}: {source}")]
    Snapshot {
        dir: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("raft: {0}")]
    Raft(String),
    #[error("join via {seed} failed: {reason}")]
    Join { seed: String, reason: String },
}

/// Errors of the node's client-facing operations, mapped onto gRPC codes.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error(transparent)]
    Command(#[from] CommandError),
    #[error("{0}")]
    Invalid(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    AlreadyExists(String),
    #[error("{0}")]
    FailedPrecondition(String),
    #[error("{0}")]
    Unavailable(String),
    /// A write that did not and will never apply: no leader took it. Safe
    /// to retry as it is.
    #[error("{0}")]
    NotApplied(String),
    /// A write that may still apply: it reached a log (or may have) but its
    /// commit was not confirmed. A retry with the same request id is
    /// answered with its real outcome.
    #[error("outcome unknown: {0}")]
    OutcomeUnknown(String),
    /// A write that was committed and applied by the leader, but this node
    /// has not applied it yet, so it cannot show the result. A retry with the
    /// same request id (on any member) returns the outcome.
    /// The leader did not accept the caller a write was forwarded for.
    #[error("{0}")]
    Unauthenticated(String),
    #[error("{0}")]
    PermissionDenied(String),
    #[error("the write was applied at log index {index}, but node {node} has not caught up to show it; retry with the same request id or read from another member")]
    AppliedNotVisible { index: u64, node: NodeId },
}

/// The gRPC metadata key that tells a client what a failed write did.
pub const OUTCOME_KEY: &str = "blixard-outcome";

/// The gRPC metadata key that says which limit a `ResourceExhausted`
/// refusal hit: `capacity` (no node fits) or `quota` (the tenant's quota).
pub const REASON_KEY: &str = "blixard-reason";

impl ApiError {
    /// What a failed write did, as told to clients in [`OUTCOME_KEY`]:
    /// `rejected` (did not and will never apply), `unknown` (may still
    /// apply) or `applied`.
    pub fn outcome(&self) -> &'static str {
        match self {
            ApiError::OutcomeUnknown(_) => "unknown",
            ApiError::AppliedNotVisible { .. } => "applied",
            _ => "rejected",
        }
    }

    /// True when a write failed for want of a leader or a confirmation
    /// (not applied, outcome unknown, or not yet visible here), not
    /// because the command was refused: worth proposing again.
    pub fn is_transient(&self) -> bool {
        matches!(
            self,
            ApiError::Unavailable(_)
                | ApiError::NotApplied(_)
                | ApiError::OutcomeUnknown(_)
                | ApiError::AppliedNotVisible { .. }
        )
    }

    /// The gRPC status of a failed write: the code, plus the outcome in
    /// metadata.
    pub fn into_write_status(self) -> tonic::Status {
        let outcome = self.outcome();
        let mut status = tonic::Status::from(self);
        status.metadata_mut().insert(OUTCOME_KEY, tonic::metadata::MetadataValue::from_static(outcome));
        status
    }
}

impl From<ApiError> for tonic::Status {
    fn from(e: ApiError) -> Self {
        use tonic::Code;
        let code = match &e {
            ApiError::Command(c) => match c.root() {
                CommandError::Invalid { .. } => Code::InvalidArgument,
                CommandError::VmExists { .. } => Code::AlreadyExists,
                CommandError::VmNotFound { .. }
                | CommandError::UnknownNode { .. }
                | CommandError::NoQuota { .. }
                | CommandError::NoToken { .. } => Code::NotFound,
                CommandError::NoCapacity { .. }
                | CommandError::NoFit { .. }
                | CommandError::QuotaExceeded { .. } => Code::ResourceExhausted,
                CommandError::CapacityBelowAllocated { .. }
                | CommandError::BreaksConstraint { .. }
                | CommandError::CannotMove { .. }
                | CommandError::NodeState { .. }
                | CommandError::TokenRefused { .. }
                | CommandError::VmNetworkFixed { .. }
                | CommandError::BatchFailed { .. } => Code::FailedPrecondition,
            },
            ApiError::Invalid(_) => Code::InvalidArgument,
            ApiError::NotFound(_) => Code::NotFound,
            ApiError::AlreadyExists(_) => Code::AlreadyExists,
            ApiError::FailedPrecondition(_) => Code::FailedPrecondition,
            ApiError::Unauthenticated(_) => Code::Unauthenticated,
            ApiError::PermissionDenied(_) => Code::PermissionDenied,
            ApiError::Unavailable(_) | ApiError::NotApplied(_) | ApiError::AppliedNotVisible { .. } => {
                Code::Unavailable
            }
            // gRPC's own meaning: "the operation may have completed".
            ApiError::OutcomeUnknown(_) => Code::DeadlineExceeded,
        };
        let reason = match &e {
            ApiError::Command(c) => match c.root() {
                CommandError::NoCapacity { .. } | CommandError::NoFit { .. } => Some("capacity"),
                CommandError::QuotaExceeded { .. } => Some("quota"),
                _ => None,
            },
            _ => None,
        };
        let mut status = tonic::Status::new(code, e.to_string());
        if let Some(r) = reason {
            status.metadata_mut().insert(REASON_KEY, tonic::metadata::MetadataValue::from_static(r));
        }
        status
    }
}

/// Replies of the internal forwarding RPCs. Replicated between nodes:
/// append variants only, never reorder.
#[derive(Serialize, Deserialize, Debug, Clone)]
pub enum ForwardError {
    /// The receiver is not the leader (any more), and did not hand the write
    /// to Raft; here is who it thinks leads.
    NotLeader { leader: Option<(NodeId, String)> },
    /// The receiver could not take the request (shutting down, or for reads:
    /// no quorum); nothing was handed to Raft.
    Unavailable(String),
    /// The write reached the receiver's log (or may have) but its commit was
    /// not confirmed: it may still apply.
    Unknown(String),
}

impl std::fmt::Display for ForwardError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ForwardError::NotLeader { leader: Some((id, addr)) } => {
                write!(f, "it is not the leader (node {id} at {addr} is)")
            }
            ForwardError::NotLeader { leader: None } => f.write_str("it is not the leader and knows of none"),
            ForwardError::Unavailable(why) | ForwardError::Unknown(why) => f.write_str(why),
        }
    }
}

pub type ProposeReply = Result<(u64, CommandResult), ForwardError>;
pub type ReadIndexReply = Result<u64, ForwardError>;

/// A committed and applied write.
#[derive(Debug, Clone)]
pub struct Applied {
    pub index: u64,
    pub output: CommandOutput,
}

/// One member of the Raft membership, for status output.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemberInfo {
    pub id: NodeId,
    pub addr: String,
    pub role: &'static str,
}

/// Everything the services and background tasks share.
pub struct NodeShared {
    pub id: NodeId,
    pub addr: String,
    pub cluster_id: Arc<str>,
    pub data_dir: PathBuf,
    pub raft: Raft,
    pub state: Arc<ClusterState>,
    pub channels: PeerChannels,
    /// The node runs with TLS: the Raft service takes only node
    /// certificates of the cluster's CA, each for the node it claims to be.
    pub tls: bool,
    /// The port this node's peer link listens on; 0: it has none (yet).
    pub link_port: std::sync::atomic::AtomicU16,
    pub log_stats: Arc<WriterStats>,
    /// openraft runs one membership change at a time and rejects a second
    /// one outright; joins and removals queue here instead.
    membership_lock: tokio::sync::Mutex<()>,
    /// Coalesces concurrent proposals into one Raft entry (group commit).
    pub batcher: Batcher,
    /// On a follower: sends concurrent client writes to the leader in one
    /// call per caller.
    forwarder: forwarder::Forwarder,
    /// Random per process: with `next_seq`, gives each write a request id.
    session: u64,
    pub vm_backend: Option<Arc<dyn VmBackend>>,
    next_seq: std::sync::atomic::AtomicU64,
    /// When this node last heard from a leader (drives pre-votes).
    pub contact: election::LeaderContact,
    pub tuning: RaftTuning,
    /// On the leader: when each node last heartbeated.
    pub liveness: liveness::LeaderView,
    /// This node's fencing lease: VMs may start only while it is valid.
    pub fence: liveness::Fence,
    pub metrics: Arc<NodeMetrics>,
    /// The leader this node knows of; changes only when the leader does
    /// (unlike openraft's metrics, which change with every entry).
    leader_seen: tokio::sync::watch::Sender<Option<NodeId>>,
}

pub struct Node {
    shared: Arc<NodeShared>,
    stop_server: Mutex<Option<oneshot::Sender<()>>>,
    server: Mutex<Option<tokio::task::JoinHandle<()>>>,
    /// The peer link's accept loop (node/peer_link.rs), if it has one.
    link: Mutex<Option<tokio::task::JoinHandle<()>>>,
    /// The log writer; it exits once openraft drops the log store.
    log_writer: Mutex<Option<crate::raft::log_store::WriterDone>>,
    reconciler: Mutex<Option<tokio::task::JoinHandle<()>>>,
    election: Mutex<Option<tokio::task::JoinHandle<()>>>,
    /// Heartbeats and the leader's liveness monitor.
    liveness: Mutex<Vec<tokio::task::JoinHandle<()>>>,
}

/// Milliseconds since the Unix epoch (virtual under madsim). Stamped into
/// proposals; never read inside apply.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

impl Node {
    /// Starts the node. Returns once it serves requests and has bootstrapped,
    /// joined or resumed its cluster.
    pub async fn start(cfg: NodeConfig) -> Result<Node, NodeError> {
        if cfg.id == 0 {
            return Err(NodeError::Config("node id must be a positive integer".into()));
        }
        let addr = cfg.advertised();
        crate::validate::addr(&addr).map_err(|e| NodeError::Config(e.to_string()))?;
        crate::validate::node_resources(&cfg.resources).map_err(|e| NodeError::Config(e.to_string()))?;
        std::fs::create_dir_all(&cfg.data_dir)
            .map_err(|source| NodeError::DataDir { dir: cfg.data_dir.clone(), source })?;
        let tls = cfg.tls.clone();
        if let Some(t) = &tls {
            if t.node_id != cfg.id {
                return Err(NodeError::Config(format!(
                    "the TLS certificate is node {}'s, but this is node {}: give it the certificate issued with --id {}",
                    t.node_id, cfg.id, cfg.id
                )));
            }
        }
        // The simulated transport has no TLS: checked above, then dropped.
        #[cfg(madsim)]
        let tls: Option<crate::tls::NodeTls> = {
            drop(tls);
            None
        };
        let channels = PeerChannels::new(tls.clone());

        // A busy port fails the start before anything is written: a first
        // start that wrote its identity and then could not serve would leave
        // a dir that looks half-joined (the real listener binds below).
        #[cfg(not(madsim))]
        drop(
            std::net::TcpListener::bind(cfg.bind)
                .map_err(|source| NodeError::Bind { addr: cfg.bind, source })?,
        );

        // The peer link's port, checked here like the listener's; it binds
        // once the gRPC server serves (node/peer_link.rs).
        let link_at = cfg.peer_port.map(|port| SocketAddr::new(cfg.bind.ip(), port));
        let link_acceptor = match &tls {
            None => peer_link::Acceptor::Plain,
            #[cfg(not(madsim))]
            Some(t) => peer_link::Acceptor::Tls(tokio_rustls::TlsAcceptor::from(
                t.link_server_config().map_err(|e| NodeError::Config(format!("peer link TLS: {e}")))?,
            )),
            // The simulated transport has no TLS.
            #[cfg(madsim)]
            Some(_) => peer_link::Acceptor::Plain,
        };
        #[cfg(not(madsim))]
        if let Some(at) = link_at.filter(|a| a.port() != 0) {
            drop(std::net::TcpListener::bind(at).map_err(|source| NodeError::Bind { addr: at, source })?);
        }

        // Identity: resume, join (learn the cluster id from the seed first),
        // or bootstrap a brand-new cluster.
        let stored = identity::load(&cfg.data_dir)?;
        let (ident, fresh) = match stored {
            Some(ident) => {
                identity::check_node(&cfg.data_dir, &ident, Some(cfg.id))?;
                if let Some(seed) = &cfg.join {
                    tracing::info!(%seed, "data dir already belongs to a cluster; --join ignored");
                }
                (ident, false)
            }
            None => {
                let cluster_id = match &cfg.join {
                    Some(seed) => seed_cluster_id(&channels, seed, cfg.join_token.as_deref()).await?,
                    None => identity::new_cluster_id(cfg.id, now_ms()),
                };
                let ident = Identity { node_id: cfg.id, cluster_id };
                identity::store(&cfg.data_dir, &ident)?;
                (ident, true)
            }
        };

        let metrics = NodeMetrics::new(cfg.meter.as_ref(), cfg.id);
        let log_path = cfg.data_dir.join(crate::raft::log_store::DIR);
        let mut log = LogStore::open_with(&log_path, &cfg.tuning, metrics.clone())
            .map_err(|e| NodeError::Log { path: log_path.clone(), reason: e.to_string() })?;
        let has_raft_state = log.has_state();
        // The leader's fsync overlaps replication (raft/log_store/early.rs).
        let early = log.report_own_entries_early(cfg.id);
        let progress = log.progress();
        let log_writer = log.take_writer();
        let log_stats = log.stats();
        let state = Arc::new(ClusterState::new());
        if let Ok(v) = std::env::var(watch::HISTORY_ENV) {
            let events = v.parse::<usize>().ok().filter(|&n| n > 0).ok_or_else(|| {
                NodeError::Config(format!(
                    "{}={v:?}: expected a number of events above 0",
                    watch::HISTORY_ENV
                ))
            })?;
            state.feed().set_capacity(events);
        }
        let sm = StateMachineStore::open(&cfg.data_dir, state.clone())
            .map_err(|source| NodeError::Snapshot { dir: cfg.data_dir.clone(), source })?
            .with_metrics(metrics.clone())
            .with_early_acks(early.clone());
        let cluster_id: Arc<str> = Arc::from(ident.cluster_id.as_str());
        let network = NetworkFactory {
            channels: channels.clone(),
            cluster_id: cluster_id.clone(),
            from: cfg.id,
            early: Some(early),
            progress: Some(progress.clone()),
        };
        let config = cfg.tuning.to_config(&ident.cluster_id).map_err(|e| NodeError::Config(e.to_string()))?;
        let raft =
            Raft::new(cfg.id, config, network, log, sm).await.map_err(|e| NodeError::Raft(e.to_string()))?;
        let batcher = Batcher::start(raft.clone(), metrics.clone(), progress);
        let channels_for_forwarder = channels.clone();
        let cluster_id_for_forwarder = cluster_id.clone();

        let shared = Arc::new(NodeShared {
            id: cfg.id,
            addr: addr.clone(),
            cluster_id,
            data_dir: cfg.data_dir.clone(),
            raft,
            state,
            channels,
            tls: tls.is_some(),
            link_port: std::sync::atomic::AtomicU16::new(0),
            log_stats,
            membership_lock: tokio::sync::Mutex::new(()),
            batcher,
            forwarder: forwarder::Forwarder::start(
                channels_for_forwarder,
                cluster_id_for_forwarder,
                cfg.id,
                metrics.clone(),
            ),
            session: identity::random_u64(cfg.id, now_ms()),
            vm_backend: cfg.vm_backend.clone(),
            next_seq: std::sync::atomic::AtomicU64::new(1),
            contact: election::LeaderContact::new(),
            tuning: cfg.tuning.clone(),
            liveness: Default::default(),
            fence: Default::default(),
            metrics,
            leader_seen: tokio::sync::watch::channel(None).0,
        });
        let observed: std::sync::Weak<dyn crate::metrics::Observed> = Arc::downgrade(&shared) as _;
        shared.metrics.observe(observed);
        let (stop_tx, stop_rx) = oneshot::channel();
        let server = api::serve(shared.clone(), cfg.bind, tls.as_ref(), stop_rx).await?;
        let node = Node {
            shared: shared.clone(),
            stop_server: Mutex::new(Some(stop_tx)),
            server: Mutex::new(Some(server)),
            link: Mutex::new(None),
            log_writer: Mutex::new(log_writer),
            reconciler: Mutex::new(None),
            election: Mutex::new(Some(tokio::spawn(election::run(shared.clone())))),
            liveness: Mutex::new(vec![
                tokio::spawn(track_leader(shared.clone())),
                tokio::spawn(liveness::heartbeat_loop(shared.clone())),
                tokio::spawn(liveness::monitor_loop(shared.clone())),
            ]),
        };

        if let Some(at) = link_at {
            match tokio::net::TcpListener::bind(at).await {
                Ok(l) => {
                    let port = l.local_addr().map_or(0, |a| a.port());
                    shared.link_port.store(port, std::sync::atomic::Ordering::Relaxed);
                    tracing::info!(port, "peer link listening");
                    *node.link.lock() =
                        Some(tokio::spawn(peer_link::serve(shared.clone(), l, link_acceptor)));
                }
                Err(source) => {
                    node.shutdown().await;
                    return Err(NodeError::Bind { addr: at, source });
                }
            }
        }

        if !has_raft_state {
            match (&cfg.join, fresh) {
                (Some(seed), _) => join_via(&shared, seed, cfg.join_token.as_deref()).await?,
                // An identity from an earlier start but no Raft state: the
                // node stopped while joining (bootstrap writes its first
                // entry right after the identity). Bootstrapping now would
                // found a second cluster under the same id, and writes
                // through this node would be acknowledged there and lost.
                (None, false) => {
                    node.shutdown().await;
                    return Err(NodeError::Config(format!(
                        "data dir {} belongs to cluster {} but holds no Raft state: this node stopped while joining; start it again with --join SEED (a member of that cluster)",
                        cfg.data_dir.display(),
                        shared.cluster_id
                    )));
                }
                (None, true) => {
                    // The founder's admin token, durable before the first
                    // entry (bootstrap.rs); one already in the file (put
                    // there by the operator's tooling) is used as it is.
                    if bootstrap::read(&cfg.data_dir).is_none() {
                        bootstrap::create(&cfg.data_dir).map_err(|source| NodeError::DataDir {
                            dir: bootstrap::path(&cfg.data_dir),
                            source,
                        })?;
                    }
                    if let Some(cidr) = cfg.vm_cidr {
                        bootstrap::write_vm_cidr(&cfg.data_dir, cidr).map_err(|source| {
                            NodeError::DataDir { dir: cfg.data_dir.join(bootstrap::VM_CIDR_FILE), source }
                        })?;
                    }
                    let members = BTreeMap::from([(cfg.id, BasicNode::new(addr.clone()))]);
                    shared.raft.initialize(members).await.map_err(|e| NodeError::Raft(e.to_string()))?;
                    tracing::info!(node = cfg.id, cluster = %shared.cluster_id, "bootstrapped a new single-node cluster");
                }
            }
        }
        tokio::spawn(register_loop(shared.clone(), cfg.resources, cfg.labels.clone()));
        node.liveness.lock().push(tokio::spawn(bootstrap::run(shared.clone())));
        node.liveness.lock().push(tokio::spawn(bootstrap::vm_network(shared.clone())));
        if let Some(backend) = &cfg.vm_backend {
            tracing::info!(backend = %backend.describe(), "VM backend ready");
            let bridge = match &cfg.vm_network {
                #[cfg(not(madsim))]
                Ok(net) => {
                    node.liveness.lock().push(tokio::spawn(vm_network::run(shared.clone(), net.clone())));
                    Some(vm_network::bridge_name(&shared.cluster_id, shared.id))
                }
                #[cfg(madsim)]
                Ok(_) => {
                    tracing::info!("no VM network on simulated hosts");
                    None
                }
                Err(why) => {
                    tracing::info!(%why, "VMs run without a NIC");
                    None
                }
            };
            let rcfg = ReconcilerConfig { bridge, ..cfg.reconciler.clone() };
            let h = crate::reconciler::spawn(shared.clone(), backend.clone(), rcfg);
            *node.reconciler.lock() = Some(h);
        } else {
            let h = tokio::spawn(release_loop(shared.clone(), cfg.reconciler.tick));
            *node.reconciler.lock() = Some(h);
        }
        Ok(node)
    }

    pub fn shared(&self) -> &Arc<NodeShared> {
        &self.shared
    }

    pub fn id(&self) -> NodeId {
        self.shared.id
    }

    /// Stops serving and shuts Raft down. Returns once the log is closed, so
    /// the data dir can be opened again at once. Durable state stays as it is.
    pub async fn shutdown(&self) {
        // VMs keep running: a node that comes back adopts them.
        if let Some(h) = self.reconciler.lock().take() {
            h.abort();
        }
        if let Some(h) = self.election.lock().take() {
            h.abort();
        }
        for h in self.liveness.lock().drain(..) {
            h.abort();
        }
        // Watch streams never end by themselves; the server waits for them.
        self.shared.state.feed().close();
        if let Some(tx) = self.stop_server.lock().take() {
            let _ = tx.send(());
        }
        let server = self.server.lock().take();
        if let Some(h) = server {
            let _ = h.await;
        }
        if let Some(h) = self.link.lock().take() {
            h.abort();
        }
        let _ = self.shared.raft.shutdown().await;
        let writer = self.log_writer.lock().take();
        if let Some(h) = writer {
            if tokio::time::timeout(Duration::from_secs(10), h).await.is_err() {
                tracing::warn!("raft log writer did not finish within 10s of shutdown");
            }
        }
    }
}

/// Asks a seed for its cluster id, retrying while it is not up yet.
async fn seed_cluster_id(
    channels: &PeerChannels,
    seed: &str,
    token: Option<&str>,
) -> Result<String, NodeError> {
    crate::validate::addr(seed).map_err(|e| NodeError::Config(format!("--join: {e}")))?;
    let deadline = tokio::time::Instant::now() + JOIN_TIMEOUT;
    loop {
        let err = match api::client_status(channels, seed, token).await {
            Ok(s) if !s.cluster_id.is_empty() => return Ok(s.cluster_id),
            Ok(_) => "seed reports no cluster id".to_string(),
            Err(e) => e.message().to_string(),
        };
        if tokio::time::Instant::now() > deadline {
            return Err(NodeError::Join { seed: seed.to_string(), reason: err });
        }
        tracing::info!(%seed, error = %err, "waiting for seed");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// Asks the cluster (through any member) to add this node, retrying while
/// the cluster has no leader.
async fn join_via(shared: &Arc<NodeShared>, seed: &str, token: Option<&str>) -> Result<(), NodeError> {
    let deadline = tokio::time::Instant::now() + JOIN_TIMEOUT;
    loop {
        match api::client_join(&shared.channels, seed, shared.id, &shared.addr, token).await {
            Ok(resp) => {
                if resp.cluster_id != *shared.cluster_id {
                    return Err(NodeError::Join {
                        seed: seed.to_string(),
                        reason: format!("seed moved to cluster {}", resp.cluster_id),
                    });
                }
                tracing::info!(node = shared.id, %seed, leader = resp.leader_id, "joined the cluster as a voter");
                return Ok(());
            }
            Err(s) if s.code() == tonic::Code::Unavailable && tokio::time::Instant::now() < deadline => {
                tracing::info!(%seed, error = %s.message(), "join not possible yet; retrying");
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            Err(s) => {
                return Err(NodeError::Join { seed: seed.to_string(), reason: s.message().to_string() })
            }
        }
    }
}

/// On a node without a VM backend (nothing runs here): tells the cluster
/// that VMs evicted from this node are stopped, so they may be placed
/// elsewhere (a node with a backend reports that from its reconciler, once
/// it has really stopped them).
async fn release_loop(shared: Arc<NodeShared>, tick: Duration) {
    let me = shared.id;
    loop {
        let changed = shared.state.changed().notified();
        tokio::pin!(changed);
        changed.as_mut().enable();
        // Nothing runs here, so every VM evicted from here is gone.
        let reports = crate::reconciler::evicted_and_gone(&shared.state, me, |_| true);
        for chunk in reports.chunks(crate::validate::MAX_BATCH) {
            let cmd = Command::ReportVms { node: me, reports: chunk.to_vec() };
            if let Err(e) = shared.propose(cmd).await {
                tracing::debug!(error = %e, "could not report evicted VMs as stopped; retrying");
            }
        }
        tokio::select! {
            _ = changed => {}
            _ = tokio::time::sleep(tick) => {}
        }
    }
}

/// Registers (or updates) this node's capacity in the replicated state once
/// the cluster can take writes. Runs on every start.
async fn register_loop(shared: Arc<NodeShared>, resources: NodeResources, labels: BTreeMap<String, String>) {
    let capacity = resources.capacity;
    let (id, addr) = (shared.id, shared.addr.clone());
    // Default resources go in format 1's command, which a leader still on
    // format 1 understands during a rolling upgrade (apply treats both the
    // same). Only a reservation or overcommit needs the newer command.
    let cmd = if resources == NodeResources::plain(capacity) {
        Command::RegisterNodeV1 { id, addr, capacity, labels }
    } else {
        Command::RegisterNode { id, addr, resources, labels }
    };
    loop {
        match shared.propose(cmd.clone()).await {
            Ok(_) => {
                tracing::info!(node = shared.id, %capacity, "registered node capacity");
                return;
            }
            Err(e) if e.is_transient() => {
                tracing::debug!(error = %e, "registration waits for a leader");
                tokio::time::sleep(Duration::from_millis(300)).await;
            }
            Err(e) => {
                tracing::error!(error = %e, "node registration rejected; keeping the previous registration");
                return;
            }
        }
    }
}

impl NodeShared {
    /// The leader as this node knows it: id and address.
    pub fn leader(&self) -> Option<(NodeId, String)> {
        let m = self.raft.metrics();
        let m = m.borrow();
        let id = m.current_leader?;
        let addr = m.membership_config.membership().get_node(&id)?.addr.clone();
        Some((id, addr))
    }

    pub fn is_leader(&self) -> bool {
        self.raft.metrics().borrow().state == ServerState::Leader
    }

    /// Members with their roles, in id order.
    pub fn members(&self) -> Vec<MemberInfo> {
        let m = self.raft.metrics();
        let m = m.borrow();
        let leader = m.current_leader;
        let membership = m.membership_config.membership();
        let voters: BTreeSet<NodeId> = membership.voter_ids().collect();
        membership
            .nodes()
            .map(|(id, n)| MemberInfo {
                id: *id,
                addr: n.addr.clone(),
                role: if Some(*id) == leader {
                    "leader"
                } else if voters.contains(id) {
                    "follower"
                } else {
                    "learner"
                },
            })
            .collect()
    }

    /// Commits `command` through Raft (forwarding to the leader when this node
    /// is not it) and returns once it is applied on this node too, so the
    /// caller reads its own write here. The node makes the request id.
    pub async fn propose(&self, command: Command) -> Result<Applied, ApiError> {
        self.propose_with(command, None).await
    }

    /// [`propose`](Self::propose) under the client's request id, if it chose
    /// one. Every attempt carries the same id, so retrying after a lost reply
    /// can never apply twice, and a client retrying with the same id gets the
    /// first outcome.
    ///
    /// A failure is either definite (the command was rejected, or no leader
    /// ever took it: [`ApiError::NotApplied`]) or
    /// [`ApiError::OutcomeUnknown`], once any attempt may have reached a log
    /// without its commit being confirmed. Later attempts that learn the
    /// outcome (the same id, deduplicated) replace the doubt with the truth.
    pub async fn propose_with(
        &self,
        command: Command,
        request: Option<RequestId>,
    ) -> Result<Applied, ApiError> {
        self.propose_for(command, request, None).await
    }

    /// [`propose_with`](Self::propose_with) for a client: a forward to the
    /// leader carries `caller`, whose rights the leader checks again
    /// against its own state (a token revoked there is refused even if this
    /// node has not applied the revocation yet). `None`: this node's own
    /// command.
    pub async fn propose_for(
        &self,
        command: Command,
        request: Option<RequestId>,
        caller: Option<&crate::auth::Caller>,
    ) -> Result<Applied, ApiError> {
        command.validate()?;
        let request = request.or_else(|| {
            let seq = self.next_seq.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            Some(RequestId { session: self.session, seq })
        });
        let proposal = Proposal { at_ms: now_ms(), request, command };
        let deadline = tokio::time::Instant::now() + PROPOSE_TIMEOUT;
        // Why the write may have reached a log, once some attempt may have.
        let mut in_doubt: Option<String> = None;
        let mut last: String;
        loop {
            // A follower that knows the leader forwards at once: its own
            // batcher would only answer "not the leader". (The leader asks
            // only whether it leads: no copy of its own address per write.)
            let elsewhere =
                if self.is_leader() { None } else { self.leader().filter(|(id, _)| *id != self.id) };
            let leader = if let Some(known) = elsewhere {
                last = format!("leader {} was not reached", known.0);
                Some(known)
            } else {
                match self.batcher.submit(proposal.clone()).await {
                    Ok((index, result)) => return self.finish(index, result).await,
                    Err(SubmitError::NotLeader(leader)) => {
                        last = "no leader elected yet".to_string();
                        leader
                    }
                    Err(SubmitError::Unknown { why, leader }) => {
                        last = why.to_string();
                        in_doubt = Some(format!("node {}: {why}", self.id));
                        leader
                    }
                    Err(SubmitError::Closed) => {
                        return Err(undecided(in_doubt, format!("node {} is shutting down", self.id)))
                    }
                }
            };
            if let Some((id, addr)) = leader.filter(|(id, _)| *id != self.id) {
                // Bounded by what is left of the write's own deadline (with a
                // floor, so a late attempt can still succeed).
                let left = deadline.saturating_duration_since(tokio::time::Instant::now());
                let wait = FORWARD_TIMEOUT.min(left.max(Duration::from_millis(500)));
                // Concurrent forwards of one caller share a call
                // (forwarder.rs); the forward is a span of the caller's
                // trace, which the leader's handler continues (trace.rs).
                let call = async {
                    match tokio::time::timeout(wait, self.forwarder.forward(&addr, &proposal, caller)).await {
                        Ok(reply) => reply,
                        Err(_) => Err(RpcFailure::Timeout { addr: addr.clone(), after: wait }),
                    }
                };
                // A leader that went silent (cut off, paused) holds the
                // forward until its deadline; once this node learns of a
                // newer leader, stop waiting and retry there under the same
                // request id (the retry is answered with the first outcome
                // if the old leader did commit it).
                let replaced = self.leader_other_than(id);
                let reply: Result<ProposeReply, RpcFailure> = tokio::select! {
                    r = call => r,
                    new = replaced => {
                        last = format!("leader {id} was replaced by node {new} while the write was in flight");
                        in_doubt = Some(last.clone());
                        if tokio::time::Instant::now() < deadline {
                            continue;
                        }
                        return Err(undecided(in_doubt, last));
                    }
                };
                match reply {
                    Ok(Ok((index, result))) => return self.finish(index, result).await,
                    Ok(Err(e @ (ForwardError::NotLeader { .. } | ForwardError::Unavailable(_)))) => {
                        last = format!("node {id} at {addr} refused it: {e}")
                    }
                    Ok(Err(ForwardError::Unknown(why))) => {
                        last = format!("leader {id} at {addr}: {why}");
                        in_doubt = Some(last.clone());
                    }
                    // Never sent: nothing can apply.
                    // The leader refused the caller (its token, its role):
                    // definite, and said as the leader said it.
                    Err(RpcFailure::Denied { code, reason, .. }) => {
                        return Err(if code == tonic::Code::Unauthenticated {
                            ApiError::Unauthenticated(reason)
                        } else {
                            ApiError::PermissionDenied(reason)
                        })
                    }
                    Err(e @ (RpcFailure::BadAddress { .. } | RpcFailure::TooLarge { .. })) => {
                        return Err(undecided(in_doubt, e.to_string()))
                    }
                    // Never sent either, but a leader may come back or
                    // another be elected: try again.
                    Err(e @ RpcFailure::Refused { .. }) => last = format!("leader {id}: {e}"),
                    // The request may have reached the leader (and the
                    // leader may have died after committing it): in doubt,
                    // and retried under the same request id.
                    Err(e) => {
                        last = format!("leader {id}: {e}");
                        in_doubt = Some(last.clone());
                    }
                }
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(undecided(
                    in_doubt,
                    format!("no leader accepted the write within {}s: {last}", PROPOSE_TIMEOUT.as_secs()),
                ));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Commits `command` only if this node leads now: never forwarded, never
    /// retried elsewhere. For decisions only the current leader may take
    /// (a node is down because *this* leader has not heard from it): under
    /// another leader the decision would be stale.
    pub async fn propose_as_leader(&self, command: Command) -> Result<Applied, ApiError> {
        command.validate()?;
        let seq = self.next_seq.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let request = Some(RequestId { session: self.session, seq });
        let proposal = Proposal { at_ms: now_ms(), request, command };
        match self.batcher.submit(proposal).await {
            Ok((index, result)) => self.finish(index, result).await,
            Err(SubmitError::NotLeader(_)) => Err(ApiError::NotApplied("this node no longer leads".into())),
            Err(SubmitError::Unknown { why, .. }) => Err(ApiError::OutcomeUnknown(why.to_string())),
            Err(SubmitError::Closed) => {
                Err(ApiError::NotApplied(format!("node {} is shutting down", self.id)))
            }
        }
    }

    /// Resolves once this node knows of a leader other than `old`.
    async fn leader_other_than(&self, old: NodeId) -> NodeId {
        // openraft's metrics say who leads (as `leader()` reads them); the
        // watch only wakes this wait when that changes, where the metrics'
        // own watch would wake every waiting forward on every entry.
        // Subscribed before the check, so no change is missed.
        let mut seen = self.leader_seen.subscribe();
        loop {
            let leader = self.raft.metrics().borrow().current_leader;
            if let Some(new) = leader.filter(|l| *l != old) {
                return new;
            }
            if seen.changed().await.is_err() {
                return std::future::pending().await;
            }
        }
    }

    async fn finish(&self, index: u64, result: CommandResult) -> Result<Applied, ApiError> {
        let output = result?;
        self.wait_applied(index).await.map_err(|_| ApiError::AppliedNotVisible { index, node: self.id })?;
        Ok(Applied { index, output })
    }

    /// Waits until this node has applied `index`.
    pub async fn wait_applied(&self, index: u64) -> Result<(), ApiError> {
        // The change feed's revision is the last applied index whose changes
        // readers see; its watch wakes once per apply run, and a wait reads
        // one integer (openraft's `wait` clones its whole metrics on every
        // change, for every waiter).
        let mut applied = self.state.feed().subscribe();
        if *applied.borrow() >= index {
            return Ok(());
        }
        let reached = tokio::time::timeout(PROPOSE_TIMEOUT, applied.wait_for(|a| *a >= index))
            .await
            .is_ok_and(|r| r.is_ok());
        reached.then_some(()).ok_or_else(|| {
            ApiError::Unavailable(format!(
                "node {} has not applied log index {index} within {}s (it is behind the leader)",
                self.id,
                PROPOSE_TIMEOUT.as_secs()
            ))
        })
    }

    /// Makes the next local read linearizable: the leader confirms it still
    /// leads (ReadIndex) and this node applies up to the leader's commit
    /// index before reading. A failure names the hop that failed.
    pub async fn linearize(&self) -> Result<(), ApiError> {
        let deadline = tokio::time::Instant::now() + PROPOSE_TIMEOUT;
        loop {
            let why = match self.raft.ensure_linearizable().await {
                Ok(_) => return Ok(()),
                Err(RaftError::APIError(CheckIsLeaderError::ForwardToLeader(f))) => {
                    match f.leader_id.zip(f.leader_node.map(|n| n.addr)) {
                        None => format!("node {} knows of no leader (an election may be under way)", self.id),
                        Some((id, addr)) => {
                            let r: Result<ReadIndexReply, RpcFailure> = self
                                .channels
                                .call(
                                    &addr,
                                    RaftRpc::ReadIndex,
                                    &self.cluster_id,
                                    self.id,
                                    &(),
                                    FORWARD_TIMEOUT,
                                )
                                .await;
                            match r {
                                Ok(Ok(index)) => return self.wait_applied(index).await,
                                Ok(Err(e)) => format!("leader {id} at {addr} could not confirm it: {e}"),
                                Err(e) => format!("the hop from node {} to leader {id} failed: {e}", self.id),
                            }
                        }
                    }
                }
                Err(RaftError::APIError(CheckIsLeaderError::QuorumNotEnough(_))) => {
                    format!("node {} leads but cannot reach a quorum of voters", self.id)
                }
                Err(RaftError::Fatal(_)) => {
                    return Err(ApiError::Unavailable(format!("node {} is shutting down", self.id)))
                }
            };
            if tokio::time::Instant::now() >= deadline {
                return Err(ApiError::Unavailable(format!("cannot confirm a linearizable read: {why}")));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Confirms that this node leads a quorum, in a round begun after the
    /// call; returns the read index (the commit index it confirmed).
    pub async fn confirm_leadership(&self) -> Result<u64, ForwardError> {
        match self.raft.ensure_linearizable().await {
            Ok(read_log_id) => Ok(read_log_id.map(|l| l.index).unwrap_or(0)),
            Err(RaftError::APIError(CheckIsLeaderError::ForwardToLeader(f))) => {
                Err(ForwardError::NotLeader { leader: f.leader_id.zip(f.leader_node.map(|n| n.addr)) })
            }
            Err(RaftError::APIError(CheckIsLeaderError::QuorumNotEnough(_))) => {
                Err(ForwardError::Unavailable("it leads but cannot reach a quorum of voters".into()))
            }
            Err(RaftError::Fatal(_)) => Err(ForwardError::Unavailable("it is shutting down".into())),
        }
    }

    /// Adds `id` at `addr`: as a learner, then, once caught up, as a voter.
    /// Must run on the leader. Idempotent for a node that is already a member
    /// at the same address.
    pub async fn add_member(&self, id: NodeId, addr: &str) -> Result<(), ApiError> {
        if id == 0 {
            return Err(ApiError::Invalid("node id must be a positive integer".into()));
        }
        crate::validate::addr(addr)?;
        let _serial = self.membership_lock.lock().await;
        let (known, is_voter) = {
            let m = self.raft.metrics();
            let m = m.borrow();
            let membership = m.membership_config.membership();
            let known = membership.get_node(&id).map(|n| n.addr.clone());
            let is_voter = membership.voter_ids().any(|v| v == id);
            (known, is_voter)
        };
        if let Some(existing) = &known {
            if existing != addr {
                return Err(ApiError::AlreadyExists(format!(
                    "node id {id} is already a member at {existing}; pick another --id"
                )));
            }
            if is_voter {
                return Ok(());
            }
        }
        let add = self.raft.add_learner(id, BasicNode::new(addr), true);
        match tokio::time::timeout(CATCH_UP_TIMEOUT, add).await {
            Err(_) => {
                return Err(ApiError::Unavailable(format!(
                    "node {id} at {addr} did not catch up within {CATCH_UP_TIMEOUT:?}; it stays a learner"
                )))
            }
            Ok(r) => r.map_err(membership_error)?,
        };
        self.raft
            .change_membership(ChangeMembers::AddVoterIds(BTreeSet::from([id])), false)
            .await
            .map_err(membership_error)?;
        Ok(())
    }

    /// Removes `id` from the cluster (joint consensus) and takes it out of
    /// placement. Must run on the leader.
    pub async fn remove_member(&self, id: NodeId) -> Result<(), ApiError> {
        let _serial = self.membership_lock.lock().await;
        let (is_member, voters) = {
            let m = self.raft.metrics();
            let m = m.borrow();
            let membership = m.membership_config.membership();
            (membership.get_node(&id).is_some(), membership.voter_ids().collect::<BTreeSet<_>>())
        };
        if !is_member {
            return Err(ApiError::NotFound(format!("node {id} is not a member of this cluster")));
        }
        if voters.len() == 1 && voters.contains(&id) {
            return Err(ApiError::FailedPrecondition(format!(
                "node {id} is the only voter; removing it would leave no cluster"
            )));
        }
        if self.state.with_node(id, |_| ()).is_some() {
            self.propose(Command::DecommissionNode { id }).await?;
        }
        let change = if voters.contains(&id) {
            ChangeMembers::RemoveVoters(BTreeSet::from([id]))
        } else {
            ChangeMembers::RemoveNodes(BTreeSet::from([id]))
        };
        self.raft.change_membership(change, false).await.map_err(membership_error)?;
        Ok(())
    }
}

/// The error of a write that got no definite outcome: unknown if any
/// attempt may have reached a log, otherwise not applied.
fn undecided(in_doubt: Option<String>, last: String) -> ApiError {
    match in_doubt {
        Some(why) if why == last => ApiError::OutcomeUnknown(why),
        Some(why) => ApiError::OutcomeUnknown(format!("{why}; then: {last}")),
        None => ApiError::NotApplied(format!("not applied: {last}")),
    }
}

fn membership_error(e: RaftError<NodeId, ClientWriteError<NodeId, BasicNode>>) -> ApiError {
    match e {
        RaftError::APIError(ClientWriteError::ForwardToLeader(_)) => ApiError::OutcomeUnknown(
            "leadership changed during the membership change; check `cluster members`".into(),
        ),
        RaftError::APIError(ClientWriteError::ChangeMembershipError(ChangeMembershipError::InProgress(
            e,
        ))) => ApiError::Unavailable(format!("another membership change is in progress ({e}); retry")),
        RaftError::APIError(ClientWriteError::ChangeMembershipError(e)) => {
            ApiError::FailedPrecondition(e.to_string())
        }
        RaftError::Fatal(_) => ApiError::OutcomeUnknown(
            "the node stopped during the membership change; check `cluster members`".into(),
        ),
    }
}

/// Follows the leader as this node sees it: publishes it to
/// `leader_seen` and counts changes (metrics).
async fn track_leader(shared: Arc<NodeShared>) {
    let mut m = shared.raft.metrics();
    let mut leader = m.borrow().current_leader;
    shared.leader_seen.send_replace(leader);
    while m.changed().await.is_ok() {
        let now = m.borrow().current_leader;
        if now != leader {
            leader = now;
            shared.leader_seen.send_replace(now);
            shared.metrics.leader_changes.add(1);
        }
    }
}

impl crate::metrics::Observed for NodeShared {
    fn raft(&self) -> crate::metrics::RaftFigures {
        let m = self.raft.metrics();
        let m = m.borrow();
        crate::metrics::RaftFigures {
            term: m.current_term,
            leader: m.current_leader.unwrap_or(0),
            is_leader: m.state == ServerState::Leader,
            last_log_index: m.last_log_index.unwrap_or(0),
            commit_index: self.log_stats.committed.load(std::sync::atomic::Ordering::Relaxed),
            applied_index: m.last_applied.map_or(0, |l| l.index),
        }
    }

    fn vms_by_state(&self) -> [u64; crate::types::ObservedState::ALL.len()] {
        let mut counts = [0u64; crate::types::ObservedState::ALL.len()];
        self.state.for_each_vm_on(self.id, |vm| counts[vm.observed as usize] += 1);
        counts
    }

    fn queued_vms(&self) -> u64 {
        self.state.queued_count() as u64
    }

    fn node_resources(&self) -> Option<[[u64; 3]; 3]> {
        const MIB: u64 = 1 << 20;
        const GIB: u64 = 1 << 30;
        self.state.with_node(self.id, |n| {
            [n.resources.capacity, n.allocatable(), n.allocated]
                .map(|r| [u64::from(r.vcpus), r.memory_mb.saturating_mul(MIB), r.disk_gb.saturating_mul(GIB)])
        })
    }
}
