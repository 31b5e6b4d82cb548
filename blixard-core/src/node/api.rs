//! The public gRPC control API (ClusterService, VmService) and the server
//! that hosts it next to the internal Raft service on one listener.
//!
//! Writes go through `NodeShared::propose` (forwarded to the leader when
//! needed). Reads are linearizable unless the request asks for a stale read.
//! Membership changes must run on the leader: a follower forwards the call
//! once, marking it so that it is never forwarded again.
use std::net::SocketAddr;
use std::sync::Arc;

use blixard_proto as pb;
use blixard_proto::cluster_service_client::ClusterServiceClient;
use blixard_proto::cluster_service_server::{ClusterService, ClusterServiceServer};
use blixard_proto::raft_service_server::RaftServiceServer;
use blixard_proto::vm_service_server::{VmService, VmServiceServer};
use tokio::sync::oneshot;
use tonic::{Request, Response, Status};

use super::raft_service::RaftGrpc;
use super::{ApiError, NodeError, NodeShared};
use crate::command::{Command, CommandOutput, NewVm, RequestId};
use crate::raft::network::{PeerChannels, MAX_MESSAGE_BYTES};
use crate::types::{
    BootSpec, Constraint, NodeId, NodeRecord, Placement, QuotaLimits, Ratio, Reschedule, Resources,
    RestartPolicy, Strategy, TenantUsage, VmRecord, VmSpec, DEFAULT_PRIORITY, MAX_PRIORITY,
};

/// Marks a request a follower already forwarded to the leader.
const FORWARDED: &str = "x-blixard-forwarded";

/// Binds `bind` and serves all services until `stop` fires. Binding happens
/// before this returns, so a busy port is a startup error, not a log line.
pub async fn serve(
    shared: Arc<NodeShared>,
    bind: SocketAddr,
    stop: oneshot::Receiver<()>,
) -> Result<tokio::task::JoinHandle<()>, NodeError> {
    let router = tonic::transport::Server::builder()
        .add_service(
            RaftServiceServer::new(RaftGrpc::new(shared.clone()))
                .max_decoding_message_size(MAX_MESSAGE_BYTES)
                .max_encoding_message_size(MAX_MESSAGE_BYTES),
        )
        .add_service(
            ClusterServiceServer::new(ClusterApi { node: shared.clone() })
                .max_decoding_message_size(MAX_REQUEST_BYTES),
        )
        .add_service(
            VmServiceServer::new(VmApi { node: shared }).max_decoding_message_size(MAX_REQUEST_BYTES),
        );
    let signal = async move {
        let _ = stop.await;
    };
    #[cfg(not(madsim))]
    {
        let listener = tokio::net::TcpListener::bind(bind)
            .await
            .map_err(|source| NodeError::Bind { addr: bind, source })?;
        // Raft is request/response over small messages: Nagle's algorithm
        // with delayed ACKs would add up to 40 ms to a round trip.
        let incoming = tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true));
        Ok(tokio::spawn(async move {
            if let Err(e) = router.serve_with_incoming_shutdown(incoming, signal).await {
                tracing::error!(error = %e, "gRPC server stopped");
            }
        }))
    }
    #[cfg(madsim)]
    {
        Ok(tokio::spawn(async move {
            if let Err(e) = router.serve_with_shutdown(bind, signal).await {
                tracing::error!(error = %e, "gRPC server stopped");
            }
        }))
    }
}

/// Client requests are small; anything bigger is refused before decoding.
const MAX_REQUEST_BYTES: usize = 1024 * 1024;

fn cluster_client(
    channels: &PeerChannels,
    addr: &str,
) -> Result<ClusterServiceClient<tonic::transport::Channel>, Status> {
    Ok(ClusterServiceClient::new(
        channels.channel(addr).map_err(|e| Status::invalid_argument(e.to_string()))?,
    ))
}

/// Status of the node at `addr` (used by joining nodes to learn the cluster id).
pub async fn client_status(channels: &PeerChannels, addr: &str) -> Result<pb::StatusResponse, Status> {
    let mut c = cluster_client(channels, addr)?;
    let req = with_deadline(pb::StatusRequest { include_digest: false, include_heartbeats: false });
    Ok(c.status(req).await?.into_inner())
}

/// Asks the member at `seed` to add node `id` at `addr`.
pub async fn client_join(
    channels: &PeerChannels,
    seed: &str,
    id: NodeId,
    addr: &str,
) -> Result<pb::JoinResponse, Status> {
    let mut c = cluster_client(channels, seed)?;
    let mut req = Request::new(pb::JoinRequest { node_id: id, addr: addr.to_string() });
    req.set_timeout(std::time::Duration::from_secs(90));
    Ok(c.join(req).await?.into_inner())
}

