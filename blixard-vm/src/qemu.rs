//! Real microVMs: one `qemu-system-x86_64 -M microvm` process per VM.
//!
//! Every VM lives in `<root>/<name>/` (see [`VmDirs`]): `meta.json` (config,
//! launch time and the tap of its last launch), `pid`, `console.log` (serial
//! console output), `console.sock` (the serial console, interactive),
//! `vmm.stderr`, `qmp.sock`, `disk.img` (its data disk, if it has one), and
//! small state files this backend writes:
//! - `ready_at`: ms timestamp when the readiness marker was first seen, so
//!   `boot_ms` survives a restart of the node process;
//! - `stopped`: the VM was stopped on request, so its end is not a failure;
//! - `exit.json`: the exit status of the last run, once known.
//!
//! A VM boots the default guest image, or a kernel (and initrd) named in the
//! node's image directory, resolved by [`ImageDir::resolve`] before every
//! boot: nothing outside that directory is ever handed to QEMU.
//!
//! **Network.** A VM with `net` gets a virtio-net NIC on a tap named by
//! [`NetConfig::tap`], created (and attached to the node's bridge) right
//! before launch with [`net::ensure_tap`]; the guest learns its address from
//! `blixard.ip=IP/PREFIX blixard.gw=GW` on its kernel command line. The tap
//! is recorded in `meta.json` before it is created, so `delete` removes it
//! even after a restart of the node; a stop keeps it.
//! [`QemuBackend::with_netns`] runs QEMU and the tap work inside a named
//! network namespace (tests use it so as not to change the host's network).
//!
//! **Disk.** A VM with `disk_gb > 0` gets `disk.img`, a sparse raw file of
//! exactly that many GiB, formatted ext4 (label `data`) when `prepare`
//! first creates it: built as `disk.img.tmp` and renamed, so a crash never
//! leaves an unformatted `disk.img`. It is attached as a virtio-blk device
//! (`/dev/vda`, kernel argument `blixard.disk=/dev/vda`, mounted on `/data`
//! by the default guest) and survives stops, restarts and node restarts
//! until `delete`. The host page cache is bypassed (`cache=none`) where the
//! file system supports O_DIRECT, else `cache=writeback`; both pass the
//! guest's flushes on to the host file (fdatasync), so what the guest synced
//! is on the host's disk. [`QemuBackend::disk_path`] names the file.
//!
//! **Console.** The serial port is a QEMU socket chardev on `console.sock`
//! that also logs everything to `console.log` (readiness detection and
//! `logs` read that file). [`VmBackend::console`] connects to the socket.
//! QEMU serves one client at a time: a second open is [`VmError::Busy`]
//! (checked with QMP `query-chardev`, and within this process by its own
//! record). While a console is open and not read, the guest's console
//! output stalls (QEMU waits for the socket): read what you open.
//! Unix socket paths are limited to 107 bytes: a VM root so deep that
//! `console.sock` (or `qmp.sock`) would be longer is refused by `prepare`.
//!
//! The fencing lease ([`VmBackend::renew_lease`]) lives in the root and is
//! enforced by a guard process: see [`crate::guard`] and
//! [`QemuBackend::with_guard`].
//!
//! QEMU runs in its own session (setsid), not as a daemon: it stays our child
//! while this process lives (so we get its real exit status) but survives a
//! restart of the node, after which a new `QemuBackend` adopts it from the
//! files and the pid (checked against the command line, see
//! [`host::pid_alive`]).
use std::collections::{HashMap, HashSet};
use std::fs;
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

use crate::backend::{
    BackendKind, ConsoleIo, ExitInfo, LogChunk, NetConfig, RunState, VmBackend, VmConfig, VmError, VmStatus,
    READY_MARKER,
};
use crate::console::Leased;
use crate::guard::{Fence, GuardCommand};
use crate::host::{self, VmDirs};
use crate::image;
use crate::image_dir::ImageDir;
use crate::net;

const QEMU: &str = "qemu-system-x86_64";

/// The Debian cloud kernel does not boot in less (STACK.md: 64 MiB fails).
pub const MIN_MEMORY_MB: u64 = 80;

/// How long `start` waits for QEMU to answer on QMP, the sign that it
/// accepted its arguments and runs the guest. Past it, `start` returns
/// Starting anyway (a very busy host) and `status` tells the rest.
const LAUNCH_TIMEOUT: Duration = Duration::from_secs(10);
/// How often `stop` presses the power button again during the grace time.
const POWERDOWN_REPEAT: Duration = Duration::from_secs(3);
/// After QMP `quit`, before SIGKILL.
const QUIT_TIMEOUT: Duration = Duration::from_secs(2);
/// One QMP exchange (connect, handshake, command).
const QMP_TIMEOUT: Duration = Duration::from_secs(2);
/// Grace `delete` gives a running guest before forcing it.
const DELETE_GRACE: Duration = Duration::from_secs(3);
const POLL: Duration = Duration::from_millis(25);

/// Longest unix socket path (sun_path is 108 bytes with the NUL).
const MAX_SOCKET_PATH: usize = 107;
/// Largest data disk (ext4 with 4 KiB blocks holds 16 TiB per file system).
pub const MAX_DISK_GB: u64 = 16 * 1024;
/// The chardev id of the serial console.
const CONSOLE_CHARDEV: &str = "con0";
/// How long `console` waits for a console closed just before to be
/// released by QEMU before it says Busy.
const CONSOLE_RELEASE_WAIT: Duration = Duration::from_millis(500);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Accel {
    Kvm,
    Tcg,
}

/// What `meta.json` holds.
#[derive(Serialize, Deserialize)]
struct Meta {
    config: VmConfig,
    started_at_ms: Option<u64>,
    /// The tap created for the last launch (removed by `delete`), written
    /// before the tap is created.
    #[serde(default)]
    tap: Option<String>,
}

pub struct QemuBackend {
    inner: Arc<Inner>,
    /// The fencing lease (see [`crate::guard`]).
    fence: Arc<Fence>,
}

