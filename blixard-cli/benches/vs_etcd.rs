//! Blixard against etcd on the same machine (and a memory bound check).
//!
//! Starts a 3-member etcd cluster (`/usr/bin/etcd`, default settings, fresh
//! data dirs) and a 3-node Blixard (`blixard up --vm-backend process
//! --metrics false`, the capacity flags of docs/PERFORMANCE.md (c)) side by
//! side on loopback, both with their data under $TMPDIR (default /tmp),
//! then drives both with ONE closed-loop load generator: C clients, one
//! gRPC connection each, every client writing as fast as its last write
//! returns; a warm-up (not measured), then a measured window in which every
//! write that completes counts, with its latency. The generator is generic
//! over the operation:
//! - etcd: `etcdserverpb.KV/Put`, a 256-byte value under the client's own key;
//! - Blixard: what `blixard bench` does: create a stopped 1-vCPU/16-MiB VM,
//!   then delete it; each create and each delete is one write.
//!
//! Each level runs via the leader or via a follower (found again before every
//! run), for R rounds, etcd then Blixard within a round; the table gives the
//! medians over the rounds. A failed write counts as an error, not a write.
//! A second table gives what a write cost in CPU: user + system time of the
//! cluster's processes and of the generator over the measured window (from
//! /proc/PID/stat), per write, and the machine's busy share (/proc/stat).
//!
//! `--rss-writes N` instead starts only Blixard, drives 256 clients through
//! its leader until N writes are done and samples every node's resident
//! memory after 10 000 writes and then every 100 000; it exits nonzero if any
//! node ends more than 10 MiB above its 10 000-write sample.
//!
//! A bench binary: it prints figures and asserts nothing about time.
//! Run: `scripts/bench-vs-etcd [FLAGS]`, or
//! `cargo bench -p blixard-cli --bench vs_etcd -- [FLAGS]` (`--help` lists them).
use std::future::Future;
use std::io::Read;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};
use blixard_proto as pb;
use blixard_proto::cluster_service_client::ClusterServiceClient;
use blixard_proto::vm_service_client::VmServiceClient;
use serde_json::json;
use tonic::codegen::http::uri::PathAndQuery;
use tonic::transport::{Channel, Endpoint};
use tonic::{Request, Status};

const DEFAULT_BLIXARD: &str = env!("CARGO_BIN_EXE_blixard");
const DEFAULT_ETCD: &str = "/usr/bin/etcd";
const VALUE_BYTES: usize = 256;
/// RSS mode: the first sample, the interval between the later ones, and
/// how far above the first sample a node may end.
const RSS_FIRST: u64 = 10_000;
const RSS_EVERY: u64 = 100_000;
const RSS_LIMIT_MIB: f64 = 10.0;

const USAGE: &str = "\
cargo bench -p blixard-cli --bench vs_etcd -- [FLAGS]

  --seconds S        measured seconds per run (default 10; env BLIXARD_BENCH_SECONDS)
  --warmup S         warm-up seconds before each run, not measured (default 2)
  --rounds N         rounds per level (default 3; env BLIXARD_BENCH_ROUNDS)
  --leader LEVELS    client counts via the leader, comma separated (default 1,16,256)
  --follower LEVELS  client counts via a follower (default 1,16,256; `none` for none)
  --only etcd|blixard  run one side only (for profiling it)
  --blixard PATH     the blixard binary (default: the release build cargo made)
  --etcd PATH        the etcd binary (default /usr/bin/etcd)
  --json             also print the results as one JSON object
  --rss-writes N     memory check instead: Blixard only, 256 clients via the
                     leader until N writes (N >= 10000); RSS per node
  --rss-clients C    clients for --rss-writes (default 256)";

// ---------------------------------------------------------------- arguments

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum System {
    Etcd,
    Blixard,
}