fn with_deadline<T>(msg: T) -> Request<T> {
    let mut r = Request::new(msg);
    r.set_timeout(std::time::Duration::from_secs(10));
    r
}

pub fn member_pb(m: &super::MemberInfo) -> pb::Member {
    pb::Member { id: m.id, addr: m.addr.clone(), role: m.role.to_string() }
}

pub fn resources_pb(r: &Resources) -> pb::Resources {
    pb::Resources { vcpus: r.vcpus, memory_mb: r.memory_mb, disk_gb: r.disk_gb }
}

pub fn vm_pb(v: &VmRecord) -> pb::Vm {
    pb::Vm {
        name: v.name.to_string(),
        spec: Some(pb::VmSpec {
            vcpus: v.spec.vcpus,
            memory_mb: v.spec.memory_mb,
            disk_gb: v.spec.disk_gb,
            labels: v.spec.labels.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
            tenant: v.spec.tenant.clone(),
            restart_policy: v.spec.restart.as_str().to_string(),
            kernel: v.spec.boot.kernel.clone(),
            initrd: v.spec.boot.initrd.clone(),
            cmdline: v.spec.boot.cmdline.clone(),
        }),
        node_id: v.node_id,
        desired: v.desired.as_str().to_string(),
        observed: v.observed.as_str().to_string(),
        created_at_ms: v.created_at_ms,
        updated_at_ms: v.updated_at_ms,
        revision: v.revision,
        pid: v.runtime.pid.unwrap_or(0),
        started_at_ms: v.runtime.started_at_ms.unwrap_or(0),
        boot_ms: v.runtime.boot_ms.unwrap_or(0),
        restarts: v.runtime.restarts,
        reason: v.runtime.reason.clone(),
        generation: v.generation,
        placement: Some(placement_pb(&v.placement)),
        queued_at: v.queued_at,
        preempted_by: v.preempted_by.clone(),
        leaving_node: v.leaving,
        reschedule: v.reschedule.as_str().to_string(),
        history: v
            .history
            .iter()
            .map(|m| pb::VmMove {
                from_node: m.from,
                to_node: m.to,
                reason: m.reason.as_str().to_string(),
                at_ms: m.at_ms,
                revision: m.revision,
            })
            .collect(),
        placement_generation: v.placement_gen,
        moving_reason: v.moving.map(|m| m.reason.as_str().to_string()).unwrap_or_default(),
        moving_to: v.moving.map(|m| m.to).unwrap_or_default(),
    }
}

/// A failover policy from the API: empty is the default.
pub fn reschedule_from_pb(s: &str) -> Result<Reschedule, ApiError> {
    if s.is_empty() {
        return Ok(Reschedule::default());
    }
    Reschedule::parse(s).ok_or_else(|| {
        ApiError::Invalid(format!("invalid reschedule policy {s:?}: on-node-failure or never"))
    })
}

pub fn placement_pb(p: &Placement) -> pb::Placement {
    pb::Placement {
        node_id: p.node,
        constraints: p.constraints.iter().map(ToString::to_string).collect(),
        anti_affinity: p.anti_affinity.clone(),
        spread_by: p.spread_by.clone(),
        priority: Some(u32::from(p.priority)),
    }
}

/// A placement from the API; validated further with the command.
pub fn placement_from_pb(p: Option<pb::Placement>) -> Result<Placement, ApiError> {
    let p = p.unwrap_or_default();
    let mut constraints = Vec::with_capacity(p.constraints.len());
    for c in &p.constraints {
        constraints.push(Constraint::parse(c).ok_or_else(|| {
            ApiError::Invalid(format!("invalid constraint {c:?}: KEY=VALUE or KEY!=VALUE"))
        })?);
    }
    let priority = match p.priority {
        None => DEFAULT_PRIORITY,
        Some(n) => u8::try_from(n)
            .ok()
            .filter(|n| *n <= MAX_PRIORITY)
            .ok_or_else(|| ApiError::Invalid(format!("invalid priority {n}: 0-{MAX_PRIORITY}")))?,
    };
    Ok(Placement {
        node: p.node_id,
        constraints,
        anti_affinity: p.anti_affinity,
        spread_by: p.spread_by,
        priority,
    })
}

