//! Real encodings to start fuzzing from: coverage gets far deeper when
//! mutations start from valid messages than from random bytes. Everything
//! here is encoded by the product's own code (or read from the upgrade
//! fixtures written by older builds), so it follows the current formats.
use std::borrow::Cow;
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use blixard_core::codec;
use blixard_core::command::{Command, NewVm, NewVmV3, NewVmV4, Proposal, ProposalBatch, RequestId, VmReport};
use blixard_core::error::CommandError;
use blixard_core::format;
use blixard_core::node::election::{PreVoteReply, PreVoteRequest};
use blixard_core::node::forwarder::{LinkForward, LinkForwardReply};
use blixard_core::node::liveness::{HeartbeatReply, HeartbeatRequest, HeartbeatResult, LivenessReply};
use blixard_core::node::{ForwardError, ProposeReply, ReadIndexReply};
use blixard_core::raft::link::Hello;
use blixard_core::raft::log_store::segment::{Group, Kind, Marks, SegmentLog};
use blixard_core::raft::state_machine::encode_image;
use blixard_core::raft::{Entry, LogId, SnapshotMeta, TypeConfig, Vote};
use blixard_core::types::{
    BootSpec, Constraint, Ipv4Net, NodeResources, ObservedState, Placement, PortMap, QuotaLimits, Ratio,
    Reschedule, Resources, RestartPolicy, Strategy, VmRuntime, VmSpec,
};
use blixard_proto as pb;
use openraft::error::{Fatal, InstallSnapshotError, RaftError, SnapshotMismatch};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};
use openraft::{BasicNode, CommittedLeaderId, EntryPayload, Membership, StoredMembership};
use prost::Message;
use serde::{Deserialize, Serialize};

type Seeds = Vec<(String, Vec<u8>)>;

/// The seeds of fuzz target `target` (empty for an unknown name).
pub fn for_target(target: &str) -> Seeds {
    match target {
        "raft_message" => raft_messages().into_iter().map(|(n, k, p)| (n, [&[k][..], &p].concat())).collect(),
        "raft_envelope" => raft_envelopes(),
        "proposal_apply" => proposal_batches(),
        "snapshot" => snapshots(),
        "log_segments" => log_segments(),
        "api_request" => api_requests(),
        _ => Vec::new(),
    }
}

fn enc<T: Serialize>(v: &T) -> Vec<u8> {
    codec::encode(v).expect("seeds encode")
}

fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
}

fn spec(vcpus: u32, memory_mb: u64, tenant: &str, l: &[(&str, &str)]) -> VmSpec {
    VmSpec {
        vcpus,
        memory_mb,
        disk_gb: 1,
        labels: labels(l),
        tenant: tenant.to_string(),
        restart: RestartPolicy::OnFailure,
        boot: BootSpec::default(),
    }
}

fn node_resources(vcpus: u32, memory_mb: u64) -> NodeResources {
    NodeResources {
        capacity: Resources::new(vcpus, memory_mb, 500),
        reserved: Resources::new(1, 512, 10),
        cpu_overcommit: Ratio(2000),
        memory_overcommit: Ratio::ONE,
    }
}

fn new_vm(name: &str, spec: VmSpec, placement: Placement) -> NewVm {
    NewVm { name: name.to_string(), spec, placement, reschedule: Reschedule::default(), publish: Vec::new() }
}

