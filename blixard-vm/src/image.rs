//! The default guest image: the host's Debian cloud kernel plus a tiny
//! busybox initramfs that this module assembles itself (no external
//! image download, no root filesystem).
//!
//! The image lives in `<cache>/guest-v1/<fingerprint>/{vmlinuz,initrd.img}`.
//! The fingerprint covers everything the image is made from (kernel file,
//! busybox binary, modules, the init script), so a kernel or busybox upgrade
//! yields a new directory instead of silently reusing a stale one. Each
//! directory is built in a temporary sibling and renamed into place, so a
//! crash or two concurrent builders never expose a half-written image.
//!
//! What the guest does at boot (see [`INIT_SCRIPT`]), driven by `blixard.*`
//! arguments on the kernel command line:
//! - mounts /proc, /sys and /dev, loads the virtio-net, virtio-blk, ext4 and
//!   power-button modules (those not built into the kernel);
//! - `blixard.hostname=NAME`: sets the hostname (the qemu backend passes
//!   the VM's name);
//! - `blixard.ip=ADDR/PREFIX`, `blixard.gw=ADDR`: configures eth0 and the
//!   default route;
//! - `blixard.disk=DEV`: waits up to 2 s for the block device and mounts it
//!   (ext4) on `/data`, saying so on the console (or why not);
//! - `blixard.httpd=PORT` (default 80 when it has an address; `off`: none):
//!   serves `/www` with busybox httpd: `index.html` holds the hostname,
//!   `/www/data` links to `/data` when it is mounted;
//! - starts busybox `acpid`, so that QMP `system_powerdown` powers it off
//!   (after `sync` and unmounting `/data`, so what was written is durable);
//! - prints [`crate::READY_MARKER`], then runs an interactive shell on the
//!   serial console, again each time it exits (`setsid cttyhack sh -l`: the
//!   console is its controlling terminal, so job control and Ctrl-C work).
use std::collections::HashMap;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::backend::VmError;

/// Bump when the layout or contents of the image change in a way the
/// fingerprint inputs would not notice (e.g. a new cpio entry).
const FORMAT_VERSION: u32 = 2;

/// Where busybox-static installs its binary on Debian.
const BUSYBOX: &str = "/bin/busybox";

/// Kernel modules copied into the initramfs, in load order (each one's
/// dependencies come before it). The first six give the guest a virtio NIC
/// on the microvm's virtio-mmio bus; evdev + button make the ACPI power
/// button visible to `acpid`, which is what QMP `system_powerdown` presses.
const NET_MODULES: &[&str] =
    &["virtio_ring", "virtio", "virtio_mmio", "failover", "net_failover", "virtio_net"];
const POWER_MODULES: &[&str] = &["evdev", "button"];
/// The data disk: virtio-blk on virtio-mmio, and ext4 with its dependencies
/// (from the cloud kernel's modules.dep; in Debian's cloud kernel 6.1 crc16,
/// mbcache, jbd2, crc32c_generic and ext4 are built in, and only virtio_blk
/// is a module). A module already listed by an earlier group is loaded once.
const DISK_MODULES: &[&str] = &[
    "virtio_ring",
    "virtio",
    "virtio_mmio",
    "virtio_blk",
    "crc16",
    "mbcache",
    "jbd2",
    "crc32c_generic",
    "ext4",
];

/// Every module the image may carry.
fn all_modules() -> impl Iterator<Item = &'static str> {
    NET_MODULES.iter().chain(DISK_MODULES).chain(POWER_MODULES).copied()
}

/// The line the guest prints when the power button makes it shut down. Tests
/// use it to tell a graceful ACPI shutdown from a forced one.
pub const POWEROFF_MARKER: &str = "BLIXARD-GUEST-POWEROFF";

/// PID 1 of the guest. Kept static (the variable parts live in files the
/// builder writes next to it) so the fingerprint stays meaningful.
const INIT_SCRIPT: &str = r#"#!/bin/busybox sh
# Blixard default guest: PID 1. Everything runs from the initramfs.
/bin/busybox mkdir -p /proc /sys /dev /tmp /run /var/log /sbin /usr/bin /usr/sbin
/bin/busybox mount -t proc proc /proc
# --install needs /proc/self/exe, hence after mounting /proc.
/bin/busybox --install -s
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
exec </dev/console >/dev/console 2>&1