pub fn node_pb(n: &NodeRecord, vm_count: u64) -> pb::NodeInfo {
    pb::NodeInfo {
        id: n.id,
        addr: n.addr.clone(),
        capacity: Some(resources_pb(&n.capacity())),
        allocated: Some(resources_pb(&n.allocated)),
        status: n.state().as_str().to_string(),
        vm_count,
        labels: n.labels.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
        reserved: Some(resources_pb(&n.resources.reserved)),
        allocatable: Some(resources_pb(&n.allocatable())),
        cpu_overcommit: n.resources.cpu_overcommit.to_string(),
        memory_overcommit: n.resources.memory_overcommit.to_string(),
        registered_at_ms: n.registered_at_ms,
        updated_at_ms: n.updated_at_ms,
        last_heartbeat_age_ms: None,
        drain: n.drain.map(|d| pb::Drain {
            max_parallel: d.max_parallel,
            deadline_ms: d.deadline_ms,
            started_at_ms: d.started_at_ms,
        }),
    }
}

/// `SetNodeRequest` as a command; a bad ratio is refused at the edge.
fn set_node_command(req: pb::SetNodeRequest) -> Result<Command, ApiError> {
    let ratio = |what: &str, s: &str| -> Result<Option<Ratio>, ApiError> {
        if s.is_empty() {
            return Ok(None);
        }
        Ratio::parse(s).map(Some).ok_or_else(|| {
            ApiError::Invalid(format!(
                "invalid {what} {s:?}: a decimal between {} and {} with at most 3 decimals",
                Ratio::MIN,
                Ratio::MAX
            ))
        })
    };
    Ok(Command::SetNode {
        id: req.node_id,
        cpu_overcommit: ratio("cpu overcommit", &req.cpu_overcommit)?,
        memory_overcommit: ratio("memory overcommit", &req.memory_overcommit)?,
        set_labels: req.set_labels.into_iter().collect(),
        remove_labels: req.remove_labels.into_iter().collect(),
    })
}

pub struct ClusterApi {
    node: Arc<NodeShared>,
}

fn quota_pb(tenant: &str, l: &QuotaLimits, u: &TenantUsage) -> pb::Quota {
    pb::Quota {
        tenant: tenant.to_string(),
        limits: Some(pb::QuotaLimits {
            vcpus: l.vcpus,
            memory_mb: l.memory_mb,
            disk_gb: l.disk_gb,
            vms: l.vms,
        }),
        usage: Some(pb::TenantUsage {
            vcpus: u.vcpus,
            memory_mb: u.memory_mb,
            disk_gb: u.disk_gb,
            vms: u.vms,
        }),
    }
}

impl ClusterApi {
    /// A replicated write under the client's request id.
    async fn write(&self, cmd: Command, request_id: &str) -> Result<super::Applied, Status> {
        write(&self.node, cmd, request_id).await
    }

    /// Node `id` as this node has it now, with its VM count.
    fn node_info(&self, id: NodeId) -> Result<pb::NodeInfo, Status> {
        let mut count = 0;
        self.node.state.for_each_vm_on(id, |_| count += 1);
        self.node
            .state
            .with_node(id, |rec| node_pb(rec, count))
            .ok_or_else(|| Status::not_found(format!("unknown node id {id}")))
    }

    fn quota(&self, tenant: &str) -> Result<pb::Quota, Status> {
        crate::validate::tenant(tenant).map_err(|e| Status::from(ApiError::from(e)))?;
        self.node
            .state
            .quotas()
            .iter()
            .find(|(t, _, _)| t == tenant)
            .map(|(t, l, u)| quota_pb(t, l, u))
            .ok_or_else(|| Status::not_found(format!("tenant {tenant:?} has no quota")))
    }

    /// Runs a membership change here if this node leads; otherwise forwards
    /// the request to the leader once.
    async fn on_leader<T, F, Fut>(
        &self,
        forwarded: bool,
        local: F,
        remote: impl AsyncFnOnce(&mut ClusterServiceClient<tonic::transport::Channel>) -> Result<T, Status>,
    ) -> Result<T, Status>
    where
        F: FnOnce() -> Fut,
        Fut: std::future::Future<Output = Result<T, Status>>,
    {
        if self.node.is_leader() {
            return local().await;
        }
        if forwarded {
            return Err(Status::unavailable("this node is not the leader (leadership is changing); retry"));
        }
        let Some((_, addr)) = self.node.leader() else {
            return Err(Status::unavailable("no leader elected yet; retry"));
        };
        let mut client = cluster_client(&self.node.channels, &addr)?;
        remote(&mut client).await
    }
}

