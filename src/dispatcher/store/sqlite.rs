//! The [`Store`] in an embedded SQLite database, `<results>/.tinyci/tinyci.db`: the whole
//! schema, its migrations and every SQL statement of tinyci live in this file.
//!
//! Settings: WAL (readers never block the writer), `synchronous=FULL` (a commit returns
//! only once its WAL frames are fsync'd: what is acknowledged survives a power cut),
//! `foreign_keys=ON`, a busy timeout, temporary tables in memory (nothing but the database,
//! its `-wal` and its `-shm` is ever created in the state directory), a checkpoint every
//! 4,000 WAL pages and a 16 MiB page cache (fewer, larger checkpoints off the hot path). The schema version is
//! SQLite's `user_version`; [`MIGRATIONS`] brings any older database up to date at start.
//!
//! Times are integers, milliseconds since the Unix epoch (`datetime(queued_at / 1000,
//! 'unixepoch')` shows one in the `sqlite3` shell).

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rusqlite::{params, Connection, OpenFlags, OptionalExtension, Row};
use tinyci_proto::{CommitId, JobId, RunStatus, StepReport, StepStatus};

use super::{
    AttemptEnd, AttemptRecord, History, Op, Outcome, Page, RunDetail, RunFilter, RunState,
    RunSummary, RunnerState, RunningAttempt, Store, StoreError, Unfinished,
};
use crate::dispatcher::state::{Failure, Finished};
use crate::results::STATE_DIR;

/// The database's file name in the state directory.
pub const DB_FILE: &str = "tinyci.db";

/// How long a statement waits for a lock held by another connection (a reader's
/// checkpoint, a user's `sqlite3` shell) before failing as busy.
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

/// The schema, one entry per version: entry `n` takes `user_version` from `n` to `n + 1`.
/// Append only; never edit an entry that has shipped.
const MIGRATIONS: &[&str] = &[
    // v1
    "CREATE TABLE commits (
        sha         TEXT PRIMARY KEY NOT NULL,
        branch      TEXT,
        queued_at   INTEGER NOT NULL,
        status      TEXT NOT NULL CHECK (status IN ('queued', 'running', 'finished')),
        attempts    INTEGER NOT NULL DEFAULT 0,
        finished_at INTEGER,
        result      TEXT CHECK (result IN ('success', 'failure', 'error', 'cancelled')),
        error       TEXT,
        file_synced INTEGER NOT NULL DEFAULT 1
    );
    CREATE INDEX commits_open ON commits (status) WHERE status <> 'finished';
    CREATE INDEX commits_result ON commits (result) WHERE result IS NOT NULL;
    CREATE INDEX commits_branch ON commits (branch) WHERE branch IS NOT NULL;
    CREATE INDEX commits_unsynced ON commits (file_synced) WHERE file_synced = 0;

    CREATE TABLE attempts (
        id         INTEGER PRIMARY KEY,
        uuid       TEXT NOT NULL,
        sha        TEXT NOT NULL REFERENCES commits (sha),
        number     INTEGER NOT NULL,
        runner     TEXT NOT NULL,
        started_at INTEGER NOT NULL,
        ended_at   INTEGER,
        outcome    TEXT NOT NULL
                   CHECK (outcome IN ('running', 'reported', 'failed', 'returned')),
        reason     TEXT
    );
    CREATE INDEX attempts_sha ON attempts (sha);

    CREATE TABLE steps (
        attempt     INTEGER NOT NULL REFERENCES attempts (id),
        position    INTEGER NOT NULL,
        name        TEXT NOT NULL,
        status      TEXT NOT NULL CHECK (status IN ('success', 'failure', 'timeout', 'skipped')),
        exit_code   INTEGER,
        started_at  INTEGER,
        finished_at INTEGER,
        duration_ms INTEGER NOT NULL,
        PRIMARY KEY (attempt, position)
    ) WITHOUT ROWID;
    CREATE INDEX steps_name ON steps (name);

    CREATE TABLE runners (
        address    TEXT PRIMARY KEY NOT NULL,
        first_seen INTEGER NOT NULL,
        last_seen  INTEGER NOT NULL,
        state      TEXT NOT NULL CHECK (state IN ('connected', 'paused', 'gone'))
    ) WITHOUT ROWID;

    CREATE TABLE meta (
        key   TEXT PRIMARY KEY NOT NULL,
        value TEXT NOT NULL
    ) WITHOUT ROWID;",
    // v2: the same CHECK constraints, spelled as `=` chains. SQLite codes `x IN (a, b, c)`
    // with more than two constants as an ephemeral table built on every row written — a
    // b-tree opened, filled and closed per INSERT and UPDATE, a fifth of the core thread's
    // CPU in the capacity bench. The rules are unchanged (NULL passes both spellings), so
    // no stored row changes and the text of the schema is edited in place, the procedure
    // of <https://www.sqlite.org/lang_altertable.html#otheralter>; `migrate` bumps
    // `schema_version` so that every connection reloads it.
    "PRAGMA writable_schema = ON;
    UPDATE sqlite_schema SET sql = replace(replace(sql,
        'status IN (''queued'', ''running'', ''finished'')',
        'status = ''queued'' OR status = ''running'' OR status = ''finished'''),
        'result IN (''success'', ''failure'', ''error'', ''cancelled'')',
        'result = ''success'' OR result = ''failure'' OR result = ''error'' OR result = ''cancelled''')
        WHERE type = 'table' AND name = 'commits';
    UPDATE sqlite_schema SET sql = replace(sql,
        'outcome IN (''running'', ''reported'', ''failed'', ''returned'')',
        'outcome = ''running'' OR outcome = ''reported'' OR outcome = ''failed'' OR outcome = ''returned''')
        WHERE type = 'table' AND name = 'attempts';
    UPDATE sqlite_schema SET sql = replace(sql,
        'status IN (''success'', ''failure'', ''timeout'', ''skipped'')',
        'status = ''success'' OR status = ''failure'' OR status = ''timeout'' OR status = ''skipped''')
        WHERE type = 'table' AND name = 'steps';
    UPDATE sqlite_schema SET sql = replace(sql,
        'state IN (''connected'', ''paused'', ''gone'')',
        'state = ''connected'' OR state = ''paused'' OR state = ''gone''')
        WHERE type = 'table' AND name = 'runners';
    PRAGMA writable_schema = OFF;",
    // v3: finished runs counted per (branch, result), so that the status counts and the
    // totals of `/runs` read a few rows instead of scanning `commits`. Filled here from the
    // rows there, then kept exact by `apply`: an op that finishes a commit counts it
    // (`count`), one that changes a finished commit takes it out first (`uncount`), and
    // the dispatch path pays one upsert per job, when it finishes. Not triggers: a table
    // with an UPDATE trigger makes every statement that updates it keep a statement
    // journal, and that cost the core some 6 µs per job. `branch` '' is a run of an unknown branch. After a hand
    // edit of `commits`, recount with the two statements below.
    "CREATE TABLE run_counts (
        branch TEXT NOT NULL,
        result TEXT NOT NULL,
        n      INTEGER NOT NULL,
        PRIMARY KEY (branch, result)
    ) WITHOUT ROWID;
    DELETE FROM run_counts;
    INSERT INTO run_counts (branch, result, n)
        SELECT coalesce(branch, ''), coalesce(result, ''), count(*) FROM commits
        WHERE status = 'finished' GROUP BY 1, 2;",
];

/// `<results>/.tinyci/tinyci.db`.
pub fn db_path(results_dir: &Path) -> PathBuf {
    results_dir.join(STATE_DIR).join(DB_FILE)
}

fn db(what: &'static str) -> impl FnOnce(rusqlite::Error) -> StoreError {
    move |source| StoreError::Db { what, source }
}

/// The writing side: owned by the dispatcher's core thread.
pub struct SqliteStore {
    conn: Connection,
    staged: Vec<Op>,
    /// Whether the files opened are still where they were.
    watch: super::watch::FileWatch,
    results_dir: PathBuf,
}

impl SqliteStore {
    /// Opens (creating it if need be) the database under `results_dir` and brings its
    /// schema up to date. The caller holds the results directory's lock.
    pub fn open(results_dir: &Path) -> Result<SqliteStore, StoreError> {
        let path = db_path(results_dir);
        let mut conn = Connection::open(&path).map_err(db("opening the database"))?;
        configure(&conn)?;
        migrate(&mut conn)?;
        conn.set_prepared_statement_cache_capacity(64);
        Ok(SqliteStore {
            conn,
            staged: Vec::new(),
            watch: super::watch::FileWatch::new(&path),
            results_dir: results_dir.to_path_buf(),
        })
    }

    /// The connection, for tests and the benchmark that build a history directly.
    #[doc(hidden)]
    pub fn connection(&mut self) -> &mut Connection {
        &mut self.conn
    }

    fn apply_staged(&mut self) -> Result<(), StoreError> {
        let tx = self
            .conn
            .transaction()
            .map_err(db("beginning a transaction"))?;
        for op in &self.staged {
            apply(&tx, op)?;
        }
        tx.commit().map_err(db("committing"))
    }
}

fn configure(conn: &Connection) -> Result<(), StoreError> {
    conn.busy_timeout(BUSY_TIMEOUT)
        .map_err(db("setting the busy timeout"))?;
    let mode: String = conn
        .query_row("PRAGMA journal_mode = WAL", [], |r| r.get(0))
        .map_err(db("switching to WAL"))?;
    if !mode.eq_ignore_ascii_case("wal") {
        return Err(StoreError::Corrupt(format!(
            "the database refused WAL mode (it is in {mode} mode)"
        )));
    }
    conn.execute_batch(
        "PRAGMA synchronous = FULL; PRAGMA foreign_keys = ON; PRAGMA temp_store = MEMORY;
         PRAGMA wal_autocheckpoint = 4000; PRAGMA cache_size = -16384;",
    )
    .map_err(db("configuring the database"))
}

