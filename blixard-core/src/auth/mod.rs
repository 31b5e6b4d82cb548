//! Who may do what: roles, callers, and the check every public RPC makes.
//!
//! A caller is authenticated by a bearer token (whose hash is in the
//! replicated state) or by a client certificate of the cluster's CA (whose
//! role is in the certificate). Each role includes the ones below it.
pub mod token;

use serde::{Deserialize, Serialize};
use tonic::metadata::{AsciiMetadataValue, MetadataMap};
use tonic::{Request, Status};

use crate::command::Command;
use crate::state::ClusterState;
use crate::types::NodeId;

/// What a caller may do. Ordered: each role includes every lower one.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Role {
    /// Reads, watch, logs.
    Viewer,
    /// Viewer, and VM writes and the console.
    Operator,
    /// Operator, and membership, nodes, scheduler settings, quotas, tokens.
    Admin,
}

impl Role {
    pub const ALL: [Role; 3] = [Role::Viewer, Role::Operator, Role::Admin];
    pub const RULE: &'static str = "viewer, operator or admin";

    pub fn as_str(self) -> &'static str {
        match self {
            Role::Viewer => "viewer",
            Role::Operator => "operator",
            Role::Admin => "admin",
        }
    }

    pub fn parse(s: &str) -> Option<Role> {
        Role::ALL.into_iter().find(|r| r.as_str() == s)
    }

    /// Whether a caller holding `self` may do what needs `need`.
    pub fn allows(self, need: Role) -> bool {
        self >= need
    }
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The request header that carries a bearer token: `authorization:
/// Bearer <token>`.
pub const AUTHORIZATION: &str = "authorization";

/// What a node forwarding a request says about a caller it authenticated
/// by client certificate (`cert:ROLE:NAME`) or by node certificate
/// (`node:ID`, a node's own call such as a join). Believed only from a peer
/// that proved it is a node of this cluster (its certificate); from anyone
/// else it is ignored. Token callers are forwarded with their token, which
/// the receiving node checks itself.
pub const CALLER: &str = "x-blixard-caller";

/// Who made a request, once authenticated.
#[derive(Clone, Debug)]
pub enum Caller {
    /// A bearer token (kept as sent, so a forward carries it on).
    Token { role: Role, token: AsciiMetadataValue },
    /// A client certificate of the cluster's CA.
    Cert { role: Role, name: String },
    /// A node of this cluster (its certificate), on its own behalf.
    Node(NodeId),
}

/// What a request needs of its caller.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Need {
    Role(Role),
    /// Only nodes issue it (registration, VM reports, down marks).
    Node,
}

impl Caller {
    /// A node acts with the rights of a viewer on its own behalf (status,
    /// forwarded reads) and of a node for node commands.
    pub fn role(&self) -> Role {
        match self {
            Caller::Token { role, .. } | Caller::Cert { role, .. } => *role,
            Caller::Node(_) => Role::Viewer,
        }
    }

    pub fn may(&self, need: Need) -> bool {
        match (self, need) {
            (Caller::Node(_), Need::Node) => true,
            (_, Need::Node) => false,
            (c, Need::Role(r)) => c.role().allows(r),
        }
    }

    /// Refuses with `PermissionDenied`, naming what was needed.
    pub fn require(&self, need: Need, what: &str) -> Result<(), Status> {
        if self.may(need) {
            return Ok(());
        }
        Err(Status::permission_denied(match need {
            Need::Role(r) => format!("{what} needs the {r} role; this caller is {}", self.describe()),
            Need::Node => format!("{what} is for nodes only; this caller is {}", self.describe()),
        }))
    }

    fn describe(&self) -> String {
        match self {
            Caller::Token { role: Role::Viewer, .. } => "a viewer token".to_string(),
            Caller::Token { role, .. } => format!("an {role} token"),
            Caller::Cert { role, name } => format!("client certificate {name:?} ({role})"),
            Caller::Node(id) => format!("node {id}"),
        }
    }

