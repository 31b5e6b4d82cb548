//! Durability under kill -9, against real `blixard` processes: of the
//! whole cluster at once, and of the leader alone.
//!
//! Whole cluster: three nodes take a stream of concurrent creates (through
//! every member, so forwarded writes are included); at some moment the
//! test SIGKILLs ALL THREE at once, restarts them from their data dirs, and checks that every
//! create that was acknowledged is there. A write is acknowledged only once
//! it is durable on a quorum, so a crash of the whole cluster must lose
//! none. Three cycles, killing at different points of the load; each
//! restart replays the segment logs the crash left behind (possibly with a
//! write in flight at the tail). Torn writes themselves are exercised byte
//! by byte in `blixard-core` (`raft::log_store::segment::tests`).
//!
//! Leader alone: see `kill_9_of_the_leader_loses_no_acknowledged_write_and_replicas_agree`.
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

/// Three nodes in `root` (2 and 3 join 1), their ports, and all their
/// addresses as one `--addr` list.
fn three_nodes(root: &std::path::Path) -> (Nodes, Vec<u16>, String) {
    let dirs: Vec<_> = (1..=3).map(|i| root.join(format!("node-{i}"))).collect();
    let ports: Vec<u16> = (0..3).map(|_| free_port()).collect();
    let mut nodes = Nodes { procs: Vec::new(), dirs, ports: ports.clone() };
    for id in 1..=3 {
        start(&mut nodes, id, join_of(&ports, id));
    }
    let all = ports.iter().map(|p| loopback(*p)).collect::<Vec<_>>().join(",");
    // Every member joined before the first kill (a member killed while
    // joining has no Raft state and joins again on restart: valid, but
    // then the cycle tests one node fewer).
    eventually("a cluster of three voters", 60, || leader_of_three(&all));
    (nodes, ports, all)
}

/// The `--join` node `id` starts with, the first time and every time after
/// (a node killed while still joining must join again; one with Raft state
/// ignores it).
fn join_of(ports: &[u16], id: u64) -> Option<u16> {
    (id != 1).then_some(ports[0])
}

/// Waits until a create of `name` goes through the cluster at `all` (all
/// three registered, a leader).
fn wait_writable(all: &str, name: &str) {
    eventually("the cluster takes writes", 60, || {
        let out = common::client_command(all)
            .args(["--addr", all, "vm", "create", name, "--no-start"])
            .args(["--vcpus", "1", "--memory", "16"])
            .output()
            .ok()?;
        out.status.success().then_some(())
    });
}

/// `msg` with the bearer `token`.
fn authed<T>(msg: T, token: &str) -> tonic::Request<T> {
    let mut req = tonic::Request::new(msg);
    req.metadata_mut().insert("authorization", format!("Bearer {token}").parse().unwrap());
    req
}

/// A create of a stopped 1-vCPU, 16-MiB VM.
fn create_request(name: &str) -> pb::CreateVmRequest {
    pb::CreateVmRequest {
        name: name.to_string(),
        spec: Some(pb::VmSpec { vcpus: 1, memory_mb: 16, disk_gb: 1, ..Default::default() }),
        no_start: true,
        ..Default::default()
    }
}

/// A client of `addr`, or `None` after a short pause if it does not answer.
async fn connect(addr: &str) -> Option<VmServiceClient<tonic::transport::Channel>> {
    match tonic::transport::Endpoint::from_shared(format!("http://{addr}")).unwrap().connect().await {
        Ok(ch) => Some(VmServiceClient::new(ch)),
        Err(_) => {
            tokio::time::sleep(Duration::from_millis(20)).await;
            None
        }
    }
}

fn names(addrs: &str) -> Option<BTreeSet<String>> {
    names_read(addrs, &[])
}

/// The VMs `addr` has applied, read from its own state (no read barrier).
fn local_names(addr: &str) -> Option<BTreeSet<String>> {
    names_read(addr, &["--stale"])
}

