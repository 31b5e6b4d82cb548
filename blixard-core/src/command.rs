//! The replicated command log's payload and results.
//!
//! A [`Proposal`] is what goes into one Raft entry: a [`Command`] plus the
//! wall-clock time the proposer stamped on it. Apply never reads a clock, so
//! every replica (and every simulation run) computes the same state.
use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use crate::auth::token::TokenHash;
use crate::auth::Role;
use crate::error::CommandError;
use crate::types::{
    DesiredState, Ipv4Net, NodeId, NodeResources, ObservedState, Placement, PortMap, QuotaLimits, Ratio,
    Reschedule, Resources, Strategy, VmRuntime, VmSpec,
};
use crate::validate;

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub enum Command {
    /// Format 1's registration: capacity only (no reservation, no
    /// overcommit). Still applied for entries written before format 2;
    /// never proposed any more. (Variants are encoded by position: new ones
    /// go at the end, old ones are renamed, never removed or reordered.)
    RegisterNodeV1 {
        id: NodeId,
        addr: String,
        capacity: Resources,
        labels: BTreeMap<String, String>,
    },
    /// Take a node out of placement: it left or was removed from the cluster.
    /// VMs placed on it become `Lost`.
    DecommissionNode {
        id: NodeId,
    },
    /// Create a VM and place it: on the active node with the most free memory
    /// that fits it (lowest id on ties), reserving its resources there. It
    /// starts right away unless `start` is false.
    CreateVm {
        name: String,
        spec: VmSpec,
        start: bool,
    },
    /// Delete a VM and release what it reserved. Its node stops it and removes
    /// its files.
    DeleteVm {
        name: String,
    },
    /// Set a VM's desired state to running.
    StartVm {
        name: String,
    },
    /// Set a VM's desired state to stopped.
    StopVm {
        name: String,
    },
    /// Stop and start a VM again (and start it if it was stopped).
    RestartVm {
        name: String,
    },
    /// A node reports what its VMs are doing. Entries for VMs that are gone
    /// or placed on another node are ignored (the report raced a change).
    ReportVms {
        node: NodeId,
        reports: Vec<VmReport>,
    },
    /// Several commands applied all-or-nothing, in order.
    Batch(Vec<Command>),
    /// Add a node to the placement pool, or update its address, resources
    /// and labels (a node re-registers on every start). The operator's
    /// `node set` overrides stay in force.
    RegisterNode {
        id: NodeId,
        addr: String,
        resources: NodeResources,
        labels: BTreeMap<String, String>,
    },
    /// `node set`: label and overcommit overrides. Refused if it would leave
    /// the node's allocated resources above its allocatable ones.
    SetNode {
        id: NodeId,
        set_labels: BTreeMap<String, String>,
        remove_labels: BTreeSet<String>,
        cpu_overcommit: Option<Ratio>,
        memory_overcommit: Option<Ratio>,
    },
    /// Set (replace) a tenant's limits; a dimension without a limit is
    /// unlimited. A limit below current use is allowed: it stops new VMs,
    /// running ones stay.
    SetQuota {
        tenant: String,
        limits: QuotaLimits,
    },
    DeleteQuota {
        tenant: String,
    },
    /// The cluster's placement strategy, for VMs placed from now on.
    SetScheduler {
        strategy: Strategy,
    },
    /// Format 3's `CreateVms` (no failover policy): still applied for old
    /// entries, never proposed any more.
    CreateVmsV3 {
        vms: Vec<NewVmV3>,
        start: bool,
        queue: bool,
    },
    /// Format 4's `CreateVms` (no published ports): still applied for old
    /// entries, never proposed any more.
    CreateVmsV4 {
        vms: Vec<NewVmV4>,
        start: bool,
        queue: bool,
    },
    /// How long the leader waits without a heartbeat before it marks a
    /// node down (format 4).
    SetNodeTimeout {
        ms: u64,
    },
    /// Proposed by the leader: node `id` has not heartbeated for the node
    /// timeout (`down`), or heartbeats again. Marking it down re-places
    /// its VMs (unless `--reschedule never`): the node fenced itself
    /// before the timeout, so they run nowhere.
    SetNodeDown {
        id: NodeId,
        down: bool,
    },
    /// Stop placing on node `id` and move its VMs off, at most
    /// `max_parallel` at a time (0: all at once). Again on a draining node:
    /// updates the drain and moves what can move now.
    DrainNode {
        id: NodeId,
        max_parallel: u32,
        /// ms since the epoch; 0: none.
        deadline_ms: u64,
    },
    /// End a drain: the node takes placements again.
    SetEligible {
        id: NodeId,
    },
    /// Cold-migrate a VM: its node stops it, then it starts on `to` (0:
    /// the scheduler's choice).
    MigrateVm {
        name: String,
        to: NodeId,
    },
    /// Format 5: add a bearer token (its hash; the secret is never
    /// replicated). `bootstrap` marks the cluster's first admin token,
    /// refused once the cluster has had one.
    CreateToken {
        name: String,
        role: Role,
        hash: TokenHash,
        /// 0: never expires.
        expires_at_ms: u64,
        bootstrap: bool,
    },
    /// Revoke a token: every node refuses it once this is applied. The
    /// last admin token that has not expired cannot be revoked.
    RevokeToken {
        name: String,
    },
    /// Create VMs with their placement rules and published ports, each
    /// placed in turn (format 6; `CreateVm`, `CreateVmsV3` and
    /// `CreateVmsV4` are older forms, still applied for old entries). One
    /// that fits nowhere may preempt VMs of lower priority; if it still
    /// fits nowhere the whole command is rejected, unless `queue`: then it
    /// waits in the queue. Quota and input errors always reject the whole
    /// command.
    CreateVms {
        vms: Vec<NewVm>,
        start: bool,
        queue: bool,
    },
    /// Format 6: the cluster's VM network, set once (the founder's
    /// `--vm-cidr`, or the default, proposed by a leader when the state has
    /// none). Gives every active node a /24 of it and every VM a node holds
    /// an address. Setting it again to the same network is a no-op; to
    /// another, refused.
    SetVmNetwork {
        cidr: Ipv4Net,
    },
}

