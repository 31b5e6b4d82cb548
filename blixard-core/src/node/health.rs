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

/// How often the status is re-checked when Raft's metrics do not change
/// (leader contact ages without any metrics change).
const RECHECK: Duration = Duration::from_millis(250);
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
    let mut metrics = node.raft.metrics();
    let mut published = None;
    loop {
        let status = if serving(&node).await { ServingStatus::Serving } else { ServingStatus::NotServing };
        if published != Some(status) {
            tracing::info!(status = ?status, "health");
            for name in service_names() {
                reporter.set_service_status(name, status).await;
            }
            published = Some(status);
        }
        tokio::select! {
            r = metrics.changed() => if r.is_err() {
                // Raft stopped: nothing will serve again.
                for name in service_names() {
                    reporter.set_service_status(name, ServingStatus::NotServing).await;
                }
                return;
            },
            _ = tokio::time::sleep(RECHECK) => {}
        }
    }
}

/// Whether this node knows a live leader and has applied what it knows is committed.
async fn serving(node: &NodeShared) -> bool {
    // Twice the lease: one missed heartbeat round is not an outage.
    let fresh = node.tuning.election_timeout_max * 2;
    let (leader_ok, applied) = {
        let m = node.raft.metrics();
        let m = m.borrow();
        let leader_ok = match (m.state, m.current_leader) {
            (ServerState::Leader, _) => {
                m.millis_since_quorum_ack.is_some_and(|ms| u128::from(ms) <= fresh.as_millis())
            }
            (_, Some(_)) => node.contact.since() <= fresh,
            (_, None) => false,
        };
        (leader_ok, m.last_applied.map(|l| l.index))
    };
    if !leader_ok {
        return false;
    }
    let Ok(committed) = node.raft.with_raft_state(|st| st.committed.map(|l| l.index)).await else {
        return false;
    };
    if applied >= committed {
        return true;
    }
    // Applying trails committing by a moment under load: behind only if
    // it does not catch up soon.
    let Some(committed) = committed else { return true };
    node.raft.wait(Some(APPLY_GRACE)).applied_index_at_least(Some(committed), "health").await.is_ok()
}