fn names_read(addrs: &str, read: &[&str]) -> Option<BTreeSet<String>> {
    let out = common::client_command(addrs)
        .args(["--addr", addrs, "vm", "list", "-o", "json"])
        .args(read)
        .output()
        .ok()?;
    if !out.status.success() {
        return None;
    }
    let v: serde_json::Value = serde_json::from_str(&stdout(&out)).ok()?;
    let list = v.as_array().or_else(|| v.get("vms").and_then(|x| x.as_array()))?;
    Some(list.iter().filter_map(|vm| Some(vm.get("name")?.as_str()?.to_string())).collect())
}

/// The client in `client`, connecting to `addr` first when there is none
/// (`None` if it does not answer yet).
async fn connected<'a>(
    client: &'a mut Option<VmServiceClient<tonic::transport::Channel>>,
    addr: &str,
) -> Option<&'a mut VmServiceClient<tonic::transport::Channel>> {
    if client.is_none() {
        *client = connect(addr).await;
    }
    client.as_mut()
}

/// Creates VM `name` through `c`: whether the create was acknowledged
/// within 5 s.
async fn create(c: &mut VmServiceClient<tonic::transport::Channel>, name: &str, token: &str) -> bool {
    let req = authed(create_request(name), token);
    matches!(tokio::time::timeout(Duration::from_secs(5), c.create_vm(req)).await, Ok(Ok(_)))
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
        let Some(c) = connected(&mut client, &addr).await else { continue };
        let name = format!("{tag}-{n}");
        n += 1;
        if create(c, &name, &token).await {
            acked.lock().unwrap().push(name);
        } else {
            client = None;
        }
    }
}

/// What a churner saw acknowledged.
#[derive(Default)]
struct Churned {
    /// Created, and no delete was tried yet: must be present.
    created: BTreeSet<String>,
    /// Deleted: must be absent.
    deleted: BTreeSet<String>,
}

/// Creates VMs through `addr` and deletes all but one in 16 again, until
/// `stop`: the cluster does not fill up (a node holds at most 253 VMs), so
/// writes are acknowledged all through the load, and some creates stay to
/// be checked.
async fn churner(addr: String, tag: String, stop: Arc<AtomicBool>, seen: Arc<Mutex<Churned>>, token: String) {
    let mut n = 0u64;
    let mut client = None;
    while !stop.load(Ordering::Relaxed) {
        let Some(c) = connected(&mut client, &addr).await else { continue };
        let name = format!("{tag}-{n}");
        n += 1;
        if !create(c, &name, &token).await {
            client = None;
            continue;
        }
        seen.lock().unwrap().created.insert(name.clone());
        if n % 16 == 1 {
            continue;
        }
        let req = authed(pb::DeleteVmRequest { name: name.clone(), request_id: String::new() }, &token);
        // Once a delete is tried, the VM may be there or not until it is
        // acknowledged.
        seen.lock().unwrap().created.remove(&name);
        match tokio::time::timeout(Duration::from_secs(5), c.delete_vm(req)).await {
            Ok(Ok(_)) => {
                seen.lock().unwrap().deleted.insert(name);
            }
            _ => client = None,
        }
    }
}

