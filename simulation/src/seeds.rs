//! Seeds, one isolated simulation per seed, and replay instructions.
use std::future::Future;
use std::path::PathBuf;
use std::time::Duration;

use madsim::runtime::Runtime;

use crate::cluster::{SimCluster, SimConfig};
use crate::model::Trace;

/// Virtual-time budget of one run. A run that has not finished by then is
/// stuck (no leader, a wait that never ends); madsim aborts it with a panic.
const TIME_LIMIT: Duration = Duration::from_secs(30 * 60);

/// The seeds to run: `BLIXARD_SIM_SEED=S` runs exactly S,
/// `BLIXARD_SIM_SEEDS=N` runs 1..=N, otherwise 1..=`default_count`.
pub fn seeds(default_count: u64) -> Vec<u64> {
    if let Ok(s) = std::env::var("BLIXARD_SIM_SEED") {
        let seed = s.trim().parse().unwrap_or_else(|_| panic!("BLIXARD_SIM_SEED={s:?} is not a u64"));
        return vec![seed];
    }
    let count = match std::env::var("BLIXARD_SIM_SEEDS") {
        Ok(s) => s.trim().parse().unwrap_or_else(|_| panic!("BLIXARD_SIM_SEEDS={s:?} is not a u64")),
        Err(_) => default_count,
    };
    (1..=count).collect()
}

/// The command that reruns exactly one seed of `test`.
pub fn replay_command(test: &str, seed: u64) -> String {
    format!(
        "BLIXARD_SIM_SEED={seed} RUSTFLAGS=\"--cfg madsim\" CARGO_TARGET_DIR=target/madsim \
         cargo test -p blixard-simulation --release -- {test} --exact --include-ignored --nocapture"
    )
}

/// Runs `scenario` on a fresh simulated cluster under `seed` and returns its
/// trace, or the panic message of whatever failed.
///
/// Each run gets its own OS thread: madsim seeds std's `HashMap` randomness
/// only for the first runtime of a thread, so a second run on a reused thread
/// could iterate maps differently. Data dirs are real temp dirs created here,
/// outside the simulation (creating them inside would draw from the seeded
/// RNG and shift the run), and they outlive kills and restarts of the nodes.
pub fn simulate<F, Fut>(seed: u64, config: SimConfig, scenario: F) -> Result<Trace, String>
where
    F: FnOnce(SimCluster) -> Fut + Send + 'static,
    Fut: Future<Output = Trace> + 'static,
{
    let base = if std::path::Path::new("/dev/shm").is_dir() {
        // tmpfs: redb's fsyncs are free, which keeps the suite fast.
        PathBuf::from("/dev/shm")
    } else {
        std::env::temp_dir()
    };
    let dirs: Vec<tempfile::TempDir> = (1..=config.nodes + config.spare_nodes)
        .map(|id| {
            tempfile::Builder::new()
                .prefix(&format!("blixard-sim-s{seed}-n{id}-"))
                .tempdir_in(&base)
                .expect("create a temp data dir")
        })
        .collect();
    let paths: Vec<PathBuf> = dirs.iter().map(|d| d.path().to_path_buf()).collect();
    let run = std::thread::Builder::new()
        .name(format!("sim-seed-{seed}"))
        .spawn(move || {
            let mut rt = Runtime::with_seed_and_config(seed, madsim::Config::default());
            rt.set_time_limit(TIME_LIMIT);
            rt.block_on(async move {
                let cluster = SimCluster::start(config, paths).await;
                scenario(cluster).await
            })
        })
        .expect("spawn a simulation thread")
        .join();
    drop(dirs);
    run.map_err(|panic| {
        panic
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_else(|| "non-string panic".to_string())
    })
}

/// Set in the environment of a child process that runs one seed.
const CHILD_ENV: &str = "BLIXARD_SIM_CHILD";
/// Prefixes of the lines a child reports its result with on stdout.
const EVENT: &str = "BLIXARD-SIM-EVENT ";
const DIGEST: &str = "BLIXARD-SIM-DIGEST ";
const FAILURE: &str = "BLIXARD-SIM-FAILURE ";
const FIGURE: &str = "BLIXARD-SIM-FIGURE ";

