//! `blixard cert`: a cluster CA and the certificates nodes and clients
//! present (pure Rust: rcgen with ring, ECDSA P-256 keys).
//!
//! Everything lives in one directory (`--dir`, default `./blixard-certs`):
//! - `ca.pem`, `ca-key.pem`: the cluster CA (`cert init`), valid 10 years.
//!   Its key signs every certificate: keep it off the nodes.
//! - `admin.pem`, `admin-key.pem`: a client certificate with role admin
//!   (`cert init`).
//! - `node-N.pem`, `node-N-key.pem`: node N (`cert issue node`), for server
//!   and client authentication (nodes dial each other with mutual TLS),
//!   valid for every `--host` (DNS names and IP addresses).
//! - `NAME.pem`, `NAME-key.pem`: client NAME with a role (`cert issue
//!   client`).
//!
//! Leaves are valid for one year. Every validity starts an hour back, so a
//! host whose clock is a little behind accepts a certificate made just now.
//! The identity is one SAN URI (`blixard:node:N`, `blixard:client:NAME:ROLE`;
//! see `blixard_core::tls`); the common name is for people. Keys are
//! written with mode 0600, nothing is ever overwritten.
use std::io::Write;
use std::net::IpAddr;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use blixard_core::auth::Role;
use blixard_core::tls::{client_name_ok, PeerIdentity, CLIENT_NAME_RULE};
use clap::Subcommand;
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer,
    KeyPair, KeyUsagePurpose, SanType,
};
use time::{Duration, OffsetDateTime};

use crate::Failure;

/// Where `cert` commands read and write by default.
pub const DEFAULT_DIR: &str = "blixard-certs";
/// How long the CA is valid.
pub const CA_VALIDITY: Duration = Duration::days(3650);
/// How long node and client certificates are valid.
pub const LEAF_VALIDITY: Duration = Duration::days(365);
/// How far back every validity starts (clock skew between hosts).
const BACKDATE: Duration = Duration::hours(1);

#[derive(Subcommand)]
pub enum CertCmd {
    /// Make a cluster CA (ca.pem, ca-key.pem) and an admin client
    /// certificate (admin.pem, admin-key.pem) in --dir. Refuses to replace
    /// an existing CA.
    Init {
        #[arg(long, default_value = DEFAULT_DIR)]
        dir: PathBuf,
    },
    /// Issue a certificate signed by the CA in --dir.
    #[command(subcommand)]
    Issue(IssueCmd),
}

#[derive(Subcommand)]
pub enum IssueCmd {
    /// A node's certificate (node-N.pem, node-N-key.pem), for server and
    /// client authentication.
    Node {
        /// The node's id (its `node start --id`).
        #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
        id: u64,
        /// A DNS name or IP address clients and peers use to reach the
        /// node (repeatable, or comma separated): every address in --addr,
        /// --advertise and --join must be one of them.
        #[arg(long = "host", value_name = "HOST", required = true, num_args = 1.., value_delimiter = ',')]
        hosts: Vec<String>,
        #[arg(long, default_value = DEFAULT_DIR)]
        dir: PathBuf,
    },
    /// A client certificate (NAME.pem, NAME-key.pem) with a role.
    Client {
        /// Who holds it (1-63 lowercase letters, digits and '-').
        #[arg(long)]
        name: String,
        /// viewer (reads, watch, logs), operator (+ VM writes, console) or
        /// admin (+ membership, nodes, scheduler, quotas, tokens).
        #[arg(long, value_parser = parse_role)]
        role: Role,
        #[arg(long, default_value = DEFAULT_DIR)]
        dir: PathBuf,
    },
}

fn parse_role(s: &str) -> Result<Role, String> {
    Role::parse(s).ok_or_else(|| format!("expected {}", Role::RULE))
}

