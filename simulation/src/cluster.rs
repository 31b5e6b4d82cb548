//! A simulated Blixard cluster: real nodes on madsim nodes, a client node that
//! talks to them through the public gRPC API, and fault injection.
use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use blixard_core::node::{Node, NodeConfig, NodeShared};
use blixard_core::raft::RaftTuning;
use blixard_core::reconciler::ReconcilerConfig;
use blixard_core::types::{NodeId, Resources};
use blixard_proto as pb;
use blixard_proto::cluster_service_client::ClusterServiceClient;
use blixard_proto::vm_service_client::VmServiceClient;
use blixard_vm::sim::{SimHost, SimWorld};
use blixard_vm::VmBackend;
use madsim::net::NetSim;
use madsim::runtime::{Handle, NodeHandle};
use tonic::transport::{Channel, Endpoint};
use tonic::{Request, Status};

use crate::model::{CreateReply, CreateReq, Model, Outcome, Told, Trace};
use crate::watcher::WatchLog;

/// Every node listens on this port of its own virtual IP 10.0.0.<id>.
pub const PORT: u16 = 7420;
/// The client node's virtual IP.
const CLIENT_IP: Ipv4Addr = Ipv4Addr::new(10, 0, 1, 1);
/// The hosts' guards' madsim node (it talks to no one).
const GUARDS_IP: Ipv4Addr = Ipv4Addr::new(10, 0, 1, 2);
/// A client write waits longer than the node's own write deadline (10 s), so
/// the node's verdict, not the client's impatience, decides the outcome.
const WRITE_TIMEOUT: Duration = Duration::from_secs(15);
/// Status and stale reads answer from local state: quick or not at all.
const READ_TIMEOUT: Duration = Duration::from_secs(3);
/// How long an operator change is retried before its outcome is left unknown.
pub const ADMIN_GIVE_UP: Duration = Duration::from_secs(60);
/// How often waits re-poll the cluster.
const POLL: Duration = Duration::from_millis(200);

pub fn node_addr(id: NodeId) -> SocketAddr {
    SocketAddr::new(IpAddr::V4(Ipv4Addr::new(10, 0, 0, id as u8)), PORT)
}

/// Production Raft timing, but snapshots every 50 entries and only 10 kept
/// behind: a node that is down for a while finds the log it needs purged on
/// the leader and must catch up by installing a snapshot.
/// Small log segments (on tmpfs, preallocation is memory) that roll over
/// and are deleted many times in every run, and few committed entries kept
/// in memory, so lagging followers are served from disk all the time.
pub fn sim_tuning() -> RaftTuning {
    RaftTuning {
        snapshot_every: 50,
        keep_behind_snapshot: 10,
        log_segment_bytes: 16 * 1024,
        log_hot_entries: 4,
        ..RaftTuning::default()
    }
}

/// The reconciler, sped up so VM scenarios converge in little virtual time:
/// a short tick and a short, low-capped backoff.
pub fn sim_reconciler() -> ReconcilerConfig {
    ReconcilerConfig {
        tick: Duration::from_millis(200),
        settle: Duration::from_millis(10),
        stop_grace: Duration::from_secs(1),
        backoff_base: Duration::from_millis(200),
        backoff_max: Duration::from_secs(2),
        stable_after: Duration::from_secs(5),
        report_every: Duration::from_millis(100),
        bridge: None,
    }
}

/// Shape of the simulated cluster.
#[derive(Clone, Debug)]
pub struct SimConfig {
    pub nodes: u64,
    /// What every node offers to placement.
    pub capacity: Resources,
    /// Start node k+1 only once node k is a voter. Off by default: all nodes
    /// start at once, as with `blixard up`, and their joins race.
    pub staggered_start: bool,
    /// Give every node a [`blixard_vm::sim::SimBackend`] on its own
    /// [`SimHost`] (all hosts sharing one [`SimWorld`]), so the real
    /// reconciler runs the VMs placed there. On by default.
    pub vm_backends: bool,
    /// Node labels (the `--label` flags) by node id; unlisted nodes have none.
    pub labels: BTreeMap<NodeId, BTreeMap<String, String>>,
    /// Nodes that do not start with the cluster but may join it later
    /// ([`SimCluster::join_node`]), as ids `nodes + 1 ..`.
    pub spare_nodes: u64,
    /// Every node's reconciler settings ([`sim_reconciler`] by default).
    pub reconciler: ReconcilerConfig,
}

impl Default for SimConfig {
    fn default() -> Self {
        Self {
            nodes: 3,
            capacity: Resources::new(256, 512 * 1024, 20_000),
            staggered_start: false,
            vm_backends: true,
            labels: BTreeMap::new(),
            spare_nodes: 0,
            reconciler: sim_reconciler(),
        }
    }
}

/// How often a simulated host's guard checks its fencing lease (the real
/// guard: every 100 ms).
const GUARD_EVERY: Duration = Duration::from_millis(100);

/// How long a staggered start waits for each join.
const JOIN_WAIT: Duration = Duration::from_secs(120);

/// One simulated Blixard node.
struct SimNode {
    id: NodeId,
    handle: NodeHandle,
    /// The running node's shared state, published by its init task. Weak, so
    /// that a kill really drops the node (and closes its redb files) and the
    /// restart can open them again.
    live: Arc<Mutex<Weak<NodeShared>>>,
    up: bool,
    /// The node's hypervisor. Created once, outside the node, so it outlives
    /// kills and restarts of the node process: guests keep running and the
    /// restarted node must adopt them.
    host: Arc<SimHost>,
}

/// Aggregate view of the cluster at one moment.
pub struct Converged {
    pub leader: NodeId,
    pub statuses: Vec<pb::StatusResponse>,
}

pub struct SimCluster {
    nodes: Vec<SimNode>,
    /// Data dirs of the spare nodes not yet joined, in id order.
    spare_dirs: std::collections::VecDeque<PathBuf>,
    config: SimConfig,
    client: NodeHandle,
    /// Where the hosts' fencing guards run (see [`spawn_node`]).
    guards: NodeHandle,
    /// What all simulated hosts share: who runs what, double runs.
    world: Arc<SimWorld>,
    /// Network faults in force: links clogged (from, to), nodes cut off
    /// from everyone (the client included), nodes paused.
    clogged_links: BTreeSet<(NodeId, NodeId)>,
    isolated: BTreeSet<NodeId>,
    paused: BTreeSet<NodeId>,
    pub trace: Trace,
    /// A client following the change feed through every fault (see
    /// [`crate::watcher`]); checked against the final state.
    watch: Arc<Mutex<WatchLog>>,
}

/// An operator change: `node set`, a tenant quota, the placement strategy.
#[derive(Clone, Debug, PartialEq)]
pub enum Admin {
    SetQuota {
        tenant: String,
        limits: pb::QuotaLimits,
    },
    DeleteQuota {
        tenant: String,
    },
    /// At least one of the changes must be there (an empty one is invalid).
    SetNode {
        node: NodeId,
        cpu_overcommit: Option<&'static str>,
        set_labels: Vec<(String, String)>,
        remove_labels: Vec<String>,
    },
    SetScheduler {
        strategy: &'static str,
    },
    SetNodeTimeout {
        ms: u64,
    },
    Drain {
        node: NodeId,
        max_parallel: u32,
    },
    Eligible {
        node: NodeId,
    },
    /// `vm migrate` (a VM write, retried like the operator changes).
    Migrate {
        vm: String,
        to: NodeId,
    },
}