    /// Puts this caller on a request a node forwards for it: the token
    /// itself, or the certificate's identity (believed because the
    /// forwarding node proves who it is). A node's own request carries
    /// nothing.
    pub fn forward_on(&self, md: &mut MetadataMap) {
        match self {
            Caller::Token { token, .. } => {
                md.insert(AUTHORIZATION, token.clone());
            }
            _ => {
                if let Some(v) = self.claim().and_then(|c| AsciiMetadataValue::try_from(c).ok()) {
                    md.insert(CALLER, v);
                }
            }
        }
    }

    /// What a forwarding node asserts for a caller that is not a token:
    /// `cert:ROLE:NAME` for a client certificate's identity, `node:ID` for a
    /// node's own call forwarded by another node (a join sent to a
    /// follower), which the forwarding node vouches for.
    pub fn claim(&self) -> Option<String> {
        match self {
            Caller::Token { .. } => None,
            Caller::Cert { role, name } => Some(format!("cert:{role}:{name}")),
            Caller::Node(id) => Some(format!("node:{id}")),
        }
    }
}

/// A tonic interceptor that puts `authorization: Bearer <token>` on every
/// call: what a Rust client of the API needs.
#[derive(Clone)]
pub struct Bearer(AsciiMetadataValue);

impl Bearer {
    pub fn new(token: &str) -> Result<Bearer, tonic::metadata::errors::InvalidMetadataValue> {
        AsciiMetadataValue::try_from(format!("Bearer {}", token.trim())).map(Bearer)
    }
}

impl tonic::service::Interceptor for Bearer {
    fn call(&mut self, mut req: Request<()>) -> Result<Request<()>, Status> {
        req.metadata_mut().insert(AUTHORIZATION, self.0.clone());
        Ok(req)
    }
}

/// What a command needs of the caller who proposes it.
pub fn required(cmd: &Command) -> Need {
    use Command as C;
    match cmd {
        C::CreateVm { .. }
        | C::CreateVmsV3 { .. }
        | C::CreateVmsV4 { .. }
        | C::CreateVms { .. }
        | C::DeleteVm { .. }
        | C::StartVm { .. }
        | C::StopVm { .. }
        | C::RestartVm { .. }
        | C::MigrateVm { .. } => Need::Role(Role::Operator),
        C::SetNode { .. }
        | C::SetQuota { .. }
        | C::DeleteQuota { .. }
        | C::SetScheduler { .. }
        | C::SetNodeTimeout { .. }
        | C::DrainNode { .. }
        | C::SetEligible { .. }
        | C::DecommissionNode { .. }
        | C::CreateToken { .. }
        | C::RevokeToken { .. } => Need::Role(Role::Admin),
        C::RegisterNodeV1 { .. }
        | C::RegisterNode { .. }
        | C::ReportVms { .. }
        | C::SetNodeDown { .. }
        | C::SetVmNetwork { .. } => Need::Node,
        C::Batch(cmds) => {
            let needs: Vec<Need> = cmds.iter().map(required).collect();
            if needs.contains(&Need::Node) {
                Need::Node
            } else {
                Need::Role(
                    needs
                        .iter()
                        .map(|n| if let Need::Role(r) = n { *r } else { Role::Admin })
                        .max()
                        .unwrap_or(Role::Admin),
                )
            }
        }
    }
}

/// The identity TLS proved for the peer of a request (none without TLS).
pub trait PeerIdentity {
    /// The node id in the peer's node certificate.
    fn peer_node(&self) -> Option<NodeId>;
    /// The name and role in the peer's client certificate.
    fn peer_client(&self) -> Option<(String, Role)>;
}

impl<T> PeerIdentity for Request<T> {
    fn peer_node(&self) -> Option<NodeId> {
        crate::tls::peer_node(self)
    }

    fn peer_client(&self) -> Option<(String, Role)> {
        crate::tls::peer_client(self)
    }
}

fn unauthenticated(why: &str) -> Status {
    Status::unauthenticated(why.to_string())
}