pub fn run(cmd: CertCmd) -> Result<(), Failure> {
    let written = match cmd {
        CertCmd::Init { dir } => init(&dir, now())?,
        CertCmd::Issue(IssueCmd::Node { id, hosts, dir }) => issue_node(&dir, id, &hosts, now())?,
        CertCmd::Issue(IssueCmd::Client { name, role, dir }) => issue_client(&dir, &name, role, now())?,
    };
    for w in &written {
        println!("wrote {}  {}", w.path.display(), w.what);
    }
    if let Some(next) = written.first().and_then(|w| w.next.as_deref()) {
        println!("{next}");
    }
    Ok(())
}

fn now() -> OffsetDateTime {
    OffsetDateTime::now_utc()
}

/// A file `cert` wrote, and what it is.
#[derive(Debug)]
pub struct Written {
    pub path: PathBuf,
    pub what: String,
    /// What to do next, said once after the list.
    pub next: Option<String>,
}

const CA_CERT: &str = "ca.pem";
const CA_KEY: &str = "ca-key.pem";

/// `cert init`: the CA and the admin client certificate.
pub fn init(dir: &Path, now: OffsetDateTime) -> Result<Vec<Written>, Failure> {
    for f in [CA_CERT, CA_KEY] {
        if dir.join(f).exists() {
            return Err(Failure::new(format!(
                "{} already exists: {} holds a CA, which cert init never replaces (every certificate it signed would stop working). Use it with cert issue, or choose another --dir",
                dir.join(f).display(),
                dir.display()
            )));
        }
    }
    refuse_existing(dir, &["admin"])?;
    let key = new_key()?;
    let mut p = CertificateParams::default();
    let name = format!("Blixard cluster CA {}", random_hex());
    p.distinguished_name = dn(&name);
    p.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    p.key_usages =
        vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
    p.not_before = now - BACKDATE;
    p.not_after = now + CA_VALIDITY;
    let ca = p.self_signed(&key).map_err(|e| Failure::new(format!("cannot make the CA certificate: {e}")))?;
    make_dir(dir)?;
    let mut out = vec![
        write(
            dir,
            CA_CERT,
            &ca.pem(),
            false,
            format!("cluster CA \"{name}\", valid until {}", p.not_after.date()),
        )?,
        write(
            dir,
            CA_KEY,
            &key.serialize_pem(),
            true,
            "the CA's private key (mode 0600): it signs every certificate, keep it off the nodes".into(),
        )?,
    ];
    let issuer = Issuer::new(p, key);
    let admin = PeerIdentity::Client { name: "admin".into(), role: Role::Admin };
    out.extend(issue(dir, &issuer, "admin", &admin, &[], now)?);
    out[0].next = Some(format!(
        "next: blixard cert issue node --id N --host HOST --dir {} for each node; clients: --cacert {} --cert {} --key {}",
        dir.display(),
        dir.join(CA_CERT).display(),
        dir.join("admin.pem").display(),
        dir.join("admin-key.pem").display()
    ));
    Ok(out)
}

/// `cert issue node`.
pub fn issue_node(
    dir: &Path,
    id: u64,
    hosts: &[String],
    now: OffsetDateTime,
) -> Result<Vec<Written>, Failure> {
    if id == 0 {
        return Err(Failure::new("--id: node ids start at 1"));
    }
    let sans = hosts.iter().map(|h| host_san(h)).collect::<Result<Vec<_>, _>>()?;
    let file = format!("node-{id}");
    refuse_existing(dir, &[&file])?;
    let issuer = load_ca(dir)?;
    let mut out = issue(dir, &issuer, &file, &PeerIdentity::Node(id), &sans, now)?;
    out[0].next = Some(format!(
        "start the node with: blixard node start --id {id} --tls-ca {} --tls-cert {} --tls-key {} ...",
        dir.join(CA_CERT).display(),
        out[0].path.display(),
        out[1].path.display()
    ));
    Ok(out)
}

/// `cert issue client`.
pub fn issue_client(
    dir: &Path,
    name: &str,
    role: Role,
    now: OffsetDateTime,
) -> Result<Vec<Written>, Failure> {
    check_client_name(name)?;
    refuse_existing(dir, &[name])?;
    let issuer = load_ca(dir)?;
    let identity = PeerIdentity::Client { name: name.to_string(), role };
    let mut out = issue(dir, &issuer, name, &identity, &[], now)?;
    out[0].next = Some(format!(
        "use it with: blixard --cacert {} --cert {} --key {} ...",
        dir.join(CA_CERT).display(),
        out[0].path.display(),
        out[1].path.display()
    ));
    Ok(out)
}

