//! The Raft log on disk: append-only segment files of checksummed records.
//!
//! A log directory holds segments named by a sequence number
//! (`0000000000000001.seg`, ...). Each is preallocated (so an `fdatasync`
//! after an append flushes data, not a growing file size) and starts with a
//! 32-byte header:
//!
//! | bytes | field |
//! |---|---|
//! | 0..8 | magic `BXRAFTLG` |
//! | 8..10 | layout version ([`LAYOUT`]), `u16` LE |
//! | 10..12 | format version of the records' payloads ([`format::CURRENT`]) |
//! | 12..16 | zero |
//! | 16..24 | the segment's sequence number |
//! | 24..32 | xxh3-64 of bytes 0..24 |
//!
//! Records follow, back to back:
//!
//! | bytes | field |
//! |---|---|
//! | 0..8 | xxh3-64, seeded with the segment's sequence number, of bytes 8.. of the record |
//! | 8..12 | payload length, `u32` LE (never 0) |
//! | 12 | kind ([`Kind`]) |
//! | 13..16 | zero |
//! | 16.. | payload (bincode) |
//!
//! A segment's first record is a checkpoint of the vote, committed and purge
//! marks as they were when it was created, so older segments can be deleted
//! once every entry in them is purged (oldest first, never one from the
//! middle: a later truncation must never resurrect entries). Replay reads
//! the segments in order and applies each record. The preallocated space
//! reads as zeros, so a zero length is the end of the written log. In the
//! last segment, the first record that is cut short or fails its checksum is
//! a write torn by a crash: it was never acknowledged (an append is
//! acknowledged only after the `fdatasync` of the whole group it belongs
//! to), so it and everything after it are cut off and zeroed before the log
//! takes new writes. The same damage in an older segment is corruption, and
//! opening fails.
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use xxhash_rust::xxh3::xxh3_64_with_seed;

use super::super::{Entry, LogId, Vote};
use crate::codec::{self, CodecError};
use crate::format::{self, FormatError};

pub const MAGIC: [u8; 8] = *b"BXRAFTLG";
/// The layout of segment files (headers and record framing) this build
/// writes and reads.
pub const LAYOUT: u16 = 1;
pub const SEGMENT_HEADER: usize = 32;
pub const RECORD_HEADER: usize = 16;
/// The default size a segment is preallocated to.
pub const DEFAULT_SEGMENT_BYTES: u64 = 64 * 1024 * 1024;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Kind {
    Entry = 1,
    Truncate = 2,
    Purge = 3,
    Vote = 4,
    Committed = 5,
    Checkpoint = 6,
}

impl Kind {
    fn from_u8(b: u8) -> Option<Kind> {
        Some(match b {
            1 => Kind::Entry,
            2 => Kind::Truncate,
            3 => Kind::Purge,
            4 => Kind::Vote,
            5 => Kind::Committed,
            6 => Kind::Checkpoint,
            _ => return None,
        })
    }
}

/// The vote, committed and purge marks: what a checkpoint record holds.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Marks {
    pub vote: Option<Vote>,
    pub committed: Option<LogId>,
    pub last_purged: Option<LogId>,
}

/// One decoded record.
#[derive(Debug)]
pub enum Record {
    Entry(Entry),
    Truncate(u64),
    Purge(LogId),
    Vote(Vote),
    Committed(Option<LogId>),
    Checkpoint(Marks),
}

#[derive(Debug, thiserror::Error)]
pub enum LogError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{path} is corrupt at byte {offset}: {why}")]
    Corrupt { path: PathBuf, offset: u64, why: String },
    #[error(transparent)]
    Format(#[from] FormatError),
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> LogError + '_ {
    move |source| LogError::Io { path: path.to_path_buf(), source }
}

/// Where a record lies: its segment, the offset of its header, and its
/// payload length.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Pos {
    pub seq: u64,
    pub offset: u64,
    pub len: u32,
}