struct Inner {
    dirs: VmDirs,
    image_cache: PathBuf,
    /// Where custom kernels and initrds are, by name.
    images: ImageDir,
    version: String,
    accel: Accel,
    /// Why this acceleration was chosen, for `describe`.
    accel_reason: String,
    /// Host TSC frequency, passed to TCG guests as `tsc_early_khz`.
    tsc_khz: Option<u64>,
    /// QEMU processes launched by this instance, by VM name: the only ones
    /// whose exit status we can collect (and must reap).
    children: Mutex<HashMap<String, Child>>,
    /// VMs whose console this instance has open.
    consoles: Mutex<HashSet<String>>,
    /// The network namespace taps and QEMU live in (tests); `None`: this
    /// process's own.
    netns: Option<String>,
}

impl QemuBackend {
    /// `root` holds the VM directories; `image_cache` the default guest
    /// image (see [`image::default_cache_dir`]); `image_dir` the kernels and
    /// initrds VMs may name (see [`crate::image_dir`]), created if missing.
    pub fn new(root: PathBuf, image_cache: PathBuf, image_dir: PathBuf) -> Result<Self, VmError> {
        // QEMU runs with the VM's directory as its working directory, so every
        // path handed to it (console, QMP socket, image) must be absolute.
        let root =
            std::path::absolute(&root).map_err(VmError::io(format!("resolving {}", root.display())))?;
        let image_cache = std::path::absolute(&image_cache)
            .map_err(VmError::io(format!("resolving {}", image_cache.display())))?;
        let image_dir = std::path::absolute(&image_dir)
            .map_err(VmError::io(format!("resolving {}", image_dir.display())))?;
        let out = Command::new(QEMU).arg("--version").output().map_err(|e| {
            VmError::Unavailable(format!("{QEMU} could not run ({e}): install the qemu-system-x86 package"))
        })?;
        if !out.status.success() {
            return Err(VmError::Unavailable(format!(
                "`{QEMU} --version` failed ({}): {}; reinstall the qemu-system-x86 package",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            )));
        }
        let text = String::from_utf8_lossy(&out.stdout);
        // "QEMU emulator version 7.2.22 (Debian 1:7.2+dfsg-7+deb12u18+b3)"
        let version = text
            .split_whitespace()
            .skip_while(|w| *w != "version")
            .nth(1)
            .unwrap_or("(unknown version)")
            .to_string();
        let cpuinfo = fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let (accel, accel_reason) = choose_accel(&cpuinfo);
        fs::create_dir_all(&root).map_err(VmError::io(format!("creating VM root {}", root.display())))?;
        fs::create_dir_all(&image_dir)
            .map_err(VmError::io(format!("creating the image directory {}", image_dir.display())))?;
        Ok(Self {
            fence: Fence::new(root.clone(), None),
            inner: Arc::new(Inner {
                dirs: VmDirs::new(root),
                image_cache,
                images: ImageDir::new(image_dir),
                version,
                accel,
                accel_reason,
                tsc_khz: tsc_khz(&cpuinfo),
                children: Mutex::new(HashMap::new()),
                consoles: Mutex::new(HashSet::new()),
                netns: None,
            }),
        })
    }

    /// Enforce the fencing lease with a guard process started by `guard`
    /// (see [`crate::guard`]). Without one, the lease is only written.
    pub fn with_guard(mut self, guard: GuardCommand) -> Self {
        self.fence = Fence::new(self.inner.dirs.root().to_path_buf(), Some(guard));
        self
    }

    /// Runs QEMU and creates and removes taps inside the network namespace
    /// `netns` (a name under /run/netns) instead of this process's own: for
    /// tests, which must not change the host's network. The VMs' bridge must
    /// exist in that namespace. Call before the first VM is started.
    pub fn with_netns(mut self, netns: impl Into<String>) -> Self {
        match Arc::get_mut(&mut self.inner) {
            Some(inner) => inner.netns = Some(netns.into()),
            None => unreachable!("with_netns is called on a new backend, before anything shares it"),
        }
        self
    }

    /// The data disk of `name` (`<root>/<name>/disk.img`), for copying it
    /// elsewhere (migrations). It exists once a VM with `disk_gb > 0` was
    /// prepared, until it is deleted; copy it only while the VM is stopped.
    pub fn disk_path(&self, name: &str) -> PathBuf {
        self.inner.dirs.disk(name)
    }

    /// "kvm" or "tcg".
    pub fn accel(&self) -> &str {
        match self.inner.accel {
            Accel::Kvm => "kvm",
            Accel::Tcg => "tcg",
        }
    }

    pub fn root(&self) -> &Path {
        self.inner.dirs.root()
    }

    /// The image directory custom kernels and initrds are named in.
    pub fn image_dir(&self) -> &Path {
        self.inner.images.path()
    }