/// Client names are DNS-label-like and must not collide with the other
/// files of the directory.
fn check_client_name(name: &str) -> Result<(), Failure> {
    if !client_name_ok(name) {
        return Err(Failure::new(format!("--name {name:?}: {CLIENT_NAME_RULE}")));
    }
    let node_file =
        name.strip_prefix("node-").is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()));
    if name == "ca" || node_file || name.ends_with("-key") {
        return Err(Failure::new(format!(
            "--name {name:?}: reserved (its files would be confused with the CA's, a node's or a key): choose another"
        )));
    }
    Ok(())
}

/// A `--host` as a subject alternative name: an IP address, or a DNS name.
fn host_san(host: &str) -> Result<SanType, Failure> {
    let bare = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')).unwrap_or(host);
    if let Ok(ip) = bare.parse::<IpAddr>() {
        return Ok(SanType::IpAddress(ip));
    }
    let bad = |why: &str| Failure::new(format!("--host {host:?}: {why}"));
    if host.contains(':') {
        return Err(bad("give a DNS name or an IP address without the port"));
    }
    let name = host.strip_suffix('.').unwrap_or(host);
    let label_ok = |l: &str| {
        !l.is_empty()
            && l.len() <= 63
            && !l.starts_with('-')
            && !l.ends_with('-')
            && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
    };
    if name.is_empty() || name.len() > 253 || !name.split('.').all(label_ok) {
        return Err(bad(
            "not a DNS name or IP address (DNS names: labels of 1-63 letters, digits and '-', separated by dots)",
        ));
    }
    let ia5 = name.to_string().try_into().map_err(|e| bad(&format!("{e}")))?;
    Ok(SanType::DnsName(ia5))
}

/// Issues the certificate of `identity` into `dir/FILE.pem` and
/// `dir/FILE-key.pem`.
fn issue(
    dir: &Path,
    issuer: &Issuer<'_, KeyPair>,
    file: &str,
    identity: &PeerIdentity,
    hosts: &[SanType],
    now: OffsetDateTime,
) -> Result<Vec<Written>, Failure> {
    let key = new_key()?;
    let mut p = CertificateParams::default();
    let uri = identity.uri();
    let (cn, usages) = match identity {
        PeerIdentity::Node(id) => (
            format!("blixard node {id}"),
            vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth],
        ),
        PeerIdentity::Client { name, .. } => (name.clone(), vec![ExtendedKeyUsagePurpose::ClientAuth]),
    };
    p.distinguished_name = dn(&cn);
    let uri_san = uri.clone().try_into().map_err(|e| Failure::new(format!("identity {uri}: {e}")))?;
    p.subject_alt_names = std::iter::once(SanType::URI(uri_san)).chain(hosts.iter().cloned()).collect();
    p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    p.extended_key_usages = usages;
    p.use_authority_key_identifier_extension = true;
    p.not_before = now - BACKDATE;
    p.not_after = now + LEAF_VALIDITY;
    let cert =
        p.signed_by(&key, issuer).map_err(|e| Failure::new(format!("cannot sign the certificate: {e}")))?;
    let names: Vec<String> = hosts
        .iter()
        .map(|s| match s {
            SanType::IpAddress(ip) => ip.to_string(),
            SanType::DnsName(n) => n.as_str().to_string(),
            other => format!("{other:?}"),
        })
        .collect();
    let what = match identity {
        PeerIdentity::Node(id) => format!("node {id} ({uri}) for {}", names.join(", ")),
        PeerIdentity::Client { name, role } => format!("client {name}, role {role} ({uri})"),
    };
    make_dir(dir)?;
    Ok(vec![
        write(
            dir,
            &format!("{file}.pem"),
            &cert.pem(),
            false,
            format!("{what}, valid until {}", p.not_after.date()),
        )?,
        write(
            dir,
            &format!("{file}-key.pem"),
            &key.serialize_pem(),
            true,
            "its private key (mode 0600)".into(),
        )?,
    ])
}