/// What a child process reported for one seed.
#[derive(Debug)]
pub struct SeedReport {
    pub events: Vec<String>,
    pub final_digest: Option<u64>,
    /// The run's measurements ([`Trace::figure`]).
    pub figures: Vec<(String, f64)>,
}

impl SeedReport {
    pub fn figure(&self, name: &str) -> Option<f64> {
        self.figures.iter().find(|(n, _)| n == name).map(|(_, v)| *v)
    }
}

/// Max, p99 and median of one figure over the seeds that reported it, as
/// one line (`None` if no seed did).
pub fn summarize(name: &str, reports: &[(u64, SeedReport)]) -> Option<String> {
    let mut values: Vec<(f64, u64)> =
        reports.iter().filter_map(|(seed, r)| Some((r.figure(name)?, *seed))).collect();
    if values.is_empty() {
        return None;
    }
    values.sort_by(|a, b| a.0.total_cmp(&b.0));
    // Nearest rank.
    let rank = |p: f64| values[((p * values.len() as f64).ceil() as usize).clamp(1, values.len()) - 1].0;
    let (max, worst_seed) = values[values.len() - 1];
    Some(format!(
        "{name}: n={} median {} p99 {} max {max} (seed {worst_seed})",
        values.len(),
        rank(0.5),
        rank(0.99)
    ))
}

/// Runs the simulation test `test` for every selected seed, each seed in a
/// child process of this test binary; on failures, prints each failing seed
/// with the command that replays it, then fails the test.
///
/// Why a process per seed: tokio's `select!` draws its branch order from a
/// thread-local RNG whose seed mixes in a *process-global* counter (bumped by
/// every thread that initialises one, including concurrently running tests).
/// Two runs of one seed in one process can therefore poll branches in a
/// different order and diverge. A fresh process runs the identical code path
/// up to the simulation, so a seed behaves the same in the suite, in a rerun
/// and in a replay — which is what makes a printed seed worth anything.
///
/// Inside the child (`BLIXARD_SIM_CHILD` set) this runs `run` for the one
/// seed in `BLIXARD_SIM_SEED` and reports the trace on stdout (and returns
/// nothing). In the parent, returns every passing seed's report.
pub fn run_seeds(
    test: &str,
    default_count: u64,
    run: impl Fn(u64) -> Result<Trace, String>,
) -> Vec<(u64, SeedReport)> {
    if std::env::var_os(CHILD_ENV).is_some() {
        let seed = seeds(1)[0];
        match run(seed) {
            Ok(trace) => {
                for e in trace.events() {
                    println!("{EVENT}{e}");
                }
                for (name, value) in &trace.figures {
                    println!("{FIGURE}{name} {value}");
                }
                if let Some(d) = trace.final_digest {
                    println!("{DIGEST}{d:016x}");
                }
            }
            Err(msg) => {
                // One line; a literal "\n" in a message is rare enough to ignore.
                println!("\n{FAILURE}{}", msg.replace('\n', "\\n"));
                panic!("{test}: seed {seed} failed: {msg}");
            }
        }
        return Vec::new();
    }
    let seeds = seeds(default_count);
    let mut failed = Vec::new();
    let mut passed = Vec::new();
    for &seed in &seeds {
        match run_in_child(test, seed) {
            Ok(report) => {
                eprintln!(
                    "{test}: seed {seed} ok ({} events; {})",
                    report.events.len(),
                    report.events.last().map(|e| e.trim()).unwrap_or("no events")
                );
                passed.push((seed, report));
            }
            Err(msg) => {
                eprintln!("{test}: seed {seed} FAILED: {msg}\n  replay with: {}", replay_command(test, seed));
                failed.push((seed, msg));
            }
        }
    }
    if !failed.is_empty() {
        let lines: Vec<String> = failed
            .iter()
            .map(|(seed, msg)| {
                format!("  seed {seed}: {msg}\n    replay with: {}", replay_command(test, *seed))
            })
            .collect();
        panic!("{test}: {} of {} seeds failed:\n{}", failed.len(), seeds.len(), lines.join("\n"));
    }
    passed
}

