//! Commands that run nodes on this machine: `node start` and `up`.
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use blixard_core::node::VmNetworkConfig;
use blixard_core::node::{Node, NodeConfig};
use blixard_core::raft::RaftTuning;
use blixard_core::tls::NodeTls;
use blixard_core::types::{Ipv4Net, NodeResources, Ratio, Resources};
use blixard_vm::guard::GuardCommand;
use blixard_vm::image_dir::DEFAULT_SUBDIR as DEFAULT_IMAGE_SUBDIR;
use blixard_vm::process::ProcessBackend;
use blixard_vm::qemu::QemuBackend;
use blixard_vm::{image, BackendKind, VmBackend, VmError};
use clap::Args;
use std::sync::Arc;

use crate::prometheus::MetricsAddr;
use crate::telemetry::{self, LogFormat};
use crate::{default_data_dir, labels_map, parse_label, Failure, DEFAULT_PORT};

#[derive(Args, Clone)]
pub struct CapacityArgs {
    /// vCPUs this node offers to VMs (default: the host's CPUs).
    #[arg(long)]
    pub vcpus: Option<u32>,
    /// Memory in MiB this node offers to VMs (default: the host's memory).
    #[arg(long)]
    pub memory_mb: Option<u64>,
    /// Disk in GiB this node offers to VMs (default: free space under --data-dir).
    #[arg(long)]
    pub disk_gb: Option<u64>,
    /// vCPUs held back for the host (not allocatable to VMs).
    #[arg(long, default_value_t = 0)]
    pub reserve_vcpus: u32,
    /// Memory in MiB held back for the host.
    #[arg(long, default_value_t = 0)]
    pub reserve_memory_mb: u64,
    /// Disk in GiB held back for the host.
    #[arg(long, default_value_t = 0)]
    pub reserve_disk_gb: u64,
    /// Allocatable vCPUs = (vCPUs - reserved) x R (0.1-64, up to 3 decimals).
    #[arg(long, default_value = "1", value_parser = parse_ratio)]
    pub cpu_overcommit: Ratio,
    /// Allocatable memory = (memory - reserved) x R (0.1-64).
    #[arg(long, default_value = "1", value_parser = parse_ratio)]
    pub memory_overcommit: Ratio,
}

pub fn parse_ratio(s: &str) -> Result<Ratio, String> {
    Ratio::parse(s).ok_or_else(|| {
        format!("expected a decimal between {} and {} with at most 3 decimals", Ratio::MIN, Ratio::MAX)
    })
}

impl CapacityArgs {
    /// The node's resources: `capacity` with these reservations and ratios.
    fn resources(&self, capacity: Resources) -> NodeResources {
        NodeResources {
            capacity,
            reserved: Resources::new(self.reserve_vcpus, self.reserve_memory_mb, self.reserve_disk_gb),
            cpu_overcommit: self.cpu_overcommit,
            memory_overcommit: self.memory_overcommit,
        }
    }

    /// The same flags for a child `node start`.
    fn to_args(&self) -> Vec<String> {
        let mut out = Vec::new();
        let mut push = |k: &str, v: String| {
            out.push(k.to_string());
            out.push(v);
        };
        if let Some(v) = self.vcpus {
            push("--vcpus", v.to_string());
        }
        if let Some(m) = self.memory_mb {
            push("--memory-mb", m.to_string());
        }
        if let Some(d) = self.disk_gb {
            push("--disk-gb", d.to_string());
        }
        push("--reserve-vcpus", self.reserve_vcpus.to_string());
        push("--reserve-memory-mb", self.reserve_memory_mb.to_string());
        push("--reserve-disk-gb", self.reserve_disk_gb.to_string());
        push("--cpu-overcommit", self.cpu_overcommit.to_string());
        push("--memory-overcommit", self.memory_overcommit.to_string());
        out
    }
}

