//! Domain types shared by commands, state, API and storage.
//!
//! Everything here is plain data: serde-encodable (bincode on the Raft log and
//! in snapshots), cheap to compare, no behaviour that touches IO or time.
use std::collections::BTreeMap;
use std::fmt;
use std::net::Ipv4Addr;
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
    /// Waiting for capacity: should run, placed on no node (format 3).
    Queued,
}

impl ObservedState {
    /// Every state, in declaration order (`as usize` indexes it).
    pub const ALL: [ObservedState; 8] = [
        ObservedState::Pending,
        ObservedState::Starting,
        ObservedState::Running,
        ObservedState::Stopping,
        ObservedState::Stopped,
        ObservedState::Failed,
        ObservedState::Lost,
        ObservedState::Queued,
    ];

    pub fn as_str(&self) -> &'static str {
        match self {
            ObservedState::Pending => "pending",
            ObservedState::Starting => "starting",
            ObservedState::Running => "running",
            ObservedState::Stopping => "stopping",
            ObservedState::Stopped => "stopped",
            ObservedState::Failed => "failed",
            ObservedState::Lost => "lost",
            ObservedState::Queued => "queued",
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
    /// Where it may run and how important it is (format 3).
    pub placement: Placement,
    /// While it waits in the queue: the log index at which it entered it
    /// (the queue's "oldest first"); 0 otherwise.
    pub queued_at: u64,
    /// The VM whose create evicted it, last time it was preempted; empty if
    /// it never was.
    pub preempted_by: String,
    /// The node it was evicted from, until that node reports it stopped
    /// (or leaves the cluster); 0 otherwise. Until then it is placed
    /// nowhere else, so it never runs on two nodes at once.
    pub leaving: NodeId,
    /// What happens to it when its node is marked down (format 4).
    pub reschedule: Reschedule,
    /// Where it ran before and why it moved: the last [`MAX_HISTORY`]
    /// moves, oldest first (format 4).
    pub history: Vec<Move>,
    /// Why it is leaving its node and where it should go, while `leaving`
    /// is set by a migration or drain (format 4).
    pub moving: Option<PendingMove>,
    /// Bumped each time it is placed on another node (format 4).
    pub placement_gen: u64,
    /// Its address in the VM network (format 6): from the subnet of the
    /// node that holds it (placed there, or stopping there while it
    /// leaves), allocated in apply (lowest free), released when it is
    /// deleted or leaves that node. `None` while it is held by no node or
    /// before the cluster has a VM network.
    pub ip: Option<Ipv4Addr>,
    /// TCP ports its node forwards to it (format 6), fixed at create.
    pub publish: Vec<PortMap>,
}

/// An IPv4 network: an address and a prefix length (format 6).
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Ipv4Net {
    pub addr: Ipv4Addr,
    pub prefix: u8,
}

impl Ipv4Net {
    /// The VM network of a cluster bootstrapped without `--vm-cidr`.
    pub const DEFAULT_VM_CIDR: Ipv4Net = Ipv4Net { addr: Ipv4Addr::new(10, 88, 0, 0), prefix: 16 };

    /// Parses `A.B.C.D/N`; the address must be the network's first (no
    /// host bits set).
    pub fn parse(s: &str) -> Result<Ipv4Net, String> {
        let (a, p) =
            s.split_once('/').ok_or_else(|| format!("{s:?} is not a network: write it as A.B.C.D/N"))?;
        let addr: Ipv4Addr = a.parse().map_err(|_| format!("{a:?} is not an IPv4 address"))?;
        let prefix: u8 = p
            .parse()
            .ok()
            .filter(|p| *p <= 32)
            .ok_or_else(|| format!("{p:?} is not a prefix length (0-32)"))?;
        let net = Ipv4Net { addr, prefix };
        if net.network() != addr {
            return Err(format!("{s} has host bits set: the network is {}/{prefix}", net.network()));
        }
        Ok(net)
    }

    fn mask(&self) -> u32 {
        if self.prefix == 0 {
            0
        } else {
            u32::MAX << (32 - u32::from(self.prefix.min(32)))
        }
    }

