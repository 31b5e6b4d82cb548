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
//! - (a) SIGKILL the leader. From the kill: the time until one survivor
//!   reports a new leader (its status polled every ~50 ms plus a CLI run),
//!   and until a write sent at once through the other survivor succeeds (a
//!   write waits inside the node while there is no leader; the client
//!   retries if it gives up). The killed node is restarted from its data dir
//!   and caught up before the next trial.
//! - (d) the same with the leader cut off (iptables DROP) instead of
//!   killed, healed after the trial: the forward to the old leader now
//!   meets silence rather than a refused connection.
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

/// Per-trial times of one failover scenario.
struct Failovers {
    /// Until the survivor that is not written through reports a new leader.
    leader_known: Vec<Duration>,
    /// Until a write sent through the other survivor succeeds.
    write_ok: Vec<Duration>,
    /// Trials whose new leader's term is the old one plus one.
    single_election: usize,
    /// Trials in which bringing the old leader back changed leader or term.
    disturbed: usize,
}

impl Failovers {
    fn summary(&self) -> String {
        let mut known = self.leader_known.clone();
        let mut write = self.write_ok.clone();
        known.sort();
        write.sort();
        format!(
            "new leader known p50 {} ms, max {} ms; write ok p50 {} ms, p99 {} ms, max {} ms",
            ms(percentile(&known, 0.5)),
            ms(known[known.len() - 1]),
            ms(percentile(&write, 0.5)),
            ms(percentile(&write, 0.99)),
            ms(write[write.len() - 1])
        )
    }
}

/// Milliseconds, rounded.
fn ms(d: Duration) -> String {
    format!("{:.0}", d.as_secs_f64() * 1000.0)
}

/// Each trial takes the leader out with `fault`, then at once sends a write
/// through one survivor (retried if it fails) while polling the other
/// survivor's status until it names a new leader; both times count from the
/// fault. Then `repair` brings the old leader back (restart or heal), and it
/// must follow the new leader and catch up before the next trial.
fn failovers(
    c: &mut NsCluster,
    trials: u64,
    label: &str,
    mut fault: impl FnMut(&mut NsCluster, usize),
    mut repair: impl FnMut(&mut NsCluster, usize),
) -> Failovers {
    let mut out =
        Failovers { leader_known: Vec::new(), write_ok: Vec::new(), single_election: 0, disturbed: 0 };
    for n in 0..trials {
        let what = format!("{label} trial {n}");
        let (leader, term) = agreed(c, 10.0, &what);
        let survivors: Vec<usize> = (0..c.len()).filter(|i| *i != leader).collect();
        let (writer, watcher) = (survivors[0], survivors[1]);
        let start = Instant::now();
        fault(c, leader);
        let c2: &NsCluster = c;
        let (write_ok, leader_known) = std::thread::scope(|s| {
            let write = s.spawn(|| {
                let mut attempt = 0;
                loop {
                    let out = c2.write(writer, &format!("{label}-{n}-{attempt}"));
                    if out.status.success() {
                        return start.elapsed();
                    }
                    assert!(
                        start.elapsed() < Duration::from_secs(30),
                        "{what}: no write succeeded through node {} within 30s of losing leader node {}: {}",
                        writer + 1,
                        leader + 1,
                        String::from_utf8_lossy(&out.stderr)
                    );
                    attempt += 1;
                }
            });
            let known = poll(30.0, || {
                let s = c2.status(watcher)?;
                s.leader.filter(|l| *l != leader as u64 + 1).map(|_| start.elapsed())
            })
            .unwrap_or_else(|| panic!("{what}: node {} named no new leader within 30s", watcher + 1));
            (write.join().expect("writer thread"), known)
        });
        let (new_leader, new_term) = poll(10.0, || c.agreed_among(survivors.iter().copied()))
            .unwrap_or_else(|| panic!("{what}: the survivors did not agree on a new leader"));
        eprintln!(
            "{what}: leader node {} term {term} -> node {} term {new_term}: known after {} ms, write ok after {} ms",
            leader + 1,
            new_leader + 1,
            ms(leader_known),
            ms(write_ok)
        );
        out.leader_known.push(leader_known);
        out.write_ok.push(write_ok);
        if new_term == term + 1 {
            out.single_election += 1;
        }
        repair(c, leader);
        caught_up(c, leader, new_leader, &what);
        let now = agreed(c, 15.0, &what);
        if now != (new_leader, new_term) {
            out.disturbed += 1;
            eprintln!(
                "{what}: bringing node {} back moved leader/term from ({}, {new_term}) to ({}, {})",
                leader + 1,
                new_leader + 1,
                now.0 + 1,
                now.1
            );
        }
    }
    out
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
    let killed = failovers(&mut c, trials, "kill", |c, l| c.kill(l), |c, l| c.start_node(l, false));
    println!("(a) kill -9 the leader: {} ({:.0?})", killed.summary(), t.elapsed());

    let t = Instant::now();
    let cut = failovers(&mut c, trials, "cut", |c, l| c.net.isolate(l), |c, l| c.net.heal(l));
    println!("(d) cut the leader off: {} ({:.0?})", cut.summary(), t.elapsed());

    let row = |label: &str, v: &mut Vec<Duration>| {
        v.sort();
        println!(
            "| {label} | {} | {} | {} | {} | {} |",
            ms(percentile(v, 0.50)),
            ms(percentile(v, 0.90)),
            ms(percentile(v, 0.99)),
            ms(v[0]),
            ms(v[v.len() - 1])
        );
    };
    let (mut killed, mut cut) = (killed, cut);
    println!();
    println!("| {trials} trials, ms after the fault | p50 | p90 | p99 | min | max |");
    println!("|---|---|---|---|---|---|");
    row("(a) leader `kill -9`: a survivor knows the new leader", &mut killed.leader_known);
    row("(a) leader `kill -9`: a write through a survivor succeeds", &mut killed.write_ok);
    row("(d) leader cut off: a survivor knows the new leader", &mut cut.leader_known);
    row("(d) leader cut off: a write through a survivor succeeds", &mut cut.write_ok);
    println!();
    println!("| {trials} trials | leader or term changed |");
    println!("|---|---|");
    println!("| (b) a follower cut off for {} ms, healed | {isolated} |", cut_len.as_millis());
    println!("| (c) a follower SIGSTOPped for {} ms, SIGCONT | {paused} |", cut_len.as_millis());
    println!(
        "(a) {}/{trials} and (d) {}/{trials} failovers took a single election; bringing the old leader back \
         changed leader or term in (a) {}/{trials}, (d) {}/{trials} trials",
        killed.single_election, cut.single_election, killed.disturbed, cut.disturbed
    );
    println!("total {:.0?}", began.elapsed());
}
