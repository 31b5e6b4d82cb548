//! A configured command stands in for a VM: for hosts without QEMU and quick
//! local use. Same lifecycle, logs and exit status as the qemu backend.
//!
//! Each VM gets a directory `<root>/<name>/` (see [`VmDirs`]) holding:
//!
//! - `console.log`: the workload's stdout and stderr (truncated on each start);
//! - `pid`: the workload's pid;
//! - `meta.json`: the [`VmConfig`] and the launch time, for adoption;
//! - `ready_at`: when the readiness marker was first seen (ms since the epoch),
//!   so the boot time survives a restart of the node process;
//! - `stopped`: written when a stop was requested, so the exit that follows
//!   counts as `Stopped` even if the workload died of the signal;
//! - `exit`: the exit status once this node reaped the workload;
//! - `console.in`: a FIFO, the workload's stdin. The launcher opens it
//!   read-write, so the workload never sees end-of-file while no console is
//!   attached; [`VmBackend::console`] writes into it.
//!
//! The workload runs in its VM directory, in a session of its own (so it
//! survives a restart of the node process and is adopted by the next one),
//! with `BLIXARD_VM_NAME`, `BLIXARD_VM_VCPUS`, `BLIXARD_VM_MEMORY_MB` and
//! `BLIXARD_VM_DIR` in its environment. Its `argv[0]` is
//! `blixard-vm:<vm dir>/<program name>`; that tag is how a pid read back from
//! the pidfile is recognised as ours after pid reuse. A workload that `exec`s
//! another program loses the tag and is then reported as gone: keep a shell
//! (or the program itself) as the top process. A `sh -c SCRIPT` command sees
//! the tag as `$0`.
//!
//! Signals go to the workload's whole process group: a stop sends `SIGTERM`,
//! waits up to the grace period, then sends `SIGKILL`.
//!
//! The fencing lease ([`VmBackend::renew_lease`]) lives in the root, next to
//! the VM directories, and is enforced by a guard process: see
//! [`crate::guard`] and [`ProcessBackend::with_guard`].
//!
//! Boot sources (kernel, initrd, kernel command line) are a qemu concept; this
//! backend ignores them with a warning (it opens no kernel or initrd, so it
//! has no image directory to guard: see [`crate::image_dir`]). A workload has
//! no NIC and no data disk either: `net` and `disk_gb` are ignored (noted
//! once per VM at debug level); whether to place such VMs here is the
//! node's decision.
//!
//! Console: [`VmBackend::console`] (while the workload runs, one at a time
//! per VM, [`VmError::Busy`] otherwise) returns a stream whose writes go to
//! `console.in` and whose reads follow `console.log` from its end at the
//! moment of opening (polled every 50 ms). The stream ends when the workload
//! does.
use std::collections::{HashMap, HashSet};
use std::fs;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use serde::{Deserialize, Serialize};

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::backend::{
    BackendKind, ConsoleIo, ExitInfo, LogChunk, RunState, VmBackend, VmConfig, VmError, VmStatus,
    READY_MARKER,
};
use crate::console::Leased;
use crate::guard::{Fence, GuardCommand};
use crate::host::{self, VmDirs};

/// How long `delete` lets a running workload stop gracefully.
const DELETE_GRACE: Duration = Duration::from_secs(2);
/// How long to wait for a workload to die after `SIGKILL`.
const KILL_WAIT: Duration = Duration::from_secs(5);
/// Polling interval while waiting for a workload to exit.
const POLL: Duration = Duration::from_millis(20);
/// Bytes of console output quoted in a failure reason.
const REASON_TAIL: usize = 512;
/// How often an open console looks for new output in `console.log`.
const CONSOLE_POLL: Duration = Duration::from_millis(50);
/// Bytes buffered towards the console's reader.
const CONSOLE_BUFFER: usize = 64 * 1024;

/// Runs a command per VM instead of a VMM. See the module documentation.
pub struct ProcessBackend {
    inner: Arc<Inner>,
    /// The fencing lease (see [`crate::guard`]).
    fence: Arc<Fence>,
}

struct Inner {
    dirs: VmDirs,
    command: Vec<String>,
    /// Workloads this process launched and has not reaped yet. Workloads
    /// adopted after a restart are not our children: init reaps them.
    children: Mutex<HashMap<String, Child>>,
    /// VMs with an open console.
    consoles: Mutex<HashSet<String>>,
    /// VMs whose ignored `net`/`disk_gb` were already noted.
    noted: Mutex<HashSet<String>>,
}

