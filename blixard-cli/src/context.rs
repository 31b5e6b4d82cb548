//! CLI contexts: where a cluster is and how to prove who you are, kept in
//! `~/.config/blixard/config.toml` (or `$XDG_CONFIG_HOME/blixard/`, or the
//! file `$BLIXARD_CONFIG` names), mode 0600 since it holds tokens:
//!
//! ```toml
//! current-context = "default"
//! [contexts.default]
//! addr = "127.0.0.1:7420"
//! token = "blx_..."
//! ca = "/etc/blixard/ca.pem"        # TLS: the cluster CA
//! cert = "/etc/blixard/admin.pem"   # TLS: a client certificate
//! key = "/etc/blixard/admin-key.pem"
//! ```
//!
//! Flags and environment variables win over the context, field by field.
//! Bootstrapping a cluster (`node start` without `--join`, `up`) writes a
//! context for it and makes it current.
use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::Failure;

/// The context a new cluster's founder writes when none is named.
pub const DEFAULT_NAME: &str = "default";

#[derive(Serialize, Deserialize, Default, Debug, Clone, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(rename = "current-context", default, skip_serializing_if = "Option::is_none")]
    pub current: Option<String>,
    #[serde(default)]
    pub contexts: BTreeMap<String, Context>,
}

#[derive(Serialize, Deserialize, Default, Debug, Clone, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Context {
    /// Members, HOST:PORT[,HOST:PORT...].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub addr: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca: Option<PathBuf>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cert: Option<PathBuf>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<PathBuf>,
}

/// The config file's path.
pub fn path() -> PathBuf {
    if let Some(p) = std::env::var_os("BLIXARD_CONFIG").filter(|p| !p.is_empty()) {
        return PathBuf::from(p);
    }
    let base = std::env::var_os("XDG_CONFIG_HOME")
        .filter(|p| !p.is_empty())
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".config")))
        .unwrap_or_else(|| PathBuf::from("."));
    base.join("blixard").join("config.toml")
}

/// The config at `path`; empty when there is no file.
pub fn load(path: &Path) -> Result<Config, Failure> {
    match std::fs::read_to_string(path) {
        Ok(text) => toml::from_str(&text).map_err(|e| {
            Failure::new(format!("config file {}: {}", path.display(), one_line(&e.to_string())))
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Config::default()),
        Err(e) => Err(Failure::new(format!("cannot read config file {}: {e}", path.display()))),
    }
}

fn one_line(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

impl Config {
    /// The context to use: `name` if given (it must exist), else the
    /// current one, else none.
    pub fn select(&self, name: Option<&str>, path: &Path) -> Result<Option<&Context>, Failure> {
        match name {
            Some(n) => self.contexts.get(n).map(Some).ok_or_else(|| {
                let known: Vec<&str> = self.contexts.keys().map(String::as_str).collect();
                Failure::new(format!(
                    "no context {n:?} in {} (contexts: {})",
                    path.display(),
                    if known.is_empty() { "none".to_string() } else { known.join(", ") }
                ))
            }),
            None => Ok(self.current.as_ref().and_then(|c| self.contexts.get(c))),
        }
    }
}

/// Writes `cfg` to `path` whole (a temporary file renamed over it), mode
/// 0600, creating the directory (0700) if needed.
pub fn save(path: &Path, cfg: &Config) -> Result<(), Failure> {
    use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
    let fail = |what: &str, e: std::io::Error| Failure::new(format!("cannot {what} {}: {e}", path.display()));
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(|e| fail("create the directory of", e))?;
    }
    let text = toml::to_string(cfg).map_err(|e| Failure::new(format!("cannot encode the config: {e}")))?;
    let tmp = path.with_extension("toml.tmp");
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(|e| fail("write", e))?;
    f.write_all(text.as_bytes()).and_then(|()| f.sync_all()).map_err(|e| fail("write", e))?;
    std::fs::rename(&tmp, path).map_err(|e| fail("write", e))
}

/// Adds (or replaces) context `name` and makes it current.
pub fn put_current(name: &str, ctx: Context) -> Result<PathBuf, Failure> {
    let path = path();
    let mut cfg = load(&path)?;
    cfg.contexts.insert(name.to_string(), ctx);
    cfg.current = Some(name.to_string());
    save(&path, &cfg)?;
    Ok(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_config_round_trips_with_mode_0600_and_selects_contexts() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("sub").join("config.toml");
        assert_eq!(load(&p).unwrap(), Config::default());
        let mut cfg = Config::default();
        let ctx = Context { addr: Some("127.0.0.1:1".into()), token: Some("t".into()), ..Default::default() };
        cfg.contexts.insert("a".into(), ctx.clone());
        cfg.contexts.insert("b".into(), Context::default());
        cfg.current = Some("a".into());
        save(&p, &cfg).unwrap();
        assert_eq!(std::fs::metadata(&p).unwrap().permissions().mode() & 0o777, 0o600);
        let back = load(&p).unwrap();
        assert_eq!(back, cfg);
        assert_eq!(back.select(None, &p).unwrap(), Some(&ctx));
        assert_eq!(back.select(Some("b"), &p).unwrap(), Some(&Context::default()));
        let e = back.select(Some("c"), &p).unwrap_err();
        assert!(e.message.contains("no context \"c\"") && e.message.contains("a, b"), "{}", e.message);
        std::fs::write(&p, "current-context = 3").unwrap();
        assert!(load(&p).unwrap_err().message.contains("config file"));
    }
}