/// Brings the schema to the newest version, each migration in a transaction of its own.
fn migrate(conn: &mut Connection) -> Result<(), StoreError> {
    migrate_to(conn, MIGRATIONS.len())
}

/// Brings the schema to version `target` (tests build older databases with it).
fn migrate_to(conn: &mut Connection, target: usize) -> Result<(), StoreError> {
    let version: i64 = conn
        .query_row("PRAGMA user_version", [], |r| r.get(0))
        .map_err(db("reading the schema version"))?;
    let known = MIGRATIONS.len() as i64;
    if version > known || version < 0 {
        return Err(StoreError::Corrupt(format!(
            "schema version {version}, and this dispatcher knows versions up to {known} (a newer tinyci wrote it?)"
        )));
    }
    for (n, sql) in MIGRATIONS
        .iter()
        .enumerate()
        .take(target)
        .skip(version as usize)
    {
        let tx = conn.transaction().map_err(db("beginning a migration"))?;
        tx.execute_batch(sql).map_err(db("migrating the schema"))?;
        // A migration that edits `sqlite_schema` directly must change the schema cookie
        // itself; after one made of DDL an extra bump only makes connections reparse.
        let cookie: i64 = tx
            .query_row("PRAGMA schema_version", [], |r| r.get(0))
            .map_err(db("reading the schema cookie"))?;
        tx.pragma_update(None, "schema_version", cookie + 1)
            .map_err(db("bumping the schema cookie"))?;
        tx.pragma_update(None, "user_version", n as i64 + 1)
            .map_err(db("recording the schema version"))?;
        tx.commit().map_err(db("committing a migration"))?;
        tracing::info!(version = n + 1, "database schema migrated");
    }
    Ok(())
}

fn apply(tx: &Connection, op: &Op) -> Result<(), StoreError> {
    match op {
        Op::Queued { commit, branch, at } => {
            // No branch is named '' (`run_counts` uses it for "unknown").
            let branch = branch.as_deref().filter(|b| !b.is_empty());
            let args = params![commit.as_str(), branch, ms(*at)];
            let inserted = tx
                .prepare_cached(
                    "INSERT INTO commits (sha, branch, queued_at, status)
                     VALUES (?1, ?2, ?3, 'queued') ON CONFLICT (sha) DO NOTHING",
                )
                .and_then(|mut s| s.execute(args))
                .map_err(db("recording a queued commit"))?;
            if inserted == 0 {
                // Recorded already: a finished commit is queued again (a rerun) and leaves
                // the finished counts; an open one stays as it is.
                uncount(tx, commit)?;
                tx.prepare_cached(
                    "UPDATE commits SET
                         status = 'queued', result = NULL, error = NULL, finished_at = NULL,
                         attempts = 0, file_synced = 1, queued_at = ?3,
                         branch = coalesce(?2, branch)
                     WHERE sha = ?1 AND status = 'finished'",
                )
                .and_then(|mut s| s.execute(args))
                .map_err(db("recording a queued commit"))?;
            }
        }
        Op::Assigned {
            commit,
            job,
            number,
            runner,
            at,
        } => {
            tx.prepare_cached(
                "INSERT INTO attempts (uuid, sha, number, runner, started_at, outcome)
                 VALUES (?1, ?2, ?3, ?4, ?5, 'running')",
            )
            .and_then(|mut s| {
                s.execute(params![
                    job.to_string(),
                    commit.as_str(),
                    number,
                    runner,
                    ms(*at)
                ])
            })
            .map_err(db("recording an assignment"))?;
            tx.prepare_cached(
                "UPDATE commits SET status = 'running', attempts = ?2 WHERE sha = ?1",
            )
            .and_then(|mut s| s.execute(params![commit.as_str(), number]))
            .map_err(db("recording an assignment"))?;
        }
        Op::Adopted {
            commit,
            job,
            runner,
        } => {
            tx.prepare_cached("UPDATE attempts SET runner = ?3 WHERE sha = ?1 AND uuid = ?2")
                .and_then(|mut s| s.execute(params![commit.as_str(), job.to_string(), runner]))
                .map_err(db("recording an adoption"))?;
        }
        Op::Returned {
            commit,
            job,
            failure,
            attempts,
            at,
        } => {
            end_attempt(
                tx,
                commit,
                job,
                *at,
                Outcome::of_failure(failure),
                Some(&failure.reason),
            )?;
            tx.prepare_cached("UPDATE commits SET status = 'queued', attempts = ?2 WHERE sha = ?1")
                .and_then(|mut s| s.execute(params![commit.as_str(), attempts]))
                .map_err(db("recording a requeue"))?;
        }
        Op::Finished { last, run } => {
            match last {
                Some((job, AttemptEnd::Reported)) => {
                    insert_steps(tx, &run.commit, job, &run.steps)?;
                    end_attempt(
                        tx,
                        &run.commit,
                        job,
                        run.finished_at,
                        Outcome::Reported,
                        None,
                    )?;
                }
                Some((job, AttemptEnd::GaveUp(failure))) => end_attempt(
                    tx,
                    &run.commit,
                    job,
                    run.finished_at,
                    Outcome::of_failure(failure),
                    Some(&failure.reason),
                )?,
                None => {}
            }
            finish_commit(tx, run, false)?;
        }
        Op::Imported { run } => {
            // Inserted open, so that `finish_commit` below finishes and counts it like
            // any other (one already recorded is finished, or moved between counts, there).
            tx.prepare_cached(
                "INSERT INTO commits (sha, queued_at, status) VALUES (?1, ?2, 'queued')
                 ON CONFLICT (sha) DO NOTHING",
            )
            .and_then(|mut s| s.execute(params![run.commit.as_str(), ms(run.queued_at)]))
            .map_err(db("importing a run"))?;
            if let Some(runner) = &run.runner {
                // The journal kept only the final attempt of a finished run.
                let job = JobId::new();
                let (outcome, reason) = if run.status == RunStatus::Error && run.steps.is_empty() {
                    (Outcome::Failed, run.error.as_deref())
                } else {
                    (Outcome::Reported, None)
                };
                tx.prepare_cached(
                    "INSERT INTO attempts (uuid, sha, number, runner, started_at, ended_at, outcome, reason)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
                )
                .and_then(|mut s| {
                    s.execute(params![
                        job.to_string(),
                        run.commit.as_str(),
                        run.attempts,
                        runner,
                        ms(run.started_at.unwrap_or(run.queued_at)),
                        ms(run.finished_at),
                        outcome.as_str(),
                        reason
                    ])
                })
                .map_err(db("importing a run"))?;
                insert_steps(tx, &run.commit, &job, &run.steps)?;
            }
            finish_commit(tx, run, true)?;
        }
        Op::Runner { addr, state, at } => {
            tx.prepare_cached(
                "INSERT INTO runners (address, first_seen, last_seen, state) VALUES (?1, ?2, ?2, ?3)
                 ON CONFLICT (address) DO UPDATE SET last_seen = ?2, state = ?3",
            )
            .and_then(|mut s| s.execute(params![addr, ms(*at), runner_state(*state)]))
            .map_err(db("recording a runner"))?;
        }
        Op::FilesDurable { commits } => {
            let mut s = tx
                .prepare_cached("UPDATE commits SET file_synced = 1 WHERE sha = ?1")
                .map_err(db("recording synced result files"))?;
            for c in commits {
                s.execute([c.as_str()])
                    .map_err(db("recording synced result files"))?;
            }
        }
        Op::JournalImported { at } => {
            tx.prepare_cached(
                "INSERT INTO meta (key, value) VALUES ('journal_imported', ?1)
                 ON CONFLICT (key) DO UPDATE SET value = ?1",
            )
            .and_then(|mut s| s.execute([ms(*at).to_string()]))
            .map_err(db("recording the journal import"))?;
        }
    }
    Ok(())
}

/// Takes `commit` out of `run_counts` if it is finished: before an op changes its row.
fn uncount(tx: &Connection, commit: &CommitId) -> Result<(), StoreError> {
    tx.prepare_cached(
        "UPDATE run_counts SET n = n - 1 WHERE (branch, result) =
             (SELECT coalesce(branch, ''), coalesce(result, '') FROM commits
              WHERE sha = ?1 AND status = 'finished')",
    )
    .and_then(|mut s| s.execute([commit.as_str()]))
    .map_err(db("counting runs"))?;
    Ok(())
}

/// Counts `commit` in `run_counts` if it is finished: after an op changed its row.
fn count(tx: &Connection, commit: &CommitId) -> Result<(), StoreError> {
    tx.prepare_cached(
        "INSERT INTO run_counts (branch, result, n)
             SELECT coalesce(branch, ''), coalesce(result, ''), 1 FROM commits
             WHERE sha = ?1 AND status = 'finished'
         ON CONFLICT (branch, result) DO UPDATE SET n = n + 1",
    )
    .and_then(|mut s| s.execute([commit.as_str()]))
    .map_err(db("counting runs"))?;
    Ok(())
}

/// Ends attempt `job` of `commit`, found through the commit's index: attempt ids have
/// none (a random key would cost a page of its index per attempt in every transaction).
fn end_attempt(
    tx: &Connection,
    commit: &CommitId,
    job: &JobId,
    at: SystemTime,
    outcome: Outcome,
    reason: Option<&str>,
) -> Result<(), StoreError> {
    tx.prepare_cached(
        "UPDATE attempts SET ended_at = ?3, outcome = ?4, reason = ?5 WHERE sha = ?1 AND uuid = ?2",
    )
    .and_then(|mut s| {
        s.execute(params![
            commit.as_str(),
            job.to_string(),
            ms(at),
            outcome.as_str(),
            reason
        ])
    })
    .map_err(db("recording the end of an attempt"))?;
    Ok(())
}