/// Sends one operator change under `request_id` through `via`. Spawn it on
/// the client node.
pub async fn admin_call(via: NodeId, change: Admin, request_id: String) -> Result<(), Status> {
    let mut c = ClusterServiceClient::new(connect(via).await?);
    match change {
        Admin::SetQuota { tenant, limits } => {
            let req = pb::SetQuotaRequest { tenant, limits: Some(limits), request_id };
            c.set_quota(request(req, WRITE_TIMEOUT)).await.map(|_| ())
        }
        Admin::DeleteQuota { tenant } => {
            let req = pb::DeleteQuotaRequest { tenant, request_id };
            c.delete_quota(request(req, WRITE_TIMEOUT)).await.map(|_| ())
        }
        Admin::SetNode { node, cpu_overcommit, set_labels, remove_labels } => {
            let req = pb::SetNodeRequest {
                node_id: node,
                set_labels: set_labels.into_iter().collect(),
                remove_labels,
                cpu_overcommit: cpu_overcommit.unwrap_or_default().to_string(),
                request_id,
                ..Default::default()
            };
            c.set_node(request(req, WRITE_TIMEOUT)).await.map(|_| ())
        }
        Admin::SetScheduler { strategy } => {
            let req = pb::SetSchedulerRequest { strategy: strategy.to_string(), request_id };
            c.set_scheduler(request(req, WRITE_TIMEOUT)).await.map(|_| ())
        }
        Admin::SetNodeTimeout { ms } => {
            let req = pb::SetNodeTimeoutRequest { timeout_ms: ms, request_id };
            c.set_node_timeout(request(req, WRITE_TIMEOUT)).await.map(|_| ())
        }
        Admin::Drain { node, max_parallel } => {
            let req = pb::DrainNodeRequest { node_id: node, max_parallel, deadline_secs: 0, request_id };
            c.drain_node(request(req, WRITE_TIMEOUT)).await.map(|_| ())
        }
        Admin::Eligible { node } => {
            let req = pb::SetEligibleRequest { node_id: node, request_id };
            c.set_eligible(request(req, WRITE_TIMEOUT)).await.map(|_| ())
        }
        Admin::Migrate { vm, to } => {
            let mut v = VmServiceClient::new(connect(via).await?);
            let req = pb::MigrateVmRequest { name: vm, to_node: to, request_id };
            v.migrate_vm(request(req, WRITE_TIMEOUT)).await.map(|_| ())
        }
    }
}

/// A client write that carries a request id, as the public API takes it.
#[derive(Clone, Debug, PartialEq)]
pub enum Write {
    Create { name: String, spec: pb::VmSpec },
    Delete { name: String },
    Start { name: String },
    Stop { name: String },
    Restart { name: String },
}

impl Write {
    pub fn name(&self) -> &str {
        match self {
            Write::Create { name, .. }
            | Write::Delete { name }
            | Write::Start { name }
            | Write::Stop { name }
            | Write::Restart { name } => name,
        }
    }

    pub fn verb(&self) -> &'static str {
        match self {
            Write::Create { .. } => "create",
            Write::Delete { .. } => "delete",
            Write::Start { .. } => "start",
            Write::Stop { .. } => "stop",
            Write::Restart { .. } => "restart",
        }
    }
}

/// One client write under `request_id` through node `via`, with the
/// client's own deadline `timeout`; the raw reply (a delete answers with no
/// VM). Runs on whatever madsim node calls it: spawn it on the client node
/// (see [`SimCluster::client`]).
pub async fn write_call(
    via: NodeId,
    write: Write,
    request_id: String,
    timeout: Duration,
) -> Result<Option<pb::Vm>, Status> {
    let mut c = VmServiceClient::new(connect(via).await?);
    let reply = match write {
        Write::Create { name, spec } => {
            let req = pb::CreateVmRequest {
                name,
                spec: Some(spec),
                no_start: false,
                request_id,
                ..Default::default()
            };
            c.create_vm(request(req, timeout)).await?.into_inner().vm
        }
        Write::Delete { name } => {
            c.delete_vm(request(pb::DeleteVmRequest { name, request_id }, timeout)).await?;
            None
        }
        Write::Start { name } => {
            c.start_vm(request(pb::VmNameRequest { name, request_id }, timeout)).await?.into_inner().vm
        }
        Write::Stop { name } => {
            c.stop_vm(request(pb::VmNameRequest { name, request_id }, timeout)).await?.into_inner().vm
        }
        Write::Restart { name } => {
            c.restart_vm(request(pb::VmNameRequest { name, request_id }, timeout)).await?.into_inner().vm
        }
    };
    Ok(reply)
}

/// Sends one write under `request_id` through a random node of `nodes`
/// until the answer is definite (applied or rejected), trying another random
/// node 50-500 ms after each unknown answer; gives up after `give_up` of
/// virtual time. Returns the last answer and the number of tries. An
/// unlabelled answer (a bug) is returned at once. Spawn it on the client
/// node.
pub async fn write_until_definite(
    nodes: Vec<NodeId>,
    write: Write,
    request_id: String,
    timeout: Duration,
    give_up: Duration,
) -> (Told, u32) {
    use madsim::rand::Rng;
    let start = madsim::time::Instant::now();
    let mut tries = 0;
    loop {
        tries += 1;
        let via = nodes[madsim::rand::thread_rng().gen_range(0..nodes.len())];
        let told = Told::from_reply(write_call(via, write.clone(), request_id.clone(), timeout).await);
        if !matches!(told, Told::Unknown(_)) || start.elapsed() >= give_up {
            return (told, tries);
        }
        let pause = madsim::rand::thread_rng().gen_range(50..500);
        madsim::time::sleep(Duration::from_millis(pause)).await;
    }
}

/// What one running node's Raft says about itself, read from its memory (so
/// it also works for a node that is cut off or paused).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RaftView {
    pub state: &'static str,
    pub term: u64,
    pub leader: Option<NodeId>,
    pub last_log: u64,
    pub applied: u64,
    pub snapshot: u64,
    pub purged: u64,
    /// On a leader: the last log index each follower is known to match.
    pub matched: BTreeMap<NodeId, u64>,
}

fn raft_view(shared: &NodeShared) -> RaftView {
    let m = shared.raft.metrics().borrow().clone();
    // (openraft is not a dependency of this crate: name the state by its Debug.)
    let state = match format!("{:?}", m.state).as_str() {
        "Leader" => "leader",
        "Follower" => "follower",
        "Candidate" => "candidate",
        "Learner" => "learner",
        _ => "shutdown",
    };
    RaftView {
        state,
        term: m.current_term,
        leader: m.current_leader,
        last_log: m.last_log_index.unwrap_or(0),
        applied: m.last_applied.map(|l| l.index).unwrap_or(0),
        snapshot: m.snapshot.map(|l| l.index).unwrap_or(0),
        purged: m.purged.map(|l| l.index).unwrap_or(0),
        matched: m
            .replication
            .map(|r| r.into_iter().map(|(id, l)| (id, l.map(|l| l.index).unwrap_or(0))).collect())
            .unwrap_or_default(),
    }
}

/// One change of a node's role, term or known leader, as the watch saw it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RoleChange {
    /// Virtual time since the watch started.
    pub at: Duration,
    pub node: NodeId,
    /// `None` while the node is down.
    pub state: Option<&'static str>,
    pub term: u64,
    pub leader: Option<NodeId>,
}

/// Samples every node's role, term and leader every [`RoleWatch::EVERY`]
/// from the nodes' memory and keeps each change. Stops when dropped.
pub struct RoleWatch {
    start: madsim::time::Instant,
    changes: Arc<Mutex<Vec<RoleChange>>>,
    task: madsim::task::JoinHandle<()>,
}

impl RoleWatch {
    pub const EVERY: Duration = Duration::from_millis(10);

    /// Everything seen so far, in order.
    pub fn changes(&self) -> Vec<RoleChange> {
        self.changes.lock().unwrap().clone()
    }

    /// Virtual time since the watch started.
    pub fn elapsed(&self) -> Duration {
        self.start.elapsed()
    }

    /// The (node, term) pairs that were seen leading, in order of first sight.
    pub fn leaders(&self) -> Vec<(NodeId, u64)> {
        let mut out: Vec<(NodeId, u64)> = Vec::new();
        for c in self.changes.lock().unwrap().iter() {
            if c.state == Some("leader") && !out.contains(&(c.node, c.term)) {
                out.push((c.node, c.term));
            }
        }
        out
    }

    /// The highest term any node held.
    pub fn max_term(&self) -> u64 {
        self.changes.lock().unwrap().iter().map(|c| c.term).max().unwrap_or(0)
    }

    /// When (since the watch started) a node other than `not` was first seen
    /// leading at a term above `above`.
    pub fn new_leader_at(&self, not: NodeId, above: u64) -> Option<(Duration, NodeId, u64)> {
        self.changes
            .lock()
            .unwrap()
            .iter()
            .find(|c| c.state == Some("leader") && c.node != not && c.term > above)
            .map(|c| (c.at, c.node, c.term))
    }