# Notes the image builder left for us (e.g. "no virtio_net: networking off").
[ -f /etc/blixard/notes ] && while read -r line; do echo "blixard: $line"; done </etc/blixard/notes

# Modules in dependency order, as listed by the builder.
if [ -f /etc/blixard/modules ]; then
  while read -r m; do
    insmod "/lib/modules/$m.ko" || echo "blixard: could not load module $m"
  done </etc/blixard/modules
fi

ip link set lo up 2>/dev/null
addr=""
gw=""
disk=""
name=""
httpd_port=""
# Later arguments win (the VM's own cmdline comes after the backend's).
for arg in $(cat /proc/cmdline); do
  case "$arg" in
    blixard.ip=*) addr="${arg#blixard.ip=}" ;;
    blixard.gw=*) gw="${arg#blixard.gw=}" ;;
    blixard.disk=*) disk="${arg#blixard.disk=}" ;;
    blixard.hostname=*) name="${arg#blixard.hostname=}" ;;
    blixard.httpd=*) httpd_port="${arg#blixard.httpd=}" ;;
  esac
done
[ -n "$name" ] && hostname "$name"
# With a NIC, a tiny web server on port 80 unless told otherwise (so a
# published port answers out of the box); blixard.httpd=off: none.
[ -z "$httpd_port" ] && [ -n "$addr" ] && httpd_port=80
[ "$httpd_port" = off ] && httpd_port=""

if [ -n "$disk" ]; then
  # The block device shows up asynchronously after virtio_blk binds.
  n=0
  while [ ! -b "$disk" ] && [ $n -lt 20 ]; do sleep 0.1; n=$((n + 1)); done
  mkdir -p /data
  if [ ! -b "$disk" ]; then
    echo "blixard: blixard.disk=$disk given but there is no such block device (no virtio-blk device or driver)"
  elif mount -t ext4 "$disk" /data; then
    echo "blixard: $disk mounted on /data"
  else
    echo "blixard: could not mount $disk (ext4) on /data"
  fi
fi

if [ -n "$addr" ]; then
  # The NIC shows up asynchronously after virtio_net binds: wait up to 2 s.
  n=0
  while [ ! -e /sys/class/net/eth0 ] && [ $n -lt 20 ]; do sleep 0.1; n=$((n + 1)); done
  if [ -e /sys/class/net/eth0 ]; then
    ip addr add "$addr" dev eth0 && ip link set eth0 up && echo "blixard: eth0 $addr"
    [ -n "$gw" ] && ip route add default via "$gw" && echo "blixard: default route via $gw"
  else
    echo "blixard: blixard.ip=$addr given but there is no eth0 (no virtio-net device or driver)"
  fi
fi

# acpid runs /etc/acpi/PWRF/00000080 when the power button is pressed. It
# must hold the input device open before we report ready, or a stop right
# after readiness presses a button nobody listens to: run it in the
# foreground (in the background of this shell) and wait up to 5 s for that.
if [ -e /dev/input/event0 ]; then
  acpid -f -c /etc/acpi -l /dev/null &
  apid=$!
  n=0
  until ls -l /proc/$apid/fd 2>/dev/null | grep -q /dev/input/event || [ $n -ge 100 ]; do
    sleep 0.05
    n=$((n + 1))
  done
else
  echo "blixard: no input device for the ACPI power button: graceful shutdown unavailable"
fi

if [ -n "$httpd_port" ]; then
  mkdir -p /www
  hostname >/www/index.html
  grep -q " /data " /proc/mounts && ln -s /data /www/data
  if httpd -p "$httpd_port" -h /www; then
    echo "blixard: httpd on port $httpd_port"
  else
    echo "blixard: httpd could not start on port $httpd_port"
  fi
fi

echo "BLIXARD-GUEST-READY"
# An interactive shell on the serial console, restarted whenever it exits.
# setsid + cttyhack make the console its controlling terminal (job control,
# Ctrl-C); PID 1 stays this loop, so acpid and the power button are
# unaffected.
export HOME=/ PS1='\h:\w\$ '
while :; do
  setsid cttyhack sh -l
  sleep 0.2
done
"#;

