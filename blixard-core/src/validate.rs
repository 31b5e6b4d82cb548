//! Edge validation shared by the API (reject before proposing) and by apply
//! (reject a malformed entry deterministically on every replica), except
//! [`image_names`]: the API edge's alone (see there).
use std::collections::BTreeMap;

use blixard_vm::image_dir::{is_image_name, IMAGE_NAME_RULE};

use crate::error::CommandError;
use crate::types::{Resources, VmSpec};

pub const MAX_NAME_LEN: usize = 63;
pub const MAX_VCPUS: u32 = 64;
pub const MIN_MEMORY_MB: u64 = 16;
pub const MAX_MEMORY_MB: u64 = 1024 * 1024;
pub const MAX_DISK_GB: u64 = 64 * 1024;
pub const MAX_LABELS: usize = 32;
pub const MAX_LABEL_VALUE_LEN: usize = 255;
pub const MAX_ADDR_LEN: usize = 255;
pub const MAX_BATCH: usize = 1024;
pub const MAX_PATH_LEN: usize = 4096;
pub const MAX_CMDLINE_LEN: usize = 2048;
/// Failure reasons carry a stderr tail; longer ones are cut by the node.
pub const MAX_REASON_LEN: usize = 4096;
/// A node may offer at most this much; far above any real host, low enough
/// that sums of VMs never overflow.
pub const MAX_NODE_VCPUS: u32 = 1 << 16;
pub const MAX_NODE_MEMORY_MB: u64 = 1 << 32;
pub const MAX_NODE_DISK_GB: u64 = 1 << 32;

const NAME_RULE: &str = "1-63 characters of a-z, 0-9 and '-', starting with a letter, not ending with '-'";

/// Longest client-chosen request id.
pub const MAX_REQUEST_ID_LEN: usize = 128;

/// A client's request id: 1-128 printable ASCII characters, no spaces.
pub fn request_id(id: &str) -> Result<(), CommandError> {
    let ok = !id.is_empty() && id.len() <= MAX_REQUEST_ID_LEN && id.bytes().all(|c| c.is_ascii_graphic());
    if ok {
        Ok(())
    } else {
        Err(CommandError::invalid(
            "request id",
            id,
            format!("1-{MAX_REQUEST_ID_LEN} printable ASCII characters without spaces"),
        ))
    }
}

/// VM names (and tenants) are DNS labels, so they can name files, taps and hosts.
pub fn vm_name(name: &str) -> Result<(), CommandError> {
    dns_label("VM name", name)
}

fn dns_label(what: &str, s: &str) -> Result<(), CommandError> {
    let b = s.as_bytes();
    let ok = !b.is_empty()
        && b.len() <= MAX_NAME_LEN
        && b[0].is_ascii_lowercase()
        && b[b.len() - 1] != b'-'
        && b.iter().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-');
    if ok {
        Ok(())
    } else {
        Err(CommandError::invalid(what, s, NAME_RULE))
    }
}

pub fn vm_spec(spec: &VmSpec) -> Result<(), CommandError> {
    range("vcpus", spec.vcpus as u64, 1, MAX_VCPUS as u64)?;
    range("memory_mb", spec.memory_mb, MIN_MEMORY_MB, MAX_MEMORY_MB)?;
    // 0: no data disk.
    range("disk_gb", spec.disk_gb, 0, MAX_DISK_GB)?;
    labels(&spec.labels)?;
    if !spec.tenant.is_empty() {
        dns_label("tenant", &spec.tenant)?;
    }
    boot(&spec.boot)
}

