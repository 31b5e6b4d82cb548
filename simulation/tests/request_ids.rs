//! Write outcomes and request ids under faults (issue 13): what a client is
//! told about a write must be true, and a write retried under its request
//! id applies exactly once.
//!
//! Run with
//! `RUSTFLAGS="--cfg madsim" CARGO_TARGET_DIR=target/madsim cargo test -p blixard-simulation --release --test request_ids`.
#![cfg(madsim)]

mod common;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use blixard_core::types::{NodeId, Resources};
use blixard_proto as pb;
use blixard_simulation::cluster::{write_call, write_until_definite, SimCluster, SimConfig, Write};
use blixard_simulation::model::{AckedVm, Model, Told, Trace};
use blixard_simulation::seeds::{run_seeds, simulate};
use common::*;
use madsim::rand::Rng;
use tonic::Code;

/// How long a client keeps retrying one write before calling the cluster
/// stuck (the scenarios always leave a majority running most of the time).
const GIVE_UP: Duration = Duration::from_secs(120);

/// Every VM of one node's list, by name.
async fn vms_by_name(c: &SimCluster, id: NodeId) -> BTreeMap<String, pb::Vm> {
    let vms = c.list_vms_stale(id).await.unwrap_or_else(|e| panic!("list VMs on n{id}: {e}"));
    vms.into_iter().map(|v| (v.name.clone(), v)).collect()
}

fn acked(vm: &pb::Vm) -> AckedVm {
    AckedVm { node_id: vm.node_id, revision: vm.revision }
}

// ------------------------------------------------------------ C: slow forwards

/// One write of the slow-forward scenario and what its client was told.
struct Sent {
    write: Write,
    id: String,
    via: NodeId,
    told: Told,
}

