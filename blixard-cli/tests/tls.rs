//! TLS end to end, with real processes on loopback: certificates from
//! `blixard cert`, three nodes with mutual TLS, CLI calls that present a
//! client certificate, the Raft service and the peer link refusing anything
//! but node certificates, and nodes that refuse to serve plaintext beyond
//! loopback.
use std::io::{Read, Write};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use blixard_proto::raft_service_client::RaftServiceClient;
use blixard_proto::RaftRequest;
use serde_json::Value;
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity};

mod common;
use common::tls::{all_addrs, cli_as, ok_as, three_nodes, Certs};
use common::{cli_at, eventually, free_port, http_get, stderr, stdout, BIN};

#[test]
fn tls_cluster_serves_clients_with_certificates_and_refuses_plaintext() {
    let tmp = tempfile::tempdir().unwrap();
    let certs = Certs::init(tmp.path());
    let nodes = three_nodes(tmp.path(), &certs);
    let all = all_addrs(&nodes);

    // The cluster forms over mutual TLS (joins, replication, heartbeats).
    let status: Value = eventually("a TLS cluster of three voters", 90, || {
        let out = cli_as(&certs, "admin", &nodes.addr(1), &["cluster", "status", "-o", "json"]);
        let s: Value = serde_json::from_slice(&out.stdout).ok()?;
        let voters = s["members"].as_array()?.iter().filter(|m| m["role"] != "learner").count();
        (voters == 3 && s["leader_id"].is_u64() && s["nodes"].as_array()?.len() == 3).then_some(s)
    });
    let cluster_id = status["cluster_id"].as_str().unwrap().to_string();

    // Writes and reads through any member, with the admin certificate
    // (writes on followers are forwarded over mutual TLS).
    for (i, name) in ["web-1", "web-2", "web-3"].iter().enumerate() {
        let addr = nodes.addr(i as u64 + 1);
        ok_as(
            &certs,
            "admin",
            &addr,
            &["vm", "create", name, "--vcpus", "1", "--memory", "64", "--no-start"],
        );
    }
    let list = ok_as(&certs, "admin", &all, &["vm", "list", "-o", "json"]);
    let vms: Value = serde_json::from_str(&list).unwrap();
    assert_eq!(vms.as_array().map(Vec::len), Some(3), "{list}");

    // `blixard bench` dials with the same TLS settings.
    let bench =
        ok_as(&certs, "admin", &nodes.addr(1), &["bench", "--clients", "2", "--seconds", "1", "--json"]);
    let level: Value = serde_json::from_str(bench.lines().next().unwrap()).unwrap();
    assert!(level["writes"].as_u64().unwrap() > 0, "{bench}");

    // A plaintext client cannot talk to a TLS node, and says why.
    let out = cli_at(&nodes.addr(1), &["cluster", "status"]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    let err = stderr(&out);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains("serves TLS only: give the cluster's CA with --cacert"), "{err}");

    // A client of another CA: refused before dialling, with the reason.
    let other = Certs::init(&tmp.path().join("other"));
    let out = Command::new(BIN)
        .env("BLIXARD_CONFIG", "/nonexistent/blixard-test-config.toml")
        .args(["--addr", &nodes.addr(1), "--cacert"])
        .arg(certs.ca())
        .arg("--cert")
        .arg(other.pem("admin"))
        .arg("--key")
        .arg(other.key("admin"))
        .args(["cluster", "status"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("not signed by the CA in"), "{}", stderr(&out));
    // Verifying the node against another CA fails the handshake.
    let out = cli_as(&other, "admin", &nodes.addr(1), &["cluster", "status"]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("failed the TLS handshake"), "{}", stderr(&out));
    assert!(stderr(&out).contains("not signed by the CA given with --cacert"), "{}", stderr(&out));

    // The metrics endpoint speaks HTTPS with the node's certificate only.
    let metrics = metrics_addr(&nodes.dirs[0]);
    let body = https_get(&metrics, &certs.ca(), "/metrics").expect("metrics over HTTPS");
    assert!(body.contains("blixard_raft_term"), "{}", &body[..body.len().min(500)]);
    assert!(http_get(&metrics, "/metrics").is_none_or(|(code, _)| code != 200), "plaintext metrics");

    // The Raft service takes only node certificates, each for its own node.
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let addr = nodes.addr(2);
    let raft = |who: Option<&str>, from: u64| rt.block_on(raft_call(&certs, &addr, who, &cluster_id, from));
    let denied = "takes Raft messages only from nodes of its cluster";
    let e = raft(Some("admin"), 1).unwrap_err();
    assert_eq!(e.code(), tonic::Code::PermissionDenied, "{e:?}");
    assert!(e.message().contains(denied) && e.message().contains("certificate of client admin"), "{e:?}");
    let e = raft(None, 1).unwrap_err();
    assert_eq!(e.code(), tonic::Code::PermissionDenied, "{e:?}");
    assert!(e.message().contains("presented no node certificate"), "{e:?}");
    let e = raft(Some("node-1"), 3).unwrap_err();
    assert_eq!(e.code(), tonic::Code::PermissionDenied, "{e:?}");
    assert!(e.message().contains("is node 1's, but the request claims node 3"), "{e:?}");
    // Node 1's own certificate gets past the check: the garbage payload is
    // what is refused.
    let e = raft(Some("node-1"), 1).unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e:?}");
    assert!(e.message().contains("bad payload"), "{e:?}");

    // The peer link is mutual TLS: writes through a follower with the admin
    // certificate reach the leader on its link (the certificate's claim
    // believed from the follower's node certificate), and each follower
    // takes its AppendEntries on its link.
    let leader = status["leader_id"].as_u64().unwrap();
    let via = if leader == 1 { 2 } else { 1 };
    for i in 0..6 {
        let name = format!("via-{i}");
        ok_as(
            &certs,
            "admin",
            &nodes.addr(via),
            &["vm", "create", &name, "--vcpus", "1", "--memory", "64", "--no-start"],
        );
        ok_as(&certs, "admin", &nodes.addr(via), &["vm", "delete", &name]);
    }
    let count = |id: u64, series: &str| {
        let body = https_get(&metrics_addr(&nodes.dirs[id as usize - 1]), &certs.ca(), "/metrics")?;
        let line = body
            .lines()
            .find(|l| l.starts_with(&format!("{series}{{")) && l.contains("transport=\"link\""))?;
        line.rsplit(' ').next()?.parse::<f64>().ok()
    };
    let forwards = eventually("the leader's forwards over its TLS link", 30, || {
        count(leader, "blixard_raft_forwards_total").filter(|n| *n >= 1.0)
    });
    assert!(forwards >= 1.0);
    for id in (1..=3).filter(|id| *id != leader) {
        eventually(&format!("node {id}'s AppendEntries over its TLS link"), 30, || {
            count(id, "blixard_raft_append_entries_total").filter(|n| *n >= 1.0)
        });
    }
    // The link takes only node certificates, each for its own node.
    let link = link_addr(&nodes.dirs[via as usize - 1]);
    let hello = |who: &str, from: u64| link_hello(&certs, &link, who, &cluster_id, from);
    assert_eq!(
        hello(&format!("node-{leader}"), leader).map(|(status, _)| status),
        Some(0),
        "a node's own hello"
    );
    let (status, reason) =
        hello(&format!("node-{leader}"), 3).expect("an answer to a hello from the wrong node");
    assert_eq!(status, 1, "{reason}");
    assert!(reason.contains(&format!("is node {leader}'s, but the link's hello claims node 3")), "{reason}");
    assert_eq!(hello("admin", 1), None, "a client certificate was answered on the peer link");

    // The cluster is still whole.
    let s = ok_as(&certs, "admin", &all, &["cluster", "status", "-o", "json"]);
    let s: Value = serde_json::from_str(&s).unwrap();
    assert_eq!(s["members"].as_array().unwrap().len(), 3);
}