    /// The network's first address.
    pub fn network(&self) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.addr) & self.mask())
    }

    pub fn contains(&self, ip: Ipv4Addr) -> bool {
        u32::from(ip) & self.mask() == u32::from(self.network())
    }

    /// The `n`th address of the network (0 = the network address).
    pub fn nth(&self, n: u32) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.network()).wrapping_add(n))
    }

    /// How many addresses it spans.
    pub fn size(&self) -> u64 {
        1u64 << (32 - u32::from(self.prefix.min(32)))
    }

    /// The gateway of a node's VM subnet: its first usable address.
    pub fn gateway(&self) -> Ipv4Addr {
        self.nth(1)
    }
}

impl fmt::Display for Ipv4Net {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

/// The prefix of the subnet each node gets from the VM network.
pub const NODE_SUBNET_PREFIX: u8 = 24;

/// Host numbers of a node subnet that VMs get: .2 to .254 (.0 is the
/// network, .1 the node's bridge, .255 broadcast).
pub const FIRST_VM_HOST: u32 = 2;
pub const LAST_VM_HOST: u32 = 254;

/// A published port: the node's TCP `host` port forwarded to the VM's
/// `guest` port (format 6).
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PortMap {
    pub host: u16,
    pub guest: u16,
}

impl PortMap {
    /// Parses `HOST_PORT:GUEST_PORT` (both 1-65535).
    pub fn parse(s: &str) -> Result<PortMap, String> {
        let (h, g) = s
            .split_once(':')
            .ok_or_else(|| format!("{s:?}: write a published port as HOST_PORT:GUEST_PORT"))?;
        let port = |p: &str| {
            p.parse::<u16>()
                .ok()
                .filter(|p| *p != 0)
                .ok_or_else(|| format!("{p:?} is not a TCP port (1-65535)"))
        };
        Ok(PortMap { host: port(h)?, guest: port(g)? })
    }
}

impl fmt::Display for PortMap {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.host, self.guest)
    }
}

/// How many moves a VM's `history` keeps.
pub const MAX_HISTORY: usize = 10;

/// What happens to a VM when its node is marked down.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum Reschedule {
    /// Placed again on another node (or queued if nothing fits).
    #[default]
    OnNodeFailure,
    /// Stays on its node (as `lost`) until the node is back.
    Never,
}

impl Reschedule {
    pub fn as_str(&self) -> &'static str {
        match self {
            Reschedule::OnNodeFailure => "on-node-failure",
            Reschedule::Never => "never",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "on-node-failure" => Some(Reschedule::OnNodeFailure),
            "never" => Some(Reschedule::Never),
            _ => None,
        }
    }
}

/// Why a VM left a node.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum MoveReason {
    /// Its node was marked down (failover).
    NodeDown,
    /// Its node was drained.
    Drain,
    /// An operator migrated it.
    Migrate,
    /// A VM of higher priority took its place.
    Preempted,
}

impl MoveReason {
    pub fn as_str(&self) -> &'static str {
        match self {
            MoveReason::NodeDown => "node-down",
            MoveReason::Drain => "drain",
            MoveReason::Migrate => "migrate",
            MoveReason::Preempted => "preempted",
        }
    }
}

/// One move of a VM: it left node `from` and was placed on `to` (0:
/// queued, nothing fitted).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct Move {
    pub from: NodeId,
    pub to: NodeId,
    pub reason: MoveReason,
    pub at_ms: u64,
    /// The log index of the command that placed it on `to`.
    pub revision: u64,
}

/// A move under way: the VM waits (`leaving`) until its old node has
/// stopped it, then goes to `to` if it fits there, else where the
/// scheduler places it.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
pub struct PendingMove {
    pub reason: MoveReason,
    /// The preferred target; 0 = the scheduler's choice.
    pub to: NodeId,
}

impl VmRecord {
    /// The node that holds it: where it is placed, or, while unplaced, the
    /// node it is still stopping on (`leaving`); 0: none. Its address and
    /// published ports belong to this node.
    pub fn holder(&self) -> NodeId {
        if self.node_id != 0 {
            self.node_id
        } else {
            self.leaving
        }
    }

    /// Placed on no node (`node_id` 0): queued, or stopped while queued.
    pub fn is_unplaced(&self) -> bool {
        self.node_id == 0
    }

