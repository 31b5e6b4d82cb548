//! Tokens and roles end to end, through real processes on loopback: every
//! call needs credentials; viewer, operator and admin may do what their role
//! allows and nothing more (exit codes 7 and 8); a revoked or expired token is
//! refused by every node; a follower forwards a write with its caller, whose
//! rights the leader checks again; a client cannot pass itself off as a
//! node or as a caller a node vouches for.
mod common;

use std::process::Output;

use blixard_core::auth::{token, CALLER};
use blixard_core::command::{Command, Proposal};
use blixard_core::node::forwarder::{BatchItemReply, ProposeBatchRequest};
use blixard_proto as pb;
use common::*;
use serde_json::Value;

/// `blixard` at `port` with `token` (none: no credentials at all).
fn as_token(port: u16, token: Option<&str>, args: &[&str]) -> Output {
    let mut cmd = std::process::Command::new(BIN);
    cmd.env("BLIXARD_CONFIG", "/nonexistent/blixard-test-config.toml").env_remove("BLIXARD_TOKEN");
    if let Some(t) = token {
        cmd.env("BLIXARD_TOKEN", t);
    }
    cmd.args(["--addr", &loopback(port)]).args(args).output().unwrap()
}

fn code(o: &Output) -> Option<i32> {
    o.status.code()
}

fn create_token(port: u16, name: &str, role: &str, extra: &[&str]) -> String {
    let out = cli(port, &[&["token", "create", "--name", name, "--role", role][..], extra].concat());
    assert!(out.status.success(), "token create {name}: {}", stderr(&out));
    let t = stdout(&out).trim().to_string();
    assert!(token::well_formed(&t), "stdout is the token alone: {t:?}");
    t
}

fn vm_create(name: &str) -> Vec<&str> {
    vec!["vm", "create", name, "--vcpus", "1", "--memory", "16", "--disk", "1", "--no-start"]
}

/// The leader's port, and a follower's.
fn roles(nodes: &Nodes) -> (u16, u16) {
    let s = json_of(nodes.port(1), &["cluster", "status", "-o", "json"]);
    let leader = s["leader_id"].as_u64().unwrap();
    let follower = (1..=3).find(|i| *i != leader).unwrap();
    (nodes.port(leader), nodes.port(follower))
}

#[test]
fn roles_tokens_revocation_and_forwarding() {
    let root = tempfile::tempdir().unwrap();
    let nodes = Nodes::three(root.path());
    let p1 = nodes.port(1);
    eventually("three voters, all registered", 90, || {
        let s: Value = serde_json::from_slice(&cli(p1, &["cluster", "status", "-o", "json"]).stdout).ok()?;
        let voters = s["members"].as_array()?.iter().filter(|m| m["role"] != "learner").count();
        (voters == 3 && s["nodes"].as_array()?.len() == 3).then_some(())
    });
    let (leader, follower) = roles(&nodes);

    // No credentials, or a token that is not one: refused with exit 7.
    for port in nodes.ports.clone() {
        let out = as_token(port, None, &["vm", "list"]);
        assert_eq!(code(&out), Some(7), "{}", stderr(&out));
        assert!(stderr(&out).contains("unauthenticated: no credentials"), "{}", stderr(&out));
    }
    let forged = format!("{}{}", token::PREFIX, "0".repeat(64));
    let out = as_token(p1, Some(&forged), &["vm", "list"]);
    assert_eq!(code(&out), Some(7));
    assert!(stderr(&out).contains("unknown or revoked token"), "{}", stderr(&out));
    let out = as_token(p1, Some("hunter2"), &["vm", "list"]);
    assert_eq!(code(&out), Some(7));
    assert!(!stderr(&out).contains("hunter2"), "a bad token is never echoed: {}", stderr(&out));

    // The founder's bootstrap token is an admin token.
    let list = json_of(p1, &["token", "list", "-o", "json"]);
    assert_eq!(list.as_array().unwrap().len(), 1);
    assert_eq!(list[0]["name"], "bootstrap");
    assert_eq!(list[0]["role"], "admin");
    assert_eq!(list[0]["bootstrap"], true);

    let viewer = create_token(p1, "viewer-1", "viewer", &[]);
    let operator = create_token(p1, "ops", "operator", &[]);
    let listed = stdout(&cli(p1, &["token", "list", "-o", "json"]));
    for secret in [&viewer, &operator] {
        assert!(!listed.contains(secret.as_str()), "token list never shows a secret");
    }

    // Viewer: reads yes, writes no (through the leader and a follower).
    for port in [leader, follower] {
        assert!(as_token(port, Some(&viewer), &["vm", "list"]).status.success());
        let out = as_token(port, Some(&viewer), &vm_create("by-viewer"));
        assert_eq!(code(&out), Some(8), "{}", stderr(&out));
        assert!(
            stderr(&out).contains("permission denied: vm create needs the operator role"),
            "{}",
            stderr(&out)
        );
        let out = as_token(port, Some(&viewer), &["token", "list"]);
        assert_eq!(code(&out), Some(8));
    }
    // Operator: VM writes through a follower (forwarded with the caller),
    // but no membership, node or token changes.
    let out = as_token(follower, Some(&operator), &vm_create("by-operator"));
    assert!(out.status.success(), "{}", stderr(&out));
    for args in [
        &["cluster", "remove", "3"][..],
        &["node", "set", "1", "--label", "x=y"],
        &["token", "create", "--name", "sneaky", "--role", "admin"],
        &["quota", "set", "acme", "--vms", "1"],
    ] {
        let out = as_token(follower, Some(&operator), args);
        assert_eq!(code(&out), Some(8), "{args:?}: {}", stderr(&out));
    }
    let out = as_token(leader, Some(&viewer), &["vm", "get", "by-viewer"]);
    assert_eq!(code(&out), Some(1), "nothing was created by the refused writes: {}", stderr(&out));

    // Revocation: refused by every node once applied there.
    let out = cli(p1, &["token", "revoke", "viewer-1"]);
    assert!(out.status.success(), "{}", stderr(&out));
    for port in nodes.ports.clone() {
        eventually("the revocation reaches every node", 10, || {
            (code(&as_token(port, Some(&viewer), &["vm", "list"])) == Some(7)).then_some(())
        });
    }
    let out = cli(p1, &["token", "revoke", "viewer-1"]);
    assert_eq!(code(&out), Some(1));
    assert!(stderr(&out).contains("no token named"), "{}", stderr(&out));

    // Expiry: a token with a 2 s lifetime works, then every node refuses it.
    let brief = create_token(p1, "brief", "viewer", &["--ttl", "2s"]);
    assert!(as_token(follower, Some(&brief), &["vm", "list"]).status.success());
    std::thread::sleep(std::time::Duration::from_millis(2100));
    for port in nodes.ports.clone() {
        let out = as_token(port, Some(&brief), &["vm", "list"]);
        assert_eq!(code(&out), Some(7), "{}", stderr(&out));
        assert!(stderr(&out).contains("expired"), "{}", stderr(&out));
    }

    // The last admin token cannot be revoked; with another one it can.
    let out = cli(p1, &["token", "revoke", "bootstrap"]);
    assert_eq!(code(&out), Some(1));
    assert!(stderr(&out).contains("last admin token"), "{}", stderr(&out));

    forged_markers_are_ignored(leader, follower, &operator);
}

