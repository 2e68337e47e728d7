//! Every message that crosses the wire, named by direction.
//!
//! The [`Hello`] / [`HelloReply`] pair is frozen: its layout never changes, so a peer of any
//! version can read the other side's hello and be told precisely why it is refused. The
//! enums behind it change with [`crate::PROTOCOL_VERSION`].

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::ids::{CommitId, JobId, RunnerId};

/// The first frame on every connection, sent by the side that connected.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    /// Always [`crate::MAGIC`]; anything else is not a tinyci peer.
    pub magic: u32,
    /// The sender's [`crate::PROTOCOL_VERSION`].
    pub version: u32,
    /// The sender's [`Role`] as its wire code (checked by [`Role::from_code`]).
    pub role: u8,
    /// The shared secret, or empty when the sender has none.
    pub token: String,
}

/// The answer to a [`Hello`], sent by the side that accepted the connection.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum HelloReply {
    /// The peer may go on; the connection now carries the role's messages.
    Welcome {
        /// The accepting side's protocol version (equal to the sender's).
        version: u32,
    },
    /// The peer is refused, and the connection closes after this frame.
    Refused {
        /// Why, in words fit for a log line.
        reason: String,
    },
}

/// Who is on the other end of a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Role {
    /// A repo_observer submitting commits to the dispatcher.
    Observer,
    /// A test_runner registering with the dispatcher.
    Runner,
    /// A tool (`tinyci`, a git hook) asking a runner or the dispatcher, submitting and
    /// cancelling.
    Client,
}

impl Role {
    /// The byte that stands for this role in a [`Hello`].
    pub fn code(self) -> u8 {
        match self {
            Role::Observer => 1,
            Role::Runner => 2,
            Role::Client => 3,
        }
    }

    /// The role a hello's byte stands for, if any.
    pub fn from_code(code: u8) -> Option<Role> {
        match code {
            1 => Some(Role::Observer),
            2 => Some(Role::Runner),
            3 => Some(Role::Client),
            _ => None,
        }
    }
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Role::Observer => "observer",
            Role::Runner => "runner",
            Role::Client => "client",
        })
    }
}