/// Reads and checks the entry record at `pos` of `file` (segment `pos.seq`).
pub fn read_entry(file: &File, path: &Path, pos: Pos) -> Result<Entry, LogError> {
    let mut buf = vec![0u8; RECORD_HEADER + pos.len as usize];
    file.read_exact_at(&mut buf, pos.offset).map_err(io_err(path))?;
    let corrupt = |why: String| LogError::Corrupt { path: path.to_path_buf(), offset: pos.offset, why };
    let sum = u64::from_le_bytes(buf[..8].try_into().unwrap());
    let len = u32::from_le_bytes(buf[8..12].try_into().unwrap());
    if len != pos.len || buf[12] != Kind::Entry as u8 || xxh3_64_with_seed(&buf[8..], pos.seq) != sum {
        return Err(corrupt("the entry record read back fails its checks".into()));
    }
    codec::decode_trusted(&buf[RECORD_HEADER..]).map_err(|e| corrupt(e.to_string()))
}

/// The path of segment `seq` in `dir`.
pub fn segment_path(dir: &Path, seq: u64) -> PathBuf {
    dir.join(segment_name(seq))
}

/// Records encoded for one write, in order.
#[derive(Default)]
pub struct Group {
    buf: Vec<u8>,
    starts: Vec<usize>,
}

impl Group {
    pub fn clear(&mut self) {
        self.buf.clear();
        self.starts.clear();
    }

    pub fn is_empty(&self) -> bool {
        self.starts.is_empty()
    }

    pub fn len(&self) -> usize {
        self.buf.len()
    }

    /// Appends a record of `kind` holding the bincode of `v`.
    pub fn push<T: Serialize>(&mut self, kind: Kind, v: &T) -> Result<(), CodecError> {
        let start = self.buf.len();
        self.buf.extend_from_slice(&[0u8; RECORD_HEADER]);
        let n = match codec::encode_into(v, &mut self.buf) {
            Ok(n) => n,
            Err(e) => {
                self.buf.truncate(start);
                return Err(e);
            }
        };
        let len = u32::try_from(n).map_err(|_| CodecError::Encode(format!("a {n}-byte log record")))?;
        self.buf[start + 8..start + 12].copy_from_slice(&len.to_le_bytes());
        self.buf[start + 12] = kind as u8;
        self.starts.push(start);
        Ok(())
    }

    /// Appends `other`'s records (encoded elsewhere) to this group.
    pub fn extend(&mut self, other: &Group) {
        let base = self.buf.len();
        self.buf.extend_from_slice(&other.buf);
        self.starts.extend(other.starts.iter().map(|s| s + base));
    }

    /// Where record `k` of this group lies once the group is written at
    /// `base` of segment `seq`.
    pub fn pos(&self, k: usize, seq: u64, base: u64) -> Pos {
        let s = self.starts[k];
        let len = u32::from_le_bytes(self.buf[s + 8..s + 12].try_into().unwrap());
        Pos { seq, offset: base + s as u64, len }
    }

    /// How many records the group holds.
    pub fn records(&self) -> usize {
        self.starts.len()
    }

    /// Fills in every record's checksum for segment `seq`.
    fn seal(&mut self, seq: u64) {
        for &s in &self.starts {
            let len = u32::from_le_bytes(self.buf[s + 8..s + 12].try_into().unwrap()) as usize;
            let sum = xxh3_64_with_seed(&self.buf[s + 8..s + RECORD_HEADER + len], seq);
            self.buf[s..s + 8].copy_from_slice(&sum.to_le_bytes());
        }
    }
}

fn segment_name(seq: u64) -> String {
    format!("{seq:016x}.seg")
}

