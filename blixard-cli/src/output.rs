//! Table and JSON rendering. JSON field names are a contract for scripts.
use blixard_proto as pb;
use comfy_table::{presets::NOTHING, Table};
use serde_json::{json, Value};

use crate::{Failure, Format};

fn print_json(v: &Value) -> Result<(), Failure> {
    println!("{}", serde_json::to_string_pretty(v).map_err(|e| Failure::new(e.to_string()))?);
    Ok(())
}

pub fn table(header: &[&str]) -> Table {
    let mut t = Table::new();
    t.load_style(NOTHING).set_header(header.to_vec());
    t
}

pub fn member_json(m: &pb::Member) -> Value {
    json!({ "id": m.id, "addr": m.addr, "role": m.role })
}

fn res_json(r: &Option<pb::Resources>) -> Value {
    let r = r.unwrap_or_default();
    json!({ "vcpus": r.vcpus, "memory_mb": r.memory_mb, "disk_gb": r.disk_gb })
}

pub fn status(s: &pb::StatusResponse, format: Format) -> Result<(), Failure> {
    if format == Format::Json {
        let nodes: Vec<Value> = s.nodes.iter().map(node_json).collect();
        let mut v = json!({
            "node_id": s.node_id,
            "cluster_id": s.cluster_id,
            "addr": s.addr,
            "data_dir": s.data_dir,
            "state": s.state,
            "leader_id": if s.leader_id == 0 { Value::Null } else { json!(s.leader_id) },
            "term": s.term,
            "commit_index": s.commit_index,
            "applied_index": s.applied_index,
            "last_log_index": s.last_log_index,
            "snapshot_index": s.snapshot_index,
            "members": s.members.iter().map(member_json).collect::<Vec<_>>(),
            "nodes": nodes,
            "vm_count": s.vm_count,
            "vm_backend": s.vm_backend,
            "scheduler": s.scheduler,
            "node_timeout_ms": s.node_timeout_ms,
            "revision": s.revision,
        });
        if s.state_digest != 0 {
            v["state_digest"] = json!(format!("{:016x}", s.state_digest));
        }
        return print_json(&v);
    }
    let leader = if s.leader_id == 0 { "none".to_string() } else { s.leader_id.to_string() };
    println!("node {} ({}) at {}  cluster {}", s.node_id, s.state, s.addr, s.cluster_id);
    println!(
        "leader {leader}  term {}  commit {}  applied {}  log {}  snapshot {}  vms {}  revision {}",
        s.term, s.commit_index, s.applied_index, s.last_log_index, s.snapshot_index, s.vm_count, s.revision
    );
    if s.state_digest != 0 {
        println!("state digest {:016x}", s.state_digest);
    }
    if !s.vm_backend.is_empty() {
        println!("vm backend {}", s.vm_backend);
    }
    if !s.scheduler.is_empty() {
        println!("scheduler {}", s.scheduler);
    }
    if s.node_timeout_ms != 0 {
        println!("node timeout {} (a node silent this long is marked down)", seconds(s.node_timeout_ms));
    }
    let mut t =
        table(&["ID", "ADDR", "ROLE", "STATUS", "HEARTBEAT", "VCPUS", "MEMORY MiB", "DISK GiB", "VMS"]);
    for m in &s.members {
        let n = s.nodes.iter().find(|n| n.id == m.id);
        let used = |f: fn(&pb::Resources) -> u64| n.map(|n| used_of(n, f)).unwrap_or_else(|| "-".into());
        t.add_row(vec![
            m.id.to_string(),
            m.addr.clone(),
            m.role.clone(),
            n.map(|n| n.status.clone()).unwrap_or_else(|| "unregistered".into()),
            n.map(heartbeat_text).unwrap_or_else(|| "-".into()),
            used(|r| r.vcpus as u64),
            used(|r| r.memory_mb),
            used(|r| r.disk_gb),
            n.map(|n| n.vm_count.to_string()).unwrap_or_else(|| "-".into()),
        ]);
    }
    println!("{t}");
    Ok(())
}

