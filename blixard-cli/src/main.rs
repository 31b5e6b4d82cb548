//! `blixard`: run a node (`node start`), a local cluster (`up`), or talk to
//! a cluster through its gRPC API (everything else).
mod bench;
mod cert;
mod client;
mod console;
mod context;
mod create;
mod events;
mod lifecycle;
mod local;
mod moves;
mod output;
mod prometheus;
mod telemetry;
mod tokens;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand, ValueEnum};

/// The default node address: what `node start` binds and clients dial.
pub const DEFAULT_ADDR: &str = "127.0.0.1:7420";
pub const DEFAULT_PORT: u16 = 7420;

#[derive(Parser)]
#[command(name = "blixard", version, about = "Blixard: a Raft-replicated microVM control plane")]
struct Cli {
    /// Members to talk to, HOST:PORT[,HOST:PORT...]: tried in order, moving
    /// on from one that does not answer (any member works; writes are
    /// forwarded to the leader).
    /// (default: the context's, else 127.0.0.1:7420)
    #[arg(long, global = true, env = "BLIXARD_ADDR", value_name = "ADDRS")]
    addr: Option<String>,
    /// Bearer token for every call (default: the context's). `node start
    /// --join` presents it to the seed. Never printed or logged.
    #[arg(long, global = true, env = "BLIXARD_TOKEN", value_name = "TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// Which context of the config file to use (default: its
    /// current-context). The file: $BLIXARD_CONFIG, else
    /// $XDG_CONFIG_HOME/blixard/config.toml or ~/.config/blixard/config.toml.
    #[arg(long, global = true, env = "BLIXARD_CONTEXT", value_name = "NAME")]
    context: Option<String>,
    /// The cluster's CA certificate (PEM): talk to nodes over TLS and
    /// verify them with it (default: the context's `ca`).
    #[arg(long, global = true, env = "BLIXARD_CACERT", value_name = "FILE")]
    cacert: Option<PathBuf>,
    /// A client certificate to present (PEM; `blixard cert issue client`),
    /// with --key (default: the context's `cert`).
    #[arg(long, global = true, env = "BLIXARD_CERT", value_name = "FILE")]
    cert: Option<PathBuf>,
    /// The client certificate's private key (PEM; default: the context's `key`).
    #[arg(long, global = true, env = "BLIXARD_KEY", value_name = "FILE")]
    key: Option<PathBuf>,
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run a node.
    #[command(subcommand)]
    Node(NodeCmd),
    /// Run a local N-node cluster on loopback (Ctrl-C stops it).
    Up(local::UpArgs),
    /// Cluster membership and status.
    #[command(subcommand)]
    Cluster(ClusterCmd),
    /// Virtual machines.
    #[command(subcommand)]
    Vm(VmCmd),
    /// Load generator: concurrent clients writing to a running cluster.
    Bench(bench::BenchArgs),
    /// The default guest image.
    #[command(subcommand)]
    Image(ImageCmd),
    /// Certificates for TLS: a cluster CA, node and client certificates.
    #[command(subcommand)]
    Cert(cert::CertCmd),
    /// Tenant quotas: limits on what a tenant's VMs may hold.
    #[command(subcommand)]
    Quota(QuotaCmd),
    /// Bearer tokens: who may call the cluster, with which role (admin).
    #[command(subcommand)]
    Token(tokens::TokenCmd),
    /// Stream every change to VMs and nodes, in order, each once (resumes
    /// on another member if the stream breaks; Ctrl-C stops).
    Events {
        /// The first revision (Raft log index) to show; default: from now.
        /// `vm list -o json` and `cluster status` show the current one.
        #[arg(long = "from", value_name = "REV", default_value_t = 0)]
        from: u64,
        /// Output format: json prints one object per line.
        #[arg(short = 'o', long = "output", value_enum, default_value = "table")]
        format: Format,
    },
    /// The host's fence guard (started by the node's VM backend): stops
    /// every VM under --root once the node's lease lapses.
    #[command(hide = true)]
    FenceGuard(FenceGuardArgs),
}

#[derive(Args)]
struct FenceGuardArgs {
    /// The VM backend's root directory.
    #[arg(long)]
    root: PathBuf,
    /// The node process this guard was started for.
    #[arg(long)]
    node_pid: u32,
}

