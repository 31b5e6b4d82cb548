//! The sim backend. On plain tokio the durations are real (and short); with
//! `--cfg madsim` the same tests run on madsim's virtual clock.
use std::time::Duration;

use blixard_vm::sim::{Faults, SimHost, SimWorld, CRASH_REASON, FENCED_LINE};
use blixard_vm::{BackendKind, BootSource, RunState, VmBackend, VmConfig, VmError, VmStatus, READY_MARKER};

fn vm(name: &str) -> VmConfig {
    VmConfig {
        name: name.into(),
        vcpus: 1,
        memory_mb: 128,
        boot: BootSource::default(),
        net: None,
        disk_gb: 0,
    }
}

fn fast() -> Faults {
    Faults { boot_delay: Duration::from_millis(30), ..Faults::default() }
}

async fn state(b: &dyn VmBackend, name: &str) -> RunState {
    b.status(name).await.unwrap().expect("known VM").state
}

/// Polls until `pred` holds (generous deadline; no timing assertions).
async fn wait_for(b: &dyn VmBackend, name: &str, pred: impl Fn(&VmStatus) -> bool) -> VmStatus {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let s = b.status(name).await.unwrap().expect("known VM");
        if pred(&s) {
            return s;
        }
        assert!(tokio::time::Instant::now() < deadline, "timed out; last status {s:?}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

async fn console(b: &dyn VmBackend, name: &str) -> String {
    String::from_utf8(b.logs(name, 0, 1 << 20).await.unwrap().data).unwrap()
}

#[tokio::test]
async fn boots_after_the_delay_and_logs_the_marker() {
    let world = SimWorld::new();
    let host = SimHost::new(world.clone(), 1);
    let b = host.backend();
    assert_eq!((b.kind(), b.describe().as_str()), (BackendKind::Sim, "sim"));
    host.set_default_faults(Faults { boot_delay: Duration::from_millis(200), ..Faults::default() });

    let s = b.start(&vm("a")).await.unwrap();
    assert_eq!(s.state, RunState::Starting);
    assert!(s.pid.is_some() && s.started_at_ms.is_some() && s.boot_ms.is_none());
    assert!(!console(&b, "a").await.contains(READY_MARKER), "no marker while starting");
    assert_eq!(world.running_hosts("a"), vec![1]);

    let s = wait_for(&b, "a", |s| s.state == RunState::Running).await;
    assert_eq!(s.boot_ms, Some(200));
    let log = console(&b, "a").await;
    assert!(log.contains(READY_MARKER), "{log}");

    // Offsets work like a file.
    let first = b.logs("a", 0, 5).await.unwrap();
    assert_eq!(first.data, log.as_bytes()[..5]);
    assert_eq!(first.next_offset, 5);
    let rest = b.logs("a", first.next_offset, 1 << 20).await.unwrap();
    assert_eq!(rest.data, log.as_bytes()[5..]);
    let end = b.logs("a", rest.next_offset, 10).await.unwrap();
    assert!(end.data.is_empty());
    assert_eq!(end.next_offset, log.len() as u64);

    assert!(matches!(b.start(&vm("a")).await, Err(VmError::Failed(_))), "starting a running VM is an error");
    assert!(world.violations().is_empty());
}

#[tokio::test]
async fn boot_failure_fails_the_start() {
    let world = SimWorld::new();
    let host = SimHost::new(world.clone(), 1);
    let b = host.backend();
    host.set_faults("bad", Faults { boot_failure: Some("no bootable device".into()), ..fast() });
    match b.start(&vm("bad")).await {
        Err(VmError::Failed(r)) => assert_eq!(r, "no bootable device"),
        other => panic!("expected a failed start, got {other:?}"),
    }
    let s = b.status("bad").await.unwrap().unwrap();
    assert_eq!(s.state, RunState::Failed { reason: "no bootable device".into() });
    assert_eq!(s.pid, None);
    assert!(world.running_hosts("bad").is_empty());
    let log = console(&b, "bad").await;
    assert!(log.contains("no bootable device") && !log.contains(READY_MARKER), "{log}");

    // Faults are per VM: another VM boots fine.
    host.set_default_faults(fast());
    b.start(&vm("good")).await.unwrap();
    wait_for(&b, "good", |s| s.state == RunState::Running).await;

    // Cleared faults: the next start works.
    host.clear_faults("bad");
    b.start(&vm("bad")).await.unwrap();
    wait_for(&b, "bad", |s| s.state == RunState::Running).await;
}

/// As with the qemu backend: kernels and initrds only by name, from the
/// host's image directory; a host path only inside it (old records).
#[tokio::test]
async fn boots_only_images_of_its_image_directory() {
    let world = SimWorld::new();
    let host = SimHost::new(world.clone(), 1);
    let b = host.backend();
    host.set_default_faults(fast());
    host.add_image("custom/vmlinuz");
    let with = |name: &str, kernel: &str| VmConfig {
        boot: BootSource { kernel: Some(kernel.into()), ..BootSource::default() },
        ..vm(name)
    };
    let refused = |r: Result<VmStatus, VmError>| match r {
        Err(VmError::Config(msg)) => msg,
        other => panic!("expected a Config error, got {other:?}"),
    };
    let msg = refused(b.start(&with("a", "missing")).await);
    assert!(msg.starts_with("kernel \"missing\" is not in this node's image directory"), "{msg}");
    let msg = refused(b.start(&with("b", "/etc/shadow")).await);
    assert!(msg.contains("outside this node's image directory") && msg.contains("--image-dir"), "{msg}");
    let msg = refused(b.start(&with("c", "custom/../../x")).await);
    assert!(msg.contains("no '..'"), "{msg}");
    let mut initrd = vm("d");
    initrd.boot.initrd = Some("/sim/images/../x".into());
    let msg = refused(b.start(&initrd).await);
    assert!(msg.starts_with("initrd \"/sim/images/../x\" is refused"), "{msg}");
    // Nothing of the refused VMs is left.
    assert!(b.list().await.unwrap().is_empty());
    assert!(world.running().is_empty());

    b.start(&with("e", "custom/vmlinuz")).await.unwrap();
    b.start(&with("f", "/sim/images/custom/vmlinuz")).await.unwrap();
    wait_for(&b, "f", |s| s.state == RunState::Running).await;
    assert_eq!(world.running_hosts("e"), vec![1]);
}

#[tokio::test]
async fn injected_crashes() {
    let world = SimWorld::new();
    let host = SimHost::new(world.clone(), 7);
    let b = host.backend();
    host.set_default_faults(fast());
    host.set_faults("c", Faults { crash_after: Some(Duration::from_millis(50)), ..fast() });

    b.start(&vm("c")).await.unwrap();
    let s = wait_for(&b, "c", |s| s.state != RunState::Starting).await;
    assert!(matches!(s.state, RunState::Running | RunState::Failed { .. }), "{s:?}");
    let s = wait_for(&b, "c", |s| matches!(s.state, RunState::Failed { .. })).await;
    assert_eq!(s.state, RunState::Failed { reason: CRASH_REASON.into() });
    assert_eq!(s.boot_ms, Some(30), "it had booted before it crashed");
    assert!(s.pid.is_none() && s.exit.is_some());
    // The world saw it stop running without anyone touching the host.
    assert!(world.running_hosts("c").is_empty());

    // Explicit crash of a running VM.
    b.start(&vm("d")).await.unwrap();
    wait_for(&b, "d", |s| s.state == RunState::Running).await;
    assert!(host.crash("d"));
    assert_eq!(state(&b, "d").await, RunState::Failed { reason: CRASH_REASON.into() });
    assert!(!host.crash("d"), "already dead");
    assert!(world.running_hosts("d").is_empty());
    let log = console(&b, "d").await;
    assert!(log.contains(READY_MARKER) && log.contains(CRASH_REASON), "{log}");

    // Restart after a crash: a new run, the old console kept before it.
    b.start(&vm("d")).await.unwrap();
    assert_eq!(state(&b, "d").await, RunState::Starting);
    assert!(console(&b, "d").await.starts_with(&log));
    assert!(world.violations().is_empty());
}

#[tokio::test]
async fn a_vm_on_two_hosts_is_a_violation() {
    let world = SimWorld::new();
    let (h1, h2) = (SimHost::new(world.clone(), 1), SimHost::new(world.clone(), 2));
    h1.set_default_faults(fast());
    h2.set_default_faults(fast());
    let (b1, b2) = (h1.backend(), h2.backend());

    b1.start(&vm("x")).await.unwrap();
    wait_for(&b1, "x", |s| s.state == RunState::Running).await;
    assert!(world.violations().is_empty());
    b2.start(&vm("x")).await.unwrap();
    assert_eq!(world.running_hosts("x"), vec![1, 2]);
    let v = world.violations();
    assert_eq!(v.len(), 1, "{v:?}");
    assert!(v[0].contains("\"x\"") && v[0].contains("host 2") && v[0].contains("[1]"), "{v:?}");

    // Moving it properly (stop, then start elsewhere) is fine.
    b2.stop("x", Duration::from_secs(1)).await.unwrap();
    b1.stop("x", Duration::from_secs(1)).await.unwrap();
    assert!(world.running_hosts("x").is_empty());
    b2.start(&vm("x")).await.unwrap();
    assert_eq!(world.running_hosts("x"), vec![2]);
    // A crashed run does not count either.
    h2.crash("x");
    b1.start(&vm("x")).await.unwrap();
    assert_eq!(world.violations().len(), 1);
    assert_eq!(world.running().get("x"), Some(&vec![1]));
}

#[tokio::test]
async fn stop_delete_and_survival_of_the_node() {
    let world = SimWorld::new();
    let host = SimHost::new(world.clone(), 1);
    host.set_default_faults(fast());
    let b = host.backend();

    assert!(matches!(b.prepare(&VmConfig { vcpus: 0, ..vm("z") }).await, Err(VmError::Config(_))));
    assert!(matches!(b.prepare(&VmConfig { memory_mb: 0, ..vm("z") }).await, Err(VmError::Config(_))));
    assert!(b.status("z").await.unwrap().is_none(), "bad input creates nothing");

    b.prepare(&vm("p")).await.unwrap();
    let s = b.status("p").await.unwrap().unwrap();
    assert_eq!((s.state, s.pid), (RunState::Stopped, None));

    b.start(&vm("a")).await.unwrap();
    wait_for(&b, "a", |s| s.state == RunState::Running).await;
    b.stop("a", Duration::from_secs(1)).await.unwrap();
    let s = b.status("a").await.unwrap().unwrap();
    assert_eq!(s.state, RunState::Stopped);
    assert_eq!(s.pid, None);
    assert_eq!(s.exit.and_then(|e| e.code), Some(0));
    b.stop("a", Duration::from_secs(1)).await.unwrap(); // no-op
    assert!(matches!(b.stop("nope", Duration::from_secs(1)).await, Err(VmError::NotFound(_))));

    // A restarted node gets a fresh handle on the same host: the guest is
    // still there and keeps running.
    b.start(&vm("a")).await.unwrap();
    drop(b);
    let b = host.backend();
    wait_for(&b, "a", |s| s.state == RunState::Running).await;
    let names: Vec<String> = b.list().await.unwrap().into_iter().map(|s| s.name).collect();
    assert_eq!(names, ["a", "p"]);

    b.delete("a").await.unwrap();
    assert!(b.status("a").await.unwrap().is_none());
    assert!(world.running_hosts("a").is_empty());
    assert!(matches!(b.logs("a", 0, 10).await, Err(VmError::NotFound(_))));
    b.delete("a").await.unwrap(); // unknown: no-op
    assert_eq!(b.list().await.unwrap().len(), 1);
    assert!(world.violations().is_empty());
}

#[tokio::test]
async fn a_lapsed_lease_stops_every_vm_on_the_host() {
    let world = SimWorld::new();
    let (host, other) = (SimHost::new(world.clone(), 1), SimHost::new(world.clone(), 2));
    host.set_default_faults(fast());
    other.set_default_faults(fast());
    let (b, b2) = (host.backend(), other.backend());
    b.start(&vm("a")).await.unwrap();
    b.start(&vm("b")).await.unwrap();
    b2.start(&vm("elsewhere")).await.unwrap();
    wait_for(&b, "a", |s| s.state == RunState::Running).await;

    // Never leased: not enforced (older harnesses rely on that).
    assert_eq!(host.lease_deadline(), None);
    assert!(host.enforce_lease().is_empty());

    b.renew_lease(Duration::from_millis(100), Duration::from_secs(1)).await.unwrap();
    let deadline = host.lease_deadline().expect("a lease");
    assert!(host.enforce_lease().is_empty(), "the lease is still valid");
    tokio::time::sleep_until(deadline).await;
    // "b" may still be starting: it is stopped all the same.
    assert_eq!(host.enforce_lease(), ["a", "b"]);
    for name in ["a", "b"] {
        let s = b.status(name).await.unwrap().unwrap();
        assert_eq!((s.state, s.pid), (RunState::Stopped, None), "{name}");
        assert_eq!(s.exit.and_then(|e| e.code), Some(0), "a requested stop");
        let log = console(&b, name).await;
        assert!(log.contains(FENCED_LINE), "{log}");
    }
    // The world saw them end; the other host's VM is untouched.
    assert_eq!(world.running().into_iter().collect::<Vec<_>>(), [("elsewhere".to_string(), vec![2])]);
    assert!(host.enforce_lease().is_empty(), "nothing left to stop");

    // A VM started while the lease is lapsed is stopped by the next
    // enforcement.
    b.start(&vm("late")).await.unwrap();
    assert_eq!(world.running_hosts("late"), vec![1]);
    assert_eq!(host.enforce_lease(), ["late"]);
    assert_eq!(state(&b, "late").await, RunState::Stopped);
    assert!(world.running_hosts("late").is_empty());
    assert!(world.violations().is_empty());
}

#[tokio::test]
async fn the_guard_spares_a_renewed_lease_and_fences_a_lapsed_one() {
    let world = SimWorld::new();
    let host = SimHost::new(world.clone(), 1);
    host.set_default_faults(fast());
    let b = host.backend();
    let guard = tokio::spawn(host.clone().run_guard(Duration::from_millis(10)));
    let lease = Duration::from_millis(400);
    let grace = Duration::from_millis(100);

    b.renew_lease(lease, grace).await.unwrap();
    b.start(&vm("a")).await.unwrap();
    // Renewed well within the lease, for longer than one lease: it runs on.
    let until = tokio::time::Instant::now() + lease * 2;
    while tokio::time::Instant::now() < until {
        b.renew_lease(lease, grace).await.unwrap();
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(state(&b, "a").await, RunState::Running);
    assert_eq!(world.running_hosts("a"), vec![1]);

    // No more renewals: the guard stops it.
    wait_for(&b, "a", |s| s.state == RunState::Stopped).await;
    assert!(console(&b, "a").await.contains(FENCED_LINE));
    assert!(world.running_hosts("a").is_empty());
    // Started while the lease is lapsed: stopped again.
    b.start(&vm("a")).await.unwrap();
    wait_for(&b, "a", |s| s.state == RunState::Stopped).await;

    // Renewed: it runs, and keeps running while the lease holds.
    b.renew_lease(Duration::from_secs(60), grace).await.unwrap();
    b.start(&vm("a")).await.unwrap();
    wait_for(&b, "a", |s| s.state == RunState::Running).await;
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(state(&b, "a").await, RunState::Running);
    guard.abort();
    assert!(world.violations().is_empty());
}

/// The simulated guest's shell echoes each line prefixed by the VM's name;
/// one console at a time; the VM's network and disk are recorded.
#[tokio::test]
async fn console_echoes_lines_and_config_is_recorded() {
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
    let world = SimWorld::new();
    let host = SimHost::new(world.clone(), 1);
    let b = host.backend();
    host.set_default_faults(fast());
    assert!(matches!(b.console("web").await, Err(VmError::NotFound(_))));
    let mut cfg = vm("web");
    cfg.disk_gb = 3;
    cfg.net = Some(blixard_vm::NetConfig {
        bridge: "br0".into(),
        ip: "10.0.0.2".parse().unwrap(),
        prefix: 24,
        gateway: "10.0.0.1".parse().unwrap(),
    });
    b.prepare(&cfg).await.unwrap();
    assert_eq!(host.vm_config("web"), Some(cfg.clone()));
    assert!(matches!(b.console("web").await, Err(VmError::Failed(_))));
    b.start(&cfg).await.unwrap();

    let con = b.console("web").await.unwrap();
    assert!(host.console_attached("web"));
    assert!(matches!(b.console("web").await, Err(VmError::Busy(_))));
    let (read, mut write) = tokio::io::split(con);
    let mut lines = BufReader::new(read).lines();
    write.write_all(b"uname\nls /data\n").await.unwrap();
    assert_eq!(lines.next_line().await.unwrap().as_deref(), Some("web: uname"));
    assert_eq!(lines.next_line().await.unwrap().as_deref(), Some("web: ls /data"));
    // Closing our side ends the guest's shell, and with it the stream.
    write.shutdown().await.unwrap();
    assert_eq!(lines.next_line().await.unwrap(), None);
    drop(write);
    drop(lines);
    for _ in 0..100 {
        if !host.console_attached("web") {
            break;
        }
        tokio::task::yield_now().await;
    }
    assert!(!host.console_attached("web"));
    b.console("web").await.expect("a closed console can be opened again");
}
