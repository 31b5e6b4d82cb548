//! The Raft log and vote: an append-only segment log with group commit.
//!
//! openraft wants two things from `append`: entries readable as soon as it
//! returns, and a callback once they are on disk. So the log lives twice: an
//! in-memory `BTreeMap` (everything not yet purged; reads never touch disk)
//! and segment files (durability; [`segment`] has the layout). Every write,
//! vote, truncation and purge goes, in order, through one queue to a single
//! writer (a thread of its own; a task under madsim). The writer drains
//! whatever has queued up while its previous write ran, encodes it all into
//! one buffer, and writes it with ONE `pwrite` and ONE `fdatasync`, then
//! acknowledges each operation: many entries, one fsync, no hand-off to a
//! blocking pool. Nothing is acknowledged before its `fdatasync` returns,
//! and after a failed write the writer refuses everything (a hole in the
//! log is worse than a stopped node).
//!
//! The commit index is not queued: it only saves work at restart, so the
//! writer records the latest one in whatever group it writes next (never
//! ahead of the entries it has written).
//!
//! A data dir from format versions 0 to 4 keeps its log in redb
//! (`raft.redb`); opening migrates it into segments once ([`legacy`]).
pub mod early;
pub mod legacy;
pub mod segment;

use std::collections::BTreeMap;
use std::fmt::Debug;
use std::ops::RangeBounds;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use openraft::storage::{LogFlushed, LogState, RaftLogStorage};
use openraft::{AnyError, OptionalSend, RaftLogReader, StorageIOError};
use parking_lot::{Mutex, RwLock};
use tokio::sync::{mpsc, oneshot};

use super::progress::Progress;
use super::{Entry, LogId, StorageError, TypeConfig, Vote};
use crate::metrics::NodeMetrics;
use crate::types::NodeId;
pub use early::EarlyAcks;
use segment::{Group, Kind, LogError, Marks, Pos, Record, SegmentLog};

/// The log directory's name, in the data dir.
pub const DIR: &str = "raft-log";
/// Upper bound on operations folded into one write.
const MAX_GROUP: usize = 4096;

/// Committed entries kept in memory behind the commit index by default, so
/// a follower that lags a little is served without a disk read
/// (`RaftTuning::log_hot_entries`; the simulator keeps only a few, so its
/// lagging followers are served from disk all the time).
pub const DEFAULT_HOT_ENTRIES: u64 = 64;

/// Where an entry lies on disk.
#[derive(Clone, Copy, Debug)]
struct Loc {
    log_id: LogId,
    pos: Pos,
}

/// The log as readers see it. Memory holds only what may still change or
/// is about to be read: entries not yet written or not yet committed, and
/// the last `hot_keep` committed ones. Every entry written has its place on
/// disk in `locs`, so older ones are read back from their segment on the
/// rare occasions they are needed (a lagging follower, a restart). The
/// log's extent is the union of both.
#[derive(Default)]
struct Cache {
    /// Committed entries kept in memory behind the commit index.
    hot_keep: u64,
    hot: BTreeMap<u64, Entry>,
    locs: BTreeMap<u64, Loc>,
    last_purged: Option<LogId>,
    vote: Option<Vote>,
    committed: Option<LogId>,
}

impl Cache {
    /// Replays one record found on disk at `pos`.
    fn replay_record(&mut self, r: Record, pos: Pos) {
        match r {
            Record::Entry(e) => {
                self.locs.insert(e.log_id.index, Loc { log_id: e.log_id, pos });
            }
            Record::Truncate(from) => self.truncate(from),
            Record::Purge(upto) => self.purge(Some(upto)),
            Record::Vote(v) => self.vote = Some(v),
            Record::Committed(c) => self.committed = c,
            Record::Checkpoint(m) => {
                self.vote = m.vote;
                self.committed = m.committed;
                self.purge(m.last_purged);
            }
        }
    }

    fn truncate(&mut self, from: u64) {
        drop(self.hot.split_off(&from));
        drop(self.locs.split_off(&from));
    }

    fn purge(&mut self, upto: Option<LogId>) {
        if let Some(upto) = upto {
            match upto.index.checked_add(1) {
                Some(after) => {
                    self.hot = self.hot.split_off(&after);
                    self.locs = self.locs.split_off(&after);
                }
                // Purged up to the last possible index: nothing is left.
                None => {
                    self.hot.clear();
                    self.locs.clear();
                }
            }
        }
        self.last_purged = upto;
    }

