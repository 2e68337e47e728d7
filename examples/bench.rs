//! The tinyci benchmark: latency, recovery, capacity and footprint of the real binaries.
//!
//! Run with `cargo build --release --bins --examples && cargo run --release --example bench
//! -- [--quick] [--json FILE]`. It prints a markdown table (key | value | target | met?)
//! and, with `--json`, writes the same figures as one flat JSON object. `--quick` shrinks
//! the counts so the whole run takes well under a minute; every key is still produced.
//!
//! The latency, recovery and footprint figures drive the real dispatcher, test_runner and
//! repo_observer (through the test harness, the `testkit` crate). The capacity figures drive
//! the real dispatcher with simulated runners and a simulated observer that speak the real
//! protocol from inside this process. It is a benchmark, not a test: it asserts nothing
//! about time; a missed target is reported, not fatal.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use anyhow::{anyhow, bail, Context, Result};
use testkit::*;
use tinyci::proto::{
    CommitId, Connection, FromDispatcher, Role, RunReport, RunStatus, ToDispatcher,
};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

/// How many of everything one run does.
#[derive(Debug, Clone, Copy)]
struct Counts {
    /// Measured commits on the fixture repo (detect + overhead).
    fixture_commits: usize,
    /// Measured commits on the generated repo.
    large_commits: usize,
    /// Files in the generated repo.
    large_files: usize,
    /// Measured checkouts per repo in the checkout phase.
    checkout_commits: usize,
    /// Trials of each recovery kind.
    recovery_trials: usize,
    /// Finished runs in the database when the dispatcher's restart is timed.
    history_runs: usize,
    /// Timed restarts.
    restart_trials: usize,
    /// Simulated runners (capacity and idle CPU).
    sim_runners: usize,
    /// Commits pushed through the capacity run.
    capacity_commits: usize,
    /// Commits per `Submit` in the capacity run.
    submit_batch: usize,
    /// The idle-CPU window.
    idle_cpu_window: Duration,
}

impl Counts {
    fn full() -> Counts {
        Counts {
            fixture_commits: 20,
            large_commits: 20,
            large_files: 5000,
            checkout_commits: 200,
            recovery_trials: 5,
            history_runs: 100_000,
            restart_trials: 7,
            sim_runners: 100,
            capacity_commits: 20_000,
            submit_batch: 1000,
            idle_cpu_window: Duration::from_secs(10),
        }
    }

    fn quick() -> Counts {
        Counts {
            fixture_commits: 20,
            large_commits: 20,
            checkout_commits: 50,
            recovery_trials: 3,
            history_runs: 20_000,
            restart_trials: 3,
            capacity_commits: 5_000,
            idle_cpu_window: Duration::from_secs(2),
            ..Counts::full()
        }
    }
}

/// A target a figure should meet.
#[derive(Debug, Clone, Copy)]
enum Target {
    AtMost(f64),
    AtLeast(f64),
}

impl Target {
    fn met(self, v: f64) -> bool {
        match self {
            Target::AtMost(t) => v <= t,
            Target::AtLeast(t) => v >= t,
        }
    }

    fn show(self) -> String {
        match self {
            Target::AtMost(t) => format!("≤ {}", num(t)),
            Target::AtLeast(t) => format!("≥ {}", num(t)),
        }
    }
}

/// One figure of the report.
struct Row {
    key: &'static str,
    value: f64,
    integer: bool,
    target: Option<Target>,
}

/// Every figure, in report order, plus free-form notes printed under the table.
#[derive(Default)]
struct Report {
    rows: Vec<Row>,
    notes: Vec<String>,
}

impl Report {
    fn ms(&mut self, key: &'static str, value: f64, target: Option<Target>) {
        self.rows.push(Row {
            key,
            value: (value * 100.0).round() / 100.0,
            integer: false,
            target,
        });
    }

    fn int(&mut self, key: &'static str, value: u64, target: Option<Target>) {
        self.rows.push(Row {
            key,
            value: value as f64,
            integer: true,
            target,
        });
    }

    fn note(&mut self, s: impl Into<String>) {
        let s = s.into();
        eprintln!("  {s}");
        self.notes.push(s);
    }

    fn json(&self) -> serde_json::Value {
        let mut m = serde_json::Map::new();
        for r in &self.rows {
            let v = if r.integer {
                serde_json::Value::from(r.value as u64)
            } else {
                serde_json::Value::from(r.value)
            };
            m.insert(r.key.to_owned(), v);
        }
        serde_json::Value::Object(m)
    }
}

const USAGE: &str =
    "usage: bench [--quick] [--json FILE] [--only checkout|pipeline|recovery|capacity|idle]";

const PHASES: [&str; 5] = ["checkout", "pipeline", "recovery", "capacity", "idle"];

/// 15 MiB, the idle RSS target, in the kB (KiB) that /proc reports.
const IDLE_RSS_TARGET_KB: f64 = 15.0 * 1024.0;

