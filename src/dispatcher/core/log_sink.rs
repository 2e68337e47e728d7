//! The log of the outstanding attempt of one commit, `<sha>.log`: appended as output
//! arrives, resumed where the file ends after a restart, and honest about what it lost (a
//! full disk, output that never arrived, output past the cap).

use std::fs::File;
use std::io::{self, Write};

use tinyci_proto::{CommitId, JobId};
use tracing::{info, warn};

use crate::results;

/// The most output kept for one attempt; the runner caps far below this, so reaching it
/// means a misbehaving runner.
pub const MAX_LOG_BYTES: u64 = 256 * 1024 * 1024;

/// The log of the outstanding attempt of one commit. The file is opened (and the
/// attempt's header line written) only when the attempt first produces output or ends, so
/// handing out work never waits on creating a file.
pub struct LogSink {
    path: std::path::PathBuf,
    commit: CommitId,
    /// `[tinyci] attempt N on runner ADDR (job UUID)`: also how a restarted dispatcher
    /// finds where this attempt's output starts.
    header: String,
    file: Option<File>,
    /// The header could not be written whole: the next open writes it again, on a line of
    /// its own.
    header_torn: bool,
    /// Bytes of the attempt's output received so far (written, or lost and marked).
    pub written: u64,
    truncated: bool,
    /// Output that could not be written since the last write that worked: how many bytes,
    /// and why. Said in the log as soon as writing works again.
    pub lost: Option<(u64, String)>,
}

/// The text that ends an attempt's header line.
fn header_tail(job: &JobId) -> String {
    format!("(job {job})\n")
}

impl LogSink {
    pub fn new(
        dir: &std::path::Path,
        commit: &CommitId,
        job: &JobId,
        attempt: u32,
        addr: &str,
    ) -> LogSink {
        LogSink {
            path: results::log_path(dir, commit),
            commit: commit.clone(),
            header: format!(
                "[tinyci] attempt {attempt} on runner {addr} {}",
                header_tail(job)
            ),
            file: None,
            header_torn: false,
            written: 0,
            truncated: false,
            lost: None,
        }
    }

    /// After a restart: picks up attempt `job` where the log on disk ends.
    pub fn resume(
        dir: &std::path::Path,
        commit: &CommitId,
        job: &JobId,
        attempt: u32,
        addr: &str,
    ) -> io::Result<LogSink> {
        let mut sink = LogSink::new(dir, commit, job, attempt, addr);
        let text = match std::fs::read(&sink.path) {
            Ok(t) => t,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(sink),
            Err(e) => return Err(e),
        };
        let tail = header_tail(job);
        if let Some(at) = text.windows(tail.len()).rposition(|w| w == tail.as_bytes()) {
            sink.written = (text.len() - at - tail.len()) as u64;
            sink.file = Some(results::open_log(dir, commit)?);
        }
        Ok(sink)
    }