    /// Waiting in the queue: unplaced and meant to run.
    pub fn is_queued(&self) -> bool {
        self.node_id == 0 && self.desired == DesiredState::Running
    }

    /// Queued and free to be placed: not still stopping on the node it was
    /// evicted from.
    pub fn is_placeable(&self) -> bool {
        self.is_queued() && self.leaving == 0
    }
}

/// The default priority of a VM.
pub const DEFAULT_PRIORITY: u8 = 50;
/// The highest priority.
pub const MAX_PRIORITY: u8 = 100;

/// Placement rules of one VM: all hard except `spread_by`, which chooses
/// among the nodes that pass them.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct Placement {
    /// Only this node; 0 = any.
    pub node: NodeId,
    /// All must hold on the node's labels.
    pub constraints: Vec<Constraint>,
    /// No two VMs of this group on one node; empty = no group.
    pub anti_affinity: String,
    /// Prefer the value of this node label holding the fewest VMs of the
    /// same anti-affinity group (or tenant, without a group); empty = none.
    pub spread_by: String,
    /// 0-100: a create that fits nowhere may preempt VMs of strictly lower
    /// priority, and the queue places higher priorities first.
    pub priority: u8,
}

impl Default for Placement {
    fn default() -> Self {
        Self {
            node: 0,
            constraints: Vec::new(),
            anti_affinity: String::new(),
            spread_by: String::new(),
            priority: DEFAULT_PRIORITY,
        }
    }
}

/// `key=value` (the node's label equals) or `key!=value` (it is absent or
/// differs).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Constraint {
    pub key: String,
    pub equal: bool,
    pub value: String,
}

impl Constraint {
    /// Parses `K=V` or `K!=V` (checked further by `validate::constraint`).
    pub fn parse(s: &str) -> Option<Constraint> {
        let (key, value, equal) = match s.split_once("!=") {
            Some((k, v)) => (k, v, false),
            None => {
                let (k, v) = s.split_once('=')?;
                (k, v, true)
            }
        };
        Some(Constraint { key: key.to_string(), equal, value: value.to_string() })
    }

    /// Whether a node with `labels` satisfies it.
    pub fn holds(&self, labels: &BTreeMap<String, String>) -> bool {
        (labels.get(&self.key).map(String::as_str) == Some(self.value.as_str())) == self.equal
    }
}

impl fmt::Display for Constraint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let op = if self.equal { "=" } else { "!=" };
        write!(f, "{}{op}{}", self.key, self.value)
    }
}

/// Whether a node is a member of the cluster. (Liveness and drains are
/// separate fields of [`NodeRecord`]; [`NodeRecord::status`] combines them.)
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum NodeStatus {
    Active,
    /// Removed from the cluster; kept so its history and VMs stay explainable.
    Left,
}

/// An operator's drain of a node: it takes no placements, and its VMs are
/// cold-migrated off, at most `max_parallel` at a time.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
pub struct Drain {
    pub max_parallel: u32,
    /// When the drain should be done (ms since the epoch; 0: none). Past
    /// it, the leader moves every remaining VM that can move at once.
    pub deadline_ms: u64,
    pub started_at_ms: u64,
}

/// What `node list` shows: membership, liveness and drain together.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum NodeState {
    Ready,
    Down,
    Draining,
    Left,
}

impl NodeState {
    pub fn as_str(&self) -> &'static str {
        match self {
            NodeState::Ready => "ready",
            NodeState::Down => "down",
            NodeState::Draining => "draining",
            NodeState::Left => "left",
        }
    }
}

impl NodeStatus {
    pub fn as_str(&self) -> &'static str {
        match self {
            NodeStatus::Active => "active",
            NodeStatus::Left => "left",
        }
    }
}

/// An overcommit ratio in thousandths (1000 = 1.0): an integer, so every
/// replica computes exactly the same allocatable resources.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Ratio(pub u32);

impl Ratio {
    pub const ONE: Ratio = Ratio(1000);
    /// The accepted range: 0.1 to 64.
    pub const MIN: Ratio = Ratio(100);
    pub const MAX: Ratio = Ratio(64_000);

