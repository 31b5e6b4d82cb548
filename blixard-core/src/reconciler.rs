//! The reconciler: makes the VMs the replicated state places on this node
//! real, and reports what they actually do back through Raft.
//!
//! Every tick it compares three things: what the state wants (desired state,
//! generation, spec), what the backend sees (running, stopped, failed), and
//! what it is itself doing (a start or stop in flight). It then starts,
//! stops, restarts (per the VM's restart policy, with exponential backoff)
//! or deletes, and proposes one `ReportVms` command with every VM whose
//! observed state changed. Actions run as tasks so a slow stop never holds up
//! the others; a VM with an action in flight is left alone until it ends.
//! After the node restarts, the backend still lists the guests that kept
//! running, so they are adopted, not started twice; local VMs the state no
//! longer places here are stopped and their files removed.
use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use blixard_vm::{BootSource, NetConfig, RunState, VmBackend, VmConfig, VmError, VmStatus};
use parking_lot::Mutex;
use tokio::time::Instant;
use tracing::Instrument;

use crate::command::{Command, VmReport};
use crate::metrics::Action;
use crate::node::{disks, ApiError, NodeShared};
use crate::state::ClusterState;
use crate::types::{DesiredState, Ipv4Net, NodeId, ObservedState, RestartPolicy, VmRecord, VmRuntime};
use crate::validate::{MAX_BATCH, MAX_REASON_LEN};

/// Longest a status report may take to commit before the tick gives up on
/// it (and proposes it again next time): longer than a proposal's own
/// deadline, so this only cuts attempts that would never end.
const REPORT_TIMEOUT: Duration = Duration::from_secs(15);

/// How often kept disks nobody needs any more are looked for.
const GC_EVERY: Duration = Duration::from_secs(5);

#[derive(Clone, Debug)]
pub struct ReconcilerConfig {
    /// How often desired and actual state are compared when nothing changes
    /// in the state (a change wakes the reconciler at once); bounds how long
    /// a crash or a guest becoming ready goes unnoticed.
    pub tick: Duration,
    /// The least time between the end of one pass and the start of the next
    /// one woken by a change. Under a stream of writes a node would
    /// otherwise run a pass (a listing of its VMs, off the async threads)
    /// for every applied entry that touches its VMs; changes that arrive
    /// meanwhile are handled together by the next pass. The first change
    /// after a quiet spell is handled at once.
    pub settle: Duration,
    /// How long a guest gets to power off before it is forced.
    pub stop_grace: Duration,
    /// First restart delay after a failure; doubles per failure.
    pub backoff_base: Duration,
    pub backoff_max: Duration,
    /// A VM running this long has its failure count (and backoff) reset.
    pub stable_after: Duration,
    /// Minimum time between two status report proposals from this node;
    /// changes seen meanwhile go out together in the next report.
    pub report_every: Duration,
    /// The node's VM bridge, when it gives its VMs a NIC (set by the node
    /// from `--vm-network`): each VM with an address gets a tap on it.
    pub bridge: Option<String>,
}

impl Default for ReconcilerConfig {
    fn default() -> Self {
        Self {
            tick: Duration::from_millis(250),
            settle: Duration::from_millis(10),
            stop_grace: blixard_vm::DEFAULT_STOP_GRACE,
            backoff_base: Duration::from_secs(1),
            backoff_max: Duration::from_secs(60),
            stable_after: Duration::from_secs(30),
            report_every: Duration::from_millis(200),
            bridge: None,
        }
    }
}

/// What the reconciler remembers about one VM between ticks.
#[derive(Default)]
struct Tracked {
    /// Restarts after failures (survives node restarts through the state).
    restarts: u32,
    /// Consecutive failures, for the backoff.
    failures: u32,
    next_attempt: Option<Instant>,
    /// The VM generation last acted on.
    generation: u64,
    /// The desired state last acted on: a change means "do it now", no
    /// restart policy involved.
    desired: Option<DesiredState>,
    /// Why the last start failed, if it did (kept until the next start).
    start_error: Option<String>,
    /// A start error that retrying cannot fix (bad configuration).
    permanent: bool,
    running_since: Option<Instant>,
    /// The start (its `started_at_ms`) whose boot time was last recorded in
    /// the metrics: each boot is recorded once.
    boot_recorded: Option<u64>,
    /// The last report proposed, to avoid proposing the same one again, and
    /// what the state said (observed, runtime) when it was proposed: if the
    /// state has changed since by some other write (a VM evicted and placed
    /// back here starts again as `pending`), the report is due again.
    reported: Option<(Observation, Observation)>,
}

