//! Host-side plumbing shared by the process-based backends (qemu, process):
//! the per-VM directory layout, pidfiles, liveness checks that survive pid
//! reuse, and console log reads.
use std::fs;
use std::io::{Read, Seek, SeekFrom};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::backend::{LogChunk, VmError};

/// Where a backend keeps its VMs: `<root>/<name>/...`. Everything of a VM
/// lives in its directory, so deleting the directory deletes the VM's files.
#[derive(Clone, Debug)]
pub struct VmDirs {
    root: PathBuf,
}

impl VmDirs {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn dir(&self, name: &str) -> PathBuf {
        self.root.join(name)
    }
    /// The VMM's (or workload's) pid, written right after launch.
    pub fn pidfile(&self, name: &str) -> PathBuf {
        self.dir(name).join("pid")
    }
    /// The serial console (qemu) or stdout+stderr (process).
    pub fn console(&self, name: &str) -> PathBuf {
        self.dir(name).join("console.log")
    }
    /// The workload's stdin (process backend): a FIFO the console writes to.
    pub fn console_in(&self, name: &str) -> PathBuf {
        self.dir(name).join("console.in")
    }
    /// The serial console's unix socket (qemu), for interactive consoles.
    pub fn console_socket(&self, name: &str) -> PathBuf {
        self.dir(name).join("console.sock")
    }
    /// The VM's data disk (qemu): a raw ext4 image.
    pub fn disk(&self, name: &str) -> PathBuf {
        self.dir(name).join("disk.img")
    }
    /// The VMM's own stderr (qemu), for failure reasons.
    pub fn stderr(&self, name: &str) -> PathBuf {
        self.dir(name).join("vmm.stderr")
    }
    /// JSON with the VmConfig and launch time, for adoption after a restart.
    pub fn meta(&self, name: &str) -> PathBuf {
        self.dir(name).join("meta.json")
    }
    pub fn qmp_socket(&self, name: &str) -> PathBuf {
        self.dir(name).join("qmp.sock")
    }
    /// Written when a stop was requested (by the node or the fence guard),
    /// so the exit that follows counts as `Stopped`, not as a failure.
    pub fn stopped_marker(&self, name: &str) -> PathBuf {
        self.dir(name).join("stopped")
    }
    /// What the command line of the VM's process contains, whichever
    /// backend launched it (see [`pid_alive`]): the VM directory with a
    /// trailing slash, so VM "a" does not match "ab".
    pub fn needle(&self, name: &str) -> String {
        format!("{}/", self.dir(name).display())
    }

    /// Names of every VM directory under the root (sorted).
    pub fn names(&self) -> Result<Vec<String>, VmError> {
        let mut out = Vec::new();
        let entries = match fs::read_dir(&self.root) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(out),
            Err(e) => return Err(VmError::io(format!("listing {}", self.root.display()))(e)),
        };
        for entry in entries.flatten() {
            if entry.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                if let Some(n) = entry.file_name().to_str() {
                    out.push(n.to_string());
                }
            }
        }
        out.sort();
        Ok(out)
    }

    /// Removes the VM's directory and everything in it.
    pub fn remove(&self, name: &str) -> Result<(), VmError> {
        match fs::remove_dir_all(self.dir(name)) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(VmError::io(format!("removing {}", self.dir(name).display()))(e)),
        }
    }
}

pub fn write_pidfile(path: &Path, pid: u32) -> Result<(), VmError> {
    fs::write(path, format!("{pid}\n")).map_err(VmError::io(format!("writing {}", path.display())))
}

pub fn read_pidfile(path: &Path) -> Option<u32> {
    fs::read_to_string(path).ok()?.trim().parse().ok()
}

/// True if `pid` is a live (not zombie) process whose command line contains
/// `needle` — the needle (e.g. the VM's directory) guards against a pid that
/// was reused by an unrelated process after ours died.
pub fn pid_alive(pid: u32, needle: &str) -> bool {
    let stat = match fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(s) => s,
        Err(_) => return false,
    };
    // Field 3, after the parenthesised command name, is the state.
    let state = stat.rsplit_once(')').and_then(|(_, rest)| rest.split_whitespace().next());
    if matches!(state, Some("Z") | Some("X") | None) {
        return false;
    }
    match fs::read(format!("/proc/{pid}/cmdline")) {
        Ok(cmd) => String::from_utf8_lossy(&cmd).contains(needle),
        Err(_) => false,
    }
}

/// Sends `signal` to `pid`; false if no such process.
pub fn signal(pid: u32, signal: i32) -> bool {
    // SAFETY: kill(2) with a pid we launched; no memory is touched.
    unsafe { libc::kill(pid as libc::pid_t, signal) == 0 }
}

