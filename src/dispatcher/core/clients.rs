//! The core's answers to clients (`tinyci`, hooks, tests): the queue and the runners from
//! the scheduler, the history from the database's read side, and cancelling. Questions
//! are answered at once, from what is durable; a cancel's answer waits, like every
//! acknowledgement, until the change is. The questions about the history alone (a page of
//! runs, one run) are handed to the [`HistoryReader`] thread, so that a slow page never
//! holds up dispatching.

use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::{SystemTime, UNIX_EPOCH};

use tinyci_proto::{
    AttemptView, CommitId, DispatcherStatus, FromDispatcher, RunDetail, RunQuery, RunState,
    RunStatus, RunSummary, StepStatus, ToDispatcher,
};
use tokio::sync::oneshot;
use tracing::{info, warn};

use super::{Batch, Core};
use crate::dispatcher::state::{Cancel, Failure};
use crate::dispatcher::store::{self, AttemptEnd, History, Op, Outcome, RunFilter};
use crate::results::{self, ResultFile};

/// The most runs one `Runs` answer lists.
pub const MAX_RUNS_PAGE: u32 = 500;

/// How many candidates an ambiguous prefix lists.
const MAX_CANDIDATES: u32 = 10;

fn ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// The client's word for a stored state.
fn state_of(s: store::RunState) -> RunState {
    match s {
        store::RunState::Queued => RunState::Queued,
        store::RunState::Running => RunState::Running,
        store::RunState::Done(st) => st.into(),
    }
}

fn stored(s: RunState) -> store::RunState {
    match s {
        RunState::Queued => store::RunState::Queued,
        RunState::Running => store::RunState::Running,
        RunState::Success => store::RunState::Done(RunStatus::Success),
        RunState::Failure => store::RunState::Done(RunStatus::Failure),
        RunState::Error => store::RunState::Done(RunStatus::Error),
        RunState::Cancelled => store::RunState::Done(RunStatus::Cancelled),
    }
}

fn summary(s: &store::RunSummary) -> RunSummary {
    RunSummary {
        commit: s.commit.clone(),
        state: state_of(s.state),
        branch: s.branch.clone(),
        failed_steps: s.failed_steps.clone(),
        queued_at_ms: ms(s.queued_at),
        finished_at_ms: s.finished_at.map(ms),
        attempts: s.attempts,
    }
}

fn outcome_word(o: Outcome) -> &'static str {
    o.as_str()
}

/// A question for the [`HistoryReader`] and where its answer goes.
type HistoryQuestion = (ToDispatcher, oneshot::Sender<FromDispatcher>);

/// The thread that answers the questions about the history alone (`Runs`, `Run`) on a
/// read-only connection of its own, one after another, off the core's thread. It stops
/// when the core drops it.
pub(super) struct HistoryReader {
    tx: mpsc::Sender<HistoryQuestion>,
}

impl HistoryReader {
    /// Starts the thread over `history`, the database under `dir`.
    pub(super) fn start(
        history: Box<dyn History + Send>,
        dir: PathBuf,
    ) -> std::io::Result<HistoryReader> {
        let (tx, rx) = mpsc::channel::<HistoryQuestion>();
        std::thread::Builder::new()
            .name("history-reader".into())
            .spawn(move || {
                for (req, reply) in rx {
                    let _ = reply.send(answer_history(&*history, &dir, req));
                }
            })?;
        Ok(HistoryReader { tx })
    }
}

/// The answer to a question about the history alone.
fn answer_history(history: &dyn History, dir: &Path, req: ToDispatcher) -> FromDispatcher {
    match req {
        ToDispatcher::Runs(q) => runs(history, q),
        ToDispatcher::Run { prefix } => run_by_prefix(history, dir, &prefix),
        other => FromDispatcher::Error {
            reason: format!("not a question about the history: {other:?}"),
        },
    }
}

impl Core {
    /// Answers one client request.
    pub(super) fn client(
        &mut self,
        req: ToDispatcher,
        reply: oneshot::Sender<FromDispatcher>,
        batch: &mut Batch,
        now: SystemTime,
    ) {
        let answer = match req {
            ToDispatcher::Status => self.status(),
            req @ (ToDispatcher::Runs(_) | ToDispatcher::Run { .. }) => {
                match self.reads.tx.send((req, reply)) {
                    Ok(()) => return,
                    // The reader thread is gone (it panicked): answered here instead.
                    Err(mpsc::SendError((req, reply))) => {
                        warn!("the history reader thread is gone; answering on the core");
                        let _ = reply.send(answer_history(&*self.history, &self.dir, req));
                        return;
                    }
                }
            }
            ToDispatcher::Why { commit } => self.why(&commit),
            ToDispatcher::Cancel { commit } => match self.cancel(&commit, batch, now) {
                // Durable first: the answer waits for this batch's transaction.
                Ok(answer) => {
                    batch.acks.push((reply, answer));
                    return;
                }
                Err(answer) => answer,
            },
            other => FromDispatcher::Error {
                reason: format!("not a client request: {other:?}"),
            },
        };
        let _ = reply.send(answer);
    }

