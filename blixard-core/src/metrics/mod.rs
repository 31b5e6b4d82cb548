//! The node's OpenTelemetry metrics: every instrument created once per node,
//! every attribute set bound once, so recording on a hot path is one atomic
//! update through a cached handle: no lookup, no allocation, no lock.
//!
//! Blixard-core knows only the OpenTelemetry API: the caller hands
//! [`crate::node::NodeConfig`] a `Meter` (the `blixard` binary builds one
//! whose reader is the Prometheus endpoint); without one, every handle is a
//! no-op. Values that already live in the node (Raft's term and indices, the
//! VM table, node resources, the queue) are not copied into instruments on
//! every change: observable gauges read them when a scrape collects.
//!
//! Naming: Prometheus conventions, `blixard_` prefix, the unit in the name
//! (`_seconds`, `_bytes`); counters get `_total` from the exporter. An
//! instrument with an OTel unit is named without it: the exporter appends
//! the suffix (`blixard_raft_apply_duration` + `s` is exported as
//! `blixard_raft_apply_duration_seconds`). Every series carries `node` (the
//! node id). docs/OPERATIONS.md lists them all.
pub mod grpc;

use std::sync::{Arc, OnceLock, Weak};

use opentelemetry::metrics::{BoundCounter, BoundHistogram, Counter, Histogram, Meter, MeterProvider};
use opentelemetry::KeyValue;

use crate::command::{CommandOutput, CommandResult};
use crate::error::CommandError;
use crate::types::{NodeId, ObservedState};

/// Seconds buckets for fast operations (fsync, apply, API calls): 50 µs to
/// 10 s.
const FAST_SECONDS: [f64; 16] = [
    0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0,
];
/// Seconds buckets for VM boots: 100 ms to 2 min.
const BOOT_SECONDS: [f64; 12] = [0.1, 0.25, 0.5, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0, 20.0, 60.0, 120.0];
/// Count buckets (proposals per entry, entries per log write): powers of two
/// up to the batcher's and the log writer's limits.
const COUNT_BUCKETS: [f64; 9] = [1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0];
/// Snapshot sizes: 1 KiB to 1 GiB.
const BYTES_BUCKETS: [f64; 8] = [1e3, 1e4, 1e5, 1e6, 1e7, 1e8, 1e9, 1e10];

/// Why the scheduler turned a VM away (`reason` on rejected placements).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Rejection {
    /// No node has room.
    Capacity,
    /// No node satisfies the VM's constraints, affinity or pin.
    NoFit,
    /// The tenant's quota is exhausted.
    Quota,
}

impl Rejection {
    const ALL: [Rejection; 3] = [Rejection::Capacity, Rejection::NoFit, Rejection::Quota];

    pub fn as_str(self) -> &'static str {
        match self {
            Rejection::Capacity => "capacity",
            Rejection::NoFit => "no_fit",
            Rejection::Quota => "quota",
        }
    }

    fn of(e: &CommandError) -> Option<Rejection> {
        match e.root() {
            CommandError::NoCapacity { .. } => Some(Rejection::Capacity),
            CommandError::NoFit { .. } => Some(Rejection::NoFit),
            CommandError::QuotaExceeded { .. } => Some(Rejection::Quota),
            _ => None,
        }
    }
}

/// A reconciler action on a VM (`action` on `blixard_reconciler_actions_total`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    Start,
    Stop,
    Delete,
}

impl Action {
    const ALL: [Action; 3] = [Action::Start, Action::Stop, Action::Delete];

    pub fn as_str(self) -> &'static str {
        match self {
            Action::Start => "start",
            Action::Stop => "stop",
            Action::Delete => "delete",
        }
    }
}

