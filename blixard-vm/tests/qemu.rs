//! The QEMU backend against real QEMU and a real guest (the default image,
//! built from the host's cloud kernel and busybox). These tests fail, not
//! skip, when QEMU, the kernel or busybox are missing: install
//! qemu-system-x86, linux-image-cloud-amd64 and busybox-static.
#![cfg(not(madsim))]
mod common;

use std::io::{Read, Write};
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use blixard_vm::guard;
use blixard_vm::host::{self, VmDirs};
use blixard_vm::image::{self, POWEROFF_MARKER};
use blixard_vm::net::{self, Bridge};
use blixard_vm::qemu::QemuBackend;
use blixard_vm::{
    BootSource, ConsoleIo, NetConfig, RunState, VmBackend, VmConfig, VmError, VmStatus, READY_MARKER,
};
use common::Netns;

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
    eprintln!("boot without NIC or disk: {:?} ms", st.boot_ms);
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

/// Deletes the VM on drop (panics included), so no QEMU outlives a test.
struct VmGuard<'a>(&'a QemuBackend, String);

impl Drop for VmGuard<'_> {
    fn drop(&mut self) {
        let (b, name) = (self.0, self.1.clone());
        // Forcefully: the test is over (or failed).
        let dirs = VmDirs::new(b.root());
        if let Some(pid) = host::read_pidfile(&dirs.pidfile(&name)) {
            if host::pid_alive(pid, &dirs.needle(&name)) {
                host::signal(pid, libc::SIGKILL);
            }
        }
    }
}

/// Runs `cmd` in the guest's console shell and returns what the console
/// printed until the command finished (marked by a computed token, which
/// the terminal's echo of the typed line does not contain).
async fn shell(con: &mut Box<dyn ConsoleIo>, cmd: &str, within: Duration) -> String {
    static SEQ: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let n = SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let line = format!("{cmd}; echo BX{n}END$((40+2))\n");
    let done = format!("BX{n}END42");
    con.write_all(line.as_bytes()).await.expect("console write");
    let mut out = Vec::new();
    let deadline = Instant::now() + within;
    let mut buf = [0u8; 4096];
    loop {
        let text = String::from_utf8_lossy(&out).into_owned();
        if text.contains(&done) {
            return text;
        }
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, con.read(&mut buf)).await {
            Ok(Ok(0)) => panic!("console closed while running {cmd:?}; output:\n{text}"),
            Ok(Ok(k)) => out.extend_from_slice(&buf[..k]),
            Ok(Err(e)) => panic!("console read failed: {e}; output:\n{text}"),
            Err(_) => panic!("{cmd:?} did not finish within {within:?}; output:\n{text}"),
        }
    }
}

/// GET `path` from `ip:80` from inside `netns`, retrying until `within`.
fn http_get(netns: &str, ip: Ipv4Addr, path: &str, within: Duration) -> String {
    let deadline = Instant::now() + within;
    loop {
        let got = net::in_netns(netns, || {
            let mut s = std::net::TcpStream::connect_timeout(&(ip, 80).into(), Duration::from_secs(3))
                .map_err(VmError::io("connecting"))?;
            s.set_read_timeout(Some(Duration::from_secs(5))).map_err(VmError::io("timeout"))?;
            s.write_all(format!("GET {path} HTTP/1.0\r\nHost: {ip}\r\n\r\n").as_bytes())
                .map_err(VmError::io("sending"))?;
            let mut body = String::new();
            s.read_to_string(&mut body).map_err(VmError::io("reading"))?;
            Ok(body)
        });
        match got {
            Ok(body) if body.starts_with("HTTP/1.") => return body,
            other if Instant::now() >= deadline => panic!("GET http://{ip}{path} from {netns}: {other:?}"),
            _ => std::thread::sleep(Duration::from_millis(200)),
        }
    }
}

