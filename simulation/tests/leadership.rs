//! Leadership under partitions, pauses and leader kills (issue 13): pre-vote
//! and stickiness keep a leader that kept its quorum; a killed leader is
//! replaced quickly; a follower cut off past the leader's purged log catches
//! up by snapshot.
//!
//! Run with
//! `RUSTFLAGS="--cfg madsim" CARGO_TARGET_DIR=target/madsim cargo test -p blixard-simulation --release --test leadership`.
#![cfg(madsim)]

mod common;

use std::time::Duration;

use blixard_core::types::NodeId;
use blixard_simulation::cluster::{write_until_definite, SimCluster, SimConfig, Write};
use blixard_simulation::model::{Model, Outcome, Told, Trace};
use blixard_simulation::seeds::{run_seeds, simulate, summarize, SeedReport};
use common::*;
use madsim::rand::Rng;

/// A healed node must have caught up within this much virtual time.
const CATCH_UP_BOUND: Duration = Duration::from_secs(5);
/// After a leader dies, some survivor must acknowledge a write within this.
const FAILOVER_BOUND: Duration = Duration::from_secs(3);

fn no_vms(nodes: u64) -> SimConfig {
    // Leadership is what is under test: no reconcilers, whose status
    // reports would only add writes.
    SimConfig { nodes, vm_backends: false, ..SimConfig::default() }
}

fn print_figures(test: &str, reports: &[(u64, SeedReport)], names: &[&str]) {
    for name in names {
        if let Some(line) = summarize(name, reports) {
            eprintln!("{test}: {line}");
        }
    }
}

/// Asserts that nobody but `leader` led and no term passed `term` while the
/// watch ran.
fn assert_same_leader(
    c: &SimCluster,
    watch: &blixard_simulation::cluster::RoleWatch,
    leader: NodeId,
    term: u64,
) {
    let leaders = watch.leaders();
    assert!(
        leaders == vec![(leader, term)] && watch.max_term() == term,
        "the leader kept its quorum, yet leadership changed: leaders seen {leaders:?}, max term {} \
         (was n{leader} at term {term})\n{}\n{}",
        watch.max_term(),
        watch.describe(),
        c.trace.events().join("\n")
    );
}

// ------------------------------------------------------------ A: follower faults

#[derive(Clone, Copy, Debug)]
enum FollowerFault {
    /// Cut off from the other nodes (the client still reaches it, or, half
    /// the time, not even the client).
    Partition,
    /// Every task frozen.
    Pause,
}