/// Every instrument of one node, with its attribute sets bound.
pub struct NodeMetrics {
    pub node: NodeId,
    meter: Meter,
    node_attr: KeyValue,
    // Raft.
    pub proposals: BoundCounter<u64>,
    pub batch_proposals: BoundHistogram<u64>,
    pub forward_batch_proposals: BoundHistogram<u64>,
    /// AppendEntries this node answered, by how they came: over gRPC or
    /// the peer link (raft/link.rs).
    pub append_entries_grpc: BoundCounter<u64>,
    pub append_entries_link: BoundCounter<u64>,
    /// Forward calls (`Propose`, `ProposeBatch`) this node answered, by
    /// transport.
    pub forwards_grpc: BoundCounter<u64>,
    pub forwards_link: BoundCounter<u64>,
    pub log_write_entries: BoundHistogram<u64>,
    pub log_fsync_seconds: BoundHistogram<f64>,
    pub apply_seconds: BoundHistogram<f64>,
    pub apply_entries: BoundHistogram<u64>,
    pub leader_changes: BoundCounter<u64>,
    pub snapshots_built: BoundCounter<u64>,
    pub snapshots_installed: BoundCounter<u64>,
    pub snapshot_built_bytes: BoundHistogram<u64>,
    pub snapshot_installed_bytes: BoundHistogram<u64>,
    // Scheduler (counted in apply: every member applies the same log, so
    // every member counts the same placements).
    placed: BoundCounter<u64>,
    queued: BoundCounter<u64>,
    rejected: [BoundCounter<u64>; 3],
    pub preemptions: BoundCounter<u64>,
    // VMs and the reconciler.
    pub boot_seconds: BoundHistogram<f64>,
    pub restarts: BoundCounter<u64>,
    actions: [[BoundCounter<u64>; 2]; 3],
    // The API (see [`grpc`]): bound per (method, code) on first use, so
    // only the pairs that happen become series.
    api_requests: Counter<u64>,
    api_seconds: Histogram<f64>,
    api_cells: Vec<ApiCells>,
    /// Observable instruments registered by [`NodeMetrics::observe`]; kept
    /// so their callbacks live as long as the node.
    observers: OnceLock<Vec<Box<dyn std::any::Any + Send + Sync>>>,
}

/// The lazily bound handles of one API method.
struct ApiCells {
    codes: [OnceLock<BoundCounter<u64>>; grpc::CODES],
    seconds: OnceLock<BoundHistogram<f64>>,
}

impl NodeMetrics {
    /// Instruments from `meter` (`None`: no-op handles).
    pub fn new(meter: Option<&Meter>, node: NodeId) -> Arc<Self> {
        let meter = match meter {
            Some(m) => m.clone(),
            None => opentelemetry::metrics::NoopMeterProvider::new().meter("blixard"),
        };
        let node_attr = KeyValue::new("node", node.to_string());
        let n = std::slice::from_ref(&node_attr);
        let m = &meter;
        let counter =
            |name: &'static str, help: &'static str| m.u64_counter(name).with_description(help).build();
        let seconds = |name: &'static str, help: &'static str, buckets: &[f64]| {
            m.f64_histogram(name)
                .with_description(help)
                .with_unit("s")
                .with_boundaries(buckets.to_vec())
                .build()
        };
        let count = |name: &'static str, help: &'static str, buckets: &[f64]| {
            m.u64_histogram(name).with_description(help).with_boundaries(buckets.to_vec()).build()
        };
        let with = |k: &'static str, v: &'static str| [node_attr.clone(), KeyValue::new(k, v)];

        let snapshots = counter("blixard_raft_snapshots", "Raft snapshots built or installed by this node");
        let appends = counter(
            "blixard_raft_append_entries",
            "AppendEntries this node answered as a follower, by transport (grpc, link: the peer link)",
        );
        let forwards = counter(
            "blixard_raft_forwards",
            "Calls of client writes forwarded by a follower that this node answered, by transport (grpc, link: the peer link)",
        );
        let snapshot_bytes = m
            .u64_histogram("blixard_raft_snapshot_size")
            .with_description("Size of the Raft snapshots this node built or installed")
            .with_unit("By")
            .with_boundaries(BYTES_BUCKETS.to_vec())
            .build();
        let placements = counter(
            "blixard_scheduler_placements",
            "VM placements applied, by outcome (placed, queued, rejected) and rejection reason",
        );
        let actions = counter(
            "blixard_reconciler_actions",
            "Reconciler actions on this node's VMs, by action and result",
        );
        let action_cells = Action::ALL.map(|a| {
            ["ok", "error"].map(|r| {
                actions.bind(&[
                    node_attr.clone(),
                    KeyValue::new("action", a.as_str()),
                    KeyValue::new("result", r),
                ])
            })
        });
        let rejected = Rejection::ALL.map(|r| {
            placements.bind(&[
                node_attr.clone(),
                KeyValue::new("outcome", "rejected"),
                KeyValue::new("reason", r.as_str()),
            ])
        });
        let api_cells = (0..grpc::METHODS.len())
            .map(|_| ApiCells { codes: std::array::from_fn(|_| OnceLock::new()), seconds: OnceLock::new() })
            .collect();
        Arc::new(Self {
            node,
            proposals: counter(
                "blixard_raft_proposals",
                "Client proposals this node handed to Raft as leader",
            )
            .bind(n),
            batch_proposals: count(
                "blixard_raft_batch_proposals",
                "Proposals per Raft entry (the batcher's group commit)",
                &COUNT_BUCKETS,
            )
            .bind(n),
            forward_batch_proposals: count(
                "blixard_raft_forward_batch_proposals",
                "Client writes per call a follower forwards to the leader",
                &COUNT_BUCKETS,
            )
            .bind(n),
            append_entries_grpc: appends.bind(&with("transport", "grpc")),
            append_entries_link: appends.bind(&with("transport", "link")),
            forwards_grpc: forwards.bind(&with("transport", "grpc")),
            forwards_link: forwards.bind(&with("transport", "link")),
            log_write_entries: count(
                "blixard_raft_log_write_entries",
                "Raft entries made durable per log write (one fsync)",
                &COUNT_BUCKETS,
            )
            .bind(n),
            log_fsync_seconds: seconds(
                "blixard_raft_log_fsync_duration",
                "Time to write and fsync one group of Raft log operations",
                &FAST_SECONDS,
            )
            .bind(n),
            apply_seconds: seconds(
                "blixard_raft_apply_duration",
                "Time to apply one run of committed entries to the state",
                &FAST_SECONDS,
            )
            .bind(n),
            apply_entries: count(
                "blixard_raft_apply_entries",
                "Committed entries per apply run",
                &COUNT_BUCKETS,
            )
            .bind(n),
            leader_changes: counter(
                "blixard_raft_leader_changes",
                "Times this node saw the cluster's leader change (including to none)",
            )
            .bind(n),
            snapshots_built: snapshots.bind(&with("kind", "built")),
            snapshots_installed: snapshots.bind(&with("kind", "installed")),
            snapshot_built_bytes: snapshot_bytes.bind(&with("kind", "built")),
            snapshot_installed_bytes: snapshot_bytes.bind(&with("kind", "installed")),
            placed: placements.bind(&with("outcome", "placed")),
            queued: placements.bind(&with("outcome", "queued")),
            rejected,
            preemptions: counter(
                "blixard_scheduler_preemptions",
                "VMs evicted to make room for higher priority ones",
            )
            .bind(n),
            boot_seconds: seconds(
                "blixard_vm_boot_duration",
                "Time from a VM's start to its guest being up, on this node",
                &BOOT_SECONDS,
            )
            .bind(n),
            restarts: counter("blixard_vm_restarts", "VM restarts by the restart policy on this node")
                .bind(n),
            actions: action_cells,
            api_requests: counter(
                "blixard_api_requests",
                "Public API requests served by this node, by method and code",
            ),
            api_seconds: seconds(
                "blixard_api_request_duration",
                "Time to answer a public API request, by method",
                &FAST_SECONDS,
            ),
            api_cells,
            observers: OnceLock::new(),
            meter,
            node_attr,
        })
    }

