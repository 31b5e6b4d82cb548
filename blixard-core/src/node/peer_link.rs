//! The accepting end of the peer link (raft/link.rs): a follower answers its
//! leader's AppendEntries on it, a leader its followers' forwarded writes.
//!
//! On a node with TLS a connection first completes a TLS handshake in which
//! the peer presents a node certificate of the cluster's CA, and its hello
//! must come from the node that certificate names (what the gRPC Raft
//! service checks on each request). Then a connection must open with the
//! link's magic and a hello for this
//! node's cluster in a format version this node reads; anything else is
//! refused with the reason and closed, before any request is decoded. Then
//! each AppendEntries goes to openraft exactly as one over gRPC does
//! (`raft_service::append_entries`), each forward to the batcher exactly as
//! a gRPC `ProposeBatch` does (`raft_service::answer_forwards`, after the
//! same token check), and each reply goes back on the same connection, in
//! order. A connection that carries nothing for
//! [`IDLE_TIMEOUT`] is closed (a leader sends heartbeats far more often);
//! one that sends a bad frame is closed at once.
use std::sync::Arc;
use std::time::Duration;

use openraft::raft::AppendEntriesRequest;
use tokio::net::{TcpListener, TcpStream};
use tracing::Instrument;

use super::forwarder::{LinkForward, LinkForwardReply};
use super::NodeShared;
use crate::codec;
use crate::format;
use crate::raft::link::{Framed, Hello, LinkStream, KIND_APPEND, KIND_FORWARD, STATUS_OK, STATUS_REFUSED};
use crate::raft::TypeConfig;
use crate::types::NodeId;

/// A connection that sends no frame for this long is closed.
const IDLE_TIMEOUT: Duration = Duration::from_secs(30);
/// Time a new connection gets to say hello.
const HELLO_TIMEOUT: Duration = Duration::from_secs(5);

/// How a node accepts links: in plaintext, or (a node with TLS) with
/// mutual TLS, node certificates of the cluster's CA on both ends.
#[derive(Clone)]
pub enum Acceptor {
    Plain,
    #[cfg(not(madsim))]
    Tls(tokio_rustls::TlsAcceptor),
}

