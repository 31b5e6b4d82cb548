//! A deterministic, in-memory backend for the madsim simulator.
//!
//! Nothing runs: a VM is a record with a launch time, and its state follows
//! from the (virtual) clock: `Starting` until `boot_delay` has passed, then
//! `Running`, then `Failed` if a crash was injected. No threads, no OS
//! processes, no randomness; the only clock is `tokio::time::Instant`, which
//! is madsim's virtual clock under `cfg(madsim)` (real tokio otherwise, so the
//! backend also works in plain tests).
//!
//! - [`SimWorld`] is shared by every simulated host. It knows which host runs
//!   which VM and records a violation whenever a VM starts on one host while
//!   it is `Starting` or `Running` on another ("no VM ever runs on two nodes
//!   at once").
//! - [`SimHost`] is one host's hypervisor. The harness creates it outside the
//!   node, so it outlives kills and restarts of the node process: guests keep
//!   running and the restarted node adopts them, as with real backends. Only
//!   an explicit [`SimHost::crash`] (or an injected fault) kills a guest.
//! - [`SimBackend`] is the node's cheap handle on its host.
//!
//! Fencing: [`SimHost`] keeps the node's lease; [`SimHost::run_guard`] (the
//! host's guard) stops every VM there once it lapsed.
//!
//! Faults ([`Faults`]) are read when a VM starts: per VM name, else the
//! host's default.
//!
//! Networking and disks are not simulated, but recorded: a VM's
//! [`VmConfig`] (with its `net` and `disk_gb`) is kept as given, readable
//! with [`SimHost::vm_config`].
//!
//! Console: [`VmBackend::console`] on a running VM returns an in-memory
//! stream (`tokio::io::duplex`) served by a task standing for the guest's
//! shell: it answers each line written to it with the same line prefixed
//! by the VM's name (`"<name>: <line>\n"`). One console per VM at a time
//! ([`VmError::Busy`]); it is released when the caller drops its end.
//!
//! Image directory: each host has a set of image names
//! ([`SimHost::add_image`]), standing for the files of its `--image-dir`
//! ([`SIM_IMAGE_DIR`]). A VM whose kernel or initrd is not an image name of
//! that set (or, as recorded by older versions, the absolute path of one
//! under [`SIM_IMAGE_DIR`]) fails to start with a [`VmError::Config`], as
//! with the qemu backend. Symlinks are not simulated.
use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt};
use tokio::time::Instant;

use crate::backend::{
    BackendKind, ConsoleIo, ExitInfo, LogChunk, RunState, VmBackend, VmConfig, VmError, VmStatus,
    READY_MARKER,
};
use crate::console::Leased;
use crate::image_dir::{is_image_name, IMAGE_NAME_RULE};

/// A simulated host (the node id, in practice).
pub type HostId = u64;

/// The failure reason of a crashed guest.
pub const CRASH_REASON: &str = "crashed (injected)";

/// Where a simulated host's image directory is, for absolute paths in VMs
/// recorded before image names.
pub const SIM_IMAGE_DIR: &str = "/sim/images";

/// Bytes buffered each way in a simulated console.
const CONSOLE_BUFFER: usize = 64 * 1024;

/// The console line of a run the host's guard stopped.
pub const FENCED_LINE: &str = "[sim] fenced: lease expired";

/// What goes wrong with a VM, read when it starts.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Faults {
    /// `start` fails with this reason (the VM is then `Failed` with it).
    pub boot_failure: Option<String>,
    /// A running VM dies ([`CRASH_REASON`]) this long after it became
    /// `Running`.
    pub crash_after: Option<Duration>,
    /// `Starting` → `Running` after this long.
    pub boot_delay: Duration,
}

impl Default for Faults {
    fn default() -> Self {
        Self { boot_failure: None, crash_after: None, boot_delay: Duration::from_millis(500) }
    }
}

/// When one host ran a VM: from `start` until `end` (exclusive), if known.
#[derive(Clone, Copy, Debug)]
struct Span {
    start: Instant,
    end: Option<Instant>,
}

impl Span {
    fn covers(&self, t: Instant) -> bool {
        self.start <= t && self.end.is_none_or(|e| t < e)
    }
}

