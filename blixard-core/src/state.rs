//! The replicated cluster state and its deterministic `apply`.
//!
//! Tables are read through closures (`with_vm`, `for_each_vm_on`, ...):
//! readers never clone a collection and never block each other. Nodes live
//! in a `DashMap`; VMs, the hot table, in a published [`VmTables`] that
//! readers load without any lock (see `vm_table`). Only the Raft state
//! machine task writes, through one [`ApplyRun`] at a time, so apply itself
//! needs no cross-table locking. Secondary indices keep queries
//! proportional to what they return: VMs by node (inside the VM table), and
//! the [`Scheduler`]'s own (nodes by free memory, label values, VMs per
//! anti-affinity group and tenant per node, the queue). Every VM change in
//! apply goes through one function, [`ApplyRun::set_vm`], which keeps node
//! allocations, tenant usage and the scheduler's indices in step with it.
use crate::codec;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;

use dashmap::DashMap;
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};

use crate::auth::token::{TokenHash, TokenRecord, MAX_TOKENS};
use crate::auth::Role;
use crate::command::{Command, CommandOutput, CommandResult, CreatedVm, NewVm, Proposal, RequestId};
use crate::dedup::Dedup;
use crate::error::CommandError;
use crate::scheduler::{Request, Scheduler, Victim};
use crate::types::{
    DesiredState, NodeId, NodeOverrides, NodeRecord, NodeResources, NodeStatus, ObservedState, Placement,
    QuotaLimits, Registration, Resources, Strategy, TenantUsage, VmRecord, VmRuntime, VmSpec,
};
use crate::types::{Drain, Move, MoveReason, PendingMove, Reschedule, MAX_HISTORY};
use crate::types::{Ipv4Net, PortMap};
use crate::vm_net::api_port;
use crate::vm_table::{VmTables, VmWriter};
use crate::watch::{Change, Feed, Revision};

/// Everything apply may depend on besides the state: the entry's position and
/// the proposer's timestamp. No clock, no randomness.
#[derive(Clone, Copy, Debug)]
pub struct ApplyCtx {
    pub index: u64,
    pub at_ms: u64,
}

pub use crate::dedup::DEDUP_WINDOW;

/// The node timeout of a new cluster (and of data written before format 4).
pub const DEFAULT_NODE_TIMEOUT_MS: u64 = 10_000;

pub struct ClusterState {
    nodes: DashMap<NodeId, NodeRecord>,
    /// Read without locks; see [`crate::vm_table`].
    vms: VmTables,
    /// Placement: the strategy and the scheduler's indices, derived from
    /// the node and VM tables (rebuilt on restore, kept in step by apply).
    sched: Mutex<Scheduler>,
    requests: Mutex<Dedup>,
    /// Tenant limits (replicated) and what each tenant's VMs hold (derived
    /// from the VM table, kept in step by apply).
    quotas: Mutex<BTreeMap<String, QuotaLimits>>,
    usage: Mutex<HashMap<String, TenantUsage>>,
    /// How long the leader waits for a node's heartbeat before it marks the
    /// node down (replicated).
    node_timeout_ms: std::sync::atomic::AtomicU64,
    /// The node timeout before the last change: a node may still hold a
    /// lease granted under it when a new leader takes over.
    prev_node_timeout_ms: std::sync::atomic::AtomicU64,
    /// Signalled after every applied change, so that watchers (the
    /// reconciler) react at once instead of at their next poll.
    changed: tokio::sync::Notify,
    /// What each applied entry changed, for watchers (soft state; see
    /// [`crate::watch`]).
    feed: Feed,
    /// Bearer tokens by the hash of their secret (replicated, format 5):
    /// every authenticated request looks one up.
    tokens: DashMap<TokenHash, TokenRecord>,
    /// Whether the cluster ever made its bootstrap admin token (stays set
    /// when that token is revoked: it is made once).
    tokens_bootstrapped: std::sync::atomic::AtomicBool,
}

/// A serialisable, canonically ordered image of the state (snapshots, digests).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct StateImage {
    pub nodes: Vec<NodeRecord>,
    pub vms: Vec<VmRecord>,
    /// The dedup window, oldest first.
    pub requests: Vec<(RequestId, CommandResult)>,
    /// Tenant quotas by tenant (format 2).
    pub quotas: Vec<(String, QuotaLimits)>,
    /// The placement strategy (format 2).
    pub scheduler: Strategy,
    /// The node timeout (format 4), and the one before its last change.
    pub node_timeout_ms: u64,
    pub prev_node_timeout_ms: u64,
    /// Bearer tokens by name (format 5), and whether the bootstrap token
    /// was ever made.
    pub tokens: Vec<TokenRecord>,
    pub tokens_bootstrapped: bool,
    /// The cluster's VM network (format 6); `None` until a leader sets it
    /// (the founder's `--vm-cidr`, else the default).
    pub vm_cidr: Option<Ipv4Net>,
}

impl Default for StateImage {
    fn default() -> Self {
        Self {
            nodes: Vec::new(),
            vms: Vec::new(),
            requests: Vec::new(),
            quotas: Vec::new(),
            scheduler: Strategy::default(),
            node_timeout_ms: DEFAULT_NODE_TIMEOUT_MS,
            prev_node_timeout_ms: DEFAULT_NODE_TIMEOUT_MS,
            tokens: Vec::new(),
            tokens_bootstrapped: false,
            vm_cidr: None,
        }
    }
}

/// How to undo one mutation; recorded only while applying a batch. A VM's
/// undo also restores what derives from it (its node's allocation, usage,
/// scheduler counts); a node's restores the whole record as it was then.
enum Undo {
    Vm(Arc<str>, Option<Arc<VmRecord>>),
    Node(NodeId, Option<Box<NodeRecord>>),
    Quota(String, Option<QuotaLimits>),
    Strategy(Strategy),
    NodeTimeout(u64, u64),
    /// A token as it was (None: it did not exist), and the bootstrap flag.
    Token(TokenHash, Option<TokenRecord>, bool),
    /// The VM network as it was.
    VmCidr(Option<Ipv4Net>),
}

type Journal<'a> = Option<&'a mut Vec<Undo>>;

impl Default for ClusterState {
    fn default() -> Self {
        Self {
            nodes: DashMap::new(),
            vms: VmTables::default(),
            sched: Mutex::new(Scheduler::default()),
            requests: Mutex::new(Dedup::default()),
            quotas: Mutex::new(BTreeMap::new()),
            usage: Mutex::new(HashMap::new()),
            node_timeout_ms: std::sync::atomic::AtomicU64::new(DEFAULT_NODE_TIMEOUT_MS),
            prev_node_timeout_ms: std::sync::atomic::AtomicU64::new(DEFAULT_NODE_TIMEOUT_MS),
            changed: tokio::sync::Notify::new(),
            feed: Feed::default(),
            tokens: DashMap::new(),
            tokens_bootstrapped: std::sync::atomic::AtomicBool::new(false),
        }
    }
}

impl ClusterState {
    pub fn new() -> Self {
        Self::default()
    }

    /// The cluster's node timeout.
    pub fn node_timeout(&self) -> std::time::Duration {
        std::time::Duration::from_millis(self.node_timeout_ms.load(std::sync::atomic::Ordering::Acquire))
    }

    /// The longest of the node timeout and the one before its last change:
    /// how long a new leader waits before it marks anyone down, since a
    /// lease may have been granted under either.
    pub fn node_timeout_grace(&self) -> std::time::Duration {
        let prev = self.prev_node_timeout_ms.load(std::sync::atomic::Ordering::Acquire);
        self.node_timeout().max(std::time::Duration::from_millis(prev))
    }

    /// Sets the timeout (and the previous one); returns both as they were.
    fn set_node_timeout(&self, ms: u64, prev: u64) -> (u64, u64) {
        let old = self.node_timeout_ms.swap(ms, std::sync::atomic::Ordering::AcqRel);
        let old_prev = self.prev_node_timeout_ms.swap(prev, std::sync::atomic::Ordering::AcqRel);
        (old, old_prev)
    }

    // ------------------------------------------------------------ reads

    /// Runs `f` on the VM named `name`, if it exists. Lock-free and
    /// allocation-free.
    #[inline]
    pub fn with_vm<R>(&self, name: &str, f: impl FnOnce(&VmRecord) -> R) -> Option<R> {
        self.vms.load().get(name).map(|v| f(v))
    }

    /// Runs `f` on the token whose secret hashes to `hash`, if there is one.
    #[inline]
    pub fn with_token<R>(&self, hash: &TokenHash, f: impl FnOnce(&TokenRecord) -> R) -> Option<R> {
        self.tokens.get(hash).map(|t| f(t.value()))
    }

    /// Every token, by name (never on a request path: `token list`).
    pub fn tokens(&self) -> Vec<TokenRecord> {
        let mut all: Vec<TokenRecord> = self.tokens.iter().map(|t| t.value().clone()).collect();
        all.sort_unstable_by(|a, b| a.name.cmp(&b.name));
        all
    }

    /// Whether the cluster has made its bootstrap admin token.
    pub fn tokens_bootstrapped(&self) -> bool {
        self.tokens_bootstrapped.load(std::sync::atomic::Ordering::Acquire)
    }

    /// The bootstrap token's hash, while it exists.
    pub fn bootstrap_token(&self) -> Option<TokenHash> {
        self.tokens.iter().find(|t| t.bootstrap).map(|t| t.hash)
    }

    /// Runs `f` on the node `id`, if it is known.
    pub fn with_node<R>(&self, id: NodeId, f: impl FnOnce(&NodeRecord) -> R) -> Option<R> {
        self.nodes.get(&id).map(|n| f(n.value()))
    }

    /// Visits every VM of one published version, in no particular order.
    pub fn for_each_vm(&self, mut f: impl FnMut(&VmRecord)) {
        for v in self.vms.load().iter() {
            f(v);
        }
    }

    /// Visits the VMs placed on `node`, in name order, via the index.
    pub fn for_each_vm_on(&self, node: NodeId, mut f: impl FnMut(&VmRecord)) {
        for v in self.vms.load().on_node(node) {
            f(v);
        }
    }

    /// Visits every known node, in no particular order.
    pub fn for_each_node(&self, mut f: impl FnMut(&NodeRecord)) {
        for n in self.nodes.iter() {
            f(n.value());
        }
    }

    pub fn vm_count(&self) -> usize {
        self.vms.load().len()
    }

    /// Resolves after the next applied change (register a waiter with
    /// `notified()` before reading the state, then await it).
    pub fn changed(&self) -> &tokio::sync::Notify {
        &self.changed
    }

    /// VMs waiting in the placement queue.
    pub fn queued_count(&self) -> usize {
        self.sched.lock().queue().len()
    }

    /// The change feed: every applied entry's changes, by revision (its
    /// log index).
    pub fn feed(&self) -> &Feed {
        &self.feed
    }

    pub fn node_count(&self) -> usize {
        self.nodes.len()
    }

    // ------------------------------------------------------------ apply

    /// Applies one proposal and publishes the result. See [`ApplyRun::apply`].
    pub fn apply(&self, proposal: &Proposal, index: u64) -> CommandResult {
        let mut run = self.begin_apply();
        run.apply(proposal, index)
    }

    /// Starts a run of applies whose VM changes readers see together, when
    /// the run ends (it is dropped): the Raft state machine applies each
    /// batch of log entries as one run, so publishing costs once per batch.
    /// Only one run exists at a time (the state machine is the only writer).
    pub fn begin_apply(&self) -> ApplyRun<'_> {
        ApplyRun {
            state: self,
            vms: self.vms.write(),
            changed: false,
            touched: BTreeSet::new(),
            entry: EntryChanges::default(),
            revisions: Vec::new(),
            applied: 0,
        }
    }

    /// Changes what node `id` has allocated, keeping the scheduler in step.
    /// Not journaled: it derives from a VM change, whose undo reverses it.
    fn adjust_allocated(&self, id: NodeId, need: &Resources, add: bool) {
        let free = {
            let Some(mut node) = self.nodes.get_mut(&id) else { return };
            node.allocated =
                if add { node.allocated.saturating_add(need) } else { node.allocated.saturating_sub(need) };
            node.free()
        };
        // The shard guard is gone before the scheduler lock is taken: never
        // hold both.
        self.sched.lock().set_free(id, free);
    }

    /// Replaces node `id` (`old` is its current value), keeping the
    /// scheduler in step, and journals the old value when asked to.
    fn put_node(&self, id: NodeId, new: Option<NodeRecord>, old: Option<NodeRecord>, journal: Journal<'_>) {
        {
            let mut sched = self.sched.lock();
            match &new {
                Some(n) => {
                    sched.set_node(id, Some((n.free(), &n.labels, n.schedulable())));
                    sched.net_mut().set_node(id, Some((n.vm_subnet, api_port(&n.addr))));
                }
                None => {
                    sched.set_node(id, None);
                    sched.net_mut().set_node(id, None);
                }
            }
        }
        match new {
            Some(n) => {
                self.nodes.insert(id, n);
            }
            None => {
                self.nodes.remove(&id);
            }
        }
        if let Some(j) = journal {
            j.push(Undo::Node(id, old.map(Box::new)));
        }
    }

    /// Keeps what derives from the VM table in step with one change from
    /// `old` to `new` (same name): the node's allocation, tenant usage, the
    /// scheduler's counts and queue. Cheap when only state or runtime moved.
    fn derive(&self, old: Option<&VmRecord>, new: Option<&VmRecord>) {
        let placed_alike = match (old, new) {
            (Some(o), Some(n)) => {
                o.node_id == n.node_id
                    && o.spec.resources() == n.spec.resources()
                    && o.spec.tenant == n.spec.tenant
                    && o.placement == n.placement
            }
            _ => false,
        };
        if !placed_alike {
            for (vm, add) in [(old, false), (new, true)] {
                let Some(vm) = vm else { continue };
                self.count_usage(&vm.spec, add);
                if vm.node_id != 0 {
                    self.adjust_allocated(vm.node_id, &vm.spec.resources(), add);
                }
                self.sched.lock().count_vm(vm, add);
            }
        }
        fn held(v: Option<&VmRecord>) -> Option<(NodeId, Option<std::net::Ipv4Addr>, &[PortMap])> {
            v.map(|v| (v.holder(), v.ip, &v.publish[..]))
        }
        if held(old) != held(new) {
            let mut sched = self.sched.lock();
            for (vm, add) in [(old, false), (new, true)] {
                if let Some(vm) = vm {
                    sched.net_mut().hold(vm, add);
                }
            }
        }
        let queued = |v: Option<&VmRecord>| v.is_some_and(VmRecord::is_placeable);
        if queued(old) || queued(new) {
            let mut sched = self.sched.lock();
            if let Some(o) = old {
                sched.queue_vm(o, false);
            }
            if let Some(n) = new {
                sched.queue_vm(n, true);
            }
        }
    }

    /// Counts a VM of `spec` in (or out of) its tenant's usage.
    fn count_usage(&self, spec: &VmSpec, add: bool) {
        if spec.tenant.is_empty() {
            return;
        }
        let mut usage = self.usage.lock();
        // The tenant's name is cloned only for its first VM.
        match usage.get_mut(&spec.tenant) {
            Some(u) if add => u.add(&spec.resources()),
            Some(u) => {
                u.sub(&spec.resources());
                if u.is_zero() {
                    usage.remove(&spec.tenant);
                }
            }
            None if add => usage.entry(spec.tenant.clone()).or_default().add(&spec.resources()),
            None => {}
        }
    }

    /// The cluster's VM network, once set.
    pub fn vm_cidr(&self) -> Option<Ipv4Net> {
        self.sched.lock().net().cidr()
    }

    /// The cluster's placement strategy.
    pub fn strategy(&self) -> Strategy {
        self.sched.lock().strategy()
    }

    /// Why `vm` would (or would not) be placed now: the scheduler's
    /// per-filter explanation against this replica's state.
    pub fn explain(&self, vm: &NewVm) -> String {
        let req = Request {
            name: &vm.name,
            need: vm.spec.resources(),
            tenant: &vm.spec.tenant,
            placement: &vm.placement,
            avoid: 0,
            publish: &vm.publish,
        };
        self.sched.lock().explain(&req)
    }

    /// Applies `cmd` to a scratch copy of this state and returns what it
    /// would do: the real apply, on a copy, so it is exact (placement,
    /// preemption, queueing, quotas) and changes nothing here. O(state).
    pub fn dry_run(&self, cmd: &Command, at_ms: u64) -> CommandResult {
        let scratch = ClusterState::new();
        scratch.restore(self.image(), self.feed.revision());
        scratch.apply(&Proposal { at_ms, request: None, command: cmd.clone() }, u64::MAX)
    }

    /// Every quota with its tenant's usage, by tenant.
    pub fn quotas(&self) -> Vec<(String, QuotaLimits, TenantUsage)> {
        let quotas = self.quotas.lock().clone();
        let usage = self.usage.lock();
        quotas
            .into_iter()
            .map(|(t, q)| {
                let u = usage.get(&t).copied().unwrap_or_default();
                (t, q, u)
            })
            .collect()
    }

    // ------------------------------------------------------------ snapshots

    /// A canonical image: nodes by id, VMs by name. O(state); used for
    /// snapshots and digests, never on a request path.
    pub fn image(&self) -> StateImage {
        let (nodes, vms) = self.sorted_records();
        let dedup = self.requests.lock();
        let requests = dedup.results().collect();
        drop(dedup);
        StateImage {
            nodes,
            vms,
            requests,
            quotas: self.quotas_image(),
            scheduler: self.strategy(),
            node_timeout_ms: self.node_timeout().as_millis() as u64,
            prev_node_timeout_ms: self.prev_node_timeout_ms.load(std::sync::atomic::Ordering::Acquire),
            tokens: self.tokens(),
            tokens_bootstrapped: self.tokens_bootstrapped(),
            vm_cidr: self.vm_cidr(),
        }
    }

    /// Nodes by id and VMs by name, copied out (the image's first fields).
    fn sorted_records(&self) -> (Vec<NodeRecord>, Vec<VmRecord>) {
        let mut nodes: Vec<NodeRecord> = Vec::with_capacity(self.nodes.len());
        self.for_each_node(|n| nodes.push(n.clone()));
        nodes.sort_unstable_by_key(|n| n.id);
        let table = self.vms.load();
        let mut vms: Vec<VmRecord> = table.iter().cloned().collect();
        drop(table);
        vms.sort_unstable_by(|a, b| a.name.cmp(&b.name));
        (nodes, vms)
    }

    fn quotas_image(&self) -> Vec<(String, QuotaLimits)> {
        self.quotas.lock().iter().map(|(t, q)| (t.clone(), *q)).collect()
    }

    /// Appends `codec::encode(&self.image())` to `out`, byte for byte,
    /// without building the image's dedup window: the window's results are
    /// kept encoded and are copied as they are. Decoding 65,536 results into
    /// short-lived allocations for every snapshot (and encoding them again)
    /// cost time on the state machine task and left the allocator holding
    /// the freed memory: node RSS rose in a step at every snapshot
    /// (docs/PERFORMANCE.md (c)).
    ///
    /// bincode writes a struct as its fields in order and a sequence as its
    /// length (a `u64`) then its items, so the image is: nodes and VMs, the
    /// window's length, each `(id, result)`, then the remaining fields.
    pub fn encode_image_into(&self, out: &mut Vec<u8>) -> Result<(), codec::CodecError> {
        let (nodes, vms) = self.sorted_records();
        codec::encode_into(&(&nodes, &vms), out)?;
        drop((nodes, vms));
        {
            let dedup = self.requests.lock();
            codec::encode_into(&(dedup.len() as u64), out)?;
            for (id, result) in dedup.iter() {
                codec::encode_into(id, out)?;
                out.extend_from_slice(result.bytes());
            }
        }
        let rest = (
            &self.quotas_image(),
            &self.strategy(),
            self.node_timeout().as_millis() as u64,
            self.prev_node_timeout_ms.load(std::sync::atomic::Ordering::Acquire),
            &self.tokens(),
            self.tokens_bootstrapped(),
            &self.vm_cidr(),
        );
        codec::encode_into(&rest, out)?;
        Ok(())
    }

    /// Replaces the whole state with `image`, the state after log index
    /// `applied`, rebuilding every index. The change feed starts over after
    /// `applied`.
    pub fn restore(&self, image: StateImage, applied: u64) {
        let mut vms = self.vms.write();
        self.nodes.clear();
        *self.sched.lock() = scheduler_of(&image);
        for n in image.nodes {
            self.nodes.insert(n.id, n);
        }
        *self.usage.lock() = usage_of(&image.vms);
        *self.quotas.lock() = image.quotas.into_iter().collect();
        self.set_node_timeout(image.node_timeout_ms, image.prev_node_timeout_ms);
        self.tokens.clear();
        for t in image.tokens {
            self.tokens.insert(t.hash, t);
        }
        self.tokens_bootstrapped.store(image.tokens_bootstrapped, std::sync::atomic::Ordering::Release);
        vms.replace_all(image.vms.into_iter().map(Arc::new));
        let mut dedup = self.requests.lock();
        dedup.clear();
        for (id, result) in image.requests {
            dedup.insert(id, &result);
        }
        drop(dedup);
        vms.publish();
        self.feed.reset(applied);
        self.changed.notify_waiters();
    }

    /// A stable 64-bit fingerprint of the state (FNV-1a over the canonical
    /// image): equal on two replicas iff they hold the same state.
    pub fn digest(&self) -> u64 {
        let mut bytes = Vec::new();
        if self.encode_image_into(&mut bytes).is_err() {
            bytes.clear();
        }
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for b in bytes {
            h ^= b as u64;
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
        h
    }

    /// Checks the internal invariants: indices match the tables and no node
    /// is over-committed. Used by tests and the simulator.
    pub fn check_invariants(&self) -> Result<(), String> {
        let mut sums: std::collections::HashMap<NodeId, Resources> = Default::default();
        let table = self.vms.load();
        for v in table.iter() {
            if v.node_id != 0 {
                let s = sums.entry(v.node_id).or_default();
                *s = s.saturating_add(&v.spec.resources());
            }
            if !table.is_indexed(v) {
                return Err(format!("VM {} missing from node {} index", v.name, v.node_id));
            }
        }
        if table.indexed_len() != table.len() {
            return Err(format!("index holds {} VMs, table {}", table.indexed_len(), table.len()));
        }
        drop(table);
        for n in self.nodes.iter() {
            let sum = sums.remove(&n.id).unwrap_or_default();
            if sum != n.allocated {
                return Err(format!("node {} allocated {} but its VMs sum to {}", n.id, n.allocated, sum));
            }
            if !n.allocated.fits_in(&n.allocatable()) {
                return Err(format!(
                    "node {} over-committed: {} of {} allocatable",
                    n.id,
                    n.allocated,
                    n.allocatable()
                ));
            }
            if (n.resources, n.labels.clone()) != n.registered.apply(&n.overrides) {
                return Err(format!(
                    "node {} effective resources or labels disagree with its flags and overrides",
                    n.id
                ));
            }
        }
        if let Some((id, _)) = sums.into_iter().next() {
            return Err(format!("VMs placed on unknown node {id}"));
        }
        self.check_placements()?;
        let table = self.vms.load();
        let usage = usage_of(table.iter());
        drop(table);
        if usage != *self.usage.lock() {
            return Err("tenant usage disagrees with the VMs".to_string());
        }
        self.requests.lock().check()
    }
}

