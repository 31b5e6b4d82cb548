//! Node failover benchmark: how long after a node dies its VMs run on the
//! other nodes (a bench binary that prints figures; it asserts only that
//! failover happens, never how fast).
//!
//! Three real `blixard` processes on loopback with `--vm-backend process`
//! and node timeout T (default 4 s), 12 VMs. Each trial SIGKILLs the
//! follower holding the most VMs and measures, per VM of that node, the
//! time from the kill until its new copy was running elsewhere: the new
//! workload's launch time plus its boot time, both reported by the cluster
//! (no polling error); the trial's figure is its slowest VM. The dead node's
//! old copies are watched too (the guard stops them). The node is then
//! restarted and the cluster settles (it is `ready`, its stale copies are
//! gone, every VM runs exactly once) before the next trial.
//!
//! Run: `cargo bench -p blixard-cli --bench node_failover`
//! (BLIXARD_FAILOVER_TRIALS=N, default 20; BLIXARD_NODE_TIMEOUT=SECS,
//! default 4; BLIXARD_FAILOVER_VMS=N, default 12).
#[path = "../tests/common/mod.rs"]
mod common; // shared with the tests, which use other parts

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use common::procs::{alive_with, within, ProcCluster};

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_millis() as u64
}

fn percentile(sorted: &[u64], p: f64) -> u64 {
    sorted[((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len()) - 1]
}

fn summary(name: &str, mut v: Vec<u64>) {
    v.sort_unstable();
    println!(
        "{name:<44} n={:<3} p50 {:>5} ms  p99 {:>5} ms  min {:>5} ms  max {:>5} ms",
        v.len(),
        percentile(&v, 0.5),
        percentile(&v, 0.99),
        v[0],
        v[v.len() - 1]
    );
}

fn main() {
    let trials = env_u64("BLIXARD_FAILOVER_TRIALS", 20);
    let timeout = env_u64("BLIXARD_NODE_TIMEOUT", 4);
    let count = env_u64("BLIXARD_FAILOVER_VMS", 12);
    let root = tempfile::tempdir().unwrap();
    let mut c = ProcCluster::start(root.path(), timeout);
    for i in 0..count {
        let out = c.cli(1, &["vm", "create", &format!("fo-{i}"), "--memory", "64"]);
        assert!(out.status.success(), "create: {}", String::from_utf8_lossy(&out.stderr));
    }
    let settled = |c: &ProcCluster| -> Option<()> {
        let p = c.placements(1)?;
        (p.len() == count as usize
            && p.iter().all(|(name, node, o)| o == "running" && c.hosts_running(name) == vec![*node]))
        .then_some(())
    };
    within("every VM running once", 60.0, || settled(&c));
    println!("node failover: 3 nodes, {count} process VMs, node timeout {timeout} s, {trials} trials");

    let (mut per_vm, mut per_trial, mut fenced) = (Vec::new(), Vec::new(), Vec::new());
    for trial in 0..trials {
        let leader = c.json(1, &["cluster", "status", "-o", "json"]).unwrap()["leader_id"].as_u64().unwrap();
        let mut by_node: BTreeMap<u64, Vec<String>> = BTreeMap::new();
        for (name, node, _) in c.placements(leader).unwrap() {
            by_node.entry(node).or_default().push(name);
        }
        let (victim, vms) = by_node
            .iter()
            .filter(|(n, _)| **n != leader)
            .max_by_key(|(_, v)| v.len())
            .map(|(n, v)| (*n, v.clone()))
            .expect("a follower holding VMs");
        let old: Vec<(u32, String)> = vms
            .iter()
            .filter_map(|name| {
                let pid = c.workload(victim, name)?;
                Some((pid, format!("{}/", c.dir(victim).join("vms").join(name).display())))
            })
            .collect();
        let killed = now_ms();
        c.kill(victim);
        let mut gone_at: Option<u64> = None;
        let new = within("the dead node's VMs running elsewhere", 120.0, || {
            if gone_at.is_none() && old.iter().all(|(pid, needle)| !alive_with(*pid, needle)) {
                gone_at = Some(now_ms());
            }
            let mut times = Vec::new();
            for name in &vms {
                let vm = c.json(leader, &["vm", "get", name, "-o", "json"])?;
                let node = vm["node_id"].as_u64().unwrap_or(0);
                if node == victim || node == 0 || vm["observed"] != "running" {
                    return None;
                }
                let started = vm["started_at_ms"].as_u64()?;
                times.push(started + vm["boot_ms"].as_u64().unwrap_or(0) - killed);
            }
            Some(times)
        });
        let worst = *new.iter().max().unwrap();
        let fence = gone_at.map(|g| g - killed);
        println!(
            "trial {trial:>2}: killed node {victim} ({} VMs): all running elsewhere after {worst} ms; old copies gone after {}",
            vms.len(),
            fence.map_or("(not seen)".to_string(), |f| format!("<= {f} ms"))
        );
        per_vm.extend(new);
        per_trial.push(worst);
        fenced.extend(fence);
        c.restart(victim);
        within("the node back, ready, and every VM running once", 120.0, || {
            let nodes = c.json(leader, &["node", "list", "-o", "json"])?;
            let ready = nodes.as_array()?.iter().all(|n| n["status"] == "ready");
            (ready && settled(&c).is_some()).then_some(())
        });
        std::thread::sleep(Duration::from_millis(500));
    }
    println!();
    summary("death -> VM running elsewhere (per VM)", per_vm);
    summary("death -> all its VMs running elsewhere (per trial)", per_trial);
    if !fenced.is_empty() {
        summary("death -> old copies stopped by the guard (<=)", fenced);
    }
    println!(
        "node timeout: {} ms (fence: {} ms, forced by {} ms)",
        timeout * 1000,
        timeout * 600,
        timeout * 800
    );
}
