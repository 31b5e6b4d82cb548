//! Storage: the Raft log and vote survive a restart, snapshots round-trip,
//! the data dir keeps its identity, and the log writer groups commits.
//!
//!   cargo test -p blixard-core --test storage
//!
//! Most tests drive a real single-node `Node` (openraft's `LogFlushed`
//! callback cannot be built outside openraft, so appends are exercised
//! through Raft itself); the state machine and the log's vote / committed /
//! purge paths are also exercised directly.
use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use blixard_core::command::{Command, CommandOutput, CommandResult, Proposal, ProposalBatch};
use blixard_core::node::identity::IdentityError;
use blixard_core::node::{Node, NodeConfig, NodeError};
use blixard_core::raft::log_store::LogStore;
use blixard_core::raft::state_machine::StateMachineStore;
use blixard_core::raft::{Entry, LogId, RaftTuning, Vote};
use blixard_core::state::{ClusterState, StateImage};
use blixard_core::types::{NodeId, NodeResources, Resources, VmSpec};
use openraft::storage::{RaftLogStorage, RaftStateMachine};
use openraft::{CommittedLeaderId, EntryPayload, Membership, RaftSnapshotBuilder};

const DEADLINE: Duration = Duration::from_secs(30);

use blixard_core::test_support::free_port;

fn tuning(snapshot_every: u64, keep_behind_snapshot: u64) -> RaftTuning {
    RaftTuning {
        heartbeat: Duration::from_millis(50),
        election_timeout_min: Duration::from_millis(200),
        election_timeout_max: Duration::from_millis(400),
        snapshot_every,
        keep_behind_snapshot,
        ..Default::default()
    }
}

fn config(id: NodeId, port: u16, dir: &Path, tuning: RaftTuning) -> NodeConfig {
    NodeConfig {
        id,
        bind: format!("127.0.0.1:{port}").parse().unwrap(),
        advertise: None,
        peer_port: Some(0),
        data_dir: dir.to_path_buf(),
        join: None,
        resources: NodeResources::plain(Resources::new(1024, 1 << 20, 10_000)),
        labels: BTreeMap::new(),
        tuning,
        vm_backend: None,
        reconciler: Default::default(),
        meter: None,
        join_token: None,
        tls: None,
        vm_cidr: None,
        vm_network: Err("tests run VMs without a NIC".into()),
    }
}

fn small_vm(name: &str) -> Command {
    Command::CreateVm {
        name: name.to_string(),
        spec: VmSpec { vcpus: 1, memory_mb: 64, disk_gb: 1, ..Default::default() },
        start: true,
    }
}

