//! TLS for nodes: the PEM files a node runs with, tonic's server and client
//! configurations built from them, and the identity a verified peer
//! certificate carries.
//!
//! **Identity encoding** (what `blixard cert` writes; see docs/OPERATIONS.md,
//! "TLS"): exactly one subject-alternative-name URI of the scheme `blixard`:
//! - `blixard:node:N` for the certificate of node `N` (valid for server and
//!   client authentication: nodes dial each other with mutual TLS);
//! - `blixard:client:NAME:ROLE` for a client certificate (client
//!   authentication only), `ROLE` one of `viewer`, `operator`, `admin`.
//!
//! The common name is for people only and never read. A certificate with no
//! such URI, or with several, has no identity. Only certificates the TLS
//! handshake verified against the cluster's CA are ever read, so the identity
//! is as trustworthy as the CA's key.
//!
//! Under `cfg(madsim)` the simulated transport has no TLS: the configuration
//! is loaded and checked as usual, but never applied, and no request has a
//! peer identity.
use std::path::{Path, PathBuf};
use std::time::Duration;

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use x509_parser::certificate::X509Certificate;
use x509_parser::extensions::GeneralName;

use crate::auth::Role;
use crate::types::NodeId;

/// The URI scheme of identities in certificates.
pub const URI_SCHEME: &str = "blixard";

/// How long a TLS handshake may take on a node's listener before the
/// connection is dropped (a client that connects and never speaks).
pub const SERVER_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Who a verified certificate says its holder is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PeerIdentity {
    /// A node of the cluster.
    Node(NodeId),
    /// A client (a person or a program) with a role.
    Client { name: String, role: Role },
}

impl PeerIdentity {
    /// The SAN URI that carries this identity.
    pub fn uri(&self) -> String {
        match self {
            PeerIdentity::Node(id) => format!("{URI_SCHEME}:node:{id}"),
            PeerIdentity::Client { name, role } => format!("{URI_SCHEME}:client:{name}:{role}"),
        }
    }

    /// Parses a SAN URI; `None` if it is not a well-formed Blixard identity.
    pub fn parse_uri(uri: &str) -> Option<PeerIdentity> {
        let rest = uri.strip_prefix(URI_SCHEME)?.strip_prefix(':')?;
        let parts: Vec<&str> = rest.split(':').collect();
        match parts.as_slice() {
            ["node", id] => {
                // Digits only: no sign, no spaces, no leading zeros to
                // confuse two spellings of one id.
                let ok = !id.is_empty() && id.bytes().all(|b| b.is_ascii_digit()) && !id.starts_with('0');
                let id: NodeId = id.parse().ok().filter(|_| ok)?;
                Some(PeerIdentity::Node(id))
            }
            ["client", name, role] if client_name_ok(name) => {
                Some(PeerIdentity::Client { name: name.to_string(), role: Role::parse(role)? })
            }
            _ => None,
        }
    }
}

impl std::fmt::Display for PeerIdentity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PeerIdentity::Node(id) => write!(f, "node {id}"),
            PeerIdentity::Client { name, role } => write!(f, "client {name} ({role})"),
        }
    }
}

/// The rule for client names in certificates (and their file names).
pub const CLIENT_NAME_RULE: &str =
    "1-63 characters: lowercase letters, digits and '-', starting with a letter and not ending with '-'";

/// Whether `name` is a valid client name: DNS-label-like, see
/// [`CLIENT_NAME_RULE`].
pub fn client_name_ok(name: &str) -> bool {
    let b = name.as_bytes();
    !b.is_empty()
        && b.len() <= 63
        && b[0].is_ascii_lowercase()
        && b[b.len() - 1] != b'-'
        && b.iter().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
}

/// The identity in a DER certificate: `Ok(None)` if it carries none (or
/// several), `Err` if it is not a certificate.
pub fn identity_of_der(der: &[u8]) -> Result<Option<PeerIdentity>, String> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).map_err(|e| e.to_string())?;
    identity_of(&cert)
}