#[derive(Args)]
pub struct StartArgs {
    /// This node's id (positive, unique in the cluster; kept in --data-dir).
    #[arg(long, default_value_t = 1)]
    pub id: u64,
    /// Address to listen on for the control API and Raft traffic.
    #[arg(long, default_value = "127.0.0.1:7420")]
    pub bind: SocketAddr,
    /// Address other nodes use to reach this one (default: --bind).
    #[arg(long)]
    pub advertise: Option<String>,
    /// Port of the peer link, where a leader sends this node Raft log
    /// entries, and followers the writes they forward to it, outside gRPC,
    /// on the --bind host (0: any free port, announced to the other nodes;
    /// `none`: they come over gRPC). With TLS the link is mutual TLS with
    /// the node certificates.
    #[arg(long, value_name = "PORT|none", default_value = "0", value_parser = parse_peer_port)]
    pub peer_port: PeerPort,
    /// Where Raft log, snapshots and identity live (default: blixard-data/node-<id>).
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// Any member of an existing cluster to join (HOST:PORT).
    #[arg(long)]
    pub join: Option<String>,
    #[command(flatten)]
    pub capacity: CapacityArgs,
    /// Node label KEY=VALUE (repeatable).
    #[arg(long = "label", value_parser = parse_label)]
    pub labels: Vec<(String, String)>,
    /// Log filter (tracing EnvFilter syntax), also read from RUST_LOG.
    #[arg(long, env = "RUST_LOG", default_value = "info,openraft=warn")]
    pub log: String,
    #[command(flatten)]
    pub telemetry: TelemetryArgs,
    #[command(flatten)]
    pub vms: VmArgs,
    /// Serve Prometheus metrics at http://HOST:PORT/metrics (https:// with
    /// TLS; default: the --bind host, port + 1000; `none` disables).
    #[arg(long, value_name = "HOST:PORT|none")]
    pub metrics_addr: Option<String>,
    #[command(flatten)]
    pub tls: NodeTlsArgs,
}

/// `node start`'s TLS flags (see docs/OPERATIONS.md, "TLS").
#[derive(Args, Clone, Default)]
pub struct NodeTlsArgs {
    /// The cluster's CA certificate (PEM; `blixard cert init` makes it).
    /// With --tls-cert and --tls-key: every listener takes TLS only, peers
    /// are dialled with mutual TLS, and the Raft service takes only node
    /// certificates of this CA.
    #[arg(long, value_name = "FILE")]
    pub tls_ca: Option<PathBuf>,
    /// This node's certificate (PEM; `blixard cert issue node --id N`).
    #[arg(long, value_name = "FILE")]
    pub tls_cert: Option<PathBuf>,
    /// This node's private key (PEM).
    #[arg(long, value_name = "FILE")]
    pub tls_key: Option<PathBuf>,
    /// Serve plaintext on a non-loopback address anyway (anyone who reaches
    /// the port controls the cluster). Warns at every start.
    #[arg(long)]
    pub insecure_plaintext: bool,
}

impl NodeTlsArgs {
    /// The node's TLS files, loaded and checked; `None` without the flags.
    pub fn load(&self) -> Result<Option<NodeTls>, Failure> {
        let (ca, cert, key) = match (&self.tls_ca, &self.tls_cert, &self.tls_key) {
            (None, None, None) => return Ok(None),
            (Some(ca), Some(cert), Some(key)) => (ca, cert, key),
            (ca, cert, key) => {
                let missing: Vec<&str> = [(ca, "--tls-ca"), (cert, "--tls-cert"), (key, "--tls-key")]
                    .into_iter()
                    .filter(|(v, _)| v.is_none())
                    .map(|(_, name)| name)
                    .collect();
                return Err(Failure::new(format!(
                    "--tls-ca, --tls-cert and --tls-key go together: {} missing",
                    missing.join(" and ")
                )));
            }
        };
        if self.insecure_plaintext {
            return Err(Failure::new(
                "--insecure-plaintext contradicts --tls-ca/--tls-cert/--tls-key: give one or the other",
            ));
        }
        NodeTls::load(ca, cert, key).map(Some).map_err(|e| Failure::new(format!("TLS: {e}")))
    }
}

/// `--peer-port`: a port, or `none`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PeerPort(pub Option<u16>);

fn parse_peer_port(s: &str) -> Result<PeerPort, String> {
    if s == "none" {
        return Ok(PeerPort(None));
    }
    s.parse::<u16>()
        .map(|p| PeerPort(Some(p)))
        .map_err(|_| format!("{s:?}: expected a port (0-65535; 0: any free port) or none"))
}

/// A node without TLS serves plaintext only on loopback, unless told
/// `--insecure-plaintext` (then it warns, every start). `listeners` are
/// (what, address) of everything the node will listen on.
fn check_plaintext(listeners: &[(&str, SocketAddr)], insecure: bool) -> Result<(), Failure> {
    let exposed: Vec<String> = listeners
        .iter()
        .filter(|(_, a)| !a.ip().is_loopback())
        .map(|(what, a)| format!("{what} on {a}"))
        .collect();
    if exposed.is_empty() {
        return Ok(());
    }
    let exposed = exposed.join(" and ");
    if !insecure {
        return Err(Failure::new(format!(
            "refusing to serve plaintext ({exposed}: not a loopback address): anyone who reaches it could control the cluster. \
             Give --tls-ca, --tls-cert and --tls-key (blixard cert init and blixard cert issue node make them; see docs/OPERATIONS.md, \"TLS\"), \
             or --insecure-plaintext to run without TLS anyway"
        )));
    }
    tracing::warn!(listeners = %exposed, "--insecure-plaintext: serving without TLS on a non-loopback address; anyone who reaches it can control the cluster");
    eprintln!(
        "WARNING: --insecure-plaintext: serving without TLS ({exposed}); anyone who reaches it can control the cluster"
    );
    Ok(())
}