/// An AppendEntries with a garbage payload to the Raft service at `addr`,
/// over TLS verified with the cluster's CA, presenting the certificate
/// `who` (`None`: none), claiming to come from node `from`.
async fn raft_call(
    certs: &Certs,
    addr: &str,
    who: Option<&str>,
    cluster_id: &str,
    from: u64,
) -> Result<(), tonic::Status> {
    let ca = std::fs::read(certs.ca()).unwrap();
    let mut tls = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(ca));
    if let Some(name) = who {
        let (cert, key) = (std::fs::read(certs.pem(name)).unwrap(), std::fs::read(certs.key(name)).unwrap());
        tls = tls.identity(Identity::from_pem(cert, key));
    }
    let channel = Endpoint::from_shared(format!("https://{addr}"))
        .unwrap()
        .tls_config(tls)
        .unwrap()
        .connect_timeout(Duration::from_secs(5))
        .connect()
        .await
        .expect("TLS connection to the node");
    let req = RaftRequest {
        cluster_id: cluster_id.to_string(),
        from,
        payload: vec![0xff; 8],
        format: u32::from(blixard_core::format::CURRENT),
    };
    RaftServiceClient::new(channel).append_entries(req).await.map(|_| ())
}

/// The peer link address of node `dir`, from its log.
fn link_addr(dir: &Path) -> String {
    let port = eventually("the node's peer link port in its log", 30, || {
        let log = std::fs::read_to_string(dir.with_extension("log")).ok()?;
        let line = log.lines().find(|l| l.contains("peer link listening"))?;
        line.split("port=").nth(1)?.split_whitespace().next()?.parse::<u16>().ok()
    });
    format!("127.0.0.1:{port}")
}

