//! Failover and leader-stability benchmark (a bench binary that prints
//! figures; it asserts nothing about time, but stops loudly if the cluster
//! gets stuck).
//!
//! Three real `blixard` processes, each in its own network namespace on
//! this machine (veth pairs into one bridge; sub-millisecond round trips).
//! Every client call is `blixard` run inside a node's namespace.
//!
//! - (b) isolate a follower (iptables DROP both ways) for the cut length,
//!   heal, let it settle: did the leader or the term change? Every other
//!   trial writes through the leader during the cut.
//! - (c) SIGSTOP a follower for the cut length, SIGCONT: the same question.
//! - (a) SIGKILL the leader; time from the kill until a write sent through
//!   a surviving node succeeds (a write blocks inside the node while there
//!   is no leader, and the client retries if it gives up). The killed node
//!   is restarted from its data dir and caught up before the next trial.
//!
//! Run: `cargo bench -p blixard-cli --bench failover` as root
//! (BLIXARD_FAILOVER_TRIALS=N, default 20; BLIXARD_FAILOVER_CUT_MS, default
//! 2500; BLIXARD_FAILOVER_KEEP=1 keeps the nodes' data dirs and logs; node
//! logs use RUST_LOG if set).
use std::thread::sleep;
use std::time::{Duration, Instant};

#[path = "../tests/common/netns.rs"]
#[allow(dead_code)] // shared with the tests, which use other parts
mod netns;
use netns::{poll, NsCluster};

const BIN: &str = env!("CARGO_BIN_EXE_blixard");

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len()) - 1]
}

/// The leader (host index) and term all running nodes agree on, waiting up
/// to `secs` for them to agree.
fn agreed(c: &NsCluster, secs: f64, what: &str) -> (usize, u64) {
    poll(secs, || c.agreed())
        .unwrap_or_else(|| panic!("{what}: the nodes did not agree on a leader within {secs}s"))
}

/// Waits until node `i` has applied everything the leader has.
fn caught_up(c: &NsCluster, i: usize, leader: usize, what: &str) {
    poll(30.0, || {
        let target = c.status(leader)?.applied;
        (c.status(i)?.applied >= target).then_some(())
    })
    .unwrap_or_else(|| panic!("{what}: node {} did not catch up within 30s", i + 1));
}