/// `meta.json`.
#[derive(Debug, Serialize, Deserialize)]
struct Meta {
    config: VmConfig,
    started_at_ms: Option<u64>,
}

impl ProcessBackend {
    /// VMs live under `root` (made absolute, since it is part of the tag that
    /// identifies a workload); `command` is the workload's argv.
    pub fn new(root: PathBuf, command: Vec<String>) -> Self {
        let root = std::path::absolute(&root).unwrap_or(root);
        Self {
            fence: Fence::new(root.clone(), None),
            inner: Arc::new(Inner {
                dirs: VmDirs::new(root),
                command,
                children: Mutex::new(HashMap::new()),
                consoles: Mutex::new(HashSet::new()),
                noted: Mutex::new(HashSet::new()),
            }),
        }
    }

    /// Enforce the fencing lease with a guard process started by `guard`
    /// (see [`crate::guard`]). Without one, the lease is only written.
    pub fn with_guard(mut self, guard: GuardCommand) -> Self {
        self.fence = Fence::new(self.inner.dirs.root().to_path_buf(), Some(guard));
        self
    }

    /// A `sh -c` script that prints the readiness marker, then idles until it
    /// is told to stop (exits 0 on `SIGTERM` or `SIGINT`).
    pub fn default_command() -> Vec<String> {
        vec![
            "/bin/sh".to_string(),
            "-c".to_string(),
            format!(
                "echo \"$BLIXARD_VM_NAME: $BLIXARD_VM_VCPUS vCPU, $BLIXARD_VM_MEMORY_MB MiB\"; \
                 echo {READY_MARKER}; trap 'exit 0' TERM INT; sleep 2147483647 & wait $!"
            ),
        ]
    }

    pub fn dirs(&self) -> &VmDirs {
        &self.inner.dirs
    }

    /// Runs `f` on the blocking pool (file system and /proc work).
    async fn blocking<T, F>(&self, f: F) -> Result<T, VmError>
    where
        T: Send + 'static,
        F: FnOnce(&Inner) -> Result<T, VmError> + Send + 'static,
    {
        let inner = self.inner.clone();
        tokio::task::spawn_blocking(move || f(&inner))
            .await
            .map_err(|e| VmError::Failed(format!("process backend task failed: {e}")))?
    }

    /// Waits until the workload `pid` of `name` is gone, at most `limit`.
    async fn wait_gone(&self, name: &str, pid: u32, limit: Duration) -> Result<bool, VmError> {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            let n = name.to_string();
            let alive = self.blocking(move |i| Ok(i.alive(&n, pid))).await?;
            if !alive {
                return Ok(true);
            }
            if tokio::time::Instant::now() >= deadline {
                return Ok(false);
            }
            tokio::time::sleep(POLL).await;
        }
    }
}

#[async_trait::async_trait]
impl VmBackend for ProcessBackend {
    fn kind(&self) -> BackendKind {
        BackendKind::Process
    }

    fn describe(&self) -> String {
        format!("process: {}", summary(&self.inner.command, 60))
    }

    async fn prepare(&self, vm: &VmConfig) -> Result<(), VmError> {
        let vm = vm.clone();
        self.blocking(move |i| i.prepare(&vm)).await
    }

    async fn start(&self, vm: &VmConfig) -> Result<VmStatus, VmError> {
        let vm = vm.clone();
        self.blocking(move |i| i.start(&vm)).await
    }

    async fn stop(&self, name: &str, grace: Duration) -> Result<(), VmError> {
        let n = name.to_string();
        let pid = self
            .blocking(move |i| {
                if !i.dirs.dir(&n).is_dir() {
                    return Err(VmError::NotFound(n));
                }
                i.reap(&n);
                let Some(pid) = i.running_pid(&n) else { return Ok(None) };
                // Mark first: whatever the exit looks like, it was asked for.
                write_file(&i.dirs.stopped_marker(&n), format!("{}\n", host::now_ms()))?;
                host::signal_group(pid, libc::SIGTERM);
                Ok(Some(pid))
            })
            .await?;
        let Some(pid) = pid else { return Ok(()) };
        if !self.wait_gone(name, pid, grace).await? {
            tracing::info!(vm = name, pid, "workload did not stop within {grace:?}; killing it");
            host::signal_group(pid, libc::SIGKILL);
            if !self.wait_gone(name, pid, KILL_WAIT).await? {
                return Err(VmError::Failed(format!(
                    "workload {pid} of {name} survived SIGKILL for {KILL_WAIT:?}"
                )));
            }
        }
        let n = name.to_string();
        self.blocking(move |i| {
            i.reap(&n);
            Ok(())
        })
        .await
    }