fn header(seq: u64) -> [u8; SEGMENT_HEADER] {
    let mut h = [0u8; SEGMENT_HEADER];
    h[..8].copy_from_slice(&MAGIC);
    h[8..10].copy_from_slice(&LAYOUT.to_le_bytes());
    h[10..12].copy_from_slice(&format::CURRENT.to_le_bytes());
    h[16..24].copy_from_slice(&seq.to_le_bytes());
    let sum = xxh3_64_with_seed(&h[..24], 0);
    h[24..32].copy_from_slice(&sum.to_le_bytes());
    h
}

/// The segments in `dir`, by sequence number.
fn list(dir: &Path) -> Result<Vec<(u64, PathBuf)>, LogError> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).map_err(io_err(dir))? {
        let e = e.map_err(io_err(dir))?;
        let name = e.file_name();
        let Some(name) = name.to_str() else { continue };
        let Some(stem) = name.strip_suffix(".seg") else { continue };
        if let Ok(seq) = u64::from_str_radix(stem, 16) {
            if stem.len() == 16 {
                out.push((seq, e.path()));
            }
        }
    }
    out.sort();
    Ok(out)
}

/// What replaying a log directory found.
pub struct Replayed {
    /// Each segment's sequence number and the highest entry index in it.
    pub segments: Vec<(u64, Option<u64>)>,
    /// Where the last segment's records end.
    pub end: u64,
    /// Bytes cut off the last segment's tail (a torn write), if any.
    pub cut: Option<(u64, String)>,
}

/// Reads every segment in `dir` in order, handing each record and where it
/// lies to `apply`. Cuts a torn tail off the last segment (see the module
/// docs).
pub fn replay(dir: &Path, mut apply: impl FnMut(Record, Pos)) -> Result<Replayed, LogError> {
    let segs = list(dir)?;
    let mut out = Replayed { segments: Vec::new(), end: 0, cut: None };
    let n = segs.len();
    for (i, (seq, path)) in segs.into_iter().enumerate() {
        let last = i + 1 == n;
        // Segments are preallocated: read what is written, a window at a
        // time, never the whole file.
        let file = File::open(&path).map_err(io_err(&path))?;
        let mut w = Window::new(file).map_err(io_err(&path))?;
        let corrupt =
            |offset: usize, why: String| LogError::Corrupt { path: path.clone(), offset: offset as u64, why };
        // The header. A last segment whose header never reached the disk
        // (a crash while rolling over) holds nothing acknowledged.
        let head: Option<[u8; SEGMENT_HEADER]> =
            w.get(0, SEGMENT_HEADER).map_err(io_err(&path))?.map(|h| h.try_into().unwrap());
        let head_ok = head.is_some_and(|h| {
            h[..8] == MAGIC
                && u64::from_le_bytes(h[24..32].try_into().unwrap()) == xxh3_64_with_seed(&h[..24], 0)
        });
        let Some(head) = head.filter(|_| head_ok) else {
            if last && head.is_none_or(|h| h.iter().all(|b| *b == 0)) {
                std::fs::remove_file(&path).map_err(io_err(&path))?;
                tracing::warn!(path = %path.display(), "removed a log segment whose header was never written (a crash while rolling over)");
                break;
            }
            return Err(corrupt(0, "bad segment header".into()));
        };
        let layout = u16::from_le_bytes([head[8], head[9]]);
        if layout != LAYOUT {
            return Err(corrupt(8, format!("segment layout {layout}; this build reads layout {LAYOUT}")));
        }
        format::check(
            &format!("raft log segment {}", path.display()),
            u16::from_le_bytes([head[10], head[11]]),
        )?;
        let found_seq = u64::from_le_bytes(head[16..24].try_into().unwrap());
        if found_seq != seq {
            return Err(corrupt(16, format!("header names segment {found_seq}")));
        }
        let mut max_index = None;
        let mut off = SEGMENT_HEADER;
        let mut torn = None;
        while let Some(h) = w.get(off, RECORD_HEADER).map_err(io_err(&path))? {
            let h: [u8; RECORD_HEADER] = h.try_into().unwrap();
            let sum = u64::from_le_bytes(h[..8].try_into().unwrap());
            let len = u32::from_le_bytes(h[8..12].try_into().unwrap()) as usize;
            if len == 0 && h.iter().all(|b| *b == 0) {
                break; // the end of what was written
            }
            let end = off + RECORD_HEADER + len;
            let kind = Kind::from_u8(h[12]);
            let body = match (kind, h[13..16] == [0, 0, 0], len) {
                (Some(_), true, 1..) => w.get(off + 8, 8 + len).map_err(io_err(&path))?,
                _ => None,
            };
            let Some(body) = body else {
                torn = Some("a damaged record header");
                break;
            };
            if xxh3_64_with_seed(body, seq) != sum {
                torn = Some("a checksum mismatch");
                break;
            }
            let payload = &body[8..];
            let bad =
                |e: CodecError| corrupt(off, format!("record passes its checksum but does not decode: {e}"));
            let rec = match kind.unwrap() {
                Kind::Entry => {
                    let e: Entry = codec::decode_trusted(payload).map_err(bad)?;
                    max_index = Some(max_index.unwrap_or(0).max(e.log_id.index));
                    Record::Entry(e)
                }
                Kind::Truncate => Record::Truncate(codec::decode_trusted(payload).map_err(bad)?),
                Kind::Purge => Record::Purge(codec::decode_trusted(payload).map_err(bad)?),
                Kind::Vote => Record::Vote(codec::decode_trusted(payload).map_err(bad)?),
                Kind::Committed => Record::Committed(codec::decode_trusted(payload).map_err(bad)?),
                Kind::Checkpoint => Record::Checkpoint(codec::decode_trusted(payload).map_err(bad)?),
            };
            apply(rec, Pos { seq, offset: off as u64, len: len as u32 });
            off = end;
        }
        if let Some(why) = torn {
            if !last {
                return Err(corrupt(off, format!("{why} in a segment that is not the last")));
            }
            out.cut = Some(((w.len - off) as u64, why.to_string()));
        }
        out.segments.push((seq, max_index));
        out.end = off as u64;
    }
    Ok(out)
}

