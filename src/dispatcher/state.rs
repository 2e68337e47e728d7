//! The dispatcher's bookkeeping as a synchronous state machine: the FIFO queue of commits,
//! the pool of runners, and the job attempts in flight. No I/O and no clock of its own (the
//! caller passes `now`), so every rule here has a unit test.
//!
//! Fencing: each hand-out of a commit is an attempt with a fresh [`JobId`]. Only the
//! attempt a commit currently has outstanding may deliver output or a result; once a
//! runner is declared lost its attempt is forgotten, so a runner that was only presumed
//! dead (frozen, partitioned) cannot overwrite the newer attempt when it wakes up.
//!
//! Two kinds of failure: the commit's own (a step failed, the spec is bad) arrive as a
//! result and are final. Everything else — the runner could not check the commit out, its
//! origin was unreachable, it stopped, it died — is the infrastructure's: the commit goes
//! back to the front of the queue, with the reason kept as a [`Failure`], and is never
//! given a result for it, until the failures that *count* reach the maximum number of
//! attempts. What counts: a runner lost without a goodbye (the commit may be killing its
//! runners) and an infrastructure failure of the runner. What does not: a runner that was
//! stopped on purpose and handed the job back, and a runner whose origin was unreachable
//! (it pauses until the origin is back). The next attempt goes to a runner the commit has
//! not failed on, when one is registered and not paused. A commit origin does not have
//! (not pushed yet) does not count either: it waits in the queue for a while, or until
//! commits are submitted ([`Scheduler::not_in_origin`]).
//!
//! The scheduler knows nothing of storage or of the result file's format: it answers in
//! domain types ([`Assignment`], [`Lost`], [`Finished`]) that the core records and renders.
//! It keeps only the commits that are queued or running; whether a commit already finished
//! is the store's to say.

use std::collections::{HashMap, HashSet, VecDeque};
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};
use tinyci_proto::{
    CommitId, JobId, QueuedView, RunReport, RunState, RunStatus, RunnerId, RunnerState, RunnerView,
    StepReport,
};

/// Uncounted hand-backs are not free for ever: a commit handed out this many times the
/// maximum number of attempts is given up even if most of its failures did not count.
pub const HANDOUT_LIMIT_FACTOR: u32 = 10;

/// How long a commit that origin did not have waits before it is handed out again; the
/// wait doubles with each miss, up to [`ORIGIN_RETRY_MAX`].
pub const ORIGIN_RETRY_FIRST: Duration = Duration::from_secs(5);

/// The longest wait between two looks for a commit origin did not have.
pub const ORIGIN_RETRY_MAX: Duration = Duration::from_secs(600);

/// How long a commit may wait for origin to have it (from the first time it did not, in
/// this dispatcher's life) before it is given up as `error`: a typo, or a commit that
/// will never be pushed.
pub const ORIGIN_WAIT_LIMIT: Duration = Duration::from_secs(24 * 3600);

/// How the failure of an attempt whose runner was lost begins.
const LOST: &str = "the runner was lost";

/// One attempt of a commit that ended without a result.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Failure {
    /// The attempt's number as it was handed out (counted attempts, this one included).
    pub attempt: u32,
    /// The runner's address.
    pub runner: String,
    /// What happened.
    pub reason: String,
    /// Whether it counts towards the maximum number of attempts.
    pub counted: bool,
}

/// A commit's run as it ended: what its result file shows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finished {
    /// The commit tested.
    pub commit: CommitId,
    /// How the run ended.
    pub status: RunStatus,
    /// One entry per step, in order (none for a commit given up).
    pub steps: Vec<StepReport>,
    /// The runner of the last attempt.
    pub runner: Option<String>,
    /// Counted attempts.
    pub attempts: u32,
    /// When the commit was queued.
    pub queued_at: SystemTime,
    /// When the last attempt was handed out.
    pub started_at: Option<SystemTime>,
    /// When the result was recorded.
    pub finished_at: SystemTime,
    /// Why the run ended in `error`.
    pub error: Option<String>,
}

/// Where a commit's current attempt stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AttemptState {
    /// No attempt is out: the commit waits in the queue.
    Queued,
    /// An attempt restored after a restart, waiting for its runner to register again
    /// ([`Scheduler::adopt`]) until [`Scheduler::requeue_orphans`].
    Orphaned {
        /// The attempt.
        job: JobId,
    },
    /// An attempt held by a registered runner.
    Running {
        /// The attempt.
        job: JobId,
        /// Its runner.
        runner: RunnerId,
    },
}

/// What the scheduler knows about a commit that is queued or running.
#[derive(Debug, Clone)]
pub struct Entry {
    /// When it was first recorded.
    pub queued_at: SystemTime,
    /// When its latest attempt was assigned.
    pub started_at: Option<SystemTime>,
    /// How many attempts have been assigned so far.
    pub attempts: u32,
    /// Its current attempt.
    pub state: AttemptState,
    /// Address of the runner that had the latest attempt.
    pub runner_addr: Option<String>,
    /// The attempts that ended without a result, oldest first.
    pub failures: Vec<Failure>,
    /// The branch it was submitted for, if the submitter said.
    pub branch: Option<String>,
    /// A client cancelled it while it ran: however the attempt ends, the commit is
    /// finished as `cancelled`.
    pub cancel_requested: bool,
    /// Origin did not have it when a runner last looked: not handed out before this time
    /// (or before commits are submitted, which may mean it was pushed).
    pub retry_at: Option<SystemTime>,
    /// How many times origin did not have it (the wait doubles with each). These
    /// hand-outs are not held against the limit on hand-outs: [`ORIGIN_WAIT_LIMIT`] is.
    pub origin_misses: u32,
    /// When origin first did not have it.
    pub first_miss: Option<SystemTime>,
}

impl Entry {
    fn new(queued_at: SystemTime) -> Entry {
        Entry {
            queued_at,
            started_at: None,
            attempts: 0,
            state: AttemptState::Queued,
            runner_addr: None,
            failures: Vec::new(),
            branch: None,
            cancel_requested: false,
            retry_at: None,
            origin_misses: 0,
            first_miss: None,
        }
    }

    /// The runner holding the outstanding attempt, if a registered one does.
    pub fn runner(&self) -> Option<RunnerId> {
        match self.state {
            AttemptState::Running { runner, .. } => Some(runner),
            _ => None,
        }
    }

    /// Runners this commit failed on in a way that counted (it should try another).
    fn avoids(&self, addr: &str) -> bool {
        self.failures.iter().any(|f| f.counted && f.runner == addr)
    }
}

#[derive(Debug)]
struct Runner {
    addr: String,
    job: Option<JobId>,
    /// Takes no new job (origin unreachable, draining).
    paused: bool,
    /// Why it is paused, when it said.
    pause_reason: Option<String>,
}

/// A commit handed to a runner.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Assignment {
    /// Who runs it.
    pub runner: RunnerId,
    /// The runner's address.
    pub addr: String,
    /// The new attempt's id.
    pub job: JobId,
    /// What to run.
    pub commit: CommitId,
    /// 1 for the first attempt.
    pub attempt: u32,
}