/// Checks a bearer token against the state: known, not revoked, not
/// expired at `now_ms`. Never echoes the token.
pub fn check_token(state: &ClusterState, value: &AsciiMetadataValue, now_ms: u64) -> Result<Caller, Status> {
    let text = value.to_str().map_err(|_| unauthenticated("the authorization header is not text"))?;
    let token = text
        .strip_prefix("Bearer ")
        .ok_or_else(|| unauthenticated("the authorization header is not \"Bearer <token>\""))?
        .trim();
    if !token::well_formed(token) {
        return Err(unauthenticated(&format!(
            "that is not a Blixard token (they start with {:?} and have 64 hex digits)",
            token::PREFIX
        )));
    }
    let h = token::hash(token);
    // The token's name is copied only to say which one expired: a valid
    // token costs no allocation here.
    match state.with_token(&h, |t| {
        if t.expired(now_ms) {
            Err((t.name.clone(), t.expires_at_ms))
        } else {
            Ok(t.role)
        }
    }) {
        None => Err(unauthenticated("unknown or revoked token")),
        Some(Err((name, at))) => {
            Err(unauthenticated(&format!("token {name:?} expired at {at} ms since the epoch")))
        }
        Some(Ok(role)) => Ok(Caller::Token { role, token: value.clone() }),
    }
}

/// A `cert:ROLE:NAME` (or `node:ID`) assertion.
fn parse_cert_claim(v: &AsciiMetadataValue) -> Option<Caller> {
    let s = v.to_str().ok()?;
    if let Some(id) = s.strip_prefix("node:") {
        return id.parse().ok().filter(|id| *id > 0).map(Caller::Node);
    }
    let rest = s.strip_prefix("cert:")?;
    let (role, name) = rest.split_once(':')?;
    Some(Caller::Cert { role: Role::parse(role)?, name: name.to_string() })
}

/// Who sent a public API request: a node (by certificate, possibly on a
/// caller's behalf), a bearer token, or a client certificate.
pub fn authenticate<T>(state: &ClusterState, req: &Request<T>, now_ms: u64) -> Result<Caller, Status> {
    let md = req.metadata();
    if let Some(node) = req.peer_node() {
        // A node forwarding for a caller says who; its own calls say nothing.
        if let Some(claim) = md.get(CALLER) {
            return parse_cert_claim(claim)
                .ok_or_else(|| Status::invalid_argument(format!("node {node} sent a malformed {CALLER}")));
        }
        if let Some(v) = md.get(AUTHORIZATION) {
            return check_token(state, v, now_ms);
        }
        return Ok(Caller::Node(node));
    }
    if let Some(v) = md.get(AUTHORIZATION) {
        return check_token(state, v, now_ms);
    }
    if let Some((name, role)) = req.peer_client() {
        return Ok(Caller::Cert { role, name });
    }
    Err(unauthenticated(
        "no credentials: give a token (--token, BLIXARD_TOKEN or a context) or a client certificate",
    ))
}

/// [`forwarded_caller`] for a forward on the peer link (raft/link.rs),
/// where what gRPC carries as metadata comes in the request: `token` is the
/// `authorization` value as the client sent it, checked against this
/// node's state; `claim` a [`Caller::claim`], believed only when the link
/// is mutual TLS with a node certificate of this cluster (`from_node`).
pub fn forwarded_link_caller(
    state: &ClusterState,
    token: Option<&str>,
    claim: Option<&str>,
    from_node: bool,
    now_ms: u64,
) -> Result<Option<Caller>, Status> {
    if let Some(t) = token {
        let v = AsciiMetadataValue::try_from(t)
            .map_err(|_| unauthenticated("the authorization header is not text"))?;
        return check_token(state, &v, now_ms).map(Some);
    }
    match claim {
        None => Ok(None),
        Some(c) if from_node => AsciiMetadataValue::try_from(c)
            .ok()
            .and_then(|v| parse_cert_claim(&v))
            .map(Some)
            .ok_or_else(|| Status::invalid_argument(format!("malformed {CALLER}"))),
        Some(_) => Err(Status::permission_denied(format!(
            "{CALLER} is believed only from a node certificate of this cluster"
        ))),
    }
}