const KEYS: [&str; 19] = [
    "checkout_small_p50_ms",
    "checkout_small_p99_ms",
    "checkout_large_p50_ms",
    "checkout_large_p99_ms",
    "detect_p50_ms",
    "overhead_fixture_p50_ms",
    "overhead_fixture_p95_ms",
    "overhead_large_p50_ms",
    "kill_recovery_p50_ms",
    "stop_recovery_p50_ms",
    "restart_ms",
    "db_bytes_per_1000_runs",
    "dispatch_jobs_per_s",
    "assign_p99_ms",
    "dispatcher_peak_rss_kb",
    "idle_rss_kb_dispatcher",
    "idle_rss_kb_runner",
    "idle_rss_kb_observer",
    "idle_cpu_pct_100_runners",
];

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let mut quick = false;
    let mut json: Option<PathBuf> = None;
    let mut only: Option<String> = None;
    let mut it = args.iter().skip(1);
    while let Some(a) = it.next() {
        match a.as_str() {
            "--quick" => quick = true,
            "--json" => {
                json = Some(
                    it.next()
                        .ok_or_else(|| anyhow!("--json needs a file name"))?
                        .into(),
                )
            }
            // For profiling one phase; the report then lacks the other phases' keys.
            "--only" => {
                let phase = it.next().ok_or_else(|| anyhow!("--only needs a phase"))?;
                if !PHASES.contains(&phase.as_str()) {
                    bail!("unknown phase {phase:?}; one of {PHASES:?}");
                }
                only = Some(phase.clone());
            }
            "-h" | "--help" => {
                println!("{USAGE}");
                return Ok(());
            }
            other => bail!("unknown argument {other:?}\n{USAGE}"),
        }
    }
    let counts = if quick {
        Counts::quick()
    } else {
        Counts::full()
    };
    let bins = Bins::beside_current_exe()?;
    let started = Instant::now();

    let machine = machine();
    let tmp_fs = fs_of(&std::env::temp_dir());
    let load_before = loadavg();
    eprintln!(
        "tinyci bench ({}) on {machine}",
        if quick { "quick" } else { "full" }
    );

    let mut report = Report::default();
    // Every temp dir is kept until the report is out. On a file system without a journal
    // (like this VM's ext4), creating a file right after tens of thousands were deleted is
    // slow (ext4 skips recently freed inodes one by one), which would charge one phase's
    // clean-up to the next phase's figures.
    let mut scratch: Vec<tempfile::TempDir> = Vec::new();
    report.note(format!(
        "file creation on {tmp_fs} before the run: {:.1} µs per new file (1000 files)",
        create_cost_us(&mut scratch)?
    ));
    let run = |phase: &str| only.as_deref().map_or(true, |o| o == phase);
    // Capacity first: it is the phase most sensitive to the file system's state.
    if run("capacity") {
        eprintln!("[1/4] capacity: simulated runners against the real dispatcher");
        capacity(&bins, counts, &mut report, &mut scratch)?;
    }
    if run("idle") {
        eprintln!("[2/4] idle CPU with simulated runners");
        idle_cpu(&bins, counts, &mut report, &mut scratch)?;
    }
    if run("checkout") {
        eprintln!("[0/4] the runner's checkout alone: fixture repo and 5,000 files");
        checkout(counts, &mut report, &mut scratch)?;
    }
    if run("pipeline") {
        eprintln!("[3/4] fixture and generated repo: detection, overhead, idle RSS");
        pipeline(&bins, counts, &mut report, &mut scratch)?;
    }
    if run("recovery") {
        eprintln!("[4/4] dispatcher restart over a long history; runner loss: kill -9 and SIGSTOP");
        restart(&bins, counts, &mut report, &mut scratch)?;
        recovery(&bins, counts, &mut report, &mut scratch)?;
    }
    let elapsed = started.elapsed();

    // Report in the key order.
    let order: HashMap<&str, usize> = KEYS.iter().enumerate().map(|(i, k)| (*k, i)).collect();
    report
        .rows
        .sort_by_key(|r| order.get(r.key).copied().unwrap_or(usize::MAX));

    println!("## tinyci benchmark\n");
    println!("- command: `{}`", args.join(" "));
    println!("- machine: {machine}");
    println!(
        "- temp dir: {} ({tmp_fs}); results, databases and repos live there",
        std::env::temp_dir().display()
    );
    println!(
        "- load average (1/5/15 min) at start: {load_before}; at end: {} (the machine is shared: other processes' load shows in every figure)",
        loadavg()
    );
    println!(
        "- mode: {}; took {:.1} s\n",
        if quick { "--quick" } else { "full" },
        elapsed.as_secs_f64()
    );
    println!("| key | value | target | met? |");
    println!("|---|---:|---|---|");
    for r in &report.rows {
        let (target, met) = match r.target {
            Some(t) => (t.show(), if t.met(r.value) { "yes" } else { "**no**" }),
            None => ("—".to_owned(), "—"),
        };
        let value = if r.integer {
            format!("{}", r.value as u64)
        } else {
            num(r.value)
        };
        println!("| `{}` | {value} | {target} | {met} |", r.key);
    }
    println!("\nHow each figure is measured:\n");
    for line in HOW {
        println!("- {line}");
    }
    if !report.notes.is_empty() {
        println!("\nDetails of this run:\n");
        for n in &report.notes {
            println!("- {n}");
        }
    }
    if let Some(path) = json {
        let text = serde_json::to_string_pretty(&report.json())?;
        std::fs::write(&path, text + "\n")
            .with_context(|| format!("writing {}", path.display()))?;
        println!("\nwrote {}", path.display());
    }
    drop(scratch);
    Ok(())
}

/// Microseconds to create one empty file in a fresh directory (an indicator of the file
/// system's state: the dispatcher creates two files per job).
fn create_cost_us(scratch: &mut Vec<tempfile::TempDir>) -> Result<f64> {
    let dir = tempfile::Builder::new().prefix("tinyci-bench-").tempdir()?;
    let n = 1000;
    let t = Instant::now();
    for i in 0..n {
        std::fs::File::create(dir.path().join(format!("f{i}")))?;
    }
    let us = t.elapsed().as_secs_f64() * 1e6 / n as f64;
    scratch.push(dir);
    Ok(us)
}

/// Stops a cluster's processes but keeps its files until the end of the run.
fn retire(mut c: Cluster, scratch: &mut Vec<tempfile::TempDir>) -> Result<()> {
    let tmp = std::mem::replace(&mut c.tmp, tempfile::tempdir()?);
    drop(c);
    scratch.push(tmp);
    Ok(())
}

const HOW: [&str; 17] = [
    "`checkout_small_*`/`checkout_large_*`: the runner's whole per-job checkout (`Workspace::prepare`: heal, fetch if missing, `git checkout --force --detach`, `git clean -ffdx`), called in process on a warm clone whose origin is a local directory, for commits that each change one file, after a fake step left an untracked file and a `__pycache__/`; small = the fixture repo, large = 5,000 files in nested dirs.",
    "`detect_p50_ms`: bench clock right after the master repo's branch moved (`git update-ref` returned, after `write-tree`/`commit-tree`) → timestamp of the dispatcher's `queued commit=<sha>` log line (observer `--poll-interval 100ms`).",
    "`overhead_fixture_p50_ms`/`_p95_ms`: dispatcher's `queued` log timestamp → the bench sees `<sha>.json` (polled every 1 ms), minus the sum of the result's `steps[].duration_ms`; fixture repo as is, one runner, commits one at a time after two warm-up jobs.",
    "`overhead_large_p50_ms`: the same on a generated repo of 5,000 files in nested dirs (step `true`), each commit changing 10 files.",
    "`kill_recovery_p50_ms`: bench clock just before `kill -9` of the runner whose step (`sleep 30`) is running → timestamp of the dispatcher's second `assigned commit=<sha>` line (the other runner).",
    "`stop_recovery_p50_ms`: the same with SIGSTOP, dispatcher `--heartbeat-interval 200ms --heartbeat-timeout 600ms`.",
    "`restart_ms`: median over restarts of a dispatcher whose database holds 100,000 finished runs (built beforehand through the store, in one transaction, each with two steps; `--quick`: 20,000): bench clock just before spawning it → timestamp of its `listening` line; each start is killed with `kill -9` before the next.",
    "`db_bytes_per_1000_runs`: size of `tinyci.db` after that history was written and the WAL checkpointed, ÷ runs × 1,000 (one attempt and two steps per run).",
    "`dispatch_jobs_per_s`: simulated commits ÷ (first `Submit` sent → last `ResultAck` received: every result durable in the dispatcher's database; the `<sha>.json` files follow from its writer thread, and the rate until the last of them exists is printed beside it); simulated runners answer each `Assign` with `Done` at once.",
    "`assign_p99_ms`: per `Assign`, from the moment the job became assignable — its `Submit` batch acknowledged and the receiving runner free (it had sent `Done` for its previous job) — to the runner receiving it; p99 over all jobs.",
    "`dispatcher_peak_rss_kb`: `VmHWM` of the capacity run's dispatcher (fresh process) after the run.",
    "`idle_rss_kb_*`: `VmRSS` of the real dispatcher, runner and observer after the first job and 1 s idle.",
    "`idle_cpu_pct_100_runners`: CPU time of a fresh dispatcher (all threads; its process CPU clock via `clock_getcpuclockid`, i.e. utime+stime at ns resolution) over the window ÷ wall time, % of one core, with 100 simulated runners registered and answering its 1 s pings.",
    "Percentiles are nearest-rank. All processes run on 127.0.0.1 on this machine; the bench's own simulated peers share the 2 cores with the dispatcher.",
    "Wall-clock differences between the bench and a dispatcher log line use the same machine clock (log lines carry UTC microsecond timestamps).",
    "Targets are the issue's; 15 MB is taken as 15 MiB = 15360 kB.",
    "Phases run in the order capacity, idle CPU, pipeline, recovery, and no temp dir is deleted before the report: on a file system without a journal, creating files soon after many were deleted is slow, so one phase's clean-up would tax the next. The capacity run is repeated with the results on tmpfs as a control (a note, not a key).",
];

