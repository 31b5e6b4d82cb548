//! Metrics end to end: a real Prometheus server (Debian `prometheus`, which
//! the test command installs) scrapes a 3-node cluster; the test asks its
//! HTTP API that every target is up, that the cluster shows one leader, and
//! that a write moves the series it should on every node. It also checks the
//! shipped Prometheus config with `promtool` and that the shipped Grafana
//! dashboard uses only metrics the nodes export.
mod common;

use std::path::Path;
use std::process::{Child, Command, Stdio};

use common::*;
use serde_json::Value;

const PROMETHEUS: &str = "/usr/bin/prometheus";
const PROMTOOL: &str = "/usr/bin/promtool";

fn urlencode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// An instant query; the result vector as (labels, value) pairs.
fn query(prom: &str, q: &str) -> Option<Vec<(Value, f64)>> {
    let (code, body) = http_get(prom, &format!("/api/v1/query?query={}", urlencode(q)))?;
    if code != 200 {
        return None;
    }
    let v: Value = serde_json::from_str(&body).ok()?;
    let result = v["data"]["result"].as_array()?;
    result.iter().map(|r| Some((r["metric"].clone(), r["value"][1].as_str()?.parse().ok()?))).collect()
}

/// The single value of a query that aggregates to one series.
fn scalar(prom: &str, q: &str) -> Option<f64> {
    let r = query(prom, q)?;
    (r.len() == 1).then(|| r[0].1)
}

struct Prometheus(Child);

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn start_prometheus(dir: &Path, targets: &[String]) -> (Prometheus, String) {
    assert!(
        Path::new(PROMETHEUS).exists(),
        "{PROMETHEUS} is missing: install the Debian `prometheus` package (scripts/test does)"
    );
    let list = targets.iter().map(|t| format!("'{t}'")).collect::<Vec<_>>().join(", ");
    let config = dir.join("prometheus.yml");
    std::fs::write(
        &config,
        format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nscrape_configs:\n  - job_name: blixard\n    static_configs:\n      - targets: [{list}]\n"
        ),
    )
    .unwrap();
    let addr = loopback(free_port());
    let log = std::fs::File::create(dir.join("prometheus.log")).unwrap();
    let child = Command::new(PROMETHEUS)
        .arg(format!("--config.file={}", config.display()))
        .arg(format!("--storage.tsdb.path={}", dir.join("tsdb").display()))
        .arg(format!("--web.listen-address={addr}"))
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .expect("start prometheus");
    (Prometheus(child), addr)
}

