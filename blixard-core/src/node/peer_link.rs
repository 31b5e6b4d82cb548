//! The follower's end of the peer link (raft/link.rs): accepts connections
//! from leaders and answers their AppendEntries.
//!
//! A connection must open with the link's magic and a hello for this
//! node's cluster in a format version this node reads; anything else is
//! refused with the reason and closed, before any request is decoded. Then
//! each AppendEntries goes to openraft exactly as one over gRPC does
//! (`raft_service::append_entries`) and its reply goes back on the same
//! connection, in order. A connection that carries nothing for
//! [`IDLE_TIMEOUT`] is closed (a leader sends heartbeats far more often);
//! one that sends a bad frame is closed at once.
use std::sync::Arc;
use std::time::Duration;

use openraft::raft::AppendEntriesRequest;
use tokio::net::{TcpListener, TcpStream};

use super::NodeShared;
use crate::codec;
use crate::format;
use crate::raft::link::{Framed, Hello, KIND_APPEND, STATUS_OK, STATUS_REFUSED};
use crate::raft::TypeConfig;

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
    let mut out = Vec::new();
    loop {
        let rpc: AppendEntriesRequest<TypeConfig> =
            match tokio::time::timeout(IDLE_TIMEOUT, link.recv()).await {
                Err(_) | Ok(Ok(None)) => return,
                Ok(Err(e)) => {
                    tracing::debug!(%peer, error = %e, "peer link: connection failed");
                    return;
                }
                Ok(Ok(Some((KIND_APPEND, payload)))) => match codec::decode(payload) {
                    Ok(rpc) => rpc,
                    Err(e) => {
                        let reason = format!("bad AppendEntries from node {}: {e}", hello.from);
                        tracing::warn!(%peer, %reason, "peer link: refused");
                        let _ = link.send(STATUS_REFUSED, reason.as_bytes()).await;
                        return;
                    }
                },
                Ok(Ok(Some((kind, _)))) => {
                    let reason = format!("unknown request kind {kind}");
                    let _ = link.send(STATUS_REFUSED, reason.as_bytes()).await;
                    return;
                }
            };
        let resp = super::raft_service::append_entries(&node, rpc, true).await;
        out.clear();
        if codec::encode_into(&resp, &mut out).is_err() || link.send(STATUS_OK, &out).await.is_err() {
            return;
        }
    }
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