#[derive(Subcommand)]
enum QuotaCmd {
    /// Set (replace) a tenant's limits; a limit left out is unlimited.
    Set {
        tenant: String,
        #[arg(long)]
        vcpus: Option<u64>,
        #[arg(long)]
        memory_mb: Option<u64>,
        #[arg(long)]
        disk_gb: Option<u64>,
        /// Number of VMs.
        #[arg(long)]
        vms: Option<u64>,
        #[command(flatten)]
        write: WriteOpts,
        #[arg(short = 'o', long = "output", value_enum, default_value = "table")]
        format: Format,
    },
    /// A tenant's limits and current usage.
    Get {
        tenant: String,
        #[arg(short = 'o', long = "output", value_enum, default_value = "table")]
        format: Format,
    },
    /// Every quota with its tenant's usage.
    List {
        #[arg(short = 'o', long = "output", value_enum, default_value = "table")]
        format: Format,
    },
    /// Remove a tenant's quota (its VMs stay; new ones are unlimited).
    Delete {
        tenant: String,
        #[command(flatten)]
        write: WriteOpts,
    },
}

#[derive(Subcommand)]
enum NodeCmd {
    /// Start a node: bootstrap a new cluster, join one, or resume from --data-dir.
    Start(Box<local::StartArgs>),
    #[command(flatten)]
    Client(NodeClientCmd),
}

/// Node commands that talk to a running cluster.
#[derive(Subcommand)]
enum NodeClientCmd {
    /// The nodes registered in the cluster: resources, labels, VM counts.
    List {
        #[arg(short = 'o', long = "output", value_enum, default_value = "table")]
        format: Format,
    },
    /// One node.
    Get {
        id: u64,
        #[arg(short = 'o', long = "output", value_enum, default_value = "table")]
        format: Format,
    },
    /// Change a node's labels or overcommit ratios (replicated; kept across
    /// the node's restarts; refused if its VMs would no longer fit).
    Set {
        id: u64,
        /// Set label KEY=VALUE (repeatable).
        #[arg(long = "label", value_parser = parse_label)]
        labels: Vec<(String, String)>,
        /// Remove label KEY (repeatable), also one the node's flags set.
        #[arg(long = "remove-label", value_name = "KEY")]
        remove_labels: Vec<String>,
        /// New CPU overcommit ratio (0.1-64).
        #[arg(long, value_parser = local::parse_ratio)]
        cpu_overcommit: Option<blixard_core::types::Ratio>,
        /// New memory overcommit ratio (0.1-64).
        #[arg(long, value_parser = local::parse_ratio)]
        memory_overcommit: Option<blixard_core::types::Ratio>,
        #[command(flatten)]
        write: WriteOpts,
        #[arg(short = 'o', long = "output", value_enum, default_value = "table")]
        format: Format,
    },
    /// Stop placing VMs on a node and move its VMs to other nodes, a few
    /// at a time; waits until it holds none (exit 6 if some cannot move).
    Drain(moves::DrainArgs),
    /// End a drain: the node takes new VMs again.
    Eligible {
        id: u64,
        #[command(flatten)]
        write: WriteOpts,
        #[arg(short = 'o', long = "output", value_enum, default_value = "table")]
        format: Format,
    },
}

#[derive(Clone, Copy, ValueEnum, Default, PartialEq, Eq)]
pub enum Format {
    #[default]
    Table,
    Json,
}

#[derive(Args, Clone, Copy)]
pub struct ReadOpts {
    /// Output format.
    #[arg(short = 'o', long = "output", value_enum, default_value = "table")]
    pub format: Format,
    /// Read this node's local state without confirming with the leader (may lag).
    #[arg(long)]
    pub stale: bool,
}