fn identity_of(cert: &X509Certificate<'_>) -> Result<Option<PeerIdentity>, String> {
    let Some(san) = cert.subject_alternative_name().map_err(|e| e.to_string())? else {
        return Ok(None);
    };
    let mut found = None;
    for name in &san.value.general_names {
        if let GeneralName::URI(uri) = name {
            if !uri.starts_with(&format!("{URI_SCHEME}:")) {
                continue;
            }
            match (PeerIdentity::parse_uri(uri), &found) {
                // A malformed Blixard URI, or a second one: no identity.
                (None, _) | (Some(_), Some(_)) => return Ok(None),
                (Some(id), None) => found = Some(id),
            }
        }
    }
    Ok(found)
}

/// The identity of the verified certificate the caller presented on this
/// request's TLS connection, if any.
pub fn peer_identity<T>(req: &tonic::Request<T>) -> Option<PeerIdentity> {
    #[cfg(madsim)]
    {
        let _ = req;
        None
    }
    #[cfg(not(madsim))]
    {
        let certs = req.peer_certs()?;
        cached_identity(certs.first()?.as_ref())
    }
}

/// [`identity_of_der`], remembered by the certificate's bytes: every
/// request on a connection carries the same leaf, and a node sees few
/// distinct certificates, so each is parsed once. (The identity is a
/// function of the bytes alone; verifying them is the handshake's job.)
#[cfg(not(madsim))]
fn cached_identity(der: &[u8]) -> Option<PeerIdentity> {
    use std::sync::OnceLock;
    /// More distinct certificates than this empties the cache.
    const MAX: usize = 4096;
    static CACHE: OnceLock<dashmap::DashMap<Box<[u8]>, Option<PeerIdentity>>> = OnceLock::new();
    let cache = CACHE.get_or_init(dashmap::DashMap::new);
    if let Some(known) = cache.get(der) {
        return known.clone();
    }
    let identity = identity_of_der(der).ok().flatten();
    if cache.len() >= MAX {
        cache.clear();
    }
    cache.insert(der.into(), identity.clone());
    identity
}

/// The node the caller's certificate names, if the caller presented a node
/// certificate of the cluster's CA.
pub fn peer_node<T>(req: &tonic::Request<T>) -> Option<NodeId> {
    match peer_identity(req)? {
        PeerIdentity::Node(id) => Some(id),
        PeerIdentity::Client { .. } => None,
    }
}

/// The client name and role the caller's certificate names, if the caller
/// presented a client certificate of the cluster's CA.
pub fn peer_client<T>(req: &tonic::Request<T>) -> Option<(String, Role)> {
    match peer_identity(req)? {
        PeerIdentity::Client { name, role } => Some((name, role)),
        PeerIdentity::Node(_) => None,
    }
}

/// A TLS file that cannot be used, and why.
#[derive(Debug, thiserror::Error)]
#[error("{what} {}: {reason}", path.display())]
pub struct TlsFileError {
    /// What the file should have been ("CA certificate", ...).
    pub what: &'static str,
    pub path: PathBuf,
    pub reason: String,
}

/// What a node runs TLS with: its cluster's CA certificate, its own
/// certificate (naming it `blixard:node:N`) and private key, as PEM.
#[derive(Clone)]
pub struct NodeTls {
    pub ca: Vec<u8>,
    pub cert: Vec<u8>,
    pub key: Vec<u8>,
    /// The node id the certificate names.
    pub node_id: NodeId,
}

impl std::fmt::Debug for NodeTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the key.
        f.debug_struct("NodeTls").field("node_id", &self.node_id).finish_non_exhaustive()
    }
}