/// Run by busybox acpid on a power-button press.
/// `/data` is synced and unmounted (or, if something holds it open,
/// remounted read-only) first, so what was written before a stop is on the
/// disk; QEMU passes the guest's flushes on to the host file.
const POWER_BUTTON_SCRIPT: &str = r#"#!/bin/sh
echo "BLIXARD-GUEST-POWEROFF: power button pressed, powering off" >/dev/console
sync
if grep -q " /data " /proc/mounts; then
  umount /data 2>/dev/null || mount -o remount,ro /data 2>/dev/null || sync
  echo "blixard: /data unmounted" >/dev/console
fi
poweroff -f
"#;

/// A bootable kernel + initramfs pair.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GuestImage {
    pub kernel: PathBuf,
    pub initrd: PathBuf,
}

/// `$XDG_CACHE_HOME/blixard`, else `$HOME/.cache/blixard`, else
/// `/var/tmp/blixard-cache` (services often run without a home).
pub fn default_cache_dir() -> PathBuf {
    if let Some(x) = std::env::var_os("XDG_CACHE_HOME").filter(|v| !v.is_empty()) {
        return PathBuf::from(x).join("blixard");
    }
    if let Some(h) = std::env::var_os("HOME").filter(|v| !v.is_empty()) {
        return PathBuf::from(h).join(".cache").join("blixard");
    }
    PathBuf::from("/var/tmp/blixard-cache")
}

/// Returns the default guest image, building it into `cache_dir` first if it
/// is missing or stale. Blocking (reads ~10 MB when it builds): call it from
/// `spawn_blocking` in async code.
pub fn ensure_default_image(cache_dir: &Path) -> Result<GuestImage, VmError> {
    let inputs = Inputs::discover()?;
    let base = cache_dir.join(format!("guest-v{FORMAT_VERSION}"));
    let final_dir = base.join(format!("{:016x}", inputs.fingerprint()));
    let image = GuestImage { kernel: final_dir.join("vmlinuz"), initrd: final_dir.join("initrd.img") };
    // The directory appears only by rename of a complete build, so its
    // existence means the image is whole.
    if image.kernel.is_file() && image.initrd.is_file() {
        return Ok(image);
    }
    fs::create_dir_all(&base).map_err(VmError::io(format!("creating image cache {}", base.display())))?;
    remove_abandoned_builds(&base);

    let tmp = base.join(format!(".build-{}-{}", std::process::id(), crate::host::now_ms()));
    let built = build_into(&inputs, &tmp);
    if let Err(e) = built {
        let _ = fs::remove_dir_all(&tmp);
        return Err(e);
    }
    match fs::rename(&tmp, &final_dir) {
        Ok(()) => {}
        // Another builder finished first: its image is identical, use it.
        Err(_) if image.kernel.is_file() && image.initrd.is_file() => {
            let _ = fs::remove_dir_all(&tmp);
        }
        Err(e) => {
            let _ = fs::remove_dir_all(&tmp);
            return Err(VmError::io(format!("moving the built guest image into {}", final_dir.display()))(e));
        }
    }
    tracing::info!(kernel = %image.kernel.display(), initrd = %image.initrd.display(), "built default guest image");
    Ok(image)
}

/// Build directories of builders that crashed more than an hour ago.
fn remove_abandoned_builds(base: &Path) {
    let Ok(entries) = fs::read_dir(base) else { return };
    for e in entries.flatten() {
        let is_build = e.file_name().to_str().is_some_and(|n| n.starts_with(".build-"));
        let old = e
            .metadata()
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| t.elapsed().ok())
            .is_some_and(|age| age.as_secs() > 3600);
        if is_build && old {
            let _ = fs::remove_dir_all(e.path());
        }
    }
}

/// Everything the image is made of, found on the host.
struct Inputs {
    kernel: PathBuf,
    kernel_version: String,
    /// Module name → .ko file (possibly compressed), for the modules found.
    modules: HashMap<&'static str, PathBuf>,
    /// Modules neither found as files nor built into the kernel.
    missing: Vec<&'static str>,
}

impl Inputs {
    fn discover() -> Result<Self, VmError> {
        let (kernel, kernel_version) = newest_cloud_kernel(Path::new("/boot"))?;
        if !Path::new(BUSYBOX).is_file() {
            return Err(VmError::Unavailable(format!(
                "{BUSYBOX} not found: install the busybox-static package to build the default guest image"
            )));
        }
        let mod_root = Path::new("/lib/modules").join(&kernel_version);
        let mut found = HashMap::new();
        find_modules(&mod_root.join("kernel"), &mut found);
        let builtin = fs::read_to_string(mod_root.join("modules.builtin")).unwrap_or_default();
        let mut modules = HashMap::new();
        let mut missing = Vec::new();
        for m in all_modules() {
            if modules.contains_key(m) || missing.contains(&m) {
                continue;
            }
            if let Some(p) = found.remove(m) {
                modules.insert(m, p);
            } else if !builtin.lines().any(|l| module_name(l).as_deref() == Some(m)) {
                missing.push(m);
            }
        }
        Ok(Inputs { kernel, kernel_version, modules, missing })
    }