    async fn delete(&self, name: &str) -> Result<(), VmError> {
        let n = name.to_string();
        let exists = self
            .blocking(move |i| {
                i.reap(&n);
                Ok(i.dirs.dir(&n).is_dir())
            })
            .await?;
        if exists {
            match self.stop(name, DELETE_GRACE).await {
                Ok(()) | Err(VmError::NotFound(_)) => {}
                Err(e) => return Err(e),
            }
        }
        let n = name.to_string();
        self.blocking(move |i| {
            // A child we still hold (its directory vanished under us): make
            // sure nothing of it is left either.
            if let Some(mut child) = i.children.lock().remove(&n) {
                host::signal_group(child.id(), libc::SIGKILL);
                let _ = child.wait();
            }
            i.dirs.remove(&n)
        })
        .await
    }

    async fn status(&self, name: &str) -> Result<Option<VmStatus>, VmError> {
        let n = name.to_string();
        self.blocking(move |i| i.status(&n)).await
    }

    async fn list(&self) -> Result<Vec<VmStatus>, VmError> {
        self.blocking(|i| {
            let mut out = Vec::new();
            for name in i.dirs.names()? {
                if let Some(s) = i.status(&name)? {
                    out.push(s);
                }
            }
            Ok(out)
        })
        .await
    }

    async fn renew_lease(&self, valid_for: Duration, grace: Duration) -> Result<(), VmError> {
        self.fence.renew(valid_for, grace).await
    }

    async fn console(&self, name: &str) -> Result<Box<dyn ConsoleIo>, VmError> {
        let n = name.to_string();
        let (pid, offset) = self
            .blocking(move |i| {
                if !i.dirs.dir(&n).is_dir() {
                    return Err(VmError::NotFound(n));
                }
                i.reap(&n);
                let Some(pid) = i.running_pid(&n) else {
                    return Err(VmError::Failed(format!(
                        "VM {n:?} is not running: its console opens only while the workload runs"
                    )));
                };
                let offset = fs::metadata(i.dirs.console(&n)).map(|m| m.len()).unwrap_or(0);
                Ok((pid, offset))
            })
            .await?;
        let fifo = self.inner.dirs.console_in(name);
        // Read-write: never blocks on open, never fails for want of a reader.
        let sender = tokio::net::unix::pipe::OpenOptions::new()
            .read_write(true)
            .open_sender(&fifo)
            .map_err(VmError::io(format!("opening the console input {}", fifo.display())))?;
        if !self.inner.consoles.lock().insert(name.to_string()) {
            return Err(VmError::Busy(format!("the console of VM {name:?} is already open")));
        }
        let (ours, pump_end) = tokio::io::duplex(CONSOLE_BUFFER);
        let inner = self.inner.clone();
        let owned = name.to_string();
        tokio::spawn(async move {
            // Ends when the caller drops its end or the workload is gone.
            if let Err(e) = pump_console(&inner, &owned, pid, offset, sender, pump_end).await {
                tracing::debug!(vm = owned, "console closed: {e}");
            }
        });
        let inner = self.inner.clone();
        let owned = name.to_string();
        Ok(Box::new(Leased::new(ours, move || {
            inner.consoles.lock().remove(&owned);
        })))
    }

    async fn logs(&self, name: &str, offset: u64, max: usize) -> Result<LogChunk, VmError> {
        let n = name.to_string();
        self.blocking(move |i| {
            if !i.dirs.dir(&n).is_dir() {
                return Err(VmError::NotFound(n));
            }
            host::read_log(&i.dirs.console(&n), offset, max)
        })
        .await
    }
}

