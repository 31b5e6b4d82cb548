//! The process backend with real processes.
#![cfg(not(madsim))]
use std::path::Path;
use std::time::Duration;

use blixard_vm::host;
use blixard_vm::process::ProcessBackend;
use blixard_vm::{BackendKind, BootSource, RunState, VmBackend, VmConfig, VmError, VmStatus, READY_MARKER};

fn vm(name: &str) -> VmConfig {
    VmConfig {
        name: name.into(),
        vcpus: 2,
        memory_mb: 64,
        boot: BootSource::default(),
        net: None,
        disk_gb: 0,
    }
}

fn sh(script: &str) -> Vec<String> {
    vec!["/bin/sh".into(), "-c".into(), script.into()]
}

/// Polls until `pred` holds (generous deadline; no timing assertions).
async fn wait_for(b: &ProcessBackend, name: &str, pred: impl Fn(&VmStatus) -> bool) -> VmStatus {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let s = b.status(name).await.unwrap().expect("known VM");
        if pred(&s) {
            return s;
        }
        assert!(tokio::time::Instant::now() < deadline, "timed out; last status {s:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn is_failed(s: &VmStatus) -> bool {
    matches!(s.state, RunState::Failed { .. })
}

fn reason(s: &VmStatus) -> &str {
    match &s.state {
        RunState::Failed { reason } => reason,
        other => panic!("not failed: {other:?}"),
    }
}

async fn console(b: &ProcessBackend, name: &str) -> String {
    String::from_utf8_lossy(&b.logs(name, 0, 1 << 20).await.unwrap().data).into_owned()
}

/// True while `pid` exists at all (a zombie counts as gone).
fn exists(pid: u32) -> bool {
    host::pid_alive(pid, "")
}

#[tokio::test]
async fn lifecycle_of_the_default_workload() {
    let root = tempfile::tempdir().unwrap();
    let b = ProcessBackend::new(root.path().to_path_buf(), ProcessBackend::default_command());
    assert_eq!(b.kind(), BackendKind::Process);
    assert!(b.describe().starts_with("process: /bin/sh -c"), "{}", b.describe());

    let s = b.start(&vm("web")).await.unwrap();
    assert_eq!(s.state, RunState::Starting);
    let pid = s.pid.unwrap();
    assert!(s.started_at_ms.is_some());
    assert!(
        matches!(b.start(&vm("web")).await, Err(VmError::Failed(_))),
        "starting a running VM is an error"
    );

    let s = wait_for(&b, "web", |s| s.state == RunState::Running).await;
    assert_eq!(s.pid, Some(pid));
    assert!(s.boot_ms.is_some());
    let log = console(&b, "web").await;
    assert!(log.contains(READY_MARKER), "{log}");
    assert!(log.contains("web: 2 vCPU, 64 MiB"), "the workload sees its environment: {log}");
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap();
    assert!(String::from_utf8_lossy(&cmdline)
        .contains(&format!("blixard-vm:{}/", root.path().join("web").display())));
    let listed = b.list().await.unwrap();
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].state, RunState::Running);

    // Graceful stop: SIGTERM, the workload's trap exits 0 well within the grace.
    b.stop("web", Duration::from_secs(15)).await.unwrap();
    let s = b.status("web").await.unwrap().unwrap();
    assert_eq!(s.state, RunState::Stopped);
    assert_eq!(s.pid, None);
    assert_eq!(s.exit.as_ref().and_then(|e| e.code), Some(0), "{s:?}");
    assert!(!exists(pid));
    b.stop("web", Duration::from_secs(1)).await.unwrap(); // no-op

    // Start again: a new process, a fresh console, the marker again.
    let s = b.start(&vm("web")).await.unwrap();
    let pid2 = s.pid.unwrap();
    assert_ne!(pid2, pid);
    let s = wait_for(&b, "web", |s| s.state == RunState::Running).await;
    assert!(s.boot_ms.is_some());

    // kill -9 from outside: Failed, with the signal.
    assert!(host::signal(pid2, libc::SIGKILL));
    let s = wait_for(&b, "web", is_failed).await;
    assert!(reason(&s).contains("signal 9"), "{s:?}");
    assert_eq!(s.exit.as_ref().and_then(|e| e.signal), Some(9));
    // Stopping a dead VM is a no-op and keeps the failure.
    b.stop("web", Duration::from_secs(1)).await.unwrap();
    assert!(is_failed(&b.status("web").await.unwrap().unwrap()));

    // Delete: no process, no files.
    let s = b.start(&vm("web")).await.unwrap();
    let pid3 = s.pid.unwrap();
    b.delete("web").await.unwrap();
    assert!(!exists(pid3));
    assert!(!root.path().join("web").exists());
    assert!(b.status("web").await.unwrap().is_none());
    assert!(b.list().await.unwrap().is_empty());
    b.delete("web").await.unwrap(); // unknown: no-op
    assert!(matches!(b.stop("web", Duration::from_secs(1)).await, Err(VmError::NotFound(_))));
    assert!(matches!(b.logs("web", 0, 10).await, Err(VmError::NotFound(_))));
}