    /// FNV-1a over the identity (path, size, mtime) of every input file and
    /// the static texts; stable across Rust versions, unlike `DefaultHasher`.
    fn fingerprint(&self) -> u64 {
        let mut h = Fnv::new();
        h.add(FORMAT_VERSION.to_string().as_bytes());
        h.add(INIT_SCRIPT.as_bytes());
        h.add(POWER_BUTTON_SCRIPT.as_bytes());
        let mut files: Vec<&Path> = vec![&self.kernel, Path::new(BUSYBOX)];
        let mut mods: Vec<_> = self.modules.iter().collect();
        mods.sort();
        files.extend(mods.iter().map(|(_, p)| p.as_path()));
        for f in files {
            h.add(f.as_os_str().as_encoded_bytes());
            if let Ok(m) = fs::metadata(f) {
                h.add(&m.len().to_le_bytes());
                let mtime = m.modified().ok().and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok());
                h.add(&mtime.map(|d| d.as_nanos()).unwrap_or(0).to_le_bytes());
            }
        }
        h.0
    }
}

struct Fnv(u64);
impl Fnv {
    fn new() -> Self {
        Fnv(0xcbf2_9ce4_8422_2325)
    }
    fn add(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 ^= u64::from(*b);
            self.0 = self.0.wrapping_mul(0x0000_0100_0000_01b3);
        }
        // A separator so ("ab","c") and ("a","bc") differ.
        self.0 = self.0.wrapping_mul(0x0000_0100_0000_01b3) ^ 0xff;
    }
}

/// The newest `/boot/vmlinuz-*-cloud-amd64` and its version string.
fn newest_cloud_kernel(boot: &Path) -> Result<(PathBuf, String), VmError> {
    let unavailable = || {
        VmError::Unavailable(format!(
            "no {}/vmlinuz-*-cloud-amd64 kernel: install the linux-image-cloud-amd64 package to build the default guest image",
            boot.display()
        ))
    };
    let entries = fs::read_dir(boot).map_err(|_| unavailable())?;
    let mut versions: Vec<String> = entries
        .flatten()
        .filter_map(|e| e.file_name().to_str().map(str::to_string))
        .filter_map(|n| n.strip_prefix("vmlinuz-").map(str::to_string))
        .filter(|v| v.ends_with("-cloud-amd64"))
        .collect();
    versions.sort_by(|a, b| version_cmp(a, b));
    let version = versions.pop().ok_or_else(unavailable)?;
    let kernel = boot.join(format!("vmlinuz-{version}"));
    fs::File::open(&kernel).map_err(VmError::io(format!("reading the guest kernel {}", kernel.display())))?;
    Ok((kernel, version))
}

/// Compares version strings with digit runs as numbers ("6.1.0-10" > "6.1.0-9").
fn version_cmp(a: &str, b: &str) -> std::cmp::Ordering {
    fn chunks(s: &str) -> Vec<(bool, &str)> {
        let mut out = Vec::new();
        let mut start = 0;
        let bytes = s.as_bytes();
        for i in 1..=bytes.len() {
            if i == bytes.len() || bytes[i].is_ascii_digit() != bytes[start].is_ascii_digit() {
                out.push((bytes[start].is_ascii_digit(), &s[start..i]));
                start = i;
            }
        }
        out
    }
    let (ca, cb) = (chunks(a), chunks(b));
    for (x, y) in ca.iter().zip(cb.iter()) {
        let ord = match (x, y) {
            ((true, x), (true, y)) => x
                .trim_start_matches('0')
                .len()
                .cmp(&y.trim_start_matches('0').len())
                .then(x.trim_start_matches('0').cmp(y.trim_start_matches('0'))),
            ((_, x), (_, y)) => x.cmp(y),
        };
        if ord.is_ne() {
            return ord;
        }
    }
    ca.len().cmp(&cb.len())
}

