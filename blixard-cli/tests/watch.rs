//! The change feed end to end, against real `blixard` processes.
//!
//! - A watcher (`blixard events --from 1 -o json`, a child process) follows
//!   a 3-node cluster through a random workload of creates, starts, stops
//!   and deletes while the leader (the member it streams from) is SIGKILLed:
//!   it reconnects to another member and resumes. Every revision appears
//!   once, in order, as one contiguous group without duplicates; the VMs
//!   rebuilt from its events equal `vm list`; a second watcher started
//!   afterwards on another member prints the same events.
//! - A node that keeps only a few events (`BLIXARD_WATCH_HISTORY`) refuses
//!   a revision it no longer holds with one `compacted:` line and exit 1.
mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader, Read};
use std::process::{Child, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use common::{cli_at, client_command, eventually, free_port, loopback, node_command, stderr, Nodes};
use serde_json::Value;

/// A child `blixard events` whose JSON lines a thread collects.
struct Watcher {
    child: Child,
    lines: Arc<Mutex<Vec<Value>>>,
}

impl Watcher {
    fn start(addrs: &str, from: u64) -> Watcher {
        let mut child = client_command(addrs)
            .args(["--addr", addrs, "events", "--from", &from.to_string(), "-o", "json"])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let out = child.stdout.take().unwrap();
        let lines = Arc::new(Mutex::new(Vec::new()));
        let l = lines.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines() {
                let Ok(line) = line else { return };
                let v: Value =
                    serde_json::from_str(&line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
                l.lock().unwrap().push(v);
            }
        });
        Watcher { child, lines }
    }

    fn events(&self) -> Vec<Value> {
        self.lines.lock().unwrap().clone()
    }

    fn still_running(&mut self) -> bool {
        self.child.try_wait().unwrap().is_none()
    }
}

impl Drop for Watcher {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let mut err = String::new();
        if let Some(mut e) = self.child.stderr.take() {
            let _ = e.read_to_string(&mut err);
        }
        if !err.is_empty() {
            eprintln!("watcher stderr: {err}");
        }
    }
}

/// What identifies an event: revision, kind, type, object.
fn key(e: &Value) -> (u64, String, String, String) {
    let kind = e["kind"].as_str().unwrap().to_string();
    let object = if kind == "vm" { e["vm"]["name"].to_string() } else { e["node"]["id"].to_string() };
    (e["revision"].as_u64().unwrap(), kind, e["type"].as_str().unwrap().to_string(), object)
}

/// Revisions only grow, each revision's events are one contiguous group,
/// and no object appears twice in a revision.
fn assert_in_order_once(events: &[Value]) {
    let mut last = 0;
    let mut seen_in_rev: BTreeSet<(String, String)> = BTreeSet::new();
    for e in events {
        let (rev, kind, _, object) = key(e);
        assert!(rev >= last, "revision {rev} after {last}: {e}");
        if rev > last {
            seen_in_rev.clear();
            last = rev;
        }
        assert!(seen_in_rev.insert((kind, object.clone())), "{object} twice in revision {rev}");
    }
}

/// The VMs the events leave, by name: the fields that say what state it is in.
fn rebuilt(events: &[Value]) -> BTreeMap<String, Value> {
    let mut vms = BTreeMap::new();
    for e in events.iter().filter(|e| e["kind"] == "vm") {
        let name = e["vm"]["name"].as_str().unwrap().to_string();
        if e["type"] == "delete" {
            vms.remove(&name);
        } else {
            vms.insert(name, summary(&e["vm"]));
        }
    }
    vms
}

fn summary(vm: &Value) -> Value {
    serde_json::json!([vm["node_id"], vm["desired"], vm["observed"], vm["generation"], vm["revision"]])
}

fn listed(addrs: &str) -> Option<BTreeMap<String, Value>> {
    let out = cli_at(addrs, &["vm", "list", "-o", "json"]);
    let list: Value = serde_json::from_slice(&out.stdout).ok()?;
    Some(list.as_array()?.iter().map(|v| (v["name"].as_str().unwrap().to_string(), summary(v))).collect())
}

fn status(addr: &str) -> Option<Value> {
    let out = cli_at(addr, &["cluster", "status", "-o", "json"]);
    serde_json::from_slice(&out.stdout).ok()
}

/// A small xorshift generator: the seed is printed, so a failure replays.
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n
    }
}