    /// The changes as short lines, for failure messages.
    pub fn describe(&self) -> String {
        let lines: Vec<String> = self
            .changes()
            .iter()
            .map(|c| {
                format!(
                    "{:>7}ms n{} {} term {} leader {:?}",
                    c.at.as_millis(),
                    c.node,
                    c.state.unwrap_or("down"),
                    c.term,
                    c.leader
                )
            })
            .collect();
        lines.join("\n")
    }
}

impl Drop for RoleWatch {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A VM lifecycle request through the public API.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VmOp {
    Start,
    Stop,
    Restart,
}

impl VmOp {
    pub fn as_str(&self) -> &'static str {
        match self {
            VmOp::Start => "start",
            VmOp::Stop => "stop",
            VmOp::Restart => "restart",
        }
    }
}

pub async fn connect(id: NodeId) -> Result<Channel, Status> {
    Endpoint::from_shared(format!("http://{}", node_addr(id)))
        .map_err(|e| Status::invalid_argument(e.to_string()))?
        .connect_timeout(Duration::from_secs(1))
        .connect()
        .await
        .map_err(|e| Status::unavailable(format!("connect to n{id}: {e}")))
}

/// Waits until node 1 sees `count` voters (staggered start).
async fn wait_voters(client: &NodeHandle, count: NodeId) {
    let deadline = madsim::time::Instant::now() + JOIN_WAIT;
    loop {
        let voters = client
            .spawn(async move {
                let mut c = ClusterServiceClient::new(connect(1).await?);
                let s = c
                    .status(request(
                        pb::StatusRequest { include_digest: false, include_heartbeats: false },
                        READ_TIMEOUT,
                    ))
                    .await?;
                let s = s.into_inner();
                let leading = s.leader_id != 0;
                Ok::<_, Status>(s.members.iter().filter(|m| leading && m.role != "learner").count())
            })
            .await
            .expect("client task failed");
        if matches!(voters, Ok(v) if v as NodeId >= count) {
            return;
        }
        assert!(madsim::time::Instant::now() < deadline, "n1 does not see {count} voters: {voters:?}");
        madsim::time::sleep(POLL).await;
    }
}

/// The cluster's admin token: put in node 1's data dir before it founds
/// the cluster (a founder uses a token already there), presented by the
/// joining nodes and on every client request of the simulation.
static ADMIN_TOKEN: std::sync::Mutex<Option<String>> = std::sync::Mutex::new(None);

pub fn admin_token() -> String {
    ADMIN_TOKEN.lock().unwrap().clone().expect("the cluster's admin token (SimCluster::start)")
}

/// A client request with a deadline, carrying the admin token.
fn request<T>(msg: T, timeout: Duration) -> Request<T> {
    request_as(msg, timeout, &admin_token())
}

/// A client request without a deadline (a stream), carrying the admin token.
pub fn with_admin_token<T>(msg: T) -> Request<T> {
    let mut r = Request::new(msg);
    if let Ok(v) = format!("Bearer {}", admin_token()).parse() {
        r.metadata_mut().insert(blixard_core::auth::AUTHORIZATION, v);
    }
    r
}

/// A client request with a deadline, carrying `token`.
pub fn request_as<T>(msg: T, timeout: Duration, token: &str) -> Request<T> {
    let mut r = Request::new(msg);
    r.set_timeout(timeout);
    if let Ok(v) = format!("Bearer {token}").parse() {
        r.metadata_mut().insert(blixard_core::auth::AUTHORIZATION, v);
    }
    r
}

/// Builds the madsim node for Blixard node `id` (its init task starts the
/// real node, and starts it again on every restart), joining through `join`.
fn spawn_node(
    config: &SimConfig,
    world: &Arc<SimWorld>,
    guards: &NodeHandle,
    id: NodeId,
    dir: PathBuf,
    join: Option<NodeId>,
) -> SimNode {
    let host = SimHost::new(world.clone(), id);
    // The host's fencing guard: a process of its own on a real host, here a
    // task on a madsim node that is never killed, paused or cut off, so it
    // enforces the lease whatever happens to the Blixard node.
    drop(guards.spawn(host.clone().run_guard(GUARD_EVERY)));
    let vm_backend = config.vm_backends.then(|| Arc::new(host.backend()) as Arc<dyn VmBackend>);
    // Most nodes serve a peer link (AppendEntries over the simulator's
    // TCP); one in four, drawn from the seed, takes them over gRPC only, so
    // clusters mix both transports and the fallback between them.
    let link = {
        use madsim::rand::Rng;
        madsim::rand::thread_rng().gen_range(0..4) != 0
    };
    let cfg = NodeConfig {
        id,
        bind: node_addr(id),
        advertise: None,
        peer_port: link.then_some(0),
        data_dir: dir,
        join: join.map(|seed| node_addr(seed).to_string()),
        resources: blixard_core::types::NodeResources::plain(config.capacity),
        labels: config.labels.get(&id).cloned().unwrap_or_default(),
        tuning: sim_tuning(),
        vm_backend,
        reconciler: config.reconciler.clone(),
        meter: None,
        join_token: join.map(|_| admin_token()),
        tls: None,
        vm_cidr: None,
        vm_network: Err("the simulated hosts have no VM network".into()),
    };
    let live = Arc::new(Mutex::new(Weak::new()));
    let slot = live.clone();
    // The init task runs at build and again on every restart: the same
    // config and data dir, like a process started by systemd.
    let handle = Handle::current()
        .create_node()
        .name(format!("n{id}"))
        .ip(node_addr(id).ip())
        .init(move || {
            let cfg = cfg.clone();
            let slot = slot.clone();
            async move {
                let node = Node::start(cfg).await.unwrap_or_else(|e| panic!("n{id} failed to start: {e}"));
                *slot.lock().unwrap() = Arc::downgrade(node.shared());
                // Keep the node alive until madsim kills this task.
                std::future::pending::<()>().await;
                drop(node);
            }
        })
        .build();
    SimNode { id, handle, live, up: true, host }
}

impl SimCluster {
    /// Starts `config.nodes` real Blixard nodes, node 1 bootstrapping and the
    /// others joining through it, plus a client node. Returns at once; use
    /// [`SimCluster::wait_ready`] to wait for the cluster to form.
    pub async fn start(config: SimConfig, data_dirs: Vec<PathBuf>) -> SimCluster {
        assert_eq!(
            data_dirs.len() as u64,
            config.nodes + config.spare_nodes,
            "one data dir per node, spares included"
        );
        let handle = Handle::current();
        let client = handle.create_node().name("client").ip(IpAddr::V4(CLIENT_IP)).build();
        let guards = handle.create_node().name("guards").ip(IpAddr::V4(GUARDS_IP)).build();
        let world = SimWorld::new();
        let admin = blixard_core::auth::token::new_secret().expect("randomness");
        std::fs::write(blixard_core::node::bootstrap::path(&data_dirs[0]), format!("{admin}\n"))
            .expect("write node 1's admin token");
        *ADMIN_TOKEN.lock().unwrap() = Some(admin);
        let mut dirs: std::collections::VecDeque<PathBuf> = data_dirs.into();
        let mut nodes = Vec::new();
        for id in 1..=config.nodes {
            let dir = dirs.pop_front().expect("a data dir per node");
            if config.staggered_start && id > 1 {
                wait_voters(&client, id - 1).await;
            }
            nodes.push(spawn_node(&config, &world, &guards, id, dir, (id != 1).then_some(1)));
        }
        let watch = Arc::new(Mutex::new(WatchLog::default()));
        let members: Vec<NodeId> = (1..=config.nodes + config.spare_nodes).collect();
        client.spawn(crate::watcher::follow(members, watch.clone()));
        SimCluster {
            nodes,
            spare_dirs: dirs,
            config,
            client,
            guards,
            world,
            clogged_links: BTreeSet::new(),
            isolated: BTreeSet::new(),
            paused: BTreeSet::new(),
            trace: Trace::new(),
            watch,
        }
    }

    /// How many spare nodes may still join.
    pub fn spares_left(&self) -> usize {
        self.spare_dirs.len()
    }

