//! Placement throughput on a 1,000-node cluster filling to 100,000 VMs, on
//! one core, for each strategy and two request mixes:
//!
//! - `plain`: resources only;
//! - `mix`: a quarter each of plain, constrained (`zone=Z`), anti-affinity
//!   groups of 10, and groups of 10 spread by zone (with anti-affinity).
//!
//! Measured two ways:
//! - `pure`: `Scheduler::place` plus the index upkeep a placement needs
//!   (`set_free`, `count_vm`), nothing else;
//! - `apply`: the same creates through `ClusterState::apply` as `CreateVms`
//!   commands of one VM, as the API sends them (validation, quota check,
//!   placement, the VM table, the node record, usage, the output).
//!
//! Nodes: 64 vCPUs with CPU overcommit 8 (512 allocatable), 256 GiB, 2 TB,
//! labels in 3 zones. VMs: 1-4 vCPUs, 256-4096 MiB, 1-20 GiB (a fixed
//! pseudo-random sequence). Three runs each; the median is printed.
//!
//!   cargo bench -p blixard-core --bench scheduler
use std::hint::black_box;
use std::time::Instant;

use blixard_core::command::{Command, NewVm, Proposal};
use blixard_core::scheduler::{Request, Scheduler};
use blixard_core::state::ClusterState;
use blixard_core::types::{
    Constraint, DesiredState, NodeResources, ObservedState, Placement, Ratio, Resources, Strategy, VmRecord,
    VmSpec,
};

const NODES: u64 = 1_000;
const VMS: u64 = 100_000;
const RUNS: usize = 3;
const ZONES: [&str; 3] = ["a", "b", "c"];

fn node_resources() -> NodeResources {
    NodeResources {
        capacity: Resources::new(64, 256 * 1024, 2_000),
        reserved: Resources::ZERO,
        cpu_overcommit: Ratio(8_000),
        memory_overcommit: Ratio::ONE,
    }
}

fn zone_of(node: u64) -> String {
    ZONES[(node % 3) as usize].to_string()
}

/// The VMs to place (xorshift, the same every run); `mix` adds rules.
fn vms(mix: bool) -> Vec<VmRecord> {
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    (0..VMS)
        .map(|i| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let spec = VmSpec {
                vcpus: 1 + (x % 4) as u32,
                memory_mb: [256, 512, 1024, 2048, 4096][(x >> 8) as usize % 5],
                disk_gb: 1 + (x >> 16) % 20,
                ..Default::default()
            };
            let mut placement = Placement::default();
            if mix {
                match i % 4 {
                    0 => {}
                    1 => placement.constraints.push(Constraint {
                        key: "zone".into(),
                        equal: true,
                        value: ZONES[(i / 4 % 3) as usize].into(),
                    }),
                    2 => placement.anti_affinity = format!("aa-{}", i / 40),
                    _ => {
                        placement.anti_affinity = format!("sp-{}", i / 40);
                        placement.spread_by = "zone".into();
                    }
                }
            }
            VmRecord {
                name: format!("vm-{i}").into(),
                spec,
                node_id: 0,
                desired: DesiredState::Running,
                observed: ObservedState::Pending,
                created_at_ms: 0,
                updated_at_ms: 0,
                revision: 0,
                generation: 0,
                runtime: Default::default(),
                placement,
                queued_at: 0,
                preempted_by: String::new(),
                leaving: 0,
                reschedule: Default::default(),
                history: Vec::new(),
                moving: None,
                placement_gen: 0,
                ip: None,
                publish: Vec::new(),
            }
        })
        .collect()
}

fn pure(strategy: Strategy, vms: &mut [VmRecord]) -> f64 {
    let allocatable = node_resources().allocatable();
    let mut sched = Scheduler::new(strategy);
    let mut free = vec![allocatable; NODES as usize + 1];
    for id in 1..=NODES {
        let labels = [("zone".to_string(), zone_of(id))].into_iter().collect();
        sched.set_node(id, Some((allocatable, &labels, true)));
    }
    let start = Instant::now();
    for vm in vms.iter_mut() {
        let id = sched.place(&Request::of(vm)).expect("fits");
        let f = &mut free[id as usize];
        *f = f.saturating_sub(&vm.spec.resources());
        sched.set_free(id, *f);
        vm.node_id = id;
        sched.count_vm(vm, true);
        black_box(id);
    }
    let rate = vms.len() as f64 / start.elapsed().as_secs_f64();
    for vm in vms.iter_mut() {
        vm.node_id = 0;
    }
    rate
}

fn p(command: Command) -> Proposal {
    Proposal { at_ms: 1_700_000_000_000, request: None, command }
}

fn apply(strategy: Strategy, vms: &[VmRecord]) -> f64 {
    let s = ClusterState::new();
    let mut index = 1;
    for id in 1..=NODES {
        let cmd = Command::RegisterNode {
            id,
            addr: format!("10.0.{}.{}:7000", id / 256, id % 256),
            resources: node_resources(),
            labels: [("zone".to_string(), zone_of(id))].into_iter().collect(),
        };
        s.apply(&p(cmd), index).expect("register");
        index += 1;
    }
    s.apply(&p(Command::SetScheduler { strategy }), index).expect("strategy");
    let creates: Vec<Proposal> = vms
        .iter()
        .map(|v| {
            let vm = NewVm {
                name: v.name.to_string(),
                spec: v.spec.clone(),
                placement: v.placement.clone(),
                reschedule: v.reschedule,
                publish: Vec::new(),
            };
            p(Command::CreateVms { vms: vec![vm], start: true, queue: false })
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
    println!("{NODES} nodes, {VMS} VMs placed one by one, median of {RUNS} runs, one core");
    println!("{:<10} {:<6} {:>20} {:>20}", "strategy", "mix", "pure placements/s", "apply creates/s");
    for mix in [false, true] {
        let mut vms = vms(mix);
        for strategy in [Strategy::Spread, Strategy::Binpack] {
            let p = median((0..RUNS).map(|_| pure(strategy, &mut vms)).collect());
            let a = median((0..RUNS).map(|_| apply(strategy, &vms)).collect());
            let m = if mix { "mix" } else { "plain" };
            println!("{:<10} {:<6} {:>20.0} {:>20.0}", strategy.as_str(), m, p, a);
        }
    }
}
