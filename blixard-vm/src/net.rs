//! Host networking for VMs: the node's VM bridge, one tap per VM, routes to
//! the VM subnets of other nodes, and outbound NAT.
//!
//! Everything here drives `ip` (iproute2) and `iptables` as child processes
//! and is idempotent: each `ensure_*` checks before it adds, each `remove_*`
//! is a no-op when there is nothing to remove. Errors are typed:
//! [`VmError::Unavailable`] when a tool or the `CAP_NET_ADMIN` capability is
//! missing (the message names which), [`VmError::Failed`] with the command
//! and its stderr otherwise, [`VmError::Config`] for a bad interface name.
//!
//! What Blixard adds is recognisable, so it can be removed without touching
//! anything else on the host:
//! - routes carry the route protocol [`ROUTE_PROTO`] (`ip route show proto
//!   211` lists exactly ours); [`sync_routes`] never adds, replaces or
//!   deletes a route without it;
//! - iptables rules carry the comment [`NAT_COMMENT`].
//!
//! Every function acts on the network namespace of the calling thread (the
//! tools it runs inherit it). [`in_netns`] runs a closure on a thread inside
//! a named namespace: that is how tests (and a backend built with
//! `QemuBackend::with_netns`) work without touching the host's own network.
use std::net::Ipv4Addr;
use std::path::Path;
use std::process::Command;

use crate::backend::VmError;

/// The route protocol number that tags Blixard's routes (`proto 211`).
/// Numbers above 200 are unassigned by the kernel and routing daemons.
pub const ROUTE_PROTO: u8 = 211;

/// The comment on every iptables rule Blixard adds.
pub const NAT_COMMENT: &str = "blixard-nat";

/// The kernel's limit on interface names (IFNAMSIZ - 1).
const MAX_IFNAME: usize = 15;

/// Capability bit of CAP_NET_ADMIN in CapEff.
const CAP_NET_ADMIN: u32 = 12;

/// An IPv4 network: address and prefix length.
pub type Ipv4Cidr = (Ipv4Addr, u8);

/// Can this process manage host networking? `Err` says why not, in one
/// sentence: the `ip` binary, `/dev/net/tun` or `CAP_NET_ADMIN` missing.
pub fn probe() -> Result<(), String> {
    match Command::new("ip").arg("-V").output() {
        Ok(o) if o.status.success() => {}
        Ok(o) => return Err(format!("`ip -V` failed ({}): reinstall the iproute2 package", o.status)),
        Err(e) => return Err(format!("the `ip` tool could not run ({e}): install the iproute2 package")),
    }
    if !Path::new("/dev/net/tun").exists() {
        return Err("/dev/net/tun does not exist: load the tun kernel module (modprobe tun)".into());
    }
    let status = std::fs::read_to_string("/proc/self/status")
        .map_err(|e| format!("cannot read /proc/self/status to check capabilities: {e}"))?;
    match cap_eff(&status) {
        Some(caps) if caps & (1 << CAP_NET_ADMIN) != 0 => Ok(()),
        Some(_) => {
            Err("this process lacks CAP_NET_ADMIN: run the node as root or grant it cap_net_admin".into())
        }
        None => {
            Err("no CapEff line in /proc/self/status: cannot tell whether this process has CAP_NET_ADMIN"
                .into())
        }
    }
}

/// The effective capability set from the text of `/proc/<pid>/status`.
fn cap_eff(status: &str) -> Option<u64> {
    let hex = status.lines().find_map(|l| l.strip_prefix("CapEff:"))?.trim();
    u64::from_str_radix(hex, 16).ok()
}

/// The node's VM bridge: VMs' taps join it, its address is their gateway.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Bridge {
    pub name: String,
    pub gateway: Ipv4Addr,
    pub prefix: u8,
}