/// The scheduler of an image: every index built from scratch.
fn scheduler_of(image: &StateImage) -> Scheduler {
    let mut sched = Scheduler::new(image.scheduler);
    sched.net_mut().set_cidr(image.vm_cidr);
    for n in &image.nodes {
        sched.set_node(n.id, Some((n.free(), &n.labels, n.schedulable())));
        sched.net_mut().set_node(n.id, Some((n.vm_subnet, api_port(&n.addr))));
    }
    for v in &image.vms {
        sched.count_vm(v, true);
        sched.queue_vm(v, true);
        sched.net_mut().hold(v, true);
    }
    sched
}

/// What each tenant's VMs hold.
fn usage_of<'a>(vms: impl IntoIterator<Item = &'a VmRecord>) -> HashMap<String, TenantUsage> {
    let mut usage: HashMap<String, TenantUsage> = HashMap::new();
    for v in vms {
        if !v.spec.tenant.is_empty() {
            usage.entry(v.spec.tenant.clone()).or_default().add(&v.spec.resources());
        }
    }
    usage
}

impl ClusterState {
    /// Placement invariants: the scheduler's indices equal ones rebuilt from
    /// the tables; every placed VM (on a node that has not left) is on its
    /// pinned node, meets its constraints there and shares the node with no
    /// VM of its anti-affinity group; no queued VM fits anywhere.
    /// The VM network's invariants: no two nodes share a subnet, each
    /// inside the network; no two VMs share an address; every address lies
    /// in the subnet of the node holding the VM, and a VM held by a node
    /// with a subnet has one; no two VMs on a node publish the same port.
    fn check_vm_network(&self, image: &StateImage) -> Result<(), String> {
        if let Some(c) = image.vm_cidr {
            crate::validate::vm_cidr(&c).map_err(|e| format!("the VM network: {e}"))?;
        }
        let mut subnets: BTreeMap<Ipv4Net, NodeId> = BTreeMap::new();
        for n in &image.nodes {
            let Some(s) = n.vm_subnet else { continue };
            let aligned = s.prefix == crate::types::NODE_SUBNET_PREFIX && s.network() == s.addr;
            if !aligned || !image.vm_cidr.is_some_and(|c| c.contains(s.addr)) {
                return Err(format!(
                    "node {} holds subnet {s}, not a /24 of the VM network {:?}",
                    n.id, image.vm_cidr
                ));
            }
            if let Some(other) = subnets.insert(s, n.id) {
                return Err(format!("nodes {other} and {} both hold subnet {s}", n.id));
            }
        }
        let subnet_of = |id: NodeId| image.nodes.iter().find(|n| n.id == id).and_then(|n| n.vm_subnet);
        let mut addrs: BTreeMap<std::net::Ipv4Addr, &str> = BTreeMap::new();
        let mut ports: BTreeMap<(NodeId, u16), &str> = BTreeMap::new();
        for v in &image.vms {
            let holder = v.holder();
            let subnet = if holder == 0 { None } else { subnet_of(holder) };
            match (v.ip, subnet) {
                (Some(ip), Some(s)) => {
                    let host = u32::from(ip).wrapping_sub(u32::from(s.network()));
                    if !s.contains(ip)
                        || !(crate::types::FIRST_VM_HOST..=crate::types::LAST_VM_HOST).contains(&host)
                    {
                        return Err(format!(
                            "VM {} holds {ip}, not a VM address of node {holder}'s subnet {s}",
                            v.name
                        ));
                    }
                    if let Some(other) = addrs.insert(ip, &v.name) {
                        return Err(format!("VMs {other} and {} both hold {ip}", v.name));
                    }
                }
                (Some(ip), None) => {
                    return Err(format!("VM {} holds {ip} but node {holder} has no subnet", v.name));
                }
                (None, Some(s)) if image.vm_cidr.is_some() => {
                    return Err(format!(
                        "VM {} is held by node {holder} (subnet {s}) without an address",
                        v.name
                    ));
                }
                (None, _) => {}
            }
            if holder != 0 {
                for p in &v.publish {
                    if let Some(other) = ports.insert((holder, p.host), &v.name) {
                        return Err(format!(
                            "VMs {other} and {} both publish port {} on node {holder}",
                            v.name, p.host
                        ));
                    }
                }
            }
        }
        Ok(())
    }

    fn check_placements(&self) -> Result<(), String> {
        let image = self.image();
        let fresh = scheduler_of(&image);
        let sched = self.sched.lock();
        sched.same_as(&fresh)?;
        self.check_vm_network(&image)?;
        let mut groups: BTreeSet<(&str, NodeId)> = BTreeSet::new();
        for v in &image.vms {
            if v.moving.is_some() && v.leaving == 0 {
                return Err(format!("VM {} has a move under way but leaves no node", v.name));
            }
            if v.history.len() > MAX_HISTORY {
                return Err(format!("VM {} keeps {} moves", v.name, v.history.len()));
            }
            if v.leaving != 0 && v.node_id != 0 {
                return Err(format!(
                    "VM {} is placed on node {} while leaving node {}",
                    v.name, v.node_id, v.leaving
                ));
            }
            if v.node_id == 0 {
                if v.is_placeable() && sched.place(&Request::of(v)).is_some() {
                    return Err(format!("queued VM {} fits on a node", v.name));
                }
                continue;
            }
            let Some((labels, down)) = self.with_node(v.node_id, |n| {
                ((n.status == NodeStatus::Active).then(|| n.labels.clone()), n.down)
            }) else {
                return Err(format!("VM {} on unknown node {}", v.name, v.node_id));
            };
            if down && v.reschedule != Reschedule::Never {
                return Err(format!("VM {} stays on node {}, which is down", v.name, v.node_id));
            }
            let Some(labels) = labels else { continue };
            let p = &v.placement;
            if p.node != 0 && p.node != v.node_id {
                return Err(format!("VM {} pinned to node {} runs on node {}", v.name, p.node, v.node_id));
            }
            if let Some(c) = p.constraints.iter().find(|c| !c.holds(&labels)) {
                return Err(format!("VM {} on node {} breaks its constraint {c}", v.name, v.node_id));
            }
            if !p.anti_affinity.is_empty() && !groups.insert((&p.anti_affinity, v.node_id)) {
                return Err(format!(
                    "two VMs of anti-affinity group {} on node {} (one is {})",
                    p.anti_affinity, v.node_id, v.name
                ));
            }
        }
        Ok(())
    }
}

/// A run of applies: exclusive write access to the state until dropped,
/// when its VM changes are published to readers at once and watchers are
/// woken. Apply is deterministic: no clock, randomness or IO.
pub struct ApplyRun<'a> {
    state: &'a ClusterState,
    vms: VmWriter<'a>,
    changed: bool,
    /// Nodes that gained room or changed labels in the current proposal:
    /// the only places a queued VM may fit now (see `drain_queue`).
    touched: BTreeSet<NodeId>,
    /// The change record of the entry being applied; it becomes that
    /// entry's [`Revision`] when the next entry begins or the run ends.
    entry: EntryChanges,
    /// Revisions of this run's finished entries, published with its VM
    /// changes.
    revisions: Vec<Revision>,
    /// The last log index this run applied.
    applied: u64,
}

/// The VMs and nodes one entry touched, each with its record from before
/// the entry (kept from the first touch). Ordered maps: the revision lists
/// its changes in the same order on every replica.
#[derive(Default)]
struct EntryChanges {
    index: u64,
    vms: BTreeMap<Arc<str>, Option<Arc<VmRecord>>>,
    nodes: BTreeMap<NodeId, Option<NodeRecord>>,
}

impl Drop for ApplyRun<'_> {
    fn drop(&mut self) {
        if std::thread::panicking() {
            return;
        }
        self.finish_entry();
        self.vms.publish_in_place();
        // After the VM table: a watcher never sees a change readers cannot.
        if self.applied != 0 {
            self.state.feed.publish(std::mem::take(&mut self.revisions), self.applied);
        }
        if self.changed {
            self.state.changed.notify_waiters();
        }
    }
}

