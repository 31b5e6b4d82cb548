//! VM backends: one trait, three implementations.
//!
//! - [`qemu`]: real microVMs (`qemu-system-x86_64 -M microvm`), KVM where the
//!   CPU has it, TCG otherwise; QMP over a unix socket; the serial console
//!   on a unix socket (interactive, one client at a time) and logged to a
//!   file; readiness from a marker line the guest prints; a virtio-net NIC
//!   on a tap of the node's bridge and an ext4 data disk when configured.
//! - [`process`]: a configured command stands in for the VM (hosts without
//!   QEMU, quick local use); same lifecycle, logs and exit status; its
//!   console is the command's stdin and output; no NIC, no disk.
//! - [`sim`]: deterministic and in memory, for the madsim simulator, with
//!   injectable faults; its console is an echoing stand-in for a shell.
//!
//! [`net`] manages the host side of VM networking (bridge, taps, routes to
//! other nodes' VM subnets, outbound NAT) with `ip` and `iptables`.
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
mod console;
#[cfg(not(madsim))]
pub mod guard;
#[cfg(not(madsim))]
pub mod host;
#[cfg(not(madsim))]
pub mod image;
pub mod image_dir;
#[cfg(not(madsim))]
pub mod net;
#[cfg(not(madsim))]
pub mod process;
#[cfg(not(madsim))]
pub mod qemu;
pub mod sim;

pub use backend::*;
