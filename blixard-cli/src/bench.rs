//! `blixard bench`: a closed-loop load generator against a running cluster.
//!
//! VMs are created stopped, so no guest launches: this measures the control
//! plane. For each concurrency level, C clients (one connection each) repeatedly
//! create a tiny VM and delete it again, so the state stays small and no
//! node runs out of capacity. Every create and every delete is one committed
//! Raft write; the figure reported is committed writes per second with
//! per-write latency percentiles.
use std::time::{Duration, Instant};

use blixard_proto as pb;
use blixard_proto::vm_service_client::VmServiceClient;
use clap::Args;

use crate::client::{channel, status_failure};
use crate::Failure;

#[derive(Args)]
pub struct BenchArgs {
    /// Concurrency levels to run, comma separated.
    #[arg(long, value_delimiter = ',', default_value = "1,16,256")]
    pub clients: Vec<usize>,
    /// Seconds per level.
    #[arg(long, default_value_t = 10)]
    pub seconds: u64,
    /// Print one JSON object per level instead of a table.
    #[arg(long)]
    pub json: bool,
}

struct Level {
    clients: usize,
    writes: u64,
    errors: u64,
    elapsed: Duration,
    p50: Duration,
    p99: Duration,
    max: Duration,
}

pub async fn run(addrs: &str, args: BenchArgs) -> Result<(), Failure> {
    if args.clients.is_empty() || args.clients.contains(&0) || args.seconds == 0 {
        return Err(Failure::new("--clients needs positive counts and --seconds must be positive"));
    }
    // Every client talks to the first member that answers.
    let addr = crate::client::answering(&crate::client::parse_members(addrs)?).await?;
    let addr = addr.as_str();
    let run_id = std::process::id();
    if !args.json {
        println!("target {addr}; each level runs {}s; writes = VM create + delete", args.seconds);
        println!(
            "{:>8} {:>10} {:>12} {:>10} {:>10} {:>10} {:>7}",
            "clients", "writes", "writes/s", "p50 ms", "p99 ms", "max ms", "errors"
        );
    }
    for &c in &args.clients {
        let level = run_level(addr, c, Duration::from_secs(args.seconds), run_id).await?;
        let rate = level.writes as f64 / level.elapsed.as_secs_f64();
        let ms = |d: Duration| d.as_secs_f64() * 1000.0;
        if args.json {
            println!(
                "{}",
                serde_json::json!({
                    "clients": level.clients, "writes": level.writes, "writes_per_sec": rate,
                    "p50_ms": ms(level.p50), "p99_ms": ms(level.p99), "max_ms": ms(level.max),
                    "errors": level.errors, "seconds": level.elapsed.as_secs_f64(),
                })
            );
        } else {
            println!(
                "{:>8} {:>10} {:>12.0} {:>10.2} {:>10.2} {:>10.2} {:>7}",
                level.clients,
                level.writes,
                rate,
                ms(level.p50),
                ms(level.p99),
                ms(level.max),
                level.errors
            );
        }
    }
    Ok(())
}

async fn run_level(addr: &str, clients: usize, dur: Duration, run_id: u32) -> Result<Level, Failure> {
    let mut tasks = Vec::with_capacity(clients);
    let start = Instant::now();
    let stop_at = start + dur;
    for c in 0..clients {
        let ch = channel(addr).await?;
        tasks.push(tokio::spawn(async move {
            let mut vms = VmServiceClient::with_interceptor(ch, crate::client::Auth);
            let mut lat = Vec::with_capacity(4096);
            let mut errors = 0u64;
            let mut seq = 0u64;
            let spec = pb::VmSpec { vcpus: 1, memory_mb: 16, disk_gb: 1, ..Default::default() };
            while Instant::now() < stop_at {
                let name = format!("bench-{run_id}-{clients}-{c}-{seq}");
                seq += 1;
                let t = Instant::now();
                let created = vms
                    .create_vm(pb::CreateVmRequest {
                        name: name.clone(),
                        spec: Some(spec.clone()),
                        no_start: true,
                        request_id: String::new(),
                        ..Default::default()
                    })
                    .await;
                match created {
                    Ok(_) => lat.push(t.elapsed()),
                    Err(s) if s.code() == tonic::Code::ResourceExhausted => return Err(status_failure(&s)),
                    Err(_) => {
                        errors += 1;
                        continue;
                    }
                }
                let t = Instant::now();
                match vms.delete_vm(pb::DeleteVmRequest { name, request_id: String::new() }).await {
                    Ok(_) => lat.push(t.elapsed()),
                    Err(_) => errors += 1,
                }
            }
            Ok((lat, errors))
        }));
    }
    let mut all = Vec::new();
    let mut errors = 0;
    for t in tasks {
        let (lat, e) = t.await.map_err(|e| Failure::new(format!("client task failed: {e}")))??;
        all.extend(lat);
        errors += e;
    }
    let elapsed = start.elapsed();
    all.sort_unstable();
    let pct = |p: f64| {
        all.get(((all.len() as f64 * p) as usize).min(all.len().saturating_sub(1)))
            .copied()
            .unwrap_or_default()
    };
    Ok(Level {
        clients,
        writes: all.len() as u64,
        errors,
        elapsed,
        p50: pct(0.50),
        p99: pct(0.99),
        max: all.last().copied().unwrap_or_default(),
    })
}