/// What [`crate::base_image`] is built from: three nodes in two zones, VMs
/// running, stopped, pinned and queued, a quota, and a drain under way.
pub fn setup_commands() -> Vec<Command> {
    let pinned = Placement {
        node: 2,
        constraints: vec![Constraint { key: "zone".into(), equal: true, value: "b".into() }],
        anti_affinity: "grp".into(),
        spread_by: "rack".into(),
        priority: 70,
    };
    vec![
        // Format 6: a VM network, so creates, moves and deletes allocate
        // and free addresses and published ports.
        Command::SetVmNetwork { cidr: Ipv4Net::DEFAULT_VM_CIDR },
        Command::RegisterNode {
            id: 1,
            addr: "10.0.0.1:7000".into(),
            resources: node_resources(16, 32768),
            labels: labels(&[("zone", "a"), ("rack", "r1")]),
        },
        Command::RegisterNode {
            id: 2,
            addr: "10.0.0.2:7000".into(),
            resources: node_resources(8, 16384),
            labels: labels(&[("zone", "b"), ("rack", "r2")]),
        },
        Command::RegisterNode {
            id: 3,
            addr: "10.0.0.3:7000".into(),
            resources: NodeResources::plain(Resources::new(4, 4096, 100)),
            labels: labels(&[("zone", "b"), ("rack", "r3")]),
        },
        Command::SetQuota {
            tenant: "acme".into(),
            limits: QuotaLimits { vcpus: Some(40), memory_mb: None, disk_gb: None, vms: Some(50) },
        },
        Command::CreateVms {
            vms: vec![
                new_vm("web-1", spec(1, 256, "acme", &[("tier", "web")]), Placement::default()),
                new_vm("web-2", spec(1, 256, "acme", &[("tier", "web")]), Placement::default()),
                new_vm("db-1", spec(4, 4096, "acme", &[("tier", "db")]), Placement::default()),
                new_vm("pinned-1", spec(1, 128, "acme", &[]), pinned),
                new_vm(
                    "batch-1",
                    spec(2, 1024, "beta", &[]),
                    Placement { priority: 10, ..Default::default() },
                ),
            ],
            start: true,
            queue: false,
        },
        Command::CreateVms {
            vms: vec![new_vm("huge-1", spec(2, 1 << 20, "", &[]), Placement::default())],
            start: true,
            queue: true,
        },
        Command::StopVm { name: "web-2".into() },
        Command::ReportVms {
            node: 1,
            reports: vec![VmReport {
                name: "web-1".into(),
                observed: ObservedState::Running,
                runtime: VmRuntime { pid: Some(4242), started_at_ms: Some(1), ..Default::default() },
            }],
        },
        Command::SetNodeTimeout { ms: 5_000 },
        Command::DrainNode { id: 3, max_parallel: 1, deadline_ms: 0 },
    ]
}

