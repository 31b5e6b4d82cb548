//! Self-healing with real processes: three `blixard` nodes on loopback run
//! their VMs as processes (`--vm-backend process`), node timeout 4 s (so the
//! fencing lease is 2.4 s and the guard forces VMs off by 3.2 s).
//!
//! - SIGKILL a node holding VMs: they run on the other nodes, each exactly
//!   once; the dead node's guard stopped its copies. Restart it: it comes
//!   back `ready`, its stale copies are deleted, never started again.
//! - SIGSTOP a node holding VMs past the node timeout: its copies are gone
//!   *before* the copies elsewhere start (a watcher thread records when each
//!   old workload died; the new one's start time comes from the cluster).
//!   SIGCONT: it cleans up and nothing runs twice.
//!
//! Drains and migrations with real processes are in `tests/healing.rs`.
mod common;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use common::procs::{alive_with, within, ProcCluster};

fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_millis() as u64
}

/// Creates `count` VMs and waits until all run; returns them by node.
fn create_running(c: &ProcCluster, count: usize) -> BTreeMap<u64, Vec<String>> {
    for i in 0..count {
        let name = format!("heal-{i}");
        let out = c.cli(1, &["vm", "create", &name, "--memory", "64"]);
        assert!(out.status.success(), "create {name}: {}", String::from_utf8_lossy(&out.stderr));
    }
    within("every VM running", 60.0, || {
        let p = c.placements(1)?;
        (p.len() == count && p.iter().all(|(_, _, o)| o == "running")).then_some(())
    });
    let mut by_node: BTreeMap<u64, Vec<String>> = BTreeMap::new();
    for (name, node, _) in c.placements(1).unwrap() {
        by_node.entry(node).or_default().push(name);
    }
    by_node
}

/// Every VM runs on exactly the host the cluster places it on, and is
/// reported running there.
fn each_runs_once_where_placed(c: &ProcCluster, via: u64) -> Option<()> {
    let placements = c.placements(via)?;
    for (name, node, observed) in &placements {
        if observed != "running" || c.hosts_running(name) != vec![*node] {
            return None;
        }
    }
    Some(())
}

/// The node (not `avoid`) holding the most VMs, with them.
fn busiest(by_node: &BTreeMap<u64, Vec<String>>, avoid: u64) -> (u64, Vec<String>) {
    by_node
        .iter()
        .filter(|(n, _)| **n != avoid)
        .max_by_key(|(n, vms)| (vms.len(), std::cmp::Reverse(**n)))
        .map(|(n, vms)| (*n, vms.clone()))
        .expect("a node holding VMs")
}

/// Records, per workload pid, when it was first seen dead (ms since the
/// epoch), polling every 10 ms until dropped.
struct DeathWatch {
    died: Arc<Mutex<BTreeMap<u32, u64>>>,
    stop: Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl DeathWatch {
    fn new(watched: Vec<(u32, String)>) -> DeathWatch {
        let died = Arc::new(Mutex::new(BTreeMap::new()));
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (d, s) = (died.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            while !s.load(std::sync::atomic::Ordering::Relaxed) {
                for (pid, needle) in &watched {
                    if !d.lock().unwrap().contains_key(pid) && !alive_with(*pid, needle) {
                        d.lock().unwrap().insert(*pid, now_ms());
                    }
                }
                std::thread::sleep(Duration::from_millis(10));
            }
        });
        DeathWatch { died, stop, thread: Some(thread) }
    }

    fn died(&self, pid: u32) -> Option<u64> {
        self.died.lock().unwrap().get(&pid).copied()
    }
}