/// Who a write forwarded over the internal Propose RPC is for: `None` for
/// the sending node's own commands. Token callers are checked here against
/// this node's state (a revocation applied here counts even if the
/// forwarding node had not applied it yet); a certificate assertion is
/// believed only from a peer with a node certificate.
pub fn forwarded_caller<T>(
    state: &ClusterState,
    req: &Request<T>,
    now_ms: u64,
) -> Result<Option<Caller>, Status> {
    let md = req.metadata();
    if let Some(v) = md.get(AUTHORIZATION) {
        return check_token(state, v, now_ms).map(Some);
    }
    match md.get(CALLER) {
        None => Ok(None),
        Some(claim) if req.peer_node().is_some() => parse_cert_claim(claim)
            .map(Some)
            .ok_or_else(|| Status::invalid_argument(format!("malformed {CALLER}"))),
        Some(_) => Err(Status::permission_denied(format!(
            "{CALLER} is believed only from a node certificate of this cluster"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::Role;

    #[test]
    fn link_callers_claim_only_from_nodes_and_tokens_are_checked() {
        use super::{forwarded_link_caller, Caller};
        let state = crate::state::ClusterState::new();
        let cert = Caller::Cert { role: Role::Operator, name: "ci".into() };
        let claim = cert.claim().unwrap();
        // From a node certificate: believed, exactly.
        let got = forwarded_link_caller(&state, None, Some(&claim), true, 0).unwrap().unwrap();
        assert_eq!(format!("{got:?}"), format!("{cert:?}"));
        // From a link without one: refused.
        let e = forwarded_link_caller(&state, None, Some(&claim), false, 0).unwrap_err();
        assert_eq!(e.code(), tonic::Code::PermissionDenied, "{e:?}");
        // Malformed: refused.
        let e = forwarded_link_caller(&state, None, Some("cert:root:x"), true, 0).unwrap_err();
        assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e:?}");
        // A token unknown here: unauthenticated, whatever else came along.
        let unknown = format!("Bearer blx_{}", "0".repeat(64));
        let e = forwarded_link_caller(&state, Some(&unknown), Some(&claim), true, 0).unwrap_err();
        assert_eq!(e.code(), tonic::Code::Unauthenticated, "{e:?}");
        // Neither: the forwarding node's own write.
        assert!(forwarded_link_caller(&state, None, None, false, 0).unwrap().is_none());
        assert_eq!(Caller::Token { role: Role::Admin, token: "Bearer x".parse().unwrap() }.claim(), None);
    }

    #[test]
    fn forwarded_callers_round_trip_through_metadata() {
        use super::{parse_cert_claim, Caller, CALLER};
        for c in [Caller::Node(7), Caller::Cert { role: Role::Operator, name: "ci".into() }] {
            let mut md = tonic::metadata::MetadataMap::new();
            c.forward_on(&mut md);
            let back = parse_cert_claim(md.get(CALLER).unwrap()).unwrap();
            assert_eq!(format!("{back:?}"), format!("{c:?}"));
        }
        for bad in ["node:0", "node:x", "cert:root:x", "cert:admin", "admin"] {
            assert!(parse_cert_claim(&bad.parse().unwrap()).is_none(), "{bad}");
        }
    }

    #[test]
    fn roles_parse_and_include_the_lower_ones() {
        for r in Role::ALL {
            assert_eq!(Role::parse(r.as_str()), Some(r));
        }
        assert_eq!(Role::parse("root"), None);
        assert_eq!(Role::parse("Admin"), None);
        assert!(Role::Admin.allows(Role::Operator));
        assert!(Role::Operator.allows(Role::Viewer));
        assert!(!Role::Viewer.allows(Role::Operator));
        assert!(!Role::Operator.allows(Role::Admin));
    }
}
