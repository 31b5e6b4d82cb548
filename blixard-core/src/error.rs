//! Typed errors. Every rejection says what was wrong and what is allowed.
use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::types::{NodeId, Resources};

/// Why a command was rejected. Deterministic: the same command against the
/// same state yields the same error on every replica. A rejected command
/// changes nothing.
#[derive(Error, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub enum CommandError {
    #[error("invalid {what} {value:?}: {allowed}")]
    Invalid { what: String, value: String, allowed: String },

    #[error("a VM named {name:?} already exists")]
    VmExists { name: String },

    #[error("no VM named {name:?}")]
    VmNotFound { name: String },

    #[error("unknown node id {id}")]
    UnknownNode { id: NodeId },

    #[error("no node can fit {needed}: {reason}")]
    NoCapacity { needed: Resources, reason: String },

    /// `capacity` is the allocatable part: (capacity - reserved) x ratio.
    #[error("node {id} would offer {capacity} allocatable, less than its VMs already hold ({allocated})")]
    CapacityBelowAllocated { id: NodeId, capacity: Resources, allocated: Resources },

    #[error("batch command {index} failed: {source}")]
    BatchFailed {
        index: usize,
        #[source]
        source: Box<CommandError>,
    },

    /// Appended in format 2 (variants are encoded by position).
    #[error("tenant {tenant:?} is over its quota: {reason}")]
    QuotaExceeded { tenant: String, reason: String },

    #[error("tenant {tenant:?} has no quota")]
    NoQuota { tenant: String },

    /// Appended in format 3: a create whose placement rules no node meets,
    /// with the scheduler's per-filter explanation.
    #[error("no node fits {name} ({needed}): {explanation}")]
    NoFit { name: String, needed: Resources, explanation: String },

    /// A `node set` that would break a placed VM's constraint.
    #[error("node {id} would break VM {vm:?}'s constraint {constraint}")]
    BreaksConstraint { id: NodeId, vm: String, constraint: String },

    /// Appended in format 4: a migration or drain that cannot move a VM
    /// (pinned, nowhere else fits, not placed, ...), saying why.
    #[error("cannot move {name}: {reason}")]
    CannotMove { name: String, reason: String },

    /// A node in the wrong state for the command (left the cluster, ...).
    #[error("node {id} is {state}: {why}")]
    NodeState { id: NodeId, state: String, why: String },

    /// Appended in format 5: a token command the token table refuses
    /// (the name is taken, the last admin token, ...).
    #[error("token {name:?}: {why}")]
    TokenRefused { name: String, why: String },

    #[error("no token named {name:?}")]
    NoToken { name: String },

    /// Appended in format 6: the VM network is fixed once set.
    #[error("the cluster's VM network is {current}, fixed when the cluster was bootstrapped; it cannot become {asked}")]
    VmNetworkFixed { current: String, asked: String },
}

impl CommandError {
    pub fn invalid(what: impl Into<String>, value: impl ToString, allowed: impl Into<String>) -> Self {
        CommandError::Invalid { what: what.into(), value: value.to_string(), allowed: allowed.into() }
    }

    /// Whether it means "nothing has room" (exit code 2 in the CLI).
    pub fn is_no_capacity(&self) -> bool {
        matches!(self.root(), CommandError::NoCapacity { .. } | CommandError::NoFit { .. })
    }

    /// The innermost error of a failed batch (what the operator needs to see).
    pub fn root(&self) -> &CommandError {
        match self {
            CommandError::BatchFailed { source, .. } => source.root(),
            other => other,
        }
    }
}