/// "allocated/allocatable" of one dimension, for tables.
fn used_of(n: &pb::NodeInfo, f: fn(&pb::Resources) -> u64) -> String {
    let allocatable = n.allocatable.or(n.capacity);
    format!("{}/{}", n.allocated.as_ref().map(f).unwrap_or(0), allocatable.as_ref().map(f).unwrap_or(0))
}

/// Milliseconds as seconds for people: "10s", "2.5s".
pub fn seconds(ms: u64) -> String {
    let frac = format!("{:03}", ms % 1000);
    match frac.trim_end_matches('0') {
        "" => format!("{}s", ms / 1000),
        f => format!("{}.{f}s", ms / 1000),
    }
}

/// Milliseconds since the epoch as "2026-12-03 11:24:45 UTC".
pub fn utc(ms: u64) -> String {
    let secs = ms / 1000;
    let (days, rem) = ((secs / 86_400) as i64, secs % 86_400);
    // The civil date of a day count (Howard Hinnant's `civil_from_days`).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!("{year:04}-{month:02}-{day:02} {:02}:{:02}:{:02} UTC", rem / 3600, rem % 3600 / 60, rem % 60)
}

/// When the leader last heard the node: "0.4s ago", "-" when unknown.
fn heartbeat_text(n: &pb::NodeInfo) -> String {
    match n.last_heartbeat_age_ms {
        None => "-".into(),
        Some(ms) if ms < 60_000 => format!("{:.1}s ago", ms as f64 / 1000.0),
        Some(ms) => format!("{} ago", human(std::time::Duration::from_millis(ms))),
    }
}

/// A node's drain: null unless it has one.
fn drain_json(d: Option<&pb::Drain>) -> Value {
    match d {
        None => Value::Null,
        Some(d) => json!({
            "max_parallel": d.max_parallel,
            "deadline_ms": if d.deadline_ms == 0 { Value::Null } else { json!(d.deadline_ms) },
            "started_at_ms": d.started_at_ms,
        }),
    }
}

/// A drain in one line: how many VMs may move at once, and its deadline.
fn drain_text(d: &pb::Drain) -> String {
    let parallel = match d.max_parallel {
        0 => "all VMs moving at once".to_string(),
        n => format!("at most {n} VM{} moving at once", if n == 1 { "" } else { "s" }),
    };
    let deadline = match d.deadline_ms {
        0 => String::new(),
        t => format!(", deadline {}", utc(t)),
    };
    format!("since {}, {parallel}{deadline}", utc(d.started_at_ms))
}

/// A node as `node get -o json` (and `node list`, `cluster status`) print it.
pub fn node_json(n: &pb::NodeInfo) -> Value {
    let ratio = |r: &str| r.parse::<f64>().map(Value::from).unwrap_or(json!(1.0));
    let labels: std::collections::BTreeMap<&String, &String> = n.labels.iter().collect();
    json!({
        "id": n.id,
        "addr": n.addr,
        "status": n.status,
        "labels": labels,
        "capacity": res_json(&n.capacity),
        "reserved": res_json(&n.reserved),
        "allocatable": res_json(&n.allocatable.or(n.capacity)),
        "allocated": res_json(&n.allocated),
        "cpu_overcommit": ratio(&n.cpu_overcommit),
        "memory_overcommit": ratio(&n.memory_overcommit),
        "vm_count": n.vm_count,
        "registered_at_ms": n.registered_at_ms,
        "updated_at_ms": n.updated_at_ms,
        "last_heartbeat_age_ms": n.last_heartbeat_age_ms,
        "drain": drain_json(n.drain.as_ref()),
        "vm_subnet": if n.vm_subnet.is_empty() { Value::Null } else { json!(n.vm_subnet) },
    })
}

fn labels_text(n: &pb::NodeInfo) -> String {
    let labels: std::collections::BTreeMap<&String, &String> = n.labels.iter().collect();
    let text: Vec<String> = labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
    if text.is_empty() {
        "-".into()
    } else {
        text.join(",")
    }
}

