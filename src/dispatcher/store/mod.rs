//! The dispatcher's durable record of its work: every commit it accepted, every attempt it
//! handed out and how it ended, every step of every result, every runner it saw.
//!
//! The rest of the dispatcher speaks domain types to it ([`Op`], [`Unfinished`],
//! [`Finished`]) and never SQL: [`Store`] is the one seam where another database
//! (PostgreSQL for a second dispatcher) would replace the SQLite implementation in
//! [`sqlite`].
//!
//! Writes are staged as [`Op`]s and made durable together by [`Store::commit`]: one
//! transaction per batch of the core's events (group commit). A commit that fails (a full
//! disk) is rolled back and its ops stay staged, in order, to be applied again whole by
//! the next [`Store::commit`]; nothing staged is lost and nothing is applied twice.
//!
//! Ownership: the writing side ([`sqlite::SqliteStore`]) is owned by one thread, the
//! store thread ([`thread::StoreThread`]), and used by nothing else, so no database call
//! ever runs on an async worker thread; the core hands it each batch's ops and goes on
//! with the next batch while the transaction commits. Readers (the [`History`] queries, for the client and the HTTP API) open
//! connections of their own, read-only; WAL lets them read while the core writes.

pub mod sqlite;
pub mod thread;
pub mod watch;

use std::time::SystemTime;

use tinyci_proto::{CommitId, JobId, RunStatus, StepReport};

use super::state::{Failure, Finished};

/// Something that changed and must be recorded.
#[derive(Debug, Clone, PartialEq)]
pub enum Op {
    /// A commit was accepted into the queue.
    Queued {
        /// The commit.
        commit: CommitId,
        /// The branch it was reported on, when known.
        branch: Option<String>,
        /// When.
        at: SystemTime,
    },
    /// An attempt was handed to a runner.
    Assigned {
        /// The commit.
        commit: CommitId,
        /// The attempt.
        job: JobId,
        /// Its number as handed out (counted attempts, this one included).
        number: u32,
        /// The runner's address.
        runner: String,
        /// When.
        at: SystemTime,
    },
    /// A runner that registered again took over an attempt it still held.
    Adopted {
        /// The commit.
        commit: CommitId,
        /// The attempt.
        job: JobId,
        /// The adopting runner's address.
        runner: String,
    },
    /// An attempt ended without a result and its commit went back to the queue.
    Returned {
        /// The commit.
        commit: CommitId,
        /// The attempt.
        job: JobId,
        /// What happened.
        failure: Failure,
        /// The commit's counted attempts after this one.
        attempts: u32,
        /// When.
        at: SystemTime,
    },
    /// A commit finished: its runner reported a result, or it was given up.
    Finished {
        /// The attempt that ended it and how.
        last: Option<(JobId, AttemptEnd)>,
        /// The run as its result file shows it.
        run: Finished,
    },
    /// A run finished before this database existed (imported from a journal-era results
    /// directory). Its result file is already on disk.
    Imported {
        /// The run.
        run: Finished,
    },
    /// A runner registered, paused, resumed or went away.
    Runner {
        /// Its address.
        addr: String,
        /// Its state now.
        state: RunnerState,
        /// When.
        at: SystemTime,
    },
    /// These commits' result files are on disk and synced: a restart need not check them.
    FilesDurable {
        /// The commits.
        commits: Vec<CommitId>,
    },
    /// The journal of an older dispatcher was imported (so a second start does not import
    /// it again, even if renaming it failed).
    JournalImported {
        /// When.
        at: SystemTime,
    },
}

/// How the attempt that finished a commit ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AttemptEnd {
    /// Its runner reported the result.
    Reported,
    /// It ended without a result, and that used up the commit's attempts.
    GaveUp(Failure),
}

/// What the database knows of a runner.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RunnerState {
    /// Registered and taking jobs.
    Connected,
    /// Registered but taking no job (origin unreachable, draining).
    Paused,
    /// Its connection ended.
    Gone,
}

/// How an attempt stands: the `outcome` column of `attempts`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Handed out; no result yet.
    Running,
    /// Its runner reported a result (the commit's own success or failure).
    Reported,
    /// Ended without a result in a way that counts towards the maximum attempts.
    Failed,
    /// Handed back without counting (the runner was stopped, or paused).
    Returned,
}