#[derive(Args, Clone)]
pub struct TelemetryArgs {
    /// Log line format on stderr: text, or json (one object per line).
    #[arg(long, value_enum, default_value = "text")]
    pub log_format: LogFormat,
    /// Export trace spans over OTLP/gRPC to this collector (e.g.
    /// http://127.0.0.1:4317). Without it no span is exported.
    #[arg(long, value_name = "URL")]
    pub otlp_endpoint: Option<String>,
}

impl TelemetryArgs {
    /// The same flags for a child `node start`.
    fn to_args(&self) -> Vec<String> {
        let mut out = vec!["--log-format".to_string(), self.log_format.as_str().to_string()];
        if let Some(url) = &self.otlp_endpoint {
            out.push("--otlp-endpoint".into());
            out.push(url.clone());
        }
        out
    }
}

#[derive(Args, Clone)]
pub struct VmArgs {
    /// How this node runs VMs: auto (qemu when QEMU and a guest image are
    /// available, else process), qemu, process, or none.
    #[arg(long, default_value = "auto")]
    pub vm_backend: String,
    /// Guest image cache (default: $XDG_CACHE_HOME/blixard or ~/.cache/blixard).
    #[arg(long)]
    pub image_cache: Option<PathBuf>,
    /// The only directory custom kernels and initrds are booted from: `vm
    /// create --kernel NAME` names a file in it, on the node that runs the
    /// VM; symlinks out of it are refused. Created if missing. Default:
    /// DATA_DIR/images for `node start`; for `up`, DATA_DIR/images shared
    /// by all its nodes.
    #[arg(long, value_name = "DIR")]
    pub image_dir: Option<PathBuf>,
    /// VM networking: bridge (each VM gets a NIC on this node's bridge with
    /// its cluster address; needs CAP_NET_ADMIN, else the node says so and
    /// runs VMs without one) or none.
    #[arg(long, value_name = "MODE", default_value = "bridge", value_parser = ["bridge", "none"])]
    pub vm_network: String,
    /// Masquerade VM traffic leaving the VM network (outbound internet
    /// access for guests).
    #[arg(long)]
    pub vm_nat: bool,
    /// The cluster's VM network, when this node founds the cluster (each
    /// node gets a /24 of it) [default: 10.88.0.0/16]. Fixed once set.
    #[arg(long, value_name = "CIDR", value_parser = parse_cidr)]
    pub vm_cidr: Option<Ipv4Net>,
}

/// `--vm-cidr`: an aligned network the cluster accepts.
fn parse_cidr(s: &str) -> Result<Ipv4Net, String> {
    let net = Ipv4Net::parse(s)?;
    blixard_core::validate::vm_cidr(&net).map_err(|e| e.to_string())?;
    Ok(net)
}

#[derive(Args)]
pub struct UpArgs {
    /// Number of nodes.
    #[arg(long, default_value_t = 3)]
    pub nodes: u16,
    /// Node i listens on 127.0.0.1:(base-port + i - 1).
    #[arg(long, default_value_t = DEFAULT_PORT)]
    pub base_port: u16,
    /// Parent of the nodes' data dirs (node-1, node-2, ...) and logs.
    #[arg(long, default_value = "blixard-data")]
    pub data_dir: PathBuf,
    #[command(flatten)]
    pub capacity: CapacityArgs,
    #[command(flatten)]
    pub telemetry: TelemetryArgs,
    #[command(flatten)]
    pub vms: VmArgs,
    /// Serve each node's Prometheus metrics on its port + 1000.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set, value_name = "BOOL")]
    pub metrics: bool,
    /// Give each node a peer link on a free port (`node start --peer-port
    /// 0`); false: Raft log entries and forwarded writes go over gRPC only
    /// (`--peer-port none`).
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set, value_name = "BOOL")]
    pub peer_link: bool,
    /// Run the nodes with TLS: a CA, node certificates and an admin client
    /// certificate in DATA_DIR/certs (made when missing, kept after).
    #[arg(long)]
    pub tls: bool,
}