    /// Parses a decimal such as `1`, `1.5` or `2.125` (at most three
    /// decimals) within [`Ratio::MIN`]..=[`Ratio::MAX`].
    pub fn parse(s: &str) -> Option<Ratio> {
        let (int, frac) = s.split_once('.').unwrap_or((s, ""));
        if int.is_empty()
            || int.len() > 3
            || frac.len() > 3
            || !(int.chars().chain(frac.chars())).all(|c| c.is_ascii_digit())
        {
            return None;
        }
        let int: u32 = int.parse().ok()?;
        let frac: u32 = if frac.is_empty() { 0 } else { format!("{frac:0<3}").parse().ok()? };
        let r = Ratio(int * 1000 + frac);
        (Ratio::MIN..=Ratio::MAX).contains(&r).then_some(r)
    }

    /// `v` times this ratio, rounded down.
    pub fn scale(self, v: u64) -> u64 {
        u64::try_from(u128::from(v) * u128::from(self.0) / 1000).unwrap_or(u64::MAX)
    }

    pub fn as_f64(self) -> f64 {
        f64::from(self.0) / 1000.0
    }
}

impl fmt::Display for Ratio {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (int, frac) = (self.0 / 1000, self.0 % 1000);
        if frac == 0 {
            write!(f, "{int}")
        } else {
            let frac = format!("{frac:03}");
            write!(f, "{int}.{}", frac.trim_end_matches('0'))
        }
    }
}

/// What a node offers for placement: its capacity, the part reserved for
/// the host, and how far CPU and memory may be overcommitted. Allocatable =
/// (capacity - reserved) x ratio per dimension (disk is never overcommitted).
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
pub struct NodeResources {
    pub capacity: Resources,
    pub reserved: Resources,
    pub cpu_overcommit: Ratio,
    pub memory_overcommit: Ratio,
}

impl NodeResources {
    /// The whole capacity, nothing reserved, no overcommit.
    pub fn plain(capacity: Resources) -> Self {
        Self {
            capacity,
            reserved: Resources::ZERO,
            cpu_overcommit: Ratio::ONE,
            memory_overcommit: Ratio::ONE,
        }
    }

    pub fn allocatable(&self) -> Resources {
        let base = self.capacity.saturating_sub(&self.reserved);
        Resources {
            vcpus: u32::try_from(self.cpu_overcommit.scale(u64::from(base.vcpus))).unwrap_or(u32::MAX),
            memory_mb: self.memory_overcommit.scale(base.memory_mb),
            disk_gb: base.disk_gb,
        }
    }
}

/// Changes an operator made with `node set`. They outlive the node's own
/// re-registrations (which carry its start flags) until changed again.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
pub struct NodeOverrides {
    /// Labels set (added or replaced) by the operator.
    pub labels: BTreeMap<String, String>,
    /// Labels removed by the operator, even if the node's flags set them.
    pub removed_labels: std::collections::BTreeSet<String>,
    pub cpu_overcommit: Option<Ratio>,
    pub memory_overcommit: Option<Ratio>,
}

/// A node as the cluster state knows it.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct NodeRecord {
    pub id: NodeId,
    pub addr: String,
    /// Effective: the node's flags with the operator's overrides applied.
    pub resources: NodeResources,
    /// Sum of the resources of the VMs placed on this node.
    pub allocated: Resources,
    /// Effective labels: the node's own, with the operator's overrides.
    pub labels: BTreeMap<String, String>,
    pub status: NodeStatus,
    pub registered_at_ms: u64,
    pub updated_at_ms: u64,
    /// What the node registered with (its start flags).
    pub registered: Registration,
    pub overrides: NodeOverrides,
    /// Marked down by the leader: not heard from for the node timeout
    /// (format 4).
    pub down: bool,
    /// An operator drain in force, until `node eligible` (format 4).
    pub drain: Option<Drain>,
    /// The leader has heard this node heartbeat (format 4): only such nodes
    /// are marked down, so a node of an older version (which neither
    /// heartbeats nor fences its VMs) is never failed over under it.
    pub heartbeats: bool,
    /// Its /24 of the VM network (format 6), given when it registers (or
    /// when the cluster gets its VM network); its VMs' addresses come from
    /// it. `None` before the cluster has a VM network, or when the network
    /// had no /24 left.
    pub vm_subnet: Option<Ipv4Net>,
}

/// What a node says about itself when it (re-)registers.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct Registration {
    pub resources: NodeResources,
    pub labels: BTreeMap<String, String>,
}