/// Writes sent through a follower whose link to the leader clogs (the
/// reply direction, the request direction, or both, drawn per round) for
/// 1-20 s, right before or right after the writes are forwarded; each
/// client's own deadline is 0.5-14 s, so some give up before the node
/// answers and some get the node's verdict; in half the rounds a client
/// that heard nothing retries at once under the same id through another
/// node while its first attempt may still be on its way. After healing and a long
/// settle, whatever each client was told must be true:
/// `rejected` never applied; `applied` (or success) applied; `unknown` is
/// retried under the same request id until definite, and that answer must
/// be true. Restarts count: a VM's generation must equal the number of
/// restarts that applied (exactly once each). The leader keeps its quorum
/// throughout, so leadership must not change.
async fn slow_forward(mut c: SimCluster) -> Trace {
    let mut model = Model::default();
    let mut next = 0u32;
    c.wait_ready(READY_TIMEOUT).await;
    let all = c.ids();
    create_acked(&mut c, &mut model, &mut next, &all, 6).await;
    c.wait_converged(CONVERGE_TIMEOUT).await;
    let (leader, term) = c.leader_view().expect("a leader");
    let watch = c.watch_roles();
    // Base VMs: half are restarted (any number of times), the other half
    // deleted (each at most once), so no retried restart meets a deleted VM.
    let base: Vec<String> = model.live.keys().cloned().collect();
    let restartable: Vec<String> = base[..base.len() / 2].to_vec();
    let mut deletable: Vec<String> = base[base.len() / 2..].to_vec();
    let mut sent: Vec<Sent> = Vec::new();
    const ROUNDS: usize = 3;
    for round in 0..ROUNDS {
        let followers: Vec<NodeId> = all.iter().copied().filter(|&id| id != leader).collect();
        let via = pick(&followers);
        let mut rng = madsim::rand::thread_rng();
        let links: Vec<(NodeId, NodeId)> = match rng.gen_range(0..3) {
            0 => vec![(leader, via)],
            1 => vec![(via, leader)],
            _ => vec![(leader, via), (via, leader)],
        };
        let deadline = Duration::from_millis(rng.gen_range(500..=14_000));
        let clog_after = Duration::from_millis(rng.gen_range(0..=60));
        let clog_for = Duration::from_millis(rng.gen_range(1_000..=20_000));
        let count = rng.gen_range(1..=3);
        let mut writes = Vec::new();
        for i in 0..count {
            let roll = madsim::rand::thread_rng().gen_range(0..4);
            let write = match roll {
                0 | 1 => {
                    next += 1;
                    Write::Create { name: format!("vm-{next:04}"), spec: small_spec() }
                }
                2 => Write::Restart { name: pick_name(&restartable) },
                3 if !deletable.is_empty() => {
                    let name = pick_name(&deletable);
                    deletable.retain(|n| *n != name);
                    Write::Delete { name }
                }
                _ => {
                    next += 1;
                    Write::Create { name: format!("vm-{next:04}"), spec: small_spec() }
                }
            };
            writes.push((write, format!("r{round}-w{i}")));
        }
        c.trace.push(format_args!(
            "round {round}: {count} writes via n{via}, deadline {}ms; clog {links:?} after {}ms for {}ms",
            deadline.as_millis(),
            clog_after.as_millis(),
            clog_for.as_millis()
        ));
        // Half the rounds, a client whose own deadline passed retries at
        // once under the same id through another node, while its first
        // attempt may still be stuck on the clogged link (and arrive later).
        let eager = rng.gen_bool(0.5);
        let calls: Vec<_> = writes
            .iter()
            .map(|(write, id)| {
                let (write, id) = (write.clone(), id.clone());
                let other = pick(&all.iter().copied().filter(|&n| n != via).collect::<Vec<_>>());
                c.client().spawn(async move {
                    let first = Told::from_reply(write_call(via, write.clone(), id.clone(), deadline).await);
                    let second = match first {
                        Told::Unknown(_) if eager => {
                            Some((other, Told::from_reply(write_call(other, write, id, WRITE_TIMEOUT).await)))
                        }
                        _ => None,
                    };
                    (first, second)
                })
            })
            .collect();
        madsim::time::sleep(clog_after).await;
        for &(from, to) in &links {
            c.clog_link(from, to);
        }
        madsim::time::sleep(clog_for).await;
        for &(from, to) in &links {
            c.unclog_link(from, to);
        }
        for ((write, id), call) in writes.into_iter().zip(calls) {
            let (first, second) = call.await.expect("client task");
            let mut last = None;
            for (n, t) in std::iter::once((via, first)).chain(second) {
                c.trace.push(format_args!(
                    "{} {} [{id}] via n{n} -> {}",
                    write.verb(),
                    write.name(),
                    t.label()
                ));
                if let Told::Unlabelled(s) = &t {
                    panic!(
                        "{} {} [{id}]: an error without outcome: {:?} {}",
                        write.verb(),
                        write.name(),
                        s.code(),
                        s.message()
                    );
                }
                last = Some((n, t));
            }
            let (through, told) = last.expect("at least the first answer");
            sent.push(Sent { write, id, via: through, told });
        }
    }

    // A long settle: anything still in flight lands (or never will).
    madsim::time::sleep(Duration::from_secs(20)).await;
    c.wait_converged(CONVERGE_TIMEOUT).await;
    let before_retries = vms_by_name(&c, leader).await;

    // Settle the unknowns under their ids; then every answer is definite.
    for s in sent.iter_mut() {
        if let Told::Unknown(_) = s.told {
            let (told, tries) = c
                .client()
                .spawn(write_until_definite(
                    all.clone(),
                    s.write.clone(),
                    s.id.clone(),
                    WRITE_TIMEOUT,
                    GIVE_UP,
                ))
                .await
                .expect("client task");
            c.trace.push(format_args!(
                "retry {} {} [{}] -> {} after {tries} tries",
                s.write.verb(),
                s.write.name(),
                s.id,
                told.label()
            ));
            // The first attempt's fate was sealed long ago: if it applied,
            // the retry must say so (and for a create, a VM that existed
            // before the retry is that first attempt's).
            if let (Write::Create { name, .. }, true) =
                (&s.write, before_retries.contains_key(s.write.name()))
            {
                assert!(
                    matches!(told, Told::Applied(_)),
                    "create {name} [{}] applied while the client was told unknown, but a retry under its id says {}",
                    s.id,
                    told.label()
                );
            }
            s.told = told;
        }
    }

    c.wait_converged(CONVERGE_TIMEOUT).await;
    let vms = vms_by_name(&c, leader).await;
    let mut restarts: BTreeMap<String, u64> = BTreeMap::new();
    for s in &sent {
        let name = s.write.name();
        let exists = vms.contains_key(name);
        let what = format!("{} {name} [{}] via n{}", s.write.verb(), s.id, s.via);
        match (&s.write, &s.told) {
            (Write::Create { .. }, Told::Applied(_)) => {
                assert!(exists, "{what}: told applied, but the VM does not exist");
                model.live.insert(name.to_string(), acked(&vms[name]));
            }
            (Write::Create { .. }, Told::Rejected(st)) => {
                assert!(!exists, "{what}: told rejected ({:?}), but the VM exists", st.code());
            }
            (Write::Delete { .. }, Told::Applied(_)) => {
                assert!(!exists, "{what}: told applied, but the VM still exists");
                model.live.remove(name);
                model.deleted.insert(name.to_string());
            }
            (Write::Delete { .. }, Told::Rejected(st)) => {
                assert!(exists, "{what}: told rejected ({:?}), but the VM is gone", st.code());
            }
            (Write::Restart { .. }, Told::Applied(_)) => *restarts.entry(name.to_string()).or_default() += 1,
            (Write::Restart { .. }, Told::Rejected(_)) => {}
            (_, told) => panic!("{what}: no definite answer after retrying: {}", told.label()),
        }
        if let Told::Rejected(st) = &s.told {
            // Nothing here is refused for a reason of its own.
            assert_eq!(st.code(), Code::Unavailable, "{what}: rejected: {}", st.message());
        }
    }
    for (name, vm) in &vms {
        let want = restarts.get(name).copied().unwrap_or(0);
        assert_eq!(
            vm.generation, want,
            "{name}: generation {} but {want} restarts were applied (a restart applied twice, or a rejected one applied)",
            vm.generation
        );
    }
    let leaders = watch.leaders();
    assert!(
        leaders == vec![(leader, term)] && watch.max_term() == term,
        "a slow follower link changed leadership: {leaders:?}\n{}",
        watch.describe()
    );
    drop(watch);
    c.check_final_state(&model, CONVERGE_TIMEOUT).await;
    c.trace
}

