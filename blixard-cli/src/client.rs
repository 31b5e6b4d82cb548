//! The client side of the gRPC control API: a list of members to talk to,
//! failover between them, request ids that make write retries safe, and
//! every failure turned into one plain line and an honest exit code.
//!
//! How a call moves between members (see docs/OPERATIONS.md, "Client
//! commands"):
//! - A member counts as up only once its server speaks: the TCP handshake
//!   alone proves nothing, since the kernel of a stopped (SIGSTOP) process
//!   still accepts connections. An HTTP/2 server sends its SETTINGS first,
//!   so the connector waits for that first byte, at most [`CONNECT_TIMEOUT`].
//! - HTTP/2 keepalive pings notice a member that stops answering during a
//!   call within a few seconds, whatever the call's own deadline.
//! - Reads, and writes that never reached a server, move on to the next
//!   member. A write that reached one is retried on the next member only
//!   under the same request id, which the cluster deduplicates: a retry can
//!   never apply twice and is answered with the first outcome.
//! - The member that answered is remembered: later calls of the same
//!   command start there.
//! - With TLS (`--cacert`, and `--cert`/`--key` for a client certificate)
//!   every member is dialled over `https://` and verified against the CA;
//!   the handshake is what proves a member's server is up. A plaintext
//!   client that meets a TLS node says so instead of waiting in silence.
use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::OnceLock;
use std::task::{Context, Poll};
use std::time::Duration;

use blixard_proto as pb;
use blixard_proto::cluster_service_client::ClusterServiceClient;
use blixard_proto::vm_service_client::VmServiceClient;
use tonic::codegen::http::Uri;
use tonic::codegen::Service;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};
use tonic::{Code, Request, Response, Status};

use crate::Failure;

/// Exit codes. A script can act on each without reading the message.
pub const EXIT_ERROR: u8 = 1;
/// No node can fit the VM.
pub const EXIT_NO_CAPACITY: u8 = 2;
/// The VM's tenant is over its quota.
pub const EXIT_QUOTA: u8 = 3;
/// A write may or may not have applied: retry with the same request id to
/// learn which.
pub const EXIT_UNKNOWN: u8 = 4;
/// A write did not apply and never will (no leader took it, or no member
/// could be reached to send it): safe to retry.
pub const EXIT_NOT_APPLIED: u8 = 5;
/// Could not complete: a drain left VMs on its node (they cannot move, its
/// `--deadline` passed first, or the drain was ended). What moved stays
/// moved.
pub const EXIT_INCOMPLETE: u8 = 6;
/// No valid credentials: no token or client certificate, or a token that
/// is unknown, revoked or expired.
pub const EXIT_UNAUTHENTICATED: u8 = 7;
/// The credentials are valid but their role may not do this.
pub const EXIT_PERMISSION_DENIED: u8 = 8;

/// How long a member may take to accept a connection and speak first.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
/// HTTP/2 pings: a member that stops answering mid-call (paused, cut off)
/// fails the call after about `KEEPALIVE + KEEPALIVE_TIMEOUT`.
const KEEPALIVE: Duration = Duration::from_secs(1);
const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(2);
/// One read attempt. Above the node's own 10 s bound on confirming a
/// linearizable read with the leader, so its message (naming the hop that
/// failed) reaches the user instead of a client timeout.
const READ_DEADLINE: Duration = Duration::from_secs(15);
/// One write attempt: above the node's bounds (10 s to commit, then up to
/// 10 s to apply locally), so it answers with the write's outcome.
const WRITE_DEADLINE: Duration = Duration::from_secs(30);
/// One membership change (join waits for the new node to catch up).
const JOIN_DEADLINE: Duration = Duration::from_secs(120);

/// The gRPC metadata key with a failed write's outcome.
const OUTCOME_KEY: &str = blixard_core::node::OUTCOME_KEY;

/// Where the CLI's TLS material is: the cluster's CA (`--cacert`), and a
/// client certificate and its key (`--cert`, `--key`), PEM files. All
/// `None`: plaintext.
#[derive(Clone, Debug, Default)]
pub struct Tls {
    pub ca: Option<PathBuf>,
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
}

/// The TLS every connection of this process uses; set once by `main`
/// ([`use_tls`]). Unset means plaintext.
static TLS: OnceLock<Option<ClientTlsConfig>> = OnceLock::new();

/// Makes every connection of this process use `config` (`None`:
/// plaintext). The first call wins.
pub fn use_tls(config: Option<ClientTlsConfig>) {
    let _ = TLS.set(config);
}

fn tls() -> Option<&'static ClientTlsConfig> {
    TLS.get().and_then(Option::as_ref)
}

