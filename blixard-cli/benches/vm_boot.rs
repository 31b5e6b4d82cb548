//! VM boot benchmark (a bench binary that prints figures; it asserts nothing
//! about time).
//!
//! 1. `blixard vm create NAME --memory 128 --wait` against a one-node
//!    cluster, until the node reports the guest running, versus a bare QEMU
//!    launch of the very same command line (read from /proc of a
//!    Blixard-launched guest, with fresh console/QMP paths) until the guest's
//!    readiness marker appears on its console. Interleaved, N VMs each.
//! 2. How many 128 MiB guests one node runs at once: C VMs created together,
//!    time until all report running, and the guests' resident memory.
//!
//! Run: `cargo bench -p blixard-cli --bench vm_boot`
//! (BLIXARD_BENCH_VMS=N, default 20; BLIXARD_BENCH_CONCURRENT=C, default 24).
use std::net::TcpListener;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

const BIN: &str = env!("CARGO_BIN_EXE_blixard");
const MARKER: &str = "BLIXARD-GUEST-READY";

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

struct Node(Child);

impl Drop for Node {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The node's admin token (it founded its one-node cluster in `DATA`).
static TOKEN: std::sync::OnceLock<String> = std::sync::OnceLock::new();

fn cli(addr: &str, args: &[&str]) -> std::process::Output {
    let mut cmd = Command::new(BIN);
    cmd.env("BLIXARD_CONFIG", "/nonexistent/blixard-bench-config.toml");
    if let Some(t) = TOKEN.get() {
        cmd.env("BLIXARD_TOKEN", t);
    }
    cmd.arg("--addr").arg(addr).args(args).output().expect("run blixard")
}

fn ok(addr: &str, args: &[&str]) -> String {
    let out = cli(addr, args);
    assert!(out.status.success(), "blixard {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len()) - 1]
}

fn summary(label: &str, mut v: Vec<Duration>) -> Duration {
    v.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    println!(
        "{label:<28} n={:<3} p50 {:>7.0} ms  p99 {:>7.0} ms  min {:>7.0} ms  max {:>7.0} ms",
        v.len(),
        ms(percentile(&v, 0.50)),
        ms(percentile(&v, 0.99)),
        ms(v[0]),
        ms(v[v.len() - 1])
    );
    percentile(&v, 0.50)
}

/// Launches QEMU with `args` (console and QMP redirected into `dir`) and
/// returns the time until the guest prints its readiness marker.
fn bare_boot(args: &[String], dir: &Path) -> Duration {
    std::fs::create_dir_all(dir).unwrap();
    let console = dir.join("console.log");
    let qmp = dir.join("qmp.sock");
    let mut argv: Vec<String> = Vec::with_capacity(args.len());
    let mut i = 1;
    while i < args.len() {
        match args[i].as_str() {
            "-serial" => {
                argv.extend(["-serial".into(), format!("file:{}", console.display())]);
                i += 2;
            }
            "-qmp" => {
                argv.extend(["-qmp".into(), format!("unix:{},server=on,wait=off", qmp.display())]);
                i += 2;
            }
            "-name" => i += 2,
            a => {
                argv.push(a.to_string());
                i += 1;
            }
        }
    }
    let t = Instant::now();
    let mut child = Command::new(&args[0])
        .args(&argv)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    loop {
        if std::fs::read(&console)
            .map(|b| b.windows(MARKER.len()).any(|w| w == MARKER.as_bytes()))
            .unwrap_or(false)
        {
            break;
        }
        assert!(t.elapsed() < Duration::from_secs(60), "bare QEMU guest never became ready");
        std::thread::sleep(Duration::from_millis(5));
    }
    let took = t.elapsed();
    let _ = child.kill();
    let _ = child.wait();
    took
}

fn rss_kib(pid: u64) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| s.lines().find(|l| l.starts_with("VmRSS:"))?.split_whitespace().nth(1)?.parse().ok())
        .unwrap_or(0)
}