impl NodeTls {
    /// Reads and checks the three files: the CA is a CA, the certificate is
    /// signed by it, valid now and names a node, the key is a private key
    /// that goes with the certificate.
    pub fn load(ca: &Path, cert: &Path, key: &Path) -> Result<NodeTls, TlsFileError> {
        let read = |what: &'static str, path: &Path| {
            std::fs::read(path).map_err(|e| TlsFileError {
                what,
                path: path.to_path_buf(),
                reason: e.to_string(),
            })
        };
        let (ca_pem, cert_pem, key_pem) =
            (read("CA certificate", ca)?, read("certificate", cert)?, read("private key", key)?);
        Self::from_pem_files(ca_pem, cert_pem, key_pem, [ca, cert, key])
    }

    /// [`load`](Self::load) from PEM already in memory (`paths` name them in
    /// errors).
    pub fn from_pem_files(
        ca: Vec<u8>,
        cert: Vec<u8>,
        key: Vec<u8>,
        paths: [&Path; 3],
    ) -> Result<NodeTls, TlsFileError> {
        let err = |what: &'static str, i: usize, reason: String| TlsFileError {
            what,
            path: paths[i].to_path_buf(),
            reason,
        };
        let ca_der = first_cert(&ca).map_err(|r| err("CA certificate", 0, r))?;
        let ca_x509 = parse_ca(&ca_der).map_err(|r| err("CA certificate", 0, r))?;
        let cert_der = first_cert(&cert).map_err(|r| err("certificate", 1, r))?;
        let x509 = parse_issued(&cert_der, &ca_x509, paths[0]).map_err(|r| err("certificate", 1, r))?;
        let node_id = match identity_of(&x509).map_err(|r| err("certificate", 1, r))? {
            Some(PeerIdentity::Node(id)) => id,
            Some(other) => {
                return Err(err(
                    "certificate",
                    1,
                    format!(
                        "is the certificate of {other}, not of a node (blixard cert issue node --id N --host HOST)"
                    ),
                ))
            }
            None => {
                return Err(err(
                    "certificate",
                    1,
                    format!(
                        "names no node (a node certificate carries the URI {URI_SCHEME}:node:N; blixard cert issue node makes one)"
                    ),
                ))
            }
        };
        let private = PrivateKeyDer::from_pem_slice(&key)
            .map_err(|e| err("private key", 2, format!("no PEM private key in it ({e})")))?;
        check_key_matches(private, cert_der.clone()).map_err(|r| err("private key", 2, r))?;
        Ok(NodeTls { ca, cert, key, node_id })
    }

    /// The node listener's TLS: its certificate, client certificates of the
    /// cluster's CA verified when presented but optional (a client may
    /// authenticate with a token instead).
    #[cfg(not(madsim))]
    pub fn server_config(&self) -> tonic::transport::ServerTlsConfig {
        use tonic::transport::{Certificate, Identity, ServerTlsConfig};
        ServerTlsConfig::new()
            .identity(Identity::from_pem(&self.cert, &self.key))
            .client_ca_root(Certificate::from_pem(&self.ca))
            .client_auth_optional(true)
            .timeout(SERVER_HANDSHAKE_TIMEOUT)
    }

    /// How this node dials its peers: verifies them against the cluster's
    /// CA and presents its own certificate.
    #[cfg(not(madsim))]
    pub fn client_config(&self, handshake_timeout: Duration) -> tonic::transport::ClientTlsConfig {
        use tonic::transport::{Certificate, ClientTlsConfig, Identity};
        ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(&self.ca))
            .identity(Identity::from_pem(&self.cert, &self.key))
            .timeout(handshake_timeout)
    }
}

