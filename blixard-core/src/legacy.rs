//! Types of earlier format versions, kept only to read old data and
//! convert it (see "Format versions" in docs/ARCHITECTURE.md). Each is the
//! exact serde shape that version wrote; never change one.
use std::collections::BTreeMap;
use std::sync::Arc;

use serde::Deserialize;

use crate::auth::token::TokenRecord;
use crate::command::{CommandResult, RequestId};
use crate::state::{StateImage, DEFAULT_NODE_TIMEOUT_MS};
use crate::types::{
    DesiredState, Drain, Move, NodeId, NodeOverrides, NodeRecord, NodeResources, NodeStatus, ObservedState,
    PendingMove, Placement, QuotaLimits, Registration, Reschedule, Resources, Strategy, VmRecord, VmRuntime,
    VmSpec,
};

/// A VM record in formats 0 to 2: no placement rules, never queued.
#[derive(Deserialize)]
pub struct VmRecordV2 {
    pub name: Arc<str>,
    pub spec: VmSpec,
    pub node_id: NodeId,
    pub desired: DesiredState,
    pub observed: ObservedState,
    pub created_at_ms: u64,
    pub updated_at_ms: u64,
    pub revision: u64,
    pub generation: u64,
    pub runtime: VmRuntime,
}

impl From<VmRecordV2> for VmRecord {
    /// The default placement (any node, priority 50): what every VM had.
    fn from(v: VmRecordV2) -> Self {
        VmRecordV3 {
            name: v.name,
            spec: v.spec,
            node_id: v.node_id,
            desired: v.desired,
            observed: v.observed,
            created_at_ms: v.created_at_ms,
            updated_at_ms: v.updated_at_ms,
            revision: v.revision,
            generation: v.generation,
            runtime: v.runtime,
            placement: Default::default(),
            queued_at: 0,
            preempted_by: String::new(),
            leaving: 0,
        }
        .into()
    }
}

/// A VM record in format 3: placement rules, no failover policy or history.
#[derive(Deserialize)]
pub struct VmRecordV3 {
    pub name: Arc<str>,
    pub spec: VmSpec,
    pub node_id: NodeId,
    pub desired: DesiredState,
    pub observed: ObservedState,
    pub created_at_ms: u64,
    pub updated_at_ms: u64,
    pub revision: u64,
    pub generation: u64,
    pub runtime: VmRuntime,
    pub placement: Placement,
    pub queued_at: u64,
    pub preempted_by: String,
    pub leaving: NodeId,
}

impl From<VmRecordV3> for VmRecord {
    /// Rescheduled on node failure (the default), no moves recorded.
    fn from(v: VmRecordV3) -> Self {
        VmRecord {
            name: v.name,
            spec: v.spec,
            node_id: v.node_id,
            desired: v.desired,
            observed: v.observed,
            created_at_ms: v.created_at_ms,
            updated_at_ms: v.updated_at_ms,
            revision: v.revision,
            generation: v.generation,
            runtime: v.runtime,
            placement: v.placement,
            queued_at: v.queued_at,
            preempted_by: v.preempted_by,
            leaving: v.leaving,
            reschedule: Default::default(),
            history: Vec::new(),
            moving: None,
            placement_gen: 0,
            ip: None,
            publish: Vec::new(),
        }
    }
}

/// A VM record in formats 4 and 5: no address, no published ports.
#[derive(Deserialize)]
pub struct VmRecordV5 {
    pub name: Arc<str>,
    pub spec: VmSpec,
    pub node_id: NodeId,
    pub desired: DesiredState,
    pub observed: ObservedState,
    pub created_at_ms: u64,
    pub updated_at_ms: u64,
    pub revision: u64,
    pub generation: u64,
    pub runtime: VmRuntime,
    pub placement: Placement,
    pub queued_at: u64,
    pub preempted_by: String,
    pub leaving: NodeId,
    pub reschedule: Reschedule,
    pub history: Vec<Move>,
    pub moving: Option<PendingMove>,
    pub placement_gen: u64,
}

impl From<VmRecordV5> for VmRecord {
    /// No address yet: the cluster's VM network, once set, gives it one.
    fn from(v: VmRecordV5) -> Self {
        VmRecord {
            name: v.name,
            spec: v.spec,
            node_id: v.node_id,
            desired: v.desired,
            observed: v.observed,
            created_at_ms: v.created_at_ms,
            updated_at_ms: v.updated_at_ms,
            revision: v.revision,
            generation: v.generation,
            runtime: v.runtime,
            placement: v.placement,
            queued_at: v.queued_at,
            preempted_by: v.preempted_by,
            leaving: v.leaving,
            reschedule: v.reschedule,
            history: v.history,
            moving: v.moving,
            placement_gen: v.placement_gen,
            ip: None,
            publish: Vec::new(),
        }
    }
}

