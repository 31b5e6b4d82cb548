//! Placement: a pure scheduler that owns its indices.
//!
//! The replicated state keeps a [`Scheduler`] in step with its node and VM
//! tables (apply is its only writer) and asks it where a VM goes. Nothing
//! here reads a clock or the tables themselves, so every replica decides
//! identically, and the unit tests below read like a table.
//!
//! A request passes through feasibility filters (in this order: node
//! active, pin, each constraint, anti-affinity, memory, vCPUs, disk, then
//! the VM network: with one, a subnet with a free address, and every host
//! port the VM publishes free there; see [`crate::vm_net`]), then a
//! ranking, then selection (the shape of Nomad's `feasible/stack.go`):
//!
//! - `spread` (default): the feasible node with the most free memory; ties
//!   go to the lowest id. The free index is ordered exactly that way, so the
//!   first feasible node in it is the answer, and the walk stops as soon as
//!   free memory drops below the request.
//! - `binpack`: the feasible node with the least free memory (ties: lowest
//!   id), walking the same index from the other end.
//! - `spread_by LABEL` first chooses the value of that node label whose
//!   nodes hold the fewest VMs of the request's anti-affinity group (or of
//!   its tenant, without a group), among values with a feasible node (ties:
//!   the smallest value; nodes without the label come last), then applies
//!   the strategy inside it.
//!
//! When nothing is feasible, [`Scheduler::explain`] counts, per filter, the
//! nodes it excluded.
use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt::Write as _;
use std::sync::Arc;

use crate::types::{NodeId, Placement, PortMap, Resources, Strategy, VmRecord};
use crate::vm_net::{NetIndex, NetRefusal};

/// Active nodes ordered by (most free memory, lowest id).
pub type FreeIndex = BTreeSet<(Reverse<u64>, NodeId)>;

/// The queue's order: highest priority, then oldest (log index it entered
/// the queue at), then name.
pub type QueueKey = (Reverse<u8>, u64, Arc<str>);

/// What one VM asks of placement.
#[derive(Clone, Copy, Debug)]
pub struct Request<'a> {
    pub name: &'a str,
    pub need: Resources,
    pub tenant: &'a str,
    pub placement: &'a Placement,
    /// A node it must not go to (the one it is moving off); 0 = none.
    pub avoid: NodeId,
    /// Host ports it publishes: free on the node it goes to.
    pub publish: &'a [PortMap],
}

impl<'a> Request<'a> {
    pub fn of(vm: &'a VmRecord) -> Self {
        Request {
            name: &vm.name,
            need: vm.spec.resources(),
            tenant: &vm.spec.tenant,
            placement: &vm.placement,
            avoid: 0,
            publish: &vm.publish,
        }
    }
}

/// A VM that preemption may evict.
#[derive(Clone, Debug)]
pub struct Victim {
    pub name: Arc<str>,
    pub priority: u8,
    /// Newer VMs are evicted first.
    pub created_at_ms: u64,
    pub need: Resources,
}

/// Why a node cannot take a request: the first filter it fails.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Filter {
    NotActive,
    /// The node the VM is moving off.
    Avoided,
    Pin,
    /// The index of the failed constraint.
    Constraint(usize),
    AntiAffinity,
    Memory,
    Vcpus,
    Disk,
    /// No subnet of the VM network, or no free address in it.
    NoSubnet,
    SubnetFull,
    /// A published host port is taken on the node.
    Port,
}

#[derive(Clone, Debug, PartialEq, Eq)]
struct NodeView {
    free: Resources,
    labels: BTreeMap<String, String>,
    active: bool,
}

#[derive(Default, Debug)]
pub struct Scheduler {
    strategy: Strategy,
    /// Every known node (active or not).
    nodes: HashMap<NodeId, NodeView>,
    /// Active nodes only.
    free: FreeIndex,
    /// Active nodes: label key -> value -> how many nodes carry it.
    label_values: HashMap<String, BTreeMap<String, u32>>,
    /// Placed VMs per anti-affinity group, per node.
    groups: HashMap<String, HashMap<NodeId, u32>>,
    /// Placed VMs per tenant, per node (spread without a group).
    tenants: HashMap<String, HashMap<NodeId, u32>>,
    /// Placed VMs per priority: preemption looks only if some VM has a
    /// lower priority than the request.
    priorities: BTreeMap<u8, u32>,
    queue: BTreeSet<QueueKey>,
    /// Subnets, addresses and published ports per node.
    net: NetIndex,
}