/// What became of the job of a runner that was lost, or of a job handed back.
#[derive(Debug)]
pub enum Lost {
    /// The runner was idle.
    Idle,
    /// Its commit is back at the front of the queue.
    Requeued {
        /// The commit.
        commit: CommitId,
        /// The attempt that was lost.
        job: JobId,
        /// The failure recorded for it.
        failure: Failure,
    },
    /// Its commit has used up its attempts and is finished as `error`.
    GaveUp {
        /// The attempt that was lost.
        job: JobId,
        /// How that attempt failed.
        failure: Failure,
        /// The result to record.
        result: Finished,
    },
}

/// Why a result was not accepted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// No commit has this attempt outstanding: it was superseded or never existed.
    #[error("job {0} is not outstanding (superseded by a retry, or unknown)")]
    NotOutstanding(JobId),
}

/// The queue, the runners and the attempts.
#[derive(Debug)]
pub struct Scheduler {
    max_attempts: u32,
    queue: VecDeque<CommitId>,
    active: HashMap<CommitId, Entry>,
    runners: HashMap<RunnerId, Runner>,
    idle: VecDeque<RunnerId>,
    jobs: HashMap<JobId, CommitId>,
    /// Queued commits that wait for origin to have them ([`Entry::retry_at`]).
    missing: HashSet<CommitId>,
}

impl Scheduler {
    /// An empty scheduler that gives a commit at most `max_attempts` attempts.
    pub fn new(max_attempts: u32) -> Self {
        Scheduler {
            max_attempts: max_attempts.max(1),
            queue: VecDeque::new(),
            active: HashMap::new(),
            runners: HashMap::new(),
            idle: VecDeque::new(),
            jobs: HashMap::new(),
            missing: HashSet::new(),
        }
    }

    /// Whether the commit is queued or running.
    pub fn is_active(&self, commit: &CommitId) -> bool {
        self.active.contains_key(commit)
    }

    /// Queues a new commit at the back. Returns false (and changes nothing) if the commit is
    /// already queued or running. (Whether it finished before is the caller's to check.)
    pub fn submit(&mut self, commit: CommitId, now: SystemTime) -> bool {
        if self.is_active(&commit) {
            return false;
        }
        self.active.insert(commit.clone(), Entry::new(now));
        self.queue.push_back(commit);
        true
    }

    /// Restores a commit whose attempt `job` was running when the dispatcher stopped. It
    /// waits for its runner to come back ([`Scheduler::adopt`]) until
    /// [`Scheduler::requeue_orphans`] puts it back in the queue.
    #[allow(clippy::too_many_arguments)]
    pub fn restore_running(
        &mut self,
        commit: CommitId,
        queued_at: SystemTime,
        job: JobId,
        started_at: SystemTime,
        attempts: u32,
        addr: Option<String>,
        failures: Vec<Failure>,
        branch: Option<String>,
    ) {
        if self.is_active(&commit) {
            return;
        }
        self.jobs.insert(job, commit.clone());
        self.active.insert(
            commit,
            Entry {
                started_at: Some(started_at),
                attempts,
                state: AttemptState::Orphaned { job },
                runner_addr: addr,
                failures,
                branch,
                ..Entry::new(queued_at)
            },
        );
    }

    /// Restores a queued commit (after attempts that ended without a result).
    pub fn restore_queued(
        &mut self,
        commit: CommitId,
        queued_at: SystemTime,
        attempts: u32,
        failures: Vec<Failure>,
        branch: Option<String>,
    ) {
        if self.submit(commit.clone(), queued_at) {
            if let Some(e) = self.active.get_mut(&commit) {
                e.attempts = attempts;
                e.failures = failures;
                e.branch = branch;
            }
        }
    }

    /// Puts every restored attempt that no runner adopted back at the front of the queue
    /// (oldest first), each with a counted failure. Returns the commits requeued, with the
    /// lost attempt and its failure.
    pub fn requeue_orphans(&mut self) -> Vec<(CommitId, JobId, Failure)> {
        let mut orphans: Vec<(SystemTime, CommitId)> = self
            .active
            .iter()
            .filter(|(_, e)| matches!(e.state, AttemptState::Orphaned { .. }))
            .map(|(c, e)| (e.queued_at, c.clone()))
            .collect();
        orphans.sort();
        let mut out = Vec::new();
        for (_, c) in orphans.iter().rev() {
            let Some(e) = self.active.get_mut(c) else {
                continue;
            };
            let AttemptState::Orphaned { job } = e.state else {
                continue;
            };
            e.state = AttemptState::Queued;
            self.jobs.remove(&job);
            let failure = Failure {
                attempt: e.attempts,
                runner: e.runner_addr.clone().unwrap_or_default(),
                reason: "its runner did not come back after the dispatcher restarted".into(),
                counted: true,
            };
            e.failures.push(failure.clone());
            self.queue.push_front(c.clone());
            out.push((c.clone(), job, failure));
        }
        out.reverse();
        out
    }

    /// Adds a registered runner to the pool: idle, or paused (takes no job) when `paused`.
    pub fn add_runner(&mut self, id: RunnerId, addr: String, paused: bool) {
        self.runners.insert(
            id,
            Runner {
                addr,
                job: None,
                paused,
                pause_reason: None,
            },
        );
        if !paused {
            self.idle.push_back(id);
        }
    }

    /// The address of a registered runner.
    pub fn runner_addr(&self, id: RunnerId) -> Option<&str> {
        self.runners.get(&id).map(|r| r.addr.as_str())
    }

    /// Pauses a runner (it takes no new job; a job it holds goes on) or lets it take jobs
    /// again.
    pub fn set_paused(&mut self, id: RunnerId, paused: bool) {
        let Some(r) = self.runners.get_mut(&id) else {
            return;
        };
        r.paused = paused;
        if paused {
            self.idle.retain(|x| *x != id);
        } else if r.job.is_none() && !self.idle.contains(&id) {
            self.idle.push_back(id);
        }
    }

    /// A newly registered runner announces it still runs `job`. If that attempt is
    /// outstanding and has no live runner (it was restored after a restart), or is held
    /// by an earlier registration of the same runner (same address: it reconnected before
    /// its old connection was noticed dead), the runner takes it over and `true` is
    /// returned. The earlier registration keeps no job, so its loss costs nothing.
    pub fn adopt(&mut self, id: RunnerId, job: JobId) -> bool {
        let Some(commit) = self.jobs.get(&job) else {
            return false;
        };
        let Some(entry) = self.active.get(commit) else {
            return false;
        };
        let Some(addr) = self.runners.get(&id).map(|r| r.addr.clone()) else {
            return false;
        };
        if self.runners.get(&id).is_some_and(|r| r.job.is_some()) {
            return false;
        }
        if let Some(old) = entry.runner().filter(|old| *old != id) {
            match self.runners.get_mut(&old) {
                Some(o) if o.addr == addr && o.job == Some(job) => o.job = None,
                _ => return false,
            }
        }
        let Some(entry) = self.active.get_mut(commit) else {
            return false;
        };
        entry.state = AttemptState::Running { job, runner: id };
        entry.runner_addr = Some(addr);
        if let Some(runner) = self.runners.get_mut(&id) {
            runner.job = Some(job);
        }
        self.idle.retain(|r| *r != id);
        true
    }