/// Polls `f` every 20 ms until it yields a value; panics after DEADLINE.
async fn wait_for<T>(what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = tokio::time::Instant::now() + DEADLINE;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(tokio::time::Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn start(cfg: NodeConfig) -> Node {
    match Node::start(cfg).await {
        Ok(n) => n,
        Err(e) => panic!("node failed to start: {e}"),
    }
}

/// Starts a node on a data dir whose previous node was just shut down in
/// this process. `Node::shutdown` returns before the log writer task has
/// released the redb file (it exits a few ms later, once it sees its channel
/// closed), so an immediate restart fails with "Database already open"; this
/// retries that one error for a bounded time. See
/// `restart_immediately_after_shutdown` for the test that pins the issue.
async fn restart(cfg: NodeConfig) -> Node {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        match Node::start(cfg.clone()).await {
            Ok(n) => return n,
            Err(NodeError::Log { reason, .. })
                if reason.contains("already open") && tokio::time::Instant::now() < deadline =>
            {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            Err(e) => panic!("node failed to restart: {e}"),
        }
    }
}

/// Starts the node and waits until it leads and its capacity is registered.
async fn start_ready(cfg: NodeConfig) -> Node {
    let node = start(cfg).await;
    let shared = node.shared().clone();
    wait_for("leadership", || shared.is_leader().then_some(())).await;
    wait_for("node registration", || shared.state.with_node(shared.id, |_| ())).await;
    node
}

/// What a test remembers of a node right before shutting it down.
struct Before {
    image: StateImage,
    digest: u64,
    term: u64,
    vote: Vote,
    last_applied: LogId,
    snapshot: Option<LogId>,
    purged: Option<LogId>,
    cluster_id: String,
}

fn observe(node: &Node) -> Before {
    let s = node.shared();
    let m = s.raft.metrics().borrow().clone();
    Before {
        image: s.state.image(),
        digest: s.state.digest(),
        term: m.current_term,
        vote: m.vote,
        last_applied: m.last_applied.expect("something was applied"),
        snapshot: m.snapshot,
        purged: m.purged,
        cluster_id: s.cluster_id.to_string(),
    }
}

/// Proposes `creates` VM creations and then deletes every `delete_every`-th
/// one, one at a time. Returns (names alive, names deleted), counting only
/// acknowledged writes.
async fn write_vms(
    node: &Node,
    prefix: &str,
    creates: usize,
    delete_every: usize,
) -> (BTreeSet<String>, BTreeSet<String>) {
    let shared = node.shared();
    let mut alive = BTreeSet::new();
    let mut deleted = BTreeSet::new();
    for i in 0..creates {
        let name = format!("{prefix}-{i:04}");
        match shared.propose(small_vm(&name)).await {
            Ok(a) => {
                assert!(matches!(a.output, CommandOutput::VmCreated { .. }), "{:?}", a.output);
                alive.insert(name);
            }
            Err(e) => panic!("create {name} failed: {e}"),
        }
    }
    for (i, name) in alive.clone().iter().enumerate() {
        if i % delete_every == 0 {
            let a = shared.propose(Command::DeleteVm { name: name.clone() }).await.expect("delete");
            assert!(matches!(a.output, CommandOutput::VmDeleted { .. }), "{:?}", a.output);
            alive.remove(name);
            deleted.insert(name.clone());
        }
    }
    (alive, deleted)
}

/// Restarts on the same data dir and checks that nothing acknowledged was
/// lost: every live VM present, every deleted one absent, the same state
/// digest, term and vote not regressed, the same identity.
async fn restart_and_check(
    cfg: NodeConfig,
    before: &Before,
    alive: &BTreeSet<String>,
    deleted: &BTreeSet<String>,
) -> Node {
    let node = restart(cfg.clone()).await;
    let shared = node.shared().clone();
    assert_eq!(node.id(), cfg.id, "node id changed across restart");
    assert_eq!(&*shared.cluster_id, before.cluster_id, "cluster id changed across restart");
    wait_for("leadership after restart", || shared.is_leader().then_some(())).await;
    wait_for("replay up to the pre-restart index", || {
        let m = shared.raft.metrics().borrow().clone();
        m.last_applied.filter(|l| l.index >= before.last_applied.index).map(|_| ())
    })
    .await;
    // The node re-registers on every start, which only bumps its record's
    // `updated_at_ms` and appends one request to the dedup window. Wait for
    // that, so the state is settled, then compare.
    let old_updated = before.image.nodes.iter().find(|n| n.id == cfg.id).expect("node record").updated_at_ms;
    wait_for("re-registration", || {
        shared.state.with_node(cfg.id, |n| n.updated_at_ms).filter(|t| *t > old_updated)
    })
    .await;

    for name in alive {
        assert!(shared.state.with_vm(name, |_| ()).is_some(), "acknowledged VM {name} lost by restart");
    }
    for name in deleted {
        assert!(shared.state.with_vm(name, |_| ()).is_none(), "deleted VM {name} came back after restart");
    }
    assert_eq!(shared.state.vm_count(), alive.len());
    let mut image = shared.state.image();
    assert_eq!(image.vms, before.image.vms, "VM records differ after restart");
    for n in &mut image.nodes {
        let old = before.image.nodes.iter().find(|o| o.id == n.id).expect("no new nodes appear");
        n.updated_at_ms = old.updated_at_ms;
    }
    let n = before.image.requests.len();
    assert_eq!(image.requests.len(), n + 1, "only the re-registration joins the dedup window");
    assert_eq!(image.requests[..n], before.image.requests[..], "dedup window differs after restart");
    image.requests.truncate(n);
    assert_eq!(image, before.image, "state differs after restart (beyond the re-registration)");
    let normalised = ClusterState::new();
    normalised.restore(image, 0);
    assert_eq!(normalised.digest(), before.digest, "state digest differs after restart");
    shared.state.check_invariants().expect("invariants after restart");

    let m = shared.raft.metrics().borrow().clone();
    assert!(m.current_term >= before.term, "term went back: {} -> {}", before.term, m.current_term);
    assert!(m.vote >= before.vote, "vote went back: {} -> {}", before.vote, m.vote);
    assert_eq!(m.id, cfg.id);
    node
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_replays_the_log() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(1, free_port(), dir.path(), tuning(10_000, 1_000));
    let node = start_ready(cfg.clone()).await;
    let (alive, deleted) = write_vms(&node, "vm-log", 12, 4).await;
    assert_eq!((alive.len(), deleted.len()), (9, 3));
    let before = observe(&node);
    assert!(before.snapshot.is_none() && before.purged.is_none(), "no snapshot expected yet");
    assert!(!dir.path().join("snapshot.bin").exists());
    node.shutdown().await;
    drop(node);

    let node = restart_and_check(cfg, &before, &alive, &deleted).await;
    // Still writable, and the log continues past the replayed entries.
    let a = node.shared().propose(small_vm("vm-after-restart")).await.expect("write after restart");
    assert!(a.index > before.last_applied.index);
    node.shutdown().await;
}

/// A leader reports its own entries flushed before their `fdatasync`
/// (log_store/early.rs), so one that died may have lost entries its
/// followers hold. Restarted, it must not resume leading its old term:
/// its next entries would take those indexes under the same leader id and
/// the followers would keep theirs (replicas diverged this way in the
/// simulator). It leads again from a new term, and its entries carry it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_leader_leads_again_only_from_a_new_term() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(1, free_port(), dir.path(), tuning(10_000, 1_000));
    let node = start_ready(cfg.clone()).await;
    node.shared().propose(small_vm("vm-before")).await.expect("write before restart");
    let before = node.shared().raft.metrics().borrow().clone();
    assert!(before.vote.is_committed() && before.vote.leader_id().voted_for() == Some(1));
    node.shutdown().await;
    drop(node);

    let node = restart(cfg).await;
    let shared = node.shared().clone();
    wait_for("leadership after restart", || shared.is_leader().then_some(())).await;
    let after = shared.raft.metrics().borrow().clone();
    assert!(
        after.current_term > before.current_term,
        "the restarted leader resumed term {} instead of winning a new one",
        before.current_term
    );
    shared.propose(small_vm("vm-after")).await.expect("write after restart");
    let entry_term = shared.raft.metrics().borrow().last_applied.map(|l| l.leader_id.term);
    assert_eq!(entry_term, Some(after.current_term), "the new entries carry the new term");
    node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_from_snapshot_and_log() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(1, free_port(), dir.path(), tuning(20, 5));
    let node = start_ready(cfg.clone()).await;
    let (mut alive, deleted) = write_vms(&node, "vm-snap", 60, 4).await;
    let shared = node.shared().clone();
    // Snapshots are built in the background: wait until one covers most of
    // the log and the log behind it has been purged.
    wait_for("a snapshot and a purge", || {
        let m = shared.raft.metrics().borrow().clone();
        let applied = m.last_applied?.index;
        let snap = m.snapshot?.index;
        (applied - snap < 20 && m.purged.is_some()).then_some(())
    })
    .await;
    // A few entries after the snapshot, so the restart needs snapshot + log.
    for i in 0..3 {
        let name = format!("vm-tail-{i}");
        shared.propose(small_vm(&name)).await.expect("tail write");
        alive.insert(name);
    }
    let before = observe(&node);
    let snap = before.snapshot.expect("snapshot");
    let purged = before.purged.expect("purged");
    assert!(before.last_applied.index > snap.index, "no log entries after the snapshot");
    assert!(purged.index <= snap.index);
    assert!(dir.path().join("snapshot.bin").exists(), "snapshot.bin missing from the data dir");
    node.shutdown().await;
    drop(node);
    drop(shared);

    let node = restart_and_check(cfg, &before, &alive, &deleted).await;
    let m = node.shared().raft.metrics().borrow().clone();
    assert!(m.snapshot.is_some_and(|s| s.index >= snap.index), "snapshot lost: {:?}", m.snapshot);
    assert!(m.purged.is_some_and(|p| p.index >= purged.index), "purge point lost: {:?}", m.purged);
    node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_under_another_id_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let node = start_ready(config(1, port, dir.path(), tuning(10_000, 1_000))).await;
    node.shared().propose(small_vm("vm-keep")).await.expect("create");
    node.shutdown().await;
    drop(node);

    match Node::start(config(2, port, dir.path(), tuning(10_000, 1_000))).await {
        Ok(_) => panic!("a data dir of node 1 was started as node 2"),
        Err(NodeError::Identity(IdentityError::NodeMismatch { stored, requested, .. })) => {
            assert_eq!((stored, requested), (1, 2));
        }
        Err(e) => panic!("expected an identity error, got: {e}"),
    }

    // The refused start left the data dir intact.
    let node = restart(config(1, port, dir.path(), tuning(10_000, 1_000))).await;
    let shared = node.shared().clone();
    wait_for("leadership", || shared.is_leader().then_some(())).await;
    wait_for("replay", || shared.state.with_vm("vm-keep", |_| ())).await;
    node.shutdown().await;
}

/// A node killed while joining has an identity (learned from its seed) but
/// no Raft state. Started again without --join it must not bootstrap: that
/// would found a second cluster under the same id, acknowledging writes the
/// real cluster never sees (found by `blixard-cli/tests/crash.rs`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_that_stopped_while_joining_does_not_bootstrap() {
    let dir = tempfile::tempdir().unwrap();
    let ident = blixard_core::node::identity::Identity { node_id: 2, cluster_id: "c0ffee".into() };
    blixard_core::node::identity::store(dir.path(), &ident).unwrap();
    match Node::start(config(2, free_port(), dir.path(), tuning(10_000, 1_000))).await {
        Ok(node) => {
            node.shutdown().await;
            panic!("a half-joined node bootstrapped a cluster of its own")
        }
        Err(e) => {
            let msg = e.to_string();
            assert!(msg.contains("stopped while joining") && msg.contains("--join"), "{msg}");
        }
    }
}

