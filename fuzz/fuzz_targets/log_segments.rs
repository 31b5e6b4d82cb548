//! Stored Raft log entries: segment files as a node finds them on disk when
//! it starts (see the layout in `raft::log_store::segment`). A flag byte
//! (bit 0: give the segment header a valid checksum, bit 1: give every
//! record a valid checksum, so mutated payloads get past the checksums and
//! reach the decoders; bit 2: two segments, split at the little-endian
//! `u16` that follows), then the bytes. `LogStore::open` must open the log
//! or fail with a typed error; once open, every entry it lists reads back,
//! and opening it again (after it cut a torn tail) finds the same log.
#![no_main]
use std::path::Path;

use blixard_core::metrics::NodeMetrics;
use blixard_core::raft::log_store::segment::{RECORD_HEADER, SEGMENT_HEADER};
use blixard_core::raft::log_store::LogStore;
use blixard_core::raft::{LogId, RaftTuning, Vote};
use futures::executor::block_on;
use libfuzzer_sys::fuzz_target;
use openraft::storage::RaftLogStorage;
use openraft::RaftLogReader;
use xxhash_rust::xxh3::xxh3_64_with_seed;

/// Gives segment `seq` a valid header checksum (and its own sequence
/// number), or valid record checksums, as the flags ask.
fn fix(bytes: &mut [u8], seq: u64, header: bool, records: bool) {
    if header && bytes.len() >= SEGMENT_HEADER {
        bytes[16..24].copy_from_slice(&seq.to_le_bytes());
        let sum = xxh3_64_with_seed(&bytes[..24], 0);
        bytes[24..32].copy_from_slice(&sum.to_le_bytes());
    }
    if records {
        let mut off = SEGMENT_HEADER;
        while off + RECORD_HEADER <= bytes.len() {
            let len = u32::from_le_bytes(bytes[off + 8..off + 12].try_into().unwrap()) as usize;
            let end = off + RECORD_HEADER + len;
            if len == 0 || end > bytes.len() {
                break;
            }
            let sum = xxh3_64_with_seed(&bytes[off + 8..end], seq);
            bytes[off..off + 8].copy_from_slice(&sum.to_le_bytes());
            off = end;
        }
    }
}

/// What a reader of the log sees: its extent, vote and entries.
#[derive(Debug, PartialEq)]
struct Seen {
    purged: Option<LogId>,
    last: Option<LogId>,
    vote: Option<Vote>,
    entries: Vec<LogId>,
}

/// Opens the log in `dir`, reads everything back, and closes it (waiting
/// for its writer to stop). `None` if it would not open.
fn open(dir: &Path) -> Option<Seen> {
    let tuning = RaftTuning { log_segment_bytes: 4096, log_hot_entries: 4, ..RaftTuning::default() };
    let mut store = LogStore::open_with(dir, &tuning, NodeMetrics::noop(0)).ok()?;
    let state = block_on(store.get_log_state()).expect("the log state of an open log");
    let vote = block_on(store.read_vote()).expect("the vote of an open log");
    let entries = block_on(store.try_get_log_entries(..)).expect("the entries of an open log");
    let ids: Vec<LogId> = entries.iter().map(|e| e.log_id).collect();
    if let (Some(first), Some(last)) = (ids.first(), ids.last()) {
        assert!(ids.windows(2).all(|w| w[1].index == w[0].index + 1), "entries out of order: {ids:?}");
        assert_eq!(Some(*last), state.last_log_id, "the last entry is not the log's last");
        assert!(state.last_purged_log_id.is_none_or(|p| p.index < first.index), "a purged entry read back");
    }
    let done = store.take_writer();
    drop(store);
    if let Some(done) = done {
        let _ = block_on(done);
    }
    Some(Seen { purged: state.last_purged_log_id, last: state.last_log_id, vote, entries: ids })
}

fuzz_target!(
    init: blixard_fuzz::init("log_segments"),
    |data: &[u8]| {
        let Some((flags, rest)) = data.split_first() else { return };
        let mut segments: Vec<Vec<u8>> = if flags & 4 != 0 && rest.len() >= 2 {
            let split = (u16::from_le_bytes([rest[0], rest[1]]) as usize).min(rest.len() - 2);
            let (a, b) = rest[2..].split_at(split);
            vec![a.to_vec(), b.to_vec()]
        } else {
            vec![rest.to_vec()]
        };
        let tmp = tempfile::tempdir_in(blixard_fuzz::scratch()).expect("a scratch dir");
        let dir = tmp.path().join("raft-log");
        std::fs::create_dir(&dir).expect("the log dir");
        for (i, bytes) in segments.iter_mut().enumerate() {
            let seq = i as u64 + 1;
            fix(bytes, seq, flags & 1 != 0, flags & 2 != 0);
            std::fs::write(dir.join(format!("{seq:016x}.seg")), &bytes).expect("write a segment");
        }
        let Some(first) = open(&dir) else { return };
        let again = open(&dir).expect("a log that opened once opens again");
        assert_eq!(first, again, "reopening the log found a different log");
    }
);
