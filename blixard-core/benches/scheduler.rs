//! Placement throughput on a 1,000-node cluster filling to 100,000 VMs, on
//! one core, for each strategy:
//!
//! - `pure`: `scheduler::place` plus the index upkeep a placement needs
//!   (the free map and the ordered free-memory index), nothing else;
//! - `apply`: the same creates through `ClusterState::apply` (validation,
//!   quota check, placement, the VM table, the node record, the output).
//!
//! Nodes: 64 vCPUs with CPU overcommit 4 (256 allocatable), 256 GiB, 2 TB,
//! labels in 3 zones. VMs: 1-4 vCPUs, 256-4096 MiB, 1-20 GiB (a fixed
//! pseudo-random sequence). Only "plain" VMs: constraints, anti-affinity and
//! spread-by-label do not exist yet. Three runs each; the median is printed.
//!
//!   cargo bench -p blixard-core --bench scheduler
use std::cmp::Reverse;
use std::collections::HashMap;
use std::hint::black_box;
use std::time::Instant;

use blixard_core::command::{Command, Proposal};
use blixard_core::scheduler::{self, FreeIndex};
use blixard_core::state::ClusterState;
use blixard_core::types::{NodeId, NodeResources, Ratio, Resources, Strategy, VmSpec};

const NODES: u64 = 1_000;
const VMS: u64 = 100_000;
const RUNS: usize = 3;

fn node_resources() -> NodeResources {
    NodeResources {
        capacity: Resources::new(64, 256 * 1024, 2_000),
        reserved: Resources::ZERO,
        cpu_overcommit: Ratio(4_000),
        memory_overcommit: Ratio::ONE,
    }
}

/// The i-th VM's resources (xorshift, the same every run).
fn vms() -> Vec<Resources> {
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    (0..VMS)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            Resources::new(
                1 + (x % 4) as u32,
                [256, 512, 1024, 2048, 4096][(x >> 8) as usize % 5],
                1 + (x >> 16) % 20,
            )
        })
        .collect()
}

fn pure(strategy: Strategy, vms: &[Resources]) -> f64 {
    let allocatable = node_resources().allocatable();
    let mut free: HashMap<NodeId, Resources> = (1..=NODES).map(|id| (id, allocatable)).collect();
    let mut index: FreeIndex = (1..=NODES).map(|id| (Reverse(allocatable.memory_mb), id)).collect();
    let start = Instant::now();
    for need in vms {
        let id = scheduler::place(&index, need, strategy, |id| free.get(&id).copied()).expect("fits");
        let f = free.get_mut(&id).expect("a node");
        index.remove(&(Reverse(f.memory_mb), id));
        *f = f.saturating_sub(need);
        index.insert((Reverse(f.memory_mb), id));
        black_box(id);
    }
    vms.len() as f64 / start.elapsed().as_secs_f64()
}

fn p(command: Command) -> Proposal {
    Proposal { at_ms: 1_700_000_000_000, request: None, command }
}

fn apply(strategy: Strategy, vms: &[Resources]) -> f64 {
    let s = ClusterState::new();
    let mut index = 1;
    for id in 1..=NODES {
        let zone = ["a", "b", "c"][(id % 3) as usize].to_string();
        let cmd = Command::RegisterNode {
            id,
            addr: format!("10.0.{}.{}:7000", id / 256, id % 256),
            resources: node_resources(),
            labels: [("zone".to_string(), zone)].into_iter().collect(),
        };
        s.apply(&p(cmd), index).expect("register");
        index += 1;
    }
    s.apply(&p(Command::SetScheduler { strategy }), index).expect("strategy");
    let creates: Vec<Proposal> = vms
        .iter()
        .enumerate()
        .map(|(i, r)| {
            p(Command::CreateVm {
                name: format!("vm-{i}"),
                spec: VmSpec {
                    vcpus: r.vcpus,
                    memory_mb: r.memory_mb,
                    disk_gb: r.disk_gb,
                    ..Default::default()
                },
                start: true,
            })
        })
        .collect();
    let start = Instant::now();
    for (i, c) in creates.iter().enumerate() {
        black_box(s.apply(c, index + 1 + i as u64).expect("placed"));
    }
    let rate = creates.len() as f64 / start.elapsed().as_secs_f64();
    s.check_invariants().expect("invariants");
    rate
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() {
    let vms = vms();
    println!("{NODES} nodes, {VMS} VMs placed one by one, median of {RUNS} runs, one core");
    println!("{:<10} {:>22} {:>22}", "strategy", "pure placements/s", "apply creates/s");
    for strategy in [Strategy::Spread, Strategy::Binpack] {
        let p = median((0..RUNS).map(|_| pure(strategy, &vms)).collect());
        let a = median((0..RUNS).map(|_| apply(strategy, &vms)).collect());
        println!("{:<10} {:>22.0} {:>22.0}", strategy.as_str(), p, a);
    }
}