/// A client cannot vouch for itself: a caller assertion or a forwarded
/// marker from a connection without a node certificate counts for nothing,
/// and the internal Propose checks the caller it carries.
fn forged_markers_are_ignored(leader: u16, follower: u16, operator: &str) {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(async {
        let channel = |port: u16| {
            tonic::transport::Endpoint::from_shared(format!("http://127.0.0.1:{port}"))
                .unwrap()
                .connect_lazy()
        };
        let viewer_like = create_token_via_api(leader).await;
        // Known to the follower too before it is used there.
        for _ in 0..100 {
            let mut c = pb::cluster_service_client::ClusterServiceClient::new(channel(follower));
            let mut r = tonic::Request::new(pb::StatusRequest::default());
            r.metadata_mut().insert("authorization", format!("Bearer {viewer_like}").parse().unwrap());
            if c.status(r).await.is_ok() {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }

        // Public API: a viewer that claims to be forwarded for an admin.
        let mut vms = pb::vm_service_client::VmServiceClient::new(channel(follower));
        let mut req = tonic::Request::new(pb::CreateVmRequest {
            name: "forged".into(),
            spec: Some(pb::VmSpec { vcpus: 1, memory_mb: 16, disk_gb: 1, ..Default::default() }),
            no_start: true,
            ..Default::default()
        });
        let md = req.metadata_mut();
        md.insert("authorization", format!("Bearer {viewer_like}").parse().unwrap());
        md.insert(CALLER, "cert:admin:root".parse().unwrap());
        md.insert("x-blixard-forwarded", "1".parse().unwrap());
        let e = vms.create_vm(req).await.unwrap_err();
        assert_eq!(e.code(), tonic::Code::PermissionDenied, "{e:?}");

        // The internal Propose, straight to the leader, as if forwarded.
        let status = pb::cluster_service_client::ClusterServiceClient::new(channel(leader));
        let mut sreq = tonic::Request::new(pb::StatusRequest::default());
        sreq.metadata_mut().insert("authorization", format!("Bearer {operator}").parse().unwrap());
        let cluster_id = status.clone().status(sreq).await.unwrap().into_inner().cluster_id;
        let proposal = Proposal {
            at_ms: 1,
            request: None,
            command: Command::SetScheduler { strategy: blixard_core::types::Strategy::Binpack },
        };
        // An internal RPC as node 2 would send it, with `meta` on it.
        let raft_msg = |payload: Vec<u8>, meta: &[(&'static str, String)]| {
            let mut r = tonic::Request::new(pb::RaftRequest {
                cluster_id: cluster_id.clone(),
                from: 2,
                payload,
                format: u32::from(blixard_core::format::CURRENT),
            });
            for (k, v) in meta {
                r.metadata_mut().insert(*k, v.parse().unwrap());
            }
            r
        };
        let raft_req =
            |meta: &[(&'static str, String)]| raft_msg(blixard_core::codec::encode(&proposal).unwrap(), meta);
        let mut raft = pb::raft_service_client::RaftServiceClient::new(channel(leader));
        // A caller assertion from a client connection: refused.
        let e = raft.propose(raft_req(&[(CALLER, "cert:admin:root".into())])).await.unwrap_err();
        assert_eq!(e.code(), tonic::Code::PermissionDenied, "{e:?}");
        // A forwarded operator token may not change the scheduler (admin).
        let e = raft.propose(raft_req(&[("authorization", format!("Bearer {operator}"))])).await.unwrap_err();
        assert_eq!(e.code(), tonic::Code::PermissionDenied, "{e:?}");
        assert!(e.message().contains("admin role"), "{e:?}");

        // The batched forward, straight to the leader: the caller is
        // checked once, and each proposal's command against its role.
        let create = Proposal {
            at_ms: 1,
            request: None,
            command: Command::CreateVm {
                name: "batched-raw".into(),
                spec: blixard_core::types::VmSpec {
                    vcpus: 1,
                    memory_mb: 16,
                    disk_gb: 1,
                    ..Default::default()
                },
                start: false,
            },
        };
        let batch = |meta: &[(&'static str, String)]| {
            let body = ProposeBatchRequest { proposals: vec![create.clone(), proposal.clone()] };
            raft_msg(blixard_core::codec::encode(&body).unwrap(), meta)
        };
        let e = raft.propose_batch(batch(&[(CALLER, "cert:admin:root".into())])).await.unwrap_err();
        assert_eq!(e.code(), tonic::Code::PermissionDenied, "{e:?}");
        let reply =
            raft.propose_batch(batch(&[("authorization", format!("Bearer {operator}"))])).await.unwrap();
        let answers: Vec<BatchItemReply> = blixard_core::codec::decode(&reply.into_inner().payload).unwrap();
        assert_eq!(answers.len(), 2);
        assert!(matches!(&answers[0], Ok(Ok((_, Ok(_))))), "the operator's create applied: {:?}", answers[0]);
        match &answers[1] {
            Err((code, why)) => {
                assert_eq!(*code, tonic::Code::PermissionDenied as i32);
                assert!(why.contains("admin role"), "{why}");
            }
            other => panic!("the operator's SetScheduler was not refused: {other:?}"),
        }

        // Concurrent writes of two callers through the follower share
        // batched forwards per caller: every operator write applies, every
        // viewer write is refused, and nothing is mixed up between them.
        let write = |token: String, name: String| {
            let mut vms = pb::vm_service_client::VmServiceClient::new(channel(follower));
            async move {
                let mut req = tonic::Request::new(pb::CreateVmRequest {
                    name,
                    spec: Some(pb::VmSpec { vcpus: 1, memory_mb: 16, disk_gb: 1, ..Default::default() }),
                    no_start: true,
                    ..Default::default()
                });
                req.metadata_mut().insert("authorization", format!("Bearer {token}").parse().unwrap());
                vms.create_vm(req).await
            }
        };
        let ops = (0..16).map(|i| write(operator.to_string(), format!("fwd-op-{i}")));
        let views = (0..16).map(|i| write(viewer_like.clone(), format!("fwd-view-{i}")));
        let (ops, views) =
            futures::future::join(futures::future::join_all(ops), futures::future::join_all(views)).await;
        for r in &ops {
            assert!(r.is_ok(), "{r:?}");
        }
        for r in &views {
            assert_eq!(r.as_ref().unwrap_err().code(), tonic::Code::PermissionDenied, "{r:?}");
        }
        let mut vms = pb::vm_service_client::VmServiceClient::new(channel(leader));
        let mut req = tonic::Request::new(pb::ListVmsRequest::default());
        req.metadata_mut().insert("authorization", format!("Bearer {operator}").parse().unwrap());
        let names: Vec<String> =
            vms.list_vms(req).await.unwrap().into_inner().vms.into_iter().map(|v| v.name).collect();
        assert_eq!(names.iter().filter(|n| n.starts_with("fwd-op-")).count(), 16, "{names:?}");
        assert!(!names.iter().any(|n| n.starts_with("fwd-view-")), "{names:?}");
    });
}

/// A viewer token made through the API (the node makes the secret).
async fn create_token_via_api(port: u16) -> String {
    let admin = admin_token(port).expect("the founder's admin token");
    let ch =
        tonic::transport::Endpoint::from_shared(format!("http://127.0.0.1:{port}")).unwrap().connect_lazy();
    let mut c = pb::cluster_service_client::ClusterServiceClient::new(ch);
    let mut req = tonic::Request::new(pb::CreateTokenRequest {
        name: "api-viewer".into(),
        role: "viewer".into(),
        ..Default::default()
    });
    req.metadata_mut().insert("authorization", format!("Bearer {admin}").parse().unwrap());
    let r = c.create_token(req).await.unwrap().into_inner();
    assert!(token::well_formed(&r.secret), "the node made and returned a secret");
    assert_eq!(r.token.unwrap().role, "viewer");
    r.secret
}