// ---------------------------------------------------------------------------------------
// Small helpers.

fn num(v: f64) -> String {
    if v.fract() == 0.0 && v.abs() < 1e15 {
        format!("{}", v as i64)
    } else if v.abs() >= 100.0 {
        format!("{v:.0}")
    } else {
        format!("{v:.2}")
    }
}

/// Nearest-rank percentile of unsorted samples.
fn pct(samples: &[f64], p: f64) -> f64 {
    if samples.is_empty() {
        return f64::NAN;
    }
    let mut v = samples.to_vec();
    v.sort_by(|a, b| a.total_cmp(b));
    let rank = ((p / 100.0) * v.len() as f64).ceil().max(1.0) as usize;
    v[rank.min(v.len()) - 1]
}

fn summary(samples: &[f64]) -> String {
    format!(
        "n={} min={:.2} p50={:.2} p95={:.2} max={:.2}",
        samples.len(),
        pct(samples, 0.0),
        pct(samples, 50.0),
        pct(samples, 95.0),
        pct(samples, 100.0)
    )
}

/// `b - a` in milliseconds (negative if `b` is earlier).
fn ms_between(a: SystemTime, b: SystemTime) -> f64 {
    match b.duration_since(a) {
        Ok(d) => d.as_secs_f64() * 1000.0,
        Err(e) => -e.duration().as_secs_f64() * 1000.0,
    }
}

/// The timestamp at the start of a tracing line.
fn log_time(line: &str) -> Result<SystemTime> {
    let stamp = line
        .split_whitespace()
        .next()
        .ok_or_else(|| anyhow!("empty log line"))?;
    humantime::parse_rfc3339(stamp).with_context(|| format!("no timestamp in {line:?}"))
}

/// A field of `/proc/<pid>/status`, in kB.
fn proc_status_kb(pid: u32, field: &str) -> Result<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    text.lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .ok_or_else(|| anyhow!("no {field} in /proc/{pid}/status"))
}

/// utime + stime of a process from `/proc/<pid>/stat`, in seconds (clock-tick resolution).
fn cpu_seconds_ticks(pid: u32) -> Result<f64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    let rest = text
        .rsplit_once(')')
        .map(|(_, r)| r)
        .ok_or_else(|| anyhow!("odd /proc/{pid}/stat"))?;
    let f: Vec<&str> = rest.split_whitespace().collect();
    // Field 3 (state) is f[0]; utime is field 14, stime field 15.
    let ticks: u64 = f[11].parse::<u64>()? + f[12].parse::<u64>()?;
    // SAFETY: sysconf has no memory effects.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    Ok(ticks as f64 / hz)
}

/// The CPU time of a clock from `clock_getcpuclockid` (or a thread clock), in seconds.
fn cpu_clock(clock: libc::clockid_t) -> Option<f64> {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes into the timespec we own.
    let rc = unsafe { libc::clock_gettime(clock, &mut ts) };
    (rc == 0).then(|| ts.tv_sec as f64 + ts.tv_nsec as f64 / 1e9)
}

/// A process's CPU time (all threads) in seconds, nanosecond precision where the kernel
/// allows reading another process's CPU clock, else utime + stime in clock ticks.
fn cpu_seconds(pid: u32) -> Result<f64> {
    let mut clock: libc::clockid_t = 0;
    // SAFETY: clock_getcpuclockid writes into the clockid we own.
    if unsafe { libc::clock_getcpuclockid(pid as libc::pid_t, &mut clock) } == 0 {
        if let Some(s) = cpu_clock(clock) {
            return Ok(s);
        }
    }
    cpu_seconds_ticks(pid)
}

/// CPU seconds of each thread of `pid` (utime + stime, clock ticks; the kernel does not let
/// another process read a thread's CPU clock), by thread name (same names summed).
fn thread_cpu(pid: u32) -> HashMap<String, f64> {
    let mut out = HashMap::new();
    let Ok(rd) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return out;
    };
    // SAFETY: sysconf has no memory effects.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    for e in rd.flatten() {
        let Ok(stat) = std::fs::read_to_string(e.path().join("stat")) else {
            continue;
        };
        let Some((head, rest)) = stat.rsplit_once(')') else {
            continue;
        };
        let name = head.split_once('(').map_or("?", |(_, n)| n).to_owned();
        let f: Vec<&str> = rest.split_whitespace().collect();
        let ticks = f.get(11).and_then(|u| u.parse::<u64>().ok()).unwrap_or(0)
            + f.get(12).and_then(|u| u.parse::<u64>().ok()).unwrap_or(0);
        *out.entry(name).or_insert(0.0) += ticks as f64 / hz;
    }
    out
}

/// What each thread (by name) spent between two [`thread_cpu`] readings, as text.
fn thread_cpu_delta(
    before: &HashMap<String, f64>,
    after: &HashMap<String, f64>,
    wall: f64,
) -> String {
    let mut v: Vec<(String, f64)> = after
        .iter()
        .map(|(k, a)| (k.clone(), a - before.get(k).copied().unwrap_or(0.0)))
        .filter(|(_, d)| *d > 0.0005)
        .collect();
    v.sort_by(|a, b| b.1.total_cmp(&a.1));
    v.iter()
        .map(|(k, d)| format!("{k} {:.2} s ({:.0}% of wall)", d, d / wall * 100.0))
        .collect::<Vec<_>>()
        .join(", ")
}

fn machine() -> String {
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    let model = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|t| {
            t.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, m)| m.trim().to_owned())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let mem = proc_meminfo_total_mb().map_or(String::new(), |m| format!(", {m} MB RAM"));
    format!("{cores} cores (nproc), {model}{mem}")
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|t| t.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "?".into())
}

fn proc_meminfo_total_mb() -> Option<u64> {
    let t = std::fs::read_to_string("/proc/meminfo").ok()?;
    let kb: u64 = t
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()?;
    Some(kb / 1024)
}

/// The file system type of the mount holding `dir` (from /proc/self/mounts).
fn fs_of(dir: &Path) -> String {
    let dir = std::fs::canonicalize(dir).unwrap_or_else(|_| dir.to_owned());
    let Ok(mounts) = std::fs::read_to_string("/proc/self/mounts") else {
        return "unknown fs".into();
    };
    mounts
        .lines()
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            let (_dev, at, ty) = (f.next()?, f.next()?, f.next()?);
            dir.starts_with(at).then(|| (at.len(), ty.to_owned()))
        })
        .max_by_key(|(n, _)| *n)
        .map_or("unknown fs".into(), |(_, t)| t)
}

/// Writes `files` in `dir`, commits them, and returns the sha and the bench clock taken the
/// moment the branch moved. The commit is made with plumbing (`write-tree`, `commit-tree`,
/// `update-ref`) because `git commit` goes on after moving the branch (it rewrites the
/// index, may start maintenance), so its return comes measurably after the commit is
/// visible to the observer; `update-ref` exits right after the ref file is renamed.
fn commit_files(
    dir: &Path,
    message: &str,
    files: &[(String, String)],
) -> Result<(String, SystemTime)> {
    for (path, body) in files {
        let p = dir.join(path);
        if let Some(parent) = p.parent() {
            std::fs::create_dir_all(parent)?;
        }
        std::fs::write(p, body)?;
    }
    git(dir, &["add", "-A"])?;
    let tree = git(dir, &["write-tree"])?;
    let parent = git(dir, &["rev-parse", "HEAD"])?;
    let sha = git(dir, &["commit-tree", &tree, "-p", &parent, "-m", message])?;
    git(dir, &["update-ref", "-m", message, "HEAD", &sha, &parent])?;
    Ok((sha, SystemTime::now()))
}