/// A guest with a NIC on a bridge and a data disk, in a namespace of its
/// own: it pings its gateway, the host fetches from its httpd a file it
/// wrote to /data, one console at a time, and delete removes its tap.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn guest_with_nic_and_disk_on_a_bridge() {
    let ns = Netns::new("nic");
    let bridge = Bridge { name: "bxbr0".into(), gateway: "10.81.0.1".parse().unwrap(), prefix: 24 };
    net::in_netns(&ns.0, || bridge.ensure()).unwrap();
    let root = tempfile::tempdir().unwrap();
    let b = backend(root.path()).with_netns(ns.0.clone());
    let ip: Ipv4Addr = "10.81.0.7".parse().unwrap();
    let netcfg = NetConfig { bridge: "bxbr0".into(), ip, prefix: 24, gateway: bridge.gateway };
    let mut cfg = vm("nic", 128, 1);
    cfg.net = Some(netcfg.clone());
    cfg.disk_gb = 1;
    cfg.boot.cmdline = Some("blixard.httpd=80".into());
    let _guard = VmGuard(&b, cfg.name.clone());

    let t = Instant::now();
    b.prepare(&cfg).await.expect("prepare failed");
    eprintln!("prepare with a 1 GiB disk (create + mkfs.ext4): {} ms", t.elapsed().as_millis());
    let pid = b.start(&cfg).await.expect("start failed").pid.unwrap();
    let args = cmdline(pid);
    let append = args.windows(2).find(|w| w[0] == "-append").map(|w| w[1].clone()).unwrap();
    assert!(append.contains("blixard.ip=10.81.0.7/24 blixard.gw=10.81.0.1"), "{append}");
    assert!(append.contains("blixard.disk=/dev/vda"), "{append}");
    let st = wait_running(&b, &cfg.name).await;
    eprintln!("boot with NIC and disk: {:?} ms", st.boot_ms);
    let log = console(&b, &cfg.name).await;
    assert!(log.contains("blixard: eth0 10.81.0.7/24"), "{log}");
    assert!(log.contains("/dev/vda mounted on /data"), "{log}");
    assert!(log.contains("httpd on port 80"), "{log}");
    let tap = net::in_netns(&ns.0, || {
        Ok(Command::new("ip").args(["-o", "link", "show", "dev", &netcfg.tap()]).output())
    })
    .unwrap()
    .unwrap();
    assert!(String::from_utf8_lossy(&tap.stdout).contains("master bxbr0"), "{tap:?}");

    let mut con = b.console(&cfg.name).await.expect("console failed");
    // One console at a time.
    match b.console(&cfg.name).await {
        Err(VmError::Busy(_)) => {}
        other => panic!("a second console should be Busy, got {:?}", other.map(|_| ())),
    }
    // Also when the other client is another process (a restarted node's
    // backend): QEMU says so through QMP.
    let other = backend(root.path()).with_netns(ns.0.clone());
    match other.console(&cfg.name).await {
        Err(VmError::Busy(m)) => assert!(m.contains("another client"), "{m}"),
        other => panic!("a console open elsewhere should be Busy, got {:?}", other.map(|_| ())),
    }
    let out = shell(&mut con, "ping -c 1 -W 5 10.81.0.1", Duration::from_secs(30)).await;
    assert!(out.contains("1 packets received"), "the guest cannot ping its gateway:\n{out}");
    let out =
        shell(&mut con, "hostname; echo served-from-disk >/data/hello.txt", Duration::from_secs(30)).await;
    assert!(out.contains(&cfg.name), "{out}");

    let ns_name = ns.0.clone();
    let index = tokio::task::spawn_blocking(move || http_get(&ns_name, ip, "/", Duration::from_secs(30)))
        .await
        .unwrap();
    assert!(index.contains(&cfg.name), "index.html should hold the hostname: {index}");
    let ns_name = ns.0.clone();
    let file = tokio::task::spawn_blocking(move || {
        http_get(&ns_name, ip, "/data/hello.txt", Duration::from_secs(30))
    })
    .await
    .unwrap();
    assert!(file.contains("served-from-disk"), "{file}");

    // A closed console can be opened again.
    drop(con);
    let mut con = b.console(&cfg.name).await.expect("reopening the console failed");
    let out = shell(&mut con, "echo again", Duration::from_secs(30)).await;
    assert!(out.contains("again"), "{out}");
    drop(con);

    // `logs` still sees the console (it reads console.log), and the shell
    // owns the serial line as its controlling terminal.
    let log = console(&b, &cfg.name).await;
    assert!(log.contains("served-from-disk"), "{log}");
    assert!(!log.contains("job control turned off"), "{log}");

    b.delete(&cfg.name).await.expect("delete failed");
    assert!(!net::in_netns(&ns.0, || net::link_exists(&netcfg.tap())).unwrap(), "tap left behind");
    assert!(!root.path().join(&cfg.name).exists());
    assert!(matches!(b.console(&cfg.name).await, Err(VmError::NotFound(_))));
}