/// Kernel and initrd are image names (see [`image_names`]) or, in entries
/// written before image names existed, absolute paths on the node; an
/// initrd needs a kernel; the command line is printable and bounded.
///
/// This runs in apply, so it must keep accepting every entry older versions
/// committed, with the same result (rejections are recorded in the dedup
/// window of the replicated state): an absolute path goes through exactly
/// the check it always did. Image names, which the edge now requires, are
/// accepted too; older versions refused relative paths at their edge, so no
/// committed entry holds one and none changes outcome. Whether an old
/// absolute path may actually be booted is for the node that runs the VM
/// to decide (blixard-vm's `ImageDir::resolve`: only inside its image
/// directory), never for apply, which would then depend on that node's
/// files.
pub fn boot(b: &crate::types::BootSpec) -> Result<(), CommandError> {
    for (what, p) in [("kernel path", &b.kernel), ("initrd path", &b.initrd)] {
        if p.is_empty() {
            continue;
        }
        if p.starts_with('/') {
            if p.len() > MAX_PATH_LEN || p.chars().any(char::is_control) {
                return Err(CommandError::invalid(
                    what,
                    p,
                    "an absolute path on the node, at most 4096 characters",
                ));
            }
        } else if !is_image_name(p) {
            return Err(CommandError::invalid(what, p, IMAGE_NAME_RULE));
        }
    }
    if b.kernel.is_empty() && !b.initrd.is_empty() {
        return Err(CommandError::invalid("initrd path", &b.initrd, "only together with a kernel"));
    }
    if b.cmdline.len() > MAX_CMDLINE_LEN || b.cmdline.chars().any(char::is_control) {
        return Err(CommandError::invalid(
            "kernel command line",
            &b.cmdline,
            "at most 2048 printable characters",
        ));
    }
    Ok(())
}

/// The API edge's rule for a new VM's kernel and initrd: empty (the default
/// guest image) or an image name, a file in the image directory of the node
/// that runs it (`--image-dir`), never a host path. Refuses absolute paths,
/// `..` and every name [`blixard_vm::image_dir::is_image_name`] refuses,
/// with the rule.
///
/// Only at the edge, never in apply ([`boot`] there still accepts the
/// absolute paths older versions committed: rejecting them on replay would
/// give a replaying node another state than its peers). A symlink inside
/// the image directory that leads out of it is refused by the node that
/// boots the VM, the check that holds for old records as well.
pub fn image_names(b: &crate::types::BootSpec) -> Result<(), CommandError> {
    for (what, name) in [("kernel", &b.kernel), ("initrd", &b.initrd)] {
        if !name.is_empty() && !is_image_name(name) {
            return Err(CommandError::invalid(what, name, IMAGE_NAME_RULE));
        }
    }
    Ok(())
}

/// At most this many constraints per VM.
pub const MAX_CONSTRAINTS: usize = 16;

/// A VM's placement rules: a known shape (the node's existence is apply's
/// business), label keys and values as for labels, a DNS-label group,
/// priority 0-100.
pub fn placement(p: &crate::types::Placement) -> Result<(), CommandError> {
    if p.constraints.len() > MAX_CONSTRAINTS {
        return Err(CommandError::invalid(
            "constraint count",
            p.constraints.len(),
            format!("at most {MAX_CONSTRAINTS} constraints"),
        ));
    }
    for c in &p.constraints {
        label_key(&c.key)?;
        if c.value.len() > MAX_LABEL_VALUE_LEN || c.value.chars().any(char::is_control) {
            return Err(CommandError::invalid(
                "constraint value",
                &c.value,
                "at most 255 characters, no control characters",
            ));
        }
    }
    if !p.anti_affinity.is_empty() {
        dns_label("anti-affinity group", &p.anti_affinity)?;
    }
    if !p.spread_by.is_empty() {
        label_key(&p.spread_by)?;
    }
    range("priority", u64::from(p.priority), 0, u64::from(crate::types::MAX_PRIORITY))
}

pub fn node_capacity(c: &Resources) -> Result<(), CommandError> {
    range("node vcpus", c.vcpus as u64, 1, MAX_NODE_VCPUS as u64)?;
    range("node memory_mb", c.memory_mb, 64, MAX_NODE_MEMORY_MB)?;
    range("node disk_gb", c.disk_gb, 1, MAX_NODE_DISK_GB)?;
    Ok(())
}