/// `up --tls`: the certificates under `dir` for nodes 1..=n (made when
/// missing) and the admin client's files.
fn up_certs(dir: &Path, n: u16) -> Result<crate::client::Tls, Failure> {
    use crate::cert;
    let now = time::OffsetDateTime::now_utc();
    if !dir.join("ca.pem").exists() {
        cert::init(dir, now)?;
        println!("made a cluster CA and an admin client certificate in {}", dir.display());
    }
    for id in 1..=u64::from(n) {
        if !dir.join(format!("node-{id}.pem")).exists() {
            cert::issue_node(dir, id, &["127.0.0.1".to_string(), "localhost".to_string()], now)?;
        }
    }
    Ok(crate::client::Tls {
        ca: Some(dir.join("ca.pem")),
        cert: Some(dir.join("admin.pem")),
        key: Some(dir.join("admin-key.pem")),
    })
}

/// The host's CPUs, memory and the free disk under `dir`.
fn host_capacity(dir: &Path, over: &CapacityArgs) -> Resources {
    let vcpus = over
        .vcpus
        .unwrap_or_else(|| std::thread::available_parallelism().map(|n| n.get() as u32).unwrap_or(1));
    let memory_mb = over.memory_mb.unwrap_or_else(|| {
        std::fs::read_to_string("/proc/meminfo")
            .ok()
            .and_then(|m| {
                m.lines()
                    .find(|l| l.starts_with("MemTotal:"))
                    .and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
            })
            .map(|kb| kb / 1024)
            .unwrap_or(1024)
    });
    let disk_gb = over.disk_gb.unwrap_or_else(|| free_disk_gb(dir).unwrap_or(10).max(1));
    Resources::new(vcpus, memory_mb, disk_gb)
}

fn free_disk_gb(dir: &Path) -> Option<u64> {
    use std::os::unix::ffi::OsStrExt;
    let path = std::ffi::CString::new(dir.as_os_str().as_bytes()).ok()?;
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: `path` is a valid NUL-terminated string and `st` a valid out pointer.
    let rc = unsafe { libc::statvfs(path.as_ptr(), &mut st) };
    (rc == 0).then(|| (st.f_bavail as u64 * st.f_frsize as u64) >> 30)
}