/// Moves bytes between an open console and the workload: what the caller
/// writes goes to the FIFO, what the workload prints (new bytes of
/// `console.log` from `offset`) goes to the caller. Ends when the caller
/// closes its end or the workload is gone (after forwarding its last output).
async fn pump_console(
    inner: &Inner,
    name: &str,
    pid: u32,
    mut offset: u64,
    mut fifo: tokio::net::unix::pipe::Sender,
    stream: tokio::io::DuplexStream,
) -> std::io::Result<()> {
    let (mut from_caller, mut to_caller) = tokio::io::split(stream);
    let log = inner.dirs.console(name);
    let mut tick = tokio::time::interval(CONSOLE_POLL);
    let mut buf = vec![0u8; 4096];
    loop {
        tokio::select! {
            n = from_caller.read(&mut buf) => {
                let n = n?;
                if n == 0 {
                    return Ok(());
                }
                fifo.write_all(&buf[..n]).await?;
            }
            _ = tick.tick() => {
                let alive = inner.alive(name, pid);
                loop {
                    let chunk = host::read_log(&log, offset, buf.len())
                        .map_err(|e| std::io::Error::other(e.to_string()))?;
                    if chunk.data.is_empty() {
                        break;
                    }
                    offset = chunk.next_offset;
                    to_caller.write_all(&chunk.data).await?;
                }
                if !alive {
                    return Ok(());
                }
            }
        }
    }
}

impl Inner {
    /// The tag in the workload's `argv[0]`. The trailing slash keeps `vm1`
    /// from matching `vm10`.
    fn tag(&self, name: &str) -> String {
        format!("blixard-vm:{}", self.dirs.needle(name))
    }

    /// True while the workload `pid` of `name` runs. Our own child is asked
    /// with `waitid` (a dying process loses its command line before it turns
    /// into a zombie, which would look like "gone, exit status unknown");
    /// an adopted one is recognised by the tag in its command line.
    fn alive(&self, name: &str, pid: u32) -> bool {
        if self.children.lock().get(name).is_some_and(|c| c.id() == pid) {
            return !exited_unreaped(pid);
        }
        host::pid_alive(pid, &self.tag(name))
    }

    /// The pid of the workload if it runs.
    fn running_pid(&self, name: &str) -> Option<u32> {
        let pid = host::read_pidfile(&self.dirs.pidfile(name))?;
        self.alive(name, pid).then_some(pid)
    }

    fn prepare(&self, vm: &VmConfig) -> Result<(), VmError> {
        validate(vm)?;
        if (vm.net.is_some() || vm.disk_gb > 0) && self.noted.lock().insert(vm.name.clone()) {
            tracing::debug!(
                vm = vm.name,
                net = ?vm.net,
                disk_gb = vm.disk_gb,
                "the process backend gives a workload no NIC and no data disk: ignoring them"
            );
        }
        let dir = self.dirs.dir(&vm.name);
        fs::create_dir_all(&dir).map_err(VmError::io(format!("creating {}", dir.display())))?;
        make_fifo(&self.dirs.console_in(&vm.name))?;
        let started_at_ms = self.read_meta(&vm.name).and_then(|m| m.started_at_ms);
        self.write_meta(&Meta { config: vm.clone(), started_at_ms })
    }

    fn start(&self, vm: &VmConfig) -> Result<VmStatus, VmError> {
        let name = vm.name.as_str();
        validate(vm)?;
        if self.command.is_empty() {
            return Err(VmError::Config("process backend: the workload command is empty".into()));
        }
        self.reap(name);
        if let Some(pid) = self.running_pid(name) {
            return Err(VmError::Failed(format!("VM {name:?} is already running (pid {pid})")));
        }
        self.prepare(vm)?;
        let dir = self.dirs.dir(name);
        for f in ["stopped", "ready_at", "exit", "pid"] {
            remove_file(&dir.join(f))?;
        }
        let console_path = self.dirs.console(name);
        let open_console = || -> std::io::Result<(fs::File, fs::File)> {
            fs::File::create(&console_path)?;
            // Append mode, one file description for stdout and stderr.
            let out = fs::OpenOptions::new().append(true).open(&console_path)?;
            let err = out.try_clone()?;
            Ok((out, err))
        };
        let (out, err) =
            open_console().map_err(VmError::io(format!("opening {}", console_path.display())))?;
        // Read-write, so the workload's reads block instead of hitting
        // end-of-file while no console writes to it.
        let fifo = self.dirs.console_in(name);
        let stdin = fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&fifo)
            .map_err(VmError::io(format!("opening the console input {}", fifo.display())))?;

