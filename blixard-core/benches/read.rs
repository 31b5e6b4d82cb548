//! Reading VM state: the closure accessors of `ClusterState` against the
//! anti-pattern they replaced, a `parking_lot::RwLock<HashMap<String, VmRecord>>`
//! whose reads clone the record out of the lock. 10k VMs, 1 and 2 threads.
//!
//!   cargo bench -p blixard-core --bench read
//!
//! Allocations per read are counted by a wrapper around the system allocator.
//! Counting is switched on only for a separate, untimed pass, so the shared
//! counter never adds cache-line traffic to the timed runs.
use std::alloc::{GlobalAlloc, Layout, System};
use std::collections::{BTreeMap, HashMap};
use std::hint::black_box;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::Barrier;
use std::time::{Duration, Instant};

use blixard_core::command::{Command, Proposal};
use blixard_core::state::ClusterState;
use blixard_core::types::{NodeResources, ObservedState, Resources, VmRecord, VmSpec};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use parking_lot::RwLock;

struct Counting;

static COUNTING: AtomicBool = AtomicBool::new(false);
static ALLOCS: AtomicU64 = AtomicU64::new(0);
static BYTES: AtomicU64 = AtomicU64::new(0);

impl Counting {
    #[inline]
    fn note(size: usize) {
        if COUNTING.load(Relaxed) {
            ALLOCS.fetch_add(1, Relaxed);
            BYTES.fetch_add(size as u64, Relaxed);
        }
    }
}

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        Self::note(layout.size());
        unsafe { System.alloc(layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        Self::note(layout.size());
        unsafe { System.alloc_zeroed(layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        Self::note(new_size);
        unsafe { System.realloc(ptr, layout, new_size) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

const VMS: usize = 10_000;
const NODES: u64 = 16;

/// Records as the API stores them: a tenant and two labels, so cloning one
/// costs what it costs in production.
fn spec() -> VmSpec {
    VmSpec {
        vcpus: 1,
        memory_mb: 256,
        disk_gb: 4,
        labels: BTreeMap::from([
            ("env".to_string(), "prod".to_string()),
            ("tier".to_string(), "web".to_string()),
        ]),
        tenant: "team-a".to_string(),
        ..Default::default()
    }
}

fn names() -> Vec<String> {
    (0..VMS).map(|i| format!("vm-{i:06}")).collect()
}

fn cluster_state(names: &[String]) -> ClusterState {
    let s = ClusterState::new();
    let mut index = 1;
    for id in 1..=NODES {
        let cmd = Command::RegisterNode {
            id,
            addr: format!("10.0.0.{id}:7000"),
            resources: NodeResources::plain(Resources::new(4096, 1 << 24, 1 << 20)),
            labels: BTreeMap::new(),
        };
        s.apply(&Proposal { at_ms: 1, request: None, command: cmd }, index).expect("register");
        index += 1;
    }
    for name in names {
        let cmd = Command::CreateVm { name: name.clone(), spec: spec(), start: true };
        s.apply(&Proposal { at_ms: 2, request: None, command: cmd }, index).expect("create");
        index += 1;
    }
    s
}

type Baseline = RwLock<HashMap<String, VmRecord>>;

fn baseline(state: &ClusterState) -> Baseline {
    let mut m = HashMap::with_capacity(VMS);
    state.for_each_vm(|v| {
        m.insert(v.name.to_string(), v.clone());
    });
    RwLock::new(m)
}

/// The read under test: one VM's observed state, by name.
#[inline]
fn closure_read(state: &ClusterState, name: &str) -> Option<ObservedState> {
    state.with_vm(name, |v| v.observed)
}

/// The anti-pattern: clone the record out of the lock, then look at it.
#[inline]
fn baseline_read(map: &Baseline, name: &str) -> Option<ObservedState> {
    let rec: Option<VmRecord> = map.read().get(name).cloned();
    black_box(rec).map(|r| r.observed)
}

/// Names visited by thread `t` in a scattered order (a stride co-prime with VMS).
#[inline]
fn pick(names: &[String], t: usize, k: u64) -> &str {
    &names[((k as usize).wrapping_mul(7919) + t * 5003) % names.len()]
}

/// Runs `iters` reads in total over `threads` threads; returns the wall time
/// of the slowest thread (all start together at a barrier).
fn run<F>(threads: usize, iters: u64, read: F) -> Duration
where
    F: Fn(usize, u64) -> Option<ObservedState> + Sync,
{
    let per = iters.div_ceil(threads as u64);
    let barrier = Barrier::new(threads);
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                let barrier = &barrier;
                let read = &read;
                s.spawn(move || {
                    barrier.wait();
                    let start = Instant::now();
                    for k in 0..per {
                        black_box(read(t, k));
                    }
                    start.elapsed()
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().expect("reader")).max().unwrap_or_default()
    })
}

/// Allocations and bytes per read over `n` single-threaded reads.
fn allocs_per_read(n: u64, read: impl Fn(u64) -> Option<ObservedState>) -> (f64, f64) {
    ALLOCS.store(0, Relaxed);
    BYTES.store(0, Relaxed);
    COUNTING.store(true, Relaxed);
    for k in 0..n {
        black_box(read(k));
    }
    COUNTING.store(false, Relaxed);
    (ALLOCS.load(Relaxed) as f64 / n as f64, BYTES.load(Relaxed) as f64 / n as f64)
}

fn bench_reads(c: &mut Criterion) {
    let names = names();
    let state = cluster_state(&names);
    let base = baseline(&state);
    assert!(names.iter().all(|n| closure_read(&state, n) == baseline_read(&base, n)));
    assert!(closure_read(&state, "vm-missing").is_none());

    const COUNT_READS: u64 = 100_000;
    let (ca, cb) = allocs_per_read(COUNT_READS, |k| closure_read(&state, pick(&names, 0, k)));
    let (ba, bb) = allocs_per_read(COUNT_READS, |k| baseline_read(&base, pick(&names, 0, k)));
    println!("allocations per read ({COUNT_READS} reads, {VMS} VMs):");
    println!("  closure  with_vm(name, |v| v.observed):      {ca:.3} allocs, {cb:.1} bytes");
    println!("  baseline RwLock<HashMap>.get(name).cloned(): {ba:.3} allocs, {bb:.1} bytes");

    let mut g = c.benchmark_group("read_vm");
    g.throughput(Throughput::Elements(1));
    g.measurement_time(Duration::from_secs(5));
    g.sample_size(30);
    for threads in [1usize, 2] {
        g.bench_with_input(BenchmarkId::new("closure", threads), &threads, |b, &threads| {
            b.iter_custom(|iters| run(threads, iters, |t, k| closure_read(&state, pick(&names, t, k))))
        });
        g.bench_with_input(BenchmarkId::new("rwlock_clone", threads), &threads, |b, &threads| {
            b.iter_custom(|iters| run(threads, iters, |t, k| baseline_read(&base, pick(&names, t, k))))
        });
    }
    g.finish();
}

criterion_group!(benches, bench_reads);
criterion_main!(benches);
