//! What the fuzz targets (`fuzz/`, docs/FUZZING.md) found, kept as plain
//! tests so `cargo test` checks it without a fuzzer: the inputs libFuzzer
//! saved (`tests/fuzz-crashes/`, framed as their target frames them: a
//! first byte choosing the message or mode, then the bytes), and small
//! hand-made cases of the same bugs.
//!
//! Decoders: a length field claiming more than the input holds made bincode
//! allocate the claimed size (up to the 64 MiB limit for a message, 4 GiB
//! for a snapshot image) before it found the bytes missing. Checked here by
//! the largest single allocation a decode makes.
//!
//! Nesting: types that contain themselves (a batch of commands, an error
//! whose source is an error) decoded by recursion, one level per byte or
//! two, so a few kilobytes overflowed the decoding thread's stack (the
//! fuzzer died of SIGSEGV; the inputs are made by hand here).
//!
//! The log: segments whose records pass their checksums but hold a log with
//! a hole opened as if whole; an entry or purge mark at the last possible
//! index overflowed.
use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::path::Path;

use blixard_core::codec::{self, MAX_TRUSTED_DECODE_BYTES};
use blixard_core::command::{Command, Proposal, ProposalBatch};
use blixard_core::format;
use blixard_core::raft::log_store::segment::{Group, Kind, LogError, Marks, SegmentLog};
use blixard_core::raft::log_store::{LogStore, OpenError};
use blixard_core::raft::state_machine::decode_image;
use blixard_core::raft::{Entry, LogId, TypeConfig};
use blixard_core::state::{ClusterState, StateImage};
use futures::executor::block_on;
use openraft::raft::InstallSnapshotRequest;
use openraft::storage::RaftLogStorage;
use openraft::{CommittedLeaderId, EntryPayload, RaftLogReader};
use prost::Message;

struct Largest;

thread_local! {
    static LARGEST: Cell<usize> = const { Cell::new(0) };
}

fn note(size: usize) {
    let _ = LARGEST.try_with(|l| l.set(l.get().max(size)));
}