    /// After replay: what the segments held must be a Raft log, its
    /// entries at consecutive indexes right after the purge mark, their log
    /// ids in order. Records that pass their checksums and still break
    /// this were never written by this log (damage that kept the checksums,
    /// or segments from elsewhere); serving them would hand openraft a log
    /// with holes, so opening fails, naming the segment and offset.
    fn check_replayed(&self, dir: &Path) -> Result<(), LogError> {
        let mut prev = self.last_purged;
        for loc in self.locs.values() {
            if let Some(p) = prev {
                let follows = p.index.checked_add(1) == Some(loc.log_id.index);
                if !follows || loc.log_id.leader_id < p.leader_id {
                    return Err(LogError::Corrupt {
                        path: segment::segment_path(dir, loc.pos.seq),
                        offset: loc.pos.offset,
                        why: format!("entry {} follows {} (purged or written before it)", loc.log_id, p),
                    });
                }
            }
            prev = Some(loc.log_id);
        }
        Ok(())
    }

    fn last_log_id(&self) -> Option<LogId> {
        let hot = self.hot.last_key_value().map(|(_, e)| e.log_id);
        let disk = self.locs.last_key_value().map(|(_, l)| l.log_id);
        hot.into_iter().chain(disk).max_by_key(|l| l.index).or(self.last_purged)
    }

    /// Drops from memory the committed entries more than `hot_keep` behind the
    /// commit index whose copy on disk is known.
    fn evict(&mut self) {
        let Some(c) = self.committed else { return };
        let upto = c.index.saturating_sub(self.hot_keep);
        while let Some(e) = self.hot.first_entry() {
            if *e.key() > upto || self.locs.get(e.key()).is_none_or(|l| l.log_id != e.get().log_id) {
                break;
            }
            e.remove();
        }
    }

    fn marks(&self) -> Marks {
        Marks { vote: self.vote, committed: self.committed, last_purged: self.last_purged }
    }
}

/// Reads entries back from their segments; keeps the files open.
struct Disk {
    dir: PathBuf,
    files: Mutex<std::collections::HashMap<u64, Arc<std::fs::File>>>,
}

impl Disk {
    fn read(&self, loc: Loc) -> Result<Entry, LogError> {
        let seq = loc.pos.seq;
        let path = segment::segment_path(&self.dir, seq);
        let file = {
            let mut files = self.files.lock();
            match files.get(&seq) {
                Some(f) => f.clone(),
                None => {
                    let f = Arc::new(
                        std::fs::File::open(&path)
                            .map_err(|e| LogError::Io { path: path.clone(), source: e })?,
                    );
                    // Handles of deleted (purged) segments go.
                    files.retain(|s, _| *s >= seq);
                    files.insert(seq, f.clone());
                    f
                }
            }
        };
        let e = segment::read_entry(&file, &path, loc.pos)?;
        if e.log_id != loc.log_id {
            return Err(LogError::Corrupt {
                path,
                offset: loc.pos.offset,
                why: format!("holds entry {} where {} was written", e.log_id, loc.log_id),
            });
        }
        Ok(e)
    }
}

enum Op {
    /// Entries encoded by `append` (so the writer needs no copy of them).
    Append {
        records: Group,
        ids: Vec<LogId>,
        /// `None` for a leader's own entries, reported flushed once queued
        /// ([`early`]).
        done: Option<LogFlushed<TypeConfig>>,
    },
    Truncate {
        from: u64,
    },
    Purge {
        upto: LogId,
    },
    Vote {
        vote: Vote,
        done: oneshot::Sender<std::io::Result<()>>,
    },
}

/// Group-commit statistics, for tests and benchmarks.
#[derive(Default, Debug)]
pub struct WriterStats {
    pub commits: std::sync::atomic::AtomicU64,
    pub entries: std::sync::atomic::AtomicU64,
    /// The commit index openraft last saved (metrics).
    pub committed: std::sync::atomic::AtomicU64,
    /// Appends written after being reported flushed early: the leader's
    /// own entries (early.rs). Always 0 on a follower.
    pub early_appends: std::sync::atomic::AtomicU64,
    /// Appends written by the appending task itself, the writer being idle
    /// (a follower's, `LogStore::send_inline`). Never a leader's own.
    pub inline_appends: std::sync::atomic::AtomicU64,
}

/// Resolves once the writer has stopped and closed its files.
pub type WriterDone = oneshot::Receiver<()>;