fn insert_steps(
    tx: &Connection,
    commit: &CommitId,
    job: &JobId,
    steps: &[StepReport],
) -> Result<(), StoreError> {
    if steps.is_empty() {
        return Ok(());
    }
    let mut s = tx
        .prepare_cached(
            "INSERT OR REPLACE INTO steps (attempt, position, name, status, exit_code, duration_ms)
             SELECT id, ?3, ?4, ?5, ?6, ?7 FROM attempts WHERE sha = ?1 AND uuid = ?2",
        )
        .map_err(db("recording steps"))?;
    let job = job.to_string();
    for (n, step) in steps.iter().enumerate() {
        s.execute(params![
            commit.as_str(),
            job,
            n as i64,
            step.name,
            step_status(step.status),
            step.exit_code,
            i64::try_from(step.duration_ms).unwrap_or(i64::MAX)
        ])
        .map_err(db("recording steps"))?;
    }
    Ok(())
}

/// Records `run` as its commit's result and counts it in `run_counts`: for a commit that
/// was open (every finish of the dispatch path), the update and one upsert.
fn finish_commit(tx: &Connection, run: &Finished, file_synced: bool) -> Result<(), StoreError> {
    let args = params![
        run.commit.as_str(),
        run.attempts,
        ms(run.finished_at),
        run_status(run.status),
        run.error,
        file_synced
    ];
    let changed = tx
        .prepare_cached(
            "UPDATE commits SET status = 'finished', attempts = ?2, finished_at = ?3, result = ?4,
             error = ?5, file_synced = ?6 WHERE sha = ?1 AND status <> 'finished'",
        )
        .and_then(|mut s| s.execute(args))
        .map_err(db("recording a result"))?;
    if changed == 0 {
        // Finished already (a run imported over a recorded one): it moves between counts.
        uncount(tx, &run.commit)?;
        tx.prepare_cached(
            "UPDATE commits SET status = 'finished', attempts = ?2, finished_at = ?3, result = ?4,
             error = ?5, file_synced = ?6 WHERE sha = ?1",
        )
        .and_then(|mut s| s.execute(args))
        .map_err(db("recording a result"))?;
    }
    count(tx, &run.commit)
}

impl Store for SqliteStore {
    fn stage(&mut self, op: Op) {
        self.staged.push(op);
    }

    fn commit(&mut self) -> Result<(), StoreError> {
        if self.staged.is_empty() {
            return Ok(());
        }
        match self.apply_staged() {
            Ok(()) => {
                self.staged.clear();
                Ok(())
            }
            Err(e) => {
                // A failed COMMIT may leave the transaction open (SQLITE_BUSY) or roll it
                // back itself (SQLITE_FULL, IOERR); either way none of it stands.
                if !self.conn.is_autocommit() {
                    let _ = self.conn.execute_batch("ROLLBACK");
                }
                Err(e)
            }
        }
    }

    fn has_staged(&self) -> bool {
        !self.staged.is_empty()
    }

    fn lost(&mut self) -> Option<String> {
        self.watch.lost()
    }

    fn rescue(&mut self) -> Result<PathBuf, StoreError> {
        let (target, _lock) =
            super::watch::rescue_target(&self.results_dir, self.watch.state_dir_is_ours());
        let io = |source| StoreError::Io {
            what: format!("saving the database to {}", target.display()),
            source,
        };
        let path = target
            .to_str()
            .ok_or_else(|| io(std::io::Error::other("the path is not UTF-8")))?;
        // Reads through the files this connection has open, deleted or not.
        self.conn
            .execute("VACUUM INTO ?1", [path])
            .map_err(db("saving a copy of the database (VACUUM INTO)"))?;
        std::fs::File::open(&target)
            .and_then(|f| f.sync_all())
            .map_err(io)?;
        Ok(target)
    }

    fn unfinished(&mut self) -> Result<Vec<Unfinished>, StoreError> {
        let mut out: Vec<Unfinished> = self
            .conn
            .prepare(
                "SELECT sha, queued_at, attempts, branch FROM commits
                 WHERE status <> 'finished' ORDER BY rowid",
            )
            .and_then(|mut s| {
                s.query_map([], |r| {
                    Ok((
                        r.get::<_, String>(0)?,
                        r.get::<_, i64>(1)?,
                        r.get::<_, u32>(2)?,
                        r.get::<_, Option<String>>(3)?,
                    ))
                })?
                .collect::<Result<Vec<_>, _>>()
            })
            .map_err(db("reading the queue"))?
            .into_iter()
            .map(|(sha, queued_at, attempts, branch)| {
                Ok(Unfinished {
                    commit: commit_id(&sha)?,
                    queued_at: time(queued_at),
                    attempts,
                    running: None,
                    failures: Vec::new(),
                    branch,
                })
            })
            .collect::<Result<_, StoreError>>()?;
        let mut attempts = self
            .conn
            .prepare(
                "SELECT uuid, number, runner, started_at, outcome, reason FROM attempts
                 WHERE sha = ?1 ORDER BY id",
            )
            .map_err(db("reading attempts"))?;
        for u in &mut out {
            let rows = attempts
                .query_map([u.commit.as_str()], |r| {
                    Ok((
                        r.get::<_, String>(0)?,
                        r.get::<_, u32>(1)?,
                        r.get::<_, String>(2)?,
                        r.get::<_, i64>(3)?,
                        r.get::<_, String>(4)?,
                        r.get::<_, Option<String>>(5)?,
                    ))
                })
                .and_then(|rows| rows.collect::<Result<Vec<_>, _>>())
                .map_err(db("reading attempts"))?;
            for (uuid, number, runner, started_at, outcome, reason) in rows {
                match outcome_of(&outcome)? {
                    Outcome::Running => {
                        u.running = Some(RunningAttempt {
                            job: job_id(&uuid)?,
                            runner,
                            started_at: time(started_at),
                        })
                    }
                    o @ (Outcome::Failed | Outcome::Returned) => u.failures.push(Failure {
                        attempt: number,
                        runner,
                        reason: reason.unwrap_or_default(),
                        counted: o == Outcome::Failed,
                    }),
                    Outcome::Reported => {
                        return Err(StoreError::Corrupt(format!(
                            "commit {} is unfinished but attempt {uuid} reported a result",
                            u.commit
                        )))
                    }
                }
            }
        }
        Ok(out)
    }

    fn unsynced_results(&mut self) -> Result<Vec<Finished>, StoreError> {
        let shas: Vec<String> = self
            .conn
            .prepare("SELECT sha FROM commits WHERE file_synced = 0 AND status = 'finished'")
            .and_then(|mut s| {
                s.query_map([], |r| r.get(0))?
                    .collect::<Result<Vec<_>, _>>()
            })
            .map_err(db("listing unsynced results"))?;
        let mut out = Vec::with_capacity(shas.len());
        for sha in shas {
            let commit = commit_id(&sha)?;
            match finished_run(&self.conn, &commit)? {
                Some(run) => out.push(run),
                None => {
                    return Err(StoreError::Corrupt(format!(
                        "commit {commit} vanished while being read"
                    )))
                }
            }
        }
        Ok(out)
    }

    fn journal_imported(&mut self) -> Result<bool, StoreError> {
        self.conn
            .prepare_cached("SELECT 1 FROM meta WHERE key = 'journal_imported'")
            .and_then(|mut s| s.exists([]))
            .map_err(db("reading the journal import mark"))
    }

    fn has_history(&mut self) -> Result<bool, StoreError> {
        self.conn
            .prepare_cached("SELECT 1 FROM commits LIMIT 1")
            .and_then(|mut s| s.exists([]))
            .map_err(db("looking for any commit"))
    }

    fn forget_runners(&mut self) -> Result<(), StoreError> {
        self.conn
            .execute(
                "UPDATE runners SET state = 'gone' WHERE state <> 'gone'",
                [],
            )
            .map_err(db("marking runners gone"))?;
        Ok(())
    }
}

/// A finished run as its result file shows it: the commit's row, its last attempt's runner
/// and start, and that attempt's steps. `None` if the commit is not finished.
pub fn finished_run(conn: &Connection, commit: &CommitId) -> Result<Option<Finished>, StoreError> {
    let row = conn
        .prepare_cached(
            "SELECT attempts, queued_at, finished_at, result, error FROM commits
             WHERE sha = ?1 AND status = 'finished'",
        )
        .and_then(|mut s| {
            s.query_row([commit.as_str()], |r| {
                Ok((
                    r.get::<_, u32>(0)?,
                    r.get::<_, i64>(1)?,
                    r.get::<_, Option<i64>>(2)?,
                    r.get::<_, Option<String>>(3)?,
                    r.get::<_, Option<String>>(4)?,
                ))
            })
            .optional()
        })
        .map_err(db("reading a result"))?;
    let Some((attempts, queued_at, finished_at, result, error)) = row else {
        return Ok(None);
    };
    let (Some(finished_at), Some(result)) = (finished_at, result) else {
        return Err(StoreError::Corrupt(format!(
            "commit {commit} is finished without a time or a result"
        )));
    };
    let last = conn
        .prepare_cached(
            "SELECT id, runner, started_at, outcome FROM attempts WHERE sha = ?1
             ORDER BY id DESC LIMIT 1",
        )
        .and_then(|mut s| {
            s.query_row([commit.as_str()], |r| {
                Ok((
                    r.get::<_, i64>(0)?,
                    r.get::<_, String>(1)?,
                    r.get::<_, i64>(2)?,
                    r.get::<_, String>(3)?,
                ))
            })
            .optional()
        })
        .map_err(db("reading a result's attempt"))?;
    let (runner, started_at, steps) = match last {
        Some((id, runner, started_at, outcome)) => {
            let steps = if outcome_of(&outcome)? == Outcome::Reported {
                steps_of(conn, id)?
            } else {
                Vec::new()
            };
            (Some(runner), Some(time(started_at)), steps)
        }
        None => (None, None, Vec::new()),
    };
    Ok(Some(Finished {
        commit: commit.clone(),
        status: run_status_of(&result)?,
        steps,
        runner,
        attempts,
        queued_at: time(queued_at),
        started_at,
        finished_at: time(finished_at),
        error,
    }))
}