    /// Runs blocking status/file work off the async threads.
    async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Inner) -> Result<T, VmError> + Send + 'static,
    ) -> Result<T, VmError> {
        let inner = self.inner.clone();
        tokio::task::spawn_blocking(move || f(&inner))
            .await
            .map_err(|e| VmError::Failed(format!("internal error: blocking task failed: {e}")))?
    }

    /// Validates `vm` and resolves its kernel and initrd (building the
    /// default image if needed). Creates nothing in the VM root.
    async fn resolve(&self, vm: &VmConfig) -> Result<Boot, VmError> {
        check_name(&vm.name)?;
        if vm.vcpus < 1 {
            return Err(VmError::Config(format!(
                "vcpus {} is invalid: a VM needs at least 1 vCPU",
                vm.vcpus
            )));
        }
        if vm.memory_mb < MIN_MEMORY_MB {
            return Err(VmError::Config(format!(
                "memory {} MiB is below the guest minimum of {MIN_MEMORY_MB} MiB",
                vm.memory_mb
            )));
        }
        for (what, socket) in [
            ("QMP", self.inner.dirs.qmp_socket(&vm.name)),
            ("console", self.inner.dirs.console_socket(&vm.name)),
        ] {
            if socket.as_os_str().len() > MAX_SOCKET_PATH {
                return Err(VmError::Config(format!(
                    "the {what} socket path {} is longer than {MAX_SOCKET_PATH} bytes: use a shorter VM root or name",
                    socket.display()
                )));
            }
        }
        if let Some(n) = &vm.net {
            check_net(n)?;
        }
        if vm.disk_gb > MAX_DISK_GB {
            return Err(VmError::Config(format!(
                "disk_gb {} is above the largest data disk, {MAX_DISK_GB} GiB",
                vm.disk_gb
            )));
        }
        // A custom kernel or initrd only from the image directory, by name
        // (or, for a VM recorded before names, by a path inside it): what
        // QEMU gets is the file's canonical path, checked just now.
        let boot = vm.boot.clone();
        let (kernel, initrd) = self
            .blocking(move |inner| {
                let resolve = |what: &str, p: &Option<PathBuf>| {
                    p.as_deref().map(|p| inner.images.resolve(what, p)).transpose()
                };
                Ok((resolve("kernel", &boot.kernel)?, resolve("initrd", &boot.initrd)?))
            })
            .await?;
        // A missing kernel means the default image; a kernel without an
        // initrd boots as given (its own initramfs or root= on the cmdline);
        // an initrd without a kernel goes with the default kernel.
        let (kernel, initrd, default_kernel) = match kernel {
            Some(k) => (k, initrd, false),
            None => {
                let cache = self.inner.image_cache.clone();
                let img = self.blocking(move |_| image::ensure_default_image(&cache)).await?;
                check_readable(&img.kernel, "kernel")?;
                let initrd = match initrd {
                    Some(i) => i,
                    None => {
                        check_readable(&img.initrd, "initrd")?;
                        img.initrd
                    }
                };
                (img.kernel, Some(initrd), true)
            }
        };
        Ok(Boot { kernel, initrd, default_kernel })
    }
}

/// What `resolve` found to boot.
struct Boot {
    kernel: PathBuf,
    initrd: Option<PathBuf>,
    /// The project's default kernel (not one the user chose).
    default_kernel: bool,
}

/// Hardware KVM only with vmx/svm in the CPU flags and a usable /dev/kvm:
/// some hosts expose a software /dev/kvm (kvm_pvm) on which stock guests hang.
fn choose_accel(cpuinfo: &str) -> (Accel, String) {
    let has_virt = cpuinfo
        .lines()
        .filter(|l| l.starts_with("flags"))
        .any(|l| l.split_whitespace().any(|f| f == "vmx" || f == "svm"));
    if !has_virt {
        return (Accel::Tcg, "TCG (no vmx/svm in /proc/cpuinfo)".into());
    }
    match fs::OpenOptions::new().read(true).write(true).open("/dev/kvm") {
        Ok(_) => (Accel::Kvm, "KVM".into()),
        Err(e) => (Accel::Tcg, format!("TCG (/dev/kvm not usable: {e})")),
    }
}

/// The host TSC frequency in kHz, from the first "cpu MHz" line. Under TCG
/// the guest TSC ticks at the host's rate; telling the guest kernel
/// (`tsc_early_khz`) skips its calibration, which hangs ~1 boot in 3 when
/// the emulated PIT is slow.
fn tsc_khz(cpuinfo: &str) -> Option<u64> {
    let mhz: f64 =
        cpuinfo.lines().find(|l| l.starts_with("cpu MHz"))?.split(':').nth(1)?.trim().parse().ok()?;
    (mhz > 0.0).then(|| (mhz * 1000.0).round() as u64)
}

/// VM names become directory names: only DNS labels, so no name can reach
/// outside the VM root ("..", "/").
fn check_name(name: &str) -> Result<(), VmError> {
    let ok = !name.is_empty()
        && name.len() <= 63
        && name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !name.starts_with('-')
        && !name.ends_with('-');
    if ok {
        Ok(())
    } else {
        Err(VmError::Config(format!(
            "VM name {name:?} is not a DNS label (1-63 of a-z, 0-9, '-', not starting or ending with '-')"
        )))
    }
}

fn check_net(n: &NetConfig) -> Result<(), VmError> {
    if n.prefix == 0 || n.prefix > 30 {
        return Err(VmError::Config(format!(
            "network prefix /{} is invalid for a VM subnet: use 1-30",
            n.prefix
        )));
    }
    if net::network((n.ip, n.prefix)) != net::network((n.gateway, n.prefix)) {
        return Err(VmError::Config(format!(
            "gateway {} is outside the VM's subnet {}/{}",
            n.gateway, n.ip, n.prefix
        )));
    }
    if n.ip == n.gateway {
        return Err(VmError::Config(format!("the VM's address {} is its gateway's", n.ip)));
    }
    if n.bridge.is_empty() || n.bridge.len() > 15 || n.bridge.contains(['/', ' ', ':']) {
        return Err(VmError::Config(format!("bridge name {:?} is not a valid interface name", n.bridge)));
    }
    Ok(())
}

/// A value inside a QEMU `-opt a=VALUE,b=...` list: commas are doubled.
fn qemu_value(p: &Path) -> String {
    p.display().to_string().replace(',', ",,")
}