pub async fn node_start(
    args: StartArgs,
    join_token: Option<String>,
    context: Option<String>,
) -> Result<(), Failure> {
    let mut signals = Signals::install()?;
    let t = &args.telemetry;
    let telemetry = telemetry::init(&args.log, t.log_format, t.otlp_endpoint.as_deref(), args.id)?;
    let tls = args.tls.load()?;
    let metrics_addr = MetricsAddr::parse(args.metrics_addr.as_deref(), args.bind)?;
    if tls.is_none() {
        let mut listeners = vec![("the control API", args.bind)];
        if let MetricsAddr::At(a) = metrics_addr {
            listeners.push(("metrics", a));
        }
        if let PeerPort(Some(port)) = args.peer_port {
            listeners.push(("the peer link", SocketAddr::new(args.bind.ip(), port)));
        }
        check_plaintext(&listeners, args.tls.insecure_plaintext)?;
    }
    let data_dir = args.data_dir.clone().unwrap_or_else(|| default_data_dir(args.id));
    std::fs::create_dir_all(&data_dir)
        .map_err(|e| Failure::new(format!("cannot create data dir {}: {e}", data_dir.display())))?;
    // Absolute, so status output and every file handed to a VMM stay valid
    // whatever a child process's working directory is.
    let data_dir = std::path::absolute(&data_dir)
        .map_err(|e| Failure::new(format!("cannot resolve data dir {}: {e}", data_dir.display())))?;
    let capacity = host_capacity(&data_dir, &args.capacity);
    let image_dir = match &args.vms.image_dir {
        Some(d) => std::path::absolute(d)
            .map_err(|e| Failure::new(format!("cannot resolve --image-dir {}: {e}", d.display())))?,
        None => data_dir.join(DEFAULT_IMAGE_SUBDIR),
    };
    let vm_backend = choose_backend(&args.vms, &data_dir, &image_dir).await?;
    if args.vms.vm_cidr.is_some() && args.join.is_some() {
        return Err(Failure::new(
            "--vm-cidr is chosen by the node that founds the cluster; a joining node uses the cluster's"
                .to_string(),
        ));
    }
    let vm_network = vm_network_of(&args.vms, vm_backend.as_deref());
    let metrics = match metrics_addr {
        MetricsAddr::Off => None,
        MetricsAddr::At(addr) => Some(crate::prometheus::start(addr, args.id, tls.as_ref()).await?),
    };
    let cfg = NodeConfig {
        id: args.id,
        bind: args.bind,
        advertise: args.advertise.clone(),
        peer_port: args.peer_port.0,
        data_dir: data_dir.clone(),
        join: args.join.clone(),
        resources: args.capacity.resources(capacity),
        labels: labels_map(args.labels.clone()),
        tuning: RaftTuning::default(),
        vm_backend: vm_backend.clone(),
        reconciler: Default::default(),
        meter: metrics.as_ref().map(|m| m.meter.clone()),
        join_token,
        tls: tls.clone(),
        vm_cidr: args.vms.vm_cidr,
        vm_network: vm_network.clone(),
    };
    let addr = cfg.advertised();
    // Founding a cluster: no identity yet and nothing to join.
    let founding = args.join.is_none()
        && blixard_core::node::identity::load(&data_dir).map_err(|e| Failure::new(e.to_string()))?.is_none();
    let node = Node::start(cfg).await.map_err(|e| Failure::new(e.to_string()))?;
    // The founder's admin token becomes the current CLI context, so the
    // next command on this host just works.
    let context_note = if founding {
        let token = blixard_core::node::bootstrap::read(&data_dir);
        let name = context.as_deref().unwrap_or(crate::context::DEFAULT_NAME);
        // With TLS the context names the cluster's CA, so the CLI verifies nodes.
        let ca = args.tls.tls_ca.as_ref().filter(|_| tls.is_some()).and_then(|p| std::path::absolute(p).ok());
        let ctx = crate::context::Context { addr: Some(addr.clone()), token, ca, ..Default::default() };
        match crate::context::put_current(name, ctx) {
            Ok(path) => Some(format!("{name} in {} (admin token; current)", path.display())),
            Err(f) => {
                eprintln!("warning: {}", f.message);
                None
            }
        }
    } else {
        None
    };
    println!("blixard node {} serving at {addr}", args.id);
    println!("  data dir: {}", data_dir.display());
    println!("  cluster:  {}", node.shared().cluster_id);
    let token_file = blixard_core::node::bootstrap::path(&data_dir);
    if token_file.exists() {
        println!("  admin token: {}", token_file.display());
    }
    if let Some(note) = &context_note {
        println!("  context:  {note}");
    }
    let scheme = if tls.is_some() { "https" } else { "http" };
    match &metrics {
        Some(m) => println!("  metrics:  {scheme}://{}/metrics", m.addr),
        None => println!("  metrics:  off"),
    }
    match &args.tls.tls_ca {
        Some(ca) if tls.is_some() => {
            println!("  tls:      on (mutual TLS between nodes; CA {})", ca.display())
        }
        _ => println!("  tls:      off"),
    }
    let resources = args.capacity.resources(capacity);
    println!("  capacity: {capacity}");
    if resources != NodeResources::plain(capacity) {
        println!(
            "  allocatable: {} (reserved {}; overcommit cpu x{}, memory x{})",
            resources.allocatable(),
            resources.reserved,
            resources.cpu_overcommit,
            resources.memory_overcommit
        );
    }
    match &vm_backend {
        Some(b) => println!("  vms:      {}", b.describe()),
        None => println!("  vms:      none (--vm-backend none): VMs placed here stay pending"),
    }
    if vm_backend.as_ref().is_some_and(|b| b.kind() == BackendKind::Qemu) {
        println!("  images:   {} (vm create --kernel NAME boots a file from here)", image_dir.display());
        match &vm_network {
            Ok(n) => println!(
                "  network:  bridge (each VM gets a NIC with its cluster address{})",
                if n.nat { "; outbound NAT on" } else { "" }
            ),
            Err(why) => println!("  network:  none: {why}"),
        }
    }
    match &args.tls.tls_ca {
        Some(ca) if tls.is_some() => println!(
            "  try:      blixard --addr {addr} --cacert {} --cert CLIENT.pem --key CLIENT-key.pem cluster status",
            ca.display()
        ),
        _ => println!("  try:      blixard --addr {addr} cluster status"),
    }
    signals.recv().await;
    eprintln!("shutting down node {}", args.id);
    node.shutdown().await;
    telemetry.shutdown().await;
    Ok(())
}

