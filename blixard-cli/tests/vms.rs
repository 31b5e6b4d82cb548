//! End to end with real QEMU microVMs through a 3-process cluster on
//! loopback: lifecycle, serial console, crash recovery, restart policies,
//! adoption of running guests after a node restart, kernels by name from
//! each node's image directory, and bad input. Needs
//! qemu-system-x86, linux-image-cloud-amd64 and busybox-static (the README
//! test command installs them); without them this fails, it never skips.
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

use serde_json::Value;

mod common;
use common::{cli, eventually, free_port, BIN};

/// The cluster's node processes; killed on drop, logs printed on panic.
/// Guests are stopped through the cluster at the end of the test; on a
/// panic, whatever QEMU processes are left are killed by their VM dirs.
struct Cluster {
    nodes: Vec<(u64, Option<Child>)>,
    ports: Vec<u16>,
    dirs: Vec<PathBuf>,
    cache: PathBuf,
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for (_, c) in &mut self.nodes {
            if let Some(c) = c {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
        // Guests survive their node by design; never leave one behind.
        for d in &self.dirs {
            kill_guests_under(d);
        }
        if std::thread::panicking() {
            for d in &self.dirs {
                let log = d.with_extension("log");
                let text = std::fs::read_to_string(&log).unwrap_or_default();
                eprintln!("---- {} (last 30 lines)", log.display());
                for l in text.lines().rev().take(30).collect::<Vec<_>>().into_iter().rev() {
                    eprintln!("{l}");
                }
            }
        }
    }
}

/// Kills every QEMU process whose command line mentions `dir` (our guests).
fn kill_guests_under(dir: &Path) {
    let needle = dir.to_string_lossy().to_string();
    for pid in pids_with(&needle) {
        unsafe {
            libc::kill(pid as i32, libc::SIGKILL);
        }
    }
}

fn pids_with(needle: &str) -> Vec<u32> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else { continue };
        if pid == std::process::id() {
            continue;
        }
        if let Ok(cmd) = std::fs::read(format!("/proc/{pid}/cmdline")) {
            let cmd = String::from_utf8_lossy(&cmd);
            let argv0 = cmd.split('\0').next().unwrap_or("");
            if argv0.contains("qemu-system") && cmd.contains(needle) {
                out.push(pid);
            }
        }
    }
    out
}

fn alive(pid: u64) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| !s.rsplit_once(')').map(|(_, r)| r.trim_start().starts_with('Z')).unwrap_or(true))
        .unwrap_or(false)
}

