//! Infrastructure faults against the real binaries (issue 9): none of them ever becomes a
//! commit's verdict. Broken clones, an origin that goes away for a while, graceful stops of
//! the dispatcher and of a runner, a black-holed connection, a second dispatcher on the
//! same results directory.

mod support;

use std::process::Command;

use anyhow::{ensure, Result};
use support::*;

fn bins() -> Bins {
    Bins::for_tests()
}

#[test]
fn second_dispatcher_on_the_same_results_dir_is_refused_naming_the_holder() -> Result<()> {
    let c = Cluster::start_ready(bins(), Opts::default())?;
    let mut cmd = Command::new(&c.bins.dispatcher);
    cmd.args(["--host", "127.0.0.1", "--port", "0", "--results-dir"])
        .arg(&c.results)
        .env_remove("TINYCI_TOKEN");
    let mut second = Proc::spawn("second dispatcher", cmd)?;
    let status = second
        .wait_exit(WAIT)
        .ok_or_else(|| anyhow::anyhow!("the second dispatcher kept running"))?;
    ensure!(!status.success(), "second dispatcher exited with {status}");
    let first_pid = c.dispatcher().pid();
    second.wait_for(
        &["in use by another dispatcher", &format!("pid {first_pid}")],
        WAIT,
    )?;
    ensure!(
        second.count(&["listening"]) == 0,
        "the second dispatcher must not serve: {}",
        second.log()
    );
    // The first one goes on.
    let sha = c.commit("after the refusal", &[("f.txt", "1")])?;
    assert_eq!(c.wait_result(&sha, WAIT)?["status"], "success");
    Ok(())
}

/// A step that prints `n` numbered lines, `gap` seconds apart.
fn counting_spec(n: u32, gap: &str) -> String {
    spec(&[(
        "count",
        &format!("i=1; while [ $i -le {n} ]; do echo line $i; i=$((i+1)); sleep {gap}; done"),
        "2m",
    )])
}

/// The `[count]` lines of a log, checked to be exactly `line 1` … `line n`.
fn assert_counted_lines(log: &str, n: u32) {
    let lines: Vec<&str> = log
        .lines()
        .filter_map(|l| l.strip_prefix("[count] "))
        .collect();
    let want: Vec<String> = (1..=n).map(|i| format!("line {i}")).collect();
    assert_eq!(lines, want, "no gap, no repeat:\n{log}");
}

/// A step that hangs (with a background child) on its first attempt and passes on later
/// ones: `mark` records that the first attempt began.
fn hang_once_spec(mark: &std::path::Path) -> String {
    let m = mark.display();
    spec(&[(
        "once",
        &format!(
            "if [ -e {m} ]; then echo again; exit 0; fi; touch {m}; echo started; sleep 300 & sleep 301"
        ),
        "10m",
    )])
}

#[test]
fn dispatcher_sigterm_three_times_during_one_job_adopts_it_every_time() -> Result<()> {
    let mut c = Cluster::start_ready(bins(), Opts::default())?;
    let n = 60;
    let sha = c.commit("long", &[(".tinyci.toml", &counting_spec(n, "0.1"))])?;
    c.wait_assigned(&sha)?;
    for round in 1..=3 {
        let want = format!("line {}\n", round * 8);
        wait_until("more output on disk", WAIT, || {
            c.log_text(&sha).contains(&want)
        })?;
        c.terminate_and_restart_dispatcher()?;
        c.dispatcher()
            .wait_for(&["adopted", &format!("commit={sha}")], WAIT)?;
    }
    let r = c.wait_result(&sha, WAIT)?;
    assert_eq!(r["status"], "success", "{r}");
    assert_eq!(
        r["attempts"], 1,
        "adopted after every stop, never re-run: {r}"
    );
    let log = c.log_text(&sha);
    assert_counted_lines(&log, n);
    assert_eq!(log.matches("[tinyci] attempt ").count(), 1, "{log}");
    let logs = c.all_dispatcher_logs();
    assert!(!logs.contains("runner lost"), "{logs}");
    // Each stop told the runner, which came back at once instead of waiting to notice.
    assert_eq!(
        c.runners[0].count(&["the dispatcher is shutting down; reconnecting"]),
        3
    );
    Ok(())
}