#[tokio::test]
async fn exit_codes_and_stubborn_workloads() {
    let root = tempfile::tempdir().unwrap();

    // A workload that fails on its own.
    let b = ProcessBackend::new(root.path().to_path_buf(), sh("echo about to fail; echo oops >&2; exit 3"));
    b.start(&vm("bad")).await.unwrap();
    let s = wait_for(&b, "bad", is_failed).await;
    let r = reason(&s);
    assert!(r.contains("code 3"), "{r}");
    assert!(r.contains("oops"), "the console tail (stderr too) is in the reason: {r}");
    assert_eq!(s.exit.as_ref().and_then(|e| e.code), Some(3));
    assert_eq!(s.boot_ms, None, "it never became ready");

    // A workload that finishes cleanly is Stopped.
    let b = ProcessBackend::new(root.path().to_path_buf(), sh(&format!("echo {READY_MARKER}; exit 0")));
    b.start(&vm("once")).await.unwrap();
    wait_for(&b, "once", |s| s.state == RunState::Stopped).await;

    // A workload that ignores SIGTERM is killed after the grace period, and
    // still counts as stopped (the stop was requested).
    let b = ProcessBackend::new(
        root.path().to_path_buf(),
        sh(&format!("trap '' TERM; echo {READY_MARKER}; while :; do sleep 0.05; done")),
    );
    let pid = b.start(&vm("stubborn")).await.unwrap().pid.unwrap();
    wait_for(&b, "stubborn", |s| s.state == RunState::Running).await;
    b.stop("stubborn", Duration::from_millis(300)).await.unwrap();
    let s = b.status("stubborn").await.unwrap().unwrap();
    assert_eq!(s.state, RunState::Stopped, "{s:?}");
    assert_eq!(s.exit.as_ref().and_then(|e| e.signal), Some(9));
    assert!(!exists(pid));

    // A command that cannot be launched.
    let b = ProcessBackend::new(root.path().to_path_buf(), vec!["/nonexistent/blixard-workload".into()]);
    assert!(matches!(b.start(&vm("nope")).await, Err(VmError::Failed(_))));
}

#[tokio::test]
async fn a_restarted_node_adopts_running_workloads() {
    let root = tempfile::tempdir().unwrap();
    let first = ProcessBackend::new(root.path().to_path_buf(), ProcessBackend::default_command());
    let pid = first.start(&vm("db")).await.unwrap().pid.unwrap();
    let before = wait_for(&first, "db", |s| s.state == RunState::Running).await;

    // The workload leads its own session: a restart of the node does not
    // take it down with the node's process group.
    // SAFETY: getsid on a pid.
    assert_eq!(unsafe { libc::getsid(pid as libc::pid_t) }, pid as libc::pid_t);

    // "Restart": a second backend on the same root, with no children of its own.
    let second = ProcessBackend::new(root.path().to_path_buf(), ProcessBackend::default_command());
    let s = second.status("db").await.unwrap().unwrap();
    assert_eq!(s.state, RunState::Running);
    assert_eq!(s.pid, Some(pid));
    assert_eq!(s.boot_ms, before.boot_ms, "boot time survives the restart");
    assert_eq!(s.started_at_ms, before.started_at_ms);
    assert_eq!(second.list().await.unwrap().len(), 1);
    assert!(matches!(second.start(&vm("db")).await, Err(VmError::Failed(_))));

    second.delete("db").await.unwrap();
    assert!(!exists(pid));
    assert!(!root.path().join("db").exists());
    // The first backend reaps its child and does not recreate anything.
    assert!(first.status("db").await.unwrap().is_none());
    assert!(!root.path().join("db").exists());
    assert!(!Path::new(&format!("/proc/{pid}")).exists(), "reaped, not a zombie");
}

#[tokio::test]
async fn a_workload_gone_while_the_node_was_down() {
    let root = tempfile::tempdir().unwrap();
    let first = ProcessBackend::new(root.path().to_path_buf(), ProcessBackend::default_command());
    let pid = first.start(&vm("a")).await.unwrap().pid.unwrap();
    wait_for(&first, "a", |s| s.state == RunState::Running).await;
    let second = ProcessBackend::new(root.path().to_path_buf(), ProcessBackend::default_command());
    // It dies where the new node cannot see how (a zombie of the old one).
    host::signal(pid, libc::SIGKILL);
    let s = wait_for(&second, "a", is_failed).await;
    assert!(reason(&s).contains("exit status unknown"), "{s:?}");
    second.delete("a").await.unwrap();
    assert!(first.status("a").await.unwrap().is_none());
}