/// What all simulated hosts share: who runs what, and every violation of
/// "one VM runs on at most one host".
#[derive(Default)]
pub struct SimWorld {
    inner: Mutex<WorldInner>,
}

#[derive(Default)]
struct WorldInner {
    /// VM → host → that host's latest run of it.
    runs: BTreeMap<String, BTreeMap<HostId, Span>>,
    violations: Vec<String>,
}

impl SimWorld {
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// The hosts on which `vm` is `Starting` or `Running` now (sorted).
    pub fn running_hosts(&self, vm: &str) -> Vec<HostId> {
        let now = Instant::now();
        let inner = self.inner.lock();
        inner
            .runs
            .get(vm)
            .map(|hosts| hosts.iter().filter(|(_, s)| s.covers(now)).map(|(h, _)| *h).collect())
            .unwrap_or_default()
    }

    /// Every VM that is `Starting` or `Running` somewhere, with its hosts.
    pub fn running(&self) -> BTreeMap<String, Vec<HostId>> {
        let now = Instant::now();
        let inner = self.inner.lock();
        inner
            .runs
            .iter()
            .filter_map(|(vm, hosts)| {
                let on: Vec<HostId> = hosts.iter().filter(|(_, s)| s.covers(now)).map(|(h, _)| *h).collect();
                (!on.is_empty()).then(|| (vm.clone(), on))
            })
            .collect()
    }

    /// Every time a VM started on a host while it ran on another, in order.
    pub fn violations(&self) -> Vec<String> {
        self.inner.lock().violations.clone()
    }

    /// `vm` starts on `host` (and, if `end` is known, stops running then).
    fn begin(&self, vm: &str, host: HostId, span: Span) {
        let mut inner = self.inner.lock();
        let WorldInner { runs, violations } = &mut *inner;
        let hosts = runs.entry(vm.to_string()).or_default();
        let others: Vec<HostId> =
            hosts.iter().filter(|(h, s)| **h != host && s.covers(span.start)).map(|(h, _)| *h).collect();
        if !others.is_empty() {
            let msg = format!("VM {vm:?} started on host {host} while running on host(s) {others:?}");
            tracing::error!("{msg}");
            violations.push(msg);
        }
        hosts.insert(host, span);
    }

    /// `vm` stopped running on `host` at `at`.
    fn end(&self, vm: &str, host: HostId, at: Instant) {
        let mut inner = self.inner.lock();
        if let Some(span) = inner.runs.get_mut(vm).and_then(|h| h.get_mut(&host)) {
            if span.end.is_none_or(|e| at < e) {
                span.end = Some(at);
            }
        }
    }
}

/// How a run ended.
#[derive(Clone, Debug)]
enum End {
    Stopped,
    Crashed,
    BootFailed(String),
}

/// One launch of a VM.
#[derive(Clone, Debug)]
struct Run {
    pid: u32,
    started: Instant,
    started_at_ms: u64,
    faults: Faults,
    /// An explicit end (stop, crash, boot failure), recorded only while the
    /// run had not ended on its own.
    end: Option<(Instant, End)>,
    /// The host's guard stopped it (lease expired).
    fenced: bool,
}

impl Run {
    fn ready_at(&self) -> Instant {
        self.started + self.faults.boot_delay
    }

    fn crash_at(&self) -> Option<Instant> {
        self.faults.crash_after.map(|c| self.ready_at() + c)
    }

    /// When and how the run ended, as of `now`.
    fn ended(&self, now: Instant) -> Option<(Instant, End)> {
        self.end.clone().or_else(|| self.crash_at().filter(|t| *t <= now).map(|t| (t, End::Crashed)))
    }

    fn live(&self, now: Instant) -> bool {
        self.ended(now).is_none()
    }

    /// True if the guest reached `Running` by `now` (before it ended).
    fn was_ready(&self, now: Instant) -> bool {
        let limit = match self.ended(now) {
            Some((_, End::BootFailed(_))) => return false,
            Some((t, _)) => t,
            None => now,
        };
        self.ready_at() <= limit
    }