/// A VM's observed state and runtime, as reported or as the state has them.
type Observation = (ObservedState, VmRuntime);

/// An action in flight for a VM.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Busy {
    Starting,
    Stopping,
    Deleting,
}

impl Busy {
    /// The name of the action's trace span.
    fn span_name(self) -> &'static str {
        match self {
            Busy::Starting => "reconcile.start",
            Busy::Stopping => "reconcile.stop",
            Busy::Deleting => "reconcile.delete",
        }
    }
}

pub struct Reconciler {
    node: Arc<NodeShared>,
    backend: Arc<dyn VmBackend>,
    cfg: ReconcilerConfig,
    tracked: HashMap<Arc<str>, Tracked>,
    busy: Arc<Mutex<HashMap<String, Busy>>>,
    /// Outcomes of finished starts, collected at the next tick.
    start_results: StartResults,
    last_report: Option<Instant>,
    /// The fencing lease epoch last seen: a new one means the lease lapsed
    /// (or was first gained) since, so every VM is looked at afresh.
    epoch: u64,
    /// What this node was to run at the last full tick, and when it ran.
    last_full: Option<(Vec<Want>, Instant)>,
    /// When kept disks were last collected.
    last_gc: Option<Instant>,
}

type StartResults = Arc<Mutex<Vec<(String, Result<(), VmError>)>>>;

/// Spawns the reconciler loop for `node`.
pub fn spawn(
    node: Arc<NodeShared>,
    backend: Arc<dyn VmBackend>,
    cfg: ReconcilerConfig,
) -> tokio::task::JoinHandle<()> {
    let mut r = Reconciler {
        node,
        backend,
        cfg,
        tracked: HashMap::new(),
        busy: Arc::new(Mutex::new(HashMap::new())),
        start_results: Arc::new(Mutex::new(Vec::new())),
        last_report: None,
        epoch: 0,
        last_full: None,
        last_gc: None,
    };
    tokio::spawn(async move {
        let node = r.node.clone();
        // Act only on a state that has caught up with the cluster: a node
        // that restarts replays its log, and an old entry may still place a
        // VM here that has since moved to another node (and runs there).
        while let Err(e) = node.linearize().await {
            tracing::debug!(error = %e, "reconciler waits until this node has caught up with the cluster");
            tokio::time::sleep(r.cfg.tick).await;
        }
        let mut by_change = false;
        loop {
            // Registered before the tick reads the state, so a change applied
            // while the tick runs still wakes the next one.
            let changed = node.state.changed().notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            r.tick(by_change).await;
            // A change soon after this pass waits out the settle time, so a
            // stream of changes costs one pass per settle, not one each.
            let settled = tokio::time::Instant::now() + r.cfg.settle;
            by_change = tokio::select! {
                _ = changed => true,
                _ = tokio::time::sleep(r.cfg.tick) => false,
            };
            if by_change {
                tokio::time::sleep_until(settled).await;
            }
        }
    })
}

/// Reports ("stopped") for the VMs evicted from node `me` that `gone` says
/// no longer run there: what lets the cluster place them elsewhere.
pub fn evicted_and_gone(
    state: &ClusterState,
    me: NodeId,
    mut gone: impl FnMut(&str) -> bool,
) -> Vec<VmReport> {
    let mut reports = Vec::new();
    state.for_each_vm_on(0, |vm| {
        if vm.leaving == me && gone(&vm.name) {
            reports.push(VmReport {
                name: vm.name.to_string(),
                observed: ObservedState::Stopped,
                runtime: Default::default(),
            });
        }
    });
    reports
}

