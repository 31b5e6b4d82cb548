//! Helpers shared by the scenario files.
#![allow(dead_code)]

use std::time::Duration;

use blixard_proto as pb;
use blixard_simulation::cluster::SimCluster;
use blixard_simulation::model::Model;
use madsim::rand::Rng;

/// Forming a cluster takes elections, joins and registrations: generous.
pub const READY_TIMEOUT: Duration = Duration::from_secs(120);
/// Catching up includes restarts, a possible snapshot install and elections.
pub const CONVERGE_TIMEOUT: Duration = Duration::from_secs(120);
/// A client's usual deadline: longer than the node's own write deadline
/// (10 s), so the node's verdict decides.
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(15);

pub fn init_logging() {
    if let Ok(filter) = std::env::var("BLIXARD_SIM_LOG") {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
            .with_test_writer()
            .try_init();
    }
}

pub fn pick<T: Copy>(items: &[T]) -> T {
    items[madsim::rand::thread_rng().gen_range(0..items.len())]
}

/// A uniformly random duration in `[lo, hi]` milliseconds.
pub fn millis(lo: u64, hi: u64) -> Duration {
    Duration::from_millis(madsim::rand::thread_rng().gen_range(lo..=hi))
}

pub fn small_spec() -> pb::VmSpec {
    pb::VmSpec { vcpus: 1, memory_mb: 256, disk_gb: 5, ..Default::default() }
}

/// Creates `count` fresh VMs one after the other, each through a random node
/// of `via`; every one must be acknowledged (a healthy quorum serves them).
pub async fn create_acked(c: &mut SimCluster, model: &mut Model, next: &mut u32, via: &[u64], count: usize) {
    for _ in 0..count {
        *next += 1;
        let name = format!("vm-{:04}", *next);
        let through = pick(via);
        assert!(
            c.create_vm(model, through, name.clone(), small_spec()).await,
            "create {name} via n{through} was not acknowledged although a quorum with the leader is healthy"
        );
    }
}