unsafe impl GlobalAlloc for Largest {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        note(layout.size());
        unsafe { System.alloc(layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        note(layout.size());
        unsafe { System.alloc_zeroed(layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        note(new_size);
        unsafe { System.realloc(ptr, layout, new_size) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static GLOBAL: Largest = Largest;

/// The largest single allocation this thread made while running `f`.
fn largest_allocation<R>(f: impl FnOnce() -> R) -> (usize, R) {
    LARGEST.with(|l| l.set(0));
    let r = f();
    (LARGEST.with(Cell::get), r)
}

/// What an input of a few hundred bytes may make a decoder allocate at
/// most (the decode limit of small inputs is 1 MiB; see `codec`).
const SMALL_INPUT_ALLOC: usize = 1 << 20;

fn crash(name: &str) -> Vec<u8> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fuzz-crashes").join(name);
    std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// A varint length prefix claiming `n` bytes (bincode's 0xFD: a u64 follows).
fn claim(n: u64) -> Vec<u8> {
    [&[0xFD][..], &n.to_le_bytes()].concat()
}

#[test]
fn a_length_field_cannot_make_a_decoder_allocate_what_the_input_does_not_hold() {
    // One proposal (at 0, no request id) creating a VM whose name claims 1 GiB.
    let batch = [&[1u8, 0, 0, 2][..], &claim(1 << 30)].concat();
    let (largest, r) = largest_allocation(|| codec::decode::<ProposalBatch>(&batch));
    assert!(r.is_err());
    assert!(largest <= SMALL_INPUT_ALLOC, "a {}-byte batch allocated {largest} bytes", batch.len());

    // A snapshot image (trusted decode, 4 GiB limit): one node whose
    // address claims 3 GiB.
    let image = [&[1u8, 1][..], &claim(3 << 30)].concat();
    let (largest, r) = largest_allocation(|| codec::decode_trusted::<StateImage>(&image));
    assert!(r.is_err());
    assert!(largest <= SMALL_INPUT_ALLOC, "a {}-byte image allocated {largest} bytes", image.len());
    let framed = format::with_header(&image);
    let (largest, r) = largest_allocation(|| decode_image("test image", &framed));
    assert!(r.is_err());
    assert!(largest <= SMALL_INPUT_ALLOC, "a framed image allocated {largest} bytes");

    // The limit grows with the input, up to the caller's cap.
    assert_eq!(codec::limit_for(10, MAX_TRUSTED_DECODE_BYTES), 1 << 20);
    assert_eq!(codec::limit_for(1 << 20, codec::MAX_DECODE_BYTES), codec::MAX_DECODE_BYTES);
    assert_eq!(codec::limit_for(100 << 20, MAX_TRUSTED_DECODE_BYTES), 4 << 30);
}

/// The worst case of what a valid input makes bincode claim: 16 bytes per
/// input byte (one-byte varints decoded into `u128`s), at the largest input
/// of the smallest step. It still decodes.
#[test]
fn the_densest_valid_input_still_decodes() {
    // 65,533 zeros behind a 3-byte length: 65,536 bytes in all.
    let v = vec![0u128; 65_533];
    let bytes = codec::encode(&v).unwrap();
    assert_eq!(bytes.len(), 1 << 16);
    assert_eq!(codec::limit_for(bytes.len(), MAX_TRUSTED_DECODE_BYTES), 1 << 20);
    assert_eq!(codec::decode::<Vec<u128>>(&bytes).unwrap(), v);
    assert_eq!(codec::decode_trusted::<Vec<u128>>(&bytes).unwrap(), v);
}

/// An InstallSnapshot request as a node decodes it, then its image if it
/// came in one chunk (as the `raft_message` target does).
fn install_snapshot(payload: &[u8]) {
    if let Ok(r) = codec::decode::<InstallSnapshotRequest<TypeConfig>>(payload) {
        if r.offset == 0 && r.done {
            let _ = decode_image("snapshot", &r.data);
        }
    }
}

#[test]
fn the_decoder_crashes_the_fuzzers_found_are_errors() {
    // raft_message: kind 2, an InstallSnapshot request.
    let input = crash("raft_message-install-snapshot");
    assert_eq!(input[0], 2);
    let (largest, ()) = largest_allocation(|| install_snapshot(&input[1..]));
    assert!(largest <= SMALL_INPUT_ALLOC, "raft_message crash: {largest} bytes");

    // raft_envelope: flags 4 (a request, RPC 2), a protobuf RaftRequest.
    let input = crash("raft_envelope-install-snapshot");
    assert_eq!(input[0], 4);
    let envelope = blixard_proto::RaftRequest::decode(&input[1..]).expect("the envelope decodes");
    let (largest, ()) = largest_allocation(|| install_snapshot(&envelope.payload));
    assert!(largest <= SMALL_INPUT_ALLOC, "raft_envelope crash: {largest} bytes");

    // snapshot: flag 0, a state image as InstallSnapshot delivers it.
    let input = crash("snapshot-image");
    assert_eq!(input[0], 0);
    let (largest, r) = largest_allocation(|| decode_image("fuzzed image", &input[1..]));
    assert!(largest <= SMALL_INPUT_ALLOC, "snapshot crash: {largest} bytes");
    if let Ok(image) = r {
        ClusterState::new().restore(image, 1);
    }

    // proposal_apply: a proposal batch, applied.
    let input = crash("proposal_apply-batch");
    let (largest, r) = largest_allocation(|| codec::decode::<ProposalBatch>(&input));
    assert!(largest <= SMALL_INPUT_ALLOC, "proposal_apply crash: {largest} bytes");
    if let Ok(batch) = r {
        let state = ClusterState::new();
        for (i, p) in batch.0.iter().enumerate() {
            let _ = state.apply(p, i as u64 + 1);
        }
        state.check_invariants().unwrap();
    }
}

/// Runs `f` on a thread with a tokio worker's stack (2 MiB), where a node
/// decodes what its peers and clients send.
fn on_worker_stack(f: impl FnOnce() + Send + 'static) {
    std::thread::Builder::new().stack_size(2 << 20).spawn(f).unwrap().join().unwrap();
}

#[test]
fn values_nested_too_deep_are_refused_before_the_stack_overflows() {
    on_worker_stack(|| {
        // One proposal (at 0, no request id): a batch holding a batch
        // holding ... 30,000 deep (60 KB), around a DeleteVm.
        let nested = |levels: usize| {
            let mut bytes = vec![1u8, 0, 0];
            for _ in 0..levels {
                bytes.extend([8, 1]);
            }
            bytes.extend([3, 1, b'a']);
            bytes
        };
        let e = codec::decode::<ProposalBatch>(&nested(30_000)).unwrap_err();
        assert!(e.to_string().contains("nested more than"), "{e}");
        assert!(codec::decode_trusted::<ProposalBatch>(&nested(30_000)).is_err());
        // A few levels still decode (apply refuses a nested batch, but the
        // entry must decode to be refused).
        let batch = codec::decode::<ProposalBatch>(&nested(3)).unwrap();
        assert!(
            matches!(&batch.0[0].command, Command::Batch(inner) if matches!(inner[0], Command::Batch(_)))
        );

        // A leader's reply to a forwarded write: Ok((5, Err(error))), the
        // error a BatchFailed whose source is a BatchFailed ... 30,000 deep.
        let mut reply = vec![0u8, 5, 1];
        for _ in 0..30_000 {
            reply.extend([6, 0]);
        }
        reply.extend([1, 1, b'a']);
        let r = codec::decode::<blixard_core::node::ProposeReply>(&reply);
        assert!(r.unwrap_err().to_string().contains("nested more than"));
    });
    assert_eq!(codec::MAX_NESTING, 128);
}

fn log_id(term: u64, index: u64) -> LogId {
    LogId::new(CommittedLeaderId::new(term, 1), index)
}

fn entry(term: u64, index: u64) -> Entry {
    let stop = Proposal { at_ms: 1, request: None, command: Command::StopVm { name: "web-1".into() } };
    Entry { log_id: log_id(term, index), payload: EntryPayload::Normal(ProposalBatch(vec![stop])) }
}

/// A record of a log segment.
enum Record {
    Entry(Entry),
    Purge(LogId),
    Truncate(u64),
}

/// A log directory whose one segment holds `records`, written by the log's
/// own writer (so every checksum is valid).
fn write_log(dir: &Path, records: Vec<Record>) {
    let mut log = SegmentLog::create_first(dir, Marks::default(), 1 << 16).unwrap();
    let mut g = Group::default();
    for r in records {
        match r {
            Record::Entry(e) => g.push(Kind::Entry, &e).unwrap(),
            Record::Purge(upto) => g.push(Kind::Purge, &upto).unwrap(),
            Record::Truncate(from) => g.push(Kind::Truncate, &from).unwrap(),
        }
    }
    log.write(&mut g, None, log.marks, true).unwrap();
}

/// A new, empty `raft-log` directory in `tmp`.
fn log_dir(tmp: &tempfile::TempDir) -> std::path::PathBuf {
    let dir = tmp.path().join("raft-log");
    std::fs::create_dir(&dir).unwrap();
    dir
}

/// Opens the log in `dir`, reads all of it, and closes it.
fn open_and_read(dir: &Path) -> Result<Vec<LogId>, OpenError> {
    let mut store = LogStore::open(dir)?;
    let entries = block_on(store.try_get_log_entries(..)).unwrap();
    let done = store.take_writer();
    drop(store);
    if let Some(done) = done {
        let _ = block_on(done);
    }
    Ok(entries.iter().map(|e| e.log_id).collect())
}

#[test]
fn a_log_with_a_hole_is_refused_when_it_opens() {
    // Found by log_segments (flags 3: checksums made valid): entries 0 and
    // 13 and nothing between opened as a log whose last entry is 13 but
    // whose entries end at 0.
    let tmp = tempfile::tempdir().unwrap();
    let dir = log_dir(&tmp);
    write_log(&dir, vec![Record::Entry(entry(2, 0)), Record::Entry(entry(2, 13))]);
    match open_and_read(&dir) {
        Err(OpenError::Log(LogError::Corrupt { why, .. })) => assert!(why.contains("follows"), "{why}"),
        other => panic!("a log with a hole: {other:?}"),
    }

    // Log ids going back in term are refused the same way.
    let tmp = tempfile::tempdir().unwrap();
    let dir = log_dir(&tmp);
    write_log(&dir, vec![Record::Entry(entry(3, 1)), Record::Entry(entry(2, 2))]);
    assert!(matches!(open_and_read(&dir), Err(OpenError::Log(LogError::Corrupt { .. }))));

    // A whole log still opens: entries after a purge, a truncation and a
    // rewrite at a higher term.
    let tmp = tempfile::tempdir().unwrap();
    let dir = log_dir(&tmp);
    let mut records: Vec<Record> = (0..6).map(|i| Record::Entry(entry(1, i))).collect();
    records.extend([Record::Purge(log_id(1, 2)), Record::Truncate(5), Record::Entry(entry(2, 5))]);
    write_log(&dir, records);
    let ids = open_and_read(&dir).expect("a whole log opens");
    assert_eq!(ids, vec![log_id(1, 3), log_id(1, 4), log_id(2, 5)]);
}

#[test]
fn the_saved_log_crash_is_refused() {
    use xxhash_rust::xxh3::xxh3_64_with_seed;
    let input = crash("log_segments-gap");
    // Flags 3: the target gave the header and every record valid checksums.
    assert_eq!(input[0], 3);
    let mut bytes = input[1..].to_vec();
    bytes[16..24].copy_from_slice(&1u64.to_le_bytes());
    let sum = xxh3_64_with_seed(&bytes[..24], 0);
    bytes[24..32].copy_from_slice(&sum.to_le_bytes());
    let mut off = 32;
    while off + 16 <= bytes.len() {
        let len = u32::from_le_bytes(bytes[off + 8..off + 12].try_into().unwrap()) as usize;
        let end = off + 16 + len;
        if len == 0 || end > bytes.len() {
            break;
        }
        let sum = xxh3_64_with_seed(&bytes[off + 8..end], 1);
        bytes[off..off + 8].copy_from_slice(&sum.to_le_bytes());
        off = end;
    }
    let tmp = tempfile::tempdir().unwrap();
    let dir = log_dir(&tmp);
    std::fs::write(dir.join(format!("{:016x}.seg", 1)), &bytes).unwrap();
    assert!(matches!(open_and_read(&dir), Err(OpenError::Log(LogError::Corrupt { .. }))));
}

#[test]
fn the_last_possible_index_neither_overflows_nor_wraps() {
    // An entry at index u64::MAX: reading the log to its end stepped past it.
    let tmp = tempfile::tempdir().unwrap();
    let dir = log_dir(&tmp);
    write_log(&dir, vec![Record::Entry(entry(1, u64::MAX))]);
    assert_eq!(open_and_read(&dir).unwrap(), vec![log_id(1, u64::MAX)]);

    // A purge mark at u64::MAX: replaying it computed the index after it.
    let tmp = tempfile::tempdir().unwrap();
    let dir = log_dir(&tmp);
    write_log(&dir, vec![Record::Entry(entry(1, 7)), Record::Purge(log_id(1, u64::MAX))]);
    let mut store = LogStore::open(&dir).unwrap();
    let state = block_on(store.get_log_state()).unwrap();
    assert_eq!(state.last_purged_log_id, Some(log_id(1, u64::MAX)));
    assert!(block_on(store.try_get_log_entries(..)).unwrap().is_empty());
    let done = store.take_writer();
    drop(store);
    if let Some(done) = done {
        let _ = block_on(done);
    }
}