/// Adds one to (or takes one from) `key`'s count, dropping a count that
/// reaches zero; true if it was dropped.
fn bump<K: std::hash::Hash + Eq + Clone>(map: &mut HashMap<K, u32>, key: &K, add: bool) -> bool {
    match map.get_mut(key) {
        Some(c) if add => *c += 1,
        Some(c) => {
            *c -= 1;
            if *c == 0 {
                map.remove(key);
                return true;
            }
        }
        None if add => {
            map.insert(key.clone(), 1);
        }
        None => {}
    }
    false
}

/// Adds or removes one placed VM of `key` on `node` in a per-key count.
fn count_on(map: &mut HashMap<String, HashMap<NodeId, u32>>, key: &str, node: NodeId, add: bool) {
    let emptied = match map.get_mut(key) {
        Some(per_node) => bump(per_node, &node, add) && per_node.is_empty(),
        None if add => {
            map.entry(key.to_string()).or_default().insert(node, 1);
            false
        }
        None => false,
    };
    if emptied {
        map.remove(key);
    }
}

impl Scheduler {
    pub fn new(strategy: Strategy) -> Self {
        Scheduler { strategy, ..Default::default() }
    }

    pub fn strategy(&self) -> Strategy {
        self.strategy
    }

    pub fn set_strategy(&mut self, s: Strategy) -> Strategy {
        std::mem::replace(&mut self.strategy, s)
    }

    /// The VM network's subnets, addresses and published ports.
    pub fn net(&self) -> &NetIndex {
        &self.net
    }

    pub fn net_mut(&mut self) -> &mut NetIndex {
        &mut self.net
    }

    // ------------------------------------------------------------ upkeep

    /// Adds, replaces (`Some`) or forgets (`None`) node `id`.
    pub fn set_node(&mut self, id: NodeId, node: Option<(Resources, &BTreeMap<String, String>, bool)>) {
        if let Some(old) = self.nodes.remove(&id) {
            if old.active {
                self.free.remove(&(Reverse(old.free.memory_mb), id));
                for (k, v) in &old.labels {
                    if let Some(values) = self.label_values.get_mut(k) {
                        if let Some(c) = values.get_mut(v) {
                            *c -= 1;
                            if *c == 0 {
                                values.remove(v);
                            }
                        }
                        if values.is_empty() {
                            self.label_values.remove(k);
                        }
                    }
                }
            }
        }
        let Some((free, labels, active)) = node else { return };
        if active {
            self.free.insert((Reverse(free.memory_mb), id));
            for (k, v) in labels {
                *self.label_values.entry(k.clone()).or_default().entry(v.clone()).or_default() += 1;
            }
        }
        self.nodes.insert(id, NodeView { free, labels: labels.clone(), active });
    }

    /// Node `id`'s free resources changed (a VM came or went).
    pub fn set_free(&mut self, id: NodeId, free: Resources) {
        let Some(n) = self.nodes.get_mut(&id) else { return };
        if n.active && n.free.memory_mb != free.memory_mb {
            self.free.remove(&(Reverse(n.free.memory_mb), id));
            self.free.insert((Reverse(free.memory_mb), id));
        }
        n.free = free;
    }

    /// Counts a VM in (or out of) the per-node group, tenant and priority
    /// counts, if it is placed.
    pub fn count_vm(&mut self, vm: &VmRecord, add: bool) {
        if vm.node_id == 0 {
            return;
        }
        if !vm.placement.anti_affinity.is_empty() {
            count_on(&mut self.groups, &vm.placement.anti_affinity, vm.node_id, add);
        }
        count_on(&mut self.tenants, &vm.spec.tenant, vm.node_id, add);
        let prio = vm.placement.priority;
        match self.priorities.get_mut(&prio) {
            Some(c) if add => *c += 1,
            Some(c) => {
                *c -= 1;
                if *c == 0 {
                    self.priorities.remove(&prio);
                }
            }
            None if add => {
                self.priorities.insert(prio, 1);
            }
            None => {}
        }
    }

    fn queue_key(vm: &VmRecord) -> QueueKey {
        (Reverse(vm.placement.priority), vm.queued_at, vm.name.clone())
    }

