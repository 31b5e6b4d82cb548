//! Three real `blixard` node processes on loopback that run their VMs as
//! processes (`--vm-backend process`), with what the self-healing test and
//! benchmark need: which VM runs where (from the cluster and from the
//! hosts' own pid files), kills, stops and restarts, and a cleanup that also
//! ends the fencing guards and workloads the nodes started.
use std::path::{Path, PathBuf};
use std::process::{Child, Output};
use std::time::{Duration, Instant};

use serde_json::Value;

use super::{free_port, start_node_backend};

/// Polls `f` every 50 ms until it returns Some, or panics after `secs`.
pub fn within<T>(what: &str, secs: f64, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + Duration::from_secs_f64(secs);
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out after {secs}s waiting for: {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

pub struct ProcCluster {
    pub root: PathBuf,
    pub ports: Vec<u16>,
    procs: Vec<Option<Child>>,
}

impl ProcCluster {
    /// Node 1 bootstraps, nodes 2 and 3 join; every node runs VMs as
    /// processes. Returns once all three are ready and the node timeout is
    /// `timeout_secs`.
    pub fn start(root: &Path, timeout_secs: u64) -> ProcCluster {
        let ports: Vec<u16> = (0..3).map(|_| free_port()).collect();
        let mut c = ProcCluster { root: root.to_path_buf(), ports, procs: Vec::new() };
        for id in 1..=3 {
            let p = c.spawn(id, (id != 1).then_some(c.ports[0]));
            c.procs.push(Some(p));
        }
        within("three ready nodes", 90.0, || {
            let nodes = c.json(1, &["node", "list", "-o", "json"])?;
            let ready = nodes.as_array()?.iter().filter(|n| n["status"] == "ready").count();
            (ready == 3).then_some(())
        });
        let secs = timeout_secs.to_string();
        let out = c.cli(1, &["cluster", "set-node-timeout", &secs]);
        assert!(out.status.success(), "set-node-timeout: {}", String::from_utf8_lossy(&out.stderr));
        // Leases granted under the default 10 s timeout may still run: the
        // leader applies a lower timeout only once they have (see
        // docs/OPERATIONS.md, "Node status and heartbeats").
        std::thread::sleep(Duration::from_secs(10u64.saturating_sub(timeout_secs)));
        c
    }

    pub fn dir(&self, id: u64) -> PathBuf {
        self.root.join(format!("node-{id}"))
    }

    fn spawn(&self, id: u64, join: Option<u16>) -> Child {
        let port = self.ports[(id - 1) as usize];
        start_node_backend(id, port, &self.dir(id), join, ["16", "8192", "100"], "process", &[])
    }

    /// `blixard` through every live member (the CLI moves on from one that
    /// does not answer), first `first`.
    pub fn cli(&self, first: u64, args: &[&str]) -> Output {
        let mut ids: Vec<u64> = vec![first];
        ids.extend((1..=3).filter(|i| *i != first && self.procs[(*i - 1) as usize].is_some()));
        let addrs: Vec<String> =
            ids.iter().map(|i| format!("127.0.0.1:{}", self.ports[(*i - 1) as usize])).collect();
        let addrs = addrs.join(",");
        super::client_command(&addrs).arg("--addr").arg(&addrs).args(args).output().unwrap()
    }

    pub fn json(&self, first: u64, args: &[&str]) -> Option<Value> {
        let out = self.cli(first, args);
        out.status.success().then(|| serde_json::from_slice(&out.stdout).ok()).flatten()
    }

    /// name -> (node, observed) from the cluster, through node `via` first.
    pub fn placements(&self, via: u64) -> Option<Vec<(String, u64, String)>> {
        let vms = self.json(via, &["vm", "list", "-o", "json"])?;
        Some(
            vms.as_array()?
                .iter()
                .map(|v| {
                    let name = v["name"].as_str().unwrap_or_default().to_string();
                    (
                        name,
                        v["node_id"].as_u64().unwrap_or(0),
                        v["observed"].as_str().unwrap_or("").to_string(),
                    )
                })
                .collect(),
        )
    }

    pub fn pid(&self, id: u64) -> libc::pid_t {
        self.procs[(id - 1) as usize].as_ref().expect("node runs").id() as libc::pid_t
    }

    pub fn signal(&self, id: u64, sig: libc::c_int) {
        // SAFETY: signalling a child process of this test.
        assert_eq!(unsafe { libc::kill(self.pid(id), sig) }, 0, "signal {sig} to node {id}");
    }

    pub fn kill(&mut self, id: u64) {
        let mut child = self.procs[(id - 1) as usize].take().expect("node runs");
        let _ = child.kill();
        let _ = child.wait();
    }

    pub fn restart(&mut self, id: u64) {
        assert!(self.procs[(id - 1) as usize].is_none(), "node {id} runs");
        let child = self.spawn(id, None);
        self.procs[(id - 1) as usize] = Some(child);
    }

    /// The live workload of VM `name` on node `id`'s host, if one runs:
    /// the pid in its pid file, alive, with the VM's tag in its command line.
    pub fn workload(&self, id: u64, name: &str) -> Option<u32> {
        let dir = self.dir(id).join("vms").join(name);
        let pid: u32 = std::fs::read_to_string(dir.join("pid")).ok()?.trim().parse().ok()?;
        alive_with(pid, &format!("{}/", dir.display())).then_some(pid)
    }

    /// The hosts on which VM `name` has a live workload.
    pub fn hosts_running(&self, name: &str) -> Vec<u64> {
        (1..=3).filter(|id| self.workload(*id, name).is_some()).collect()
    }

    /// Whether node `id`'s host still has files of VM `name`.
    pub fn has_files(&self, id: u64, name: &str) -> bool {
        self.dir(id).join("vms").join(name).exists()
    }
}

/// Whether `pid` runs with `needle` in its command line (a zombie or a
/// reused pid does not count).
pub fn alive_with(pid: u32, needle: &str) -> bool {
    let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else { return false };
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let zombie = stat.rsplit_once(')').is_some_and(|(_, rest)| rest.trim_start().starts_with('Z'));
    !zombie && String::from_utf8_lossy(&cmdline).contains(needle)
}

impl Drop for ProcCluster {
    fn drop(&mut self) {
        for p in self.procs.iter_mut().flatten() {
            // SAFETY: resuming and killing child processes of this test.
            unsafe {
                libc::kill(p.id() as libc::pid_t, libc::SIGCONT);
            }
            let _ = p.kill();
            let _ = p.wait();
        }
        // What the nodes started and that outlives them by design: each
        // host's fencing guard and the VM workloads (checked by command line
        // before they are signalled).
        for id in 1..=3u64 {
            let vms = self.dir(id).join("vms");
            let root = format!("{}", vms.display());
            if let Some(pid) = std::fs::read_to_string(vms.join("fence-guard.pid"))
                .ok()
                .and_then(|s| s.trim().parse::<u32>().ok())
                .filter(|pid| alive_with(*pid, &root))
            {
                // SAFETY: a guard process our node started, identified above.
                unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
            }
            for entry in std::fs::read_dir(&vms).into_iter().flatten().flatten() {
                let name = entry.file_name().to_string_lossy().to_string();
                let needle = format!("{}/", entry.path().display());
                if let Some(pid) = std::fs::read_to_string(entry.path().join("pid"))
                    .ok()
                    .and_then(|s| s.trim().parse::<u32>().ok())
                    .filter(|pid| alive_with(*pid, &needle))
                {
                    // SAFETY: the workload of VM `name` our node started (its
                    // own process group), identified above.
                    unsafe { libc::kill(-(pid as libc::pid_t), libc::SIGKILL) };
                    let _ = name;
                }
            }
        }
        if std::thread::panicking() {
            for id in 1..=3 {
                let log = self.dir(id).with_extension("log");
                let text = std::fs::read_to_string(&log).unwrap_or_default();
                let tail: Vec<&str> = text.lines().rev().take(30).collect();
                eprintln!("---- {} (last 30 lines)", log.display());
                for l in tail.iter().rev() {
                    eprintln!("{l}");
                }
            }
        }
    }
}
