//! What the client knows: the trace of observable events, and the model of
//! which writes were acknowledged (and so must survive everything).
use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use blixard_core::types::DEFAULT_PRIORITY;
use blixard_proto as pb;
use tonic::{Code, Status};

/// The fate of one client request as the client sees it.
#[derive(Debug)]
pub enum Outcome<T> {
    /// The cluster said yes: the write is committed and must never be lost.
    Acked(T),
    /// The cluster said no, definitely (validation, no capacity, not found):
    /// nothing was changed.
    Rejected(Status),
    /// No verdict (timeout, node died, leadership lost mid-request): the
    /// write may or may not have been applied. Never counted as acknowledged.
    Unknown(Status),
}

impl<T> Outcome<T> {
    /// Sorts a gRPC result into the three fates. Only codes that the node
    /// returns after deciding against the command are definite rejections;
    /// everything else (Unavailable, DeadlineExceeded, transport errors)
    /// leaves the outcome open.
    pub fn from_result(r: Result<T, Status>) -> Self {
        match r {
            Ok(v) => Outcome::Acked(v),
            Err(s) => match s.code() {
                Code::InvalidArgument
                | Code::AlreadyExists
                | Code::NotFound
                | Code::ResourceExhausted
                | Code::FailedPrecondition => Outcome::Rejected(s),
                _ => Outcome::Unknown(s),
            },
        }
    }

    pub fn is_acked(&self) -> bool {
        matches!(self, Outcome::Acked(_))
    }

    /// A short, deterministic description for the trace (codes only: status
    /// messages may embed details that are noise for a trace comparison).
    pub fn label(&self) -> String {
        match self {
            Outcome::Acked(_) => "ok".to_string(),
            Outcome::Rejected(s) => format!("rejected({:?})", s.code()),
            Outcome::Unknown(s) => format!("unknown({:?})", s.code()),
        }
    }
}

/// What a client was told about one write under a request id, read from the
/// `blixard-outcome` metadata that every write error carries.
#[derive(Debug)]
pub enum Told {
    /// Success, or an error saying `applied` (committed, not yet visible on
    /// the contacted node). The reply's VM, when it came with one.
    Applied(Option<Box<pb::Vm>>),
    /// An error saying `rejected`: it did not and will never apply.
    Rejected(Status),
    /// An error saying `unknown`, or no word from the node at all (the
    /// client's own deadline, a connection that failed): it may apply.
    Unknown(Status),
    /// An error from the node without outcome metadata and with a code the
    /// transport never produces: a write error that does not say what
    /// happened. Always a bug.
    Unlabelled(Status),
}

impl Told {
    pub fn from_reply(r: Result<Option<pb::Vm>, Status>) -> Told {
        match r {
            Ok(vm) => Told::Applied(vm.map(Box::new)),
            Err(s) => Told::from_error(s),
        }
    }

    /// For writes whose reply carries no VM (quotas, `node set`).
    pub fn from_result<T>(r: Result<T, Status>) -> Told {
        match r {
            Ok(_) => Told::Applied(None),
            Err(s) => Told::from_error(s),
        }
    }

    fn from_error(s: Status) -> Told {
        let outcome =
            s.metadata().get(blixard_core::node::OUTCOME_KEY).map(|v| v.to_str().unwrap_or("?").to_string());
        match outcome.as_deref() {
            Some("applied") => Told::Applied(None),
            Some("rejected") => Told::Rejected(s),
            Some("unknown") => Told::Unknown(s),
            Some(_) => Told::Unlabelled(s),
            // What a client sees when it never heard from the node: its own
            // deadline, a refused or broken connection.
            None if matches!(
                s.code(),
                Code::DeadlineExceeded | Code::Unavailable | Code::Cancelled | Code::Unknown
            ) =>
            {
                Told::Unknown(s)
            }
            None => Told::Unlabelled(s),
        }
    }

    /// Definitely applied or definitely not.
    pub fn is_definite(&self) -> bool {
        matches!(self, Told::Applied(_) | Told::Rejected(_))
    }

    /// A rejection because no leader took the write (`Unavailable`), as
    /// opposed to the command's own refusal (not found, exists, ...).
    pub fn is_transient_rejection(&self) -> bool {
        matches!(self, Told::Rejected(s) if s.code() == Code::Unavailable)
    }

