//! End-to-end: real `blixard` processes on loopback.
//!
//! Three nodes form a cluster (bootstrap + two `--join`s), writes go through
//! a follower, the leader is SIGKILLed, writes continue, the old leader
//! restarts from its data dir and catches up to the identical state. Also
//! checks the CLI's error contract and `blixard up`.
use std::collections::BTreeSet;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

mod common;
use common::{cli, eventually, free_port, BIN};

/// Kills every process it started, even when the test panics; on a panic it
/// prints the tail of each node's log so the failure explains itself.
struct Procs(Vec<(u64, Child)>, Vec<PathBuf>);

impl Drop for Procs {
    fn drop(&mut self) {
        for (_, c) in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
        if std::thread::panicking() {
            for log in &self.1 {
                let text = std::fs::read_to_string(log).unwrap_or_default();
                let tail: Vec<&str> = text.lines().rev().take(40).collect();
                eprintln!("---- {} (last 40 lines)", log.display());
                for l in tail.iter().rev() {
                    eprintln!("{l}");
                }
            }
        }
    }
}

fn logs(dirs: &[PathBuf]) -> Vec<PathBuf> {
    dirs.iter().map(|d| d.with_extension("log")).collect()
}

fn start_node(id: u64, port: u16, dir: &Path, join: Option<u16>) -> Child {
    let log = std::fs::OpenOptions::new().create(true).append(true).open(dir.with_extension("log")).unwrap();
    let mut cmd = Command::new(BIN);
    cmd.args(["node", "start", "--id", &id.to_string(), "--bind", &format!("127.0.0.1:{port}")])
        .arg("--data-dir")
        .arg(dir)
        .args(["--vcpus", "16", "--memory-mb", "8192", "--disk-gb", "100"])
        // Control-plane tests: VMs are records only (tests/vms.rs runs guests).
        .args(["--vm-backend", "none", "--metrics-addr", "127.0.0.1:0"])
        .env("RUST_LOG", "info,openraft=warn")
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log);
    if let Some(p) = join {
        cmd.args(["--join", &format!("127.0.0.1:{p}")]);
    }
    common::prepare_node(&mut cmd, port, dir, join);
    cmd.spawn().expect("spawn blixard node")
}

fn json(port: u16, args: &[&str]) -> Option<Value> {
    let out = cli(port, args);
    if !out.status.success() {
        return None;
    }
    serde_json::from_slice(&out.stdout).ok()
}

fn status(port: u16) -> Option<Value> {
    json(port, &["cluster", "status", "--digest", "-o", "json"])
}

fn registered(s: &Value) -> usize {
    s["nodes"].as_array().map_or(0, |n| n.len())
}

fn voters(s: &Value) -> usize {
    s["members"].as_array().unwrap().iter().filter(|m| m["role"] != "learner").count()
}

fn create(port: u16, name: &str) -> Output {
    cli(port, &["vm", "create", name, "--vcpus", "1", "--memory", "64", "-o", "json"])
}

fn vm_names(port: u16) -> BTreeSet<String> {
    let list = json(port, &["vm", "list", "--stale", "-o", "json"]).expect("vm list");
    list.as_array().unwrap().iter().map(|v| v["name"].as_str().unwrap().to_string()).collect()
}

fn node_dirs(root: &Path) -> Vec<PathBuf> {
    (1..=3).map(|i| root.join(format!("node-{i}"))).collect()
}

/// Node 1 bootstraps under `root`, nodes 2 and 3 join it; all at once.
fn start_three(root: &Path) -> (Vec<PathBuf>, Vec<u16>, Procs) {
    let dirs = node_dirs(root);
    let ports: Vec<u16> = (0..3).map(|_| free_port()).collect();
    let mut procs = Procs(vec![(1, start_node(1, ports[0], &dirs[0], None))], logs(&dirs));
    for i in 1..3 {
        procs.0.push((i as u64 + 1, start_node(i as u64 + 1, ports[i], &dirs[i], Some(ports[0]))));
    }
    (dirs, ports, procs)
}

