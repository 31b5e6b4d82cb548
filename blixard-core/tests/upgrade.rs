//! Upgrade safety: today's code starts on a data dir written by an older
//! Blixard (tests/fixtures), keeps its VMs, nodes and request ids, accepts
//! writes, and starts again afterwards.
//!
//! Real sockets and real tonic: not built under madsim (the simulation's
//! tonic has other channel types; `simulation/` covers the simulated node).
#![cfg(not(madsim))]
use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use blixard_core::auth::Bearer;
use blixard_core::node::bootstrap;
use blixard_core::node::{Node, NodeConfig};
use blixard_core::raft::RaftTuning;
use blixard_core::types::{DesiredState, NodeResources, Resources};
use blixard_proto as pb;
use blixard_proto::vm_service_client::VmServiceClient;

/// Copies `from` into `to`, subdirectories too (a format 5 data dir keeps
/// its log in `raft-log/`).
fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        if e.file_type().unwrap().is_dir() {
            copy_dir(&e.path(), &to.join(e.file_name()));
        } else {
            std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
        }
    }
}

fn fixture(name: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(name);
    copy_dir(&src, dir.path());
    dir
}

fn config(dir: &Path, port: u16) -> NodeConfig {
    NodeConfig {
        id: 1,
        bind: format!("127.0.0.1:{port}").parse().unwrap(),
        advertise: None,
        peer_port: Some(0),
        data_dir: dir.to_path_buf(),
        join: None,
        resources: NodeResources::plain(Resources::new(16, 32768, 500)),
        labels: [("zone".to_string(), "a".to_string())].into_iter().collect(),
        tuning: RaftTuning::default(),
        vm_backend: None,
        reconciler: Default::default(),
        meter: None,
        join_token: None,
        tls: None,
        vm_cidr: None,
        vm_network: Err("tests run VMs without a NIC".into()),
    }
}

use blixard_core::test_support::free_port;

/// Starts a node on `dir` and waits until it leads its one-node cluster.
type Authed = tonic::service::interceptor::InterceptedService<tonic::transport::Channel, Bearer>;

