//! The QEMU backend against real QEMU and a real guest (the default image,
//! built from the host's cloud kernel and busybox). These tests fail, not
//! skip, when QEMU, the kernel or busybox are missing: install
//! qemu-system-x86, linux-image-cloud-amd64 and busybox-static.
#![cfg(not(madsim))]

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use blixard_vm::guard;
use blixard_vm::host::{self, VmDirs};
use blixard_vm::image::{self, POWEROFF_MARKER};
use blixard_vm::qemu::QemuBackend;
use blixard_vm::{BootSource, RunState, VmBackend, VmConfig, VmError, VmStatus, READY_MARKER};

/// Generous: under TCG on 2 busy cores (parallel tests, parallel builds) a
/// boot that takes ~2 s alone can take many times that.
const BOOT_TIMEOUT: Duration = Duration::from_secs(120);

/// Shared between tests and runs: the image is keyed by a fingerprint of its
/// inputs and built atomically, so concurrent tests may race to build it.
fn image_cache() -> PathBuf {
    std::env::temp_dir().join("blixard-vm-test-image-cache")
}

/// For tests that boot only the default image: an image directory nothing
/// is ever put in (outside `root`, which tests check is left empty).
fn no_images() -> PathBuf {
    std::env::temp_dir().join("blixard-vm-test-no-images")
}

fn backend(root: &Path) -> QemuBackend {
    backend_with_images(root, &no_images())
}

fn backend_with_images(root: &Path, images: &Path) -> QemuBackend {
    QemuBackend::new(root.to_path_buf(), image_cache(), images.to_path_buf())
        .expect("QEMU backend unavailable (install qemu-system-x86)")
}

fn config_error(r: Result<(), VmError>) -> String {
    match r {
        Err(VmError::Config(msg)) => msg,
        other => panic!("expected a Config error, got {other:?}"),
    }
}

/// A VM name unique to this test run (tests may run concurrently with others).
fn vm(tag: &str, memory_mb: u64, vcpus: u32) -> VmConfig {
    VmConfig {
        name: format!("t-{tag}-{}", std::process::id()),
        vcpus,
        memory_mb,
        boot: BootSource::default(),
        net: None,
        disk_gb: 0,
    }
}

async fn status(b: &QemuBackend, name: &str) -> VmStatus {
    b.status(name).await.expect("status failed").unwrap_or_else(|| panic!("no trace of VM {name}"))
}

async fn console(b: &QemuBackend, name: &str) -> String {
    let chunk = b.logs(name, 0, 1 << 20).await.expect("logs failed");
    String::from_utf8_lossy(&chunk.data).into_owned()
}