/// openraft's log storage handle.
pub struct LogStore {
    /// What it reads through (memory, then disk); shared with openraft's
    /// replication tasks.
    reader: LogReader,
    /// The writer, shared with its thread. Dropped before `tx`, and its
    /// doorbell after its share of the writer: the thread holds the last
    /// reference once it sees the doorbell close.
    writer_handle: WriterHandle,
    tx: mpsc::UnboundedSender<Op>,
    /// The commit index not yet handed to the writer.
    committed: Arc<Mutex<Option<Option<LogId>>>>,
    stats: Arc<WriterStats>,
    writer: Option<WriterDone>,
    /// Set by [`LogStore::report_own_entries_early`]: this node's id.
    me: Option<NodeId>,
    early: Arc<EarlyAcks>,
    /// The last index appended, for the batcher (raft/progress.rs).
    progress: Arc<Progress>,
}

/// Read-only view used by openraft's replication tasks.
#[derive(Clone)]
pub struct LogReader {
    cache: Arc<RwLock<Cache>>,
    disk: Arc<Disk>,
}

/// Why the log could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error(transparent)]
    Log(#[from] LogError),
    #[error("{path}: {source}", path = .1.display(), source = .0)]
    Legacy(legacy::LegacyError, PathBuf),
    #[error("{legacy} was migrated to {dir}, which is missing; restore {dir} (never start this node on an empty log: it would forget its vote)", legacy = .legacy.display(), dir = .dir.display())]
    MigratedLogMissing { legacy: PathBuf, dir: PathBuf },
    #[error("cannot start the raft log writer: {0}")]
    Writer(std::io::Error),
}

impl LogStore {
    /// Opens (or creates) the log in the directory `dir` and starts its
    /// writer. A legacy `raft.redb` beside `dir` is migrated first.
    pub fn open(dir: &Path) -> Result<Self, OpenError> {
        let defaults = crate::raft::RaftTuning::default();
        Self::open_with(dir, &defaults, NodeMetrics::noop(0))
    }

    /// [`LogStore::open`] with the segment size and hot entries of `tuning`,
    /// recording write sizes and fsync times in `metrics`.
    pub fn open_with(
        dir: &Path,
        tuning: &crate::raft::RaftTuning,
        metrics: Arc<NodeMetrics>,
    ) -> Result<Self, OpenError> {
        let segment_bytes = tuning.log_segment_bytes;
        let legacy_path = dir.parent().unwrap_or(Path::new(".")).join(legacy::FILE);
        let legacy_err = |e| OpenError::Legacy(e, legacy_path.clone());
        match (dir.exists(), legacy_path.exists()) {
            (false, false) => create_empty(dir, segment_bytes)?,
            (false, true) => {
                if legacy::is_moved(&legacy_path).map_err(legacy_err)? {
                    return Err(OpenError::MigratedLogMissing {
                        legacy: legacy_path,
                        dir: dir.to_path_buf(),
                    });
                }
                migrate(&legacy_path, dir, segment_bytes)?;
            }
            (true, true) => {
                if !legacy::is_moved(&legacy_path).map_err(legacy_err)? {
                    // A crash between the migration's rename and its mark.
                    legacy::mark_moved(&legacy_path).map_err(legacy_err)?;
                }
            }
            (true, false) => {}
        }
        let mut cache = Cache { hot_keep: tuning.log_hot_entries, ..Cache::default() };
        let found = segment::replay(dir, |r, pos| cache.replay_record(r, pos))?;
        cache.check_replayed(dir)?;
        let log = SegmentLog::open(dir, found, cache.marks(), segment_bytes)?;
        let last_index = cache.last_log_id().map(|l| l.index);
        let stats = Arc::new(WriterStats::default());
        if let Some(c) = cache.committed {
            stats.committed.store(c.index, std::sync::atomic::Ordering::Relaxed);
        }
        let committed = Arc::new(Mutex::new(None));
        let cache = Arc::new(RwLock::new(cache));
        let disk = Arc::new(Disk { dir: dir.to_path_buf(), files: Mutex::new(Default::default()) });
        let (tx, rx) = mpsc::unbounded_channel();
        let early = Arc::new(EarlyAcks::default());
        let writer = Writer {
            early: early.clone(),
            cache: cache.clone(),
            written: Vec::new(),
            log,
            group: Group::default(),
            committed: committed.clone(),
            last_index,
            stats: stats.clone(),
            metrics,
            failed: None,
        };
        let (done, writer_handle) = spawn_writer(writer, rx).map_err(OpenError::Writer)?;
        Ok(Self {
            reader: LogReader { cache, disk },
            writer_handle,
            tx,
            committed,
            stats,
            writer: Some(done),
            me: None,
            early,
            progress: Arc::new(Progress::default()),
        })
    }