impl Outcome {
    /// The text stored in the database.
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Running => "running",
            Outcome::Reported => "reported",
            Outcome::Failed => "failed",
            Outcome::Returned => "returned",
        }
    }

    /// The outcome of an attempt that ended with `failure`.
    pub fn of_failure(failure: &Failure) -> Outcome {
        if failure.counted {
            Outcome::Failed
        } else {
            Outcome::Returned
        }
    }
}

/// A commit that is queued or running, as a restart finds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unfinished {
    /// The commit.
    pub commit: CommitId,
    /// When it was queued.
    pub queued_at: SystemTime,
    /// Attempts that count so far.
    pub attempts: u32,
    /// The attempt outstanding when the dispatcher stopped.
    pub running: Option<RunningAttempt>,
    /// The attempts that ended without a result, oldest first.
    pub failures: Vec<Failure>,
    /// The branch it was submitted for, if the submitter said.
    pub branch: Option<String>,
}

/// An attempt that was outstanding when the dispatcher stopped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunningAttempt {
    /// The attempt.
    pub job: JobId,
    /// The runner's address.
    pub runner: String,
    /// When it was handed out.
    pub started_at: SystemTime,
}

/// Why the store failed. It says itself whether waiting may help.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The database refused or failed an operation.
    #[error("{what}: {source}{}", busy_hint(source))]
    Db {
        /// What the store was doing.
        what: &'static str,
        /// The database's error.
        #[source]
        source: rusqlite::Error,
    },
    /// The database holds something this dispatcher cannot read (damaged, or written by a
    /// newer version).
    #[error("the database holds what this dispatcher cannot use: {0}")]
    Corrupt(String),
    /// The database's files were deleted, moved or replaced while the dispatcher ran.
    #[error("{0}, under the running dispatcher; it stops, and saves what the open database holds for the next start")]
    Lost(String),
    /// A file beside the database (a journal to import, a result file) failed.
    #[error("{what}: {source}")]
    Io {
        /// What the store was doing.
        what: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

/// What a person should know about a database that stays locked: the dispatcher is its
/// only writer, so someone else holds the lock.
fn busy_hint(source: &rusqlite::Error) -> &'static str {
    match source.sqlite_error_code() {
        Some(rusqlite::ErrorCode::DatabaseBusy | rusqlite::ErrorCode::DatabaseLocked) => {
            " (another program holds the database's write lock, e.g. a `sqlite3` shell inside a transaction; open it with `sqlite3 -readonly`)"
        }
        _ => "",
    }
}

impl StoreError {
    /// Whether the failure may pass by itself (a full disk, a busy lock, an I/O error), so
    /// the operation is worth retrying; otherwise it needs a person.
    pub fn is_transient(&self) -> bool {
        match self {
            StoreError::Db { source, .. } => matches!(
                source.sqlite_error_code(),
                Some(
                    rusqlite::ErrorCode::DiskFull
                        | rusqlite::ErrorCode::SystemIoFailure
                        | rusqlite::ErrorCode::DatabaseBusy
                        | rusqlite::ErrorCode::DatabaseLocked
                        | rusqlite::ErrorCode::OutOfMemory
                        | rusqlite::ErrorCode::CannotOpen
                )
            ),
            StoreError::Corrupt(_) | StoreError::Lost(_) => false,
            StoreError::Io { .. } => true,
        }
    }
}

/// The dispatcher's durable state, written by its core thread alone.
pub trait Store {
    /// Adds `op` to what the next [`Store::commit`] makes durable.
    fn stage(&mut self, op: Op);

    /// Makes every staged op durable, in one transaction. On an error nothing of them is
    /// applied and they all stay staged for the next call.
    fn commit(&mut self) -> Result<(), StoreError>;

    /// Whether ops are staged and not yet durable.
    fn has_staged(&self) -> bool;

    /// The commits that are queued or running, in the order they were queued: by query,
    /// so a restart costs the same however long the history.
    fn unfinished(&mut self) -> Result<Vec<Unfinished>, StoreError>;

    /// Finished runs whose result files may not be on disk yet (recorded since the last
    /// [`Op::FilesDurable`]).
    fn unsynced_results(&mut self) -> Result<Vec<Finished>, StoreError>;

    /// Whether [`Op::JournalImported`] was ever recorded.
    fn journal_imported(&mut self) -> Result<bool, StoreError>;

    /// Marks every runner gone (at start, no runner is connected yet).
    fn forget_runners(&mut self) -> Result<(), StoreError>;

