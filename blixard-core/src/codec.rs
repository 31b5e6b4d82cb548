//! bincode 2 encoding with a size limit on decode, so a corrupt or hostile
//! message can never make a node allocate without bound.
//!
//! The limit is also proportional to the input: bincode allocates a
//! string's buffer from its length prefix before it reads the bytes, so
//! under a fixed limit ten bytes could make a node allocate the whole limit
//! (4 GiB for a snapshot image). A valid input makes bincode claim at most
//! 16 bytes per input byte (a one-byte varint decoded into a `u128`; a
//! string's bytes count once), so the limit is the smallest of a few steps
//! that is at least 16 times the input, and never more than the caller's
//! cap ([`limit_for`]). Whatever decoded under the fixed limit still
//! decodes; a length field can no longer claim more than 16 times the input
//! (1 MiB for an input of up to 64 KiB) before the decode fails.
//!
//! And values may nest at most [`MAX_NESTING`] deep ([`nesting`]): types
//! that contain themselves would otherwise let a few kilobytes of input
//! overflow the decoding thread's stack.
mod nesting;

use std::cell::Cell;

use bincode::de::read::Reader;
use bincode::error::DecodeError;
use serde::{de::DeserializeOwned, Serialize};

pub use nesting::MAX_NESTING;

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

/// Writes the encoding of `v` into `buf` and says how long it is; an error
/// if it does not fit (nothing else can fail for serialisable types).
pub fn encode_into_slice<T: Serialize>(v: &T, buf: &mut [u8]) -> Result<usize, CodecError> {
    bincode::serde::encode_into_slice(v, buf, config()).map_err(|e| CodecError::Encode(e.to_string()))
}

/// The steps a decode limit takes. Each is a separate instantiation of the
/// decoder for every type decoded under it, so there are few: `decode` uses
/// the first two, `decode_trusted` all four.
const LIMIT_STEPS: [usize; 4] = [1 << 20, MAX_DECODE_BYTES, 1 << 30, MAX_TRUSTED_DECODE_BYTES];

/// The decode limit for an input of `len` bytes under `cap`: the smallest
/// step at least 16 times the input, or `cap` if that is less.
pub fn limit_for(len: usize, cap: usize) -> usize {
    let need = len.saturating_mul(16).min(cap);
    LIMIT_STEPS.into_iter().find(|s| *s >= need).unwrap_or(MAX_TRUSTED_DECODE_BYTES).min(cap)
}

/// Reads a slice, counting what it has read.
struct Input<'a> {
    rest: &'a [u8],
    used: &'a Cell<usize>,
}

impl Input<'_> {
    fn advance(&mut self, n: usize) {
        self.rest = &self.rest[n..];
        self.used.set(self.used.get() + n);
    }
}

impl Reader for Input<'_> {
    fn read(&mut self, out: &mut [u8]) -> Result<(), DecodeError> {
        let Some(bytes) = self.rest.get(..out.len()) else {
            return Err(DecodeError::UnexpectedEnd { additional: out.len() - self.rest.len() });
        };
        out.copy_from_slice(bytes);
        self.advance(out.len());
        Ok(())
    }

    fn peek_read(&mut self, n: usize) -> Option<&[u8]> {
        self.rest.get(..n)
    }

    fn consume(&mut self, n: usize) {
        self.advance(n.min(self.rest.len()));
    }
}

/// Decodes all of `bytes` under the decode limit `N`, nesting at most
/// [`MAX_NESTING`] deep.
fn decode_limited<T: DeserializeOwned, const N: usize>(bytes: &[u8]) -> Result<T, CodecError> {
    let used = Cell::new(0);
    let depth = Cell::new(0);
    let cfg = bincode::config::standard().with_limit::<N>();
    let mut decoder = bincode::serde::OwnedSerdeDecoder::from_reader(Input { rest: bytes, used: &used }, cfg);
    let v = T::deserialize(nesting::Nested { de: decoder.as_deserializer(), depth: &depth })
        .map_err(|e| CodecError::Decode(e.to_string()))?;
    if used.get() != bytes.len() {
        return Err(CodecError::Decode(format!("{} trailing bytes", bytes.len() - used.get())));
    }
    Ok(v)
}

pub fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, CodecError> {
    if bytes.len() > MAX_DECODE_BYTES {
        return Err(CodecError::Decode(format!(
            "{} bytes exceeds the {MAX_DECODE_BYTES}-byte limit",
            bytes.len()
        )));
    }
    if limit_for(bytes.len(), MAX_DECODE_BYTES) <= LIMIT_STEPS[0] {
        decode_limited::<T, { LIMIT_STEPS[0] }>(bytes)
    } else {
        decode_limited::<T, MAX_DECODE_BYTES>(bytes)
    }
}

/// Decodes a node's own persisted data (snapshot files and payloads), with
/// the larger [`MAX_TRUSTED_DECODE_BYTES`] limit.
pub fn decode_trusted<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, CodecError> {
    match limit_for(bytes.len(), MAX_TRUSTED_DECODE_BYTES) {
        l if l <= LIMIT_STEPS[0] => decode_limited::<T, { LIMIT_STEPS[0] }>(bytes),
        l if l <= LIMIT_STEPS[1] => decode_limited::<T, { LIMIT_STEPS[1] }>(bytes),
        l if l <= LIMIT_STEPS[2] => decode_limited::<T, { LIMIT_STEPS[2] }>(bytes),
        _ => decode_limited::<T, MAX_TRUSTED_DECODE_BYTES>(bytes),
    }
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
