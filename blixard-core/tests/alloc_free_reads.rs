//! The closure read path of `ClusterState` must not allocate: a read is a
//! lock-free load of the published VM table, a lookup and the caller's
//! projection, nothing more.
//!
//! Counted per thread (a const thread-local), so allocations of other test
//! threads or of the harness cannot leak into the measurement.
use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::collections::BTreeMap;
use std::hint::black_box;

use blixard_core::command::{Command, Proposal};
use blixard_core::state::ClusterState;
use blixard_core::types::{NodeId, NodeResources, ObservedState, Resources, VmSpec};

struct Counting;

thread_local! {
    static BYTES: Cell<u64> = const { Cell::new(0) };
    static COUNT: Cell<u64> = const { Cell::new(0) };
}

fn note(size: usize) {
    // try_with: the thread-local may be gone while a thread is torn down.
    let _ = BYTES.try_with(|b| b.set(b.get() + size as u64));
    let _ = COUNT.try_with(|c| c.set(c.get() + 1));
}

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        note(layout.size());
        unsafe { System.alloc(layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        note(layout.size());
        unsafe { System.alloc_zeroed(layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        note(new_size);
        unsafe { System.realloc(ptr, layout, new_size) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

/// (allocations, bytes) made by this thread while running `f`.
fn allocated_by<R>(f: impl FnOnce() -> R) -> (u64, u64, R) {
    let (c0, b0) = (COUNT.with(Cell::get), BYTES.with(Cell::get));
    let r = f();
    let (c1, b1) = (COUNT.with(Cell::get), BYTES.with(Cell::get));
    (c1 - c0, b1 - b0, r)
}

const VMS: usize = 2_000;

fn populated() -> (ClusterState, Vec<String>) {
    let s = ClusterState::new();
    let mut index = 1;
    for id in 1..=4u64 {
        let cmd = Command::RegisterNode {
            id,
            addr: format!("127.0.0.1:{}", 7000 + id),
            resources: NodeResources::plain(Resources::new(4096, 1 << 24, 1 << 20)),
            labels: BTreeMap::from([("zone".to_string(), format!("z{id}"))]),
        };
        s.apply(&Proposal { at_ms: 1, request: None, command: cmd }, index).unwrap();
        index += 1;
    }
    let names: Vec<String> = (0..VMS).map(|i| format!("vm-{i:06}")).collect();
    for name in &names {
        // Labels and a tenant: a clone of these records would allocate.
        let spec = VmSpec {
            vcpus: 1,
            memory_mb: 128,
            disk_gb: 1,
            labels: BTreeMap::from([("env".to_string(), "prod".to_string())]),
            tenant: "team-a".to_string(),
            ..Default::default()
        };
        let cmd = Command::CreateVm { name: name.clone(), spec, start: true };
        s.apply(&Proposal { at_ms: 2, request: None, command: cmd }, index).unwrap();
        index += 1;
    }
    (s, names)
}

#[test]
fn closure_reads_allocate_nothing() {
    let (state, names) = populated();

    // The counter works: cloning a record out of the state does allocate.
    let (n, bytes, rec) = allocated_by(|| state.with_vm(&names[0], |v| v.clone()));
    assert!(rec.is_some());
    assert!(n > 0 && bytes > 0, "the counting allocator saw no allocation for a clone");

    // Warm up (the first load on a thread registers its thread-local slot).
    for name in &names {
        black_box(state.with_vm(name, |v| v.observed));
    }

    let rounds = 5;
    let (n, bytes, (found, running)) = allocated_by(|| {
        let mut found = 0u64;
        let mut running = 0u64;
        for _ in 0..rounds {
            for name in &names {
                match state.with_vm(black_box(name.as_str()), |v| (v.observed, v.node_id, v.spec.vcpus)) {
                    Some((ObservedState::Running, ..)) => running += 1,
                    Some(_) => found += 1,
                    None => {}
                }
            }
            // Misses must not allocate either.
            black_box(state.with_vm("vm-not-there", |v| v.observed));
        }
        (found, running)
    });
    let reads = (rounds * (names.len() + 1)) as u64;
    assert_eq!(found + running, (rounds * names.len()) as u64, "every VM must be found");
    assert_eq!(
        (n, bytes),
        (0, 0),
        "with_vm allocated {n} times ({bytes} bytes) over {reads} reads: {:.3} bytes per read",
        bytes as f64 / reads as f64
    );

    // The other closure accessors: node lookups and the per-node index walk.
    let (n, bytes, seen) = allocated_by(|| {
        let mut seen = 0u64;
        for id in 1..=4 as NodeId {
            seen += state.with_node(id, |node| node.allocated.vcpus as u64).unwrap_or(0);
            state.for_each_vm_on(id, |v| {
                black_box(v.spec.memory_mb);
            });
        }
        seen
    });
    assert_eq!(seen, VMS as u64, "allocated vCPUs must sum to the VM count");
    assert_eq!((n, bytes), (0, 0), "with_node/for_each_vm_on allocated {n} times ({bytes} bytes)");
}