fn steps_of(conn: &Connection, attempt: i64) -> Result<Vec<StepReport>, StoreError> {
    let rows = conn
        .prepare_cached(
            "SELECT name, status, exit_code, duration_ms FROM steps WHERE attempt = ?1
             ORDER BY position",
        )
        .and_then(|mut s| {
            s.query_map([attempt], |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    r.get::<_, String>(1)?,
                    r.get::<_, Option<i32>>(2)?,
                    r.get::<_, i64>(3)?,
                ))
            })?
            .collect::<Result<Vec<_>, _>>()
        })
        .map_err(db("reading steps"))?;
    rows.into_iter()
        .map(|(name, status, exit_code, duration_ms)| {
            Ok(StepReport {
                name,
                status: step_status_of(&status)?,
                exit_code,
                duration_ms: u64::try_from(duration_ms).unwrap_or(0),
            })
        })
        .collect()
}

/// The reading side: a read-only connection of its own, for the queries of the client and
/// the HTTP API. Any number may be open while the core writes.
pub struct SqliteReader {
    conn: Connection,
}

impl SqliteReader {
    /// Opens the database under `results_dir` read-only. It must exist (the dispatcher
    /// creates it).
    pub fn open(results_dir: &Path) -> Result<SqliteReader, StoreError> {
        let conn = Connection::open_with_flags(
            db_path(results_dir),
            OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )
        .map_err(db("opening the database to read"))?;
        conn.busy_timeout(BUSY_TIMEOUT)
            .map_err(db("setting the busy timeout"))?;
        let version: i64 = conn
            .query_row("PRAGMA user_version", [], |r| r.get(0))
            .map_err(db("reading the schema version"))?;
        if version != MIGRATIONS.len() as i64 {
            return Err(StoreError::Corrupt(format!(
                "schema version {version}, and this reader reads version {}",
                MIGRATIONS.len()
            )));
        }
        Ok(SqliteReader { conn })
    }
}

/// The columns of a run's summary; the last one lists the steps that failed or timed
/// out in the attempt that reported the result, one per line.
const SUMMARY_COLUMNS: &str = "sha, branch, status, result, attempts, queued_at, finished_at,
    (SELECT group_concat(s.name, char(10)) FROM steps s
     WHERE s.status IN ('failure', 'timeout') AND s.attempt =
         (SELECT max(a.id) FROM attempts a WHERE a.sha = commits.sha AND a.outcome = 'reported'))";

fn summary_of(r: &Row<'_>) -> rusqlite::Result<SummaryRow> {
    Ok(SummaryRow {
        sha: r.get(0)?,
        branch: r.get(1)?,
        status: r.get(2)?,
        result: r.get(3)?,
        attempts: r.get(4)?,
        queued_at: r.get(5)?,
        finished_at: r.get(6)?,
        failed_steps: r.get(7)?,
    })
}

/// A `commits` row as read, before its text is checked.
struct SummaryRow {
    sha: String,
    branch: Option<String>,
    status: String,
    result: Option<String>,
    attempts: u32,
    queued_at: i64,
    finished_at: Option<i64>,
    failed_steps: Option<String>,
}

impl SummaryRow {
    fn parse(self) -> Result<RunSummary, StoreError> {
        let state = match (self.status.as_str(), self.result.as_deref()) {
            ("queued", _) => RunState::Queued,
            ("running", _) => RunState::Running,
            ("finished", Some(r)) => RunState::Done(run_status_of(r)?),
            (s, r) => {
                return Err(StoreError::Corrupt(format!(
                    "commit {} has status {s:?} and result {r:?}",
                    self.sha
                )))
            }
        };
        Ok(RunSummary {
            commit: commit_id(&self.sha)?,
            branch: self.branch,
            state,
            attempts: self.attempts,
            queued_at: time(self.queued_at),
            finished_at: self.finished_at.map(time),
            failed_steps: self
                .failed_steps
                .map(|s| s.split('\n').map(str::to_owned).collect())
                .unwrap_or_default(),
        })
    }
}

impl SqliteReader {
    /// How many runs match `filter` (its limit and offset aside), without scanning the
    /// history: open runs through `commits_open`, finished ones summed from `run_counts`.
    fn total(&self, filter: &RunFilter) -> Result<u64, StoreError> {
        let branch = filter.branch.as_deref();
        let (open, done) = match filter.status {
            Some(RunState::Queued) => (Some("AND status = 'queued'"), None),
            Some(RunState::Running) => (Some("AND status = 'running'"), None),
            Some(RunState::Done(s)) => (None, Some(Some(run_status(s)))),
            None => (Some(""), Some(None)),
        };
        let mut total = 0;
        if let Some(status) = open {
            // `+branch`: the branch's index would walk its every run, finished ones too.
            let sql = format!(
                "SELECT count(*) FROM commits WHERE status <> 'finished' {status}{}",
                if branch.is_some() {
                    " AND +branch = ?1"
                } else {
                    ""
                }
            );
            total += self
                .conn
                .prepare_cached(&sql)
                .and_then(|mut s| match branch {
                    Some(b) => s.query_row([b], |r| r.get::<_, u64>(0)),
                    None => s.query_row([], |r| r.get::<_, u64>(0)),
                })
                .map_err(db("counting open runs"))?;
        }
        if let Some(result) = done {
            let sql = match (result, branch) {
                (None, None) => "SELECT coalesce(sum(n), 0) FROM run_counts",
                (Some(_), None) => "SELECT coalesce(sum(n), 0) FROM run_counts WHERE result = ?1",
                (None, Some(_)) => "SELECT coalesce(sum(n), 0) FROM run_counts WHERE branch = ?1",
                (Some(_), Some(_)) => {
                    "SELECT coalesce(sum(n), 0) FROM run_counts WHERE result = ?1 AND branch = ?2"
                }
            };
            let args: Vec<&str> = result.into_iter().chain(branch).collect();
            total += self
                .conn
                .prepare_cached(sql)
                .and_then(|mut s| {
                    s.query_row(rusqlite::params_from_iter(args), |r| r.get::<_, u64>(0))
                })
                .map_err(db("counting finished runs"))?;
        }
        Ok(total)
    }
}

/// The page query for `filter`, written for the filters actually given so that an index
/// serves both the filter and the `ORDER BY rowid DESC` (no temporary sort, no scan of
/// the history for a filtered page): `?1` is the limit, `?2` the offset, `?3` the branch
/// when there is one (returned beside the text).
fn page_query(filter: &RunFilter) -> (String, Option<&str>) {
    let branch = filter.branch.as_deref();
    let mut terms: Vec<String> = Vec::new();
    match filter.status {
        Some(RunState::Queued) | Some(RunState::Running) => {
            let status = if filter.status == Some(RunState::Queued) {
                "queued"
            } else {
                "running"
            };
            // Through `commits_open`, which holds only the unfinished rows; the branch is
            // checked on them (`+`: not through the branch's index).
            terms.push(format!("status <> 'finished' AND status = '{status}'"));
            if branch.is_some() {
                terms.push("+branch = ?3".into());
            }
        }
        Some(RunState::Done(s)) => {
            terms.push(format!("result = '{}'", run_status(s)));
            if branch.is_some() {
                terms.push("branch = ?3".into());
            }
        }
        None => {
            if branch.is_some() {
                terms.push("branch = ?3".into());
            }
        }
    }
    let filter_sql = if terms.is_empty() {
        String::new()
    } else {
        format!("WHERE {}", terms.join(" AND "))
    };
    (
        format!(
            "SELECT {SUMMARY_COLUMNS} FROM commits {filter_sql} ORDER BY rowid DESC LIMIT ?1 OFFSET ?2"
        ),
        branch,
    )
}

impl History for SqliteReader {
    fn runs(&self, filter: &RunFilter) -> Result<Page<RunSummary>, StoreError> {
        if filter.branch.as_deref() == Some("") {
            // No run is recorded with the branch '' (unknown is NULL).
            return Ok(Page {
                total: 0,
                data: Vec::new(),
            });
        }
        let total = self.total(filter)?;
        let (sql, branch) = page_query(filter);
        let rows = self
            .conn
            .prepare_cached(&sql)
            .and_then(|mut s| {
                let rows = match branch {
                    Some(b) => s.query_map(params![filter.limit, filter.offset, b], summary_of)?,
                    None => s.query_map(params![filter.limit, filter.offset], summary_of)?,
                };
                rows.collect::<Result<Vec<_>, _>>()
            })
            .map_err(db("listing runs"))?;
        Ok(Page {
            total,
            data: rows
                .into_iter()
                .map(SummaryRow::parse)
                .collect::<Result<_, _>>()?,
        })
    }