/// Creates the data disk `path` (`gb` GiB, sparse, ext4 labelled `data`)
/// unless it exists. Built under a temporary name and renamed, so a crash
/// never leaves a `disk.img` that was not formatted.
fn ensure_disk(path: &Path, gb: u64) -> Result<(), VmError> {
    if path.is_file() {
        let len = fs::metadata(path).map(|m| m.len()).unwrap_or(0);
        if len != gb << 30 {
            tracing::warn!(
                disk = %path.display(),
                "the data disk has {len} bytes, not the {gb} GiB configured: it is used as it is"
            );
        }
        return Ok(());
    }
    let tmp = path.with_file_name("disk.img.tmp");
    let started = Instant::now();
    let built = (|| {
        let _ = fs::remove_file(&tmp);
        let f = fs::File::create(&tmp).map_err(VmError::io(format!("creating {}", tmp.display())))?;
        f.set_len(gb << 30).map_err(VmError::io(format!("sizing {} to {gb} GiB", tmp.display())))?;
        drop(f);
        let out = Command::new("mkfs.ext4")
            .args(["-F", "-q", "-E", "nodiscard", "-L", "data"])
            .arg(&tmp)
            .env("LC_ALL", "C")
            .output()
            .map_err(|e| match e.kind() {
                std::io::ErrorKind::NotFound => VmError::Unavailable(
                    "mkfs.ext4 not found: install the e2fsprogs package to give VMs data disks".into(),
                ),
                _ => VmError::io("running mkfs.ext4")(e),
            })?;
        if !out.status.success() {
            return Err(VmError::Failed(format!(
                "`mkfs.ext4 -F -q -E nodiscard -L data {}` failed ({}): {}",
                tmp.display(),
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            )));
        }
        // mkfs syncs the file; make the rename durable too.
        fs::rename(&tmp, path).map_err(VmError::io(format!("renaming {} to disk.img", tmp.display())))?;
        if let Some(dir) = path.parent() {
            let _ = fs::File::open(dir).and_then(|d| d.sync_all());
        }
        Ok(())
    })();
    if built.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    built?;
    tracing::info!(disk = %path.display(), gb, ms = started.elapsed().as_millis() as u64, "created the data disk");
    Ok(())
}

/// `cache=none` (O_DIRECT, no double caching in the host) where the file
/// system supports O_DIRECT, else `cache=writeback`. Both honour the
/// guest's flushes, so neither loses what the guest synced.
fn disk_cache_mode(path: &Path) -> &'static str {
    match fs::OpenOptions::new().read(true).custom_flags(libc::O_DIRECT).open(path) {
        Ok(_) => "none",
        Err(_) => "writeback",
    }
}

fn check_readable(path: &Path, what: &str) -> Result<(), VmError> {
    match fs::File::open(path) {
        Ok(f) if f.metadata().map(|m| m.is_file()).unwrap_or(false) => Ok(()),
        Ok(_) => Err(VmError::Config(format!("{what} {} is not a regular file", path.display()))),
        Err(e) => Err(VmError::Config(format!("{what} {} is not readable: {e}", path.display()))),
    }
}

fn read_meta(path: &Path) -> Option<Meta> {
    serde_json::from_slice(&fs::read(path).ok()?).ok()
}

fn write_json<T: Serialize>(path: &Path, value: &T) -> Result<(), VmError> {
    let bytes = serde_json::to_vec_pretty(value)
        .map_err(|e| VmError::Failed(format!("encoding {}: {e}", path.display())))?;
    fs::write(path, bytes).map_err(VmError::io(format!("writing {}", path.display())))
}

fn describe_exit(exit: &ExitInfo) -> String {
    match (exit.code, exit.signal) {
        (Some(c), _) => format!("qemu exited with code {c}"),
        (None, Some(9)) => "qemu was killed by signal 9 (SIGKILL)".into(),
        (None, Some(s)) => format!("qemu was killed by signal {s}"),
        (None, None) => "qemu ended with an unknown status".into(),
    }
}

fn with_stderr(msg: String, stderr_tail: &str) -> String {
    if stderr_tail.is_empty() {
        msg
    } else {
        format!("{msg}: {stderr_tail}")
    }
}

impl Inner {
    /// Runs `f` in the backend's network namespace (see
    /// [`QemuBackend::with_netns`]), or right here.
    fn in_net<T: Send>(&self, f: impl FnOnce() -> Result<T, VmError> + Send) -> Result<T, VmError> {
        match &self.netns {
            Some(ns) => net::in_netns(ns, f),
            None => f(),
        }
    }

    /// Removes the taps of `name`'s last launch and of its current config.
    fn remove_taps(&self, name: &str) -> Result<(), VmError> {
        let meta = read_meta(&self.dirs.meta(name));
        let mut taps: Vec<String> = Vec::new();
        if let Some(m) = &meta {
            taps.extend(m.tap.clone());
            taps.extend(m.config.net.as_ref().map(NetConfig::tap));
        }
        taps.dedup();
        if taps.is_empty() {
            return Ok(());
        }
        self.in_net(|| taps.iter().try_for_each(|t| net::remove_tap(t)))
    }

    fn exit_file(&self, name: &str) -> PathBuf {
        self.dirs.dir(name).join("exit.json")
    }
    fn stopped_file(&self, name: &str) -> PathBuf {
        self.dirs.stopped_marker(name)
    }
    fn ready_file(&self, name: &str) -> PathBuf {
        self.dirs.dir(name).join("ready_at")
    }

    /// Reaps our child for `name` if it has ended, persisting the exit
    /// status. Returns `Some(alive)` for our own children, `None` for VMs we
    /// did not launch (adopted after a restart).
    fn poll_child(&self, name: &str) -> Option<bool> {
        let mut children = self.children.lock();
        let child = children.get_mut(name)?;
        match child.try_wait() {
            Ok(None) => Some(true),
            Ok(Some(st)) => {
                let exit = ExitInfo { code: st.code(), signal: st.signal() };
                children.remove(name);
                drop(children);
                if let Err(e) = write_json(&self.exit_file(name), &exit) {
                    tracing::warn!(vm = name, "could not record the exit status: {e}");
                }
                Some(false)
            }
            Err(e) => {
                tracing::warn!(vm = name, "waiting for qemu failed: {e}");
                children.remove(name);
                Some(false)
            }
        }
    }

    /// True while the VMM process of `name` (pid from its pidfile) runs.
    fn is_running(&self, name: &str, pid: u32) -> bool {
        match self.poll_child(name) {
            Some(alive) => alive,
            None => host::pid_alive(pid, &self.dirs.needle(name)),
        }
    }

    fn ensure_not_running(&self, name: &str) -> Result<(), VmError> {
        match host::read_pidfile(&self.dirs.pidfile(name)) {
            Some(pid) if self.is_running(name, pid) => {
                Err(VmError::Failed(format!("VM {name} is already running (qemu pid {pid})")))
            }
            _ => Ok(()),
        }
    }