    fn state(&self, now: Instant) -> RunState {
        match self.ended(now) {
            Some((_, End::Stopped)) => RunState::Stopped,
            Some((_, End::Crashed)) => RunState::Failed { reason: CRASH_REASON.to_string() },
            Some((_, End::BootFailed(reason))) => RunState::Failed { reason },
            None if self.ready_at() <= now => RunState::Running,
            None => RunState::Starting,
        }
    }

    fn exit(&self, now: Instant) -> Option<ExitInfo> {
        self.ended(now).map(|(_, e)| match e {
            End::Stopped => ExitInfo { code: Some(0), signal: None },
            End::Crashed => ExitInfo { code: None, signal: Some(libc::SIGKILL) },
            End::BootFailed(_) => ExitInfo { code: Some(1), signal: None },
        })
    }

    /// The run's console as of `now`. Only grows as time passes.
    fn console(&self, host: HostId, vm: &VmConfig, now: Instant) -> String {
        let mut out =
            format!("[sim] host {host}: {} booting ({} vCPU, {} MiB)\n", vm.name, vm.vcpus, vm.memory_mb);
        if self.was_ready(now) {
            out.push_str(READY_MARKER);
            out.push('\n');
        }
        if self.fenced {
            out.push_str(FENCED_LINE);
            out.push('\n');
        }
        match self.ended(now) {
            Some((_, End::Stopped)) => out.push_str("[sim] powered off\n"),
            Some((_, End::Crashed)) => out.push_str(&format!("[sim] {CRASH_REASON}\n")),
            Some((_, End::BootFailed(r))) => out.push_str(&format!("[sim] boot failed: {r}\n")),
            None => {}
        }
        out
    }
}

struct SimVm {
    config: VmConfig,
    /// Console output of earlier runs.
    history: Vec<u8>,
    run: Option<Run>,
}

#[derive(Default)]
struct HostInner {
    vms: BTreeMap<String, SimVm>,
    faults: BTreeMap<String, Faults>,
    default_faults: Faults,
    next_pid: u32,
    /// Fencing: live runs must end by then (see [`SimHost::enforce_lease`]).
    /// `None` until the first renewal: such a host is not fenced.
    lease: Option<Instant>,
    /// The image names in this host's image directory.
    images: BTreeSet<String>,
    /// VMs whose console is open (one at a time per VM).
    consoles: BTreeSet<String>,
    /// Listings asked for so far (one per reconciler pass).
    lists: u64,
}

/// One simulated host's hypervisor; outlives the node process running on it.
///
/// It also stands for the host's fence guard: [`SimHost::run_guard`], spawned
/// by the harness on a simulated machine that is never killed, stops every
/// VM here once the node let its lease lapse ([`VmBackend::renew_lease`]).
pub struct SimHost {
    world: Arc<SimWorld>,
    host: HostId,
    inner: Mutex<HostInner>,
}

impl SimHost {
    pub fn new(world: Arc<SimWorld>, host: HostId) -> Arc<SimHost> {
        Arc::new(SimHost {
            world,
            host,
            inner: Mutex::new(HostInner { next_pid: 1000, ..Default::default() }),
        })
    }

    /// The node's handle on this host.
    pub fn backend(self: &Arc<Self>) -> SimBackend {
        SimBackend { host: self.clone() }
    }

    pub fn host_id(&self) -> HostId {
        self.host
    }

    /// How many times the node listed this host's VMs (one listing per
    /// reconciler pass).
    pub fn lists(&self) -> u64 {
        self.inner.lock().lists
    }

    pub fn world(&self) -> &Arc<SimWorld> {
        &self.world
    }

    /// Faults for the next starts of `name` on this host.
    pub fn set_faults(&self, name: &str, faults: Faults) {
        self.inner.lock().faults.insert(name.to_string(), faults);
    }

    /// Back to the host's default faults for `name`.
    /// Removes `name`'s faults for its future runs. Its current run keeps
    /// the faults it started with (see [`SimHost::crash_pending`]).
    pub fn clear_faults(&self, name: &str) {
        self.inner.lock().faults.remove(name);
    }

    /// True if `name`'s current run is live and still due to crash from a
    /// `crash_after` fault it started with.
    pub fn crash_pending(&self, name: &str) -> bool {
        let now = Instant::now();
        let inner = self.inner.lock();
        inner
            .vms
            .get(name)
            .and_then(|v| v.run.as_ref())
            .is_some_and(|r| r.live(now) && r.crash_at().is_some())
    }