/// Opens a TLS connection to the peer link at `addr` presenting the
/// certificate `who`, and says hello as node `from`: the node's answer
/// (status, payload as text), or `None` when it closed without one.
fn link_hello(certs: &Certs, addr: &str, who: &str, cluster_id: &str, from: u64) -> Option<(u8, String)> {
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};
    use tokio_rustls::rustls;
    let mut roots = rustls::RootCertStore::empty();
    roots.add(CertificateDer::from_pem_file(certs.ca()).unwrap()).unwrap();
    let chain =
        CertificateDer::pem_file_iter(certs.pem(who)).unwrap().collect::<Result<Vec<_>, _>>().unwrap();
    let key = PrivateKeyDer::from_pem_file(certs.key(who)).unwrap();
    let config =
        rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_client_auth_cert(chain, key)
            .unwrap();
    let conn =
        rustls::ClientConnection::new(Arc::new(config), ServerName::try_from("127.0.0.1").unwrap()).unwrap();
    let sock = std::net::TcpStream::connect(addr).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut tls = rustls::StreamOwned::new(conn, sock);
    let hello = blixard_core::raft::link::Hello {
        format: blixard_core::format::CURRENT,
        cluster_id: cluster_id.to_string(),
        from,
    };
    let payload = blixard_core::codec::encode(&hello).unwrap();
    let mut out = blixard_core::raft::link::MAGIC.to_vec();
    out.extend_from_slice(&(payload.len() as u32 + 1).to_le_bytes());
    out.push(blixard_core::raft::link::KIND_HELLO);
    out.extend_from_slice(&payload);
    tls.write_all(&out).ok()?;
    let mut len = [0u8; 4];
    tls.read_exact(&mut len).ok()?;
    let mut frame = vec![0u8; u32::from_le_bytes(len) as usize];
    tls.read_exact(&mut frame).ok()?;
    Some((frame[0], String::from_utf8_lossy(&frame[1..]).into_owned()))
}

/// The metrics address node `dir` printed at start.
fn metrics_addr(dir: &Path) -> String {
    eventually("the node's metrics address in its log", 30, || {
        let log = std::fs::read_to_string(dir.with_extension("log")).ok()?;
        let line = log.lines().find(|l| l.trim_start().starts_with("metrics:"))?;
        let url = line.split_whitespace().nth(1)?;
        Some(url.strip_prefix("https://")?.strip_suffix("/metrics")?.to_string())
    })
}