/// Loads and checks the files `tls` names: `None` without a CA (plaintext);
/// otherwise the configuration that verifies nodes against the CA and
/// presents the client certificate, if one is given.
pub fn tls_config(tls: &Tls) -> Result<Option<ClientTlsConfig>, Failure> {
    let Some(ca_path) = &tls.ca else {
        if tls.cert.is_some() || tls.key.is_some() {
            return Err(Failure::new(
                "--cert and --key need --cacert (BLIXARD_CACERT): the cluster's CA, to verify the node",
            ));
        }
        return Ok(None);
    };
    let read = |flag: &str, path: &PathBuf| {
        std::fs::read(path).map_err(|e| Failure::new(format!("{flag} {}: {e}", path.display())))
    };
    let ca = read("--cacert", ca_path)?;
    blixard_core::tls::first_cert(&ca)
        .map_err(|why| Failure::new(format!("--cacert {}: {why}", ca_path.display())))?;
    let mut config =
        ClientTlsConfig::new().ca_certificate(Certificate::from_pem(&ca)).timeout(CONNECT_TIMEOUT);
    match (&tls.cert, &tls.key) {
        (None, None) => {}
        (Some(cert_path), Some(key_path)) => {
            use rustls_pki_types::pem::PemObject;
            let cert = read("--cert", cert_path)?;
            // A certificate of another CA would be refused by the node, which
            // only closes the connection: say so here, plainly.
            blixard_core::tls::check_issued_by(&ca, &cert, ca_path)
                .map_err(|why| Failure::new(format!("--cert {}: {why}", cert_path.display())))?;
            let key = read("--key", key_path)?;
            rustls_pki_types::PrivateKeyDer::from_pem_slice(&key).map_err(|e| {
                Failure::new(format!("--key {}: no PEM private key in it ({e})", key_path.display()))
            })?;
            config = config.identity(Identity::from_pem(&cert, &key));
            // Builds the TLS client once, so a key that does not belong to
            // the certificate is reported now, with both files named.
            Endpoint::from_static("https://localhost").tls_config(config.clone()).map_err(|e| {
                let why = blixard_core::tls::error_chain(&e);
                Failure::new(if why.contains("KeyMismatch") {
                    format!("--key {} does not belong to --cert {}", key_path.display(), cert_path.display())
                } else {
                    format!("--cert {} with --key {}: {why}", cert_path.display(), key_path.display())
                })
            })?;
        }
        (Some(_), None) => {
            return Err(Failure::new("--cert needs --key (BLIXARD_KEY): the certificate's private key"))
        }
        (None, Some(_)) => {
            return Err(Failure::new("--key needs --cert (BLIXARD_CERT): the certificate the key belongs to"))
        }
    }
    Ok(Some(config))
}

/// Parses `--addr`: one or more members, `HOST:PORT,HOST:PORT,...`.
/// Duplicates are dropped, the order is kept (it is the order tried).
pub fn parse_members(list: &str) -> Result<Vec<String>, Failure> {
    let mut members: Vec<String> = Vec::new();
    for a in list.split(',').map(str::trim) {
        check_addr(a)?;
        if !members.iter().any(|m| m == a) {
            members.push(a.to_string());
        }
    }
    Ok(members)
}

fn check_addr(a: &str) -> Result<(), Failure> {
    let ok = match a.rsplit_once(':') {
        Some((host, port)) => !host.is_empty() && port.parse::<u16>().is_ok_and(|p| p != 0),
        None => false,
    };
    if !ok || Endpoint::from_shared(format!("http://{a}")).is_err() {
        return Err(Failure::new(format!(
            "invalid address {a:?} in --addr / BLIXARD_ADDR: expected HOST:PORT (port 1-65535), several separated by commas"
        )));
    }
    Ok(())
}

/// A request id for one write command: `cli-` and 32 random hex digits.
pub fn new_request_id() -> String {
    use std::io::Read;
    let mut bytes = [0u8; 16];
    let read = std::fs::File::open("/dev/urandom").and_then(|mut f| f.read_exact(&mut bytes));
    if read.is_err() {
        // std's hasher keys come from the OS's random source too.
        use std::hash::{BuildHasher, RandomState};
        let t = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
        let seed = (std::process::id(), t.as_nanos());
        bytes[..8].copy_from_slice(&RandomState::new().hash_one(seed).to_le_bytes());
        bytes[8..].copy_from_slice(&RandomState::new().hash_one(seed).to_le_bytes());
    }
    let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    format!("cli-{hex}")
}

/// Checks a user-given `--request-id` with the cluster's own rule.
pub fn check_request_id(id: &str) -> Result<(), Failure> {
    blixard_core::validate::request_id(id).map_err(|e| Failure::new(e.to_string()))
}

/// The bearer token every call carries (`--token`, `BLIXARD_TOKEN` or the
/// context), as its header value; set once by `main`.
static TOKEN: std::sync::OnceLock<Option<tonic::metadata::AsciiMetadataValue>> = std::sync::OnceLock::new();

/// Sets the token calls carry. A value that cannot be a token is refused
/// here, naming where it came from (never echoing it).
pub fn set_token(token: Option<&str>, from: &str) -> Result<(), Failure> {
    let value = match token.map(str::trim).filter(|t| !t.is_empty()) {
        None => None,
        Some(t) if blixard_core::auth::token::well_formed(t) => Some(
            tonic::metadata::AsciiMetadataValue::try_from(format!("Bearer {t}"))
                .map_err(|_| Failure::new(format!("the token from {from} is not printable ASCII")))?,
        ),
        Some(_) => {
            return Err(Failure {
                message: format!(
                "the token from {from} is not a Blixard token (they start with {:?} and have 64 hex digits)",
                blixard_core::auth::token::PREFIX
            ),
                code: EXIT_UNAUTHENTICATED,
            })
        }
    };
    let _ = TOKEN.set(value);
    Ok(())
}

/// Puts the token on every call of a client built with it.
#[derive(Clone, Copy)]
pub struct Auth;

impl tonic::service::Interceptor for Auth {
    fn call(&mut self, mut req: Request<()>) -> Result<Request<()>, Status> {
        if let Some(Some(v)) = TOKEN.get() {
            req.metadata_mut().insert(blixard_core::auth::AUTHORIZATION, v.clone());
        }
        Ok(req)
    }
}

/// A channel whose calls carry the token.
pub type Authed = tonic::service::interceptor::InterceptedService<Channel, Auth>;