impl Bridge {
    /// Creates the bridge if missing, gives it `gateway/prefix` if it lacks
    /// it, sets it up, and enables IPv4 forwarding (in the calling thread's
    /// namespace) so VMs reach beyond the host.
    pub fn ensure(&self) -> Result<(), VmError> {
        check_ifname(&self.name)?;
        check_prefix(self.prefix)?;
        if !link_exists(&self.name)? {
            let r = ip(&["link", "add", "name", &self.name, "type", "bridge"]);
            // Someone else created it meanwhile: fine.
            if r.is_err() && !link_exists(&self.name)? {
                r?;
            }
        }
        // `replace` adds the address or leaves it as is: idempotent.
        ip(&["addr", "replace", &format!("{}/{}", self.gateway, self.prefix), "dev", &self.name])?;
        ip(&["link", "set", &self.name, "up"])?;
        enable_forwarding()
    }

    /// Deletes the bridge (and its address) if it exists. IPv4 forwarding
    /// stays on: other things on the host may rely on it.
    pub fn remove(&self) -> Result<(), VmError> {
        check_ifname(&self.name)?;
        remove_link(&self.name)
    }
}

/// `net.ipv4.ip_forward = 1`. `/proc/sys/net` shows the namespace of the
/// thread that opens it.
fn enable_forwarding() -> Result<(), VmError> {
    let path = "/proc/sys/net/ipv4/ip_forward";
    if std::fs::read_to_string(path).is_ok_and(|v| v.trim() == "1") {
        return Ok(());
    }
    std::fs::write(path, "1\n").map_err(|e| match e.kind() {
        std::io::ErrorKind::PermissionDenied => {
            VmError::Unavailable(format!("cannot enable IPv4 forwarding ({path}: {e}): run the node as root"))
        }
        _ => VmError::io(format!("writing 1 to {path}"))(e),
    })
}

/// Creates the tap `tap` if missing and attaches it, up, to `bridge`. The
/// bridge must exist (the node creates it with [`Bridge::ensure`]).
pub fn ensure_tap(tap: &str, bridge: &str) -> Result<(), VmError> {
    check_ifname(tap)?;
    check_ifname(bridge)?;
    if !link_exists(bridge)? {
        return Err(VmError::Failed(format!(
            "cannot attach tap {tap}: the VM bridge {bridge} does not exist (the node creates it when it starts with VM networking)"
        )));
    }
    if !link_exists(tap)? {
        let r = ip(&["tuntap", "add", "dev", tap, "mode", "tap"]);
        if r.is_err() && !link_exists(tap)? {
            r?;
        }
    }
    ip(&["link", "set", tap, "master", bridge, "up"])?;
    Ok(())
}

/// Deletes the tap `tap`; no error if it does not exist.
pub fn remove_tap(tap: &str) -> Result<(), VmError> {
    check_ifname(tap)?;
    remove_link(tap)
}

/// True if a network interface named `name` exists (any kind).
pub fn link_exists(name: &str) -> Result<bool, VmError> {
    check_ifname(name)?;
    match run("ip", &["link", "show", "dev", name]) {
        Ok(_) => Ok(true),
        Err(RunError::Exit { stderr, .. }) if stderr.contains("does not exist") => Ok(false),
        Err(e) => Err(e.into_vm("ip")),
    }
}

fn remove_link(name: &str) -> Result<(), VmError> {
    if !link_exists(name)? {
        return Ok(());
    }
    match run("ip", &["link", "del", "dev", name]) {
        Ok(_) => Ok(()),
        // Gone meanwhile.
        Err(RunError::Exit { stderr, .. })
            if stderr.contains("Cannot find device") || stderr.contains("does not exist") =>
        {
            Ok(())
        }
        Err(e) => Err(e.into_vm("ip")),
    }
}

