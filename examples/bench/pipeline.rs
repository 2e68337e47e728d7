//! Phase 1: the real pipeline on the fixture repo and on a generated repo: detection,
//! overhead, idle RSS.

use super::*;

pub(crate) struct Sample {
    detect_ms: f64,
    overhead_ms: f64,
    steps_ms: f64,
    /// The overhead cut at the log lines of the dispatcher and the runner (see [`SEGMENTS`]).
    segments: Option<[f64; 5]>,
    /// The runner's own note of its checkout time (in the commit's log).
    checkout_ms: Option<f64>,
    /// The same note's phases (`heal 0.1, fetch 0.0, …`), in its order.
    checkout_phases: Vec<(String, f64)>,
}

/// Where the overhead goes, by log line; the last includes the bench's 1 ms polling.
pub(crate) const SEGMENTS: [&str; 5] = [
    "dispatcher queued→assigned",
    "dispatcher assigned→runner `running`",
    "runner `running`→`job finished` minus steps (checkout, spec, process start/drain)",
    "runner `job finished`→dispatcher `result recorded` line",
    "dispatcher `result recorded` line→json seen (write_result: fsync, rename, dir fsync)",
];

/// The overhead segments of one commit, from the logs.
pub(crate) fn segments(
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

pub(crate) fn segment_notes(what: &str, samples: &[Sample], report: &mut Report) {
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
pub(crate) fn one_commit(c: &Cluster, message: &str, files: &[(String, String)]) -> Result<Sample> {
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
    let log = c.log_text(&sha);
    Ok(Sample {
        detect_ms: ms_between(committed, queued),
        overhead_ms: ms_between(queued, seen) - steps,
        steps_ms: steps,
        segments: segments(c, &sha, queued, seen, steps),
        checkout_ms: checkout_note(&log)
            .and_then(|(ms, _)| ms.split_whitespace().next()?.parse().ok()),
        checkout_phases: checkout_note(&log).map_or_else(Vec::new, |(_, phases)| {
            phases
                .split(", ")
                .filter_map(|p| {
                    let (name, ms) = p.rsplit_once(' ')?;
                    Some((name.to_owned(), ms.parse().ok()?))
                })
                .collect()
        }),
    })
}

/// The runner's `checked out SHA in N ms (heal 0.1, …)` note in a job's log: what follows
/// " in ", and the phases inside the parentheses.
fn checkout_note(log: &str) -> Option<(&str, &str)> {
    let line = log
        .lines()
        .find_map(|l| l.strip_prefix("[tinyci] checked out "))?;
    let (_, after) = line.split_once(" in ")?;
    let phases = after
        .rsplit_once('(')
        .and_then(|(_, p)| p.strip_suffix(')'))
        .unwrap_or("");
    Some((after, phases))
}

/// The median of each checkout phase over `samples`, in the note's order.
fn phase_medians(samples: &[Sample]) -> String {
    let mut names: Vec<&str> = Vec::new();
    for s in samples {
        for (n, _) in &s.checkout_phases {
            if !names.contains(&n.as_str()) {
                names.push(n);
            }
        }
    }
    names
        .iter()
        .map(|n| {
            let v: Vec<f64> = samples
                .iter()
                .flat_map(|s| {
                    s.checkout_phases
                        .iter()
                        .filter(|(m, _)| m == n)
                        .map(|p| p.1)
                })
                .collect();
            format!("{n} {:.2}", pct(&v, 50.0))
        })
        .collect::<Vec<_>>()
        .join(", ")
}

pub(crate) fn pipeline(
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
        "fixture: the runner's own `checked out … in N ms` note: {}; its phases, p50 ms: {}",
        summary(&checkout),
        phase_medians(&fixture)
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
        "large: the runner's own `checked out … in N ms` note: {}; its phases, p50 ms: {}",
        summary(&checkout),
        phase_medians(&large)
    ));
    retire(c, scratch)
}