/// One disruption of a follower per trial; returns how many trials ended
/// with another leader or term than they began with.
fn stability(
    c: &mut NsCluster,
    trials: u64,
    label: &str,
    mut cut: impl FnMut(&mut NsCluster, usize),
    mut heal: impl FnMut(&mut NsCluster, usize),
    cut_len: Duration,
) -> u64 {
    let mut changes = 0;
    for t in 0..trials {
        let what = format!("{label} trial {t}");
        let (leader, term) = agreed(c, 10.0, &what);
        let followers: Vec<usize> = (0..c.len()).filter(|i| *i != leader).collect();
        let f = followers[t as usize % followers.len()];
        let start = Instant::now();
        cut(c, f);
        if t % 2 == 0 {
            let out = c.write(leader, &format!("{label}-{t}"));
            assert!(
                out.status.success(),
                "{what}: write during the cut: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        sleep(cut_len.saturating_sub(start.elapsed()));
        heal(c, f);
        // A disruptive election follows within a heartbeat of the heal;
        // this leaves it two leases.
        sleep(Duration::from_millis(1600));
        let after = agreed(c, 10.0, &what);
        if after != (leader, term) {
            changes += 1;
            eprintln!(
                "{what}: node {} cut off; leader/term before ({}, {term}), after ({}, {})",
                f + 1,
                leader + 1,
                after.0 + 1,
                after.1
            );
        }
        caught_up(c, f, after.0, &what);
    }
    changes
}

fn main() {
    // `cargo bench` passes --bench; ignore arguments.
    let trials = env_u64("BLIXARD_FAILOVER_TRIALS", 20).max(1);
    let cut_len = Duration::from_millis(env_u64("BLIXARD_FAILOVER_CUT_MS", 2500));
    let log = std::env::var("RUST_LOG").unwrap_or_else(|_| "info,openraft=warn".into());
    let began = Instant::now();
    let mut c = NsCluster::start(BIN, 3, &log);
    if std::env::var_os("BLIXARD_FAILOVER_KEEP").is_some() {
        c.keep_files();
        println!("node data and logs: {}", c.root().display());
    }
    let (leader, term) = c.wait_formed(90.0);
    println!(
        "3 nodes in network namespaces; leader node {}, term {term}; {trials} trials each; cut {} ms",
        leader + 1,
        cut_len.as_millis()
    );
    for k in 0..20 {
        let out = c.write(leader, &format!("warm-{k}"));
        assert!(out.status.success(), "warm-up write: {}", String::from_utf8_lossy(&out.stderr));
    }

    let t = Instant::now();
    let isolated =
        stability(&mut c, trials, "isolate", |c, f| c.net.isolate(f), |c, f| c.net.heal(f), cut_len);
    println!(
        "(b) isolate a follower, heal: {isolated}/{trials} trials changed leader or term ({:.0?})",
        t.elapsed()
    );

    let t = Instant::now();
    let stop = |c: &mut NsCluster, f: usize| {
        let pid = c.pid(f);
        c.net.signal(pid, libc::SIGSTOP)
    };
    let cont = |c: &mut NsCluster, f: usize| {
        let pid = c.pid(f);
        c.net.signal(pid, libc::SIGCONT)
    };
    let paused = stability(&mut c, trials, "pause", stop, cont, cut_len);
    println!(
        "(c) SIGSTOP a follower, SIGCONT: {paused}/{trials} trials changed leader or term ({:.0?})",
        t.elapsed()
    );

    let t = Instant::now();
    let mut took = Vec::new();
    let mut elections = Vec::new();
    for n in 0..trials {
        let what = format!("kill trial {n}");
        let (leader, term) = agreed(&c, 10.0, &what);
        let survivor = (0..c.len()).find(|i| *i != leader).unwrap();
        let start = Instant::now();
        c.kill(leader);
        let mut attempt = 0;
        loop {
            let out = c.write(survivor, &format!("failover-{n}-{attempt}"));
            if out.status.success() {
                break;
            }
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "{what}: no write succeeded through node {} within 30s of killing leader node {}: {}",
                survivor + 1,
                leader + 1,
                String::from_utf8_lossy(&out.stderr)
            );
            attempt += 1;
        }
        took.push(start.elapsed());
        let (new_leader, new_term) = agreed(&c, 10.0, &what);
        elections.push(new_term - term);
        c.start_node(leader, false);
        caught_up(&c, leader, new_leader, &what);
        agreed(&c, 10.0, &what);
    }
    took.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    let one_election = elections.iter().filter(|e| **e == 1).count();
    println!(
        "(a) kill -9 the leader -> a write succeeds: p50 {:.0} ms  p90 {:.0} ms  p99 {:.0} ms  min {:.0} ms  max {:.0} ms \
         ({one_election}/{trials} failovers took one election; {:.0?})",
        ms(percentile(&took, 0.50)),
        ms(percentile(&took, 0.90)),
        ms(percentile(&took, 0.99)),
        ms(took[0]),
        ms(took[took.len() - 1]),
        t.elapsed()
    );

    println!();
    println!("| scenario ({trials} trials) | result |");
    println!("|---|---|");
    println!(
        "| (a) leader `kill -9` → write through a survivor succeeds | p50 {:.0} ms, p90 {:.0} ms, p99 {:.0} ms, max {:.0} ms |",
        ms(percentile(&took, 0.50)),
        ms(percentile(&took, 0.90)),
        ms(percentile(&took, 0.99)),
        ms(took[took.len() - 1])
    );
    println!("| (b) follower isolated {} ms, healed | {isolated} leader/term changes |", cut_len.as_millis());
    println!("| (c) follower SIGSTOP {} ms, SIGCONT | {paused} leader/term changes |", cut_len.as_millis());
    println!("total {:.0?}", began.elapsed());
}
