//! The host side of the VM network on one node (qemu backend, with
//! CAP_NET_ADMIN): follows the replicated state and makes it real.
//!
//! - the node's bridge, holding the first address of its subnet (the
//!   gateway its VMs are given); each VM's tap joins it (the backend makes
//!   taps, see `blixard_vm::net`);
//! - a route to every other node's subnet via that node's advertised
//!   address, so VMs on different hosts reach each other when the hosts do
//!   (nodes on this same host need none: their bridges are local);
//! - with `--vm-nat`, masquerading of traffic leaving the VM network;
//! - published ports ([`super::ports`]).
//!
//! Everything it adds is tagged (route protocol, rule comment) and
//! idempotent; it runs after every state change and every few seconds, so
//! a rule removed by hand comes back. The bridge, routes and NAT stay when
//! the node process stops: the VMs keep running across a node restart.
use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use super::ports::{Forward, PortProxy};
use super::{NodeShared, VmNetworkConfig};
use crate::types::{Ipv4Net, NodeId, NodeStatus};

/// How often the host network is checked when nothing changes.
const RESYNC: Duration = Duration::from_secs(5);

/// The bridge of node `node` of cluster `cluster` on its host: unique per
/// (cluster, node), so several clusters' nodes can share a host, and within
/// the kernel's 15-byte name limit.
pub fn bridge_name(cluster: &str, node: NodeId) -> String {
    let mut h: u32 = 0x811c_9dc5;
    for b in cluster.bytes().chain(node.to_le_bytes()) {
        h ^= u32::from(b);
        h = h.wrapping_mul(0x0100_0193);
    }
    format!("bxb{h:08x}")
}

/// The host part of an advertised `host:port`, if it is an IPv4 address.
fn host_ip(addr: &str) -> Option<Ipv4Addr> {
    addr.rsplit_once(':').and_then(|(h, _)| h.parse().ok())
}

/// What the host network should be, read from the state.
#[derive(Debug, Default, PartialEq, Eq)]
struct Wanted {
    subnet: Option<Ipv4Net>,
    cidr: Option<Ipv4Net>,
    /// Other nodes' subnets and the address to reach each through.
    routes: Vec<((Ipv4Addr, u8), Ipv4Addr)>,
    ports: BTreeMap<u16, Forward>,
}

fn wanted(shared: &NodeShared) -> Wanted {
    let me = shared.id;
    let state = &shared.state;
    let subnet = state.with_node(me, |n| n.vm_subnet).flatten();
    let my_host = host_ip(&shared.addr);
    let mut routes = Vec::new();
    state.for_each_node(|n| {
        let (Some(s), Some(via)) = (n.vm_subnet, host_ip(&n.addr)) else { return };
        // Nodes on this host (same address, or loopback) have their
        // bridges here already.
        if n.id == me || n.status != NodeStatus::Active || via.is_loopback() || Some(via) == my_host {
            return;
        }
        routes.push(((s.addr, s.prefix), via));
    });
    routes.sort_unstable();
    let mut ports = BTreeMap::new();
    state.for_each_vm_on(me, |v| {
        let Some(ip) = v.ip else { return };
        for p in &v.publish {
            ports.insert(p.host, Forward { vm: v.name.clone(), target: SocketAddrV4::new(ip, p.guest) });
        }
    });
    Wanted { subnet, cidr: state.vm_cidr(), routes, ports }
}

/// Runs the node's host network until the node stops.
pub async fn run(shared: Arc<NodeShared>, cfg: VmNetworkConfig) {
    let bridge = bridge_name(&shared.cluster_id, shared.id);
    let proxy = PortProxy::new(Ipv4Addr::UNSPECIFIED);
    let mut applied = Wanted::default();
    let mut nat_on: Option<Ipv4Net> = None;
    let mut checked: Option<Instant> = None;
    loop {
        let changed = shared.state.changed().notified();
        tokio::pin!(changed);
        changed.as_mut().enable();
        let want = wanted(&shared);
        // The host is checked (tools run) when what it should be changed,
        // and every RESYNC; most state changes (VM reports) change nothing
        // here and cost one read of the tables.
        let due = want != applied || checked.is_none_or(|at| at.elapsed() >= RESYNC);
        if due {
            checked = Some(Instant::now());
            apply_host(&bridge, &want, &applied, cfg.nat, &mut nat_on).await;
        }
        for (port, fwd, why) in proxy.sync(&want.ports).await {
            tracing::warn!(port, vm = %fwd.vm, error = %why, "cannot publish a port (retrying)");
        }
        applied = want;
        tokio::select! {
            _ = changed => {}
            _ = tokio::time::sleep(RESYNC) => {}
        }
    }
}

/// Makes the host's bridge, routes and NAT what `want` says (idempotent).
async fn apply_host(bridge: &str, want: &Wanted, applied: &Wanted, nat: bool, nat_on: &mut Option<Ipv4Net>) {
    let bridge = bridge.to_string();
    if let Some(s) = want.subnet {
        let br = blixard_vm::net::Bridge { name: bridge.clone(), gateway: s.gateway(), prefix: s.prefix };
        match tokio::task::spawn_blocking(move || br.ensure()).await {
            Ok(Ok(())) => {
                if applied.subnet != Some(s) {
                    tracing::info!(bridge = %bridge, subnet = %s, "VM bridge up");
                }
            }
            Ok(Err(e)) => tracing::warn!(bridge = %bridge, error = %e, "cannot set up the VM bridge"),
            Err(e) => tracing::warn!(error = %e, "VM bridge task"),
        }
    }
    let routes = want.routes.clone();
    match tokio::task::spawn_blocking(move || blixard_vm::net::sync_routes(&routes)).await {
        Ok(Ok(())) => {
            if applied.routes != want.routes {
                tracing::info!(routes = ?want.routes, "routes to other nodes' VM subnets");
            }
        }
        Ok(Err(e)) => tracing::warn!(error = %e, "cannot set the routes to other nodes' VM subnets"),
        Err(e) => tracing::warn!(error = %e, "VM route task"),
    }
    if let (true, Some(cidr)) = (nat, want.cidr) {
        let c = (cidr.addr, cidr.prefix);
        match tokio::task::spawn_blocking(move || blixard_vm::net::ensure_nat(c)).await {
            Ok(Ok(())) => {
                if *nat_on != Some(cidr) {
                    tracing::info!(%cidr, "outbound NAT for the VM network");
                    *nat_on = Some(cidr);
                }
            }
            Ok(Err(e)) => tracing::warn!(error = %e, "cannot set up outbound NAT for the VM network"),
            Err(e) => tracing::warn!(error = %e, "VM NAT task"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bridge_names_fit_the_kernel_and_differ_per_cluster_and_node() {
        let a = bridge_name("c1", 1);
        assert!(a.len() <= 15 && a.starts_with("bxb"), "{a}");
        assert_ne!(a, bridge_name("c1", 2));
        assert_ne!(a, bridge_name("c2", 1));
        assert_eq!(a, bridge_name("c1", 1));
        assert_eq!(host_ip("10.0.0.2:7001"), Some(Ipv4Addr::new(10, 0, 0, 2)));
        assert_eq!(host_ip("node-2:7001"), None);
    }
}