/// Runs one seed of the test named `test` (a test calling [`run_seeds`]) in a
/// fresh child process and collects its trace. The child's own output is
/// passed through when it fails or when `BLIXARD_SIM_LOG` is set.
pub fn run_in_child(test: &str, seed: u64) -> Result<SeedReport, String> {
    let exe = std::env::current_exe().map_err(|e| format!("cannot find the test binary: {e}"))?;
    let out = std::process::Command::new(exe)
        .args([test, "--exact", "--nocapture", "--include-ignored", "--test-threads=1"])
        .env(CHILD_ENV, "1")
        .env("BLIXARD_SIM_SEED", seed.to_string())
        .env_remove("BLIXARD_SIM_SEEDS")
        .output()
        .map_err(|e| format!("cannot run the test binary: {e}"))?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let mut report = SeedReport { events: Vec::new(), final_digest: None, figures: Vec::new() };
    let mut failure = None;
    // A marker may follow other output on its line (libtest prints
    // "test NAME ... " without a newline before the test's own output).
    let after = |line: &str, marker: &str| line.find(marker).map(|i| line[i + marker.len()..].to_string());
    for line in stdout.lines() {
        if let Some(e) = after(line, EVENT) {
            report.events.push(e);
        } else if let Some(d) = after(line, DIGEST) {
            report.final_digest = u64::from_str_radix(d.trim(), 16).ok();
        } else if let Some(f) = after(line, FIGURE) {
            let (name, value) = f.rsplit_once(' ').unwrap_or((f.as_str(), ""));
            if let Ok(v) = value.trim().parse() {
                report.figures.push((name.to_string(), v));
            }
        } else if let Some(f) = after(line, FAILURE) {
            failure = Some(f.replace("\\n", "\n"));
        }
    }
    let ran = stdout.lines().any(|l| l.starts_with(&format!("test {test} ...")));
    let ok = out.status.success() && failure.is_none() && ran;
    if !ok || std::env::var_os("BLIXARD_SIM_LOG").is_some() {
        let shown: Vec<&str> = stdout.lines().filter(|l| !l.contains(EVENT)).collect();
        eprintln!("---- {test} seed {seed}: child output ----\n{}", shown.join("\n"));
        eprintln!("{}", String::from_utf8_lossy(&out.stderr));
    }
    if ok {
        return Ok(report);
    }
    Err(failure.unwrap_or_else(|| {
        if ran {
            format!("the child process failed ({})", out.status)
        } else {
            format!("the child process did not run test {test:?} ({})", out.status)
        }
    }))
}

/// Prints, per figure, its total over the seeds and how many seeds saw it,
/// and fails if one of `required` never happened, so that a random scenario
/// cannot silently stop exercising it. Only over the default seed set or a
/// wider one (a single seed or a short sweep need not see everything);
/// nothing in the child process of one seed (no reports).
pub fn require_figures(
    test: &str,
    default_count: u64,
    reports: &[(u64, SeedReport)],
    figures: &[&str],
    required: &[&str],
) {
    if reports.is_empty() {
        return;
    }
    let mut missing = Vec::new();
    for name in figures {
        let total: f64 = reports.iter().filter_map(|(_, r)| r.figure(name)).sum();
        let seeds = reports.iter().filter(|(_, r)| r.figure(name).is_some_and(|v| v > 0.0)).count();
        eprintln!("{test}: {name}: {total} over {} seeds, in {seeds} of them", reports.len());
        if total == 0.0 && required.contains(name) {
            missing.push(*name);
        }
    }
    let full_set = std::env::var_os("BLIXARD_SIM_SEED").is_none() && reports.len() as u64 >= default_count;
    if full_set {
        assert!(missing.is_empty(), "{test}: never exercised over {} seeds: {missing:?}", reports.len());
    }
}