/// One command of every kind, applicable to [`crate::base_image`] (most of
/// them succeed there; a few are refused on purpose).
pub fn sample_commands() -> Vec<(&'static str, Command)> {
    let placement = Placement {
        node: 0,
        constraints: vec![
            Constraint { key: "zone".into(), equal: true, value: "a".into() },
            Constraint { key: "rack".into(), equal: false, value: "r9".into() },
        ],
        anti_affinity: "web".into(),
        spread_by: "zone".into(),
        priority: 90,
    };
    vec![
        (
            "register-v1",
            Command::RegisterNodeV1 {
                id: 4,
                addr: "10.0.0.4:7000".into(),
                capacity: Resources::new(8, 8192, 100),
                labels: labels(&[("zone", "c")]),
            },
        ),
        ("decommission", Command::DecommissionNode { id: 2 }),
        (
            "create-vm",
            Command::CreateVm { name: "old-1".into(), spec: spec(1, 128, "acme", &[]), start: true },
        ),
        ("delete-vm", Command::DeleteVm { name: "web-1".into() }),
        ("start-vm", Command::StartVm { name: "web-2".into() }),
        ("stop-vm", Command::StopVm { name: "db-1".into() }),
        ("restart-vm", Command::RestartVm { name: "web-1".into() }),
        (
            "report-vms",
            Command::ReportVms {
                node: 1,
                reports: vec![
                    VmReport {
                        name: "web-1".into(),
                        observed: ObservedState::Failed,
                        runtime: VmRuntime { reason: "exit 1".into(), restarts: 1, ..Default::default() },
                    },
                    VmReport {
                        name: "db-1".into(),
                        observed: ObservedState::Running,
                        runtime: Default::default(),
                    },
                ],
            },
        ),
        (
            "batch",
            Command::Batch(vec![
                Command::StopVm { name: "web-1".into() },
                Command::SetScheduler { strategy: Strategy::Binpack },
                Command::DeleteQuota { tenant: "beta".into() },
            ]),
        ),
        (
            "register",
            Command::RegisterNode {
                id: 5,
                addr: "[fd00::5]:7000".into(),
                resources: node_resources(32, 65536),
                labels: labels(&[("zone", "a"), ("gpu", "yes")]),
            },
        ),
        (
            "set-node",
            Command::SetNode {
                id: 1,
                set_labels: labels(&[("rack", "r7")]),
                remove_labels: BTreeSet::from(["zone".to_string()]),
                cpu_overcommit: Some(Ratio(1500)),
                memory_overcommit: Some(Ratio(1000)),
            },
        ),
        (
            "set-quota",
            Command::SetQuota {
                tenant: "beta".into(),
                limits: QuotaLimits {
                    vcpus: Some(4),
                    memory_mb: Some(8192),
                    disk_gb: Some(10),
                    vms: Some(2),
                },
            },
        ),
        ("delete-quota", Command::DeleteQuota { tenant: "acme".into() }),
        ("set-scheduler", Command::SetScheduler { strategy: Strategy::Binpack }),
        (
            "create-vms-v3",
            Command::CreateVmsV3 {
                vms: vec![NewVmV3 {
                    name: "v3-1".into(),
                    spec: spec(1, 128, "", &[]),
                    placement: placement.clone(),
                }],
                start: true,
                queue: false,
            },
        ),
        (
            "create-vms",
            Command::CreateVms {
                vms: vec![
                    new_vm("new-1", spec(1, 256, "acme", &[("tier", "web")]), placement.clone()),
                    NewVm {
                        name: "new-2".into(),
                        spec: VmSpec {
                            boot: BootSpec {
                                kernel: "vmlinuz-6.1".into(),
                                initrd: "initrd.img".into(),
                                cmdline: "console=ttyS0 quiet".into(),
                            },
                            ..spec(2, 512, "beta", &[])
                        },
                        placement: Placement { priority: 100, ..Default::default() },
                        reschedule: Reschedule::Never,
                        publish: vec![PortMap { host: 8080, guest: 80 }, PortMap { host: 2222, guest: 22 }],
                    },
                ],
                start: false,
                queue: true,
            },
        ),
        (
            "create-vms-v4",
            Command::CreateVmsV4 {
                vms: vec![NewVmV4 {
                    name: "old-1".into(),
                    spec: spec(1, 128, "", &[]),
                    placement: Placement::default(),
                    reschedule: Reschedule::default(),
                }],
                start: true,
                queue: false,
            },
        ),
        ("set-vm-network", Command::SetVmNetwork { cidr: Ipv4Net::parse("10.99.0.0/16").unwrap() }),
        ("set-node-timeout", Command::SetNodeTimeout { ms: 30_000 }),
        ("set-node-down", Command::SetNodeDown { id: 2, down: true }),
        ("drain", Command::DrainNode { id: 1, max_parallel: 2, deadline_ms: 1_800_000_000_000 }),
        ("set-eligible", Command::SetEligible { id: 3 }),
        ("migrate", Command::MigrateVm { name: "web-1".into(), to: 2 }),
        ("invalid-name", Command::DeleteVm { name: "Not A Name!".into() }),
    ]
}

fn proposal(at_ms: u64, seq: u64, command: Command) -> Proposal {
    Proposal { at_ms, request: Some(RequestId { session: 7, seq }), command }
}

fn sample_batch() -> ProposalBatch {
    ProposalBatch(
        sample_commands()
            .into_iter()
            .take(4)
            .enumerate()
            .map(|(i, (_, c))| proposal(1_700_000_100_000 + i as u64, i as u64, c))
            .collect(),
    )
}

