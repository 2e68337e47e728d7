//! The dispatcher's single owner: one OS thread that holds the [`Scheduler`], the journal,
//! the open log files and the channels to the runner connections, and is fed [`Event`]s by
//! the connection tasks.
//!
//! Being one synchronous thread, it may do blocking file I/O freely and needs no locks. It
//! takes events in batches — everything waiting in the channel — and makes the whole batch
//! durable with one fsync before any acknowledgement of it leaves (group commit), so a burst
//! of submissions costs one fsync, not one each.

use std::collections::HashMap;
use std::fs::File;
use std::io::{self, Write};
use std::path::PathBuf;
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::time::{Duration, Instant, SystemTime};

use tinyci_proto::{
    CommitId, FromDispatcher, GiveBackCause, HeldJob, HeldVerdict, JobId, RunReport, RunnerId,
};
use tokio::sync::{mpsc::UnboundedSender, oneshot};
use tracing::{debug, info, warn};

use super::journal::{to_ms, Journal, Pending, Record};
use super::state::{Lost, Scheduler};
use crate::results::{self, ResultFile};

/// The most output kept for one attempt; the runner caps far below this, so reaching it
/// means a misbehaving runner.
pub const MAX_LOG_BYTES: u64 = 256 * 1024 * 1024;

/// Events from the connection tasks to the core.
pub enum Event {
    /// An observer submitted commits; the reply goes out once they are durable.
    Submit {
        /// Oldest first.
        commits: Vec<CommitId>,
        /// Where the `Submitted` (or `Error`) answer goes.
        reply: oneshot::Sender<FromDispatcher>,
    },
    /// A runner registered.
    RunnerJoined {
        /// Its `host:port`.
        addr: String,
        /// A job it still holds.
        held: Option<HeldJob>,
        /// Why it takes no job now, if it does not.
        paused: Option<String>,
        /// Messages to the runner.
        tx: UnboundedSender<FromDispatcher>,
        /// Its id and the verdict on the held job.
        reply: oneshot::Sender<(RunnerId, Option<HeldVerdict>)>,
    },
    /// A runner's connection ended (closed, failed, or heartbeats missed), or it said
    /// goodbye.
    RunnerLost {
        /// Which.
        runner: RunnerId,
        /// Why, for the log.
        reason: String,
        /// The runner said goodbye (it stopped on purpose): its job goes back uncounted.
        goodbye: bool,
    },
    /// A runner takes no job for now.
    Pause {
        /// Which.
        runner: RunnerId,
        /// Why.
        reason: String,
    },
    /// A runner takes jobs again.
    Resume {
        /// Which.
        runner: RunnerId,
    },
    /// A runner hands a job back (it could not carry it out, or was stopped).
    GiveBack {
        /// The connection it came on.
        runner: RunnerId,
        /// The attempt.
        job: JobId,
        /// What went wrong.
        reason: String,
        /// Whether it counts.
        cause: GiveBackCause,
    },
    /// Output of a job.
    Log {
        /// The connection it came on.
        runner: RunnerId,
        /// The attempt.
        job: JobId,
        /// Where `data` starts in the attempt's output.
        offset: u64,
        /// The bytes.
        data: Vec<u8>,
    },
    /// A job's result.
    Done {
        /// The connection it came on.
        runner: RunnerId,
        /// The attempt.
        job: JobId,
        /// The result.
        report: RunReport,
        /// Total output bytes of the attempt.
        log_len: u64,
    },
    /// Stop the loop.
    Shutdown,
}

/// A fatal storage error: the dispatcher stops rather than acknowledge what it cannot keep.
#[derive(Debug, thiserror::Error)]
#[error("storage failure while {what}: {source}")]
pub struct StorageError {
    what: String,
    #[source]
    source: io::Error,
}

fn storage(what: impl Into<String>) -> impl FnOnce(io::Error) -> StorageError {
    let what = what.into();
    move |source| StorageError { what, source }
}

