//! The dispatcher's append-only journal: one JSON line per event that must survive a
//! `kill -9` (a commit queued, an attempt assigned, an attempt that ended without a result
//! and why, a commit finished).
//!
//! A commit is acknowledged to the observer only after its `queued` line is fsync'd; the
//! core loop groups all the events of one batch behind a single fsync. On start the journal
//! is replayed and rewritten with only the live commits (so it does not grow across
//! restarts). A torn last line — the crash came mid-write — is ignored: the event it
//! described was never acknowledged.
//!
//! Write failures (a full disk, an I/O error) are never fatal and never lose a record:
//! appended records stay in memory until a sync has made them durable. A failed write is
//! continued where it stopped; after a failed fsync — when the kernel may have dropped the
//! pages it could not write — the file is cut back to its last durable length and every
//! record since is written again. The caller sees the error, refuses what needs durability
//! (new submissions) while it lasts, and retries.

use std::collections::HashMap;
use std::fs::{self, File, OpenOptions};
use std::io::{self, BufRead, BufReader, Write};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use tinyci_proto::{CommitId, JobId};

use super::state::Failure;
use crate::results::{self, ResultFile, STATE_DIR};

/// One line of the journal.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "lowercase")]
pub enum Record {
    /// A commit was accepted into the queue.
    Queued {
        /// The commit.
        commit: CommitId,
        /// Milliseconds since the epoch.
        at_ms: u64,
    },
    /// An attempt was handed to a runner.
    Assigned {
        /// The commit.
        commit: CommitId,
        /// The attempt.
        job: JobId,
        /// 1 for the first attempt.
        attempt: u32,
        /// The runner's address.
        runner: String,
    },
    /// A commit's attempt was lost and the commit requeued (written by earlier versions;
    /// now [`Record::Returned`] says why).
    Requeued {
        /// The commit.
        commit: CommitId,
    },
    /// A commit's attempt ended without a result (its runner handed it back, stopped or
    /// was lost) and the commit went back to the queue.
    Returned {
        /// The commit.
        commit: CommitId,
        /// The attempt.
        job: JobId,
        /// Its number when it was handed out.
        attempt: u32,
        /// The runner's address.
        runner: String,
        /// What happened.
        reason: String,
        /// Whether it counts towards the maximum number of attempts.
        counted: bool,
    },
    /// A commit's result file is written. The record carries the whole result: result
    /// files are not synced one by one, so after a power cut the journal is what restores
    /// them (see [`Journal::open`]).
    Finished {
        /// The commit.
        commit: CommitId,
        /// The result as written to `<sha>.json`.
        #[serde(default)]
        result: Option<Box<ResultFile>>,
    },
}

/// The state of one unfinished commit, rebuilt from the journal.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pending {
    /// The commit.
    pub commit: CommitId,
    /// When it was queued.
    pub queued_at: SystemTime,
    /// Attempts that count so far.
    pub attempts: u32,
    /// The attempt outstanding when the journal ended: (job, runner address).
    pub running: Option<(JobId, String)>,
    /// The attempts that ended without a result, oldest first.
    pub failures: Vec<Failure>,
}

/// The open journal file.
pub struct Journal {
    file: File,
    /// The length of the file known to be durable (synced).
    durable_len: u64,
    /// Records appended since `durable_len`, as they go to the file.
    pending: Vec<u8>,
    /// How much of `pending` is in the file (after `durable_len`).
    written: usize,
    /// The last sync failed: the file after `durable_len` cannot be trusted, and is cut
    /// back and written again before the next sync.
    rewrite: bool,
}

/// Milliseconds since the epoch.
pub fn to_ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

fn from_ms(ms: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_millis(ms)
}

