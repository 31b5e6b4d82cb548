//! VM consoles: `VmLogs` (one chunk) and `FollowVmLogs` (a stream). A
//! console lives on the node that runs the VM; any other node forwards the
//! call there, once (a forwarded call is never forwarded again).
//!
//! A follow is a task on the owning node that reads the console from the
//! client's offset and sends each new chunk as it appears (the file is
//! checked every [`FOLLOW_EVERY`] while there is nothing new, and at once
//! while there is), until the client goes away or the VM leaves the node.
//! A forwarding node pipes the owner's stream through. Each stream has a
//! bounded channel: a slow client slows only its own task.
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use blixard_proto as pb;
use blixard_proto::vm_service_client::VmServiceClient;
use tonic::{Request, Status};

use super::NodeShared;
use crate::types::NodeId;

/// Largest console chunk one message carries.
pub const MAX_LOG_CHUNK: usize = 1024 * 1024;
pub const DEFAULT_LOG_CHUNK: usize = 64 * 1024;
/// How often a follow looks for new console output when there was none.
const FOLLOW_EVERY: Duration = Duration::from_millis(100);
/// Messages buffered per follow before its task waits for the client.
const STREAM_BUFFER: usize = 16;

pub type LogStream =
    Pin<Box<dyn futures::Stream<Item = Result<pb::VmLogsResponse, Status>> + Send + 'static>>;

/// Where a VM's console is read.
pub enum Console {
    /// On this node, through its backend.
    Here(Arc<dyn blixard_vm::VmBackend>),
    /// On node `owner`, reached through this client (the call is forwarded).
    There(VmServiceClient<tonic::transport::Channel>, NodeId),
}

/// The chunk size a request asks for, within the limits.
pub fn chunk_size(req: &pb::VmLogsRequest) -> usize {
    match req.max_bytes as usize {
        0 => DEFAULT_LOG_CHUNK,
        n => n.min(MAX_LOG_CHUNK),
    }
}

/// Finds where VM `name`'s console lives. `forwarded`: the call came from
/// another node, which must have sent it to the owner.
pub fn locate(node: &NodeShared, name: &str, forwarded: bool) -> Result<Console, Status> {
    crate::validate::vm_name(name).map_err(super::ApiError::from)?;
    let owner = node.state.with_vm(name, |v| v.node_id);
    let Some(owner) = owner else { return Err(Status::not_found(format!("no VM named {name:?}"))) };
    if owner == node.id {
        let backend = node
            .vm_backend
            .clone()
            .ok_or_else(|| Status::failed_precondition(format!("node {} runs no VM backend", node.id)))?;
        return Ok(Console::Here(backend));
    }
    if forwarded {
        return Err(Status::failed_precondition(format!(
            "node {} does not run VM {name:?} (node {owner} does)",
            node.id
        )));
    }
    if owner == 0 {
        return Err(Status::failed_precondition(format!(
            "VM {name:?} is placed on no node: it has no console"
        )));
    }
    let addr = node
        .state
        .with_node(owner, |n| n.addr.clone())
        .ok_or_else(|| Status::unavailable(format!("VM {name:?} is on unknown node {owner}")))?;
    let ch = node.channels.channel(&addr).map_err(|e| Status::unavailable(e.to_string()))?;
    Ok(Console::There(VmServiceClient::new(ch), owner))
}

/// Starts following `req.name`'s console from `req.offset`.
pub async fn follow(
    node: Arc<NodeShared>,
    req: pb::VmLogsRequest,
    forwarded: bool,
    mark: impl FnOnce(pb::VmLogsRequest) -> Request<pb::VmLogsRequest>,
) -> Result<LogStream, Status> {
    let max = chunk_size(&req);
    let (tx, rx) = tokio::sync::mpsc::channel(STREAM_BUFFER);
    match locate(&node, &req.name, forwarded)? {
        Console::There(mut client, _) => {
            let mut upstream = client.follow_vm_logs(mark(req)).await?.into_inner();
            tokio::spawn(async move {
                loop {
                    let m = tokio::select! {
                        m = upstream.message() => m,
                        _ = tx.closed() => return,
                        () = closing(&node) => {
                            let _ = tx.send(Err(shutting_down(node.id))).await;
                            return;
                        }
                    };
                    match m {
                        Ok(Some(chunk)) => {
                            if tx.send(Ok(chunk)).await.is_err() {
                                return;
                            }
                        }
                        Ok(None) => return,
                        Err(s) => {
                            let _ = tx.send(Err(s)).await;
                            return;
                        }
                    }
                }
            });
        }
        Console::Here(backend) => {
            let me = node.id;
            tokio::spawn(async move {
                let mut offset = req.offset;
                loop {
                    if node.state.feed().is_closed() {
                        let _ = tx.send(Err(shutting_down(me))).await;
                        return;
                    }
                    let chunk = match backend.logs(&req.name, offset, max).await {
                        Ok(c) => c,
                        // Not (yet) on this host: fine while the VM is still
                        // placed here (it may not have started yet).
                        Err(blixard_vm::VmError::NotFound(_)) => {
                            blixard_vm::LogChunk { data: Vec::new(), next_offset: offset }
                        }
                        Err(e) => {
                            let _ = tx.send(Err(Status::unavailable(e.to_string()))).await;
                            return;
                        }
                    };
                    if chunk.next_offset > offset || !chunk.data.is_empty() {
                        offset = chunk.next_offset;
                        let msg = pb::VmLogsResponse { data: chunk.data, next_offset: offset, node_id: me };
                        if tx.send(Ok(msg)).await.is_err() {
                            return;
                        }
                        continue;
                    }
                    // Nothing new: is the VM still here?
                    match node.state.with_vm(&req.name, |v| v.node_id) {
                        Some(owner) if owner == me => {}
                        Some(owner) => {
                            let why = format!("VM {:?} left node {me} (now on node {owner})", req.name);
                            let _ = tx.send(Err(Status::failed_precondition(why))).await;
                            return;
                        }
                        None => {
                            let _ = tx
                                .send(Err(Status::not_found(format!("VM {:?} was deleted", req.name))))
                                .await;
                            return;
                        }
                    }
                    tokio::select! {
                        _ = tokio::time::sleep(FOLLOW_EVERY) => {}
                        _ = tx.closed() => return,
                        () = closing(&node) => {
                            let _ = tx.send(Err(shutting_down(me))).await;
                            return;
                        }
                    }
                }
            });
        }
    }
    Ok(Box::pin(futures::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|m| (m, rx)) })))
}

/// Resolves once the node shuts down. A follow never ends by itself, and the
/// server's graceful shutdown waits for every open stream.
pub(super) async fn closing(node: &NodeShared) {
    let feed = node.state.feed();
    let mut changed = feed.subscribe();
    while !feed.is_closed() {
        if changed.changed().await.is_err() {
            return;
        }
    }
}

fn shutting_down(id: NodeId) -> Status {
    Status::unavailable(format!("node {id} is shutting down; follow through another member"))
}