        let program = &self.command[0];
        let base = Path::new(program).file_name().map(|s| s.to_string_lossy().into_owned());
        let mut cmd = Command::new(program);
        cmd.arg0(format!("{}{}", self.tag(name), base.unwrap_or_else(|| "workload".into())))
            .args(&self.command[1..])
            .current_dir(&dir)
            .env("BLIXARD_VM_NAME", name)
            .env("BLIXARD_VM_VCPUS", vm.vcpus.to_string())
            .env("BLIXARD_VM_MEMORY_MB", vm.memory_mb.to_string())
            .env("BLIXARD_VM_DIR", &dir)
            .stdin(stdin)
            .stdout(out)
            .stderr(err);
        host::new_session(&mut cmd);
        let started_at_ms = host::now_ms();
        let child = cmd
            .spawn()
            .map_err(|e| VmError::Failed(format!("cannot launch {}: {e}", summary(&self.command, 120))))?;
        let pid = child.id();
        self.children.lock().insert(name.to_string(), child);
        host::write_pidfile(&self.dirs.pidfile(name), pid)?;
        self.write_meta(&Meta { config: vm.clone(), started_at_ms: Some(started_at_ms) })?;
        tracing::info!(vm = name, pid, "workload launched");
        Ok(VmStatus {
            name: name.to_string(),
            state: RunState::Starting,
            pid: Some(pid),
            started_at_ms: Some(started_at_ms),
            boot_ms: None,
            exit: None,
        })
    }

    fn status(&self, name: &str) -> Result<Option<VmStatus>, VmError> {
        self.reap(name);
        let dir = self.dirs.dir(name);
        if !dir.is_dir() {
            return Ok(None);
        }
        let started_at_ms = self.read_meta(name).and_then(|m| m.started_at_ms);
        let ready_path = dir.join("ready_at");
        let mut ready_at: Option<u64> =
            fs::read_to_string(&ready_path).ok().and_then(|s| s.trim().parse().ok());
        let boot_ms = |ready_at: Option<u64>| match (ready_at, started_at_ms) {
            (Some(r), Some(s)) => Some(r.saturating_sub(s)),
            _ => None,
        };
        let mut status = VmStatus {
            name: name.to_string(),
            state: RunState::Stopped,
            pid: None,
            started_at_ms,
            boot_ms: boot_ms(ready_at),
            exit: None,
        };
        let Some(pid) = host::read_pidfile(&self.dirs.pidfile(name)) else {
            // Prepared, never started.
            return Ok(Some(status));
        };
        if self.alive(name, pid) {
            status.pid = Some(pid);
            if ready_at.is_none() && host::file_contains(&self.dirs.console(name), READY_MARKER) {
                let now = host::now_ms();
                write_file(&ready_path, format!("{now}\n"))?;
                ready_at = Some(now);
                status.boot_ms = boot_ms(ready_at);
            }
            status.state = if ready_at.is_some() { RunState::Running } else { RunState::Starting };
            return Ok(Some(status));
        }
        // Dead: if it was our child, it is a zombie by now (or was reaped
        // above); reap it so its exit status is on file.
        self.reap(name);
        let stopped = self.dirs.stopped_marker(name).exists();
        let exit: Option<ExitInfo> =
            fs::read(dir.join("exit")).ok().and_then(|b| serde_json::from_slice(&b).ok());
        status.state = match &exit {
            _ if stopped => RunState::Stopped,
            Some(ExitInfo { code: Some(0), .. }) => RunState::Stopped,
            Some(ExitInfo { signal: Some(sig), .. }) => {
                RunState::Failed { reason: format!("killed by signal {sig}") }
            }
            Some(ExitInfo { code: Some(code), .. }) => {
                let tail = host::tail(&self.dirs.console(name), REASON_TAIL);
                let reason = if tail.is_empty() {
                    format!("workload exited with code {code}")
                } else {
                    format!("workload exited with code {code}: {tail}")
                };
                RunState::Failed { reason }
            }
            _ => RunState::Failed {
                reason: format!("process {pid} is gone (exit status unknown: node restarted)"),
            },
        };
        status.exit = exit;
        Ok(Some(status))
    }

    /// Reaps our child for `name` if it exited, recording its exit status in
    /// the VM directory. Anything left in its process group is killed first,
    /// while the unreaped zombie still pins the group id (no pid reuse).
    fn reap(&self, name: &str) {
        let mut children = self.children.lock();
        let Some(child) = children.get_mut(name) else { return };
        let pid = child.id();
        if !exited_unreaped(pid) {
            return;
        }
        host::signal_group(pid, libc::SIGKILL);
        match child.try_wait() {
            Ok(Some(st)) => {
                let exit = ExitInfo { code: st.code(), signal: st.signal() };
                tracing::info!(vm = name, pid, ?exit, "workload exited");
                // The directory may be gone (deleted by another backend);
                // don't create it again.
                if self.dirs.dir(name).is_dir() {
                    let json = serde_json::to_vec(&exit).unwrap_or_default();
                    if let Err(e) = fs::write(self.dirs.dir(name).join("exit"), json) {
                        tracing::warn!(vm = name, "cannot record exit status: {e}");
                    }
                }
                children.remove(name);
            }
            Ok(None) => {}
            Err(e) => {
                tracing::warn!(vm = name, pid, "waiting for workload: {e}");
                children.remove(name);
            }
        }
    }

    fn read_meta(&self, name: &str) -> Option<Meta> {
        serde_json::from_slice(&fs::read(self.dirs.meta(name)).ok()?).ok()
    }

    fn write_meta(&self, meta: &Meta) -> Result<(), VmError> {
        let json = serde_json::to_vec_pretty(meta)
            .map_err(|e| VmError::Failed(format!("encoding meta.json: {e}")))?;
        write_file(&self.dirs.meta(&meta.config.name), json)
    }
}