    /// The open file, created with the header on first use.
    fn file(&mut self) -> io::Result<&mut File> {
        if self.file.is_none() {
            let mut f = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&self.path)?;
            let header = if self.header_torn {
                format!("\n{}", self.header)
            } else {
                self.header.clone()
            };
            // Until the header is whole, nothing of the attempt may follow it.
            self.header_torn = true;
            f.write_all(header.as_bytes())?;
            self.header_torn = false;
            self.file = Some(f);
        }
        Ok(self.file.as_mut().expect("just opened"))
    }

    /// Writes `bytes`, first saying in the log what was lost since the last write that
    /// worked. A failure (a full disk) is never an error of the caller's: the `counted`
    /// bytes of the attempt's output (0 for tinyci's own lines) are counted as lost, and
    /// the log says so once writing works again.
    pub fn write(&mut self, bytes: &[u8], counted: u64) {
        let res = (|| {
            if let Some((n, why)) = self.lost.clone() {
                let line = format!(
                    "\n[tinyci] log truncated: {n} bytes of output were lost here (writing the log failed: {why})\n"
                );
                self.file()?.write_all(line.as_bytes())?;
                self.lost = None;
                info!(commit = %self.commit, lost_bytes = n, "the log is writable again; the gap is marked in it");
            }
            self.file()?.write_all(bytes)
        })();
        if let Err(e) = res {
            match &mut self.lost {
                Some((n, _)) => *n += counted,
                None => {
                    warn!(commit = %self.commit, error = %e, "cannot write the log; output is dropped (and the gap marked) until writing works again");
                    self.lost = Some((counted, e.to_string()));
                }
            }
        }
    }

    /// Appends the part of `data` (starting at `offset` of the attempt's output) that is new.
    pub fn append(&mut self, offset: u64, data: &[u8]) {
        // The offset comes from the network: one that cannot be real is dropped.
        let Some(end) = offset.checked_add(data.len() as u64) else {
            return;
        };
        if end <= self.written {
            return; // a resend of what we have
        }
        if offset > self.written {
            let gap = offset - self.written;
            self.write(
                format!("\n[tinyci] {gap} bytes of output were lost here\n").as_bytes(),
                0,
            );
            self.written = offset;
        }
        let new = &data[(self.written - offset) as usize..];
        if self.truncated {
            self.written = end;
            return;
        }
        let room = MAX_LOG_BYTES.saturating_sub(self.written) as usize;
        if new.len() > room {
            let mut last = new[..room].to_vec();
            last.extend_from_slice(b"\n[tinyci] output truncated by the dispatcher\n");
            self.write(&last, room as u64);
            self.truncated = true;
        } else {
            self.write(new, new.len() as u64);
        }
        self.written = end;
    }

    pub fn note(&mut self, line: &str) {
        self.write(format!("[tinyci] {line}\n").as_bytes(), 0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_offsets_join_resends_and_survive_nonsense() {
        let dir = tempfile::tempdir().unwrap();
        let commit = CommitId::parse(&"c".repeat(40)).unwrap();
        let job = JobId::new();
        let mut sink = LogSink::new(dir.path(), &commit, &job, 1, "r:1");
        sink.append(0, b"one\n");
        sink.append(0, b"one\ntwo\n"); // a resend overlapping what we have
        sink.append(8, b"three\n");
        sink.append(u64::MAX - 1, b"hostile"); // would overflow
        sink.append(u64::MAX, b"");
        drop(sink);
        let text = std::fs::read_to_string(results::log_path(dir.path(), &commit)).unwrap();
        assert!(
            text.starts_with("[tinyci] attempt 1 on runner r:1 (job "),
            "{text}"
        );
        assert!(text.contains(")\none\ntwo\nthree\n"), "{text}");
        // After a restart the attempt resumes where the file ends.
        let again = LogSink::resume(dir.path(), &commit, &job, 1, "r:1").unwrap();
        assert!(again.written >= 14, "{}", again.written);
    }

    #[test]
    fn a_log_that_could_not_be_written_says_so_once_writing_works_again() {
        let dir = tempfile::tempdir().unwrap();
        let commit = CommitId::parse(&"d".repeat(40)).unwrap();
        let path = results::log_path(dir.path(), &commit);
        // The log file is /dev/full: every write fails with ENOSPC.
        std::os::unix::fs::symlink("/dev/full", &path).unwrap();
        let mut sink = LogSink::new(dir.path(), &commit, &JobId::new(), 1, "r:1");
        sink.append(0, b"lost one\n");
        sink.append(9, b"lost two\n");
        sink.note("a note that is lost too");
        assert_eq!(sink.lost.as_ref().map(|l| l.0), Some(18));
        assert_eq!(sink.written, 18, "the runner is not asked to send it again");
        // Space comes back.
        std::fs::remove_file(&path).unwrap();
        sink.append(18, b"kept\n");
        drop(sink);
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(
            text.starts_with("\n[tinyci] attempt 1 on runner r:1"),
            "{text}"
        );
        assert!(
            text.contains("[tinyci] log truncated: 18 bytes of output were lost here (writing the log failed: No space left on device"),
            "{text}"
        );
        assert!(text.ends_with(")\nkept\n"), "{text}");
        assert!(!text.contains("lost one"), "{text}");
    }
}