fn log_id(term: u64, node: u64, index: u64) -> LogId {
    LogId::new(CommittedLeaderId::new(term, node), index)
}

fn membership() -> Membership<u64, BasicNode> {
    let nodes: BTreeMap<u64, BasicNode> =
        (1..=3).map(|i| (i, BasicNode { addr: format!("10.0.0.{i}:7000") })).collect();
    Membership::new(vec![BTreeSet::from([1, 2, 3])], nodes)
}

/// Entries of every payload kind.
fn sample_entries() -> Vec<Entry> {
    vec![
        Entry { log_id: log_id(2, 1, 10), payload: EntryPayload::Blank },
        Entry { log_id: log_id(2, 1, 11), payload: EntryPayload::Membership(membership()) },
        Entry { log_id: log_id(2, 1, 12), payload: EntryPayload::Normal(sample_batch()) },
        Entry {
            log_id: log_id(2, 1, 13),
            payload: EntryPayload::Normal(ProposalBatch(vec![Proposal {
                at_ms: 1_700_000_200_000,
                request: None,
                command: Command::SetNodeDown { id: 3, down: true },
            }])),
        },
    ]
}

fn snapshot_meta() -> SnapshotMeta {
    SnapshotMeta {
        last_log_id: Some(log_id(2, 1, 100)),
        last_membership: StoredMembership::new(Some(log_id(2, 1, 11)), membership()),
        snapshot_id: "2-1-100-1".into(),
    }
}

/// The state image of [`crate::base_image`], as a snapshot carries it.
pub fn current_image() -> Vec<u8> {
    encode_image(crate::base_image()).expect("the image encodes")
}

/// The upgrade fixtures' directory (data dirs written by older builds).
fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../blixard-core/tests/fixtures")
}

/// The shape of a snapshot file's body (`raft::state_machine`'s private
/// `StoredSnapshot`): the Raft metadata and the state image. Mirrored here
/// to take the images of older formats out of the fixtures' files, and to
/// write a current file.
#[derive(Serialize, Deserialize)]
struct StoredSnapshot {
    meta: SnapshotMeta,
    data: Vec<u8>,
}

/// Every fixture's snapshot file, by format version.
fn fixture_snapshot_files() -> Vec<(String, Vec<u8>)> {
    (0..=format::CURRENT)
        .filter_map(|v| {
            let bytes = std::fs::read(fixtures().join(format!("datadir-v{v}/snapshot.bin"))).ok()?;
            Some((format!("v{v}"), bytes))
        })
        .collect()
}

/// The entries of every fixture's legacy (redb) Raft log.
fn fixture_entries() -> Vec<(String, Entry)> {
    let mut out = Vec::new();
    let Ok(tmp) = tempfile::tempdir() else { return out };
    for v in 0..=format::CURRENT {
        let src = fixtures().join(format!("datadir-v{v}/raft.redb"));
        // redb opens its file for writing: read a copy.
        let copy = tmp.path().join(format!("v{v}.redb"));
        if std::fs::copy(&src, &copy).is_err() {
            continue;
        }
        if let Ok(c) = blixard_core::raft::log_store::legacy::read(&copy) {
            out.extend(c.entries.into_values().map(|e| (format!("v{v}-{}", e.log_id.index), e)));
        }
    }
    out
}

