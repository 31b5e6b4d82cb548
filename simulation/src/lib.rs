//! Deterministic simulation of Blixard clusters.
//!
//! The simulator runs the real `blixard_core::node::Node` — the same state
//! machine, redb log, Raft glue and gRPC services as production — on madsim:
//! one madsim node per Blixard node, simulated network and clock, one seed
//! deciding every scheduling, latency and election-timeout choice. A failing
//! seed therefore replays exactly.
//!
//! Everything here only exists when built with `RUSTFLAGS="--cfg madsim"`;
//! a plain build compiles to an empty crate. Run the suite with
//!
//! ```text
//! RUSTFLAGS="--cfg madsim" CARGO_TARGET_DIR=target/madsim \
//!     cargo test -p blixard-simulation --release
//! ```
//!
//! Every seed runs in its own child process of the test binary (see
//! [`seeds::run_seeds`] for why), so a seed behaves identically in the suite,
//! in a rerun and in a replay — within one build profile: the debug and
//! release builds schedule differently, so replay with `--release` as printed.
//!
//! Environment knobs: `BLIXARD_SIM_SEEDS=N` runs seeds 1..=N,
//! `BLIXARD_SIM_SEED=S` runs exactly seed S, `BLIXARD_SIM_LOG=<filter>`
//! turns on tracing output (e.g. `info,openraft=warn`).

#[cfg(madsim)]
pub mod cluster;
#[cfg(madsim)]
pub mod model;
#[cfg(madsim)]
pub mod seeds;
#[cfg(madsim)]
pub mod watcher;
