//! Internal Raft RPC payloads as a node decodes them: a byte naming the
//! message (requests 0-7 as `RaftGrpc` decodes them: AppendEntries, Vote,
//! InstallSnapshot, PreVote, Propose (also read as a ProposeBatch),
//! ReadIndex, Heartbeat, Liveness; replies 8-15 as `PeerChannels::call`
//! decodes them, same order, a Propose reply also read as a batch's), then the
//! bincode payload. Decoding must fail with an error or produce a value
//! that round-trips; decoded proposals are applied (see `rpc_payload`).
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(
    init: blixard_fuzz::init("raft_message"),
    |data: &[u8]| {
        if let Some((kind, payload)) = data.split_first() {
            blixard_fuzz::rpc_payload(*kind, payload);
        }
    }
);