fn main() {
    // `cargo bench` passes --bench; ignore arguments.
    let n = env_usize("BLIXARD_BENCH_VMS", 20);
    let concurrent = env_usize("BLIXARD_BENCH_CONCURRENT", 24);
    let tmp = tempfile::tempdir().unwrap();
    let cache = tmp.path().join("cache");
    let out = Command::new(BIN).args(["image", "build", "--cache-dir"]).arg(&cache).output().unwrap();
    assert!(out.status.success(), "image build: {}", String::from_utf8_lossy(&out.stderr));

    let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let addr = format!("127.0.0.1:{port}");
    let data = tmp.path().join("node");
    let _node = Node(
        Command::new(BIN)
            .args([
                "node",
                "start",
                "--bind",
                &addr,
                "--vm-backend",
                "qemu",
                "--metrics-addr",
                "127.0.0.1:0",
                "--vcpus",
                "256",
                "--memory-mb",
                "65536",
            ])
            .arg("--data-dir")
            .arg(&data)
            .arg("--image-cache")
            .arg(&cache)
            .env("BLIXARD_CONFIG", tmp.path().join("config.toml"))
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(tmp.path().join("node.log")).unwrap())
            .spawn()
            .unwrap(),
    );
    let t = Instant::now();
    while TOKEN.get().is_none() {
        if let Ok(tok) = std::fs::read_to_string(data.join("admin-token")) {
            let _ = TOKEN.set(tok.trim().to_string());
        }
        assert!(t.elapsed() < Duration::from_secs(60), "node wrote no admin token");
        std::thread::sleep(Duration::from_millis(50));
    }
    while !cli(&addr, &["cluster", "status", "-o", "json"]).status.success()
        || !ok(&addr, &["cluster", "status", "-o", "json"]).contains("\"status\": \"active\"")
    {
        assert!(t.elapsed() < Duration::from_secs(60), "node did not come up");
        std::thread::sleep(Duration::from_millis(100));
    }
    let status: Value = serde_json::from_str(&ok(&addr, &["cluster", "status", "-o", "json"])).unwrap();
    println!("backend: {}", status["vm_backend"].as_str().unwrap_or("?"));
    println!("host: {} CPUs", std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0));

    // ---- 1. create --wait vs bare QEMU, interleaved
    let mut blixard = Vec::with_capacity(n);
    let mut bare = Vec::with_capacity(n);
    let mut args: Vec<String> = Vec::new();
    for i in 0..n {
        let name = format!("boot-{i}");
        let t = Instant::now();
        let vm: Value = serde_json::from_str(&ok(
            &addr,
            &["vm", "create", &name, "--memory", "128", "--wait", "-o", "json"],
        ))
        .unwrap();
        blixard.push(t.elapsed());
        if args.is_empty() {
            let pid = vm["pid"].as_u64().expect("pid of a running VM");
            let raw = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap();
            args = String::from_utf8_lossy(&raw)
                .split('\0')
                .filter(|a| !a.is_empty())
                .map(str::to_string)
                .collect();
            println!("qemu command line: {}", args.join(" "));
        }
        ok(&addr, &["vm", "delete", &name, "--wait"]);
        bare.push(bare_boot(&args, &tmp.path().join(format!("bare-{i}"))));
    }
    println!();
    let b = summary("blixard vm create --wait", blixard);
    let q = summary("bare qemu launch", bare);
    println!("ratio (p50): {:.2}x", b.as_secs_f64() / q.as_secs_f64());

    // ---- 2. many guests at once on one node
    let mem_before = meminfo_available_mib();
    let t = Instant::now();
    for i in 0..concurrent {
        ok(&addr, &["vm", "create", &format!("many-{i}"), "--memory", "128"]);
    }
    let deadline = Instant::now() + Duration::from_secs(600);
    let list = loop {
        let list: Value = serde_json::from_str(&ok(&addr, &["vm", "list", "-o", "json"])).unwrap();
        let vms = list.as_array().unwrap();
        let running = vms.iter().filter(|v| v["observed"] == "running").count();
        if running == concurrent || vms.iter().any(|v| v["observed"] == "failed") || Instant::now() > deadline
        {
            break list;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    let all_ready = t.elapsed();
    let vms = list.as_array().unwrap();
    let running: Vec<&Value> = vms.iter().filter(|v| v["observed"] == "running").collect();
    let rss: u64 = running.iter().filter_map(|v| v["pid"].as_u64()).map(rss_kib).sum();
    let failed: Vec<String> = vms
        .iter()
        .filter(|v| v["observed"] == "failed")
        .map(|v| format!("{}: {}", v["name"], v["reason"]))
        .collect();
    println!();
    println!(
        "{} of {concurrent} guests of 128 MiB running at once on one node; all ready {:.1} s after the first create",
        running.len(),
        all_ready.as_secs_f64()
    );
    if !running.is_empty() {
        println!(
            "guest RSS: {:.0} MiB total, {:.0} MiB per guest; host MemAvailable dropped {} MiB",
            rss as f64 / 1024.0,
            rss as f64 / 1024.0 / running.len() as f64,
            mem_before.saturating_sub(meminfo_available_mib())
        );
    }
    for f in &failed {
        println!("failed: {f}");
    }
    for i in 0..concurrent {
        ok(&addr, &["vm", "delete", &format!("many-{i}"), "--wait"]);
    }
}

fn meminfo_available_mib() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines().find(|l| l.starts_with("MemAvailable:"))?.split_whitespace().nth(1)?.parse::<u64>().ok()
        })
        .map(|kb| kb / 1024)
        .unwrap_or(0)
}