#[test]
fn a_watcher_sees_every_change_once_in_order_across_a_leader_kill() {
    let root = tempfile::tempdir().unwrap();
    let mut nodes = Nodes::three(root.path());
    let leader = eventually("a leader with three ready members", 60, || {
        let s = status(&nodes.addr(1))?;
        let ready = s["nodes"].as_array()?.iter().filter(|n| n["status"] == "ready").count();
        (s["members"].as_array()?.len() == 3 && ready == 3).then(|| s["leader_id"].as_u64())?
    });
    // The watcher streams from the leader first: the kill breaks its stream.
    let mut order = vec![leader];
    order.extend((1..=3).filter(|&i| i != leader));
    let watch_addrs = order.iter().map(|&i| nodes.addr(i)).collect::<Vec<_>>().join(",");
    let mut watcher = Watcher::start(&watch_addrs, 1);

    let seed = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_nanos() as u64 | 1;
    eprintln!("workload seed {seed}");
    let mut rng = Rng(seed);
    let survivors: Vec<u64> = order[1..].to_vec();
    let all_addrs = (1..=3).map(|i| nodes.addr(i)).collect::<Vec<_>>().join(",");
    let live_addrs = survivors.iter().map(|&i| nodes.addr(i)).collect::<Vec<_>>().join(",");
    let mut names: Vec<String> = Vec::new();
    let ops = 60;
    for op in 0..ops {
        if op == ops / 2 {
            eventually("the watcher has seen the first half", 30, || {
                (watcher.events().iter().filter(|e| e["kind"] == "vm").count() >= names.len()).then_some(())
            });
            nodes.kill(leader);
        }
        let addrs = if op < ops / 2 { &all_addrs } else { &live_addrs };
        let pick = |rng: &mut Rng, names: &[String]| names[rng.below(names.len() as u64) as usize].clone();
        let (args, new): (Vec<String>, Option<String>) = match rng.below(10) {
            _ if names.is_empty() => (vec![], None),
            0..=3 => (vec![], None),
            4..=5 => (vec!["vm".into(), "stop".into(), pick(&mut rng, &names)], None),
            6..=7 => (vec!["vm".into(), "start".into(), pick(&mut rng, &names)], None),
            _ => {
                let name = pick(&mut rng, &names);
                names.retain(|n| *n != name);
                (vec!["vm".into(), "delete".into(), name], None)
            }
        };
        let (args, new) = if args.is_empty() {
            let name = format!("w-{op}");
            (vec!["vm".into(), "create".into(), name.clone(), "--memory".into(), "64".into()], Some(name))
        } else {
            (args, new)
        };
        let argv: Vec<&str> = args.iter().map(String::as_str).collect();
        let out = cli_at(addrs, &argv);
        // A write cut off by the kill may or may not have applied; the
        // final list decides.
        if !out.status.success() {
            eprintln!("op {op} {argv:?}: {}", stderr(&out).trim());
        }
        if let Some(n) = new {
            names.push(n);
        }
    }

    let final_list = eventually("the watcher's VMs equal vm list", 60, || {
        let list = listed(&live_addrs)?;
        (rebuilt(&watcher.events()) == list).then_some(list)
    });
    assert!(!final_list.is_empty());
    assert!(watcher.still_running(), "the watcher reconnected and kept going");
    let events = watcher.events();
    assert_in_order_once(&events);
    let vm_events = events.iter().filter(|e| e["kind"] == "vm").count();
    // (a stop of a stopped VM changes nothing, so no event)
    assert!(vm_events >= ops / 2, "{vm_events} VM events for {ops} operations");

    // Every member has the same events per revision: a fresh watcher on a
    // survivor prints the same sequence.
    let last = key(events.last().unwrap()).0;
    let other = Watcher::start(&nodes.addr(survivors[1]), 1);
    let again = eventually("the second watcher caught up", 30, || {
        let e = other.events();
        (e.last().is_some_and(|l| key(l).0 >= last)).then_some(e)
    });
    let upto = |v: &[Value]| v.iter().filter(|e| key(e).0 <= last).map(key).collect::<Vec<_>>();
    assert_eq!(upto(&events), upto(&again));
}

#[test]
fn a_revision_older_than_the_history_is_compacted() {
    let root = tempfile::tempdir().unwrap();
    let port = free_port();
    let dir = root.path().join("node-1");
    let mut node = node_command(1, port, &dir, None, ["16", "8192", "100"], "none", &[])
        .env("BLIXARD_WATCH_HISTORY", "6")
        .spawn()
        .unwrap();
    let addr = loopback(port);
    eventually("the node is ready", 30, || status(&addr)?["leader_id"].as_u64());
    for i in 0..8 {
        let out = cli_at(&addr, &["vm", "create", &format!("c-{i}"), "--memory", "64"]);
        assert!(out.status.success(), "{}", stderr(&out));
    }
    let out = cli_at(&addr, &["events", "--from", "1", "-o", "json"]);
    let _ = node.kill();
    let _ = node.wait();
    assert_eq!(out.status.code(), Some(1), "stdout {}", String::from_utf8_lossy(&out.stdout));
    let err = stderr(&out);
    assert_eq!(err.trim_end().lines().count(), 1, "{err}");
    assert!(err.starts_with("error: compacted: revision 1 is older than the retained history"), "{err}");
    assert!(err.contains("re-list"), "{err}");
}