/// The peer link's TLS (raft/link.rs): unlike the gRPC listener, both ends
/// must present a certificate of the cluster's CA (the accepting node then
/// requires a node certificate naming the node the link's hello is from);
/// TLS 1.2 or 1.3 with rustls' ring provider, as tonic's.
#[cfg(not(madsim))]
impl NodeTls {
    fn link_parts(
        &self,
    ) -> Result<(rustls::RootCertStore, Vec<CertificateDer<'static>>, PrivateKeyDer<'static>), String> {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(first_cert(&self.ca)?).map_err(|e| format!("the CA certificate: {e}"))?;
        let chain = CertificateDer::pem_slice_iter(&self.cert)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| format!("the certificate: {e}"))?;
        let key = PrivateKeyDer::from_pem_slice(&self.key).map_err(|e| format!("the private key: {e}"))?;
        Ok((roots, chain, key))
    }

    /// How a node accepts peer links: client certificates of the CA required.
    pub fn link_server_config(&self) -> Result<std::sync::Arc<rustls::ServerConfig>, String> {
        use std::sync::Arc;
        let (roots, chain, key) = self.link_parts()?;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let verifier =
            rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
                .build()
                .map_err(|e| format!("client verification: {e}"))?;
        let config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| e.to_string())?
            .with_client_cert_verifier(verifier)
            .with_single_cert(chain, key)
            .map_err(|e| format!("the node certificate: {e}"))?;
        Ok(Arc::new(config))
    }

    /// How a node dials peer links: the peer verified against the CA and
    /// the host it is dialled at, this node's certificate presented.
    pub fn link_client_config(&self) -> Result<std::sync::Arc<rustls::ClientConfig>, String> {
        use std::sync::Arc;
        let (roots, chain, key) = self.link_parts()?;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| e.to_string())?
            .with_root_certificates(roots)
            .with_client_auth_cert(chain, key)
            .map_err(|e| format!("the node certificate: {e}"))?;
        Ok(Arc::new(config))
    }
}

/// Checks that the first certificate in `cert` (PEM) is issued by the CA
/// in `ca` (PEM; `ca_path` names it in the message) and valid now.
pub fn check_issued_by(ca: &[u8], cert: &[u8], ca_path: &Path) -> Result<(), String> {
    let ca_der = first_cert(ca).map_err(|r| format!("CA {}: {r}", ca_path.display()))?;
    let ca_x509 = parse_ca(&ca_der).map_err(|r| format!("CA {}: {r}", ca_path.display()))?;
    parse_issued(&first_cert(cert)?, &ca_x509, ca_path).map(|_| ())
}

fn parse_ca<'a>(der: &'a CertificateDer<'_>) -> Result<X509Certificate<'a>, String> {
    let (_, x509) =
        x509_parser::parse_x509_certificate(der).map_err(|e| format!("not an X.509 certificate: {e}"))?;
    if !x509.is_ca() {
        return Err("not a CA certificate (no basicConstraints CA:true)".into());
    }
    Ok(x509)
}

/// Parses a certificate and checks it is signed by `ca` and valid now.
fn parse_issued<'a>(
    der: &'a CertificateDer<'_>,
    ca: &X509Certificate<'_>,
    ca_path: &Path,
) -> Result<X509Certificate<'a>, String> {
    let (_, x509) =
        x509_parser::parse_x509_certificate(der).map_err(|e| format!("not an X.509 certificate: {e}"))?;
    x509.verify_signature(Some(ca.public_key())).map_err(|_| {
        format!("not signed by the CA in {} (issue it with that CA: blixard cert issue)", ca_path.display())
    })?;
    check_valid_now(&x509)?;
    Ok(x509)
}

/// An error and its sources in one line, each said once (wrappers often
/// repeat their source's text).
pub fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut parts = vec![e.to_string()];
    let mut cur = e.source();
    while let Some(c) = cur {
        let s = c.to_string();
        if !parts.iter().any(|p| p.contains(&s)) {
            parts.push(s);
        }
        cur = c.source();
    }
    parts.join(": ")
}

/// The first certificate of a PEM file.
pub fn first_cert(pem: &[u8]) -> Result<CertificateDer<'static>, String> {
    match CertificateDer::pem_slice_iter(pem).next() {
        Some(Ok(c)) => Ok(c),
        Some(Err(e)) => Err(format!("not a PEM certificate ({e})")),
        None => Err("no PEM certificate in it (expected -----BEGIN CERTIFICATE-----)".into()),
    }
}

