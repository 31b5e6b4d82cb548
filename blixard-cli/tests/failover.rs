//! End-to-end: the CLI fails over between members and retries writes
//! exactly once, against real `blixard` processes on loopback.
//!
//! `--addr` and `BLIXARD_ADDR` take a list; a member nobody listens on, or
//! one whose process is stopped (SIGSTOP: its kernel still accepts TCP), is
//! skipped; a write repeated under the same `--request-id` applies once; exit
//! codes say what happened (1 error, 2 no capacity, 3 over quota, 4 outcome
//! unknown, 5 not applied), with one plain line on stderr.
use std::collections::BTreeSet;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use serde_json::Value;

mod common;
use common::{cli_at, client_command, eventually, free_port, loopback, Nodes, BIN};

/// A loopback address nobody listens on.
fn dead() -> String {
    loopback(free_port())
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn json(addrs: &str, args: &[&str]) -> Option<Value> {
    let out = cli_at(addrs, args);
    if !out.status.success() {
        return None;
    }
    serde_json::from_slice(&out.stdout).ok()
}

fn status(addrs: &str) -> Option<Value> {
    json(addrs, &["cluster", "status", "-o", "json"])
}

fn vm_count(addrs: &str) -> usize {
    json(addrs, &["vm", "list", "-o", "json"]).expect("vm list").as_array().unwrap().len()
}

fn create(addrs: &str, name: &str, extra: &[&str]) -> Output {
    let mut args = vec!["vm", "create", name, "--memory", "64", "-o", "json"];
    args.extend_from_slice(extra);
    cli_at(addrs, &args)
}

fn created(out: &Output) -> Value {
    assert!(out.status.success(), "create failed ({:?}): {}", out.status.code(), stderr(out));
    serde_json::from_slice(&out.stdout).unwrap()
}

/// A failure is one plain line on stderr: no debug output.
fn assert_plain(out: &Output) {
    let err = stderr(out);
    assert_eq!(err.trim_end().lines().count(), 1, "more than one line: {err}");
    assert!(err.starts_with("error: "), "{err}");
    for debug in ["Status {", "code:", "metadata", "source:", "MetadataMap"] {
        assert!(!err.contains(debug), "debug output ({debug}) in: {err}");
    }
}

/// Waits until the cluster has three voters, a leader and three registered
/// nodes; returns the leader's id.
fn formed(addrs: &str) -> u64 {
    let s = eventually("3 voters, a leader and 3 registered nodes", 90, || {
        let s = status(addrs)?;
        let voters = s["members"].as_array()?.iter().filter(|m| m["role"] != "learner").count();
        (voters == 3 && s["leader_id"].is_u64() && s["nodes"].as_array()?.len() == 3).then_some(s)
    });
    s["leader_id"].as_u64().unwrap()
}

#[test]
fn client_errors_exit_1_and_unsent_writes_exit_5() {
    // A usage error is 1, not clap's 2 (which means "no capacity").
    let out = Command::new(BIN).args(["vm", "create"]).output().unwrap();
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    let out = Command::new(BIN).args(["vm", "frobnicate"]).output().unwrap();
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    let out = Command::new(BIN).arg("--help").output().unwrap();
    assert_eq!(out.status.code(), Some(0));

    // Invalid input caught before anything is sent.
    let out = cli_at("127.0.0.1", &["vm", "list"]);
    assert_eq!(out.status.code(), Some(1));
    assert_plain(&out);
    assert!(stderr(&out).contains("HOST:PORT"), "{}", stderr(&out));
    let out = create(&dead(), "x", &["--request-id", "has space"]);
    assert_eq!(out.status.code(), Some(1));
    assert_plain(&out);
    assert!(stderr(&out).contains("request id"), "{}", stderr(&out));

    // Nobody answers: a read is an error naming every member tried; a write
    // was never sent, so it did not apply.
    let (a, b) = (dead(), dead());
    let list = format!("{a},{b}");
    let out = cli_at(&list, &["vm", "list"]);
    assert_eq!(out.status.code(), Some(1));
    assert_plain(&out);
    assert!(stderr(&out).contains(&a) && stderr(&out).contains(&b), "{}", stderr(&out));
    let out = create(&list, "x", &[]);
    assert_eq!(out.status.code(), Some(5), "{}", stderr(&out));
    assert_plain(&out);
    assert!(stderr(&out).contains("not applied") && stderr(&out).contains(&b), "{}", stderr(&out));
}

#[test]
fn clients_fail_over_and_writes_apply_once() {
    let tmp = tempfile::tempdir().unwrap();
    let mut nodes = Nodes::three(tmp.path());
    let all = (1..=3).map(|id| nodes.addr(id)).collect::<Vec<_>>().join(",");
    let leader = formed(&nodes.addr(1));

    // A dead member first in the list is skipped, for reads and writes.
    let live = nodes.addr(2);
    let dead_first = format!("{},{live}", dead());
    let s = status(&dead_first).expect("status through dead,live");
    assert_eq!(s["node_id"], 2);
    let vm = created(&create(&dead_first, "via-list", &[]));
    assert_eq!(vm["name"], "via-list");

    // BLIXARD_ADDR takes a list too.
    let out = client_command(&nodes.addr(3))
        .env("BLIXARD_ADDR", format!("{},{}", dead(), nodes.addr(3)))
        .args(["vm", "get", "via-list", "-o", "json"])
        .output()
        .unwrap();
    assert!(out.status.success(), "BLIXARD_ADDR list: {}", stderr(&out));

    // The same request id twice, through different members: the second is
    // answered with the first outcome, and nothing is created twice.
    let before = vm_count(&all);
    let first = created(&create(&nodes.addr(1), "once", &["--request-id", "test-once-1"]));
    let again = created(&create(&nodes.addr(3), "once", &["--request-id", "test-once-1"]));
    for field in ["name", "node_id", "created_at_ms"] {
        assert_eq!(first[field], again[field], "{field} differs: {first} vs {again}");
    }
    assert_eq!(vm_count(&all), before + 1, "the retry created a second VM");
    // A new id is a new request: that one is refused.
    let dup = create(&all, "once", &[]);
    assert_eq!(dup.status.code(), Some(1));
    assert_plain(&dup);
    assert!(stderr(&dup).contains("already exists"), "{}", stderr(&dup));
    // Once the VM is deleted, the first request id still has its one
    // outcome: success, creating nothing, and saying so.
    let del = cli_at(&all, &["vm", "delete", "once"]);
    assert!(del.status.success(), "delete: {}", stderr(&del));
    let late = create(&all, "once", &["--request-id", "test-once-1"]);
    assert!(late.status.success(), "late retry ({:?}): {}", late.status.code(), stderr(&late));
    assert!(String::from_utf8_lossy(&late.stdout).contains("succeeded earlier"), "{late:?}");
    assert_eq!(vm_count(&all), before, "the late retry created the VM again");

    // Invalid input and not-found are errors (1), no capacity is 2.
    let bad = create(&all, "Not_Valid", &[]);
    assert_eq!(bad.status.code(), Some(1));
    assert_plain(&bad);
    assert!(stderr(&bad).contains("1-63 characters"), "{}", stderr(&bad));
    let missing = cli_at(&all, &["vm", "start", "no-such-vm"]);
    assert_eq!(missing.status.code(), Some(1));
    assert_plain(&missing);
    let big = cli_at(&all, &["vm", "create", "huge", "--vcpus", "64", "--memory", "1000000"]);
    assert_eq!(big.status.code(), Some(2), "{}", stderr(&big));

    // A stopped member (its kernel still accepts TCP) first in the list:
    // the command moves on and succeeds. Stop a follower, so a leader stays.
    let paused = (1..=3).find(|&id| id != leader).unwrap();
    let others: Vec<String> = (1..=3).filter(|&id| id != paused).map(|id| nodes.addr(id)).collect();
    let paused_first = format!("{},{}", nodes.addr(paused), others.join(","));
    nodes.signal(paused, libc::SIGSTOP);
    let t = Instant::now();
    let vm = created(&create(&paused_first, "past-paused", &[]));
    assert_eq!(vm["name"], "past-paused");
    let out = cli_at(&paused_first, &["vm", "get", "past-paused", "-o", "json"]);
    assert!(out.status.success(), "read past a stopped member: {}", stderr(&out));
    let out = cli_at(&paused_first, &["vm", "stop", "past-paused"]);
    assert!(out.status.success(), "write past a stopped member: {}", stderr(&out));
    // Far below the 30 s a write would wait on the stopped member alone.
    assert!(t.elapsed() < Duration::from_secs(60), "took {:?}", t.elapsed());
    nodes.signal(paused, libc::SIGCONT);

    // Two of three nodes gone: no write can commit. The create exits 5 (did
    // not apply) and says so in one line.
    let survivor = (1..=3).find(|&id| id != leader).unwrap();
    let killed: Vec<u64> = (1..=3).filter(|&id| id != survivor).collect();
    for &id in &killed {
        nodes.kill(id);
    }
    let t = Instant::now();
    let out = create(&all, "in-doubt", &["--request-id", "test-doubt-1"]);
    let err = stderr(&out);
    assert_plain(&out);
    // The survivor cannot lead (no quorum) and the leader refuses
    // connections: the write was provably never sent, so it is definite.
    assert_eq!(out.status.code(), Some(5), "{err}");
    assert!(err.contains("did not apply"), "{err}");
    for id in 1..=3 {
        assert!(err.contains(&nodes.addr(id)), "names every member tried: {err}");
    }
    assert!(t.elapsed() < Duration::from_secs(90), "took {:?}", t.elapsed());
    // A read that needs the leader fails with the node's own reason.
    let out = cli_at(&nodes.addr(survivor), &["vm", "list"]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert_plain(&out);

    // With the nodes back, the same request id tells the outcome: created,
    // exactly once (whether or not the first attempt applied).
    for &id in &killed {
        nodes.restart(id);
    }
    let vm = eventually("the retried create succeeds", 90, || {
        let out = create(&all, "in-doubt", &["--request-id", "test-doubt-1"]);
        out.status.success().then(|| serde_json::from_slice::<Value>(&out.stdout).unwrap())
    });
    assert_eq!(vm["name"], "in-doubt");
    let names: BTreeSet<String> = json(&all, &["vm", "list", "-o", "json"])
        .unwrap()
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["name"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(names, BTreeSet::from(["in-doubt", "past-paused", "via-list"].map(String::from)));
}
