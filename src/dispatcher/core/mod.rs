//! The dispatcher's single owner: one OS thread that holds the [`Scheduler`], the store's
//! handle, the open log files and the channels to the runner connections, and is fed
//! [`Event`]s by the connection tasks.
//!
//! Being one synchronous thread, it may block on files and on the database's read side
//! freely (never an async worker thread) and needs no locks. It takes events in batches —
//! everything waiting in the channel, up to [`MAX_BATCH`] — and hands each batch's changes
//! to the store thread ([`StoreThread`]), which makes them durable in one transaction
//! (group commit: batches that wait for an fsync share the next one). Nothing a batch
//! promised (replies, result acknowledgements, assignments, result files, the log lines
//! that say so) leaves before that transaction is durable; meanwhile this thread goes on
//! with the next batch.
//!
//! Pieces: [`events`] decides what each event does; [`log_sink`] keeps each attempt's log;
//! [`result_writer`] writes result files off this thread; recovery at start is
//! [`super::recovery`]'s.

mod clients;
mod events;
pub mod log_sink;
pub mod result_writer;

use std::collections::{HashMap, VecDeque};
use std::path::PathBuf;
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::time::{Duration, Instant, SystemTime};

use tinyci_proto::{
    CommitId, FromDispatcher, GiveBackCause, HeldJob, HeldVerdict, JobId, RunReport, RunnerId,
};
use tokio::sync::{mpsc::UnboundedSender, oneshot};
use tracing::info;

use self::log_sink::LogSink;
use self::result_writer::ResultWriter;
use super::recovery;
use super::state::{Assignment, Scheduler};
use super::store::thread::{Committed, OnDurable, StoreThread};
use super::store::{History, Op, Store, StoreError, Unfinished};
use crate::results::ResultFile;

pub use self::log_sink::MAX_LOG_BYTES;

/// The most events handled in one batch (one transaction).
pub const MAX_BATCH: usize = 4096;