fn vm_status(e: blixard_vm::VmError) -> Status {
    match e {
        blixard_vm::VmError::NotFound(_) => Status::not_found(e.to_string()),
        blixard_vm::VmError::Config(_) => Status::invalid_argument(e.to_string()),
        _ => Status::unavailable(e.to_string()),
    }
}

fn forwarded<T>(req: &Request<T>) -> bool {
    req.metadata().contains_key(FORWARDED)
}

fn forward_req<T>(msg: T) -> Request<T> {
    let mut r = Request::new(msg);
    r.metadata_mut().insert(FORWARDED, tonic::metadata::MetadataValue::from_static("1"));
    r.set_timeout(std::time::Duration::from_secs(90));
    r
}

#[tonic::async_trait]
impl ClusterService for ClusterApi {
    async fn status(
        &self,
        request: Request<pb::StatusRequest>,
    ) -> Result<Response<pb::StatusResponse>, Status> {
        let n = &self.node;
        let metrics = n.raft.metrics().borrow().clone();
        let committed =
            n.raft.with_raft_state(|s| s.committed).await.map_err(|e| Status::unavailable(e.to_string()))?;
        let state = match metrics.state {
            openraft::ServerState::Leader => "leader",
            openraft::ServerState::Follower => "follower",
            openraft::ServerState::Candidate => "candidate",
            openraft::ServerState::Learner => "learner",
            openraft::ServerState::Shutdown => "shutdown",
        };
        let mut nodes = Vec::with_capacity(n.state.node_count());
        n.state.for_each_node(|rec| nodes.push(node_pb(rec, 0)));
        nodes.sort_unstable_by_key(|x| x.id);
        for x in &mut nodes {
            let mut count = 0;
            n.state.for_each_vm_on(x.id, |_| count += 1);
            x.vm_count = count;
        }
        if request.get_ref().include_heartbeats {
            for (id, age) in leader_ages(n).await {
                if let Ok(i) = nodes.binary_search_by_key(&id, |x| x.id) {
                    nodes[i].last_heartbeat_age_ms = Some(age);
                }
            }
        }
        let digest = if request.get_ref().include_digest { n.state.digest() } else { 0 };
        Ok(Response::new(pb::StatusResponse {
            node_id: n.id,
            cluster_id: n.cluster_id.to_string(),
            leader_id: metrics.current_leader.unwrap_or(0),
            term: metrics.current_term,
            commit_index: committed.map(|c| c.index).unwrap_or(0),
            applied_index: metrics.last_applied.map(|l| l.index).unwrap_or(0),
            last_log_index: metrics.last_log_index.unwrap_or(0),
            snapshot_index: metrics.snapshot.map(|l| l.index).unwrap_or(0),
            state: state.to_string(),
            members: n.members().iter().map(member_pb).collect(),
            addr: n.addr.clone(),
            data_dir: n.data_dir.display().to_string(),
            state_digest: digest,
            nodes,
            vm_count: n.state.vm_count() as u64,
            vm_backend: n.vm_backend.as_ref().map(|b| b.describe()).unwrap_or_default(),
            scheduler: n.state.strategy().as_str().to_string(),
            node_timeout_ms: n.state.node_timeout().as_millis() as u64,
            revision: n.state.feed().revision(),
        }))
    }

    type WatchStream = super::watch::WatchStream;

    async fn watch(&self, request: Request<pb::WatchRequest>) -> Result<Response<Self::WatchStream>, Status> {
        super::watch::start(self.node.clone(), request.into_inner()).map(Response::new)
    }

    async fn join(&self, request: Request<pb::JoinRequest>) -> Result<Response<pb::JoinResponse>, Status> {
        let fwd = forwarded(&request);
        let req = request.into_inner();
        let r2 = req.clone();
        let node = self.node.clone();
        self.on_leader(
            fwd,
            || async move {
                node.add_member(req.node_id, &req.addr).await?;
                Ok(pb::JoinResponse {
                    cluster_id: node.cluster_id.to_string(),
                    leader_id: node.id,
                    members: node.members().iter().map(member_pb).collect(),
                })
            },
            async move |c| Ok(c.join(forward_req(r2)).await?.into_inner()),
        )
        .await
        .map(Response::new)
    }

    async fn leave(
        &self,
        _request: Request<pb::LeaveRequest>,
    ) -> Result<Response<pb::MembershipResponse>, Status> {
        let id = self.node.id;
        self.remove(Request::new(pb::RemoveRequest { node_id: id })).await
    }

