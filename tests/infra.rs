//! Infrastructure faults against the real binaries (issue 9): none of them ever becomes a
//! commit's verdict. Broken clones, an origin that goes away for a while, graceful stops of
//! the dispatcher and of a runner, a black-holed connection, a second dispatcher on the
//! same results directory.

use std::process::Command;
use std::time::Duration;

use anyhow::{ensure, Result};
use testkit::*;

fn bins() -> Bins {
    testkit::bins!()
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
    assert!(!logs.contains("superseded"), "{logs}");
    // Each stop told the runner, which came back at once instead of waiting to notice.
    assert_eq!(
        c.runners[0].count(&["the dispatcher is shutting down; reconnecting"]),
        3
    );
    Ok(())
}

#[test]
fn runner_sigterm_finishes_and_reports_its_job_then_exits() -> Result<()> {
    let mut c = Cluster::start_ready(bins(), Opts::default())?;
    let n = 20;
    let sha = c.commit("long", &[(".tinyci.toml", &counting_spec(n, "0.1"))])?;
    c.wait_assigned(&sha)?;
    wait_until("the job's first lines", WAIT, || {
        c.log_text(&sha).contains("line 3\n")
    })?;
    c.runners[0].signal(libc::SIGTERM);
    c.runners[0].wait_for(&["draining"], WAIT)?;
    // A commit that arrives now is not the draining runner's.
    let next = c.commit("after the signal", &[("f.txt", "next")])?;
    c.wait_known(&next)?;
    let status = c.runners[0]
        .wait_exit(WAIT)
        .ok_or_else(|| anyhow::anyhow!("the draining runner did not exit"))?;
    ensure!(status.success(), "runner exited with {status}");
    let r = c.wait_result(&sha, WAIT)?;
    assert_eq!(r["status"], "success", "{r}");
    assert_eq!(r["attempts"], 1, "{r}");
    assert_counted_lines(&c.log_text(&sha), n);
    assert!(c.runners[0].log().contains("result delivered"));
    c.dispatcher().wait_for(&["runner said goodbye"], WAIT)?;
    assert_eq!(
        c.dispatcher()
            .count(&["assigned", &format!("commit={next}")]),
        0,
        "the draining runner was given nothing new"
    );
    c.add_runner()?;
    let r = c.wait_result(&next, WAIT)?;
    assert_eq!(
        (r["status"].as_str(), r["attempts"].as_u64()),
        (Some("success"), Some(1))
    );
    Ok(())
}

#[test]
fn runner_second_sigterm_kills_the_steps_and_hands_the_commit_back_uncounted() -> Result<()> {
    let mut c = Cluster::start_ready(
        bins(),
        Opts {
            runners: 2,
            ..Opts::default()
        },
    )?;
    let mark = c.tmp.path().join("second-signal-mark");
    let sha = c.commit("hangs once", &[(".tinyci.toml", &hang_once_spec(&mark))])?;
    let (i, _) = c.wait_assigned(&sha)?;
    wait_until("the step to start", WAIT, || {
        c.log_text(&sha).contains("started")
    })?;
    c.runners[i].signal(libc::SIGTERM);
    c.runners[i].wait_for(&["draining"], WAIT)?;
    let asked = std::time::Instant::now();
    c.runners[i].signal(libc::SIGTERM);
    let status = c.runners[i]
        .wait_exit(WAIT)
        .ok_or_else(|| anyhow::anyhow!("the runner did not stop on the second signal"))?;
    ensure!(status.success(), "runner exited with {status}");
    let took = asked.elapsed();
    ensure!(took < Duration::from_secs(8), "stopping took {took:?}");
    let r = c.wait_result(&sha, WAIT)?;
    assert_eq!(r["status"], "success", "{r}");
    assert_eq!(r["attempts"], 1, "the stopped attempt does not count: {r}");
    assert_eq!(r["runner"].as_str(), Some(c.runner_addrs[1 - i].as_str()));
    let log = c.log_text(&sha);
    assert!(log.contains("not counted as an attempt"), "{log}");
    // The first attempt's steps (the background sleep included) were killed.
    wait_until("the stopped attempt's processes to be gone", WAIT, || {
        step_processes(&sha).is_empty()
    })?;
    println!("second signal to exit: {took:?}");
    Ok(())
}

