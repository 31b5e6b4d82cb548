//! Self-healing through the CLI, end to end with three real node processes
//! running VMs as processes (`--vm-backend process`): the node timeout,
//! node statuses and heartbeat ages, `node drain` (stuck on a pinned VM,
//! exit 6; complete once it is gone), `node eligible`, `vm migrate --to
//! --wait`, a refused migration, `--reschedule never` and the move history.
//!
//! Waits are bounded; nothing here asserts how long anything takes.
mod common;

use std::path::PathBuf;

use common::*;
use serde_json::Value;

/// The exit code of a drain that could not complete.
const EXIT_INCOMPLETE: i32 = 6;

fn vm(port: u16, name: &str) -> Value {
    json_of(port, &["vm", "get", name, "-o", "json"])
}

fn names_on(port: u16, node: u64) -> Vec<String> {
    let list = json_of(port, &["vm", "list", "--node", &node.to_string(), "-o", "json"]);
    list.as_array().unwrap().iter().map(|v| v["name"].as_str().unwrap().to_string()).collect()
}

fn node(port: u16, id: u64) -> Value {
    json_of(port, &["node", "get", &id.to_string(), "-o", "json"])
}

fn history(v: &Value) -> Vec<Value> {
    v["history"].as_array().unwrap_or_else(|| panic!("no history in {v}")).clone()
}