    async fn remove(
        &self,
        request: Request<pb::RemoveRequest>,
    ) -> Result<Response<pb::MembershipResponse>, Status> {
        let fwd = forwarded(&request);
        let req = request.into_inner();
        if req.node_id == 0 {
            return Err(ApiError::Invalid("node id must be a positive integer".into()).into());
        }
        let node = self.node.clone();
        let id = req.node_id;
        self.on_leader(
            fwd,
            || async move {
                node.remove_member(id).await?;
                Ok(pb::MembershipResponse { members: node.members().iter().map(member_pb).collect() })
            },
            async move |c| Ok(c.remove(forward_req(req)).await?.into_inner()),
        )
        .await
        .map(Response::new)
    }

    async fn set_scheduler(
        &self,
        request: Request<pb::SetSchedulerRequest>,
    ) -> Result<Response<pb::SetSchedulerResponse>, Status> {
        let req = request.into_inner();
        let strategy = Strategy::parse(&req.strategy).ok_or_else(|| {
            ApiError::Invalid(format!("invalid scheduler {:?}: spread or binpack", req.strategy))
                .into_write_status()
        })?;
        self.write(Command::SetScheduler { strategy }, &req.request_id).await?;
        Ok(Response::new(pb::SetSchedulerResponse { strategy: strategy.as_str().to_string() }))
    }

    async fn set_quota(&self, request: Request<pb::SetQuotaRequest>) -> Result<Response<pb::Quota>, Status> {
        let req = request.into_inner();
        let l = req.limits.unwrap_or_default();
        let limits = QuotaLimits { vcpus: l.vcpus, memory_mb: l.memory_mb, disk_gb: l.disk_gb, vms: l.vms };
        let cmd = Command::SetQuota { tenant: req.tenant.clone(), limits };
        self.write(cmd, &req.request_id).await?;
        self.quota(&req.tenant).map(Response::new)
    }

    async fn get_quota(&self, request: Request<pb::QuotaRequest>) -> Result<Response<pb::Quota>, Status> {
        self.node.linearize().await?;
        self.quota(&request.get_ref().tenant).map(Response::new)
    }

    async fn list_quotas(
        &self,
        _request: Request<pb::ListQuotasRequest>,
    ) -> Result<Response<pb::ListQuotasResponse>, Status> {
        self.node.linearize().await?;
        let quotas = self.node.state.quotas().iter().map(|(t, l, u)| quota_pb(t, l, u)).collect();
        Ok(Response::new(pb::ListQuotasResponse { quotas }))
    }

    async fn delete_quota(
        &self,
        request: Request<pb::DeleteQuotaRequest>,
    ) -> Result<Response<pb::DeleteQuotaResponse>, Status> {
        let req = request.into_inner();
        self.write(Command::DeleteQuota { tenant: req.tenant }, &req.request_id).await?;
        Ok(Response::new(pb::DeleteQuotaResponse {}))
    }

    async fn set_node(&self, request: Request<pb::SetNodeRequest>) -> Result<Response<pb::NodeInfo>, Status> {
        let req = request.into_inner();
        let request_id = req.request_id.clone();
        let id = req.node_id;
        let cmd = set_node_command(req).map_err(ApiError::into_write_status)?;
        self.write(cmd, &request_id).await?;
        self.node_info(id).map(Response::new)
    }

    async fn set_node_timeout(
        &self,
        request: Request<pb::SetNodeTimeoutRequest>,
    ) -> Result<Response<pb::SetNodeTimeoutResponse>, Status> {
        let req = request.into_inner();
        self.write(Command::SetNodeTimeout { ms: req.timeout_ms }, &req.request_id).await?;
        Ok(Response::new(pb::SetNodeTimeoutResponse { timeout_ms: req.timeout_ms }))
    }

    async fn drain_node(
        &self,
        request: Request<pb::DrainNodeRequest>,
    ) -> Result<Response<pb::DrainNodeResponse>, Status> {
        let req = request.into_inner();
        let deadline_ms = match req.deadline_secs {
            0 => 0,
            s if s > crate::validate::MAX_DRAIN_DEADLINE_SECS => {
                let max = crate::validate::MAX_DRAIN_DEADLINE_SECS;
                return Err(ApiError::Invalid(format!("invalid deadline {s} s: at most {max} s (one day)"))
                    .into_write_status());
            }
            s => super::now_ms() + s * 1000,
        };
        let cmd = Command::DrainNode { id: req.node_id, max_parallel: req.max_parallel, deadline_ms };
        let applied = self.write(cmd, &req.request_id).await?;
        let CommandOutput::Draining { id, moving, stuck } = applied.output else {
            return Err(Status::internal("a drain produced no drain"));
        };
        let stuck = stuck.into_iter().map(|(name, reason)| pb::StuckVm { name, reason }).collect();
        Ok(Response::new(pb::DrainNodeResponse { node_id: id, moving, stuck }))
    }