/// Picks the VM backend. `auto` prefers real microVMs and says plainly why
/// it falls back to processes.
/// Whether this node gives its VMs a NIC, or why not (said at start and
/// in `node status`).
fn vm_network_of(args: &VmArgs, backend: Option<&dyn VmBackend>) -> Result<VmNetworkConfig, String> {
    if args.vm_network == "none" {
        return Err("--vm-network none: VMs run without a NIC".to_string());
    }
    match backend.map(|b| b.kind()) {
        Some(BackendKind::Qemu) => {}
        Some(kind) => return Err(format!("the {} backend runs VMs without a NIC", kind.as_str())),
        None => return Err("this node runs no VMs".to_string()),
    }
    blixard_vm::net::probe().map_err(|why| {
        let msg = format!("{why}; VMs run without a NIC (--vm-network none silences this)");
        eprintln!("note: VM networking is off: {msg}");
        msg
    })?;
    Ok(VmNetworkConfig { nat: args.vm_nat })
}

async fn choose_backend(
    args: &VmArgs,
    data_dir: &Path,
    image_dir: &Path,
) -> Result<Option<Arc<dyn VmBackend>>, Failure> {
    let root = data_dir.join("vms");
    let cache = args.image_cache.clone().unwrap_or_else(image::default_cache_dir);
    // The host's fence guard is this binary again (`blixard fence-guard`).
    let guard = GuardCommand {
        program: std::env::current_exe()
            .map_err(|e| Failure::new(format!("cannot find this program's path for the fence guard: {e}")))?,
        args: vec!["fence-guard".into()],
    };
    let qemu = || async {
        let backend =
            QemuBackend::new(root.clone(), cache.clone(), image_dir.to_path_buf())?.with_guard(guard.clone());
        // Build (or find) the default guest image now, so the first VM does
        // not pay for it and a missing package shows up at start.
        let c = cache.clone();
        tokio::task::spawn_blocking(move || image::ensure_default_image(&c))
            .await
            .map_err(|e| VmError::Failed(format!("image build task: {e}")))??;
        Ok::<_, VmError>(backend)
    };
    let process =
        || ProcessBackend::new(root.clone(), ProcessBackend::default_command()).with_guard(guard.clone());
    let backend: Arc<dyn VmBackend> = match args.vm_backend.as_str() {
        "none" => return Ok(None),
        "qemu" => Arc::new(qemu().await.map_err(|e| Failure::new(format!("--vm-backend qemu: {e}")))?),
        "process" => Arc::new(process()),
        "auto" => match qemu().await {
            Ok(b) => Arc::new(b),
            Err(e) => {
                eprintln!("note: running VMs as processes, not QEMU microVMs: {e}");
                Arc::new(process())
            }
        },
        other => {
            return Err(Failure::new(format!(
                "unknown --vm-backend {other:?}: one of auto, qemu, process, none"
            )))
        }
    };
    Ok(Some(backend))
}

/// `blixard image build`.
pub async fn image_build(cache_dir: Option<PathBuf>) -> Result<(), Failure> {
    let cache = cache_dir.unwrap_or_else(image::default_cache_dir);
    let c = cache.clone();
    let img = tokio::task::spawn_blocking(move || image::ensure_default_image(&c))
        .await
        .map_err(|e| Failure::new(format!("image build task: {e}")))?
        .map_err(|e| Failure::new(e.to_string()))?;
    println!("default guest image ready in {}", cache.display());
    println!("  kernel: {}", img.kernel.display());
    println!("  initrd: {}", img.initrd.display());
    Ok(())
}

/// SIGINT and SIGTERM, registered once, early: a signal that arrives while
/// a node is still starting is held until we look, instead of killing the
/// process with the default disposition (and orphaning child nodes).
struct Signals {
    int: tokio::signal::unix::Signal,
    term: tokio::signal::unix::Signal,
}

impl Signals {
    fn install() -> Result<Self, Failure> {
        use tokio::signal::unix::{signal, SignalKind};
        let err = |e: std::io::Error| Failure::new(format!("cannot install signal handlers: {e}"));
        Ok(Self {
            int: signal(SignalKind::interrupt()).map_err(err)?,
            term: signal(SignalKind::terminate()).map_err(err)?,
        })
    }

    async fn recv(&mut self) {
        tokio::select! {
            _ = self.int.recv() => {}
            _ = self.term.recv() => {}
        }
    }
}

struct NodeProcess {
    id: u64,
    addr: String,
    child: Child,
}