    /// Short and deterministic, for the trace.
    pub fn label(&self) -> String {
        match self {
            Told::Applied(Some(_)) => "applied".to_string(),
            Told::Applied(None) => "applied(no VM)".to_string(),
            Told::Rejected(s) => format!("rejected({:?})", s.code()),
            Told::Unknown(s) => format!("unknown({:?})", s.code()),
            Told::Unlabelled(s) => format!("UNLABELLED({:?})", s.code()),
        }
    }
}

/// An ordered log of everything observable in one simulated run: requests
/// and their fates, faults injected, leaders seen, final digests. Each event
/// carries the virtual time, so two runs of one seed must produce the very
/// same list — that is the determinism check.
pub struct Trace {
    start: madsim::time::Instant,
    events: Vec<String>,
    /// The state digest all nodes agreed on at the end, once checked.
    pub final_digest: Option<u64>,
    /// Measurements of this run (name, value), reported per seed and
    /// summarised over all seeds by [`crate::seeds::run_seeds`].
    pub figures: Vec<(String, f64)>,
}

impl Trace {
    /// Starts a trace at the current virtual time. Must run inside madsim.
    pub fn new() -> Self {
        Self {
            start: madsim::time::Instant::now(),
            events: Vec::new(),
            final_digest: None,
            figures: Vec::new(),
        }
    }

    pub fn push(&mut self, event: impl fmt::Display) {
        let ms = self.start.elapsed().as_millis();
        let line = format!("{ms:>8}ms {event}");
        tracing::debug!(target: "blixard_sim::trace", "{line}");
        self.events.push(line);
    }

    /// Records a measurement (also as an event, so it is in the trace).
    pub fn figure(&mut self, name: &str, value: f64) {
        self.push(format_args!("figure {name} = {value}"));
        self.figures.push((name.to_string(), value));
    }

    pub fn events(&self) -> &[String] {
        &self.events
    }
}

impl Default for Trace {
    fn default() -> Self {
        Self::new()
    }
}

/// An acknowledged VM as the create reply described it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AckedVm {
    /// Where the reply placed it (0: queued). A placed VM stays there unless
    /// a later create preempts it (its `preempted_by` then says so).
    pub node_id: u64,
    pub revision: u64,
}

/// One VM of a create request, as the client asked for it.
#[derive(Clone, Debug, PartialEq)]
pub struct Asked {
    pub spec: pb::VmSpec,
    /// As the API echoes it back: the priority filled in (50 if left out).
    pub placement: pb::Placement,
    /// Asked for with `queue`.
    pub queue: bool,
    /// The desired state as last acknowledged (true: running); `None` after
    /// a start or stop whose outcome is unknown.
    pub running: Option<bool>,
    /// Its create's reply said it was queued.
    pub queued_at_create: bool,
}

impl Asked {
    pub fn priority(&self) -> u32 {
        self.placement.priority.unwrap_or(u32::from(DEFAULT_PRIORITY))
    }
}

/// One create request: one VM through `CreateVm`, or any number through
/// `CreateVms` (`batch`).
#[derive(Clone, Debug)]
pub struct CreateReq {
    /// The node the client sends it to.
    pub via: u64,
    pub vms: Vec<pb::NewVm>,
    /// Queue what fits nowhere instead of refusing the request.
    pub queue: bool,
    pub batch: bool,
}

impl CreateReq {
    /// One VM without placement rules through `CreateVm`.
    pub fn plain(via: u64, name: String, spec: pb::VmSpec) -> Self {
        CreateReq {
            via,
            vms: vec![pb::NewVm { name, spec: Some(spec), placement: None, ..Default::default() }],
            queue: false,
            batch: false,
        }
    }

    pub fn names(&self) -> Vec<&str> {
        self.vms.iter().map(|v| v.name.as_str()).collect()
    }
}

/// One VM of an acknowledged create request, as the reply tells it.
struct ReplyVm {
    name: String,
    /// Where its create put it (0: queued), if the reply says.
    at_create: Option<u64>,
    /// Where the reply shows it.
    node_id: u64,
    /// Its revision in the reply, if known (else 0).
    revision: u64,
    /// The VMs its create evicted, if the reply says.
    preempted: Vec<String>,
}

/// The answer to a [`CreateReq`].
#[derive(Debug)]
pub enum CreateReply {
    One(Box<pb::VmResponse>),
    Many(pb::CreateVmsResponse),
}