/// Accepts link connections until aborted; aborting it also ends every
/// connection it accepted.
pub async fn serve(node: Arc<NodeShared>, listener: TcpListener, acceptor: Acceptor) {
    let mut conns = Connections(Vec::new());
    loop {
        match listener.accept().await {
            Ok((stream, peer)) => {
                conns.0.retain(|h| !h.is_finished());
                conns.0.push(tokio::spawn(connection(node.clone(), stream, peer, acceptor.clone())));
            }
            Err(e) => {
                // Out of file descriptors and the like: pause, then go on.
                tracing::warn!(error = %e, "peer link: accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

/// The accepted connections' tasks, aborted with the accept loop.
struct Connections(Vec<tokio::task::JoinHandle<()>>);

impl Drop for Connections {
    fn drop(&mut self) {
        for h in &self.0 {
            h.abort();
        }
    }
}

/// The stream of an accepted connection, after the TLS handshake if there
/// is one, and the node its certificate names (`None` without TLS).
async fn accept_stream(
    stream: TcpStream,
    acceptor: &Acceptor,
) -> Result<(Box<dyn LinkStream>, Option<NodeId>), String> {
    match acceptor {
        Acceptor::Plain => Ok((Box::new(stream), None)),
        #[cfg(not(madsim))]
        Acceptor::Tls(tls) => {
            let s = tls.accept(stream).await.map_err(|e| format!("TLS handshake: {e}"))?;
            let der = s.get_ref().1.peer_certificates().and_then(|c| c.first()).ok_or("no certificate")?;
            match crate::tls::identity_of_der(der) {
                Ok(Some(crate::tls::PeerIdentity::Node(id))) => Ok((Box::new(s), Some(id))),
                Ok(Some(other)) => Err(format!("the certificate of {other}, not a node's")),
                Ok(None) => Err("a certificate that names no node".into()),
                Err(e) => Err(e),
            }
        }
    }
}

async fn connection(
    node: Arc<NodeShared>,
    stream: TcpStream,
    peer: std::net::SocketAddr,
    acceptor: Acceptor,
) {
    let _ = stream.set_nodelay(true);
    let opened = async {
        let (stream, cert_node) = accept_stream(stream, &acceptor).await?;
        let mut link = Framed::new(stream);
        let hello = link.accept().await.map_err(|e| e.to_string())?;
        Ok::<_, String>((link, hello, cert_node))
    };
    let (mut link, hello, cert_node) = match tokio::time::timeout(HELLO_TIMEOUT, opened).await {
        Ok(Ok(opened)) => opened,
        Ok(Err(e)) => {
            tracing::debug!(%peer, error = %e, "peer link: not a peer");
            return;
        }
        Err(_) => {
            tracing::debug!(%peer, "peer link: no hello in time");
            return;
        }
    };
    let checked = check_hello(&node, &hello).and_then(|()| match cert_node {
        // With TLS, the hello must come from the node the certificate names
        // (as a gRPC Raft request must, raft_service.rs).
        Some(id) if id != hello.from => {
            Err(format!("the certificate is node {id}'s, but the link's hello claims node {}", hello.from))
        }
        _ => Ok(()),
    });
    if let Err(reason) = checked {
        tracing::warn!(%peer, from = hello.from, %reason, "peer link: refused");
        let _ = link.send(STATUS_REFUSED, reason.as_bytes()).await;
        return;
    }
    let Ok(ours) = codec::encode(&format::CURRENT) else { return };
    if link.send(STATUS_OK, &ours).await.is_err() {
        return;
    }
    tracing::debug!(%peer, from = hello.from, "peer link: connected");
    loop {
        let (kind, payload) = match tokio::time::timeout(IDLE_TIMEOUT, link.recv()).await {
            Err(_) | Ok(Ok(None)) => return,
            Ok(Err(e)) => {
                tracing::debug!(%peer, error = %e, "peer link: connection failed");
                return;
            }
            Ok(Ok(Some(frame))) => frame,
        };
        let sent = match kind {
            KIND_APPEND => match codec::decode::<AppendEntriesRequest<TypeConfig>>(payload) {
                Ok(rpc) => {
                    let resp = super::raft_service::append_entries(&node, rpc, true).await;
                    link.send_encoded(STATUS_OK, &resp).await
                }
                Err(e) => {
                    return refuse(
                        &mut link,
                        peer,
                        format!("bad AppendEntries from node {}: {e}", hello.from),
                    )
                    .await
                }
            },
            KIND_FORWARD => match codec::decode::<LinkForward<'static>>(payload) {
                Ok(forward) => {
                    let reply = answer_forward(&node, hello.from, cert_node.is_some(), forward).await;
                    link.send_encoded(STATUS_OK, &reply).await
                }
                Err(e) => {
                    return refuse(&mut link, peer, format!("bad forward from node {}: {e}", hello.from))
                        .await
                }
            },
            kind => return refuse(&mut link, peer, format!("unknown request kind {kind}")).await,
        };
        if sent.is_err() {
            return;
        }
    }
}

/// Refuses a request with `reason` and ends the connection: nothing was
/// done with it.
async fn refuse(link: &mut Framed, peer: std::net::SocketAddr, reason: String) {
    tracing::warn!(%peer, %reason, "peer link: refused");
    let _ = link.send(STATUS_REFUSED, reason.as_bytes()).await;
}

/// A follower's forwarded writes, answered as a gRPC `ProposeBatch`
/// (raft_service.rs): the caller's token checked against this node's
/// state (or its certificate's claim believed, on a link whose peer proved
/// with its certificate that it is a node: `from_node`), then each
/// proposal against the caller's role.
async fn answer_forward(
    node: &NodeShared,
    from: NodeId,
    from_node: bool,
    forward: LinkForward<'static>,
) -> LinkForwardReply {
    node.metrics.forwards_link.add(1);
    let span = tracing::debug_span!(
        "propose_batch_handler",
        otel.name = "raft.ProposeBatch",
        otel.kind = "server",
        from,
        transport = "link",
        batch.size = forward.proposals.len(),
    );
    if let Some(tp) = &forward.traceparent {
        crate::trace::set_parent(&span, tp);
    }
    let refused = |s: tonic::Status| (s.code() as i32, s.message().to_string());
    let caller = crate::auth::forwarded_link_caller(
        &node.state,
        forward.token.as_deref(),
        forward.claim.as_deref(),
        from_node,
        super::now_ms(),
    )
    .map_err(refused)?;
    super::raft_service::answer_forwards(node, caller.as_ref(), forward.proposals.into_owned())
        .instrument(span)
        .await
        .map_err(refused)
}

/// The checks a gRPC `RaftRequest`'s envelope gets (raft_service.rs), on
/// the hello instead of on every request.
fn check_hello(node: &NodeShared, hello: &Hello) -> Result<(), String> {
    if hello.cluster_id != *node.cluster_id {
        return Err(format!(
            "node {} belongs to cluster {}, link from node {} is for cluster {:?}",
            node.id, node.cluster_id, hello.from, hello.cluster_id
        ));
    }
    let what = format!("a peer link from node {}", hello.from);
    format::check(&what, hello.format).map(drop).map_err(|e| e.to_string())
}
