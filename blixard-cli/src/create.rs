//! `vm create`: one VM, or `--count N` of them in one replicated command;
//! placement rules (pin, constraints, anti-affinity, spread-by, priority);
//! `--queue`; `--dry-run`.
//!
//! Every create goes through `CreateVms` (one VM without `--count`): its
//! answer says where each VM went, whether it was queued and which VMs it
//! preempted, which `CreateVm`'s answer (the VM alone) cannot say.
use std::time::{Duration, Instant};

use blixard_core::types::{Constraint, PortMap, MAX_PRIORITY};
use blixard_core::validate::MAX_BATCH;
use blixard_proto as pb;
use clap::Args;

use crate::client::Client;
use crate::{lifecycle, output, parse_label, Failure, Format, WaitOpts, WriteOpts};

#[derive(Args)]
pub struct CreateArgs {
    /// The VM's name; with --count N, the VMs are NAME-1 ... NAME-N.
    pub name: String,
    #[arg(long, default_value_t = 1)]
    pub vcpus: u32,
    /// Memory in MiB (the default guest image needs at least 80).
    #[arg(long, default_value_t = 128)]
    pub memory: u64,
    /// Data disk in GiB: a virtio-blk disk its node creates (a sparse file,
    /// formatted ext4, mounted at /data in the default image) and keeps
    /// until the VM is deleted; a cold migration copies it. 0: none.
    #[arg(long, default_value_t = 1)]
    pub disk: u64,
    /// Forward the node's TCP HOST_PORT to the VM's GUEST_PORT
    /// (repeatable). A node where HOST_PORT is taken is not a candidate.
    #[arg(long = "publish", short = 'p', value_name = "HOST_PORT:GUEST_PORT", value_parser = parse_publish)]
    pub publish: Vec<String>,
    /// Label KEY=VALUE (repeatable).
    #[arg(long = "label", value_parser = parse_label)]
    pub labels: Vec<(String, String)>,
    #[arg(long, default_value = "")]
    pub tenant: String,
    /// Start it right away (the default).
    #[arg(long, overrides_with = "no_start")]
    pub start: bool,
    /// Create it stopped.
    #[arg(long)]
    pub no_start: bool,
    /// What the node does when it stops running: never, on-failure, always.
    #[arg(long, default_value = "on-failure")]
    pub restart: String,
    /// Guest kernel: a file name in the image directory (--image-dir) of
    /// the node that runs the VM, e.g. `vmlinuz` or `custom/vmlinuz`; never
    /// a host path (no leading '/', no '..'). Default: the built-in image.
    #[arg(long, value_name = "NAME", default_value = "")]
    pub kernel: String,
    /// Guest initrd: a file name in the node's image directory, like
    /// --kernel (needs --kernel).
    #[arg(long, value_name = "NAME", default_value = "")]
    pub initrd: String,
    /// Extra kernel command line.
    #[arg(long, default_value = "")]
    pub cmdline: String,
    /// When its node is marked down: on-node-failure re-places it on
    /// another node; never leaves it there (observed `lost`) until the node
    /// is back.
    #[arg(long, value_name = "POLICY", default_value = "on-node-failure", value_parser = ["on-node-failure", "never"])]
    pub reschedule: String,
    #[command(flatten)]
    pub placement: PlacementOpts,
    /// Create NAME-1 ... NAME-N in one request: all or nothing (unless
    /// --queue), each placed in turn.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..=MAX_BATCH as i64))]
    pub count: Option<u32>,
    /// If a VM fits nowhere, even by preempting lower priorities, queue it:
    /// it is placed when capacity appears (instead of failing with exit 2).
    #[arg(long)]
    pub queue: bool,
    /// Say where each VM would go (or that it would be queued), which VMs
    /// it would preempt, and why; change nothing. Exit 2 if it would not fit.
    #[arg(long, conflicts_with = "wait")]
    pub dry_run: bool,
    #[command(flatten)]
    pub wait: WaitOpts,
    #[command(flatten)]
    pub write: WriteOpts,
    #[arg(short = 'o', long = "output", value_enum, default_value = "table")]
    pub format: Format,
}

/// Where a VM may run. All but --spread-by are hard rules.
#[derive(Args, Clone)]
pub struct PlacementOpts {
    /// Run only on this node.
    #[arg(long = "node", value_name = "ID", value_parser = clap::value_parser!(u64).range(1..))]
    pub node: Option<u64>,
    /// KEY=VALUE: only nodes whose label KEY is VALUE; KEY!=VALUE: only
    /// nodes where it is absent or differs. Repeatable; all must hold.
    #[arg(long = "constraint", value_name = "K=V|K!=V", value_parser = parse_constraint)]
    pub constraints: Vec<String>,
    /// No two VMs of this group on one node.
    #[arg(long, value_name = "GROUP")]
    pub anti_affinity: Option<String>,
    /// Prefer the value of this node label whose nodes hold the fewest VMs
    /// of the same anti-affinity group (or tenant, without a group).
    #[arg(long, value_name = "LABEL")]
    pub spread_by: Option<String>,
    /// 0-100 [default: 50]. A create that fits nowhere may evict VMs of
    /// strictly lower priority (they are queued, never deleted); the queue
    /// places higher priorities first.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(0..=MAX_PRIORITY as i64))]
    pub priority: Option<u32>,
}

