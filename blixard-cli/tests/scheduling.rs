//! The scheduling contract of `vm create`, end to end through three real
//! node processes on loopback (VMs are records only: `--vm-backend none`):
//! `--count`, `--spread-by`, `--node`, `--constraint` (= and !=),
//! `--anti-affinity`, `--dry-run`, all-or-nothing batches, `--queue` and
//! work conservation, priority preemption, the JSON and table views of
//! placement, and `node set` refused when it would break a constraint.
//!
//! Nodes 1 and 2 (zone=a) offer 16 vCPUs and 8192 MiB each; node 3
//! (zone=b) 16 vCPUs and only 2048 MiB. The default strategy (spread: most
//! free memory) therefore never picks node 3 for a VM without placement
//! rules, so every VM that lands there got there by its rules.
mod common;

use std::collections::BTreeSet;
use std::path::PathBuf;

use common::*;
use serde_json::{json, Value};

/// Runs a command that must exit with `code`; its stderr.
fn fails(port: u16, args: &[&str], code: i32) -> String {
    stderr(&exits(port, args, code))
}

fn vm(port: u16, name: &str) -> Value {
    json_of(port, &["vm", "get", name, "-o", "json"])
}

/// Whether VM `name` exists (`vm get` exits 0, or 1 saying there is none).
fn exists(port: u16, name: &str) -> bool {
    let out = cli(port, &["vm", "get", name]);
    match out.status.code() {
        Some(0) => true,
        Some(1) if stderr(&out).contains("no VM named") => false,
        _ => panic!("vm get {name}: {}", stderr(&out)),
    }
}

fn node_of(v: &Value) -> u64 {
    v["node_id"].as_u64().unwrap_or_else(|| panic!("no node_id in {v}"))
}

/// The whitespace-separated cells of the table row for `name` in `text`.
fn row(text: &str, name: &str) -> Vec<String> {
    text.lines()
        .map(|l| l.split_whitespace().map(str::to_string).collect::<Vec<_>>())
        .find(|cells| cells.first().map(String::as_str) == Some(name))
        .unwrap_or_else(|| panic!("no row for {name} in:\n{text}"))
}

/// Node 3's free memory (allocatable - allocated), MiB.
fn free_memory_3(port: u16) -> u64 {
    let n = json_of(port, &["node", "get", "3", "-o", "json"]);
    n["allocatable"]["memory_mb"].as_u64().unwrap() - n["allocated"]["memory_mb"].as_u64().unwrap()
}

