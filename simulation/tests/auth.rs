//! Authentication and roles under faults (issue 11): tokens and roles are
//! checked by the real node code on every node, a follower forwards a
//! client's write with the client's token and the leader checks it again,
//! and a revocation racing with writes wins for good: once every node has
//! applied it, no write with that token ever commits, whichever node it is
//! sent through.
//!
//! TLS is left out under the simulator (madsim-tonic ignores TLS settings):
//! callers are tokens, as on a plaintext cluster.
//!
//! Run with
//! `RUSTFLAGS="--cfg madsim" CARGO_TARGET_DIR=target/madsim cargo test -p blixard-simulation --release --test auth`.
#![cfg(madsim)]

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use blixard_core::auth::token;
use blixard_core::types::NodeId;
use blixard_proto as pb;
use blixard_proto::cluster_service_client::ClusterServiceClient;
use blixard_proto::vm_service_client::VmServiceClient;
use blixard_simulation::cluster::{admin_token, connect, request_as, SimCluster, SimConfig};
use blixard_simulation::model::Trace;
use blixard_simulation::seeds::{run_seeds, simulate};
use common::*;
use tonic::{Code, Status};

const CALL: Duration = Duration::from_secs(15);

/// Creates token `name` with `role` through `via` as admin, retrying under
/// its request id until the cluster answers; its secret.
async fn make_token(c: &SimCluster, name: &str, role: &str) -> String {
    let secret = token::new_secret().unwrap();
    let hash = token::hash(&secret).to_vec();
    let (name, role) = (name.to_string(), role.to_string());
    let id = format!("make-{name}");
    for attempt in 0.. {
        let via = pick(&c.up_nodes());
        let req = pb::CreateTokenRequest {
            name: name.clone(),
            role: role.clone(),
            ttl_ms: 0,
            secret_sha256: hash.clone(),
            request_id: id.clone(),
        };
        let r = c
            .client()
            .spawn(async move {
                let mut cl = ClusterServiceClient::new(connect(via).await?);
                cl.create_token(request_as(req, CALL, &admin_token())).await
            })
            .await
            .unwrap();
        match r {
            Ok(_) => return secret,
            Err(e) => assert!(attempt < 40, "token {name} never created: {e}"),
        }
        madsim::time::sleep(Duration::from_millis(500)).await;
    }
    unreachable!()
}

/// A VM create with `secret` through `via`: the committed index, or why not.
async fn create_as(c: &SimCluster, via: NodeId, name: String, secret: String) -> Result<u64, Status> {
    c.client()
        .spawn(async move {
            let mut v = VmServiceClient::new(connect(via).await?);
            let req = pb::CreateVmRequest {
                name,
                spec: Some(pb::VmSpec { vcpus: 1, memory_mb: 16, disk_gb: 1, ..Default::default() }),
                no_start: true,
                ..Default::default()
            };
            Ok(v.create_vm(request_as(req, CALL, &secret)).await?.into_inner().index)
        })
        .await
        .unwrap()
}

async fn set_scheduler_as(c: &SimCluster, via: NodeId, secret: String) -> Result<(), Status> {
    c.client()
        .spawn(async move {
            let mut cl = ClusterServiceClient::new(connect(via).await?);
            let req = pb::SetSchedulerRequest { strategy: "binpack".into(), request_id: String::new() };
            cl.set_scheduler(request_as(req, CALL, &secret)).await.map(|_| ())
        })
        .await
        .unwrap()
}

fn refused(e: &Status) -> bool {
    matches!(e.code(), Code::PermissionDenied | Code::Unauthenticated)
}

