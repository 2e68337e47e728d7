//! What the core does with each kind of [`Event`]: one method per kind. Each asks the
//! scheduler, stages what changed in the store, and queues for the batch what must wait
//! until that is durable (replies, result files, acknowledgements).

use std::time::SystemTime;

use tinyci_proto::{
    CommitId, FromDispatcher, GiveBackCause, HeldJob, HeldVerdict, JobId, RunReport, RunnerId,
};
use tokio::sync::{mpsc::UnboundedSender, oneshot};
use tracing::{debug, info, warn};

use super::{submissions_refused, Batch, Core, Event};
use crate::dispatcher::state::Lost;
use crate::dispatcher::store::{AttemptEnd, Op, RunnerState};
use crate::results::ResultFile;

impl Core {
    /// Handles one event of a batch.
    pub(super) fn handle(&mut self, ev: Event, batch: &mut Batch) {
        let now = SystemTime::now();
        match ev {
            Event::Submit {
                commits,
                branch,
                front,
                rerun,
                reply,
            } => self.submit(commits, branch, front, rerun, reply, batch, now),
            Event::Client { req, reply } => self.client(req, reply, batch, now),
            Event::RunnerJoined {
                addr,
                held,
                paused,
                tx,
                reply,
            } => self.runner_joined(addr, held, paused, tx, reply, now),
            Event::RunnerLost {
                runner,
                reason,
                goodbye,
            } => self.runner_lost(runner, &reason, goodbye, batch, now),
            Event::Pause { runner, reason } => {
                info!(runner = %runner, reason, "runner paused: no jobs for it until it resumes");
                self.set_paused(runner, true, now);
            }
            Event::Resume { runner } => {
                info!(runner = %runner, "runner resumed: it takes jobs again");
                self.set_paused(runner, false, now);
            }
            Event::GiveBack {
                runner,
                job,
                reason,
                cause,
            } => self.give_back(runner, job, reason, cause, batch, now),
            Event::Log {
                runner,
                job,
                offset,
                data,
            } => self.log(runner, job, offset, &data),
            Event::Done {
                runner,
                job,
                report,
                log_len,
            } => self.done(runner, job, report, log_len, batch, now),
            Event::Shutdown | Event::Wake => {}
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn submit(
        &mut self,
        commits: Vec<CommitId>,
        branch: Option<String>,
        front: bool,
        rerun: bool,
        reply: oneshot::Sender<FromDispatcher>,
        batch: &mut Batch,
        now: SystemTime,
    ) {
        if let Some(why) = &self.trouble {
            let reason = submissions_refused(why);
            warn!(commits = commits.len(), reason, "submission refused");
            // Nothing was taken: the refusal waits for no transaction (it waited for the
            // next failed try, up to the database's 5 s busy timeout).
            let _ = reply.send(FromDispatcher::Error { reason });
            return;
        }
        // Something was pushed, most likely: commits origin did not have may be there now.
        self.sched.origin_moved();
        let (mut queued, mut known) = (0u32, 0u32);
        // To the front, the oldest must end up first: put them there newest first.
        let order: Vec<CommitId> = if front {
            commits.into_iter().rev().collect()
        } else {
            commits
        };
        // Every question first: a read that fails refuses the whole submission before
        // anything of it is taken (a refusal means nothing happened).
        let mut known_before = Vec::with_capacity(order.len());
        for commit in &order {
            // Queued or running: the scheduler knows. Finished: the database does, or,
            // until that is durable, the store thread.
            let recorded = if self.sched.is_active(commit) || self.store.is_finishing(commit) {
                true
            } else {
                match self.history.is_recorded(commit) {
                    // A finished commit is queued again only when a re-run is asked for.
                    Ok(r) => r && !rerun,
                    Err(e) => {
                        let reason = submissions_refused(&e);
                        warn!(commit = %commit, reason, "submission refused");
                        let _ = reply.send(FromDispatcher::Error { reason });
                        return;
                    }
                }
            };
            known_before.push(recorded);
        }
        for (commit, recorded) in order.into_iter().zip(known_before) {
            // (Named twice in one submission: queued by the first.)
            if recorded || self.sched.is_active(&commit) {
                debug!(commit = %commit, "already known");
                known += 1;
                continue;
            }
            self.sched
                .submit_for(commit.clone(), branch.clone(), front, now);
            self.store.stage(Op::Queued {
                commit: commit.clone(),
                branch: branch.clone(),
                at: now,
            });
            batch.queued.push(commit);
            queued += 1;
        }
        batch
            .acks
            .push((reply, FromDispatcher::Submitted { queued, known }));
    }

    fn runner_joined(
        &mut self,
        addr: String,
        held: Option<HeldJob>,
        paused: Option<String>,
        tx: UnboundedSender<FromDispatcher>,
        reply: oneshot::Sender<(RunnerId, Option<HeldVerdict>)>,
        now: SystemTime,
    ) {
        let id = RunnerId(self.next_runner);
        self.next_runner += 1;
        self.sched.add_runner(id, addr.clone(), paused.is_some());
        let state = if let Some(reason) = paused {
            info!(runner = %id, addr, reason, "runner registered paused: no jobs for it until it resumes");
            RunnerState::Paused
        } else {
            RunnerState::Connected
        };
        self.store.stage(Op::Runner {
            addr: addr.clone(),
            state,
            at: now,
        });
        let verdict = held.map(|h| self.verdict(id, &addr, h));
        self.runners.insert(id, tx);
        let _ = reply.send((id, verdict));
    }

    fn runner_lost(
        &mut self,
        runner: RunnerId,
        reason: &str,
        goodbye: bool,
        batch: &mut Batch,
        now: SystemTime,
    ) {
        self.runners.remove(&runner);
        if let Some(addr) = self.sched.runner_addr(runner) {
            self.store.stage(Op::Runner {
                addr: addr.to_owned(),
                state: RunnerState::Gone,
                at: now,
            });
        }
        let lost = self.sched.remove_runner(runner, goodbye, reason, now);
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
        self.attempt_ended(lost, batch);
    }

    fn set_paused(&mut self, runner: RunnerId, paused: bool, now: SystemTime) {
        self.sched.set_paused(runner, paused);
        if let Some(addr) = self.sched.runner_addr(runner) {
            self.store.stage(Op::Runner {
                addr: addr.to_owned(),
                state: if paused {
                    RunnerState::Paused
                } else {
                    RunnerState::Connected
                },
                at: now,
            });
        }
    }

    fn give_back(
        &mut self,
        runner: RunnerId,
        job: JobId,
        reason: String,
        cause: GiveBackCause,
        batch: &mut Batch,
        now: SystemTime,
    ) {
        if !self.held_by(runner, &job) {
            warn!(runner = %runner, job = %job, reason, "hand-back of an attempt that is not outstanding ignored");
            return;
        }
        let counted = cause == GiveBackCause::Infrastructure;
        let given_back = if cause == GiveBackCause::NotInOrigin {
            self.sched.not_in_origin(job, reason.clone(), now)
        } else {
            self.sched.give_back(job, reason.clone(), counted, now)
        };
        match given_back {
            Ok(lost) => {
                match &lost {
                    Lost::Requeued {
                        commit, failure, ..
                    } if cause == GiveBackCause::NotInOrigin => {
                        let wait = self
                            .sched
                            .entry(commit)
                            .and_then(|e| e.retry_at)
                            .and_then(|t| t.duration_since(now).ok())
                            .unwrap_or_default();
                        warn!(runner = %runner, commit = %commit, job = %job, reason, attempt = failure.attempt, retry_in = ?wait, "origin has no such commit (not pushed yet?); it waits in the queue, and is tried again then or when commits are submitted")
                    }
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
                self.attempt_ended(lost, batch);
            }
            Err(e) => warn!(runner = %runner, error = %e, "hand-back refused"),
        }
    }

    fn log(&mut self, runner: RunnerId, job: JobId, offset: u64, data: &[u8]) {
        if !self.held_by(runner, &job) {
            debug!(runner = %runner, job = %job, "dropping output of an attempt that is not outstanding");
            return;
        }
        if let Some(sink) = self.logs.get_mut(&job) {
            sink.append(offset, data);
        }
    }

    fn done(
        &mut self,
        runner: RunnerId,
        job: JobId,
        report: RunReport,
        log_len: u64,
        batch: &mut Batch,
        now: SystemTime,
    ) {
        let result = if self.held_by(runner, &job) {
            self.sched.finish(job, report, now).ok()
        } else {
            None
        };
        let accepted = result.is_some();
        match result {
            Some(run) => {
                if let Some(mut sink) = self.logs.remove(&job) {
                    if sink.written < log_len {
                        sink.note(&format!(
                            "{} bytes of output never arrived",
                            log_len - sink.written
                        ));
                    }
                    self.retire_log(sink);
                }
                batch.reported_by.insert(run.commit.clone(), (job, runner));
                batch.results.push(ResultFile::render(&run));
                self.store.stage(Op::Finished {
                    last: Some((job, AttemptEnd::Reported)),
                    run,
                });
            }
            None => {
                warn!(runner = %runner, job = %job, "superseded attempt refused: its late result is dropped")
            }
        }
        batch.result_acks.push((runner, job, accepted));
    }

    /// Whether `job` is outstanding and held by `runner` (a result or output from anyone
    /// else is refused).
    fn held_by(&self, runner: RunnerId, job: &JobId) -> bool {
        self.sched
            .outstanding(job)
            .and_then(|c| self.sched.entry(c))
            .is_some_and(|e| e.runner() == Some(runner))
    }

    /// Whether a runner that registered again may go on with the job it holds.
    fn verdict(&mut self, id: RunnerId, addr: &str, held: HeldJob) -> HeldVerdict {
        if self.sched.adopt(id, held.job) {
            let log_offset = self.logs.get(&held.job).map_or(0, |s| s.written);
            info!(runner = %id, addr, commit = %held.commit, job = %held.job, log_offset, "runner re-registered with its job; adopted");
            if let Some(commit) = self.sched.outstanding(&held.job).cloned() {
                self.store.stage(Op::Adopted {
                    commit,
                    job: held.job,
                    runner: addr.to_owned(),
                });
            }
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

    /// Records what became of an attempt that ended without a result: its failure and a
    /// note in the commit's log, or the `error` result of a commit given up.
    pub(super) fn attempt_ended(&mut self, lost: Lost, batch: &mut Batch) {
        let now = SystemTime::now();
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
                let attempts = self.sched.entry(&commit).map_or(0, |e| e.attempts);
                self.store.stage(Op::Returned {
                    commit,
                    job,
                    failure,
                    attempts,
                    at: now,
                });
            }
            Lost::GaveUp {
                job,
                failure,
                result,
            } => {
                if let Some(mut sink) = self.logs.remove(&job) {
                    if result.status == tinyci_proto::RunStatus::Cancelled {
                        sink.note("cancelled");
                    } else {
                        sink.note(&format!(
                            "giving up: {}",
                            result.error.as_deref().unwrap_or("")
                        ));
                    }
                    self.retire_log(sink);
                }
                batch.results.push(ResultFile::render(&result));
                self.store.stage(Op::Finished {
                    last: Some((job, AttemptEnd::GaveUp(failure))),
                    run: result,
                });
            }
        }
    }
}