    /// Puts a queued VM in (or takes it out of) the queue; one still
    /// stopping on the node it was evicted from waits outside it.
    pub fn queue_vm(&mut self, vm: &VmRecord, add: bool) {
        if !vm.is_placeable() {
            return;
        }
        if add {
            self.queue.insert(Self::queue_key(vm));
        } else {
            self.queue.remove(&Self::queue_key(vm));
        }
    }

    /// The queue, in placement order.
    pub fn queue(&self) -> &BTreeSet<QueueKey> {
        &self.queue
    }

    // ------------------------------------------------------------ decisions

    /// The first filter node `id` fails for `req`, if any. `group` is the
    /// request's anti-affinity group count (looked up once per request).
    fn check(&self, id: NodeId, req: &Request, group: Option<&HashMap<NodeId, u32>>) -> Result<(), Filter> {
        let Some(n) = self.nodes.get(&id) else { return Err(Filter::NotActive) };
        if !n.active {
            return Err(Filter::NotActive);
        }
        if id == req.avoid {
            return Err(Filter::Avoided);
        }
        let p = req.placement;
        if p.node != 0 && p.node != id {
            return Err(Filter::Pin);
        }
        if let Some(i) = p.constraints.iter().position(|c| !c.holds(&n.labels)) {
            return Err(Filter::Constraint(i));
        }
        if group.is_some_and(|g| g.contains_key(&id)) {
            return Err(Filter::AntiAffinity);
        }
        if req.need.memory_mb > n.free.memory_mb {
            return Err(Filter::Memory);
        }
        if req.need.vcpus > n.free.vcpus {
            return Err(Filter::Vcpus);
        }
        if req.need.disk_gb > n.free.disk_gb {
            return Err(Filter::Disk);
        }
        self.net.check(id, req.publish).map_err(|r| match r {
            NetRefusal::NoSubnet => Filter::NoSubnet,
            NetRefusal::Full => Filter::SubnetFull,
            NetRefusal::Port(_) => Filter::Port,
        })
    }

    fn group(&self, req: &Request) -> Option<&HashMap<NodeId, u32>> {
        let g = &req.placement.anti_affinity;
        if g.is_empty() {
            None
        } else {
            self.groups.get(g.as_str())
        }
    }

    /// Whether `req` may go on node `id` now.
    pub fn fits_on(&self, id: NodeId, req: &Request) -> bool {
        self.check(id, req, self.group(req)).is_ok()
    }

    /// The first node, in the strategy's order, with enough free memory for
    /// which `ok` holds.
    fn walk(&self, need_mem: u64, mut ok: impl FnMut(NodeId) -> bool) -> Option<NodeId> {
        match self.strategy {
            Strategy::Spread => {
                for &(Reverse(mem), id) in &self.free {
                    if mem < need_mem {
                        break;
                    }
                    if ok(id) {
                        return Some(id);
                    }
                }
                None
            }
            Strategy::Binpack => {
                // Least free memory first: walk backwards from the first node
                // with enough memory, and among nodes with the same free
                // memory take the lowest id (they come in descending id
                // order here).
                let mut best: Option<(u64, NodeId)> = None;
                for &(Reverse(mem), id) in self.free.range(..=(Reverse(need_mem), NodeId::MAX)).rev() {
                    if best.is_some_and(|(m, _)| m != mem) {
                        break;
                    }
                    if ok(id) {
                        best = Some((mem, id));
                    }
                }
                best.map(|(_, id)| id)
            }
        }
    }

    /// Where `req` goes, or `None` if no node can take it now.
    pub fn place(&self, req: &Request) -> Option<NodeId> {
        let group = self.group(req);
        let p = req.placement;
        if p.node != 0 {
            return self.check(p.node, req, group).is_ok().then_some(p.node);
        }
        if p.spread_by.is_empty() {
            return self.walk(req.need.memory_mb, |id| self.check(id, req, group).is_ok());
        }
        let key = p.spread_by.as_str();
        let label = |id: NodeId| self.nodes.get(&id).and_then(|n| n.labels.get(key)).map(String::as_str);
        // VMs of the same group (or tenant) per value of the label.
        let mut per_value: BTreeMap<&str, u64> = BTreeMap::new();
        if let Some(values) = self.label_values.get(key) {
            per_value.extend(values.keys().map(|v| (v.as_str(), 0)));
        }
        let peers = if p.anti_affinity.is_empty() { self.tenants.get(req.tenant) } else { group };
        for (node, count) in peers.into_iter().flatten() {
            if let Some(c) = label(*node).and_then(|v| per_value.get_mut(v)) {
                *c += u64::from(*count);
            }
        }
        let mut order: Vec<(u64, &str)> = per_value.into_iter().map(|(v, c)| (c, v)).collect();
        order.sort_unstable();
        for (_, value) in order {
            let found = self.walk(req.need.memory_mb, |id| {
                label(id) == Some(value) && self.check(id, req, group).is_ok()
            });
            if found.is_some() {
                return found;
            }
        }
        self.walk(req.need.memory_mb, |id| label(id).is_none() && self.check(id, req, group).is_ok())
    }

