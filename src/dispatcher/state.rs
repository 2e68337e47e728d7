//! The dispatcher's bookkeeping as a synchronous state machine: the FIFO queue of commits,
//! the pool of runners, and the job attempts in flight. No I/O and no clock of its own (the
//! caller passes `now`), so every rule here has a unit test.
//!
//! Fencing: each hand-out of a commit is an attempt with a fresh [`JobId`]. Only the
//! attempt a commit currently has outstanding may deliver output or a result; once a
//! runner is declared lost its attempt is forgotten, so a runner that was only presumed
//! dead (frozen, partitioned) cannot overwrite the newer attempt when it wakes up.

use std::collections::{HashMap, HashSet, VecDeque};
use std::time::SystemTime;

use tinyci_proto::{CommitId, JobId, RunReport, RunStatus, RunnerId};

use crate::results::{rfc3339, ResultFile};

/// What the scheduler knows about a commit that is queued or running.
#[derive(Debug, Clone)]
pub struct Entry {
    /// When it was first recorded.
    pub queued_at: SystemTime,
    /// When its latest attempt was assigned.
    pub started_at: Option<SystemTime>,
    /// How many attempts have been assigned so far.
    pub attempts: u32,
    /// The outstanding attempt, if one is.
    pub job: Option<JobId>,
    /// The runner holding the outstanding attempt (`None` while an attempt restored from
    /// the journal waits to be adopted).
    pub runner: Option<RunnerId>,
    /// Address of the runner that had the latest attempt.
    pub runner_addr: Option<String>,
}

#[derive(Debug)]
struct Runner {
    addr: String,
    job: Option<JobId>,
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

/// What became of the job of a runner that was lost.
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
    },
    /// Its commit has used up its attempts and is finished as `error`.
    GaveUp {
        /// The attempt that was lost.
        job: JobId,
        /// The result to record.
        result: ResultFile,
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
    finished: HashSet<CommitId>,
    runners: HashMap<RunnerId, Runner>,
    idle: VecDeque<RunnerId>,
    jobs: HashMap<JobId, CommitId>,
}

impl Scheduler {
    /// An empty scheduler that gives a commit at most `max_attempts` attempts.
    pub fn new(max_attempts: u32) -> Self {
        Scheduler {
            max_attempts: max_attempts.max(1),
            queue: VecDeque::new(),
            active: HashMap::new(),
            finished: HashSet::new(),
            runners: HashMap::new(),
            idle: VecDeque::new(),
            jobs: HashMap::new(),
        }
    }

    /// Records a commit that already has a result, so it is never queued again.
    pub fn mark_finished(&mut self, commit: CommitId) {
        self.finished.insert(commit);
    }

    /// Whether the commit is queued, running or finished.
    pub fn is_known(&self, commit: &CommitId) -> bool {
        self.active.contains_key(commit) || self.finished.contains(commit)
    }

    /// Queues a new commit at the back. Returns false (and changes nothing) if the commit is
    /// already queued, running or finished.
    pub fn submit(&mut self, commit: CommitId, now: SystemTime) -> bool {
        if self.is_known(&commit) {
            return false;
        }
        self.active.insert(
            commit.clone(),
            Entry {
                queued_at: now,
                started_at: None,
                attempts: 0,
                job: None,
                runner: None,
                runner_addr: None,
            },
        );
        self.queue.push_back(commit);
        true
    }

    /// Restores a commit from the journal whose attempt `job` was running when the
    /// dispatcher stopped. It waits for its runner to come back ([`Scheduler::adopt`]) until
    /// [`Scheduler::requeue_orphans`] puts it back in the queue.
    pub fn restore_running(
        &mut self,
        commit: CommitId,
        queued_at: SystemTime,
        job: JobId,
        attempts: u32,
        addr: Option<String>,
    ) {
        if self.is_known(&commit) {
            return;
        }
        self.jobs.insert(job, commit.clone());
        self.active.insert(
            commit,
            Entry {
                queued_at,
                started_at: Some(queued_at),
                attempts,
                job: Some(job),
                runner: None,
                runner_addr: addr,
            },
        );
    }

