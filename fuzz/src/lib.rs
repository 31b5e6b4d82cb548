//! What the fuzz targets share: an allocation guard, the starting state
//! that decoded commands are applied to, and the seeds (real encodings of
//! every message, file and request a target decodes).
//!
//! Seeds are built by the code under test, so they always match the
//! current formats: each target's `init` writes its seeds into its corpus
//! directory (`fuzz/corpus/<target>/` under `scripts/fuzz` and `cargo fuzz
//! run`) before libFuzzer reads it (see [`write_seeds`]).
pub mod seeds;

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::{Arc, OnceLock};

use blixard_core::command::Proposal;
use blixard_core::state::{ClusterState, StateImage};

/// The largest single allocation a target may make. Every input a target
/// is given is far smaller than this (`-max_len` in `scripts/fuzz`), so an
/// allocation beyond it came from a length field that claimed more than the
/// input holds: the guard aborts, and libFuzzer saves the input as a crash.
/// (libFuzzer's own `-malloc_limit_mb` needs a sanitizer's allocator hooks;
/// this works in the plain, stable build.)
pub const MAX_ALLOC_BYTES: usize = 16 << 20;

/// The `-max_len` given to every target by `scripts/fuzz`. The decode limit
/// of an input this small is 1 MiB (`codec::limit_for`), well under
/// [`MAX_ALLOC_BYTES`].
pub const MAX_INPUT_BYTES: usize = 64 << 10;

pub struct GuardAlloc;

unsafe impl GlobalAlloc for GuardAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        check(layout.size());
        System.alloc(layout)
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        check(layout.size());
        System.alloc_zeroed(layout)
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        check(new_size);
        System.realloc(ptr, layout, new_size)
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        System.dealloc(ptr, layout)
    }
}

fn check(size: usize) {
    if size > MAX_ALLOC_BYTES {
        // No formatting: that would allocate inside the allocator.
        let msg = b"\n==blixard-fuzz== a single allocation exceeded MAX_ALLOC_BYTES: a length field claimed more than the input holds\n";
        unsafe {
            libc::write(2, msg.as_ptr().cast(), msg.len());
        }
        std::process::abort();
    }
}

#[global_allocator]
static ALLOC: GuardAlloc = GuardAlloc;

/// What every target's `init` does: [`catch_stack_overflows`], then
/// [`write_seeds`].
pub fn init(target: &str) {
    catch_stack_overflows();
    write_seeds(target);
}

/// Makes a stack overflow a crash libFuzzer reports. Its SIGSEGV handler
/// runs on the stack that faulted, so after an overflow it cannot run and
/// the process dies without saving the input. This gives the main thread an
/// alternate signal stack and a SIGSEGV handler on it that turns the fault
/// into an abort, which libFuzzer reports like a panic, saving the input
/// (libFuzzer keeps this handler's `SA_ONSTACK` and calls it first).
pub fn catch_stack_overflows() {
    const ALT_STACK: usize = 1 << 20;
    let stack: &'static mut [u8] = Box::leak(vec![0u8; ALT_STACK].into_boxed_slice());
    unsafe {
        let ss = libc::stack_t { ss_sp: stack.as_mut_ptr().cast(), ss_flags: 0, ss_size: ALT_STACK };
        if libc::sigaltstack(&ss, std::ptr::null_mut()) != 0 {
            return;
        }
        let mut sa: libc::sigaction = std::mem::zeroed();
        sa.sa_sigaction = on_segv as *const () as usize;
        sa.sa_flags = libc::SA_SIGINFO | libc::SA_ONSTACK;
        libc::sigemptyset(&mut sa.sa_mask);
        libc::sigaction(libc::SIGSEGV, &sa, std::ptr::null_mut());
    }
}

extern "C" fn on_segv(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    let msg =
        b"\n==blixard-fuzz== SIGSEGV, most likely a stack overflow: unbounded recursion on this input\n";
    unsafe {
        libc::write(2, msg.as_ptr().cast(), msg.len());
        libc::abort();
    }
}

/// Writes `target`'s seeds into its corpus directory: the first directory
/// on the command line (libFuzzer's corpus, where `cargo fuzz run` and
/// `scripts/fuzz` put `fuzz/corpus/<target>`), unless they are there
/// already. Called from each target's `init`, which libFuzzer runs before
/// it reads the corpus. Does nothing when the target runs on files (to
/// reproduce a crash) and never fails the run: without seeds the target
/// still fuzzes.
pub fn write_seeds(target: &str) {
    let Some(dir) = std::env::args_os()
        .skip(1)
        .map(std::path::PathBuf::from)
        .find(|a| !a.as_os_str().to_string_lossy().starts_with('-') && a.is_dir())
    else {
        return;
    };
    for (name, bytes) in seeds::for_target(target) {
        let path = dir.join(format!("seed-{name}"));
        if std::fs::read(&path).ok().as_deref() != Some(&bytes[..]) {
            let _ = std::fs::write(&path, &bytes);
        }
    }
}

