//! What a feature costs the write path: `blixard bench` at 1, 16 and 256
//! clients against two otherwise identical 3-node clusters, in one run.
//!
//! - `metrics` (issue 9, item 7): every node serving /metrics, scraped every
//!   second during the run as a Prometheus would, against `--metrics-addr
//!   none`.
//! - `tls` (issue 11, item 8): mutual TLS between nodes and to the client
//!   (which presents the admin's client certificate) plus a bearer token on
//!   every call, against plaintext with the same token.
//!
//! Both clusters run side by side on loopback; only the one under test gets
//! load. The runs alternate (A, B, B, A, ...) to spread drift in the
//! machine's state evenly, and the table gives each level's median over the
//! rounds.
//!
//! A bench binary: it prints figures and asserts nothing about time.
//! Run: `cargo bench -p blixard-cli --bench overhead -- metrics|tls`
//! (BLIXARD_BENCH_ROUNDS=N, default 3; BLIXARD_BENCH_SECONDS=S, default 10).
#[path = "../tests/common/mod.rs"]
mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::*;
use serde_json::Value;

const LEVELS: [u64; 3] = [1, 16, 256];

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

struct Cluster {
    nodes: Nodes,
    metrics: Vec<String>,
    /// The certificates of a TLS cluster (clients present the admin's).
    certs: Option<tls::Certs>,
}

/// Room for every VM the bench's 256 clients hold at once.
const CAPACITY: [&str; 3] = ["4096", "4194304", "100000"];

fn cluster(root: &std::path::Path, name: &str, metrics_on: bool) -> Cluster {
    let dirs: Vec<_> = (1..=3).map(|i| root.join(format!("{name}-{i}"))).collect();
    let ports: Vec<u16> = (0..3).map(|_| free_port()).collect();
    let metrics: Vec<String> =
        (0..3).map(|_| if metrics_on { loopback(free_port()) } else { "none".to_string() }).collect();
    let mut procs = Vec::new();
    for i in 0..3 {
        let join = (i > 0).then_some(ports[0]);
        let extra = ["--metrics-addr", metrics[i].as_str()];
        procs
            .push((i as u64 + 1, start_node_sized(i as u64 + 1, ports[i], &dirs[i], join, CAPACITY, &extra)));
    }
    let c = Cluster {
        nodes: Nodes { procs, dirs, ports },
        metrics: if metrics_on { metrics } else { Vec::new() },
        certs: None,
    };
    wait_registered(&c);
    c
}

/// Three nodes with TLS (metrics off, like the plaintext cluster it is
/// compared with).
fn tls_cluster(root: &std::path::Path) -> Cluster {
    let certs = tls::Certs::init(&root.join("tls"));
    let nodes = tls::three_nodes_sized(&root.join("tls"), &certs, CAPACITY, &["--metrics-addr", "none"]);
    let c = Cluster { nodes, metrics: Vec::new(), certs: Some(certs) };
    wait_registered(&c);
    c
}

/// `blixard` for calls to the cluster's node at `addr`: with its admin
/// token, and with TLS the CA and the admin's client certificate.
fn blixard(c: &Cluster, addr: &str) -> std::process::Command {
    let mut cmd = common::client_command(addr);
    if let Some(certs) = &c.certs {
        cmd.args(certs.client_flags("admin"));
    }
    cmd
}

fn wait_registered(c: &Cluster) {
    let addr = c.nodes.addr(1);
    eventually("three registered nodes", 90, || {
        let out = blixard(c, &addr).args(["--addr", &addr, "node", "list", "-o", "json"]).output().ok()?;
        let v: Value = serde_json::from_slice(&out.stdout).ok()?;
        (v.as_array()?.len() == 3).then_some(())
    });
}

/// The address of the cluster's leader.
fn leader(c: &Cluster) -> String {
    let addr = c.nodes.addr(1);
    let out = blixard(c, &addr).args(["--addr", &addr, "cluster", "status", "-o", "json"]).output().unwrap();
    let v: Value = serde_json::from_slice(&out.stdout).expect("cluster status");
    let id = v["leader_id"].as_u64().expect("a leader");
    c.nodes.addr(id)
}

