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
    /// A tool asking a runner (or dispatcher) for its status.
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
    /// Observer: these new commits, oldest first. Answered by [`FromDispatcher::Submitted`]
    /// once every one of them is durably recorded (or known already).
    Submit {
        /// The commits, oldest first.
        commits: Vec<CommitId>,
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
}

/// Messages from the dispatcher to an observer or a runner.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum FromDispatcher {
    /// To an observer: the answer to [`ToDispatcher::Submit`].
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
    /// To a runner: the dispatcher is stopping on purpose (it will most likely be
    /// restarted); the connection closes after this frame. Keep the job, reconnect at
    /// once and keep trying: a restarted dispatcher adopts it.
    ShuttingDown,
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
