//! Moving a VM's data disk with the VM (cold migration and drains).
//!
//! When a VM that moves by migration or drain leaves this node, the node
//! keeps its disk file aside, in `DATA/handoff/<name>@<placement
//! generation>.img`, instead of deleting it with the VM's other files. The
//! new node, before it first starts the VM, fetches that file over the
//! internal `FetchDisk` stream (node to node only, like Raft traffic),
//! writes it to a temporary file, checks it, makes it durable and only
//! then puts it where its backend looks for the disk. A VM placed on
//! another node because its node was marked down starts with a fresh disk
//! there (the dead node cannot serve it); its history says it moved
//! `node-down`.
//!
//! The stream carries only the file's data extents (`SEEK_DATA` /
//! `SEEK_HOLE`), so a mostly empty sparse disk costs what it holds, not its
//! size; holes stay holes on the receiver. Every piece is covered by a
//! SHA-256 over (offset, length, bytes) of each extent and the file's
//! size, which the sender sends last; the receiver computes the same over
//! what it wrote and refuses the copy on any difference (and on a short
//! stream). A kept disk is deleted once the VM runs on its new node, moved
//! again, or is deleted. (A VM moved again before it first ran on its new
//! node starts with a fresh disk on the next one.)
use std::io::{Read, Seek, SeekFrom};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::state::ClusterState;
use crate::types::{MoveReason, NodeId, ObservedState, VmRecord};

/// Bytes per data piece on the stream.
pub const PIECE: usize = 1024 * 1024;

/// The directory, in the data dir, of disks kept for the node a VM moved to.
pub const HANDOFF_DIR: &str = "handoff";

/// What a node asks for: VM `name`'s disk as it left the sender, for the
/// placement generation the VM has on the asking node.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct FetchDisk {
    pub name: String,
    pub placement_gen: u64,
}

/// One message of the `FetchDisk` stream.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub enum DiskPiece {
    /// `bytes` at `offset`.
    Data { offset: u64, bytes: Vec<u8> },
    /// The last message: the file's size and the digest of every piece.
    End { size: u64, sha256: [u8; 32] },
}

/// The digest both sides compute over the pieces, in order.
#[derive(Default)]
pub struct PieceDigest(Sha256);

impl PieceDigest {
    pub fn piece(&mut self, offset: u64, bytes: &[u8]) {
        self.0.update(offset.to_le_bytes());
        self.0.update((bytes.len() as u64).to_le_bytes());
        self.0.update(bytes);
    }

    pub fn finish(mut self, size: u64) -> [u8; 32] {
        self.0.update(b"end");
        self.0.update(size.to_le_bytes());
        self.0.finalize().into()
    }
}

pub fn handoff_path(data_dir: &Path, name: &str, placement_gen: u64) -> PathBuf {
    data_dir.join(HANDOFF_DIR).join(format!("{name}@{placement_gen}.img"))
}

fn copied(reason: MoveReason) -> bool {
    matches!(reason, MoveReason::Migrate | MoveReason::Drain)
}

/// Whether the disk of VM `vm`, whose files this node `me` is about to
/// delete, must be kept for the node it moves to: it is leaving `me` by
/// migration or drain (its next placement generation), or has just been
/// placed elsewhere (or queued) by one (its current generation). Returns
/// that generation.
pub fn moved_off(vm: &VmRecord, me: NodeId) -> Option<u64> {
    if vm.spec.disk_gb == 0 || vm.node_id == me {
        return None;
    }
    if vm.leaving == me {
        return vm.moving.filter(|m| copied(m.reason)).map(|_| vm.placement_gen + 1);
    }
    let last = vm.history.last()?;
    (copied(last.reason) && last.from == me).then_some(vm.placement_gen)
}

/// Whether a VM placed on `me` should start with its disk fetched from
/// another node (its last move was a migration or drain from there, to
/// here or, if it waited in the queue, to no node): returns that node.
pub fn fetch_from(vm: &VmRecord, me: NodeId) -> Option<NodeId> {
    let last = vm.history.last()?;
    let from_elsewhere = last.from != me && last.from != 0 && (last.to == me || last.to == 0);
    (vm.spec.disk_gb > 0 && copied(last.reason) && vm.node_id == me && from_elsewhere).then_some(last.from)
}

/// Keeps `disk` (the VM's disk file, about to be deleted with the VM's
/// other files) for the node the VM moved to. Durable before it returns.
pub fn keep(data_dir: &Path, name: &str, placement_gen: u64, disk: &Path) -> std::io::Result<PathBuf> {
    let dir = data_dir.join(HANDOFF_DIR);
    std::fs::create_dir_all(&dir)?;
    let to = handoff_path(data_dir, name, placement_gen);
    std::fs::rename(disk, &to)?;
    std::fs::File::open(&dir)?.sync_all()?;
    Ok(to)
}