/// How often each scheduling outcome happened in one run: a run that never
/// preempts or queues shows up here.
#[derive(Clone, Debug, Default)]
pub struct Counts {
    /// VMs their create placed on a node, or queued (as the reply told).
    pub placed: u64,
    pub queued: u64,
    /// VMs evicted by creates (as `CreateVms` replies told).
    pub preempted: u64,
    /// Create requests refused because no node fits, over a tenant's quota,
    /// or pinned to a node that does not exist.
    pub no_fit: u64,
    pub over_quota: u64,
    pub unknown_pin: u64,
    /// `node set` applied; refused because a placed VM's constraint would
    /// break; refused because its VMs would no longer fit.
    pub node_set: u64,
    pub breaks_constraint: u64,
    pub below_allocated: u64,
    /// Quotas set; of them, set below what the tenant's VMs might hold.
    pub quota_set: u64,
    pub quota_lowered: u64,
    /// Nodes that joined the running cluster.
    pub joins: u64,
}

impl Counts {
    /// Name and value of every count, in a fixed order.
    pub fn fields(&self) -> [(&'static str, u64); 12] {
        [
            ("placed", self.placed),
            ("queued", self.queued),
            ("preempted", self.preempted),
            ("no_fit", self.no_fit),
            ("over_quota", self.over_quota),
            ("unknown_pin", self.unknown_pin),
            ("node_set", self.node_set),
            ("breaks_constraint", self.breaks_constraint),
            ("below_allocated", self.below_allocated),
            ("quota_set", self.quota_set),
            ("quota_lowered", self.quota_lowered),
            ("joins", self.joins),
        ]
    }
}

impl fmt::Display for Counts {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let parts: Vec<String> = self.fields().iter().map(|(n, v)| format!("{n} {v}")).collect();
        f.write_str(&parts.join(", "))
    }
}

/// What the client knows of one tenant's quota. Quota writes are retried
/// under their request id until their outcome is known, one at a time, so
/// the model knows exactly which limits are in force.
#[derive(Clone, Debug, PartialEq)]
pub enum QuotaFact {
    /// Set to `limits`. The tenant's VMs may hold up to `bound` in each
    /// limited dimension: the limit itself, or more if the limit was set
    /// below what the tenant's VMs might hold at that moment (a quota set
    /// below usage refuses creates but evicts nothing), namely that much.
    Set { limits: pb::QuotaLimits, bound: pb::QuotaLimits },
    /// Deleted: no limit.
    Absent,
    /// A quota write whose outcome stayed unknown: nothing to check.
    Unknown,
}

/// The client's knowledge of which VMs must, must not, or may exist.
///
/// Every create uses a fresh name, so a name's fate is decided by at most
/// one create and one delete.
#[derive(Default)]
pub struct Model {
    /// Acknowledged creates without an acknowledged (or attempted) delete.
    pub live: BTreeMap<String, AckedVm>,
    /// Acknowledged deletes: these names must be gone everywhere.
    pub deleted: BTreeSet<String>,
    /// Writes with an unknown outcome: the VM may or may not exist.
    pub uncertain: BTreeSet<String>,
    /// Creates refused for lack of capacity (legitimate under load).
    pub full: u64,
    /// Every VM sent in a [`CreateReq`], with its spec and placement rules
    /// (scenarios that add to `live` directly leave VMs out of it).
    pub asked: BTreeMap<String, Asked>,
    /// Quota knowledge per tenant; a tenant not here never had a quota.
    pub quotas: BTreeMap<String, QuotaFact>,
    pub counts: Counts,
}

/// Sum of `vms` per tenant (every VM counts, queued or placed).
pub fn usage_of<'a>(vms: impl IntoIterator<Item = &'a pb::VmSpec>) -> BTreeMap<String, pb::TenantUsage> {
    let mut usage: BTreeMap<String, pb::TenantUsage> = BTreeMap::new();
    for spec in vms {
        if spec.tenant.is_empty() {
            continue;
        }
        let u = usage.entry(spec.tenant.clone()).or_default();
        u.vcpus += u64::from(spec.vcpus);
        u.memory_mb += spec.memory_mb;
        u.disk_gb += spec.disk_gb;
        u.vms += 1;
    }
    usage
}

