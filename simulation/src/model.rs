//! What the client knows: the trace of observable events, and the model of
//! which writes were acknowledged (and so must survive everything).
use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

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
        let s = match r {
            Ok(vm) => return Told::Applied(vm.map(Box::new)),
            Err(s) => s,
        };
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
    pub node_id: u64,
    pub revision: u64,
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
            // AlreadyExists for a name never used before means this one
            // request was applied twice, and the client was told "no" about
            // a write that happened.
            Outcome::Rejected(s) if s.code() == Code::AlreadyExists => panic!(
                "create {name}: AlreadyExists for a name never used before: the request was applied twice \
                 and the client was told it failed ({})",
                s.message()
            ),
            Outcome::Rejected(s) => {
                panic!("create {name}: unexpected rejection {:?}: {}", s.code(), s.message())
            }
            Outcome::Unknown(_) => {
                self.uncertain.insert(name.to_string());
            }
        }
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

    /// Checks one node's full VM list against the model: every acknowledged
    /// VM is there exactly as acknowledged, no acknowledged delete is, and
    /// nothing exists that the client never asked for.
    pub fn check(&self, node: u64, vms: &[pb::Vm]) -> Result<(), String> {
        let by_name: BTreeMap<&str, &pb::Vm> = vms.iter().map(|v| (v.name.as_str(), v)).collect();
        for (name, acked) in &self.live {
            match by_name.get(name.as_str()) {
                None => return Err(format!("n{node}: acknowledged VM {name} is missing")),
                // Later writes to the VM (start/stop requests, its node's
                // status reports) raise its revision; none may lower it.
                Some(vm) if vm.node_id != acked.node_id || vm.revision < acked.revision => {
                    return Err(format!(
                        "n{node}: VM {name} is on n{} at revision {}, but was acknowledged on n{} at revision {}",
                        vm.node_id, vm.revision, acked.node_id, acked.revision
                    ))
                }
                Some(_) => {}
            }
        }
        for name in &self.deleted {
            if by_name.contains_key(name.as_str()) {
                return Err(format!("n{node}: VM {name} exists although its delete was acknowledged"));
            }
        }
        for name in by_name.keys() {
            if !self.live.contains_key(*name) && !self.uncertain.contains(*name) {
                return Err(format!("n{node}: VM {name} exists but was never successfully requested"));
            }
        }
        Ok(())
    }
}
