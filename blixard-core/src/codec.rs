//! bincode 2 encoding with a size limit on decode, so a corrupt or hostile
//! message can never make a node allocate without bound.
use serde::{de::DeserializeOwned, Serialize};

/// The largest message a node decodes (a snapshot chunk plus framing fits
/// comfortably; see `raft::SNAPSHOT_CHUNK_BYTES`).
pub const MAX_DECODE_BYTES: usize = 64 * 1024 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum CodecError {
    #[error("encode: {0}")]
    Encode(String),
    #[error("decode: {0}")]
    Decode(String),
}

/// Local files this node wrote itself (snapshots) may be larger than any
/// network message.
pub const MAX_TRUSTED_DECODE_BYTES: usize = 4 * 1024 * 1024 * 1024;

fn config() -> impl bincode::config::Config {
    bincode::config::standard().with_limit::<MAX_DECODE_BYTES>()
}

pub fn encode<T: Serialize>(v: &T) -> Result<Vec<u8>, CodecError> {
    bincode::serde::encode_to_vec(v, config()).map_err(|e| CodecError::Encode(e.to_string()))
}

/// Appends the encoding of `v` to `out` (no allocation of its own).
pub fn encode_into<T: Serialize>(v: &T, out: &mut Vec<u8>) -> Result<usize, CodecError> {
    bincode::serde::encode_into_std_write(v, out, config()).map_err(|e| CodecError::Encode(e.to_string()))
}

pub fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, CodecError> {
    if bytes.len() > MAX_DECODE_BYTES {
        return Err(CodecError::Decode(format!(
            "{} bytes exceeds the {MAX_DECODE_BYTES}-byte limit",
            bytes.len()
        )));
    }
    let (v, used) =
        bincode::serde::decode_from_slice(bytes, config()).map_err(|e| CodecError::Decode(e.to_string()))?;
    if used != bytes.len() {
        return Err(CodecError::Decode(format!("{} trailing bytes", bytes.len() - used)));
    }
    Ok(v)
}

/// Decodes a node's own persisted data (snapshot files and payloads), with
/// the larger [`MAX_TRUSTED_DECODE_BYTES`] limit.
pub fn decode_trusted<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, CodecError> {
    let cfg = bincode::config::standard().with_limit::<MAX_TRUSTED_DECODE_BYTES>();
    let (v, used) =
        bincode::serde::decode_from_slice(bytes, cfg).map_err(|e| CodecError::Decode(e.to_string()))?;
    if used != bytes.len() {
        return Err(CodecError::Decode(format!("{} trailing bytes", bytes.len() - used)));
    }
    Ok(v)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::command::{Command, Proposal};

    #[test]
    fn corrupt_input_is_an_error_not_a_panic() {
        let p = Proposal { at_ms: 1, request: None, command: Command::DeleteVm { name: "a".into() } };
        let bytes = encode(&p).unwrap();
        assert_eq!(decode::<Proposal>(&bytes).unwrap(), p);
        for cut in 0..bytes.len() {
            assert!(decode::<Proposal>(&bytes[..cut]).is_err());
        }
        let mut extra = bytes.clone();
        extra.push(0);
        assert!(decode::<Proposal>(&extra).is_err());
        // A length prefix claiming a huge string must not allocate it.
        let huge = [3u8, 0xfd, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x7f];
        assert!(decode::<Proposal>(&huge).is_err());
        let garbage: Vec<u8> = (0..200u32).map(|i| (i * 37 % 251) as u8).collect();
        assert!(decode::<Proposal>(&garbage).is_err());
    }
}
