//! Phase 2: the dispatcher's restart over a long history; a busy runner lost to kill -9
//! or SIGSTOP.

use super::*;

pub(crate) fn recovery(
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
pub(crate) fn restart(
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
pub(crate) fn build_history(results: &Path, n: usize) -> Result<u64> {
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
pub(crate) fn recovery_trial(c: &mut Cluster, slow: &str, sig: i32, k: usize) -> Result<f64> {
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