/// Deletes `names` through `addr` (a cycle's VMs, once checked: each
/// holds an address of its node's /24, so a node holds at most 253).
async fn delete_all(addr: String, names: Vec<String>, token: String) {
    // A member that restarted just now may not serve yet.
    let endpoint = tonic::transport::Endpoint::from_shared(format!("http://{addr}")).unwrap();
    let mut tries = 0;
    let ch = loop {
        match endpoint.connect().await {
            Ok(ch) => break ch,
            Err(e) if tries < 300 => {
                tries += 1;
                if tries % 50 == 0 {
                    eprintln!("delete_all: {addr} not serving yet: {e}");
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => panic!("{addr} did not serve within 30 s of its restart: {e}"),
        }
    };
    let mut client = VmServiceClient::new(ch);
    for name in names {
        // A member that restarted just now may not have caught up yet (the
        // token, the VM): try again for a while.
        let mut tries = 0;
        loop {
            let req =
                authed(pb::DeleteVmRequest { name: name.clone(), request_id: format!("rm-{name}") }, &token);
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
    let (mut nodes, ports, all) = three_nodes(root.path());
    let acked = Arc::new(Mutex::new(Vec::new()));

    for (cycle, load_ms) in [300u64, 800, 1500].into_iter().enumerate() {
        wait_writable(&all, &format!("probe-{cycle}"));
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
        // The same command lines as the first start.
        for id in 1..=3 {
            start(&mut nodes, id, join_of(&ports, id));
        }
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

/// The leader of the cluster at `addrs`, once it has three voters.
fn leader_of_three(addrs: &str) -> Option<u64> {
    let out = common::client_command(addrs)
        .args(["--addr", addrs, "cluster", "status", "-o", "json"])
        .output()
        .ok()?;
    if !out.status.success() {
        return None;
    }
    let v: serde_json::Value = serde_json::from_str(&stdout(&out)).ok()?;
    let voters = v["members"].as_array()?.iter().filter(|m| m["role"] != "learner").count();
    v["leader_id"].as_u64().filter(|id| voters == 3 && (1..=3).contains(id))
}

/// kill -9 of the leader alone, with creates and deletes in flight through
/// every member (the leader's own clients included). A leader reports its
/// own entries flushed before their `fdatasync` (blixard-core's
/// log_store/early.rs), so killed in that window it loses entries its
/// followers already hold, and comes back with a shorter log than the one
/// it replicated. No acknowledged create or delete may be lost, and once it
/// has rejoined every replica holds exactly the same VMs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_of_the_leader_loses_no_acknowledged_write_and_replicas_agree() {
    let root = tempfile::tempdir().unwrap();
    let (mut nodes, ports, all) = three_nodes(root.path());
    wait_writable(&all, "probe");
    let seen = Arc::new(Mutex::new(Churned::default()));
    seen.lock().unwrap().created.insert("probe".to_string());

    for (cycle, load_ms) in [300u64, 700, 1200].into_iter().enumerate() {
        let leader = eventually("a leader of three voters", 60, || leader_of_three(&all));
        let before = {
            let s = seen.lock().unwrap();
            s.created.len() + s.deleted.len()
        };
        let stop = Arc::new(AtomicBool::new(false));
        let token = common::admin_token(ports[0]).expect("the cluster's admin token");
        let mut tasks = Vec::new();
        for t in 0..12 {
            let addr = loopback(ports[t % 3]);
            let tag = format!("c{cycle}-w{t}");
            tasks.push(tokio::spawn(churner(addr, tag, stop.clone(), seen.clone(), token.clone())));
        }
        tokio::time::sleep(Duration::from_millis(load_ms)).await;
        let at_kill = {
            let s = seen.lock().unwrap();
            s.created.len() + s.deleted.len()
        };
        nodes.kill(leader);
        // The other two elect a leader and go on taking writes.
        tokio::time::sleep(Duration::from_millis(1500)).await;
        stop.store(true, Ordering::Relaxed);
        for t in tasks {
            t.await.unwrap();
        }
        start(&mut nodes, leader, join_of(&ports, leader));
        let s = seen.lock().unwrap();
        let after = s.created.len() + s.deleted.len();
        assert!(at_kill > before, "cycle {cycle}: nothing was acknowledged before the kill");
        assert!(after > at_kill, "cycle {cycle}: nothing was acknowledged after the kill");

        // What the cluster has committed, read through a read barrier, and
        // then every replica's own applied state: the same, the restarted
        // node's included.
        let present = eventually("the cluster answers vm list", 60, || names(&all));
        let lost: Vec<&String> = s.created.difference(&present).collect();
        assert!(lost.is_empty(), "cycle {cycle}: {} acknowledged creates lost: {lost:?}", lost.len());
        let back: Vec<&String> = s.deleted.intersection(&present).collect();
        assert!(back.is_empty(), "cycle {cycle}: {} acknowledged deletes undone: {back:?}", back.len());
        for (i, port) in ports.iter().enumerate() {
            let addr = loopback(*port);
            eventually(&format!("node {} holds the committed VMs", i + 1), 60, || {
                (local_names(&addr)? == present).then_some(())
            });
        }
        eprintln!(
            "cycle {cycle}: leader {leader} killed; {} creates and {} deletes acknowledged so far \
             ({} before the kill), none lost, replicas agree",
            s.created.len(),
            s.deleted.len(),
            at_kill
        );
    }
}