    fn run(&self, commit: &CommitId) -> Result<Option<RunDetail>, StoreError> {
        let row = self
            .conn
            .prepare_cached(&format!(
                "SELECT {SUMMARY_COLUMNS}, error FROM commits WHERE sha = ?1"
            ))
            .and_then(|mut s| {
                s.query_row([commit.as_str()], |r| Ok((summary_of(r)?, r.get(8)?)))
                    .optional()
            })
            .map_err(db("reading a run"))?;
        let Some((summary, error)) = row else {
            return Ok(None);
        };
        let rows = self
            .conn
            .prepare_cached(
                "SELECT id, uuid, number, runner, started_at, ended_at, outcome, reason
                 FROM attempts WHERE sha = ?1 ORDER BY id",
            )
            .and_then(|mut s| {
                s.query_map([commit.as_str()], |r| {
                    Ok((
                        r.get::<_, i64>(0)?,
                        r.get::<_, String>(1)?,
                        r.get::<_, u32>(2)?,
                        r.get::<_, String>(3)?,
                        r.get::<_, i64>(4)?,
                        r.get::<_, Option<i64>>(5)?,
                        r.get::<_, String>(6)?,
                        r.get::<_, Option<String>>(7)?,
                    ))
                })?
                .collect::<Result<Vec<_>, _>>()
            })
            .map_err(db("reading a run's attempts"))?;
        let mut attempts = Vec::with_capacity(rows.len());
        for (id, uuid, number, runner, started_at, ended_at, outcome, reason) in rows {
            attempts.push(AttemptRecord {
                job: job_id(&uuid)?,
                number,
                runner,
                started_at: time(started_at),
                ended_at: ended_at.map(time),
                outcome: outcome_of(&outcome)?,
                reason,
                steps: steps_of(&self.conn, id)?,
            });
        }
        Ok(Some(RunDetail {
            summary: summary.parse()?,
            error,
            attempts,
        }))
    }

    fn by_prefix(&self, prefix: &str, max: u32) -> Result<Vec<CommitId>, StoreError> {
        // Callers pass lowercase hex only, so the pattern has no other GLOB characters;
        // GLOB with a literal prefix walks the primary key's index.
        let rows = self
            .conn
            .prepare_cached(
                "SELECT sha FROM commits WHERE sha GLOB ?1 || '*' ORDER BY sha LIMIT ?2",
            )
            .and_then(|mut s| {
                s.query_map(params![prefix, max], |r| r.get::<_, String>(0))?
                    .collect::<Result<Vec<_>, _>>()
            })
            .map_err(db("looking up a commit by prefix"))?;
        rows.iter().map(|s| commit_id(s)).collect()
    }

    fn is_recorded(&self, commit: &CommitId) -> Result<bool, StoreError> {
        self.conn
            .prepare_cached("SELECT 1 FROM commits WHERE sha = ?1")
            .and_then(|mut s| s.exists([commit.as_str()]))
            .map_err(db("looking a commit up"))
    }

    fn counts(&self) -> Result<Vec<(RunState, u64)>, StoreError> {
        // The open runs through their partial index (only unfinished rows), the finished
        // ones from `run_counts`: a few rows however long the history.
        let open = self
            .conn
            .prepare_cached(
                "SELECT status, count(*) FROM commits WHERE status <> 'finished'
                 GROUP BY status ORDER BY status",
            )
            .and_then(|mut s| {
                s.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, u64>(1)?)))?
                    .collect::<Result<Vec<_>, _>>()
            })
            .map_err(db("counting open runs"))?;
        let done = self
            .conn
            .prepare_cached(
                "SELECT result, sum(n) FROM run_counts GROUP BY result HAVING sum(n) > 0
                 ORDER BY result",
            )
            .and_then(|mut s| {
                s.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, u64>(1)?)))?
                    .collect::<Result<Vec<_>, _>>()
            })
            .map_err(db("counting finished runs"))?;
        let mut out = Vec::with_capacity(open.len() + done.len());
        for (status, n) in open {
            let state = match status.as_str() {
                "queued" => RunState::Queued,
                "running" => RunState::Running,
                s => return Err(StoreError::Corrupt(format!("commit status {s:?}"))),
            };
            out.push((state, n));
        }
        for (result, n) in done {
            if result.is_empty() {
                return Err(StoreError::Corrupt(format!(
                    "{n} finished commit(s) without a result"
                )));
            }
            out.push((RunState::Done(run_status_of(&result)?), n));
        }
        Ok(out)
    }

    fn queue(&self) -> Result<Vec<RunSummary>, StoreError> {
        let rows = self
            .conn
            .prepare_cached(&format!(
                "SELECT {SUMMARY_COLUMNS} FROM commits WHERE status <> 'finished' ORDER BY rowid"
            ))
            .and_then(|mut s| s.query_map([], summary_of)?.collect::<Result<Vec<_>, _>>())
            .map_err(db("reading the queue"))?;
        rows.into_iter().map(SummaryRow::parse).collect()
    }
}

/// Milliseconds since the epoch (0 for times before it).
pub fn ms(t: SystemTime) -> i64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

/// The time `ms` milliseconds after the epoch (the epoch for negative values).
pub fn time(ms: i64) -> SystemTime {
    UNIX_EPOCH + Duration::from_millis(u64::try_from(ms).unwrap_or(0))
}

fn commit_id(sha: &str) -> Result<CommitId, StoreError> {
    CommitId::parse(sha).map_err(|e| StoreError::Corrupt(format!("commit {sha:?}: {e}")))
}

fn job_id(uuid: &str) -> Result<JobId, StoreError> {
    uuid::Uuid::parse_str(uuid)
        .map(JobId)
        .map_err(|e| StoreError::Corrupt(format!("attempt id {uuid:?}: {e}")))
}

fn outcome_of(s: &str) -> Result<Outcome, StoreError> {
    Ok(match s {
        "running" => Outcome::Running,
        "reported" => Outcome::Reported,
        "failed" => Outcome::Failed,
        "returned" => Outcome::Returned,
        other => return Err(StoreError::Corrupt(format!("attempt outcome {other:?}"))),
    })
}

fn run_status(s: RunStatus) -> &'static str {
    match s {
        RunStatus::Success => "success",
        RunStatus::Failure => "failure",
        RunStatus::Error => "error",
        RunStatus::Cancelled => "cancelled",
    }
}

fn run_status_of(s: &str) -> Result<RunStatus, StoreError> {
    Ok(match s {
        "success" => RunStatus::Success,
        "failure" => RunStatus::Failure,
        "error" => RunStatus::Error,
        "cancelled" => RunStatus::Cancelled,
        other => return Err(StoreError::Corrupt(format!("run result {other:?}"))),
    })
}

fn step_status(s: StepStatus) -> &'static str {
    match s {
        StepStatus::Success => "success",
        StepStatus::Failure => "failure",
        StepStatus::Timeout => "timeout",
        StepStatus::Skipped => "skipped",
    }
}

fn step_status_of(s: &str) -> Result<StepStatus, StoreError> {
    Ok(match s {
        "success" => StepStatus::Success,
        "failure" => StepStatus::Failure,
        "timeout" => StepStatus::Timeout,
        "skipped" => StepStatus::Skipped,
        other => return Err(StoreError::Corrupt(format!("step status {other:?}"))),
    })
}