/// The CA in `dir`, checked: its key belongs to its certificate.
fn load_ca(dir: &Path) -> Result<Issuer<'static, KeyPair>, Failure> {
    let (cert_path, key_path) = (dir.join(CA_CERT), dir.join(CA_KEY));
    let read = |p: &Path| {
        std::fs::read_to_string(p).map_err(|e| {
            if e.kind() == std::io::ErrorKind::NotFound {
                Failure::new(format!(
                    "{} not found: no CA in {} (make one with blixard cert init --dir {}, or give --dir)",
                    p.display(),
                    dir.display(),
                    dir.display()
                ))
            } else {
                Failure::new(format!("{}: {e}", p.display()))
            }
        })
    };
    let (cert_pem, key_pem) = (read(&cert_path)?, read(&key_path)?);
    let key = KeyPair::from_pem(&key_pem)
        .map_err(|e| Failure::new(format!("{}: not a usable private key ({e})", key_path.display())))?;
    let der = blixard_core::tls::first_cert(cert_pem.as_bytes())
        .map_err(|why| Failure::new(format!("{}: {why}", cert_path.display())))?;
    let (_, x509) = x509_parser::parse_x509_certificate(&der)
        .map_err(|e| Failure::new(format!("{}: not an X.509 certificate ({e})", cert_path.display())))?;
    if !x509.is_ca() {
        return Err(Failure::new(format!("{}: not a CA certificate", cert_path.display())));
    }
    if x509.public_key().subject_public_key.data.as_ref() != key.public_key_raw() {
        return Err(Failure::new(format!(
            "{} does not belong to {} (the CA's key and certificate differ)",
            key_path.display(),
            cert_path.display()
        )));
    }
    Issuer::from_ca_cert_pem(&cert_pem, key)
        .map_err(|e| Failure::new(format!("{}: cannot sign with this CA ({e})", cert_path.display())))
}

/// Fails if any of the files of these certificates exists.
fn refuse_existing(dir: &Path, files: &[&str]) -> Result<(), Failure> {
    for f in files {
        for path in [dir.join(format!("{f}.pem")), dir.join(format!("{f}-key.pem"))] {
            if path.exists() {
                return Err(Failure::new(format!(
                    "{} already exists: remove {f}.pem and {f}-key.pem first to issue a new one (the old certificate stays valid until it expires)",
                    path.display()
                )));
            }
        }
    }
    Ok(())
}

fn new_key() -> Result<KeyPair, Failure> {
    KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
        .map_err(|e| Failure::new(format!("cannot generate a key: {e}")))
}

fn dn(cn: &str) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "Blixard");
    dn.push(DnType::CommonName, cn);
    dn
}

/// Eight random hex digits (tells two clusters' CAs apart).
fn random_hex() -> String {
    let id = crate::client::new_request_id();
    id[id.len() - 8..].to_string()
}

/// Creates `dir` (mode 0700 if new: it holds keys).
fn make_dir(dir: &Path) -> Result<(), Failure> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|e| Failure::new(format!("cannot create {}: {e}", dir.display())))
}

/// Writes a new file (never replaces one); keys with mode 0600.
fn write(dir: &Path, name: &str, text: &str, secret: bool, what: String) -> Result<Written, Failure> {
    let path = dir.join(name);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(if secret { 0o600 } else { 0o644 })
        .open(&path)
        .map_err(|e| Failure::new(format!("cannot create {}: {e}", path.display())))?;
    f.write_all(text.as_bytes())
        .and_then(|()| f.sync_all())
        .map_err(|e| Failure::new(format!("cannot write {}: {e}", path.display())))?;
    Ok(Written { path, what, next: None })
}

#[cfg(test)]
mod tests {
    use super::*;
    use blixard_core::tls::{identity_of_der, NodeTls};
    use std::os::unix::fs::PermissionsExt;