pub fn nodes(nodes: &[pb::NodeInfo], format: Format) -> Result<(), Failure> {
    if format == Format::Json {
        return print_json(&Value::Array(nodes.iter().map(node_json).collect()));
    }
    let mut t = table(&[
        "ID",
        "ADDR",
        "STATUS",
        "HEARTBEAT",
        "VMS",
        "VCPUS",
        "MEMORY MiB",
        "DISK GiB",
        "OVERCOMMIT",
        "LABELS",
    ]);
    for n in nodes {
        let used = |f: fn(&pb::Resources) -> u64| used_of(n, f);
        t.add_row(vec![
            n.id.to_string(),
            n.addr.clone(),
            n.status.clone(),
            heartbeat_text(n),
            n.vm_count.to_string(),
            used(|r| r.vcpus as u64),
            used(|r| r.memory_mb),
            used(|r| r.disk_gb),
            format!("cpu x{} mem x{}", n.cpu_overcommit, n.memory_overcommit),
            labels_text(n),
        ]);
    }
    println!("{t}");
    Ok(())
}

pub fn node(n: &pb::NodeInfo, format: Format) -> Result<(), Failure> {
    if format == Format::Json {
        return print_json(&node_json(n));
    }
    let r = |x: &Option<pb::Resources>| {
        let x = x.unwrap_or_default();
        format!("{} vCPUs, {} MiB, {} GiB", x.vcpus, x.memory_mb, x.disk_gb)
    };
    println!("node {} at {} ({}), {} VMs", n.id, n.addr, n.status, n.vm_count);
    println!("  capacity:    {}", r(&n.capacity));
    println!("  reserved:    {}", r(&n.reserved));
    println!("  overcommit:  cpu x{}, memory x{}", n.cpu_overcommit, n.memory_overcommit);
    println!("  allocatable: {}", r(&n.allocatable.or(n.capacity)));
    println!("  allocated:   {}", r(&n.allocated));
    println!("  labels:      {}", labels_text(n));
    if !n.vm_subnet.is_empty() {
        println!("  vm subnet:   {} (gateway and bridge address: the first host)", n.vm_subnet);
    }
    // Absent from a write's answer (`node set`, `node eligible`).
    if n.last_heartbeat_age_ms.is_some() {
        println!("  heartbeat:   {} (as the leader sees it)", heartbeat_text(n));
    }
    if let Some(d) = &n.drain {
        println!("  drain:       {}", drain_text(d));
    }
    Ok(())
}

pub fn quota_json(q: &pb::Quota) -> Value {
    let l = q.limits.unwrap_or_default();
    let u = q.usage.unwrap_or_default();
    json!({
        "tenant": q.tenant,
        "limits": { "vcpus": l.vcpus, "memory_mb": l.memory_mb, "disk_gb": l.disk_gb, "vms": l.vms },
        "usage": { "vcpus": u.vcpus, "memory_mb": u.memory_mb, "disk_gb": u.disk_gb, "vms": u.vms },
    })
}

fn quota_row(q: &pb::Quota) -> Vec<String> {
    let l = q.limits.unwrap_or_default();
    let u = q.usage.unwrap_or_default();
    let cell = |used: u64, limit: Option<u64>| match limit {
        Some(l) => format!("{used}/{l}"),
        None => format!("{used}/-"),
    };
    vec![
        q.tenant.clone(),
        cell(u.vcpus, l.vcpus),
        cell(u.memory_mb, l.memory_mb),
        cell(u.disk_gb, l.disk_gb),
        cell(u.vms, l.vms),
    ]
}

const QUOTA_HEADER: [&str; 5] = ["TENANT", "VCPUS", "MEMORY MiB", "DISK GiB", "VMS"];

pub fn quota(q: &pb::Quota, format: Format) -> Result<(), Failure> {
    if format == Format::Json {
        return print_json(&quota_json(q));
    }
    let mut t = table(&QUOTA_HEADER);
    t.add_row(quota_row(q));
    println!("{t}");
    Ok(())
}

pub fn quotas(quotas: &[pb::Quota], format: Format) -> Result<(), Failure> {
    if format == Format::Json {
        return print_json(&Value::Array(quotas.iter().map(quota_json).collect()));
    }
    let mut t = table(&QUOTA_HEADER);
    for q in quotas {
        t.add_row(quota_row(q));
    }
    println!("{t}");
    Ok(())
}