/// Roles hold under node kills, and a revocation racing with writes wins
/// once applied everywhere.
async fn roles_and_revocation(mut c: SimCluster) -> Trace {
    let mut trace = Trace::new();
    c.wait_ready(READY_TIMEOUT).await;
    let ops = make_token(&c, "ops", "operator").await;
    let viewer = make_token(&c, "viewer", "viewer").await;
    let all = c.ids();

    // Phase 1: a viewer never writes and an operator never changes the
    // scheduler, through any node, while nodes die and come back; the
    // operator's writes through followers are forwarded and commit.
    let mut denied = 0u64;
    let mut ops_acked = Vec::new();
    for round in 0..12 {
        if round % 4 == 1 {
            let victim = pick(&all);
            if c.up_nodes().len() == all.len() {
                c.kill(victim);
            }
        }
        if round % 4 == 3 {
            for id in c.down_nodes() {
                c.restart(id).await;
            }
        }
        let via = pick(&c.up_nodes());
        match create_as(&c, via, format!("viewer-{round}"), viewer.clone()).await {
            Ok(i) => panic!("a viewer's create committed at index {i} via n{via}"),
            Err(e) if refused(&e) => denied += 1,
            Err(e) => panic!("a viewer's create via n{via} failed otherwise: {e}"),
        }
        if let Ok(()) = set_scheduler_as(&c, via, ops.clone()).await {
            panic!("an operator changed the scheduler via n{via}");
        }
        let name = format!("ops-{round}");
        if create_as(&c, via, name.clone(), ops.clone()).await.is_ok() {
            ops_acked.push(name);
        }
    }
    for id in c.down_nodes() {
        c.restart(id).await;
    }
    c.wait_converged(CONVERGE_TIMEOUT).await;
    trace.push(format_args!("phase 1: {denied} refusals, {} operator creates acked", ops_acked.len()));
    assert!(!ops_acked.is_empty(), "no operator write was acknowledged");

    // Phase 2: writers with the operator token through every node while the
    // admin revokes it. After every node applied the revocation, nothing
    // with the token commits.
    let stop = Arc::new(AtomicBool::new(false));
    let after_all_applied = Arc::new(AtomicBool::new(false));
    let mut writers = Vec::new();
    for w in 0..4u64 {
        let (stop, flag, ops) = (stop.clone(), after_all_applied.clone(), ops.clone());
        let nodes = all.clone();
        writers.push(c.client().spawn(async move {
            let mut n = 0u64;
            let mut committed = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                let via = nodes[((w + n) as usize) % nodes.len()];
                let started_after = flag.load(Ordering::Relaxed);
                let name = format!("race-{w}-{n}");
                n += 1;
                let call = async {
                    let mut v = VmServiceClient::new(connect(via).await?);
                    let req = pb::CreateVmRequest {
                        name: name.clone(),
                        spec: Some(pb::VmSpec { vcpus: 1, memory_mb: 16, disk_gb: 1, ..Default::default() }),
                        no_start: true,
                        ..Default::default()
                    };
                    Ok::<_, Status>(v.create_vm(request_as(req, CALL, &ops)).await?.into_inner().index)
                };
                if let Ok(index) = call.await {
                    assert!(
                        !started_after,
                        "{name} via n{via} committed at {index} after every node applied the revocation"
                    );
                    committed.push(index);
                }
                madsim::time::sleep(Duration::from_millis(7)).await;
            }
            committed
        }));
    }
    madsim::time::sleep(millis(50, 400)).await;
    // One node lags while the revocation commits (its link from the
    // leader clogged), so a write sent through it may be forwarded with a
    // token the leader no longer accepts.
    let leader = c.leader().await.map(|(l, _)| l).unwrap_or(1);
    let laggard = pick(&all.iter().copied().filter(|&i| i != leader).collect::<Vec<_>>());
    c.clog_link(leader, laggard);
    let revoke_via = pick(&all.iter().copied().filter(|&i| i != laggard).collect::<Vec<_>>());
    let revoked_at = loop {
        let r = c
            .client()
            .spawn(async move {
                let mut cl = ClusterServiceClient::new(connect(revoke_via).await?);
                let req = pb::RevokeTokenRequest { name: "ops".into(), request_id: "revoke-ops".into() };
                cl.revoke_token(request_as(req, CALL, &admin_token())).await
            })
            .await
            .unwrap();
        match r {
            Ok(r) => break r.into_inner().index,
            Err(e) if e.code() == Code::NotFound => panic!("ops vanished: {e}"),
            Err(_) => madsim::time::sleep(Duration::from_millis(200)).await,
        }
    };
    trace.push(format_args!("revoked at index {revoked_at}; n{laggard} lags"));
    for id in all.iter().copied().filter(|&i| i != laggard) {
        c.wait_applied(id, revoked_at, CONVERGE_TIMEOUT).await.unwrap_or_else(|e| panic!("{e}"));
    }
    // Through the laggard, which may not know yet: refused all the same
    // (by it, or by the leader it forwards to).
    let lagging = c.raft_view(laggard).map(|v| v.applied < revoked_at).unwrap_or(false);
    c.unclog_link(leader, laggard);
    match create_as(&c, laggard, "via-laggard".into(), ops.clone()).await {
        Ok(i) => panic!("a write with the revoked token via lagging n{laggard} committed at {i}"),
        Err(e) => assert!(refused(&e) || !lagging, "via n{laggard}: {e}"),
    }
    c.wait_applied(laggard, revoked_at, CONVERGE_TIMEOUT).await.unwrap_or_else(|e| panic!("{e}"));
    after_all_applied.store(true, Ordering::Relaxed);
    madsim::time::sleep(Duration::from_secs(2)).await;
    stop.store(true, Ordering::Relaxed);
    let mut after = 0u64;
    for w in writers {
        for index in w.await.unwrap() {
            if index > revoked_at {
                after += 1;
            }
        }
    }
    for id in all.iter().copied() {
        let e = create_as(&c, id, format!("after-{id}"), ops.clone()).await.unwrap_err();
        assert_eq!(e.code(), Code::Unauthenticated, "n{id}: {e}");
    }
    trace.push(format_args!(
        "racing writes committed after the revocation's index (proposed before their leader applied it): {after}; laggard was behind: {lagging}"
    ));
    trace.figures.push(("commits_after_revocation_index".into(), after as f64));
    c.wait_converged(CONVERGE_TIMEOUT).await;
    trace
}

#[test]
fn roles_hold_and_revocation_wins_under_faults() {
    init_logging();
    run_seeds("roles_hold_and_revocation_wins_under_faults", 12, |seed| {
        simulate(seed, SimConfig { vm_backends: false, ..SimConfig::default() }, roles_and_revocation)
    });
}