/// "kernel/drivers/net/virtio_net.ko.xz" → "virtio_net". Module names use
/// '_' while some files use '-': normalise.
fn module_name(path: &str) -> Option<String> {
    let file = path.rsplit('/').next()?;
    let stem = file.split(".ko").next().filter(|_| file.contains(".ko"))?;
    Some(stem.replace('-', "_"))
}

/// Walks the module tree once, recording the wanted modules by name.
fn find_modules(dir: &Path, found: &mut HashMap<&'static str, PathBuf>) {
    let Ok(entries) = fs::read_dir(dir) else { return };
    for e in entries.flatten() {
        let path = e.path();
        match e.file_type() {
            Ok(t) if t.is_dir() => find_modules(&path, found),
            Ok(t) if t.is_file() => {
                let Some(name) = path.to_str().and_then(module_name) else { continue };
                if let Some(m) = all_modules().find(|&m| m == name) {
                    found.insert(m, path);
                }
            }
            _ => {}
        }
    }
}

/// Reads a module, decompressing .xz/.zst with the host's CLI tools: busybox
/// insmod hands the bytes to init_module(2), which wants a plain ELF object.
fn module_bytes(path: &Path) -> Result<Vec<u8>, String> {
    let name = path.to_string_lossy();
    let tool = if name.ends_with(".ko") {
        return fs::read(path).map_err(|e| format!("reading {name}: {e}"));
    } else if name.ends_with(".xz") {
        "xz"
    } else if name.ends_with(".zst") {
        "zstd"
    } else if name.ends_with(".gz") {
        "gzip"
    } else {
        return Err(format!("{name}: unknown module compression"));
    };
    let out = Command::new(tool).arg("-dc").arg(path).output().map_err(|e| {
        format!("{name} is compressed and `{tool}` could not run ({e}): install {tool} to decompress it")
    })?;
    if !out.status.success() {
        return Err(format!("`{tool} -dc {name}` failed: {}", String::from_utf8_lossy(&out.stderr).trim()));
    }
    Ok(out.stdout)
}

fn build_into(inputs: &Inputs, dir: &Path) -> Result<(), VmError> {
    fs::create_dir_all(dir).map_err(VmError::io(format!("creating {}", dir.display())))?;
    let kernel_dst = dir.join("vmlinuz");
    fs::copy(&inputs.kernel, &kernel_dst).map_err(VmError::io(format!(
        "copying {} to {}",
        inputs.kernel.display(),
        kernel_dst.display()
    )))?;

    let busybox = fs::read(BUSYBOX).map_err(VmError::io(format!("reading {BUSYBOX}")))?;
    let mut notes: Vec<String> = Vec::new();
    let mut loaded: Vec<(&str, Vec<u8>)> = Vec::new();
    // A module group is all or nothing: half a NIC driver stack is useless.
    for (group, what) in
        [(NET_MODULES, "networking"), (DISK_MODULES, "data disks"), (POWER_MODULES, "graceful ACPI shutdown")]
    {
        let mut bytes = Vec::new();
        let mut problem = None;
        for &m in group {
            if inputs.missing.contains(&m) {
                problem = Some(format!("module {m} is not in kernel {}", inputs.kernel_version));
                break;
            }
            // Built into the kernel, or loaded by an earlier group.
            let Some(path) = inputs.modules.get(m) else { continue };
            if loaded.iter().any(|(l, _)| *l == m) {
                continue;
            }
            match module_bytes(path) {
                Ok(b) => bytes.push((m, b)),
                Err(e) => {
                    problem = Some(e);
                    break;
                }
            }
        }
        match problem {
            None => loaded.extend(bytes),
            Some(p) => {
                tracing::warn!("default guest image: {what} disabled: {p}");
                notes.push(format!("{what} disabled: {p}"));
            }
        }
    }

    let mut cpio = Cpio::default();
    for d in [
        "bin",
        "dev",
        "etc",
        "etc/acpi",
        "etc/acpi/PWRF",
        "etc/blixard",
        "lib",
        "lib/modules",
        "proc",
        "sys",
        "tmp",
        "run",
    ] {
        cpio.dir(d);
    }
    // The kernel opens /dev/console for PID 1 before /init can mount
    // devtmpfs, so the node must be in the archive.
    cpio.char_dev("dev/console", 5, 1);
    cpio.file("bin/busybox", 0o755, &busybox);
    cpio.symlink("bin/sh", "busybox");
    cpio.file("init", 0o755, INIT_SCRIPT.as_bytes());
    cpio.file("etc/acpi/PWRF/00000080", 0o755, POWER_BUTTON_SCRIPT.as_bytes());
    let mut order = String::new();
    for (m, b) in &loaded {
        cpio.file(&format!("lib/modules/{m}.ko"), 0o644, b);
        order.push_str(m);
        order.push('\n');
    }
    cpio.file("etc/blixard/modules", 0o644, order.as_bytes());
    if !notes.is_empty() {
        cpio.file("etc/blixard/notes", 0o644, (notes.join("\n") + "\n").as_bytes());
    }
    let initrd = dir.join("initrd.img");
    let mut f = fs::File::create(&initrd).map_err(VmError::io(format!("creating {}", initrd.display())))?;
    f.write_all(&cpio.finish())
        .and_then(|_| f.sync_all())
        .map_err(VmError::io(format!("writing {}", initrd.display())))?;
    Ok(())
}

