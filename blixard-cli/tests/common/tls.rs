//! TLS clusters for tests: certificates made with `blixard cert`, nodes
//! started with them, and CLI calls that present a client certificate.
//! Everything that spawns a TLS node or makes a TLS CLI call is here, so a
//! change in how clients authenticate is made in one place.
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use super::{free_port, loopback, node_command, stderr, stdout, Nodes, BIN};

/// A certificate directory made with `blixard cert init`.
pub struct Certs {
    pub dir: PathBuf,
}

impl Certs {
    /// `blixard cert init --dir ROOT/certs`.
    pub fn init(root: &Path) -> Certs {
        let dir = root.join("certs");
        cert(&["init", "--dir", dir.to_str().unwrap()]);
        Certs { dir }
    }

    pub fn ca(&self) -> PathBuf {
        self.dir.join("ca.pem")
    }

    pub fn pem(&self, name: &str) -> PathBuf {
        self.dir.join(format!("{name}.pem"))
    }

    pub fn key(&self, name: &str) -> PathBuf {
        self.dir.join(format!("{name}-key.pem"))
    }

    /// `blixard cert issue node --id ID --host 127.0.0.1 --host localhost`.
    pub fn issue_node(&self, id: u64) {
        let id = id.to_string();
        cert(&[
            "issue",
            "node",
            "--id",
            &id,
            "--host",
            "127.0.0.1",
            "--host",
            "localhost",
            "--dir",
            self.d(),
        ]);
    }

    /// `blixard cert issue client --name NAME --role ROLE`.
    pub fn issue_client(&self, name: &str, role: &str) {
        cert(&["issue", "client", "--name", name, "--role", role, "--dir", self.d()]);
    }

    fn d(&self) -> &str {
        self.dir.to_str().unwrap()
    }

    /// `node start` flags for node `id` (its certificate must be issued).
    pub fn node_flags(&self, id: u64) -> Vec<String> {
        let node = format!("node-{id}");
        [("--tls-ca", self.ca()), ("--tls-cert", self.pem(&node)), ("--tls-key", self.key(&node))]
            .into_iter()
            .flat_map(|(flag, path)| [flag.to_string(), path.to_str().unwrap().to_string()])
            .collect()
    }

    /// The CLI's global flags for client certificate `name`.
    pub fn client_flags(&self, name: &str) -> Vec<String> {
        [("--cacert", self.ca()), ("--cert", self.pem(name)), ("--key", self.key(name))]
            .into_iter()
            .flat_map(|(flag, path)| [flag.to_string(), path.to_str().unwrap().to_string()])
            .collect()
    }
}

/// Runs `blixard cert ARGS...`, which must succeed.
pub fn cert(args: &[&str]) -> String {
    let out = Command::new(BIN).arg("cert").args(args).output().unwrap();
    assert!(out.status.success(), "blixard cert {args:?}: {}{}", stdout(&out), stderr(&out));
    stdout(&out)
}

/// Three nodes with TLS under `root` (node 1 bootstraps, 2 and 3 join it),
/// each with its own node certificate of `certs`.
pub fn three_nodes(root: &Path, certs: &Certs) -> Nodes {
    three_nodes_sized(root, certs, ["16", "8192", "100"], &[])
}

/// [`three_nodes`] offering `[vcpus, memory_mb, disk_gb]`, with more flags.
pub fn three_nodes_sized(root: &Path, certs: &Certs, capacity: [&str; 3], extra: &[&str]) -> Nodes {
    let dirs: Vec<PathBuf> = (1..=3).map(|i| root.join(format!("node-{i}"))).collect();
    let ports: Vec<u16> = (0..3).map(|_| free_port()).collect();
    let mut procs = Vec::new();
    for (i, dir) in dirs.iter().enumerate() {
        let id = i as u64 + 1;
        certs.issue_node(id);
        let flags = certs.node_flags(id);
        let flags: Vec<&str> = flags.iter().map(String::as_str).chain(extra.iter().copied()).collect();
        let join = (i > 0).then_some(ports[0]);
        let child = node_command(id, ports[i], dir, join, capacity, "none", &flags)
            .spawn()
            .expect("spawn blixard node");
        procs.push((id, child));
    }
    Nodes { procs, dirs, ports }
}

/// Runs `blixard --addr ADDRS` as client `name` (its certificate, the
/// cluster's CA) with `args`.
pub fn cli_as(certs: &Certs, name: &str, addrs: &str, args: &[&str]) -> Output {
    Command::new(BIN)
        .env("BLIXARD_CONFIG", "/nonexistent/blixard-test-config.toml")
        .env_remove("BLIXARD_TOKEN")
        .arg("--addr")
        .arg(addrs)
        .args(certs.client_flags(name))
        .args(args)
        .output()
        .unwrap()
}

/// [`cli_as`] that must succeed; its stdout.
pub fn ok_as(certs: &Certs, name: &str, addrs: &str, args: &[&str]) -> String {
    let out = cli_as(certs, name, addrs, args);
    assert!(out.status.success(), "blixard {args:?} as {name}: {}{}", stdout(&out), stderr(&out));
    stdout(&out)
}

/// `127.0.0.1:PORT` of each node, comma separated.
pub fn all_addrs(nodes: &Nodes) -> String {
    nodes.ports.iter().map(|p| loopback(*p)).collect::<Vec<_>>().join(",")
}