/// A first start on a busy port fails before it writes anything, so the
/// same command works once the port is free (it used to leave an identity
/// without Raft state, which every later start refused as half-joined).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_first_start_on_a_busy_port_leaves_the_dir_fresh() {
    let dir = tempfile::tempdir().unwrap();
    let busy = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = busy.local_addr().unwrap().port();
    let e = Node::start(config(1, port, dir.path(), tuning(10_000, 1_000))).await.err().expect("a busy port");
    assert!(e.to_string().contains("cannot listen on"), "{e}");
    assert!(std::fs::read_dir(dir.path()).unwrap().next().is_none(), "nothing written to the data dir");
    drop(busy);
    let node = start_ready(config(1, port, dir.path(), tuning(10_000, 1_000))).await;
    node.shutdown().await;
}

/// Group commit on the leader: the node's batcher coalesces concurrent
/// proposals into one Raft entry, and the log writer folds the appends that
/// queued during one fsync into the next. 200 concurrent writes must
/// therefore take far fewer than 200 fsyncs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_writes_share_fsyncs() {
    let dir = tempfile::tempdir().unwrap();
    let node = start_ready(config(1, free_port(), dir.path(), tuning(10_000, 1_000))).await;
    let shared = node.shared().clone();
    use std::sync::atomic::Ordering::Relaxed;
    let (c0, e0) = (shared.log_stats.commits.load(Relaxed), shared.log_stats.entries.load(Relaxed));

    const TASKS: usize = 50;
    const PER_TASK: usize = 4;
    let started = std::time::Instant::now();
    let mut handles = Vec::new();
    for t in 0..TASKS {
        let shared = shared.clone();
        handles.push(tokio::spawn(async move {
            for k in 0..PER_TASK {
                shared.propose(small_vm(&format!("vm-g-{t:02}-{k}"))).await.expect("concurrent create");
            }
        }));
    }
    for h in handles {
        h.await.expect("writer task");
    }
    let commits = shared.log_stats.commits.load(Relaxed) - c0;
    let entries = shared.log_stats.entries.load(Relaxed) - e0;
    let writes = (TASKS * PER_TASK) as u64;
    println!(
        "group commit: {writes} writes in {entries} entries and {commits} commits ({:.2} writes per fsync) in {:?}",
        writes as f64 / commits as f64,
        started.elapsed()
    );
    assert_eq!(shared.state.vm_count(), TASKS * PER_TASK);
    assert!(entries >= 1 && entries < writes, "no batching: {writes} writes took {entries} entries");
    assert!(commits < writes / 2, "no grouping: {writes} writes took {commits} commits");
    node.shutdown().await;
}