    /// Removes a runner whose connection ended and deals with its job. `said_goodbye`: the
    /// runner stopped on purpose (its job goes back without counting); otherwise it was
    /// lost (connection failed, heartbeats missed) and the attempt counts, which is how a
    /// commit that kills its runners is caught.
    pub fn remove_runner(
        &mut self,
        id: RunnerId,
        said_goodbye: bool,
        reason: &str,
        now: SystemTime,
    ) -> Lost {
        self.idle.retain(|r| *r != id);
        let Some(runner) = self.runners.remove(&id) else {
            return Lost::Idle;
        };
        let Some(job) = runner.job else {
            return Lost::Idle;
        };
        let reason = if said_goodbye {
            format!("the runner stopped ({reason})")
        } else {
            format!("{LOST} ({reason})")
        };
        self.end_attempt(job, &runner.addr, reason, !said_goodbye, now)
            .unwrap_or(Lost::Idle)
    }

    /// The runner holding `job` handed it back: it could not carry it out for a reason
    /// that is not the commit's. `counted`: whether the attempt counts towards the
    /// maximum. The runner stays in the pool (idle unless paused).
    pub fn give_back(
        &mut self,
        job: JobId,
        reason: String,
        counted: bool,
        now: SystemTime,
    ) -> Result<Lost, Refusal> {
        let commit = self.jobs.get(&job).ok_or(Refusal::NotOutstanding(job))?;
        let id = self
            .active
            .get(commit)
            .and_then(Entry::runner)
            .ok_or(Refusal::NotOutstanding(job))?;
        let runner = self
            .runners
            .get_mut(&id)
            .ok_or(Refusal::NotOutstanding(job))?;
        runner.job = None;
        let addr = runner.addr.clone();
        if !runner.paused {
            self.idle.push_back(id);
        }
        self.end_attempt(job, &addr, reason, counted, now)
            .ok_or(Refusal::NotOutstanding(job))
    }

    /// The runner holding `job` handed it back because its origin has no such commit (not
    /// pushed yet, or a mirror that lags). Not counted; the commit stays at the front of
    /// the queue but is not handed out again for a while ([`ORIGIN_RETRY_FIRST`], doubling
    /// up to [`ORIGIN_RETRY_MAX`]), or until [`Scheduler::origin_moved`]. These hand-outs
    /// do not count towards the limit on hand-outs (submissions may end many pauses); it
    /// is given up once origin has lacked it for [`ORIGIN_WAIT_LIMIT`].
    pub fn not_in_origin(
        &mut self,
        job: JobId,
        reason: String,
        now: SystemTime,
    ) -> Result<Lost, Refusal> {
        let commit = self
            .jobs
            .get(&job)
            .cloned()
            .ok_or(Refusal::NotOutstanding(job))?;
        let entry = self
            .active
            .get_mut(&commit)
            .ok_or(Refusal::NotOutstanding(job))?;
        let before = (entry.origin_misses, entry.first_miss);
        entry.origin_misses += 1;
        entry.first_miss.get_or_insert(now);
        let lost = match self.give_back(job, reason, false, now) {
            Ok(lost) => lost,
            Err(e) => {
                if let Some(entry) = self.active.get_mut(&commit) {
                    (entry.origin_misses, entry.first_miss) = before;
                }
                return Err(e);
            }
        };
        if let Lost::Requeued { commit, .. } = &lost {
            if let Some(e) = self.active.get_mut(commit) {
                let wait = ORIGIN_RETRY_FIRST
                    .saturating_mul(1 << (e.origin_misses - 1).min(16))
                    .min(ORIGIN_RETRY_MAX);
                e.retry_at = Some(now + wait);
                self.missing.insert(commit.clone());
            }
        }
        Ok(lost)
    }

    /// Commits were submitted: origin may have the missing ones now. They may be handed
    /// out again at once.
    pub fn origin_moved(&mut self) {
        for c in self.missing.drain() {
            if let Some(e) = self.active.get_mut(&c) {
                e.retry_at = None;
            }
        }
    }

    /// When the next commit that waits for origin may be handed out again, if one waits
    /// past `now` (one whose time has come goes with the next runner that is free).
    pub fn next_retry(&self, now: SystemTime) -> Option<SystemTime> {
        self.missing
            .iter()
            .filter_map(|c| self.active.get(c)?.retry_at)
            .filter(|t| *t > now)
            .min()
    }

    /// Ends attempt `job` without a result: records the failure and requeues the commit at
    /// the front, or gives it up once its counted failures (or all its hand-outs) reach
    /// the limit. The runner's own bookkeeping is the caller's.
    fn end_attempt(
        &mut self,
        job: JobId,
        addr: &str,
        reason: String,
        counted: bool,
        now: SystemTime,
    ) -> Option<Lost> {
        let commit = self.jobs.remove(&job)?;
        let entry = self.active.get_mut(&commit)?;
        entry.state = AttemptState::Queued;
        let failure = Failure {
            attempt: entry.attempts,
            runner: addr.to_owned(),
            reason,
            counted,
        };
        entry.failures.push(failure.clone());
        if !counted {
            entry.attempts = entry.attempts.saturating_sub(1);
        }
        // Looks for a commit origin did not have are not held against it (a submission
        // may end a pause at any time); waiting too long for origin is.
        let handouts = (entry.failures.len() as u32).saturating_sub(entry.origin_misses);
        let exhausted = counted && entry.attempts >= self.max_attempts;
        let origin_gave_up = entry
            .first_miss
            .is_some_and(|t| now.duration_since(t).unwrap_or_default() >= ORIGIN_WAIT_LIMIT);
        if entry.cancel_requested {
            let entry = self.active.remove(&commit)?;
            let result = cancelled_result(commit, &entry, now);
            return Some(Lost::GaveUp {
                job,
                failure,
                result,
            });
        }
        if !exhausted
            && !origin_gave_up
            && handouts < self.max_attempts.saturating_mul(HANDOUT_LIMIT_FACTOR)
        {
            self.queue.push_front(commit.clone());
            return Some(Lost::Requeued {
                commit,
                job,
                failure,
            });
        }
        let entry = self.active.remove(&commit)?;
        let result = Finished {
            commit,
            status: RunStatus::Error,
            steps: Vec::new(),
            runner: entry.runner_addr.clone(),
            attempts: entry.attempts,
            queued_at: entry.queued_at,
            started_at: entry.started_at,
            finished_at: now,
            error: Some(if origin_gave_up {
                give_up_on_origin(&entry)
            } else {
                give_up_message(&entry, exhausted)
            }),
        };
        Some(Lost::GaveUp {
            job,
            failure,
            result,
        })
    }

