//! The hand-written journal of older dispatchers (one JSON line per event), kept only to
//! import a results directory they wrote: [`read`] replays it into the unfinished commits
//! and the results it recorded, and [`super::recovery::import_journal`] puts those into the
//! database. Nothing writes this format any more.
//!
//! A torn last line — the crash came mid-write — is ignored: the event it described was
//! never acknowledged. A corrupt line elsewhere is an error, not a silent loss.

use std::collections::HashMap;
use std::fs::File;
use std::io::{self, BufRead, BufReader};
use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use tinyci_proto::{CommitId, JobId};

use super::state::Failure;
use crate::results::ResultFile;

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

/// Milliseconds since the epoch.
fn from_ms(ms: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_millis(ms)
}

/// Replays the journal at `path`: the unfinished commits in the order they were queued,
/// and the results it recorded.
pub fn read(path: &Path) -> io::Result<(Vec<Pending>, Vec<ResultFile>)> {
    replay(BufReader::new(File::open(path)?))
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

    /// The journal's lines, as an older dispatcher wrote them.
    fn lines(records: &[Record]) -> Vec<u8> {
        let mut out = Vec::new();
        for r in records {
            out.extend(serde_json::to_vec(r).unwrap());
            out.push(b'\n');
        }
        out
    }

    #[test]
    fn replay_keeps_unfinished_commits_in_order_and_ignores_a_torn_last_line() {
        let job = JobId::new();
        let mut text = lines(&[
            Record::Queued {
                commit: c(1),
                at_ms: 1001,
            },
            Record::Queued {
                commit: c(2),
                at_ms: 1002,
            },
            Record::Queued {
                commit: c(3),
                at_ms: 1003,
            },
            Record::Queued {
                commit: c(4),
                at_ms: 1004,
            },
            Record::Assigned {
                commit: c(1),
                job: JobId::new(),
                attempt: 1,
                runner: "a".into(),
            },
            Record::Finished {
                commit: c(1),
                result: None,
            },
            Record::Assigned {
                commit: c(2),
                job,
                attempt: 1,
                runner: "b".into(),
            },
            Record::Assigned {
                commit: c(3),
                job: JobId::new(),
                attempt: 2,
                runner: "c".into(),
            },
            Record::Requeued { commit: c(3) },
        ]);
        text.extend_from_slice(b"{\"op\":\"queu");
        let (pending, finished) = replay(&text[..]).unwrap();
        assert!(finished.is_empty());
        assert_eq!(pending.len(), 3);
        assert_eq!(pending[0].commit, c(2));
        assert_eq!(pending[0].running, Some((job, "b".into())));
        assert_eq!(pending[1].commit, c(3));
        assert_eq!(pending[1].attempts, 2);
        assert_eq!(pending[1].running, None);
        assert_eq!(pending[2].commit, c(4));
        assert_eq!(pending[2].queued_at, from_ms(1004));
    }

    #[test]
    fn failures_and_uncounted_attempts_are_replayed() {
        let mut records = vec![Record::Queued {
            commit: c(1),
            at_ms: 5,
        }];
        for (attempt, runner, reason, counted) in [
            (1, "a", "checkout failed", true),
            (2, "b", "the runner was stopped", false),
            (2, "b", "the runner was lost (connection closed)", true),
        ] {
            let job = JobId::new();
            records.push(Record::Assigned {
                commit: c(1),
                job,
                attempt,
                runner: runner.into(),
            });
            records.push(Record::Returned {
                commit: c(1),
                job,
                attempt,
                runner: runner.into(),
                reason: reason.into(),
                counted,
            });
        }
        let running = JobId::new();
        records.push(Record::Assigned {
            commit: c(1),
            job: running,
            attempt: 3,
            runner: "c".into(),
        });
        let (pending, _) = replay(&lines(&records)[..]).unwrap();
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
    }

    #[test]
    fn corrupt_middle_line_is_an_error_not_a_silent_loss() {
        let e = replay(&b"garbage\n{\"op\":\"finished\",\"commit\":\"x\"}\n"[..]).unwrap_err();
        assert!(e.to_string().contains("line 1 is corrupt"), "{e}");
    }
}