#[derive(Subcommand)]
enum ClusterCmd {
    /// Raft status of the contacted node and the cluster's members.
    Status {
        #[arg(short = 'o', long = "output", value_enum, default_value = "table")]
        format: Format,
        /// Include a fingerprint of the replicated state (compare across nodes).
        #[arg(long)]
        digest: bool,
    },
    /// Members and their roles.
    Members {
        #[arg(short = 'o', long = "output", value_enum, default_value = "table")]
        format: Format,
    },
    /// Add a running node as learner, then voter (what `node start --join` does).
    Join {
        /// The new node's id.
        node_id: u64,
        /// The new node's address (HOST:PORT).
        node_addr: String,
    },
    /// Remove the contacted node (--addr) from the cluster.
    Leave,
    /// Remove a node by id.
    Remove { node_id: u64 },
    /// Placement strategy for VMs placed from now on: spread (most free
    /// node, the default) or binpack (least free node that fits).
    SetScheduler {
        #[arg(value_parser = ["spread", "binpack"])]
        strategy: String,
        #[command(flatten)]
        write: WriteOpts,
    },
    /// How long the leader waits for a node's heartbeat before it marks the
    /// node down and re-places its VMs (2-3600 seconds).
    SetNodeTimeout {
        /// Seconds, e.g. 10 or 2.5.
        #[arg(value_name = "SECS", value_parser = parse_seconds)]
        timeout_ms: u64,
        #[command(flatten)]
        write: WriteOpts,
    },
}

#[derive(Args, Clone, Copy)]
pub struct WaitOpts {
    /// Block until the VM's observed state matches what was asked (shows
    /// progress on a terminal; fails with the reason if the VM fails).
    #[arg(long)]
    pub wait: bool,
    /// Give up waiting after this many seconds.
    #[arg(long, default_value_t = 180)]
    pub timeout: u64,
}

#[derive(Args, Clone)]
pub struct WriteOpts {
    /// Request id for this write (1-128 printable ASCII characters, no
    /// spaces; default: a random one). Running the command again with the
    /// same id never applies it twice and reports the first outcome.
    #[arg(long, value_name = "ID")]
    pub request_id: Option<String>,
}

impl WriteOpts {
    /// The id all attempts of this write carry.
    pub fn id(&self) -> Result<String, Failure> {
        match &self.request_id {
            Some(id) => {
                client::check_request_id(id)?;
                Ok(id.clone())
            }
            None => Ok(client::new_request_id()),
        }
    }
}

#[derive(Subcommand)]
enum VmCmd {
    /// Create a VM (or --count N of them); the cluster places each by the
    /// scheduler's strategy and the VM's placement rules.
    Create(Box<create::CreateArgs>),
    /// Show one VM.
    Get {
        name: String,
        #[command(flatten)]
        read: ReadOpts,
    },
    /// Everything about one VM, including what its node sees right now.
    Status {
        name: String,
        #[command(flatten)]
        read: ReadOpts,
    },
    /// List VMs.
    List {
        /// Only VMs placed on this node.
        #[arg(long)]
        node: Option<u64>,
        /// After the list, print every change as it happens (json: one
        /// object per line, the list included); Ctrl-C stops.
        #[arg(long)]
        watch: bool,
        #[command(flatten)]
        read: ReadOpts,
    },
    /// Start a stopped VM.
    Start {
        name: String,
        #[command(flatten)]
        wait: WaitOpts,
        #[command(flatten)]
        write: WriteOpts,
    },
    /// Stop a VM (ACPI power-off, forced after a grace period).
    Stop {
        name: String,
        #[command(flatten)]
        wait: WaitOpts,
        #[command(flatten)]
        write: WriteOpts,
    },
    /// Stop and start a VM.
    Restart {
        name: String,
        #[command(flatten)]
        wait: WaitOpts,
        #[command(flatten)]
        write: WriteOpts,
    },
    /// Move a VM to another node (cold: its node stops it, then it starts
    /// on the new node).
    Migrate {
        name: String,
        /// The node to move it to (default: where the scheduler places it).
        #[arg(long, value_name = "NODE", value_parser = clap::value_parser!(u64).range(1..))]
        to: Option<u64>,
        #[command(flatten)]
        wait: WaitOpts,
        #[command(flatten)]
        write: WriteOpts,
    },
    /// Delete a VM: its node stops it and removes its files.
    Delete {
        name: String,
        #[command(flatten)]
        wait: WaitOpts,
        #[command(flatten)]
        write: WriteOpts,
    },
    /// The VM's interactive serial console, through any member (operator
    /// role). On a terminal, Ctrl-] detaches; with stdin not a terminal,
    /// stdin is sent and output printed until the guest is quiet for
    /// --idle-timeout seconds after stdin ends.
    Console {
        name: String,
        #[arg(long, value_name = "SECONDS", default_value_t = 2.0)]
        idle_timeout: f64,
    },
    /// The VM's serial console, from whichever node runs it.
    Logs {
        name: String,
        /// Keep following new output (Ctrl-C stops).
        #[arg(short = 'f', long)]
        follow: bool,
    },
}