/// The log of the outstanding attempt of one commit. The file is opened (and the
/// attempt's header line written) only when the attempt first produces output or ends, so
/// handing out work never waits on creating a file.
struct LogSink {
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
    written: u64,
    truncated: bool,
    /// Output that could not be written since the last write that worked: how many bytes,
    /// and why. Said in the log as soon as writing works again.
    lost: Option<(u64, String)>,
}

/// The text that ends an attempt's header line.
fn header_tail(job: &JobId) -> String {
    format!("(job {job})\n")
}

impl LogSink {
    fn new(
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
    fn resume(
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
    fn write(&mut self, bytes: &[u8], counted: u64) {
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
    fn append(&mut self, offset: u64, data: &[u8]) {
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

    fn note(&mut self, line: &str) {
        self.write(format!("[tinyci] {line}\n").as_bytes(), 0);
    }
}

/// What one batch of events produced that must wait for the batch to be durable.
#[derive(Default)]
struct Batch {
    /// Answers to observers.
    acks: Vec<(oneshot::Sender<FromDispatcher>, FromDispatcher)>,
    /// Result files to write.
    results: Vec<ResultFile>,
    /// Result acknowledgements to runners: (runner, job, accepted).
    result_acks: Vec<(RunnerId, JobId, bool)>,
    /// The attempt and runner each reported result came from, for the log line that says
    /// it is recorded.
    reported_by: HashMap<CommitId, (JobId, RunnerId)>,
}

/// Writes result files on a thread of its own, so the core never waits on creating a
/// file. It is handed results only after the journal holds them durably: if the process
/// dies before a file is written, the next start rewrites it from the journal.
///
/// A file that cannot be written (a full disk) is retried, with backoff, until it is —
/// no restart needed. `result written` is logged once the file is in place, never before.
struct ResultWriter {
    tx: Option<std::sync::mpsc::Sender<Vec<ResultFile>>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

/// The shortest and the longest wait before a failed result file is tried again.
const RESULT_RETRY_MIN: Duration = Duration::from_millis(100);
const RESULT_RETRY_MAX: Duration = Duration::from_secs(2);

impl ResultWriter {
    fn start(dir: PathBuf) -> io::Result<ResultWriter> {
        let (tx, rx) = std::sync::mpsc::channel::<Vec<ResultFile>>();
        let thread = std::thread::Builder::new()
            .name("result-writer".into())
            .spawn(move || write_results_until_written(&dir, &rx))?;
        Ok(ResultWriter {
            tx: Some(tx),
            thread: Some(thread),
        })
    }

    fn write(&self, results: Vec<ResultFile>) {
        if results.is_empty() {
            return;
        }
        if let Some(tx) = &self.tx {
            let _ = tx.send(results);
        }
    }
}

/// The result writer's loop: writes what it is handed, keeps what failed and tries it
/// again (backing off to [`RESULT_RETRY_MAX`]) until written or the channel closes.
fn write_results_until_written(dir: &std::path::Path, rx: &Receiver<Vec<ResultFile>>) {
    let mut failed: Vec<ResultFile> = Vec::new();
    // Warned about once each, not at every retry.
    let mut warned: std::collections::HashSet<CommitId> = std::collections::HashSet::new();
    let mut delay = RESULT_RETRY_MIN;
    loop {
        let more = if failed.is_empty() {
            rx.recv().ok()
        } else {
            match rx.recv_timeout(delay) {
                Ok(batch) => Some(batch),
                Err(RecvTimeoutError::Timeout) => Some(Vec::new()),
                Err(RecvTimeoutError::Disconnected) => None,
            }
        };
        let stopping = more.is_none();
        let mut todo = std::mem::take(&mut failed);
        todo.extend(more.into_iter().flatten());
        todo.extend(rx.try_iter().flatten());
        for result in todo {
            match results::write_results(dir, std::slice::from_ref(&result)) {
                Ok(()) => {
                    let retried = warned.remove(&result.commit);
                    info!(commit = %result.commit, retried, "result file written");
                }
                Err(e) => {
                    if warned.insert(result.commit.clone()) {
                        warn!(commit = %result.commit, error = %e, "cannot write the result file; it is in the journal, and retried until written");
                    }
                    failed.push(result);
                }
            }
        }
        if stopping {
            if !failed.is_empty() {
                tracing::error!(results = failed.len(), "result files still unwritten at shutdown; they are in the journal, and the next start writes them");
            }
            return;
        }
        delay = if failed.is_empty() {
            RESULT_RETRY_MIN
        } else {
            (delay * 2).min(RESULT_RETRY_MAX)
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

/// What an observer is told while the journal cannot be written.
fn submissions_refused(why: &dyn std::fmt::Display) -> String {
    format!("the dispatcher cannot record new commits now (writing its journal failed: {why}); keep them and submit again later")
}

/// The core's state.
pub struct Core {
    sched: Scheduler,
    journal: Journal,
    dir: PathBuf,
    runners: HashMap<RunnerId, UnboundedSender<FromDispatcher>>,
    logs: HashMap<JobId, LogSink>,
    next_runner: u64,
    /// When restored attempts that no runner has adopted go back to the queue.
    orphan_deadline: Option<Instant>,
    writer: ResultWriter,
    /// Why the journal cannot be written now (a full disk…), while that lasts: new
    /// submissions are refused with this reason, no new work is handed out, and the sync
    /// is retried every [`JOURNAL_RETRY`].
    journal_trouble: Option<String>,
    /// Results (and their acknowledgements to runners) journaled but not yet durable,
    /// held until a sync succeeds.
    unsynced: Batch,
    /// Logs of ended attempts that lost output and could not say so yet: the line that
    /// marks the gap is written as soon as writing works again.
    torn_logs: Vec<LogSink>,
}

/// How often a journal that cannot be written is tried again.
pub const JOURNAL_RETRY: Duration = Duration::from_millis(500);

impl Core {
    /// A core over an opened journal, with the finished commits and the journal's pending
    /// commits restored. Attempts that were running wait `adoption_grace` for their runner.
    pub fn new(
        dir: PathBuf,
        journal: Journal,
        max_attempts: u32,
        finished: Vec<CommitId>,
        pending: Vec<Pending>,
        adoption_grace: Duration,
    ) -> Result<Core, StorageError> {
        let writer =
            ResultWriter::start(dir.clone()).map_err(storage("starting the result writer"))?;
        let mut core = Core {
            sched: Scheduler::new(max_attempts),
            journal,
            dir,
            runners: HashMap::new(),
            logs: HashMap::new(),
            next_runner: 1,
            orphan_deadline: None,
            writer,
            journal_trouble: None,
            unsynced: Batch::default(),
            torn_logs: Vec::new(),
        };
        for c in finished {
            core.sched.mark_finished(c);
        }
        let (mut queued, mut running) = (0, 0);
        for p in pending {
            match p.running {
                Some((job, addr)) => {
                    let sink = LogSink::resume(&core.dir, &p.commit, &job, p.attempts, &addr)
                        .map_err(storage("reading a log"))?;
                    core.logs.insert(job, sink);
                    core.sched.restore_running(
                        p.commit,
                        p.queued_at,
                        job,
                        p.attempts,
                        Some(addr),
                        p.failures,
                    );
                    running += 1;
                }
                None => {
                    core.sched
                        .restore_queued(p.commit, p.queued_at, p.attempts, p.failures);
                    queued += 1;
                }
            }
        }
        if running > 0 {
            core.orphan_deadline = Some(Instant::now() + adoption_grace);
        }
        if queued + running > 0 {
            info!(
                queued,
                running, "restored unfinished commits from the journal"
            );
        }
        if let Err(e) = core.journal.sync() {
            core.journal_failed(&e);
        }
        Ok(core)
    }

    /// Closes the log of an attempt that ended; one that still owes its reader a line about
    /// lost output is kept until that line is written.
    fn retire_log(&mut self, sink: LogSink) {
        if sink.lost.is_some() {
            self.torn_logs.push(sink);
        }
    }

    /// Tries again to mark the gaps in the logs of ended attempts.
    fn mend_torn_logs(&mut self) {
        self.torn_logs.retain_mut(|sink| {
            sink.write(b"", 0);
            sink.lost.is_some()
        });
    }

    /// Notes that the journal cannot be written: logged once, until it works again.
    fn journal_failed(&mut self, e: &io::Error) {
        if self.journal_trouble.is_none() {
            tracing::error!(error = %e, retry_every = ?JOURNAL_RETRY, "cannot write the journal: refusing new submissions and holding new work until it works again");
        }
        self.journal_trouble = Some(e.to_string());
    }

    /// Notes that the journal was written (and synced) again.
    fn journal_works(&mut self) {
        if let Some(was) = self.journal_trouble.take() {
            info!(was, "the journal is writable again; accepting submissions");
        }
    }

    /// Runs until [`Event::Shutdown`] or until every sender is gone.
    pub fn run(mut self, rx: Receiver<Event>) -> Result<(), StorageError> {
        loop {
            // A journal in trouble is retried even when no event comes.
            let retry = (self.journal_trouble.is_some()
                || self.journal.has_pending()
                || !self.torn_logs.is_empty())
            .then(|| Instant::now() + JOURNAL_RETRY);
            let wake = match (self.orphan_deadline, retry) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            };
            let first = match wake {
                Some(deadline) => {
                    match rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
                        Ok(ev) => Some(ev),
                        Err(RecvTimeoutError::Timeout) => None,
                        Err(RecvTimeoutError::Disconnected) => return Ok(()),
                    }
                }
                None => match rx.recv() {
                    Ok(ev) => Some(ev),
                    Err(_) => return Ok(()),
                },
            };
            if self.orphan_deadline.is_some_and(|d| d <= Instant::now()) {
                self.orphan_deadline = None;
                self.requeue_orphans()?;
            }
            let mut batch = Batch::default();
            let mut stop = false;
            for ev in first.into_iter().chain(rx.try_iter().take(4096)) {
                if matches!(ev, Event::Shutdown) {
                    stop = true;
                    break;
                }
                self.handle(ev, &mut batch)?;
            }
            // The journal sync makes the batch durable (results included); then the
            // acknowledgements, then new work (after the acks, so a runner hears its result
            // was taken before it is handed the next job); the result files and log files,
            // the slow part on some disks, come last, while the runners already work.
            let results = self.commit(batch)?;
            // No new work while the journal cannot record it: a runner whose result is
            // not yet acknowledged must not be handed another job.
            if self.journal_trouble.is_none() {
                self.dispatch()?;
                // The assignments' journal lines must not wait in our memory for the next
                // batch: a kill -9 now would lose them, and with them the adoption of these
                // jobs.
                if let Err(e) = self.journal.flush() {
                    self.journal_failed(&e);
                }
            }
            self.writer.write(results);
            self.mend_torn_logs();
            if stop {
                if let Err(e) = self.journal.sync() {
                    tracing::error!(error = %e, "stopping with journal records unwritten: unacknowledged results will be reported again by their runners, or run again");
                }
                return Ok(());
            }
        }
    }

    /// Makes a batch durable — its journal lines, results included, and one journal sync —
    /// and only then lets its acknowledgements out. Returns the result files to write.
    ///
    /// If the sync fails, the observers are told their commits were not accepted (they
    /// keep them and submit again), and the results and their acknowledgements are held
    /// until a later sync succeeds: nothing is acknowledged that is not durable.
    fn commit(&mut self, batch: Batch) -> Result<Vec<ResultFile>, StorageError> {
        for r in &batch.results {
            self.journal
                .append(&Record::Finished {
                    commit: r.commit.clone(),
                    result: Some(Box::new(r.clone())),
                })
                .map_err(storage("journaling a result"))?;
        }
        self.unsynced.results.extend(batch.results);
        self.unsynced.result_acks.extend(batch.result_acks);
        self.unsynced.reported_by.extend(batch.reported_by);
        if let Err(e) = self.journal.sync() {
            self.journal_failed(&e);
            let reason = submissions_refused(&e);
            for (reply, msg) in batch.acks {
                let answer = match msg {
                    FromDispatcher::Submitted { .. } => FromDispatcher::Error {
                        reason: reason.clone(),
                    },
                    refusal => refusal,
                };
                let _ = reply.send(answer);
            }
            return Ok(Vec::new());
        }
        self.journal_works();
        for (reply, msg) in batch.acks {
            let _ = reply.send(msg);
        }
        let held = std::mem::take(&mut self.unsynced);
        for r in &held.results {
            match held.reported_by.get(&r.commit) {
                Some((job, runner)) => {
                    info!(commit = %r.commit, status = ?r.status, runner = %runner, attempts = r.attempts, job = %job, "result recorded")
                }
                // Given up: no runner reported it.
                None => {
                    info!(commit = %r.commit, status = ?r.status, attempts = r.attempts, "result recorded")
                }
            }
        }
        for (runner, job, accepted) in held.result_acks {
            if let Some(tx) = self.runners.get(&runner) {
                let _ = tx.send(FromDispatcher::ResultAck { job, accepted });
            }
        }
        Ok(held.results)
    }

    fn handle(&mut self, ev: Event, batch: &mut Batch) -> Result<(), StorageError> {
        let now = SystemTime::now();
        match ev {
            Event::Submit { commits, reply } => {
                if let Some(why) = &self.journal_trouble {
                    let reason = submissions_refused(why);
                    warn!(commits = commits.len(), reason, "submission refused");
                    batch.acks.push((reply, FromDispatcher::Error { reason }));
                    return Ok(());
                }
                let (mut queued, mut known) = (0u32, 0u32);
                for commit in commits {
                    if self.sched.submit(commit.clone(), now) {
                        self.journal
                            .append(&Record::Queued {
                                commit: commit.clone(),
                                at_ms: to_ms(now),
                            })
                            .map_err(storage("journaling a commit"))?;
                        info!(commit = %commit, "queued");
                        queued += 1;
                    } else {
                        debug!(commit = %commit, "already known");
                        known += 1;
                    }
                }
                batch
                    .acks
                    .push((reply, FromDispatcher::Submitted { queued, known }));
            }
            Event::RunnerJoined {
                addr,
                held,
                paused,
                tx,
                reply,
            } => {
                let id = RunnerId(self.next_runner);
                self.next_runner += 1;
                self.sched.add_runner(id, addr.clone(), paused.is_some());
                if let Some(reason) = paused {
                    info!(runner = %id, addr, reason, "runner registered paused: no jobs for it until it resumes");
                }
                let verdict = held.map(|h| self.verdict(id, &addr, h));
                self.runners.insert(id, tx);
                let _ = reply.send((id, verdict));
            }
            Event::RunnerLost {
                runner,
                reason,
                goodbye,
            } => {
                self.runners.remove(&runner);
                let lost = self.sched.remove_runner(runner, goodbye, &reason, now);
                match &lost {
                    Lost::Idle if goodbye => info!(runner = %runner, reason, "runner said goodbye"),
                    Lost::Idle => info!(runner = %runner, reason, "runner left"),
                    Lost::Requeued { commit, .. } if goodbye => {
                        info!(runner = %runner, commit = %commit, reason, "runner stopped mid-job; commit handed back uncounted, requeued at the front")
                    }
                    Lost::Requeued { commit, .. } => {
                        warn!(runner = %runner, commit = %commit, reason, "runner lost mid-job; commit requeued at the front")
                    }
                    Lost::GaveUp { result, .. } => {
                        warn!(runner = %runner, commit = %result.commit, attempts = result.attempts, reason, "commit keeps failing without a result; recorded as error")
                    }
                }
                self.attempt_ended(lost, batch)?;
            }
            Event::Pause { runner, reason } => {
                info!(runner = %runner, reason, "runner paused: no jobs for it until it resumes");
                self.sched.set_paused(runner, true);
            }
            Event::Resume { runner } => {
                info!(runner = %runner, "runner resumed: it takes jobs again");
                self.sched.set_paused(runner, false);
            }
            Event::GiveBack {
                runner,
                job,
                reason,
                cause,
            } => {
                if !self.held_by(runner, &job) {
                    warn!(runner = %runner, job = %job, reason, "hand-back of an attempt that is not outstanding ignored");
                    return Ok(());
                }
                let counted = cause == GiveBackCause::Infrastructure;
                match self.sched.give_back(job, reason.clone(), counted, now) {
                    Ok(lost) => {
                        match &lost {
                            Lost::Requeued {
                                commit, failure, ..
                            } => {
                                warn!(runner = %runner, commit = %commit, job = %job, reason, cause = ?cause, counted, attempt = failure.attempt, "runner handed the commit back (not the commit's failure); requeued at the front")
                            }
                            Lost::GaveUp { result, .. } => {
                                warn!(runner = %runner, commit = %result.commit, attempts = result.attempts, reason, "commit keeps failing on infrastructure; recorded as error")
                            }
                            Lost::Idle => {}
                        }
                        self.attempt_ended(lost, batch)?;
                    }
                    Err(e) => warn!(runner = %runner, error = %e, "hand-back refused"),
                }
            }
            Event::Log {
                runner,
                job,
                offset,
                data,
            } => {
                if !self.held_by(runner, &job) {
                    debug!(runner = %runner, job = %job, "dropping output of an attempt that is not outstanding");
                    return Ok(());
                }
                if let Some(sink) = self.logs.get_mut(&job) {
                    sink.append(offset, &data);
                }
            }
            Event::Done {
                runner,
                job,
                report,
                log_len,
            } => {
                let accepted = self.held_by(runner, &job);
                let result = if accepted {
                    self.sched.finish(job, report, now).ok()
                } else {
                    None
                };
                let accepted = result.is_some();
                match result {
                    Some(result) => {
                        if let Some(mut sink) = self.logs.remove(&job) {
                            if sink.written < log_len {
                                sink.note(&format!(
                                    "{} bytes of output never arrived",
                                    log_len - sink.written
                                ));
                            }
                            self.retire_log(sink);
                        }
                        batch
                            .reported_by
                            .insert(result.commit.clone(), (job, runner));
                        batch.results.push(result);
                    }
                    None => {
                        warn!(runner = %runner, job = %job, "superseded attempt refused: its late result is dropped")
                    }
                }
                batch.result_acks.push((runner, job, accepted));
            }
            Event::Shutdown => {}
        }
        Ok(())
    }

    /// Whether `job` is outstanding and held by `runner` (a result or output from anyone
    /// else is refused).
    fn held_by(&self, runner: RunnerId, job: &JobId) -> bool {
        self.sched
            .outstanding(job)
            .and_then(|c| self.sched.entry(c))
            .is_some_and(|e| e.runner == Some(runner))
    }

    fn verdict(&mut self, id: RunnerId, addr: &str, held: HeldJob) -> HeldVerdict {
        if self.sched.adopt(id, held.job) {
            let log_offset = self.logs.get(&held.job).map_or(0, |s| s.written);
            info!(runner = %id, addr, commit = %held.commit, job = %held.job, log_offset, "runner re-registered with its job; adopted");
            HeldVerdict::Adopt { log_offset }
        } else {
            if held.finished {
                warn!(runner = %id, addr, commit = %held.commit, job = %held.job, "superseded attempt refused: its late result is dropped and the runner told to forget it");
            } else {
                warn!(runner = %id, addr, commit = %held.commit, job = %held.job, "superseded attempt refused: the runner is told to stop it");
            }
            HeldVerdict::Drop {
                reason: format!(
                    "job {} of {} is not outstanding here (superseded or unknown)",
                    held.job, held.commit
                ),
            }
        }
    }

    fn requeue_orphans(&mut self) -> Result<(), StorageError> {
        for (commit, job, failure) in self.sched.requeue_orphans() {
            warn!(commit = %commit, "no runner came back for this running commit; requeued");
            self.attempt_ended(
                Lost::Requeued {
                    commit,
                    job,
                    failure,
                },
                &mut Batch::default(),
            )?;
        }
        Ok(())
    }

    /// Records what became of an attempt that ended without a result: the journal line
    /// and a note in the commit's log, or the `error` result of a commit given up.
    fn attempt_ended(&mut self, lost: Lost, batch: &mut Batch) -> Result<(), StorageError> {
        match lost {
            Lost::Idle => {}
            Lost::Requeued {
                commit,
                job,
                failure,
            } => {
                if let Some(mut sink) = self.logs.remove(&job) {
                    sink.note(&format!(
                        "attempt {} ended without a result: {}; the commit goes back to the front of the queue{}",
                        failure.attempt,
                        failure.reason,
                        if failure.counted { "" } else { " (not counted as an attempt)" }
                    ));
                    self.retire_log(sink);
                }
                self.journal
                    .append(&Record::Returned {
                        commit,
                        job,
                        attempt: failure.attempt,
                        runner: failure.runner,
                        reason: failure.reason,
                        counted: failure.counted,
                    })
                    .map_err(storage("journaling a requeue"))?;
            }
            Lost::GaveUp { job, result } => {
                if let Some(mut sink) = self.logs.remove(&job) {
                    sink.note(&format!(
                        "giving up: {}",
                        result.error.as_deref().unwrap_or("")
                    ));
                    self.retire_log(sink);
                }
                batch.results.push(result);
            }
        }
        Ok(())
    }

    fn dispatch(&mut self) -> Result<(), StorageError> {
        for a in self.sched.assign(SystemTime::now()) {
            let sink = LogSink::new(&self.dir, &a.commit, &a.job, a.attempt, &a.addr);
            self.journal
                .append(&Record::Assigned {
                    commit: a.commit.clone(),
                    job: a.job,
                    attempt: a.attempt,
                    runner: a.addr.clone(),
                })
                .map_err(storage("journaling an assignment"))?;
            self.logs.insert(a.job, sink);
            info!(commit = %a.commit, runner = %a.runner, addr = %a.addr, attempt = a.attempt, job = %a.job, "assigned");
            if let Some(tx) = self.runners.get(&a.runner) {
                // If the connection task is gone, its RunnerLost event is on the way and
                // will requeue the commit.
                let _ = tx.send(FromDispatcher::Assign {
                    job: a.job,
                    commit: a.commit,
                });
            }
        }
        Ok(())
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
        let result = ResultFile {
            commit: commit.clone(),
            status: tinyci_proto::RunStatus::Success,
            steps: Vec::new(),
            runner: Some("r:1".into()),
            attempts: 1,
            queued_at: "2026-01-01T00:00:00.000Z".into(),
            started_at: None,
            finished_at: "2026-01-01T00:00:01.000Z".into(),
            error: None,
        };
        assert!(results::write_results(dir.path(), std::slice::from_ref(&result)).is_err());
        assert!(!tmp.exists() && !results::json_path(dir.path(), &commit).exists());
        std::os::unix::fs::symlink("/dev/full", &tmp).unwrap();

        let (tx, rx) = std::sync::mpsc::channel();
        let d = dir.path().to_owned();
        let writer = std::thread::spawn(move || write_results_until_written(&d, &rx));
        tx.send(vec![result.clone()]).unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        while results::read_result(dir.path(), &commit).ok().as_ref() != Some(&result) {
            assert!(Instant::now() < deadline, "never written");
            std::thread::sleep(Duration::from_millis(10));
        }
        drop(tx);
        writer.join().unwrap();
    }
}