/// Reads a file through a moving window of at least 1 MiB.
struct Window {
    file: File,
    len: usize,
    start: usize,
    buf: Vec<u8>,
}

impl Window {
    fn new(file: File) -> io::Result<Self> {
        let len = usize::try_from(file.metadata()?.len()).map_err(io::Error::other)?;
        Ok(Self { file, len, start: 0, buf: Vec::new() })
    }

    /// Bytes `off..off + n`, or `None` past the end of the file.
    fn get(&mut self, off: usize, n: usize) -> io::Result<Option<&[u8]>> {
        if off + n > self.len {
            return Ok(None);
        }
        if off < self.start || off + n > self.start + self.buf.len() {
            let want = n.max(1 << 20).min(self.len - off);
            self.buf.resize(want, 0);
            self.file.read_exact_at(&mut self.buf, off as u64)?;
            self.start = off;
        }
        Ok(Some(&self.buf[off - self.start..off - self.start + n]))
    }
}

/// Appends groups to the newest segment, rolls over to a new one when a
/// group does not fit, and deletes old segments once purged.
pub struct SegmentLog {
    dir: PathBuf,
    file: File,
    path: PathBuf,
    seq: u64,
    offset: u64,
    size: u64,
    segment_bytes: u64,
    /// Older segments, oldest first, with the highest entry index in each.
    older: Vec<(u64, Option<u64>)>,
    /// The highest entry index in the current segment.
    max_index: Option<u64>,
    /// The marks as written so far (the next segment's checkpoint).
    pub marks: Marks,
}