fn pick_name(names: &[String]) -> String {
    names[madsim::rand::thread_rng().gen_range(0..names.len())].clone()
}

#[test]
fn slow_forward_outcomes_are_true() {
    init_logging();
    run_seeds("slow_forward_outcomes_are_true", 200, |seed| {
        simulate(seed, SimConfig { vm_backends: false, ..SimConfig::default() }, slow_forward)
    });
}

// ------------------------------------------------------------ D: retries under kills

/// What one client did to one of its VMs, every write settled.
#[derive(Debug)]
struct VmLedger {
    name: String,
    /// The VM as its create (or a retry of it) returned it.
    created: pb::Vm,
    deleted: bool,
    /// Restarts that applied (distinct request ids).
    restarts: u64,
}

/// Retries `write` under `id` until definite. A transient rejection (no
/// leader took it: it will never apply) moves on to a fresh id, as a client
/// that still wants the write would; the abandoned id must then never
/// apply, which the final counts check. Any other rejection, or no
/// definite answer within `GIVE_UP`, is an error.
async fn settle(
    nodes: &[NodeId],
    write: &Write,
    id: &str,
    log: &mut Vec<String>,
    t0: madsim::time::Instant,
) -> Result<Option<pb::Vm>, String> {
    let mut id = id.to_string();
    for again in 1.. {
        let (told, tries) =
            write_until_definite(nodes.to_vec(), write.clone(), id.clone(), WRITE_TIMEOUT, GIVE_UP).await;
        log.push(format!(
            "{} {} [{id}] -> {} after {tries} tries (at {}ms)",
            write.verb(),
            write.name(),
            told.label(),
            t0.elapsed().as_millis()
        ));
        match told {
            Told::Applied(vm) => return Ok(vm.map(|v| *v)),
            t if t.is_transient_rejection() => {
                id = format!("{id}-again{again}");
                madsim::time::sleep(millis(50, 500)).await;
            }
            t => return Err(format!("{} {} [{id}]: {}", write.verb(), write.name(), t.label())),
        }
    }
    unreachable!()
}

