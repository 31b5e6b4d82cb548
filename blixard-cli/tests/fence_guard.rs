//! The host's fence guard with real processes: a `ProcessBackend` whose
//! lease is enforced by `blixard fence-guard` (this crate's binary). The
//! guard stops every VM once the lease lapses (SIGTERM, SIGKILL after the
//! grace), leaves them alone while it is renewed, and exits once the lease
//! lapsed, nothing runs and its node process is gone. A correctness test:
//! waits are bounded but generous.
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use blixard_vm::guard::{GuardCommand, GUARD_LOG, GUARD_PIDFILE, GUARD_WORD};
use blixard_vm::host::{self, VmDirs};
use blixard_vm::process::ProcessBackend;
use blixard_vm::{BootSource, RunState, VmBackend, VmConfig, VmStatus, READY_MARKER};
use tokio::time::Instant;

mod common;
use common::BIN;

const LEASE: Duration = Duration::from_secs(1);
const GRACE: Duration = Duration::from_millis(500);
/// How long the guard may take beyond lease + grace (it looks every 100 ms).
const SLACK: Duration = Duration::from_secs(1);

/// A workload that exits 0 on SIGTERM, or ignores it if its name starts
/// with "stubborn" (its `sleep` inherits the ignored signal).
fn workload() -> Vec<String> {
    let script = format!(
        "case \"$BLIXARD_VM_NAME\" in stubborn*) trap '' TERM ;; *) trap 'exit 0' TERM ;; esac; \
         echo {READY_MARKER}; sleep 1000 & wait $!"
    );
    vec!["/bin/sh".into(), "-c".into(), script]
}

fn vm(name: &str) -> VmConfig {
    VmConfig {
        name: name.into(),
        vcpus: 1,
        memory_mb: 64,
        boot: BootSource::default(),
        net: None,
        disk_gb: 0,
    }
}

fn guard_command() -> GuardCommand {
    GuardCommand { program: PathBuf::from(BIN), args: vec!["fence-guard".into()] }
}

/// Every process this test may have started: guards (by pidfile and as
/// children), workloads (by their VM directories) and fake node processes.
/// Killed on drop, also when the test fails; then the guard logs are printed.
struct Cleanup {
    roots: Vec<PathBuf>,
    guards: Vec<u32>,
    children: Vec<Child>,
}

impl Cleanup {
    fn new(root: &Path) -> Cleanup {
        Cleanup { roots: vec![root.to_path_buf()], guards: Vec::new(), children: Vec::new() }
    }
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        for root in &self.roots {
            self.guards.extend(host::read_pidfile(&root.join(GUARD_PIDFILE)));
            let dirs = VmDirs::new(root);
            for name in dirs.names().unwrap_or_default() {
                if let Some(pid) = host::read_pidfile(&dirs.pidfile(&name)) {
                    if host::pid_alive(pid, &dirs.needle(&name)) {
                        host::signal_group(pid, libc::SIGKILL);
                    }
                }
            }
        }
        for &pid in &self.guards {
            if host::pid_alive(pid, GUARD_WORD) {
                host::signal(pid, libc::SIGKILL);
            }
        }
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
        if std::thread::panicking() {
            for root in &self.roots {
                let log = std::fs::read_to_string(root.join(GUARD_LOG)).unwrap_or_default();
                eprintln!("---- {}\n{log}", root.join(GUARD_LOG).display());
            }
        }
    }
}

async fn status(b: &ProcessBackend, name: &str) -> VmStatus {
    b.status(name).await.unwrap().expect("a known VM")
}

