//! The backend trait and the types it speaks.
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// The line a guest (or a process workload) prints on its console when it is
/// up. The backend reports `Running` from the moment it sees it.
pub const READY_MARKER: &str = "BLIXARD-GUEST-READY";

/// Which backend runs the VMs of a node.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum BackendKind {
    Qemu,
    Process,
    Sim,
}

impl BackendKind {
    pub fn as_str(&self) -> &'static str {
        match self {
            BackendKind::Qemu => "qemu",
            BackendKind::Process => "process",
            BackendKind::Sim => "sim",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "qemu" => Some(BackendKind::Qemu),
            "process" => Some(BackendKind::Process),
            "sim" => Some(BackendKind::Sim),
            _ => None,
        }
    }
}

/// How a guest boots (qemu backend). `None` fields mean "the default guest
/// image" (see `image`).
///
/// `kernel` and `initrd` are image names, relative paths inside the image
/// directory of the node that runs the VM (see [`crate::image_dir`]). An
/// absolute path comes from a VM recorded before image names existed: it
/// boots only if it lies inside that directory.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BootSource {
    pub kernel: Option<PathBuf>,
    pub initrd: Option<PathBuf>,
    /// Extra kernel command line, appended to the backend's own arguments.
    pub cmdline: Option<String>,
}

/// Everything a backend needs to run one VM. What the VM reserved in the
/// cluster is exactly what its VMM is given (`vcpus`, `memory_mb`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmConfig {
    /// The VM's cluster-wide unique name (a DNS label).
    pub name: String,
    pub vcpus: u32,
    pub memory_mb: u64,
    pub boot: BootSource,
    /// Its NIC on the node's VM bridge; `None`: no NIC (no address, or the
    /// node runs without VM networking).
    pub net: Option<NetConfig>,
    /// Size of its data disk in GiB (a sparse file the backend creates and
    /// formats ext4 on first use, mounted at `/data` in the guest; it lives
    /// until the VM is deleted); 0: no disk.
    pub disk_gb: u64,
}

/// A VM's network attachment: a tap on the node's bridge, the address the
/// cluster allocated it (passed to the guest as `blixard.ip=`), and the
/// bridge's address as its gateway.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetConfig {
    /// The node's VM bridge the tap joins (created by the node).
    pub bridge: String,
    pub ip: Ipv4Addr,
    pub prefix: u8,
    pub gateway: Ipv4Addr,
}

impl NetConfig {
    /// The tap device: named after the address, unique on the host (an
    /// address belongs to one VM cluster-wide) and within the kernel's
    /// 15-byte limit.
    pub fn tap(&self) -> String {
        format!("bxt{:08x}", u32::from(self.ip))
    }

    /// A locally administered unicast MAC derived from the address.
    pub fn mac(&self) -> String {
        let o = self.ip.octets();
        format!("02:b1:{:02x}:{:02x}:{:02x}:{:02x}", o[0], o[1], o[2], o[3])
    }
}

/// An open interactive console: what is written reaches the guest's serial
/// input; what is read is its serial output from the moment it was opened.
pub trait ConsoleIo: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin {}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin> ConsoleIo for T {}

