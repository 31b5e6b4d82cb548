//! The Raft state machine: applies committed entries to the in-memory
//! [`ClusterState`], builds and installs snapshots.
//!
//! The state itself is not persisted on apply; snapshots are. A snapshot is
//! the canonical state image plus its Raft metadata (last applied log id and
//! membership), written to a temporary file, fsynced and renamed over the
//! previous one, so a crash leaves either the old or the new snapshot, never
//! a torn one. Restart = load the snapshot, then openraft replays the log
//! from the snapshot's last index up to the persisted commit index.
//!
//! Both the snapshot file and the state image inside it (which is also what
//! `InstallSnapshot` carries) start with a format header
//! ([`crate::format`]); files and images from before versions are read as
//! version 0.
use std::io::{Cursor, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use openraft::storage::{RaftStateMachine, Snapshot};
use openraft::{AnyError, EntryPayload, OptionalSend, RaftSnapshotBuilder, StorageIOError, StoredMembership};
use serde::{Deserialize, Serialize};

use super::log_store::EarlyAcks;
use super::{blocking, Entry, LogId, Membership, SnapshotMeta, StorageError, TypeConfig};
use crate::codec;
use crate::command::{CommandOutput, CommandResult};
use crate::format::{self, FormatError};
use crate::legacy;
use crate::metrics::NodeMetrics;
use crate::state::{ClusterState, StateImage};

const SNAPSHOT_FILE: &str = "snapshot.bin";

#[derive(Serialize, Deserialize, Clone)]
struct StoredSnapshot {
    meta: SnapshotMeta,
    /// A [`StateImage`] as [`encode_image`] writes it.
    data: Vec<u8>,
}

pub struct StateMachineStore {
    state: Arc<ClusterState>,
    last_applied: Option<LogId>,
    membership: Membership,
    dir: PathBuf,
    /// Distinguishes snapshots built at the same log id.
    built: u64,
    /// What the next image's buffer is sized to (the last one's size).
    image_bytes: usize,
    metrics: Arc<NodeMetrics>,
    /// The log's early-reported entries (log_store/early.rs): an entry is
    /// applied only once it is on this node's disk.
    early: Option<Arc<EarlyAcks>>,
    /// The batch being applied (reused: no allocation per batch).
    batch: Vec<Entry>,
}

impl StateMachineStore {
    /// Opens the state machine in `dir`, restoring `state` from the latest
    /// snapshot if there is one.
    pub fn open(dir: &Path, state: Arc<ClusterState>) -> std::io::Result<Self> {
        let mut sm = Self {
            state,
            last_applied: None,
            membership: StoredMembership::default(),
            dir: dir.to_path_buf(),
            built: 0,
            image_bytes: 0,
            metrics: NodeMetrics::noop(0),
            early: None,
            batch: Vec::new(),
        };
        let path = dir.join(SNAPSHOT_FILE);
        match std::fs::read(&path) {
            Ok(bytes) => {
                let what = format!("snapshot file {}", path.display());
                let (_version, body) = format::split_header(&what, &bytes).map_err(std::io::Error::other)?;
                let snap: StoredSnapshot =
                    codec::decode_trusted(body).map_err(|e| std::io::Error::other(format!("{what}: {e}")))?;
                let image = decode_image(&what, &snap.data).map_err(std::io::Error::other)?;
                sm.state.restore(image, snap.meta.last_log_id.map_or(0, |l| l.index));
                sm.last_applied = snap.meta.last_log_id;
                sm.membership = snap.meta.last_membership.clone();
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        Ok(sm)
    }

    pub fn state(&self) -> &Arc<ClusterState> {
        &self.state
    }

    /// Records apply times, placements and snapshots in `metrics`.
    pub fn with_metrics(mut self, metrics: Arc<NodeMetrics>) -> Self {
        self.metrics = metrics;
        self
    }

    /// Applies nothing before the log has it on disk, for a log that
    /// reports the leader's own entries flushed early
    /// ([`LogStore::report_own_entries_early`](super::log_store::LogStore::report_own_entries_early)).
    pub fn with_early_acks(mut self, early: Arc<EarlyAcks>) -> Self {
        self.early = Some(early);
        self
    }
}

/// Atomically replaces the snapshot file in `dir`. Blocking.
///
/// The file is the format header then `codec::encode(snap)`; the image
/// bytes (most of it) are written from where they are, not copied into a
/// second buffer: bincode writes a `Vec<u8>` as its length then its bytes.
fn persist(dir: &Path, snap: &StoredSnapshot) -> std::io::Result<()> {
    let mut head = format::with_header(&[]);
    codec::encode_into(&snap.meta, &mut head).map_err(std::io::Error::other)?;
    codec::encode_into(&(snap.data.len() as u64), &mut head).map_err(std::io::Error::other)?;
    let tmp = dir.join(format!("{SNAPSHOT_FILE}.tmp"));
    {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(&head)?;
        f.write_all(&snap.data)?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, dir.join(SNAPSHOT_FILE))?;
    std::fs::File::open(dir)?.sync_all()
}

/// [`persist`] on the blocking pool, with openraft's error type; hands the
/// snapshot back (moved there and back, never copied).
async fn persist_off_executor(dir: &Path, snap: StoredSnapshot) -> Result<StoredSnapshot, StorageError> {
    let sig = snap.meta.signature();
    let dir = dir.to_path_buf();
    blocking(move || persist(&dir, &snap).map(|()| snap))
        .await
        .and_then(|r| r)
        .map_err(|e| StorageIOError::write_snapshot(Some(sig), AnyError::new(&e)).into())
}

/// The state image in the current format: header, then bincode.
pub fn encode_image(image: &StateImage) -> Result<Vec<u8>, codec::CodecError> {
    Ok(format::with_header(&codec::encode(image)?))
}

#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error(transparent)]
    Format(#[from] FormatError),
    #[error("{what}: {reason}")]
    Decode { what: String, reason: String },
}

/// Decodes a state image of any version this build reads, converting older
/// ones: versions 0 (no header) and 1 share a layout whose node records
/// predate reservations and overcommit; version 2's VM records predate
/// placement rules.
pub fn decode_image(what: &str, bytes: &[u8]) -> Result<StateImage, ImageError> {
    let (version, body) = format::split_header(what, bytes)?;
    let bad = |e: codec::CodecError| ImageError::Decode { what: what.to_string(), reason: e.to_string() };
    match version {
        0 | 1 => Ok(codec::decode_trusted::<legacy::StateImageV1>(body).map_err(bad)?.into()),
        2 => Ok(codec::decode_trusted::<legacy::StateImageV2>(body).map_err(bad)?.into()),
        3 => Ok(codec::decode_trusted::<legacy::StateImageV3>(body).map_err(bad)?.into()),
        4 => Ok(codec::decode_trusted::<legacy::StateImageV4>(body).map_err(bad)?.into()),
        5 => Ok(codec::decode_trusted::<legacy::StateImageV5>(body).map_err(bad)?.into()),
        _ => codec::decode_trusted(body).map_err(bad),
    }
}

fn to_snapshot(s: StoredSnapshot) -> Snapshot<TypeConfig> {
    Snapshot { meta: s.meta, snapshot: Box::new(Cursor::new(s.data)) }
}

/// Built on the state machine task (so the image is consistent with
/// `last_applied`); persisted later on openraft's snapshot task.
pub struct SnapshotBuilder {
    snap: Option<StoredSnapshot>,
    dir: PathBuf,
    metrics: Arc<NodeMetrics>,
}

impl RaftSnapshotBuilder<TypeConfig> for SnapshotBuilder {
    async fn build_snapshot(&mut self) -> Result<Snapshot<TypeConfig>, StorageError> {
        let snap = self
            .snap
            .take()
            .ok_or_else(|| StorageIOError::write_snapshot(None, AnyError::error("snapshot already built")))?;
        let snap = persist_off_executor(&self.dir, snap).await?;
        self.metrics.snapshots_built.add(1);
        self.metrics.snapshot_built_bytes.record(snap.data.len() as u64);
        Ok(to_snapshot(snap))
    }
}

impl RaftStateMachine<TypeConfig> for StateMachineStore {
    type SnapshotBuilder = SnapshotBuilder;

    async fn applied_state(&mut self) -> Result<(Option<LogId>, Membership), StorageError> {
        Ok((self.last_applied, self.membership.clone()))
    }

    async fn apply<I>(&mut self, entries: I) -> Result<Vec<Vec<CommandResult>>, StorageError>
    where
        I: IntoIterator<Item = Entry> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let started = tokio::time::Instant::now();
        let mut batch = std::mem::take(&mut self.batch);
        batch.extend(entries);
        if let (Some(early), Some(last)) = (&self.early, batch.last()) {
            // A leader's own entry may be committed before its own flush
            // (log_store/early.rs): applying it is what makes it visible.
            if early.unflushed(last.log_id.index) {
                let last = last.log_id;
                early
                    .wait_flushed(last.index)
                    .await
                    .map_err(|why| StorageError::from(StorageIOError::apply(last, AnyError::error(why))))?;
            }
        }
        let mut out = Vec::with_capacity(batch.len());
        // One run for the whole batch of entries: readers see its VM changes
        // together when it ends, before openraft reports them applied.
        let mut run = self.state.begin_apply();
        for e in batch.drain(..) {
            self.last_applied = Some(e.log_id);
            run.advance(e.log_id.index);
            out.push(match e.payload {
                EntryPayload::Blank => vec![Ok(CommandOutput::Internal)],
                EntryPayload::Normal(batch) => batch
                    .0
                    .iter()
                    .map(|p| {
                        let r = run.apply(p, e.log_id.index);
                        self.metrics.record_outcome(&r);
                        r
                    })
                    .collect(),
                EntryPayload::Membership(m) => {
                    self.membership = StoredMembership::new(Some(e.log_id), m);
                    vec![Ok(CommandOutput::Internal)]
                }
            });
        }
        drop(run);
        self.batch = batch;
        self.metrics.apply_entries.record(out.len() as u64);
        self.metrics.apply_seconds.record(started.elapsed().as_secs_f64());
        Ok(out)
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        self.built += 1;
        // Encoding a StateImage cannot fail (no maps with non-string keys,
        // no size limit on encode); an empty image would only be refused by
        // whoever decodes it, never misread.
        let mut data = Vec::with_capacity(self.image_bytes);
        data.extend_from_slice(&format::with_header(&[]));
        if self.state.encode_image_into(&mut data).is_err() {
            data.clear();
        }
        // The next image is about as large: one allocation, no regrowth.
        self.image_bytes = data.len() + data.len() / 8;
        let snapshot_id = match self.last_applied {
            Some(l) => format!("{}-{}-{}", l.leader_id, l.index, self.built),
            None => format!("none-{}", self.built),
        };
        let meta = SnapshotMeta {
            last_log_id: self.last_applied,
            last_membership: self.membership.clone(),
            snapshot_id,
        };
        SnapshotBuilder {
            snap: Some(StoredSnapshot { meta, data }),
            dir: self.dir.clone(),
            metrics: self.metrics.clone(),
        }
    }

    async fn begin_receiving_snapshot(&mut self) -> Result<Box<Cursor<Vec<u8>>>, StorageError> {
        Ok(Box::new(Cursor::new(Vec::new())))
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta,
        snapshot: Box<Cursor<Vec<u8>>>,
    ) -> Result<(), StorageError> {
        let sig = meta.signature();
        let snap = StoredSnapshot { meta: meta.clone(), data: snapshot.into_inner() };
        let image = decode_image("received snapshot", &snap.data)
            .map_err(|e| StorageIOError::read_snapshot(Some(sig.clone()), AnyError::new(&e)))?;
        // Durable first: if we crash after restoring but before persisting,
        // the restart must not come back with a log that starts past an
        // older snapshot.
        let snap = persist_off_executor(&self.dir, snap).await?;
        self.metrics.snapshots_installed.add(1);
        self.metrics.snapshot_installed_bytes.record(snap.data.len() as u64);
        self.state.restore(image, meta.last_log_id.map_or(0, |l| l.index));
        self.last_applied = meta.last_log_id;
        self.membership = meta.last_membership.clone();
        Ok(())
    }

    /// Read from its file: a snapshot is needed only to catch up a
    /// follower, and keeping its bytes in memory would cost as much as the
    /// state it holds.
    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot<TypeConfig>>, StorageError> {
        let path = self.dir.join(SNAPSHOT_FILE);
        let read = blocking(move || -> std::io::Result<Option<StoredSnapshot>> {
            match std::fs::read(&path) {
                Ok(bytes) => {
                    let what = format!("snapshot file {}", path.display());
                    let (_, body) = format::split_header(&what, &bytes).map_err(std::io::Error::other)?;
                    let snap = codec::decode_trusted(body)
                        .map_err(|e| std::io::Error::other(format!("{what}: {e}")))?;
                    Ok(Some(snap))
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
                Err(e) => Err(e),
            }
        });
        let snap =
            read.await.and_then(|r| r).map_err(|e| StorageIOError::read_snapshot(None, AnyError::new(&e)))?;
        Ok(snap.map(to_snapshot))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The file `persist` writes in pieces is the header and the encoding of
    /// the whole `StoredSnapshot`, as every reader (start-up,
    /// `get_current_snapshot`, older builds) decodes it.
    #[test]
    fn persisted_snapshot_is_header_then_the_stored_snapshot() {
        let dir = tempfile::tempdir().unwrap();
        let meta = SnapshotMeta {
            last_log_id: Some(openraft::LogId::new(openraft::CommittedLeaderId::new(3, 1), 42)),
            last_membership: StoredMembership::default(),
            snapshot_id: "3-1-42-1".into(),
        };
        let data: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
        let snap = StoredSnapshot { meta, data };
        persist(dir.path(), &snap).unwrap();
        let file = std::fs::read(dir.path().join(SNAPSHOT_FILE)).unwrap();
        assert_eq!(file, format::with_header(&codec::encode(&snap).unwrap()));
        assert!(!dir.path().join(format!("{SNAPSHOT_FILE}.tmp")).exists());
    }
}
