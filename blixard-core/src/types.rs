//! Domain types shared by commands, state, API and storage.
//!
//! Everything here is plain data: serde-encodable (bincode on the Raft log and
//! in snapshots), cheap to compare, no behaviour that touches IO or time.
use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

/// A node's id in the Raft cluster. 0 is reserved for "none".
pub type NodeId = u64;

/// A bundle of schedulable resources: what a node offers or a VM reserves.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Resources {
    pub vcpus: u32,
    pub memory_mb: u64,
    pub disk_gb: u64,
}

impl Resources {
    pub const ZERO: Resources = Resources { vcpus: 0, memory_mb: 0, disk_gb: 0 };

    pub fn new(vcpus: u32, memory_mb: u64, disk_gb: u64) -> Self {
        Self { vcpus, memory_mb, disk_gb }
    }

    /// True when `self` fits inside `free` in every dimension.
    pub fn fits_in(&self, free: &Resources) -> bool {
        self.vcpus <= free.vcpus && self.memory_mb <= free.memory_mb && self.disk_gb <= free.disk_gb
    }

    /// `self - other`, clamped at zero per dimension.
    pub fn saturating_sub(&self, other: &Resources) -> Resources {
        Resources {
            vcpus: self.vcpus.saturating_sub(other.vcpus),
            memory_mb: self.memory_mb.saturating_sub(other.memory_mb),
            disk_gb: self.disk_gb.saturating_sub(other.disk_gb),
        }
    }

    /// `self + other`, clamped at the type's maximum (validation keeps real
    /// values far below it).
    pub fn saturating_add(&self, other: &Resources) -> Resources {
        Resources {
            vcpus: self.vcpus.saturating_add(other.vcpus),
            memory_mb: self.memory_mb.saturating_add(other.memory_mb),
            disk_gb: self.disk_gb.saturating_add(other.disk_gb),
        }
    }
}

impl fmt::Display for Resources {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} vCPUs, {} MiB, {} GiB", self.vcpus, self.memory_mb, self.disk_gb)
    }
}

/// What a VM asks for.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
pub struct VmSpec {
    pub vcpus: u32,
    pub memory_mb: u64,
    pub disk_gb: u64,
    pub labels: BTreeMap<String, String>,
    /// Owning tenant; empty means the default tenant.
    pub tenant: String,
    pub restart: RestartPolicy,
    /// Kernel, initrd and extra kernel arguments; all empty = the default
    /// guest image. Paths are on the node that runs the VM.
    pub boot: BootSpec,
}

/// What the owning node does when a VM that should run stops running.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum RestartPolicy {
    /// Leave it as it ended (Failed or Stopped).
    Never,
    /// Restart it when it fails (crash, non-zero exit), with exponential backoff.
    #[default]
    OnFailure,
    /// Restart it whenever it is not running, even after a clean power-off.
    Always,
}

impl RestartPolicy {
    pub fn as_str(&self) -> &'static str {
        match self {
            RestartPolicy::Never => "never",
            RestartPolicy::OnFailure => "on-failure",
            RestartPolicy::Always => "always",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "never" => Some(RestartPolicy::Never),
            "on-failure" => Some(RestartPolicy::OnFailure),
            "always" => Some(RestartPolicy::Always),
            _ => None,
        }
    }
}

/// How a VM boots. Empty strings mean "the default guest image".
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
pub struct BootSpec {
    pub kernel: String,
    pub initrd: String,
    pub cmdline: String,
}

/// What the owning node last reported about a VM, beyond its state.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
pub struct VmRuntime {
    /// The VMM process, while it runs.
    pub pid: Option<u32>,
    /// When the current (or last) run was launched, ms since the Unix epoch.
    pub started_at_ms: Option<u64>,
    /// Launch until the guest's readiness marker.
    pub boot_ms: Option<u64>,
    /// Restarts the node made after failures (not operator restarts).
    pub restarts: u32,
    /// Why it failed: the VMM's stderr tail, exit code or signal.
    pub reason: String,
    /// The VM generation (see `VmRecord::generation`) the node last acted on.
    pub generation: u64,
}

impl VmSpec {
    pub fn resources(&self) -> Resources {
        Resources::new(self.vcpus, self.memory_mb, self.disk_gb)
    }
}

/// What the operator wants a VM to be doing.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DesiredState {
    Running,
    Stopped,
}

impl DesiredState {
    pub fn as_str(&self) -> &'static str {
        match self {
            DesiredState::Running => "running",
            DesiredState::Stopped => "stopped",
        }
    }
}

/// What the owning node last reported about a VM.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ObservedState {
    /// Placed, not yet picked up by its node.
    Pending,
    Starting,
    Running,
    Stopping,
    Stopped,
    Failed,
    /// Its node left the cluster; nobody reports on it.
    Lost,
}

impl ObservedState {
    pub fn as_str(&self) -> &'static str {
        match self {
            ObservedState::Pending => "pending",
            ObservedState::Starting => "starting",
            ObservedState::Running => "running",
            ObservedState::Stopping => "stopping",
            ObservedState::Stopped => "stopped",
            ObservedState::Failed => "failed",
            ObservedState::Lost => "lost",
        }
    }
}

/// A VM as the cluster state knows it.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct VmRecord {
    /// Shared with the state's keys and indices: one allocation per VM name.
    pub name: Arc<str>,
    pub spec: VmSpec,
    pub node_id: NodeId,
    pub desired: DesiredState,
    pub observed: ObservedState,
    pub created_at_ms: u64,
    pub updated_at_ms: u64,
    /// Raft log index of the command that last changed this VM.
    pub revision: u64,
    /// Bumped by every operator restart; the node restarts the VM when the
    /// generation it last acted on is older.
    pub generation: u64,
    pub runtime: VmRuntime,
}

/// Whether a node takes part in placement.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum NodeStatus {
    Active,
    /// Removed from the cluster; kept so its history and VMs stay explainable.
    Left,
}

impl NodeStatus {
    pub fn as_str(&self) -> &'static str {
        match self {
            NodeStatus::Active => "active",
            NodeStatus::Left => "left",
        }
    }
}

/// A node as the cluster state knows it.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct NodeRecord {
    pub id: NodeId,
    pub addr: String,
    pub capacity: Resources,
    /// Sum of the resources of the VMs placed on this node.
    pub allocated: Resources,
    pub labels: BTreeMap<String, String>,
    pub status: NodeStatus,
    pub registered_at_ms: u64,
    pub updated_at_ms: u64,
}

impl NodeRecord {
    pub fn free(&self) -> Resources {
        self.capacity.saturating_sub(&self.allocated)
    }
}