/// Deletes kept disks nobody will fetch any more: the VM is gone, moved
/// again, or runs on the node it moved to (which fetched its disk before
/// starting it).
pub fn collect_garbage(data_dir: &Path, state: &ClusterState) {
    let Ok(entries) = std::fs::read_dir(data_dir.join(HANDOFF_DIR)) else { return };
    for e in entries.flatten() {
        let file = e.file_name();
        let Some((name, gen)) =
            file.to_str().and_then(|f| f.strip_suffix(".img")).and_then(|f| f.rsplit_once('@'))
        else {
            continue;
        };
        let Ok(gen) = gen.parse::<u64>() else { continue };
        let needed = state
            .with_vm(name, |v| {
                let on_its_way = v.placement_gen == gen && v.observed != ObservedState::Running;
                let still_leaving = v.leaving != 0 && v.placement_gen + 1 == gen;
                on_its_way || still_leaving
            })
            .unwrap_or(false);
        if !needed {
            match std::fs::remove_file(e.path()) {
                Ok(()) => {
                    tracing::info!(vm = name, file = %e.path().display(), "deleted a kept disk nobody needs any more")
                }
                Err(err) => {
                    tracing::warn!(file = %e.path().display(), error = %err, "cannot delete a kept disk")
                }
            }
        }
    }
}

/// The data extents of `file`, `(offset, length)`, in order, via
/// `SEEK_DATA`/`SEEK_HOLE`; the whole file as one extent where the file
/// system cannot tell.
pub fn extents(file: &std::fs::File, size: u64) -> std::io::Result<Vec<(u64, u64)>> {
    use std::os::fd::AsRawFd;
    let fd = file.as_raw_fd();
    let mut out = Vec::new();
    let mut pos: i64 = 0;
    let size = i64::try_from(size).unwrap_or(i64::MAX);
    while pos < size {
        // SAFETY: lseek on an open descriptor; no memory is touched.
        let data = unsafe { libc::lseek(fd, pos, libc::SEEK_DATA) };
        if data < 0 {
            let e = std::io::Error::last_os_error();
            return match e.raw_os_error() {
                // No data after pos: the rest is a hole.
                Some(libc::ENXIO) => Ok(out),
                Some(libc::EINVAL) if out.is_empty() && pos == 0 => Ok(vec![(0, size as u64)]),
                _ => Err(e),
            };
        }
        // SAFETY: as above.
        let hole = unsafe { libc::lseek(fd, data, libc::SEEK_HOLE) };
        if hole < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let end = hole.min(size);
        if end > data {
            out.push((data as u64, (end - data) as u64));
        }
        pos = end;
    }
    Ok(out)
}

/// Reads `path` as the pieces of the stream, calling `send` with each (and
/// the `End` last). Blocking: run it on a blocking thread.
pub fn read_pieces(path: &Path, mut send: impl FnMut(DiskPiece) -> bool) -> std::io::Result<()> {
    let mut file = std::fs::File::open(path)?;
    let size = file.metadata()?.len();
    let mut digest = PieceDigest::default();
    let mut buf = vec![0u8; PIECE];
    for (start, len) in extents(&file, size)? {
        file.seek(SeekFrom::Start(start))?;
        let mut done = 0u64;
        while done < len {
            let n = usize::try_from((len - done).min(PIECE as u64)).unwrap_or(PIECE);
            file.read_exact(&mut buf[..n])?;
            let offset = start + done;
            digest.piece(offset, &buf[..n]);
            if !send(DiskPiece::Data { offset, bytes: buf[..n].to_vec() }) {
                return Err(std::io::Error::other("the receiver went away"));
            }
            done += n as u64;
        }
    }
    send(DiskPiece::End { size, sha256: digest.finish(size) });
    Ok(())
}

/// Writes the pieces of one stream to `dest` (via `dest.part`), checking
/// the digest and size, durable before it is renamed into place.
pub struct DiskWriter {
    part: PathBuf,
    dest: PathBuf,
    file: std::fs::File,
    digest: PieceDigest,
    written: u64,
}

impl DiskWriter {
    pub fn create(dest: &Path) -> std::io::Result<DiskWriter> {
        if let Some(dir) = dest.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let part = dest.with_extension("part");
        let file = std::fs::File::create(&part)?;
        Ok(DiskWriter { part, dest: dest.to_path_buf(), file, digest: PieceDigest::default(), written: 0 })
    }

    /// Takes one piece; `Ok(true)` once the copy is complete and in place.
    pub fn piece(&mut self, piece: DiskPiece) -> Result<bool, String> {
        match piece {
            DiskPiece::Data { offset, bytes } => {
                self.digest.piece(offset, &bytes);
                self.file
                    .write_all_at(&bytes, offset)
                    .map_err(|e| format!("writing {}: {e}", self.part.display()))?;
                self.written += bytes.len() as u64;
                Ok(false)
            }
            DiskPiece::End { size, sha256 } => {
                let mine = std::mem::take(&mut self.digest).finish(size);
                if mine != sha256 {
                    return Err("the copied disk's checksum does not match the sender's".to_string());
                }
                let io = |e: std::io::Error| format!("finishing {}: {e}", self.part.display());
                self.file.set_len(size).map_err(io)?;
                self.file.sync_all().map_err(io)?;
                std::fs::rename(&self.part, &self.dest).map_err(io)?;
                if let Some(dir) = self.dest.parent() {
                    std::fs::File::open(dir).and_then(|d| d.sync_all()).map_err(io)?;
                }
                Ok(true)
            }
        }
    }