    /// Makes this log report the entries node `me` appends as leader
    /// flushed as soon as they are queued, so openraft replicates them
    /// while they are written ([`early`]). Whatever shows a commit must
    /// then wait on the returned handle: the state machine's apply and the
    /// commit index sent to followers.
    ///
    /// Called before openraft reads the vote: a stored committed vote for
    /// `me` is reported uncommitted. openraft 0.9 would otherwise resume
    /// leading that term at once after a restart, and a leader that died
    /// before its flush may have lost early-reported entries its followers
    /// hold: resuming, it would write other entries at the same indexes
    /// under the same leader id, which the followers take for the ones they
    /// have (Raft's log matching), and the replicas would diverge. Reported
    /// uncommitted, the vote still counts for `me` in that term, and the
    /// node leads again only after winning an election in a later one.
    pub fn report_own_entries_early(&mut self, me: NodeId) -> Arc<EarlyAcks> {
        self.me = Some(me);
        let mut c = self.reader.cache.write();
        if let Some(v) = c.vote.filter(|v| v.committed && v.leader_id.voted_for() == Some(me)) {
            c.vote = Some(Vote { committed: false, ..v });
        }
        self.early.clone()
    }

    /// How far this log's entries have got (raft/progress.rs): the log
    /// records what it appends, the network what followers accept.
    pub fn progress(&self) -> Arc<Progress> {
        self.progress.clone()
    }

    /// Resolves once the writer has stopped (after this store is dropped and
    /// its queue drained) and closed its files; await it before reopening.
    pub fn take_writer(&mut self) -> Option<WriterDone> {
        self.writer.take()
    }

    /// True when this log has ever voted or held an entry: the node has Raft
    /// state and must never be bootstrapped again.
    pub fn has_state(&self) -> bool {
        let c = self.reader.cache.read();
        c.vote.is_some() || !c.hot.is_empty() || !c.locs.is_empty() || c.last_purged.is_some()
    }

    pub fn stats(&self) -> Arc<WriterStats> {
        self.stats.clone()
    }

    /// True when `ids` are entries this node created as the current leader:
    /// its vote (durable: `cache.vote` is set after the vote's
    /// `fdatasync`) is a committed vote for itself, and the entries carry
    /// that vote's leader id (term and node). Only that leader creates
    /// entries with its id, and it is never sent entries bearing its own
    /// id, so a follower's append never qualifies.
    fn is_own(&self, c: &Cache, ids: &[LogId]) -> bool {
        let (Some(me), Some(vote)) = (self.me, c.vote) else { return false };
        vote.committed
            && vote.leader_id.voted_for() == Some(me)
            && !ids.is_empty()
            && ids.iter().all(|id| id.leader_id == vote.leader_id)
    }

    /// Queues `op` for the writer and wakes its thread.
    #[allow(clippy::result_large_err)]
    fn send(&self, op: Op) -> Result<(), StorageError> {
        self.queue(op)?;
        self.writer_handle.ring();
        Ok(())
    }

    /// Puts `op` in the writer's queue. The error type is openraft's (large,
    /// but only ever built once, when the writer is gone).
    #[allow(clippy::result_large_err)]
    fn queue(&self, op: Op) -> Result<(), StorageError> {
        self.tx.send(op).map_err(|_| StorageIOError::write_logs(AnyError::error("log writer stopped")).into())
    }

    /// Queues `op` and, when the writer is idle, writes it (with whatever
    /// queued before it) on the calling task, callbacks included, instead
    /// of waking the writer's thread and being woken by it: two thread
    /// hand-offs fewer on a follower's round trip. openraft's core awaits
    /// the flush of every append before it goes on (`append_to_log`), so
    /// it waits the same `fdatasync` either way; its worker thread blocks
    /// for it (`block_in_place` cost more than it saved, docs/PERFORMANCE.md
    /// (c) item 15). A busy writer gets it queued, as before.
    #[allow(clippy::result_large_err)]
    async fn send_inline(&self, op: Op) -> Result<(), StorageError> {
        self.queue(op)?;
        #[cfg(madsim)]
        simulated_fdatasync().await;
        match self.writer_handle.shared.try_lock() {
            Some(mut writer) => {
                // Nothing to write if the writer's thread took it meanwhile.
                if writer.drain().is_some_and(|groups| groups > 0) {
                    self.stats.inline_appends.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                }
            }
            None => self.writer_handle.ring(),
        }
        Ok(())
    }
}

