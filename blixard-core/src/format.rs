//! Format versions of everything a node persists or sends to another node.
//!
//! One number, [`CURRENT`], names the encoding of all of it: the Raft log
//! database (its entries, whose payloads are [`crate::command::Proposal`]s,
//! and its metadata), the snapshot file, the state image inside a snapshot
//! (also what `InstallSnapshot` carries), and the internal RPC envelope
//! (`RaftRequest`/`RaftReply`, whose payloads are bincode of openraft's
//! types and ours). Each container says which version it was written in:
//!
//! - the log database: a `format` key in its `meta` table;
//! - a snapshot file and a state image: a [`HEADER_LEN`]-byte header
//!   (a `0xFF` tag, `BXF`, the version as little-endian `u16`). `0xFF` can
//!   never begin the bincode of these types (an `Option` tag or a varint
//!   length), so data written before versions existed is recognised as
//!   version 0;
//! - an RPC: the `format` field of the envelope (0 when an older node sent
//!   it).
//!
//! Version 0 is the unversioned encoding used before this module; version 1
//! encodes the same bytes with the version recorded; version 2 adds node
//! reservations, overcommit ratios and operator overrides to node records
//! (state image), and the `RegisterNode`/`SetNode` commands (appended
//! variants: older entries decode unchanged); version 3 adds placement
//! rules, the queue and preemption to VM records (state image) and the
//! `CreateVms` command (appended); version 4 adds liveness and drains to
//! node records, failover policy and move history to VM records, the node
//! timeout (state image), and the self-healing commands (appended; format
//! 3's `CreateVms` is renamed `CreateVmsV3` in place); version 5 adds bearer
//! tokens to the state image and the `CreateToken`/`RevokeToken` commands
//! (appended); version 6 adds the VM network (state image: the cluster's
//! network, each node's subnet, each VM's address and published ports) and
//! the `CreateVms` (with published ports; format 4's is renamed
//! `CreateVmsV4` in place) and `SetVmNetwork` commands (appended). Older
//! types live in
//! [`crate::legacy`]. Reading a version newer
//! than [`CURRENT`] is a [`FormatError::Newer`] naming both versions, never a
//! misread. How to change a format: see "Format versions" in
//! docs/ARCHITECTURE.md (a new version, a migration from the previous one,
//! and a fixture data dir written by the previous version).

/// The format version this build writes.
pub const CURRENT: u16 = 6;

/// The oldest version this build still reads (and migrates).
pub const OLDEST: u16 = 0;

const TAG: [u8; 4] = [0xFF, b'B', b'X', b'F'];

/// Length of the header in front of a versioned file or image.
pub const HEADER_LEN: usize = TAG.len() + 2;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FormatError {
    #[error("{what} is in format version {found}, but this blixard ({build}) reads versions {OLDEST} to {CURRENT}; run a newer blixard", build = env!("CARGO_PKG_VERSION"))]
    Newer { what: String, found: u16 },
    #[error("{what} has a damaged format header")]
    BadHeader { what: String },
}

/// Checks a version read from `what` (a log database, an RPC envelope).
pub fn check(what: &str, found: u16) -> Result<u16, FormatError> {
    if found > CURRENT {
        return Err(FormatError::Newer { what: what.to_string(), found });
    }
    Ok(found)
}

/// `body` behind a header naming [`CURRENT`].
pub fn with_header(body: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER_LEN + body.len());
    out.extend_from_slice(&TAG);
    out.extend_from_slice(&CURRENT.to_le_bytes());
    out.extend_from_slice(body);
    out
}

/// The version and body of a file or image written by [`with_header`], or
/// by a build from before versions (version 0: the whole input is the body).
pub fn split_header<'a>(what: &str, bytes: &'a [u8]) -> Result<(u16, &'a [u8]), FormatError> {
    if bytes.first() != Some(&TAG[0]) {
        return Ok((0, bytes));
    }
    if bytes.len() < HEADER_LEN || bytes[..TAG.len()] != TAG {
        return Err(FormatError::BadHeader { what: what.to_string() });
    }
    let found = u16::from_le_bytes([bytes[TAG.len()], bytes[TAG.len() + 1]]);
    check(what, found)?;
    Ok((found, &bytes[HEADER_LEN..]))
}

/// The RPC envelope's `format` field: a `u32` on the wire.
pub fn wire(found: u32) -> u16 {
    u16::try_from(found).unwrap_or(u16::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec;
    use crate::state::StateImage;

    #[test]
    fn a_header_round_trips_and_legacy_bytes_are_version_0() {
        let body = b"payload";
        let framed = with_header(body);
        assert_eq!(split_header("x", &framed).unwrap(), (CURRENT, &body[..]));
        assert_eq!(split_header("x", body).unwrap(), (0, &body[..]));
        assert_eq!(split_header("x", &[]).unwrap(), (0, &[][..]));
    }

    #[test]
    fn a_newer_version_is_an_error_naming_both_versions() {
        let mut framed = with_header(b"body");
        framed[TAG.len()..HEADER_LEN].copy_from_slice(&(CURRENT + 1).to_le_bytes());
        let e = split_header("snapshot file /d/snapshot.bin", &framed).unwrap_err();
        assert_eq!(
            e,
            FormatError::Newer { what: "snapshot file /d/snapshot.bin".into(), found: CURRENT + 1 }
        );
        let msg = e.to_string();
        assert!(
            msg.contains(&format!("version {}", CURRENT + 1)) && msg.contains(&CURRENT.to_string()),
            "{msg}"
        );
        assert!(check("log", CURRENT).is_ok());
        assert!(matches!(check("log", 99), Err(FormatError::Newer { found: 99, .. })));
        assert_eq!(wire(u32::MAX), u16::MAX);
        assert!(check("rpc", wire(70_000)).is_err());
    }

    #[test]
    fn a_damaged_header_is_an_error() {
        assert!(matches!(split_header("x", &[0xFF, b'B']), Err(FormatError::BadHeader { .. })));
        assert!(matches!(
            split_header("x", &[0xFF, b'Q', b'X', b'F', 1, 0]),
            Err(FormatError::BadHeader { .. })
        ));
    }

    #[test]
    fn unversioned_encodings_never_start_with_the_tag() {
        // The empty image is the worst case: a length varint of 0.
        let image = codec::encode(&StateImage::default()).unwrap();
        assert_ne!(image[0], TAG[0]);
        // bincode varints use 251-254 as markers; 255 is never a first byte.
        for n in [0u64, 250, 251, 65_535, 1 << 40, u64::MAX] {
            assert_ne!(codec::encode(&n).unwrap()[0], TAG[0], "{n}");
        }
    }
}