/// A small cluster to apply fuzzed commands to: three nodes with labels,
/// VMs placed, queued and stopped, a quota and a drain under way. Built once
/// by applying real commands; each input starts from a fresh copy of it.
pub fn base_image() -> &'static StateImage {
    static IMAGE: OnceLock<StateImage> = OnceLock::new();
    IMAGE.get_or_init(|| {
        let state = ClusterState::new();
        for (i, cmd) in seeds::setup_commands().into_iter().enumerate() {
            let p = Proposal { at_ms: 1_700_000_000_000 + i as u64, request: None, command: cmd };
            // Every setup command must apply: the seeds depend on this state.
            if let Err(e) = state.apply(&p, i as u64 + 1) {
                panic!("setup command {i} was rejected: {e}");
            }
        }
        state.image()
    })
}

/// A fresh state holding [`base_image`], after log index 100.
pub fn fresh_state() -> Arc<ClusterState> {
    let state = Arc::new(ClusterState::new());
    state.restore(base_image().clone(), 100);
    state
}

/// Applies `p` and checks what apply promises, whatever the outcome: what
/// the API edge's `validate()` refuses, apply refuses too; a rejected
/// command (or batch) leaves the state exactly as it was; afterwards the
/// state's invariants hold (indices match the tables, no node over-committed,
/// placements obey their rules).
///
/// A proposal whose request id was applied before gets that request's first
/// outcome instead (deduplication), whatever its command: only a request
/// seen for the first time is held to these rules.
pub fn apply_checked(state: &ClusterState, p: &Proposal, index: u64) {
    let retry = p.request.is_some_and(|id| state.image().requests.iter().any(|(seen, _)| *seen == id));
    let valid = p.command.validate().is_ok();
    let before = tables(state);
    let result = state.apply(p, index);
    if !valid && !retry {
        assert!(result.is_err(), "apply accepted a command that validate() refuses: {:?}", p.command);
    }
    if result.is_err() && !retry {
        assert!(tables(state) == before, "a rejected command changed the state: {:?}", p.command);
    }
    if let Err(e) = state.check_invariants() {
        panic!("invariant broken after applying {:?} (result {result:?}): {e}", p.command);
    }
}

/// The state without its dedup window (which records rejections too, by
/// design), encoded.
pub fn tables(state: &ClusterState) -> Vec<u8> {
    let mut image = state.image();
    image.requests.clear();
    blixard_core::codec::encode(&image).expect("an image encodes")
}

/// Bincode round trip: what decoded re-encodes, and decodes again to the
/// same encoding (so nothing is lost or misread between nodes).
pub fn round_trip<T>(v: &T)
where
    T: serde::Serialize + serde::de::DeserializeOwned,
{
    let once = blixard_core::codec::encode(v).expect("a decoded value encodes");
    let back: T = blixard_core::codec::decode(&once).expect("an encoding decodes");
    let twice = blixard_core::codec::encode(&back).expect("a decoded value encodes");
    assert_eq!(once, twice, "re-encoding a decoded value changed it");
}