/// A new, empty log directory.
fn create_empty(dir: &Path, segment_bytes: u64) -> Result<(), OpenError> {
    let io = |e| LogError::Io { path: dir.to_path_buf(), source: e };
    std::fs::create_dir_all(dir).map_err(io)?;
    SegmentLog::create_first(dir, Marks::default(), segment_bytes)?;
    if let Some(parent) = dir.parent() {
        segment::sync_dir(parent)?;
    }
    Ok(())
}

/// Copies the legacy redb log at `legacy_path` into a new log directory
/// `dir`: built beside it, made durable, then renamed into place, so a
/// crash leaves either the old log alone or the new one complete. The redb
/// file is marked moved afterwards, never deleted.
fn migrate(legacy_path: &Path, dir: &Path, segment_bytes: u64) -> Result<(), OpenError> {
    let old = legacy::read(legacy_path).map_err(|e| OpenError::Legacy(e, legacy_path.to_path_buf()))?;
    let tmp = dir.with_extension("migrating");
    let io = |p: &Path| {
        let p = p.to_path_buf();
        move |e| LogError::Io { path: p, source: e }
    };
    if tmp.exists() {
        // An earlier migration that did not finish; the redb log is intact.
        std::fs::remove_dir_all(&tmp).map_err(io(&tmp))?;
    }
    std::fs::create_dir_all(&tmp).map_err(io(&tmp))?;
    let mut log = SegmentLog::create_first(&tmp, old.marks, segment_bytes)?;
    let mut group = Group::default();
    let mut max_index = None;
    for e in old.entries.values() {
        group.push(Kind::Entry, e).map_err(|e| LogError::Corrupt {
            path: legacy_path.to_path_buf(),
            offset: 0,
            why: e.to_string(),
        })?;
        max_index = Some(e.log_id.index);
    }
    log.write(&mut group, max_index, old.marks, true)?;
    drop(log);
    std::fs::rename(&tmp, dir).map_err(io(dir))?;
    if let Some(parent) = dir.parent() {
        segment::sync_dir(parent)?;
    }
    legacy::mark_moved(legacy_path).map_err(|e| OpenError::Legacy(e, legacy_path.to_path_buf()))?;
    tracing::info!(
        from = %legacy_path.display(),
        to = %dir.display(),
        format = old.format,
        entries = old.entries.len(),
        "raft log migrated from redb to segment files"
    );
    Ok(())
}

/// The single writer: owns the segment files.
struct Writer {
    cache: Arc<RwLock<Cache>>,
    /// The entries of the group being written: id and record number.
    written: Vec<(LogId, usize)>,
    log: SegmentLog,
    group: Group,
    committed: Arc<Mutex<Option<Option<LogId>>>>,
    /// The index of the last entry written (the commit index written never
    /// passes it).
    last_index: Option<u64>,
    stats: Arc<WriterStats>,
    metrics: Arc<NodeMetrics>,
    failed: Option<String>,
    early: Arc<EarlyAcks>,
}

enum Done {
    Flushed(LogFlushed<TypeConfig>),
    Vote(oneshot::Sender<std::io::Result<()>>),
}