/// `host:port` with a non-zero port; host is an IP or a hostname.
pub fn addr(addr: &str) -> Result<(), CommandError> {
    const RULE: &str = "HOST:PORT with a port in 1-65535, at most 255 characters";
    let bad = || CommandError::invalid("address", addr, RULE);
    if addr.is_empty() || addr.len() > MAX_ADDR_LEN {
        return Err(bad());
    }
    let (host, port) = addr.rsplit_once(':').ok_or_else(bad)?;
    let port: u16 = port.parse().map_err(|_| bad())?;
    if port == 0 || host.is_empty() || host.chars().any(|c| c.is_whitespace() || c == '/') {
        return Err(bad());
    }
    Ok(())
}

pub fn labels(labels: &BTreeMap<String, String>) -> Result<(), CommandError> {
    if labels.len() > MAX_LABELS {
        return Err(CommandError::invalid(
            "label count",
            labels.len(),
            format!("at most {MAX_LABELS} labels"),
        ));
    }
    for (k, v) in labels {
        label_key(k)?;
        if v.len() > MAX_LABEL_VALUE_LEN || v.chars().any(char::is_control) {
            return Err(CommandError::invalid(
                "label value",
                v,
                "at most 255 characters, no control characters",
            ));
        }
    }
    Ok(())
}

pub fn label_key(k: &str) -> Result<(), CommandError> {
    let kb = k.as_bytes();
    let key_ok = !kb.is_empty()
        && kb.len() <= MAX_NAME_LEN
        && kb.iter().all(|c| c.is_ascii_alphanumeric() || matches!(c, b'-' | b'_' | b'.' | b'/'));
    if !key_ok {
        return Err(CommandError::invalid(
            "label key",
            k,
            "1-63 characters of A-Z, a-z, 0-9, '-', '_', '.', '/'",
        ));
    }
    Ok(())
}

/// A named tenant (a DNS label, like a VM's `tenant`).
pub fn tenant(t: &str) -> Result<(), CommandError> {
    dns_label("tenant", t)
}

/// A token's name (a DNS label).
pub fn token_name(n: &str) -> Result<(), CommandError> {
    dns_label("token name", n)
}

pub fn node_id(id: crate::types::NodeId) -> Result<(), CommandError> {
    if id == 0 {
        return Err(CommandError::invalid("node id", id, "a positive integer"));
    }
    Ok(())
}

pub fn ratio(r: crate::types::Ratio) -> Result<(), CommandError> {
    use crate::types::Ratio;
    if !(Ratio::MIN..=Ratio::MAX).contains(&r) {
        return Err(CommandError::invalid(
            "overcommit ratio",
            r,
            format!("between {} and {}", Ratio::MIN, Ratio::MAX),
        ));
    }
    Ok(())
}

/// Capacity in range, the reservation within the capacity (some of every
/// dimension left to allocate), ratios in range.
pub fn node_resources(r: &crate::types::NodeResources) -> Result<(), CommandError> {
    node_capacity(&r.capacity)?;
    let c = &r.capacity;
    let v = &r.reserved;
    if v.vcpus >= c.vcpus {
        return Err(CommandError::invalid(
            "reserved vcpus",
            v.vcpus,
            format!("below the node's {} vCPUs", c.vcpus),
        ));
    }
    if v.memory_mb >= c.memory_mb {
        return Err(CommandError::invalid(
            "reserved memory_mb",
            v.memory_mb,
            format!("below the node's {} MiB", c.memory_mb),
        ));
    }
    if v.disk_gb >= c.disk_gb {
        return Err(CommandError::invalid(
            "reserved disk_gb",
            v.disk_gb,
            format!("below the node's {} GiB", c.disk_gb),
        ));
    }
    ratio(r.cpu_overcommit)?;
    ratio(r.memory_overcommit)
}

fn range(what: &str, v: u64, min: u64, max: u64) -> Result<(), CommandError> {
    if v < min || v > max {
        Err(CommandError::invalid(what, v, format!("between {min} and {max}")))
    } else {
        Ok(())
    }
}

