//! What the host-networking tests share: a network namespace of their own.
use std::process::Command;

use blixard_vm::net;
use blixard_vm::VmError;

/// A network namespace for one test (`bxtest-<pid>-<tag>`), deleted on drop
/// (panics included) with every interface, route and rule in it: the
/// host's own network is never touched.
pub struct Netns(pub String);

impl Netns {
    pub fn new(tag: &str) -> Netns {
        let name = format!("bxtest-{}-{tag}", std::process::id());
        let _ = Command::new("ip").args(["netns", "del", &name]).output();
        let out = Command::new("ip").args(["netns", "add", &name]).output().expect("`ip` must be installed");
        assert!(out.status.success(), "ip netns add {name}: {}", String::from_utf8_lossy(&out.stderr));
        let ns = Netns(name);
        ns.sh("ip link set lo up");
        ns
    }

    /// Runs a shell command inside the namespace; returns stdout, panics on
    /// failure.
    pub fn sh(&self, script: &str) -> String {
        let out = Command::new("ip").args(["netns", "exec", &self.0, "sh", "-c", script]).output().unwrap();
        assert!(out.status.success(), "`{script}` in {}: {}", self.0, String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Runs `f` on a thread inside the namespace.
    #[allow(dead_code)] // not every test file uses it
    pub fn run<T: Send>(&self, f: impl FnOnce() -> Result<T, VmError> + Send) -> T {
        net::in_netns(&self.0, f).unwrap_or_else(|e| panic!("in {}: {e}", self.0))
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).output();
    }
}