/// A VM this node should run, as read from the state.
#[derive(Clone, PartialEq)]
struct Want {
    name: Arc<str>,
    config: VmConfig,
    desired: DesiredState,
    generation: u64,
    policy: RestartPolicy,
    observed: ObservedState,
    runtime: VmRuntime,
}

/// `net`: the node's bridge and subnet, when it gives its VMs a NIC.
fn want(vm: &VmRecord, net: Option<(&str, Ipv4Net)>) -> Want {
    let b = &vm.spec.boot;
    let path = |s: &str| (!s.is_empty()).then(|| s.into());
    let nic = match (net, vm.ip) {
        (Some((bridge, subnet)), Some(ip)) if subnet.contains(ip) => Some(NetConfig {
            bridge: bridge.to_string(),
            ip,
            prefix: subnet.prefix,
            gateway: subnet.gateway(),
        }),
        _ => None,
    };
    Want {
        name: vm.name.clone(),
        config: VmConfig {
            name: vm.name.to_string(),
            vcpus: vm.spec.vcpus,
            memory_mb: vm.spec.memory_mb,
            boot: BootSource {
                kernel: path(&b.kernel),
                initrd: path(&b.initrd),
                cmdline: (!b.cmdline.is_empty()).then(|| b.cmdline.clone()),
            },
            net: nic,
            disk_gb: vm.spec.disk_gb,
        },
        desired: vm.desired,
        generation: vm.generation,
        policy: vm.spec.restart,
        observed: vm.observed,
        runtime: vm.runtime.clone(),
    }
}

/// Before a VM's first start on this node after a migration or drain:
/// fetches its disk from the node it left (node/disks.rs), unless it is
/// here already.
async fn fetch_disk(node: &NodeShared, backend: &dyn VmBackend, name: &str) -> Result<(), VmError> {
    let Some(dest) = backend.data_disk(name) else { return Ok(()) };
    let plan =
        node.state.with_vm(name, |v| disks::fetch_from(v, node.id).map(|from| (from, v.placement_gen)));
    let Some(Some((from, gen))) = plan else { return Ok(()) };
    if dest.exists() {
        return Ok(());
    }
    let started = Instant::now();
    match disks::fetch(node, from, name, gen, &dest).await {
        Ok(bytes) => {
            tracing::info!(
                vm = name,
                from,
                bytes,
                took_ms = started.elapsed().as_millis() as u64,
                "copied the VM's disk from the node it left"
            );
            Ok(())
        }
        Err(e) => Err(VmError::Failed(format!("waiting for its disk from node {from}: {e}"))),
    }
}

/// Before deleting a VM's files here: if it moved off this node by
/// migration or drain, keeps its disk for the node it went to.
/// The file work runs off the async threads.
async fn keep_disk(node: &NodeShared, backend: &dyn VmBackend, name: &str) {
    let Some(disk) = backend.data_disk(name) else { return };
    let Some(Some(gen)) = node.state.with_vm(name, |v| disks::moved_off(v, node.id)) else { return };
    let (dir, vm) = (node.data_dir.clone(), name.to_string());
    let kept =
        crate::raft::blocking(move || disk.exists().then(|| disks::keep(&dir, &vm, gen, &disk)).transpose())
            .await
            .and_then(|r| r);
    match kept {
        Ok(None) => {}
        Ok(Some(at)) => {
            tracing::info!(vm = name, file = %at.display(), "kept the VM's disk for the node it moved to")
        }
        Err(e) => {
            tracing::warn!(vm = name, error = %e, "cannot keep the VM's disk for the node it moved to; it starts there with a fresh one")
        }
    }
}

/// Delay before restart attempt number `failures`: base, 2×base, 4×base, …
/// capped at the maximum.
fn backoff(cfg: &ReconcilerConfig, failures: u32) -> Duration {
    let factor = 1u32 << failures.saturating_sub(1).min(16);
    cfg.backoff_base.saturating_mul(factor).min(cfg.backoff_max)
}

