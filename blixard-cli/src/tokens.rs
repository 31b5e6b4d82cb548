//! `blixard token`: create, list and revoke bearer tokens (admin).
//!
//! `create` makes the secret here, from the OS's random source, and sends
//! only its SHA-256: the secret never crosses the network, and every retry
//! of the write carries the same hash, so a retry after a lost reply
//! cannot mint a second secret.
use clap::Subcommand;
use serde_json::json;

use crate::client::Client;
use crate::output::{table, utc};
use crate::{Failure, Format, WriteOpts};
use blixard_core::auth::{token, Role};
use blixard_proto as pb;

#[derive(Subcommand)]
pub enum TokenCmd {
    /// Create a token and print it, once (stdout: the token alone; -o json:
    /// with its name, role and expiry). The cluster keeps only its hash.
    Create {
        #[arg(long)]
        name: String,
        /// viewer (reads, watch, logs), operator (+ VM writes) or admin
        /// (+ membership, nodes, scheduler, quotas, tokens).
        #[arg(long, value_parser = parse_role)]
        role: Role,
        /// Lifetime, e.g. 30m, 12h, 7d or 1h30m (default: never expires).
        #[arg(long, value_name = "DUR", value_parser = parse_duration_ms)]
        ttl: Option<u64>,
        #[command(flatten)]
        write: WriteOpts,
        #[arg(short = 'o', long = "output", value_enum, default_value = "table")]
        format: Format,
    },
    /// Every token: name, role, expiry (never the secret).
    List {
        #[arg(short = 'o', long = "output", value_enum, default_value = "table")]
        format: Format,
    },
    /// Revoke a token: every node refuses it once the revocation is applied
    /// there. The last admin token that has not expired cannot be revoked.
    Revoke {
        name: String,
        #[command(flatten)]
        write: WriteOpts,
    },
}

fn parse_role(s: &str) -> Result<Role, String> {
    Role::parse(s).ok_or_else(|| format!("expected {}, got {s:?}", Role::RULE))
}

/// A duration such as `90s`, `30m`, `12h`, `7d` or `1h30m`, in milliseconds.
pub fn parse_duration_ms(s: &str) -> Result<u64, String> {
    let bad = || format!("expected a duration such as 30m, 12h, 7d or 1h30m, got {s:?}");
    let mut total: u64 = 0;
    let mut digits = String::new();
    for c in s.chars() {
        if c.is_ascii_digit() {
            digits.push(c);
            continue;
        }
        let unit: u64 = match c {
            's' => 1_000,
            'm' => 60_000,
            'h' => 3_600_000,
            'd' => 86_400_000,
            _ => return Err(bad()),
        };
        let n: u64 = digits.parse().map_err(|_| bad())?;
        digits.clear();
        total = n.checked_mul(unit).and_then(|v| total.checked_add(v)).ok_or_else(bad)?;
    }
    if !digits.is_empty() || total == 0 {
        return Err(bad());
    }
    Ok(total)
}

fn expiry(t: &pb::Token) -> String {
    match t.expires_at_ms {
        0 => "never".to_string(),
        at if t.expired => format!("{} (expired)", utc(at)),
        at => utc(at),
    }
}

fn token_json(t: &pb::Token) -> serde_json::Value {
    json!({
        "name": t.name,
        "role": t.role,
        "created_at_ms": t.created_at_ms,
        "expires_at_ms": if t.expires_at_ms == 0 { serde_json::Value::Null } else { json!(t.expires_at_ms) },
        "expired": t.expired,
        "bootstrap": t.bootstrap,
    })
}

pub async fn run(c: &mut Client, cmd: TokenCmd) -> Result<(), Failure> {
    match cmd {
        TokenCmd::Create { name, role, ttl, write, format } => {
            let secret =
                token::new_secret().map_err(|e| Failure::new(format!("no randomness for a token: {e}")))?;
            let req = pb::CreateTokenRequest {
                name,
                role: role.as_str().to_string(),
                ttl_ms: ttl.unwrap_or(0),
                secret_sha256: token::hash(&secret).to_vec(),
                request_id: write.id()?,
            };
            let r = c.create_token(req).await?;
            let t = r.token.unwrap_or_default();
            if format == Format::Json {
                let mut v = token_json(&t);
                v["token"] = json!(secret);
                println!("{}", serde_json::to_string_pretty(&v).map_err(|e| Failure::new(e.to_string()))?);
            } else {
                eprintln!(
                    "token {} ({}, expires: {}); it is shown only now: keep it safe",
                    t.name,
                    t.role,
                    expiry(&t)
                );
                println!("{secret}");
            }
            Ok(())
        }
        TokenCmd::List { format } => {
            let tokens = c.list_tokens().await?;
            if format == Format::Json {
                let all: Vec<_> = tokens.iter().map(token_json).collect();
                println!("{}", serde_json::to_string_pretty(&all).map_err(|e| Failure::new(e.to_string()))?);
                return Ok(());
            }
            let mut t = table(&["NAME", "ROLE", "CREATED", "EXPIRES"]);
            for tok in &tokens {
                let name = if tok.bootstrap { format!("{} (bootstrap)", tok.name) } else { tok.name.clone() };
                t.add_row(vec![name, tok.role.clone(), utc(tok.created_at_ms), expiry(tok)]);
            }
            println!("{t}");
            Ok(())
        }
        TokenCmd::Revoke { name, write } => {
            c.revoke_token(name.clone(), &write.id()?).await?;
            println!("token {name} revoked");
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::parse_duration_ms;

    #[test]
    fn durations() {
        assert_eq!(parse_duration_ms("90s"), Ok(90_000));
        assert_eq!(parse_duration_ms("30m"), Ok(1_800_000));
        assert_eq!(parse_duration_ms("1h30m"), Ok(5_400_000));
        assert_eq!(parse_duration_ms("7d"), Ok(604_800_000));
        for bad in ["", "0s", "10", "5x", "h", "-1h", "1.5h", "99999999999999999999d"] {
            assert!(parse_duration_ms(bad).is_err(), "{bad}");
        }
    }
}
