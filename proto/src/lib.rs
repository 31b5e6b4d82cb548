//! Generated gRPC types for Blixard's control API and internal Raft service.
#![allow(clippy::all, missing_docs)]

pub mod v1 {
    tonic::include_proto!("blixard.v1");
}

pub use v1::*;