/// Events from the connection tasks to the core.
pub enum Event {
    /// An observer or a client submitted commits; the reply goes out once they are
    /// durable.
    Submit {
        /// Oldest first.
        commits: Vec<CommitId>,
        /// The branch they were found on, if the sender said.
        branch: Option<String>,
        /// Put them at the front of the queue.
        front: bool,
        /// Run finished ones again.
        rerun: bool,
        /// Where the `Submitted` (or `Error`) answer goes.
        reply: oneshot::Sender<FromDispatcher>,
    },
    /// A client's question or command (status, runs, one run, cancel, why): answered from
    /// the scheduler and the database.
    Client {
        /// The request, one of the client variants of [`ToDispatcher`].
        req: tinyci_proto::ToDispatcher,
        /// Where the answer goes.
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
    /// The store thread has an answer (nothing else to do: the core looks at its answers
    /// after every wake-up).
    Wake,
    /// Stop the loop.
    Shutdown,
}

/// A fatal storage error: the dispatcher stops rather than acknowledge what it cannot keep.
#[derive(Debug, thiserror::Error)]
#[error("storage failure while {what}: {source}")]
pub struct StorageError {
    what: String,
    #[source]
    source: StoreError,
}

impl StorageError {
    /// `source`, met while doing `what`.
    pub fn new(what: impl Into<String>, source: StoreError) -> StorageError {
        StorageError {
            what: what.into(),
            source,
        }
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
    /// Commits accepted: logged as `queued` once recorded.
    queued: Vec<CommitId>,
    /// Jobs handed out: logged as `assigned` and sent to their runners once recorded (a
    /// line in the log is a promise the database keeps, even after a `kill -9`).
    assigns: Vec<Assignment>,
}

impl Batch {
    /// Whether it promised nothing.
    fn is_empty(&self) -> bool {
        self.acks.is_empty()
            && self.results.is_empty()
            && self.result_acks.is_empty()
            && self.queued.is_empty()
            && self.assigns.is_empty()
    }
}

/// The log lines that say what a batch lets out (`queued`, `result recorded`,
/// `assigned`), to be said on the store thread the moment the batch is durable, before any
/// of it leaves: a line in the log is a promise the database keeps, and a runner never
/// holds a job the log has not named (short of a `kill -9` before the log thread writes
/// the line: then the restarted dispatcher says what became of the attempt). `None` when
/// the batch announces nothing.
fn announce(batch: &Batch) -> Option<OnDurable> {
    if batch.queued.is_empty() && batch.results.is_empty() && batch.assigns.is_empty() {
        return None;
    }
    let queued = batch.queued.clone();
    let results: Vec<_> = batch
        .results
        .iter()
        .map(|r| {
            (
                r.commit.clone(),
                r.status,
                r.attempts,
                batch.reported_by.get(&r.commit).cloned(),
            )
        })
        .collect();
    let assigns: Vec<_> = batch
        .assigns
        .iter()
        .map(|a| (a.commit.clone(), a.runner, a.addr.clone(), a.attempt, a.job))
        .collect();
    Some(Box::new(move || {
        for commit in &queued {
            info!(commit = %commit, "queued");
        }
        for (commit, status, attempts, by) in &results {
            match by {
                Some((job, runner)) => {
                    info!(commit = %commit, status = ?status, runner = %runner, attempts, job = %job, "result recorded")
                }
                // Given up: no runner reported it.
                None => info!(commit = %commit, status = ?status, attempts, "result recorded"),
            }
        }
        for (commit, runner, addr, attempt, job) in &assigns {
            info!(commit = %commit, runner = %runner, addr = %addr, attempt, job = %job, "assigned");
        }
    }))
}

/// What an observer is told while the database cannot be written.
fn submissions_refused(why: &dyn std::fmt::Display) -> String {
    format!("the dispatcher cannot record new commits now (writing its database failed: {why}); keep them and submit again later")
}

/// How often a database that cannot be written is tried again.
pub use super::store::thread::STORE_RETRY;

/// The core's state.
pub struct Core {
    sched: Scheduler,
    /// The store, committing on its own thread.
    store: StoreThread,
    dir: PathBuf,
    runners: HashMap<RunnerId, UnboundedSender<FromDispatcher>>,
    logs: HashMap<JobId, LogSink>,
    next_runner: u64,
    /// When restored attempts that no runner has adopted go back to the queue.
    orphan_deadline: Option<Instant>,
    writer: ResultWriter,
    /// Why the database cannot be written now (a full disk…), while that lasts: new
    /// submissions are refused with this reason, no new work is handed out, and the store
    /// thread retries the commit every [`STORE_RETRY`].
    trouble: Option<String>,
    /// The database's files are gone from under us (said by the store thread): stop.
    lost: Option<String>,
    /// Batches whose ops are not durable yet, oldest first, with the sequence number they
    /// wait for: their replies, results, result acknowledgements and assignments are let
    /// out, in order, once it is.
    pending: VecDeque<(u64, Batch)>,
    /// Logs of ended attempts that lost output and could not say so yet: the line that
    /// marks the gap is written as soon as writing works again.
    torn_logs: Vec<LogSink>,
    /// The read side of the database, for clients' questions that need the scheduler too
    /// (the status, why, cancel).
    history: Box<dyn History + Send>,
    /// The thread that answers the questions about the history alone, on a connection of
    /// its own.
    reads: clients::HistoryReader,
    /// Bumped after every batch: log followers wake up and read their files again.
    changed: tokio::sync::watch::Sender<u64>,
}

impl Core {
    /// A core over an opened store, with the unfinished commits it holds restored
    /// ([`recovery::restore`]). Attempts that were running wait `adoption_grace` for their
    /// runner. The store moves to a thread of its own; `wake` is called from it whenever
    /// it has an answer for the core (it should make [`Core::run`]'s receiver see an
    /// event). `history` and `reads` are two read-only connections: the core's own, and
    /// the one of the thread that answers pages of runs and single runs.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        dir: PathBuf,
        store: Box<dyn Store + Send>,
        history: Box<dyn History + Send>,
        reads: Box<dyn History + Send>,
        changed: tokio::sync::watch::Sender<u64>,
        max_attempts: u32,
        unfinished: Vec<Unfinished>,
        adoption_grace: Duration,
        wake: impl Fn() + Send + 'static,
    ) -> Result<Core, StorageError> {
        let thread_err = |what: &str, e| {
            StorageError::new(
                format!("starting the {what}"),
                StoreError::Io {
                    what: "spawning its thread".into(),
                    source: e,
                },
            )
        };
        let writer =
            ResultWriter::start(dir.clone()).map_err(|e| thread_err("result writer", e))?;
        let reads = clients::HistoryReader::start(reads, dir.clone())
            .map_err(|e| thread_err("history reader", e))?;
        let mut sched = Scheduler::new(max_attempts);
        let restored = recovery::restore(&mut sched, &dir, unfinished, adoption_grace)
            .map_err(|e| StorageError::new("restoring the queue", e))?;
        let store = StoreThread::start(store, wake).map_err(|e| thread_err("store", e))?;
        Ok(Core {
            sched,
            store,
            dir,
            runners: HashMap::new(),
            logs: restored.logs,
            next_runner: 1,
            orphan_deadline: restored.orphan_deadline,
            writer,
            trouble: None,
            lost: None,
            pending: VecDeque::new(),
            torn_logs: Vec::new(),
            history,
            reads,
            changed,
        })
    }