/// `up`: N child `node start` processes on loopback. Node 1 bootstraps,
/// the rest join it. Logs go to DATA_DIR/node-<i>.log.
pub async fn up(args: UpArgs, context: Option<String>, token: Option<String>) -> Result<(), Failure> {
    let mut signals = Signals::install()?;
    if args.nodes == 0 {
        return Err(Failure::new("--nodes must be at least 1"));
    }
    if args.base_port as u32 + args.nodes as u32 > 65536 {
        return Err(Failure::new("--base-port + --nodes exceeds the port range"));
    }
    let exe =
        std::env::current_exe().map_err(|e| Failure::new(format!("cannot find own executable: {e}")))?;
    std::fs::create_dir_all(&args.data_dir)
        .map_err(|e| Failure::new(format!("cannot create {}: {e}", args.data_dir.display())))?;
    // One image directory for every node: they share this host.
    let image_dir = args.vms.image_dir.clone().unwrap_or_else(|| args.data_dir.join(DEFAULT_IMAGE_SUBDIR));
    let image_dir = std::path::absolute(&image_dir)
        .map_err(|e| Failure::new(format!("cannot resolve {}: {e}", image_dir.display())))?;
    println!("image dir: {} (vm create --kernel NAME boots a file from here)", image_dir.display());
    let seed = format!("127.0.0.1:{}", args.base_port);
    let certs = args.data_dir.join("certs");
    let client_tls = if args.tls { Some(up_certs(&certs, args.nodes)?) } else { None };
    // This process talks to its nodes (until they formed) as the admin.
    if let Some(tls) = &client_tls {
        crate::client::use_tls(crate::client::tls_config(tls)?);
    }
    let mut children: Vec<NodeProcess> = Vec::new();
    let mut admin: Option<String> = None;
    for i in 0..args.nodes {
        let id = i as u64 + 1;
        let addr = format!("127.0.0.1:{}", args.base_port + i);
        let dir = args.data_dir.join(format!("node-{id}"));
        let log_path = args.data_dir.join(format!("node-{id}.log"));
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .map_err(|e| Failure::new(format!("cannot open {}: {e}", log_path.display())))?;
        let resumed = i == 0 && blixard_core::node::identity::load(&dir).ok().flatten().is_some();
        let mut cmd = Command::new(&exe);
        cmd.args(["node", "start", "--id", &id.to_string(), "--bind", &addr, "--data-dir"])
            .arg(&dir)
            .stdin(Stdio::null())
            .stdout(log.try_clone().map_err(|e| Failure::new(e.to_string()))?)
            .stderr(log);
        if i > 0 {
            cmd.args(["--join", &seed]);
            // Joiners present the founder's admin token to the seed.
            if let Some(t) = &admin {
                cmd.env("BLIXARD_TOKEN", t);
            }
        }
        cmd.args(args.capacity.to_args());
        cmd.args(args.telemetry.to_args());
        cmd.args(["--vm-backend", &args.vms.vm_backend, "--vm-network", &args.vms.vm_network]);
        if args.vms.vm_nat {
            cmd.arg("--vm-nat");
        }
        if let (0, Some(cidr)) = (i, args.vms.vm_cidr) {
            cmd.arg("--vm-cidr").arg(cidr.to_string());
        }
        if let Some(c) = &args.vms.image_cache {
            cmd.arg("--image-cache").arg(c);
        }
        cmd.arg("--image-dir").arg(&image_dir);
        // Each node serves metrics on its port + 1000 unless that is out of
        // range.
        let metrics = match (args.base_port + i).checked_add(1000) {
            Some(port) if args.metrics => format!("127.0.0.1:{port}"),
            _ => "none".to_string(),
        };
        cmd.args(["--metrics-addr", &metrics]);
        if !args.peer_link {
            cmd.args(["--peer-port", "none"]);
        }
        if args.tls {
            let node = format!("node-{id}");
            cmd.arg("--tls-ca").arg(certs.join("ca.pem"));
            cmd.arg("--tls-cert").arg(certs.join(format!("{node}.pem")));
            cmd.arg("--tls-key").arg(certs.join(format!("{node}-key.pem")));
        }
        let child = match cmd.spawn() {
            Ok(c) => c,
            Err(e) => {
                stop_all(&mut children);
                return Err(Failure::new(format!("cannot start node {id}: {e}")));
            }
        };
        println!("node {id}: {addr}  pid {}  data {}  log {}", child.id(), dir.display(), log_path.display());
        if metrics != "none" {
            let scheme = if args.tls { "https" } else { "http" };
            println!("  metrics: {scheme}://{metrics}/metrics");
        }
        children.push(NodeProcess { id, addr, child });
        if i == 0 {
            // The founder writes its admin token before its first Raft
            // entry; a node resumed from its data dir has it already (or
            // its token was revoked: then the caller's own token serves).
            let first = tokio::select! {
                t = founder_token(&dir, resumed, &mut children[0].child) => t,
                _ = signals.recv() => {
                    stop_all(&mut children);
                    return Ok(());
                }
            };
            admin = first.or_else(|| token.clone());
            if admin.is_none() {
                stop_all(&mut children);
                return Err(Failure::new(format!(
                    "node 1 wrote no admin token to {} (it exited, or not within 30s) and no --token was given; see {}",
                    blixard_core::node::bootstrap::path(&dir).display(),
                    log_path.display()
                )));
            }
            crate::client::set_token(admin.as_deref(), "node 1's admin token")?;
        }
    }
    let formed = tokio::select! {
        r = wait_until_formed(&children, args.nodes as usize) => r,
        _ = signals.recv() => {
            eprintln!("interrupted while the cluster was forming; stopping {} nodes", children.len());
            stop_all(&mut children);
            return Ok(());
        }
    };
    match formed {
        Ok(leader) => {
            // Every member in the context, so the CLI fails over between
            // them (with `--tls`, the admin's client certificate too).
            let name = context.as_deref().unwrap_or(crate::context::DEFAULT_NAME);
            let all: Vec<&str> = children.iter().map(|c| c.addr.as_str()).collect();
            let ctx = crate::context::Context {
                addr: Some(all.join(",")),
                token: admin.clone(),
                ca: client_tls.as_ref().and_then(|t| t.ca.clone()),
                cert: client_tls.as_ref().and_then(|t| t.cert.clone()),
                key: client_tls.as_ref().and_then(|t| t.key.clone()),
            };
            match crate::context::put_current(name, ctx) {
                Ok(path) => {
                    println!("CLI context {name} (admin token, all members) written to {}", path.display())
                }
                Err(f) => eprintln!("warning: {}", f.message),
            }
            println!(
                "cluster of {} nodes is up (leader: node {leader}). Try: blixard cluster status. Ctrl-C stops it.",
                args.nodes
            )
        }
        Err(e) => {
            stop_all(&mut children);
            return Err(e);
        }
    }
    // Supervise until Ctrl-C: report nodes that exit, keep the rest running.
    let mut reported = vec![false; children.len()];
    loop {
        tokio::select! {
            _ = signals.recv() => break,
            _ = tokio::time::sleep(Duration::from_millis(500)) => {
                for (i, c) in children.iter_mut().enumerate() {
                    if !reported[i] {
                        if let Ok(Some(status)) = c.child.try_wait() {
                            eprintln!("node {} exited ({status}); the others keep running", c.id);
                            reported[i] = true;
                        }
                    }
                }
            }
        }
    }
    eprintln!("stopping {} nodes", children.len());
    stop_all(&mut children);
    Ok(())
}

