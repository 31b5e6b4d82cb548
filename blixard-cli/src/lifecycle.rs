//! VM lifecycle commands and `--wait`: follow the VM's changes (the Watch
//! stream) until what the owning node reports matches what was asked, showing the transitions on a
//! terminal, and fail with the node's reason if the VM fails.
use std::io::{IsTerminal, Write};
use std::time::{Duration, Instant};

use blixard_proto as pb;

use crate::client::{Client, Desire};
use crate::events::Flow;
use crate::output::node_cell;
use crate::{Failure, WaitOpts};

const POLL: Duration = Duration::from_millis(100);

/// What `--wait` waits for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Goal {
    Running,
    Stopped,
    /// Running again, in a run launched after this time (ms since epoch).
    RunningSince(u64),
    /// Off node `from` (no longer leaving it): running on another node, or
    /// stopped if it is meant to be (a stopped VM that moves is left on no
    /// node until it is started).
    Moved {
        from: u64,
        running: bool,
    },
}

impl Goal {
    /// The goal that matches a VM's desired state.
    pub fn of(vm: &pb::Vm) -> Goal {
        if vm.desired == "stopped" {
            Goal::Stopped
        } else {
            Goal::Running
        }
    }

    fn reached(&self, vm: &pb::Vm) -> bool {
        match self {
            Goal::Running => vm.observed == "running",
            Goal::Stopped => vm.observed == "stopped",
            Goal::RunningSince(t) => vm.observed == "running" && vm.started_at_ms >= *t,
            Goal::Moved { from, running: true } => {
                vm.node_id != 0 && vm.node_id != *from && vm.leaving_node == 0 && vm.observed == "running"
            }
            Goal::Moved { from, running: false } => {
                vm.node_id != *from && vm.leaving_node == 0 && vm.observed == "stopped"
            }
        }
    }

    /// Whether a failure of the VM defeats the goal (a VM being stopped may
    /// fail on its way down).
    fn wants_running(&self) -> bool {
        match self {
            Goal::Running | Goal::RunningSince(_) => true,
            Goal::Stopped => false,
            Goal::Moved { running, .. } => *running,
        }
    }

    /// The goal in words, for a timeout.
    fn describe(&self) -> String {
        match self {
            Goal::Running => "running".to_string(),
            Goal::Stopped => "stopped".to_string(),
            Goal::RunningSince(_) => "running again".to_string(),
            Goal::Moved { from, running: true } => format!("running on a node other than {from}"),
            Goal::Moved { from, running: false } => format!("stopped, off node {from}"),
        }
    }
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Follows `name` until `goal`; fails on timeout, if it is deleted, or when the node reports the
/// VM failed after the request (a revision newer than `asked`, so an old
/// failure that a start is about to replace does not count).
pub async fn wait_for(
    c: &mut Client,
    name: &str,
    goal: Goal,
    opts: WaitOpts,
    asked: u64,
) -> Result<pb::Vm, Failure> {
    let tty = std::io::stderr().is_terminal();
    let started = Instant::now();
    let deadline = started + Duration::from_secs(opts.timeout);
    let mut last = (String::new(), u64::MAX);
    // Progress on a terminal; the end, once the VM got there or failed.
    let mut step = |vm: &pb::Vm| -> Option<Result<pb::Vm, Failure>> {
        if (&vm.observed, vm.node_id) != (&last.0, last.1) {
            if tty {
                eprintln!(
                    "{name}: {} (node {}, {:.1}s)",
                    vm.observed,
                    node_cell(vm.node_id),
                    started.elapsed().as_secs_f64()
                );
            }
            last = (vm.observed.clone(), vm.node_id);
        }
        if goal.reached(vm) {
            if tty && vm.boot_ms > 0 && goal.wants_running() {
                eprintln!("{name}: guest ready, boot took {:.2}s", vm.boot_ms as f64 / 1000.0);
            }
            return Some(Ok(vm.clone()));
        }
        if vm.observed == "failed" && goal.wants_running() && vm.revision > asked {
            return Some(Err(Failure::new(format!(
                "VM {name} failed on node {}: {}",
                vm.node_id,
                if vm.reason.is_empty() { "no reason reported" } else { vm.reason.as_str() }
            ))));
        }
        None
    };
    let mut vm = c.get_vm(name.to_string(), false).await?;
    if let Some(end) = step(&vm) {
        return end;
    }
    // Then every change to it, from the Watch stream (no polling): its
    // revision is its last change, so nothing after the read is missed.
    let req = pb::WatchRequest {
        from_revision: vm.revision + 1,
        kinds: vec![pb::WatchKind::Vm as i32],
        vm_name: name.to_string(),
        node_id: 0,
    };
    let mut end = None;
    let follow = crate::events::follow(c, req, Some(Duration::from_secs(opts.timeout)), |m| {
        for e in &m.events {
            let Some(v) = &e.vm else { continue };
            if e.r#type == pb::EventType::Delete as i32 {
                end = Some(Err(Failure::new(format!("VM {name} was deleted while waiting for it"))));
                return Ok(Flow::Stop);
            }
            vm = v.clone();
            if let Some(done) = step(v) {
                end = Some(done);
                return Ok(Flow::Stop);
            }
        }
        Ok(Flow::Continue)
    });
    match tokio::time::timeout_at(deadline.into(), follow).await {
        Ok(Ok(())) => end.unwrap_or_else(|| Err(Failure::new("the watch stream ended without an answer"))),
        Ok(Err(f)) => Err(f),
        Err(_) => Err(Failure::new(format!(
            "VM {name} is {} on node {} after {}s (wanted {}); see `blixard vm status {name}`",
            vm.observed,
            node_cell(vm.node_id),
            opts.timeout,
            goal.describe()
        ))),
    }
}