/// A follower is partitioned away (or paused) for 2-30 s of virtual time
/// while the leader keeps taking writes with the remaining quorum, then
/// healed. Nothing may change leadership: same leader, same term, no term
/// raised by anyone (pre-vote refuses the cut-off node, stickiness keeps
/// the others from granting it). The healed node catches up within
/// `CATCH_UP_BOUND` and takes writes itself. Half the partitions also send a
/// write through the cut-off follower: whatever it was told must be true.
async fn follower_fault(mut c: SimCluster, fault: FollowerFault) -> Trace {
    let mut model = Model::default();
    let mut next = 0;
    c.wait_ready(READY_TIMEOUT).await;
    let all = c.ids();
    create_acked(&mut c, &mut model, &mut next, &all, 5).await;
    c.wait_converged(CONVERGE_TIMEOUT).await;
    let (leader, term) = c.leader_view().expect("a leader");
    let followers: Vec<NodeId> = c.ids().into_iter().filter(|&id| id != leader).collect();
    let victim = pick(&followers);
    let healthy: Vec<NodeId> = c.ids().into_iter().filter(|&id| id != victim).collect();
    let watch = c.watch_roles();
    let length = millis(2_000, 30_000);
    c.trace
        .push(format_args!("leader n{leader} term {term}; {fault:?} n{victim} for {}ms", length.as_millis()));

    let mut cut_off_write = None;
    match fault {
        FollowerFault::Partition if madsim::rand::thread_rng().gen_bool(0.5) => c.isolate(victim),
        FollowerFault::Partition => {
            c.partition(&[vec![victim], healthy.clone()]);
            if madsim::rand::thread_rng().gen_bool(0.5) {
                // Through the cut-off follower: it cannot reach the leader.
                let write = Write::Create { name: "cut-off".into(), spec: small_spec() };
                let call = c.client().spawn(blixard_simulation::cluster::write_call(
                    victim,
                    write.clone(),
                    "cut-off-1".into(),
                    WRITE_TIMEOUT,
                ));
                cut_off_write = Some((write, call));
            }
        }
        FollowerFault::Pause => c.pause(victim),
    }
    let end = madsim::time::Instant::now() + length;
    while madsim::time::Instant::now() < end {
        create_acked(&mut c, &mut model, &mut next, &healthy, 1).await;
        let left = end.saturating_duration_since(madsim::time::Instant::now());
        madsim::time::sleep(millis(100, 2_000).min(left)).await;
    }
    c.heal();
    let target = c.raft_view(leader).expect("leader runs").last_log;
    let took = c.wait_applied(victim, target, CATCH_UP_BOUND).await.unwrap_or_else(|e| {
        panic!("healed n{victim} did not catch up within {CATCH_UP_BOUND:?}: {e}\n{}", watch.describe())
    });
    c.trace.figure("catch_up_ms", took.as_millis() as f64);

    if let Some((write, call)) = cut_off_write {
        let told = Told::from_reply(call.await.expect("client task"));
        c.trace.push(format_args!("create cut-off via cut-off n{victim} -> {}", told.label()));
        resolve_create(&mut c, &mut model, "cut-off", "cut-off-1", write, told).await;
    }
    // The healed node takes writes at once.
    create_acked(&mut c, &mut model, &mut next, &[victim], 2).await;
    madsim::time::sleep(Duration::from_secs(2)).await;
    assert_same_leader(&c, &watch, leader, term);
    drop(watch);
    c.check_final_state(&model, CONVERGE_TIMEOUT).await;
    c.trace
}

/// Settles a create whose first answer was `told`: a definite answer must
/// match the state; an unknown one is retried under the same request id
/// until definite, and that answer must match the state. Records the VM in
/// `model`.
async fn resolve_create(
    c: &mut SimCluster,
    model: &mut Model,
    name: &str,
    id: &str,
    write: Write,
    told: Told,
) {
    let told = match told {
        Told::Unknown(_) => {
            let (again, tries) = c
                .client()
                .spawn(write_until_definite(
                    c.ids(),
                    write,
                    id.into(),
                    WRITE_TIMEOUT,
                    Duration::from_secs(60),
                ))
                .await
                .expect("client task");
            c.trace.push(format_args!("retry create {name} [{id}] -> {} after {tries} tries", again.label()));
            again
        }
        told => told,
    };
    c.wait_converged(CONVERGE_TIMEOUT).await;
    let leader = c.leader_view().expect("a leader").0;
    let exists = c.list_vms_stale(leader).await.expect("list").iter().any(|v| v.name == name);
    match told {
        Told::Applied(vm) => {
            assert!(exists, "create {name} [{id}] was told applied but the VM does not exist");
            // `applied` metadata comes without the VM: take it from the list.
            let vm = match vm {
                Some(vm) => *vm,
                None => c
                    .list_vms_stale(leader)
                    .await
                    .expect("list")
                    .into_iter()
                    .find(|v| v.name == name)
                    .unwrap(),
            };
            model.record_create(name, &Outcome::Acked(vm));
        }
        Told::Rejected(s) => {
            assert!(!exists, "create {name} [{id}] was told rejected ({:?}) but the VM exists", s.code());
            assert_eq!(
                s.code(),
                tonic::Code::Unavailable,
                "a fresh create can only be refused for want of a leader"
            );
        }
        other => panic!("create {name} [{id}]: no definite answer after retrying: {}", other.label()),
    }
}

