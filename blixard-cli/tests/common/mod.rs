//! Helpers shared by the integration tests that run real `blixard` processes.
#![allow(dead_code)] // each test crate uses its own subset

pub mod netns;
pub mod procs;
pub mod tls;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

pub const BIN: &str = env!("CARGO_BIN_EXE_blixard");

/// A loopback port nobody listens on right now, below the kernel's
/// ephemeral range.
pub use blixard_core::test_support::free_port;

/// `127.0.0.1:PORT`.
pub fn loopback(port: u16) -> String {
    format!("127.0.0.1:{port}")
}

/// Runs `blixard --addr 127.0.0.1:PORT ARGS...` and returns its output.
pub fn cli(port: u16, args: &[&str]) -> Output {
    cli_at(&loopback(port), args)
}

/// Runs `blixard --addr ADDRS ARGS...`; ADDRS is one member or a
/// comma-separated list. Carries the cluster's admin token.
pub fn cli_at(addrs: &str, args: &[&str]) -> Output {
    client_command(addrs).arg("--addr").arg(addrs).args(args).output().unwrap()
}

/// Which cluster founder's data dir each node port belongs to: where the
/// cluster's admin token is (`node start` writes it there when it founds a
/// cluster).
static FOUNDERS: std::sync::Mutex<std::collections::BTreeMap<u16, PathBuf>> =
    std::sync::Mutex::new(std::collections::BTreeMap::new());

/// The admin token of the cluster the node at `port` belongs to, once its
/// founder has written it.
pub fn admin_token(port: u16) -> Option<String> {
    let dir = FOUNDERS.lock().unwrap().get(&port).cloned()?;
    let t = std::fs::read_to_string(dir.join("admin-token")).ok()?;
    Some(t.trim().to_string())
}

/// What every test's `node start` needs besides its flags: a config file
/// next to its data dir (a founder writes its CLI context there, never into
/// the user's), and for a joiner the cluster's admin token, once the
/// founder (the node at `seed`) has made it. Records which cluster the
/// node's `port` belongs to, for [`client_command`].
pub fn prepare_node(cmd: &mut Command, port: u16, dir: &Path, join: Option<u16>) {
    cmd.env("BLIXARD_CONFIG", dir.with_extension("config.toml")).env_remove("BLIXARD_TOKEN");
    {
        // A joiner is in its seed's cluster; a node on a fresh dir without
        // --join founds one; a restarted node keeps the cluster it had.
        let mut founders = FOUNDERS.lock().unwrap();
        let fresh = !dir.join("identity").exists();
        match join {
            Some(seed) => {
                if let Some(f) = founders.get(&seed).cloned() {
                    founders.insert(port, f);
                }
            }
            None if fresh || !founders.contains_key(&port) => {
                founders.insert(port, dir.to_path_buf());
            }
            None => {}
        }
    }
    if let Some(seed) = join {
        if let Some(t) = wait_token(&founder_dir(seed)) {
            cmd.env("BLIXARD_TOKEN", t);
        }
    }
}

/// Records that the node at `port` is in the cluster founded in `founder`
/// (for nodes a test did not start through [`prepare_node`], e.g. `up`).
pub fn register(port: u16, founder: &Path) {
    FOUNDERS.lock().unwrap().insert(port, founder.to_path_buf());
}

fn founder_dir(port: u16) -> PathBuf {
    FOUNDERS.lock().unwrap().get(&port).cloned().unwrap_or_default()
}

/// The admin token in a founder's data dir, waiting up to 30 s for the
/// founder to write it (it does before its first Raft entry).
pub fn wait_token(founder: &Path) -> Option<String> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(t) = std::fs::read_to_string(founder.join("admin-token")) {
            return Some(t.trim().to_string());
        }
        if Instant::now() > deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// `blixard` for calls to the members at `addrs` (the first one's
/// cluster): with its admin token, and a config file of its own (never the
/// user's contexts).
pub fn client_command(addrs: &str) -> Command {
    let mut cmd = Command::new(BIN);
    cmd.env("BLIXARD_CONFIG", "/nonexistent/blixard-test-config.toml").env_remove("BLIXARD_TOKEN");
    // The first member this test started (a list may begin with a dead one).
    let token = addrs
        .split(',')
        .filter_map(|a| a.rsplit(':').next().and_then(|p| p.parse::<u16>().ok()))
        .find_map(admin_token);
    if let Some(t) = token {
        cmd.env("BLIXARD_TOKEN", t);
    }
    cmd
}

pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).to_string()
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).to_string()
}

