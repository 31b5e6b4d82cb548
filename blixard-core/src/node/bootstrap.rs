//! What a new cluster makes once: its first admin token, and its VM network.
//!
//! A cluster makes one bootstrap token, once: the node that founds it
//! writes a fresh secret to `DATA/admin-token` (mode 0600) before its first
//! Raft entry, and proposes the token's hash as soon as it leads. A cluster
//! upgraded from a format without tokens makes it the same way on whichever
//! node leads first under the new build. The replicated state remembers
//! that it was made (`tokens_bootstrapped`), so revoking it never makes
//! another. A node whose file does not hold the cluster's bootstrap token
//! (another node's proposal won, or the token was revoked) removes it.
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use super::NodeShared;
use crate::auth::token::{self, BOOTSTRAP_NAME};
use crate::auth::Role;
use crate::command::Command;
use crate::error::CommandError;
use crate::types::Ipv4Net;

/// The file, in the data dir, holding the bootstrap token's secret.
pub const FILE: &str = "admin-token";

pub fn path(data_dir: &Path) -> PathBuf {
    data_dir.join(FILE)
}

/// The secret in `data_dir`'s token file, if there is a well-formed one.
pub fn read(data_dir: &Path) -> Option<String> {
    let s = std::fs::read_to_string(path(data_dir)).ok()?;
    let s = s.trim();
    token::well_formed(s).then(|| s.to_string())
}

/// Makes a new secret and stores it durably (0600, written whole or not at
/// all) before anyone can learn its hash.
pub fn create(data_dir: &Path) -> std::io::Result<String> {
    use std::os::unix::fs::OpenOptionsExt;
    let secret = token::new_secret().map_err(|e| std::io::Error::other(e.to_string()))?;
    let tmp = data_dir.join(format!("{FILE}.tmp"));
    let mut f = std::fs::OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(&tmp)?;
    f.write_all(format!("{secret}\n").as_bytes())?;
    f.sync_all()?;
    std::fs::rename(&tmp, path(data_dir))?;
    std::fs::File::open(data_dir)?.sync_all()?;
    Ok(secret)
}

/// Until the cluster has its bootstrap token: whenever this node leads,
/// proposes the one in its file (made now if missing). Then tidies the file.
pub async fn run(node: Arc<NodeShared>) {
    let dir = node.data_dir.clone();
    while !node.state.tokens_bootstrapped() {
        if node.is_leader() {
            match propose(&node, &dir).await {
                Ok(()) => break,
                Err(e) => tracing::warn!(error = %e, "could not make the cluster's bootstrap token yet"),
            }
        }
        tokio::select! {
            _ = node.state.changed().notified() => {}
            _ = tokio::time::sleep(Duration::from_millis(500)) => {}
        }
    }
    // Whoever won, only the node holding the live token keeps a file.
    if let Some(secret) = read(&dir) {
        if node.state.bootstrap_token() != Some(token::hash(&secret)) {
            match std::fs::remove_file(path(&dir)) {
                Ok(()) => {
                    tracing::info!(file = %path(&dir).display(), "removed a token file that does not hold the cluster's bootstrap token")
                }
                Err(e) => {
                    tracing::warn!(file = %path(&dir).display(), error = %e, "cannot remove a stale token file")
                }
            }
        }
    }
}

async fn propose(node: &NodeShared, dir: &Path) -> Result<(), String> {
    let secret = match read(dir) {
        Some(s) => s,
        None => create(dir).map_err(|e| format!("cannot write {}: {e}", path(dir).display()))?,
    };
    let cmd = Command::CreateToken {
        name: BOOTSTRAP_NAME.to_string(),
        role: Role::Admin,
        hash: token::hash(&secret),
        expires_at_ms: 0,
        bootstrap: true,
    };
    match node.propose_as_leader(cmd).await {
        Ok(_) => {
            tracing::info!(file = %path(dir).display(), "made the cluster's bootstrap admin token (kept in this file; use it with --token or BLIXARD_TOKEN)");
            Ok(())
        }
        // Another leader's proposal won: nothing to do.
        Err(super::ApiError::Command(CommandError::TokenRefused { .. })) => Ok(()),
        Err(e) => Err(e.to_string()),
    }
}

/// The file, in the founder's data dir, holding its `--vm-cidr` until the
/// cluster's VM network is set.
pub const VM_CIDR_FILE: &str = "vm-cidr";

/// Stores the VM network the founder was started with, durably, before
/// its first Raft entry.
pub fn write_vm_cidr(data_dir: &Path, cidr: Ipv4Net) -> std::io::Result<()> {
    let tmp = data_dir.join(format!("{VM_CIDR_FILE}.tmp"));
    let mut f = std::fs::File::create(&tmp)?;
    f.write_all(format!("{cidr}\n").as_bytes())?;
    f.sync_all()?;
    std::fs::rename(&tmp, data_dir.join(VM_CIDR_FILE))?;
    std::fs::File::open(data_dir)?.sync_all()
}

fn read_vm_cidr(data_dir: &Path) -> Option<Ipv4Net> {
    let s = std::fs::read_to_string(data_dir.join(VM_CIDR_FILE)).ok()?;
    Ipv4Net::parse(s.trim()).ok()
}

/// Until the cluster has its VM network: whenever this node leads,
/// proposes the founder's `--vm-cidr` if this node holds it, else the
/// default. The founder leads alone until others join, so its choice is
/// the one made in a new cluster; a cluster upgraded from format 5 gets
/// the default from its first leader under format 6.
pub async fn vm_network(node: Arc<NodeShared>) {
    let dir = node.data_dir.clone();
    while node.state.vm_cidr().is_none() {
        if node.is_leader() {
            let cidr = read_vm_cidr(&dir).unwrap_or(Ipv4Net::DEFAULT_VM_CIDR);
            match node.propose_as_leader(Command::SetVmNetwork { cidr }).await {
                Ok(_) => {
                    tracing::info!(%cidr, "set the cluster's VM network");
                    break;
                }
                Err(super::ApiError::Command(CommandError::VmNetworkFixed { .. })) => break,
                Err(e) => tracing::warn!(error = %e, "could not set the cluster's VM network yet"),
            }
        }
        tokio::select! {
            _ = node.state.changed().notified() => {}
            _ = tokio::time::sleep(Duration::from_millis(500)) => {}
        }
    }
    if let Some(asked) = read_vm_cidr(&dir) {
        if node.state.vm_cidr() != Some(asked) {
            tracing::warn!(%asked, network = ?node.state.vm_cidr().map(|c| c.to_string()), "--vm-cidr was not the cluster's VM network");
        }
        let _ = std::fs::remove_file(dir.join(VM_CIDR_FILE));
    }
}