impl Registration {
    /// The effective resources and labels under `overrides`.
    pub fn apply(&self, overrides: &NodeOverrides) -> (NodeResources, BTreeMap<String, String>) {
        let mut resources = self.resources;
        if let Some(r) = overrides.cpu_overcommit {
            resources.cpu_overcommit = r;
        }
        if let Some(r) = overrides.memory_overcommit {
            resources.memory_overcommit = r;
        }
        let mut labels = self.labels.clone();
        labels.retain(|k, _| !overrides.removed_labels.contains(k));
        labels.extend(overrides.labels.iter().map(|(k, v)| (k.clone(), v.clone())));
        (resources, labels)
    }
}

impl NodeRecord {
    /// Left, down, draining or ready, in that order of precedence.
    pub fn state(&self) -> NodeState {
        if self.status == NodeStatus::Left {
            NodeState::Left
        } else if self.down {
            NodeState::Down
        } else if self.drain.is_some() {
            NodeState::Draining
        } else {
            NodeState::Ready
        }
    }

    /// Whether new VMs may be placed here: ready.
    pub fn schedulable(&self) -> bool {
        self.state() == NodeState::Ready
    }

    pub fn capacity(&self) -> Resources {
        self.resources.capacity
    }

    pub fn allocatable(&self) -> Resources {
        self.resources.allocatable()
    }

    /// Allocatable minus allocated: what placement may still use.
    pub fn free(&self) -> Resources {
        self.allocatable().saturating_sub(&self.allocated)
    }
}

/// A tenant's limits; `None` is unlimited in that dimension.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct QuotaLimits {
    pub vcpus: Option<u64>,
    pub memory_mb: Option<u64>,
    pub disk_gb: Option<u64>,
    pub vms: Option<u64>,
}

/// What a tenant's VMs hold (all of them, whatever their state).
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TenantUsage {
    pub vcpus: u64,
    pub memory_mb: u64,
    pub disk_gb: u64,
    pub vms: u64,
}

impl TenantUsage {
    pub fn add(&mut self, r: &Resources) {
        self.vcpus += u64::from(r.vcpus);
        self.memory_mb += r.memory_mb;
        self.disk_gb += r.disk_gb;
        self.vms += 1;
    }

    pub fn sub(&mut self, r: &Resources) {
        self.vcpus = self.vcpus.saturating_sub(u64::from(r.vcpus));
        self.memory_mb = self.memory_mb.saturating_sub(r.memory_mb);
        self.disk_gb = self.disk_gb.saturating_sub(r.disk_gb);
        self.vms = self.vms.saturating_sub(1);
    }

    pub fn is_zero(&self) -> bool {
        *self == TenantUsage::default()
    }
}

impl QuotaLimits {
    /// Why adding `need` (one more VM) to `usage` would exceed these
    /// limits, naming each dimension over; `None` if it fits.
    pub fn exceeded_by(&self, usage: &TenantUsage, need: &Resources) -> Option<String> {
        let dims = [
            ("vCPUs", self.vcpus, usage.vcpus, u64::from(need.vcpus)),
            ("MiB of memory", self.memory_mb, usage.memory_mb, need.memory_mb),
            ("GiB of disk", self.disk_gb, usage.disk_gb, need.disk_gb),
            ("VMs", self.vms, usage.vms, 1),
        ];
        let over: Vec<String> = dims
            .iter()
            .filter_map(|(what, limit, used, more)| {
                let limit = (*limit)?;
                (used + more > limit).then(|| format!("{what}: {used} used + {more} asked > {limit} allowed"))
            })
            .collect();
        (!over.is_empty()).then(|| over.join("; "))
    }
}

/// The cluster's placement strategy.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum Strategy {
    /// The node with the most free memory that fits (spreads load).
    #[default]
    Spread,
    /// The node with the least free memory that fits (packs nodes full).
    Binpack,
}

impl Strategy {
    pub fn as_str(&self) -> &'static str {
        match self {
            Strategy::Spread => "spread",
            Strategy::Binpack => "binpack",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "spread" => Some(Strategy::Spread),
            "binpack" => Some(Strategy::Binpack),
            _ => None,
        }
    }
}