#[test]
fn prometheus_scrapes_a_three_node_cluster() {
    let root = tempfile::tempdir().unwrap();
    let dirs: Vec<_> = (1..=3).map(|i| root.path().join(format!("node-{i}"))).collect();
    let ports: Vec<u16> = (0..3).map(|_| free_port()).collect();
    let metrics: Vec<String> = (0..3).map(|_| loopback(free_port())).collect();
    let mut procs = Vec::new();
    for i in 0..3 {
        let join = (i > 0).then_some(ports[0]);
        let extra = ["--metrics-addr", metrics[i].as_str()];
        procs.push((i as u64 + 1, start_node_with(i as u64 + 1, ports[i], &dirs[i], join, &extra)));
    }
    let nodes = Nodes { procs, dirs, ports };
    let port = nodes.port(1);
    eventually("three registered nodes", 90, || {
        let v: Value = serde_json::from_slice(&cli(port, &["node", "list", "-o", "json"]).stdout).ok()?;
        (v.as_array()?.len() == 3).then_some(())
    });

    // Every node's endpoint answers in the text format, with its own id.
    for (i, m) in metrics.iter().enumerate() {
        let (code, body) = eventually("metrics endpoint", 30, || http_get(m, "/metrics"));
        assert_eq!(code, 200, "{m}: {body}");
        let id = i + 1;
        assert!(body.contains(&format!("blixard_raft_term{{node=\"{id}\"}}")), "{m}:\n{body}");
        let (code, _) = http_get(m, "/nope").unwrap();
        assert_eq!(code, 404);
    }

    let prom_dir = root.path().join("prometheus");
    std::fs::create_dir_all(&prom_dir).unwrap();
    let (_prom, prom) = start_prometheus(&prom_dir, &metrics);

    // All three targets up.
    eventually("prometheus reports every target up", 90, || {
        let (code, body) = http_get(&prom, "/api/v1/targets")?;
        let v: Value = serde_json::from_str(&body).ok()?;
        let active = v["data"]["activeTargets"].as_array()?;
        let up = active.iter().filter(|t| t["health"] == "up").count();
        (code == 200 && active.len() == 3 && up == 3).then_some(())
    });
    assert_eq!(scalar(&prom, "count(up{job=\"blixard\"} == 1)"), Some(3.0));
    // One leader, and every node agrees who it is.
    eventually("one leader in the scraped figures", 60, || {
        let leaders = scalar(&prom, "sum(blixard_raft_is_leader)")?;
        let ids = query(&prom, "count by (node) (blixard_raft_leader_id > 0)")?;
        let min = scalar(&prom, "min(blixard_raft_leader_id)")?;
        let max = scalar(&prom, "max(blixard_raft_leader_id)")?;
        (leaders == 1.0 && ids.len() == 3 && min == max && min > 0.0).then_some(())
    });

    // A write moves the series it should, on every node.
    let placed_q = "blixard_scheduler_placements_total{outcome=\"placed\"}";
    let before: Vec<(Value, f64)> = eventually("placement series on 3 nodes", 30, || {
        let r = query(&prom, placed_q)?;
        (r.len() == 3).then_some(r)
    });
    let created_ok = "sum(blixard_api_requests_total{method=\"CreateVms\",code=\"OK\"})";
    let api_before = scalar(&prom, created_ok).unwrap_or(0.0);
    ok(port, &["vm", "create", "scraped", "--vcpus", "2", "--memory", "256", "--no-start"]);
    let vm = json_of(port, &["vm", "get", "scraped", "-o", "json"]);
    let node = vm["node_id"].as_u64().expect("placed");

    eventually("every node counted the placement", 30, || {
        let after = query(&prom, placed_q)?;
        let moved = after
            .iter()
            .all(|(labels, v)| before.iter().any(|(l, b)| l["node"] == labels["node"] && *v == b + 1.0));
        (after.len() == 3 && moved).then_some(())
    });
    eventually("the API counted the create", 30, || {
        (scalar(&prom, created_ok)? == api_before + 1.0).then_some(())
    });
    eventually("the owning node reports the VM and its allocation", 30, || {
        // No VM backend here: the VM stays in whatever state it was placed in.
        let state = vm["observed"].as_str()?;
        let stopped = scalar(&prom, &format!("blixard_vms{{node=\"{node}\",state=\"{state}\"}}"))?;
        let vcpus = scalar(&prom, &format!("blixard_node_vcpus{{node=\"{node}\",kind=\"allocated\"}}"))?;
        (stopped == 1.0 && vcpus == 2.0).then_some(())
    });
    // The log fsync histogram moved on every node (each appended the entry).
    let fsyncs = query(&prom, "blixard_raft_log_fsync_duration_seconds_count").unwrap();
    assert_eq!(fsyncs.len(), 3, "{fsyncs:?}");
    assert!(fsyncs.iter().all(|(_, v)| *v > 0.0), "{fsyncs:?}");
}

/// The shipped Prometheus config is valid, and the shipped Grafana dashboard
/// asks only for metrics a node exports.
#[test]
fn shipped_monitoring_files_match_the_metrics() {
    let docs = Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/monitoring");
    assert!(Path::new(PROMTOOL).exists(), "{PROMTOOL} is missing: install the Debian `prometheus` package");
    let out =
        Command::new(PROMTOOL).arg("check").arg("config").arg(docs.join("prometheus.yml")).output().unwrap();
    assert!(out.status.success(), "promtool: {}{}", stdout(&out), stderr(&out));

    let root = tempfile::tempdir().unwrap();
    let dir = root.path().join("node-1");
    let port = free_port();
    let maddr = loopback(free_port());
    let _nodes = Nodes {
        procs: vec![(1, start_node_with(1, port, &dir, None, &["--metrics-addr", maddr.as_str()]))],
        dirs: vec![dir],
        ports: vec![port],
    };
    eventually("node registered", 60, || {
        let v: Value = serde_json::from_slice(&cli(port, &["node", "list", "-o", "json"]).stdout).ok()?;
        (v.as_array()?.len() == 1).then_some(())
    });
    // Make the lazily created series exist: an API call (and its code).
    ok(port, &["vm", "create", "d1", "--no-start"]);
    let (_, body) = eventually("metrics", 30, || http_get(&maddr, "/metrics"));
    let exported: std::collections::BTreeSet<&str> = body
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .filter_map(|l| l.split(['{', ' ']).next())
        .collect();

    let dashboard = std::fs::read_to_string(docs.join("grafana-dashboard.json")).unwrap();
    let v: Value = serde_json::from_str(&dashboard).expect("the dashboard is valid JSON");
    let mut used = std::collections::BTreeSet::new();
    for panel in v["panels"].as_array().expect("panels") {
        for target in panel["targets"].as_array().into_iter().flatten() {
            let expr = target["expr"].as_str().expect("every target has a PromQL expr");
            let mut rest = expr;
            while let Some(i) = rest.find("blixard_") {
                let name: String =
                    rest[i..].chars().take_while(|c| c.is_ascii_alphanumeric() || *c == '_').collect();
                rest = &rest[i + name.len()..];
                used.insert(name);
            }
        }
    }
    assert!(used.len() >= 10, "the dashboard should chart the main metrics: {used:?}");
    for name in &used {
        assert!(exported.contains(name.as_str()), "the dashboard uses {name}, which no node exports");
    }
}