/// How many VMs one create command may carry: 1 to [`MAX_BATCH`].
pub fn vm_count(n: usize) -> Result<(), CommandError> {
    if n == 0 || n > MAX_BATCH {
        return Err(CommandError::invalid("VM count", n, format!("between 1 and {MAX_BATCH}")));
    }
    Ok(())
}

/// One VM of a create command: its name, spec and placement rules.
pub fn new_vm(name: &str, spec: &VmSpec, placement: &crate::types::Placement) -> Result<(), CommandError> {
    vm_name(name)?;
    vm_spec(spec)?;
    self::placement(placement)
}

/// How many ports one VM may publish.
pub const MAX_PUBLISHED_PORTS: usize = 16;

/// A VM's published ports: at most [`MAX_PUBLISHED_PORTS`], ports 1-65535,
/// each host port once.
pub fn publish(ports: &[crate::types::PortMap]) -> Result<(), CommandError> {
    if ports.len() > MAX_PUBLISHED_PORTS {
        return Err(CommandError::invalid(
            "published port count",
            ports.len(),
            format!("at most {MAX_PUBLISHED_PORTS}"),
        ));
    }
    for (i, p) in ports.iter().enumerate() {
        if p.host == 0 || p.guest == 0 {
            return Err(CommandError::invalid("published port", p, "HOST_PORT:GUEST_PORT, both 1-65535"));
        }
        if ports[..i].iter().any(|q| q.host == p.host) {
            return Err(CommandError::invalid("published port", p, "each host port published once"));
        }
    }
    Ok(())
}

/// A VM network: an aligned IPv4 network of /8 to /24 (each node gets a
/// /24 of it), private or at least not loopback, multicast or reserved.
pub fn vm_cidr(cidr: &crate::types::Ipv4Net) -> Result<(), CommandError> {
    let allowed = "an aligned IPv4 network of /8 to /24 outside 0.0.0.0/8, 127.0.0.0/8 and 224.0.0.0/3 (e.g. 10.88.0.0/16)";
    let first = cidr.addr.octets()[0];
    if !(8..=crate::types::NODE_SUBNET_PREFIX).contains(&cidr.prefix)
        || cidr.network() != cidr.addr
        || first == 0
        || first == 127
        || first >= 224
    {
        return Err(CommandError::invalid("VM network", cidr, allowed));
    }
    Ok(())
}

/// The node timeout's range: long enough for a heartbeat every second to
/// fence in time (see docs/ARCHITECTURE.md, "Liveness and fencing"), short
/// enough that a failure is noticed within the hour.
pub const MIN_NODE_TIMEOUT_MS: u64 = 2_000;
pub const MAX_NODE_TIMEOUT_MS: u64 = 3_600_000;

/// The longest drain deadline: one day.
pub const MAX_DRAIN_DEADLINE_SECS: u64 = 86_400;