#[derive(Subcommand)]
enum ImageCmd {
    /// Build (or rebuild if stale) the default guest image into the cache now,
    /// instead of on first use.
    Build {
        /// Cache directory (default: $XDG_CACHE_HOME/blixard or ~/.cache/blixard).
        #[arg(long)]
        cache_dir: Option<PathBuf>,
    },
}

pub fn parse_label(s: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .ok_or_else(|| format!("expected KEY=VALUE, got {s:?}"))
}

/// Seconds as milliseconds: "10", "2.5" (at most 3 decimals).
pub fn parse_seconds(s: &str) -> Result<u64, String> {
    let bad = || format!("expected seconds such as 10 or 2.5 (at most 3 decimals), got {s:?}");
    let (int, frac) = s.split_once('.').unwrap_or((s, ""));
    let digits = |p: &str| p.bytes().all(|b| b.is_ascii_digit());
    if int.is_empty() || frac.len() > 3 || !digits(int) || !digits(frac) {
        return Err(bad());
    }
    let int: u64 = int.parse().map_err(|_| bad())?;
    let frac: u64 = format!("{frac:0<3}").parse().map_err(|_| bad())?;
    int.checked_mul(1000).and_then(|ms| ms.checked_add(frac)).ok_or_else(bad)
}

pub fn labels_map(labels: Vec<(String, String)>) -> BTreeMap<String, String> {
    labels.into_iter().collect()
}

/// A failure that ends the command: printed as one line on stderr; `code`
/// is the exit code (see `client::EXIT_*`).
#[derive(Debug)]
pub struct Failure {
    pub message: String,
    pub code: u8,
}

impl Failure {
    pub fn new(message: impl Into<String>) -> Self {
        Self { message: message.into(), code: 1 }
    }
}

/// mimalloc instead of glibc's malloc. A node's hot paths allocate many
/// short-lived buffers of a few KiB (tonic's 8 KiB encode and decode buffers
/// per call, HTTP/2 frames), above glibc's per-thread cache: a fifth of a
/// busy follower's cycles went to `_int_malloc`, `malloc_consolidate` and
/// `unlink_chunk`, and glibc's arenas kept what large transient buffers
/// freed (docs/PERFORMANCE.md (c)). Built without transparent huge pages
/// (`no_thp`), which otherwise add tens of MiB of resident memory.
#[cfg(not(madsim))]
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// `mi_option_purge_delay` in mimalloc 3's `mimalloc.h` (the sixteenth
/// option): how long freed memory stays resident before mimalloc gives it
/// back to the OS (1,000 ms by default; 10 times that for its arenas).
#[cfg(not(madsim))]
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

/// Freed memory goes back to the OS at once. Under a steady write load the
/// default delay kept whatever the busiest moments had freed: the leader's
/// resident memory crept up by 4-5 MiB over a million writes while its live
/// heap stayed flat, and ended 9.3-10.6 MiB above where it was after the
/// first 10,000 (7.1-8.6 MiB with no delay, over five runs each). Writes
/// per second did not change measurably (docs/PERFORMANCE.md (c)).
#[cfg(not(madsim))]
fn tune_allocator() {
    // SAFETY: sets one of mimalloc's options; any value is valid for it.
    unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, 0) }
}

#[tokio::main]
async fn main() -> ExitCode {
    #[cfg(not(madsim))]
    tune_allocator();
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            // clap exits 2 on a usage error, which here means "no capacity".
            let code = if e.use_stderr() { client::EXIT_ERROR } else { 0 };
            let _ = e.print();
            return ExitCode::from(code);
        }
    };
    // A client command piped into `head` ends quietly when the pipe
    // closes, as Unix tools do (Rust ignores SIGPIPE and print! panics).
    // Not for nodes: a node never dies because a reader went away.
    if !matches!(cli.command, Cmd::Node(NodeCmd::Start(_)) | Cmd::Up(_) | Cmd::FenceGuard(_)) {
        // SAFETY: restores the default disposition before any thread writes.
        unsafe {
            libc::signal(libc::SIGPIPE, libc::SIG_DFL);
        }
    }
    let result = run(cli).await;
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(f) => {
            eprintln!("error: {}", f.message);
            ExitCode::from(f.code)
        }
    }
}

