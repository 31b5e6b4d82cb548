//! The Raft log and vote, durable in redb, with group commit.
//!
//! openraft wants two things from `append`: entries readable as soon as it
//! returns, and a callback once they are on disk. So the log lives twice: an
//! in-memory `BTreeMap` (everything not yet purged; reads never touch disk)
//! and redb (durability). Every write, vote and truncation goes, in order,
//! through one queue to a single writer task. The writer drains whatever has
//! queued up while the previous fsync ran and commits it all in ONE redb
//! transaction, then acknowledges each operation: many entries, one fsync.
//! Nothing is acknowledged before its commit returns, and after a failed
//! commit the writer refuses everything (a hole in the log is worse than a
//! stopped node).
//!
//! The `meta` table's `format` key holds the database's format version
//! ([`crate::format`]); a database from before versions has none and is
//! version 0. Opening migrates an older database in one transaction and
//! refuses a newer one.
use std::collections::BTreeMap;
use std::fmt::Debug;
use std::ops::RangeBounds;
use std::path::Path;
use std::sync::Arc;

use openraft::storage::{LogFlushed, LogState, RaftLogStorage};
use openraft::{AnyError, OptionalSend, RaftLogReader, StorageIOError};
use parking_lot::RwLock;
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use tokio::sync::{mpsc, oneshot};

use super::{blocking, Entry, LogId, StorageError, TypeConfig, Vote};
use crate::codec;
use crate::format::{self, FormatError};
use crate::metrics::NodeMetrics;

const LOG: TableDefinition<u64, &[u8]> = TableDefinition::new("log");
const META: TableDefinition<&str, &[u8]> = TableDefinition::new("meta");
const KEY_VOTE: &str = "vote";
const KEY_COMMITTED: &str = "committed";
const KEY_PURGED: &str = "last_purged";
const KEY_FORMAT: &str = "format";
/// Upper bound on operations folded into one transaction.
const MAX_GROUP: usize = 4096;

#[derive(Default)]
struct Cache {
    entries: BTreeMap<u64, Entry>,
    last_purged: Option<LogId>,
    vote: Option<Vote>,
    committed: Option<LogId>,
}

enum Op {
    Append { entries: Vec<Entry>, done: LogFlushed<TypeConfig> },
    Truncate { from: u64 },
    Purge { upto: LogId },
    Vote { vote: Vote, done: oneshot::Sender<std::io::Result<()>> },
    Committed { committed: Option<LogId> },
}

/// Group-commit statistics, for tests and benchmarks.
#[derive(Default, Debug)]
pub struct WriterStats {
    pub commits: std::sync::atomic::AtomicU64,
    pub entries: std::sync::atomic::AtomicU64,
    /// The commit index openraft last saved (metrics).
    pub committed: std::sync::atomic::AtomicU64,
}

/// openraft's log storage handle.
pub struct LogStore {
    cache: Arc<RwLock<Cache>>,
    tx: mpsc::UnboundedSender<Op>,
    stats: Arc<WriterStats>,
    writer: Option<tokio::task::JoinHandle<()>>,
}

/// Read-only view used by openraft's replication tasks.
#[derive(Clone)]
pub struct LogReader {
    cache: Arc<RwLock<Cache>>,
}

impl LogStore {
    /// Opens (or creates) the log at `path` and starts its writer task.
    pub fn open(path: &Path) -> Result<Self, OpenError> {
        Self::open_with_metrics(path, NodeMetrics::noop(0))
    }

    /// [`LogStore::open`], recording write sizes and fsync times in `metrics`.
    pub fn open_with_metrics(path: &Path, metrics: Arc<NodeMetrics>) -> Result<Self, OpenError> {
        let db = Database::create(path)?;
        let cache = load(&db)?;
        let (tx, rx) = mpsc::unbounded_channel();
        let stats = Arc::new(WriterStats::default());
        if let Some(c) = cache.committed {
            stats.committed.store(c.index, std::sync::atomic::Ordering::Relaxed);
        }
        let writer = tokio::spawn(writer(db, rx, stats.clone(), metrics));
        Ok(Self { cache: Arc::new(RwLock::new(cache)), tx, stats, writer: Some(writer) })
    }

    /// The writer task. It ends (closing the database file) once this store
    /// is dropped and its queue drained; await it before reopening the log.
    pub fn take_writer(&mut self) -> Option<tokio::task::JoinHandle<()>> {
        self.writer.take()
    }