fn cut(mut s: String) -> String {
    if s.len() > MAX_REASON_LEN {
        let mut at = MAX_REASON_LEN;
        while !s.is_char_boundary(at) {
            at -= 1;
        }
        s.truncate(at);
    }
    s
}

impl Reconciler {
    /// One pass: list what runs here and act on the differences. Woken by a
    /// state change (`by_change`) that left this node's VMs as they were,
    /// with no action of its own in flight, it skips the pass (the listing
    /// is a directory scan and a process check per VM), unless the last
    /// full pass is a tick old: under a constant stream of writes elsewhere
    /// the timers (backoff, reports, stability) still run every tick.
    async fn tick(&mut self, by_change: bool) {
        let me = self.node.id;
        // Disks kept for VMs that moved away, once their new node has them
        // (a directory read, off the async threads, every few seconds).
        if self.last_gc.is_none_or(|at| at.elapsed() >= GC_EVERY) {
            self.last_gc = Some(Instant::now());
            let node = self.node.clone();
            let _ = crate::raft::blocking(move || disks::collect_garbage(&node.data_dir, &node.state)).await;
        }
        // Fencing (see node/liveness.rs): without a valid lease this node
        // starts nothing, and once it lapsed it stops what runs (its guard
        // does too, even if this process is stopped). Checked before the
        // state is read: a valid lease means the state has caught up with
        // the read index that renewed it.
        let fence = &self.node.fence;
        if !fence.valid() {
            if fence.lapsed() {
                self.fence_stop().await;
            }
            return;
        }
        let epoch = fence.epoch();
        let epoch_changed = epoch != self.epoch;
        if epoch_changed {
            self.epoch = epoch;
            // VMs the guard stopped must start again if still placed here:
            // as if seen for the first time.
            for t in self.tracked.values_mut() {
                t.desired = None;
            }
        }
        let mut wants = Vec::new();
        let subnet = self.node.state.with_node(me, |n| n.vm_subnet).flatten();
        let net = self.cfg.bridge.as_deref().zip(subnet);
        self.node.state.for_each_vm_on(me, |vm| wants.push(want(vm, net)));
        let quiet = by_change
            && !epoch_changed
            && self.last_full.as_ref().is_some_and(|(w, at)| *w == wants && at.elapsed() < self.cfg.tick)
            && self.busy.lock().is_empty()
            && self.start_results.lock().is_empty();
        if quiet {
            return;
        }
        self.last_full = Some((wants.clone(), Instant::now()));
        // VMs busy before the listing count as busy for this whole tick: an
        // action that ends while we list would otherwise look "not started"
        // against a listing taken before it, and be started twice.
        let busy_before: HashSet<String> = self.busy.lock().keys().cloned().collect();
        let actual: HashMap<String, VmStatus> = match self.backend.list().await {
            Ok(list) => list.into_iter().map(|s| (s.name.clone(), s)).collect(),
            Err(e) => {
                tracing::warn!(error = %e, "VM backend cannot list its VMs; skipping this round");
                return;
            }
        };
        for (name, result) in std::mem::take(&mut *self.start_results.lock()) {
            if let Some(t) = self.tracked.get_mut(name.as_str()) {
                match result {
                    Ok(()) => {
                        t.start_error = None;
                        t.permanent = false;
                    }
                    Err(e) => {
                        t.permanent = matches!(e, VmError::Config(_) | VmError::Unavailable(_));
                        t.start_error = Some(cut(e.to_string()));
                        t.failures += 1;
                        t.next_attempt = Some(Instant::now() + backoff(&self.cfg, t.failures));
                    }
                }
            }
        }

        // Local VMs the state no longer places here: stop them, remove files.
        let wanted: HashSet<&str> = wants.iter().map(|w| &*w.name).collect();
        for name in actual.keys() {
            if !wanted.contains(name.as_str()) && !self.busy.lock().contains_key(name) {
                self.act(name.clone(), Busy::Deleting, None, "no longer placed here");
            }
        }
        self.tracked.retain(|name, _| wanted.contains(&**name));

        // Rate limit: within `report_every` of the last report, act but do
        // not report; what changed is reported by a later round.
        let may_report = self.last_report.is_none_or(|at| at.elapsed() >= self.cfg.report_every);
        let mut reports = Vec::new();
        for w in &wants {
            let local = actual.get(&*w.name);
            self.decide(w, local, busy_before.contains(&*w.name));
            let report = self.observe(w, local);
            let t = self.tracked.get_mut(&w.name).expect("tracked by decide");
            let current = (w.observed, w.runtime.clone());
            let new = (report.observed, report.runtime.clone());
            if t.reported.as_ref().is_some_and(|(_, seen)| *seen != current) {
                t.reported = None;
            }
            if may_report && new != current && t.reported.as_ref().map(|(sent, _)| sent) != Some(&new) {
                t.reported = Some((new, current));
                reports.push(report);
            } else if new == current {
                t.reported = None;
            }
        }
        // VMs evicted from this node (preempted) wait until it says they
        // no longer run here; "no longer placed here" above stops them.
        // Only what this tick saw is reported: a VM absent from the listing
        // that was not placed here when the tick began and had no action in
        // flight before the listing or now (an action that ends after the
        // listing could have started it).
        if may_report {
            let wanted: HashSet<&str> = wants.iter().map(|w| &*w.name).collect();
            reports.extend(evicted_and_gone(&self.node.state, me, |name| {
                !actual.contains_key(name)
                    && !wanted.contains(name)
                    && !busy_before.contains(name)
                    && !self.busy.lock().contains_key(name)
            }));
        }
        if !reports.is_empty() {
            self.last_report = Some(Instant::now());
        }
        for chunk in reports.chunks(MAX_BATCH) {
            let cmd = Command::ReportVms { node: me, reports: chunk.to_vec() };
            // Bounded: `propose` checks its own deadline only between
            // attempts, and an attempt can wait forever (a write accepted by
            // a node that restarted as a stale leader and whose entry was
            // then replaced by a snapshot is never answered). A reconciler
            // stuck here would never report or act again.
            let outcome =
                tokio::time::timeout(REPORT_TIMEOUT, self.node.propose(cmd)).await.unwrap_or_else(|_| {
                    Err(ApiError::Unavailable(format!("no answer within {REPORT_TIMEOUT:?}")))
                });
            match outcome {
                Ok(_) => {}
                Err(e) if e.is_transient() => {
                    // No leader right now: forget what was "sent" so the next
                    // tick proposes it again.
                    tracing::debug!(error = %e, "VM status report not committed; retrying next tick");
                    for r in chunk {
                        if let Some(t) = self.tracked.get_mut(r.name.as_str()) {
                            t.reported = None;
                        }
                    }
                }
                Err(e) => tracing::warn!(error = %e, "VM status report rejected"),
            }
        }
    }

