//! Generated gRPC types for Blixard's control API and internal Raft service.
#![allow(clippy::all, missing_docs)]

pub mod v1 {
    tonic::include_proto!("blixard.v1");
}

pub use v1::*;

/// The encoded `FileDescriptorSet` of `blixard.proto` (written by build.rs),
/// for gRPC server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/blixard_descriptor.bin"));