/// One VM of a [`Command::CreateVms`].
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct NewVm {
    pub name: String,
    pub spec: VmSpec,
    pub placement: Placement,
    pub reschedule: Reschedule,
    /// Host ports its node forwards to it (format 6).
    pub publish: Vec<PortMap>,
}

/// One VM of a format-4 [`Command::CreateVmsV4`].
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct NewVmV4 {
    pub name: String,
    pub spec: VmSpec,
    pub placement: Placement,
    pub reschedule: Reschedule,
}

impl From<&NewVmV4> for NewVm {
    fn from(v: &NewVmV4) -> Self {
        NewVm {
            name: v.name.clone(),
            spec: v.spec.clone(),
            placement: v.placement.clone(),
            reschedule: v.reschedule,
            publish: Vec::new(),
        }
    }
}

/// One VM of a format-3 [`Command::CreateVmsV3`].
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct NewVmV3 {
    pub name: String,
    pub spec: VmSpec,
    pub placement: Placement,
}

impl From<&NewVmV3> for NewVm {
    fn from(v: &NewVmV3) -> Self {
        NewVm {
            name: v.name.clone(),
            spec: v.spec.clone(),
            placement: v.placement.clone(),
            reschedule: Reschedule::default(),
            publish: Vec::new(),
        }
    }
}

