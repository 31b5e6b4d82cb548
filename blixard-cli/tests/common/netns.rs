//! Several "hosts" on one machine: one network namespace per host, for tests
//! and benches that cut a node off the network and heal it again.
//!
//! [`Net::new`] makes a hub namespace holding a bridge, and one namespace per
//! host with a veth pair into that bridge. Host `i` has the address
//! `10.213.X.(i+1)/24`, the hub `10.213.X.254`. These addresses exist only
//! inside the run's own namespaces, so neither the machine's networks nor a
//! parallel run can collide with them; the namespace names carry the pid and
//! a per-process counter for the same reason.
//!
//! A partition is iptables DROP for everything but loopback, both ways,
//! inside the host's namespace: packets vanish as on a cut cable (nothing is
//! refused), while the host can still talk to itself, so its own status can
//! be read during the partition.
//!
//! Clean-up is [`Drop`], which also runs while a test panics: processes
//! started here are SIGKILLed and reaped, then the namespaces are deleted,
//! which destroys the veths and the bridge with them. If the whole run is
//! killed, its processes die with it (`PR_SET_PDEATHSIG`) and the next
//! `Net::new` deletes namespaces whose owning pid is gone.
//!
//! Needs root, iproute2 and iptables (`scripts/test` installs them). Without
//! them `Net::new` panics: a partition test must never pass by skipping.
use std::ffi::OsStr;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

const PREFIX: &str = "bxnet";
static SEQ: AtomicU32 = AtomicU32::new(0);

pub struct Net {
    /// `bxnet-<pid>-<seq>`: every namespace of this run starts with it.
    name: String,
    subnet: u8,
    hosts: usize,
    /// Namespaces created so far (deleted on drop, in reverse).
    namespaces: Vec<String>,
    /// Processes started in the namespaces, by pid.
    procs: Vec<Child>,
    isolated: Vec<bool>,
}

/// Runs `ip ARGS` (or any `program`) and panics with its stderr on failure.
fn run(program: &str, args: &[&str]) {
    let out = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {program}: {e} (install iproute2 and iptables)"));
    assert!(
        out.status.success(),
        "{program} {} failed: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr).trim()
    );
}