    /// Whether any placed VM has a priority below `priority`.
    pub fn may_preempt(&self, priority: u8) -> bool {
        self.priorities.range(..priority).next().is_some()
    }

    /// Where `req` could go by evicting VMs of strictly lower priority from
    /// one node: the node needing the fewest evictions, then the lowest sum
    /// of their priorities, then the lowest id. On a node, victims go in
    /// order of lowest priority, then newest, then name. `victims_on(node)`
    /// lists the VMs placed there. Only nodes that pass every filter but
    /// resources are considered.
    pub fn plan_preemption(
        &self,
        req: &Request,
        mut victims_on: impl FnMut(NodeId) -> Vec<Victim>,
    ) -> Option<(NodeId, Vec<Arc<str>>)> {
        if !self.may_preempt(req.placement.priority) {
            return None;
        }
        let group = self.group(req);
        let mut ids: Vec<NodeId> = self.free.iter().map(|&(_, id)| id).collect();
        ids.sort_unstable();
        // ((victims, their priority sum, node), victims)
        type Ranked = ((usize, u64, NodeId), Vec<Arc<str>>);
        let mut best: Option<Ranked> = None;
        for id in ids {
            match self.check(id, req, group) {
                // Victims keep their address and ports until they have
                // stopped (they leave the node): the request needs its own.
                Err(Filter::Memory | Filter::Vcpus | Filter::Disk)
                    if self.net.check(id, req.publish).is_ok() => {}
                _ => continue,
            }
            let mut victims: Vec<Victim> =
                victims_on(id).into_iter().filter(|v| v.priority < req.placement.priority).collect();
            victims.sort_unstable_by(|a, b| {
                (a.priority, Reverse(a.created_at_ms), &a.name).cmp(&(
                    b.priority,
                    Reverse(b.created_at_ms),
                    &b.name,
                ))
            });
            let mut free = self.nodes[&id].free;
            let mut chosen = Vec::new();
            let mut sum = 0u64;
            for v in victims {
                if req.need.fits_in(&free) {
                    break;
                }
                free = free.saturating_add(&v.need);
                sum += u64::from(v.priority);
                chosen.push((v.name, v.priority, v.need));
            }
            if !req.need.fits_in(&free) {
                continue;
            }
            // Keep no victim that is not needed: going back from the last
            // (highest priority, oldest) one, drop any the request fits
            // without.
            let mut kept: Vec<(Arc<str>, u8, Resources)> = chosen;
            let mut i = kept.len();
            while i > 0 {
                i -= 1;
                let without = free.saturating_sub(&kept[i].2);
                if req.need.fits_in(&without) {
                    free = without;
                    sum -= u64::from(kept[i].1);
                    kept.remove(i);
                }
            }
            let chosen: Vec<Arc<str>> = kept.into_iter().map(|(n, _, _)| n).collect();
            let rank = (chosen.len(), sum, id);
            if best.as_ref().is_none_or(|(r, _)| rank < *r) {
                best = Some((rank, chosen));
            }
        }
        best.map(|((_, _, id), victims)| (id, victims))
    }