impl Journal {
    /// Opens the journal under `results_dir` and recovers from whatever stopped the last
    /// dispatcher:
    ///
    /// 1. replays it into the unfinished commits, in queue order;
    /// 2. rewrites any result file the journal has but the disk lost or tore (a power cut
    ///    before the unsynced file reached the disk), and counts as finished a pending
    ///    commit whose result file is whole (the crash came between the file and its
    ///    journal line) — a torn one is removed and the commit runs again;
    /// 3. syncs the filesystem, so every result the old journal vouched for is durable;
    /// 4. only then rewrites the journal with just the unfinished commits.
    pub fn open(results_dir: &Path) -> io::Result<(Journal, Vec<Pending>)> {
        let path = results_dir.join(STATE_DIR).join("journal");
        let (mut pending, finished) = match File::open(&path) {
            Ok(f) => replay(BufReader::new(f))?,
            Err(e) if e.kind() == io::ErrorKind::NotFound => (Vec::new(), Vec::new()),
            Err(e) => return Err(e),
        };
        let mut restored = 0;
        for r in &finished {
            if results::read_result(results_dir, &r.commit).ok().as_ref() != Some(r) {
                results::write_results(results_dir, std::slice::from_ref(r))?;
                restored += 1;
            }
        }
        if restored > 0 {
            tracing::warn!(restored, "result files restored from the journal");
        }
        let (mut torn, mut whole) = (0, 0);
        pending.retain(|p| match results::read_result(results_dir, &p.commit) {
            Ok(_) => {
                whole += 1;
                false
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => true,
            Err(_) => {
                torn += 1;
                let _ = fs::remove_file(results::json_path(results_dir, &p.commit));
                true
            }
        });
        if torn > 0 {
            tracing::warn!(torn, "torn result files removed; their commits run again");
        }
        // Result files the old journal vouched for (or that stand in for its missing lines)
        // may not be on disk yet; they must be before the journal forgets them. syncfs
        // flushes the whole filesystem, so it is skipped when there is nothing to protect.
        if !finished.is_empty() || whole > 0 || torn > 0 {
            results::sync_filesystem(results_dir)?;
        }

        // Compact: write the live state to a new file and swap it in atomically.
        let tmp = path.with_extension("tmp");
        {
            let mut w = io::BufWriter::new(File::create(&tmp)?);
            for p in &pending {
                for rec in records_of(p) {
                    write_line(&mut w, &rec)?;
                }
            }
            w.into_inner().map_err(|e| e.into_error())?.sync_all()?;
        }
        fs::rename(&tmp, &path)?;
        File::open(path.parent().unwrap_or(results_dir))?.sync_all()?;
        let file = OpenOptions::new().read(true).write(true).open(&path)?;
        Ok((Journal::over(file)?, pending))
    }

    /// A journal appending to `file`, whose current content is durable.
    fn over(file: File) -> io::Result<Journal> {
        let durable_len = file.metadata()?.len();
        Ok(Journal {
            file,
            durable_len,
            pending: Vec::with_capacity(1 << 16),
            written: 0,
            rewrite: false,
        })
    }

    /// Appends a record in memory (durable only after [`Journal::sync`]). Fails only if
    /// the record cannot be encoded; a full disk shows at [`Journal::flush`] or
    /// [`Journal::sync`], and the record is kept until it is written.
    pub fn append(&mut self, rec: &Record) -> io::Result<()> {
        write_line(&mut self.pending, rec)
    }

    /// Hands every appended record to the kernel (no fsync): it then survives a crash of
    /// the process, though not a power cut. For records whose loss would only cost a rerun.
    /// On an error, what was not written stays pending and the next call continues.
    pub fn flush(&mut self) -> io::Result<()> {
        if self.rewrite {
            // The last fsync failed: what follows the durable part may be gone.
            self.file.set_len(self.durable_len)?;
            self.written = 0;
            self.rewrite = false;
        }
        while self.written < self.pending.len() {
            let at = self.durable_len + self.written as u64;
            match self.file.write_at(&self.pending[self.written..], at) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => self.written += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// Makes every appended record durable. On an error nothing is lost: the records stay
    /// pending, and the next call writes them again (all of them, after a failed fsync).
    pub fn sync(&mut self) -> io::Result<()> {
        if self.pending.is_empty() && !self.rewrite {
            return Ok(());
        }
        self.flush()?;
        if let Err(e) = self.file.sync_data() {
            self.rewrite = true;
            return Err(e);
        }
        self.durable_len += self.pending.len() as u64;
        self.pending.clear();
        self.written = 0;
        Ok(())
    }

    /// Whether records are waiting to be made durable.
    pub fn has_pending(&self) -> bool {
        !self.pending.is_empty() || self.rewrite
    }
}

fn write_line(w: &mut impl Write, rec: &Record) -> io::Result<()> {
    let mut line = serde_json::to_vec(rec).map_err(io::Error::other)?;
    line.push(b'\n');
    w.write_all(&line)
}

fn records_of(p: &Pending) -> Vec<Record> {
    let mut v = vec![Record::Queued {
        commit: p.commit.clone(),
        at_ms: to_ms(p.queued_at),
    }];
    // Each failure as the assignment and the return it replays from.
    let mut attempts = 0;
    for f in &p.failures {
        let job = JobId::new();
        v.push(Record::Assigned {
            commit: p.commit.clone(),
            job,
            attempt: f.attempt,
            runner: f.runner.clone(),
        });
        v.push(Record::Returned {
            commit: p.commit.clone(),
            job,
            attempt: f.attempt,
            runner: f.runner.clone(),
            reason: f.reason.clone(),
            counted: f.counted,
        });
        attempts = counted_after(f.attempt, f.counted);
    }
    match &p.running {
        Some((job, runner)) => v.push(Record::Assigned {
            commit: p.commit.clone(),
            job: *job,
            attempt: p.attempts,
            runner: runner.clone(),
        }),
        None if p.attempts != attempts => {
            // Attempts lost before failures were journaled: keep the count.
            v.push(Record::Assigned {
                commit: p.commit.clone(),
                job: JobId::new(),
                attempt: p.attempts,
                runner: String::new(),
            });
            v.push(Record::Requeued {
                commit: p.commit.clone(),
            });
        }
        None => {}
    }
    v
}

/// The counted attempts after attempt number `attempt` ended without a result.
fn counted_after(attempt: u32, counted: bool) -> u32 {
    if counted {
        attempt
    } else {
        attempt.saturating_sub(1)
    }
}

/// Rebuilds the unfinished commits, in the order they were queued, and the results the
/// journal recorded.
fn replay(r: impl BufRead) -> io::Result<(Vec<Pending>, Vec<ResultFile>)> {
    let mut order: Vec<CommitId> = Vec::new();
    let mut live: HashMap<CommitId, Pending> = HashMap::new();
    let mut finished: HashMap<CommitId, ResultFile> = HashMap::new();
    let mut lines = r.split(b'\n').peekable();
    let mut n = 0usize;
    while let Some(line) = lines.next() {
        let line = line?;
        n += 1;
        let rec: Record = match serde_json::from_slice(&line) {
            Ok(rec) => rec,
            Err(e) if lines.peek().is_none() => {
                tracing::warn!(line = n, error = %e, "ignoring torn last journal line");
                break;
            }
            Err(e) => {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("journal line {n} is corrupt: {e}"),
                ))
            }
        };
        match rec {
            Record::Queued { commit, at_ms } => {
                if !live.contains_key(&commit) {
                    order.push(commit.clone());
                    live.insert(
                        commit.clone(),
                        Pending {
                            commit,
                            queued_at: from_ms(at_ms),
                            attempts: 0,
                            running: None,
                            failures: Vec::new(),
                        },
                    );
                }
            }
            Record::Assigned {
                commit,
                job,
                attempt,
                runner,
            } => {
                if let Some(p) = live.get_mut(&commit) {
                    p.attempts = attempt;
                    p.running = Some((job, runner));
                }
            }
            Record::Requeued { commit } => {
                if let Some(p) = live.get_mut(&commit) {
                    p.running = None;
                }
            }
            Record::Returned {
                commit,
                job: _,
                attempt,
                runner,
                reason,
                counted,
            } => {
                if let Some(p) = live.get_mut(&commit) {
                    p.running = None;
                    p.attempts = counted_after(attempt, counted);
                    p.failures.push(Failure {
                        attempt,
                        runner,
                        reason,
                        counted,
                    });
                }
            }
            Record::Finished { commit, result } => {
                live.remove(&commit);
                if let Some(r) = result {
                    finished.insert(commit, *r);
                }
            }
        }
    }
    let pending = order.into_iter().filter_map(|c| live.remove(&c)).collect();
    Ok((pending, finished.into_values().collect()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn c(n: u8) -> CommitId {
        CommitId::parse(&format!("{n:02x}").repeat(20)).unwrap()
    }

    #[test]
    fn replay_keeps_unfinished_commits_in_order_and_compacts() {
        let dir = tempfile::tempdir().unwrap();
        fs::create_dir_all(dir.path().join(STATE_DIR)).unwrap();
        let job = JobId::new();
        {
            let (mut j, pending) = Journal::open(dir.path()).unwrap();
            assert!(pending.is_empty());
            for n in 1..=4 {
                j.append(&Record::Queued {
                    commit: c(n),
                    at_ms: 1000 + n as u64,
                })
                .unwrap();
            }
            j.append(&Record::Assigned {
                commit: c(1),
                job: JobId::new(),
                attempt: 1,
                runner: "a".into(),
            })
            .unwrap();
            j.append(&Record::Finished {
                commit: c(1),
                result: None,
            })
            .unwrap();
            j.append(&Record::Assigned {
                commit: c(2),
                job,
                attempt: 1,
                runner: "b".into(),
            })
            .unwrap();
            j.append(&Record::Assigned {
                commit: c(3),
                job: JobId::new(),
                attempt: 2,
                runner: "c".into(),
            })
            .unwrap();
            j.append(&Record::Requeued { commit: c(3) }).unwrap();
            j.sync().unwrap();
        }
        // A crash mid-write leaves a torn line.
        let path = dir.path().join(STATE_DIR).join("journal");
        let mut f = OpenOptions::new().append(true).open(&path).unwrap();
        f.write_all(b"{\"op\":\"queu").unwrap();
        drop(f);

        let check = |pending: &[Pending]| {
            assert_eq!(pending.len(), 3);
            assert_eq!(pending[0].commit, c(2));
            assert_eq!(pending[0].running, Some((job, "b".into())));
            assert_eq!(pending[1].commit, c(3));
            assert_eq!(pending[1].attempts, 2);
            assert_eq!(pending[1].running, None);
            assert_eq!(pending[2].commit, c(4));
            assert_eq!(pending[2].queued_at, from_ms(1004));
        };
        let (_, pending) = Journal::open(dir.path()).unwrap();
        check(&pending);
        // The compacted journal replays to the same state.
        let (_, again) = Journal::open(dir.path()).unwrap();
        check(&again);
    }

    fn result(commit: CommitId) -> ResultFile {
        ResultFile {
            commit,
            status: tinyci_proto::RunStatus::Success,
            steps: Vec::new(),
            runner: Some("r".into()),
            attempts: 1,
            queued_at: "2026-01-01T00:00:00.000Z".into(),
            started_at: None,
            finished_at: "2026-01-01T00:00:01.000Z".into(),
            error: None,
        }
    }

    #[test]
    fn results_lost_or_torn_by_a_power_cut_are_repaired_from_the_journal() {
        let dir = tempfile::tempdir().unwrap();
        fs::create_dir_all(dir.path().join(STATE_DIR)).unwrap();
        {
            let (mut j, _) = Journal::open(dir.path()).unwrap();
            for n in 1..=3 {
                j.append(&Record::Queued {
                    commit: c(n),
                    at_ms: 1,
                })
                .unwrap();
            }
            // c(1) finished and journaled, but its file never reached the disk.
            j.append(&Record::Finished {
                commit: c(1),
                result: Some(Box::new(result(c(1)))),
            })
            .unwrap();
            j.sync().unwrap();
        }
        // c(2): whole file, journal line lost. c(3): torn file, journal line lost.
        results::write_results(dir.path(), &[result(c(2))]).unwrap();
        fs::write(results::json_path(dir.path(), &c(3)), b"").unwrap();

        let (_, pending) = Journal::open(dir.path()).unwrap();
        assert_eq!(
            results::read_result(dir.path(), &c(1)).unwrap(),
            result(c(1))
        );
        assert_eq!(pending.len(), 1, "only the torn one runs again");
        assert_eq!(pending[0].commit, c(3));
        assert!(!results::json_path(dir.path(), &c(3)).exists());
    }

    /// The journal file as a real file, whatever the journal was writing to before.
    fn swap_to_real_file(j: &mut Journal, dir: &Path) -> std::path::PathBuf {
        let path = dir.join("journal-after");
        j.file = OpenOptions::new()
            .create(true)
            .read(true)
            .write(true)
            .truncate(true)
            .open(&path)
            .unwrap();
        j.durable_len = 0;
        path
    }

    fn replayed(path: &Path) -> Vec<Pending> {
        replay(BufReader::new(File::open(path).unwrap())).unwrap().0
    }

    #[test]
    fn a_full_disk_loses_no_record_and_the_retry_writes_each_once() {
        let dir = tempfile::tempdir().unwrap();
        // Every write to /dev/full fails with ENOSPC.
        let full = OpenOptions::new().write(true).open("/dev/full").unwrap();
        let mut j = Journal::over(full).unwrap();
        j.durable_len = 0;
        for n in 1..=3 {
            j.append(&Record::Queued {
                commit: c(n),
                at_ms: 1,
            })
            .unwrap();
        }
        let e = j.sync().unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::ENOSPC), "{e}");
        assert!(j.has_pending());
        assert!(j.flush().is_err(), "still full");
        j.append(&Record::Queued {
            commit: c(4),
            at_ms: 1,
        })
        .unwrap();
        // Space comes back.
        let path = swap_to_real_file(&mut j, dir.path());
        j.sync().unwrap();
        assert!(!j.has_pending());
        let got: Vec<_> = replayed(&path).into_iter().map(|p| p.commit).collect();
        assert_eq!(got, vec![c(1), c(2), c(3), c(4)]);
    }

    #[test]
    fn after_a_failed_fsync_everything_since_the_last_good_one_is_written_again() {
        let dir = tempfile::tempdir().unwrap();
        // Writes to /dev/null succeed, and fsync on it fails (EINVAL): as on a disk whose
        // writeback failed, the written pages cannot be trusted.
        let null = OpenOptions::new().write(true).open("/dev/null").unwrap();
        let mut j = Journal::over(null).unwrap();
        j.append(&Record::Queued {
            commit: c(1),
            at_ms: 1,
        })
        .unwrap();
        j.flush().unwrap();
        assert!(j.sync().is_err());
        assert!(j.has_pending());
        j.append(&Record::Queued {
            commit: c(2),
            at_ms: 1,
        })
        .unwrap();
        let path = swap_to_real_file(&mut j, dir.path());
        // What the failed attempt left after the durable part is cut away first.
        std::fs::write(&path, b"{\"op\":\"queued\",\"commit\":\"gar").unwrap();
        j.sync().unwrap();
        let got: Vec<_> = replayed(&path).into_iter().map(|p| p.commit).collect();
        assert_eq!(got, vec![c(1), c(2)], "each record exactly once");
    }

    #[test]
    fn corrupt_middle_line_is_an_error_not_a_silent_loss() {
        let dir = tempfile::tempdir().unwrap();
        fs::create_dir_all(dir.path().join(STATE_DIR)).unwrap();
        let path = dir.path().join(STATE_DIR).join("journal");
        fs::write(&path, "garbage\n{\"op\":\"finished\",\"commit\":\"x\"}\n").unwrap();
        let e = Journal::open(dir.path()).err().unwrap();
        assert!(e.to_string().contains("line 1 is corrupt"), "{e}");
    }

    #[test]
    fn failures_and_uncounted_attempts_survive_replay_and_compaction() {
        let dir = tempfile::tempdir().unwrap();
        fs::create_dir_all(dir.path().join(STATE_DIR)).unwrap();
        let running = JobId::new();
        {
            let (mut j, _) = Journal::open(dir.path()).unwrap();
            j.append(&Record::Queued {
                commit: c(1),
                at_ms: 5,
            })
            .unwrap();
            let returned = [
                (1, "a", "checkout failed", true),
                (2, "b", "the runner was stopped", false),
                (2, "b", "the runner was lost (connection closed)", true),
            ];
            for (attempt, runner, reason, counted) in returned {
                let job = JobId::new();
                j.append(&Record::Assigned {
                    commit: c(1),
                    job,
                    attempt,
                    runner: runner.into(),
                })
                .unwrap();
                j.append(&Record::Returned {
                    commit: c(1),
                    job,
                    attempt,
                    runner: runner.into(),
                    reason: reason.into(),
                    counted,
                })
                .unwrap();
            }
            j.append(&Record::Assigned {
                commit: c(1),
                job: running,
                attempt: 3,
                runner: "c".into(),
            })
            .unwrap();
            j.sync().unwrap();
        }
        let check = |pending: &[Pending]| {
            assert_eq!(pending.len(), 1);
            let p = &pending[0];
            assert_eq!(p.attempts, 3);
            assert_eq!(p.running, Some((running, "c".into())));
            let reasons: Vec<(&str, bool)> = p
                .failures
                .iter()
                .map(|f| (f.reason.as_str(), f.counted))
                .collect();
            assert_eq!(
                reasons,
                [
                    ("checkout failed", true),
                    ("the runner was stopped", false),
                    ("the runner was lost (connection closed)", true)
                ]
            );
        };
        let (_, pending) = Journal::open(dir.path()).unwrap();
        check(&pending);
        let (_, again) = Journal::open(dir.path()).unwrap();
        check(&again);
    }
}