/// Makes the routes tagged [`ROUTE_PROTO`] exactly `wanted`: each entry is a
/// subnet (host bits are ignored) and the next hop to reach it. Adds the
/// missing ones, replaces those whose next hop changed, deletes tagged
/// routes no longer wanted. A subnet that already has a route without the
/// tag (the host's own, e.g. the bridge's connected route) is left alone and
/// reported in the error, after every other route was brought in line.
pub fn sync_routes(wanted: &[(Ipv4Cidr, Ipv4Addr)]) -> Result<(), VmError> {
    let mut want: Vec<(Ipv4Cidr, Ipv4Addr)> = Vec::with_capacity(wanted.len());
    for &(cidr, via) in wanted {
        check_prefix(cidr.1)?;
        let net = network(cidr);
        if let Some((_, other)) = want.iter().find(|(n, _)| *n == net) {
            if *other != via {
                return Err(VmError::Config(format!(
                    "route to {}/{} wanted via both {other} and {via}",
                    net.0, net.1
                )));
            }
            continue;
        }
        want.push((net, via));
    }
    let proto = ROUTE_PROTO.to_string();
    let current = parse_routes(&ip(&["-j", "-4", "route", "show", "proto", &proto])?)?;
    let plan = plan_routes(&current, &want);
    let mut conflicts = Vec::new();
    for ((addr, prefix), via) in &plan.replace {
        let dst = format!("{addr}/{prefix}");
        // Never replace a route that is not ours.
        let exact = parse_routes_any(&ip(&["-j", "-4", "route", "show", "exact", &dst])?)?;
        if exact.iter().any(|r| r.protocol.as_deref() != Some(proto.as_str())) {
            conflicts.push(dst);
            continue;
        }
        ip(&["route", "replace", &dst, "via", &via.to_string(), "proto", &proto])?;
    }
    for (addr, prefix) in &plan.delete {
        let dst = format!("{addr}/{prefix}");
        match run("ip", &["route", "del", &dst, "proto", &proto]) {
            Ok(_) => {}
            Err(RunError::Exit { stderr, .. }) if stderr.contains("No such process") => {}
            Err(e) => return Err(e.into_vm("ip")),
        }
    }
    if conflicts.is_empty() {
        Ok(())
    } else {
        Err(VmError::Failed(format!(
            "not routing {} through other nodes: the host already has a route there that Blixard does not own",
            conflicts.join(", ")
        )))
    }
}

/// What [`sync_routes`] changes.
#[derive(Debug, PartialEq, Eq)]
struct RoutePlan {
    replace: Vec<(Ipv4Cidr, Ipv4Addr)>,
    delete: Vec<Ipv4Cidr>,
}

fn plan_routes(current: &[(Ipv4Cidr, Option<Ipv4Addr>)], wanted: &[(Ipv4Cidr, Ipv4Addr)]) -> RoutePlan {
    let replace = wanted
        .iter()
        .filter(|(net, via)| !current.iter().any(|(c, v)| c == net && *v == Some(*via)))
        .copied()
        .collect();
    let mut delete: Vec<Ipv4Cidr> =
        current.iter().map(|(c, _)| *c).filter(|c| !wanted.iter().any(|(n, _)| n == c)).collect();
    delete.dedup();
    RoutePlan { replace, delete }
}

/// One route of `ip -j route show`.
#[derive(Debug, serde::Deserialize)]
struct JsonRoute {
    dst: String,
    gateway: Option<String>,
    /// Absent when the protocol is `boot`, or when the listing filtered on it.
    protocol: Option<String>,
}

fn parse_routes_any(json: &str) -> Result<Vec<JsonRoute>, VmError> {
    if json.trim().is_empty() {
        return Ok(Vec::new());
    }
    serde_json::from_str(json).map_err(|e| {
        VmError::Failed(format!("cannot parse the route list of `ip -j route show` ({e}): {json}"))
    })
}