    async fn set_eligible(
        &self,
        request: Request<pb::SetEligibleRequest>,
    ) -> Result<Response<pb::NodeInfo>, Status> {
        let req = request.into_inner();
        let id = req.node_id;
        self.write(Command::SetEligible { id }, &req.request_id).await?;
        self.node_info(id).map(Response::new)
    }
}

/// The leader's heartbeat ages (ms) per node: from this node if it leads,
/// else asked of the leader; empty when no leader answers within a second.
async fn leader_ages(n: &NodeShared) -> Vec<(NodeId, u64)> {
    if n.is_leader() {
        return super::liveness::ages(n).unwrap_or_default();
    }
    let Some((_, addr)) = n.leader() else { return Vec::new() };
    let wait = std::time::Duration::from_secs(1);
    let r: Result<super::liveness::LivenessReply, _> =
        n.channels.call(&addr, crate::raft::network::RaftRpc::Liveness, &n.cluster_id, n.id, &(), wait).await;
    match r {
        Ok(Ok(ages)) => ages,
        _ => Vec::new(),
    }
}

pub struct VmApi {
    node: Arc<NodeShared>,
}

impl VmApi {
    async fn read_barrier(&self, consistency: i32) -> Result<(), Status> {
        if consistency == pb::Consistency::Stale as i32 {
            return Ok(());
        }
        self.node.linearize().await.map_err(Status::from)
    }

    /// Commits a write about VM `name` and answers with the VM as this node
    /// now has it (`propose` returns once this node applied the write), plus
    /// the write's log index.
    ///
    /// Every write error carries its outcome (`rejected`, `unknown` or
    /// `applied`) in the [`super::OUTCOME_KEY`] metadata.
    async fn write_vm(&self, cmd: Command, request_id: &str) -> Result<Response<pb::VmResponse>, Status> {
        let applied = self.write(cmd, request_id).await?;
        let name = match &applied.output {
            CommandOutput::VmCreated { name, .. }
            | CommandOutput::VmDeleted { name, .. }
            | CommandOutput::VmDesired { name, .. } => name.as_str(),
            CommandOutput::VmsCreated { vms } if vms.len() == 1 => vms[0].name.as_str(),
            _ => return Err(Status::internal("a VM write produced no VM")),
        };
        // The write succeeded. A retry under the same request id returns
        // that first outcome even if the VM has been deleted since: then
        // there is no VM to show, which is not an error.
        Ok(Response::new(pb::VmResponse { vm: self.node.state.with_vm(name, vm_pb), index: applied.index }))
    }

    /// Proposes a client write under its request id.
    async fn write(&self, cmd: Command, request_id: &str) -> Result<super::Applied, Status> {
        write(&self.node, cmd, request_id).await
    }

    fn backend(&self) -> Result<&Arc<dyn blixard_vm::VmBackend>, Status> {
        self.node
            .vm_backend
            .as_ref()
            .ok_or_else(|| Status::failed_precondition(format!("node {} runs no VM backend", self.node.id)))
    }

    fn get_local(&self, name: &str) -> Result<pb::Vm, Status> {
        self.node.state.with_vm(name, vm_pb).ok_or_else(|| Status::not_found(format!("no VM named {name:?}")))
    }
}

/// Proposes a client write under its request id; failures carry the
/// write's outcome (`blixard-outcome`).
async fn write(node: &NodeShared, cmd: Command, request_id: &str) -> Result<super::Applied, Status> {
    let request =
        RequestId::from_client_opt(request_id).map_err(|e| ApiError::from(e).into_write_status())?;
    node.propose_with(cmd, request).await.map_err(ApiError::into_write_status)
}

/// Where each VM of a `CreateVms` went.
fn placed_pb(out: CommandOutput) -> Vec<pb::PlacedVm> {
    match out {
        CommandOutput::VmsCreated { vms } => vms
            .into_iter()
            .map(|v| pb::PlacedVm {
                queued: v.node_id == 0,
                name: v.name,
                node_id: v.node_id,
                preempted: v.preempted,
            })
            .collect(),
        _ => Vec::new(),
    }
}

