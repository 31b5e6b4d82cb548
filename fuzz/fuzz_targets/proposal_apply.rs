//! A Raft entry's payload, a `ProposalBatch`, decoded and applied to a
//! small cluster's state, each proposal in turn, as the state machine does:
//! a malformed or hostile command is rejected and changes nothing, never
//! panics; an accepted one keeps every invariant (see `apply_checked`).
#![no_main]
use blixard_core::codec;
use blixard_core::command::ProposalBatch;
use libfuzzer_sys::fuzz_target;

fuzz_target!(
    init: blixard_fuzz::init("proposal_apply"),
    |data: &[u8]| {
        let Ok(batch) = codec::decode::<ProposalBatch>(data) else { return };
        blixard_fuzz::round_trip(&batch);
        let state = blixard_fuzz::fresh_state();
        for (i, p) in batch.0.iter().enumerate() {
            blixard_fuzz::apply_checked(&state, p, 101 + i as u64);
        }
    }
);
