//! End-to-end placement throughput and memory (issue 7, section 5): three
//! real nodes, each its own process on loopback with its fsync'd Raft log,
//! 1,000 node records (the 3 real nodes plus 997 registered records that
//! run nothing), and 100,000 VMs created through `CreateVms` requests of
//! 1,000 VMs each, several in flight, sent to the leader. Every VM is
//! placed by the scheduler inside apply on all three replicas.
//!
//! Printed: committed placements/s (wall time from the first request to the
//! last reply, each reply meaning "committed on a quorum and applied by the
//! leader"), and each node's RSS before the load and when it holds the
//! 100k VMs (from /proc/PID/status), median of three runs.
//!
//!   cargo bench -p blixard-core --bench placement_e2e
//!
//! Environment: `E2E_VMS` (default 100000), `E2E_BATCH` (1000),
//! `E2E_IN_FLIGHT` (4), `E2E_RUNS` (3), `E2E_MIX=1` for the scheduler
//! bench's rule mix (constraints, anti-affinity groups, spread by zone).
//! The same binary is the node process when `E2E_NODE` is set.
use std::io::{BufRead, BufReader};
use std::process::{Child, Command as Process, Stdio};
use std::time::{Duration, Instant};

use blixard_core::command::Command;
use blixard_core::node::{Node, NodeConfig};
use blixard_core::raft::RaftTuning;
use blixard_core::types::{NodeResources, Ratio, Resources};
use blixard_proto as pb;
use blixard_proto::vm_service_client::VmServiceClient;

const NODE_RECORDS: u64 = 1_000;
const ZONES: [&str; 3] = ["a", "b", "c"];