    /// Pairs idle runners with queued commits, oldest commit and longest-idle runner first.
    ///
    /// A commit that failed (in a way that counted) on a runner goes to another one: to
    /// an idle runner it has not failed on, or, if none is idle but such a runner is
    /// registered and not paused, it waits for it (later commits go first meanwhile). Only
    /// when every available runner has failed it does it go to one of them again.
    pub fn assign(&mut self, now: SystemTime) -> Vec<Assignment> {
        let mut out = Vec::new();
        let mut from = 0;
        while from < self.queue.len() && !self.idle.is_empty() {
            let Some((at, slot)) = self.next_pair(from, now) else {
                break;
            };
            let (Some(commit), Some(id)) = (self.queue.remove(at), self.idle.remove(slot)) else {
                break;
            };
            from = at;
            let (Some(entry), Some(runner)) =
                (self.active.get_mut(&commit), self.runners.get_mut(&id))
            else {
                // Cannot happen while the maps are kept in step; keep the runner usable.
                self.idle.push_front(id);
                continue;
            };
            let job = JobId::new();
            if entry.retry_at.take().is_some() {
                self.missing.remove(&commit);
            }
            entry.attempts += 1;
            entry.started_at = Some(now);
            entry.state = AttemptState::Running { job, runner: id };
            entry.runner_addr = Some(runner.addr.clone());
            runner.job = Some(job);
            self.jobs.insert(job, commit.clone());
            out.push(Assignment {
                runner: id,
                addr: runner.addr.clone(),
                job,
                commit,
                attempt: entry.attempts,
            });
        }
        out
    }

    /// The first queued commit at or after `from` that can go to an idle runner now, with
    /// that runner's place in the idle list.
    fn next_pair(&self, from: usize, now: SystemTime) -> Option<(usize, usize)> {
        for (at, commit) in self.queue.iter().enumerate().skip(from) {
            let Some(entry) = self.active.get(commit) else {
                continue;
            };
            if entry.retry_at.is_some_and(|t| t > now) {
                continue; // origin did not have it a moment ago
            }
            if entry.failures.is_empty() {
                return Some((at, 0)); // the common case: the longest-idle runner
            }
            let fresh =
                |id: &RunnerId| self.runners.get(id).is_some_and(|r| !entry.avoids(&r.addr));
            if let Some(slot) = self.idle.iter().position(fresh) {
                return Some((at, slot));
            }
            let another_may_come = self.runners.iter().any(|(id, r)| !r.paused && fresh(id));
            if !another_may_come {
                return Some((at, 0));
            }
        }
        None
    }

    /// The commit whose outstanding attempt is `job`, if it is outstanding.
    pub fn outstanding(&self, job: &JobId) -> Option<&CommitId> {
        self.jobs.get(job)
    }

    /// Accepts the result of `job` if it is the outstanding attempt of its commit; the
    /// runner that held it becomes idle.
    pub fn finish(
        &mut self,
        job: JobId,
        report: RunReport,
        now: SystemTime,
    ) -> Result<Finished, Refusal> {
        let commit = self.jobs.remove(&job).ok_or(Refusal::NotOutstanding(job))?;
        let entry = self
            .active
            .remove(&commit)
            .ok_or(Refusal::NotOutstanding(job))?;
        if let Some(id) = entry.runner() {
            if let Some(r) = self.runners.get_mut(&id) {
                r.job = None;
                if !r.paused {
                    self.idle.push_back(id);
                }
            }
        }
        Ok(Finished {
            commit,
            status: report.status,
            steps: report.steps,
            runner: entry.runner_addr,
            attempts: entry.attempts,
            queued_at: entry.queued_at,
            started_at: entry.started_at,
            finished_at: now,
            error: report.error,
        })
    }

    /// The entry of a queued or running commit.
    pub fn entry(&self, commit: &CommitId) -> Option<&Entry> {
        self.active.get(commit)
    }

    /// Commits waiting for a runner.
    pub fn queued(&self) -> usize {
        self.queue.len()
    }

    /// Queues a new commit for `branch`, at the front when `front`. Returns false (and
    /// changes nothing) if the commit is already queued, running or finished.
    pub fn submit_for(
        &mut self,
        commit: CommitId,
        branch: Option<String>,
        front: bool,
        now: SystemTime,
    ) -> bool {
        if self.is_active(&commit) {
            return false;
        }
        let mut entry = Entry::new(now);
        entry.branch = branch;
        self.active.insert(commit.clone(), entry);
        if front {
            self.queue.push_front(commit);
        } else {
            self.queue.push_back(commit);
        }
        true
    }

    /// Pauses a runner for `reason`, or (with `None`) lets it take jobs again.
    pub fn pause(&mut self, id: RunnerId, reason: Option<String>) {
        self.set_paused(id, reason.is_some());
        if let Some(r) = self.runners.get_mut(&id) {
            r.pause_reason = reason;
        }
    }

    /// Cancels a queued or running commit; `None` when it is neither (finished or
    /// unknown: the store knows which).
    pub fn cancel(&mut self, commit: &CommitId, now: SystemTime) -> Option<Cancel> {
        let entry = self.active.get_mut(commit)?;
        match entry.state {
            // On a runner: it is told to stop; the attempt's end finishes the commit.
            AttemptState::Running { job, runner } => {
                entry.cancel_requested = true;
                Some(Cancel::Running { runner, job })
            }
            // Queued, or restored and waiting for its runner: finished here and now (a
            // late result of the restored attempt is fenced off).
            AttemptState::Queued | AttemptState::Orphaned { .. } => {
                let orphan = match entry.state {
                    AttemptState::Orphaned { job } => Some(job),
                    _ => None,
                };
                if let Some(job) = orphan {
                    self.jobs.remove(&job);
                }
                self.queue.retain(|c| c != commit);
                self.missing.remove(commit);
                let entry = self.active.remove(commit)?;
                Some(Cancel::Queued {
                    job: orphan,
                    result: Box::new(cancelled_result(commit.clone(), &entry, now)),
                })
            }
        }
    }

    /// Where `commit` is, if it is queued or running: `None` otherwise (finished or
    /// unknown: the store knows).
    pub fn state_of(&self, commit: &CommitId) -> Option<RunState> {
        let e = self.active.get(commit)?;
        Some(match e.state {
            AttemptState::Queued => RunState::Queued,
            AttemptState::Running { .. } | AttemptState::Orphaned { .. } => RunState::Running,
        })
    }

    /// The queue, next first, each with why it waits.
    pub fn queue_view(&self) -> Vec<QueuedView> {
        self.queue
            .iter()
            .enumerate()
            .filter_map(|(at, c)| {
                let e = self.active.get(c)?;
                Some(QueuedView {
                    commit: c.clone(),
                    branch: e.branch.clone(),
                    queued_at_ms: ms(e.queued_at),
                    attempts: e.attempts,
                    waiting: self.waiting(at, e),
                })
            })
            .collect()
    }