    /// Per filter, how many nodes it excludes for `req`, and the most free
    /// memory among the nodes that pass every other filter, e.g. "5 nodes;
    /// 2 excluded by constraint zone=eu, 1 by anti-affinity group web, 2
    /// lack memory (most allocatable free: 512 MiB on node 3)". Counts every
    /// node that has not left; O(nodes), for rejections and dry runs only.
    pub fn explain(&self, req: &Request) -> String {
        let group = self.group(req);
        let mut total = 0usize;
        let mut fit = 0usize;
        let mut by: BTreeMap<Filter, usize> = BTreeMap::new();
        // Most free memory among nodes failing only on resources: (mem, id).
        let mut roomiest: Option<(u64, NodeId)> = None;
        for (&id, n) in &self.nodes {
            if !n.active {
                continue;
            }
            total += 1;
            let verdict = self.check(id, req, group);
            match verdict {
                Ok(()) => fit += 1,
                Err(f) => *by.entry(f).or_default() += 1,
            }
            if matches!(verdict, Ok(()) | Err(Filter::Memory | Filter::Vcpus | Filter::Disk))
                && roomiest.is_none_or(|(m, best)| (n.free.memory_mb, Reverse(id)) > (m, Reverse(best)))
            {
                roomiest = Some((n.free.memory_mb, id));
            }
        }
        let p = req.placement;
        let mut out = format!("{total} node{}", if total == 1 { "" } else { "s" });
        if total == 0 {
            out.push_str(" are active");
            return out;
        }
        let mut sep = "; ";
        let mut excluded_said = false;
        for (f, n) in &by {
            let what = match f {
                Filter::NotActive => "not active".to_string(),
                Filter::Avoided => "is the node it leaves".to_string(),
                Filter::Memory => "lack memory".to_string(),
                Filter::Vcpus => "lack vCPUs".to_string(),
                Filter::Disk => "lack disk".to_string(),
                Filter::NoSubnet => "have no VM subnet".to_string(),
                Filter::SubnetFull => "have no free VM address".to_string(),
                Filter::Port => {
                    let ports: Vec<String> = req.publish.iter().map(|p| p.host.to_string()).collect();
                    format!("have host port {} taken", ports.join(" or "))
                }
                _ => {
                    let rule = match f {
                        Filter::Pin => format!("pin to node {}", p.node),
                        Filter::Constraint(i) => format!("constraint {}", p.constraints[*i]),
                        _ => format!("anti-affinity group {}", p.anti_affinity),
                    };
                    let lead = if excluded_said { "by" } else { "excluded by" };
                    excluded_said = true;
                    format!("{lead} {rule}")
                }
            };
            let _ = write!(out, "{sep}{n} {what}");
            sep = ", ";
        }
        if fit > 0 {
            let _ = write!(out, "{sep}{fit} fit");
        }
        if let Some((mem, id)) = roomiest {
            let _ = write!(out, " (most allocatable free: {mem} MiB on node {id})");
        }
        out
    }

