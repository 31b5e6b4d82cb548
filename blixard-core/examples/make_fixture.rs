//! Writes a fixture data dir with the current code, for the upgrade tests:
//! `cargo run -p blixard-core --example make_fixture -- DIR`. Run it before
//! bumping `format::CURRENT`, and commit DIR as
//! `blixard-core/tests/fixtures/datadir-v<CURRENT>` (see
//! blixard-core/tests/fixtures/README.md for what it holds).
use std::time::Duration;

use blixard_core::node::{Node, NodeConfig};
use blixard_core::raft::RaftTuning;
use blixard_core::types::{NodeResources, Resources};
use blixard_proto as pb;
use blixard_proto::vm_service_client::VmServiceClient;

fn spec(vcpus: u32, mem: u64, tenant: &str, tier: &str) -> Option<pb::VmSpec> {
    Some(pb::VmSpec {
        vcpus,
        memory_mb: mem,
        disk_gb: 1,
        labels: [("tier".to_string(), tier.to_string())].into_iter().collect(),
        tenant: tenant.into(),
        restart_policy: "on-failure".into(),
        ..Default::default()
    })
}

#[tokio::main]
async fn main() {
    let dir = std::path::PathBuf::from(std::env::args().nth(1).expect("usage: make_fixture DIR"));
    assert!(!dir.exists(), "{} exists; pick a new directory", dir.display());
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let tuning = RaftTuning { snapshot_every: 10, keep_behind_snapshot: 3, ..RaftTuning::default() };
    let cfg = NodeConfig {
        id: 1,
        bind: format!("127.0.0.1:{port}").parse().unwrap(),
        advertise: None,
        peer_port: Some(0),
        data_dir: dir.clone(),
        join: None,
        resources: NodeResources::plain(Resources::new(16, 32768, 500)),
        labels: [("zone".to_string(), "a".to_string())].into_iter().collect(),
        tuning,
        vm_backend: None,
        reconciler: Default::default(),
        meter: None,
        join_token: None,
        tls: None,
        vm_cidr: None,
        vm_network: Err("the fixture runs no VMs".into()),
    };
    let node = Node::start(cfg).await.expect("node starts");
    while node.shared().state.with_node(1, |_| ()).is_none() || !node.shared().state.tokens_bootstrapped() {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Format 5: every call carries a token; the founder's bootstrap admin
    // token is in its data dir.
    let token = blixard_core::node::bootstrap::read(&dir).expect("the founder's admin token");
    let auth = blixard_core::auth::Bearer::new(&token).unwrap();
    let mut vms = VmServiceClient::with_interceptor(vms_channel(port).await, auth.clone());
    let mk = |name: &str, s, no_start, id: &str| pb::CreateVmRequest {
        name: name.into(),
        spec: s,
        no_start,
        request_id: id.into(),
        ..Default::default()
    };
    for i in 1..=6 {
        vms.create_vm(mk(&format!("web-{i}"), spec(1, 256, "acme", "web"), false, &format!("gen-web-{i}")))
            .await
            .unwrap();
    }
    vms.create_vm(mk("db-1", spec(4, 4096, "acme", "db"), true, "gen-db-1")).await.unwrap();
    vms.create_vm(mk("batch-1", spec(2, 1024, "beta", "batch"), false, "")).await.unwrap();
    vms.create_vm(mk("batch-2", spec(2, 1024, "beta", "batch"), false, "")).await.unwrap();
    vms.delete_vm(pb::DeleteVmRequest { name: "batch-2".into(), request_id: "gen-del".into() })
        .await
        .unwrap();
    vms.stop_vm(pb::VmNameRequest { name: "web-6".into(), request_id: "gen-stop".into() }).await.unwrap();
    vms.restart_vm(pb::VmNameRequest { name: "web-5".into(), request_id: "".into() }).await.unwrap();
    vms.create_vm(mk("cache-1", spec(1, 512, "", "cache"), false, "")).await.unwrap();
    // Format 2 state: a quota, the binpack strategy, an operator override.
    let ch = vms_channel(port).await;
    let mut cluster = blixard_proto::cluster_service_client::ClusterServiceClient::with_interceptor(ch, auth);
    let limits = pb::QuotaLimits { vms: Some(50), vcpus: Some(40), ..Default::default() };
    cluster
        .set_quota(pb::SetQuotaRequest { tenant: "acme".into(), limits: Some(limits), request_id: "".into() })
        .await
        .unwrap();
    cluster
        .set_scheduler(pb::SetSchedulerRequest { strategy: "binpack".into(), request_id: "".into() })
        .await
        .unwrap();
    cluster
        .set_node(pb::SetNodeRequest {
            node_id: 1,
            set_labels: [("rack".to_string(), "r1".to_string())].into_iter().collect(),
            cpu_overcommit: "2".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    // Format 3 state: placement rules, a priority, a queued VM.
    let placement = pb::Placement {
        node_id: 1,
        constraints: vec!["zone=a".into()],
        anti_affinity: "grp".into(),
        spread_by: "rack".into(),
        priority: Some(70),
    };
    vms.create_vm(pb::CreateVmRequest {
        placement: Some(placement),
        ..mk("pinned-1", spec(1, 128, "acme", "web"), false, "gen-pinned-1")
    })
    .await
    .unwrap();
    vms.create_vm(pb::CreateVmRequest {
        queue: true,
        ..mk("huge-1", spec(2, 1 << 20, "", "batch"), false, "")
    })
    .await
    .unwrap();
    // Format 5 state: an operator token besides the bootstrap admin token.
    cluster
        .create_token(pb::CreateTokenRequest {
            name: "ops".into(),
            role: "operator".into(),
            request_id: "gen-token".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(dir.join("snapshot.bin").exists(), "a snapshot was built");
    node.shutdown().await;
}

async fn vms_channel(port: u16) -> tonic::transport::Channel {
    tonic::transport::Endpoint::from_shared(format!("http://127.0.0.1:{port}"))
        .unwrap()
        .connect()
        .await
        .unwrap()
}