/// An HTTPS GET verified with the CA at `ca`; the body of a 200 answer.
fn https_get(addr: &str, ca: &Path, path: &str) -> Option<String> {
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::{CertificateDer, ServerName};
    use tokio_rustls::rustls;
    let mut roots = rustls::RootCertStore::empty();
    roots.add(CertificateDer::from_pem_file(ca).ok()?).ok()?;
    let config =
        rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .ok()?
            .with_root_certificates(roots)
            .with_no_client_auth();
    let host = addr.rsplit_once(':')?.0.to_string();
    let conn = rustls::ClientConnection::new(Arc::new(config), ServerName::try_from(host).ok()?).ok()?;
    let sock = std::net::TcpStream::connect(addr).ok()?;
    sock.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
    let mut tls = rustls::StreamOwned::new(conn, sock);
    write!(tls, "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").ok()?;
    let mut raw = Vec::new();
    // A server that closes without close_notify ends the read with an error
    // after the body; what was read counts.
    let _ = tls.read_to_end(&mut raw);
    let text = String::from_utf8_lossy(&raw).into_owned();
    let (head, body) = text.split_once("\r\n\r\n")?;
    head.starts_with("HTTP/1.1 200").then(|| body.to_string())
}

#[test]
fn plaintext_beyond_loopback_needs_insecure_plaintext() {
    let tmp = tempfile::tempdir().unwrap();
    let port = free_port();
    let start = |extra: &[&str]| {
        let mut c = Command::new(BIN);
        c.env("BLIXARD_CONFIG", tmp.path().join("config.toml"));
        c.args(["node", "start", "--id", "1", "--bind", &format!("0.0.0.0:{port}")])
            .arg("--data-dir")
            .arg(tmp.path().join("node-1"))
            .args(["--vm-backend", "none", "--metrics-addr", "none"])
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        c
    };

    // No TLS on 0.0.0.0: refused at once, saying what to do.
    let out = start(&[]).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = stderr(&out);
    assert!(
        err.contains(&format!("refusing to serve plaintext (the control API on 0.0.0.0:{port}")),
        "{err}"
    );
    assert!(
        err.contains("--tls-ca, --tls-cert and --tls-key") && err.contains("--insecure-plaintext"),
        "{err}"
    );
    // The metrics listener counts too.
    let out = Command::new(BIN)
        .env("BLIXARD_CONFIG", tmp.path().join("config.toml"))
        .args(["node", "start", "--id", "1", "--bind", &format!("127.0.0.1:{port}")])
        .arg("--data-dir")
        .arg(tmp.path().join("node-1"))
        .args(["--vm-backend", "none", "--metrics-addr", &format!("0.0.0.0:{}", free_port())])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("(metrics on 0.0.0.0:"), "{}", stderr(&out));

    // TLS flags go together, and a node certificate is for its own node.
    let out = start(&["--tls-ca", "ca.pem"]).output().unwrap();
    assert!(stderr(&out)
        .contains("--tls-ca, --tls-cert and --tls-key go together: --tls-cert and --tls-key missing"));
    let certs = Certs::init(tmp.path());
    certs.issue_node(2);
    let flags = certs.node_flags(2);
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    let out = start(&flags).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("the TLS certificate is node 2's, but this is node 1"), "{}", stderr(&out));
    let (ca, admin, admin_key) = (certs.ca(), certs.pem("admin"), certs.key("admin"));
    let with_admin = ["--tls-ca", ca.to_str().unwrap(), "--tls-cert", admin.to_str().unwrap()];
    let out =
        start(&[&with_admin[..], &["--tls-key", admin_key.to_str().unwrap()]].concat()).output().unwrap();
    assert!(
        stderr(&out).contains("is the certificate of client admin (admin), not of a node"),
        "{}",
        stderr(&out)
    );

    // With --insecure-plaintext it starts, and warns.
    common::register(port, &tmp.path().join("node-1"));
    let mut node = Killed(start(&["--insecure-plaintext"]).spawn().unwrap());
    let mut stderr_pipe = node.0.stderr.take().unwrap();
    // Drained until the node exits (a closed pipe would fail its logging).
    let logged = std::thread::spawn(move || {
        let mut text = String::new();
        let _ = stderr_pipe.read_to_string(&mut text);
        text
    });
    let answered = eventually_or_not(60, || {
        cli_at(&format!("127.0.0.1:{port}"), &["cluster", "status", "-o", "json"]).status.success()
    });
    drop(node);
    let text = logged.join().unwrap();
    assert!(answered, "the plaintext node never answered; its log:\n{text}");
    assert!(
        text.contains("WARNING: --insecure-plaintext: serving without TLS (the control API on 0.0.0.0:"),
        "{text}"
    );
}