    fn status(&self, name: &str) -> Result<Option<VmStatus>, VmError> {
        let dir = self.dirs.dir(name);
        if check_name(name).is_err() || !dir.is_dir() {
            return Ok(None);
        }
        let started_at_ms = read_meta(&self.dirs.meta(name)).and_then(|m| m.started_at_ms);
        let mut st = VmStatus {
            name: name.to_string(),
            state: RunState::Stopped,
            pid: None,
            started_at_ms,
            boot_ms: None,
            exit: None,
        };
        // Prepared but never launched.
        let Some(pid) = host::read_pidfile(&self.dirs.pidfile(name)) else { return Ok(Some(st)) };
        let alive = self.is_running(name, pid);
        let mut ready_at: Option<u64> =
            fs::read_to_string(self.ready_file(name)).ok().and_then(|s| s.trim().parse().ok());
        if alive && ready_at.is_none() && host::file_contains(&self.dirs.console(name), READY_MARKER) {
            // The guest prints the marker last, so the console's mtime is
            // when it was written, closer than "now" (we poll).
            let now = host::now_ms();
            let mtime = fs::metadata(self.dirs.console(name))
                .and_then(|m| m.modified())
                .ok()
                .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
                .map(|d| d.as_millis() as u64)
                .unwrap_or(now);
            let at = mtime.min(now).max(started_at_ms.unwrap_or(0));
            fs::write(self.ready_file(name), at.to_string())
                .map_err(VmError::io(format!("writing {}", self.ready_file(name).display())))?;
            ready_at = Some(at);
        }
        st.boot_ms = match (ready_at, started_at_ms) {
            (Some(r), Some(s)) => Some(r.saturating_sub(s)),
            _ => None,
        };
        if alive {
            st.pid = Some(pid);
            st.state = if ready_at.is_some() { RunState::Running } else { RunState::Starting };
            return Ok(Some(st));
        }
        let exit: Option<ExitInfo> =
            fs::read(self.exit_file(name)).ok().and_then(|b| serde_json::from_slice(&b).ok());
        let stopped = self.stopped_file(name).exists();
        let stderr_tail = || host::tail(&self.dirs.stderr(name), 400);
        st.state = match (&exit, stopped) {
            (_, true) => RunState::Stopped,
            (Some(e), false) if e.code == Some(0) => match panic_line(&self.dirs.console(name)) {
                // QEMU runs with -no-reboot and the guest with panic=-1, so
                // a guest kernel panic ends QEMU with code 0, like a poweroff.
                Some(line) => RunState::Failed { reason: format!("guest kernel panicked: {line}") },
                None => RunState::Stopped,
            },
            (Some(e), false) => RunState::Failed { reason: with_stderr(describe_exit(e), &stderr_tail()) },
            (None, false) => RunState::Failed {
                reason: format!("VMM process {pid} is gone (exit status unknown: node restarted)"),
            },
        };
        st.exit = exit;
        Ok(Some(st))
    }

    /// Launches QEMU for `vm` and waits until it has opened its QMP socket
    /// (or died). Blocking: runs under spawn_blocking.
    fn launch(&self, vm: &VmConfig, boot: &Boot) -> Result<(u32, u64), VmError> {
        let name = vm.name.as_str();
        let dir = self.dirs.dir(name);
        self.ensure_not_running(name)?;
        // A fresh run: forget everything about the previous one (its marker
        // in the old console log must not make the new run look ready).
        for f in [
            self.dirs.pidfile(name),
            self.dirs.console(name),
            self.dirs.console_socket(name),
            self.dirs.stderr(name),
            self.dirs.qmp_socket(name),
            self.exit_file(name),
            self.stopped_file(name),
            self.ready_file(name),
        ] {
            match fs::remove_file(&f) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(VmError::io(format!("removing {}", f.display()))(e)),
            }
        }

        let mut append = String::from("console=ttyS0");
        if self.accel == Accel::Tcg {
            if let Some(khz) = self.tsc_khz {
                append.push_str(&format!(" tsc_early_khz={khz}"));
            }
        }
        // Reboot on panic at once; with -no-reboot that ends QEMU instead of
        // leaving a hung guest that looks "Starting" forever.
        append.push_str(" panic=-1");
        // Printing ~250 kernel lines through the emulated UART costs ~0.6 s
        // of a ~3 s TCG boot; warnings, errors and panics still show.
        // `loglevel=7` in the VM's cmdline (later arguments win) restores them.
        if boot.default_kernel {
            append.push_str(" quiet");
        }
        // Read by the default guest's init (see `image`); other guests
        // ignore unknown arguments.
        append.push_str(&format!(" blixard.hostname={name}"));
        if let Some(n) = &vm.net {
            append.push_str(&format!(" blixard.ip={}/{} blixard.gw={}", n.ip, n.prefix, n.gateway));
        }
        if vm.disk_gb > 0 {
            append.push_str(" blixard.disk=/dev/vda");
        }
        if let Some(extra) = vm.boot.cmdline.as_deref().filter(|s| !s.trim().is_empty()) {
            append.push(' ');
            append.push_str(extra.trim());
        }