impl ApplyRun<'_> {
    /// Applies one proposal. A rejected command (or batch) leaves the state
    /// exactly as it was. A proposal whose request id is in the dedup window
    /// returns that request's first result, success or rejection, and
    /// changes nothing: a request id has exactly one outcome, so a client
    /// that retries after an unknown outcome learns what really happened
    /// (a rejection retried later could otherwise apply after all).
    pub fn apply(&mut self, proposal: &Proposal, index: u64) -> CommandResult {
        self.advance(index);
        let result = self.apply_deduplicated(proposal, index);
        self.changed |= result.is_ok();
        result
    }

    /// Notes that the entry at `index` is being applied (also entries that
    /// carry no command: the feed's revision is the applied log index).
    /// The previous entry's changes become its revision.
    pub fn advance(&mut self, index: u64) {
        if index != self.entry.index {
            self.finish_entry();
            self.entry.index = index;
        }
        self.applied = self.applied.max(index);
    }

    /// Turns the current entry's change record into its revision: every
    /// touched VM and node whose record differs from before the entry. A
    /// rejected command or rolled-back batch left its records as they were,
    /// so it adds nothing.
    fn finish_entry(&mut self) {
        let index = self.entry.index;
        let mut changes = Vec::new();
        for (name, old) in std::mem::take(&mut self.entry.vms) {
            match (old, self.vms.get(&name)) {
                (Some(o), Some(n)) if Arc::ptr_eq(&o, n) || o == *n => {}
                (_, Some(n)) => changes.push(Change::Vm { record: n.clone(), deleted: false }),
                (Some(o), None) => changes.push(Change::Vm { record: o, deleted: true }),
                (None, None) => {}
            }
        }
        for (id, old) in std::mem::take(&mut self.entry.nodes) {
            let new = self.state.nodes.get(&id).map(|n| n.value().clone());
            match (old, new) {
                (Some(o), Some(n)) if o == n => {}
                (_, Some(n)) => changes.push(Change::Node { record: Arc::new(n), deleted: false }),
                (Some(o), None) => changes.push(Change::Node { record: Arc::new(o), deleted: true }),
                (None, None) => {}
            }
        }
        if !changes.is_empty() {
            self.revisions.push(Revision { index, changes });
        }
    }

    /// Records VM `name`'s current record in the entry's change record,
    /// unless it was already touched in this entry.
    fn note_vm(&mut self, name: &str) {
        if self.entry.vms.contains_key(name) {
            return;
        }
        let old = self.vms.get(name).cloned();
        let key = match &old {
            Some(o) => o.name.clone(),
            None => Arc::from(name),
        };
        self.entry.vms.insert(key, old);
    }

    /// Records node `id`'s current record in the entry's change record,
    /// unless it was already touched in this entry.
    fn note_node(&mut self, id: NodeId) {
        if let std::collections::btree_map::Entry::Vacant(e) = self.entry.nodes.entry(id) {
            e.insert(self.state.nodes.get(&id).map(|n| n.value().clone()));
        }
    }

    /// [`ClusterState::put_node`], noted in the change record.
    fn put_node(
        &mut self,
        id: NodeId,
        new: Option<NodeRecord>,
        old: Option<NodeRecord>,
        journal: Journal<'_>,
    ) {
        self.note_node(id);
        self.state.put_node(id, new, old, journal);
    }

    fn apply_deduplicated(&mut self, proposal: &Proposal, index: u64) -> CommandResult {
        let Some(id) = proposal.request else { return self.apply_command(proposal, index) };
        if let Some(first) = self.state.requests.lock().get(&id) {
            return first;
        }
        let result = self.apply_command(proposal, index);
        self.state.requests.lock().insert(id, &result);
        result
    }

    fn apply_command(&mut self, proposal: &Proposal, index: u64) -> CommandResult {
        let ctx = ApplyCtx { index, at_ms: proposal.at_ms };
        self.touched.clear();
        proposal.command.validate()?;
        let result = match &proposal.command {
            Command::Batch(cmds) => {
                let mut journal = Vec::new();
                let mut outputs = Vec::with_capacity(cmds.len());
                for (i, cmd) in cmds.iter().enumerate() {
                    match self.apply_one(cmd, ctx, Some(&mut journal)) {
                        Ok(out) => outputs.push(out),
                        Err(e) => {
                            self.rollback(journal);
                            self.touched.clear();
                            return Err(CommandError::BatchFailed { index: i, source: Box::new(e) });
                        }
                    }
                }
                Ok(CommandOutput::Batch(outputs))
            }
            cmd => self.apply_one(cmd, ctx, None),
        };
        if result.is_ok() {
            self.drain_queue(ctx);
        }
        self.touched.clear();
        result
    }

    /// The one way apply changes a VM: replaces the VM named `name` with
    /// `new` (or removes it), keeping everything derived from it in step,
    /// and journals the old record when asked to. Returns the old record.
    ///
    /// The VM's address follows its holder node (see [`VmRecord::holder`]):
    /// kept while the holder stays, released when it changes or the VM
    /// goes, and the lowest free address of the new holder's subnet given
    /// when it has one. Whatever `new.ip` says is overwritten.
    fn set_vm(&mut self, name: &str, new: Option<VmRecord>, journal: Journal<'_>) -> Option<Arc<VmRecord>> {
        let new = new.map(|mut n| {
            let old = self.vms.get(name);
            let kept = old.filter(|o| o.holder() == n.holder()).and_then(|o| o.ip);
            n.ip = match kept {
                Some(ip) => Some(ip),
                None if n.holder() == 0 => None,
                None => {
                    // A new holder, or the same one without an address yet:
                    // the VM holds nothing in that subnet, so the lowest
                    // free address is free for it.
                    let sched = self.state.sched.lock();
                    sched.net().lowest_free(n.holder())
                }
            };
            n
        });
        self.write_vm(name, new, journal)
    }

    /// Replaces a VM's record exactly as given (a rollback restores the
    /// address it had), keeping everything derived from it in step.
    fn write_vm(&mut self, name: &str, new: Option<VmRecord>, journal: Journal<'_>) -> Option<Arc<VmRecord>> {
        self.note_vm(name);
        let old = self.vms.get(name).cloned();
        let new = new.map(Arc::new);
        // A node's allocation follows its VMs' placement and resources.
        let held = |v: &Option<Arc<VmRecord>>| v.as_ref().map(|v| (v.node_id, v.spec.resources()));
        if held(&old) != held(&new) {
            for id in [&old, &new].into_iter().flatten().map(|v| v.node_id) {
                if id != 0 {
                    self.note_node(id);
                }
            }
        }
        match &new {
            Some(n) => self.vms.put(n.clone()),
            None => {
                self.vms.remove(name);
            }
        }
        self.state.derive(old.as_deref(), new.as_deref());
        // Room for a queued VM: resources follow `node_id`, the address
        // and ports the holder (a leaving VM keeps them until its node has
        // stopped it), so a node is touched when either leaves it.
        if let Some(o) = &old {
            if o.node_id != 0 && new.as_ref().is_none_or(|n| n.node_id != o.node_id) {
                self.touched.insert(o.node_id);
            }
            let holder = o.holder();
            if holder != 0 && new.as_ref().is_none_or(|n| n.holder() != holder) {
                self.touched.insert(holder);
            }
        }
        if let Some(j) = journal {
            let key = old.as_ref().map(|o| o.name.clone()).or_else(|| new.as_ref().map(|n| n.name.clone()));
            if let Some(key) = key {
                j.push(Undo::Vm(key, old.clone()));
            }
        }
        old
    }

    /// Work conservation: after a change that gave some nodes room (or new
    /// labels), places queued VMs, highest priority then oldest first. A VM
    /// that fit nowhere before can now fit only on a touched node, so each
    /// is checked against those first. Leaves no queued VM that fits.
    fn drain_queue(&mut self, ctx: ApplyCtx) {
        if self.touched.is_empty() {
            return;
        }
        let candidates: Vec<Arc<str>> = {
            let sched = self.state.sched.lock();
            sched.queue().iter().map(|(_, _, name)| name.clone()).collect()
        };
        for name in candidates {
            let Some(vm) = self.vms.get(&name).cloned() else { continue };
            let node = {
                let sched = self.state.sched.lock();
                let req = Request::of(&vm);
                if !self.touched.iter().any(|&id| sched.fits_on(id, &req)) {
                    continue;
                }
                sched.place(&req)
            };
            if let Some(node) = node {
                let placed = VmRecord {
                    node_id: node,
                    observed: ObservedState::Pending,
                    queued_at: 0,
                    updated_at_ms: ctx.at_ms,
                    revision: ctx.index,
                    ..(*vm).clone()
                };
                self.set_vm(&name, Some(placed), None);
            }
        }
    }

    /// A node's (re-)registration: its flags replace the previous ones, the
    /// operator's overrides stay.
    fn register_node(
        &mut self,
        id: NodeId,
        addr: &str,
        registered: Registration,
        ctx: ApplyCtx,
        journal: Journal<'_>,
    ) -> CommandResult {
        let old = self.state.nodes.get(&id).map(|n| n.value().clone());
        let rec = match &old {
            Some(old) => {
                let (resources, labels) = registered.apply(&old.overrides);
                check_allocatable(id, &resources, &old.allocated)?;
                self.check_constraints(id, &labels)?;
                NodeRecord {
                    addr: addr.to_string(),
                    resources,
                    labels,
                    registered,
                    status: NodeStatus::Active,
                    updated_at_ms: ctx.at_ms,
                    ..old.clone()
                }
            }
            None => NodeRecord {
                id,
                addr: addr.to_string(),
                resources: registered.resources,
                allocated: Resources::ZERO,
                labels: registered.labels.clone(),
                status: NodeStatus::Active,
                registered_at_ms: ctx.at_ms,
                updated_at_ms: ctx.at_ms,
                registered,
                overrides: NodeOverrides::default(),
                down: false,
                drain: None,
                heartbeats: false,
                vm_subnet: None,
            },
        };
        let rec = NodeRecord { vm_subnet: self.subnet_for(&rec), ..rec };
        let new_subnet = rec.vm_subnet.is_some() && old.as_ref().is_none_or(|o| o.vm_subnet.is_none());
        self.touched.insert(id);
        let mut journal = journal;
        self.put_node(id, Some(rec), old, journal.as_deref_mut());
        if new_subnet {
            // A node that had no subnet (it left before the cluster had a
            // VM network, say) may hold VMs: they get their addresses now.
            self.address_vms_held_by(id, journal);
        }
        Ok(CommandOutput::NodeRegistered { id })
    }

    /// Gives every VM node `id` holds (placed there, or leaving it) and
    /// that has no address one, by name.
    fn address_vms_held_by(&mut self, id: NodeId, mut journal: Journal<'_>) -> u32 {
        let table = self.vms.table();
        let mut names: Vec<Arc<str>> = table
            .on_node(id)
            .chain(table.on_node(0).filter(|v| v.leaving == id))
            .filter(|v| v.ip.is_none())
            .map(|v| v.name.clone())
            .collect();
        names.sort_unstable();
        let mut addressed = 0;
        for name in names {
            let Some(vm) = self.vms.get(&name).cloned() else { continue };
            self.set_vm(&name, Some((*vm).clone()), journal.as_deref_mut());
            addressed += u32::from(self.vms.get(&name).is_some_and(|v| v.ip.is_some()));
        }
        addressed
    }

    /// The VM subnet node `node` should hold: the one it has, else (an
    /// active node, with a VM network set) the lowest /24 no node holds.
    fn subnet_for(&self, node: &NodeRecord) -> Option<Ipv4Net> {
        if node.vm_subnet.is_some() || node.status != NodeStatus::Active {
            return node.vm_subnet;
        }
        let taken: BTreeSet<Ipv4Net> = self.state.nodes.iter().filter_map(|n| n.vm_subnet).collect();
        self.state.sched.lock().net().free_subnet(&taken)
    }

    /// `SetVmNetwork`: sets the VM network once, then gives each active
    /// node without a subnet one (by id) and each VM a node holds an
    /// address (by name).
    fn set_vm_network(&mut self, cidr: Ipv4Net, ctx: ApplyCtx, mut journal: Journal<'_>) -> CommandResult {
        match self.state.vm_cidr() {
            Some(current) if current == cidr => {
                return Ok(CommandOutput::VmNetworkSet { cidr, subnets: 0, addresses: 0 });
            }
            Some(current) => {
                return Err(CommandError::VmNetworkFixed {
                    current: current.to_string(),
                    asked: cidr.to_string(),
                });
            }
            None => {}
        }
        self.state.sched.lock().net_mut().set_cidr(Some(cidr));
        if let Some(j) = journal.as_deref_mut() {
            j.push(Undo::VmCidr(None));
        }
        let mut ids: Vec<NodeId> =
            self.state.nodes.iter().filter(|n| n.vm_subnet.is_none()).map(|n| n.id).collect();
        ids.sort_unstable();
        let (mut subnets, mut addresses) = (0, 0);
        for id in ids {
            let Some(old) = self.state.nodes.get(&id).map(|n| n.value().clone()) else { continue };
            let Some(subnet) = self.subnet_for(&old) else { continue };
            let rec = NodeRecord { vm_subnet: Some(subnet), updated_at_ms: ctx.at_ms, ..old.clone() };
            self.put_node(id, Some(rec), Some(old), journal.as_deref_mut());
            subnets += 1;
            addresses += self.address_vms_held_by(id, journal.as_deref_mut());
        }
        Ok(CommandOutput::VmNetworkSet { cidr, subnets, addresses })
    }

    /// Refuses node labels that would break a constraint of a VM placed on
    /// node `id`.
    fn check_constraints(&self, id: NodeId, labels: &BTreeMap<String, String>) -> Result<(), CommandError> {
        for vm in self.vms.table().on_node(id) {
            if let Some(c) = vm.placement.constraints.iter().find(|c| !c.holds(labels)) {
                return Err(CommandError::BreaksConstraint {
                    id,
                    vm: vm.name.to_string(),
                    constraint: c.to_string(),
                });
            }
        }
        Ok(())
    }

    /// Every arm checks everything before its first mutation, so a single
    /// command that fails has changed nothing; inside a batch, the journal
    /// undoes the commands before it.
    fn apply_one(&mut self, cmd: &Command, ctx: ApplyCtx, mut journal: Journal<'_>) -> CommandResult {
        let nodes = &self.state.nodes;
        match cmd {
            Command::RegisterNodeV1 { id, addr, capacity, labels } => {
                let reg = Registration { resources: NodeResources::plain(*capacity), labels: labels.clone() };
                self.register_node(*id, addr, reg, ctx, journal)
            }
            Command::RegisterNode { id, addr, resources, labels } => {
                let reg = Registration { resources: *resources, labels: labels.clone() };
                self.register_node(*id, addr, reg, ctx, journal)
            }
            Command::SetScheduler { strategy } => {
                let old = self.state.sched.lock().set_strategy(*strategy);
                if let Some(j) = journal {
                    j.push(Undo::Strategy(old));
                }
                Ok(CommandOutput::SchedulerSet { strategy: *strategy })
            }
            Command::SetQuota { tenant, limits } => {
                let old = self.state.quotas.lock().insert(tenant.clone(), *limits);
                if let Some(j) = journal {
                    j.push(Undo::Quota(tenant.clone(), old));
                }
                Ok(CommandOutput::QuotaSet { tenant: tenant.clone() })
            }
            Command::DeleteQuota { tenant } => {
                let Some(old) = self.state.quotas.lock().remove(tenant) else {
                    return Err(CommandError::NoQuota { tenant: tenant.clone() });
                };
                if let Some(j) = journal {
                    j.push(Undo::Quota(tenant.clone(), Some(old)));
                }
                Ok(CommandOutput::QuotaDeleted { tenant: tenant.clone() })
            }
            Command::SetNode { id, set_labels, remove_labels, cpu_overcommit, memory_overcommit } => {
                let Some(old) = nodes.get(id).map(|n| n.value().clone()) else {
                    return Err(CommandError::UnknownNode { id: *id });
                };
                let mut overrides = old.overrides.clone();
                for k in remove_labels {
                    overrides.labels.remove(k);
                    overrides.removed_labels.insert(k.clone());
                }
                for (k, v) in set_labels {
                    overrides.removed_labels.remove(k);
                    overrides.labels.insert(k.clone(), v.clone());
                }
                if cpu_overcommit.is_some() {
                    overrides.cpu_overcommit = *cpu_overcommit;
                }
                if memory_overcommit.is_some() {
                    overrides.memory_overcommit = *memory_overcommit;
                }
                let (resources, labels) = old.registered.apply(&overrides);
                check_allocatable(*id, &resources, &old.allocated)?;
                self.check_constraints(*id, &labels)?;
                let rec =
                    NodeRecord { resources, labels, overrides, updated_at_ms: ctx.at_ms, ..old.clone() };
                self.touched.insert(*id);
                self.put_node(*id, Some(rec), Some(old), journal);
                Ok(CommandOutput::NodeUpdated { id: *id })
            }
            Command::DecommissionNode { id } => {
                let Some(old) = nodes.get(id).map(|n| n.value().clone()) else {
                    return Err(CommandError::UnknownNode { id: *id });
                };
                let rec = NodeRecord { status: NodeStatus::Left, updated_at_ms: ctx.at_ms, ..old.clone() };
                self.put_node(*id, Some(rec), Some(old), journal.as_deref_mut());
                // VMs evicted from it wait for it no longer: it has left.
                let leaving: Vec<VmRecord> =
                    self.vms.table().on_node(0).filter(|v| v.leaving == *id).cloned().collect();
                for vm in leaving {
                    self.release(&vm, ctx, journal.as_deref_mut());
                }
                let names: Vec<Arc<str>> = self.vms.table().names_on(*id).cloned().collect();
                let mut lost = 0;
                for name in names {
                    let Some(vm) = self.vms.get(&name) else { continue };
                    if vm.observed == ObservedState::Lost {
                        continue;
                    }
                    let rec = VmRecord {
                        observed: ObservedState::Lost,
                        updated_at_ms: ctx.at_ms,
                        revision: ctx.index,
                        ..(**vm).clone()
                    };
                    self.set_vm(&name, Some(rec), journal.as_deref_mut());
                    lost += 1;
                }
                Ok(CommandOutput::NodeDecommissioned { id: *id, lost_vms: lost })
            }
            Command::CreateVm { name, spec, start } => {
                let vm = NewVm {
                    name: name.clone(),
                    spec: spec.clone(),
                    placement: Placement::default(),
                    reschedule: Reschedule::default(),
                    publish: Vec::new(),
                };
                let created = self.create_vm(&vm, *start, false, ctx, journal)?;
                Ok(CommandOutput::VmCreated { name: created.name, node_id: created.node_id })
            }
            Command::CreateVmsV3 { vms, start, queue } => {
                let vms: Vec<NewVm> = vms.iter().map(NewVm::from).collect();
                self.create_vms(&vms, *start, *queue, ctx, journal)
            }
            Command::CreateVmsV4 { vms, start, queue } => {
                let vms: Vec<NewVm> = vms.iter().map(NewVm::from).collect();
                self.create_vms(&vms, *start, *queue, ctx, journal)
            }
            Command::CreateVms { vms, start, queue } => self.create_vms(vms, *start, *queue, ctx, journal),
            Command::SetVmNetwork { cidr } => self.set_vm_network(*cidr, ctx, journal),
            Command::SetNodeTimeout { ms } => {
                let current = self.state.node_timeout().as_millis() as u64;
                let (old, old_prev) = self.state.set_node_timeout(*ms, current);
                if let Some(j) = journal {
                    j.push(Undo::NodeTimeout(old, old_prev));
                }
                Ok(CommandOutput::NodeTimeoutSet { ms: *ms })
            }
            Command::SetNodeDown { id, down } => self.set_node_down(*id, *down, ctx, journal),
            Command::DrainNode { id, max_parallel, deadline_ms } => {
                let old = self.member(*id, "cannot be drained")?;
                let drain = Drain {
                    max_parallel: *max_parallel,
                    deadline_ms: *deadline_ms,
                    started_at_ms: old.drain.map_or(ctx.at_ms, |d| d.started_at_ms),
                };
                let rec = NodeRecord { drain: Some(drain), updated_at_ms: ctx.at_ms, ..old.clone() };
                self.put_node(*id, Some(rec), Some(old), journal.as_deref_mut());
                let (moving, stuck) = self.advance_drain(*id, ctx, journal);
                Ok(CommandOutput::Draining { id: *id, moving, stuck })
            }
            Command::SetEligible { id } => {
                let old = self.member(*id, "cannot take placements")?;
                if old.drain.is_some() {
                    let rec = NodeRecord { drain: None, updated_at_ms: ctx.at_ms, ..old.clone() };
                    self.touched.insert(*id);
                    self.put_node(*id, Some(rec), Some(old), journal);
                }
                Ok(CommandOutput::NodeEligible { id: *id })
            }
            Command::MigrateVm { name, to } => self.migrate(name, *to, ctx, journal),
            Command::StartVm { name } => self.set_desired(name, DesiredState::Running, false, ctx, journal),
            Command::StopVm { name } => self.set_desired(name, DesiredState::Stopped, false, ctx, journal),
            Command::RestartVm { name } => self.set_desired(name, DesiredState::Running, true, ctx, journal),
            Command::ReportVms { node, reports } => {
                let mut applied = 0;
                for r in reports {
                    let Some(vm) = self.vms.get(r.name.as_str()) else { continue };
                    // The node a VM was evicted from says it has stopped it:
                    // now it may be placed.
                    if vm.leaving == *node && vm.node_id != *node && r.observed == ObservedState::Stopped {
                        let vm = vm.clone();
                        self.release(&vm, ctx, journal.as_deref_mut());
                        applied += 1;
                        continue;
                    }
                    // A report that raced a delete-and-recreate elsewhere, or
                    // that says nothing new, changes nothing.
                    if vm.node_id != *node || (vm.observed == r.observed && vm.runtime == r.runtime) {
                        continue;
                    }
                    if let Some(j) = journal.as_deref_mut() {
                        j.push(Undo::Vm(vm.name.clone(), Some(vm.clone())));
                    }
                    // In place: placement, resources and desired state are
                    // unchanged, so nothing derived moves.
                    self.note_vm(&r.name);
                    self.vms.update(&r.name, |vm| {
                        vm.observed = r.observed;
                        vm.runtime = r.runtime.clone();
                        vm.updated_at_ms = ctx.at_ms;
                        vm.revision = ctx.index;
                    });
                    applied += 1;
                }
                Ok(CommandOutput::VmsReported { applied })
            }
            Command::DeleteVm { name } => {
                let Some(vm) = self.set_vm(name, None, journal) else {
                    return Err(CommandError::VmNotFound { name: name.clone() });
                };
                Ok(CommandOutput::VmDeleted { name: name.clone(), node_id: vm.node_id })
            }
            Command::CreateToken { name, role, hash, expires_at_ms, bootstrap } => {
                let token = TokenRecord {
                    name: name.clone(),
                    role: *role,
                    hash: *hash,
                    created_at_ms: ctx.at_ms,
                    expires_at_ms: *expires_at_ms,
                    bootstrap: *bootstrap,
                };
                self.create_token(token, journal)
            }
            Command::RevokeToken { name } => self.revoke_token(name, ctx, journal),
            Command::Batch(_) => {
                Err(CommandError::invalid("batch", "nested batch", "a flat list of commands"))
            }
        }
    }

    fn create_token(&mut self, token: TokenRecord, journal: Journal<'_>) -> CommandResult {
        let tokens = &self.state.tokens;
        let refuse =
            |why: &str| Err(CommandError::TokenRefused { name: token.name.clone(), why: why.into() });
        if token.bootstrap && self.state.tokens_bootstrapped() {
            return refuse("the cluster already made its bootstrap token");
        }
        if tokens.iter().any(|t| t.name == token.name) {
            return refuse("a token with this name exists (revoke it first)");
        }
        if tokens.contains_key(&token.hash) {
            return refuse("another token has the same secret");
        }
        if tokens.len() >= MAX_TOKENS {
            return refuse(&format!("the cluster holds the most tokens it may ({MAX_TOKENS})"));
        }
        let was_bootstrapped = self.state.tokens_bootstrapped();
        if let Some(j) = journal {
            j.push(Undo::Token(token.hash, None, was_bootstrapped));
        }
        if token.bootstrap {
            self.state.tokens_bootstrapped.store(true, std::sync::atomic::Ordering::Release);
        }
        let name = token.name.clone();
        tokens.insert(token.hash, token);
        Ok(CommandOutput::TokenCreated { name })
    }

    fn revoke_token(&mut self, name: &str, ctx: ApplyCtx, journal: Journal<'_>) -> CommandResult {
        let tokens = &self.state.tokens;
        let Some(hash) = tokens.iter().find(|t| t.name == name).map(|t| t.hash) else {
            return Err(CommandError::NoToken { name: name.to_string() });
        };
        let is_admin = tokens.get(&hash).is_some_and(|t| t.role == Role::Admin);
        // The proposer's clock decides expiry here, so every replica agrees.
        let other_admin =
            tokens.iter().any(|t| t.hash != hash && t.role == Role::Admin && !t.expired(ctx.at_ms));
        if is_admin && !other_admin {
            return Err(CommandError::TokenRefused {
                name: name.to_string(),
                why: "it is the last admin token that has not expired; create another admin token first"
                    .into(),
            });
        }
        let old = tokens.remove(&hash).map(|(_, t)| t);
        if let Some(j) = journal {
            j.push(Undo::Token(hash, old, self.state.tokens_bootstrapped()));
        }
        Ok(CommandOutput::TokenRevoked { name: name.to_string() })
    }

    /// Start (`Running`), stop (`Stopped`) or, with `restart`, bump the
    /// generation so the node restarts the VM. An unplaced VM that is
    /// started is placed (or queued); one that is stopped leaves the queue.
    fn set_desired(
        &mut self,
        name: &str,
        desired: DesiredState,
        restart: bool,
        ctx: ApplyCtx,
        journal: Journal<'_>,
    ) -> CommandResult {
        let Some(vm) = self.vms.get(name).cloned() else {
            return Err(CommandError::VmNotFound { name: name.to_string() });
        };
        if vm.is_unplaced() {
            let mut rec =
                VmRecord { desired, updated_at_ms: ctx.at_ms, revision: ctx.index, ..(*vm).clone() };
            if restart {
                rec.generation += 1;
            }
            match desired {
                DesiredState::Stopped => {
                    rec.observed = ObservedState::Stopped;
                    rec.queued_at = 0;
                }
                DesiredState::Running if !vm.is_queued() => {
                    // Still stopping where it was evicted: it waits.
                    let node =
                        if vm.leaving != 0 { None } else { self.state.sched.lock().place(&Request::of(&vm)) };
                    match node {
                        Some(node) => {
                            rec.node_id = node;
                            rec.observed = ObservedState::Pending;
                        }
                        None => {
                            rec.observed = ObservedState::Queued;
                            rec.queued_at = ctx.index;
                        }
                    }
                }
                DesiredState::Running => {}
            }
            let generation = rec.generation;
            self.set_vm(name, Some(rec), journal);
            return Ok(CommandOutput::VmDesired { name: name.to_string(), desired, generation });
        }
        if let Some(j) = journal {
            j.push(Undo::Vm(vm.name.clone(), Some(vm.clone())));
        }
        // Starting a VM that should already run but has failed or powered
        // off means "try again now": a new generation makes its node start
        // it regardless of restart policy and backoff.
        // So does starting a stopped VM: the node must start it even if it
        // restarts before acting and cannot tell "stopped, then started"
        // from "still running as before".
        let retry = desired == DesiredState::Running
            && (vm.desired == DesiredState::Stopped
                || matches!(vm.observed, ObservedState::Failed | ObservedState::Stopped));
        // In place: a placed VM's desired state moves nothing derived.
        self.note_vm(name);
        let generation = self.vms.update(name, |vm| {
            vm.desired = desired;
            if restart || retry {
                vm.generation += 1;
            }
            vm.updated_at_ms = ctx.at_ms;
            vm.revision = ctx.index;
            vm.generation
        });
        let generation = generation.unwrap_or_default();
        Ok(CommandOutput::VmDesired { name: name.to_string(), desired, generation })
    }

    /// Creates one VM: checks its name and its tenant's quota, then places
    /// it (preempting lower priorities if it fits nowhere) or, with
    /// `queue`, queues it; otherwise a `NoFit` naming why, per filter.
    fn create_vm(
        &mut self,
        new: &NewVm,
        start: bool,
        queue: bool,
        ctx: ApplyCtx,
        mut journal: Journal<'_>,
    ) -> Result<CreatedVm, CommandError> {
        let NewVm { name, spec, placement, reschedule, publish } = new;
        if self.vms.table().contains(name) {
            return Err(CommandError::VmExists { name: name.to_string() });
        }
        let need = spec.resources();
        if let Some(limits) = self.state.quotas.lock().get(&spec.tenant) {
            let usage = self.state.usage.lock().get(&spec.tenant).copied().unwrap_or_default();
            if let Some(reason) = limits.exceeded_by(&usage, &need) {
                return Err(CommandError::QuotaExceeded { tenant: spec.tenant.clone(), reason });
            }
        }
        if placement.node != 0 && !self.state.nodes.contains_key(&placement.node) {
            return Err(CommandError::UnknownNode { id: placement.node });
        }
        let req = Request { name, need, tenant: &spec.tenant, placement, avoid: 0, publish };
        let mut preempted = Vec::new();
        let placed = self.state.sched.lock().place(&req);
        let node_id = match placed {
            Some(id) => id,
            None => {
                let table = self.vms.table();
                let plan = self.state.sched.lock().plan_preemption(&req, |id| {
                    table
                        .on_node(id)
                        .map(|v| Victim {
                            name: v.name.clone(),
                            priority: v.placement.priority,
                            created_at_ms: v.created_at_ms,
                            need: v.spec.resources(),
                        })
                        .collect()
                });
                match plan {
                    Some((id, victims)) => {
                        self.evict(&victims, name, ctx, journal.as_deref_mut());
                        preempted = victims.iter().map(|v| v.to_string()).collect();
                        id
                    }
                    None if queue => 0,
                    None => {
                        let explanation = self.state.sched.lock().explain(&req);
                        return Err(CommandError::NoFit { name: name.clone(), needed: need, explanation });
                    }
                }
            }
        };
        // Checks are done; from here on nothing fails.
        let desired = if start { DesiredState::Running } else { DesiredState::Stopped };
        let observed = match (node_id, desired) {
            (0, DesiredState::Running) => ObservedState::Queued,
            (0, DesiredState::Stopped) => ObservedState::Stopped,
            _ => ObservedState::Pending,
        };
        let vm = VmRecord {
            name: Arc::from(name.as_str()),
            spec: spec.clone(),
            node_id,
            desired,
            observed,
            created_at_ms: ctx.at_ms,
            updated_at_ms: ctx.at_ms,
            revision: ctx.index,
            generation: 0,
            runtime: Default::default(),
            placement: placement.clone(),
            queued_at: if observed == ObservedState::Queued { ctx.index } else { 0 },
            preempted_by: String::new(),
            leaving: 0,
            reschedule: *reschedule,
            history: Vec::new(),
            moving: None,
            placement_gen: 0,
            // Given by `set_vm` from the node's subnet.
            ip: None,
            publish: publish.clone(),
        };
        self.set_vm(name, Some(vm), journal);
        Ok(CreatedVm { name: name.clone(), node_id, preempted })
    }

    /// Takes `victims` off their node for `by` (see [`Self::begin_move`]).
    /// Never deleted.
    fn evict(&mut self, victims: &[Arc<str>], by: &str, ctx: ApplyCtx, mut journal: Journal<'_>) {
        for name in victims {
            let Some(v) = self.vms.get(name).cloned() else { continue };
            let pending = PendingMove { reason: MoveReason::Preempted, to: 0 };
            self.begin_move(&v, pending, Some(by), ctx, journal.as_deref_mut());
        }
    }

    /// Starts moving `vm` off its node: unplaced, and queued if it should
    /// run, but not placeable until its node reports it stopped (`leaving`):
    /// otherwise another node could start it while the old one still runs
    /// it. Then [`Self::release`] places it.
    fn begin_move(
        &mut self,
        vm: &VmRecord,
        pending: PendingMove,
        preempted_by: Option<&str>,
        ctx: ApplyCtx,
        journal: Journal<'_>,
    ) {
        let queued = vm.desired == DesiredState::Running;
        let observed = match (pending.reason, queued) {
            (MoveReason::Preempted, true) => ObservedState::Queued,
            (_, true) => ObservedState::Stopping,
            (_, false) => ObservedState::Stopped,
        };
        let rec = VmRecord {
            node_id: 0,
            observed,
            queued_at: if queued { ctx.index } else { 0 },
            preempted_by: preempted_by.map_or_else(|| vm.preempted_by.clone(), str::to_string),
            leaving: vm.node_id,
            moving: Some(pending),
            updated_at_ms: ctx.at_ms,
            revision: ctx.index,
            ..vm.clone()
        };
        self.set_vm(&vm.name, Some(rec), journal);
    }

    /// An evicted VM's old node has stopped it (or left, or is down and so
    /// fenced): it is placed now (on its move's target if it fits there),
    /// or waits in the queue. A drain of the old node goes on.
    fn release(&mut self, vm: &VmRecord, ctx: ApplyCtx, mut journal: Journal<'_>) {
        let from = vm.leaving;
        let pending = vm.moving.unwrap_or(PendingMove { reason: MoveReason::Preempted, to: 0 });
        // A migrated or drained VM must not land where it left.
        let avoid = if pending.reason == MoveReason::Preempted { 0 } else { from };
        let rec = VmRecord { leaving: 0, moving: None, ..vm.clone() };
        self.relocate(&rec, from, pending.reason, pending.to, avoid, ctx, journal.as_deref_mut());
        if self.state.with_node(from, |n| n.drain.is_some()).unwrap_or(false) {
            self.advance_drain(from, ctx, journal);
        }
    }

    /// Places `vm` (placed on no node, or on `from`, which it leaves) anew:
    /// on `prefer` if it fits there, else where the scheduler says (never on
    /// `avoid`), else queued if it should run (a stopped VM that fits
    /// nowhere stays on no node until started). Records the move.
    #[allow(clippy::too_many_arguments)]
    fn relocate(
        &mut self,
        vm: &VmRecord,
        from: NodeId,
        reason: MoveReason,
        prefer: NodeId,
        avoid: NodeId,
        ctx: ApplyCtx,
        journal: Journal<'_>,
    ) {
        let to = {
            let sched = self.state.sched.lock();
            let req = Request { avoid, ..Request::of(vm) };
            if prefer != 0 && sched.fits_on(prefer, &req) {
                prefer
            } else {
                sched.place(&req).unwrap_or(0)
            }
        };
        let mut history = vm.history.clone();
        if history.len() >= MAX_HISTORY {
            history.drain(..=history.len() - MAX_HISTORY);
        }
        history.push(Move { from, to, reason, at_ms: ctx.at_ms, revision: ctx.index });
        let (observed, queued_at) = match (to, vm.desired) {
            (0, DesiredState::Running) => {
                (ObservedState::Queued, if vm.queued_at != 0 { vm.queued_at } else { ctx.index })
            }
            (_, DesiredState::Stopped) => (ObservedState::Stopped, 0),
            _ => (ObservedState::Pending, 0),
        };
        let rec = VmRecord {
            node_id: to,
            observed,
            queued_at,
            history,
            placement_gen: vm.placement_gen + 1,
            runtime: VmRuntime { restarts: vm.runtime.restarts, ..Default::default() },
            updated_at_ms: ctx.at_ms,
            revision: ctx.index,
            ..vm.clone()
        };
        self.set_vm(&vm.name, Some(rec), journal);
    }

    /// Node `id` (a member) as it is now.
    fn member(&self, id: NodeId, what: &str) -> Result<NodeRecord, CommandError> {
        let Some(node) = self.state.nodes.get(&id).map(|n| n.value().clone()) else {
            return Err(CommandError::UnknownNode { id });
        };
        if node.status == NodeStatus::Left {
            return Err(CommandError::NodeState {
                id,
                state: "left".into(),
                why: format!("it left the cluster and {what}"),
            });
        }
        Ok(node)
    }

    /// Liveness, proposed by the leader. Ready: heard again (or for the
    /// first time: it heartbeats, so it may be marked down later). Down: the
    /// node has fenced itself
    /// (it stops its VMs before the timeout), so its VMs are placed on
    /// other nodes at once, or queued; `--reschedule never` VMs stay, as
    /// `lost`. VMs that were leaving it are released. Ready again: it takes
    /// placements (and queued VMs) again.
    fn set_node_down(
        &mut self,
        id: NodeId,
        down: bool,
        ctx: ApplyCtx,
        mut journal: Journal<'_>,
    ) -> CommandResult {
        let old = self.member(id, "has no liveness")?;
        let (mut moved, mut queued, mut kept) = (0, 0, 0);
        // Ready: it heartbeats (from now on it may be marked down).
        let heartbeats = old.heartbeats || !down;
        if (old.down, old.heartbeats) == (down, heartbeats) {
            return Ok(CommandOutput::NodeDownSet { id, down, moved, queued, kept });
        }
        let rec = NodeRecord { down, heartbeats, updated_at_ms: ctx.at_ms, ..old.clone() };
        self.put_node(id, Some(rec), Some(old), journal.as_deref_mut());
        if !down {
            self.touched.insert(id);
            self.advance_drain(id, ctx, journal);
            return Ok(CommandOutput::NodeDownSet { id, down, moved, queued, kept });
        }
        let leaving: Vec<VmRecord> =
            self.vms.table().on_node(0).filter(|v| v.leaving == id).cloned().collect();
        for vm in leaving {
            self.release(&vm, ctx, journal.as_deref_mut());
        }
        let names: Vec<Arc<str>> = self.vms.table().names_on(id).cloned().collect();
        for name in names {
            let Some(vm) = self.vms.get(&name).cloned() else { continue };
            if vm.reschedule == Reschedule::Never {
                kept += 1;
                if vm.observed != ObservedState::Lost {
                    let rec = VmRecord {
                        observed: ObservedState::Lost,
                        updated_at_ms: ctx.at_ms,
                        revision: ctx.index,
                        ..(*vm).clone()
                    };
                    self.set_vm(&name, Some(rec), journal.as_deref_mut());
                }
                continue;
            }
            self.relocate(&vm, id, MoveReason::NodeDown, 0, id, ctx, journal.as_deref_mut());
            match self.vms.get(&name).map(|v| v.node_id) {
                Some(0) => queued += 1,
                _ => moved += 1,
            }
        }
        Ok(CommandOutput::NodeDownSet { id, down, moved, queued, kept })
    }

    /// Why `vm` cannot leave node `from` now, if it cannot: pinned there,
    /// or no other node fits it.
    fn cannot_move(&self, vm: &VmRecord, from: NodeId) -> Option<String> {
        if vm.placement.node == from {
            return Some(format!("pinned to node {from}"));
        }
        if vm.desired == DesiredState::Stopped {
            return None;
        }
        let sched = self.state.sched.lock();
        let req = Request { avoid: from, ..Request::of(vm) };
        match sched.place(&req) {
            Some(_) => None,
            None => Some(format!("no other node fits it: {}", sched.explain(&req))),
        }
    }

    /// Moves VMs off draining node `id` while fewer than its drain's
    /// `max_parallel` are on their way. Returns those it started moving and
    /// those that cannot move, with why.
    fn advance_drain(
        &mut self,
        id: NodeId,
        ctx: ApplyCtx,
        mut journal: Journal<'_>,
    ) -> (Vec<String>, Vec<(String, String)>) {
        let (mut moving, mut stuck) = (Vec::new(), Vec::new());
        // Only a live member drains: a down node's VMs have moved already
        // (or stay by their policy), a node that left stops nothing.
        let Some(Some(drain)) = self
            .state
            .with_node(id, |n| (n.state() == crate::types::NodeState::Draining).then_some(n.drain).flatten())
        else {
            return (moving, stuck);
        };
        let limit = if drain.max_parallel == 0 { usize::MAX } else { drain.max_parallel as usize };
        let in_flight = self.vms.table().on_node(0).filter(|v| v.leaving == id).count();
        let mut budget = limit.saturating_sub(in_flight);
        let on_node: Vec<VmRecord> = self.vms.table().on_node(id).cloned().collect();
        for vm in on_node {
            if let Some(why) = self.cannot_move(&vm, id) {
                stuck.push((vm.name.to_string(), why));
            } else if budget > 0 {
                budget -= 1;
                let pending = PendingMove { reason: MoveReason::Drain, to: 0 };
                self.begin_move(&vm, pending, None, ctx, journal.as_deref_mut());
                moving.push(vm.name.to_string());
            }
        }
        (moving, stuck)
    }

    /// `vm migrate`: checks the move can happen now (to `to`, or to a node
    /// the scheduler picks), then starts it.
    fn migrate(&mut self, name: &str, to: NodeId, ctx: ApplyCtx, journal: Journal<'_>) -> CommandResult {
        let Some(vm) = self.vms.get(name).cloned() else {
            return Err(CommandError::VmNotFound { name: name.to_string() });
        };
        let cannot = |reason: String| CommandError::CannotMove { name: name.to_string(), reason };
        let from = vm.node_id;
        if from == 0 {
            let why = if vm.leaving != 0 {
                format!("it is already leaving node {}", vm.leaving)
            } else {
                "it is placed on no node (queued or stopped); start it to place it".to_string()
            };
            return Err(cannot(why));
        }
        if vm.placement.node == from {
            return Err(cannot(format!("it is pinned to node {from}")));
        }
        if to != 0 {
            if to == from {
                return Err(cannot(format!("it is already on node {to}")));
            }
            let Some(state) = self.state.with_node(to, NodeRecord::state) else {
                return Err(CommandError::UnknownNode { id: to });
            };
            let sched = self.state.sched.lock();
            let req = Request { avoid: from, ..Request::of(&vm) };
            if !sched.fits_on(to, &req) {
                let why = if state == crate::types::NodeState::Ready {
                    format!("it does not fit on node {to} ({})", sched.explain(&req))
                } else {
                    format!("node {to} is {} and takes no placements", state.as_str())
                };
                return Err(cannot(why));
            }
        } else if let Some(why) = self.cannot_move(&vm, from) {
            return Err(cannot(why));
        }
        self.begin_move(&vm, PendingMove { reason: MoveReason::Migrate, to }, None, ctx, journal);
        Ok(CommandOutput::VmMigrating { name: name.to_string(), from, to })
    }

    /// `CreateVms`: every VM or none.
    fn create_vms(
        &mut self,
        vms: &[NewVm],
        start: bool,
        queue: bool,
        ctx: ApplyCtx,
        journal: Journal<'_>,
    ) -> CommandResult {
        let mut inner = Vec::new();
        let mut out = Vec::with_capacity(vms.len());
        for vm in vms {
            match self.create_vm(vm, start, queue, ctx, Some(&mut inner)) {
                Ok(created) => out.push(created),
                Err(e) => {
                    self.rollback(inner);
                    return Err(e);
                }
            }
        }
        if let Some(j) = journal {
            j.extend(inner);
        }
        Ok(CommandOutput::VmsCreated { vms: out })
    }

    fn rollback(&mut self, journal: Vec<Undo>) {
        for undo in journal.into_iter().rev() {
            match undo {
                Undo::Vm(name, old) => {
                    self.write_vm(&name, old.map(|o| (*o).clone()), None);
                }
                Undo::VmCidr(old) => {
                    self.state.sched.lock().net_mut().set_cidr(old);
                }
                Undo::Strategy(old) => {
                    self.state.sched.lock().set_strategy(old);
                }
                Undo::NodeTimeout(old, old_prev) => {
                    self.state.set_node_timeout(old, old_prev);
                }
                Undo::Quota(tenant, old) => {
                    let mut quotas = self.state.quotas.lock();
                    match old {
                        Some(q) => quotas.insert(tenant, q),
                        None => quotas.remove(&tenant),
                    };
                }
                Undo::Node(id, old) => {
                    let cur = self.state.nodes.get(&id).map(|n| n.value().clone());
                    self.put_node(id, old.map(|b| *b), cur, None);
                }
                Undo::Token(hash, old, bootstrapped) => {
                    match old {
                        Some(t) => self.state.tokens.insert(hash, t),
                        None => self.state.tokens.remove(&hash).map(|(_, t)| t),
                    };
                    self.state.tokens_bootstrapped.store(bootstrapped, std::sync::atomic::Ordering::Release);
                }
            }
        }
    }
}