#[test]
fn partitioned_follower_does_not_disturb_the_leader() {
    init_logging();
    let reports = run_seeds("partitioned_follower_does_not_disturb_the_leader", 100, |seed| {
        simulate(seed, no_vms(3), |c| follower_fault(c, FollowerFault::Partition))
    });
    print_figures("partitioned_follower_does_not_disturb_the_leader", &reports, &["catch_up_ms"]);
}

#[test]
fn paused_follower_does_not_disturb_the_leader() {
    init_logging();
    let reports = run_seeds("paused_follower_does_not_disturb_the_leader", 100, |seed| {
        simulate(seed, no_vms(3), |c| follower_fault(c, FollowerFault::Pause))
    });
    print_figures("paused_follower_does_not_disturb_the_leader", &reports, &["catch_up_ms"]);
}

/// A 5-node cluster split 2|3 for 2-30 s, then healed. If the leader is on
/// the majority side (half the seeds), nothing may change: same leader,
/// same term, writes keep being acknowledged. If it is on the minority side,
/// the majority elects a leader among itself and takes writes; a write sent
/// meanwhile through the stranded old leader must not be acknowledged, and
/// whatever it was told must be true. In both cases the healed side catches
/// up and the heal itself changes no leader and no term.
async fn split_two_three(mut c: SimCluster) -> Trace {
    let mut model = Model::default();
    let mut next = 0;
    c.wait_ready(READY_TIMEOUT).await;
    let all = c.ids();
    create_acked(&mut c, &mut model, &mut next, &all, 5).await;
    c.wait_converged(CONVERGE_TIMEOUT).await;
    let (leader, term) = c.leader_view().expect("a leader");
    let mut others: Vec<NodeId> = c.ids().into_iter().filter(|&id| id != leader).collect();
    // Shuffle the followers with the seeded RNG.
    for i in (1..others.len()).rev() {
        let j = madsim::rand::thread_rng().gen_range(0..=i);
        others.swap(i, j);
    }
    let leader_in_majority = madsim::rand::thread_rng().gen_bool(0.5);
    let (majority, minority): (Vec<NodeId>, Vec<NodeId>) = if leader_in_majority {
        (vec![leader, others[0], others[1]], vec![others[2], others[3]])
    } else {
        (others[..3].to_vec(), vec![leader, others[3]])
    };
    let length = millis(2_000, 30_000);
    let watch = c.watch_roles();
    c.trace.push(format_args!(
        "leader n{leader} term {term}; split {majority:?} | {minority:?} for {}ms",
        length.as_millis()
    ));
    c.partition(&[majority.clone(), minority.clone()]);

    let stranded = (!leader_in_majority).then(|| {
        let write = Write::Create { name: "stranded".into(), spec: small_spec() };
        let call = c.client().spawn(async move {
            let r =
                blixard_simulation::cluster::write_call(leader, write, "stranded-1".into(), WRITE_TIMEOUT)
                    .await;
            (r, madsim::time::Instant::now())
        });
        (Write::Create { name: "stranded".into(), spec: small_spec() }, call)
    });

    let end = madsim::time::Instant::now() + length;
    while madsim::time::Instant::now() < end {
        if leader_in_majority {
            create_acked(&mut c, &mut model, &mut next, &majority, 1).await;
        } else {
            // Until the majority has elected a leader, writes there may
            // fail: retry each under its id until definite.
            next += 1;
            let name = format!("vm-{next:04}");
            let id = format!("{name}-create");
            let write = Write::Create { name: name.clone(), spec: small_spec() };
            let (told, tries) = c
                .client()
                .spawn(write_until_definite(
                    majority.clone(),
                    write.clone(),
                    id.clone(),
                    WRITE_TIMEOUT,
                    length,
                ))
                .await
                .expect("client task");
            c.trace.push(format_args!(
                "create {name} [{id}] via majority -> {} after {tries} tries",
                told.label()
            ));
            match told {
                Told::Applied(Some(vm)) => model.record_create(&name, &Outcome::Acked(*vm)),
                // Applied, but shown nowhere yet: settled (with its VM) below.
                Told::Applied(None) => {
                    model.uncertain.insert(name.clone());
                }
                Told::Rejected(s) if s.code() == tonic::Code::Unavailable => {}
                other if madsim::time::Instant::now() >= end => {
                    // The partition ended while it was in flight: settle later.
                    model.uncertain.insert(name.clone());
                    c.trace.push(format_args!("{name} left uncertain: {}", other.label()));
                }
                other => panic!("create {name} through the majority: {}", other.label()),
            }
        }
        let left = end.saturating_duration_since(madsim::time::Instant::now());
        madsim::time::sleep(millis(100, 2_000).min(left)).await;
    }
    let at_heal = c.leader_view().expect("a leader at heal");
    let term_at_heal = watch.max_term();
    if leader_in_majority {
        assert_same_leader(&c, &watch, leader, term);
    } else {
        let (new_leader, new_term) =
            watch.new_leader_at(leader, term).map(|(_, id, t)| (id, t)).unwrap_or_else(|| {
                panic!("the majority {majority:?} elected no leader in {length:?}\n{}", watch.describe())
            });
        assert!(majority.contains(&new_leader), "n{new_leader} of the minority became leader");
        let minority_leaders: Vec<_> =
            watch.leaders().into_iter().filter(|(id, t)| minority.contains(id) && *t > term).collect();
        assert!(minority_leaders.is_empty(), "the minority elected a leader: {minority_leaders:?}");
        c.trace.push(format_args!("majority elected n{new_leader} at term {new_term}"));
    }
    let mark = watch.changes().len();
    c.heal();
    let healed_at = madsim::time::Instant::now();
    // Everyone catches up with the leader of the majority.
    let target = c.raft_view(at_heal.0).expect("leader runs").last_log;
    let mut slowest = Duration::ZERO;
    for id in minority.iter().copied() {
        let took = c.wait_applied(id, target, CATCH_UP_BOUND).await.unwrap_or_else(|e| {
            panic!("healed n{id} did not catch up within {CATCH_UP_BOUND:?}: {e}\n{}", watch.describe())
        });
        slowest = slowest.max(took);
    }
    c.trace.figure("catch_up_ms", slowest.as_millis() as f64);
    if let Some((write, call)) = stranded {
        let (reply, at) = call.await.expect("client task");
        let told = Told::from_reply(reply);
        c.trace.push(format_args!("create stranded via stranded old leader n{leader} -> {}", told.label()));
        // The node keeps retrying for 10 s, re-routing to whoever leads: once
        // healed, the new leader may rightly apply it. Before, nobody can.
        assert!(
            !matches!(told, Told::Applied(_)) || at > healed_at,
            "a write through the stranded old leader n{leader} was acknowledged during the split, without a quorum"
        );
        resolve_create(&mut c, &mut model, "stranded", "stranded-1", write, told).await;
    }
    madsim::time::sleep(Duration::from_secs(2)).await;
    // The heal deposed nobody (the stranded old leader stepping down to
    // follow the newer term is not a new leader).
    let after: Vec<_> = watch.changes()[mark..]
        .iter()
        .filter(|ch| ch.state == Some("leader") || ch.term > term_at_heal)
        .cloned()
        .collect();
    assert!(
        after.is_empty() && c.leader_view() == Some(at_heal),
        "healing the split changed leadership (leader at heal n{} term {}): {after:?}\n{}",
        at_heal.0,
        at_heal.1,
        watch.describe()
    );
    drop(watch);
    // Settle writes left uncertain by the end of the split (or applied
    // without showing the VM).
    let uncertain: Vec<String> = model.uncertain.iter().cloned().collect();
    for name in uncertain {
        let id = format!("{name}-create");
        let write = Write::Create { name: name.clone(), spec: small_spec() };
        model.uncertain.remove(&name);
        let told = Told::Unknown(tonic::Status::deadline_exceeded("left open"));
        resolve_create(&mut c, &mut model, &name, &id, write, told).await;
    }
    c.check_final_state(&model, CONVERGE_TIMEOUT).await;
    c.trace
}