pub fn members(members: &[pb::Member], format: Format) -> Result<(), Failure> {
    if format == Format::Json {
        return print_json(&Value::Array(members.iter().map(member_json).collect()));
    }
    let mut t = table(&["ID", "ADDR", "ROLE"]);
    for m in members {
        t.add_row(vec![m.id.to_string(), m.addr.clone(), m.role.clone()]);
    }
    println!("{t}");
    Ok(())
}

pub fn vm_json(v: &pb::Vm) -> Value {
    let spec = v.spec.clone().unwrap_or_default();
    json!({
        "name": v.name,
        "node_id": v.node_id,
        "vcpus": spec.vcpus,
        "memory_mb": spec.memory_mb,
        "disk_gb": spec.disk_gb,
        "tenant": spec.tenant,
        "labels": spec.labels,
        "desired": v.desired,
        "observed": v.observed,
        "created_at_ms": v.created_at_ms,
        "updated_at_ms": v.updated_at_ms,
        "revision": v.revision,
        "restart_policy": spec.restart_policy,
        "kernel": spec.kernel,
        "initrd": spec.initrd,
        "cmdline": spec.cmdline,
        "pid": if v.pid == 0 { Value::Null } else { json!(v.pid) },
        "started_at_ms": if v.started_at_ms == 0 { Value::Null } else { json!(v.started_at_ms) },
        "uptime_s": uptime(v).map(|d| json!(d.as_secs())).unwrap_or(Value::Null),
        "boot_ms": if v.boot_ms == 0 { Value::Null } else { json!(v.boot_ms) },
        "restarts": v.restarts,
        "reason": v.reason,
        "generation": v.generation,
        "placement": placement_json(v.placement.as_ref()),
        "queued_at": if v.queued_at == 0 { Value::Null } else { json!(v.queued_at) },
        "preempted_by": v.preempted_by,
        "leaving_node": if v.leaving_node == 0 { Value::Null } else { json!(v.leaving_node) },
        "reschedule": v.reschedule,
        "history": v.history.iter().map(move_json).collect::<Vec<_>>(),
        "placement_generation": v.placement_generation,
        "moving_reason": if v.moving_reason.is_empty() { Value::Null } else { json!(v.moving_reason) },
        "moving_to": if v.moving_to == 0 { Value::Null } else { json!(v.moving_to) },
        "ip": if v.ip.is_empty() { Value::Null } else { json!(v.ip) },
        "publish": v.publish,
    })
}

/// One move of a VM; `to_node` null when it went to no node (queued since
/// nothing fitted, or stopped).
fn move_json(m: &pb::VmMove) -> Value {
    json!({
        "from_node": m.from_node,
        "to_node": if m.to_node == 0 { Value::Null } else { json!(m.to_node) },
        "reason": m.reason,
        "at_ms": m.at_ms,
        "revision": m.revision,
    })
}

/// "moved from node 2 to node 3 (node-down) at 2026-12-03 11:24:45 UTC".
fn move_text(m: &pb::VmMove) -> String {
    let (from, why, at) = (m.from_node, &m.reason, utc(m.at_ms));
    match m.to_node {
        0 => format!("left node {from} for no node, queued or stopped ({why}) at {at}"),
        to => format!("moved from node {from} to node {to} ({why}) at {at}"),
    }
}

/// Where a VM on its way between nodes is going, if it is.
fn moving_text(v: &pb::Vm) -> Option<String> {
    let from = v.leaving_node;
    if from == 0 || v.moving_reason.is_empty() {
        return None;
    }
    if v.moving_reason == "preempted" {
        return Some(format!(
            "leaving node {from} (preempted); placed or queued once node {from} has stopped it"
        ));
    }
    let to = match v.moving_to {
        0 => "a node the scheduler picks".to_string(),
        n => format!("node {n}"),
    };
    Some(format!(
        "leaving node {from} for {to} ({}); placed once node {from} has stopped it",
        v.moving_reason
    ))
}

/// The VM's failover policy (empty from a server that predates it: the
/// default).
fn reschedule(v: &pb::Vm) -> &str {
    if v.reschedule.is_empty() {
        "on-node-failure"
    } else {
        &v.reschedule
    }
}