/// Refuses resources whose allocatable part is below what the node's VMs
/// already hold, in any dimension.
fn check_allocatable(
    id: NodeId,
    resources: &NodeResources,
    allocated: &Resources,
) -> Result<(), CommandError> {
    let allocatable = resources.allocatable();
    if !allocated.fits_in(&allocatable) {
        return Err(CommandError::CapacityBelowAllocated {
            id,
            capacity: allocatable,
            allocated: *allocated,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::types::{QuotaLimits, VmSpec};
    use std::collections::BTreeMap;

    fn p(command: Command) -> Proposal {
        Proposal { at_ms: 1_000, request: None, command }
    }

    fn register(id: NodeId, vcpus: u32, mem: u64) -> Command {
        Command::RegisterNode {
            id,
            addr: format!("127.0.0.1:{}", 7000 + id),
            resources: NodeResources::plain(Resources::new(vcpus, mem, 100)),
            labels: BTreeMap::new(),
        }
    }

    fn create(name: &str, vcpus: u32, mem: u64) -> Command {
        Command::CreateVm {
            name: name.into(),
            spec: VmSpec { vcpus, memory_mb: mem, disk_gb: 1, ..Default::default() },
            start: true,
        }
    }

    fn state_with_nodes() -> ClusterState {
        let s = ClusterState::new();
        s.apply(&p(register(1, 4, 1024)), 1).unwrap();
        s.apply(&p(register(2, 4, 2048)), 2).unwrap();
        s
    }

    #[test]
    fn create_places_on_most_free_memory_and_reserves() {
        let s = state_with_nodes();
        let out = s.apply(&p(create("a", 1, 512)), 3).unwrap();
        assert_eq!(out, CommandOutput::VmCreated { name: "a".into(), node_id: 2 });
        // node 2 now has 1536 free, still more than node 1.
        let out = s.apply(&p(create("b", 1, 512)), 4).unwrap();
        assert_eq!(out, CommandOutput::VmCreated { name: "b".into(), node_id: 2 });
        // node 2 has 1024 free, equal to node 1: lowest id wins.
        let out = s.apply(&p(create("c", 1, 512)), 5).unwrap();
        assert_eq!(out, CommandOutput::VmCreated { name: "c".into(), node_id: 1 });
        assert_eq!(s.with_node(2, |n| n.allocated), Some(Resources::new(2, 1024, 2)));
        let mut on2 = Vec::new();
        s.for_each_vm_on(2, |v| on2.push(v.name.to_string()));
        assert_eq!(on2, ["a", "b"]);
        assert_eq!(s.with_vm("a", |v| (v.revision, v.observed)), Some((3, ObservedState::Pending)));
        s.check_invariants().unwrap();
    }

    /// Old entries hold host paths as kernels (the API edge now refuses
    /// them, apply must not): replayed, they create the VM as they did, so
    /// every build computes the same state. New entries hold image names.
    #[test]
    fn apply_keeps_old_host_path_kernels_and_takes_image_names() {
        let s = state_with_nodes();
        let with_boot = |name: &str, kernel: &str, initrd: &str| {
            let mut c = create(name, 1, 128);
            if let Command::CreateVm { spec, .. } = &mut c {
                spec.boot = crate::types::BootSpec {
                    kernel: kernel.into(),
                    initrd: initrd.into(),
                    cmdline: String::new(),
                };
            }
            c
        };
        s.apply(&p(with_boot("old", "/etc/shadow", "/boot/initrd.img")), 3).unwrap();
        s.apply(&p(with_boot("new", "custom/vmlinuz", "initrd.img")), 4).unwrap();
        assert_eq!(s.with_vm("old", |v| v.spec.boot.kernel.clone()).as_deref(), Some("/etc/shadow"));
        assert_eq!(s.with_vm("new", |v| v.spec.boot.kernel.clone()).as_deref(), Some("custom/vmlinuz"));
        // What no edge ever let through is still refused.
        let e = s.apply(&p(with_boot("bad", "../vmlinuz", "")), 5).unwrap_err();
        assert!(e.to_string().starts_with("invalid kernel path \"../vmlinuz\""), "{e}");
        s.check_invariants().unwrap();
    }

    fn set_node(id: NodeId, cpu: Option<&str>, set: &[(&str, &str)], remove: &[&str]) -> Command {
        Command::SetNode {
            id,
            set_labels: set.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
            remove_labels: remove.iter().map(|k| k.to_string()).collect(),
            cpu_overcommit: cpu.map(|r| crate::types::Ratio::parse(r).unwrap()),
            memory_overcommit: None,
        }
    }

    /// A `CreateVms` of one VM with placement rules.
    fn create_with(name: &str, mem: u64, placement: Placement, queue: bool) -> Command {
        let spec = VmSpec { vcpus: 1, memory_mb: mem, disk_gb: 1, ..Default::default() };
        let vm = NewVm {
            name: name.into(),
            spec,
            placement,
            reschedule: Reschedule::default(),
            publish: Vec::new(),
        };
        Command::CreateVms { vms: vec![vm], start: true, queue }
    }

    fn prio(priority: u8) -> Placement {
        Placement { priority, ..Default::default() }
    }

    fn node_of(s: &ClusterState, name: &str) -> Option<(NodeId, ObservedState)> {
        s.with_vm(name, |v| (v.node_id, v.observed))
    }

    #[test]
    fn the_queue_is_work_conserving_and_ordered() {
        let s = state_with_nodes(); // node 1: 1024 MiB, node 2: 2048 MiB
        s.apply(&p(create_with("big", 2048, prio(50), false)), 3).unwrap();
        s.apply(&p(create_with("mid", 1024, prio(50), false)), 4).unwrap();
        // Full: without --queue a clear refusal, with it a queued VM.
        let e = s.apply(&p(create_with("q-low", 512, prio(10), false)), 5).unwrap_err();
        assert!(matches!(e, CommandError::NoFit { .. }), "{e}");
        assert!(e.to_string().contains("2 nodes; 2 lack memory"), "{e}");
        s.apply(&p(create_with("q-low", 512, prio(10), true)), 6).unwrap();
        s.apply(&p(create_with("q-old", 1024, prio(50), true)), 7).unwrap();
        s.apply(&p(create_with("q-new", 1024, prio(50), true)), 8).unwrap();
        assert_eq!(node_of(&s, "q-low"), Some((0, ObservedState::Queued)));
        s.check_invariants().unwrap();
        // Capacity appears: highest priority, then oldest, first. 1024 MiB
        // on node 1 takes q-old; q-new and q-low wait.
        s.apply(&p(Command::DeleteVm { name: "mid".into() }), 9).unwrap();
        assert_eq!(node_of(&s, "q-old"), Some((1, ObservedState::Pending)));
        assert_eq!(node_of(&s, "q-new").map(|n| n.0), Some(0));
        s.check_invariants().unwrap();
        // 2048 MiB on node 2: q-new (1024) then q-low (512) both fit.
        s.apply(&p(Command::DeleteVm { name: "big".into() }), 10).unwrap();
        assert_eq!(node_of(&s, "q-new").map(|n| n.0), Some(2));
        assert_eq!(node_of(&s, "q-low").map(|n| n.0), Some(2));
        s.check_invariants().unwrap();
        // A node that grows drains the queue too; stopping a queued VM takes
        // it out of the queue, starting it again puts it back.
        s.apply(&p(create_with("later", 2048, prio(50), true)), 11).unwrap();
        s.apply(&p(Command::StopVm { name: "later".into() }), 12).unwrap();
        assert_eq!(node_of(&s, "later"), Some((0, ObservedState::Stopped)));
        s.apply(&p(Command::StartVm { name: "later".into() }), 13).unwrap();
        assert_eq!(node_of(&s, "later"), Some((0, ObservedState::Queued)));
        s.apply(&p(register(3, 4, 4096)), 14).unwrap();
        assert_eq!(node_of(&s, "later"), Some((3, ObservedState::Pending)));
        s.check_invariants().unwrap();
        let other = ClusterState::new();
        other.restore(s.image(), 0);
        other.check_invariants().unwrap();
        assert_eq!(other.digest(), s.digest());
    }

    #[test]
    fn preemption_queues_lower_priorities_and_undoes_in_a_failed_batch() {
        let s = state_with_nodes();
        s.apply(&p(create_with("low-a", 1024, prio(10), false)), 3).unwrap();
        s.apply(&p(create_with("low-b", 1024, prio(20), false)), 4).unwrap();
        s.apply(&p(create_with("low-c", 1024, prio(10), false)), 5).unwrap();
        let before = s.image();
        // Equal priority never preempts.
        let e = s.apply(&p(create_with("peer", 1024, prio(10), false)), 6).unwrap_err();
        assert!(e.is_no_capacity(), "{e}");
        // A failed batch gives back the evicted VMs where they were.
        let batch = Command::Batch(vec![
            create_with("vip", 1024, prio(90), false),
            Command::DeleteVm { name: "nope".into() },
        ]);
        assert!(s.apply(&p(batch), 7).is_err());
        assert_eq!(s.image(), before);
        let out = s.apply(&p(create_with("vip", 1024, prio(90), false)), 8).unwrap();
        let CommandOutput::VmsCreated { vms } = out else { panic!("{out:?}") };
        // Node 1 holds low-b (20), node 2 low-a and low-c (10, created at
        // the same time: by name). One victim either way; the lower priority
        // wins: low-a, from node 2.
        assert_eq!(vms[0].preempted, ["low-a"], "{vms:?}");
        assert_eq!(vms[0].node_id, 2);
        let victim = "low-a";
        assert_eq!(
            s.with_vm(victim, |v| (v.node_id, v.observed, v.preempted_by.clone())),
            Some((0, ObservedState::Queued, "vip".to_string()))
        );
        assert_eq!(s.with_vm(victim, |v| v.leaving), Some(2), "waits for node 2 to stop it");
        s.check_invariants().unwrap();
        // Room appears, but the victim is placed nowhere until the node it
        // was evicted from says it stopped it: never on two nodes at once.
        s.apply(&p(Command::DeleteVm { name: "vip".into() }), 9).unwrap();
        assert_eq!(s.with_vm(victim, |v| (v.node_id, v.observed)), Some((0, ObservedState::Queued)));
        s.check_invariants().unwrap();
        let stopped = |node| {
            p(Command::ReportVms {
                node,
                reports: vec![crate::command::VmReport {
                    name: victim.into(),
                    observed: ObservedState::Stopped,
                    runtime: Default::default(),
                }],
            })
        };
        assert_eq!(
            s.apply(&stopped(1), 10).unwrap(),
            CommandOutput::VmsReported { applied: 0 },
            "wrong node"
        );
        assert_eq!(s.with_vm(victim, |v| v.leaving), Some(2));
        assert_eq!(s.apply(&stopped(2), 11).unwrap(), CommandOutput::VmsReported { applied: 1 });
        assert_eq!(
            s.with_vm(victim, |v| (v.node_id, v.leaving, v.observed)),
            Some((2, 0, ObservedState::Pending))
        );
        s.check_invariants().unwrap();
    }

    #[test]
    fn a_node_that_leaves_releases_the_vms_evicted_from_it() {
        let s = state_with_nodes(); // node 1: 1024 MiB, node 2: 2048 MiB
        s.apply(&p(create_with("low", 2048, prio(10), false)), 3).unwrap();
        s.apply(&p(create_with("vip", 2048, prio(90), false)), 4).unwrap();
        assert_eq!(s.with_vm("low", |v| (v.node_id, v.leaving)), Some((0, 2)));
        // Room appears on node 3, but "low" still waits for node 2 ...
        s.apply(&p(register(3, 4, 4096)), 5).unwrap();
        assert_eq!(s.with_vm("low", |v| v.node_id), Some(0));
        s.check_invariants().unwrap();
        // ... until node 2 is removed from the cluster: then it is placed.
        s.apply(&p(Command::DecommissionNode { id: 2 }), 6).unwrap();
        assert_eq!(
            s.with_vm("low", |v| (v.node_id, v.leaving, v.observed)),
            Some((3, 0, ObservedState::Pending))
        );
        s.check_invariants().unwrap();
    }

    /// A VM of `mem` MiB with `reschedule` and `placement`.
    fn create_full(name: &str, mem: u64, placement: Placement, reschedule: Reschedule) -> Command {
        let spec = VmSpec { vcpus: 1, memory_mb: mem, disk_gb: 1, ..Default::default() };
        let vm = NewVm { name: name.into(), spec, placement, reschedule, publish: Vec::new() };
        Command::CreateVms { vms: vec![vm], start: true, queue: true }
    }

    fn stopped_on(node: NodeId, name: &str) -> Command {
        Command::ReportVms {
            node,
            reports: vec![crate::command::VmReport {
                name: name.into(),
                observed: ObservedState::Stopped,
                runtime: Default::default(),
            }],
        }
    }

    fn moves(s: &ClusterState, name: &str) -> Vec<(NodeId, NodeId, MoveReason)> {
        s.with_vm(name, |v| v.history.iter().map(|m| (m.from, m.to, m.reason)).collect()).unwrap()
    }

    fn three_nodes() -> ClusterState {
        let s = state_with_nodes();
        s.apply(&p(register(3, 4, 2048)), 3).unwrap();
        s
    }

    #[test]
    fn a_node_marked_down_has_its_vms_placed_elsewhere_unless_they_say_never() {
        let s = three_nodes(); // node 1: 1024 MiB, nodes 2 and 3: 2048 MiB
        let pin2 = Placement { node: 2, ..Default::default() };
        s.apply(&p(create_full("web", 512, Placement::default(), Reschedule::OnNodeFailure)), 4).unwrap();
        s.apply(&p(create_full("keep", 512, Placement::default(), Reschedule::Never)), 5).unwrap();
        s.apply(&p(create_full("pinned", 256, pin2.clone(), Reschedule::OnNodeFailure)), 6).unwrap();
        s.apply(&p(create_full("big", 1536, Placement::default(), Reschedule::OnNodeFailure)), 7).unwrap();
        let on = |name| s.with_vm(name, |v| v.node_id).unwrap();
        assert_eq!([on("web"), on("keep"), on("pinned"), on("big")], [2, 3, 2, 3]);
        // Node 3 goes down: keep stays (lost), big fits nowhere (1280 and
        // 1024 MiB free elsewhere) and waits.
        let out = s.apply(&p(Command::SetNodeDown { id: 3, down: true }), 8).unwrap();
        assert_eq!(out, CommandOutput::NodeDownSet { id: 3, down: true, moved: 0, queued: 1, kept: 1 });
        assert_eq!(node_of(&s, "keep"), Some((3, ObservedState::Lost)));
        assert_eq!(node_of(&s, "big"), Some((0, ObservedState::Queued)));
        assert_eq!(moves(&s, "big"), [(3, 0, MoveReason::NodeDown)]);
        assert_eq!(
            s.with_node(3, |n| (n.state(), n.heartbeats)),
            Some((crate::types::NodeState::Down, false))
        );
        // Marking down twice is a no-op.
        let again = s.apply(&p(Command::SetNodeDown { id: 3, down: true }), 9).unwrap();
        assert_eq!(again, CommandOutput::NodeDownSet { id: 3, down: true, moved: 0, queued: 0, kept: 0 });
        s.check_invariants().unwrap();
        // Node 2 too: web moves to node 1, pinned waits for node 2, and a
        // new VM pinned there waits as well.
        let out = s.apply(&p(Command::SetNodeDown { id: 2, down: true }), 10).unwrap();
        assert_eq!(out, CommandOutput::NodeDownSet { id: 2, down: true, moved: 1, queued: 1, kept: 0 });
        assert_eq!(s.with_vm("web", |v| (v.node_id, v.placement_gen)), Some((1, 1)));
        assert_eq!(moves(&s, "web"), [(2, 1, MoveReason::NodeDown)]);
        assert_eq!(node_of(&s, "pinned"), Some((0, ObservedState::Queued)));
        s.apply(&p(create_full("new", 64, pin2, Reschedule::OnNodeFailure)), 11).unwrap();
        assert_eq!(node_of(&s, "new"), Some((0, ObservedState::Queued)));
        s.check_invariants().unwrap();
        // Back up: what waits is placed there; it is known to heartbeat.
        s.apply(&p(Command::SetNodeDown { id: 3, down: false }), 12).unwrap();
        assert_eq!(on("big"), 3);
        assert_eq!(
            s.with_node(3, |n| (n.state(), n.heartbeats)),
            Some((crate::types::NodeState::Ready, true))
        );
        s.apply(&p(Command::SetNodeDown { id: 2, down: false }), 13).unwrap();
        assert_eq!([on("pinned"), on("new")], [2, 2]);
        s.check_invariants().unwrap();
        let other = ClusterState::new();
        other.restore(s.image(), 0);
        assert_eq!(other.digest(), s.digest());
    }

    #[test]
    fn a_drain_moves_vms_a_few_at_a_time_and_reports_what_cannot_move() {
        // a, b and c on node 2 (the only node then), c pinned there.
        let s = ClusterState::new();
        s.apply(&p(register(2, 4, 2048)), 1).unwrap();
        let pin2 = Placement { node: 2, ..Default::default() };
        s.apply(&p(create_full("a", 256, Placement::default(), Reschedule::OnNodeFailure)), 2).unwrap();
        s.apply(&p(create_full("b", 256, Placement::default(), Reschedule::OnNodeFailure)), 3).unwrap();
        s.apply(&p(create_full("c", 256, pin2.clone(), Reschedule::OnNodeFailure)), 4).unwrap();
        s.apply(&p(register(1, 4, 1024)), 5).unwrap();
        s.apply(&p(register(3, 4, 2048)), 6).unwrap();
        let drain = Command::DrainNode { id: 2, max_parallel: 1, deadline_ms: 0 };
        let out = s.apply(&p(drain.clone()), 20).unwrap();
        assert_eq!(
            out,
            CommandOutput::Draining {
                id: 2,
                moving: vec!["a".into()],
                stuck: vec![("c".into(), "pinned to node 2".into())],
            }
        );
        assert_eq!(
            s.with_vm("a", |v| (v.node_id, v.leaving, v.observed)),
            Some((0, 2, ObservedState::Stopping))
        );
        assert_eq!(s.with_vm("b", |v| v.node_id), Some(2), "one at a time");
        s.check_invariants().unwrap();
        // Draining takes no placements; a report from another node changes
        // nothing; node 2's report releases a, and b starts moving.
        s.apply(&p(create_full("late", 64, pin2, Reschedule::OnNodeFailure)), 21).unwrap();
        assert_eq!(s.with_vm("late", |v| v.node_id), Some(0));
        s.apply(&p(stopped_on(3, "a")), 22).unwrap();
        assert_eq!(s.with_vm("a", |v| v.leaving), Some(2));
        s.apply(&p(stopped_on(2, "a")), 23).unwrap();
        let a_to = s.with_vm("a", |v| v.node_id).unwrap();
        assert!(a_to == 1 || a_to == 3, "{a_to}");
        assert_eq!(moves(&s, "a"), [(2, a_to, MoveReason::Drain)]);
        assert_eq!(s.with_vm("b", |v| (v.node_id, v.leaving)), Some((0, 2)));
        s.apply(&p(stopped_on(2, "b")), 24).unwrap();
        assert_ne!(s.with_vm("b", |v| v.node_id), Some(2));
        s.check_invariants().unwrap();
        // Eligible again: the queue drains onto it.
        s.apply(&p(Command::SetEligible { id: 2 }), 25).unwrap();
        assert_eq!(s.with_vm("late", |v| v.node_id), Some(2));
        assert_eq!(s.with_node(2, |n| n.state()), Some(crate::types::NodeState::Ready));
        s.check_invariants().unwrap();
        // A node that left cannot be drained.
        s.apply(&p(Command::DecommissionNode { id: 1 }), 26).unwrap();
        let e = s.apply(&p(Command::DrainNode { id: 1, max_parallel: 0, deadline_ms: 0 }), 27).unwrap_err();
        assert!(matches!(e, CommandError::NodeState { .. }), "{e}");
    }

    #[test]
    fn migrate_moves_a_vm_where_asked_once_its_node_stopped_it() {
        let s = three_nodes();
        s.apply(&p(create_full("m", 512, Placement::default(), Reschedule::OnNodeFailure)), 4).unwrap();
        let pinned = Placement { node: 3, ..Default::default() };
        s.apply(&p(create_full("pin", 64, pinned, Reschedule::OnNodeFailure)), 5).unwrap();
        assert_eq!(s.with_vm("m", |v| v.node_id), Some(2));
        let before = s.image();
        let refused = [
            (Command::MigrateVm { name: "m".into(), to: 2 }, "already on node 2"),
            (Command::MigrateVm { name: "pin".into(), to: 0 }, "pinned to node 3"),
            (Command::MigrateVm { name: "m".into(), to: 1 }, "does not fit on node 1"),
        ];
        s.apply(
            &p(create_full("fill", 768, Placement { node: 1, ..Default::default() }, Reschedule::Never)),
            6,
        )
        .unwrap();
        let before_fill = s.image();
        for (i, (cmd, why)) in refused.into_iter().enumerate() {
            let e = s.apply(&p(cmd), 7 + i as u64).unwrap_err();
            assert!(e.to_string().contains(why), "{e}");
        }
        assert!(matches!(
            s.apply(&p(Command::MigrateVm { name: "m".into(), to: 9 }), 10),
            Err(CommandError::UnknownNode { id: 9 })
        ));
        assert_eq!(s.image(), before_fill);
        assert_ne!(s.image(), before);
        let out = s.apply(&p(Command::MigrateVm { name: "m".into(), to: 3 }), 11).unwrap();
        assert_eq!(out, CommandOutput::VmMigrating { name: "m".into(), from: 2, to: 3 });
        let e = s.apply(&p(Command::MigrateVm { name: "m".into(), to: 0 }), 12).unwrap_err();
        assert!(e.to_string().contains("already leaving node 2"), "{e}");
        s.check_invariants().unwrap();
        s.apply(&p(stopped_on(2, "m")), 13).unwrap();
        assert_eq!(node_of(&s, "m"), Some((3, ObservedState::Pending)));
        assert_eq!(moves(&s, "m"), [(2, 3, MoveReason::Migrate)]);
        // Without a target the scheduler picks, never the node it leaves.
        s.apply(&p(Command::MigrateVm { name: "m".into(), to: 0 }), 14).unwrap();
        s.apply(&p(stopped_on(3, "m")), 15).unwrap();
        assert_eq!(s.with_vm("m", |v| v.node_id), Some(2));
        s.check_invariants().unwrap();
    }

    fn with_ports(name: &str, mem: u64, node: NodeId, ports: &[(u16, u16)]) -> Command {
        let spec = VmSpec { vcpus: 1, memory_mb: mem, disk_gb: 0, ..Default::default() };
        let placement = Placement { node, ..Default::default() };
        let publish = ports.iter().map(|&(host, guest)| PortMap { host, guest }).collect();
        let vm = NewVm { name: name.into(), spec, placement, reschedule: Reschedule::default(), publish };
        Command::CreateVms { vms: vec![vm], start: true, queue: false }
    }

    /// A queued VM that waits for a port gets it as soon as the VM holding
    /// it leaves the node, also when that VM had already been unplaced and
    /// only its ports stayed behind (`leaving`) until its node stopped it.
    #[test]
    fn a_port_freed_by_a_leaving_vm_drains_the_queue() {
        let s = ClusterState::new();
        s.apply(&p(register(1, 8, 4096)), 1).unwrap();
        s.apply(&p(with_ports("a", 64, 0, &[(8002, 80)])), 2).unwrap();
        s.apply(&p(register(2, 4, 256)), 3).unwrap();
        assert_eq!(s.with_vm("a", |v| v.node_id), Some(1));
        // q wants port 8002 (taken on node 1) and more memory than node 2 has.
        let Command::CreateVms { vms, start, .. } = with_ports("q", 1024, 0, &[(8002, 80)]) else {
            unreachable!()
        };
        s.apply(&p(Command::CreateVms { vms, start, queue: true }), 4).unwrap();
        assert_eq!(s.with_vm("q", |v| (v.node_id, v.observed)), Some((0, ObservedState::Queued)));
        // a moves to node 2: unplaced at once, its port held until node 1
        // reports it stopped.
        s.apply(&p(Command::MigrateVm { name: "a".into(), to: 2 }), 5).unwrap();
        assert_eq!(s.with_vm("a", |v| (v.node_id, v.leaving)), Some((0, 1)));
        assert_eq!(s.with_vm("q", |v| v.node_id), Some(0), "port 8002 is still held on node 1");
        s.apply(&p(stopped_on(1, "a")), 6).unwrap();
        assert_eq!(s.with_vm("a", |v| v.node_id), Some(2));
        assert_eq!(s.with_vm("q", |v| v.node_id), Some(1), "the freed port drains the queue");
        s.check_invariants().unwrap();
    }

    fn ip_of(s: &ClusterState, name: &str) -> Option<String> {
        s.with_vm(name, |v| v.ip.map(|ip| ip.to_string())).flatten()
    }

    fn subnet_of(s: &ClusterState, id: NodeId) -> Option<String> {
        s.with_node(id, |n| n.vm_subnet.map(|s| s.to_string())).flatten()
    }

    #[test]
    fn the_vm_network_gives_subnets_and_addresses_lowest_free_first() {
        let s = state_with_nodes();
        s.apply(&p(create("early", 1, 128)), 3).unwrap();
        assert_eq!(ip_of(&s, "early"), None, "no VM network yet");
        let net = Ipv4Net::parse("10.50.0.0/16").unwrap();
        let out = s.apply(&p(Command::SetVmNetwork { cidr: net }), 4).unwrap();
        assert_eq!(out, CommandOutput::VmNetworkSet { cidr: net, subnets: 2, addresses: 1 });
        assert_eq!(subnet_of(&s, 1).as_deref(), Some("10.50.0.0/24"));
        assert_eq!(subnet_of(&s, 2).as_deref(), Some("10.50.1.0/24"));
        assert_eq!(ip_of(&s, "early").as_deref(), Some("10.50.1.2"), "on node 2 (most free memory)");
        s.check_invariants().unwrap();
        // Set once: the same again is a no-op, another is refused.
        assert!(s.apply(&p(Command::SetVmNetwork { cidr: net }), 5).is_ok());
        let other = Ipv4Net::parse("10.60.0.0/16").unwrap();
        let e = s.apply(&p(Command::SetVmNetwork { cidr: other }), 6).unwrap_err();
        assert!(matches!(e, CommandError::VmNetworkFixed { .. }), "{e}");
        // A node registering later gets the next /24.
        s.apply(&p(register(3, 4, 512)), 7).unwrap();
        assert_eq!(subnet_of(&s, 3).as_deref(), Some("10.50.2.0/24"));
        s.apply(&p(create("a", 1, 128)), 8).unwrap();
        s.apply(&p(create("b", 1, 128)), 9).unwrap();
        assert_eq!(ip_of(&s, "a").as_deref(), Some("10.50.1.3"));
        assert_eq!(ip_of(&s, "b").as_deref(), Some("10.50.1.4"));
        // A delete frees its address for the next VM on that node.
        s.apply(&p(Command::DeleteVm { name: "a".into() }), 10).unwrap();
        s.apply(&p(create("c", 1, 128)), 11).unwrap();
        assert_eq!(ip_of(&s, "c").as_deref(), Some("10.50.1.3"));
        // Re-registration keeps the subnet; so does a restart of the state
        // from its image.
        s.apply(&p(register(2, 4, 2048)), 12).unwrap();
        assert_eq!(subnet_of(&s, 2).as_deref(), Some("10.50.1.0/24"));
        let copy = ClusterState::new();
        copy.restore(s.image(), 12);
        assert_eq!(copy.image(), s.image());
        copy.check_invariants().unwrap();
        s.check_invariants().unwrap();
    }

    #[test]
    fn a_migrated_vm_takes_an_address_on_its_new_node_and_keeps_the_old_one_until_stopped() {
        let s = three_nodes();
        s.apply(&p(Command::SetVmNetwork { cidr: Ipv4Net::DEFAULT_VM_CIDR }), 4).unwrap();
        s.apply(&p(with_ports("m", 256, 0, &[(8080, 80)])), 5).unwrap();
        assert_eq!(s.with_vm("m", |v| v.node_id), Some(2));
        assert_eq!(ip_of(&s, "m").as_deref(), Some("10.88.1.2"));
        s.apply(&p(Command::MigrateVm { name: "m".into(), to: 3 }), 6).unwrap();
        // Still stopping on node 2: its address and port stay held there.
        assert_eq!(ip_of(&s, "m").as_deref(), Some("10.88.1.2"));
        let e = s.apply(&p(with_ports("n", 256, 2, &[(8080, 80)])), 7).unwrap_err();
        assert!(e.to_string().contains("host port 8080 taken"), "{e}");
        s.check_invariants().unwrap();
        s.apply(&p(stopped_on(2, "m")), 8).unwrap();
        assert_eq!(s.with_vm("m", |v| v.node_id), Some(3));
        assert_eq!(ip_of(&s, "m").as_deref(), Some("10.88.2.2"));
        // Node 2's address and port are free again.
        s.apply(&p(with_ports("n", 256, 2, &[(8080, 80)])), 9).unwrap();
        assert_eq!(ip_of(&s, "n").as_deref(), Some("10.88.1.2"));
        s.check_invariants().unwrap();
    }

    #[test]
    fn published_ports_conflict_per_node_and_a_full_subnet_refuses_clearly() {
        let s = state_with_nodes();
        s.apply(&p(Command::SetVmNetwork { cidr: Ipv4Net::DEFAULT_VM_CIDR }), 3).unwrap();
        s.apply(&p(with_ports("web", 64, 0, &[(8080, 80)])), 4).unwrap();
        assert_eq!(s.with_vm("web", |v| v.node_id), Some(2));
        // The same host port goes to the other node, then nowhere.
        s.apply(&p(with_ports("web2", 64, 0, &[(8080, 80)])), 5).unwrap();
        assert_eq!(s.with_vm("web2", |v| v.node_id), Some(1));
        let before = s.image();
        let e = s.apply(&p(with_ports("web3", 64, 0, &[(9000, 80), (8080, 80)])), 6).unwrap_err();
        assert!(e.to_string().contains("2 have host port 9000 or 8080 taken"), "{e}");
        // A node's own API port is never published.
        let e = s.apply(&p(with_ports("api", 64, 1, &[(7001, 80)])), 7).unwrap_err();
        assert!(e.to_string().contains("taken"), "{e}");
        assert_eq!(s.image(), before, "a rejected create changes nothing");
        // Input rules: a host port once per VM, ports 1-65535.
        let dup = with_ports("dup", 64, 0, &[(81, 80), (81, 443)]);
        assert!(matches!(s.apply(&p(dup), 8), Err(CommandError::Invalid { .. })));
        let zero = with_ports("zero", 64, 0, &[(0, 80)]);
        assert!(matches!(s.apply(&p(zero), 9), Err(CommandError::Invalid { .. })));

        // A /24 VM network: one node subnet, 253 addresses.
        let s = ClusterState::new();
        s.apply(&p(Command::SetVmNetwork { cidr: Ipv4Net::parse("10.7.7.0/24").unwrap() }), 1).unwrap();
        s.apply(&p(register(1, 512, 1 << 20)), 2).unwrap();
        s.apply(&p(register(2, 512, 1 << 20)), 3).unwrap();
        assert_eq!(subnet_of(&s, 2), None, "the network had no /24 left");
        let mut index = 4;
        for i in 0..crate::vm_net::ADDRESSES_PER_NODE {
            s.apply(&p(with_ports(&format!("v{i}"), 16, 1, &[])), index).unwrap();
            index += 1;
        }
        assert_eq!(ip_of(&s, "v252").as_deref(), Some("10.7.7.254"));
        let e = s.apply(&p(create("one-more", 1, 16)), index).unwrap_err();
        let msg = e.to_string();
        assert!(msg.contains("1 have no VM subnet") && msg.contains("1 have no free VM address"), "{msg}");
        s.check_invariants().unwrap();
    }

    /// Found by fuzzing `InstallSnapshot`: an image whose node holds a
    /// subnet written with host bits (the same network as another node's)
    /// passed the invariants, and the next create gave an address already
    /// held on the other node.
    #[test]
    fn an_image_with_an_unaligned_or_shared_subnet_is_inconsistent() {
        let s = state_with_nodes();
        s.apply(&p(Command::SetVmNetwork { cidr: Ipv4Net::DEFAULT_VM_CIDR }), 3).unwrap();
        s.check_invariants().unwrap();
        let mut image = s.image();
        image.nodes[1].vm_subnet = Some(Ipv4Net { addr: "10.88.0.7".parse().unwrap(), prefix: 24 });
        let copy = ClusterState::new();
        copy.restore(image.clone(), 3);
        let e = copy.check_invariants().unwrap_err();
        assert!(e.contains("not a /24 of the VM network"), "{e}");
        image.vm_cidr = Some(Ipv4Net { addr: "10.88.0.1".parse().unwrap(), prefix: 16 });
        copy.restore(image, 3);
        assert!(copy.check_invariants().unwrap_err().contains("VM network"));
    }

    /// Found by fuzzing: a node that left before the cluster had a VM
    /// network holds its (lost) VMs without addresses; when it registers
    /// again it gets a subnet, and its VMs their addresses.
    #[test]
    fn a_node_that_gets_its_subnet_late_addresses_the_vms_it_holds() {
        let s = state_with_nodes();
        s.apply(
            &p(Command::CreateVm {
                name: "a".into(),
                spec: VmSpec { vcpus: 1, memory_mb: 64, disk_gb: 0, ..Default::default() },
                start: true,
            }),
            3,
        )
        .unwrap();
        let on = s.with_vm("a", |v| v.node_id).unwrap();
        s.apply(&p(Command::DecommissionNode { id: on }), 4).unwrap();
        s.apply(&p(Command::SetVmNetwork { cidr: Ipv4Net::DEFAULT_VM_CIDR }), 5).unwrap();
        assert_eq!(subnet_of(&s, on), None, "a node that left gets no subnet");
        assert_eq!(ip_of(&s, "a"), None);
        s.check_invariants().unwrap();
        s.apply(&p(register(on, 4, 2048)), 6).unwrap();
        assert!(subnet_of(&s, on).is_some());
        assert!(ip_of(&s, "a").is_some(), "its VM got an address with the subnet");
        s.check_invariants().unwrap();
    }

    #[test]
    fn a_rolled_back_batch_gives_back_the_addresses_it_took() {
        let s = state_with_nodes();
        s.apply(&p(Command::SetVmNetwork { cidr: Ipv4Net::DEFAULT_VM_CIDR }), 3).unwrap();
        s.apply(&p(create("keep", 1, 128)), 4).unwrap();
        let before = s.image();
        let batch = Command::Batch(vec![
            create("x", 1, 128),
            Command::DeleteVm { name: "keep".into() },
            create("y", 1, 128),
            create("too-big", 64, 1 << 30),
        ]);
        assert!(s.apply(&p(batch), 5).is_err());
        assert_eq!(s.image(), before);
        s.check_invariants().unwrap();
        s.apply(&p(create("z", 1, 128)), 6).unwrap();
        assert_eq!(ip_of(&s, "z").as_deref(), Some("10.88.1.3"));
    }

    #[test]
    fn the_node_timeout_is_replicated_and_validated() {
        let s = state_with_nodes();
        assert_eq!(s.node_timeout(), std::time::Duration::from_secs(10));
        assert!(s.apply(&p(Command::SetNodeTimeout { ms: 500 }), 3).is_err());
        s.apply(&p(Command::SetNodeTimeout { ms: 4_000 }), 4).unwrap();
        let other = ClusterState::new();
        other.restore(s.image(), 0);
        assert_eq!(other.node_timeout(), std::time::Duration::from_secs(4));
        // A new leader waits out leases granted under the previous timeout.
        assert_eq!(other.node_timeout_grace(), std::time::Duration::from_secs(10));
        let batch = Command::Batch(vec![
            Command::SetNodeTimeout { ms: 8_000 },
            Command::DeleteVm { name: "nope".into() },
        ]);
        assert!(s.apply(&p(batch), 5).is_err());
        assert_eq!(s.node_timeout(), std::time::Duration::from_secs(4));
    }

    #[test]
    fn node_changes_may_not_break_constraints() {
        let s = state_with_nodes();
        s.apply(&p(set_node(1, None, &[("zone", "eu")], &[])), 3).unwrap();
        let eu = Placement {
            constraints: vec![crate::types::Constraint::parse("zone=eu").unwrap()],
            ..Default::default()
        };
        let out = s.apply(&p(create_with("e", 128, eu.clone(), false)), 4).unwrap();
        assert!(matches!(&out, CommandOutput::VmsCreated { vms } if vms[0].node_id == 1), "{out:?}");
        let before = s.image();
        let e = s.apply(&p(set_node(1, None, &[], &["zone"])), 5).unwrap_err();
        assert!(matches!(e, CommandError::BreaksConstraint { id: 1, .. }), "{e}");
        assert!(e.to_string().contains("zone=eu"), "{e}");
        let e = s.apply(&p(set_node(1, None, &[("zone", "us")], &[])), 6).unwrap_err();
        assert!(matches!(e, CommandError::BreaksConstraint { .. }), "{e}");
        assert_eq!(s.image(), before);
        // A queued VM waiting for a label is placed when a node gets it.
        s.apply(&p(create_with("e2", 128, eu.clone(), false)), 7).unwrap();
        let us = Placement {
            constraints: vec![crate::types::Constraint::parse("zone=us").unwrap()],
            ..Default::default()
        };
        s.apply(&p(create_with("u", 128, us, true)), 8).unwrap();
        assert_eq!(node_of(&s, "u").map(|n| n.0), Some(0));
        s.apply(&p(set_node(2, None, &[("zone", "us")], &[])), 9).unwrap();
        assert_eq!(node_of(&s, "u").map(|n| n.0), Some(2));
        // Pinning to an unknown node is an error even with --queue.
        let pinned = Placement { node: 9, ..Default::default() };
        let e = s.apply(&p(create_with("pin", 128, pinned, true)), 10).unwrap_err();
        assert!(matches!(e, CommandError::UnknownNode { id: 9 }), "{e}");
        s.check_invariants().unwrap();
    }

    #[test]
    fn create_vms_is_all_or_nothing_unless_queued_and_dry_runs_change_nothing() {
        let s = state_with_nodes();
        let vms = |queue| Command::CreateVms {
            vms: (1..=4)
                .map(|i| NewVm {
                    name: format!("w-{i}"),
                    spec: VmSpec { vcpus: 1, memory_mb: 128, disk_gb: 1, ..Default::default() },
                    placement: Placement { anti_affinity: "w".into(), ..Default::default() },
                    reschedule: Reschedule::default(),
                    publish: Vec::new(),
                })
                .collect(),
            start: true,
            queue,
        };
        let before = s.image();
        let dry = s.dry_run(&vms(false), 1);
        let e = dry.unwrap_err();
        assert!(
            e.to_string().contains("by anti-affinity group w")
                || e.to_string().contains("excluded by anti-affinity group w"),
            "{e}"
        );
        assert_eq!(s.image(), before, "a dry run changes nothing");
        assert!(s.apply(&p(vms(false)), 3).is_err());
        assert_eq!(s.image(), before, "all or nothing");
        let out = s.dry_run(&vms(true), 1).unwrap();
        assert_eq!(s.image(), before, "a dry run changes nothing");
        let CommandOutput::VmsCreated { vms: placed } = out else { panic!() };
        let nodes: Vec<NodeId> = placed.iter().map(|v| v.node_id).collect();
        assert_eq!(nodes, [2, 1, 0, 0]);
        assert_eq!(s.apply(&p(vms(true)), 4).unwrap(), CommandOutput::VmsCreated { vms: placed });
        s.check_invariants().unwrap();
    }

    #[test]
    fn reservation_and_overcommit_set_what_placement_may_use() {
        let s = ClusterState::new();
        let resources = NodeResources {
            capacity: Resources::new(8, 4096, 100),
            reserved: Resources::new(2, 1024, 10),
            cpu_overcommit: crate::types::Ratio::parse("2").unwrap(),
            memory_overcommit: crate::types::Ratio::parse("1.5").unwrap(),
        };
        let reg = Command::RegisterNode {
            id: 1,
            addr: "127.0.0.1:7001".into(),
            resources,
            labels: BTreeMap::from([("zone".to_string(), "a".to_string())]),
        };
        s.apply(&p(reg.clone()), 1).unwrap();
        // (8 - 2) x 2 vCPUs, (4096 - 1024) x 1.5 MiB, 100 - 10 GiB.
        assert_eq!(s.with_node(1, |n| n.allocatable()), Some(Resources::new(12, 4608, 90)));
        let mut placed = 0;
        for i in 0..20 {
            if s.apply(&p(create(&format!("v{i}"), 1, 256)), 2 + i).is_ok() {
                placed += 1;
            }
            s.check_invariants().unwrap();
        }
        assert_eq!(placed, 12, "allocatable vCPUs bound the count");
        // Lowering the ratio below what is allocated is refused, and
        // changes nothing.
        let before = s.image();
        let e = s.apply(&p(set_node(1, Some("1.5"), &[], &[])), 30).unwrap_err();
        assert!(matches!(e, CommandError::CapacityBelowAllocated { id: 1, .. }), "{e}");
        assert!(e.to_string().contains("allocatable"), "{e}");
        assert_eq!(s.image(), before);
        // Raising it makes room at once.
        s.apply(&p(set_node(1, Some("3"), &[("tier", "gold")], &["zone"])), 31).unwrap();
        assert!(s.apply(&p(create("more", 1, 256)), 32).is_ok());
        s.check_invariants().unwrap();
        // The node re-registers with its flags (as on every start): the
        // operator's overrides stay in force.
        s.apply(&p(reg), 33).unwrap();
        let (labels, cpu) = s.with_node(1, |n| (n.labels.clone(), n.resources.cpu_overcommit)).unwrap();
        assert_eq!(labels, BTreeMap::from([("tier".to_string(), "gold".to_string())]));
        assert_eq!(cpu.to_string(), "3");
        s.check_invariants().unwrap();
        // Unknown nodes and empty changes are refused.
        assert!(matches!(
            s.apply(&p(set_node(9, Some("2"), &[], &[])), 34),
            Err(CommandError::UnknownNode { id: 9 })
        ));
        assert!(matches!(s.apply(&p(set_node(1, None, &[], &[])), 35), Err(CommandError::Invalid { .. })));
    }

    #[test]
    fn format_1_registrations_still_apply() {
        let s = ClusterState::new();
        let old = Command::RegisterNodeV1 {
            id: 4,
            addr: "127.0.0.1:7004".into(),
            capacity: Resources::new(4, 1024, 10),
            labels: BTreeMap::new(),
        };
        s.apply(&p(old), 1).unwrap();
        assert_eq!(s.with_node(4, |n| n.allocatable()), Some(Resources::new(4, 1024, 10)));
        s.check_invariants().unwrap();
    }

    #[test]
    fn quotas_cap_a_tenant_and_survive_snapshots() {
        let s = ClusterState::new();
        s.apply(&p(register(1, 64, 65_536)), 1).unwrap();
        let tenant_vm = |name: &str, tenant: &str, vcpus: u32| Command::CreateVm {
            name: name.into(),
            spec: VmSpec { vcpus, memory_mb: 256, disk_gb: 1, tenant: tenant.into(), ..Default::default() },
            start: true,
        };
        let limits = QuotaLimits { vcpus: Some(4), vms: Some(3), ..Default::default() };
        s.apply(&p(Command::SetQuota { tenant: "acme".into(), limits }), 2).unwrap();
        s.apply(&p(tenant_vm("a1", "acme", 2)), 3).unwrap();
        s.apply(&p(tenant_vm("a2", "acme", 2)), 4).unwrap();
        let before = s.image();
        let e = s.apply(&p(tenant_vm("a3", "acme", 1)), 5).unwrap_err();
        assert!(matches!(&e, CommandError::QuotaExceeded { tenant, .. } if tenant == "acme"), "{e}");
        assert!(e.to_string().contains("vCPUs: 4 used + 1 asked > 4 allowed"), "{e}");
        assert_eq!(s.image(), before, "a refusal changes nothing");
        // Other tenants and untenanted VMs are not limited by acme's quota.
        s.apply(&p(tenant_vm("b1", "beta", 8)), 6).unwrap();
        s.apply(&p(tenant_vm("free", "", 8)), 7).unwrap();
        // A delete frees quota; a batch that fails gives back what it took.
        s.apply(&p(Command::DeleteVm { name: "a1".into() }), 8).unwrap();
        let batch = Command::Batch(vec![tenant_vm("a3", "acme", 1), tenant_vm("a4", "acme", 2)]);
        assert!(s.apply(&p(batch), 9).is_err());
        s.check_invariants().unwrap();
        let q = s.quotas();
        assert_eq!(q.len(), 1);
        assert_eq!((q[0].2.vcpus, q[0].2.vms), (2, 1), "usage after the delete and the failed batch");
        // Snapshot round trip keeps quotas and rebuilds usage.
        let other = ClusterState::new();
        other.restore(s.image(), 0);
        other.check_invariants().unwrap();
        assert_eq!(other.quotas(), s.quotas());
        // Deleting the quota lifts the limit; deleting it twice is an error.
        s.apply(&p(Command::DeleteQuota { tenant: "acme".into() }), 10).unwrap();
        assert!(matches!(
            s.apply(&p(Command::DeleteQuota { tenant: "acme".into() }), 11),
            Err(CommandError::NoQuota { .. })
        ));
        s.apply(&p(tenant_vm("a5", "acme", 16)), 12).unwrap();
        s.check_invariants().unwrap();
    }

    #[test]
    fn binpack_fills_the_fullest_node_first_and_is_kept_in_snapshots() {
        let s = state_with_nodes(); // node 1: 1024 MiB, node 2: 2048 MiB
        s.apply(&p(Command::SetScheduler { strategy: Strategy::Binpack }), 3).unwrap();
        let out = s.apply(&p(create("a", 1, 512)), 4).unwrap();
        assert_eq!(out, CommandOutput::VmCreated { name: "a".into(), node_id: 1 }, "least free that fits");
        let out = s.apply(&p(create("b", 1, 1024)), 5).unwrap();
        assert_eq!(out, CommandOutput::VmCreated { name: "b".into(), node_id: 2 }, "node 1 has 512 left");
        let other = ClusterState::new();
        other.restore(s.image(), 0);
        assert_eq!(other.strategy(), Strategy::Binpack);
        // A batch that fails restores the previous strategy.
        let batch =
            Command::Batch(vec![Command::SetScheduler { strategy: Strategy::Spread }, create("a", 1, 1)]);
        assert!(s.apply(&p(batch), 6).is_err());
        assert_eq!(s.strategy(), Strategy::Binpack);
        s.check_invariants().unwrap();
    }

    #[test]
    fn ratios_parse_and_print_as_decimals() {
        use crate::types::Ratio;
        for (text, milli) in [("1", 1000), ("1.5", 1500), ("0.25", 250), ("2.125", 2125), ("64", 64_000)] {
            let r = Ratio::parse(text).unwrap();
            assert_eq!(r, Ratio(milli));
            assert_eq!(r.to_string(), text);
        }
        for bad in ["", "0", "0.05", "64.001", "1.2345", "-1", "1e3", ".5", "abc", "1.5x"] {
            assert_eq!(Ratio::parse(bad), None, "{bad:?}");
        }
        assert_eq!(Ratio(1500).scale(3), 4, "rounded down");
    }

    #[test]
    fn never_over_commits() {
        let s = state_with_nodes();
        let mut placed = 0;
        for i in 0..100 {
            if s.apply(&p(create(&format!("vm{i}"), 1, 256)), 3 + i).is_ok() {
                placed += 1;
            }
            s.check_invariants().unwrap();
        }
        // 8 vCPUs in total bound the count before memory (12 x 256 MiB) does.
        assert_eq!(placed, 8);
        let before = s.image();
        let e = s.apply(&p(create("big", 1, 256)), 200).unwrap_err();
        assert!(e.is_no_capacity(), "{e}");
        assert_eq!(s.image(), before, "a rejected create changed the state");
    }

    #[test]
    fn rejections_change_nothing() {
        let s = state_with_nodes();
        s.apply(&p(create("a", 1, 128)), 3).unwrap();
        let before = s.image();
        let cases = [
            create("a", 1, 128),                       // duplicate
            create("Bad", 1, 128),                     // invalid name
            create("z", 0, 128),                       // zero vcpus
            create("z", 1, u64::MAX),                  // absurd memory
            create("z", 1, 1_000_000),                 // fits nowhere
            Command::DeleteVm { name: "nope".into() }, // unknown vm
            Command::DecommissionNode { id: 9 },       // unknown node
            Command::RegisterNode {
                // shrink below use
                id: 2,
                addr: "127.0.0.1:7002".into(),
                resources: NodeResources::plain(Resources::new(4, 64, 100)),
                labels: BTreeMap::new(),
            },
            Command::Batch(vec![]), // empty batch
        ];
        for (i, c) in cases.into_iter().enumerate() {
            let r = s.apply(&p(c.clone()), 10 + i as u64);
            assert!(r.is_err(), "{c:?} was accepted");
            assert_eq!(s.image(), before, "{c:?} changed the state");
        }
        s.check_invariants().unwrap();
    }

    #[test]
    fn batch_is_all_or_nothing() {
        let s = state_with_nodes();
        s.apply(&p(create("keep", 1, 128)), 3).unwrap();
        let before = s.image();
        let batch = Command::Batch(vec![
            create("x", 1, 128),
            Command::DeleteVm { name: "keep".into() },
            Command::DecommissionNode { id: 1 },
            create("y", 1, 128),
            create("x", 1, 128), // duplicate of the first: fails the batch
        ]);
        let e = s.apply(&p(batch), 4).unwrap_err();
        assert!(matches!(e, CommandError::BatchFailed { index: 4, .. }), "{e}");
        assert!(matches!(e.root(), CommandError::VmExists { .. }));
        assert_eq!(s.image(), before);
        s.check_invariants().unwrap();

        let ok = Command::Batch(vec![create("x", 1, 128), create("y", 1, 128)]);
        let out = s.apply(&p(ok), 5).unwrap();
        assert!(matches!(out, CommandOutput::Batch(ref v) if v.len() == 2));
        assert_eq!(s.vm_count(), 3);
        s.check_invariants().unwrap();
    }

    #[test]
    fn delete_releases_and_decommission_marks_lost() {
        let s = state_with_nodes();
        s.apply(&p(create("a", 2, 512)), 3).unwrap();
        s.apply(&p(Command::DeleteVm { name: "a".into() }), 4).unwrap();
        assert_eq!(s.with_node(2, |n| n.allocated), Some(Resources::ZERO));
        s.apply(&p(create("b", 1, 128)), 5).unwrap();
        let out = s.apply(&p(Command::DecommissionNode { id: 2 }), 6).unwrap();
        assert_eq!(out, CommandOutput::NodeDecommissioned { id: 2, lost_vms: 1 });
        assert_eq!(s.with_vm("b", |v| v.observed), Some(ObservedState::Lost));
        // New VMs avoid the departed node.
        let out = s.apply(&p(create("c", 1, 128)), 7).unwrap();
        assert_eq!(out, CommandOutput::VmCreated { name: "c".into(), node_id: 1 });
        s.check_invariants().unwrap();
    }

    #[test]
    fn lifecycle_commands_and_reports() {
        use crate::command::VmReport;
        use crate::types::VmRuntime;
        let s = state_with_nodes();
        let out = s.apply(&p(create("a", 1, 128)), 3).unwrap();
        let node = match out {
            CommandOutput::VmCreated { node_id, .. } => node_id,
            o => panic!("{o:?}"),
        };
        s.apply(&p(Command::StopVm { name: "a".into() }), 4).unwrap();
        assert_eq!(s.with_vm("a", |v| v.desired), Some(DesiredState::Stopped));
        let out = s.apply(&p(Command::RestartVm { name: "a".into() }), 5).unwrap();
        assert_eq!(
            out,
            CommandOutput::VmDesired { name: "a".into(), desired: DesiredState::Running, generation: 1 }
        );
        let running = VmReport {
            name: "a".into(),
            observed: ObservedState::Running,
            runtime: VmRuntime { pid: Some(42), boot_ms: Some(1800), generation: 1, ..Default::default() },
        };
        let report = |node, r: &VmReport| p(Command::ReportVms { node, reports: vec![r.clone()] });
        assert_eq!(s.apply(&report(node, &running), 6).unwrap(), CommandOutput::VmsReported { applied: 1 });
        assert_eq!(
            s.with_vm("a", |v| (v.observed, v.runtime.pid, v.revision)),
            Some((ObservedState::Running, Some(42), 6))
        );
        // The same report again, and a report from a node that does not own
        // the VM, change nothing.
        let before = s.image();
        assert_eq!(s.apply(&report(node, &running), 7).unwrap(), CommandOutput::VmsReported { applied: 0 });
        let other = if node == 1 { 2 } else { 1 };
        assert_eq!(s.apply(&report(other, &running), 8).unwrap(), CommandOutput::VmsReported { applied: 0 });
        let ghost = VmReport { name: "ghost".into(), ..running.clone() };
        assert_eq!(s.apply(&report(node, &ghost), 9).unwrap(), CommandOutput::VmsReported { applied: 0 });
        assert_eq!(s.image(), before);
        assert!(matches!(
            s.apply(&p(Command::StartVm { name: "nope".into() }), 10),
            Err(CommandError::VmNotFound { .. })
        ));
        // Starting a failed VM that should run retries it (new generation).
        let failed = VmReport { observed: ObservedState::Failed, ..running.clone() };
        s.apply(&report(node, &failed), 20).unwrap();
        let out = s.apply(&p(Command::StartVm { name: "a".into() }), 21).unwrap();
        assert_eq!(
            out,
            CommandOutput::VmDesired { name: "a".into(), desired: DesiredState::Running, generation: 2 }
        );
        // Created stopped.
        let stopped = Command::CreateVm {
            name: "b".into(),
            spec: VmSpec { vcpus: 1, memory_mb: 128, disk_gb: 1, ..Default::default() },
            start: false,
        };
        s.apply(&p(stopped), 11).unwrap();
        assert_eq!(s.with_vm("b", |v| v.desired), Some(DesiredState::Stopped));
        // Lifecycle commands roll back inside a failed batch.
        let before = s.image();
        let batch = Command::Batch(vec![
            Command::StopVm { name: "a".into() },
            Command::StartVm { name: "zz".into() },
        ]);
        assert!(s.apply(&p(batch), 12).is_err());
        assert_eq!(s.image(), before);
        s.check_invariants().unwrap();
    }

    #[test]
    fn a_retried_request_applies_once() {
        let s = state_with_nodes();
        let id = RequestId { session: 7, seq: 1 };
        let first = Proposal { at_ms: 5, request: Some(id), command: create("a", 1, 128) };
        let out = s.apply(&first, 3).unwrap();
        let before = s.image();
        // The same request again (a retry after a lost reply): same answer, no change.
        assert_eq!(s.apply(&first, 4).unwrap(), out);
        assert_eq!(s.image(), before);
        // A different request for the same name is a real duplicate.
        let other = Proposal { request: Some(RequestId { session: 7, seq: 2 }), ..first.clone() };
        assert!(matches!(s.apply(&other, 5), Err(CommandError::VmExists { .. })));
        // The rejection changed no VM or node, only the window: the request
        // id now has its outcome, and keeps it even once the name is free.
        let after = s.image();
        assert_eq!((&after.nodes, &after.vms), (&before.nodes, &before.vms));
        assert_eq!(after.requests.len(), before.requests.len() + 1);
        let delete = Proposal { at_ms: 6, request: None, command: Command::DeleteVm { name: "a".into() } };
        s.apply(&delete, 6).unwrap();
        assert!(matches!(s.apply(&other, 7), Err(CommandError::VmExists { .. })), "first outcome kept");
        assert_eq!(s.vm_count(), 0, "the retried rejection did not apply after all");
        let before = s.image();
        // The window survives a snapshot round trip.
        let t = ClusterState::new();
        t.restore(s.image(), 0);
        assert_eq!(t.apply(&first, 8).unwrap(), out);
        assert_eq!(t.vm_count(), 0, "the window survived the snapshot: no second create");
        assert_eq!(t.image(), before);
        assert_eq!(t.digest(), s.digest());
        t.check_invariants().unwrap();
    }

    #[test]
    fn dedup_window_is_bounded() {
        let s = state_with_nodes();
        for i in 0..(DEDUP_WINDOW as u64 + 10) {
            let p = Proposal {
                at_ms: 1,
                request: Some(RequestId { session: 1, seq: i }),
                command: register(1, 4, 1024),
            };
            assert!(s.apply(&p, 3 + i).is_ok());
        }
        assert_eq!(s.image().requests.len(), DEDUP_WINDOW);
        assert_eq!(s.image().requests[0].0.seq, 10, "oldest ids are evicted first");
        s.check_invariants().unwrap();
    }

    #[test]
    fn streamed_image_encoding_is_the_images_encoding() {
        let s = state_with_nodes();
        s.apply(&p(Command::SetVmNetwork { cidr: Ipv4Net::DEFAULT_VM_CIDR }), 3).unwrap();
        let limits = QuotaLimits { vcpus: Some(8), ..Default::default() };
        s.apply(&p(Command::SetQuota { tenant: "t".into(), limits }), 4).unwrap();
        for i in 0..40u64 {
            // Successes and failures (too large), all under request ids;
            // results short enough for a dedup slot and longer ones.
            let vcpus = if i % 3 == 0 { 1000 } else { 1 };
            let name = if i % 4 == 0 {
                format!("a-long-vm-name-whose-result-needs-a-box-{i}")
            } else {
                format!("v{i}")
            };
            let q = Proposal {
                at_ms: 1,
                request: Some(RequestId { session: 7, seq: i }),
                command: create(&name, vcpus, 100),
            };
            let first = s.apply(&q, 5 + i);
            assert_eq!(s.apply(&q, 100 + i), first, "a retry is answered with the first result");
        }
        let img = s.image();
        assert!(img.requests.len() == 40 && img.requests.iter().any(|(_, r)| r.is_err()));
        let sizes: Vec<usize> =
            img.requests.iter().map(|(_, r)| crate::codec::encode(r).unwrap().len()).collect();
        assert!(
            sizes.iter().any(|n| *n <= crate::dedup::INLINE_RESULT)
                && sizes.iter().any(|n| *n > crate::dedup::INLINE_RESULT),
            "{sizes:?}"
        );
        let mut streamed = vec![0xAA];
        s.encode_image_into(&mut streamed).unwrap();
        assert_eq!(streamed[0], 0xAA, "appends");
        assert_eq!(streamed[1..], crate::codec::encode(&img).unwrap()[..]);
        let empty = ClusterState::new();
        let mut streamed = Vec::new();
        empty.encode_image_into(&mut streamed).unwrap();
        assert_eq!(streamed, crate::codec::encode(&empty.image()).unwrap());
    }

    #[test]
    fn image_round_trip_rebuilds_indices() {
        let s = state_with_nodes();
        for i in 0..5 {
            s.apply(&p(create(&format!("v{i}"), 1, 100)), 3 + i).unwrap();
        }
        let img = s.image();
        let t = ClusterState::new();
        t.restore(crate::codec::decode(&crate::codec::encode(&img).unwrap()).unwrap(), 0);
        assert_eq!(t.image(), img);
        assert_eq!(t.digest(), s.digest());
        t.check_invariants().unwrap();
        // The restored scheduler index decides like the original.
        let a = s.apply(&p(create("n", 1, 100)), 20).unwrap();
        let b = t.apply(&p(create("n", 1, 100)), 20).unwrap();
        assert_eq!(a, b);
    }

    /// The feed's revisions from `from` on, as "index: vm a, -vm b, node 1"
    /// (a leading `-` for a delete).
    fn feed_from(s: &ClusterState, from: u64) -> Vec<String> {
        let mut out = Vec::new();
        let mut next = from;
        loop {
            let since = s.feed().since(next).unwrap();
            if since.revisions.is_empty() {
                return out;
            }
            for r in &since.revisions {
                let changes: Vec<String> = r
                    .changes
                    .iter()
                    .map(|c| match c {
                        Change::Vm { record, deleted } => {
                            format!("{}vm {}", if *deleted { "-" } else { "" }, record.name)
                        }
                        Change::Node { record, deleted } => {
                            format!("{}node {}", if *deleted { "-" } else { "" }, record.id)
                        }
                    })
                    .collect();
                out.push(format!("{}: {}", r.index, changes.join(", ")));
            }
            next = since.next;
        }
    }

    #[test]
    fn applied_entries_become_revisions_of_what_changed() {
        let s = state_with_nodes();
        s.apply(&p(create("a", 1, 512)), 3).unwrap();
        let node_of_a = s.with_vm("a", |v| v.node_id).unwrap();
        s.apply(&p(Command::StopVm { name: "a".into() }), 4).unwrap();
        // A rejected command changes nothing and has no revision.
        s.apply(&p(create("a", 1, 512)), 5).unwrap_err();
        s.apply(&p(Command::DeleteVm { name: "a".into() }), 6).unwrap();
        assert_eq!(
            feed_from(&s, 1),
            [
                "1: node 1".to_string(),
                "2: node 2".to_string(),
                format!("3: vm a, node {node_of_a}"),
                "4: vm a".to_string(),
                format!("6: -vm a, node {node_of_a}"),
            ]
        );
        assert_eq!(s.feed().revision(), 6);
        // The event carries the record as it is after the change: the
        // table's own Arc.
        let since = s.feed().since(4).unwrap();
        let Change::Vm { record: rec, deleted: false } = &since.revisions[0].changes[0] else { panic!() };
        assert_eq!(rec.desired, DesiredState::Stopped);
        assert_eq!(rec.revision, 4);
        // Revision 6 is the last: watching from 7 waits.
        assert_eq!(s.feed().since(7).unwrap().next, 7);
        assert!(s.feed().since(7).unwrap().revisions.is_empty());
    }

    #[test]
    fn a_rolled_back_batch_emits_nothing_and_an_entry_is_one_revision() {
        let s = state_with_nodes();
        s.apply(&p(create("a", 1, 512)), 3).unwrap();
        let before = s.image();
        let batch = Command::Batch(vec![
            create("b", 1, 256),
            Command::StopVm { name: "a".into() },
            Command::DeleteVm { name: "nope".into() },
        ]);
        s.apply(&p(batch), 4).unwrap_err();
        assert_eq!(s.image(), before);
        assert_eq!(s.feed().revision(), 4);
        assert!(s.feed().since(4).unwrap().revisions.is_empty(), "{:?}", feed_from(&s, 4));
        // Several proposals of one entry (one Raft entry carries a batch of
        // proposals) and the entries of one run: one revision per entry,
        // published when the run ends.
        {
            let mut run = s.begin_apply();
            run.apply(&p(create("b", 1, 256)), 5).unwrap();
            run.apply(&p(Command::StopVm { name: "b".into() }), 5).unwrap();
            run.apply(&p(Command::StopVm { name: "a".into() }), 5).unwrap();
            run.advance(6);
            run.apply(&p(Command::StartVm { name: "a".into() }), 7).unwrap();
            assert_eq!(s.feed().revision(), 4, "nothing published before the run ends");
        }
        assert_eq!(s.feed().revision(), 7);
        let revs = feed_from(&s, 5);
        assert_eq!(revs.len(), 2, "{revs:?}");
        assert!(revs[0].starts_with("5: vm a, vm b, node "), "{revs:?}");
        assert_eq!(revs[1], "7: vm a");
        // A change undone within the same entry is no change.
        {
            let mut run = s.begin_apply();
            run.apply(&p(Command::StopVm { name: "a".into() }), 8).unwrap();
            run.apply(&p(Command::StartVm { name: "a".into() }), 8).unwrap();
        }
        let gen_moved = s.with_vm("a", |v| v.generation).unwrap();
        // (start after stop bumps the generation, so this one is a change)
        assert!(gen_moved > 0);
        assert_eq!(feed_from(&s, 8), ["8: vm a"]);
    }

    #[test]
    fn replicas_produce_the_same_revisions_and_restore_starts_over() {
        let log: Vec<Command> = vec![
            register(1, 4, 1024),
            register(2, 4, 2048),
            create("a", 1, 512),
            create("b", 2, 1024),
            Command::Batch(vec![create("c", 1, 256), Command::StopVm { name: "a".into() }]),
            Command::DeleteVm { name: "b".into() },
        ];
        let (x, y) = (ClusterState::new(), ClusterState::new());
        for (i, cmd) in log.iter().enumerate() {
            x.apply(&p(cmd.clone()), i as u64 + 1).unwrap();
            y.apply(&p(cmd.clone()), i as u64 + 1).unwrap();
        }
        let (rx, ry) = (x.feed().since(1).unwrap(), y.feed().since(1).unwrap());
        assert_eq!(rx.revisions.len(), log.len());
        assert_eq!(rx.revisions, ry.revisions);
        // Restored from a snapshot at 6: the history starts after it.
        let z = ClusterState::new();
        z.restore(x.image(), 6);
        assert_eq!(z.feed().revision(), 6);
        let e = z.feed().since(3).err().unwrap();
        assert_eq!((e.asked, e.oldest), (3, 7));
        assert!(z.feed().since(7).unwrap().revisions.is_empty());
        z.apply(&p(Command::DeleteVm { name: "c".into() }), 7).unwrap();
        x.apply(&p(Command::DeleteVm { name: "c".into() }), 7).unwrap();
        assert_eq!(feed_from(&z, 7), feed_from(&x, 7));
        // An existing history is dropped by a restore too.
        x.restore(z.image(), 7);
        assert_eq!(x.feed().oldest(), 8);
    }
}