    /// Starts the next spare node, joining the running cluster through node
    /// `seed`; returns its id. Wait for it with [`SimCluster::wait_joined`].
    pub fn join_node(&mut self, seed: NodeId) -> NodeId {
        let dir = self.spare_dirs.pop_front().expect("no spare node left to join");
        let id = self.nodes.len() as NodeId + 1;
        let node = spawn_node(&self.config, &self.world, &self.guards, id, dir, Some(seed));
        self.nodes.push(node);
        self.trace.push(format_args!("join n{id} via n{seed}"));
        id
    }

    /// Waits until node `id` is a voter and has registered itself as an
    /// active node, as the leader sees it.
    pub async fn wait_joined(&mut self, id: NodeId, timeout: Duration) {
        let deadline = madsim::time::Instant::now() + timeout;
        loop {
            let why = match self.leader().await {
                None => "no leader".to_string(),
                Some((leader, _)) => match self.status(leader, false).await {
                    Err(e) => format!("leader n{leader} unreachable: {e}"),
                    Ok(s) => {
                        let voter = s.members.iter().any(|m| m.id == id && m.role != "learner");
                        let active = s.nodes.iter().any(|n| n.id == id && n.status != "left");
                        if voter && active {
                            self.trace.push(format_args!("n{id} joined: voter and registered"));
                            return;
                        }
                        format!("leader n{leader}: n{id} voter {voter}, registered {active}")
                    }
                },
            };
            assert!(madsim::time::Instant::now() < deadline, "n{id} did not join within {timeout:?}: {why}");
            madsim::time::sleep(POLL).await;
        }
    }

    /// The shape the cluster was started with.
    pub fn config(&self) -> &SimConfig {
        &self.config
    }

    pub fn ids(&self) -> Vec<NodeId> {
        self.nodes.iter().map(|n| n.id).collect()
    }

    pub fn up_nodes(&self) -> Vec<NodeId> {
        self.nodes.iter().filter(|n| n.up).map(|n| n.id).collect()
    }

    pub fn down_nodes(&self) -> Vec<NodeId> {
        self.nodes.iter().filter(|n| !n.up).map(|n| n.id).collect()
    }

    /// Node `id`'s simulated hypervisor (faults, crashes, what it runs).
    pub fn host(&self, id: NodeId) -> &Arc<SimHost> {
        &self.node(id).host
    }

    pub fn world(&self) -> &Arc<SimWorld> {
        &self.world
    }

    fn node(&self, id: NodeId) -> &SimNode {
        &self.nodes[(id - 1) as usize]
    }

    fn node_mut(&mut self, id: NodeId) -> &mut SimNode {
        &mut self.nodes[(id - 1) as usize]
    }

    /// Up to which log index node `id` has purged its log (read from the
    /// running node itself: the API does not expose it).
    pub fn purged_index(&self, id: NodeId) -> Option<u64> {
        let shared = self.node(id).live.lock().unwrap().upgrade()?;
        let purged = shared.raft.metrics().borrow().purged;
        purged.map(|l| l.index)
    }

    /// Node `id`'s Raft as it sees itself; `None` while it is down.
    pub fn raft_view(&self, id: NodeId) -> Option<RaftView> {
        let shared = self.node(id).live.lock().unwrap().upgrade()?;
        Some(raft_view(&shared))
    }

    /// The client node, to spawn concurrent client calls on (e.g.
    /// [`write_call`]).
    pub fn client(&self) -> &NodeHandle {
        &self.client
    }

    /// Starts sampling every node's role, term and leader (see [`RoleWatch`]).
    pub fn watch_roles(&self) -> RoleWatch {
        let lives: Vec<(NodeId, Arc<Mutex<Weak<NodeShared>>>)> =
            self.nodes.iter().map(|n| (n.id, n.live.clone())).collect();
        let changes = Arc::new(Mutex::new(Vec::new()));
        let out = changes.clone();
        let start = madsim::time::Instant::now();
        let task = madsim::task::spawn(async move {
            let mut last: BTreeMap<NodeId, (Option<&'static str>, u64, Option<NodeId>)> = BTreeMap::new();
            loop {
                for (id, live) in &lives {
                    let shared = live.lock().unwrap().upgrade();
                    let now = match shared {
                        Some(s) => {
                            let v = raft_view(&s);
                            (Some(v.state), v.term, v.leader)
                        }
                        None => (None, last.get(id).map(|l| l.1).unwrap_or(0), None),
                    };
                    if last.get(id) != Some(&now) {
                        last.insert(*id, now);
                        out.lock().unwrap().push(RoleChange {
                            at: start.elapsed(),
                            node: *id,
                            state: now.0,
                            term: now.1,
                            leader: now.2,
                        });
                    }
                }
                madsim::time::sleep(RoleWatch::EVERY).await;
            }
        });
        RoleWatch { start, changes, task }
    }

    // ------------------------------------------------------------ faults

    /// Clogs the link from node `from` to node `to` (one direction): what
    /// is sent on an open connection waits until the link is unclogged (as
    /// TCP retransmits), new connections are refused.
    pub fn clog_link(&mut self, from: NodeId, to: NodeId) {
        NetSim::current().clog_link(self.node(from).handle.id(), self.node(to).handle.id());
        self.clogged_links.insert((from, to));
        self.trace.push(format_args!("clog n{from}->n{to}"));
    }

    pub fn unclog_link(&mut self, from: NodeId, to: NodeId) {
        NetSim::current().unclog_link(self.node(from).handle.id(), self.node(to).handle.id());
        self.clogged_links.remove(&(from, to));
        self.trace.push(format_args!("unclog n{from}->n{to}"));
    }

    /// Cuts the network between the groups (both directions between every
    /// pair of nodes in different groups); the client still reaches all.
    pub fn partition(&mut self, groups: &[Vec<NodeId>]) {
        self.trace.push(format_args!("partition {groups:?}"));
        for (i, a) in groups.iter().enumerate() {
            for b in groups.iter().skip(i + 1) {
                for &x in a {
                    for &y in b {
                        self.clog_link(x, y);
                        self.clog_link(y, x);
                    }
                }
            }
        }
    }

    /// Cuts node `id` off from every other node and the client.
    pub fn isolate(&mut self, id: NodeId) {
        NetSim::current().clog_node(self.node(id).handle.id());
        self.isolated.insert(id);
        self.trace.push(format_args!("isolate n{id}"));
    }

    /// Freezes every task of node `id` (a stopped process, a long GC
    /// pause); the network still accepts connections to it.
    pub fn pause(&mut self, id: NodeId) {
        Handle::current().pause(self.node(id).handle.id());
        self.paused.insert(id);
        self.trace.push(format_args!("pause n{id}"));
    }

    pub fn resume(&mut self, id: NodeId) {
        Handle::current().resume(self.node(id).handle.id());
        self.paused.remove(&id);
        self.trace.push(format_args!("resume n{id}"));
    }

    /// Up nodes a client can talk to: not cut off, not paused.
    pub fn reachable_nodes(&self) -> Vec<NodeId> {
        self.up_nodes()
            .into_iter()
            .filter(|id| !self.isolated.contains(id) && !self.paused.contains(id))
            .collect()
    }

    /// Whether a network fault or a pause is in force.
    pub fn faulted(&self) -> bool {
        !self.clogged_links.is_empty() || !self.isolated.is_empty() || !self.paused.is_empty()
    }

    /// Lifts every network fault and resumes every paused node.
    pub fn heal(&mut self) {
        for (from, to) in std::mem::take(&mut self.clogged_links) {
            NetSim::current().unclog_link(self.node(from).handle.id(), self.node(to).handle.id());
        }
        for id in std::mem::take(&mut self.isolated) {
            NetSim::current().unclog_node(self.node(id).handle.id());
        }
        for id in std::mem::take(&mut self.paused) {
            Handle::current().resume(self.node(id).handle.id());
        }
        self.trace.push("heal");
    }

    /// Kills node `id` like a power cut: every task is dropped mid-flight;
    /// what reached its data dir stays.
    pub fn kill(&mut self, id: NodeId) {
        assert!(self.node(id).up, "n{id} is already down");
        Handle::current().kill(self.node(id).handle.id());
        self.node_mut(id).up = false;
        self.trace.push(format_args!("kill n{id}"));
    }

    /// Starts node `id` again from its own data dir.
    pub async fn restart(&mut self, id: NodeId) {
        assert!(!self.node(id).up, "n{id} is running");
        // madsim drops a killed node's tasks when the executor next runs
        // them, not inside `kill`. Until then the old node still holds its
        // redb files (a real process would have released them on death). The
        // executor drains every ready task before it advances the clock, so
        // one virtual millisecond is enough for them all to go.
        madsim::time::sleep(Duration::from_millis(1)).await;
        assert_eq!(
            self.node(id).live.lock().unwrap().strong_count(),
            0,
            "n{id} outlived its killed tasks: something outside the node holds it"
        );
        Handle::current().restart(self.node(id).handle.id());
        self.node_mut(id).up = true;
        self.trace.push(format_args!("restart n{id}"));
    }

    // ------------------------------------------------------------ client API

    /// Runs one client call on the client node, so that it reaches the nodes
    /// over the simulated network from the client's own address.
    async fn on_client<T: Send + 'static>(&self, call: impl Future<Output = T> + Send + 'static) -> T {
        self.client.spawn(call).await.expect("client task failed")
    }