/// What a client command connects with, from flags and environment
/// variables; each left out comes from the context.
struct Conn<'a> {
    addr: Option<&'a str>,
    token: Option<&'a str>,
    context: Option<&'a str>,
    tls: &'a client::Tls,
}

/// The members a client command talks to, after setting the token its
/// calls carry and the TLS its connections use: flags and environment
/// first, then the context, field by field.
fn target(conn: &Conn<'_>) -> Result<String, Failure> {
    let Conn { addr, token, context, tls } = *conn;
    let path = context::path();
    let cfg = context::load(&path)?;
    let ctx = cfg.select(context, &path)?.cloned().unwrap_or_default();
    let tls = client::Tls {
        ca: tls.ca.clone().or(ctx.ca.clone()),
        cert: tls.cert.clone().or(ctx.cert.clone()),
        key: tls.key.clone().or(ctx.key.clone()),
    };
    client::use_tls(client::tls_config(&tls)?);
    let from = if token.is_some() {
        "--token / BLIXARD_TOKEN".to_string()
    } else {
        format!("the context in {}", path.display())
    };
    client::set_token(token.or(ctx.token.as_deref()), &from)?;
    Ok(addr.map(str::to_string).or(ctx.addr).unwrap_or_else(|| DEFAULT_ADDR.to_string()))
}

async fn run(cli: Cli) -> Result<(), Failure> {
    let Cli { addr, token, context, cacert, cert, key, command } = cli;
    let tls = client::Tls { ca: cacert, cert, key };
    let conn =
        Conn { addr: addr.as_deref(), token: token.as_deref(), context: context.as_deref(), tls: &tls };
    let target = || target(&conn);
    let client =
        || -> Result<client::Client, Failure> { Ok(client::Client::new(client::parse_members(&target()?)?)) };
    match command {
        Cmd::Node(NodeCmd::Start(args)) => {
            // A joining node presents --token, or the context's token.
            let join_token = match &args.join {
                Some(_) => {
                    let path = context::path();
                    let cfg = context::load(&path)?;
                    let ctx = cfg.select(context.as_deref(), &path)?;
                    token.clone().or_else(|| ctx.and_then(|c| c.token.clone()))
                }
                None => None,
            };
            local::node_start(*args, join_token, context).await
        }
        Cmd::Up(args) => {
            let path = context::path();
            let cfg = context::load(&path)?;
            let ctx_token = cfg.select(context.as_deref(), &path)?.and_then(|c| c.token.clone());
            local::up(args, context, token.or(ctx_token)).await
        }
        Cmd::Image(ImageCmd::Build { cache_dir }) => local::image_build(cache_dir).await,
        Cmd::Cert(c) => cert::run(c),
        Cmd::FenceGuard(args) => fence_guard(args).await,
        Cmd::Node(NodeCmd::Client(c)) => node(&target()?, c).await,
        Cmd::Cluster(c) => cluster(&target()?, c).await,
        Cmd::Vm(c) => vm(&target()?, c).await,
        Cmd::Bench(args) => bench::run(&target()?, args).await,
        Cmd::Quota(c) => quota(&target()?, c).await,
        Cmd::Token(c) => tokens::run(&mut client()?, c).await,
        Cmd::Events { from, format } => events::events(&mut client()?, from, format).await,
    }
}

