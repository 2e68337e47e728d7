//! Writes `<sha>.json` files on a thread of its own, so the core never waits on creating a
//! file. It is handed results only after the database holds them durably: if the process
//! dies before a file is written, the next start rewrites it from the database.
//!
//! A file that cannot be written (a full disk) is retried, with backoff, until it is — no
//! restart needed. `result written` is logged once the file is in place, never before.
//!
//! Files are not synced one by one. Once results stop coming for [`SYNC_QUIET`] (and at
//! least every [`SYNC_MAX`] during a long burst) the writer syncs the filesystem once and
//! reports the commits whose files are now durable ([`ResultWriter::durable`]); the core
//! records that, so a restart checks only the files written since. Syncing only in quiet
//! moments keeps the filesystem sync from competing with the database's own fsyncs while
//! results pour in.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::time::{Duration, Instant};

use tinyci_proto::CommitId;
use tracing::{info, warn};

use crate::results::{self, ResultFile};

/// The shortest and the longest wait before a failed result file is tried again.
const RESULT_RETRY_MIN: Duration = Duration::from_millis(100);
const RESULT_RETRY_MAX: Duration = Duration::from_secs(2);

/// Written result files are synced once no new one came for this long…
pub const SYNC_QUIET: Duration = Duration::from_secs(1);
/// …or when the oldest unsynced one is this old.
pub const SYNC_MAX: Duration = Duration::from_secs(30);