/// `--publish`: `HOST_PORT:GUEST_PORT`.
fn parse_publish(s: &str) -> Result<String, String> {
    PortMap::parse(s).map(|p| p.to_string())
}

/// `--constraint`: `K=V` or `K!=V` with a non-empty key (the cluster checks
/// the rest: key and value syntax, how many).
fn parse_constraint(s: &str) -> Result<String, String> {
    match Constraint::parse(s) {
        Some(c) if !c.key.is_empty() => Ok(c.to_string()),
        _ => Err(format!("expected KEY=VALUE or KEY!=VALUE, got {s:?}")),
    }
}

impl PlacementOpts {
    fn to_pb(&self) -> pb::Placement {
        pb::Placement {
            node_id: self.node.unwrap_or(0),
            constraints: self.constraints.clone(),
            anti_affinity: self.anti_affinity.clone().unwrap_or_default(),
            spread_by: self.spread_by.clone().unwrap_or_default(),
            priority: self.priority,
        }
    }
}

impl CreateArgs {
    fn spec(&self) -> pb::VmSpec {
        pb::VmSpec {
            vcpus: self.vcpus,
            memory_mb: self.memory,
            disk_gb: self.disk,
            labels: self.labels.iter().cloned().collect(),
            tenant: self.tenant.clone(),
            restart_policy: self.restart.clone(),
            kernel: self.kernel.clone(),
            initrd: self.initrd.clone(),
            cmdline: self.cmdline.clone(),
        }
    }

    /// NAME, or NAME-1 ... NAME-N with `--count N`.
    fn names(&self) -> Vec<String> {
        match self.count {
            None => vec![self.name.clone()],
            Some(n) => (1..=n).map(|i| format!("{}-{i}", self.name)).collect(),
        }
    }
}

pub async fn run(c: &mut Client, a: CreateArgs) -> Result<(), Failure> {
    let spec = a.spec();
    let placement = a.placement.to_pb();
    let vms = a
        .names()
        .into_iter()
        .map(|name| pb::NewVm {
            name,
            spec: Some(spec.clone()),
            placement: Some(placement.clone()),
            reschedule: a.reschedule.clone(),
            publish: a.publish.clone(),
        })
        .collect();
    let mut req = pb::CreateVmsRequest { vms, no_start: a.no_start, queue: a.queue, ..Default::default() };
    if a.dry_run {
        req.dry_run = true;
        let r = c.create_vms_dry_run(req).await?;
        return output::placed(&r, a.no_start, a.format);
    }
    req.request_id = a.write.id()?;
    let id = req.request_id.clone();
    let r = c.create_vms(req).await?;
    if a.count.is_none() {
        return one(c, &a, &r, &id).await;
    }
    let mut vms = Vec::new();
    if a.wait.wait || a.format == Format::Json {
        vms = created_vms(c, &r, a.wait).await?;
    }
    output::created(&r, &vms, a.no_start, a.format)
}

/// A single create: the VM (after `--wait`), and where it went.
async fn one(c: &mut Client, a: &CreateArgs, r: &pb::CreateVmsResponse, id: &str) -> Result<(), Failure> {
    let Some(vm) = c.find_vm(a.name.clone()).await? else {
        return lifecycle::gone(&a.name, "create", id);
    };
    let vm = if a.wait.wait {
        lifecycle::wait_for(c, &a.name, lifecycle::Goal::of(&vm), a.wait, r.index).await?
    } else {
        vm
    };
    if a.format == Format::Table {
        if let Some(p) = r.placed.first() {
            output::placed_note(p, a.no_start);
        }
    }
    output::vm(&vm, a.format)
}

/// The VMs a `--count` create made, each waited for with `--wait` (one
/// deadline for all); VMs deleted since are left out.
async fn created_vms(
    c: &mut Client,
    r: &pb::CreateVmsResponse,
    wait: WaitOpts,
) -> Result<Vec<pb::Vm>, Failure> {
    let deadline = Instant::now() + Duration::from_secs(wait.timeout);
    let mut out = Vec::with_capacity(r.placed.len());
    if !wait.wait {
        let mut all = c.list_vms(0, false).await?;
        let wanted: std::collections::HashSet<&str> = r.placed.iter().map(|p| p.name.as_str()).collect();
        all.retain(|v| wanted.contains(v.name.as_str()));
        // In the order they were created.
        for p in &r.placed {
            if let Some(i) = all.iter().position(|v| v.name == p.name) {
                out.push(all.swap_remove(i));
            }
        }
        return Ok(out);
    }
    for p in &r.placed {
        let Some(vm) = c.find_vm(p.name.clone()).await? else { continue };
        let left = deadline.saturating_duration_since(Instant::now()).as_secs().max(1);
        let opts = WaitOpts { wait: true, timeout: left };
        out.push(lifecycle::wait_for(c, &p.name, lifecycle::Goal::of(&vm), opts, r.index).await?);
    }
    Ok(out)
}
