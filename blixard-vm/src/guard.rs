//! Fencing leases for the process-based backends (qemu, process), enforced
//! by a guard process that outlives the node.
//!
//! The node renews a lease each time it confirms contact with a quorum
//! ([`VmBackend::renew_lease`](crate::VmBackend::renew_lease)). If the lease
//! lapses, every VM on the host must stop before the cluster restarts it
//! elsewhere, also when the node process was killed (SIGKILL) or is stopped
//! (SIGSTOP). So the deadline does not live in the node: it is a file, and a
//! small guard process per VM root (the node's own binary re-executed, see
//! [`GuardCommand`]) reads it every [`TICK`] and enforces it.
//!
//! Files in the VM root, next to the VM directories:
//!
//! - `fence.lease`: one line `BOOT_ID DEADLINE_MS GRACE_MS`, replaced
//!   atomically on each renewal. `DEADLINE_MS` is on `CLOCK_BOOTTIME`
//!   (monotonic, system-wide, unaffected by wall-clock jumps, and it counts
//!   time spent suspended, so a host that slept past the deadline fences).
//!   That clock starts again at zero on each boot, so `BOOT_ID`
//!   (`/proc/sys/kernel/random/boot_id`) ties the lease to this boot: a lease
//!   from another boot is expired. No file (or an unreadable one) means no
//!   lease: nothing is enforced.
//! - `fence-guard.pid`: the guard that owns this root.
//! - `fence-guard.log`: what the guard did, one timestamped line per action
//!   (its stderr goes there too).
//!
//! While the lease is expired, the guard stops every VM it finds running:
//! it writes the VM's `stopped` marker (so the exit counts as a requested
//! stop in both backends), sends `SIGTERM` to the VM's process group and, if
//! the VM still runs `GRACE_MS` later, `SIGKILL`. It only signals a pid whose
//! command line contains the VM's directory ([`VmDirs::needle`]), the check
//! the backends use against pid reuse. A VM started while the lease is
//! expired is stopped at the next tick. Members of a VM's process group that
//! outlive its leader are not chased: without the leader no command line
//! proves they are ours (the process backend kills them when it reaps the
//! leader).
//!
//! The guard exits once the lease is expired (or absent), no VM runs and the
//! node process it was started for is gone; the node spawns a new one at its
//! next renewal. It also exits when another guard owns the pidfile: a node
//! that restarts spawns a guard of its own (recognised by `--node-pid`),
//! which takes over from the one its previous incarnation started.
use std::collections::HashMap;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;

use crate::backend::VmError;
use crate::host::{self, VmDirs};

/// The lease, in the VM root.
pub const LEASE_FILE: &str = "fence.lease";
/// The pid of the guard that owns the VM root.
pub const GUARD_PIDFILE: &str = "fence-guard.pid";
/// The guard's log (and stderr), appended to.
pub const GUARD_LOG: &str = "fence-guard.log";
/// Every guard's command line contains this word (the CLI subcommand).
pub const GUARD_WORD: &str = "fence-guard";
/// How often the guard reads the lease and looks at the VMs.
pub const TICK: Duration = Duration::from_millis(100);

/// How to start a guard: `program args... --root <root> --node-pid <pid>`,
/// a program that calls [`run`] with those two values. Its command line
/// must contain [`GUARD_WORD`] (the `blixard fence-guard` subcommand does).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GuardCommand {
    pub program: PathBuf,
    pub args: Vec<String>,
}

/// One line of the lease file.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Lease {
    boot_id: String,
    /// `CLOCK_BOOTTIME` in ms.
    deadline_ms: u64,
    grace_ms: u64,
}

impl Lease {
    fn line(&self) -> String {
        format!("{} {} {}\n", self.boot_id, self.deadline_ms, self.grace_ms)
    }

    fn parse(text: &str) -> Option<Lease> {
        let mut words = text.split_whitespace();
        let lease = Lease {
            boot_id: words.next()?.to_string(),
            deadline_ms: words.next()?.parse().ok()?,
            grace_ms: words.next()?.parse().ok()?,
        };
        words.next().is_none().then_some(lease)
    }