/// Subnet and next hop of each route in `ip -j -4 route show` output.
fn parse_routes(json: &str) -> Result<Vec<(Ipv4Cidr, Option<Ipv4Addr>)>, VmError> {
    let mut out = Vec::new();
    for r in parse_routes_any(json)? {
        let cidr = parse_cidr(&r.dst).ok_or_else(|| {
            VmError::Failed(format!("unexpected destination {:?} in `ip -j route show` output", r.dst))
        })?;
        out.push((cidr, r.gateway.as_deref().and_then(|g| g.parse().ok())));
    }
    Ok(out)
}

/// "10.1.0.0/24" → (10.1.0.0, 24); a bare address is a /32; "default" is /0.
fn parse_cidr(s: &str) -> Option<Ipv4Cidr> {
    if s == "default" {
        return Some((Ipv4Addr::UNSPECIFIED, 0));
    }
    match s.split_once('/') {
        Some((a, p)) => {
            let p: u8 = p.parse().ok().filter(|p| *p <= 32)?;
            Some((a.parse().ok()?, p))
        }
        None => Some((s.parse().ok()?, 32)),
    }
}

/// The network of `cidr` (host bits cleared).
pub fn network((addr, prefix): Ipv4Cidr) -> Ipv4Cidr {
    let mask = if prefix == 0 { 0 } else { u32::MAX << (32 - u32::from(prefix.min(32))) };
    (Ipv4Addr::from(u32::from(addr) & mask), prefix.min(32))
}

/// Outbound NAT for `cidr`: traffic from it to anywhere else leaves with the
/// host's address (`-t nat POSTROUTING -s CIDR ! -d CIDR -j MASQUERADE`).
/// If the FORWARD chain's policy is DROP (Docker hosts do that), also
/// accepts forwarded traffic from and to `cidr`. Every rule is tagged
/// [`NAT_COMMENT`]; [`remove_nat`] removes them.
pub fn ensure_nat(cidr: Ipv4Cidr) -> Result<(), VmError> {
    check_prefix(cidr.1)?;
    let net = cidr_string(cidr);
    ensure_rule("nat", "POSTROUTING", &nat_rule(&net), false)?;
    if forward_policy_drops()? {
        for rule in forward_rules(&net) {
            ensure_rule("filter", "FORWARD", &rule, true)?;
        }
    }
    Ok(())
}

/// Removes every rule [`ensure_nat`] added for `cidr` (however many copies).
pub fn remove_nat(cidr: Ipv4Cidr) -> Result<(), VmError> {
    check_prefix(cidr.1)?;
    let net = cidr_string(cidr);
    remove_rule("nat", "POSTROUTING", &nat_rule(&net))?;
    for rule in forward_rules(&net) {
        remove_rule("filter", "FORWARD", &rule)?;
    }
    Ok(())
}

fn cidr_string(cidr: Ipv4Cidr) -> String {
    let (a, p) = network(cidr);
    format!("{a}/{p}")
}

fn nat_rule(net: &str) -> Vec<String> {
    tagged(&["-s", net, "!", "-d", net], "MASQUERADE")
}

fn forward_rules(net: &str) -> [Vec<String>; 2] {
    [tagged(&["-s", net], "ACCEPT"), tagged(&["-d", net], "ACCEPT")]
}

fn tagged(matches: &[&str], target: &str) -> Vec<String> {
    let mut r: Vec<String> = matches.iter().map(|s| s.to_string()).collect();
    r.extend(["-m", "comment", "--comment", NAT_COMMENT, "-j", target].map(String::from));
    r
}

/// True if `iptables -S FORWARD` says the policy is DROP.
fn forward_policy_drops() -> Result<bool, VmError> {
    let out = run("iptables", &["-S", "FORWARD"]).map_err(|e| e.into_vm("iptables"))?;
    Ok(forward_policy(&out) == Some("DROP"))
}

/// The policy in `iptables -S CHAIN` output ("-P FORWARD DROP").
fn forward_policy(listing: &str) -> Option<&str> {
    listing.lines().find_map(|l| l.strip_prefix("-P FORWARD ")).map(str::trim)
}

