//! The internal RPC envelope as the gRPC layer hands it over: a flag byte
//! (bit 0: a reply, bits 1-3: which RPC), then the protobuf `RaftRequest`
//! or `RaftReply`. What the receiver checks before decoding the payload
//! (the format version, `format::check`/`format::wire`) and the payload
//! itself (`rpc_payload`), as `RaftGrpc::open` and `PeerChannels::call` do.
#![no_main]
use blixard_core::format;
use blixard_proto::{RaftReply, RaftRequest};
use libfuzzer_sys::fuzz_target;
use prost::Message;

fuzz_target!(
    init: blixard_fuzz::init("raft_envelope"),
    |data: &[u8]| {
        let Some((flags, rest)) = data.split_first() else { return };
        let reply = flags & 1 == 1;
        let rpc = (flags >> 1) & 7;
        let (version, payload) = if reply {
            let Ok(r) = RaftReply::decode(rest) else { return };
            (r.format, r.payload)
        } else {
            let Ok(r) = RaftRequest::decode(rest) else { return };
            (r.format, r.payload)
        };
        match format::check("a fuzzed message", format::wire(version)) {
            Ok(v) => assert!(v <= format::CURRENT),
            Err(e) => {
                assert!(version > u32::from(format::CURRENT), "version {version} refused: {e}");
                return;
            }
        }
        // The same bytes as a file or image body would be framed.
        if let Ok((v, body)) = format::split_header("a fuzzed body", &payload) {
            assert!(v <= format::CURRENT && body.len() <= payload.len());
        }
        blixard_fuzz::rpc_payload(rpc + if reply { 8 } else { 0 }, &payload);
    }
);