/// The writer thread and the channels to and from it.
pub struct ResultWriter {
    tx: Option<Sender<Vec<ResultFile>>>,
    durable: Receiver<Vec<CommitId>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl ResultWriter {
    /// Starts the thread, writing into `dir`.
    pub fn start(dir: PathBuf) -> std::io::Result<ResultWriter> {
        let (tx, rx) = mpsc::channel::<Vec<ResultFile>>();
        let (durable_tx, durable) = mpsc::channel();
        let thread = std::thread::Builder::new()
            .name("result-writer".into())
            .spawn(move || {
                yield_to_the_core();
                write_results_until_written(&dir, &rx, &durable_tx)
            })?;
        Ok(ResultWriter {
            tx: Some(tx),
            durable,
            thread: Some(thread),
        })
    }

    /// Hands results over to be written.
    pub fn write(&self, results: Vec<ResultFile>) {
        if results.is_empty() {
            return;
        }
        if let Some(tx) = &self.tx {
            let _ = tx.send(results);
        }
    }

    /// The commits whose result files were synced since the last call.
    pub fn durable(&self) -> Vec<CommitId> {
        self.durable.try_iter().flatten().collect()
    }
}

/// How much lower than the dispatcher's other threads the writer runs (its nice value).
const WRITER_NICENESS: i32 = 10;

/// Lowers the calling thread's priority by [`WRITER_NICENESS`]. Files are rendered from
/// what the database already holds, so when the CPU is short (a burst of results, or
/// runners sharing the machine) the threads that acknowledge results and hand out work
/// go first and the files trail a little; with a CPU to spare nothing changes. Not
/// starved: a niceness of 10 still gets about a tenth of a busy CPU. Best effort.
///
/// Not `SCHED_IDLE`, though it gave the dispatch bench 6–18 % more jobs/s: with every
/// core busy (runners' steps on the same machine) a `SCHED_IDLE` thread waited about
/// 100 ms to wake and wrote 2.4 files a second, where nice 10 woke within a few ms; the
/// README's performance section has the figures.
fn yield_to_the_core() {
    // SAFETY: gettid(2) and setpriority(2) on the calling thread only (on Linux a nice
    // value belongs to the thread); no pointers are involved.
    let rc = unsafe {
        let tid = libc::gettid();
        libc::setpriority(libc::PRIO_PROCESS, tid as libc::id_t, WRITER_NICENESS)
    };
    if rc != 0 {
        tracing::debug!(error = %std::io::Error::last_os_error(), "cannot lower the result writer's priority");
    }
}

/// The writer's loop: writes what it is handed, keeps what failed and tries it again
/// (backing off to [`RESULT_RETRY_MAX`]) until written or the channel closes; syncs what
/// it wrote (see [`SYNC_QUIET`]) and reports it on `durable`.
fn write_results_until_written(
    dir: &Path,
    rx: &Receiver<Vec<ResultFile>>,
    durable: &Sender<Vec<CommitId>>,
) {
    let mut failed: Vec<ResultFile> = Vec::new();
    // Written, not yet synced; when the first of them and the last were written.
    let mut written: Vec<CommitId> = Vec::new();
    let (mut first_written, mut last_written) = (Instant::now(), Instant::now());
    // Warned about once each, not at every retry.
    let mut warned: HashSet<CommitId> = HashSet::new();
    let mut sync_warned = false;
    let mut delay = RESULT_RETRY_MIN;
    loop {
        let retry = (!failed.is_empty()).then_some(delay);
        let sync_at = (last_written + SYNC_QUIET).min(first_written + SYNC_MAX);
        let sync = (!written.is_empty()).then(|| sync_at.saturating_duration_since(Instant::now()));
        let wait = match (retry, sync) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        let more = match wait {
            None => rx.recv().ok(),
            Some(wait) => match rx.recv_timeout(wait) {
                Ok(batch) => Some(batch),
                Err(RecvTimeoutError::Timeout) => Some(Vec::new()),
                Err(RecvTimeoutError::Disconnected) => None,
            },
        };
        let stopping = more.is_none();
        let retrying = !failed.is_empty();
        let mut todo = std::mem::take(&mut failed);
        todo.extend(more.into_iter().flatten());
        todo.extend(rx.try_iter().flatten());
        for result in todo {
            match results::write_results(dir, std::slice::from_ref(&result)) {
                Ok(()) => {
                    let retried = warned.remove(&result.commit);
                    info!(commit = %result.commit, retried, "result file written");
                    if written.is_empty() {
                        first_written = Instant::now();
                    }
                    last_written = Instant::now();
                    written.push(result.commit);
                }
                Err(e) => {
                    if warned.insert(result.commit.clone()) {
                        warn!(commit = %result.commit, error = %e, "cannot write the result file; it is in the database, and retried until written");
                    }
                    failed.push(result);
                }
            }
        }
        let due = last_written.elapsed() >= SYNC_QUIET || first_written.elapsed() >= SYNC_MAX;
        if !written.is_empty() && (stopping || due) {
            match results::sync_filesystem(dir) {
                Ok(()) => {
                    sync_warned = false;
                    let _ = durable.send(std::mem::take(&mut written));
                }
                // Not an error of any result: the database has them, and a restart
                // rewrites whatever the disk lost.
                Err(e) => {
                    if !sync_warned {
                        sync_warned = true;
                        warn!(error = %e, "cannot sync the result files; retried");
                    }
                    // Not again at once.
                    last_written = Instant::now();
                }
            }
        }
        if stopping {
            if !failed.is_empty() {
                tracing::error!(results = failed.len(), "result files still unwritten at shutdown; they are in the database, and the next start writes them");
            }
            return;
        }
        delay = if failed.is_empty() {
            RESULT_RETRY_MIN
        } else if retrying {
            (delay * 2).min(RESULT_RETRY_MAX)
        } else {
            delay
        };
    }
}

impl Drop for ResultWriter {
    /// Writes everything handed over before the dispatcher stops.
    fn drop(&mut self) {
        self.tx.take();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn result(commit: &CommitId) -> ResultFile {
        ResultFile {
            commit: commit.clone(),
            status: tinyci_proto::RunStatus::Success,
            steps: Vec::new(),
            runner: Some("r:1".into()),
            attempts: 1,
            queued_at: "2026-01-01T00:00:00.000Z".into(),
            started_at: None,
            finished_at: "2026-01-01T00:00:01.000Z".into(),
            error: None,
        }
    }

    #[test]
    fn a_result_file_that_failed_to_write_is_retried_until_written() {
        let dir = tempfile::tempdir().unwrap();
        results::prepare_dir(dir.path()).unwrap();
        let commit = CommitId::parse(&"e".repeat(40)).unwrap();
        // The temp file is /dev/full: the first write fails with ENOSPC (and the failed
        // temp file is removed, as a partial one on a full disk would be).
        let tmp = dir
            .path()
            .join(results::STATE_DIR)
            .join(format!("{commit}.json.tmp"));
        std::os::unix::fs::symlink("/dev/full", &tmp).unwrap();
        let result = result(&commit);
        assert!(results::write_results(dir.path(), std::slice::from_ref(&result)).is_err());
        assert!(!tmp.exists() && !results::json_path(dir.path(), &commit).exists());
        std::os::unix::fs::symlink("/dev/full", &tmp).unwrap();

        let (tx, rx) = mpsc::channel();
        let (durable_tx, durable) = mpsc::channel();
        let d = dir.path().to_owned();
        let writer = std::thread::spawn(move || write_results_until_written(&d, &rx, &durable_tx));
        tx.send(vec![result.clone()]).unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        while results::read_result(dir.path(), &commit).ok().as_ref() != Some(&result) {
            assert!(Instant::now() < deadline, "never written");
            std::thread::sleep(Duration::from_millis(10));
        }
        drop(tx);
        writer.join().unwrap();
        // Written, then synced (at the latest when the writer stops) and reported.
        assert_eq!(durable.try_iter().flatten().collect::<Vec<_>>(), [commit]);
    }

    /// The nice value of each of this process's threads named `name` (field 19 of
    /// `/proc/self/task/<tid>/stat`).
    fn nice_values_of(name: &str) -> Vec<i32> {
        let mut out = Vec::new();
        for task in std::fs::read_dir("/proc/self/task").unwrap().flatten() {
            let comm = std::fs::read_to_string(task.path().join("comm")).unwrap_or_default();
            if comm.trim_end() != name {
                continue;
            }
            let Ok(stat) = std::fs::read_to_string(task.path().join("stat")) else {
                continue; // ended meanwhile
            };
            let after_name = &stat[stat.rfind(')').unwrap() + 1..];
            let fields: Vec<&str> = after_name.split_whitespace().collect();
            out.push(fields[19 - 3].parse().unwrap());
        }
        out
    }

    #[test]
    fn the_writer_thread_runs_below_the_others() {
        let dir = tempfile::tempdir().unwrap();
        results::prepare_dir(dir.path()).unwrap();
        let writer = ResultWriter::start(dir.path().to_owned()).unwrap();
        // The thread lowers itself first thing: wait for it (other tests' writers, in this
        // process too, do the same).
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let nice = nice_values_of("result-writer");
            if !nice.is_empty() && nice.iter().all(|&n| n >= WRITER_NICENESS) {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "result-writer threads at nice {nice:?}, not at {WRITER_NICENESS} or above"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        drop(writer);
    }

    #[test]
    fn written_files_are_reported_durable_once_results_stop_coming() {
        let dir = tempfile::tempdir().unwrap();
        results::prepare_dir(dir.path()).unwrap();
        let writer = ResultWriter::start(dir.path().to_owned()).unwrap();
        let commits: Vec<CommitId> = (1..=3u8)
            .map(|n| CommitId::parse(&format!("{n:02x}").repeat(20)).unwrap())
            .collect();
        writer.write(commits.iter().map(result).collect());
        let deadline = Instant::now() + SYNC_QUIET * 10;
        let mut got = Vec::new();
        while got.len() < commits.len() {
            assert!(Instant::now() < deadline, "not reported durable: {got:?}");
            got.extend(writer.durable());
            std::thread::sleep(Duration::from_millis(20));
        }
        assert_eq!(got, commits);
        for c in &commits {
            assert!(results::json_path(dir.path(), c).exists());
        }
    }
}
