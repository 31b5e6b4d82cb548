//! The accepting end of the peer link (raft/link.rs): a follower answers its
//! leader's AppendEntries on it, a leader its followers' forwarded writes.
//!
//! A connection must open with the link's magic and a hello for this
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
use crate::raft::link::{Framed, Hello, KIND_APPEND, KIND_FORWARD, STATUS_OK, STATUS_REFUSED};
use crate::raft::TypeConfig;
use crate::types::NodeId;

/// A connection that sends no frame for this long is closed.
const IDLE_TIMEOUT: Duration = Duration::from_secs(30);
/// Time a new connection gets to say hello.
const HELLO_TIMEOUT: Duration = Duration::from_secs(5);

/// Accepts link connections until aborted; aborting it also ends every
/// connection it accepted.
pub async fn serve(node: Arc<NodeShared>, listener: TcpListener) {
    let mut conns = Connections(Vec::new());
    loop {
        match listener.accept().await {
            Ok((stream, peer)) => {
                conns.0.retain(|h| !h.is_finished());
                conns.0.push(tokio::spawn(connection(node.clone(), stream, peer)));
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

async fn connection(node: Arc<NodeShared>, stream: TcpStream, peer: std::net::SocketAddr) {
    let _ = stream.set_nodelay(true);
    let mut link = Framed::new(Box::new(stream));
    let hello = match tokio::time::timeout(HELLO_TIMEOUT, link.accept()).await {
        Ok(Ok(h)) => h,
        Ok(Err(e)) => {
            tracing::debug!(%peer, error = %e, "peer link: not a peer");
            return;
        }
        Err(_) => {
            tracing::debug!(%peer, "peer link: no hello in time");
            return;
        }
    };
    if let Err(reason) = check_hello(&node, &hello) {
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
                    let reply = answer_forward(&node, hello.from, forward).await;
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
/// state, then each proposal against the caller's role.
async fn answer_forward(node: &NodeShared, from: NodeId, forward: LinkForward<'static>) -> LinkForwardReply {
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
    let caller = match &forward.token {
        Some(token) => {
            Some(crate::auth::forwarded_token(&node.state, token, super::now_ms()).map_err(refused)?)
        }
        None => None,
    };
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