    /// Bytes of data received so far.
    pub fn written(&self) -> u64 {
        self.written
    }
}

impl Drop for DiskWriter {
    fn drop(&mut self) {
        // An unfinished copy leaves nothing behind.
        let _ = std::fs::remove_file(&self.part);
    }
}

/// How long one piece (or the stream's opening) may take before the
/// fetch gives up (and is tried again later).
const PIECE_DEADLINE: std::time::Duration = std::time::Duration::from_secs(30);

/// Fetches VM `name`'s disk kept by node `from` into `dest`, checked and
/// durable. Returns the bytes of data copied.
pub async fn fetch(
    node: &super::NodeShared,
    from: NodeId,
    name: &str,
    placement_gen: u64,
    dest: &Path,
) -> Result<u64, String> {
    let addr = node
        .state
        .with_node(from, |n| n.addr.clone())
        .ok_or_else(|| format!("node {from}, which keeps its disk, is unknown"))?;
    let req = FetchDisk { name: name.to_string(), placement_gen };
    let mut stream = node
        .channels
        .fetch_disk(&addr, &node.cluster_id, node.id, &req, PIECE_DEADLINE)
        .await
        .map_err(|e| format!("fetching its disk from node {from}: {e}"))?;
    let path = dest.to_path_buf();
    let mut writer = crate::raft::blocking(move || DiskWriter::create(&path))
        .await
        .and_then(|w| w)
        .map_err(|e| format!("creating {}: {e}", dest.display()))?;
    loop {
        let msg = match tokio::time::timeout(PIECE_DEADLINE, stream.message()).await {
            Err(_) => return Err(format!("node {from} sent no piece of its disk for {PIECE_DEADLINE:?}")),
            Ok(Err(s)) => return Err(format!("fetching its disk from node {from}: {}", s.message())),
            Ok(Ok(None)) => return Err(format!("node {from} ended its disk's stream early")),
            Ok(Ok(Some(m))) => m,
        };
        let piece: DiskPiece = crate::codec::decode(&msg.payload)
            .map_err(|e| format!("a bad piece of its disk from node {from}: {e}"))?;
        // File IO off the async threads: the writer goes to a blocking
        // thread and comes back with the outcome.
        let (w, done) = crate::raft::blocking(move || {
            let done = writer.piece(piece);
            (writer, done)
        })
        .await
        .map_err(|e| format!("disk writer task: {e}"))?;
        writer = w;
        if done? {
            return Ok(writer.written());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sparse_disk_streams_its_data_only_and_arrives_whole() {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("src.img");
        let f = std::fs::File::create(&src).unwrap();
        f.set_len(64 << 20).unwrap();
        f.write_all_at(b"superblock", 1024).unwrap();
        f.write_all_at(&vec![7u8; 3 * PIECE / 2], 40 << 20).unwrap();
        f.sync_all().unwrap();
        let mut pieces = Vec::new();
        read_pieces(&src, |p| {
            pieces.push(p);
            true
        })
        .unwrap();
        let data: u64 = pieces
            .iter()
            .map(|p| match p {
                DiskPiece::Data { bytes, .. } => bytes.len() as u64,
                DiskPiece::End { .. } => 0,
            })
            .sum();
        assert!(data < 8 << 20, "holes are not sent: {data} bytes of 64 MiB");
        let dest = dir.path().join("vm").join("disk.img");
        let mut w = DiskWriter::create(&dest).unwrap();
        let last = pieces.len() - 1;
        for (i, p) in pieces.clone().into_iter().enumerate() {
            assert_eq!(w.piece(p).unwrap(), i == last);
        }
        assert_eq!(std::fs::read(&src).unwrap(), std::fs::read(&dest).unwrap());
        assert!(!dest.with_extension("part").exists());

        // A corrupted piece is refused and leaves nothing.
        let dest2 = dir.path().join("vm2").join("disk.img");
        let mut w = DiskWriter::create(&dest2).unwrap();
        for p in pieces {
            let p = match p {
                DiskPiece::Data { offset, mut bytes } if offset == 1024 || bytes.len() > 10 => {
                    bytes[0] ^= 1;
                    DiskPiece::Data { offset, bytes }
                }
                other => other,
            };
            match w.piece(p) {
                Ok(_) => {}
                Err(e) => {
                    assert!(e.contains("checksum"), "{e}");
                    drop(w);
                    assert!(!dest2.exists() && !dest2.with_extension("part").exists());
                    return;
                }
            }
        }
        panic!("a corrupted copy was accepted");
    }
}