impl System {
    fn name(self) -> &'static str {
        match self {
            System::Etcd => "etcd",
            System::Blixard => "Blixard",
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Via {
    Leader,
    Follower,
}

impl Via {
    fn name(self) -> &'static str {
        match self {
            Via::Leader => "leader",
            Via::Follower => "follower",
        }
    }
}

struct Args {
    seconds: f64,
    warmup: f64,
    rounds: usize,
    leader: Vec<usize>,
    follower: Vec<usize>,
    only: Option<System>,
    blixard: PathBuf,
    etcd: PathBuf,
    json: bool,
    rss_writes: Option<u64>,
    rss_clients: usize,
}

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn levels(s: &str) -> anyhow::Result<Vec<usize>> {
    if s == "none" || s.is_empty() {
        return Ok(Vec::new());
    }
    s.split(',')
        .map(|p| match p.trim().parse::<usize>() {
            Ok(n) if n > 0 => Ok(n),
            _ => Err(anyhow!("bad client count {p:?} in {s:?}: positive integers separated by commas")),
        })
        .collect()
}

fn positive_secs(flag: &str, s: &str, allow_zero: bool) -> anyhow::Result<f64> {
    match s.parse::<f64>() {
        Ok(v) if v.is_finite() && (v > 0.0 || (allow_zero && v == 0.0)) => Ok(v),
        _ => bail!(
            "{flag} needs a {} number of seconds, got {s:?}",
            if allow_zero { "non-negative" } else { "positive" }
        ),
    }
}

fn parse_args() -> anyhow::Result<Option<Args>> {
    let mut a = Args {
        seconds: env_or("BLIXARD_BENCH_SECONDS", 10.0),
        warmup: 2.0,
        rounds: env_or("BLIXARD_BENCH_ROUNDS", 3),
        leader: vec![1, 16, 256],
        follower: vec![1, 16, 256],
        only: None,
        blixard: PathBuf::from(DEFAULT_BLIXARD),
        etcd: PathBuf::from(DEFAULT_ETCD),
        json: false,
        rss_writes: None,
        rss_clients: 256,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        // `cargo bench` appends --bench to a harness = false bench's arguments.
        if flag == "--bench" {
            continue;
        }
        if flag == "-h" || flag == "--help" {
            println!("{USAGE}");
            return Ok(None);
        }
        if flag == "--json" {
            a.json = true;
            continue;
        }
        let (flag, value) = match flag.split_once('=') {
            Some((f, v)) => (f.to_string(), v.to_string()),
            None => {
                let v = it.next().ok_or_else(|| anyhow!("{flag} needs a value\n\n{USAGE}"))?;
                (flag, v)
            }
        };
        match flag.as_str() {
            "--seconds" => a.seconds = positive_secs("--seconds", &value, false)?,
            "--warmup" => a.warmup = positive_secs("--warmup", &value, true)?,
            "--rounds" => {
                a.rounds =
                    value.parse().ok().filter(|n| *n > 0).ok_or_else(|| anyhow!("--rounds: {value:?}"))?
            }
            "--leader" => a.leader = levels(&value)?,
            "--follower" => a.follower = levels(&value)?,
            "--only" => {
                a.only = Some(match value.to_ascii_lowercase().as_str() {
                    "etcd" => System::Etcd,
                    "blixard" => System::Blixard,
                    _ => bail!("--only takes etcd or blixard, got {value:?}"),
                })
            }
            "--blixard" => a.blixard = PathBuf::from(value),
            "--etcd" => a.etcd = PathBuf::from(value),
            "--rss-writes" => {
                let n =
                    value.replace('_', "").parse::<u64>().map_err(|_| anyhow!("--rss-writes: {value:?}"))?;
                if n < RSS_FIRST {
                    bail!("--rss-writes must be at least {RSS_FIRST} (the first sample is taken there)");
                }
                a.rss_writes = Some(n);
            }
            "--rss-clients" => {
                a.rss_clients = value
                    .parse()
                    .ok()
                    .filter(|n| *n > 0)
                    .ok_or_else(|| anyhow!("--rss-clients: {value:?}"))?
            }
            _ => bail!("unknown flag {flag}\n\n{USAGE}"),
        }
    }
    if a.rss_writes.is_none() && a.leader.is_empty() && a.follower.is_empty() {
        bail!("no levels to run: --leader and --follower are both empty");
    }
    Ok(Some(a))
}

// ---------------------------------------------------------------- processes

/// A loopback port nobody listens on right now.
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// N distinct free ports (all held open until chosen, so none repeats).
fn free_ports(n: usize) -> Vec<u16> {
    let held: Vec<_> = (0..n).map(|_| std::net::TcpListener::bind("127.0.0.1:0").unwrap()).collect();
    held.iter().map(|l| l.local_addr().unwrap().port()).collect()
}

/// A port P with P, P+1, ..., P+n-1 all free (for `up --base-port`).
fn free_port_run(n: u16) -> anyhow::Result<u16> {
    for _ in 0..100 {
        let p = free_port();
        if p.checked_add(n).is_none() {
            continue;
        }
        let held: Vec<_> =
            (0..n).filter_map(|i| std::net::TcpListener::bind(("127.0.0.1", p + i)).ok()).collect();
        if held.len() == n as usize {
            return Ok(p);
        }
    }
    bail!("found no {n} consecutive free loopback ports")
}

fn tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let v: Vec<&str> = text.lines().collect();
    let from = v.len().saturating_sub(lines);
    format!("---- {} (last {lines} lines)\n{}", path.display(), v[from..].join("\n"))
}

fn log_file(path: &Path) -> anyhow::Result<std::fs::File> {
    std::fs::File::create(path).with_context(|| format!("create {}", path.display()))
}

/// A channel of its own to `addr` (one per client: one HTTP/2 connection).
/// Both systems get exactly this: TCP_NODELAY, tonic's defaults otherwise.
/// (`blixard bench` also pings every second; etcd's server would answer
/// pings that frequent with GOAWAY, its minimum is 5 s, so neither pings.)
async fn connect(addr: &str) -> anyhow::Result<Channel> {
    Endpoint::from_shared(format!("http://{addr}"))?
        .tcp_nodelay(true)
        .connect_timeout(Duration::from_secs(5))
        .connect()
        .await
        .with_context(|| format!("connect to {addr}"))
}

/// The etcd cluster this bench started: killed by pid, its data removed,
/// when dropped (also on an error or a panic).
struct Etcd {
    procs: Vec<Child>,
    clients: Vec<String>,
    logs: Vec<PathBuf>,
    _dir: tempfile::TempDir,
}

impl Drop for Etcd {
    fn drop(&mut self) {
        for c in &mut self.procs {
            let _ = c.kill();
            let _ = c.wait();
        }
        // `_dir` (the data dirs and logs) is removed after this.
    }
}