    /// An answer for a database that could not be read.
    fn unreadable(e: &store::StoreError) -> FromDispatcher {
        warn!(error = %e, "cannot read the database for a client");
        FromDispatcher::Error {
            reason: format!("cannot read the run history: {e}"),
        }
    }

    fn status(&self) -> FromDispatcher {
        let counts = match self.history.counts() {
            Ok(c) => c.into_iter().map(|(s, n)| (state_of(s), n)).collect(),
            Err(e) => return Self::unreadable(&e),
        };
        let running = self
            .sched
            .running_view()
            .into_iter()
            .map(|(commit, e)| RunSummary {
                commit,
                state: RunState::Running,
                branch: e.branch.clone(),
                failed_steps: Vec::new(),
                queued_at_ms: ms(e.queued_at),
                finished_at_ms: None,
                attempts: e.attempts,
            })
            .collect();
        FromDispatcher::Status(Box::new(DispatcherStatus {
            queue: self.sched.queue_view(),
            running,
            runners: self.sched.runners_view(),
            counts,
            refusing: self.trouble.clone(),
        }))
    }

    fn why(&self, commit: &CommitId) -> FromDispatcher {
        if let Some((state, mut reason)) = self.sched.why(commit) {
            if let Some(t) = &self.trouble {
                reason.push_str(&format!(
                    "; and the dispatcher holds new work while its database cannot be written ({t})"
                ));
            }
            return FromDispatcher::Why { state, reason };
        }
        match self.history.run(commit) {
            Ok(Some(d)) => {
                let state = state_of(d.summary.state);
                let mut reason =
                    format!("finished {} after {} attempt(s)", state, d.summary.attempts);
                if let Some(e) = d.error {
                    reason.push_str(&format!(": {e}"));
                }
                FromDispatcher::Why { state, reason }
            }
            Ok(None) => FromDispatcher::NotFound {
                what: format!("{commit} was never submitted"),
            },
            Err(e) => Self::unreadable(&e),
        }
    }

    /// Cancels `commit`: `Ok` with the answer to send once durable, `Err` with one to
    /// send now.
    fn cancel(
        &mut self,
        commit: &CommitId,
        batch: &mut Batch,
        now: SystemTime,
    ) -> Result<FromDispatcher, FromDispatcher> {
        if let Some(t) = &self.trouble {
            return Err(FromDispatcher::Error {
                reason: format!("the dispatcher cannot record a cancel now: {t}"),
            });
        }
        match self.sched.cancel(commit, now) {
            Some(Cancel::Running { runner, job }) => {
                info!(commit = %commit, job = %job, runner = %runner, "cancel requested: telling the runner to stop the steps");
                if let Some(tx) = self.runners.get(&runner) {
                    let _ = tx.send(FromDispatcher::Cancel { job });
                }
                // Nothing changes on disk until the runner reports (or is lost): the
                // answer can go now.
                Err(FromDispatcher::Cancelled {
                    was: RunState::Running,
                })
            }
            Some(Cancel::Queued { job, result }) => {
                info!(commit = %commit, "cancelled before it ran");
                let last = job.map(|j| {
                    if let Some(mut sink) = self.logs.remove(&j) {
                        sink.note("cancelled");
                        self.retire_log(sink);
                    }
                    let failure = Failure {
                        attempt: result.attempts,
                        runner: result.runner.clone().unwrap_or_default(),
                        reason: "cancelled while its runner was away".into(),
                        counted: false,
                    };
                    (j, AttemptEnd::GaveUp(failure))
                });
                let was = if last.is_some() {
                    RunState::Running
                } else {
                    RunState::Queued
                };
                batch.results.push(ResultFile::render(&result));
                self.store.stage(Op::Finished { last, run: *result });
                Ok(FromDispatcher::Cancelled { was })
            }
            None => match self.history.run(commit) {
                Ok(Some(d)) => Err(FromDispatcher::Cancelled {
                    was: state_of(d.summary.state),
                }),
                Ok(None) => Err(FromDispatcher::NotFound {
                    what: format!("{commit} was never submitted"),
                }),
                Err(e) => Err(Self::unreadable(&e)),
            },
        }
    }
}

fn runs(history: &dyn History, q: RunQuery) -> FromDispatcher {
    let filter = RunFilter {
        status: q.state.map(stored),
        branch: q.branch,
        limit: q.limit.clamp(1, MAX_RUNS_PAGE),
        offset: u32::try_from(q.offset).unwrap_or(u32::MAX),
    };
    match history.runs(&filter) {
        Ok(page) => FromDispatcher::Runs {
            total: page.total,
            runs: page.data.iter().map(summary).collect(),
        },
        Err(e) => Core::unreadable(&e),
    }
}

