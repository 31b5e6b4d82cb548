//! The peer link end to end (blixard-core raft/link.rs), real node processes:
//! a follower with a link gets its AppendEntries over it, one started with
//! `--peer-port none` over gRPC, both stay in step with the leader; a
//! follower that restarts on a new link port (ports are picked afresh on
//! every start) gets them over the link again once the leader has learned
//! the new port from its replies. Writes sent to a follower reach the leader
//! on the leader's link too, when it has one. Counted by each node's
//! `blixard_raft_append_entries_total{transport}` and
//! `blixard_raft_forwards_total{transport}` on its metrics endpoint.
mod common;

use std::path::{Path, PathBuf};

use common::*;

/// The counter `name` of the node serving metrics at `metrics`, by
/// transport: (over the link, over gRPC).
fn by_transport(metrics: &str, name: &str) -> Option<(u64, u64)> {
    let (code, body) = http_get(metrics, "/metrics")?;
    if code != 200 {
        return None;
    }
    let count = |transport: &str| {
        body.lines()
            .filter(|l| l.starts_with(&format!("{name}{{")))
            .filter(|l| l.contains(&format!("transport=\"{transport}\"")))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum::<f64>() as u64
    };
    Some((count("link"), count("grpc")))
}

/// AppendEntries the node answered: (over the link, over gRPC).
fn appends(metrics: &str) -> Option<(u64, u64)> {
    by_transport(metrics, "blixard_raft_append_entries_total")
}

/// Forwarded write calls the node answered: (over the link, over gRPC).
fn forwards(metrics: &str) -> Option<(u64, u64)> {
    by_transport(metrics, "blixard_raft_forwards_total")
}

fn leader(addrs: &str) -> Option<u64> {
    let out =
        client_command(addrs).args(["--addr", addrs, "cluster", "status", "-o", "json"]).output().ok()?;
    let v: serde_json::Value = serde_json::from_str(&stdout(&out)).ok()?;
    let voters = v["members"].as_array()?.iter().filter(|m| m["role"] != "learner").count();
    v["leader_id"].as_u64().filter(|_| voters == 3)
}

fn write_some(port: u16, tag: &str) {
    for i in 0..20 {
        let name = format!("{tag}-{i}");
        eventually(&format!("create {name}"), 30, || {
            let o = cli(
                port,
                &["vm", "create", &name, "--vcpus", "1", "--memory", "16", "--disk", "1", "--no-start"],
            );
            o.status.success().then_some(())
        });
    }
}

fn start(
    id: u64,
    port: u16,
    dir: &Path,
    join: Option<u16>,
    metrics: &str,
    link: bool,
) -> std::process::Child {
    let mut extra = vec!["--metrics-addr", metrics];
    if !link {
        extra.extend(["--peer-port", "none"]);
    }
    start_node_with(id, port, dir, join, &extra)
}

#[test]
fn append_entries_take_the_peer_link_where_a_follower_has_one() {
    let root = tempfile::tempdir().unwrap();
    let dirs: Vec<PathBuf> = (1..=3).map(|i| root.path().join(format!("node-{i}"))).collect();
    let ports: Vec<u16> = (0..3).map(|_| free_port()).collect();
    let metrics: Vec<String> = (0..3).map(|_| loopback(free_port())).collect();
    // Node 3 has no link.
    let link = |id: u64| id != 3;
    let mut nodes = Nodes { procs: Vec::new(), dirs: dirs.clone(), ports: ports.clone() };
    nodes.procs.push((1, start(1, ports[0], &dirs[0], None, &metrics[0], true)));
    for id in 2..=3u64 {
        let i = id as usize - 1;
        nodes.procs.push((id, start(id, ports[i], &dirs[i], Some(ports[0]), &metrics[i], link(id))));
    }
    let all = ports.iter().map(|p| loopback(*p)).collect::<Vec<_>>().join(",");
    let lead = eventually("a leader with three voters", 60, || leader(&all));
    write_some(ports[(lead - 1) as usize], "first");

    // Every follower answered AppendEntries (heartbeats at least) by the
    // transport it offers; a follower with a link took (nearly) all of them
    // over it: gRPC carries only those sent before the leader learned its
    // port. The writes above are on every node.
    let followers: Vec<u64> = (1..=3).filter(|id| *id != lead).collect();
    for &id in &followers {
        let m = &metrics[(id - 1) as usize];
        let (on_link, on_grpc) = eventually(&format!("node {id} answering AppendEntries"), 30, || {
            appends(m).filter(|(l, g)| if link(id) { *l > 20 } else { *g > 20 })
        });
        if link(id) {
            assert!(
                on_link > on_grpc,
                "node {id}: {on_link} AppendEntries over the link, {on_grpc} over gRPC"
            );
        } else {
            assert_eq!(on_link, 0, "node {id} has no link, yet answered {on_link} AppendEntries on one");
        }
        eventually(&format!("node {id} applied the writes"), 30, || {
            let o = cli(ports[(id - 1) as usize], &["vm", "get", "first-19", "--stale", "-o", "json"]);
            o.status.success().then_some(())
        });
    }

    // Writes sent to a follower are forwarded to the leader: on the
    // leader's link if it has one (the first over gRPC, whose reply
    // announces the link's port), otherwise all over gRPC. Here: deleting
    // the VMs made above, through a follower.
    let via = followers[0];
    let before = forwards(&metrics[(lead - 1) as usize]).expect("the leader's metrics");
    for i in 0..20 {
        let name = format!("first-{i}");
        eventually(&format!("delete {name} through node {via}"), 30, || {
            let o = cli(ports[(via - 1) as usize], &["vm", "delete", &name]);
            o.status.success().then_some(())
        });
    }
    let after = eventually("the leader's forward counts", 30, || {
        forwards(&metrics[(lead - 1) as usize]).filter(|(l, g)| l + g >= before.0 + before.1 + 20)
    });
    let (on_link, on_grpc) = (after.0 - before.0, after.1 - before.1);
    if link(lead) {
        assert!(
            on_link >= 10 && on_link > on_grpc,
            "leader {lead} took {on_link} forwards from node {via} over its link and {on_grpc} over gRPC"
        );
    } else {
        assert_eq!(on_link, 0, "leader {lead} has no link, yet took {on_link} forwards on one");
    }
    // Read-your-writes on the follower that forwarded them.
    let o = cli(ports[(via - 1) as usize], &["vm", "get", "first-19", "-o", "json"]);
    assert!(!o.status.success(), "first-19 is still there after its delete through node {via}");

    // A follower with a link restarts: a new process, a new link port.
    let Some(&again) = followers.iter().find(|id| link(**id)) else {
        panic!("no follower with a link: leader {lead}, followers {followers:?}");
    };
    let i = (again - 1) as usize;
    nodes.kill(again);
    nodes.procs.push((again, start(again, ports[i], &dirs[i], None, &metrics[i], true)));
    let lead = eventually("a leader after the restart", 60, || leader(&all));
    write_some(ports[(lead - 1) as usize], "second");
    if lead != again {
        let (on_link, _) = eventually(&format!("node {again} answering over its new link"), 30, || {
            appends(&metrics[i]).filter(|(l, _)| *l > 20)
        });
        assert!(on_link > 20);
    }
}