pub fn spec_from_pb(spec: Option<pb::VmSpec>) -> Result<VmSpec, ApiError> {
    let s = spec.unwrap_or_default();
    let restart = if s.restart_policy.is_empty() {
        RestartPolicy::default()
    } else {
        RestartPolicy::parse(&s.restart_policy).ok_or_else(|| {
            ApiError::Invalid(format!(
                "invalid restart policy {:?}: one of never, on-failure, always",
                s.restart_policy
            ))
        })?
    };
    Ok(VmSpec {
        vcpus: s.vcpus,
        memory_mb: s.memory_mb,
        disk_gb: s.disk_gb,
        labels: s.labels.into_iter().collect(),
        tenant: s.tenant,
        restart,
        boot: BootSpec { kernel: s.kernel, initrd: s.initrd, cmdline: s.cmdline },
    })
}

/// Largest console chunk one `VmLogs` call returns.
const MAX_LOG_CHUNK: usize = 1024 * 1024;
const DEFAULT_LOG_CHUNK: usize = 64 * 1024;

#[tonic::async_trait]
impl VmService for VmApi {
    async fn create_vm(
        &self,
        request: Request<pb::CreateVmRequest>,
    ) -> Result<Response<pb::VmResponse>, Status> {
        let req = request.into_inner();
        let spec = spec_from_pb(req.spec).map_err(ApiError::into_write_status)?;
        let placement = placement_from_pb(req.placement).map_err(ApiError::into_write_status)?;
        let reschedule = reschedule_from_pb(&req.reschedule).map_err(ApiError::into_write_status)?;
        let vm = NewVm { name: req.name, spec, placement, reschedule };
        let cmd = Command::CreateVms { vms: vec![vm], start: !req.no_start, queue: req.queue };
        self.write_vm(cmd, &req.request_id).await
    }

    async fn create_vms(
        &self,
        request: Request<pb::CreateVmsRequest>,
    ) -> Result<Response<pb::CreateVmsResponse>, Status> {
        let req = request.into_inner();
        let mut vms = Vec::with_capacity(req.vms.len());
        for v in req.vms {
            let spec = spec_from_pb(v.spec).map_err(ApiError::into_write_status)?;
            let placement = placement_from_pb(v.placement).map_err(ApiError::into_write_status)?;
            let reschedule = reschedule_from_pb(&v.reschedule).map_err(ApiError::into_write_status)?;
            vms.push(NewVm { name: v.name, spec, placement, reschedule });
        }
        // A dry run explains the first VM against the state as it is.
        let first = if req.dry_run { vms.first().cloned() } else { None };
        let cmd = Command::CreateVms { vms, start: !req.no_start, queue: req.queue };
        if req.dry_run {
            // Input errors first, as a real create would report them.
            cmd.validate().map_err(|e| ApiError::from(e).into_write_status())?;
            self.read_barrier(pb::Consistency::Linearizable as i32).await?;
            let state = &self.node.state;
            let explanation = first.map(|vm| state.explain(&vm)).unwrap_or_default();
            let out =
                state.dry_run(&cmd, super::now_ms()).map_err(|e| ApiError::from(e).into_write_status())?;
            return Ok(Response::new(pb::CreateVmsResponse {
                placed: placed_pb(out),
                dry_run: true,
                explanation,
                index: 0,
            }));
        }
        // No explanation here: it costs O(nodes), and a real create is
        // explained only when it fails (in the error).
        let applied = self.write(cmd, &req.request_id).await?;
        Ok(Response::new(pb::CreateVmsResponse {
            placed: placed_pb(applied.output),
            dry_run: false,
            explanation: String::new(),
            index: applied.index,
        }))
    }

    async fn get_vm(&self, request: Request<pb::GetVmRequest>) -> Result<Response<pb::VmResponse>, Status> {
        let req = request.into_inner();
        crate::validate::vm_name(&req.name).map_err(ApiError::from)?;
        self.read_barrier(req.consistency).await?;
        Ok(Response::new(pb::VmResponse { vm: Some(self.get_local(&req.name)?), index: 0 }))
    }

    async fn list_vms(
        &self,
        request: Request<pb::ListVmsRequest>,
    ) -> Result<Response<pb::ListVmsResponse>, Status> {
        let req = request.into_inner();
        self.read_barrier(req.consistency).await?;
        let state = &self.node.state;
        // Read before the table: the list is at least this new, so watching
        // from revision + 1 leaves no gap.
        let revision = state.feed().revision();
        let mut vms = Vec::new();
        if req.node_id == 0 {
            vms.reserve(state.vm_count());
            state.for_each_vm(|v| vms.push(vm_pb(v)));
            vms.sort_unstable_by(|a, b| a.name.cmp(&b.name));
        } else {
            if state.with_node(req.node_id, |_| ()).is_none() {
                return Err(Status::not_found(format!("unknown node id {}", req.node_id)));
            }
            state.for_each_vm_on(req.node_id, |v| vms.push(vm_pb(v)));
        }
        Ok(Response::new(pb::ListVmsResponse { vms, revision }))
    }