    /// Restores a queued commit from the journal (after attempts that were lost).
    pub fn restore_queued(&mut self, commit: CommitId, queued_at: SystemTime, attempts: u32) {
        if self.submit(commit.clone(), queued_at) {
            if let Some(e) = self.active.get_mut(&commit) {
                e.attempts = attempts;
            }
        }
    }

    /// Puts every restored attempt that no runner adopted back at the front of the queue
    /// (oldest first). Returns the commits requeued.
    pub fn requeue_orphans(&mut self) -> Vec<CommitId> {
        let mut orphans: Vec<(SystemTime, CommitId)> = self
            .active
            .iter()
            .filter(|(_, e)| e.job.is_some() && e.runner.is_none())
            .map(|(c, e)| (e.queued_at, c.clone()))
            .collect();
        orphans.sort();
        for (_, c) in orphans.iter().rev() {
            if let Some(e) = self.active.get_mut(c) {
                if let Some(job) = e.job.take() {
                    self.jobs.remove(&job);
                }
            }
            self.queue.push_front(c.clone());
        }
        orphans.into_iter().map(|(_, c)| c).collect()
    }

    /// Adds a registered runner to the idle pool.
    pub fn add_runner(&mut self, id: RunnerId, addr: String) {
        self.runners.insert(id, Runner { addr, job: None });
        self.idle.push_back(id);
    }

    /// A newly registered runner announces it still runs `job`. If that attempt is
    /// outstanding and has no live runner (it was restored from the journal), the runner
    /// takes it over and `true` is returned.
    pub fn adopt(&mut self, id: RunnerId, job: JobId) -> bool {
        let Some(commit) = self.jobs.get(&job) else {
            return false;
        };
        let Some(entry) = self.active.get_mut(commit) else {
            return false;
        };
        let Some(runner) = self.runners.get_mut(&id) else {
            return false;
        };
        if entry.runner.is_some() || runner.job.is_some() {
            return false;
        }
        entry.runner = Some(id);
        entry.runner_addr = Some(runner.addr.clone());
        runner.job = Some(job);
        self.idle.retain(|r| *r != id);
        true
    }

    /// Removes a runner (connection lost or heartbeats missed) and deals with its job.
    pub fn remove_runner(&mut self, id: RunnerId, now: SystemTime) -> Lost {
        self.idle.retain(|r| *r != id);
        let Some(runner) = self.runners.remove(&id) else {
            return Lost::Idle;
        };
        let Some(job) = runner.job else {
            return Lost::Idle;
        };
        let Some(commit) = self.jobs.remove(&job) else {
            return Lost::Idle;
        };
        let Some(entry) = self.active.get_mut(&commit) else {
            return Lost::Idle;
        };
        entry.job = None;
        entry.runner = None;
        if entry.attempts >= self.max_attempts {
            let entry = self.active.remove(&commit).expect("entry present");
            self.finished.insert(commit.clone());
            let error = format!(
                "gave up after {} attempts: the runner was lost during every one (last: {}); \
                 the commit may be killing its runner",
                entry.attempts, runner.addr
            );
            let result = ResultFile {
                commit,
                status: RunStatus::Error,
                steps: Vec::new(),
                runner: entry.runner_addr.clone(),
                attempts: entry.attempts,
                queued_at: rfc3339(entry.queued_at),
                started_at: entry.started_at.map(rfc3339),
                finished_at: rfc3339(now),
                error: Some(error),
            };
            return Lost::GaveUp { job, result };
        }
        self.queue.push_front(commit.clone());
        Lost::Requeued { commit, job }
    }

