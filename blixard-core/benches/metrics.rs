//! The cost of recording a metric on a hot path (issue 9, item 7): a counter
//! increment and a histogram record through the real OpenTelemetry SDK
//! (the meter provider the `blixard` binary uses, with the Prometheus
//! exporter as its reader), in ns/op and heap allocations/op.
//!
//! - `bound`: the handle `NodeMetrics` keeps (attribute set bound once:
//!   what every Blixard hot path does);
//! - `cached slice`: `add(1, &attrs)` with a prebuilt attribute array (the
//!   SDK hashes and looks the set up on every call), for comparison;
//! - `fresh attrs`: a new `KeyValue` array per call (what the seed review
//!   warned against), for comparison;
//! - `noop`: a node started without a meter.
//!
//! Single-threaded, 10M iterations per case after a warm-up. Run:
//! `cargo bench -p blixard-core --bench metrics`.
use std::alloc::{GlobalAlloc, Layout, System};
use std::hint::black_box;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Instant;

use opentelemetry::metrics::MeterProvider;
use opentelemetry::KeyValue;
use opentelemetry_sdk::metrics::SdkMeterProvider;

struct Counting;
static ALLOCS: AtomicU64 = AtomicU64::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        ALLOCS.fetch_add(1, Relaxed);
        System.alloc(l)
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        System.dealloc(p, l)
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, n: usize) -> *mut u8 {
        ALLOCS.fetch_add(1, Relaxed);
        System.realloc(p, l, n)
    }
}

#[global_allocator]
static A: Counting = Counting;

const N: u64 = 10_000_000;

fn measure(name: &str, mut f: impl FnMut(u64)) {
    for i in 0..N / 10 {
        f(i);
    }
    let allocs = ALLOCS.load(Relaxed);
    let t = Instant::now();
    for i in 0..N {
        f(i);
    }
    let ns = t.elapsed().as_nanos() as f64 / N as f64;
    let per = (ALLOCS.load(Relaxed) - allocs) as f64 / N as f64;
    println!("{name:<34} {ns:>8.1} ns/op {per:>8.3} allocs/op");
}

fn main() {
    let registry = prometheus::Registry::new();
    let exporter = opentelemetry_prometheus::exporter().with_registry(registry.clone()).build().unwrap();
    let provider = SdkMeterProvider::builder().with_reader(exporter).build();
    let meter = provider.meter("bench");
    let counter = meter.u64_counter("bench_counter").build();
    let hist = meter.f64_histogram("bench_seconds").with_unit("s").build();
    let attrs =
        [KeyValue::new("node", "1"), KeyValue::new("method", "CreateVm"), KeyValue::new("code", "OK")];
    let bound_c = counter.bind(&attrs);
    let bound_h = hist.bind(&attrs[..2]);
    let m = blixard_core::metrics::NodeMetrics::new(Some(&meter), 1);
    let noop = blixard_core::metrics::NodeMetrics::noop(1);

    println!("{:<34} {:>11} {:>15}", "case", "time", "heap");
    measure("counter add, bound", |_| bound_c.add(1));
    measure("histogram record, bound", |i| bound_h.record(black_box(i as f64 * 1e-6)));
    measure("NodeMetrics proposals (counter)", |_| m.proposals.add(1));
    measure("NodeMetrics fsync (histogram)", |i| m.log_fsync_seconds.record(black_box(i as f64 * 1e-6)));
    measure("NodeMetrics API request (lazy)", |i| m.api_request(0, 0, black_box(i as f64 * 1e-6)));
    measure("counter add, cached slice", |_| counter.add(1, &attrs));
    measure("histogram record, cached slice", |i| hist.record(black_box(i as f64 * 1e-6), &attrs[..2]));
    measure("counter add, fresh attrs", |_| {
        counter.add(1, &[KeyValue::new("node", "1".to_string()), KeyValue::new("method", "CreateVm")])
    });
    measure("noop counter (no meter)", |_| noop.proposals.add(1));

    // The recorded values reach the exporter.
    let families = registry.gather();
    assert!(families.iter().any(|f| f.name() == "bench_counter_total"), "the counter was exported");
}