#[derive(Clone)]
struct Conn {
    cluster: ClusterServiceClient<Authed>,
    vms: VmServiceClient<Authed>,
}

pub struct Client {
    members: Vec<String>,
    /// The member calls start at: the last one that answered.
    current: usize,
    /// The open connection to `members[current]`, if any.
    conn: Option<Conn>,
}

fn req<T>(msg: T, deadline: Duration) -> Request<T> {
    let mut r = Request::new(msg);
    r.set_timeout(deadline);
    r
}

fn consistency(stale: bool) -> i32 {
    if stale {
        pb::Consistency::Stale as i32
    } else {
        pb::Consistency::Linearizable as i32
    }
}

/// What a failed write attempt says about the write.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Outcome {
    /// Did not apply and never will.
    Rejected,
    /// May still apply.
    Unknown,
    /// Applied, but the member that answered cannot show it yet.
    Applied,
}

/// Why a write did not succeed.
enum WriteError {
    /// A server refused it for good (its answer, as a failure).
    Refused(Failure),
    /// No member gave a definite outcome.
    Undecided(Undecided),
}

struct Undecided {
    /// Some server answered (else nothing was sent).
    answered: bool,
    /// Some attempt may still apply.
    in_doubt: bool,
    /// Some member said the write applied.
    applied: bool,
    /// What each member said, in order.
    notes: Vec<String>,
}

impl WriteError {
    /// The failure to report for the write under request id `id`.
    fn into_failure(self, id: &str) -> Failure {
        let u = match self {
            WriteError::Refused(f) => return f,
            WriteError::Undecided(u) => u,
        };
        let notes = u.notes.join("; ");
        if u.applied {
            Failure {
                message: format!(
                    "the write applied, but no member that answered has caught up to show it; retry with --request-id {id} to see its result ({notes})"
                ),
                code: EXIT_ERROR,
            }
        } else if u.in_doubt {
            Failure {
                message: format!(
                    "outcome unknown: the write may still apply; retry with --request-id {id} to learn its outcome ({notes})"
                ),
                code: EXIT_UNKNOWN,
            }
        } else if !u.answered {
            Failure {
                message: format!(
                    "not applied: no member answered, so the write was not sent; safe to retry ({notes}; is the cluster running? see --addr / BLIXARD_ADDR)"
                ),
                code: EXIT_NOT_APPLIED,
            }
        } else {
            Failure {
                message: format!(
                    "not applied: the write did not apply and never will; safe to retry ({notes})"
                ),
                code: EXIT_NOT_APPLIED,
            }
        }
    }
}

/// True when `s` was made on this side (the connection failed or was lost,
/// or the deadline passed) rather than sent by a server.
fn local_failure(s: &Status) -> bool {
    std::error::Error::source(s).is_some() || s.code() == Code::Cancelled
}

/// What a server's answer to a write says about it: the outcome metadata
/// the node sets on every failed write.
fn outcome(s: &Status) -> Outcome {
    match s.metadata().get(OUTCOME_KEY).and_then(|v| v.to_str().ok()) {
        Some("rejected") => Outcome::Rejected,
        Some("applied") => Outcome::Applied,
        // "unknown", and any value this client does not know yet.
        Some(_) => Outcome::Unknown,
        // No metadata: an answer from outside the node's write path. Codes
        // that say nothing of the write leave it in doubt.
        None if matches!(
            s.code(),
            Code::Unavailable | Code::DeadlineExceeded | Code::Unknown | Code::Internal | Code::Aborted
        ) =>
        {
            Outcome::Unknown
        }
        // Refused before reaching the write path (e.g. a message size limit).
        None => Outcome::Rejected,
    }
}

/// What went wrong with a call this side gave up on, as a phrase after the
/// member's address.
fn lost(s: &Status, deadline: Duration) -> String {
    if s.code() == Code::Cancelled && s.message().contains("Timeout expired") {
        return format!("did not answer within {}s", deadline.as_secs());
    }
    let detail = std::error::Error::source(s).map(source_chain).unwrap_or_else(|| s.message().to_string());
    if detail.contains("keep-alive timed out") {
        return "stopped answering (keepalive pings timed out)".to_string();
    }
    format!("lost the connection ({detail})")
}

/// The exit code of a server's definite answer.
fn code_of(s: &Status) -> u8 {
    match s.code() {
        Code::Unauthenticated => return EXIT_UNAUTHENTICATED,
        Code::PermissionDenied => return EXIT_PERMISSION_DENIED,
        Code::ResourceExhausted => {}
        _ => return EXIT_ERROR,
    }
    match s.metadata().get(blixard_core::node::REASON_KEY).and_then(|v| v.to_str().ok()) {
        Some("quota") => EXIT_QUOTA,
        _ => EXIT_NO_CAPACITY,
    }
}

/// " (answer from A; tried before it: B refused the connection)", for the
/// end of a message; empty when the first member tried answered.
fn tried_note(answered: &str, skipped: &[String]) -> String {
    if skipped.is_empty() {
        return String::new();
    }
    format!(" (answer from {answered}; tried before it: {})", skipped.join("; "))
}

/// A server's answer as a failure.
pub fn status_failure(s: &Status) -> Failure {
    let prefix = match s.code() {
        Code::Unauthenticated => "unauthenticated: ",
        Code::PermissionDenied => "permission denied: ",
        _ => "",
    };
    Failure { message: format!("{prefix}{}", one_line(s.message())), code: code_of(s) }
}