    pub async fn status(&self, id: NodeId, include_digest: bool) -> Result<pb::StatusResponse, Status> {
        self.on_client(async move {
            let mut c = ClusterServiceClient::new(connect(id).await?);
            let req = request(pb::StatusRequest { include_digest, include_heartbeats: false }, READ_TIMEOUT);
            Ok(c.status(req).await?.into_inner())
        })
        .await
    }

    /// Every VM as node `id` has applied it (no read barrier): what that
    /// replica holds, not what the leader would answer.
    pub async fn list_vms_stale(&self, id: NodeId) -> Result<Vec<pb::Vm>, Status> {
        self.on_client(async move {
            let mut c = VmServiceClient::new(connect(id).await?);
            let req = request(
                pb::ListVmsRequest { consistency: pb::Consistency::Stale as i32, node_id: 0 },
                READ_TIMEOUT,
            );
            Ok(c.list_vms(req).await?.into_inner().vms)
        })
        .await
    }

    /// One create request, as the client node runs it.
    async fn create_call(req: CreateReq) -> Outcome<CreateReply> {
        let r: Result<CreateReply, Status> = async {
            let mut c = VmServiceClient::new(connect(req.via).await?);
            if req.batch {
                let msg = pb::CreateVmsRequest { vms: req.vms, queue: req.queue, ..Default::default() };
                return Ok(CreateReply::Many(c.create_vms(request(msg, WRITE_TIMEOUT)).await?.into_inner()));
            }
            let vm = req.vms.into_iter().next().ok_or_else(|| Status::internal("a create without a VM"))?;
            let msg = pb::CreateVmRequest {
                name: vm.name,
                spec: vm.spec,
                placement: vm.placement,
                queue: req.queue,
                ..Default::default()
            };
            let reply = c.create_vm(request(msg, WRITE_TIMEOUT)).await?.into_inner();
            if reply.vm.is_none() {
                return Err(Status::internal("reply without a VM"));
            }
            Ok(CreateReply::One(Box::new(reply)))
        }
        .await;
        Outcome::from_result(r)
    }

    /// Sends create requests concurrently, then records every outcome in
    /// `model` and the trace, in request order. With `fault = Some((after,
    /// id))`, node `id` is killed `after` into the flight of the requests,
    /// so some of them lose their answer. Returns how many VMs were
    /// acknowledged.
    pub async fn create_requests(
        &mut self,
        model: &mut Model,
        reqs: Vec<CreateReq>,
        fault: Option<(Duration, NodeId)>,
    ) -> usize {
        let ids = self.ids();
        for req in &reqs {
            model.ask(req);
        }
        let calls: Vec<_> =
            reqs.iter().map(|req| self.client.spawn(Self::create_call(req.clone()))).collect();
        if let Some((after, id)) = fault {
            madsim::time::sleep(after).await;
            self.kill(id);
        }
        let mut acked = 0;
        for (req, call) in reqs.iter().zip(calls) {
            let outcome = call.await.expect("client task failed");
            let unknown_pin = req.vms.iter().position(|v| {
                v.placement.as_ref().is_some_and(|p| p.node_id != 0 && !ids.contains(&p.node_id))
            });
            tracing::debug!(target: "blixard_sim::reply", "{req:?} -> {outcome:?}");
            let detail = model.record_request(req, unknown_pin, &outcome);
            let what = match (req.batch, req.queue) {
                (false, false) => "create",
                (false, true) => "create --queue",
                (true, false) => "create-batch",
                (true, true) => "create-batch --queue",
            };
            self.trace.push(format_args!(
                "{what} {} via n{} -> {} {detail}",
                req.names().join(","),
                req.via,
                outcome.label()
            ));
            if outcome.is_acked() {
                acked += req.vms.len();
            }
        }
        acked
    }

    /// Creates VMs (without placement rules) concurrently, each through the
    /// node named with it; see [`SimCluster::create_requests`].
    pub async fn create_vms(
        &mut self,
        model: &mut Model,
        reqs: Vec<(NodeId, String, pb::VmSpec)>,
        fault: Option<(Duration, NodeId)>,
    ) -> usize {
        let reqs = reqs.into_iter().map(|(via, name, spec)| CreateReq::plain(via, name, spec)).collect();
        self.create_requests(model, reqs, fault).await
    }

    /// Creates one VM through `via`; returns whether it was acknowledged.
    pub async fn create_vm(
        &mut self,
        model: &mut Model,
        via: NodeId,
        name: String,
        spec: pb::VmSpec,
    ) -> bool {
        self.create_vms(model, vec![(via, name, spec)], None).await == 1
    }

    /// Deletes the live VM `name` through `via` and records the outcome.
    pub async fn delete_vm(&mut self, model: &mut Model, via: NodeId, name: String) {
        let n = name.clone();
        let outcome = self
            .on_client(async move {
                let r = async {
                    let mut c = VmServiceClient::new(connect(via).await?);
                    c.delete_vm(request(
                        pb::DeleteVmRequest { name: n, request_id: String::new() },
                        WRITE_TIMEOUT,
                    ))
                    .await
                    .map(|_| ())
                }
                .await;
                Outcome::from_result(r)
            })
            .await;
        self.trace.push(format_args!("delete {name} via n{via} -> {}", outcome.label()));
        model.record_delete(&name, &outcome);
    }

    /// An operator change under `request_id`, sent through random running
    /// nodes until its outcome is definite (an unknown outcome is retried
    /// under the same id; a rejection for want of a leader under a fresh
    /// one) or [`ADMIN_GIVE_UP`] has passed. Records what it did in `model`
    /// (quota knowledge, `node set` outcomes) and the trace. Refusals that
    /// are legitimate: `node set` breaking a placed VM's constraint or
    /// below what its VMs hold, deleting a quota that is not there.
    pub async fn admin(&mut self, model: &mut Model, change: Admin, request_id: &str) -> Told {
        use madsim::rand::Rng;
        let start = madsim::time::Instant::now();
        let mut id = request_id.to_string();
        let mut tries = 0;
        let told = loop {
            tries += 1;
            let up = self.up_nodes();
            let via = up[madsim::rand::thread_rng().gen_range(0..up.len())];
            let call = admin_call(via, change.clone(), id.clone());
            let told = Told::from_result(self.on_client(call).await);
            let more = start.elapsed() < ADMIN_GIVE_UP;
            match told {
                Told::Unknown(_) if more => {}
                t if t.is_transient_rejection() && more => id = format!("{request_id}-again{tries}"),
                t => break t,
            }
            let pause = madsim::rand::thread_rng().gen_range(50..500);
            madsim::time::sleep(Duration::from_millis(pause)).await;
        };
        self.trace.push(format_args!("{change:?} [{id}] -> {} ({tries} tries)", told.label()));
        if let Told::Unlabelled(s) = &told {
            panic!("{change:?}: a write error without outcome: {s:?}");
        }
        if told.is_transient_rejection() {
            // Given up while no leader took it: it did not apply.
            return told;
        }
        match &change {
            Admin::SetQuota { tenant, limits } => model.record_set_quota(tenant, *limits, &told),
            Admin::DeleteQuota { tenant } => model.record_delete_quota(tenant, &told),
            Admin::SetNode { .. } => match &told {
                Told::Applied(_) => model.counts.node_set += 1,
                Told::Rejected(s)
                    if s.code() == tonic::Code::FailedPrecondition
                        && s.message().contains("would break VM") =>
                {
                    model.counts.breaks_constraint += 1
                }
                Told::Rejected(s)
                    if s.code() == tonic::Code::FailedPrecondition
                        && s.message().contains("less than its VMs already hold") =>
                {
                    model.counts.below_allocated += 1
                }
                Told::Rejected(s) => panic!("{change:?}: rejected {:?}: {}", s.code(), s.message()),
                _ => {}
            },
            Admin::SetScheduler { .. }
            | Admin::SetNodeTimeout { .. }
            | Admin::Drain { .. }
            | Admin::Eligible { .. } => {
                if let Told::Rejected(s) = &told {
                    panic!("{change:?}: rejected {:?}: {}", s.code(), s.message());
                }
            }
            // A VM that cannot move now (not placed, already leaving, no
            // room elsewhere, deleted): refused with the reason.
            Admin::Migrate { .. } => match &told {
                Told::Rejected(s)
                    if matches!(s.code(), tonic::Code::FailedPrecondition | tonic::Code::NotFound) => {}
                Told::Rejected(s) => panic!("{change:?}: rejected {:?}: {}", s.code(), s.message()),
                _ => {}
            },
        }
        told
    }