impl Command {
    /// Stateless checks: what can be said about a command without the state.
    /// Run at the API edge (so bad input never reaches Raft) and again in
    /// apply (so a malformed entry is rejected the same way everywhere).
    pub fn validate(&self) -> Result<(), CommandError> {
        match self {
            Command::RegisterNodeV1 { id, addr, capacity, labels } => {
                validate::node_id(*id)?;
                validate::addr(addr)?;
                validate::node_capacity(capacity)?;
                validate::labels(labels)
            }
            Command::RegisterNode { id, addr, resources, labels } => {
                validate::node_id(*id)?;
                validate::addr(addr)?;
                validate::node_resources(resources)?;
                validate::labels(labels)
            }
            Command::SetQuota { tenant, limits } => {
                validate::tenant(tenant)?;
                if *limits == QuotaLimits::default() {
                    return Err(CommandError::invalid("quota", "nothing", "at least one limit"));
                }
                Ok(())
            }
            Command::DeleteQuota { tenant } => validate::tenant(tenant),
            Command::SetScheduler { .. } => Ok(()),
            Command::SetNode { id, set_labels, remove_labels, cpu_overcommit, memory_overcommit } => {
                validate::node_id(*id)?;
                validate::labels(set_labels)?;
                for key in remove_labels {
                    validate::label_key(key)?;
                    if set_labels.contains_key(key) {
                        return Err(CommandError::invalid("label", key, "either set or removed, not both"));
                    }
                }
                for r in cpu_overcommit.iter().chain(memory_overcommit) {
                    validate::ratio(*r)?;
                }
                if set_labels.is_empty()
                    && remove_labels.is_empty()
                    && cpu_overcommit.is_none()
                    && memory_overcommit.is_none()
                {
                    return Err(CommandError::invalid(
                        "node change",
                        "nothing",
                        "at least one label or overcommit change",
                    ));
                }
                Ok(())
            }
            Command::DecommissionNode { id } => {
                if *id == 0 {
                    return Err(CommandError::invalid("node id", id, "a positive integer"));
                }
                Ok(())
            }
            Command::CreateVm { name, spec, .. } => {
                validate::vm_name(name)?;
                validate::vm_spec(spec)
            }
            Command::CreateVmsV3 { vms, .. } => {
                validate::vm_count(vms.len())?;
                for v in vms {
                    validate::new_vm(&v.name, &v.spec, &v.placement)?;
                }
                Ok(())
            }
            Command::CreateVmsV4 { vms, .. } => {
                validate::vm_count(vms.len())?;
                for v in vms {
                    validate::new_vm(&v.name, &v.spec, &v.placement)?;
                }
                Ok(())
            }
            Command::CreateVms { vms, .. } => {
                validate::vm_count(vms.len())?;
                for v in vms {
                    validate::new_vm(&v.name, &v.spec, &v.placement)?;
                    validate::publish(&v.publish)?;
                }
                Ok(())
            }
            Command::SetVmNetwork { cidr } => validate::vm_cidr(cidr),
            Command::SetNodeTimeout { ms } => validate::node_timeout_ms(*ms),
            Command::SetNodeDown { id, .. } | Command::SetEligible { id } => validate::node_id(*id),
            Command::DrainNode { id, max_parallel, .. } => {
                validate::node_id(*id)?;
                if *max_parallel > validate::MAX_BATCH as u32 {
                    return Err(CommandError::invalid(
                        "max parallel",
                        max_parallel,
                        format!("0 (all at once) to {}", validate::MAX_BATCH),
                    ));
                }
                Ok(())
            }
            Command::MigrateVm { name, .. } => validate::vm_name(name),
            Command::DeleteVm { name }
            | Command::StartVm { name }
            | Command::StopVm { name }
            | Command::RestartVm { name } => validate::vm_name(name),
            Command::ReportVms { node, reports } => {
                if *node == 0 {
                    return Err(CommandError::invalid("node id", node, "a positive integer"));
                }
                if reports.is_empty() || reports.len() > validate::MAX_BATCH {
                    return Err(CommandError::invalid(
                        "report count",
                        reports.len(),
                        format!("between 1 and {}", validate::MAX_BATCH),
                    ));
                }
                for r in reports {
                    validate::vm_name(&r.name)?;
                    if r.runtime.reason.len() > validate::MAX_REASON_LEN {
                        return Err(CommandError::invalid(
                            "failure reason length",
                            r.runtime.reason.len(),
                            format!("at most {} bytes", validate::MAX_REASON_LEN),
                        ));
                    }
                }
                Ok(())
            }
            Command::CreateToken { name, .. } | Command::RevokeToken { name } => validate::token_name(name),
            Command::Batch(cmds) => {
                if cmds.is_empty() || cmds.len() > validate::MAX_BATCH {
                    return Err(CommandError::invalid(
                        "batch size",
                        cmds.len(),
                        format!("between 1 and {} commands", validate::MAX_BATCH),
                    ));
                }
                for (index, c) in cmds.iter().enumerate() {
                    if matches!(c, Command::Batch(_)) {
                        return Err(CommandError::invalid(
                            "batch",
                            "nested batch",
                            "a flat list of commands",
                        ));
                    }
                    c.validate().map_err(|e| CommandError::BatchFailed { index, source: Box::new(e) })?;
                }
                Ok(())
            }
        }
    }
}

/// Identifies one client write across retries, so that a write retried
/// after a lost reply is applied once. Minted by a node (`session` random
/// per node process, `seq` counting its writes) or derived from the
/// client's own request id ([`RequestId::from_client`]).
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RequestId {
    pub session: u64,
    pub seq: u64,
}