/// Runs a command that must succeed; its stdout.
pub fn ok(port: u16, args: &[&str]) -> String {
    let out = cli(port, args);
    assert!(out.status.success(), "blixard {args:?} failed: {}{}", stdout(&out), stderr(&out));
    stdout(&out)
}

/// Runs a command that must succeed and print JSON; the JSON.
pub fn json_of(port: u16, args: &[&str]) -> serde_json::Value {
    let text = ok(port, args);
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{args:?}: not JSON ({e}): {text}"))
}

/// Runs a command that must exit with `code`; its output.
pub fn exits(port: u16, args: &[&str], code: i32) -> Output {
    let out = cli(port, args);
    assert_eq!(
        out.status.code(),
        Some(code),
        "blixard {args:?}: stdout {} stderr {}",
        stdout(&out),
        stderr(&out)
    );
    out
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

/// Starts node `id` on 127.0.0.1:`port` with its data in `dir` and its log
/// in `dir.log`; joins through the node at `join` if given. VMs are records
/// only (`--vm-backend none`; see [`start_node_backend`]).
pub fn start_node(id: u64, port: u16, dir: &Path, join: Option<u16>) -> Child {
    start_node_with(id, port, dir, join, &[])
}

/// [`start_node`] with more `node start` flags.
pub fn start_node_with(id: u64, port: u16, dir: &Path, join: Option<u16>, extra: &[&str]) -> Child {
    start_node_sized(id, port, dir, join, ["16", "8192", "100"], extra)
}

/// [`start_node_with`] offering `[vcpus, memory_mb, disk_gb]`.
pub fn start_node_sized(
    id: u64,
    port: u16,
    dir: &Path,
    join: Option<u16>,
    capacity: [&str; 3],
    extra: &[&str],
) -> Child {
    start_node_backend(id, port, dir, join, capacity, "none", extra)
}

/// [`start_node_sized`] with VM backend `backend` (`none`, `process`, ...).
pub fn start_node_backend(
    id: u64,
    port: u16,
    dir: &Path,
    join: Option<u16>,
    capacity: [&str; 3],
    backend: &str,
    extra: &[&str],
) -> Child {
    node_command(id, port, dir, join, capacity, backend, extra).spawn().expect("spawn blixard node")
}

/// The `node start` command [`start_node_backend`] runs, for a test that
/// changes something (environment, where stderr goes) before spawning it.
pub fn node_command(
    id: u64,
    port: u16,
    dir: &Path,
    join: Option<u16>,
    capacity: [&str; 3],
    backend: &str,
    extra: &[&str],
) -> Command {
    let log = std::fs::OpenOptions::new().create(true).append(true).open(dir.with_extension("log")).unwrap();
    let mut cmd = Command::new(BIN);
    prepare_node(&mut cmd, port, dir, join);
    cmd.args(["node", "start", "--id", &id.to_string(), "--bind", &loopback(port)])
        .arg("--data-dir")
        .arg(dir)
        .args(["--vcpus", capacity[0], "--memory-mb", capacity[1], "--disk-gb", capacity[2]])
        .args(["--vm-backend", backend])
        .args(extra)
        // TEST_NODE_LOG sets the nodes' log filter when debugging a test.
        .env("RUST_LOG", std::env::var("TEST_NODE_LOG").unwrap_or("info,openraft=warn".into()))
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log);
    if let Some(p) = join {
        cmd.args(["--join", &loopback(p)]);
    }
    if !extra.contains(&"--vm-network") {
        // No bridge or tap in the host's own namespace: tests of VM
        // networking run their nodes in namespaces they make (tests/vmnet.rs).
        cmd.args(["--vm-network", "none"]);
    }
    if !extra.contains(&"--metrics-addr") {
        // An ephemeral port: the default (bind port + 1000) could be another
        // test's node port.
        cmd.args(["--metrics-addr", "127.0.0.1:0"]);
    }
    cmd
}

/// Node processes a test started, by node id. Dropping it (also when the
/// test panics) resumes and kills them all; on a panic it prints the tail of
/// each node's log so the failure explains itself.
pub struct Nodes {
    pub procs: Vec<(u64, Child)>,
    pub dirs: Vec<PathBuf>,
    pub ports: Vec<u16>,
}

impl Nodes {
    /// Node 1 bootstraps under `root`, nodes 2 and 3 join it; all at once.
    pub fn three(root: &Path) -> Nodes {
        let dirs: Vec<PathBuf> = (1..=3).map(|i| root.join(format!("node-{i}"))).collect();
        let ports: Vec<u16> = (0..3).map(|_| free_port()).collect();
        let mut procs = vec![(1, start_node(1, ports[0], &dirs[0], None))];
        for i in 1..3 {
            procs.push((i as u64 + 1, start_node(i as u64 + 1, ports[i], &dirs[i], Some(ports[0]))));
        }
        Nodes { procs, dirs, ports }
    }