    /// Puts an image named `name` in this host's image directory (see the
    /// module documentation).
    pub fn add_image(&self, name: &str) {
        self.inner.lock().images.insert(name.to_string());
    }

    /// The configuration `name` was last prepared or started with (its
    /// `net` and `disk_gb` included), if this host knows the VM.
    pub fn vm_config(&self, name: &str) -> Option<VmConfig> {
        self.inner.lock().vms.get(name).map(|v| v.config.clone())
    }

    /// True while a console of `name` is open.
    pub fn console_attached(&self, name: &str) -> bool {
        self.inner.lock().consoles.contains(name)
    }

    /// Faults for every VM without faults of its own.
    pub fn set_default_faults(&self, faults: Faults) {
        self.inner.lock().default_faults = faults;
    }

    /// Kills `name` now if it is `Starting` or `Running` (it becomes
    /// `Failed` with [`CRASH_REASON`]). False if it was not running.
    pub fn crash(&self, name: &str) -> bool {
        let crashed = self.end_run(name, End::Crashed);
        tracing::info!(vm = name, host = self.host, crashed, "injected crash");
        crashed
    }

    /// The node's lease: live runs may go on until then. `None` if the node
    /// never renewed one.
    pub fn lease_deadline(&self) -> Option<Instant> {
        self.inner.lock().lease
    }

    fn renew_lease(&self, valid_for: Duration) -> Result<(), VmError> {
        let deadline = Instant::now()
            .checked_add(valid_for)
            .ok_or_else(|| VmError::Config(format!("lease of {valid_for:?} is too long")))?;
        self.inner.lock().lease = Some(deadline);
        Ok(())
    }

    /// What the host's guard does on each tick: if the lease expired, ends
    /// every live run here as a requested stop (the grace is not simulated)
    /// and returns their names. A host that never got a lease is left alone.
    pub fn enforce_lease(&self) -> Vec<String> {
        let now = Instant::now();
        let mut inner = self.inner.lock();
        if inner.lease.is_none_or(|deadline| now < deadline) {
            return Vec::new();
        }
        let mut fenced = Vec::new();
        for (name, vm) in inner.vms.iter_mut() {
            if let Some(run) = vm.run.as_mut().filter(|r| r.live(now)) {
                run.end = Some((now, End::Stopped));
                run.fenced = true;
                fenced.push(name.clone());
            }
        }
        drop(inner);
        for name in &fenced {
            self.world.end(name, self.host, now);
        }
        if !fenced.is_empty() {
            tracing::warn!(host = self.host, vms = ?fenced, "lease expired: VMs stopped");
        }
        fenced
    }

    /// The host's guard: [`SimHost::enforce_lease`] every `every`, forever.
    pub async fn run_guard(self: Arc<Self>, every: Duration) {
        loop {
            self.enforce_lease();
            tokio::time::sleep(every).await;
        }
    }

    /// Ends the current run of `name` if it is live. False if it was not.
    fn end_run(&self, name: &str, how: End) -> bool {
        let now = Instant::now();
        let mut inner = self.inner.lock();
        let Some(run) = inner.vms.get_mut(name).and_then(|v| v.run.as_mut()) else { return false };
        if !run.live(now) {
            return false;
        }
        run.end = Some((now, how));
        drop(inner);
        self.world.end(name, self.host, now);
        true
    }

    fn status_of(&self, vm: &SimVm, now: Instant) -> VmStatus {
        let mut status = VmStatus {
            name: vm.config.name.clone(),
            state: RunState::Stopped,
            pid: None,
            started_at_ms: None,
            boot_ms: None,
            exit: None,
        };
        if let Some(run) = &vm.run {
            status.state = run.state(now);
            status.pid = run.live(now).then_some(run.pid);
            status.started_at_ms = Some(run.started_at_ms);
            status.boot_ms = run.was_ready(now).then_some(run.faults.boot_delay.as_millis() as u64);
            status.exit = run.exit(now);
        }
        status
    }