impl RequestId {
    /// The id of a client-chosen request id string (validated first): its
    /// 128-bit xxh3 hash under a domain tag, so it never meets the ids nodes
    /// mint (random session, counting seq) except by a 2^-64 chance. The
    /// replicated format is unchanged: two u64s, whoever chose them.
    pub fn from_client(id: &str) -> Result<RequestId, CommandError> {
        validate::request_id(id)?;
        let mut tagged = Vec::with_capacity(id.len() + 16);
        tagged.extend_from_slice(b"blixard-client:");
        tagged.extend_from_slice(id.as_bytes());
        let h = xxhash_rust::xxh3::xxh3_128(&tagged);
        Ok(RequestId { session: (h >> 64) as u64, seq: h as u64 })
    }

    /// `from_client` for an optional id: empty means "let the node choose".
    pub fn from_client_opt(id: &str) -> Result<Option<RequestId>, CommandError> {
        if id.is_empty() {
            Ok(None)
        } else {
            Self::from_client(id).map(Some)
        }
    }
}

/// What a node saw of one of its VMs.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct VmReport {
    pub name: String,
    pub observed: ObservedState,
    pub runtime: VmRuntime,
}

/// One client's write: a command and the time its proposer stamped on it.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct Proposal {
    /// Milliseconds since the Unix epoch, stamped by the proposing node.
    pub at_ms: u64,
    /// Set by nodes for client writes: a retry with the same id returns the
    /// first attempt's result instead of applying again.
    pub request: Option<RequestId>,
    pub command: Command,
}

impl std::fmt::Display for Proposal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:?}@{}", self.command, self.at_ms)
    }
}

/// One Raft entry's payload: proposals from concurrent clients, coalesced
/// so they share one append, one fsync and one replication round. Each is
/// applied on its own and gets its own result.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct ProposalBatch(pub Vec<Proposal>);

impl std::fmt::Display for ProposalBatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} proposals", self.0.len())
    }
}

/// What a successful command did.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub enum CommandOutput {
    NodeRegistered {
        id: NodeId,
    },
    NodeDecommissioned {
        id: NodeId,
        lost_vms: u64,
    },
    VmCreated {
        name: String,
        node_id: NodeId,
    },
    VmDeleted {
        name: String,
        node_id: NodeId,
    },
    /// Start, stop or restart recorded.
    VmDesired {
        name: String,
        desired: DesiredState,
        generation: u64,
    },
    /// How many reports changed a VM (the rest were stale or unchanged).
    VmsReported {
        applied: u32,
    },
    Batch(Vec<CommandOutput>),
    /// A Raft-internal entry (blank or membership) with no application effect.
    Internal,
    /// `node set` applied.
    NodeUpdated {
        id: NodeId,
    },
    QuotaSet {
        tenant: String,
    },
    QuotaDeleted {
        tenant: String,
    },
    SchedulerSet {
        strategy: Strategy,
    },
    /// `CreateVms`: each VM in order, where it went (0: queued) and whom it
    /// preempted.
    VmsCreated {
        vms: Vec<CreatedVm>,
    },
    /// Format 4.
    NodeTimeoutSet {
        ms: u64,
    },
    /// A node marked down (its VMs `moved` to other nodes, `queued` for
    /// want of room, `kept` by `--reschedule never`) or ready again.
    NodeDownSet {
        id: NodeId,
        down: bool,
        moved: u64,
        queued: u64,
        kept: u64,
    },
    /// A drain started or advanced: VMs now leaving, and those that cannot
    /// move with the reason.
    Draining {
        id: NodeId,
        moving: Vec<String>,
        stuck: Vec<(String, String)>,
    },
    NodeEligible {
        id: NodeId,
    },
    /// A migration started: the VM leaves node `from` once stopped there.
    VmMigrating {
        name: String,
        from: NodeId,
        to: NodeId,
    },
    /// Format 5.
    TokenCreated {
        name: String,
    },
    TokenRevoked {
        name: String,
    },
    /// Format 6: the VM network is (now) `cidr`; `subnets` nodes got a
    /// subnet and `addresses` VMs an address.
    VmNetworkSet {
        cidr: Ipv4Net,
        subnets: u32,
        addresses: u32,
    },
}

/// Where one VM of a `CreateVms` went.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct CreatedVm {
    pub name: String,
    /// 0 when it was queued.
    pub node_id: NodeId,
    /// VMs evicted to make room for it (now queued or placed elsewhere).
    pub preempted: Vec<String>,
}

/// The response of applying one Raft entry.
pub type CommandResult = Result<CommandOutput, CommandError>;
