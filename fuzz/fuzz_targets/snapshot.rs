//! Snapshots: a flag byte, then either (bit 0 clear) a state image as
//! `InstallSnapshot` delivers it (`decode_image`: the format header, every
//! older version's layout and its conversion, then `restore`), or (bit 0
//! set) a snapshot file as a node reads it when it starts
//! (`StateMachineStore::open`). Either decodes, or fails with an error.
#![no_main]
use std::sync::Arc;

use blixard_core::raft::state_machine::StateMachineStore;
use blixard_core::state::ClusterState;
use libfuzzer_sys::fuzz_target;

fuzz_target!(
    init: blixard_fuzz::init("snapshot"),
    |data: &[u8]| {
        let Some((flags, bytes)) = data.split_first() else { return };
        if flags & 1 == 0 {
            blixard_fuzz::snapshot_image(bytes);
            return;
        }
        let dir = tempfile::tempdir_in(blixard_fuzz::scratch()).expect("a scratch dir");
        std::fs::write(dir.path().join("snapshot.bin"), bytes).expect("write the snapshot file");
        let state = Arc::new(ClusterState::new());
        if StateMachineStore::open(dir.path(), state.clone()).is_ok() {
            let _ = state.digest();
        }
    }
);