async fn node(addr: &str, cmd: NodeClientCmd) -> Result<(), Failure> {
    let mut c = client::Client::new(client::parse_members(addr)?);
    match cmd {
        NodeClientCmd::List { format } => output::nodes(&c.nodes().await?, format),
        NodeClientCmd::Get { id, format } => {
            let nodes = c.nodes().await?;
            let n = nodes.iter().find(|n| n.id == id).ok_or_else(|| {
                let known: Vec<String> = nodes.iter().map(|n| n.id.to_string()).collect();
                Failure::new(format!("unknown node id {id} (registered: {})", known.join(", ")))
            })?;
            output::node(n, format)
        }
        NodeClientCmd::Set {
            id,
            labels,
            remove_labels,
            cpu_overcommit,
            memory_overcommit,
            write,
            format,
        } => {
            if labels.is_empty()
                && remove_labels.is_empty()
                && cpu_overcommit.is_none()
                && memory_overcommit.is_none()
            {
                return Err(Failure::new(
                    "nothing to change: give --label, --remove-label, --cpu-overcommit or --memory-overcommit",
                ));
            }
            let req = blixard_proto::SetNodeRequest {
                node_id: id,
                set_labels: labels.into_iter().collect(),
                remove_labels,
                cpu_overcommit: cpu_overcommit.map(|r| r.to_string()).unwrap_or_default(),
                memory_overcommit: memory_overcommit.map(|r| r.to_string()).unwrap_or_default(),
                request_id: write.id()?,
            };
            output::node(&c.set_node(req).await?, format)
        }
        NodeClientCmd::Drain(args) => moves::drain(&mut c, args).await,
        NodeClientCmd::Eligible { id, write, format } => {
            let req = blixard_proto::SetEligibleRequest { node_id: id, request_id: write.id()? };
            let n = c.set_eligible(req).await?;
            if format == Format::Table {
                println!("node {id} takes new VMs again");
            }
            output::node(&n, format)
        }
    }
}

async fn quota(addr: &str, cmd: QuotaCmd) -> Result<(), Failure> {
    let mut c = client::Client::new(client::parse_members(addr)?);
    match cmd {
        QuotaCmd::Set { tenant, vcpus, memory_mb, disk_gb, vms, write, format } => {
            if vcpus.is_none() && memory_mb.is_none() && disk_gb.is_none() && vms.is_none() {
                return Err(Failure::new(
                    "no limit given: use --vcpus, --memory-mb, --disk-gb or --vms (quota delete removes a quota)",
                ));
            }
            let limits = blixard_proto::QuotaLimits { vcpus, memory_mb, disk_gb, vms };
            let req =
                blixard_proto::SetQuotaRequest { tenant, limits: Some(limits), request_id: write.id()? };
            output::quota(&c.set_quota(req).await?, format)
        }
        QuotaCmd::Get { tenant, format } => output::quota(&c.get_quota(tenant).await?, format),
        QuotaCmd::List { format } => output::quotas(&c.list_quotas().await?, format),
        QuotaCmd::Delete { tenant, write } => {
            c.delete_quota(tenant.clone(), &write.id()?).await?;
            println!("quota of tenant {tenant} deleted");
            Ok(())
        }
    }
}

async fn cluster(addr: &str, cmd: ClusterCmd) -> Result<(), Failure> {
    let mut c = client::Client::new(client::parse_members(addr)?);
    match cmd {
        ClusterCmd::Status { format, digest } => output::status(&c.status(digest).await?, format),
        ClusterCmd::Members { format } => output::members(&c.status(false).await?.members, format),
        ClusterCmd::Join { node_id, node_addr } => {
            let r = c.join(node_id, node_addr).await?;
            println!("node {node_id} joined cluster {}", r.cluster_id);
            output::members(&r.members, Format::Table)
        }
        ClusterCmd::Leave => {
            // Which node leaves must not depend on which member answers.
            if !c.is_single() {
                return Err(Failure::new(
                    "cluster leave removes the node at --addr: give that one address, not a list",
                ));
            }
            let id = c.status(false).await?.node_id;
            let r = c.leave().await?;
            println!("node {id} left the cluster");
            output::members(&r.members, Format::Table)
        }
        ClusterCmd::SetScheduler { strategy, write } => {
            let req = blixard_proto::SetSchedulerRequest { strategy, request_id: write.id()? };
            let set = c.set_scheduler(req).await?;
            println!("scheduler: {}", set.strategy);
            Ok(())
        }
        ClusterCmd::SetNodeTimeout { timeout_ms, write } => {
            let req = blixard_proto::SetNodeTimeoutRequest { timeout_ms, request_id: write.id()? };
            let set = c.set_node_timeout(req).await?;
            println!("node timeout: {}", output::seconds(set.timeout_ms));
            Ok(())
        }
        ClusterCmd::Remove { node_id } => {
            let r = c.remove(node_id).await?;
            println!("node {node_id} removed");
            output::members(&r.members, Format::Table)
        }
    }
}

