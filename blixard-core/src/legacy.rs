//! Types of earlier format versions, kept only to read old data and
//! convert it (see "Format versions" in docs/ARCHITECTURE.md). Each is the
//! exact serde shape that version wrote; never change one.
use std::collections::BTreeMap;

use serde::Deserialize;

use crate::command::{CommandResult, RequestId};
use crate::state::StateImage;
use crate::types::{
    NodeId, NodeOverrides, NodeRecord, NodeResources, NodeStatus, Registration, Resources, VmRecord,
};

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
        NodeRecord {
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
    }
}

/// The state image in formats 0 and 1. VM records and request results kept
/// their shape (enums only gained variants at the end).
#[derive(Deserialize)]
pub struct StateImageV1 {
    pub nodes: Vec<NodeRecordV1>,
    pub vms: Vec<VmRecord>,
    pub requests: Vec<(RequestId, CommandResult)>,
}

impl From<StateImageV1> for StateImage {
    fn from(i: StateImageV1) -> Self {
        StateImage {
            nodes: i.nodes.into_iter().map(NodeRecord::from).collect(),
            vms: i.vms,
            requests: i.requests,
            quotas: Vec::new(),
            scheduler: Default::default(),
        }
    }
}
