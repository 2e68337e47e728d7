//! Everything the dispatcher does when it starts over a results directory that was in use:
//!
//! 1. a directory written by an older dispatcher (its hand-written journal,
//!    `.tinyci/journal`) is imported into the database once, and the journal kept aside as
//!    `journal.imported` ([`import_journal`]);
//!    A new database over a results directory that holds result files (its `.tinyci`
//!    deleted while the dispatcher was stopped) imports them as finished runs
//!    ([`import_result_files`]), so that nothing they vouch for runs again;
//! 2. result files the database recorded but the disk may have lost or torn (a power cut
//!    before the unsynced file reached the disk) are rewritten from the database, and the
//!    filesystem synced, before they are marked safe ([`rewrite_results`]);
//! 3. the queue and the attempts in flight are read back by query — never by replaying the
//!    history, so a start costs the same after a hundred runs or a million — and put into
//!    the scheduler; each running attempt's log is resumed where the file ends ([`restore`]);
//! 4. running attempts wait for their runners to register again and be adopted; those
//!    that no runner claims within the grace period go back to the queue
//!    ([`requeue_orphans`]).

use std::collections::HashMap;
use std::fs;
use std::io;
use std::path::Path;
use std::time::{Duration, Instant, SystemTime};

use tinyci_proto::{CommitId, JobId};
use tracing::{info, warn};

use super::core::log_sink::LogSink;
use super::journal;
use super::state::{Failure, Lost, Scheduler};
use super::store::{Op, Store, StoreError, Unfinished};
use crate::results::{self, ResultFile, STATE_DIR};

/// The old journal's file name in the state directory, and where it goes once imported.
pub const JOURNAL_FILE: &str = "journal";
/// Where an imported journal is kept.
pub const JOURNAL_IMPORTED: &str = "journal.imported";

fn io_err(what: impl Into<String>) -> impl FnOnce(io::Error) -> StoreError {
    let what = what.into();
    move |source| StoreError::Io { what, source }
}

/// Steps 1 and 2, then reads the unfinished commits: what the core starts from.
pub fn recover(dir: &Path, store: &mut dyn Store) -> Result<Vec<Unfinished>, StoreError> {
    import_journal(dir, store)?;
    import_result_files(dir, store)?;
    rewrite_results(dir, store)?;
    store.forget_runners()?;
    store.unfinished()
}

/// Imports the journal of an older dispatcher, if there is one: its unfinished commits (with
/// their attempts and the reasons they failed), and every finished run — from the
/// journal's own records and from the result files on disk — all in one transaction.
/// Then the journal is renamed [`JOURNAL_IMPORTED`].
pub fn import_journal(dir: &Path, store: &mut dyn Store) -> Result<(), StoreError> {
    let state = dir.join(STATE_DIR);
    let path = state.join(JOURNAL_FILE);
    if !path.exists() {
        return Ok(());
    }
    if !store.journal_imported()? {
        let (pending, finished) = journal::read(&path).map_err(io_err(format!(
            "reading the old journal {} to import it",
            path.display()
        )))?;
        // What the journal vouched for but the disk lost or tore: rewrite it first,
        // exactly as the journal had it.
        let mut restored = 0;
        for r in &finished {
            if results::read_result(dir, &r.commit).ok().as_ref() != Some(r) {
                results::write_results(dir, std::slice::from_ref(r))
                    .map_err(io_err("restoring a result file from the old journal"))?;
                restored += 1;
            }
        }
        if restored > 0 {
            warn!(restored, "result files restored from the old journal");
        }
        // Every run that has a result file is finished.
        let mut imported = 0usize;
        let mut done: std::collections::HashSet<CommitId> = std::collections::HashSet::new();
        for commit in results::finished_commits(dir).map_err(io_err("listing result files"))? {
            match results::read_result(dir, &commit).and_then(|r| r.to_run()) {
                Ok(run) => {
                    done.insert(commit);
                    store.stage(Op::Imported { run });
                    imported += 1;
                }
                Err(e) => {
                    warn!(commit = %commit, error = %e, "result file not imported (unreadable); it stays on disk");
                }
            }
        }
        let (mut queued, mut torn) = (0usize, 0usize);
        for p in pending {
            if done.contains(&p.commit) {
                continue; // finished, its journal line lost: the file stands for it
            }
            let json = results::json_path(dir, &p.commit);
            if json.exists() {
                // Torn (unreadable above): the commit runs again.
                fs::remove_file(&json).map_err(io_err("removing a torn result file"))?;
                torn += 1;
            }
            stage_pending(store, p);
            queued += 1;
        }
        if torn > 0 {
            warn!(torn, "torn result files removed; their commits run again");
        }
        store.stage(Op::JournalImported {
            at: SystemTime::now(),
        });
        // The rewritten files must be on disk before the journal that vouched for them is
        // set aside.
        if restored > 0 || torn > 0 {
            results::sync_filesystem(dir).map_err(io_err("syncing the result files"))?;
        }
        store.commit()?;
        info!(
            finished = imported,
            unfinished = queued,
            "imported the old journal and result files into the database"
        );
    }
    let aside = state.join(JOURNAL_IMPORTED);
    fs::rename(&path, &aside).map_err(io_err("setting the imported journal aside"))?;
    fs::File::open(&state)
        .and_then(|d| d.sync_all())
        .map_err(io_err("syncing the state directory"))?;
    info!(path = %aside.display(), "the old journal is kept aside; the database replaces it");
    Ok(())
}