/// Polls until the VM is Running; panics with the console tail otherwise.
async fn wait_running(b: &QemuBackend, name: &str) -> VmStatus {
    let deadline = Instant::now() + BOOT_TIMEOUT;
    loop {
        let st = status(b, name).await;
        match &st.state {
            RunState::Running => return st,
            RunState::Starting if Instant::now() < deadline => {}
            _ => {
                let log = console(b, name).await;
                let tail = &log[log.len().saturating_sub(3000)..];
                panic!("VM {name} did not become Running: {st:?}\n--- console tail ---\n{tail}");
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn cmdline(pid: u32) -> Vec<String> {
    let raw = std::fs::read(format!("/proc/{pid}/cmdline")).expect("reading the qemu command line");
    raw.split(|b| *b == 0)
        .filter(|a| !a.is_empty())
        .map(|a| String::from_utf8_lossy(a).into_owned())
        .collect()
}

fn has_arg_pair(args: &[String], flag: &str, value: &str) -> bool {
    args.windows(2).any(|w| w[0] == flag && w[1] == value)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lifecycle_boot_stop_restart_delete() {
    let root = tempfile::tempdir().unwrap();
    let b = backend(root.path());
    let desc = b.describe();
    assert!(desc.starts_with("qemu ") && desc.contains(&b.accel().to_uppercase()), "{desc}");
    let cfg = vm("life", 128, 1);
    let name = cfg.name.as_str();

    let started = b.start(&cfg).await.expect("start failed");
    assert_eq!(started.state, RunState::Starting);
    let pid = started.pid.expect("no pid after start");

    let st = wait_running(&b, name).await;
    assert_eq!(st.pid, Some(pid));
    assert!(st.boot_ms.is_some(), "boot_ms missing once Running: {st:?}");
    assert!(console(&b, name).await.contains(READY_MARKER));
    let dir = root.path().join(name);
    assert!(host::pid_alive(pid, &dir.display().to_string()));

    // What a VM reserves is what its VMM is given.
    let args = cmdline(pid);
    assert!(has_arg_pair(&args, "-m", "128"), "qemu args lack `-m 128`: {args:?}");
    assert!(has_arg_pair(&args, "-smp", "1"), "qemu args lack `-smp 1`: {args:?}");

    // Graceful stop: the guest sees the ACPI power button and powers itself
    // off (its acpid handler prints POWEROFF_MARKER) instead of being forced.
    let grace = Duration::from_secs(30);
    b.stop(name, grace).await.expect("stop failed");
    let st = status(&b, name).await;
    assert_eq!(st.state, RunState::Stopped, "{st:?}");
    assert_eq!(st.pid, None);
    assert!(!host::pid_alive(pid, &dir.display().to_string()), "qemu still alive after stop");
    let log = console(&b, name).await;
    assert!(log.contains(POWEROFF_MARKER), "guest did not power off through ACPI; console:\n{log}");
    // QEMU exits 0 when the guest powers off; a forced stop would show SIGKILL or `quit`.
    assert_eq!(st.exit.as_ref().and_then(|e| e.code), Some(0), "{st:?}");

    // Stopping a stopped VM is a no-op.
    b.stop(name, grace).await.expect("second stop failed");

    // Start again: a fresh run, the old console's marker does not count.
    let again = b.start(&cfg).await.expect("restart failed");
    assert_eq!(again.state, RunState::Starting);
    let pid2 = again.pid.unwrap();
    let st = wait_running(&b, name).await;
    assert_eq!(st.pid, Some(pid2));

    // No grace: the forced path (QMP quit, then SIGKILL) still ends as a
    // requested stop, not a failure.
    b.stop(name, Duration::ZERO).await.expect("forced stop failed");
    let st = status(&b, name).await;
    assert_eq!(st.state, RunState::Stopped, "{st:?}");
    assert!(!host::pid_alive(pid2, &dir.display().to_string()), "qemu still alive after forced stop");

    // Delete a running VM.
    let pid3 = b.start(&cfg).await.expect("third start failed").pid.unwrap();
    wait_running(&b, name).await;

    b.delete(name).await.expect("delete failed");
    assert!(!host::pid_alive(pid3, &dir.display().to_string()), "qemu still alive after delete");
    assert!(!dir.exists(), "VM directory left behind: {}", dir.display());
    assert!(b.status(name).await.unwrap().is_none());
    assert!(b.list().await.unwrap().is_empty());
    // Deleting an unknown VM is a no-op.
    b.delete(name).await.expect("second delete failed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_vmm_is_reported_failed() {
    let root = tempfile::tempdir().unwrap();
    let b = backend(root.path());
    let cfg = vm("crash", 96, 1);
    let pid = b.start(&cfg).await.expect("start failed").pid.unwrap();
    wait_running(&b, &cfg.name).await;

    assert!(host::signal(pid, libc::SIGKILL));
    let deadline = Instant::now() + Duration::from_secs(10);
    let st = loop {
        let st = status(&b, &cfg.name).await;
        if !matches!(st.state, RunState::Running | RunState::Starting) || Instant::now() > deadline {
            break st;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    match &st.state {
        RunState::Failed { reason } => assert!(reason.contains("signal 9"), "reason: {reason}"),
        other => panic!("expected Failed after SIGKILL, got {other:?}"),
    }
    assert_eq!(st.exit.as_ref().and_then(|e| e.signal), Some(libc::SIGKILL));

    b.delete(&cfg.name).await.expect("delete failed");
    assert!(!root.path().join(&cfg.name).exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_is_rejected_and_leaves_nothing() {
    let root = tempfile::tempdir().unwrap();
    let images = tempfile::tempdir().unwrap();
    let b = backend_with_images(root.path(), images.path());
    assert_eq!(b.image_dir(), images.path());

    // Kernels and initrds come from the image directory, by name.
    let mut missing = vm("nokernel", 128, 1);
    missing.boot.kernel = Some("no-such-vmlinuz".into());
    let msg = config_error(b.prepare(&missing).await);
    assert!(msg.starts_with("kernel \"no-such-vmlinuz\" is not in this node's image directory"), "{msg}");
    assert!(matches!(b.start(&missing).await, Err(VmError::Config(_))));
    // A host path, as VMs recorded before image names have: refused unless
    // it lies in the image directory, with the rule.
    let mut host_path = vm("hostpath", 128, 1);
    host_path.boot.kernel = Some("/etc/passwd".into());
    let msg = config_error(b.prepare(&host_path).await);
    assert!(msg.contains("outside this node's image directory") && msg.contains("--image-dir"), "{msg}");
    // A symlink out of the directory, as the kernel or as the initrd of the
    // default kernel.
    std::os::unix::fs::symlink("/etc/passwd", images.path().join("escape")).unwrap();
    let mut escape = vm("escape", 128, 1);
    escape.boot.kernel = Some("escape".into());
    let msg = config_error(b.start(&escape).await.map(|_| ()));
    assert!(msg.contains("resolves to /etc/passwd, outside"), "{msg}");
    escape.boot = BootSource { initrd: Some("escape".into()), ..BootSource::default() };
    let msg = config_error(b.prepare(&escape).await);
    assert!(msg.starts_with("initrd \"escape\" is refused"), "{msg}");
    let mut dotdot = vm("dotdot", 128, 1);
    dotdot.boot.kernel = Some("../etc/passwd".into());
    assert!(config_error(b.prepare(&dotdot).await).contains("no '..'"));

    let small = vm("small", 64, 1);
    match b.prepare(&small).await {
        Err(VmError::Config(msg)) => {
            assert_eq!(msg, "memory 64 MiB is below the guest minimum of 80 MiB")
        }
        other => panic!("expected a Config error for 64 MiB, got {other:?}"),
    }
    let no_cpu = vm("nocpu", 128, 0);
    assert!(matches!(b.prepare(&no_cpu).await, Err(VmError::Config(_))));
    let mut bad_name = vm("x", 128, 1);
    bad_name.name = "../escape".into();
    assert!(matches!(b.prepare(&bad_name).await, Err(VmError::Config(_))));

    let left: Vec<_> = std::fs::read_dir(root.path()).unwrap().flatten().map(|e| e.path()).collect();
    assert!(left.is_empty(), "rejected configs left files behind: {left:?}");
    assert!(b.list().await.unwrap().is_empty());

    // QEMU itself refusing to run (no host can back 100 TB of guest RAM):
    // start reports its exit code and stderr, and no process remains.
    let huge = vm("huge", 100_000_000, 1);
    match b.start(&huge).await {
        Err(VmError::Failed(msg)) => {
            assert!(msg.contains("code 1") && msg.contains("memory"), "{msg}")
        }
        other => panic!("expected QEMU to fail at launch, got {other:?}"),
    }
    let st = status(&b, &huge.name).await;
    assert!(matches!(&st.state, RunState::Failed { reason } if reason.contains("code 1")), "{st:?}");
    b.delete(&huge.name).await.unwrap();
    assert!(!root.path().join(&huge.name).exists());
}

/// A kernel and initrd named in the image directory (here: copies of the
/// default image's, in a subdirectory) boot; QEMU gets their canonical
/// paths. A host path from an old record boots only inside the directory.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn boots_a_kernel_named_in_the_image_dir() {
    let root = tempfile::tempdir().unwrap();
    let images = tempfile::tempdir().unwrap();
    let b = backend_with_images(root.path(), images.path());
    let cache = image_cache();
    let img = tokio::task::spawn_blocking(move || image::ensure_default_image(&cache))
        .await
        .unwrap()
        .expect("building the default image failed (need linux-image-cloud-amd64 and busybox-static)");
    let dir = images.path().join("guest");
    std::fs::create_dir(&dir).unwrap();
    std::fs::copy(&img.kernel, dir.join("vmlinuz")).unwrap();
    std::fs::copy(&img.initrd, dir.join("initrd.img")).unwrap();
    // A symlink that stays inside is followed.
    std::os::unix::fs::symlink("guest/vmlinuz", images.path().join("current")).unwrap();

    let mut cfg = vm("named", 128, 1);
    cfg.boot =
        BootSource { kernel: Some("current".into()), initrd: Some("guest/initrd.img".into()), cmdline: None };
    let pid = b.start(&cfg).await.expect("start failed").pid.unwrap();
    wait_running(&b, &cfg.name).await;
    let args = cmdline(pid);
    let real = std::fs::canonicalize(&dir).unwrap();
    let kernel = real.join("vmlinuz").display().to_string();
    let initrd = real.join("initrd.img").display().to_string();
    assert!(has_arg_pair(&args, "-kernel", &kernel), "qemu args lack `-kernel {kernel}`: {args:?}");
    assert!(has_arg_pair(&args, "-initrd", &initrd), "qemu args lack `-initrd {initrd}`: {args:?}");
    b.delete(&cfg.name).await.expect("delete failed");

    let mut old = vm("oldrecord", 128, 1);
    old.boot.kernel = Some(dir.join("vmlinuz"));
    b.prepare(&old).await.expect("a host path inside the image directory is bootable");
    b.delete(&old.name).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_node_adopts_running_vms() {
    let root = tempfile::tempdir().unwrap();
    let first = backend(root.path());
    let cfg = vm("adopt", 128, 1);
    let pid = first.start(&cfg).await.expect("start failed").pid.unwrap();
    let before = wait_running(&first, &cfg.name).await;

    // A new backend on the same root knows nothing but the files.
    let second = backend(root.path());
    let seen = second.list().await.unwrap();
    assert_eq!(seen.len(), 1, "{seen:?}");
    assert_eq!(seen[0].name, cfg.name);
    assert_eq!(seen[0].state, RunState::Running);
    assert_eq!(seen[0].pid, Some(pid));
    assert_eq!(seen[0].boot_ms, before.boot_ms, "boot time must survive the restart");

    second.stop(&cfg.name, Duration::from_secs(30)).await.expect("stop via the adopting backend failed");
    let st = status(&second, &cfg.name).await;
    assert_eq!(st.state, RunState::Stopped, "{st:?}");
    assert!(console(&second, &cfg.name).await.contains(POWEROFF_MARKER));

    second.delete(&cfg.name).await.expect("delete failed");
    assert!(!root.path().join(&cfg.name).exists());
    drop(first);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_image_builds_yield_one_whole_image() {
    let cache = tempfile::tempdir().unwrap();
    let builds: Vec<_> = (0..3)
        .map(|_| {
            let dir = cache.path().to_path_buf();
            tokio::task::spawn_blocking(move || image::ensure_default_image(&dir))
        })
        .collect();
    let mut images = Vec::new();
    for b in builds {
        images.push(
            b.await.unwrap().expect(
                "building the default image failed (need linux-image-cloud-amd64 and busybox-static)",
            ),
        );
    }
    assert!(images.windows(2).all(|w| w[0] == w[1]), "{images:?}");
    let img = &images[0];
    assert!(std::fs::metadata(&img.kernel).unwrap().len() > 1 << 20);
    let initrd = std::fs::read(&img.initrd).unwrap();
    assert!(initrd.starts_with(b"070701"), "initrd is not a newc cpio");
    // No temporary build directory survives.
    let base = img.kernel.parent().unwrap().parent().unwrap();
    let entries: Vec<_> = std::fs::read_dir(base).unwrap().flatten().map(|e| e.file_name()).collect();
    assert_eq!(entries.len(), 1, "leftovers next to the image: {entries:?}");
}

/// The fence guard stops a real guest once the lease lapses: QEMU ends on
/// SIGTERM to its process group, and the end counts as a requested stop.
/// The guard runs on a thread here, watching a `sleep` as its node process.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lapsed_lease_stops_the_guest() {
    /// Kills the fake node process, and the guest if it is still there.
    struct Cleanup(std::process::Child, Option<(u32, String)>);
    impl Drop for Cleanup {
        fn drop(&mut self) {
            if let Some((pid, needle)) = &self.1 {
                if host::pid_alive(*pid, needle) {
                    host::signal(*pid, libc::SIGKILL);
                }
            }
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }

    let root = tempfile::tempdir().unwrap();
    let b = backend(root.path());
    let node = std::process::Command::new("sleep").arg("1000").spawn().unwrap();
    let node_pid = node.id();
    let mut cleanup = Cleanup(node, None);
    // A long lease while the guest boots.
    b.renew_lease(Duration::from_secs(600), Duration::from_secs(10)).await.unwrap();
    let guard_root = b.root().to_path_buf();
    let guard_thread = std::thread::spawn(move || guard::run(&guard_root, node_pid));

    let cfg = vm("fence", 128, 1);
    let pid = b.start(&cfg).await.expect("start failed").pid.unwrap();
    cleanup.1 = Some((pid, VmDirs::new(b.root()).needle(&cfg.name)));
    wait_running(&b, &cfg.name).await;

    b.renew_lease(Duration::from_millis(200), Duration::from_secs(10)).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    let st = loop {
        let st = status(&b, &cfg.name).await;
        if st.pid.is_none() {
            break st;
        }
        assert!(Instant::now() < deadline, "the guest outlived its lease: {st:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(st.state, RunState::Stopped, "{st:?}");
    let log = std::fs::read_to_string(b.root().join(guard::GUARD_LOG)).unwrap();
    assert!(log.contains(&format!("VM {}: marked stopped, sent SIGTERM", cfg.name)), "{log}");
    assert!(!log.contains("SIGKILL"), "QEMU ends on SIGTERM: {log}");

    // Its node process gone, the guard has nothing left to guard.
    drop(cleanup);
    let deadline = Instant::now() + Duration::from_secs(10);
    while !guard_thread.is_finished() {
        assert!(Instant::now() < deadline, "the guard did not exit");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    guard_thread.join().unwrap().expect("the guard failed");
}