impl SegmentLog {
    /// Opens `dir` for appending after [`replay`] found `found` and the
    /// marks `marks`; creates the first segment of an empty directory.
    pub fn open(dir: &Path, found: Replayed, marks: Marks, segment_bytes: u64) -> Result<Self, LogError> {
        let mut segments = found.segments;
        let Some((seq, max_index)) = segments.pop() else {
            return Self::create(dir, 1, marks, segment_bytes, Vec::new());
        };
        let path = dir.join(segment_name(seq));
        let file = OpenOptions::new().read(true).write(true).open(&path).map_err(io_err(&path))?;
        if let Some((bytes, why)) = &found.cut {
            tracing::warn!(path = %path.display(), offset = found.end, bytes, why, "cut a torn write off the end of the raft log (never acknowledged)");
        }
        // Whatever lies beyond the end (a torn group, or pages of one that
        // reached the disk out of order) is zeroed, so no stale record can
        // ever line up behind new ones.
        let size = file.metadata().map_err(io_err(&path))?.len().max(segment_bytes);
        file.set_len(found.end).map_err(io_err(&path))?;
        preallocate(&file, size).map_err(io_err(&path))?;
        file.sync_all().map_err(io_err(&path))?;
        Ok(Self {
            dir: dir.to_path_buf(),
            file,
            path,
            seq,
            offset: found.end,
            size,
            segment_bytes,
            older: segments,
            max_index,
            marks,
        })
    }

    /// Creates the first segment of a new log directory.
    pub fn create_first(dir: &Path, marks: Marks, segment_bytes: u64) -> Result<Self, LogError> {
        Self::create(dir, 1, marks, segment_bytes, Vec::new())
    }

    fn create(
        dir: &Path,
        seq: u64,
        marks: Marks,
        segment_bytes: u64,
        older: Vec<(u64, Option<u64>)>,
    ) -> Result<Self, LogError> {
        let path = dir.join(segment_name(seq));
        let file =
            OpenOptions::new().read(true).write(true).create_new(true).open(&path).map_err(io_err(&path))?;
        preallocate(&file, segment_bytes).map_err(io_err(&path))?;
        let mut log = Self {
            dir: dir.to_path_buf(),
            file,
            path,
            seq,
            offset: 0,
            size: segment_bytes,
            segment_bytes,
            older,
            max_index: None,
            marks,
        };
        let mut first = Group::default();
        first.push(Kind::Checkpoint, &marks).map_err(|e| log.corrupt_encode(e))?;
        first.seal(seq);
        let mut bytes = header(seq).to_vec();
        bytes.extend_from_slice(&first.buf);
        log.file.write_all_at(&bytes, 0).map_err(io_err(&log.path))?;
        log.offset = bytes.len() as u64;
        log.file.sync_data().map_err(io_err(&log.path))?;
        sync_dir(dir)?;
        Ok(log)
    }

    fn corrupt_encode(&self, e: CodecError) -> LogError {
        LogError::Corrupt { path: self.path.clone(), offset: self.offset, why: e.to_string() }
    }

    /// Writes `group` (its marks and highest entry index given), then
    /// `fdatasync`s it if `sync`. Nothing in it counts as durable before
    /// this returns `Ok` with `sync`. Returns the segment and offset the
    /// group was written at.
    pub fn write(
        &mut self,
        group: &mut Group,
        max_index: Option<u64>,
        marks: Marks,
        sync: bool,
    ) -> Result<(u64, u64), LogError> {
        if group.is_empty() {
            return Ok((self.seq, self.offset));
        }
        if self.offset + group.len() as u64 > self.size {
            self.roll(group.len() as u64)?;
        }
        group.seal(self.seq);
        let at = (self.seq, self.offset);
        self.file.write_all_at(&group.buf, self.offset).map_err(io_err(&self.path))?;
        self.offset += group.len() as u64;
        if sync {
            self.file.sync_data().map_err(io_err(&self.path))?;
        }
        if let Some(i) = max_index {
            self.max_index = Some(self.max_index.unwrap_or(0).max(i));
        }
        self.marks = marks;
        Ok(at)
    }

