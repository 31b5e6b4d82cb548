//! The `Watch` RPC: streams the change feed ([`crate::watch`]) to a client.
//!
//! Each stream has its own task that reads the feed from its position,
//! filters, and sends one message per revision through a bounded channel:
//! a slow client slows only its own task (and, if it falls behind the
//! retained history, is told `compacted`); apply never waits for it.
use std::pin::Pin;
use std::sync::Arc;

use blixard_proto as pb;
use tonic::Status;

use super::api::{node_pb, vm_pb};
use super::{NodeShared, REASON_KEY};
use crate::state::ClusterState;
use crate::watch::{Change, Compacted, Revision};

pub type WatchStream =
    Pin<Box<dyn futures::Stream<Item = Result<pb::WatchResponse, Status>> + Send + 'static>>;

/// Messages buffered per stream before its task waits for the client.
const STREAM_BUFFER: usize = 64;

/// The environment variable that sets how many events the feed retains
/// (default [`crate::watch::HISTORY_EVENTS`]); tests lower it to provoke
/// `compacted`.
pub const HISTORY_ENV: &str = "BLIXARD_WATCH_HISTORY";

/// What a request asks for, checked at the edge.
struct Filter {
    vms: bool,
    nodes: bool,
    vm_name: String,
    node_id: u64,
}

impl Filter {
    fn of(req: &pb::WatchRequest) -> Result<Self, Status> {
        let mut vms = req.kinds.is_empty();
        let mut nodes = req.kinds.is_empty();
        for &k in &req.kinds {
            match pb::WatchKind::try_from(k) {
                Ok(pb::WatchKind::Vm) => vms = true,
                Ok(pb::WatchKind::Node) => nodes = true,
                _ => {
                    return Err(Status::invalid_argument(format!(
                        "watch kind {k} is not one of WATCH_KIND_VM (1), WATCH_KIND_NODE (2)"
                    )))
                }
            }
        }
        if !req.vm_name.is_empty() {
            crate::validate::vm_name(&req.vm_name).map_err(|e| Status::invalid_argument(e.to_string()))?;
        }
        Ok(Self { vms, nodes, vm_name: req.vm_name.clone(), node_id: req.node_id })
    }

    /// The revision's events this filter passes, as one message (`None` if
    /// none pass).
    fn message(&self, state: &ClusterState, r: &Revision) -> Option<pb::WatchResponse> {
        let mut events = Vec::new();
        for c in &r.changes {
            let (kind, deleted, vm, node) = match c {
                Change::Vm { record, deleted } => {
                    if !self.vms || (!self.vm_name.is_empty() && *record.name != *self.vm_name) {
                        continue;
                    }
                    (pb::WatchKind::Vm, *deleted, Some(vm_pb(record)), None)
                }
                Change::Node { record, deleted } => {
                    if !self.nodes || (self.node_id != 0 && record.id != self.node_id) {
                        continue;
                    }
                    let mut count = 0;
                    state.for_each_vm_on(record.id, |_| count += 1);
                    (pb::WatchKind::Node, *deleted, None, Some(node_pb(record, count)))
                }
            };
            let ty = if deleted { pb::EventType::Delete } else { pb::EventType::Put };
            events.push(pb::WatchEvent { revision: r.index, kind: kind as i32, r#type: ty as i32, vm, node });
        }
        (!events.is_empty()).then_some(pb::WatchResponse { revision: r.index, events })
    }
}

/// The status of a watch from a compacted revision: FailedPrecondition,
/// `blixard-reason: compacted`, and the oldest revision still retained in
/// `blixard-oldest-revision`.
pub fn compacted_status(c: Compacted) -> Status {
    let mut status = Status::failed_precondition(c.to_string());
    status.metadata_mut().insert(REASON_KEY, tonic::metadata::MetadataValue::from_static("compacted"));
    if let Ok(v) = c.oldest.to_string().parse() {
        status.metadata_mut().insert("blixard-oldest-revision", v);
    }
    status
}

/// Starts streaming the feed of `node` for `req`. A request for a compacted
/// revision fails at once (before any message).
pub fn start(node: Arc<NodeShared>, req: pb::WatchRequest) -> Result<WatchStream, Status> {
    let filter = Filter::of(&req)?;
    let feed = node.state.feed();
    // Subscribed before the first read, so no publish after it is missed.
    let published = feed.subscribe();
    // Checked here so the error is the RPC's own status, not a stream item.
    let first = feed.since(req.from_revision).map_err(compacted_status)?;
    let (tx, rx) = tokio::sync::mpsc::channel(STREAM_BUFFER);
    tokio::spawn(async move {
        let end = run(&node, filter, published, first, &tx).await;
        if let Err(status) = end {
            let _ = tx.send(Err(status)).await;
        }
    });
    Ok(Box::pin(futures::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|m| (m, rx)) })))
}

type Sender = tokio::sync::mpsc::Sender<Result<pb::WatchResponse, Status>>;

/// Sends revisions until the client goes away (`Ok`) or the stream must end
/// with an error (compacted, node shutting down).
async fn run(
    node: &NodeShared,
    filter: Filter,
    mut published: tokio::sync::watch::Receiver<u64>,
    first: crate::watch::Since,
    tx: &Sender,
) -> Result<(), Status> {
    let feed = node.state.feed();
    let (mut next, mut revisions) = (first.next, first.revisions);
    loop {
        for r in &revisions {
            if let Some(msg) = filter.message(&node.state, r) {
                if tx.send(Ok(msg)).await.is_err() {
                    return Ok(());
                }
            }
        }
        if revisions.is_empty() {
            // Wait for the next publish (the value is marked seen before
            // each read, so none in between is missed).
            tokio::select! {
                changed = published.changed() => {
                    if changed.is_err() {
                        return Err(Status::unavailable("the node is shutting down; watch another member"));
                    }
                }
                _ = tx.closed() => return Ok(()),
            }
        }
        if feed.is_closed() {
            return Err(Status::unavailable("the node is shutting down; resume on another member"));
        }
        published.borrow_and_update();
        let since = feed.since(next).map_err(compacted_status)?;
        next = since.next;
        revisions = since.revisions;
    }
}
