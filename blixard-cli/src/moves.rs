//! Moving VMs off a node: `node drain` (and following it until the node
//! holds nothing) and `vm migrate` (and its `--wait`).
//!
//! Both are cold moves the cluster runs by itself (see docs/OPERATIONS.md,
//! "Self-healing"): the VM leaves its node (`leaving_node`), that node stops
//! it, then it is placed and started elsewhere. The client only starts the
//! move and watches the VM records.
use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use blixard_proto as pb;
use clap::Args;

use crate::client::{self, Client, EXIT_INCOMPLETE};
use crate::lifecycle::{self, Goal};
use crate::output::node_cell;
use crate::{Failure, WaitOpts, WriteOpts};

/// How often a followed drain reads the VMs.
const DRAIN_POLL: Duration = Duration::from_millis(500);

#[derive(Args)]
pub struct DrainArgs {
    /// The node to drain.
    pub id: u64,
    /// After SECS, every VM that can still move leaves at once (whatever
    /// --max-parallel), and the command gives up (exit 6) if VMs remain.
    #[arg(long, value_name = "SECS", value_parser = clap::value_parser!(u64).range(1..))]
    pub deadline: Option<u64>,
    /// VMs moving at once (0: all at once).
    #[arg(long, value_name = "N", default_value_t = 2)]
    pub max_parallel: u32,
    /// Start the drain, say what started moving and what cannot move, and
    /// return (the cluster carries on by itself).
    #[arg(long)]
    pub detach: bool,
    #[command(flatten)]
    pub write: WriteOpts,
}

/// "1 VM", "3 VMs".
fn count(n: usize) -> String {
    format!("{n} VM{}", if n == 1 { "" } else { "s" })
}

fn stuck_text(stuck: &[pb::StuckVm]) -> String {
    let parts: Vec<String> = stuck.iter().map(|s| format!("{} ({})", s.name, s.reason)).collect();
    parts.join(", ")
}

/// `node drain`: starts the drain; unless `--detach`, follows it until the
/// node holds no VM and none is leaving it.
pub async fn drain(c: &mut Client, a: DrainArgs) -> Result<(), Failure> {
    let deadline = a.deadline.map(|s| Instant::now() + Duration::from_secs(s));
    let req = pb::DrainNodeRequest {
        node_id: a.id,
        max_parallel: a.max_parallel,
        deadline_secs: a.deadline.unwrap_or(0),
        request_id: a.write.id()?,
    };
    let r = c.drain_node(req).await?;
    let mut parallel = match a.max_parallel {
        0 => "all VMs moving at once".to_string(),
        n => format!("at most {} moving at once", count(n as usize)),
    };
    if let (Some(secs), 1..) = (a.deadline, a.max_parallel) {
        parallel.push_str(&format!(", all at once after {secs}s"));
    }
    let started = if r.moving.is_empty() {
        "no VM started moving now".to_string()
    } else {
        format!("started moving {}", r.moving.join(", "))
    };
    println!("node {} draining ({parallel}): {started}", a.id);
    for s in &r.stuck {
        println!("cannot move {}: {}", s.name, s.reason);
    }
    if a.detach {
        println!("the cluster carries on by itself; see `blixard vm list --node {}`", a.id);
        return Ok(());
    }
    follow(c, a.id, r, deadline).await
}

/// Follows a drain of node `id` whose first request answered `first`.
///
/// When no VM is leaving the node but some remain on it, asks again: that
/// moves what can move now (capacity freed elsewhere, a VM unpinned). When
/// that moved nothing either and still nothing is leaving, the remaining
/// VMs cannot move: the drain cannot complete.
async fn follow(
    c: &mut Client,
    id: u64,
    first: pb::DrainNodeResponse,
    deadline: Option<Instant>,
) -> Result<(), Failure> {
    // Every VM seen on the node or leaving it, for the summary.
    let mut seen: BTreeSet<String> = first.moving.iter().cloned().collect();
    let mut stuck = first.stuck;
    // The last request moved nothing.
    let mut idle = first.moving.is_empty();
    let mut last = String::new();
    loop {
        let vms = c.list_vms(0, false).await?;
        let on: Vec<&pb::Vm> = vms.iter().filter(|v| v.node_id == id).collect();
        let leaving: Vec<&pb::Vm> = vms.iter().filter(|v| v.node_id == 0 && v.leaving_node == id).collect();
        seen.extend(on.iter().chain(&leaving).map(|v| v.name.clone()));
        let line = format!("node {id}: {} left, {} moving", count(on.len()), leaving.len());
        if line != last {
            eprintln!("{line}");
            last = line;
        }
        if on.is_empty() && leaving.is_empty() {
            println!("node {id} drained: it holds no VM; {}", destinations(&seen, &vms));
            println!("node {id} takes no new VMs until `blixard node eligible {id}`");
            return Ok(());
        }
        if deadline.is_some_and(|d| Instant::now() >= d) {
            let names = |vms: &[&pb::Vm]| vms.iter().map(|v| v.name.as_str()).collect::<Vec<_>>().join(", ");
            let mut left = Vec::new();
            if !on.is_empty() {
                left.push(format!("{} still on it ({})", count(on.len()), names(&on)));
            }
            if !leaving.is_empty() {
                left.push(format!("{} leaving it ({})", count(leaving.len()), names(&leaving)));
            }
            return Err(Failure {
                message: format!(
                    "drain of node {id} incomplete at its deadline: {}; the cluster now moves every VM that can move at once (see `blixard vm list --node {id}`)",
                    left.join(", ")
                ),
                code: EXIT_INCOMPLETE,
            });
        }
        if !leaving.is_empty() {
            idle = false;
        } else if idle {
            return Err(cannot_complete(c, id, &on, &stuck).await);
        } else {
            let r = kick(c, id).await?;
            if !r.moving.is_empty() {
                eprintln!("node {id}: started moving {}", r.moving.join(", "));
            }
            seen.extend(r.moving.iter().cloned());
            idle = r.moving.is_empty();
            stuck = r.stuck;
            continue;
        }
        tokio::time::sleep(DRAIN_POLL).await;
    }
}

