//! Tenant quotas end to end through a real node: set/get/list/delete, JSON
//! contract, exit code 3 when a create would exceed the tenant's quota; the
//! cluster's placement strategy (`cluster set-scheduler`).
mod common;

use common::*;
use serde_json::{json, Value};

fn create(port: u16, name: &str, tenant: &str, vcpus: &str) -> std::process::Output {
    cli(port, &["vm", "create", name, "--tenant", tenant, "--vcpus", vcpus, "--memory", "128", "--no-start"])
}

#[test]
fn quotas_limit_tenants() {
    let root = tempfile::tempdir().unwrap();
    let dir = root.path().join("node-1");
    let port = free_port();
    let _nodes =
        Nodes { procs: vec![(1, start_node(1, port, &dir, None))], dirs: vec![dir], ports: vec![port] };
    eventually("node 1 registered", 60, || {
        let out = cli(port, &["node", "list", "-o", "json"]);
        let v: Value = serde_json::from_slice(&out.stdout).ok()?;
        (!v.as_array()?.is_empty()).then_some(())
    });

    let q = json_of(port, &["quota", "set", "acme", "--vcpus", "4", "--vms", "3", "-o", "json"]);
    assert_eq!(
        q,
        json!({
            "tenant": "acme",
            "limits": { "vcpus": 4, "memory_mb": null, "disk_gb": null, "vms": 3 },
            "usage": { "vcpus": 0, "memory_mb": 0, "disk_gb": 0, "vms": 0 },
        })
    );
    for (name, vcpus) in [("a1", "2"), ("a2", "2")] {
        let out = create(port, name, "acme", vcpus);
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    }
    let over = create(port, "a3", "acme", "1");
    assert_eq!(over.status.code(), Some(3), "{}", String::from_utf8_lossy(&over.stderr));
    let err = String::from_utf8_lossy(&over.stderr);
    assert!(err.contains("quota") && err.contains("4 used + 1 asked > 4 allowed"), "{err}");
    // Other tenants are not limited; a VM that fits nowhere is still exit 2.
    assert!(create(port, "b1", "beta", "1").status.success());
    assert_eq!(create(port, "huge", "beta", "64").status.code(), Some(2));

    let got = json_of(port, &["quota", "get", "acme", "-o", "json"]);
    assert_eq!(got["usage"], json!({ "vcpus": 4, "memory_mb": 256, "disk_gb": 2, "vms": 2 }));
    let list = json_of(port, &["quota", "list", "-o", "json"]);
    assert_eq!(list.as_array().unwrap().len(), 1);
    assert_eq!(list[0], got);

    // Set replaces the limits: vCPUs unlimited now, VMs still 3.
    assert!(cli(port, &["quota", "set", "acme", "--vms", "3"]).status.success());
    assert!(create(port, "a3", "acme", "8").status.success());
    assert_eq!(create(port, "a4", "acme", "1").status.code(), Some(3), "3 VMs is the limit");

    let out = cli(port, &["quota", "delete", "acme"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(create(port, "a4", "acme", "1").status.success());
    for args in [&["quota", "get", "acme"][..], &["quota", "delete", "acme"], &["quota", "set", "acme"]] {
        let out = cli(port, args);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
    }
    let out = cli(port, &["quota", "set", "Bad Tenant", "--vms", "1"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("tenant"));

    // The placement strategy is replicated state, shown by cluster status.
    let scheduler = || json_of(port, &["cluster", "status", "-o", "json"])["scheduler"].clone();
    assert_eq!(scheduler(), "spread");
    let out = cli(port, &["cluster", "set-scheduler", "binpack"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(scheduler(), "binpack");
    assert_eq!(cli(port, &["cluster", "set-scheduler", "random"]).status.code(), Some(1));
    assert_eq!(scheduler(), "binpack");
}
