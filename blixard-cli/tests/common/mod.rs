//! Helpers shared by the integration tests that run real `blixard` processes.
#![allow(dead_code)] // each test crate uses its own subset

pub mod netns;

use std::net::TcpListener;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

pub const BIN: &str = env!("CARGO_BIN_EXE_blixard");

/// A loopback port nobody listens on right now.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// Runs `blixard --addr 127.0.0.1:PORT ARGS...` and returns its output.
pub fn cli(port: u16, args: &[&str]) -> Output {
    Command::new(BIN).arg("--addr").arg(format!("127.0.0.1:{port}")).args(args).output().unwrap()
}

/// Polls `f` until it returns Some, or fails the test after `secs`.
pub fn eventually<T>(what: &str, secs: u64, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out after {secs}s waiting for: {what}");
        std::thread::sleep(Duration::from_millis(200));
    }
}