#[test]
fn runner_drain_timeout_hands_the_commit_back_uncounted() -> Result<()> {
    let mut c = Cluster::start(
        bins(),
        Opts {
            runners: 0,
            ..Opts::default()
        },
    )?;
    let i = c.add_runner_with(&CloneSetup::args(&["--drain-timeout", "1s"]))?;
    c.wait_result(&c.master.head()?, WAIT)?;
    let mark = c.tmp.path().join("drain-timeout-mark");
    let sha = c.commit("hangs once", &[(".tinyci.toml", &hang_once_spec(&mark))])?;
    c.wait_assigned(&sha)?;
    wait_until("the step to start", WAIT, || {
        c.log_text(&sha).contains("started")
    })?;
    c.runners[i].signal(libc::SIGTERM);
    let status = c.runners[i]
        .wait_exit(WAIT)
        .ok_or_else(|| anyhow::anyhow!("the runner outlived its drain timeout"))?;
    ensure!(status.success(), "runner exited with {status}");
    c.runners[i].wait_for(&["drain timeout"], WAIT)?;
    ensure!(
        !c.json_path(&sha).exists(),
        "no result from the stopped attempt"
    );
    c.add_runner()?;
    let r = c.wait_result(&sha, WAIT)?;
    assert_eq!(
        (r["status"].as_str(), r["attempts"].as_u64()),
        (Some("success"), Some(1)),
        "{r}"
    );
    wait_until("the stopped attempt's processes to be gone", WAIT, || {
        step_processes(&sha).is_empty()
    })?;
    Ok(())
}

#[test]
fn black_holed_idle_runner_reconnects_after_the_partition_heals() -> Result<()> {
    let mut c = Cluster::start(
        bins(),
        Opts {
            runners: 0,
            ..Opts::default()
        },
    )?;
    let proxy = Proxy::start(&c.addr)?;
    let i = c.add_runner_with(&CloneSetup {
        dispatcher: Some(proxy.addr.clone()),
        ..CloneSetup::default()
    })?;
    c.wait_result(&c.master.head()?, WAIT)?;
    let registered = c.dispatcher().count(&["runner registered"]);

    proxy.black_hole();
    // Nothing was closed: the runner notices the silence by itself.
    c.runners[i].wait_for(&["heard nothing from the dispatcher"], WAIT)?;
    c.dispatcher().wait_for(&["heartbeat timeout"], WAIT)?;
    let sha = c.commit("during the partition", &[("f.txt", "partitioned")])?;
    c.wait_known(&sha)?;
    ensure!(!c.json_path(&sha).exists());

    proxy.heal();
    c.dispatcher()
        .wait_for_nth(&["runner registered"], registered + 1, WAIT)?;
    let r = c.wait_result(&sha, WAIT)?;
    assert_eq!(r["status"], "success", "{r}");
    assert_eq!(r["runner"].as_str(), Some(c.runner_addrs[i].as_str()));
    Ok(())
}

/// Asks a runner's own port why it takes no job, if it does not.
fn runner_paused(addr: &str) -> Result<Option<String>> {
    use tinyci::proto::{FromRunner, Role, ToRunner};
    tokio::runtime::Runtime::new()?.block_on(async {
        let mut conn = tinyci::net::connect(addr, Role::Client, "").await?;
        conn.send(&ToRunner::Status).await?;
        let FromRunner::Status { paused, .. } = conn.recv_within(WAIT, "the status").await?;
        Ok(paused)
    })
}

#[test]
fn origin_down_for_a_while_pauses_the_runner_and_the_commit_succeeds_after() -> Result<()> {
    let mut c = Cluster::start(
        bins(),
        Opts {
            runners: 0,
            ..Opts::default()
        },
    )?;
    // The runner's origin is a mirror of the master that can be taken away; the
    // observer keeps watching the master.
    let mirror = c.tmp.path().join("mirror.git");
    let away = c.tmp.path().join("mirror.away");
    let master = c.master.dir.clone();
    git(
        c.tmp.path(),
        &["clone", "-q", "--bare", &path(&master), &path(&mirror)],
    )?;
    let clone = c.tmp.path().join("mirrored_clone");
    git(
        c.tmp.path(),
        &["clone", "-q", &path(&mirror), &path(&clone)],
    )?;
    let i = c.add_runner_on(clone, &CloneSetup::default())?;
    c.wait_result(&c.master.head()?, WAIT)?;

    std::fs::rename(&mirror, &away)?;
    let sha = c.commit("while the origin is down", &[("f.txt", "down")])?;
    git(&master, &["push", "-q", &path(&away), "master"])?;
    c.runners[i].wait_for(&["pausing", "origin unreachable"], WAIT)?;
    c.dispatcher()
        .wait_for(&["runner paused", "origin unreachable"], WAIT)?;
    let runner_addr = c.runner_addrs[i].clone();
    wait_until("the status port to say why it pauses", WAIT, || {
        runner_paused(&runner_addr)
            .is_ok_and(|p| p.is_some_and(|r| r.contains("origin unreachable")))
    })?;
    ensure!(
        !c.json_path(&sha).exists(),
        "no verdict while the origin is down"
    );

    std::fs::rename(&away, &mirror)?;
    c.runners[i].wait_for(&["origin answers again"], WAIT)?;
    let r = c.wait_result(&sha, WAIT)?;
    assert_eq!(r["status"], "success", "{r}");
    assert_eq!(
        r["attempts"], 1,
        "an unreachable origin is not the commit's attempt: {r}"
    );
    assert!(
        c.log_text(&sha)
            .contains("ended without a result: checkout failed"),
        "{}",
        c.log_text(&sha)
    );
    for other in c.result_files() {
        let r = c.wait_result(&other, WAIT)?;
        assert_ne!(r["status"], "error", "{r}");
    }
    assert_eq!(runner_paused(&runner_addr)?, None);
    Ok(())
}