fn pid_alive(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

/// Deletes namespaces left by runs that were killed outright: named
/// `bxnet-<pid>-...` with that pid gone.
fn sweep_stale() {
    let Ok(out) = Command::new("ip").args(["netns", "list"]).output() else { return };
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let Some(ns) = line.split_whitespace().next() else { continue };
        let mut parts = ns.split('-');
        if parts.next() != Some(PREFIX) {
            continue;
        }
        let Some(pid) = parts.next().and_then(|p| p.parse::<u32>().ok()) else { continue };
        if !pid_alive(pid) {
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
    }
}

impl Net {
    /// `hosts` namespaces joined by a bridge. Panics (never skips) when not
    /// root or when `ip`/`iptables` are missing or do not work.
    pub fn new(hosts: usize) -> Net {
        assert!((1..=250).contains(&hosts), "1..=250 hosts");
        // SAFETY: geteuid has no preconditions.
        let euid = unsafe { libc::geteuid() };
        assert_eq!(euid, 0, "network-namespace tests need root (ip netns, iptables); run them as root");
        run("ip", &["-V"]);
        sweep_stale();
        let seq = SEQ.fetch_add(1, Ordering::Relaxed);
        let mut net = Net {
            name: format!("{PREFIX}-{}-{seq}", std::process::id()),
            subnet: (seq % 250) as u8,
            hosts,
            namespaces: Vec::new(),
            procs: Vec::new(),
            isolated: vec![false; hosts],
        };
        let hub = net.hub();
        net.add_namespace(&hub);
        run("ip", &["-n", &hub, "link", "add", "br0", "type", "bridge"]);
        run("ip", &["-n", &hub, "link", "set", "br0", "up"]);
        run("ip", &["-n", &hub, "addr", "add", &format!("{}/24", net.hub_ip()), "dev", "br0"]);
        for i in 0..hosts {
            let ns = net.ns(i);
            net.add_namespace(&ns);
            let port = format!("v{i}");
            // Created in the hub with its peer directly in the host's
            // namespace: no interface ever appears in the machine's own.
            run(
                "ip",
                &["-n", &hub, "link", "add", &port, "type", "veth", "peer", "name", "eth0", "netns", &ns],
            );
            run("ip", &["-n", &hub, "link", "set", &port, "master", "br0", "up"]);
            run("ip", &["-n", &ns, "link", "set", "lo", "up"]);
            run("ip", &["-n", &ns, "addr", "add", &format!("{}/24", net.ip(i)), "dev", "eth0"]);
            run("ip", &["-n", &ns, "link", "set", "eth0", "up"]);
        }
        // iptables must work inside a namespace (either backend), or no
        // partition could be made: fail now, with the reason.
        net.iptables(0, &["-S"]);
        net
    }

    /// The hub's namespace (holds the bridge; a neutral place for clients).
    pub fn hub(&self) -> String {
        format!("{}-hub", self.name)
    }

    pub fn hub_ip(&self) -> String {
        format!("10.213.{}.254", self.subnet)
    }

    /// Host `i`'s namespace.
    pub fn ns(&self, i: usize) -> String {
        assert!(i < self.hosts, "host {i} of {}", self.hosts);
        format!("{}-h{i}", self.name)
    }

    /// Host `i`'s address.
    pub fn ip(&self, i: usize) -> String {
        assert!(i < self.hosts, "host {i} of {}", self.hosts);
        format!("10.213.{}.{}", self.subnet, i + 1)
    }

    fn add_namespace(&mut self, ns: &str) {
        run("ip", &["netns", "add", ns]);
        self.namespaces.push(ns.to_string());
    }

    /// A command that runs `program` inside namespace `ns` (a host's or the
    /// hub's). `ip netns exec` execs `program` in place, so the child's pid
    /// is the program's. The child is killed if the thread that started it
    /// dies, so an aborted run leaves no processes behind.
    pub fn command_in(&self, ns: &str, program: impl AsRef<OsStr>) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", ns]).arg(program).stdin(Stdio::null());
        // SAFETY: prctl is async-signal-safe and touches no memory of ours.
        unsafe {
            c.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        c
    }

    /// [`command_in`](Self::command_in) host `i`'s namespace.
    pub fn command(&self, i: usize, program: impl AsRef<OsStr>) -> Command {
        self.command_in(&self.ns(i), program)
    }

    /// Runs `program ARGS` in host `i`'s namespace to completion.
    pub fn output(&self, i: usize, program: impl AsRef<OsStr>, args: &[&str]) -> Output {
        self.command(i, program).args(args).output().expect("run a command in a namespace")
    }

    /// Starts a long-running process (made with [`command`](Self::command))
    /// and owns it: it is killed on drop. Returns its pid.
    pub fn spawn(&mut self, mut cmd: Command) -> u32 {
        let child = cmd.spawn().expect("spawn a process in a namespace");
        let pid = child.id();
        self.procs.push(child);
        pid
    }

    /// Whether a process started here is still running (not reaped).
    pub fn running(&mut self, pid: u32) -> bool {
        let c = self.child(pid);
        matches!(c.try_wait(), Ok(None))
    }

    fn child(&mut self, pid: u32) -> &mut Child {
        self.procs
            .iter_mut()
            .find(|c| c.id() == pid)
            .unwrap_or_else(|| panic!("pid {pid} was not started here"))
    }

    /// SIGKILLs a process started here and reaps it.
    pub fn kill(&mut self, pid: u32) {
        let c = self.child(pid);
        let _ = c.kill();
        let _ = c.wait();
        self.procs.retain(|c| c.id() != pid);
    }

    /// Sends `signal` (SIGSTOP, SIGCONT, ...) to a process started here.
    pub fn signal(&mut self, pid: u32, signal: libc::c_int) {
        assert!(self.running(pid), "pid {pid} is not running");
        // SAFETY: plain kill(2) on a child we have not reaped, so the pid
        // cannot have been reused.
        let rc = unsafe { libc::kill(pid as libc::pid_t, signal) };
        assert_eq!(rc, 0, "kill({pid}, {signal}): {}", std::io::Error::last_os_error());
    }

    fn iptables(&self, i: usize, args: &[&str]) {
        let out = self.output(i, "iptables", &[&["-w"], args].concat());
        assert!(
            out.status.success(),
            "iptables {} in {} failed: {} (is iptables installed and usable in a network namespace?)",
            args.join(" "),
            self.ns(i),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }

    /// Cuts host `i` off: every packet in or out that is not loopback is
    /// dropped.
    pub fn isolate(&mut self, i: usize) {
        assert!(!self.isolated[i], "host {i} is already isolated");
        self.iptables(i, &["-A", "INPUT", "!", "-i", "lo", "-j", "DROP"]);
        self.iptables(i, &["-A", "OUTPUT", "!", "-o", "lo", "-j", "DROP"]);
        self.isolated[i] = true;
    }

    /// Undoes [`isolate`](Self::isolate).
    pub fn heal(&mut self, i: usize) {
        assert!(self.isolated[i], "host {i} is not isolated");
        self.iptables(i, &["-D", "INPUT", "!", "-i", "lo", "-j", "DROP"]);
        self.iptables(i, &["-D", "OUTPUT", "!", "-o", "lo", "-j", "DROP"]);
        self.isolated[i] = false;
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        for c in &mut self.procs {
            let _ = c.kill();
            let _ = c.wait();
        }
        // Deleting a namespace destroys its interfaces; a veth pair dies
        // with either end, the bridge with the hub.
        for ns in self.namespaces.iter().rev() {
            let _ = Command::new("ip").args(["netns", "del", ns]).stderr(Stdio::null()).status();
        }
    }
}

/// The port every node listens on (each in its own namespace and address).
pub const PORT: u16 = 7420;

/// Polls `f` every 50 ms until it returns Some; None after `secs`.
pub fn poll<T>(secs: f64, mut f: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = Instant::now() + Duration::from_secs_f64(secs);
    loop {
        if let Some(v) = f() {
            return Some(v);
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A cluster of real `blixard` processes, node `i + 1` on host `i`, each in
/// its own namespace; data dirs and logs under a temporary directory. On a
/// panic it prints the tail of every node's log.
pub struct NsCluster {
    /// Declared first: dropped (processes killed) before the data dirs go.
    pub net: Net,
    root: tempfile::TempDir,
    bin: PathBuf,
    log_filter: String,
    pids: Vec<Option<u32>>,
}

impl NsCluster {
    /// Starts `n` nodes at once: node 1 bootstraps, the others join it.
    /// Nodes log with `log_filter` (tracing EnvFilter syntax).
    pub fn start(bin: impl Into<PathBuf>, n: usize, log_filter: &str) -> NsCluster {
        let mut c = NsCluster {
            net: Net::new(n),
            root: tempfile::Builder::new().prefix("blixard-netns-").tempdir().expect("temp dir"),
            bin: bin.into(),
            log_filter: log_filter.to_string(),
            pids: vec![None; n],
        };
        for i in 0..n {
            c.start_node(i, i > 0);
        }
        c
    }

    pub fn len(&self) -> usize {
        self.pids.len()
    }

    /// Host `i`'s node address.
    pub fn addr(&self, i: usize) -> String {
        format!("{}:{PORT}", self.net.ip(i))
    }

    /// Where the node data dirs and logs are.
    pub fn root(&self) -> &Path {
        self.root.path()
    }

    /// Leaves the data dirs and logs in place after the drop.
    pub fn keep_files(&mut self) {
        self.root.disable_cleanup(true);
    }

    pub fn log_path(&self, i: usize) -> PathBuf {
        self.root.path().join(format!("node-{}.log", i + 1))
    }

    /// Starts node `i + 1` on host `i`: from its data dir if it has one
    /// (restart), else joining node 1 when `join`, else bootstrapping.
    pub fn start_node(&mut self, i: usize, join: bool) {
        assert!(self.pids[i].is_none(), "node {} is already running", i + 1);
        let dir = self.root.path().join(format!("node-{}", i + 1));
        let log =
            std::fs::OpenOptions::new().create(true).append(true).open(self.log_path(i)).expect("node log");
        let mut cmd = self.net.command(i, &self.bin);
        cmd.args(["node", "start", "--id", &(i + 1).to_string(), "--bind", &self.addr(i)])
            .arg("--data-dir")
            .arg(&dir)
            .args(["--vcpus", "60000", "--memory-mb", "1073741824", "--disk-gb", "1073741824"])
            // Control-plane only: VMs are records.
            .args(["--vm-backend", "none"])
            // Private addresses inside test namespaces that nothing else
            // reaches: plaintext on purpose.
            .arg("--insecure-plaintext")
            .env("RUST_LOG", &self.log_filter)
            .stdout(log.try_clone().expect("node log"))
            .stderr(log);
        // Node 1 founds the cluster and keeps its admin token in its data
        // dir; joiners present it, and no node writes the user's config.
        cmd.env("BLIXARD_CONFIG", self.root.path().join(format!("node-{}.config.toml", i + 1)))
            .env_remove("BLIXARD_TOKEN");
        if join && !dir.exists() {
            cmd.args(["--join", &self.addr(0)]);
            let token = self.root.path().join("node-1").join("admin-token");
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
            while !token.exists() && std::time::Instant::now() < deadline {
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            if let Ok(t) = std::fs::read_to_string(&token) {
                cmd.env("BLIXARD_TOKEN", t.trim());
            }
        }
        self.pids[i] = Some(self.net.spawn(cmd));
    }

    /// SIGKILLs node `i + 1`.
    pub fn kill(&mut self, i: usize) {
        let pid = self.pids[i].take().unwrap_or_else(|| panic!("node {} is not running", i + 1));
        self.net.kill(pid);
    }

    /// Node `i + 1`'s process id (for SIGSTOP/SIGCONT).
    pub fn pid(&self, i: usize) -> u32 {
        self.pids[i].unwrap_or_else(|| panic!("node {} is not running", i + 1))
    }

    /// Runs `blixard --addr <node i> ARGS` inside host `i`'s namespace.
    pub fn cli(&self, i: usize, args: &[&str]) -> Output {
        let addr = self.addr(i);
        let mut cmd = self.net.command(i, &self.bin);
        cmd.env("BLIXARD_CONFIG", "/nonexistent/blixard-test-config.toml").env_remove("BLIXARD_TOKEN");
        if let Ok(t) = std::fs::read_to_string(self.root.path().join("node-1").join("admin-token")) {
            cmd.env("BLIXARD_TOKEN", t.trim());
        }
        cmd.args(["--addr", addr.as_str()]).args(args).output().expect("run blixard in a namespace")
    }

    /// Node `i + 1`'s own view (`cluster status -o json`), if it answers.
    pub fn status(&self, i: usize) -> Option<Status> {
        let out = self.cli(i, &["cluster", "status", "-o", "json"]);
        if !out.status.success() {
            return None;
        }
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
        Some(Status {
            node: v["node_id"].as_u64()?,
            leader: v["leader_id"].as_u64(),
            term: v["term"].as_u64()?,
            applied: v["applied_index"].as_u64()?,
            voters: v["members"].as_array()?.iter().filter(|m| m["role"] != "learner").count(),
            registered: v["nodes"].as_array()?.len(),
        })
    }

    /// Creates a VM record named `name` through node `i + 1` (a write that
    /// goes through Raft; the node forwards it to the leader).
    pub fn write(&self, i: usize, name: &str) -> Output {
        self.cli(i, &["vm", "create", name, "--vcpus", "1", "--memory", "16", "--disk", "1", "--no-start"])
    }

    /// Waits until every node reports all `n` voters registered and the
    /// same leader and term; returns that (leader host index, term).
    pub fn wait_formed(&self, secs: f64) -> (usize, u64) {
        let n = self.len();
        poll(secs, || {
            let (leader, term) = self.agreed()?;
            let s = self.status(leader)?;
            (s.voters == n && s.registered == n).then_some((leader, term))
        })
        .unwrap_or_else(|| panic!("cluster of {n} did not form within {secs}s"))
    }

    /// The leader (host index) and term if every running node reports the
    /// same ones right now.
    pub fn agreed(&self) -> Option<(usize, u64)> {
        self.agreed_among((0..self.len()).filter(|i| self.pids[*i].is_some()))
    }

    /// The leader (host index) and term if the nodes on `hosts` all report
    /// the same ones right now.
    pub fn agreed_among(&self, hosts: impl IntoIterator<Item = usize>) -> Option<(usize, u64)> {
        let mut seen: Option<(u64, u64)> = None;
        for i in hosts {
            let s = self.status(i)?;
            let now = (s.leader?, s.term);
            if seen.is_some_and(|x| x != now) {
                return None;
            }
            seen = Some(now);
        }
        seen.map(|(leader, term)| (leader as usize - 1, term))
    }

    fn tail(&self, i: usize, lines: usize) -> String {
        let text = std::fs::read_to_string(self.log_path(i)).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }
}

impl Drop for NsCluster {
    fn drop(&mut self) {
        if std::thread::panicking() {
            for i in 0..self.len() {
                eprintln!("---- node {} log (last 60 lines)\n{}", i + 1, self.tail(i, 60));
            }
        }
    }
}

/// What `cluster status` of one node says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Status {
    pub node: u64,
    pub leader: Option<u64>,
    pub term: u64,
    pub applied: u64,
    pub voters: usize,
    pub registered: usize,
}
