//! VM networking, published ports, disks and the console, end to end:
//! two hosts simulated by network namespaces this test makes (joined by a
//! veth pair) and removes, a `blixard` node in each with the qemu backend,
//! real QEMU guests with NICs on the nodes' bridges.
//!
//! What it shows: the cluster gives each node a /24 and each VM an address
//! of it; a VM pings its gateway, a VM on the same node and a VM on the
//! other node (routes between the hosts); a host reaches a published port;
//! a file written to `/data` through `vm console` survives stop/start and
//! a migration to the other node (the disk is copied); deleting the VMs
//! leaves no tap, disk, kept disk or address behind.
mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::{eventually, BIN};

const PORT: u16 = 7300;

/// Two namespaces joined by a veth pair, the nodes in them, and everything
/// they started; all removed on drop, also when the test fails.
struct Hosts {
    ns: [String; 2],
    ip: [&'static str; 2],
    dirs: [PathBuf; 2],
    nodes: Vec<Child>,
    tmp: PathBuf,
    token: String,
}

fn run(cmd: &mut Command) -> Output {
    cmd.output().unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"))
}

fn sh(args: &[&str]) {
    let out = run(Command::new(args[0]).args(&args[1..]));
    assert!(out.status.success(), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
}

impl Hosts {
    fn new(tmp: &Path) -> Hosts {
        let tag = format!("{:x}", std::process::id());
        let ns = [format!("bxva{tag}"), format!("bxvb{tag}")];
        let mut hosts = Hosts {
            ns: ns.clone(),
            ip: ["172.31.9.1", "172.31.9.2"],
            dirs: [tmp.join("node-1"), tmp.join("node-2")],
            nodes: Vec::new(),
            tmp: tmp.to_path_buf(),
            token: String::new(),
        };
        for n in &ns {
            sh(&["ip", "netns", "add", n]);
            sh(&["ip", "-n", n, "link", "set", "lo", "up"]);
        }
        let (va, vb) = (format!("bxa{tag}"), format!("bxb{tag}"));
        sh(&["ip", "link", "add", &va, "type", "veth", "peer", "name", &vb]);
        sh(&["ip", "link", "set", &va, "netns", &ns[0]]);
        sh(&["ip", "link", "set", &vb, "netns", &ns[1]]);
        for (i, dev) in [&va, &vb].into_iter().enumerate() {
            sh(&["ip", "-n", &ns[i], "addr", "add", &format!("{}/24", hosts.ip[i]), "dev", dev]);
            sh(&["ip", "-n", &ns[i], "link", "set", dev, "up"]);
        }
        hosts.start(0);
        hosts.token = eventually("the founder's admin token", 60, || {
            std::fs::read_to_string(hosts.dirs[0].join("admin-token")).ok().map(|t| t.trim().to_string())
        });
        hosts.start(1);
        hosts
    }

    fn addr(&self, i: usize) -> String {
        format!("{}:{PORT}", self.ip[i])
    }

    fn start(&mut self, i: usize) {
        let log = std::fs::File::create(self.dirs[i].with_extension("log")).unwrap();
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.ns[i], BIN, "node", "start", "--id", &(i + 1).to_string()])
            .args(["--bind", &self.addr(i), "--data-dir"])
            .arg(&self.dirs[i])
            .args(["--vcpus", "4", "--memory-mb", "2048", "--disk-gb", "20", "--vm-backend", "qemu"])
            // The link between the namespaces is this test's own.
            .args(["--insecure-plaintext", "--metrics-addr", "none", "--image-cache"])
            .arg(self.tmp.join("image-cache"))
            .env("BLIXARD_CONFIG", self.dirs[i].with_extension("config.toml"))
            .env("RUST_LOG", "info,openraft=warn")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log);
        if i == 0 {
            cmd.args(["--vm-cidr", "10.77.0.0/16"]);
        } else {
            cmd.args(["--join", &self.addr(0)]).env("BLIXARD_TOKEN", &self.token);
        }
        self.nodes.push(cmd.spawn().unwrap());
    }

    /// `blixard ARGS` from host `i`, against its node.
    fn cli(&self, i: usize, args: &[&str]) -> Output {
        run(Command::new("ip")
            .args(["netns", "exec", &self.ns[i], BIN, "--addr", &self.addr(i), "--token", &self.token])
            .args(args)
            .env_remove("BLIXARD_TOKEN")
            .env("BLIXARD_CONFIG", self.tmp.join("client.toml")))
    }

    fn ok(&self, i: usize, args: &[&str]) -> String {
        let out = self.cli(i, args);
        assert!(
            out.status.success(),
            "blixard {args:?} failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn json(&self, i: usize, args: &[&str]) -> serde_json::Value {
        let mut args = args.to_vec();
        args.extend(["-o", "json"]);
        serde_json::from_str(&self.ok(i, &args)).unwrap()
    }

    /// Types `script` into VM `name`'s console (from host 0) and returns
    /// what the guest printed.
    fn console(&self, name: &str, script: &str) -> String {
        let mut child = Command::new("ip")
            .args(["netns", "exec", &self.ns[0], BIN, "--addr", &self.addr(0), "--token", &self.token])
            .args(["vm", "console", name, "--idle-timeout", "3"])
            .env_remove("BLIXARD_TOKEN")
            .env("BLIXARD_CONFIG", self.tmp.join("client.toml"))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        {
            use std::io::Write;
            let mut stdin = child.stdin.take().unwrap();
            stdin.write_all(script.as_bytes()).unwrap();
        }
        let out = child.wait_with_output().unwrap();
        assert!(out.status.success(), "vm console {name}: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Runs `cmd` in the console until its output contains `want` (the
    /// guest may still be bringing its NIC up); returns that output.
    fn console_until(&self, name: &str, cmd: &str, want: &str, secs: u64) -> String {
        let deadline = Instant::now() + Duration::from_secs(secs);
        loop {
            let out = self.console(name, &format!("{cmd}\n"));
            if out.contains(want) {
                return out;
            }
            assert!(
                Instant::now() < deadline,
                "`{cmd}` in {name}'s console never printed {want:?}; last output:\n{out}"
            );
            std::thread::sleep(Duration::from_secs(1));
        }
    }

    /// `curl URL` from host `i`.
    fn http_get(&self, i: usize, url: &str) -> Option<String> {
        let out = run(Command::new("ip").args(["netns", "exec", &self.ns[i], "curl", "-sf", "-m", "5", url]));
        out.status.success().then(|| String::from_utf8_lossy(&out.stdout).into_owned())
    }

    fn links(&self, i: usize) -> String {
        String::from_utf8_lossy(
            &run(Command::new("ip").args(["-n", &self.ns[i], "-o", "link", "show"])).stdout,
        )
        .into_owned()
    }
}

impl Drop for Hosts {
    fn drop(&mut self) {
        for c in &mut self.nodes {
            let _ = c.kill();
            let _ = c.wait();
        }
        // Guests and fence guards outlive their node by design: end every
        // process this test's nodes started (their command lines name our
        // directory).
        let needle = self.tmp.to_string_lossy().to_string();
        for e in std::fs::read_dir("/proc").unwrap().flatten() {
            let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else { continue };
            if pid as u32 == std::process::id() {
                continue;
            }
            let cmd = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            if String::from_utf8_lossy(&cmd).contains(&needle) {
                // SAFETY: a plain signal to a process this test started.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
        }
        if std::thread::panicking() {
            for d in &self.dirs {
                let text = std::fs::read_to_string(d.with_extension("log")).unwrap_or_default();
                eprintln!("---- {} (last 40 lines)", d.with_extension("log").display());
                for l in text.lines().rev().take(40).collect::<Vec<_>>().into_iter().rev() {
                    eprintln!("{l}");
                }
            }
        }
        std::thread::sleep(Duration::from_millis(200));
        for n in &self.ns {
            let _ = Command::new("ip").args(["netns", "delete", n]).status();
        }
    }
}

fn vm(h: &Hosts, name: &str) -> serde_json::Value {
    h.json(0, &["vm", "get", name])
}

#[test]
fn vms_get_addresses_reach_each_other_publish_ports_and_keep_their_disks() {
    let tmp = tempfile::tempdir().unwrap();
    let h = Hosts::new(tmp.path());

    // Each node registers with a /24 of the cluster's VM network.
    let subnets = eventually("both nodes registered with a VM subnet", 120, || {
        let nodes = h.json(0, &["node", "list"]);
        let s: Vec<String> =
            nodes.as_array()?.iter().filter_map(|n| n["vm_subnet"].as_str().map(String::from)).collect();
        (s.len() == 2).then_some(s)
    });
    assert_eq!(subnets, ["10.77.0.0/24", "10.77.1.0/24"]);
    assert_eq!(h.json(1, &["node", "get", "2"])["vm_subnet"], "10.77.1.0/24");

    // Three guests: two on node 1 (one serving HTTP on a published port,
    // with a disk), one on node 2.
    let web = h.json(
        0,
        // Not pinned (it migrates later): both nodes are empty, so it goes
        // to the lowest id.
        &["vm", "create", "web", "--publish", "8080:80", "--disk", "1"]
            .into_iter()
            // The default image serves HTTP on port 80 when it has a NIC.
            .chain(["--wait", "--timeout", "180"])
            .collect::<Vec<_>>(),
    );
    assert_eq!(
        (web["node_id"].as_u64(), web["ip"].as_str(), web["observed"].as_str()),
        (Some(1), Some("10.77.0.2"), Some("running")),
        "{web}"
    );
    assert_eq!(web["publish"], serde_json::json!(["8080:80"]));
    let peer =
        h.json(0, &["vm", "create", "peer", "--node", "1", "--disk", "0", "--wait", "--timeout", "180"]);
    assert_eq!(peer["ip"], "10.77.0.3");
    let far = h.json(0, &["vm", "create", "far", "--node", "2", "--disk", "0", "--wait", "--timeout", "180"]);
    assert_eq!(far["ip"], "10.77.1.2");
    // A host port published on a node excludes that node for another VM.
    let taken = h.cli(0, &["vm", "create", "web2", "--node", "1", "--publish", "8080:80", "--disk", "0"]);
    assert_eq!(taken.status.code(), Some(2), "{}", String::from_utf8_lossy(&taken.stderr));
    assert!(String::from_utf8_lossy(&taken.stderr).contains("host port 8080 taken"));

    // The gateway, a VM on the same node, a VM on the other host.
    for target in ["10.77.0.1", "10.77.0.3", "10.77.1.2"] {
        h.console_until("web", &format!("ping -c 1 -W 2 {target}"), "1 packets received", 60);
    }
    // Each host reaches the published port: its own node's, and the other
    // host's over the link between them.
    let page = eventually("the published port answers", 60, || h.http_get(0, "http://127.0.0.1:8080/"));
    assert!(page.contains("web"), "{page}");
    assert!(h.http_get(1, "http://172.31.9.1:8080/").is_some_and(|p| p.contains("web")));

    // A file on the disk survives a stop and a start ...
    let out = h.console_until(
        "web",
        "echo kept-across-moves > /data/note && sync && cat /data/note",
        "kept-across-moves",
        30,
    );
    assert!(out.contains("kept-across-moves"));
    h.ok(0, &["vm", "stop", "web", "--wait", "--timeout", "60"]);
    h.ok(0, &["vm", "start", "web", "--wait", "--timeout", "180"]);
    assert_eq!(vm(&h, "web")["ip"], "10.77.0.2", "same node, same address");
    h.console_until("web", "cat /data/note", "kept-across-moves", 60);

    // ... and a migration to the other host: the disk goes with it, the
    // address comes from node 2's subnet, the port follows.
    h.ok(0, &["vm", "migrate", "web", "--to", "2", "--wait", "--timeout", "240"]);
    let moved = vm(&h, "web");
    assert_eq!(
        (moved["node_id"].as_u64(), moved["observed"].as_str()),
        (Some(2), Some("running")),
        "{moved}"
    );
    assert_eq!(moved["ip"], "10.77.1.3");
    h.console_until("web", "cat /data/note", "kept-across-moves", 60);
    let note =
        eventually("the port published on node 2", 60, || h.http_get(1, "http://127.0.0.1:8080/data/note"));
    assert!(note.contains("kept-across-moves"), "{note}");
    assert!(h.http_get(0, "http://127.0.0.1:8080/").is_none(), "node 1 no longer publishes the port");
    // Node 1 kept the disk until node 2 had it running.
    eventually("node 1 dropped the disk it kept for node 2", 60, || {
        let kept = std::fs::read_dir(h.dirs[0].join("handoff")).map(|d| d.count()).unwrap_or(0);
        (kept == 0).then_some(())
    });

    // Deleting the VMs leaves no tap, disk or address behind.
    for name in ["web", "peer", "far"] {
        h.ok(0, &["vm", "delete", name, "--wait", "--timeout", "60"]);
    }
    eventually("no tap left on either host", 60, || {
        (!h.links(0).contains("bxt") && !h.links(1).contains("bxt")).then_some(())
    });
    for d in &h.dirs {
        let disks: Vec<PathBuf> = std::fs::read_dir(d.join("vms"))
            .map(|r| r.flatten().map(|e| e.path().join("disk.img")).filter(|p| p.exists()).collect())
            .unwrap_or_default();
        assert!(disks.is_empty(), "disks left: {disks:?}");
    }
    let again = h.json(0, &["vm", "create", "again", "--node", "1", "--disk", "0", "--no-start"]);
    assert_eq!(again["ip"], "10.77.0.2", "the addresses are free again");
    assert!(h.http_get(1, "http://127.0.0.1:8080/").is_none(), "the published port is closed");
}