/// Usage against limits, per dimension: (name, used, limit).
fn dims(u: &pb::TenantUsage, l: &pb::QuotaLimits) -> [(&'static str, u64, Option<u64>); 4] {
    [
        ("vcpus", u.vcpus, l.vcpus),
        ("memory_mb", u.memory_mb, l.memory_mb),
        ("disk_gb", u.disk_gb, l.disk_gb),
        ("vms", u.vms, l.vms),
    ]
}

impl Model {
    /// Records the fate of `create name`. Panics on a verdict that no
    /// correct cluster can give for a fresh, valid name.
    pub fn record_create(&mut self, name: &str, outcome: &Outcome<pb::Vm>) {
        match outcome {
            Outcome::Acked(vm) => {
                assert_eq!(vm.name, name, "create of {name} answered with another VM");
                self.live.insert(name.to_string(), AckedVm { node_id: vm.node_id, revision: vm.revision });
            }
            Outcome::Rejected(s) if s.code() == Code::ResourceExhausted => self.full += 1,
            Outcome::Rejected(s) => Self::unexpected(&[name], s),
            Outcome::Unknown(_) => {
                self.uncertain.insert(name.to_string());
            }
        }
    }

    fn unexpected(names: &[&str], s: &Status) -> ! {
        // AlreadyExists for a name never used before means this one request
        // was applied twice, and the client was told "no" about a write
        // that happened.
        if s.code() == Code::AlreadyExists {
            panic!(
                "create {names:?}: AlreadyExists for a name never used before: the request was applied \
                 twice and the client was told it failed ({})",
                s.message()
            );
        }
        panic!("create {names:?}: unexpected rejection {:?}: {}", s.code(), s.message())
    }

    /// Notes what `req` asks for, before it is sent.
    pub fn ask(&mut self, req: &CreateReq) {
        for vm in &req.vms {
            let mut placement = vm.placement.clone().unwrap_or_default();
            placement.priority = Some(placement.priority.unwrap_or(u32::from(DEFAULT_PRIORITY)));
            let asked = Asked {
                spec: vm.spec.clone().unwrap_or_default(),
                placement,
                queue: req.queue,
                running: Some(true),
                queued_at_create: false,
            };
            self.asked.insert(vm.name.clone(), asked);
        }
    }

    /// Records the fate of a create request (asked with [`Model::ask`]);
    /// `unknown_pin` is the index of its first VM pinned to a node that
    /// does not exist. Checks what the reply says against the request: a VM
    /// queued only if the request allowed it, placed on its pinned node,
    /// evicting only strictly lower priorities; refusals only for a reason
    /// the request can have. Returns the reply, described for the trace.
    pub fn record_request(
        &mut self,
        req: &CreateReq,
        unknown_pin: Option<usize>,
        outcome: &Outcome<CreateReply>,
    ) -> String {
        let names = req.names();
        let reply = match outcome {
            Outcome::Acked(reply) => reply,
            Outcome::Unknown(_) => {
                self.uncertain.extend(names.iter().map(|n| n.to_string()));
                return String::new();
            }
            Outcome::Rejected(s) => {
                let reason = s.metadata().get(blixard_core::node::REASON_KEY).and_then(|v| v.to_str().ok());
                match (s.code(), reason) {
                    (Code::ResourceExhausted, Some("quota")) => self.counts.over_quota += 1,
                    // Placement comes after the pin's existence check.
                    (Code::ResourceExhausted, Some("capacity")) if !req.queue && unknown_pin != Some(0) => {
                        self.counts.no_fit += 1;
                        self.full += 1;
                    }
                    (Code::NotFound, _) if unknown_pin.is_some() => self.counts.unknown_pin += 1,
                    _ => Self::unexpected(&names, s),
                }
                return String::new();
            }
        };
        assert!(
            unknown_pin.is_none(),
            "create {names:?}: acknowledged although VM {unknown_pin:?} is pinned to a node that does not exist"
        );
        let mut placed: Vec<ReplyVm> = Vec::new();
        match reply {
            CreateReply::One(resp) => {
                let vm = resp.vm.as_ref().expect("a create reply without its VM");
                assert_eq!(vm.name, names[0], "create of {} answered with another VM", names[0]);
                // The VM as the answering node had it when it answered,
                // maybe after later writes (even in the same log entry:
                // entries carry batches of proposals). Only preemption takes
                // a placed VM off its node, and it says so: without it, an
                // unplaced VM was queued by its create, and a placed one
                // was placed by it or by the queue (both obey the pin).
                let at_apply = vm.preempted_by.is_empty().then_some(vm.node_id);
                placed.push(ReplyVm {
                    name: vm.name.clone(),
                    at_create: at_apply,
                    node_id: vm.node_id,
                    revision: vm.revision,
                    preempted: Vec::new(),
                });
            }
            CreateReply::Many(resp) => {
                let got: Vec<&str> = resp.placed.iter().map(|p| p.name.as_str()).collect();
                assert_eq!(got, names, "CreateVms answered for other VMs");
                for p in &resp.placed {
                    assert_eq!(p.queued, p.node_id == 0, "{}: queued {} on n{}", p.name, p.queued, p.node_id);
                    // No revision: `index` is the log index of the proposal
                    // that answered, which for a retry the cluster
                    // deduplicated is not the one that created the VM.
                    placed.push(ReplyVm {
                        name: p.name.clone(),
                        at_create: Some(p.node_id),
                        node_id: p.node_id,
                        revision: 0,
                        preempted: p.preempted.clone(),
                    });
                }
            }
        }
        let mut detail = Vec::new();
        for ReplyVm { name, at_create: node, node_id, revision, preempted } in placed {
            let asked = self.asked.get_mut(&name).expect("every VM of a request is asked first");
            asked.queued_at_create = node == Some(0);
            let asked = asked.clone();
            match node {
                Some(0) => {
                    assert!(req.queue, "{name} was queued, but its create did not ask for that");
                    self.counts.queued += 1;
                    detail.push(format!("{name}@queued"));
                }
                Some(n) => {
                    let pin = asked.placement.node_id;
                    assert!(pin == 0 || pin == n, "{name} is pinned to n{pin} but was placed on n{n}");
                    self.counts.placed += 1;
                    detail.push(format!("{name}@n{n}"));
                }
                None => detail.push(format!("{name}@later")),
            }
            for victim in &preempted {
                let v = self
                    .asked
                    .get(victim)
                    .unwrap_or_else(|| panic!("{name} evicted {victim}, never asked for"));
                assert!(
                    v.priority() < asked.priority(),
                    "{name} (priority {}) evicted {victim} of priority {}",
                    asked.priority(),
                    v.priority()
                );
                assert!(
                    !self.deleted.contains(victim),
                    "{name} evicted {victim}, whose delete was acknowledged"
                );
                self.counts.preempted += 1;
            }
            if !preempted.is_empty() {
                detail.push(format!("(evicting {})", preempted.join(" ")));
            }
            self.live.insert(name, AckedVm { node_id, revision });
        }
        detail.join(" ")
    }

    /// Records the fate of `delete name` for a VM in `live`.
    pub fn record_delete(&mut self, name: &str, outcome: &Outcome<()>) {
        let was_live = self.live.remove(name).is_some();
        assert!(was_live, "the simulation only deletes acknowledged, live VMs ({name})");
        match outcome {
            Outcome::Acked(()) => {
                self.deleted.insert(name.to_string());
            }
            // Nobody else deletes it, so "not found" means an acknowledged
            // create was lost.
            Outcome::Rejected(s) => {
                panic!("delete {name}: acknowledged VM rejected with {:?}: {}", s.code(), s.message())
            }
            Outcome::Unknown(_) => {
                self.uncertain.insert(name.to_string());
            }
        }
    }

    /// Records the fate of a start (`running`) or stop of a live VM.
    pub fn record_vm_op(&mut self, name: &str, running: bool, outcome: &Outcome<pb::Vm>) {
        let known = match outcome {
            Outcome::Acked(_) => Some(running),
            Outcome::Unknown(_) => None,
            Outcome::Rejected(s) => panic!("start/stop {name}: rejected {:?}: {}", s.code(), s.message()),
        };
        if let Some(a) = self.asked.get_mut(name) {
            a.running = known;
        }
    }

    /// The most tenant `tenant`'s VMs may hold now: every VM of it that
    /// exists or may exist.
    pub fn usage_upper(&self, tenant: &str) -> pb::TenantUsage {
        let specs = self
            .live
            .keys()
            .chain(&self.uncertain)
            .filter_map(|n| self.asked.get(n))
            .map(|a| &a.spec)
            .filter(|s| s.tenant == tenant);
        usage_of(specs).remove(tenant).unwrap_or_default()
    }

    /// Records a quota write retried until definite (or given up on).
    pub fn record_set_quota(&mut self, tenant: &str, limits: pb::QuotaLimits, told: &Told) {
        let fact = match told {
            Told::Applied(_) => {
                let upper = self.usage_upper(tenant);
                let mut bound = limits;
                let lift = |limit: &mut Option<u64>, used: u64| {
                    if let Some(l) = limit {
                        *l = (*l).max(used);
                    }
                };
                lift(&mut bound.vcpus, upper.vcpus);
                lift(&mut bound.memory_mb, upper.memory_mb);
                lift(&mut bound.disk_gb, upper.disk_gb);
                lift(&mut bound.vms, upper.vms);
                self.counts.quota_set += 1;
                if bound != limits {
                    self.counts.quota_lowered += 1;
                }
                QuotaFact::Set { limits, bound }
            }
            Told::Rejected(s) => panic!("set quota {tenant}: rejected {:?}: {}", s.code(), s.message()),
            Told::Unknown(_) => QuotaFact::Unknown,
            Told::Unlabelled(s) => panic!("set quota {tenant}: a write error without outcome: {s:?}"),
        };
        self.quotas.insert(tenant.to_string(), fact);
    }

    /// Records a quota delete retried until definite (or given up on): it
    /// must apply iff the model knows a quota is there.
    pub fn record_delete_quota(&mut self, tenant: &str, told: &Told) {
        let before = self.quotas.get(tenant).cloned().unwrap_or(QuotaFact::Absent);
        let fact = match told {
            Told::Applied(_) => {
                assert!(before != QuotaFact::Absent, "delete quota {tenant}: applied, but there was none");
                QuotaFact::Absent
            }
            Told::Rejected(s) if s.code() == Code::NotFound => {
                assert!(
                    !matches!(before, QuotaFact::Set { .. }),
                    "delete quota {tenant}: not found, but it was set ({before:?})"
                );
                QuotaFact::Absent
            }
            Told::Rejected(s) => panic!("delete quota {tenant}: rejected {:?}: {}", s.code(), s.message()),
            Told::Unknown(_) => QuotaFact::Unknown,
            Told::Unlabelled(s) => panic!("delete quota {tenant}: a write error without outcome: {s:?}"),
        };
        self.quotas.insert(tenant.to_string(), fact);
    }

    /// Checks one node's full VM list against the model: every acknowledged
    /// VM is there as acknowledged (with its spec and placement rules, on
    /// its node unless it was preempted since, in the desired state last
    /// acknowledged), no acknowledged delete is, nothing exists that the
    /// client never asked for, and whoever preempted a VM outranks it.
    pub fn check(&self, node: u64, vms: &[pb::Vm]) -> Result<(), String> {
        let by_name: BTreeMap<&str, &pb::Vm> = vms.iter().map(|v| (v.name.as_str(), v)).collect();
        for (name, acked) in &self.live {
            let Some(vm) = by_name.get(name.as_str()) else {
                return Err(format!("n{node}: acknowledged VM {name} is missing"));
            };
            // Later writes to the VM (start/stop requests, its node's status
            // reports, preemption, the queue, moves) raise its revision; none
            // may lower it. Only preemption and the moves its history records
            // (failover, drain, migration; the oldest dropped past ten) move
            // a placed VM.
            let recorded = vm.history.iter().any(|m| m.from_node == acked.node_id)
                || vm.placement_generation as usize > vm.history.len();
            let moved =
                acked.node_id != 0 && vm.preempted_by.is_empty() && !recorded && vm.node_id != acked.node_id;
            if moved || vm.revision < acked.revision {
                return Err(format!(
                    "n{node}: VM {name} is on n{} at revision {} (preempted by {:?}), but was acknowledged \
                     on n{} at revision {}",
                    vm.node_id, vm.revision, vm.preempted_by, acked.node_id, acked.revision
                ));
            }
        }
        for name in &self.deleted {
            if by_name.contains_key(name.as_str()) {
                return Err(format!("n{node}: VM {name} exists although its delete was acknowledged"));
            }
        }
        for (name, vm) in &by_name {
            if !self.live.contains_key(*name) && !self.uncertain.contains(*name) {
                return Err(format!("n{node}: VM {name} exists but was never successfully requested"));
            }
            // Unplaced: queued if it should run, else stopped. Placed: never queued.
            // (While a migration or drain waits for the old node to stop
            // it: stopping.)
            let unplaced_ok = match vm.desired.as_str() {
                _ if vm.leaving_node != 0 && vm.observed == "stopping" => true,
                "running" => vm.observed == "queued",
                _ => vm.observed == "stopped",
            };
            if (vm.node_id == 0 && !unplaced_ok) || (vm.node_id != 0 && vm.observed == "queued") {
                return Err(format!(
                    "n{node}: VM {name} on n{} is {} (desired {})",
                    vm.node_id, vm.observed, vm.desired
                ));
            }
            let Some(asked) = self.asked.get(*name) else { continue };
            let spec = vm.spec.clone().unwrap_or_default();
            let got = (spec.vcpus, spec.memory_mb, spec.disk_gb, &spec.tenant);
            let want = (asked.spec.vcpus, asked.spec.memory_mb, asked.spec.disk_gb, &asked.spec.tenant);
            if got != want {
                return Err(format!("n{node}: VM {name} holds {got:?}, asked for {want:?}"));
            }
            if vm.placement.as_ref() != Some(&asked.placement) {
                return Err(format!(
                    "n{node}: VM {name} has placement {:?}, asked for {:?}",
                    vm.placement, asked.placement
                ));
            }
            if let Some(running) = asked.running {
                let want = if running { "running" } else { "stopped" };
                if vm.desired != want {
                    return Err(format!("n{node}: VM {name} is desired {}, acknowledged {want}", vm.desired));
                }
            }
            if !vm.preempted_by.is_empty() {
                let by = self.asked.get(&vm.preempted_by).ok_or_else(|| {
                    format!("n{node}: VM {name} was preempted by {}, never asked for", vm.preempted_by)
                })?;
                if by.priority() <= asked.priority() {
                    return Err(format!(
                        "n{node}: VM {name} (priority {}) was preempted by {} of priority {}",
                        asked.priority(),
                        vm.preempted_by,
                        by.priority()
                    ));
                }
            }
        }
        Ok(())
    }

    /// Checks one node's quotas against the model and its VMs: each usage
    /// is what the VMs sum to; every quota the model knows is there with
    /// its limits (and none it knows deleted or never set); no tenant holds
    /// more than its limit, or than it might already hold when its limit
    /// was set below that.
    pub fn check_quotas(&self, node: u64, quotas: &[pb::Quota], vms: &[pb::Vm]) -> Result<(), String> {
        let usage = usage_of(vms.iter().filter_map(|v| v.spec.as_ref()));
        let listed: BTreeMap<&str, &pb::Quota> = quotas.iter().map(|q| (q.tenant.as_str(), q)).collect();
        for q in quotas {
            let want = usage.get(&q.tenant).cloned().unwrap_or_default();
            if q.usage.as_ref() != Some(&want) {
                return Err(format!(
                    "n{node}: tenant {} usage {:?}, its VMs sum to {want:?}",
                    q.tenant, q.usage
                ));
            }
            if !self.quotas.contains_key(&q.tenant) {
                return Err(format!("n{node}: tenant {} has a quota that was never set", q.tenant));
            }
        }
        for (tenant, fact) in &self.quotas {
            let q = listed.get(tenant.as_str());
            match (fact, q) {
                (QuotaFact::Unknown, _) => {}
                (QuotaFact::Absent, None) => {}
                (QuotaFact::Absent, Some(q)) => {
                    return Err(format!("n{node}: tenant {tenant} has quota {:?}, deleted", q.limits))
                }
                (QuotaFact::Set { .. }, None) => {
                    return Err(format!("n{node}: tenant {tenant}'s quota is gone"))
                }
                (QuotaFact::Set { limits, bound }, Some(q)) => {
                    if q.limits.as_ref() != Some(limits) {
                        return Err(format!(
                            "n{node}: tenant {tenant} limits {:?}, set {limits:?}",
                            q.limits
                        ));
                    }
                    let used = usage.get(tenant).cloned().unwrap_or_default();
                    for (dim, u, b) in dims(&used, bound) {
                        if b.is_some_and(|b| u > b) {
                            return Err(format!(
                                "n{node}: tenant {tenant} over its quota: {dim} {u} > {b:?} (limits {limits:?})"
                            ));
                        }
                    }
                }
            }
        }
        Ok(())
    }
}