#[test]
fn drain_eligible_migrate_and_history() {
    let root = tempfile::tempdir().unwrap();
    let dirs: Vec<PathBuf> = (1..=3).map(|i| root.path().join(format!("node-{i}"))).collect();
    let ports: Vec<u16> = (0..3).map(|_| free_port()).collect();
    let _workloads = Workloads(dirs.clone());
    let mut nodes = Nodes { procs: Vec::new(), dirs: dirs.clone(), ports: ports.clone() };
    let p = ports[0];
    let size = ["16", "8192", "100"];
    for i in 0..3 {
        let join = (i > 0).then_some(p);
        let child = start_node_backend(i as u64 + 1, ports[i], &dirs[i], join, size, "process", &[]);
        nodes.procs.push((i as u64 + 1, child));
    }
    eventually("3 nodes registered and ready", 90, || {
        let v: Value = serde_json::from_slice(&cli(p, &["node", "list", "-o", "json"]).stdout).ok()?;
        let n = v.as_array()?;
        (n.len() == 3 && n.iter().all(|n| n["status"] == "ready")).then_some(())
    });

    // ---- the node timeout: set, shown, range-checked.
    let text = ok(p, &["cluster", "set-node-timeout", "4"]);
    assert_eq!(text.trim(), "node timeout: 4s");
    assert_eq!(json_of(p, &["cluster", "status", "-o", "json"])["node_timeout_ms"], 4000);
    assert!(ok(p, &["cluster", "status"]).contains("node timeout 4s"));
    let out = exits(p, &["cluster", "set-node-timeout", "1"], 1);
    assert!(stderr(&out).contains("2 s to 3600 s"), "{}", stderr(&out));
    exits(p, &["cluster", "set-node-timeout", "soon"], 1);

    // ---- node list: three ready nodes the leader heard from recently.
    let listed = eventually("3 ready nodes with heartbeat ages", 30, || {
        let v = json_of(p, &["node", "list", "-o", "json"]);
        let all = v.as_array()?.iter().all(|n| {
            n["status"] == "ready" && n["last_heartbeat_age_ms"].as_u64().is_some_and(|age| age < 4000)
        });
        all.then_some(v)
    });
    for n in listed.as_array().unwrap() {
        assert_eq!(n["drain"], Value::Null, "{n}");
    }
    let table = ok(p, &["node", "list"]);
    assert!(table.contains("HEARTBEAT") && table.contains("s ago"), "{table}");

    // ---- VMs: six spread over the nodes, one pinned to node 2, and one
    // that stays with its node on failure.
    ok(p, &["vm", "create", "web", "--count", "6", "--memory", "64", "--wait", "--timeout", "60"]);
    ok(p, &["vm", "create", "pin", "--node", "2", "--memory", "64", "--wait", "--timeout", "60"]);
    let keep = json_of(p, &["vm", "create", "keep", "--memory", "64", "--reschedule", "never", "-o", "json"]);
    assert_eq!(keep["reschedule"], "never");
    assert_eq!(vm(p, "keep")["reschedule"], "never");
    let web1 = vm(p, "web-1");
    assert_eq!(web1["reschedule"], "on-node-failure");
    assert_eq!(web1["history"], Value::Array(Vec::new()));
    assert_eq!(web1["moving_reason"], Value::Null);
    assert_eq!(web1["moving_to"], Value::Null);
    assert!(web1["placement_generation"].is_u64(), "{web1}");
    let batch = json_of(
        p,
        &["vm", "create", "never", "--count", "2", "--memory", "64", "--reschedule", "never", "-o", "json"],
    );
    for v in batch["vms"].as_array().unwrap() {
        assert_eq!(v["reschedule"], "never", "{v}");
    }
    let listed = json_of(p, &["vm", "list", "-o", "json"]);
    assert!(listed
        .as_array()
        .unwrap()
        .iter()
        .all(|v| v["history"].is_array() && v["reschedule"].is_string()));

    let movers: Vec<String> = names_on(p, 2).into_iter().filter(|n| n != "pin").collect();
    assert!(!movers.is_empty(), "spread puts some VMs on node 2 besides the pinned one");

    // ---- drain node 2: everything but the pinned VM leaves; the command
    // says the pinned one cannot move, and exits 6.
    let out = exits(p, &["node", "drain", "2"], EXIT_INCOMPLETE);
    let err = stderr(&out);
    assert!(err.contains("pin (pinned to node 2)"), "{err}");
    assert!(stdout(&out).contains("cannot move pin: pinned to node 2"), "{}", stdout(&out));
    assert_eq!(names_on(p, 2), ["pin"], "only the pinned VM stays on node 2");
    let n2 = node(p, 2);
    assert_eq!(n2["status"], "draining", "{n2}");
    assert_eq!(n2["drain"]["max_parallel"], 2, "{n2}");
    let listed = json_of(p, &["node", "list", "-o", "json"]);
    let status_2 = listed.as_array().unwrap().iter().find(|n| n["id"] == 2).unwrap()["status"].clone();
    assert_eq!(status_2, "draining");
    exits(p, &["vm", "create", "late", "--node", "2", "--memory", "64"], 2);

    // ---- without the pinned VM the drain completes.
    ok(p, &["vm", "delete", "pin", "--wait", "--timeout", "60"]);
    let out = exits(p, &["node", "drain", "2"], 0);
    assert!(stdout(&out).contains("node 2 drained"), "{}", stdout(&out));
    assert!(names_on(p, 2).is_empty());
    for name in &movers {
        let v = eventually(&format!("{name} running on another node"), 60, || {
            let v = vm(p, name);
            (v["observed"] == "running").then_some(v)
        });
        let on = v["node_id"].as_u64().unwrap();
        assert!(on == 1 || on == 3, "{v}");
        let moves = history(&v);
        let last = moves.last().unwrap_or_else(|| panic!("no move recorded: {v}"));
        assert_eq!(last["reason"], "drain", "{v}");
        assert_eq!(last["from_node"], 2, "{v}");
        assert_eq!(last["to_node"], on, "{v}");
        assert!(last["at_ms"].as_u64().unwrap() > 0 && last["revision"].as_u64().unwrap() > 0, "{v}");
        assert!(v["placement_generation"].as_u64().unwrap() >= 1, "{v}");
    }
    let shown = ok(p, &["vm", "get", &movers[0]]);
    assert!(shown.contains("to node") && shown.contains("(drain) at "), "{shown}");
    assert!(shown.contains("reschedule: on-node-failure"), "{shown}");

    // ---- eligible: node 2 takes VMs again.
    let text = ok(p, &["node", "eligible", "2"]);
    assert!(text.contains("node 2 takes new VMs again"), "{text}");
    let n2 = node(p, 2);
    assert_eq!(n2["status"], "ready", "{n2}");
    assert_eq!(n2["drain"], Value::Null, "{n2}");

    // ---- migrate one of them back to node 2 and wait for it.
    let name = movers[0].as_str();
    let from = vm(p, name)["node_id"].as_u64().unwrap();
    let out = exits(p, &["vm", "migrate", name, "--to", "2", "--wait", "--timeout", "120"], 0);
    assert!(stdout(&out).contains(&format!("moved from node {from} to node 2")), "{}", stdout(&out));
    let v = vm(p, name);
    assert_eq!(v["node_id"], 2, "{v}");
    assert_eq!(v["observed"], "running", "{v}");
    let last = history(&v).last().cloned().unwrap();
    assert_eq!(
        (&last["reason"], &last["from_node"], &last["to_node"]),
        (&"migrate".into(), &from.into(), &2.into())
    );

    // ---- a stopped VM moves too, and stays stopped on its new node.
    let cold = json_of(p, &["vm", "create", "cold", "--memory", "64", "--no-start", "-o", "json"]);
    let cold_from = cold["node_id"].as_u64().unwrap();
    let out = exits(p, &["vm", "migrate", "cold", "--wait", "--timeout", "60"], 0);
    assert!(stdout(&out).contains(&format!("moved from node {cold_from} to node")), "{}", stdout(&out));
    let v = vm(p, "cold");
    let cold_to = v["node_id"].as_u64().unwrap();
    assert!(cold_to != 0 && cold_to != cold_from, "{v}");
    assert_eq!(
        (&v["observed"], &v["desired"], &v["leaving_node"]),
        (&"stopped".into(), &"stopped".into(), &Value::Null)
    );
    let last = history(&v).last().cloned().unwrap();
    assert_eq!((&last["reason"], &last["to_node"]), (&"migrate".into(), &cold_to.into()), "{v}");

    // ---- a pinned VM cannot migrate: FailedPrecondition (exit 1), why.
    ok(p, &["vm", "create", "pin3", "--node", "3", "--memory", "64"]);
    let out = exits(p, &["vm", "migrate", "pin3"], 1);
    assert!(stderr(&out).contains("pinned to node 3"), "{}", stderr(&out));
    let out = exits(p, &["vm", "migrate", name, "--to", "2"], 1);
    assert!(stderr(&out).contains("already on node 2"), "{}", stderr(&out));

    // ---- a detached drain answers at once with what it started.
    let out = exits(p, &["node", "drain", "3", "--detach", "--max-parallel", "0"], 0);
    let text = stdout(&out);
    assert!(text.contains("node 3 draining (all VMs moving at once)"), "{text}");
    assert!(text.contains("cannot move pin3: pinned to node 3"), "{text}");
    ok(p, &["node", "eligible", "3"]);
}