/// Messages to the dispatcher, from an observer or a runner (after the hello).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ToDispatcher {
    /// Observer or client: these new commits, oldest first. Answered by
    /// [`FromDispatcher::Submitted`] once every one of them is durably recorded (or known
    /// already).
    Submit {
        /// The commits, oldest first.
        commits: Vec<CommitId>,
        /// The branch they were found on, when the sender knows it.
        branch: Option<String>,
        /// Put them at the front of the queue instead of the back.
        front: bool,
        /// Run finished ones again (a queued or running one is still not queued twice).
        rerun: bool,
    },
    /// Runner, once, right after the hello: where it listens and what job it still holds
    /// from an earlier connection. Answered by [`FromDispatcher::Registered`].
    Register {
        /// The `host:port` the runner listens on; its name in logs and results.
        addr: String,
        /// A job the runner is running or has finished but not had acknowledged.
        held: Option<HeldJob>,
        /// Why the runner takes no new job for now (its origin is unreachable, it is
        /// stopping), or `None` when it is available. Changed later by
        /// [`ToDispatcher::Pause`] / [`ToDispatcher::Resume`].
        paused: Option<String>,
    },
    /// Runner: answer to [`FromDispatcher::Ping`], echoing its sequence number.
    Pong {
        /// The ping's sequence number.
        seq: u64,
    },
    /// Runner: the next bytes of a job's output. `offset` is where `data` starts within the
    /// attempt's output, so a resend after reconnecting can be joined without gap or repeat.
    /// Not answered.
    Log {
        /// The attempt the output belongs to.
        job: JobId,
        /// Byte offset of `data` within the attempt's output.
        offset: u64,
        /// Raw output bytes (lines prefixed `[step] `).
        data: Vec<u8>,
    },
    /// Runner: the job has ended. Answered by [`FromDispatcher::ResultAck`]; the runner keeps
    /// the report (and resends it after a reconnect) until then.
    Done {
        /// The attempt that ended.
        job: JobId,
        /// How it ended.
        report: RunReport,
        /// Total bytes of output the attempt produced (all sent as `Log` before this).
        log_len: u64,
    },
    /// Runner: assign me nothing until [`ToDispatcher::Resume`] (my origin is unreachable,
    /// or I am draining before I stop). A job I hold goes on. Not answered.
    Pause {
        /// Why, for the dispatcher's log and status.
        reason: String,
    },
    /// Runner: I take jobs again. Not answered.
    Resume,
    /// Runner: attempt `job` could not be carried out for a reason that is not the
    /// commit's; put the commit back at the front of the queue. No result is written for
    /// it, and the runner has forgotten the job. Not answered.
    GiveBack {
        /// The attempt handed back.
        job: JobId,
        /// What went wrong, in words fit for the commit's log and its final `error`.
        reason: String,
        /// Whether the attempt counts towards the commit's maximum.
        cause: GiveBackCause,
    },
    /// Client: the dispatcher's queue (with why each commit waits), runners and counts.
    /// Answered by [`FromDispatcher::Status`].
    Status,
    /// Client: the runs, newest first. Answered by [`FromDispatcher::Runs`].
    Runs(RunQuery),
    /// Client: one run, by its id or a unique prefix of it (at least 4 hex digits).
    /// Answered by [`FromDispatcher::Run`], [`FromDispatcher::NotFound`] or
    /// [`FromDispatcher::Ambiguous`].
    Run {
        /// Lowercase hex, 4 to 64 digits.
        prefix: String,
    },
    /// Client: the run's log from byte `offset`. Answered by [`FromDispatcher::LogData`]
    /// frames, then (once every byte of a finished run was sent, or at once without
    /// `follow` when the end of the file is reached) [`FromDispatcher::LogEnd`]; or
    /// [`FromDispatcher::NotFound`].
    FollowLog {
        /// The run.
        commit: CommitId,
        /// Where to start, in bytes.
        offset: u64,
        /// Keep the connection and send output as it arrives until the run ends.
        follow: bool,
    },
    /// Client: cancel a queued or running commit (a running one's steps are killed). Its
    /// result says `cancelled`. Answered by [`FromDispatcher::Cancelled`] or
    /// [`FromDispatcher::NotFound`].
    Cancel {
        /// The commit.
        commit: CommitId,
    },
    /// Client: why is this commit not running? Answered by [`FromDispatcher::Why`] or
    /// [`FromDispatcher::NotFound`].
    Why {
        /// The commit.
        commit: CommitId,
    },
    /// Runner, last frame before it closes on purpose (it is stopping): not a death, so
    /// whatever job it still holds goes back to the queue without counting. Not answered.
    Goodbye {
        /// Why, for the dispatcher's log.
        reason: String,
    },
}

/// Why a runner hands a job back ([`ToDispatcher::GiveBack`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum GiveBackCause {
    /// The runner could not carry the job out (fetch or checkout failed, clone damaged,
    /// disk full…). Counts as an attempt: a commit that fails like this on the maximum
    /// number of attempts is given up as `error`.
    Infrastructure,
    /// The runner's origin is unreachable (the runner checked, and pauses until it is
    /// back). Not the commit's doing and not this runner's: not counted.
    OriginUnreachable,
    /// The runner is stopping, or was paused when the job arrived. Not counted.
    Withdrawn,
    /// Origin answered but has no such commit (not pushed yet, or the runner's origin is
    /// a mirror that lags). Not counted: the commit waits in the queue, with a growing
    /// delay, until it is pushed (a submission of new commits tries it again at once).
    NotInOrigin,
}

