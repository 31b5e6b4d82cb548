//! VM backends: one trait, three implementations.
//!
//! - [`qemu`]: real microVMs (`qemu-system-x86_64 -M microvm`), KVM where the
//!   CPU has it, TCG otherwise; QMP over a unix socket; serial console to a
//!   log file; readiness from a marker line the guest prints.
//! - [`process`]: a configured command stands in for the VM (hosts without
//!   QEMU, quick local use); same lifecycle, logs and exit status.
//! - [`sim`]: deterministic and in memory, for the madsim simulator, with
//!   injectable faults.
//!
//! Custom kernels and initrds come only from the node's image directory, by
//! name: see [`image_dir`].
//!
//! [`guard`] enforces the fencing lease of the qemu and process backends
//! ([`VmBackend::renew_lease`]) from a process that outlives the node.
//!
//! A backend knows nothing about Raft or the cluster: the node's reconciler
//! tells it what to run and reports what it sees.
pub mod backend;
#[cfg(not(madsim))]
pub mod guard;
#[cfg(not(madsim))]
pub mod host;
#[cfg(not(madsim))]
pub mod image;
pub mod image_dir;
#[cfg(not(madsim))]
pub mod process;
#[cfg(not(madsim))]
pub mod qemu;
pub mod sim;

pub use backend::*;
