//! Durability under kill -9, against real `blixard` processes.
//!
//! Three nodes take a stream of concurrent creates (through every member,
//! so forwarded writes are included); at some moment the test SIGKILLs ALL
//! THREE at once, restarts them from their data dirs, and checks that every
//! create that was acknowledged is there. A write is acknowledged only once
//! it is durable on a quorum, so a crash of the whole cluster must lose
//! none. Three cycles, killing at different points of the load; each
//! restart replays the segment logs the crash left behind (possibly with a
//! write in flight at the tail). Torn writes themselves are exercised byte
//! by byte in `blixard-core` (`raft::log_store::segment::tests`).
mod common;

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use blixard_proto as pb;
use blixard_proto::vm_service_client::VmServiceClient;
use common::{eventually, free_port, loopback, node_command, stdout, Nodes};

const CAPACITY: [&str; 3] = ["65536", "67108864", "1000000"];

fn start(nodes: &mut Nodes, id: u64, join: Option<u16>) {
    let i = (id - 1) as usize;
    let child = node_command(id, nodes.ports[i], &nodes.dirs[i], join, CAPACITY, "none", &[])
        .spawn()
        .expect("spawn blixard node");
    nodes.procs.push((id, child));
}

fn names(addrs: &str) -> Option<BTreeSet<String>> {
    let out =
        common::client_command(addrs).args(["--addr", addrs, "vm", "list", "-o", "json"]).output().ok()?;
    if !out.status.success() {
        return None;
    }
    let v: serde_json::Value = serde_json::from_str(&stdout(&out)).ok()?;
    let list = v.as_array().or_else(|| v.get("vms").and_then(|x| x.as_array()))?;
    Some(list.iter().filter_map(|vm| Some(vm.get("name")?.as_str()?.to_string())).collect())
}

/// Creates VMs through `addr` until `stop`, recording each acknowledged one.
async fn writer(
    addr: String,
    tag: String,
    stop: Arc<AtomicBool>,
    acked: Arc<Mutex<Vec<String>>>,
    token: String,
) {
    let mut n = 0u64;
    let mut client = None;
    while !stop.load(Ordering::Relaxed) {
        if client.is_none() {
            match tonic::transport::Endpoint::from_shared(format!("http://{addr}")).unwrap().connect().await {
                Ok(ch) => client = Some(VmServiceClient::new(ch)),
                Err(_) => {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    continue;
                }
            }
        }
        let name = format!("{tag}-{n}");
        n += 1;
        let mut req = tonic::Request::new(pb::CreateVmRequest {
            name: name.clone(),
            spec: Some(pb::VmSpec { vcpus: 1, memory_mb: 16, disk_gb: 1, ..Default::default() }),
            no_start: true,
            ..Default::default()
        });
        req.metadata_mut().insert("authorization", format!("Bearer {token}").parse().unwrap());
        let call = tokio::time::timeout(Duration::from_secs(5), client.as_mut().unwrap().create_vm(req));
        match call.await {
            Ok(Ok(_)) => acked.lock().unwrap().push(name),
            _ => client = None,
        }
    }
}