fn runner_state(s: RunnerState) -> &'static str {
    match s {
        RunnerState::Connected => "connected",
        RunnerState::Paused => "paused",
        RunnerState::Gone => "gone",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checks_hold_without_ephemeral_tables() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join(STATE_DIR)).unwrap();
        let mut store = SqliteStore::open(dir.path()).unwrap();
        let conn = store.connection();
        let schema: Vec<String> = conn
            .prepare("SELECT sql FROM sqlite_schema WHERE type = 'table'")
            .unwrap()
            .query_map([], |r| r.get(0))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        assert!(schema.iter().all(|s| !s.contains(" IN (")), "{schema:?}");
        let integrity: String = conn
            .query_row("PRAGMA integrity_check", [], |r| r.get(0))
            .unwrap();
        assert_eq!(integrity, "ok");
        // The rules still hold…
        conn.execute(
            "INSERT INTO commits (sha, queued_at, status) VALUES ('a', 0, 'queued')",
            [],
        )
        .unwrap();
        for bad in [
            "INSERT INTO commits (sha, queued_at, status) VALUES ('b', 0, 'lost')",
            "UPDATE commits SET result = 'maybe' WHERE sha = 'a'",
            "INSERT INTO attempts (uuid, sha, number, runner, started_at, outcome) VALUES ('u', 'a', 1, 'r', 0, 'odd')",
            "INSERT INTO runners (address, first_seen, last_seen, state) VALUES ('r', 0, 0, 'away')",
        ] {
            assert!(conn.execute(bad, []).is_err(), "{bad}");
        }
        // …with no temporary b-tree per written row.
        let ops: Vec<String> = conn
            .prepare(
                "EXPLAIN UPDATE commits SET status = 'finished', result = 'success' WHERE sha = 'a'",
            )
            .unwrap()
            .query_map([], |r| r.get(1))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        assert!(!ops.iter().any(|o| o == "OpenEphemeral"), "{ops:?}");
    }

    fn c(n: u32) -> CommitId {
        CommitId::parse(&format!("{n:08x}").repeat(5)).unwrap()
    }

    fn at(ms: i64) -> SystemTime {
        time(1_700_000_000_000 + ms)
    }

    fn run(commit: CommitId, status: RunStatus, steps: Vec<StepReport>) -> Finished {
        Finished {
            commit,
            status,
            steps,
            runner: Some("r:1".into()),
            attempts: 1,
            queued_at: at(0),
            started_at: Some(at(5)),
            finished_at: at(900),
            error: None,
        }
    }

    fn step(name: &str, status: StepStatus, exit_code: Option<i32>) -> StepReport {
        StepReport {
            name: name.into(),
            status,
            exit_code,
            duration_ms: 12,
        }
    }

    /// Queues `commit`, hands it to `r:1`, and records `run` as its result.
    fn record(store: &mut SqliteStore, run: &Finished, branch: Option<&str>) -> JobId {
        let job = JobId::new();
        store.stage(Op::Queued {
            commit: run.commit.clone(),
            branch: branch.map(str::to_owned),
            at: run.queued_at,
        });
        store.stage(Op::Assigned {
            commit: run.commit.clone(),
            job,
            number: 1,
            runner: "r:1".into(),
            at: at(5),
        });
        store.stage(Op::Finished {
            last: Some((job, AttemptEnd::Reported)),
            run: run.clone(),
        });
        job
    }

    #[test]
    fn a_run_reads_back_as_it_was_recorded_and_renders_the_same_file() {
        let dir = tempfile::tempdir().unwrap();
        crate::results::prepare_dir(dir.path()).unwrap();
        let mut store = SqliteStore::open(dir.path()).unwrap();
        let r = run(
            c(1),
            RunStatus::Failure,
            vec![
                step("build", StepStatus::Success, Some(0)),
                step("test", StepStatus::Failure, Some(1)),
                step("lint", StepStatus::Skipped, None),
            ],
        );
        record(&mut store, &r, None);
        store.commit().unwrap();
        assert!(!store.has_staged());
        assert_eq!(finished_run(&store.conn, &c(1)).unwrap(), Some(r.clone()));
        assert_eq!(
            crate::results::ResultFile::render(&finished_run(&store.conn, &c(1)).unwrap().unwrap()),
            crate::results::ResultFile::render(&r)
        );
        // Its file is not known to be on disk until the writer says so.
        assert_eq!(store.unsynced_results().unwrap(), vec![r.clone()]);
        store.stage(Op::FilesDurable {
            commits: vec![c(1)],
        });
        store.commit().unwrap();
        assert!(store.unsynced_results().unwrap().is_empty());
        assert!(store.unfinished().unwrap().is_empty());
        let reader = SqliteReader::open(dir.path()).unwrap();
        assert!(reader.is_recorded(&c(1)).unwrap());
        assert!(!reader.is_recorded(&c(2)).unwrap());
        drop(reader);

        // A reopened database has it all (and migrations do not run twice).
        drop(store);
        let again = SqliteStore::open(dir.path()).unwrap();
        assert_eq!(finished_run(&again.conn, &c(1)).unwrap(), Some(r));
        let mode: String = again
            .conn
            .query_row("PRAGMA journal_mode", [], |r| r.get(0))
            .unwrap();
        assert_eq!(mode, "wal");
        let sync: i64 = again
            .conn
            .query_row("PRAGMA synchronous", [], |r| r.get(0))
            .unwrap();
        assert_eq!(sync, 2, "FULL");
    }

    #[test]
    fn the_queue_and_the_attempts_in_flight_are_read_back_in_order() {
        let dir = tempfile::tempdir().unwrap();
        crate::results::prepare_dir(dir.path()).unwrap();
        let mut store = SqliteStore::open(dir.path()).unwrap();
        for n in 1..=4 {
            store.stage(Op::Queued {
                commit: c(n),
                branch: None,
                at: at(n as i64),
            });
        }
        store.commit().unwrap();
        // c(1) finishes; c(2) is running; c(3) failed once (counted) and once (not).
        let j1 = JobId::new();
        store.stage(Op::Assigned {
            commit: c(1),
            job: j1,
            number: 1,
            runner: "a".into(),
            at: at(10),
        });
        store.stage(Op::Finished {
            last: Some((j1, AttemptEnd::Reported)),
            run: run(c(1), RunStatus::Success, Vec::new()),
        });
        let j2 = JobId::new();
        store.stage(Op::Assigned {
            commit: c(2),
            job: j2,
            number: 1,
            runner: "b".into(),
            at: at(11),
        });
        store.stage(Op::Adopted {
            commit: c(2),
            job: j2,
            runner: "b2".into(),
        });
        for (number, counted, attempts) in [(1, true, 1), (2, false, 1)] {
            let job = JobId::new();
            store.stage(Op::Assigned {
                commit: c(3),
                job,
                number,
                runner: "c".into(),
                at: at(12),
            });
            store.stage(Op::Returned {
                commit: c(3),
                job,
                failure: Failure {
                    attempt: number,
                    runner: "c".into(),
                    reason: format!("reason {number}"),
                    counted,
                },
                attempts,
                at: at(13),
            });
        }
        store.commit().unwrap();
        let u = store.unfinished().unwrap();
        let order: Vec<&CommitId> = u.iter().map(|u| &u.commit).collect();
        assert_eq!(order, [&c(2), &c(3), &c(4)]);
        assert_eq!(
            u[0].running,
            Some(RunningAttempt {
                job: j2,
                runner: "b2".into(),
                started_at: at(11)
            })
        );
        assert_eq!(u[0].attempts, 1);
        assert_eq!(u[1].running, None);
        assert_eq!(u[1].attempts, 1);
        let f: Vec<(u32, &str, bool)> = u[1]
            .failures
            .iter()
            .map(|f| (f.attempt, f.reason.as_str(), f.counted))
            .collect();
        assert_eq!(f, [(1, "reason 1", true), (2, "reason 2", false)]);
        assert_eq!(u[2].queued_at, at(4));
    }

    /// The database may not grow from now on: as on a full disk, a commit that needs a
    /// new page fails with SQLITE_FULL.
    fn forbid_growth(store: &SqliteStore) {
        let pages: i64 = store
            .conn
            .query_row("PRAGMA page_count", [], |r| r.get(0))
            .unwrap();
        store
            .conn
            .pragma_update(None, "max_page_count", pages)
            .unwrap();
    }

    /// Room again after [`forbid_growth`].
    fn allow_growth(store: &SqliteStore) {
        store
            .conn
            .pragma_update(None, "max_page_count", 1_000_000)
            .unwrap();
    }

    #[test]
    fn a_full_database_keeps_the_batch_staged_and_applies_it_once_when_there_is_room() {
        let dir = tempfile::tempdir().unwrap();
        crate::results::prepare_dir(dir.path()).unwrap();
        let mut store = SqliteStore::open(dir.path()).unwrap();
        forbid_growth(&store);
        for n in 0..2000 {
            store.stage(Op::Queued {
                commit: c(n),
                branch: Some("main".into()),
                at: at(n as i64),
            });
        }
        let done = run(c(5000), RunStatus::Success, Vec::new());
        record(&mut store, &done, None);
        let e = store.commit().unwrap_err();
        assert!(e.is_transient(), "{e}");
        assert!(e.to_string().contains("full"), "{e}");
        assert!(store.has_staged());
        assert!(store.conn.is_autocommit(), "rolled back");
        let count = |s: &SqliteStore| -> i64 {
            s.conn
                .query_row("SELECT count(*) FROM commits", [], |r| r.get(0))
                .unwrap()
        };
        assert_eq!(count(&store), 0, "nothing of the batch stands");
        // Another failed try, then room.
        assert!(store.commit().is_err());
        allow_growth(&store);
        store.commit().unwrap();
        assert!(!store.has_staged());
        assert_eq!(count(&store), 2001, "every op exactly once");
        let u = store.unfinished().unwrap();
        assert_eq!(u.len(), 2000);
        assert_eq!(
            u[0].branch.as_deref(),
            Some("main"),
            "the branch is read back"
        );
    }

    #[test]
    fn attempts_end_on_their_own_rows_across_a_failed_commit_and_its_retry() {
        let dir = tempfile::tempdir().unwrap();
        crate::results::prepare_dir(dir.path()).unwrap();
        let mut store = SqliteStore::open(dir.path()).unwrap();
        let assign = |store: &mut SqliteStore, n: u32| {
            let job = JobId::new();
            store.stage(Op::Queued {
                commit: c(n),
                branch: None,
                at: at(0),
            });
            store.stage(Op::Assigned {
                commit: c(n),
                job,
                number: 1,
                runner: format!("r:{n}"),
                at: at(5),
            });
            job
        };
        let finish = |store: &mut SqliteStore, n: u32, job: JobId| {
            let steps = vec![step(&format!("step-of-{n}"), StepStatus::Success, Some(0))];
            store.stage(Op::Finished {
                last: Some((job, AttemptEnd::Reported)),
                run: run(c(n), RunStatus::Success, steps),
            });
        };
        let first = assign(&mut store, 1);
        store.commit().unwrap();
        // A batch that fails (the database may not grow) ends the first attempt, records
        // and ends a second and records a third, then is retried whole once there is
        // room.
        forbid_growth(&store);
        finish(&mut store, 1, first);
        for n in 100..2100 {
            store.stage(Op::Queued {
                commit: c(n),
                branch: None,
                at: at(0),
            });
        }
        let second = assign(&mut store, 2);
        finish(&mut store, 2, second);
        let third = assign(&mut store, 3);
        assert!(store.commit().is_err());
        allow_growth(&store);
        store.commit().unwrap();
        // A later batch ends the third, recorded by the retried one.
        finish(&mut store, 3, third);
        store.commit().unwrap();
        let rows: Vec<(String, String, String, Option<i64>, String)> = store
            .conn
            .prepare(
                "SELECT a.uuid, a.sha, a.runner, a.ended_at, s.name FROM attempts a
                 JOIN steps s ON s.attempt = a.id ORDER BY a.runner",
            )
            .unwrap()
            .query_map([], |r| {
                Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?))
            })
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        let expected: Vec<(String, String, String, Option<i64>, String)> =
            [(1, first), (2, second), (3, third)]
                .into_iter()
                .map(|(n, job)| {
                    (
                        job.to_string(),
                        c(n).as_str().to_owned(),
                        format!("r:{n}"),
                        Some(ms(at(900))),
                        format!("step-of-{n}"),
                    )
                })
                .collect();
        assert_eq!(rows, expected);
        let open: i64 = store
            .conn
            .query_row(
                "SELECT count(*) FROM attempts WHERE ended_at IS NULL",
                [],
                |r| r.get(0),
            )
            .unwrap();
        assert_eq!(open, 0);
    }

    #[test]
    fn history_lists_runs_by_status_and_branch_with_pages_and_totals() {
        let dir = tempfile::tempdir().unwrap();
        crate::results::prepare_dir(dir.path()).unwrap();
        let mut store = SqliteStore::open(dir.path()).unwrap();
        let mut jobs = Vec::new();
        for n in 1..=10 {
            let status = if n % 3 == 0 {
                RunStatus::Failure
            } else {
                RunStatus::Success
            };
            let branch = if n <= 5 { "main" } else { "dev" };
            let r = run(
                c(n),
                status,
                vec![step("test", StepStatus::Success, Some(0))],
            );
            jobs.push(record(&mut store, &r, Some(branch)));
        }
        store.stage(Op::Queued {
            commit: c(11),
            branch: None,
            at: at(50),
        });
        store.commit().unwrap();
        let reader = SqliteReader::open(dir.path()).unwrap();

        let failures = reader
            .runs(&RunFilter {
                status: Some(RunState::Done(RunStatus::Failure)),
                limit: 2,
                ..RunFilter::default()
            })
            .unwrap();
        assert_eq!(failures.total, 3);
        let got: Vec<&CommitId> = failures.data.iter().map(|r| &r.commit).collect();
        assert_eq!(got, [&c(9), &c(6)], "newest first, two per page");
        let page2 = reader
            .runs(&RunFilter {
                status: Some(RunState::Done(RunStatus::Failure)),
                limit: 2,
                offset: 2,
                ..RunFilter::default()
            })
            .unwrap();
        assert_eq!(page2.data.len(), 1);
        assert_eq!(page2.data[0].commit, c(3));

        let dev = reader
            .runs(&RunFilter {
                branch: Some("dev".into()),
                limit: 100,
                ..RunFilter::default()
            })
            .unwrap();
        assert_eq!(dev.total, 5);
        assert!(dev.data.iter().all(|r| r.branch.as_deref() == Some("dev")));
        let all = reader
            .runs(&RunFilter {
                limit: 100,
                ..RunFilter::default()
            })
            .unwrap();
        assert_eq!(all.total, 11);
        assert_eq!(all.data[0].state, RunState::Queued);

        let one = reader.run(&c(3)).unwrap().unwrap();
        assert_eq!(one.summary.state, RunState::Done(RunStatus::Failure));
        assert_eq!(one.attempts.len(), 1);
        assert_eq!(one.attempts[0].job, jobs[2]);
        assert_eq!(one.attempts[0].outcome, Outcome::Reported);
        assert_eq!(one.attempts[0].steps[0].name, "test");
        assert!(reader.run(&c(99)).unwrap().is_none());

        let queue = reader.queue().unwrap();
        assert_eq!(queue.len(), 1);
        assert_eq!(queue[0].commit, c(11));
    }

    #[test]
    fn a_damaged_or_newer_database_is_a_clear_error_not_a_panic() {
        let dir = tempfile::tempdir().unwrap();
        crate::results::prepare_dir(dir.path()).unwrap();
        std::fs::write(db_path(dir.path()), vec![b'x'; 8192]).unwrap();
        let e = SqliteStore::open(dir.path()).err().expect("refused");
        assert!(e.to_string().contains("not a database"), "{e}");
        assert!(!e.is_transient());

        let dir = tempfile::tempdir().unwrap();
        crate::results::prepare_dir(dir.path()).unwrap();
        let mut store = SqliteStore::open(dir.path()).unwrap();
        // A row no dispatcher wrote.
        store
            .conn
            .execute(
                "INSERT INTO commits (sha, queued_at, status) VALUES ('../../etc/x', 0, 'queued')",
                [],
            )
            .unwrap();
        let e = store.unfinished().unwrap_err();
        assert!(matches!(e, StoreError::Corrupt(_)), "{e}");
        store.conn.pragma_update(None, "user_version", 99).unwrap();
        drop(store);
        let e = SqliteStore::open(dir.path()).err().expect("refused");
        assert!(e.to_string().contains("schema version 99"), "{e}");
    }

    /// A state in a fixed order, to compare lists of counts.
    fn key(s: RunState) -> String {
        format!("{s:?}")
    }

    fn sorted(mut v: Vec<(RunState, u64)>) -> Vec<(String, u64)> {
        let mut out: Vec<(String, u64)> = v.drain(..).map(|(s, n)| (key(s), n)).collect();
        out.sort();
        out
    }

    /// The counts by brute force, as before `run_counts`: `GROUP BY` over every row.
    fn brute_counts(conn: &Connection) -> Vec<(String, u64)> {
        let rows: Vec<(String, Option<String>, u64)> = conn
            .prepare("SELECT status, result, count(*) FROM commits GROUP BY status, result")
            .unwrap()
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        let mut m = std::collections::BTreeMap::new();
        for (status, result, n) in rows {
            let state = match (status.as_str(), result.as_deref()) {
                ("queued", _) => RunState::Queued,
                ("running", _) => RunState::Running,
                (_, Some(r)) => RunState::Done(run_status_of(r).unwrap()),
                other => panic!("{other:?}"),
            };
            *m.entry(key(state)).or_insert(0) += n;
        }
        m.into_iter().collect()
    }

    /// The brute-force total and page of `filter`: the query `runs` used before.
    fn brute_runs(conn: &Connection, f: &RunFilter) -> (u64, Vec<String>) {
        let (status, result) = match f.status {
            None => (None, None),
            Some(RunState::Queued) => (Some("queued"), None),
            Some(RunState::Running) => (Some("running"), None),
            Some(RunState::Done(s)) => (None, Some(run_status(s))),
        };
        let w = "(?1 IS NULL OR status = ?1) AND (?2 IS NULL OR result = ?2)
             AND (?3 IS NULL OR branch = ?3)";
        let total = conn
            .query_row(
                &format!("SELECT count(*) FROM commits WHERE {w}"),
                params![status, result, f.branch],
                |r| r.get(0),
            )
            .unwrap();
        let page = conn
            .prepare(&format!(
                "SELECT sha FROM commits WHERE {w} ORDER BY rowid DESC LIMIT ?4 OFFSET ?5"
            ))
            .unwrap()
            .query_map(params![status, result, f.branch, f.limit, f.offset], |r| {
                r.get(0)
            })
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        (total, page)
    }

    /// Checks that `run_counts` is exactly what `commits` holds, and that the reader's
    /// counts and the totals and pages of every filter agree with the brute force.
    fn check_counts(store: &mut SqliteStore, reader: &SqliteReader) {
        let conn = store.connection();
        let want: Vec<(String, String, i64)> = conn
            .prepare(
                "SELECT coalesce(branch, ''), result, count(*) FROM commits
                 WHERE status = 'finished' GROUP BY 1, 2 ORDER BY 1, 2",
            )
            .unwrap()
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        let got: Vec<(String, String, i64)> = conn
            .prepare("SELECT branch, result, n FROM run_counts WHERE n <> 0 ORDER BY 1, 2")
            .unwrap()
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        assert_eq!(got, want, "run_counts");
        assert_eq!(sorted(reader.counts().unwrap()), brute_counts(conn));
        let statuses = [
            None,
            Some(RunState::Queued),
            Some(RunState::Running),
            Some(RunState::Done(RunStatus::Success)),
            Some(RunState::Done(RunStatus::Failure)),
            Some(RunState::Done(RunStatus::Error)),
            Some(RunState::Done(RunStatus::Cancelled)),
        ];
        for status in statuses {
            for branch in [None, Some("main"), Some("dev"), Some("gone")] {
                for (limit, offset) in [(3, 0), (2, 3), (500, 0)] {
                    let f = RunFilter {
                        status,
                        branch: branch.map(str::to_owned),
                        limit,
                        offset,
                    };
                    let page = reader.runs(&f).unwrap();
                    let (total, shas) = brute_runs(conn, &f);
                    assert_eq!(page.total, total, "{f:?}");
                    let got: Vec<String> = page
                        .data
                        .iter()
                        .map(|r| r.commit.as_str().to_owned())
                        .collect();
                    assert_eq!(got, shas, "{f:?}");
                }
            }
        }
    }

    fn queued(commit: CommitId, branch: Option<&str>) -> Op {
        Op::Queued {
            commit,
            branch: branch.map(str::to_owned),
            at: at(1),
        }
    }

    #[test]
    fn run_counts_stay_exact_through_finish_rerun_unknown_branch_and_import() {
        let dir = tempfile::tempdir().unwrap();
        crate::results::prepare_dir(dir.path()).unwrap();
        let mut store = SqliteStore::open(dir.path()).unwrap();
        let reader = SqliteReader::open(dir.path()).unwrap();
        let counts = |reader: &SqliteReader| sorted(reader.counts().unwrap());
        let s = |st: RunState, n: u64| (st, n);
        let exp = |v: Vec<(RunState, u64)>| sorted(v);
        let success = RunState::Done(RunStatus::Success);
        let failure = RunState::Done(RunStatus::Failure);

        record(
            &mut store,
            &run(c(1), RunStatus::Success, Vec::new()),
            Some("main"),
        );
        record(&mut store, &run(c(2), RunStatus::Failure, Vec::new()), None);
        store.stage(queued(c(3), Some("dev")));
        store.commit().unwrap();
        assert_eq!(
            counts(&reader),
            exp(vec![s(RunState::Queued, 1), s(failure, 1), s(success, 1)])
        );
        check_counts(&mut store, &reader);

        // A rerun: finished → queued (branch kept) → running → finished otherwise.
        store.stage(queued(c(1), None));
        store.commit().unwrap();
        assert_eq!(
            counts(&reader),
            exp(vec![s(RunState::Queued, 2), s(failure, 1)]),
            "a rerun is no longer counted as finished"
        );
        check_counts(&mut store, &reader);
        record(&mut store, &run(c(1), RunStatus::Failure, Vec::new()), None);
        store.commit().unwrap();
        assert_eq!(
            counts(&reader),
            exp(vec![s(RunState::Queued, 1), s(failure, 2)])
        );
        let main = reader
            .runs(&RunFilter {
                branch: Some("main".into()),
                status: Some(failure),
                limit: 10,
                offset: 0,
            })
            .unwrap();
        assert_eq!(main.total, 1, "the branch was kept");
        check_counts(&mut store, &reader);

        // A run of an unknown branch rerun on a known one moves between branches.
        store.stage(queued(c(2), Some("dev")));
        record(
            &mut store,
            &run(c(2), RunStatus::Success, Vec::new()),
            Some("dev"),
        );
        store.commit().unwrap();
        check_counts(&mut store, &reader);

        // Imports: a new run, and one already finished (its result file wins).
        store.stage(Op::Imported {
            run: run(c(4), RunStatus::Error, Vec::new()),
        });
        store.stage(Op::Imported {
            run: run(c(1), RunStatus::Cancelled, Vec::new()),
        });
        store.commit().unwrap();
        assert_eq!(
            counts(&reader),
            exp(vec![
                s(RunState::Done(RunStatus::Cancelled), 1),
                s(RunState::Done(RunStatus::Error), 1),
                s(RunState::Queued, 1),
                s(success, 1),
            ])
        );
        check_counts(&mut store, &reader);

        // The branch '' is no branch.
        let none = reader
            .runs(&RunFilter {
                branch: Some(String::new()),
                limit: 10,
                ..RunFilter::default()
            })
            .unwrap();
        assert_eq!((none.total, none.data.len()), (0, 0));
    }

    #[test]
    fn a_rolled_back_batch_leaves_the_counts_as_they_were() {
        let dir = tempfile::tempdir().unwrap();
        crate::results::prepare_dir(dir.path()).unwrap();
        let mut store = SqliteStore::open(dir.path()).unwrap();
        let reader = SqliteReader::open(dir.path()).unwrap();
        record(
            &mut store,
            &run(c(1), RunStatus::Success, Vec::new()),
            Some("main"),
        );
        store.commit().unwrap();
        let before = sorted(reader.counts().unwrap());
        // A finish, a rerun and an import, then an op that fails (an attempt of a commit
        // never queued breaks the foreign key): the whole batch is rolled back.
        record(
            &mut store,
            &run(c(2), RunStatus::Failure, Vec::new()),
            Some("dev"),
        );
        store.stage(queued(c(1), None));
        store.stage(Op::Imported {
            run: run(c(3), RunStatus::Error, Vec::new()),
        });
        store.stage(Op::Assigned {
            commit: c(99),
            job: JobId::new(),
            number: 1,
            runner: "r".into(),
            at: at(2),
        });
        assert!(store.commit().is_err());
        assert!(store.connection().is_autocommit(), "rolled back");
        assert_eq!(sorted(reader.counts().unwrap()), before);
        check_counts(&mut store, &reader);
    }

    #[test]
    fn a_v2_database_with_runs_is_counted_by_the_migration() {
        let dir = tempfile::tempdir().unwrap();
        crate::results::prepare_dir(dir.path()).unwrap();
        {
            let mut conn = Connection::open(db_path(dir.path())).unwrap();
            configure(&conn).unwrap();
            migrate_to(&mut conn, 2).unwrap();
            let rows = [
                (c(1), Some("main"), "finished", Some("success")),
                (c(2), None, "finished", Some("failure")),
                (c(3), Some("main"), "finished", Some("success")),
                (c(4), Some("dev"), "finished", Some("error")),
                (c(5), Some("dev"), "queued", None),
                (c(6), None, "running", None),
            ];
            for (sha, branch, status, result) in rows {
                conn.execute(
                    "INSERT INTO commits (sha, branch, queued_at, status, result, finished_at)
                     VALUES (?1, ?2, 0, ?3, ?4, 5)",
                    params![sha.as_str(), branch, status, result],
                )
                .unwrap();
            }
            let v: i64 = conn
                .query_row("PRAGMA user_version", [], |r| r.get(0))
                .unwrap();
            assert_eq!(v, 2);
        }
        let mut store = SqliteStore::open(dir.path()).unwrap();
        let v: i64 = store
            .connection()
            .query_row("PRAGMA user_version", [], |r| r.get(0))
            .unwrap();
        assert_eq!(v, MIGRATIONS.len() as i64);
        let reader = SqliteReader::open(dir.path()).unwrap();
        let s = |st: RunState, n: u64| (key(st), n);
        assert_eq!(
            sorted(reader.counts().unwrap()),
            [
                s(RunState::Done(RunStatus::Error), 1),
                s(RunState::Done(RunStatus::Failure), 1),
                s(RunState::Queued, 1),
                s(RunState::Running, 1),
                s(RunState::Done(RunStatus::Success), 2),
            ]
            .into_iter()
            .collect::<std::collections::BTreeSet<_>>()
            .into_iter()
            .collect::<Vec<_>>()
        );
        check_counts(&mut store, &reader);
        // And the triggers work on the migrated database.
        store.stage(queued(c(1), None));
        store.commit().unwrap();
        check_counts(&mut store, &reader);
    }

    #[test]
    fn counts_and_totals_match_a_brute_force_count_after_random_ops() {
        #[derive(Clone, Copy)]
        enum St {
            New,
            Queued(u32),
            Running(JobId, u32),
            Finished,
        }
        let dir = tempfile::tempdir().unwrap();
        crate::results::prepare_dir(dir.path()).unwrap();
        let mut store = SqliteStore::open(dir.path()).unwrap();
        let reader = SqliteReader::open(dir.path()).unwrap();
        let mut seed: u64 = 0x2545_f491_4f6c_dd1d;
        let mut rand = move |n: u64| {
            seed = seed
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            (seed >> 33) % n
        };
        let branches = [None, Some("main"), Some("dev")];
        let statuses = [
            RunStatus::Success,
            RunStatus::Failure,
            RunStatus::Error,
            RunStatus::Cancelled,
        ];
        let mut st = vec![St::New; 24];
        for step in 0..600 {
            let i = rand(st.len() as u64) as usize;
            let commit = c(i as u32 + 1);
            match (rand(5), st[i]) {
                (0 | 1, St::New | St::Finished) => {
                    store.stage(queued(commit, branches[rand(3) as usize]));
                    st[i] = St::Queued(0);
                }
                (0 | 1, St::Queued(a)) => {
                    let job = JobId::new();
                    store.stage(Op::Assigned {
                        commit,
                        job,
                        number: a + 1,
                        runner: "r".into(),
                        at: at(step),
                    });
                    st[i] = St::Running(job, a + 1);
                }
                (2, St::Running(job, a)) => {
                    store.stage(Op::Returned {
                        commit,
                        job,
                        failure: Failure {
                            attempt: a,
                            runner: "r".into(),
                            reason: "lost".into(),
                            counted: true,
                        },
                        attempts: a,
                        at: at(step),
                    });
                    st[i] = St::Queued(a);
                }
                (2 | 3, St::Queued(_)) => {
                    store.stage(Op::Finished {
                        last: None,
                        run: run(commit, RunStatus::Cancelled, Vec::new()),
                    });
                    st[i] = St::Finished;
                }
                (_, St::Running(job, _)) => {
                    store.stage(Op::Finished {
                        last: Some((job, AttemptEnd::Reported)),
                        run: run(commit, statuses[rand(4) as usize], Vec::new()),
                    });
                    st[i] = St::Finished;
                }
                (4, St::New | St::Finished) => {
                    store.stage(Op::Imported {
                        run: run(commit, statuses[rand(4) as usize], Vec::new()),
                    });
                    st[i] = St::Finished;
                }
                _ => {}
            }
            if rand(8) == 0 {
                store.commit().unwrap();
                check_counts(&mut store, &reader);
            }
        }
        store.commit().unwrap();
        check_counts(&mut store, &reader);
        // Every kind of run is there, so the comparison above meant something.
        assert!(reader.counts().unwrap().len() >= 5, "{:?}", reader.counts());
    }

    #[test]
    fn every_page_query_walks_an_index_and_needs_no_sort() {
        let dir = tempfile::tempdir().unwrap();
        crate::results::prepare_dir(dir.path()).unwrap();
        let mut store = SqliteStore::open(dir.path()).unwrap();
        let conn = store.connection();
        let plan = |sql: &str| -> String {
            let mut stmt = conn.prepare(&format!("EXPLAIN QUERY PLAN {sql}")).unwrap();
            let nulls = vec![rusqlite::types::Null; stmt.parameter_count()];
            stmt.query_map(rusqlite::params_from_iter(nulls), |r| r.get::<_, String>(3))
                .unwrap()
                .collect::<Result<Vec<_>, _>>()
                .unwrap()
                .join("\n")
        };
        for status in [
            None,
            Some(RunState::Queued),
            Some(RunState::Running),
            Some(RunState::Done(RunStatus::Failure)),
        ] {
            for branch in [None, Some("main".to_owned())] {
                let f = RunFilter {
                    status,
                    branch: branch.clone(),
                    limit: 50,
                    offset: 0,
                };
                let (sql, _) = page_query(&f);
                let p = plan(&sql);
                assert!(!p.contains("TEMP B-TREE"), "{f:?}: {p}");
                if status.is_some() || branch.is_some() {
                    assert!(p.contains("SEARCH commits USING INDEX"), "{f:?}: {p}");
                }
                if matches!(status, Some(RunState::Queued | RunState::Running)) {
                    assert!(p.contains("commits_open"), "{f:?}: {p}");
                }
            }
        }
        let p = plan(
            "SELECT status, count(*) FROM commits WHERE status <> 'finished'
             GROUP BY status ORDER BY status",
        );
        assert!(p.contains("COVERING INDEX commits_open"), "{p}");
        let p = plan("SELECT count(*) FROM commits WHERE status <> 'finished' AND status = 'queued' AND +branch = 'x'");
        assert!(p.contains("commits_open"), "{p}");
    }
}