        let mut cmd = Command::new(QEMU);
        cmd.args(["-M", "microvm,pit=on,pic=on,rtc=on"]);
        match self.accel {
            Accel::Kvm => cmd.args(["-accel", "kvm", "-cpu", "host"]),
            Accel::Tcg => cmd.args(["-accel", "tcg", "-cpu", "max"]),
        };
        cmd.args(["-m", &vm.memory_mb.to_string(), "-smp", &vm.vcpus.to_string()]);
        cmd.arg("-kernel").arg(&boot.kernel);
        if let Some(i) = &boot.initrd {
            cmd.arg("-initrd").arg(i);
        }
        cmd.args(["-append", &append]);
        cmd.args(["-nodefaults", "-no-user-config", "-nographic", "-no-reboot"]);
        // The serial console: a socket for interactive use, logged to
        // console.log whether or not a client is connected.
        cmd.arg("-chardev").arg(format!(
            "socket,id={CONSOLE_CHARDEV},path={},server=on,wait=off,logfile={},logappend=on",
            qemu_value(&self.dirs.console_socket(name)),
            qemu_value(&self.dirs.console(name)),
        ));
        cmd.arg("-serial").arg(format!("chardev:{CONSOLE_CHARDEV}"));
        cmd.arg("-qmp").arg(format!("unix:{},server=on,wait=off", qemu_value(&self.dirs.qmp_socket(name))));
        if let Some(n) = &vm.net {
            cmd.arg("-netdev").arg(format!("tap,id=n0,ifname={},script=no,downscript=no", n.tap()));
            cmd.arg("-device").arg(format!("virtio-net-device,netdev=n0,mac={}", n.mac()));
        }
        if vm.disk_gb > 0 {
            let disk = self.dirs.disk(name);
            if !disk.is_file() {
                return Err(VmError::Failed(format!(
                    "the data disk {} of VM {name} is missing (prepare creates it)",
                    disk.display()
                )));
            }
            cmd.arg("-drive").arg(format!(
                "id=d0,file={},format=raw,if=none,cache={},aio=threads",
                qemu_value(&disk),
                disk_cache_mode(&disk)
            ));
            cmd.args(["-device", "virtio-blk-device,drive=d0"]);
        }
        cmd.arg("-name").arg(format!("blixard-{name}"));

        let stderr_path = self.dirs.stderr(name);
        let stderr = fs::File::create(&stderr_path)
            .map_err(VmError::io(format!("creating {}", stderr_path.display())))?;
        let stdout =
            stderr.try_clone().map_err(VmError::io(format!("duplicating {}", stderr_path.display())))?;
        cmd.stdin(Stdio::null()).stdout(stdout).stderr(stderr).current_dir(&dir);
        // A new session keeps the guest alive when the node process (or its
        // terminal's process group) is killed: guests outlive node restarts.
        host::new_session(&mut cmd);

        // The tap: recorded first (so `delete` finds it whatever happens
        // next), then created; a tap of an earlier address goes.
        let tap = vm.net.as_ref().map(NetConfig::tap);
        let meta_path = self.dirs.meta(name);
        let old = read_meta(&meta_path);
        let old_started = old.as_ref().and_then(|m| m.started_at_ms);
        let old_tap = old.and_then(|m| m.tap).filter(|t| Some(t) != tap.as_ref());
        if tap.is_some() {
            write_json(
                &meta_path,
                &Meta { config: vm.clone(), started_at_ms: old_started, tap: tap.clone() },
            )?;
        }
        let net = vm.net.clone();
        let started_at_ms = host::now_ms();
        let spawned = self.in_net(|| {
            if let Some(old) = &old_tap {
                net::remove_tap(old)?;
            }
            if let Some(n) = &net {
                net::ensure_tap(&n.tap(), &n.bridge).map_err(|e| {
                    let why =
                        format!("VM {name}: cannot set up its tap {} on bridge {}: {e}", n.tap(), n.bridge);
                    match e {
                        VmError::Unavailable(_) => VmError::Unavailable(why),
                        VmError::Config(_) => VmError::Config(why),
                        _ => VmError::Failed(why),
                    }
                })?;
            }
            cmd.spawn().map_err(|e| match e.kind() {
                std::io::ErrorKind::NotFound => {
                    VmError::Unavailable(format!("{QEMU} not found: install the qemu-system-x86 package"))
                }
                _ => VmError::io(format!("launching {QEMU} for VM {name}"))(e),
            })
        });
        let child = spawned?;
        let pid = child.id();
        self.children.lock().insert(name.to_string(), child);
        let recorded = host::write_pidfile(&self.dirs.pidfile(name), pid).and_then(|_| {
            write_json(&meta_path, &Meta { config: vm.clone(), started_at_ms: Some(started_at_ms), tap })
        });
        if let Err(e) = recorded {
            // Without a pidfile nobody could find this VM again: don't leave
            // it running.
            self.kill_and_reap(name, pid);
            return Err(e);
        }
        Ok((pid, started_at_ms))
    }

    fn kill_and_reap(&self, name: &str, pid: u32) {
        if let Some(mut child) = self.children.lock().remove(name) {
            let _ = child.kill();
            let _ = child.wait();
        } else {
            host::signal(pid, libc::SIGKILL);
        }
    }
}

/// The "Kernel panic - not syncing: ..." line of a console log, if any.
fn panic_line(console: &Path) -> Option<String> {
    let tail = host::tail(console, 16 * 1024);
    tail.lines().find(|l| l.contains("Kernel panic")).map(|l| l.trim().to_string())
}

/// One QMP exchange: greeting, capabilities negotiation, `command`. Returns
/// the reply's "return" value. For `quit`, QEMU may close the socket before
/// answering; that counts as success.
async fn qmp(socket: &Path, command: &str) -> Result<serde_json::Value, String> {
    let exchange = async {
        let stream = tokio::net::UnixStream::connect(socket).await.map_err(|e| format!("connecting: {e}"))?;
        let (read, mut write) = stream.into_split();
        let mut lines = BufReader::new(read).lines();
        let greeting = lines.next_line().await.map_err(|e| format!("reading the greeting: {e}"))?;
        if !greeting.as_deref().is_some_and(|g| g.contains("\"QMP\"")) {
            return Err(format!("unexpected greeting {greeting:?}"));
        }
        let mut reply = serde_json::Value::Null;
        for (i, cmd) in ["qmp_capabilities", command].iter().enumerate() {
            let msg = format!("{{\"execute\":\"{cmd}\"}}\n");
            write.write_all(msg.as_bytes()).await.map_err(|e| format!("sending {cmd}: {e}"))?;
            // Skip asynchronous events until the command's answer.
            reply = loop {
                let line = match lines.next_line().await {
                    Ok(Some(l)) => l,
                    Ok(None) | Err(_) if *cmd == "quit" && i == 1 => break serde_json::Value::Null,
                    Ok(None) => return Err(format!("QEMU closed QMP before answering {cmd}")),
                    Err(e) => return Err(format!("reading the answer to {cmd}: {e}")),
                };
                let v: serde_json::Value =
                    serde_json::from_str(&line).map_err(|e| format!("bad QMP answer {line:?}: {e}"))?;
                if let Some(err) = v.get("error") {
                    return Err(format!("{cmd} failed: {err}"));
                }
                if let Some(ret) = v.get("return") {
                    break ret.clone();
                }
            };
        }
        Ok(reply)
    };
    tokio::time::timeout(QMP_TIMEOUT, exchange)
        .await
        .map_err(|_| format!("no answer within {QMP_TIMEOUT:?}"))?
        .map_err(|e| format!("QMP {command} on {}: {e}", socket.display()))
}