/// The leader's own entries are reported flushed before their fsync, so it
/// replicates them while it writes them (raft/log_store/early.rs); a
/// follower's entries never are: its acknowledgement is its promise to the
/// leader. Three in-process nodes: every write goes the early way on the
/// leader and none on a follower, and all three apply the same writes. A
/// follower writes its appends itself when its log writer is idle, which
/// with one AppendEntries at a time from the leader is nearly always; the
/// leader never writes its own entries that way.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_the_leaders_own_entries_are_reported_flushed_early() {
    use std::sync::atomic::Ordering::Relaxed;
    let dirs: Vec<_> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let ports: Vec<u16> = (0..3).map(|_| free_port()).collect();
    let leader = start_ready(config(1, ports[0], dirs[0].path(), tuning(10_000, 1_000))).await;
    let seed = format!("127.0.0.1:{}", ports[0]);
    let token = std::fs::read_to_string(dirs[0].path().join(blixard_core::node::bootstrap::FILE))
        .expect("the founder's admin token");
    let mut followers = Vec::new();
    for i in 1..3 {
        let mut cfg = config(i as u64 + 1, ports[i], dirs[i].path(), tuning(10_000, 1_000));
        cfg.join = Some(seed.clone());
        cfg.join_token = Some(token.trim().to_string());
        followers.push(start(cfg).await);
    }
    let shared = leader.shared().clone();
    wait_for("three nodes", || (shared.state.node_count() == 3).then_some(())).await;
    let early_before = shared.log_stats.early_appends.load(Relaxed);
    let inline_before = shared.log_stats.inline_appends.load(Relaxed);

    let mut handles = Vec::new();
    for t in 0..8 {
        let shared = shared.clone();
        handles.push(tokio::spawn(async move {
            for k in 0..5 {
                shared.propose(small_vm(&format!("vm-e-{t}-{k}"))).await.expect("create through the leader");
            }
        }));
    }
    for h in handles {
        h.await.expect("writer task");
    }
    assert!(shared.is_leader(), "leadership moved during the test");
    let early = shared.log_stats.early_appends.load(Relaxed) - early_before;
    assert!(early > 0, "the leader wrote no entry the early way");
    assert_eq!(
        shared.log_stats.inline_appends.load(Relaxed),
        inline_before,
        "the leader wrote its own entries on its Raft task"
    );
    for f in &followers {
        let fs = f.shared().clone();
        wait_for("a follower to apply every write", || (fs.state.vm_count() == 40).then_some(())).await;
        assert_eq!(
            fs.log_stats.early_appends.load(Relaxed),
            0,
            "node {} acknowledged early as a follower",
            fs.id
        );
        assert!(fs.log_stats.entries.load(Relaxed) > 0);
        assert!(
            fs.log_stats.inline_appends.load(Relaxed) > 0,
            "node {} wrote no append inline as a follower",
            fs.id
        );
    }
    assert_eq!(shared.state.vm_count(), 40);
    for f in followers {
        f.shutdown().await;
    }
    leader.shutdown().await;
}