#[test]
fn minority_split_does_not_disturb_the_leader() {
    init_logging();
    let reports = run_seeds("minority_split_does_not_disturb_the_leader", 100, |seed| {
        simulate(seed, no_vms(5), split_two_three)
    });
    print_figures("minority_split_does_not_disturb_the_leader", &reports, &["catch_up_ms"]);
}

// ------------------------------------------------------------ B: leader kill

/// The leader is killed at a random moment; one write per survivor is sent
/// at that instant. A new leader (higher term) must be elected and one of
/// those writes acknowledged within `FAILOVER_BOUND`. Records the time to
/// the new leader (`failover_elect_ms`, from the role watch) and to the
/// first acknowledged write (`failover_write_ms`) per seed. The old leader
/// then restarts and everything converges.
async fn leader_failover(mut c: SimCluster) -> Trace {
    let mut model = Model::default();
    let mut next = 0;
    c.wait_ready(READY_TIMEOUT).await;
    let all = c.ids();
    create_acked(&mut c, &mut model, &mut next, &all, 5).await;
    c.wait_converged(CONVERGE_TIMEOUT).await;
    let (leader, term) = c.leader_view().expect("a leader");
    // Anywhere in the heartbeat cycle and the survivors' jitter.
    madsim::time::sleep(millis(0, 1_000)).await;
    let watch = c.watch_roles();
    c.kill(leader);
    let killed_at = madsim::time::Instant::now();
    let survivors = c.up_nodes();
    let probes: Vec<_> = survivors
        .iter()
        .map(|&via| {
            next += 1;
            let name = format!("vm-{next:04}");
            let write = Write::Create { name: name.clone(), spec: small_spec() };
            let call = c.client().spawn(async move {
                let told = Told::from_reply(
                    blixard_simulation::cluster::write_call(
                        via,
                        write,
                        format!("{name}-create"),
                        WRITE_TIMEOUT,
                    )
                    .await,
                );
                (name, via, told, madsim::time::Instant::now())
            });
            call
        })
        .collect();
    let mut first_ack: Option<Duration> = None;
    for probe in probes {
        let (name, via, told, at) = probe.await.expect("client task");
        let after = at.duration_since(killed_at);
        c.trace.push(format_args!(
            "probe {name} via n{via} -> {} after {}ms",
            told.label(),
            after.as_millis()
        ));
        match told {
            Told::Applied(Some(vm)) => {
                model.record_create(&name, &Outcome::Acked(*vm));
                first_ack = Some(first_ack.map_or(after, |f| f.min(after)));
            }
            // Settled by the final check: must exist or not, either is fine.
            _ => {
                model.uncertain.insert(name);
            }
        }
    }
    let (elected, new_leader, new_term) = watch
        .new_leader_at(leader, term)
        .unwrap_or_else(|| panic!("no new leader after killing n{leader}\n{}", watch.describe()));
    // The watch started just before the kill: its clock is the kill's.
    c.trace.figure("failover_elect_ms", elected.as_millis() as f64);
    let first_ack = first_ack
        .unwrap_or_else(|| panic!("no write acknowledged after killing n{leader}\n{}", watch.describe()));
    c.trace.figure("failover_write_ms", first_ack.as_millis() as f64);
    c.trace.push(format_args!("n{new_leader} leads at term {new_term}"));
    assert!(
        first_ack < FAILOVER_BOUND,
        "the first write after killing leader n{leader} was acknowledged only after {first_ack:?}\n{}",
        watch.describe()
    );
    drop(watch);
    create_acked(&mut c, &mut model, &mut next, &survivors, 3).await;
    c.restart(leader).await;
    c.check_final_state(&model, CONVERGE_TIMEOUT).await;
    c.trace
}