/// A node record in formats 4 and 5: no VM subnet.
#[derive(Deserialize)]
pub struct NodeRecordV5 {
    pub id: NodeId,
    pub addr: String,
    pub resources: NodeResources,
    pub allocated: Resources,
    pub labels: BTreeMap<String, String>,
    pub status: NodeStatus,
    pub registered_at_ms: u64,
    pub updated_at_ms: u64,
    pub registered: Registration,
    pub overrides: NodeOverrides,
    pub down: bool,
    pub drain: Option<Drain>,
    pub heartbeats: bool,
}

impl From<NodeRecordV5> for NodeRecord {
    fn from(n: NodeRecordV5) -> Self {
        NodeRecord {
            id: n.id,
            addr: n.addr,
            resources: n.resources,
            allocated: n.allocated,
            labels: n.labels,
            status: n.status,
            registered_at_ms: n.registered_at_ms,
            updated_at_ms: n.updated_at_ms,
            registered: n.registered,
            overrides: n.overrides,
            down: n.down,
            drain: n.drain,
            heartbeats: n.heartbeats,
            vm_subnet: None,
        }
    }
}

/// A node record in formats 2 and 3: no liveness, no drain.
#[derive(Deserialize)]
pub struct NodeRecordV3 {
    pub id: NodeId,
    pub addr: String,
    pub resources: NodeResources,
    pub allocated: Resources,
    pub labels: BTreeMap<String, String>,
    pub status: NodeStatus,
    pub registered_at_ms: u64,
    pub updated_at_ms: u64,
    pub registered: Registration,
    pub overrides: NodeOverrides,
}

impl From<NodeRecordV3> for NodeRecord {
    /// Not down (it will be if it stays silent), not draining.
    fn from(n: NodeRecordV3) -> Self {
        NodeRecord {
            id: n.id,
            addr: n.addr,
            resources: n.resources,
            allocated: n.allocated,
            labels: n.labels,
            status: n.status,
            registered_at_ms: n.registered_at_ms,
            updated_at_ms: n.updated_at_ms,
            registered: n.registered,
            overrides: n.overrides,
            down: false,
            drain: None,
            heartbeats: false,
            vm_subnet: None,
        }
    }
}

/// A node record in formats 0 and 1: capacity only.
#[derive(Deserialize)]
pub struct NodeRecordV1 {
    pub id: NodeId,
    pub addr: String,
    pub capacity: Resources,
    pub allocated: Resources,
    pub labels: BTreeMap<String, String>,
    pub status: NodeStatus,
    pub registered_at_ms: u64,
    pub updated_at_ms: u64,
}

impl From<NodeRecordV1> for NodeRecord {
    /// Nothing reserved, no overcommit, no operator overrides: what the
    /// node had under format 1.
    fn from(n: NodeRecordV1) -> Self {
        let resources = NodeResources::plain(n.capacity);
        NodeRecordV3 {
            id: n.id,
            addr: n.addr,
            resources,
            allocated: n.allocated,
            registered: Registration { resources, labels: n.labels.clone() },
            labels: n.labels,
            status: n.status,
            registered_at_ms: n.registered_at_ms,
            updated_at_ms: n.updated_at_ms,
            overrides: NodeOverrides::default(),
        }
        .into()
    }
}

/// The state image in formats 0 and 1. Request results kept their shape
/// (enums only gained variants at the end).
#[derive(Deserialize)]
pub struct StateImageV1 {
    pub nodes: Vec<NodeRecordV1>,
    pub vms: Vec<VmRecordV2>,
    pub requests: Vec<(RequestId, CommandResult)>,
}

/// The state image in format 2: format-2 node records, quotas and the
/// strategy; VM records without placement rules.
#[derive(Deserialize)]
pub struct StateImageV2 {
    pub nodes: Vec<NodeRecordV3>,
    pub vms: Vec<VmRecordV2>,
    pub requests: Vec<(RequestId, CommandResult)>,
    pub quotas: Vec<(String, QuotaLimits)>,
    pub scheduler: Strategy,
}