#[test]
fn scheduling_through_the_cli() {
    let root = tempfile::tempdir().unwrap();
    let dirs: Vec<PathBuf> = (1..=3).map(|i| root.path().join(format!("node-{i}"))).collect();
    let ports: Vec<u16> = (0..3).map(|_| free_port()).collect();
    let mut nodes = Nodes { procs: Vec::new(), dirs: dirs.clone(), ports: ports.clone() };
    let big = ["16", "8192", "100"];
    let small = ["16", "2048", "100"];
    let p = ports[0];
    nodes.procs.push((1, start_node_sized(1, p, &dirs[0], None, big, &["--label", "zone=a"])));
    nodes.procs.push((2, start_node_sized(2, ports[1], &dirs[1], Some(p), big, &["--label", "zone=a"])));
    nodes.procs.push((3, start_node_sized(3, ports[2], &dirs[2], Some(p), small, &["--label", "zone=b"])));
    eventually("3 nodes registered and active", 90, || {
        let out = cli(p, &["node", "list", "-o", "json"]);
        let v: Value = serde_json::from_slice(&out.stdout).ok()?;
        let n = v.as_array()?;
        (n.len() == 3 && n.iter().all(|n| n["status"] == "ready")).then_some(())
    });

    // ---- --count: NAME-1 .. NAME-N in one request; JSON lists placements and VMs.
    let made = json_of(p, &["vm", "create", "web", "--count", "3", "--no-start", "-o", "json"]);
    assert_eq!(made["dry_run"], false);
    let placed = made["placed"].as_array().unwrap();
    let names: Vec<&str> = placed.iter().map(|x| x["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["web-1", "web-2", "web-3"]);
    let vms = made["vms"].as_array().unwrap();
    assert_eq!(vms.len(), 3);
    for (x, v) in placed.iter().zip(vms) {
        assert_eq!(x["name"], v["name"]);
        assert_eq!(x["node_id"], v["node_id"]);
        assert_eq!(x["queued"], false);
        assert_eq!(x["preempted"], json!([]));
        assert_ne!(node_of(v), 3, "without rules, spread never picks the small node: {v}");
    }
    for name in ["web-1", "web-2", "web-3"] {
        assert_eq!(vm(p, name)["desired"], "stopped");
    }
    assert!(!exists(p, "web"), "--count names the VMs NAME-i only");
    let text = ok(p, &["vm", "create", "txt", "--count", "2", "--no-start"]);
    assert!(text.starts_with("created 2 VMs"), "{text}");
    assert_eq!(row(&text, "txt-2")[2], "placed", "{text}");

    // ---- --spread-by zone: the tenant's 6 VMs alternate between the zones,
    // so the one zone-b node takes 3 (spread alone would give it none).
    let made = json_of(
        p,
        &[
            "vm",
            "create",
            "sp",
            "--count",
            "6",
            "--spread-by",
            "zone",
            "--tenant",
            "sp",
            "--no-start",
            "-o",
            "json",
        ],
    );
    let on_3 = made["placed"].as_array().unwrap().iter().filter(|x| x["node_id"] == 3).count();
    assert_eq!(on_3, 3, "{made}");
    assert_eq!(vm(p, "sp-1")["placement"]["spread_by"], "zone");

    // ---- --node: pinned; the placement shows in JSON with its defaults.
    let v = json_of(p, &["vm", "create", "pinned", "--node", "3", "--no-start", "-o", "json"]);
    assert_eq!(node_of(&v), 3);
    assert_eq!(
        v["placement"],
        json!({ "node_id": 3, "constraints": [], "anti_affinity": "", "spread_by": "", "priority": 50 })
    );
    assert_eq!(v["queued_at"], Value::Null);
    assert_eq!(v["preempted_by"], "");
    let err = fails(p, &["vm", "create", "nowhere", "--node", "9", "--no-start"], 1);
    assert!(err.contains("unknown node id 9"), "{err}");
    assert!(!exists(p, "nowhere"));

    // ---- --constraint: = and != (an absent label passes !=), repeatable.
    assert_eq!(
        node_of(&json_of(p, &["vm", "create", "in-b", "--constraint", "zone=b", "--no-start", "-o", "json"])),
        3
    );
    assert_eq!(
        node_of(&json_of(
            p,
            &["vm", "create", "not-a", "--constraint", "zone!=a", "--no-start", "-o", "json"]
        )),
        3
    );
    let both = json_of(
        p,
        &[
            "vm",
            "create",
            "both",
            "--constraint",
            "zone!=a",
            "--constraint",
            "zone=b",
            "--no-start",
            "-o",
            "json",
        ],
    );
    assert_eq!(node_of(&both), 3);
    assert_eq!(both["placement"]["constraints"], json!(["zone!=a", "zone=b"]));
    let absent =
        json_of(p, &["vm", "create", "no-rack", "--constraint", "rack!=r1", "--no-start", "-o", "json"]);
    assert_ne!(node_of(&absent), 0);
    let err = fails(p, &["vm", "create", "eu", "--constraint", "zone=eu", "--no-start"], 2);
    assert!(err.contains("no node fits eu") && err.contains("3 excluded by constraint zone=eu"), "{err}");
    assert!(!exists(p, "eu"));
    // Malformed flags are refused before anything is sent.
    for (args, says) in [
        (&["vm", "create", "bad", "--constraint", "zone"][..], "KEY=VALUE or KEY!=VALUE"),
        (&["vm", "create", "bad", "--constraint", "=a"], "KEY=VALUE or KEY!=VALUE"),
        (&["vm", "create", "bad", "--count", "0"], "--count"),
        (&["vm", "create", "bad", "--priority", "101"], "--priority"),
        (&["vm", "create", "bad", "--dry-run", "--wait"], "--wait"),
    ] {
        let err = fails(p, args, 1);
        assert!(err.contains(says), "{args:?}: {err}");
    }
    assert!(!exists(p, "bad"));

    // ---- --anti-affinity: one VM of a group per node; a group larger than
    // the nodes fails as a whole (all or nothing), saying why.
    let made = json_of(
        p,
        &["vm", "create", "db", "--count", "3", "--anti-affinity", "db", "--no-start", "-o", "json"],
    );
    let db_nodes: BTreeSet<u64> = made["vms"].as_array().unwrap().iter().map(node_of).collect();
    assert_eq!(db_nodes, BTreeSet::from([1, 2, 3]), "{made}");
    assert_eq!(vm(p, "db-1")["placement"]["anti_affinity"], "db");
    let err = fails(p, &["vm", "create", "db-4", "--anti-affinity", "db", "--no-start"], 2);
    assert!(err.contains("3 excluded by anti-affinity group db"), "{err}");
    assert!(!exists(p, "db-4"));
    let err =
        fails(p, &["vm", "create", "cache", "--count", "4", "--anti-affinity", "cache", "--no-start"], 2);
    assert!(err.contains("no node fits cache-4") && err.contains("anti-affinity group cache"), "{err}");
    for i in 1..=4 {
        assert!(!exists(p, &format!("cache-{i}")), "cache-{i} created by a failed --count");
    }

    // ---- --dry-run: where it would go and why; nothing is created.
    let text = ok(p, &["vm", "create", "dr", "--constraint", "zone=b", "--dry-run"]);
    assert!(text.contains("dry run"), "{text}");
    assert_eq!(row(&text, "dr")[1..3], ["3", "placed"], "{text}");
    assert!(text.contains("2 excluded by constraint zone=b, 1 fit"), "{text}");
    let dry = json_of(p, &["vm", "create", "dr", "--constraint", "zone=b", "--dry-run", "-o", "json"]);
    assert_eq!(dry["dry_run"], true);
    assert_eq!(dry["placed"], json!([{ "name": "dr", "node_id": 3, "queued": false, "preempted": [] }]));
    assert!(
        dry["explanation"].as_str().unwrap().starts_with("3 nodes; 2 excluded by constraint zone=b"),
        "{dry}"
    );
    let dry = json_of(
        p,
        &["vm", "create", "dr", "--count", "2", "--anti-affinity", "dr", "--dry-run", "-o", "json"],
    );
    let dry_nodes: BTreeSet<u64> = dry["placed"].as_array().unwrap().iter().map(node_of).collect();
    assert_eq!(dry_nodes.len(), 2, "{dry}");
    let err = fails(p, &["vm", "create", "dr", "--constraint", "zone=eu", "--dry-run"], 2);
    assert!(err.contains("3 excluded by constraint zone=eu"), "{err}");
    for name in ["dr", "dr-1", "dr-2"] {
        assert!(!exists(p, name), "a dry run created {name}");
    }

    // ---- --queue: node 3 (the only zone=b node) full; a VM of equal
    // priority may not preempt, so without --queue it fails (exit 2) ...
    let free = free_memory_3(p);
    let fill = json_of(
        p,
        &[
            "vm",
            "create",
            "fill",
            "--constraint",
            "zone=b",
            "--memory",
            &free.to_string(),
            "--priority",
            "10",
            "-o",
            "json",
        ],
    );
    assert_eq!(node_of(&fill), 3);
    assert_eq!(free_memory_3(p), 0);
    let q1 = ["vm", "create", "q1", "--constraint", "zone=b", "--memory", "512", "--priority", "10"];
    let err = fails(p, &q1, 2);
    assert!(
        err.contains("no node fits q1") && err.contains("2 excluded by constraint zone=b, 1 lack memory"),
        "{err}"
    );
    assert!(!exists(p, "q1"));
    assert_eq!(node_of(&vm(p, "fill")), 3, "equal priority must not preempt");
    // ... and with --queue it waits, observed "queued", on no node.
    let text = ok(p, &[&q1[..], &["--queue"]].concat());
    assert!(text.contains("queued: no node fits now; it starts when capacity appears"), "{text}");
    let v = vm(p, "q1");
    assert_eq!(
        (v["observed"].as_str(), node_of(&v), v["desired"].as_str()),
        (Some("queued"), 0, Some("running"))
    );
    assert!(v["queued_at"].as_u64().is_some_and(|i| i > 0), "{v}");
    assert_eq!(
        v["placement"],
        json!({ "node_id": null, "constraints": ["zone=b"], "anti_affinity": "", "spread_by": "", "priority": 10 })
    );
    let list = ok(p, &["vm", "list"]);
    assert_eq!(row(&list, "q1")[..7], ["q1", "-", "1", "512", "1", "running", "queued"], "{list}");
    assert_eq!(row(&ok(p, &["vm", "get", "q1"]), "q1")[..7], row(&list, "q1")[..7]);
    let status = ok(p, &["vm", "status", "q1"]);
    assert!(status.contains("node:      -") && status.contains("not placed"), "{status}");

    // ---- work conservation: deleting the filler places the queued VM.
    ok(p, &["vm", "delete", "fill"]);
    let v = eventually("q1 placed once fill is gone", 30, || {
        let v = vm(p, "q1");
        (v["observed"] != "queued").then_some(v)
    });
    assert_eq!((node_of(&v), v["observed"].as_str()), (3, Some("pending")), "{v}");
    assert_eq!(v["queued_at"], Value::Null);

    // ---- preemption: a higher priority that fits nowhere evicts the
    // lowest-priority VM from node 3; the evicted VM is queued, not deleted.
    let need = free_memory_3(p) + 512;
    let text = ok(
        p,
        &["vm", "create", "hi", "--constraint", "zone=b", "--memory", &need.to_string(), "--priority", "90"],
    );
    assert!(text.contains("VM hi placed on node 3"), "{text}");
    assert!(text.contains("preempted q1"), "{text}");
    assert_eq!(node_of(&vm(p, "hi")), 3);
    let v = vm(p, "q1");
    assert_eq!((v["observed"].as_str(), node_of(&v)), (Some("queued"), 0), "{v}");
    assert_eq!(v["preempted_by"], "hi");
    assert_eq!(node_of(&vm(p, "pinned")), 3, "only the lowest priority is evicted");
    let list = ok(p, &["vm", "list"]);
    assert!(
        list.lines().any(|l| l.trim_start().starts_with("q1 ") && l.contains("queued (preempted by hi)")),
        "{list}"
    );
    // A dry run names what it would preempt, and changes nothing.
    let dry = json_of(
        p,
        &[
            "vm",
            "create",
            "hi2",
            "--node",
            "3",
            "--memory",
            "128",
            "--priority",
            "100",
            "--dry-run",
            "-o",
            "json",
        ],
    );
    assert_eq!(dry["placed"][0]["node_id"], 3, "{dry}");
    assert_eq!(dry["placed"][0]["preempted"].as_array().map(Vec::len), Some(1), "{dry}");
    assert!(!exists(p, "hi2"));
    assert_eq!(node_of(&vm(p, "hi")), 3);

    // ---- node set may not break a placed VM's constraint.
    let err = fails(p, &["node", "set", "3", "--remove-label", "zone"], 1);
    assert!(err.contains("would break") && err.contains("constraint zone=b"), "{err}");
    // Changing the value breaks in-b's zone=b (or not-a's zone!=a).
    let err = fails(p, &["node", "set", "3", "--label", "zone=a"], 1);
    assert!(err.contains("constraint zone=b") || err.contains("constraint zone!=a"), "{err}");
    assert_eq!(json_of(p, &["node", "get", "3", "-o", "json"])["labels"], json!({ "zone": "b" }));
    let set = json_of(p, &["node", "set", "3", "--label", "tier=x", "-o", "json"]);
    assert_eq!(set["labels"], json!({ "tier": "x", "zone": "b" }));

    drop(nodes);
}