    /// Starts, stops or restarts `name` through `via`; records the request
    /// and its verdict in the trace.
    pub async fn vm_op(&mut self, via: NodeId, name: String, op: VmOp) -> Outcome<pb::Vm> {
        let n = name.clone();
        let outcome = self
            .on_client(async move {
                let r: Result<pb::Vm, Status> = async {
                    let mut c = VmServiceClient::new(connect(via).await?);
                    let req =
                        request(pb::VmNameRequest { name: n, request_id: String::new() }, WRITE_TIMEOUT);
                    let reply = match op {
                        VmOp::Start => c.start_vm(req).await?,
                        VmOp::Stop => c.stop_vm(req).await?,
                        VmOp::Restart => c.restart_vm(req).await?,
                    };
                    reply.into_inner().vm.ok_or_else(|| Status::internal("reply without a VM"))
                }
                .await;
                Outcome::from_result(r)
            })
            .await;
        self.trace.push(format_args!("{} {name} via n{via} -> {}", op.as_str(), outcome.label()));
        outcome
    }

    /// One write under `request_id` through `via` with the client deadline
    /// `timeout`; records what the client was told in the trace.
    pub async fn write_id(&mut self, via: NodeId, write: Write, request_id: &str, timeout: Duration) -> Told {
        let label = format!("{} {} [{request_id}] via n{via}", write.verb(), write.name());
        let rid = request_id.to_string();
        let told = Told::from_reply(self.on_client(write_call(via, write, rid, timeout)).await);
        self.trace.push(format_args!("{label} -> {}", told.label()));
        told
    }

    /// One VM, read linearizably through `via`.
    pub async fn get_vm(&self, via: NodeId, name: String) -> Result<pb::Vm, Status> {
        self.on_client(async move {
            let mut c = VmServiceClient::new(connect(via).await?);
            let req = request(
                pb::GetVmRequest { name, consistency: pb::Consistency::Linearizable as i32 },
                READ_TIMEOUT,
            );
            c.get_vm(req).await?.into_inner().vm.ok_or_else(|| Status::internal("reply without a VM"))
        })
        .await
    }

    // ------------------------------------------------------------ waits

    /// The node that reports itself leader with the highest term, among the
    /// running nodes.
    pub async fn leader(&self) -> Option<(NodeId, u64)> {
        let mut best: Option<(NodeId, u64)> = None;
        for id in self.up_nodes() {
            if let Ok(s) = self.status(id, false).await {
                if s.state == "leader" && best.is_none_or(|(_, term)| s.term > term) {
                    best = Some((id, s.term));
                }
            }
        }
        best
    }

    /// The running node whose Raft says it leads, with the highest term, read
    /// from the nodes' memory (works while nodes are cut off or paused).
    pub fn leader_view(&self) -> Option<(NodeId, u64)> {
        self.up_nodes()
            .into_iter()
            .filter_map(|id| self.raft_view(id).filter(|v| v.state == "leader").map(|v| (id, v.term)))
            .max_by_key(|(_, term)| *term)
    }