    async fn delete_vm(
        &self,
        request: Request<pb::DeleteVmRequest>,
    ) -> Result<Response<pb::DeleteVmResponse>, Status> {
        let req = request.into_inner();
        self.write(Command::DeleteVm { name: req.name }, &req.request_id).await?;
        Ok(Response::new(pb::DeleteVmResponse {}))
    }

    async fn start_vm(
        &self,
        request: Request<pb::VmNameRequest>,
    ) -> Result<Response<pb::VmResponse>, Status> {
        let req = request.into_inner();
        self.write_vm(Command::StartVm { name: req.name }, &req.request_id).await
    }

    async fn stop_vm(&self, request: Request<pb::VmNameRequest>) -> Result<Response<pb::VmResponse>, Status> {
        let req = request.into_inner();
        self.write_vm(Command::StopVm { name: req.name }, &req.request_id).await
    }

    async fn restart_vm(
        &self,
        request: Request<pb::VmNameRequest>,
    ) -> Result<Response<pb::VmResponse>, Status> {
        let req = request.into_inner();
        self.write_vm(Command::RestartVm { name: req.name }, &req.request_id).await
    }

    async fn migrate_vm(
        &self,
        request: Request<pb::MigrateVmRequest>,
    ) -> Result<Response<pb::VmResponse>, Status> {
        let req = request.into_inner();
        let cmd = Command::MigrateVm { name: req.name.clone(), to: req.to_node };
        let applied = self.write(cmd, &req.request_id).await?;
        Ok(Response::new(pb::VmResponse {
            vm: self.node.state.with_vm(&req.name, vm_pb),
            index: applied.index,
        }))
    }

    async fn vm_logs(
        &self,
        request: Request<pb::VmLogsRequest>,
    ) -> Result<Response<pb::VmLogsResponse>, Status> {
        let fwd = forwarded(&request);
        let req = request.into_inner();
        crate::validate::vm_name(&req.name).map_err(ApiError::from)?;
        let max = match req.max_bytes as usize {
            0 => DEFAULT_LOG_CHUNK,
            n => n.min(MAX_LOG_CHUNK),
        };
        let owner = self.node.state.with_vm(&req.name, |v| v.node_id);
        let Some(owner) = owner else { return Err(Status::not_found(format!("no VM named {:?}", req.name))) };
        if owner != self.node.id {
            // The console lives on the node that runs the VM.
            if fwd {
                return Err(Status::failed_precondition(format!(
                    "node {} does not run VM {:?} (node {owner} does)",
                    self.node.id, req.name
                )));
            }
            let addr = self.node.state.with_node(owner, |n| n.addr.clone()).ok_or_else(|| {
                Status::unavailable(format!("VM {:?} is on unknown node {owner}", req.name))
            })?;
            let ch = self.node.channels.channel(&addr).map_err(|e| Status::unavailable(e.to_string()))?;
            let mut c = blixard_proto::vm_service_client::VmServiceClient::new(ch);
            return c.vm_logs(forward_req(req)).await;
        }
        let backend = self.backend()?;
        let chunk = backend.logs(&req.name, req.offset, max).await.map_err(vm_status)?;
        Ok(Response::new(pb::VmLogsResponse {
            data: chunk.data,
            next_offset: chunk.next_offset,
            node_id: owner,
        }))
    }

    async fn local_vm(
        &self,
        request: Request<pb::VmNameRequest>,
    ) -> Result<Response<pb::LocalVmResponse>, Status> {
        let name = request.into_inner().name;
        crate::validate::vm_name(&name).map_err(ApiError::from)?;
        let backend = self.backend()?;
        let status = backend.status(&name).await.map_err(vm_status)?;
        let mut out = pb::LocalVmResponse { node_id: self.node.id, ..Default::default() };
        if let Some(s) = status {
            out.found = true;
            out.pid = s.pid.unwrap_or(0);
            out.state = match s.state {
                blixard_vm::RunState::Starting => "starting".into(),
                blixard_vm::RunState::Running => "running".into(),
                blixard_vm::RunState::Stopped => "stopped".into(),
                blixard_vm::RunState::Failed { reason } => {
                    out.reason = reason;
                    "failed".into()
                }
            };
        }
        Ok(Response::new(out))
    }
}
