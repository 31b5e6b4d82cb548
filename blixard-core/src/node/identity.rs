//! The data directory's identity: which node this is and which cluster it
//! belongs to. Written once, atomically; checked on every start so that a
//! data dir is never silently reused under another id or cluster.
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use crate::types::NodeId;

const FILE: &str = "identity";
/// Entries that mean the directory holds Raft state: the log directory, or
/// the log database of a build from before segment logs.
pub const LOG_FILES: [&str; 2] = [crate::raft::log_store::DIR, crate::raft::log_store::legacy::FILE];

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Identity {
    pub node_id: NodeId,
    pub cluster_id: String,
}

#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error("data dir {dir} belongs to node {stored}, not node {requested}; start with --id {stored} or use another --data-dir")]
    NodeMismatch { dir: PathBuf, stored: NodeId, requested: NodeId },
    #[error("data dir {dir} belongs to cluster {stored}, but {seed} is in cluster {other}; use a fresh --data-dir to join another cluster")]
    ClusterMismatch { dir: PathBuf, stored: String, seed: String, other: String },
    #[error("data dir {dir} holds Raft state (a Raft log) but no identity file; refusing to guess (restore {FILE} or move the directory away)")]
    Orphaned { dir: PathBuf },
    #[error("identity file {path} is corrupt: {reason}")]
    Corrupt { path: PathBuf, reason: String },
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> IdentityError + '_ {
    move |source| IdentityError::Io { path: path.to_path_buf(), source }
}

/// Reads the identity in `dir`, if any. A directory with Raft state but no
/// identity is an error, never a fresh start.
pub fn load(dir: &Path) -> Result<Option<Identity>, IdentityError> {
    let path = dir.join(FILE);
    let text = match fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            if LOG_FILES.iter().any(|f| dir.join(f).exists()) {
                return Err(IdentityError::Orphaned { dir: dir.to_path_buf() });
            }
            return Ok(None);
        }
        Err(e) => return Err(io(&path)(e)),
    };
    let corrupt = |reason: &str| IdentityError::Corrupt { path: path.clone(), reason: reason.to_string() };
    let mut node_id = None;
    let mut cluster_id = None;
    for line in text.lines().map(str::trim).filter(|l| !l.is_empty() && !l.starts_with('#')) {
        let (k, v) = line.split_once('=').ok_or_else(|| corrupt("expected key = value lines"))?;
        match k.trim() {
            "node_id" => {
                node_id = Some(v.trim().parse::<NodeId>().map_err(|_| corrupt("node_id is not a number"))?)
            }
            "cluster_id" => cluster_id = Some(v.trim().to_string()),
            _ => return Err(corrupt("unknown key")),
        }
    }
    match (node_id, cluster_id) {
        (Some(node_id), Some(cluster_id)) if node_id > 0 && !cluster_id.is_empty() => {
            Ok(Some(Identity { node_id, cluster_id }))
        }
        _ => Err(corrupt("needs a positive node_id and a cluster_id")),
    }
}

/// Writes the identity atomically (temp file, fsync, rename, fsync dir).
pub fn store(dir: &Path, id: &Identity) -> Result<(), IdentityError> {
    let path = dir.join(FILE);
    let tmp = dir.join(format!("{FILE}.tmp"));
    let body = format!(
        "# Written by blixard when this node first joined its cluster. Do not edit.\nnode_id = {}\ncluster_id = {}\n",
        id.node_id, id.cluster_id
    );
    let mut f = fs::File::create(&tmp).map_err(io(&tmp))?;
    f.write_all(body.as_bytes()).map_err(io(&tmp))?;
    f.sync_all().map_err(io(&tmp))?;
    fs::rename(&tmp, &path).map_err(io(&path))?;
    fs::File::open(dir).and_then(|d| d.sync_all()).map_err(io(dir))
}

/// Checks a stored identity against the id the operator asked for.
pub fn check_node(dir: &Path, stored: &Identity, requested: Option<NodeId>) -> Result<(), IdentityError> {
    match requested {
        Some(r) if r != stored.node_id => {
            Err(IdentityError::NodeMismatch { dir: dir.to_path_buf(), stored: stored.node_id, requested: r })
        }
        _ => Ok(()),
    }
}

/// 64 random bits from the process's random hasher keys (seeded by the OS;
/// deterministic under madsim) mixed with `a` and `b`.
pub fn random_u64(a: u64, b: u64) -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(a);
    h.write_u64(b);
    h.finish()
}

/// A new 128-bit cluster id.
pub fn new_cluster_id(node_id: NodeId, now_ms: u64) -> String {
    format!("{:016x}{:016x}", random_u64(node_id, now_ms), random_u64(now_ms, node_id))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_checks() {
        let d = tempfile::tempdir().unwrap();
        assert_eq!(load(d.path()).unwrap(), None);
        let id = Identity { node_id: 3, cluster_id: new_cluster_id(3, 1) };
        store(d.path(), &id).unwrap();
        assert_eq!(load(d.path()).unwrap(), Some(id.clone()));
        assert!(check_node(d.path(), &id, Some(3)).is_ok());
        assert!(check_node(d.path(), &id, None).is_ok());
        let e = check_node(d.path(), &id, Some(4)).unwrap_err();
        assert!(e.to_string().contains("belongs to node 3, not node 4"), "{e}");
    }

    #[test]
    fn raft_state_without_identity_is_refused() {
        let d = tempfile::tempdir().unwrap();
        fs::write(d.path().join(LOG_FILES[1]), b"x").unwrap();
        assert!(matches!(load(d.path()), Err(IdentityError::Orphaned { .. })));
        fs::write(d.path().join(FILE), "node_id = x\n").unwrap();
        assert!(matches!(load(d.path()), Err(IdentityError::Corrupt { .. })));
    }

    #[test]
    fn cluster_ids_differ() {
        assert_ne!(new_cluster_id(1, 5), new_cluster_id(1, 5));
        assert_eq!(new_cluster_id(1, 5).len(), 32);
    }
}