pub fn node_timeout_ms(ms: u64) -> Result<(), CommandError> {
    if !(MIN_NODE_TIMEOUT_MS..=MAX_NODE_TIMEOUT_MS).contains(&ms) {
        return Err(CommandError::invalid(
            "node timeout",
            format!("{ms} ms"),
            format!("{} s to {} s", MIN_NODE_TIMEOUT_MS / 1000, MAX_NODE_TIMEOUT_MS / 1000),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        for good in ["a", "web-1", "x0", &"a".repeat(63)] {
            assert!(vm_name(good).is_ok(), "{good}");
        }
        for bad in ["", "1abc", "Web", "web-", "we b", "wé", "a_b", &"a".repeat(64), "-a"] {
            let e = vm_name(bad).unwrap_err();
            assert!(e.to_string().contains("1-63 characters"), "{e}");
        }
    }

    #[test]
    fn specs() {
        let ok = VmSpec { vcpus: 1, memory_mb: 128, disk_gb: 1, ..Default::default() };
        assert!(vm_spec(&ok).is_ok());
        let e = vm_spec(&VmSpec { vcpus: 0, ..ok.clone() }).unwrap_err();
        assert_eq!(e.to_string(), "invalid vcpus \"0\": between 1 and 64");
        assert!(vm_spec(&VmSpec { memory_mb: u64::MAX, ..ok.clone() }).is_err());
        assert!(vm_spec(&VmSpec { disk_gb: 0, ..ok.clone() }).is_ok(), "0: no data disk");
        assert!(vm_spec(&VmSpec { tenant: "Bad Tenant".into(), ..ok.clone() }).is_err());
        let mut many = ok.clone();
        for i in 0..=MAX_LABELS {
            many.labels.insert(format!("k{i}"), "v".into());
        }
        assert!(vm_spec(&many).is_err());
    }

    fn boot_of(kernel: &str, initrd: &str) -> crate::types::BootSpec {
        crate::types::BootSpec { kernel: kernel.into(), initrd: initrd.into(), cmdline: String::new() }
    }

    #[test]
    fn the_edge_takes_image_names_only() {
        for (k, i) in [("", ""), ("vmlinuz", ""), ("custom/vmlinuz", "custom/initrd.img"), ("a", "b")] {
            assert!(image_names(&boot_of(k, i)).is_ok(), "{k:?} {i:?}");
        }
        let long = "a".repeat(256);
        for bad in ["/etc/shadow", "../x", "a/../../b", ".", "..", "a//b", "a\0b", "a b", "é", &long] {
            let e = image_names(&boot_of(bad, "")).unwrap_err().to_string();
            assert!(
                e.starts_with(&format!(
                    "invalid kernel {bad:?}: a file name in the node's image directory (--image-dir): "
                )),
                "{e}"
            );
            let e = image_names(&boot_of("vmlinuz", bad)).unwrap_err().to_string();
            assert!(e.starts_with("invalid initrd ") && e.contains("no '..'"), "{e}");
        }
    }

    /// Apply keeps accepting the absolute paths older versions committed
    /// (with the same outcome), and accepts image names.
    #[test]
    fn apply_takes_old_host_paths_and_image_names() {
        let ok = VmSpec { vcpus: 1, memory_mb: 128, disk_gb: 1, ..Default::default() };
        for (k, i) in [("/boot/vmlinuz", "/boot/initrd.img"), ("/etc/shadow", ""), ("vmlinuz", "x/initrd")] {
            assert!(vm_spec(&VmSpec { boot: boot_of(k, i), ..ok.clone() }).is_ok(), "{k:?} {i:?}");
        }
        // What older versions refused, refused the same way.
        let e = boot(&boot_of(&format!("/{}", "a".repeat(MAX_PATH_LEN)), "")).unwrap_err();
        assert_eq!(
            e.to_string().split_once(": ").unwrap().1,
            "an absolute path on the node, at most 4096 characters"
        );
        let e = boot(&boot_of("/a\nb", "")).unwrap_err();
        assert!(e.to_string().starts_with("invalid kernel path"), "{e}");
        let e = boot(&boot_of("", "initrd")).unwrap_err();
        assert_eq!(e.to_string(), "invalid initrd path \"initrd\": only together with a kernel");
        // Relative paths that are not image names never reach the log.
        for bad in ["../x", "a/../b", "./vmlinuz"] {
            let e = boot(&boot_of(bad, "")).unwrap_err();
            assert!(e.to_string().contains("--image-dir"), "{e}");
        }
    }

    #[test]
    fn addrs() {
        for good in ["127.0.0.1:7420", "localhost:1", "[::1]:7420", "node-3.example:65535"] {
            assert!(addr(good).is_ok(), "{good}");
        }
        for bad in ["", "127.0.0.1", "127.0.0.1:0", ":80", "a b:1", "h:99999", "http://x:1"] {
            assert!(addr(bad).is_err(), "{bad}");
        }
    }
}