    /// No-op handles (tests, tools).
    pub fn noop(node: NodeId) -> Arc<Self> {
        Self::new(None, node)
    }

    /// Counts what one applied proposal did to placement.
    #[inline]
    pub fn record_outcome(&self, result: &CommandResult) {
        match result {
            Ok(out) => self.record_output(out),
            Err(e) => {
                if let Some(r) = Rejection::of(e) {
                    self.rejected[r as usize].add(1);
                }
            }
        }
    }

    fn record_output(&self, out: &CommandOutput) {
        match out {
            CommandOutput::VmCreated { node_id, .. } => self.count_placement(*node_id),
            CommandOutput::VmsCreated { vms } => {
                for vm in vms {
                    self.count_placement(vm.node_id);
                    if !vm.preempted.is_empty() {
                        self.preemptions.add(vm.preempted.len() as u64);
                    }
                }
            }
            CommandOutput::NodeDownSet { moved, queued, .. } => {
                if *moved > 0 {
                    self.placed.add(*moved);
                }
                if *queued > 0 {
                    self.queued.add(*queued);
                }
            }
            CommandOutput::Batch(outs) => outs.iter().for_each(|o| self.record_output(o)),
            _ => {}
        }
    }

    #[inline]
    fn count_placement(&self, node: NodeId) {
        if node == 0 {
            self.queued.add(1)
        } else {
            self.placed.add(1)
        }
    }

    /// Counts one reconciler action and whether it succeeded.
    #[inline]
    pub fn action(&self, action: Action, ok: bool) {
        self.actions[action as usize][usize::from(!ok)].add(1);
    }

    /// Counts one API request to `grpc::METHODS[method]` that ended with
    /// gRPC code `code` after `seconds`.
    #[inline]
    pub fn api_request(&self, method: usize, code: usize, seconds: f64) {
        let Some(cells) = self.api_cells.get(method) else { return };
        let code = code.min(grpc::CODES - 1);
        cells.codes[code]
            .get_or_init(|| {
                self.api_requests.bind(&[
                    self.node_attr.clone(),
                    KeyValue::new("method", grpc::METHODS[method]),
                    KeyValue::new("code", grpc::CODE_NAMES[code]),
                ])
            })
            .add(1);
        cells
            .seconds
            .get_or_init(|| {
                self.api_seconds
                    .bind(&[self.node_attr.clone(), KeyValue::new("method", grpc::METHODS[method])])
            })
            .record(seconds);
    }