#[test]
fn up_tls_runs_a_loopback_cluster_with_tls() {
    let tmp = tempfile::tempdir().unwrap();
    let port = free_port();
    let up = Command::new(BIN)
        .env("BLIXARD_CONFIG", tmp.path().join("config.toml"))
        .env_remove("BLIXARD_TOKEN")
        .args(["up", "--tls", "--nodes", "1", "--base-port", &port.to_string(), "--metrics", "false"])
        .args(["--vm-backend", "none", "--vcpus", "4", "--memory-mb", "4096"])
        .arg("--data-dir")
        .arg(tmp.path())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut up = Interrupted(up);
    // The certificates live in DATA_DIR/certs, the admin's among them.
    let certs = Certs { dir: tmp.path().join("certs") };
    let addr = format!("127.0.0.1:{port}");
    eventually("up --tls serves the admin over TLS", 90, || {
        cli_as(&certs, "admin", &addr, &["cluster", "status"]).status.success().then_some(())
    });
    let out = cli_at(&addr, &["cluster", "status"]);
    assert!(stderr(&out).contains("serves TLS only"), "{}", stderr(&out));
    // The context `up` wrote holds the members, the admin token, the CA and
    // the admin's certificate: a bare command just works.
    let bare = eventually("up --tls wrote its context", 30, || {
        let out = Command::new(BIN)
            .env("BLIXARD_CONFIG", tmp.path().join("config.toml"))
            .env_remove("BLIXARD_TOKEN")
            .env_remove("BLIXARD_ADDR")
            .args(["vm", "list", "-o", "json"])
            .output()
            .unwrap();
        out.status.success().then_some(out)
    });
    assert!(stdout(&bare).trim_start().starts_with('['), "{}", stdout(&bare));
    let code = up.stop();
    assert!(code.is_some_and(|c| c.success()), "up exited with {code:?}");
}

/// `blixard up`, stopped with SIGINT (it stops its nodes) when dropped.
struct Interrupted(std::process::Child);

impl Interrupted {
    fn stop(&mut self) -> Option<std::process::ExitStatus> {
        // SAFETY: signalling a child process of this test.
        unsafe {
            libc::kill(self.0.id() as libc::pid_t, libc::SIGINT);
        }
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while std::time::Instant::now() < deadline {
            if let Ok(Some(code)) = self.0.try_wait() {
                return Some(code);
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
        None
    }
}

impl Drop for Interrupted {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            self.stop();
        }
    }
}

