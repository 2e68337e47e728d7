//! The dispatcher's database with the real binaries: a results directory written by the
//! journal-era dispatcher is imported on first start, and the database answers the
//! README's `sqlite3` queries while the dispatcher runs.

use anyhow::{ensure, Context, Result};
use rusqlite::{Connection, OpenFlags};
use testkit::*;
use tinyci::dispatcher::journal::Record;
use tinyci::proto::{CommitId, JobId, RunStatus, StepReport, StepStatus};
use tinyci::results::{self, ResultFile};

fn bins() -> Bins {
    testkit::bins!()
}

/// The README's first example query: the last failures, newest first.
const LAST_FAILURES: &str = "SELECT sha, datetime(finished_at / 1000, 'unixepoch'), attempts
    FROM commits WHERE result IN ('failure', 'error') ORDER BY finished_at DESC LIMIT 10";

/// The README's second example query: a commit's attempts and how each ended.
const ATTEMPTS_OF: &str = "SELECT number, runner, outcome, reason FROM attempts
    WHERE sha = ?1 ORDER BY id";

/// The database, opened read-only as a user's `sqlite3` would.
fn open_db(c: &Cluster) -> Result<Connection> {
    let path = c.results.join(".tinyci").join("tinyci.db");
    Connection::open_with_flags(&path, OpenFlags::SQLITE_OPEN_READ_ONLY)
        .with_context(|| format!("opening {}", path.display()))
}

fn result(commit: &str, status: RunStatus) -> Result<ResultFile> {
    Ok(ResultFile {
        commit: CommitId::parse(commit)?,
        status,
        steps: vec![StepReport {
            name: "test".into(),
            status: if status == RunStatus::Success {
                StepStatus::Success
            } else {
                StepStatus::Failure
            },
            exit_code: Some(i32::from(status != RunStatus::Success)),
            duration_ms: 812,
        }],
        runner: Some("127.0.0.1:8900".into()),
        attempts: 1,
        queued_at: "2026-01-01T00:00:00.000Z".into(),
        started_at: Some("2026-01-01T00:00:00.250Z".into()),
        finished_at: "2026-01-01T00:00:01.062Z".into(),
        error: None,
    })
}

fn line(r: &Record) -> Result<String> {
    Ok(serde_json::to_string(r)? + "\n")
}

#[test]
fn a_journal_era_results_directory_is_imported_on_first_start() -> Result<()> {
    let mut c = Cluster::start(
        bins(),
        Opts {
            runners: 0,
            observer: false,
            ..Opts::default()
        },
    )?;
    // The directory as the journal-era dispatcher left it: no database.
    c.dispatcher.take().expect("dispatcher").kill();
    let state = c.results.join(".tinyci");
    for entry in std::fs::read_dir(&state)? {
        std::fs::remove_file(entry?.path())?;
    }
    // `old`: finished, its result journaled but its file lost (a power cut). `gone`: a
    // run finished long ago, only its result file left. `pending`: queued, never run.
    let old = c.master.head()?;
    let pending = c.commit("queued before the upgrade", &[])?;
    let gone = "0123456789abcdef0123456789abcdef01234567";
    let old_result = result(&old, RunStatus::Failure)?;
    results::write_results(&c.results, &[result(gone, RunStatus::Success)?])?;
    let gone_before = std::fs::read(c.json_path(gone))?;
    let mut journal = String::new();
    for sha in [&old, &pending] {
        journal += &line(&Record::Queued {
            commit: CommitId::parse(sha)?,
            at_ms: 1_767_225_600_000,
        })?;
    }
    journal += &line(&Record::Assigned {
        commit: CommitId::parse(&old)?,
        job: JobId::new(),
        attempt: 1,
        runner: "127.0.0.1:8900".into(),
    })?;
    journal += &line(&Record::Finished {
        commit: CommitId::parse(&old)?,
        result: Some(Box::new(old_result.clone())),
    })?;
    std::fs::write(state.join("journal"), journal)?;

    c.start_dispatcher("0")?;
    c.dispatcher().wait_for(
        &["imported the old journal", "finished=2", "unfinished=1"],
        WAIT,
    )?;
    ensure!(
        !state.join("journal").exists(),
        "the journal is still there"
    );
    ensure!(
        state.join("journal.imported").exists(),
        "the journal was not kept aside"
    );
    // The lost file is back, exactly as the journal had it; the other one untouched.
    assert_eq!(
        results::read_result(&c.results, &CommitId::parse(&old)?)?,
        old_result
    );
    assert_eq!(std::fs::read(c.json_path(gone))?, gone_before);

    // The imported queue runs; the observer's first report (the tip, already queued) is
    // known, not queued again.
    c.add_runner()?;
    c.start_observer()?;
    let r = c.wait_result(&pending, WAIT)?;
    assert_eq!(r["status"], "success", "{r}");
    assert_eq!(r["attempts"], 1, "{r}");
    c.observer
        .as_ref()
        .expect("observer")
        .wait_for(&["submitted"], WAIT)?;
    assert_eq!(
        c.dispatcher()
            .count(&["queued", &format!("commit={pending}")]),
        0,
        "an imported commit was queued again"
    );

    let db = open_db(&c)?;
    let failures: Vec<String> = db
        .prepare(LAST_FAILURES)?
        .query_map([], |r| r.get(0))?
        .collect::<Result<_, _>>()?;
    assert_eq!(failures, [old.as_str()]);

    // A restart imports nothing again and finds the history by query.
    c.restart_dispatcher()?;
    ensure!(
        c.dispatcher().count(&["imported the old journal"]) == 0,
        "imported twice"
    );
    let n: i64 = db.query_row("SELECT count(*) FROM commits", [], |r| r.get(0))?;
    assert_eq!(n, 3);
    Ok(())
}