    /// Waits until node `id` has applied log index `index`; returns how long
    /// that took, or says how far it got by `timeout`.
    pub async fn wait_applied(&self, id: NodeId, index: u64, timeout: Duration) -> Result<Duration, String> {
        let start = madsim::time::Instant::now();
        loop {
            let applied = self.raft_view(id).map(|v| v.applied).unwrap_or(0);
            if applied >= index {
                return Ok(start.elapsed());
            }
            if start.elapsed() >= timeout {
                return Err(format!("n{id} applied {applied} of {index} after {timeout:?}"));
            }
            madsim::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Waits until every node is a voter under one leader and every node has
    /// registered its capacity, i.e. the cluster is ready for VMs.
    pub async fn wait_ready(&mut self, timeout: Duration) -> NodeId {
        let deadline = madsim::time::Instant::now() + timeout;
        let n = self.nodes.len();
        loop {
            let mut why = String::new();
            match self.leader().await {
                None => why.push_str("no leader"),
                Some((leader, term)) => match self.status(leader, false).await {
                    Err(e) => why = format!("leader n{leader} unreachable: {e}"),
                    Ok(s) => {
                        let voters = s.members.iter().filter(|m| m.role != "learner").count();
                        let active = s.nodes.iter().filter(|x| x.status != "left").count();
                        if voters == n && active == n {
                            self.trace.push(format_args!("ready: leader n{leader} term {term}"));
                            return leader;
                        }
                        why = format!("leader n{leader}: {voters} voters, {active} registered nodes");
                    }
                },
            }
            assert!(madsim::time::Instant::now() < deadline, "cluster not ready after {timeout:?}: {why}");
            madsim::time::sleep(POLL).await;
        }
    }

    /// Waits until all nodes run, agree on one leader and have applied
    /// everything the leader committed.
    pub async fn wait_converged(&mut self, timeout: Duration) -> Converged {
        assert!(self.down_nodes().is_empty(), "restart every node before waiting for convergence");
        let deadline = madsim::time::Instant::now() + timeout;
        loop {
            let why = match self.converged_once().await {
                Ok(c) => {
                    let leader = c.statuses.iter().find(|s| s.node_id == c.leader).expect("leader status");
                    self.trace.push(format_args!(
                        "converged: leader n{} term {} commit {}",
                        c.leader, leader.term, leader.commit_index
                    ));
                    return c;
                }
                Err(why) => why,
            };
            assert!(
                madsim::time::Instant::now() < deadline,
                "cluster did not converge within {timeout:?}: {why}"
            );
            madsim::time::sleep(POLL).await;
        }
    }

    async fn converged_once(&self) -> Result<Converged, String> {
        let mut statuses = Vec::new();
        for id in self.ids() {
            statuses.push(self.status(id, true).await.map_err(|e| format!("n{id}: {e}"))?);
        }
        let leaders: Vec<&pb::StatusResponse> = statuses.iter().filter(|s| s.state == "leader").collect();
        let [leader] = leaders.as_slice() else {
            return Err(format!("{} nodes think they lead", leaders.len()));
        };
        let commit = leader.commit_index;
        for s in &statuses {
            if s.leader_id != leader.node_id {
                return Err(format!("n{} follows n{}, not n{}", s.node_id, s.leader_id, leader.node_id));
            }
            if s.applied_index != commit {
                return Err(format!("n{} applied {} of {commit}", s.node_id, s.applied_index));
            }
        }
        Ok(Converged { leader: leader.node_id, statuses })
    }

    // ------------------------------------------------------------ checks

    /// Waits for convergence and reads every node's VM list. With VM
    /// backends, the reconcilers keep committing status reports while VMs
    /// start or stop, so this also waits until no VM is in a transitional
    /// state and every node lists the same VMs (at one applied index).
    async fn wait_settled(&mut self, timeout: Duration) -> (Converged, Vec<(NodeId, Vec<pb::Vm>)>) {
        let deadline = madsim::time::Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(madsim::time::Instant::now());
            let converged = self.wait_converged(left.max(POLL)).await;
            let mut lists = Vec::new();
            for id in self.ids() {
                let vms = self.list_vms_stale(id).await.unwrap_or_else(|e| panic!("list VMs on n{id}: {e}"));
                lists.push((id, vms));
            }
            // Evicted VMs wait until the node they left reports them
            // stopped (its reconciler, or at once without a VM backend).
            let backends = self.config.vm_backends;
            let moving: Vec<String> = lists[0]
                .1
                .iter()
                .filter(|v| {
                    v.leaving_node != 0
                        || (backends && matches!(v.observed.as_str(), "pending" | "starting" | "stopping"))
                })
                .map(|v| format!("{} {} on n{} (leaving n{})", v.name, v.observed, v.node_id, v.leaving_node))
                .collect();
            // Every node is up by now: once its heartbeats reach the leader,
            // none is marked down.
            let down: Vec<NodeId> = converged
                .statuses
                .iter()
                .flat_map(|s| s.nodes.iter().filter(|n| n.status == "down").map(|n| n.id))
                .collect();
            let why = match lists_differ(&lists) {
                Some(why) => why,
                None if !down.is_empty() => format!("nodes still marked down: {down:?}"),
                None if moving.is_empty() => return (converged, lists),
                None => format!("VMs still moving: {moving:?}"),
            };
            assert!(madsim::time::Instant::now() < deadline, "VMs did not settle within {timeout:?}: {why}");
            madsim::time::sleep(POLL).await;
        }
    }

    /// Restarts every stopped node, waits for convergence and asserts that
    /// all replicas hold the same state, that it matches what the client was
    /// told, and that the state's invariants hold on every node. Returns the
    /// common state digest.
    pub async fn check_final_state(&mut self, model: &Model, timeout: Duration) -> u64 {
        for id in self.down_nodes() {
            self.restart(id).await;
        }
        let (mut converged, mut lists) = self.wait_settled(timeout).await;

        // (1) Identical state everywhere: digests over the canonical state
        // image, and the full VM lists (which say *what* differs if not).
        // A status reads the applied index and computes the digest at two
        // moments, and an entry may apply in between (a status report, a
        // liveness change): a mismatch counts only if it persists.
        let mut digests: Vec<(u64, u64)> =
            converged.statuses.iter().map(|s| (s.node_id, s.state_digest)).collect();
        for _ in 0..3 {
            if digests.iter().all(|(_, d)| *d == digests[0].1) {
                break;
            }
            self.trace.push(format_args!("digests differ, looking again: {digests:?}"));
            madsim::time::sleep(Duration::from_secs(1)).await;
            (converged, lists) = self.wait_settled(timeout).await;
            digests = converged.statuses.iter().map(|s| (s.node_id, s.state_digest)).collect();
        }
        let reference = &lists[0].1;
        if let Some(why) = lists_differ(&lists) {
            panic!("{why}");
        }
        if digests.iter().any(|(_, d)| *d != digests[0].1) {
            panic!("state digests differ at equal applied index: {digests:?}: {}", self.image_diff());
        }

        // (2) The client's view: acknowledged writes are all there.
        for (id, vms) in &lists {
            if let Err(e) = model.check(*id, vms) {
                panic!("{e}");
            }
        }

        // (3) Invariants, checked inside each node on its real state
        // (indices consistent with the tables, no over-commitment) ...
        for node in &self.nodes {
            let shared = node.live.lock().unwrap().upgrade();
            let shared = shared.unwrap_or_else(|| panic!("n{} is up but its node is not running", node.id));
            if let Err(e) = shared.state.check_invariants() {
                panic!("n{}: state invariant violated: {e}", node.id);
            }
        }
        // ... and as a client sees them, on every node from its own status
        // and VM list: allocation is the sum of the node's VMs and within
        // its allocatable resources in every dimension, placed VMs keep
        // their rules, no queued VM fits anywhere ...
        for (status, (id, vms)) in converged.statuses.iter().zip(&lists) {
            if let Err(e) = check_allocation_and_placement(&status.nodes, vms) {
                panic!("n{id}: {e}");
            }
        }
        // ... and quotas: as set, usage as the VMs sum, never exceeded.
        for (id, vms) in &lists {
            let quotas = self.list_quotas(*id).await.unwrap_or_else(|e| panic!("list quotas on n{id}: {e}"));
            if let Err(e) = model.check_quotas(*id, &quotas, vms) {
                panic!("{e}");
            }
        }

        // (4) No VM ever ran on two hosts at once.
        let violations = self.world.violations();
        assert!(violations.is_empty(), "a VM ran on two hosts at once: {violations:#?}");

        // (5) The change feed, followed through every fault, rebuilds the
        // VMs exactly.
        self.check_watch_feed(timeout).await;

        let digest = digests[0].1;
        for s in &converged.statuses {
            self.trace.push(format_args!(
                "n{}: {} term {} applied {} snapshot {} vms {}",
                s.node_id, s.state, s.term, s.applied_index, s.snapshot_index, s.vm_count
            ));
        }
        // What the run exercised, also as figures (summed over seeds by
        // the scenarios that require every outcome somewhere).
        let queued_at_end = reference.iter().filter(|v| v.node_id == 0 && v.desired == "running").count();
        let evicted_at_end = reference.iter().filter(|v| !v.preempted_by.is_empty()).count();
        let drained = reference
            .iter()
            .filter(|v| v.node_id != 0 && model.asked.get(&v.name).is_some_and(|a| a.queued_at_create))
            .count();
        for (name, value) in model.counts.fields() {
            self.trace.figure(name, value as f64);
        }
        self.trace.figure("queued_at_end", queued_at_end as f64);
        self.trace.figure("evicted_at_end", evicted_at_end as f64);
        self.trace.figure("drained", drained as f64);
        self.trace.push(format_args!(
            "final: {} live, {} deleted, {} uncertain, {} refused for capacity; {}; at the end {queued_at_end} \
             queued, {evicted_at_end} evicted, {drained} queued by their create now placed; digest {digest:016x}",
            model.live.len(),
            model.deleted.len(),
            model.uncertain.len(),
            model.full,
            model.counts,
        ));
        self.trace.final_digest = Some(digest);
        digest
    }

    /// The watcher saw every revision once, in order, and the VMs it
    /// rebuilt from the events up to some revision R equal what a node
    /// lists at R (R pinned by reading the node's revision before and after
    /// its list).
    async fn check_watch_feed(&mut self, timeout: Duration) {
        let deadline = madsim::time::Instant::now() + timeout;
        let id = self.ids()[0];
        let mut last_why = String::new();
        loop {
            if let Some(v) = &self.watch.lock().unwrap().violation {
                panic!("change feed: {v}");
            }
            let before = self.status(id, false).await.map(|s| s.revision);
            let list = self.list_vms_stale(id).await;
            let after = self.status(id, false).await.map(|s| s.revision);
            if let (Ok(r), Ok(vms), Ok(r2)) = (before, list, after) {
                if r == r2 {
                    let listed: BTreeMap<String, pb::Vm> =
                        vms.into_iter().map(|v| (v.name.clone(), v)).collect();
                    let log = self.watch.lock().unwrap();
                    match log.rebuild(r) {
                        Some(rebuilt) if rebuilt == listed => {
                            let (streams, compacted, relists, received) =
                                (log.streams, log.compacted, log.relists, log.received());
                            drop(log);
                            self.trace.push(format_args!(
                                "change feed: rebuilt {} VMs at revision {r} from {received} revisions over                                  {streams} streams ({compacted} compacted refusals, {relists} re-lists)",
                                listed.len()
                            ));
                            self.trace.figure("watch_streams", streams as f64);
                            return;
                        }
                        Some(rebuilt) => {
                            let differ: Vec<&String> = listed
                                .keys()
                                .chain(rebuilt.keys())
                                .collect::<BTreeSet<_>>()
                                .into_iter()
                                .filter(|k| listed.get(*k) != rebuilt.get(*k))
                                .take(5)
                                .collect();
                            last_why = format!(
                                "at revision {r} the events (last {}) rebuild {} VMs, n{id} lists {}; differing: {differ:?}{}",
                                log.last(),
                                rebuilt.len(),
                                listed.len(),
                                differ
                                    .first()
                                    .map(|k| format!(" e.g. {k}: events {:?} vs list {:?}", rebuilt.get(*k), listed.get(*k)))
                                    .unwrap_or_default()
                            );
                        }
                        None => last_why = format!("the watcher re-listed past revision {r}"),
                    }
                }
            }
            assert!(madsim::time::Instant::now() < deadline, "change feed: {last_why}");
            madsim::time::sleep(POLL).await;
        }
    }

    /// Which part of the state image differs between node 1 and the others
    /// (read from the running nodes themselves), for a failure message.
    fn image_diff(&self) -> String {
        let images: Vec<(NodeId, blixard_core::state::StateImage)> = self
            .nodes
            .iter()
            .filter_map(|n| Some((n.id, n.live.lock().unwrap().upgrade()?.state.image())))
            .collect();
        let Some((first, reference)) = images.first() else { return "no node runs".into() };
        let mut out = Vec::new();
        for (id, image) in &images[1..] {
            for (a, b) in reference.nodes.iter().zip(&image.nodes) {
                if a != b {
                    out.push(format!("node record: n{first} has {a:?}, n{id} has {b:?}"));
                }
            }
            for (a, b) in reference.vms.iter().zip(&image.vms) {
                if a != b {
                    out.push(format!("VM record: n{first} has {a:?}, n{id} has {b:?}"));
                }
            }
            if reference.requests != image.requests {
                let first_diff = reference.requests.iter().zip(&image.requests).find(|(a, b)| a != b);
                out.push(format!(
                    "dedup window: {} vs {} entries, first difference {first_diff:?}",
                    reference.requests.len(),
                    image.requests.len()
                ));
            }
            if (&reference.quotas, reference.scheduler, reference.node_timeout_ms)
                != (&image.quotas, image.scheduler, image.node_timeout_ms)
            {
                out.push(format!("settings differ on n{id}"));
            }
        }
        out.join("\n")
    }

    /// Every quota with its usage, read linearizably through node `id`.
    pub async fn list_quotas(&self, id: NodeId) -> Result<Vec<pb::Quota>, Status> {
        self.on_client(async move {
            let mut c = ClusterServiceClient::new(connect(id).await?);
            Ok(c.list_quotas(request(pb::ListQuotasRequest {}, READ_TIMEOUT)).await?.into_inner().quotas)
        })
        .await
    }
}

/// Whether a constraint (`K=V` or `K!=V`) holds on `labels`, read the way
/// an operator reads it (independently of the scheduler's own code).
fn constraint_holds(constraint: &str, labels: &std::collections::HashMap<String, String>) -> bool {
    match constraint.split_once("!=") {
        Some((k, v)) => labels.get(k).map(String::as_str) != Some(v),
        None => {
            let (k, v) = constraint.split_once('=').unwrap_or((constraint, ""));
            labels.get(k).map(String::as_str) == Some(v)
        }
    }
}

/// The placement facts a client can check from one node's status (`nodes`)
/// and VM list: each node's allocation is the sum of its VMs and fits its
/// allocatable resources in every dimension; every VM placed on an active
/// node is on its pinned node, meets its constraints there, and is the only
/// VM of its anti-affinity group there; no VM waiting in the queue fits on
/// any active node (pin, constraints, group, free resources in every
/// dimension, and its host ports free there).
pub fn check_allocation_and_placement(nodes: &[pb::NodeInfo], vms: &[pb::Vm]) -> Result<(), String> {
    let mut groups: BTreeMap<(&str, NodeId), &str> = BTreeMap::new();
    for n in nodes {
        let allocated = n.allocated.unwrap_or_default();
        // Allocatable: (capacity - reserved) x the node's overcommit.
        let allocatable = n.allocatable.or(n.capacity).unwrap_or_default();
        let mut sum = pb::Resources::default();
        for vm in vms.iter().filter(|v| v.node_id == n.id) {
            let spec = vm.spec.clone().unwrap_or_default();
            sum.vcpus += spec.vcpus;
            sum.memory_mb += spec.memory_mb;
            sum.disk_gb += spec.disk_gb;
        }
        if allocated != sum {
            return Err(format!("n{} allocated {allocated:?}, its VMs sum to {sum:?}", n.id));
        }
        if allocated.vcpus > allocatable.vcpus
            || allocated.memory_mb > allocatable.memory_mb
            || allocated.disk_gb > allocatable.disk_gb
        {
            return Err(format!("n{} over-committed: {allocated:?} of {allocatable:?}", n.id));
        }
    }
    let active: BTreeMap<NodeId, &pb::NodeInfo> =
        nodes.iter().filter(|n| n.status != "left").map(|n| (n.id, n)).collect();
    let none = pb::Placement::default();
    for vm in vms.iter().filter(|v| v.node_id != 0) {
        let p = vm.placement.as_ref().unwrap_or(&none);
        if !p.anti_affinity.is_empty() {
            if let Some(other) = groups.insert((&p.anti_affinity, vm.node_id), &vm.name) {
                return Err(format!(
                    "{} and {other} of anti-affinity group {} share n{}",
                    vm.name, p.anti_affinity, vm.node_id
                ));
            }
        }
        let Some(n) = active.get(&vm.node_id) else { continue };
        if p.node_id != 0 && p.node_id != vm.node_id {
            return Err(format!("{} is pinned to n{} but placed on n{}", vm.name, p.node_id, vm.node_id));
        }
        if let Some(c) = p.constraints.iter().find(|c| !constraint_holds(c, &n.labels)) {
            return Err(format!(
                "{} on n{} breaks its constraint {c} (labels {:?})",
                vm.name, n.id, n.labels
            ));
        }
    }
    // A VM evicted from a node waits (outside the queue) until that node
    // reports it stopped; by the end of a run every node is up and has
    // reported, so none may still wait.
    if let Some(vm) = vms.iter().find(|v| v.leaving_node != 0) {
        return Err(format!(
            "{} still waits for n{} to stop it (on node {})",
            vm.name, vm.leaving_node, vm.node_id
        ));
    }
    // Host ports taken per node (by the VMs it holds: placed there, or
    // leaving it).
    let host_port = |p: &String| p.split(':').next().unwrap_or_default().to_string();
    let mut taken: BTreeSet<(NodeId, String)> = BTreeSet::new();
    for vm in vms {
        let holder = if vm.node_id != 0 { vm.node_id } else { vm.leaving_node };
        if holder != 0 {
            taken.extend(vm.publish.iter().map(|p| (holder, host_port(p))));
        }
    }
    for vm in vms.iter().filter(|v| v.node_id == 0 && v.desired == "running") {
        let p = vm.placement.clone().unwrap_or_default();
        let need = vm.spec.clone().unwrap_or_default();
        // Only ready nodes take placements (not down, not draining).
        for n in active.values().filter(|n| n.status == "ready") {
            let allocated = n.allocated.unwrap_or_default();
            let allocatable = n.allocatable.or(n.capacity).unwrap_or_default();
            let fits = (p.node_id == 0 || p.node_id == n.id)
                && p.constraints.iter().all(|c| constraint_holds(c, &n.labels))
                && (p.anti_affinity.is_empty() || !groups.contains_key(&(p.anti_affinity.as_str(), n.id)))
                && allocated.vcpus + need.vcpus <= allocatable.vcpus
                && allocated.memory_mb + need.memory_mb <= allocatable.memory_mb
                && allocated.disk_gb + need.disk_gb <= allocatable.disk_gb
                && vm.publish.iter().all(|port| !taken.contains(&(n.id, host_port(port))));
            if fits {
                return Err(format!(
                    "queued VM {} ({} vCPUs, {} MiB, {} GiB, {:?}) fits on n{} (labels {:?}, {allocated:?} of \
                     {allocatable:?})",
                    vm.name, need.vcpus, need.memory_mb, need.disk_gb, p, n.id, n.labels
                ));
            }
        }
    }
    Ok(())
}

/// Says how the first list that differs from node 1's differs, if one does.
fn lists_differ(lists: &[(NodeId, Vec<pb::Vm>)]) -> Option<String> {
    let (first, reference) = &lists[0];
    let names = |v: &[pb::Vm]| v.iter().map(|x| format!("{}@{}", x.name, x.revision)).collect::<Vec<_>>();
    lists[1..].iter().find(|(_, vms)| vms != reference).map(|(id, vms)| {
        format!(
            "n{id} and n{first} hold different VMs:\n  n{first}: {:?}\n  n{id}: {:?}",
            names(reference),
            names(vms)
        )
    })
}