/// Scrapes every endpoint once a second until `stop`.
fn scraper(endpoints: Vec<String>, stop: Arc<AtomicBool>) -> std::thread::JoinHandle<u64> {
    std::thread::spawn(move || {
        let mut scrapes = 0;
        while !stop.load(Ordering::Relaxed) {
            for e in &endpoints {
                if http_get(e, "/metrics").is_some_and(|(code, _)| code == 200) {
                    scrapes += 1;
                }
            }
            std::thread::sleep(Duration::from_secs(1));
        }
        scrapes
    })
}

/// One `blixard bench` run at every level: (writes/s, p50 ms, p99 ms).
fn bench(c: &Cluster, seconds: u64) -> Vec<(f64, f64, f64)> {
    let stop = Arc::new(AtomicBool::new(false));
    let scrape = (!c.metrics.is_empty()).then(|| scraper(c.metrics.clone(), stop.clone()));
    let levels = LEVELS.map(|l| l.to_string()).join(",");
    let out = blixard(c, &leader(c))
        .args([
            "--addr",
            &leader(c),
            "bench",
            "--clients",
            &levels,
            "--seconds",
            &seconds.to_string(),
            "--json",
        ])
        .output()
        .expect("run blixard bench");
    stop.store(true, Ordering::Relaxed);
    if let Some(h) = scrape {
        let n = h.join().unwrap();
        assert!(n > 0, "the metrics endpoints were never scraped");
    }
    assert!(out.status.success(), "blixard bench failed: {}", stderr(&out));
    stdout(&out)
        .lines()
        .map(|l| {
            let v: Value = serde_json::from_str(l).expect("one JSON object per level");
            assert_eq!(v["errors"].as_u64(), Some(0), "{v}");
            (
                v["writes_per_sec"].as_f64().unwrap(),
                v["p50_ms"].as_f64().unwrap(),
                v["p99_ms"].as_f64().unwrap(),
            )
        })
        .collect()
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

fn main() {
    let rounds = env_u64("BLIXARD_BENCH_ROUNDS", 3);
    let seconds = env_u64("BLIXARD_BENCH_SECONDS", 10);
    // `cargo bench` passes --bench; the first other argument is the mode.
    let mode = std::env::args().skip(1).find(|a| !a.starts_with('-')).unwrap_or_else(|| "metrics".into());
    let root = tempfile::tempdir().unwrap();
    let (names, on, off) = match mode.as_str() {
        "metrics" => (
            ["metrics on", "metrics off"],
            cluster(root.path(), "on", true),
            cluster(root.path(), "off", false),
        ),
        "tls" => (
            ["mTLS + token", "plaintext + token"],
            tls_cluster(root.path()),
            cluster(root.path(), "plain", false),
        ),
        other => {
            eprintln!("unknown mode {other:?}: metrics or tls");
            std::process::exit(2);
        }
    };
    println!("{mode}: {rounds} rounds of {seconds}s per level, alternating; medians over rounds");
    let mut runs: [Vec<Vec<(f64, f64, f64)>>; 2] = [Vec::new(), Vec::new()];
    for r in 0..rounds {
        let order = if r % 2 == 0 { [0, 1] } else { [1, 0] };
        for which in order {
            let c = if which == 0 { &on } else { &off };
            let levels = bench(c, seconds);
            let figures: Vec<String> = levels.iter().map(|(w, _, _)| format!("{w:.0}")).collect();
            println!("round {} {}: writes/s {}", r + 1, names[which], figures.join(" / "));
            runs[which].push(levels);
        }
    }
    println!();
    println!(
        "| clients | {}: writes/s (p50 / p99 ms) | {}: writes/s (p50 / p99 ms) | ratio |",
        names[0], names[1]
    );
    println!("|---|---|---|---|");
    for (i, clients) in LEVELS.iter().enumerate() {
        let col = |which: usize, f: fn(&(f64, f64, f64)) -> f64| {
            median(runs[which].iter().map(|l| f(&l[i])).collect())
        };
        let (won, p50on, p99on) = (col(0, |t| t.0), col(0, |t| t.1), col(0, |t| t.2));
        let (woff, p50off, p99off) = (col(1, |t| t.0), col(1, |t| t.1), col(1, |t| t.2));
        println!(
            "| {clients} | {won:.0} ({p50on:.2} / {p99on:.2}) | {woff:.0} ({p50off:.2} / {p99off:.2}) | {:.3} |",
            won / woff
        );
    }
}