    /// Whether the database holds any commit at all (a new one holds none).
    fn has_history(&mut self) -> Result<bool, StoreError> {
        Ok(true)
    }

    /// What happened to the database's files, if they are no longer the ones opened
    /// (deleted, moved or replaced while the dispatcher runs: see [`watch`]).
    fn lost(&mut self) -> Option<String> {
        None
    }

    /// Copies what the open database holds to where the next start puts it in place
    /// (after [`Store::lost`]); returns where.
    fn rescue(&mut self) -> Result<std::path::PathBuf, StoreError> {
        Err(StoreError::Corrupt(
            "this store cannot save a copy of itself".into(),
        ))
    }
}

/// Which runs [`History::runs`] lists.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RunFilter {
    /// Only runs in this state.
    pub status: Option<RunState>,
    /// Only runs of this branch.
    pub branch: Option<String>,
    /// At most this many (newest first).
    pub limit: u32,
    /// After skipping this many.
    pub offset: u32,
}

/// Where a run stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RunState {
    /// Waiting for a runner.
    Queued,
    /// An attempt is out.
    Running,
    /// Finished with this status.
    Done(RunStatus),
}

/// One line of [`History::runs`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunSummary {
    /// The commit.
    pub commit: CommitId,
    /// Its branch, when known.
    pub branch: Option<String>,
    /// Where it stands.
    pub state: RunState,
    /// Counted attempts so far.
    pub attempts: u32,
    /// When it was queued.
    pub queued_at: SystemTime,
    /// When it finished.
    pub finished_at: Option<SystemTime>,
    /// The steps that failed or timed out in the attempt that reported the result.
    pub failed_steps: Vec<String>,
}

/// A page of runs and how many match in all.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Page<T> {
    /// All the matching rows, not just this page.
    pub total: u64,
    /// This page.
    pub data: Vec<T>,
}

/// One attempt of a run, for [`History::run`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AttemptRecord {
    /// The attempt.
    pub job: JobId,
    /// Its number as handed out.
    pub number: u32,
    /// The runner's address.
    pub runner: String,
    /// When it was handed out.
    pub started_at: SystemTime,
    /// When it ended.
    pub ended_at: Option<SystemTime>,
    /// How it ended.
    pub outcome: Outcome,
    /// Why, when it ended without a result.
    pub reason: Option<String>,
    /// The steps it reported.
    pub steps: Vec<StepReport>,
}

/// One run with all its attempts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunDetail {
    /// The run.
    pub summary: RunSummary,
    /// Why it ended in `error`.
    pub error: Option<String>,
    /// Its attempts, oldest first.
    pub attempts: Vec<AttemptRecord>,
}

/// Read-only questions about the history, answered on a connection of their own.
pub trait History {
    /// Runs, newest first, filtered and paged.
    fn runs(&self, filter: &RunFilter) -> Result<Page<RunSummary>, StoreError>;
    /// One run with its attempts and steps.
    fn run(&self, commit: &CommitId) -> Result<Option<RunDetail>, StoreError>;
    /// The commits waiting or running, in queue order.
    fn queue(&self) -> Result<Vec<RunSummary>, StoreError>;
    /// Up to `max` commits whose id starts with `prefix` (lowercase hex), in id order.
    fn by_prefix(&self, prefix: &str, max: u32) -> Result<Vec<CommitId>, StoreError>;
    /// Whether the commit was ever accepted (queued, running or finished).
    fn is_recorded(&self, commit: &CommitId) -> Result<bool, StoreError>;
    /// How many runs are in each state.
    fn counts(&self) -> Result<Vec<(RunState, u64)>, StoreError>;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn db_error(code: std::os::raw::c_int) -> StoreError {
        StoreError::Db {
            what: "committing",
            source: rusqlite::Error::SqliteFailure(rusqlite::ffi::Error::new(code), None),
        }
    }

    #[test]
    fn a_locked_database_says_who_may_hold_the_lock() {
        let busy = db_error(rusqlite::ffi::SQLITE_BUSY).to_string();
        assert!(busy.starts_with("committing: "), "{busy}");
        assert!(busy.contains("sqlite3 -readonly"), "{busy}");
        assert!(db_error(rusqlite::ffi::SQLITE_BUSY).is_transient());
        let full = db_error(rusqlite::ffi::SQLITE_FULL).to_string();
        assert!(!full.contains("write lock"), "{full}");
    }
}