/// The request kinds of `raft_message` (see `fuzz_targets/raft_message.rs`):
/// requests 0-7, replies 8-15, in `RaftRpc` order.
fn raft_messages() -> Vec<(String, u8, Vec<u8>)> {
    let vote = Vote::new_committed(2, 1);
    let image = current_image();
    let mut out: Vec<(String, u8, Vec<u8>)> = Vec::new();
    let mut add = |name: &str, kind: u8, bytes: Vec<u8>| out.push((name.to_string(), kind, bytes));

    let entries = sample_entries();
    add(
        "append",
        0,
        enc(&AppendEntriesRequest::<TypeConfig> {
            vote,
            prev_log_id: Some(log_id(2, 1, 9)),
            entries: entries.clone(),
            leader_commit: Some(log_id(2, 1, 9)),
        }),
    );
    add(
        "heartbeat-append",
        0,
        enc(&AppendEntriesRequest::<TypeConfig> {
            vote,
            prev_log_id: None,
            entries: vec![],
            leader_commit: None,
        }),
    );
    add("vote", 1, enc(&VoteRequest::<u64>::new(Vote::new(3, 2), Some(log_id(2, 1, 13)))));
    add(
        "snapshot-whole",
        2,
        enc(&InstallSnapshotRequest::<TypeConfig> {
            vote,
            meta: snapshot_meta(),
            offset: 0,
            data: image.clone(),
            done: true,
        }),
    );
    add(
        "snapshot-chunk",
        2,
        enc(&InstallSnapshotRequest::<TypeConfig> {
            vote,
            meta: snapshot_meta(),
            offset: 1 << 20,
            data: image[..image.len() / 2].to_vec(),
            done: false,
        }),
    );
    add("pre-vote", 3, enc(&PreVoteRequest { candidate: 2, last_log_id: Some(log_id(2, 1, 13)) }));
    for (name, c) in sample_commands() {
        add(&format!("propose-{name}"), 4, enc(&proposal(1_700_000_300_000, 9, c)));
    }
    let forwarded: Vec<Proposal> =
        sample_commands().into_iter().take(3).map(|(_, c)| proposal(1_700_000_300_000, 9, c)).collect();
    add(
        "link-forward",
        4,
        enc(&LinkForward {
            token: Some(Cow::Borrowed(
                "Bearer blx_0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef",
            )),
            claim: None,
            traceparent: Some(Cow::Borrowed("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01")),
            proposals: Cow::Owned(forwarded.clone()),
        }),
    );
    add(
        "link-forward-claim",
        4,
        enc(&LinkForward {
            token: None,
            claim: Some(Cow::Borrowed("cert:operator:ci")),
            traceparent: None,
            proposals: Cow::Owned(forwarded),
        }),
    );
    add("read-index", 5, enc(&()));
    add(
        "link-hello",
        5,
        enc(&Hello {
            format: format::CURRENT,
            cluster_id: "c0ffee00-1234-4bcd-8000-000000000001".into(),
            from: 2,
        }),
    );
    add("heartbeat", 6, enc(&HeartbeatRequest { node: 3 }));
    add("liveness", 7, enc(&()));

    type AeReply = Result<AppendEntriesResponse<u64>, RaftError<u64>>;
    add("r-append-ok", 8, enc(&AeReply::Ok(AppendEntriesResponse::Success)));
    add(
        "r-append-partial",
        8,
        enc(&AeReply::Ok(AppendEntriesResponse::PartialSuccess(Some(log_id(2, 1, 12))))),
    );
    add("r-append-conflict", 8, enc(&AeReply::Ok(AppendEntriesResponse::Conflict)));
    add("r-append-higher", 8, enc(&AeReply::Ok(AppendEntriesResponse::HigherVote(Vote::new(4, 3)))));
    add("r-append-fatal", 8, enc(&AeReply::Err(RaftError::Fatal(Fatal::Stopped))));
    type VoteReply = Result<VoteResponse<u64>, RaftError<u64>>;
    add("r-vote", 9, enc(&VoteReply::Ok(VoteResponse::new(Vote::new(3, 2), Some(log_id(2, 1, 13)), true))));
    type SnapReply = Result<InstallSnapshotResponse<u64>, RaftError<u64, InstallSnapshotError>>;
    add("r-snapshot", 10, enc(&SnapReply::Ok(InstallSnapshotResponse { vote })));
    add(
        "r-snapshot-mismatch",
        10,
        enc(&SnapReply::Err(RaftError::APIError(InstallSnapshotError::SnapshotMismatch(SnapshotMismatch {
            expect: openraft::SnapshotSegmentId { id: "a".into(), offset: 0 },
            got: openraft::SnapshotSegmentId { id: "a".into(), offset: 4096 },
        })))),
    );
    add("r-pre-vote", 11, enc(&PreVoteReply { granted: true }));
    let created = blixard_core::command::CommandOutput::VmsCreated {
        vms: vec![blixard_core::command::CreatedVm {
            name: "new-1".into(),
            node_id: 1,
            preempted: vec!["batch-1".into()],
        }],
    };
    add("r-propose-ok", 12, enc(&ProposeReply::Ok((42, Ok(created)))));
    add(
        "r-propose-rejected",
        12,
        enc(&ProposeReply::Ok((43, Err(CommandError::invalid("vm name", "X", "lowercase"))))),
    );
    add(
        "r-propose-not-leader",
        12,
        enc(&ProposeReply::Err(ForwardError::NotLeader { leader: Some((2, "10.0.0.2:7000".into())) })),
    );
    add("r-link-forward-refused", 12, enc(&LinkForwardReply::Err((16, "unknown or revoked token".into()))));
    add("r-read-index", 13, enc(&ReadIndexReply::Ok(99)));
    add(
        "r-heartbeat",
        14,
        enc(&HeartbeatResult::Ok(HeartbeatReply { read_index: 99, node_timeout_ms: 10_000 })),
    );
    add("r-liveness", 15, enc(&LivenessReply::Ok(vec![(1, 0), (2, 120), (3, 15_000)])));
    out
}