    /// Starts the next segment, big enough for a group of `need` bytes.
    fn roll(&mut self, need: u64) -> Result<(), LogError> {
        // What the current segment holds is durable before the next one
        // begins (a group that needed no fsync may still be in flight).
        self.file.sync_data().map_err(io_err(&self.path))?;
        let mut older = std::mem::take(&mut self.older);
        older.push((self.seq, self.max_index));
        let usual = self.segment_bytes;
        let bytes = usual.max(need + (SEGMENT_HEADER + 256) as u64);
        *self = Self::create(&self.dir, self.seq + 1, self.marks, bytes, older)?;
        // An oversized group got a segment of its own size; the next ones
        // are the usual size again.
        self.segment_bytes = usual;
        Ok(())
    }

    /// Deletes the oldest segments whose entries are all purged (`upto`
    /// is durable). Returns how many.
    pub fn remove_purged(&mut self, upto: u64) -> Result<usize, LogError> {
        let n = self.older.iter().take_while(|(_, max)| max.is_none_or(|m| m <= upto)).count();
        for (seq, _) in self.older.drain(..n) {
            let path = self.dir.join(segment_name(seq));
            match std::fs::remove_file(&path) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(io_err(&path)(e)),
            }
        }
        Ok(n)
    }

    /// Sequence numbers of the segments on disk, oldest first.
    pub fn segments(&self) -> Vec<u64> {
        self.older.iter().map(|(s, _)| *s).chain([self.seq]).collect()
    }
}

/// Allocates `len` bytes for `file` without writing them (they read as zeros).
fn preallocate(file: &File, len: u64) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    let len = libc::off_t::try_from(len).map_err(|_| io::Error::other("segment too large"))?;
    // SAFETY: a plain syscall on a file descriptor we own.
    let r = unsafe { libc::fallocate(file.as_raw_fd(), 0, 0, len) };
    if r == 0 {
        return Ok(());
    }
    let e = io::Error::last_os_error();
    if e.raw_os_error() == Some(libc::EOPNOTSUPP) {
        // A file system without fallocate: a sparse file still reads as zeros.
        return file.set_len(len as u64);
    }
    Err(e)
}

/// Makes a created or removed file in `dir` durable.
pub fn sync_dir(dir: &Path) -> Result<(), LogError> {
    File::open(dir).and_then(|d| d.sync_all()).map_err(io_err(dir))
}

#[cfg(test)]
mod tests {
    use super::super::Cache;
    use super::*;
    use openraft::{CommittedLeaderId, EntryPayload};

    fn entry(term: u64, index: u64) -> Entry {
        Entry { log_id: LogId::new(CommittedLeaderId::new(term, 1), index), payload: EntryPayload::Blank }
    }

    fn load(dir: &Path) -> Result<(Cache, Replayed), LogError> {
        let mut c = Cache::default();
        let r = replay(dir, |rec, pos| c.replay_record(rec, pos))?;
        Ok((c, r))
    }

    fn indexes(c: &Cache) -> Vec<(u64, u64)> {
        c.locs.values().map(|l| (l.log_id.leader_id.term, l.log_id.index)).collect()
    }

    /// Writes `groups` groups of 3 entries each (term 1), one vote in the
    /// third; returns each record's end offset and what it added.
    fn write_groups(dir: &Path, groups: u64) -> (Vec<(u64, Option<u64>)>, u64) {
        let mut log = SegmentLog::create_first(dir, Marks::default(), 1 << 20).unwrap();
        let mut ends = Vec::new();
        let mut g = Group::default();
        for gi in 0..groups {
            g.clear();
            let mut added = Vec::new();
            for k in 0..3 {
                let i = gi * 3 + k + 1;
                g.push(Kind::Entry, &entry(1, i)).unwrap();
                added.push(Some(i));
                if gi == 2 && k == 0 {
                    g.push(Kind::Vote, &Vote::new(2, 1)).unwrap();
                    added.push(None);
                }
            }
            let base = log.offset;
            let starts = g.starts.clone();
            log.write(&mut g, Some(gi * 3 + 3), log.marks, true).unwrap();
            for (n, s) in starts.iter().enumerate() {
                let end = starts.get(n + 1).map(|x| base + *x as u64).unwrap_or(log.offset);
                let _ = s;
                ends.push((end, added[n]));
            }
        }
        (ends, log.offset)
    }