/// Polls `f` every 50 ms until it holds; fails after `limit`.
async fn wait_until(what: &str, limit: Duration, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !f() {
        assert!(Instant::now() < deadline, "not within {limit:?}: {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Renews the lease every 100 ms until every VM in `names` is `Running`.
async fn renew_until_running(b: &ProcessBackend, names: &[&str]) {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        b.renew_lease(LEASE, GRACE).await.unwrap();
        let mut all = true;
        for n in names {
            all &= status(b, n).await.state == RunState::Running;
        }
        if all {
            return;
        }
        assert!(Instant::now() < deadline, "{names:?} not running within 15 s");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Waits (after the last renewal) until `name` has stopped, and returns its
/// final status.
async fn wait_fenced(b: &ProcessBackend, name: &str, renewed: Instant) -> VmStatus {
    let deadline = renewed + LEASE + GRACE + SLACK;
    loop {
        let s = status(b, name).await;
        if s.pid.is_none() {
            return s;
        }
        assert!(
            Instant::now() < deadline,
            "{name} still runs {:?} after the last renewal: {s:?}",
            LEASE + GRACE + SLACK
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn guard_log(root: &Path) -> String {
    std::fs::read_to_string(root.join(GUARD_LOG)).unwrap_or_default()
}

fn spawn_guard(root: &Path, node_pid: u32) -> Child {
    Command::new(BIN)
        .args(["fence-guard", "--root"])
        .arg(root)
        .args(["--node-pid", &node_pid.to_string()])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap()
}

fn spawn_sleep() -> Child {
    Command::new("sleep").arg("1000").stdin(Stdio::null()).spawn().unwrap()
}

/// The backend starts a guard on the first renewal; a lapsed lease stops the
/// VMs (as requested stops), renewals keep them running, and a workload that
/// ignores SIGTERM is killed after the grace.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lapsed_lease_stops_every_vm() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("vms");
    let mut cleanup = Cleanup::new(&root);
    let b = ProcessBackend::new(root.clone(), workload()).with_guard(guard_command());

    b.renew_lease(LEASE, GRACE).await.unwrap();
    let guard = host::read_pidfile(&root.join(GUARD_PIDFILE)).expect("a guard pidfile");
    cleanup.guards.push(guard);
    assert!(host::pid_alive(guard, GUARD_WORD), "the guard runs");

    // Two VMs run while the lease is renewed, then it lapses.
    b.start(&vm("a")).await.unwrap();
    b.start(&vm("b")).await.unwrap();
    renew_until_running(&b, &["a", "b"]).await;
    let renewed = Instant::now();
    for name in ["a", "b"] {
        let s = wait_fenced(&b, name, renewed).await;
        assert_eq!(s.state, RunState::Stopped, "{name}: a requested stop, not a failure: {s:?}");
        assert_eq!(s.exit.as_ref().and_then(|e| e.code), Some(0), "{name} exited on SIGTERM");
    }
    let log = guard_log(&root);
    for name in ["a", "b"] {
        assert!(log.contains(&format!("VM {name}: marked stopped, sent SIGTERM")), "{log}");
    }
    assert!(log.contains("lease expired"), "{log}");

    // Renewed: a VM keeps running for longer than several leases, under the
    // same guard (renewals do not start another).
    b.renew_lease(LEASE, GRACE).await.unwrap();
    b.start(&vm("c")).await.unwrap();
    renew_until_running(&b, &["c"]).await;
    let pid = status(&b, "c").await.pid;
    let until = Instant::now() + Duration::from_secs(3);
    while Instant::now() < until {
        b.renew_lease(LEASE, GRACE).await.unwrap();
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let s = status(&b, "c").await;
    assert_eq!((s.state, s.pid), (RunState::Running, pid), "renewed: c runs on");
    assert_eq!(host::read_pidfile(&root.join(GUARD_PIDFILE)), Some(guard), "one guard");
    assert!(host::pid_alive(guard, GUARD_WORD));
    for name in ["a", "b"] {
        assert_eq!(status(&b, name).await.state, RunState::Stopped, "{name} stays stopped");
    }

    // A workload that ignores SIGTERM is killed after the grace.
    b.start(&vm("stubborn")).await.unwrap();
    renew_until_running(&b, &["c", "stubborn"]).await;
    let renewed = Instant::now();
    let s = wait_fenced(&b, "stubborn", renewed).await;
    assert_eq!(s.state, RunState::Stopped, "{s:?}");
    assert_eq!(s.exit.as_ref().and_then(|e| e.signal), Some(libc::SIGKILL), "{s:?}");
    let s = wait_fenced(&b, "c", renewed).await;
    assert_eq!((&s.state, s.exit.as_ref().and_then(|e| e.code)), (&RunState::Stopped, Some(0)), "{s:?}");
    let log = guard_log(&root);
    assert!(log.contains("VM stubborn: marked stopped, sent SIGTERM"), "{log}");
    assert!(log.contains("VM stubborn: process") && log.contains("sent SIGKILL"), "{log}");
    assert!(log.lines().filter(|l| l.contains("VM c:")).all(|l| !l.contains("SIGKILL")), "{log}");

    // This test process is the guard's node: it stays while we live.
    assert!(host::pid_alive(guard, GUARD_WORD));
}

/// A guard started by hand for a fake node process: a second one for the
/// same node leaves, one for another node (a restarted node) takes over,
/// and the guard exits once the lease lapsed, nothing runs and its node
/// process is gone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_guard_exits_when_nothing_is_left_to_guard() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("vms");
    let mut cleanup = Cleanup::new(&root);
    // No guard command: the backend only writes the lease.
    let b = ProcessBackend::new(root.clone(), workload());
    b.renew_lease(LEASE, GRACE).await.unwrap();
    assert!(!root.join(GUARD_PIDFILE).exists());

    let old_node = spawn_sleep();
    let old_node_pid = old_node.id();
    cleanup.children.push(old_node);
    let first = spawn_guard(&root, old_node_pid);
    let first_pid = first.id();
    cleanup.children.push(first);
    wait_until("the guard claims its pidfile", Duration::from_secs(10), || {
        host::read_pidfile(&root.join(GUARD_PIDFILE)) == Some(first_pid)
    })
    .await;

    // A second guard for the same node leaves at once.
    let mut dup = spawn_guard(&root, old_node_pid);
    let status = dup.wait().unwrap();
    assert!(status.success(), "{status}");
    assert_eq!(host::read_pidfile(&root.join(GUARD_PIDFILE)), Some(first_pid));

    // The node "restarts": its new guard takes over from the old one.
    let node = spawn_sleep();
    let node_pid = node.id();
    cleanup.children.push(node);
    let second = spawn_guard(&root, node_pid);
    let second_pid = second.id();
    cleanup.children.push(second);
    wait_until("the old guard leaves", Duration::from_secs(10), || {
        matches!(cleanup.children[1].try_wait(), Ok(Some(_)))
    })
    .await;
    assert_eq!(host::read_pidfile(&root.join(GUARD_PIDFILE)), Some(second_pid));

    b.start(&vm("d")).await.unwrap();
    renew_until_running(&b, &["d"]).await;
    let renewed = Instant::now();
    let s = wait_fenced(&b, "d", renewed).await;
    assert_eq!(s.state, RunState::Stopped, "{s:?}");

    // Nothing runs, the lease lapsed, but the node process lives: it stays.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(cleanup.children[3].try_wait().unwrap().is_none(), "the guard stays while its node lives");

    // The node process dies: the guard exits, successfully.
    cleanup.children[2].kill().unwrap();
    cleanup.children[2].wait().unwrap();
    let mut exited = None;
    wait_until("the guard exits", Duration::from_secs(10), || {
        exited = cleanup.children[3].try_wait().unwrap();
        exited.is_some()
    })
    .await;
    assert!(exited.is_some_and(|s| s.success()), "{exited:?}");
    let log = guard_log(&root);
    assert!(log.contains(&format!("guard {first_pid} already guards node process {old_node_pid}")), "{log}");
    assert!(log.contains(&format!("guard {second_pid} took over")), "{log}");
    assert!(log.contains("VM d: marked stopped, sent SIGTERM"), "{log}");
    assert!(
        log.contains(&format!("exiting: lease expired, no VM runs, node process {node_pid} is gone")),
        "{log}"
    );
}