/// `raft_envelope`: a flag byte (bit 0: a reply; bits 1-3: the RPC) and
/// the protobuf envelope as the gRPC layer hands it over.
fn raft_envelopes() -> Seeds {
    raft_messages()
        .into_iter()
        .map(|(name, kind, payload)| {
            let (reply, rpc) = (kind >= 8, kind % 8);
            let envelope = if reply {
                pb::RaftReply { payload, format: u32::from(format::CURRENT), link_port: 7421 }.encode_to_vec()
            } else {
                pb::RaftRequest {
                    cluster_id: "c0ffee00-1234-4bcd-8000-000000000001".into(),
                    from: 2,
                    payload,
                    format: u32::from(format::CURRENT),
                }
                .encode_to_vec()
            };
            (name, [&[(rpc << 1) | u8::from(reply)][..], &envelope].concat())
        })
        .collect()
}

fn proposal_batches() -> Seeds {
    let mut out: Seeds = sample_commands()
        .into_iter()
        .enumerate()
        .map(|(i, (name, c))| {
            (name.to_string(), enc(&ProposalBatch(vec![proposal(1_700_000_000_000, i as u64, c)])))
        })
        .collect();
    out.push(("batch-of-4".into(), enc(&sample_batch())));
    // Commands as older formats wrote them (fixture logs, formats 0-4).
    for (name, e) in fixture_entries() {
        if let EntryPayload::Normal(batch) = e.payload {
            out.push((format!("fixture-{name}"), enc(&batch)));
        }
    }
    out
}

/// `snapshot`: a flag byte (bit 0 clear: a state image, as InstallSnapshot
/// carries it; set: a snapshot file, as a node reads it at start).
fn snapshots() -> Seeds {
    let mut out = vec![("image-current".to_string(), [&[0u8][..], &current_image()].concat())];
    let file = StoredSnapshot { meta: snapshot_meta(), data: current_image() };
    out.push(("file-current".into(), [&[1u8][..], &format::with_header(&enc(&file))].concat()));
    for (v, bytes) in fixture_snapshot_files() {
        let (_, body) = format::split_header("fixture", &bytes).expect("fixture header");
        if let Ok(s) = codec::decode_trusted::<StoredSnapshot>(body) {
            out.push((format!("image-{v}"), [&[0u8][..], &s.data].concat()));
        }
        out.push((format!("file-{v}"), [&[1u8][..], &bytes].concat()));
    }
    out
}