    fn seg(dir: &Path) -> PathBuf {
        dir.join(segment_name(1))
    }

    /// A crash can leave any prefix of the last write, and pages of it out
    /// of order. Whatever it left, replay applies exactly the records that
    /// were whole before the first damaged one, and never anything after.
    #[test]
    fn torn_tails_are_cut_and_never_applied() {
        let src = tempfile::tempdir().unwrap();
        let (ends, written) = write_groups(src.path(), 5);
        let full = std::fs::read(seg(src.path())).unwrap();
        let first_group_end = ends[2].0;
        for cut in first_group_end..=written {
            for fill in [0u8, 0xA5] {
                let dir = tempfile::tempdir().unwrap();
                let mut bytes = full.clone();
                for b in &mut bytes[cut as usize..written as usize] {
                    *b = fill;
                }
                std::fs::write(seg(dir.path()), &bytes).unwrap();
                let (c, r) = load(dir.path()).unwrap();
                // A record is whole if the damage left its bytes as they were
                // (a zero at the end of a payload survives zero-filling).
                let intact =
                    |end: u64| end <= cut || full[cut as usize..end as usize].iter().all(|b| *b == fill);
                let whole: Vec<_> = ends.iter().take_while(|(e, _)| intact(*e)).collect();
                let want: Vec<u64> = whole.iter().filter_map(|(_, i)| *i).collect();
                let got: Vec<u64> = c.locs.keys().copied().collect();
                assert_eq!(got, want, "cut at {cut}, fill {fill:#x}");
                let voted = whole.iter().any(|(_, i)| i.is_none());
                assert_eq!(c.vote.is_some(), voted, "cut at {cut}");
                let valid_end = whole.last().map(|(e, _)| *e).unwrap_or(0);
                assert_eq!(r.end, valid_end, "cut at {cut}, fill {fill:#x}");
                let clean = bytes[valid_end as usize..].iter().all(|b| *b == 0);
                assert_eq!(r.cut.is_some(), !clean, "cut at {cut}, fill {fill:#x}");
            }
        }
    }

    /// After a cut, new records go where the damage began, and the rest of
    /// the segment is zeroed: a stale record that happened to line up
    /// behind a new one of the same size is never read back.
    #[test]
    fn stale_records_behind_a_cut_never_come_back() {
        let dir = tempfile::tempdir().unwrap();
        let (ends, _) = write_groups(dir.path(), 5);
        // The page with the first record of group 4 never reached the disk;
        // the rest of group 4 and group 5 did.
        let (start, end) = (ends[9].0, ends[10].0);
        let mut bytes = std::fs::read(seg(dir.path())).unwrap();
        for b in &mut bytes[start as usize..end as usize] {
            *b = 0;
        }
        std::fs::write(seg(dir.path()), &bytes).unwrap();

        let (c, found) = load(dir.path()).unwrap();
        assert_eq!(c.locs.keys().copied().max(), Some(9), "only the groups before the hole");
        let mut log = SegmentLog::open(dir.path(), found, c.marks(), 1 << 20).unwrap();
        // A new record of exactly the missing one's size, at its place.
        let mut g = Group::default();
        g.push(Kind::Entry, &entry(3, 10)).unwrap();
        assert_eq!(g.len() as u64, end - start);
        log.write(&mut g, Some(10), log.marks, true).unwrap();
        drop(log);

        let (c, r) = load(dir.path()).unwrap();
        assert!(r.cut.is_none());
        let want: Vec<(u64, u64)> = (1..=9).map(|i| (1, i)).chain([(3, 10)]).collect();
        assert_eq!(indexes(&c), want);
    }