    /// Chooses and launches the action for one VM, if any.
    fn decide(&mut self, w: &Want, local: Option<&VmStatus>, was_busy: bool) {
        let now = Instant::now();
        let t = self.tracked.entry(w.name.clone()).or_insert_with(|| Tracked {
            restarts: w.runtime.restarts,
            generation: w.runtime.generation,
            ..Default::default()
        });
        if was_busy || self.busy.lock().contains_key(&*w.name) {
            return;
        }
        let running = matches!(local.map(|s| &s.state), Some(RunState::Starting | RunState::Running));
        match local.map(|s| &s.state) {
            Some(RunState::Running) => {
                if let Some(s) = local.filter(|s| s.boot_ms.is_some() && s.started_at_ms != t.boot_recorded) {
                    t.boot_recorded = s.started_at_ms;
                    let boot_ms = s.boot_ms.unwrap_or(0);
                    self.node.metrics.boot_seconds.record(boot_ms as f64 / 1000.0);
                }
                let since = *t.running_since.get_or_insert(now);
                if now.duration_since(since) >= self.cfg.stable_after {
                    t.failures = 0;
                }
            }
            _ => t.running_since = None,
        }
        let desired_changed = t.desired != Some(w.desired);
        t.desired = Some(w.desired);
        if desired_changed && w.desired == DesiredState::Running {
            // An operator (re)started it: earlier failures and backoff no
            // longer apply.
            t.start_error = None;
            t.permanent = false;
            t.failures = 0;
            t.next_attempt = None;
        }
        match w.desired {
            DesiredState::Stopped => {
                if running {
                    self.act(w.name.to_string(), Busy::Stopping, None, "desired stopped");
                }
            }
            DesiredState::Running => {
                let restart_requested = w.generation > t.generation;
                if restart_requested {
                    // An operator restart: do it now, whatever the backoff.
                    t.generation = w.generation;
                    t.failures = 0;
                    t.next_attempt = None;
                    t.permanent = false;
                    t.start_error = None;
                    self.act(
                        w.name.to_string(),
                        Busy::Starting,
                        Some((w.config.clone(), running)),
                        "new generation",
                    );
                    return;
                }
                if running {
                    return;
                }
                // (Stopped → running by an operator bumps the generation in
                // the state, so it was handled as a restart above.)
                if desired_changed && local.is_none_or(|s| !matches!(s.state, RunState::Failed { .. })) {
                    // Newly wanted (created, started, or first seen after a
                    // node restart with nothing running): start it.
                    self.act(
                        w.name.to_string(),
                        Busy::Starting,
                        Some((w.config.clone(), false)),
                        "newly wanted",
                    );
                    return;
                }
                let failed = matches!(local.map(|s| &s.state), Some(RunState::Failed { .. }))
                    || t.start_error.is_some();
                let clean_exit = matches!(local.map(|s| &s.state), Some(RunState::Stopped));
                let never_started = local.is_none() && t.start_error.is_none();
                let restart = match w.policy {
                    _ if never_started => true,
                    _ if t.permanent => false,
                    RestartPolicy::Never => false,
                    RestartPolicy::OnFailure => failed,
                    RestartPolicy::Always => failed || clean_exit,
                };
                if !restart || t.next_attempt.is_some_and(|at| now < at) {
                    return;
                }
                if !never_started {
                    t.restarts += 1;
                    self.node.metrics.restarts.add(1);
                    if t.start_error.is_none() {
                        // A crash (not a failed start, which already counted).
                        t.failures += 1;
                    }
                    t.next_attempt = Some(now + backoff(&self.cfg, t.failures));
                }
                tracing::debug!(vm = %w.name, local = ?local.map(|s| &s.state), restarts = t.restarts, failures = t.failures, start_error = ?t.start_error, "restart decision");
                t.start_error = None;
                let why = if never_started { "not running" } else { "restart policy" };
                self.act(w.name.to_string(), Busy::Starting, Some((w.config.clone(), false)), why);
            }
        }
    }