/// Is the rule in the chain? `iptables -C` exits 1 when it is not.
fn has_rule(table: &str, chain: &str, rule: &[String]) -> Result<bool, VmError> {
    let mut args = vec!["-t", table, "-C", chain];
    args.extend(rule.iter().map(String::as_str));
    match run("iptables", &args) {
        Ok(_) => Ok(true),
        Err(RunError::Exit { code: Some(1), .. }) => Ok(false),
        Err(e) => Err(e.into_vm("iptables")),
    }
}

fn ensure_rule(table: &str, chain: &str, rule: &[String], first: bool) -> Result<(), VmError> {
    if has_rule(table, chain, rule)? {
        return Ok(());
    }
    let mut args = vec!["-t", table, if first { "-I" } else { "-A" }, chain];
    args.extend(rule.iter().map(String::as_str));
    run("iptables", &args).map(|_| ()).map_err(|e| e.into_vm("iptables"))
}

fn remove_rule(table: &str, chain: &str, rule: &[String]) -> Result<(), VmError> {
    while has_rule(table, chain, rule)? {
        let mut args = vec!["-t", table, "-D", chain];
        args.extend(rule.iter().map(String::as_str));
        run("iptables", &args).map_err(|e| e.into_vm("iptables"))?;
    }
    Ok(())
}

/// Runs `f` on a new thread that joined the network namespace `netns` (a
/// name under `/run/netns`, as `ip netns add` makes). Everything in this
/// module, and every process `f` starts, then acts inside that namespace;
/// the rest of the process is unaffected.
pub fn in_netns<T: Send>(netns: &str, f: impl FnOnce() -> Result<T, VmError> + Send) -> Result<T, VmError> {
    use std::os::fd::AsRawFd;
    if netns.is_empty() || netns.contains('/') {
        return Err(VmError::Config(format!("invalid network namespace name {netns:?}")));
    }
    let path = Path::new("/run/netns").join(netns);
    let file = std::fs::File::open(&path).map_err(|e| {
        VmError::Config(format!("network namespace {netns} ({}) cannot be opened: {e}", path.display()))
    })?;
    std::thread::scope(|s| {
        s.spawn(|| {
            // SAFETY: setns(2) on a descriptor we hold open; it changes only
            // this (fresh, scoped) thread's network namespace.
            if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                let e = std::io::Error::last_os_error();
                return Err(VmError::Unavailable(format!(
                    "cannot enter network namespace {netns}: {e} (needs CAP_SYS_ADMIN)"
                )));
            }
            f()
        })
        .join()
        .map_err(|_| VmError::Failed(format!("a task in network namespace {netns} panicked")))?
    })
}

fn check_ifname(name: &str) -> Result<(), VmError> {
    let ok = !name.is_empty()
        && name.len() <= MAX_IFNAME
        && name != "."
        && name != ".."
        && name.bytes().all(|b| b.is_ascii_graphic() && b != b'/' && b != b':');
    if ok {
        Ok(())
    } else {
        Err(VmError::Config(format!(
            "interface name {name:?} is invalid: 1-{MAX_IFNAME} printable characters, no '/', ':' or spaces"
        )))
    }
}

fn check_prefix(prefix: u8) -> Result<(), VmError> {
    if prefix <= 32 {
        Ok(())
    } else {
        Err(VmError::Config(format!("prefix length {prefix} is invalid: an IPv4 prefix is 0-32")))
    }
}

/// `ip ARGS`, stdout on success.
fn ip(args: &[&str]) -> Result<String, VmError> {
    run("ip", args).map_err(|e| e.into_vm("ip"))
}

enum RunError {
    /// The tool could not be started.
    Spawn { command: String, error: std::io::Error },
    /// It ran and failed.
    Exit { command: String, code: Option<i32>, stderr: String },
}