/// Imports every `<sha>.json` of `dir` as a finished run when the database holds no
/// commit at all: the state directory was deleted (or lost) while the result files stayed.
/// Without this, the history would start empty and every commit submitted again would run
/// again. Attempts, steps' times and branches before then are not known; the files and
/// logs are untouched.
pub fn import_result_files(dir: &Path, store: &mut dyn Store) -> Result<(), StoreError> {
    if store.has_history()? {
        return Ok(());
    }
    let mut imported = 0usize;
    for commit in results::finished_commits(dir).map_err(io_err("listing result files"))? {
        match results::read_result(dir, &commit).and_then(|r| r.to_run()) {
            Ok(run) if run.commit != commit => {
                warn!(commit = %commit, says = %run.commit, "result file not imported: it names another commit; it stays on disk, and the commit runs again if submitted");
            }
            Ok(run) => {
                store.stage(Op::Imported { run });
                imported += 1;
            }
            Err(e) => {
                warn!(commit = %commit, error = %e, "result file not imported (unreadable); it stays on disk, and the commit runs again if submitted");
            }
        }
    }
    if imported > 0 {
        store.commit()?;
        warn!(
            imported,
            "the database is new but the results directory holds result files (was .tinyci deleted?): their runs are imported as finished; what came before them (attempts, branches) is not in the history"
        );
    }
    Ok(())
}

/// Stages an unfinished commit of the old journal with its attempts.
fn stage_pending(store: &mut dyn Store, p: journal::Pending) {
    let at = p.queued_at;
    store.stage(Op::Queued {
        commit: p.commit.clone(),
        branch: None,
        at,
    });
    let mut attempts = 0;
    for failure in p.failures {
        let job = JobId::new();
        attempts = if failure.counted {
            failure.attempt
        } else {
            failure.attempt.saturating_sub(1)
        };
        store.stage(Op::Assigned {
            commit: p.commit.clone(),
            job,
            number: failure.attempt,
            runner: failure.runner.clone(),
            at,
        });
        store.stage(Op::Returned {
            commit: p.commit.clone(),
            job,
            failure,
            attempts,
            at,
        });
    }
    match p.running {
        Some((job, runner)) => store.stage(Op::Assigned {
            commit: p.commit,
            job,
            number: p.attempts,
            runner,
            at,
        }),
        None if p.attempts != attempts => {
            // Attempts lost before the journal recorded why: keep the count.
            let job = JobId::new();
            store.stage(Op::Assigned {
                commit: p.commit.clone(),
                job,
                number: p.attempts,
                runner: String::new(),
                at,
            });
            store.stage(Op::Returned {
                commit: p.commit,
                job,
                failure: Failure {
                    attempt: p.attempts,
                    runner: String::new(),
                    reason: "lost (recorded by an older dispatcher without a reason)".into(),
                    counted: true,
                },
                attempts: p.attempts,
                at,
            });
        }
        None => {}
    }
}