    /// Pairs idle runners with queued commits, oldest commit and longest-idle runner first.
    pub fn assign(&mut self, now: SystemTime) -> Vec<Assignment> {
        let mut out = Vec::new();
        while !self.queue.is_empty() && !self.idle.is_empty() {
            let (Some(commit), Some(id)) = (self.queue.pop_front(), self.idle.pop_front()) else {
                break;
            };
            let (Some(entry), Some(runner)) =
                (self.active.get_mut(&commit), self.runners.get_mut(&id))
            else {
                // Cannot happen while the maps are kept in step; keep the runner usable.
                self.idle.push_front(id);
                continue;
            };
            let job = JobId::new();
            entry.attempts += 1;
            entry.started_at = Some(now);
            entry.job = Some(job);
            entry.runner = Some(id);
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
    ) -> Result<ResultFile, Refusal> {
        let commit = self.jobs.remove(&job).ok_or(Refusal::NotOutstanding(job))?;
        let entry = self
            .active
            .remove(&commit)
            .ok_or(Refusal::NotOutstanding(job))?;
        if let Some(id) = entry.runner {
            if let Some(r) = self.runners.get_mut(&id) {
                r.job = None;
                self.idle.push_back(id);
            }
        }
        self.finished.insert(commit.clone());
        Ok(ResultFile {
            commit,
            status: report.status,
            steps: report.steps,
            runner: entry.runner_addr,
            attempts: entry.attempts,
            queued_at: rfc3339(entry.queued_at),
            started_at: entry.started_at.map(rfc3339),
            finished_at: rfc3339(now),
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
        s.add_runner(RunnerId(1), "a".into());
        s.add_runner(RunnerId(2), "b".into());
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
        s.add_runner(RunnerId(1), "a".into());
        let a = s.assign(now());
        assert!(!s.submit(c(1), now()), "running");
        s.finish(a[0].job, ok(), now()).unwrap();
        assert!(!s.submit(c(1), now()), "finished");
        s.mark_finished(c(2));
        assert!(!s.submit(c(2), now()), "finished before a restart");
    }

    #[test]
    fn lost_runner_requeues_at_the_front_and_fences_its_result() {
        let mut s = Scheduler::new(3);
        s.submit(c(1), now());
        s.submit(c(2), now());
        s.add_runner(RunnerId(1), "a".into());
        let first = s.assign(now()).remove(0);
        assert!(
            matches!(s.remove_runner(RunnerId(1), now()), Lost::Requeued { ref commit, .. } if *commit == c(1))
        );
        s.add_runner(RunnerId(2), "b".into());
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

    #[test]
    fn poisoned_commit_gives_up_after_max_attempts() {
        let mut s = Scheduler::new(2);
        s.submit(c(1), now());
        s.submit(c(2), now());
        for id in 1..=2 {
            s.add_runner(RunnerId(id), format!("r{id}"));
            let a = s.assign(now());
            assert_eq!(a[0].commit, c(1));
            let lost = s.remove_runner(RunnerId(id), now());
            if id == 1 {
                assert!(matches!(lost, Lost::Requeued { .. }));
            } else {
                let Lost::GaveUp { result, .. } = lost else {
                    panic!("expected to give up")
                };
                assert_eq!(result.status, RunStatus::Error);
                assert_eq!(result.attempts, 2);
                assert!(result.error.unwrap().contains("gave up after 2 attempts"));
            }
        }
        s.add_runner(RunnerId(9), "r9".into());
        assert_eq!(s.assign(now())[0].commit, c(2), "the pool goes on");
        assert!(!s.submit(c(1), now()), "the given-up commit is finished");
    }

    #[test]
    fn idle_runner_loss_changes_nothing() {
        let mut s = Scheduler::new(3);
        s.add_runner(RunnerId(1), "a".into());
        assert!(matches!(s.remove_runner(RunnerId(1), now()), Lost::Idle));
        s.submit(c(1), now());
        assert!(s.assign(now()).is_empty());
        assert_eq!(s.queued(), 1);
    }

    #[test]
    fn restored_attempt_is_adopted_or_requeued() {
        let mut s = Scheduler::new(3);
        let job = JobId::new();
        s.restore_running(c(1), now(), job, 1, Some("a".into()));
        s.restore_running(c(2), now(), JobId::new(), 1, None);
        s.add_runner(RunnerId(1), "a".into());
        assert!(!s.adopt(RunnerId(1), JobId::new()), "unknown job");
        assert!(s.adopt(RunnerId(1), job));
        assert!(s.assign(now()).is_empty(), "adopting runner is busy");
        assert_eq!(s.requeue_orphans(), vec![c(2)]);
        s.add_runner(RunnerId(2), "b".into());
        assert_eq!(s.assign(now())[0].commit, c(2));
        let r = s.finish(job, ok(), now()).unwrap();
        assert_eq!(r.attempts, 1);
    }
}
