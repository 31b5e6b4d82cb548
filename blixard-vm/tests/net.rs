//! Host networking (`blixard_vm::net`) against the real `ip` and `iptables`,
//! inside a network namespace this test creates (`bxtest-<pid>-<tag>`) and
//! deletes in a drop guard, even on panic: the host's own network is never
//! touched. Every call runs on a thread that joined the namespace
//! ([`net::in_netns`]). Needs root, iproute2 and iptables: fails, does not
//! skip, without them.
#![cfg(not(madsim))]
mod common;

use std::net::Ipv4Addr;

use blixard_vm::VmError;
use common::Netns;

use blixard_vm::net::{self, Bridge, NAT_COMMENT, ROUTE_PROTO};

fn a(s: &str) -> Ipv4Addr {
    s.parse().unwrap()
}

#[test]
fn probe_says_yes_as_root() {
    net::probe().expect("this test runs as root with iproute2 and /dev/net/tun");
}

#[test]
fn bridge_and_tap_are_created_idempotently_and_removed() {
    let ns = Netns::new("br");
    let br = Bridge { name: "bxbr0".into(), gateway: a("10.77.0.1"), prefix: 24 };
    ns.run(|| br.ensure());
    ns.run(|| br.ensure());
    let link = ns.sh("ip -o link show dev bxbr0");
    assert!(link.contains("bridge") || ns.sh("ip -d -o link show dev bxbr0").contains("bridge"), "{link}");
    assert!(link.contains(",UP"), "bridge not up: {link}");
    let addrs = ns.sh("ip -o -4 addr show dev bxbr0");
    assert_eq!(addrs.matches("10.77.0.1/24").count(), 1, "{addrs}");
    assert_eq!(ns.sh("cat /proc/sys/net/ipv4/ip_forward").trim(), "1");

    ns.run(|| net::ensure_tap("bxt0a4d0005", "bxbr0"));
    ns.run(|| net::ensure_tap("bxt0a4d0005", "bxbr0"));
    let tap = ns.sh("ip -d -o link show dev bxt0a4d0005");
    assert!(tap.contains("tun") && tap.contains("master bxbr0"), "{tap}");
    assert!(ns.run(|| net::link_exists("bxt0a4d0005")));

    // A tap needs its bridge.
    match net::in_netns(&ns.0, || net::ensure_tap("bxt0a4d0006", "nosuchbr")) {
        Err(VmError::Failed(m)) => assert!(m.contains("bridge nosuchbr does not exist"), "{m}"),
        other => panic!("expected Failed, got {other:?}"),
    }
    assert!(matches!(
        net::in_netns(&ns.0, || net::ensure_tap("much-too-long-name", "bxbr0")),
        Err(VmError::Config(_))
    ));

    ns.run(|| net::remove_tap("bxt0a4d0005"));
    ns.run(|| net::remove_tap("bxt0a4d0005"));
    assert!(!ns.run(|| net::link_exists("bxt0a4d0005")));
    ns.run(|| br.remove());
    ns.run(|| br.remove());
    assert!(!ns.run(|| net::link_exists("bxbr0")));
    let links = ns.sh("ip -o link show");
    assert_eq!(links.lines().count(), 1, "only lo should be left: {links}");
}