impl Writer {
    /// Writes `ops` as one group and acknowledges them.
    fn run(&mut self, ops: &mut Vec<Op>) {
        let mut dones = Vec::with_capacity(ops.len());
        let mut entries = 0u64;
        let mut max_index = None;
        let mut marks = self.log.marks;
        let mut purged = None;
        let mut encode_error = None;
        let mut last_index = self.last_index;
        let mut early = 0;
        self.group.clear();
        self.written.clear();
        for op in ops.drain(..) {
            let pushed = match op {
                Op::Append { records, ids, done } => {
                    match done {
                        Some(done) => dones.push(Done::Flushed(done)),
                        None => early += 1,
                    }
                    entries += ids.len() as u64;
                    let first = self.group.records();
                    self.group.extend(&records);
                    for (k, id) in ids.into_iter().enumerate() {
                        max_index = Some(id.index);
                        last_index = Some(id.index);
                        self.written.push((id, first + k));
                    }
                    Ok(())
                }
                Op::Truncate { from } => {
                    last_index = last_index.map(|l| l.min(from.saturating_sub(1)));
                    self.group.push(Kind::Truncate, &from)
                }
                Op::Purge { upto } => {
                    last_index = Some(last_index.unwrap_or(0).max(upto.index));
                    marks.last_purged = Some(upto);
                    purged = Some(upto.index);
                    self.group.push(Kind::Purge, &upto)
                }
                Op::Vote { vote, done } => {
                    dones.push(Done::Vote(done));
                    marks.vote = Some(vote);
                    self.group.push(Kind::Vote, &vote)
                }
            };
            if let Err(e) = pushed {
                encode_error.get_or_insert(e.to_string());
            }
        }
        // The latest commit index rides along, unless it is ahead of the
        // entries written (then it waits for a later group).
        {
            let mut pending = self.committed.lock();
            if let Some(c) = *pending {
                let behind = match (c, last_index) {
                    (None, _) => true,
                    (Some(c), Some(l)) => c.index <= l,
                    (Some(_), None) => false,
                };
                if behind {
                    *pending = None;
                    marks.committed = c;
                    if let Err(e) = self.group.push(Kind::Committed, &c) {
                        encode_error.get_or_insert(e.to_string());
                    }
                }
            }
        }
        let result = match (&self.failed, encode_error) {
            (Some(why), _) => Err(why.clone()),
            (None, Some(why)) => Err(why),
            (None, None) => {
                let started = tokio::time::Instant::now();
                let r = self.log.write(&mut self.group, max_index, marks, true).map_err(|e| e.to_string());
                if let Ok((seq, base)) = r {
                    self.record_places(seq, base);
                }
                let r = r.map(|_| ());
                self.metrics.log_fsync_seconds.record(started.elapsed().as_secs_f64());
                if entries > 0 {
                    self.metrics.log_write_entries.record(entries);
                }
                r
            }
        };
        match &result {
            Err(why) => {
                self.early.failed(why);
                if self.failed.is_none() {
                    tracing::error!(error = %why, "raft log write failed; refusing further writes");
                    self.failed = Some(why.clone());
                }
            }
            Ok(()) => {
                use std::sync::atomic::Ordering::Relaxed;
                self.last_index = last_index;
                self.stats.commits.fetch_add(1, Relaxed);
                self.stats.entries.fetch_add(entries, Relaxed);
                self.stats.early_appends.fetch_add(early as u64, Relaxed);
                self.early.flushed(early);
            }
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
        if let (Ok(()), Some(upto)) = (&result, purged) {
            // The purge mark is durable: segments holding only purged
            // entries can go.
            if let Err(e) = self.log.remove_purged(upto) {
                tracing::warn!(error = %e, "could not delete a purged raft log segment; it is retried at the next purge");
            }
        }
    }
}

impl Writer {
    /// Publishes where the group's entries now lie on disk, unless an entry
    /// was truncated or purged (or replaced) while it was being written,
    /// and lets memory drop what is committed and on disk.
    fn record_places(&mut self, seq: u64, base: u64) {
        let mut c = self.cache.write();
        for &(log_id, k) in &self.written {
            if c.hot.get(&log_id.index).is_some_and(|e| e.log_id == log_id) {
                c.locs.insert(log_id.index, Loc { log_id, pos: self.group.pos(k, seq, base) });
            }
        }
        c.evict();
    }
}

/// Takes up to [`MAX_GROUP`] operations: `first` and whatever else queued.
fn collect(first: Op, rx: &mut mpsc::UnboundedReceiver<Op>, ops: &mut Vec<Op>) {
    ops.push(first);
    while ops.len() < MAX_GROUP {
        match rx.try_recv() {
            Ok(op) => ops.push(op),
            Err(_) => break,
        }
    }
}

/// The writer and its queue. Whoever holds the lock writes: the writer's
/// thread, or a follower's `append` that found it idle. Operations are
/// only ever taken from the queue under the lock, so they are written in
/// the order they were queued whoever writes them.
struct Shared {
    w: Writer,
    rx: mpsc::UnboundedReceiver<Op>,
    ops: Vec<Op>,
}

impl Shared {
    /// Writes everything queued, in groups of up to [`MAX_GROUP`]: how
    /// many groups, or `None` once the queue is closed (and empty).
    fn drain(&mut self) -> Option<usize> {
        let Shared { w, rx, ops } = self;
        let mut groups = 0;
        loop {
            match rx.try_recv() {
                Ok(first) => {
                    collect(first, rx, ops);
                    w.run(ops);
                    groups += 1;
                }
                Err(mpsc::error::TryRecvError::Empty) => return Some(groups),
                Err(mpsc::error::TryRecvError::Disconnected) => return None,
            }
        }
    }
}

/// The store's side of the writer: the shared writer, and the doorbell
/// that wakes its thread for what was queued.
struct WriterHandle {
    shared: Arc<Mutex<Shared>>,
    bell: Bell,
}

#[cfg(not(madsim))]
type Bell = std::sync::mpsc::Sender<()>;
#[cfg(madsim)]
type Bell = mpsc::UnboundedSender<()>;

/// Held by the writer's thread (task): when it ends, normally or by a
/// panic, the queue closes, so a later operation fails at once ("log
/// writer stopped") instead of waiting for a writer that is gone, and what
/// was still queued is dropped, which fails its callbacks. Dropping it
/// last closes the segment files.
struct CloseOnExit(Arc<Mutex<Shared>>);

impl Drop for CloseOnExit {
    fn drop(&mut self) {
        let mut s = self.0.lock();
        s.rx.close();
        while s.rx.try_recv().is_ok() {}
    }
}

impl WriterHandle {
    fn ring(&self) {
        // Fails only once the writer has stopped; `send` has reported that.
        let _ = self.bell.send(());
    }
}

/// The writer runs on a thread of its own: a leader's write and its
/// `fdatasync` block it, never the async runtime, and no blocking pool sits
/// between the queue and the disk. It stops, closing its files, when the
/// store is dropped and the queue drained.
#[cfg(not(madsim))]
fn spawn_writer(w: Writer, rx: mpsc::UnboundedReceiver<Op>) -> std::io::Result<(WriterDone, WriterHandle)> {
    let (tx, done) = oneshot::channel();
    let shared = Arc::new(Mutex::new(Shared { w, rx, ops: Vec::new() }));
    let (bell, rung) = std::sync::mpsc::channel::<()>();
    let ours = CloseOnExit(shared.clone());
    std::thread::Builder::new().name("raft-log".into()).spawn(move || {
        loop {
            let open = rung.recv().is_ok();
            while rung.try_recv().is_ok() {}
            let more = ours.0.lock().drain().is_some();
            if !open || !more {
                break;
            }
        }
        // The store is gone (its handle went before the doorbell did):
        // this is the last reference, and dropping it closes the files.
        drop(ours);
        let _ = tx.send(());
    })?;
    Ok((done, WriterHandle { shared, bell }))
}

/// Under madsim the simulation must start no threads: the writer is a task
/// and does its IO inline (deterministic, and free on tmpfs). Each group
/// first waits a simulated `fdatasync`: what queues meanwhile joins the
/// group, and a node killed meanwhile loses the whole group, as a crash
/// loses unsynced writes. That window is where the leader's early-reported
/// entries (early.rs) are not yet on its disk, so the simulator's crashes
/// reach it. A follower's append that writes inline waits one too.
#[cfg(madsim)]
fn spawn_writer(w: Writer, rx: mpsc::UnboundedReceiver<Op>) -> std::io::Result<(WriterDone, WriterHandle)> {
    let (tx, done) = oneshot::channel();
    let shared = Arc::new(Mutex::new(Shared { w, rx, ops: Vec::new() }));
    let (bell, mut rung) = mpsc::unbounded_channel::<()>();
    let ours = CloseOnExit(shared.clone());
    tokio::spawn(async move {
        loop {
            let open = rung.recv().await.is_some();
            while rung.try_recv().is_ok() {}
            simulated_fdatasync().await;
            let more = ours.0.lock().drain().is_some();
            if !open || !more {
                break;
            }
        }
        drop(ours);
        let _ = tx.send(());
    });
    Ok((done, WriterHandle { shared, bell }))
}

/// 50-400 µs of virtual time, drawn from the seed.
#[cfg(madsim)]
async fn simulated_fdatasync() {
    let fsync = madsim::rand::Rng::gen_range(&mut madsim::rand::thread_rng(), 50..400);
    tokio::time::sleep(std::time::Duration::from_micros(fsync)).await;
}

/// Entries in `range`, from memory or, for older ones, from disk. Stops at
/// the end of the log.
#[allow(clippy::result_large_err)]
fn read_range<RB: RangeBounds<u64>>(
    cache: &RwLock<Cache>,
    disk: &Disk,
    range: RB,
) -> Result<Vec<Entry>, StorageError> {
    use std::ops::Bound;
    let mut out: Vec<Option<Entry>> = Vec::new();
    let mut from_disk = Vec::new();
    {
        let c = cache.read();
        let first =
            c.locs.first_key_value().map(|(i, _)| *i).into_iter().chain(c.hot.keys().next().copied()).min();
        let Some(first) = first else { return Ok(Vec::new()) };
        // Like a map's range: what exists of it (never before the first entry).
        let start = match range.start_bound() {
            Bound::Included(s) => *s,
            Bound::Excluded(s) => s.saturating_add(1),
            Bound::Unbounded => first,
        }
        .max(first);
        let end = match range.end_bound() {
            Bound::Included(e) => Some(*e),
            Bound::Excluded(e) => e.checked_sub(1),
            Bound::Unbounded => Some(u64::MAX),
        };
        let Some(end) = end else { return Ok(Vec::new()) };
        let mut i = start;
        while i <= end {
            if let Some(e) = c.hot.get(&i) {
                out.push(Some(e.clone()));
            } else if let Some(l) = c.locs.get(&i) {
                from_disk.push((out.len(), *l));
                out.push(None);
            } else {
                break;
            }
            // The last possible index ends the log too.
            let Some(next) = i.checked_add(1) else { break };
            i = next;
        }
    }
    for (slot, loc) in from_disk {
        let e =
            disk.read(loc).map_err(|e| StorageError::from(StorageIOError::read_logs(AnyError::new(&e))))?;
        out[slot] = Some(e);
    }
    Ok(out.into_iter().flatten().collect())
}

impl RaftLogReader<TypeConfig> for LogReader {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry>, StorageError> {
        read_range(&self.cache, &self.disk, range)
    }
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry>, StorageError> {
        self.reader.try_get_log_entries(range).await
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = LogReader;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, StorageError> {
        let c = self.reader.cache.read();
        Ok(LogState { last_purged_log_id: c.last_purged, last_log_id: c.last_log_id() })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.reader.clone()
    }

    async fn save_vote(&mut self, vote: &Vote) -> Result<(), StorageError> {
        let (done, rx) = oneshot::channel();
        self.send(Op::Vote { vote: *vote, done })?;
        let flushed = rx.await.map_err(|_| std::io::Error::other("log writer stopped"));
        flushed.and_then(|r| r).map_err(|e| StorageIOError::write_vote(AnyError::new(&e)))?;
        // Visible only once durable: a vote is a promise to other nodes.
        self.reader.cache.write().vote = Some(*vote);
        Ok(())
    }

    async fn read_vote(&mut self) -> Result<Option<Vote>, StorageError> {
        Ok(self.reader.cache.read().vote)
    }

    async fn save_committed(&mut self, committed: Option<LogId>) -> Result<(), StorageError> {
        {
            let mut c = self.reader.cache.write();
            c.committed = committed;
            c.evict();
        }
        if let Some(c) = committed {
            self.stats.committed.store(c.index, std::sync::atomic::Ordering::Relaxed);
        }
        *self.committed.lock() = Some(committed);
        Ok(())
    }

    async fn read_committed(&mut self) -> Result<Option<LogId>, StorageError> {
        Ok(self.reader.cache.read().committed)
    }

    async fn append<I>(&mut self, entries: I, callback: LogFlushed<TypeConfig>) -> Result<(), StorageError>
    where
        I: IntoIterator<Item = Entry> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        // Encoded here, once: memory keeps the entries, the writer gets
        // their bytes (no copy of an entry is ever made).
        let entries: Vec<Entry> = entries.into_iter().collect();
        let mut records = Group::default();
        let mut ids = Vec::with_capacity(entries.len());
        for e in &entries {
            records
                .push(Kind::Entry, e)
                .map_err(|err| StorageIOError::write_log_entry(e.log_id, AnyError::new(&err)))?;
            ids.push(e.log_id);
        }
        let early = {
            let mut c = self.reader.cache.write();
            let before = c.last_log_id();
            let early = self.is_own(&c, &ids);
            if early {
                if let Some(first) = ids.first() {
                    self.early.reported(first.index, before);
                }
            }
            for e in entries {
                c.hot.insert(e.log_id.index, e);
            }
            early
        };
        if let Some(last) = ids.last() {
            self.progress.appended(last.index);
        }
        if early {
            let sent = self.send(Op::Append { records, ids, done: None });
            match &sent {
                Ok(()) => callback.log_io_completed(Ok(())),
                // The writer is gone: these entries will never be written,
                // and whatever waits for them must not wait forever.
                Err(_) => self.early.failed("log writer stopped"),
            }
            sent
        } else {
            self.send_inline(Op::Append { records, ids, done: Some(callback) }).await
        }
    }

    async fn truncate(&mut self, log_id: LogId) -> Result<(), StorageError> {
        self.reader.cache.write().truncate(log_id.index);
        self.send(Op::Truncate { from: log_id.index })
    }

    async fn purge(&mut self, log_id: LogId) -> Result<(), StorageError> {
        self.reader.cache.write().purge(Some(log_id));
        self.send(Op::Purge { upto: log_id })
    }
}