/// `log_segments`: a flag byte (bit 0: recompute the segment header's
/// checksum, bit 1: recompute every record's checksum, bit 2: two segments,
/// split at the little-endian `u16` that follows), then the segment bytes.
/// Seeds are segments written by the log's own writer; they have valid
/// checksums, and bits 0-1 keep mutations of them checksummed.
fn log_segments() -> Seeds {
    let Ok(tmp) = tempfile::tempdir() else { return Vec::new() };
    let mut out = Vec::new();
    // One segment with every record kind.
    let dir = tmp.path().join("one");
    let _ = std::fs::create_dir_all(&dir);
    let marks = Marks { vote: Some(Vote::new(1, 1)), committed: None, last_purged: None };
    let Ok(mut log) = SegmentLog::create_first(&dir, marks, 1 << 20) else { return out };
    let mut end = 0;
    let mut g = Group::default();
    let mut write = |g: &mut Group, max: Option<u64>, log: &mut SegmentLog| {
        let len = g.len() as u64;
        if let Ok((_, at)) = log.write(g, max, log.marks, true) {
            end = at + len;
        }
        g.clear();
    };
    let _ = g.push(Kind::Vote, &Vote::new_committed(2, 1));
    for e in sample_entries() {
        let _ = g.push(Kind::Entry, &e);
    }
    write(&mut g, Some(13), &mut log);
    let _ = g.push(Kind::Committed, &Some(log_id(2, 1, 12)));
    let _ = g.push(Kind::Truncate, &13u64);
    let _ = g.push(Kind::Entry, &sample_entries()[3]);
    let _ = g.push(Kind::Purge, &log_id(2, 1, 10));
    write(&mut g, Some(13), &mut log);
    drop(log);
    if let Ok(bytes) = std::fs::read(dir.join(format!("{:016x}.seg", 1))) {
        let bytes = &bytes[..(end as usize).min(bytes.len())];
        out.push(("one-segment".to_string(), [&[0u8][..], bytes].concat()));
        out.push(("one-segment-fixups".to_string(), [&[3u8][..], bytes].concat()));
    }
    // Two segments: a log that rolled over (its second starts with a checkpoint).
    let dir = tmp.path().join("two");
    let _ = std::fs::create_dir_all(&dir);
    let Ok(mut log) = SegmentLog::create_first(&dir, Marks::default(), 256) else { return out };
    for i in 1..=12u64 {
        let e = Entry {
            log_id: log_id(1, 1, i),
            payload: EntryPayload::Normal(ProposalBatch(vec![proposal(
                i,
                i,
                Command::StopVm { name: "web-1".into() },
            )])),
        };
        let _ = g.push(Kind::Entry, &e);
        let _ = log.write(&mut g, Some(i), log.marks, true);
        g.clear();
    }
    drop(log);
    let read = |seq: u64| std::fs::read(dir.join(format!("{seq:016x}.seg"))).ok();
    if let (Some(a), Some(b)) = (read(1), read(2)) {
        // Both are preallocated: cut the zeros after the last record of the
        // first (whose last byte is never zero: a varint command), keep the
        // second's (the end of its log).
        let a_len = a.iter().rposition(|b| *b != 0).map_or(a.len(), |p| p + 1);
        let b = &b[..b.iter().rposition(|b| *b != 0).map_or(b.len(), |p| p + 1)];
        let split = u16::try_from(a_len).unwrap_or(u16::MAX).to_le_bytes();
        out.push(("two-segments".to_string(), [&[7u8, split[0], split[1]][..], &a[..a_len], b].concat()));
    }
    out
}

