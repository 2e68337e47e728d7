//! `/metrics` in the Prometheus text format. Gauges (queue length, runners by state, runs
//! by status) are read from the core's status at each scrape; counters (attempts by
//! outcome, infrastructure failures by reason) and the run duration histogram are kept
//! here, fed by [`CountingStore`] (every attempt and finished run the core records) and by
//! [`Counters::observe`] (every event a runner's connection hands the core).

use std::time::Duration;

use axum::extract::State;
use axum::http::{header, HeaderValue};
use axum::response::{IntoResponse, Response};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;
use tinyci_proto::{CommitId, GiveBackCause, RunState, RunnerState};

use super::{ApiError, App};
use crate::dispatcher::core::Event;
use crate::dispatcher::state::Finished;
use crate::dispatcher::store::{AttemptEnd, Op, Outcome, Store, StoreError, Unfinished};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabel {
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabel {
    reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StateLabel {
    state: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StatusLabel {
    status: &'static str,
}

/// What the dispatcher counts since it started, and the commits it changed since the
/// live list last looked.
pub struct Counters {
    /// Commits whose state changed (durably) since the live list last looked.
    pub(crate) touched: super::live::Touched,
    attempts_started: Counter,
    attempts_ended: Family<OutcomeLabel, Counter>,
    infrastructure_failures: Family<ReasonLabel, Counter>,
    run_duration: Histogram,
}

impl Default for Counters {
    fn default() -> Self {
        Counters {
            touched: super::live::Touched::default(),
            attempts_started: Counter::default(),
            attempts_ended: Family::default(),
            infrastructure_failures: Family::default(),
            // 1 s to about 4.5 h.
            run_duration: Histogram::new(exponential_buckets(1.0, 2.0, 15)),
        }
    }
}

impl Counters {
    /// Counts what an event from a runner's connection says about the infrastructure:
    /// a runner lost (connection closed or silent), or a job handed back because the
    /// runner could not carry it out or cannot reach its origin. Runners that stop on
    /// purpose, and jobs they withdraw, are not failures.
    pub fn observe(&self, ev: &Event) {
        let reason = match ev {
            Event::RunnerLost { goodbye: false, .. } => "runner_lost",
            Event::GiveBack { cause, .. } => match cause {
                GiveBackCause::Infrastructure => "runner_could_not_run",
                GiveBackCause::OriginUnreachable => "origin_unreachable",
                GiveBackCause::NotInOrigin => "not_in_origin",
                GiveBackCause::Withdrawn => return,
            },
            _ => return,
        };
        self.infrastructure_failures
            .get_or_create(&ReasonLabel { reason })
            .inc();
    }

    fn attempt_ended(&self, outcome: Outcome) {
        self.attempts_ended
            .get_or_create(&OutcomeLabel {
                outcome: outcome.as_str(),
            })
            .inc();
    }

    /// Counts an operation the core records.
    fn record(&self, op: &Op) {
        match op {
            Op::Assigned { .. } => {
                self.attempts_started.inc();
            }
            Op::Returned { failure, .. } => self.attempt_ended(Outcome::of_failure(failure)),
            Op::Finished { last, run } => {
                match last {
                    Some((_, AttemptEnd::Reported)) => self.attempt_ended(Outcome::Reported),
                    Some((_, AttemptEnd::GaveUp(f))) => self.attempt_ended(Outcome::of_failure(f)),
                    None => {}
                }
                if let Some(started) = run.started_at {
                    let d = run
                        .finished_at
                        .duration_since(started)
                        .unwrap_or(Duration::ZERO);
                    self.run_duration.observe(d.as_secs_f64());
                }
            }
            _ => {}
        }
    }
}

/// The commit an operation changes the state of, if any.
fn commit_of(op: &Op) -> Option<&CommitId> {
    match op {
        Op::Queued { commit, .. } | Op::Assigned { commit, .. } | Op::Returned { commit, .. } => {
            Some(commit)
        }
        Op::Finished { run, .. } => Some(&run.commit),
        _ => None,
    }
}

/// The core's store, counting what passes through it for `/metrics` and noting, once each
/// transaction is durable, which commits it changed (for the live list).
pub struct CountingStore<S> {
    inner: S,
    counters: std::sync::Arc<Counters>,
    /// Commits changed by the staged ops.
    staged: Vec<CommitId>,
}

impl<S> CountingStore<S> {
    /// Wraps `inner`.
    pub fn new(inner: S, counters: std::sync::Arc<Counters>) -> Self {
        CountingStore {
            inner,
            counters,
            staged: Vec::new(),
        }
    }
}

impl<S: Store> Store for CountingStore<S> {
    fn stage(&mut self, op: Op) {
        // Staged once per change (a failed commit keeps its ops staged, it does not stage
        // them again), so nothing is counted twice.
        self.counters.record(&op);
        if let Some(c) = commit_of(&op) {
            self.staged.push(c.clone());
        }
        self.inner.stage(op)
    }

    fn commit(&mut self) -> Result<(), StoreError> {
        self.inner.commit()?;
        // Durable now: readers asking about these commits see the change.
        self.counters.touched.publish(self.staged.drain(..));
        Ok(())
    }

    fn has_staged(&self) -> bool {
        self.inner.has_staged()
    }

    fn unfinished(&mut self) -> Result<Vec<Unfinished>, StoreError> {
        self.inner.unfinished()
    }

    fn unsynced_results(&mut self) -> Result<Vec<Finished>, StoreError> {
        self.inner.unsynced_results()
    }

    fn journal_imported(&mut self) -> Result<bool, StoreError> {
        self.inner.journal_imported()
    }

    fn forget_runners(&mut self) -> Result<(), StoreError> {
        self.inner.forget_runners()
    }

    fn lost(&mut self) -> Option<String> {
        self.inner.lost()
    }

    fn rescue(&mut self) -> Result<std::path::PathBuf, StoreError> {
        self.inner.rescue()
    }
}

/// The metrics in the Prometheus text format.
#[utoipa::path(get, tag = "tinyci", path = "/metrics",
    responses((status = 200, description = "Prometheus text format", content_type = "text/plain")))]
pub(crate) async fn metrics(State(app): State<App>) -> Result<Response, ApiError> {
    let status = app.status().await?;
    let c = &app.core.counters;
    let mut reg = Registry::with_prefix("tinyci");

    let queue = Gauge::<i64>::default();
    queue.set(status.queue.len() as i64);
    reg.register("queue_length", "Commits waiting in the queue", queue);

    let runners = Family::<StateLabel, Gauge>::default();
    for state in ["idle", "busy", "paused"] {
        runners.get_or_create(&StateLabel { state }).set(0);
    }
    for r in &status.runners {
        let state = match r.state {
            RunnerState::Idle => "idle",
            RunnerState::Busy { .. } => "busy",
            RunnerState::Paused { .. } => "paused",
        };
        runners.get_or_create(&StateLabel { state }).inc();
    }
    reg.register("runners", "Registered runners by state", runners);

    let runs = Family::<StatusLabel, Gauge>::default();
    for s in [
        RunState::Queued,
        RunState::Running,
        RunState::Success,
        RunState::Failure,
        RunState::Error,
        RunState::Cancelled,
    ] {
        runs.get_or_create(&StatusLabel { status: s.as_str() })
            .set(0);
    }
    for (s, n) in &status.counts {
        runs.get_or_create(&StatusLabel { status: s.as_str() })
            .set(i64::try_from(*n).unwrap_or(i64::MAX));
    }
    reg.register("runs", "Runs in the history by status", runs);

    reg.register(
        "attempts_started",
        "Attempts handed to runners since the dispatcher started",
        c.attempts_started.clone(),
    );
    reg.register(
        "attempts_ended",
        "Attempts ended since the dispatcher started, by outcome (reported: a result; failed: no result, counted; returned: no result, not counted)",
        c.attempts_ended.clone(),
    );
    reg.register(
        "infrastructure_failures",
        "Infrastructure failures since the dispatcher started, by reason",
        c.infrastructure_failures.clone(),
    );
    reg.register(
        "run_duration_seconds",
        "Time from a run's last attempt being handed out to its result",
        c.run_duration.clone(),
    );

    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, &reg)
        .map_err(|e| ApiError::Core(format!("cannot encode the metrics: {e}")))?;
    let mut resp = text.into_response();
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
    );
    Ok(resp)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dispatcher::state::Failure;
    use std::time::SystemTime;
    use tinyci_proto::{JobId, RunStatus};

    fn failure(counted: bool) -> Failure {
        Failure {
            attempt: 1,
            runner: "r".into(),
            reason: "x".into(),
            counted,
        }
    }

    #[test]
    fn attempts_and_durations_are_counted_from_the_recorded_operations() {
        let c = Counters::default();
        let commit = CommitId::parse(&"a".repeat(40)).unwrap();
        let started = SystemTime::now() - Duration::from_secs(3);
        c.record(&Op::Assigned {
            commit: commit.clone(),
            job: JobId::new(),
            number: 1,
            runner: "r".into(),
            at: started,
        });
        c.record(&Op::Returned {
            commit: commit.clone(),
            job: JobId::new(),
            failure: failure(true),
            attempts: 1,
            at: started,
        });
        c.record(&Op::Finished {
            last: Some((JobId::new(), AttemptEnd::Reported)),
            run: Finished {
                commit,
                status: RunStatus::Success,
                steps: Vec::new(),
                runner: None,
                attempts: 1,
                queued_at: started,
                started_at: Some(started),
                finished_at: SystemTime::now(),
                error: None,
            },
        });
        assert_eq!(c.attempts_started.get(), 1);
        let ended = |o: &'static str| {
            c.attempts_ended
                .get_or_create(&OutcomeLabel { outcome: o })
                .get()
        };
        assert_eq!(ended("failed"), 1);
        assert_eq!(ended("reported"), 1);
        assert_eq!(ended("returned"), 0);
        let mut reg = Registry::default();
        reg.register("d", "d", c.run_duration.clone());
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &reg).unwrap();
        assert!(text.contains("d_count 1"), "{text}");
    }

    /// A store whose first commit fails.
    struct Flaky {
        fail: bool,
        staged: usize,
    }

    impl Store for Flaky {
        fn stage(&mut self, _: Op) {
            self.staged += 1;
        }
        fn commit(&mut self) -> Result<(), StoreError> {
            if std::mem::take(&mut self.fail) {
                return Err(StoreError::Corrupt("disk full".into()));
            }
            self.staged = 0;
            Ok(())
        }
        fn has_staged(&self) -> bool {
            self.staged > 0
        }
        fn unfinished(&mut self) -> Result<Vec<Unfinished>, StoreError> {
            Ok(Vec::new())
        }
        fn unsynced_results(&mut self) -> Result<Vec<Finished>, StoreError> {
            Ok(Vec::new())
        }
        fn journal_imported(&mut self) -> Result<bool, StoreError> {
            Ok(false)
        }
        fn forget_runners(&mut self) -> Result<(), StoreError> {
            Ok(())
        }
    }

    #[test]
    fn changed_commits_are_published_only_once_durable() {
        let counters = std::sync::Arc::new(Counters::default());
        let mut store = CountingStore::new(
            Flaky {
                fail: true,
                staged: 0,
            },
            counters.clone(),
        );
        let commit = CommitId::parse(&"b".repeat(40)).unwrap();
        store.stage(Op::Queued {
            commit: commit.clone(),
            branch: None,
            at: SystemTime::now(),
        });
        assert!(store.commit().is_err());
        let none: Vec<CommitId> = Vec::new();
        assert_eq!(counters.touched.take(), Ok(none));
        store.commit().unwrap();
        assert_eq!(counters.touched.take(), Ok(vec![commit]));
    }
}