/// One client, for `run_for` of virtual time: VM after VM, create it,
/// restart it 0-3 times, maybe re-send an earlier restart (a late
/// duplicate), maybe delete it and then re-send its create and its delete
/// (late duplicates that must change nothing); 0-300 ms between writes.
/// Every write is retried under its id until definite.
async fn client(
    client: usize,
    nodes: Vec<NodeId>,
    run_for: Duration,
    t0: madsim::time::Instant,
) -> Result<(Vec<VmLedger>, Vec<String>), String> {
    let start = madsim::time::Instant::now();
    let mut log = Vec::new();
    let mut ledger = Vec::new();
    let mut v = 0;
    while start.elapsed() < run_for {
        let name = format!("c{client}-vm{v}");
        v += 1;
        let create = Write::Create { name: name.clone(), spec: small_spec() };
        let create_id = format!("{name}-create");
        let mut created = settle(&nodes, &create, &create_id, &mut log, t0).await?;
        // "applied" without the VM (the contacted node was behind): ask again.
        while created.is_none() {
            madsim::time::sleep(millis(100, 500)).await;
            created = settle(&nodes, &create, &create_id, &mut log, t0).await?;
        }
        let created = created.unwrap();
        let restart = Write::Restart { name: name.clone() };
        let count = madsim::rand::thread_rng().gen_range(0..=3);
        for r in 0..count {
            madsim::time::sleep(millis(0, 300)).await;
            settle(&nodes, &restart, &format!("{name}-restart{r}"), &mut log, t0).await?;
        }
        if count > 0 && madsim::rand::thread_rng().gen_bool(0.5) {
            let r = madsim::rand::thread_rng().gen_range(0..count);
            settle(&nodes, &restart, &format!("{name}-restart{r}"), &mut log, t0).await?;
        }
        let deleted = madsim::rand::thread_rng().gen_bool(0.5);
        if deleted {
            madsim::time::sleep(millis(0, 300)).await;
            let delete = Write::Delete { name: name.clone() };
            settle(&nodes, &delete, &format!("{name}-delete"), &mut log, t0).await?;
            // Late duplicates. The create's answer is checked by
            // `retried_create_of_a_deleted_vm_says_applied`; here only
            // that it changes nothing.
            let (told, _) = write_until_definite(
                nodes.clone(),
                create.clone(),
                create_id.clone(),
                WRITE_TIMEOUT,
                GIVE_UP,
            )
            .await;
            log.push(format!(
                "late create {name} [{create_id}] -> {} (at {}ms)",
                told.label(),
                t0.elapsed().as_millis()
            ));
            settle(&nodes, &delete, &format!("{name}-delete"), &mut log, t0).await?;
        }
        ledger.push(VmLedger { name, created, deleted, restarts: count });
        madsim::time::sleep(millis(0, 300)).await;
    }
    Ok((ledger, log))
}

/// Three clients write concurrently (creates, restarts, deletes, late
/// duplicates), each write retried under its request id until definite,
/// while nodes are killed (the leader 70% of the time, also mid-write) and
/// restarted, one down at a time. At the end every node is back and: each
/// VM exists iff its delete did not apply; each existing VM's generation
/// equals its number of applied restarts (no write applied twice, no
/// abandoned id applied); every acknowledged write survived; replicas are
/// identical.
async fn retries_under_kills(mut c: SimCluster) -> Trace {
    c.wait_ready(READY_TIMEOUT).await;
    let nodes = c.ids();
    const CLIENTS: usize = 3;
    let run_for = millis(10_000, 30_000);
    let t0 = madsim::time::Instant::now();
    let done = Arc::new(AtomicUsize::new(0));
    let clients: Vec<_> = (0..CLIENTS)
        .map(|i| {
            let nodes = nodes.clone();
            let done = done.clone();
            c.client().spawn(async move {
                let r = client(i, nodes, run_for, t0).await;
                done.fetch_add(1, Ordering::SeqCst);
                r
            })
        })
        .collect();
    let mut kills = 0;
    while done.load(Ordering::SeqCst) < CLIENTS {
        madsim::time::sleep(millis(200, 2_500)).await;
        if done.load(Ordering::SeqCst) == CLIENTS {
            break;
        }
        match c.down_nodes().first() {
            Some(&id) => c.restart(id).await,
            None => {
                let victim = match c.leader_view() {
                    Some((leader, _)) if madsim::rand::thread_rng().gen_bool(0.7) => leader,
                    _ => pick(&c.up_nodes()),
                };
                c.kill(victim);
                kills += 1;
                c.trace.push(format_args!("(clients at {}ms)", t0.elapsed().as_millis()));
            }
        }
    }
    let mut model = Model::default();
    let mut ledgers = Vec::new();
    for (i, handle) in clients.into_iter().enumerate() {
        let (ledger, log) = handle.await.expect("client task").unwrap_or_else(|e| panic!("client {i}: {e}"));
        for line in log {
            c.trace.push(format_args!("client {i}: {line}"));
        }
        ledgers.extend(ledger);
    }
    c.trace.push(format_args!("{kills} kills"));
    for l in &ledgers {
        if l.deleted {
            model.deleted.insert(l.name.clone());
        } else {
            model.live.insert(l.name.clone(), acked(&l.created));
        }
    }
    c.check_final_state(&model, CONVERGE_TIMEOUT).await;
    let leader = c.leader_view().expect("a leader").0;
    let vms = vms_by_name(&c, leader).await;
    for l in &ledgers {
        match vms.get(&l.name) {
            Some(_) if l.deleted => panic!("{} exists although its delete applied", l.name),
            None if !l.deleted => panic!("{} is gone although it was never deleted", l.name),
            Some(vm) => assert_eq!(
                vm.generation, l.restarts,
                "{}: generation {} after {} applied restarts: a restart applied twice or an abandoned one applied",
                l.name, vm.generation, l.restarts
            ),
            None => {}
        }
    }
    assert_eq!(vms.len(), ledgers.iter().filter(|l| !l.deleted).count(), "VMs nobody created exist");
    c.trace
}