/// The commit a prefix names: `Err` with the answer when none or several do.
fn resolve(history: &dyn History, prefix: &str) -> Result<CommitId, FromDispatcher> {
    if let Ok(id) = CommitId::parse(prefix) {
        return Ok(id);
    }
    let found = history
        .by_prefix(prefix, MAX_CANDIDATES)
        .map_err(|e| Core::unreadable(&e))?;
    match found.len() {
        0 => Err(FromDispatcher::NotFound {
            what: format!("no run of a commit starting with {prefix}"),
        }),
        1 => Ok(found.into_iter().next().expect("one")),
        _ => Err(FromDispatcher::Ambiguous { candidates: found }),
    }
}

fn run_by_prefix(history: &dyn History, dir: &Path, prefix: &str) -> FromDispatcher {
    let commit = match resolve(history, prefix) {
        Ok(c) => c,
        Err(answer) => return answer,
    };
    let detail = match history.run(&commit) {
        Ok(Some(d)) => d,
        Ok(None) => {
            return FromDispatcher::NotFound {
                what: format!("no run of {commit}"),
            }
        }
        Err(e) => return Core::unreadable(&e),
    };
    let reported = detail
        .attempts
        .iter()
        .rev()
        .find(|a| a.outcome == Outcome::Reported);
    let last = detail.attempts.last();
    let log_len = std::fs::metadata(results::log_path(dir, &commit))
        .map(|m| m.len())
        .unwrap_or(0);
    let mut sum = summary(&detail.summary);
    if sum.failed_steps.is_empty() {
        if let Some(r) = reported {
            sum.failed_steps = r
                .steps
                .iter()
                .filter(|s| matches!(s.status, StepStatus::Failure | StepStatus::Timeout))
                .map(|s| s.name.clone())
                .collect();
        }
    }
    FromDispatcher::Run(Box::new(RunDetail {
        summary: sum,
        steps: reported.map(|a| a.steps.clone()).unwrap_or_default(),
        runner: reported.or(last).map(|a| a.runner.clone()),
        started_at_ms: reported.or(last).map(|a| ms(a.started_at)),
        error: detail.error,
        attempts: detail
            .attempts
            .iter()
            .map(|a| AttemptView {
                job: a.job,
                runner: a.runner.clone(),
                started_at_ms: ms(a.started_at),
                ended_at_ms: a.ended_at.map(ms),
                outcome: outcome_word(a.outcome).to_owned(),
                reason: a.reason.clone(),
            })
            .collect(),
        log_len,
        result_file: results::json_path(dir, &commit).display().to_string(),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dispatcher::store::{Page, RunDetail as StoredDetail, StoreError};

    /// A history whose pages name the thread that read them.
    struct Fake;

    impl History for Fake {
        fn runs(&self, filter: &RunFilter) -> Result<Page<store::RunSummary>, StoreError> {
            let on = std::thread::current().name().unwrap_or("").to_owned();
            if on != "history-reader" {
                return Err(StoreError::Corrupt(format!("read on thread {on:?}")));
            }
            Ok(Page {
                total: u64::from(filter.limit),
                data: Vec::new(),
            })
        }
        fn run(&self, _: &CommitId) -> Result<Option<StoredDetail>, StoreError> {
            Ok(None)
        }
        fn queue(&self) -> Result<Vec<store::RunSummary>, StoreError> {
            Ok(Vec::new())
        }
        fn by_prefix(&self, _: &str, _: u32) -> Result<Vec<CommitId>, StoreError> {
            Ok(Vec::new())
        }
        fn is_recorded(&self, _: &CommitId) -> Result<bool, StoreError> {
            Ok(false)
        }
        fn counts(&self) -> Result<Vec<(store::RunState, u64)>, StoreError> {
            Ok(Vec::new())
        }
    }

    fn ask(reads: &HistoryReader, req: ToDispatcher) -> FromDispatcher {
        let (tx, rx) = oneshot::channel();
        reads.tx.send((req, tx)).expect("the thread runs");
        rx.blocking_recv().expect("an answer")
    }

    #[test]
    fn history_questions_are_answered_on_the_reader_thread() {
        let dir = tempfile::tempdir().unwrap();
        let reads = HistoryReader::start(Box::new(Fake), dir.path().to_owned()).unwrap();
        let q = RunQuery {
            state: None,
            branch: None,
            limit: 7,
            offset: 0,
        };
        match ask(&reads, ToDispatcher::Runs(q)) {
            FromDispatcher::Runs { total, runs } => assert_eq!((total, runs.len()), (7, 0)),
            other => panic!("{other:?}"),
        }
        match ask(
            &reads,
            ToDispatcher::Run {
                prefix: "abcd".into(),
            },
        ) {
            FromDispatcher::NotFound { what } => assert!(what.contains("abcd"), "{what}"),
            other => panic!("{other:?}"),
        }
        match ask(&reads, ToDispatcher::Status) {
            FromDispatcher::Error { reason } => assert!(reason.contains("history"), "{reason}"),
            other => panic!("{other:?}"),
        }
    }
}