#[test]
fn three_processes_survive_leader_kill_and_converge() {
    let tmp = tempfile::tempdir().unwrap();
    let (dirs, ports, mut procs) = start_three(tmp.path());

    // Formed: three voters, a leader, three registered nodes.
    let s = eventually("3 voters and 3 registered nodes", 90, || {
        let s = status(ports[0])?;
        (voters(&s) == 3 && s["leader_id"].is_u64() && s["nodes"].as_array()?.len() == 3).then_some(s)
    });
    let leader = s["leader_id"].as_u64().unwrap();
    let follower_port = ports[(0..3).find(|&i| i as u64 + 1 != leader).unwrap()];

    // Writes through a follower are forwarded to the leader.
    let mut acked = BTreeSet::new();
    for i in 0..10 {
        let name = format!("before-{i}");
        let out = create(follower_port, &name);
        assert!(out.status.success(), "create via follower: {}", String::from_utf8_lossy(&out.stderr));
        let vm: Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(vm["name"], name.as_str());
        assert!(vm["node_id"].as_u64().unwrap() >= 1);
        acked.insert(name);
    }

    // The CLI's error contract: one line on stderr, exit 2 when nothing fits.
    let big = cli(follower_port, &["vm", "create", "huge", "--vcpus", "64", "--memory", "1000000"]);
    assert_eq!(big.status.code(), Some(2), "{}", String::from_utf8_lossy(&big.stderr));
    assert!(String::from_utf8_lossy(&big.stderr).starts_with("error: no node fits huge"));
    let bad = cli(follower_port, &["vm", "create", "Not_Valid"]);
    assert_eq!(bad.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&bad.stderr).contains("1-63 characters"));
    let dup = create(follower_port, "before-0");
    assert_eq!(dup.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&dup.stderr).contains("already exists"));
    assert_eq!(vm_names(follower_port).len(), 10, "rejected requests changed the state");

    // SIGKILL the leader.
    let li = (leader - 1) as usize;
    let victim = &mut procs.0.iter_mut().find(|(id, _)| *id == leader).unwrap().1;
    victim.kill().unwrap();
    victim.wait().unwrap();
    let survivor = ports[(0..3).find(|&i| i != li).unwrap()];

    // Writes continue once a new leader is elected. A write whose outcome is
    // unknown (Unavailable) is retried under a new name, never counted.
    for i in 0..10 {
        let name = format!("after-{i}");
        eventually("a write accepted by the new leader", 60, || {
            create(survivor, &name).status.success().then_some(())
        });
        acked.insert(name);
    }
    let s = status(survivor).unwrap();
    assert_ne!(s["leader_id"].as_u64(), Some(leader), "the killed node cannot still lead");

    // Restart the old leader from its own data dir: same id, no --join needed.
    procs.0.retain(|(id, _)| *id != leader);
    procs.0.push((leader, start_node(leader, ports[li], &dirs[li], None)));

    // Every node converges to the same applied index and state digest, and
    // holds every acknowledged VM.
    eventually("all nodes applied the same log with the same digest", 90, || {
        let all: Vec<Value> = ports.iter().map(|p| status(*p)).collect::<Option<_>>()?;
        let applied: BTreeSet<u64> = all.iter().map(|s| s["applied_index"].as_u64().unwrap()).collect();
        let digests: BTreeSet<String> = all.iter().map(|s| s["state_digest"].to_string()).collect();
        (applied.len() == 1 && digests.len() == 1 && voters(&all[0]) == 3).then_some(())
    });
    for p in &ports {
        let names = vm_names(*p);
        assert!(
            acked.is_subset(&names),
            "node at {p} lacks acknowledged VMs: {:?}",
            acked.difference(&names)
        );
    }
    // The restarted node kept its identity and Raft term history.
    let s = status(ports[li]).unwrap();
    assert_eq!(s["node_id"].as_u64(), Some(leader));
    assert!(s["term"].as_u64().unwrap() >= 2);

    // Starting a node on that data dir under another id is refused.
    procs.0.retain_mut(|(id, c)| {
        if *id == leader {
            let _ = c.kill();
            let _ = c.wait();
            false
        } else {
            true
        }
    });
    let out = Command::new(BIN)
        .args(["node", "start", "--id", "99", "--bind", &format!("127.0.0.1:{}", free_port())])
        .arg("--data-dir")
        .arg(&dirs[li])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains(&format!("belongs to node {leader}, not node 99")));
}