fn one_line(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

fn no_member(skipped: &[String]) -> String {
    format!("no member answered: {} (is the cluster running? see --addr / BLIXARD_ADDR)", skipped.join("; "))
}

impl Client {
    /// A client for these members, tried in this order. Connects on the
    /// first call.
    pub fn new(members: Vec<String>) -> Client {
        assert!(!members.is_empty(), "a client needs at least one member");
        Client { members, current: 0, conn: None }
    }

    /// A client for exactly one node (no failover), e.g. for a node's own
    /// view of its VMs.
    pub fn one(addr: &str) -> Result<Client, Failure> {
        check_addr(addr)?;
        Ok(Client::new(vec![addr.to_string()]))
    }

    /// The connection to member `i`, dialled if needed; makes it current.
    async fn conn(&mut self, i: usize) -> Result<Conn, String> {
        if i == self.current {
            if let Some(c) = &self.conn {
                return Ok(c.clone());
            }
        }
        let channel = dial(&self.members[i]).await?;
        let c = Conn {
            cluster: ClusterServiceClient::with_interceptor(channel.clone(), Auth),
            vms: VmServiceClient::with_interceptor(channel, Auth),
        };
        self.current = i;
        self.conn = Some(c.clone());
        Ok(c)
    }

    fn drop_conn(&mut self, i: usize) {
        if i == self.current {
            self.conn = None;
        }
    }

    /// The members in the order to try them: the current one first.
    fn order(&self) -> Vec<usize> {
        let n = self.members.len();
        (0..n).map(|k| (self.current + k) % n).collect()
    }

    /// A call that is safe to repeat anywhere: moves on to the next member
    /// when one cannot be reached or does not answer; a server's answer,
    /// success or error, is final.
    async fn read<T, F, Fut>(&mut self, deadline: Duration, mut call: F) -> Result<T, Failure>
    where
        F: FnMut(Conn) -> Fut,
        Fut: Future<Output = Result<Response<T>, Status>>,
    {
        let mut skipped = Vec::new();
        for i in self.order() {
            let addr = self.members[i].clone();
            let conn = match self.conn(i).await {
                Ok(c) => c,
                Err(why) => {
                    skipped.push(format!("{addr} {why}"));
                    continue;
                }
            };
            match call(conn).await {
                Ok(r) => return Ok(r.into_inner()),
                Err(s) if local_failure(&s) => {
                    skipped.push(format!("{addr} {}", lost(&s, deadline)));
                    self.drop_conn(i);
                }
                Err(s) => {
                    let mut f = status_failure(&s);
                    f.message.push_str(&tried_note(&addr, &skipped));
                    return Err(f);
                }
            }
        }
        Err(Failure::new(no_member(&skipped)))
    }

    /// A VM write under request id `id`, tried on each member at most once
    /// until one gives a definite outcome. Every attempt carries the same
    /// id, so however many reach the cluster, the write applies at most
    /// once, and a retry is answered with the first attempt's outcome.
    async fn write<T, F, Fut>(&mut self, mut call: F) -> Result<T, WriteError>
    where
        F: FnMut(Conn) -> Fut,
        Fut: Future<Output = Result<Response<T>, Status>>,
    {
        let mut u = Undecided { answered: false, in_doubt: false, applied: false, notes: Vec::new() };
        for i in self.order() {
            let addr = self.members[i].clone();
            let conn = match self.conn(i).await {
                Ok(c) => c,
                // Never sent: nothing to doubt.
                Err(why) => {
                    u.notes.push(format!("{addr} {why}"));
                    continue;
                }
            };
            let s = match call(conn).await {
                Ok(r) => return Ok(r.into_inner()),
                Err(s) => s,
            };
            if local_failure(&s) {
                // Sent, and then the connection or the deadline failed.
                u.in_doubt = true;
                u.notes.push(format!("{addr} {}", lost(&s, WRITE_DEADLINE)));
                self.drop_conn(i);
                continue;
            }
            u.answered = true;
            match outcome(&s) {
                // A definite refusal (invalid, not found, no capacity, ...):
                // the same from any member, and final for this request id.
                Outcome::Rejected if s.code() != Code::Unavailable => {
                    let mut f = status_failure(&s);
                    f.message.push_str(&tried_note(&addr, &u.notes));
                    return Err(WriteError::Refused(f));
                }
                // No leader took this attempt; another member may reach one.
                Outcome::Rejected => {}
                Outcome::Unknown => u.in_doubt = true,
                // Committed; another member (same id) can show the result.
                Outcome::Applied => u.applied = true,
            }
            u.notes.push(format!("{addr}: {}", one_line(s.message())));
        }
        Err(WriteError::Undecided(u))
    }

    /// A membership change (no request ids): moves on only from members
    /// that could not be reached; once sent, a lost answer is reported as
    /// unknown.
    async fn change<T, F, Fut>(&mut self, deadline: Duration, mut call: F) -> Result<T, Failure>
    where
        F: FnMut(Conn) -> Fut,
        Fut: Future<Output = Result<Response<T>, Status>>,
    {
        let check = "check `blixard cluster members`";
        let mut skipped = Vec::new();
        for i in self.order() {
            let addr = self.members[i].clone();
            let conn = match self.conn(i).await {
                Ok(c) => c,
                Err(why) => {
                    skipped.push(format!("{addr} {why}"));
                    continue;
                }
            };
            let s = match call(conn).await {
                Ok(r) => return Ok(r.into_inner()),
                Err(s) => s,
            };
            let note = tried_note(&addr, &skipped);
            return Err(if local_failure(&s) {
                self.drop_conn(i);
                skipped.push(format!("{addr} {} after it was sent", lost(&s, deadline)));
                Failure {
                    message: format!(
                        "outcome unknown: the change may still apply; {check} ({})",
                        skipped.join("; ")
                    ),
                    code: EXIT_UNKNOWN,
                }
            } else if s.code() == Code::DeadlineExceeded {
                Failure { message: format!("{}; {check}{note}", one_line(s.message())), code: EXIT_UNKNOWN }
            } else {
                let mut f = status_failure(&s);
                f.message.push_str(&note);
                f
            });
        }
        Err(Failure {
            message: format!("not applied: the change was not sent; {}", no_member(&skipped)),
            code: EXIT_NOT_APPLIED,
        })
    }

    /// The contacted node's status.
    pub async fn status(&mut self, digest: bool) -> Result<pb::StatusResponse, Failure> {
        self.status_with(pb::StatusRequest { include_digest: digest, include_heartbeats: false }).await
    }

    /// The registered nodes, with the leader's heartbeat ages.
    pub async fn nodes(&mut self) -> Result<Vec<pb::NodeInfo>, Failure> {
        let r = pb::StatusRequest { include_digest: false, include_heartbeats: true };
        Ok(self.status_with(r).await?.nodes)
    }

    async fn status_with(&mut self, r: pb::StatusRequest) -> Result<pb::StatusResponse, Failure> {
        self.read(READ_DEADLINE, |mut c| async move { c.cluster.status(req(r, READ_DEADLINE)).await }).await
    }

    pub async fn join(&mut self, node_id: u64, addr: String) -> Result<pb::JoinResponse, Failure> {
        self.change(JOIN_DEADLINE, |mut c| {
            let r = req(pb::JoinRequest { node_id, addr: addr.clone() }, JOIN_DEADLINE);
            async move { c.cluster.join(r).await }
        })
        .await
    }

    /// Removes the contacted node: meant for a client of [`one`](Self::one)
    /// node.
    pub async fn leave(&mut self) -> Result<pb::MembershipResponse, Failure> {
        self.change(WRITE_DEADLINE, |mut c| async move {
            c.cluster.leave(req(pb::LeaveRequest {}, WRITE_DEADLINE)).await
        })
        .await
    }

    pub async fn remove(&mut self, node_id: u64) -> Result<pb::MembershipResponse, Failure> {
        self.change(WRITE_DEADLINE, |mut c| async move {
            c.cluster.remove(req(pb::RemoveRequest { node_id }, WRITE_DEADLINE)).await
        })
        .await
    }

    /// `node set`, under the request's id like a VM write.
    /// [`write`](Self::write) under `request_id`, any failure reported as
    /// the write's outcome.
    async fn write_or_fail<T, F, Fut>(&mut self, request_id: &str, call: F) -> Result<T, Failure>
    where
        F: FnMut(Conn) -> Fut,
        Fut: Future<Output = Result<Response<T>, Status>>,
    {
        self.write(call).await.map_err(|e| e.into_failure(request_id))
    }

    /// A write with no result to show (a delete): "applied but not yet
    /// visible here" is done too.
    async fn write_done<T, F, Fut>(&mut self, request_id: &str, call: F) -> Result<(), Failure>
    where
        F: FnMut(Conn) -> Fut,
        Fut: Future<Output = Result<Response<T>, Status>>,
    {
        match self.write(call).await {
            Ok(_) | Err(WriteError::Undecided(Undecided { applied: true, .. })) => Ok(()),
            Err(e) => Err(e.into_failure(request_id)),
        }
    }

    pub async fn set_node(&mut self, r: pb::SetNodeRequest) -> Result<pb::NodeInfo, Failure> {
        let id = r.request_id.clone();
        self.write_or_fail(&id, |mut c| {
            let r = req(r.clone(), WRITE_DEADLINE);
            async move { c.cluster.set_node(r).await }
        })
        .await
    }

    pub async fn set_node_timeout(
        &mut self,
        r: pb::SetNodeTimeoutRequest,
    ) -> Result<pb::SetNodeTimeoutResponse, Failure> {
        let id = r.request_id.clone();
        self.write_or_fail(&id, |mut c| {
            let r = req(r.clone(), WRITE_DEADLINE);
            async move { c.cluster.set_node_timeout(r).await }
        })
        .await
    }

    /// Starts (or advances) a drain: the VMs it started moving and those
    /// that cannot move now.
    pub async fn drain_node(&mut self, r: pb::DrainNodeRequest) -> Result<pb::DrainNodeResponse, Failure> {
        let id = r.request_id.clone();
        self.write_or_fail(&id, |mut c| {
            let r = req(r.clone(), WRITE_DEADLINE);
            async move { c.cluster.drain_node(r).await }
        })
        .await
    }

    pub async fn set_eligible(&mut self, r: pb::SetEligibleRequest) -> Result<pb::NodeInfo, Failure> {
        let id = r.request_id.clone();
        self.write_or_fail(&id, |mut c| {
            let r = req(r.clone(), WRITE_DEADLINE);
            async move { c.cluster.set_eligible(r).await }
        })
        .await
    }

    pub async fn set_scheduler(
        &mut self,
        r: pb::SetSchedulerRequest,
    ) -> Result<pb::SetSchedulerResponse, Failure> {
        let id = r.request_id.clone();
        self.write_or_fail(&id, |mut c| {
            let r = req(r.clone(), WRITE_DEADLINE);
            async move { c.cluster.set_scheduler(r).await }
        })
        .await
    }

    pub async fn set_quota(&mut self, r: pb::SetQuotaRequest) -> Result<pb::Quota, Failure> {
        let id = r.request_id.clone();
        self.write_or_fail(&id, |mut c| {
            let r = req(r.clone(), WRITE_DEADLINE);
            async move { c.cluster.set_quota(r).await }
        })
        .await
    }

    pub async fn delete_quota(&mut self, tenant: String, request_id: &str) -> Result<(), Failure> {
        self.write_done(request_id, |mut c| {
            let r = req(
                pb::DeleteQuotaRequest { tenant: tenant.clone(), request_id: request_id.to_string() },
                WRITE_DEADLINE,
            );
            async move { c.cluster.delete_quota(r).await }
        })
        .await
    }

    pub async fn get_quota(&mut self, tenant: String) -> Result<pb::Quota, Failure> {
        self.read(READ_DEADLINE, |mut c| {
            let r = req(pb::QuotaRequest { tenant: tenant.clone() }, READ_DEADLINE);
            async move { c.cluster.get_quota(r).await }
        })
        .await
    }

    pub async fn list_quotas(&mut self) -> Result<Vec<pb::Quota>, Failure> {
        let r = self
            .read(READ_DEADLINE, |mut c| async move {
                c.cluster.list_quotas(req(pb::ListQuotasRequest {}, READ_DEADLINE)).await
            })
            .await?;
        Ok(r.quotas)
    }

    pub async fn create_token(
        &mut self,
        r: pb::CreateTokenRequest,
    ) -> Result<pb::CreateTokenResponse, Failure> {
        let id = r.request_id.clone();
        self.write_or_fail(&id, |mut c| {
            let r = req(r.clone(), WRITE_DEADLINE);
            async move { c.cluster.create_token(r).await }
        })
        .await
    }

    pub async fn list_tokens(&mut self) -> Result<Vec<pb::Token>, Failure> {
        let r = self
            .read(READ_DEADLINE, |mut c| async move {
                c.cluster.list_tokens(req(pb::ListTokensRequest {}, READ_DEADLINE)).await
            })
            .await?;
        Ok(r.tokens)
    }

    pub async fn revoke_token(&mut self, name: String, request_id: &str) -> Result<(), Failure> {
        self.write_done(request_id, |mut c| {
            let r = req(
                pb::RevokeTokenRequest { name: name.clone(), request_id: request_id.to_string() },
                WRITE_DEADLINE,
            );
            async move { c.cluster.revoke_token(r).await }
        })
        .await
    }

    pub fn is_single(&self) -> bool {
        self.members.len() == 1
    }

    /// Creates VMs (one without `--count`) under the request's id: where
    /// each went, and the write's log index.
    pub async fn create_vms(&mut self, r: pb::CreateVmsRequest) -> Result<pb::CreateVmsResponse, Failure> {
        let id = r.request_id.clone();
        self.write_or_fail(&id, |mut c| {
            let r = req(r.clone(), WRITE_DEADLINE);
            async move { c.vms.create_vms(r).await }
        })
        .await
    }

    /// What `r` (with `dry_run` set) would do. Changes nothing, so it is
    /// safe to repeat on any member, like a read.
    pub async fn create_vms_dry_run(
        &mut self,
        r: pb::CreateVmsRequest,
    ) -> Result<pb::CreateVmsResponse, Failure> {
        debug_assert!(r.dry_run);
        self.read(READ_DEADLINE, |mut c| {
            let r = req(r.clone(), READ_DEADLINE);
            async move { c.vms.create_vms(r).await }
        })
        .await
    }

    /// The VM named `name`, or `None` if there is none.
    pub async fn find_vm(&mut self, name: String) -> Result<Option<pb::Vm>, Failure> {
        self.read(READ_DEADLINE, |mut c| {
            let r =
                req(pb::GetVmRequest { name: name.clone(), consistency: consistency(false) }, READ_DEADLINE);
            async move {
                match c.vms.get_vm(r).await {
                    Ok(r) => Ok(Response::new(r.into_inner().vm)),
                    Err(s) if s.code() == Code::NotFound => Ok(Response::new(None)),
                    Err(s) => Err(s),
                }
            }
        })
        .await
    }

    pub async fn get_vm(&mut self, name: String, stale: bool) -> Result<pb::Vm, Failure> {
        let r = self
            .read(READ_DEADLINE, |mut c| {
                let r = req(
                    pb::GetVmRequest { name: name.clone(), consistency: consistency(stale) },
                    READ_DEADLINE,
                );
                async move { c.vms.get_vm(r).await }
            })
            .await?;
        r.vm.ok_or_else(|| Failure::new("server returned no VM"))
    }

    pub async fn list_vms(&mut self, node_id: u64, stale: bool) -> Result<Vec<pb::Vm>, Failure> {
        Ok(self.list_vms_at(node_id, stale).await?.vms)
    }

    /// The VMs and the revision the list is at least as new as (watch from
    /// revision + 1 to miss nothing after it).
    pub async fn list_vms_at(&mut self, node_id: u64, stale: bool) -> Result<pb::ListVmsResponse, Failure> {
        self.read(READ_DEADLINE, |mut c| async move {
            c.vms
                .list_vms(req(pb::ListVmsRequest { consistency: consistency(stale), node_id }, READ_DEADLINE))
                .await
        })
        .await
    }

    /// Opens a `Watch` stream on the first member that answers (no
    /// deadline: the stream lasts until it breaks).
    pub async fn watch(
        &mut self,
        r: pb::WatchRequest,
    ) -> Result<tonic::Streaming<pb::WatchResponse>, Failure> {
        self.read(READ_DEADLINE, |mut c| {
            let r = Request::new(r.clone());
            async move { c.cluster.watch(r).await }
        })
        .await
    }

    /// Moves on from the current member (its stream broke): the next call
    /// tries the others first.
    pub fn skip_member(&mut self) {
        self.conn = None;
        self.current = (self.current + 1) % self.members.len();
    }

    /// Start, stop or restart `name` under `request_id`.
    pub async fn set_desired(
        &mut self,
        verb: Desire,
        name: &str,
        request_id: &str,
    ) -> Result<(Option<pb::Vm>, u64), Failure> {
        let r = self
            .write_or_fail(request_id, |mut c| {
                let r = req(name_req(name, request_id), WRITE_DEADLINE);
                async move {
                    match verb {
                        Desire::Start => c.vms.start_vm(r).await,
                        Desire::Stop => c.vms.stop_vm(r).await,
                        Desire::Restart => c.vms.restart_vm(r).await,
                    }
                }
            })
            .await?;
        written(r)
    }

    /// Starts moving a VM off its node; the VM as the move left it, and the
    /// write's log index.
    pub async fn migrate_vm(&mut self, r: pb::MigrateVmRequest) -> Result<(Option<pb::Vm>, u64), Failure> {
        let id = r.request_id.clone();
        let r = self
            .write_or_fail(&id, |mut c| {
                let r = req(r.clone(), WRITE_DEADLINE);
                async move { c.vms.migrate_vm(r).await }
            })
            .await?;
        written(r)
    }

    pub async fn vm_logs(&mut self, name: String, offset: u64) -> Result<pb::VmLogsResponse, Failure> {
        self.read(READ_DEADLINE, |mut c| {
            let r = req(pb::VmLogsRequest { name: name.clone(), offset, max_bytes: 0 }, READ_DEADLINE);
            async move { c.vms.vm_logs(r).await }
        })
        .await
    }

    /// Opens a follow of `name`'s console from `offset` (`FollowVmLogs`).
    pub async fn follow_vm_logs(
        &mut self,
        name: String,
        offset: u64,
    ) -> Result<tonic::Streaming<pb::VmLogsResponse>, Failure> {
        self.read(READ_DEADLINE, |mut c| {
            let r = Request::new(pb::VmLogsRequest { name: name.clone(), offset, max_bytes: 0 });
            async move { c.vms.follow_vm_logs(r).await }
        })
        .await
    }

    /// Attaches `name`'s interactive console (`VmConsole`): `input`'s
    /// first message names the VM. No deadline: it lasts as long as the
    /// caller keeps it.
    pub async fn vm_console(
        &mut self,
        input: tokio::sync::mpsc::Receiver<pb::ConsoleInput>,
    ) -> Result<tonic::Streaming<pb::ConsoleOutput>, Failure> {
        let input = std::sync::Arc::new(parking_lot::Mutex::new(Some(input)));
        self.read(READ_DEADLINE, |mut c| {
            let rx = input.lock().take();
            async move {
                let Some(rx) = rx else {
                    return Err(Status::unavailable(
                        "the console input went to a member that failed; attach again",
                    ));
                };
                let stream =
                    futures::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|m| (m, rx)) });
                c.vms.vm_console(Request::new(stream)).await
            }
        })
        .await
    }

    /// Asks the node what its backend sees (no forwarding): meant for a
    /// client of [`one`](Self::one) node.
    pub async fn local_vm(&mut self, name: String) -> Result<pb::LocalVmResponse, Failure> {
        self.read(READ_DEADLINE, |mut c| {
            let r = req(name_req(&name, ""), READ_DEADLINE);
            async move { c.vms.local_vm(r).await }
        })
        .await
    }

    pub async fn delete_vm(&mut self, name: String, request_id: &str) -> Result<(), Failure> {
        self.write_done(request_id, |mut c| {
            let r = req(
                pb::DeleteVmRequest { name: name.clone(), request_id: request_id.to_string() },
                WRITE_DEADLINE,
            );
            async move { c.vms.delete_vm(r).await }
        })
        .await
    }
}

