//! The standard gRPC health service (`grpc.health.v1.Health`), kept up to
//! date from Raft's view of this node.
//!
//! SERVING means a client can use this node now: it knows a leader it has
//! heard from recently (a leader: a quorum acknowledged it recently) and it
//! has applied everything it knows to be committed. Otherwise NOT_SERVING:
//! an election is under way, the node lost its quorum or its leader, or it
//! is catching up. The same status is published for the whole server ("")
//! and for each Blixard service.
//!
//! Not built under madsim (tonic-health's server does not fit madsim-tonic's
//! simulated router).
use std::sync::Arc;
use std::time::Duration;

use openraft::ServerState;
use tonic_health::server::HealthReporter;
use tonic_health::ServingStatus;

use super::api::{ClusterApi, VmApi};
use super::NodeShared;

/// How often the status is re-checked. Polled rather than driven by every
/// Raft metrics change: a change comes with every write, and the check must
/// cost the write path nothing.
const RECHECK: Duration = Duration::from_millis(100);
/// How long a node may take to apply what it knows to be committed before
/// it counts as behind.
const APPLY_GRACE: Duration = Duration::from_millis(200);

/// The service names whose status this node publishes.
pub fn service_names() -> [&'static str; 3] {
    use blixard_proto::cluster_service_server::ClusterServiceServer;
    use blixard_proto::vm_service_server::VmServiceServer;
    use tonic::server::NamedService;
    ["", ClusterServiceServer::<ClusterApi>::NAME, VmServiceServer::<VmApi>::NAME]
}

/// Keeps `reporter` in step with this node's state; runs until the server stops.
pub async fn run(node: Arc<NodeShared>, reporter: HealthReporter) {
    let metrics = node.raft.metrics();
    let mut published = None;
    let mut behind_since: Option<tokio::time::Instant> = None;
    loop {
        let status = match check(&node) {
            Check::NoLeader => ServingStatus::NotServing,
            Check::CaughtUp => {
                behind_since = None;
                ServingStatus::Serving
            }
            // Applying trails committing by a moment under load: behind
            // only if it does not catch up soon.
            Check::Behind => {
                let since = *behind_since.get_or_insert_with(tokio::time::Instant::now);
                if since.elapsed() > APPLY_GRACE {
                    ServingStatus::NotServing
                } else {
                    published.unwrap_or(ServingStatus::NotServing)
                }
            }
        };
        if published != Some(status) {
            tracing::info!(status = ?status, "health");
            for name in service_names() {
                reporter.set_service_status(name, status).await;
            }
            published = Some(status);
        }
        if metrics.has_changed().is_err() {
            // Raft stopped: nothing will serve again.
            for name in service_names() {
                reporter.set_service_status(name, ServingStatus::NotServing).await;
            }
            return;
        }
        tokio::time::sleep(RECHECK).await;
    }
}

enum Check {
    NoLeader,
    Behind,
    CaughtUp,
}

/// Whether this node knows a live leader and has applied what it knows is
/// committed. Reads only shared figures: no call into the Raft core.
fn check(node: &NodeShared) -> Check {
    // Twice the lease: one missed heartbeat round is not an outage.
    let fresh = node.tuning.election_timeout_max * 2;
    let m = node.raft.metrics();
    let m = m.borrow();
    let leader_ok = match (m.state, m.current_leader) {
        (ServerState::Leader, _) => {
            m.millis_since_quorum_ack.is_some_and(|ms| u128::from(ms) <= fresh.as_millis())
        }
        (_, Some(_)) => node.contact.since() <= fresh,
        (_, None) => false,
    };
    if !leader_ok {
        return Check::NoLeader;
    }
    // The commit index openraft last saved through the log store.
    let committed = node.log_stats.committed.load(std::sync::atomic::Ordering::Relaxed);
    if m.last_applied.map_or(0, |l| l.index) >= committed {
        Check::CaughtUp
    } else {
        Check::Behind
    }
}