    /// `None` if there is no lease file or it cannot be read.
    fn read(path: &Path) -> Option<Lease> {
        Lease::parse(&fs::read_to_string(path).ok()?)
    }

    fn expired(&self, boot_id: &str, now_ms: u64) -> bool {
        self.boot_id != boot_id || now_ms >= self.deadline_ms
    }
}

/// `CLOCK_BOOTTIME` in ms.
fn boottime_ms() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: clock_gettime writes into the timespec we own.
    let r = unsafe { libc::clock_gettime(libc::CLOCK_BOOTTIME, &mut ts) };
    assert_eq!(r, 0, "CLOCK_BOOTTIME exists on every Linux this runs on");
    ts.tv_sec as u64 * 1000 + ts.tv_nsec as u64 / 1_000_000
}

/// This boot's id. Without /proc it is a constant: leases then compare equal
/// across boots, which only matters for VMs started after a reboot by a node
/// that does not renew (every VM process of the old boot is gone anyway).
fn boot_id() -> String {
    fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .ok()
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty() && !s.contains(char::is_whitespace))
        .unwrap_or_else(|| "unknown-boot".to_string())
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// True if `pid` is a live guard of `root` (started for the node `node_pid`,
/// if given). [`Fence::spawn`] puts `--root` and `--node-pid` last, so the
/// needle can include the separators and `123` does not match `1234`.
fn guard_alive(pid: u32, root: &Path, node_pid: Option<u32>) -> bool {
    let mut needle = format!("\0--root\0{}\0--node-pid\0", root.display());
    if let Some(n) = node_pid {
        needle.push_str(&format!("{n}\0"));
    }
    host::pid_alive(pid, GUARD_WORD) && host::pid_alive(pid, &needle)
}

/// The node's side of the lease, shared by the qemu and process backends:
/// writes the lease file and keeps a guard running.
pub(crate) struct Fence {
    root: PathBuf,
    guard: Option<GuardCommand>,
    boot_id: String,
    state: Mutex<FenceState>,
}

#[derive(Default)]
struct FenceState {
    /// Guards this process spawned and has not reaped yet.
    guards: Vec<Child>,
    /// The "no guard configured" warning was given.
    warned: bool,
}

impl Fence {
    pub(crate) fn new(root: PathBuf, guard: Option<GuardCommand>) -> Arc<Fence> {
        Arc::new(Fence { root, guard, boot_id: boot_id(), state: Mutex::new(FenceState::default()) })
    }

    /// [`Fence::renew_blocking`] on the blocking pool.
    pub(crate) async fn renew(self: &Arc<Self>, valid_for: Duration, grace: Duration) -> Result<(), VmError> {
        let fence = self.clone();
        tokio::task::spawn_blocking(move || fence.renew_blocking(valid_for, grace))
            .await
            .map_err(|e| VmError::Failed(format!("lease renewal task failed: {e}")))?
    }

    /// Writes the lease, then makes sure a guard enforces it. Renewals are
    /// serialised, so an older one never overwrites a newer deadline and no
    /// two spawn a guard at once.
    fn renew_blocking(&self, valid_for: Duration, grace: Duration) -> Result<(), VmError> {
        let mut state = self.state.lock();
        fs::create_dir_all(&self.root).map_err(VmError::io(format!("creating {}", self.root.display())))?;
        let lease = Lease {
            boot_id: self.boot_id.clone(),
            deadline_ms: boottime_ms().saturating_add(millis(valid_for)),
            grace_ms: millis(grace),
        };
        host::write_atomic(&self.root.join(LEASE_FILE), lease.line())?;
        match &self.guard {
            Some(cmd) => self.ensure_guard(&mut state, cmd),
            None => {
                if !std::mem::replace(&mut state.warned, true) {
                    tracing::warn!(
                        root = %self.root.display(),
                        "no fence guard configured: the lease is written but nothing stops the VMs if it lapses"
                    );
                }
                Ok(())
            }
        }
    }