fn validate(vm: &VmConfig) -> Result<(), VmError> {
    let n = vm.name.as_str();
    if n.is_empty() || n == "." || n == ".." || n.contains(['/', '\0']) {
        return Err(VmError::Config(format!("invalid VM name {n:?}: use a DNS label")));
    }
    if vm.vcpus < 1 {
        return Err(VmError::Config(format!("VM {n:?}: vcpus must be at least 1")));
    }
    if vm.memory_mb < 1 {
        return Err(VmError::Config(format!("VM {n:?}: memory_mb must be at least 1")));
    }
    if vm.boot.kernel.is_some() || vm.boot.initrd.is_some() || vm.boot.cmdline.is_some() {
        tracing::warn!(vm = n, "the process backend ignores the boot source (kernel, initrd, cmdline)");
    }
    Ok(())
}

/// True if our child `pid` has exited and is waiting to be reaped. Does not
/// reap it.
fn exited_unreaped(pid: u32) -> bool {
    // SAFETY: waitid with WNOWAIT only inspects our own child; `info` is a
    // zeroed plain C struct the kernel fills in.
    unsafe {
        let mut info: libc::siginfo_t = std::mem::zeroed();
        let r = libc::waitid(
            libc::P_PID,
            pid as libc::id_t,
            &mut info,
            libc::WEXITED | libc::WNOHANG | libc::WNOWAIT,
        );
        // Not our child any more (ECHILD) also means "gone": let try_wait say.
        r == -1 || info.si_pid() != 0
    }
}

/// Creates the FIFO at `path` unless one is there (anything else there is
/// replaced).
fn make_fifo(path: &Path) -> Result<(), VmError> {
    use std::os::unix::fs::FileTypeExt;
    match fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_fifo() => return Ok(()),
        Ok(_) => remove_file(path)?,
        Err(_) => {}
    }
    let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes())
        .map_err(|_| VmError::Config(format!("path {} contains a NUL byte", path.display())))?;
    // SAFETY: mkfifo(3) with a NUL-terminated path that lives across the call.
    if unsafe { libc::mkfifo(c.as_ptr(), 0o600) } != 0 {
        let e = std::io::Error::last_os_error();
        if e.kind() != std::io::ErrorKind::AlreadyExists {
            return Err(VmError::io(format!("creating the FIFO {}", path.display()))(e));
        }
    }
    Ok(())
}

fn write_file(path: &Path, data: impl AsRef<[u8]>) -> Result<(), VmError> {
    fs::write(path, data).map_err(VmError::io(format!("writing {}", path.display())))
}

fn remove_file(path: &Path) -> Result<(), VmError> {
    match fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            Err(VmError::io(format!("removing {}", path.display()))(e))
        }
        _ => Ok(()),
    }
}

/// The command as one line, cut to about `max` characters.
fn summary(command: &[String], max: usize) -> String {
    let line = command
        .iter()
        .map(|a| if a.contains(char::is_whitespace) { format!("'{a}'") } else { a.clone() })
        .collect::<Vec<_>>()
        .join(" ");
    if line.chars().count() <= max {
        line
    } else {
        format!("{}…", line.chars().take(max).collect::<String>())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn summary_cuts_long_commands() {
        assert_eq!(summary(&["sleep".into(), "1".into()], 60), "sleep 1");
        let s = summary(&ProcessBackend::default_command(), 20);
        assert_eq!(s.chars().count(), 21);
        assert!(s.starts_with("/bin/sh -c 'echo"));
    }
}