/// Messages from the dispatcher to an observer or a runner.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum FromDispatcher {
    /// To an observer or client: the answer to [`ToDispatcher::Submit`].
    Submitted {
        /// How many of the submitted commits were new and are now queued.
        queued: u32,
        /// How many were already queued, running or finished.
        known: u32,
    },
    /// To a runner: the answer to [`ToDispatcher::Register`].
    Registered {
        /// The dispatcher's name for this registration.
        runner: RunnerId,
        /// What to do with the job the runner announced, if it announced one.
        held: Option<HeldVerdict>,
        /// The dispatcher's heartbeat timeout: a runner that hears nothing (pings
        /// included) for this long drops the connection and connects again.
        heartbeat_timeout: Duration,
    },
    /// To an idle runner: run this commit as attempt `job`. Answered by `Log` frames and one
    /// `Done`.
    Assign {
        /// The attempt's id; tag every `Log` and the `Done` with it.
        job: JobId,
        /// The commit to check out and test.
        commit: CommitId,
    },
    /// To a runner, every heartbeat interval. Answered by [`ToDispatcher::Pong`].
    Ping {
        /// Echoed in the pong.
        seq: u64,
    },
    /// To a runner: the answer to [`ToDispatcher::Done`]. Either way the runner forgets the job.
    ResultAck {
        /// The attempt the result was for.
        job: JobId,
        /// False when the attempt was superseded or unknown and the result was dropped.
        accepted: bool,
    },
    /// To anyone: a protocol error; the connection closes after this frame.
    Error {
        /// Why, in words fit for a log line.
        reason: String,
    },
    /// To a runner: stop the steps of attempt `job` (kill their process group) and report
    /// it with status `cancelled`. Answered by the attempt's `Done`.
    Cancel {
        /// The attempt.
        job: JobId,
    },
    /// To a client: the answer to [`ToDispatcher::Status`].
    Status(Box<DispatcherStatus>),
    /// To a client: the answer to [`ToDispatcher::Runs`].
    Runs {
        /// How many runs match the query in all (not just this page).
        total: u64,
        /// This page, newest first.
        runs: Vec<RunSummary>,
    },
    /// To a client: the answer to [`ToDispatcher::Run`].
    Run(Box<RunDetail>),
    /// To a client: no commit known to the dispatcher matches.
    NotFound {
        /// What was asked for.
        what: String,
    },
    /// To a client: the prefix matches more than one commit.
    Ambiguous {
        /// Some of the commits it matches.
        candidates: Vec<CommitId>,
    },
    /// To a client following a log: the next bytes, starting at `offset`.
    LogData {
        /// Byte offset of `data` within the log file.
        offset: u64,
        /// Raw bytes of the log.
        data: Vec<u8>,
    },
    /// To a client following a log: nothing more will come.
    LogEnd {
        /// The offset just past the last byte sent.
        offset: u64,
        /// The run's state when the log ended.
        state: RunState,
    },
    /// To a client: the answer to [`ToDispatcher::Cancel`].
    Cancelled {
        /// The commit's state when the cancel arrived.
        was: RunState,
    },
    /// To a client: the answer to [`ToDispatcher::Why`].
    Why {
        /// The commit's state.
        state: RunState,
        /// Why it is in that state, in words.
        reason: String,
    },
    /// To a runner: the dispatcher is stopping on purpose (it will most likely be
    /// restarted); the connection closes after this frame. Keep the job, reconnect at
    /// once and keep trying: a restarted dispatcher adopts it.
    ShuttingDown,
    /// To an observer or client, instead of [`FromDispatcher::Submitted`] or
    /// [`FromDispatcher::Cancelled`]: the request took effect in the dispatcher, but its
    /// database could not record it (a full disk, a lock held by another program). The
    /// dispatcher records it once the database works again, and forgets it if it stops
    /// before that. Sending the request again is safe: a known commit is not queued twice,
    /// a finished one is not cancelled.
    NotRecorded {
        /// Why the database could not record it, in words fit for a person.
        reason: String,
    },
}