/// Makes `cmd` start in a session (and process group) of its own, so it
/// survives the node process and its terminal, and a signal to its group
/// (pgid == its pid) reaches it and its children only.
pub fn new_session(cmd: &mut Command) -> &mut Command {
    // SAFETY: setsid(2) is async-signal-safe and touches no memory; it runs
    // in the forked child before exec.
    unsafe {
        cmd.pre_exec(|| {
            if libc::setsid() == -1 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        })
    }
}

/// Sends `sig` to the process group led by `pid` (every VM process leads its
/// own session), or to `pid` alone if there is no such group.
pub fn signal_group(pid: u32, sig: i32) {
    // SAFETY: kill(2) touches no memory.
    let ok = unsafe { libc::kill(-(pid as libc::pid_t), sig) == 0 };
    if !ok {
        signal(pid, sig);
    }
}

/// Replaces `path` with `data` in one step: readers see the old content or
/// the new one, never a partial write. The temporary file lives next to
/// `path` (same file system, so `rename` is atomic). Not fsynced: what it is
/// used for (leases, pidfiles) means nothing after a power loss.
pub fn write_atomic(path: &Path, data: impl AsRef<[u8]>) -> Result<(), VmError> {
    static SEQ: AtomicU64 = AtomicU64::new(0);
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let seq = SEQ.fetch_add(1, Ordering::Relaxed);
    let tmp = path.with_file_name(format!(".{name}.{}.{seq}.tmp", std::process::id()));
    let written = fs::write(&tmp, data).and_then(|()| fs::rename(&tmp, path));
    if let Err(e) = written {
        let _ = fs::remove_file(&tmp);
        return Err(VmError::io(format!("writing {}", path.display()))(e));
    }
    Ok(())
}

/// Reads at most `max` bytes of `path` from `offset`.
pub fn read_log(path: &Path, offset: u64, max: usize) -> Result<LogChunk, VmError> {
    let mut f = match fs::File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Ok(LogChunk { data: Vec::new(), next_offset: offset })
        }
        Err(e) => return Err(VmError::io(format!("opening {}", path.display()))(e)),
    };
    f.seek(SeekFrom::Start(offset)).map_err(VmError::io(format!("seeking {}", path.display())))?;
    let mut data = Vec::with_capacity(max.min(64 * 1024));
    f.take(max as u64).read_to_end(&mut data).map_err(VmError::io(format!("reading {}", path.display())))?;
    Ok(LogChunk { next_offset: offset + data.len() as u64, data })
}

/// The last `max` bytes of `path` as text (for failure reasons).
pub fn tail(path: &Path, max: usize) -> String {
    let len = fs::metadata(path).map(|m| m.len()).unwrap_or(0);
    let start = len.saturating_sub(max as u64);
    match read_log(path, start, max) {
        Ok(c) => String::from_utf8_lossy(&c.data).trim().to_string(),
        Err(_) => String::new(),
    }
}

/// True if the file at `path` contains `needle` (the readiness marker).
pub fn file_contains(path: &Path, needle: &str) -> bool {
    fs::read(path).map(|b| b.windows(needle.len()).any(|w| w == needle.as_bytes())).unwrap_or(false)
}

pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_reads_and_tail() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("log");
        assert_eq!(read_log(&p, 0, 10).unwrap().data, b"");
        fs::write(&p, b"hello world\nBLIXARD-GUEST-READY\n").unwrap();
        let c = read_log(&p, 6, 5).unwrap();
        assert_eq!((c.data.as_slice(), c.next_offset), (&b"world"[..], 11));
        assert!(file_contains(&p, crate::READY_MARKER));
        assert_eq!(tail(&p, 20), "BLIXARD-GUEST-READY");
    }

    #[test]
    fn liveness_checks_the_command_line() {
        let me = std::process::id();
        assert!(pid_alive(me, ""));
        assert!(!pid_alive(me, "definitely-not-in-my-cmdline-xyz"));
        assert!(!pid_alive(u32::MAX - 1, ""));
    }

    #[test]
    fn atomic_writes_replace_and_leave_no_temp_files() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("lease");
        write_atomic(&p, "one").unwrap();
        write_atomic(&p, "two").unwrap();
        assert_eq!(fs::read_to_string(&p).unwrap(), "two");
        let files: Vec<_> = fs::read_dir(d.path()).unwrap().flatten().map(|e| e.file_name()).collect();
        assert_eq!(files, ["lease"]);
        assert!(write_atomic(&d.path().join("missing-dir/x"), "x").is_err());
    }
}