    /// Damage anywhere but the last segment's tail is corruption: opening
    /// fails with the file and offset, nothing is cut.
    #[test]
    fn damage_in_an_older_segment_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let mut log = SegmentLog::create_first(dir.path(), Marks::default(), 4096).unwrap();
        let mut g = Group::default();
        for i in 1..=1000 {
            g.clear();
            g.push(Kind::Entry, &entry(1, i)).unwrap();
            log.write(&mut g, Some(i), log.marks, false).unwrap();
        }
        assert!(log.segments().len() > 2, "rolled over: {:?}", log.segments());
        drop(log);
        let path = seg(dir.path());
        let mut bytes = std::fs::read(&path).unwrap();
        bytes[SEGMENT_HEADER + 40] ^= 0x10;
        std::fs::write(&path, &bytes).unwrap();
        match load(dir.path()) {
            Err(LogError::Corrupt { path: p, .. }) => assert_eq!(p, path),
            Err(e) => panic!("unexpected error {e}"),
            Ok(_) => panic!("damage in an older segment was accepted"),
        }
    }

    /// Segments roll over, purged ones are deleted oldest first, and the
    /// vote, commit and purge marks survive in the next segment's checkpoint.
    #[test]
    fn purged_segments_go_and_marks_survive_them() {
        let dir = tempfile::tempdir().unwrap();
        let mut log = SegmentLog::create_first(dir.path(), Marks::default(), 4096).unwrap();
        let mut g = Group::default();
        let mut marks = log.marks;
        g.push(Kind::Vote, &Vote::new(5, 2)).unwrap();
        marks.vote = Some(Vote::new(5, 2));
        log.write(&mut g, None, marks, true).unwrap();
        for i in 1..=1000 {
            g.clear();
            g.push(Kind::Entry, &entry(5, i)).unwrap();
            log.write(&mut g, Some(i), log.marks, false).unwrap();
        }
        let before = log.segments();
        assert!(before.len() > 3);
        let upto = LogId::new(CommittedLeaderId::new(5, 1), 800);
        g.clear();
        g.push(Kind::Purge, &upto).unwrap();
        marks = log.marks;
        marks.last_purged = Some(upto);
        marks.committed = Some(upto);
        g.push(Kind::Committed, &Some(upto)).unwrap();
        log.write(&mut g, None, marks, true).unwrap();
        let removed = log.remove_purged(800).unwrap();
        assert!(removed > 0 && removed < before.len());
        let after = log.segments();
        assert_eq!(after, before[removed..].to_vec(), "oldest first");
        drop(log);

        let (c, _) = load(dir.path()).unwrap();
        assert_eq!(c.vote, Some(Vote::new(5, 2)));
        assert_eq!(c.last_purged, Some(upto));
        assert_eq!(c.committed, Some(upto));
        assert_eq!(c.locs.keys().copied().collect::<Vec<_>>(), (801..=1000).collect::<Vec<_>>());
    }

    /// A log written with a newer record format is refused by name.
    #[test]
    fn a_newer_segment_format_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        drop(SegmentLog::create_first(dir.path(), Marks::default(), 4096).unwrap());
        let path = seg(dir.path());
        let mut bytes = std::fs::read(&path).unwrap();
        bytes[10..12].copy_from_slice(&99u16.to_le_bytes());
        let sum = xxh3_64_with_seed(&bytes[..24], 0);
        bytes[24..32].copy_from_slice(&sum.to_le_bytes());
        std::fs::write(&path, &bytes).unwrap();
        let Err(e) = load(dir.path()) else { panic!("a newer format was accepted") };
        assert!(e.to_string().contains("version 99"), "{e}");
    }
}