#[test]
fn routes_are_synced_and_only_tagged_ones_are_touched() {
    let ns = Netns::new("rt");
    let br = Bridge { name: "bxbr0".into(), gateway: a("10.78.0.1"), prefix: 24 };
    ns.run(|| br.ensure());
    // A route that is not ours, to a subnet we will also be asked for.
    ns.sh("ip route add 10.99.0.0/24 via 10.78.0.99");
    let tagged = || ns.sh(&format!("ip -4 route show proto {ROUTE_PROTO}"));

    let want1 = [((a("10.1.0.0"), 24), a("10.78.0.2")), ((a("10.2.0.5"), 24), a("10.78.0.3"))];
    ns.run(|| net::sync_routes(&want1));
    ns.run(|| net::sync_routes(&want1));
    let r = tagged();
    assert!(r.contains("10.1.0.0/24 via 10.78.0.2"), "{r}");
    assert!(r.contains("10.2.0.0/24 via 10.78.0.3"), "host bits are dropped: {r}");
    assert_eq!(r.lines().count(), 2, "{r}");

    // One moves, one goes, one comes; the foreign route is refused, not replaced.
    let want2 = [
        ((a("10.1.0.0"), 24), a("10.78.0.4")),
        ((a("10.3.0.0"), 16), a("10.78.0.2")),
        ((a("10.99.0.0"), 24), a("10.78.0.5")),
    ];
    match net::in_netns(&ns.0, || net::sync_routes(&want2)) {
        Err(VmError::Failed(m)) => assert!(m.contains("10.99.0.0/24"), "{m}"),
        other => panic!("expected the foreign route to be reported, got {other:?}"),
    }
    let r = tagged();
    assert!(r.contains("10.1.0.0/24 via 10.78.0.4"), "{r}");
    assert!(r.contains("10.3.0.0/16 via 10.78.0.2"), "{r}");
    assert!(!r.contains("10.2.0.0"), "{r}");
    assert_eq!(r.lines().count(), 2, "{r}");
    let all = ns.sh("ip -4 route show");
    assert!(all.contains("10.99.0.0/24 via 10.78.0.99"), "the foreign route was changed: {all}");

    // Nothing wanted: all of ours go, nothing else.
    ns.run(|| net::sync_routes(&[]));
    assert_eq!(tagged(), "");
    let all = ns.sh("ip -4 route show");
    assert!(all.contains("10.99.0.0/24 via 10.78.0.99") && all.contains("10.78.0.0/24 dev bxbr0"), "{all}");
    ns.run(|| br.remove());
}

#[test]
fn nat_rules_are_added_once_and_removed() {
    let ns = Netns::new("nat");
    let cidr = (a("10.79.0.9"), 24);
    let ours = |ns: &Netns| {
        let nat = ns.sh("iptables -t nat -S POSTROUTING");
        let fwd = ns.sh("iptables -S FORWARD");
        (
            nat.lines().filter(|l| l.contains(NAT_COMMENT)).map(String::from).collect::<Vec<_>>(),
            fwd.lines().filter(|l| l.contains(NAT_COMMENT)).map(String::from).collect::<Vec<_>>(),
        )
    };
    // FORWARD policy ACCEPT: only the MASQUERADE rule.
    ns.run(|| net::ensure_nat(cidr));
    ns.run(|| net::ensure_nat(cidr));
    let (nat, fwd) = ours(&ns);
    assert_eq!(nat.len(), 1, "{nat:?}");
    assert!(nat[0].contains("-s 10.79.0.0/24 ! -d 10.79.0.0/24") && nat[0].contains("MASQUERADE"), "{nat:?}");
    assert!(fwd.is_empty(), "{fwd:?}");

    // A Docker-like host: FORWARD drops by default, so accept ours first.
    ns.sh("iptables -P FORWARD DROP && iptables -A FORWARD -j DROP");
    ns.run(|| net::ensure_nat(cidr));
    ns.run(|| net::ensure_nat(cidr));
    let (nat, fwd) = ours(&ns);
    assert_eq!(nat.len(), 1, "{nat:?}");
    assert_eq!(fwd.len(), 2, "{fwd:?}");
    let listing = ns.sh("iptables -S FORWARD");
    let first_rule = listing.lines().find(|l| l.starts_with("-A")).unwrap();
    assert!(first_rule.contains(NAT_COMMENT), "accept rules must come before the DROP: {listing}");

    ns.run(|| net::remove_nat(cidr));
    ns.run(|| net::remove_nat(cidr));
    let (nat, fwd) = ours(&ns);
    assert!(nat.is_empty() && fwd.is_empty(), "{nat:?} {fwd:?}");
    assert!(ns.sh("iptables -S FORWARD").contains("-A FORWARD -j DROP"), "a foreign rule was removed");
}

#[test]
fn a_missing_namespace_is_a_config_error() {
    match net::in_netns("bxtest-does-not-exist", || Ok(())) {
        Err(VmError::Config(m)) => assert!(m.contains("bxtest-does-not-exist"), "{m}"),
        other => panic!("expected Config, got {other:?}"),
    }
}