    /// The lease lapsed: stops every VM running here, within the fence's
    /// grace (the guard forces them after it anyway).
    async fn fence_stop(&mut self) {
        let Ok(list) = self.backend.list().await else { return };
        let grace = self.node.fence.grace().min(self.cfg.stop_grace);
        for s in list {
            let live = matches!(s.state, RunState::Starting | RunState::Running);
            if live && !self.busy.lock().contains_key(&s.name) {
                tracing::warn!(vm = %s.name, "fenced: no confirmed contact with a quorum; stopping the VM");
                self.act_with_grace(s.name, Busy::Stopping, None, "fenced", grace);
            }
        }
    }

    /// Runs an action as its own task; the VM stays busy until it ends.
    /// `start` carries the config and whether to stop a running VM first.
    fn act(&self, name: String, kind: Busy, start: Option<(VmConfig, bool)>, why: &'static str) {
        self.act_with_grace(name, kind, start, why, self.cfg.stop_grace);
    }

    fn act_with_grace(
        &self,
        name: String,
        kind: Busy,
        start: Option<(VmConfig, bool)>,
        why: &'static str,
        grace: Duration,
    ) {
        if kind == Busy::Starting && !self.node.fence.valid() {
            tracing::info!(vm = %name, why, "not starting: the fencing lease is not valid");
            return;
        }
        tracing::info!(vm = %name, action = ?kind, why, "reconciling");
        self.busy.lock().insert(name.clone(), kind);
        let backend = self.backend.clone();
        let busy = self.busy.clone();
        let results = self.start_results.clone();
        let metrics = self.node.metrics.clone();
        let node = self.node.clone();
        // Its own trace: an action follows a state change, not a request.
        let span = tracing::debug_span!(
            parent: None,
            "reconcile",
            otel.name = kind.span_name(),
            vm = %name,
            why,
        );
        let action = async move {
            match (kind, start) {
                (Busy::Starting, Some((config, stop_first))) => {
                    if stop_first {
                        if let Err(e) = backend.stop(&name, grace).await {
                            tracing::warn!(vm = %name, error = %e, "stop before restart failed");
                        }
                    }
                    let r = match fetch_disk(&node, &*backend, &name).await {
                        Ok(()) => backend.start(&config).await.map(|_| ()),
                        Err(e) => Err(e),
                    };
                    if let Err(e) = &r {
                        tracing::warn!(vm = %name, error = %e, "VM failed to start");
                        // Leave nothing behind of a VM that could not start
                        // because of its configuration.
                        if matches!(e, VmError::Config(_) | VmError::Unavailable(_)) {
                            let _ = backend.delete(&name).await;
                        }
                    } else {
                        tracing::info!(vm = %name, "VM started");
                    }
                    metrics.action(Action::Start, r.is_ok());
                    results.lock().push((name.clone(), r));
                }
                (Busy::Stopping, _) => {
                    let r = backend.stop(&name, grace).await;
                    metrics.action(Action::Stop, r.is_ok());
                    match r {
                        Ok(()) => tracing::info!(vm = %name, "VM stopped"),
                        Err(e) => tracing::warn!(vm = %name, error = %e, "VM stop failed"),
                    }
                }
                (Busy::Deleting, _) => {
                    keep_disk(&node, &*backend, &name).await;
                    let r = backend.delete(&name).await;
                    metrics.action(Action::Delete, r.is_ok());
                    match r {
                        Ok(()) => tracing::info!(vm = %name, "VM deleted from this node"),
                        Err(e) => tracing::warn!(vm = %name, error = %e, "VM delete failed"),
                    }
                }
                (Busy::Starting, None) => {}
            }
            busy.lock().remove(&name);
        };
        tokio::spawn(action.instrument(span));
    }