/// Messages to a runner's own port, from a [`Role::Client`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ToRunner {
    /// What are you doing? Answered by [`FromRunner::Status`].
    Status,
}

/// Messages from a runner's own port.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum FromRunner {
    /// The answer to [`ToRunner::Status`].
    Status {
        /// The address the runner registered as.
        addr: String,
        /// Whether it currently holds a connection to the dispatcher.
        connected: bool,
        /// The commit it is working on, if any.
        commit: Option<CommitId>,
        /// Why it takes no jobs now (its origin is unreachable, it is stopping), if so.
        paused: Option<String>,
    },
}

/// A job a runner announces when it registers again after losing the dispatcher.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HeldJob {
    /// The attempt.
    pub job: JobId,
    /// Its commit.
    pub commit: CommitId,
    /// Whether the job has already ended (its report is waiting to be delivered).
    pub finished: bool,
}

/// What the dispatcher wants done with a [`HeldJob`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum HeldVerdict {
    /// Keep going: resend output from `log_offset` (what the dispatcher already has) on,
    /// then the result.
    Adopt {
        /// Bytes of the attempt's output the dispatcher already holds.
        log_offset: u64,
    },
    /// The attempt is superseded or unknown: stop it and forget it.
    Drop {
        /// Why, for the runner's log.
        reason: String,
    },
}

/// How a run ended, as the runner reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunReport {
    /// The run's overall status.
    pub status: RunStatus,
    /// One entry per declared step, in order.
    pub steps: Vec<StepReport>,
    /// Why the run could not be carried out, when `status` is `Error`.
    pub error: Option<String>,
}

/// The overall status of a run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RunStatus {
    /// Every step succeeded.
    Success,
    /// A step failed or timed out.
    Failure,
    /// The run could not be carried out (bad spec, checkout failed, runner kept dying…).
    Error,
    /// Somebody cancelled it.
    Cancelled,
}

/// Where a commit is in its life, as clients see it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RunState {
    /// Waiting in the queue.
    Queued,
    /// A runner is on it.
    Running,
    /// Every step succeeded.
    Success,
    /// A step failed or timed out.
    Failure,
    /// The run could not be carried out.
    Error,
    /// Somebody cancelled it.
    Cancelled,
}

impl RunState {
    /// Whether the run is over.
    pub fn is_finished(self) -> bool {
        !matches!(self, RunState::Queued | RunState::Running)
    }

    /// The word for it (as in the result file's `status`).
    pub fn as_str(self) -> &'static str {
        match self {
            RunState::Queued => "queued",
            RunState::Running => "running",
            RunState::Success => "success",
            RunState::Failure => "failure",
            RunState::Error => "error",
            RunState::Cancelled => "cancelled",
        }
    }
}

impl From<RunStatus> for RunState {
    fn from(s: RunStatus) -> RunState {
        match s {
            RunStatus::Success => RunState::Success,
            RunStatus::Failure => RunState::Failure,
            RunStatus::Error => RunState::Error,
            RunStatus::Cancelled => RunState::Cancelled,
        }
    }
}

impl std::fmt::Display for RunState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for RunState {
    type Err = String;

    fn from_str(s: &str) -> Result<RunState, String> {
        Ok(match s {
            "queued" => RunState::Queued,
            "running" => RunState::Running,
            "success" => RunState::Success,
            "failure" => RunState::Failure,
            "error" => RunState::Error,
            "cancelled" => RunState::Cancelled,
            other => {
                return Err(format!(
                    "unknown status {other:?} (one of queued, running, success, failure, error, cancelled)"
                ))
            }
        })
    }
}

/// A client's question for [`ToDispatcher::Runs`].
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunQuery {
    /// Only runs in this state.
    pub state: Option<RunState>,
    /// Only runs of this branch.
    pub branch: Option<String>,
    /// At most this many (the dispatcher caps it).
    pub limit: u32,
    /// Skip this many of the newest first.
    pub offset: u64,
}