#[tokio::test]
async fn bad_input_creates_nothing() {
    let root = tempfile::tempdir().unwrap();
    let b = ProcessBackend::new(root.path().to_path_buf(), ProcessBackend::default_command());
    assert!(matches!(b.prepare(&VmConfig { vcpus: 0, ..vm("x") }).await, Err(VmError::Config(_))));
    assert!(matches!(b.start(&VmConfig { vcpus: 0, ..vm("x") }).await, Err(VmError::Config(_))));
    assert!(matches!(b.start(&VmConfig { memory_mb: 0, ..vm("x") }).await, Err(VmError::Config(_))));
    assert!(matches!(b.start(&vm("../escape")).await, Err(VmError::Config(_))));
    assert!(!root.path().join("x").exists());
    assert!(b.list().await.unwrap().is_empty());

    // A boot source is ignored, not an error; prepare is idempotent.
    let with_kernel = VmConfig {
        boot: BootSource { kernel: Some("/boot/vmlinuz".into()), ..BootSource::default() },
        ..vm("k")
    };
    b.prepare(&with_kernel).await.unwrap();
    b.prepare(&with_kernel).await.unwrap();
    let s = b.status("k").await.unwrap().unwrap();
    assert_eq!((s.state, s.pid), (RunState::Stopped, None));
    b.delete("k").await.unwrap();
    assert!(std::fs::read_dir(root.path()).unwrap().next().is_none());
}

/// Reads from `con` until `want` shows up (or panics after 10 s).
async fn read_until(con: &mut Box<dyn blixard_vm::ConsoleIo>, want: &str) -> String {
    use tokio::io::AsyncReadExt;
    let mut out = Vec::new();
    let mut buf = [0u8; 1024];
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !String::from_utf8_lossy(&out).contains(want) {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        match tokio::time::timeout(left, con.read(&mut buf)).await {
            Ok(Ok(0)) => panic!("console ended before {want:?}: {}", String::from_utf8_lossy(&out)),
            Ok(Ok(n)) => out.extend_from_slice(&buf[..n]),
            Ok(Err(e)) => panic!("console read: {e}"),
            Err(_) => panic!("no {want:?} within 10 s: {}", String::from_utf8_lossy(&out)),
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The console writes to the workload's stdin (a FIFO it never sees end of
/// file on) and reads its output from the moment it opened; one at a time;
/// it ends when the workload does. A NIC and a disk are ignored.
#[tokio::test]
async fn console_talks_to_the_workload() {
    use tokio::io::AsyncWriteExt;
    let root = tempfile::tempdir().unwrap();
    let b = ProcessBackend::new(
        root.path().to_path_buf(),
        sh(&format!(
            "echo before; echo {READY_MARKER}; while read -r l; do echo \"got: $l\"; done; echo eof"
        )),
    );
    let mut cfg = vm("con");
    cfg.net = Some(blixard_vm::NetConfig {
        bridge: "br0".into(),
        ip: "10.0.0.2".parse().unwrap(),
        prefix: 24,
        gateway: "10.0.0.1".parse().unwrap(),
    });
    cfg.disk_gb = 4;
    assert!(matches!(b.console("con").await, Err(VmError::NotFound(_))));
    b.prepare(&cfg).await.unwrap();
    match b.console("con").await {
        Err(VmError::Failed(m)) => assert!(m.contains("not running"), "{m}"),
        other => panic!("expected Failed for a VM that does not run, got {:?}", other.map(|_| ())),
    }
    b.start(&cfg).await.unwrap();
    wait_for(&b, "con", |s| s.state == RunState::Running).await;
    // No console attached for a while: the workload must not see EOF.
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(!console(&b, "con").await.contains("eof"));

    let mut con = b.console("con").await.unwrap();
    assert!(matches!(b.console("con").await, Err(VmError::Busy(_))));
    con.write_all(b"hello\n").await.unwrap();
    let out = read_until(&mut con, "got: hello").await;
    assert!(!out.contains("before"), "reads start at the end of the log: {out}");
    drop(con);

    // Released once the pump notices the close.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    let mut con = loop {
        match b.console("con").await {
            Ok(c) => break c,
            Err(VmError::Busy(_)) if tokio::time::Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(20)).await
            }
            Err(e) => panic!("reopening: {e}"),
        }
    };
    con.write_all(b"again\n").await.unwrap();
    read_until(&mut con, "got: again").await;

    // The stream ends with the workload.
    b.stop("con", Duration::from_secs(5)).await.unwrap();
    let mut rest = Vec::new();
    use tokio::io::AsyncReadExt;
    tokio::time::timeout(Duration::from_secs(5), con.read_to_end(&mut rest))
        .await
        .expect("the console did not end with the workload")
        .unwrap();
    b.delete("con").await.unwrap();
    assert!(!root.path().join("con").exists());
}