    /// True when this log has ever voted or held an entry: the node has Raft
    /// state and must never be bootstrapped again.
    pub fn has_state(&self) -> bool {
        let c = self.cache.read();
        c.vote.is_some() || !c.entries.is_empty() || c.last_purged.is_some()
    }

    pub fn stats(&self) -> Arc<WriterStats> {
        self.stats.clone()
    }

    /// Queues `op` for the writer. The error type is openraft's (large, but
    /// only ever built once, when the writer is gone).
    #[allow(clippy::result_large_err)]
    fn send(&self, op: Op) -> Result<(), StorageError> {
        self.tx.send(op).map_err(|_| StorageIOError::write_logs(AnyError::error("log writer stopped")).into())
    }
}

/// Why the log could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error(transparent)]
    Db(#[from] redb::Error),
    #[error(transparent)]
    Format(#[from] FormatError),
}

macro_rules! redb_from {
    ($($t:ty),*) => {$(
        impl From<$t> for OpenError {
            fn from(e: $t) -> Self {
                OpenError::Db(e.into())
            }
        }
    )*};
}
redb_from!(
    redb::DatabaseError,
    redb::TransactionError,
    redb::TableError,
    redb::StorageError,
    redb::CommitError
);

type Step = fn(&redb::WriteTransaction) -> Result<(), OpenError>;

/// `STEPS[v]` converts a database of version `v` to `v + 1`; one per
/// version below [`format::CURRENT`], or this does not compile.
const STEPS: [Step; format::CURRENT as usize] = [v0_to_v1, v1_to_v2, v2_to_v3, v3_to_v4];

/// Version 1 only records the version: entries, vote, committed and purge
/// marks keep version 0's encoding.
fn v0_to_v1(_: &redb::WriteTransaction) -> Result<(), OpenError> {
    Ok(())
}

/// Version 2 only appended command variants: every version-1 entry is a
/// valid version-2 entry.
fn v1_to_v2(_: &redb::WriteTransaction) -> Result<(), OpenError> {
    Ok(())
}

/// Version 3 changed the state image's VM records (read by
/// `decode_image`), and appended the `CreateVms` command and new results:
/// every version-2 entry is a valid version-3 entry.
fn v2_to_v3(_: &redb::WriteTransaction) -> Result<(), OpenError> {
    Ok(())
}

/// Version 4 changed the state image's node and VM records (read by
/// `decode_image`) and appended commands, results and errors (format 3's
/// `CreateVms` keeps its position as `CreateVmsV3`): every version-3 entry
/// is a valid version-4 entry.
fn v3_to_v4(_: &redb::WriteTransaction) -> Result<(), OpenError> {
    Ok(())
}

/// Brings the database to [`format::CURRENT`] inside `w`, or refuses a
/// newer one. Each step converts one version to the next.
fn migrate(w: &redb::WriteTransaction) -> Result<(), OpenError> {
    let found = match w.open_table(META)?.get(KEY_FORMAT)? {
        None => 0,
        Some(v) => {
            let b = v.value();
            let b: [u8; 2] = b.try_into().map_err(|_| {
                redb::Error::Corrupted(format!("format key holds {} bytes, expected 2", b.len()))
            })?;
            format::check("raft log database", u16::from_le_bytes(b))?
        }
    };
    if found == format::CURRENT {
        return Ok(());
    }
    for step in &STEPS[usize::from(found)..] {
        step(w)?;
    }
    w.open_table(META)?.insert(KEY_FORMAT, &format::CURRENT.to_le_bytes()[..])?;
    tracing::info!(from = found, to = format::CURRENT, "raft log migrated");
    Ok(())
}

fn load(db: &Database) -> Result<Cache, OpenError> {
    let w = db.begin_write()?;
    w.open_table(LOG)?;
    migrate(&w)?;
    w.commit()?;
    let r = db.begin_read()?;
    let log = r.open_table(LOG)?;
    let meta = r.open_table(META)?;
    let mut cache = Cache::default();
    for item in log.iter()? {
        let (k, v) = item?;
        let e: Entry =
            codec::decode(v.value()).map_err(|e| redb::Error::Corrupted(format!("log entry: {e}")))?;
        cache.entries.insert(k.value(), e);
    }
    let get = |key: &str| -> Result<Option<Vec<u8>>, redb::Error> {
        Ok(meta.get(key)?.map(|v| v.value().to_vec()))
    };
    let corrupt = |what: &str, e: codec::CodecError| redb::Error::Corrupted(format!("{what}: {e}"));
    if let Some(b) = get(KEY_VOTE)? {
        cache.vote = Some(codec::decode(&b).map_err(|e| corrupt("vote", e))?);
    }
    if let Some(b) = get(KEY_COMMITTED)? {
        cache.committed = codec::decode(&b).map_err(|e| corrupt("committed", e))?;
    }
    if let Some(b) = get(KEY_PURGED)? {
        cache.last_purged = Some(codec::decode(&b).map_err(|e| corrupt("last purged", e))?);
    }
    Ok(cache)
}

/// What one operation writes, prepared for the blocking commit.
enum Write {
    Entries(Vec<(u64, Vec<u8>)>),
    Truncate(u64),
    Purge(u64, Vec<u8>),
    Meta(&'static str, Vec<u8>),
}

enum Done {
    Flushed(LogFlushed<TypeConfig>),
    Vote(oneshot::Sender<std::io::Result<()>>),
}

async fn writer(
    db: Database,
    mut rx: mpsc::UnboundedReceiver<Op>,
    stats: Arc<WriterStats>,
    metrics: Arc<NodeMetrics>,
) {
    let db = Arc::new(db);
    let mut failed: Option<String> = None;
    let mut ops = Vec::new();
    while let Some(first) = rx.recv().await {
        ops.push(first);
        while ops.len() < MAX_GROUP {
            match rx.try_recv() {
                Ok(op) => ops.push(op),
                Err(_) => break,
            }
        }
        let mut dones = Vec::new();
        let mut entries_in_group = 0u64;
        let mut needs_fsync = false;
        let mut raw = Vec::with_capacity(ops.len());
        for op in ops.drain(..) {
            match op {
                Op::Append { entries, done } => {
                    entries_in_group += entries.len() as u64;
                    needs_fsync = true;
                    raw.push(RawOp::Entries(entries));
                    dones.push(Done::Flushed(done));
                }
                Op::Truncate { from } => {
                    needs_fsync = true;
                    raw.push(RawOp::Truncate(from));
                }
                Op::Purge { upto } => {
                    needs_fsync = true;
                    raw.push(RawOp::Purge(upto));
                }
                Op::Vote { vote, done } => {
                    needs_fsync = true;
                    raw.push(RawOp::Vote(vote));
                    dones.push(Done::Vote(done));
                }
                Op::Committed { committed } => raw.push(RawOp::Committed(committed)),
            }
        }
        let result = match &failed {
            Some(why) => Err(why.clone()),
            None => {
                let db2 = db.clone();
                let started = tokio::time::Instant::now();
                let r = match blocking(move || commit_group(&db2, raw, needs_fsync)).await {
                    Ok(r) => r,
                    Err(e) => Err(e.to_string()),
                };
                if needs_fsync {
                    metrics.log_fsync_seconds.record(started.elapsed().as_secs_f64());
                }
                if entries_in_group > 0 {
                    metrics.log_write_entries.record(entries_in_group);
                }
                r
            }
        };
        if let Err(why) = &result {
            tracing::error!(error = %why, "raft log commit failed; refusing further writes");
            failed.get_or_insert_with(|| why.clone());
        } else {
            use std::sync::atomic::Ordering::Relaxed;
            stats.commits.fetch_add(1, Relaxed);
            stats.entries.fetch_add(entries_in_group, Relaxed);
        }
        for d in dones {
            let r = result.clone().map_err(std::io::Error::other);
            match d {
                Done::Flushed(cb) => cb.log_io_completed(r),
                Done::Vote(tx) => {
                    let _ = tx.send(r);
                }
            }
        }
    }
}

/// One queued operation, moved to the blocking commit to be encoded there
/// (encoding stays off the Raft core task).
enum RawOp {
    Entries(Vec<Entry>),
    Truncate(u64),
    Purge(LogId),
    Vote(Vote),
    Committed(Option<LogId>),
}

/// Encodes and commits one group in a single redb transaction. Blocking.
fn commit_group(db: &Database, raw: Vec<RawOp>, needs_fsync: bool) -> Result<(), String> {
    fn enc<T: serde::Serialize>(v: &T) -> Result<Vec<u8>, String> {
        codec::encode(v).map_err(|e| e.to_string())
    }
    let mut writes = Vec::with_capacity(raw.len());
    for op in raw {
        writes.push(match op {
            RawOp::Entries(entries) => {
                let mut out = Vec::with_capacity(entries.len());
                for e in &entries {
                    out.push((e.log_id.index, enc(e)?));
                }
                Write::Entries(out)
            }
            RawOp::Purge(upto) => Write::Purge(upto.index, enc(&upto)?),
            RawOp::Vote(v) => Write::Meta(KEY_VOTE, enc(&v)?),
            RawOp::Committed(c) => Write::Meta(KEY_COMMITTED, enc(&c)?),
            RawOp::Truncate(from) => Write::Truncate(from),
        });
    }
    let run = || -> Result<(), redb::Error> {
        let mut txn = db.begin_write()?;
        if !needs_fsync {
            // Only the committed pointer changed: it is an optimisation for
            // restart, not a promise, so it rides along with the next fsync.
            txn.set_durability(redb::Durability::None).map_err(|e| redb::Error::Corrupted(e.to_string()))?;
        }
        {
            let mut log = txn.open_table(LOG)?;
            let mut meta = txn.open_table(META)?;
            for w in &writes {
                match w {
                    Write::Entries(entries) => {
                        for (i, b) in entries {
                            log.insert(*i, b.as_slice())?;
                        }
                    }
                    Write::Truncate(from) => log.retain_in(*from.., |_, _| false)?,
                    Write::Purge(upto, id) => {
                        log.retain_in(..=*upto, |_, _| false)?;
                        meta.insert(KEY_PURGED, id.as_slice())?;
                    }
                    Write::Meta(key, bytes) => {
                        meta.insert(*key, bytes.as_slice())?;
                    }
                }
            }
        }
        txn.commit()?;
        Ok(())
    };
    run().map_err(|e| e.to_string())
}

fn read_range<RB: RangeBounds<u64>>(cache: &RwLock<Cache>, range: RB) -> Vec<Entry> {
    cache.read().entries.range(range).map(|(_, e)| e.clone()).collect()
}

impl RaftLogReader<TypeConfig> for LogReader {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry>, StorageError> {
        Ok(read_range(&self.cache, range))
    }
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry>, StorageError> {
        Ok(read_range(&self.cache, range))
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = LogReader;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, StorageError> {
        let c = self.cache.read();
        let last = c.entries.last_key_value().map(|(_, e)| e.log_id).or(c.last_purged);
        Ok(LogState { last_purged_log_id: c.last_purged, last_log_id: last })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        LogReader { cache: self.cache.clone() }
    }

    async fn save_vote(&mut self, vote: &Vote) -> Result<(), StorageError> {
        let (done, rx) = oneshot::channel();
        self.send(Op::Vote { vote: *vote, done })?;
        let flushed = rx.await.map_err(|_| std::io::Error::other("log writer stopped"));
        flushed.and_then(|r| r).map_err(|e| StorageIOError::write_vote(AnyError::new(&e)))?;
        // Visible only once durable: a vote is a promise to other nodes.
        self.cache.write().vote = Some(*vote);
        Ok(())
    }

    async fn read_vote(&mut self) -> Result<Option<Vote>, StorageError> {
        Ok(self.cache.read().vote)
    }

    async fn save_committed(&mut self, committed: Option<LogId>) -> Result<(), StorageError> {
        self.cache.write().committed = committed;
        if let Some(c) = committed {
            self.stats.committed.store(c.index, std::sync::atomic::Ordering::Relaxed);
        }
        self.send(Op::Committed { committed })
    }

    async fn read_committed(&mut self) -> Result<Option<LogId>, StorageError> {
        Ok(self.cache.read().committed)
    }

    async fn append<I>(&mut self, entries: I, callback: LogFlushed<TypeConfig>) -> Result<(), StorageError>
    where
        I: IntoIterator<Item = Entry> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let entries: Vec<Entry> = entries.into_iter().collect();
        {
            let mut c = self.cache.write();
            for e in &entries {
                c.entries.insert(e.log_id.index, e.clone());
            }
        }
        self.send(Op::Append { entries, done: callback })
    }

    async fn truncate(&mut self, log_id: LogId) -> Result<(), StorageError> {
        drop(self.cache.write().entries.split_off(&log_id.index));
        self.send(Op::Truncate { from: log_id.index })
    }

    async fn purge(&mut self, log_id: LogId) -> Result<(), StorageError> {
        {
            let mut c = self.cache.write();
            c.entries = c.entries.split_off(&(log_id.index + 1));
            c.last_purged = Some(log_id);
        }
        self.send(Op::Purge { upto: log_id })
    }
}