    /// Checks the scheduler against one rebuilt from scratch: same node
    /// views and indices.
    pub fn same_as(&self, other: &Scheduler) -> Result<(), String> {
        let checks = [
            ("node views", self.nodes == other.nodes),
            ("free index", self.free == other.free),
            ("label values", self.label_values == other.label_values),
            ("group counts", self.groups == other.groups),
            ("tenant counts", self.tenants == other.tenants),
            ("priority counts", self.priorities == other.priorities),
            ("queue", self.queue == other.queue),
            ("strategy", self.strategy == other.strategy),
            ("VM network index", self.net == other.net),
        ];
        match checks.iter().find(|(_, same)| !same) {
            Some((what, _)) => Err(format!("scheduler {what} disagrees with the tables")),
            None => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::types::{Constraint, DesiredState, ObservedState, VmSpec};

    /// A cluster: (id, free vcpus, free MiB, labels "k=v,k=v").
    fn cluster(strategy: Strategy, nodes: &[(NodeId, u32, u64, &str)]) -> Scheduler {
        let mut s = Scheduler::new(strategy);
        for &(id, vcpus, mem, labels) in nodes {
            let labels: BTreeMap<String, String> = labels
                .split(',')
                .filter(|l| !l.is_empty())
                .map(|l| {
                    let (k, v) = l.split_once('=').unwrap();
                    (k.to_string(), v.to_string())
                })
                .collect();
            s.set_node(id, Some((Resources::new(vcpus, mem, 100), &labels, true)));
        }
        s
    }

    fn vm(name: &str, node: NodeId, group: &str, priority: u8) -> VmRecord {
        VmRecord {
            name: name.into(),
            spec: VmSpec { vcpus: 1, memory_mb: 256, disk_gb: 1, ..Default::default() },
            node_id: node,
            desired: DesiredState::Running,
            observed: ObservedState::Pending,
            created_at_ms: 0,
            updated_at_ms: 0,
            revision: 0,
            generation: 0,
            runtime: Default::default(),
            placement: Placement { anti_affinity: group.into(), priority, ..Default::default() },
            queued_at: 0,
            preempted_by: String::new(),
            leaving: 0,
            reschedule: Default::default(),
            history: Vec::new(),
            moving: None,
            placement_gen: 0,
            ip: None,
            publish: Vec::new(),
        }
    }

    /// A request: "vcpus/MiB" plus rules: "node=N", "c:K=V", "c:K!=V",
    /// "aa:GROUP", "spread:LABEL", "prio:N".
    fn req_placement(rules: &str) -> Placement {
        let mut p = Placement::default();
        for r in rules.split_whitespace() {
            let (k, v) = r.split_once(':').unwrap();
            match k {
                "node" => p.node = v.parse().unwrap(),
                "c" => p.constraints.push(Constraint::parse(v).unwrap()),
                "aa" => p.anti_affinity = v.into(),
                "spread" => p.spread_by = v.into(),
                "prio" => p.priority = v.parse().unwrap(),
                _ => panic!("{r}"),
            }
        }
        p
    }

    /// The table row: where a request for `need` with `rules` goes (`Ok`),
    /// or the explanation that must be given (`Err`).
    fn check(s: &Scheduler, need: (u32, u64), rules: &str, expected: Result<NodeId, &str>) {
        let p = req_placement(rules);
        let req = Request {
            name: "x",
            need: Resources::new(need.0, need.1, 1),
            tenant: "",
            placement: &p,
            avoid: 0,
            publish: &[],
        };
        match (s.place(&req), expected) {
            (Some(got), Ok(want)) => assert_eq!(got, want, "{need:?} {rules}"),
            (None, Err(want)) => assert_eq!(s.explain(&req), want, "{need:?} {rules}"),
            (got, want) => panic!("{need:?} {rules}: got {got:?}, want {want:?} ({})", s.explain(&req)),
        }
    }

    #[test]
    fn strategies_and_resources() {
        let nodes = [(1, 4, 1000, ""), (2, 4, 2000, ""), (3, 4, 2000, ""), (4, 0, 3000, ""), (5, 4, 400, "")];
        let spread = cluster(Strategy::Spread, &nodes);
        check(&spread, (1, 100), "", Ok(2)); // 4 lacks vCPUs; 2 and 3 tie: lowest id
        check(
            &spread,
            (1, 2500),
            "",
            Err("5 nodes; 4 lack memory, 1 lack vCPUs (most allocatable free: 3000 MiB on node 4)"),
        );
        let binpack = cluster(Strategy::Binpack, &nodes);
        check(&binpack, (1, 300), "", Ok(5));
        check(&binpack, (1, 500), "", Ok(1));
        check(&binpack, (1, 1500), "", Ok(2));
        check(&Scheduler::default(), (1, 1), "", Err("0 nodes are active"));
    }

    #[test]
    fn pins_and_constraints() {
        let s = cluster(
            Strategy::Spread,
            &[(1, 4, 1000, "zone=eu,disk=ssd"), (2, 4, 3000, "zone=us"), (3, 4, 2000, "zone=eu")],
        );
        check(&s, (1, 100), "c:zone=eu", Ok(3));
        check(&s, (1, 100), "c:zone=eu c:disk=ssd", Ok(1));
        check(&s, (1, 100), "c:zone!=eu", Ok(2));
        check(&s, (1, 100), "c:disk!=ssd c:zone=eu", Ok(3));
        check(&s, (1, 100), "node:1", Ok(1));
        check(&s, (1, 1500), "node:1", Err("3 nodes; 2 excluded by pin to node 1, 1 lack memory (most allocatable free: 1000 MiB on node 1)"));
        check(&s, (1, 2500), "c:zone=eu", Err("3 nodes; 1 excluded by constraint zone=eu, 2 lack memory (most allocatable free: 2000 MiB on node 3)"));
        check(&s, (1, 100), "c:zone=ap", Err("3 nodes; 3 excluded by constraint zone=ap"));
    }

    #[test]
    fn anti_affinity_and_spread() {
        let mut s = cluster(
            Strategy::Spread,
            &[
                (1, 8, 4000, "zone=a"),
                (2, 8, 3000, "zone=a"),
                (3, 8, 2000, "zone=b"),
                (4, 8, 1000, "zone=c"),
                (5, 8, 500, ""),
            ],
        );
        s.count_vm(&vm("web-1", 1, "web", 50), true);
        check(&s, (1, 100), "aa:web", Ok(2));
        check(&s, (1, 100), "aa:db", Ok(1));
        // zone a holds one web VM, b and c none: b first (smallest value).
        check(&s, (1, 100), "aa:web spread:zone", Ok(3));
        s.count_vm(&vm("web-2", 3, "web", 50), true);
        check(&s, (1, 100), "aa:web spread:zone", Ok(4));
        s.count_vm(&vm("web-3", 4, "web", 50), true);
        // Every zone holds one: a, and its roomiest node without a web VM.
        check(&s, (1, 100), "aa:web spread:zone", Ok(2));
        s.count_vm(&vm("web-4", 2, "web", 50), true);
        // Every labelled node holds one: the unlabelled node comes last.
        check(&s, (1, 100), "aa:web spread:zone", Ok(5));
        s.count_vm(&vm("web-5", 5, "web", 50), true);
        check(&s, (1, 100), "aa:web", Err("5 nodes; 5 excluded by anti-affinity group web"));
        check(
            &s,
            (1, 3500),
            "c:zone=a aa:web",
            Err("5 nodes; 3 excluded by constraint zone=a, 2 by anti-affinity group web"),
        );
        // Counts go away with the VMs.
        s.count_vm(&vm("web-1", 1, "web", 50), false);
        check(&s, (1, 100), "aa:web", Ok(1));
        // Without a group, spread counts the tenant's VMs: one in each
        // zone now, so zone a, and in it the roomiest node.
        check(&s, (1, 100), "spread:zone", Ok(1));
        s.count_vm(&vm("web-6", 1, "", 50), true);
        check(&s, (1, 100), "spread:zone", Ok(3));
    }

    #[test]
    fn preemption_evicts_fewest_lowest_newest() {
        let s = cluster(Strategy::Spread, &[(1, 8, 500, ""), (2, 8, 300, "")]);
        let v = |name: &str, priority, created_at_ms, mem| Victim {
            name: name.into(),
            priority,
            created_at_ms,
            need: Resources::new(1, mem, 1),
        };
        let mut s = s;
        s.count_vm(&vm("low", 1, "", 10), true);
        let on = |id: NodeId| match id {
            1 => vec![v("a", 10, 1, 200), v("b", 10, 2, 200), v("c", 40, 3, 600)],
            _ => vec![v("d", 20, 1, 400), v("e", 60, 2, 800)],
        };
        let p = Placement { priority: 50, ..Default::default() };
        let req = Request {
            name: "x",
            need: Resources::new(1, 700, 1),
            tenant: "",
            placement: &p,
            avoid: 0,
            publish: &[],
        };
        // One eviction on either node: b (the newer of the two lowest) on
        // node 1, d on node 2; the lower priority wins.
        assert_eq!(s.plan_preemption(&req, on), Some((1, vec!["b".into()])));
        let on2 = |id: NodeId| match id {
            1 => vec![v("a", 30, 1, 200), v("b", 30, 2, 200)],
            _ => vec![v("d", 20, 1, 400)],
        };
        assert_eq!(s.plan_preemption(&req, on2), Some((2, vec!["d".into()])));
        let req = Request { need: Resources::new(1, 900, 1), ..req };
        // Node 1: b (newest of the lowest), a, then c would be needed: 500 +
        // 200 + 200 = 900, two victims. Node 2 cannot (e outranks).
        assert_eq!(s.plan_preemption(&req, on), Some((1, vec!["b".into(), "a".into()])));
        let low = Placement { priority: 10, ..Default::default() };
        let req = Request { placement: &low, ..req };
        assert_eq!(s.plan_preemption(&req, on), None, "only strictly lower priorities");
    }

    #[test]
    fn the_queue_orders_by_priority_then_age() {
        let mut s = Scheduler::default();
        for (name, prio, at) in [("a", 50, 3), ("b", 90, 5), ("c", 50, 2), ("d", 90, 9)] {
            let mut q = vm(name, 0, "", prio);
            q.queued_at = at;
            s.queue_vm(&q, true);
        }
        let order: Vec<&str> = s.queue().iter().map(|(_, _, n)| &**n).collect();
        assert_eq!(order, ["b", "d", "c", "a"]);
    }
}
