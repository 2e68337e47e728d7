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

mod capacity;
mod checkout;
mod hook;
mod idle;
mod pipeline;
mod recovery;

use capacity::*;
use checkout::*;
use hook::*;
use idle::*;
use pipeline::*;
use recovery::*;

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
    "usage: bench [--quick] [--json FILE] [--only checkout|pipeline|recovery|capacity|idle|hook]";

const PHASES: [&str; 6] = [
    "checkout", "pipeline", "recovery", "capacity", "idle", "hook",
];

/// 15 MiB, the idle RSS target, in the kB (KiB) that /proc reports.
const IDLE_RSS_TARGET_KB: f64 = 15.0 * 1024.0;

const KEYS: [&str; 21] = [
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
    "hook_commit_to_result_ms",
    "poll_commit_to_result_ms",
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
    if run("hook") {
        eprintln!("[5/5] a local commit through the hook's nudge, and through the poll alone");
        hook(&bins, counts, &mut report, &mut scratch)?;
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

const HOW: [&str; 18] = [
    "`hook_commit_to_result_ms`: a local commit (plumbing, as for `detect`) in a non-bare master with `tinyci hook install`, one trivial step (`true`), observer `--poll-interval 1s`: bench clock when the branch moved → `<sha>.json` seen; the target is the steps' own time + 30 ms. `poll_commit_to_result_ms`: the same with the `reference-transaction` hook removed (the poll alone); commits are spread over the poll's phase.",
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