impl QemuBackend {
    /// `prepare`, returning the kernel and initrd to boot. Validation comes
    /// first, so a bad config leaves no directory behind.
    async fn prepare_resolved(&self, vm: &VmConfig) -> Result<Boot, VmError> {
        let boot = self.resolve(vm).await?;
        let vm = vm.clone();
        self.blocking(move |inner| {
            let dir = inner.dirs.dir(&vm.name);
            fs::create_dir_all(&dir).map_err(VmError::io(format!("creating {}", dir.display())))?;
            // Keep the launch time and tap of an existing run; record the
            // config so `list` sees the VM before its first start.
            let old = read_meta(&inner.dirs.meta(&vm.name));
            let started_at_ms = old.as_ref().and_then(|m| m.started_at_ms);
            let tap = old.and_then(|m| m.tap);
            let gb = vm.disk_gb;
            let name = vm.name.clone();
            write_json(&inner.dirs.meta(&name), &Meta { config: vm, started_at_ms, tap })?;
            if gb > 0 {
                ensure_disk(&inner.dirs.disk(&name), gb)?;
            }
            Ok(())
        })
        .await?;
        Ok(boot)
    }

    /// Polls until the VMM of `name` is gone or `within` has passed.
    async fn wait_exit(&self, name: &str, pid: u32, within: Duration) -> bool {
        let deadline = Instant::now() + within;
        loop {
            if !self.inner.is_running(name, pid) {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(POLL).await;
        }
    }
}

#[async_trait::async_trait]
impl VmBackend for QemuBackend {
    fn kind(&self) -> BackendKind {
        BackendKind::Qemu
    }

    fn describe(&self) -> String {
        format!("qemu {}, {}", self.inner.version, self.inner.accel_reason)
    }

    async fn prepare(&self, vm: &VmConfig) -> Result<(), VmError> {
        self.prepare_resolved(vm).await.map(|_| ())
    }

    async fn start(&self, vm: &VmConfig) -> Result<VmStatus, VmError> {
        // Before `prepare`, so a rejected start does not rewrite the running
        // VM's meta.json (`launch` checks again, right before spawning).
        check_name(&vm.name)?;
        let name = vm.name.clone();
        self.blocking(move |inner| inner.ensure_not_running(&name)).await?;
        let boot = self.prepare_resolved(vm).await?;
        let name = vm.name.clone();
        let vm2 = vm.clone();
        let (pid, started_at_ms) = self.blocking(move |inner| inner.launch(&vm2, &boot)).await?;

        // QEMU creates the QMP socket early, before it builds the machine
        // (where e.g. a memory allocation can still fail), but only answers
        // on it from its main loop: a QMP answer means the guest runs.
        let socket = self.inner.dirs.qmp_socket(&name);
        let deadline = Instant::now() + LAUNCH_TIMEOUT;
        while self.inner.is_running(&name, pid) && Instant::now() < deadline {
            if socket.exists() && qmp(&socket, "query-status").await.is_ok() {
                break;
            }
            tokio::time::sleep(POLL).await;
        }
        if !self.inner.is_running(&name, pid) {
            let status = self.status(&name).await?;
            let exit = status.as_ref().and_then(|s| s.exit.clone());
            let what = exit.as_ref().map(describe_exit).unwrap_or_else(|| "qemu exited".into());
            let tail = host::tail(&self.inner.dirs.stderr(&name), 1000);
            return Err(VmError::Failed(with_stderr(format!("{what} right after launch"), &tail)));
        }
        Ok(VmStatus {
            name,
            state: RunState::Starting,
            pid: Some(pid),
            started_at_ms: Some(started_at_ms),
            boot_ms: None,
            exit: None,
        })
    }