/// Polls for `path` every millisecond; returns the bench clock when it was first seen.
fn wait_file(path: &Path, within: Duration) -> Result<SystemTime> {
    let deadline = Instant::now() + within;
    loop {
        if path.exists() {
            return Ok(SystemTime::now());
        }
        if Instant::now() >= deadline {
            bail!("{} did not appear within {within:?}", path.display());
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}

fn read_json(path: &Path) -> Result<serde_json::Value> {
    let text = std::fs::read(path)?;
    serde_json::from_slice(&text).with_context(|| format!("parsing {}", path.display()))
}

fn steps_ms(result: &serde_json::Value) -> f64 {
    result["steps"]
        .as_array()
        .map(|a| a.iter().filter_map(|s| s["duration_ms"].as_f64()).sum())
        .unwrap_or(0.0)
}

// ---------------------------------------------------------------------------------------
// Phase 0: the runner's checkout alone.

fn checkout(
    counts: Counts,
    report: &mut Report,
    scratch: &mut Vec<tempfile::TempDir>,
) -> Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let cancel = CancellationToken::new();
    for (label, files) in [("small", 0), ("large", counts.large_files)] {
        let tmp = tempfile::Builder::new().prefix("tinyci-bench-").tempdir()?;
        let master = Master::from_fixture(&tmp.path().join("master"))?;
        let file_name =
            |n: usize| format!("src/m{:02}/s{}/f{:02}.txt", n / 100, (n / 10) % 10, n % 10);
        if files > 0 {
            let all: Vec<(String, String)> = (0..files)
                .map(|n| (file_name(n), format!("file {n}\nversion 0\n")))
                .collect();
            commit_files(&master.dir, "bench: generated files", &all)?;
        }
        git(tmp.path(), &["clone", "-q", "master", "runner"])?;
        let runner = tmp.path().join("runner");
        let mut ws = tinyci::git::Workspace::open(&runner, Default::default())?;
        let mut ms = Vec::new();
        let mut phases: Vec<(&str, Vec<f64>)> = Vec::new();
        for i in 0..counts.checkout_commits + 2 {
            let body = format!("changed by commit {i}\n");
            let (sha, _) = commit_files(
                &master.dir,
                "bench: one file",
                &[(file_name(i % 1000), body)],
            )?;
            let sha = tinyci::proto::CommitId::parse(&sha)?;
            // What a step leaves: an untracked file and a cache directory.
            std::fs::write(runner.join("junk.txt"), "x")?;
            std::fs::create_dir_all(runner.join("__pycache__"))?;
            std::fs::write(runner.join("__pycache__/m.pyc"), "x")?;
            let t = Instant::now();
            let done = rt.block_on(ws.prepare(&sha, &cancel))?;
            if i >= 2 {
                ms.push(t.elapsed().as_secs_f64() * 1e3);
                for (phase, took) in done.phases {
                    match phases.iter_mut().find(|(p, _)| *p == phase) {
                        Some((_, v)) => v.push(took.as_secs_f64() * 1e3),
                        None => phases.push((phase, vec![took.as_secs_f64() * 1e3])),
                    }
                }
            }
        }
        let target = if files > 0 { 40.0 } else { 15.0 };
        let (p50, p99) = match label {
            "small" => ("checkout_small_p50_ms", "checkout_small_p99_ms"),
            _ => ("checkout_large_p50_ms", "checkout_large_p99_ms"),
        };
        report.ms(p50, pct(&ms, 50.0), Some(Target::AtMost(target)));
        report.ms(p99, pct(&ms, 99.0), None);
        report.note(format!("checkout {label} ms: {}", summary(&ms)));
        let by_phase: Vec<String> = phases
            .iter()
            .map(|(p, v)| format!("{p} {:.2}", pct(v, 50.0)))
            .collect();
        report.note(format!(
            "checkout {label} phases, p50 ms: {}",
            by_phase.join(", ")
        ));
        drop(ws);
        scratch.push(tmp);
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Phase 1: the real pipeline on the fixture repo and on a generated repo.

struct Sample {
    detect_ms: f64,
    overhead_ms: f64,
    steps_ms: f64,
    /// The overhead cut at the log lines of the dispatcher and the runner (see [`SEGMENTS`]).
    segments: Option<[f64; 5]>,
    /// The runner's own note of its checkout time (in the commit's log).
    checkout_ms: Option<f64>,
}

/// Where the overhead goes, by log line; the last includes the bench's 1 ms polling.
const SEGMENTS: [&str; 5] = [
    "dispatcher queued→assigned",
    "dispatcher assigned→runner `running`",
    "runner `running`→`job finished` minus steps (checkout, spec, process start/drain)",
    "runner `job finished`→dispatcher `result recorded` line",
    "dispatcher `result recorded` line→json seen (write_result: fsync, rename, dir fsync)",
];

/// The overhead segments of one commit, from the logs.
fn segments(
    c: &Cluster,
    sha: &str,
    queued: SystemTime,
    seen: SystemTime,
    steps: f64,
) -> Option<[f64; 5]> {
    let find = |p: &Proc, what: &str| {
        p.wait_for(&[&format!("{what} commit={sha}")], Duration::from_secs(1))
            .ok()
            .and_then(|l| log_time(&l).ok())
    };
    let d = c.dispatcher();
    let r = &c.runners[0];
    let assigned = find(d, "assigned")?;
    let running = find(r, "running")?;
    let finished = find(r, "job finished")?;
    let written = find(d, "result recorded")?;
    Some([
        ms_between(queued, assigned),
        ms_between(assigned, running),
        ms_between(running, finished) - steps,
        ms_between(finished, written),
        ms_between(written, seen),
    ])
}

fn segment_notes(what: &str, samples: &[Sample], report: &mut Report) {
    let segs: Vec<[f64; 5]> = samples.iter().filter_map(|s| s.segments).collect();
    if segs.is_empty() {
        return;
    }
    let parts: Vec<String> = SEGMENTS
        .iter()
        .enumerate()
        .map(|(i, name)| {
            let v: Vec<f64> = segs.iter().map(|s| s[i]).collect();
            format!("{name}: p50 {:.2}", pct(&v, 50.0))
        })
        .collect();
    report.note(format!(
        "{what} overhead by log line, ms: {}",
        parts.join("; ")
    ));
}

/// Makes one commit with `files`, waits for its result, and measures it.
fn one_commit(c: &Cluster, message: &str, files: &[(String, String)]) -> Result<Sample> {
    let (sha, committed) = commit_files(&c.master.dir, message, files)?;
    let seen = wait_file(&c.json_path(&sha), WAIT).with_context(|| {
        format!(
            "waiting for the result of {sha}\n--- dispatcher:\n{}\n--- runner:\n{}",
            c.dispatcher().log(),
            c.runners[0].log()
        )
    })?;
    let result = read_json(&c.json_path(&sha))?;
    if result["status"] != "success" {
        bail!("commit {sha} did not pass: {result}");
    }
    let queued = log_time(
        &c.dispatcher()
            .wait_for(&[&format!("queued commit={sha}")], WAIT)?,
    )?;
    let steps = steps_ms(&result);
    Ok(Sample {
        detect_ms: ms_between(committed, queued),
        overhead_ms: ms_between(queued, seen) - steps,
        steps_ms: steps,
        segments: segments(c, &sha, queued, seen, steps),
        checkout_ms: c.log_text(&sha).lines().find_map(|l| {
            let rest = l.strip_prefix("[tinyci] checked out ")?;
            let (_, after) = rest.split_once(" in ")?;
            after.split_whitespace().next()?.parse::<f64>().ok()
        }),
    })
}

fn pipeline(
    bins: &Bins,
    counts: Counts,
    report: &mut Report,
    scratch: &mut Vec<tempfile::TempDir>,
) -> Result<()> {
    let c = Cluster::start(
        bins.clone(),
        Opts {
            runners: 1,
            observer: true,
            poll_interval: "100ms",
            heartbeat_interval: "1s",
            heartbeat_timeout: "3s",
            ..Opts::default()
        },
    )?;
    // The observer reports the fixture's initial commit on its first start: the first job.
    let tip = c.master.head()?;
    c.wait_result(&tip, WAIT)?;
    std::thread::sleep(Duration::from_secs(1));
    let observer_pid = c.observer.as_ref().map(Proc::pid).unwrap_or(0);
    for (key, pid) in [
        ("idle_rss_kb_dispatcher", c.dispatcher().pid()),
        ("idle_rss_kb_runner", c.runners[0].pid()),
        ("idle_rss_kb_observer", observer_pid),
    ] {
        let rss = proc_status_kb(pid, "VmRSS")?;
        report.int(key, rss, Some(Target::AtMost(IDLE_RSS_TARGET_KB)));
    }

    // Fixture repo, as it is (two python steps). One more warm-up job, then the samples.
    let notes = |i: usize| vec![("NOTES.md".to_owned(), format!("bench commit {i}\n"))];
    one_commit(&c, "bench warm-up", &notes(0))?;
    let mut fixture = Vec::new();
    for i in 1..=counts.fixture_commits {
        fixture.push(one_commit(&c, &format!("bench {i}"), &notes(i))?);
    }
    let detect: Vec<f64> = fixture.iter().map(|s| s.detect_ms).collect();
    let over: Vec<f64> = fixture.iter().map(|s| s.overhead_ms).collect();
    let steps: Vec<f64> = fixture.iter().map(|s| s.steps_ms).collect();
    report.ms("detect_p50_ms", pct(&detect, 50.0), None);
    report.ms(
        "overhead_fixture_p50_ms",
        pct(&over, 50.0),
        Some(Target::AtMost(15.0)),
    );
    report.ms("overhead_fixture_p95_ms", pct(&over, 95.0), None);
    report.note(format!("fixture detect ms: {}", summary(&detect)));
    report.note(format!("fixture overhead ms: {}", summary(&over)));
    report.note(format!(
        "fixture steps' own ms (subtracted): {}",
        summary(&steps)
    ));
    segment_notes("fixture", &fixture, report);
    let checkout: Vec<f64> = fixture.iter().filter_map(|s| s.checkout_ms).collect();
    report.note(format!(
        "fixture: the runner's own `checked out … in N ms` note: {}",
        summary(&checkout)
    ));

    // A generated repo: replace the fixture with N files in nested dirs and a trivial step.
    let gen_started = Instant::now();
    let dir = c.master.dir.clone();
    git(&dir, &["rm", "-rq", "calc.py", "README.md", "tests"])?;
    let file_name = |n: usize| format!("src/m{:02}/s{}/f{:02}.txt", n / 100, (n / 10) % 10, n % 10);
    let mut files: Vec<(String, String)> = (0..counts.large_files)
        .map(|n| (file_name(n), format!("file {n}\nversion 0\n")))
        .collect();
    files.push((".tinyci.toml".into(), spec(&[("noop", "true", "30s")])));
    let (big, _) = commit_files(&dir, "bench: generated repo", &files)?;
    wait_file(&c.json_path(&big), WAIT)?;
    let tracked = git(&dir, &["ls-files"])?.lines().count();
    report.note(format!(
        "generated repo: {tracked} tracked files, made and first checked out in {:.1} s",
        gen_started.elapsed().as_secs_f64()
    ));
    let changes = |i: usize| -> Vec<(String, String)> {
        (0..10)
            .map(|k| {
                let n = (k * counts.large_files / 10 + i) % counts.large_files;
                (file_name(n), format!("file {n}\nversion {i}\n"))
            })
            .collect()
    };
    one_commit(&c, "bench large warm-up", &changes(1))?;
    let mut large = Vec::new();
    for i in 2..2 + counts.large_commits {
        large.push(one_commit(&c, &format!("bench large {i}"), &changes(i))?);
    }
    let over: Vec<f64> = large.iter().map(|s| s.overhead_ms).collect();
    report.ms(
        "overhead_large_p50_ms",
        pct(&over, 50.0),
        Some(Target::AtMost(40.0)),
    );
    report.note(format!("large overhead ms: {}", summary(&over)));
    segment_notes("large", &large, report);
    let detect: Vec<f64> = large.iter().map(|s| s.detect_ms).collect();
    report.note(format!("large detect ms (not a key): {}", summary(&detect)));
    // Where the time goes inside the runner: its own checkout note.
    let checkout: Vec<f64> = large.iter().filter_map(|s| s.checkout_ms).collect();
    report.note(format!(
        "large: the runner's own `checked out … in N ms` note: {}",
        summary(&checkout)
    ));
    retire(c, scratch)
}

// ---------------------------------------------------------------------------------------
// Phase 2: a busy runner lost to kill -9 or SIGSTOP.

fn recovery(
    bins: &Bins,
    counts: Counts,
    report: &mut Report,
    scratch: &mut Vec<tempfile::TempDir>,
) -> Result<()> {
    let mut c = Cluster::start(
        bins.clone(),
        Opts {
            runners: 2,
            observer: true,
            poll_interval: "100ms",
            heartbeat_interval: "200ms",
            heartbeat_timeout: "600ms",
            max_attempts: 3,
            ..Opts::default()
        },
    )?;
    let tip = c.master.head()?;
    c.wait_result(&tip, WAIT)?;
    let slow = spec(&[("slow", "sleep 30", "1m")]);
    let mut kill = Vec::new();
    let mut stop = Vec::new();
    for k in 0..counts.recovery_trials {
        kill.push(recovery_trial(&mut c, &slow, libc::SIGKILL, k)?);
    }
    for k in 0..counts.recovery_trials {
        stop.push(recovery_trial(&mut c, &slow, libc::SIGSTOP, k)?);
    }
    report.ms(
        "kill_recovery_p50_ms",
        pct(&kill, 50.0),
        Some(Target::AtMost(100.0)),
    );
    report.ms(
        "stop_recovery_p50_ms",
        pct(&stop, 50.0),
        Some(Target::AtMost(800.0)),
    );
    report.note(format!("kill -9 recovery ms: {}", summary(&kill)));
    report.note(format!(
        "SIGSTOP recovery ms (heartbeat 200ms/600ms): {}",
        summary(&stop)
    ));
    retire(c, scratch)
}

/// Times the dispatcher's start over a database with a long history of finished runs.
fn restart(
    bins: &Bins,
    counts: Counts,
    report: &mut Report,
    scratch: &mut Vec<tempfile::TempDir>,
) -> Result<()> {
    let tmp = tempfile::Builder::new().prefix("tinyci-bench-").tempdir()?;
    let results = tmp.path().join("test_results");
    tinyci::results::prepare_dir(&results)?;
    let n = counts.history_runs;
    let t = Instant::now();
    let db_bytes = build_history(&results, n)?;
    report.note(format!(
        "history for restart_ms: {n} finished runs written through the store in one transaction in {:.1} s",
        t.elapsed().as_secs_f64()
    ));
    let mut samples = Vec::new();
    for _ in 0..counts.restart_trials {
        let mut cmd = Command::new(&bins.dispatcher);
        cmd.args(["--host", "127.0.0.1", "--port", "0", "--results-dir"])
            .arg(&results)
            .env_remove("TINYCI_TOKEN");
        let t0 = SystemTime::now();
        let mut p = Proc::spawn("dispatcher", cmd)?;
        let line = p.wait_for(&["listening", "addr="], WAIT)?;
        samples.push(ms_between(t0, log_time(&line)?));
        p.kill();
    }
    report.ms(
        "restart_ms",
        pct(&samples, 50.0),
        Some(Target::AtMost(200.0)),
    );
    report.note(format!(
        "restart ms with {n} finished runs in the database (spawn → `listening`): {}",
        summary(&samples)
    ));
    report.int(
        "db_bytes_per_1000_runs",
        db_bytes * 1000 / n.max(1) as u64,
        None,
    );
    report.note(format!(
        "database of {n} runs: {:.1} MiB after a checkpoint",
        db_bytes as f64 / (1024.0 * 1024.0)
    ));
    scratch.push(tmp);
    Ok(())
}

/// Writes `n` finished runs (one attempt, two steps each; every tenth a failure) into a
/// fresh database under `results` in one transaction, as a long-running dispatcher would
/// have left them (result files synced). Returns the database's size after a checkpoint.
fn build_history(results: &Path, n: usize) -> Result<u64> {
    use tinyci::dispatcher::state::Finished;
    use tinyci::dispatcher::store::sqlite::{db_path, SqliteStore};
    use tinyci::dispatcher::store::{AttemptEnd, Op, Store};
    use tinyci::proto::{JobId, StepReport, StepStatus};

    let mut store = SqliteStore::open(results)?;
    let start = SystemTime::now() - Duration::from_secs(30 * 24 * 3600);
    let mut commits = Vec::with_capacity(n);
    for i in 0..n {
        let commit = CommitId::parse(&format!("4157{:036x}", i as u128))?;
        let queued_at = start + Duration::from_millis(i as u64 * 20);
        let started_at = queued_at + Duration::from_millis(3);
        let job = JobId::new();
        let failed = i % 10 == 9;
        store.stage(Op::Queued {
            commit: commit.clone(),
            branch: Some("main".into()),
            at: queued_at,
        });
        store.stage(Op::Assigned {
            commit: commit.clone(),
            job,
            number: 1,
            runner: format!("127.0.0.1:{}", 8900 + i % 16),
            at: started_at,
        });
        store.stage(Op::Finished {
            last: Some((job, AttemptEnd::Reported)),
            run: Finished {
                commit: commit.clone(),
                status: if failed {
                    RunStatus::Failure
                } else {
                    RunStatus::Success
                },
                steps: vec![
                    StepReport {
                        name: "build".into(),
                        status: StepStatus::Success,
                        exit_code: Some(0),
                        duration_ms: 1200 + (i % 97) as u64,
                    },
                    StepReport {
                        name: "test".into(),
                        status: if failed {
                            StepStatus::Failure
                        } else {
                            StepStatus::Success
                        },
                        exit_code: Some(i32::from(failed)),
                        duration_ms: 5400 + (i % 89) as u64,
                    },
                ],
                runner: Some(format!("127.0.0.1:{}", 8900 + i % 16)),
                attempts: 1,
                queued_at,
                started_at: Some(started_at),
                finished_at: started_at + Duration::from_millis(6700),
                error: None,
            },
        });
        commits.push(commit);
    }
    store.stage(Op::FilesDurable { commits });
    store.commit()?;
    store
        .connection()
        .query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()))?;
    drop(store);
    Ok(std::fs::metadata(db_path(results))?.len())
}

/// One trial: a slow commit, its runner signalled mid-step, the time until the dispatcher
/// assigns it again. Then the signalled runner is replaced and the retry's step killed, so
/// the next trial starts with two idle runners.
fn recovery_trial(c: &mut Cluster, slow: &str, sig: i32, k: usize) -> Result<f64> {
    let files = vec![
        (".tinyci.toml".to_owned(), slow.to_owned()),
        ("trial.txt".to_owned(), format!("signal {sig} trial {k}\n")),
    ];
    let (sha, _) = commit_files(&c.master.dir, &format!("bench trial {sig}/{k}"), &files)?;
    let needle = format!("assigned commit={sha}");
    let first = c.dispatcher().wait_for(&[&needle], WAIT)?;
    let addr = field(&first, "addr").ok_or_else(|| anyhow!("no addr in {first:?}"))?;
    let idx = c
        .runner_index(&addr)
        .ok_or_else(|| anyhow!("assigned to unknown runner {addr}"))?;
    wait_until("the slow step to start", WAIT, || {
        !step_processes(&sha).is_empty()
    })?;
    let t0 = SystemTime::now();
    c.runners[idx].signal(sig);
    let second = c.dispatcher().wait_for_nth(&[&needle], 2, WAIT)?;
    let ms = ms_between(t0, log_time(&second)?);

    // Clean up: replace the signalled runner, end the retry's step (it fails), wait.
    c.runners[idx].signal(libc::SIGCONT);
    c.restart_runner(idx)?;
    let path = c.json_path(&sha);
    wait_until("the retried commit to finish", WAIT, || {
        for pid in step_processes(&sha) {
            // SAFETY: kill(2) on a step process of this bench's own commit.
            unsafe {
                libc::kill(pid, libc::SIGKILL);
            }
        }
        path.exists()
    })?;
    Ok(ms)
}

// ---------------------------------------------------------------------------------------
// Phases 3 and 4: the real dispatcher with simulated runners and observer.

/// A dispatcher of its own in a temp dir; returns it and its address.
fn lone_dispatcher(
    bins: &Bins,
    tmp: &Path,
    heartbeat: &str,
    timeout: &str,
) -> Result<(Proc, String)> {
    let mut cmd = Command::new(&bins.dispatcher);
    cmd.args(["--host", "127.0.0.1", "--port", "0", "--results-dir"])
        .arg(tmp.join("test_results"))
        .args([
            "--heartbeat-interval",
            heartbeat,
            "--heartbeat-timeout",
            timeout,
        ])
        .env_remove("TINYCI_TOKEN");
    let p = Proc::spawn("dispatcher", cmd)?;
    let line = p.wait_for(&["listening", "addr="], WAIT)?;
    let addr = field(&line, "addr").ok_or_else(|| anyhow!("no addr in {line:?}"))?;
    Ok((p, addr))
}

/// The n-th fabricated commit id (40 hex digits, the index in the last 16).
fn fake_commit(n: usize) -> CommitId {
    CommitId::parse(&format!("be4c0000{:016x}{:016x}", 0u64, n as u64)).expect("valid id")
}

fn fake_index(c: &CommitId) -> usize {
    usize::from_str_radix(&c.as_str()[24..], 16).unwrap_or(usize::MAX)
}

/// What one simulated runner saw.
#[derive(Default)]
struct SimLog {
    /// Per `Assign`: commit index, when it arrived, when this runner had become free.
    assigns: Vec<(usize, Instant, Option<Instant>)>,
    last_ack: Option<Instant>,
}

/// Shared by the simulated runners.
struct SimShared {
    registered: AtomicUsize,
    acked: AtomicUsize,
    stop: CancellationToken,
}

async fn connect(addr: &str, role: Role) -> Result<Connection<TcpStream>> {
    let stream = TcpStream::connect(addr).await?;
    stream.set_nodelay(true)?;
    let mut conn = Connection::new(stream);
    conn.client_handshake(role, "").await?;
    Ok(conn)
}

/// A runner that registers as `fake_addr`, answers pings, and finishes every job at once.
async fn sim_runner(
    dispatcher: String,
    fake_addr: String,
    shared: Arc<SimShared>,
) -> Result<SimLog> {
    let mut conn = connect(&dispatcher, Role::Runner).await?;
    conn.send(&ToDispatcher::Register {
        addr: fake_addr,
        held: None,
        paused: None,
    })
    .await?;
    match conn
        .recv_within::<FromDispatcher>(Duration::from_secs(10), "Registered")
        .await?
    {
        FromDispatcher::Registered { .. } => {}
        other => bail!("expected Registered, got {other:?}"),
    }
    shared.registered.fetch_add(1, Ordering::SeqCst);
    let mut log = SimLog::default();
    let mut free_since: Option<Instant> = None;
    loop {
        let msg = tokio::select! {
            _ = shared.stop.cancelled() => return Ok(log),
            msg = conn.recv::<FromDispatcher>() => msg?,
        };
        match msg {
            None => bail!("the dispatcher closed the connection"),
            Some(FromDispatcher::Ping { seq }) => conn.send(&ToDispatcher::Pong { seq }).await?,
            Some(FromDispatcher::Assign { job, commit }) => {
                let at = Instant::now();
                log.assigns.push((fake_index(&commit), at, free_since));
                conn.send(&ToDispatcher::Done {
                    job,
                    report: RunReport {
                        status: RunStatus::Success,
                        steps: Vec::new(),
                        error: None,
                    },
                    log_len: 0,
                })
                .await?;
                free_since = Some(Instant::now());
            }
            Some(FromDispatcher::ResultAck { .. }) => {
                log.last_ack = Some(Instant::now());
                shared.acked.fetch_add(1, Ordering::SeqCst);
            }
            Some(other) => bail!("unexpected {other:?}"),
        }
    }
}

/// Starts `n` simulated runners and waits until all are registered.
async fn start_sims(
    addr: &str,
    n: usize,
    shared: &Arc<SimShared>,
) -> Result<Vec<tokio::task::JoinHandle<Result<SimLog>>>> {
    let mut tasks = Vec::new();
    for i in 0..n {
        tasks.push(tokio::spawn(sim_runner(
            addr.to_owned(),
            format!("127.0.0.1:{}", 10_000 + i),
            shared.clone(),
        )));
    }
    let deadline = Instant::now() + WAIT;
    while shared.registered.load(Ordering::SeqCst) < n {
        if tasks.iter().any(|t| t.is_finished()) {
            break;
        }
        if Instant::now() >= deadline {
            bail!("simulated runners did not all register within {WAIT:?}");
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    if shared.registered.load(Ordering::SeqCst) < n {
        // One ended early: surface its error.
        for t in tasks {
            if t.is_finished() {
                t.await??;
            }
        }
        bail!("a simulated runner stopped before registering");
    }
    Ok(tasks)
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    // One thread: the simulated peers take at most one of the two cores.
    Ok(tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?)
}

/// What one capacity run measured.
struct Capacity {
    jobs_per_s: f64,
    assign_p99_ms: f64,
    peak_rss_kb: u64,
    notes: Vec<String>,
}

fn capacity(
    bins: &Bins,
    counts: Counts,
    report: &mut Report,
    scratch: &mut Vec<tempfile::TempDir>,
) -> Result<()> {
    let tmp = tempfile::Builder::new().prefix("tinyci-bench-").tempdir()?;
    let main = capacity_run(bins, counts, tmp.path())?;
    scratch.push(tmp);
    report.ms(
        "dispatch_jobs_per_s",
        main.jobs_per_s.round(),
        Some(Target::AtLeast(10_000.0)),
    );
    report.ms(
        "assign_p99_ms",
        main.assign_p99_ms,
        Some(Target::AtMost(5.0)),
    );
    report.int("dispatcher_peak_rss_kb", main.peak_rss_kb, None);
    for n in main.notes {
        report.note(n);
    }
    // A control run with the results on tmpfs separates the file system's share from the
    // dispatcher's own (not a key).
    let shm = Path::new("/dev/shm");
    if fs_of(shm) == "tmpfs" {
        let tmp = tempfile::Builder::new()
            .prefix("tinyci-bench-")
            .tempdir_in(shm)?;
        let control = capacity_run(bins, counts, tmp.path())?;
        drop(tmp); // tmpfs: deleting costs the next phase nothing
        report.note(format!(
            "control, same capacity run with the results dir on tmpfs (/dev/shm): {:.0} jobs/s, assign p99 {:.2} ms, peak RSS {} kB",
            control.jobs_per_s, control.assign_p99_ms, control.peak_rss_kb
        ));
        for n in control.notes {
            report.note(format!("control (tmpfs): {n}"));
        }
    }
    Ok(())
}

/// The real dispatcher (results under `dir`) with simulated runners and observer.
fn capacity_run(bins: &Bins, counts: Counts, dir: &Path) -> Result<Capacity> {
    let (dispatcher, addr) = lone_dispatcher(bins, dir, "1s", "3s")?;
    let pid = dispatcher.pid();
    let rt = runtime()?;
    let n = counts.capacity_commits;
    let out = rt.block_on(async {
        let shared = Arc::new(SimShared {
            registered: AtomicUsize::new(0),
            acked: AtomicUsize::new(0),
            stop: CancellationToken::new(),
        });
        let tasks = start_sims(&addr, counts.sim_runners, &shared).await?;
        let mut obs = connect(&addr, Role::Observer).await?;
        let commits: Vec<CommitId> = (0..n).map(fake_commit).collect();
        let mut batches: Vec<(Instant, Instant)> = Vec::new();
        let threads_before = thread_cpu(pid);
        let own_before = cpu_clock(libc::CLOCK_PROCESS_CPUTIME_ID).unwrap_or(0.0);
        let first_sent = Instant::now();
        for chunk in commits.chunks(counts.submit_batch) {
            let sent = Instant::now();
            obs.send(&ToDispatcher::Submit {
                commits: chunk.to_vec(),
                branch: None,
                front: false,
                rerun: false,
            })
            .await?;
            match obs
                .recv_within::<FromDispatcher>(Duration::from_secs(60), "Submitted")
                .await?
            {
                FromDispatcher::Submitted { queued, .. } if queued as usize == chunk.len() => {}
                other => bail!("unexpected answer to Submit: {other:?}"),
            }
            batches.push((sent, Instant::now()));
        }
        let all_acked = Instant::now();
        let deadline = Instant::now() + Duration::from_secs(600);
        let mut last_progress = Instant::now();
        while shared.acked.load(Ordering::SeqCst) < n {
            if Instant::now() >= deadline {
                bail!(
                    "only {} of {n} results after 600 s",
                    shared.acked.load(Ordering::SeqCst)
                );
            }
            if tasks.iter().any(|t| t.is_finished()) {
                bail!("a simulated runner stopped during the run");
            }
            if last_progress.elapsed() > Duration::from_secs(5) {
                eprintln!(
                    "  … {} of {n} jobs done",
                    shared.acked.load(Ordering::SeqCst)
                );
                last_progress = Instant::now();
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        let hwm = proc_status_kb(pid, "VmHWM")?;
        let wall = first_sent.elapsed().as_secs_f64();
        let own = cpu_clock(libc::CLOCK_PROCESS_CPUTIME_ID).unwrap_or(0.0) - own_before;
        let threads = format!(
            "{}; the bench itself (simulated peers, log readers) {:.2} s ({:.0}% of wall)",
            thread_cpu_delta(&threads_before, &thread_cpu(pid), wall),
            own,
            own / wall * 100.0
        );
        shared.stop.cancel();
        let mut logs = Vec::new();
        for t in tasks {
            logs.push(t.await??);
        }
        Ok::<_, anyhow::Error>((first_sent, all_acked, batches, logs, hwm, threads))
    })?;
    let (first_sent, all_acked, batches, logs, hwm, threads) = out;

    let last_ack = logs
        .iter()
        .filter_map(|l| l.last_ack)
        .max()
        .ok_or_else(|| anyhow!("no results at all"))?;
    let last_assign = logs
        .iter()
        .flat_map(|l| l.assigns.iter().map(|a| a.1))
        .max()
        .ok_or_else(|| anyhow!("no assignments at all"))?;
    let total = (last_ack - first_sent).as_secs_f64();
    let mut ready_lat = Vec::with_capacity(n);
    let mut queue_lat = Vec::with_capacity(n);
    let mut per_runner = Vec::new();
    for l in &logs {
        per_runner.push(l.assigns.len() as f64);
        for &(idx, at, free_since) in &l.assigns {
            let Some(&(_, acked)) = batches.get(idx / counts.submit_batch) else {
                bail!("assignment of unknown commit #{idx}");
            };
            let ready = free_since.map_or(acked, |f| f.max(acked));
            ready_lat.push(at.saturating_duration_since(ready).as_secs_f64() * 1000.0);
            queue_lat.push(at.saturating_duration_since(acked).as_secs_f64() * 1000.0);
        }
    }
    if ready_lat.len() != n {
        bail!("{} assignments for {n} commits", ready_lat.len());
    }
    let count_files = || -> Result<usize> {
        Ok(std::fs::read_dir(dir.join("test_results"))?
            .filter_map(|e| e.ok())
            .filter(|e| e.file_name().to_string_lossy().ends_with(".json"))
            .count())
    };
    let files = count_files()?;
    // A ResultAck means the result is durable (in the dispatcher's database); its
    // <sha>.json is written right after by the dispatcher's result-writer thread. Wait
    // for every file too, and report that rate beside the key.
    let files_deadline = Instant::now() + Duration::from_secs(300);
    while count_files()? < n {
        if Instant::now() > files_deadline {
            let problems: Vec<String> = dispatcher
                .log()
                .lines()
                .filter(|l| l.contains("ERROR") || l.contains("WARN"))
                .take(5)
                .map(str::to_owned)
                .collect();
            bail!(
                "only {} of {n} result files after 300 s; dispatcher said: {problems:?}",
                count_files()?
            );
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    let files_total = first_sent.elapsed().as_secs_f64();
    drop(dispatcher);
    let state = dir.join("test_results").join(".tinyci");
    let size = |name: &str| std::fs::metadata(state.join(name)).map_or(0, |m| m.len());
    let (db_bytes, wal_bytes) = (size("tinyci.db"), size("tinyci.db-wal"));
    let ack_ms: Vec<f64> = batches
        .iter()
        .map(|(s, a)| (*a - *s).as_secs_f64() * 1000.0)
        .collect();
    let notes = vec![
        format!(
            "capacity: {n} commits, {} simulated runners, Submit batches of {}: all submitted+acked in {:.2} s, last Assign at {:.2} s, last ResultAck at {:.2} s; {files} result files on disk",
            counts.sim_runners,
            counts.submit_batch,
            (all_acked - first_sent).as_secs_f64(),
            (last_assign - first_sent).as_secs_f64(),
            total
        ),
        format!(
            "assignable→Assign latency ms (the key): {}; p99={:.2}",
            summary(&ready_lat),
            pct(&ready_lat, 99.0)
        ),
        format!(
            "batch-ack→Assign latency ms (includes waiting in the queue behind earlier commits): {}; p99={:.2}",
            summary(&queue_lat),
            pct(&queue_lat, 99.0)
        ),
        format!("Submit→Submitted ms per batch: {}", summary(&ack_ms)),
        format!(
            "every <sha>.json on disk at {files_total:.2} s: {:.0} jobs/s counting until the last result file exists (the key counts until the last ResultAck, when each result is durable in the database)",
            n as f64 / files_total
        ),
        format!("jobs per simulated runner: {}", summary(&per_runner)),
        format!(
            "database after the run: tinyci.db {:.1} MiB + WAL {:.1} MiB ({:.0} bytes per run, no steps)",
            db_bytes as f64 / 1048576.0,
            wal_bytes as f64 / 1048576.0,
            (db_bytes + wal_bytes) as f64 / n as f64
        ),
        format!("dispatcher CPU by thread during the run: {threads}"),
    ];
    Ok(Capacity {
        jobs_per_s: n as f64 / total,
        assign_p99_ms: pct(&ready_lat, 99.0),
        peak_rss_kb: hwm,
        notes,
    })
}

fn idle_cpu(
    bins: &Bins,
    counts: Counts,
    report: &mut Report,
    scratch: &mut Vec<tempfile::TempDir>,
) -> Result<()> {
    let tmp = tempfile::Builder::new().prefix("tinyci-bench-").tempdir()?;
    let (dispatcher, addr) = lone_dispatcher(bins, tmp.path(), "1s", "3s")?;
    let pid = dispatcher.pid();
    let rt = runtime()?;
    let (pct_cpu, pct_ticks, rss) = rt.block_on(async {
        let shared = Arc::new(SimShared {
            registered: AtomicUsize::new(0),
            acked: AtomicUsize::new(0),
            stop: CancellationToken::new(),
        });
        let tasks = start_sims(&addr, counts.sim_runners, &shared).await?;
        // Let the registration burst pass.
        tokio::time::sleep(Duration::from_millis(1500)).await;
        let (c0, k0, t0) = (cpu_seconds(pid)?, cpu_seconds_ticks(pid)?, Instant::now());
        tokio::time::sleep(counts.idle_cpu_window).await;
        let (c1, k1, t1) = (cpu_seconds(pid)?, cpu_seconds_ticks(pid)?, Instant::now());
        let wall = (t1 - t0).as_secs_f64();
        let rss = proc_status_kb(pid, "VmRSS")?;
        if tasks.iter().any(|t| t.is_finished()) {
            bail!("a simulated runner stopped during the idle window");
        }
        shared.stop.cancel();
        for t in tasks {
            t.await??;
        }
        Ok::<_, anyhow::Error>(((c1 - c0) / wall * 100.0, (k1 - k0) / wall * 100.0, rss))
    })?;
    report.ms(
        "idle_cpu_pct_100_runners",
        pct_cpu,
        Some(Target::AtMost(2.0)),
    );
    report.note(format!(
        "idle CPU window {:?} with {} simulated runners: {pct_cpu:.3}% from the process CPU clock (ns), {pct_ticks:.2}% from utime+stime (clock ticks); dispatcher VmRSS then {rss} kB",
        counts.idle_cpu_window, counts.sim_runners
    ));
    drop(dispatcher);
    scratch.push(tmp);
    Ok(())
}
