//! Raft glue: openraft type configuration, storage, network and tuning.
pub mod link;
pub mod log_store;
pub mod network;
pub mod progress;
pub mod runtime;
pub mod state_machine;

use std::io::Cursor;
use std::sync::Arc;
use std::time::Duration;

use crate::command::{CommandResult, ProposalBatch};
use crate::types::NodeId;

openraft::declare_raft_types!(
    /// Blixard's openraft types: an entry carries a batch of proposals, apply
    /// yields one result per proposal, nodes are addressed by `host:port`.
    pub TypeConfig:
        D = ProposalBatch,
        R = Vec<CommandResult>,
        NodeId = NodeId,
        Node = openraft::BasicNode,
        Entry = openraft::Entry<TypeConfig>,
        SnapshotData = Cursor<Vec<u8>>,
        AsyncRuntime = runtime::Runtime,
);

pub type Raft = openraft::Raft<TypeConfig>;
pub type Entry = openraft::Entry<TypeConfig>;
pub type LogId = openraft::LogId<NodeId>;
pub type Vote = openraft::Vote<NodeId>;
pub type StorageError = openraft::StorageError<NodeId>;
pub type Membership = openraft::StoredMembership<NodeId, openraft::BasicNode>;
pub type SnapshotMeta = openraft::SnapshotMeta<NodeId, openraft::BasicNode>;

/// Snapshots travel in chunks of at most this many bytes (one RPC each).
pub const SNAPSHOT_CHUNK_BYTES: u64 = 1024 * 1024;

/// Raft timing and log-compaction knobs.
///
/// Timing (see `node::election` and docs/ARCHITECTURE.md): the leader sends a
/// heartbeat every `heartbeat`; a voter that has heard nothing from a leader
/// for the lease (`election_timeout_max`) plus a random part of
/// `election_timeout_min` asks for pre-votes and, with a quorum, campaigns.
/// Safety does not depend on these values (votes and ReadIndex rounds do
/// not trust clocks); they trade failover time against spurious elections
/// on a loaded machine: the lease is eight heartbeats.
#[derive(Clone, Debug)]
pub struct RaftTuning {
    pub heartbeat: Duration,
    /// The random part of a voter's wait before campaigning, and the pause
    /// between tries that did not elect anyone.
    pub election_timeout_min: Duration,
    /// The leader lease: how long a voter that heard from a leader refuses
    /// to vote for anyone else (openraft's lease is this value too).
    pub election_timeout_max: Duration,
    /// Build a snapshot after this many applied entries.
    pub snapshot_every: u64,
    /// Entries kept in the log behind the latest snapshot (so briefly lagging
    /// followers catch up from the log rather than a snapshot).
    pub keep_behind_snapshot: u64,
    /// Per-RPC deadline for snapshot chunks.
    pub snapshot_rpc_timeout: Duration,
    /// The size Raft log segments are preallocated to (a group larger than
    /// this gets a segment of its own size).
    pub log_segment_bytes: u64,
    /// Committed log entries kept in memory behind the commit index (older
    /// ones are read back from their segment when needed).
    pub log_hot_entries: u64,
}

impl Default for RaftTuning {
    fn default() -> Self {
        Self {
            heartbeat: Duration::from_millis(100),
            election_timeout_min: Duration::from_millis(400),
            election_timeout_max: Duration::from_millis(800),
            snapshot_every: 5000,
            keep_behind_snapshot: 1000,
            snapshot_rpc_timeout: Duration::from_secs(10),
            log_segment_bytes: log_store::segment::DEFAULT_SEGMENT_BYTES,
            log_hot_entries: log_store::DEFAULT_HOT_ENTRIES,
        }
    }
}

impl RaftTuning {
    /// How long a voter that heard from a leader refuses to vote for (or
    /// pre-vote for) anyone else. openraft derives its own lease from
    /// `election_timeout_max` the same way.
    pub fn leader_lease(&self) -> Duration {
        self.election_timeout_max
    }

    /// The openraft configuration, validated. (openraft's error type is
    /// large; it is returned once, at start-up.)
    #[allow(clippy::result_large_err)]
    pub fn to_config(&self, cluster_name: &str) -> Result<Arc<openraft::Config>, openraft::ConfigError> {
        let cfg = openraft::Config {
            cluster_name: cluster_name.to_string(),
            heartbeat_interval: self.heartbeat.as_millis() as u64,
            election_timeout_min: self.election_timeout_min.as_millis() as u64,
            election_timeout_max: self.election_timeout_max.as_millis() as u64,
            install_snapshot_timeout: self.snapshot_rpc_timeout.as_millis() as u64,
            snapshot_policy: openraft::SnapshotPolicy::LogsSinceLast(self.snapshot_every),
            max_in_snapshot_log_to_keep: self.keep_behind_snapshot,
            snapshot_max_chunk_size: SNAPSHOT_CHUNK_BYTES,
            max_payload_entries: 64,
            // Elections are started by `node::election` after a pre-vote.
            enable_elect: false,
            ..Default::default()
        };
        Ok(Arc::new(cfg.validate()?))
    }
}

/// Runs blocking IO (fsync, file writes) off the async executor. Under madsim
/// this is a plain task, which keeps the simulation deterministic.
pub(crate) async fn blocking<F, R>(f: F) -> std::io::Result<R>
where
    F: FnOnce() -> R + Send + 'static,
    R: Send + 'static,
{
    #[cfg(madsim)]
    {
        Ok(f())
    }
    #[cfg(not(madsim))]
    {
        tokio::task::spawn_blocking(f).await.map_err(|e| std::io::Error::other(e.to_string()))
    }
}