/// What a guest writes to /data survives a graceful stop and a start; the
/// disk is a sparse file of the configured size; delete removes it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn data_disk_survives_stop_and_start() {
    let root = tempfile::tempdir().unwrap();
    let b = backend(root.path());
    let mut cfg = vm("disk", 128, 1);
    cfg.disk_gb = 1;
    let _guard = VmGuard(&b, cfg.name.clone());
    b.prepare(&cfg).await.expect("prepare failed");
    let disk = b.disk_path(&cfg.name);
    let meta = std::fs::metadata(&disk).unwrap();
    assert_eq!(meta.len(), 1 << 30);
    use std::os::unix::fs::MetadataExt;
    assert!(meta.blocks() * 512 < 64 << 20, "the disk should be sparse: {} blocks", meta.blocks());
    assert!(!disk.with_file_name("disk.img.tmp").exists());

    b.start(&cfg).await.expect("start failed");
    wait_running(&b, &cfg.name).await;
    // Not running yet / unknown: clear errors.
    assert!(matches!(b.console("t-nosuchvm").await, Err(VmError::NotFound(_))));
    let mut con = b.console(&cfg.name).await.expect("console failed");
    let out =
        shell(&mut con, "echo kept-across-restarts >/data/f.txt; cat /data/f.txt", Duration::from_secs(30))
            .await;
    assert!(out.contains("kept-across-restarts"), "{out}");
    drop(con);

    b.stop(&cfg.name, Duration::from_secs(30)).await.expect("stop failed");
    let log = console(&b, &cfg.name).await;
    assert!(log.contains(POWEROFF_MARKER) && log.contains("/data unmounted"), "{log}");
    match b.console(&cfg.name).await {
        Err(VmError::Failed(m)) => assert!(m.contains("not running"), "{m}"),
        other => panic!("console of a stopped VM: expected Failed, got {:?}", other.map(|_| ())),
    }
    assert!(disk.is_file(), "a stop must keep the disk");

    b.start(&cfg).await.expect("second start failed");
    wait_running(&b, &cfg.name).await;
    let mut con = b.console(&cfg.name).await.expect("console failed");
    let out = shell(&mut con, "cat /data/f.txt", Duration::from_secs(30)).await;
    assert!(out.contains("kept-across-restarts"), "the file did not survive the restart:\n{out}");
    drop(con);

    b.delete(&cfg.name).await.expect("delete failed");
    assert!(!disk.exists() && !root.path().join(&cfg.name).exists());
}

/// A tap that cannot be attached (no such bridge) fails the start with the
/// reason, launches no QEMU, and delete cleans up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_bridge_fails_the_start_clearly() {
    let ns = Netns::new("nobr");
    let root = tempfile::tempdir().unwrap();
    let b = backend(root.path()).with_netns(ns.0.clone());
    let mut cfg = vm("nobr", 128, 1);
    let netcfg = NetConfig {
        bridge: "bxnobr".into(),
        ip: "10.82.0.5".parse().unwrap(),
        prefix: 24,
        gateway: "10.82.0.1".parse().unwrap(),
    };
    cfg.net = Some(netcfg.clone());
    match b.start(&cfg).await {
        Err(VmError::Failed(m)) => {
            assert!(m.contains("cannot set up its tap bxt0a520005 on bridge bxnobr"), "{m}");
            assert!(m.contains("does not exist"), "{m}");
        }
        other => panic!("expected Failed, got {other:?}"),
    }
    let st = status(&b, &cfg.name).await;
    assert_eq!(st.pid, None, "{st:?}");
    // A gateway outside the subnet is a config error.
    let mut bad = cfg.clone();
    bad.net = Some(NetConfig { gateway: "10.83.0.1".parse().unwrap(), ..netcfg });
    assert!(config_error(b.prepare(&bad).await).contains("outside the VM's subnet"));
    b.delete(&cfg.name).await.unwrap();
    assert!(!root.path().join(&cfg.name).exists());
}

/// Unix socket paths are limited to 107 bytes: a VM root so deep that the
/// console socket would not fit is refused before anything is created.
#[tokio::test]
async fn too_long_socket_paths_are_refused() {
    let base = tempfile::tempdir().unwrap();
    let deep = base.path().join("d".repeat(60)).join("e".repeat(30));
    let b = backend(&deep);
    let cfg = vm("sock", 128, 1);
    let msg = config_error(b.prepare(&cfg).await);
    assert!(msg.contains("socket path") && msg.contains("longer than 107 bytes"), "{msg}");
    assert!(std::fs::read_dir(&deep).unwrap().next().is_none());
}