impl Drop for DeathWatch {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The old workloads (pid, command-line needle) of `vms` on node `id`.
fn workloads(c: &ProcCluster, id: u64, vms: &[String]) -> Vec<(String, u32, String)> {
    vms.iter()
        .map(|name| {
            let pid = c.workload(id, name).unwrap_or_else(|| panic!("{name} runs on node {id}"));
            let needle = format!("{}/", c.dir(id).join("vms").join(name).display());
            (name.clone(), pid, needle)
        })
        .collect()
}

#[test]
fn a_dead_or_stopped_node_has_its_vms_run_elsewhere_and_never_twice() {
    let root = tempfile::tempdir().unwrap();
    let mut c = ProcCluster::start(root.path(), 4);
    let by_node = create_running(&c, 6);
    let leader = c.json(1, &["cluster", "status", "-o", "json"]).unwrap()["leader_id"].as_u64().unwrap();

    // ---- SIGKILL a follower holding VMs.
    let (victim, vms) = busiest(&by_node, leader);
    let old = workloads(&c, victim, &vms);
    let watch = DeathWatch::new(old.iter().map(|(_, pid, n)| (*pid, n.clone())).collect());
    let killed_at = now_ms();
    c.kill(victim);
    let via = leader;
    within("the killed node's VMs running elsewhere, once each", 60.0, || {
        let p = c.placements(via)?;
        let moved = vms
            .iter()
            .all(|name| p.iter().any(|(n, node, o)| n == name && *node != victim && o == "running"));
        (moved && each_runs_once_where_placed(&c, via).is_some()).then_some(())
    });
    let status = c.json(via, &["node", "list", "-o", "json"]).unwrap();
    let down = status.as_array().unwrap().iter().find(|n| n["id"] == victim).unwrap()["status"].clone();
    assert_eq!(down, "down", "the killed node is marked down");
    for (name, pid, _) in &old {
        let died = watch.died(*pid).unwrap_or_else(|| panic!("{name}'s old workload {pid} still runs"));
        let vm = c.json(via, &["vm", "get", name, "-o", "json"]).unwrap();
        let started = vm["started_at_ms"].as_u64().unwrap();
        assert!(
            died <= started,
            "{name}: the copy on the dead node died at {died}, after the new one started at {started}"
        );
        let history = vm["history"].as_array().unwrap();
        assert_eq!(history.last().unwrap()["reason"], "node-down", "{name}: {vm}");
        assert_eq!(history.last().unwrap()["from_node"], victim);
        eprintln!(
            "{name}: old copy gone {} ms after the kill, new one started {} ms after it",
            died - killed_at,
            started - killed_at
        );
    }
    drop(watch);
    let log = std::fs::read_to_string(c.dir(victim).join("vms").join("fence-guard.log")).unwrap_or_default();
    assert!(old.iter().all(|(name, _, _)| log.contains(name.as_str())), "the guard fenced them: {log}");

    // ---- Restart it: ready again, stale copies deleted, nothing twice.
    c.restart(victim);
    within("the restarted node ready and its stale copies gone", 60.0, || {
        let nodes = c.json(via, &["node", "list", "-o", "json"])?;
        let ready = nodes.as_array()?.iter().any(|n| n["id"] == victim && n["status"] == "ready");
        let stale = vms.iter().any(|name| c.has_files(victim, name));
        (ready && !stale && each_runs_once_where_placed(&c, via).is_some()).then_some(())
    });

    // ---- SIGSTOP a follower holding VMs past the node timeout.
    let by_node = {
        let mut m: BTreeMap<u64, Vec<String>> = BTreeMap::new();
        for (name, node, _) in c.placements(via).unwrap() {
            m.entry(node).or_default().push(name);
        }
        m
    };
    let (stopped, vms) = busiest(&by_node, leader);
    let old = workloads(&c, stopped, &vms);
    let watch = DeathWatch::new(old.iter().map(|(_, pid, n)| (*pid, n.clone())).collect());
    let stopped_at = now_ms();
    c.signal(stopped, libc::SIGSTOP);
    within("the stopped node's VMs running elsewhere", 60.0, || {
        let p = c.placements(via)?;
        vms.iter()
            .all(|name| p.iter().any(|(n, node, o)| n == name && *node != stopped && o == "running"))
            .then_some(())
    });
    for (name, pid, _) in &old {
        let died =
            watch.died(*pid).unwrap_or_else(|| panic!("{name}'s copy on the stopped node {pid} still runs"));
        let vm = c.json(via, &["vm", "get", name, "-o", "json"]).unwrap();
        let started = vm["started_at_ms"].as_u64().unwrap();
        assert!(
            died <= started,
            "{name}: the stopped node's copy died at {died}, after the new one started at {started}"
        );
        eprintln!(
            "{name}: fenced {} ms after SIGSTOP, running elsewhere from {} ms",
            died - stopped_at,
            started - stopped_at
        );
    }
    drop(watch);
    c.signal(stopped, libc::SIGCONT);
    within("the resumed node ready, its stale copies gone, nothing twice", 60.0, || {
        let nodes = c.json(via, &["node", "list", "-o", "json"])?;
        let ready = nodes.as_array()?.iter().all(|n| n["status"] == "ready");
        let stale = vms.iter().any(|name| c.has_files(stopped, name));
        (ready && !stale && each_runs_once_where_placed(&c, via).is_some()).then_some(())
    });
}
