//! A client that follows the cluster's change feed (the `Watch` RPC) through
//! every fault the scenario throws, as `blixard events` does: when its
//! stream breaks or goes quiet it resumes on another member from the last
//! revision it received + 1.
//!
//! What it checks:
//! - while it runs: every message's revision is at least the one it asked
//!   from and above the last one it received (in order, each revision once),
//!   whichever member sent it;
//! - at the end ([`WatchLog::rebuild`], used by the final-state check): the
//!   VMs rebuilt from the events up to a revision equal what a node lists at
//!   that revision (nothing missed, nothing extra, every record as it was).
//!
//! A revision no member retains any more (`compacted`) makes it re-list and
//! watch from the list's revision, as a real client must; that is counted.
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use blixard_core::types::NodeId;
use blixard_proto as pb;
use blixard_proto::cluster_service_client::ClusterServiceClient;
use blixard_proto::vm_service_client::VmServiceClient;

use crate::cluster::connect;

/// A stream that sends nothing for this long is dropped for another member:
/// a member cut off from the cluster never errors, it just goes quiet.
const QUIET: Duration = Duration::from_secs(5);

/// One revision as received: the VMs it put (`Some`) or deleted (`None`).
type Received = (u64, Vec<(String, Option<pb::Vm>)>);

/// What the watcher has received.
#[derive(Default, Debug)]
pub struct WatchLog {
    /// VMs as of `base_revision` (empty at 0; a re-list after `compacted`).
    base: BTreeMap<String, pb::Vm>,
    base_revision: u64,
    /// Every revision received after the base, in order: the VMs it put
    /// (`Some`) or deleted (`None`).
    revisions: Vec<Received>,
    /// Streams opened, members that refused as compacted, re-lists.
    pub streams: u64,
    pub compacted: u64,
    pub relists: u64,
    /// The first broken rule seen, if any.
    pub violation: Option<String>,
}

impl WatchLog {
    /// The last revision received (or re-listed).
    pub fn last(&self) -> u64 {
        self.revisions.last().map_or(self.base_revision, |r| r.0)
    }

    pub fn received(&self) -> usize {
        self.revisions.len()
    }

    /// The VMs as the events built them, up to revision `at`; `None` if the
    /// log starts after `at` (a re-list went past it).
    pub fn rebuild(&self, at: u64) -> Option<BTreeMap<String, pb::Vm>> {
        if self.base_revision > at {
            return None;
        }
        let mut vms = self.base.clone();
        for (_, changes) in self.revisions.iter().take_while(|(r, _)| *r <= at) {
            for (name, vm) in changes {
                match vm {
                    Some(vm) => vms.insert(name.clone(), vm.clone()),
                    None => vms.remove(name),
                };
            }
        }
        Some(vms)
    }
}

/// Follows the feed of members `ids` (round robin) forever, recording into
/// `log`. Runs on the client node.
pub async fn follow(ids: Vec<NodeId>, log: Arc<Mutex<WatchLog>>) {
    let mut from = 1u64;
    let mut turn = 0usize;
    let mut compacted_in_a_row = 0usize;
    loop {
        let id = ids[turn % ids.len()];
        turn += 1;
        let opened = async {
            let mut c = ClusterServiceClient::new(connect(id).await?);
            let req = pb::WatchRequest {
                from_revision: from,
                kinds: vec![pb::WatchKind::Vm as i32],
                ..Default::default()
            };
            c.watch(crate::cluster::with_admin_token(req)).await
        };
        let mut stream = match madsim::time::timeout(QUIET, opened).await {
            Ok(Ok(s)) => {
                compacted_in_a_row = 0;
                log.lock().unwrap().streams += 1;
                s.into_inner()
            }
            Ok(Err(s)) if s.message().starts_with("compacted:") => {
                log.lock().unwrap().compacted += 1;
                compacted_in_a_row += 1;
                if compacted_in_a_row >= ids.len() {
                    // Nobody retains it: re-list, then watch from there.
                    if let Ok(Ok(list)) = madsim::time::timeout(QUIET, relist(id)).await {
                        let mut l = log.lock().unwrap();
                        l.base = list.vms.into_iter().map(|v| (v.name.clone(), v)).collect();
                        l.base_revision = list.revision;
                        l.revisions.clear();
                        l.relists += 1;
                        from = list.revision + 1;
                        compacted_in_a_row = 0;
                    }
                }
                continue;
            }
            _ => {
                madsim::time::sleep(Duration::from_millis(200)).await;
                continue;
            }
        };
        loop {
            let m = match madsim::time::timeout(QUIET, stream.message()).await {
                Ok(Ok(Some(m))) => m,
                // Ended, failed, or quiet: resume on the next member.
                _ => break,
            };
            let mut l = log.lock().unwrap();
            let had = l.last();
            if m.revision < from || m.revision <= had {
                l.violation.get_or_insert_with(|| {
                    format!(
                        "n{id} sent revision {} to a watcher that asked from {from} and had {had}",
                        m.revision
                    )
                });
            }
            let changes = m
                .events
                .into_iter()
                .filter_map(|e| {
                    let vm = e.vm?;
                    let deleted = e.r#type == pb::EventType::Delete as i32;
                    Some((vm.name.clone(), (!deleted).then_some(vm)))
                })
                .collect();
            l.revisions.push((m.revision, changes));
            from = m.revision + 1;
        }
    }
}

async fn relist(id: NodeId) -> Result<pb::ListVmsResponse, tonic::Status> {
    let mut c = VmServiceClient::new(connect(id).await?);
    let req = pb::ListVmsRequest { consistency: pb::Consistency::Stale as i32, node_id: 0 };
    Ok(c.list_vms(crate::cluster::with_admin_token(req)).await?.into_inner())
}