#[test]
fn the_database_answers_the_readme_queries_while_the_dispatcher_runs() -> Result<()> {
    let c = Cluster::start_ready(
        bins(),
        Opts {
            runners: 1,
            ..Opts::default()
        },
    )?;
    let sha = c.commit(
        "fails its second step",
        &[(
            ".tinyci.toml",
            &spec(&[("ok", "echo fine", "30s"), ("bad", "exit 3", "30s")]),
        )],
    )?;
    let r = c.wait_result(&sha, WAIT)?;
    assert_eq!(r["status"], "failure", "{r}");

    let db = open_db(&c)?;
    let failures: Vec<(String, String, u32)> = db
        .prepare(LAST_FAILURES)?
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?
        .collect::<Result<_, _>>()?;
    assert_eq!(failures.len(), 1, "{failures:?}");
    assert_eq!((failures[0].0.as_str(), failures[0].2), (sha.as_str(), 1));
    let attempts: Vec<(u32, String, String, Option<String>)> = db
        .prepare(ATTEMPTS_OF)?
        .query_map([&sha], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)))?
        .collect::<Result<_, _>>()?;
    assert_eq!(attempts.len(), 1);
    assert_eq!(attempts[0].1, c.runner_addrs[0]);
    assert_eq!(attempts[0].2, "reported");
    // The steps as the result file has them.
    let steps: Vec<(String, String, Option<i32>)> = db
        .prepare(
            "SELECT s.name, s.status, s.exit_code FROM steps s JOIN attempts a ON a.id = s.attempt
             WHERE a.sha = ?1 ORDER BY s.position",
        )?
        .query_map([&sha], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?
        .collect::<Result<_, _>>()?;
    assert_eq!(
        steps,
        [
            ("ok".to_owned(), "success".to_owned(), Some(0)),
            ("bad".to_owned(), "failure".to_owned(), Some(3))
        ]
    );
    let state: String = db.query_row(
        "SELECT state FROM runners WHERE address = ?1",
        [&c.runner_addrs[0]],
        |r| r.get(0),
    )?;
    assert_eq!(state, "connected");
    // The library's read-only queries agree.
    let reader = tinyci::dispatcher::store::sqlite::SqliteReader::open(&c.results)?;
    use tinyci::dispatcher::store::History;
    let run = reader
        .run(&CommitId::parse(&sha)?)?
        .context("the run is not in the database")?;
    assert_eq!(run.attempts.len(), 1);
    assert_eq!(run.attempts[0].steps.len(), 2);
    Ok(())
}

#[test]
fn a_finished_commit_submitted_again_after_a_restart_is_known_not_queued() -> Result<()> {
    let mut c = Cluster::start_ready(bins(), Opts::default())?;
    let tip = c.master.head()?;
    // The restarted dispatcher reads no finished history at start: only the database
    // lookup on submission knows the tip is done.
    c.restart_dispatcher()?;
    let clone = c.master.clone_to(&c.tmp.path().join("fresh_observer"))?;
    let obs = c.spawn_observer_on(&clone, &CloneSetup::default())?;
    obs.wait_for(
        &["submitted", "queued=0", "known=1", &format!("last={tip}")],
        WAIT,
    )?;
    let logs = c.all_dispatcher_logs();
    let queued = logs
        .lines()
        .filter(|l| l.contains(" queued ") && l.contains(&format!("commit={tip}")))
        .count();
    assert_eq!(queued, 1, "queued again after a restart");
    Ok(())
}