impl RunError {
    fn into_vm(self, tool: &str) -> VmError {
        let package = if tool == "ip" { "iproute2" } else { tool };
        match self {
            RunError::Spawn { command, error } if error.kind() == std::io::ErrorKind::NotFound => {
                VmError::Unavailable(format!(
                    "`{tool}` is not installed (needed for `{command}`): install the {package} package"
                ))
            }
            RunError::Spawn { command, error } => {
                VmError::Unavailable(format!("`{command}` could not run: {error}"))
            }
            RunError::Exit { command, stderr, .. }
                if stderr.contains("Operation not permitted")
                    || stderr.contains("Permission denied")
                    || stderr.contains("you must be root") =>
            {
                VmError::Unavailable(format!(
                    "`{command}` was refused ({stderr}): managing VM networking needs CAP_NET_ADMIN (run the node as root)"
                ))
            }
            RunError::Exit { command, code, stderr } => {
                let code = code.map(|c| format!("code {c}")).unwrap_or_else(|| "a signal".into());
                VmError::Failed(format!("`{command}` failed with {code}: {stderr}"))
            }
        }
    }
}

fn run(tool: &str, args: &[&str]) -> Result<String, RunError> {
    let command = format!("{tool} {}", args.join(" "));
    let out = Command::new(tool)
        .args(args)
        .env("LC_ALL", "C")
        .output()
        .map_err(|error| RunError::Spawn { command: command.clone(), error })?;
    if out.status.success() {
        return Ok(String::from_utf8_lossy(&out.stdout).into_owned());
    }
    let stderr = String::from_utf8_lossy(&out.stderr).trim().to_string();
    Err(RunError::Exit { command, code: out.status.code(), stderr })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn a(s: &str) -> Ipv4Addr {
        s.parse().unwrap()
    }

    #[test]
    fn capabilities_from_status() {
        let s = "Name:\tx\nCapInh:\t0000000000000000\nCapEff:\t000001ffffffffff\n";
        assert_eq!(cap_eff(s), Some(0x1ff_ffff_ffff));
        assert!(cap_eff(s).unwrap() & (1 << CAP_NET_ADMIN) != 0);
        assert_eq!(cap_eff("CapEff:\t0000000000000000\n"), Some(0));
        assert_eq!(cap_eff("Name: x\n"), None);
    }

    #[test]
    fn cidrs_parse_and_normalise() {
        assert_eq!(parse_cidr("10.1.0.0/24"), Some((a("10.1.0.0"), 24)));
        assert_eq!(parse_cidr("10.1.0.7"), Some((a("10.1.0.7"), 32)));
        assert_eq!(parse_cidr("default"), Some((a("0.0.0.0"), 0)));
        assert_eq!(parse_cidr("10.1.0.0/33"), None);
        assert_eq!(parse_cidr("fe80::/64"), None);
        assert_eq!(network((a("10.1.2.3"), 24)), (a("10.1.2.0"), 24));
        assert_eq!(network((a("10.1.2.3"), 0)), (a("0.0.0.0"), 0));
        assert_eq!(network((a("10.1.2.3"), 32)), (a("10.1.2.3"), 32));
        assert_eq!(cidr_string((a("172.16.5.9"), 12)), "172.16.0.0/12");
    }

    #[test]
    fn routes_from_ip_json() {
        let json = r#"[{"dst":"10.8.0.0/24","gateway":"10.9.0.2","dev":"br0","flags":[]},
                       {"dst":"10.7.0.0/16","dev":"br0","protocol":"kernel","scope":"link","flags":[]}]"#;
        let r = parse_routes(json).unwrap();
        assert_eq!(r, vec![((a("10.8.0.0"), 24), Some(a("10.9.0.2"))), ((a("10.7.0.0"), 16), None)]);
        assert!(parse_routes("").unwrap().is_empty());
        assert!(parse_routes("[]").unwrap().is_empty());
        assert!(parse_routes("not json").is_err());
        let any = parse_routes_any(json).unwrap();
        assert_eq!(any[1].protocol.as_deref(), Some("kernel"));
        assert_eq!(any[0].protocol, None);
    }

    #[test]
    fn route_plans_add_replace_and_delete_only_what_differs() {
        let current = vec![
            ((a("10.1.0.0"), 24), Some(a("192.168.0.1"))),
            ((a("10.2.0.0"), 24), Some(a("192.168.0.2"))),
            ((a("10.3.0.0"), 24), Some(a("192.168.0.3"))),
        ];
        let wanted = vec![
            ((a("10.1.0.0"), 24), a("192.168.0.1")), // unchanged
            ((a("10.2.0.0"), 24), a("192.168.0.9")), // moved
            ((a("10.4.0.0"), 24), a("192.168.0.4")), // new
        ];
        let plan = plan_routes(&current, &wanted);
        assert_eq!(plan.replace, vec![wanted[1], wanted[2]]);
        assert_eq!(plan.delete, vec![(a("10.3.0.0"), 24)]);
        assert_eq!(plan_routes(&current, &[]).delete.len(), 3);
        assert_eq!(plan_routes(&[], &wanted).replace, wanted);
    }

    #[test]
    fn forward_policy_from_listing() {
        assert_eq!(forward_policy("-P FORWARD DROP\n-A FORWARD -j DOCKER-USER\n"), Some("DROP"));
        assert_eq!(forward_policy("-P FORWARD ACCEPT\n"), Some("ACCEPT"));
        assert_eq!(forward_policy(""), None);
    }

    #[test]
    fn rules_carry_the_comment() {
        let r = nat_rule("10.1.0.0/24");
        assert_eq!(
            r.join(" "),
            "-s 10.1.0.0/24 ! -d 10.1.0.0/24 -m comment --comment blixard-nat -j MASQUERADE"
        );
        let [from, to] = forward_rules("10.1.0.0/24");
        assert_eq!(from.join(" "), "-s 10.1.0.0/24 -m comment --comment blixard-nat -j ACCEPT");
        assert_eq!(to.join(" "), "-d 10.1.0.0/24 -m comment --comment blixard-nat -j ACCEPT");
    }

    #[test]
    fn interface_names() {
        for ok in ["br0", "blixard0", "bxt0a000005", "a23456789012345"] {
            assert!(check_ifname(ok).is_ok(), "{ok}");
        }
        for bad in ["", "a234567890123456", "a b", "a/b", "a:1", ".."] {
            assert!(matches!(check_ifname(bad), Err(VmError::Config(_))), "{bad:?}");
        }
        let net =
            crate::NetConfig { bridge: "br0".into(), ip: a("10.0.0.5"), prefix: 24, gateway: a("10.0.0.1") };
        assert_eq!(net.tap(), "bxt0a000005");
        assert!(check_ifname(&net.tap()).is_ok());
        let max = crate::NetConfig { ip: a("255.255.255.255"), ..net };
        assert!(check_ifname(&max.tap()).is_ok());
    }

    #[test]
    fn missing_tools_are_unavailable_and_name_the_package() {
        let e = run("blixard-no-such-tool", &["x"]).err().unwrap().into_vm("ip");
        assert!(matches!(&e, VmError::Unavailable(m) if m.contains("iproute2")), "{e}");
        let e = RunError::Exit {
            command: "ip link add".into(),
            code: Some(2),
            stderr: "RTNETLINK answers: Operation not permitted".into(),
        }
        .into_vm("ip");
        assert!(matches!(&e, VmError::Unavailable(m) if m.contains("CAP_NET_ADMIN")), "{e}");
        let e = RunError::Exit { command: "ip x".into(), code: Some(1), stderr: "boom".into() }.into_vm("ip");
        assert!(matches!(&e, VmError::Failed(m) if m == "`ip x` failed with code 1: boom"), "{e}");
    }
}