/// The VM writes that set what a VM should be doing.
#[derive(Clone, Copy)]
pub enum Desire {
    Start,
    Stop,
    Restart,
}

fn name_req(name: &str, request_id: &str) -> pb::VmNameRequest {
    pb::VmNameRequest { name: name.to_string(), request_id: request_id.to_string() }
}

/// A successful write's VM and log index. The VM is absent only when this
/// was a retry of a request id whose write succeeded earlier and the VM has
/// been deleted since.
fn written(r: pb::VmResponse) -> Result<(Option<pb::Vm>, u64), Failure> {
    Ok((r.vm, r.index))
}

/// The first of `members` that answers, for commands that hold their own
/// connections (bench).
pub async fn answering(members: &[String]) -> Result<String, Failure> {
    let mut skipped = Vec::new();
    for m in members {
        match dial(m).await {
            Ok(_) => return Ok(m.clone()),
            Err(why) => skipped.push(format!("{m} {why}")),
        }
    }
    Err(Failure::new(no_member(&skipped)))
}

/// Connects to `addr` (HOST:PORT), failing with one plain line.
pub async fn channel(addr: &str) -> Result<Channel, Failure> {
    dial(addr).await.map_err(|why| Failure::new(no_member(&[format!("{addr} {why}")])))
}