#[test]
fn leader_kill_fails_over_quickly() {
    init_logging();
    let reports =
        run_seeds("leader_kill_fails_over_quickly", 200, |seed| simulate(seed, no_vms(3), leader_failover));
    print_figures("leader_kill_fails_over_quickly", &reports, &["failover_elect_ms", "failover_write_ms"]);
}

// ------------------------------------------------------------ E: snapshot catch-up

/// A follower is cut off (partitioned or paused) for 5-30 s while the
/// leader writes far enough to purge its log past the follower's last
/// entry (`sim_tuning`: snapshot every 50 entries, 10 kept). Healed, the
/// follower must catch up by installing a snapshot within
/// `CATCH_UP_BOUND` (no stalls of failed AppendEntries), without any change
/// of leadership, and then take writes itself.
async fn snapshot_catch_up(mut c: SimCluster) -> Trace {
    let mut model = Model::default();
    let mut next = 0;
    c.wait_ready(READY_TIMEOUT).await;
    let all = c.ids();
    create_acked(&mut c, &mut model, &mut next, &all, 5).await;
    c.wait_converged(CONVERGE_TIMEOUT).await;
    let (leader, term) = c.leader_view().expect("a leader");
    let followers: Vec<NodeId> = c.ids().into_iter().filter(|&id| id != leader).collect();
    let victim = pick(&followers);
    let healthy: Vec<NodeId> = c.ids().into_iter().filter(|&id| id != victim).collect();
    let pause = madsim::rand::thread_rng().gen_bool(0.5);
    let length = millis(5_000, 30_000);
    let watch = c.watch_roles();
    c.trace.push(format_args!(
        "leader n{leader} term {term}; {} n{victim} for {}ms",
        if pause { "pause" } else { "partition" },
        length.as_millis()
    ));
    if pause {
        c.pause(victim);
    } else {
        c.partition(&[vec![victim], healthy.clone()]);
    }
    let behind = c.raft_view(victim).expect("victim runs").last_log;
    let end = madsim::time::Instant::now() + length;
    let mut writes = 0;
    loop {
        let purged = c.raft_view(leader).expect("leader runs").purged;
        let now = madsim::time::Instant::now();
        if purged > behind && now >= end {
            break;
        }
        assert!(
            writes < 1_000,
            "the leader did not purge past {behind} after {writes} writes (purged {purged})"
        );
        create_acked(&mut c, &mut model, &mut next, &healthy, 1).await;
        writes += 1;
        if purged > behind {
            madsim::time::sleep(millis(50, 1_000).min(end.saturating_duration_since(now))).await;
        }
    }
    let purged = c.raft_view(leader).expect("leader runs").purged;
    c.trace.push(format_args!("{writes} writes; n{victim} at {behind}, n{leader} purged to {purged}"));
    c.heal();
    let target = c.raft_view(leader).expect("leader runs").last_log;
    let took = c.wait_applied(victim, target, CATCH_UP_BOUND).await.unwrap_or_else(|e| {
        panic!(
            "healed n{victim} did not catch up by snapshot within {CATCH_UP_BOUND:?}: {e}\n{}",
            watch.describe()
        )
    });
    c.trace.figure("snapshot_catch_up_ms", took.as_millis() as f64);
    let snapshot = c.raft_view(victim).expect("victim runs").snapshot;
    assert!(snapshot > behind, "n{victim} caught up without installing a snapshot (snapshot at {snapshot})");
    // Writes through the node that just caught up.
    create_acked(&mut c, &mut model, &mut next, &[victim], 2).await;
    madsim::time::sleep(Duration::from_secs(2)).await;
    assert_same_leader(&c, &watch, leader, term);
    drop(watch);
    c.check_final_state(&model, CONVERGE_TIMEOUT).await;
    c.trace
}

#[test]
fn lagging_follower_catches_up_by_snapshot() {
    init_logging();
    let reports = run_seeds("lagging_follower_catches_up_by_snapshot", 100, |seed| {
        simulate(seed, no_vms(3), snapshot_catch_up)
    });
    print_figures("lagging_follower_catches_up_by_snapshot", &reports, &["snapshot_catch_up_ms"]);
}
