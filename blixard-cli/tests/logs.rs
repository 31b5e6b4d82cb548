//! `vm logs -f` end to end: two real node processes running VMs as
//! processes; the console of a VM on node 2 is followed through node 1 (the
//! stream is forwarded to the owning node), output written after the follow
//! began arrives through the stream, and deleting the VM ends the follow
//! with a clear error.
mod common;

use std::io::{BufRead, BufReader};
use std::process::Stdio;
use std::sync::mpsc;
use std::time::Duration;

use common::*;
use serde_json::Value;

#[test]
fn follow_streams_a_console_through_another_node() {
    let root = tempfile::tempdir().unwrap();
    let dirs: Vec<_> = (1..=2).map(|i| root.path().join(format!("node-{i}"))).collect();
    let ports: Vec<u16> = (0..2).map(|_| free_port()).collect();
    let cap = ["4", "4096", "50"];
    let procs = vec![
        (1, start_node_backend(1, ports[0], &dirs[0], None, cap, "process", &[])),
        (2, start_node_backend(2, ports[1], &dirs[1], Some(ports[0]), cap, "process", &[])),
    ];
    let _workloads = Workloads(dirs.clone());
    let nodes = Nodes { procs, dirs, ports };
    let (n1, n2) = (nodes.port(1), nodes.port(2));
    eventually("two registered nodes", 90, || {
        let v: Value = serde_json::from_slice(&cli(n1, &["node", "list", "-o", "json"]).stdout).ok()?;
        (v.as_array()?.len() == 2).then_some(())
    });
    ok(n1, &["vm", "create", "tail", "--node", "2", "--no-start"]);

    // Follow through node 1 before the VM has written anything.
    let mut follow = client_command(&loopback(n1))
        .args(["--addr", &loopback(n1), "vm", "logs", "tail", "-f"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let (tx, rx) = mpsc::channel();
    let stdout = follow.stdout.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    std::thread::sleep(Duration::from_secs(1));
    assert!(rx.try_recv().is_err(), "nothing was written yet");

    // The guest writes after the follow began: it arrives.
    ok(n2, &["vm", "start", "tail", "--wait"]);
    let line = rx.recv_timeout(Duration::from_secs(30)).expect("the console line arrives through the stream");
    assert!(line.starts_with("tail: 1 vCPU"), "{line}");

    // Deleting the VM ends the follow: not found, exit non-zero.
    ok(n1, &["vm", "delete", "tail", "--wait"]);
    let status = eventually("the follow ends", 30, || follow.try_wait().unwrap());
    assert!(!status.success());
    let mut err = String::new();
    std::io::Read::read_to_string(&mut follow.stderr.take().unwrap(), &mut err).unwrap();
    assert!(err.contains("tail"), "{err}");
}