/// Deletes `names` through `addr` (a cycle's VMs, once checked: each
/// holds an address of its node's /24, so a node holds at most 253).
async fn delete_all(addr: String, names: Vec<String>, token: String) {
    let ch =
        tonic::transport::Endpoint::from_shared(format!("http://{addr}")).unwrap().connect().await.unwrap();
    let mut client = VmServiceClient::new(ch);
    for name in names {
        // A member that restarted just now may not have caught up yet (the
        // token, the VM): try again for a while.
        let mut tries = 0;
        loop {
            let mut req = tonic::Request::new(pb::DeleteVmRequest {
                name: name.clone(),
                request_id: format!("rm-{name}"),
            });
            req.metadata_mut().insert("authorization", format!("Bearer {token}").parse().unwrap());
            match client.delete_vm(req).await {
                Ok(_) => break,
                Err(e) if tries < 100 => {
                    tries += 1;
                    let _ = e;
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(e) => panic!("deleting {name}: {e}"),
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_of_the_whole_cluster_loses_no_acknowledged_write() {
    let root = tempfile::tempdir().unwrap();
    let dirs: Vec<_> = (1..=3).map(|i| root.path().join(format!("node-{i}"))).collect();
    let ports: Vec<u16> = (0..3).map(|_| free_port()).collect();
    let mut nodes = Nodes { procs: Vec::new(), dirs, ports: ports.clone() };
    start(&mut nodes, 1, None);
    start(&mut nodes, 2, Some(ports[0]));
    start(&mut nodes, 3, Some(ports[0]));
    let all = ports.iter().map(|p| loopback(*p)).collect::<Vec<_>>().join(",");
    let acked = Arc::new(Mutex::new(Vec::new()));

    for (cycle, load_ms) in [300u64, 800, 1500].into_iter().enumerate() {
        // Writable: a create goes through (all three registered, a leader).
        eventually("the cluster takes writes", 60, || {
            let out = common::client_command(&all)
                .args(["--addr", &all, "vm", "create", &format!("probe-{cycle}"), "--no-start"])
                .args(["--vcpus", "1", "--memory", "16"])
                .output()
                .ok()?;
            out.status.success().then_some(())
        });
        acked.lock().unwrap().push(format!("probe-{cycle}"));
        let at_start = acked.lock().unwrap().len();
        let stop = Arc::new(AtomicBool::new(false));
        let mut tasks = Vec::new();
        for t in 0..12 {
            let addr = loopback(ports[t % 3]);
            let token = common::admin_token(ports[0]).expect("the cluster's admin token");
            let tag = format!("c{cycle}-w{t}");
            tasks.push(tokio::spawn(writer(addr, tag, stop.clone(), acked.clone(), token)));
        }
        tokio::time::sleep(Duration::from_millis(load_ms)).await;
        // The whole cluster dies at once, with writes in flight.
        for (_, c) in &mut nodes.procs {
            // SAFETY: signalling a child process of this test.
            unsafe { libc::kill(c.id() as libc::pid_t, libc::SIGKILL) };
        }
        for (_, mut c) in nodes.procs.drain(..) {
            let _ = c.wait();
        }
        stop.store(true, Ordering::Relaxed);
        for t in tasks {
            t.await.unwrap();
        }
        let acked_now: BTreeSet<String> = acked.lock().unwrap().iter().cloned().collect();
        assert!(acked_now.len() > at_start, "cycle {cycle}: no create was acknowledged before the kill");
        // The same command lines as the first start (a node killed while
        // still joining must join again; one with Raft state ignores --join).
        start(&mut nodes, 1, None);
        start(&mut nodes, 2, Some(ports[0]));
        start(&mut nodes, 3, Some(ports[0]));
        let present = eventually("the restarted cluster answers vm list", 60, || names(&all));
        let lost: Vec<&String> = acked_now.difference(&present).collect();
        assert!(lost.is_empty(), "cycle {cycle}: {} acknowledged creates lost: {lost:?}", lost.len());
        eprintln!(
            "cycle {cycle}: {} acknowledged creates, all present after kill -9 of every node",
            acked_now.len()
        );
        // Make room for the next cycle.
        let token = common::admin_token(ports[0]).expect("the cluster's admin token");
        let present: Vec<String> = present.into_iter().collect();
        let mut deleters = Vec::new();
        for (t, chunk) in present.chunks(present.len().div_ceil(6).max(1)).enumerate() {
            deleters.push(tokio::spawn(delete_all(loopback(ports[t % 3]), chunk.to_vec(), token.clone())));
        }
        for d in deleters {
            d.await.unwrap();
        }
        acked.lock().unwrap().clear();
    }
}