async fn start(dir: &Path) -> (Node, VmServiceClient<Authed>) {
    let port = free_port();
    let node = Node::start(config(dir, port)).await.expect("node starts on the old data dir");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while !node.shared().is_leader() {
        assert!(tokio::time::Instant::now() < deadline, "the node never led its cluster again");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let ch = tonic::transport::Endpoint::from_shared(format!("http://127.0.0.1:{port}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    // A data dir from before tokens gets its bootstrap admin token from
    // the first leader under this build (node/bootstrap.rs).
    while !node.shared().state.tokens_bootstrapped() {
        assert!(tokio::time::Instant::now() < deadline, "the upgraded cluster never made its admin token");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let token = bootstrap::read(dir).expect("the leader keeps the bootstrap token in its data dir");
    (node, VmServiceClient::with_interceptor(ch, Bearer::new(&token).unwrap()))
}

/// name -> (vcpus, memory, tenant, tier label, desired, generation)
fn vms(node: &Node) -> BTreeMap<String, (u32, u64, String, String, DesiredState, u64)> {
    let mut out = BTreeMap::new();
    node.shared().state.for_each_vm(|v| {
        let tier = v.spec.labels.get("tier").cloned().unwrap_or_default();
        out.insert(
            v.name.to_string(),
            (v.spec.vcpus, v.spec.memory_mb, v.spec.tenant.clone(), tier, v.desired, v.generation),
        );
    });
    out
}

#[tokio::test(flavor = "multi_thread")]
async fn a_v0_data_dir_keeps_its_state_and_accepts_writes() {
    old_data_dir_keeps_its_state_and_accepts_writes("datadir-v0").await
}

#[tokio::test(flavor = "multi_thread")]
async fn a_v1_data_dir_keeps_its_state_and_accepts_writes() {
    old_data_dir_keeps_its_state_and_accepts_writes("datadir-v1").await
}

#[tokio::test(flavor = "multi_thread")]
async fn a_v2_data_dir_keeps_its_state_and_accepts_writes() {
    old_data_dir_keeps_its_state_and_accepts_writes("datadir-v2").await
}

#[tokio::test(flavor = "multi_thread")]
async fn a_v3_data_dir_keeps_its_state_and_accepts_writes() {
    old_data_dir_keeps_its_state_and_accepts_writes("datadir-v3").await
}

/// Format 4 kept the Raft log in redb; it moves into segment files.
#[tokio::test(flavor = "multi_thread")]
async fn a_v4_data_dir_keeps_its_state_and_accepts_writes() {
    old_data_dir_keeps_its_state_and_accepts_writes("datadir-v4").await
}

/// Format 5 had tokens but no VM network: the first leader under format
/// 6 sets the default network, which gives the node a subnet and every
/// placed VM an address; the fixture's operator token still works.
#[tokio::test(flavor = "multi_thread")]
async fn a_v5_data_dir_keeps_its_state_gets_a_vm_network_and_accepts_writes() {
    old_data_dir_keeps_its_state_and_accepts_writes("datadir-v5").await
}

/// Quotas (tenant, VM limit), strategy, node 1's `rack` label and
/// allocatable vCPUs.
type Format2State = (Vec<(String, Option<u64>)>, &'static str, Option<String>, u32);

/// What format 2 added to the fixture: a quota, binpack, a node override.
fn format_2_state(node: &Node) -> Format2State {
    let state = &node.shared().state;
    let quotas = state.quotas().into_iter().map(|(t, q, _)| (t, q.vms)).collect();
    let rack = state.with_node(1, |n| n.labels.get("rack").cloned()).flatten();
    let vcpus = state.with_node(1, |n| n.allocatable().vcpus).unwrap_or_default();
    (quotas, state.strategy().as_str(), rack, vcpus)
}

async fn old_data_dir_keeps_its_state_and_accepts_writes(name: &str) {
    let dir = fixture(name);
    let (node, mut client) = start(dir.path()).await;

    let before = vms(&node);
    // Format 3 and later fixtures add placement rules and a queued VM.
    let v3 = ["datadir-v3", "datadir-v4", "datadir-v5"].contains(&name);
    let state = &node.shared().state;
    let mut placements = Vec::new();
    state.for_each_vm(|v| {
        if !["pinned-1", "huge-1"].contains(&&*v.name) {
            placements.push((v.placement.clone(), v.queued_at));
        }
        // Format 4: rescheduled on node failure, no moves yet.
        assert_eq!(
            (v.reschedule, v.history.len(), v.moving, v.placement_gen),
            (Default::default(), 0, None, 0)
        );
    });
    assert!(
        placements.iter().all(|p| *p == (Default::default(), 0)),
        "VMs from before placement rules get the default placement"
    );
    let live = state.with_node(1, |n| (n.state(), n.drain)).unwrap();
    assert_eq!(live, (blixard_core::types::NodeState::Ready, None), "not down, not draining");
    // Its first heartbeat under this version says it heartbeats (until
    // then it is never marked down: an older node does not fence).
    let mut heartbeats = false;
    for _ in 0..100 {
        heartbeats = state.with_node(1, |n| n.heartbeats).unwrap();
        if heartbeats {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert!(heartbeats, "the upgraded node heartbeats");
    assert_eq!(state.node_timeout(), std::time::Duration::from_secs(10));
    let mut expected =
        vec!["batch-1", "cache-1", "db-1", "web-1", "web-2", "web-3", "web-4", "web-5", "web-6"];
    if v3 {
        expected.extend(["huge-1", "pinned-1"]);
        expected.sort_unstable();
        let pinned = state.with_vm("pinned-1", |v| v.placement.clone()).unwrap();
        assert_eq!(
            (pinned.node, pinned.constraints.len(), pinned.anti_affinity.as_str(), pinned.priority),
            (1, 1, "grp", 70),
            "format 3 placement rules"
        );
        let huge = state.with_vm("huge-1", |v| (v.node_id, v.observed, v.queued_at > 0)).unwrap();
        assert_eq!(huge, (0, blixard_core::types::ObservedState::Queued, true), "still queued");
    }
    let names: Vec<&str> = before.keys().map(String::as_str).collect();
    assert_eq!(names, expected, "every VM of the old data dir, and not the deleted batch-2");
    let s = |x: &str| x.to_string();
    assert_eq!(before["db-1"], (4, 4096, s("acme"), s("db"), DesiredState::Stopped, 0));
    assert_eq!(before["web-6"], (1, 256, s("acme"), s("web"), DesiredState::Stopped, 0));
    assert_eq!(before["web-5"], (1, 256, s("acme"), s("web"), DesiredState::Running, 1), "restarted once");
    assert_eq!(before["batch-1"], (2, 1024, s("beta"), s("batch"), DesiredState::Running, 0));
    assert_eq!(before["cache-1"], (1, 512, s(""), s("cache"), DesiredState::Running, 0));
    let zone = node.shared().state.with_node(1, |n| n.labels.get("zone").cloned());
    assert_eq!(zone, Some(Some(s("a"))), "the node record and its labels");
    let v2 = format_2_state(&node);
    if name == "datadir-v2" || v3 {
        assert_eq!(
            v2,
            (vec![(s("acme"), Some(50))], "binpack", Some(s("r1")), 32),
            "quota, strategy, override"
        );
    } else {
        assert_eq!(v2, (vec![], "spread", None, 16), "no format 2 state in older data dirs");
    }

    // The old dedup window still answers: a retry of an old create returns
    // its first outcome and creates nothing.
    let again = client
        .create_vm(pb::CreateVmRequest {
            name: "web-1".into(),
            spec: Some(pb::VmSpec {
                vcpus: 1,
                memory_mb: 256,
                disk_gb: 1,
                labels: [(s("tier"), s("web"))].into_iter().collect(),
                tenant: s("acme"),
                restart_policy: s("on-failure"),
                ..Default::default()
            }),
            no_start: false,
            request_id: "gen-web-1".into(),
            ..Default::default()
        })
        .await
        .expect("a retried old request returns its first outcome")
        .into_inner();
    assert_eq!(again.vm.map(|v| v.name), Some(s("web-1")));

    // New writes are accepted.
    let spec = pb::VmSpec { vcpus: 1, memory_mb: 128, disk_gb: 1, ..Default::default() };
    client
        .create_vm(pb::CreateVmRequest {
            name: "after-upgrade".into(),
            spec: Some(spec),
            no_start: true,
            request_id: "up-1".into(),
            ..Default::default()
        })
        .await
        .expect("the upgraded node accepts writes");
    client
        .delete_vm(pb::DeleteVmRequest { name: "batch-1".into(), request_id: "up-2".into() })
        .await
        .expect("and deletes");
    // Format 6: every old data dir gets the default VM network, node 1 its
    // first /24, and each placed VM an address of it (deterministically:
    // by name), the new one included.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while node.shared().state.vm_cidr().is_none() {
        assert!(tokio::time::Instant::now() < deadline, "the upgraded cluster never got its VM network");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let state = &node.shared().state;
    assert_eq!(state.vm_cidr(), Some(blixard_core::types::Ipv4Net::DEFAULT_VM_CIDR));
    let subnet = state.with_node(1, |n| n.vm_subnet.map(|s| s.to_string())).flatten();
    assert_eq!(subnet.as_deref(), Some("10.88.0.0/24"));
    let ip = |name: &str| state.with_vm(name, |v| v.ip.map(|ip| ip.to_string())).flatten();
    assert_eq!(ip("batch-1"), None, "deleted");
    assert!(ip("cache-1").is_some_and(|ip| ip.starts_with("10.88.0.")), "{:?}", ip("cache-1"));
    assert!(ip("after-upgrade").is_some());
    if v3 {
        assert_eq!(ip("huge-1"), None, "queued: held by no node");
    }
    state.check_invariants().unwrap();
    if name == "datadir-v5" {
        let ops = state.tokens().into_iter().find(|t| t.name == "ops").map(|t| t.role);
        assert_eq!(ops, Some(blixard_core::auth::Role::Operator), "format 5 tokens survive");
    }
    let after = vms(&node);
    assert_eq!(after.len(), if v3 { 11 } else { 9 });
    assert!(after.contains_key("after-upgrade") && !after.contains_key("batch-1"));
    node.shutdown().await;

    // It starts again on what it wrote itself.
    let (node, _client) = start(dir.path()).await;
    assert_eq!(vms(&node), after, "the same state after a second start");
    assert_eq!(format_2_state(&node), v2);
    node.shutdown().await;
}

const META: redb::TableDefinition<&str, &[u8]> = redb::TableDefinition::new("meta");

fn log_format(dir: &Path) -> Option<u16> {
    let db = redb::Database::open(dir.join("raft.redb")).unwrap();
    let r = redb::ReadableDatabase::begin_read(&db).unwrap();
    let meta = r.open_table(META).unwrap();
    let v = redb::ReadableTable::get(&meta, "format").unwrap()?;
    Some(u16::from_le_bytes(v.value().try_into().unwrap()))
}

async fn start_err(dir: &Path) -> String {
    match Node::start(config(dir, free_port())).await {
        Ok(node) => {
            node.shutdown().await;
            panic!("a node started on data it cannot read")
        }
        Err(e) => e.to_string(),
    }
}

fn set_log_format(dir: &Path, v: u16) {
    let db = redb::Database::open(dir.join("raft.redb")).unwrap();
    let w = db.begin_write().unwrap();
    w.open_table(META).unwrap().insert("format", &v.to_le_bytes()[..]).unwrap();
    w.commit().unwrap();
}

/// The redb log of format 0 to 4 moves into segment files on the first
/// start; the database stays, marked so an older blixard refuses the dir.
#[tokio::test(flavor = "multi_thread")]
async fn the_log_is_migrated_and_a_newer_format_is_refused_by_name() {
    use blixard_core::raft::log_store::legacy::MOVED;
    let dir = fixture("datadir-v0");
    assert_eq!(log_format(dir.path()), None, "the fixture predates versions");
    let (node, _client) = start(dir.path()).await;
    node.shutdown().await;
    drop(node);
    assert!(dir.path().join("raft-log").is_dir(), "the log now lives in segment files");
    assert_eq!(log_format(dir.path()), Some(MOVED), "the old database is marked moved, not deleted");
    assert!(!dir.path().join("raft-log.migrating").exists());

    // A log database of a newer format is refused by name, nothing migrated
    // (how an older blixard refuses a migrated dir: MOVED is newer still).
    let newer = fixture("datadir-v0");
    set_log_format(newer.path(), 99);
    let msg = start_err(newer.path()).await;
    assert!(
        msg.contains("version 99") && msg.contains(&format!("0 to {}", blixard_core::format::CURRENT)),
        "{msg}"
    );
    assert!(msg.contains("raft.redb"), "names the file: {msg}");
    assert_eq!(log_format(newer.path()), Some(99), "refusing migrates nothing");
    assert!(!newer.path().join("raft-log").exists(), "and creates no log");

    // A migrated database whose segment log went missing: refused, never a
    // start on an empty log.
    std::fs::remove_dir_all(dir.path().join("raft-log")).unwrap();
    let msg = start_err(dir.path()).await;
    assert!(msg.contains("was migrated to") && msg.contains("raft-log"), "{msg}");
    assert_eq!(log_format(dir.path()), Some(MOVED));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_snapshot_from_a_newer_format_is_refused_by_name() {
    let dir = fixture("datadir-v0");
    let path = dir.path().join("snapshot.bin");
    let mut bytes = vec![0xFF, b'B', b'X', b'F'];
    bytes.extend_from_slice(&7u16.to_le_bytes());
    bytes.extend_from_slice(&std::fs::read(&path).unwrap());
    std::fs::write(&path, &bytes).unwrap();
    let msg = start_err(dir.path()).await;
    assert!(
        msg.contains("snapshot")
            && msg.contains("version 7")
            && msg.contains(&format!("0 to {}", blixard_core::format::CURRENT)),
        "{msg}"
    );
}