impl Cluster {
    fn start_node(&mut self, i: usize) {
        let id = i as u64 + 1;
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dirs[i].with_extension("log"))
            .unwrap();
        // A relative --data-dir, as `scripts/run` uses: every path handed to
        // QEMU must still resolve (it runs in the VM's own directory).
        let (parent, leaf) = (self.dirs[i].parent().unwrap(), self.dirs[i].file_name().unwrap());
        let mut cmd = Command::new(BIN);
        cmd.current_dir(parent)
            .args([
                "node",
                "start",
                "--id",
                &id.to_string(),
                "--bind",
                &format!("127.0.0.1:{}", self.ports[i]),
            ])
            .arg("--data-dir")
            .arg(leaf)
            .args([
                "--vcpus",
                "4",
                "--memory-mb",
                "2048",
                "--disk-gb",
                "50",
                "--vm-backend",
                "qemu",
                "--vm-network",
                "none",
            ])
            .arg("--image-cache")
            .arg(&self.cache)
            .args(if id == 3 { &["--image-dir", "images-3"][..] } else { &[] })
            .env("RUST_LOG", "info,openraft=warn")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log);
        let join = (i > 0).then_some(self.ports[0]);
        if let Some(seed) = join {
            cmd.args(["--join", &format!("127.0.0.1:{seed}")]);
        }
        common::prepare_node(&mut cmd, self.ports[i], &self.dirs[i], join);
        let child = cmd.spawn().unwrap();
        if let Some(slot) = self.nodes.iter_mut().find(|(n, _)| *n == id) {
            slot.1 = Some(child);
        } else {
            self.nodes.push((id, Some(child)));
        }
    }

    fn stop_node(&mut self, id: u64, signal: i32) {
        let slot = self.nodes.iter_mut().find(|(n, _)| *n == id).unwrap();
        let mut child = slot.1.take().unwrap();
        unsafe {
            libc::kill(child.id() as i32, signal);
        }
        child.wait().unwrap();
    }

    fn cli(&self, args: &[&str]) -> Output {
        cli(self.ports[0], args)
    }

    fn ok(&self, args: &[&str]) -> String {
        let out = self.cli(args);
        assert!(out.status.success(), "blixard {args:?} failed: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).to_string()
    }

    fn vm(&self, name: &str) -> Value {
        serde_json::from_str(&self.ok(&["vm", "get", name, "-o", "json"])).unwrap()
    }

    fn vm_dir(&self, node: u64, name: &str) -> PathBuf {
        self.dirs[(node - 1) as usize].join("vms").join(name)
    }

    /// Node `node`'s image directory: the default (DATA_DIR/images) for
    /// nodes 1 and 2, `--image-dir images-3` (relative to the directory it
    /// was started in) for node 3.
    fn image_dir(&self, node: u64) -> PathBuf {
        let data = &self.dirs[(node - 1) as usize];
        match node {
            3 => data.parent().unwrap().join("images-3"),
            _ => data.join("images"),
        }
    }
}