/// The failover lines of `vm get` and `vm status`: policy, placement
/// generation, a move in progress and past moves.
fn moves_lines(v: &pb::Vm) -> Vec<String> {
    let mut lines =
        vec![format!("reschedule: {} (placement generation {})", reschedule(v), v.placement_generation)];
    if let Some(m) = moving_text(v) {
        lines.push(format!("moving:     {m}"));
    }
    for m in &v.history {
        lines.push(format!("history:    {}", move_text(m)));
    }
    lines
}

/// A VM's placement rules: `node_id` null unless pinned, `anti_affinity`
/// and `spread_by` empty when unset.
pub fn placement_json(p: Option<&pb::Placement>) -> Value {
    let p = p.cloned().unwrap_or_default();
    json!({
        "node_id": if p.node_id == 0 { Value::Null } else { json!(p.node_id) },
        "constraints": p.constraints,
        "anti_affinity": p.anti_affinity,
        "spread_by": p.spread_by,
        "priority": priority(&p),
    })
}

fn priority(p: &pb::Placement) -> u32 {
    p.priority.unwrap_or(u32::from(blixard_core::types::DEFAULT_PRIORITY))
}

/// The placement rules in one line ("-" when there are none besides the
/// default priority).
fn placement_text(p: Option<&pb::Placement>) -> String {
    let p = p.cloned().unwrap_or_default();
    let mut parts = Vec::new();
    if p.node_id != 0 {
        parts.push(format!("node {}", p.node_id));
    }
    parts.extend(p.constraints.iter().cloned());
    if !p.anti_affinity.is_empty() {
        parts.push(format!("anti-affinity {}", p.anti_affinity));
    }
    if !p.spread_by.is_empty() {
        parts.push(format!("spread by {}", p.spread_by));
    }
    parts.push(format!("priority {}", priority(&p)));
    parts.join(", ")
}

/// A VM's node for tables: "-" when it is on none (queued or unplaced).
pub fn node_cell(id: u64) -> String {
    if id == 0 {
        "-".into()
    } else {
        id.to_string()
    }
}

/// The observed state, with the preemptor when it was preempted.
fn observed_cell(v: &pb::Vm) -> String {
    if v.preempted_by.is_empty() {
        v.observed.clone()
    } else {
        format!("{} (preempted by {})", v.observed, v.preempted_by)
    }
}

/// How long the VM has been running, if it is.
fn uptime(v: &pb::Vm) -> Option<std::time::Duration> {
    if v.observed != "running" || v.started_at_ms == 0 {
        return None;
    }
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).ok()?.as_millis() as u64;
    Some(std::time::Duration::from_millis(now.saturating_sub(v.started_at_ms)))
}

fn human(d: std::time::Duration) -> String {
    let s = d.as_secs();
    match s {
        0..=59 => format!("{s}s"),
        60..=3599 => format!("{}m{}s", s / 60, s % 60),
        3600..=86399 => format!("{}h{}m", s / 3600, (s % 3600) / 60),
        _ => format!("{}d{}h", s / 86400, (s % 86400) / 3600),
    }
}