    fn prepare(&self, vm: &VmConfig) -> Result<(), VmError> {
        validate(vm)?;
        let now = Instant::now();
        let mut inner = self.inner.lock();
        for (what, file) in [("kernel", &vm.boot.kernel), ("initrd", &vm.boot.initrd)] {
            if let Some(file) = file {
                check_image(&inner.images, what, file)?;
            }
        }
        match inner.vms.get_mut(&vm.name) {
            Some(existing) => {
                if !existing.run.as_ref().is_some_and(|r| r.live(now)) {
                    existing.config = vm.clone();
                }
            }
            None => {
                inner
                    .vms
                    .insert(vm.name.clone(), SimVm { config: vm.clone(), history: Vec::new(), run: None });
            }
        }
        Ok(())
    }

    fn start(&self, vm: &VmConfig) -> Result<VmStatus, VmError> {
        self.prepare(vm)?;
        let now = Instant::now();
        let mut inner = self.inner.lock();
        let faults = inner.faults.get(&vm.name).unwrap_or(&inner.default_faults).clone();
        let pid = inner.next_pid;
        inner.next_pid = inner.next_pid.wrapping_add(1);
        let host = self.host;
        let entry = inner.vms.get_mut(&vm.name).expect("prepared above");
        if let Some(run) = &entry.run {
            if run.live(now) {
                return Err(VmError::Failed(format!(
                    "VM {:?} is already running on host {host} (pid {})",
                    vm.name, run.pid
                )));
            }
            let old = run.console(host, &entry.config, now);
            entry.history.extend_from_slice(old.as_bytes());
        }
        entry.config = vm.clone();
        let mut run = Run { pid, started: now, started_at_ms: wall_ms(), faults, end: None, fenced: false };
        if let Some(reason) = run.faults.boot_failure.clone() {
            run.end = Some((now, End::BootFailed(reason.clone())));
            entry.run = Some(run);
            return Err(VmError::Failed(reason));
        }
        let span = Span { start: now, end: run.crash_at() };
        entry.run = Some(run);
        let status = self.status_of(entry, now);
        drop(inner);
        self.world.begin(&vm.name, host, span);
        Ok(status)
    }

    fn status(&self, name: &str) -> Option<VmStatus> {
        let now = Instant::now();
        let inner = self.inner.lock();
        inner.vms.get(name).map(|vm| self.status_of(vm, now))
    }

    fn list(&self) -> Vec<VmStatus> {
        let now = Instant::now();
        let mut inner = self.inner.lock();
        inner.lists += 1;
        inner.vms.values().map(|vm| self.status_of(vm, now)).collect()
    }

    fn logs(&self, name: &str, offset: u64, max: usize) -> Result<LogChunk, VmError> {
        let now = Instant::now();
        let inner = self.inner.lock();
        let vm = inner.vms.get(name).ok_or_else(|| VmError::NotFound(name.to_string()))?;
        let mut text = vm.history.clone();
        if let Some(run) = &vm.run {
            text.extend_from_slice(run.console(self.host, &vm.config, now).as_bytes());
        }
        let start = (offset.min(text.len() as u64)) as usize;
        let data = text[start..].iter().take(max).copied().collect::<Vec<u8>>();
        Ok(LogChunk { next_offset: offset + data.len() as u64, data })
    }

    fn delete(&self, name: &str) {
        self.end_run(name, End::Stopped);
        self.inner.lock().vms.remove(name);
    }
}

/// A node's handle on its [`SimHost`].
#[derive(Clone)]
pub struct SimBackend {
    host: Arc<SimHost>,
}

impl SimBackend {
    pub fn host(&self) -> &Arc<SimHost> {
        &self.host
    }
}

#[async_trait::async_trait]
impl VmBackend for SimBackend {
    fn kind(&self) -> BackendKind {
        BackendKind::Sim
    }

    fn describe(&self) -> String {
        "sim".to_string()
    }

    async fn prepare(&self, vm: &VmConfig) -> Result<(), VmError> {
        self.host.prepare(vm)
    }

    async fn start(&self, vm: &VmConfig) -> Result<VmStatus, VmError> {
        self.host.start(vm)
    }