/// One line of the run list.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunSummary {
    /// The commit.
    pub commit: CommitId,
    /// Where it is.
    pub state: RunState,
    /// The branch it was found on, if known.
    pub branch: Option<String>,
    /// Names of the steps that failed or timed out.
    pub failed_steps: Vec<String>,
    /// When it was queued, in milliseconds since the epoch.
    pub queued_at_ms: u64,
    /// When it finished, if it has.
    pub finished_at_ms: Option<u64>,
    /// Attempts that counted so far.
    pub attempts: u32,
}

/// One attempt of a run, as the dispatcher recorded it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AttemptView {
    /// The attempt's id.
    pub job: JobId,
    /// The runner's address.
    pub runner: String,
    /// When it was handed out (ms since the epoch).
    pub started_at_ms: u64,
    /// When it ended, if it has.
    pub ended_at_ms: Option<u64>,
    /// How it ended (`running`, `result`, `returned`…).
    pub outcome: String,
    /// Why it ended without a result, if it did.
    pub reason: Option<String>,
}

/// Everything known about one run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunDetail {
    /// The list line.
    pub summary: RunSummary,
    /// The steps of the result, once there is one.
    pub steps: Vec<StepReport>,
    /// The runner of the result (or of the running attempt).
    pub runner: Option<String>,
    /// When the attempt that produced the result started.
    pub started_at_ms: Option<u64>,
    /// The result's `error`, if any.
    pub error: Option<String>,
    /// Every attempt, oldest first.
    pub attempts: Vec<AttemptView>,
    /// The log's length in bytes so far.
    pub log_len: u64,
    /// Where the result file is (or will be), on the dispatcher's machine.
    pub result_file: String,
}

/// A commit waiting in the queue.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueuedView {
    /// The commit.
    pub commit: CommitId,
    /// Its branch, if known.
    pub branch: Option<String>,
    /// When it was queued (ms since the epoch).
    pub queued_at_ms: u64,
    /// Attempts that counted so far.
    pub attempts: u32,
    /// Why it waits, in words.
    pub waiting: String,
}

/// What a runner is doing, as the dispatcher sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum RunnerState {
    /// Free for a job.
    Idle,
    /// On a job.
    Busy {
        /// The commit.
        commit: CommitId,
        /// The attempt.
        job: JobId,
    },
    /// Takes no jobs for now.
    Paused {
        /// Why.
        reason: String,
    },
}

/// One registered runner.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunnerView {
    /// The dispatcher's name for its registration.
    pub id: RunnerId,
    /// Where it listens.
    pub addr: String,
    /// What it does.
    pub state: RunnerState,
}

/// The answer to [`ToDispatcher::Status`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DispatcherStatus {
    /// The queue, next first.
    pub queue: Vec<QueuedView>,
    /// Commits on a runner now.
    pub running: Vec<RunSummary>,
    /// Every registered runner.
    pub runners: Vec<RunnerView>,
    /// Runs per state, over the whole history.
    pub counts: Vec<(RunState, u64)>,
    /// Why the dispatcher refuses submissions now (its database cannot be written), if so.
    pub refusing: Option<String>,
}

/// How one step ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StepReport {
    /// The step's name from `.tinyci.toml`.
    pub name: String,
    /// How it ended.
    pub status: StepStatus,
    /// The exit code, when the step's process exited by itself.
    pub exit_code: Option<i32>,
    /// Wall time of the step in milliseconds (0 for skipped steps).
    pub duration_ms: u64,
}

/// The status of one step.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StepStatus {
    /// Exited 0.
    Success,
    /// Exited non-zero or was killed by a signal.
    Failure,
    /// Ran past its timeout; its process group was killed.
    Timeout,
    /// Not run, because an earlier step failed.
    Skipped,
}