#[test]
fn retries_apply_exactly_once_under_leader_kills() {
    init_logging();
    run_seeds("retries_apply_exactly_once_under_leader_kills", 60, |seed| {
        let config = SimConfig { capacity: Resources::new(256, 512 * 1024, 20_000), ..SimConfig::default() };
        simulate(seed, config, retries_under_kills)
    });
}

// ------------------------------------------------------------ known bug

/// A client creates a VM under a request id, deletes it, then (a late
/// duplicate, or a client that lost the first reply) sends the create again
/// under the same id. The answer must be the first outcome, applied
/// (success, with or without the VM, or `applied` metadata), and nothing may
/// be re-created.
async fn retry_after_delete(mut c: SimCluster) -> Trace {
    c.wait_ready(READY_TIMEOUT).await;
    let nodes = c.ids();
    for k in 0..3 {
        let name = format!("vm-{k}");
        let create = Write::Create { name: name.clone(), spec: small_spec() };
        let told = c.write_id(pick(&nodes), create.clone(), &format!("{name}-create"), WRITE_TIMEOUT).await;
        assert!(matches!(told, Told::Applied(Some(_))), "create {name}: {}", told.label());
        let told = c
            .write_id(
                pick(&nodes),
                Write::Delete { name: name.clone() },
                &format!("{name}-delete"),
                WRITE_TIMEOUT,
            )
            .await;
        assert!(matches!(told, Told::Applied(_)), "delete {name}: {}", told.label());
        let told = c.write_id(pick(&nodes), create, &format!("{name}-create"), WRITE_TIMEOUT).await;
        let detail = match &told {
            Told::Applied(_) => String::new(),
            Told::Rejected(s) | Told::Unknown(s) | Told::Unlabelled(s) => {
                format!(
                    " ({:?}: {}; outcome metadata {:?})",
                    s.code(),
                    s.message(),
                    s.metadata().get("blixard-outcome")
                )
            }
        };
        assert!(
            matches!(told, Told::Applied(_)),
            "create {name} retried under its request id after the VM was deleted: expected its first outcome \
             (applied), got {}{detail}",
            told.label()
        );
        c.wait_converged(CONVERGE_TIMEOUT).await;
        for id in c.ids() {
            assert!(
                !vms_by_name(&c, id).await.contains_key(&name),
                "the retried create re-created {name} on n{id}"
            );
        }
    }
    c.check_final_state(&Model::default(), CONVERGE_TIMEOUT).await;
    c.trace
}

#[test]
fn retried_create_of_a_deleted_vm_says_applied() {
    init_logging();
    run_seeds("retried_create_of_a_deleted_vm_says_applied", 5, |seed| {
        simulate(seed, SimConfig { vm_backends: false, ..SimConfig::default() }, retry_after_delete)
    });
}
