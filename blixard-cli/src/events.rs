//! `blixard events` and `vm list --watch`: the cluster's change feed (the
//! `Watch` RPC), followed across members.
//!
//! Each message is one revision (a Raft log index) with all its changes, and
//! every member sends the same revisions. So when a stream breaks (the member
//! died, lost its leader, shut down) the client resumes on the next member
//! from the last revision it printed + 1: every change is printed once, in
//! order. A revision the members no longer retain ends the command with the
//! server's `compacted:` line (exit 1): re-list and watch from there.
use std::time::Duration;

use blixard_proto as pb;
use serde_json::{json, Value};
use tonic::Code;

use crate::client::{self, Client};
use crate::output::{node_cell, node_json, vm_json};
use crate::{Failure, Format};

/// How long to wait before trying the members again when none answered.
const RETRY_PAUSE: Duration = Duration::from_millis(500);

/// `kind`, `type` and the object of one event, as JSON.
pub fn event_json(e: &pb::WatchEvent) -> Value {
    let kind = if e.kind == pb::WatchKind::Node as i32 { "node" } else { "vm" };
    let ty = if e.r#type == pb::EventType::Delete as i32 { "delete" } else { "put" };
    let mut v = json!({ "revision": e.revision, "kind": kind, "type": ty });
    if let Some(vm) = &e.vm {
        v["vm"] = vm_json(vm);
    }
    if let Some(node) = &e.node {
        v["node"] = node_json(node);
    }
    v
}

/// One event as a line: JSON, or for people "REV KIND TYPE NAME details".
pub fn print_event(e: &pb::WatchEvent, format: Format) -> Result<(), Failure> {
    if format == Format::Json {
        let line = serde_json::to_string(&event_json(e)).map_err(|e| Failure::new(e.to_string()))?;
        println!("{line}");
        return Ok(());
    }
    let ty = if e.r#type == pb::EventType::Delete as i32 { "deleted" } else { "put" };
    if let Some(v) = &e.vm {
        println!(
            "{:>8}  vm    {ty:<7}  {}  node={} desired={} observed={} generation={}",
            e.revision,
            v.name,
            node_cell(v.node_id),
            v.desired,
            v.observed,
            v.generation
        );
    } else if let Some(n) = &e.node {
        println!(
            "{:>8}  node  {ty:<7}  {}  status={} vms={} addr={}",
            e.revision, n.id, n.status, n.vm_count, n.addr
        );
    }
    Ok(())
}

/// What to do after a message.
pub enum Flow {
    Continue,
    Stop,
}

/// True for the refusal of a revision older than the retained history.
fn compacted(s: &tonic::Status) -> bool {
    s.metadata().get(blixard_core::node::REASON_KEY).and_then(|v| v.to_str().ok()) == Some("compacted")
        || s.message().starts_with("compacted:")
}

/// Follows the feed from `req.from_revision` (0: from now) until `on`
/// says stop, resuming on another member whenever a stream breaks. Fails
/// on `compacted`, on any other refusal of the request, and (when
/// `give_up_after` is set) once no member answered for that long.
pub async fn follow(
    c: &mut Client,
    mut req: pb::WatchRequest,
    give_up_after: Option<Duration>,
    mut on: impl FnMut(&pb::WatchResponse) -> Result<Flow, Failure>,
) -> Result<(), Failure> {
    if req.from_revision == 0 {
        // "Now" pinned to a revision, so a resume elsewhere misses nothing.
        req.from_revision = c.status(false).await?.revision + 1;
    }
    let mut unanswered_since: Option<tokio::time::Instant> = None;
    loop {
        let mut stream = match c.watch(req.clone()).await {
            Ok(s) => s,
            // No member answered: keep trying (the cluster may be electing).
            Err(f) if f.message.starts_with("no member answered") => {
                let since = *unanswered_since.get_or_insert_with(tokio::time::Instant::now);
                if give_up_after.is_some_and(|d| since.elapsed() >= d) {
                    return Err(f);
                }
                tokio::time::sleep(RETRY_PAUSE).await;
                continue;
            }
            Err(f) => return Err(f),
        };
        unanswered_since = None;
        loop {
            match stream.message().await {
                Ok(Some(m)) => {
                    // Revisions only grow; anything at or below the last one
                    // seen was already handled (never sent, but cheap to hold).
                    if m.revision < req.from_revision {
                        continue;
                    }
                    req.from_revision = m.revision + 1;
                    if let Flow::Stop = on(&m)? {
                        return Ok(());
                    }
                }
                Ok(None) => break,
                Err(s) if compacted(&s) => return Err(client::status_failure(&s)),
                Err(s) if s.code() == Code::InvalidArgument => return Err(client::status_failure(&s)),
                Err(_) => break,
            }
        }
        // The stream broke: resume on the next member.
        c.skip_member();
    }
}

/// `blixard events [--from REV] [-o json]`: every change, forever.
pub async fn events(c: &mut Client, from: u64, format: Format) -> Result<(), Failure> {
    let req = pb::WatchRequest { from_revision: from, ..Default::default() };
    follow(c, req, None, |m| {
        for e in &m.events {
            print_event(e, format)?;
        }
        Ok(Flow::Continue)
    })
    .await
}

/// `blixard vm list --watch`: the list, then every change to the listed
/// VMs (on `node`, if given: VMs that are on it after the change), forever.
pub async fn watch_vms(c: &mut Client, node: u64, stale: bool, format: Format) -> Result<(), Failure> {
    let list = c.list_vms_at(node, stale).await?;
    if format == Format::Json {
        // One object per line, shaped like the events that follow.
        for v in &list.vms {
            let e = pb::WatchEvent {
                revision: list.revision,
                kind: pb::WatchKind::Vm as i32,
                r#type: pb::EventType::Put as i32,
                vm: Some(v.clone()),
                node: None,
            };
            print_event(&e, format)?;
        }
    } else {
        crate::output::vms(&list.vms, format)?;
    }
    let req = pb::WatchRequest {
        from_revision: list.revision + 1,
        kinds: vec![pb::WatchKind::Vm as i32],
        ..Default::default()
    };
    follow(c, req, None, |m| {
        for e in &m.events {
            if node == 0 || e.vm.as_ref().is_some_and(|v| v.node_id == node) {
                print_event(e, format)?;
            }
        }
        Ok(Flow::Continue)
    })
    .await
}