impl Etcd {
    async fn start(bin: &Path) -> anyhow::Result<Etcd> {
        let dir = tempfile::Builder::new().prefix("vs-etcd-etcd-").tempdir()?;
        let ports = free_ports(6);
        let (client_ports, peer_ports) = ports.split_at(3);
        let initial: Vec<String> =
            (0..3).map(|i| format!("m{}=http://127.0.0.1:{}", i + 1, peer_ports[i])).collect();
        let token = format!("vs-etcd-{}", std::process::id());
        let mut etcd = Etcd { procs: Vec::new(), clients: Vec::new(), logs: Vec::new(), _dir: dir };
        for i in 0..3 {
            let data = etcd._dir.path().join(format!("m{}", i + 1));
            let log = etcd._dir.path().join(format!("m{}.log", i + 1));
            let client = format!("127.0.0.1:{}", client_ports[i]);
            let peer = format!("http://127.0.0.1:{}", peer_ports[i]);
            let out = log_file(&log)?;
            let child = Command::new(bin)
                .args(["--name", &format!("m{}", i + 1)])
                .arg("--data-dir")
                .arg(&data)
                .args(["--listen-client-urls", &format!("http://{client}")])
                .args(["--advertise-client-urls", &format!("http://{client}")])
                .args(["--listen-peer-urls", &peer])
                .args(["--initial-advertise-peer-urls", &peer])
                .args(["--initial-cluster", &initial.join(",")])
                .args(["--initial-cluster-state", "new", "--initial-cluster-token", &token])
                .args(["--logger", "zap", "--log-outputs", "stderr", "--log-level", "error"])
                .stdin(Stdio::null())
                .stdout(out.try_clone()?)
                .stderr(out)
                // Its own process group: a Ctrl-C at the terminal reaches
                // only this bench, which then stops it.
                .process_group(0)
                .spawn()
                .with_context(|| format!("start {}", bin.display()))?;
            etcd.procs.push(child);
            etcd.clients.push(client);
            etcd.logs.push(log);
        }
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            for (i, c) in etcd.procs.iter_mut().enumerate() {
                if let Some(status) = c.try_wait()? {
                    bail!("etcd member m{} exited ({status})\n{}", i + 1, tail(&etcd.logs[i], 30));
                }
            }
            if etcd.leader().await.is_ok() {
                return Ok(etcd);
            }
            if Instant::now() > deadline {
                let logs: Vec<String> = etcd.logs.iter().map(|l| tail(l, 20)).collect();
                bail!("etcd did not elect a leader within 30s\n{}", logs.join("\n"));
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// The members' pids (CPU accounting).
    fn pids(&self) -> Vec<u32> {
        self.procs.iter().map(Child::id).collect()
    }

    /// (leader's client address, a follower's), from Maintenance/Status on
    /// every member; every member must agree on the leader.
    async fn leader(&self) -> anyhow::Result<(String, String)> {
        let mut ids = Vec::new();
        let mut leaders = Vec::new();
        for addr in &self.clients {
            let s = etcd_status(addr).await?;
            ids.push(s.header.map(|h| h.member_id).unwrap_or(0));
            leaders.push(s.leader);
        }
        let leader = leaders[0];
        if leader == 0 || leaders.iter().any(|l| *l != leader) {
            bail!("no agreed etcd leader yet ({leaders:?})");
        }
        let li =
            ids.iter().position(|id| *id == leader).ok_or_else(|| anyhow!("etcd leader not a member"))?;
        let fi = (0..ids.len()).find(|i| *i != li).unwrap();
        Ok((self.clients[li].clone(), self.clients[fi].clone()))
    }
}

/// The `blixard up` this bench started. Dropping it sends `up` SIGTERM
/// (which stops its nodes), then kills whatever is left by pid.
struct Blixard {
    up: Child,
    /// (node id, pid, address) as `up` printed them.
    nodes: Vec<(u64, i32, String)>,
    dir: tempfile::TempDir,
}

impl Drop for Blixard {
    fn drop(&mut self) {
        // SAFETY: a signal to our own child process.
        unsafe {
            libc::kill(self.up.id() as libc::pid_t, libc::SIGTERM);
        }
        let deadline = Instant::now() + Duration::from_secs(15);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.up.try_wait() {
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.up.kill();
        let _ = self.up.wait();
        // Nodes `up` could not stop: only if the pid still runs a node of
        // this bench's data dir (not a reused pid).
        let dir = self.dir.path().to_string_lossy().to_string();
        for (_, pid, _) in &self.nodes {
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            if String::from_utf8_lossy(&cmdline).contains(&dir) {
                // SAFETY: a node process this bench's `up` started.
                unsafe {
                    libc::kill(*pid, libc::SIGKILL);
                }
            }
        }
    }
}

impl Blixard {
    async fn start(bin: &Path) -> anyhow::Result<Blixard> {
        if !bin.exists() {
            bail!(
                "no blixard binary at {} (cargo build --release -p blixard-cli, or --blixard PATH)",
                bin.display()
            );
        }
        let dir = tempfile::Builder::new().prefix("vs-etcd-blixard-").tempdir()?;
        let base = free_port_run(3)?;
        let out_path = dir.path().join("up.out");
        let out = log_file(&out_path)?;
        let up = Command::new(bin)
            .args(["up", "--nodes", "3", "--base-port", &base.to_string(), "--data-dir"])
            .arg(dir.path())
            .args(["--vcpus", "4096", "--memory-mb", "4194304", "--disk-gb", "100000"])
            .args(["--vm-backend", "process", "--metrics", "false"])
            .env("RUST_LOG", "info,openraft=warn")
            // `up` writes its CLI context here, not into the user's config.
            .env("BLIXARD_CONFIG", dir.path().join("config.toml"))
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .process_group(0)
            .spawn()
            .with_context(|| format!("start {} up", bin.display()))?;
        let mut b = Blixard { up, nodes: Vec::new(), dir };
        let deadline = Instant::now() + Duration::from_secs(150);
        loop {
            let text = std::fs::read_to_string(&out_path).unwrap_or_default();
            // `up` prints "node 2: 127.0.0.1:P  pid N  data ..." per node.
            b.nodes = text
                .lines()
                .filter_map(|l| {
                    let rest = l.strip_prefix("node ")?;
                    let (id, rest) = rest.split_once(": ")?;
                    let mut w = rest.split_whitespace();
                    let addr = w.next()?.to_string();
                    (w.next()? == "pid").then_some(())?;
                    Some((id.parse().ok()?, w.next()?.parse().ok()?, addr))
                })
                .collect();
            if text.contains("cluster of 3 nodes is up") {
                break;
            }
            if let Some(status) = b.up.try_wait()? {
                bail!("blixard up exited ({status})\n{}\n{}", tail(&out_path, 30), b.node_logs());
            }
            if Instant::now() > deadline {
                bail!("blixard up: no cluster within 150s\n{}\n{}", tail(&out_path, 30), b.node_logs());
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        if b.nodes.len() != 3 {
            bail!("expected 3 node lines from blixard up, got {}:\n{}", b.nodes.len(), tail(&out_path, 30));
        }
        let token = std::fs::read_to_string(b.dir.path().join("node-1").join("admin-token"))
            .context("node 1's admin token")?;
        let bearer = blixard_core::auth::Bearer::new(&token).context("node 1's admin token")?;
        let _ = BEARER.set(bearer);
        Ok(b)
    }

    fn node_logs(&self) -> String {
        (1..=3)
            .map(|i| tail(&self.dir.path().join(format!("node-{i}.log")), 15))
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// The nodes' pids (CPU accounting; `up` itself only waits).
    fn pids(&self) -> Vec<u32> {
        self.nodes.iter().map(|&(_, pid, _)| pid as u32).collect()
    }

    /// (leader's address, a follower's), asking every node which it is.
    async fn leader(&self) -> anyhow::Result<(String, String)> {
        let mut leader = None;
        let mut follower = None;
        for (_, _, addr) in &self.nodes {
            let mut c = ClusterServiceClient::with_interceptor(connect(addr).await?, bearer()?);
            let s = c.status(pb::StatusRequest::default()).await?.into_inner();
            match s.state.as_str() {
                "leader" => leader = Some(addr.clone()),
                "follower" if follower.is_none() => follower = Some(addr.clone()),
                _ => {}
            }
        }
        match (leader, follower) {
            (Some(l), Some(f)) => Ok((l, f)),
            _ => bail!("Blixard has no leader and follower right now"),
        }
    }

    /// The node that leads (its id).
    async fn leader_id(&self) -> anyhow::Result<u64> {
        let (addr, _) = self.leader().await?;
        Ok(self.nodes.iter().find(|n| n.2 == addr).map(|n| n.0).unwrap_or(0))
    }
}

// ---------------------------------------------------------------- etcd's wire types

/// etcd's `etcdserverpb.ResponseHeader`.
#[derive(Clone, PartialEq, prost::Message)]
struct ResponseHeader {
    #[prost(uint64, tag = "1")]
    cluster_id: u64,
    #[prost(uint64, tag = "2")]
    member_id: u64,
    #[prost(int64, tag = "3")]
    revision: i64,
    #[prost(uint64, tag = "4")]
    raft_term: u64,
}

/// etcd's `etcdserverpb.PutRequest`.
#[derive(Clone, PartialEq, prost::Message)]
struct PutRequest {
    #[prost(bytes = "vec", tag = "1")]
    key: Vec<u8>,
    #[prost(bytes = "vec", tag = "2")]
    value: Vec<u8>,
    #[prost(int64, tag = "3")]
    lease: i64,
    #[prost(bool, tag = "4")]
    prev_kv: bool,
    #[prost(bool, tag = "5")]
    ignore_value: bool,
    #[prost(bool, tag = "6")]
    ignore_lease: bool,
}

/// etcd's `etcdserverpb.PutResponse` (prev_kv, field 2, is never asked for).
#[derive(Clone, PartialEq, prost::Message)]
struct PutResponse {
    #[prost(message, optional, tag = "1")]
    header: Option<ResponseHeader>,
}

/// etcd's `etcdserverpb.StatusRequest` (empty).
#[derive(Clone, PartialEq, prost::Message)]
struct EtcdStatusRequest {}

/// etcd's `etcdserverpb.StatusResponse`, the fields used here.
#[derive(Clone, PartialEq, prost::Message)]
struct EtcdStatusResponse {
    #[prost(message, optional, tag = "1")]
    header: Option<ResponseHeader>,
    #[prost(string, tag = "2")]
    version: String,
    #[prost(int64, tag = "3")]
    db_size: i64,
    #[prost(uint64, tag = "4")]
    leader: u64,
}

async fn etcd_unary<Req, Resp>(
    grpc: &mut tonic::client::Grpc<Channel>,
    path: &'static str,
    req: Req,
) -> Result<Resp, Status>
where
    Req: prost::Message + Send + Sync + 'static,
    Resp: prost::Message + Default + Send + Sync + 'static,
{
    grpc.ready().await.map_err(|e| Status::unknown(format!("channel not ready: {e}")))?;
    let codec = tonic_prost::ProstCodec::<Req, Resp>::default();
    Ok(grpc.unary(Request::new(req), PathAndQuery::from_static(path), codec).await?.into_inner())
}

async fn etcd_status(addr: &str) -> anyhow::Result<EtcdStatusResponse> {
    let mut grpc = tonic::client::Grpc::new(connect(addr).await?);
    let mut req = Request::new(EtcdStatusRequest {});
    req.set_timeout(Duration::from_secs(2));
    grpc.ready().await.map_err(|e| anyhow!("channel not ready: {e}"))?;
    let codec = tonic_prost::ProstCodec::<EtcdStatusRequest, EtcdStatusResponse>::default();
    let path = PathAndQuery::from_static("/etcdserverpb.Maintenance/Status");
    Ok(grpc.unary(req, path, codec).await?.into_inner())
}

// ---------------------------------------------------------------- the operations

/// One client's writes: each call is one write, timed by the loop.
trait Op: Send + 'static {
    fn write(&mut self) -> impl Future<Output = Result<(), Status>> + Send;
    /// After the run, undo what is left half done (not measured).
    fn finish(&mut self) -> impl Future<Output = ()> + Send {
        async {}
    }
}

/// etcd: Put of a 256-byte value under this client's own key.
struct EtcdPut {
    grpc: tonic::client::Grpc<Channel>,
    key: Vec<u8>,
    value: Vec<u8>,
}

impl Op for EtcdPut {
    async fn write(&mut self) -> Result<(), Status> {
        let req = PutRequest { key: self.key.clone(), value: self.value.clone(), ..Default::default() };
        let _: PutResponse = etcd_unary(&mut self.grpc, "/etcdserverpb.KV/Put", req).await?;
        Ok(())
    }
}

/// Blixard: what `blixard bench` does. Create a stopped VM, then delete it;
/// the calls alternate, each one write.
/// The Blixard cluster's admin token, put on every call.
static BEARER: std::sync::OnceLock<blixard_core::auth::Bearer> = std::sync::OnceLock::new();

fn bearer() -> anyhow::Result<blixard_core::auth::Bearer> {
    BEARER.get().cloned().context("no Blixard cluster started (its admin token is unknown)")
}

type Authed = tonic::service::interceptor::InterceptedService<Channel, blixard_core::auth::Bearer>;

struct VmCreateDelete {
    vms: VmServiceClient<Authed>,
    prefix: String,
    seq: u64,
    /// The VM created and not yet deleted.
    pending: Option<String>,
}

impl Op for VmCreateDelete {
    async fn write(&mut self) -> Result<(), Status> {
        match self.pending.take() {
            None => {
                let name = format!("{}-{}", self.prefix, self.seq);
                self.seq += 1;
                let spec = pb::VmSpec { vcpus: 1, memory_mb: 16, disk_gb: 1, ..Default::default() };
                self.vms
                    .create_vm(pb::CreateVmRequest {
                        name: name.clone(),
                        spec: Some(spec),
                        no_start: true,
                        request_id: String::new(),
                        ..Default::default()
                    })
                    .await?;
                self.pending = Some(name);
            }
            // As in `blixard bench`, a failed delete moves on to a new VM.
            Some(name) => {
                self.vms.delete_vm(pb::DeleteVmRequest { name, request_id: String::new() }).await?;
            }
        }
        Ok(())
    }

    async fn finish(&mut self) {
        if let Some(name) = self.pending.take() {
            let _ = self.vms.delete_vm(pb::DeleteVmRequest { name, request_id: String::new() }).await;
        }
    }
}

/// `clients` operations of `system` against `addr`, each on its own connection.
async fn make_ops(system: System, addr: &str, clients: usize, run: u64) -> anyhow::Result<Vec<AnyOp>> {
    let mut ops = Vec::with_capacity(clients);
    for c in 0..clients {
        let ch = connect(addr).await?;
        ops.push(match system {
            System::Etcd => AnyOp::Etcd(EtcdPut {
                grpc: tonic::client::Grpc::new(ch),
                key: format!("bench/{}/{c}", std::process::id()).into_bytes(),
                value: vec![b'x'; VALUE_BYTES],
            }),
            System::Blixard => AnyOp::Blixard(VmCreateDelete {
                vms: VmServiceClient::with_interceptor(ch, bearer()?),
                prefix: format!("bench-{}-{run}-{c}", std::process::id()),
                seq: 0,
                pending: None,
            }),
        });
    }
    Ok(ops)
}

/// Either operation, so one run's clients are one type.
enum AnyOp {
    Etcd(EtcdPut),
    Blixard(VmCreateDelete),
}

impl Op for AnyOp {
    async fn write(&mut self) -> Result<(), Status> {
        match self {
            AnyOp::Etcd(o) => o.write().await,
            AnyOp::Blixard(o) => o.write().await,
        }
    }

    async fn finish(&mut self) {
        match self {
            AnyOp::Etcd(o) => o.finish().await,
            AnyOp::Blixard(o) => o.finish().await,
        }
    }
}

// ---------------------------------------------------------------- the load loop

/// What one timed run measured.
#[derive(Clone)]
struct Sample {
    writes: u64,
    errors: u64,
    first_error: Option<String>,
    secs: f64,
    p50_ms: f64,
    p99_ms: f64,
    max_ms: f64,
    /// CPU over the measured window, per write; `None` without writes.
    cpu: Option<CpuUse>,
}

/// Where a run's CPU went: the cluster's processes and the load generator,
/// in µs of user + system time per write, and how busy the whole machine
/// was (kernel threads, e.g. block IO completion, included).
#[derive(Clone, Copy)]
struct CpuUse {
    cluster_us: f64,
    generator_us: f64,
    /// Share of all cores' time not idle, 0..1.
    machine_busy: f64,
}

/// CPU clock ticks (user + system) of some processes, of this process, and
/// of the machine (busy, total), read from /proc at one moment.
#[derive(Clone, Copy)]
struct CpuSnap {
    procs: u64,
    own: u64,
    busy: u64,
    total: u64,
}

/// utime + stime of `pid` (all its threads), in clock ticks; `None` if it
/// cannot be read (the process is gone).
fn proc_ticks(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may hold spaces: fields count from after its ')'.
    let (_, rest) = stat.rsplit_once(')')?;
    let f: Vec<&str> = rest.split_whitespace().collect();
    // After ')': state is field 3, utime 14 and stime 15 (proc(5)).
    Some(f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?)
}

impl CpuSnap {
    /// `None` if a process or the machine's counters cannot be read: the
    /// run then reports no CPU figures rather than wrong ones.
    fn take(pids: &[u32]) -> Option<CpuSnap> {
        let stat = std::fs::read_to_string("/proc/stat").ok()?;
        let cpu: Vec<u64> =
            stat.lines().next()?.split_whitespace().skip(1).map(|x| x.parse().unwrap_or(0)).collect();
        // user nice system idle iowait irq softirq steal (guest time is
        // already in user): idle and iowait are idle, and steal (another
        // guest's time) is not this machine's work.
        let at = |i: usize| cpu.get(i).copied().unwrap_or(0);
        let total: u64 = cpu.iter().take(8).sum();
        let mut procs = 0;
        for &p in pids {
            procs += proc_ticks(p)?;
        }
        Some(CpuSnap {
            procs,
            own: proc_ticks(std::process::id())?,
            busy: total.saturating_sub(at(3) + at(4) + at(7)),
            total,
        })
    }

    /// What was used from `self` to `later`, per write.
    fn per_write(&self, later: &CpuSnap, writes: u64) -> Option<CpuUse> {
        // SAFETY: sysconf only reads a configuration value.
        let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
        let us = |ticks: u64| ticks as f64 * 1e6 / hz / writes as f64;
        let total = later.total.saturating_sub(self.total);
        (writes > 0 && total > 0).then(|| CpuUse {
            cluster_us: us(later.procs.saturating_sub(self.procs)),
            generator_us: us(later.own.saturating_sub(self.own)),
            machine_busy: later.busy.saturating_sub(self.busy) as f64 / total as f64,
        })
    }
}

impl Sample {
    fn rate(&self) -> f64 {
        self.writes as f64 / self.secs
    }
}

/// Closed loop: every client writes, waits for the answer, writes again.
/// Writes that complete within [start + warmup, start + warmup + measure)
/// count, with their latency; the others only keep the load on.
/// `pids` are the cluster's processes: their CPU, the generator's and the
/// machine's are read at the window's start and end.
async fn timed_run<O: Op>(
    ops: Vec<O>,
    warmup: Duration,
    measure: Duration,
    pids: Vec<u32>,
) -> anyhow::Result<Sample> {
    let start = Instant::now();
    let from = start + warmup;
    let until = from + measure;
    let cpu = tokio::spawn(async move {
        tokio::time::sleep_until(from.into()).await;
        let a = CpuSnap::take(&pids);
        tokio::time::sleep_until(until.into()).await;
        (a, CpuSnap::take(&pids))
    });
    let tasks: Vec<_> = ops
        .into_iter()
        .map(|mut op| {
            tokio::spawn(async move {
                let mut lat = Vec::with_capacity(1024);
                let mut errors = 0u64;
                let mut first_error = None;
                while Instant::now() < until {
                    let t = Instant::now();
                    let r = op.write().await;
                    let done = Instant::now();
                    if done < from || done >= until {
                        continue;
                    }
                    match r {
                        Ok(()) => lat.push(done - t),
                        Err(s) => {
                            errors += 1;
                            first_error.get_or_insert_with(|| format!("{:?}: {}", s.code(), s.message()));
                        }
                    }
                }
                op.finish().await;
                (lat, errors, first_error)
            })
        })
        .collect();
    let mut all = Vec::new();
    let mut errors = 0;
    let mut first_error = None;
    for t in tasks {
        let (lat, e, fe) = t.await.context("client task")?;
        all.extend(lat);
        errors += e;
        first_error = first_error.or(fe);
    }
    let cpu = match cpu.await.context("CPU sampler")? {
        (Some(a), Some(b)) => a.per_write(&b, all.len() as u64),
        _ => None,
    };
    all.sort_unstable();
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    let pct = |p: f64| {
        all.get(((all.len() as f64 * p) as usize).min(all.len().saturating_sub(1)))
            .copied()
            .unwrap_or_default()
    };
    Ok(Sample {
        writes: all.len() as u64,
        errors,
        first_error,
        secs: measure.as_secs_f64(),
        p50_ms: ms(pct(0.50)),
        p99_ms: ms(pct(0.99)),
        max_ms: ms(all.last().copied().unwrap_or_default()),
        cpu,
    })
}

/// Closed loop until `n` writes succeeded in all (counted in `done`).
async fn counted_run<O: Op>(
    ops: Vec<O>,
    n: u64,
    done: Arc<AtomicU64>,
    errors: Arc<AtomicU64>,
) -> anyhow::Result<()> {
    let tasks: Vec<_> = ops
        .into_iter()
        .map(|mut op| {
            let (done, errors) = (done.clone(), errors.clone());
            tokio::spawn(async move {
                while done.load(Ordering::Relaxed) < n {
                    match op.write().await {
                        Ok(()) => done.fetch_add(1, Ordering::Relaxed),
                        Err(_) => errors.fetch_add(1, Ordering::Relaxed),
                    };
                }
                op.finish().await;
            })
        })
        .collect();
    for t in tasks {
        t.await.context("client task")?;
    }
    Ok(())
}

// ---------------------------------------------------------------- reporting

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

fn git_commit() -> String {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let git = |args: &[&str]| {
        Command::new("git").current_dir(&root).args(args).output().ok().filter(|o| o.status.success())
    };
    let Some(out) = git(&["rev-parse", "--short", "HEAD"]) else { return "unknown".into() };
    let mut c = String::from_utf8_lossy(&out.stdout).trim().to_string();
    if git(&["status", "--porcelain", "--untracked-files=no"]).is_some_and(|o| !o.stdout.is_empty()) {
        c.push_str(" (with uncommitted changes)");
    }
    c
}

fn cpu_model() -> String {
    let info = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = info
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split_once(':'))
        .map(|(_, m)| m.trim().to_string())
        .unwrap_or_else(|| "unknown CPU".into());
    let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0);
    format!("{model}, {cores} cores")
}

/// The 1-minute load average (the machine may be shared).
fn load_avg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|l| l.split_whitespace().next().map(str::to_string))
        .unwrap_or_else(|| "?".into())
}

/// The file system type under `dir` (fsync on tmpfs costs nothing).
fn fs_type(dir: &Path) -> String {
    use std::os::unix::ffi::OsStrExt;
    let Ok(path) = std::ffi::CString::new(dir.as_os_str().as_bytes()) else { return "?".into() };
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: a valid NUL-terminated path and a valid out pointer.
    if unsafe { libc::statfs(path.as_ptr(), &mut st) } != 0 {
        return "?".into();
    }
    match st.f_type as u64 {
        0xEF53 => "ext4".into(),
        0x01021994 => "tmpfs (fsync is free!)".into(),
        0x58465342 => "xfs".into(),
        0x9123683E => "btrfs".into(),
        0x794c7630 => "overlayfs".into(),
        t => format!("fs type {t:#x}"),
    }
}

fn etcd_version(bin: &Path) -> String {
    Command::new(bin)
        .arg("--version")
        .output()
        .ok()
        .and_then(|o| {
            String::from_utf8_lossy(&o.stdout).lines().next().map(|l| l.trim().replace("Version: ", ""))
        })
        .unwrap_or_else(|| "etcd ?".into())
}

fn fmt_sample(s: &Sample) -> String {
    let mut t =
        format!("{:.0} w/s (p50 {:.2} / p99 {:.2} / max {:.1} ms", s.rate(), s.p50_ms, s.p99_ms, s.max_ms);
    t.push_str(&format!(", {} writes, {} errors)", s.writes, s.errors));
    if let Some(c) = &s.cpu {
        t.push_str(&format!(
            " · CPU per write: cluster {:.0} µs, generator {:.0} µs; machine {:.0} % busy",
            c.cluster_us,
            c.generator_us,
            c.machine_busy * 100.0
        ));
    }
    if let Some(e) = &s.first_error {
        t.push_str(&format!(" first error: {e}"));
    }
    t
}

fn sample_json(s: &Sample) -> serde_json::Value {
    json!({"writes": s.writes, "errors": s.errors, "seconds": s.secs, "writes_per_sec": s.rate(),
           "p50_ms": s.p50_ms, "p99_ms": s.p99_ms, "max_ms": s.max_ms, "first_error": s.first_error,
           "cpu": s.cpu.map(|c| json!({"cluster_us_per_write": c.cluster_us,
                                       "generator_us_per_write": c.generator_us,
                                       "machine_busy": c.machine_busy}))})
}

// ---------------------------------------------------------------- the comparison

/// Medians of each CPU figure over the rounds that have them.
fn median_cpu(v: &[Sample]) -> Option<CpuUse> {
    let c: Vec<CpuUse> = v.iter().filter_map(|s| s.cpu).collect();
    (!c.is_empty()).then(|| CpuUse {
        cluster_us: median(c.iter().map(|c| c.cluster_us).collect()),
        generator_us: median(c.iter().map(|c| c.generator_us).collect()),
        machine_busy: median(c.iter().map(|c| c.machine_busy).collect()),
    })
}

/// The second table: what each write cost in CPU, for both systems.
fn print_cpu(results: &[LevelResult]) {
    println!();
    println!(
        "CPU per write over the measured windows (medians; user + system time of the cluster's \
         processes and of the load generator, and the machine's busy share of all its cores):"
    );
    println!();
    println!("| clients | etcd cluster / generator µs | Blixard cluster / generator µs | machine busy, etcd / Blixard |");
    println!("|---|---|---|---|");
    let us = |c: Option<CpuUse>| match c {
        Some(c) => format!("{:.0} / {:.0}", c.cluster_us, c.generator_us),
        None => "–".into(),
    };
    let busy = |c: Option<CpuUse>| match c {
        Some(c) => format!("{:.0} %", c.machine_busy * 100.0),
        None => "–".into(),
    };
    for l in results {
        let (e, b) = (median_cpu(&l.rounds[0]), median_cpu(&l.rounds[1]));
        println!("| {}, {} | {} | {} | {} / {} |", l.clients, l.via.name(), us(e), us(b), busy(e), busy(b));
    }
}

struct LevelResult {
    clients: usize,
    via: Via,
    /// Per system (etcd, Blixard): one sample per round.
    rounds: [Vec<Sample>; 2],
}

async fn compare(args: &Args) -> anyhow::Result<ExitCode> {
    let want = |s: System| args.only.is_none_or(|o| o == s);
    if want(System::Etcd) && !args.etcd.exists() {
        bail!(
            "{} not found: this bench needs etcd. Install it with `apt-get install etcd-server` \
             (Debian bookworm: etcd 3.4.23), or run scripts/bench-vs-etcd, which does; or pass --etcd PATH",
            args.etcd.display()
        );
    }
    let tmp = std::env::temp_dir();
    println!(
        "commit {} · {} (load avg {} at start) · {} · data dirs under {} ({})",
        git_commit(),
        cpu_model(),
        load_avg(),
        if want(System::Etcd) { etcd_version(&args.etcd) } else { "etcd not run".into() },
        tmp.display(),
        fs_type(&tmp)
    );
    let etcd = if want(System::Etcd) { Some(Etcd::start(&args.etcd).await?) } else { None };
    let blixard = if want(System::Blixard) { Some(Blixard::start(&args.blixard).await?) } else { None };
    println!(
        "3-member etcd ({}) and 3-node Blixard ({}) on loopback; {} round(s) per level, \
         {}s warm-up + {}s measured per run, etcd then Blixard; one connection per client",
        etcd.as_ref().map(|e| e.clients.join(" ")).unwrap_or_else(|| "not run".into()),
        blixard
            .as_ref()
            .map(|b| b.nodes.iter().map(|n| n.2.clone()).collect::<Vec<_>>().join(" "))
            .unwrap_or_else(|| "not run".into()),
        args.rounds,
        args.warmup,
        args.seconds
    );
    println!("etcd: Put of a {VALUE_BYTES}-byte value, one key per client; Blixard: create a stopped VM, delete it (2 writes)");
    println!();
    let plan: Vec<(usize, Via)> = args
        .leader
        .iter()
        .map(|&c| (c, Via::Leader))
        .chain(args.follower.iter().map(|&c| (c, Via::Follower)))
        .collect();
    let warmup = Duration::from_secs_f64(args.warmup);
    let measure = Duration::from_secs_f64(args.seconds);
    let mut results = Vec::new();
    let mut run = 0u64;
    for &(clients, via) in &plan {
        let mut level = LevelResult { clients, via, rounds: [Vec::new(), Vec::new()] };
        for r in 0..args.rounds {
            for (i, system) in [System::Etcd, System::Blixard].into_iter().enumerate() {
                let ((leader, follower), pids) = match system {
                    System::Etcd => match &etcd {
                        Some(e) => (e.leader().await?, e.pids()),
                        None => continue,
                    },
                    System::Blixard => match &blixard {
                        Some(b) => (b.leader().await?, b.pids()),
                        None => continue,
                    },
                };
                let target = if via == Via::Leader { leader } else { follower };
                run += 1;
                let ops = make_ops(system, &target, clients, run).await?;
                let s = timed_run(ops, warmup, measure, pids).await?;
                println!(
                    "round {} · {clients:>3} clients via {:<8} · {:<7} at {target}: {}",
                    r + 1,
                    via.name(),
                    system.name(),
                    fmt_sample(&s)
                );
                level.rounds[i].push(s);
            }
        }
        results.push(level);
    }
    println!();
    println!("medians over {} round(s):", args.rounds);
    println!();
    println!("| clients | etcd writes/s (p50 / p99 ms) | Blixard writes/s (p50 / p99 ms) | Blixard / etcd |");
    println!("|---|---|---|---|");
    let med = |v: &[Sample]| -> Option<(f64, f64, f64)> {
        (!v.is_empty()).then(|| {
            (
                median(v.iter().map(Sample::rate).collect()),
                median(v.iter().map(|s| s.p50_ms).collect()),
                median(v.iter().map(|s| s.p99_ms).collect()),
            )
        })
    };
    let cell = |m: Option<(f64, f64, f64)>| match m {
        Some((w, p50, p99)) => format!("{w:.0} ({p50:.2} / {p99:.2})"),
        None => "–".into(),
    };
    for l in &results {
        let (e, b) = (med(&l.rounds[0]), med(&l.rounds[1]));
        let ratio = match (e, b) {
            (Some(e), Some(b)) if e.0 > 0.0 => format!("{:.2}×", b.0 / e.0),
            _ => "–".into(),
        };
        println!("| {}, {} | {} | {} | {ratio} |", l.clients, l.via.name(), cell(e), cell(b));
    }
    print_cpu(&results);
    let errors: u64 = results.iter().flat_map(|l| l.rounds.iter().flatten()).map(|s| s.errors).sum();
    if errors > 0 {
        println!("\n{errors} write(s) failed in all (see the rounds above); failed writes are not counted");
    }
    if args.json {
        let levels: Vec<_> = results
            .iter()
            .map(|l| {
                let side = |v: &[Sample]| {
                    let m = med(v);
                    let c = median_cpu(v);
                    json!({
                        "rounds": v.iter().map(sample_json).collect::<Vec<_>>(),
                        "median_writes_per_sec": m.map(|m| m.0),
                        "median_p50_ms": m.map(|m| m.1),
                        "median_p99_ms": m.map(|m| m.2),
                        "median_cluster_cpu_us_per_write": c.map(|c| c.cluster_us),
                        "median_generator_cpu_us_per_write": c.map(|c| c.generator_us),
                        "median_machine_busy": c.map(|c| c.machine_busy),
                    })
                };
                json!({"clients": l.clients, "via": l.via.name(),
                       "etcd": side(&l.rounds[0]), "blixard": side(&l.rounds[1])})
            })
            .collect();
        let doc = json!({
            "commit": git_commit(), "cpu": cpu_model(),
            "etcd_version": want(System::Etcd).then(|| etcd_version(&args.etcd)),
            "seconds": args.seconds, "warmup": args.warmup, "rounds": args.rounds, "levels": levels,
        });
        println!("\n{doc}");
    }
    drop(blixard);
    drop(etcd);
    Ok(ExitCode::SUCCESS)
}

// ---------------------------------------------------------------- the memory check

/// VmRSS of `pid` in MiB.
fn rss_mib(pid: i32) -> anyhow::Result<f64> {
    let mut text = String::new();
    std::fs::File::open(format!("/proc/{pid}/status"))
        .and_then(|mut f| f.read_to_string(&mut text))
        .with_context(|| format!("read /proc/{pid}/status (did the node exit?)"))?;
    let kb: f64 = text
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| anyhow!("no VmRSS for pid {pid}"))?;
    Ok(kb / 1024.0)
}