fn env(name: &str, default: u64) -> u64 {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn resources() -> NodeResources {
    NodeResources {
        capacity: Resources::new(64, 256 * 1024, 2_000),
        reserved: Resources::ZERO,
        cpu_overcommit: Ratio(8_000),
        memory_overcommit: Ratio::ONE,
    }
}

fn labels(id: u64) -> std::collections::BTreeMap<String, String> {
    [("zone".to_string(), ZONES[(id % 3) as usize].to_string())].into_iter().collect()
}

/// One node process: starts node `id` (1 bootstraps, 2 and 3 join it);
/// node 1 then registers the other node records and prints "ready".
fn node_main(id: u64) {
    let port = |id: u64| env("E2E_PORT", 0) + id;
    let dir = std::path::PathBuf::from(std::env::var("E2E_DIR").expect("E2E_DIR"));
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    rt.block_on(async move {
        let cfg = NodeConfig {
            id,
            bind: format!("127.0.0.1:{}", port(id)).parse().expect("addr"),
            advertise: None,
            peer_port: Some(0),
            data_dir: dir.join(format!("n{id}")),
            join: (id > 1).then(|| format!("127.0.0.1:{}", port(1))),
            resources: resources(),
            labels: labels(id),
            tuning: RaftTuning::default(),
            vm_backend: None,
            reconciler: Default::default(),
            meter: None,
            join_token: std::env::var("E2E_TOKEN").ok(),
            tls: None,
            // 1,000 nodes: a /24 each needs more than the default /16.
            vm_cidr: Some(blixard_core::types::Ipv4Net {
                addr: std::net::Ipv4Addr::new(10, 0, 0, 0),
                prefix: 8,
            }),
            vm_network: Err("tests run VMs without a NIC".into()),
        };
        let node = Node::start(cfg).await.expect("node starts");
        if id == 1 {
            let shared = node.shared().clone();
            while shared.members().len() < 3 || !shared.is_leader() {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            let ids: Vec<u64> = (4..=NODE_RECORDS).collect();
            for chunk in ids.chunks(500) {
                let cmds = chunk
                    .iter()
                    .map(|&n| Command::RegisterNode {
                        id: n,
                        addr: format!("10.77.{}.{}:7420", n / 256, n % 256),
                        resources: resources(),
                        labels: labels(n),
                    })
                    .collect();
                shared.propose(Command::Batch(cmds)).await.expect("register node records");
            }
            while shared.state.node_count() < NODE_RECORDS as usize {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            println!("ready");
        }
        // Until the parent closes our stdin. (This bench runs real
        // processes; madsim only compiles it.)
        let mut line = String::new();
        #[cfg_attr(madsim, allow(deprecated))]
        let _ = tokio::task::spawn_blocking(move || std::io::stdin().read_line(&mut line)).await;
        node.shutdown().await;
    });
}

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

fn spec(i: u64) -> pb::VmSpec {
    pb::VmSpec {
        vcpus: 1 + (i % 2) as u32,
        memory_mb: [256, 512, 1024][(i % 3) as usize],
        disk_gb: 1 + i % 5,
        ..Default::default()
    }
}

fn placement(i: u64, mix: bool) -> Option<pb::Placement> {
    if !mix {
        return None;
    }
    let mut p = pb::Placement::default();
    match i % 4 {
        0 => {}
        1 => p.constraints.push(format!("zone={}", ZONES[(i / 4 % 3) as usize])),
        2 => p.anti_affinity = format!("aa-{}", i / 40),
        _ => {
            p.anti_affinity = format!("sp-{}", i / 40);
            p.spread_by = "zone".into();
        }
    }
    Some(p)
}

struct Run {
    rate: f64,
    before_kib: Vec<u64>,
    after_kib: Vec<u64>,
}

fn run_once(run: u64) -> Run {
    let vms = env("E2E_VMS", 100_000);
    let batch = env("E2E_BATCH", 1_000);
    let in_flight = env("E2E_IN_FLIGHT", 4);
    let mix = env("E2E_MIX", 0) == 1;
    let dir = tempfile::tempdir().expect("tempdir");
    let base = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("port");
        let p = l.local_addr().expect("addr").port();
        // Three consecutive free ports above it, most likely.
        u64::from(p).min(60_000)
    };
    let exe = std::env::current_exe().expect("exe");
    // The cluster's admin token, put where node 1 founds the cluster.
    let token = blixard_core::auth::token::new_secret().expect("randomness");
    std::fs::create_dir_all(dir.path().join("n1")).expect("node 1's dir");
    std::fs::write(blixard_core::node::bootstrap::path(&dir.path().join("n1")), &token).expect("admin token");
    let mut children: Vec<Child> = Vec::new();
    for id in 1..=3u64 {
        let child = Process::new(&exe)
            .env("E2E_NODE", id.to_string())
            .env("E2E_PORT", base.to_string())
            .env("E2E_DIR", dir.path())
            .env("E2E_TOKEN", &token)
            .env("RUST_LOG", "error")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn node");
        children.push(child);
        if id == 1 {
            std::thread::sleep(Duration::from_millis(500));
        }
    }
    let stdout = children[0].stdout.take().expect("stdout");
    let mut ready = String::new();
    BufReader::new(stdout).read_line(&mut ready).expect("node 1 says ready");
    assert_eq!(ready.trim(), "ready", "node 1 failed to start");
    let pids: Vec<u32> = children.iter().map(Child::id).collect();
    let before_kib: Vec<u64> = pids.iter().map(|&p| rss_kib(p)).collect();

    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let elapsed = rt.block_on(async move {
        let ch = tonic::transport::Endpoint::from_shared(format!("http://127.0.0.1:{}", base + 1))
            .expect("endpoint")
            .connect()
            .await
            .expect("connect to node 1");
        let batches = vms.div_ceil(batch);
        let next = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
        let start = Instant::now();
        let mut tasks = Vec::new();
        for _ in 0..in_flight {
            let bearer = blixard_core::auth::Bearer::new(&token).expect("token");
            let mut client = VmServiceClient::with_interceptor(ch.clone(), bearer)
                .max_decoding_message_size(64 << 20)
                .max_encoding_message_size(64 << 20);
            let next = next.clone();
            tasks.push(tokio::spawn(async move {
                loop {
                    let b = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    if b >= batches {
                        break;
                    }
                    let first = b * batch;
                    let last = ((b + 1) * batch).min(vms);
                    let req = pb::CreateVmsRequest {
                        vms: (first..last)
                            .map(|i| pb::NewVm {
                                name: format!("r{run}-vm-{i}"),
                                spec: Some(spec(i)),
                                placement: placement(i, mix),
                                ..Default::default()
                            })
                            .collect(),
                        no_start: true,
                        request_id: format!("e2e-{run}-{b}"),
                        ..Default::default()
                    };
                    let out = client.create_vms(req).await.expect("CreateVms").into_inner();
                    assert_eq!(out.placed.len() as u64, last - first);
                    assert!(out.placed.iter().all(|p| p.node_id != 0), "every VM placed");
                }
            }));
        }
        for t in tasks {
            t.await.expect("client task");
        }
        start.elapsed()
    });
    // Let followers finish applying, then measure.
    std::thread::sleep(Duration::from_secs(2));
    let after_kib: Vec<u64> = pids.iter().map(|&p| rss_kib(p)).collect();
    for mut c in children {
        drop(c.stdin.take());
        let deadline = Instant::now() + Duration::from_secs(10);
        while c.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = c.kill();
        let _ = c.wait();
    }
    Run { rate: vms as f64 / elapsed.as_secs_f64(), before_kib, after_kib }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() {
    if let Some(id) = std::env::var("E2E_NODE").ok().and_then(|v| v.parse().ok()) {
        node_main(id);
        return;
    }
    let runs = env("E2E_RUNS", 3);
    println!(
        "3 node processes, {NODE_RECORDS} node records, {} VMs in CreateVms of {}, {} in flight, mix={}",
        env("E2E_VMS", 100_000),
        env("E2E_BATCH", 1_000),
        env("E2E_IN_FLIGHT", 4),
        env("E2E_MIX", 0) == 1
    );
    let mut rates = Vec::new();
    let mut after_max = Vec::new();
    for run in 0..runs {
        let r = run_once(run);
        let mib =
            |v: &[u64]| v.iter().map(|k| format!("{:.0}", *k as f64 / 1024.0)).collect::<Vec<_>>().join("/");
        println!(
            "run {run}: {:>8.0} placements/s; RSS MiB (nodes 1/2/3) before {} after {}",
            r.rate,
            mib(&r.before_kib),
            mib(&r.after_kib)
        );
        rates.push(r.rate);
        after_max.push(r.after_kib.iter().copied().max().unwrap_or(0) as f64 / 1024.0);
    }
    println!(
        "median: {:.0} committed placements/s; largest node RSS holding the VMs: {:.0} MiB",
        median(rates),
        median(after_max)
    );
}