/// `vm status`: the record, the node's last report, and what the owning
/// node's backend sees right now.
pub fn vm_status(v: &pb::Vm, local: Option<&pb::LocalVmResponse>, format: Format) -> Result<(), Failure> {
    if format == Format::Json {
        let mut j = vm_json(v);
        j["local"] = match local {
            Some(l) => {
                json!({ "found": l.found, "state": l.state, "pid": l.pid, "reason": l.reason, "node_id": l.node_id })
            }
            None => Value::Null,
        };
        return print_json(&j);
    }
    let spec = v.spec.clone().unwrap_or_default();
    println!("name:      {}", v.name);
    println!("node:      {}", node_cell(v.node_id));
    println!("desired:   {}", v.desired);
    println!("observed:  {}", v.observed);
    let moving = moving_text(v);
    if v.queued_at != 0 && moving.is_none() {
        println!("queued:    since log index {}; placed when capacity appears", v.queued_at);
    }
    if !v.preempted_by.is_empty() {
        println!("preempted: by {} (the last time it was evicted)", v.preempted_by);
    }
    if let Some(m) = moving {
        println!("moving:    {m}");
    } else if v.leaving_node != 0 {
        println!(
            "leaving:   node {} has not yet reported it stopped; placed nowhere else until then",
            v.leaving_node
        );
    }
    println!("placement: {}", placement_text(v.placement.as_ref()));
    if !v.reason.is_empty() {
        println!("reason:    {}", v.reason);
    }
    println!("resources: {} vCPUs, {} MiB, {} GiB", spec.vcpus, spec.memory_mb, spec.disk_gb);
    println!("restart:   {} (restarts so far: {})", spec.restart_policy, v.restarts);
    println!("failover:  reschedule {} (placement generation {})", reschedule(v), v.placement_generation);
    for m in &v.history {
        println!("history:   {}", move_text(m));
    }
    if v.pid != 0 {
        println!("pid:       {}", v.pid);
    }
    if let Some(u) = uptime(v) {
        println!("uptime:    {}", human(u));
    }
    if v.boot_ms != 0 {
        println!("boot:      {:.2}s to the guest's ready marker", v.boot_ms as f64 / 1000.0);
    }
    let image = if spec.kernel.is_empty() { "default guest image".to_string() } else { spec.kernel.clone() };
    println!("image:     {image}");
    match local {
        Some(l) if l.found => println!(
            "on node {}: {} (pid {}){}",
            l.node_id,
            l.state,
            l.pid,
            if l.reason.is_empty() { String::new() } else { format!(": {}", l.reason) }
        ),
        Some(l) => println!("on node {}: no trace of it", l.node_id),
        None if v.node_id == 0 => println!("on no node: not placed"),
        None => println!("on node {}: unreachable", v.node_id),
    }
    Ok(())
}

fn vm_row(v: &pb::Vm) -> Vec<String> {
    let spec = v.spec.clone().unwrap_or_default();
    vec![
        v.name.clone(),
        node_cell(v.node_id),
        spec.vcpus.to_string(),
        spec.memory_mb.to_string(),
        spec.disk_gb.to_string(),
        v.desired.clone(),
        observed_cell(v),
        uptime(v).map(human).unwrap_or_else(|| "-".into()),
        v.restarts.to_string(),
        if v.ip.is_empty() { "-".into() } else { v.ip.clone() },
        if v.publish.is_empty() { "-".into() } else { v.publish.join(",") },
    ]
}

const VM_HEADER: [&str; 11] = [
    "NAME",
    "NODE",
    "VCPUS",
    "MEMORY MiB",
    "DISK GiB",
    "DESIRED",
    "OBSERVED",
    "UPTIME",
    "RESTARTS",
    "IP",
    "PUBLISH",
];

pub fn vm(v: &pb::Vm, format: Format) -> Result<(), Failure> {
    if format == Format::Json {
        return print_json(&vm_json(v));
    }
    let mut t = table(&VM_HEADER);
    t.add_row(vm_row(v));
    println!("{t}");
    for line in moves_lines(v) {
        println!("{line}");
    }
    Ok(())
}

pub fn vms(list: &[pb::Vm], format: Format) -> Result<(), Failure> {
    if format == Format::Json {
        return print_json(&Value::Array(list.iter().map(vm_json).collect()));
    }
    let mut t = table(&VM_HEADER);
    for v in list {
        t.add_row(vm_row(v));
    }
    println!("{t}");
    Ok(())
}

/// Where one VM of a create went (or would go), as JSON.
pub fn placed_json(p: &pb::PlacedVm) -> Value {
    json!({ "name": p.name, "node_id": p.node_id, "queued": p.queued, "preempted": p.preempted })
}

/// What became of a VM that fits nowhere: queued to run, or (created
/// stopped) simply left without a node.
fn unplaced_word(no_start: bool) -> &'static str {
    if no_start {
        "unplaced"
    } else {
        "queued"
    }
}

