//! Apply throughput: `ClusterState::apply` on one core, nothing else.
//!
//! Proposals are generated outside the timed region; the timed loop is only
//! `apply` (validation, placement, index upkeep, the returned output and its
//! drop). 64 nodes with the largest capacity validation allows, so creates
//! never run out of room.
//!
//!   cargo bench -p blixard-core --bench apply
use std::collections::BTreeMap;
use std::hint::black_box;
use std::time::{Duration, Instant};

use blixard_core::command::{Command, Proposal, RequestId};
use blixard_core::state::ClusterState;
use blixard_core::types::{NodeResources, Resources, VmSpec};
use blixard_core::validate::{MAX_NODE_DISK_GB, MAX_NODE_MEMORY_MB, MAX_NODE_VCPUS};
use criterion::{criterion_group, criterion_main, Criterion, Throughput};

const NODES: u64 = 64;
/// Creates applied into one fresh state before it is replaced (the state
/// grows from 0 to this many VMs while measured).
const CHUNK: u64 = 100_000;
/// VMs already present when measuring create+delete pairs.
const BACKGROUND_VMS: u64 = 10_000;
/// Distinct names cycled through by the create+delete bench.
const RING: u64 = 4_096;

fn p(command: Command) -> Proposal {
    Proposal { at_ms: 1_700_000_000_000, request: None, command }
}

fn state_with_nodes() -> ClusterState {
    let s = ClusterState::new();
    for id in 1..=NODES {
        let cmd = Command::RegisterNode {
            id,
            addr: format!("10.0.{}.{}:7000", id / 256, id % 256),
            resources: NodeResources::plain(Resources::new(
                MAX_NODE_VCPUS,
                MAX_NODE_MEMORY_MB,
                MAX_NODE_DISK_GB,
            )),
            labels: BTreeMap::from([("rack".to_string(), format!("r{}", id % 8))]),
        };
        s.apply(&p(cmd), id).expect("register");
    }
    s
}

fn plain_spec() -> VmSpec {
    VmSpec { vcpus: 1, memory_mb: 256, disk_gb: 1, ..Default::default() }
}

/// A spec as the CLI would send it with a tenant and two labels.
fn labelled_spec() -> VmSpec {
    VmSpec {
        vcpus: 1,
        memory_mb: 256,
        disk_gb: 1,
        labels: BTreeMap::from([
            ("env".to_string(), "prod".to_string()),
            ("tier".to_string(), "web".to_string()),
        ]),
        tenant: "team-a".to_string(),
        ..Default::default()
    }
}

fn create(name: String, spec: &VmSpec) -> Proposal {
    p(Command::CreateVm { name, spec: spec.clone(), start: true })
}

fn vm_name(i: u64) -> String {
    format!("vm-{i:06}")
}

/// `iters` creates, in fresh states of at most CHUNK VMs each; only the
/// apply loop is timed. With `ids`, every proposal carries a request id, as
/// client writes through a node do (the dedup lookup and record are timed).
fn time_creates(iters: u64, spec: &VmSpec, ids: bool) -> Duration {
    let mut total = Duration::ZERO;
    let mut done = 0;
    while done < iters {
        let n = (iters - done).min(CHUNK);
        let state = state_with_nodes();
        let proposals: Vec<Proposal> = (0..n)
            .map(|i| {
                let mut p = create(vm_name(i), spec);
                if ids {
                    p.request = Some(RequestId { session: 7, seq: done + i });
                }
                p
            })
            .collect();
        let first_index = NODES + 1;
        let start = Instant::now();
        for (i, prop) in proposals.iter().enumerate() {
            black_box(state.apply(black_box(prop), first_index + i as u64)).expect("create");
        }
        total += start.elapsed();
        assert_eq!(state.vm_count() as u64, n);
        done += n;
        drop(proposals);
        drop(state);
    }
    total
}

fn bench_create(c: &mut Criterion) {
    let mut g = c.benchmark_group("apply");
    g.throughput(Throughput::Elements(1));
    g.measurement_time(Duration::from_secs(5));
    g.sample_size(30);
    let plain = plain_spec();
    g.bench_function("create_vm", |b| b.iter_custom(|iters| time_creates(iters, &plain, false)));
    g.bench_function("create_vm_with_request_id", |b| {
        b.iter_custom(|iters| time_creates(iters, &plain, true))
    });
    let labelled = labelled_spec();
    g.bench_function("create_vm_labelled", |b| b.iter_custom(|iters| time_creates(iters, &labelled, false)));

    // Create then delete the same VM (one iteration = the pair), against a
    // state that already holds BACKGROUND_VMS VMs; the state does not grow.
    g.bench_function("create_delete_pair", |b| {
        let spec = plain_spec();
        let state = state_with_nodes();
        let mut index = NODES + 1;
        for i in 0..BACKGROUND_VMS {
            state.apply(&create(vm_name(i), &spec), index).expect("background create");
            index += 1;
        }
        let creates: Vec<Proposal> = (0..RING).map(|i| create(format!("tmp-{i:05}"), &spec)).collect();
        let deletes: Vec<Proposal> =
            (0..RING).map(|i| p(Command::DeleteVm { name: format!("tmp-{i:05}") })).collect();
        b.iter_custom(|iters| {
            let start = Instant::now();
            for k in 0..iters {
                let slot = (k % RING) as usize;
                black_box(state.apply(black_box(&creates[slot]), index)).expect("create");
                black_box(state.apply(black_box(&deletes[slot]), index + 1)).expect("delete");
                index += 2;
            }
            start.elapsed()
        });
        assert_eq!(state.vm_count() as u64, BACKGROUND_VMS);
        state.check_invariants().expect("invariants after create/delete churn");
    });
    g.finish();
}

criterion_group!(benches, bench_create);
criterion_main!(benches);