    async fn stop(&self, name: &str, grace: Duration) -> Result<(), VmError> {
        check_name(name)?;
        let inner = &self.inner;
        if !inner.dirs.dir(name).is_dir() {
            return Err(VmError::NotFound(name.to_string()));
        }
        let Some(pid) = host::read_pidfile(&inner.dirs.pidfile(name)) else { return Ok(()) };
        if !inner.is_running(name, pid) {
            return Ok(());
        }
        // First, so whatever ends the process below reads as "stopped on
        // request", not as a failure.
        let marker = inner.stopped_file(name);
        fs::write(&marker, host::now_ms().to_string())
            .map_err(VmError::io(format!("writing {}", marker.display())))?;

        let socket = inner.dirs.qmp_socket(name);
        // Press the power button, again every POWERDOWN_REPEAT: a guest
        // still booting (or not yet listening) loses a press, and a second
        // press to a guest already shutting down is harmless.
        let deadline = Instant::now() + grace;
        loop {
            if let Err(e) = qmp(&socket, "system_powerdown").await {
                tracing::warn!(vm = name, "graceful stop impossible: {e}");
                break;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if self.wait_exit(name, pid, left.min(POWERDOWN_REPEAT)).await {
                return Ok(());
            }
            if Instant::now() >= deadline {
                tracing::info!(vm = name, "guest did not power off within {grace:?}: forcing it");
                break;
            }
        }
        if let Err(e) = qmp(&socket, "quit").await {
            tracing::warn!(vm = name, "{e}");
        }
        if self.wait_exit(name, pid, QUIT_TIMEOUT).await {
            return Ok(());
        }
        host::signal(pid, libc::SIGKILL);
        if self.wait_exit(name, pid, QUIT_TIMEOUT).await {
            return Ok(());
        }
        Err(VmError::Failed(format!("qemu pid {pid} of VM {name} survived SIGKILL")))
    }

    async fn delete(&self, name: &str) -> Result<(), VmError> {
        check_name(name)?;
        if !self.inner.dirs.dir(name).is_dir() {
            return Ok(());
        }
        self.stop(name, DELETE_GRACE).await?;
        let name = name.to_string();
        self.blocking(move |inner| {
            // Reap (a stopped child is already gone from the map; this only
            // drops a stale entry) and remove every file.
            inner.poll_child(&name);
            inner.children.lock().remove(&name);
            inner.remove_taps(&name)?;
            inner.dirs.remove(&name)
        })
        .await
    }

    async fn status(&self, name: &str) -> Result<Option<VmStatus>, VmError> {
        let name = name.to_string();
        self.blocking(move |inner| inner.status(&name)).await
    }

    async fn list(&self) -> Result<Vec<VmStatus>, VmError> {
        self.blocking(|inner| {
            let mut out = Vec::new();
            for name in inner.dirs.names()? {
                if let Some(s) = inner.status(&name)? {
                    out.push(s);
                }
            }
            Ok(out)
        })
        .await
    }

    fn data_disk(&self, name: &str) -> Option<PathBuf> {
        Some(self.disk_path(name))
    }

    async fn renew_lease(&self, valid_for: Duration, grace: Duration) -> Result<(), VmError> {
        self.fence.renew(valid_for, grace).await
    }

    async fn console(&self, name: &str) -> Result<Box<dyn ConsoleIo>, VmError> {
        check_name(name)?;
        let n = name.to_string();
        self.blocking(move |inner| {
            if !inner.dirs.dir(&n).is_dir() {
                return Err(VmError::NotFound(n));
            }
            match host::read_pidfile(&inner.dirs.pidfile(&n)) {
                Some(pid) if inner.is_running(&n, pid) => {}
                _ => {
                    return Err(VmError::Failed(format!(
                        "VM {n} is not running: its console opens only while it runs"
                    )))
                }
            }
            if !inner.dirs.console_socket(&n).exists() {
                return Err(VmError::Failed(format!(
                    "VM {n} was started without a console socket (by an older version): restart it to get one"
                )));
            }
            Ok(())
        })
        .await?;
        if !self.inner.consoles.lock().insert(name.to_string()) {
            return Err(VmError::Busy(format!("the console of VM {name} is already open")));
        }
        // Released on every path from here: by this guard, or by the
        // returned stream's drop.
        let inner = self.inner.clone();
        let owned = name.to_string();
        let release = move || {
            inner.consoles.lock().remove(&owned);
        };
        struct Unreserve<F: FnOnce()>(Option<F>);
        impl<F: FnOnce()> Drop for Unreserve<F> {
            fn drop(&mut self) {
                if let Some(f) = self.0.take() {
                    f()
                }
            }
        }
        let mut reserved = Unreserve(Some(release));
        // Another client (another process) may hold it: QEMU would queue
        // us silently until it leaves. A client that just left may still be
        // seen for a moment.
        let qmp_socket = self.inner.dirs.qmp_socket(name);
        let deadline = Instant::now() + CONSOLE_RELEASE_WAIT;
        loop {
            let reply = qmp(&qmp_socket, "query-chardev").await.map_err(VmError::Failed)?;
            match chardev_connected(&reply, CONSOLE_CHARDEV) {
                Some(false) => break,
                Some(true) if Instant::now() < deadline => tokio::time::sleep(POLL).await,
                Some(true) => {
                    return Err(VmError::Busy(format!(
                        "the console of VM {name} is in use by another client"
                    )))
                }
                None => {
                    return Err(VmError::Failed(format!(
                        "VM {name} has no console chardev {CONSOLE_CHARDEV:?} (QMP query-chardev: {reply})"
                    )))
                }
            }
        }
        let socket = self.inner.dirs.console_socket(name);
        let stream = tokio::net::UnixStream::connect(&socket)
            .await
            .map_err(VmError::io(format!("connecting to the console of VM {name} ({})", socket.display())))?;
        let release = reserved.0.take().expect("taken once");
        Ok(Box::new(Leased::new(stream, release)))
    }

    async fn logs(&self, name: &str, offset: u64, max: usize) -> Result<LogChunk, VmError> {
        check_name(name)?;
        let name = name.to_string();
        self.blocking(move |inner| {
            if !inner.dirs.dir(&name).is_dir() {
                return Err(VmError::NotFound(name));
            }
            host::read_log(&inner.dirs.console(&name), offset, max)
        })
        .await
    }
}

/// Whether QEMU's chardev `id` has a client, from a `query-chardev` reply:
/// a socket chardev's filename starts with "disconnected:" while it has
/// none. `None` if there is no such chardev.
fn chardev_connected(reply: &serde_json::Value, id: &str) -> Option<bool> {
    let dev = reply.as_array()?.iter().find(|d| d.get("label").and_then(|l| l.as_str()) == Some(id))?;
    let filename = dev.get("filename")?.as_str()?;
    Some(!filename.starts_with("disconnected:"))
}

impl Drop for Inner {
    /// Reaps children that already ended, so none lingers as a zombie. Live
    /// guests are left running on purpose (they outlive the node process).
    fn drop(&mut self) {
        for (_, child) in self.children.get_mut().iter_mut() {
            let _ = child.try_wait();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accel_needs_cpu_virtualisation() {
        let (a, why) = choose_accel("flags\t\t: fpu vme de pse tsc\n");
        assert_eq!(a, Accel::Tcg);
        assert!(why.contains("no vmx/svm"), "{why}");
    }

    #[test]
    fn tsc_from_cpuinfo() {
        assert_eq!(tsc_khz("processor : 0\ncpu MHz\t\t: 2596.138\n"), Some(2_596_138));
        assert_eq!(tsc_khz("processor : 0\n"), None);
    }

    #[test]
    fn names_are_dns_labels() {
        assert!(check_name("web-1").is_ok());
        for bad in ["", "../x", "a/b", "-a", "A", "a_b"] {
            assert!(check_name(bad).is_err(), "{bad:?}");
        }
    }
}