/// Decodes `payload` as the internal RPC message of `kind` (requests 0-7,
/// replies 8-15, in `RaftRpc` order) exactly as `RaftGrpc` (requests) and
/// `PeerChannels::call` (replies) do, and goes on with what a node does next
/// where that is pure: a proposal is validated and applied, a snapshot sent
/// in one chunk is decoded as a state image.
pub fn rpc_payload(kind: u8, payload: &[u8]) {
    use blixard_core::codec::decode;
    use blixard_core::node::election::{PreVoteReply, PreVoteRequest};
    use blixard_core::node::forwarder::{BatchItemReply, LinkForward, LinkForwardReply, ProposeBatchRequest};
    use blixard_core::node::liveness::{HeartbeatRequest, HeartbeatResult, LivenessReply};
    use blixard_core::node::{ProposeReply, ReadIndexReply};
    use blixard_core::raft::link::Hello;
    use blixard_core::raft::TypeConfig;
    use blixard_core::types::NodeId;
    use openraft::error::{InstallSnapshotError, RaftError};
    use openraft::raft::{
        AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
        VoteRequest, VoteResponse,
    };
    match kind % 16 {
        0 => {
            if let Ok(r) = decode::<AppendEntriesRequest<TypeConfig>>(payload) {
                round_trip(&r);
                let state = fresh_state();
                for e in &r.entries {
                    if let openraft::EntryPayload::Normal(batch) = &e.payload {
                        for p in &batch.0 {
                            apply_checked(&state, p, 101);
                        }
                    }
                }
            }
        }
        1 => {
            if let Ok(r) = decode::<VoteRequest<NodeId>>(payload) {
                round_trip(&r);
            }
        }
        2 => {
            if let Ok(r) = decode::<InstallSnapshotRequest<TypeConfig>>(payload) {
                round_trip(&r);
                if r.offset == 0 && r.done {
                    snapshot_image(&r.data);
                }
            }
        }
        3 => {
            if let Ok(r) = decode::<PreVoteRequest>(payload) {
                round_trip(&r);
            }
        }
        4 => {
            // Propose, and ProposeBatch (same request kind in this map).
            if let Ok(p) = decode::<Proposal>(payload) {
                round_trip(&p);
                apply_checked(&fresh_state(), &p, 101);
            }
            if let Ok(b) = decode::<ProposeBatchRequest>(payload) {
                round_trip(&b);
                let state = fresh_state();
                for p in &b.proposals {
                    apply_checked(&state, p, 101);
                }
            }
            // The same batch as a forward on the peer link.
            if let Ok(f) = decode::<LinkForward<'static>>(payload) {
                round_trip(&f);
                let state = fresh_state();
                for p in f.proposals.iter() {
                    apply_checked(&state, p, 101);
                }
            }
        }
        5 | 7 => {
            let _ = decode::<()>(payload);
            // A peer link's opening frame.
            if let Ok(h) = decode::<Hello>(payload) {
                round_trip(&h);
            }
        }
        6 => {
            if let Ok(r) = decode::<HeartbeatRequest>(payload) {
                round_trip(&r);
            }
        }
        8 => {
            if let Ok(r) = decode::<Result<AppendEntriesResponse<NodeId>, RaftError<NodeId>>>(payload) {
                round_trip(&r);
            }
        }
        9 => {
            if let Ok(r) = decode::<Result<VoteResponse<NodeId>, RaftError<NodeId>>>(payload) {
                round_trip(&r);
            }
        }
        10 => {
            type R = Result<InstallSnapshotResponse<NodeId>, RaftError<NodeId, InstallSnapshotError>>;
            if let Ok(r) = decode::<R>(payload) {
                round_trip(&r);
            }
        }
        11 => {
            if let Ok(r) = decode::<PreVoteReply>(payload) {
                round_trip(&r);
            }
        }
        12 => {
            if let Ok(r) = decode::<ProposeReply>(payload) {
                round_trip(&r);
            }
            if let Ok(r) = decode::<Vec<BatchItemReply>>(payload) {
                round_trip(&r);
            }
            if let Ok(r) = decode::<LinkForwardReply>(payload) {
                round_trip(&r);
            }
        }
        13 => {
            if let Ok(r) = decode::<ReadIndexReply>(payload) {
                round_trip(&r);
            }
        }
        14 => {
            if let Ok(r) = decode::<HeartbeatResult>(payload) {
                round_trip(&r);
            }
        }
        _ => {
            if let Ok(r) = decode::<LivenessReply>(payload) {
                round_trip(&r);
            }
        }
    }
}

/// A state image as `InstallSnapshot` delivers it: decoded in any format
/// version this build reads (converting older ones), and installed into a
/// state. The image round-trips; and if it holds a consistent state,
/// commands applied to it keep it consistent.
pub fn snapshot_image(bytes: &[u8]) {
    use blixard_core::raft::state_machine::{decode_image, encode_image};
    let Ok(image) = decode_image("fuzzed image", bytes) else { return };
    let again = encode_image(&image).expect("a decoded image encodes");
    assert_eq!(
        decode_image("re-encoded", &again).ok().as_ref(),
        Some(&image),
        "an image changed on its round trip"
    );
    let state = ClusterState::new();
    state.restore(image, 100);
    let _ = state.digest();
    if state.check_invariants().is_ok() {
        for (i, (_, cmd)) in seeds::sample_commands().into_iter().enumerate() {
            let p = Proposal { at_ms: 1_700_000_000_000, request: None, command: cmd };
            apply_checked(&state, &p, 101 + i as u64);
        }
    }
}

/// Where targets that need files make them: memory-backed when the machine
/// has `/dev/shm` (files and fsyncs cost nothing there).
pub fn scratch() -> std::path::PathBuf {
    let shm = std::path::Path::new("/dev/shm");
    if shm.is_dir() {
        shm.to_path_buf()
    } else {
        std::env::temp_dir()
    }
}