/// Polls `f` for up to `secs`; whether it ever returned true.
fn eventually_or_not(secs: u64, mut f: impl FnMut() -> bool) -> bool {
    let deadline = std::time::Instant::now() + Duration::from_secs(secs);
    while std::time::Instant::now() < deadline {
        if f() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    false
}

/// A child process killed when dropped (also when the test panics).
struct Killed(std::process::Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Client certificates carry roles, enforced on every member (writes a
/// follower forwards over mutual TLS keep the certificate's caller), and a
/// client cannot vouch for a caller: only a node certificate can.
#[test]
fn certificate_roles_are_enforced_and_only_nodes_vouch_for_callers() {
    let tmp = tempfile::tempdir().unwrap();
    let certs = Certs::init(tmp.path());
    certs.issue_client("watcher", "viewer");
    certs.issue_client("deployer", "operator");
    let nodes = three_nodes(tmp.path(), &certs);
    eventually("a TLS cluster of three voters", 90, || {
        let out = cli_as(&certs, "admin", &nodes.addr(1), &["cluster", "status", "-o", "json"]);
        let s: Value = serde_json::from_slice(&out.stdout).ok()?;
        let voters = s["members"].as_array()?.iter().filter(|m| m["role"] != "learner").count();
        (voters == 3 && s["nodes"].as_array()?.len() == 3).then_some(())
    });
    fn create(name: &str) -> Vec<&str> {
        vec!["vm", "create", name, "--vcpus", "1", "--memory", "16", "--no-start"]
    }
    for id in 1..=3 {
        let addr = nodes.addr(id);
        let out = cli_as(&certs, "watcher", &addr, &create(&format!("w-{id}")));
        assert_eq!(out.status.code(), Some(8), "{}", stderr(&out));
        assert!(stderr(&out).contains("client certificate \"watcher\" (viewer)"), "{}", stderr(&out));
        assert!(cli_as(&certs, "watcher", &addr, &["vm", "list"]).status.success());
        ok_as(&certs, "deployer", &addr, &create(&format!("d-{id}")));
        let out = cli_as(&certs, "deployer", &addr, &["cluster", "remove", "3"]);
        assert_eq!(out.status.code(), Some(8), "{}", stderr(&out));
    }

    // A viewer certificate that claims to be forwarding for an admin.
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(async {
        let read = |p: std::path::PathBuf| std::fs::read(p).unwrap();
        let tls = tonic::transport::ClientTlsConfig::new()
            .ca_certificate(tonic::transport::Certificate::from_pem(read(certs.ca())))
            .identity(tonic::transport::Identity::from_pem(
                read(certs.pem("watcher")),
                read(certs.key("watcher")),
            ))
            .domain_name("127.0.0.1");
        let ch = tonic::transport::Endpoint::from_shared(format!("https://{}", nodes.addr(2)))
            .unwrap()
            .tls_config(tls)
            .unwrap()
            .connect()
            .await
            .unwrap();
        let mut vms = blixard_proto::vm_service_client::VmServiceClient::new(ch);
        let mut req = tonic::Request::new(blixard_proto::CreateVmRequest {
            name: "forged".into(),
            spec: Some(blixard_proto::VmSpec { vcpus: 1, memory_mb: 16, disk_gb: 1, ..Default::default() }),
            no_start: true,
            ..Default::default()
        });
        req.metadata_mut().insert(blixard_core::auth::CALLER, "cert:admin:root".parse().unwrap());
        req.metadata_mut().insert("x-blixard-forwarded", "1".parse().unwrap());
        let e = vms.create_vm(req).await.unwrap_err();
        assert_eq!(e.code(), tonic::Code::PermissionDenied, "{e:?}");
        assert!(e.message().contains("\"watcher\" (viewer)"), "{e:?}");
    });

    // A fourth node joins through a follower with its node certificate
    // alone: the follower forwards the join, vouching for the node.
    let status = ok_as(&certs, "admin", &nodes.addr(1), &["cluster", "status", "-o", "json"]);
    let leader = serde_json::from_str::<Value>(&status).unwrap()["leader_id"].as_u64().unwrap();
    let follower = (1..=3).find(|i| *i != leader).unwrap();
    certs.issue_node(4);
    let flags = certs.node_flags(4);
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    let port = free_port();
    let dir = tmp.path().join("node-4");
    let mut fourth = common::node_command(
        4,
        port,
        &dir,
        Some(nodes.port(follower)),
        ["16", "8192", "100"],
        "none",
        &flags,
    )
    .env_remove("BLIXARD_TOKEN")
    .spawn()
    .unwrap();
    let joined = eventually_or_not(60, || {
        let out = cli_as(&certs, "admin", &nodes.addr(1), &["cluster", "members", "-o", "json"]);
        serde_json::from_slice::<Value>(&out.stdout)
            .ok()
            .and_then(|v| v.as_array().map(|m| m.iter().any(|m| m["id"] == 4 && m["role"] != "learner")))
            .unwrap_or(false)
    });
    let _ = fourth.kill();
    let _ = fourth.wait();
    assert!(
        joined,
        "node 4 did not join through follower {follower}: {}",
        std::fs::read_to_string(dir.with_extension("log")).unwrap_or_default()
    );
}