async fn vm(addr: &str, cmd: VmCmd) -> Result<(), Failure> {
    let mut c = client::Client::new(client::parse_members(addr)?);
    match cmd {
        VmCmd::Create(args) => create::run(&mut c, *args).await,
        VmCmd::Get { name, read } => output::vm(&c.get_vm(name, read.stale).await?, read.format),
        VmCmd::Status { name, read } => {
            let vm = c.get_vm(name.clone(), read.stale).await?;
            // An unplaced (queued) VM is on no node to ask.
            let local = if vm.node_id == 0 { None } else { lifecycle::local_view(&mut c, &vm).await };
            output::vm_status(&vm, local.as_ref(), read.format)
        }
        VmCmd::List { node, watch: true, read } => {
            events::watch_vms(&mut c, node.unwrap_or(0), read.stale, read.format).await
        }
        VmCmd::List { node, watch: false, read } => {
            output::vms(&c.list_vms(node.unwrap_or(0), read.stale).await?, read.format)
        }
        VmCmd::Start { name, wait, write } => {
            lifecycle::set_desired(&mut c, client::Desire::Start, name, wait, &write.id()?).await
        }
        VmCmd::Stop { name, wait, write } => {
            lifecycle::set_desired(&mut c, client::Desire::Stop, name, wait, &write.id()?).await
        }
        VmCmd::Restart { name, wait, write } => {
            lifecycle::set_desired(&mut c, client::Desire::Restart, name, wait, &write.id()?).await
        }
        VmCmd::Migrate { name, to, wait, write } => {
            moves::migrate(&mut c, name, to, wait, &write.id()?).await
        }
        VmCmd::Delete { name, wait, write } => lifecycle::delete(&mut c, name, wait, &write.id()?).await,
        VmCmd::Logs { name, follow } => lifecycle::logs(&mut c, name, follow).await,
        VmCmd::Console { name, idle_timeout } => {
            let idle = std::time::Duration::try_from_secs_f64(idle_timeout)
                .map_err(|_| Failure::new(format!("invalid --idle-timeout {idle_timeout}")))?;
            console::run(&mut c, name, idle).await
        }
    }
}

/// `--data-dir` default for node `id`.
pub fn default_data_dir(id: u64) -> PathBuf {
    PathBuf::from("blixard-data").join(format!("node-{id}"))
}

/// `blixard fence-guard`: blocks until there is nothing left to guard.
async fn fence_guard(args: FenceGuardArgs) -> Result<(), Failure> {
    tokio::task::spawn_blocking(move || blixard_vm::guard::run(&args.root, args.node_pid))
        .await
        .map_err(|e| Failure::new(format!("fence guard task: {e}")))?
        .map_err(|e| Failure::new(format!("fence guard: {e}")))
}

#[cfg(test)]
mod tests {
    use super::parse_seconds;

    /// The option number `tune_allocator` sets is mimalloc's purge delay:
    /// read before anything sets it, it holds that option's default, 1,000
    /// ms (no neighbouring option defaults to it). Fails if the bundled
    /// mimalloc renumbers its options, or if MIMALLOC_PURGE_DELAY is set.
    #[cfg(not(madsim))]
    #[test]
    fn the_allocator_option_set_is_the_purge_delay() {
        assert_eq!(unsafe { libmimalloc_sys::mi_option_get(super::MI_OPTION_PURGE_DELAY) }, 1000);
    }

    #[test]
    fn seconds_parse_to_milliseconds() {
        assert_eq!(parse_seconds("4"), Ok(4000));
        assert_eq!(parse_seconds("2.5"), Ok(2500));
        assert_eq!(parse_seconds("0.125"), Ok(125));
        assert_eq!(parse_seconds("10."), Ok(10_000));
        for bad in ["", ".5", "1.2345", "-1", "1e3", "2s", "1.-5", "99999999999999999999"] {
            assert!(parse_seconds(bad).is_err(), "{bad:?}");
        }
    }
}