    /// Spawns a guard unless the pidfile names a live one started for this
    /// process (ours, or one of an earlier renewal by this same node).
    fn ensure_guard(&self, state: &mut FenceState, cmd: &GuardCommand) -> Result<(), VmError> {
        state.guards.retain_mut(|g| match g.try_wait() {
            Ok(None) => true,
            Ok(Some(status)) => {
                tracing::info!(pid = g.id(), %status, "fence guard exited");
                false
            }
            Err(e) => {
                tracing::warn!(pid = g.id(), "waiting for the fence guard: {e}");
                false
            }
        });
        let me = std::process::id();
        let pidfile = self.root.join(GUARD_PIDFILE);
        if let Some(pid) = host::read_pidfile(&pidfile) {
            if state.guards.iter().any(|g| g.id() == pid) || guard_alive(pid, &self.root, Some(me)) {
                return Ok(());
            }
        }
        let mut child = self.spawn(cmd, me)?;
        let pid = child.id();
        if let Err(e) = host::write_atomic(&pidfile, format!("{pid}\n")) {
            // Nobody could find it again: don't leave it running.
            let _ = child.kill();
            let _ = child.wait();
            return Err(e);
        }
        tracing::info!(pid, root = %self.root.display(), "fence guard started");
        state.guards.push(child);
        Ok(())
    }

    fn spawn(&self, cmd: &GuardCommand, node_pid: u32) -> Result<Child, VmError> {
        let log_path = self.root.join(GUARD_LOG);
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .map_err(VmError::io(format!("opening {}", log_path.display())))?;
        let mut c = Command::new(&cmd.program);
        c.args(&cmd.args)
            .arg("--root")
            .arg(&self.root)
            .arg("--node-pid")
            .arg(node_pid.to_string())
            .current_dir(&self.root)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log);
        // Its own session: it outlives the node and its terminal.
        host::new_session(&mut c);
        c.spawn().map_err(|e| {
            VmError::Failed(format!("cannot start the fence guard {}: {e}", cmd.program.display()))
        })
    }
}

impl Drop for Fence {
    /// Reaps guards that already ended. Live ones keep running on purpose:
    /// they outlive the node.
    fn drop(&mut self) {
        for g in self.state.get_mut().guards.iter_mut() {
            let _ = g.try_wait();
        }
    }
}