/// `Node::shutdown` leaves the data dir reusable at once: it waits for the
/// log writer to close the raft log.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_immediately_after_shutdown() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(1, free_port(), dir.path(), tuning(10_000, 1_000));
    let node = start_ready(cfg.clone()).await;
    node.shutdown().await;
    drop(node);
    match Node::start(cfg).await {
        Ok(node) => node.shutdown().await,
        Err(e) => panic!("restart right after shutdown failed: {e}"),
    }
}

fn log_id(term: u64, index: u64) -> LogId {
    LogId::new(CommittedLeaderId::new(term, 1), index)
}

fn normal(term: u64, index: u64, command: Command) -> Entry {
    Entry {
        log_id: log_id(term, index),
        payload: EntryPayload::Normal(ProposalBatch(vec![Proposal {
            at_ms: 1_000 + index,
            request: None,
            command,
        }])),
    }
}

/// The "snapshot install" unit test: apply entries to one state machine,
/// build a snapshot, install it into a fresh one, compare.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshot_install_round_trip() {
    let dir_a = tempfile::tempdir().unwrap();
    let dir_b = tempfile::tempdir().unwrap();
    let state_a = Arc::new(ClusterState::new());
    let mut sm_a = StateMachineStore::open(dir_a.path(), state_a.clone()).unwrap();
    assert_eq!(sm_a.applied_state().await.unwrap().0, None);

    let membership = Membership::new(vec![BTreeSet::from([1u64])], None);
    let mut entries = vec![
        Entry { log_id: log_id(1, 1), payload: EntryPayload::Blank },
        Entry { log_id: log_id(1, 2), payload: EntryPayload::Membership(membership.clone()) },
    ];
    let mut index = 3;
    for id in 1..=3u64 {
        entries.push(normal(
            1,
            index,
            Command::RegisterNode {
                id,
                addr: format!("127.0.0.1:{}", 7000 + id),
                resources: NodeResources::plain(Resources::new(16, 32_768, 500)),
                labels: BTreeMap::from([("rack".to_string(), format!("r{id}"))]),
            },
        ));
        index += 1;
    }
    for i in 0..40 {
        entries.push(normal(2, index, small_vm(&format!("vm-{i:03}"))));
        index += 1;
    }
    entries.push(normal(2, index, Command::DeleteVm { name: "vm-007".into() }));
    index += 1;
    entries.push(normal(2, index, small_vm("vm-001"))); // rejected: exists
    let last = log_id(2, index);
    let results: Vec<CommandResult> = sm_a.apply(entries).await.unwrap().into_iter().flatten().collect();
    assert_eq!(results.len() as u64, index);
    assert!(results[..results.len() - 1].iter().all(|r| r.is_ok()));
    assert!(results.last().unwrap().is_err(), "duplicate create was accepted");
    assert_eq!(state_a.vm_count(), 39);
    let (applied, stored_membership) = sm_a.applied_state().await.unwrap();
    assert_eq!(applied, Some(last));
    assert_eq!(stored_membership.membership(), &membership);

    let snapshot = sm_a.get_snapshot_builder().await.build_snapshot().await.unwrap();
    assert_eq!(snapshot.meta.last_log_id, Some(last));
    assert!(dir_a.path().join("snapshot.bin").exists());

    // Install into a fresh state machine.
    let state_b = Arc::new(ClusterState::new());
    let mut sm_b = StateMachineStore::open(dir_b.path(), state_b.clone()).unwrap();
    sm_b.install_snapshot(&snapshot.meta, snapshot.snapshot).await.unwrap();
    assert_eq!(state_b.digest(), state_a.digest());
    assert_eq!(state_b.image(), state_a.image());
    state_b.check_invariants().unwrap();
    let (applied_b, membership_b) = sm_b.applied_state().await.unwrap();
    assert_eq!(applied_b, Some(last));
    assert_eq!(membership_b.membership(), &membership);
    let current = sm_b.get_current_snapshot().await.unwrap().expect("installed snapshot is current");
    assert_eq!(current.meta, snapshot.meta);

    // Both snapshot files restore the same state on open.
    for dir in [dir_a.path(), dir_b.path()] {
        let state = Arc::new(ClusterState::new());
        let mut sm = StateMachineStore::open(dir, state.clone()).unwrap();
        assert_eq!(state.digest(), state_a.digest(), "{} restores another state", dir.display());
        assert_eq!(sm.applied_state().await.unwrap().0, Some(last));
        state.check_invariants().unwrap();
    }

    // The restored scheduler index decides like the original.
    let next = Proposal { at_ms: 99_999, request: None, command: small_vm("vm-next") };
    assert_eq!(state_a.apply(&next, index + 1), state_b.apply(&next, index + 1));
    assert_eq!(state_a.digest(), state_b.digest());
}