/// Rewrites every result file the database has not marked safe that is missing or does not
/// match the database, syncs the filesystem, and marks them safe. Only the files written
/// since the result writer's last sync are checked.
pub fn rewrite_results(dir: &Path, store: &mut dyn Store) -> Result<(), StoreError> {
    let runs = store.unsynced_results()?;
    if runs.is_empty() {
        return Ok(());
    }
    let mut rewritten = 0;
    for run in &runs {
        let want = ResultFile::render(run);
        if results::read_result(dir, &run.commit).ok().as_ref() != Some(&want) {
            results::write_results(dir, std::slice::from_ref(&want))
                .map_err(io_err("rewriting a result file"))?;
            rewritten += 1;
        }
    }
    results::sync_filesystem(dir).map_err(io_err("syncing the result files"))?;
    store.stage(Op::FilesDurable {
        commits: runs.into_iter().map(|r| r.commit).collect(),
    });
    store.commit()?;
    if rewritten > 0 {
        warn!(
            rewritten,
            "result files the disk lost or tore were rewritten from the database"
        );
    }
    Ok(())
}

/// The state a core starts with besides its scheduler.
pub struct Restored {
    /// The logs of the running attempts, resumed.
    pub logs: HashMap<JobId, LogSink>,
    /// When unadopted running attempts go back to the queue.
    pub orphan_deadline: Option<Instant>,
}

/// Puts the unfinished commits into the scheduler: queued ones in their order, running
/// ones waiting `adoption_grace` for their runner.
pub fn restore(
    sched: &mut Scheduler,
    dir: &Path,
    unfinished: Vec<Unfinished>,
    adoption_grace: Duration,
) -> Result<Restored, StoreError> {
    let mut logs = HashMap::new();
    let (mut queued, mut running) = (0, 0);
    for u in unfinished {
        match u.running {
            Some(r) => {
                let sink = LogSink::resume(dir, &u.commit, &r.job, u.attempts, &r.runner)
                    .map_err(io_err(format!("reading the log of {}", u.commit)))?;
                logs.insert(r.job, sink);
                sched.restore_running(
                    u.commit,
                    u.queued_at,
                    r.job,
                    r.started_at,
                    u.attempts,
                    Some(r.runner),
                    u.failures,
                    u.branch,
                );
                running += 1;
            }
            None => {
                sched.restore_queued(u.commit, u.queued_at, u.attempts, u.failures, u.branch);
                queued += 1;
            }
        }
    }
    if queued + running > 0 {
        info!(
            queued,
            running, "restored unfinished commits from the database"
        );
    }
    Ok(Restored {
        logs,
        orphan_deadline: (running > 0).then(|| Instant::now() + adoption_grace),
    })
}

