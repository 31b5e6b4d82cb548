//! Bearer tokens: random secrets shown once, stored only as SHA-256 hashes
//! in the replicated state.
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::Role;

/// Every token starts with this, so a leaked one is easy to recognise
/// (and to scan for).
pub const PREFIX: &str = "blx_";

/// The most tokens a cluster holds (the table is replicated in full).
pub const MAX_TOKENS: usize = 4096;

/// The name of the admin token a cluster creates when it bootstraps.
pub const BOOTSTRAP_NAME: &str = "bootstrap";

pub type TokenHash = [u8; 32];

/// The SHA-256 of a token's secret: what the state keeps. Tokens are 256
/// random bits, so a plain hash is enough (no salt, no stretching).
pub fn hash(secret: &str) -> TokenHash {
    Sha256::digest(secret.as_bytes()).into()
}

/// A new secret: [`PREFIX`] and 32 random bytes in hex.
pub fn new_secret() -> Result<String, getrandom::Error> {
    let mut bytes = [0u8; 32];
    // Under the simulator the seeded generator, so a run replays exactly.
    #[cfg(madsim)]
    madsim::rand::Rng::fill(&mut madsim::rand::thread_rng(), &mut bytes[..]);
    #[cfg(not(madsim))]
    getrandom::getrandom(&mut bytes)?;
    let mut s = String::with_capacity(PREFIX.len() + 64);
    s.push_str(PREFIX);
    for b in bytes {
        s.push_str(&format!("{b:02x}"));
    }
    Ok(s)
}

/// Whether `s` looks like a token (prefix, 64 lowercase hex digits): checked
/// before hashing, so a mistyped flag is told apart from a revoked token.
pub fn well_formed(s: &str) -> bool {
    s.strip_prefix(PREFIX).is_some_and(|hex| {
        hex.len() == 64 && hex.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    })
}

/// One token as the replicated state keeps it: never the secret.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct TokenRecord {
    pub name: String,
    pub role: Role,
    pub hash: TokenHash,
    /// The proposer's clock when it was created.
    pub created_at_ms: u64,
    /// Wall-clock expiry (ms since the epoch); 0: never.
    pub expires_at_ms: u64,
    /// The admin token made when the cluster bootstrapped.
    pub bootstrap: bool,
}

impl TokenRecord {
    pub fn expired(&self, now_ms: u64) -> bool {
        self.expires_at_ms != 0 && now_ms >= self.expires_at_ms
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_are_random_well_formed_and_hash_apart() {
        let a = new_secret().unwrap();
        let b = new_secret().unwrap();
        assert_ne!(a, b);
        assert!(well_formed(&a) && well_formed(&b), "{a}");
        assert_ne!(hash(&a), hash(&b));
        assert_eq!(hash(&a), hash(&a.clone()));
        for bad in ["", "blx_", "blx_xyz", &a[..a.len() - 1], &a.to_uppercase(), &a.replace("blx_", "tok_")] {
            assert!(!well_formed(bad), "{bad}");
        }
    }

    #[test]
    fn expiry() {
        let t = TokenRecord {
            name: "t".into(),
            role: Role::Viewer,
            hash: [0; 32],
            created_at_ms: 1,
            expires_at_ms: 100,
            bootstrap: false,
        };
        assert!(!t.expired(99));
        assert!(t.expired(100));
        assert!(!TokenRecord { expires_at_ms: 0, ..t }.expired(u64::MAX));
    }
}