/// Opens the log at `path`, waiting while the previous handle's writer task
/// still holds the database (it exits asynchronously after the handle drops).
async fn reopen(path: &Path) -> LogStore {
    let deadline = tokio::time::Instant::now() + DEADLINE;
    loop {
        match LogStore::open(path) {
            Ok(s) => return s,
            Err(e) if tokio::time::Instant::now() < deadline => {
                tracing::debug!(error = %e, "log still open; retrying");
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            Err(e) => panic!("cannot reopen the log: {e}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn log_store_persists_vote_committed_and_purge() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("raft-log");
    let mut log = LogStore::open(&path).unwrap();
    assert!(!log.has_state());
    assert_eq!(log.read_vote().await.unwrap(), None);
    let state = log.get_log_state().await.unwrap();
    assert_eq!((state.last_purged_log_id, state.last_log_id), (None, None));

    let vote = Vote::new(3, 1);
    log.save_vote(&vote).await.unwrap();
    assert_eq!(log.read_vote().await.unwrap(), Some(vote));
    // (A commit index is recorded only once the log reaches it: here, the
    // purge point.)
    log.save_committed(Some(log_id(2, 5))).await.unwrap();
    log.purge(log_id(2, 5)).await.unwrap();
    // Operations are ordered through one writer; a vote waits for its fsync,
    // so everything before it is durable once it returns.
    let newer = Vote::new(4, 1);
    log.save_vote(&newer).await.unwrap();
    assert!(log.has_state());
    drop(log);

    let mut log = reopen(&path).await;
    assert!(log.has_state());
    assert_eq!(log.read_vote().await.unwrap(), Some(newer));
    assert_eq!(log.read_committed().await.unwrap(), Some(log_id(2, 5)));
    let state = log.get_log_state().await.unwrap();
    assert_eq!(state.last_purged_log_id, Some(log_id(2, 5)));
    assert_eq!(state.last_log_id, Some(log_id(2, 5)), "an empty log ends at its purge point");
}