/// Puts every restored attempt that no runner adopted back at the front of the queue, each
/// with a counted failure.
pub fn requeue_orphans(sched: &mut Scheduler) -> Vec<Lost> {
    sched
        .requeue_orphans()
        .into_iter()
        .map(|(commit, job, failure)| {
            warn!(commit = %commit, "no runner came back for this running commit; requeued");
            Lost::Requeued {
                commit,
                job,
                failure,
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dispatcher::journal::Record;
    use crate::dispatcher::store::sqlite::{self, SqliteStore};
    use crate::dispatcher::store::AttemptEnd;
    use tinyci_proto::{RunStatus, StepReport, StepStatus};

    fn c(n: u8) -> CommitId {
        CommitId::parse(&format!("{n:02x}").repeat(20)).unwrap()
    }

    fn result(commit: CommitId, status: RunStatus) -> ResultFile {
        ResultFile {
            commit,
            status,
            steps: vec![StepReport {
                name: "test".into(),
                status: StepStatus::Success,
                exit_code: Some(0),
                duration_ms: 7,
            }],
            runner: Some("127.0.0.1:8900".into()),
            attempts: 1,
            queued_at: "2026-01-01T00:00:00.123Z".into(),
            started_at: Some("2026-01-01T00:00:01.000Z".into()),
            finished_at: "2026-01-01T00:00:02.500Z".into(),
            error: None,
        }
    }

    fn lines(records: &[Record]) -> String {
        records
            .iter()
            .map(|r| serde_json::to_string(r).unwrap() + "\n")
            .collect()
    }

    fn count(store: &mut SqliteStore, sql: &str) -> i64 {
        store.connection().query_row(sql, [], |r| r.get(0)).unwrap()
    }

    #[test]
    fn a_journal_era_results_directory_is_imported_once_and_the_journal_kept_aside() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        results::prepare_dir(d).unwrap();
        let running = JobId::new();
        let failed = JobId::new();
        // c1: finished and journaled, its file lost. c2: running. c3: failed once, queued.
        // c4: queued, its file torn. c5: finished long ago (only its file is left).
        // c6: finished, its file whole, its journal line lost.
        let journal = lines(&[
            Record::Queued {
                commit: c(1),
                at_ms: 1,
            },
            Record::Queued {
                commit: c(2),
                at_ms: 2,
            },
            Record::Queued {
                commit: c(3),
                at_ms: 3,
            },
            Record::Queued {
                commit: c(4),
                at_ms: 4,
            },
            Record::Queued {
                commit: c(6),
                at_ms: 6,
            },
            Record::Finished {
                commit: c(1),
                result: Some(Box::new(result(c(1), RunStatus::Failure))),
            },
            Record::Assigned {
                commit: c(2),
                job: running,
                attempt: 1,
                runner: "127.0.0.1:8901".into(),
            },
            Record::Assigned {
                commit: c(3),
                job: failed,
                attempt: 1,
                runner: "127.0.0.1:8902".into(),
            },
            Record::Returned {
                commit: c(3),
                job: failed,
                attempt: 1,
                runner: "127.0.0.1:8902".into(),
                reason: "checkout failed".into(),
                counted: true,
            },
        ]);
        let path = d.join(STATE_DIR).join(JOURNAL_FILE);
        fs::write(&path, journal).unwrap();
        results::write_results(d, &[result(c(5), RunStatus::Success)]).unwrap();
        results::write_results(d, &[result(c(6), RunStatus::Success)]).unwrap();
        fs::write(results::json_path(d, &c(4)), b"{\"commit\": \"04").unwrap();

        let mut store = SqliteStore::open(d).unwrap();
        let unfinished = recover(d, &mut store).unwrap();

        let order: Vec<&CommitId> = unfinished.iter().map(|u| &u.commit).collect();
        assert_eq!(order, [&c(2), &c(3), &c(4)]);
        let r = unfinished[0].running.as_ref().expect("c2 is running");
        assert_eq!((r.job, r.runner.as_str()), (running, "127.0.0.1:8901"));
        assert_eq!(unfinished[1].attempts, 1);
        assert_eq!(unfinished[1].failures.len(), 1);
        assert_eq!(unfinished[1].failures[0].reason, "checkout failed");
        assert!(!results::json_path(d, &c(4)).exists(), "torn file removed");
        // The lost file is back, byte for byte as the journal had it.
        assert_eq!(
            results::read_result(d, &c(1)).unwrap(),
            result(c(1), RunStatus::Failure)
        );
        for n in [1, 5, 6] {
            let run = sqlite::finished_run(store.connection(), &c(n))
                .unwrap()
                .unwrap();
            assert_eq!(
                ResultFile::render(&run),
                results::read_result(d, &c(n)).unwrap(),
                "c{n} renders as its file"
            );
        }
        assert!(!path.exists());
        assert!(d.join(STATE_DIR).join(JOURNAL_IMPORTED).exists());

        // A second start imports nothing again, even with the journal put back.
        fs::rename(d.join(STATE_DIR).join(JOURNAL_IMPORTED), &path).unwrap();
        let before = count(&mut store, "SELECT count(*) FROM attempts");
        let again = recover(d, &mut store).unwrap();
        assert_eq!(again, unfinished);
        assert_eq!(count(&mut store, "SELECT count(*) FROM attempts"), before);
        assert_eq!(count(&mut store, "SELECT count(*) FROM commits"), 6);
        assert!(!path.exists());
    }

    #[test]
    fn result_files_a_power_cut_lost_or_tore_are_rewritten_from_the_database() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        results::prepare_dir(d).unwrap();
        let mut store = SqliteStore::open(d).unwrap();
        let mut runs = Vec::new();
        for n in 1..=3u8 {
            let f = result(c(n), RunStatus::Success).to_run().unwrap();
            let job = JobId::new();
            store.stage(Op::Queued {
                commit: c(n),
                branch: None,
                at: f.queued_at,
            });
            store.stage(Op::Assigned {
                commit: c(n),
                job,
                number: 1,
                runner: "127.0.0.1:8900".into(),
                at: f.started_at.unwrap(),
            });
            store.stage(Op::Finished {
                last: Some((job, AttemptEnd::Reported)),
                run: f.clone(),
            });
            runs.push(f);
        }
        store.commit().unwrap();
        // c1 whole, c2 never written, c3 torn.
        results::write_results(d, &[ResultFile::render(&runs[0])]).unwrap();
        fs::write(results::json_path(d, &c(3)), b"{\"comm").unwrap();
        let before = fs::metadata(results::json_path(d, &c(1)))
            .unwrap()
            .modified()
            .unwrap();

        assert!(recover(d, &mut store).unwrap().is_empty());
        for r in &runs {
            assert_eq!(
                results::read_result(d, &r.commit).unwrap(),
                ResultFile::render(r)
            );
        }
        assert_eq!(
            fs::metadata(results::json_path(d, &c(1)))
                .unwrap()
                .modified()
                .unwrap(),
            before,
            "a whole file is left alone"
        );
        assert!(store.unsynced_results().unwrap().is_empty());
    }

    #[test]
    fn restored_attempts_wait_for_adoption_and_orphans_go_back_to_the_queue() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        results::prepare_dir(d).unwrap();
        let job = JobId::new();
        let now = SystemTime::now();
        let unfinished = vec![
            Unfinished {
                commit: c(1),
                queued_at: now,
                attempts: 1,
                running: Some(super::super::store::RunningAttempt {
                    job,
                    runner: "r:1".into(),
                    started_at: now,
                }),
                failures: Vec::new(),
                branch: Some("main".into()),
            },
            Unfinished {
                commit: c(2),
                queued_at: now,
                attempts: 0,
                running: None,
                failures: Vec::new(),
                branch: Some("main".into()),
            },
        ];
        let mut sched = Scheduler::new(3);
        let restored = restore(&mut sched, d, unfinished, Duration::from_secs(6)).unwrap();
        assert!(restored.orphan_deadline.is_some());
        assert!(restored.logs.contains_key(&job));
        assert_eq!(sched.queued(), 1);
        for commit in [c(1), c(2)] {
            let e = sched.entry(&commit).unwrap();
            assert_eq!(e.branch.as_deref(), Some("main"), "the branch is restored");
        }
        let lost = requeue_orphans(&mut sched);
        assert!(
            matches!(&lost[..], [Lost::Requeued { commit, failure, .. }] if *commit == c(1) && failure.counted)
        );
        assert_eq!(sched.queued(), 2);
    }
}