/// `api_request`: a byte naming the request (see
/// `fuzz_targets/api_request.rs`), then its protobuf encoding.
fn api_requests() -> Seeds {
    let vm_spec = |kernel: &str| pb::VmSpec {
        vcpus: 2,
        memory_mb: 512,
        disk_gb: 4,
        labels: [("tier".to_string(), "web".to_string())].into_iter().collect(),
        tenant: "acme".into(),
        restart_policy: "always".into(),
        kernel: kernel.into(),
        initrd: String::new(),
        cmdline: "console=ttyS0".into(),
    };
    let placement = pb::Placement {
        node_id: 0,
        constraints: vec!["zone=a".into(), "rack!=r9".into()],
        anti_affinity: "web".into(),
        spread_by: "zone".into(),
        priority: Some(80),
    };
    let mut out: Seeds = Vec::new();
    let mut add =
        |name: &str, kind: u8, bytes: Vec<u8>| out.push((name.to_string(), [&[kind][..], &bytes].concat()));
    add(
        "create-vm",
        0,
        pb::CreateVmRequest {
            name: "api-1".into(),
            spec: Some(vm_spec("")),
            no_start: false,
            request_id: "req-1".into(),
            placement: Some(placement.clone()),
            queue: true,
            reschedule: "never".into(),
            publish: vec!["8443:443".into()],
        }
        .encode_to_vec(),
    );
    add(
        "create-vms",
        1,
        pb::CreateVmsRequest {
            vms: vec![
                pb::NewVm {
                    name: "api-2".into(),
                    spec: Some(vm_spec("vmlinuz")),
                    placement: Some(placement.clone()),
                    reschedule: "on-node-failure".into(),
                    publish: vec!["8080:80".into()],
                },
                pb::NewVm {
                    name: "api-3".into(),
                    spec: Some(vm_spec("")),
                    placement: None,
                    reschedule: String::new(),
                    publish: Vec::new(),
                },
            ],
            no_start: true,
            request_id: String::new(),
            queue: false,
            dry_run: true,
        }
        .encode_to_vec(),
    );
    add(
        "set-node",
        2,
        pb::SetNodeRequest {
            node_id: 2,
            set_labels: [("rack".to_string(), "r5".to_string())].into_iter().collect(),
            remove_labels: vec!["zone".into()],
            cpu_overcommit: "1.5".into(),
            memory_overcommit: "1".into(),
            request_id: "req-2".into(),
        }
        .encode_to_vec(),
    );
    add(
        "set-quota",
        3,
        pb::SetQuotaRequest {
            tenant: "beta".into(),
            limits: Some(pb::QuotaLimits {
                vcpus: Some(8),
                memory_mb: Some(4096),
                disk_gb: None,
                vms: Some(3),
            }),
            request_id: String::new(),
        }
        .encode_to_vec(),
    );
    add(
        "set-scheduler",
        4,
        pb::SetSchedulerRequest { strategy: "binpack".into(), request_id: "r".into() }.encode_to_vec(),
    );
    add(
        "drain",
        5,
        pb::DrainNodeRequest { node_id: 1, max_parallel: 2, deadline_secs: 600, request_id: String::new() }
            .encode_to_vec(),
    );
    add(
        "set-node-timeout",
        6,
        pb::SetNodeTimeoutRequest { timeout_ms: 20_000, request_id: String::new() }.encode_to_vec(),
    );
    add("set-eligible", 7, pb::SetEligibleRequest { node_id: 3, request_id: String::new() }.encode_to_vec());
    add(
        "delete-quota",
        8,
        pb::DeleteQuotaRequest { tenant: "acme".into(), request_id: String::new() }.encode_to_vec(),
    );
    for (k, name) in [(9u8, "start"), (10, "stop"), (11, "restart")] {
        add(
            name,
            k,
            pb::VmNameRequest { name: "web-2".into(), request_id: format!("{name}-1") }.encode_to_vec(),
        );
    }
    add(
        "delete-vm",
        12,
        pb::DeleteVmRequest { name: "db-1".into(), request_id: String::new() }.encode_to_vec(),
    );
    add(
        "migrate",
        13,
        pb::MigrateVmRequest { name: "web-1".into(), to_node: 2, request_id: String::new() }.encode_to_vec(),
    );
    out
}