/// An uncompressed cpio archive in the "newc" format, which the kernel
/// unpacks as initramfs. Compression would save a few MB on disk but cost
/// boot time under TCG, where decompression is emulated.
#[derive(Default)]
struct Cpio {
    out: Vec<u8>,
    ino: u32,
}

impl Cpio {
    fn dir(&mut self, name: &str) {
        self.entry(name, 0o040_755, 0, 0, &[]);
    }
    fn file(&mut self, name: &str, perm: u32, data: &[u8]) {
        self.entry(name, 0o100_000 | perm, 0, 0, data);
    }
    fn symlink(&mut self, name: &str, target: &str) {
        self.entry(name, 0o120_777, 0, 0, target.as_bytes());
    }
    fn char_dev(&mut self, name: &str, major: u32, minor: u32) {
        self.entry(name, 0o020_600, major, minor, &[]);
    }

    fn entry(&mut self, name: &str, mode: u32, rdev_major: u32, rdev_minor: u32, data: &[u8]) {
        self.ino += 1;
        let nlink = if mode & 0o170_000 == 0o040_000 { 2 } else { 1 };
        // magic, ino, mode, uid, gid, nlink, mtime, filesize, devmajor,
        // devminor, rdevmajor, rdevminor, namesize (with NUL), check.
        let header = format!(
            "070701{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}",
            self.ino,
            mode,
            0,
            0,
            nlink,
            0,
            data.len(),
            0,
            0,
            rdev_major,
            rdev_minor,
            name.len() + 1,
            0
        );
        self.out.extend_from_slice(header.as_bytes());
        self.out.extend_from_slice(name.as_bytes());
        self.out.push(0);
        self.pad();
        self.out.extend_from_slice(data);
        self.pad();
    }

    fn pad(&mut self) {
        let pad = (4 - self.out.len() % 4) % 4;
        self.out.resize(self.out.len() + pad, 0);
    }

    fn finish(mut self) -> Vec<u8> {
        self.entry("TRAILER!!!", 0, 0, 0, &[]);
        self.out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_compare_numerically() {
        assert!(version_cmp("6.1.0-10-cloud-amd64", "6.1.0-9-cloud-amd64").is_gt());
        assert!(version_cmp("6.10.0-1-cloud-amd64", "6.9.0-1-cloud-amd64").is_gt());
        assert!(version_cmp("6.1.0-9-cloud-amd64", "6.1.0-9-cloud-amd64").is_eq());
    }

    #[test]
    fn module_names_from_paths() {
        assert_eq!(module_name("kernel/drivers/net/virtio_net.ko.xz").as_deref(), Some("virtio_net"));
        assert_eq!(module_name("kernel/net/core/failover.ko").as_deref(), Some("failover"));
        assert_eq!(module_name("kernel/drivers/foo-bar.ko.zst").as_deref(), Some("foo_bar"));
        assert_eq!(module_name("modules.order"), None);
    }

    #[test]
    fn cpio_entries_are_aligned_newc() {
        let mut c = Cpio::default();
        c.file("init", 0o755, b"abc");
        let out = c.finish();
        assert!(out.starts_with(b"070701"));
        assert_eq!(out.len() % 4, 0);
        // Header (110) + "init\0" padded to 116, then 3 data bytes padded to 120.
        assert_eq!(&out[110..114], b"init");
        assert_eq!(&out[116..119], b"abc");
        assert_eq!(&out[120..126], b"070701");
    }
}