impl From<StateImageV2> for StateImage {
    fn from(i: StateImageV2) -> Self {
        StateImage {
            nodes: i.nodes.into_iter().map(NodeRecord::from).collect(),
            vms: i.vms.into_iter().map(VmRecord::from).collect(),
            requests: i.requests,
            quotas: i.quotas,
            scheduler: i.scheduler,
            node_timeout_ms: DEFAULT_NODE_TIMEOUT_MS,
            prev_node_timeout_ms: DEFAULT_NODE_TIMEOUT_MS,
            tokens: Vec::new(),
            tokens_bootstrapped: false,
            vm_cidr: None,
        }
    }
}

/// The state image in format 3: format-3 VM records, no liveness, no
/// node timeout.
#[derive(Deserialize)]
pub struct StateImageV3 {
    pub nodes: Vec<NodeRecordV3>,
    pub vms: Vec<VmRecordV3>,
    pub requests: Vec<(RequestId, CommandResult)>,
    pub quotas: Vec<(String, QuotaLimits)>,
    pub scheduler: Strategy,
}

impl From<StateImageV3> for StateImage {
    fn from(i: StateImageV3) -> Self {
        StateImage {
            nodes: i.nodes.into_iter().map(NodeRecord::from).collect(),
            vms: i.vms.into_iter().map(VmRecord::from).collect(),
            requests: i.requests,
            quotas: i.quotas,
            scheduler: i.scheduler,
            node_timeout_ms: DEFAULT_NODE_TIMEOUT_MS,
            prev_node_timeout_ms: DEFAULT_NODE_TIMEOUT_MS,
            tokens: Vec::new(),
            tokens_bootstrapped: false,
            vm_cidr: None,
        }
    }
}

/// The state image in format 4: no tokens.
#[derive(Deserialize)]
pub struct StateImageV4 {
    pub nodes: Vec<NodeRecordV5>,
    pub vms: Vec<VmRecordV5>,
    pub requests: Vec<(RequestId, CommandResult)>,
    pub quotas: Vec<(String, QuotaLimits)>,
    pub scheduler: Strategy,
    pub node_timeout_ms: u64,
    pub prev_node_timeout_ms: u64,
}

impl From<StateImageV4> for StateImage {
    fn from(i: StateImageV4) -> Self {
        StateImage {
            nodes: i.nodes.into_iter().map(NodeRecord::from).collect(),
            vms: i.vms.into_iter().map(VmRecord::from).collect(),
            requests: i.requests,
            quotas: i.quotas,
            scheduler: i.scheduler,
            node_timeout_ms: i.node_timeout_ms,
            prev_node_timeout_ms: i.prev_node_timeout_ms,
            tokens: Vec::new(),
            tokens_bootstrapped: false,
            vm_cidr: None,
        }
    }
}

/// The state image in format 5: records without addresses, no VM network.
#[derive(Deserialize)]
pub struct StateImageV5 {
    pub nodes: Vec<NodeRecordV5>,
    pub vms: Vec<VmRecordV5>,
    pub requests: Vec<(RequestId, CommandResult)>,
    pub quotas: Vec<(String, QuotaLimits)>,
    pub scheduler: Strategy,
    pub node_timeout_ms: u64,
    pub prev_node_timeout_ms: u64,
    pub tokens: Vec<TokenRecord>,
    pub tokens_bootstrapped: bool,
}

impl From<StateImageV5> for StateImage {
    /// No VM network yet: the first leader under format 6 sets the default
    /// one, which gives every node its subnet and every held VM an address.
    fn from(i: StateImageV5) -> Self {
        StateImage {
            nodes: i.nodes.into_iter().map(NodeRecord::from).collect(),
            vms: i.vms.into_iter().map(VmRecord::from).collect(),
            requests: i.requests,
            quotas: i.quotas,
            scheduler: i.scheduler,
            node_timeout_ms: i.node_timeout_ms,
            prev_node_timeout_ms: i.prev_node_timeout_ms,
            tokens: i.tokens,
            tokens_bootstrapped: i.tokens_bootstrapped,
            vm_cidr: None,
        }
    }
}

impl From<StateImageV1> for StateImage {
    fn from(i: StateImageV1) -> Self {
        StateImage {
            nodes: i.nodes.into_iter().map(NodeRecord::from).collect(),
            vms: i.vms.into_iter().map(VmRecord::from).collect(),
            requests: i.requests,
            quotas: Vec::new(),
            scheduler: Default::default(),
            node_timeout_ms: DEFAULT_NODE_TIMEOUT_MS,
            prev_node_timeout_ms: DEFAULT_NODE_TIMEOUT_MS,
            tokens: Vec::new(),
            tokens_bootstrapped: false,
            vm_cidr: None,
        }
    }
}
