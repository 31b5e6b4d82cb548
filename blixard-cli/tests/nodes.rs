//! The node resource contract, end to end through real processes: `node
//! start` reservation and overcommit flags, `node list` / `node get` JSON,
//! `node set` (labels, ratios) refused when VMs would not fit, and operator
//! overrides that outlive a restart.
mod common;

use common::*;
use serde_json::{json, Value};

fn node_1(port: u16) -> Value {
    json_of(port, &["node", "get", "1", "-o", "json"])
}

fn res(vcpus: u64, memory_mb: u64, disk_gb: u64) -> Value {
    json!({ "vcpus": vcpus, "memory_mb": memory_mb, "disk_gb": disk_gb })
}

#[test]
fn node_resources_and_overrides() {
    let root = tempfile::tempdir().unwrap();
    let dir = root.path().join("node-1");
    let port = free_port();
    let flags = ["--reserve-vcpus", "4", "--reserve-memory-mb", "1024", "--cpu-overcommit", "2"];
    let child = start_node_with(1, port, &dir, None, &[&flags[..], &["--label", "zone=a"]].concat());
    let mut nodes = Nodes { procs: vec![(1, child)], dirs: vec![dir], ports: vec![port] };

    // 16 vCPUs, 8192 MiB, 100 GiB (start_node's capacity flags).
    let n = eventually("node 1 registered", 60, || {
        let out = cli(port, &["node", "list", "-o", "json"]);
        let v: Value = serde_json::from_slice(&out.stdout).ok()?;
        v.as_array()?.first().cloned()
    });
    assert_eq!(n["id"], 1);
    assert_eq!(n["addr"], loopback(port));
    assert_eq!(n["status"], "ready");
    assert_eq!(n["labels"], json!({ "zone": "a" }));
    assert_eq!(n["capacity"], res(16, 8192, 100));
    assert_eq!(n["reserved"], res(4, 1024, 0));
    assert_eq!(n["allocatable"], res(24, 7168, 100), "(16 - 4) x 2 vCPUs");
    assert_eq!(n["allocated"], res(0, 0, 0));
    assert_eq!(n["cpu_overcommit"], 2.0);
    assert_eq!(n["memory_overcommit"], 1.0);
    assert_eq!(n["vm_count"], 0);
    // The heartbeat age is read afresh by each command (null until the
    // leader has one).
    let without_age = |mut v: Value| {
        v["last_heartbeat_age_ms"] = Value::Null;
        v
    };
    // A background write (the liveness monitor marking the node as one that
    // heartbeats) may land between two reads: compare a pair read back to
    // back until one agrees.
    eventually("node get to show what node list does", 30, || {
        let out = cli(port, &["node", "list", "-o", "json"]);
        let listed: Value = serde_json::from_slice(&out.stdout).ok()?;
        let listed = listed.as_array()?.first()?.clone();
        (without_age(node_1(port)) == without_age(listed)).then_some(())
    });

    // Overcommitted CPU is placeable: 24 vCPUs on a 16-vCPU host; no more.
    for i in 0..3 {
        let out = cli(
            port,
            &["vm", "create", &format!("big-{i}"), "--vcpus", "8", "--memory", "512", "--no-start"],
        );
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    }
    let full = cli(port, &["vm", "create", "one-more", "--vcpus", "1", "--memory", "64", "--no-start"]);
    assert_eq!(full.status.code(), Some(2), "no capacity: {}", String::from_utf8_lossy(&full.stderr));
    assert_eq!(node_1(port)["allocated"], res(24, 1536, 3));

    // A ratio that would leave the VMs above allocatable is refused, with
    // the reason, and changes nothing.
    let refused = cli(port, &["node", "set", "1", "--cpu-overcommit", "1.5", "--label", "x=y"]);
    assert_eq!(refused.status.code(), Some(1));
    let err = String::from_utf8_lossy(&refused.stderr);
    assert!(err.contains("allocatable") && err.contains("18 vCPUs"), "{err}");
    assert_eq!(node_1(port)["cpu_overcommit"], 2.0);
    assert_eq!(node_1(port)["labels"], json!({ "zone": "a" }));

    // Labels and a higher ratio apply at once and make room.
    let set = json_of(
        port,
        &[
            "node",
            "set",
            "1",
            "--label",
            "tier=gold",
            "--remove-label",
            "zone",
            "--cpu-overcommit",
            "3",
            "-o",
            "json",
        ],
    );
    assert_eq!(set["labels"], json!({ "tier": "gold" }));
    assert_eq!(set["allocatable"], res(36, 7168, 100));
    let out = cli(port, &["vm", "create", "one-more", "--vcpus", "1", "--memory", "64", "--no-start"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));

    // Restarted with other flags (no reservation, no --label): the flags
    // change what they set, the operator's overrides stay in force.
    nodes.kill(1);
    nodes.restart(1);
    let n = eventually("node 1 re-registered with its new flags", 60, || {
        let out = cli(port, &["node", "get", "1", "-o", "json"]);
        let v: Value = serde_json::from_slice(&out.stdout).ok()?;
        (v["reserved"] == res(0, 0, 0)).then_some(v)
    });
    assert_eq!(n["labels"], json!({ "tier": "gold" }));
    assert_eq!(n["cpu_overcommit"], 3.0);
    assert_eq!(n["allocatable"], res(48, 8192, 100));
    assert_eq!(n["vm_count"], 4);

    // Errors are plain and exit 1.
    for args in [
        &["node", "get", "99"][..],
        &["node", "set", "1"],
        &["node", "set", "1", "--cpu-overcommit", "0"],
        &["node", "set", "1", "--memory-overcommit", "1.2345"],
        &["node", "set", "9", "--label", "a=b"],
    ] {
        let out = cli(port, args);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
    }
    let out = cli(port, &["node", "get", "99"]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("unknown node id 99"));
}