fn placed_table(r: &pb::CreateVmsResponse, no_start: bool) -> Table {
    let mut t = table(&["NAME", "NODE", "STATE", "PREEMPTED"]);
    for p in &r.placed {
        t.add_row(vec![
            p.name.clone(),
            node_cell(p.node_id),
            if p.queued { unplaced_word(no_start) } else { "placed" }.to_string(),
            if p.preempted.is_empty() { "-".to_string() } else { p.preempted.join(",") },
        ]);
    }
    t
}

/// Notes under a create's placements: what queued and preempted mean.
fn placed_notes(placed: &[pb::PlacedVm], no_start: bool) {
    let queued = placed.iter().filter(|p| p.queued).count();
    if queued > 0 && no_start {
        println!("{queued} unplaced: no node fits them now; created stopped, `vm start` queues each");
    } else if queued > 0 {
        println!("{queued} queued: no node fits them now; each starts when capacity appears");
    }
    let preempted: Vec<&str> = placed.iter().flat_map(|p| &p.preempted).map(String::as_str).collect();
    if !preempted.is_empty() {
        println!("{}", preempted_note(&preempted));
    }
}

fn preempted_note(names: &[&str]) -> String {
    format!(
        "preempted {}: evicted for a higher priority, never deleted; queued until capacity appears unless placed elsewhere (see `blixard vm list`)",
        names.join(", ")
    )
}

/// A dry run's answer: where each VM would go, what it would preempt, and
/// the scheduler's explanation.
pub fn placed(r: &pb::CreateVmsResponse, no_start: bool, format: Format) -> Result<(), Failure> {
    if format == Format::Json {
        return print_json(&json!({
            "dry_run": r.dry_run,
            "placed": r.placed.iter().map(placed_json).collect::<Vec<_>>(),
            "explanation": r.explanation,
        }));
    }
    let n = r.placed.len();
    println!("dry run, nothing changed: {n} VM{} would be created", if n == 1 { "" } else { "s" });
    println!("{}", placed_table(r, no_start));
    if let Some(first) = r.placed.first() {
        let whom = if n == 1 { first.name.clone() } else { format!("{}, the first", first.name) };
        println!("scheduler ({whom}): {}", r.explanation);
    }
    Ok(())
}

/// Where a single created VM went, before its table.
pub fn placed_note(p: &pb::PlacedVm, no_start: bool) {
    if !p.queued {
        println!("VM {} placed on node {}", p.name, p.node_id);
    } else if no_start {
        println!("VM {} unplaced: no node fits now; created stopped, `vm start` queues it", p.name);
    } else {
        println!("VM {} queued: no node fits now; it starts when capacity appears", p.name);
    }
    if !p.preempted.is_empty() {
        let names: Vec<&str> = p.preempted.iter().map(String::as_str).collect();
        println!("{}", preempted_note(&names));
    }
}

/// A `--count` create: where each VM went and, in JSON, the VMs.
pub fn created(
    r: &pb::CreateVmsResponse,
    vms: &[pb::Vm],
    no_start: bool,
    format: Format,
) -> Result<(), Failure> {
    if format == Format::Json {
        return print_json(&json!({
            "dry_run": false,
            "placed": r.placed.iter().map(placed_json).collect::<Vec<_>>(),
            "vms": vms.iter().map(vm_json).collect::<Vec<_>>(),
        }));
    }
    let n = r.placed.len();
    println!("created {n} VM{}", if n == 1 { "" } else { "s" });
    println!("{}", placed_table(r, no_start));
    placed_notes(&r.placed, no_start);
    if !vms.is_empty() {
        let mut t = table(&VM_HEADER);
        for v in vms {
            t.add_row(vm_row(v));
        }
        println!("{t}");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::{seconds, utc};

    #[test]
    fn times_read_as_people_write_them() {
        assert_eq!(utc(0), "1970-01-01 00:00:00 UTC");
        assert_eq!(utc(951_825_600_000), "2000-02-29 12:00:00 UTC");
        assert_eq!(utc(1_796_297_085_999), "2026-12-03 11:24:45 UTC");
        assert_eq!(seconds(10_000), "10s");
        assert_eq!(seconds(2_500), "2.5s");
        assert_eq!(seconds(125), "0.125s");
    }
}