async fn rss_check(args: &Args, n: u64) -> anyhow::Result<ExitCode> {
    println!("commit {} · {} (load avg {} at start)", git_commit(), cpu_model(), load_avg());
    let b = Blixard::start(&args.blixard).await?;
    let up_pid = b.up.id() as i32;
    for (id, pid, _) in &b.nodes {
        // The node processes are `up`'s children.
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        let ppid: i32 =
            stat.rsplit_once(')').and_then(|(_, r)| r.split_whitespace().nth(1)?.parse().ok()).unwrap_or(0);
        if ppid != up_pid {
            bail!("node {id} (pid {pid}) is not a child of blixard up (pid {up_pid}; its parent is {ppid})");
        }
    }
    let (leader, _) = b.leader().await?;
    let leader_id = b.leader_id().await?;
    let clients = args.rss_clients;
    println!(
        "3-node Blixard; {clients} clients via the leader (node {leader_id}, {leader}) create and delete \
         stopped VMs until {n} writes; VmRSS of each node after {RSS_FIRST} writes, then every {RSS_EVERY}"
    );
    let mut marks = vec![RSS_FIRST];
    marks.extend((1..).map(|k| k * RSS_EVERY).take_while(|m| *m < n).filter(|m| *m > RSS_FIRST));
    marks.push(n);
    marks.dedup();
    let done = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(AtomicU64::new(0));
    let ops = make_ops(System::Blixard, &leader, clients, 1).await?;
    let start = Instant::now();
    let load = tokio::spawn(counted_run(ops, n, done.clone(), errors.clone()));
    let ids: Vec<u64> = b.nodes.iter().map(|n| n.0).collect();
    let pids: Vec<i32> = b.nodes.iter().map(|n| n.1).collect();
    let head: Vec<String> = ids
        .iter()
        .map(|i| format!("node {i}{} MiB", if *i == leader_id { " (leader)" } else { "" }))
        .collect();
    let dhead: Vec<String> = ids.iter().map(|i| format!("Δ node {i}")).collect();
    println!();
    println!("| writes done | s | {} | {} |", head.join(" | "), dhead.join(" | "));
    println!("|---|---|{}{}", "---|".repeat(ids.len()), "---|".repeat(ids.len()));
    let mut first: Option<Vec<f64>> = None;
    let mut last = Vec::new();
    let row = |label: String, secs: f64, rss: &[f64], first: &[f64]| {
        let cols: Vec<String> = rss.iter().map(|r| format!("{r:.1}")).collect();
        let deltas: Vec<String> = rss.iter().zip(first).map(|(r, f)| format!("{:+.1}", r - f)).collect();
        println!("| {label} | {secs:.0} | {} | {} |", cols.join(" | "), deltas.join(" | "));
    };
    for &m in &marks {
        loop {
            let d = done.load(Ordering::Relaxed);
            if d >= m {
                break;
            }
            if load.is_finished() {
                bail!("the load ended after {d} of {n} writes");
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let rss = pids.iter().map(|p| rss_mib(*p)).collect::<anyhow::Result<Vec<f64>>>()?;
        let base = first.get_or_insert_with(|| rss.clone()).clone();
        row(done.load(Ordering::Relaxed).to_string(), start.elapsed().as_secs_f64(), &rss, &base);
        last = rss;
    }
    load.await.context("load task")??;
    let elapsed = start.elapsed().as_secs_f64();
    let base = first.unwrap();
    // For information only: after the load stopped and the nodes idled.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let idle = pids.iter().map(|p| rss_mib(*p)).collect::<anyhow::Result<Vec<f64>>>()?;
    row("idle 3 s after the load".into(), start.elapsed().as_secs_f64(), &idle, &base);
    let total = done.load(Ordering::Relaxed);
    println!();
    println!(
        "{total} writes in {elapsed:.1}s ({:.0} writes/s), {} errors",
        total as f64 / elapsed,
        errors.load(Ordering::Relaxed)
    );
    let over: Vec<String> = ids
        .iter()
        .zip(last.iter().zip(&base))
        .filter(|(_, (l, f))| *l - *f > RSS_LIMIT_MIB)
        .map(|(i, (l, f))| format!("node {i} +{:.1} MiB", l - f))
        .collect();
    if over.is_empty() {
        println!("PASS: no node ended more than {RSS_LIMIT_MIB} MiB above its {RSS_FIRST}-write sample");
        Ok(ExitCode::SUCCESS)
    } else {
        println!(
            "FAIL: more than {RSS_LIMIT_MIB} MiB above the {RSS_FIRST}-write sample at {n} writes: {}",
            over.join(", ")
        );
        Ok(ExitCode::FAILURE)
    }
}

// ---------------------------------------------------------------- main

async fn run(args: Args) -> anyhow::Result<ExitCode> {
    match args.rss_writes {
        Some(n) => rss_check(&args, n).await,
        None => compare(&args).await,
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = match parse_args() {
        Ok(Some(a)) => a,
        Ok(None) => return ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            return ExitCode::FAILURE;
        }
    };
    // On Ctrl-C the run is dropped, and with it the clusters (their guards
    // stop the processes and remove the data).
    let result = tokio::select! {
        r = run(args) => r,
        _ = tokio::signal::ctrl_c() => Err(anyhow!("interrupted")),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