/// The database's files deleted, or `.tinyci` moved away, under a running dispatcher: it
/// notices, stops (exit 1: a supervisor restarts it), and saves what the open database
/// holds; the next start puts that in place, so the history is whole and nothing runs
/// again. (It went on writing into files no path named, and the next start found an
/// empty history.)
#[test]
fn database_files_deleted_or_moved_under_the_dispatcher_are_saved_for_the_next_start() -> Result<()>
{
    let mut c = Cluster::start_ready(bins(), Opts::default())?;
    let tip = c.master.head()?;
    let state = c.results.join(".tinyci");
    for how in ["delete", "move", "wipe"] {
        let sha = c.commit(&format!("before the {how}"), &[("f", how)])?;
        c.wait_result(&sha, WAIT)?;
        match how {
            "delete" => {
                for f in ["tinyci.db", "tinyci.db-wal", "tinyci.db-shm"] {
                    std::fs::remove_file(state.join(f))?;
                }
            }
            "move" => std::fs::rename(&state, c.results.join(".tinyci.moved"))?,
            // `rm -rf test_results`: the result files go too.
            _ => std::fs::remove_dir_all(&c.results)?,
        }
        let d = c.dispatcher.as_mut().context("dispatcher")?;
        let status = d
            .wait_exit(WAIT)
            .with_context(|| format!("the dispatcher went on after the {how}:\n{}", d.log()))?;
        assert_eq!(status.code(), Some(1), "{}", d.log());
        d.wait_for(&["saved the database"], WAIT)?;
        let port = c.addr.rsplit(':').next().unwrap_or("0").to_owned();
        let old = c.dispatcher.take().context("dispatcher")?;
        c.past_dispatchers.push(old);
        c.start_dispatcher(&port)?;
        c.dispatcher()
            .wait_for(&["put in place the database saved"], WAIT)?;
        for done in [&tip, &sha] {
            let detail = c
                .run_detail(done)?
                .with_context(|| format!("{done} is missing from the history after the {how}"))?;
            assert_eq!(detail.summary.attempts, 1, "{detail:?}");
            assert_eq!(detail.attempts.len(), 1, "run again? {detail:?}");
            ensure!(
                c.json_path(done).exists(),
                "{done}.json is not rewritten after the {how}"
            );
        }
    }
    // And it goes on.
    let after = c.commit("after", &[("f", "after")])?;
    assert_eq!(c.wait_result(&after, WAIT)?["status"], "success");
    Ok(())
}

/// `.tinyci` deleted while the dispatcher is stopped: the next start finds a new database
/// beside the result files, and imports them as finished runs, so a commit submitted again
/// is known, not run again. (The history started empty, and it ran again.)
#[test]
fn result_files_left_without_their_database_are_imported_as_finished() -> Result<()> {
    let mut c = Cluster::start_ready(bins(), Opts::default())?;
    let tip = c.master.head()?;
    let mut d = c.dispatcher.take().context("dispatcher")?;
    ensure!(
        d.terminate(WAIT).is_some_and(|s| s.success()),
        "the dispatcher did not stop cleanly:\n{}",
        d.log()
    );
    c.past_dispatchers.push(d);
    std::fs::remove_dir_all(c.results.join(".tinyci"))?;
    // A file whose name and contents disagree is not imported under either.
    let impostor = "1234abcd".repeat(5);
    std::fs::copy(c.json_path(&tip), c.json_path(&impostor))?;
    let port = c.addr.rsplit(':').next().unwrap_or("0").to_owned();
    c.start_dispatcher(&port)?;
    c.dispatcher()
        .wait_for(&["imported as finished", "imported=1"], WAIT)?;
    c.dispatcher().wait_for(
        &["names another commit", &format!("commit={impostor}")],
        WAIT,
    )?;
    ensure!(
        c.run_detail(&impostor)?.is_none(),
        "the impostor is in the history"
    );
    let detail = c
        .run_detail(&tip)?
        .context("the tip is not in the history")?;
    assert_eq!(detail.summary.state, tinyci::proto::RunState::Success);
    let answer = tokio::runtime::Runtime::new()?.block_on(async {
        let mut client = tinyci::client::Client::connect(&c.addr, None).await?;
        client
            .submit(vec![CommitId::parse(&tip)?], None, false, false)
            .await
            .map_err(anyhow::Error::from)
    })?;
    assert_eq!((answer.queued, answer.known), (0, 1), "run again?");
    Ok(())
}
