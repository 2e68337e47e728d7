//! The files under the results directory: `<sha>.json` (written once, atomically, when a
//! run ends) and `<sha>.log` (appended as output arrives). Internal state lives in
//! [`STATE_DIR`], a dot-directory that is never mistaken for a result.
//!
//! This is the only module that knows the result file's format: the dispatcher hands it
//! a [`Finished`] run (from its scheduler, or read back from its database) and
//! [`ResultFile::render`] makes the file's content.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use serde::{Deserialize, Serialize};
use tinyci_proto::{CommitId, RunStatus, StepReport};

use crate::dispatcher::state::Finished;

/// The dot-directory under the results directory that holds the dispatcher's database.
pub const STATE_DIR: &str = ".tinyci";

/// The content of `<sha>.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResultFile {
    /// The commit tested.
    pub commit: CommitId,
    /// `success`, `failure` or `error`.
    pub status: RunStatus,
    /// One entry per step, in order.
    pub steps: Vec<StepReport>,
    /// The runner (`host:port`) that produced the result (or ran the last attempt).
    pub runner: Option<String>,
    /// How many times the commit was handed to a runner.
    pub attempts: u32,
    /// When the dispatcher first recorded the commit (RFC 3339).
    pub queued_at: String,
    /// When the last attempt was assigned (RFC 3339), if any was.
    pub started_at: Option<String>,
    /// When the result was recorded (RFC 3339).
    pub finished_at: String,
    /// Why the run ended in `error`, else null.
    pub error: Option<String>,
}

impl ResultFile {
    /// The file's content for a finished run.
    pub fn render(run: &Finished) -> ResultFile {
        ResultFile {
            commit: run.commit.clone(),
            status: run.status,
            steps: run.steps.clone(),
            runner: run.runner.clone(),
            attempts: run.attempts,
            queued_at: rfc3339(run.queued_at),
            started_at: run.started_at.map(rfc3339),
            finished_at: rfc3339(run.finished_at),
            error: run.error.clone(),
        }
    }

    /// The run a result file describes (for importing files written before the database
    /// existed). Fails if a time in it is not RFC 3339.
    pub fn to_run(&self) -> io::Result<Finished> {
        let parse = |what: &str, s: &str| {
            humantime::parse_rfc3339(s).map_err(|e| {
                io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!(
                        "{what} {s:?} of {} is not an RFC 3339 time: {e}",
                        self.commit
                    ),
                )
            })
        };
        Ok(Finished {
            commit: self.commit.clone(),
            status: self.status,
            steps: self.steps.clone(),
            runner: self.runner.clone(),
            attempts: self.attempts,
            queued_at: parse("queued_at", &self.queued_at)?,
            started_at: self
                .started_at
                .as_deref()
                .map(|s| parse("started_at", s))
                .transpose()?,
            finished_at: parse("finished_at", &self.finished_at)?,
            error: self.error.clone(),
        })
    }
}

/// Formats a time as RFC 3339 UTC with milliseconds.
pub fn rfc3339(t: SystemTime) -> String {
    humantime::format_rfc3339_millis(t).to_string()
}

/// `<dir>/<sha>.json`.
pub fn json_path(dir: &Path, commit: &CommitId) -> PathBuf {
    dir.join(format!("{commit}.json"))
}

/// `<dir>/<sha>.log`.
pub fn log_path(dir: &Path, commit: &CommitId) -> PathBuf {
    dir.join(format!("{commit}.log"))
}

/// Writes a batch of `<sha>.json` files atomically: each goes to a temp file in
/// [`STATE_DIR`] and is renamed into place, so a reader sees either no file or a whole one.
///
/// Nothing is synced here. The dispatcher's database, which records every result and is
/// synced before any result is acknowledged, is what makes results survive a power cut:
/// the result writer syncs the filesystem ([`sync_filesystem`]) now and then and tells the
/// database which files are safe, and at start the recovery rewrites from the database any
/// other file the disk lost or tore.
pub fn write_results(dir: &Path, results: &[ResultFile]) -> io::Result<()> {
    let state = dir.join(STATE_DIR);
    for result in results {
        let tmp = state.join(format!("{}.json.tmp", result.commit));
        let mut body = serde_json::to_vec_pretty(result).map_err(io::Error::other)?;
        body.push(b'\n');
        let written = File::create(&tmp)
            .and_then(|mut f| f.write_all(&body))
            .and_then(|()| fs::rename(&tmp, json_path(dir, &result.commit)));
        if let Err(e) = written {
            // A full disk leaves a partial temp file: free its space for the retry.
            let _ = fs::remove_file(&tmp);
            return Err(e);
        }
    }
    Ok(())
}