    /// The commits on a runner (or waiting for theirs to come back), oldest first.
    pub fn running_view(&self) -> Vec<(CommitId, &Entry)> {
        let mut v: Vec<(CommitId, &Entry)> = self
            .active
            .iter()
            .filter(|(_, e)| e.state != AttemptState::Queued)
            .map(|(c, e)| (c.clone(), e))
            .collect();
        v.sort_by_key(|(_, e)| e.queued_at);
        v
    }

    /// Every registered runner and what it does.
    pub fn runners_view(&self) -> Vec<RunnerView> {
        let mut v: Vec<RunnerView> = self
            .runners
            .iter()
            .map(|(id, r)| {
                let busy = r
                    .job
                    .and_then(|j| self.jobs.get(&j).map(|c| (j, c.clone())));
                let state = match (busy, r.paused) {
                    (Some((job, commit)), _) => RunnerState::Busy { commit, job },
                    (None, true) => RunnerState::Paused {
                        reason: r
                            .pause_reason
                            .clone()
                            .unwrap_or_else(|| "paused".to_owned()),
                    },
                    (None, false) => RunnerState::Idle,
                };
                RunnerView {
                    id: *id,
                    addr: r.addr.clone(),
                    state,
                }
            })
            .collect();
        v.sort_by_key(|r| r.id.0);
        v
    }

    /// Why `commit` is where it is, in words, if it is queued or running.
    pub fn why(&self, commit: &CommitId) -> Option<(RunState, String)> {
        let e = self.active.get(commit)?;
        let on = e.runner_addr.as_deref().unwrap_or("?");
        match e.state {
            AttemptState::Running { job, .. } => {
                let why = format!("attempt {} ({job}) is running on {on}", e.attempts);
                return Some((RunState::Running, why));
            }
            AttemptState::Orphaned { job } => {
                let why = format!(
                    "attempt {} ({job}) was running on {on} when the dispatcher restarted; waiting for that runner to come back",
                    e.attempts
                );
                return Some((RunState::Running, why));
            }
            AttemptState::Queued => {}
        }
        let at = self.queue.iter().position(|c| c == commit)?;
        Some((RunState::Queued, self.waiting(at, e)))
    }

    /// Why the commit at place `at` in the queue waits.
    fn waiting(&self, at: usize, e: &Entry) -> String {
        let mut why = if e.retry_at.is_some() {
            format!(
                "origin had no such commit when a runner looked ({} time(s)): not pushed yet? It is tried again after a pause that doubles up to {} min, and at once when commits are submitted (`tinyci submit` it after pushing)",
                e.origin_misses,
                ORIGIN_RETRY_MAX.as_secs() / 60
            )
        } else if self.runners.is_empty() {
            "no runner is registered".to_owned()
        } else if self.runners.values().all(|r| r.paused) {
            let reasons: Vec<String> = self
                .runners
                .values()
                .map(|r| {
                    format!(
                        "{}: {}",
                        r.addr,
                        r.pause_reason.as_deref().unwrap_or("paused")
                    )
                })
                .collect();
            format!("every runner is paused ({})", reasons.join("; "))
        } else if !e.failures.is_empty()
            && self
                .idle
                .iter()
                .all(|id| self.runners.get(id).is_some_and(|r| e.avoids(&r.addr)))
            && !self.idle.is_empty()
        {
            let failed: Vec<&str> = e
                .failures
                .iter()
                .filter(|f| f.counted)
                .map(|f| f.runner.as_str())
                .collect();
            format!(
                "waiting for a runner it has not failed on (it failed on {})",
                failed.join(", ")
            )
        } else {
            let busy = self.runners.values().filter(|r| r.job.is_some()).count();
            format!("all {busy} available runner(s) are busy; {at} commit(s) ahead of it")
        };
        if let Some(last) = e.failures.last() {
            why.push_str(&format!(
                " (attempt {} on {} ended without a result: {})",
                last.attempt, last.runner, last.reason
            ));
        }
        why
    }
}

/// What [`Scheduler::cancel`] did.
#[derive(Debug)]
pub enum Cancel {
    /// It was queued (or waiting for its runner to come back): finished now.
    Queued {
        /// The restored attempt that was waiting for its runner, if one was.
        job: Option<JobId>,
        /// Its result, `cancelled`.
        result: Box<Finished>,
    },
    /// It is running: tell `runner` to stop `job`; its end finishes the commit.
    Running {
        /// Who runs it.
        runner: RunnerId,
        /// The attempt.
        job: JobId,
    },
}