/// Opens a connection to `addr` that a server has answered on; the error is
/// a phrase to follow the address ("refused the connection").
async fn dial(addr: &str) -> Result<Channel, String> {
    let tls = tls();
    let scheme = if tls.is_some() { "https" } else { "http" };
    let mut endpoint = Endpoint::from_shared(format!("{scheme}://{addr}"))
        .map_err(|e| format!("is not a valid address: {e}"))?
        .http2_keep_alive_interval(KEEPALIVE)
        .keep_alive_timeout(KEEPALIVE_TIMEOUT)
        .keep_alive_while_idle(true);
    if let Some(config) = tls {
        endpoint = endpoint
            .tls_config(config.clone())
            .map_err(|e| format!("cannot be dialled with TLS ({})", source_chain(&e)))?;
    }
    endpoint.connect_with_connector(Answering { tls: tls.is_some() }).await.map_err(|e| {
        let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(&e);
        while let Some(err) = cur {
            if let Some(io) = err.downcast_ref::<std::io::Error>() {
                return match io.kind() {
                    std::io::ErrorKind::ConnectionRefused => "refused the connection".to_string(),
                    _ if tls.is_some() && io.kind() != std::io::ErrorKind::TimedOut => tls_failure(io),
                    _ => io.to_string(),
                };
            }
            cur = err.source();
        }
        let chain = source_chain(&e);
        if tls.is_some() && chain.contains("TLS handshake timeout") {
            return format!("did not complete the TLS handshake within {}s", CONNECT_TIMEOUT.as_secs());
        }
        format!("could not be reached ({chain})")
    })
}

