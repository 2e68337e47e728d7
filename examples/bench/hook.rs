//! Phase 5: a local commit in a master with tinyci's hooks → its result, against the same
//! with the poll alone (1 s).

use super::*;

/// Commits through the hook (nudged observer) and through the poll alone, each timed from
/// the moment the branch moved to the moment the result file appeared.
pub(crate) fn hook(
    bins: &Bins,
    counts: Counts,
    report: &mut Report,
    scratch: &mut Vec<tempfile::TempDir>,
) -> Result<()> {
    let mut c = Cluster::start(
        bins.clone(),
        Opts {
            runners: 1,
            observer: false,
            poll_interval: "1s",
            ..Opts::default()
        },
    )?;
    // The trivial test: one step that does nothing.
    let trivial = vec![(
        ".tinyci.toml".to_owned(),
        "[[steps]]\nname = \"test\"\nrun = \"true\"\n".to_owned(),
    )];
    commit_files(&c.master.dir, "trivial spec", &trivial)?;
    let out = std::process::Command::new(&c.bins.tinyci)
        .args(["--dispatcher-server", &c.addr, "hook", "install"])
        .arg(&c.master.dir)
        .output()?;
    if !out.status.success() {
        bail!(
            "tinyci hook install: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    c.start_observer()?;
    wait_file(&c.json_path(&c.master.head()?), WAIT)?;

    let measure = |label: &str, n: usize| -> Result<(Vec<f64>, Vec<f64>)> {
        let (mut total, mut steps) = (Vec::new(), Vec::new());
        for k in 0..n {
            let files = vec![(format!("hook_{label}_{k}"), k.to_string())];
            let (sha, moved) = commit_files(&c.master.dir, &format!("{label} {k}"), &files)?;
            let seen = wait_file(&c.json_path(&sha), WAIT)?;
            total.push(ms_between(moved, seen));
            steps.push(steps_ms(&read_json(&c.json_path(&sha))?));
            // Off the poll's phase: the next commit lands anywhere in the interval.
            std::thread::sleep(Duration::from_millis(37 * (k as u64 % 7)));
        }
        Ok((total, steps))
    };
    let (with_hook, hook_steps) = measure("hook", counts.fixture_commits)?;
    // The same without the nudge: the hook file removed, the poll alone finds commits.
    let hooks = c.master.dir.join(".git").join("hooks");
    std::fs::remove_file(hooks.join("reference-transaction"))?;
    let (with_poll, _) = measure("poll", counts.fixture_commits)?;
    let p50_steps = pct(&hook_steps, 50.0);
    let p50 = pct(&with_hook, 50.0);
    report.ms(
        "hook_commit_to_result_ms",
        p50,
        Some(Target::AtMost(p50_steps + 30.0)),
    );
    report.ms("poll_commit_to_result_ms", pct(&with_poll, 50.0), None);
    report.note(format!(
        "commit → result with the hook's nudge: {} ms; the test's own steps took {:.1} ms (p50), so the target is steps + 30 ms = {:.1}; with the 1 s poll alone: {} ms",
        summary(&with_hook),
        p50_steps,
        p50_steps + 30.0,
        summary(&with_poll)
    ));
    retire(c, scratch)
}