    async fn stop(&self, name: &str, _grace: Duration) -> Result<(), VmError> {
        if self.host.status(name).is_none() {
            return Err(VmError::NotFound(name.to_string()));
        }
        self.host.end_run(name, End::Stopped);
        Ok(())
    }

    async fn delete(&self, name: &str) -> Result<(), VmError> {
        self.host.delete(name);
        Ok(())
    }

    async fn status(&self, name: &str) -> Result<Option<VmStatus>, VmError> {
        Ok(self.host.status(name))
    }

    async fn list(&self) -> Result<Vec<VmStatus>, VmError> {
        Ok(self.host.list())
    }

    async fn logs(&self, name: &str, offset: u64, max: usize) -> Result<LogChunk, VmError> {
        self.host.logs(name, offset, max)
    }

    /// The simulated guest's shell: see the module documentation.
    async fn console(&self, name: &str) -> Result<Box<dyn ConsoleIo>, VmError> {
        {
            let now = Instant::now();
            let mut inner = self.host.inner.lock();
            let vm = inner.vms.get(name).ok_or_else(|| VmError::NotFound(name.to_string()))?;
            if !vm.run.as_ref().is_some_and(|r| r.live(now)) {
                return Err(VmError::Failed(format!(
                    "VM {name:?} is not running on host {}: its console opens only while it runs",
                    self.host.host
                )));
            }
            if !inner.consoles.insert(name.to_string()) {
                return Err(VmError::Busy(format!("the console of VM {name:?} is already open")));
            }
        }
        let (ours, guest) = tokio::io::duplex(CONSOLE_BUFFER);
        let name = name.to_string();
        let host = self.host.clone();
        let owned = name.clone();
        // The slot is released when the caller drops the stream (also when
        // the task serving it was killed with its simulated node).
        let ours = Leased::new(ours, move || {
            host.inner.lock().consoles.remove(&owned);
        });
        tokio::spawn(async move {
            let (read, mut write) = tokio::io::split(guest);
            let mut lines = tokio::io::BufReader::new(read).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                if write.write_all(format!("{name}: {line}\n").as_bytes()).await.is_err() {
                    break;
                }
            }
        });
        Ok(Box::new(ours))
    }

    /// Only sets the deadline: the host's guard ([`SimHost::run_guard`])
    /// enforces it. Stops are immediate here, so `grace` plays no part.
    async fn renew_lease(&self, valid_for: Duration, _grace: Duration) -> Result<(), VmError> {
        self.host.renew_lease(valid_for)
    }
}

fn validate(vm: &VmConfig) -> Result<(), VmError> {
    if vm.name.is_empty() {
        return Err(VmError::Config("a VM needs a name".into()));
    }
    if vm.vcpus < 1 {
        return Err(VmError::Config(format!("VM {:?}: vcpus must be at least 1", vm.name)));
    }
    if vm.memory_mb < 1 {
        return Err(VmError::Config(format!("VM {:?}: memory_mb must be at least 1", vm.name)));
    }
    Ok(())
}

/// What [`crate::image_dir::ImageDir::resolve`] does, on the host's set of
/// image names instead of files.
fn check_image(images: &BTreeSet<String>, what: &str, file: &Path) -> Result<(), VmError> {
    let shown = file.display();
    let refused = |why: String| VmError::Config(format!("{what} \"{shown}\" is refused: {why}"));
    let name = if file.is_absolute() {
        match file.strip_prefix(SIM_IMAGE_DIR).ok().and_then(Path::to_str) {
            Some(name) => name,
            None => {
                return Err(refused(format!(
                    "it is outside this node's image directory {SIM_IMAGE_DIR}; it must be {IMAGE_NAME_RULE}"
                )))
            }
        }
    } else {
        file.to_str().unwrap_or("")
    };
    if !is_image_name(name) {
        return Err(refused(format!("it must be {IMAGE_NAME_RULE}")));
    }
    if !images.contains(name) {
        return Err(VmError::Config(format!(
            "{what} \"{shown}\" is not in this node's image directory {SIM_IMAGE_DIR}: copy the file there"
        )));
    }
    Ok(())
}

/// Wall-clock ms since the epoch: virtual under madsim, which overrides
/// `clock_gettime`.
fn wall_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}