/// A failed TLS handshake as a phrase after the address, with what usually
/// causes it.
fn tls_failure(io: &std::io::Error) -> String {
    let why = io.to_string();
    let hint = if why.contains("UnknownIssuer") || why.contains("BadSignature") {
        "; its certificate is not signed by the CA given with --cacert"
    } else if why.contains("not valid for name") || why.contains("NotValidForName") {
        "; its certificate does not name this address: issue it with --host for every name and IP clients use"
    } else if why.contains("InvalidContentType") || why.contains("corrupt message") {
        "; it does not speak TLS: is it running without --tls-ca? then leave out --cacert"
    } else if why.contains("Expired") {
        "; its certificate has expired"
    } else {
        ""
    };
    format!("failed the TLS handshake ({why}{hint})")
}

/// Dials TCP and, for plaintext, waits (at most [`CONNECT_TIMEOUT`] in all)
/// until the server sends its first byte (an HTTP/2 server's SETTINGS
/// frame), without consuming it. With TLS the client speaks first and the
/// handshake (bounded by the same timeout) shows the server is up.
#[derive(Clone, Copy)]
struct Answering {
    tls: bool,
}

/// The HTTP/2 client preface: what a plaintext client sends first.
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

impl Service<Uri> for Answering {
    type Response = hyper_util::rt::TokioIo<tokio::net::TcpStream>;
    type Error = std::io::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let tls = self.tls;
        Box::pin(async move {
            use std::io::{Error, ErrorKind};
            let authority = uri
                .authority()
                .map(|a| a.to_string())
                .ok_or_else(|| Error::new(ErrorKind::InvalidInput, "address without HOST:PORT"))?;
            let deadline = tokio::time::Instant::now() + CONNECT_TIMEOUT;
            let silent = || {
                Error::new(
                    ErrorKind::TimedOut,
                    format!("did not answer within {}s", CONNECT_TIMEOUT.as_secs()),
                )
            };
            let stream = tokio::time::timeout_at(deadline, tokio::net::TcpStream::connect(&authority))
                .await
                .map_err(|_| silent())??;
            stream.set_nodelay(true)?;
            if tls {
                return Ok(hyper_util::rt::TokioIo::new(stream));
            }
            let mut first = [0u8; 1];
            match tokio::time::timeout_at(deadline, stream.peek(&mut first)).await {
                Ok(Ok(0)) => {
                    Err(Error::new(ErrorKind::ConnectionAborted, "closed the connection without answering"))
                }
                Ok(Ok(_)) => Ok(hyper_util::rt::TokioIo::new(stream)),
                Ok(Err(e)) => Err(e),
                // Silent: a stopped process (its kernel still accepts), or
                // a TLS server waiting for the client's hello.
                Err(_) if speaks_tls(&stream).await => Err(Error::other(
                    "serves TLS only: give the cluster's CA with --cacert (and a client certificate with --cert and --key)",
                )),
                Err(_) => Err(silent()),
            }
        })
    }
}

/// Whether the silent server on `stream` is a TLS server: sent what a
/// plaintext HTTP/2 client sends, a TLS server answers with an alert record
/// (content type 21) at once. The connection is given up on either way.
async fn speaks_tls(stream: &tokio::net::TcpStream) -> bool {
    let probe = async {
        let mut sent = 0;
        while sent < H2_PREFACE.len() {
            stream.writable().await.ok()?;
            match stream.try_write(&H2_PREFACE[sent..]) {
                Ok(n) => sent += n,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
                Err(_) => return None,
            }
        }
        let mut first = [0u8; 1];
        match stream.peek(&mut first).await {
            Ok(1) => Some(first[0]),
            _ => None,
        }
    };
    matches!(tokio::time::timeout(Duration::from_millis(500), probe).await, Ok(Some(21)))
}

fn source_chain(e: &dyn std::error::Error) -> String {
    let mut parts = vec![e.to_string()];
    let mut cur = e.source();
    while let Some(c) = cur {
        let s = c.to_string();
        // Wrappers often repeat their source's text.
        if !parts.iter().any(|p| p.contains(&s)) {
            parts.push(s);
        }
        cur = c.source();
    }
    parts.join(": ")
}