fn ms(t: SystemTime) -> u64 {
    t.duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// The result of a commit cancelled by a client.
fn cancelled_result(commit: CommitId, entry: &Entry, now: SystemTime) -> Finished {
    Finished {
        commit,
        status: RunStatus::Cancelled,
        steps: Vec::new(),
        runner: entry.runner_addr.clone(),
        attempts: entry.attempts,
        queued_at: entry.queued_at,
        started_at: entry.started_at,
        finished_at: now,
        error: Some(if entry.attempts == 0 {
            "cancelled before it ran".to_owned()
        } else {
            "cancelled".to_owned()
        }),
    }
}

/// The `error` of a commit origin never had.
fn give_up_on_origin(entry: &Entry) -> String {
    let last = entry
        .failures
        .last()
        .map(|f| format!("; the last look, on {}: {}", f.runner, f.reason))
        .unwrap_or_default();
    format!(
        "gave up: origin did not have this commit in {} looks over {} hours (never pushed, or a typo?){last}",
        entry.origin_misses,
        ORIGIN_WAIT_LIMIT.as_secs() / 3600
    )
}

/// The `error` of a commit given up: how many attempts, and every attempt's runner and
/// reason.
fn give_up_message(entry: &Entry, exhausted: bool) -> String {
    let mut msg = if exhausted {
        format!(
            "gave up after {} attempts that failed for reasons that are not the commit's",
            entry.attempts
        )
    } else {
        format!(
            "gave up after {} hand-outs to runners without a result",
            entry.failures.len()
        )
    };
    let lost_only = entry
        .failures
        .iter()
        .filter(|f| f.counted)
        .all(|f| f.reason.starts_with(LOST));
    if exhausted && lost_only {
        msg.push_str(" (the runner was lost every time: the commit may be killing its runner)");
    }
    let attempts: Vec<String> = entry
        .failures
        .iter()
        .map(|f| {
            format!(
                "attempt {} on {}: {}{}",
                f.attempt,
                if f.runner.is_empty() { "?" } else { &f.runner },
                f.reason,
                if f.counted { "" } else { " (not counted)" }
            )
        })
        .collect();
    format!("{msg}: {}", attempts.join("; "))
}

#[cfg(test)]
mod tests {
    use super::*;
    use tinyci_proto::{StepReport, StepStatus};

    fn c(n: u8) -> CommitId {
        CommitId::parse(&format!("{n:02x}").repeat(20)).unwrap()
    }

    fn ok() -> RunReport {
        RunReport {
            status: RunStatus::Success,
            steps: vec![StepReport {
                name: "t".into(),
                status: StepStatus::Success,
                exit_code: Some(0),
                duration_ms: 1,
            }],
            error: None,
        }
    }

    fn now() -> SystemTime {
        SystemTime::now()
    }

    #[test]
    fn fifo_one_job_per_runner() {
        let mut s = Scheduler::new(3);
        for n in 1..=3 {
            assert!(s.submit(c(n), now()));
        }
        s.add_runner(RunnerId(1), "a".into(), false);
        s.add_runner(RunnerId(2), "b".into(), false);
        let a = s.assign(now());
        assert_eq!(a.len(), 2);
        assert_eq!((a[0].commit.clone(), a[0].runner), (c(1), RunnerId(1)));
        assert_eq!((a[1].commit.clone(), a[1].runner), (c(2), RunnerId(2)));
        assert!(s.assign(now()).is_empty(), "no runner is free");
        s.finish(a[1].job, ok(), now()).unwrap();
        let b = s.assign(now());
        assert_eq!((b[0].commit.clone(), b[0].runner), (c(3), RunnerId(2)));
    }

    #[test]
    fn duplicates_are_not_queued_in_any_state() {
        let mut s = Scheduler::new(3);
        assert!(s.submit(c(1), now()));
        assert!(!s.submit(c(1), now()), "queued");
        s.add_runner(RunnerId(1), "a".into(), false);
        let a = s.assign(now());
        assert!(!s.submit(c(1), now()), "running");
        s.finish(a[0].job, ok(), now()).unwrap();
        assert!(
            !s.is_active(&c(1)),
            "finished: the store remembers it, not the scheduler"
        );
    }

    #[test]
    fn lost_runner_requeues_at_the_front_and_fences_its_result() {
        let mut s = Scheduler::new(3);
        s.submit(c(1), now());
        s.submit(c(2), now());
        s.add_runner(RunnerId(1), "a".into(), false);
        let first = s.assign(now()).remove(0);
        assert!(
            matches!(s.remove_runner(RunnerId(1), false, "gone", now()), Lost::Requeued { ref commit, .. } if *commit == c(1))
        );
        s.add_runner(RunnerId(2), "b".into(), false);
        let second = s.assign(now()).remove(0);
        assert_eq!(second.commit, c(1), "requeued commit goes first");
        assert_eq!(second.attempt, 2);
        assert_ne!(second.job, first.job);
        assert_eq!(
            s.finish(first.job, ok(), now()),
            Err(Refusal::NotOutstanding(first.job))
        );
        assert!(s.outstanding(&first.job).is_none());
        let r = s.finish(second.job, ok(), now()).unwrap();
        assert_eq!(r.attempts, 2);
        assert_eq!(r.runner.as_deref(), Some("b"));
    }

    /// A commit origin does not have (not pushed yet) is no verdict: its misses do not
    /// count, it waits with a doubling pause while later commits go first, and a
    /// submission (a push) has it tried again at once.
    #[test]
    fn a_commit_origin_lacks_waits_for_a_push_without_using_attempts() {
        let t0 = now();
        let mut s = Scheduler::new(2);
        s.submit(c(1), t0);
        s.add_runner(RunnerId(1), "a".into(), false);
        let mut at = t0;
        for (miss, wait) in [(1u32, 5u64), (2, 10), (3, 20), (4, 40)] {
            let a = s.assign(at).remove(0);
            assert_eq!(a.commit, c(1));
            let lost = s.not_in_origin(a.job, "no such commit".into(), at).unwrap();
            assert!(
                matches!(lost, Lost::Requeued { ref failure, .. } if !failure.counted),
                "{lost:?}"
            );
            let e = s.entry(&c(1)).unwrap();
            assert_eq!((e.attempts, e.origin_misses), (0, miss));
            assert_eq!(s.next_retry(at), Some(at + Duration::from_secs(wait)));
            let (state, why) = s.why(&c(1)).unwrap();
            assert_eq!(state, RunState::Queued);
            assert!(why.contains("not pushed yet?"), "{why}");
            // Not before its time.
            assert!(s.assign(at + Duration::from_secs(wait - 1)).is_empty());
            if miss < 4 {
                at += Duration::from_secs(wait);
            }
        }
        // While it waits, the next commit goes first.
        s.submit(c(2), at);
        let b = s.assign(at).remove(0);
        assert_eq!(b.commit, c(2));
        s.finish(b.job, ok(), at).unwrap();
        assert!(s.assign(at).is_empty());
        // Pushed: a submission (of anything) has it go at once.
        s.origin_moved();
        assert_eq!(s.next_retry(at), None);
        let a = s.assign(at).remove(0);
        assert_eq!((a.commit.clone(), a.attempt), (c(1), 1));
        let r = s.finish(a.job, ok(), at).unwrap();
        assert_eq!((r.status, r.attempts), (RunStatus::Success, 1));
    }

    /// Submissions end the pause as often as they come; those looks are not held against
    /// the commit (30 of them gave it up as `error` within seconds). A day of misses is.
    #[test]
    fn looks_for_a_missing_commit_do_not_use_up_its_hand_outs_but_a_day_of_them_does() {
        let t0 = now();
        let mut s = Scheduler::new(3);
        s.submit(c(1), t0);
        s.add_runner(RunnerId(1), "a".into(), false);
        for n in 0..100u64 {
            let at = t0 + Duration::from_secs(n);
            s.origin_moved();
            let a = s.assign(at).remove(0);
            let lost = s.not_in_origin(a.job, "no such commit".into(), at).unwrap();
            assert!(matches!(lost, Lost::Requeued { .. }), "look {n}: {lost:?}");
        }
        assert_eq!(s.entry(&c(1)).unwrap().origin_misses, 100);
        // Other hand-backs still have their limit, misses aside.
        s.origin_moved();
        let day = t0 + ORIGIN_WAIT_LIMIT;
        let a = s.assign(day).remove(0);
        let Lost::GaveUp { result, .. } = s
            .not_in_origin(a.job, "no such commit".into(), day)
            .unwrap()
        else {
            panic!("not given up after a day")
        };
        assert_eq!(result.status, RunStatus::Error);
        let error = result.error.unwrap();
        assert!(
            error.contains("did not have this commit in 101 looks"),
            "{error}"
        );
        assert!(error.len() < 300, "{error}");
    }

    #[test]
    fn a_cancelled_commit_that_waited_for_origin_is_forgotten() {
        let mut s = Scheduler::new(2);
        s.submit(c(1), now());
        s.add_runner(RunnerId(1), "a".into(), false);
        let a = s.assign(now()).remove(0);
        s.not_in_origin(a.job, "no such commit".into(), now())
            .unwrap();
        assert!(s.next_retry(now()).is_some());
        assert!(matches!(
            s.cancel(&c(1), now()),
            Some(Cancel::Queued { .. })
        ));
        assert_eq!(s.next_retry(now()), None);
        assert!(s.queue_view().is_empty());
    }

    #[test]
    fn poisoned_commit_gives_up_after_max_attempts() {
        let mut s = Scheduler::new(2);
        s.submit(c(1), now());
        s.submit(c(2), now());
        for id in 1..=2 {
            s.add_runner(RunnerId(id), format!("r{id}"), false);
            let a = s.assign(now());
            assert_eq!(a[0].commit, c(1));
            let lost = s.remove_runner(RunnerId(id), false, "gone", now());
            if id == 1 {
                assert!(matches!(lost, Lost::Requeued { ref failure, .. } if failure.counted));
            } else {
                let Lost::GaveUp { result, .. } = lost else {
                    panic!("expected to give up")
                };
                assert_eq!(result.status, RunStatus::Error);
                assert_eq!(result.attempts, 2);
                let error = result.error.unwrap();
                assert!(error.contains("gave up after 2 attempts"), "{error}");
                assert!(error.contains("may be killing its runner"), "{error}");
                assert!(
                    error.contains("attempt 1 on r1: the runner was lost (gone)"),
                    "{error}"
                );
                assert!(error.contains("attempt 2 on r2"), "{error}");
            }
        }
        s.add_runner(RunnerId(9), "r9".into(), false);
        assert_eq!(s.assign(now())[0].commit, c(2), "the pool goes on");
        assert!(!s.is_active(&c(1)), "the given-up commit is finished");
    }

    #[test]
    fn idle_runner_loss_changes_nothing() {
        let mut s = Scheduler::new(3);
        s.add_runner(RunnerId(1), "a".into(), false);
        assert!(matches!(
            s.remove_runner(RunnerId(1), false, "gone", now()),
            Lost::Idle
        ));
        s.submit(c(1), now());
        assert!(s.assign(now()).is_empty());
        assert_eq!(s.queued(), 1);
    }

    #[test]
    fn restored_attempt_is_adopted_or_requeued() {
        let mut s = Scheduler::new(3);
        let job = JobId::new();
        s.restore_running(
            c(1),
            now(),
            job,
            now(),
            1,
            Some("a".into()),
            Vec::new(),
            None,
        );
        s.restore_running(c(2), now(), JobId::new(), now(), 1, None, Vec::new(), None);
        s.add_runner(RunnerId(1), "a".into(), false);
        assert!(!s.adopt(RunnerId(1), JobId::new()), "unknown job");
        assert!(s.adopt(RunnerId(1), job));
        assert!(s.assign(now()).is_empty(), "adopting runner is busy");
        let orphans = s.requeue_orphans();
        assert_eq!(orphans.len(), 1);
        assert_eq!(orphans[0].0, c(2));
        assert!(orphans[0].2.counted);
        s.add_runner(RunnerId(2), "b".into(), false);
        assert_eq!(s.assign(now())[0].commit, c(2));
        let r = s.finish(job, ok(), now()).unwrap();
        assert_eq!(r.attempts, 1);
    }

    #[test]
    fn infrastructure_failure_requeues_at_the_front_and_prefers_another_runner() {
        let mut s = Scheduler::new(3);
        s.submit(c(1), now());
        s.submit(c(2), now());
        s.add_runner(RunnerId(1), "a".into(), false);
        s.add_runner(RunnerId(2), "b".into(), false);
        let first = s.assign(now());
        assert_eq!(
            (first[0].commit.clone(), first[0].runner),
            (c(1), RunnerId(1))
        );
        assert_eq!(
            (first[1].commit.clone(), first[1].runner),
            (c(2), RunnerId(2))
        );
        let lost = s
            .give_back(first[0].job, "checkout failed".into(), true, now())
            .unwrap();
        assert!(matches!(lost, Lost::Requeued { ref commit, .. } if *commit == c(1)));
        // c(1) failed on a, and b (busy) has not had it: it waits for b, and a takes the
        // next commit instead.
        s.submit(c(3), now());
        let next = s.assign(now());
        assert_eq!(
            (next[0].commit.clone(), next[0].runner),
            (c(3), RunnerId(1))
        );
        s.finish(first[1].job, ok(), now()).unwrap();
        let retry = s.assign(now());
        assert_eq!(
            (retry[0].commit.clone(), retry[0].runner),
            (c(1), RunnerId(2))
        );
        assert_eq!(retry[0].attempt, 2);
        // The late result of the handed-back attempt is refused.
        assert!(s.finish(first[0].job, ok(), now()).is_err());
        let r = s.finish(retry[0].job, ok(), now()).unwrap();
        assert_eq!((r.status, r.attempts), (RunStatus::Success, 2));
        assert_eq!(r.error, None, "a result that exists is the commit's own");
    }

    #[test]
    fn a_commit_failing_on_every_runner_is_given_up_listing_each_attempt() {
        let mut s = Scheduler::new(3);
        s.submit(c(1), now());
        s.add_runner(RunnerId(1), "a".into(), false);
        s.add_runner(RunnerId(2), "b".into(), false);
        let mut runners = Vec::new();
        for n in 1..=3 {
            let a = s.assign(now());
            assert_eq!(a.len(), 1);
            assert_eq!(a[0].attempt, n);
            runners.push(a[0].addr.clone());
            let lost = s
                .give_back(a[0].job, format!("disk full #{n}"), true, now())
                .unwrap();
            if n < 3 {
                assert!(matches!(lost, Lost::Requeued { .. }));
            } else {
                let Lost::GaveUp { result, .. } = lost else {
                    panic!("expected to give up")
                };
                assert_eq!((result.status, result.attempts), (RunStatus::Error, 3));
                let e = result.error.unwrap();
                assert!(e.contains("gave up after 3 attempts"), "{e}");
                assert!(!e.contains("killing its runner"), "{e}");
                for k in 1..=3 {
                    assert!(e.contains(&format!("disk full #{k}")), "{e}");
                }
            }
        }
        assert_eq!(runners, ["a", "b", "a"], "alternates between runners");
        assert!(!s.is_active(&c(1)), "given up is finished");
    }

    #[test]
    fn uncounted_hand_backs_and_goodbyes_do_not_use_up_attempts() {
        let mut s = Scheduler::new(2);
        s.submit(c(1), now());
        s.add_runner(RunnerId(1), "a".into(), false);
        for _ in 0..5 {
            let a = s.assign(now()).remove(0);
            assert_eq!(a.attempt, 1);
            let lost = s
                .give_back(a.job, "the runner was stopped".into(), false, now())
                .unwrap();
            assert!(matches!(lost, Lost::Requeued { ref failure, .. } if !failure.counted));
        }
        // A runner that leaves with a goodbye hands its job back uncounted too.
        let a = s.assign(now()).remove(0);
        assert_eq!(a.attempt, 1);
        let lost = s.remove_runner(RunnerId(1), true, "draining timed out", now());
        assert!(matches!(lost, Lost::Requeued { ref failure, .. } if !failure.counted));
        s.add_runner(RunnerId(2), "b".into(), false);
        let a = s.assign(now()).remove(0);
        assert_eq!(a.attempt, 1);
        let r = s.finish(a.job, ok(), now()).unwrap();
        assert_eq!(r.attempts, 1);
    }

    #[test]
    fn endless_uncounted_hand_backs_are_bounded() {
        let mut s = Scheduler::new(1);
        s.submit(c(1), now());
        s.add_runner(RunnerId(1), "a".into(), false);
        let mut gave_up = None;
        for _ in 0..HANDOUT_LIMIT_FACTOR {
            let a = s.assign(now()).remove(0);
            match s.give_back(a.job, "origin unreachable".into(), false, now()) {
                Ok(Lost::GaveUp { result, .. }) => gave_up = Some(result),
                Ok(_) => {}
                Err(e) => panic!("{e}"),
            }
        }
        let r = gave_up.expect("given up at the hand-out limit");
        assert_eq!(r.status, RunStatus::Error);
        assert!(r.error.unwrap().contains("hand-outs"));
    }

    #[test]
    fn paused_runners_take_no_job_until_resumed() {
        let mut s = Scheduler::new(3);
        s.add_runner(RunnerId(1), "a".into(), true);
        s.submit(c(1), now());
        assert!(s.assign(now()).is_empty(), "registered paused");
        s.set_paused(RunnerId(1), false);
        let a = s.assign(now()).remove(0);
        // Paused while busy: the job goes on, but no next one.
        s.set_paused(RunnerId(1), true);
        s.submit(c(2), now());
        s.finish(a.job, ok(), now()).unwrap();
        assert!(s.assign(now()).is_empty());
        s.set_paused(RunnerId(1), false);
        s.set_paused(RunnerId(1), false);
        let b = s.assign(now());
        assert_eq!(b.len(), 1, "resumed once, idle once");
        assert_eq!(b[0].commit, c(2));
    }

    #[test]
    fn a_commit_goes_back_to_a_runner_it_failed_on_when_the_others_are_paused() {
        let mut s = Scheduler::new(3);
        s.submit(c(1), now());
        s.add_runner(RunnerId(1), "a".into(), false);
        s.add_runner(RunnerId(2), "b".into(), true);
        let a = s.assign(now()).remove(0);
        s.give_back(a.job, "checkout failed".into(), true, now())
            .unwrap();
        let again = s.assign(now());
        assert_eq!(again.len(), 1, "b is paused, so a tries again");
        assert_eq!(again[0].runner, RunnerId(1));
    }

    #[test]
    fn a_runner_that_reconnects_before_its_old_connection_is_noticed_keeps_its_job() {
        let mut s = Scheduler::new(3);
        s.submit(c(1), now());
        s.add_runner(RunnerId(1), "a".into(), false);
        let a = s.assign(now()).remove(0);
        // Same runner (same address), new connection, announcing the job.
        s.add_runner(RunnerId(2), "a".into(), false);
        assert!(s.adopt(RunnerId(2), a.job));
        // The old connection is noticed dead later: nothing is requeued or counted.
        assert!(matches!(
            s.remove_runner(RunnerId(1), false, "gone", now()),
            Lost::Idle
        ));
        assert_eq!(s.queued(), 0);
        // Another runner cannot take it.
        s.add_runner(RunnerId(3), "b".into(), false);
        assert!(!s.adopt(RunnerId(3), a.job));
        let r = s.finish(a.job, ok(), now()).unwrap();
        assert_eq!(r.attempts, 1);
    }

    #[test]
    fn cancel_finishes_a_queued_commit_and_stops_a_running_one() {
        let mut s = Scheduler::new(3);
        s.submit(c(1), now());
        s.submit(c(2), now());
        s.add_runner(RunnerId(1), "a".into(), false);
        let running = s.assign(now()).remove(0);
        assert_eq!(running.commit, c(1));
        // Queued: finished at once, out of the queue, never queued again.
        match s.cancel(&c(2), now()) {
            Some(Cancel::Queued { result, job: None }) => {
                assert_eq!(result.status, RunStatus::Cancelled);
                assert_eq!(result.error.as_deref(), Some("cancelled before it ran"));
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(s.queued(), 0);
        assert!(
            s.cancel(&c(2), now()).is_none(),
            "finished: the store's to say"
        );
        assert!(s.cancel(&c(9), now()).is_none());
        // Running: the runner is to be told; if it is then lost, the commit is finished
        // as cancelled, not requeued.
        match s.cancel(&c(1), now()) {
            Some(Cancel::Running { runner, job }) => {
                assert_eq!((runner, job), (RunnerId(1), running.job));
            }
            other => panic!("{other:?}"),
        }
        match s.remove_runner(RunnerId(1), false, "gone", now()) {
            Lost::GaveUp { result, .. } => assert_eq!(result.status, RunStatus::Cancelled),
            other => panic!("{other:?}"),
        }
        assert_eq!(s.queued(), 0);
    }

    #[test]
    fn front_submissions_jump_the_queue() {
        let mut s = Scheduler::new(3);
        s.submit(c(1), now());
        assert!(s.submit_for(c(2), Some("main".into()), true, now()));
        s.add_runner(RunnerId(1), "a".into(), false);
        let a = s.assign(now()).remove(0);
        assert_eq!(a.commit, c(2));
        assert_eq!(s.entry(&c(2)).unwrap().branch.as_deref(), Some("main"));
        assert!(!s.submit_for(c(2), None, false, now()), "running is active");
        s.finish(a.job, ok(), now()).unwrap();
        assert!(
            s.submit_for(c(2), None, false, now()),
            "a re-run is the caller's call"
        );
    }

    #[test]
    fn why_and_the_queue_view_say_why_a_commit_waits() {
        let mut s = Scheduler::new(3);
        s.submit(c(1), now());
        s.submit(c(2), now());
        assert_eq!(s.why(&c(1)).unwrap().1, "no runner is registered");
        s.add_runner(RunnerId(1), "a".into(), false);
        s.pause(RunnerId(1), Some("origin unreachable".into()));
        let (state, why) = s.why(&c(2)).unwrap();
        assert_eq!(state, RunState::Queued);
        assert!(
            why.contains("every runner is paused (a: origin unreachable)"),
            "{why}"
        );
        s.pause(RunnerId(1), None);
        let job = s.assign(now()).remove(0).job;
        let (state, why) = s.why(&c(1)).unwrap();
        assert_eq!(state, RunState::Running);
        assert!(why.contains("running on a"), "{why}");
        let q = s.queue_view();
        assert_eq!(q.len(), 1);
        assert!(
            q[0].waiting.contains("busy; 0 commit(s) ahead"),
            "{}",
            q[0].waiting
        );
        let runners = s.runners_view();
        assert_eq!(runners[0].state, RunnerState::Busy { commit: c(1), job });
        assert!(s.why(&c(9)).is_none());
    }
}