fn check_valid_now(x509: &X509Certificate<'_>) -> Result<(), String> {
    let v = x509.validity();
    let now = x509_parser::time::ASN1Time::now();
    if now < v.not_before {
        return Err(format!("not valid before {} (is this host's clock right?)", v.not_before));
    }
    if now > v.not_after {
        return Err(format!("expired on {}", v.not_after));
    }
    Ok(())
}

/// The key must be the private half of the certificate's public key
/// (rustls compares them, with the ring provider the node's TLS uses).
fn check_key_matches(key: PrivateKeyDer<'static>, cert: CertificateDer<'static>) -> Result<(), String> {
    use rustls::crypto::ring::default_provider;
    use rustls::sign::CertifiedKey;
    let signing = default_provider()
        .key_provider
        .load_private_key(key)
        .map_err(|e| format!("not a usable private key ({e})"))?;
    match CertifiedKey::new(vec![cert], signing).keys_match() {
        Ok(()) => Ok(()),
        Err(rustls::Error::InconsistentKeys(rustls::InconsistentKeys::Unknown)) => Ok(()),
        Err(_) => Err("does not belong to the certificate (its public key differs)".into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rcgen::{
        BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, SanType,
    };

    struct Ca {
        pem: String,
        issuer: Issuer<'static, KeyPair>,
    }

    fn ca() -> Ca {
        let key = KeyPair::generate().unwrap();
        let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
        p.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        p.distinguished_name.push(DnType::CommonName, "test CA");
        let cert = p.self_signed(&key).unwrap();
        Ca { pem: cert.pem(), issuer: Issuer::new(p, key) }
    }

    /// A leaf with these SAN URIs (and 127.0.0.1), signed by `ca`: (cert, key).
    fn leaf(ca: &Ca, uris: &[&str]) -> (String, String) {
        let key = KeyPair::generate().unwrap();
        let mut p = CertificateParams::new(vec!["127.0.0.1".to_string()]).unwrap();
        for u in uris {
            p.subject_alt_names.push(SanType::URI(u.to_string().try_into().unwrap()));
        }
        p.extended_key_usages =
            vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
        let cert = p.signed_by(&key, &ca.issuer).unwrap();
        (cert.pem(), key.serialize_pem())
    }

    fn der(pem: &str) -> Vec<u8> {
        first_cert(pem.as_bytes()).unwrap().to_vec()
    }

    fn load(ca: &str, cert: &str, key: &str) -> Result<NodeTls, TlsFileError> {
        let p = [Path::new("ca.pem"), Path::new("node.pem"), Path::new("node-key.pem")];
        NodeTls::from_pem_files(ca.into(), cert.into(), key.into(), p)
    }

    #[test]
    fn identity_uris_parse_strictly() {
        for id in [
            PeerIdentity::Node(1),
            PeerIdentity::Node(u64::MAX),
            PeerIdentity::Client { name: "alice".into(), role: Role::Viewer },
            PeerIdentity::Client { name: "ci-bot-2".into(), role: Role::Admin },
        ] {
            assert_eq!(PeerIdentity::parse_uri(&id.uri()), Some(id));
        }
        for bad in [
            "blixard:node:0",
            "blixard:node:01",
            "blixard:node:+1",
            "blixard:node:",
            "blixard:node:1:2",
            "blixard:client:alice",
            "blixard:client:alice:root",
            "blixard:client:Alice:admin",
            "blixard:client::admin",
            "blixard:client:alice:admin:x",
            "blixard:nodes:1",
            "spiffe://blixard/node/1",
            "blixardnode:1",
        ] {
            assert_eq!(PeerIdentity::parse_uri(bad), None, "{bad}");
        }
    }

    #[cfg(not(madsim))]
    #[test]
    fn cached_identities_are_the_parsed_ones() {
        let ca = ca();
        for uris in [&["blixard:node:7"][..], &["blixard:client:bob:viewer"], &[]] {
            let (cert, _) = leaf(&ca, uris);
            let der = der(&cert);
            let parsed = identity_of_der(&der).unwrap();
            assert_eq!(cached_identity(&der), parsed);
            assert_eq!(cached_identity(&der), parsed, "from the cache");
        }
    }

    #[test]
    fn identity_is_read_from_the_san_uri() {
        let ca = ca();
        let (node, _) = leaf(&ca, &["blixard:node:3"]);
        assert_eq!(identity_of_der(&der(&node)), Ok(Some(PeerIdentity::Node(3))));
        let (client, _) = leaf(&ca, &["https://example.com/x", "blixard:client:ops:operator"]);
        assert_eq!(
            identity_of_der(&der(&client)),
            Ok(Some(PeerIdentity::Client { name: "ops".into(), role: Role::Operator }))
        );
        // None, two, or a malformed one: no identity.
        let (plain, _) = leaf(&ca, &[]);
        assert_eq!(identity_of_der(&der(&plain)), Ok(None));
        let (two, _) = leaf(&ca, &["blixard:node:3", "blixard:node:4"]);
        assert_eq!(identity_of_der(&der(&two)), Ok(None));
        let (bad, _) = leaf(&ca, &["blixard:node:3", "blixard:client:x:superuser"]);
        assert_eq!(identity_of_der(&der(&bad)), Ok(None));
        assert!(identity_of_der(b"not a certificate").is_err());
    }

    #[test]
    fn a_node_loads_only_its_own_kind_of_certificate() {
        let ca = ca();
        let (cert, key) = leaf(&ca, &["blixard:node:2"]);
        let tls = load(&ca.pem, &cert, &key).unwrap();
        assert_eq!(tls.node_id, 2);

        let (client, client_key) = leaf(&ca, &["blixard:client:alice:admin"]);
        let e = load(&ca.pem, &client, &client_key).unwrap_err().to_string();
        assert!(e.starts_with("certificate node.pem: is the certificate of client alice (admin)"), "{e}");

        let other = self::ca();
        let e = load(&other.pem, &cert, &key).unwrap_err().to_string();
        assert!(e.contains("not signed by the CA in ca.pem"), "{e}");

        let (_, wrong_key) = leaf(&ca, &["blixard:node:2"]);
        let e = load(&ca.pem, &cert, &wrong_key).unwrap_err().to_string();
        assert!(e.starts_with("private key node-key.pem: does not belong to the certificate"), "{e}");

        let e = load(&cert, &cert, &key).unwrap_err().to_string();
        assert!(e.starts_with("CA certificate ca.pem: not a CA certificate"), "{e}");
        let e = load(&ca.pem, &key, &key).unwrap_err().to_string();
        assert!(e.starts_with("certificate node.pem: no PEM certificate"), "{e}");
        let e = load(&ca.pem, &cert, &cert).unwrap_err().to_string();
        assert!(e.starts_with("private key node-key.pem: no PEM private key"), "{e}");
    }

    #[test]
    fn load_names_the_missing_file() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("nope.pem");
        let e = NodeTls::load(&missing, &missing, &missing).unwrap_err().to_string();
        assert!(e.starts_with(&format!("CA certificate {}: ", missing.display())), "{e}");
    }

    #[test]
    fn an_expired_certificate_is_refused() {
        let ca = ca();
        let key = KeyPair::generate().unwrap();
        let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
        p.subject_alt_names.push(SanType::URI("blixard:node:1".try_into().unwrap()));
        p.not_before = rcgen::date_time_ymd(2020, 1, 1);
        p.not_after = rcgen::date_time_ymd(2021, 1, 1);
        let cert = p.signed_by(&key, &ca.issuer).unwrap();
        let e = load(&ca.pem, &cert.pem(), &key.serialize_pem()).unwrap_err().to_string();
        assert!(e.contains("expired on"), "{e}");
    }
}