/// What a backend sees of one VM.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum RunState {
    /// Launched, readiness marker not seen yet.
    Starting,
    /// Readiness marker seen, process alive.
    Running,
    /// Exited cleanly (guest powered off, or stopped on request).
    Stopped,
    /// Could not start, or died: the reason says why (QEMU's stderr tail,
    /// exit code or signal).
    Failed { reason: String },
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmStatus {
    pub name: String,
    pub state: RunState,
    /// The VMM (or workload) process, while it runs.
    pub pid: Option<u32>,
    /// When the process was launched (ms since the Unix epoch).
    pub started_at_ms: Option<u64>,
    /// Launch until readiness marker, once seen.
    pub boot_ms: Option<u64>,
    /// Exit code or signal of the last run, once it ended.
    pub exit: Option<ExitInfo>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExitInfo {
    pub code: Option<i32>,
    pub signal: Option<i32>,
}

/// A piece of a VM's console log.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LogChunk {
    pub data: Vec<u8>,
    /// Offset to ask for next.
    pub next_offset: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum VmError {
    /// Bad configuration: a kernel/initrd missing, unreadable or outside
    /// the node's image directory, memory below the guest's minimum,
    /// unsupported options. Says what is allowed.
    #[error("{0}")]
    Config(String),
    /// This backend cannot run here (QEMU missing, no guest image).
    #[error("{0}")]
    Unavailable(String),
    #[error("no VM named {0:?} on this node")]
    NotFound(String),
    /// In use by someone else (a console already attached); try later.
    #[error("{0}")]
    Busy(String),
    /// The VMM failed to start or misbehaved; the text carries its stderr tail.
    #[error("{0}")]
    Failed(String),
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
}

impl VmError {
    pub fn io(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> VmError {
        let context = context.into();
        move |source| VmError::Io { context, source }
    }
}

/// One way of running VMs on a host. Implementations keep every file of a VM
/// under their own directory, so `delete` leaves nothing behind and `list`
/// finds VMs that survived a restart of the node process (adoption).
#[async_trait::async_trait]
pub trait VmBackend: Send + Sync + 'static {
    fn kind(&self) -> BackendKind;

    /// A one-line description for node status ("qemu 7.2 (TCG)", ...).
    fn describe(&self) -> String;

    /// Checks the configuration and creates the VM's files. Idempotent.
    async fn prepare(&self, vm: &VmConfig) -> Result<(), VmError>;

    /// Launches the VM (prepared first if needed). Returns once the process
    /// runs; readiness shows up later in `status`. Starting a VM that runs is
    /// an error.
    async fn start(&self, vm: &VmConfig) -> Result<VmStatus, VmError>;

    /// Graceful stop: ask the guest to power off, wait up to `grace`, then
    /// force it (QMP `quit`, then kill). Stopping a stopped VM is a no-op.
    async fn stop(&self, name: &str, grace: Duration) -> Result<(), VmError>;

    /// Stops the VM if it runs and removes all its files. Deleting an
    /// unknown VM is a no-op.
    async fn delete(&self, name: &str) -> Result<(), VmError>;

    /// The VM's current status, or `None` if this backend has no trace of it.
    async fn status(&self, name: &str) -> Result<Option<VmStatus>, VmError>;

    /// Every VM this backend has a trace of on this host.
    async fn list(&self) -> Result<Vec<VmStatus>, VmError>;

    /// Opens the VM's interactive console (one at a time per VM: a second
    /// open while one is attached is [`VmError::Busy`]).
    async fn console(&self, name: &str) -> Result<Box<dyn ConsoleIo>, VmError>;

    /// Console output from byte `offset`, at most `max` bytes.
    async fn logs(&self, name: &str, offset: u64, max: usize) -> Result<LogChunk, VmError>;

    /// Fencing: VMs on this host may run for `valid_for` from now. The node
    /// renews the lease each time it confirms contact with a quorum. If it
    /// lapses, the host's guard, which outlives the node process and works
    /// while it is stopped, stops every VM on the host (SIGTERM to its process
    /// group, SIGKILL after `grace`), marking each stopped on request, and stops
    /// any VM it finds running until the lease is renewed.
    async fn renew_lease(&self, valid_for: Duration, grace: Duration) -> Result<(), VmError>;

    /// Where VM `name`'s data disk lives (or will) on this host, so the
    /// node can hand it over when the VM moves; `None`: this backend keeps
    /// no disks.
    fn data_disk(&self, _name: &str) -> Option<PathBuf> {
        None
    }
}

/// Default deadline for a graceful stop before the VM is forced.
pub const DEFAULT_STOP_GRACE: Duration = Duration::from_secs(10);