/// A retried request whose write succeeded earlier, for a VM deleted since.
pub fn gone(name: &str, what: &str, id: &str) -> Result<(), Failure> {
    println!("VM {name}: the {what} under request id {id} succeeded earlier; the VM has since been deleted");
    Ok(())
}

fn done(vm: &pb::Vm, what: &str) -> Result<(), Failure> {
    println!("VM {} {what} (node {}, observed: {})", vm.name, node_cell(vm.node_id), vm.observed);
    Ok(())
}

/// Start, stop or restart `name`; with `--wait`, until the VM gets there.
pub async fn set_desired(
    c: &mut Client,
    verb: Desire,
    name: String,
    wait: WaitOpts,
    id: &str,
) -> Result<(), Failure> {
    let asked = now_ms();
    let (what, goal, done_word) = match verb {
        Desire::Start => ("start", Goal::Running, "started"),
        Desire::Stop => ("stop", Goal::Stopped, "stopped"),
        Desire::Restart => ("restart", Goal::RunningSince(asked), "restarted"),
    };
    let (vm, index) = c.set_desired(verb, &name, id).await?;
    let Some(vm) = vm else { return gone(&name, what, id) };
    if !wait.wait {
        return done(&vm, &format!("{what} requested"));
    }
    let vm = wait_for(c, &name, goal, wait, index).await?;
    done(&vm, done_word)
}

/// The owning node's own view of a VM (what its backend sees right now).
pub async fn local_view(c: &mut Client, vm: &pb::Vm) -> Option<pb::LocalVmResponse> {
    let status = c.status(false).await.ok()?;
    let addr = status.nodes.iter().find(|n| n.id == vm.node_id)?.addr.clone();
    let mut owner = Client::one(&addr).ok()?;
    owner.local_vm(vm.name.clone()).await.ok()
}

pub async fn delete(c: &mut Client, name: String, wait: WaitOpts, id: &str) -> Result<(), Failure> {
    // Learn where it runs before the record disappears.
    let owner = if wait.wait {
        let vm = c.get_vm(name.clone(), false).await?;
        let status = c.status(false).await?;
        status.nodes.iter().find(|n| n.id == vm.node_id).map(|n| (n.id, n.addr.clone()))
    } else {
        None
    };
    c.delete_vm(name.clone(), id).await?;
    if let Some((id, addr)) = owner {
        let deadline = Instant::now() + Duration::from_secs(wait.timeout);
        let mut node = Client::one(&addr)?;
        loop {
            let local = node.local_vm(name.clone()).await?;
            if !local.found {
                break;
            }
            if Instant::now() > deadline {
                return Err(Failure::new(format!(
                    "VM {name} deleted from the cluster, but node {id} still has it ({}) after {}s",
                    local.state, wait.timeout
                )));
            }
            tokio::time::sleep(POLL).await;
        }
        println!("deleted VM {name}; node {id} stopped it and removed its files");
    } else {
        println!("deleted VM {name}");
    }
    Ok(())
}

pub async fn logs(c: &mut Client, name: String, follow: bool) -> Result<(), Failure> {
    let mut offset = 0;
    let mut out = std::io::stdout();
    let mut write =
        |data: &[u8]| out.write_all(data).and_then(|_| out.flush()).map_err(|e| Failure::new(e.to_string()));
    if !follow {
        loop {
            let chunk = c.vm_logs(name.clone(), offset).await?;
            write(&chunk.data)?;
            let more = chunk.next_offset > offset;
            offset = chunk.next_offset;
            if !more {
                return Ok(());
            }
        }
    }
    // Everything from the start, then what the guest writes as it comes,
    // streamed from its node (also before the VM first wrote anything).
    loop {
        let mut stream = c.follow_vm_logs(name.clone(), offset).await?;
        loop {
            match stream.message().await {
                Ok(Some(chunk)) => {
                    write(&chunk.data)?;
                    offset = chunk.next_offset;
                }
                // The VM moved to another node: its console starts over there.
                Err(s)
                    if s.code() == tonic::Code::FailedPrecondition && s.message().contains(" left node ") =>
                {
                    eprintln!("({}; following its console there)", s.message());
                    offset = 0;
                    break;
                }
                Err(s) if matches!(s.code(), tonic::Code::NotFound | tonic::Code::InvalidArgument) => {
                    return Err(crate::client::status_failure(&s));
                }
                // The stream broke (a node stopped, the connection went):
                // resume from the same offset, through another member.
                Ok(None) | Err(_) => {
                    c.skip_member();
                    tokio::time::sleep(Duration::from_millis(500)).await;
                    break;
                }
            }
        }
    }
}
