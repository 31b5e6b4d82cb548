//! Public API requests turned into commands: a byte naming the request,
//! then its protobuf encoding as a client sends it. The request is decoded
//! and converted as its handler in `node::api` does (`spec_from_pb`,
//! `placement_from_pb`, `reschedule_from_pb`, `set_node_command`; the
//! handlers that convert inline are mirrored here line for line), its
//! request id checked, the command validated as the edge does, and, if
//! valid, applied to a small cluster's state (see `apply_checked`). Nothing
//! a client sends may panic a node or break the state's invariants.
#![no_main]
use blixard_core::command::{Command, NewVm, Proposal, RequestId};
use blixard_core::node::api::{
    create_command, placement_from_pb, publish_from_pb, reschedule_from_pb, set_node_command, spec_from_pb,
};
use blixard_core::node::ApiError;
use blixard_core::types::{QuotaLimits, Strategy};
use blixard_proto as pb;
use libfuzzer_sys::fuzz_target;
use prost::Message;

/// A fixed "now" (the drain handler's deadline is relative to it), so an
/// input always does the same thing.
const NOW_MS: u64 = 1_700_000_500_000;

fn new_vm(
    name: String,
    spec: Option<pb::VmSpec>,
    placement: Option<pb::Placement>,
    reschedule: &str,
    publish: &[String],
) -> Result<NewVm, ApiError> {
    Ok(NewVm {
        name,
        spec: spec_from_pb(spec)?,
        placement: placement_from_pb(placement)?,
        reschedule: reschedule_from_pb(reschedule)?,
        publish: publish_from_pb(publish)?,
    })
}

/// The command a request becomes, its request id, and whether it asks for
/// a dry run; `None` if the input is no such request or the handler
/// refuses it before making a command.
fn command(kind: u8, bytes: &[u8]) -> Option<(Command, String, bool)> {
    Some(match kind % 14 {
        0 => {
            let r = pb::CreateVmRequest::decode(bytes).ok()?;
            let vm = new_vm(r.name, r.spec, r.placement, &r.reschedule, &r.publish).ok()?;
            (create_command(vec![vm], !r.no_start, r.queue), r.request_id, false)
        }
        1 => {
            let r = pb::CreateVmsRequest::decode(bytes).ok()?;
            let mut vms = Vec::with_capacity(r.vms.len());
            for v in r.vms {
                vms.push(new_vm(v.name, v.spec, v.placement, &v.reschedule, &v.publish).ok()?);
            }
            (create_command(vms, !r.no_start, r.queue), r.request_id, r.dry_run)
        }
        2 => {
            let r = pb::SetNodeRequest::decode(bytes).ok()?;
            let id = r.request_id.clone();
            (set_node_command(r).ok()?, id, false)
        }
        3 => {
            let r = pb::SetQuotaRequest::decode(bytes).ok()?;
            let l = r.limits.unwrap_or_default();
            let limits =
                QuotaLimits { vcpus: l.vcpus, memory_mb: l.memory_mb, disk_gb: l.disk_gb, vms: l.vms };
            (Command::SetQuota { tenant: r.tenant, limits }, r.request_id, false)
        }
        4 => {
            let r = pb::SetSchedulerRequest::decode(bytes).ok()?;
            (Command::SetScheduler { strategy: Strategy::parse(&r.strategy)? }, r.request_id, false)
        }
        5 => {
            let r = pb::DrainNodeRequest::decode(bytes).ok()?;
            let deadline_ms = match r.deadline_secs {
                0 => 0,
                s if s > blixard_core::validate::MAX_DRAIN_DEADLINE_SECS => return None,
                s => NOW_MS + s * 1000,
            };
            (
                Command::DrainNode { id: r.node_id, max_parallel: r.max_parallel, deadline_ms },
                r.request_id,
                false,
            )
        }
        6 => {
            let r = pb::SetNodeTimeoutRequest::decode(bytes).ok()?;
            (Command::SetNodeTimeout { ms: r.timeout_ms }, r.request_id, false)
        }
        7 => {
            let r = pb::SetEligibleRequest::decode(bytes).ok()?;
            (Command::SetEligible { id: r.node_id }, r.request_id, false)
        }
        8 => {
            let r = pb::DeleteQuotaRequest::decode(bytes).ok()?;
            (Command::DeleteQuota { tenant: r.tenant }, r.request_id, false)
        }
        k @ 9..=11 => {
            let r = pb::VmNameRequest::decode(bytes).ok()?;
            let cmd = match k {
                9 => Command::StartVm { name: r.name },
                10 => Command::StopVm { name: r.name },
                _ => Command::RestartVm { name: r.name },
            };
            (cmd, r.request_id, false)
        }
        12 => {
            let r = pb::DeleteVmRequest::decode(bytes).ok()?;
            (Command::DeleteVm { name: r.name }, r.request_id, false)
        }
        _ => {
            let r = pb::MigrateVmRequest::decode(bytes).ok()?;
            (Command::MigrateVm { name: r.name, to: r.to_node }, r.request_id, false)
        }
    })
}

fuzz_target!(
    init: blixard_fuzz::init("api_request"),
    |data: &[u8]| {
        let Some((kind, bytes)) = data.split_first() else { return };
        let Some((cmd, request_id, dry_run)) = command(*kind, bytes) else { return };
        // The edge: the request id, then the command's own checks.
        let Ok(request) = RequestId::from_client_opt(&request_id) else { return };
        if cmd.validate().is_err() {
            return;
        }
        blixard_fuzz::round_trip(&cmd);
        let state = blixard_fuzz::fresh_state();
        if dry_run {
            match &cmd {
                Command::CreateVms { vms, .. } => {
                    if let Some(first) = vms.first() {
                        let _ = state.explain(first);
                    }
                }
                Command::CreateVmsV4 { vms, .. } => {
                    if let Some(first) = vms.first() {
                        let _ = state.explain(&NewVm::from(first));
                    }
                }
                _ => {}
            }
            let before = state.digest();
            let _ = state.dry_run(&cmd, NOW_MS);
            assert_eq!(state.digest(), before, "a dry run changed the state");
        }
        let p = Proposal { at_ms: NOW_MS, request, command: cmd };
        blixard_fuzz::apply_checked(&state, &p, 101);
        // A retry with the same request id returns the first outcome and
        // changes nothing.
        if p.request.is_some() {
            let before = state.digest();
            let first = state.image().requests.last().map(|(_, r)| r.clone());
            let again = state.apply(&p, 102);
            assert_eq!(Some(again), first, "a retried request got another outcome");
            assert_eq!(state.digest(), before, "a retried request changed the state");
        }
    }
);
