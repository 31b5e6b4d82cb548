//! The VM network's allocation index (format 6): which node holds which /24
//! of the cluster's VM network, which addresses of each subnet its VMs
//! hold, and which host ports they publish.
//!
//! Pure and deterministic like the rest of apply: addresses are handed out
//! lowest free first, subnets lowest free first, and nothing depends on
//! hash-map iteration order. The scheduler owns one [`NetIndex`] (it filters
//! nodes whose subnet is full or whose host port is taken); the state keeps
//! it in step with the node and VM tables and rebuilds it on restore.
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::Ipv4Addr;

use crate::types::{Ipv4Net, NodeId, PortMap, VmRecord, FIRST_VM_HOST, LAST_VM_HOST, NODE_SUBNET_PREFIX};

/// How many VMs a node subnet holds.
pub const ADDRESSES_PER_NODE: u32 = LAST_VM_HOST - FIRST_VM_HOST + 1;

/// What one node holds of the VM network.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct NodeNet {
    subnet: Option<Ipv4Net>,
    /// Host numbers (offsets in the subnet) its VMs hold.
    used: BTreeSet<u32>,
    /// Published host ports, with how many VMs hold each (more than one
    /// only transiently, never after a placement the filter checked).
    ports: BTreeMap<u16, u32>,
    /// The node's own API port: never published.
    api_port: Option<u16>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NetIndex {
    /// The cluster's VM network; `None` until it is set.
    cidr: Option<Ipv4Net>,
    nodes: HashMap<NodeId, NodeNet>,
}

/// Why a node cannot hold a VM's network needs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NetRefusal {
    /// The node has no subnet (the VM network had none left for it).
    NoSubnet,
    /// Every address of its subnet is held.
    Full,
    /// A host port the VM publishes is taken there.
    Port(u16),
}

/// The API port in a node's advertised `host:port`.
pub fn api_port(addr: &str) -> Option<u16> {
    addr.rsplit_once(':').and_then(|(_, p)| p.parse().ok())
}

impl NetIndex {
    pub fn cidr(&self) -> Option<Ipv4Net> {
        self.cidr
    }

    pub fn set_cidr(&mut self, cidr: Option<Ipv4Net>) {
        self.cidr = cidr;
    }

    /// Records node `id`'s subnet and API port (`None` forgets the node).
    pub fn set_node(&mut self, id: NodeId, node: Option<(Option<Ipv4Net>, Option<u16>)>) {
        match node {
            Some((subnet, api_port)) => {
                let n = self.nodes.entry(id).or_default();
                n.subnet = subnet;
                n.api_port = api_port;
            }
            None => {
                if self.nodes.get(&id).is_some_and(|n| n.used.is_empty() && n.ports.is_empty()) {
                    self.nodes.remove(&id);
                } else if let Some(n) = self.nodes.get_mut(&id) {
                    n.subnet = None;
                    n.api_port = None;
                }
            }
        }
    }

    /// Counts (or uncounts) the address and published ports `vm` holds on
    /// its holder node.
    pub fn hold(&mut self, vm: &VmRecord, add: bool) {
        let holder = vm.holder();
        if holder == 0 || (vm.ip.is_none() && vm.publish.is_empty()) {
            return;
        }
        let n = self.nodes.entry(holder).or_default();
        if let (Some(ip), Some(subnet)) = (vm.ip, n.subnet) {
            let host = u32::from(ip).wrapping_sub(u32::from(subnet.network()));
            if add {
                n.used.insert(host);
            } else {
                n.used.remove(&host);
            }
        }
        for p in &vm.publish {
            match n.ports.get_mut(&p.host) {
                Some(c) if add => *c += 1,
                Some(c) => {
                    *c -= 1;
                    if *c == 0 {
                        n.ports.remove(&p.host);
                    }
                }
                None if add => {
                    n.ports.insert(p.host, 1);
                }
                None => {}
            }
        }
        if n.subnet.is_none() && n.api_port.is_none() && n.used.is_empty() && n.ports.is_empty() {
            self.nodes.remove(&holder);
        }
    }

    /// Whether node `id` can take a VM publishing `publish`: with a VM
    /// network, it needs a subnet with a free address; every host port
    /// must be free there (and not the node's API port).
    pub fn check(&self, id: NodeId, publish: &[PortMap]) -> Result<(), NetRefusal> {
        let n = self.nodes.get(&id);
        if self.cidr.is_some() {
            let Some(subnet_holder) = n.filter(|n| n.subnet.is_some()) else {
                return Err(NetRefusal::NoSubnet);
            };
            if subnet_holder.used.len() as u32 >= ADDRESSES_PER_NODE {
                return Err(NetRefusal::Full);
            }
        }
        if let Some(n) = n {
            if let Some(p) =
                publish.iter().find(|p| n.ports.contains_key(&p.host) || n.api_port == Some(p.host))
            {
                return Err(NetRefusal::Port(p.host));
            }
        }
        Ok(())
    }

