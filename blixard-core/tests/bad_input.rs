//! Hostile and malformed input at a real node's gRPC edge: every case gets a
//! typed error that says what is allowed, nothing changes, nothing panics.
//!
//! Real sockets and real tonic: not built under madsim (the simulation's
//! tonic has other channel types; `simulation/` covers the simulated node).
#![cfg(not(madsim))]
use std::time::Duration;

use blixard_core::auth::Bearer;
use blixard_core::node::{Node, NodeConfig};
use blixard_core::raft::RaftTuning;
use blixard_core::types::{NodeResources, Resources};
use blixard_proto as pb;
use blixard_proto::cluster_service_client::ClusterServiceClient;
use blixard_proto::raft_service_client::RaftServiceClient;
use blixard_proto::vm_service_client::VmServiceClient;
use tonic::transport::Channel;
use tonic::Code;

/// A channel whose calls carry the node's admin token.
type Authed = tonic::service::interceptor::InterceptedService<Channel, Bearer>;

async fn start() -> (Node, Authed, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let port = blixard_core::test_support::free_port();
    let cfg = NodeConfig {
        id: 1,
        bind: format!("127.0.0.1:{port}").parse().unwrap(),
        advertise: None,
        peer_port: Some(0),
        data_dir: dir.path().to_path_buf(),
        join: None,
        resources: NodeResources::plain(Resources::new(4, 4096, 100)),
        labels: Default::default(),
        tuning: RaftTuning::default(),
        vm_backend: None,
        reconciler: Default::default(),
        meter: None,
        join_token: None,
        tls: None,
        vm_cidr: None,
        vm_network: Err("tests run VMs without a NIC".into()),
    };
    let node = Node::start(cfg).await.expect("node starts");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    // Registered, and known to heartbeat: the liveness monitor's first
    // write (it marks the node as one that heartbeats) has applied, so no
    // background write changes the state under the test's before/after
    // comparisons.
    while node.shared().state.with_node(1, |n| n.heartbeats) != Some(true) {
        assert!(tokio::time::Instant::now() < deadline, "node never registered and heartbeated");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let ch = tonic::transport::Endpoint::from_shared(format!("http://127.0.0.1:{port}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let token = blixard_core::node::bootstrap::read(dir.path()).expect("the founder's admin token");
    let ch = tower::ServiceBuilder::new()
        .layer(tonic::service::interceptor::InterceptorLayer::new(Bearer::new(&token).unwrap()))
        .service(ch);
    (node, ch, dir)
}

/// The VMs and nodes, without the dedup window (which records rejected
/// requests' outcomes too, by design).
fn cluster_state(node: &Node) -> blixard_core::state::StateImage {
    let mut image = node.shared().state.image();
    image.requests.clear();
    image
}

fn outcome(e: &tonic::Status) -> &str {
    e.metadata().get("blixard-outcome").and_then(|v| v.to_str().ok()).unwrap_or("<none>")
}

/// A proposal to create a stopped 1-vCPU VM, as a follower forwards it.
fn create(name: &str) -> blixard_core::command::Proposal {
    blixard_core::command::Proposal {
        at_ms: 1,
        request: None,
        command: blixard_core::command::Command::CreateVm {
            name: name.into(),
            spec: blixard_core::types::VmSpec { vcpus: 1, memory_mb: 16, disk_gb: 1, ..Default::default() },
            start: false,
        },
    }
}

fn spec(vcpus: u32, memory_mb: u64) -> Option<pb::VmSpec> {
    Some(pb::VmSpec { vcpus, memory_mb, disk_gb: 1, ..Default::default() })
}

/// A valid spec booting `kernel` and `initrd`.
fn boot(kernel: &str, initrd: &str) -> Option<pb::VmSpec> {
    Some(pb::VmSpec { kernel: kernel.into(), initrd: initrd.into(), ..spec(1, 128).unwrap() })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_client_requests_are_typed_errors_and_change_nothing() {
    let (node, ch, _dir) = start().await;
    let mut vms = VmServiceClient::new(ch.clone());
    vms.create_vm(pb::CreateVmRequest {
        name: "keep".into(),
        spec: spec(1, 128),
        no_start: false,
        request_id: String::new(),
        ..Default::default()
    })
    .await
    .unwrap();
    let before = cluster_state(&node);

    let cases: Vec<(pb::CreateVmRequest, Code, &str)> = vec![
        (
            pb::CreateVmRequest {
                name: "".into(),
                spec: spec(1, 128),
                no_start: false,
                request_id: String::new(),
                ..Default::default()
            },
            Code::InvalidArgument,
            "1-63 characters",
        ),
        (
            pb::CreateVmRequest {
                name: "UPPER".into(),
                spec: spec(1, 128),
                no_start: false,
                request_id: String::new(),
                ..Default::default()
            },
            Code::InvalidArgument,
            "1-63 characters",
        ),
        (
            pb::CreateVmRequest {
                name: "x".repeat(64),
                spec: spec(1, 128),
                no_start: false,
                request_id: String::new(),
                ..Default::default()
            },
            Code::InvalidArgument,
            "1-63 characters",
        ),
        (
            pb::CreateVmRequest {
                name: "zero".into(),
                spec: spec(0, 128),
                no_start: false,
                request_id: String::new(),
                ..Default::default()
            },
            Code::InvalidArgument,
            "between 1 and 64",
        ),
        (
            pb::CreateVmRequest {
                name: "nospec".into(),
                spec: None,
                no_start: false,
                request_id: String::new(),
                ..Default::default()
            },
            Code::InvalidArgument,
            "between 1 and 64",
        ),
        (
            pb::CreateVmRequest {
                name: "huge".into(),
                spec: spec(1, u64::MAX),
                no_start: false,
                request_id: String::new(),
                ..Default::default()
            },
            Code::InvalidArgument,
            "between 16 and",
        ),
        (
            pb::CreateVmRequest {
                name: "shadow".into(),
                spec: boot("/etc/shadow", ""),
                ..Default::default()
            },
            Code::InvalidArgument,
            "invalid kernel \"/etc/shadow\": a file name in the node's image directory (--image-dir)",
        ),
        (
            pb::CreateVmRequest { name: "dotdot".into(), spec: boot("a/../../b", ""), ..Default::default() },
            Code::InvalidArgument,
            "no '..'",
        ),
        (
            pb::CreateVmRequest {
                name: "initrd".into(),
                spec: boot("vmlinuz", "/boot/x"),
                ..Default::default()
            },
            Code::InvalidArgument,
            "invalid initrd \"/boot/x\": a file name in the node's image directory",
        ),
        (
            pb::CreateVmRequest {
                name: "toobig".into(),
                spec: spec(8, 128),
                no_start: false,
                request_id: String::new(),
                ..Default::default()
            },
            Code::ResourceExhausted,
            "no node fits",
        ),
        (
            pb::CreateVmRequest {
                name: "keep".into(),
                spec: spec(1, 128),
                no_start: false,
                request_id: String::new(),
                ..Default::default()
            },
            Code::AlreadyExists,
            "already exists",
        ),
    ];
    for (req, code, text) in cases {
        let name = req.name.clone();
        let e = vms.create_vm(req).await.expect_err(&format!("{name:?} accepted"));
        assert_eq!(e.code(), code, "{name:?}: {}", e.message());
        assert!(e.message().contains(text), "{name:?}: {:?} lacks {text:?}", e.message());
        assert_eq!(outcome(&e), "rejected", "{name:?}: a rejected write says so");
    }
    let e = vms
        .delete_vm(pb::DeleteVmRequest { name: "ghost".into(), request_id: String::new() })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound);
    assert_eq!(outcome(&e), "rejected");
    let e = vms.list_vms(pb::ListVmsRequest { consistency: 0, node_id: 99 }).await.unwrap_err();
    assert_eq!(e.code(), Code::NotFound);
    assert!(e.message().contains("unknown node id 99"));
    let mut cluster = ClusterServiceClient::new(ch.clone());
    let e = cluster.remove(pb::RemoveRequest { node_id: 99 }).await.unwrap_err();
    assert_eq!(e.code(), Code::NotFound);
    let e = cluster.join(pb::JoinRequest { node_id: 2, addr: "no-port".into() }).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    let e = cluster.join(pb::JoinRequest { node_id: 0, addr: "127.0.0.1:1".into() }).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);

    // A request over the 1 MiB client limit is refused before decoding.
    let mut labels = std::collections::HashMap::new();
    labels.insert("k".to_string(), "v".repeat(2 * 1024 * 1024));
    let big = pb::CreateVmRequest {
        name: "big".into(),
        spec: Some(pb::VmSpec { vcpus: 1, memory_mb: 128, disk_gb: 1, labels, ..Default::default() }),
        no_start: false,
        request_id: String::new(),
        ..Default::default()
    };
    let e = vms.create_vm(big).await.unwrap_err();
    assert_eq!(e.code(), Code::OutOfRange, "{}", e.message());

    // A batch (and its dry run) with one host path is refused whole.
    for dry_run in [false, true] {
        let v = |name: &str, kernel: &str| pb::NewVm {
            name: name.into(),
            spec: boot(kernel, ""),
            ..Default::default()
        };
        let e = vms
            .create_vms(pb::CreateVmsRequest {
                vms: vec![v("fine", "vmlinuz"), v("escape", "../../etc/shadow")],
                dry_run,
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{}", e.message());
        assert!(e.message().contains("--image-dir"), "{}", e.message());
    }

    assert_eq!(cluster_state(&node), before, "a rejected request changed the state");
    node.shared().state.check_invariants().unwrap();
    node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corrupt_or_foreign_raft_traffic_is_refused() {
    let (node, ch, _dir) = start().await;
    let cluster_id = node.shared().cluster_id.to_string();
    let before = cluster_state(&node);
    let mut raft = RaftServiceClient::new(ch);

    // Another cluster's traffic is refused before decoding.
    let foreign =
        pb::RaftRequest { cluster_id: "someone-else".into(), from: 9, payload: vec![1, 2, 3], format: 1 };
    let e = raft.append_entries(foreign).await.unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);
    assert!(e.message().contains("belongs to cluster"), "{}", e.message());

    // A message in a format newer than this node reads is refused, naming
    // both versions, before its payload is decoded.
    let newer =
        pb::RaftRequest { cluster_id: cluster_id.clone(), from: 2, payload: vec![1, 2, 3], format: 99 };
    let e = raft.append_entries(newer).await.unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition);
    assert!(
        e.message().contains("version 99")
            && e.message().contains(&format!("0 to {}", blixard_core::format::CURRENT)),
        "{}",
        e.message()
    );

    // Garbage, truncated and absurd-length payloads are InvalidArgument.
    let payloads: Vec<Vec<u8>> = vec![
        vec![],
        vec![0xff; 64],
        vec![3, 0xfd, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x7f],
        (0..4096u32).map(|i| (i * 131 % 251) as u8).collect(),
    ];
    for p in payloads {
        // format 0: what nodes from before format versions send.
        let req =
            || pb::RaftRequest { cluster_id: cluster_id.clone(), from: 2, payload: p.clone(), format: 0 };
        for e in [
            raft.append_entries(req()).await.unwrap_err(),
            raft.vote(req()).await.unwrap_err(),
            raft.install_snapshot(req()).await.unwrap_err(),
            raft.propose(req()).await.unwrap_err(),
        ] {
            assert_eq!(e.code(), Code::InvalidArgument, "{}", e.message());
        }
    }
    assert_eq!(cluster_state(&node), before);
    assert!(node.shared().is_leader(), "bad traffic disturbed the leader");
    node.shutdown().await;
}

/// The peer link's edge (raft/link.rs, node/peer_link.rs): strangers,
/// foreign clusters, undecodable and unknown requests are refused before
/// anything is done; a forwarded write is refused for an unknown token and
/// done for a good one; nothing else changes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_peer_link_traffic_is_refused() {
    use std::borrow::Cow;

    use blixard_core::command::Proposal;
    use blixard_core::node::forwarder::{LinkForward, LinkForwardReply};
    use blixard_core::raft::link::{
        Framed, Hello, LinkError, KIND_APPEND, KIND_FORWARD, STATUS_OK, STATUS_REFUSED,
    };

    let (node, _ch, dir) = start().await;
    let shared = node.shared();
    let port = shared.link_port.load(std::sync::atomic::Ordering::Relaxed);
    assert_ne!(port, 0, "the node serves no peer link");
    let cluster_id = shared.cluster_id.to_string();
    let dial = || async move {
        let s = tokio::net::TcpStream::connect(("127.0.0.1", port)).await.unwrap();
        Framed::new(Box::new(s))
    };
    // The node's answer to a hello: its status and payload.
    let hello =
        |cluster: &str| Hello { format: blixard_core::format::CURRENT, cluster_id: cluster.into(), from: 2 };
    async fn opened(link: &mut Framed, hello: &Hello) -> (u8, Vec<u8>) {
        link.open(hello).await.unwrap();
        let (status, payload) = link.recv().await.unwrap().expect("an answer to the hello");
        (status, payload.to_vec())
    }
    let before = cluster_state(&node);

    // Not a peer (an HTTP/2 preface): closed without a word.
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    tokio::io::AsyncWriteExt::write_all(&mut s, b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n").await.unwrap();
    let mut buf = [0u8; 16];
    let n = tokio::time::timeout(Duration::from_secs(10), tokio::io::AsyncReadExt::read(&mut s, &mut buf))
        .await
        .expect("the node kept a stranger's connection open")
        .unwrap_or(0);
    assert_eq!(n, 0, "the node answered a stranger");

    // Another cluster: refused, with the reason.
    let mut link = dial().await;
    let (status, reason) = opened(&mut link, &hello("someone-else")).await;
    assert_eq!(status, STATUS_REFUSED);
    assert!(
        String::from_utf8_lossy(&reason).contains("belongs to cluster"),
        "{}",
        String::from_utf8_lossy(&reason)
    );

    // Undecodable requests and unknown kinds: refused, connection closed.
    for (kind, payload) in
        [(KIND_APPEND, vec![0xff; 64]), (KIND_FORWARD, vec![3, 0xfd, 0xff, 0xff]), (77, vec![1])]
    {
        let mut link = dial().await;
        assert_eq!(opened(&mut link, &hello(&cluster_id)).await.0, STATUS_OK);
        link.send(kind, &payload).await.unwrap();
        let (status, _) = link.recv().await.unwrap().expect("an answer");
        assert_eq!(status, STATUS_REFUSED, "kind {kind}");
        assert!(link.recv().await.map(|f| f.is_none()).unwrap_or(true), "kind {kind}: still open");
    }

    // A forwarded write for an unknown token is refused as a gRPC forward's
    // would be; for the admin token it is done.
    let forward = |token: &str, p: Proposal| LinkForward {
        token: Some(Cow::Owned(format!("Bearer {token}"))),
        claim: None,
        traceparent: None,
        proposals: Cow::Owned(vec![p]),
    };
    let mut link = dial().await;
    assert_eq!(opened(&mut link, &hello(&cluster_id)).await.0, STATUS_OK);
    let stranger = format!("blx_{}", "0".repeat(64));
    let reply: LinkForwardReply =
        link.request(KIND_FORWARD, &forward(&stranger, create("sneaky"))).await.unwrap();
    let (code, message) = reply.expect_err("a forward for an unknown token was taken");
    assert_eq!(Code::from_i32(code), Code::Unauthenticated, "{message}");
    assert_eq!(cluster_state(&node), before, "a refused forward changed the state");

    let token = blixard_core::node::bootstrap::read(dir.path()).unwrap();
    let reply: Result<LinkForwardReply, LinkError> =
        link.request(KIND_FORWARD, &forward(&token, create("proper"))).await;
    let answers = reply.unwrap().expect("the admin's forward was refused");
    assert!(matches!(answers.as_slice(), [Ok(Ok(_))]), "the admin's forward failed");
    assert!(shared.state.with_vm("proper", |_| ()).is_some());
    assert!(shared.state.with_vm("sneaky", |_| ()).is_none());
    assert!(node.shared().is_leader(), "bad traffic disturbed the leader");
    node.shutdown().await;
}

/// A client's request id makes a write exactly-once: a retry returns the
/// first outcome, success or rejection, and never applies again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_request_ids_return_the_first_outcome() {
    let (node, ch, _dir) = start().await;
    let mut vms = VmServiceClient::new(ch.clone());
    let create = |name: &str, id: &str| pb::CreateVmRequest {
        name: name.into(),
        spec: spec(1, 128),
        no_start: true,
        request_id: id.into(),
        ..Default::default()
    };
    let first = vms.create_vm(create("web", "req-1")).await.unwrap().into_inner();
    let again = vms.create_vm(create("web", "req-1")).await.unwrap().into_inner();
    assert_eq!(first.vm, again.vm, "the retry shows the VM the first write created, unchanged");
    assert_eq!(node.shared().state.vm_count(), 1);
    // Another id for the same name is a new request: rejected.
    let e = vms.create_vm(create("web", "req-2")).await.unwrap_err();
    assert_eq!(e.code(), Code::AlreadyExists);
    assert_eq!(outcome(&e), "rejected");
    // Delete, twice under one id: the retry succeeds too (first outcome),
    // instead of failing with "no VM named".
    let del = |id: &str| pb::DeleteVmRequest { name: "web".into(), request_id: id.into() };
    vms.delete_vm(del("req-3")).await.unwrap();
    vms.delete_vm(del("req-3")).await.unwrap();
    assert_eq!(node.shared().state.vm_count(), 0);
    // req-2 was rejected; now that the name is free, retrying it still
    // answers with its one outcome and creates nothing.
    let e = vms.create_vm(create("web", "req-2")).await.unwrap_err();
    assert_eq!(e.code(), Code::AlreadyExists, "{}", e.message());
    assert_eq!(node.shared().state.vm_count(), 0);
    // req-1 created "web", which is gone now: its retry still succeeds (the
    // first outcome), shows no VM, and creates nothing.
    let late = vms.create_vm(create("web", "req-1")).await.unwrap().into_inner();
    assert_eq!(late.vm, None);
    assert!(late.index > first.index, "the retry's own (no-op) entry, after the first write");
    assert_eq!(node.shared().state.vm_count(), 0);
    // The same for start/stop/restart under an id whose VM is gone.
    vms.create_vm(create("db", "req-4")).await.unwrap();
    let stop = pb::VmNameRequest { name: "db".into(), request_id: "req-5".into() };
    vms.stop_vm(stop.clone()).await.unwrap();
    vms.delete_vm(pb::DeleteVmRequest { name: "db".into(), request_id: "req-6".into() }).await.unwrap();
    let again = vms.stop_vm(stop).await.unwrap().into_inner();
    assert_eq!(again.vm, None);
    // A bad request id is refused at the edge.
    for bad in ["has space", &"x".repeat(129), "tab\t"] {
        let e = vms.create_vm(create("other", bad)).await.unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{bad:?}");
        assert!(e.message().contains("request id"), "{}", e.message());
        assert_eq!(outcome(&e), "rejected");
    }
    assert_eq!(node.shared().state.vm_count(), 0);
}

/// The writes of one forward join one Raft entry: the leader's batcher
/// takes a lone write straight to Raft from its caller's task, and must not
/// take the first write of a forwarded batch that way (which would split
/// the batch into two entries, each replicated and fsynced on its own).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forwarded_batch_is_one_entry() {
    use std::borrow::Cow;

    use blixard_core::node::forwarder::{LinkForward, LinkForwardReply};
    use blixard_core::raft::link::{Framed, Hello, KIND_FORWARD, STATUS_OK};

    let (node, _ch, dir) = start().await;
    let shared = node.shared();
    let port = shared.link_port.load(std::sync::atomic::Ordering::Relaxed);
    let s = tokio::net::TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    let mut link = Framed::new(Box::new(s));
    let hello =
        Hello { format: blixard_core::format::CURRENT, cluster_id: shared.cluster_id.to_string(), from: 2 };
    link.open(&hello).await.unwrap();
    assert_eq!(link.recv().await.unwrap().expect("an answer to the hello").0, STATUS_OK);
    let token = blixard_core::node::bootstrap::read(dir.path()).unwrap();
    // Two rounds of two: the node has 4 vCPUs.
    for round in 0..2 {
        let names: Vec<String> = (0..2).map(|i| format!("batch-{round}-{i}")).collect();
        let forward = LinkForward {
            token: Some(Cow::Owned(format!("Bearer {token}"))),
            claim: None,
            traceparent: None,
            proposals: Cow::Owned(names.iter().map(|n| create(n)).collect()),
        };
        let reply: LinkForwardReply = link.request(KIND_FORWARD, &forward).await.unwrap();
        let answers = reply.expect("the admin's forward was refused");
        let indexes: Vec<u64> = answers
            .into_iter()
            .map(|a| match a {
                Ok(Ok((index, Ok(_)))) => index,
                other => panic!("a forwarded create failed: {other:?}"),
            })
            .collect();
        assert_eq!(indexes.len(), names.len());
        assert!(
            indexes.iter().all(|i| *i == indexes[0]),
            "round {round}: one forward became entries {indexes:?}"
        );
        for n in &names {
            assert!(shared.state.with_vm(n, |_| ()).is_some(), "{n} was not created");
        }
    }
    node.shutdown().await;
}