#[test]
fn real_microvms_through_a_three_node_cluster() {
    let tmp = tempfile::tempdir().unwrap();
    let cache = tmp.path().join("image-cache");
    // Build the default guest image once, ahead of time (`blixard image build`).
    let out = Command::new(BIN).args(["image", "build", "--cache-dir"]).arg(&cache).output().unwrap();
    assert!(out.status.success(), "image build failed: {}", String::from_utf8_lossy(&out.stderr));
    let built = |what: &str| -> PathBuf {
        let text = String::from_utf8_lossy(&out.stdout);
        let line = text.lines().find_map(|l| l.trim().strip_prefix(&format!("{what}: ")).map(str::to_string));
        PathBuf::from(line.unwrap_or_else(|| panic!("no {what} in `image build` output: {text}")))
    };
    let (kernel, initrd) = (built("kernel"), built("initrd"));

    let mut c = Cluster {
        nodes: Vec::new(),
        ports: (0..3).map(|_| free_port()).collect(),
        dirs: (1..=3).map(|i| tmp.path().join(format!("node-{i}"))).collect(),
        cache,
    };
    // Every node's image directory holds a copy of the default image (a
    // kernel by name), and a symlink that leads out of it.
    for node in 1..=3 {
        let images = c.image_dir(node);
        std::fs::create_dir_all(images.join("guest")).unwrap();
        std::fs::copy(&kernel, images.join("guest/vmlinuz")).unwrap();
        std::fs::copy(&initrd, images.join("guest/initrd.img")).unwrap();
        std::os::unix::fs::symlink("/etc/passwd", images.join("escape")).unwrap();
    }
    for i in 0..3 {
        c.start_node(i);
    }
    eventually("3 voters, 3 registered nodes with the qemu backend", 120, || {
        let s: Value = serde_json::from_str(&String::from_utf8_lossy(
            &c.cli(&["cluster", "status", "-o", "json"]).stdout,
        ))
        .ok()?;
        let voters = s["members"].as_array()?.iter().filter(|m| m["role"] != "learner").count();
        (voters == 3 && s["nodes"].as_array()?.len() == 3 && s["vm_backend"].as_str()?.starts_with("qemu"))
            .then_some(())
    });

    // ---- lifecycle: create → running → console → stop → start → delete
    let vm: Value =
        serde_json::from_str(&c.ok(&["vm", "create", "e2e-a", "--memory", "128", "--wait", "-o", "json"]))
            .unwrap();
    assert_eq!(vm["observed"], "running");
    let node = vm["node_id"].as_u64().unwrap();
    let pid = vm["pid"].as_u64().expect("a running VM reports its pid");
    assert!(vm["boot_ms"].as_u64().unwrap() > 0);
    // What the VM reserved is what its VMM was given.
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap();
    let args: Vec<String> = String::from_utf8_lossy(&cmdline).split('\0').map(str::to_string).collect();
    assert!(args[0].contains("qemu-system-x86_64"), "{args:?}");
    assert!(args.windows(2).any(|w| w[0] == "-m" && w[1].starts_with("128")), "{args:?}");
    assert!(args.windows(2).any(|w| w[0] == "-smp" && w[1].starts_with('1')), "{args:?}");
    // The serial console, reachable through any node (node 1 here).
    let logs = c.ok(&["vm", "logs", "e2e-a"]);
    assert!(logs.contains("BLIXARD-GUEST-READY"), "console lacks the marker:\n{logs}");

    let vm: Value = {
        c.ok(&["vm", "stop", "e2e-a", "--wait"]);
        c.vm("e2e-a")
    };
    assert_eq!(vm["observed"], "stopped");
    assert!(!alive(pid), "QEMU {pid} still runs after stop");
    c.ok(&["vm", "start", "e2e-a", "--wait"]);
    let vm = c.vm("e2e-a");
    assert_eq!(vm["observed"], "running");
    let pid2 = vm["pid"].as_u64().unwrap();
    assert_ne!(pid2, pid);
    let dir = c.vm_dir(node, "e2e-a");
    assert!(dir.exists());
    c.ok(&["vm", "delete", "e2e-a", "--wait"]);
    assert!(!alive(pid2), "QEMU {pid2} still runs after delete");
    assert!(!dir.exists(), "{} left behind after delete", dir.display());
    assert!(pids_with(&dir.to_string_lossy()).is_empty());

    // ---- crash recovery: on-failure restarts, never stays failed
    let vm: Value =
        serde_json::from_str(&c.ok(&["vm", "create", "e2e-crash", "--wait", "-o", "json"])).unwrap();
    let pid = vm["pid"].as_u64().unwrap();
    unsafe {
        libc::kill(pid as i32, libc::SIGKILL);
    }
    let vm = eventually("crashed VM restarted", 60, || {
        let vm = c.vm("e2e-crash");
        (vm["observed"] == "running" && vm["pid"].as_u64() != Some(pid) && vm["restarts"].as_u64()? >= 1)
            .then_some(vm)
    });
    assert_eq!(vm["restarts"], 1);
    let vm: Value = serde_json::from_str(&c.ok(&[
        "vm",
        "create",
        "e2e-never",
        "--restart",
        "never",
        "--wait",
        "-o",
        "json",
    ]))
    .unwrap();
    let pid = vm["pid"].as_u64().unwrap();
    unsafe {
        libc::kill(pid as i32, libc::SIGKILL);
    }
    let vm = eventually("VM with restart=never reported failed", 30, || {
        let vm = c.vm("e2e-never");
        (vm["observed"] == "failed").then_some(vm)
    });
    assert!(vm["reason"].as_str().unwrap().contains("signal 9"), "{vm}");
    assert_eq!(vm["restarts"], 0);

    // ---- adoption: the node process restarts while its guest runs
    let vm = c.vm("e2e-crash");
    let (node, pid) = (vm["node_id"].as_u64().unwrap(), vm["pid"].as_u64().unwrap());
    c.stop_node(node, libc::SIGKILL);
    assert!(alive(pid), "the guest must outlive its node process");
    c.start_node((node - 1) as usize);
    eventually("restarted node reports the adopted guest", 60, || {
        let s: Value = serde_json::from_str(&String::from_utf8_lossy(
            &common::client_command(&format!("127.0.0.1:{}", c.ports[(node - 1) as usize]))
                .arg("--addr")
                .arg(format!("127.0.0.1:{}", c.ports[(node - 1) as usize]))
                .args(["vm", "status", "e2e-crash", "-o", "json"])
                .output()
                .unwrap()
                .stdout,
        ))
        .ok()?;
        (s["local"]["found"] == true && s["local"]["state"] == "running").then_some(())
    });
    std::thread::sleep(Duration::from_secs(2));
    let vm = c.vm("e2e-crash");
    assert_eq!(vm["pid"].as_u64(), Some(pid), "the guest was restarted instead of adopted");
    assert_eq!(
        pids_with(&c.vm_dir(node, "e2e-crash").to_string_lossy()),
        vec![pid as u32],
        "duplicate guests"
    );

    // ---- a kernel and initrd by name, from the image directory of the
    // node that runs the VM (whichever it is)
    let vm: Value = serde_json::from_str(&c.ok(&[
        "vm",
        "create",
        "e2e-named",
        "--kernel",
        "guest/vmlinuz",
        "--initrd",
        "guest/initrd.img",
        "--wait",
        "-o",
        "json",
    ]))
    .unwrap();
    assert_eq!(vm["observed"], "running", "{vm}");
    let node = vm["node_id"].as_u64().unwrap();
    let cmdline = std::fs::read(format!("/proc/{}/cmdline", vm["pid"].as_u64().unwrap())).unwrap();
    let args: Vec<String> = String::from_utf8_lossy(&cmdline).split('\0').map(str::to_string).collect();
    let images = std::fs::canonicalize(c.image_dir(node)).unwrap();
    let want = images.join("guest/vmlinuz").display().to_string();
    assert!(args.windows(2).any(|w| w[0] == "-kernel" && w[1] == want), "not -kernel {want}: {args:?}");
    c.ok(&["vm", "delete", "e2e-named", "--wait"]);

    // ---- bad input: a host path is refused at the edge (nothing created);
    // what the node cannot boot fails the VM with the real reason, and
    // nothing is left
    let out = c.cli(&["vm", "create", "e2e-hostpath", "--kernel", "/nonexistent/vmlinuz"]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("invalid kernel \"/nonexistent/vmlinuz\": a file name in the node's image directory (--image-dir)"),
        "{err}"
    );
    let out = c.cli(&["vm", "get", "e2e-hostpath"]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("no VM named"), "a refused create left a VM");
    let out =
        c.cli(&["vm", "create", "e2e-nokernel", "--kernel", "no-such-vmlinuz", "--wait", "--timeout", "60"]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("kernel \"no-such-vmlinuz\" is not in this node's image directory"), "{err}");
    let out = c.cli(&["vm", "create", "e2e-escape", "--kernel", "escape", "--wait", "--timeout", "60"]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("kernel \"escape\" is refused: it resolves to /etc/passwd, outside"), "{err}");
    assert_eq!(c.vm("e2e-escape")["observed"], "failed");
    let out = c.cli(&["vm", "create", "e2e-tiny", "--memory", "64", "--wait", "--timeout", "60"]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("minimum"), "{err}");
    for name in ["e2e-nokernel", "e2e-escape", "e2e-tiny"] {
        let node = c.vm(name)["node_id"].as_u64().unwrap();
        assert!(!c.vm_dir(node, name).exists(), "{name} left files behind");
    }

    // Clean up through the cluster: every guest stopped and removed.
    for name in ["e2e-crash", "e2e-never", "e2e-nokernel", "e2e-escape", "e2e-tiny"] {
        c.ok(&["vm", "delete", name, "--wait"]);
    }
    for d in &c.dirs {
        let left: Vec<String> = pids_with(&d.to_string_lossy())
            .into_iter()
            .map(|p| {
                String::from_utf8_lossy(&std::fs::read(format!("/proc/{p}/cmdline")).unwrap_or_default())
                    .replace('\0', " ")
            })
            .collect();
        assert!(left.is_empty(), "guests left under {}: {left:#?}", d.display());
    }
}