    /// The lowest free address of node `id`'s subnet.
    pub fn lowest_free(&self, id: NodeId) -> Option<Ipv4Addr> {
        let n = self.nodes.get(&id)?;
        let subnet = n.subnet?;
        (FIRST_VM_HOST..=LAST_VM_HOST).find(|h| !n.used.contains(h)).map(|h| subnet.nth(h))
    }

    /// The lowest /24 of the VM network that no node in `taken` holds.
    pub fn free_subnet(&self, taken: &BTreeSet<Ipv4Net>) -> Option<Ipv4Net> {
        let cidr = self.cidr?;
        if cidr.prefix > NODE_SUBNET_PREFIX {
            return None;
        }
        let count = 1u64 << (NODE_SUBNET_PREFIX - cidr.prefix);
        (0..count)
            .map(|i| Ipv4Net {
                addr: cidr.nth(u32::try_from(i << 8).unwrap_or(u32::MAX)),
                prefix: NODE_SUBNET_PREFIX,
            })
            .find(|s| !taken.contains(s))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net(s: &str) -> Ipv4Net {
        Ipv4Net::parse(s).unwrap()
    }

    #[test]
    fn subnets_and_addresses_go_lowest_free_first() {
        let mut ix = NetIndex::default();
        assert_eq!(ix.free_subnet(&BTreeSet::new()), None, "no VM network yet");
        ix.set_cidr(Some(net("10.88.0.0/16")));
        let mut taken = BTreeSet::new();
        assert_eq!(ix.free_subnet(&taken), Some(net("10.88.0.0/24")));
        taken.insert(net("10.88.0.0/24"));
        taken.insert(net("10.88.2.0/24"));
        assert_eq!(ix.free_subnet(&taken), Some(net("10.88.1.0/24")));
        ix.set_cidr(Some(net("10.9.8.0/24")));
        assert_eq!(ix.free_subnet(&BTreeSet::new()), Some(net("10.9.8.0/24")));
        assert_eq!(ix.free_subnet(&[net("10.9.8.0/24")].into()), None, "a /24 network has one subnet");

        ix.set_node(1, Some((Some(net("10.9.8.0/24")), Some(7001))));
        assert_eq!(ix.lowest_free(1), Some("10.9.8.2".parse().unwrap()));
        assert_eq!(ix.check(2, &[]), Err(NetRefusal::NoSubnet));
        assert_eq!(ix.check(1, &[PortMap { host: 7001, guest: 80 }]), Err(NetRefusal::Port(7001)));
    }

    #[test]
    fn a_full_subnet_refuses_and_frees_on_release() {
        let mut ix = NetIndex::default();
        ix.set_cidr(Some(net("10.88.0.0/16")));
        ix.set_node(1, Some((Some(net("10.88.0.0/24")), None)));
        let mut vms = Vec::new();
        for i in 0..ADDRESSES_PER_NODE {
            let ip = ix.lowest_free(1).unwrap();
            assert_eq!(ip, Ipv4Addr::new(10, 88, 0, (2 + i) as u8));
            let vm = test_vm(&format!("v{i}"), 1, Some(ip), vec![]);
            ix.hold(&vm, true);
            vms.push(vm);
        }
        assert_eq!(ix.lowest_free(1), None);
        assert_eq!(ix.check(1, &[]), Err(NetRefusal::Full));
        ix.hold(&vms[5], false);
        assert_eq!(ix.lowest_free(1), Some(Ipv4Addr::new(10, 88, 0, 7)));
        assert_eq!(ix.check(1, &[]), Ok(()));
    }

    #[test]
    fn ports_are_per_node() {
        let mut ix = NetIndex::default();
        let web = test_vm("web", 1, None, vec![PortMap { host: 8080, guest: 80 }]);
        ix.hold(&web, true);
        let p = [PortMap { host: 8080, guest: 8080 }];
        assert_eq!(ix.check(1, &p), Err(NetRefusal::Port(8080)));
        assert_eq!(ix.check(2, &p), Ok(()));
        ix.hold(&web, false);
        assert_eq!(ix.check(1, &p), Ok(()));
        assert_eq!(ix, NetIndex::default(), "nothing left behind");
    }

    pub(crate) fn test_vm(name: &str, node: NodeId, ip: Option<Ipv4Addr>, publish: Vec<PortMap>) -> VmRecord {
        VmRecord {
            name: name.into(),
            spec: Default::default(),
            node_id: node,
            desired: crate::types::DesiredState::Running,
            observed: crate::types::ObservedState::Running,
            created_at_ms: 0,
            updated_at_ms: 0,
            revision: 0,
            generation: 0,
            runtime: Default::default(),
            placement: Default::default(),
            queued_at: 0,
            preempted_by: String::new(),
            leaving: 0,
            reschedule: Default::default(),
            history: Vec::new(),
            moving: None,
            placement_gen: 0,
            ip,
            publish,
        }
    }
}