    /// What to report for one VM.
    fn observe(&self, w: &Want, local: Option<&VmStatus>) -> VmReport {
        let t = &self.tracked[&w.name];
        let busy = self.busy.lock().get(&*w.name).copied();
        let mut runtime = VmRuntime { restarts: t.restarts, generation: t.generation, ..Default::default() };
        if let Some(s) = local {
            runtime.pid = s.pid;
            runtime.started_at_ms = s.started_at_ms;
            runtime.boot_ms = s.boot_ms;
        }
        let observed = match (busy, local.map(|s| &s.state)) {
            (Some(Busy::Stopping | Busy::Deleting), _) => ObservedState::Stopping,
            (Some(Busy::Starting), _) => ObservedState::Starting,
            (None, Some(RunState::Starting)) => ObservedState::Starting,
            (None, Some(RunState::Running)) => ObservedState::Running,
            (None, Some(RunState::Failed { reason })) => {
                runtime.reason = cut(reason.clone());
                ObservedState::Failed
            }
            (None, Some(RunState::Stopped)) if t.start_error.is_none() => ObservedState::Stopped,
            (None, _) => match (&t.start_error, w.desired) {
                (Some(e), _) => {
                    runtime.reason = e.clone();
                    ObservedState::Failed
                }
                (None, DesiredState::Stopped) => ObservedState::Stopped,
                (None, DesiredState::Running) => ObservedState::Pending,
            },
        };
        if !matches!(observed, ObservedState::Starting | ObservedState::Running | ObservedState::Stopping) {
            runtime.pid = None;
        }
        VmReport { name: w.name.to_string(), observed, runtime }
    }
}