/// The guard: watches the lease of the VMs under `root` every [`TICK`] and
/// stops them while it is expired (see the module documentation). Returns
/// when there is nothing left to guard (lease expired or absent, no VM
/// running, `node_pid` gone) or another guard took over; fails only if it
/// cannot start (log or pidfile not writable).
pub fn run(root: &Path, node_pid: u32) -> Result<(), VmError> {
    let root = std::path::absolute(root).map_err(VmError::io(format!("resolving {}", root.display())))?;
    let mut guard = Guard::open(root, node_pid)?;
    let why = guard.watch()?;
    guard.log(&format!("exiting: {why}"));
    Ok(())
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum LeaseState {
    Absent,
    Valid,
    Expired,
}

/// A VM the guard sent `SIGTERM` to.
struct Fencing {
    pid: u32,
    /// `CLOCK_BOOTTIME` ms of the `SIGTERM`.
    term_at: u64,
    killed: bool,
}

struct Guard {
    dirs: VmDirs,
    node_pid: u32,
    me: u32,
    boot_id: String,
    log: fs::File,
    last: Option<LeaseState>,
    node_gone: bool,
    fencing: HashMap<String, Fencing>,
}

impl Guard {
    fn open(root: PathBuf, node_pid: u32) -> Result<Guard, VmError> {
        let log_path = root.join(GUARD_LOG);
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .map_err(VmError::io(format!("opening {}", log_path.display())))?;
        Ok(Guard {
            dirs: VmDirs::new(root),
            node_pid,
            me: std::process::id(),
            boot_id: boot_id(),
            log,
            last: None,
            node_gone: false,
            fencing: HashMap::new(),
        })
    }

    fn log(&mut self, msg: &str) {
        let line = format!("{} fence-guard[{}] {msg}\n", utc(host::now_ms()), self.me);
        // Nowhere better to report a failed write: stderr is this file.
        let _ = self.log.write_all(line.as_bytes());
    }

    fn pidfile(&self) -> PathBuf {
        self.dirs.root().join(GUARD_PIDFILE)
    }

    /// Claims the pidfile, then ticks until there is a reason to exit.
    fn watch(&mut self) -> Result<String, VmError> {
        let root = self.dirs.root().to_path_buf();
        if let Some(pid) = host::read_pidfile(&self.pidfile()).filter(|p| *p != self.me) {
            // Two guards for the same node: the first one stays.
            if guard_alive(pid, &root, Some(self.node_pid)) {
                return Ok(format!("guard {pid} already guards node process {}", self.node_pid));
            }
        }
        host::write_atomic(&self.pidfile(), format!("{}\n", self.me))?;
        self.log(&format!("started for node process {} in {}", self.node_pid, root.display()));
        loop {
            if let Some(why) = self.tick() {
                return Ok(why);
            }
            std::thread::sleep(TICK);
        }
    }

    /// One look at the pidfile, the lease and every VM. `Some(reason)` when
    /// the guard should exit.
    fn tick(&mut self) -> Option<String> {
        let root = self.dirs.root().to_path_buf();
        if let Some(owner) = host::read_pidfile(&self.pidfile()).filter(|p| *p != self.me) {
            if guard_alive(owner, &root, None) {
                return Some(format!("guard {owner} took over {GUARD_PIDFILE}"));
            }
        }
        let now = boottime_ms();
        let lease = Lease::read(&root.join(LEASE_FILE));
        let state = match &lease {
            None => LeaseState::Absent,
            Some(l) if l.expired(&self.boot_id, now) => LeaseState::Expired,
            Some(_) => LeaseState::Valid,
        };
        if self.last != Some(state) {
            self.last = Some(state);
            let msg = match (&lease, state) {
                (Some(l), LeaseState::Expired) if l.boot_id != self.boot_id => {
                    "lease is from another boot: stopping every VM".to_string()
                }
                (Some(l), LeaseState::Expired) => format!(
                    "lease expired (deadline {} ms, now {now} ms boottime): stopping every VM",
                    l.deadline_ms
                ),
                (Some(l), _) => format!("lease valid until {} ms boottime (now {now} ms)", l.deadline_ms),
                (None, _) => format!("no lease in {LEASE_FILE}: not enforcing"),
            };
            self.log(&msg);
        }
        let grace_ms = match (&lease, state) {
            (Some(l), LeaseState::Expired) => Some(l.grace_ms),
            _ => {
                self.fencing.clear();
                None
            }
        };

        let names = match self.dirs.names() {
            Ok(n) => n,
            Err(e) => {
                self.log(&format!("cannot list the VMs: {e}"));
                return None;
            }
        };
        self.fencing.retain(|n, _| names.contains(n));
        let mut running = 0;
        for name in &names {
            let Some(pid) = host::read_pidfile(&self.dirs.pidfile(name)) else { continue };
            if !host::pid_alive(pid, &self.dirs.needle(name)) {
                if let Some(f) = self.fencing.remove(name) {
                    self.log(&format!("VM {name}: process {} is gone", f.pid));
                }
                continue;
            }
            running += 1;
            if let Some(grace_ms) = grace_ms {
                self.fence(name, pid, now, grace_ms);
            }
        }

        let node_alive = host::pid_alive(self.node_pid, "");
        if !node_alive && !self.node_gone {
            self.node_gone = true;
            self.log(&format!("node process {} is gone", self.node_pid));
        }
        let lease_word = match state {
            LeaseState::Valid => return None,
            LeaseState::Expired => "expired",
            LeaseState::Absent => "absent",
        };
        (running == 0 && !node_alive)
            .then(|| format!("lease {lease_word}, no VM runs, node process {} is gone", self.node_pid))
    }

    /// Stops the VM `name` (process `pid`, alive and ours): marker and
    /// `SIGTERM` the first time, `SIGKILL` once `grace_ms` has passed.
    fn fence(&mut self, name: &str, pid: u32, now: u64, grace_ms: u64) {
        if let Some(f) = self.fencing.get_mut(name).filter(|f| f.pid == pid) {
            if now.saturating_sub(f.term_at) < grace_ms {
                return;
            }
            // Again on every tick while it lives: SIGKILL cannot be caught,
            // but a process in uninterruptible sleep takes a while.
            host::signal_group(pid, libc::SIGKILL);
            if !std::mem::replace(&mut f.killed, true) {
                self.log(&format!(
                    "VM {name}: process {pid} still runs {grace_ms} ms after SIGTERM: sent SIGKILL to its group"
                ));
            }
            return;
        }
        // Mark first: whatever the exit looks like, it was asked for.
        let marked = fs::write(self.dirs.stopped_marker(name), format!("{}\n", host::now_ms()));
        host::signal_group(pid, libc::SIGTERM);
        let msg = match marked {
            Ok(()) => format!("VM {name}: marked stopped, sent SIGTERM to process group {pid}"),
            Err(e) => format!(
                "VM {name}: cannot write its stopped marker ({e}); sent SIGTERM to process group {pid}"
            ),
        };
        self.log(&msg);
        self.fencing.insert(name.to_string(), Fencing { pid, term_at: now, killed: false });
    }
}

/// `ms` since the Unix epoch as `YYYY-MM-DDTHH:MM:SS.mmmZ`.
fn utc(ms: u64) -> String {
    let secs = ms / 1000;
    let (y, m, d) = civil_from_days((secs / 86_400) as i64);
    let s = secs % 86_400;
    format!("{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{:03}Z", s / 3600, s % 3600 / 60, s % 60, ms % 1000)
}

/// Days since 1970-01-01 to (year, month, day), proleptic Gregorian
/// (Howard Hinnant's `civil_from_days`).
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lease_lines_round_trip() {
        let l = Lease { boot_id: "b-1".into(), deadline_ms: 1234, grace_ms: 500 };
        assert_eq!(l.line(), "b-1 1234 500\n");
        assert_eq!(Lease::parse(&l.line()), Some(l.clone()));
        for bad in ["", "b-1 1234", "b-1 x 500", "b-1 1234 500 9", "b-1 -1 500"] {
            assert_eq!(Lease::parse(bad), None, "{bad:?}");
        }
        assert!(!l.expired("b-1", 1233));
        assert!(l.expired("b-1", 1234));
        assert!(l.expired("another-boot", 0), "a lease from another boot is expired");
    }

    #[test]
    fn clocks() {
        let (a, b) = (boottime_ms(), boottime_ms());
        assert!(a > 0 && b >= a);
        assert!(!boot_id().is_empty());
        assert_eq!(utc(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(utc(951_782_400_123), "2000-02-29T00:00:00.123Z");
        assert_eq!(utc(1_798_761_599_999), "2026-12-31T23:59:59.999Z");
    }

    #[test]
    fn renewing_without_a_guard_writes_the_lease() {
        let d = tempfile::tempdir().unwrap();
        let root = d.path().join("vms");
        let fence = Fence::new(root.clone(), None);
        let before = boottime_ms();
        fence.renew_blocking(Duration::from_secs(2), Duration::from_millis(300)).unwrap();
        let l = Lease::read(&root.join(LEASE_FILE)).expect("a lease");
        assert_eq!((l.boot_id.as_str(), l.grace_ms), (boot_id().as_str(), 300));
        assert!(l.deadline_ms >= before + 2000 && l.deadline_ms <= boottime_ms() + 2000, "{l:?}");
        assert!(!root.join(GUARD_PIDFILE).exists(), "no guard without a command");
    }
}