    /// Runs until [`Event::Shutdown`] or until every sender is gone.
    pub fn run(mut self, rx: Receiver<Event>) -> Result<(), StorageError> {
        loop {
            // Logs that owe a line about lost output are retried even when no event comes.
            let retry = (!self.torn_logs.is_empty()).then(|| Instant::now() + STORE_RETRY);
            // Commits that origin did not have are handed out again at their time.
            let now = SystemTime::now();
            let missing = self
                .sched
                .next_retry(now)
                .map(|at| Instant::now() + at.duration_since(now).unwrap_or_default());
            let wake = [self.orphan_deadline, retry, missing]
                .into_iter()
                .flatten()
                .min();
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
            // What the store thread made durable (or failed to) since the last look.
            let mut changed = self.settle();
            let mut batch = Batch::default();
            if self.orphan_deadline.is_some_and(|d| d <= Instant::now()) {
                self.orphan_deadline = None;
                self.requeue_orphans(&mut batch);
            }
            let mut stop = false;
            // Whether anything a log follower waits for may have happened: output, a run
            // starting or ending. A client's question alone changes nothing (and must not
            // wake the followers, whose own questions would wake them again, round and
            // round); neither does the store thread's wake-up call.
            changed |= first.is_none();
            for ev in first.into_iter().chain(rx.try_iter().take(MAX_BATCH)) {
                changed |= match &ev {
                    Event::Shutdown => {
                        stop = true;
                        break;
                    }
                    Event::Wake => false,
                    Event::Client { req, .. } => {
                        matches!(req, tinyci_proto::ToDispatcher::Cancel { .. })
                    }
                    _ => true,
                };
                self.handle(ev, &mut batch);
            }
            // No new work while the database cannot record it (a runner whose result is
            // not yet acknowledged must not be handed another job), nor when stopping (no
            // runner would hear of it). Jobs handed out now are recorded with this batch
            // and sent only once that is durable.
            if self.trouble.is_none() && !stop {
                self.dispatch(&mut batch);
            }
            let durable = self.writer.durable();
            if !durable.is_empty() {
                self.store.stage(Op::FilesDurable { commits: durable });
            }
            // The batch's ops go to the store thread, which commits them (with any other
            // batch waiting) while this thread goes on; what the batch promised waits for
            // that commit. A batch that staged nothing waits for the batches before it.
            let seq = self.store.send(announce(&batch));
            self.pending.push_back((seq, batch));
            // The store's answers are looked at again, not only released from: a wake-up
            // taken with this batch's events may announce an answer that came after the
            // look at the top, and nothing else would wake this thread for it.
            changed |= self.settle();
            self.mend_torn_logs();
            // Logs grew, runs started or ended: followers look again.
            if changed {
                self.changed.send_modify(|n| *n = n.wrapping_add(1));
            }
            if stop {
                return self.finish();
            }
            if let Some(what) = self.lost.take() {
                // What is in flight is committed (to the lost files, which the store
                // thread then saves as it closes, when this core is dropped).
                let _ = self.finish();
                return Err(StorageError::new(
                    "watching the database's files",
                    StoreError::Lost(what),
                ));
            }
        }
    }

    /// At a stop: waits until the store thread has made every batch durable, and lets out
    /// what they promised. A database that cannot be written ends the wait (what it could
    /// not record is reported again by the runners, or run again).
    fn finish(mut self) -> Result<(), StorageError> {
        while self.store.has_unsettled() {
            // Failing already (a lock held by another program, a full disk), one more try
            // would wait out the database's busy timeout for nothing; the store thread
            // does not try again either once closed.
            let answer = match self.trouble {
                Some(_) => None,
                None => self.store.wait(),
            };
            match answer {
                Some(Committed::Lost(_)) => {}
                Some(Committed::Failed { .. }) | None => {
                    tracing::error!("{}", super::store::thread::UNRECORDED_AT_STOP);
                    return Ok(());
                }
                Some(Committed::Durable(_)) => {
                    self.store_works();
                    self.release();
                }
            }
        }
        Ok(())
    }