    pub fn port(&self, id: u64) -> u16 {
        self.ports[(id - 1) as usize]
    }

    pub fn addr(&self, id: u64) -> String {
        loopback(self.port(id))
    }

    /// The process id of node `id`.
    pub fn pid(&self, id: u64) -> libc::pid_t {
        self.procs.iter().find(|(i, _)| *i == id).expect("a running node").1.id() as libc::pid_t
    }

    /// Sends `signal` to node `id` (a process this test started).
    pub fn signal(&self, id: u64, signal: libc::c_int) {
        // SAFETY: signalling a child process of this test.
        let r = unsafe { libc::kill(self.pid(id), signal) };
        assert_eq!(r, 0, "signal {signal} to node {id}");
    }

    /// SIGKILLs node `id` and reaps it.
    pub fn kill(&mut self, id: u64) {
        let pos = self.procs.iter().position(|(i, _)| *i == id).expect("a running node");
        let (_, mut child) = self.procs.remove(pos);
        child.kill().unwrap();
        child.wait().unwrap();
    }

    /// Starts node `id` again from its own data dir.
    pub fn restart(&mut self, id: u64) {
        let i = (id - 1) as usize;
        self.procs.push((id, start_node(id, self.ports[i], &self.dirs[i], None)));
    }
}

impl Drop for Nodes {
    fn drop(&mut self) {
        for (_, c) in &mut self.procs {
            // SAFETY: resuming a child process of this test (a no-op unless stopped).
            unsafe {
                libc::kill(c.id() as libc::pid_t, libc::SIGCONT);
            }
            let _ = c.kill();
            let _ = c.wait();
        }
        if std::thread::panicking() {
            for dir in &self.dirs {
                let log = dir.with_extension("log");
                let text = std::fs::read_to_string(&log).unwrap_or_default();
                let tail: Vec<&str> = text.lines().rev().take(40).collect();
                eprintln!("---- {} (last 40 lines)", log.display());
                for l in tail.iter().rev() {
                    eprintln!("{l}");
                }
            }
        }
    }
}

/// The workloads the nodes started for their VMs (each in a session of its
/// own, so they outlive their node): killed when dropped, after the nodes,
/// by the pids in their VM directories.
pub struct Workloads(pub Vec<PathBuf>);

impl Drop for Workloads {
    fn drop(&mut self) {
        for dir in &self.0 {
            let Ok(vms) = std::fs::read_dir(dir.join("vms")) else { continue };
            for vm_dir in vms.flatten().map(|e| e.path()) {
                let Ok(pid) = std::fs::read_to_string(vm_dir.join("pid")) else { continue };
                let Ok(pid) = pid.trim().parse::<libc::pid_t>() else { continue };
                // Only if the pid is still that workload (its argv[0] is
                // tagged with its VM directory), not a reused one.
                let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
                let argv0 =
                    String::from_utf8_lossy(cmdline.split(|b| *b == 0).next().unwrap_or(&[])).to_string();
                if argv0.starts_with("blixard-vm:") && argv0.contains(&*vm_dir.to_string_lossy()) {
                    // SAFETY: the process group of a workload this test's
                    // nodes started (its session leader is the workload).
                    unsafe {
                        libc::kill(-pid, libc::SIGKILL);
                    }
                }
            }
        }
    }
}

/// A plain HTTP/1.1 GET on loopback; returns the status code and body.
pub fn http_get(addr: &str, path: &str) -> Option<(u16, String)> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
    write!(s, "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").ok()?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).ok()?;
    let text = String::from_utf8_lossy(&raw).into_owned();
    let (head, body) = text.split_once("\r\n\r\n")?;
    let code = head.split_whitespace().nth(1)?.parse().ok()?;
    // Prometheus answers with chunked encoding for large bodies; the
    // metrics endpoint with a length. Undo chunking when present.
    let body = if head.to_ascii_lowercase().contains("transfer-encoding: chunked") {
        let mut out = String::new();
        let mut rest = body;
        while let Some((size, tail)) = rest.split_once("\r\n") {
            let n = usize::from_str_radix(size.trim(), 16).ok()?;
            if n == 0 {
                break;
            }
            out.push_str(tail.get(..n)?);
            rest = tail.get(n + 2..)?;
        }
        out
    } else {
        body.to_string()
    };
    Some((code, body))
}