/// Flushes every dirty page of the filesystem holding `path` (one call for a batch).
pub fn sync_filesystem(path: &Path) -> io::Result<()> {
    let f = File::open(path)?;
    // SAFETY: syncfs(2) on a file descriptor we own for the duration of the call.
    let rc = unsafe { libc::syncfs(std::os::fd::AsRawFd::as_raw_fd(&f)) };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Reads a result file back.
pub fn read_result(dir: &Path, commit: &CommitId) -> io::Result<ResultFile> {
    let text = fs::read(json_path(dir, commit))?;
    serde_json::from_slice(&text).map_err(io::Error::other)
}

/// The commits that have a result file in `dir` (read once, when a results directory of an
/// older dispatcher is imported into the database; never at an ordinary start).
pub fn finished_commits(dir: &Path) -> io::Result<Vec<CommitId>> {
    let mut out = Vec::new();
    for entry in fs::read_dir(dir)? {
        let name = entry?.file_name();
        let Some(name) = name.to_str() else { continue };
        if let Some(stem) = name.strip_suffix(".json") {
            if let Ok(c) = CommitId::parse(stem) {
                out.push(c);
            }
        }
    }
    Ok(out)
}

/// Creates the results directory and its state directory.
pub fn prepare_dir(dir: &Path) -> io::Result<()> {
    let state = dir.join(STATE_DIR);
    match fs::create_dir_all(&state) {
        Err(e) if state.exists() && !state.is_dir() => Err(io::Error::new(
            e.kind(),
            format!(
                "{} is not a directory (the dispatcher keeps its database there)",
                state.display()
            ),
        )),
        other => other,
    }
}

/// Opens `<sha>.log` for appending, creating it.
pub fn open_log(dir: &Path, commit: &CommitId) -> io::Result<File> {
    OpenOptions::new()
        .create(true)
        .append(true)
        .open(log_path(dir, commit))
}

#[cfg(test)]
mod tests {
    use super::*;
    use tinyci_proto::StepStatus;

    #[test]
    fn result_round_trips_and_lists_as_finished() {
        let dir = tempfile::tempdir().unwrap();
        prepare_dir(dir.path()).unwrap();
        let commit = CommitId::parse(&"ab".repeat(20)).unwrap();
        let r = ResultFile {
            commit: commit.clone(),
            status: RunStatus::Success,
            steps: vec![StepReport {
                name: "test".into(),
                status: StepStatus::Success,
                exit_code: Some(0),
                duration_ms: 5,
            }],
            runner: Some("127.0.0.1:8900".into()),
            attempts: 1,
            queued_at: rfc3339(SystemTime::now()),
            started_at: Some(rfc3339(SystemTime::now())),
            finished_at: rfc3339(SystemTime::now()),
            error: None,
        };
        write_results(dir.path(), std::slice::from_ref(&r)).unwrap();
        assert_eq!(read_result(dir.path(), &commit).unwrap(), r);
        let v: serde_json::Value =
            serde_json::from_slice(&fs::read(json_path(dir.path(), &commit)).unwrap()).unwrap();
        assert_eq!(v["status"], "success");
        assert_eq!(v["steps"][0]["status"], "success");
        assert_eq!(v["error"], serde_json::Value::Null);
        assert_eq!(finished_commits(dir.path()).unwrap(), vec![commit.clone()]);

        // A batch lands whole, and leaves no temp file behind.
        let batch: Vec<ResultFile> = (1..=3u8)
            .map(|n| ResultFile {
                commit: CommitId::parse(&format!("{n:02x}").repeat(20)).unwrap(),
                ..r.clone()
            })
            .collect();
        write_results(dir.path(), &batch).unwrap();
        for b in &batch {
            assert_eq!(read_result(dir.path(), &b.commit).unwrap(), *b);
        }
        assert_eq!(finished_commits(dir.path()).unwrap().len(), 4);
        assert_eq!(fs::read_dir(dir.path().join(STATE_DIR)).unwrap().count(), 0);
    }
}