    /// Registers the observable gauges, which read `source` when collected.
    /// Called once, when the node is up; later calls do nothing.
    pub fn observe(&self, source: Weak<dyn Observed>) {
        let m = &self.meter;
        let mut keep: Vec<Box<dyn std::any::Any + Send + Sync>> = Vec::new();
        let node = self.node_attr.clone();
        macro_rules! gauge {
            ($kind:ident, $name:expr, $help:expr, |$s:ident, $o:ident, $n:ident| $body:block) => {{
                let src = source.clone();
                let $n = node.clone();
                keep.push(Box::new(
                    m.$kind($name)
                        .with_description($help)
                        .with_callback(move |$o| {
                            if let Some($s) = src.upgrade() {
                                $body
                            }
                        })
                        .build(),
                ));
            }};
        }
        gauge!(u64_observable_gauge, "blixard_raft_term", "The current Raft term", |s, o, n| {
            o.observe(s.raft().term, std::slice::from_ref(&n));
        });
        gauge!(
            u64_observable_gauge,
            "blixard_raft_leader_id",
            "The leader this node knows of (0: none)",
            |s, o, n| {
                o.observe(s.raft().leader, std::slice::from_ref(&n));
            }
        );
        gauge!(
            u64_observable_gauge,
            "blixard_raft_is_leader",
            "1 if this node leads the cluster, else 0",
            |s, o, n| {
                o.observe(u64::from(s.raft().is_leader), std::slice::from_ref(&n));
            }
        );
        gauge!(
            u64_observable_gauge,
            "blixard_raft_last_log_index",
            "The last entry in this node's Raft log",
            |s, o, n| {
                o.observe(s.raft().last_log_index, std::slice::from_ref(&n));
            }
        );
        gauge!(
            u64_observable_gauge,
            "blixard_raft_commit_index",
            "The last entry this node knows to be committed",
            |s, o, n| {
                o.observe(s.raft().commit_index, std::slice::from_ref(&n));
            }
        );
        gauge!(
            u64_observable_gauge,
            "blixard_raft_applied_index",
            "The last entry this node has applied to its state",
            |s, o, n| {
                o.observe(s.raft().applied_index, std::slice::from_ref(&n));
            }
        );
        let states: Vec<[KeyValue; 2]> =
            ObservedState::ALL.iter().map(|st| [node.clone(), KeyValue::new("state", st.as_str())]).collect();
        gauge!(
            u64_observable_gauge,
            "blixard_vms",
            "VMs placed on this node, by observed state",
            |s, o, _n| {
                let counts = s.vms_by_state();
                for (i, attrs) in states.iter().enumerate() {
                    o.observe(counts[i], attrs);
                }
            }
        );
        gauge!(
            u64_observable_gauge,
            "blixard_scheduler_queued_vms",
            "VMs waiting in the cluster's placement queue",
            |s, o, n| {
                o.observe(s.queued_vms(), std::slice::from_ref(&n));
            }
        );
        let kinds: [[KeyValue; 2]; 3] =
            ["capacity", "allocatable", "allocated"].map(|k| [node.clone(), KeyValue::new("kind", k)]);
        let kinds = Arc::new(kinds);
        for (name, help, dim) in [
            ("blixard_node_vcpus", "This node's vCPUs: capacity, allocatable (after reservation and overcommit) and allocated to VMs", 0usize),
            ("blixard_node_memory_bytes", "This node's memory: capacity, allocatable and allocated to VMs", 1),
            ("blixard_node_disk_bytes", "This node's disk: capacity, allocatable and allocated to VMs", 2),
        ] {
            let kinds = kinds.clone();
            gauge!(u64_observable_gauge, name, help, |s, o, _n| {
                if let Some(r) = s.node_resources() {
                    for (k, attrs) in kinds.iter().enumerate() {
                        o.observe(r[k][dim], attrs);
                    }
                }
            });
        }
        let _ = self.observers.set(keep);
    }
}

/// Raft figures read when metrics are collected.
#[derive(Clone, Copy, Debug, Default)]
pub struct RaftFigures {
    pub term: u64,
    pub leader: u64,
    pub is_leader: bool,
    pub last_log_index: u64,
    pub commit_index: u64,
    pub applied_index: u64,
}

/// What the observable gauges read; implemented by the node.
pub trait Observed: Send + Sync {
    fn raft(&self) -> RaftFigures;
    /// VMs on this node per [`ObservedState::ALL`] entry.
    fn vms_by_state(&self) -> [u64; ObservedState::ALL.len()];
    fn queued_vms(&self) -> u64;
    /// This node's capacity, allocatable and allocated, each as
    /// [vcpus, memory bytes, disk bytes]; `None` before it registered.
    fn node_resources(&self) -> Option<[[u64; 3]; 3]>;
}