#[test]
fn cluster_remove_and_leave_shrink_membership() {
    let tmp = tempfile::tempdir().unwrap();
    let (_dirs, ports, _procs) = start_three(tmp.path());
    eventually("3 voters", 90, || status(ports[0]).filter(|s| voters(s) == 3 && registered(s) == 3));

    // Remove node 3 by id through node 1; node 2 leaves by itself.
    let out = cli(ports[0], &["cluster", "remove", "3"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    eventually("node 3 gone", 30, || status(ports[0]).filter(|s| voters(s) == 2));
    let out = cli(ports[1], &["cluster", "leave"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let s =
        eventually("node 2 gone", 30, || status(ports[0]).filter(|s| voters(s) == 1 && s["leader_id"] == 1));
    let left: Vec<&str> = s["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|n| n["status"] == "left")
        .map(|n| n["addr"].as_str().unwrap())
        .collect();
    assert_eq!(left.len(), 2, "removed nodes are marked left in the state: {s}");

    // The last voter cannot be removed; unknown ids are reported.
    let out = cli(ports[0], &["cluster", "remove", "1"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("only voter"));
    let out = cli(ports[0], &["cluster", "remove", "42"]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("not a member"));

    // New VMs only land on the remaining active node.
    let out = create(ports[0], "solo");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let vm: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(vm["node_id"], 1);
}

#[test]
fn up_starts_a_cluster_and_ctrl_c_stops_it() {
    let tmp = tempfile::tempdir().unwrap();
    // Three consecutive free ports.
    let base = eventually("3 consecutive free ports", 10, || {
        let p = free_port();
        (p < 65000 && (1..3).all(|i| TcpListener::bind(("127.0.0.1", p + i)).is_ok())).then_some(p)
    });
    let mut up = Command::new(BIN)
        .args(["up", "--nodes", "3", "--base-port", &base.to_string(), "--vcpus", "4", "--memory-mb", "4096"])
        .args(["--vm-backend", "none"])
        .arg("--data-dir")
        .arg(tmp.path())
        .env("BLIXARD_CONFIG", tmp.path().join("config.toml"))
        .env_remove("BLIXARD_TOKEN")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let guard = Procs(vec![], (1..=3).map(|i| tmp.path().join(format!("node-{i}.log"))).collect());
    for i in 0..3 {
        common::register(base + i, &tmp.path().join("node-1"));
    }
    let s = eventually("up formed a 3-node cluster", 120, || {
        status(base).filter(|s| voters(s) == 3 && registered(s) == 3)
    });
    assert_eq!(s["members"].as_array().unwrap().len(), 3);
    assert!(create(base + 2, "via-up").status.success());
    // `up` left a CLI context (all members, the admin token) that a bare
    // command uses: no --addr, no token.
    let by_context = eventually("up wrote its CLI context", 30, || {
        let out = Command::new(BIN)
            .env("BLIXARD_CONFIG", tmp.path().join("config.toml"))
            .env_remove("BLIXARD_TOKEN")
            .env_remove("BLIXARD_ADDR")
            .args(["vm", "get", "via-up", "-o", "json"])
            .output()
            .unwrap();
        out.status.success().then_some(out)
    });
    assert!(String::from_utf8_lossy(&by_context.stdout).contains("via-up"));
    let mode = std::fs::metadata(tmp.path().join("config.toml")).unwrap();
    assert_eq!(std::os::unix::fs::PermissionsExt::mode(&mode.permissions()) & 0o777, 0o600);

    // Ctrl-C (SIGINT) stops every node and `up` itself.
    unsafe {
        libc::kill(up.id() as libc::pid_t, libc::SIGINT);
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    let code = loop {
        if let Some(code) = up.try_wait().unwrap() {
            break code;
        }
        if Instant::now() > deadline {
            let _ = up.kill();
            panic!("blixard up did not stop on SIGINT");
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(code.success(), "up exited with {code}");
    let out = up.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains(&format!("node 1: 127.0.0.1:{base}")), "{stdout}");
    // One image directory for all the nodes, under --data-dir.
    let images = tmp.path().join("images");
    assert!(stdout.contains(&format!("image dir: {} ", images.display())), "{stdout}");
    for i in 0..3 {
        assert!(
            TcpListener::bind(("127.0.0.1", base + i)).is_ok(),
            "node {} still listening after Ctrl-C",
            i + 1
        );
    }
    drop(guard);
}