    /// Takes in the store thread's answers: notes trouble, tells the senders of failed
    /// batches' submissions and cancels that they are not recorded yet, and lets out what
    /// durable batches promised. Returns whether any batch was let out.
    fn settle(&mut self) -> bool {
        for answer in self.store.answers() {
            match answer {
                Committed::Lost(what) => self.lost = Some(what),
                Committed::Durable(_) => self.store_works(),
                Committed::Failed { upto, error } => {
                    self.store_failed(&error);
                    // The submissions and cancels of these batches took effect here but
                    // are not recorded: their senders are told so now rather than kept
                    // waiting (an observer keeps its commits and submits again). The ops
                    // stay staged, with everything else the batches promised, until a
                    // retry succeeds.
                    let reason = format!("writing its database failed: {error}");
                    for (_, batch) in self.pending.iter_mut().take_while(|(s, _)| *s <= upto) {
                        for (reply, msg) in batch.acks.drain(..) {
                            let answer = match msg {
                                FromDispatcher::Submitted { .. }
                                | FromDispatcher::Cancelled { .. } => FromDispatcher::NotRecorded {
                                    reason: reason.clone(),
                                },
                                refusal => refusal,
                            };
                            let _ = reply.send(answer);
                        }
                    }
                }
            }
        }
        self.release()
    }

    /// Lets out what every durable batch promised, oldest first. Returns whether any
    /// batch was let out.
    fn release(&mut self) -> bool {
        let mut any = false;
        while let Some((seq, _)) = self.pending.front() {
            if !self.store.is_durable(*seq) {
                break;
            }
            let Some((_, batch)) = self.pending.pop_front() else {
                break;
            };
            any |= !batch.is_empty();
            self.release_batch(batch);
        }
        any
    }

    /// Lets out what a durable batch promised (its log lines are already out, from the
    /// store thread: [`announce`]): the replies, then the result acknowledgements, then
    /// the assignments (after the acks, so a runner hears its result was taken before it
    /// is handed the next job); the result files, the slow part on some disks, come last,
    /// written by their own thread while the runners work.
    fn release_batch(&mut self, batch: Batch) {
        let Batch {
            acks,
            results,
            result_acks,
            assigns,
            ..
        } = batch;
        for (reply, msg) in acks {
            let _ = reply.send(msg);
        }
        for (runner, job, accepted) in result_acks {
            if let Some(tx) = self.runners.get(&runner) {
                let _ = tx.send(FromDispatcher::ResultAck { job, accepted });
            }
        }
        for a in assigns {
            if let Some(tx) = self.runners.get(&a.runner) {
                // If the connection task is gone, its RunnerLost event is on the way and
                // will requeue the commit.
                let _ = tx.send(FromDispatcher::Assign {
                    job: a.job,
                    commit: a.commit,
                });
            }
        }
        self.writer.write(results);
    }

    /// Notes that the database cannot be written: logged once, until it works again.
    fn store_failed(&mut self, e: &StoreError) {
        if self.trouble.is_none() {
            tracing::error!(error = %e, transient = e.is_transient(), retry_every = ?STORE_RETRY, "cannot write the database: refusing new submissions and holding new work until it works again");
        }
        self.trouble = Some(e.to_string());
    }

    /// Notes that the database was written again.
    fn store_works(&mut self) {
        if let Some(was) = self.trouble.take() {
            info!(was, "the database is writable again; accepting submissions");
        }
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

    /// Hands queued commits to idle runners: each assignment is staged, and sent once the
    /// batch is durable.
    fn dispatch(&mut self, batch: &mut Batch) {
        let now = SystemTime::now();
        for a in self.sched.assign(now) {
            let sink = LogSink::new(&self.dir, &a.commit, &a.job, a.attempt, &a.addr);
            self.store.stage(Op::Assigned {
                commit: a.commit.clone(),
                job: a.job,
                number: a.attempt,
                runner: a.addr.clone(),
                at: now,
            });
            self.logs.insert(a.job, sink);
            batch.assigns.push(a);
        }
    }

    /// Puts restored attempts that no runner adopted back in the queue.
    fn requeue_orphans(&mut self, batch: &mut Batch) {
        for lost in recovery::requeue_orphans(&mut self.sched) {
            self.attempt_ended(lost, batch);
        }
    }
}

#[cfg(test)]
mod tests;