    fn msg<T: std::fmt::Debug>(r: Result<T, Failure>) -> String {
        r.map(|v| format!("unexpected success: {v:?}")).unwrap_or_else(|f| f.message)
    }

    fn ok<T>(r: Result<T, Failure>) -> T {
        r.unwrap_or_else(|f| panic!("{}", f.message))
    }

    fn identity(path: &Path) -> Option<PeerIdentity> {
        let pem = std::fs::read(path).unwrap();
        identity_of_der(&blixard_core::tls::first_cert(&pem).unwrap()).unwrap()
    }

    #[test]
    fn init_then_issue_gives_certificates_a_node_accepts() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("certs");
        let t = now();
        let w = ok(init(&dir, t));
        let names: Vec<_> =
            w.iter().map(|w| w.path.file_name().unwrap().to_str().unwrap().to_string()).collect();
        assert_eq!(names, ["ca.pem", "ca-key.pem", "admin.pem", "admin-key.pem"]);
        for (f, mode) in
            [("ca.pem", 0o644), ("ca-key.pem", 0o600), ("admin.pem", 0o644), ("admin-key.pem", 0o600)]
        {
            let m = std::fs::metadata(dir.join(f)).unwrap().permissions().mode() & 0o777;
            assert_eq!(m, mode, "{f}");
        }
        assert_eq!(std::fs::metadata(&dir).unwrap().permissions().mode() & 0o777, 0o700);
        assert_eq!(
            identity(&dir.join("admin.pem")),
            Some(PeerIdentity::Client { name: "admin".into(), role: Role::Admin })
        );
        // Never a second CA over the first.
        assert!(msg(init(&dir, t)).contains("never replaces"));

        let hosts = vec!["127.0.0.1".to_string(), "node-2.example.com".into(), "::1".into()];
        ok(issue_node(&dir, 2, &hosts, t));
        let tls =
            NodeTls::load(&dir.join("ca.pem"), &dir.join("node-2.pem"), &dir.join("node-2-key.pem")).unwrap();
        assert_eq!(tls.node_id, 2);
        assert!(msg(issue_node(&dir, 2, &hosts, t)).contains("already exists"));

        ok(issue_client(&dir, "ci-bot", Role::Operator, t));
        assert_eq!(
            identity(&dir.join("ci-bot.pem")),
            Some(PeerIdentity::Client { name: "ci-bot".into(), role: Role::Operator })
        );
        // A client certificate is no node's.
        let e = NodeTls::load(&dir.join("ca.pem"), &dir.join("ci-bot.pem"), &dir.join("ci-bot-key.pem"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("not of a node"), "{e}");
    }

    #[test]
    fn inputs_are_checked() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        let t = now();
        assert!(msg(issue_node(dir, 1, &["10.0.0.1".into()], t)).contains("no CA in"));
        ok(init(dir, t));
        for bad in ["10.0.0.1:7420", "-bad.example", "a..b", "", "under_score", "x:y"] {
            assert!(msg(issue_node(dir, 1, &[bad.to_string()], t)).contains("--host"), "{bad}");
        }
        assert!(msg(issue_node(dir, 0, &["h".into()], t)).contains("start at 1"));
        for bad in ["Alice", "", "-x", "x-", "a_b", "ca", "node-3", "bob-key", &"x".repeat(64)] {
            assert!(msg(issue_client(dir, bad, Role::Viewer, t)).contains("--name"), "{bad:?}");
        }
        // node-web is a name, not a node's file.
        ok(issue_client(dir, "node-web", Role::Viewer, t));
        assert_eq!(parse_role("root").unwrap_err(), "expected viewer, operator or admin");
        // A CA key that is not the CA's.
        std::fs::remove_file(dir.join("ca-key.pem")).unwrap();
        std::fs::copy(dir.join("admin-key.pem"), dir.join("ca-key.pem")).unwrap();
        assert!(msg(issue_client(dir, "eve", Role::Admin, t)).contains("does not belong to"));
    }
}