/// Asks the cluster to move what can move off draining node `id` now,
/// keeping the drain's current settings (its deadline may have fired, which
/// lifts the parallel limit).
async fn kick(c: &mut Client, id: u64) -> Result<pb::DrainNodeResponse, Failure> {
    let node = c.status(false).await?.nodes.into_iter().find(|n| n.id == id);
    let Some(node) = node else {
        return Err(Failure { message: format!("node {id} is no longer registered"), code: EXIT_INCOMPLETE });
    };
    let Some(d) = node.drain else {
        return Err(Failure {
            message: format!(
                "node {id} is no longer draining (status {}): `node eligible` ended the drain",
                node.status
            ),
            code: EXIT_INCOMPLETE,
        });
    };
    let deadline_secs = match d.deadline_ms {
        0 => 0,
        t => t.saturating_sub(now_ms()).div_ceil(1000).max(1),
    };
    let req = pb::DrainNodeRequest {
        node_id: id,
        max_parallel: d.max_parallel,
        deadline_secs,
        request_id: client::new_request_id(),
    };
    c.drain_node(req).await
}

/// The failure of a drain whose remaining VMs cannot move, each with why.
async fn cannot_complete(c: &mut Client, id: u64, on: &[&pb::Vm], stuck: &[pb::StuckVm]) -> Failure {
    // A VM the cluster did not call stuck stayed for another reason: the
    // node is down (its VMs move by failover, or stay by their policy) or
    // left.
    let status = match c.status(false).await {
        Ok(s) => s.nodes.into_iter().find(|n| n.id == id).map(|n| n.status),
        Err(_) => None,
    };
    let other = match status.as_deref() {
        Some("draining") | None => "did not move".to_string(),
        Some(s) => format!("node {id} is {s}"),
    };
    let reasons: Vec<pb::StuckVm> = on
        .iter()
        .map(|v| match stuck.iter().find(|s| s.name == v.name) {
            Some(s) => s.clone(),
            None => pb::StuckVm { name: v.name.clone(), reason: other.clone() },
        })
        .collect();
    Failure {
        message: format!(
            "drain of node {id} incomplete: {} cannot move: {}",
            count(reasons.len()),
            stuck_text(&reasons)
        ),
        code: EXIT_INCOMPLETE,
    }
}

/// Where the drained VMs are now: "a on node 1, b on node 3, c queued".
fn destinations(seen: &BTreeSet<String>, vms: &[pb::Vm]) -> String {
    if seen.is_empty() {
        return "no VM had to move".to_string();
    }
    let parts: Vec<String> = seen
        .iter()
        .map(|name| match vms.iter().find(|v| &v.name == name) {
            None => format!("{name} deleted"),
            Some(v) if v.node_id != 0 => format!("{name} on node {}", v.node_id),
            Some(v) => format!("{name} {} on no node", v.observed),
        })
        .collect();
    parts.join(", ")
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// `vm migrate`: starts the move; with `--wait`, waits until the VM runs
/// (or, if it is meant to be stopped, is stopped) on another node.
pub async fn migrate(
    c: &mut Client,
    name: String,
    to: Option<u64>,
    wait: WaitOpts,
    id: &str,
) -> Result<(), Failure> {
    let req =
        pb::MigrateVmRequest { name: name.clone(), to_node: to.unwrap_or(0), request_id: id.to_string() };
    let (vm, index) = c.migrate_vm(req).await?;
    let Some(vm) = vm else { return lifecycle::gone(&name, "migrate", id) };
    // A retried request id may find the move done already: its last
    // migration says where from.
    let from = match vm.leaving_node {
        0 => vm.history.iter().rev().find(|m| m.reason == "migrate").map_or(0, |m| m.from_node),
        n => n,
    };
    let running = vm.desired == "running";
    if vm.leaving_node == 0 {
        println!("VM {name} moved from node {from}; it is on node {}", node_cell(vm.node_id));
    } else {
        let target = match vm.moving_to {
            0 => "the node the scheduler picks".to_string(),
            n => format!("node {n}"),
        };
        let then = if running { "" } else { " (it stays stopped there)" };
        println!(
            "VM {name} leaving node {from} for {target}: placed there once node {from} has stopped it{then}"
        );
    }
    if !wait.wait {
        return Ok(());
    }
    let vm = lifecycle::wait_for(c, &name, Goal::Moved { from, running }, wait, index).await?;
    if vm.node_id == 0 {
        println!("VM {name} moved off node {from} (observed: {}, on no node)", vm.observed);
    } else {
        println!("VM {name} moved from node {from} to node {} (observed: {})", vm.node_id, vm.observed);
    }
    Ok(())
}