fn path(p: &std::path::Path) -> String {
    p.display().to_string()
}

#[test]
fn a_commit_no_runner_can_check_out_is_given_up_listing_every_attempt() -> Result<()> {
    let c = Cluster::start_ready(
        bins(),
        Opts {
            runners: 2,
            max_attempts: 3,
            ..Opts::default()
        },
    )?;
    // A commit in origin whose file is not: every checkout fails. (A commit origin does
    // not have at all waits for a push instead: tests/client.rs.) Made outside the
    // master's branch, so the observer never reports it.
    let tree = std::process::Command::new("git")
        .args(["mktree", "--missing"])
        .current_dir(&c.master.dir)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .and_then(|mut child| {
            use std::io::Write;
            child.stdin.take().expect("stdin").write_all(
                format!("100644 blob {}\tghost.txt\n", "0badc0de".repeat(5)).as_bytes(),
            )?;
            child.wait_with_output()
        })?;
    let tree = String::from_utf8(tree.stdout)?.trim().to_owned();
    let ghost = git(&c.master.dir, &["commit-tree", &tree, "-m", "ghost"])?;
    tokio::runtime::Runtime::new()?.block_on(async {
        use tinyci::proto::{CommitId, FromDispatcher, Role, ToDispatcher};
        let mut conn = tinyci::net::connect(&c.addr, Role::Observer, "").await?;
        conn.send(&ToDispatcher::Submit {
            commits: vec![CommitId::parse(&ghost)?],
            branch: None,
            front: false,
            rerun: false,
        })
        .await?;
        match conn.recv_within(WAIT, "Submitted").await? {
            FromDispatcher::Submitted { queued: 1, .. } => Ok(()),
            other => Err(anyhow::anyhow!("expected Submitted, got {other:?}")),
        }
    })?;
    let r = c.wait_result(&ghost, WAIT)?;
    assert_eq!(r["status"], "error", "{r}");
    assert_eq!(r["attempts"], 3, "{r}");
    let error = r["error"].as_str().unwrap_or_default();
    assert!(error.contains("gave up after 3 attempts"), "{error}");
    for n in 1..=3 {
        assert!(error.contains(&format!("attempt {n} on ")), "{error}");
    }
    assert_eq!(error.matches("checkout failed").count(), 3, "{error}");
    for addr in &c.runner_addrs {
        assert!(error.contains(addr.as_str()), "both runners tried: {error}");
    }
    // The pool goes on.
    let sha = c.commit("after the ghost", &[("f.txt", "fine")])?;
    assert_eq!(c.wait_result(&sha, WAIT)?["status"], "success");
    Ok(())
}

#[test]
fn a_step_that_garbles_git_head_does_not_fail_the_next_commits() -> Result<()> {
    let c = Cluster::start_ready(bins(), Opts::default())?;
    let breaker = spec(&[("break", "echo garbage > .git/HEAD", "30s")]);
    let bad = c.commit("garbles .git/HEAD", &[(".tinyci.toml", &breaker)])?;
    assert_eq!(c.wait_result(&bad, WAIT)?["status"], "success");
    let fine = spec(&[("ok", "git status --porcelain; echo fine", "30s")]);
    for n in 1..=2 {
        let sha = c.commit(&format!("good {n}"), &[(".tinyci.toml", &fine)])?;
        let r = c.wait_result(&sha, WAIT)?;
        assert_eq!(r["status"], "success", "{r}\n{}", c.log_text(&sha));
        assert_eq!(r["runner"].as_str(), Some(c.runner_addrs[0].as_str()));
    }
    Ok(())
}