/// Node 1's admin token file, once it is there (at most 30 s for a node
/// founding its cluster; a resumed node has it already, or never will).
async fn founder_token(dir: &Path, resumed: bool, child: &mut Child) -> Option<String> {
    if resumed {
        return blixard_core::node::bootstrap::read(dir);
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(t) = blixard_core::node::bootstrap::read(dir) {
            return Some(t);
        }
        // A founder that exited (a busy port, ...) will write nothing.
        if tokio::time::Instant::now() > deadline || !matches!(child.try_wait(), Ok(None)) {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Waits until every node answers and the first node sees all members as voters.
async fn wait_until_formed(children: &[NodeProcess], n: usize) -> Result<u64, Failure> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    let mut last = String::from("no answer yet");
    while tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(300)).await;
        if let Ok(mut c) = crate::client::Client::one(&children[0].addr) {
            match c.status(false).await {
                Ok(s) => {
                    let voters = s.members.iter().filter(|m| m.role != "learner").count();
                    if voters == n && s.leader_id != 0 && s.nodes.len() == n {
                        return Ok(s.leader_id);
                    }
                    last =
                        format!("{voters}/{n} voters, {} registered, leader {}", s.nodes.len(), s.leader_id);
                }
                Err(f) => last = f.message,
            }
        }
    }
    Err(Failure::new(format!("cluster did not form within 120s ({last}); see the node logs")))
}

fn stop_all(children: &mut [NodeProcess]) {
    for c in children.iter() {
        // SAFETY: sending a signal to our own child process.
        unsafe {
            libc::kill(c.child.id() as libc::pid_t, libc::SIGTERM);
        }
    }
    for c in children.iter_mut() {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            match c.child.try_wait() {
                Ok(Some(_)) | Err(_) => break,
                Ok(None) if std::time::Instant::now() > deadline => {
                    let _ = c.child.kill();
                    let _ = c.child.wait();
                    break;
                }
                Ok(None) => std::thread::sleep(Duration::from_millis(50)),
            }
        }
    }
}
