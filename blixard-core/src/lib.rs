//! Blixard's control plane library: replicated state, commands, placement,
//! Raft glue, the node and its gRPC services.
pub mod auth;
pub mod codec;
pub mod command;
mod dedup;
pub mod error;
pub mod format;
pub mod legacy;
pub mod metrics;
pub mod node;
pub mod raft;
pub mod reconciler;
pub mod scheduler;
pub mod state;
pub mod test_support;
pub mod tls;
pub mod trace;
pub mod types;
pub mod validate;
pub mod vm_net;
pub mod vm_table;
pub mod watch;
